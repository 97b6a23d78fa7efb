//! Event sequencing: rank 0 numbers events; every rank checks for gaps.

/// Rank 0's event counter. Sequence numbers start at 1.
#[derive(Default)]
pub struct Sequencer {
    last: u64,
}

impl Sequencer {
    pub fn next_seq(&mut self) -> u64 {
        self.last += 1;
        self.last
    }
}

/// What a rank concluded about an arriving event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arrival {
    /// The next event in order.
    InOrder,
    /// The first event this rank has seen; sequence resumes here.
    First,
    /// Events `from..=to` were never seen.
    Gap { from: u64, to: u64 },
    /// Already seen (or older): drop it.
    Duplicate,
}

/// Tracks the last sequence number seen and any gaps. Sequence numbers
/// belong to an epoch (one incarnation of rank 0): a new epoch starts the
/// sequence afresh.
#[derive(Default, Debug)]
pub struct GapDetector {
    epoch: Option<u32>,
    last: Option<u64>,
    missed: u64,
    gaps: u64,
}

impl GapDetector {
    /// An event of `epoch` with `seq` arrived.
    pub fn arrive_in(&mut self, epoch: u32, seq: u64) -> Arrival {
        if self.epoch != Some(epoch) {
            self.epoch = Some(epoch);
            self.last = None;
        }
        self.arrive(seq)
    }

    /// The epoch and sequence number of the last event seen.
    pub fn position(&self) -> Option<(u32, u64)> {
        Some((self.epoch?, self.last?))
    }

    pub fn arrive(&mut self, seq: u64) -> Arrival {
        let result = match self.last {
            None => Arrival::First,
            Some(l) if seq <= l => return Arrival::Duplicate,
            Some(l) if seq == l + 1 => Arrival::InOrder,
            Some(l) => {
                self.missed += seq - l - 1;
                self.gaps += 1;
                Arrival::Gap {
                    from: l + 1,
                    to: seq - 1,
                }
            }
        };
        self.last = Some(seq);
        result
    }

    pub fn last(&self) -> Option<u64> {
        self.last
    }

    /// Total events missed, and the number of gaps.
    pub fn missed(&self) -> (u64, u64) {
        (self.missed, self.gaps)
    }
}

/// The most recent events, kept to replay to a child that rejoins.
pub struct Ring<T> {
    items: std::collections::VecDeque<(u32, u64, T)>,
    max: usize,
}

impl<T: Clone> Ring<T> {
    pub fn new(max: usize) -> Ring<T> {
        Ring {
            items: std::collections::VecDeque::new(),
            max,
        }
    }

    pub fn push(&mut self, epoch: u32, seq: u64, item: T) {
        if self.max == 0 {
            return;
        }
        if self.items.len() == self.max {
            self.items.pop_front();
        }
        self.items.push_back((epoch, seq, item));
    }

    /// Events after `(epoch, seq)`, in order; empty if the epoch differs.
    pub fn after(&self, epoch: u32, seq: u64) -> Vec<T> {
        self.items
            .iter()
            .filter(|(e, s, _)| *e == epoch && *s > seq)
            .map(|(_, _, t)| t.clone())
            .collect()
    }
}

/// Does `topic` match a subscription `pattern`? A pattern is an exact topic,
/// `*` for everything, or a prefix ending in `*` (`job.*`).
pub use canopy_proto::grant::topic_matches;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_and_gaps() {
        let mut s = Sequencer::default();
        assert_eq!((s.next_seq(), s.next_seq()), (1, 2));
        let mut g = GapDetector::default();
        assert_eq!(g.arrive(5), Arrival::First);
        assert_eq!(g.arrive(6), Arrival::InOrder);
        assert_eq!(g.arrive(6), Arrival::Duplicate);
        assert_eq!(g.arrive(3), Arrival::Duplicate);
        assert_eq!(g.arrive(9), Arrival::Gap { from: 7, to: 8 });
        assert_eq!(g.arrive(10), Arrival::InOrder);
        assert_eq!(g.missed(), (2, 1));
        assert_eq!(g.last(), Some(10));
    }

    #[test]
    fn epochs_restart_the_sequence() {
        let mut g = GapDetector::default();
        assert_eq!(g.arrive_in(7, 10), Arrival::First);
        assert_eq!(g.arrive_in(7, 11), Arrival::InOrder);
        // Rank 0 restarted: a new epoch begins again at 1, not a duplicate.
        assert_eq!(g.arrive_in(9, 1), Arrival::First);
        assert_eq!(g.arrive_in(9, 2), Arrival::InOrder);
        assert_eq!(g.position(), Some((9, 2)));
    }

    #[test]
    fn ring_replays_what_a_child_missed() {
        let mut r = Ring::new(3);
        for s in 1..=5 {
            r.push(1, s, s);
        }
        assert_eq!(r.after(1, 3), vec![4, 5]);
        assert_eq!(r.after(1, 0), vec![3, 4, 5], "1 and 2 fell off");
        assert!(r.after(2, 0).is_empty());
    }

    #[test]
    fn patterns() {
        assert!(topic_matches("*", "a.b"));
        assert!(topic_matches("job.*", "job.start"));
        assert!(!topic_matches("job.*", "jobs"));
        assert!(topic_matches("a.b", "a.b"));
        assert!(!topic_matches("a.b", "a.bc"));
    }
}
