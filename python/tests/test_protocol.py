"""The codec, certificates and URIs, without a broker."""

from __future__ import annotations

import os
import random

import pytest

import canopy
from canopy import certs
from canopy.protocol import (
    ANY,
    FIXED_LEN,
    MAX_HEADER,
    MAX_PAYLOAD,
    MAX_TOPIC,
    FrameDecoder,
    Header,
    Hop,
    HopKind,
    MsgType,
    Roles,
    decode_header,
    encode_frame,
    encode_request_frame,
    encode_request_header,
    topic_matches,
)


def sample() -> Header:
    return Header(
        MsgType.REQUEST,
        flags=1,
        matchtag=0xDEADBEEF,
        nodeid=ANY,
        errnum=113,
        seq=1 << 40,
        roles=Roles.USER | Roles.PEER,
        topic="broker.ping",
        userid="alice@TEST.REALM",
        route=[Hop(HopKind.LOCAL, 7), Hop(HopKind.PARENT, 0), Hop(HopKind.CHILD, 12)],
    )


def test_golden_bytes_from_the_protocol_doc() -> None:
    # docs/protocol.md section 1.1 and proto/src/header.rs golden_bytes.
    want = bytes.fromhex(
        "CA 01 01 00  01 02 03 04  00 00 00 07  00 00 00 00"
        "00 00 00 00 00 00 00 00  00 00 00 00  00 01 00 00 01"
        "61  02 00 00 00 05"
    )
    h = Header(MsgType.REQUEST, matchtag=0x01020304, nodeid=7, topic="a", route=[Hop(HopKind.CHILD, 5)])
    assert h.encode() == want
    assert decode_header(want) == h


def test_round_trip_and_request_fast_path() -> None:
    h = sample()
    b = h.encode()
    assert len(b) == FIXED_LEN + len("broker.ping") + len("alice@TEST.REALM") + 15
    assert decode_header(b) == h
    fast = encode_request_header(b"x.y", 3, 42)
    assert fast == Header(MsgType.REQUEST, matchtag=42, nodeid=3, topic="x.y").encode()
    frame = encode_request_frame(b"x.y", 3, 42, b"payload")
    assert frame == encode_frame(Header(MsgType.REQUEST, matchtag=42, nodeid=3, topic="x.y"), b"payload")


def test_rejects_bad_headers_clearly() -> None:
    good = sample().encode()
    cases = {
        "too short": good[:10],
        "bad magic": b"\x00" + good[1:],
        "version": good[:1] + b"\x09" + good[2:],
        "unknown message type": good[:2] + b"\x63" + good[3:],
        "claim": good + b"\x00",
        "route is 200": good[:32] + b"\xc8" + good[33:],
        "topic is not valid UTF-8": good[:FIXED_LEN] + b"\xff" + good[FIXED_LEN + 1 :],
        "hop kind 9": good[:-5] + b"\x09" + good[-4:],
    }
    for what, b in cases.items():
        with pytest.raises(canopy.ProtocolError) as ei:
            decode_header(b)
        assert what in ei.value.message, (what, ei.value.message)
        assert ei.value.errnum == canopy.EPROTO


def test_hostile_bytes_only_ever_raise_protocol_error() -> None:
    good = sample().encode()
    for n in range(len(good)):
        with pytest.raises(canopy.ProtocolError):
            decode_header(good[:n])
    for i in range(len(good)):
        for v in (0, 1, 0x7F, 0x80, 0xFF):
            b = bytearray(good)
            b[i] = v
            try:
                decode_header(bytes(b))
            except canopy.ProtocolError:
                pass
    rng = random.Random(12345)
    for _ in range(5000):
        b = bytearray(rng.randbytes(rng.randrange(80)))
        if len(b) > 3:
            b[0], b[1] = 0xCA, 1
        try:
            decode_header(bytes(b))
        except canopy.ProtocolError:
            pass


def test_encode_enforces_limits() -> None:
    h = sample()
    h.topic = "x" * (MAX_TOPIC + 1)
    with pytest.raises(canopy.InvalidArgument, match="topic is 256 bytes"):
        h.encode()
    h = sample()
    h.matchtag = 1 << 32
    with pytest.raises(canopy.InvalidArgument, match="matchtag"):
        h.encode()


def test_frame_decoder_reassembles_across_chunks() -> None:
    h = Header(MsgType.REQUEST, matchtag=42, nodeid=7, topic="broker.ping")
    stream = encode_frame(h, b"hello") + encode_frame(h, b"") + encode_frame(h, bytes(3000))
    for chunk in (1, 3, 7, 64, 10000):
        d = FrameDecoder()
        got = []
        for i in range(0, len(stream), chunk):
            d.feed(stream[i : i + chunk])
            while (f := d.next_frame()) is not None:
                assert f[0] == h
                got.append(f[1])
        assert got == [b"hello", b"", bytes(3000)], chunk
        assert d.pending() == 0


def test_frame_decoder_rejects_oversize_before_buffering() -> None:
    d = FrameDecoder()
    d.feed((MAX_HEADER + 1).to_bytes(4, "big") + bytes(4))
    with pytest.raises(canopy.ProtocolError, match="frame header length 8193 exceeds 8192"):
        d.next_frame()
    d = FrameDecoder()
    d.feed((40).to_bytes(4, "big") + (MAX_PAYLOAD + 1).to_bytes(4, "big"))
    with pytest.raises(canopy.ProtocolError, match="payload length"):
        d.next_frame()
    d = FrameDecoder()
    d.feed(bytes([0, 0, 0, 40, 0, 0, 0, 0]) + b"\xab" * 40)
    with pytest.raises(canopy.ProtocolError, match="bad magic"):
        d.next_frame()


def test_topic_patterns_match_as_the_broker_does() -> None:
    assert topic_matches("*", "anything")
    assert topic_matches("job.*", "job.started")
    assert not topic_matches("job.*", "jobs.started")
    assert topic_matches("job.started", "job.started")
    assert not topic_matches("job.started", "job.started.x")


def test_z85_and_certificates(tmp_path: os.PathLike[str]) -> None:
    import zmq

    pub, sec = zmq.curve_keypair()
    assert certs.z85_encode(certs.z85_decode(pub.decode())) == pub.decode()
    # The 32-byte test vector from the Z85 spec (rfc.zeromq.org/spec/32).
    raw = bytes([0x86, 0x4F, 0xD2, 0x6F, 0xB5, 0x59, 0xF7, 0x5B])
    assert certs.z85_encode(raw) == "HelloWorld"
    text = (
        "#   ZeroMQ CURVE **Secret** Certificate\n"
        "#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.\n\n"
        'metadata\n    name = "me"\ncurve\n'
        f'    public-key = "{pub.decode()}"\n    secret-key = "{sec.decode()}"\n'
    )
    p = os.path.join(tmp_path, "me")
    with open(p, "w") as f:
        f.write(text)
    os.chmod(p, 0o644)
    with pytest.raises(canopy.InvalidArgument, match=r"group or other can read it \(mode 644\); run chmod 600"):
        certs.load_secret_certificate(p)
    os.chmod(p, 0o600)
    c = certs.load_secret_certificate(p)
    assert (c.public_key, c.secret_key, c.name) == (pub.decode(), sec.decode(), "me")
    assert "redacted" in repr(c) and sec.decode() not in repr(c)
    other_pub, _ = zmq.curve_keypair()
    with open(p, "w") as f:
        f.write(text.replace(pub.decode(), other_pub.decode()))
    with pytest.raises(canopy.InvalidArgument, match="does not match secret-key"):
        certs.load_secret_certificate(p)
    with pytest.raises(canopy.InvalidArgument, match="must be indented"):
        certs.parse_certificate("curve\npublic-key = x\n")
    with pytest.raises(canopy.InvalidArgument, match="expected 40 Z85 characters"):
        certs.parse_certificate('curve\n    public-key = "abc"\n')


def test_uris(monkeypatch: pytest.MonkeyPatch) -> None:
    from canopy import resolve_uri

    assert resolve_uri("local:///a/b").address == "/a/b"
    assert resolve_uri("/a/b").kind == "local"
    assert resolve_uri("tcp://h:1").kind == "tcp"
    with pytest.raises(canopy.InvalidArgument, match="unsupported uri 'udp://x': use local://PATH or tcp://HOST:PORT"):
        resolve_uri("udp://x")
    with pytest.raises(canopy.InvalidArgument, match="use tcp://HOST:PORT"):
        resolve_uri("tcp://nohost")
    monkeypatch.delenv("CANOPY_URI", raising=False)
    with pytest.raises(canopy.InvalidArgument, match="no broker given: pass a uri or set CANOPY_URI"):
        canopy.connect()
    monkeypatch.setenv("CANOPY_URI", "local:///x/y")
    assert resolve_uri().address == "/x/y"


def test_errors_are_clear() -> None:
    e = canopy.CanopyError("rank 9 does not exist", canopy.EHOSTUNREACH, topic="broker.ping", rank=0)
    assert str(e) == "broker.ping failed on rank 0: EHOSTUNREACH: rank 9 does not exist"
    assert e.errname == "EHOSTUNREACH"
    assert canopy.errname(38) == "ENOSYS" and canopy.errname(4242) == "errno 4242"
    assert isinstance(canopy.Timeout("x"), TimeoutError)
    assert isinstance(canopy.PermissionDenied("x"), PermissionError)
    assert canopy.PermissionDenied("x").errnum == canopy.EPERM
    import pickle

    e2 = pickle.loads(pickle.dumps(e))
    assert (type(e2), e2.errnum, e2.topic, e2.rank, str(e2)) == (type(e), e.errnum, e.topic, e.rank, str(e))


def test_tcp_without_pyzmq_says_what_to_install(tmp_path: os.PathLike[str]) -> None:
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['zmq'] = None\n"
        "import canopy\n"
        "try:\n"
        "    canopy.connect('tcp://127.0.0.1:1', key=sys.argv[1], server_key='0' * 40)\n"
        "except canopy.ConnectError as e:\n"
        "    print(e)\n"
    )
    from conftest import write_secret_cert

    key = os.path.join(tmp_path, "k")
    write_secret_cert(key)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(canopy.__file__)))
    out = subprocess.run([sys.executable, "-c", code, key], capture_output=True, text=True, env=env, timeout=30)
    assert "needs pyzmq, which is not installed: pip install pyzmq" in out.stdout, (out.stdout, out.stderr)
