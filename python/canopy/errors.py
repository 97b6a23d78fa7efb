"""Errors raised by the canopy client.

Every error is a :class:`CanopyError` with an ``errnum`` (a Linux errno
value, as carried in the protocol's ``errnum`` field) and a ``message``
that says what to do. Error *responses* from a broker raise
:class:`CanopyError` (or :class:`PermissionDenied` for EPERM) with the
``topic`` and the ``rank`` that answered; problems on this side of the
connection raise the subclasses below.
"""

from __future__ import annotations

from typing import Any

# Linux errno values (the wire carries Linux values whatever the client's
# platform, so these are not taken from the stdlib errno module).
EPERM = 1
ENOENT = 2
EIO = 5
EAGAIN = 11
EEXIST = 17
EINVAL = 22
ENOSYS = 38
EPROTO = 71
EMSGSIZE = 90
ECONNRESET = 104
ETIMEDOUT = 110
ECONNREFUSED = 111
EHOSTUNREACH = 113

_NAMES = {
    0: "success",
    EPERM: "EPERM",
    ENOENT: "ENOENT",
    EIO: "EIO",
    EAGAIN: "EAGAIN",
    EEXIST: "EEXIST",
    EINVAL: "EINVAL",
    ENOSYS: "ENOSYS",
    EPROTO: "EPROTO",
    EMSGSIZE: "EMSGSIZE",
    ECONNRESET: "ECONNRESET",
    ETIMEDOUT: "ETIMEDOUT",
    ECONNREFUSED: "ECONNREFUSED",
    EHOSTUNREACH: "EHOSTUNREACH",
    # Not sent by brokers today, but named for completeness.
    3: "ESRCH",
    4: "EINTR",
    12: "ENOMEM",
    13: "EACCES",
    16: "EBUSY",
    19: "ENODEV",
    28: "ENOSPC",
    34: "ERANGE",
    61: "ENODATA",
    75: "EOVERFLOW",
    95: "EOPNOTSUPP",
    107: "ENOTCONN",
    125: "ECANCELED",
}


def errname(errnum: int) -> str:
    """The symbolic name of a (Linux) error number, e.g. ``EHOSTUNREACH``."""
    return _NAMES.get(errnum, f"errno {errnum}")


class CanopyError(Exception):
    """An error from a broker, or on the way to one.

    ``errnum`` is a Linux errno value (``errname`` gives its name),
    ``message`` says what happened and what to do. For error responses,
    ``topic`` is the request's topic and ``rank`` the rank that answered.
    """

    default_errnum = 0

    def __init__(
        self,
        message: str,
        errnum: int | None = None,
        *,
        topic: str | None = None,
        rank: int | None = None,
    ) -> None:
        self.errnum: int = self.default_errnum if errnum is None else errnum
        self.message: str = message
        self.topic: str | None = topic
        self.rank: int | None = rank
        super().__init__(str(self))

    @property
    def errname(self) -> str:
        return errname(self.errnum)

    def __str__(self) -> str:
        if self.topic is not None:
            where = f"{self.topic} failed"
            if self.rank is not None:
                where += f" on rank {self.rank}"
            return f"{where}: {self.errname}: {self.message}"
        return f"{self.errname}: {self.message}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, errnum={self.errnum}, topic={self.topic!r}, rank={self.rank!r})"

    def __reduce__(self) -> tuple[Any, ...]:  # keep errnum etc. through pickling
        return (
            _rebuild,
            (type(self), self.message, self.errnum, self.topic, self.rank),
        )


def _rebuild(cls, message, errnum, topic, rank):  # type: ignore[no-untyped-def]
    return cls(message, errnum, topic=topic, rank=rank)


class PermissionDenied(CanopyError, PermissionError):
    """EPERM: the broker refused the connection, the key, or a role."""

    default_errnum = EPERM


class ProtocolError(CanopyError):
    """EPROTO: the peer sent bytes that are not the canopy protocol.

    The connection is closed; every request in flight on it fails with this
    error.
    """

    default_errnum = EPROTO


class InvalidArgument(CanopyError, ValueError):
    """EINVAL: a bad URI, key, topic or payload given to the client."""

    default_errnum = EINVAL


class ConnectError(CanopyError, ConnectionError):
    """The broker could not be reached (errnum from the operating system)."""

    default_errnum = ECONNREFUSED


class Disconnected(CanopyError, ConnectionError):
    """ECONNRESET: the broker closed the connection (or it was closed here)."""

    default_errnum = ECONNRESET


class Timeout(CanopyError, TimeoutError):
    """ETIMEDOUT: no response within the timeout."""

    default_errnum = ETIMEDOUT


class ServiceError(CanopyError):
    """Raised by a service handler to refuse a request with its own errno.

    ``ServiceError(errnum, message)``: the caller gets a response with that
    ``errnum`` (a Linux errno value, e.g. ``canopy.ENOENT``) and ``message``
    as its payload, and raises :class:`CanopyError` with both.
    """

    default_errnum = EINVAL

    def __init__(self, errnum: int, message: str = "", *, topic: str | None = None, rank: int | None = None) -> None:
        if isinstance(errnum, bool) or not isinstance(errnum, int) or not 0 < errnum < (1 << 32):
            raise TypeError(
                f"ServiceError(errnum, message): errnum must be a non-zero errno value such as "
                f"canopy.ENOENT, not {errnum!r}"
            )
        super().__init__(message or errname(errnum), errnum, topic=topic, rank=rank)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_service_error, (self.errnum, self.message, self.topic, self.rank))


def _rebuild_service_error(errnum, message, topic, rank):  # type: ignore[no-untyped-def]
    return ServiceError(errnum, message, topic=topic, rank=rank)


def require_zmq() -> Any:
    """pyzmq, or a clear error: only tcp:// connections need it."""
    try:
        import zmq
    except ImportError:
        raise ConnectError(
            "a tcp:// uri (CURVE) needs pyzmq, which is not installed: pip install pyzmq "
            "(local:// uris need only the standard library)"
        ) from None
    return zmq


def from_response(topic: str, rank: int, errnum: int, payload: bytes) -> CanopyError:
    """The exception for an error response."""
    message = payload.decode("utf-8", "replace") or "(no message)"
    cls = PermissionDenied if errnum == EPERM else CanopyError
    return cls(message, errnum, topic=topic, rank=rank)
