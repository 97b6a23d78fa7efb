//! One interface over PMI-1 and PMI-2, and the choice between them.

use std::fmt;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::client::{check_rank_size, parse_env, require_env, PMI_FD_TAKEN};
use crate::wire::WireError;
use crate::{Pmi2Client, PmiClient, PmiError};

/// How long one PMI call may wait for its answer when [`from_env`] built
/// the client, unless `CANOPY_PMI_TIMEOUT` says otherwise. A fence waits for
/// the slowest rank to start, so this is generous.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// The wire protocol a [`Pmi`] client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PmiVersion {
    /// PMI-1 "simple" (hydra's `mpiexec`, `canopy start`).
    V1,
    /// PMI-2 (`srun --mpi=pmi2`).
    V2,
}

impl fmt::Display for PmiVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PmiVersion::V1 => "pmi-1",
            PmiVersion::V2 => "pmi-2",
        })
    }
}

/// What a broker needs from a process manager, whichever wire protocol
/// carries it. Both [`PmiClient`] (PMI-1) and [`Pmi2Client`] (PMI-2)
/// implement it over a `UnixStream`; [`from_env`] returns one, initialized.
///
/// Keys and values that work with both: keys of at most 63 bytes and values
/// of at most 1023, both without whitespace, `;`, `=` (keys), backslashes or
/// control characters.
pub trait Pmi: fmt::Debug + Send {
    /// The protocol in use.
    fn version(&self) -> PmiVersion;
    /// This task's rank, 0..size.
    fn rank(&self) -> u32;
    /// The number of ranks in the job.
    fn size(&self) -> u32;
    /// The job's name: the PMI-1 kvsname or the PMI-2 job id (`12.0`).
    fn job_id(&self) -> &str;
    /// Stores `key`=`value`; other ranks see it after the next [`Pmi::fence`].
    fn put(&mut self, key: &str, value: &str) -> Result<(), PmiError>;
    /// Commits this rank's puts and waits until every rank has fenced
    /// (PMI-1 `barrier_in`, PMI-2 `kvs-fence`).
    fn fence(&mut self) -> Result<(), PmiError>;
    /// Reads a key some rank put before the last fence
    /// ([`PmiError::KeyNotFound`] if none did).
    fn get(&mut self, key: &str) -> Result<String, PmiError>;
    /// Tells the process manager this rank is done; later calls fail.
    fn finalize(&mut self) -> Result<(), PmiError>;
    /// Asks the process manager to end the whole job; no answer comes, so
    /// exit with `code` right after.
    fn abort(&mut self, code: i32, msg: &str) -> Result<(), PmiError>;
    /// Bounds how long one call waits (`None`: forever). A call that runs
    /// over fails with [`PmiError::Timeout`], and the connection is then
    /// unusable.
    fn set_timeout(&mut self, timeout: Option<Duration>) -> Result<(), PmiError>;
    /// The connection, to poll for EOF (the launcher went away) between
    /// calls; `try_clone_to_owned` it to keep it.
    fn fd(&self) -> BorrowedFd<'_>;
}

impl Pmi for PmiClient<UnixStream> {
    fn version(&self) -> PmiVersion {
        PmiVersion::V1
    }
    fn rank(&self) -> u32 {
        PmiClient::rank(self)
    }
    fn size(&self) -> u32 {
        PmiClient::size(self)
    }
    fn job_id(&self) -> &str {
        self.kvsname().unwrap_or_default()
    }
    fn put(&mut self, key: &str, value: &str) -> Result<(), PmiError> {
        let r = PmiClient::put(self, key, value);
        r.map_err(|e| v1_error(self, e))
    }
    fn fence(&mut self) -> Result<(), PmiError> {
        let r = PmiClient::barrier(self);
        r.map_err(|e| v1_error(self, e))
    }
    fn get(&mut self, key: &str) -> Result<String, PmiError> {
        let r = PmiClient::get(self, key);
        r.map_err(|e| v1_error(self, e))
    }
    fn finalize(&mut self) -> Result<(), PmiError> {
        let r = PmiClient::finalize(self);
        r.map_err(|e| v1_error(self, e))
    }
    fn abort(&mut self, code: i32, msg: &str) -> Result<(), PmiError> {
        PmiClient::abort(self, code, msg)
    }
    fn set_timeout(&mut self, timeout: Option<Duration>) -> Result<(), PmiError> {
        PmiClient::set_timeout(self, timeout)
    }
    fn fd(&self) -> BorrowedFd<'_> {
        self.as_fd()
    }
}

/// Names the rank in the errors the trait promises to: a timeout and a
/// server that answers garbage. Other errors pass unchanged.
fn v1_error(c: &PmiClient<UnixStream>, e: PmiError) -> PmiError {
    let rank = PmiClient::rank(c);
    let garbage = |detail: String| PmiError::Garbage {
        rank,
        version: 1,
        detail,
    };
    match e {
        PmiError::Io { op, source }
            if matches!(
                source.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            PmiError::Timeout {
                rank,
                op,
                after: c.timeout().unwrap_or_default(),
            }
        }
        // Refusals of our own input, not the server's doing.
        PmiError::Wire(
            WireError::BadChar { .. } | WireError::EmptyField { .. } | WireError::TooLong { .. },
        ) => e,
        PmiError::Wire(w) => garbage(w.to_string()),
        e @ (PmiError::Unexpected { .. }
        | PmiError::NotUtf8
        | PmiError::LineTooLong { .. }
        | PmiError::VersionMismatch { .. }) => garbage(e.to_string()),
        e => e,
    }
}

impl Pmi for Pmi2Client<UnixStream> {
    fn version(&self) -> PmiVersion {
        PmiVersion::V2
    }
    fn rank(&self) -> u32 {
        Pmi2Client::rank(self)
    }
    fn size(&self) -> u32 {
        Pmi2Client::size(self)
    }
    fn job_id(&self) -> &str {
        self.jobid()
    }
    fn put(&mut self, key: &str, value: &str) -> Result<(), PmiError> {
        Pmi2Client::put(self, key, value)
    }
    fn fence(&mut self) -> Result<(), PmiError> {
        Pmi2Client::fence(self)
    }
    fn get(&mut self, key: &str) -> Result<String, PmiError> {
        Pmi2Client::get(self, key)
    }
    fn finalize(&mut self) -> Result<(), PmiError> {
        Pmi2Client::finalize(self)
    }
    fn abort(&mut self, code: i32, msg: &str) -> Result<(), PmiError> {
        Pmi2Client::abort(self, code, msg)
    }
    fn set_timeout(&mut self, timeout: Option<Duration>) -> Result<(), PmiError> {
        Pmi2Client::set_timeout(self, timeout)
    }
    fn fd(&self) -> BorrowedFd<'_> {
        self.as_fd()
    }
}

/// Connects to the process manager that started this process, if any,
/// and initializes the connection.
///
/// The choice, in order:
///
/// 1. `PMI_FD` set: a PMI launcher started us. The protocol is PMI-2 when
///    `PMI_JOBID` is also set (`srun --mpi=pmi2` sets it; hydra's `mpiexec`
///    and `canopy start` do not), PMI-1 otherwise. `CANOPY_PMI=1` or
///    `CANOPY_PMI=2` overrides the guess (Slurm's pmi2 plugin answers both,
///    but all tasks of a node must use the same one). `PMI_RANK` and
///    `PMI_SIZE` must be set too.
/// 2. No `PMI_FD` but `PMIX_RANK`: `srun --mpi=pmix` or another PMIx
///    launcher; not supported yet, so an error says to use `--mpi=pmi2`.
/// 3. No `PMI_FD` but `SLURM_PROCID` and more than one task
///    (`SLURM_STEP_NUM_TASKS`): `srun` without `--mpi`; an error says to
///    add `--mpi=pmi2`.
/// 4. Otherwise `Ok(None)`: no launcher, run as a singleton.
///
/// Every call of the returned client waits at most `CANOPY_PMI_TIMEOUT`
/// seconds (0: forever; default [`DEFAULT_TIMEOUT`]). Takes `PMI_FD` (it
/// becomes close-on-exec), so it succeeds at most once per process, and it
/// shares that "once" with [`PmiClient::from_env`].
pub fn from_env() -> Result<Option<Box<dyn Pmi>>, PmiError> {
    let lookup = |name: &str| std::env::var_os(name).map(|v| v.to_string_lossy().into_owned());
    if lookup("PMI_FD").is_none() {
        return from_lookup(lookup);
    }
    if PMI_FD_TAKEN.swap(true, Ordering::SeqCst) {
        return Err(PmiError::AlreadyTaken);
    }
    let result = from_lookup(lookup);
    if result.is_err() {
        // Only a bad setting fails before the descriptor is taken; the
        // descriptor is closed in every other case, so a retry fails anyway.
        PMI_FD_TAKEN.store(false, Ordering::SeqCst);
    }
    result
}

/// The protocol [`from_env`] would use, without touching anything:
/// `Ok(None)` if `PMI_FD` is unset.
pub fn version_from_env() -> Result<Option<PmiVersion>, PmiError> {
    choose(&|name: &str| std::env::var_os(name).map(|v| v.to_string_lossy().into_owned()))
}

fn choose(lookup: &impl Fn(&str) -> Option<String>) -> Result<Option<PmiVersion>, PmiError> {
    let forced = match lookup("CANOPY_PMI").as_deref().map(str::trim) {
        None | Some("") => None,
        Some("1") => Some(PmiVersion::V1),
        Some("2") => Some(PmiVersion::V2),
        Some(other) => {
            return Err(PmiError::BadSetting {
                var: "CANOPY_PMI",
                value: other.to_owned(),
                fix: "set it to 1 (PMI-1) or 2 (PMI-2), or unset it to let canopy choose",
            })
        }
    };
    if lookup("PMI_FD").is_none() {
        return Ok(None);
    }
    Ok(Some(forced.unwrap_or(if lookup("PMI_JOBID").is_some() {
        PmiVersion::V2
    } else {
        PmiVersion::V1
    })))
}

fn timeout_from(lookup: &impl Fn(&str) -> Option<String>) -> Result<Option<Duration>, PmiError> {
    let Some(v) = lookup("CANOPY_PMI_TIMEOUT").filter(|v| !v.trim().is_empty()) else {
        return Ok(Some(DEFAULT_TIMEOUT));
    };
    match v.trim().parse::<f64>() {
        Ok(0.0) => Ok(None),
        Ok(s) if s.is_finite() && s > 0.0 && s < 1e9 => Ok(Some(Duration::from_secs_f64(s))),
        _ => Err(PmiError::BadSetting {
            var: "CANOPY_PMI_TIMEOUT",
            value: v,
            fix: "give a number of seconds (0 waits forever)",
        }),
    }
}

/// [`from_env`] with the environment supplied by `lookup` (and without the
/// once-per-process guard).
pub(crate) fn from_lookup(
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<Option<Box<dyn Pmi>>, PmiError> {
    let timeout = timeout_from(&lookup)?;
    let Some(version) = choose(&lookup)? else {
        return no_pmi_fd(&lookup);
    };
    let pmi: Box<dyn Pmi> = match version {
        PmiVersion::V1 => {
            let Some(c) = PmiClient::from_lookup(&lookup)? else {
                return Ok(None);
            };
            let mut c = Box::new(c);
            c.set_timeout(timeout)?;
            let r = c.init();
            r.map_err(|e| v1_error(&c, e))?;
            c
        }
        PmiVersion::V2 => {
            let fd_text = require_env(&lookup, "PMI_FD")?;
            let fd: i32 = parse_env("PMI_FD", &fd_text)?;
            let rank: u32 = parse_env("PMI_RANK", &require_env(&lookup, "PMI_RANK")?)?;
            let size: u32 = parse_env("PMI_SIZE", &require_env(&lookup, "PMI_SIZE")?)?;
            check_rank_size(rank, size)?;
            let jobid = lookup("PMI_JOBID").unwrap_or_default();
            let owned = canopy_sys::take_inherited_fd(fd).map_err(|source| PmiError::Fd {
                value: fd_text.clone(),
                source,
            })?;
            let mut c = Box::new(Pmi2Client::connect(
                UnixStream::from(owned),
                rank,
                size,
                &jobid,
            )?);
            c.set_timeout(timeout)?;
            c.init()?;
            c
        }
    };
    Ok(Some(pmi))
}

/// No `PMI_FD`: a singleton, unless a launcher is visibly there without
/// offering a PMI we speak.
fn no_pmi_fd(lookup: &impl Fn(&str) -> Option<String>) -> Result<Option<Box<dyn Pmi>>, PmiError> {
    if let Some(rank) = lookup("PMIX_RANK") {
        return Err(PmiError::PmixOnly {
            rank: rank.trim().to_owned(),
        });
    }
    let tasks = lookup("SLURM_STEP_NUM_TASKS")
        .or_else(|| lookup("SLURM_NTASKS"))
        .and_then(|n| n.trim().parse::<u32>().ok());
    if let (Some(rank), Some(size)) = (lookup("SLURM_PROCID"), tasks) {
        if size > 1 {
            return Err(PmiError::NoPmi {
                rank: rank.trim().to_owned(),
                size,
            });
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PmiServer;
    use std::collections::HashMap;
    use std::os::fd::IntoRawFd;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn the_choice() {
        let c = |pairs: &[(&str, &str)]| choose(&env(pairs));
        assert_eq!(c(&[]).unwrap(), None);
        assert_eq!(c(&[("PMI_JOBID", "1.0")]).unwrap(), None, "no fd, no pmi");
        assert_eq!(c(&[("PMI_FD", "5")]).unwrap(), Some(PmiVersion::V1));
        assert_eq!(
            c(&[("PMI_FD", "5"), ("PMI_JOBID", "1.0")]).unwrap(),
            Some(PmiVersion::V2)
        );
        assert_eq!(
            c(&[("PMI_FD", "5"), ("PMI_JOBID", "1.0"), ("CANOPY_PMI", "1")]).unwrap(),
            Some(PmiVersion::V1)
        );
        assert_eq!(
            c(&[("PMI_FD", "5"), ("CANOPY_PMI", " 2 ")]).unwrap(),
            Some(PmiVersion::V2)
        );
        let err = c(&[("PMI_FD", "5"), ("CANOPY_PMI", "pmix")]).unwrap_err();
        assert!(err.to_string().contains("CANOPY_PMI=pmix"), "{err}");
    }

    #[test]
    fn no_launcher_is_a_singleton() {
        assert!(from_lookup(env(&[])).unwrap().is_none());
        // srun -n 1 without --mpi: a singleton is right.
        assert!(
            from_lookup(env(&[("SLURM_PROCID", "0"), ("SLURM_STEP_NUM_TASKS", "1")]))
                .unwrap()
                .is_none()
        );
        // An allocation's shell (salloc, sbatch) has no SLURM_PROCID.
        assert!(
            from_lookup(env(&[("SLURM_NTASKS", "8"), ("SLURM_JOB_ID", "3")]))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn srun_without_mpi_says_to_add_it() {
        let err = from_lookup(env(&[
            ("SLURM_PROCID", "3"),
            ("SLURM_STEP_NUM_TASKS", "8"),
            ("SLURM_NTASKS", "8"),
        ]))
        .unwrap_err();
        assert!(matches!(err, PmiError::NoPmi { size: 8, .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("rank 3 of 8") && msg.contains("--mpi=pmi2"),
            "{msg}"
        );
    }

    #[test]
    fn pmix_only_says_to_use_pmi2() {
        let err = from_lookup(env(&[
            ("PMIX_RANK", "2"),
            ("PMIX_NAMESPACE", "slurm.pmix.3.0"),
            ("SLURM_PROCID", "2"),
            ("SLURM_STEP_NUM_TASKS", "4"),
        ]))
        .unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, PmiError::PmixOnly { .. }), "{err:?}");
        assert!(
            msg.contains("rank 2") && msg.contains("--mpi=pmi2"),
            "{msg}"
        );
    }

    #[test]
    fn timeouts_from_the_environment() {
        let t = |v: &str| timeout_from(&env(&[("CANOPY_PMI_TIMEOUT", v)]));
        assert_eq!(timeout_from(&env(&[])).unwrap(), Some(DEFAULT_TIMEOUT));
        assert_eq!(t("0").unwrap(), None);
        assert_eq!(t("2.5").unwrap(), Some(Duration::from_millis(2500)));
        for bad in ["-1", "soon", "inf", "NaN"] {
            let err = t(bad).unwrap_err().to_string();
            assert!(
                err.contains("CANOPY_PMI_TIMEOUT") && err.contains("seconds"),
                "{err}"
            );
        }
    }

    /// Both protocols through the trait: PMI-1 against canopy start's own
    /// server, every rank on its own thread.
    #[test]
    fn pmi1_through_the_trait_against_the_real_server() {
        let (server, children) = PmiServer::new(3).unwrap();
        let handle = server.spawn().unwrap();
        let threads: Vec<_> = children
            .into_iter()
            .enumerate()
            .map(|(rank, s)| {
                let fd = s.into_raw_fd().to_string();
                std::thread::spawn(move || {
                    let mut p = from_lookup(env(&[
                        ("PMI_FD", &fd),
                        ("PMI_RANK", &rank.to_string()),
                        ("PMI_SIZE", "3"),
                        ("CANOPY_PMI_TIMEOUT", "10"),
                    ]))
                    .unwrap()
                    .unwrap();
                    assert_eq!(p.version(), PmiVersion::V1);
                    assert_eq!((p.rank(), p.size()), (rank as u32, 3));
                    assert!(p.job_id().starts_with("kvs_"), "{}", p.job_id());
                    p.put(&format!("k{rank}"), &format!("v{rank}")).unwrap();
                    p.fence().unwrap();
                    let all: Vec<String> =
                        (0..3).map(|r| p.get(&format!("k{r}")).unwrap()).collect();
                    assert!(matches!(p.get("nope"), Err(PmiError::KeyNotFound { .. })));
                    p.finalize().unwrap();
                    all
                })
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap(), ["v0", "v1", "v2"]);
        }
        handle.stop();
    }

    /// A PMI-1 fence that a rank never joins times out, naming the rank.
    #[test]
    fn pmi1_fence_timeout_names_the_rank() {
        let (server, children) = PmiServer::new(2).unwrap();
        let handle = server.spawn().unwrap();
        let mut it = children.into_iter();
        let fd = it.next().unwrap().into_raw_fd().to_string();
        let _idle_rank_1 = it.next().unwrap();
        let mut p = from_lookup(env(&[
            ("PMI_FD", &fd),
            ("PMI_RANK", "0"),
            ("PMI_SIZE", "2"),
            ("CANOPY_PMI_TIMEOUT", "0.3"),
        ]))
        .unwrap()
        .unwrap();
        let err = p.fence().unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(
                err,
                PmiError::Timeout {
                    rank: 0,
                    op: "barrier_in",
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(msg.contains("rank 0") && msg.contains("300ms"), "{msg}");
        handle.stop();
    }

    /// canopy start's PMI-1 server refuses a PMI-2 init; the error names
    /// the rank and says to use PMI-1.
    #[test]
    fn pmi2_against_a_pmi1_server_is_refused_clearly() {
        let (server, children) = PmiServer::new(1).unwrap();
        let handle = server.spawn().unwrap();
        let fd = children
            .into_iter()
            .next()
            .unwrap()
            .into_raw_fd()
            .to_string();
        let err = from_lookup(env(&[
            ("PMI_FD", &fd),
            ("PMI_RANK", "0"),
            ("PMI_SIZE", "1"),
            ("CANOPY_PMI", "2"),
            ("CANOPY_PMI_TIMEOUT", "5"),
        ]))
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, PmiError::Pmi2Refused { rank: 0, .. }),
            "{err:?}"
        );
        assert!(msg.contains("CANOPY_PMI=1"), "{msg}");
        handle.stop();
    }
}
