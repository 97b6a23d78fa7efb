//! Clients for a canopy broker: [`Client`], synchronous, for tools; and
//! [`aio::AsyncClient`] (tokio), for programs with many requests in
//! flight and for services offered by clients (docs/protocol.md §6.1).
//!
//! Tools find the broker through `--uri` or the `CANOPY_URI` environment
//! variable, which `canopy start` sets for the command it runs. A URI is
//! `local://PATH` (or a bare path) for the broker's UNIX-socket connector
//! on this host, or `tcp://HOST:PORT` for a broker's remote client
//! endpoint, secured by CURVE: the client's secret certificate comes from
//! `CANOPY_KEY` (a file) and the broker's public key from
//! `CANOPY_SERVER_KEY` (40 Z85 characters, or a certificate file).
#![forbid(unsafe_code)]

pub mod aio;

use canopy_proto::frame::{encode_frame, FrameDecoder, FrameError};
use canopy_proto::{errno, Header, MsgType};
use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use canopy_proto::NODEID_ANY;

/// Environment variable naming the broker to talk to.
pub const URI_ENV: &str = "CANOPY_URI";
/// The local connector of this host's system-instance broker, which tools
/// use when neither `--uri` nor `CANOPY_URI` says otherwise.
pub const SYSTEM_LOCAL: &str = "/run/canopy/local";
/// Environment variable naming the client's secret certificate (tcp only).
pub const KEY_ENV: &str = "CANOPY_KEY";
/// Environment variable with the broker's public key (tcp only).
pub const SERVER_KEY_ENV: &str = "CANOPY_SERVER_KEY";
/// Environment variable: the broker's Kerberos key exchange (`HOST:PORT`).
/// When set, a tcp:// connection authenticates with Kerberos (gssapi): a
/// fresh CURVE key is made and bound to your principal, instead of
/// `CANOPY_KEY`/`CANOPY_SERVER_KEY`.
pub const KEX_ENV: &str = "CANOPY_KEX";
/// Environment variable: the broker's Kerberos principal (gssapi).
pub const GSS_TARGET_ENV: &str = "CANOPY_GSS_TARGET";
/// Environment variable: your Kerberos principal (gssapi; default: the
/// default principal of your credential cache or client keytab).
pub const GSS_PRINCIPAL_ENV: &str = "CANOPY_GSS_PRINCIPAL";

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no broker given: pass --uri or set CANOPY_URI (canopy start sets it for the command it runs); no system instance runs on this host (/run/canopy/local)")]
    NoUri,
    #[error("unsupported uri '{0}': use local://PATH or tcp://HOST:PORT")]
    BadUri(String),
    #[error("{0}")]
    Keys(String),
    #[error("zeromq: {0}")]
    Zmq(#[from] zmq::Error),
    #[error(
        "cannot connect to broker at {path}: {source}; is the instance running? (check CANOPY_URI)"
    )]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("broker refused the connection: {0}")]
    Refused(String),
    #[error("lost connection to broker: {0}; the instance may have shut down")]
    Io(#[from] std::io::Error),
    #[error("broker closed the connection; the instance may have shut down")]
    Closed,
    #[error("lost the connection to the broker at {0}: it went away or stopped answering heartbeats for {HEARTBEAT_TIMEOUT_MS} ms; the instance may have shut down (check it, then retry)")]
    Lost(String),
    #[error("no response within {0:?}; the target may be down or overloaded")]
    Timeout(Duration),
    #[error("broker sent a malformed frame: {0}")]
    Frame(#[from] FrameError),
    #[error("{topic} failed on rank {rank}: {name}: {message}")]
    Remote {
        topic: String,
        rank: u32,
        errnum: u32,
        name: &'static str,
        message: String,
    },
}

impl ClientError {
    /// The remote error number, if this is a remote error.
    pub fn errnum(&self) -> Option<u32> {
        match self {
            ClientError::Remote { errnum, .. } => Some(*errnum),
            _ => None,
        }
    }
}

/// A message from the broker.
#[derive(Debug, Clone)]
pub struct Msg {
    pub header: Header,
    pub payload: Vec<u8>,
}

enum Conn {
    Unix {
        stream: UnixStream,
        decoder: FrameDecoder,
        /// Read buffer, allocated once (not zeroed per message).
        rbuf: Vec<u8>,
    },
    Tcp {
        sock: zmq::Socket,
        monitor: zmq::Socket,
        endpoint: String,
        /// The connection was lost (monitor said so): every further call
        /// fails at once.
        lost: bool,
        /// A handshake succeeded: only then is a disconnection a loss
        /// (before it, libzmq reconnects, and a refusal shows as a failed
        /// handshake).
        established: bool,
        _ctx: zmq::Context,
    },
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Conn::Tcp { sock, .. } = self {
            silence_monitor(sock);
        }
    }
}

/// Before a monitored socket and the PAIR receiving its events are
/// dropped: point its monitor at a fresh endpoint with no events (libzmq
/// closes the old one), so nothing more is sent to a receiver about to go
/// (libzmq would block its I/O thread on it; see [`tcp_sockets`]).
pub(crate) fn silence_monitor(sock: &zmq::Socket) {
    let ep = format!(
        "inproc://canopy-client-monitor-off-{}",
        MONITOR_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let _ = sock.monitor(&ep, 0);
}

/// ZeroMQ heartbeat interval on a tcp connection to a broker.
pub const HEARTBEAT_IVL_MS: i32 = 1_000;
/// Silence after which the connection counts as lost.
pub const HEARTBEAT_TIMEOUT_MS: i32 = 3_000;
/// Longest a send may block (a send never waits for a lost broker).
pub(crate) const SEND_TIMEOUT_MS: i32 = 5_000;

pub struct Client {
    conn: Conn,
    next_tag: u32,
    /// Messages received while waiting for something else.
    backlog: VecDeque<Msg>,
    wbuf: Vec<u8>,
}

/// Where a URI points.
#[derive(Debug, PartialEq, Eq)]
pub enum Target {
    Local(PathBuf),
    Tcp(String),
}

/// Resolve a URI from an explicit value or the environment.
pub fn resolve_uri(explicit: Option<&str>) -> Result<Target, ClientError> {
    let uri = match explicit {
        Some(u) => u.to_string(),
        None => match std::env::var(URI_ENV) {
            Ok(u) => u,
            // A system instance's broker on this host (the unit's
            // `--rundir /run/canopy` links `local` to its socket).
            Err(_) if Path::new(SYSTEM_LOCAL).exists() => format!("local://{SYSTEM_LOCAL}"),
            Err(_) => return Err(ClientError::NoUri),
        },
    };
    if let Some(p) = uri.strip_prefix("local://") {
        Ok(Target::Local(PathBuf::from(p)))
    } else if uri.starts_with('/') {
        Ok(Target::Local(PathBuf::from(uri)))
    } else if uri.starts_with("tcp://") {
        Ok(Target::Tcp(uri))
    } else {
        Err(ClientError::BadUri(uri))
    }
}

/// Keys for a tcp connection.
pub struct TcpKeys {
    pub client: canopy_security::CurveKeypair,
    pub server_public: [u8; 32],
}

impl TcpKeys {
    /// From `CANOPY_KEY` and `CANOPY_SERVER_KEY`.
    pub fn from_env() -> Result<TcpKeys, ClientError> {
        let key = std::env::var(KEY_ENV).map_err(|_| {
            ClientError::Keys(format!(
                "a tcp:// uri needs your secret certificate: set {KEY_ENV}=FILE (make one with canopy keygen)"
            ))
        })?;
        let server = std::env::var(SERVER_KEY_ENV).map_err(|_| {
            ClientError::Keys(format!(
                "a tcp:// uri needs the broker's public key: set {SERVER_KEY_ENV} to its 40 Z85 characters or its certificate file"
            ))
        })?;
        TcpKeys::load(std::path::Path::new(&key), &server)
    }

    /// A fresh key bound to our Kerberos principal by the broker's key
    /// exchange at `kex`; the broker's server key comes back vouched for by
    /// `target` (mutual authentication).
    pub fn from_gssapi(
        kex: &str,
        target: &str,
        principal: Option<&str>,
    ) -> Result<TcpKeys, ClientError> {
        let client = canopy_security::CurveKeypair::generate()
            .map_err(|e| ClientError::Keys(e.to_string()))?;
        let cfg = canopy_gss::ClientConfig {
            principal: principal.map(str::to_string),
            target: target.to_string(),
            purpose: canopy_gss::Purpose::Client,
            expect_server_key: None,
            timeout: Duration::from_secs(5),
            kdc_timeout: canopy_gss::krb::kdc_timeout(),
        };
        let b = canopy_gss::client::handshake_retrying_busy(kex, &cfg, &client, 5)
            .map_err(|e| ClientError::Keys(format!("gssapi: {e}")))?;
        Ok(TcpKeys {
            client,
            server_public: b.server_key,
        })
    }

    /// From a secret certificate file and a server key (Z85 or a file).
    pub fn load(key_file: &std::path::Path, server: &str) -> Result<TcpKeys, ClientError> {
        let cert = canopy_security::cert::load_secret(key_file)
            .map_err(|e| ClientError::Keys(e.to_string()))?;
        let client = cert.keypair().ok_or_else(|| {
            ClientError::Keys(format!("{} has no secret key", key_file.display()))
        })?;
        let server_public = if server.len() == 40 && !std::path::Path::new(server).exists() {
            canopy_security::decode_public_key(server)
                .map_err(|e| ClientError::Keys(format!("{SERVER_KEY_ENV}: {e}")))?
        } else {
            canopy_security::cert::load_public(std::path::Path::new(server))
                .map_err(|e| ClientError::Keys(e.to_string()))?
                .public
        };
        Ok(TcpKeys {
            client,
            server_public,
        })
    }
}

static MONITOR_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl Client {
    /// Connect to `--uri` if given, else to `CANOPY_URI`.
    pub fn connect(uri: Option<&str>) -> Result<Client, ClientError> {
        match resolve_uri(uri)? {
            Target::Local(path) => {
                let stream = UnixStream::connect(&path).map_err(|source| ClientError::Connect {
                    path: path.display().to_string(),
                    source,
                })?;
                Ok(Client::with_conn(Conn::Unix {
                    stream,
                    decoder: FrameDecoder::new(),
                    rbuf: vec![0; READ_CHUNK],
                }))
            }
            Target::Tcp(ep) => {
                let keys = match std::env::var(KEX_ENV) {
                    Ok(kex) => {
                        let target = std::env::var(GSS_TARGET_ENV).map_err(|_| {
                            ClientError::Keys(format!(
                                "{KEX_ENV} is set, so this is a gssapi connection: set {GSS_TARGET_ENV} to the broker's principal (canopy start prints it)"
                            ))
                        })?;
                        let me = std::env::var(GSS_PRINCIPAL_ENV).ok();
                        TcpKeys::from_gssapi(&kex, &target, me.as_deref())?
                    }
                    Err(_) => TcpKeys::from_env()?,
                };
                Client::connect_tcp(&ep, &keys)
            }
        }
    }

    /// The uid the broker runs as, for a local connection (`SO_PEERCRED`);
    /// `None` over tcp. `canopy exec` signs its request when the broker
    /// is not its own (a system instance).
    pub fn broker_uid(&self) -> Option<u32> {
        match &self.conn {
            Conn::Unix { stream, .. } => {
                nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
                    .ok()
                    .map(|c| c.uid())
            }
            Conn::Tcp { .. } => None,
        }
    }

    /// Connect to a broker's remote client endpoint with CURVE. A broker
    /// that refuses the key is reported as [`ClientError::Refused`] on the
    /// first receive, not as a timeout.
    pub fn connect_tcp(endpoint: &str, keys: &TcpKeys) -> Result<Client, ClientError> {
        let (ctx, sock, monitor) = tcp_sockets(endpoint, keys)?;
        Ok(Client::with_conn(Conn::Tcp {
            sock,
            monitor,
            endpoint: endpoint.to_string(),
            lost: false,
            established: false,
            _ctx: ctx,
        }))
    }

    fn with_conn(conn: Conn) -> Client {
        Client {
            conn,
            next_tag: 1,
            backlog: VecDeque::new(),
            wbuf: Vec::new(),
        }
    }

    /// Send a request without waiting; returns its matchtag.
    pub fn send(&mut self, topic: &str, nodeid: u32, payload: &[u8]) -> Result<u32, ClientError> {
        let tag = self.next_tag;
        self.next_tag = self.next_tag.wrapping_add(1).max(1);
        let h = Header::request(topic, nodeid, tag);
        self.send_header(&h, payload)?;
        Ok(tag)
    }

    /// As a service provider: answer the request delivered with `token`
    /// (its matchtag) with `errnum` (0: success) and `payload` (on error,
    /// a message for the caller). docs/protocol.md §6.1.
    pub fn respond(&mut self, token: u32, errnum: u32, payload: &[u8]) -> Result<(), ClientError> {
        let mut h = Header::request("", 0, token);
        h.msg_type = MsgType::Response;
        h.errnum = errnum;
        self.send_header(&h, payload)
    }

    /// As a service provider: the next request delivered to this
    /// connection, waiting up to `timeout`; other messages are kept.
    pub fn next_request(&mut self, timeout: Duration) -> Result<Msg, ClientError> {
        if let Some(i) = self
            .backlog
            .iter()
            .position(|m| m.header.msg_type == MsgType::Request)
        {
            return Ok(self.backlog.remove(i).expect("index valid"));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let m = self.recv_wire(left)?;
            if m.header.msg_type == MsgType::Request {
                return Ok(m);
            }
            self.backlog.push_back(m);
        }
    }

    fn send_header(&mut self, h: &Header, payload: &[u8]) -> Result<(), ClientError> {
        match &mut self.conn {
            Conn::Unix { stream, .. } => {
                self.wbuf.clear();
                encode_frame(h, payload, &mut self.wbuf)?;
                if let Err(e) = stream.write_all(&self.wbuf) {
                    // A broker that refuses a connection writes one refusal
                    // frame and closes: report that, not the broken pipe.
                    if matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset) {
                        if let Conn::Unix {
                            stream,
                            decoder,
                            rbuf,
                        } = &mut self.conn
                        {
                            if let Err(r @ ClientError::Refused(_)) =
                                recv_unix(stream, decoder, rbuf, Duration::from_millis(200))
                            {
                                return Err(r);
                            }
                        }
                    }
                    return Err(e.into());
                }
            }
            Conn::Tcp {
                sock,
                lost,
                endpoint,
                ..
            } => {
                if *lost {
                    return Err(ClientError::Lost(endpoint.clone()));
                }
                let hb = h.encode().map_err(FrameError::from)?;
                let sent = sock
                    .send(hb, zmq::SNDMORE)
                    .and_then(|_| sock.send(payload, 0));
                match sent {
                    Ok(()) => {}
                    Err(zmq::Error::EAGAIN) => return Err(ClientError::Lost(endpoint.clone())),
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(())
    }

    /// Receive the next message (response, event, or a request delivered
    /// to a service this connection offers), waiting up to `timeout`.
    pub fn recv(&mut self, timeout: Duration) -> Result<Msg, ClientError> {
        if let Some(m) = self.backlog.pop_front() {
            return Ok(m);
        }
        self.recv_wire(timeout)
    }

    /// The next message that is not a control message: the broker's
    /// control messages (a probe of a provider's connection) carry nothing
    /// for a client, and are dropped.
    fn recv_wire(&mut self, timeout: Duration) -> Result<Msg, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let m = match &mut self.conn {
                Conn::Unix {
                    stream,
                    decoder,
                    rbuf,
                } => recv_unix(stream, decoder, rbuf, left),
                Conn::Tcp {
                    sock,
                    monitor,
                    endpoint,
                    lost,
                    established,
                    ..
                } => recv_tcp(sock, monitor, endpoint, lost, established, left),
            }?;
            if m.header.msg_type != MsgType::Control {
                return Ok(m);
            }
        }
    }

    /// Wait for the response with `tag`; other messages are kept for later.
    pub fn wait(&mut self, tag: u32, timeout: Duration) -> Result<Msg, ClientError> {
        if let Some(i) = self.backlog.iter().position(|m| is_response_to(m, tag)) {
            let m = self.backlog.remove(i).expect("index valid");
            return check(m);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let m = self.recv_wire(left).map_err(|e| match e {
                ClientError::Timeout(_) => ClientError::Timeout(timeout),
                e => e,
            })?;
            if is_response_to(&m, tag) {
                return check(m);
            }
            self.backlog.push_back(m);
        }
    }

    /// One request, one response.
    pub fn rpc(
        &mut self,
        topic: &str,
        nodeid: u32,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<Msg, ClientError> {
        let tag = self.send(topic, nodeid, payload)?;
        self.wait(tag, timeout)
    }

    /// Subscribe to events matching `pattern` (`*`, `prefix.*` or exact).
    pub fn subscribe(&mut self, pattern: &str, timeout: Duration) -> Result<(), ClientError> {
        self.rpc("event.subscribe", NODEID_ANY, pattern.as_bytes(), timeout)
            .map(|_| ())
    }

    /// Publish an event through rank 0; returns its sequence number.
    pub fn publish(
        &mut self,
        topic: &str,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<u64, ClientError> {
        let mut body = Vec::with_capacity(2 + topic.len() + payload.len());
        body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
        body.extend_from_slice(topic.as_bytes());
        body.extend_from_slice(payload);
        let m = self.rpc("event.pub", 0, &body, timeout)?;
        let seq: [u8; 8] = m.payload.as_slice().try_into().map_err(|_| {
            ClientError::Frame(FrameError::Header(canopy_proto::ProtoError::TooShort(
                m.payload.len(),
            )))
        })?;
        Ok(u64::from_be_bytes(seq))
    }

    /// The next event, waiting up to `timeout`.
    pub fn next_event(&mut self, timeout: Duration) -> Result<Msg, ClientError> {
        if let Some(i) = self
            .backlog
            .iter()
            .position(|m| m.header.msg_type == MsgType::Event)
        {
            return Ok(self.backlog.remove(i).expect("index valid"));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let m = self.recv_wire(left)?;
            if m.header.msg_type == MsgType::Event {
                return Ok(m);
            }
            self.backlog.push_back(m);
        }
    }
}

fn refusal_or_msg(header: Header, payload: Vec<u8>) -> Result<Msg, ClientError> {
    if header.msg_type == MsgType::Response && header.matchtag == 0 && header.errnum != 0 {
        return Err(ClientError::Refused(
            String::from_utf8_lossy(&payload).into(),
        ));
    }
    Ok(Msg { header, payload })
}

/// How much one read from the local socket may take.
const READ_CHUNK: usize = 64 << 10;

fn recv_unix(
    stream: &mut UnixStream,
    decoder: &mut FrameDecoder,
    buf: &mut [u8],
    timeout: Duration,
) -> Result<Msg, ClientError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some((header, payload)) = decoder.next_frame()? {
            return refusal_or_msg(header, payload);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ClientError::Timeout(timeout));
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(buf) {
            Ok(0) => return Err(ClientError::Closed),
            Ok(n) => decoder.push(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(ClientError::Timeout(timeout))
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// libzmq's ZMQ_EVENT_HANDSHAKE_FAILED_* monitor events.
const EVENT_HANDSHAKE_FAILED_NO_DETAIL: u16 = 0x0800;
const EVENT_HANDSHAKE_FAILED_PROTOCOL: u16 = 0x2000;
const EVENT_HANDSHAKE_FAILED_AUTH: u16 = 0x4000;

/// libzmq's ZMQ_EVENT_DISCONNECTED: an established connection ended (the
/// broker closed it, died, or missed its heartbeats).
const EVENT_DISCONNECTED: u16 = 0x0200;
/// libzmq's ZMQ_EVENT_HANDSHAKE_SUCCEEDED.
const EVENT_HANDSHAKE_SUCCEEDED: u16 = 0x1000;

fn recv_tcp(
    sock: &zmq::Socket,
    monitor: &zmq::Socket,
    endpoint: &str,
    lost: &mut bool,
    established: &mut bool,
    timeout: Duration,
) -> Result<Msg, ClientError> {
    let deadline = Instant::now() + timeout;
    loop {
        // What arrived before the connection was lost is still delivered.
        let left = if *lost {
            Duration::ZERO
        } else {
            deadline.saturating_duration_since(Instant::now())
        };
        let (sock_ready, mon_ready) = {
            let mut items = [
                sock.as_poll_item(zmq::POLLIN),
                monitor.as_poll_item(zmq::POLLIN),
            ];
            zmq::poll(&mut items, left.as_millis().min(i64::MAX as u128) as i64)?;
            (items[0].is_readable(), items[1].is_readable())
        };
        if mon_ready {
            let frames = monitor.recv_multipart(0)?;
            if let Some(ev) = frames.first().filter(|f| f.len() >= 2) {
                match u16::from_le_bytes([ev[0], ev[1]]) {
                    EVENT_HANDSHAKE_FAILED_AUTH => {
                        return Err(ClientError::Refused(
                            "permission denied: the broker refused this key; ask its admin to allow your principal".into(),
                        ))
                    }
                    EVENT_HANDSHAKE_FAILED_NO_DETAIL | EVENT_HANDSHAKE_FAILED_PROTOCOL => {
                        return Err(ClientError::Refused(
                            "the CURVE handshake failed; check that CANOPY_SERVER_KEY is this broker's public key".into(),
                        ))
                    }
                    EVENT_HANDSHAKE_SUCCEEDED => *established = true,
                    EVENT_DISCONNECTED if *established => *lost = true,
                    _ => {}
                }
            }
        }
        if sock_ready {
            let mut parts = sock.recv_multipart(0)?;
            if parts.is_empty() || parts.len() > 2 {
                continue;
            }
            let payload = if parts.len() == 2 {
                parts.pop().unwrap_or_default()
            } else {
                Vec::new()
            };
            let header = canopy_proto::decode_header(&parts[0]).map_err(FrameError::from)?;
            return refusal_or_msg(header, payload);
        }
        if *lost && !mon_ready {
            return Err(ClientError::Lost(endpoint.to_string()));
        }
        if Instant::now() >= deadline {
            return Err(ClientError::Timeout(timeout));
        }
    }
}

pub(crate) fn check(m: Msg) -> Result<Msg, ClientError> {
    if m.header.errnum == 0 {
        return Ok(m);
    }
    Err(ClientError::Remote {
        topic: m.header.topic.clone(),
        rank: m.header.nodeid,
        errnum: m.header.errnum,
        name: errno::name(m.header.errnum),
        message: String::from_utf8_lossy(&m.payload).into_owned(),
    })
}

/// A CURVE DEALER connected to `endpoint`, with heartbeats both ways (a
/// broker that dies or hangs is noticed within [`HEARTBEAT_TIMEOUT_MS`],
/// not at the next request's timeout), and a PAIR socket receiving its
/// monitor events; for the synchronous and the async client alike.
pub(crate) fn tcp_sockets(
    endpoint: &str,
    keys: &TcpKeys,
) -> Result<(zmq::Context, zmq::Socket, zmq::Socket), ClientError> {
    let ctx = zmq::Context::new();
    let sock = ctx.socket(zmq::DEALER)?;
    sock.set_linger(0)?;
    sock.set_curve_serverkey(&keys.server_public)?;
    sock.set_curve_publickey(keys.client.public())?;
    sock.set_curve_secretkey(keys.client.secret())?;
    sock.set_heartbeat_ivl(HEARTBEAT_IVL_MS)?;
    sock.set_heartbeat_timeout(HEARTBEAT_TIMEOUT_MS)?;
    sock.set_heartbeat_ttl(HEARTBEAT_TIMEOUT_MS)?;
    sock.set_sndtimeo(SEND_TIMEOUT_MS)?;
    let mon_ep = format!(
        "inproc://canopy-client-monitor-{}",
        MONITOR_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    // Only the events read above: libzmq sends each one blocking, from its
    // I/O thread (or, for MONITOR_STOPPED, its reaper) and, once this
    // client has dropped the receiving PAIR, an event with nobody to take
    // it would block that thread and the context's end for good.
    let watched = [
        EVENT_HANDSHAKE_FAILED_NO_DETAIL,
        EVENT_HANDSHAKE_FAILED_PROTOCOL,
        EVENT_HANDSHAKE_FAILED_AUTH,
        EVENT_DISCONNECTED,
        EVENT_HANDSHAKE_SUCCEEDED,
    ]
    .iter()
    .fold(0i32, |m, e| m | i32::from(*e));
    sock.monitor(&mon_ep, watched)?;
    let monitor = ctx.socket(zmq::PAIR)?;
    monitor.set_linger(0)?;
    monitor.connect(&mon_ep)?;
    sock.connect(endpoint).map_err(|e| ClientError::Connect {
        path: endpoint.to_string(),
        source: std::io::Error::other(e.message()),
    })?;
    Ok((ctx, sock, monitor))
}

/// Topic of the broker's note to a provider that answered a request it was
/// not given (docs/protocol.md §6.1): its matchtag is the provider's token,
/// not one of its own requests.
pub const SERVICE_ERROR_TOPIC: &str = "service.error";

fn is_response_to(m: &Msg, tag: u32) -> bool {
    m.header.msg_type == MsgType::Response
        && m.header.matchtag == tag
        && m.header.topic != SERVICE_ERROR_TOPIC
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ROUTER listening on a free loopback port, and its endpoint.
    fn listening(ctx: &zmq::Context) -> (zmq::Socket, String) {
        let router = ctx.socket(zmq::ROUTER).unwrap();
        router.set_linger(0).unwrap();
        router.bind("tcp://127.0.0.1:*").unwrap();
        let ep = router.get_last_endpoint().unwrap().unwrap();
        (router, ep)
    }

    /// Whether a router and a dealer on `ctx` exchange a message within
    /// 5 s (libzmq's I/O thread still works).
    fn context_works(ctx: &zmq::Context) -> bool {
        let (router, ep) = listening(ctx);
        let dealer = ctx.socket(zmq::DEALER).unwrap();
        dealer.set_linger(0).unwrap();
        dealer.connect(&ep).unwrap();
        dealer.send("ping", zmq::DONTWAIT).unwrap();
        router.set_rcvtimeo(5_000).unwrap();
        router.recv_multipart(0).is_ok()
    }

    #[test]
    fn a_silenced_monitor_sends_nothing_once_its_receiver_is_gone() {
        let ctx = zmq::Context::new();
        let (router, ep) = listening(&ctx);
        let dealer = ctx.socket(zmq::DEALER).unwrap();
        dealer.set_linger(0).unwrap();
        dealer
            .monitor("inproc://silence-test", i32::from(EVENT_DISCONNECTED))
            .unwrap();
        let monitor = ctx.socket(zmq::PAIR).unwrap();
        monitor.connect("inproc://silence-test").unwrap();
        dealer.connect(&ep).unwrap();
        dealer.send("hello", zmq::DONTWAIT).unwrap();
        router.set_rcvtimeo(5_000).unwrap();
        router.recv_multipart(0).expect("the dealer connected");
        silence_monitor(&dealer);
        drop(monitor);
        std::thread::sleep(Duration::from_millis(100));
        // The connection closes: its disconnection has nobody to go to.
        drop(router);
        std::thread::sleep(Duration::from_millis(300));
        if !context_works(&ctx) {
            std::mem::forget(dealer);
            std::mem::forget(ctx);
            panic!("libzmq's I/O thread blocked on a monitor event");
        }
    }

    #[test]
    fn uris() {
        assert_eq!(
            resolve_uri(Some("local:///a/b")).unwrap(),
            Target::Local(PathBuf::from("/a/b"))
        );
        assert_eq!(
            resolve_uri(Some("/a/b")).unwrap(),
            Target::Local(PathBuf::from("/a/b"))
        );
        assert_eq!(
            resolve_uri(Some("tcp://h:1")).unwrap(),
            Target::Tcp("tcp://h:1".into())
        );
        assert!(matches!(
            resolve_uri(Some("udp://x")),
            Err(ClientError::BadUri(_))
        ));
    }

    #[test]
    fn talks_to_a_fake_broker_over_a_socketpair() {
        // A real socketpair standing in for the broker end, answering one
        // request with an error and sending an event first.
        let (a, b) = UnixStream::pair().unwrap();
        let mut c = Client::with_conn(Conn::Unix {
            stream: a,
            decoder: FrameDecoder::new(),
            rbuf: vec![0; READ_CHUNK],
        });
        let t = std::thread::spawn(move || {
            let mut b = b;
            let mut d = FrameDecoder::new();
            let mut buf = [0u8; 4096];
            let (h, _) = loop {
                let n = b.read(&mut buf).unwrap();
                d.push(&buf[..n]);
                if let Some(f) = d.next_frame().unwrap() {
                    break f;
                }
            };
            let mut out = Vec::new();
            encode_frame(&Header::event("e.x", 4), b"ev", &mut out).unwrap();
            encode_frame(&h.response(7, errno::EPERM), b"needs admin", &mut out).unwrap();
            b.write_all(&out).unwrap();
        });
        let err = c.rpc("x.y", 7, b"", Duration::from_secs(5)).unwrap_err();
        assert_eq!(err.errnum(), Some(errno::EPERM));
        assert!(err.to_string().contains("needs admin"), "{err}");
        let ev = c.next_event(Duration::from_secs(1)).unwrap();
        assert_eq!(ev.header.seq, 4);
        assert!(matches!(
            c.recv(Duration::from_millis(50)),
            Err(ClientError::Closed) | Err(ClientError::Timeout(_))
        ));
        t.join().unwrap();
    }
}
