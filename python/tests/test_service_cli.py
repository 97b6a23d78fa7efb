"""Across languages and ranks: a Python service on rank 3 called by the
Rust CLI (`canopy rpc`) and by Python on rank 0, and the example service's
demo run exactly as the README says."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

import canopy
import canopy.aio
from conftest import REPO, Instance, Provider, canopy_bin, in_thread


def cli(inst: Instance, *args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CANOPY_")}
    env["CANOPY_URI"] = inst.uri  # rank 0
    return subprocess.run([canopy_bin(), *args], capture_output=True, text=True, timeout=timeout, env=env,
                           check=False)


def handler(req: canopy.Request) -> Any:
    if req.method == "fail":
        raise canopy.ServiceError(canopy.ENOENT, f"no entry {req.text()!r}: create it first")
    return b"rank 3 echoes " + req.payload


def test_rust_cli_calls_a_python_service_on_rank_3(instance: Instance) -> None:
    probe = cli(instance, "rpc", "--help")
    if probe.returncode != 0:
        pytest.skip(f"this canopy has no `rpc` subcommand yet: {probe.stderr.strip()[:200]}")
    with Provider(canopy.connect(instance.local_uri(3)), "pycli", {"echo": "user", "fail": "user"}, handler) as p:
        r = cli(instance, "rpc", "-r", "3", "pycli.echo", "from rust")
        assert r.returncode == 0, r.stderr
        assert r.stdout.rstrip("\n") == "rank 3 echoes from rust"
        assert p.seen[-1].payload == b"from rust" and p.seen[-1].principal.startswith("unix:")
        r = cli(instance, "rpc", "-r", "3", "pycli.fail", "x")
        assert r.returncode != 0
        assert "no entry 'x': create it first" in r.stderr
        assert r.stdout == ""
        # No payload: an empty one.
        r = cli(instance, "rpc", "-r", "3", "pycli.echo")
        assert (r.returncode, r.stdout.rstrip("\n")) == (0, "rank 3 echoes "), r.stderr
    r = cli(instance, "rpc", "-r", "3", "pycli.echo", "gone")
    assert r.returncode != 0 and r.stderr, "ENOSYS once the provider is gone"


def test_python_calls_a_python_service_across_ranks(instance: Instance) -> None:
    with Provider(canopy.connect(instance.local_uri(3)), "pyx", {"echo": "user", "fail": "user"}, handler):
        with canopy.connect(instance.uri) as c:
            m = c.request("pyx.echo", b"from python", rank=3)
            assert (m.payload, m.header.nodeid) == (b"rank 3 echoes from python", 3)
            with pytest.raises(canopy.CanopyError) as ei:
                c.rpc("pyx.fail", "y", rank=3)
            assert (ei.value.errnum, ei.value.rank, ei.value.message) == (
                canopy.ENOENT, 3, "no entry 'y': create it first")

        async def main() -> list[bytes]:
            async with canopy.aio.connect(instance.uri) as ac:
                return await asyncio.gather(*(ac.rpc("pyx.echo", str(i), rank=3) for i in range(20)))

        got = asyncio.run(asyncio.wait_for(main(), 30))
        assert got == [f"rank 3 echoes {i}".encode() for i in range(20)]


def test_python_calls_a_rust_provider_on_rank_3(instance: Instance) -> None:
    """`canopy-t-peer hold-service` (Rust, canopy-proto) offers a namespace on
    rank 3 and never answers; Python on rank 0 calls it, the request reaches
    the Rust provider, and killing it answers the caller ENOSYS at once."""
    peer = os.path.join(os.path.dirname(canopy_bin()), "canopy-t-peer")
    if not os.access(peer, os.X_OK):
        pytest.skip(f"{peer} not built: cargo build -p canopy-t --bin canopy-t-peer")
    proc = subprocess.Popen([peer, "hold-service", instance.rundir + "/local-3", "rustsvc"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "registered"
        with canopy.connect(instance.uri) as c:
            listed = c.list_services(rank=3)["services"]
            assert any(s["namespace"] == "rustsvc" and s["methods"] == {"get": "user"} for s in listed), listed
            t, out = in_thread(lambda: c.rpc("rustsvc.get", b"k", rank=3, timeout=20))
            assert proc.stdout.readline().strip() == "request rustsvc.get"
            killed = time.monotonic()
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
            t.join(10)
            e = out.get("error")
            assert isinstance(e, canopy.CanopyError) and e.errnum == canopy.ENOSYS, out
            assert out["at"] - killed < 1.0 and "went away" in e.message
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def test_example_demo_runs_inside_canopy_start() -> None:
    """`canopy start --size 2 -- python3 examples/python-service/service.py --demo`
    (with this interpreter as python3)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CANOPY_")}
    env["RUST_LOG"] = "warn"
    proc = subprocess.Popen(
        [canopy_bin(), "start", "--size", "2", "--", sys.executable, "examples/python-service/service.py", "--demo"],
        cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=45)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=10)
        pytest.fail(f"the demo did not finish within 45 s\nstdout: {out}\nstderr: {err}")
    assert proc.returncode == 0, f"stdout: {out}\nstderr: {err}"
    assert "serving counter on rank 1" in out
    assert "counter.get('') on rank 1: 10" in out
    assert "error EINVAL: counter.add takes an integer, not 'lots'" in out
    assert out.rstrip().endswith("demo ok"), out


def test_example_serves_until_ctrl_c(instance: Instance) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CANOPY_")}
    env["CANOPY_URI"] = instance.local_uri(2)
    proc = subprocess.Popen(
        [sys.executable, "examples/python-service/service.py"], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # bounded by the test's hard timeout
        assert line.startswith("serving counter.{get,echo,add} on rank 2"), (line, proc.stderr.read() if proc.poll() is not None else "")
        with canopy.connect(instance.uri) as c:
            assert c.rpc("counter.add", b"5", rank=2) == b"5"
            assert c.rpc("counter.add", rank=2) == b"6"
            assert c.rpc("counter.get", rank=2) == b"6"
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=10)
            assert proc.returncode == 0, err
            assert "stopped serving counter" in out
            assert not any(s["namespace"] == "counter" for s in c.list_services(rank=2)["services"])
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
