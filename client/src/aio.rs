//! An asynchronous (tokio) client for a canopy broker, for programs that
//! keep many requests in flight, follow events, or offer a service.
//!
//! [`AsyncClient`] is a cheap, clonable handle to one connection. Its
//! requests are futures matched to their responses by matchtag, so any
//! number may be in flight at once; [`AsyncClient::subscribe`] gives a
//! stream of events; [`AsyncClient::serve`] offers a *namespace* of
//! methods on the broker this client is connected to (docs/protocol.md
//! §6.1): each request the broker delivers is handled in a task of its own
//! and answered with the handler's result.
//!
//! A `local://` connection is a tokio `UnixStream`. A `tcp://` connection
//! (CURVE, or Kerberos through `CANOPY_KEX`) keeps its libzmq sockets on
//! one bridge thread, which talks to the tokio side through channels.
//!
//! The connection stays open while a handle (or a running handler) exists;
//! [`AsyncClient::closed`] waits for it to end.

use crate::{
    check, resolve_uri, ClientError, Msg, Target, TcpKeys, GSS_PRINCIPAL_ENV, GSS_TARGET_ENV,
    KEX_ENV, NODEID_ANY,
};
use canopy_proto::frame::{encode_raw_frame, FrameDecoder, FrameError, MAX_PAYLOAD};
use canopy_proto::{errno, Header, MsgType, Roles, FLAG_NORESPONSE};
use std::collections::HashMap;
use std::future::Future;
use std::io::ErrorKind;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, oneshot, watch};

/// errno EEXIST: a namespace already offered.
pub const EEXIST: u32 = 17;
/// errno EIO: what a caller gets when a handler panicked or was cancelled.
pub const EIO: u32 = 5;
/// Topic of the broker's notice that a provider answered a token that was
/// not an unanswered delivery to it.
pub use crate::SERVICE_ERROR_TOPIC;
/// How many [`ServiceNotice`]s are kept for [`AsyncClient::service_notices`]
/// before newer ones are only logged.
const NOTICE_BACKLOG: usize = 256;
/// How much one read from the local socket may take.
const READ_CHUNK: usize = 64 << 10;

/// A request the broker delivered to a service this client offers.
#[derive(Debug, Clone)]
pub struct Request {
    /// `NS.METHOD`.
    pub topic: String,
    /// `NS`: the namespace this client registered.
    pub namespace: String,
    /// `METHOD`: the topic after `NS.`.
    pub method: String,
    /// The caller's principal, stamped by its broker.
    pub principal: String,
    /// The caller's roles for this topic.
    pub roles: Roles,
    pub payload: Vec<u8>,
    /// The caller's flags; see [`Request::no_response`].
    pub flags: u8,
    /// The rank of the broker that delivered it (the provider's rank).
    pub rank: u32,
}

impl Request {
    /// The caller wants no answer (NORESPONSE); none is sent, whatever the
    /// handler returns.
    pub fn no_response(&self) -> bool {
        self.flags & FLAG_NORESPONSE != 0
    }
}

/// A service's error answer: an errno value and a message for the caller
/// that says what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} ({})", errno_name(*.errnum))]
pub struct ServiceError {
    pub errnum: u32,
    pub message: String,
}

fn errno_name(e: u32) -> &'static str {
    match e {
        EEXIST => "EEXIST",
        EIO => "EIO",
        e => errno::name(e),
    }
}

impl ServiceError {
    pub fn new(errnum: u32, message: impl Into<String>) -> ServiceError {
        ServiceError {
            errnum,
            message: message.into(),
        }
    }
    /// EINVAL: a bad argument.
    pub fn invalid(message: impl Into<String>) -> ServiceError {
        ServiceError::new(errno::EINVAL, message)
    }
    /// ENOENT: no such thing.
    pub fn not_found(message: impl Into<String>) -> ServiceError {
        ServiceError::new(errno::ENOENT, message)
    }
    /// EPROTO: a malformed request body.
    pub fn malformed(message: impl Into<String>) -> ServiceError {
        ServiceError::new(errno::EPROTO, message)
    }
    /// EPERM: the caller may not do this.
    pub fn denied(message: impl Into<String>) -> ServiceError {
        ServiceError::new(errno::EPERM, message)
    }
}

/// The broker's `service.error` notice: this client answered `token`,
/// which was not an unanswered delivery to it (never delivered, already
/// answered, or sent with NORESPONSE).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceNotice {
    pub token: u32,
    pub errnum: u32,
    pub message: String,
}

/// What [`AsyncClient::serve`] registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub namespace: String,
    /// The rank that offers it (the broker this client is connected to).
    pub rank: u32,
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<Vec<u8>, ServiceError>> + Send>>;
type Handler = Arc<dyn Fn(Request) -> BoxFuture + Send + Sync>;

/// Why a connection ended (kept to answer every later call).
#[derive(Debug, Clone)]
enum Ended {
    Closed,
    Refused(String),
    Lost(String),
    Io(ErrorKind, String),
}

impl Ended {
    fn error(&self) -> ClientError {
        match self {
            Ended::Closed => ClientError::Closed,
            Ended::Refused(m) => ClientError::Refused(m.clone()),
            Ended::Lost(ep) => ClientError::Lost(ep.clone()),
            Ended::Io(k, m) => ClientError::Io(std::io::Error::new(*k, m.clone())),
        }
    }
}

type Reply = oneshot::Sender<Result<Msg, ClientError>>;

#[derive(Default)]
struct State {
    pending: HashMap<u32, Reply>,
    ended: Option<Ended>,
}

/// One local subscription: its pattern and where its events go.
struct Sub {
    id: u64,
    pattern: String,
    tx: mpsc::UnboundedSender<Msg>,
}

/// Frames to the transport: encoded header, payload.
type Frame = (Vec<u8>, Vec<u8>);

/// The sending side of a connection.
#[derive(Clone)]
enum Outbox {
    /// Local: frames are written by whoever produces them (no writer
    /// task to hop through), gathered while a batch is open.
    Unix(Arc<UnixOut>),
    /// tcp: to the bridge thread, woken through a socketpair.
    Tcp {
        tx: mpsc::UnboundedSender<Frame>,
        wake: Arc<Wake>,
    },
}

impl Outbox {
    /// Queue a frame without writing it yet (local); tcp sends it.
    fn push(&self, (h, p): Frame) -> bool {
        match self {
            Outbox::Unix(u) => u.push(&h, &p),
            Outbox::Tcp { tx, wake } => {
                if tx.send((h, p)).is_err() {
                    return false;
                }
                wake.wake();
                true
            }
        }
    }

    /// Write what is queued (local).
    fn flush(&self) {
        if let Outbox::Unix(u) = self {
            u.flush();
        }
    }

    fn send(&self, frame: Frame) -> bool {
        let ok = self.push(frame);
        self.flush();
        ok
    }

    /// Queue an answer to the delivery `token`.
    fn respond(&self, topic: &str, token: u32, rank: u32, errnum: u32, payload: Vec<u8>) {
        let mut h = Header::request(topic, rank, token);
        h.msg_type = MsgType::Response;
        h.errnum = errnum;
        let hb = match h.encode() {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!("cannot answer {topic}: {e}");
                return;
            }
        };
        self.push((hb, payload));
    }
}

/// The write side of a local connection. Frames are encoded into `buf`
/// and written at once with a non-blocking write; what the socket does not
/// take is written by the flusher task when it becomes writable.
struct UnixOut {
    wr: tokio::net::unix::OwnedWriteHalf,
    state: Mutex<OutState>,
    /// Wakes the flusher task.
    notify: Arc<tokio::sync::Notify>,
    inner: Weak<Inner>,
}

#[derive(Default)]
struct OutState {
    buf: Vec<u8>,
    /// Bytes of `buf` already written.
    off: usize,
    /// The socket was full: the flusher task writes the rest.
    waiting: bool,
    /// A write failed: nothing more is written.
    failed: bool,
}

impl UnixOut {
    fn push(&self, h: &[u8], p: &[u8]) -> bool {
        let mut st = lock(&self.state);
        if st.failed {
            return false;
        }
        encode_raw_frame(h, p, &mut st.buf);
        true
    }

    fn flush(&self) {
        let err = {
            let mut st = lock(&self.state);
            if st.waiting || st.failed || st.off == st.buf.len() {
                return;
            }
            self.write_locked(&mut st)
        };
        if let Some(e) = err {
            self.fail(&e);
        }
    }

    /// Write without blocking; an error is returned to be reported once
    /// the lock is released.
    fn write_locked(&self, st: &mut OutState) -> Option<std::io::Error> {
        while st.off < st.buf.len() {
            match self.wr.try_write(&st.buf[st.off..]) {
                Ok(n) => st.off += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    st.waiting = true;
                    self.notify.notify_one();
                    return None;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    st.failed = true;
                    st.buf = Vec::new();
                    st.off = 0;
                    return Some(e);
                }
            }
        }
        st.buf.clear();
        st.off = 0;
        if st.buf.capacity() > canopy_proto::frame::KEEP_CAPACITY {
            st.buf = Vec::new();
        }
        None
    }

    fn fail(&self, e: &std::io::Error) {
        if let Some(inner) = self.inner.upgrade() {
            inner.end(io_ended(e));
        }
    }
}

impl Drop for UnixOut {
    fn drop(&mut self) {
        // Lets the flusher task see that it is no longer needed.
        self.notify.notify_one();
    }
}

/// Writes what a full socket did not take, once it is writable again.
async fn unix_flusher(out: Weak<UnixOut>, notify: Arc<tokio::sync::Notify>) {
    loop {
        notify.notified().await;
        let Some(out) = out.upgrade() else {
            return;
        };
        if let Err(e) = out.wr.writable().await {
            out.fail(&e);
            return;
        }
        let err = {
            let mut st = lock(&out.state);
            st.waiting = false;
            out.write_locked(&mut st)
        };
        if let Some(e) = err {
            out.fail(&e);
            return;
        }
    }
}

/// The answers to the requests of one read, written together: the reader
/// holds one token while it dispatches, each handler task holds one until
/// its first poll ends (with its answer queued, or pending); the last token
/// released writes the batch.
struct Batch {
    out: Outbox,
    tokens: AtomicU32,
}

struct BatchToken(Arc<Batch>);

impl Batch {
    fn open(out: &Outbox) -> BatchToken {
        BatchToken(Arc::new(Batch {
            out: out.clone(),
            tokens: AtomicU32::new(1),
        }))
    }
}

impl BatchToken {
    fn another(&self) -> BatchToken {
        self.0.tokens.fetch_add(1, Ordering::AcqRel);
        BatchToken(self.0.clone())
    }
}

impl Drop for BatchToken {
    fn drop(&mut self) {
        if self.0.tokens.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.out.flush();
        }
    }
}

/// A byte on a socketpair, written only when the bridge thread is not
/// already due to look at its queue.
struct Wake {
    pending: AtomicBool,
    tx: std::os::unix::net::UnixStream,
}

impl Wake {
    fn wake(&self) {
        if !self.pending.swap(true, Ordering::SeqCst) {
            use std::io::Write;
            // WouldBlock: the pipe is full of wake-ups already.
            let _ = (&self.tx).write(&[1]);
        }
    }
}

struct Inner {
    out: Outbox,
    state: Mutex<State>,
    next_tag: AtomicU32,
    subs: Mutex<Vec<Sub>>,
    next_sub: AtomicU64,
    services: Mutex<HashMap<String, Handler>>,
    notices_tx: mpsc::Sender<ServiceNotice>,
    notices_rx: Mutex<Option<mpsc::Receiver<ServiceNotice>>>,
    ended_tx: watch::Sender<bool>,
    runtime: tokio::runtime::Handle,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Inner {
    /// The connection ended: fail everything waiting, end the event
    /// streams, and answer every later call with `why`.
    fn end(&self, why: Ended) {
        let pending = {
            let mut st = lock(&self.state);
            if st.ended.is_some() {
                return;
            }
            st.ended = Some(why.clone());
            std::mem::take(&mut st.pending)
        };
        for (_, reply) in pending {
            let _ = reply.send(Err(why.error()));
        }
        lock(&self.subs).clear();
        self.ended_tx.send_replace(true);
    }

    /// Route one message from the broker.
    /// `batch`: the local reader's batch, which writes the answers of a
    /// read's requests together.
    fn dispatch(&self, header: Header, payload: Vec<u8>, batch: Option<&BatchToken>) {
        match header.msg_type {
            MsgType::Response => {
                // Before matching: a service.error's matchtag is one of the
                // broker's tokens, which may equal one of our own tags.
                if header.topic == SERVICE_ERROR_TOPIC {
                    let n = ServiceNotice {
                        token: header.matchtag,
                        errnum: header.errnum,
                        message: String::from_utf8_lossy(&payload).into_owned(),
                    };
                    tracing::warn!(
                        token = n.token,
                        "the broker dropped an answer of this service: {}",
                        n.message
                    );
                    let _ = self.notices_tx.try_send(n);
                    return;
                }
                if header.matchtag == 0 && header.errnum != 0 {
                    // A refusal, or access.revoked: nothing more will come.
                    self.end(Ended::Refused(String::from_utf8_lossy(&payload).into()));
                    return;
                }
                let reply = lock(&self.state).pending.remove(&header.matchtag);
                if let Some(reply) = reply {
                    let _ = reply.send(Ok(Msg { header, payload }));
                }
            }
            MsgType::Event => {
                let subs = lock(&self.subs);
                let targets: Vec<&mpsc::UnboundedSender<Msg>> = subs
                    .iter()
                    .filter(|s| pattern_matches(&s.pattern, &header.topic))
                    .map(|s| &s.tx)
                    .collect();
                // The last one gets the message itself, the others a copy.
                if let Some((last, rest)) = targets.split_last() {
                    let msg = Msg { header, payload };
                    for tx in rest {
                        let _ = tx.send(msg.clone());
                    }
                    let _ = last.send(msg);
                }
            }
            MsgType::Request => self.deliver(header, payload, batch),
            MsgType::Control => {}
        }
    }

    /// A request for a service of ours: handle it in a task of its own.
    fn deliver(&self, h: Header, payload: Vec<u8>, batch: Option<&BatchToken>) {
        let noresp = h.flags & FLAG_NORESPONSE != 0;
        let (ns, method) = match h.topic.split_once('.') {
            Some((ns, m)) => (ns.to_string(), m.to_string()),
            None => (h.topic.clone(), String::new()),
        };
        let handler = lock(&self.services).get(&ns).cloned();
        let Some(handler) = handler else {
            if !noresp {
                self.out.respond(
                    &h.topic,
                    h.matchtag,
                    h.nodeid,
                    errno::ENOSYS,
                    format!("this client does not serve {ns} (any more); retry, another provider may offer it").into_bytes(),
                );
                if batch.is_none() {
                    self.out.flush();
                }
            }
            return;
        };
        let mut answer = Answer {
            out: self.out.clone(),
            topic: h.topic.clone(),
            token: h.matchtag,
            rank: h.nodeid,
            noresp,
            done: false,
        };
        let req = Request {
            topic: h.topic,
            namespace: ns,
            method,
            principal: h.userid,
            roles: h.roles,
            payload,
            flags: h.flags,
            rank: h.nodeid,
        };
        let mut token = batch.map(BatchToken::another);
        self.runtime.spawn(async move {
            let mut fut = handler(req);
            // A handler that is not done at its first poll leaves the
            // batch (so the others' answers do not wait for it) and is
            // written alone when done.
            let r = std::future::poll_fn(|cx| {
                let p = fut.as_mut().poll(cx);
                if p.is_pending() {
                    token = None;
                }
                p
            })
            .await;
            answer.send(r);
            match token {
                Some(t) => drop(t),
                None => answer.out.flush(),
            }
        });
    }
}

/// Answers one delivery once; if dropped unanswered (the handler panicked,
/// or its task was cancelled), answers EIO so the caller does not wait.
struct Answer {
    out: Outbox,
    topic: String,
    token: u32,
    rank: u32,
    noresp: bool,
    done: bool,
}

impl Answer {
    fn send(&mut self, r: Result<Vec<u8>, ServiceError>) {
        self.done = true;
        if self.noresp {
            return;
        }
        let (errnum, payload) = match r {
            Ok(p) if p.len() > MAX_PAYLOAD => (
                errno::EMSGSIZE,
                format!(
                    "{}: the result is {} bytes, more than {MAX_PAYLOAD}; ask for less",
                    self.topic,
                    p.len()
                )
                .into_bytes(),
            ),
            Ok(p) => (0, p),
            // errnum 0 would read as success: a handler's error is an error.
            Err(e) => (
                if e.errnum == 0 { EIO } else { e.errnum },
                e.message.into_bytes(),
            ),
        };
        self.out
            .respond(&self.topic, self.token, self.rank, errnum, payload);
    }
}

impl Drop for Answer {
    fn drop(&mut self) {
        if !self.done {
            tracing::error!("the handler of {} ended without an answer", self.topic);
            self.send(Err(ServiceError::new(
                EIO,
                format!(
                    "{}: the service's handler failed; report it to the service's owner",
                    self.topic
                ),
            )));
            self.out.flush();
        }
    }
}

/// Whether an event topic matches a subscription pattern: `*`, a prefix
/// followed by `*` (`job.*`, `job*`), or an exact topic.
pub fn pattern_matches(pattern: &str, topic: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => topic.starts_with(prefix),
        None => pattern == topic,
    }
}

/// A handle to one connection to a broker; clones share it.
#[derive(Clone)]
pub struct AsyncClient {
    inner: Arc<Inner>,
}

/// Removes a request's pending entry if its future is dropped unanswered.
struct PendingGuard<'a> {
    inner: &'a Inner,
    tag: u32,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        lock(&self.inner.state).pending.remove(&self.tag);
    }
}

impl AsyncClient {
    /// Connect to `uri` if given, else to `CANOPY_URI` (see
    /// [`crate::resolve_uri`]). Must be called within a tokio runtime.
    pub async fn connect(uri: Option<&str>) -> Result<AsyncClient, ClientError> {
        match resolve_uri(uri)? {
            Target::Local(path) => {
                let stream = tokio::net::UnixStream::connect(&path)
                    .await
                    .map_err(|source| ClientError::Connect {
                        path: path.display().to_string(),
                        source,
                    })?;
                Ok(AsyncClient::from_unix(stream))
            }
            Target::Tcp(ep) => {
                // Reading key files and a Kerberos exchange block.
                let keys = tokio::task::spawn_blocking(keys_from_env)
                    .await
                    .map_err(|e| ClientError::Keys(format!("key setup failed: {e}")))??;
                AsyncClient::connect_tcp(&ep, &keys)
            }
        }
    }

    /// A client on an already connected local-connector stream.
    pub fn from_unix(stream: tokio::net::UnixStream) -> AsyncClient {
        let (rd, wr) = stream.into_split();
        let notify = Arc::new(tokio::sync::Notify::new());
        let inner = AsyncClient::new_inner(|weak| {
            Outbox::Unix(Arc::new(UnixOut {
                wr,
                state: Mutex::new(OutState::default()),
                notify: notify.clone(),
                inner: weak,
            }))
        });
        if let Outbox::Unix(u) = &inner.out {
            inner.runtime.spawn(unix_flusher(Arc::downgrade(u), notify));
        }
        inner.runtime.spawn(unix_reader(rd, Arc::downgrade(&inner)));
        AsyncClient { inner }
    }

    /// Connect to a broker's remote client endpoint with CURVE. The libzmq
    /// sockets live on a bridge thread of their own. A broker that refuses
    /// the key ends the connection with [`ClientError::Refused`].
    pub fn connect_tcp(endpoint: &str, keys: &TcpKeys) -> Result<AsyncClient, ClientError> {
        let (ctx, sock, monitor) = crate::tcp_sockets(endpoint, keys)?;
        let (wake_tx, wake_rx) = std::os::unix::net::UnixStream::pair()?;
        wake_tx.set_nonblocking(true)?;
        wake_rx.set_nonblocking(true)?;
        let wake = Arc::new(Wake {
            pending: AtomicBool::new(false),
            tx: wake_tx,
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let inner = AsyncClient::new_inner(|_| Outbox::Tcp {
            tx,
            wake: wake.clone(),
        });
        let bridge = Bridge {
            _ctx: ctx,
            sock,
            monitor,
            endpoint: endpoint.to_string(),
            established: false,
            wake,
            wake_rx,
            rx,
            inner: Arc::downgrade(&inner),
        };
        std::thread::Builder::new()
            .name("canopy-zmq-bridge".into())
            .spawn(move || bridge.run())?;
        Ok(AsyncClient { inner })
    }

    fn new_inner(out: impl FnOnce(Weak<Inner>) -> Outbox) -> Arc<Inner> {
        let (notices_tx, notices_rx) = mpsc::channel(NOTICE_BACKLOG);
        Arc::new_cyclic(|weak| Inner {
            out: out(weak.clone()),
            state: Mutex::new(State::default()),
            next_tag: AtomicU32::new(1),
            subs: Mutex::new(Vec::new()),
            next_sub: AtomicU64::new(1),
            services: Mutex::new(HashMap::new()),
            notices_tx,
            notices_rx: Mutex::new(Some(notices_rx)),
            ended_tx: watch::channel(false).0,
            runtime: tokio::runtime::Handle::current(),
        })
    }

    /// Send a request and register for its response.
    fn start(
        &self,
        topic: &str,
        nodeid: u32,
        payload: Vec<u8>,
    ) -> Result<(u32, oneshot::Receiver<Result<Msg, ClientError>>), ClientError> {
        let (tx, rx) = oneshot::channel();
        let tag = {
            let mut st = lock(&self.inner.state);
            if let Some(e) = &st.ended {
                return Err(e.error());
            }
            let tag = loop {
                let t = self.inner.next_tag.fetch_add(1, Ordering::Relaxed);
                if t != 0 && !st.pending.contains_key(&t) {
                    break t;
                }
            };
            st.pending.insert(tag, tx);
            tag
        };
        let hb = match Header::request(topic, nodeid, tag).encode() {
            Ok(b) => b,
            Err(e) => {
                lock(&self.inner.state).pending.remove(&tag);
                return Err(FrameError::from(e).into());
            }
        };
        if payload.len() > MAX_PAYLOAD {
            lock(&self.inner.state).pending.remove(&tag);
            return Err(FrameError::PayloadTooLong(payload.len()).into());
        }
        if !self.inner.out.send((hb, payload)) {
            lock(&self.inner.state).pending.remove(&tag);
            return Err(self.ended_error());
        }
        Ok((tag, rx))
    }

    fn ended_error(&self) -> ClientError {
        lock(&self.inner.state)
            .ended
            .as_ref()
            .map(Ended::error)
            .unwrap_or(ClientError::Closed)
    }

    /// One request and its response; an error response is
    /// [`ClientError::Remote`]. Any number may be in flight at once. No
    /// deadline: see [`AsyncClient::rpc_timeout`], or drop the future.
    pub async fn rpc(
        &self,
        topic: &str,
        nodeid: u32,
        payload: impl Into<Vec<u8>>,
    ) -> Result<Msg, ClientError> {
        let (tag, rx) = self.start(topic, nodeid, payload.into())?;
        let _guard = PendingGuard {
            inner: &self.inner,
            tag,
        };
        match rx.await {
            Ok(r) => r.and_then(check),
            Err(_) => Err(self.ended_error()),
        }
    }

    /// [`AsyncClient::rpc`] with a deadline ([`ClientError::Timeout`]).
    pub async fn rpc_timeout(
        &self,
        topic: &str,
        nodeid: u32,
        payload: impl Into<Vec<u8>>,
        timeout: Duration,
    ) -> Result<Msg, ClientError> {
        tokio::time::timeout(timeout, self.rpc(topic, nodeid, payload))
            .await
            .unwrap_or(Err(ClientError::Timeout(timeout)))
    }

    /// Publish an event through rank 0; returns its sequence number. A
    /// provider may publish in a namespace it offers (`NS.…`).
    pub async fn publish(
        &self,
        topic: &str,
        payload: impl AsRef<[u8]>,
    ) -> Result<u64, ClientError> {
        let payload = payload.as_ref();
        let tlen = u16::try_from(topic.len()).map_err(|_| {
            FrameError::Header(canopy_proto::ProtoError::TooLong {
                field: "topic",
                len: topic.len(),
                max: canopy_proto::MAX_TOPIC,
            })
        })?;
        let mut body = Vec::with_capacity(2 + topic.len() + payload.len());
        body.extend_from_slice(&tlen.to_be_bytes());
        body.extend_from_slice(topic.as_bytes());
        body.extend_from_slice(payload);
        let m = self.rpc("event.pub", 0, body).await?;
        let seq: [u8; 8] =
            m.payload.as_slice().try_into().map_err(|_| {
                FrameError::Header(canopy_proto::ProtoError::TooShort(m.payload.len()))
            })?;
        Ok(u64::from_be_bytes(seq))
    }

    /// Subscribe to events matching `pattern` (`*`, `prefix.*` or exact).
    /// The stream ends when the connection does; dropping it unsubscribes.
    pub async fn subscribe(&self, pattern: &str) -> Result<Subscription, ClientError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let id = self.inner.next_sub.fetch_add(1, Ordering::Relaxed);
        // Registered first, so no event that follows the broker's answer
        // is missed.
        lock(&self.inner.subs).push(Sub {
            id,
            pattern: pattern.to_string(),
            tx,
        });
        let sub = Subscription {
            rx,
            id,
            pattern: pattern.to_string(),
            inner: Arc::downgrade(&self.inner),
        };
        self.rpc("event.subscribe", NODEID_ANY, pattern.as_bytes())
            .await?;
        Ok(sub)
    }

    /// Offer namespace `namespace` on the broker this client is connected
    /// to, with `methods` (method name, least role: `owner`, `admin`,
    /// `operator` or `user`). Every request the broker delivers for it is
    /// handled by `handler` in a task of its own, and answered with its
    /// result (a [`ServiceError`] becomes an error response) unless the
    /// caller asked for no response.
    pub async fn serve<F, Fut, M, R>(
        &self,
        namespace: &str,
        methods: impl IntoIterator<Item = (M, R)>,
        handler: F,
    ) -> Result<Registration, ClientError>
    where
        F: Fn(Request) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<u8>, ServiceError>> + Send + 'static,
        M: Into<String>,
        R: Into<String>,
    {
        let methods: serde_json::Map<String, serde_json::Value> = methods
            .into_iter()
            .map(|(m, r)| (m.into(), serde_json::Value::String(r.into())))
            .collect();
        let body = serde_json::json!({ "namespace": namespace, "methods": methods });
        let handler: Handler = Arc::new(move |r| Box::pin(handler(r)) as BoxFuture);
        // Installed before asking, so a request that follows the broker's
        // answer finds it; a namespace this client already serves keeps
        // its handler (the broker refuses the second add with EEXIST).
        let installed = {
            let mut s = lock(&self.inner.services);
            if s.contains_key(namespace) {
                false
            } else {
                s.insert(namespace.to_string(), handler);
                true
            }
        };
        match self
            .rpc("service.add", NODEID_ANY, body.to_string().into_bytes())
            .await
        {
            Ok(m) => Ok(Registration {
                namespace: namespace.to_string(),
                rank: serde_json::from_slice::<serde_json::Value>(&m.payload)
                    .ok()
                    .and_then(|v| v.get("rank")?.as_u64())
                    .and_then(|r| u32::try_from(r).ok())
                    .unwrap_or(m.header.nodeid),
            }),
            Err(e) => {
                if installed {
                    lock(&self.inner.services).remove(namespace);
                }
                Err(e)
            }
        }
    }

    /// Stop offering `namespace`; returns how many requests still in
    /// flight the broker answered ENOSYS.
    pub async fn unserve(&self, namespace: &str) -> Result<u64, ClientError> {
        let body = serde_json::json!({ "namespace": namespace });
        let m = self
            .rpc("service.remove", NODEID_ANY, body.to_string().into_bytes())
            .await?;
        lock(&self.inner.services).remove(namespace);
        Ok(serde_json::from_slice::<serde_json::Value>(&m.payload)
            .ok()
            .and_then(|v| v.get("failed")?.as_u64())
            .unwrap_or(0))
    }

    /// `service.list` of rank `nodeid` (or ANY: this client's broker).
    pub async fn list_services(&self, nodeid: u32) -> Result<serde_json::Value, ClientError> {
        let m = self.rpc("service.list", nodeid, Vec::new()).await?;
        serde_json::from_slice(&m.payload).map_err(|e| {
            ClientError::Io(std::io::Error::new(
                ErrorKind::InvalidData,
                format!("service.list answered with invalid JSON: {e}"),
            ))
        })
    }

    /// The broker's `service.error` notices (answers it dropped); the first
    /// call takes the receiver, later calls get `None`. Each notice is also
    /// logged (tracing, warn).
    pub fn service_notices(&self) -> Option<mpsc::Receiver<ServiceNotice>> {
        lock(&self.inner.notices_rx).take()
    }

    /// Whether the connection has ended.
    pub fn is_closed(&self) -> bool {
        lock(&self.inner.state).ended.is_some()
    }

    /// Wait until the connection ends; returns why (e.g.
    /// [`ClientError::Closed`] when the broker shut down).
    pub async fn closed(&self) -> ClientError {
        let mut rx = self.inner.ended_tx.subscribe();
        let _ = rx.wait_for(|e| *e).await;
        self.ended_error()
    }
}

/// Events matching one pattern, in order. A `futures::Stream` too.
pub struct Subscription {
    rx: mpsc::UnboundedReceiver<Msg>,
    id: u64,
    pattern: String,
    inner: Weak<Inner>,
}

impl Subscription {
    /// The next event, or `None` once the connection has ended.
    pub async fn next(&mut self) -> Option<Msg> {
        self.rx.recv().await
    }

    /// The pattern this subscription follows.
    pub fn pattern(&self) -> &str {
        &self.pattern
    }
}

impl futures_core::Stream for Subscription {
    type Item = Msg;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Msg>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let Some(inner) = self.inner.upgrade() else {
            return;
        };
        let last = {
            let mut subs = lock(&inner.subs);
            subs.retain(|s| s.id != self.id);
            !subs.iter().any(|s| s.pattern == self.pattern)
        };
        // The broker removes every identical subscription of this
        // connection: only when no other local one shares the pattern.
        // Its answer finds no pending request and is ignored (not tag 0:
        // an error answer with tag 0 would read as a refusal).
        if last && lock(&inner.state).ended.is_none() {
            let tag = inner.next_tag.fetch_add(1, Ordering::Relaxed).max(1);
            if let Ok(hb) = Header::request("event.unsubscribe", NODEID_ANY, tag).encode() {
                inner.out.send((hb, self.pattern.clone().into_bytes()));
            }
        }
    }
}

fn keys_from_env() -> Result<TcpKeys, ClientError> {
    match std::env::var(KEX_ENV) {
        Ok(kex) => {
            let target = std::env::var(GSS_TARGET_ENV).map_err(|_| {
                ClientError::Keys(format!(
                    "{KEX_ENV} is set, so this is a gssapi connection: set {GSS_TARGET_ENV} to the broker's principal (canopy start prints it)"
                ))
            })?;
            let me = std::env::var(GSS_PRINCIPAL_ENV).ok();
            TcpKeys::from_gssapi(&kex, &target, me.as_deref())
        }
        Err(_) => TcpKeys::from_env(),
    }
}

fn io_ended(e: &std::io::Error) -> Ended {
    Ended::Io(e.kind(), e.to_string())
}

async fn unix_reader(mut rd: tokio::net::unix::OwnedReadHalf, inner: Weak<Inner>) {
    let mut decoder = FrameDecoder::new();
    let mut buf = vec![0u8; READ_CHUNK];
    let why = 'read: loop {
        let n = match rd.read(&mut buf).await {
            Ok(0) => break Ended::Closed,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => break io_ended(&e),
        };
        decoder.push(&buf[..n]);
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let batch = Batch::open(&inner.out);
        loop {
            match decoder.next_frame() {
                Ok(Some((h, p))) => inner.dispatch(h, p, Some(&batch)),
                Ok(None) => break,
                Err(e) => {
                    break 'read Ended::Io(
                        ErrorKind::InvalidData,
                        format!("the broker sent a malformed frame: {e}"),
                    )
                }
            }
        }
    };
    if let Some(inner) = inner.upgrade() {
        inner.end(why);
    }
}

/// libzmq monitor events (see lib.rs).
const EVENT_HANDSHAKE_FAILED_NO_DETAIL: u16 = 0x0800;
const EVENT_HANDSHAKE_FAILED_PROTOCOL: u16 = 0x2000;
const EVENT_HANDSHAKE_FAILED_AUTH: u16 = 0x4000;
const EVENT_DISCONNECTED: u16 = 0x0200;
/// libzmq's ZMQ_EVENT_HANDSHAKE_SUCCEEDED.
const EVENT_HANDSHAKE_SUCCEEDED: u16 = 0x1000;

/// The thread that owns a tcp connection's libzmq sockets.
struct Bridge {
    sock: zmq::Socket,
    monitor: zmq::Socket,
    endpoint: String,
    /// A handshake succeeded: only then is a disconnection a loss (before
    /// it, libzmq reconnects, and a refusal shows as a failed handshake).
    established: bool,
    wake: Arc<Wake>,
    wake_rx: std::os::unix::net::UnixStream,
    rx: mpsc::UnboundedReceiver<Frame>,
    inner: Weak<Inner>,
    // Dropped last.
    _ctx: zmq::Context,
}

impl Drop for Bridge {
    fn drop(&mut self) {
        crate::silence_monitor(&self.sock);
    }
}

impl Bridge {
    fn run(mut self) {
        let why = match self.serve() {
            Ok(Some(why)) => why,
            Ok(None) => return,
            Err(e) => Ended::Io(ErrorKind::Other, format!("zeromq: {e}")),
        };
        if let Some(inner) = self.inner.upgrade() {
            inner.end(why);
        }
    }

    /// Until the connection ends (`Some`) or every handle is gone (`None`).
    fn serve(&mut self) -> Result<Option<Ended>, zmq::Error> {
        use std::io::Read;
        use std::os::fd::AsRawFd;
        let wake_fd = self.wake_rx.as_raw_fd();
        let mut drain = [0u8; 64];
        loop {
            let (sock_ready, mon_ready, woken) = {
                let mut items = [
                    self.sock.as_poll_item(zmq::POLLIN),
                    self.monitor.as_poll_item(zmq::POLLIN),
                    zmq::PollItem::from_fd(wake_fd, zmq::POLLIN),
                ];
                zmq::poll(&mut items, 200)?;
                (
                    items[0].is_readable(),
                    items[1].is_readable(),
                    items[2].is_readable(),
                )
            };
            if woken {
                while matches!((&self.wake_rx).read(&mut drain), Ok(n) if n > 0) {}
            }
            self.wake.pending.store(false, Ordering::SeqCst);
            loop {
                match self.rx.try_recv() {
                    Ok((h, p)) => {
                        match self
                            .sock
                            .send(h, zmq::SNDMORE)
                            .and_then(|_| self.sock.send(p, 0))
                        {
                            Ok(()) => {}
                            Err(zmq::Error::EAGAIN) => {
                                return Ok(Some(Ended::Lost(self.endpoint.clone())))
                            }
                            Err(e) => return Err(e),
                        }
                    }
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => return Ok(None),
                }
            }
            if sock_ready {
                // Everything already there, without waiting.
                loop {
                    let mut parts = match self.sock.recv_multipart(zmq::DONTWAIT) {
                        Ok(p) => p,
                        Err(zmq::Error::EAGAIN) => break,
                        Err(e) => return Err(e),
                    };
                    if parts.is_empty() || parts.len() > 2 {
                        continue;
                    }
                    let payload = if parts.len() == 2 {
                        parts.pop().unwrap_or_default()
                    } else {
                        Vec::new()
                    };
                    let header = match canopy_proto::decode_header(&parts[0]) {
                        Ok(h) => h,
                        Err(e) => {
                            tracing::warn!("dropped a message from the broker: {e}");
                            continue;
                        }
                    };
                    let Some(inner) = self.inner.upgrade() else {
                        return Ok(None);
                    };
                    inner.dispatch(header, payload, None);
                }
            }
            if mon_ready {
                while let Ok(frames) = self.monitor.recv_multipart(zmq::DONTWAIT) {
                    let Some(ev) = frames.first().filter(|f| f.len() >= 2) else {
                        continue;
                    };
                    match u16::from_le_bytes([ev[0], ev[1]]) {
                        EVENT_HANDSHAKE_FAILED_AUTH => return Ok(Some(Ended::Refused(
                            "permission denied: the broker refused this key; ask its admin to allow your principal".into(),
                        ))),
                        EVENT_HANDSHAKE_FAILED_NO_DETAIL | EVENT_HANDSHAKE_FAILED_PROTOCOL => {
                            return Ok(Some(Ended::Refused(
                                "the CURVE handshake failed; check that CANOPY_SERVER_KEY is this broker's public key".into(),
                            )))
                        }
                        EVENT_HANDSHAKE_SUCCEEDED => self.established = true,
                        EVENT_DISCONNECTED if self.established => {
                            // What arrived before the loss is delivered.
                            while let Ok(mut parts) = self.sock.recv_multipart(zmq::DONTWAIT) {
                                if let (Some(inner), Some(h)) = (
                                    self.inner.upgrade(),
                                    parts.first().and_then(|h| canopy_proto::decode_header(h).ok()),
                                ) {
                                    let p = if parts.len() == 2 { parts.pop().unwrap_or_default() } else { Vec::new() };
                                    inner.dispatch(h, p, None);
                                }
                            }
                            return Ok(Some(Ended::Lost(self.endpoint.clone())));
                        }
                        _ => {}
                    }
                }
            }
            if self.inner.strong_count() == 0 && self.rx.is_empty() {
                return Ok(None);
            }
        }
    }
}

#[cfg(test)]
mod tests;
