//! Integration-test harness for canopy: real `canopy` processes, real
//! sockets, no mocks.
//!
//! * [`Instance`] runs `canopy start` without a command (so it waits for a
//!   signal), finds the runtime directory from the `export CANOPY_URI=...`
//!   line it prints, and stops everything it started when dropped, also
//!   while a test panics: SIGTERM to `canopy start`, then SIGKILL to its
//!   process group and to any broker still alive, then the temp dir goes.
//! * [`run_canopy`] / [`run_command`] run a command to completion with a
//!   deadline, killing its process group if it overruns.
//! * [`run_test`] gives a test body a hard time limit: if the body is still
//!   running when the limit passes, every process and directory that the
//!   body's harness objects registered is killed / removed and the test
//!   fails, even if the body is stuck in code under test.
//!
//! The `canopy` binary is not built by `cargo test` for this crate: build
//! it first (`cargo build --workspace`); [`canopy_bin`] says so if it is
//! missing.
#![forbid(unsafe_code)]

use canopy_client::{Client, ClientError, Msg};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use std::cell::Cell;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

pub mod cluster;
pub mod hostile;
pub mod krb;
pub mod netns;
pub mod site;
pub mod slurm;
pub mod users;

/// How long an instance may take to come up.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Timeout for one RPC from a test.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `canopy start` gets to stop after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// The `canopy` binary: `<target>/<profile>/canopy`, next to the `deps`
/// directory holding this test binary.
pub fn canopy_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("cannot find the test binary's path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary is not in <target>/<profile>/deps");
    let bin = dir.join("canopy");
    assert!(
        bin.is_file(),
        "{} does not exist: run `cargo build -p canopy-broker` first",
        bin.display()
    );
    bin
}

/// The `canopy-ca` binary (the site CA), next to `canopy`: build it with
/// `cargo build -p canopy-ca`.
/// The `canopy-imp` exec helper next to `canopy`.
pub fn imp_bin() -> PathBuf {
    let mut bin = canopy_bin();
    bin.set_file_name("canopy-imp");
    assert!(
        bin.is_file(),
        "{} does not exist: run `cargo build -p canopy-imp` first",
        bin.display()
    );
    bin
}

pub fn ca_bin() -> PathBuf {
    let mut bin = canopy_bin();
    bin.set_file_name("canopy-ca");
    assert!(
        bin.is_file(),
        "{} does not exist: run `cargo build -p canopy-ca` first",
        bin.display()
    );
    bin
}

/// Lossy UTF-8 text of command output.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

// ----- watchdog registry -----

/// Something a test started that the watchdog must clean up if the test
/// overruns its limit.
#[derive(Default)]
struct Tracked {
    scope: u64,
    /// Process group to SIGKILL.
    pgid: Option<i32>,
    /// Further processes to SIGKILL, if their command line still contains
    /// `marker` (so a recycled pid is left alone).
    pids: Vec<i32>,
    marker: String,
    /// Every process whose environment holds this `NAME=value` entry is
    /// SIGKILLed too (job tasks that a daemon such as slurmd started).
    env_marker: Option<String>,
    /// Directory to remove.
    dir: Option<PathBuf>,
}

static REGISTRY: Mutex<Vec<(u64, Tracked)>> = Mutex::new(Vec::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// The [`run_test`] scope of the current thread (0: none).
    static SCOPE: Cell<u64> = const { Cell::new(0) };
}

fn registry() -> std::sync::MutexGuard<'static, Vec<(u64, Tracked)>> {
    REGISTRY.lock().unwrap_or_else(PoisonError::into_inner)
}

fn track(t: Tracked) -> u64 {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let scope = SCOPE.with(Cell::get);
    registry().push((id, Tracked { scope, ..t }));
    id
}

fn track_pids(id: u64, pids: &[i32]) {
    if let Some((_, t)) = registry().iter_mut().find(|(i, _)| *i == id) {
        t.pids.extend_from_slice(pids);
    }
}

fn untrack(id: u64) {
    registry().retain(|(i, _)| *i != id);
}

fn cmdline_contains(pid: i32, marker: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            let m = marker.as_bytes();
            !m.is_empty() && c.windows(m.len()).any(|w| w == m)
        })
        .unwrap_or(false)
}

/// Live processes (other than this one) whose environment holds the
/// entry `entry` (`NAME=value`).
pub fn pids_with_env(entry: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out: Vec<i32> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|&pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .map(|env| env.split(|&b| b == 0).any(|kv| kv == entry.as_bytes()))
                .unwrap_or(false)
        })
        .filter(|&pid| process_alive(pid))
        .collect();
    out.sort_unstable();
    out
}

fn kill_tracked(t: &Tracked) {
    if let Some(g) = t.pgid {
        let _ = killpg(Pid::from_raw(g), Signal::SIGKILL);
    }
    if let Some(entry) = &t.env_marker {
        for p in pids_with_env(entry) {
            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
        }
    }
    for &p in &t.pids {
        if cmdline_contains(p, &t.marker) {
            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
        }
    }
    if let Some(d) = &t.dir {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// Run `body` on its own thread with a hard time limit. Instances and
/// commands started by the body (on that thread) are killed and their
/// directories removed if the limit passes; then this panics. A panic in
/// the body is passed on unchanged.
pub fn run_test<F: FnOnce() + Send + 'static>(limit: Duration, body: F) {
    let scope = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = mpsc::channel::<()>();
    let handle = std::thread::Builder::new()
        .name(std::thread::current().name().unwrap_or("test").to_string())
        .spawn(move || {
            SCOPE.with(|s| s.set(scope));
            body();
            let _ = tx.send(());
        })
        .expect("cannot spawn the test thread");
    match rx.recv_timeout(limit) {
        Ok(()) => {
            let _ = handle.join();
        }
        Err(RecvTimeoutError::Disconnected) => {
            if let Err(panic) = handle.join() {
                std::panic::resume_unwind(panic);
            }
        }
        Err(RecvTimeoutError::Timeout) => {
            let stuck: Vec<(u64, Tracked)> = {
                let mut reg = registry();
                let (mine, rest) = std::mem::take(&mut *reg)
                    .into_iter()
                    .partition(|(_, t)| t.scope == scope);
                *reg = rest;
                mine
            };
            for (_, t) in &stuck {
                kill_tracked(t);
            }
            panic!(
                "test did not finish within {limit:?}; killed {} process group(s) it started",
                stuck.len()
            );
        }
    }
}

// ----- processes -----

/// Whether `pid` exists and is not a zombie.
pub fn process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Poll `cond` every 10 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Parent pid from /proc/PID/stat.
pub(crate) fn ppid_of(pid: i32) -> Option<i32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = s.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// `PMI_RANK` from a process's environment.
fn pmi_rank_of(pid: i32) -> Option<u32> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    env.split(|&b| b == 0)
        .find_map(|kv| kv.strip_prefix(b"PMI_RANK="))
        .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
}

/// Live `canopy broker` children of `parent`, as (pid, rank), by rank.
fn broker_children(parent: i32) -> Vec<(i32, u32)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if ppid_of(pid) != Some(parent) || !process_alive(pid) {
            continue;
        }
        let is_broker = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| c.split(|&b| b == 0).any(|a| a == b"broker"))
            .unwrap_or(false);
        if let (true, Some(rank)) = (is_broker, pmi_rank_of(pid)) {
            out.push((pid, rank));
        }
    }
    out.sort_by_key(|&(_, r)| r);
    out
}

/// Poll `child` until it exits or `timeout` passes.
fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return Some(st),
            Ok(None) => {}
            Err(_) => return None,
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Read a pipe to its end on a thread; the result arrives on the channel.
fn drain<R: Read + Send + 'static>(mut r: R) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        let _ = tx.send(buf);
    });
    rx
}

/// Run `cmd` to completion within `timeout`, capturing stdout and stderr.
/// The command runs in its own process group; if it overruns, the group is
/// SIGKILLed and this panics with whatever output there was.
pub fn run_command(cmd: &mut Command, timeout: Duration) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let pid = child.id() as i32;
    let id = track(Tracked {
        pgid: Some(pid),
        ..Tracked::default()
    });
    let out_rx = drain(child.stdout.take().expect("piped stdout"));
    let err_rx = drain(child.stderr.take().expect("piped stderr"));
    let status = wait_child(&mut child, timeout);
    if status.is_none() {
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        let _ = wait_child(&mut child, Duration::from_secs(5));
    }
    // Whatever still holds the pipes (a stray grandchild) must not hang us.
    let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    untrack(id);
    let stdout = out_rx
        .recv_timeout(Duration::from_secs(5))
        .unwrap_or_default();
    let stderr = err_rx
        .recv_timeout(Duration::from_secs(5))
        .unwrap_or_default();
    match status {
        Some(status) => Output {
            status,
            stdout,
            stderr,
        },
        None => panic!(
            "{cmd:?} did not finish within {timeout:?}; killed it.\nstdout:\n{}\nstderr:\n{}",
            text(&stdout),
            text(&stderr)
        ),
    }
}

/// Run the `canopy` CLI with `args` and extra environment, within
/// `timeout`. `CANOPY_URI` is removed from the inherited environment and
/// logging is set to the default level, unless `env` says otherwise.
pub fn run_canopy(args: &[&str], env: &[(&str, &str)], timeout: Duration) -> Output {
    let mut cmd = Command::new(canopy_bin());
    cmd.args(args)
        .env_remove("CANOPY_URI")
        .env_remove("CANOPY_BROKER")
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied());
    run_command(&mut cmd, timeout)
}

/// A long-running process a test started (a service such as
/// `canopy-ca`), in a process group of its own: SIGKILLed with its group
/// when dropped, or by the watchdog if the test overruns its limit.
/// Standard output is collected by line; standard error goes to a file.
pub struct Daemon {
    child: Child,
    pid: i32,
    lines: Arc<Mutex<Vec<String>>>,
    stderr_path: PathBuf,
    track_id: u64,
}

impl Daemon {
    /// Spawn `cmd` (stdin closed), its stderr written to `stderr_path`.
    pub fn spawn(cmd: &mut Command, stderr_path: &Path) -> Daemon {
        let stderr = std::fs::File::create(stderr_path).expect("cannot create the stderr log");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
        let pid = child.id() as i32;
        let track_id = track(Tracked {
            pgid: Some(pid),
            ..Tracked::default()
        });
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().expect("piped stdout");
        let l2 = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                l2.lock().unwrap_or_else(PoisonError::into_inner).push(line);
            }
        });
        Daemon {
            child,
            pid,
            lines,
            stderr_path: stderr_path.to_path_buf(),
            track_id,
        }
    }

    /// The lines written to stdout so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Wait up to `timeout` for a stdout line containing `needle`.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.lines().iter().any(|l| l.contains(needle)))
    }

    /// What it wrote to stderr so far.
    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Whether it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = killpg(Pid::from_raw(self.pid), Signal::SIGKILL);
        let _ = self.child.kill();
        let _ = wait_child(&mut self.child, Duration::from_secs(5));
        untrack(self.track_id);
    }
}

// ----- an instance -----

/// A running `canopy start` (without a command) and its brokers.
pub struct Instance {
    child: Child,
    pid: i32,
    size: u32,
    tmp: Option<tempfile::TempDir>,
    rundir: PathBuf,
    uri: String,
    stderr_path: PathBuf,
    stdout: Arc<Mutex<String>>,
    brokers: Vec<(i32, u32)>,
    status: Option<ExitStatus>,
    track_id: u64,
}

impl Instance {
    /// `canopy start --size SIZE --fanout FANOUT --rundir <tempdir> EXTRA...`
    pub fn start(size: u32, fanout: u32, extra: &[&str]) -> Instance {
        Instance::start_with_env(size, fanout, extra, &[])
    }

    /// Like [`Instance::start`], with extra environment for `canopy start`
    /// (and so its brokers).
    pub fn start_with_env(
        size: u32,
        fanout: u32,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Instance {
        let bin = canopy_bin();
        let tmp = tempfile::Builder::new()
            .prefix("canopy-t-")
            .tempdir()
            .expect("cannot create a temp dir");
        let stderr_path = tmp.path().join("start.stderr");
        let stderr = std::fs::File::create(&stderr_path).expect("cannot create the stderr log");
        let mut cmd = Command::new(&bin);
        cmd.arg("start")
            .arg("--size")
            .arg(size.to_string())
            .arg("--fanout")
            .arg(fanout.to_string())
            .arg("--rundir")
            .arg(tmp.path())
            .args(extra)
            .env_remove("CANOPY_URI")
            .env_remove("CANOPY_BROKER")
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .process_group(0);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
        let pid = child.id() as i32;
        let track_id = track(Tracked {
            pgid: Some(pid),
            marker: tmp.path().display().to_string(),
            dir: Some(tmp.path().to_path_buf()),
            ..Tracked::default()
        });
        let stdout_pipe = child.stdout.take().expect("piped stdout");
        let stdout = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel::<String>();
        {
            let stdout = stdout.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout_pipe).lines() {
                    let Ok(line) = line else { break };
                    {
                        let mut s = stdout.lock().unwrap_or_else(PoisonError::into_inner);
                        s.push_str(&line);
                        s.push('\n');
                    }
                    let _ = tx.send(line);
                }
            });
        }
        // The guard exists from here on, so a failure below cleans up.
        let mut inst = Instance {
            child,
            pid,
            size,
            tmp: Some(tmp),
            rundir: PathBuf::new(),
            uri: String::new(),
            stderr_path,
            stdout,
            brokers: Vec::new(),
            status: None,
            track_id,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        let uri = loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(line) => {
                    if let Some(u) = line.strip_prefix("export CANOPY_URI=") {
                        break u.to_string();
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    let st = inst.wait_exit(Duration::from_secs(5));
                    panic!(
                        "canopy start (size {size}) ended before the instance came up: {st:?}\nstderr:\n{}",
                        inst.stderr_text()
                    );
                }
            }
            if Instant::now() >= deadline {
                panic!(
                    "canopy start (size {size}) printed no CANOPY_URI within {START_TIMEOUT:?}\nstdout:\n{}\nstderr:\n{}",
                    inst.stdout_text(),
                    inst.stderr_text()
                );
            }
        };
        let local0 = uri
            .strip_prefix("local://")
            .map(PathBuf::from)
            .unwrap_or_else(|| panic!("CANOPY_URI '{uri}' is not local://PATH"));
        assert_eq!(
            local0.file_name().and_then(|n| n.to_str()),
            Some("local-0"),
            "CANOPY_URI {uri} does not name rank 0's socket"
        );
        inst.rundir = local0
            .parent()
            .expect("socket has a directory")
            .to_path_buf();
        inst.uri = uri;
        // Every broker is up once the URI is printed.
        inst.brokers = broker_children(pid);
        track_pids(
            track_id,
            &inst.brokers.iter().map(|&(p, _)| p).collect::<Vec<_>>(),
        );
        if let Some(t) = registry().iter_mut().find(|(i, _)| *i == track_id) {
            t.1.marker = inst.rundir.display().to_string();
        }
        inst
    }

    /// `local://<rundir>/local-0`, as printed by `canopy start`.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// `local://<rundir>/local-RANK`.
    pub fn local_uri(&self, rank: u32) -> String {
        format!("local://{}", self.local_path(rank).display())
    }

    /// `<rundir>/local-RANK`.
    pub fn local_path(&self, rank: u32) -> PathBuf {
        self.rundir.join(format!("local-{rank}"))
    }

    /// `ipc://<rundir>/tbon-RANK` (only ranks with children listen).
    pub fn tbon_endpoint(&self, rank: u32) -> String {
        format!("ipc://{}", self.tbon_path(rank).display())
    }

    /// `<rundir>/tbon-RANK`.
    pub fn tbon_path(&self, rank: u32) -> PathBuf {
        self.rundir.join(format!("tbon-{rank}"))
    }

    /// The instance's private runtime directory (made by `canopy start`).
    pub fn rundir(&self) -> &Path {
        &self.rundir
    }

    /// The test's temp dir, passed as `--rundir` (the runtime directory's
    /// parent).
    pub fn tempdir(&self) -> &Path {
        self.tmp.as_ref().expect("temp dir kept until drop").path()
    }

    pub fn size(&self) -> u32 {
        self.size
    }

    /// The pid of `canopy start`.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Everything `canopy start` and its brokers wrote to stderr so far.
    pub fn stderr_text(&self) -> String {
        std::fs::read(&self.stderr_path)
            .map(|b| text(&b))
            .unwrap_or_default()
    }

    /// Everything `canopy start` wrote to stdout so far.
    pub fn stdout_text(&self) -> String {
        self.stdout
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Wait up to `timeout` for the stderr log to contain a line with all
    /// of `needles`; returns that line.
    pub fn wait_log_line(&self, needles: &[&str], timeout: Duration) -> Option<String> {
        let mut found = None;
        wait_until(timeout, || {
            found = self
                .stderr_text()
                .lines()
                .find(|l| needles.iter().all(|n| l.contains(n)))
                .map(str::to_string);
            found.is_some()
        });
        found
    }

    /// The live broker processes, as (pid, rank) sorted by rank: children
    /// of `canopy start` running `canopy broker`, ranked by `PMI_RANK`.
    pub fn broker_pids(&self) -> Vec<(i32, u32)> {
        broker_children(self.pid)
    }

    /// The pids of the brokers found when the instance came up.
    pub fn initial_broker_pids(&self) -> &[(i32, u32)] {
        &self.brokers
    }

    /// A client on RANK's own local socket.
    pub fn client(&self, rank: u32) -> Client {
        Client::connect(Some(&self.local_uri(rank)))
            .unwrap_or_else(|e| panic!("cannot connect to rank {rank}: {e}"))
    }

    /// `broker.ping` to `target` through `client`.
    pub fn ping(client: &mut Client, target: u32, payload: &[u8]) -> Result<Msg, ClientError> {
        client.rpc("broker.ping", target, payload, RPC_TIMEOUT)
    }

    /// Assert that every rank echoes a `broker.ping` sent through rank 0.
    pub fn assert_all_ranks_answer(&self) {
        let mut c = self.client(0);
        for rank in 0..self.size {
            let payload = format!("ping rank {rank} of {}", self.size).into_bytes();
            let m = Instance::ping(&mut c, rank, &payload)
                .unwrap_or_else(|e| panic!("rank {rank} did not answer a ping: {e}"));
            assert_eq!(m.header.nodeid, rank, "reply names the wrong rank");
            assert_eq!(m.header.errnum, 0);
            assert_eq!(m.payload, payload, "rank {rank} echoed a different payload");
        }
    }

    /// `overlay.status` from RANK, as JSON.
    pub fn status(&self, rank: u32) -> serde_json::Value {
        let mut c = self.client(rank);
        let m = c
            .rpc("overlay.status", rank, b"", RPC_TIMEOUT)
            .unwrap_or_else(|e| panic!("overlay.status on rank {rank}: {e}"));
        serde_json::from_slice(&m.payload).expect("overlay.status is JSON")
    }

    /// Send a signal to `canopy start` (not its brokers).
    pub fn signal(&self, sig: Signal) {
        if self.status.is_none() {
            kill(Pid::from_raw(self.pid), sig).expect("canopy start is gone");
        }
    }

    /// Wait up to `timeout` for `canopy start` to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = wait_child(&mut self.child, timeout);
        }
        self.status
    }

    /// Stop the instance: SIGTERM to `canopy start`, wait, then SIGKILL its
    /// process group and any broker still running. Returns the exit status
    /// of `canopy start` (`None` if it had to be killed). Never panics.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let mut killed = false;
        if self.status.is_none() {
            let _ = kill(Pid::from_raw(self.pid), Signal::SIGTERM);
            if self.wait_exit(STOP_GRACE).is_none() {
                killed = true;
                let _ = killpg(Pid::from_raw(self.pid), Signal::SIGKILL);
                let _ = self.wait_exit(Duration::from_secs(5));
            }
        }
        // Members of the group (a command) and brokers (each in a group of
        // their own) that outlived `canopy start`.
        let _ = killpg(Pid::from_raw(self.pid), Signal::SIGKILL);
        let marker = self.rundir.display().to_string();
        for &(pid, _) in &self.brokers {
            if !self.rundir.as_os_str().is_empty() && cmdline_contains(pid, &marker) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        let brokers = self.brokers.clone();
        wait_until(Duration::from_secs(5), || {
            brokers.iter().all(|&(p, _)| !process_alive(p))
        });
        if killed {
            None
        } else {
            self.status
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.stop();
        untrack(self.track_id);
        if let Some(t) = self.tmp.take() {
            let _ = t.close();
        }
    }
}
