//! Running `canopy start` with deadlines and guaranteed teardown.
//!
//! Each launcher gets a private scratch directory, passed as `--rundir`;
//! the launcher makes its runtime directory inside it, so every broker's
//! command line names it. If a launcher has to be SIGKILLed (and cannot
//! stop its brokers, which run in process groups of their own), the
//! brokers are found by that path in /proc and killed too.

use anyhow::{anyhow, bail, Context, Result};
use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag};
use nix::unistd::Pid;
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::BufRead;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a launcher gets to stop its brokers after SIGTERM.
pub const GRACE: Duration = Duration::from_secs(10);
/// The launcher's stderr, in its scratch directory.
const LOG: &str = "canopy-start.log";

/// Where `canopy start` would put its runtime directory by default:
/// $XDG_RUNTIME_DIR, else the temp dir.
pub fn default_parent() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() && Path::new(&d).is_dir() => PathBuf::from(d),
        _ => std::env::temp_dir(),
    }
}

/// The kind of file system `path` is on ("tmpfs", "ext4", ...): sockets
/// made on a disk file system cost more to create and remove.
pub fn fs_kind(path: &Path) -> String {
    use nix::sys::statfs::{statfs, EXT4_SUPER_MAGIC, TMPFS_MAGIC};
    match statfs(path) {
        Ok(s) if s.filesystem_type() == TMPFS_MAGIC => "tmpfs".into(),
        Ok(s) if s.filesystem_type() == EXT4_SUPER_MAGIC => "ext4".into(),
        Ok(s) => format!("{:#x}", s.filesystem_type().0),
        Err(e) => format!("unknown ({e})"),
    }
}

/// A private directory, removed (with its contents) on drop.
pub struct Scratch(PathBuf);

impl Scratch {
    /// Create one under `parent`, or where `canopy start` would put its
    /// runtime directory by default ($XDG_RUNTIME_DIR, else the temp dir).
    pub fn new(parent: Option<&Path>) -> Result<Scratch> {
        let parent = match parent {
            Some(p) => p.to_path_buf(),
            None => default_parent(),
        };
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        for i in 0..100u32 {
            let dir = parent.join(format!("cbench-{}-{nanos:x}-{i}", std::process::id()));
            match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => return Ok(Scratch(dir)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!(
                            "cannot create a scratch directory in {}; pass --rundir DIR",
                            parent.display()
                        )
                    })
                }
            }
        }
        bail!(
            "cannot find a free scratch directory name in {}",
            parent.display()
        )
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `canopy start`, torn down on drop.
pub struct Launcher {
    child: Child,
    pid: Pid,
    /// Fires when the process has exited (not yet reaped).
    exited_rx: Receiver<Instant>,
    exited_at: Option<Instant>,
    status: Option<ExitStatus>,
    /// Set once torn down: whether that needed SIGKILL.
    torn_down: Option<bool>,
    lines: Option<Receiver<String>>,
    scratch: Scratch,
}

impl Launcher {
    /// `canopy start --rundir SCRATCH ARGS...`; with `capture`, its stdout
    /// is read line by line (see [`Launcher::read_uri`]), else discarded.
    /// Stderr (the launcher's and the brokers') goes to a log file in the
    /// scratch directory, whose end [`Launcher::log_tail`] gives for error
    /// messages: a 1,024-broker instance logs a line per link at shutdown.
    pub fn spawn(canopy: &Path, args: &[String], capture: bool, scratch: Scratch) -> Result<Self> {
        let log = std::fs::File::create(scratch.path().join(LOG))
            .with_context(|| format!("cannot create a log in {}", scratch.path().display()))?;
        let mut cmd = Command::new(canopy);
        cmd.arg("start")
            .arg("--rundir")
            .arg(scratch.path())
            .args(args)
            .env_remove("CANOPY_URI")
            .env_remove("CANOPY_BROKER")
            .stdin(Stdio::null())
            .stderr(log)
            .stdout(if capture {
                Stdio::piped()
            } else {
                Stdio::null()
            });
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot run {}", canopy.display()))?;
        let pid = Pid::from_raw(child.id() as i32);
        live().insert(pid.as_raw(), scratch.path().to_path_buf());
        let (tx, exited_rx) = mpsc::channel();
        std::thread::spawn(move || {
            // Wait without reaping, so the pid stays ours to signal until
            // the main thread reaps it.
            while let Err(Errno::EINTR) =
                waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT)
            {}
            let _ = tx.send(Instant::now());
        });
        let lines = child.stdout.take().map(|out| {
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    // Once nobody listens, keep draining anyway.
                    let _ = tx.send(line);
                }
            });
            rx
        });
        Ok(Launcher {
            child,
            pid,
            exited_rx,
            exited_at: None,
            status: None,
            torn_down: None,
            lines,
            scratch,
        })
    }

    /// The last `n` lines the launcher and its brokers wrote to stderr,
    /// indented, for an error message ("" if none).
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read(self.scratch.path().join(LOG)).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        let lines: Vec<&str> = text.lines().collect();
        let tail = &lines[lines.len().saturating_sub(n)..];
        if tail.is_empty() {
            return String::new();
        }
        let mut s = String::from("; its last messages:");
        for l in tail {
            s.push_str("\n    ");
            s.push_str(l);
        }
        s
    }

    /// The scratch directory (the brokers' command lines name it).
    pub fn scratch(&self) -> &Path {
        self.scratch.path()
    }

    /// Has it exited? Reaps it if so.
    pub fn poll_exit(&mut self) -> Option<ExitStatus> {
        self.wait_exit(Duration::ZERO)
            .ok()
            .flatten()
            .map(|(s, _)| s)
    }

    /// Wait up to `timeout` for it to exit; returns its status and the
    /// moment the exit was noticed.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<(ExitStatus, Instant)>> {
        if let (Some(s), Some(t)) = (self.status, self.exited_at) {
            return Ok(Some((s, t)));
        }
        let at = match self.exited_rx.recv_timeout(timeout) {
            Ok(at) => at,
            Err(RecvTimeoutError::Timeout) => return Ok(None),
            Err(RecvTimeoutError::Disconnected) => Instant::now(),
        };
        let status = self.child.wait().context("cannot reap canopy start")?;
        self.exited_at = Some(at);
        self.status = Some(status);
        Ok(Some((status, at)))
    }

    /// Read stdout until `export CANOPY_URI=...`, for up to `timeout`.
    pub fn read_uri(&mut self, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let rx = self
            .lines
            .as_ref()
            .ok_or_else(|| anyhow!("stdout not captured"))?;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(uri) = uri_from_line(&line) {
                        return Ok(uri);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    bail!(
                        "canopy start printed no CANOPY_URI within {timeout:?}{}",
                        self.log_tail(20)
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let st = self.wait_exit(Duration::from_secs(5))?;
                    bail!(
                        "canopy start {} before printing CANOPY_URI{}",
                        st.map(|(s, _)| s.to_string())
                            .unwrap_or_else(|| "closed its output".into()),
                        self.log_tail(20)
                    )
                }
            }
        }
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL (and any broker it left
    /// behind). Returns the launcher's status and whether it needed SIGKILL.
    pub fn terminate(&mut self, grace: Duration) -> Result<(ExitStatus, bool)> {
        if let (Some(s), Some(k)) = (self.status, self.torn_down) {
            return Ok((s, k));
        }
        let mut killed = false;
        if self.status.is_none() {
            let _ = kill(self.pid, Signal::SIGTERM);
            if self.wait_exit(grace)?.is_none() {
                eprintln!(
                    "canopy-bench: canopy start (pid {}) did not stop within {grace:?}; killing it",
                    self.pid
                );
                killed = true;
                let _ = kill(self.pid, Signal::SIGKILL);
                if self.wait_exit(Duration::from_secs(10))?.is_none() {
                    bail!("canopy start (pid {}) survived SIGKILL", self.pid);
                }
            }
        }
        let strays = self.kill_strays();
        if strays > 0 {
            eprintln!("canopy-bench: killed {strays} broker process(es) left behind");
            killed = true;
        }
        let status = self.status.expect("reaped above");
        self.torn_down = Some(killed);
        live().remove(&self.pid.as_raw());
        Ok((status, killed))
    }

    /// SIGKILL every other process whose command line names the scratch
    /// directory (brokers get `--rundir SCRATCH/canopy-...`), and wait up
    /// to 5 s for them to go. Returns how many there were.
    fn kill_strays(&self) -> usize {
        let mut killed = std::collections::HashSet::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let found = self.strays();
            if found.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                eprintln!("canopy-bench: processes {found:?} survive SIGKILL");
                break;
            }
            for pid in found {
                if kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok() {
                    killed.insert(pid);
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        killed.len()
    }

    fn strays(&self) -> Vec<i32> {
        strays(self.scratch.path(), self.pid.as_raw())
    }
}

/// Live processes (a zombie's command line is empty) naming `dir` on
/// their command line, other than this one and `except`.
fn strays(dir: &Path, except: i32) -> Vec<i32> {
    let me = std::process::id() as i32;
    let dir = dir.as_os_str().as_encoded_bytes().to_vec();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_str()?.parse::<i32>().ok()?;
            if pid == me || pid == except {
                return None;
            }
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            cmdline
                .split(|b| *b == 0)
                .any(|a| a.starts_with(&dir))
                .then_some(pid)
        })
        .collect()
}

/// Launchers not yet torn down, by pid, with their scratch directories.
static LIVE: Mutex<BTreeMap<i32, PathBuf>> = Mutex::new(BTreeMap::new());

fn live() -> std::sync::MutexGuard<'static, BTreeMap<i32, PathBuf>> {
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Is `pid` (a child of ours) still running, i.e. not a zombie?
fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next().map(|st| st != "Z"))
        })
        .unwrap_or(false)
}

/// On SIGINT, SIGTERM or SIGHUP: stop every live instance (SIGTERM to its
/// launcher, SIGKILL to whatever is left after the grace period), remove
/// the scratch directories, and exit with 128 + the signal. Without this,
/// a benchmark killed from outside would leave its brokers running.
pub fn stop_instances_on_signals() -> Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
        .context("cannot install signal handlers")?;
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            let all = live().clone();
            eprintln!(
                "canopy-bench: caught signal {sig}; stopping {} instance(s)",
                all.len()
            );
            for pid in all.keys() {
                let _ = kill(Pid::from_raw(*pid), Signal::SIGTERM);
            }
            let deadline = Instant::now() + GRACE;
            while all.keys().any(|p| running(*p)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            for (pid, dir) in &all {
                let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
                for s in strays(dir, *pid) {
                    let _ = kill(Pid::from_raw(s), Signal::SIGKILL);
                }
                let _ = std::fs::remove_dir_all(dir);
            }
            std::process::exit(128 + sig);
        }
    });
    Ok(())
}

impl Drop for Launcher {
    fn drop(&mut self) {
        if let Err(e) = self.terminate(GRACE) {
            eprintln!("canopy-bench: teardown: {e:#}");
        }
    }
}

/// The URI in the launcher's `export CANOPY_URI=...` line.
pub fn uri_from_line(line: &str) -> Option<String> {
    let uri = line.trim().strip_prefix("export CANOPY_URI=")?.trim();
    (!uri.is_empty()).then(|| uri.to_string())
}

/// How an instance ended when the benchmark stopped it.
#[derive(Clone, Debug, Serialize)]
pub struct Teardown {
    /// The launcher's exit code after SIGTERM (143 is normal) ...
    pub exit_code: Option<i32>,
    /// ... or the signal that killed it.
    pub signal: Option<i32>,
    /// Stopped on SIGTERM within the grace period, nothing left behind.
    pub clean: bool,
}

impl Teardown {
    pub fn describe(&self) -> String {
        let how = match (self.exit_code, self.signal) {
            (Some(c), _) => format!("exit code {c}"),
            (_, Some(s)) => format!("killed by signal {s}"),
            _ => "unknown status".into(),
        };
        format!(
            "the instance {} on SIGTERM ({how})",
            if self.clean {
                "stopped cleanly"
            } else {
                "did not stop cleanly"
            }
        )
    }
}

/// A running instance, torn down on drop (through its launcher).
pub struct Instance {
    pub launcher: Launcher,
    /// Its runtime directory: `local-R` is rank R's local connector.
    pub dir: PathBuf,
    /// Spawn of `canopy start` to its printing CANOPY_URI, seconds.
    pub start_s: f64,
}

impl Instance {
    /// `canopy start --size SIZE --fanout FANOUT --timeout T` in a fresh
    /// scratch directory under `parent`; returns once every broker is up.
    pub fn start(
        canopy: &Path,
        size: u32,
        fanout: u32,
        timeout: Duration,
        parent: Option<&Path>,
    ) -> Result<Instance> {
        Instance::start_with(canopy, size, fanout, timeout, parent, &[])
    }

    /// [`Instance::start`] with further `canopy start` arguments.
    pub fn start_with(
        canopy: &Path,
        size: u32,
        fanout: u32,
        timeout: Duration,
        parent: Option<&Path>,
        extra: &[String],
    ) -> Result<Instance> {
        let scratch = Scratch::new(parent)?;
        let mut args: Vec<String> = vec![
            "--size".into(),
            size.to_string(),
            "--fanout".into(),
            fanout.to_string(),
            "--timeout".into(),
            timeout.as_secs_f64().to_string(),
        ];
        args.extend_from_slice(extra);
        let t0 = Instant::now();
        // Dropping `launcher` on an early return tears the instance down.
        let mut launcher = Launcher::spawn(canopy, &args, true, scratch)?;
        let uri = launcher.read_uri(timeout + GRACE)?;
        let start_s = t0.elapsed().as_secs_f64();
        let dir = uri
            .strip_prefix("local://")
            .map(Path::new)
            .and_then(Path::parent)
            .ok_or_else(|| anyhow!("canopy start printed an unexpected CANOPY_URI '{uri}'"))?
            .to_path_buf();
        Ok(Instance {
            launcher,
            dir,
            start_s,
        })
    }

    /// Rank `rank`'s local connector.
    pub fn uri(&self, rank: u32) -> String {
        format!("local://{}/local-{rank}", self.dir.display())
    }

    /// Run `work` on a worker thread and stop the instance afterwards; see
    /// [`supervise`].
    pub fn run<T: Send>(
        &mut self,
        stall: Duration,
        work: impl FnOnce(&Progress) -> Result<T> + Send,
    ) -> Result<(T, Teardown)> {
        supervise(&mut self.launcher, stall, work)
    }
}

/// A counter the measurement bumps whenever it gets anywhere.
#[derive(Default)]
pub struct Progress(AtomicU64);

impl Progress {
    pub fn tick(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Run `work` against the instance on a worker thread, then stop the
/// instance (SIGTERM) and report how it went.
///
/// A client's writes to a local connector cannot be given a deadline, so
/// this thread watches `work`'s progress: if it does not tick for `stall`,
/// the instance is torn down, which closes the worker's sockets and ends
/// whatever it waits on. An instance that exits on its own during the
/// measurement is an error, as is a stall.
pub fn supervise<T: Send>(
    launcher: &mut Launcher,
    stall: Duration,
    work: impl FnOnce(&Progress) -> Result<T> + Send,
) -> Result<(T, Teardown)> {
    let progress = Progress::default();
    let (outcome, stalled) = std::thread::scope(|s| {
        let worker = s.spawn(|| work(&progress));
        let (mut seen, mut since, mut stalled) = (0, Instant::now(), false);
        while !worker.is_finished() {
            std::thread::sleep(Duration::from_millis(50));
            let t = progress.get();
            if t != seen {
                (seen, since) = (t, Instant::now());
            } else if !stalled && since.elapsed() > stall {
                stalled = true;
                eprintln!("canopy-bench: no progress for {stall:?}; tearing the instance down");
                if let Err(e) = launcher.terminate(GRACE) {
                    eprintln!("canopy-bench: teardown: {e:#}");
                }
            }
        }
        (worker.join(), stalled)
    });
    let died = if stalled { None } else { launcher.poll_exit() };
    let (status, killed) = launcher.terminate(GRACE)?;
    let r = outcome.map_err(|_| anyhow!("the measurement thread panicked"))?;
    if stalled {
        let e = r.err().unwrap_or_else(|| anyhow!("measurement stalled"));
        return Err(e.context(format!(
            "no progress for {stall:?}; the instance was torn down{}",
            launcher.log_tail(20)
        )));
    }
    if let Some(st) = died {
        let e = r
            .err()
            .unwrap_or_else(|| anyhow!("the client saw no error"));
        return Err(e.context(format!(
            "the instance exited ({st}) during the benchmark{}",
            launcher.log_tail(20)
        )));
    }
    let v = r.map_err(|e| {
        let tail = launcher.log_tail(20);
        if tail.is_empty() {
            e
        } else {
            e.context(format!("the benchmark failed{tail}"))
        }
    })?;
    let teardown = Teardown {
        exit_code: status.code(),
        signal: std::os::unix::process::ExitStatusExt::signal(&status),
        clean: !killed && (status.success() || status.code() == Some(128 + 15)),
    };
    if !teardown.clean {
        eprintln!("canopy-bench: warning: the instance did not stop cleanly on SIGTERM ({status})");
    }
    Ok((v, teardown))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_line() {
        assert_eq!(
            uri_from_line("export CANOPY_URI=local:///run/x/local-0").as_deref(),
            Some("local:///run/x/local-0")
        );
        assert_eq!(uri_from_line("canopy: 8 brokers up (instance ab)"), None);
        assert_eq!(uri_from_line("export CANOPY_URI="), None);
    }

    #[test]
    fn scratch_is_private_and_removed() {
        let parent = std::env::temp_dir();
        let s = Scratch::new(Some(&parent)).unwrap();
        let p = s.path().to_path_buf();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o700
        );
        std::fs::write(p.join("f"), b"x").unwrap();
        let s2 = Scratch::new(Some(&parent)).unwrap();
        assert_ne!(s2.path(), p);
        drop(s);
        assert!(!p.exists());
    }

    #[test]
    fn a_stubborn_launcher_is_killed() {
        // `sh` stands in for canopy: it ignores SIGTERM.
        let dir = std::env::temp_dir().join(format!("cbench-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sh = dir.join("fake-canopy");
        std::fs::write(&sh, "#!/bin/sh\ntrap '' TERM\necho export CANOPY_URI=local:///nowhere\nwhile :; do sleep 1; done\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&sh, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut l = Launcher::spawn(&sh, &[], true, Scratch::new(Some(&dir)).unwrap()).unwrap();
        assert_eq!(
            l.read_uri(Duration::from_secs(10)).unwrap(),
            "local:///nowhere"
        );
        assert!(l.poll_exit().is_none());
        let t = Instant::now();
        let (st, killed) = l.terminate(Duration::from_millis(200)).unwrap();
        assert!(killed);
        assert!(!st.success());
        assert!(t.elapsed() < Duration::from_secs(5));
        drop(l);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
