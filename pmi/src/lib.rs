//! PMI-1 "simple" wire protocol for Canopy.
//!
//! This is the protocol MPICH's hydra (`mpiexec`) speaks with the processes
//! it starts, over the descriptor named by `PMI_FD` (with `PMI_RANK` and
//! `PMI_SIZE` beside it). Canopy brokers use it to learn their rank and to
//! exchange bootstrap data through the job's key-value space (KVS):
//!
//! - [`wire`]: the line format, pure and without I/O;
//! - [`PmiClient`]: what a broker uses, under `mpiexec` or `canopy start`;
//! - [`PmiServer`]: the process manager side that `canopy start` runs, one
//!   thread serving every rank.
//!
//! A typical broker start-up:
//!
//! ```no_run
//! # fn main() -> Result<(), canopy_pmi::PmiError> {
//! if let Some(mut pmi) = canopy_pmi::PmiClient::from_env()? {
//!     pmi.init()?;
//!     pmi.put(&format!("uri-{}", pmi.rank()), "tcp://10.0.0.1:5000")?;
//!     pmi.barrier()?;
//!     let parent = pmi.get("uri-0")?;
//!     # let _ = parent;
//!     pmi.finalize()?;
//! }
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

pub mod client;
pub mod fuzz;
pub mod server;
pub mod wire;

pub use client::PmiClient;
pub use server::{AbortInfo, PmiEvent, PmiServer, PmiServerHandle};
pub use wire::WireError;

use thiserror::Error;

/// Errors from the PMI client and server.
#[derive(Debug, Error)]
pub enum PmiError {
    /// A line or value was malformed.
    #[error(transparent)]
    Wire(#[from] WireError),
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
