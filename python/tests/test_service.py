"""Services offered by Python clients (docs/protocol.md section 6.1)
against a real 4-broker instance (fanout 2: 0 -> 1 -> 3, 0 -> 2)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pwd
import socket
import time
from typing import Any, Coroutine

import pytest

import canopy
import canopy.aio
from canopy.protocol import FLAG_NORESPONSE, FrameDecoder, MsgType, encode_request_frame
from conftest import Instance, Provider, in_thread


def me() -> str:
    return "unix:" + pwd.getpwuid(os.getuid()).pw_name


def run(coro: Coroutine[Any, Any, Any], limit: float = 40) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, limit)

    return asyncio.run(bounded())


# ----- sync -----


def test_register_and_call_from_another_client(instance: Instance) -> None:
    store: dict[str, str] = {}

    def get(req: canopy.Request) -> Any:
        key = req.text()
        if key not in store:
            raise canopy.ServiceError(canopy.ENOENT, f"no key {key!r}: put it first")
        return store[key]

    def put(req: canopy.Request) -> Any:
        kv = req.json()
        store[kv["key"]] = kv["value"]
        return {"stored": kv["key"], "by": req.principal}

    with Provider(canopy.connect(instance.local_uri(1)), "pykvs", {"get": "user", "put": "operator"},
                  {"get": get, "put": put}) as p, canopy.connect(instance.uri) as caller:
        assert p.service.rank == 1 and p.service.methods == {"get": "user", "put": "operator"}
        listed = caller.list_services(rank=1)
        assert listed["rank"] == 1
        entry = next(s for s in listed["services"] if s["namespace"] == "pykvs")
        assert entry["provider"] != "broker" and entry["methods"] == {"get": "user", "put": "operator"}
        assert entry["outstanding"] == 0
        assert any(s["provider"] == "broker" and s["namespace"] == "broker" for s in listed["services"])

        got = json.loads(caller.rpc("pykvs.put", json.dumps({"key": "a", "value": "1"}), rank=1))
        assert got == {"stored": "a", "by": me()}
        m = caller.request("pykvs.get", "a", rank=1)
        assert (m.payload, m.header.nodeid, m.header.errnum) == (b"1", 1, 0)
        req = p.seen[-1]
        assert (req.topic, req.namespace, req.method, req.payload) == ("pykvs.get", "pykvs", "get", b"a")
        assert req.userid == me() and req.nodeid == 1 and req.flags == 0 and req.token != 0
        assert "owner" in req.role_names and req.roles & canopy.Roles.OWNER
        # A method not declared: ENOSYS from the broker, the provider sees nothing.
        n = len(p.seen)
        with pytest.raises(canopy.CanopyError) as ei:
            caller.rpc("pykvs.delete", "a", rank=1)
        assert ei.value.errnum == canopy.ENOSYS
        assert len(p.seen) == n
    # Gone with its provider.
    with canopy.connect(instance.uri) as caller:
        with pytest.raises(canopy.CanopyError) as ei:
            caller.rpc("pykvs.get", "a", rank=1)
        assert ei.value.errnum == canopy.ENOSYS
        assert not any(s["namespace"] == "pykvs" for s in caller.list_services(rank=1)["services"])


def test_any_finds_the_nearest_provider_upstream(instance: Instance) -> None:
    with Provider(canopy.connect(instance.local_uri(1)), "pyup", {"where": "user"}, lambda r: b"rank 1"):
        with canopy.connect(instance.local_uri(3)) as c3, canopy.connect(instance.local_uri(2)) as c2:
            m = c3.request("pyup.where")  # ANY from rank 3: 3 -> 1
            assert (m.payload, m.header.nodeid) == (b"rank 1", 1)
            with pytest.raises(canopy.CanopyError) as ei:
                c2.rpc("pyup.where")  # ANY from rank 2: 2 -> 0, neither offers it
            assert ei.value.errnum == canopy.ENOSYS


def test_handler_errors_propagate_errnum_and_message(instance: Instance, caplog: pytest.LogCaptureFixture) -> None:
    def handler(req: canopy.Request) -> Any:
        if req.method == "refuse":
            raise canopy.ServiceError(canopy.EEXIST, "key 'a' exists: pick another key")
        if req.method == "fail":
            req.fail(75, "value too large for this store; store less")
            return None
        if req.method == "crash":
            raise ValueError("internal detail")
        if req.method == "json":
            return {"n": [1, 2]}
        return None

    caplog.set_level(logging.ERROR, logger="canopy")
    methods = {m: "user" for m in ("refuse", "fail", "crash", "json", "empty")}
    with Provider(canopy.connect(instance.local_uri(2)), "pyerr", methods, handler), canopy.connect(instance.uri) as c:
        with pytest.raises(canopy.CanopyError) as ei:
            c.rpc("pyerr.refuse", rank=2)
        e = ei.value
        assert (e.errnum, e.errname, e.message, e.topic, e.rank) == (
            canopy.EEXIST, "EEXIST", "key 'a' exists: pick another key", "pyerr.refuse", 2)
        with pytest.raises(canopy.CanopyError) as ei:
            c.rpc("pyerr.fail", rank=2)
        assert (ei.value.errnum, ei.value.message) == (75, "value too large for this store; store less")
        with pytest.raises(canopy.CanopyError) as ei:
            c.rpc("pyerr.crash", rank=2)
        assert ei.value.errnum == canopy.EIO
        assert "its handler raised ValueError; see the provider's log" in ei.value.message
        assert "internal detail" not in ei.value.message, "the caller does not see the provider's internals"
        assert "the handler of pyerr.crash raised ValueError" in caplog.text
        assert c.rpc("pyerr.json", rank=2) == b'{"n":[1,2]}'
        assert c.rpc("pyerr.empty", rank=2) == b""


def test_duplicate_registration_is_eexist(instance: Instance) -> None:
    with canopy.connect(instance.local_uri(3)) as a, canopy.connect(instance.local_uri(3)) as b, \
            canopy.connect(instance.local_uri(2)) as elsewhere:
        svc = a.add_service("pydup", {"m": "user"})
        with pytest.raises(canopy.CanopyError) as ei:
            b.add_service("pydup", {"other": "user"})
        assert (ei.value.errnum, ei.value.errname, ei.value.topic) == (canopy.EEXIST, "EEXIST", "service.add")
        assert ei.value.message, "the broker says why"
        assert "pydup" not in b.services, "a refused registration is forgotten"
        with pytest.raises(canopy.InvalidArgument, match="already offers 'pydup'; remove_service"):
            a.add_service("pydup", {"m": "user"})
        # Per rank: another broker may offer the same namespace.
        assert elsewhere.add_service("pydup", {"m": "user"}).rank == 2
        # A built-in namespace counts as offered by the broker.
        with pytest.raises(canopy.CanopyError) as ei:
            b.add_service("broker", {"ping": "user"})
        assert ei.value.errnum in (canopy.EEXIST, canopy.EPERM)
        assert svc.remove() == 0 and svc.removed
        assert b.add_service("pydup", {"m": "user"}).rank == 3, "free again once removed"
        with pytest.raises(canopy.CanopyError) as ei:
            a.remove_service("pydup")
        assert ei.value.errnum == canopy.ENOENT, "not ours to remove"


def test_sixteen_namespaces_per_connection(instance: Instance) -> None:
    with canopy.connect(instance.local_uri(1)) as c:
        for i in range(16):
            c.add_service(f"pymany{i}", {"m": "user"})
        with pytest.raises(canopy.CanopyError) as ei:
            c.add_service("pymany16", {"m": "user"})
        assert (ei.value.errnum, ei.value.topic) == (canopy.EAGAIN, "service.add")
        assert len(c.services) == 16
        c.remove_service("pymany0")
        c.add_service("pymany16", {"m": "user"})


@pytest.mark.parametrize("ns", ["broker", "overlay", "event", "acl", "key", "service", "instance",
                                "access", "connect", "exec", "cert", "receipt"])
def test_reserved_namespace_is_eperm(instance: Instance, ns: str) -> None:
    with canopy.connect(instance.uri) as c:
        with pytest.raises(canopy.PermissionDenied) as ei:
            c.add_service(ns, {"mine": "user"})
        assert (ei.value.errnum, ei.value.topic) == (canopy.EPERM, "service.add")
        assert ei.value.message


def test_malformed_service_add_is_clear(instance: Instance) -> None:
    with canopy.connect(instance.uri) as c:
        for body, errnum in (
            (b"not json", canopy.EPROTO),
            (b"[]", canopy.EPROTO),
            (b'{"namespace":"pybad"}', canopy.EPROTO),
            (b'{"namespace":"pybad","methods":{"m":"user"},"extra":1}', canopy.EPROTO),
            (b'{"namespace":"pybad","methods":{"m":7}}', canopy.EPROTO),
            (b'{"namespace":"PyBad","methods":{"m":"user"}}', canopy.EINVAL),
            (b'{"namespace":"pybad","methods":{"m":"root"}}', canopy.EINVAL),
            (b'{"namespace":"pybad","methods":{"a b":"user"}}', canopy.EINVAL),
            (b'{"namespace":"pybad","methods":{}}', canopy.EINVAL),
        ):
            with pytest.raises(canopy.CanopyError) as ei:
                c.rpc("service.add", body)
            e = ei.value
            assert (e.errnum, e.topic) == (errnum, "service.add"), (body, e)
            assert str(e).startswith(f"service.add failed on rank 0: {canopy.errname(errnum)}: ") and e.message
        # Sent to another broker: EINVAL.
        with pytest.raises(canopy.CanopyError) as ei:
            c.rpc("service.add", b'{"namespace":"pybad","methods":{"m":"user"}}', rank=1)
        assert ei.value.errnum == canopy.EINVAL
        # Through the API, bad names never reach the broker.
        with pytest.raises(canopy.InvalidArgument, match="bad role 'root' for method pybad.m"):
            c.add_service("pybad", {"m": "root"})
        assert c.rpc("broker.ping", b"still fine") == b"still fine"
        assert not any(s["namespace"] == "pybad" for s in c.list_services()["services"])


def test_provider_closing_mid_request_gives_enosys_within_a_second(instance: Instance) -> None:
    provider = canopy.connect(instance.local_uri(3))
    try:
        provider.add_service("pygone", {"slow": "user"})
        with canopy.connect(instance.uri) as caller:
            t, out = in_thread(lambda: caller.rpc("pygone.slow", b"x", rank=3, timeout=20))
            req = provider.next_request(timeout=10)
            assert req.topic == "pygone.slow"
            closed_at = time.monotonic()
            provider.close()
            t.join(10)
            assert "error" in out, out
            e = out["error"]
            assert isinstance(e, canopy.CanopyError) and e.errnum == canopy.ENOSYS, e
            assert out["at"] - closed_at < 1.0, f"answered {out['at'] - closed_at:.2f} s after the close"
            assert "went away" in e.message
            with pytest.raises(canopy.CanopyError) as ei:
                caller.rpc("pygone.slow", rank=3)
            assert ei.value.errnum == canopy.ENOSYS
    finally:
        provider.close()


def test_remove_answers_what_is_outstanding(instance: Instance) -> None:
    with canopy.connect(instance.local_uri(2)) as provider, canopy.connect(instance.uri) as caller:
        provider.add_service("pyrm", {"slow": "user"})
        t, out = in_thread(lambda: caller.rpc("pyrm.slow", rank=2, timeout=20))
        req = provider.next_request(timeout=10)
        assert caller is not None and req.method == "slow"
        entry = next(s for s in provider.list_services()["services"] if s["namespace"] == "pyrm")
        assert entry["outstanding"] == 1
        assert provider.remove_service("pyrm") == 1
        t.join(10)
        assert isinstance(out.get("error"), canopy.CanopyError) and out["error"].errnum == canopy.ENOSYS
        req.respond(b"too late")  # not sent: the broker already answered it
        assert provider.rpc("broker.ping", b"sync") == b"sync"


def test_stray_response_gives_a_service_error_warning(instance: Instance, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="canopy")
    with canopy.connect(instance.local_uri(1)) as p:
        p.add_service("pystray", {"m": "user"})
        # A token the broker never delivered, equal to the tag of our next
        # RPC: the service.error must not be taken for that RPC's answer.
        p.send_response(p._tag + 1, b"answer to nothing")
        assert p.rpc("broker.ping", b"mine") == b"mine"
        warnings = [r for r in caplog.records if r.name == "canopy" and r.levelno == logging.WARNING]
        assert len(warnings) == 1, caplog.text
        assert "dropped a response this client sent" in warnings[0].getMessage()
        assert f"token {p._tag}" in warnings[0].getMessage()


def _raw_request(sock: socket.socket, topic: str, tag: int, payload: bytes, rank: int, flags: int = 0) -> None:
    sock.sendall(encode_request_frame(topic.encode(), rank, tag, payload, flags))


def _raw_recv(sock: socket.socket, dec: FrameDecoder, timeout: float) -> Any:
    sock.settimeout(timeout)
    while (f := dec.next_frame()) is None:
        try:
            data = sock.recv(65536)
        except socket.timeout:
            return None
        if not data:
            return None
        dec.feed(data)
    return f


def test_noresponse_is_not_answered(instance: Instance, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="canopy")
    with canopy.connect(instance.local_uri(2)) as p, \
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
        p.add_service("pyquiet", {"tell": "user", "ask": "user"}, lambda r: "answer to " + r.method)
        raw.connect(instance.rundir + "/local-0")
        dec = FrameDecoder()
        _raw_request(raw, "pyquiet.tell", 7, b"fire and forget", 2, FLAG_NORESPONSE)
        req = p.handle(timeout=10)
        assert req.noresponse and req.flags & FLAG_NORESPONSE and req.answered
        # Had the library answered, the broker's service.error would come
        # back before this ping's response.
        assert p.rpc("broker.ping", b"sync") == b"sync"
        assert "dropped a response" not in caplog.text
        # The caller gets nothing for it; its next request is answered.
        assert _raw_recv(raw, dec, 0.5) is None
        _raw_request(raw, "pyquiet.ask", 8, b"", 2)
        assert p.handle(timeout=10).method == "ask"
        f = _raw_recv(raw, dec, 10)
        assert f is not None
        h, payload = f
        assert (h.type, h.matchtag, h.errnum, payload) == (MsgType.RESPONSE, 8, 0, b"answer to ask")
        # Client.notify sends NORESPONSE too.
        with canopy.connect(instance.uri) as c:
            c.notify("pyquiet.tell", b"again", rank=2)
            assert p.handle(timeout=10).noresponse
            assert c.rpc("broker.ping", b"x", rank=2) == b"x"


def test_requests_arriving_during_an_rpc_are_queued(instance: Instance) -> None:
    with canopy.connect(instance.local_uri(1)) as p, canopy.connect(instance.uri) as caller:
        p.add_service("pyq", {"m": "user"})
        for i in range(3):
            caller.notify("pyq.m", str(i), rank=1)
        # Rank 1 handles the caller's messages in order: once this ping is
        # answered, the three requests are on their way to p, ahead of
        # anything rank 1 sends p later.
        assert caller.rpc("broker.ping", b"after", rank=1) == b"after"
        sub = p.subscribe("pyq.events.*", timeout=10)
        with canopy.connect(instance.uri) as pub:
            pub.publish("pyq.events.a", b"ev")
        # They came while subscribe() waited for its answer.
        assert [p.next_request(timeout=0).payload for _ in range(3)] == [b"0", b"1", b"2"]
        # And an event that came while waiting for requests is kept too.
        t, out = in_thread(lambda: caller.rpc("pyq.m", b"last", rank=1, timeout=20))
        req = p.next_request(timeout=10)
        req.respond(b"done")
        t.join(10)
        assert out.get("result") == b"done", out
        assert sub.get(timeout=5).data == b"ev"


def test_serve_runs_until_stop(instance: Instance) -> None:
    with canopy.connect(instance.local_uri(3)) as p:
        calls: list[str] = []

        def handler(req: canopy.Request) -> bytes:
            calls.append(req.method)
            if req.method == "quit":
                p.stop()
            return b"ok " + req.method.encode()

        with canopy.connect(instance.uri) as caller:
            def calls_then_quit() -> list[bytes]:
                deadline = time.monotonic() + 10
                while True:  # until serve() has registered
                    try:
                        first = caller.rpc("pyserve.hello", rank=3)
                        break
                    except canopy.CanopyError as e:
                        if e.errnum != canopy.ENOSYS or time.monotonic() > deadline:
                            raise
                        time.sleep(0.05)
                return [first, caller.rpc("pyserve.quit", rank=3)]

            t, out = in_thread(calls_then_quit)
            p.serve("pyserve", {"hello": "user", "quit": "user"}, handler)
            t.join(10)
            assert out.get("result") == [b"ok hello", b"ok quit"], out
            assert "pyserve" not in p.services, "serve() removed what it added"
            with pytest.raises(canopy.CanopyError) as ei:
                caller.rpc("pyserve.hello", rank=3)
            assert ei.value.errnum == canopy.ENOSYS


# ----- asyncio -----


def test_async_serve_many_concurrent_callers(instance: Instance) -> None:
    async def main() -> None:
        active = 0
        peak = 0

        async def echo(req: canopy.Request) -> bytes:
            nonlocal active, peak
            active += 1
            peak = max(peak, active)
            await asyncio.sleep(0.2)
            active -= 1
            return req.payload

        async with canopy.aio.connect(instance.local_uri(3)) as p:
            server = asyncio.create_task(p.serve("pyaecho", {"echo": "user"}, echo))
            while "pyaecho" not in p.services or p.services["pyaecho"].rank is None:
                await asyncio.sleep(0.01)
            callers = [await canopy.aio.connect(instance.local_uri(r)) for r in (0, 1, 2, 3)]
            try:
                t0 = time.monotonic()
                got = await asyncio.gather(*(
                    callers[i % 4].rpc("pyaecho.echo", f"call {i}", rank=3, timeout=20) for i in range(200)
                ))
                elapsed = time.monotonic() - t0
            finally:
                for c in callers:
                    await c.close()
            assert got == [f"call {i}".encode() for i in range(200)]
            assert peak >= 50, f"at most {peak} handlers ran at once"
            assert elapsed < 10, f"200 calls of 0.2 s took {elapsed:.1f} s: not concurrent"
            server.cancel()
            with pytest.raises(asyncio.CancelledError):
                await server
            assert "pyaecho" not in p.services
            listed = await p.list_services()
            assert not any(s["namespace"] == "pyaecho" for s in listed["services"])

    run(main())


def test_async_errors_next_request_and_stray(instance: Instance, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="canopy")

    async def main() -> None:
        async def handler(req: canopy.Request) -> Any:
            if req.method == "refuse":
                raise canopy.ServiceError(canopy.ENOENT, "nothing here: put something first")
            # A handler may use its own client while serving.
            return await p.rpc("broker.ping", req.payload, rank=0)

        async with canopy.aio.connect(instance.local_uri(1)) as p, canopy.aio.connect(instance.uri) as c:
            await p.add_service("pyaerr", {"refuse": "user", "relay": "user"}, handler)
            with pytest.raises(canopy.CanopyError) as ei:
                await c.rpc("pyaerr.refuse", rank=1)
            assert (ei.value.errnum, ei.value.message) == (canopy.ENOENT, "nothing here: put something first")
            assert await c.rpc("pyaerr.relay", b"via 0", rank=1) == b"via 0"
            # Without a handler: next_request.
            async with await p.add_service("pyanext", {"m": "user"}) as svc:
                call = asyncio.create_task(c.rpc("pyanext.m", b"q", rank=1))
                req = await p.next_request(timeout=10)
                assert (req.topic, req.payload, req.principal) == ("pyanext.m", b"q", me())
                req.fail(canopy.EAGAIN, "busy: retry later")
                with pytest.raises(canopy.CanopyError) as ei:
                    await call
                assert (ei.value.errnum, ei.value.message) == (canopy.EAGAIN, "busy: retry later")
            assert svc.removed
            # service.error with our next tag as its matchtag.
            p.send_response(p._tag + 1, b"stray")
            assert await p.rpc("broker.ping", b"mine") == b"mine"
            assert "dropped a response this client sent" in caplog.text

    run(main())


def test_async_provider_closing_gives_enosys(instance: Instance) -> None:
    async def main() -> None:
        started = asyncio.Event()

        async def never(req: canopy.Request) -> bytes:
            started.set()
            await asyncio.sleep(60)
            return b"never"

        p = await canopy.aio.connect(instance.local_uri(2))
        async with canopy.aio.connect(instance.uri) as c:
            await p.add_service("pyaclose", {"m": "user"}, never)
            call = asyncio.create_task(c.rpc("pyaclose.m", rank=2, timeout=20))
            await asyncio.wait_for(started.wait(), 10)
            t0 = time.monotonic()
            await p.close()
            with pytest.raises(canopy.CanopyError) as ei:
                await call
            assert ei.value.errnum == canopy.ENOSYS
            assert time.monotonic() - t0 < 1.0

    run(main())
