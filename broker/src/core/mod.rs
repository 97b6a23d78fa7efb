//! `BrokerCore`: every decision a broker makes, with no I/O and no clock.
//!
//! After the model of quinn-proto: the socket shell (`crate::node`) feeds
//! what arrived through [`BrokerCore::handle`] and the passing of time
//! through [`BrokerCore::handle_timeout`], then drains what the core wants
//! done: [`BrokerCore::poll_event`] first (connect, close, jobs for the
//! admission worker, exit), then [`BrokerCore::poll_transmit`] (messages to
//! send, as `(Header, payload)`), and sleeps until
//! [`BrokerCore::poll_timeout`]. Time is a number of milliseconds the shell
//! passes in; randomness comes from a seed. So a test can wire several
//! cores together on a simulated clock (`sim.rs`) and check joins,
//! rejoins, replay, relinks, revocation and admission deterministically.
//!
//! What it owns: the parent link's state and the children's sessions,
//! clients with their identities, roles and subscriptions, requests in
//! flight, health and liveness, the event sequence and replay ring, the
//! key ring and relink phases, and admission and revocation state.
//!
//! Payloads are opaque to the core (`P`): the shell uses a type that moves
//! a received ZeroMQ frame without copying it.

pub mod exec;
#[cfg(test)]
mod exec_tests;
pub mod idmap;
pub mod keys;
pub mod provided;
mod relink;
#[cfg(test)]
mod service_tests;
pub mod services;
#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;

use canopy_acl::Mech;
use canopy_modules::BrokerInfo;
use canopy_overlay::events::{topic_matches, Arrival, GapDetector, Ring, Sequencer};
use canopy_overlay::health::{Delta, Health, RankState, HEALTH_TOPIC};
use canopy_overlay::hello::{Hello, HelloCheck, HelloError, HELLO_TOPIC};
use canopy_overlay::liveness::{Peer, Timing, Transition};
use canopy_overlay::pending::{InFlight, Link, Pending};
use canopy_overlay::route::{next_hop, Next};
use canopy_overlay::Topology;
use canopy_proto::{errno, Grant, Header, Hop, MsgType, Roles, PROTOCOL_VERSION};
use idmap::IdMap;
use keys::KeyRing;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use tracing::{debug, info, warn};

pub use services::{Builtin, SERVICES};

/// Admin request to drop a child's link; also the control message telling
/// the child.
pub const DISCONNECT_TOPIC: &str = "overlay.disconnect";
/// Control: sign of life, both directions, every `heartbeat_ms`.
pub const HEARTBEAT_TOPIC: &str = "overlay.heartbeat";
/// Control, parent to child: "I do not know your session; rejoin".
pub const REJOIN_TOPIC: &str = "overlay.rejoin";
/// Control, child to parent: this broker is stopping cleanly.
pub const GOODBYE_TOPIC: &str = "overlay.goodbye";
/// A broker its parent refused retries after this long, doubling up to
/// [`REFUSED_RETRY_MAX_MS`]: it joins within that bound once the cause is
/// fixed, with no restart.
const REFUSED_RETRY_MIN_MS: u64 = 500;
const REFUSED_RETRY_MAX_MS: u64 = 5000;
/// Topic of the one EPERM a client gets when its access is revoked.
pub const REVOKED_TOPIC: &str = "access.revoked";
/// Event that ends an instance started by a launcher (payload: the exit
/// status every broker exits with, in decimal). Only the owner may publish
/// it; it has this meaning only under [`BrokerCore::enable_launcher_mode`].
pub const SHUTDOWN_TOPIC: &str = "instance.shutdown";
/// While shutting down, children are probed this often (ms).
const SHUTDOWN_PROBE_MS: u64 = 5;

/// Events each broker keeps to replay to a child that rejoins after a
/// link loss (a rejoin after more events than this reports a gap).
const EVENT_REPLAY: usize = 1024;
/// Connections waiting for a first access decision; more are refused.
pub const MAX_PENDING_ADMISSIONS: usize = 64;
/// Requests a client may send while its access is being decided; more get
/// EAGAIN.
const MAX_HELD_IN: usize = 256;
/// Messages held for a client while its access is decided again; a client
/// that would get more is cut.
const MAX_HELD_OUT: usize = 4096;
/// Revoked remote connections remembered (their routing ids are never
/// reused by libzmq; the oldest is forgotten past this).
const MAX_REVOKED_REMOTE: usize = 65_536;

/// What clients can make a broker hold, each with a default, a config key
/// and (where it makes sense) a `canopy start` flag (docs/security.md,
/// "Budgets"). Reaching one costs only the client that reached it: it gets
/// EAGAIN, or is disconnected if it will not read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budgets {
    /// Largest payload on any endpoint (ZeroMQ `ZMQ_MAXMSGSIZE`, local
    /// framing, key exchange).
    pub max_message: usize,
    /// Bytes queued for one client connection plus its requests in flight.
    pub client_bytes: usize,
    /// The same, summed over one principal's connections.
    pub principal_bytes: usize,
    /// The same, summed over every client of the broker.
    pub total_bytes: usize,
    /// Connections per local uid or remote principal.
    pub connections: usize,
    /// Requests in flight per client connection.
    pub in_flight: usize,
    /// Payload bytes of requests in flight toward one neighbour broker.
    pub neighbour_bytes: usize,
}

/// The default largest payload on any endpoint.
pub const DEFAULT_MAX_MESSAGE: usize = 16 << 20;

/// A business card (a PMI value) that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CardError {
    #[error("business card '{0}' has no ','; every broker of an instance must run the same canopy version")]
    NoComma(String),
    #[error("business card key '{0}' is not 64 hex digits; every broker of an instance must run the same canopy version")]
    BadKey(String),
}

impl Default for Budgets {
    fn default() -> Budgets {
        Budgets {
            max_message: DEFAULT_MAX_MESSAGE,
            client_bytes: 32 << 20,
            principal_bytes: 32 << 20,
            total_bytes: 256 << 20,
            connections: 64,
            in_flight: 1024,
            neighbour_bytes: 32 << 20,
        }
    }
}

/// What the shell has queued and not yet written for local clients, sent
/// with each message from one: this connection, this uid, the broker.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Queued {
    pub conn: usize,
    pub uid: usize,
    pub total: usize,
}

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

    pub fn decode(s: &str) -> Result<Card, CardError> {
        let (hex, ep) = s
            .split_once(',')
            .ok_or_else(|| CardError::NoComma(s.to_string()))?;
        if hex.len() != 64 || !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(CardError::BadKey(hex.to_string()));
        }
        let mut key = [0u8; 32];
        for (i, k) in key.iter_mut().enumerate() {
            *k = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
                .map_err(|_| CardError::BadKey(hex.to_string()))?;
        }
        Ok(Card {
            public_key: key,
            endpoint: (ep != "-").then(|| ep.to_string()),
        })
    }
}

/// What a core is started with.
pub struct CoreConfig {
    pub rank: u32,
    pub topo: Topology,
    pub instance: String,
    pub parent: Option<Card>,
    /// Principal of each child rank, from the bootstrap.
    pub expected: HashMap<u32, String>,
    /// The instance owner's uid: the one local uid admitted without asking
    /// the policy, as `owner`.
    pub owner_uid: u32,
    /// The owner's principal (`unix:NAME`).
    pub owner_principal: String,
    pub timing: Timing,
    pub info: BrokerInfo,
    /// How remote clients authenticate on this instance.
    pub remote_mech: Mech,
    /// Seeds session ids and client ids.
    pub seed: u64,
    pub budgets: Budgets,
    /// The addresses each child connects from, where known.
    pub child_addresses: HashMap<u32, Vec<std::net::IpAddr>>,
    /// How `exec.run` runs commands on this rank.
    pub exec_mode: exec::ExecMode,
}

/// Who an access decision is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subject {
    /// The principal, if known; a local client has only its uid until the
    /// worker resolves its name.
    pub principal: Option<String>,
    pub uid: Option<u32>,
    pub mech: Mech,
    pub address: String,
}

/// Work that may block (name service, delegate programs, files): done by
/// the admission worker, never on the loop; its answer comes back as
/// [`Input::Done`].
#[derive(Debug)]
pub enum Job {
    /// Decide a client (first admission or again after a reload).
    Admit { ticket: u64, subject: Subject },
    /// Whether the policy now vetoes an overlay peer.
    Veto {
        ticket: u64,
        principal: String,
        address: String,
    },
    /// `acl.check`: explain a decision; answer `req`.
    Explain { req: Header, query: Vec<u8> },
    /// `broker.whoami`: how this broker sees the caller (`roles` as
    /// admitted), with the policy's deciding rule; answer `req`.
    Whoami {
        req: Header,
        principal: String,
        mech: Mech,
        address: String,
        grant: Grant,
    },
    /// Re-read the policy file; answer `req` if an admin asked.
    ReloadPolicy { req: Option<Header> },
    /// Record an exec request's digest, a refusal, or a receipt's digest
    /// (audit log; system instances).
    ExecAudit { principal: String, what: String },
    /// Record that a caller lacked a role (audit log).
    RoleRefused {
        principal: String,
        roles: Roles,
        topic: String,
    },
}

/// A finished [`Job`].
#[derive(Debug)]
pub enum Done {
    /// `Ok((principal, grant))`, or `Err((principal, reason))`.
    Admitted {
        ticket: u64,
        verdict: Result<(String, Grant), (String, String)>,
    },
    Vetoed {
        ticket: u64,
        veto: Option<String>,
    },
    Explained {
        req: Header,
        result: Result<Vec<u8>, (u32, String)>,
    },
    PolicyReloaded {
        req: Option<Header>,
        result: Result<String, String>,
    },
}

/// What arrived.
pub enum Input<P> {
    /// A message from a child connection. `user_id` is the ZAP-authenticated
    /// principal on the message.
    Child {
        rid: Vec<u8>,
        user_id: String,
        address: String,
        header: Header,
        payload: P,
    },
    /// A send to this child connection failed: it is gone.
    ChildGone {
        rid: Vec<u8>,
    },
    /// Some child connection closed (libzmq does not say which).
    ChildClosed,
    Parent {
        header: Header,
        payload: P,
    },
    /// The parent connection closed, or a send to it failed.
    /// The parent refused this broker: its ZAP handler refused the key,
    /// or the CURVE handshake failed.
    /// gssapi: a child's link key binding expired (it was not renewed):
    /// its messages are dropped until it authenticates again.
    ChildUnbound {
        rid: Vec<u8>,
    },
    ParentRefused {
        reason: String,
    },
    /// This broker is stopping cleanly (SIGTERM): tell the parent.
    Stopping,
    /// This broker's ZAP handler refused a would-be child's key (a child
    /// with a key this broker does not admit yet).
    PeerRefused {
        address: String,
        reason: String,
    },
    ParentGone {
        reason: String,
    },
    /// The parent's key changed (Kerberos renewal bound a new one).
    ParentKeyChanged,
    /// A local client connected; its uid from `SO_PEERCRED`.
    LocalConnected {
        id: u32,
        uid: u32,
    },
    /// A message from a local client, and what is queued for it.
    Local {
        id: u32,
        header: Header,
        payload: P,
        queued: Queued,
    },
    /// A message from a remote client, with what ZAP said of it.
    Remote {
        rid: Vec<u8>,
        user_id: String,
        grant: Grant,
        address: String,
        header: Header,
        payload: P,
    },
    /// A local client closed its connection (or was cut by the shell).
    ClientClosed {
        id: u32,
    },
    /// A send toward the parent (`rid` None) or a child was refused: its
    /// queue is at the high-water mark. The message was not sent.
    SendFull {
        rid: Option<Vec<u8>>,
        header: Header,
    },
    /// Some remote client connection closed (libzmq does not say which):
    /// remote providers with requests waiting are probed now.
    RemoteClosed,
    /// A send to this remote client failed: it is gone.
    RemoteGone {
        rid: Vec<u8>,
    },
    /// This remote client's credentials ended (its Kerberos binding
    /// expired): revoked as if the policy had denied it.
    RemoteExpired {
        rid: Vec<u8>,
        reason: String,
    },
    /// The admission worker finished a job.
    Done(Done),
    /// SIGHUP: reload the policy and (system instances) the keys.
    Hangup,
    /// The neighbours' certificates were re-read (`None`: this broker has
    /// none to reload).
    KeysReloaded {
        req: Option<Header>,
        result: Result<KeyRing, String>,
    },
    /// The `.next` key was loaded for `key.switch`: its public key.
    NextKey {
        req: Header,
        result: Result<[u8; 32], String>,
    },
    /// A record (`canopy_proto::exec::Record`) from session `sid`'s local
    /// command.
    ExecRecord {
        sid: u64,
        record: Vec<u8>,
    },
}

/// A message to send.
#[derive(Debug)]
pub enum Transmit<P> {
    Parent(Header, P),
    /// To a child connection, by routing id.
    Child(Vec<u8>, Header, P),
    /// An event to several children (by routing id) and local clients:
    /// the shell encodes the header once and sends the same bytes to each.
    Event {
        children: Arc<[Vec<u8>]>,
        locals: Vec<u32>,
        header: Header,
        payload: P,
    },
    /// To a local client.
    Local(u32, Header, P),
    /// To a remote client, by routing id.
    Remote(Vec<u8>, Header, P),
}

/// Why the broker must stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    HelloRefused {
        parent: u32,
        reason: String,
    },
    Disconnected(String),
    /// The bootstrap gave a parent without an endpoint.
    NoParentEndpoint,
    /// Launcher mode: `instance.shutdown` arrived and every child has left
    /// (or the wait for them ran out); exit with this status.
    Shutdown {
        status: i32,
    },
    /// Launcher mode: the parent link was lost. Nobody restarts a broker
    /// under a launcher, so this one ends too (fail closed), and so in turn
    /// does its subtree.
    Orphaned {
        parent: u32,
        reason: String,
    },
}

/// What the shell must do (besides sending).
#[derive(Debug)]
pub enum Event {
    /// Make a fresh connection to the parent (dropping any old one) with
    /// this routing id, and the parent's `server_key` (the shell may use a
    /// Kerberos-bound key instead). `relink`: a rotation's new connection.
    ConnectParent {
        endpoint: String,
        server_key: [u8; 32],
        identity: Vec<u8>,
        relink: bool,
    },
    /// The parent link is gone (the shell tells the Kerberos renewal).
    ParentLost,
    /// Close a local client once what is queued for it is written.
    Close {
        id: u32,
    },
    /// Hand to the admission worker.
    Job(Job),
    /// Read the neighbours' certificates again; feed back `KeysReloaded`.
    ReloadKeys {
        req: Option<Header>,
    },
    /// Load the `.next` key for `key.switch`; feed back `NextKey`.
    LoadNextKey {
        req: Header,
    },
    /// Start using the loaded `.next` key for new parent connections; the
    /// ROUTER keeps the old one until `Rebind`.
    AdoptKey,
    /// Admit exactly these overlay keys (principal, name) as peers.
    AdmitPeers(Vec<(String, String)>),
    /// Listen again with the new key.
    Rebind {
        since_switch_ms: u64,
    },
    /// Run this rank's part of an `exec.run`; feed its records back as
    /// [`Input::ExecRecord`], the last being an exit or a failure.
    ExecSpawn(exec::Spawn),
    /// Signal the command of session `sid` (its whole process group).
    ExecSignal {
        sid: u64,
        sig: i32,
    },
    /// Bytes for the command's stdin; empty: close it.
    ExecStdin {
        sid: u64,
        data: Vec<u8>,
    },
    Exit(Exit),
}

#[derive(PartialEq, Eq, Debug, Clone, Copy)]
enum ParentState {
    None,
    Joining,
    Online,
}

struct ChildLink {
    rid: Vec<u8>,
    principal: String,
    session: u64,
    peer: Peer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientKind {
    Local { uid: u32 },
    Remote,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Admitted,
    /// Waiting for the worker; `first`: not yet admitted at all.
    Deciding {
        ticket: u64,
        first: bool,
    },
}

struct Client<P> {
    kind: ClientKind,
    /// Remote clients: their routing id.
    rid: Vec<u8>,
    principal: String,
    grant: Grant,
    mech: Mech,
    address: String,
    subs: Vec<String>,
    /// Namespaces this connection offers (`service.add`).
    offers: Vec<String>,
    /// Requests delivered to it as a provider and not yet answered: the
    /// token it was given -> the caller's request.
    delivered: IdMap<u32, Header>,
    next_token: u32,
    access: Access,
    held_in: VecDeque<(Header, P)>,
    held_out: VecDeque<(Header, P)>,
    /// Requests in flight: matchtag -> payload bytes.
    in_flight: IdMap<u32, usize>,
    in_flight_bytes: usize,
    /// Kinds of refusal ([`REFUSED_BUDGET`], ...) already logged at warn
    /// for this client: each is logged once, then at debug, so a hostile
    /// client cannot flood the log.
    warned: u8,
}

/// A request refused by a budget (EAGAIN, EMSGSIZE).
const REFUSED_BUDGET: u8 = 1;
/// A message that is not a request.
const REFUSED_NOT_REQUEST: u8 = 2;
/// A request that cannot be routed (no such rank or service).
const REFUSED_UNROUTABLE: u8 = 4;
/// An event topic the sender may not publish.
const REFUSED_TOPIC: u8 = 8;

/// The broker's decisions. See the module documentation.
pub struct BrokerCore<P> {
    rank: u32,
    topo: Topology,
    instance: String,
    timing: Timing,
    info: BrokerInfo,
    owner_uid: u32,
    owner_principal: String,
    remote_mech: Mech,
    rng: u64,
    now: u64,

    session: u64,
    parent_state: ParentState,
    parent_card: Option<Card>,
    parent_peer: Option<Peer>,
    rejoin_at: Option<u64>,
    /// Why the parent last refused this broker (logged once per cause),
    /// and the current retry interval.
    refused: Option<String>,
    refused_backoff: u64,
    /// A clean stop: the goodbye went to the parent and is not yet
    /// acknowledged (the shell waits a moment for the acknowledgement
    /// before it closes the link, so the goodbye is not lost in flight).
    goodbye_unacked: bool,
    next_heartbeat: u64,

    expected: HashMap<u32, String>,
    children: IdMap<u32, ChildLink>,
    /// The children's routing ids as the last event went out: shared by
    /// every event's transmit while the children do not change.
    child_rids: Arc<[Vec<u8>]>,
    /// Reused for each event's list of subscribers.
    scratch_ids: Vec<u32>,
    by_rid: HashMap<Vec<u8>, u32>,
    pending: Pending,
    health: Health,
    modules: canopy_modules::Registry,
    /// Namespaces offered by clients of this broker.
    registry: HashMap<String, provided::Registration>,
    /// `exec.run` sessions (exec.rs).
    exec: exec::Sessions,
    exec_mode: exec::ExecMode,
    /// Where each child connects from, where known.
    child_addresses: HashMap<u32, Vec<std::net::IpAddr>>,
    /// When to probe remote providers holding requests next (a send to a
    /// closed connection fails, which ends its registrations).
    provider_probe_at: Option<u64>,

    clients: IdMap<u32, Client<P>>,
    remote_ids: HashMap<Vec<u8>, u32>,
    revoked_remote: HashMap<Vec<u8>, ()>,
    revoked_order: VecDeque<Vec<u8>>,
    next_client: u32,
    next_ticket: u64,
    /// Children being decided again after a reload: ticket -> rank.
    vetting: HashMap<u64, u32>,
    /// Whether the policy was reloaded since start: a remote client's
    /// connection-time verdict may then be stale.
    reloaded: bool,

    sequencer: Sequencer,
    gaps: GapDetector,
    epoch: u32,
    replay: Ring<(Header, Vec<u8>)>,

    rot: relink::Rotation<P>,

    budgets: Budgets,
    /// Requests in flight from clients, in payload bytes: per principal,
    /// and in total.
    principal_in_flight: HashMap<String, usize>,
    total_in_flight: usize,
    /// Connections per local uid, and per remote principal.
    per_uid: IdMap<u32, usize>,
    per_principal: HashMap<String, usize>,

    transmits: VecDeque<Transmit<P>>,
    events: VecDeque<Event>,

    /// Launcher mode (see [`BrokerCore::enable_launcher_mode`]).
    launched: bool,
    /// `instance.shutdown` seen: the status, and until when to wait for
    /// the children to leave.
    shutdown: Option<(i32, u64)>,
    /// An `Exit` was emitted; emit no other.
    exiting: bool,
    /// While shutting down: when to probe the children next (libzmq may
    /// report a closed connection before a send to it fails).
    shutdown_probe_at: u64,
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn in_flight(h: &Header, bytes: usize) -> InFlight {
    InFlight {
        topic: h.topic.clone(),
        matchtag: h.matchtag,
        nodeid: h.nodeid,
        route: h.route.clone(),
        bytes,
    }
}

fn no_response(h: &Header) -> bool {
    h.flags & canopy_proto::FLAG_NORESPONSE != 0
}

impl<P: AsRef<[u8]> + From<Vec<u8>>> BrokerCore<P> {
    /// A core at time `now`; if it has a parent, it connects at once (see
    /// [`BrokerCore::poll_event`]).
    pub fn new(cfg: CoreConfig, now: u64) -> BrokerCore<P> {
        let mut rng = cfg.seed;
        let session = splitmix(&mut rng);
        let mut core = BrokerCore {
            rank: cfg.rank,
            health: Health::new(cfg.topo, cfg.rank, now),
            topo: cfg.topo,
            instance: cfg.instance,
            timing: cfg.timing,
            info: cfg.info,
            owner_uid: cfg.owner_uid,
            owner_principal: cfg.owner_principal,
            remote_mech: cfg.remote_mech,
            rng,
            now,
            session,
            parent_state: ParentState::None,
            parent_card: cfg.parent,
            parent_peer: None,
            rejoin_at: None,
            refused: None,
            refused_backoff: 0,
            goodbye_unacked: false,
            next_heartbeat: now,
            expected: cfg.expected,
            children: IdMap::default(),
            child_rids: Arc::from(Vec::new()),
            scratch_ids: Vec::new(),
            by_rid: HashMap::new(),
            pending: Pending::default(),
            modules: canopy_modules::Registry::standard(),
            registry: HashMap::new(),
            exec: exec::Sessions::default(),
            exec_mode: cfg.exec_mode,
            child_addresses: cfg.child_addresses,
            provider_probe_at: None,
            clients: IdMap::default(),
            remote_ids: HashMap::new(),
            revoked_remote: HashMap::new(),
            revoked_order: VecDeque::new(),
            // Client ids start at a random point, so a restarted broker's
            // clients never reuse its previous incarnation's ids: a stale
            // response (same route, same matchtag) then matches nothing.
            next_client: ((session >> 16) as u32).max(1),
            next_ticket: 1,
            vetting: HashMap::new(),
            reloaded: false,
            sequencer: Sequencer::default(),
            gaps: GapDetector::default(),
            epoch: (session >> 32) as u32 ^ session as u32,
            replay: Ring::new(EVENT_REPLAY),
            rot: relink::Rotation::default(),
            budgets: cfg.budgets,
            principal_in_flight: HashMap::new(),
            total_in_flight: 0,
            per_uid: IdMap::default(),
            per_principal: HashMap::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            launched: false,
            shutdown: None,
            exiting: false,
            shutdown_probe_at: 0,
        };
        if core.parent_card.is_some() {
            core.connect_parent();
        }
        core
    }

    pub fn rank(&self) -> u32 {
        self.rank
    }

    /// A fresh id for a client the shell is about to report.
    pub fn new_client_id(&mut self) -> u32 {
        loop {
            let id = self.next_client;
            self.next_client = self.next_client.wrapping_add(1).max(1);
            if !self.clients.contains_key(&id) {
                return id;
            }
        }
    }

    /// The next message to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit<P>> {
        self.transmits.pop_front()
    }

    /// The next thing for the shell to do. Drain these before transmits.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`BrokerCore::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> u64 {
        let mut next = self.next_heartbeat;
        if let Some(at) = self.rejoin_at {
            next = next.min(at);
        }
        if let Some(at) = self.rot.deadline() {
            next = next.min(at);
        }
        if let Some((_, at)) = self.shutdown.filter(|_| !self.exiting) {
            next = next.min(at).min(self.shutdown_probe_at);
        }
        if let Some(at) = self.provider_probe_at {
            next = next.min(at);
        }
        next
    }

    /// Launcher mode, for an instance whose brokers a launcher (srun,
    /// mpiexec) started, with no one to restart them: the owner's
    /// [`SHUTDOWN_TOPIC`] event ends every broker, each after its children
    /// left (at most `min(lost, 5 s)` later), with the event's status; and
    /// losing the parent link ends this broker ([`Exit::Orphaned`]) instead
    /// of rejoining forever.
    pub fn enable_launcher_mode(&mut self) {
        self.launched = true;
    }

    /// Launcher mode: start shutting down after `instance.shutdown`.
    fn shutdown_event(&mut self, topic: &str, data: &[u8]) {
        if !self.launched || topic != SHUTDOWN_TOPIC || self.shutdown.is_some() {
            return;
        }
        // An unreadable status is a failure, never a success.
        let status = std::str::from_utf8(data)
            .ok()
            .and_then(|t| t.trim().parse::<i32>().ok())
            .unwrap_or(1);
        info!(status, "instance: shutting down (instance.shutdown)");
        let wait = self.timing.lost_ms.min(5000);
        self.shutdown = Some((status, self.now + wait));
    }

    /// Launcher mode: exit once shutting down and every child has left.
    fn check_shutdown(&mut self) {
        let Some((status, deadline)) = self.shutdown else {
            return;
        };
        if self.exiting {
            return;
        }
        if !self.children.is_empty() && self.now < deadline {
            // A child that exited shows up as a failed send, soon after
            // its connection closed: probe often rather than wait for the
            // next heartbeat.
            if self.now >= self.shutdown_probe_at {
                self.shutdown_probe_at = self.now + SHUTDOWN_PROBE_MS;
                self.probe_children();
            }
            return;
        }
        if !self.children.is_empty() {
            let mut left: Vec<u32> = self.children.keys().copied().collect();
            left.sort_unstable();
            warn!("instance: ranks {left:?} did not leave in time; exiting anyway");
        }
        self.exiting = true;
        self.events
            .push_back(Event::Exit(Exit::Shutdown { status }));
    }

    /// This broker's public facts.
    pub fn info(&self) -> &BrokerInfo {
        &self.info
    }

    /// The subtree's health as this broker sees it.
    pub fn health(&self) -> &Health {
        &self.health
    }

    /// The parent has not yet acknowledged this broker's goodbye: the
    /// shell keeps the link open a little longer to read the answer.
    pub fn awaiting_goodbye_ack(&self) -> bool {
        self.goodbye_unacked
    }

    /// Whether the parent link is up (always true for rank 0).
    pub fn joined(&self) -> bool {
        self.parent_card.is_none() || self.parent_state == ParentState::Online
    }

    /// Clients admitted or being decided.
    pub fn clients(&self) -> usize {
        self.clients.len()
    }

    /// Timers: heartbeats out, liveness checks in, rejoin attempts, relink
    /// deadlines.
    pub fn handle_timeout(&mut self, now: u64) {
        self.now = now.max(self.now);
        let now = self.now;
        if self.rejoin_at.is_some_and(|at| now >= at) {
            self.connect_parent();
        }
        self.rotation_tick();
        if self.provider_probe_at.is_some_and(|at| now >= at) {
            self.probe_providers();
        }
        if now >= self.next_heartbeat {
            self.next_heartbeat = now + self.timing.heartbeat_ms;
            self.heartbeats();
        }
        self.flush_health();
        self.check_shutdown();
    }

    fn heartbeats(&mut self) {
        let now = self.now;
        if self.parent_state == ParentState::Online {
            self.send_parent(Header::control(HEARTBEAT_TOPIC), P::from(Vec::new()));
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
                    warn!(rank, reason = %why, "overlay: rank is torpid");
                    self.health.set(rank, RankState::Torpid, &why, now);
                }
                Transition::BecameLost => {
                    let why = format!("no message for {:.1}s", self.timing.lost_ms as f64 / 1e3);
                    self.lose_child(rank, &why);
                    continue;
                }
                Transition::Recovered | Transition::None => {}
            }
            self.send_rid(&rid, Header::control(HEARTBEAT_TOPIC), P::from(Vec::new()));
        }
        // Every link state is checked, not only Online: a parent that
        // never answers a hello is as lost as one that went quiet.
        if self.parent_state != ParentState::None && self.rejoin_at.is_none() {
            if let Some(p) = self.parent_peer.as_mut() {
                if p.check(now, &self.timing) == Transition::BecameLost {
                    let why = format!("no message for {:.1}s", self.timing.lost_ms as f64 / 1e3);
                    self.lose_parent(&why);
                }
            }
        }
    }

    /// Feed one input at time `now`.
    pub fn handle(&mut self, now: u64, input: Input<P>) {
        self.now = now.max(self.now);
        match input {
            Input::Child {
                rid,
                user_id,
                address,
                header,
                payload,
            } => self.child_ingress(rid, &user_id, &address, header, payload),
            Input::ChildGone { rid } => self.child_gone(&rid),
            Input::ChildClosed => self.probe_children(),
            Input::ChildUnbound { rid } => {
                if let Some(&rank) = self.by_rid.get(&rid) {
                    self.lose_child(
                        rank,
                        "its kerberos key binding expired and was not renewed (is the KDC reachable?); it rejoins once it authenticates again",
                    );
                }
            }
            Input::Parent { header, payload } => self.parent_ingress(header, payload),
            Input::ParentGone { reason } => {
                if self.parent_state == ParentState::Online && !self.rot.up.active() {
                    self.lose_parent(&reason);
                }
            }
            Input::ParentKeyChanged => self.connect_parent(),
            Input::ParentRefused { reason } => {
                if self.parent_state != ParentState::None && !self.rot.up.active() {
                    self.parent_refused(reason);
                }
            }
            Input::Stopping => {
                // Joining too: the parent may have accepted the hello
                // whose answer is still on its way, and already shows
                // this rank online. The link is ordered, so the goodbye
                // reaches the parent after the hello.
                if self.parent_state != ParentState::None {
                    self.send_parent(Header::control(GOODBYE_TOPIC), P::from(Vec::new()));
                    self.goodbye_unacked = true;
                }
            }
            Input::PeerRefused { address, reason } => self.peer_refused(&address, &reason),
            Input::LocalConnected { id, uid } => self.local_connected(id, uid),
            Input::Local {
                id,
                header,
                payload,
                queued,
            } => {
                if self.over_budget(id, &header, payload.as_ref().len(), queued) {
                    return;
                }
                self.client_ingress(id, header, payload)
            }
            Input::Remote {
                rid,
                user_id,
                grant,
                address,
                header,
                payload,
            } => self.remote_ingress(rid, user_id, grant, address, header, payload),
            Input::ClientClosed { id } => self.remove_client(id),
            Input::SendFull { rid, header } => self.send_full(rid, header),
            Input::RemoteClosed => self.probe_providers(),
            Input::RemoteGone { rid } => {
                if let Some(id) = self.remote_ids.get(&rid).copied() {
                    self.remove_client(id);
                }
            }
            Input::RemoteExpired { rid, reason } => {
                if let Some(id) = self.remote_ids.get(&rid).copied() {
                    self.revoke(id, &reason);
                }
            }
            Input::Done(d) => self.job_done(d),
            Input::Hangup => {
                self.events
                    .push_back(Event::Job(Job::ReloadPolicy { req: None }));
                if self.rot.has_files {
                    self.events.push_back(Event::ReloadKeys { req: None });
                }
            }
            Input::KeysReloaded { req, result } => self.keys_reloaded(req, result),
            Input::NextKey { req, result } => self.next_key(req, result),
            Input::ExecRecord { sid, record } => self.exec_local_record(sid, record),
        }
        self.flush_health();
        self.check_shutdown();
    }

    // ----- the parent link -----

    /// (Re)connect to the parent with a fresh session and say hello.
    fn connect_parent(&mut self) {
        let Some(card) = self.parent_card.clone() else {
            return;
        };
        let Some(endpoint) = card.endpoint.clone() else {
            self.events.push_back(Event::Exit(Exit::NoParentEndpoint));
            return;
        };
        self.session = splitmix(&mut self.rng);
        // Anything still queued for the old connection goes nowhere.
        self.transmits
            .retain(|t| !matches!(t, Transmit::Parent(..)));
        self.events.push_back(Event::ConnectParent {
            endpoint,
            server_key: card.public_key,
            identity: format!("{}:{:016x}", self.rank, self.session).into_bytes(),
            relink: false,
        });
        self.parent_state = ParentState::Joining;
        self.parent_peer = Some(Peer::new(self.now));
        self.rejoin_at = None;
        self.send_hello(true);
    }

    fn send_hello(&mut self, with_last_event: bool) {
        let hello = Hello {
            rank: self.rank,
            version: PROTOCOL_VERSION,
            session: self.session,
            instance: self.instance.clone(),
            last_event: if with_last_event {
                self.gaps.position()
            } else {
                None
            },
        };
        let parent = self.topo.parent(self.rank).unwrap_or(0);
        let h = Header::request(HELLO_TOPIC, parent, 0);
        self.transmits
            .push_back(Transmit::Parent(h, P::from(hello.encode())));
    }

    /// The parent link is gone: answer what was in flight over it, and
    /// try to join again shortly.
    fn lose_parent(&mut self, reason: &str) {
        if self.launched && !self.exiting {
            self.exiting = true;
            self.events.push_back(Event::Exit(match self.shutdown {
                // The parent finished first: so do we.
                Some((status, _)) => Exit::Shutdown { status },
                None => Exit::Orphaned {
                    parent: self.topo.parent(self.rank).unwrap_or(0),
                    reason: reason.to_string(),
                },
            }));
            return;
        }
        warn!(reason = %reason, "overlay: lost the parent link; rejoining");
        self.abandon_parent("the parent link was lost");
        self.rejoin_at = Some(self.now + self.timing.heartbeat_ms.min(1000));
    }

    /// Drop the parent connection and everything in flight on it; the
    /// caller sets when to rejoin.
    fn abandon_parent(&mut self, why: &str) {
        for (h, _) in self.rot.up.abandon() {
            debug!(topic = %h.topic, "overlay: a message queued for a relink was dropped");
        }
        self.events.push_back(Event::ParentLost);
        self.exec_upstream_gone(Hop::Parent);
        for r in self.pending.fail_link(Link::Parent) {
            self.fail_in_flight(r, why);
        }
        // Requests the old parent session sent down: their responses would
        // reach a session the parent no longer knows.
        self.pending.forget_from(Hop::Parent);
        self.transmits
            .retain(|t| !matches!(t, Transmit::Parent(..)));
        self.parent_state = ParentState::Joining;
        self.parent_peer = None;
    }

    fn parent_ingress(&mut self, mut h: Header, payload: P) {
        let now = self.now;
        if let Some(p) = self.parent_peer.as_mut() {
            p.heard(now);
        }
        if self.is_relink_answer(&h) {
            self.up_joined(&h, payload.as_ref());
            return;
        }
        if h.msg_type == MsgType::Control && self.rotation_control(&h, payload.as_ref()) {
            return;
        }
        match h.msg_type {
            MsgType::Response
                if self.parent_state == ParentState::Joining
                    && h.topic == HELLO_TOPIC
                    && h.route.is_empty() =>
            {
                if h.errnum != 0 {
                    let why = String::from_utf8_lossy(payload.as_ref()).into_owned();
                    if h.errnum == errno::EAGAIN {
                        // Our previous session is still online there; try again.
                        warn!(parent = h.nodeid, reason = %why, "overlay: parent asks to retry the hello");
                        self.rejoin_at = Some(now + self.timing.heartbeat_ms.min(1000));
                        return;
                    }
                    if h.errnum == errno::EPERM {
                        self.parent_refused(why);
                    } else {
                        self.events.push_back(Event::Exit(Exit::HelloRefused {
                            parent: h.nodeid,
                            reason: why,
                        }));
                    }
                    return;
                }
                match self.refused.take() {
                    Some(was) => {
                        info!(parent = h.nodeid, was = %was, "overlay: joined the parent, which had refused this broker")
                    }
                    None => info!(parent = h.nodeid, "overlay: joined the parent"),
                }
                self.refused_backoff = 0;
                self.parent_state = ParentState::Online;
                // The parent may have marked our subtree lost: resend it all.
                self.health.requeue_all();
            }
            MsgType::Request => {
                h.route.push(Hop::Parent);
                self.route_request(h, payload);
            }
            MsgType::Response => {
                if self.response_matches(Link::Parent, &h) {
                    self.route_response(h, payload)
                } else {
                    stale_response(&h);
                }
            }
            MsgType::Event => self.event_arrived(h, payload),
            MsgType::Control if h.topic == HEARTBEAT_TOPIC => {}
            MsgType::Control if h.topic == GOODBYE_TOPIC => self.goodbye_unacked = false,
            MsgType::Control if h.topic == REJOIN_TOPIC => {
                self.lose_parent("the parent does not know this session");
            }
            MsgType::Control if h.topic == DISCONNECT_TOPIC => {
                let why = String::from_utf8_lossy(payload.as_ref()).into_owned();
                self.events.push_back(Event::Exit(Exit::Disconnected(why)));
            }
            MsgType::Control if h.topic == exec::KILL_TOPIC || h.topic == exec::WRITE_TOPIC => {
                if let Err((_, why)) = self.exec_control(Hop::Parent, &h, payload.as_ref()) {
                    debug!(reason = %why, "exec: control from the parent ignored");
                }
            }
            MsgType::Control => {
                debug!(topic = %h.topic, "overlay: ignored control from the parent")
            }
        }
    }

    fn flush_health(&mut self) {
        if self.parent_card.is_none() {
            self.health.take_pending();
            return;
        }
        if self.parent_state != ParentState::Online {
            return;
        }
        let deltas = self.health.take_pending();
        if deltas.is_empty() {
            return;
        }
        match serde_json::to_vec(&deltas) {
            Ok(body) => self.send_parent(Header::control(HEALTH_TOPIC), P::from(body)),
            Err(e) => warn!("overlay: cannot encode a health report: {e}"),
        }
    }

    /// Send to the parent, or queue while the link moves.
    fn send_parent(&mut self, h: Header, payload: P) {
        if self.rot.up.active() {
            if !(h.topic == HEARTBEAT_TOPIC && h.msg_type == MsgType::Control) {
                self.rot.up.queue.push((h, payload));
            }
            return;
        }
        self.transmits.push_back(Transmit::Parent(h, payload));
    }

    // ----- children -----

    fn child_gone(&mut self, rid: &[u8]) {
        if let Some(rb) = self.rot.rebind.as_mut() {
            rb.old_rids.retain(|r| r != rid);
        }
        if let Some(&rank) = self.by_rid.get(rid) {
            if self.rot.held.get(&rank).is_some_and(|h| h.old_rid == rid) {
                return; // the old connection of a child that is moving
            }
            self.lose_child(rank, "its connection closed");
        }
    }

    /// A child connection closed: a heartbeat to each says which (the
    /// shell reports [`Input::ChildGone`] for a send that fails).
    fn probe_children(&mut self) {
        let links: Vec<Vec<u8>> = self.children.values().map(|l| l.rid.clone()).collect();
        for rid in links {
            self.send_rid(&rid, Header::control(HEARTBEAT_TOPIC), P::from(Vec::new()));
        }
    }

    /// The child's link is gone: mark its subtree lost and answer what was
    /// in flight over it.
    /// The parent refused this broker. Under a launcher that ends it (no
    /// one would fix the cause); otherwise it retries with backoff,
    /// warning once per cause, and joins once the cause is fixed.
    fn parent_refused(&mut self, reason: String) {
        let parent = self.topo.parent(self.rank).unwrap_or(0);
        if self.launched {
            self.events
                .push_back(Event::Exit(Exit::HelloRefused { parent, reason }));
            return;
        }
        self.refused_backoff = match self.refused_backoff {
            0 => REFUSED_RETRY_MIN_MS,
            b => (b * 2).min(REFUSED_RETRY_MAX_MS),
        };
        if self.refused.as_deref() != Some(reason.as_str()) {
            warn!(
                parent,
                reason = %reason,
                retry_ms = self.refused_backoff,
                "overlay: the parent refused this broker; retrying (at most every {:.1}s) until the cause is fixed",
                REFUSED_RETRY_MAX_MS as f64 / 1e3
            );
            self.refused = Some(reason);
        }
        self.abandon_parent("the parent refused this broker");
        self.rejoin_at = Some(self.now + self.refused_backoff);
    }

    /// A handshake from `address` was refused for its key. If it can only
    /// be one child (the one not online whose address it is, or the only
    /// one not online), show that child as `refused`, with why.
    fn peer_refused(&mut self, address: &str, reason: &str) {
        let addr: Option<std::net::IpAddr> = address.parse().ok();
        let offline: Vec<u32> = self
            .topo
            .children(self.rank)
            .filter(|c| !self.children.contains_key(c))
            .collect();
        let by_address: Vec<u32> = offline
            .iter()
            .copied()
            .filter(|c| {
                self.child_addresses
                    .get(c)
                    .is_some_and(|a| addr.is_some_and(|x| a.contains(&x)))
            })
            .collect();
        let rank = match (by_address.as_slice(), offline.as_slice()) {
            ([one], _) => *one,
            ([], [one]) if self.child_addresses.is_empty() => *one,
            _ => {
                debug!(
                    address,
                    reason,
                    "overlay: refused a handshake from an address that is no single child's"
                );
                return;
            }
        };
        let why = format!("its parent refused its key ({reason}); install its public certificate on rank {} and run canopy key reload", self.rank);
        if self.health.set(rank, RankState::Refused, &why, self.now) {
            warn!(verdict = %"deny", rank, address, reason, "overlay: refused child rank {rank}'s key; it retries until its key is installed");
        }
    }

    fn lose_child(&mut self, rank: u32, reason: &str) {
        self.drop_child(rank, reason, false)
    }

    /// A child stopped cleanly: its subtree is offline, not lost.
    fn child_left(&mut self, rank: u32) {
        self.drop_child(rank, "stopped cleanly", true)
    }

    fn drop_child(&mut self, rank: u32, reason: &str, clean: bool) {
        self.rot.held.remove(&rank);
        if let Some(link) = self.children.remove(&rank) {
            self.by_rid.remove(&link.rid);
        }
        let now = self.now;
        if self.shutdown.is_some() {
            debug!(rank, "overlay: rank {rank} left: {reason}");
        } else if clean {
            info!(rank, "overlay: rank {rank} stopped cleanly");
        } else {
            warn!(rank, "overlay: lost rank {rank}: {reason}");
        }
        if clean {
            self.health.child_left(rank, reason, now);
        } else {
            self.health.child_lost(rank, reason, now);
        }
        self.exec_upstream_gone(Hop::Child(rank));
        let failed = self.pending.fail_link(Link::Child(rank));
        // Requests that came up from the lost incarnation: their responses
        // must not reach whatever rejoins as this rank.
        let orphaned = self.pending.forget_from(Hop::Child(rank));
        if orphaned > 0 {
            debug!(
                rank,
                orphaned, "overlay: requests from a lost rank forgotten"
            );
        }
        let msg = if clean {
            format!("rank {rank} stopped")
        } else {
            format!("rank {rank} was lost ({reason})")
        };
        for r in failed {
            self.fail_in_flight(r, &msg);
        }
    }

    fn fail_in_flight(&mut self, r: InFlight, why: &str) {
        let mut h = Header::request(r.topic, r.nodeid, r.matchtag);
        h.route = r.route;
        let resp = h.response(self.rank, errno::EHOSTUNREACH);
        let msg = format!("{why}; the request may or may not have been processed");
        self.route_response(resp, P::from(msg.into_bytes()));
    }

    /// Send to a child connection, or queue while that child's link moves.
    fn send_rid(&mut self, rid: &[u8], h: Header, payload: P) {
        self.send_rid_owned(rid.to_vec(), h, payload)
    }

    fn send_rid_owned(&mut self, rid: Vec<u8>, h: Header, payload: P) {
        if !self.rot.held.is_empty() {
            if let Some(held) = self.rot.held.values_mut().find(|x| x.old_rid == rid) {
                if !(h.topic == HEARTBEAT_TOPIC && h.msg_type == MsgType::Control) {
                    held.queue.push((h, payload));
                }
                return;
            }
        }
        self.transmits.push_back(Transmit::Child(rid, h, payload));
    }

    fn send_child(&mut self, rank: u32, h: Header, payload: P) -> bool {
        let Some(rid) = self.children.get(&rank).map(|c| c.rid.clone()) else {
            return false;
        };
        self.send_rid_owned(rid, h, payload);
        true
    }

    fn child_ingress(&mut self, rid: Vec<u8>, user_id: &str, address: &str, h: Header, payload: P) {
        let Some(&rank) = self.by_rid.get(&rid) else {
            if h.msg_type == MsgType::Request && h.topic == HELLO_TOPIC {
                self.child_hello(rid, user_id, address, &h, payload.as_ref());
            } else if h.msg_type == MsgType::Control && h.topic == GOODBYE_TOPIC {
                // A session that never joined (its hello was refused) says
                // goodbye: nothing to mark, but let it go at once.
                self.transmits.push_back(Transmit::Child(
                    rid,
                    Header::control(GOODBYE_TOPIC),
                    P::from(Vec::new()),
                ));
            } else {
                // An authenticated peer talking from a session we do not
                // know (e.g. we declared it lost): tell it to rejoin.
                debug!(
                    principal = %user_id,
                    "overlay: message from an unknown session; asking it to rejoin"
                );
                self.transmits.push_back(Transmit::Child(
                    rid,
                    Header::control(REJOIN_TOPIC),
                    P::from(Vec::new()),
                ));
            }
            return;
        };
        let now = self.now;
        if let Some(link) = self.children.get_mut(&rank) {
            if link.peer.heard(now) == Transition::Recovered {
                info!(rank, "overlay: rank recovered");
                self.health.set(rank, RankState::Online, "recovered", now);
            }
        }
        // Defence in depth: the ZAP-authenticated identity on every message
        // must be the one this child joined with.
        if self.children.get(&rank).map(|c| c.principal.as_str()) != Some(user_id) {
            warn!(
                verdict = %"deny",
                rank,
                principal = %user_id,
                reason = %"User-Id does not match the principal that joined as this rank",
                "overlay: message dropped"
            );
            return;
        }
        match h.msg_type {
            MsgType::Request => {
                let mut h = h;
                h.route.push(Hop::Child(rank));
                self.route_request(h, payload);
            }
            MsgType::Response => {
                if self.response_matches(Link::Child(rank), &h) {
                    self.route_response(h, payload)
                } else {
                    stale_response(&h);
                }
            }
            MsgType::Control if h.topic == HEARTBEAT_TOPIC => {}
            MsgType::Control if h.topic == GOODBYE_TOPIC => {
                self.child_left(rank);
                // The answer tells the child its goodbye arrived, so it
                // may close the link (a goodbye still in flight when the
                // process exits is lost, and the rank would show lost).
                self.send_rid_owned(rid, Header::control(GOODBYE_TOPIC), P::from(Vec::new()));
            }
            MsgType::Control if h.topic == keys::RELINK_TOPIC => {
                self.child_relink(rank, rid);
            }
            MsgType::Control if h.topic == HEALTH_TOPIC => {
                match serde_json::from_slice::<Vec<Delta>>(payload.as_ref()) {
                    Ok(deltas) => {
                        let ignored = self.health.apply_from_child(rank, &deltas, now);
                        if ignored > 0 {
                            warn!(rank, ignored, "overlay: state changes for ranks outside the child's subtree ignored");
                        }
                    }
                    Err(e) => warn!(rank, "overlay: bad health report: {e}"),
                }
            }
            MsgType::Control if h.topic == exec::KILL_TOPIC || h.topic == exec::WRITE_TOPIC => {
                if let Err((_, why)) = self.exec_control(Hop::Child(rank), &h, payload.as_ref()) {
                    debug!(rank, reason = %why, "exec: control from a child ignored");
                }
            }
            other => debug!(rank, "overlay: ignored {other:?} '{}'", h.topic),
        }
    }

    /// The principal the hello check expects for `rank` given who
    /// authenticated: from the key ring when there is one.
    fn hello_expected(&self, rank: u32, user_id: &str) -> Option<String> {
        if self.rot.ring.is_empty() {
            self.expected.get(&rank).cloned()
        } else {
            self.rot.ring.expected(rank, user_id)
        }
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
            let now = self.now;
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
                    verdict = %"allow",
                    rank = hello.rank,
                    principal = %user_id,
                    address = %address,
                    reason = %"hello accepted",
                    "overlay: child joined"
                );
                self.by_rid.insert(rid.clone(), hello.rank);
                let now = self.now;
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
                self.send_rid(&rid, resp, P::from(Vec::new()));
                if let Some(after) = hello.last_event {
                    self.replay_events(&rid, hello.rank, after);
                }
            }
            Err(e) => {
                warn!(verdict = %"deny", principal = %user_id, address = %address, reason = %e, "overlay: hello refused");
                // A child of ours that is not online: show why in status.
                if let Ok(hello) = Hello::decode(payload) {
                    if self.topo.parent(hello.rank) == Some(self.rank)
                        && !self.children.contains_key(&hello.rank)
                        && !matches!(e, HelloError::AlreadyOnline { .. })
                    {
                        let now = self.now;
                        let why = format!("refused by rank {}: {e}", self.rank);
                        self.health.set(hello.rank, RankState::Refused, &why, now);
                    }
                }
                // A restarted broker may say hello before we noticed its old
                // session die: let it retry rather than exit.
                // EPERM: a key the parent does not admit for that rank,
                // which the parent's admin can fix (the child retries);
                // EINVAL: a mismatch in the child's own config or version,
                // which only restarting it fixed can cure (it exits).
                let code = match e {
                    HelloError::AlreadyOnline { .. } => errno::EAGAIN,
                    HelloError::WrongKey { .. } => errno::EPERM,
                    _ => errno::EINVAL,
                };
                let resp = h.response(self.rank, code);
                self.transmits.push_back(Transmit::Child(
                    rid,
                    resp,
                    P::from(e.to_string().into_bytes()),
                ));
            }
        }
    }

    /// The children's keys changed or the policy was reloaded: a child
    /// whose key is no longer admitted for its rank is disconnected.
    fn recheck_children(&mut self) {
        let gone: Vec<u32> = self
            .children
            .iter()
            .filter(|(rank, l)| {
                self.hello_expected(**rank, &l.principal).as_deref() != Some(l.principal.as_str())
            })
            .map(|(r, _)| *r)
            .collect();
        for rank in gone {
            self.disconnect(rank, "its key is no longer admitted for this rank");
        }
    }

    /// Tell a child it is disconnected and forget it.
    fn disconnect(&mut self, rank: u32, reason: &str) {
        if let Some(rid) = self.children.get(&rank).map(|l| l.rid.clone()) {
            warn!(
                verdict = %"deny",
                rank, reason = %reason, "overlay: disconnecting a child"
            );
            self.transmits.push_back(Transmit::Child(
                rid,
                Header::control(DISCONNECT_TOPIC),
                P::from(reason.as_bytes().to_vec()),
            ));
            self.lose_child(rank, reason);
        }
    }

    // ----- clients -----

    fn local_connected(&mut self, id: u32, uid: u32) {
        if uid == self.owner_uid {
            info!(verdict = %"allow", principal = %self.owner_principal, uid, mechanism = %"peercred", roles = %Roles::OWNER, "local: client admitted as the instance owner");
            let principal = self.owner_principal.clone();
            self.clients.insert(
                id,
                Client::new(
                    ClientKind::Local { uid },
                    Vec::new(),
                    principal,
                    Grant::plain(Roles::OWNER),
                    Mech::Local,
                    String::new(),
                    Access::Admitted,
                ),
            );
            return;
        }
        let conns = self.per_uid.get(&uid).copied().unwrap_or(0);
        if conns >= self.budgets.connections {
            warn!(verdict = %"deny", uid, mechanism = %"peercred", connections = conns, budget = self.budgets.connections, "budget: too many connections for this uid; connection refused");
            let msg = format!("uid {uid} already has {conns} connections to this broker (budget {}); close some and retry", self.budgets.connections);
            self.refuse_local(id, errno::EAGAIN, &msg);
            return;
        }
        let waiting = self
            .clients
            .values()
            .filter(|c| matches!(c.access, Access::Deciding { first: true, .. }))
            .count();
        if waiting >= MAX_PENDING_ADMISSIONS {
            warn!(
                verdict = %"deny",
                uid,
                mechanism = %"peercred",
                reason = %"too many connections are waiting for an access decision",
                limit = MAX_PENDING_ADMISSIONS,
                "local: connection refused"
            );
            self.refuse_local(
                id,
                errno::EAGAIN,
                "too many connections are waiting for an access decision; retry in a moment",
            );
            return;
        }
        let ticket = self.ticket();
        *self.per_uid.entry(uid).or_default() += 1;
        self.clients.insert(
            id,
            Client::new(
                ClientKind::Local { uid },
                Vec::new(),
                format!("unix:#{uid}"),
                Grant::default(),
                Mech::Local,
                String::new(),
                Access::Deciding {
                    ticket,
                    first: true,
                },
            ),
        );
        self.events.push_back(Event::Job(Job::Admit {
            ticket,
            subject: Subject {
                principal: None,
                uid: Some(uid),
                mech: Mech::Local,
                address: String::new(),
            },
        }));
    }

    fn ticket(&mut self) -> u64 {
        let t = self.next_ticket;
        self.next_ticket += 1;
        t
    }

    /// One error frame, then close.
    fn refuse_local(&mut self, id: u32, errnum: u32, msg: &str) {
        let mut h = Header::request("connect", self.rank, 0);
        h.msg_type = MsgType::Response;
        h.errnum = errnum;
        self.transmits
            .push_back(Transmit::Local(id, h, P::from(msg.as_bytes().to_vec())));
        self.events.push_back(Event::Close { id });
    }

    fn remote_ingress(
        &mut self,
        rid: Vec<u8>,
        user_id: String,
        grant: Grant,
        address: String,
        h: Header,
        payload: P,
    ) {
        if self.revoked_remote.contains_key(&rid) {
            debug!(principal = %user_id, "remote: message on a revoked connection dropped");
            return;
        }
        let id = match self.remote_ids.get(&rid) {
            Some(id) if self.clients.get(id).is_some_and(|c| c.principal == user_id) => *id,
            _ => {
                let mut conns = self.per_principal.get(&user_id).copied().unwrap_or(0);
                if conns >= self.budgets.connections {
                    // libzmq does not say when a remote client goes away, so
                    // its entry stays until a send to it fails. At the
                    // budget, forget an idle one of this principal (nothing
                    // in flight, no subscription, no service offered): if it
                    // is still there, its next message makes a new entry.
                    // Otherwise refuse.
                    let idle = self
                        .clients
                        .iter()
                        .filter(|(_, c)| {
                            c.kind == ClientKind::Remote
                                && c.principal == user_id
                                && c.in_flight.is_empty()
                                && c.subs.is_empty()
                                && c.offers.is_empty()
                                && c.delivered.is_empty()
                                && c.access == Access::Admitted
                        })
                        .map(|(id, _)| *id)
                        .min();
                    if let Some(old) = idle {
                        self.remove_client(old);
                        conns -= 1;
                    }
                }
                if conns >= self.budgets.connections {
                    warn!(verdict = %"deny", principal = %user_id, connections = conns, budget = self.budgets.connections, "budget: too many connections for this principal; message refused");
                    if !no_response(&h) {
                        let mut r = h.response(self.rank, errno::EAGAIN);
                        r.route.clear();
                        let msg = format!("{user_id} already has {conns} connections to this broker (budget {}); close some and retry", self.budgets.connections);
                        self.transmits.push_back(Transmit::Remote(
                            rid,
                            r,
                            P::from(msg.into_bytes()),
                        ));
                    }
                    return;
                }
                *self.per_principal.entry(user_id.clone()).or_default() += 1;
                let id = self.new_client_id();
                self.remote_ids.insert(rid.clone(), id);
                // After a reload, the connection-time verdict may be stale:
                // decide again before the first message is served.
                let access = if self.reloaded {
                    let ticket = self.ticket();
                    self.events.push_back(Event::Job(Job::Admit {
                        ticket,
                        subject: Subject {
                            principal: Some(user_id.clone()),
                            uid: None,
                            mech: self.remote_mech,
                            address: address.clone(),
                        },
                    }));
                    Access::Deciding {
                        ticket,
                        first: false,
                    }
                } else {
                    Access::Admitted
                };
                let mech = self.remote_mech;
                self.clients.insert(
                    id,
                    Client::new(
                        ClientKind::Remote,
                        rid,
                        user_id,
                        grant,
                        mech,
                        address,
                        access,
                    ),
                );
                id
            }
        };
        if self.over_budget(id, &h, payload.as_ref().len(), Queued::default()) {
            return;
        }
        self.client_ingress(id, h, payload);
    }

    /// A request from a client: stamp its identity and route it, or hold
    /// it while its access is being decided.
    fn client_ingress(&mut self, id: u32, mut h: Header, payload: P) {
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        // Responses are a provider's answers (docs/protocol.md §6.1).
        if !matches!(h.msg_type, MsgType::Request | MsgType::Response) {
            let first = c.warned & REFUSED_NOT_REQUEST == 0;
            c.warned |= REFUSED_NOT_REQUEST;
            if first {
                warn!(verdict = %"deny", principal = %c.principal, msg_type = ?h.msg_type, topic = %h.topic, "client: sent a message that is not a request; dropped (logged once per connection)");
            } else {
                debug!(principal = %c.principal, msg_type = ?h.msg_type, "client: sent a non-request; dropped");
            }
            return;
        }
        if let Access::Deciding { .. } = c.access {
            if c.held_in.len() >= MAX_HELD_IN {
                let mut r = h.response(self.rank, errno::EAGAIN);
                r.route = vec![Hop::Local(id)];
                let msg = "your access is still being decided; retry in a moment";
                self.deliver(id, r, P::from(msg.as_bytes().to_vec()), true);
                return;
            }
            c.held_in.push_back((h, payload));
            return;
        }
        if h.msg_type == MsgType::Response {
            return self.provider_answered(id, h, payload);
        }
        if !no_response(&h) {
            let n = payload.as_ref().len();
            if let Some(old) = c.in_flight.insert(h.matchtag, n) {
                c.in_flight_bytes -= old;
                self.total_in_flight -= old;
                if let Some(b) = self.principal_in_flight.get_mut(&c.principal) {
                    *b -= old;
                }
            }
            c.in_flight_bytes += n;
            self.total_in_flight += n;
            match self.principal_in_flight.get_mut(&c.principal) {
                Some(b) => *b += n,
                None => {
                    self.principal_in_flight.insert(c.principal.clone(), n);
                }
            }
        }
        // Identity is stamped here, at ingress; whatever the client claimed is discarded.
        h.userid.clone_from(&c.principal);
        h.roles = c.grant.roles_for(&h.topic);
        if !c.offers.is_empty()
            && h.topic == "event.pub"
            && Self::publishes_own_namespace(&c.offers, payload.as_ref())
        {
            h.roles = h.roles.union(Roles::OPERATOR);
        }
        h.route.clear();
        h.route.push(Hop::Local(id));
        self.route_request(h, payload);
    }

    fn remove_client(&mut self, id: u32) {
        if let Some(c) = self.drop_client(id) {
            if c.kind == ClientKind::Remote {
                self.remote_ids.remove(&c.rid);
            }
        }
    }

    /// Forget a client and what it counted against the budgets.
    fn drop_client(&mut self, id: u32) -> Option<Client<P>> {
        let mut c = self.clients.remove(&id)?;
        self.exec_upstream_gone(Hop::Local(id));
        self.release(&c.principal, c.in_flight_bytes);
        if !c.offers.is_empty() || !c.delivered.is_empty() {
            let offers = std::mem::take(&mut c.offers);
            let delivered: Vec<Header> = c.delivered.drain().map(|(_, h)| h).collect();
            self.provider_gone(offers, delivered);
        }
        match c.kind {
            ClientKind::Local { uid } => {
                if let Some(n) = self.per_uid.get_mut(&uid) {
                    *n -= 1;
                    if *n == 0 {
                        self.per_uid.remove(&uid);
                    }
                }
            }
            ClientKind::Remote => {
                if let Some(n) = self.per_principal.get_mut(&c.principal) {
                    *n -= 1;
                    if *n == 0 {
                        self.per_principal.remove(&c.principal);
                    }
                }
            }
        }
        Some(c)
    }

    fn release(&mut self, principal: &str, bytes: usize) {
        self.total_in_flight = self.total_in_flight.saturating_sub(bytes);
        if let Some(b) = self.principal_in_flight.get_mut(principal) {
            *b = b.saturating_sub(bytes);
            if *b == 0 {
                self.principal_in_flight.remove(principal);
            }
        }
    }

    /// EAGAIN `h` if this request would take its client, principal or the
    /// broker past a budget. True if refused.
    fn over_budget(&mut self, id: u32, h: &Header, n: usize, q: Queued) -> bool {
        let Some(c) = self.clients.get(&id) else {
            return false;
        };
        if h.msg_type != MsgType::Request || no_response(h) {
            return false;
        }
        let b = self.budgets;
        let principal_held = self
            .principal_in_flight
            .get(&c.principal)
            .copied()
            .unwrap_or(0);
        let mine = q.conn + c.in_flight_bytes;
        let theirs = q.uid + principal_held;
        let all = q.total + self.total_in_flight;
        let refusal = if n > b.max_message {
            Some((
                errno::EMSGSIZE,
                format!(
                    "a {n}-byte payload is over this broker's limit of {} bytes",
                    b.max_message
                ),
            ))
        } else if c.in_flight.len() >= b.in_flight {
            Some((errno::EAGAIN, format!("{} requests are in flight on this connection (budget {}); wait for answers before sending more", c.in_flight.len(), b.in_flight)))
        } else if mine > 0 && mine + n > b.client_bytes {
            Some((errno::EAGAIN, format!("{mine} bytes are queued or in flight for this connection (budget {}); read your replies before sending more", b.client_bytes)))
        } else if theirs > 0 && theirs + n > b.principal_bytes {
            Some((errno::EAGAIN, format!("{theirs} bytes are queued or in flight for {} (budget {}); read your replies before sending more", c.principal, b.principal_bytes)))
        } else if all > 0 && all + n > b.total_bytes {
            Some((
                errno::EAGAIN,
                format!(
                    "this broker holds {all} bytes for its clients (budget {}); retry later",
                    b.total_bytes
                ),
            ))
        } else {
            None
        };
        let Some((e, msg)) = refusal else {
            return false;
        };
        let principal = c.principal.clone();
        if self.first_refusal(id, REFUSED_BUDGET) {
            warn!(verdict = %"deny", principal = %principal, topic = %h.topic, errnum = e, reason = %msg, "budget: request refused (logged once per connection)");
        } else {
            debug!(principal = %principal, topic = %h.topic, reason = %msg, "budget: request refused");
        }
        let mut r = h.response(self.rank, e);
        r.route = vec![Hop::Local(id)];
        self.deliver(id, r, P::from(msg.into_bytes()), true);
        true
    }

    /// Whether this is the first refusal of `kind` for client `id` (to be
    /// logged at warn); later ones are logged at debug.
    fn first_refusal(&mut self, id: u32, kind: u8) -> bool {
        self.clients.get_mut(&id).is_some_and(|c| {
            let first = c.warned & kind == 0;
            c.warned |= kind;
            first
        })
    }

    /// A message could not be queued toward a neighbour. A request is
    /// answered EAGAIN at once; an event is missed by that subtree (which
    /// reports the gap); a response is lost and its requester times out.
    fn send_full(&mut self, rid: Option<Vec<u8>>, h: Header) {
        let link = match &rid {
            None => Link::Parent,
            Some(r) => match self.by_rid.get(r) {
                Some(rank) => Link::Child(*rank),
                None => return,
            },
        };
        let who = match link {
            Link::Parent => "the parent broker".to_string(),
            Link::Child(r) => format!("rank {r}"),
        };
        debug!(link = %who, topic = %h.topic, "budget: the queue toward a neighbour is full; message not sent");
        if h.msg_type == MsgType::Request && self.pending.complete(link, &h.route, h.matchtag) {
            let r = h.response(self.rank, errno::EAGAIN);
            let msg = format!("the queue toward {who} is full (it is not reading); retry later");
            self.route_response(r, P::from(msg.into_bytes()));
        }
    }

    /// A neighbour that does not answer holds at most `neighbour_bytes` of
    /// requests; past that the sender gets EAGAIN (and EHOSTUNREACH for
    /// all of them once the neighbour is declared lost). True if refused.
    fn link_full(&mut self, link: Link, n: usize, h: &Header) -> bool {
        let held = self.pending.bytes(link);
        if held == 0 || held + n <= self.budgets.neighbour_bytes {
            return false;
        }
        let who = match link {
            Link::Parent => "the parent broker".to_string(),
            Link::Child(r) => format!("rank {r}"),
        };
        let first = match h.route.last() {
            Some(&Hop::Local(id)) => self.first_refusal(id, REFUSED_BUDGET),
            _ => false,
        };
        if first {
            warn!(verdict = %"deny", principal = %h.userid, link = %who, held, budget = self.budgets.neighbour_bytes, "budget: neighbour queue full; request refused (logged once per connection)");
        } else {
            debug!(link = %who, held, "budget: neighbour queue full");
        }
        let msg = format!(
            "{who} is not keeping up: {held} bytes of requests are in flight toward it (budget {}); retry later",
            self.budgets.neighbour_bytes
        );
        self.respond_err(h, errno::EAGAIN, &msg);
        true
    }

    /// Deliver to a client; `bypass` skips the hold (answers about the
    /// hold itself).
    fn deliver(&mut self, id: u32, h: Header, payload: P, bypass: bool) {
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        if h.msg_type == MsgType::Response
            && h.flags & canopy_proto::FLAG_MORE == 0
            && !c.in_flight.is_empty()
        {
            if let Some(n) = c.in_flight.remove(&h.matchtag) {
                c.in_flight_bytes -= n;
                self.total_in_flight = self.total_in_flight.saturating_sub(n);
                if let Some(b) = self.principal_in_flight.get_mut(&c.principal) {
                    *b = b.saturating_sub(n);
                }
            }
        }
        if !bypass && matches!(c.access, Access::Deciding { .. }) {
            if c.held_out.len() >= MAX_HELD_OUT {
                warn!(principal = %c.principal, held = MAX_HELD_OUT, "client: too much held for it while its access is decided; disconnecting it");
                self.cut(id);
                return;
            }
            c.held_out.push_back((h, payload));
            return;
        }
        let t = match c.kind {
            ClientKind::Local { .. } => Transmit::Local(id, h, payload),
            ClientKind::Remote => Transmit::Remote(c.rid.clone(), h, payload),
        };
        self.transmits.push_back(t);
    }

    /// Forget a client; a local one is closed, a remote connection is
    /// remembered as revoked so that nothing it sends is served again.
    fn cut(&mut self, id: u32) {
        let Some(c) = self.drop_client(id) else {
            return;
        };
        match c.kind {
            ClientKind::Local { .. } => self.events.push_back(Event::Close { id }),
            ClientKind::Remote => {
                self.remote_ids.remove(&c.rid);
                if self.revoked_order.len() >= MAX_REVOKED_REMOTE {
                    if let Some(old) = self.revoked_order.pop_front() {
                        self.revoked_remote.remove(&old);
                    }
                }
                self.revoked_order.push_back(c.rid.clone());
                self.revoked_remote.insert(c.rid, ());
            }
        }
    }

    /// Cut a client whose access was revoked, with one EPERM first.
    fn revoke(&mut self, id: u32, reason: &str) {
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        c.held_in.clear();
        c.held_out.clear();
        c.subs.clear();
        warn!(verdict = %"deny", principal = %c.principal, mechanism = %c.mech.as_str(), address = %c.address, reason = %reason, "authz: access revoked");
        let mut h = Header::request(REVOKED_TOPIC, self.rank, 0);
        h.msg_type = MsgType::Response;
        h.errnum = errno::EPERM;
        let msg = format!("permission denied: access revoked: {reason}");
        self.deliver(id, h, P::from(msg.into_bytes()), true);
        self.cut(id);
    }

    fn job_done(&mut self, d: Done) {
        match d {
            Done::Admitted { ticket, verdict } => self.admitted(ticket, verdict),
            Done::Vetoed { ticket, veto } => {
                if let (Some(rank), Some(why)) = (self.vetting.remove(&ticket), veto) {
                    self.disconnect(rank, &format!("the policy now denies it: {why}"));
                }
            }
            Done::Explained { req, result } => match result {
                Ok(body) => self.respond(&req, P::from(body)),
                Err((e, msg)) => self.respond_err(&req, e, &msg),
            },
            Done::PolicyReloaded { req, result } => self.policy_reloaded(req, result),
        }
    }

    fn admitted(&mut self, ticket: u64, verdict: Result<(String, Grant), (String, String)>) {
        let Some((&id, c)) = self
            .clients
            .iter_mut()
            .find(|(_, c)| matches!(c.access, Access::Deciding { ticket: t, .. } if t == ticket))
        else {
            return; // the client left meanwhile
        };
        let Access::Deciding { first, .. } = c.access else {
            return;
        };
        match verdict {
            Ok((principal, grant)) if !grant.is_empty() => {
                info!(verdict = %"allow", principal = %principal, mechanism = %c.mech.as_str(), roles = %grant.roles, scope = %grant.encode_scope(), "authz: client admitted");
                c.principal = principal;
                c.grant = grant;
                c.access = Access::Admitted;
                if !c.offers.is_empty() {
                    self.recheck_offers(id);
                }
                let Some(c) = self.clients.get_mut(&id) else {
                    return;
                };
                let held_in = std::mem::take(&mut c.held_in);
                let held_out = std::mem::take(&mut c.held_out);
                for (h, p) in held_out {
                    self.deliver(id, h, p, false);
                }
                for (h, p) in held_in {
                    self.client_ingress(id, h, p);
                }
            }
            other => {
                let (principal, reason) = match other {
                    Err(x) => x,
                    Ok((p, _)) => (p, "the policy grants no role".to_string()),
                };
                c.principal = principal;
                if first && c.kind != ClientKind::Remote {
                    let uid = match c.kind {
                        ClientKind::Local { uid } => uid,
                        ClientKind::Remote => 0,
                    };
                    warn!(verdict = %"deny", principal = %c.principal, uid, mechanism = %"peercred", reason = %reason, "local: connection refused");
                    let msg = format!("permission denied: {}: {reason}", c.principal);
                    self.drop_client(id);
                    self.refuse_local(id, errno::EPERM, &msg);
                } else {
                    self.revoke(id, &reason);
                }
            }
        }
    }

    /// The policy was reloaded: every client and child is decided again,
    /// once; whoever lost access is cut now, not at its next message.
    fn policy_reloaded(&mut self, req: Option<Header>, result: Result<String, String>) {
        let msg = match result {
            Ok(msg) => msg,
            Err(e) => {
                tracing::error!(
                    by = %req.as_ref().map(|h| h.userid.as_str()).unwrap_or("SIGHUP"),
                    "acl: reload failed: {e}"
                );
                if let Some(h) = req {
                    self.respond_err(&h, errno::EINVAL, &e);
                }
                return;
            }
        };
        warn!(
            by = %req.as_ref().map(|h| h.userid.as_str()).unwrap_or("SIGHUP"),
            "acl: {msg}"
        );
        self.reloaded = true;
        let ids: Vec<u32> = self.clients.keys().copied().collect();
        for id in ids {
            let ticket = self.ticket();
            let c = self.clients.get_mut(&id).expect("listed");
            // The owner is known by uid, not by role: a principal the
            // policy made `owner` is decided again like anyone else.
            if c.kind
                == (ClientKind::Local {
                    uid: self.owner_uid,
                })
            {
                continue;
            }
            // A first decision still on its way was made under the old
            // policy: ask again (its answer is ignored when it comes).
            let first = matches!(c.access, Access::Deciding { first: true, .. });
            c.access = Access::Deciding { ticket, first };
            let subject = Subject {
                principal: (!first).then(|| c.principal.clone()),
                uid: match c.kind {
                    ClientKind::Local { uid } => Some(uid),
                    ClientKind::Remote => None,
                },
                mech: c.mech,
                address: c.address.clone(),
            };
            self.events
                .push_back(Event::Job(Job::Admit { ticket, subject }));
        }
        let children: Vec<(u32, String)> = self
            .children
            .iter()
            .map(|(r, l)| (*r, l.principal.clone()))
            .collect();
        for (rank, principal) in children {
            let ticket = self.ticket();
            self.vetting.insert(ticket, rank);
            self.events.push_back(Event::Job(Job::Veto {
                ticket,
                principal,
                address: String::new(),
            }));
        }
        if let Some(h) = req {
            self.respond(&h, P::from(msg.into_bytes()));
        }
    }

    // ----- routing -----

    fn route_request(&mut self, h: Header, payload: P) {
        let svc = services::lookup(&h.topic, self.rank, &self.modules).or_else(|| {
            self.provided_role(&h.topic)
                .map(|r| (r, services::Builtin::Provided))
        });
        match next_hop(&self.topo, self.rank, h.nodeid, svc.is_some()) {
            Next::Local => {
                let (needed, svc) = svc.expect("local implies a service");
                if !h.roles.satisfies(needed) {
                    let msg = format!(
                        "{} requires role '{needed}' in namespace '{}'; principal {} has roles '{}' there",
                        h.topic,
                        provided::namespace(&h.topic),
                        h.userid,
                        h.roles
                    );
                    warn!(verdict = %"deny", principal = %h.userid, topic = %h.topic, reason = %format!("missing role {needed}"), "authz: request refused");
                    self.events.push_back(Event::Job(Job::RoleRefused {
                        principal: h.userid.clone(),
                        roles: h.roles,
                        topic: h.topic.clone(),
                    }));
                    self.respond_err(&h, errno::EPERM, &msg);
                    return;
                }
                self.call(svc, h, payload);
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
                if !no_response(&h) {
                    let n = payload.as_ref().len();
                    if self.link_full(Link::Parent, n, &h) {
                        return;
                    }
                    self.pending.insert(Link::Parent, in_flight(&h, n));
                }
                self.send_parent(h, payload);
            }
            Next::Down(child) => {
                if !self.children.contains_key(&child) {
                    let msg = format!("rank {child} is not online; check 'canopy overlay status'");
                    self.respond_err(&h, errno::EHOSTUNREACH, &msg);
                    return;
                }
                if !no_response(&h) {
                    let n = payload.as_ref().len();
                    if self.link_full(Link::Child(child), n, &h) {
                        return;
                    }
                    self.pending.insert(Link::Child(child), in_flight(&h, n));
                }
                self.send_child(child, h, payload);
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
                if let Some(&Hop::Local(id)) = h.route.last() {
                    if self.first_refusal(id, REFUSED_UNROUTABLE) {
                        warn!(verdict = %"deny", principal = %h.userid, topic = %h.topic, nodeid = h.nodeid, errnum = e, reason = %msg, "route: request refused (logged once per connection)");
                    }
                }
                self.respond_err(&h, e, &msg);
            }
        }
    }

    /// Whether a response that came over `link` answers a request in
    /// flight there. A streamed response flagged MORE leaves the entry in
    /// place for the ones that follow.
    fn response_matches(&mut self, link: Link, h: &Header) -> bool {
        if h.flags & canopy_proto::FLAG_MORE != 0 {
            self.pending.contains(link, &h.route, h.matchtag)
        } else {
            self.pending.complete(link, &h.route, h.matchtag)
        }
    }

    fn respond_err(&mut self, req: &Header, errnum: u32, msg: &str) {
        if no_response(req) {
            return;
        }
        let r = req.response(self.rank, errnum);
        self.route_response(r, P::from(msg.as_bytes().to_vec()));
    }

    fn respond(&mut self, req: &Header, payload: P) {
        if no_response(req) {
            return;
        }
        let r = req.response(self.rank, 0);
        self.route_response(r, payload);
    }

    fn route_response(&mut self, mut h: Header, payload: P) {
        match h.route.pop() {
            Some(Hop::Parent) => self.send_parent(h, payload),
            Some(Hop::Child(r)) => {
                if !self.send_child(r, h, payload) {
                    debug!(
                        rank = r,
                        "overlay: response dropped: the rank is not online"
                    );
                }
            }
            Some(Hop::Local(id)) => self.deliver(id, h, payload, false),
            None => {
                if !self.exec_sub_response(&h, payload) {
                    debug!(topic = %h.topic, "overlay: response with an empty route dropped")
                }
            }
        }
    }

    // ----- events -----

    fn publish(&mut self, h: Header, payload: P) {
        let body = payload.as_ref();
        let (topic, data) = match services::parse_event_pub(body) {
            Ok(x) => x,
            Err((e, msg)) => return self.respond_err(&h, e, msg),
        };
        if self.launched && topic == SHUTDOWN_TOPIC && !h.roles.contains(Roles::OWNER) {
            if let Some(&Hop::Local(id)) = h.route.last() {
                if self.first_refusal(id, REFUSED_TOPIC) {
                    warn!(verdict = %"deny", principal = %h.userid, topic = %topic, "events: only the owner may publish this topic; refused (logged once per connection)");
                }
            }
            return self.respond_err(
                &h,
                errno::EPERM,
                "only the instance owner may end the instance (instance.shutdown)",
            );
        }
        let seq = self.sequencer.next_seq();
        let mut ev = Header::event(topic, seq);
        ev.nodeid = self.epoch;
        ev.userid.clone_from(&h.userid);
        ev.roles = h.roles;
        let data = data.to_vec();
        self.distribute_event(&ev, &data, None);
        self.respond(&h, P::from(seq.to_be_bytes().to_vec()));
        self.shutdown_event(&ev.topic, &data);
        self.replay.push(self.epoch, seq, (ev, data));
    }

    fn event_arrived(&mut self, h: Header, payload: P) {
        match self.gaps.arrive_in(h.nodeid, h.seq) {
            Arrival::Duplicate => {
                debug!(seq = h.seq, "events: duplicate event dropped");
                return;
            }
            Arrival::Gap { from, to } => {
                warn!(from, to, "events: missed events (reported in overlay status; the parent no longer held them)");
                let (missed, _) = self.gaps.missed();
                self.health.set_missed(self.rank, missed);
            }
            Arrival::First | Arrival::InOrder => {}
        }
        let data = payload.as_ref().to_vec();
        self.distribute_event(&h, &data, Some(payload));
        self.shutdown_event(&h.topic, &data);
        self.replay.push(h.nodeid, h.seq, (h, data));
    }

    /// Send a rejoining child the events after the last one it saw.
    fn replay_events(&mut self, rid: &[u8], rank: u32, after: (u32, u64)) {
        let events = self.replay.after(after.0, after.1);
        if events.is_empty() {
            return;
        }
        info!(
            rank,
            "events: replaying {} events after {} to rank {rank}",
            events.len(),
            after.1
        );
        for (ev, data) in events {
            self.send_rid(rid, ev, P::from(data));
        }
    }

    /// An event to every child and to every matching subscriber.
    /// `for_children` is the payload to send the children if the caller
    /// has one to give up (else `data` is copied once).
    /// The children's routing ids, from the cache unless the children
    /// changed since it was made.
    fn child_rid_list(&mut self) -> Arc<[Vec<u8>]> {
        let same = self.child_rids.len() == self.children.len()
            && self
                .child_rids
                .iter()
                .zip(self.children.values())
                .all(|(a, c)| *a == c.rid);
        if !same {
            self.child_rids = self.children.values().map(|c| c.rid.clone()).collect();
        }
        self.child_rids.clone()
    }

    fn distribute_event(&mut self, ev: &Header, data: &[u8], for_children: Option<P>) {
        let children = if self.rot.held.is_empty() {
            self.child_rid_list()
        } else {
            // A child is being rebound: what goes to it is held, so each
            // child takes the general path.
            let rids: Vec<Vec<u8>> = self.children.values().map(|c| c.rid.clone()).collect();
            for rid in rids {
                self.send_rid_owned(rid, ev.clone(), P::from(data.to_vec()));
            }
            Arc::from(Vec::new())
        };
        // Local subscribers whose access is settled share the one
        // transmit; the others take the general path.
        let mut locals = Vec::new();
        let mut others = std::mem::take(&mut self.scratch_ids);
        for (id, c) in self.clients.iter() {
            if c.subs.is_empty() || !c.subs.iter().any(|p| topic_matches(p, &ev.topic)) {
                continue;
            }
            match (c.kind, &c.access) {
                (ClientKind::Local { .. }, a) if !matches!(a, Access::Deciding { .. }) => {
                    locals.push(*id)
                }
                _ => others.push(*id),
            }
        }
        for id in others.drain(..) {
            self.deliver(id, ev.clone(), P::from(data.to_vec()), false);
        }
        self.scratch_ids = others;
        if children.is_empty() && locals.is_empty() {
            return;
        }
        let payload = for_children.unwrap_or_else(|| P::from(data.to_vec()));
        self.transmits.push_back(Transmit::Event {
            children,
            locals,
            header: ev.clone(),
            payload,
        });
    }

    fn subscription(&mut self, h: Header, payload: P) {
        let Some(Hop::Local(id)) = h.route.first().copied().filter(|_| h.route.len() == 1) else {
            return self.respond_err(
                &h,
                errno::EPROTO,
                "subscribe on your own broker's local connector",
            );
        };
        let pattern = String::from_utf8_lossy(payload.as_ref()).into_owned();
        if let Some(c) = self.clients.get_mut(&id) {
            if h.topic == "event.subscribe" {
                c.subs.push(pattern);
            } else {
                c.subs.retain(|p| *p != pattern);
            }
        }
        self.respond(&h, P::from(Vec::new()));
    }

    /// `overlay.disconnect` (admin), sent to the parent of the rank named in
    /// the payload: drop that child's link. The child exits, saying who
    /// disconnected it.
    fn disconnect_rpc(&mut self, h: Header, payload: P) {
        let text = String::from_utf8_lossy(payload.as_ref());
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
        if !self.children.contains_key(&rank) {
            let msg = format!("rank {rank} is not online");
            return self.respond_err(&h, errno::EHOSTUNREACH, &msg);
        }
        let reason = format!("disconnected by {} through rank {}", h.userid, self.rank);
        self.disconnect(rank, &reason);
        self.respond(&h, P::from(Vec::new()));
    }
}

impl<P> Client<P> {
    fn new(
        kind: ClientKind,
        rid: Vec<u8>,
        principal: String,
        grant: Grant,
        mech: Mech,
        address: String,
        access: Access,
    ) -> Client<P> {
        Client {
            kind,
            rid,
            principal,
            grant,
            mech,
            address,
            subs: Vec::new(),
            offers: Vec::new(),
            delivered: IdMap::default(),
            next_token: 0,
            access,
            held_in: VecDeque::new(),
            held_out: VecDeque::new(),
            in_flight: IdMap::default(),
            in_flight_bytes: 0,
            warned: 0,
        }
    }
}

/// A response that matches no request in flight over its link: its
/// requester's link was lost (the requester may since have restarted as a
/// new incarnation, which must not get it) or it was already answered
/// with EHOSTUNREACH. Dropped, so every request gets exactly one answer.
fn stale_response(h: &Header) {
    debug!(topic = %h.topic, matchtag = h.matchtag, "overlay: dropped a response that matches no request in flight");
}
