//! Per-rank state and subtree health, as seen from one broker.
//!
//! Each broker tracks every rank of its own subtree. State changes are
//! queued as [`Delta`]s and sent to the parent, which merges them into its
//! own view, so rank 0 sees the whole instance.

use crate::topology::Topology;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const HEALTH_TOPIC: &str = "overlay.health";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RankState {
    /// Has not joined yet, or stopped cleanly (announced to its parent).
    Offline,
    /// Joined and reachable.
    Online,
    /// Online, but silent for longer than the torpid timeout.
    Torpid,
    /// Was online; its link (or an ancestor's) was lost: a crash, a
    /// partition, a hang.
    Lost,
    /// Its parent refused it (the reason says why); it keeps retrying.
    Refused,
}

/// Health of a subtree.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SubtreeHealth {
    /// Every rank of the subtree is online.
    Full,
    /// Some ranks have not joined yet; none was lost.
    Partial,
    /// Some ranks were lost.
    Degraded,
    /// The subtree's root itself was lost.
    Lost,
    /// The subtree's root has not joined.
    Offline,
}

impl std::fmt::Display for SubtreeHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SubtreeHealth::Full => "full",
            SubtreeHealth::Partial => "partial",
            SubtreeHealth::Degraded => "degraded",
            SubtreeHealth::Lost => "lost",
            SubtreeHealth::Offline => "offline",
        })
    }
}

/// One rank's state change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Delta {
    pub rank: u32,
    pub state: RankState,
    pub reason: String,
    /// Events this rank has missed so far (gaps in the sequence).
    #[serde(default)]
    pub missed_events: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub state: RankState,
    /// Milliseconds (caller's clock) when the state was entered.
    pub since_ms: u64,
    pub reason: String,
    /// Events this rank has missed so far.
    pub missed_events: u64,
}

pub struct Health {
    topo: Topology,
    root: u32,
    entries: BTreeMap<u32, Entry>,
    pending: Vec<Delta>,
    online: usize,
}

impl Health {
    /// The view of the subtree rooted at `root`, which is online itself.
    pub fn new(topo: Topology, root: u32, now_ms: u64) -> Health {
        let mut entries = BTreeMap::new();
        for r in topo.subtree(root) {
            entries.insert(
                r,
                Entry {
                    state: RankState::Offline,
                    since_ms: now_ms,
                    reason: "not joined yet".into(),
                    missed_events: 0,
                },
            );
        }
        let mut h = Health {
            topo,
            root,
            entries,
            pending: Vec::new(),
            online: 0,
        };
        h.set(root, RankState::Online, "broker started", now_ms);
        h
    }

    /// Set one rank's state; queues a delta if it changed.
    pub fn set(&mut self, rank: u32, state: RankState, reason: &str, now_ms: u64) -> bool {
        let Some(e) = self.entries.get_mut(&rank) else {
            return false;
        };
        if e.state == state {
            return false;
        }
        if e.state == RankState::Online {
            self.online -= 1;
        }
        if state == RankState::Online {
            self.online += 1;
        }
        let missed_events = e.missed_events;
        *e = Entry {
            state,
            since_ms: now_ms,
            reason: reason.to_string(),
            missed_events,
        };
        self.pending.push(Delta {
            rank,
            state,
            reason: reason.to_string(),
            missed_events,
        });
        true
    }

    /// Record how many events `rank` has missed; queues a delta if it grew.
    pub fn set_missed(&mut self, rank: u32, missed: u64) {
        let Some(e) = self.entries.get_mut(&rank) else {
            return;
        };
        if e.missed_events == missed {
            return;
        }
        e.missed_events = missed;
        self.pending.push(Delta {
            rank,
            state: e.state,
            reason: e.reason.clone(),
            missed_events: missed,
        });
    }

    /// Merge deltas reported by `child`. Deltas for ranks outside the
    /// child's subtree are ignored and counted: a child may only speak for
    /// its own subtree. Returns how many were ignored.
    pub fn apply_from_child(&mut self, child: u32, deltas: &[Delta], now_ms: u64) -> usize {
        let mut ignored = 0;
        for d in deltas {
            if self.topo.in_subtree(child, d.rank) {
                self.set(d.rank, d.state, &d.reason, now_ms);
                self.set_missed(d.rank, d.missed_events);
            } else {
                ignored += 1;
            }
        }
        ignored
    }

    /// `child` stopped cleanly (it said so): every rank below it that was
    /// online is offline, not lost.
    pub fn child_left(&mut self, child: u32, reason: &str, now_ms: u64) {
        for r in self.topo.subtree(child) {
            if matches!(
                self.entries.get(&r).map(|e| e.state),
                Some(RankState::Online) | Some(RankState::Torpid)
            ) {
                self.set(r, RankState::Offline, reason, now_ms);
            }
        }
    }

    /// The link to `child` is gone: every online rank below it is lost.
    pub fn child_lost(&mut self, child: u32, reason: &str, now_ms: u64) {
        for r in self.topo.subtree(child) {
            if matches!(
                self.entries.get(&r).map(|e| e.state),
                Some(RankState::Online) | Some(RankState::Torpid)
            ) {
                self.set(r, RankState::Lost, reason, now_ms);
            }
        }
    }

    /// Queue every rank's current state, e.g. after rejoining a parent
    /// that may have marked this subtree lost.
    pub fn requeue_all(&mut self) {
        self.pending = self
            .entries
            .iter()
            .map(|(r, e)| Delta {
                rank: *r,
                state: e.state,
                reason: e.reason.clone(),
                missed_events: e.missed_events,
            })
            .collect();
    }

    /// Deltas not yet sent to the parent.
    pub fn take_pending(&mut self) -> Vec<Delta> {
        std::mem::take(&mut self.pending)
    }

    /// Every rank in this view is online.
    pub fn is_full(&self) -> bool {
        self.online == self.entries.len()
    }

    pub fn online_count(&self) -> usize {
        self.online
    }

    pub fn root(&self) -> u32 {
        self.root
    }

    pub fn get(&self, rank: u32) -> Option<&Entry> {
        self.entries.get(&rank)
    }

    pub fn entries(&self) -> impl Iterator<Item = (u32, &Entry)> {
        self.entries.iter().map(|(r, e)| (*r, e))
    }

    /// Health of the subtree rooted at `rank` (which must be in this view).
    pub fn subtree_health(&self, rank: u32) -> SubtreeHealth {
        match self.entries.get(&rank).map(|e| e.state) {
            None | Some(RankState::Offline) | Some(RankState::Refused) => {
                return SubtreeHealth::Offline
            }
            Some(RankState::Lost) => return SubtreeHealth::Lost,
            Some(RankState::Online) | Some(RankState::Torpid) => {}
        }
        let mut partial = false;
        for r in self.topo.subtree(rank) {
            match self.entries.get(&r).map(|e| e.state) {
                Some(RankState::Lost) | Some(RankState::Torpid) => return SubtreeHealth::Degraded,
                Some(RankState::Offline) | Some(RankState::Refused) | None => partial = true,
                Some(RankState::Online) => {}
            }
        }
        if partial {
            SubtreeHealth::Partial
        } else {
            SubtreeHealth::Full
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t8() -> Topology {
        Topology::new(8, 2).unwrap()
    }

    #[test]
    fn a_clean_stop_is_offline_and_a_refusal_is_not_online() {
        let mut h = Health::new(t8(), 0, 0);
        for r in 1..8 {
            h.set(r, RankState::Online, "joined", 1);
        }
        h.child_left(1, "stopped cleanly", 2);
        for r in [1, 3, 4, 7] {
            assert_eq!(h.get(r).unwrap().state, RankState::Offline, "rank {r}");
        }
        assert_eq!(h.get(2).unwrap().state, RankState::Online);
        assert_eq!(h.subtree_health(1), SubtreeHealth::Offline);
        assert_eq!(h.subtree_health(0), SubtreeHealth::Partial);
        h.set(1, RankState::Refused, "wrong key", 3);
        assert_eq!(h.subtree_health(1), SubtreeHealth::Offline);
        assert_eq!(h.subtree_health(0), SubtreeHealth::Partial);
        assert!(!h.is_full());
    }

    #[test]
    fn starts_partial_and_becomes_full() {
        let mut h = Health::new(t8(), 1, 0);
        assert_eq!(h.subtree_health(1), SubtreeHealth::Partial);
        assert_eq!(h.take_pending().len(), 1);
        for r in [3, 4, 7] {
            h.set(r, RankState::Online, "hello", 5);
        }
        assert!(h.is_full());
        assert_eq!(h.subtree_health(1), SubtreeHealth::Full);
        assert_eq!(h.subtree_health(3), SubtreeHealth::Full);
        let p = h.take_pending();
        assert_eq!(p.iter().map(|d| d.rank).collect::<Vec<_>>(), vec![3, 4, 7]);
        assert!(h.take_pending().is_empty());
        // Unchanged state queues nothing.
        assert!(!h.set(3, RankState::Online, "again", 6));
        assert!(h.take_pending().is_empty());
    }

    #[test]
    fn lost_child_degrades() {
        let mut h = Health::new(t8(), 0, 0);
        for r in 1..8 {
            h.set(r, RankState::Online, "hello", 1);
        }
        h.child_lost(3, "link to rank 3 lost", 10);
        assert_eq!(h.subtree_health(0), SubtreeHealth::Degraded);
        assert_eq!(h.subtree_health(1), SubtreeHealth::Degraded);
        assert_eq!(h.subtree_health(3), SubtreeHealth::Lost);
        assert_eq!(h.subtree_health(2), SubtreeHealth::Full);
        assert_eq!(h.get(7).unwrap().state, RankState::Lost);
        assert_eq!(h.get(7).unwrap().since_ms, 10);
        assert_eq!(h.online_count(), 6);
    }

    #[test]
    fn child_speaks_only_for_its_subtree() {
        let mut h = Health::new(t8(), 0, 0);
        let deltas = vec![
            Delta {
                rank: 3,
                state: RankState::Online,
                reason: "x".into(),
                missed_events: 0,
            },
            Delta {
                rank: 2,
                state: RankState::Online,
                reason: "forged".into(),
                missed_events: 0,
            },
            Delta {
                rank: 99,
                state: RankState::Online,
                reason: "bogus".into(),
                missed_events: 0,
            },
        ];
        assert_eq!(h.apply_from_child(1, &deltas, 3), 2);
        let mut d = deltas[0].clone();
        d.missed_events = 4;
        h.take_pending();
        h.apply_from_child(1, &[d], 4);
        assert_eq!(h.get(3).unwrap().missed_events, 4);
        assert_eq!(h.take_pending().len(), 1, "the count is passed upstream");
        assert_eq!(h.get(3).unwrap().state, RankState::Online);
        assert_eq!(h.get(2).unwrap().state, RankState::Offline);
        assert_eq!(h.subtree_health(2), SubtreeHealth::Offline);
    }
}
