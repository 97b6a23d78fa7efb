#!/usr/bin/env python3
"""The Python client's local RPC rate: `broker.ping` with an empty payload,
at window 1 (the synchronous client) and window 64 (asyncio), median of
5 runs. With --service, also calls to a service that a Python provider
(asyncio, in a process of its own, on the same broker) offers.

    python3 python/bench.py                     # starts its own 1-broker instance
    python3 python/bench.py --uri local:///...  # or uses yours (CANOPY_URI too)
    python3 python/bench.py --runs 3 --service

The instance it starts uses CANOPY_BIN, else $CARGO_TARGET_DIR (default
target) /release/canopy, else /debug/canopy.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # run from a checkout without installing

import canopy  # noqa: E402
import canopy.aio  # noqa: E402


Result = tuple[float, float]  # RPC/s, client CPU seconds per RPC


def sync_rate(uri: str, seconds: float, rank: int) -> Result:
    with canopy.connect(uri) as c:
        for _ in range(200):  # warm up
            c.rpc("broker.ping", b"", rank)
        n = 0
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        end = t0 + seconds
        while True:
            for _ in range(100):
                c.rpc("broker.ping", b"", rank)
            n += 100
            if time.perf_counter() >= end:
                break
        return n / (time.perf_counter() - t0), (time.process_time() - cpu0) / n


def async_rate(uri: str, seconds: float, rank: int, window: int, topic: str = "broker.ping") -> Result:
    async def main() -> Result:
        async with canopy.aio.connect(uri) as c:
            await asyncio.gather(*(c.rpc(topic, b"", rank) for _ in range(window * 4)))
            done = 0
            end = 0.0

            async def worker() -> None:
                nonlocal done
                rpc = c.rpc
                while time.perf_counter() < end:
                    await rpc(topic, b"", rank)
                    done += 1

            cpu0 = time.process_time()
            t0 = time.perf_counter()
            end = t0 + seconds
            await asyncio.gather(*(worker() for _ in range(window)))
            return done / (time.perf_counter() - t0), (time.process_time() - cpu0) / done

    return asyncio.run(main())


PROVIDER = """
import asyncio, sys
sys.path.insert(0, sys.argv[2])
import canopy.aio

async def main():
    async with canopy.aio.connect(sys.argv[1]) as c:
        await c.add_service("pybench", {"echo": "user"}, lambda req: req.payload)
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until stdin closes

asyncio.run(main())
"""


def start_provider(uri: str) -> subprocess.Popen[str]:
    """A Python (asyncio) provider of pybench.echo on the broker of ``uri``."""
    p = subprocess.Popen([sys.executable, "-c", PROVIDER, uri, str(HERE)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    if p.stdout.readline().strip() != "ready":
        p.kill()
        sys.exit("bench: the Python provider did not start (does this broker have service.add?)")
    return p


def start_instance() -> tuple[subprocess.Popen[bytes], str, str]:
    repo = HERE.parent
    target = repo / os.environ.get("CARGO_TARGET_DIR", "target")  # an absolute one replaces repo
    candidates = [os.environ.get("CANOPY_BIN"), target / "release/canopy", target / "debug/canopy"]
    binary = next((str(b) for b in candidates if b and os.access(b, os.X_OK)), None)
    if binary is None:
        sys.exit("bench: no canopy binary: build it (cargo build -p canopy-broker) or set CANOPY_BIN")
    tmp = tempfile.mkdtemp(prefix="canopy-pybench-")
    env = {k: v for k, v in os.environ.items() if k != "CANOPY_URI"}
    proc = subprocess.Popen(
        [binary, "start", "--size", "1", "--rundir", tmp],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    for line in proc.stdout:
        text = line.decode().strip()
        if text.startswith("export CANOPY_URI="):
            print(f"bench: started {binary} start --size 1", file=sys.stderr)
            return proc, text.split("=", 1)[1], tmp
        if time.monotonic() > deadline:
            break
    os.killpg(proc.pid, signal.SIGKILL)
    sys.exit("bench: canopy start printed no CANOPY_URI")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--uri", help="a broker (default: CANOPY_URI, else start one)")
    ap.add_argument("--rank", type=int, default=canopy.ANY, help="target rank (default: the local broker)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=2.0, help="length of each run")
    ap.add_argument("--service", action="store_true",
                    help="also measure calls to a service offered by a Python provider on the same broker")
    args = ap.parse_args()

    proc = tmp = None
    provider: subprocess.Popen[str] | None = None
    uri = args.uri or os.environ.get("CANOPY_URI")
    if not uri:
        proc, uri, tmp = start_instance()
    try:
        print(f"broker.ping, empty payload, {uri}, {args.runs} runs of {args.seconds} s, "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        scenarios: list[tuple[str, Callable[[], Result]]] = [
            ("sync, window 1", lambda: sync_rate(uri, args.seconds, args.rank)),
            ("asyncio, window 1", lambda: async_rate(uri, args.seconds, args.rank, 1)),
            ("asyncio, window 64", lambda: async_rate(uri, args.seconds, args.rank, 64)),
        ]
        if args.service:
            provider = start_provider(uri)
            scenarios += [
                ("py service, w 1", lambda: async_rate(uri, args.seconds, canopy.ANY, 1, "pybench.echo")),
                ("py service, w 64", lambda: async_rate(uri, args.seconds, canopy.ANY, 64, "pybench.echo")),
            ]
        for name, fn in scenarios:
            results = [fn() for _ in range(args.runs)]
            rates = [r for r, _ in results]
            cpu = statistics.median(c for _, c in results) * 1e6
            print(
                f"{name:20} median {statistics.median(rates):9,.0f} RPC/s   "
                f"client CPU {cpu:5.1f} µs/RPC   (runs: {', '.join(f'{r:,.0f}' for r in rates)})",
                flush=True,
            )
    finally:
        if provider is not None:
            assert provider.stdin is not None
            provider.stdin.close()
            try:
                provider.wait(10)
            except subprocess.TimeoutExpired:
                provider.kill()
                provider.wait(5)
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            assert tmp is not None
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
