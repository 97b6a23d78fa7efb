//! A map keyed by small integers the broker hands out or bounds (client
//! ids, ranks, uids, matchtags) with a multiply-shift hash instead of
//! SipHash: the routing loop looks these up several times per message.
//! Keys an attacker picks (a client's matchtags) are bounded in number by
//! the client's requests-in-flight budget, so collisions cost at most that.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

#[derive(Default, Clone, Copy)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .rotate_left(29);
    }
}

/// `HashMap` with [`IdHasher`].
pub type IdMap<K, V> = HashMap<K, V, BuildHasherDefault<IdHasher>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_small_keys() {
        let mut m: IdMap<u32, u32> = IdMap::default();
        for i in 0..10_000 {
            m.insert(i, i);
        }
        assert!((0..10_000).all(|i| m[&i] == i));
        let h = |n: u32| {
            let mut s = IdHasher::default();
            s.write_u32(n);
            s.finish()
        };
        assert_ne!(h(1) >> 57, h(2) >> 57, "top bits (hashbrown's tag) differ");
    }
}
