"""Load-balancing algorithms, chosen by name from `BALANCERS`.

A balancer is built once per snapshot over the upstream's TargetStates and answers `pick`:
the target for this request among those available and not excluded (already tried), or None.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from bastion.config.schema import Upstream
from bastion.http.model import Request
from bastion.upstream.targets import TargetState


class Balancer:
    def __init__(self, targets: Sequence[TargetState], config: Upstream) -> None:
        self.targets = list(targets)
        self.config = config

    def pick(self, request: Request, exclude: Sequence[TargetState] = ()) -> TargetState | None:
        raise NotImplementedError


class RoundRobin(Balancer):
    """Smooth weighted round robin: weights 5,1,1 give a a b a c a a, never a burst of five.

    Each pick adds every candidate's weight to its running score, takes the highest, and
    subtracts the total from the winner (the algorithm nginx uses for `weight=`).
    """

    def __init__(self, targets: Sequence[TargetState], config: Upstream) -> None:
        super().__init__(targets, config)
        self.scores = [0] * len(self.targets)

    def pick(self, request: Request, exclude: Sequence[TargetState] = ()) -> TargetState | None:
        targets = self.targets
        scores = self.scores
        best = -1
        total = 0
        for i, target in enumerate(targets):
            if not target.available() or target.backup or target in exclude:
                continue
            weight = target.weight
            scores[i] += weight
            total += weight
            if best < 0 or scores[i] > scores[best]:
                best = i
        if best < 0:
            return None
        scores[best] -= total
        return targets[best]


BALANCERS: dict[str, Callable[[Sequence[TargetState], Upstream], Balancer]] = {
    "round_robin": RoundRobin,
}
