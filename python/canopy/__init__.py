"""Canopy client: RPCs and events over a Canopy broker overlay.

Synchronous::

    import canopy
    with canopy.connect() as c:                 # CANOPY_URI
        c.ping(rank=3)
        print(c.rpc("broker.ping", b"hi", rank=3))

Offering a service (docs/protocol.md section 6.1)::

    with canopy.connect() as c:
        c.serve("kvs", {"get": "user", "put": "operator"}, lambda req: {"echo": req.text()})

asyncio: :mod:`canopy.aio`. Errors: :class:`CanopyError` (``errnum``,
``errname``, ``message``) and its subclasses.
"""

from ._common import DEFAULT_TIMEOUT, CurveKeys, Event, Message, Target, resolve_uri
from .certs import Certificate, load_public_certificate, load_secret_certificate
from .client import Client, Service, Subscription, connect
from .errors import (
    EAGAIN,
    EEXIST,
    EHOSTUNREACH,
    EIO,
    EINVAL,
    ENOENT,
    ENOSYS,
    EPERM,
    EPROTO,
    ETIMEDOUT,
    CanopyError,
    ConnectError,
    Disconnected,
    InvalidArgument,
    PermissionDenied,
    ProtocolError,
    ServiceError,
    Timeout,
    errname,
)
from .protocol import ANY, FLAG_NORESPONSE, Header, Hop, HopKind, MsgType, Roles
from .service import Request

__version__ = "0.1.0"

__all__ = [
    "ANY",
    "DEFAULT_TIMEOUT",
    "EAGAIN",
    "EEXIST",
    "EHOSTUNREACH",
    "EIO",
    "EINVAL",
    "ENOENT",
    "ENOSYS",
    "EPERM",
    "EPROTO",
    "ETIMEDOUT",
    "CanopyError",
    "Certificate",
    "Client",
    "ConnectError",
    "CurveKeys",
    "Disconnected",
    "Event",
    "FLAG_NORESPONSE",
    "Header",
    "Hop",
    "HopKind",
    "InvalidArgument",
    "Message",
    "MsgType",
    "PermissionDenied",
    "ProtocolError",
    "Request",
    "Roles",
    "Service",
    "ServiceError",
    "Subscription",
    "Target",
    "Timeout",
    "connect",
    "errname",
    "load_public_certificate",
    "load_secret_certificate",
    "resolve_uri",
]
