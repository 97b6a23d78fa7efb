//! The socket shell's side of `exec.run`: start this rank's command, read
//! its output, wait for it, and hand records to the core (which decided
//! that it runs: `core::exec`).
//!
//! - **Personal instance** (`ExecPlan::Direct`): the body is a JSON run
//!   spec; the command runs as the broker's own user, in a process group
//!   of its own that is killed whole when the command ends, so nothing it
//!   started outlives `canopy exec`.
//! - **System instance** (`ExecPlan::Helper`): the body is the signed
//!   input of `canopy-imp` (docs/imp.md), written to the helper's stdin
//!   untouched; the helper's records become ours, its receipt included.
//!   The broker never runs a user's command itself.
//!
//! No threads: the command's pipes are non-blocking and polled by the
//! broker's loop ([`Runner::poll_fds`], [`Runner::ready`]), and its exit is
//! noticed through SIGCHLD on a wake-up socket ([`Runner::wake`]). A
//! command's output is read only as fast as the loop takes it, and stdin
//! waiting for it is bounded.

use crate::core::exec::Spawn;
use canopy_proto::exec::{Ended, Record};
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use tracing::{debug, warn};

/// Bytes of stdin waiting for one command; past this its stdin is cut.
const STDIN_BUDGET: usize = 16 << 20;
/// How long output is read after the command ended (see
/// [`Runner::expire`]).
pub const PIPE_GRACE: std::time::Duration = std::time::Duration::from_secs(2);
/// Read size for output pipes.
const CHUNK: usize = 64 * 1024;
/// A helper's record: most bytes in one (the helper sends at most 64 KiB
/// of output, or a receipt of a few KiB).
const MAX_HELPER_RECORD: usize = 1 << 20;
/// What the helper may write on stderr before the rest is dropped.
const MAX_HELPER_STDERR: usize = 64 * 1024;

/// In a personal instance, run commands through this `canopy-imp`.
pub const HELPER_ENV: &str = "CANOPY_EXEC_HELPER";

/// How this broker runs commands.
#[derive(Debug, Clone)]
pub enum ExecPlan {
    Direct,
    Helper { path: PathBuf },
    Off,
}

impl ExecPlan {
    pub fn mode(&self) -> crate::core::exec::ExecMode {
        use crate::core::exec::ExecMode;
        match self {
            ExecPlan::Direct => ExecMode::Owner,
            ExecPlan::Helper { .. } => ExecMode::Helper,
            ExecPlan::Off => ExecMode::Off,
        }
    }
}

/// The run spec a personal instance's `canopy exec` sends.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSpec {
    pub argv: Vec<String>,
    pub cwd: String,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub stdin: bool,
}

/// Which pipe of a command is ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pipe {
    Stdout,
    Stderr,
    Stdin,
}

struct Proc {
    child: Child,
    pid: i32,
    /// The helper is signalled itself (it forwards); a direct command's
    /// whole group is.
    helper: bool,
    stdout: Option<ChildStdout>,
    stderr: Option<ChildStderr>,
    stdin: Option<ChildStdin>,
    /// Bytes for stdin not written yet, and whether to close it after.
    pending: VecDeque<u8>,
    close_stdin: bool,
    status: Option<ExitStatus>,
    /// When the command was seen to end.
    ended: Option<std::time::Instant>,
    /// Helper: bytes of its stdout not yet a whole record; its stderr.
    parse: Vec<u8>,
    errlog: Vec<u8>,
    /// Helper: a receipt or refusal was passed on (the last record).
    fin: bool,
}

pub struct Runner {
    rank: u32,
    plan: ExecPlan,
    instance: String,
    host: String,
    procs: HashMap<u64, Proc>,
    out: Vec<(u64, Vec<u8>)>,
    /// The read buffer, allocated once.
    buf: Vec<u8>,
    /// Readable on SIGCHLD: some command may have ended.
    pub wake: UnixStream,
    /// The other end of `wake`, kept open even when nothing writes to it
    /// (exec off): a closed peer would make `wake` readable for good and
    /// the loop would spin.
    _waker: Option<UnixStream>,
}

fn nonblocking(fd: &impl AsFd) {
    let raw = fd.as_fd();
    if let Ok(fl) = fcntl(raw.as_raw_fd(), FcntlArg::F_GETFL) {
        let _ = fcntl(
            raw.as_raw_fd(),
            FcntlArg::F_SETFL(OFlag::from_bits_truncate(fl) | OFlag::O_NONBLOCK),
        );
    }
}

impl Runner {
    pub fn new(
        rank: u32,
        plan: ExecPlan,
        instance: String,
        host: Option<String>,
    ) -> std::io::Result<Runner> {
        let host = host.unwrap_or_else(|| {
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_default()
        });
        let (wake, waker) = UnixStream::pair()?;
        wake.set_nonblocking(true)?;
        waker.set_nonblocking(true)?;
        let waker = if matches!(plan, ExecPlan::Off) {
            Some(waker)
        } else {
            signal_hook::low_level::pipe::register(signal_hook::consts::SIGCHLD, waker)?;
            None
        };
        Ok(Runner {
            rank,
            plan,
            instance,
            host,
            procs: HashMap::new(),
            out: Vec::new(),
            buf: vec![0u8; CHUNK],
            wake,
            _waker: waker,
        })
    }

    fn failed(&self, code: u8, why: String) -> Vec<u8> {
        let rank = self.rank;
        Record::Failed {
            rank,
            code,
            reason: &format!("rank {rank}: {why}"),
        }
        .encode()
    }

    /// Start a command; a record saying why is returned if it cannot start.
    pub fn spawn(&mut self, s: Spawn) -> Option<Vec<u8>> {
        let (mut cmd, helper, keep_stdin, prelude) = match &self.plan {
            ExecPlan::Off => return Some(self.failed(126, "exec is not enabled here".into())),
            ExecPlan::Direct => {
                let spec: RunSpec = match serde_json::from_slice(&s.body) {
                    Ok(x) => x,
                    Err(e) => return Some(self.failed(126, format!("malformed run spec: {e}"))),
                };
                let Some(prog) = spec.argv.first() else {
                    return Some(self.failed(126, "the command is empty".into()));
                };
                if !std::path::Path::new(&spec.cwd).is_dir() {
                    return Some(self.failed(
                        126,
                        format!(
                            "cannot run in {}: no such directory here; pass --dir",
                            spec.cwd
                        ),
                    ));
                }
                let mut c = Command::new(prog);
                c.args(&spec.argv[1..])
                    .current_dir(&spec.cwd)
                    .env("CANOPY_EXEC_RANK", self.rank.to_string())
                    .envs(&spec.env)
                    .process_group(0);
                (c, false, spec.stdin, Vec::new())
            }
            ExecPlan::Helper { path } => {
                // The body is `stdin flag | helper input`.
                let Some((&flag, input)) = s.body.split_first() else {
                    return Some(self.failed(126, "malformed signed exec body: empty".into()));
                };
                let mut c = Command::new(path);
                c.arg("run")
                    .arg("--instance")
                    .arg(&self.instance)
                    .arg("--rank")
                    .arg(self.rank.to_string())
                    .arg("--host")
                    .arg(&self.host)
                    .arg("--submitter")
                    .arg(&s.submitter)
                    .env_clear();
                // The helper honours this only when it is not setuid (a
                // root-run instance trying a new imp.toml).
                if let Some(v) = std::env::var_os(canopy_imp::run::CONFIG_ENV) {
                    c.env(canopy_imp::run::CONFIG_ENV, v);
                }
                (c, true, flag == b'1', input.to_vec())
            }
        };
        let piped = keep_stdin || !prelude.is_empty();
        cmd.stdin(if piped { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let code = if e.kind() == std::io::ErrorKind::NotFound {
                    127
                } else {
                    126
                };
                let what = if helper {
                    "the exec helper"
                } else {
                    "the command"
                };
                let prog = cmd.get_program().to_string_lossy().into_owned();
                return Some(self.failed(
                    code,
                    format!("cannot start {what} {prog}: {}", io_reason(&e)),
                ));
            }
        };
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let stdin = child.stdin.take();
        for fd in [
            stdout.as_ref().map(|x| x.as_fd()),
            stderr.as_ref().map(|x| x.as_fd()),
            stdin.as_ref().map(|x| x.as_fd()),
        ]
        .into_iter()
        .flatten()
        {
            nonblocking(&fd);
        }
        let pid = child.id() as i32;
        let mut p = Proc {
            child,
            pid,
            helper,
            stdout,
            stderr,
            stdin,
            pending: prelude.into(),
            close_stdin: !keep_stdin,
            status: None,
            ended: None,
            parse: Vec::new(),
            errlog: Vec::new(),
            fin: false,
        };
        if p.pending.is_empty() && p.close_stdin {
            p.stdin = None;
        }
        self.procs.insert(s.sid, p);
        self.flush_stdin(s.sid);
        None
    }

    /// The pipes to poll: (session, which pipe, fd, want write).
    pub fn poll_fds(&self) -> Vec<(u64, Pipe, RawFd, bool)> {
        let mut v = Vec::new();
        for (&sid, p) in &self.procs {
            if let Some(o) = &p.stdout {
                v.push((sid, Pipe::Stdout, o.as_raw_fd(), false));
            }
            if let Some(e) = &p.stderr {
                v.push((sid, Pipe::Stderr, e.as_raw_fd(), false));
            }
            if let Some(i) = &p.stdin {
                if !p.pending.is_empty() {
                    v.push((sid, Pipe::Stdin, i.as_raw_fd(), true));
                }
            }
        }
        v
    }

    /// A pipe is ready (readable, writable, or closed).
    pub fn ready(&mut self, sid: u64, pipe: Pipe) {
        match pipe {
            Pipe::Stdin => self.flush_stdin(sid),
            Pipe::Stdout | Pipe::Stderr => self.read_pipe(sid, pipe),
        }
        self.maybe_done(sid);
    }

    fn read_pipe(&mut self, sid: u64, pipe: Pipe) {
        let rank = self.rank;
        let Some(p) = self.procs.get_mut(&sid) else {
            return;
        };
        let buf = &mut self.buf;
        let n = {
            let r: Option<&mut dyn Read> = match pipe {
                Pipe::Stdout => p.stdout.as_mut().map(|x| x as &mut dyn Read),
                _ => p.stderr.as_mut().map(|x| x as &mut dyn Read),
            };
            let Some(r) = r else { return };
            match r.read(buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return,
                Err(_) => 0,
            }
        };
        if n == 0 {
            match pipe {
                Pipe::Stdout => p.stdout = None,
                _ => p.stderr = None,
            }
            if p.helper && pipe == Pipe::Stderr {
                log_helper_stderr(&p.errlog);
            }
            return;
        }
        let data = &buf[..n];
        if !p.helper {
            let rec = match pipe {
                Pipe::Stdout => Record::Stdout(rank, data),
                _ => Record::Stderr(rank, data),
            };
            self.out.push((sid, rec.encode()));
            return;
        }
        if pipe == Pipe::Stderr {
            if p.errlog.len() < MAX_HELPER_STDERR {
                p.errlog.extend_from_slice(data);
            }
            return;
        }
        p.parse.extend_from_slice(data);
        loop {
            match take_helper_record(&mut p.parse) {
                Ok(None) => break,
                Ok(Some((tag, bytes))) => {
                    if p.fin {
                        continue;
                    }
                    match tag {
                        b'1' => self.out.push((sid, Record::Stdout(rank, &bytes).encode())),
                        b'2' => self.out.push((sid, Record::Stderr(rank, &bytes).encode())),
                        b'R' => {
                            p.fin = true;
                            let ended = receipt_exit(&bytes);
                            self.out.push((sid, Record::Receipt(rank, &bytes).encode()));
                            self.out.push((sid, Record::Exit(rank, ended).encode()));
                        }
                        b'X' => {
                            p.fin = true;
                            let why = String::from_utf8_lossy(&bytes);
                            let rec = Record::Failed {
                                rank,
                                code: 126,
                                reason: why.trim_end(),
                            };
                            self.out.push((sid, rec.encode()));
                        }
                        _ => {}
                    }
                }
                Err(why) => {
                    if !p.fin {
                        p.fin = true;
                        let rec = Record::Failed {
                            rank,
                            code: 126,
                            reason: &format!(
                                "rank {rank}: the exec helper's output is malformed ({why})"
                            ),
                        };
                        self.out.push((sid, rec.encode()));
                    }
                    p.parse.clear();
                    p.stdout = None;
                    break;
                }
            }
        }
    }

    fn flush_stdin(&mut self, sid: u64) {
        let Some(p) = self.procs.get_mut(&sid) else {
            return;
        };
        let Some(w) = p.stdin.as_mut() else {
            p.pending.clear();
            return;
        };
        while !p.pending.is_empty() {
            let (a, _) = p.pending.as_slices();
            match w.write(a) {
                Ok(0) => break,
                Ok(n) => {
                    p.pending.drain(..n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => {
                    // The command closed its stdin: drop what is left.
                    p.pending.clear();
                    p.stdin = None;
                    return;
                }
            }
        }
        if p.close_stdin {
            p.stdin = None;
        }
    }

    /// SIGCHLD: collect what ended.
    pub fn reap(&mut self) {
        let mut b = [0u8; 256];
        while matches!((&self.wake).read(&mut b), Ok(n) if n > 0) {}
        let sids: Vec<u64> = self.procs.keys().copied().collect();
        for sid in sids {
            if let Some(p) = self.procs.get_mut(&sid) {
                if p.status.is_none() {
                    if let Ok(Some(st)) = p.child.try_wait() {
                        p.status = Some(st);
                        p.ended = Some(std::time::Instant::now());
                        p.stdin = None;
                        p.pending.clear();
                        if !p.helper {
                            // Whatever the command left in its group goes
                            // with it, so its pipes close (the helper does
                            // the same for the user's group).
                            let _ = killpg(Pid::from_raw(p.pid), Signal::SIGKILL);
                        }
                    }
                }
            }
            self.maybe_done(sid);
        }
    }

    /// Commands that ended but whose pipes something outside their group
    /// still holds open (it left the group): after [`PIPE_GRACE`] their
    /// pipes are dropped, so the exec ends. Returns how long until the
    /// next such deadline, if any.
    pub fn expire(&mut self) -> Option<std::time::Duration> {
        if self.procs.is_empty() {
            return None;
        }
        let now = std::time::Instant::now();
        let mut next: Option<std::time::Duration> = None;
        let mut due = Vec::new();
        for (&sid, p) in &self.procs {
            if let (Some(at), true) = (p.ended, p.stdout.is_some() || p.stderr.is_some()) {
                let left = PIPE_GRACE.saturating_sub(now - at);
                if left.is_zero() {
                    due.push(sid);
                } else {
                    next = Some(next.map_or(left, |n| n.min(left)));
                }
            }
        }
        for sid in due {
            if let Some(p) = self.procs.get_mut(&sid) {
                warn!(sid, "exec: the command ended but something it started outside its process group holds its output open; no longer reading it");
                p.stdout = None;
                p.stderr = None;
            }
            self.maybe_done(sid);
        }
        next
    }

    /// The last record once the command has ended and its output is read.
    fn maybe_done(&mut self, sid: u64) {
        let rank = self.rank;
        let Some(p) = self.procs.get(&sid) else {
            return;
        };
        let Some(st) = p.status else {
            return;
        };
        if p.stdout.is_some() || p.stderr.is_some() {
            return;
        }
        let p = self.procs.remove(&sid).expect("present");
        if p.helper && p.fin {
            return;
        }
        let rec = match (st.code(), st.signal()) {
            (Some(c), _) if p.helper => Record::Failed {
                rank,
                code: 126,
                reason: &format!(
                    "rank {rank}: the exec helper exited {c} without a receipt or a reason"
                ),
            }
            .encode(),
            (None, Some(s)) if p.helper => Record::Failed {
                rank,
                code: 126,
                reason: &format!(
                    "rank {rank}: the exec helper was killed by signal {s} before it reported"
                ),
            }
            .encode(),
            (Some(c), _) => Record::Exit(rank, Ended::Status(c)).encode(),
            (None, Some(s)) => Record::Exit(rank, Ended::Signal(s)).encode(),
            _ => Record::Exit(rank, Ended::Status(1)).encode(),
        };
        self.out.push((sid, rec));
    }

    pub fn signal(&mut self, sid: u64, sig: i32) {
        let Some(p) = self.procs.get(&sid) else {
            return;
        };
        if p.status.is_some() {
            return;
        }
        let res = if p.helper {
            // The helper forwards these; SIGKILL cannot be forwarded, so it
            // is asked for with SIGUSR1 (docs/imp.md).
            let s = if sig == 9 {
                Signal::SIGUSR1
            } else {
                Signal::try_from(sig).unwrap_or(Signal::SIGTERM)
            };
            kill(Pid::from_raw(p.pid), s)
        } else {
            killpg(
                Pid::from_raw(p.pid),
                Signal::try_from(sig).unwrap_or(Signal::SIGTERM),
            )
        };
        if let Err(e) = res {
            debug!(sid, sig, "exec: signal not delivered: {e}");
        }
    }

    /// Bytes for the command's stdin (empty: close it once written).
    pub fn stdin(&mut self, sid: u64, data: Vec<u8>) {
        let Some(p) = self.procs.get_mut(&sid) else {
            return;
        };
        if p.stdin.is_none() || p.close_stdin {
            return;
        }
        if data.is_empty() {
            p.close_stdin = true;
        } else if p.pending.len() + data.len() > STDIN_BUDGET {
            warn!(
                sid,
                budget = STDIN_BUDGET,
                "exec: the command is not reading its stdin; its input is cut (budget)"
            );
            p.pending.clear();
            p.stdin = None;
            return;
        } else {
            p.pending.extend(data);
        }
        self.flush_stdin(sid);
    }

    /// Records ready for the core.
    pub fn drain(&mut self) -> Vec<(u64, Vec<u8>)> {
        std::mem::take(&mut self.out)
    }

    /// Kill every command (the broker is stopping).
    pub fn kill_all(&mut self) {
        let sids: Vec<u64> = self.procs.keys().copied().collect();
        for sid in sids {
            self.signal(sid, 9);
        }
    }
}

/// An I/O error as a lower-case reason, without libstd's "(os error N)".
fn io_reason(e: &std::io::Error) -> String {
    let t = e.to_string();
    let t = match t.find(" (os error") {
        Some(i) => t[..i].to_string(),
        None => t,
    };
    canopy_imp::envelope::lower_first(t)
}

/// The exit a receipt records (unverified here: `canopy exec` verifies
/// receipts against the nodes' keys).
fn receipt_exit(envelope: &[u8]) -> Ended {
    canopy_imp::envelope::Envelope::parse(envelope)
        .ok()
        .and_then(|e| {
            serde_json::from_slice::<canopy_imp::receipt::Receipt>(e.unverified_body()).ok()
        })
        .map(|r| match r.exit {
            canopy_imp::receipt::Exit::Status(s) => Ended::Status(s),
            canopy_imp::receipt::Exit::Signal(s) => Ended::Signal(s),
        })
        .unwrap_or(Ended::Status(1))
}

/// Take one whole `TAG SP LEN \n BYTES` record off the front of `buf`;
/// `Ok(None)` if it is not all there yet.
fn take_helper_record(buf: &mut Vec<u8>) -> Result<Option<(u8, Vec<u8>)>, String> {
    let Some(nl) = buf.iter().take(32).position(|&b| b == b'\n') else {
        return if buf.len() >= 32 {
            Err("bad record header".into())
        } else {
            Ok(None)
        };
    };
    if nl < 3 || buf[1] != b' ' {
        return Err("bad record header".into());
    }
    let len: usize = std::str::from_utf8(&buf[2..nl])
        .ok()
        .filter(|t| t.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|t| t.parse().ok())
        .filter(|&l| l <= MAX_HELPER_RECORD)
        .ok_or("bad record length")?;
    if buf.len() < nl + 1 + len {
        return Ok(None);
    }
    let tag = buf[0];
    let data = buf[nl + 1..nl + 1 + len].to_vec();
    buf.drain(..nl + 1 + len);
    Ok(Some((tag, data)))
}

/// The helper's stderr repeats refusals for people: into the log.
fn log_helper_stderr(err: &[u8]) {
    let s = String::from_utf8_lossy(err);
    for line in s.lines().filter(|l| !l.trim().is_empty()) {
        warn!(line = %line, "exec: helper");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With exec off nothing writes to the wake-up socket, and it must not
    /// read as ready either: a broker polls it on every turn, and a ready
    /// one would spin its loop at 100% CPU.
    #[test]
    fn the_wake_socket_is_quiet_with_exec_off() {
        let r = Runner::new(0, ExecPlan::Off, "i".into(), Some("h".into())).unwrap();
        let mut fds = [nix::poll::PollFd::new(
            r.wake.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let n = nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO).unwrap();
        assert_eq!(n, 0, "{:?}", fds[0].revents());
    }

    #[test]
    fn helper_records_parse_as_they_arrive() {
        let mut b = b"1 3\nab".to_vec();
        assert_eq!(take_helper_record(&mut b).unwrap(), None, "not whole yet");
        b.extend_from_slice(b"c2 0\nR 2\n{}");
        assert_eq!(
            take_helper_record(&mut b).unwrap(),
            Some((b'1', b"abc".to_vec()))
        );
        assert_eq!(take_helper_record(&mut b).unwrap(), Some((b'2', vec![])));
        assert_eq!(
            take_helper_record(&mut b).unwrap(),
            Some((b'R', b"{}".to_vec()))
        );
        assert_eq!(take_helper_record(&mut b).unwrap(), None);
        assert!(b.is_empty());
        for bad in [
            &b"1x3\nabc"[..],
            b"1 -3\nabc",
            b"1 99999999999\n",
            b"1 \n",
            &[b'1'; 40],
        ] {
            assert!(take_helper_record(&mut bad.to_vec()).is_err(), "{bad:?}");
        }
    }
}
