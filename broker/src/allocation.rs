//! `canopy start` under a launcher (`srun --mpi=pmi2`, MPICH's `mpiexec`):
//! each task is one broker of the instance, bootstrapped through the
//! launcher's PMI, listening where its interface hint says.
//!
//! Rank 0 waits until every rank is online, then runs the command with
//! `CANOPY_URI` set. When the command exits, rank 0 publishes the owner-only
//! event `instance.shutdown` with its exit status; every broker forwards it,
//! waits (briefly) for its children to leave, and exits with that status,
//! so every task, and so `srun` or `mpiexec`, returns the command's status.
//!
//! What fails closed: an event that cannot be read ends with status 1; a
//! broker that loses its parent link exits with status 1 (no one restarts
//! brokers under a launcher, so it would otherwise wait forever), and so in
//! turn does its subtree; rank 0 exits when its broker stops for any
//! reason, killing the command. A guest (`--allow`) cannot end the
//! instance: only the owner may publish `instance.shutdown`.

use crate::boot::Bootstrap;
use crate::bootstrap::{BrokerOpts, PmiBootstrap};
use crate::core::SHUTDOWN_TOPIC;
use crate::error::BrokerError;
use crate::launcher::say;
use canopy_client::Client;
use canopy_modules::StatusReport;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Options for `canopy start` under a launcher.
pub struct AllocOpts {
    /// The broker's options (`interface` set; `rundir` the parent
    /// directory given with `--rundir`, if any).
    pub broker: BrokerOpts,
    /// `--size`, if given: must equal the number of tasks.
    pub size: Option<u32>,
    /// How long rank 0 waits for every rank to come online.
    pub timeout: Duration,
    /// A policy from `--allow`, written into the runtime directory.
    pub policy_text: Option<String>,
    pub command: Vec<String>,
}

/// Variables that show a launcher started this process: a PMI-1/PMI-2
/// connection or its rank and size, PMIx, or `srun` with more than one
/// task (which offers no PMI without `--mpi`; the bootstrap then says so).
pub fn launched() -> bool {
    launched_in(|v| std::env::var(v).ok())
}

fn launched_in(get: impl Fn(&str) -> Option<String>) -> bool {
    let has = |v: &str| get(v).is_some_and(|x| !x.trim().is_empty());
    let srun_tasks = get("SLURM_STEP_NUM_TASKS")
        .and_then(|n| n.trim().parse::<u32>().ok())
        .unwrap_or(0);
    has("PMI_FD")
        || (has("PMI_RANK") && has("PMI_SIZE"))
        || has("PMIX_RANK")
        || (has("SLURM_PROCID") && srun_tasks > 1)
}

/// The size check: `--size` and the launcher's task count must agree with
/// the PMI size.
fn check_size(
    rank: u32,
    pmi_size: u32,
    flag: Option<u32>,
    slurm_tasks: Option<u32>,
) -> Result<(), String> {
    if let Some(n) = flag.filter(|n| *n != pmi_size) {
        return Err(format!(
            "rank {rank}: --size {n}, but the launcher started {pmi_size} tasks; under a launcher each task is one broker: drop --size (or launch {n} tasks)"
        ));
    }
    if let Some(t) = slurm_tasks.filter(|t| *t != pmi_size) {
        return Err(format!(
            "rank {rank}: pmi reports {pmi_size} ranks but srun started {t} tasks (SLURM_STEP_NUM_TASKS); all tasks of the step must be brokers of one instance: check --mpi and that no other launcher is nested"
        ));
    }
    Ok(())
}

/// Run this task's broker (and, on rank 0, the command). Returns the exit
/// status for this task. Errors are printed here, naming the rank.
pub fn run(opts: AllocOpts) -> i32 {
    match run_inner(opts) {
        Ok(code) => code,
        Err(msg) => {
            say(&format!("error: {msg}"));
            1
        }
    }
}

fn run_inner(mut opts: AllocOpts) -> Result<i32, String> {
    crate::bootstrap::check_libzmq().map_err(|e| e.to_string())?;
    let pmi = canopy_pmi::from_env().map_err(|e| e.to_string())?.ok_or_else(|| {
        "started by a launcher but no pmi was found; run `srun --mpi=pmi2 canopy start ...` or `mpiexec -n N canopy start ...`".to_string()
    })?;
    let (rank, size) = (pmi.rank(), pmi.size());
    let slurm_tasks = std::env::var("SLURM_STEP_NUM_TASKS")
        .ok()
        .and_then(|n| n.trim().parse().ok())
        .filter(|_| std::env::var_os("SLURM_PROCID").is_some());
    if let Err(msg) = check_size(rank, size, opts.size, slurm_tasks) {
        // Said before the abort, which may end this task at once.
        say(&format!("error: {msg}"));
        let mut pmi = pmi;
        let _ = pmi.abort(1, &msg);
        return Ok(1);
    }
    let instance = match &opts.broker.instance {
        Some(i) => i.clone(),
        None if pmi.job_id().is_empty() => "pmi".to_string(),
        None => pmi.job_id().to_string(),
    };
    // `--rundir DIR` names where the instance's directory goes.
    let rundir = match &opts.broker.rundir {
        Some(parent) => parent.join(format!("canopy-{}", sanitize(&instance))),
        None => crate::bootstrap::default_rundir(&instance),
    };
    crate::bootstrap::ensure_private_dir(&rundir).map_err(|e| format!("rank {rank}: {e}"))?;
    let mut policy_file = None;
    if let Some(text) = &opts.policy_text {
        let path = rundir.join(format!("policy-{rank}.toml"));
        write_private(&path, text).map_err(|e| format!("rank {rank}: {e}"))?;
        opts.broker.policy = Some(path.clone());
        policy_file = Some(path);
    }
    opts.broker.rundir = Some(rundir.clone());
    opts.broker.instance = Some(instance.clone());
    let mut boot = PmiBootstrap::new(opts.broker.clone(), Some(pmi));
    let broker = match crate::boot::build(&mut boot) {
        Ok(b) => b.with_launcher_mode(),
        Err(e) => {
            cleanup(&rundir, policy_file.as_deref());
            return Err(with_rank(rank, &e));
        }
    };
    let command_pid = Arc::new(AtomicI32::new(0));
    if rank == 0 {
        let uri = format!("local://{}", rundir.join("local-0").display());
        let (pid, timeout, command) = (command_pid.clone(), opts.timeout, opts.command.clone());
        std::thread::Builder::new()
            .name("command".into())
            .spawn(move || rank0(&uri, size, &instance, timeout, &command, &pid))
            .map_err(|e| format!("rank 0: cannot start the command thread: {e}"))?;
    }
    let result = broker.run();
    let pid = command_pid.load(Ordering::SeqCst);
    if pid > 0 {
        // The instance ended before the command: stop it.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    if let Some(p) = &policy_file {
        let _ = std::fs::remove_file(p);
    }
    boot.finish();
    let _ = std::fs::remove_file(rundir.join(format!("tbon-{rank}")));
    let _ = std::fs::remove_dir(&rundir);
    match result {
        Ok(()) => Ok(128 + nix::sys::signal::Signal::SIGTERM as i32),
        Err(BrokerError::InstanceEnded { status }) => Ok(status),
        Err(e) if e.launcher_gone() => {
            tracing::debug!("exiting: {e}");
            Ok(1)
        }
        Err(e) => Err(with_rank(rank, &e)),
    }
}

fn with_rank(rank: u32, e: &BrokerError) -> String {
    let msg = e.to_string();
    if msg.contains(&format!("rank {rank}:")) || msg.contains(&format!("rank {rank} of")) {
        msg
    } else {
        // The node too: a missing credential or library is per node.
        format!("rank {rank} (on {}): {msg}", crate::iface::display_host())
    }
}

fn cleanup(rundir: &std::path::Path, policy: Option<&std::path::Path>) {
    if let Some(p) = policy {
        let _ = std::fs::remove_file(p);
    }
    let _ = std::fs::remove_dir(rundir);
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn write_private(path: &std::path::Path, text: &str) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Rank 0's command thread: wait for every rank, run the command, end the
/// instance with its status.
fn rank0(
    uri: &str,
    size: u32,
    instance: &str,
    timeout: Duration,
    command: &[String],
    pid: &AtomicI32,
) {
    let end = |status: i32| {
        // The broker exits on the event; if it is already gone, so is the
        // instance.
        if let Ok(mut c) = Client::connect(Some(uri)) {
            let _ = c.publish(
                SHUTDOWN_TOPIC,
                status.to_string().as_bytes(),
                Duration::from_secs(5),
            );
        }
    };
    let t0 = Instant::now();
    let mut online = 0;
    let mut client: Option<Client> = None;
    loop {
        if client.is_none() {
            client = Client::connect(Some(uri)).ok();
        }
        if let Some(c) = client.as_mut() {
            match c.rpc(
                "overlay.status",
                0,
                br#"{"summary":true}"#,
                Duration::from_secs(5),
            ) {
                Ok(m) => {
                    if let Ok(r) = serde_json::from_slice::<StatusReport>(&m.payload) {
                        online = r.online;
                        if r.online == size as usize {
                            break;
                        }
                    }
                }
                Err(_) => client = None,
            }
        }
        if t0.elapsed() > timeout {
            say(&format!(
                "error: rank 0: the instance did not come up within {timeout:?}: {online} of {size} brokers online; raise --timeout or read the other ranks' errors"
            ));
            return end(1);
        }
        std::thread::sleep(Duration::from_millis(if online > 0 { 2 } else { 1 }));
    }
    drop(client);
    tracing::info!(
        "instance {instance}: {size} brokers online after {:?}",
        t0.elapsed()
    );
    let Some((prog, args)) = command.split_first() else {
        let text = format!(
            "canopy: {size} brokers up (instance {instance}, rank 0 on {}); they stop when the job ends\nexport CANOPY_URI={uri}\n",
            crate::iface::display_host()
        );
        let mut out = std::io::stdout().lock();
        let _ = std::io::Write::write_all(&mut out, text.as_bytes())
            .and_then(|()| std::io::Write::flush(&mut out));
        return;
    };
    let mut cmd = Command::new(prog);
    cmd.args(args).env("CANOPY_URI", uri);
    // A nested `canopy start` must not take this job's PMI for its own.
    for v in ["PMI_FD", "PMI_RANK", "PMI_SIZE", "PMI_JOBID", "PMI_SPAWNED"] {
        cmd.env_remove(v);
    }
    let status = match cmd.spawn() {
        Ok(mut child) => {
            pid.store(child.id() as i32, Ordering::SeqCst);
            let st = child.wait();
            pid.store(0, Ordering::SeqCst);
            match st {
                Ok(st) => {
                    use std::os::unix::process::ExitStatusExt;
                    st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0))
                }
                Err(e) => {
                    say(&format!("error: rank 0: waiting for '{prog}': {e}"));
                    1
                }
            }
        }
        Err(e) => {
            say(&format!(
                "error: rank 0: cannot run '{prog}': {e}; check the command and PATH on rank 0's node"
            ));
            127
        }
    };
    end(status);
}

/// Where `canopy start` under a launcher keeps an instance's sockets when
/// `--rundir` is not given (for the docs and tests).
pub fn default_rundir(instance: &str) -> PathBuf {
    crate::bootstrap::default_rundir(instance)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn what_counts_as_a_launcher() {
        assert!(!launched_in(env(&[])));
        assert!(launched_in(env(&[("PMI_FD", "5")])));
        assert!(launched_in(env(&[("PMI_RANK", "0"), ("PMI_SIZE", "4")])));
        assert!(!launched_in(env(&[("PMI_RANK", "0")])));
        assert!(launched_in(env(&[("PMIX_RANK", "1")])));
        // srun without --mpi, several tasks: launched (and an error follows).
        assert!(launched_in(env(&[
            ("SLURM_PROCID", "1"),
            ("SLURM_STEP_NUM_TASKS", "4")
        ])));
        // srun -n 1, or an allocation's shell: a local instance.
        assert!(!launched_in(env(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_STEP_NUM_TASKS", "1")
        ])));
        assert!(!launched_in(env(&[
            ("SLURM_NTASKS", "8"),
            ("SLURM_JOB_ID", "3")
        ])));
    }

    #[test]
    fn size_mismatches_name_the_rank_and_the_fix() {
        assert!(check_size(0, 8, None, Some(8)).is_ok());
        assert!(check_size(0, 8, Some(8), None).is_ok());
        let e = check_size(3, 8, Some(4), None).unwrap_err();
        assert!(
            e.contains("rank 3") && e.contains("--size 4") && e.contains("drop --size"),
            "{e}"
        );
        let e = check_size(2, 8, None, Some(6)).unwrap_err();
        assert!(
            e.contains("rank 2") && e.contains("8 ranks") && e.contains("6 tasks"),
            "{e}"
        );
    }
}
