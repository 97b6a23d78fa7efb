//! The replay cache: every nonce the helper accepted, until its request
//! expires.
//!
//! On disk it is one directory (root-owned, not writable by group or
//! other, checked with [`canopy_security::trust`]); each accepted request
//! is a file named by [`replay_key`] (64 hex digits), created with
//! `O_CREAT | O_EXCL` (so two helpers racing on the same request cannot
//! both win) and holding the request's `not_after` in decimal. It survives
//! restarts. Entries whose expiry is more than [`PRUNE_MARGIN`] seconds in
//! the past are removed on each insert, so the cache holds at most the
//! requests of the last `max_request_lifetime` (+ margin) seconds: bounded
//! by lifetime × rate. A request past its `not_after` is refused by the
//! expiry check before the cache is consulted.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use canopy_security::trust::{check_trusted, TrustError, TrustKind};
use sha2::{Digest, Sha256};

use crate::envelope::{hex, is_hex, UnixTime};

/// Seconds an entry is kept past its expiry (clock steps backwards).
pub const PRUNE_MARGIN: u64 = 300;
/// An entry whose content cannot be read (a crash between create and
/// write) is removed once its mtime is this old.
pub const UNREADABLE_ENTRY_AGE: u64 = 2 * 3600;

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("replayed request: its nonce was already used on this node; sign a new request (every request carries a fresh nonce)")]
    Replayed,
    #[error(
        "replay cache {path}: {source}; check that the directory exists and is writable by root"
    )]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("replay cache refused: {0}")]
    Untrusted(#[from] TrustError),
}

/// Where accepted nonces are remembered.
pub trait ReplayCache {
    /// Record `key` until `expiry`; [`ReplayError::Replayed`] if it is
    /// already there.
    fn insert(&mut self, key: &str, expiry: UnixTime, now: UnixTime) -> Result<(), ReplayError>;
}

/// The cache key of a request on one rank: SHA-256 over the principal, the
/// nonce, the instance and the rank (NUL-separated), so that two ranks of
/// one instance on the same node may each run a request once, and users
/// cannot use up each other's nonces.
pub fn replay_key(principal: &str, nonce: &str, instance: &str, rank: u32) -> String {
    let mut h = Sha256::new();
    for part in [principal, nonce, instance, &rank.to_string()] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    hex(&h.finalize())
}

/// An in-memory cache (tests).
#[derive(Default, Debug)]
pub struct MemoryReplayCache {
    pub entries: HashMap<String, UnixTime>,
}

impl ReplayCache for MemoryReplayCache {
    fn insert(&mut self, key: &str, expiry: UnixTime, now: UnixTime) -> Result<(), ReplayError> {
        self.entries
            .retain(|_, e| e.saturating_add(PRUNE_MARGIN) >= now);
        if self.entries.contains_key(key) {
            return Err(ReplayError::Replayed);
        }
        self.entries.insert(key.to_owned(), expiry);
        Ok(())
    }
}

/// The on-disk cache.
#[derive(Debug)]
pub struct DirReplayCache {
    dir: PathBuf,
}

impl DirReplayCache {
    /// Open the cache directory, refusing it unless it is owned by root or
    /// `owner_uid` and not writable by group or other (and so for every
    /// directory above it).
    pub fn open(dir: &Path, owner_uid: u32) -> Result<DirReplayCache, ReplayError> {
        let t = check_trusted(dir, TrustKind::Directory, owner_uid)?;
        Ok(DirReplayCache { dir: t.canonical })
    }

    fn io(&self, path: &Path) -> impl FnOnce(std::io::Error) -> ReplayError + '_ {
        let path = path.to_owned();
        move |source| ReplayError::Io { path, source }
    }

    /// Remove the entries that expired more than [`PRUNE_MARGIN`] ago.
    pub fn prune(&self, now: UnixTime) -> Result<usize, ReplayError> {
        let mut removed = 0;
        for e in std::fs::read_dir(&self.dir).map_err(self.io(&self.dir))? {
            let e = e.map_err(self.io(&self.dir))?;
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            if !is_hex(name, 64) {
                continue;
            }
            let path = e.path();
            let stale = match std::fs::read_to_string(&path)
                .ok()
                .and_then(|t| t.trim().parse::<u64>().ok())
            {
                Some(expiry) => expiry.saturating_add(PRUNE_MARGIN) < now,
                None => e.metadata().is_ok_and(|m| {
                    (m.mtime().max(0) as u64).saturating_add(UNREADABLE_ENTRY_AGE) < now
                }),
            };
            if stale && std::fs::remove_file(&path).is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }
}

impl ReplayCache for DirReplayCache {
    fn insert(&mut self, key: &str, expiry: UnixTime, now: UnixTime) -> Result<(), ReplayError> {
        assert!(is_hex(key, 64), "replay keys are sha-256 hex");
        self.prune(now)?;
        let path = self.dir.join(key);
        let flags = nix::fcntl::OFlag::O_NOFOLLOW.bits() | nix::fcntl::OFlag::O_CLOEXEC.bits();
        let mut f = match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(flags)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(ReplayError::Replayed)
            }
            Err(e) => return Err(self.io(&path)(e)),
        };
        writeln!(f, "{expiry}")
            .and_then(|_| f.sync_all())
            .map_err(self.io(&path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn me() -> u32 {
        nix::unistd::geteuid().as_raw()
    }

    #[test]
    fn a_nonce_is_refused_twice_even_after_reopening_until_pruned() {
        let d = tempfile::tempdir().unwrap();
        let k = replay_key("alice@R", "00112233445566778899aabbccddeeff", "sys", 0);
        let mut c = DirReplayCache::open(d.path(), me()).unwrap();
        c.insert(&k, 1000, 900).unwrap();
        assert!(matches!(
            c.insert(&k, 1000, 901),
            Err(ReplayError::Replayed)
        ));
        // Survives a restart.
        let mut c = DirReplayCache::open(d.path(), me()).unwrap();
        assert!(matches!(
            c.insert(&k, 1000, 950),
            Err(ReplayError::Replayed)
        ));
        // Another rank, instance or principal is another entry.
        let k1 = replay_key("alice@R", "00112233445566778899aabbccddeeff", "sys", 1);
        let k2 = replay_key("bob@R", "00112233445566778899aabbccddeeff", "sys", 0);
        assert_ne!(k, k1);
        c.insert(&k1, 1000, 950).unwrap();
        c.insert(&k2, 1000, 950).unwrap();
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 3);
        // Still kept within the margin, pruned after it.
        assert_eq!(c.prune(1000 + PRUNE_MARGIN).unwrap(), 0);
        assert_eq!(c.prune(1001 + PRUNE_MARGIN).unwrap(), 3);
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }

    #[test]
    fn an_untrusted_directory_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let open = d.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = DirReplayCache::open(&open, me()).unwrap_err();
        assert!(
            err.to_string().contains("writable by group or other"),
            "{err}"
        );
    }

    #[test]
    fn the_memory_cache_behaves_alike() {
        let mut c = MemoryReplayCache::default();
        c.insert("a", 10, 5).unwrap();
        assert!(matches!(c.insert("a", 10, 6), Err(ReplayError::Replayed)));
        c.insert("b", 10, 11 + PRUNE_MARGIN).unwrap();
        assert!(!c.entries.contains_key("a"));
    }
}
