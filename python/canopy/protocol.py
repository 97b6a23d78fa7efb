"""Canopy wire protocol, version 1: the header codec and local-connector
framing (docs/protocol.md; reference: proto/src/header.rs, proto/src/frame.rs).

All integers are big-endian. This module does no I/O.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import NamedTuple

from .errors import InvalidArgument, ProtocolError

MAGIC = 0xCA
PROTOCOL_VERSION = 1
#: Size of the fixed part of a header.
FIXED_LEN = 33
MAX_TOPIC = 255
MAX_USERID = 1024
MAX_ROUTE = 64
#: Local connector limits (frame.rs).
MAX_HEADER = 8192
MAX_PAYLOAD = 64 << 20
#: nodeid meaning "the nearest broker that offers the topic, searching upstream".
ANY = NODEID_ANY = 0xFFFFFFFF
#: Header flag: the sender wants no response.
FLAG_NORESPONSE = 0x01


class MsgType(IntEnum):
    REQUEST = 1
    RESPONSE = 2
    EVENT = 3
    CONTROL = 4


class HopKind(IntEnum):
    PARENT = 1
    CHILD = 2
    LOCAL = 3


class Hop(NamedTuple):
    """One route-stack entry: where a request entered a broker."""

    kind: HopKind
    id: int = 0


class Roles:
    """Role bits (docs/protocol.md section 4)."""

    PEER = 1
    OWNER = 2
    ADMIN = 4
    OPERATOR = 8
    USER = 16

    _NAMES = (("peer", 1), ("owner", 2), ("admin", 4), ("operator", 8), ("user", 16))

    @classmethod
    def names(cls, bits: int) -> list[str]:
        """Role names in a bit set, in canonical order."""
        return [n for n, b in cls._NAMES if bits & b]


# magic version type flags | matchtag nodeid errnum | seq | roles | topic_len userid_len route_len
_FIXED = struct.Struct(">BBBBIIIQIHHB")
_HOP = struct.Struct(">BI")
_FRAME_PREFIX = struct.Struct(">II")
# A whole request frame's fixed prefix: frame lengths + the fixed header.
_REQ_PREFIX = struct.Struct(">IIBBBBIIIQIHHB")
assert _FIXED.size == FIXED_LEN


@dataclass(slots=True)
class Header:
    """A decoded message header."""

    type: MsgType
    flags: int = 0
    matchtag: int = 0
    nodeid: int = 0
    errnum: int = 0
    seq: int = 0
    roles: int = 0
    topic: str = ""
    userid: str = ""
    route: list[Hop] = field(default_factory=list)

    def encode(self) -> bytes:
        """Encode, enforcing the limits that :func:`decode_header` enforces."""
        topic = self.topic.encode("utf-8")
        userid = self.userid.encode("utf-8")
        _check_len("topic", len(topic), MAX_TOPIC)
        _check_len("userid", len(userid), MAX_USERID)
        _check_len("route", len(self.route), MAX_ROUTE)
        for name, v, bits in (
            ("flags", self.flags, 8),
            ("matchtag", self.matchtag, 32),
            ("nodeid", self.nodeid, 32),
            ("errnum", self.errnum, 32),
            ("seq", self.seq, 64),
            ("roles", self.roles, 32),
        ):
            if not 0 <= v < (1 << bits):
                raise InvalidArgument(f"header {name} {v} does not fit in {bits} bits")
        parts = [
            _FIXED.pack(
                MAGIC,
                PROTOCOL_VERSION,
                int(self.type),
                self.flags,
                self.matchtag,
                self.nodeid,
                self.errnum,
                self.seq,
                self.roles,
                len(topic),
                len(userid),
                len(self.route),
            ),
            topic,
            userid,
        ]
        for hop in self.route:
            kind, hid = hop
            if kind not in (1, 2, 3):
                raise InvalidArgument(f"unknown route hop kind {kind}; use 1, 2 or 3")
            parts.append(_HOP.pack(int(kind), hid))
        return b"".join(parts)


def _check_len(name: str, n: int, limit: int) -> None:
    if n > limit:
        raise InvalidArgument(f"{name} is {n} bytes, more than the limit of {limit}; shorten it")


def decode_header(b: bytes | bytearray | memoryview) -> Header:
    """Decode one header. Raises :class:`ProtocolError` for any bad input."""
    return _decode(b, 0, len(b))


_TYPES = (None, MsgType.REQUEST, MsgType.RESPONSE, MsgType.EVENT, MsgType.CONTROL)
_HOP_KINDS = (None, HopKind.PARENT, HopKind.CHILD, HopKind.LOCAL)


def _decode(b: bytes | bytearray | memoryview, off: int, n: int) -> Header:
    """Decode the header at b[off:off+n]."""
    if n < FIXED_LEN:
        raise ProtocolError(
            f"message too short: {n} bytes, need at least {FIXED_LEN}; "
            "the peer is not speaking the canopy protocol"
        )
    (magic, version, mtype, flags, matchtag, nodeid, errnum, seq, roles,
     topic_len, userid_len, route_len) = _FIXED.unpack_from(b, off)
    if magic != MAGIC:
        raise ProtocolError(
            f"bad magic byte 0x{magic:02x}; the peer is not speaking the canopy protocol"
        )
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"unsupported protocol version {version} (this client speaks "
            f"{PROTOCOL_VERSION}); upgrade the older side"
        )
    if not 1 <= mtype <= 4:
        raise ProtocolError(
            f"unknown message type {mtype}; the peer is not speaking the canopy protocol"
        )
    if topic_len > MAX_TOPIC or userid_len > MAX_USERID or route_len > MAX_ROUTE:
        for name, v, limit in (
            ("topic", topic_len, MAX_TOPIC),
            ("userid", userid_len, MAX_USERID),
            ("route", route_len, MAX_ROUTE),
        ):
            if v > limit:
                raise ProtocolError(
                    f"{name} is {v} bytes, more than the limit of {limit}; the message is corrupt"
                )
    claimed = FIXED_LEN + topic_len + userid_len + 5 * route_len
    if claimed != n:
        raise ProtocolError(
            f"header length fields claim {claimed} bytes but the frame has {n}; "
            "the message is truncated or corrupt"
        )
    at = off + FIXED_LEN
    try:
        topic = str(b[at : at + topic_len], "utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("topic is not valid UTF-8; the message is corrupt") from None
    at += topic_len
    if userid_len:
        try:
            userid = str(b[at : at + userid_len], "utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("userid is not valid UTF-8; the message is corrupt") from None
        at += userid_len
    else:
        userid = ""
    route: list[Hop] = []
    for _ in range(route_len):
        kind, hid = _HOP.unpack_from(b, at)
        if not 1 <= kind <= 3:
            raise ProtocolError(f"unknown route hop kind {kind}; the message is corrupt")
        route.append(Hop(_HOP_KINDS[kind], hid))  # type: ignore[arg-type]
        at += 5
    return Header(_TYPES[mtype], flags, matchtag, nodeid, errnum, seq, roles, topic, userid, route)  # type: ignore[arg-type]


def encode_frame(header: Header | bytes, payload: bytes = b"") -> bytes:
    """One local-connector frame: u32 header_len, u32 payload_len, header, payload."""
    hb = header.encode() if isinstance(header, Header) else bytes(header)
    if len(payload) > MAX_PAYLOAD:
        raise InvalidArgument(
            f"payload is {len(payload)} bytes, more than the limit of {MAX_PAYLOAD}; send smaller payloads"
        )
    return _FRAME_PREFIX.pack(len(hb), len(payload)) + hb + bytes(payload)


def encode_request_header(topic: bytes, nodeid: int, matchtag: int, flags: int = 0) -> bytes:
    """The header of a client request (empty userid, zero roles, empty route).

    ``topic`` is the UTF-8 topic, already checked by :func:`check_topic`.
    """
    return _FIXED.pack(
        MAGIC, PROTOCOL_VERSION, 1, flags, matchtag, nodeid, 0, 0, 0, len(topic), 0, 0
    ) + topic


def encode_request_frame(topic: bytes, nodeid: int, matchtag: int, payload: bytes, flags: int = 0) -> bytes:
    """A whole local-connector request frame, in one allocation-light step."""
    return b"".join((
        _REQ_PREFIX.pack(
            FIXED_LEN + len(topic), len(payload),
            MAGIC, PROTOCOL_VERSION, 1, flags, matchtag, nodeid, 0, 0, 0, len(topic), 0, 0,
        ),
        topic,
        payload,
    ))


def check_topic(topic: str) -> bytes:
    """A topic as UTF-8, checked against the protocol's limits."""
    if not isinstance(topic, str):
        raise InvalidArgument(f"topic must be a str, not {type(topic).__name__}")
    t = topic.encode("utf-8")
    _check_len("topic", len(t), MAX_TOPIC)
    return t


def check_rank(rank: int) -> int:
    if not isinstance(rank, int) or not 0 <= rank <= ANY:
        raise InvalidArgument(f"rank must be an integer 0..{ANY - 1} or canopy.ANY, not {rank!r}")
    return rank


def to_bytes(payload: bytes | bytearray | memoryview | str) -> bytes:
    """A payload as bytes; ``str`` is encoded as UTF-8."""
    if isinstance(payload, bytes):
        data = payload
    elif isinstance(payload, str):
        data = payload.encode("utf-8")
    elif isinstance(payload, (bytearray, memoryview)):
        data = bytes(payload)
    else:
        raise InvalidArgument(f"payload must be bytes or str, not {type(payload).__name__}")
    if len(data) > MAX_PAYLOAD:
        raise InvalidArgument(
            f"payload is {len(data)} bytes, more than the limit of {MAX_PAYLOAD}; send smaller payloads"
        )
    return data


class FrameDecoder:
    """Reassembles local-connector frames from arbitrary read chunks.

    Oversized frames are rejected from their 8-byte prefix, before any of
    their body is buffered. Any error means the stream is corrupt and must
    be closed.
    """

    __slots__ = ("_buf", "_start")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._start = 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._start:
            if self._start == len(self._buf):
                self._buf.clear()
                self._start = 0
            elif self._start > 65536 and self._start * 2 > len(self._buf):
                del self._buf[: self._start]
                self._start = 0
        self._buf += data

    def pending(self) -> int:
        """Bytes buffered but not yet returned as frames."""
        return len(self._buf) - self._start

    def next_frame(self) -> tuple[Header, bytes] | None:
        """The next complete frame (header, payload), or None if incomplete."""
        buf = self._buf
        s = self._start
        if len(buf) - s < 8:
            return None
        hlen, plen = _FRAME_PREFIX.unpack_from(buf, s)
        if hlen > MAX_HEADER:
            raise ProtocolError(
                f"frame header length {hlen} exceeds {MAX_HEADER}; the peer is not speaking the canopy protocol"
            )
        if plen > MAX_PAYLOAD:
            raise ProtocolError(
                f"frame payload length {plen} exceeds {MAX_PAYLOAD}; the peer is not speaking the canopy protocol"
            )
        end = s + 8 + hlen + plen
        if len(buf) < end:
            return None
        header = _decode(buf, s + 8, hlen)
        payload = bytes(buf[s + 8 + hlen : end])
        self._start = end
        return header, payload


def topic_matches(pattern: str, topic: str) -> bool:
    """Does an event topic match a subscription pattern?

    As the broker does it: a pattern ending in ``*`` matches every topic
    starting with what precedes the ``*`` (so ``*`` matches everything and
    ``job.*`` matches ``job.started``); any other pattern matches exactly.
    """
    if pattern.endswith("*"):
        return topic.startswith(pattern[:-1])
    return pattern == topic
