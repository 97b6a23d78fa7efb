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

use canopy_proto::Roles;
use canopy_zap::{AuthRequest, Decision, KeySetPolicy, Mechanism, Policy};
use std::sync::Arc;

/// ZAP domain of the overlay ROUTER.
pub const OVERLAY_DOMAIN: &str = "canopy";
/// ZAP domain of the remote client endpoint.
pub const CLIENT_DOMAIN: &str = "canopy-client";

/// How a client authenticated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientMech {
    /// UNIX socket, uid from `SO_PEERCRED`.
    Local,
    Curve,
    Gssapi,
}

impl ClientMech {
    pub fn as_str(self) -> &'static str {
        match self {
            ClientMech::Local => "local",
            ClientMech::Curve => "curve",
            ClientMech::Gssapi => "gssapi",
        }
    }
}

/// A client's verdict: roles, or why not.
pub type ClientVerdict = Result<Roles, String>;

/// Decides for clients (not overlay peers).
pub trait ClientAuthz: Send + Sync {
    fn decide(&self, principal: &str, mech: ClientMech, address: &str) -> ClientVerdict;
    /// Changes whenever the policy is reloaded, so that connections admitted
    /// under an older policy are checked again on their next message.
    fn generation(&self) -> u64 {
        0
    }
}

/// A personal instance's default: the owner, nobody else.
pub struct OwnerOnly {
    pub owner: String,
}

impl ClientAuthz for OwnerOnly {
    fn decide(&self, principal: &str, _mech: ClientMech, _address: &str) -> ClientVerdict {
        if principal == self.owner {
            Ok(Roles::OWNER)
        } else {
            Err(format!(
                "{principal} is not the owner of this instance ({}); only the owner may connect",
                self.owner
            ))
        }
    }
}

/// The broker's ZAP policy over both domains.
pub struct BrokerPolicy {
    pub peers: KeySetPolicy,
    pub clients: Arc<dyn ClientAuthz>,
}

impl BrokerPolicy {
    pub fn new(clients: Arc<dyn ClientAuthz>) -> BrokerPolicy {
        BrokerPolicy {
            peers: KeySetPolicy::new(),
            clients,
        }
    }
}

impl Policy for BrokerPolicy {
    fn decide(&self, req: &AuthRequest<'_>) -> Decision {
        match req.domain {
            OVERLAY_DOMAIN => self.peers.decide(req),
            CLIENT_DOMAIN => {
                let mech = match req.mechanism {
                    Mechanism::Curve => ClientMech::Curve,
                    Mechanism::Gssapi => ClientMech::Gssapi,
                    other => {
                        return Decision::Deny {
                            reason: format!("mechanism {other} is not accepted"),
                        }
                    }
                };
                match self.clients.decide(req.principal, mech, req.address) {
                    Ok(roles) if !roles.is_empty() => Decision::Allow {
                        user_id: req.principal.to_string(),
                        roles,
                        reason: "client policy".into(),
                    },
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
