//! The broker: thin socket layers around the overlay logic.
//!
//! One thread owns every socket and polls them together: the ROUTER its
//! children connect to, the DEALER to its parent, the local connector's
//! listener and clients, the PMI fd (to notice the launcher going away),
//! and a signal pipe. Routing decisions come from `canopy_overlay`;
//! modules run on this same thread, so no message takes a thread hop.

use crate::authz::{BrokerPolicy, ClientAuthz, ClientMech, CLIENT_DOMAIN, OVERLAY_DOMAIN};
use crate::error::BrokerError;
use canopy_modules::{BrokerInfo, Ctx, Registry, Reply};
use canopy_overlay::events::{topic_matches, Arrival, GapDetector, Ring, Sequencer};
use canopy_overlay::health::{Delta, Health, RankState, HEALTH_TOPIC};
use canopy_overlay::hello::{Hello, HelloCheck, HelloError, HELLO_TOPIC};
use canopy_overlay::liveness::{Peer, Timing, Transition};
use canopy_overlay::pending::{InFlight, Link, Pending};
use canopy_overlay::route::{next_hop, Next};
use canopy_overlay::Topology;
use canopy_proto::frame::{encode_frame, FrameDecoder};
use canopy_proto::{decode_header, errno, Header, Hop, MsgType, Roles, PROTOCOL_VERSION};
use canopy_security::CurveKeypair;
use canopy_zap::ZapHandle;
use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use tracing::{debug, error, info, warn};

// Key rotation: relinking a parent-child link (see crate::rotate).
#[path = "relink.rs"]
mod relink;

/// Admin request to drop a child's link; also the control message telling
/// the child.
pub const DISCONNECT_TOPIC: &str = "overlay.disconnect";
/// Control: sign of life, both directions, every `heartbeat_ms`.
pub const HEARTBEAT_TOPIC: &str = "overlay.heartbeat";
/// Control, parent to child: "I do not know your session; rejoin".
pub const REJOIN_TOPIC: &str = "overlay.rejoin";

/// Largest amount of unsent data a slow local client may accumulate.
const MAX_CLIENT_BACKLOG: usize = 256 << 20;
/// Messages taken from one socket before the others get a turn.
const BATCH: usize = 256;
/// Events each broker keeps to replay to a child that rejoins after a
/// link loss (a rejoin after more events than this reports a gap).
const EVENT_REPLAY: usize = 1024;

/// A peer's "business card": what its neighbours need to reach it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Card {
    pub public_key: [u8; 32],
    /// Where its ROUTER listens; `None` if it has no children.
    pub endpoint: Option<String>,
}

impl Card {
    /// Encode for a PMI value: `HEXKEY,ENDPOINT` (no spaces or `=`).
    pub fn encode(&self) -> String {
        let hex: String = self.public_key.iter().map(|b| format!("{b:02x}")).collect();
        format!("{hex},{}", self.endpoint.as_deref().unwrap_or("-"))
    }

    pub fn decode(s: &str) -> Result<Card, String> {
        let (hex, ep) = s
            .split_once(',')
            .ok_or_else(|| format!("business card '{s}' has no ','"))?;
        if hex.len() != 64 || !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(format!("business card key '{hex}' is not 64 hex digits"));
        }
        let mut key = [0u8; 32];
        for (i, k) in key.iter_mut().enumerate() {
            *k = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
        }
        Ok(Card {
            public_key: key,
            endpoint: (ep != "-").then(|| ep.to_string()),
        })
    }
}

/// Everything a broker needs to run, gathered by a bootstrap (PMI today).
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
}

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
}

static MONITOR_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Watch `sock` for closed connections: returns a PAIR socket that
/// receives libzmq's DISCONNECTED events.
fn disconnect_monitor(ctx: &zmq::Context, sock: &zmq::Socket) -> Result<zmq::Socket, BrokerError> {
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
fn drain_monitor(m: &zmq::Socket) -> bool {
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

fn zerr(what: impl Into<String>) -> impl FnOnce(zmq::Error) -> BrokerError {
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
fn tcp_liveness(s: &mut zmq::Socket, t: &Timing) -> Result<(), BrokerError> {
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

/// A response that matches no request in flight over its link: its
/// requester's link was lost (the requester may since have restarted as a
/// new incarnation, which must not get it) or it was already answered
/// with EHOSTUNREACH. Dropped, so every request gets exactly one answer.
fn stale_response(h: &Header) {
    debug!(
        "overlay: dropped a response to '{}' (tag {}) that matches no request in flight",
        h.topic, h.matchtag
    );
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
        s.set_sndhwm(0).map_err(zerr("set sndhwm"))?;
        s.set_rcvhwm(0).map_err(zerr("set rcvhwm"))?;
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
            .map_err(|_| BrokerError::Bootstrap("router endpoint is not UTF-8".into()))?;
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
        s.set_sndhwm(0).map_err(zerr("set sndhwm"))?;
        s.set_router_mandatory(true)
            .map_err(zerr("set router_mandatory"))?;
        s.set_curve_server(true).map_err(zerr("set curve_server"))?;
        s.set_curve_secretkey(keys.secret())
            .map_err(zerr("set curve secret key"))?;
        s.set_zap_domain(CLIENT_DOMAIN)
            .map_err(zerr("set zap domain"))?;
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

struct ChildLink {
    rid: Vec<u8>,
    principal: String,
    session: u64,
    peer: Peer,
}

#[derive(PartialEq, Eq, Debug)]
enum ParentState {
    None,
    Joining,
    Online,
}

/// Signals, as flags plus a pipe that wakes the poll loop.
pub struct Signals {
    pub pipe: UnixStream,
    /// SIGTERM or SIGINT: shut down.
    pub term: Arc<std::sync::atomic::AtomicBool>,
    /// SIGHUP: reload the policy.
    pub hup: Arc<std::sync::atomic::AtomicBool>,
}

/// How a client is connected.
enum ClientConn {
    /// The local connector: a UNIX stream with our framing.
    Stream {
        stream: UnixStream,
        dec: FrameDecoder,
        out: Vec<u8>,
        out_pos: usize,
    },
    /// The remote client endpoint: a ZeroMQ routing id.
    Remote { rid: Vec<u8> },
}

struct ClientEntry {
    conn: ClientConn,
    subs: Vec<String>,
    principal: String,
    roles: Roles,
    mech: ClientMech,
    address: String,
    /// The policy generation `roles` were decided under.
    generation: u64,
    dead: bool,
}

impl ClientEntry {
    fn has_output(&self) -> bool {
        matches!(&self.conn, ClientConn::Stream { out, out_pos, .. } if *out_pos < out.len())
    }
}

/// A payload that is either a received ZeroMQ frame (moved, never copied,
/// when forwarded to another ZeroMQ socket) or bytes from a local client.
enum Payload {
    Zmq(zmq::Message),
    Bytes(Vec<u8>),
}

impl Payload {
    fn as_slice(&self) -> &[u8] {
        match self {
            Payload::Zmq(m) => m,
            Payload::Bytes(v) => v,
        }
    }

    fn into_msg(self) -> zmq::Message {
        match self {
            Payload::Zmq(m) => m,
            Payload::Bytes(v) => zmq::Message::from(v),
        }
    }
}

pub struct Broker {
    rank: u32,
    topo: Topology,
    instance: String,
    session: u64,
    start: Instant,
    _ctx: zmq::Context,
    zap: ZapHandle,
    _policy: Arc<BrokerPolicy>,
    authz: Arc<dyn ClientAuthz>,
    router: Option<zmq::Socket>,
    client_router: Option<zmq::Socket>,
    remote_ids: HashMap<Vec<u8>, u32>,
    dealer: Option<zmq::Socket>,
    /// DISCONNECTED events of the dealer and the router.
    dealer_monitor: Option<zmq::Socket>,
    router_monitor: Option<zmq::Socket>,
    parent_state: ParentState,
    parent_card: Option<Card>,
    parent_peer: Option<Peer>,
    keys: CurveKeypair,
    timing: Timing,
    pending: Pending,
    next_heartbeat_ms: u64,
    /// When to try joining the parent again after losing it.
    rejoin_at_ms: Option<u64>,
    listener: UnixListener,
    local_path: PathBuf,
    ipc_path: Option<PathBuf>,
    clients: HashMap<u32, ClientEntry>,
    /// The next local client id (never 0).
    next_client: u32,
    owner_uid: u32,
    expected: HashMap<u32, String>,
    children: HashMap<u32, ChildLink>,
    by_rid: HashMap<Vec<u8>, u32>,
    health: Health,
    modules: Registry,
    info: BrokerInfo,
    sequencer: Sequencer,
    gaps: GapDetector,
    /// Rank 0's incarnation, stamped (as the header's nodeid) on every
    /// event it sequences, so a restarted rank 0 starts a new sequence.
    epoch: u32,
    /// Recent events, replayed to a child that rejoins after a link loss.
    replay: Ring<(Header, Vec<u8>)>,
    pmi_fd: Option<OwnedFd>,
    signals: Signals,
    hdr_buf: Vec<u8>,
    rot: crate::rotate::RotState,
}

impl Broker {
    /// Finish setting up from a bootstrap plan and the already bound sockets.
    pub fn new(
        plan: Plan,
        bound: Bound,
        pmi_fd: Option<OwnedFd>,
        signals: Signals,
    ) -> Result<Broker, BrokerError> {
        let Bound {
            ctx,
            zap,
            policy,
            router,
            endpoint,
            client_router,
            client_endpoint,
        } = bound;
        let mut session_bytes = [0u8; 8];
        getrandom::getrandom(&mut session_bytes)
            .map_err(|e| BrokerError::Bootstrap(format!("random session id: {e}")))?;
        let session = u64::from_be_bytes(session_bytes);

        let local_path = plan.rundir.join(format!("local-{}", plan.rank));
        let _ = std::fs::remove_file(&local_path);
        let listener = UnixListener::bind(&local_path).map_err(|source| BrokerError::Io {
            what: "bind the local connector",
            path: local_path.clone(),
            source,
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| BrokerError::Io {
                what: "configure the local connector",
                path: local_path.clone(),
                source,
            })?;

        let ipc_path = endpoint
            .as_deref()
            .and_then(|e| e.strip_prefix("ipc://"))
            .map(PathBuf::from);
        let info = BrokerInfo {
            instance: plan.instance.clone(),
            endpoint,
            public_key: plan.keys.public_z85(),
            client_endpoint,
            local_uri: format!("local://{}", local_path.display()),
            pid: std::process::id(),
        };
        let start = Instant::now();
        let mut b = Broker {
            rank: plan.rank,
            topo: plan.topo,
            instance: plan.instance,
            session,
            start,
            _ctx: ctx,
            zap,
            authz: policy.clients.clone(),
            _policy: policy,
            router,
            client_router,
            remote_ids: HashMap::new(),
            dealer: None,
            dealer_monitor: None,
            router_monitor: None,
            parent_state: ParentState::None,
            parent_card: plan.parent,
            parent_peer: None,
            keys: plan.keys,
            timing: plan.timing,
            pending: Pending::default(),
            next_heartbeat_ms: 0,
            rejoin_at_ms: None,
            listener,
            local_path,
            ipc_path,
            clients: HashMap::new(),
            // Client ids start at a random point, so a restarted broker's
            // clients never reuse its previous incarnation's ids: a stale
            // response (same route, same matchtag) then matches nothing.
            next_client: ((session >> 16) as u32).max(1),
            owner_uid: plan.owner_uid,
            expected: plan.children,
            children: HashMap::new(),
            by_rid: HashMap::new(),
            health: Health::new(plan.topo, plan.rank, 0),
            modules: Registry::standard(),
            info,
            sequencer: Sequencer::default(),
            gaps: GapDetector::default(),
            epoch: (session >> 32) as u32 ^ session as u32,
            replay: Ring::new(EVENT_REPLAY),
            pmi_fd,
            signals,
            hdr_buf: Vec::with_capacity(256),
            rot: Default::default(),
        };
        if let Some(r) = &b.router {
            b.router_monitor = Some(disconnect_monitor(&b._ctx, r)?);
        }
        if b.parent_card.is_some() {
            b.connect_parent()?;
        }
        Ok(b)
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// (Re)connect to the parent with a fresh session and say hello.
    fn connect_parent(&mut self) -> Result<(), BrokerError> {
        let Some(mut card) = self.parent_card.clone() else {
            return Ok(());
        };
        if let Some(k) = crate::gss::parent_key(&self._policy) {
            card.public_key = k;
        }
        let ep = card.endpoint.clone().ok_or_else(|| {
            BrokerError::Bootstrap(
                "the parent's business card has no endpoint; the parent has no children in its plan: check --size and --fanout agree on every broker".into(),
            )
        })?;
        self.dealer = None;
        let mut session_bytes = [0u8; 8];
        getrandom::getrandom(&mut session_bytes)
            .map_err(|e| BrokerError::Bootstrap(format!("random session id: {e}")))?;
        self.session = u64::from_be_bytes(session_bytes);
        let mut s = self
            ._ctx
            .socket(zmq::DEALER)
            .map_err(zerr("create dealer"))?;
        tcp_liveness(&mut s, &self.timing)?;
        s.set_linger(0).map_err(zerr("set linger"))?;
        s.set_sndhwm(0).map_err(zerr("set sndhwm"))?;
        s.set_rcvhwm(0).map_err(zerr("set rcvhwm"))?;
        let rid = format!("{}:{:016x}", self.rank, self.session).into_bytes();
        s.set_identity(&rid).map_err(zerr("set identity"))?;
        s.set_curve_serverkey(&card.public_key)
            .map_err(zerr("set curve server key"))?;
        s.set_curve_publickey(self.keys.public())
            .map_err(zerr("set curve public key"))?;
        s.set_curve_secretkey(self.keys.secret())
            .map_err(zerr("set curve secret key"))?;
        s.connect(&ep).map_err(|e| BrokerError::Bind {
            endpoint: ep.clone(),
            reason: format!("connect: {}", e.message()),
        })?;
        self.dealer_monitor = Some(disconnect_monitor(&self._ctx, &s)?);
        self.dealer = Some(s);
        self.parent_state = ParentState::Joining;
        self.parent_peer = Some(Peer::new(self.now_ms()));
        self.rejoin_at_ms = None;
        self.send_hello()
    }

    /// The parent link is gone: answer what was in flight over it, and
    /// try to join again shortly.
    fn lose_parent(&mut self, reason: &str) {
        warn!("overlay: lost the parent link ({reason}); rejoining");
        self.rot.up.abandon();
        crate::gss::parent_lost(&self._policy);
        for r in self.pending.fail_link(Link::Parent) {
            self.fail_in_flight(r, "the parent link was lost");
        }
        // Requests the old parent session sent down: their responses would
        // reach a session the parent no longer knows.
        self.pending.forget_from(Hop::Parent);
        self.dealer = None;
        self.dealer_monitor = None;
        self.parent_state = ParentState::Joining;
        self.parent_peer = None;
        self.rejoin_at_ms = Some(self.now_ms() + self.timing.heartbeat_ms.min(1000));
    }

    /// The child's link is gone: mark its subtree lost and answer what was
    /// in flight over it.
    fn lose_child(&mut self, rank: u32, reason: &str) {
        self.rot.held.remove(&rank);
        if let Some(link) = self.children.remove(&rank) {
            self.by_rid.remove(&link.rid);
        }
        warn!("overlay: lost rank {rank}: {reason}");
        let now = self.now_ms();
        self.health.child_lost(rank, reason, now);
        let failed = self.pending.fail_link(Link::Child(rank));
        // Requests that came up from the lost incarnation: their responses
        // must not reach whatever rejoins as this rank.
        let orphaned = self.pending.forget_from(Hop::Child(rank));
        if orphaned > 0 {
            debug!("overlay: {orphaned} requests from lost rank {rank} forgotten");
        }
        let msg = format!("rank {rank} was lost ({reason})");
        for r in failed {
            self.fail_in_flight(r, &msg);
        }
    }

    fn fail_in_flight(&mut self, r: InFlight, why: &str) {
        let mut h = Header::request(r.topic, r.nodeid, r.matchtag);
        h.route = r.route;
        let resp = h.response(self.rank, errno::EHOSTUNREACH);
        let msg = format!("{why}; the request may or may not have been processed");
        self.route_response(resp, Payload::Bytes(msg.into_bytes()));
    }

    /// A child connection closed: libzmq does not say which, but a send to
    /// a routing id whose connection is gone fails at once (ROUTER_MANDATORY).
    fn probe_children(&mut self) {
        let hb = Header::control(HEARTBEAT_TOPIC);
        let links: Vec<(u32, Vec<u8>)> = self
            .children
            .iter()
            .map(|(r, l)| (*r, l.rid.clone()))
            .collect();
        for (rank, rid) in links {
            if !self.send_router_rid(&rid, &hb, Payload::Bytes(Vec::new())) {
                self.lose_child(rank, "its connection closed");
            }
        }
    }

    /// Timers: heartbeats out, liveness checks in, rejoin attempts.
    fn tick(&mut self) -> Result<(), BrokerError> {
        if crate::gss::parent_key_changed(&self._policy) {
            self.connect_parent()?;
        }
        let now = self.now_ms();
        if let Some(at) = self.rejoin_at_ms {
            if now >= at {
                self.connect_parent()?;
            }
        }
        if now < self.next_heartbeat_ms {
            return Ok(());
        }
        self.next_heartbeat_ms = now + self.timing.heartbeat_ms;
        let hb = Header::control(HEARTBEAT_TOPIC);
        if self.parent_state == ParentState::Online {
            if let Err(e) = self.send_parent(&hb, Payload::Bytes(Vec::new())) {
                debug!("overlay: heartbeat to parent failed: {e}");
            }
        }
        let ranks: Vec<u32> = self.children.keys().copied().collect();
        for rank in ranks {
            let Some(link) = self.children.get_mut(&rank) else {
                continue;
            };
            let rid = link.rid.clone();
            match link.peer.check(now, &self.timing) {
                Transition::BecameTorpid => {
                    let why = format!("no message for {:.1}s", self.timing.torpid_ms as f64 / 1e3);
                    warn!("overlay: rank {rank} is torpid: {why}");
                    self.health.set(rank, RankState::Torpid, &why, now);
                }
                Transition::BecameLost => {
                    let why = format!("no message for {:.1}s", self.timing.lost_ms as f64 / 1e3);
                    self.lose_child(rank, &why);
                    continue;
                }
                Transition::Recovered | Transition::None => {}
            }
            self.send_router_rid(&rid, &hb, Payload::Bytes(Vec::new()));
        }
        if let Some(p) = self.parent_peer.as_mut() {
            if self.parent_state == ParentState::Online
                && p.check(now, &self.timing) == Transition::BecameLost
            {
                let why = format!("no message for {:.1}s", self.timing.lost_ms as f64 / 1e3);
                self.lose_parent(&why);
            }
        }
        Ok(())
    }

    /// Milliseconds until the next timer, for the poll timeout.
    fn poll_timeout_ms(&self) -> i64 {
        let now = self.now_ms();
        let mut next = self.next_heartbeat_ms;
        if let Some(at) = self.rejoin_at_ms {
            next = next.min(at);
        }
        let max = if self.rotation_busy() { 10 } else { 1000 };
        next.saturating_sub(now).clamp(1, max) as i64
    }

    fn send_hello(&mut self) -> Result<(), BrokerError> {
        let hello = Hello {
            rank: self.rank,
            version: PROTOCOL_VERSION,
            session: self.session,
            instance: self.instance.clone(),
            last_event: self.gaps.position(),
        };
        let parent = self.topo.parent(self.rank).unwrap_or(0);
        let h = Header::request(HELLO_TOPIC, parent, 0);
        self.send_parent(&h, Payload::Bytes(hello.encode()))
    }

    /// Run until a signal, the launcher going away, or a fatal error.
    pub fn run(mut self) -> Result<(), BrokerError> {
        let result = self.event_loop();
        self.shutdown();
        result
    }

    fn shutdown(&mut self) {
        let _ = std::fs::remove_file(&self.local_path);
        if let Some(p) = &self.ipc_path {
            let _ = std::fs::remove_file(p);
        }
        self.router_monitor = None;
        self.dealer_monitor = None;
        self.router = None;
        self.client_router = None;
        self.dealer = None;
        self.clients.clear();
    }

    fn event_loop(&mut self) -> Result<(), BrokerError> {
        let mut client_ids: Vec<u32> = Vec::new();
        let mut ready: Vec<(bool, bool)> = Vec::new();
        loop {
            if !self.zap.alive() {
                error!("zap handler died: no connection can be authenticated, so this broker stops admitting anyone and exits");
                return Err(BrokerError::ZapDied);
            }
            self.tick()?;
            let timeout = self.poll_timeout_ms();
            client_ids.clear();
            client_ids.extend(self.clients.keys().copied());
            let (sig_r, pmi_r, lis_r, rtr_r, dlr_r, crt_r, rmon_r, dmon_r);
            {
                let mut items = Vec::with_capacity(5 + client_ids.len());
                items.push(zmq::PollItem::from_fd(
                    self.signals.pipe.as_raw_fd(),
                    zmq::POLLIN,
                ));
                items.push(zmq::PollItem::from_fd(
                    self.pmi_fd.as_ref().map(|f| f.as_raw_fd()).unwrap_or(-1),
                    zmq::POLLIN,
                ));
                items.push(zmq::PollItem::from_fd(
                    self.listener.as_raw_fd(),
                    zmq::POLLIN,
                ));
                match &self.router {
                    Some(r) => items.push(r.as_poll_item(zmq::POLLIN)),
                    None => items.push(zmq::PollItem::from_fd(-1, zmq::POLLIN)),
                }
                match &self.dealer {
                    Some(d) => items.push(d.as_poll_item(zmq::POLLIN)),
                    None => items.push(zmq::PollItem::from_fd(-1, zmq::POLLIN)),
                }
                for s in [
                    &self.client_router,
                    &self.router_monitor,
                    &self.dealer_monitor,
                ] {
                    match s {
                        Some(c) => items.push(c.as_poll_item(zmq::POLLIN)),
                        None => items.push(zmq::PollItem::from_fd(-1, zmq::POLLIN)),
                    }
                }
                for id in &client_ids {
                    let c = &self.clients[id];
                    let mut ev = zmq::POLLIN;
                    if c.has_output() {
                        ev |= zmq::POLLOUT;
                    }
                    let fd = match &c.conn {
                        ClientConn::Stream { stream, .. } => stream.as_raw_fd(),
                        ClientConn::Remote { .. } => -1,
                    };
                    items.push(zmq::PollItem::from_fd(fd, ev));
                }
                match zmq::poll(&mut items, timeout) {
                    Ok(_) => {}
                    Err(zmq::Error::EINTR) => continue,
                    Err(e) => return Err(zerr("poll")(e)),
                }
                sig_r = items[0].get_revents().bits() != 0;
                pmi_r = items[1].get_revents().bits() != 0;
                lis_r = items[2].is_readable();
                rtr_r = items[3].is_readable();
                dlr_r = items[4].is_readable();
                crt_r = items[5].is_readable();
                rmon_r = items[6].is_readable();
                dmon_r = items[7].is_readable();
                ready.clear();
                for it in &items[8..] {
                    let rev = it.get_revents();
                    ready.push((
                        rev.intersects(zmq::POLLIN | zmq::POLLERR),
                        rev.contains(zmq::POLLOUT),
                    ));
                }
            }
            if sig_r {
                let mut b = [0u8; 64];
                while matches!(self.signals.pipe.read(&mut b), Ok(n) if n > 0) {}
            }
            if self.signals.term.load(std::sync::atomic::Ordering::SeqCst) {
                info!("received a termination signal; shutting down");
                return Ok(());
            }
            if self
                .signals
                .hup
                .swap(false, std::sync::atomic::Ordering::SeqCst)
            {
                match self.authz.reload() {
                    Ok(msg) => warn!("acl: SIGHUP: {msg}"),
                    Err(e) => error!("acl: SIGHUP: reload failed: {e}"),
                }
                if self.rot.files.is_some() {
                    match self.reload_keys() {
                        Ok(msg) => warn!("rotate: SIGHUP: {msg}"),
                        Err(e) => error!("rotate: SIGHUP: key reload failed: {e}"),
                    }
                }
            }
            if pmi_r {
                // The launcher never writes after the bootstrap: readable
                // means it closed its end, i.e. it went away.
                return Err(BrokerError::LauncherGone);
            }
            if lis_r {
                self.accept_clients();
            }
            if rtr_r {
                self.drain_router()?;
            }
            if dlr_r {
                self.drain_dealer()?;
            }
            if crt_r {
                self.drain_client_router()?;
            }
            if rmon_r && self.router_monitor.as_ref().is_some_and(drain_monitor) {
                self.probe_children();
            }
            if dmon_r
                && self.dealer_monitor.as_ref().is_some_and(drain_monitor)
                && self.parent_state == ParentState::Online
                && !self.rot.up.active()
            {
                self.lose_parent("the connection to the parent closed");
            }
            for (i, id) in client_ids.iter().enumerate() {
                let (r, w) = ready[i];
                if r {
                    self.read_client(*id);
                }
                if w {
                    self.flush_client(*id);
                }
            }
            self.flush_health()?;
            self.rotation_tick()?;
            self.flush_all_clients();
        }
    }

    // ----- clients: local connector and remote endpoint -----

    fn accept_clients(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => self.admit_local(stream),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    warn!("local: accept failed: {e}");
                    return;
                }
            }
        }
    }

    fn admit_local(&mut self, mut stream: UnixStream) {
        let uid = match nix::sys::socket::getsockopt(
            &stream.as_fd(),
            nix::sys::socket::sockopt::PeerCredentials,
        ) {
            Ok(c) => c.uid(),
            Err(e) => {
                warn!("local: verdict=deny mechanism=peercred reason=\"cannot read SO_PEERCRED: {e}\"");
                return;
            }
        };
        let principal = unix_principal(uid);
        let generation = self.authz.generation();
        let verdict = if uid == self.owner_uid {
            Ok(Roles::OWNER)
        } else {
            self.authz.decide(&principal, ClientMech::Local, "")
        };
        let roles = match verdict {
            Ok(roles) if !roles.is_empty() => roles,
            other => {
                let reason = other
                    .err()
                    .unwrap_or_else(|| "the policy grants no role".into());
                warn!("local: verdict=deny principal={principal} uid={uid} mechanism=peercred reason=\"{reason}\"");
                let msg = format!("permission denied: {principal} (uid {uid}): {reason}");
                let mut h = Header::request("connect", self.rank, 0);
                h.msg_type = MsgType::Response;
                h.errnum = errno::EPERM;
                let mut out = Vec::new();
                if encode_frame(&h, msg.as_bytes(), &mut out).is_ok() {
                    let _ = stream.set_write_timeout(Some(std::time::Duration::from_millis(100)));
                    let _ = stream.write_all(&out);
                }
                return;
            }
        };
        info!(
            "local: verdict=allow principal={principal} uid={uid} mechanism=peercred roles={roles}"
        );
        if stream.set_nonblocking(true).is_err() {
            return;
        }
        let id = self.new_client_id();
        self.clients.insert(
            id,
            ClientEntry {
                conn: ClientConn::Stream {
                    stream,
                    dec: FrameDecoder::new(),
                    out: Vec::new(),
                    out_pos: 0,
                },
                subs: Vec::new(),
                principal,
                roles,
                mech: ClientMech::Local,
                address: String::new(),
                generation,
                dead: false,
            },
        );
    }

    fn new_client_id(&mut self) -> u32 {
        loop {
            let id = self.next_client;
            self.next_client = self.next_client.wrapping_add(1).max(1);
            if !self.clients.contains_key(&id) {
                return id;
            }
        }
    }

    fn read_client(&mut self, id: u32) {
        let mut buf = [0u8; 65536];
        let mut frames = Vec::new();
        {
            let Some(c) = self.clients.get_mut(&id) else {
                return;
            };
            let ClientConn::Stream { stream, dec, .. } = &mut c.conn else {
                return;
            };
            loop {
                match stream.read(&mut buf) {
                    Ok(0) => {
                        c.dead = true;
                        break;
                    }
                    Ok(n) => {
                        dec.push(&buf[..n]);
                        if n < buf.len() {
                            break;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => {
                        c.dead = true;
                        break;
                    }
                }
            }
            loop {
                match dec.next_frame() {
                    Ok(Some(f)) => frames.push(f),
                    Ok(None) => break,
                    Err(e) => {
                        warn!(
                            "local: client {} sent a bad frame ({e}); disconnecting it",
                            c.principal
                        );
                        c.dead = true;
                        break;
                    }
                }
            }
        }
        for (h, p) in frames {
            self.client_ingress(id, h, Payload::Bytes(p));
        }
        if self.clients.get(&id).is_some_and(|c| c.dead) {
            self.remove_client(id);
        }
    }

    fn remove_client(&mut self, id: u32) {
        if let Some(ClientEntry {
            conn: ClientConn::Remote { rid },
            ..
        }) = self.clients.remove(&id)
        {
            self.remote_ids.remove(&rid);
        }
    }

    /// A request from a client: re-check its access if the policy changed,
    /// stamp its identity, and route it.
    fn client_ingress(&mut self, id: u32, mut h: Header, payload: Payload) {
        let generation = self.authz.generation();
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        if h.msg_type != MsgType::Request {
            debug!("client {}: sent a non-request; ignored", c.principal);
            return;
        }
        if c.generation != generation {
            c.generation = generation;
            let is_owner = c.mech == ClientMech::Local && c.roles == Roles::OWNER;
            if !is_owner {
                match self.authz.decide(&c.principal, c.mech, &c.address) {
                    Ok(roles) if !roles.is_empty() => c.roles = roles,
                    other => {
                        let reason = other
                            .err()
                            .unwrap_or_else(|| "the policy grants no role".into());
                        warn!(
                            "authz: verdict=deny principal={} address={} mechanism={} reason=\"access revoked by policy reload: {reason}\"",
                            c.principal,
                            c.address,
                            c.mech.as_str()
                        );
                        c.dead = true;
                        let mut r = h.response(self.rank, errno::EPERM);
                        r.route = vec![Hop::Local(id)];
                        r.matchtag = 0;
                        let msg = format!("permission denied: access revoked: {reason}");
                        self.route_response(r, Payload::Bytes(msg.into_bytes()));
                        return;
                    }
                }
            }
        }
        // Identity is stamped here, at ingress; whatever the client claimed is discarded.
        h.userid.clone_from(&c.principal);
        h.roles = c.roles;
        h.route.clear();
        h.route.push(Hop::Local(id));
        self.route_request(h, payload);
    }

    fn queue_client(&mut self, id: u32, h: &Header, payload: Payload) {
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        match &mut c.conn {
            ClientConn::Stream { out, out_pos, .. } => {
                if out.len() - *out_pos > MAX_CLIENT_BACKLOG {
                    warn!(
                        "local: client {} is not reading; disconnecting it",
                        c.principal
                    );
                    c.dead = true;
                    return;
                }
                if let Err(e) = encode_frame(h, payload.as_slice(), out) {
                    warn!("local: cannot encode a message for {}: {e}", c.principal);
                }
            }
            ClientConn::Remote { rid } => {
                let Some(router) = &self.client_router else {
                    return;
                };
                self.hdr_buf.clear();
                if h.encode_into(&mut self.hdr_buf).is_err() {
                    return;
                }
                let r = router
                    .send(&rid[..], zmq::SNDMORE | zmq::DONTWAIT)
                    .and_then(|()| router.send(&self.hdr_buf[..], zmq::SNDMORE | zmq::DONTWAIT))
                    .and_then(|()| router.send(payload.into_msg(), zmq::DONTWAIT));
                if let Err(e) = r {
                    debug!("client {}: gone ({e}); forgetting it", c.principal);
                    c.dead = true;
                }
            }
        }
    }

    fn flush_client(&mut self, id: u32) {
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        if let ClientConn::Stream {
            stream,
            out,
            out_pos,
            ..
        } = &mut c.conn
        {
            while *out_pos < out.len() {
                match stream.write(&out[*out_pos..]) {
                    Ok(n) => *out_pos += n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => {
                        c.dead = true;
                        break;
                    }
                }
            }
            if *out_pos == out.len() {
                out.clear();
                *out_pos = 0;
            }
        }
        if c.dead {
            self.remove_client(id);
        }
    }

    fn flush_all_clients(&mut self) {
        let pending: Vec<u32> = self
            .clients
            .iter()
            .filter(|(_, c)| c.has_output() || c.dead)
            .map(|(id, _)| *id)
            .collect();
        for id in pending {
            self.flush_client(id);
        }
    }

    fn drain_client_router(&mut self) -> Result<(), BrokerError> {
        for _ in 0..BATCH {
            let Some(router) = &self.client_router else {
                return Ok(());
            };
            let mut rid = zmq::Message::new();
            match router.recv(&mut rid, zmq::DONTWAIT) {
                Ok(()) => {}
                Err(zmq::Error::EAGAIN) => return Ok(()),
                Err(zmq::Error::EINTR) => continue,
                Err(e) => return Err(zerr("receive from a remote client")(e)),
            }
            let mut parts = Vec::with_capacity(2);
            let mut more = rid.get_more();
            while more {
                let mut m = zmq::Message::new();
                router
                    .recv(&mut m, 0)
                    .map_err(zerr("receive from a remote client"))?;
                more = m.get_more();
                if parts.len() < 3 {
                    parts.push(m);
                }
            }
            if parts.is_empty() || parts.len() > 2 {
                debug!("remote: dropped a message with {} frames", parts.len());
                continue;
            }
            let first = &mut parts[0];
            let user_id = first.gets("User-Id").unwrap_or("").to_string();
            let roles = first
                .gets("Roles")
                .and_then(|r| Roles::parse_list(r).ok())
                .unwrap_or(Roles::NONE);
            let address = first.gets("Peer-Address").unwrap_or("").to_string();
            if user_id.is_empty() || roles.is_empty() {
                // Defence in depth: ZAP must have authenticated this peer.
                warn!("remote: verdict=deny address={address} reason=\"no authenticated User-Id or roles on the message\"; dropped");
                continue;
            }
            if !crate::gss::message_allowed(&self._policy, parts.first_mut(), &user_id) {
                continue;
            }
            let h = match decode_header(&parts[0]) {
                Ok(h) => h,
                Err(e) => {
                    warn!("remote: dropped an undecodable message from principal={user_id}: {e}");
                    continue;
                }
            };
            let payload = if parts.len() == 2 {
                parts.pop().map(Payload::Zmq).expect("two parts")
            } else {
                Payload::Bytes(Vec::new())
            };
            let rid = rid.to_vec();
            let id = match self.remote_ids.get(&rid) {
                Some(id) if self.clients.get(id).is_some_and(|c| c.principal == user_id) => *id,
                _ => {
                    let id = self.new_client_id();
                    self.remote_ids.insert(rid.clone(), id);
                    self.clients.insert(
                        id,
                        ClientEntry {
                            conn: ClientConn::Remote { rid },
                            subs: Vec::new(),
                            principal: user_id,
                            roles,
                            mech: if self._policy.gss.get().is_some() {
                                ClientMech::Gssapi
                            } else {
                                ClientMech::Curve
                            },
                            address,
                            generation: self.authz.generation(),
                            dead: false,
                        },
                    );
                    id
                }
            };
            self.client_ingress(id, h, payload);
            if self.clients.get(&id).is_some_and(|c| c.dead) {
                self.remove_client(id);
            }
        }
        Ok(())
    }

    // ----- overlay sockets -----

    fn drain_router(&mut self) -> Result<(), BrokerError> {
        for _ in 0..BATCH {
            let Some(router) = &self.router else {
                return Ok(());
            };
            let mut rid = zmq::Message::new();
            match router.recv(&mut rid, zmq::DONTWAIT) {
                Ok(()) => {}
                Err(zmq::Error::EAGAIN) => return Ok(()),
                Err(zmq::Error::EINTR) => continue,
                Err(e) => return Err(zerr("receive from a child")(e)),
            }
            let mut parts = Vec::with_capacity(2);
            let mut more = rid.get_more();
            while more {
                let mut m = zmq::Message::new();
                router
                    .recv(&mut m, 0)
                    .map_err(zerr("receive from a child"))?;
                more = m.get_more();
                if parts.len() < 3 {
                    parts.push(m);
                }
            }
            // The routing-id frame is made locally and carries no metadata;
            // frames that came over the wire carry the ZAP User-Id.
            let user_id = parts
                .first_mut()
                .and_then(|m| m.gets("User-Id").map(str::to_string))
                .unwrap_or_default();
            if !crate::gss::message_allowed(&self._policy, parts.first_mut(), &user_id) {
                continue;
            }
            self.child_ingress(rid.to_vec(), &user_id, parts)?;
        }
        Ok(())
    }

    fn child_ingress(
        &mut self,
        rid: Vec<u8>,
        user_id: &str,
        mut parts: Vec<zmq::Message>,
    ) -> Result<(), BrokerError> {
        if parts.is_empty() || parts.len() > 2 {
            warn!(
                "overlay: dropped a message with {} frames from a child; expected 1 or 2",
                parts.len()
            );
            return Ok(());
        }
        let payload = if parts.len() == 2 {
            parts.pop().map(Payload::Zmq).expect("two parts")
        } else {
            Payload::Bytes(Vec::new())
        };
        let h = match decode_header(&parts[0]) {
            Ok(h) => h,
            Err(e) => {
                warn!("overlay: dropped an undecodable message from principal={user_id}: {e}");
                return Ok(());
            }
        };
        let Some(&rank) = self.by_rid.get(&rid) else {
            if h.msg_type == MsgType::Request && h.topic == HELLO_TOPIC {
                let address = parts
                    .first_mut()
                    .and_then(|m| m.gets("Peer-Address").map(str::to_string))
                    .unwrap_or_default();
                self.child_hello(rid, user_id, &address, &h, payload.as_slice());
            } else {
                // An authenticated peer talking from a session we do not
                // know (e.g. we declared it lost): tell it to rejoin.
                debug!("overlay: message from unknown session of principal={user_id}; asking it to rejoin");
                self.send_router_rid(
                    &rid,
                    &Header::control(REJOIN_TOPIC),
                    Payload::Bytes(Vec::new()),
                );
            }
            return Ok(());
        };
        let now = self.now_ms();
        if let Some(link) = self.children.get_mut(&rank) {
            if link.peer.heard(now) == Transition::Recovered {
                info!("overlay: rank {rank} recovered");
                self.health.set(rank, RankState::Online, "recovered", now);
            }
        }
        // Defence in depth: the ZAP-authenticated identity on every message
        // must be the one this child joined with.
        if self.children.get(&rank).map(|c| c.principal.as_str()) != Some(user_id) {
            warn!(
                "overlay: verdict=deny rank={rank} principal={user_id} reason=\"User-Id does not match the principal that joined as rank {rank}\"; dropped"
            );
            return Ok(());
        }
        match h.msg_type {
            MsgType::Request => {
                let mut h = h;
                h.route.push(Hop::Child(rank));
                self.route_request(h, payload);
            }
            MsgType::Response => {
                if self
                    .pending
                    .complete(Link::Child(rank), &h.route, h.matchtag)
                {
                    self.route_response(h, payload)
                } else {
                    stale_response(&h);
                }
            }
            MsgType::Control if h.topic == HEARTBEAT_TOPIC => {}
            MsgType::Control if h.topic == crate::rotate::RELINK_TOPIC => {
                self.child_relink(rank, rid);
            }
            MsgType::Control if h.topic == HEALTH_TOPIC => {
                match serde_json::from_slice::<Vec<Delta>>(payload.as_slice()) {
                    Ok(deltas) => {
                        let now = self.now_ms();
                        let ignored = self.health.apply_from_child(rank, &deltas, now);
                        if ignored > 0 {
                            warn!("overlay: rank {rank} reported {ignored} state changes for ranks outside its subtree; ignored");
                        }
                    }
                    Err(e) => warn!("overlay: bad health report from rank {rank}: {e}"),
                }
            }
            other => debug!("overlay: ignored {other:?} '{}' from rank {rank}", h.topic),
        }
        Ok(())
    }

    fn child_hello(
        &mut self,
        rid: Vec<u8>,
        user_id: &str,
        address: &str,
        h: &Header,
        payload: &[u8],
    ) {
        if self.relink_hello(&rid, user_id, h, payload) {
            return;
        }
        // A restarted child says hello with a new session while its old
        // session may still look online: if the old one has been silent
        // for two heartbeats, it is gone.
        if let Ok(hello) = Hello::decode(payload) {
            let now = self.now_ms();
            let stale = self.children.get(&hello.rank).is_some_and(|l| {
                l.session != hello.session
                    && l.principal == user_id
                    && now.saturating_sub(l.peer.last_heard_ms()) > 2 * self.timing.heartbeat_ms
            });
            if stale {
                self.lose_child(hello.rank, "replaced by a new session");
            }
        }
        let verdict = Hello::decode(payload).and_then(|hello| {
            let expected = self.hello_expected(hello.rank, user_id);
            HelloCheck {
                topo: &self.topo,
                my_rank: self.rank,
                my_version: PROTOCOL_VERSION,
                my_instance: &self.instance,
                authenticated: user_id,
                expected: expected.as_deref(),
                online_session: self.children.get(&hello.rank).map(|c| c.session),
            }
            .check(&hello)
            .map(|()| hello)
        });
        match verdict {
            Ok(hello) => {
                info!(
                    "overlay: verdict=allow rank={} principal={user_id} address={address} mechanism=CURVE reason=\"hello accepted\"",
                    hello.rank
                );
                self.by_rid.insert(rid.clone(), hello.rank);
                let now = self.now_ms();
                self.children.insert(
                    hello.rank,
                    ChildLink {
                        rid: rid.clone(),
                        principal: user_id.to_string(),
                        session: hello.session,
                        peer: Peer::new(now),
                    },
                );
                self.health
                    .set(hello.rank, RankState::Online, "joined", now);
                let resp = h.response(self.rank, 0);
                self.send_router_rid(&rid, &resp, Payload::Bytes(Vec::new()));
                if let Some(after) = hello.last_event {
                    self.replay_events(&rid, hello.rank, after);
                }
            }
            Err(e) => {
                warn!("overlay: verdict=deny principal={user_id} address={address} mechanism=CURVE reason=\"{e}\"");
                // A restarted broker may say hello before we noticed its old
                // session die: let it retry rather than exit.
                let code = if matches!(e, HelloError::AlreadyOnline { .. }) {
                    errno::EAGAIN
                } else {
                    errno::EPERM
                };
                let resp = h.response(self.rank, code);
                self.send_router_rid(&rid, &resp, Payload::Bytes(e.to_string().into_bytes()));
            }
        }
    }

    fn drain_dealer(&mut self) -> Result<(), BrokerError> {
        for _ in 0..BATCH {
            let Some(dealer) = &self.dealer else {
                return Ok(());
            };
            let mut first = zmq::Message::new();
            match dealer.recv(&mut first, zmq::DONTWAIT) {
                Ok(()) => {}
                Err(zmq::Error::EAGAIN) => return Ok(()),
                Err(zmq::Error::EINTR) => continue,
                Err(e) => return Err(zerr("receive from the parent")(e)),
            }
            let mut parts = vec![first];
            while parts.last().is_some_and(|m| m.get_more()) {
                let mut m = zmq::Message::new();
                dealer
                    .recv(&mut m, 0)
                    .map_err(zerr("receive from the parent"))?;
                parts.push(m);
            }
            if parts.len() > 2 {
                warn!(
                    "overlay: dropped a message with {} frames from the parent",
                    parts.len()
                );
                continue;
            }
            let payload = if parts.len() == 2 {
                parts.pop().map(Payload::Zmq).expect("two parts")
            } else {
                Payload::Bytes(Vec::new())
            };
            let h = match decode_header(&parts[0]) {
                Ok(h) => h,
                Err(e) => {
                    warn!("overlay: dropped an undecodable message from the parent: {e}");
                    continue;
                }
            };
            self.parent_ingress(h, payload)?;
        }
        Ok(())
    }

    fn parent_ingress(&mut self, mut h: Header, payload: Payload) -> Result<(), BrokerError> {
        let now = self.now_ms();
        if let Some(p) = self.parent_peer.as_mut() {
            p.heard(now);
        }
        if self.is_relink_answer(&h) {
            self.up_joined(&h, &payload);
            return Ok(());
        }
        if h.msg_type == MsgType::Control && self.rotation_control(&h, &payload)? {
            return Ok(());
        }
        match h.msg_type {
            MsgType::Response
                if self.parent_state == ParentState::Joining
                    && h.topic == HELLO_TOPIC
                    && h.route.is_empty() =>
            {
                if h.errnum != 0 {
                    let why = String::from_utf8_lossy(payload.as_slice()).into_owned();
                    if h.errnum == errno::EAGAIN {
                        // Our previous session is still online there; try again.
                        warn!("overlay: parent rank {} says: {why}; retrying", h.nodeid);
                        self.dealer = None;
                        self.parent_state = ParentState::Joining;
                        self.rejoin_at_ms = Some(now + self.timing.heartbeat_ms.min(1000));
                        return Ok(());
                    }
                    return Err(BrokerError::HelloRefused {
                        parent: h.nodeid,
                        reason: why,
                    });
                }
                info!("overlay: joined parent rank {}", h.nodeid);
                self.parent_state = ParentState::Online;
                // The parent may have marked our subtree lost: resend it all.
                self.health.requeue_all();
            }
            MsgType::Request => {
                h.route.push(Hop::Parent);
                self.route_request(h, payload);
            }
            MsgType::Response => {
                if self.pending.complete(Link::Parent, &h.route, h.matchtag) {
                    self.route_response(h, payload)
                } else {
                    stale_response(&h);
                }
            }
            MsgType::Event => self.event_arrived(h, payload),
            MsgType::Control if h.topic == HEARTBEAT_TOPIC => {}
            MsgType::Control if h.topic == REJOIN_TOPIC => {
                self.lose_parent("the parent does not know this session");
            }
            MsgType::Control if h.topic == DISCONNECT_TOPIC => {
                let why = String::from_utf8_lossy(payload.as_slice()).into_owned();
                return Err(BrokerError::Disconnected(why));
            }
            MsgType::Control => debug!("overlay: ignored control '{}' from the parent", h.topic),
        }
        Ok(())
    }

    fn flush_health(&mut self) -> Result<(), BrokerError> {
        if self.dealer.is_none() {
            self.health.take_pending();
            return Ok(());
        }
        if self.parent_state != ParentState::Online {
            return Ok(());
        }
        let deltas = self.health.take_pending();
        if deltas.is_empty() {
            return Ok(());
        }
        let body =
            serde_json::to_vec(&deltas).map_err(|e| BrokerError::Bootstrap(e.to_string()))?;
        self.send_parent(&Header::control(HEALTH_TOPIC), Payload::Bytes(body))
    }

    // ----- sending -----

    fn send_parent(&mut self, h: &Header, payload: Payload) -> Result<(), BrokerError> {
        let Some(payload) = self.queue_up(h, payload) else {
            return Ok(());
        };
        let Some(dealer) = &self.dealer else {
            return Ok(());
        };
        self.hdr_buf.clear();
        if let Err(e) = h.encode_into(&mut self.hdr_buf) {
            warn!("overlay: cannot encode a message for the parent: {e}");
            return Ok(());
        }
        dealer
            .send(&self.hdr_buf[..], zmq::SNDMORE | zmq::DONTWAIT)
            .and_then(|()| dealer.send(payload.into_msg(), zmq::DONTWAIT))
            .map_err(zerr("send to the parent"))
    }

    /// Send to a ROUTER peer by routing id. Returns false if it is gone.
    fn send_router_rid(&mut self, rid: &[u8], h: &Header, payload: Payload) -> bool {
        let Some(payload) = self.queue_down(rid, h, payload) else {
            return true;
        };
        let Some(router) = &self.router else {
            return false;
        };
        self.hdr_buf.clear();
        if let Err(e) = h.encode_into(&mut self.hdr_buf) {
            warn!("overlay: cannot encode a message for a child: {e}");
            return false;
        }
        let r = router
            .send(rid, zmq::SNDMORE | zmq::DONTWAIT)
            .and_then(|()| router.send(&self.hdr_buf[..], zmq::SNDMORE | zmq::DONTWAIT))
            .and_then(|()| router.send(payload.into_msg(), zmq::DONTWAIT));
        match r {
            Ok(()) => true,
            Err(e) => {
                debug!("overlay: send to a child failed: {e}");
                false
            }
        }
    }

    fn send_child(&mut self, rank: u32, h: &Header, payload: Payload) -> bool {
        let Some(rid) = self.children.get(&rank).map(|c| c.rid.clone()) else {
            return false;
        };
        self.send_router_rid(&rid, h, payload)
    }

    // ----- routing -----

    fn service_role(&self, topic: &str) -> Option<Roles> {
        match topic {
            "event.pub" if self.rank == 0 => Some(Roles::OPERATOR),
            "event.subscribe" | "event.unsubscribe" => Some(Roles::USER),
            DISCONNECT_TOPIC | "acl.reload" | "acl.check" => Some(Roles::ADMIN),
            crate::rotate::SWITCH_TOPIC | crate::rotate::RELOAD_TOPIC => Some(Roles::ADMIN),
            crate::rotate::STATUS_TOPIC => Some(Roles::USER),
            t => self.modules.lookup(t),
        }
    }

    fn route_request(&mut self, h: Header, payload: Payload) {
        let role = self.service_role(&h.topic);
        match next_hop(&self.topo, self.rank, h.nodeid, role.is_some()) {
            Next::Local => {
                let needed = role.expect("local implies a service");
                if !h.roles.satisfies(needed) {
                    let msg = format!(
                        "{} requires role '{needed}'; principal {} has roles '{}'",
                        h.topic, h.userid, h.roles
                    );
                    warn!("authz: verdict=deny principal={} topic={} reason=\"missing role {needed}\"", h.userid, h.topic);
                    self.authz.role_refused(&h.userid, h.roles, &h.topic);
                    self.respond_err(&h, errno::EPERM, &msg);
                    return;
                }
                self.handle_local(h, payload);
            }
            Next::Up => {
                if self.parent_state != ParentState::Online {
                    self.respond_err(
                        &h,
                        errno::EHOSTUNREACH,
                        "this broker has not joined its parent yet; retry shortly",
                    );
                    return;
                }
                let track = h.flags & canopy_proto::FLAG_NORESPONSE == 0;
                let inflight = track.then(|| in_flight(&h));
                if let Err(e) = self.send_parent(&h, payload) {
                    warn!("overlay: {e}");
                    self.respond_err(&h, errno::EHOSTUNREACH, "cannot reach the parent broker");
                } else if let Some(r) = inflight {
                    self.pending.insert(Link::Parent, r);
                }
            }
            Next::Down(child) => {
                let inflight =
                    (h.flags & canopy_proto::FLAG_NORESPONSE == 0).then(|| in_flight(&h));
                if self.send_child(child, &h, payload) {
                    if let Some(r) = inflight {
                        self.pending.insert(Link::Child(child), r);
                    }
                } else {
                    let msg = format!("rank {child} is not online; check 'canopy overlay status'");
                    self.respond_err(&h, errno::EHOSTUNREACH, &msg);
                }
            }
            Next::Fail(e) => {
                let msg = match e {
                    errno::ENOSYS => format!("no service offers '{}'", h.topic),
                    errno::EHOSTUNREACH => format!(
                        "rank {} does not exist in this instance of size {}",
                        h.nodeid,
                        self.topo.size()
                    ),
                    _ => "cannot route this request".to_string(),
                };
                self.respond_err(&h, e, &msg);
            }
        }
    }

    fn respond_err(&mut self, req: &Header, errnum: u32, msg: &str) {
        if req.flags & canopy_proto::FLAG_NORESPONSE != 0 {
            return;
        }
        let r = req.response(self.rank, errnum);
        self.route_response(r, Payload::Bytes(msg.as_bytes().to_vec()));
    }

    fn respond(&mut self, req: &Header, payload: Payload) {
        if req.flags & canopy_proto::FLAG_NORESPONSE != 0 {
            return;
        }
        let r = req.response(self.rank, 0);
        self.route_response(r, payload);
    }

    fn route_response(&mut self, mut h: Header, payload: Payload) {
        match h.route.pop() {
            Some(Hop::Parent) => {
                if let Err(e) = self.send_parent(&h, payload) {
                    warn!("overlay: cannot send a response to the parent: {e}");
                }
            }
            Some(Hop::Child(r)) => {
                if !self.send_child(r, &h, payload) {
                    debug!("overlay: response for rank {r} dropped: it is not online");
                }
            }
            Some(Hop::Local(id)) => self.queue_client(id, &h, payload),
            None => debug!(
                "overlay: response '{}' with an empty route dropped",
                h.topic
            ),
        }
    }

    fn handle_local(&mut self, h: Header, payload: Payload) {
        match h.topic.as_str() {
            "event.pub" => return self.publish(h, payload),
            DISCONNECT_TOPIC => return self.disconnect_child(h, payload),
            crate::rotate::SWITCH_TOPIC => return self.key_switch(h),
            crate::rotate::RELOAD_TOPIC => return self.key_reload_rpc(h),
            crate::rotate::STATUS_TOPIC => return self.key_status_rpc(h),
            "acl.reload" => {
                return match self.authz.reload() {
                    Ok(msg) => {
                        warn!("acl: reload by {}: {msg}", h.userid);
                        self.respond(&h, Payload::Bytes(msg.into_bytes()))
                    }
                    Err(e) => {
                        error!("acl: reload by {} failed: {e}", h.userid);
                        self.respond_err(&h, errno::EINVAL, &e)
                    }
                }
            }
            "acl.check" => return self.acl_check(h, payload),
            "event.subscribe" | "event.unsubscribe" => {
                let Some(Hop::Local(id)) = h.route.first().copied().filter(|_| h.route.len() == 1)
                else {
                    return self.respond_err(
                        &h,
                        errno::EPROTO,
                        "subscribe on your own broker's local connector",
                    );
                };
                let pattern = String::from_utf8_lossy(payload.as_slice()).into_owned();
                if let Some(c) = self.clients.get_mut(&id) {
                    if h.topic == "event.subscribe" {
                        c.subs.push(pattern);
                    } else {
                        c.subs.retain(|p| *p != pattern);
                    }
                }
                return self.respond(&h, Payload::Bytes(Vec::new()));
            }
            _ => {}
        }
        let ctx = Ctx {
            rank: self.rank,
            topo: &self.topo,
            health: &self.health,
            now_ms: self.now_ms(),
            info: &self.info,
        };
        match self.modules.handle(&ctx, &h, payload.as_slice()) {
            Some(Reply::Ok(body)) => self.respond(&h, Payload::Bytes(body)),
            Some(Reply::Echo) => self.respond(&h, payload),
            Some(Reply::Err(e, msg)) => self.respond_err(&h, e, &msg),
            None => self.respond_err(&h, errno::ENOSYS, "no such method"),
        }
    }

    /// `overlay.disconnect` (admin), sent to the parent of the rank named in
    /// the payload: drop that child's link. The child exits, saying who
    /// disconnected it.
    fn disconnect_child(&mut self, h: Header, payload: Payload) {
        let text = String::from_utf8_lossy(payload.as_slice());
        let Ok(rank) = text.trim().parse::<u32>() else {
            return self.respond_err(
                &h,
                errno::EINVAL,
                "overlay.disconnect payload must be a rank number",
            );
        };
        if !self.topo.is_child(self.rank, rank) {
            let msg = format!(
                "rank {rank} is not a child of rank {}; send this to its parent",
                self.rank
            );
            return self.respond_err(&h, errno::EINVAL, &msg);
        }
        let Some(rid) = self.children.get(&rank).map(|l| l.rid.clone()) else {
            let msg = format!("rank {rank} is not online");
            return self.respond_err(&h, errno::EHOSTUNREACH, &msg);
        };
        let reason = format!("disconnected by {} through rank {}", h.userid, self.rank);
        self.send_router_rid(
            &rid,
            &Header::control(DISCONNECT_TOPIC),
            Payload::Bytes(reason.clone().into_bytes()),
        );
        self.lose_child(rank, &reason);
        self.respond(&h, Payload::Bytes(Vec::new()));
    }

    /// `acl.check` (admin): payload `{"principal","mechanism","address"}`.
    fn acl_check(&mut self, h: Header, payload: Payload) {
        #[derive(serde::Deserialize)]
        struct Q {
            principal: String,
            #[serde(default)]
            mechanism: Option<String>,
            #[serde(default)]
            address: Option<String>,
        }
        let q: Q = match serde_json::from_slice(payload.as_slice()) {
            Ok(q) => q,
            Err(e) => {
                return self.respond_err(&h, errno::EPROTO, &format!("acl.check payload: {e}"))
            }
        };
        let mech = match q.mechanism.as_deref() {
            None if q.principal.starts_with("unix:") => ClientMech::Local,
            None if q.principal.starts_with("curve:") => ClientMech::Curve,
            None => ClientMech::Gssapi,
            Some("local") => ClientMech::Local,
            Some("curve") => ClientMech::Curve,
            Some("gssapi") => ClientMech::Gssapi,
            Some(other) => {
                let msg = format!("unknown mechanism '{other}'; use curve, gssapi or local");
                return self.respond_err(&h, errno::EINVAL, &msg);
            }
        };
        match self
            .authz
            .explain(&q.principal, mech, q.address.as_deref().unwrap_or(""))
        {
            Some(x) => {
                let body = serde_json::to_vec(&x).unwrap_or_default();
                self.respond(&h, Payload::Bytes(body))
            }
            None => self.respond_err(
                &h,
                errno::ENOENT,
                "this instance has no policy file: only its owner may connect",
            ),
        }
    }

    // ----- events -----

    fn publish(&mut self, h: Header, payload: Payload) {
        let body = payload.as_slice();
        if body.len() < 2 {
            return self.respond_err(
                &h,
                errno::EPROTO,
                "event.pub payload must start with a u16 topic length",
            );
        }
        let tlen = u16::from_be_bytes([body[0], body[1]]) as usize;
        let Some(topic) = body
            .get(2..2 + tlen)
            .and_then(|t| std::str::from_utf8(t).ok())
            .map(str::to_string)
        else {
            return self.respond_err(
                &h,
                errno::EPROTO,
                "event.pub topic is truncated or not UTF-8",
            );
        };
        if topic.is_empty() || topic.len() > canopy_proto::MAX_TOPIC {
            return self.respond_err(&h, errno::EINVAL, "event topic must be 1 to 255 bytes");
        }
        let seq = self.sequencer.next_seq();
        let mut ev = Header::event(topic, seq);
        ev.nodeid = self.epoch;
        ev.userid.clone_from(&h.userid);
        ev.roles = h.roles;
        let data = body[2 + tlen..].to_vec();
        self.distribute_event(&ev, &data);
        self.replay.push(self.epoch, seq, (ev, data));
        self.respond(&h, Payload::Bytes(seq.to_be_bytes().to_vec()));
    }

    fn event_arrived(&mut self, h: Header, payload: Payload) {
        match self.gaps.arrive_in(h.nodeid, h.seq) {
            Arrival::Duplicate => {
                debug!("events: duplicate event {} dropped", h.seq);
                return;
            }
            Arrival::Gap { from, to } => {
                warn!(
                    "events: missed events {from}..={to} (reported in overlay status; the parent no longer held them)"
                );
                let (missed, _) = self.gaps.missed();
                self.health.set_missed(self.rank, missed);
            }
            Arrival::First | Arrival::InOrder => {}
        }
        let data = payload.as_slice();
        self.distribute_event(&h, data);
        self.replay
            .push(h.nodeid, h.seq, (h.clone(), data.to_vec()));
    }

    /// Send a rejoining child the events after the last one it saw.
    fn replay_events(&mut self, rid: &[u8], rank: u32, after: (u32, u64)) {
        let events = self.replay.after(after.0, after.1);
        if events.is_empty() {
            return;
        }
        info!(
            "events: replaying {} events after {} to rank {rank}",
            events.len(),
            after.1
        );
        for (ev, data) in events {
            self.send_router_rid(rid, &ev, Payload::Bytes(data));
        }
    }

    fn distribute_event(&mut self, ev: &Header, data: &[u8]) {
        self.hdr_buf.clear();
        if ev.encode_into(&mut self.hdr_buf).is_err() {
            return;
        }
        if let Some(router) = &self.router {
            for c in self.children.values() {
                if let Some(held) = self.rot.held.values_mut().find(|x| x.old_rid == c.rid) {
                    held.queue
                        .push((self.hdr_buf.clone(), zmq::Message::from(data)));
                    continue;
                }
                let r = router
                    .send(&c.rid[..], zmq::SNDMORE | zmq::DONTWAIT)
                    .and_then(|()| router.send(&self.hdr_buf[..], zmq::SNDMORE | zmq::DONTWAIT))
                    .and_then(|()| router.send(data, zmq::DONTWAIT));
                if let Err(e) = r {
                    debug!("events: send to a child failed: {e}");
                }
            }
        }
        let subscribers: Vec<u32> = self
            .clients
            .iter()
            .filter(|(_, c)| c.subs.iter().any(|p| topic_matches(p, &ev.topic)))
            .map(|(id, _)| *id)
            .collect();
        for id in subscribers {
            self.queue_client(id, ev, Payload::Bytes(data.to_vec()));
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn in_flight(h: &Header) -> InFlight {
    InFlight {
        topic: h.topic.clone(),
        matchtag: h.matchtag,
        nodeid: h.nodeid,
        route: h.route.clone(),
    }
}

/// `unix:<username>`, or `unix:uid<N>` if the uid has no passwd entry.
pub fn unix_principal(uid: u32) -> String {
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(u)) => format!("unix:{}", u.name),
        _ => format!("unix:uid{uid}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn card_round_trip() {
        let c = Card {
            public_key: [7; 32],
            endpoint: Some("ipc:///tmp/x/tbon-0".into()),
        };
        assert_eq!(Card::decode(&c.encode()).unwrap(), c);
        let leaf = Card {
            public_key: [1; 32],
            endpoint: None,
        };
        assert_eq!(Card::decode(&leaf.encode()).unwrap(), leaf);
        assert!(!c.encode().contains(' ') && !c.encode().contains('='));
        assert!(Card::decode("zz,-").is_err());
        assert!(Card::decode("nocomma").is_err());
    }
}
