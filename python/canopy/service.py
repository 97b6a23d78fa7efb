"""Services offered by clients (docs/protocol.md section 6.1): what the
synchronous and asyncio clients share.

A client registers a *namespace* of methods with ``service.add``; its
broker then delivers requests for ``NS.METHOD`` to it, each with a token
(the request's matchtag), the caller's principal and roles. The client
answers with a response carrying that token. This module holds the
:class:`Request` a handler gets, the checks made before ``service.add`` is
sent, and how a handler's result or exception becomes a response.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, Callable, Mapping

from .errors import EIO, EPROTO, CanopyError, InvalidArgument, ServiceError, errname
from .protocol import FLAG_NORESPONSE, MAX_TOPIC, Header, MsgType, Roles, to_bytes

log = logging.getLogger("canopy")

#: Topic of the response a broker sends a provider that answered a token
#: which was not an unanswered delivery to it.
SERVICE_ERROR_TOPIC = "service.error"

#: The roles a method may require, least first.
ROLE_NAMES = ("user", "operator", "admin", "owner")

MAX_METHODS = 256
_NAMESPACE = re.compile(r"[a-z][a-z0-9_-]{0,63}\Z")
_METHOD = re.compile(r"[A-Za-z0-9_.-]{1,128}\Z")


def check_namespace(namespace: str) -> str:
    if not isinstance(namespace, str) or not _NAMESPACE.match(namespace):
        raise InvalidArgument(
            f"bad service namespace {namespace!r}: use 1 to 64 characters of a-z, 0-9, '_' and '-', "
            "starting with a letter (e.g. 'kvs')"
        )
    return namespace


def service_add_body(namespace: str, methods: Mapping[str, str]) -> bytes:
    """The ``service.add`` payload, checked as the broker checks it (except
    for reserved namespaces and the right to register, which only the
    broker knows)."""
    check_namespace(namespace)
    if not isinstance(methods, Mapping) or not methods:
        raise InvalidArgument(
            f"service {namespace!r} needs methods: a mapping of method name to the least role a caller "
            "needs, e.g. {'get': 'user', 'put': 'operator'}"
        )
    if len(methods) > MAX_METHODS:
        raise InvalidArgument(
            f"service {namespace!r} has {len(methods)} methods, more than the {MAX_METHODS} allowed; "
            "split it into several namespaces"
        )
    out: dict[str, str] = {}
    for method, role in methods.items():
        if not isinstance(method, str) or not _METHOD.match(method):
            raise InvalidArgument(
                f"bad method name {method!r} in service {namespace!r}: use 1 to 128 characters of "
                "A-Z, a-z, 0-9, '_', '.' and '-'"
            )
        if len(namespace) + 1 + len(method) > MAX_TOPIC:
            raise InvalidArgument(
                f"method {namespace}.{method} is longer than {MAX_TOPIC} bytes; shorten the method name"
            )
        if role not in ROLE_NAMES:
            raise InvalidArgument(
                f"bad role {role!r} for method {namespace}.{method}: use one of "
                f"{', '.join(repr(r) for r in ROLE_NAMES)} (the least role a caller needs)"
            )
        out[method] = role
    return json.dumps({"namespace": namespace, "methods": out}, separators=(",", ":")).encode()


def parse_json(topic: str, payload: bytes) -> Any:
    try:
        return json.loads(payload)
    except ValueError:
        from .errors import ProtocolError

        raise ProtocolError(
            f"{topic} answered something that is not JSON ({payload[:60]!r}); "
            "the broker does not speak this protocol version"
        ) from None


#: Sends a response: (token, errnum, payload, topic).
Responder = Callable[[int, int, bytes, str], None]


class Request:
    """A request delivered to this client for a namespace it offers.

    ``topic`` is ``NS.METHOD`` (``namespace`` and ``method`` split it);
    ``payload`` the caller's bytes; ``userid`` (also ``principal``) and
    ``roles`` the caller's identity as its broker stamped it, roles for this
    topic; ``nodeid`` the rank that delivered it (this client's broker);
    ``flags`` the caller's flags, and ``token`` the broker's matchtag for
    the answer.

    Answer once with :meth:`respond` or :meth:`fail`, unless
    ``noresponse`` is set: then the caller wants no answer, and both do
    nothing.
    """

    __slots__ = ("topic", "namespace", "method", "payload", "userid", "roles", "nodeid", "flags",
                 "token", "answered", "_send", "_service")

    def __init__(self, header: Header, payload: bytes, send: Responder, service: Any = None) -> None:
        self.topic: str = header.topic
        ns, _, method = header.topic.partition(".")
        self.namespace: str = ns
        self.method: str = method
        self.payload: bytes = payload
        self.userid: str = header.userid
        self.roles: int = header.roles
        self.nodeid: int = header.nodeid
        self.flags: int = header.flags
        self.token: int = header.matchtag
        self.answered: bool = False
        self._send = send
        self._service = service

    @property
    def principal(self) -> str:
        """The caller's principal (``unix:alice``, ``curve:<Z85>``…)."""
        return self.userid

    @property
    def role_names(self) -> list[str]:
        """The caller's roles for this topic, by name."""
        return Roles.names(self.roles)

    @property
    def noresponse(self) -> bool:
        """The caller sent it with NORESPONSE: no answer is sent."""
        return bool(self.flags & FLAG_NORESPONSE)

    def text(self) -> str:
        """The payload as UTF-8 text (invalid bytes fail the request: EPROTO)."""
        try:
            return self.payload.decode("utf-8")
        except UnicodeDecodeError:
            raise ServiceError(EPROTO, f"{self.topic} takes UTF-8 text; send valid UTF-8") from None

    def json(self) -> Any:
        """The payload as JSON (invalid JSON fails the request: EPROTO)."""
        try:
            return json.loads(self.payload) if self.payload else None
        except ValueError as e:
            raise ServiceError(EPROTO, f"{self.topic} takes a JSON payload: {e}; send valid JSON") from None

    def respond(self, result: Any = b"") -> None:
        """Answer with a result: bytes, str (UTF-8), None (empty), or anything
        else ``json.dumps`` takes (dict, list, number…), sent as JSON."""
        self._answer(0, encode_result(result, self.topic))

    def fail(self, errnum: int, message: str = "") -> None:
        """Refuse with an errno of your choice and a message for the caller."""
        if isinstance(errnum, bool) or not isinstance(errnum, int) or not 0 < errnum < (1 << 32):
            raise InvalidArgument(f"fail() needs a non-zero errno value such as canopy.ENOENT, not {errnum!r}")
        self._answer(errnum, (message or errname(errnum)).encode("utf-8"))

    def _answer(self, errnum: int, data: bytes) -> None:
        if self.answered:
            raise InvalidArgument(f"{self.topic} (token {self.token}) was already answered; answer a request once")
        self.answered = True
        if self.noresponse:
            return  # the caller wants no answer; the broker would drop it
        svc = self._service
        if svc is not None and svc.removed:
            # The broker answered it ENOSYS when the namespace was removed.
            log.debug("not answering %s (token %d): service %s was removed", self.topic, self.token, svc.namespace)
            return
        self._send(self.token, errnum, data, self.topic)

    def __repr__(self) -> str:
        flags = " noresponse" if self.noresponse else ""
        return (f"<canopy.Request {self.topic} from {self.userid or '?'} roles={','.join(self.role_names)} "
                f"token={self.token}{flags} {len(self.payload)} bytes>")


def encode_result(result: Any, topic: str) -> bytes:
    if result is None:
        return b""
    if isinstance(result, (bytes, bytearray, memoryview, str)):
        return to_bytes(result)
    try:
        return json.dumps(result, separators=(",", ":")).encode()
    except (TypeError, ValueError) as e:
        raise InvalidArgument(
            f"the handler of {topic} returned a {type(result).__name__}, which is not bytes, str, None "
            f"or JSON-serializable ({e}); return one of those"
        ) from None


def failure(req: Request, exc: BaseException) -> tuple[int, str]:
    """The errnum and message a handler's exception answers with."""
    if isinstance(exc, ServiceError):
        return exc.errnum, exc.message
    if isinstance(exc, CanopyError) and exc.errnum:
        # A request the handler made failed: pass its errno on.
        return exc.errnum, str(exc)
    log.error("the handler of %s raised %s", req.topic, type(exc).__name__, exc_info=exc)
    return EIO, (
        f"service {req.namespace} failed handling {req.topic}: its handler raised {type(exc).__name__}; "
        "see the provider's log"
    )


def stray_warning(h: Header, payload: bytes) -> None:
    """Log a ``service.error`` response: the broker dropped one of our answers."""
    msg = payload.decode("utf-8", "replace") or errname(h.errnum)
    log.warning(
        "the broker dropped a response this client sent (token %d): %s: %s; a handler answered a request "
        "that was not delivered to this connection, was already answered, or wanted no response",
        h.matchtag, errname(h.errnum), msg,
    )


def response_header(token: int, errnum: int, topic: str) -> bytes:
    # The broker ignores every field but matchtag and errnum; the topic helps
    # anyone reading a capture.
    return Header(type=MsgType.RESPONSE, matchtag=token, errnum=errnum, topic=topic).encode()


Handler = Callable[[Request], Any]


def pick_handler(handler: Any, method: str) -> Any:
    """``handler`` is one callable, or a mapping of method name to callable."""
    if isinstance(handler, Mapping):
        return handler.get(method)
    return handler


def check_handler(namespace: str, methods: Mapping[str, str], handler: Any) -> None:
    if handler is None:
        return
    if isinstance(handler, Mapping):
        for m, h in handler.items():
            if m not in methods:
                raise InvalidArgument(f"handler for {namespace}.{m}, which is not among the methods declared; declare it")
            if not callable(h):
                raise InvalidArgument(f"the handler for {namespace}.{m} is not callable")
        missing = [m for m in methods if m not in handler]
        if missing:
            raise InvalidArgument(
                f"no handler for {', '.join(namespace + '.' + m for m in missing)}; give one per declared method"
            )
    elif not callable(handler):
        raise InvalidArgument(
            "a service handler is a callable taking a canopy.Request (or a mapping of method name to one)"
        )
