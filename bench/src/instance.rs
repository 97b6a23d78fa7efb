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
use std::io::BufRead;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// How long a launcher gets to stop its brokers after SIGTERM.
pub const GRACE: Duration = Duration::from_secs(10);

/// A private directory, removed (with its contents) on drop.
pub struct Scratch(PathBuf);

impl Scratch {
    /// Create one under `parent`, or where `canopy start` would put its
    /// runtime directory by default ($XDG_RUNTIME_DIR, else the temp dir).
    pub fn new(parent: Option<&Path>) -> Result<Scratch> {
        let parent = match parent {
            Some(p) => p.to_path_buf(),
            None => match std::env::var_os("XDG_RUNTIME_DIR") {
                Some(d) if !d.is_empty() && Path::new(&d).is_dir() => PathBuf::from(d),
                _ => std::env::temp_dir(),
            },
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
    /// Stderr (the launcher's and the brokers') is passed through.
    pub fn spawn(canopy: &Path, args: &[String], capture: bool, scratch: Scratch) -> Result<Self> {
        let mut cmd = Command::new(canopy);
        cmd.arg("start")
            .arg("--rundir")
            .arg(scratch.path())
            .args(args)
            .env_remove("CANOPY_URI")
            .env_remove("CANOPY_BROKER")
            .stdin(Stdio::null())
            .stdout(if capture {
                Stdio::piped()
            } else {
                Stdio::null()
            });
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot run {}", canopy.display()))?;
        let pid = Pid::from_raw(child.id() as i32);
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
                    bail!("canopy start printed no CANOPY_URI within {timeout:?}")
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let st = self.wait_exit(Duration::from_secs(5))?;
                    bail!(
                        "canopy start {} before printing CANOPY_URI (see its messages above)",
                        st.map(|(s, _)| s.to_string())
                            .unwrap_or_else(|| "closed its output".into())
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

    /// Live processes (a zombie's command line is empty) naming the
    /// scratch directory, other than this one and the launcher.
    fn strays(&self) -> Vec<i32> {
        let me = std::process::id() as i32;
        let dir = self.scratch.path().as_os_str().as_encoded_bytes().to_vec();
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        procs
            .flatten()
            .filter_map(|e| {
                let pid = e.file_name().to_str()?.parse::<i32>().ok()?;
                if pid == me || pid == self.pid.as_raw() {
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
