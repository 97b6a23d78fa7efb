#![forbid(unsafe_code)]

use anyhow::{Context, Result};
use canopy_broker::bootstrap::{run_broker, BrokerOpts};
use canopy_broker::launcher::{start, StartOpts};
use canopy_broker::node::Transport;
use canopy_broker::tools;
use canopy_overlay::topology::DEFAULT_FANOUT;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;

/// Canopy: a secure overlay broker for HPC clusters.
#[derive(Parser)]
#[command(name = "canopy", version, about)]
struct Cli {
    /// Tools over tcp://: your secret certificate (or set CANOPY_KEY).
    #[arg(long, global = true, value_name = "FILE")]
    key: Option<PathBuf>,
    /// Tools over tcp://: the broker's public key, 40 Z85 characters or a
    /// certificate file (or set CANOPY_SERVER_KEY).
    #[arg(long, global = true, value_name = "KEY")]
    server_key: Option<String>,
    /// Tools over tcp:// with Kerberos: the broker's key exchange HOST:PORT
    /// (or set CANOPY_KEX; `canopy start --mechanism gssapi` prints it).
    #[arg(long, global = true, value_name = "HOST:PORT")]
    kex: Option<String>,
    /// Tools over tcp:// with Kerberos: the broker's principal (or set
    /// CANOPY_GSS_TARGET).
    #[arg(long, global = true, value_name = "PRINCIPAL")]
    gss_target: Option<String>,
    /// Tools over tcp:// with Kerberos: your principal (or set
    /// CANOPY_GSS_PRINCIPAL; default: your credential cache's).
    #[arg(long, global = true, value_name = "PRINCIPAL")]
    gss_principal: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
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
        /// Command to run inside the instance; CANOPY_URI is set for it.
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Run one broker. Started by `canopy start` or a PMI-1 launcher
    /// (mpiexec); with --config, one node of a system instance; without
    /// either it is a singleton instance.
    Broker {
        /// System instance: the shared config file or directory
        /// (docs/config.md); this node's rank is its hostname's index.
        #[arg(long)]
        config: Option<PathBuf>,
        /// With --config: this node's name in the host list (default: the
        /// hostname).
        #[arg(long, requires = "config", env = "CANOPY_HOSTNAME")]
        hostname: Option<String>,
        /// With --config: allow running as root (not recommended).
        #[arg(long, requires = "config")]
        force_root: bool,
        #[arg(long, default_value_t = DEFAULT_FANOUT)]
        fanout: u32,
        #[arg(long)]
        rundir: Option<PathBuf>,
        #[arg(long)]
        instance: Option<String>,
        #[arg(long)]
        tcp: bool,
        /// With --tcp: the address to listen on.
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// Listen on TCP at the address this hint picks (default-route,
        /// hostname, an interface name or a CIDR), with a port from the
        /// kernel; brokers on one host use ipc. Default: ipc only (or --tcp).
        #[arg(long, value_name = "HINT", conflicts_with = "tcp")]
        interface: Option<canopy_broker::iface::Hint>,
        #[arg(long, default_value_t = 0)]
        port: u16,
        /// Rank 0 only: also accept remote clients (CURVE) on this endpoint,
        /// e.g. tcp://0.0.0.0:7700.
        #[arg(long)]
        listen_clients: Option<String>,
        /// ACL policy for clients (see etc/policy.toml). Default: owner only.
        #[arg(long)]
        policy: Option<PathBuf>,
        /// Append every access decision to this hash-chained audit log
        /// (rank R > 0 uses PATH.R).
        #[arg(long, requires = "policy")]
        audit: Option<PathBuf>,
        #[command(flatten)]
        timing: TimingArgs,
        #[command(flatten)]
        gss: GssArgs,
    },
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
}

/// How brokers authenticate to each other and to clients.
#[derive(clap::Args, Clone)]
struct GssArgs {
    /// curve: keys issued by the bootstrap; gssapi: Kerberos binds each
    /// link's CURVE key to a principal (docs/security.md).
    #[arg(long, default_value = "curve", value_parser = ["curve", "gssapi"])]
    mechanism: String,
    /// gssapi: the principal every broker authenticates as (default: the
    /// default principal of KRB5CCNAME or KRB5_CLIENT_KTNAME).
    #[arg(long, value_name = "PRINCIPAL")]
    principal: Option<String>,
    /// gssapi: where rank 0's key exchange listens for remote clients
    /// (HOST:PORT; default: a free port on 127.0.0.1, printed as CANOPY_KEX).
    #[arg(long, value_name = "HOST:PORT")]
    kex_listen: Option<String>,
    /// gssapi, for tests: cap each key binding's lifetime, in seconds.
    #[arg(long, hide = true)]
    gss_max_lifetime: Option<f64>,
}

impl GssArgs {
    fn to_opts(&self) -> Result<Option<canopy_broker::gss::GssOpts>> {
        if self.mechanism != "gssapi" {
            anyhow::ensure!(
                self.principal.is_none()
                    && self.kex_listen.is_none()
                    && self.gss_max_lifetime.is_none(),
                "--principal, --kex-listen and --gss-max-lifetime need --mechanism gssapi"
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
        }))
    }

    fn to_args(&self) -> Vec<String> {
        let mut a = vec!["--mechanism".to_string(), self.mechanism.clone()];
        for (flag, v) in [
            ("--principal", self.principal.clone()),
            ("--kex-listen", self.kex_listen.clone()),
            (
                "--gss-max-lifetime",
                self.gss_max_lifetime.map(|s| s.to_string()),
            ),
        ] {
            if let Some(v) = v {
                a.push(flag.into());
                a.push(v);
            }
        }
        a
    }
}

/// Liveness timings, in seconds.
#[derive(clap::Args, Clone, Copy)]
struct TimingArgs {
    /// Seconds between heartbeats on each link.
    #[arg(long, default_value_t = 2.0)]
    heartbeat: f64,
    /// Seconds of silence after which a peer is reported torpid.
    #[arg(long, default_value_t = 10.0)]
    torpid: f64,
    /// Seconds of silence after which a peer is lost: its link is dropped
    /// and its requests in flight fail with EHOSTUNREACH.
    #[arg(long, default_value_t = 30.0)]
    lost: f64,
}

impl TimingArgs {
    fn to_timing(self) -> Result<canopy_overlay::liveness::Timing> {
        let ms = |s: f64, what: &str| -> Result<u64> {
            anyhow::ensure!(
                s > 0.0 && s.is_finite(),
                "--{what} must be a positive number of seconds"
            );
            Ok((s * 1000.0).round().max(1.0) as u64)
        };
        let t = canopy_overlay::liveness::Timing {
            heartbeat_ms: ms(self.heartbeat, "heartbeat")?,
            torpid_ms: ms(self.torpid, "torpid")?,
            lost_ms: ms(self.lost, "lost")?,
        };
        anyhow::ensure!(
            t.heartbeat_ms < t.torpid_ms && t.torpid_ms < t.lost_ms,
            "timings must satisfy --heartbeat < --torpid < --lost"
        );
        Ok(t)
    }

    fn to_args(self) -> Vec<String> {
        vec![
            "--heartbeat".into(),
            self.heartbeat.to_string(),
            "--torpid".into(),
            self.torpid.to_string(),
            "--lost".into(),
            self.lost.to_string(),
        ]
    }
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Load and validate PATH (a file, or a directory of *.toml).
    Check { path: PathBuf },
}

#[derive(Subcommand)]
enum KeyCmd {
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
enum AclCmd {
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
enum AuditCmd {
    /// Check the hash chain of an audit log; report the first bad entry.
    Verify { file: PathBuf },
}

#[derive(Subcommand)]
enum OverlayCmd {
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
enum EventCmd {
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

fn secs(s: f64, what: &str) -> Result<Duration> {
    Duration::try_from_secs_f64(s)
        .with_context(|| format!("{what} must be a non-negative number of seconds"))
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn main() {
    init_logging();
    match run(Cli::parse()) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            // Every error message already includes its cause.
            if e.downcast_ref::<canopy_broker::BrokerError>()
                .is_some_and(|b| b.launcher_gone())
            {
                tracing::debug!("exiting: {e}");
                std::process::exit(1);
            }
            canopy_broker::launcher::say(&format!("error: {e}"));
            std::process::exit(1);
        }
    }
}

fn run(cli: Cli) -> Result<i32> {
    // Still single-threaded here: hand the key flags to the client library.
    if let Some(k) = &cli.key {
        std::env::set_var(canopy_client::KEY_ENV, k);
    }
    if let Some(k) = &cli.server_key {
        std::env::set_var(canopy_client::SERVER_KEY_ENV, k);
    }
    for (var, v) in [
        (canopy_client::KEX_ENV, &cli.kex),
        (canopy_client::GSS_TARGET_ENV, &cli.gss_target),
        (canopy_client::GSS_PRINCIPAL_ENV, &cli.gss_principal),
    ] {
        if let Some(v) = v {
            std::env::set_var(var, v);
        }
    }
    match cli.cmd {
        Cmd::Start {
            size,
            interface,
            fanout,
            tcp,
            port,
            rundir,
            broker_path,
            timeout,
            listen_clients,
            keep_going,
            allow,
            policy,
            audit,
            timing,
            gss,
            command,
        } => {
            timing.to_timing()?;
            gss.to_opts()?;
            let mut broker_args = timing.to_args();
            broker_args.extend(gss.to_args());
            let listen_clients_opt = listen_clients.clone();
            if let Some(ep) = listen_clients {
                broker_args.push("--listen-clients".into());
                broker_args.push(ep);
            }
            let policy_text = if allow.is_empty() {
                None
            } else {
                Some(policy_from_allow(&allow)?)
            };
            if let Some(p) = &policy {
                // Fail before starting anything if the policy is bad.
                canopy_acl::Acl::load(p)?;
                broker_args.push("--policy".into());
                broker_args.push(std::path::absolute(p)?.display().to_string());
            }
            if let Some(a) = &audit {
                anyhow::ensure!(
                    policy.is_some() || policy_text.is_some(),
                    "--audit needs --policy or --allow: without a policy only the owner can connect"
                );
                broker_args.push("--audit".into());
                broker_args.push(std::path::absolute(a)?.display().to_string());
            }
            if canopy_broker::allocation::launched() {
                anyhow::ensure!(
                    !tcp,
                    "--tcp and --port are for a local instance; under a launcher each broker listens where --interface says"
                );
                anyhow::ensure!(
                    !keep_going,
                    "--keep-going is for a local instance; under a launcher a broker whose parent is lost exits"
                );
                let _ = broker_path;
                return Ok(canopy_broker::allocation::run(
                    canopy_broker::allocation::AllocOpts {
                        broker: BrokerOpts {
                            fanout,
                            rundir,
                            instance: None,
                            transport: Transport::Ipc,
                            client_listen: listen_clients_opt,
                            timing: timing.to_timing()?,
                            client_authz: None,
                            policy: policy.as_ref().map(std::path::absolute).transpose()?,
                            audit: audit.as_ref().map(std::path::absolute).transpose()?,
                            gss: gss.to_opts()?,
                            interface: Some(interface),
                        },
                        size,
                        timeout: secs(timeout, "--timeout")?,
                        policy_text,
                        command,
                    },
                ));
            }
            Ok(start(StartOpts {
                size: size.unwrap_or(1),
                fanout,
                tcp,
                port,
                rundir,
                broker_path,
                timeout: secs(timeout, "--timeout")?,
                keep_going,
                policy_text,
                broker_args,
                command,
            })?)
        }
        Cmd::Config {
            cmd: ConfigCmd::Check { path },
        } => {
            print!("{}", canopy_broker::system::config_check(&path)?);
            println!("{}: ok", path.display());
            Ok(0)
        }
        Cmd::Broker {
            config: Some(config),
            hostname,
            force_root,
            rundir,
            ..
        } => {
            canopy_broker::system::run_system_broker(canopy_broker::system::SystemOpts {
                config,
                hostname,
                rundir,
                force_root,
            })?;
            Ok(0)
        }
        Cmd::Broker {
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
            })?;
            Ok(0)
        }
        Cmd::Ping {
            rank,
            count,
            pad,
            interval,
            timeout,
            uri,
        } => {
            tools::ping(
                uri.as_deref(),
                rank,
                count,
                pad,
                secs(interval, "--interval")?,
                secs(timeout, "--timeout")?,
                &mut std::io::stdout(),
            )?;
            Ok(0)
        }
        Cmd::Keygen { path, name, public } => {
            use canopy_security::cert;
            if public {
                let c = cert::load_secret(&path)?;
                let kp = c
                    .keypair()
                    .context("secret certificate has no secret key")?;
                print!("{}", cert::public_text(&kp, c.name().unwrap_or("")));
                return Ok(0);
            }
            let name = match name {
                Some(n) => n,
                None => nix::unistd::gethostname()
                    .ok()
                    .and_then(|h| h.into_string().ok())
                    .unwrap_or_default(),
            };
            let kp = canopy_security::CurveKeypair::generate()?;
            let mut public_path = path.clone().into_os_string();
            public_path.push(".pub");
            cert::write_pair(&kp, &name, &path, std::path::Path::new(&public_path))?;
            println!(
                "wrote {} (secret, mode 0600) and {} (public key {})",
                path.display(),
                PathBuf::from(&public_path).display(),
                kp.public_z85()
            );
            Ok(0)
        }
        Cmd::Key { cmd } => key_cmd(cmd),
        Cmd::Acl {
            cmd: AclCmd::Reload { uri },
        } => {
            let results = tools::acl_reload(uri.as_deref(), Duration::from_secs(10))?;
            let mut failed = 0;
            for (rank, r) in results {
                match r {
                    Ok(msg) => println!("rank {rank}: {msg}"),
                    Err(e) => {
                        failed += 1;
                        println!("rank {rank}: refused: {e}");
                    }
                }
            }
            Ok(if failed > 0 { 1 } else { 0 })
        }
        Cmd::Acl {
            cmd:
                AclCmd::Check {
                    principal,
                    address,
                    mechanism,
                    policy,
                    uri,
                },
        } => {
            let x = match policy {
                Some(p) => tools::acl_check_offline(
                    &p,
                    &principal,
                    mechanism.as_deref(),
                    address.as_deref(),
                )?,
                None => tools::acl_check_online(
                    uri.as_deref(),
                    &principal,
                    mechanism.as_deref(),
                    address.as_deref(),
                    Duration::from_secs(10),
                )?,
            };
            println!(
                "{}: {} roles={} rule={} ({})",
                x.principal,
                if x.allow { "allow" } else { "deny" },
                x.roles,
                x.rule.as_deref().unwrap_or("default deny"),
                x.reason
            );
            Ok(if x.allow { 0 } else { 2 })
        }
        Cmd::Audit {
            cmd: AuditCmd::Verify { file },
        } => match canopy_acl::audit::verify(&file) {
            Ok(n) => {
                println!("{}: {n} entries, chain intact", file.display());
                Ok(0)
            }
            Err(e) => {
                println!("{}: {e}", file.display());
                Ok(1)
            }
        },
        Cmd::Overlay {
            cmd: OverlayCmd::Disconnect { rank, uri },
        } => {
            let parent = tools::disconnect(uri.as_deref(), rank, Duration::from_secs(10))?;
            println!("rank {rank} disconnected from rank {parent}");
            Ok(0)
        }
        Cmd::Overlay {
            cmd:
                OverlayCmd::Status {
                    rank,
                    json,
                    wait,
                    timeout,
                    uri,
                },
        } => {
            let r = match wait {
                Some(want) => {
                    let t: f64 = timeout.trim_end_matches('s').parse().with_context(|| {
                        format!("--timeout {timeout}: expected seconds, e.g. 10s")
                    })?;
                    match tools::wait_health(uri.as_deref(), rank, &want, secs(t, "--timeout")?)? {
                        Ok(r) => r,
                        Err(r) => {
                            print!("{}", tools::render_status(&r));
                            canopy_broker::launcher::say(&format!(
                                "error: rank {rank}'s subtree is {}, not {want}, after {timeout}",
                                r.health
                            ));
                            return Ok(1);
                        }
                    }
                }
                None => tools::status(uri.as_deref(), rank, Duration::from_secs(10))?,
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{}", tools::render_status(&r));
            }
            Ok(0)
        }
        Cmd::Event {
            cmd:
                EventCmd::Pub {
                    topic,
                    payload,
                    uri,
                },
        } => {
            let seq = tools::event_pub(
                uri.as_deref(),
                &topic,
                payload.unwrap_or_default().as_bytes(),
                Duration::from_secs(10),
            )?;
            println!("published {topic} seq={seq}");
            Ok(0)
        }
        Cmd::Event {
            cmd:
                EventCmd::Sub {
                    pattern,
                    count,
                    timeout,
                    uri,
                },
        } => {
            let t = timeout.map(|t| secs(t, "--timeout")).transpose()?;
            tools::event_sub(uri.as_deref(), &pattern, count, t, &mut std::io::stdout())?;
            Ok(0)
        }
    }
}

/// A policy file for `canopy start --allow PRINCIPAL=ROLE ...`.
fn policy_from_allow(allow: &[String]) -> Result<String> {
    let mut out = String::from("# generated by canopy start --allow\n");
    for (i, a) in allow.iter().enumerate() {
        let (principal, role) = a
            .rsplit_once('=')
            .with_context(|| format!("--allow {a}: expected PRINCIPAL=ROLE, e.g. unix:bob=user"))?;
        canopy_proto::Roles::parse_list(role).with_context(|| format!("--allow {a}"))?;
        let roles: Vec<String> = role.split(',').map(|r| format!("{:?}", r.trim())).collect();
        out.push_str(&format!(
            "\n[[rule]]\nname = \"allow-{}\"\nprincipal = {:?}\nroles = [{}]\n",
            i + 1,
            principal,
            roles.join(", ")
        ));
    }
    canopy_acl::Acl::parse(&out, "--allow").map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(out)
}

fn print_rank_results(results: Vec<tools::RankResult>) -> i32 {
    let mut failed = 0;
    for (rank, r) in results {
        match r {
            Ok(msg) => println!("rank {rank}: {msg}"),
            Err(e) => {
                failed += 1;
                println!("rank {rank}: refused: {e}");
            }
        }
    }
    if failed > 0 {
        1
    } else {
        0
    }
}

fn key_cmd(cmd: KeyCmd) -> Result<i32> {
    use canopy_broker::rotate;
    let t = Duration::from_secs(10);
    let load =
        |p: &std::path::Path| canopy_config::Config::load(p).map_err(|e| anyhow::anyhow!("{e}"));
    match cmd {
        KeyCmd::New { host, config } => {
            let cfg = load(&config)?;
            let (rank, sn, pn, key) = rotate::write_next(&cfg, &host)?;
            println!(
                "wrote {} (secret, mode 0600) and {} (public key {key}) for rank {rank}",
                sn.display(),
                pn.display()
            );
            println!("next: copy the public certificate to every node if its directory is not shared, then `canopy key reload`");
            Ok(0)
        }
        KeyCmd::Reload { uri } => Ok(print_rank_results(tools::key_reload(uri.as_deref(), t)?)),
        KeyCmd::Switch { host, config, uri } => {
            let cfg = load(&config)?;
            let (rank, _, public) = rotate::host_paths(&cfg, &host)?;
            // The next key, if its public certificate is here to check the
            // neighbours against.
            let next = rotate::load_public_key(&rotate::next_path(&public))
                .ok()
                .map(|k| canopy_security::z85::encode(&k));
            let (reply, st, took) = tools::key_switch(
                uri.as_deref(),
                rank,
                next.as_deref(),
                t,
                Duration::from_secs(30),
            )?;
            println!("{reply}");
            if st.settled() {
                println!(
                    "rank {rank}: links moved to key {} in {:.1} ms",
                    st.public_key,
                    took.as_secs_f64() * 1e3
                );
                Ok(0)
            } else {
                println!(
                    "rank {rank}: links still moving after {:.1} s (parent moving: {}, children moving: {:?}, rebinding: {}); see its log",
                    took.as_secs_f64(),
                    st.parent_moving,
                    st.children_moving,
                    st.rebinding
                );
                Ok(1)
            }
        }
        KeyCmd::Retire {
            host,
            config,
            force,
            no_reload,
            uri,
        } => {
            let cfg = load(&config)?;
            let (rank, _, public) = rotate::host_paths(&cfg, &host)?;
            if !force && !no_reload {
                let next = rotate::load_public_key(&rotate::next_path(&public))?;
                let next = canopy_security::z85::encode(&next);
                let used = tools::key_in_use(uri.as_deref(), rank, t)?;
                anyhow::ensure!(
                    used == next,
                    "rank {rank} ({host}) still uses key {used}, not its next key {next}: run `canopy key switch {host}` first (or --force)"
                );
            }
            for p in rotate::promote_next(&cfg, &host)? {
                println!("{}: now holds the new key", p.display());
            }
            if no_reload {
                return Ok(0);
            }
            Ok(print_rank_results(tools::key_reload(uri.as_deref(), t)?))
        }
    }
}
