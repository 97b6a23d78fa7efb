"""What the synchronous and asyncio clients share: URIs, keys, messages."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Literal

from .certs import check_key, load_secret_certificate, server_key as _server_key
from .errors import EPERM, CanopyError, InvalidArgument, PermissionDenied, ProtocolError, errname, from_response
from .protocol import Header

URI_ENV = "CANOPY_URI"
KEY_ENV = "CANOPY_KEY"
SERVER_KEY_ENV = "CANOPY_SERVER_KEY"
KEX_ENV = "CANOPY_KEX"

#: Seconds an RPC waits for its response unless told otherwise.
DEFAULT_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class Target:
    """Where a URI points: a local UNIX socket path or a tcp:// endpoint."""

    kind: Literal["local", "tcp"]
    address: str

    def __str__(self) -> str:
        return f"local://{self.address}" if self.kind == "local" else self.address


#: The local connector of this host's system-instance broker, used when
#: neither a uri nor ``CANOPY_URI`` is given.
SYSTEM_LOCAL = "/run/canopy/local"


def resolve_uri(uri: str | os.PathLike[str] | None = None) -> Target:
    """Resolve a URI, or ``CANOPY_URI`` when none is given.

    ``local://PATH`` (or a bare absolute path) is a broker's local
    connector on this host; ``tcp://HOST:PORT`` a broker's remote client
    endpoint (CURVE).
    """
    if uri is None:
        uri = os.environ.get(URI_ENV)
        if not uri and os.path.exists(SYSTEM_LOCAL):
            # This host's system-instance broker (run with --rundir /run/canopy).
            uri = "local://" + SYSTEM_LOCAL
        if not uri:
            raise InvalidArgument(
                "no broker given: pass a uri or set CANOPY_URI "
                "(canopy start sets it for the command it runs, and prints it)"
            )
    u = os.fspath(uri)
    if u.startswith("local://"):
        path = u[len("local://") :]
        if not path:
            raise InvalidArgument(f"uri '{u}' names no socket: use local:///PATH/TO/local-RANK")
        return Target("local", path)
    if u.startswith("/"):
        return Target("local", u)
    if u.startswith("tcp://"):
        hostport = u[len("tcp://") :]
        host, sep, port = hostport.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise InvalidArgument(f"bad uri '{u}': use tcp://HOST:PORT")
        return Target("tcp", u)
    raise InvalidArgument(f"unsupported uri '{u}': use local://PATH or tcp://HOST:PORT")


@dataclass(frozen=True)
class CurveKeys:
    """The keys of a tcp:// connection, as 40-character Z85 strings."""

    public: str
    secret: str
    server: str

    def __repr__(self) -> str:
        return f"CurveKeys(public={self.public!r}, secret=<redacted>, server={self.server!r})"

    @classmethod
    def load(
        cls,
        key: str | os.PathLike[str] | None = None,
        server_key: str | os.PathLike[str] | None = None,
    ) -> CurveKeys:
        """From a secret certificate file (default ``CANOPY_KEY``) and the
        broker's public key: 40 Z85 characters or a certificate file
        (default ``CANOPY_SERVER_KEY``)."""
        if os.environ.get(KEX_ENV):
            raise InvalidArgument(
                "CANOPY_KEX is set, asking for Kerberos (gssapi), which the python client "
                "does not support yet: unset CANOPY_KEX and use CANOPY_KEY and CANOPY_SERVER_KEY, "
                "or use the canopy command-line tools"
            )
        if key is None:
            key = os.environ.get(KEY_ENV)
            if not key:
                raise InvalidArgument(
                    "a tcp:// uri needs your secret certificate: set CANOPY_KEY=FILE "
                    "or pass key= (make one with canopy keygen)"
                )
        if server_key is None:
            server_key = os.environ.get(SERVER_KEY_ENV)
            if not server_key:
                raise InvalidArgument(
                    "a tcp:// uri needs the broker's public key: set CANOPY_SERVER_KEY (or pass "
                    "server_key=) to its 40 Z85 characters or its certificate file "
                    "(canopy overlay status --json shows it as broker.public_key)"
                )
        cert = load_secret_certificate(key)
        assert cert.secret_key is not None
        return cls(cert.public_key, cert.secret_key, _server_key(os.fspath(server_key)))

    @classmethod
    def from_z85(cls, public: str, secret: str, server: str) -> CurveKeys:
        return cls(
            check_key(public, "public key"),
            check_key(secret, "secret key"),
            check_key(server, "server key"),
        )


@dataclass(frozen=True, slots=True)
class Message:
    """A message from a broker: its decoded header and payload."""

    header: Header
    payload: bytes


@dataclass(frozen=True, slots=True)
class Event:
    """An event: its topic, its sequence number (assigned by rank 0), its
    data, the principal that published it, and rank 0's epoch (sequence
    numbers compare only within an epoch)."""

    topic: str
    seq: int
    data: bytes
    sender: str
    epoch: int = 0
    roles: int = 0


def event_from(h: Header, payload: bytes) -> Event:
    return Event(h.topic, h.seq, payload, h.userid, h.nodeid, h.roles)


#: Topic of the frame a broker sends a client whose access a reload revoked.
REVOKED_TOPIC = "access.revoked"


def refusal(h: Header, payload: bytes) -> CanopyError:
    """A response with matchtag 0 and an errnum: the broker refused this
    connection (EPERM; EAGAIN when too many connections are waiting for an
    access decision) or revoked its access. Nothing more will come on it."""
    text = payload.decode("utf-8", "replace")
    if h.topic == REVOKED_TOPIC:
        return PermissionDenied(
            f"the broker revoked this connection's access: {text or 'permission denied'}; "
            "ask its admin, then connect again"
        )
    if h.errnum == EPERM:
        return PermissionDenied(f"the broker refused this connection: {text or 'permission denied'}")
    return CanopyError(
        f"the broker refused this connection: {text or errname(h.errnum)}; connect again", h.errnum
    )


def check_response(topic: str, msg: Message) -> Message:
    h = msg.header
    if h.errnum:
        raise from_response(topic, h.nodeid, h.errnum, msg.payload)
    return msg


def decode_seq(payload: bytes) -> int:
    if len(payload) != 8:
        raise ProtocolError(
            f"event.pub answered {len(payload)} bytes where a u64 sequence number was expected; "
            "the broker is not speaking this protocol version"
        )
    return int.from_bytes(payload, "big")


def publish_body(topic: str, data: bytes) -> bytes:
    t = topic.encode("utf-8")
    if not 1 <= len(t) <= 255:
        raise InvalidArgument(f"event topic must be 1 to 255 bytes, not {len(t)}")
    return struct.pack(">H", len(t)) + t + data


def check_pattern(pattern: str) -> bytes:
    if not isinstance(pattern, str) or not pattern:
        raise InvalidArgument("a subscription pattern is '*', 'prefix.*' or an exact topic, not empty")
    return pattern.encode("utf-8")


def closed_error(where: str) -> CanopyError:
    from .errors import Disconnected

    return Disconnected(f"the connection to {where} is closed; connect again")


# libzmq monitor events (zmq.h).
EVENT_CONNECTED = 0x0001
EVENT_DISCONNECTED = 0x0200
EVENT_HANDSHAKE_FAILED_NO_DETAIL = 0x0800
EVENT_HANDSHAKE_SUCCEEDED = 0x1000
EVENT_HANDSHAKE_FAILED_PROTOCOL = 0x2000
EVENT_HANDSHAKE_FAILED_AUTH = 0x4000


class CurveState:
    """What the monitor of a tcp:// connection has seen so far."""

    def __init__(self, endpoint: str, public: str) -> None:
        self.endpoint = endpoint
        self.public = public
        self.connected = False
        self.handshaken = False

    def on_event(self, frame: bytes) -> CanopyError | None:
        """Digest one monitor event; return the error it means, if any."""
        if len(frame) < 2:
            return None
        ev = struct.unpack_from("<H", frame)[0]
        if ev == EVENT_CONNECTED:
            self.connected = True
        elif ev == EVENT_HANDSHAKE_SUCCEEDED:
            self.handshaken = True
        elif ev == EVENT_HANDSHAKE_FAILED_AUTH:
            return PermissionDenied(
                f"the broker at {self.endpoint} refused this key (principal curve:{self.public}); "
                "ask its admin to allow it (canopy start --allow curve:KEY=user, or the policy file)"
            )
        elif ev in (EVENT_HANDSHAKE_FAILED_NO_DETAIL, EVENT_HANDSHAKE_FAILED_PROTOCOL):
            from .errors import ConnectError

            return ConnectError(
                f"the CURVE handshake with {self.endpoint} failed; check that CANOPY_SERVER_KEY "
                "is this broker's public key (canopy overlay status --json: broker.public_key)"
            )
        return None

    def timeout_hint(self) -> str:
        if self.handshaken:
            return "the target may be down or overloaded"
        if self.connected:
            return (
                f"connected to {self.endpoint} but the CURVE handshake never completed; check that "
                "CANOPY_SERVER_KEY is this broker's public key"
            )
        return (
            f"could not connect to {self.endpoint}; check the address and that rank 0 was started "
            "with --listen-clients"
        )
