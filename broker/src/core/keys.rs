//! The I/O-free half of key rotation: which keys each neighbour rank may
//! use (the key ring), and the states of a link being moved to a new
//! connection (child: `UpLink`; parent: `Held`; a ROUTER changing its key:
//! `Rebind`). The procedure is described in `crate::rotate`, which holds
//! the certificate files; the core drives these (`core/relink.rs`).

use canopy_security::curve_principal;
use std::collections::{BTreeSet, HashMap};

/// Admin: switch this broker to its `.next` key.
pub const SWITCH_TOPIC: &str = "key.switch";
/// Admin: re-read the neighbours' public certificates.
pub const RELOAD_TOPIC: &str = "key.reload";
/// Control, child to parent, the last message on the old connection:
/// "hold my traffic, I am moving to a new connection".
pub const RELINK_TOPIC: &str = "overlay.relink";
/// Control, parent to child, the last message on the old connection.
pub const DRAINED_TOPIC: &str = "overlay.drained";
/// Control, parent to child: "relink to me with this server key" (Z85).
pub const REKEY_TOPIC: &str = "overlay.rekey";

/// User: this broker's key and whether any of its links is moving (JSON
/// [`KeyStatus`]).
pub const STATUS_TOPIC: &str = "key.status";

/// The answer to `key.status`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeyStatus {
    pub rank: u32,
    /// The public key in use (Z85).
    pub public_key: String,
    /// The parent link is moving to a new connection.
    pub parent_moving: bool,
    /// Children whose links are moving to this broker.
    pub children_moving: Vec<u32>,
    /// The ROUTER is waiting to rebind with a new key.
    pub rebinding: bool,
    /// The keys (Z85) this broker admits for each neighbour rank.
    #[serde(default)]
    pub admitted: std::collections::BTreeMap<u32, Vec<String>>,
}

impl KeyStatus {
    /// No link of this broker is moving.
    pub fn settled(&self) -> bool {
        !self.parent_moving && self.children_moving.is_empty() && !self.rebinding
    }
}

/// The CURVE keys admitted for each neighbour rank.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyRing {
    keys: HashMap<u32, Vec<[u8; 32]>>,
}

impl KeyRing {
    pub fn new(keys: HashMap<u32, Vec<[u8; 32]>>) -> KeyRing {
        KeyRing { keys }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn keys(&self, rank: u32) -> &[[u8; 32]] {
        self.keys.get(&rank).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Every neighbour's admitted keys, as Z85.
    pub fn z85_map(&self) -> std::collections::BTreeMap<u32, Vec<String>> {
        self.keys
            .iter()
            .map(|(r, ks)| {
                (
                    *r,
                    ks.iter().map(|k| canopy_security::z85::encode(k)).collect(),
                )
            })
            .collect()
    }

    pub fn allows_key(&self, rank: u32, key: &[u8; 32]) -> bool {
        self.keys(rank).contains(key)
    }

    /// The principals admitted for `rank`.
    pub fn principals(&self, rank: u32) -> Vec<String> {
        self.keys(rank).iter().map(curve_principal).collect()
    }

    /// For the hello check: `principal` if it is admitted for `rank`, else
    /// `rank`'s current principal (which then differs, and the check
    /// refuses); `None` if the ring does not know `rank`.
    pub fn expected(&self, rank: u32, principal: &str) -> Option<String> {
        let ps = self.principals(rank);
        if ps.iter().any(|p| p == principal) {
            Some(principal.to_string())
        } else {
            ps.into_iter().next()
        }
    }

    /// (principal, name) for ZAP: every admitted key of each of `children`.
    pub fn zap_entries(&self, children: &[u32]) -> Vec<(String, String)> {
        let mut v = Vec::new();
        for &c in children {
            for p in self.principals(c) {
                v.push((p, format!("rank {c}")));
            }
        }
        v
    }
}

/// Joining a parent that has not answered for `silent_ms`: after `wait_ms`,
/// the next of its configured keys (current, next) to try, if there is
/// another one (a retired key being tried counts as no key).
pub fn other_key(
    keys: &[[u8; 32]],
    trying: &[u8; 32],
    silent_ms: u64,
    wait_ms: u64,
) -> Option<[u8; 32]> {
    if keys.is_empty() || keys == [*trying] || silent_ms < wait_ms {
        return None;
    }
    let i = keys
        .iter()
        .position(|k| k == trying)
        .map_or(0, |i| (i + 1) % keys.len());
    Some(keys[i])
}

/// Child side of a relink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// `relink` sent on the old connection; waiting for `drained`.
    Draining,
    /// New connection made, hello sent; waiting for its answer.
    Joining,
}

/// This broker moving its parent link; `T` is a queued message.
pub struct UpLink<T> {
    pub phase: Option<Phase>,
    pub started_ms: u64,
    /// What was to go up meanwhile, in order.
    pub queue: Vec<T>,
}

impl<T> Default for UpLink<T> {
    fn default() -> Self {
        UpLink {
            phase: None,
            started_ms: 0,
            queue: Vec::new(),
        }
    }
}

impl<T> UpLink<T> {
    pub fn active(&self) -> bool {
        self.phase.is_some()
    }

    /// Begin: from now on sends to the parent are queued.
    pub fn start(&mut self, now_ms: u64) -> bool {
        if self.phase.is_some() {
            return false;
        }
        self.phase = Some(Phase::Draining);
        self.started_ms = now_ms;
        true
    }

    /// `drained` arrived on the old connection: make the new one.
    pub fn drained(&mut self) -> bool {
        if self.phase == Some(Phase::Draining) {
            self.phase = Some(Phase::Joining);
            true
        } else {
            false
        }
    }

    /// The hello on the new connection was accepted: send what was queued.
    pub fn joined(&mut self) -> Vec<T> {
        self.phase = None;
        std::mem::take(&mut self.queue)
    }

    /// Whether the parent has not answered for `limit_ms`: give up and
    /// rejoin the ordinary way.
    pub fn overdue(&self, now_ms: u64, limit_ms: u64) -> bool {
        self.phase.is_some() && now_ms.saturating_sub(self.started_ms) > limit_ms
    }

    /// Give up: the queue is returned so its requests can be failed.
    pub fn abandon(&mut self) -> Vec<T> {
        self.phase = None;
        std::mem::take(&mut self.queue)
    }
}

/// Parent side: a child that asked to relink.
pub struct Held<T> {
    pub old_rid: Vec<u8>,
    pub since_ms: u64,
    pub queue: Vec<T>,
}

/// Why the parent accepts or refuses a relink hello.
#[derive(Debug, PartialEq, Eq)]
pub enum RelinkVerdict {
    /// Not a relink: treat it as an ordinary hello.
    NotRelink,
    Accept,
    Refuse(String),
}

/// Decide a hello that arrives on an unknown connection while `rank` is
/// online with `online_session`: it is a relink if the child asked to
/// relink (`held`) and says hello with the same session; its key must be
/// one the ring admits for that rank.
pub fn relink_verdict(
    held: bool,
    online_session: Option<u64>,
    hello_session: u64,
    key_admitted: bool,
) -> RelinkVerdict {
    if online_session != Some(hello_session) {
        return RelinkVerdict::NotRelink;
    }
    if !held {
        return RelinkVerdict::Refuse(
            "a second connection with the session of an online rank, without a relink request"
                .into(),
        );
    }
    if !key_admitted {
        return RelinkVerdict::Refuse("the key is not admitted for this rank".into());
    }
    RelinkVerdict::Accept
}

/// A broker rebinding its ROUTER with a new server key: which children must
/// move off the old listener first.
pub struct Rebind {
    pub started_ms: u64,
    pub deadline_ms: u64,
    /// Children told to relink that have not asked yet.
    pub waiting: BTreeSet<u32>,
    /// Old connections of children that have been drained.
    pub old_rids: Vec<Vec<u8>>,
}

impl Rebind {
    pub fn new(children: impl IntoIterator<Item = u32>, now_ms: u64, limit_ms: u64) -> Rebind {
        Rebind {
            started_ms: now_ms,
            deadline_ms: now_ms + limit_ms,
            waiting: children.into_iter().collect(),
            old_rids: Vec::new(),
        }
    }

    /// `rank` asked to relink from `old_rid`.
    pub fn relinking(&mut self, rank: u32, old_rid: Vec<u8>) {
        self.waiting.remove(&rank);
        self.old_rids.push(old_rid);
    }

    /// Ready when every child has relinked and closed its old connection
    /// (`connected` says whether one is still open), or the deadline passed.
    pub fn ready(&mut self, now_ms: u64, mut connected: impl FnMut(&[u8]) -> bool) -> bool {
        self.old_rids.retain(|r| connected(r));
        (self.waiting.is_empty() && self.old_rids.is_empty()) || now_ms >= self.deadline_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> [u8; 32] {
        [b; 32]
    }

    #[test]
    fn ring_admits_current_and_next_only_for_their_rank() {
        let ring = KeyRing::new(HashMap::from([
            (1, vec![key(1), key(11)]),
            (2, vec![key(2)]),
        ]));
        assert!(ring.allows_key(1, &key(11)));
        assert!(!ring.allows_key(2, &key(11)));
        let p11 = curve_principal(&key(11));
        let p1 = curve_principal(&key(1));
        assert_eq!(ring.expected(1, &p11).as_deref(), Some(p11.as_str()));
        // Rank 2 does not admit rank 1's next key: the check sees rank 2's.
        assert_eq!(ring.expected(2, &p11), Some(curve_principal(&key(2))));
        assert_eq!(ring.expected(3, &p1), None);
        let z = ring.zap_entries(&[1]);
        assert_eq!(z.len(), 2);
        assert!(z.iter().all(|(_, n)| n == "rank 1"));
    }

    #[test]
    fn uplink_phases() {
        let mut u: UpLink<(Vec<u8>, Vec<u8>)> = UpLink::default();
        assert!(!u.drained(), "drained before a relink is ignored");
        assert!(u.start(100));
        assert!(!u.start(101), "one relink at a time");
        assert!(!u.overdue(150, 100));
        assert!(u.overdue(201, 100));
        u.queue.push((vec![1], b"x".to_vec()));
        assert!(u.drained());
        assert!(!u.drained());
        assert_eq!(u.phase, Some(Phase::Joining));
        let q = u.joined();
        assert_eq!(q.len(), 1);
        assert!(!u.active());
    }

    #[test]
    fn relink_needs_the_same_session_a_request_and_an_admitted_key() {
        assert_eq!(
            relink_verdict(true, None, 5, true),
            RelinkVerdict::NotRelink
        );
        assert_eq!(
            relink_verdict(true, Some(4), 5, true),
            RelinkVerdict::NotRelink
        );
        assert_eq!(
            relink_verdict(true, Some(5), 5, true),
            RelinkVerdict::Accept
        );
        assert!(matches!(
            relink_verdict(false, Some(5), 5, true),
            RelinkVerdict::Refuse(_)
        ));
        assert!(matches!(
            relink_verdict(true, Some(5), 5, false),
            RelinkVerdict::Refuse(_)
        ));
    }

    #[test]
    fn rebind_waits_for_every_child_or_the_deadline() {
        let mut r = Rebind::new([3, 4], 0, 1000);
        assert!(!r.ready(10, |_| true));
        r.relinking(3, b"a".to_vec());
        assert!(!r.ready(20, |_| false));
        r.relinking(4, b"b".to_vec());
        assert!(!r.ready(30, |rid| rid == b"b"));
        assert!(r.ready(40, |_| false));
        let mut late = Rebind::new([3], 0, 1000);
        assert!(late.ready(1000, |_| true));
    }

    #[test]
    fn a_silent_parent_is_tried_with_its_other_key() {
        let ks = [key(1), key(2)];
        assert_eq!(other_key(&ks, &key(1), 100, 500), None, "not yet");
        assert_eq!(other_key(&ks, &key(1), 600, 500), Some(key(2)));
        assert_eq!(other_key(&ks, &key(2), 600, 500), Some(key(1)));
        assert_eq!(other_key(&ks, &key(9), 600, 500), Some(key(1)));
        assert_eq!(other_key(&ks[..1], &key(1), 9999, 500), None);
        // The key being tried was retired meanwhile: use the one left.
        assert_eq!(other_key(&ks[1..], &key(1), 9999, 500), Some(key(2)));
        assert_eq!(other_key(&[], &key(1), 9999, 500), None);
    }
}
