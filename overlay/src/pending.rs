//! Requests in flight through one broker's links, so that every request
//! gets exactly one answer: when a link is lost, each request forwarded
//! over it is answered with EHOSTUNREACH.
//!
//! A request is identified by its route stack (as forwarded, including this
//! broker's own entry) and its matchtag; the response carries both back.

use canopy_proto::Hop;
use std::collections::HashMap;

/// Which link a request was forwarded over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Link {
    Parent,
    Child(u32),
}

/// What is kept to answer a request if its link is lost.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InFlight {
    pub topic: String,
    pub matchtag: u32,
    pub nodeid: u32,
    pub route: Vec<Hop>,
    /// The request's payload size, counted against the link's budget.
    pub bytes: usize,
}

#[derive(Default)]
pub struct Pending {
    by_link: HashMap<Link, HashMap<(u64, u32), InFlight>>,
    /// Payload bytes of the requests in flight over each link.
    bytes: HashMap<Link, usize>,
    count: usize,
}

/// A cheap, deterministic hash of a route stack.
pub fn route_key(route: &[Hop]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for hop in route {
        let (k, id) = match *hop {
            Hop::Parent => (1u64, 0u32),
            Hop::Child(r) => (2, r),
            Hop::Local(c) => (3, c),
        };
        for b in (k << 32 | id as u64).to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

impl Pending {
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Payload bytes of the requests in flight over `link`.
    pub fn bytes(&self, link: Link) -> usize {
        self.bytes.get(&link).copied().unwrap_or(0)
    }

    /// Record a request forwarded over `link`.
    pub fn insert(&mut self, link: Link, req: InFlight) {
        let key = (route_key(&req.route), req.matchtag);
        let n = req.bytes;
        let b = self.bytes.entry(link).or_default();
        *b += n;
        match self.by_link.entry(link).or_default().insert(key, req) {
            None => self.count += 1,
            Some(old) => *b -= old.bytes,
        }
    }

    fn sub(&mut self, link: Link, n: usize) {
        if let Some(b) = self.bytes.get_mut(&link) {
            *b = b.saturating_sub(n);
        }
    }

    /// A response came back over `link` with this route and matchtag.
    /// Returns whether it matched a request in flight.
    pub fn complete(&mut self, link: Link, route: &[Hop], matchtag: u32) -> bool {
        let Some(m) = self.by_link.get_mut(&link) else {
            return false;
        };
        match m.remove(&(route_key(route), matchtag)) {
            Some(r) => {
                self.count -= 1;
                self.sub(link, r.bytes);
                true
            }
            None => false,
        }
    }

    /// Whether a request with this route and matchtag is in flight over
    /// `link` (a streamed response that is not the last one: the entry
    /// stays until the last).
    pub fn contains(&self, link: Link, route: &[Hop], matchtag: u32) -> bool {
        self.by_link
            .get(&link)
            .is_some_and(|m| m.contains_key(&(route_key(route), matchtag)))
    }

    /// The link is gone: every request forwarded over it, to be failed.
    pub fn fail_link(&mut self, link: Link) -> Vec<InFlight> {
        let v: Vec<InFlight> = self
            .by_link
            .remove(&link)
            .map(|m| m.into_values().collect())
            .unwrap_or_default();
        self.count -= v.len();
        self.bytes.remove(&link);
        v
    }

    /// Forget requests that came in over `link` (their requester is gone,
    /// so their responses have nowhere to go). Returns how many.
    pub fn forget_from(&mut self, from: Hop) -> usize {
        let mut n = 0;
        for (link, m) in self.by_link.iter_mut() {
            let mut freed = 0;
            m.retain(|_, r| {
                let keep = r.route.last() != Some(&from);
                if !keep {
                    freed += r.bytes;
                    n += 1;
                }
                keep
            });
            if let Some(b) = self.bytes.get_mut(link) {
                *b = b.saturating_sub(freed);
            }
        }
        self.count -= n;
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(tag: u32, route: Vec<Hop>) -> InFlight {
        InFlight {
            topic: "broker.ping".into(),
            matchtag: tag,
            nodeid: 7,
            route,
            bytes: 10,
        }
    }

    #[test]
    fn bytes_per_link() {
        let mut p = Pending::default();
        p.insert(Link::Child(1), req(1, vec![Hop::Local(5)]));
        p.insert(Link::Child(1), req(2, vec![Hop::Local(5)]));
        p.insert(Link::Child(1), req(2, vec![Hop::Local(5)])); // same key again
        p.insert(Link::Parent, req(3, vec![Hop::Child(4)]));
        assert_eq!(p.bytes(Link::Child(1)), 20);
        assert!(p.complete(Link::Child(1), &[Hop::Local(5)], 1));
        assert_eq!(p.bytes(Link::Child(1)), 10);
        assert_eq!(p.forget_from(Hop::Child(4)), 1);
        assert_eq!(p.bytes(Link::Parent), 0);
        p.fail_link(Link::Child(1));
        assert_eq!(p.bytes(Link::Child(1)), 0);
    }

    #[test]
    fn complete_and_fail() {
        let mut p = Pending::default();
        p.insert(Link::Child(1), req(1, vec![Hop::Local(5)]));
        p.insert(Link::Child(1), req(1, vec![Hop::Local(6)])); // same tag, other client
        p.insert(Link::Child(2), req(2, vec![Hop::Local(5)]));
        p.insert(Link::Parent, req(3, vec![Hop::Child(2)]));
        assert_eq!(p.len(), 4);
        assert!(p.complete(Link::Child(1), &[Hop::Local(6)], 1));
        assert!(
            !p.complete(Link::Child(1), &[Hop::Local(6)], 1),
            "only once"
        );
        assert!(
            !p.complete(Link::Child(2), &[Hop::Local(5)], 1),
            "wrong tag"
        );
        let failed = p.fail_link(Link::Child(1));
        assert_eq!(failed, vec![req(1, vec![Hop::Local(5)])]);
        assert_eq!(p.len(), 2);
        assert_eq!(p.forget_from(Hop::Child(2)), 1);
        assert_eq!(p.len(), 1);
        assert!(p.fail_link(Link::Child(9)).is_empty());
    }

    #[test]
    fn route_key_distinguishes_order_and_kind() {
        assert_ne!(
            route_key(&[Hop::Local(1), Hop::Parent]),
            route_key(&[Hop::Parent, Hop::Local(1)])
        );
        assert_ne!(route_key(&[Hop::Child(3)]), route_key(&[Hop::Local(3)]));
        assert_eq!(route_key(&[]), route_key(&[]));
    }
}
