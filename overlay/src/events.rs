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

/// Tracks the last sequence number seen and any gaps.
#[derive(Default, Debug)]
pub struct GapDetector {
    last: Option<u64>,
    missed: u64,
    gaps: u64,
}

impl GapDetector {
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

/// Does `topic` match a subscription `pattern`? A pattern is an exact topic,
/// `*` for everything, or a prefix ending in `*` (`job.*`).
pub fn topic_matches(pattern: &str, topic: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => topic.starts_with(prefix),
        None => pattern == topic,
    }
}

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
    fn patterns() {
        assert!(topic_matches("*", "a.b"));
        assert!(topic_matches("job.*", "job.start"));
        assert!(!topic_matches("job.*", "jobs"));
        assert!(topic_matches("a.b", "a.b"));
        assert!(!topic_matches("a.b", "a.bc"));
    }
}
