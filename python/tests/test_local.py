"""The synchronous client against a real 4-broker instance."""

from __future__ import annotations

import json
import os
import pwd

import pytest

import canopy
from conftest import Instance


def me() -> str:
    return "unix:" + pwd.getpwuid(os.getuid()).pw_name


def test_ping_each_rank(instance: Instance) -> None:
    with canopy.connect(instance.uri) as c:
        for rank in range(instance.size):
            rtt = c.ping(rank, b"x" * rank)
            assert 0 < rtt < 5
            m = c.request("broker.ping", b"hello", rank=rank)
            assert m.header.nodeid == rank, "the response names the rank that produced it"
            assert m.payload == b"hello"
            assert m.header.type == canopy.MsgType.RESPONSE and m.header.errnum == 0
        # ANY: the nearest broker that offers broker.ping, i.e. rank 0 itself.
        assert c.request("broker.ping").header.nodeid == 0


def test_connect_uses_canopy_uri_and_any_rank(instance: Instance, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CANOPY_URI", instance.local_uri(3))
    with canopy.connect() as c:
        assert c.request("broker.ping", "text is sent as UTF-8").payload == b"text is sent as UTF-8"
        assert c.request("broker.ping").header.nodeid == 3
        status = json.loads(c.rpc("overlay.status", rank=0))
        assert status["size"] == 4 and status["health"] == "full", status


def test_unknown_topic_is_enosys(instance: Instance) -> None:
    with canopy.connect(instance.uri) as c:
        with pytest.raises(canopy.CanopyError) as ei:
            c.rpc("no.such.method")
        e = ei.value
        assert (e.errnum, e.errname, e.topic, e.rank) == (canopy.ENOSYS, "ENOSYS", "no.such.method", 0)
        assert "no service offers 'no.such.method'" in e.message
        assert str(e).startswith("no.such.method failed on rank 0: ENOSYS: ")
        # Addressed to a rank: that rank answers.
        with pytest.raises(canopy.CanopyError) as ei:
            c.rpc("no.such.method", rank=3)
        assert (ei.value.errnum, ei.value.rank) == (canopy.ENOSYS, 3)
        # The connection is still good afterwards.
        c.ping(3)


def test_bad_rank_is_ehostunreach(instance: Instance) -> None:
    with canopy.connect(instance.uri) as c:
        with pytest.raises(canopy.CanopyError) as ei:
            c.rpc("broker.ping", rank=99)
        e = ei.value
        assert (e.errnum, e.errname) == (canopy.EHOSTUNREACH, "EHOSTUNREACH")
        assert "rank 99 does not exist in this instance of size 4" in e.message
        with pytest.raises(canopy.InvalidArgument, match="rank must be an integer"):
            c.rpc("broker.ping", rank=-1)
        with pytest.raises(canopy.InvalidArgument, match="topic is 300 bytes, more than the limit of 255"):
            c.rpc("x" * 300)
        c.ping(1)


def test_bad_request_body_is_eproto_and_missing_topic_einval(instance: Instance) -> None:
    with canopy.connect(instance.uri) as c:
        with pytest.raises(canopy.CanopyError) as ei:
            c.rpc("event.pub", b"\x00", rank=0)
        assert ei.value.errname == "EPROTO" and "u16 topic length" in ei.value.message
        with pytest.raises(canopy.InvalidArgument, match="event topic must be 1 to 255 bytes"):
            c.publish("")


def test_publish_and_subscribe(instance: Instance) -> None:
    # Subscribe on rank 3 (two hops down), publish from rank 0.
    with canopy.connect(instance.local_uri(3)) as sub_c, canopy.connect(instance.uri) as pub_c:
        with sub_c.subscribe("pytest.sync.*", timeout=10) as sub, sub_c.subscribe("pytest.other") as other:
            seqs = [pub_c.publish("pytest.sync.n", str(i)) for i in range(5)]
            pub_c.publish("pytest.unrelated", b"not for us")
            seqs.append(pub_c.publish("pytest.other", b"other"))
            assert seqs == sorted(seqs) and len(set(seqs)) == 6
            got = [sub.get(timeout=10) for _ in range(5)]
            assert [e.data for e in got] == [str(i).encode() for i in range(5)]
            assert [e.seq for e in got] == seqs[:5]
            ev = got[0]
            assert (ev.topic, ev.sender) == ("pytest.sync.n", me())
            assert isinstance(ev, canopy.Event) and ev.epoch != 0
            assert other.get(timeout=10).data == b"other"
            with pytest.raises(canopy.Timeout, match="no event matching 'pytest.sync.\\*' within 0.2 s"):
                sub.get(timeout=0.2)
            # Events arriving while an RPC waits are kept for the subscription.
            pub_c.publish("pytest.sync.during", b"d")
            sub_c.ping(0)
            assert next(iter(sub)).topic == "pytest.sync.during"
        # Unsubscribed: nothing more arrives, and RPCs still work.
        pub_c.publish("pytest.sync.after", b"x")
        assert sub_c.rpc("broker.ping", b"ok") == b"ok"
        assert sub.closed and list(sub) == []


def test_cannot_connect_is_clear(tmp_path: os.PathLike[str]) -> None:
    missing = os.path.join(tmp_path, "local-0")
    with pytest.raises(canopy.ConnectError) as ei:
        canopy.connect(f"local://{missing}")
    assert ei.value.errname == "ENOENT"
    assert "is the instance running? (check CANOPY_URI)" in ei.value.message


def test_closed_client_says_so(instance: Instance) -> None:
    c = canopy.connect(instance.uri)
    c.close()
    with pytest.raises(canopy.Disconnected, match="is closed; connect again"):
        c.ping(0)


def test_large_payloads(instance: Instance) -> None:
    big = os.urandom(3 << 20)
    with canopy.connect(instance.uri) as c:
        assert c.rpc("broker.ping", big, rank=3) == big
        with pytest.raises(canopy.InvalidArgument, match="more than the limit of 67108864"):
            c.rpc("broker.ping", bytes((64 << 20) + 1))
        c.ping(3, b"still fine")


def test_instance_ending_is_reported_not_hung() -> None:
    import asyncio
    import threading
    import time

    import canopy.aio

    inst = Instance(2)
    try:
        c = canopy.connect(inst.local_uri(1))
        sub = c.subscribe("pytest.end.*")

        async def waiter() -> BaseException | None:
            async with canopy.aio.connect(inst.uri) as ac:
                asub = await ac.subscribe("pytest.end.*")
                threading.Timer(0.5, inst.stop).start()
                try:
                    await asub.get(timeout=20)
                except canopy.CanopyError as e:
                    return e
                return None

        t0 = time.monotonic()
        err = asyncio.run(waiter())
        assert isinstance(err, canopy.Disconnected), err
        assert "closed the connection; the instance may have shut down" in err.message
        with pytest.raises(canopy.Disconnected):
            sub.get(timeout=20)
        assert time.monotonic() - t0 < 10
        with pytest.raises(canopy.Disconnected):
            c.ping(0)
    finally:
        inst.stop()
