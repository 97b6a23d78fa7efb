//! The admission worker: access decisions that may block, off the routing
//! loop. Resolving a uid's name (NSS: sssd or LDAP may hang), running a
//! site's delegate program, reading a policy file and writing the audit
//! log all happen here, on a few threads of their own; the loop hands a
//! [`Job`] over and gets a [`Done`] back through a wake-up socket, so one
//! slow decision delays only the client it is about.

use crate::authz::{ClientAuthz, Mech};
use crate::core::{Done, Job, Subject};
use canopy_proto::errno;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

/// Threads deciding at once: a hung delegate holds one of them.
const THREADS: usize = 4;

pub struct Worker {
    jobs: Option<Sender<Job>>,
    done: Receiver<Done>,
    /// Readable when a job is done.
    pub wake: UnixStream,
    threads: Vec<std::thread::JoinHandle<()>>,
    idle: Option<Idle>,
}

/// `unix:NAME`, or `unix:#UID` when the name cannot be resolved (no passwd
/// entry, or the name service failed): a principal that no name rule and
/// no wildcard matches (docs/security.md).
pub fn unix_principal(uid: u32) -> String {
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(u)) => format!("unix:{}", u.name),
        Ok(None) => format!("unix:#{uid}"),
        Err(e) => {
            tracing::warn!(uid, "local: cannot resolve the uid's name ({e}); it is treated as unresolved, which only a rule naming unix:#{uid} admits");
            format!("unix:#{uid}")
        }
    }
}

impl Worker {
    /// The queue and the wake-up socket; the threads start with the first
    /// job (an owner-only personal instance may never need one).
    pub fn start(authz: Arc<dyn ClientAuthz>) -> std::io::Result<Worker> {
        let (wake, waker) = UnixStream::pair()?;
        wake.set_nonblocking(true)?;
        waker.set_nonblocking(true)?;
        let (jobs_tx, jobs_rx) = channel::<Job>();
        let (done_tx, done_rx) = channel::<Done>();
        Ok(Worker {
            jobs: Some(jobs_tx),
            done: done_rx,
            wake,
            threads: Vec::new(),
            idle: Some(Idle {
                authz,
                jobs: Arc::new(Mutex::new(jobs_rx)),
                done: done_tx,
                waker: Arc::new(waker),
            }),
        })
    }

    fn spawn_threads(&mut self) {
        let Some(idle) = self.idle.take() else {
            return;
        };
        for i in 0..THREADS {
            let jobs = idle.jobs.clone();
            let done = idle.done.clone();
            let authz = idle.authz.clone();
            let waker = idle.waker.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("admission-{i}"))
                .spawn(move || loop {
                    let job = match jobs.lock() {
                        Ok(rx) => rx.recv(),
                        Err(_) => return,
                    };
                    let Ok(job) = job else { return };
                    if let Some(d) = run(&*authz, job) {
                        if done.send(d).is_err() {
                            return;
                        }
                        let _ = (&*waker).write(&[1]);
                    }
                });
            match spawned {
                Ok(t) => self.threads.push(t),
                // Fewer threads still decide; none at all is fatal below.
                Err(e) => tracing::error!("admission: cannot start a worker thread: {e}"),
            }
        }
    }

    pub fn submit(&mut self, job: Job) {
        self.spawn_threads();
        if self.threads.is_empty() {
            // No thread to decide: nothing is admitted (fail closed), and
            // the job's client waits until its connection is dropped.
            tracing::error!("admission: no worker thread; the access decision cannot be made");
            return;
        }
        if let Some(tx) = &self.jobs {
            let _ = tx.send(job);
        }
    }

    pub fn try_done(&self) -> Option<Done> {
        self.done.try_recv().ok()
    }
}

/// What the threads need, kept until the first job.
struct Idle {
    authz: Arc<dyn ClientAuthz>,
    jobs: Arc<Mutex<Receiver<Job>>>,
    done: Sender<Done>,
    waker: Arc<UnixStream>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Closing the queue ends idle threads; a thread stuck in a delegate
        // is not waited for (the delegate has its own timeout).
        self.jobs = None;
        for t in self.threads.drain(..) {
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}

fn run(authz: &dyn ClientAuthz, job: Job) -> Option<Done> {
    Some(match job {
        Job::Admit { ticket, subject } => Done::Admitted {
            ticket,
            verdict: admit(authz, &subject),
        },
        Job::Veto {
            ticket,
            principal,
            address,
        } => Done::Vetoed {
            ticket,
            veto: authz.vetoes(&principal, Mech::Curve, &address),
        },
        Job::Explain { req, query } => Done::Explained {
            req,
            result: explain(authz, &query),
        },
        Job::Whoami {
            req,
            principal,
            mech,
            address,
            grant,
        } => Done::Explained {
            req,
            result: Ok(whoami(authz, &principal, mech, &address, &grant)),
        },
        Job::ReloadPolicy { req } => Done::PolicyReloaded {
            req,
            result: authz.reload(),
        },
        Job::RoleRefused {
            principal,
            roles,
            topic,
        } => {
            authz.role_refused(&principal, roles, &topic);
            return None;
        }
        Job::ExecAudit { principal, what } => {
            authz.exec_audit(&principal, &what);
            return None;
        }
    })
}

fn admit(
    authz: &dyn ClientAuthz,
    s: &Subject,
) -> Result<(String, canopy_proto::Grant), (String, String)> {
    let principal = match (&s.principal, s.uid) {
        (Some(p), _) => p.clone(),
        (None, Some(uid)) => unix_principal(uid),
        (None, None) => return Err((String::new(), "no identity".into())),
    };
    match authz.decide(&principal, s.mech, &s.address) {
        Ok(grant) => Ok((principal, grant)),
        Err(reason) => Err((principal, reason)),
    }
}

/// `acl.check` (admin): payload `{"principal","mechanism","address"}`.
/// How the broker sees a connection, for `broker.whoami`: the principal,
/// the mechanism that authenticated it, the roles it was admitted with,
/// and the policy's deciding rule (none: the instance owner, with no
/// policy file).
fn whoami(
    authz: &dyn ClientAuthz,
    principal: &str,
    mech: Mech,
    address: &str,
    grant: &canopy_proto::Grant,
) -> Vec<u8> {
    let x = authz.explain(principal, mech, address);
    let body = serde_json::json!({
        "principal": principal,
        "mechanism": mech.as_str(),
        "roles": grant.roles.to_string(),
        "scoped": grant.scoped.iter().map(|(t, r)| serde_json::json!({"topics": t, "roles": r.to_string()})).collect::<Vec<_>>(),
        "register": grant.register,
        "address": address,
        "rule": x.as_ref().and_then(|x| x.rule.clone()),
        "reason": x.map(|x| x.reason).unwrap_or_else(|| "the instance owner (this instance has no policy file: only its owner may connect)".into()),
    });
    serde_json::to_vec(&body).unwrap_or_default()
}

fn explain(authz: &dyn ClientAuthz, query: &[u8]) -> Result<Vec<u8>, (u32, String)> {
    #[derive(serde::Deserialize)]
    struct Q {
        principal: String,
        #[serde(default)]
        mechanism: Option<String>,
        #[serde(default)]
        address: Option<String>,
    }
    let q: Q = serde_json::from_slice(query)
        .map_err(|e| (errno::EPROTO, format!("acl.check payload: {e}")))?;
    let mech = match q.mechanism.as_deref() {
        None if q.principal.starts_with("unix:") => Mech::Local,
        None if q.principal.starts_with("curve:") => Mech::Curve,
        None => Mech::Gssapi,
        Some("local") => Mech::Local,
        Some("curve") => Mech::Curve,
        Some("gssapi") => Mech::Gssapi,
        Some(other) => {
            return Err((
                errno::EINVAL,
                format!("unknown mechanism '{other}'; use curve, gssapi or local"),
            ))
        }
    };
    match authz.explain(&q.principal, mech, q.address.as_deref().unwrap_or("")) {
        Some(x) => Ok(serde_json::to_vec(&x).unwrap_or_default()),
        None => Err((
            errno::ENOENT,
            "this instance has no policy file: only its owner may connect".into(),
        )),
    }
}
