//! A tree over ranks `0..size`, rooted at rank 0.
//!
//! By default it is k-ary: rank `r`'s children are `k*r+1 ..= k*r+k` (those
//! below `size`), and its parent is `(r-1)/k`. This is the same numbering
//! flux-core uses, so a size-8, fanout-2 tree has rank 7 under 3 under 1
//! under 0. [`Topology::custom`] takes any parent table instead (a system
//! instance's `parent` overrides); its tables are allocated once and never
//! freed, so that a `Topology` stays `Copy` (a broker builds one per run).

/// Default fanout: a binary tree, as in flux-core. It keeps each broker's
/// load to two children; deeper trees cost a hop (tens of microseconds).
pub const DEFAULT_FANOUT: u32 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Topology {
    size: u32,
    fanout: u32,
    /// A parent table, if not k-ary.
    custom: Option<&'static Custom>,
}

/// Parents and children of a tree that is not k-ary.
#[derive(Debug, PartialEq, Eq)]
struct Custom {
    parents: Vec<Option<u32>>,
    /// Children of rank r: `children[offsets[r]..offsets[r+1]]`, ascending.
    offsets: Vec<usize>,
    children: Vec<u32>,
}

/// The children of a rank.
#[derive(Clone, Debug)]
pub enum Children {
    Range(std::ops::Range<u64>),
    Slice(std::slice::Iter<'static, u32>),
}

impl Iterator for Children {
    type Item = u32;
    fn next(&mut self) -> Option<u32> {
        match self {
            Children::Range(r) => r.next().map(|r| r as u32),
            Children::Slice(s) => s.next().copied(),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TopologyError {
    #[error("size must be at least 1 (got {0}); pass --size N with N >= 1")]
    BadSize(u32),
    #[error("fanout must be at least 1 (got {0}); pass --fanout K with K >= 1")]
    BadFanout(u32),
    #[error("bad tree: {0}")]
    BadTree(String),
}

impl Topology {
    pub fn new(size: u32, fanout: u32) -> Result<Topology, TopologyError> {
        if size == 0 {
            return Err(TopologyError::BadSize(size));
        }
        if fanout == 0 {
            return Err(TopologyError::BadFanout(fanout));
        }
        Ok(Topology {
            size,
            fanout,
            custom: None,
        })
    }

    /// A tree given by each rank's parent: rank 0 has none, every other
    /// rank's parent is in range, and every chain of parents ends at 0.
    /// Its `fanout` is the largest number of children of any rank.
    pub fn custom(parents: Vec<Option<u32>>) -> Result<Topology, TopologyError> {
        let n = parents.len();
        if n == 0 {
            return Err(TopologyError::BadSize(0));
        }
        let size = u32::try_from(n).map_err(|_| TopologyError::BadSize(u32::MAX))?;
        if parents[0].is_some() {
            return Err(TopologyError::BadTree("rank 0 cannot have a parent".into()));
        }
        for (r, p) in parents.iter().enumerate().skip(1) {
            match p {
                None => return Err(TopologyError::BadTree(format!("rank {r} has no parent"))),
                Some(p) if *p >= size => {
                    return Err(TopologyError::BadTree(format!(
                        "rank {r}'s parent {p} is not a rank of this tree of size {size}"
                    )))
                }
                Some(_) => {}
            }
        }
        // Every chain ends at 0 within n steps, or there is a cycle.
        let mut depth: Vec<Option<u32>> = vec![None; n];
        depth[0] = Some(0);
        for start in 1..n {
            let mut chain = Vec::new();
            let mut r = start;
            while depth[r].is_none() {
                if chain.len() > n {
                    return Err(TopologyError::BadTree(format!(
                        "the parents of rank {start} form a cycle"
                    )));
                }
                chain.push(r);
                r = parents[r].map_or(0, |p| p as usize);
            }
            let mut d = depth[r].unwrap_or(0);
            while let Some(c) = chain.pop() {
                d += 1;
                depth[c] = Some(d);
            }
        }
        let mut offsets = vec![0usize; n + 1];
        for p in parents.iter().flatten() {
            offsets[*p as usize + 1] += 1;
        }
        let fanout = offsets.iter().copied().max().unwrap_or(0).max(1) as u32;
        for i in 0..n {
            offsets[i + 1] += offsets[i];
        }
        let mut fill = offsets.clone();
        let mut children = vec![0u32; n - 1];
        for (r, p) in parents.iter().enumerate() {
            if let Some(p) = p {
                children[fill[*p as usize]] = r as u32;
                fill[*p as usize] += 1;
            }
        }
        let custom: &'static Custom = Box::leak(Box::new(Custom {
            parents,
            offsets,
            children,
        }));
        Ok(Topology {
            size,
            fanout,
            custom: Some(custom),
        })
    }

    /// Whether this tree is k-ary (not [`Topology::custom`]).
    pub fn is_kary(&self) -> bool {
        self.custom.is_none()
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
        if let Some(c) = self.custom {
            return c.parents.get(rank as usize).copied().flatten();
        }
        if rank == 0 || rank >= self.size {
            None
        } else {
            Some((rank - 1) / self.fanout)
        }
    }

    /// The children of `rank`, in order.
    pub fn children(&self, rank: u32) -> Children {
        if let Some(c) = self.custom {
            let r = rank as usize;
            if r >= c.parents.len() {
                return Children::Slice([].iter());
            }
            return Children::Slice(c.children[c.offsets[r]..c.offsets[r + 1]].iter());
        }
        let first = (rank as u64) * (self.fanout as u64) + 1;
        let last = (first + self.fanout as u64).min(self.size as u64);
        Children::Range(first..last.max(first))
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
        if target >= self.size || target == rank || (target < rank && self.custom.is_none()) {
            return None;
        }
        let mut cur = target;
        while let Some(p) = self.parent(cur) {
            if p == rank {
                return Some(cur);
            }
            // In a k-ary tree parents have lower ranks than children.
            if p < rank && self.custom.is_none() {
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
    fn custom_tree_with_a_parent_of_higher_rank() {
        // 0 <- 3 <- 1 <- 2, 0 <- 4
        let t = Topology::custom(vec![None, Some(3), Some(1), Some(0), Some(0)]).unwrap();
        assert!(!t.is_kary());
        assert_eq!(t.size(), 5);
        assert_eq!(t.fanout(), 2);
        assert_eq!(t.children(0).collect::<Vec<_>>(), vec![3, 4]);
        assert_eq!(t.children(3).collect::<Vec<_>>(), vec![1]);
        assert_eq!(t.children(2).count(), 0);
        assert_eq!(t.children(99).count(), 0);
        assert_eq!(t.parent(1), Some(3));
        assert_eq!(t.parent(0), None);
        assert_eq!(t.depth(2), 3);
        assert_eq!(t.child_toward(0, 2), Some(3));
        assert_eq!(t.child_toward(3, 2), Some(1));
        assert_eq!(t.child_toward(1, 2), Some(2));
        assert_eq!(t.child_toward(4, 2), None);
        assert_eq!(t.child_toward(2, 1), None);
        assert_eq!(t.subtree(3), vec![3, 1, 2]);
        assert!(t.in_subtree(3, 2) && !t.in_subtree(4, 2));
        assert!(t.is_child(1, 2) && !t.is_child(0, 1));
        // Routing agrees with the parent chain, as for k-ary trees.
        for r in 0..5 {
            for target in 0..5 {
                let mut cur = target;
                let mut found = None;
                while let Some(p) = t.parent(cur) {
                    if p == r {
                        found = Some(cur);
                        break;
                    }
                    cur = p;
                }
                assert_eq!(t.child_toward(r, target), found, "r={r} t={target}");
            }
        }
        let k = Topology::new(5, 2).unwrap();
        assert!(k.is_kary() && k != t);
    }

    #[test]
    fn custom_trees_are_checked() {
        let bad = |p: Vec<Option<u32>>| Topology::custom(p).unwrap_err().to_string();
        assert!(bad(vec![]).contains("size"));
        assert!(bad(vec![Some(0)]).contains("rank 0"));
        assert!(bad(vec![None, None]).contains("rank 1 has no parent"));
        assert!(bad(vec![None, Some(7)]).contains("not a rank"));
        assert!(bad(vec![None, Some(2), Some(1)]).contains("cycle"));
        assert!(bad(vec![None, Some(1)]).contains("cycle"));
        assert_eq!(Topology::custom(vec![None]).unwrap().children(0).count(), 0);
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
