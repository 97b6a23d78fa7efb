"""The synchronous client.

A :class:`Client` is one connection to one broker. It is not thread-safe:
use one per thread, or the asyncio client (:mod:`canopy.aio`) for many
requests in flight.
"""

from __future__ import annotations

import inspect
import os
import socket
import struct
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, NoReturn

from ._common import (
    DEFAULT_TIMEOUT,
    CurveKeys,
    CurveState,
    Event,
    Message,
    Target,
    check_pattern,
    check_response,
    closed_error,
    decode_seq,
    event_from,
    publish_body,
    refusal,
    resolve_uri,
)
from .errors import CanopyError, ConnectError, Disconnected, InvalidArgument, ProtocolError, Timeout, require_zmq
from .protocol import (
    ANY,
    FLAG_NORESPONSE,
    FrameDecoder,
    Header,
    MsgType,
    check_rank,
    check_topic,
    decode_header,
    encode_frame,
    encode_request_frame,
    encode_request_header,
    to_bytes,
    topic_matches,
)
from .service import (
    SERVICE_ERROR_TOPIC,
    Request,
    check_handler,
    check_namespace,
    failure,
    log,
    parse_json,
    pick_handler,
    response_header,
    service_add_body,
    stray_warning,
)

if TYPE_CHECKING:
    import zmq

Payload = bytes | bytearray | memoryview | str

_READ_CHUNK = 256 * 1024


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


_TIMEVAL = struct.Struct("@ll")
#: How long a request may take to write before the connection is given up.
_SEND_TIMEOUT = 30.0


class _UnixLink:
    """The local connector: a UNIX stream socket carrying frames.

    The socket stays in blocking mode with kernel timeouts (SO_RCVTIMEO,
    SO_SNDTIMEO) rather than Python's socket timeouts, which cost a poll()
    and an ioctl() per call: an RPC is one send() and one recv().
    """

    def __init__(self, path: str, timeout: float | None) -> None:
        self.where = f"local://{path}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.settimeout(None)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(_SEND_TIMEOUT))
        except OSError as e:
            sock.close()
            hint = (
                "is the instance running? (check CANOPY_URI)"
                if isinstance(e, (FileNotFoundError, ConnectionRefusedError))
                else "check the path and its permissions"
            )
            raise ConnectError(
                f"cannot connect to the broker at {path}: {e.strerror or e}; {hint}",
                e.errno,
            ) from None
        self.sock = sock
        self.decoder = FrameDecoder()
        self._rcvtimeo = 0.0  # 0: none (wait forever)
        # One read buffer per connection: recv() of a fresh 256 KiB bytes
        # would cost an mmap, mremap and munmap per message.
        self._rbuf = bytearray(_READ_CHUNK)
        self._rview = memoryview(self._rbuf)

    def send_request(self, topic: bytes, nodeid: int, tag: int, payload: bytes, flags: int = 0) -> None:
        self.send_frame(encode_request_frame(topic, nodeid, tag, payload, flags))

    def send_response(self, token: int, errnum: int, payload: bytes, topic: str) -> None:
        self.send_frame(encode_frame(response_header(token, errnum, topic), payload))

    def send_frame(self, frame: bytes) -> None:
        try:
            self.sock.sendall(frame)
        except (BrokenPipeError, ConnectionResetError):
            # A broker that refuses a connection writes one refusal frame
            # and closes: report that, not the broken pipe.
            try:
                self.recv(0.2)
            except CanopyError as e:
                if not isinstance(e, Timeout):
                    raise
            raise Disconnected(
                f"the broker at {self.where} closed the connection; the instance may have shut down"
            ) from None
        except BlockingIOError:
            raise Disconnected(
                f"the broker at {self.where} did not read a request for {_SEND_TIMEOUT:.0f} s; "
                "the connection is closed (the broker may be stuck)"
            ) from None
        except OSError as e:
            raise Disconnected(f"lost the connection to {self.where}: {e}; the instance may have shut down") from None

    def _set_rcvtimeo(self, left: float | None) -> None:
        """Wait at most about ``left`` seconds in recv(). The kernel value is
        changed only when it is more than 5% off, so a run of RPCs with the
        same timeout sets it once."""
        want = 0.0 if left is None else max(left, 0.001)
        have = self._rcvtimeo
        if want == have or (want and have and have * 0.95 <= want <= have):
            return
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(want))
        self._rcvtimeo = want

    def recv(self, timeout: float | None) -> tuple[Header, bytes]:
        deadline = _deadline(timeout)
        dec = self.decoder
        sock = self.sock
        while True:
            try:
                f = dec.next_frame()
            except ProtocolError as e:
                raise ProtocolError(
                    f"the broker at {self.where} sent a malformed frame: {e.message}; "
                    "the connection is closed (check that the uri names a canopy broker)"
                ) from None
            if f is not None:
                return f
            left = _left(deadline)
            if left is not None and left <= 0:
                raise Timeout("no message from the broker in time")
            self._set_rcvtimeo(left)
            try:
                n = sock.recv_into(self._rbuf)
            except (BlockingIOError, TimeoutError):
                continue  # SO_RCVTIMEO expired: the deadline check above decides
            except InterruptedError:
                continue
            except OSError as e:
                raise Disconnected(
                    f"lost the connection to {self.where}: {e}; the instance may have shut down"
                ) from None
            if not n:
                mid = " in the middle of a frame" if dec.pending() else ""
                raise Disconnected(
                    f"the broker at {self.where} closed the connection{mid}; the instance may have shut down"
                )
            dec.feed(self._rview[:n])

    def timeout_hint(self) -> str:
        return "the target may be down or overloaded"

    def close(self) -> None:
        self._rview.release()
        self.sock.close()


def _timeval(seconds: float) -> bytes:
    sec = int(seconds)
    return _TIMEVAL.pack(sec, int((seconds - sec) * 1e6))


class _ZmqLink:
    """A remote client endpoint: a ZeroMQ DEALER with CURVE."""

    def __init__(self, endpoint: str, keys: CurveKeys) -> None:
        require_zmq()
        import zmq


        if not zmq.has("curve"):
            raise ConnectError(
                f"this pyzmq's libzmq ({zmq.zmq_version()}) has no CURVE; install a pyzmq built with "
                "libsodium (the PyPI wheels are)"
            )
        self.where = endpoint
        self.ctx = zmq.Context()
        self.sock: zmq.Socket[Any] = self.ctx.socket(zmq.DEALER)
        s = self.sock
        s.linger = 0
        s.curve_serverkey = keys.server.encode()
        s.curve_publickey = keys.public.encode()
        s.curve_secretkey = keys.secret.encode()
        self.monitor: zmq.Socket[Any] = s.get_monitor_socket()
        self.state = CurveState(endpoint, keys.public)
        self.poller = zmq.Poller()
        self.poller.register(s, zmq.POLLIN)
        self.poller.register(self.monitor, zmq.POLLIN)
        try:
            s.connect(endpoint)
        except zmq.ZMQError as e:
            self.close()
            raise ConnectError(f"cannot connect to {endpoint}: {e}; check the uri", e.errno) from None

    def send_request(self, topic: bytes, nodeid: int, tag: int, payload: bytes, flags: int = 0) -> None:
        self.send_parts([encode_request_header(topic, nodeid, tag, flags), payload])

    def send_response(self, token: int, errnum: int, payload: bytes, topic: str) -> None:
        self.send_parts([response_header(token, errnum, topic), payload])

    def send_parts(self, parts: list[bytes]) -> None:
        import zmq

        try:
            self.sock.send_multipart(parts, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            # Requests queue until the connection is up; a full queue means it
            # never came up (or the broker stopped reading): fail, don't block.
            raise Timeout(
                f"cannot send to {self.where}: too many requests are queued; {self.state.timeout_hint()}"
            ) from None

    def recv(self, timeout: float | None) -> tuple[Header, bytes]:
        import zmq


        deadline = _deadline(timeout)
        while True:
            left = _left(deadline)
            ms = None if left is None else int(left * 1000 + 0.999)
            ready = dict(self.poller.poll(ms))
            if self.monitor in ready:
                try:
                    while True:
                        frames = self.monitor.recv_multipart(zmq.NOBLOCK)
                        err = self.state.on_event(frames[0])
                        if err is not None:
                            raise err
                except zmq.Again:
                    pass
            if self.sock in ready:
                parts = self.sock.recv_multipart()
                if len(parts) not in (1, 2):
                    raise ProtocolError(
                        f"the broker at {self.where} sent a message of {len(parts)} frames where "
                        "2 (header, payload) were expected; check that the uri names a canopy broker"
                    )
                try:
                    h = decode_header(parts[0])
                except ProtocolError as e:
                    raise ProtocolError(
                        f"the broker at {self.where} sent a malformed header: {e.message}; "
                        "check that the uri names a canopy broker"
                    ) from None
                return h, (parts[1] if len(parts) == 2 else b"")
            if deadline is not None and time.monotonic() >= deadline:
                raise Timeout("no message from the broker in time")

    def timeout_hint(self) -> str:
        return self.state.timeout_hint()

    def close(self) -> None:
        try:
            self.sock.disable_monitor()
        except Exception:
            pass
        self.monitor.close(linger=0)
        self.sock.close(linger=0)
        self.ctx.term()


def _open_link(target: Target, keys: CurveKeys | None, timeout: float | None) -> _UnixLink | _ZmqLink:
    if target.kind == "local":
        return _UnixLink(target.address, timeout)
    return _ZmqLink(target.address, keys if keys is not None else CurveKeys.load())


class Subscription:
    """Events matching a pattern, from :meth:`Client.subscribe`.

    Iterate over it (``for ev in sub``) or call :meth:`get`; close it (or
    use it as a context manager) to unsubscribe.
    """

    def __init__(self, client: Client, pattern: str, timeout: float | None) -> None:
        self.pattern = pattern
        self.timeout = timeout
        self._client = client
        self._queue: deque[Event] = deque()
        self.closed = False

    def get(self, timeout: float | None = None) -> Event:
        """The next event, waiting up to ``timeout`` seconds (None: forever)."""
        if self.closed and not self._queue:
            raise closed_error(f"subscription '{self.pattern}'")
        deadline = _deadline(timeout)
        while not self._queue:
            self._client._pump(deadline, f"no event matching '{self.pattern}' within {timeout} s")
        return self._queue.popleft()

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        if self.closed and not self._queue:
            raise StopIteration
        return self.get(self.timeout)

    def close(self) -> None:
        """Unsubscribe (at the broker, once no other subscription of this
        client has the same pattern)."""
        if not self.closed:
            self.closed = True
            self._client._unsubscribe(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<canopy.Subscription {self.pattern!r}{' closed' if self.closed else ''}>"


class Client:
    """A synchronous connection to a broker. Make one with :func:`connect`."""

    def __init__(self, link: _UnixLink | _ZmqLink, target: Target) -> None:
        self._link: _UnixLink | _ZmqLink | None = link
        self.target = target
        self._tag = 0
        self._subs: list[Subscription] = []
        self._error: CanopyError | None = None
        # Requests delivered for the namespaces this client offers, not yet
        # taken by next_request() (they may arrive while an RPC waits).
        self._requests: deque[Request] = deque()
        self._services: dict[str, Service] = {}
        self._stop = False

    @property
    def uri(self) -> str:
        return str(self.target)

    # ----- requests -----

    def _next_tag(self) -> int:
        self._tag = self._tag + 1 if self._tag < 0xFFFFFFFF else 1
        return self._tag

    def _live(self) -> _UnixLink | _ZmqLink:
        if self._error is not None:
            raise self._error.with_traceback(None)
        if self._link is None:
            raise closed_error(self.uri)
        return self._link

    def _fail(self, e: CanopyError) -> NoReturn:
        """A fatal connection error: remember it, close, re-raise."""
        self._error = e
        if self._link is not None:
            self._link.close()
            self._link = None
        raise e

    def request(
        self,
        topic: str,
        payload: Payload = b"",
        rank: int = ANY,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> Message:
        """Like :meth:`rpc`, returning the whole response (header and payload)."""
        t = check_topic(topic)
        data = to_bytes(payload)
        check_rank(rank)
        link = self._live()
        tag = self._next_tag()
        deadline = _deadline(timeout)
        try:
            link.send_request(t, rank, tag, data)
        except Timeout as e:
            e.topic = topic
            raise
        except (Disconnected, ProtocolError, ConnectError) as e:
            self._fail(e)
        while True:
            try:
                h, p = link.recv(_left(deadline))
            except Timeout:
                where = "" if rank == ANY else f" from rank {rank}"
                raise Timeout(
                    f"no response{where} within {timeout} s; {link.timeout_hint()}", topic=topic, rank=None
                ) from None
            except CanopyError as e:
                self._fail(e)
            if h.type == MsgType.RESPONSE:
                # service.error first: its matchtag is one of the broker's
                # tokens, which may equal one of our own tags.
                if h.topic == SERVICE_ERROR_TOPIC:
                    stray_warning(h, p)
                    continue
                if h.matchtag == tag:
                    return check_response(topic, Message(h, p))
                if h.matchtag == 0 and h.errnum:
                    self._fail(refusal(h, p))
                # A late response to a request that timed out: dropped.
            elif h.type == MsgType.EVENT:
                self._deliver(h, p)
            elif h.type == MsgType.REQUEST:
                self._queue_request(h, p)

    def rpc(
        self,
        topic: str,
        payload: Payload = b"",
        rank: int = ANY,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> bytes:
        """Send a request for ``topic`` to ``rank`` (default: the nearest
        broker that offers it) and return the response payload.

        An error response raises :class:`~canopy.CanopyError` with its
        ``errnum`` (e.g. ENOSYS, EHOSTUNREACH) and message; no response
        within ``timeout`` seconds raises :class:`~canopy.Timeout`.
        """
        return self.request(topic, payload, rank, timeout).payload

    def ping(self, rank: int = ANY, payload: Payload = b"", timeout: float | None = DEFAULT_TIMEOUT) -> float:
        """A ``broker.ping`` round trip to ``rank``; returns its time in seconds."""
        data = to_bytes(payload)
        t0 = time.perf_counter()
        got = self.rpc("broker.ping", data, rank, timeout)
        dt = time.perf_counter() - t0
        if got != data:
            raise ProtocolError(f"rank {rank} echoed {len(got)} bytes that differ from the {len(data)} sent")
        return dt

    # ----- events -----

    def publish(self, topic: str, data: Payload = b"", timeout: float | None = DEFAULT_TIMEOUT) -> int:
        """Publish an event through rank 0 (role operator); returns its sequence number."""
        body = publish_body(topic, to_bytes(data))
        return decode_seq(self.rpc("event.pub", body, 0, timeout))

    def subscribe(self, pattern: str, timeout: float | None = None) -> Subscription:
        """Subscribe to events matching ``pattern``: ``*``, ``prefix.*`` or
        an exact topic. Events published after this returns are delivered;
        ``timeout`` bounds each wait when iterating (None: wait forever)."""
        pb = check_pattern(pattern)
        sub = Subscription(self, pattern, timeout)
        self._subs.append(sub)  # before the request: no event is missed
        try:
            self.rpc("event.subscribe", pb, ANY, DEFAULT_TIMEOUT if timeout is None else timeout)
        except BaseException:
            self._subs.remove(sub)
            sub.closed = True
            raise
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        if sub in self._subs:
            self._subs.remove(sub)
        if any(s.pattern == sub.pattern for s in self._subs):
            return
        if self._link is None or self._error is not None:
            return
        self.rpc("event.unsubscribe", sub.pattern, ANY)

    def _deliver(self, h: Header, p: bytes) -> None:
        ev = None
        for s in self._subs:
            if topic_matches(s.pattern, h.topic):
                if ev is None:
                    ev = event_from(h, p)
                s._queue.append(ev)

    def _pump(self, deadline: float | None, timeout_message: str) -> None:
        """Receive and dispatch one message."""
        link = self._live()
        try:
            h, p = link.recv(_left(deadline))
        except Timeout:
            raise Timeout(timeout_message) from None
        except CanopyError as e:
            self._fail(e)
        if h.type == MsgType.EVENT:
            self._deliver(h, p)
        elif h.type == MsgType.REQUEST:
            self._queue_request(h, p)
        elif h.type == MsgType.RESPONSE:
            if h.topic == SERVICE_ERROR_TOPIC:
                stray_warning(h, p)
            elif h.matchtag == 0 and h.errnum:
                self._fail(refusal(h, p))

    def notify(self, topic: str, payload: Payload = b"", rank: int = ANY) -> None:
        """Send a request with NORESPONSE: no response comes back, not even
        an error, and this returns at once."""
        t = check_topic(topic)
        data = to_bytes(payload)
        check_rank(rank)
        link = self._live()
        try:
            link.send_request(t, rank, self._next_tag(), data, FLAG_NORESPONSE)
        except (Disconnected, ProtocolError, ConnectError) as e:
            self._fail(e)

    # ----- services offered by this client -----

    def add_service(
        self,
        namespace: str,
        methods: Mapping[str, str],
        handler: Callable[[Request], Any] | Mapping[str, Callable[[Request], Any]] | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> Service:
        """Offer ``namespace`` on this client's broker (``service.add``).

        ``methods`` maps each method name to the least role a caller needs
        (``user``, ``operator``, ``admin`` or ``owner``); the broker checks
        it before delivering a request. Requests for ``NAMESPACE.METHOD``
        then come to this client: take them with :meth:`next_request`, or
        give a ``handler`` (one callable taking a :class:`Request`, or a
        mapping of method name to one) and run :meth:`serve` or
        :meth:`handle`.

        Raises :class:`~canopy.InvalidArgument` for a bad name or role
        before sending anything, and the broker's refusal otherwise:
        :class:`~canopy.PermissionDenied` (EPERM) for a reserved namespace
        or one you may not register, EEXIST if the rank already offers it,
        EAGAIN for too many namespaces on this connection.
        """
        body = service_add_body(namespace, methods)
        check_handler(namespace, methods, handler)
        if namespace in self._services:
            raise InvalidArgument(f"this client already offers {namespace!r}; remove_service() it first")
        svc = Service(self, namespace, dict(methods), handler)
        # Known before the request: a delivery may follow the answer at once.
        self._services[namespace] = svc
        try:
            reply = parse_json("service.add", self.rpc("service.add", body, ANY, timeout))
        except BaseException:
            self._services.pop(namespace, None)
            svc.removed = True
            raise
        svc.rank = reply.get("rank") if isinstance(reply, dict) else None
        return svc

    def remove_service(self, namespace: str, timeout: float | None = DEFAULT_TIMEOUT) -> int:
        """Stop offering ``namespace`` (``service.remove``). Returns how many
        of its requests were still unanswered: the broker answered them
        ENOSYS, and they are dropped here."""
        check_namespace(namespace)
        svc = self._services.get(namespace)
        if svc is not None:
            # Still known while the broker removes it: what it delivers
            # meanwhile is dropped here (the broker answers it ENOSYS).
            svc.removed = True
        try:
            reply = parse_json("service.remove", self.rpc("service.remove", json_body(namespace=namespace), ANY, timeout))
        finally:
            if svc is not None:
                if self._services.get(namespace) is svc:
                    del self._services[namespace]
                self._requests = deque(r for r in self._requests if r._service is not svc)
        failed = reply.get("failed", 0) if isinstance(reply, dict) else 0
        return int(failed)

    def list_services(self, rank: int = ANY, timeout: float | None = DEFAULT_TIMEOUT) -> dict[str, Any]:
        """``service.list`` of ``rank`` (default: this client's broker):
        ``{"rank": R, "services": [{"namespace", "provider", "methods",
        "outstanding"}, ...]}``."""
        reply = parse_json("service.list", self.rpc("service.list", b"", rank, timeout))
        if not isinstance(reply, dict):
            raise ProtocolError("service.list answered JSON that is not an object; the broker does not speak this protocol version")
        return reply

    @property
    def services(self) -> dict[str, Service]:
        """The namespaces this client offers, by name."""
        return dict(self._services)

    def _queue_request(self, h: Header, p: bytes) -> None:
        svc = self._services.get(h.topic.partition(".")[0])
        if svc is not None and svc.removed:
            return  # being removed: the broker answers it ENOSYS
        self._requests.append(Request(h, p, self._send_response, svc))

    def _send_response(self, token: int, errnum: int, payload: bytes, topic: str) -> None:
        link = self._live()
        try:
            link.send_response(token, errnum, payload, topic)
        except (Disconnected, ProtocolError, ConnectError) as e:
            self._fail(e)

    def send_response(self, token: int, payload: Payload = b"", errnum: int = 0, topic: str = "") -> None:
        """Low level: send a response with matchtag ``token``. Use
        :meth:`Request.respond` instead; a token that is not an unanswered
        delivery to this connection gets a ``service.error`` back (logged
        as a warning on the ``canopy`` logger)."""
        self._send_response(token, errnum, to_bytes(payload), topic)

    def next_request(self, timeout: float | None = None) -> Request:
        """The next request delivered to this client (for a namespace it
        offers), waiting up to ``timeout`` seconds (None: forever); raises
        :class:`~canopy.Timeout` if none comes. Answer it with
        :meth:`Request.respond` or :meth:`Request.fail`."""
        deadline = _deadline(timeout)
        while not self._requests:
            self._pump(deadline, f"no request within {timeout} s")
        return self._requests.popleft()

    def dispatch(self, req: Request) -> None:
        """Run the handler of ``req``'s namespace and answer with what it
        returns, or with the errno of the :class:`~canopy.ServiceError` it
        raises (other exceptions: EIO, logged). A request for a namespace
        without a handler is answered ENOSYS."""
        svc = req._service
        handler = pick_handler(svc.handler, req.method) if svc is not None else None
        if handler is None:
            if not req.answered:
                req.fail(38, f"no handler for {req.topic} in this provider; give add_service() a handler")
            return
        try:
            result = handler(req)
            if inspect.isawaitable(result):
                close = getattr(result, "close", None)
                if close is not None:
                    close()
                raise InvalidArgument(
                    f"the handler of {req.topic} is a coroutine function: serve it with canopy.aio, "
                    "or make it a plain function"
                )
            if not req.answered:
                req.respond(result)
        except (KeyboardInterrupt, SystemExit):
            if not req.answered:
                req.fail(38, f"service {req.namespace} is shutting down; retry elsewhere")
            raise
        except Exception as e:
            if req.answered:
                log.error("the handler of %s raised %s after answering", req.topic, type(e).__name__, exc_info=e)
                return
            errnum, message = failure(req, e)
            req.fail(errnum, message)

    def handle(self, timeout: float | None = None) -> Request:
        """Wait up to ``timeout`` seconds for one request, dispatch it to its
        handler and answer; returns the request."""
        req = self.next_request(timeout)
        self.dispatch(req)
        return req

    def serve(
        self,
        namespace: str | None = None,
        methods: Mapping[str, str] | None = None,
        handler: Callable[[Request], Any] | Mapping[str, Callable[[Request], Any]] | None = None,
    ) -> None:
        """Offer ``namespace`` (as :meth:`add_service`, if given) and handle
        requests, one at a time, until :meth:`stop` or :meth:`close` is
        called (from a handler), or Ctrl-C (KeyboardInterrupt). Then the
        namespace this call added is removed and serve returns. Without
        arguments, serves the namespaces already added."""
        added: Service | None = None
        if namespace is not None:
            if methods is None or handler is None:
                raise InvalidArgument("serve(namespace, methods, handler): give the methods and a handler too")
            added = self.add_service(namespace, methods, handler)
        elif not self._services:
            raise InvalidArgument("this client offers no service: call serve(namespace, methods, handler)")
        self._stop = False
        try:
            while not self._stop and self._link is not None:
                self.dispatch(self.next_request())
        except KeyboardInterrupt:
            pass
        finally:
            self._stop = False
            if added is not None and not added.removed and self._link is not None and self._error is None:
                try:
                    added.remove(timeout=2.0)
                except CanopyError:
                    pass

    def stop(self) -> None:
        """Make :meth:`serve` return once the request being handled is answered."""
        self._stop = True

    # ----- lifetime -----

    def close(self) -> None:
        """Close the connection; subscriptions end."""
        for s in self._subs:
            s.closed = True
        self._subs.clear()
        # The broker ends this connection's registrations and answers what
        # was delivered but not answered ENOSYS.
        for svc in self._services.values():
            svc.removed = True
        self._services.clear()
        self._requests.clear()
        if self._link is not None:
            self._link.close()
            self._link = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        link = getattr(self, "_link", None)
        if link is not None:
            try:
                link.close()
            except Exception:
                pass

    def __repr__(self) -> str:
        state = "closed" if self._link is None else "open"
        return f"<canopy.Client {self.uri} {state}>"


class Service:
    """A namespace this client offers, from :meth:`Client.add_service`.

    ``rank`` is the broker that offers it. Use it as a context manager, or
    call :meth:`remove`, to stop offering it.
    """

    def __init__(self, client: Client, namespace: str, methods: dict[str, str], handler: Any) -> None:
        self.client = client
        self.namespace = namespace
        self.methods = methods
        self.handler = handler
        self.rank: int | None = None
        self.removed = False

    def remove(self, timeout: float | None = DEFAULT_TIMEOUT) -> int:
        """``service.remove``; returns how many requests were still unanswered."""
        if self.removed:
            return 0
        return self.client.remove_service(self.namespace, timeout)

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.removed and self.client._link is not None and self.client._error is None:
            self.remove()
        self.removed = True

    def __repr__(self) -> str:
        state = " removed" if self.removed else ""
        return f"<canopy.Service {self.namespace} on rank {self.rank} methods={self.methods}{state}>"


def json_body(**fields: Any) -> bytes:
    import json

    return json.dumps(fields, separators=(",", ":")).encode()


def connect(
    uri: str | os.PathLike[str] | None = None,
    *,
    key: str | os.PathLike[str] | None = None,
    server_key: str | None = None,
    timeout: float | None = 10.0,
) -> Client:
    """Connect to a broker: ``uri``, else ``CANOPY_URI``.

    ``local://PATH`` is the broker's local connector on this host.
    ``tcp://HOST:PORT`` is a broker's remote client endpoint, with CURVE:
    your secret certificate ``key`` (default ``CANOPY_KEY``) and the
    broker's public key ``server_key``, 40 Z85 characters or a certificate
    file (default ``CANOPY_SERVER_KEY``). ``timeout`` bounds the local
    connect; over tcp the connection is made in the background and a
    refused key is reported by the first request.
    """
    target = resolve_uri(uri)
    keys = None
    if target.kind == "tcp":
        keys = CurveKeys.load(key, server_key)
    return Client(_open_link(target, keys, timeout), target)
