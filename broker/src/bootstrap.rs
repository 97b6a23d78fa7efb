//! `canopy broker`: bootstrap one broker through PMI, then run it.
//!
//! The same code path serves `canopy start` (our own PMI-1 server),
//! MPICH's `mpiexec` (PMI-1) and `srun --mpi=pmi2` (PMI-2), through
//! `canopy_pmi::from_env` and the `Pmi` trait. Without `PMI_FD` the broker
//! runs as a singleton instance of size 1.

use crate::authz::{ClientAuthz, OwnerOnly};
pub use crate::boot::check_libzmq;
use crate::error::BrokerError;
use crate::node::{bind, Card, Plan, Transport};
use canopy_overlay::Topology;
use canopy_pmi::Pmi;
use canopy_security::{curve_principal, CurveKeypair};
use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;

/// Options for one broker.
#[derive(Clone)]
pub struct BrokerOpts {
    pub fanout: u32,
    /// Private runtime directory for sockets. Default: one per instance
    /// under `$XDG_RUNTIME_DIR` or the temp dir.
    pub rundir: Option<PathBuf>,
    /// Instance id shared by every broker. Default: the PMI kvsname.
    pub instance: Option<String>,
    pub transport: Transport,
    /// Bind a remote client endpoint here (e.g. `tcp://0.0.0.0:7700`).
    pub client_listen: Option<String>,
    /// Heartbeat, torpid and lost timings.
    pub timing: canopy_overlay::liveness::Timing,
    /// Decides for clients other than the owner. Default: the policy
    /// file if one is given, else owner only.
    pub client_authz: Option<Arc<dyn ClientAuthz>>,
    /// ACL policy file for clients.
    pub policy: Option<PathBuf>,
    /// Audit log; rank R > 0 appends to `PATH.R`.
    pub audit: Option<PathBuf>,
    /// Authenticate with Kerberos (`--mechanism gssapi`); `None` is CURVE
    /// with bootstrap-issued keys.
    pub gss: Option<crate::gss::GssOpts>,
    /// Listen on TCP at the address this hint picks (and on ipc for the
    /// brokers of this host, which use it); `None`: `transport`.
    pub interface: Option<crate::iface::Hint>,
    /// What clients can make this broker hold (`--max-message` etc.).
    pub budgets: crate::core::Budgets,
}

/// Create (or reuse, if it is ours and private) a runtime directory: its
/// parent must be trusted (ours or root's, not writable by others unless
/// sticky, not a symlink); the directory is created with mode 0700, or an
/// existing one opened with `O_NOFOLLOW | O_DIRECTORY`, and what was
/// created or opened is checked through its descriptor (a directory owned
/// by this user, mode 0700): a symlink or someone else's directory planted
/// at its name is refused (`canopy_security::trust::ensure_private_dir`).
pub fn ensure_private_dir(dir: &std::path::Path) -> Result<(), BrokerError> {
    use canopy_security::trust;
    trust::ensure_private_dir(dir, trust::service_uid())
        .map(|_| ())
        .map_err(|source| BrokerError::Untrusted {
            what: "runtime directory",
            source,
        })
}

/// Bootstrap through PMI (or as a singleton) and run until told to stop.
pub fn run_broker(opts: BrokerOpts) -> Result<(), BrokerError> {
    let mut boot = PmiBootstrap::from_env(opts)?;
    crate::boot::run(&mut boot)
}

/// PMI key of rank R's business card (`HEXKEY,ENDPOINT`).
fn card_key(rank: u32) -> String {
    format!("canopy.{rank}")
}

/// PMI key of rank R's host: `HOSTID,HOSTNAME,IPC-ENDPOINT` (brokers with
/// the same host id connect over the ipc endpoint).
fn host_key(rank: u32) -> String {
    format!("canopy-host.{rank}")
}

/// The bootstrap through PMI (PMI-1 or PMI-2, whichever the launcher
/// offers; see `canopy_pmi::from_env`), or a singleton without a launcher.
pub struct PmiBootstrap {
    opts: BrokerOpts,
    pmi: Option<Box<dyn Pmi>>,
    rank: u32,
    size: u32,
    job: String,
    rundir: Option<PathBuf>,
    kex: Option<canopy_gss::KexServer>,
}

impl PmiBootstrap {
    /// Connect to the launcher named by the environment (and initialize).
    pub fn from_env(opts: BrokerOpts) -> Result<PmiBootstrap, BrokerError> {
        let pmi = canopy_pmi::from_env()?;
        Ok(PmiBootstrap::new(opts, pmi))
    }

    /// With an initialized PMI client (`None`: a singleton).
    pub fn new(opts: BrokerOpts, pmi: Option<Box<dyn Pmi>>) -> PmiBootstrap {
        let (rank, size, job) = match &pmi {
            Some(p) => (p.rank(), p.size(), p.job_id().to_string()),
            None => (0, 1, "singleton".to_string()),
        };
        let job = if job.is_empty() {
            "pmi".to_string()
        } else {
            job
        };
        PmiBootstrap {
            opts,
            pmi,
            rank,
            size,
            job,
            rundir: None,
            kex: None,
        }
    }

    pub fn rank(&self) -> u32 {
        self.rank
    }

    pub fn size(&self) -> u32 {
        self.size
    }

    /// The instance id: `--instance`, else the PMI job id.
    pub fn instance(&self) -> String {
        self.opts
            .instance
            .clone()
            .unwrap_or_else(|| self.job.clone())
    }

    /// The PMI client, e.g. to abort the job.
    pub fn pmi(&mut self) -> Option<&mut Box<dyn Pmi>> {
        self.pmi.as_mut()
    }
}

impl crate::boot::Bootstrap for PmiBootstrap {
    fn plan(&mut self) -> Result<crate::boot::Planned, BrokerError> {
        let opts = self.opts.clone();
        let rank = self.rank;
        let topo = Topology::new(self.size, opts.fanout)?;
        let instance = self.instance();
        let rundir = match &opts.rundir {
            Some(d) => d.clone(),
            None => default_rundir(&instance),
        };
        // With an interface hint: listen on TCP at the hinted address (and
        // on ipc for brokers of this host); fails here, before any fence,
        // if the hint matches nothing.
        let transport = match &opts.interface {
            Some(hint) => Transport::Auto {
                addr: crate::iface::resolve(hint, rank)?,
            },
            None => opts.transport.clone(),
        };
        ensure_private_dir(&rundir)?;
        if opts.rundir.is_none() {
            self.rundir = Some(rundir.clone());
        }
        let _span = tracing::error_span!("broker", rank).entered();

        let keys = CurveKeypair::generate()?;
        let owner_uid = nix::unistd::getuid().as_raw();
        // gssapi: every broker of a user instance is the user. Credentials are
        // checked now, so a missing one fails before anything else starts.
        let gss_me = match &opts.gss {
            Some(g) => Some(crate::gss::own_principal(g)?),
            None => None,
        };
        let authz: Arc<dyn ClientAuthz> = match (&opts.client_authz, &opts.policy) {
            (Some(a), _) => a.clone(),
            (None, Some(policy)) => {
                let host = crate::iface::hostname();
                let audit = opts.audit.as_ref().map(|a| {
                    if crate::authz::audit_path_is_template(a) {
                        crate::authz::audit_path(a, rank, &host)
                    } else if rank == 0 {
                        a.clone()
                    } else {
                        let mut p = a.clone().into_os_string();
                        p.push(format!(".{rank}"));
                        PathBuf::from(p)
                    }
                });
                Arc::new(crate::authz::AclAuthz::load(
                    policy,
                    audit.as_deref(),
                    (rank, &host),
                )?)
            }
            (None, None) => Arc::new(OwnerOnly {
                owner: crate::node::unix_principal(owner_uid),
            }),
        };
        // gssapi: the owner's Kerberos principal is the owner too.
        let authz: Arc<dyn ClientAuthz> = match &gss_me {
            Some(me) => {
                let has_policy = opts.client_authz.is_some() || opts.policy.is_some();
                Arc::new(crate::gss::KrbOwner {
                    unix: crate::node::unix_principal(owner_uid),
                    principal: me.clone(),
                    inner: has_policy.then_some(authz),
                })
            }
            None => authz,
        };
        let bound = bind(
            rank,
            &topo,
            &keys,
            &rundir,
            &transport,
            authz,
            opts.client_listen.as_deref().filter(|_| rank == 0),
            &opts.timing,
            opts.budgets.max_message,
        )?;
        let card = Card {
            public_key: *keys.public(),
            endpoint: bound.endpoint.clone(),
        };
        let kex = match (&opts.gss, &gss_me) {
            (Some(g), Some(me)) => crate::gss::setup_user_instance(
                rank,
                &topo,
                me,
                g,
                &bound,
                &keys,
                &rundir,
                &transport,
                opts.client_listen.is_some(),
            )?,
            _ => None,
        };

        let host = crate::iface::display_host();
        let mut hosts = std::collections::BTreeMap::new();
        hosts.insert(rank, host.clone());
        let mut parent = None;
        let mut children = HashMap::new();
        let mut pmi_fd: Option<OwnedFd> = None;
        let auto = matches!(transport, Transport::Auto { .. });
        if let Some(c) = self.pmi.as_mut() {
            c.put(&card_key(rank), &card.encode())?;
            let host_id = crate::iface::host_id();
            if auto {
                let ipc = card
                    .endpoint
                    .as_ref()
                    .map(|_| format!("ipc://{}/tbon-{rank}", rundir.display()));
                c.put(
                    &host_key(rank),
                    &format!("{host_id},{host},{}", ipc.as_deref().unwrap_or("-")),
                )?;
            }
            if gss_me.is_some() {
                let addr = kex.as_ref().map(|k| k.addr().to_string());
                c.put(
                    &format!("canopy-kex.{rank}"),
                    addr.as_deref().unwrap_or("-"),
                )?;
            }
            c.fence()?;
            let get_card = |c: &mut Box<dyn Pmi>, r: u32| -> Result<Card, BrokerError> {
                let v = c.get(&card_key(r))?;
                Card::decode(&v).map_err(|source| BrokerError::Card {
                    rank,
                    of: r,
                    source,
                })
            };
            if let Some(p) = topo.parent(rank) {
                let mut pc = get_card(c, p)?;
                if auto {
                    let v = c.get(&host_key(p))?;
                    let mut f = v.splitn(3, ',');
                    let (pid, pipc) = (f.next().unwrap_or(""), f.nth(1).unwrap_or("-"));
                    // The same host: the parent's ipc endpoint, not TCP.
                    if pid == host_id && pipc != "-" {
                        pc.endpoint = Some(pipc.to_string());
                    }
                }
                parent = Some(pc);
            }
            for child in topo.children(rank) {
                let cc = get_card(c, child)?;
                // gssapi: a child is admitted as the principal its key is bound to.
                let principal = gss_me
                    .clone()
                    .unwrap_or_else(|| curve_principal(&cc.public_key));
                children.insert(child, principal);
            }
            if auto {
                for r in topo.subtree(rank).into_iter().filter(|r| *r != rank) {
                    let v = c.get(&host_key(r))?;
                    if let Some(name) = v.split(',').nth(1) {
                        hosts.insert(r, name.to_string());
                    }
                }
            }
            // Second fence: every parent admits its children's keys before
            // any child connects (a denied CURVE handshake is not retried).
            if gss_me.is_none() {
                bound.admit_children(&children);
            }
            c.fence()?;
            // gssapi: bind our key to our principal at the parent's key
            // exchange before connecting (fails fast, with the reason).
            if let (Some(g), Some(me), Some(p), Some(pc)) =
                (&opts.gss, &gss_me, topo.parent(rank), &parent)
            {
                let addr = c.get(&format!("canopy-kex.{p}"))?;
                crate::gss::join_and_renew(&bound.policy, &addr, me, g, pc.public_key, &keys)?;
            }
            pmi_fd = c.fd().try_clone_to_owned().ok();
        }
        self.kex = kex;
        let plan = Plan {
            rank,
            topo,
            instance,
            rundir,
            keys,
            parent,
            children,
            owner_uid,
            timing: opts.timing,
            host: Some(host),
            hosts,
            budgets: opts.budgets,
            child_addresses: Default::default(),
            // A personal instance runs commands as its owner, or through
            // the canopy-imp helper named by CANOPY_EXEC_HELPER (the
            // system instance's path, for trying it and benchmarking it
            // in one's own instance).
            exec: match std::env::var_os(crate::exec::HELPER_ENV) {
                Some(p) if !p.is_empty() => crate::exec::ExecPlan::Helper { path: p.into() },
                _ => crate::exec::ExecPlan::Direct,
            },
        };
        Ok(crate::boot::Planned {
            plan,
            bound,
            pmi_fd,
        })
    }

    fn finish(&mut self) {
        self.kex = None;
        if let Some(c) = self.pmi.as_mut() {
            let _ = c.finalize();
        }
        if let Some(dir) = self.rundir.take() {
            // Auto transport: our ipc listener (the broker removes only
            // the endpoint it reports, the TCP one).
            let _ = std::fs::remove_file(dir.join(format!("tbon-{}", self.rank)));
            // Last one out removes the shared directory; fails harmlessly if not empty.
            let _ = std::fs::remove_dir(&dir);
        }
    }
}

/// `$XDG_RUNTIME_DIR/canopy-INSTANCE`, or `TMPDIR/canopy-UID-INSTANCE`.
pub fn default_rundir(instance: &str) -> PathBuf {
    let safe: String = instance
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    match std::env::var_os("XDG_RUNTIME_DIR") {
        // A launcher may carry the submitting shell's XDG_RUNTIME_DIR to a
        // node where it does not exist.
        Some(d) if !d.is_empty() && std::path::Path::new(&d).is_dir() => {
            PathBuf::from(d).join(format!("canopy-{safe}"))
        }
        _ => std::env::temp_dir().join(format!("canopy-{}-{safe}", nix::unistd::getuid())),
    }
}
