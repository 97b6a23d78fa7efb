//! Where a request goes next.

use crate::topology::Topology;
use canopy_proto::{errno, NODEID_ANY};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Handle it here (a service of this broker).
    Local,
    /// Send it to the parent.
    Up,
    /// Send it to this child.
    Down(u32),
    /// Answer it here with this error number.
    Fail(u32),
}

/// Decide where a request addressed to `nodeid` goes from broker `rank`.
/// `has_service` says whether this broker offers the request's topic.
pub fn next_hop(topo: &Topology, rank: u32, nodeid: u32, has_service: bool) -> Next {
    if nodeid == NODEID_ANY {
        return if has_service {
            Next::Local
        } else if topo.parent(rank).is_some() {
            Next::Up
        } else {
            Next::Fail(errno::ENOSYS)
        };
    }
    if nodeid == rank {
        return if has_service {
            Next::Local
        } else {
            Next::Fail(errno::ENOSYS)
        };
    }
    if !topo.contains(nodeid) {
        return Next::Fail(errno::EHOSTUNREACH);
    }
    if let Some(child) = topo.child_toward(rank, nodeid) {
        return Next::Down(child);
    }
    if topo.parent(rank).is_some() {
        Next::Up
    } else {
        Next::Fail(errno::EHOSTUNREACH)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions() {
        let t = Topology::new(8, 2).unwrap();
        assert_eq!(next_hop(&t, 0, 7, true), Next::Down(1));
        assert_eq!(next_hop(&t, 1, 7, true), Next::Down(3));
        assert_eq!(next_hop(&t, 7, 7, true), Next::Local);
        assert_eq!(next_hop(&t, 7, 7, false), Next::Fail(errno::ENOSYS));
        assert_eq!(next_hop(&t, 2, 7, true), Next::Up);
        assert_eq!(next_hop(&t, 0, 8, true), Next::Fail(errno::EHOSTUNREACH));
        assert_eq!(next_hop(&t, 5, 99, true), Next::Fail(errno::EHOSTUNREACH));
        assert_eq!(next_hop(&t, 5, NODEID_ANY, true), Next::Local);
        assert_eq!(next_hop(&t, 5, NODEID_ANY, false), Next::Up);
        assert_eq!(
            next_hop(&t, 0, NODEID_ANY, false),
            Next::Fail(errno::ENOSYS)
        );
    }

    #[test]
    fn every_request_reaches_its_target() {
        // Walk the decisions from every rank to every rank: the path must
        // end at the target in at most 2*depth hops.
        for k in 1..4 {
            let t = Topology::new(40, k).unwrap();
            for from in 0..40 {
                for to in 0..40 {
                    let mut at = from;
                    let mut hops = 0;
                    loop {
                        match next_hop(&t, at, to, true) {
                            Next::Local => break,
                            Next::Up => at = t.parent(at).unwrap(),
                            Next::Down(c) => at = c,
                            Next::Fail(e) => panic!("{from}->{to} failed {e}"),
                        }
                        hops += 1;
                        assert!(hops <= 2 * 40);
                    }
                    assert_eq!(at, to);
                }
            }
        }
    }
}
