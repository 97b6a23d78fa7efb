//! A throwaway Slurm cluster for tests (and for a site's own tests).
//!
//! [`Slurm::start`] is one call: a temp dir holding a munge key and a
//! `slurm.conf`, free ports on 127.0.0.1, then `munged`, `slurmctld` and
//! `slurmd` in the foreground as children of this process, and a wait until
//! the node is idle: about 1.1 s in all, most of it slurmd registering.
//! [`Slurm::start_in`] does the same with one slurmd per network namespace
//! of a [`crate::netns::Net`], for a real multi-node allocation. Nothing touches the test process's
//! own environment: [`Slurm::command`] returns a `Command` with `SLURM_CONF`
//! (which every client command needs) set.
//!
//! The cluster needs no cgroups and no system configuration: Debian's
//! Slurm 22.05 with `ProctrackType=proctrack/linuxproc`,
//! `TaskPlugin=task/none`, `JobAcctGatherType=jobacct_gather/none`,
//! `AccountingStorageType=accounting_storage/none` and
//! `SlurmdParameters=config_overrides`, one node `n0` with
//! `NodeAddr=127.0.0.1` and `CPUs=16`, and a private munged (its own
//! `--socket`, `--key-file`, `--pid-file`, `--log-file`) that Slurm finds
//! through `AuthInfo=socket=…`. It runs as root (slurmd must, to start
//! tasks); `MpiDefault=none`, so a test asks for `--mpi=pmi2` itself.
//!
//! Teardown, on [`Slurm::stop`] or drop (also while a test panics), and by
//! [`crate::run_test`]'s watchdog if a test overruns: every job process is
//! SIGKILLed (found by the `SLURM_CONF=<dir>/slurm.conf` entry that the
//! daemons, slurmstepd, every [`Slurm::command`] and so every job task carry
//! in their environment), then the daemons by pid (SIGTERM, SIGKILL after a
//! second), and the directory goes.
//!
//! When the packages are not installed, or the tests do not run as root,
//! [`missing`] says why, so a test can report itself skipped.

use crate::{run_command, text, track, untrack, wait_until, Tracked};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The cluster's processes are found by this entry of their environment,
/// `SLURM_CONF=<dir>/slurm.conf`: the daemons, slurmstepd (which keeps only
/// a few of slurmd's variables, this one among them), and every client
/// command and job task.
const MARKER_VAR: &str = "SLURM_CONF";

/// The daemons and client commands the harness runs.
const TOOLS: [&str; 7] = [
    "munged",
    "slurmctld",
    "slurmd",
    "slurmstepd",
    "srun",
    "scancel",
    "sinfo",
];

/// The Debian packages that hold [`TOOLS`].
pub const PACKAGES: &str = "munge slurmctld slurmd slurm-client";

/// How long the cluster may take to come up before [`Slurm::start`] fails.
const START_LIMIT: Duration = Duration::from_secs(20);

fn search_dirs() -> Vec<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin", "/usr/bin"].map(PathBuf::from))
        .collect()
}

fn find_in(dirs: &[PathBuf], name: &str) -> Option<PathBuf> {
    dirs.iter().map(|d| d.join(name)).find(|p| p.is_file())
}

fn tool(name: &str) -> PathBuf {
    find_in(&search_dirs(), name)
        .unwrap_or_else(|| panic!("{name} not found; install {PACKAGES} (scripts/deps.sh does)"))
}

/// `None` if a cluster can be started here, else why not: a tool missing
/// (naming the Debian packages to install) or not running as root.
pub fn missing() -> Option<String> {
    missing_in(&search_dirs(), nix::unistd::geteuid().is_root())
}

fn missing_in(dirs: &[PathBuf], root: bool) -> Option<String> {
    let absent: Vec<&str> = TOOLS
        .into_iter()
        .filter(|t| find_in(dirs, t).is_none())
        .collect();
    if !absent.is_empty() {
        return Some(format!(
            "{} not installed; install the Debian packages {PACKAGES} (scripts/deps.sh does)",
            absent.join(", ")
        ));
    }
    (!root).then(|| {
        "the slurm harness runs slurmd, which starts tasks, as root; run the tests as root (CI does)"
            .to_string()
    })
}

/// For a test: `true` if a cluster can be started, else prints
/// `skipped: <test>: <reason>` and returns `false`.
pub fn can_run(test: &str) -> bool {
    match missing() {
        None => true,
        Some(why) => {
            println!("skipped: {test}: {why}");
            false
        }
    }
}

/// A running throwaway cluster.
pub struct Slurm {
    dir: tempfile::TempDir,
    conf: PathBuf,
    nodes: Vec<String>,
    daemons: Vec<(&'static str, Child)>,
    track_id: u64,
    started_in: Duration,
}

/// A line for `slurm.conf` naming one node.
#[derive(Clone, Debug)]
pub struct Node {
    /// `NodeName` (and `slurmd -N`).
    pub name: String,
    /// `NodeAddr`: where slurmctld and srun reach its slurmd.
    pub addr: String,
}

impl Slurm {
    /// One node, `n0` at 127.0.0.1 with 16 CPUs; returns once it is idle.
    /// Panics, with the daemons' logs, if it does not come up.
    pub fn start() -> Slurm {
        let mut s = Slurm::configure(
            &[Node {
                name: "n0".into(),
                addr: "127.0.0.1".into(),
            }],
            "127.0.0.1",
        );
        s.start_controller();
        let mut cmd = s.daemon("slurmd");
        cmd.args(["-D", "-N", "n0", "-f"]).arg(&s.conf);
        s.spawn_daemon("slurmd", cmd);
        s.wait_idle();
        s
    }

    /// One node per host of `net` (`node0`, `node1`, ... at the hosts'
    /// addresses), each slurmd in its host's network namespace; munged and
    /// slurmctld stay in the root namespace, slurmctld reached at the
    /// bridge's address. Namespaces share the file system, so every slurmd
    /// and task uses the one munged socket and the one `slurm.conf`.
    /// Returns once every node is idle.
    pub fn start_in(net: &crate::netns::Net) -> Slurm {
        let nodes: Vec<Node> = net
            .hosts()
            .iter()
            .map(|h| Node {
                name: format!("node{}", h.index()),
                addr: h.ip().to_string(),
            })
            .collect();
        let mut s = Slurm::configure(&nodes, &net.bridge_ip().to_string());
        s.start_controller();
        for (h, n) in net.hosts().iter().zip(&nodes) {
            // Not `ip netns exec`: it mounts a fresh /sys without the
            // cgroup tree, and slurmd 22.05 will not start without it.
            let mut nsenter = Command::new("nsenter");
            nsenter
                .arg(format!("--net=/run/netns/{}", h.name()))
                .arg("--");
            let mut cmd = s.daemon_in(nsenter, "slurmd");
            cmd.args(["-D", "-N", &n.name, "-f"]).arg(&s.conf);
            s.spawn_daemon("slurmd", cmd);
        }
        s.wait_idle();
        s
    }

    /// Writes the munge key and a `slurm.conf` for `nodes` into a fresh
    /// temp dir, and registers the cluster with the watchdog; slurmctld
    /// will be reached at `ctld_addr`. Starts nothing:
    /// [`Slurm::start_controller`], then a slurmd per node (e.g. in a
    /// network namespace, [`Slurm::daemon_in`]), then [`Slurm::wait_idle`].
    pub fn configure(nodes: &[Node], ctld_addr: &str) -> Slurm {
        if let Some(why) = missing() {
            panic!("cannot start a test slurm cluster: {why}");
        }
        let t0 = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix("canopy-slurm-")
            .tempdir()
            .expect("cannot create the cluster's temp dir");
        // slurmstepd and tasks may look around in here.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod the cluster's temp dir");
        let d = dir.path().display().to_string();
        let mut key = vec![0u8; 1024];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut key))
            .expect("read /dev/urandom for the munge key");
        let key_path = dir.path().join("munge.key");
        std::fs::write(&key_path, &key).expect("write the munge key");
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600))
            .expect("chmod the munge key");
        // TmpFS: the pmix plugin makes `spmix_appdir_<uid>_<job>.<step>`
        // there, and every cluster's first job is 1.
        for sub in ["state", "spool", "tmp"] {
            std::fs::create_dir(dir.path().join(sub)).expect("mkdir");
        }
        let ports = crate::cluster::free_ports(2);
        let host = nix::unistd::gethostname()
            .expect("gethostname")
            .to_string_lossy()
            .into_owned();
        // slurmctld insists that SlurmctldHost is this machine's name.
        let host = host.split('.').next().unwrap_or("localhost").to_string();
        let mut conf = format!(
            "# written by canopy-t's slurm harness\n\
             ClusterName=canopytest\n\
             SlurmctldHost={host}({ctld_addr})\n\
             SlurmctldPort={ctld_port}\n\
             SlurmdPort={slurmd_port}\n\
             SlurmUser=root\n\
             SlurmdUser=root\n\
             AuthType=auth/munge\n\
             CredType=cred/munge\n\
             AuthInfo=socket={d}/munge.sock\n\
             StateSaveLocation={d}/state\n\
             TmpFS={d}/tmp\n\
             SlurmdSpoolDir={d}/spool/%n\n\
             SlurmctldPidFile={d}/slurmctld.pid\n\
             SlurmdPidFile={d}/slurmd-%n.pid\n\
             SlurmctldLogFile={d}/slurmctld.log\n\
             SlurmdLogFile={d}/slurmd-%n.log\n\
             ProctrackType=proctrack/linuxproc\n\
             TaskPlugin=task/none\n\
             JobAcctGatherType=jobacct_gather/none\n\
             AccountingStorageType=accounting_storage/none\n\
             SlurmdParameters=config_overrides\n\
             SchedulerType=sched/builtin\n\
             SelectType=select/cons_tres\n\
             SelectTypeParameters=CR_Core\n\
             MpiDefault=none\n\
             ReturnToService=2\n\
             InactiveLimit=0\n\
             KillWait=2\n\
             MessageTimeout=5\n\
             SlurmctldTimeout=10\n\
             SlurmdTimeout=10\n",
            ctld_port = ports[0],
            slurmd_port = ports[1],
        );
        for n in nodes {
            conf.push_str(&format!(
                "NodeName={} NodeAddr={} CPUs=16 State=UNKNOWN\n",
                n.name, n.addr
            ));
        }
        let names: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
        conf.push_str(&format!(
            "PartitionName=test Nodes={} Default=YES MaxTime=INFINITE State=UP\n",
            names.join(",")
        ));
        let conf_path = dir.path().join("slurm.conf");
        std::fs::write(&conf_path, conf).expect("write slurm.conf");
        let track_id = track(Tracked {
            marker: d.clone(),
            env_marker: Some(format!("{MARKER_VAR}={d}/slurm.conf")),
            dir: Some(dir.path().to_path_buf()),
            ..Tracked::default()
        });
        Slurm {
            dir,
            conf: conf_path,
            nodes: names,
            daemons: Vec::new(),
            track_id,
            started_in: t0.elapsed(),
        }
    }

    /// Starts munged and slurmctld, and waits until munged's socket exists.
    pub fn start_controller(&mut self) {
        let t0 = Instant::now();
        let d = self.dir.path().to_path_buf();
        let mut munged = self.daemon("munged");
        munged
            .arg("-F") // foreground, so the pid is ours
            .arg("-f") // as root, with the key in a temp dir
            .arg(format!("--socket={}", d.join("munge.sock").display()))
            .arg(format!("--key-file={}", d.join("munge.key").display()))
            .arg(format!("--pid-file={}", d.join("munged.pid").display()))
            .arg(format!("--log-file={}", d.join("munged.log").display()))
            .arg(format!("--seed-file={}", d.join("munged.seed").display()));
        self.spawn_daemon("munged", munged);
        let sock = d.join("munge.sock");
        if !wait_until(Duration::from_secs(10), || sock.exists()) {
            panic!(
                "munged did not create {} within 10 s\n{}",
                sock.display(),
                self.logs()
            );
        }
        let mut ctld = self.daemon("slurmctld");
        ctld.args(["-D", "-i", "-f"]).arg(&self.conf);
        self.spawn_daemon("slurmctld", ctld);
        self.started_in += t0.elapsed();
    }

    /// A `Command` for the daemon `name` (found in the sbin directories),
    /// with the cluster's environment; output goes to `<dir>/<name>.out`.
    /// The caller adds its arguments and passes it to
    /// [`Slurm::spawn_daemon`].
    pub fn daemon(&self, name: &str) -> Command {
        let mut cmd = Command::new(tool(name));
        self.set_env(&mut cmd);
        cmd
    }

    /// Like [`Slurm::daemon`] but run through `wrapper` (e.g. `nsenter
    /// --net=/run/netns/NS --`), which must exec the daemon so that the pid
    /// stays its.
    pub fn daemon_in(&self, mut wrapper: Command, name: &str) -> Command {
        wrapper.arg(tool(name));
        self.set_env(&mut wrapper);
        wrapper
    }

    /// Starts a daemon built by [`Slurm::daemon`]; it is stopped (by pid)
    /// with the cluster.
    pub fn spawn_daemon(&mut self, label: &'static str, mut cmd: Command) {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{label}.out")))
            .expect("open a daemon's output file");
        let err = out.try_clone().expect("dup a daemon's output file");
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {label}: {e}"));
        crate::track_pids(self.track_id, &[child.id() as i32]);
        self.daemons.push((label, child));
    }

    /// Waits until every node is idle; panics with the logs after 20 s.
    pub fn wait_idle(&mut self) {
        let t0 = Instant::now();
        let want = self.nodes.len();
        loop {
            for (label, child) in &mut self.daemons {
                if let Ok(Some(st)) = child.try_wait() {
                    panic!(
                        "{label} exited ({st}) while the cluster started\n{}",
                        Slurm::logs_in(self.dir.path())
                    );
                }
            }
            let mut cmd = self.command("sinfo");
            cmd.args(["-h", "-N", "-o", "%N %T"]);
            let out = run_command(&mut cmd, Duration::from_secs(10));
            let last = text(&out.stdout) + &text(&out.stderr);
            let idle = text(&out.stdout)
                .lines()
                .filter(|l| l.split_whitespace().nth(1) == Some("idle"))
                .count();
            if out.status.success() && idle == want {
                break;
            }
            if t0.elapsed() > START_LIMIT {
                panic!(
                    "the slurm cluster did not become idle within {START_LIMIT:?}; sinfo says:\n{last}\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.started_in += t0.elapsed();
    }

    fn set_env(&self, cmd: &mut Command) {
        cmd.env("SLURM_CONF", &self.conf)
            .env_remove("SLURM_JOB_ID")
            .env_remove("SLURM_JOBID");
    }

    /// A client command (`srun`, `scancel`, `squeue`, ...) with `SLURM_CONF`
    /// and the cluster's marker in its environment.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(tool(program));
        self.set_env(&mut cmd);
        cmd
    }

    /// Runs `srun ARGS...` to completion within `timeout` (the watchdog
    /// rules of [`run_command`]).
    pub fn srun(
        &self,
        args: &[&str],
        env: &[(&str, &str)],
        timeout: Duration,
    ) -> std::process::Output {
        let mut cmd = self.command("srun");
        cmd.args(args).envs(env.iter().copied());
        run_command(&mut cmd, timeout)
    }

    /// Starts `srun ARGS...` in the background, its output read line by
    /// line ([`Srun`]).
    pub fn spawn_srun(&self, args: &[&str], env: &[(&str, &str)]) -> Srun {
        let mut cmd = self.command("srun");
        cmd.args(args).envs(env.iter().copied());
        Srun::spawn(cmd)
    }

    /// Live job processes (slurmstepd and tasks) of this cluster: every
    /// process with its `SLURM_CONF` except the daemons and their own
    /// helpers (slurmctld's slurmscriptd). slurmstepd detaches from slurmd,
    /// so it is not a daemon's child.
    pub fn job_processes(&self) -> Vec<i32> {
        let daemons: Vec<i32> = self.daemons.iter().map(|(_, c)| c.id() as i32).collect();
        crate::pids_with_env(&self.marker())
            .into_iter()
            .filter(|p| !daemons.contains(p))
            .filter(|&p| !crate::ppid_of(p).is_some_and(|pp| daemons.contains(&pp)))
            .collect()
    }

    /// `SLURM_CONF`, for commands built elsewhere.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![("SLURM_CONF".into(), self.conf.display().to_string())]
    }

    fn marker(&self) -> String {
        format!("{MARKER_VAR}={}", self.conf.display())
    }

    pub fn conf(&self) -> &Path {
        &self.conf
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// How long starting took: files, daemons, and the wait until idle.
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// The daemons' logs, for failure messages.
    pub fn logs(&self) -> String {
        Slurm::logs_in(self.dir.path())
    }

    fn logs_in(dir: &Path) -> String {
        let mut out = String::new();
        let Ok(rd) = std::fs::read_dir(dir) else {
            return out;
        };
        let mut files: Vec<PathBuf> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "log" || x == "out"))
            .collect();
        files.sort();
        for f in files {
            let body = std::fs::read_to_string(&f).unwrap_or_default();
            let tail: Vec<&str> = body.lines().rev().take(40).collect();
            out.push_str(&format!(
                "--- {} (last {} lines)\n",
                f.display(),
                tail.len()
            ));
            for l in tail.into_iter().rev() {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    /// Kills every job process, then the daemons (SIGTERM, then SIGKILL
    /// after a second). Never panics; may run more than once.
    pub fn stop(&mut self) {
        let marker = self.marker();
        let sweep = |marker: &str| {
            for p in crate::pids_with_env(marker) {
                let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
            }
        };
        // Daemons carry the marker too: the jobs first, then them.
        let daemons: Vec<i32> = self.daemons.iter().map(|(_, c)| c.id() as i32).collect();
        for p in crate::pids_with_env(&marker) {
            if !daemons.contains(&p) {
                let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
            }
        }
        for (_, c) in self.daemons.iter().rev() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(1);
        for (_, c) in self.daemons.iter_mut().rev() {
            loop {
                if !matches!(c.try_wait(), Ok(None)) {
                    break;
                }
                if Instant::now() >= deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        self.daemons.clear();
        sweep(&marker);
    }
}

impl Drop for Slurm {
    fn drop(&mut self) {
        self.stop();
        untrack(self.track_id);
    }
}

/// A background `srun`: its stdout lines arrive as they are printed; its
/// stderr is collected. Dropping it kills srun's process group.
pub struct Srun {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<Vec<u8>>,
    seen: Vec<String>,
    status: Option<ExitStatus>,
    track_id: u64,
}

impl Srun {
    fn spawn(mut cmd: Command) -> Srun {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
        let track_id = track(Tracked {
            pgid: Some(child.id() as i32),
            ..Tracked::default()
        });
        let out = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let mut err = child.stderr.take().expect("piped stderr");
        let (etx, stderr) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = err.read_to_end(&mut buf);
            let _ = etx.send(buf);
        });
        Srun {
            child,
            lines,
            stderr,
            seen: Vec::new(),
            status: None,
            track_id,
        }
    }

    /// srun's pid.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits until `n` stdout lines satisfy `pred`, or `timeout`; returns
    /// every line seen so far either way.
    pub fn wait_lines(
        &mut self,
        n: usize,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> &[String] {
        let deadline = Instant::now() + timeout;
        while self.seen.iter().filter(|l| pred(l)).count() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => self.seen.push(l),
                Err(_) => break,
            }
        }
        &self.seen
    }

    /// Waits up to `timeout` for srun to exit.
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.status.is_none() {
            let deadline = Instant::now() + timeout;
            loop {
                if let Ok(Some(st)) = self.child.try_wait() {
                    self.status = Some(st);
                    break;
                }
                if Instant::now() >= deadline {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        self.status
    }

    /// Every stdout line (after srun exited, all of them) and stderr.
    pub fn output(&mut self) -> (Vec<String>, String) {
        while let Ok(l) = self
            .lines
            .recv_timeout(Duration::from_millis(if self.status.is_some() {
                2000
            } else {
                0
            }))
        {
            self.seen.push(l);
        }
        let err = if self.status.is_some() {
            self.stderr
                .recv_timeout(Duration::from_secs(2))
                .map(|b| text(&b))
                .unwrap_or_default()
        } else {
            String::new()
        };
        (self.seen.clone(), err)
    }
}

impl Drop for Srun {
    fn drop(&mut self) {
        let _ = nix::sys::signal::killpg(Pid::from_raw(self.pid()), Signal::SIGKILL);
        let _ = self.child.wait();
        untrack(self.track_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_tools_name_the_packages_and_root_is_required() {
        let empty = tempfile::tempdir().unwrap();
        let dirs = [empty.path().to_path_buf()];
        let why = missing_in(&dirs, true).expect("nothing is installed there");
        for t in TOOLS {
            assert!(why.contains(t), "{why}");
        }
        assert!(
            why.contains("slurmd") && why.contains("scripts/deps.sh"),
            "{why}"
        );
        for t in TOOLS {
            std::fs::write(empty.path().join(t), "").unwrap();
        }
        assert_eq!(missing_in(&dirs, true), None);
        assert!(missing_in(&dirs, false).unwrap().contains("as root"));
    }
}
