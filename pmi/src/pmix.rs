//! PMIx behind the [`Pmi`] trait, through `canopy_sys::pmix` (libpmix).
//!
//! PMIx reads a value by (process, key), where PMI-1 and PMI-2 have one
//! key space for the job. So [`Pmi::get`] here reads key `NAME.R` from rank
//! R, the convention every canopy key follows (`canopy.3`,
//! `canopy-host.3`); a key without a rank suffix is read from rank 0.

use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use canopy_sys::pmix::{Pmix, PmixError};

use crate::{Pmi, PmiError, PmiVersion};

/// A PMIx client (one per process).
#[derive(Debug)]
pub struct PmixClient {
    inner: Pmix,
    timeout: Option<Duration>,
    /// PMIx has no descriptor to watch for the launcher going away; this
    /// one is never readable (its peer is kept and never written).
    idle: (UnixStream, UnixStream),
}

impl PmixClient {
    /// `PMIx_Init` and the job size. `rank` (from `PMIX_RANK`) names the
    /// task in errors before PMIx knows it.
    pub fn init(rank: &str) -> Result<PmixClient, PmiError> {
        let inner = Pmix::init().map_err(|e| match e {
            PmixError::NotBuilt => PmiError::PmixOnly {
                rank: rank.trim().to_owned(),
            },
            e => PmiError::Pmix {
                rank: rank.trim().to_owned(),
                op: "init",
                detail: e.to_string(),
            },
        })?;
        let idle = UnixStream::pair().map_err(|source| PmiError::Io { op: "init", source })?;
        Ok(PmixClient {
            inner,
            timeout: None,
            idle,
        })
    }

    fn err(&self, op: &'static str, e: PmixError) -> PmiError {
        match e {
            PmixError::Timeout => PmiError::Timeout {
                rank: self.inner.rank,
                op,
                after: self.timeout.unwrap_or_default(),
            },
            e => PmiError::Pmix {
                rank: self.inner.rank.to_string(),
                op,
                detail: e.to_string(),
            },
        }
    }
}

/// The rank that put `key`: its `.R` suffix, else 0.
fn owner_of(key: &str) -> u32 {
    key.rsplit_once('.')
        .and_then(|(_, r)| r.parse().ok())
        .unwrap_or(0)
}

impl Pmi for PmixClient {
    fn version(&self) -> PmiVersion {
        PmiVersion::Pmix
    }
    fn rank(&self) -> u32 {
        self.inner.rank
    }
    fn size(&self) -> u32 {
        self.inner.size
    }
    fn job_id(&self) -> &str {
        &self.inner.nspace
    }
    fn put(&mut self, key: &str, value: &str) -> Result<(), PmiError> {
        let r = self.inner.put(key, value);
        r.map_err(|e| self.err("put", e))
    }
    fn fence(&mut self) -> Result<(), PmiError> {
        let r = self.inner.commit();
        r.map_err(|e| self.err("commit", e))?;
        let secs = self
            .timeout
            .map(|t| t.as_secs_f64().ceil().clamp(1.0, i32::MAX as f64) as i32)
            .unwrap_or(0);
        let r = self.inner.fence(secs);
        r.map_err(|e| self.err("fence", e))
    }
    fn get(&mut self, key: &str) -> Result<String, PmiError> {
        let r = self.inner.get(owner_of(key), key);
        r.map_err(|e| match e {
            PmixError::NotFound => PmiError::KeyNotFound {
                key: key.to_string(),
            },
            e => self.err("get", e),
        })
    }
    fn finalize(&mut self) -> Result<(), PmiError> {
        let r = self.inner.finalize();
        r.map_err(|e| self.err("finalize", e))
    }
    fn abort(&mut self, code: i32, msg: &str) -> Result<(), PmiError> {
        let r = self.inner.abort(code, msg);
        r.map_err(|e| self.err("abort", e))
    }
    fn set_timeout(&mut self, timeout: Option<Duration>) -> Result<(), PmiError> {
        self.timeout = timeout;
        Ok(())
    }
    fn fd(&self) -> BorrowedFd<'_> {
        self.idle.0.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_read_from_the_rank_in_their_suffix() {
        assert_eq!(owner_of("canopy.7"), 7);
        assert_eq!(owner_of("canopy-host.12"), 12);
        assert_eq!(owner_of("probe.0"), 0);
        assert_eq!(owner_of("nosuffix"), 0);
        assert_eq!(owner_of("a.b"), 0);
    }
}
