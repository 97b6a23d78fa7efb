use std::path::PathBuf;

/// Why a broker could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("this libzmq lacks {0}; install Debian's libzmq3-dev (built with libsodium and GSSAPI) and rebuild, see README.md")]
    Libzmq(&'static str),
    #[error("zeromq: {what}: {source}")]
    Zmq {
        what: String,
        #[source]
        source: zmq::Error,
    },
    #[error(
        "cannot bind {endpoint}: {reason}; choose another --port, or stop the process using it"
    )]
    Bind { endpoint: String, reason: String },
    #[error("cannot {what} at {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pmi: {0}")]
    Pmi(#[from] canopy_pmi::PmiError),
    #[error("zap: {0}")]
    Zap(#[from] canopy_zap::ZapError),
    #[error("keys: {0}")]
    Key(#[from] canopy_security::KeyError),
    #[error("{0}")]
    Topology(#[from] canopy_overlay::topology::TopologyError),
    #[error("bootstrap: {0}")]
    Bootstrap(String),
    #[error("the zap handler is not running, so no peer can be authenticated; refusing to run (libzmq would admit everyone)")]
    ZapDied,
    #[error("parent rank {parent} refused this broker: {reason}")]
    HelloRefused { parent: u32, reason: String },
    #[error("{0}")]
    Disconnected(String),
    #[error("policy: {0}")]
    Policy(String),
    #[error("config: {0}")]
    Config(String),
    #[error("gssapi: {0}")]
    Gss(String),
    #[error("refusing to run as root: run the broker as its own service user (see etc/canopy.service), or pass --force-root")]
    Root,
    /// Launcher mode: the instance ended with `instance.shutdown`; not a
    /// failure, the process exits with `status`.
    #[error("the instance ended (its command exited with status {status})")]
    InstanceEnded { status: i32 },
    #[error("lost the link to parent rank {parent} ({reason}); under a launcher no broker is restarted, so this one exits too: see rank {parent}'s error for the cause")]
    Orphaned { parent: u32, reason: String },
    #[error(
        "the launcher went away (its PMI connection closed); exiting so no broker is left behind"
    )]
    LauncherGone,
}

impl BrokerError {
    /// The launcher went away (or closed PMI because the start failed):
    /// nothing to report, the launcher reports the cause.
    pub fn launcher_gone(&self) -> bool {
        matches!(
            self,
            BrokerError::LauncherGone | BrokerError::Pmi(canopy_pmi::PmiError::Closed { .. })
        )
    }
}
