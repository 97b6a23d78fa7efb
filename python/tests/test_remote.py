"""A remote CURVE client against `canopy start --listen-clients
tcp://127.0.0.1:PORT --allow curve:<Z85>=user`, with a certificate made by
`canopy keygen`."""

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
from conftest import Instance, free_port, run_canopy, write_secret_cert


@dataclass
class Remote:
    inst: Instance
    uri: str
    key: str  # secret certificate allowed as user
    public: str
    server_key: str
    dir: str


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Remote]:
    d = str(tmp_path_factory.mktemp("keys"))
    key = os.path.join(d, "me")
    r = run_canopy("keygen", key, "--name", "pytest")
    assert r.returncode == 0, r.stderr
    assert oct(os.stat(key).st_mode & 0o777) == "0o600"
    public = canopy.load_public_certificate(key + ".pub").public_key
    port = free_port()
    inst = Instance(4, ("--listen-clients", f"tcp://127.0.0.1:{port}", "--allow", f"curve:{public}=user"))
    try:
        with canopy.connect(inst.uri) as c:
            server_key = json.loads(c.rpc("overlay.status", rank=0))["broker"]["public_key"]
        yield Remote(inst, f"tcp://127.0.0.1:{port}", key, public, server_key, d)
    finally:
        inst.stop()


@pytest.fixture
def remote_env(remote: Remote, monkeypatch: pytest.MonkeyPatch) -> Remote:
    monkeypatch.setenv("CANOPY_URI", remote.uri)
    monkeypatch.setenv("CANOPY_KEY", remote.key)
    monkeypatch.setenv("CANOPY_SERVER_KEY", remote.server_key)
    monkeypatch.delenv("CANOPY_KEX", raising=False)
    return remote


def test_sync_rpc_over_curve(remote_env: Remote) -> None:
    with canopy.connect() as c:  # CANOPY_URI, CANOPY_KEY, CANOPY_SERVER_KEY
        assert c.uri == remote_env.uri
        for rank in range(4):
            m = c.request("broker.ping", f"to {rank}", rank=rank, timeout=10)
            assert (m.header.nodeid, m.payload) == (rank, f"to {rank}".encode())
        with pytest.raises(canopy.CanopyError) as ei:
            c.rpc("no.such.method")
        assert ei.value.errname == "ENOSYS"
        with pytest.raises(canopy.CanopyError) as ei:
            c.rpc("broker.ping", rank=7)
        assert ei.value.errname == "EHOSTUNREACH"
        # The broker stamped our identity: role user, so no publishing.
        with pytest.raises(canopy.PermissionDenied) as ei:
            c.publish("pytest.remote", b"x")
        e = ei.value
        assert (e.errnum, e.errname, e.topic) == (canopy.EPERM, "EPERM", "event.pub")
        assert "requires role 'operator'" in e.message and f"curve:{remote_env.public}" in e.message
        c.ping(3)


def test_server_key_from_a_certificate_file(remote: Remote) -> None:
    pub = os.path.join(remote.dir, "rank0.pub")
    with open(pub, "w") as f:
        f.write(f'curve\n    public-key = "{remote.server_key}"\n')
    with canopy.connect(remote.uri, key=remote.key, server_key=pub) as c:
        assert c.rpc("broker.ping", b"file", rank=1, timeout=10) == b"file"


def test_remote_subscriber_gets_local_events(remote: Remote) -> None:
    with canopy.connect(remote.uri, key=remote.key, server_key=remote.server_key) as rc:
        with rc.subscribe("pytest.remote.*", timeout=10) as sub, canopy.connect(remote.inst.local_uri(2)) as lc:
            seq = lc.publish("pytest.remote.x", b"over curve")
            ev = sub.get(timeout=10)
            assert (ev.topic, ev.seq, ev.data) == ("pytest.remote.x", seq, b"over curve")


def test_async_rpcs_over_curve(remote_env: Remote) -> None:
    async def main() -> None:
        async with canopy.aio.connect() as c:
            res = await asyncio.gather(*(c.rpc("broker.ping", str(i), rank=i % 4, timeout=10) for i in range(64)))
            assert res == [str(i).encode() for i in range(64)]
            with pytest.raises(canopy.CanopyError) as ei:
                await c.rpc("broker.ping", rank=50)
            assert ei.value.errname == "EHOSTUNREACH"
            async with c.subscribe("pytest.aremote.*") as sub:
                async with canopy.aio.connect(remote_env.inst.uri) as lc:
                    await lc.publish("pytest.aremote.y", b"y")
                ev = await sub.get(timeout=10)
                assert ev.data == b"y"

    asyncio.run(asyncio.wait_for(main(), 30))


def test_refused_key_is_permission_denied_at_once(remote: Remote) -> None:
    other = os.path.join(remote.dir, "stranger")
    pub = write_secret_cert(other, "stranger")
    c = canopy.connect(remote.uri, key=other, server_key=remote.server_key)
    t0 = time.monotonic()
    with pytest.raises(canopy.PermissionDenied) as ei:
        c.rpc("broker.ping", timeout=20)
    assert time.monotonic() - t0 < 5, "refused at the handshake, not by a timeout"
    assert f"refused this key (principal curve:{pub})" in ei.value.message
    assert "ask its admin to allow it" in ei.value.message
    c.close()

    async def main() -> None:
        async with canopy.aio.connect(remote.uri, key=other, server_key=remote.server_key) as ac:
            with pytest.raises(canopy.PermissionDenied, match="refused this key"):
                await ac.rpc("broker.ping", timeout=20)

    asyncio.run(asyncio.wait_for(main(), 30))


def test_wrong_server_key_fails_clearly(remote: Remote) -> None:
    import zmq

    wrong, _ = zmq.curve_keypair()
    with canopy.connect(remote.uri, key=remote.key, server_key=wrong.decode()) as c:
        t0 = time.monotonic()
        with pytest.raises(canopy.ConnectError) as ei:
            c.rpc("broker.ping", timeout=20)
        assert time.monotonic() - t0 < 5, "the failed handshake is reported, not a timeout"
        assert "the CURVE handshake with" in ei.value.message
        assert "check that CANOPY_SERVER_KEY is this broker's public key" in ei.value.message


def test_key_configuration_errors_are_clear(remote: Remote, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("CANOPY_KEY", "CANOPY_SERVER_KEY", "CANOPY_KEX"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(canopy.InvalidArgument, match="set CANOPY_KEY=FILE .*canopy keygen"):
        canopy.connect(remote.uri)
    with pytest.raises(canopy.InvalidArgument, match="needs the broker's public key: set CANOPY_SERVER_KEY"):
        canopy.connect(remote.uri, key=remote.key)
    with pytest.raises(canopy.InvalidArgument, match=r"me.pub: group or other can read it \(mode 644\)"):
        canopy.connect(remote.uri, key=remote.key + ".pub", server_key=remote.server_key)
    public_only = os.path.join(remote.dir, "public-only")
    fd = os.open(public_only, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with open(remote.key + ".pub") as src, os.fdopen(fd, "w") as dst:
        dst.write(src.read())
    with pytest.raises(canopy.InvalidArgument, match="no curve secret-key; this is a public certificate"):
        canopy.connect(remote.uri, key=public_only, server_key=remote.server_key)
    loose = os.path.join(remote.dir, "loose")
    write_secret_cert(loose)
    os.chmod(loose, 0o640)
    with pytest.raises(canopy.InvalidArgument, match=f"run chmod 600 {loose}"):
        canopy.connect(remote.uri, key=loose, server_key=remote.server_key)
    with pytest.raises(canopy.InvalidArgument, match="CANOPY_SERVER_KEY: '~' is not a Z85 character"):
        canopy.connect(remote.uri, key=remote.key, server_key="~" * 40)
    monkeypatch.setenv("CANOPY_KEX", "host:1")
    with pytest.raises(canopy.InvalidArgument, match="Kerberos .* not support"):
        canopy.connect(remote.uri, key=remote.key, server_key=remote.server_key)


def test_revoked_access_ends_the_connection_clearly(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A policy reload that drops our key: the broker sends one
    access.revoked EPERM at the reload, and a waiting subscriber (sync and
    asyncio) gets PermissionDenied at once instead of waiting forever."""
    import threading

    import zmq

    d = str(tmp_path_factory.mktemp("revoke"))
    key = os.path.join(d, "me")
    public = write_secret_cert(key)
    stranger, _ = zmq.curve_keypair()
    policy = os.path.join(d, "policy.toml")

    def write_policy(principal: str) -> None:
        with open(policy + ".tmp", "w") as f:
            f.write(f'[[rule]]\nname = "pytest"\nprincipal = "curve:{principal}"\nroles = ["user"]\n')
        os.chmod(policy + ".tmp", 0o600)
        os.replace(policy + ".tmp", policy)

    write_policy(public)
    port = free_port()
    inst = Instance(1, ("--listen-clients", f"tcp://127.0.0.1:{port}", "--policy", policy))
    try:
        local = canopy.connect(inst.uri)
        server_key = json.loads(local.rpc("overlay.status", rank=0))["broker"]["public_key"]
        uri = f"tcp://127.0.0.1:{port}"
        c = canopy.connect(uri, key=key, server_key=server_key)
        sub = c.subscribe("pytest.revoke.*", timeout=20)
        local.publish("pytest.revoke.a", b"before")
        assert sub.get(timeout=10).data == b"before"

        def revoke() -> None:
            write_policy(stranger.decode())
            local.rpc("acl.reload", rank=0)

        async def main() -> canopy.CanopyError | None:
            async with canopy.aio.connect(uri, key=key, server_key=server_key) as ac:
                asub = await ac.subscribe("pytest.revoke.*")
                threading.Timer(0.3, revoke).start()
                try:
                    await asub.get(timeout=20)
                except canopy.CanopyError as e:
                    return e
            return None

        t0 = time.monotonic()
        err = asyncio.run(asyncio.wait_for(main(), 30))
        assert isinstance(err, canopy.PermissionDenied), err
        assert "revoked this connection's access: permission denied: access revoked" in err.message
        with pytest.raises(canopy.PermissionDenied, match="revoked this connection's access"):
            sub.get(timeout=20)
        assert time.monotonic() - t0 < 10
        with pytest.raises(canopy.PermissionDenied):
            c.ping(0)
        local.close()
    finally:
        inst.stop()
