//! Heartbeat bookkeeping for one link: when did we last hear from the peer,
//! and is it online, torpid or lost? Pure: the caller passes the time.

/// Liveness timings, in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// How often each side sends a heartbeat.
    pub heartbeat_ms: u64,
    /// Silence after which a peer is torpid (still routed to, reported).
    pub torpid_ms: u64,
    /// Silence after which a peer is lost (link dropped, requests failed).
    pub lost_ms: u64,
}

/// Timings that cannot work: zero, or out of order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimingError {
    #[error("the heartbeat interval must be at least 1 ms")]
    ZeroHeartbeat,
    #[error("timings must satisfy heartbeat < torpid < lost (got {heartbeat_ms} ms, {torpid_ms} ms, {lost_ms} ms); raise torpid and lost, or lower the heartbeat")]
    Order {
        heartbeat_ms: u64,
        torpid_ms: u64,
        lost_ms: u64,
    },
}

impl Timing {
    /// The one way to make timings from settings: the heartbeat is
    /// positive and heartbeat < torpid < lost.
    pub fn new(heartbeat_ms: u64, torpid_ms: u64, lost_ms: u64) -> Result<Timing, TimingError> {
        if heartbeat_ms == 0 {
            return Err(TimingError::ZeroHeartbeat);
        }
        if !(heartbeat_ms < torpid_ms && torpid_ms < lost_ms) {
            return Err(TimingError::Order {
                heartbeat_ms,
                torpid_ms,
                lost_ms,
            });
        }
        Ok(Timing {
            heartbeat_ms,
            torpid_ms,
            lost_ms,
        })
    }
}

impl Default for Timing {
    /// Cluster defaults: heartbeat 2 s, torpid after 10 s, lost after 30 s.
    fn default() -> Timing {
        Timing {
            heartbeat_ms: 2_000,
            torpid_ms: 10_000,
            lost_ms: 30_000,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Liveness {
    Online,
    Torpid,
    Lost,
}

/// What changed at a [`Peer::check`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    None,
    BecameTorpid,
    Recovered,
    BecameLost,
}

#[derive(Clone, Debug)]
pub struct Peer {
    last_heard_ms: u64,
    state: Liveness,
}

impl Peer {
    pub fn new(now_ms: u64) -> Peer {
        Peer {
            last_heard_ms: now_ms,
            state: Liveness::Online,
        }
    }

    pub fn state(&self) -> Liveness {
        self.state
    }

    pub fn last_heard_ms(&self) -> u64 {
        self.last_heard_ms
    }

    /// Anything received from the peer counts as a sign of life.
    pub fn heard(&mut self, now_ms: u64) -> Transition {
        self.last_heard_ms = self.last_heard_ms.max(now_ms);
        match self.state {
            Liveness::Torpid => {
                self.state = Liveness::Online;
                Transition::Recovered
            }
            _ => Transition::None,
        }
    }

    /// Advance the state machine to `now_ms`. Lost is final.
    pub fn check(&mut self, now_ms: u64, t: &Timing) -> Transition {
        if self.state == Liveness::Lost {
            return Transition::None;
        }
        let silent = now_ms.saturating_sub(self.last_heard_ms);
        if silent >= t.lost_ms {
            self.state = Liveness::Lost;
            Transition::BecameLost
        } else if silent >= t.torpid_ms && self.state == Liveness::Online {
            self.state = Liveness::Torpid;
            Transition::BecameTorpid
        } else {
            Transition::None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timings_are_validated() {
        assert_eq!(
            Timing::new(2000, 10_000, 30_000).unwrap(),
            Timing::default()
        );
        assert_eq!(Timing::new(0, 1, 2), Err(TimingError::ZeroHeartbeat));
        assert!(matches!(
            Timing::new(5, 5, 9),
            Err(TimingError::Order { .. })
        ));
        assert!(matches!(
            Timing::new(1, 9, 9),
            Err(TimingError::Order { .. })
        ));
    }

    #[test]
    fn online_torpid_recovered_lost() {
        let t = Timing {
            heartbeat_ms: 100,
            torpid_ms: 500,
            lost_ms: 1500,
        };
        let mut p = Peer::new(0);
        assert_eq!(p.check(499, &t), Transition::None);
        assert_eq!(p.check(500, &t), Transition::BecameTorpid);
        assert_eq!(p.check(600, &t), Transition::None);
        assert_eq!(p.heard(700), Transition::Recovered);
        assert_eq!(p.state(), Liveness::Online);
        assert_eq!(p.check(1199, &t), Transition::None);
        assert_eq!(p.check(2200, &t), Transition::BecameLost);
        assert_eq!(p.heard(2300), Transition::None);
        assert_eq!(p.state(), Liveness::Lost);
        assert_eq!(p.check(9999, &t), Transition::None);
    }

    #[test]
    fn clock_going_backwards_is_harmless() {
        let t = Timing::default();
        let mut p = Peer::new(1000);
        p.heard(500);
        assert_eq!(p.last_heard_ms(), 1000);
        assert_eq!(p.check(10, &t), Transition::None);
    }
}
