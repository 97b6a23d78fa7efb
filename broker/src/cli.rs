//! The command line: every subcommand and flag of `canopy`, as clap
//! definitions only (no behaviour), so that `canopy generate-manual` can
//! render man pages and shell completions from them.

use crate::broker_cmd::BROKER_ABOUT;
pub(crate) use crate::broker_cmd::{BrokerArgs, BudgetArgs, GssArgs, TimingArgs};
use canopy_overlay::topology::DEFAULT_FANOUT;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// Canopy: a secure overlay broker for HPC clusters.
#[derive(Parser)]
#[command(
    name = "canopy",
    version = env!("CANOPY_LONG_VERSION"),
    about,
    long_about = "Canopy: a secure overlay broker for HPC clusters. One broker runs per \
node; the brokers connect in a tree over ZeroMQ, every link authenticated and encrypted \
with CURVE (or with keys bound to Kerberos principals). `canopy start` runs a personal \
instance on this machine; `canopy broker --config` runs one node of a system instance \
(canopy.toml(5)); the other subcommands are tools that talk to a running instance.",
    after_long_help = "Environment:\n\n\
CANOPY_URI: the instance the tools talk to, local://PATH or tcp://HOST:PORT.\n\n\
CANOPY_KEY, CANOPY_SERVER_KEY: over tcp://, your secret certificate and the broker's public key.\n\n\
CANOPY_KEX, CANOPY_GSS_TARGET, CANOPY_GSS_PRINCIPAL: over tcp:// with Kerberos.\n\n\
CANOPY_CONFIG: the system-instance config (canopy key).\n\n\
CANOPY_HOSTNAME: this node's name in the config (canopy broker --config).\n\n\
RUST_LOG: the log filter for stderr (default warn); when stderr is the journal, \
each line starts with its priority (<3> error ... <7> debug).\n\n\
Documentation: /usr/share/doc/canopy; the config file: canopy.toml(5)."
)]
pub(crate) struct Cli {
    /// Tools over tcp://: your secret certificate (or set CANOPY_KEY).
    #[arg(long, global = true, value_name = "FILE")]
    pub(crate) key: Option<PathBuf>,
    /// Tools over tcp://: the broker's public key, 40 Z85 characters or a
    /// certificate file (or set CANOPY_SERVER_KEY).
    #[arg(long, global = true, value_name = "KEY")]
    pub(crate) server_key: Option<String>,
    /// Tools over tcp:// with Kerberos: the broker's key exchange HOST:PORT
    /// (or set CANOPY_KEX; `canopy start --mechanism gssapi` prints it).
    #[arg(long, global = true, value_name = "HOST:PORT")]
    pub(crate) kex: Option<String>,
    /// Tools over tcp:// with Kerberos: the broker's principal (or set
    /// CANOPY_GSS_TARGET).
    #[arg(long, global = true, value_name = "PRINCIPAL")]
    pub(crate) gss_target: Option<String>,
    /// Tools over tcp:// with Kerberos: your principal (or set
    /// CANOPY_GSS_PRINCIPAL; default: your credential cache's).
    #[arg(long, global = true, value_name = "PRINCIPAL")]
    pub(crate) gss_principal: Option<String>,
    #[command(subcommand)]
    pub(crate) cmd: Cmd,
}

#[derive(Subcommand)]
pub(crate) enum Cmd {
    /// Start a personal instance of SIZE brokers on this machine, run
    /// COMMAND in it (or wait for Ctrl-C), then shut it down.
    Start {
        /// Number of brokers (default 1). Under a launcher (srun, mpiexec)
        /// each task is one broker; --size, if given, must match.
        #[arg(long, short = 's')]
        size: Option<u32>,
        /// Under a launcher: the address each broker listens on, from
        /// default-route, hostname, an interface name (eth0) or a CIDR
        /// (10.0.0.0/24). Brokers on one host still use ipc.
        #[arg(long, value_name = "HINT", default_value = "default-route")]
        interface: canopy_broker::iface::Hint,
        /// Children per broker in the tree.
        #[arg(long, short = 'k', default_value_t = DEFAULT_FANOUT)]
        fanout: u32,
        /// Connect brokers over TCP on 127.0.0.1 instead of ipc sockets.
        #[arg(long)]
        tcp: bool,
        /// With --tcp: rank R listens on PORT+R (default: any free port).
        #[arg(long, default_value_t = 0, requires = "tcp")]
        port: u16,
        /// Directory in which to create the private runtime directory
        /// (default: $XDG_RUNTIME_DIR, else the temp dir).
        #[arg(long)]
        rundir: Option<PathBuf>,
        /// Broker executable (default: this canopy binary).
        #[arg(long, env = "CANOPY_BROKER", hide = true)]
        broker_path: Option<PathBuf>,
        /// How long to wait for every broker to come online, in seconds.
        #[arg(long, default_value_t = 60.0)]
        timeout: f64,
        /// Also accept remote clients (CURVE) at rank 0 on this endpoint,
        /// e.g. tcp://0.0.0.0:7700.
        #[arg(long)]
        listen_clients: Option<String>,
        /// Keep running, degraded, when a broker other than rank 0 dies
        /// (default: end the instance and report the rank).
        #[arg(long)]
        keep_going: bool,
        /// Let PRINCIPAL in with ROLE (repeatable), e.g.
        /// --allow unix:bob=user --allow curve:<Z85>=operator. The owner
        /// is always let in as owner.
        #[arg(
            long = "allow",
            value_name = "PRINCIPAL=ROLE",
            conflicts_with = "policy"
        )]
        allow: Vec<String>,
        /// ACL policy file for clients other than the owner.
        #[arg(long)]
        policy: Option<PathBuf>,
        /// Append every access decision to this hash-chained audit log
        /// (rank R > 0 uses PATH.R).
        #[arg(long)]
        audit: Option<PathBuf>,
        #[command(flatten)]
        timing: TimingArgs,
        #[command(flatten)]
        gss: GssArgs,
        #[command(flatten)]
        budgets: BudgetArgs,
        /// Command to run inside the instance; CANOPY_URI is set for it.
        #[arg(last = true)]
        command: Vec<String>,
    },
    #[command(about = BROKER_ABOUT)]
    Broker(BrokerArgs),
    /// Send broker.ping requests and print each round-trip time.
    Ping {
        /// Target rank (default: the local broker).
        #[arg(long, short = 'r')]
        rank: Option<u32>,
        #[arg(long, short = 'c', default_value_t = 4)]
        count: u32,
        /// Payload size in bytes.
        #[arg(long, short = 'p', default_value_t = 0)]
        pad: usize,
        /// Seconds between requests.
        #[arg(long, short = 'i', default_value_t = 0.0)]
        interval: f64,
        /// Seconds to wait for each reply.
        #[arg(long, default_value_t = 10.0)]
        timeout: f64,
        #[arg(long)]
        uri: Option<String>,
    },
    /// Call any service method (built-in or offered by a client) and print
    /// the response's payload; an error response prints its message and
    /// exits non-zero.
    Rpc {
        /// The method, e.g. `kvs.get` or `broker.ping`.
        topic: String,
        /// The request's payload (default: empty; `-` reads standard input).
        payload: Option<String>,
        /// Target rank (default: the nearest broker offering the topic).
        #[arg(long, short = 'r')]
        rank: Option<u32>,
        /// Seconds to wait for the response.
        #[arg(long, default_value_t = 10.0)]
        timeout: f64,
        #[arg(long)]
        uri: Option<String>,
    },
    /// Run a command on ranks of the instance, fanned out down the tree:
    /// output streams back live (stdout and stderr apart), the exit status
    /// is the highest of the ranks', a rank that could not run it is named
    /// with the reason. Ctrl-C sends SIGINT, a second one SIGKILL, a third
    /// stops waiting. In a personal instance only the owner may; in a
    /// system instance the command runs as you through the canopy-imp
    /// helper, from a request you sign (docs/imp.md).
    Exec {
        /// Target ranks: `all`, or a set like `0-3,7`.
        #[arg(long, short = 'r', default_value = "all")]
        ranks: String,
        /// Prefix each output line with its rank.
        #[arg(long)]
        label_io: bool,
        /// Working directory on every rank (default: the current one).
        #[arg(long)]
        dir: Option<String>,
        /// Set an environment variable for the command (repeatable).
        #[arg(long, value_name = "K=V")]
        env: Vec<String>,
        /// Give the command /dev/null as stdin (default: this stdin,
        /// copied to every target rank).
        #[arg(short = 'n')]
        no_stdin: bool,
        /// Append each rank's signed receipt (system instances) to FILE,
        /// one per line, for `canopy receipt verify`.
        #[arg(long, value_name = "FILE")]
        receipts: Option<std::path::PathBuf>,
        /// Sign the request even when the broker runs as you (a personal
        /// instance started with CANOPY_EXEC_HELPER).
        #[arg(long)]
        sign: bool,
        /// Seconds the signed request stays valid (system instances).
        #[arg(long, value_name = "SECS", default_value_t = 300)]
        lifetime: u64,
        /// Restricted delegation: sign a request that only service NAME
        /// may submit, unchanged (not argv, ranks or expiry); with --out.
        #[arg(long, value_name = "NAME", requires = "out")]
        delegate: Option<String>,
        /// Sign the request (system instances), write the exec.run
        /// payload to FILE, and run nothing.
        #[arg(long, value_name = "FILE")]
        out: Option<std::path::PathBuf>,
        /// Send a payload written by --out (as is) and stream the result.
        #[arg(long, value_name = "FILE", conflicts_with_all = ["out", "delegate"])]
        submit: Option<std::path::PathBuf>,
        /// With --submit: register namespace NAME on this connection first
        /// (the policy must grant `register`) and submit as service NAME,
        /// for a request delegated to it.
        #[arg(long, value_name = "NAME", requires = "submit")]
        as_service: Option<String>,
        #[arg(long)]
        uri: Option<String>,
        /// The command and its arguments.
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            required_unless_present = "submit"
        )]
        command: Vec<String>,
    },
    /// Services: what each rank offers, and who provides it.
    Service {
        #[command(subcommand)]
        cmd: ServiceCmd,
    },
    /// Show how the broker sees you: your principal, the mechanism that
    /// authenticated you, your roles, and the policy rule that decided.
    Whoami {
        /// Print the broker's answer as JSON.
        #[arg(long)]
        json: bool,
        #[arg(long)]
        uri: Option<String>,
    },
    /// Write a CURVE certificate pair (ZPL format, as flux keygen, czmq and
    /// pyzmq use): PATH (secret, mode 0600) and PATH.pub (public).
    Keygen {
        /// Where to write the secret certificate.
        path: PathBuf,
        /// The certificate's name metadata (default: this host's name).
        #[arg(long)]
        name: Option<String>,
        /// Print the public certificate of the existing secret PATH instead.
        #[arg(long)]
        public: bool,
    },
    /// Rotate a system-instance node's CURVE key without downtime: new,
    /// reload, switch, retire (docs/operations.md).
    Key {
        #[command(subcommand)]
        cmd: KeyCmd,
    },
    /// Validate a system-instance config; errors name file, line and key.
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// Access policy: reload it, or check a principal against it.
    Acl {
        #[command(subcommand)]
        cmd: AclCmd,
    },
    /// Audit log tools.
    Audit {
        #[command(subcommand)]
        cmd: AuditCmd,
    },
    /// Inspect the overlay.
    Overlay {
        #[command(subcommand)]
        cmd: OverlayCmd,
    },
    /// Publish and subscribe to events.
    Event {
        #[command(subcommand)]
        cmd: EventCmd,
    },
    /// Your certificate for canopy exec: request one from the site CA
    /// (canopy-ca), or show the saved one.
    Cert {
        #[command(subcommand)]
        cmd: crate::cert_cli::CertCmd,
    },
    /// Verify canopy exec receipts offline against the nodes' keys.
    Receipt {
        #[command(subcommand)]
        cmd: crate::receipt_cli::ReceiptCmd,
    },
    /// Write the manual (man pages) and shell completions under DIR, for
    /// packaging: DIR/man/*.1, DIR/man/canopy.toml.5 and
    /// DIR/completions/{canopy.bash,_canopy,canopy.fish}.
    #[command(hide = true)]
    GenerateManual {
        /// The directory to write into (created if missing).
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
pub(crate) enum ConfigCmd {
    /// Load and validate PATH (a file, or a directory of *.toml). With
    /// --host, also check what that host's broker needs: its files (owner,
    /// mode, matching keys), its addresses and its neighbours' names.
    Check {
        path: PathBuf,
        /// Check this host's node too (run it on that host).
        #[arg(long)]
        host: Option<String>,
        /// With --host: the user the broker runs as (default: canopy if it
        /// exists, else you).
        #[arg(long, requires = "host")]
        user: Option<String>,
    },
}

#[derive(Subcommand)]
pub(crate) enum KeyCmd {
    /// Write the whole key layout of a config: a key pair for every host,
    /// each secret certificate (mode 0600) owned by --owner, every public
    /// certificate in curve_public_certs. Refuses to replace any key.
    Init {
        /// The system-instance config (file or directory).
        #[arg(long, env = "CANOPY_CONFIG")]
        config: PathBuf,
        /// The user the brokers run as, who must own the secret
        /// certificates (default: you).
        #[arg(long)]
        owner: Option<String>,
    },
    /// Write HOST's next key beside its current certificates:
    /// <curve_cert>.next (secret, 0600) and <public cert>.next.
    New {
        host: String,
        /// The system-instance config (file or directory).
        #[arg(long, env = "CANOPY_CONFIG")]
        config: PathBuf,
    },
    /// Every broker re-reads its neighbours' public certificates, current
    /// and .next, and admits both keys (needs admin). Also done by SIGHUP.
    Reload {
        #[arg(long)]
        uri: Option<String>,
    },
    /// HOST's broker switches to its .next key and moves its links to it,
    /// without losing messages (needs admin). Run `canopy key reload` first.
    Switch {
        host: String,
        #[arg(long, env = "CANOPY_CONFIG")]
        config: PathBuf,
        #[arg(long)]
        uri: Option<String>,
    },
    /// Finish: HOST's .next certificates replace its current ones, then
    /// every broker reloads, so the old key is no longer admitted.
    Retire {
        host: String,
        #[arg(long, env = "CANOPY_CONFIG")]
        config: PathBuf,
        /// Retire even if HOST's broker still uses its old key (it will not
        /// be able to reconnect).
        #[arg(long)]
        force: bool,
        /// Only move the files (e.g. on each node whose public certificate
        /// directory is not shared); do not reload the brokers.
        #[arg(long)]
        no_reload: bool,
        #[arg(long)]
        uri: Option<String>,
    },
}

#[derive(Subcommand)]
pub(crate) enum AclCmd {
    /// Re-read the policy file on every broker (needs admin). A policy that
    /// fails to parse is refused and the old one stays in force.
    Reload {
        #[arg(long)]
        uri: Option<String>,
    },
    /// Show the verdict, roles and deciding rule (file:line) for PRINCIPAL:
    /// offline against --policy FILE, else online against the instance
    /// (needs admin).
    Check {
        principal: String,
        /// The peer's IP address.
        #[arg(long)]
        address: Option<String>,
        /// curve, gssapi or local (default: from the principal's form).
        #[arg(long)]
        mechanism: Option<String>,
        #[arg(long)]
        policy: Option<PathBuf>,
        #[arg(long)]
        uri: Option<String>,
    },
}

#[derive(Subcommand)]
pub(crate) enum AuditCmd {
    /// Check the hash chain of an audit log; report the first bad entry.
    Verify { file: PathBuf },
}

#[derive(Subcommand)]
pub(crate) enum OverlayCmd {
    /// Drop RANK's link to its parent (needs the admin role). The broker
    /// at RANK exits, reporting who disconnected it.
    Disconnect {
        rank: u32,
        #[arg(long)]
        uri: Option<String>,
    },
    /// Show the tree with each rank's state.
    Status {
        /// Show the subtree rooted at this rank.
        #[arg(long, short = 'r', default_value_t = 0)]
        rank: u32,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
        /// Wait until the subtree's health is this (full, partial,
        /// degraded, lost, offline); exit 1 if --timeout passes first.
        #[arg(long, value_name = "HEALTH")]
        wait: Option<String>,
        /// Seconds to wait with --wait (accepts a trailing "s": 10s).
        #[arg(long, default_value = "10")]
        timeout: String,
        #[arg(long)]
        uri: Option<String>,
    },
}

#[derive(Subcommand)]
pub(crate) enum ServiceCmd {
    /// List the namespaces a rank serves (built-in and offered by clients)
    /// with each method's role and the provider.
    List {
        /// A rank, or `all` (default: the local broker).
        #[arg(long, short = 'r')]
        rank: Option<String>,
        /// Print the brokers' answers as JSON, one line per rank.
        #[arg(long)]
        json: bool,
        #[arg(long)]
        uri: Option<String>,
    },
}

#[derive(Subcommand)]
pub(crate) enum EventCmd {
    /// Publish an event to every rank.
    Pub {
        topic: String,
        payload: Option<String>,
        #[arg(long)]
        uri: Option<String>,
    },
    /// Print events whose topic matches PATTERN (`*`, `prefix.*`, exact).
    Sub {
        pattern: String,
        /// Stop after this many events (0: never).
        #[arg(long, short = 'c', default_value_t = 0)]
        count: u64,
        /// Give up after this many seconds without an event.
        #[arg(long)]
        timeout: Option<f64>,
        #[arg(long)]
        uri: Option<String>,
    },
}
