//! `canopy broker --config PATH`: one broker of a system instance,
//! bootstrapped from a TOML config shared by every node (see
//! docs/config.md) instead of PMI. Each node has its own CURVE
//! certificate; the config names every node's public certificate, so a
//! key is admitted only as the rank it belongs to.

use crate::authz::{AclAuthz, ClientAuthz, OwnerOnly};
use crate::error::BrokerError;
use crate::node::{bind, unix_principal, Broker, Card, Plan, Transport};
use canopy_config::{Config, Mechanism};
use canopy_security::trust::{check_trusted, service_uid, TrustKind};
use canopy_security::{cert, curve_principal};
use std::collections::HashMap;
use std::net::ToSocketAddrs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Options for a system-instance broker.
pub struct SystemOpts {
    pub config: PathBuf,
    /// This node's name in the host list (default: the hostname).
    pub hostname: Option<String>,
    /// Directory for the local connector (default /run/canopy, else a
    /// per-instance directory under the temp dir).
    pub rundir: Option<PathBuf>,
    pub force_root: bool,
    /// Budgets given as flags (`--max-message` etc.): they override the
    /// config's `[budgets]`.
    pub budget_flags: Vec<(canopy_config::BudgetKey, u64)>,
}

/// The config's `[budgets]` with the flags applied, checked again (a flag
/// may break the order the config kept).
pub fn effective_budgets(
    config: &Config,
    flags: &[(canopy_config::BudgetKey, u64)],
) -> Result<crate::core::Budgets, BrokerError> {
    let mut b = *config.budgets();
    for (k, v) in flags {
        b.set(*k, *v);
    }
    b.check(|k| flags.iter().any(|(f, _)| *f == k))
        .map_err(|p| {
            let from = if flags.iter().any(|(f, _)| *f == p.key) {
                p.key.flag()
            } else {
                format!(
                    "budgets.{} in {}",
                    p.key.name(),
                    config
                        .files()
                        .iter()
                        .map(|f| f.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            BrokerError::Budget {
                from,
                message: p.message,
            }
        })?;
    Ok(crate::sockets::budgets_from(&b))
}

/// Refuse files that group or other can write.
fn check_not_writable(path: &Path, what: &'static str) -> Result<(), BrokerError> {
    let md = std::fs::metadata(path).map_err(|source| BrokerError::Io {
        what: "read the metadata of",
        path: path.to_path_buf(),
        source,
    })?;
    let mode = md.permissions().mode() & 0o777;
    if mode & 0o022 != 0 {
        return Err(BrokerError::WritableByOthers {
            what,
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// Refuse `path` unless [`check_trusted`] accepts it for this user.
fn trusted(path: &Path, kind: TrustKind, what: &'static str) -> Result<(), BrokerError> {
    check_trusted(path, kind, service_uid())
        .map(|_| ())
        .map_err(|source| BrokerError::Untrusted { what, source })
}

fn public_key(config: &Config, rank: u32) -> Result<[u8; 32], BrokerError> {
    let path = config.public_cert_path(rank).ok_or(BrokerError::NoCert {
        which: "public",
        rank,
    })?;
    check_not_writable(&path, "public certificate")?;
    Ok(cert::load_public(&path)?.public)
}

/// Check that `tcp://HOST:PORT` resolves now, naming the host if not.
fn check_resolves(endpoint: &str, who: &str) -> Result<(), BrokerError> {
    let Some(hostport) = endpoint.strip_prefix("tcp://") else {
        return Ok(());
    };
    if hostport.starts_with('*') {
        return Ok(());
    }
    match hostport.to_socket_addrs().map(|mut a| a.next().is_some()) {
        Ok(true) => Ok(()),
        Ok(false) => Err(BrokerError::NoAddress {
            who: who.to_string(),
            endpoint: endpoint.to_string(),
        }),
        Err(source) => Err(BrokerError::Unresolvable {
            who: who.to_string(),
            endpoint: endpoint.to_string(),
            source,
        }),
    }
}

/// Run one broker of a system instance until told to stop.
pub fn run_system_broker(opts: SystemOpts) -> Result<(), BrokerError> {
    let uid = nix::unistd::getuid();
    if uid.is_root() && !opts.force_root {
        return Err(BrokerError::Root);
    }
    let mut boot = ConfigBootstrap { opts, state: None };
    crate::boot::run(&mut boot)
}

/// The bootstrap from a shared config file: the rank is this host's index
/// in the host list, the neighbours' keys are their certificates.
pub struct ConfigBootstrap {
    pub opts: SystemOpts,
    state: Option<Started>,
}

/// What lives from the plan until the broker stops.
struct Started {
    config: Config,
    rank: u32,
    hostname: String,
    gss: bool,
    rundir: PathBuf,
    kex: Option<canopy_gss::KexServer>,
}

impl crate::boot::Bootstrap for ConfigBootstrap {
    fn plan(&mut self) -> Result<crate::boot::Planned, BrokerError> {
        let opts = &self.opts;
        let config = Config::load(&opts.config)?;
        let budgets = effective_budgets(&config, &opts.budget_flags)?;
        // Anyone who can add a file to the public certificate directory can
        // join as any rank: it must be trusted as a whole.
        if let Some(canopy_config::PublicCerts::Directory(dir)) =
            &config.bootstrap().curve_public_certs
        {
            if config.mechanism() == Mechanism::Curve {
                trusted(dir, TrustKind::Directory, "certificate directory")?;
            }
        }
        let hostname = match &opts.hostname {
            Some(h) => h.clone(),
            None => nix::unistd::gethostname()
                .map_err(BrokerError::Hostname)?
                .to_string_lossy()
                .into_owned(),
        };
        let rank = config
            .rank_of(&hostname)
            .ok_or_else(|| BrokerError::HostNotInConfig {
                hostname: hostname.clone(),
                config: opts.config.clone(),
            })?;
        let topo = config.topology().to_overlay()?;
        // gssapi: Kerberos binds fresh per-link keys; no certificates. Still
        // single-threaded here (the keytab goes to the environment).
        let gss = match config.mechanism() {
            Mechanism::Gssapi => Some(crate::gss::SystemGss::prepare(&config, rank, &topo)?),
            Mechanism::Curve => None,
        };
        let _span = tracing::error_span!("broker", rank).entered();

        // This node's own key, and its neighbours' public keys.
        let keys = match &gss {
            Some(_) => canopy_security::CurveKeypair::generate()?,
            None => load_keys(&config, rank)?,
        };
        let mut children = HashMap::new();
        for child in topo.children(rank) {
            let principal = match &gss {
                Some(g) => g.children[&child].clone(),
                None => curve_principal(&public_key(&config, child)?),
            };
            children.insert(child, principal);
        }
        let mut parent = match topo.parent(rank) {
            None => None,
            Some(p) => {
                let ep = config.connect_endpoint(p).ok_or(BrokerError::RankLacks {
                    rank: p,
                    what: "connect endpoint",
                })?;
                check_resolves(
                    &ep,
                    &format!("parent (rank {p}, {})", config.host(p).unwrap_or("?")),
                )?;
                Some(Card {
                    public_key: match &gss {
                        Some(_) => [0; 32], // from the parent's key exchange, below
                        None => public_key(&config, p)?,
                    },
                    endpoint: Some(ep),
                })
            }
        };

        // The local connector: reachable by every user; SO_PEERCRED and the
        // policy decide who gets in.
        let instance = config.fingerprint().to_string();
        let rundir = opts.rundir.clone().unwrap_or_else(|| {
            std::env::temp_dir().join(format!(
                "canopy-system-{}",
                &instance[..instance.len().min(16)]
            ))
        });
        match std::fs::DirBuilder::new().mode(0o755).create(&rundir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(source) => {
                return Err(BrokerError::Io {
                    what: "create the runtime directory",
                    path: rundir,
                    source,
                })
            }
        }
        // Not a symlink, ours or root's, and nobody else can add to it.
        trusted(&rundir, TrustKind::RuntimeDir, "runtime directory")?;
        trusted(&rundir, TrustKind::Directory, "runtime directory")?;

        let owner_uid = nix::unistd::getuid().as_raw();
        let authz: Arc<dyn ClientAuthz> = match &config.policy().file {
            Some(p) => {
                let audit = config
                    .policy()
                    .audit_log
                    .as_deref()
                    .map(|a| crate::authz::audit_path(a, rank, &hostname));
                Arc::new(AclAuthz::load(p, audit.as_deref(), (rank, &hostname))?)
            }
            None => Arc::new(OwnerOnly {
                owner: unix_principal(owner_uid),
            }),
        };
        let transport = match config.bind_endpoint(rank) {
            Some(ep) => Transport::Endpoint(ep),
            None => Transport::Ipc,
        };
        let timing = config.timing().to_liveness();
        let client_listen = config.client_endpoint(rank);
        let bound = bind(
            rank,
            &topo,
            &keys,
            &rundir,
            &transport,
            authz,
            client_listen.as_deref(),
            &timing,
            budgets.max_message,
        )?;
        let kex = match &gss {
            Some(g) => {
                let kex = g.start(&bound, &keys)?;
                if let (Some(card), Some(key)) =
                    (parent.as_mut(), g.join_parent(&bound.policy, &keys)?)
                {
                    card.public_key = key;
                }
                kex
            }
            None => {
                bound.admit_children(&children);
                None
            }
        };
        let hosts = topo
            .subtree(rank)
            .into_iter()
            .filter_map(|r| config.host(r).map(|h| (r, h.to_string())))
            .collect();
        // Where each child connects from: its connect endpoint's host,
        // resolved now (a name that does not resolve just leaves it out).
        let child_addresses = topo
            .children(rank)
            .filter_map(|c| {
                let (h, _) = crate::gss::endpoint_host_port(&config.connect_endpoint(c)?)?;
                let h = h.trim_start_matches('[').trim_end_matches(']').to_string();
                let addrs: Vec<std::net::IpAddr> =
                    std::net::ToSocketAddrs::to_socket_addrs(&(h.as_str(), 0))
                        .ok()?
                        .map(|a| a.ip())
                        .collect();
                Some((c, addrs))
            })
            .collect();
        let plan = Plan {
            rank,
            topo,
            instance,
            rundir: rundir.clone(),
            keys,
            parent,
            children,
            owner_uid,
            timing,
            host: Some(hostname.clone()),
            hosts,
            budgets,
            child_addresses,
            exec: match config.exec_helper() {
                Some(path) => crate::exec::ExecPlan::Helper {
                    path: path.to_path_buf(),
                },
                None => crate::exec::ExecPlan::Off,
            },
        };
        self.state = Some(Started {
            config,
            rank,
            hostname,
            gss: gss.is_some(),
            rundir,
            kex,
        });
        Ok(crate::boot::Planned {
            plan,
            bound,
            pmi_fd: None,
        })
    }

    fn started(&mut self, mut broker: Broker) -> Result<Broker, BrokerError> {
        let Some(st) = &self.state else {
            return Ok(broker);
        };
        let rank = st.rank;
        // Key rotation is for CURVE certificates; under gssapi every link key
        // is fresh and bound by Kerberos, so there are no files to rotate.
        if !st.gss {
            let topo = st.config.topology().to_overlay()?;
            let files = crate::rotate::KeyFiles::from_config(
                &st.config,
                rank,
                topo.parent(rank).into_iter().chain(topo.children(rank)),
            )?;
            broker = broker.with_key_files(files)?;
        }
        broker = broker.with_clean_stop();
        let local = st.rundir.join(format!("local-{rank}"));
        if let Ok(p) = std::fs::metadata(&local) {
            let mut perm = p.permissions();
            perm.set_mode(0o666);
            let _ = std::fs::set_permissions(&local, perm);
        }
        // `RUNDIR/local`, the name tools find without CANOPY_URI when the
        // runtime directory is /run/canopy (the unit's): a symlink to this
        // broker's socket, replaced atomically.
        let link = st.rundir.join("local");
        let tmp = st.rundir.join(format!(".local-{rank}.tmp"));
        let _ = std::fs::remove_file(&tmp);
        let linked = std::os::unix::fs::symlink(format!("local-{rank}"), &tmp)
            .and_then(|()| std::fs::rename(&tmp, &link));
        if let Err(e) = linked {
            tracing::warn!(
                "cannot link {} to this broker's socket: {e}; tools need CANOPY_URI",
                link.display()
            );
        }
        sd_notify_ready();
        tracing::info!("system instance broker rank {rank} ({}) up", st.hostname);
        Ok(broker)
    }

    fn finish(&mut self) {
        if let Some(st) = self.state.as_mut() {
            st.kex = None;
        }
    }
}

/// This node's secret certificate.
fn load_keys(config: &Config, rank: u32) -> Result<canopy_security::CurveKeypair, BrokerError> {
    let secret_path = config.cert_path(rank).ok_or(BrokerError::NoCert {
        which: "secret",
        rank,
    })?;
    let keys =
        cert::load_secret(&secret_path)?
            .keypair()
            .ok_or_else(|| BrokerError::NoSecretKey {
                path: secret_path.clone(),
            })?;
    Ok(keys)
}

/// Tell systemd (Type=notify) that the broker is ready.
fn sd_notify_ready() {
    let Some(sock) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let path = PathBuf::from(&sock);
    if let Ok(s) = std::os::unix::net::UnixDatagram::unbound() {
        if let Err(e) = s.send_to(b"READY=1\n", &path) {
            tracing::warn!("sd_notify to {}: {e}", path.display());
        }
    }
}

/// `canopy config check PATH`: validate and summarize.
pub fn config_check(path: &Path) -> Result<String, BrokerError> {
    let config = Config::load(path)?;
    Ok(config.summary())
}
