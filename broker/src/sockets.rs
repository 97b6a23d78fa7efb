//! Socket setup, and the few socket helpers the shell uses: binding the
//! ROUTERs (after the ZAP handler), the parent DEALER, TCP liveness,
//! libzmq monitors, the one send path and multipart receive. Nothing here
//! decides anything.

use crate::authz::{BrokerPolicy, ClientAuthz, CLIENT_DOMAIN, OVERLAY_DOMAIN};
use crate::core::Card;
use crate::error::BrokerError;
use canopy_overlay::liveness::Timing;
use canopy_overlay::Topology;
use canopy_proto::Roles;
use canopy_security::CurveKeypair;
use canopy_zap::ZapHandle;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

/// Messages libzmq may queue toward (or from) one neighbour broker; past
/// it a send fails with EAGAIN and the core answers the sender EAGAIN.
/// Requests are also bounded in bytes by the core (`Budgets`).
pub const OVERLAY_HWM: i32 = 100_000;
/// Messages libzmq may queue toward one remote client.
pub const CLIENT_HWM: i32 = 1_000;
/// Largest frame any ZeroMQ endpoint accepts (`ZMQ_MAXMSGSIZE`): the
/// largest payload plus the largest header. libzmq closes the connection
/// of a peer that sends more, before buffering it.
pub const MAX_FRAME: i64 =
    (crate::core::DEFAULT_MAX_MESSAGE + canopy_proto::frame::MAX_HEADER) as i64;
/// Everything a broker needs to run, gathered by a bootstrap
/// ([`crate::boot::Bootstrap`]: PMI or a config file).
/// The bootstrap must have called [`Bound::admit_children`] on every
/// broker of the instance before any of them is started with
/// [`Broker::new`], which connects to the parent: a connection that arrives
/// before the parent knows the child's key is denied, and CURVE clients do
/// not retry.
pub struct Plan {
    pub rank: u32,
    pub topo: Topology,
    pub instance: String,
    pub rundir: PathBuf,
    pub keys: CurveKeypair,
    pub parent: Option<Card>,
    /// Principal of each child rank (`curve:<Z85>`).
    pub children: HashMap<u32, String>,
    /// The only uid admitted on the local connector.
    pub owner_uid: u32,
    pub timing: Timing,
    /// This broker's host name.
    pub host: Option<String>,
    /// Host names of the ranks of this broker's subtree that the bootstrap
    /// learned (for `overlay.status`).
    pub hosts: std::collections::BTreeMap<u32, String>,
}

/// ZeroMQ heartbeat interval on remote client connections, both ways.
pub const CLIENT_HEARTBEAT_IVL_MS: i32 = 1_000;
/// Silence after which a remote client connection is dropped.
pub const CLIENT_HEARTBEAT_TIMEOUT_MS: i32 = 3_000;

/// The sockets a broker binds before the key exchange: they must exist so
/// their endpoints can go on the business card.
pub struct Bound {
    pub ctx: zmq::Context,
    pub zap: ZapHandle,
    pub policy: Arc<BrokerPolicy>,
    pub router: Option<zmq::Socket>,
    pub endpoint: Option<String>,
    /// The remote client endpoint (ZAP domain `canopy-client`), if any.
    pub client_router: Option<zmq::Socket>,
    pub client_endpoint: Option<String>,
}

impl Bound {
    /// Let the children's keys in, as peers.
    pub fn admit_children(&self, children: &HashMap<u32, String>) {
        for (rank, principal) in children {
            self.policy
                .peers
                .insert(principal.clone(), format!("rank {rank}"), Roles::PEER);
        }
    }
}

/// Where the ROUTER listens.
#[derive(Clone, Debug)]
pub enum Transport {
    /// `ipc://RUNDIR/tbon-RANK`
    Ipc,
    /// `tcp://HOST:PORT`; port 0 picks a free one.
    Tcp { host: String, port: u16 },
    /// Exactly this endpoint (from a system-instance config).
    Endpoint(String),
    /// `tcp://ADDR:*` (a port from the kernel) for brokers on other hosts,
    /// and `ipc://RUNDIR/tbon-RANK` too for those on this one; the card
    /// carries the TCP endpoint.
    Auto { addr: std::net::IpAddr },
}

static MONITOR_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Watch `sock` for closed connections: returns a PAIR socket that
/// receives libzmq's DISCONNECTED events.
pub(crate) fn disconnect_monitor(
    ctx: &zmq::Context,
    sock: &zmq::Socket,
) -> Result<zmq::Socket, BrokerError> {
    let ep = format!(
        "inproc://canopy-monitor-{}",
        MONITOR_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    sock.monitor(&ep, zmq::SocketEvent::DISCONNECTED as i32)
        .map_err(zerr("monitor a socket"))?;
    let m = ctx
        .socket(zmq::PAIR)
        .map_err(zerr("create a monitor socket"))?;
    m.set_linger(0).map_err(zerr("set linger"))?;
    m.connect(&ep).map_err(zerr("connect a monitor socket"))?;
    Ok(m)
}

/// Drain a monitor socket; true if any DISCONNECTED event was seen.
pub(crate) fn drain_monitor(m: &zmq::Socket) -> bool {
    let mut seen = false;
    while let Ok(frames) = m.recv_multipart(zmq::DONTWAIT) {
        if frames.first().is_some_and(|f| {
            f.len() >= 2
                && u16::from_le_bytes([f[0], f[1]]) == zmq::SocketEvent::DISCONNECTED as u16
        }) {
            seen = true;
        }
    }
    seen
}

pub(crate) fn zerr(what: impl Into<String>) -> impl FnOnce(zmq::Error) -> BrokerError {
    let what = what.into();
    move |source| BrokerError::Zmq { what, source }
}

/// TCP-level liveness, derived from the link timings so that one setting
/// (`timing.lost`) bounds both: keepalive probes start after two
/// heartbeats of idle and repeat every heartbeat (at least 1 s: the
/// kernel's unit), enough of them to span `lost`; and `ZMQ_TCP_MAXRT`
/// drops a connection whose data has gone unacknowledged for `lost`, so
/// a dead host's queued messages are released instead of held for the
/// kernel's default of about 15 minutes.
pub(crate) fn tcp_liveness(s: &mut zmq::Socket, t: &Timing) -> Result<(), BrokerError> {
    let secs = |ms: u64| (ms.div_ceil(1000)).clamp(1, i32::MAX as u64) as i32;
    let idle = secs(2 * t.heartbeat_ms);
    let intvl = secs(t.heartbeat_ms);
    let cnt = (secs(t.lost_ms) / intvl).max(1);
    s.set_tcp_keepalive(1).map_err(zerr("set tcp keepalive"))?;
    s.set_tcp_keepalive_idle(idle)
        .map_err(zerr("set tcp keepalive idle"))?;
    s.set_tcp_keepalive_intvl(intvl)
        .map_err(zerr("set tcp keepalive interval"))?;
    s.set_tcp_keepalive_cnt(cnt)
        .map_err(zerr("set tcp keepalive count"))?;
    canopy_sys::set_tcp_maxrt(s, t.lost_ms.min(i32::MAX as u64) as i32)
        .map_err(zerr("set tcp maxrt"))
}

/// Start the ZAP handler, then (if this rank has children) bind the
/// ROUTER, in that order: libzmq admits everyone if a CURVE server socket
/// binds with no handler listening.
#[allow(clippy::too_many_arguments)] // one call site per instance kind
pub fn bind(
    rank: u32,
    topo: &Topology,
    keys: &CurveKeypair,
    rundir: &std::path::Path,
    transport: &Transport,
    clients: Arc<dyn ClientAuthz>,
    client_listen: Option<&str>,
    timing: &Timing,
) -> Result<Bound, BrokerError> {
    let ctx = zmq::Context::new();
    let policy = Arc::new(BrokerPolicy::new(clients));
    let zap = canopy_zap::ZapHandler::start(&ctx, policy.clone())?;
    if !zap.alive() {
        return Err(BrokerError::ZapDied);
    }
    let mut router = None;
    let mut endpoint = None;
    if topo.children(rank).next().is_some() {
        let mut s = ctx.socket(zmq::ROUTER).map_err(zerr("create router"))?;
        tcp_liveness(&mut s, timing)?;
        s.set_linger(0).map_err(zerr("set linger"))?;
        s.set_sndhwm(OVERLAY_HWM).map_err(zerr("set sndhwm"))?;
        s.set_rcvhwm(OVERLAY_HWM).map_err(zerr("set rcvhwm"))?;
        s.set_maxmsgsize(MAX_FRAME)
            .map_err(zerr("set maxmsgsize"))?;
        s.set_router_mandatory(true)
            .map_err(zerr("set router_mandatory"))?;
        s.set_curve_server(true).map_err(zerr("set curve_server"))?;
        s.set_curve_secretkey(keys.secret())
            .map_err(zerr("set curve secret key"))?;
        s.set_zap_domain(OVERLAY_DOMAIN)
            .map_err(zerr("set zap domain"))?;
        let ep = match transport {
            Transport::Ipc => format!("ipc://{}/tbon-{rank}", rundir.display()),
            Transport::Endpoint(ep) => ep.clone(),
            Transport::Auto { addr } => crate::iface::tcp_endpoint(*addr),
            Transport::Tcp { host, port } => {
                let port = if *port == 0 { 0 } else { *port as u32 + rank };
                if port > u16::MAX as u32 {
                    return Err(BrokerError::Bind {
                        endpoint: format!("tcp://{host}:{port}"),
                        reason: "port out of range".into(),
                    });
                }
                if port == 0 {
                    format!("tcp://{host}:*")
                } else {
                    format!("tcp://{host}:{port}")
                }
            }
        };
        s.bind(&ep).map_err(|e| BrokerError::Bind {
            endpoint: ep.clone(),
            reason: e.message().to_string(),
        })?;
        let last = s
            .get_last_endpoint()
            .map_err(zerr("get last endpoint"))?
            .map_err(|_| BrokerError::EndpointNotUtf8)?;
        if matches!(transport, Transport::Auto { .. }) {
            let ipc = format!("ipc://{}/tbon-{rank}", rundir.display());
            s.bind(&ipc).map_err(|e| BrokerError::Bind {
                endpoint: ipc.clone(),
                reason: e.message().to_string(),
            })?;
        }
        endpoint = Some(last);
        router = Some(s);
    }
    let mut client_router = None;
    let mut client_endpoint = None;
    if let Some(ep) = client_listen {
        let s = ctx
            .socket(zmq::ROUTER)
            .map_err(zerr("create client router"))?;
        s.set_linger(0).map_err(zerr("set linger"))?;
        s.set_sndhwm(CLIENT_HWM).map_err(zerr("set sndhwm"))?;
        s.set_maxmsgsize(MAX_FRAME)
            .map_err(zerr("set maxmsgsize"))?;
        s.set_router_mandatory(true)
            .map_err(zerr("set router_mandatory"))?;
        s.set_curve_server(true).map_err(zerr("set curve_server"))?;
        s.set_curve_secretkey(keys.secret())
            .map_err(zerr("set curve secret key"))?;
        s.set_zap_domain(CLIENT_DOMAIN)
            .map_err(zerr("set zap domain"))?;
        // ZeroMQ heartbeats on every remote client connection: a client
        // that stops answering for CLIENT_HEARTBEAT_TIMEOUT_MS is dropped
        // (and the client library does the same for this broker).
        s.set_heartbeat_ivl(CLIENT_HEARTBEAT_IVL_MS)
            .map_err(zerr("set heartbeat ivl"))?;
        s.set_heartbeat_timeout(CLIENT_HEARTBEAT_TIMEOUT_MS)
            .map_err(zerr("set heartbeat timeout"))?;
        s.set_heartbeat_ttl(CLIENT_HEARTBEAT_TIMEOUT_MS)
            .map_err(zerr("set heartbeat ttl"))?;
        s.bind(ep).map_err(|e| BrokerError::Bind {
            endpoint: ep.to_string(),
            reason: e.message().to_string(),
        })?;
        client_endpoint = s
            .get_last_endpoint()
            .map_err(zerr("get last endpoint"))?
            .ok();
        client_router = Some(s);
    }
    Ok(Bound {
        ctx,
        zap,
        policy,
        router,
        endpoint,
        client_router,
        client_endpoint,
    })
}

/// A payload: a received ZeroMQ frame (moved, never copied, when it is
/// forwarded to another ZeroMQ socket) or bytes.
pub enum Frame {
    Zmq(zmq::Message),
    Bytes(Vec<u8>),
}

impl AsRef<[u8]> for Frame {
    fn as_ref(&self) -> &[u8] {
        match self {
            Frame::Zmq(m) => m,
            Frame::Bytes(v) => v,
        }
    }
}

impl From<Vec<u8>> for Frame {
    fn from(v: Vec<u8>) -> Frame {
        Frame::Bytes(v)
    }
}

impl Frame {
    pub(crate) fn into_msg(self) -> zmq::Message {
        match self {
            Frame::Zmq(m) => m,
            Frame::Bytes(v) => zmq::Message::from(v),
        }
    }
}

pub(crate) fn zs(s: &Option<zmq::Socket>) -> zmq::PollItem<'_> {
    match s {
        Some(s) => s.as_poll_item(zmq::POLLIN),
        None => zmq::PollItem::from_fd(-1, zmq::POLLIN),
    }
}

/// The one send path: routing id (ROUTER only), header, payload.
pub(crate) fn send(
    sock: &zmq::Socket,
    rid: Option<&[u8]>,
    hdr: &[u8],
    payload: Frame,
) -> zmq::Result<()> {
    if let Some(rid) = rid {
        sock.send(rid, zmq::SNDMORE | zmq::DONTWAIT)?;
    }
    sock.send(hdr, zmq::SNDMORE | zmq::DONTWAIT)?;
    sock.send(payload.into_msg(), zmq::DONTWAIT)
}

/// The same, with the payload copied from a slice (one payload for
/// several recipients).
pub(crate) fn send_slice(
    sock: &zmq::Socket,
    rid: &[u8],
    hdr: &[u8],
    payload: &[u8],
) -> zmq::Result<()> {
    sock.send(rid, zmq::SNDMORE | zmq::DONTWAIT)?;
    sock.send(hdr, zmq::SNDMORE | zmq::DONTWAIT)?;
    sock.send(payload, zmq::DONTWAIT)
}

/// Receive one multipart message: the first frame and up to 2 more
/// (`None` when there is nothing to read).
pub(crate) fn recv_parts(
    sock: &zmq::Socket,
    what: &str,
) -> Result<Option<(zmq::Message, Vec<zmq::Message>)>, BrokerError> {
    let mut first = zmq::Message::new();
    loop {
        match sock.recv(&mut first, zmq::DONTWAIT) {
            Ok(()) => break,
            Err(zmq::Error::EAGAIN) => return Ok(None),
            Err(zmq::Error::EINTR) => continue,
            Err(e) => return Err(zerr(format!("receive from {what}"))(e)),
        }
    }
    let mut parts = Vec::with_capacity(2);
    let mut more = first.get_more();
    while more {
        let mut m = zmq::Message::new();
        sock.recv(&mut m, 0)
            .map_err(zerr(format!("receive from {what}")))?;
        more = m.get_more();
        if parts.len() < 3 {
            parts.push(m);
        }
    }
    Ok(Some((first, parts)))
}

/// Header and payload of a `[header, payload?]` message.
pub(crate) fn split(mut parts: Vec<zmq::Message>) -> Option<(zmq::Message, Frame)> {
    if parts.is_empty() || parts.len() > 2 {
        return None;
    }
    let payload = if parts.len() == 2 {
        parts.pop().map(Frame::Zmq)?
    } else {
        Frame::Bytes(Vec::new())
    };
    Some((parts.pop()?, payload))
}

/// A DEALER to the parent at `ep`, authenticating with `keys` against
/// `server_key`, with routing id `identity`; and its disconnect monitor.
/// `relink`: a rotation's new connection, which retries fast (it may first
/// meet the parent's old listener).
pub(crate) fn parent_dealer(
    ctx: &zmq::Context,
    ep: &str,
    server_key: &[u8; 32],
    keys: &CurveKeypair,
    identity: &[u8],
    relink: bool,
    timing: &Timing,
) -> Result<(zmq::Socket, zmq::Socket), BrokerError> {
    let mut s = ctx.socket(zmq::DEALER).map_err(zerr("create dealer"))?;
    if relink {
        s.set_reconnect_ivl(5).map_err(zerr("set reconnect_ivl"))?;
        s.set_reconnect_ivl_max(1000)
            .map_err(zerr("set reconnect_ivl_max"))?;
    } else {
        tcp_liveness(&mut s, timing)?;
    }
    s.set_linger(0).map_err(zerr("set linger"))?;
    s.set_sndhwm(OVERLAY_HWM).map_err(zerr("set sndhwm"))?;
    s.set_rcvhwm(OVERLAY_HWM).map_err(zerr("set rcvhwm"))?;
    s.set_maxmsgsize(MAX_FRAME)
        .map_err(zerr("set maxmsgsize"))?;
    s.set_identity(identity).map_err(zerr("set identity"))?;
    s.set_curve_serverkey(server_key)
        .map_err(zerr("set curve server key"))?;
    s.set_curve_publickey(keys.public())
        .map_err(zerr("set curve public key"))?;
    s.set_curve_secretkey(keys.secret())
        .map_err(zerr("set curve secret key"))?;
    s.connect(ep).map_err(|e| BrokerError::Bind {
        endpoint: ep.to_string(),
        reason: format!("connect: {}", e.message()),
    })?;
    let m = disconnect_monitor(ctx, &s)?;
    Ok((s, m))
}
