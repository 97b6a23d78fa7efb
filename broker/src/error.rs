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
    #[error("rank {rank}: rank {of}'s business card: {source}")]
    Card {
        rank: u32,
        of: u32,
        #[source]
        source: crate::core::CardError,
    },
    #[error("the parent's business card has no endpoint; the parent has no children in its plan: check --size and --fanout agree on every broker")]
    NoParentEndpoint,
    #[error("cannot seed the session ids from the kernel's random source: {0}")]
    Random(getrandom::Error),
    #[error("cannot list this host's network interfaces: {0}")]
    Interfaces(nix::Error),
    #[error("rank {rank}: --interface {hint}: {why}; pass --interface with an interface name (ip -br addr lists them), a CIDR such as 10.0.0.0/24, or hostname")]
    Interface {
        rank: u32,
        hint: String,
        why: NoAddress,
    },
    #[error("the overlay router's endpoint is not UTF-8")]
    EndpointNotUtf8,
    #[error("runtime directory {path} is not private to this user (owner uid {uid}, mode {mode:o}); remove it or pass --rundir")]
    RundirNotPrivate { path: PathBuf, uid: u32, mode: u32 },
    #[error("the zap handler is not running, so no peer can be authenticated; refusing to run (libzmq would admit everyone)")]
    ZapDied,
    #[error("parent rank {parent} refused this broker: {reason}")]
    HelloRefused { parent: u32, reason: String },
    /// The parent cut this broker off; `reason` is the parent's.
    #[error("{reason}")]
    Disconnected { reason: String },
    #[error("policy: {0}")]
    Acl(#[from] canopy_acl::AclError),
    #[error("audit log: {0}")]
    Audit(#[from] canopy_acl::AuditError),
    #[error("config: {0}")]
    Config(#[from] canopy_config::ConfigError),
    #[error("config: {0}")]
    Cert(#[from] canopy_security::cert::CertError),
    #[error("config: {0}")]
    Rotate(#[from] crate::rotate::RotateError),
    #[error("config: no {which} certificate is configured for rank {rank}")]
    NoCert { which: &'static str, rank: u32 },
    #[error("config: {path} has no secret key; write one with canopy keygen")]
    NoSecretKey { path: PathBuf },
    #[error("config: this host ({hostname}) is not in the [bootstrap] hosts of {config}; add it, or pass --hostname NAME")]
    HostNotInConfig { hostname: String, config: PathBuf },
    #[error("config: no {what} for rank {rank}")]
    RankLacks { rank: u32, what: &'static str },
    #[error("config: mechanism is gssapi but there is no [gssapi] table")]
    NoGssapiTable,
    #[error("config: gssapi needs tcp:// endpoints to place the key exchange; rank {rank} has {endpoint}")]
    KexNeedsTcp { rank: u32, endpoint: String },
    #[error("config: rank {rank}: port {port} + 1 is out of range; set gssapi.kex_port")]
    KexPortRange { rank: u32, port: u16 },
    #[error("config: {who} endpoint {endpoint}: the host does not resolve ({source}); fix the name in the config, DNS or /etc/hosts")]
    Unresolvable {
        who: String,
        endpoint: String,
        #[source]
        source: std::io::Error,
    },
    #[error("config: {who} endpoint {endpoint}: the host has no address; fix the name in the config, DNS or /etc/hosts")]
    NoAddress { who: String, endpoint: String },
    #[error("cannot read the hostname: {0}")]
    Hostname(nix::Error),
    #[error("refusing {what} {path}: group or other can write it (mode {mode:o}); run chmod go-w {path}")]
    WritableByOthers {
        what: &'static str,
        path: PathBuf,
        mode: u32,
    },
    #[error("{what} refused: {source}")]
    Untrusted {
        what: &'static str,
        #[source]
        source: canopy_security::trust::TrustError,
    },
    #[error("config: {from}: {message}")]
    Budget { from: String, message: String },
    #[error("gssapi: {0}")]
    Gss(#[from] canopy_gss::GssError),
    #[error("gssapi: the gssapi gate was installed twice")]
    GateInstalledTwice,
    #[error("gssapi: the gssapi gate is not installed")]
    NoGate,
    #[error("gssapi: the parent runs no key exchange; start every broker with --mechanism gssapi")]
    ParentHasNoKex,
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

/// The core decided this broker ends.
impl From<crate::core::Exit> for BrokerError {
    fn from(e: crate::core::Exit) -> BrokerError {
        use crate::core::Exit;
        match e {
            Exit::HelloRefused { parent, reason } => BrokerError::HelloRefused { parent, reason },
            Exit::Disconnected(reason) => BrokerError::Disconnected { reason },
            Exit::Shutdown { status } => BrokerError::InstanceEnded { status },
            Exit::Orphaned { parent, reason } => BrokerError::Orphaned { parent, reason },
            Exit::NoParentEndpoint => BrokerError::NoParentEndpoint,
        }
    }
}

/// Why `--interface` found no address to listen on.
#[derive(Debug, thiserror::Error)]
pub enum NoAddress {
    #[error("this host has no IPv4 default route")]
    NoDefaultRoute,
    #[error("the default route's interface {0} has no address")]
    DefaultRouteBare(String),
    #[error("no interface is called {name} on this host (it has {have})")]
    NoSuchInterface { name: String, have: String },
    #[error("interface {0} has no address")]
    InterfaceBare(String),
    #[error("no address of this host is in {0}")]
    NotInCidr(String),
    #[error("this host's name {0} does not resolve ({1})")]
    Unresolvable(String, String),
    #[error("this host's name {0} resolves only to loopback, which other hosts cannot reach")]
    OnlyLoopback(String),
}
