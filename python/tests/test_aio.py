"""The asyncio client against a real 4-broker instance."""

from __future__ import annotations

import asyncio
from typing import Any, Coroutine

import pytest

import canopy
import canopy.aio
from conftest import Instance


def run(coro: Coroutine[Any, Any, Any], limit: float = 30) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, limit)

    return asyncio.run(bounded())


def test_ping_each_rank_concurrently(instance: Instance) -> None:
    async def main() -> None:
        async with canopy.aio.connect(instance.uri) as c:
            rtts = await asyncio.gather(*(c.ping(r) for r in range(instance.size)))
            assert all(0 < t < 5 for t in rtts)
            ms = await asyncio.gather(*(c.request("broker.ping", rank=r) for r in range(instance.size)))
            assert [m.header.nodeid for m in ms] == list(range(instance.size))

    run(main())


def test_64_concurrent_rpcs_are_matched_by_matchtag(instance: Instance) -> None:
    async def main() -> None:
        c = await canopy.aio.connect(instance.uri)
        try:
            payloads = [f"request {i}".encode() * (i % 7 + 1) for i in range(64)]
            tasks = [
                asyncio.create_task(c.request("broker.ping", p, rank=i % instance.size))
                for i, p in enumerate(payloads)
            ]
            await asyncio.sleep(0)  # every task has sent; no response read yet
            assert len(c._pending) == 64, "all 64 requests are in flight at once"
            ms = await asyncio.gather(*tasks)
            assert [m.payload for m in ms] == payloads
            assert [m.header.nodeid for m in ms] == [i % instance.size for i in range(64)]
            assert len({m.header.matchtag for m in ms}) == 64
            assert not c._pending
            # Again, many times over, mixed with errors that must not disturb the rest.
            for _ in range(5):
                res = await asyncio.gather(
                    *(c.rpc("broker.ping", str(i), rank=i % 4) for i in range(60)),
                    c.rpc("no.such.method"),
                    c.rpc("broker.ping", rank=99),
                    c.rpc("broker.ping", b"last", rank=3),
                    c.rpc("no.such.method", rank=2),
                    return_exceptions=True,
                )
                assert res[:60] == [str(i).encode() for i in range(60)]
                assert isinstance(res[60], canopy.CanopyError) and res[60].errname == "ENOSYS"
                assert isinstance(res[61], canopy.CanopyError) and res[61].errname == "EHOSTUNREACH"
                assert res[62] == b"last"
                assert isinstance(res[63], canopy.CanopyError) and (res[63].errname, res[63].rank) == ("ENOSYS", 2)
        finally:
            await c.close()

    run(main())


def test_error_mapping(instance: Instance) -> None:
    async def main() -> None:
        async with canopy.aio.connect(instance.local_uri(2)) as c:
            with pytest.raises(canopy.CanopyError) as ei:
                await c.rpc("no.such.method", rank=0)
            assert (ei.value.errnum, ei.value.rank) == (canopy.ENOSYS, 0)
            with pytest.raises(canopy.CanopyError) as ei:
                await c.rpc("broker.ping", rank=1000)
            assert ei.value.errnum == canopy.EHOSTUNREACH
            assert "rank 1000 does not exist" in ei.value.message

    run(main())


def test_publish_and_subscribe(instance: Instance) -> None:
    async def main() -> None:
        async with canopy.aio.connect(instance.local_uri(1)) as sub_c, canopy.aio.connect(instance.uri) as pub_c:
            async with sub_c.subscribe("pytest.aio.*") as sub:
                seqs = await asyncio.gather(*(pub_c.publish("pytest.aio.n", str(i)) for i in range(10)))
                got = [await sub.get(timeout=10) for _ in range(10)]
                assert sorted(e.seq for e in got) == sorted(seqs)
                assert [e.seq for e in got] == sorted(e.seq for e in got), "events arrive in sequence order"
                assert all(e.topic == "pytest.aio.n" for e in got)
                with pytest.raises(canopy.Timeout):
                    await sub.get(timeout=0.2)
            # async for, subscribed at the first iteration: publish once it is.
            stream = sub_c.subscribe("pytest.aiofor.x", timeout=10)
            await stream
            await pub_c.publish("pytest.aiofor.x", b"one")
            await pub_c.publish("pytest.aiofor.x", b"two")
            seen = []
            async for ev in stream:
                seen.append(ev.data)
                if len(seen) == 2:
                    break
            await stream.close()
            assert seen == [b"one", b"two"]
            assert [ev async for ev in stream] == []

    run(main())


def test_close_fails_requests_in_flight(instance: Instance) -> None:
    async def main() -> None:
        c = await canopy.aio.connect(instance.uri)
        sub = await c.subscribe("pytest.close.*")
        t = asyncio.create_task(c.rpc("broker.ping", rank=3))
        await asyncio.sleep(0)
        await c.close()
        with pytest.raises(canopy.Disconnected):
            await t
        with pytest.raises(canopy.Disconnected, match="connect again"):
            await c.rpc("broker.ping")
        assert [ev async for ev in sub] == []

    run(main())


def test_large_payloads_concurrently(instance: Instance) -> None:
    import os

    async def main() -> None:
        async with canopy.aio.connect(instance.uri) as c:
            bigs = [os.urandom((1 << 20) + i) for i in range(4)]
            got = await asyncio.gather(*(c.rpc("broker.ping", b, rank=i) for i, b in enumerate(bigs)))
            assert got == bigs

    run(main())
