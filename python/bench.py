#!/usr/bin/env python3
"""The Python client's local RPC rate: `broker.ping` with an empty payload,
at window 1 (the synchronous client) and window 64 (asyncio), median of
5 runs.

    python3 python/bench.py                     # starts its own 1-broker instance
    python3 python/bench.py --uri local:///...  # or uses yours (CANOPY_URI too)

The instance it starts uses CANOPY_BIN, else target/release/canopy, else
target/debug/canopy.
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


def async_rate(uri: str, seconds: float, rank: int, window: int) -> Result:
    async def main() -> Result:
        async with canopy.aio.connect(uri) as c:
            await asyncio.gather(*(c.rpc("broker.ping", b"", rank) for _ in range(window * 4)))
            done = 0
            end = 0.0

            async def worker() -> None:
                nonlocal done
                rpc = c.rpc
                while time.perf_counter() < end:
                    await rpc("broker.ping", b"", rank)
                    done += 1

            cpu0 = time.process_time()
            t0 = time.perf_counter()
            end = t0 + seconds
            await asyncio.gather(*(worker() for _ in range(window)))
            return done / (time.perf_counter() - t0), (time.process_time() - cpu0) / done

    return asyncio.run(main())


def start_instance() -> tuple[subprocess.Popen[bytes], str, str]:
    repo = HERE.parent
    candidates = [os.environ.get("CANOPY_BIN"), repo / "target/release/canopy", repo / "target/debug/canopy"]
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
    args = ap.parse_args()

    proc = tmp = None
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
