"""Fake brokers that send bad bytes: the client raises a clear error at
once, never hangs."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading
import time
from typing import Callable

import pytest

import canopy
import canopy.aio
from conftest import write_secret_cert
from canopy.protocol import FrameDecoder, Header, MsgType, encode_frame


def prefix(hlen: int, plen: int) -> bytes:
    return struct.pack(">II", hlen, plen)


def good_response(req: Header, payload: bytes = b"") -> bytes:
    h = Header(MsgType.RESPONSE, matchtag=req.matchtag, nodeid=0, topic=req.topic)
    return encode_frame(h, payload)


# What the fake broker answers to the first request: bytes, and whether it
# then closes (True) or keeps the connection open in silence (False).
SCRIPTS: dict[str, tuple[Callable[[Header], bytes], bool, type[canopy.CanopyError], str]] = {
    "bad magic": (
        lambda r: prefix(40, 0) + b"\xab" * 40,
        False, canopy.ProtocolError, "malformed frame: bad magic byte 0xab",
    ),
    "oversized header": (
        lambda r: prefix(1 << 20, 0),
        False, canopy.ProtocolError, "frame header length 1048576 exceeds 8192",
    ),
    "oversized payload": (
        lambda r: prefix(33, 0xFFFFFFFF),
        False, canopy.ProtocolError, "payload length 4294967295 exceeds",
    ),
    "short header": (
        lambda r: prefix(5, 0) + b"\xca\x01\x02\x00\x00",
        False, canopy.ProtocolError, "message too short: 5 bytes, need at least 33",
    ),
    "lying length fields": (
        lambda r: (lambda hb: prefix(len(hb) + 3, 0) + hb + b"xyz")(
            Header(MsgType.RESPONSE, matchtag=r.matchtag, topic="a").encode()
        ),
        False, canopy.ProtocolError, "header length fields claim 34 bytes but the frame has 37",
    ),
    "version 2": (
        lambda r: (lambda f: f[:9] + b"\x02" + f[10:])(good_response(r)),
        False, canopy.ProtocolError, "unsupported protocol version 2",
    ),
    "closed mid-frame": (
        lambda r: good_response(r, b"0123456789")[:-4],
        True, canopy.Disconnected, "closed the connection in the middle of a frame",
    ),
    "closed": (lambda r: b"", True, canopy.Disconnected, "closed the connection; the instance may have shut down"),
    "revoked": (
        lambda r: encode_frame(
            Header(MsgType.RESPONSE, matchtag=0, errnum=1, topic="access.revoked"),
            b"permission denied: access revoked: no rule matches",
        ),
        True, canopy.PermissionDenied, "revoked this connection's access: permission denied: access revoked",
    ),
    "busy": (
        lambda r: encode_frame(
            Header(MsgType.RESPONSE, matchtag=0, errnum=11, topic="connect"),
            b"too many connections are waiting for an access decision; retry in a moment",
        ),
        True, canopy.CanopyError, "refused this connection: too many connections are waiting",
    ),
    "refusal": (
        lambda r: encode_frame(
            Header(MsgType.RESPONSE, matchtag=0, errnum=1, topic="connect"), b"permission denied: unix:eve (uid 1001): no rule"
        ),
        True, canopy.PermissionDenied, "refused this connection: permission denied: unix:eve",
    ),
}


class FakeBroker:
    """A UNIX-socket server that answers one connection's first request
    with scripted bytes."""

    def __init__(self, path: str, script: Callable[[Header], bytes], close: bool) -> None:
        self.path = path
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(path)
        self.srv.listen(1)
        self.script = script
        self.close = close
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.srv.settimeout(10)
        try:
            conn, _ = self.srv.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            dec = FrameDecoder()
            f = None
            while f is None:
                data = conn.recv(65536)
                if not data:
                    return
                dec.feed(data)
                f = dec.next_frame()
            conn.sendall(self.script(f[0]))
            if not self.close:
                self.stop.wait(10)

    def shutdown(self) -> None:
        self.stop.set()
        self.srv.close()
        self.thread.join(5)


@pytest.mark.parametrize("case", list(SCRIPTS))
def test_sync_client_raises_clearly(case: str, tmp_path: os.PathLike[str]) -> None:
    script, close, exc, text = SCRIPTS[case]
    fake = FakeBroker(os.path.join(tmp_path, "sock"), script, close)
    try:
        c = canopy.connect(fake.path)
        t0 = time.monotonic()
        with pytest.raises(exc) as ei:
            c.rpc("broker.ping", timeout=20)
        assert time.monotonic() - t0 < 5, "an error, not a wait for the timeout"
        assert text in ei.value.message, ei.value.message
        if case == "busy":
            assert ei.value.errname == "EAGAIN" and not isinstance(ei.value, canopy.PermissionDenied)
        # The connection is dead; it says so again rather than hanging.
        with pytest.raises(canopy.CanopyError):
            c.rpc("broker.ping", timeout=20)
        c.close()
    finally:
        fake.shutdown()


@pytest.mark.parametrize("case", list(SCRIPTS))
def test_async_client_raises_clearly(case: str, tmp_path: os.PathLike[str]) -> None:
    script, close, exc, text = SCRIPTS[case]
    fake = FakeBroker(os.path.join(tmp_path, "sock"), script, close)

    async def main() -> None:
        c = await canopy.aio.connect(fake.path)
        sub = c.subscribe("x.*")  # not started: the fake answers only one request
        t0 = time.monotonic()
        with pytest.raises(exc) as ei:
            await c.rpc("broker.ping", timeout=20)
        assert time.monotonic() - t0 < 5
        assert text in ei.value.message, ei.value.message
        with pytest.raises(canopy.CanopyError):
            await c.rpc("broker.ping", timeout=20)
        with pytest.raises(canopy.CanopyError):
            await sub.start()
        await c.close()

    try:
        asyncio.run(asyncio.wait_for(main(), 30))
    finally:
        fake.shutdown()


def test_silent_broker_times_out(tmp_path: os.PathLike[str]) -> None:
    fake = FakeBroker(os.path.join(tmp_path, "sock"), lambda r: b"", False)
    try:
        with canopy.connect(fake.path) as c:
            with pytest.raises(canopy.Timeout) as ei:
                c.rpc("broker.ping", rank=2, timeout=0.3)
            assert ei.value.errname == "ETIMEDOUT"
            assert str(ei.value) == (
                "broker.ping failed: ETIMEDOUT: no response from rank 2 within 0.3 s; "
                "the target may be down or overloaded"
            )
    finally:
        fake.shutdown()

    fake = FakeBroker(os.path.join(tmp_path, "sock2"), lambda r: b"", False)

    async def main() -> None:
        async with canopy.aio.connect(fake.path) as c:
            with pytest.raises(canopy.Timeout, match="no response within 0.3 s"):
                await c.rpc("broker.ping", timeout=0.3)
            assert not c._pending
            # Timeouts of a second or more share timers; still on time.
            t0 = time.monotonic()
            res = await asyncio.gather(
                *(c.rpc("broker.ping", rank=r, timeout=1.2) for r in range(3)), return_exceptions=True
            )
            took = time.monotonic() - t0
            assert all(isinstance(e, canopy.Timeout) for e in res), res
            assert "no response from rank 2 within 1.2 s" in str(res[2])
            assert 1.2 <= took < 3.0, took
            assert not c._pending and not c._buckets

    try:
        asyncio.run(asyncio.wait_for(main(), 30))
    finally:
        fake.shutdown()


def test_late_and_unknown_responses_are_ignored(tmp_path: os.PathLike[str]) -> None:
    # A response with a matchtag nobody waits for, then the right one.
    def script(r: Header) -> bytes:
        stray = Header(MsgType.RESPONSE, matchtag=r.matchtag + 1000, topic="x")
        return encode_frame(stray, b"stray") + good_response(r, b"mine")

    fake = FakeBroker(os.path.join(tmp_path, "sock"), script, False)
    try:
        with canopy.connect(fake.path) as c:
            assert c.rpc("broker.ping", timeout=5) == b"mine"
    finally:
        fake.shutdown()


def _zmq_fake(reply: Callable[[list[bytes]], list[bytes]]) -> tuple[str, str, threading.Event, threading.Thread]:
    """A CURVE ROUTER with no ZAP handler (so any client key is accepted)
    that answers each request with reply(frames)."""
    import zmq

    pub, sec = zmq.curve_keypair()
    ctx = zmq.Context.instance()
    srv = ctx.socket(zmq.ROUTER)
    srv.linger = 0
    srv.curve_server = True
    srv.curve_secretkey = sec
    srv.curve_publickey = pub
    port = srv.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()

    def serve() -> None:
        try:
            while not stop.is_set():
                if srv.poll(100):
                    rid, *frames = srv.recv_multipart()
                    srv.send_multipart([rid, *reply(frames)])
        finally:
            srv.close(0)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return f"tcp://127.0.0.1:{port}", pub.decode(), stop, t


@pytest.mark.parametrize(
    "reply,text",
    [
        (lambda f: [b"\x00" * 40, b""], "malformed header: bad magic byte 0x00"),
        (lambda f: [f[0], b"", b"extra"], "a message of 3 frames where 2 (header, payload) were expected"),
    ],
    ids=["bad header", "three frames"],
)
def test_remote_bad_bytes_raise_clearly(
    reply: Callable[[list[bytes]], list[bytes]], text: str, tmp_path: os.PathLike[str]
) -> None:
    endpoint, server_pub, stop, t = _zmq_fake(reply)
    key = os.path.join(tmp_path, "me")
    write_secret_cert(key)
    try:
        c = canopy.connect(endpoint, key=key, server_key=server_pub)
        with pytest.raises(canopy.ProtocolError) as ei:
            c.rpc("broker.ping", timeout=10)
        assert text in ei.value.message
        c.close()

        async def main() -> None:
            async with canopy.aio.connect(endpoint, key=key, server_key=server_pub) as ac:
                with pytest.raises(canopy.ProtocolError) as ei:
                    await ac.rpc("broker.ping", timeout=10)
                assert text in ei.value.message

        asyncio.run(asyncio.wait_for(main(), 20))
    finally:
        stop.set()
        t.join(5)
