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
/// Messages libzmq may queue from one remote client before the broker
/// reads them; past it, TCP pushes back on the client. Kept small: what
/// libzmq holds here is not counted by the budgets (with libzmq's default
/// of 1,000, ten connections flooding 8 KiB pings held up to 80 MB).
pub const CLIENT_RCVHWM: i32 = 64;
/// Largest frame a ZeroMQ endpoint accepts (`ZMQ_MAXMSGSIZE`) for a
/// broker whose largest payload is `max_message` (`budgets.max_message`,
/// `--max-message`): that payload plus the largest header, which also
/// covers CURVE's per-frame overhead. libzmq checks each frame's length
/// prefix and closes the connection of a peer that sends more, before
/// buffering it; a payload between `max_message` and this is refused by
/// the core with EMSGSIZE.
pub fn max_frame(max_message: usize) -> i64 {
    i64::try_from(max_message.saturating_add(canopy_proto::frame::MAX_HEADER)).unwrap_or(i64::MAX)
}

/// The core's budgets from the configured ones (`[budgets]`, flags).
pub fn budgets_from(s: &canopy_config::BudgetSettings) -> crate::core::Budgets {
    let n = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
    crate::core::Budgets {
        max_message: n(s.max_message),
        client_bytes: n(s.client_bytes),
        principal_bytes: n(s.principal_bytes),
        total_bytes: n(s.total_bytes),
        connections: n(s.connections),
        in_flight: n(s.in_flight),
        neighbour_bytes: n(s.neighbour_bytes),
    }
}
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
    /// What clients can make this broker hold (`[budgets]`, flags).
    pub budgets: crate::core::Budgets,
    /// The addresses each child connects from, where the bootstrap knows
    /// them (a system instance's config): a refused key from one of them
    /// shows that child as `refused`.
    pub child_addresses: HashMap<u32, Vec<std::net::IpAddr>>,
    /// How `exec.run` runs commands here.
    pub exec: crate::exec::ExecPlan,
}

impl Plan {
    /// The core's configuration: this plan's links, owner and budgets (the
    /// parent and children are taken), with the broker's `info`.
    pub(crate) fn core_config(
        &mut self,
        info: canopy_modules::BrokerInfo,
        remote_mech: crate::authz::Mech,
        seed: u64,
    ) -> crate::core::CoreConfig {
        crate::core::CoreConfig {
            rank: self.rank,
            topo: self.topo,
            instance: self.instance.clone(),
            parent: self.parent.take(),
            expected: std::mem::take(&mut self.children),
            owner_uid: self.owner_uid,
            owner_principal: crate::admission::unix_principal(self.owner_uid),
            timing: self.timing,
            info,
            remote_mech,
            seed,
            budgets: self.budgets,
            child_addresses: std::mem::take(&mut self.child_addresses),
            exec_mode: self.exec.mode(),
        }
    }
}

/// Signals, as flags plus a pipe that wakes the poll loop.
pub struct Signals {
    pub pipe: std::os::unix::net::UnixStream,
    /// SIGTERM or SIGINT: shut down.
    pub term: Arc<std::sync::atomic::AtomicBool>,
    /// SIGHUP: reload the policy.
    pub hup: Arc<std::sync::atomic::AtomicBool>,
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

/// The events every monitor watches: closed connections and failed
/// handshakes (the latter are logged by [`drain_monitor`]).
const WATCHED: i32 = zmq::SocketEvent::DISCONNECTED as i32
    | zmq::SocketEvent::HANDSHAKE_FAILED_NO_DETAIL as i32
    | zmq::SocketEvent::HANDSHAKE_FAILED_PROTOCOL as i32;

/// Watch `sock` ([`WATCHED`]): returns a PAIR socket that receives
/// libzmq's events.
pub(crate) fn disconnect_monitor(
    ctx: &zmq::Context,
    sock: &zmq::Socket,
) -> Result<zmq::Socket, BrokerError> {
    monitor(ctx, sock, WATCHED)
}

/// Drop a monitored socket and the PAIR receiving its events, stopping
/// the monitor first ([`canopy_sys::stop_monitor`]). The other way round,
/// an event raised as the connection closes (libzmq sends it blocking,
/// from its I/O thread) finds no receiver and blocks that thread for good:
/// this broker would never connect, send or receive again.
pub(crate) fn close_monitored(sock: &mut Option<zmq::Socket>, monitor: &mut Option<zmq::Socket>) {
    if let Some(mut s) = sock.take() {
        if let Err(e) = canopy_sys::stop_monitor(&mut s) {
            tracing::warn!("zmq: cannot stop a socket's monitor before closing it: {e}");
        }
    }
    *monitor = None;
}

/// The parent link's monitor: also a key its parent refused.
pub(crate) fn parent_monitor(
    ctx: &zmq::Context,
    sock: &zmq::Socket,
) -> Result<zmq::Socket, BrokerError> {
    monitor(
        ctx,
        sock,
        WATCHED | zmq::SocketEvent::HANDSHAKE_FAILED_AUTH as i32,
    )
}

fn monitor(
    ctx: &zmq::Context,
    sock: &zmq::Socket,
    events: i32,
) -> Result<zmq::Socket, BrokerError> {
    let ep = format!(
        "inproc://canopy-monitor-{}",
        MONITOR_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    sock.monitor(&ep, events)
        .map_err(zerr("monitor a socket"))?;
    let m = ctx
        .socket(zmq::PAIR)
        .map_err(zerr("create a monitor socket"))?;
    m.set_linger(0).map_err(zerr("set linger"))?;
    m.connect(&ep).map_err(zerr("connect a monitor socket"))?;
    Ok(m)
}

/// Connection events (failed handshakes, closed connections) logged per
/// second and endpoint; more go to debug, so a flood of bad connections
/// cannot flood the log, nor silence another endpoint's.
const HANDSHAKE_LOGS_PER_SECOND: u64 = 20;
static LOG_SECOND: [std::sync::atomic::AtomicU64; 3] =
    [const { std::sync::atomic::AtomicU64::new(0) }; 3];
static LOG_COUNT: [std::sync::atomic::AtomicU64; 3] =
    [const { std::sync::atomic::AtomicU64::new(0) }; 3];

/// Whether another connection event on endpoint `what` may be logged this
/// second (at most [`HANDSHAKE_LOGS_PER_SECOND`]; the first one over says
/// so).
fn under_log_rate(what: &str) -> bool {
    use std::sync::atomic::Ordering::Relaxed;
    let i = match what {
        "overlay" => 0,
        "client" => 1,
        _ => 2,
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    if LOG_SECOND[i].swap(now, Relaxed) != now {
        LOG_COUNT[i].store(0, Relaxed);
    }
    match LOG_COUNT[i].fetch_add(1, Relaxed) {
        n if n < HANDSHAKE_LOGS_PER_SECOND => true,
        HANDSHAKE_LOGS_PER_SECOND => {
            tracing::warn!(endpoint = %what, "zmq: more connection events this second; not logging each");
            false
        }
        _ => false,
    }
}

/// Log a failed handshake on the endpoint `what` (`overlay`, `client`,
/// `parent`): the peer spoke another protocol or mechanism (`protocol`,
/// with libzmq's error code), or did not finish in time (`no_detail`).
fn log_handshake_failure(what: &str, event: zmq::SocketEvent, value: u32, peer: &str) {
    let kind = if event == zmq::SocketEvent::HANDSHAKE_FAILED_PROTOCOL {
        "protocol"
    } else {
        "no_detail"
    };
    if under_log_rate(what) {
        tracing::warn!(
            verdict = %"deny",
            endpoint = %what,
            failure = %kind,
            code = format_args!("{value:#x}"),
            peer = %peer,
            "zmq: handshake failed; connection closed (a peer speaking another protocol or mechanism, or one that did not finish the handshake in time)"
        );
    } else {
        tracing::debug!(endpoint = %what, failure = %kind, peer = %peer, "zmq: handshake failed");
    }
}

/// What a monitor saw: a connection closed; the parent refused this
/// broker (why).
#[derive(Default)]
pub(crate) struct Monitored {
    pub closed: bool,
    pub refused: Option<&'static str>,
}

/// Drain a monitor socket of endpoint `what`, logging failed handshakes
/// (and closed connections of children and remote clients, at info);
/// true if any DISCONNECTED event was seen.
pub(crate) fn drain_monitor(m: &zmq::Socket, what: &str) -> bool {
    drain(m, what).closed
}

/// The parent link's monitor: also a refusal by the parent.
pub(crate) fn drain_parent_monitor(m: &zmq::Socket) -> Monitored {
    drain(m, "parent")
}

fn drain(m: &zmq::Socket, what: &str) -> Monitored {
    let mut seen = Monitored::default();
    while let Ok(frames) = m.recv_multipart(zmq::DONTWAIT) {
        let Some(f) = frames.first().filter(|f| f.len() >= 6) else {
            continue;
        };
        let event = zmq::SocketEvent::from_raw(u16::from_le_bytes([f[0], f[1]]));
        let value = u32::from_le_bytes([f[2], f[3], f[4], f[5]]);
        match event {
            zmq::SocketEvent::DISCONNECTED => {
                seen.closed = true;
                if what != "parent" && under_log_rate(what) {
                    // libzmq cuts a peer without telling the application
                    // why: a frame over ZMQ_MAXMSGSIZE, a protocol error
                    // (bytes that are not ZMTP), or the peer simply left.
                    let peer = frames
                        .get(1)
                        .map(|p| String::from_utf8_lossy(p).into_owned())
                        .unwrap_or_default();
                    tracing::info!(endpoint = %what, peer = %peer, "zmq: a connection closed (the peer left, or libzmq cut it for a frame over the maximum message size or bytes that are not ZMTP)");
                }
            }
            zmq::SocketEvent::HANDSHAKE_FAILED_AUTH => {
                seen.refused = Some("the parent's ZAP handler refused this broker's key (is this node's public certificate the one the parent has for this rank?)");
            }
            zmq::SocketEvent::HANDSHAKE_FAILED_PROTOCOL if what == "parent" => {
                seen.refused = Some("the CURVE handshake with the parent failed (is the parent's public key in this node's configuration the parent's current key?)");
            }
            zmq::SocketEvent::HANDSHAKE_FAILED_NO_DETAIL
            | zmq::SocketEvent::HANDSHAKE_FAILED_PROTOCOL => {
                let peer = frames
                    .get(1)
                    .map(|p| String::from_utf8_lossy(p).into_owned())
                    .unwrap_or_default();
                log_handshake_failure(what, event, value, &peer);
            }
            _ => {}
        }
    }
    seen
}

/// A peer that has not finished its handshake within `timing.lost` (at
/// most libzmq's default of 30 s) is cut, so half-open connections do not
/// pile up.
fn handshake_ivl(timing: &Timing) -> i32 {
    timing.lost_ms.clamp(1, 30_000) as i32
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
    max_message: usize,
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
        s.set_maxmsgsize(max_frame(max_message))
            .map_err(zerr("set maxmsgsize"))?;
        s.set_handshake_ivl(handshake_ivl(timing))
            .map_err(zerr("set handshake_ivl"))?;
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
        s.set_rcvhwm(CLIENT_RCVHWM).map_err(zerr("set rcvhwm"))?;
        s.set_maxmsgsize(max_frame(max_message))
            .map_err(zerr("set maxmsgsize"))?;
        s.set_handshake_ivl(handshake_ivl(timing))
            .map_err(zerr("set handshake_ivl"))?;
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
#[allow(clippy::too_many_arguments)] // the one call site, in node.rs
pub(crate) fn parent_dealer(
    ctx: &zmq::Context,
    ep: &str,
    server_key: &[u8; 32],
    keys: &CurveKeypair,
    identity: &[u8],
    relink: bool,
    timing: &Timing,
    max_message: usize,
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
    s.set_maxmsgsize(max_frame(max_message))
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
    let m = parent_monitor(ctx, &s)?;
    Ok((s, m))
}

#[cfg(test)]
mod budget_tests {
    use super::*;

    #[test]
    fn configured_defaults_are_the_core_defaults() {
        let b = budgets_from(&canopy_config::BudgetSettings::default());
        assert_eq!(b, crate::core::Budgets::default());
        assert_eq!(
            max_frame(b.max_message),
            (crate::core::DEFAULT_MAX_MESSAGE + canopy_proto::frame::MAX_HEADER) as i64
        );
        assert_eq!(
            max_frame(1024),
            1024 + canopy_proto::frame::MAX_HEADER as i64
        );
    }
}
