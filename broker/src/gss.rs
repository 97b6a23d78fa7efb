//! The `gssapi` mechanism in the broker: Kerberos authenticates, CURVE
//! carries the traffic (see `canopy-gss` and docs/security.md).
//!
//! * [`GssGate`]: the ZAP decisions of a gssapi instance. A CURVE key is
//!   admitted only if the key exchange bound it to a Kerberos principal and
//!   the binding is live: on the overlay as an expected peer principal
//!   (role `peer`), on the client endpoint with exactly the roles the ACL
//!   gives that principal. `User-Id` is the canonical principal. Unbound
//!   keys are refused; there is no plaintext mode and no fallback.
//! * [`start_server`]: the acceptor on its own threads (never the routing
//!   thread, so a slow KDC cannot stall message routing).
//! * [`join_parent`] / [`spawn_renewal`]: the child's handshake, and its
//!   re-authentication at 2/3 of the binding's lifetime with the same link
//!   key, so a link outlives any one ticket without a reconnect.

use crate::authz::{ClientAuthz, ClientVerdict, Mech, CLIENT_DOMAIN, OVERLAY_DOMAIN};
use crate::error::BrokerError;
use canopy_gss::{Bindings, ClientConfig, KexServer, Purpose, ServerConfig};
use canopy_proto::Roles;
use canopy_zap::{AuthRequest, Decision, Mechanism};
use std::collections::HashSet;
use std::net::TcpListener;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// ZAP metadata property carrying the peer's CURVE key (`curve:<Z85>`), so
/// the broker can check the key's binding on every message.
pub const LINK_KEY_PROPERTY: &str = canopy_zap::codec::LINK_KEY_PROPERTY;

/// Handshake I/O timeout.
pub const KEX_TIMEOUT: Duration = Duration::from_secs(5);

/// Options of the gssapi mechanism for one broker.
#[derive(Clone, Debug, Default)]
pub struct GssOpts {
    /// This broker's principal; `None` takes the default principal of the
    /// credential cache or client keytab. In a user instance every broker
    /// authenticates as the user.
    pub principal: Option<String>,
    /// Where rank 0's key exchange listens for clients (`HOST:PORT`).
    pub kex_listen: Option<String>,
    /// Cap on a binding's lifetime (tests; default: the ticket's).
    pub max_lifetime: Option<Duration>,
    /// Cap on one principal's live key bindings (default
    /// [`canopy_gss::bindings::DEFAULT_PER_PRINCIPAL`]).
    pub max_bindings_per_principal: Option<usize>,
}

impl GssOpts {
    /// The binding table with this broker's caps.
    pub fn bindings(&self) -> Bindings {
        Bindings::with_caps(
            self.max_bindings_per_principal
                .unwrap_or(canopy_gss::bindings::DEFAULT_PER_PRINCIPAL),
            canopy_gss::bindings::DEFAULT_TOTAL,
        )
    }
}

/// The ZAP side of a gssapi instance.
pub struct GssGate {
    pub bindings: Arc<Bindings>,
    /// Canonical principals admitted as overlay peers.
    pub peers: HashSet<String>,
    warned: Mutex<HashSet<String>>,
    /// This broker's link to its parent, shared with the renewal thread.
    pub parent: Arc<ParentLink>,
    /// Remote client connections by link key, so that each is cut the
    /// moment its binding ends (expiry is revocation).
    remote: Mutex<RemoteLinks>,
}

/// Most remote client connections tracked for expiry (past it, an expired
/// connection's messages are still dropped, but it is not cut at once).
const MAX_TRACKED_REMOTE: usize = 65_536;

#[derive(Default)]
struct RemoteLinks {
    /// key → (routing id, binding's expiry).
    by_key: std::collections::HashMap<String, (Vec<u8>, Instant)>,
    /// The earliest expiry in `by_key`.
    next: Option<Instant>,
}

/// Between the broker loop and the renewal thread: the loop says when the
/// parent link was lost (so the thread re-authenticates at once, e.g. to a
/// restarted parent), and takes the parent's latest CURVE key, vouched for
/// by the parent's principal, when it reconnects. The loop never waits.
#[derive(Default)]
pub struct ParentLink {
    state: Mutex<ParentState>,
    wake: std::sync::Condvar,
}

#[derive(Default)]
struct ParentState {
    key: Option<[u8; 32]>,
    kicked: bool,
    /// The key changed and the loop has not reconnected yet.
    changed: bool,
}

impl ParentLink {
    /// The parent link was lost: re-authenticate now.
    pub fn kick(&self) {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        s.kicked = true;
        self.wake.notify_one();
    }

    /// The parent's CURVE key from the latest exchange, if any.
    pub fn key(&self) -> Option<[u8; 32]> {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .key
    }

    /// Ask the loop to reconnect to the parent (with the key it has): a
    /// renewal succeeded after the binding had expired, so the parent
    /// refused the old connection and libzmq will not retry it by itself.
    fn reconnect(&self) {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        s.changed = true;
    }

    fn set_key(&self, k: [u8; 32]) -> bool {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let changed = s.key.is_some_and(|old| old != k);
        s.key = Some(k);
        s.changed |= changed;
        changed
    }

    /// Sleep until `deadline` or a kick; true if kicked.
    fn wait(&self, deadline: Instant) -> bool {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        while !s.kicked {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            s = self
                .wake
                .wait_timeout(s, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        s.kicked = false;
        true
    }
}

/// The gssapi gate, if this instance has one.
fn gate(policy: &crate::authz::BrokerPolicy) -> Option<&GssGate> {
    policy.gss.get()?.as_any().downcast_ref::<GssGate>()
}

impl crate::authz::Gate for GssGate {
    fn decide(&self, req: &AuthRequest<'_>, clients: &dyn ClientAuthz) -> Decision {
        GssGate::decide(self, req, clients)
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// Loop hook: the parent link was lost (no-op unless gssapi).
pub fn parent_lost(policy: &crate::authz::BrokerPolicy) {
    if let Some(g) = gate(policy) {
        g.parent.kick();
    }
}

/// Loop hook (timer): true once after the parent's key changed, so the
/// loop reconnects with the new key.
pub fn parent_key_changed(policy: &crate::authz::BrokerPolicy) -> bool {
    let Some(g) = gate(policy) else {
        return false;
    };
    let mut s = g
        .parent
        .state
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    std::mem::take(&mut s.changed)
}

/// Loop hook: the parent's current CURVE key under gssapi, if it changed
/// hands since the bootstrap (a restarted parent has a new key).
pub fn parent_key(policy: &crate::authz::BrokerPolicy) -> Option<[u8; 32]> {
    gate(policy)?.parent.key()
}

impl GssGate {
    pub fn new(bindings: Arc<Bindings>, peers: impl IntoIterator<Item = String>) -> GssGate {
        GssGate {
            bindings,
            peers: peers.into_iter().collect(),
            warned: Mutex::new(HashSet::new()),
            parent: Arc::new(ParentLink::default()),
            remote: Mutex::new(RemoteLinks::default()),
        }
    }

    /// Remember that the remote connection `rid` uses `key`, to cut it when
    /// the key's binding ends.
    pub fn remote_seen(&self, key: &str, rid: &[u8]) {
        let mut r = self.remote.lock().unwrap_or_else(PoisonError::into_inner);
        if r.by_key.get(key).is_some_and(|(old, _)| old == rid) {
            return;
        }
        let Some(b) = self.bindings.get(key, Instant::now()) else {
            return;
        };
        if r.by_key.len() >= MAX_TRACKED_REMOTE && !r.by_key.contains_key(key) {
            return;
        }
        r.by_key.insert(key.to_string(), (rid.to_vec(), b.expires));
        r.next = Some(r.next.map_or(b.expires, |n| n.min(b.expires)));
    }

    /// The remote connections whose binding has ended by `now` (each
    /// returned once), with their principal's reason. Costs one comparison
    /// unless the earliest expiry has passed.
    pub fn expired_remote(&self, now: Instant) -> Vec<(Vec<u8>, String)> {
        let mut r = self.remote.lock().unwrap_or_else(PoisonError::into_inner);
        if r.next.is_none_or(|n| n > now) {
            return Vec::new();
        }
        let mut out = Vec::new();
        let mut next: Option<Instant> = None;
        let bindings = &self.bindings;
        r.by_key.retain(|key, (rid, expires)| {
            match bindings.get(key, now) {
                // Renewed (or still live): track its new expiry.
                Some(b) => {
                    *expires = b.expires;
                    next = Some(next.map_or(b.expires, |n| n.min(b.expires)));
                    true
                }
                None => {
                    out.push((
                        std::mem::take(rid),
                        "its kerberos binding expired; authenticate again (kinit) and reconnect"
                            .to_string(),
                    ));
                    false
                }
            }
        });
        r.next = next;
        out
    }

    /// How long until the earliest tracked remote binding ends.
    pub fn next_remote_expiry(&self, now: Instant) -> Option<Duration> {
        let r = self.remote.lock().unwrap_or_else(PoisonError::into_inner);
        r.next.map(|n| n.saturating_duration_since(now))
    }

    /// The ZAP decision for a connecting CURVE key.
    pub fn decide(&self, req: &AuthRequest<'_>, clients: &dyn ClientAuthz) -> Decision {
        if req.mechanism != Mechanism::Curve {
            return Decision::Deny {
                reason: format!(
                    "mechanism {} is not accepted: a gssapi instance carries traffic over kerberos-bound CURVE keys only",
                    req.mechanism
                ),
            };
        }
        let Some(b) = self.bindings.get(req.principal, Instant::now()) else {
            return Decision::Deny {
                reason: "the key is not bound to a kerberos principal, or its binding expired; run the key exchange first".into(),
            };
        };
        match req.domain {
            OVERLAY_DOMAIN => {
                if b.purpose != Purpose::Overlay {
                    return Decision::Deny {
                        reason: format!(
                            "{} bound this key as a client, not as an overlay peer",
                            b.principal
                        ),
                    };
                }
                if !self.peers.contains(&b.principal) {
                    return Decision::Deny {
                        reason: format!(
                            "{} is not an expected peer principal of this instance",
                            b.principal
                        ),
                    };
                }
                if let Some(why) = clients.vetoes(&b.principal, Mech::Gssapi, req.address) {
                    return Decision::Deny { reason: why };
                }
                Decision::Allow {
                    user_id: b.principal,
                    roles: Roles::PEER,
                    reason: "kerberos-bound key of a peer".into(),
                }
            }
            CLIENT_DOMAIN => {
                if b.purpose != Purpose::Client {
                    return Decision::Deny {
                        reason: format!(
                            "{} bound this key for the overlay, not as a client",
                            b.principal
                        ),
                    };
                }
                match clients.decide(&b.principal, Mech::Gssapi, req.address) {
                    Ok(grant) if !grant.is_empty() => Decision::allow(
                        b.principal,
                        grant,
                        "kerberos-bound key; client policy".into(),
                    ),
                    Ok(_) => Decision::Deny {
                        reason: "the policy grants no role".into(),
                    },
                    Err(reason) => Decision::Deny { reason },
                }
            }
            other => Decision::Deny {
                reason: format!("unknown zap domain '{other}'"),
            },
        }
    }

    /// Whether a message from a connection with this link key may pass:
    /// its binding must still be live. Logs the first refusal per key.
    pub fn link_live(&self, key: &str, from: &str) -> bool {
        if self.bindings.live(key, Instant::now()) {
            return true;
        }
        let mut w = self.warned.lock().unwrap_or_else(PoisonError::into_inner);
        if w.len() < 10_000 && w.insert(key.to_string()) {
            warn!(
                "gss: verdict=deny principal={from} key={key} reason=\"the key's kerberos binding expired (or never existed); its messages are dropped until it re-authenticates\""
            );
        }
        false
    }

    /// Forget expired bindings (called from a timer).
    pub fn sweep(&self) {
        let n = self.bindings.sweep(Instant::now());
        if n > 0 {
            let mut w = self.warned.lock().unwrap_or_else(PoisonError::into_inner);
            w.clear();
        }
    }
}

/// The per-message check of a gssapi instance (a no-op otherwise): the
/// message's link key must still have a live binding.
pub fn message_allowed(
    policy: &crate::authz::BrokerPolicy,
    first: Option<&mut zmq::Message>,
    user_id: &str,
) -> bool {
    let Some(g) = gate(policy) else {
        return true;
    };
    let key = first.and_then(|m| m.gets(LINK_KEY_PROPERTY)).unwrap_or("");
    g.link_live(key, user_id)
}

/// The per-message check of a remote client connection under gssapi (a
/// no-op otherwise): as [`message_allowed`], and the connection is
/// remembered so that it is cut when its binding ends.
pub fn client_message_allowed(
    policy: &crate::authz::BrokerPolicy,
    first: &mut zmq::Message,
    user_id: &str,
    rid: &[u8],
) -> bool {
    let Some(g) = gate(policy) else {
        return true;
    };
    let key = first.gets(LINK_KEY_PROPERTY).unwrap_or("");
    if !g.link_live(key, user_id) {
        return false;
    }
    g.remote_seen(key, rid);
    true
}

/// Loop hook: remote client connections whose binding ended (routing id,
/// reason), to be revoked now; and how long until the next one may end.
pub fn expired_remote(
    policy: &crate::authz::BrokerPolicy,
) -> (Vec<(Vec<u8>, String)>, Option<Duration>) {
    let Some(g) = gate(policy) else {
        return (Vec::new(), None);
    };
    let now = Instant::now();
    (g.expired_remote(now), g.next_remote_expiry(now))
}

/// A user instance's client policy under gssapi: the owner, as a local
/// user or as the instance's Kerberos principal, is always the owner; every
/// other principal is decided by `inner` (a policy file), or refused.
pub struct KrbOwner {
    pub unix: String,
    pub principal: String,
    pub inner: Option<Arc<dyn ClientAuthz>>,
}

impl KrbOwner {
    fn is_owner(&self, principal: &str, mech: Mech) -> bool {
        match mech {
            Mech::Gssapi => principal == self.principal,
            _ => principal == self.unix,
        }
    }
}

impl ClientAuthz for KrbOwner {
    fn decide(&self, principal: &str, mech: Mech, address: &str) -> ClientVerdict {
        if self.is_owner(principal, mech) {
            return Ok(canopy_proto::Grant::plain(Roles::OWNER));
        }
        match &self.inner {
            Some(i) => i.decide(principal, mech, address),
            None => Err(format!(
                "{principal} is not the owner of this instance ({}); only the owner may connect",
                self.principal
            )),
        }
    }
    fn generation(&self) -> u64 {
        self.inner.as_ref().map_or(0, |i| i.generation())
    }
    fn reload(&self) -> Result<String, String> {
        match &self.inner {
            Some(i) => i.reload(),
            None => Err("this instance has no policy file; start it with --policy FILE or --allow PRINCIPAL=ROLE".into()),
        }
    }
    fn explain(
        &self,
        principal: &str,
        mech: Mech,
        address: &str,
    ) -> Option<crate::authz::Explained> {
        self.inner.as_ref()?.explain(principal, mech, address)
    }
    fn role_refused(&self, principal: &str, roles: Roles, what: &str) {
        if let Some(i) = &self.inner {
            i.role_refused(principal, roles, what)
        }
    }
    fn vetoes(&self, principal: &str, mech: Mech, address: &str) -> Option<String> {
        self.inner.as_ref()?.vetoes(principal, mech, address)
    }
}

fn gss_err(e: canopy_gss::GssError) -> BrokerError {
    BrokerError::Gss(e)
}

/// Our canonical principal: acquires initiator credentials, so a missing
/// or expired credential fails here, at once.
pub fn own_principal(opts: &GssOpts) -> Result<String, BrokerError> {
    check_keytabs()?;
    let principal = opts.principal.clone();
    let who = principal
        .clone()
        .unwrap_or_else(|| "the default principal".into());
    canopy_gss::krb::with_kdc_deadline(canopy_gss::krb::kdc_timeout(), who, move || {
        canopy_gss::krb::initiator_cred(principal.as_deref()).map(|(_, p)| p)
    })
    .map_err(gss_err)
}

/// Start the key-exchange acceptor on `listen` (`HOST:PORT`, port 0 for
/// any) as `principal`, vouching for `server_key`. A principal is admitted
/// to bind a key only if it would be admitted on that key: an overlay key
/// only for an expected peer no deny rule names, a client key only for a
/// principal the client policy grants a role (so a principal the policy
/// refuses gets no binding at all).
pub fn start_server(
    listen: &str,
    principal: &str,
    keys: &canopy_security::CurveKeypair,
    bindings: Arc<Bindings>,
    peers: HashSet<String>,
    clients: Arc<dyn ClientAuthz>,
    max_lifetime: Option<Duration>,
) -> Result<KexServer, BrokerError> {
    let listener = TcpListener::bind(listen).map_err(|e| BrokerError::Bind {
        endpoint: listen.to_string(),
        reason: format!("key exchange listener: {e}"),
    })?;
    let admit = move |purpose: Purpose, who: &str, address: &str| match purpose {
        Purpose::Overlay if peers.contains(who) => match clients.vetoes(who, Mech::Gssapi, address)
        {
            Some(why) => Err(why),
            None => Ok(()),
        },
        Purpose::Overlay => Err(format!(
            "{who} is not an expected peer principal of this instance"
        )),
        Purpose::Client => match clients.decide(who, Mech::Gssapi, address) {
            Ok(grant) if !grant.is_empty() => Ok(()),
            Ok(_) => Err(format!("the policy grants {who} no role; no key is bound")),
            Err(why) => Err(why),
        },
    };
    let s = KexServer::start(
        listener,
        ServerConfig {
            principal: principal.to_string(),
            server_key: *keys.public(),
            server_secret: zeroize::Zeroizing::new(*keys.secret()),
            bindings,
            admit: Arc::new(admit),
            max_lifetime,
            limits: canopy_gss::Limits::default(),
        },
    )
    .map_err(gss_err)?;
    info!(
        "gss: key exchange for {principal} listening on {}",
        s.addr()
    );
    Ok(s)
}

/// The child's first handshake with its parent's acceptor. Fails fast: no
/// retry loop, the error says what is missing.
pub fn join_parent(
    addr: &str,
    cfg: &ClientConfig,
    link: &canopy_security::CurveKeypair,
) -> Result<canopy_gss::Bound, BrokerError> {
    // Many children joining at once may find the parent's exchange busy.
    let b = canopy_gss::client::handshake_retrying_busy(addr, cfg, link, 20).map_err(gss_err)?;
    info!(
        "gss: authenticated to {} at {addr} as {}; link key bound for {}s (took {:.1} ms)",
        b.acceptor,
        b.principal,
        b.lifetime.as_secs(),
        b.took.as_secs_f64() * 1e3
    );
    Ok(b)
}

/// A user instance's gssapi setup for one broker: install the ZAP gate
/// (peers: the user's own principal) and, if this broker has children or
/// serves clients, start the key exchange. Rank 0 writes the exchange's
/// address and principal to `RUNDIR/kex-0` for `canopy start` to print.
#[allow(clippy::too_many_arguments)]
pub fn setup_user_instance(
    rank: u32,
    topo: &canopy_overlay::Topology,
    me: &str,
    g: &GssOpts,
    bound: &crate::sockets::Bound,
    keys: &canopy_security::CurveKeypair,
    rundir: &std::path::Path,
    transport: &crate::sockets::Transport,
    clients: bool,
) -> Result<Option<KexServer>, BrokerError> {
    let bindings = Arc::new(g.bindings());
    let peers: HashSet<String> = [me.to_string()].into_iter().collect();
    if bound
        .policy
        .gss
        .set(Arc::new(GssGate::new(bindings.clone(), peers.clone())))
        .is_err()
    {
        return Err(BrokerError::GateInstalledTwice);
    }
    let has_children = topo.children(rank).next().is_some();
    let serves_clients = rank == 0 && clients;
    if !has_children && !serves_clients {
        return Ok(None);
    }
    let host = match transport {
        crate::sockets::Transport::Tcp { host, .. } => host.clone(),
        crate::sockets::Transport::Auto { addr } if addr.is_ipv6() => format!("[{addr}]"),
        crate::sockets::Transport::Auto { addr } => addr.to_string(),
        _ => "127.0.0.1".to_string(),
    };
    let listen = match (&g.kex_listen, rank) {
        (Some(l), 0) => l.clone(),
        _ => format!("{host}:0"),
    };
    let s = start_server(
        &listen,
        me,
        keys,
        bindings,
        peers,
        bound.policy.clients.clone(),
        g.max_lifetime,
    )?;
    if rank == 0 {
        let path = rundir.join("kex-0");
        std::fs::write(&path, format!("{} {me}\n", s.addr())).map_err(|source| {
            BrokerError::Io {
                what: "write the key exchange address",
                path,
                source,
            }
        })?;
    }
    Ok(Some(s))
}

/// A child's first exchange with its parent (fails fast), then its renewal
/// thread.
pub fn join_and_renew(
    policy: &crate::authz::BrokerPolicy,
    addr: &str,
    me: &str,
    g: &GssOpts,
    parent_key: [u8; 32],
    link: &canopy_security::CurveKeypair,
) -> Result<(), BrokerError> {
    if addr == "-" {
        return Err(BrokerError::ParentHasNoKex);
    }
    let cfg = ClientConfig {
        principal: g.principal.clone().or_else(|| Some(me.to_string())),
        target: me.to_string(),
        purpose: Purpose::Overlay,
        expect_server_key: Some(parent_key),
        timeout: KEX_TIMEOUT,
        kdc_timeout: canopy_gss::krb::kdc_timeout(),
    };
    let b = join_parent(addr, &cfg, link)?;
    let parent = parent_link(policy)?;
    parent.set_key(b.server_key);
    spawn_renewal(addr.to_string(), cfg, copy_keys(link), b.lifetime, parent);
    Ok(())
}

/// A system instance's gssapi setup (`[bootstrap] mechanism = "gssapi"`):
/// each broker is `service/host@REALM` from its keytab, admits exactly its
/// children's principals as peers, and learns its parent's CURVE key from
/// the parent's key exchange (vouched for by the parent's principal).
pub struct SystemGss {
    pub me: String,
    /// Expected principal of each child rank.
    pub children: std::collections::HashMap<u32, String>,
    /// Parent rank, its expected principal and key-exchange address.
    pub parent: Option<(u32, String, String)>,
    listen: Option<String>,
    opts: GssOpts,
}

/// `tcp://HOST:PORT` as (HOST, PORT), brackets off, `*` as `0.0.0.0`.
pub(crate) fn endpoint_host_port(ep: &str) -> Option<(String, u16)> {
    let hp = ep.strip_prefix("tcp://")?;
    let (h, p) = hp.rsplit_once(':')?;
    let h = h.trim_start_matches('[').trim_end_matches(']');
    let h = if h == "*" { "0.0.0.0" } else { h };
    Some((h.to_string(), p.parse().ok()?))
}

/// Refuse the keytabs named by `KRB5_KTNAME` and `KRB5_CLIENT_KTNAME`
/// unless they are trusted secrets for this user (owned by root or us,
/// neither readable nor writable by group or other, on a path nobody else
/// can change), as a CURVE secret certificate is.
pub fn check_keytabs() -> Result<(), BrokerError> {
    for var in ["KRB5_KTNAME", "KRB5_CLIENT_KTNAME"] {
        if let Some(v) = std::env::var_os(var) {
            check_keytab(&v.to_string_lossy())?;
        }
    }
    Ok(())
}

/// [`canopy_gss::krb::check_keytab`], for a keytab that exists: a missing
/// one is left to Kerberos, whose error names the principal and the
/// variable to check.
fn check_keytab(ktname: &str) -> Result<(), BrokerError> {
    let missing = canopy_gss::krb::keytab_file(ktname).is_some_and(|p| {
        std::fs::symlink_metadata(&p).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound)
    });
    if missing {
        return Ok(());
    }
    canopy_gss::krb::check_keytab(ktname).map_err(gss_err)
}

/// Where the key exchange listens, from the overlay's bind endpoint's
/// `HOST:PORT` ([`endpoint_host_port`] has made `*` `0.0.0.0`): an interface name (`eth0`, as
/// `tcp://eth0:%p` binds the overlay) is that interface's address, which
/// the socket API cannot look up by itself.
fn kex_listen_addr(hostport: &str, rank: u32) -> Result<String, BrokerError> {
    let Some((host, port)) = hostport.rsplit_once(':') else {
        return Ok(hostport.to_string());
    };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if bare.parse::<std::net::IpAddr>().is_ok() {
        return Ok(hostport.to_string());
    }
    let is_interface = nix::net::if_::if_nametoindex(bare).is_ok();
    if !is_interface {
        return Ok(hostport.to_string()); // a host name
    }
    let ip = crate::iface::resolve(&crate::iface::Hint::Name(bare.to_string()), rank)?;
    Ok(match ip {
        std::net::IpAddr::V4(a) => format!("{a}:{port}"),
        std::net::IpAddr::V6(a) => format!("[{a}]:{port}"),
    })
}

impl SystemGss {
    /// Work out the principals and addresses, and check our credentials.
    /// Call while the process is still single-threaded: a configured
    /// keytab is handed to the Kerberos library through `KRB5_KTNAME` and
    /// `KRB5_CLIENT_KTNAME`.
    pub fn prepare(
        config: &canopy_config::Config,
        rank: u32,
        topo: &canopy_overlay::Topology,
    ) -> Result<SystemGss, BrokerError> {
        let g = config.gssapi().ok_or(BrokerError::NoGssapiTable)?;
        if let Some(kt) = &g.keytab {
            let v = format!("FILE:{}", kt.display());
            // Refused before the Kerberos library sees it.
            check_keytab(&v)?;
            std::env::set_var("KRB5_KTNAME", &v);
            std::env::set_var("KRB5_CLIENT_KTNAME", &v);
            // A credential cache of this broker's own: the service user's
            // default one is shared by every broker (and tool) of that user
            // on the host, and holds one principal at a time.
            std::env::set_var("KRB5CCNAME", format!("MEMORY:canopy-broker-{rank}"));
        }
        check_keytabs()?;
        let principal_of = |r: u32| -> Result<String, BrokerError> {
            let host = config.host(r).ok_or(BrokerError::RankLacks {
                rank: r,
                what: "host",
            })?;
            canopy_gss::krb::qualify(&g.principal(host)).map_err(gss_err)
        };
        let kex_addr = |r: u32, ep: Option<String>| -> Result<String, BrokerError> {
            let ep = ep.ok_or(BrokerError::RankLacks {
                rank: r,
                what: "endpoint",
            })?;
            let (h, p) = endpoint_host_port(&ep).ok_or_else(|| BrokerError::KexNeedsTcp {
                rank: r,
                endpoint: ep.clone(),
            })?;
            let port = match g.kex_port {
                Some(k) => k,
                None => p
                    .checked_add(1)
                    .ok_or(BrokerError::KexPortRange { rank: r, port: p })?,
            };
            Ok(format!("{h}:{port}"))
        };
        let me = principal_of(rank)?;
        let mut children = std::collections::HashMap::new();
        for c in topo.children(rank) {
            children.insert(c, principal_of(c)?);
        }
        let parent = match topo.parent(rank) {
            Some(p) => Some((
                p,
                principal_of(p)?,
                kex_addr(p, config.connect_endpoint(p))?,
            )),
            None => None,
        };
        // The key exchange serves children, and remote Kerberos clients of
        // a broker that [clients] makes listen for them.
        let listen = if children.is_empty() && config.client_endpoint(rank).is_none() {
            None
        } else {
            Some(kex_listen_addr(
                &kex_addr(rank, config.bind_endpoint(rank))?,
                rank,
            )?)
        };
        let opts = GssOpts {
            principal: Some(me.clone()),
            max_bindings_per_principal: g.max_bindings_per_principal,
            ..GssOpts::default()
        };
        if parent.is_some() {
            own_principal(&opts)?;
        }
        Ok(SystemGss {
            me,
            children,
            parent,
            listen,
            opts,
        })
    }

    /// Install the ZAP gate and, with children, start the key exchange.
    pub fn start(
        &self,
        bound: &crate::sockets::Bound,
        keys: &canopy_security::CurveKeypair,
    ) -> Result<Option<KexServer>, BrokerError> {
        let bindings = Arc::new(self.opts.bindings());
        let peers: HashSet<String> = self.children.values().cloned().collect();
        if bound
            .policy
            .gss
            .set(Arc::new(GssGate::new(bindings.clone(), peers.clone())))
            .is_err()
        {
            return Err(BrokerError::GateInstalledTwice);
        }
        match &self.listen {
            Some(l) => Ok(Some(start_server(
                l,
                &self.me,
                keys,
                bindings,
                peers,
                bound.policy.clients.clone(),
                None,
            )?)),
            None => Ok(None),
        }
    }

    /// Authenticate to the parent (mutually: it must be the principal the
    /// config names) and bind our key; returns the parent's CURVE key.
    /// Waits, with backoff, while the parent is not up yet; any other
    /// failure (credentials, refusal) is returned at once.
    pub fn join_parent(
        &self,
        policy: &crate::authz::BrokerPolicy,
        link: &canopy_security::CurveKeypair,
    ) -> Result<Option<[u8; 32]>, BrokerError> {
        let Some((p, who, addr)) = &self.parent else {
            return Ok(None);
        };
        let cfg = ClientConfig {
            principal: self.opts.principal.clone(),
            target: who.clone(),
            purpose: Purpose::Overlay,
            expect_server_key: None,
            timeout: KEX_TIMEOUT,
            kdc_timeout: canopy_gss::krb::kdc_timeout(),
        };
        let mut backoff = Duration::from_millis(100);
        loop {
            match canopy_gss::client::handshake_retrying_busy(addr, &cfg, link, 20) {
                Ok(b) => {
                    info!(
                        "gss: authenticated to rank {p} ({}) at {addr}; link key bound for {}s (took {:.1} ms)",
                        b.acceptor,
                        b.lifetime.as_secs(),
                        b.took.as_secs_f64() * 1e3
                    );
                    // A restarted parent has a new key: renewals accept
                    // any key its principal vouches for.
                    let parent = parent_link(policy)?;
                    parent.set_key(b.server_key);
                    spawn_renewal(addr.clone(), cfg, copy_keys(link), b.lifetime, parent);
                    return Ok(Some(b.server_key));
                }
                Err(canopy_gss::GssError::Io { .. }) => {
                    info!(
                        "gss: rank {p}'s key exchange at {addr} is not up yet; retrying in {:.1}s",
                        backoff.as_secs_f64()
                    );
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(gss_err(e)),
            }
        }
    }
}

/// When to renew a binding of `lifetime`: at 2/3 of it, at least 1 s on.
pub fn renew_after(lifetime: Duration) -> Duration {
    (lifetime * 2 / 3).max(Duration::from_secs(1))
}

/// Re-authenticate before each binding expires, re-binding the same link
/// key so the link stays up. Failures (KDC down) are retried with backoff;
/// existing links keep working until the binding's end.
/// A copy of a keypair for the renewal thread (zeroized when it ends).
fn copy_keys(k: &canopy_security::CurveKeypair) -> canopy_security::CurveKeypair {
    canopy_security::CurveKeypair::from_secret(zeroize::Zeroizing::new(*k.secret()))
}

fn parent_link(policy: &crate::authz::BrokerPolicy) -> Result<Arc<ParentLink>, BrokerError> {
    gate(policy)
        .map(|g| g.parent.clone())
        .ok_or(BrokerError::NoGate)
}

pub fn spawn_renewal(
    addr: String,
    cfg: ClientConfig,
    keys: canopy_security::CurveKeypair,
    first: Duration,
    link: Arc<ParentLink>,
) {
    let spawned = std::thread::Builder::new()
        .name("canopy-gss-renew".into())
        .spawn(move || {
            let mut expires = Instant::now() + first;
            let mut next = Instant::now() + renew_after(first);
            let mut backoff = Duration::from_millis(500);
            loop {
                let kicked = link.wait(next);
                if kicked {
                    info!("gss: the parent link was lost; re-authenticating to {addr}");
                }
                match canopy_gss::handshake(&addr, &cfg, &keys) {
                    Ok(b) => {
                        info!(
                            "gss: renewed the link key binding with {} for {}s",
                            b.acceptor,
                            b.lifetime.as_secs()
                        );
                        if link.set_key(b.server_key) {
                            warn!("gss: {} has a new CURVE key (it restarted); rejoining with it", b.acceptor);
                        } else if Instant::now() >= expires {
                            // The parent dropped this link while the
                            // binding was expired (and ZAP refused any
                            // reconnection): rejoin now, not at the next
                            // liveness timeout.
                            warn!("gss: the link key binding with {} had expired and is renewed; rejoining the parent", b.acceptor);
                            link.reconnect();
                        }
                        expires = Instant::now() + b.lifetime;
                        next = Instant::now() + renew_after(b.lifetime);
                        backoff = Duration::from_millis(500);
                    }
                    Err(e) => {
                        let left = expires.saturating_duration_since(Instant::now());
                        warn!(
                            "gss: cannot renew the link key binding with {addr} ({e}); {}s left before the parent drops this link; retrying in {:.1}s",
                            left.as_secs(),
                            backoff.as_secs_f64()
                        );
                        next = Instant::now() + backoff;
                        // Once the binding has expired the link is down:
                        // retry often, so it comes back within seconds of
                        // the KDC (or the parent) returning.
                        let cap = if left.is_zero() {
                            Duration::from_secs(2)
                        } else {
                            Duration::from_secs(10)
                        };
                        backoff = (backoff * 2).min(cap);
                    }
                }
            }
        });
    if let Err(e) = spawned {
        warn!("gss: cannot start the renewal thread: {e}; the link ends when its binding expires");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req<'a>(domain: &'a str, key: &'a str) -> AuthRequest<'a> {
        AuthRequest {
            mechanism: Mechanism::Curve,
            principal: key,
            address: "127.0.0.1",
            domain,
        }
    }

    #[test]
    fn only_live_bound_keys_get_in_as_their_principal() {
        let b = Arc::new(Bindings::new());
        let g = GssGate::new(b.clone(), ["canopy/n1@R".to_string()]);
        let acl = KrbOwner {
            unix: "unix:alice".into(),
            principal: "alice@R".into(),
            inner: None,
        };
        let now = Instant::now();
        let hour = Duration::from_secs(3600);
        b.bind(
            "curve:peer",
            "canopy/n1@R",
            Purpose::Overlay,
            now + hour,
            now,
        )
        .unwrap();
        b.bind("curve:alice", "alice@R", Purpose::Client, now + hour, now)
            .unwrap();
        b.bind("curve:bob", "bob@R", Purpose::Client, now + hour, now)
            .unwrap();
        b.bind(
            "curve:stranger",
            "canopy/n9@R",
            Purpose::Overlay,
            now + hour,
            now,
        )
        .unwrap();
        b.bind("curve:old", "canopy/n1@R", Purpose::Overlay, now, now)
            .unwrap();
        assert!(matches!(
            g.decide(&req(OVERLAY_DOMAIN, "curve:peer"), &acl),
            Decision::Allow { user_id, roles, .. } if user_id == "canopy/n1@R" && roles == Roles::PEER
        ));
        assert!(matches!(
            g.decide(&req(CLIENT_DOMAIN, "curve:alice"), &acl),
            Decision::Allow { user_id, roles, .. } if user_id == "alice@R" && roles == Roles::OWNER
        ));
        for (d, k, why) in [
            (CLIENT_DOMAIN, "curve:bob", "not the owner"),
            (OVERLAY_DOMAIN, "curve:stranger", "not an expected peer"),
            (OVERLAY_DOMAIN, "curve:unbound", "not bound"),
            (OVERLAY_DOMAIN, "curve:old", "not bound"),
            (OVERLAY_DOMAIN, "curve:alice", "as a client"),
            (CLIENT_DOMAIN, "curve:peer", "for the overlay"),
        ] {
            match g.decide(&req(d, k), &acl) {
                Decision::Deny { reason } => assert!(reason.contains(why), "{k}: {reason}"),
                a => panic!("{k} admitted: {a:?}"),
            }
        }
        let mut null = req(OVERLAY_DOMAIN, "");
        null.mechanism = Mechanism::Null;
        assert!(matches!(g.decide(&null, &acl), Decision::Deny { .. }));
        assert!(g.link_live("curve:peer", "x"));
        assert!(!g.link_live("curve:old", "x"));
    }

    #[test]
    fn a_remote_connection_is_reported_once_when_its_binding_ends() {
        let b = Arc::new(Bindings::new());
        let g = GssGate::new(b.clone(), []);
        let now = Instant::now();
        let s = Duration::from_secs(1);
        b.bind("curve:a", "alice@R", Purpose::Client, now + 2 * s, now)
            .unwrap();
        b.bind("curve:b", "bob@R", Purpose::Client, now + 60 * s, now)
            .unwrap();
        g.remote_seen("curve:a", b"rid-a");
        g.remote_seen("curve:b", b"rid-b");
        g.remote_seen("curve:unbound", b"rid-x");
        assert!(g.expired_remote(now + s).is_empty());
        let d = g.next_remote_expiry(now).unwrap();
        assert!(d <= 2 * s && d > s, "{d:?}");
        let gone = g.expired_remote(now + 3 * s);
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].0, b"rid-a");
        assert!(gone[0].1.contains("binding expired"), "{}", gone[0].1);
        assert!(g.expired_remote(now + 4 * s).is_empty(), "reported once");
        assert_eq!(g.expired_remote(now + 61 * s)[0].0, b"rid-b");
        assert_eq!(g.next_remote_expiry(now), None);
    }

    #[test]
    fn renewal_comes_before_expiry() {
        assert_eq!(
            renew_after(Duration::from_secs(30)),
            Duration::from_secs(20)
        );
        assert_eq!(
            renew_after(Duration::from_millis(600)),
            Duration::from_secs(1)
        );
    }
}
