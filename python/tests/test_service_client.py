"""The client side of services (docs/protocol.md section 6.1) against a
scripted fake broker: what a client must do whatever the broker does.

The fake answers the client's RPC with, in one write: a request delivered
for a namespace the client offers, a ``service.error`` whose matchtag is
the RPC's own tag, then the RPC's real response. The client must return the
real response, warn about the ``service.error``, and keep the request for
``next_request``; its answer must carry the broker's token.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading

import pytest

import canopy
import canopy.aio
from canopy.protocol import FrameDecoder, Header, MsgType, encode_frame

TOKEN = 0x0BADCAFE


class ScriptedBroker:
    """Serves one connection: for each request it reads, calls
    ``script(header, payload)`` and writes the bytes it returns; records
    every frame the client sent."""

    def __init__(self, path: str, script) -> None:  # type: ignore[no-untyped-def]
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(path)
        self.srv.listen(1)
        self.srv.settimeout(10)
        self.script = script
        self.got: list[tuple[Header, bytes]] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.srv.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            dec = FrameDecoder()
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                dec.feed(data)
                while (f := dec.next_frame()) is not None:
                    self.got.append(f)
                    out = self.script(*f)
                    if out:
                        conn.sendall(out)

    def shutdown(self) -> None:
        self.srv.close()
        self.thread.join(5)


def script(h: Header, p: bytes) -> bytes:
    if h.type != MsgType.REQUEST:
        return b""
    if h.topic == "service.add":
        return encode_frame(Header(MsgType.RESPONSE, matchtag=h.matchtag, topic=h.topic), b'{"namespace":"fake","rank":0}')
    delivered = Header(MsgType.REQUEST, matchtag=TOKEN, nodeid=0, roles=canopy.Roles.USER,
                       topic="fake.get", userid="curve:someone")
    stray = Header(MsgType.RESPONSE, matchtag=h.matchtag, errnum=canopy.ENOENT, topic="service.error")
    real = Header(MsgType.RESPONSE, matchtag=h.matchtag, nodeid=0, topic=h.topic)
    return (encode_frame(delivered, b"the key")
            + encode_frame(stray, b"no unanswered delivery with token")
            + encode_frame(real, b"pong:" + p))


@pytest.fixture
def fake(tmp_path: os.PathLike[str]):  # type: ignore[no-untyped-def]
    path = os.path.join(tmp_path, "local-0")
    b = ScriptedBroker(path, script)
    yield path, b
    b.shutdown()


def _check_answer(b: ScriptedBroker) -> None:
    for _ in range(100):
        if any(h.type == MsgType.RESPONSE for h, _ in b.got):
            break
        threading.Event().wait(0.05)
    answers = [(h, p) for h, p in b.got if h.type == MsgType.RESPONSE]
    assert len(answers) == 1, b.got
    h, p = answers[0]
    assert (h.matchtag, h.errnum, p) == (TOKEN, 0, b"value of the key")


def test_sync_queues_requests_and_checks_service_error_first(fake, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    path, b = fake
    caplog.set_level(logging.WARNING, logger="canopy")
    with canopy.connect(path) as c:
        svc = c.add_service("fake", {"get": "user"})
        assert svc.rank == 0 and "fake" in c.services
        # The service.error carries this RPC's own tag: matching it would
        # fail the RPC with ENOENT.
        assert c.rpc("broker.ping", b"x") == b"pong:x"
        assert "dropped a response this client sent" in caplog.text
        req = c.next_request(timeout=0)  # queued during the RPC: no wait
        assert (req.topic, req.namespace, req.method, req.payload) == ("fake.get", "fake", "get", b"the key")
        assert (req.principal, req.role_names, req.token, req.noresponse) == ("curve:someone", ["user"], TOKEN, False)
        req.respond(b"value of " + req.payload)
        with pytest.raises(canopy.InvalidArgument, match="already answered"):
            req.respond(b"again")
        _check_answer(b)
        with pytest.raises(canopy.Timeout, match="no request within"):
            c.next_request(timeout=0.1)


def test_async_queues_requests_and_checks_service_error_first(fake, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    path, b = fake
    caplog.set_level(logging.WARNING, logger="canopy")

    async def main() -> None:
        async with canopy.aio.connect(path) as c:
            await c.add_service("fake", {"get": "user"})
            assert await c.rpc("broker.ping", b"y") == b"pong:y"
            assert "dropped a response this client sent" in caplog.text
            req = await c.next_request(timeout=1)
            assert (req.topic, req.principal, req.token) == ("fake.get", "curve:someone", TOKEN)
            req.respond(b"value of " + req.payload)
            await asyncio.sleep(0.05)  # the write is batched to the end of the loop turn
            await asyncio.get_running_loop().run_in_executor(None, _check_answer, b)

    asyncio.run(asyncio.wait_for(main(), 20))


def test_async_handler_answers_in_a_task(fake) -> None:  # type: ignore[no-untyped-def]
    path, b = fake

    async def handler(req: canopy.Request) -> bytes:
        await asyncio.sleep(0)
        return b"value of " + req.payload

    async def main() -> None:
        async with canopy.aio.connect(path) as c:
            await c.add_service("fake", {"get": "user"}, handler)
            await c.rpc("broker.ping")
            await asyncio.get_running_loop().run_in_executor(None, _check_answer, b)

    asyncio.run(asyncio.wait_for(main(), 20))


def test_names_are_checked_before_sending(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "local-0")
    b = ScriptedBroker(path, script)
    try:
        with canopy.connect(path) as c:
            for ns, methods, match in (
                ("Kvs", {"get": "user"}, "bad service namespace 'Kvs'"),
                ("9kvs", {"get": "user"}, "starting with a letter"),
                ("k" * 65, {"get": "user"}, "1 to 64 characters"),
                ("kvs", {}, "needs methods"),
                ("kvs", {"get it": "user"}, "bad method name 'get it'"),
                ("kvs", {"get": "root"}, "bad role 'root' for method kvs.get: use one of 'user', 'operator'"),
                ("kvs", {f"m{i}": "user" for i in range(257)}, "more than the 256 allowed"),
            ):
                with pytest.raises(canopy.InvalidArgument, match=match) as ei:
                    c.add_service(ns, methods)
                assert ei.value.errnum == canopy.EINVAL
            with pytest.raises(canopy.InvalidArgument, match="no handler for kvs.put"):
                c.add_service("kvs", {"get": "user", "put": "user"}, {"get": lambda r: b""})
            with pytest.raises(TypeError, match="non-zero errno"):
                canopy.ServiceError(0, "no")
        assert b.got == [], "nothing was sent"
    finally:
        b.shutdown()


def test_results_encode() -> None:
    from canopy.service import encode_result

    assert encode_result(None, "t") == b""
    assert encode_result("é", "t") == "é".encode()
    assert encode_result({"a": [1, 2]}, "t") == b'{"a":[1,2]}'
    with pytest.raises(canopy.InvalidArgument, match="not bytes, str, None or JSON-serializable"):
        encode_result(object(), "t")
    e = canopy.ServiceError(canopy.ENOENT, "no key 'x': put it first")
    assert (e.errnum, e.errname, e.message) == (2, "ENOENT", "no key 'x': put it first")
    import pickle

    e2 = pickle.loads(pickle.dumps(e))
    assert (type(e2), e2.errnum, e2.message) == (canopy.ServiceError, 2, e.message)
