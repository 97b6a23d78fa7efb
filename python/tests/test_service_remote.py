"""Services and roles with a second principal: a remote CURVE client that
the policy lets in as `user` (docs/protocol.md section 6.1: the broker
checks the declared role before the provider sees the request; only the
owner, or a principal the policy grants `register`, may offer a
namespace)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass
from typing import Iterator

import pytest

import canopy
import canopy.aio
from conftest import Instance, Provider, free_port, write_secret_cert


@dataclass
class Remote:
    inst: Instance
    uri: str
    key: str
    public: str
    server_key: str

    def connect(self) -> canopy.Client:
        return canopy.connect(self.uri, key=self.key, server_key=self.server_key)


def _server_key(inst: Instance) -> str:
    with canopy.connect(inst.uri) as c:
        return str(json.loads(c.rpc("overlay.status", rank=0))["broker"]["public_key"])


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Remote]:
    d = str(tmp_path_factory.mktemp("svc-keys"))
    key = os.path.join(d, "user")
    public = write_secret_cert(key, "pytest-user")
    port = free_port()
    inst = Instance(4, ("--listen-clients", f"tcp://127.0.0.1:{port}", "--allow", f"curve:{public}=user"))
    try:
        yield Remote(inst, f"tcp://127.0.0.1:{port}", key, public, _server_key(inst))
    finally:
        inst.stop()


def test_declared_roles_are_enforced_before_delivery(remote: Remote) -> None:
    with Provider(canopy.connect(remote.inst.uri), "pyrole", {"get": "user", "put": "operator", "wipe": "admin"},
                  lambda req: f"{req.method} by {req.principal} as {','.join(req.role_names)}") as p, \
            remote.connect() as user:
        assert user.rpc("pyrole.get", b"", timeout=10) == f"get by curve:{remote.public} as user".encode()
        req = p.seen[-1]
        assert req.roles == canopy.Roles.USER, "the caller's roles, as its broker stamped them"
        for method, role in (("put", "operator"), ("wipe", "admin")):
            with pytest.raises(canopy.PermissionDenied) as ei:
                user.rpc(f"pyrole.{method}", b"", timeout=10)
            e = ei.value
            assert (e.errnum, e.topic) == (canopy.EPERM, f"pyrole.{method}")
            assert f"requires role '{role}'" in e.message, e.message
        assert len(p.seen) == 1, "the provider never saw the refused calls"
        # The owner, from rank 3 (two hops below the provider): its roles travel in the header.
        with canopy.connect(remote.inst.local_uri(3)) as owner:
            assert owner.rpc("pyrole.put", rank=0).startswith(b"put by unix:")
            assert p.seen[-1].roles & canopy.Roles.OWNER


def test_a_plain_user_may_not_register(remote: Remote) -> None:
    with remote.connect() as user:
        with pytest.raises(canopy.PermissionDenied) as ei:
            user.add_service("pyremote", {"m": "user"}, timeout=10)
        assert (ei.value.errnum, ei.value.topic) == (canopy.EPERM, "service.add")
        assert "pyremote" not in user.services
        assert user.rpc("broker.ping", b"ok", timeout=10) == b"ok"


@pytest.fixture(scope="module")
def registrar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Remote]:
    """A policy that lets one CURVE key register `pyremote` and `pyr-*`."""
    d = str(tmp_path_factory.mktemp("svc-policy"))
    key = os.path.join(d, "provider")
    public = write_secret_cert(key, "pytest-provider")
    policy = os.path.join(d, "policy.toml")
    with open(policy, "w") as f:
        f.write(
            f'[[rule]]\nname = "pytest-provider"\nprincipal = "curve:{public}"\nroles = ["user"]\n\n'
            f'[[rule]]\nname = "pytest-provider-registers"\nprincipal = "curve:{public}"\n'
            'register = ["pyremote", "pyr-*"]\n'
        )
    os.chmod(policy, 0o600)
    port = free_port()
    inst = Instance(2, ("--listen-clients", f"tcp://127.0.0.1:{port}", "--policy", policy))
    try:
        yield Remote(inst, f"tcp://127.0.0.1:{port}", key, public, _server_key(inst))
    finally:
        inst.stop()


def test_remote_curve_provider_sync(registrar: Remote) -> None:
    with Provider(registrar.connect(), "pyremote", {"echo": "user"}, lambda r: b"curve: " + r.payload) as p, \
            canopy.connect(registrar.inst.local_uri(1)) as caller:
        assert p.service.rank == 0
        m = caller.request("pyremote.echo", b"hi", rank=0, timeout=10)
        assert (m.payload, m.header.nodeid) == (b"curve: hi", 0)
        assert p.seen[-1].principal.startswith("unix:")
    # A provider may publish in its own namespace though only a user;
    # elsewhere it needs operator.
    with registrar.connect() as prov, canopy.connect(registrar.inst.local_uri(1)) as sub_c:
        with sub_c.subscribe("pyr-events.*", timeout=10) as sub:
            with pytest.raises(canopy.PermissionDenied):
                prov.publish("pyr-events.changed", b"before", timeout=10)
            prov.add_service("pyr-events", {"m": "user"}, timeout=10)
            seq = prov.publish("pyr-events.changed", b"after", timeout=10)
            ev = sub.get(timeout=10)
            assert (ev.topic, ev.seq, ev.data, ev.sender) == ("pyr-events.changed", seq, b"after", f"curve:{registrar.public}")
            with pytest.raises(canopy.PermissionDenied):
                prov.publish("elsewhere.changed", b"x", timeout=10)
    # Not granted: a namespace outside its register patterns.
    with registrar.connect() as other:
        with pytest.raises(canopy.PermissionDenied) as ei:
            other.add_service("other", {"m": "user"}, timeout=10)
        assert ei.value.topic == "service.add"
        assert other.add_service("pyr-x", {"m": "user"}, timeout=10).rank == 0, "a register pattern"


def test_remote_curve_provider_async(registrar: Remote) -> None:
    async def main() -> None:
        p = await canopy.aio.connect(registrar.uri, key=registrar.key, server_key=registrar.server_key)
        await p.add_service("pyr-async", {"fast": "user"}, {"fast": lambda r: r.payload[::-1]}, timeout=10)
        async with canopy.aio.connect(registrar.inst.local_uri(1)) as c:
            got = await asyncio.gather(*(c.rpc("pyr-async.fast", str(i), rank=0, timeout=10) for i in range(50)))
            assert got == [str(i)[::-1].encode() for i in range(50)]
            await p.close()
            # The next request finds the registration gone (the broker
            # notices when it cannot send to it: give the disconnection a
            # moment to reach the broker's socket).
            await asyncio.sleep(0.2)
            t0 = time.monotonic()
            with pytest.raises(canopy.CanopyError) as ei:
                await c.rpc("pyr-async.fast", b"x", rank=0, timeout=5)
            assert ei.value.errnum == canopy.ENOSYS and time.monotonic() - t0 < 1.0

    asyncio.run(asyncio.wait_for(main(), 40))


def test_remote_curve_provider_death_is_noticed_at_the_next_delivery(registrar: Remote) -> None:
    """docs/services.md: a remote provider's death is noticed when the broker
    next sends to it; then every request waiting for it gets ENOSYS."""
    async def main() -> None:
        p = await canopy.aio.connect(registrar.uri, key=registrar.key, server_key=registrar.server_key)
        await p.add_service("pyr-dies", {"slow": "user"}, timeout=10)  # no handler: never answered
        async with canopy.aio.connect(registrar.inst.local_uri(1)) as c:
            first = asyncio.create_task(c.rpc("pyr-dies.slow", b"1", rank=0, timeout=15))
            assert (await p.next_request(timeout=10)).payload == b"1"
            await p.close()
            await asyncio.sleep(0.5)  # the disconnection reaches the broker's socket
            t0 = time.monotonic()
            with pytest.raises(canopy.CanopyError) as ei:
                await c.rpc("pyr-dies.slow", b"2", rank=0, timeout=10)
            assert ei.value.errnum == canopy.ENOSYS
            with pytest.raises(canopy.CanopyError) as ei:
                await asyncio.wait_for(first, 1.0)
            assert ei.value.errnum == canopy.ENOSYS and "went away" in ei.value.message
            assert time.monotonic() - t0 < 1.5

    asyncio.run(asyncio.wait_for(main(), 40))


def test_remote_curve_provider_closing_mid_request_gives_enosys(registrar: Remote) -> None:
    async def main() -> None:
        async def slow(req: canopy.Request) -> bytes:
            await asyncio.sleep(60)
            return b"never"

        p = await canopy.aio.connect(registrar.uri, key=registrar.key, server_key=registrar.server_key)
        await p.add_service("pyr-slow", {"slow": "user"}, slow, timeout=10)
        async with canopy.aio.connect(registrar.inst.local_uri(1)) as c:
            call = asyncio.create_task(c.rpc("pyr-slow.slow", rank=0, timeout=5))
            await asyncio.sleep(0.3)
            t0 = time.monotonic()
            await p.close()
            with pytest.raises(canopy.CanopyError) as ei:
                await call
            assert ei.value.errnum == canopy.ENOSYS, ei.value
            assert time.monotonic() - t0 < 1.0

    asyncio.run(asyncio.wait_for(main(), 40))
