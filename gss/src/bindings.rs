//! The binding table: which CURVE public key was authenticated as which
//! Kerberos principal, until when. Shared by the key-exchange server (which
//! writes) and the ZAP policy and broker loop (which read).

use std::collections::HashMap;
use std::sync::{PoisonError, RwLock};
use std::time::Instant;

use crate::wire::Purpose;

/// One bound key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    /// Canonical principal the key was authenticated as.
    pub principal: String,
    pub purpose: Purpose,
    /// The Kerberos context's end: past it, the key is no longer admitted.
    pub expires: Instant,
}

/// Keys are stored as the ZAP principal string `curve:<Z85>`, which is what
/// the ZAP handler and the broker see.
#[derive(Debug, Default)]
pub struct Bindings {
    map: RwLock<HashMap<String, Binding>>,
}

/// Why a key could not be bound.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BindError {
    #[error("link key is already bound to {existing}; a key is bound to one principal only, so generate a fresh key for {wanted}")]
    OtherPrincipal { existing: String, wanted: String },
    #[error("link key is already bound for {existing} use; generate a fresh key for each link")]
    OtherPurpose { existing: &'static str },
}

impl Bindings {
    pub fn new() -> Bindings {
        Bindings::default()
    }

    /// Bind `key` to `principal` until `expires`, or renew an existing
    /// binding of the same key to the same principal (the expiry is then
    /// replaced). A key never moves to another principal or purpose while
    /// its binding is live.
    pub fn bind(
        &self,
        key: &str,
        principal: &str,
        purpose: Purpose,
        expires: Instant,
        now: Instant,
    ) -> Result<bool, BindError> {
        let mut m = self.map.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(b) = m.get(key).filter(|b| b.expires > now) {
            if b.principal != principal {
                return Err(BindError::OtherPrincipal {
                    existing: b.principal.clone(),
                    wanted: principal.to_string(),
                });
            }
            if b.purpose != purpose {
                return Err(BindError::OtherPurpose {
                    existing: b.purpose.as_str(),
                });
            }
        }
        if m.len() >= 4096 {
            m.retain(|_, b| b.expires > now);
        }
        let renewed = m.contains_key(key);
        m.insert(
            key.to_string(),
            Binding {
                principal: principal.to_string(),
                purpose,
                expires,
            },
        );
        Ok(renewed)
    }

    /// The live binding of `key`, if any.
    pub fn get(&self, key: &str, now: Instant) -> Option<Binding> {
        self.map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .filter(|b| b.expires > now)
            .cloned()
    }

    /// True if `key` has a live binding.
    pub fn live(&self, key: &str, now: Instant) -> bool {
        self.map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .is_some_and(|b| b.expires > now)
    }

    /// Forget expired bindings; returns how many were removed.
    pub fn sweep(&self, now: Instant) -> usize {
        let mut m = self.map.write().unwrap_or_else(PoisonError::into_inner);
        let before = m.len();
        m.retain(|_, b| b.expires > now);
        before - m.len()
    }

    pub fn len(&self) -> usize {
        self.map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bind_renew_expire() {
        let t = Bindings::new();
        let now = Instant::now();
        let s = Duration::from_secs(1);
        assert!(!t.live("curve:k", now));
        assert_eq!(
            t.bind("curve:k", "alice@R", Purpose::Client, now + 10 * s, now),
            Ok(false)
        );
        assert_eq!(t.get("curve:k", now).unwrap().principal, "alice@R");
        // Renewal by the same principal moves the expiry.
        assert_eq!(
            t.bind(
                "curve:k",
                "alice@R",
                Purpose::Client,
                now + 20 * s,
                now + 5 * s
            ),
            Ok(true)
        );
        assert!(t.live("curve:k", now + 15 * s));
        assert!(!t.live("curve:k", now + 20 * s));
        // Another principal cannot take a live key...
        assert!(matches!(
            t.bind(
                "curve:k",
                "mallory@R",
                Purpose::Client,
                now + 30 * s,
                now + 6 * s
            ),
            Err(BindError::OtherPrincipal { .. })
        ));
        assert!(matches!(
            t.bind(
                "curve:k",
                "alice@R",
                Purpose::Overlay,
                now + 30 * s,
                now + 6 * s
            ),
            Err(BindError::OtherPurpose { .. })
        ));
        assert_eq!(t.get("curve:k", now + 6 * s).unwrap().principal, "alice@R");
        // ...but an expired binding is gone.
        assert_eq!(t.sweep(now + 21 * s), 1);
        assert!(t.is_empty());
        assert!(t.get("curve:k", now + 21 * s).is_none());
    }
}
