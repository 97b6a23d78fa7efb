"""Fixtures: real `canopy start` instances, and a hard per-test time limit.

The canopy binary is `CANOPY_BIN`, default `$CARGO_TARGET_DIR/debug/canopy`
(`<repo>/target/debug/canopy`; build it with `cargo build -p canopy-broker`).
"""

from __future__ import annotations

import os
import selectors
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

import canopy

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 30.0
TEST_TIMEOUT = float(os.environ.get("CANOPY_PY_TEST_TIMEOUT", "60"))


def canopy_bin() -> str:
    target = REPO / os.environ.get("CARGO_TARGET_DIR", "target")  # an absolute one replaces REPO
    b = os.environ.get("CANOPY_BIN") or str(target / "debug" / "canopy")
    if not os.access(b, os.X_OK):
        pytest.fail(
            f"canopy binary {b} not found: build it with `cargo build -p canopy-broker`, "
            "or set CANOPY_BIN to its path",
            pytrace=False,
        )
    return b


def run_canopy(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CANOPY_") or k == "CANOPY_BIN"}
    return subprocess.run(
        [canopy_bin(), *args], capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _children(pid: int) -> list[int]:
    kids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may contain spaces, so split after ')'.
        rest = stat.rsplit(")", 1)[-1].split()
        if len(rest) > 1 and rest[1] == str(pid):
            kids.append(int(d))
    return kids


class Instance:
    """`canopy start --size N ...` without a command: up until stop()."""

    def __init__(self, size: int, extra: tuple[str, ...] = (), env: dict[str, str] | None = None) -> None:
        self.size = size
        self.tmp = tempfile.mkdtemp(prefix="canopy-py-")
        self.stderr_path = os.path.join(self.tmp, "start.stderr")
        e = {k: v for k, v in os.environ.items() if not k.startswith("CANOPY_") or k == "CANOPY_BIN"}
        e["RUST_LOG"] = "warn"
        e.update(env or {})
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [canopy_bin(), "start", "--size", str(size), "--rundir", self.tmp, *extra],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                env=e,
                start_new_session=True,  # its own process group, killed at the end
            )
        self.brokers: list[int] = []
        self.exports: dict[str, str] = {}
        self.stdout = ""
        try:
            self._wait_for_uri()
        except BaseException:
            self.stop()
            raise
        self.uri = self.exports["CANOPY_URI"]
        assert self.uri.startswith("local://") and self.uri.endswith("/local-0"), self.uri
        self.rundir = os.path.dirname(self.uri[len("local://") :])
        self.brokers = _children(self.proc.pid)
        # Keep draining stdout so `start` never blocks on a full pipe.
        threading.Thread(target=self._drain, daemon=True).start()

    def _wait_for_uri(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        sel = selectors.DefaultSelector()
        sel.register(fd, selectors.EVENT_READ)
        deadline = time.monotonic() + START_TIMEOUT
        buf = b""
        try:
            while "CANOPY_URI" not in self.exports:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(
                        f"canopy start printed no CANOPY_URI within {START_TIMEOUT} s\n"
                        f"stdout: {buf.decode(errors='replace')}\nstderr: {self.stderr()}"
                    )
                if not sel.select(left):
                    continue
                chunk = os.read(fd, 4096)
                if not chunk:
                    self.proc.wait(5)
                    raise RuntimeError(
                        f"canopy start exited ({self.proc.returncode}) before the instance came up\n"
                        f"stderr: {self.stderr()}"
                    )
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    text = line.decode(errors="replace")
                    self.stdout += text + "\n"
                    if text.startswith("export ") and "=" in text:
                        k, v = text[len("export ") :].split("=", 1)
                        self.exports[k] = v
            # The kex lines (gssapi) follow the URI in the same write.
        finally:
            sel.close()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        try:
            for _ in iter(lambda: self.proc.stdout.read(4096), b""):  # type: ignore[union-attr]
                pass
        except (OSError, ValueError):
            pass

    def local_uri(self, rank: int) -> str:
        return f"local://{self.rundir}/local-{rank}"

    def stderr(self) -> str:
        try:
            with open(self.stderr_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM to `start`'s process group, SIGKILL after 5 s, then any
        broker still alive; the temp dir goes."""
        pgid = self.proc.pid
        brokers = self.brokers or _children(pgid)
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(5)
        deadline = time.monotonic() + 3
        for pid in brokers:
            # Brokers have their own process groups; they exit when start
            # does. Make sure, without touching a recycled pid.
            while time.monotonic() < deadline and _is_ours(pid, self.tmp):
                time.sleep(0.05)
            if _is_ours(pid, self.tmp):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _is_ours(pid: int, marker: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return marker.encode() in f.read()
    except OSError:
        return False


@pytest.fixture(scope="session")
def instance() -> Iterator[Instance]:
    """A 4-broker instance (fanout 2: 0 -> 1 -> 3, 0 -> 2), shared by the session."""
    inst = Instance(4)
    try:
        yield inst
    finally:
        inst.stop()


class _TestTimedOut(BaseException):
    pass


@pytest.fixture(autouse=True)
def _hard_timeout(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that runs longer than TEST_TIMEOUT instead of hanging."""

    def expired(signum: int, frame: object) -> None:
        # Again in 5 s, in case code under test swallowed this one.
        signal.setitimer(signal.ITIMER_REAL, 5)
        raise _TestTimedOut(f"{request.node.nodeid} still running after {TEST_TIMEOUT} s: hung?")

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, TEST_TIMEOUT)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def write_secret_cert(path: str, name: str = "test") -> str:
    """A fresh secret certificate (mode 0600) in the ZPL format; returns
    its public key."""
    import zmq

    pub, sec = zmq.curve_keypair()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(
            "#   ZeroMQ CURVE **Secret** Certificate\n"
            "#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.\n\n"
            f'metadata\n    name = "{name}"\ncurve\n'
            f'    public-key = "{pub.decode()}"\n    secret-key = "{sec.decode()}"\n'
        )
    return pub.decode()


class Provider:
    """A sync client (canopy.Client) offering a namespace, handling requests
    in a thread until close(), which closes the client too."""

    def __init__(self, client: Any, namespace: str, methods: dict[str, str], handler: Any) -> None:
        self.client = client
        self.seen: list[canopy.Request] = []
        self.error: BaseException | None = None

        def record(req: canopy.Request) -> Any:
            self.seen.append(req)
            h = canopy.service.pick_handler(handler, req.method)
            return h(req)

        try:
            self.service = self.client.add_service(namespace, methods, record)
        except BaseException:
            self.client.close()
            raise
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.client.handle(timeout=0.05)
            except canopy.Timeout:
                pass
            except BaseException as e:  # noqa: BLE001 - reported by close()
                self.error = e
                return

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        assert not self.thread.is_alive(), "the provider thread did not stop"
        self.client.close()
        if self.error is not None:
            raise self.error

    def __enter__(self) -> Provider:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Run fn in a daemon thread; its result or exception lands in the dict
    with the time it finished."""
    out: dict[str, Any] = {}

    def body() -> None:
        try:
            out["result"] = fn()
        except BaseException as e:  # noqa: BLE001
            out["error"] = e
        out["at"] = time.monotonic()

    t = threading.Thread(target=body, daemon=True)
    t.start()
    return t, out
