//! The binding table: which CURVE public key was authenticated as which
//! Kerberos principal, until when. Shared by the key-exchange server (which
//! writes) and the ZAP policy and broker loop (which read).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
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

/// Default cap on the live bindings of one principal.
pub const DEFAULT_PER_PRINCIPAL: usize = 1_000;
/// Default cap on all live bindings (about 300 bytes each).
pub const DEFAULT_TOTAL: usize = 65_536;

/// Keys are stored as the ZAP principal string `curve:<Z85>`, which is what
/// the ZAP handler and the broker see.
///
/// The table is bounded: at most `per_principal` live bindings per
/// principal and `total` in all; a bind past either cap is refused (a
/// renewal of a live binding always succeeds). Expired bindings are
/// forgotten in amortised constant time: every binding's expiry is also in
/// a min-heap, and each bind first pops the entries that have expired (each
/// entry is pushed once per bind or renewal and popped once).
#[derive(Debug)]
pub struct Bindings {
    inner: RwLock<Inner>,
    per_principal: usize,
    total: usize,
}

#[derive(Debug, Default)]
struct Inner {
    map: HashMap<String, Binding>,
    /// Live bindings per principal.
    counts: HashMap<String, usize>,
    /// (expiry, key) of every bind and renewal; stale entries (a renewed
    /// or removed binding) are skipped when popped.
    queue: BinaryHeap<Reverse<(Instant, String)>>,
}

impl Inner {
    /// Forget every binding that has expired by `now`.
    fn expire(&mut self, now: Instant) -> usize {
        let mut n = 0;
        while let Some(Reverse((at, _))) = self.queue.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((at, key))) = self.queue.pop() else {
                break;
            };
            // Only if this heap entry is the binding's current expiry.
            if self.map.get(&key).is_some_and(|b| b.expires == at) {
                if let Some(b) = self.map.remove(&key) {
                    self.uncount(&b.principal);
                    n += 1;
                }
            }
        }
        // Renewals leave stale heap entries behind; keep the heap within a
        // small multiple of the table.
        if self.queue.len() > 4 * self.map.len() + 64 {
            let live: Vec<_> = self
                .map
                .iter()
                .map(|(k, b)| Reverse((b.expires, k.clone())))
                .collect();
            self.queue = BinaryHeap::from(live);
        }
        n
    }

    fn uncount(&mut self, principal: &str) {
        if let Some(c) = self.counts.get_mut(principal) {
            *c -= 1;
            if *c == 0 {
                self.counts.remove(principal);
            }
        }
    }
}

/// Why a key could not be bound.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BindError {
    #[error("link key is already bound to {existing}; a key is bound to one principal only, so generate a fresh key for {wanted}")]
    OtherPrincipal { existing: String, wanted: String },
    #[error("link key is already bound for {existing} use; generate a fresh key for each link")]
    OtherPurpose { existing: &'static str },
    #[error("{principal} already has {cap} live key bindings, the most allowed per principal; reuse a connection or wait for old bindings to expire (the cap is gssapi.max_bindings_per_principal in a system config, canopy start --gss-max-bindings in a user instance)")]
    PrincipalCap { principal: String, cap: usize },
    #[error("the binding table is full ({cap} live bindings); retry later")]
    Full { cap: usize },
}

impl Default for Bindings {
    fn default() -> Bindings {
        Bindings::with_caps(DEFAULT_PER_PRINCIPAL, DEFAULT_TOTAL)
    }
}

impl Bindings {
    pub fn new() -> Bindings {
        Bindings::default()
    }

    /// A table with these caps (each at least 1).
    pub fn with_caps(per_principal: usize, total: usize) -> Bindings {
        Bindings {
            inner: RwLock::new(Inner::default()),
            per_principal: per_principal.max(1),
            total: total.max(1),
        }
    }

    /// The cap on one principal's live bindings.
    pub fn per_principal(&self) -> usize {
        self.per_principal
    }

    /// Bind `key` to `principal` until `expires`, or renew an existing
    /// binding of the same key to the same principal (the expiry is then
    /// replaced). A key never moves to another principal or purpose while
    /// its binding is live. A new binding past a cap is refused.
    pub fn bind(
        &self,
        key: &str,
        principal: &str,
        purpose: Purpose,
        expires: Instant,
        now: Instant,
    ) -> Result<bool, BindError> {
        let mut g = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        g.expire(now);
        let renewed = match g.map.get(key) {
            Some(b) if b.principal != principal => {
                return Err(BindError::OtherPrincipal {
                    existing: b.principal.clone(),
                    wanted: principal.to_string(),
                })
            }
            Some(b) if b.purpose != purpose => {
                return Err(BindError::OtherPurpose {
                    existing: b.purpose.as_str(),
                })
            }
            Some(_) => true,
            None => false,
        };
        if !renewed {
            let have = g.counts.get(principal).copied().unwrap_or(0);
            if have >= self.per_principal {
                return Err(BindError::PrincipalCap {
                    principal: principal.to_string(),
                    cap: self.per_principal,
                });
            }
            if g.map.len() >= self.total {
                return Err(BindError::Full { cap: self.total });
            }
            *g.counts.entry(principal.to_string()).or_insert(0) += 1;
        }
        g.queue.push(Reverse((expires, key.to_string())));
        g.map.insert(
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
        self.inner
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .map
            .get(key)
            .filter(|b| b.expires > now)
            .cloned()
    }

    /// True if `key` has a live binding.
    pub fn live(&self, key: &str, now: Instant) -> bool {
        self.inner
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .map
            .get(key)
            .is_some_and(|b| b.expires > now)
    }

    /// Forget expired bindings; returns how many were removed. Costs only
    /// the expired entries, not the whole table.
    pub fn sweep(&self, now: Instant) -> usize {
        self.inner
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .expire(now)
    }

    /// Live bindings of `principal` (as of the last bind or sweep).
    pub fn count(&self, principal: &str) -> usize {
        self.inner
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .counts
            .get(principal)
            .copied()
            .unwrap_or(0)
    }

    pub fn len(&self) -> usize {
        self.inner
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .map
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

    #[test]
    fn caps_per_principal_and_in_all() {
        let t = Bindings::with_caps(1000, 1500);
        let now = Instant::now();
        let s = Duration::from_secs(1);
        for i in 0..1000 {
            t.bind(
                &format!("curve:a{i}"),
                "alice@R",
                Purpose::Client,
                now + 10 * s,
                now,
            )
            .unwrap();
        }
        // The 1,001st live binding of one principal is refused...
        let e = t
            .bind("curve:a1000", "alice@R", Purpose::Client, now + 10 * s, now)
            .unwrap_err();
        assert_eq!(
            e,
            BindError::PrincipalCap {
                principal: "alice@R".into(),
                cap: 1000
            }
        );
        assert!(
            e.to_string().contains("gssapi.max_bindings_per_principal"),
            "{e}"
        );
        // ...but renewing a live one is not, and another principal binds.
        assert_eq!(
            t.bind("curve:a7", "alice@R", Purpose::Client, now + 20 * s, now),
            Ok(true)
        );
        for i in 0..500 {
            t.bind(
                &format!("curve:b{i}"),
                "bob@R",
                Purpose::Client,
                now + 10 * s,
                now,
            )
            .unwrap();
        }
        assert_eq!(
            t.bind("curve:c", "carol@R", Purpose::Client, now + 10 * s, now),
            Err(BindError::Full { cap: 1500 })
        );
        // Once they expire, the slots are free again (curve:a7 was renewed).
        let later = now + 11 * s;
        t.bind(
            "curve:a1000",
            "alice@R",
            Purpose::Client,
            later + 10 * s,
            later,
        )
        .unwrap();
        assert_eq!(t.count("alice@R"), 2);
        assert_eq!(t.count("bob@R"), 0);
        assert_eq!(t.len(), 2);
        assert!(t.live("curve:a7", later));
    }

    #[test]
    fn expiry_costs_only_the_expired_entries() {
        // 200k binds with short lifetimes, renewing a few keys on the way:
        // each bind pops what has expired, so the table and its heap stay
        // small and the whole run is fast (a full sweep per insert at this
        // size would take minutes).
        let t = Bindings::with_caps(usize::MAX, usize::MAX);
        let base = Instant::now();
        let ms = Duration::from_millis(1);
        let started = Instant::now();
        for i in 0..200_000u32 {
            let now = base + ms * i;
            t.bind(
                &format!("curve:k{i}"),
                "alice@R",
                Purpose::Client,
                now + 100 * ms,
                now,
            )
            .unwrap();
            t.bind(
                "curve:keep",
                "alice@R",
                Purpose::Client,
                now + 100 * ms,
                now,
            )
            .unwrap();
            assert!(t.len() <= 102, "{} live at {i}", t.len());
        }
        let heap = t.inner.read().unwrap().queue.len();
        assert!(heap <= 4 * 102 + 64, "heap grew to {heap}");
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{:?}",
            started.elapsed()
        );
    }
}
