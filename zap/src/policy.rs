//! Who gets in: the [`Policy`] trait and [`KeySetPolicy`], a runtime-updatable
//! set of known principals.

use std::collections::HashMap;
use std::sync::{PoisonError, RwLock};

use canopy_proto::Roles;

use crate::codec::Mechanism;

/// What the handler asks a policy about one connecting peer.
#[derive(Clone, Copy, Debug)]
pub struct AuthRequest<'a> {
    pub mechanism: Mechanism,
    /// Canonical principal (`curve:<z85>` or a GSSAPI name); empty for
    /// mechanisms that carry none (NULL, PLAIN).
    pub principal: &'a str,
    /// The peer's IP address as libzmq reports it.
    pub address: &'a str,
    /// The ZAP domain of the server socket.
    pub domain: &'a str,
}

/// A policy's verdict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Admit the peer. `user_id` becomes the message property `User-Id`;
    /// `roles` is published as the property `Roles`.
    Allow {
        user_id: String,
        roles: Roles,
        reason: String,
    },
    /// Admit the peer with roles scoped to topics or a right to register
    /// services: `grant.roles` is published as `Roles`, the rest as the
    /// property `Scope` ([`canopy_proto::Grant::encode_scope`]).
    AllowScoped {
        user_id: String,
        grant: canopy_proto::Grant,
        reason: String,
    },
    Deny {
        reason: String,
    },
}

impl Decision {
    /// Admit `user_id` with `grant`: a plain [`Decision::Allow`] when it
    /// has nothing but roles.
    pub fn allow(user_id: String, grant: canopy_proto::Grant, reason: String) -> Decision {
        if grant.is_plain() {
            Decision::Allow {
                user_id,
                roles: grant.roles,
                reason,
            }
        } else {
            Decision::AllowScoped {
                user_id,
                grant,
                reason,
            }
        }
    }
}

/// Decides whether a peer may connect. Called on the handler thread, once
/// per handshake, so it must be quick and must not block on the network.
///
/// A panic in `decide` is caught: the handler then refuses every later
/// request and reports itself dead through `ZapHandle::alive`.
pub trait Policy: Send + Sync {
    fn decide(&self, req: &AuthRequest<'_>) -> Decision;
}

/// One entry of a [`KeySetPolicy`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyEntry {
    /// Human-readable name (a host or user), for logs.
    pub name: String,
    pub roles: Roles,
}

/// A set of known principals, each with a name and roles. It can be changed
/// while the handler runs: changes apply to the next handshake, not to peers
/// already connected.
///
/// Principals are matched exactly: `curve:<40 Z85 chars>` for CURVE keys
/// (see [`crate::codec::curve_principal`]) or a GSSAPI display name. An empty
/// set denies everything; an empty principal is never admitted. The address
/// and domain are not consulted.
#[derive(Debug, Default)]
pub struct KeySetPolicy {
    keys: RwLock<HashMap<String, KeyEntry>>,
}

impl KeySetPolicy {
    /// An empty set, which denies everyone.
    pub fn new() -> KeySetPolicy {
        KeySetPolicy::default()
    }

    /// Add or replace a principal; returns the previous entry.
    pub fn insert(
        &self,
        principal: impl Into<String>,
        name: impl Into<String>,
        roles: Roles,
    ) -> Option<KeyEntry> {
        let entry = KeyEntry {
            name: name.into(),
            roles,
        };
        self.keys
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(principal.into(), entry)
    }

    /// Forget a principal; returns its entry if it was known.
    pub fn remove(&self, principal: &str) -> Option<KeyEntry> {
        self.keys
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(principal)
    }

    /// Replace the whole set atomically with `(principal, name, roles)` entries.
    pub fn replace_all<I, P, N>(&self, entries: I)
    where
        I: IntoIterator<Item = (P, N, Roles)>,
        P: Into<String>,
        N: Into<String>,
    {
        let new: HashMap<String, KeyEntry> = entries
            .into_iter()
            .map(|(p, n, roles)| {
                (
                    p.into(),
                    KeyEntry {
                        name: n.into(),
                        roles,
                    },
                )
            })
            .collect();
        *self.keys.write().unwrap_or_else(PoisonError::into_inner) = new;
    }

    pub fn get(&self, principal: &str) -> Option<KeyEntry> {
        self.keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(principal)
            .cloned()
    }

    pub fn len(&self) -> usize {
        self.keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Policy for KeySetPolicy {
    fn decide(&self, req: &AuthRequest<'_>) -> Decision {
        if req.principal.is_empty() {
            return Decision::Deny {
                reason: format!("mechanism {} carries no principal", req.mechanism),
            };
        }
        match self.get(req.principal) {
            Some(entry) => Decision::Allow {
                user_id: req.principal.to_owned(),
                roles: entry.roles,
                reason: format!("known key of '{}'", entry.name),
            },
            None => Decision::Deny {
                reason: "unknown key".to_owned(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask<'a>(principal: &'a str) -> AuthRequest<'a> {
        AuthRequest {
            mechanism: Mechanism::Curve,
            principal,
            address: "127.0.0.1",
            domain: "canopy",
        }
    }

    #[test]
    fn keyset_decisions() {
        let p = KeySetPolicy::new();
        assert!(matches!(p.decide(&ask("curve:x")), Decision::Deny { .. }));
        p.insert("curve:x", "node1", Roles::PEER);
        assert_eq!(
            p.decide(&ask("curve:x")),
            Decision::Allow {
                user_id: "curve:x".into(),
                roles: Roles::PEER,
                reason: "known key of 'node1'".into()
            }
        );
        assert_eq!(
            p.decide(&ask("curve:y")),
            Decision::Deny {
                reason: "unknown key".into()
            }
        );
        p.insert("", "nobody", Roles::OWNER);
        assert!(matches!(p.decide(&ask("")), Decision::Deny { .. }));
        p.replace_all([("curve:y", "node2", Roles::USER)]);
        assert!(matches!(p.decide(&ask("curve:x")), Decision::Deny { .. }));
        assert!(matches!(p.decide(&ask("curve:y")), Decision::Allow { .. }));
        assert_eq!(p.remove("curve:y").map(|e| e.name), Some("node2".into()));
        assert!(p.is_empty());
    }
}
