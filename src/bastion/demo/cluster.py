"""`make cluster-demo`: Redis, one origin and three gateways on this machine, one shared limit,
and a pushed config reaching all three.

Runs `redis-server` (no persistence, in a temporary directory), the demo origin, then
`bastion push` of demo/cluster.yaml and three `bastion run --from-redis`, each on its own port.
It shows 15 requests spread over the three gateways against one limit of 10, pushes a second
version and measures how long each gateway takes to serve it, then waits for Ctrl-C (or
stops at once with --once). Ports: BASTION_CLUSTER_DEMO_PORTS (three gateway ports, default
8081,8082,8083), BASTION_CLUSTER_DEMO_REDIS_PORT (6399), BASTION_DEMO_ORIGIN_PORT (9111).
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

from bastion.demo.runner import port_free, wait_listening


def _wait(port: int, process: subprocess.Popen[bytes], name: str, timeout: float = 15.0) -> None:
    if not wait_listening(port, process, time.monotonic() + timeout):
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited ({process.returncode})")
        raise RuntimeError(f"{name} does not listen on 127.0.0.1:{port}")


def _get(port: int, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status, resp.getheader("X-Demo-Config") or "-"
    finally:
        conn.close()


def _bastion(*args: str) -> None:
    print(f"$ bastion {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, "-m", "bastion", *args], check=True)


def run(once: bool) -> int:
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        print("cluster demo: redis-server is not installed (apt-get install redis-server)", file=sys.stderr)
        return 1
    ports = [int(p) for p in os.environ.get("BASTION_CLUSTER_DEMO_PORTS", "8081,8082,8083").split(",")]
    redis_port = int(os.environ.get("BASTION_CLUSTER_DEMO_REDIS_PORT", "6399"))
    origin_port = int(os.environ.setdefault("BASTION_DEMO_ORIGIN_PORT", "9111"))
    busy = [p for p in [*ports, redis_port, origin_port] if not port_free(p)]
    if busy:
        print(
            f"cluster demo: port {', '.join(map(str, busy))} in use on 127.0.0.1 (see the ports below)", file=sys.stderr
        )
        print(__doc__.split("Ports: ")[1].strip(), file=sys.stderr)
        return 1
    url = f"redis://127.0.0.1:{redis_port}/0"
    workdir = Path(tempfile.mkdtemp(prefix="bastion-cluster-demo-"))
    processes: list[subprocess.Popen[bytes]] = []
    try:
        redis = subprocess.Popen(
            [redis_server, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            cwd=workdir,
            stdout=subprocess.DEVNULL,
            process_group=0,
        )
        processes.append(redis)
        origin = subprocess.Popen(
            [sys.executable, "-m", "bastion.demo.origin", "--port", str(origin_port), "--name", "users"],
            stdout=subprocess.DEVNULL,
            process_group=0,
        )
        processes.append(origin)
        _wait(redis_port, redis, "redis-server")
        _wait(origin_port, origin, "the origin")
        print(f"Redis on {url}, origin on 127.0.0.1:{origin_port}\n")
        with resources.as_file(resources.files("bastion.demo") / "cluster.yaml") as bundled:
            config = workdir / "cluster.yaml"
            config.write_text(bundled.read_text())
        _bastion("push", str(config), "--redis", url, "-m", "first version")
        for index, port in enumerate(ports):
            env = {**os.environ, "BASTION_DEMO_PORT": str(port)}
            log = open(workdir / f"gateway{index + 1}.log", "wb")  # noqa: SIM115 - closed with the process
            command = [sys.executable, "-m", "bastion", "run", "--from-redis", url]
            command += ["--local-copy", str(workdir / f"gateway{index + 1}.json")]
            processes.append(subprocess.Popen(command, env=env, stdout=log, stderr=log, process_group=0))
        for index, (port, process) in enumerate(zip(ports, processes[2:], strict=True)):
            _wait(port, process, f"gateway {index + 1} (log: {workdir}/gateway{index + 1}.log)")
        print(f"\nthree gateways follow it: {', '.join(f'http://127.0.0.1:{p}' for p in ports)}\n")

        print("One limit for the cluster (10 per 10 s on /users): 15 requests, round robin over the gateways")
        for i in range(15):
            port = ports[i % len(ports)]
            status, _ = _get(port, "/users/1")
            print(f"  request {i + 1:2}  -> :{port}  {status}")
        print()

        config.write_text(config.read_text().replace('"v1"', '"v2"'))
        _bastion("push", str(config), "--redis", url, "-m", "second version")
        start = time.monotonic()
        pending = set(ports)
        reached: dict[int, float] = {}
        while pending and time.monotonic() - start < 5:
            for port in list(pending):
                if _get(port, "/")[1] == "v2":
                    reached[port] = time.monotonic() - start
                    pending.discard(port)
        for port in ports:
            when = f"{reached[port] * 1000:.0f} ms after the push" if port in reached else "not within 5 s"
            print(f"  :{port} serves version 2 {when}")
        print()
        _bastion("versions", "--redis", url)
        if once:
            return 0 if not pending else 1
        print(
            "\nTry:\n"
            f"  curl -si http://127.0.0.1:{ports[0]}/users/1      # X-Demo-Config, RateLimit-* headers\n"
            f"  bastion push YOUR.yaml --redis {url}\n"
            f"  bastion versions --redis {url}\n"
            f"  bastion consumers add app --key s3cret --redis {url}\n"
            f"Gateway logs are in {workdir}. Ctrl-C stops everything."
        )
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})  # after forking: not inherited
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
        return 0
    except KeyboardInterrupt:
        return 0
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        print(f"cluster demo: {exc}", file=sys.stderr)
        return 1
    finally:
        for process in reversed(processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="Three Bastion gateways on one Redis.")
    parser.add_argument("--once", action="store_true", help="Stop after the walkthrough instead of waiting for Ctrl-C.")
    sys.exit(run(parser.parse_args().once))


if __name__ == "__main__":
    main()
