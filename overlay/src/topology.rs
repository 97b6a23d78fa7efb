//! A k-ary tree over ranks `0..size`, rooted at rank 0.
//!
//! Rank `r`'s children are `k*r+1 ..= k*r+k` (those below `size`), and its
//! parent is `(r-1)/k`. This is the same numbering flux-core uses, so a
//! size-8, fanout-2 tree has rank 7 under 3 under 1 under 0.

/// Default fanout: a binary tree, as in flux-core. It keeps each broker's
/// load to two children; deeper trees cost a hop (tens of microseconds).
pub const DEFAULT_FANOUT: u32 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Topology {
    size: u32,
    fanout: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TopologyError {
    #[error("size must be at least 1 (got {0}); pass --size N with N >= 1")]
    BadSize(u32),
    #[error("fanout must be at least 1 (got {0}); pass --fanout K with K >= 1")]
    BadFanout(u32),
}

impl Topology {
    pub fn new(size: u32, fanout: u32) -> Result<Topology, TopologyError> {
        if size == 0 {
            return Err(TopologyError::BadSize(size));
        }
        if fanout == 0 {
            return Err(TopologyError::BadFanout(fanout));
        }
        Ok(Topology { size, fanout })
    }

    pub fn size(&self) -> u32 {
        self.size
    }

    pub fn fanout(&self) -> u32 {
        self.fanout
    }

    pub fn contains(&self, rank: u32) -> bool {
        rank < self.size
    }

    pub fn parent(&self, rank: u32) -> Option<u32> {
        if rank == 0 || rank >= self.size {
            None
        } else {
            Some((rank - 1) / self.fanout)
        }
    }

    /// The children of `rank`, in order.
    pub fn children(&self, rank: u32) -> impl Iterator<Item = u32> {
        let first = (rank as u64) * (self.fanout as u64) + 1;
        let last = (first + self.fanout as u64).min(self.size as u64);
        (first..last.max(first)).map(|r| r as u32)
    }

    pub fn is_child(&self, parent: u32, child: u32) -> bool {
        self.parent(child) == Some(parent)
    }

    /// Depth of `rank`: 0 for the root.
    pub fn depth(&self, mut rank: u32) -> u32 {
        let mut d = 0;
        while let Some(p) = self.parent(rank) {
            rank = p;
            d += 1;
        }
        d
    }

    /// If `target` lies strictly below `rank`, the child of `rank` on the
    /// way to it.
    pub fn child_toward(&self, rank: u32, target: u32) -> Option<u32> {
        if target >= self.size || target <= rank {
            return None;
        }
        let mut cur = target;
        while let Some(p) = self.parent(cur) {
            if p == rank {
                return Some(cur);
            }
            if p < rank {
                return None;
            }
            cur = p;
        }
        None
    }

    /// Is `rank` in the subtree rooted at `root` (inclusive)?
    pub fn in_subtree(&self, root: u32, rank: u32) -> bool {
        rank == root || self.child_toward(root, rank).is_some()
    }

    /// All ranks of the subtree rooted at `root`, root first, breadth first.
    pub fn subtree(&self, root: u32) -> Vec<u32> {
        let mut out = vec![root];
        let mut i = 0;
        while i < out.len() {
            let r = out[i];
            out.extend(self.children(r));
            i += 1;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_tree_of_eight() {
        let t = Topology::new(8, 2).unwrap();
        assert_eq!(t.children(0).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(t.children(3).collect::<Vec<_>>(), vec![7]);
        assert_eq!(t.children(4).count(), 0);
        assert_eq!(t.parent(7), Some(3));
        assert_eq!(t.parent(3), Some(1));
        assert_eq!(t.parent(0), None);
        assert_eq!(t.depth(7), 3);
        assert_eq!(t.child_toward(0, 7), Some(1));
        assert_eq!(t.child_toward(1, 7), Some(3));
        assert_eq!(t.child_toward(3, 7), Some(7));
        assert_eq!(t.child_toward(2, 7), None);
        assert_eq!(t.child_toward(7, 7), None);
        assert_eq!(t.child_toward(0, 8), None);
        assert_eq!(t.subtree(1), vec![1, 3, 4, 7]);
        assert!(t.in_subtree(1, 7));
        assert!(!t.in_subtree(2, 7));
    }

    #[test]
    fn child_toward_agrees_with_parent_chain() {
        for k in 1..5 {
            let t = Topology::new(100, k).unwrap();
            for r in 0..100 {
                for target in 0..100 {
                    let expect = {
                        let mut cur = target;
                        let mut found = None;
                        while let Some(p) = t.parent(cur) {
                            if p == r {
                                found = Some(cur);
                                break;
                            }
                            cur = p;
                        }
                        found
                    };
                    assert_eq!(t.child_toward(r, target), expect, "k={k} r={r} t={target}");
                }
            }
        }
    }

    #[test]
    fn rejects_zero() {
        assert_eq!(Topology::new(0, 2), Err(TopologyError::BadSize(0)));
        assert_eq!(Topology::new(4, 0), Err(TopologyError::BadFanout(0)));
        let t = Topology::new(1, 2).unwrap();
        assert_eq!(t.children(0).count(), 0);
        let big = Topology::new(u32::MAX, u32::MAX).unwrap();
        assert_eq!(big.children(5).count(), 0);
    }
}
