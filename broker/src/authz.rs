//! Who may connect, and with which roles.
//!
//! The broker's ZAP handler serves two ZAP domains with one policy:
//!
//! * `canopy`: the overlay ROUTER. Only the keys of this broker's own
//!   children are admitted, each as `peer`.
//! * `canopy-client`: the remote client endpoint. A [`ClientAuthz`]
//!   decides, the same one that decides for local (UNIX-socket) clients.
//!
//! Anything else is denied: the default is no entry.

use canopy_proto::{Grant, Roles};
use canopy_zap::{AuthRequest, Decision, KeySetPolicy, Mechanism, Policy};
use std::sync::Arc;

/// ZAP domain of the overlay ROUTER.
pub const OVERLAY_DOMAIN: &str = "canopy";
/// ZAP domain of the remote client endpoint.
pub const CLIENT_DOMAIN: &str = "canopy-client";

/// How a client authenticated: the one mechanism type, shared with the
/// policy (`canopy_acl::Mech`).
pub use canopy_acl::Mech;

/// A client's verdict: what it is granted (roles, roles scoped to topics,
/// namespaces it may register), or why not.
pub type ClientVerdict = Result<Grant, String>;

/// Decides for clients (not overlay peers).
pub trait ClientAuthz: Send + Sync {
    fn decide(&self, principal: &str, mech: Mech, address: &str) -> ClientVerdict;
    /// Changes whenever the policy is reloaded, so that connections admitted
    /// under an older policy are checked again on their next message.
    fn generation(&self) -> u64 {
        0
    }
    /// Re-read the policy file. Err leaves the old policy in force.
    fn reload(&self) -> Result<String, String> {
        Err("this instance has no policy file; start it with --policy FILE or --allow PRINCIPAL=ROLE".into())
    }
    /// The decision for a principal, with the deciding rule, if this
    /// authorizer has rules to explain.
    fn explain(&self, _principal: &str, _mech: Mech, _address: &str) -> Option<Explained> {
        None
    }
    /// Record that a caller lacked the role for `what`.
    fn role_refused(&self, _principal: &str, _roles: Roles, _what: &str) {}
    /// Record an exec request's digest, a rank's refusal, or a receipt's
    /// digest.
    fn exec_audit(&self, _principal: &str, _what: &str) {}
    /// An explicit deny rule for this principal, if the policy has one.
    /// Overlay peers are admitted by their bootstrap-issued keys, but a
    /// principal on a deny list is kept out even as a peer.
    fn vetoes(&self, _principal: &str, _mech: Mech, _address: &str) -> Option<String> {
        None
    }
}

/// A personal instance's default: the owner, nobody else.
pub struct OwnerOnly {
    pub owner: String,
}

impl ClientAuthz for OwnerOnly {
    fn decide(&self, principal: &str, _mech: Mech, _address: &str) -> ClientVerdict {
        if principal == self.owner {
            Ok(Grant::plain(Roles::OWNER))
        } else {
            Err(format!(
                "{principal} is not the owner of this instance ({}); only the owner may connect",
                self.owner
            ))
        }
    }
}

/// A gate that decides in place of the key sets: in a gssapi instance,
/// only CURVE keys bound to Kerberos principals are admitted
/// (`crate::gss::GssGate`). A trait here, so that this module does not
/// depend on the Kerberos one.
pub trait Gate: Send + Sync {
    fn decide(&self, req: &AuthRequest<'_>, clients: &dyn ClientAuthz) -> Decision;
    /// For the gate's owner to reach its own state.
    fn as_any(&self) -> &dyn std::any::Any;
}

/// The broker's ZAP policy over both domains.
pub struct BrokerPolicy {
    pub peers: KeySetPolicy,
    pub clients: Arc<dyn ClientAuthz>,
    /// Set in a gssapi instance: then it alone decides (see `crate::gss`).
    pub gss: std::sync::OnceLock<Arc<dyn Gate>>,
    /// Overlay handshakes refused for an unknown key: (peer address,
    /// reason), for the loop to show the child as `refused`. Bounded.
    refused_peers: std::sync::Mutex<std::collections::VecDeque<(String, String)>>,
    /// Set when `refused_peers` has entries: the loop checks this flag on
    /// every turn and takes the lock only when it is set.
    any_refused: std::sync::atomic::AtomicBool,
}

/// Refused overlay handshakes kept for the loop between two turns.
const MAX_REFUSED_PEERS: usize = 16;

impl BrokerPolicy {
    pub fn new(clients: Arc<dyn ClientAuthz>) -> BrokerPolicy {
        BrokerPolicy {
            peers: KeySetPolicy::new(),
            clients,
            gss: std::sync::OnceLock::new(),
            refused_peers: std::sync::Mutex::new(std::collections::VecDeque::new()),
            any_refused: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn note_refused_peer(&self, address: &str, reason: &str) {
        let mut q = self
            .refused_peers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if q.len() < MAX_REFUSED_PEERS {
            q.push_back((address.to_string(), reason.to_string()));
        }
        self.any_refused
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// The overlay handshakes refused since the last call.
    pub fn take_refused_peers(&self) -> Vec<(String, String)> {
        if !self
            .any_refused
            .swap(false, std::sync::atomic::Ordering::Acquire)
        {
            return Vec::new();
        }
        let mut q = self
            .refused_peers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        q.drain(..).collect()
    }
}

impl Policy for BrokerPolicy {
    fn decide(&self, req: &AuthRequest<'_>) -> Decision {
        if let Some(g) = self.gss.get() {
            return g.decide(req, &*self.clients);
        }
        match req.domain {
            OVERLAY_DOMAIN => match self.peers.decide(req) {
                Decision::Allow { .. } if req.mechanism != Mechanism::Curve => Decision::Deny {
                    reason: "the overlay accepts CURVE only".into(),
                },
                Decision::Allow {
                    user_id,
                    roles,
                    reason,
                } => match self.clients.vetoes(req.principal, Mech::Curve, req.address) {
                    Some(why) => Decision::Deny { reason: why },
                    None => Decision::Allow {
                        user_id,
                        roles,
                        reason,
                    },
                },
                Decision::Deny { reason } => {
                    self.note_refused_peer(req.address, &reason);
                    Decision::Deny { reason }
                }
                other => other,
            },
            CLIENT_DOMAIN => {
                let mech = match req.mechanism {
                    Mechanism::Curve => Mech::Curve,
                    Mechanism::Gssapi => Mech::Gssapi,
                    other => {
                        return Decision::Deny {
                            reason: format!("mechanism {other} is not accepted"),
                        }
                    }
                };
                match self.clients.decide(req.principal, mech, req.address) {
                    Ok(grant) if !grant.is_empty() => {
                        Decision::allow(req.principal.to_string(), grant, "client policy".into())
                    }
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req<'a>(domain: &'a str, principal: &'a str, mechanism: Mechanism) -> AuthRequest<'a> {
        AuthRequest {
            mechanism,
            principal,
            address: "127.0.0.1",
            domain,
        }
    }

    struct Banned;
    impl ClientAuthz for Banned {
        fn decide(&self, _p: &str, _m: Mech, _a: &str) -> ClientVerdict {
            Err("no clients".into())
        }
        fn vetoes(&self, p: &str, _m: Mech, _a: &str) -> Option<String> {
            (p == "curve:STOLEN").then(|| "denied by rule \"stolen\"".to_string())
        }
    }

    #[test]
    fn a_deny_rule_keeps_out_even_a_bootstrapped_peer() {
        let p = BrokerPolicy::new(Arc::new(Banned));
        p.peers.insert("curve:STOLEN", "rank 1", Roles::PEER);
        p.peers.insert("curve:GOOD", "rank 2", Roles::PEER);
        assert!(matches!(
            p.decide(&req(OVERLAY_DOMAIN, "curve:STOLEN", Mechanism::Curve)),
            Decision::Deny { reason } if reason.contains("stolen")
        ));
        assert!(matches!(
            p.decide(&req(OVERLAY_DOMAIN, "curve:GOOD", Mechanism::Curve)),
            Decision::Allow { .. }
        ));
    }

    #[test]
    fn domains_are_kept_apart() {
        let p = BrokerPolicy::new(Arc::new(OwnerOnly {
            owner: "curve:OWNER".into(),
        }));
        p.peers.insert("curve:CHILD", "rank 1", Roles::PEER);
        assert!(matches!(
            p.decide(&req(OVERLAY_DOMAIN, "curve:CHILD", Mechanism::Curve)),
            Decision::Allow { roles, .. } if roles == Roles::PEER
        ));
        // A child key is not a client, and a client is not a peer.
        assert!(matches!(
            p.decide(&req(CLIENT_DOMAIN, "curve:CHILD", Mechanism::Curve)),
            Decision::Deny { .. }
        ));
        assert!(matches!(
            p.decide(&req(OVERLAY_DOMAIN, "curve:OWNER", Mechanism::Curve)),
            Decision::Deny { .. }
        ));
        assert!(matches!(
            p.decide(&req(CLIENT_DOMAIN, "curve:OWNER", Mechanism::Curve)),
            Decision::Allow { roles, .. } if roles == Roles::OWNER
        ));
        assert!(matches!(
            p.decide(&req("other", "curve:OWNER", Mechanism::Curve)),
            Decision::Deny { .. }
        ));
        assert!(matches!(
            p.decide(&req(CLIENT_DOMAIN, "", Mechanism::Null)),
            Decision::Deny { .. }
        ));
    }
}

/// Clients decided by a site or user policy file (`canopy-acl`), with
/// reload and audit.
pub struct AclAuthz {
    policy: canopy_acl::AclPolicy,
    path: std::path::PathBuf,
}

impl AclAuthz {
    /// Load the policy at `path` (refusing one that others can write), and
    /// open the audit log if one is given; its entries name `origin`
    /// (rank, host).
    pub fn load(
        path: &std::path::Path,
        audit: Option<&std::path::Path>,
        origin: (u32, &str),
    ) -> Result<AclAuthz, crate::error::BrokerError> {
        let acl = canopy_acl::Acl::load(path)?;
        let policy = match audit {
            Some(a) => {
                let mut log = canopy_acl::audit::AuditLog::open(a)?;
                log.set_origin(origin.0, origin.1);
                canopy_acl::AclPolicy::with_audit(acl, log)?
            }
            None => canopy_acl::AclPolicy::new(acl),
        };
        Ok(AclAuthz {
            policy,
            path: path.to_path_buf(),
        })
    }
}

/// An audit log path with `%h` (this host's name) and `%r` (this broker's
/// rank) filled in, so that brokers sharing a config or a file system each
/// write their own log.
pub fn audit_path(template: &std::path::Path, rank: u32, host: &str) -> std::path::PathBuf {
    let t = template.to_string_lossy();
    std::path::PathBuf::from(canopy_config::substitute_host_rank(&t, host, rank))
}

/// Whether `template` names its broker (`%h` or `%r`).
pub fn audit_path_is_template(template: &std::path::Path) -> bool {
    let t = template.to_string_lossy();
    t.contains("%h") || t.contains("%r")
}

/// A decision explained, for `acl.check`.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Explained {
    pub principal: String,
    pub allow: bool,
    pub roles: String,
    pub rule: Option<String>,
    pub reason: String,
    /// Roles held on some topics only: `{"topics": PATTERN, "roles": ...}`.
    #[serde(default)]
    pub scoped: Vec<ScopedRoles>,
    /// Service namespaces it may register.
    #[serde(default)]
    pub register: Vec<String>,
}

/// Roles on the topics matching a pattern, in an [`Explained`].
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct ScopedRoles {
    pub topics: String,
    pub roles: String,
}

impl From<canopy_acl::Verdict> for Explained {
    fn from(v: canopy_acl::Verdict) -> Explained {
        Explained {
            principal: v.principal,
            allow: v.allow,
            roles: v.roles.to_string(),
            rule: v.rule.map(|r| r.to_string()),
            reason: v.reason,
            scoped: v
                .scoped
                .into_iter()
                .map(|(topics, r)| ScopedRoles {
                    topics,
                    roles: r.to_string(),
                })
                .collect(),
            register: v.register,
        }
    }
}

impl Explained {
    /// The roles per namespace, one line each: everywhere, then each
    /// scoped pattern with what it adds there.
    pub fn per_namespace(&self) -> Vec<String> {
        let mut out = vec![format!("  {:<16} {}", "(everywhere)", self.roles)];
        for s in &self.scoped {
            out.push(format!("  {:<16} {}", s.topics, s.roles));
        }
        if !self.register.is_empty() {
            out.push(format!("  may register: {}", self.register.join(", ")));
        }
        out
    }
}

impl ClientAuthz for AclAuthz {
    fn decide(&self, principal: &str, mech: Mech, address: &str) -> ClientVerdict {
        let v = self.policy.check(principal, mech, address);
        if v.allow {
            Ok(v.grant())
        } else {
            Err(match v.rule {
                Some(r) => format!("{} ({r})", v.reason),
                None => v.reason,
            })
        }
    }

    fn generation(&self) -> u64 {
        self.policy.generation()
    }

    fn reload(&self) -> Result<String, String> {
        match canopy_acl::Acl::load(&self.path) {
            Ok(acl) => {
                let n = acl.rules().len();
                self.policy.reload(acl);
                Ok(format!("reloaded {} ({n} rules)", self.path.display()))
            }
            Err(e) => Err(format!("{e}; the previous policy stays in force")),
        }
    }

    fn explain(&self, principal: &str, mech: Mech, address: &str) -> Option<Explained> {
        let acl = self.policy.current();
        let q = canopy_acl::Query {
            principal,
            mechanism: mech,
            address: address.parse().ok(),
            now: std::time::SystemTime::now(),
        };
        Some(acl.decide(&q).into())
    }

    fn vetoes(&self, principal: &str, mech: Mech, address: &str) -> Option<String> {
        let v = self.explain(principal, mech, address)?;
        (!v.allow && v.rule.is_some()).then_some(v.reason)
    }

    fn exec_audit(&self, principal: &str, what: &str) {
        if let Err(e) = self.policy.record_exec(principal, what) {
            tracing::error!("audit: cannot record an exec event: {e}");
        }
    }

    fn role_refused(&self, principal: &str, roles: Roles, what: &str) {
        if let Err(e) = self
            .policy
            .record_role_refusal(principal, None, None, roles, what)
        {
            tracing::error!("audit: cannot record a role refusal: {e}");
        }
    }
}
