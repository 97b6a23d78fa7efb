//! PMI for Canopy: the wire protocols a launcher speaks with the processes
//! it starts, so that brokers learn their rank and exchange bootstrap data
//! through the job's key-value space (KVS).
//!
//! - PMI-1 "simple", spoken by MPICH's hydra (`mpiexec`) and by
//!   `canopy start`: [`wire`] (the line format, pure), [`PmiClient`], and
//!   [`PmiServer`], the process manager side that `canopy start` runs;
//! - PMI-2, spoken natively by `srun --mpi=pmi2`: [`wire2`] (the framed
//!   format, pure) and [`Pmi2Client`];
//! - PMIx, spoken by `srun --mpi=pmix`: [`PmixClient`], through libpmix
//!   (`canopy_sys::pmix`; without libpmix at build time it says so);
//! - [`Pmi`], the one interface the clients offer, and [`from_env`], which
//!   picks the protocol the launcher offers (see there for how).
//!
//! A typical broker start-up:
//!
//! ```no_run
//! # fn main() -> Result<(), canopy_pmi::PmiError> {
//! if let Some(mut pmi) = canopy_pmi::from_env()? {
//!     pmi.put(&format!("uri-{}", pmi.rank()), "tcp://10.0.0.1:5000")?;
//!     pmi.fence()?;
//!     let parent = pmi.get("uri-0")?;
//!     # let _ = parent;
//!     pmi.finalize()?;
//! }
//! # Ok(()) }
//! ```
//!
//! [`PmiClient`] keeps its own API for existing callers
//! (`PmiClient::from_env`, then `init`, `put`, `barrier`, `get`, ...).
#![forbid(unsafe_code)]

pub mod client;
pub mod client2;
pub mod fuzz;
pub mod pmix;
pub mod select;
pub mod server;
pub mod wire;
pub mod wire2;

pub use client::PmiClient;
pub use client2::Pmi2Client;
pub use pmix::PmixClient;
pub use select::{from_env, version_from_env, Pmi, PmiVersion, DEFAULT_TIMEOUT};
pub use server::{AbortInfo, PmiEvent, PmiServer, PmiServerHandle};
pub use wire::WireError;
pub use wire2::Wire2Error;

use thiserror::Error;

/// Errors from the PMI client and server.
#[derive(Debug, Error)]
pub enum PmiError {
    /// A line or value was malformed.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// A PMI-2 key or value could not be sent.
    #[error(transparent)]
    Wire2(#[from] Wire2Error),
    /// The process manager answered with something that is not the
    /// protocol (through [`Pmi`] and [`Pmi2Client`]).
    #[error("rank {rank}: the pmi-{version} server answered garbage ({detail}); check that PMI_FD comes from a launcher that speaks pmi-{version} (pmi-2: srun --mpi=pmi2; pmi-1: mpiexec or canopy start), or choose the protocol with CANOPY_PMI=1 or CANOPY_PMI=2")]
    Garbage {
        rank: u32,
        version: u8,
        detail: String,
    },
    /// A call (usually a fence) got no answer in time.
    #[error("rank {rank}: pmi `{op}` got no answer within {after:?}; some rank never reached it (it died, hangs, or was never started: check that the job started PMI_SIZE tasks and read the other tasks' errors), or raise CANOPY_PMI_TIMEOUT (seconds, 0 waits forever)")]
    Timeout {
        rank: u32,
        op: &'static str,
        after: std::time::Duration,
    },
    /// The process manager refused PMI-2.
    #[error("rank {rank}: the process manager refused pmi 2.0 (rc={rc}, it speaks {pmi_version}.{pmi_subversion}); set CANOPY_PMI=1 to use pmi-1 with it")]
    Pmi2Refused {
        rank: u32,
        rc: i32,
        pmi_version: u32,
        pmi_subversion: u32,
    },
    /// `srun` started this task among several, but offered no PMI.
    #[error("rank {rank} of {size}: srun started this task without a pmi (PMI_FD is not set), so the tasks cannot find each other; run `srun --mpi=pmi2 ...` (or set MpiDefault=pmi2 in slurm.conf)")]
    NoPmi { rank: String, size: u32 },
    /// The launcher offers only PMIx, and this build has no libpmix.
    #[error("rank {rank}: the launcher offers only pmix (PMIX_RANK is set, PMI_FD is not), and this canopy was built without libpmix; install libpmix-dev and rebuild canopy, or run `srun --mpi=pmi2 ...` instead")]
    PmixOnly { rank: String },
    /// A PMIx call failed.
    #[error("rank {rank}: pmix `{op}` failed: {detail}; check that the launcher's pmix server is running (srun --mpi=pmix), or run `srun --mpi=pmi2 ...` instead")]
    Pmix {
        rank: String,
        op: &'static str,
        detail: String,
    },
    /// A canopy setting in the environment is malformed.
    #[error("{var}={value} is not usable; {fix}")]
    BadSetting {
        var: &'static str,
        value: String,
        fix: &'static str,
    },
    /// A PMI environment variable is missing or malformed.
    #[error("{var}={value} is not usable: {reason}; start the broker from `canopy start` or a PMI launcher such as mpiexec")]
    Env {
        var: &'static str,
        value: String,
        reason: &'static str,
    },
    /// `PMI_FD` does not name a usable inherited descriptor.
    #[error("PMI_FD={value} is not usable: {source}")]
    Fd {
        value: String,
        #[source]
        source: std::io::Error,
    },
    /// `from_env` already took `PMI_FD` in this process.
    #[error(
        "PMI_FD was already taken by this process; create one PmiClient with from_env and keep it"
    )]
    AlreadyTaken,
    /// The process manager closed the connection.
    #[error("the process manager closed the pmi connection during `{op}`; the job is being torn down or the launcher died, so exit")]
    Closed { op: &'static str },
    /// Reading or writing the connection failed.
    #[error("pmi i/o failed during `{op}`: {source}; check that the launcher is still running")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The process manager sent a line longer than [`wire::MAX_LINE`].
    #[error("the process manager sent a pmi line longer than {max} bytes; check that PMI_FD really is a PMI-1 connection")]
    LineTooLong { max: usize },
    /// The process manager sent bytes that are not UTF-8.
    #[error("the process manager sent a pmi line that is not utf-8; check that PMI_FD really is a PMI-1 connection")]
    NotUtf8,
    /// The process manager answered with the wrong command.
    #[error("expected `cmd={expected}` from the process manager but got `{got}`; use a PMI-1 launcher (mpich's mpiexec or `canopy start`)")]
    Unexpected { expected: &'static str, got: String },
    /// The process manager refused PMI version 1.1.
    #[error("the process manager refused pmi 1.1 (rc={rc}, it speaks {pmi_version}.{pmi_subversion}); use a PMI-1 launcher (mpich's mpiexec or `canopy start`)")]
    VersionMismatch {
        rc: i32,
        pmi_version: u32,
        pmi_subversion: u32,
    },
    /// `get` of a key that no rank has put.
    #[error("pmi key `{key}` is not in the job's kvs; make sure the rank that puts it does so before the barrier that precedes this get")]
    KeyNotFound { key: String },
    /// The process manager reported a failure.
    #[error("the process manager rejected `{cmd}` (rc={rc}, {msg}); check the key and value and the launcher's log")]
    Failed {
        cmd: &'static str,
        rc: i32,
        msg: String,
    },
    /// A call that needs [`PmiClient::init`] came before it.
    #[error("pmi `{op}` called before init; call PmiClient::init first")]
    NotInitialized { op: &'static str },
    /// A call came after [`PmiClient::finalize`].
    #[error("pmi `{op}` called after finalize; finalize only once, at the end")]
    Finalized { op: &'static str },
    /// [`PmiServer::new`] was asked for zero ranks.
    #[error("a pmi job needs at least one rank; pass a size of 1 or more")]
    ZeroSize,
    /// Creating a rank's socketpair failed (usually too many open files).
    #[error("cannot create the pmi socketpair for rank {rank}: {source}; raise the open-file limit (ulimit -n) or start fewer ranks")]
    Socketpair {
        rank: u32,
        #[source]
        source: std::io::Error,
    },
    /// Starting the server thread failed.
    #[error("cannot start the pmi server thread: {0}; check the process's thread and file limits")]
    Spawn(#[source] std::io::Error),
}
