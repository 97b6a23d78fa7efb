//! The tree of a system instance: each rank's parent and children.
//!
//! By default the tree is k-ary with `bootstrap.fanout` (the numbering of
//! [`canopy_overlay::Topology`]); a host entry's `parent` key overrides the
//! default for the hosts of that entry.

/// Parents and children of every rank. Rank 0 is the root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tree {
    parents: Vec<Option<u32>>,
    /// children of rank r are `children[offsets[r]..offsets[r+1]]`, ascending.
    offsets: Vec<usize>,
    children: Vec<u32>,
    fanout: u32,
}

impl Tree {
    /// Build from a parent vector that the caller has checked: rank 0 has no
    /// parent, every other rank has one, all in range, no cycles.
    pub(crate) fn from_parents(parents: Vec<Option<u32>>, fanout: u32) -> Tree {
        let n = parents.len();
        let mut counts = vec![0usize; n + 1];
        for p in parents.iter().flatten() {
            counts[*p as usize + 1] += 1;
        }
        for i in 0..n {
            counts[i + 1] += counts[i];
        }
        let offsets = counts;
        let mut fill = offsets.clone();
        let mut children = vec![0u32; offsets[n]];
        // ranks visited in ascending order, so each child list is sorted
        for (rank, p) in parents.iter().enumerate() {
            if let Some(p) = p {
                children[fill[*p as usize]] = rank as u32;
                fill[*p as usize] += 1;
            }
        }
        Tree {
            parents,
            offsets,
            children,
            fanout,
        }
    }

    /// The k-ary default parent of `rank`.
    pub(crate) fn kary_parent(rank: u32, fanout: u32) -> Option<u32> {
        if rank == 0 {
            None
        } else {
            Some((rank - 1) / fanout)
        }
    }

    /// Number of ranks.
    pub fn size(&self) -> u32 {
        self.parents.len() as u32
    }

    /// The parent of `rank`, `None` for rank 0 or a rank out of range.
    pub fn parent(&self, rank: u32) -> Option<u32> {
        self.parents.get(rank as usize).copied().flatten()
    }

    /// The children of `rank`, ascending; empty for a leaf or out of range.
    pub fn children(&self, rank: u32) -> &[u32] {
        let r = rank as usize;
        if r >= self.parents.len() {
            return &[];
        }
        &self.children[self.offsets[r]..self.offsets[r + 1]]
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

    /// The deepest rank's depth.
    pub fn height(&self) -> u32 {
        // parents may have higher ranks than children, so memoize
        let n = self.parents.len();
        let mut depth: Vec<Option<u32>> = vec![None; n];
        let mut max = 0;
        let mut stack = Vec::new();
        for start in 0..n {
            let mut r = start;
            while depth[r].is_none() {
                match self.parents[r] {
                    None => depth[r] = Some(0),
                    Some(p) => {
                        stack.push(r);
                        r = p as usize;
                    }
                }
            }
            let mut d = depth[r].unwrap_or(0);
            while let Some(c) = stack.pop() {
                d += 1;
                depth[c] = Some(d);
            }
            max = max.max(depth[start].unwrap_or(0));
        }
        max
    }

    /// The fanout the default shape was computed with.
    pub fn fanout(&self) -> u32 {
        self.fanout
    }

    /// The overlay's topology: k-ary arithmetic when no `parent` key
    /// changed the default, else this tree's parent table.
    pub fn to_overlay(
        &self,
    ) -> Result<canopy_overlay::Topology, canopy_overlay::topology::TopologyError> {
        match self.kary() {
            Some(t) => Ok(t),
            None => canopy_overlay::Topology::custom(self.parents.clone()),
        }
    }

    /// `Some` when no `parent` key changed the k-ary default: the broker
    /// can then route with [`canopy_overlay::Topology`]'s arithmetic.
    pub fn kary(&self) -> Option<canopy_overlay::Topology> {
        let size = self.size();
        let is_kary = (0..size).all(|r| self.parent(r) == Tree::kary_parent(r, self.fanout));
        if is_kary {
            canopy_overlay::Topology::new(size, self.fanout).ok()
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kary_tree_matches_overlay() {
        let parents: Vec<Option<u32>> = (0..8).map(|r| Tree::kary_parent(r, 2)).collect();
        let t = Tree::from_parents(parents, 2);
        let o = t.kary().expect("k-ary");
        for r in 0..8 {
            assert_eq!(t.parent(r), o.parent(r));
            assert_eq!(t.children(r).to_vec(), o.children(r).collect::<Vec<_>>());
            assert_eq!(t.depth(r), o.depth(r));
        }
        assert_eq!(t.height(), 3);
        assert!(t.children(99).is_empty());
        assert_eq!(t.parent(99), None);
    }

    #[test]
    fn custom_tree_is_not_kary() {
        // 0 <- 2 <- 1, 0 <- 3
        let t = Tree::from_parents(vec![None, Some(2), Some(0), Some(0)], 2);
        assert_eq!(t.children(0), &[2, 3]);
        assert_eq!(t.children(2), &[1]);
        assert_eq!(t.depth(1), 2);
        assert_eq!(t.height(), 2);
        assert!(t.kary().is_none());
        let o = t.to_overlay().unwrap();
        assert!(!o.is_kary());
        for r in 0..4 {
            assert_eq!(t.parent(r), o.parent(r));
            assert_eq!(t.children(r).to_vec(), o.children(r).collect::<Vec<_>>());
        }
    }
}
