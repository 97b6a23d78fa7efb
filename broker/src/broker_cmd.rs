//! `canopy broker`: its arguments, and running it. Shared by the `canopy`
//! binary (the `broker` subcommand, and `canopy start`'s flags) and the
//! `canopy-broker` binary, which holds only this: a broker is long-lived,
//! one per node, and the tools' code in its binary costs it resident
//! memory for good (docs/performance.md).

use anyhow::{Context, Result};
use canopy_broker::bootstrap::{run_broker, BrokerOpts};
use canopy_broker::launcher;
use canopy_broker::node::Transport;
use canopy_config::{BudgetKey, BudgetSettings};
use canopy_overlay::topology::DEFAULT_FANOUT;
use clap::{Args, Parser};
use std::path::PathBuf;
use std::time::Duration;

/// `canopy broker`'s arguments.
#[derive(Args)]
pub(crate) struct BrokerArgs {
    /// System instance: the shared config file or directory
    /// (docs/config.md); this node's rank is its hostname's index.
    #[arg(long)]
    pub(crate) config: Option<PathBuf>,
    /// With --config: this node's name in the host list (default: the
    /// hostname).
    #[arg(long, requires = "config", env = "CANOPY_HOSTNAME")]
    pub(crate) hostname: Option<String>,
    /// With --config: allow running as root (not recommended).
    #[arg(long, requires = "config")]
    pub(crate) force_root: bool,
    #[arg(long, default_value_t = DEFAULT_FANOUT)]
    pub(crate) fanout: u32,
    #[arg(long)]
    pub(crate) rundir: Option<PathBuf>,
    #[arg(long)]
    pub(crate) instance: Option<String>,
    #[arg(long)]
    pub(crate) tcp: bool,
    /// With --tcp: the address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub(crate) host: String,
    #[arg(long, default_value_t = 0)]
    pub(crate) port: u16,
    /// Listen on TCP at the address this hint picks (default-route,
    /// hostname, an interface name or a CIDR), with a port from the
    /// kernel; brokers on one host use ipc. Default: ipc only (or --tcp).
    #[arg(long, value_name = "HINT", conflicts_with = "tcp")]
    pub(crate) interface: Option<canopy_broker::iface::Hint>,
    /// Rank 0 only: also accept remote clients (CURVE) on this endpoint,
    /// e.g. tcp://0.0.0.0:7700.
    #[arg(long)]
    pub(crate) listen_clients: Option<String>,
    /// ACL policy for clients (see etc/policy.toml). Default: owner only.
    #[arg(long)]
    pub(crate) policy: Option<PathBuf>,
    /// Append every access decision to this hash-chained audit log
    /// (rank R > 0 uses PATH.R).
    #[arg(long, requires = "policy")]
    pub(crate) audit: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) timing: TimingArgs,
    #[command(flatten)]
    pub(crate) gss: GssArgs,
    /// With --config these override its [budgets].
    #[command(flatten)]
    pub(crate) budgets: BudgetArgs,
}

/// What `canopy broker` does, for [`Cmd::Broker`] and [`BrokerCli`] alike.
pub(crate) const BROKER_ABOUT: &str =
    "Run one broker. Started by `canopy start` or a PMI-1 launcher \
(mpiexec); with --config, one node of a system instance; without either it is a singleton \
instance";

/// `canopy broker` parsed on its own: a broker is long-lived, one per
/// node, and building every subcommand's parser (as [`Cli`] does) costs
/// it about 1 MiB of resident memory for good (docs/performance.md).
#[derive(Parser)]
#[command(
    name = "canopy broker",
    version = env!("CANOPY_LONG_VERSION"),
    about = BROKER_ABOUT
)]
pub(crate) struct BrokerCli {
    #[command(flatten)]
    pub(crate) args: BrokerArgs,
}

/// How brokers authenticate to each other and to clients.
#[derive(clap::Args, Clone)]
pub(crate) struct GssArgs {
    /// curve: keys issued by the bootstrap; gssapi: Kerberos binds each
    /// link's CURVE key to a principal (docs/security.md).
    #[arg(long, default_value = "curve", value_parser = ["curve", "gssapi"])]
    pub(crate) mechanism: String,
    /// gssapi: the principal every broker authenticates as (default: the
    /// default principal of KRB5CCNAME or KRB5_CLIENT_KTNAME).
    #[arg(long, value_name = "PRINCIPAL")]
    pub(crate) principal: Option<String>,
    /// gssapi: where rank 0's key exchange listens for remote clients
    /// (HOST:PORT; default: a free port on 127.0.0.1, printed as CANOPY_KEX).
    #[arg(long, value_name = "HOST:PORT")]
    pub(crate) kex_listen: Option<String>,
    /// gssapi, for tests: cap each key binding's lifetime, in seconds.
    #[arg(long, hide = true)]
    pub(crate) gss_max_lifetime: Option<f64>,
    /// gssapi: most live key bindings one principal may hold at rank 0's
    /// key exchange (default 1000).
    #[arg(long, value_name = "N")]
    pub(crate) gss_max_bindings: Option<usize>,
}

/// Budgets: what clients can make a broker hold (docs/security.md,
/// "Budgets"). Sizes are bytes, or with a binary unit: 1024, 64KiB, 16MiB.
/// Unset: the default (or, with --config, the config's [budgets]).
#[derive(clap::Args, Clone, Default)]
pub(crate) struct BudgetArgs {
    /// Largest message payload on any endpoint (default 16MiB); larger
    /// ones are refused before they are buffered.
    #[arg(long, value_name = "SIZE", value_parser = canopy_config::parse_size)]
    pub(crate) max_message: Option<u64>,
    /// Bytes queued or in flight per client connection (default 32MiB).
    #[arg(long, value_name = "SIZE", value_parser = canopy_config::parse_size)]
    pub(crate) client_bytes: Option<u64>,
    /// Bytes queued or in flight per principal or local uid (default
    /// 32MiB).
    #[arg(long, value_name = "SIZE", value_parser = canopy_config::parse_size)]
    pub(crate) principal_bytes: Option<u64>,
    /// Bytes queued or in flight for all clients of a broker (default
    /// 256MiB).
    #[arg(long, value_name = "SIZE", value_parser = canopy_config::parse_size)]
    pub(crate) total_bytes: Option<u64>,
    /// Connections per local uid or remote principal (default 64).
    #[arg(long, value_name = "N")]
    pub(crate) connections: Option<u64>,
    /// Requests in flight per client connection (default 1024).
    #[arg(long, value_name = "N")]
    pub(crate) in_flight: Option<u64>,
    /// Bytes of requests in flight toward one neighbour broker (default
    /// 32MiB).
    #[arg(long, value_name = "SIZE", value_parser = canopy_config::parse_size)]
    pub(crate) neighbour_bytes: Option<u64>,
}

/// Liveness timings, in seconds.
#[derive(clap::Args, Clone, Copy)]
pub(crate) struct TimingArgs {
    /// Seconds between heartbeats on each link.
    #[arg(long, default_value_t = 2.0)]
    pub(crate) heartbeat: f64,
    /// Seconds of silence after which a peer is reported torpid.
    #[arg(long, default_value_t = 10.0)]
    pub(crate) torpid: f64,
    /// Seconds of silence after which a peer is lost: its link is dropped
    /// and its requests in flight fail with EHOSTUNREACH.
    #[arg(long, default_value_t = 30.0)]
    pub(crate) lost: f64,
}

impl GssArgs {
    pub(crate) fn to_opts(&self) -> Result<Option<canopy_broker::gss::GssOpts>> {
        if self.mechanism != "gssapi" {
            anyhow::ensure!(
                self.principal.is_none()
                    && self.kex_listen.is_none()
                    && self.gss_max_lifetime.is_none()
                    && self.gss_max_bindings.is_none(),
                "--principal, --kex-listen, --gss-max-lifetime and --gss-max-bindings need --mechanism gssapi"
            );
            return Ok(None);
        }
        Ok(Some(canopy_broker::gss::GssOpts {
            principal: self.principal.clone(),
            kex_listen: self.kex_listen.clone(),
            max_lifetime: self
                .gss_max_lifetime
                .map(|s| secs(s, "--gss-max-lifetime"))
                .transpose()?,
            max_bindings_per_principal: self.gss_max_bindings,
        }))
    }
}

impl TimingArgs {
    pub(crate) fn to_timing(self) -> Result<canopy_overlay::liveness::Timing> {
        let ms = |s: f64, what: &str| -> Result<u64> {
            anyhow::ensure!(
                s > 0.0 && s.is_finite(),
                "--{what} must be a positive number of seconds"
            );
            Ok((s * 1000.0).round().max(1.0) as u64)
        };
        canopy_overlay::liveness::Timing::new(
            ms(self.heartbeat, "heartbeat")?,
            ms(self.torpid, "torpid")?,
            ms(self.lost, "lost")?,
        )
        .map_err(|e| anyhow::anyhow!("--heartbeat, --torpid, --lost: {e}"))
    }
}

impl BudgetArgs {
    /// The budgets given, as (key, value).
    pub(crate) fn flags(&self) -> Vec<(BudgetKey, u64)> {
        let given = [
            self.max_message,
            self.client_bytes,
            self.principal_bytes,
            self.total_bytes,
            self.connections,
            self.in_flight,
            self.neighbour_bytes,
        ];
        BudgetKey::ALL
            .into_iter()
            .zip(given)
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .collect()
    }

    /// The defaults with the flags applied, checked.
    pub(crate) fn to_budgets(&self) -> Result<canopy_broker::core::Budgets> {
        let flags = self.flags();
        let mut b = BudgetSettings::default();
        for (k, v) in &flags {
            b.set(*k, *v);
        }
        b.check(|k| flags.iter().any(|(f, _)| *f == k))
            .map_err(|p| anyhow::anyhow!("{}: {}", p.key.flag(), p.message))?;
        Ok(canopy_broker::sockets::budgets_from(&b))
    }
}

pub(crate) fn secs(s: f64, what: &str) -> Result<Duration> {
    Duration::try_from_secs_f64(s)
        .with_context(|| format!("{what} must be a non-negative number of seconds"))
}

/// Flags of `canopy broker` that a system-instance config sets instead,
/// with the config key that does: given with `--config`, they are refused,
/// never silently ignored.
const CONFIG_SETS: &[(&str, &str)] = &[
    ("fanout", "bootstrap.fanout"),
    ("instance", "nothing: the instance id comes from the config"),
    ("tcp", "bootstrap.default_bind / hosts[].bind"),
    ("host", "bootstrap.default_bind / hosts[].bind"),
    ("port", "bootstrap.default_port"),
    (
        "interface",
        "bootstrap.default_bind (an interface name, tcp://eth0:%p)",
    ),
    ("listen_clients", "[clients] bind"),
    ("policy", "policy.file"),
    ("audit", "policy.audit_log"),
    ("heartbeat", "timing.heartbeat"),
    ("torpid", "timing.torpid"),
    ("lost", "timing.lost"),
    ("mechanism", "bootstrap.mechanism"),
    ("principal", "gssapi.service"),
    ("kex_listen", "gssapi.kex_port"),
    ("gss_max_lifetime", "nothing (a test option)"),
];

/// `canopy broker --config` with a flag the config sets: a usage error.
pub(crate) fn refuse_config_flags(sub: &clap::ArgMatches, command: fn() -> clap::Command) {
    if !(sub.contains_id("config") && sub.get_one::<std::path::PathBuf>("config").is_some()) {
        return;
    }
    for (id, key) in CONFIG_SETS {
        if sub.value_source(id) == Some(clap::parser::ValueSource::CommandLine) {
            command()
                .error(
                    clap::error::ErrorKind::ArgumentConflict,
                    format!(
                        "--{} is not used with --config: the config sets it ({key}); set it there, or drop the flag",
                        id.replace('_', "-")
                    ),
                )
                .exit();
        }
    }
}

/// Parse a broker's arguments (after the word `broker`); `--config` with a
/// flag its config sets is an error naming the config key.
pub(crate) fn parse(args: impl IntoIterator<Item = std::ffi::OsString>) -> BrokerArgs {
    use clap::{CommandFactory, FromArgMatches};
    let matches = BrokerCli::command()
        .bin_name("canopy broker")
        .get_matches_from(args);
    refuse_config_flags(&matches, BrokerCli::command);
    BrokerCli::from_arg_matches(&matches)
        .unwrap_or_else(|e| e.exit())
        .args
}

/// Run one broker until it stops.
pub(crate) fn run(args: BrokerArgs) -> Result<i32> {
    match args {
        BrokerArgs {
            config: Some(config),
            hostname,
            force_root,
            rundir,
            budgets,
            ..
        } => {
            canopy_broker::system::run_system_broker(canopy_broker::system::SystemOpts {
                config,
                hostname,
                rundir,
                force_root,
                budget_flags: budgets.flags(),
            })?;
            Ok(0)
        }
        BrokerArgs {
            fanout,
            rundir,
            instance,
            tcp,
            host,
            port,
            interface,
            listen_clients: client_listen,
            policy,
            audit,
            timing,
            gss,
            budgets,
            ..
        } => {
            let transport = if tcp {
                Transport::Tcp { host, port }
            } else {
                Transport::Ipc
            };
            run_broker(BrokerOpts {
                fanout,
                rundir,
                instance,
                transport,
                client_listen,
                timing: timing.to_timing()?,
                client_authz: None,
                policy,
                audit,
                gss: gss.to_opts()?,
                interface,
                budgets: budgets.to_budgets()?,
            })?;
            Ok(0)
        }
    }
}

/// Exit with a command's status; an error is said once on stderr (status
/// 1), except that a broker whose launcher went away exits quietly.
pub(crate) fn exit(result: Result<i32>) -> ! {
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            // Every error message already includes its cause.
            if e.downcast_ref::<canopy_broker::BrokerError>()
                .is_some_and(|b| b.launcher_gone())
            {
                tracing::debug!("exiting: {e}");
                std::process::exit(1);
            }
            launcher::say(&format!("error: {e}"));
            std::process::exit(1);
        }
    }
}
