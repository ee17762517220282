"""Load-balancing algorithms, chosen by name from `BALANCERS`.

A balancer is built once per snapshot over the upstream's TargetStates, with that snapshot's
weights and backup flags, and answers `pick`: the target for this request among those
available and not excluded (already tried), or None.

Available means healthy, not ejected and not drained (`TargetState.available`; the round
robin loops test the same three fields inline). Tiers: backups are candidates only while no
primary is available at all. A primary that is available but was already tried does not
open the backup tier (retries go to other primaries).

Weights are the configured weights times the target's slow-start ramp, so a target that just
joined or recovered gets a growing share (consistent hashing ignores the ramp: a key's home
must not depend on time). Randomness and the clock are injected so unit tests are exact.
"""

from __future__ import annotations

import bisect
import hashlib
import random
import time
from collections.abc import Callable, Sequence
from urllib.parse import unquote_plus

from bastion.config.schema import Upstream
from bastion.http.model import Request
from bastion.upstream.targets import TargetState

Clock = Callable[[], float]


class Balancer:
    """Base: the per-snapshot target list, weights and tiers."""

    def __init__(
        self,
        targets: Sequence[TargetState],
        config: Upstream,
        rng: random.Random | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.targets = list(targets)
        self.config = config
        self.rng = rng or random.Random()
        self.clock = clock
        if len(config.targets) != len(self.targets):
            raise ValueError("one TargetState per configured target, in order")
        self.weights = [t.weight for t in config.targets]
        self.primary = [i for i, t in enumerate(config.targets) if not t.backup and t.weight > 0]
        self.backup = [i for i, t in enumerate(config.targets) if t.backup and t.weight > 0]

    def pick(self, request: Request, exclude: Sequence[TargetState] = ()) -> TargetState | None:
        raise NotImplementedError

    def candidates(self, now: float, exclude: Sequence[TargetState] = ()) -> list[int]:
        """Indexes of the targets this request may go to: the primary tier, else the backups."""
        targets = self.targets
        out = []
        any_primary = False
        for i in self.primary:
            target = targets[i]
            if target.available(now):
                any_primary = True
                if target not in exclude:
                    out.append(i)
        if out or any_primary:
            return out
        return [i for i in self.backup if targets[i].available(now) and targets[i] not in exclude]

    def effective_weight(self, i: int, now: float) -> float:
        target = self.targets[i]
        weight = self.weights[i]
        return weight if now >= target.ramp_until else weight * target.ramp(now)

    def any_primary(self, now: float) -> bool:
        targets = self.targets
        return any(targets[i].available(now) for i in self.primary)

    def any_available(self, now: float, besides: TargetState | None = None) -> bool:
        """Would some target still take traffic if `besides` were out?"""
        targets = self.targets
        return any(targets[i] is not besides and targets[i].available(now) for i in (*self.primary, *self.backup))


class RoundRobin(Balancer):
    """Smooth weighted round robin: weights 5,1,1 give a a b a c a a, never a burst of five.

    Each pick adds every candidate's weight to its running score, takes the highest, and
    subtracts the total from the winner (the algorithm nginx uses for `weight=`).
    """

    def __init__(
        self,
        targets: Sequence[TargetState],
        config: Upstream,
        rng: random.Random | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        super().__init__(targets, config, rng, clock)
        self.scores = [0.0] * len(self.targets)

    def pick(self, request: Request, exclude: Sequence[TargetState] = ()) -> TargetState | None:
        now = self.clock()
        best = self._pick_tier(self.primary, now, exclude)
        if best is None:
            if self.any_primary(now):
                return None
            best = self._pick_tier(self.backup, now, exclude)
        return best

    def _pick_tier(self, tier: list[int], now: float, exclude: Sequence[TargetState]) -> TargetState | None:
        targets = self.targets
        weights = self.weights
        scores = self.scores
        best = -1
        total = 0.0
        for i in tier:
            target = targets[i]
            if (
                not target.healthy
                or target.ejected_until > now
                or target.admin_drained
                or (exclude and target in exclude)
            ):
                continue
            weight = weights[i] if now >= target.ramp_until else weights[i] * target.ramp(now)
            scores[i] += weight
            total += weight
            if best < 0 or scores[i] > scores[best]:
                best = i
        if best < 0:
            return None
        scores[best] -= total
        return targets[best]


class LeastConnections(RoundRobin):
    """Fewest in-flight requests per unit of weight; ties share by smooth weighted round robin.

    With `in_flight / weight` (as nginx's least_conn), an idle upstream still spreads sequential
    traffic by weight instead of sending all of it to the heaviest target.
    """

    def pick(self, request: Request, exclude: Sequence[TargetState] = ()) -> TargetState | None:
        now = self.clock()
        tied, any_primary = self._least(self.primary, now, exclude)
        if not tied and not any_primary:
            tied, _ = self._least(self.backup, now, exclude)
        if len(tied) <= 1:
            return self.targets[tied[0]] if tied else None
        return self._pick_tier(tied, now, ())

    def _least(self, tier: list[int], now: float, exclude: Sequence[TargetState]) -> tuple[list[int], bool]:
        """The least-loaded candidates of a tier, and whether any of the tier is available."""
        targets = self.targets
        weights = self.weights
        least = float("inf")
        tied: list[int] = []
        available = False
        for i in tier:
            target = targets[i]
            if not target.healthy or target.ejected_until > now or target.admin_drained:
                continue
            available = True
            if exclude and target in exclude:
                continue
            weight = weights[i] if now >= target.ramp_until else weights[i] * target.ramp(now)
            load = target.in_flight / weight
            if load < least:
                least = load
                tied = [i]
            elif load == least:
                tied.append(i)
        return tied, available


class PeakEwma(Balancer):
    """Power of two choices: of two random candidates, the one with the lower cost wins.

    cost = peak-EWMA latency x (in_flight + 1) / weight. Two random choices avoid the herd a
    global minimum causes (every gateway worker rushing to the same "best" target) while still
    steering away from slow or busy targets. A target without samples yet costs a nominal 1 ms.
    Weights scale the cost, so under load a weight-3 target carries about three times the
    requests of a weight-1 target of the same speed; equal costs are shared by weight.
    """

    COLD = 0.001

    def pick(self, request: Request, exclude: Sequence[TargetState] = ()) -> TargetState | None:
        now = self.clock()
        chosen = self.candidates(now, exclude)
        if not chosen:
            return None
        if len(chosen) == 1:
            return self.targets[chosen[0]]
        a, b = self.rng.sample(chosen, 2)
        cost_a, cost_b = self._cost(a, now), self._cost(b, now)
        if cost_a == cost_b:  # e.g. an idle upstream: share by weight
            weight_a = self.effective_weight(a, now)
            return self.targets[a if self.rng.random() * (weight_a + self.effective_weight(b, now)) < weight_a else b]
        return self.targets[a] if cost_a < cost_b else self.targets[b]

    def _cost(self, i: int, now: float) -> float:
        target = self.targets[i]
        latency = target.latency(now) or self.COLD
        return latency * (target.in_flight + 1) / max(self.effective_weight(i, now), 1e-9)


class WeightedRandom(Balancer):
    """Each candidate with probability weight / total: stateless, good with many gateways."""

    def pick(self, request: Request, exclude: Sequence[TargetState] = ()) -> TargetState | None:
        now = self.clock()
        chosen = self.candidates(now, exclude)
        if not chosen:
            return None
        weights = [self.effective_weight(i, now) for i in chosen]
        point = self.rng.random() * sum(weights)
        for i, weight in zip(chosen, weights, strict=True):
            point -= weight
            if point < 0:
                return self.targets[i]
        return self.targets[chosen[-1]]


def hash64(data: str) -> int:
    """A stable 64-bit hash (the same in every process, unlike hash())."""
    return int.from_bytes(hashlib.blake2b(data.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


def request_key(request: Request, hash_on: str) -> str | None:
    """The consistent-hash key of a request: ip | path | header:NAME | cookie:NAME | query:NAME."""
    kind, _, name = hash_on.partition(":")
    if kind == "ip":
        return request.client_ip
    if kind == "path":
        return request.path
    if kind == "header":
        return request.headers.get(name)
    if kind == "cookie":
        return cookie_value(request, name)
    if kind == "query":
        for part in request.query.split("&"):
            key, sep, value = part.partition("=")
            if sep and unquote_plus(key) == name:
                return unquote_plus(value)
        return None
    return None


def cookie_value(request: Request, name: str) -> str | None:
    """The value of cookie `name` from the request's Cookie header(s), or None."""
    prefix = name.encode("latin-1") + b"="
    for key, value in request.headers.items:
        if key != b"cookie" or prefix not in value:
            continue
        for part in value.split(b";"):
            part = part.strip()
            if part.startswith(prefix):
                return part[len(prefix) :].decode("latin-1")
    return None


class ConsistentHash(Balancer):
    """A hash ring: each target owns VNODES points per unit of weight; a key goes clockwise.

    A target that leaves (removed, unhealthy, ejected or drained) gives only its own keys to the next
    targets on the ring; one that joins takes about weight/total of the keys, all from others'
    arcs. A request without the key (no such header, cookie or query parameter) is hashed on the
    client address instead. Retries walk on to the next distinct target of the ring.
    """

    VNODES = 160
    MAX_POINTS = 100_000

    def __init__(
        self,
        targets: Sequence[TargetState],
        config: Upstream,
        rng: random.Random | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        super().__init__(targets, config, rng, clock)
        self.hash_on = config.hash_on
        self.rings = [self._ring(self.primary), self._ring(self.backup)]

    def _ring(self, tier: list[int]) -> tuple[list[int], list[int]]:
        total = sum(self.weights[i] for i in tier) or 1
        per_unit = max(1, min(self.VNODES, self.MAX_POINTS // total))
        points: list[tuple[int, int]] = []
        for i in tier:
            label = f"{self.targets[i].address}"
            for n in range(self.weights[i] * per_unit):
                points.append((hash64(f"{label}#{n}"), i))
        points.sort()
        return [p for p, _ in points], [i for _, i in points]

    def pick(self, request: Request, exclude: Sequence[TargetState] = ()) -> TargetState | None:
        now = self.clock()
        key = request_key(request, self.hash_on)
        if key is None:
            key = request.client_ip
        point = hash64(key)
        found = self.lookup(point, 0, now, exclude)
        if found is not None or self.any_primary(now):
            return found
        return self.lookup(point, 1, now, exclude)

    def lookup(self, point: int, tier: int, now: float, exclude: Sequence[TargetState] = ()) -> TargetState | None:
        hashes, owners = self.rings[tier]
        count = len(hashes)
        if not count:
            return None
        start = bisect.bisect_left(hashes, point)
        targets = self.targets
        seen: set[int] = set()
        for step in range(count):
            i = owners[(start + step) % count]
            if i in seen:
                continue
            seen.add(i)
            target = targets[i]
            if target.available(now) and target not in exclude:
                return target
            if len(seen) == len(self.primary if tier == 0 else self.backup):
                break
        return None


BalancerFactory = Callable[..., Balancer]

BALANCERS: dict[str, BalancerFactory] = {
    "round_robin": RoundRobin,
    "least_connections": LeastConnections,
    "p2c_ewma": PeakEwma,
    "consistent_hash": ConsistentHash,
    "random": WeightedRandom,
}
