"""The asyncio client.

One connection carries any number of concurrent requests, matched to their
responses by matchtag, and any number of event subscriptions::

    import asyncio, canopy.aio

    async def main():
        async with canopy.aio.connect() as c:
            pongs = await asyncio.gather(*(c.rpc("broker.ping", rank=r) for r in range(4)))
            async with c.subscribe("job.*") as sub:
                await c.publish("job.started", b"42")
                ev = await sub.get(timeout=5)

    asyncio.run(main())
"""

from __future__ import annotations

import asyncio
import inspect
import os
import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Generator, Mapping, Union

from ._common import (
    DEFAULT_TIMEOUT,
    CurveKeys,
    CurveState,
    Event,
    Message,
    Target,
    check_pattern,
    closed_error,
    decode_seq,
    event_from,
    publish_body,
    refusal,
    resolve_uri,
)
from .errors import (
    CanopyError,
    ConnectError,
    Disconnected,
    InvalidArgument,
    ProtocolError,
    Timeout,
    from_response,
    require_zmq,
)
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
    import zmq.asyncio

Payload = bytes | bytearray | memoryview | str
#: A handler takes a Request and returns (or, async, resolves to) the result.
AsyncHandler = Callable[[Request], Union[Awaitable[Any], Any]]

_END = object()
#: Granularity of the shared timers of RPC timeouts of a second or more.
_TICK = 0.05


class _Expired(Exception):
    """A request's timer fired (turned into a Timeout by request())."""


class _UnixProtocol(asyncio.BufferedProtocol):
    """The local connector, read by the event loop into one buffer per
    connection (a fresh 256 KiB bytes per read would cost an mmap, mremap
    and munmap each time)."""

    def __init__(self, client: AsyncClient, where: str) -> None:
        self.client = client
        self.where = where
        self.decoder = FrameDecoder()
        self.transport: asyncio.Transport | None = None
        self.buf = memoryview(bytearray(256 * 1024))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buf

    def buffer_updated(self, nbytes: int) -> None:
        dec = self.decoder
        dec.feed(self.buf[:nbytes])
        on_message = self.client._on_message
        while True:
            try:
                f = dec.next_frame()
            except ProtocolError as e:
                self.client._on_error(
                    ProtocolError(
                        f"the broker at {self.where} sent a malformed frame: {e.message}; "
                        "the connection is closed (check that the uri names a canopy broker)"
                    )
                )
                if self.transport is not None:
                    self.transport.abort()
                return
            if f is None:
                return
            on_message(f[0], f[1])

    def eof_received(self) -> bool:
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        mid = " in the middle of a frame" if self.decoder.pending() else ""
        why = f": {exc}" if exc else ""
        self.client._on_error(
            Disconnected(
                f"the broker at {self.where} closed the connection{mid}{why}; the instance may have shut down"
            )
        )


class _AsyncUnixLink:
    def __init__(self, transport: asyncio.Transport, where: str) -> None:
        self.transport = transport
        self.where = where
        self._loop = asyncio.get_running_loop()
        # Requests made in one turn of the event loop go out in one write.
        self._wbuf: list[bytes] = []

    def send_response(self, token: int, errnum: int, payload: bytes, topic: str) -> None:
        # Answers made in one turn of the loop go out in one write, too.
        if not self._wbuf:
            self._loop.call_soon(self._flush)
        self._wbuf.append(encode_frame(response_header(token, errnum, topic), payload))

    def send_request(
        self, topic: bytes, nodeid: int, tag: int, payload: bytes, alone: bool = False, flags: int = 0
    ) -> None:
        frame = encode_request_frame(topic, nodeid, tag, payload, flags)
        if alone and not self._wbuf:
            # The only request in flight: no one to batch with, send now.
            self.transport.write(frame)
            return
        if not self._wbuf:
            self._loop.call_soon(self._flush)
        self._wbuf.append(frame)

    def _flush(self) -> None:
        buf, self._wbuf = self._wbuf, []
        if not self.transport.is_closing():
            self.transport.write(buf[0] if len(buf) == 1 else b"".join(buf))

    def timeout_hint(self) -> str:
        return "the target may be down or overloaded"

    async def aclose(self) -> None:
        self.transport.close()


class _AsyncZmqLink:
    def __init__(self, client: AsyncClient, endpoint: str, keys: CurveKeys) -> None:
        require_zmq()
        import zmq
        import zmq.asyncio

        if not zmq.has("curve"):
            raise ConnectError(
                f"this pyzmq's libzmq ({zmq.zmq_version()}) has no CURVE; install a pyzmq built with "
                "libsodium (the PyPI wheels are)"
            )
        self.client = client
        self.where = endpoint
        self.ctx = zmq.asyncio.Context()
        self.sock: zmq.asyncio.Socket = self.ctx.socket(zmq.DEALER)
        s = self.sock
        s.linger = 0
        s.curve_serverkey = keys.server.encode()
        s.curve_publickey = keys.public.encode()
        s.curve_secretkey = keys.secret.encode()
        self.monitor: zmq.asyncio.Socket = s.get_monitor_socket()
        self.state = CurveState(endpoint, keys.public)
        try:
            s.connect(endpoint)
        except zmq.ZMQError as e:
            self.monitor.close(linger=0)
            s.close(linger=0)
            self.ctx.term()
            raise ConnectError(f"cannot connect to {endpoint}: {e}; check the uri", e.errno) from None
        self.tasks = [
            asyncio.ensure_future(self._read()),
            asyncio.ensure_future(self._watch()),
        ]

    async def _read(self) -> None:
        try:
            while True:
                parts = await self.sock.recv_multipart()
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
                self.client._on_message(h, parts[1] if len(parts) == 2 else b"")
        except asyncio.CancelledError:
            raise
        except CanopyError as e:
            self.client._on_error(e)
        except Exception as e:  # zmq errors
            self.client._on_error(Disconnected(f"lost the connection to {self.where}: {e}"))

    async def _watch(self) -> None:
        try:
            while True:
                frames = await self.monitor.recv_multipart()
                err = self.state.on_event(frames[0])
                if err is not None:
                    self.client._on_error(err)
                    return
        except asyncio.CancelledError:
            raise
        except Exception:
            return

    def send_request(
        self, topic: bytes, nodeid: int, tag: int, payload: bytes, alone: bool = False, flags: int = 0
    ) -> None:
        self._send_parts([encode_request_header(topic, nodeid, tag, flags), payload])

    def send_response(self, token: int, errnum: int, payload: bytes, topic: str) -> None:
        self._send_parts([response_header(token, errnum, topic), payload])

    def _send_parts(self, parts: list[bytes]) -> None:
        fut: asyncio.Future[Any] = self.sock.send_multipart(parts, copy=False)  # type: ignore[assignment]
        if not fut.done():
            fut.add_done_callback(self._sent)
        else:
            self._sent(fut)

    def _sent(self, fut: asyncio.Future[Any]) -> None:
        if not fut.cancelled() and fut.exception() is not None:
            self.client._on_error(Disconnected(f"cannot send to {self.where}: {fut.exception()}"))

    def timeout_hint(self) -> str:
        return self.state.timeout_hint()

    async def aclose(self) -> None:
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            try:
                await t
            except BaseException:
                pass
        try:
            self.sock.disable_monitor()
        except Exception:
            pass
        self.monitor.close(linger=0)
        self.sock.close(linger=0)
        self.ctx.term()


class AsyncSubscription:
    """Events matching a pattern, from :meth:`AsyncClient.subscribe`.

    Use it as ``async with client.subscribe(p) as sub`` (subscribed when the
    block starts, unsubscribed when it ends), ``sub = await
    client.subscribe(p)``, or directly as ``async for ev in
    client.subscribe(p)`` (subscribed at the first iteration).
    """

    def __init__(self, client: AsyncClient, pattern: str, timeout: float | None) -> None:
        self.pattern = pattern
        self.timeout = timeout
        self._client = client
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._started = False
        self.closed = False

    async def start(self) -> AsyncSubscription:
        """Subscribe at the broker (idempotent)."""
        if not self._started:
            if self.closed:
                raise closed_error(f"subscription '{self.pattern}'")
            self._started = True
            await self._client._subscribe(self)
        return self

    def __await__(self) -> Generator[Any, None, AsyncSubscription]:
        return self.start().__await__()

    async def get(self, timeout: float | None = None) -> Event:
        """The next event, waiting up to ``timeout`` seconds (None: forever).
        Raises :class:`~canopy.Disconnected` once the subscription is closed."""
        await self.start()
        if timeout is None:
            item = await self._queue.get()
        else:
            try:
                item = await asyncio.wait_for(self._queue.get(), timeout)
            except asyncio.TimeoutError:
                raise Timeout(f"no event matching '{self.pattern}' within {timeout} s") from None
        if item is _END:
            self._queue.put_nowait(_END)
            raise closed_error(f"subscription '{self.pattern}'")
        if isinstance(item, CanopyError):
            self._queue.put_nowait(item)
            raise item.with_traceback(None)
        return item  # type: ignore[no-any-return]

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        try:
            return await self.get(self.timeout)
        except Disconnected:
            if self.closed:
                raise StopAsyncIteration from None
            raise

    async def close(self) -> None:
        """Unsubscribe (at the broker, once no other subscription of this
        client has the same pattern); iteration then ends."""
        if not self.closed:
            self.closed = True
            self._queue.put_nowait(_END)
            await self._client._unsubscribe(self)

    async def __aenter__(self) -> AsyncSubscription:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<canopy.aio.AsyncSubscription {self.pattern!r}{' closed' if self.closed else ''}>"


class AsyncClient:
    """An asyncio connection to a broker. Make one with :func:`connect`."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self._link: _AsyncUnixLink | _AsyncZmqLink | None = None
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self._buckets: dict[int, set[int]] = {}
        self._tag = 0
        self._subs: list[AsyncSubscription] = []
        self._error: CanopyError | None = None
        self._loop = asyncio.get_running_loop()
        # Requests for namespaces offered without a handler, for next_request().
        self._requests: asyncio.Queue[Any] = asyncio.Queue()
        self._services: dict[str, AsyncService] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._ended = asyncio.Event()
        self._closing = False

    @property
    def uri(self) -> str:
        return str(self.target)

    # ----- incoming -----

    def _on_message(self, h: Header, p: bytes) -> None:
        t = h.type
        if t == MsgType.RESPONSE:
            # service.error first: its matchtag is one of the broker's
            # tokens, which may equal one of our own tags.
            if h.topic == SERVICE_ERROR_TOPIC:
                stray_warning(h, p)
                return
            fut = self._pending.pop(h.matchtag, None)
            if fut is not None:
                if not fut.done():
                    if h.errnum:
                        fut.set_exception(from_response(h.topic, h.nodeid, h.errnum, p))
                    else:
                        fut.set_result(Message(h, p))
            elif h.matchtag == 0 and h.errnum:
                self._on_error(refusal(h, p))
            # else: a late response to a request that timed out; dropped.
        elif t == MsgType.EVENT:
            ev = None
            for s in self._subs:
                if topic_matches(s.pattern, h.topic):
                    if ev is None:
                        ev = event_from(h, p)
                    s._queue.put_nowait(ev)
        elif t == MsgType.REQUEST:
            self._on_request(h, p)
        # Control messages are not for clients.

    def _on_request(self, h: Header, p: bytes) -> None:
        svc = self._services.get(h.topic.partition(".")[0])
        if svc is not None and svc.removed:
            return  # being removed: the broker answers it ENOSYS
        req = Request(h, p, self._send_response, svc)
        if svc is not None and svc.handler is not None:
            task = self._loop.create_task(self._run(svc, req))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            self._requests.put_nowait(req)

    async def _run(self, svc: AsyncService, req: Request) -> None:
        """One request's handler, in a task of its own."""
        handler = pick_handler(svc.handler, req.method)
        try:
            if handler is None:
                req.fail(38, f"no handler for {req.topic} in this provider; give add_service() one")
                return
            result = handler(req)
            if inspect.isawaitable(result):
                result = await result
            if not req.answered:
                req.respond(result)
        except asyncio.CancelledError:
            if not req.answered and self._error is None:
                req.fail(38, f"service {req.namespace} is shutting down; retry elsewhere")
            raise
        except Exception as e:
            if req.answered or self._error is not None:
                log.error("the handler of %s raised %s", req.topic, type(e).__name__, exc_info=e)
                return
            errnum, message = failure(req, e)
            try:
                req.fail(errnum, message)
            except CanopyError:
                pass

    def _on_error(self, e: CanopyError) -> None:
        """The connection is unusable: fail everything waiting on it."""
        if self._error is not None:
            return
        self._error = e
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(e)
        for s in self._subs:
            s._queue.put_nowait(e)
        self._end_services(e)
        link, self._link = self._link, None
        if link is not None:
            self._loop.create_task(link.aclose())

    # ----- requests -----

    def _next_tag(self) -> int:
        tag = self._tag
        while True:
            tag = tag + 1 if tag < 0xFFFFFFFF else 1
            if tag not in self._pending:
                self._tag = tag
                return tag

    def _live(self) -> _AsyncUnixLink | _AsyncZmqLink:
        if self._error is not None:
            raise self._error.with_traceback(None)
        if self._link is None:
            raise closed_error(self.uri)
        return self._link

    def _expire(self, tag: int, fut: asyncio.Future[Message]) -> None:
        """One request's timer (timeouts under a second)."""
        if self._pending.get(tag) is fut:
            del self._pending[tag]
        if not fut.done():
            fut.set_exception(_Expired())

    def _expire_bucket(self, bucket: int) -> None:
        """Longer timeouts share a timer per 50 ms: a heap entry per RPC
        costs more than the RPC's own work at high rates."""
        for tag in self._buckets.pop(bucket, ()):
            fut = self._pending.pop(tag, None)
            if fut is not None and not fut.done():
                fut.set_exception(_Expired())

    def _timeout_error(self, topic: str, rank: int, timeout: float) -> Timeout:
        link = self._link
        hint = link.timeout_hint() if link is not None else "the connection is closed"
        where = "" if rank == ANY else f" from rank {rank}"
        return Timeout(f"no response{where} within {timeout} s; {hint}", topic=topic)

    async def request(
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
        loop = self._loop
        fut: asyncio.Future[Message] = loop.create_future()
        self._pending[tag] = fut
        handle = None
        bucket = None
        if timeout is not None:
            if timeout < 1.0:
                handle = loop.call_later(timeout, self._expire, tag, fut)
            else:
                # Fires within 50 ms after the deadline.
                bucket = int((loop.time() + timeout) / _TICK) + 1
                tags = self._buckets.get(bucket)
                if tags is None:
                    tags = self._buckets[bucket] = set()
                    loop.call_at(bucket * _TICK, self._expire_bucket, bucket)
                tags.add(tag)
        try:
            link.send_request(t, rank, tag, data, len(self._pending) == 1)
            return await fut
        except _Expired:
            raise self._timeout_error(topic, rank, timeout or 0.0) from None
        finally:
            if handle is not None:
                handle.cancel()
            elif bucket is not None:
                tags = self._buckets.get(bucket)
                if tags is not None:
                    tags.discard(tag)
            if self._pending.get(tag) is fut:
                del self._pending[tag]

    async def rpc(
        self,
        topic: str,
        payload: Payload = b"",
        rank: int = ANY,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> bytes:
        """Send a request for ``topic`` to ``rank`` (default: the nearest
        broker that offers it) and return the response payload. Any number
        may be in flight at once. Errors as for :meth:`canopy.Client.rpc`."""
        return (await self.request(topic, payload, rank, timeout)).payload

    async def ping(self, rank: int = ANY, payload: Payload = b"", timeout: float | None = DEFAULT_TIMEOUT) -> float:
        """A ``broker.ping`` round trip to ``rank``; returns its time in seconds."""
        data = to_bytes(payload)
        t0 = time.perf_counter()
        got = await self.rpc("broker.ping", data, rank, timeout)
        dt = time.perf_counter() - t0
        if got != data:
            raise ProtocolError(f"rank {rank} echoed {len(got)} bytes that differ from the {len(data)} sent")
        return dt

    # ----- events -----

    async def publish(self, topic: str, data: Payload = b"", timeout: float | None = DEFAULT_TIMEOUT) -> int:
        """Publish an event through rank 0 (role operator); returns its sequence number."""
        body = publish_body(topic, to_bytes(data))
        return decode_seq(await self.rpc("event.pub", body, 0, timeout))

    def subscribe(self, pattern: str, timeout: float | None = None) -> AsyncSubscription:
        """Events matching ``pattern`` (``*``, ``prefix.*`` or an exact topic).

        ``async with client.subscribe(p) as sub`` or ``sub = await
        client.subscribe(p)`` subscribes before going on, so that events
        published afterwards are delivered; ``async for ev in
        client.subscribe(p)`` subscribes at the first iteration. ``timeout``
        bounds each wait when iterating (None: wait forever).
        """
        check_pattern(pattern)
        return AsyncSubscription(self, pattern, timeout)

    async def _subscribe(self, sub: AsyncSubscription) -> None:
        self._live()
        self._subs.append(sub)  # before the request: no event is missed
        try:
            await self.rpc("event.subscribe", sub.pattern, ANY, DEFAULT_TIMEOUT if sub.timeout is None else sub.timeout)
        except BaseException:
            if sub in self._subs:
                self._subs.remove(sub)
            sub.closed = True
            raise

    async def _unsubscribe(self, sub: AsyncSubscription) -> None:
        if sub in self._subs:
            self._subs.remove(sub)
        else:
            return
        if any(s.pattern == sub.pattern for s in self._subs):
            return
        if self._link is None or self._error is not None:
            return
        await self.rpc("event.unsubscribe", sub.pattern, ANY)

    def notify(self, topic: str, payload: Payload = b"", rank: int = ANY) -> None:
        """Send a request with NORESPONSE: no response comes back, not even
        an error."""
        t = check_topic(topic)
        data = to_bytes(payload)
        check_rank(rank)
        self._live().send_request(t, rank, self._next_tag(), data, False, FLAG_NORESPONSE)

    # ----- services offered by this client -----

    async def add_service(
        self,
        namespace: str,
        methods: Mapping[str, str],
        handler: AsyncHandler | Mapping[str, AsyncHandler] | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> AsyncService:
        """Offer ``namespace`` on this client's broker (``service.add``); as
        :meth:`canopy.Client.add_service`. With a ``handler`` (a function or
        coroutine function taking a :class:`~canopy.Request`, or a mapping
        of method name to one), each request is handled in a task of its
        own as soon as it arrives, concurrently with the others; without,
        take requests with :meth:`next_request`."""
        body = service_add_body(namespace, methods)
        check_handler(namespace, methods, handler)
        if namespace in self._services:
            raise InvalidArgument(f"this client already offers {namespace!r}; remove_service() it first")
        svc = AsyncService(self, namespace, dict(methods), handler)
        # Known before the request: a delivery may follow the answer at once.
        self._services[namespace] = svc
        try:
            reply = parse_json("service.add", await self.rpc("service.add", body, ANY, timeout))
        except BaseException:
            if self._services.get(namespace) is svc:
                del self._services[namespace]
            svc.removed = True
            raise
        svc.rank = reply.get("rank") if isinstance(reply, dict) else None
        return svc

    async def remove_service(self, namespace: str, timeout: float | None = DEFAULT_TIMEOUT) -> int:
        """Stop offering ``namespace`` (``service.remove``); returns how many
        of its requests were unanswered (the broker answered them ENOSYS)."""
        check_namespace(namespace)
        svc = self._services.get(namespace)
        if svc is not None:
            # Still known while the broker removes it: what it delivers
            # meanwhile is dropped here (the broker answers it ENOSYS), and
            # so is what is queued for it.
            svc.removed = True
            kept = []
            while not self._requests.empty():
                r = self._requests.get_nowait()
                if not (isinstance(r, Request) and r._service is svc):
                    kept.append(r)
            for r in kept:
                self._requests.put_nowait(r)
        body = f'{{"namespace":"{namespace}"}}'.encode()
        try:
            reply = parse_json("service.remove", await self.rpc("service.remove", body, ANY, timeout))
        finally:
            if svc is not None and self._services.get(namespace) is svc:
                del self._services[namespace]
        return int(reply.get("failed", 0)) if isinstance(reply, dict) else 0

    async def list_services(self, rank: int = ANY, timeout: float | None = DEFAULT_TIMEOUT) -> dict[str, Any]:
        """``service.list`` of ``rank`` (default: this client's broker)."""
        reply = parse_json("service.list", await self.rpc("service.list", b"", rank, timeout))
        if not isinstance(reply, dict):
            raise ProtocolError("service.list answered JSON that is not an object; the broker does not speak this protocol version")
        return reply

    @property
    def services(self) -> dict[str, AsyncService]:
        """The namespaces this client offers, by name."""
        return dict(self._services)

    def _send_response(self, token: int, errnum: int, payload: bytes, topic: str) -> None:
        self._live().send_response(token, errnum, payload, topic)

    def send_response(self, token: int, payload: Payload = b"", errnum: int = 0, topic: str = "") -> None:
        """Low level: a response with matchtag ``token``; see
        :meth:`canopy.Client.send_response`."""
        self._send_response(token, errnum, to_bytes(payload), topic)

    async def next_request(self, timeout: float | None = None) -> Request:
        """The next request for a namespace offered without a handler,
        waiting up to ``timeout`` seconds (None: forever)."""
        self._live()
        try:
            item = await asyncio.wait_for(self._requests.get(), timeout)
        except asyncio.TimeoutError:
            raise Timeout(f"no request within {timeout} s") from None
        if isinstance(item, Request):
            return item
        self._requests.put_nowait(item)  # for the next caller too
        if isinstance(item, CanopyError):
            raise item.with_traceback(None)
        raise closed_error(self.uri)

    async def serve(
        self,
        namespace: str | None = None,
        methods: Mapping[str, str] | None = None,
        handler: AsyncHandler | Mapping[str, AsyncHandler] | None = None,
    ) -> None:
        """Offer ``namespace`` with ``handler`` (as :meth:`add_service`) and
        serve it, each request in a task of its own, until the client is
        closed (then return) or the connection fails (then raise). Cancel
        the task that awaits it to stop: the namespace is removed first."""
        added: AsyncService | None = None
        if namespace is not None:
            if methods is None or handler is None:
                raise InvalidArgument("serve(namespace, methods, handler): give the methods and a handler too")
            added = await self.add_service(namespace, methods, handler)
        elif not any(s.handler is not None for s in self._services.values()):
            raise InvalidArgument("this client offers no service with a handler: call serve(namespace, methods, handler)")
        try:
            await self._ended.wait()
        except asyncio.CancelledError:
            if added is not None and not added.removed and self._error is None:
                try:
                    await asyncio.wait_for(added.remove(), 2.0)
                except (CanopyError, asyncio.TimeoutError):
                    pass
            raise
        if not self._closing and self._error is not None:
            raise self._error.with_traceback(None)

    def _end_services(self, e: CanopyError | None) -> None:
        """The connection ended: the broker dropped our registrations."""
        for svc in self._services.values():
            svc.removed = True
        self._services.clear()
        self._requests.put_nowait(e if e is not None else _END)
        for t in list(self._tasks):
            t.cancel()
        self._ended.set()

    # ----- lifetime -----

    async def close(self) -> None:
        """Close the connection: requests in flight fail, subscriptions end,
        handlers still running are cancelled and the broker answers their
        callers ENOSYS."""
        link, self._link = self._link, None
        self._closing = True
        if self._error is None:
            self._error = closed_error(self.uri)
            self._end_services(None)
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(self._error)
        for s in self._subs:
            s.closed = True
            s._queue.put_nowait(_END)
        self._subs.clear()
        if link is not None:
            await link.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        state = "closed" if self._link is None else "open"
        return f"<canopy.aio.AsyncClient {self.uri} {state}>"


class AsyncService:
    """A namespace an :class:`AsyncClient` offers, from
    :meth:`AsyncClient.add_service`; ``async with`` it, or ``await
    remove()``, to stop offering it."""

    def __init__(self, client: AsyncClient, namespace: str, methods: dict[str, str], handler: Any) -> None:
        self.client = client
        self.namespace = namespace
        self.methods = methods
        self.handler = handler
        self.rank: int | None = None
        self.removed = False

    async def remove(self, timeout: float | None = DEFAULT_TIMEOUT) -> int:
        """``service.remove``; returns how many requests were still unanswered."""
        if self.removed:
            return 0
        return await self.client.remove_service(self.namespace, timeout)

    async def __aenter__(self) -> AsyncService:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if not self.removed and self.client._link is not None and self.client._error is None:
            await self.remove()
        self.removed = True

    def __repr__(self) -> str:
        state = " removed" if self.removed else ""
        return f"<canopy.aio.AsyncService {self.namespace} on rank {self.rank} methods={self.methods}{state}>"


class _Connect:
    """What :func:`connect` returns: await it for a client, or use it as
    ``async with canopy.aio.connect() as client`` (closed at the end)."""

    def __init__(self, uri: str | os.PathLike[str] | None, key: str | os.PathLike[str] | None,
                 server_key: str | None, timeout: float | None) -> None:
        self._args = (uri, key, server_key, timeout)
        self._client: AsyncClient | None = None

    def __await__(self) -> Generator[Any, None, AsyncClient]:
        return _open(*self._args).__await__()

    async def __aenter__(self) -> AsyncClient:
        self._client = await _open(*self._args)
        return self._client

    async def __aexit__(self, *exc: object) -> None:
        if self._client is not None:
            await self._client.close()


def connect(
    uri: str | os.PathLike[str] | None = None,
    *,
    key: str | os.PathLike[str] | None = None,
    server_key: str | None = None,
    timeout: float | None = 10.0,
) -> _Connect:
    """Connect to a broker: ``uri``, else ``CANOPY_URI``; as
    :func:`canopy.connect`, for asyncio. ``client = await connect()``, or
    ``async with connect() as client:``."""
    return _Connect(uri, key, server_key, timeout)


async def _open(
    uri: str | os.PathLike[str] | None,
    key: str | os.PathLike[str] | None,
    server_key: str | None,
    timeout: float | None,
) -> AsyncClient:
    target = resolve_uri(uri)
    client = AsyncClient(target)
    loop = asyncio.get_running_loop()
    if target.kind == "local":
        path = target.address
        try:
            transport, _ = await asyncio.wait_for(
                loop.create_unix_connection(lambda: _UnixProtocol(client, str(target)), path), timeout
            )
        except asyncio.TimeoutError:
            raise ConnectError(f"cannot connect to the broker at {path}: timed out; is the instance running?") from None
        except OSError as e:
            hint = (
                "is the instance running? (check CANOPY_URI)"
                if isinstance(e, (FileNotFoundError, ConnectionRefusedError))
                else "check the path and its permissions"
            )
            raise ConnectError(
                f"cannot connect to the broker at {path}: {e.strerror or e}; {hint}", e.errno
            ) from None
        assert isinstance(transport, asyncio.Transport)
        client._link = _AsyncUnixLink(transport, str(target))
    else:
        keys = CurveKeys.load(key, server_key)
        client._link = _AsyncZmqLink(client, target.address, keys)
    return client
