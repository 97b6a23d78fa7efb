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
//! Threads per command: one per output pipe, one waiting, one feeding
//! stdin when asked; all end with the command. Records reach the loop
//! through a bounded channel and a wake-up socket.

use crate::core::exec::Spawn;
use canopy_proto::exec::{Ended, Record};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use tracing::{debug, warn};

/// Records waiting for the loop (all commands together): a command whose
/// output is not taken blocks on its pipe, not the broker's memory.
const QUEUE: usize = 1024;
/// Chunks of stdin waiting for one command; past this its stdin is cut.
const STDIN_QUEUE: usize = 256;
/// Read size for output pipes.
const CHUNK: usize = 64 * 1024;

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

struct Proc {
    pid: i32,
    /// The helper is signalled itself (it forwards); a direct command's
    /// whole group is.
    helper: bool,
    stdin: Option<SyncSender<Vec<u8>>>,
}

pub struct Runner {
    rank: u32,
    plan: ExecPlan,
    instance: String,
    host: String,
    procs: HashMap<u64, Proc>,
    tx: SyncSender<(u64, Vec<u8>)>,
    rx: Receiver<(u64, Vec<u8>)>,
    /// Readable when records wait.
    pub wake: UnixStream,
    waker: UnixStream,
}

impl Runner {
    pub fn new(
        rank: u32,
        plan: ExecPlan,
        instance: String,
        host: String,
    ) -> std::io::Result<Runner> {
        let (wake, waker) = UnixStream::pair()?;
        wake.set_nonblocking(true)?;
        waker.set_nonblocking(true)?;
        let (tx, rx) = sync_channel(QUEUE);
        Ok(Runner {
            rank,
            plan,
            instance,
            host,
            procs: HashMap::new(),
            tx,
            rx,
            wake,
            waker,
        })
    }

    /// Commands running now.
    pub fn running(&self) -> usize {
        self.procs.len()
    }

    /// Start a command; a record saying why is returned if it cannot start.
    pub fn spawn(&mut self, s: Spawn) -> Option<Vec<u8>> {
        let rank = self.rank;
        let fail = |code: u8, why: String| {
            Some(
                Record::Failed {
                    rank,
                    code,
                    reason: &format!("rank {rank}: {why}"),
                }
                .encode(),
            )
        };
        let (mut cmd, helper, stdin_wanted, prelude) = match &self.plan {
            ExecPlan::Off => return fail(126, "exec is not enabled here".into()),
            ExecPlan::Direct => {
                let spec: RunSpec = match serde_json::from_slice(&s.body) {
                    Ok(x) => x,
                    Err(e) => return fail(126, format!("malformed run spec: {e}")),
                };
                let Some(prog) = spec.argv.first() else {
                    return fail(126, "the command is empty".into());
                };
                if !std::path::Path::new(&spec.cwd).is_dir() {
                    return fail(
                        126,
                        format!(
                            "cannot run in {}: no such directory here; pass --dir",
                            spec.cwd
                        ),
                    );
                }
                let mut c = Command::new(prog);
                c.args(&spec.argv[1..])
                    .current_dir(&spec.cwd)
                    .env("CANOPY_EXEC_RANK", self.rank.to_string())
                    .envs(&spec.env)
                    .process_group(0);
                (c, false, spec.stdin, None)
            }
            ExecPlan::Helper { path } => {
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
                // The body is `stdin-flag byte | helper input`.
                let Some((&flag, input)) = s.body.split_first() else {
                    return fail(126, "malformed signed exec body: empty".into());
                };
                (c, true, flag == b'1', Some(input.to_vec()))
            }
        };
        let want_pipe = stdin_wanted || prelude.is_some();
        cmd.stdin(if want_pipe {
            Stdio::piped()
        } else {
            Stdio::null()
        })
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
                return fail(
                    code,
                    format!("cannot start {what} {prog}: {}", io_reason(&e)),
                );
            }
        };
        let pid = child.id() as i32;
        let sid = s.sid;
        let stdin_tx = match child.stdin.take() {
            Some(mut pipe) => {
                let (tx, rx) = sync_channel::<Vec<u8>>(STDIN_QUEUE);
                let keep_open = stdin_wanted;
                std::thread::spawn(move || {
                    if let Some(p) = prelude {
                        if pipe.write_all(&p).is_err() {
                            return;
                        }
                    }
                    if !keep_open {
                        return;
                    }
                    while let Ok(chunk) = rx.recv() {
                        if chunk.is_empty() || pipe.write_all(&chunk).is_err() {
                            return;
                        }
                    }
                });
                stdin_wanted.then_some(tx)
            }
            None => None,
        };
        let mut readers = Vec::new();
        if helper {
            let out = child.stdout.take().expect("piped");
            let tx = self.tx.clone();
            let waker = self.waker.try_clone().ok();
            readers.push(std::thread::spawn(move || {
                helper_records(sid, rank, out, tx, waker)
            }));
            let err = child.stderr.take().expect("piped");
            readers.push(std::thread::spawn(move || log_helper_stderr(err)));
        } else {
            for (pipe, stdout) in [
                (
                    Box::new(child.stdout.take().expect("piped")) as Box<dyn Read + Send>,
                    true,
                ),
                (Box::new(child.stderr.take().expect("piped")), false),
            ] {
                let tx = self.tx.clone();
                let waker = self.waker.try_clone().ok();
                readers.push(std::thread::spawn(move || {
                    pump(sid, rank, pipe, stdout, tx, waker)
                }));
            }
        }
        let tx = self.tx.clone();
        let waker = self.waker.try_clone().ok();
        std::thread::spawn(move || {
            let status = child.wait();
            if !helper {
                // Whatever the command left in its group goes with it (the
                // helper does the same for the user's group).
                let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            }
            let mut got_final = false;
            for r in readers {
                got_final |= r.join().unwrap_or(false);
            }
            if helper && got_final {
                return;
            }
            let rec = match status {
                Ok(st) => match (st.code(), st.signal()) {
                    (Some(c), _) if helper => Record::Failed {
                        rank,
                        code: 126,
                        reason: &format!(
                            "rank {rank}: the exec helper exited {c} without a receipt or a reason"
                        ),
                    }
                    .encode(),
                    (Some(c), _) => Record::Exit(rank, Ended::Status(c)).encode(),
                    (None, Some(s)) => Record::Exit(rank, Ended::Signal(s)).encode(),
                    _ => Record::Exit(rank, Ended::Status(1)).encode(),
                },
                Err(e) => Record::Failed {
                    rank,
                    code: 126,
                    reason: &format!("rank {rank}: cannot wait for the command: {e}"),
                }
                .encode(),
            };
            let _ = tx.send((sid, rec));
            if let Some(w) = waker {
                let _ = (&w).write(&[1]);
            }
        });
        self.procs.insert(
            sid,
            Proc {
                pid,
                helper,
                stdin: stdin_tx,
            },
        );
        None
    }

    pub fn signal(&mut self, sid: u64, sig: i32) {
        let Some(p) = self.procs.get(&sid) else {
            return;
        };
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

    pub fn stdin(&mut self, sid: u64, data: Vec<u8>) {
        let Some(p) = self.procs.get_mut(&sid) else {
            return;
        };
        let Some(tx) = &p.stdin else {
            return;
        };
        let eof = data.is_empty();
        match tx.try_send(data) {
            Ok(()) if !eof => {}
            Ok(()) => p.stdin = None,
            Err(TrySendError::Full(_)) => {
                warn!(
                    sid,
                    budget = STDIN_QUEUE,
                    "exec: the command is not reading its stdin; its input is cut (budget)"
                );
                p.stdin = None;
            }
            Err(TrySendError::Disconnected(_)) => p.stdin = None,
        }
    }

    /// Records waiting, for the core; a command whose last record is taken
    /// is forgotten.
    pub fn drain(&mut self) -> Vec<(u64, Vec<u8>)> {
        let mut b = [0u8; 256];
        while matches!((&self.wake).read(&mut b), Ok(n) if n > 0) {}
        let mut out = Vec::new();
        while let Ok((sid, rec)) = self.rx.try_recv() {
            if Record::decode(&rec).is_some_and(|r| r.is_final()) {
                self.procs.remove(&sid);
            }
            out.push((sid, rec));
        }
        out
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

fn send(
    tx: &SyncSender<(u64, Vec<u8>)>,
    waker: &Option<UnixStream>,
    sid: u64,
    rec: Vec<u8>,
) -> bool {
    if tx.send((sid, rec)).is_err() {
        return false;
    }
    if let Some(w) = waker {
        let _ = (&*w).write(&[1]);
    }
    true
}

/// A direct command's stdout or stderr, as records.
fn pump(
    sid: u64,
    rank: u32,
    mut pipe: Box<dyn Read + Send>,
    stdout: bool,
    tx: SyncSender<(u64, Vec<u8>)>,
    waker: Option<UnixStream>,
) -> bool {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match pipe.read(&mut buf) {
            Ok(0) => return false,
            Ok(n) => {
                let rec = if stdout {
                    Record::Stdout(rank, &buf[..n])
                } else {
                    Record::Stderr(rank, &buf[..n])
                };
                if !send(&tx, &waker, sid, rec.encode()) {
                    return false;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
}

/// The helper's stdout records (`TAG SP LEN \n BYTES`) as ours. Returns
/// whether a last record (receipt or refusal) was seen.
fn helper_records(
    sid: u64,
    rank: u32,
    pipe: std::process::ChildStdout,
    tx: SyncSender<(u64, Vec<u8>)>,
    waker: Option<UnixStream>,
) -> bool {
    let mut r = std::io::BufReader::new(pipe);
    let mut fin = false;
    loop {
        let rec = match read_helper_record(&mut r) {
            Ok(Some(x)) => x,
            Ok(None) => return fin,
            Err(why) => {
                let rec = Record::Failed {
                    rank,
                    code: 126,
                    reason: &format!("rank {rank}: the exec helper's output is malformed ({why})"),
                };
                send(&tx, &waker, sid, rec.encode());
                return true;
            }
        };
        let (tag, data) = rec;
        let out = match tag {
            b'1' => Record::Stdout(rank, &data).encode(),
            b'2' => Record::Stderr(rank, &data).encode(),
            b'R' => {
                // The receipt, then the exit it records.
                let ended = receipt_exit(&data);
                send(&tx, &waker, sid, Record::Receipt(rank, &data).encode());
                fin = true;
                Record::Exit(rank, ended).encode()
            }
            b'X' => {
                fin = true;
                let why = String::from_utf8_lossy(&data);
                Record::Failed {
                    rank,
                    code: 126,
                    reason: why.trim_end(),
                }
                .encode()
            }
            _ => continue,
        };
        if !send(&tx, &waker, sid, out) {
            return fin;
        }
        if fin {
            // Nothing follows a last record; drain and ignore.
            let mut sink = Vec::new();
            let _ = r.read_to_end(&mut sink);
            return true;
        }
    }
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

/// One `TAG SP LEN \n BYTES` record; `None` at a clean end.
fn read_helper_record<R: std::io::BufRead>(r: &mut R) -> Result<Option<(u8, Vec<u8>)>, String> {
    use std::io::BufRead;
    let mut line = Vec::new();
    let n = r
        .by_ref()
        .take(32)
        .read_until(b'\n', &mut line)
        .map_err(|e| e.to_string())?;
    if n == 0 {
        return Ok(None);
    }
    if line.len() < 4 || line[1] != b' ' || line.last() != Some(&b'\n') {
        return Err("bad record header".into());
    }
    let len: usize = std::str::from_utf8(&line[2..line.len() - 1])
        .ok()
        .and_then(|t| t.parse().ok())
        .filter(|&l| l <= 16 << 20)
        .ok_or("bad record length")?;
    let mut data = vec![0u8; len];
    r.read_exact(&mut data).map_err(|e| e.to_string())?;
    Ok(Some((line[0], data)))
}

/// The helper's stderr repeats refusals for people: into the log.
fn log_helper_stderr(mut err: std::process::ChildStderr) -> bool {
    let mut s = String::new();
    let _ = err.by_ref().take(64 * 1024).read_to_string(&mut s);
    for line in s.lines().filter(|l| !l.trim().is_empty()) {
        warn!(line = %line, "exec: helper");
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helper_records_parse() {
        let mut b: &[u8] = b"1 3\nabc2 0\nR 2\n{}";
        let mut r = std::io::BufReader::new(&mut b);
        assert_eq!(
            read_helper_record(&mut r).unwrap(),
            Some((b'1', b"abc".to_vec()))
        );
        assert_eq!(read_helper_record(&mut r).unwrap(), Some((b'2', vec![])));
        assert_eq!(
            read_helper_record(&mut r).unwrap(),
            Some((b'R', b"{}".to_vec()))
        );
        assert_eq!(read_helper_record(&mut r).unwrap(), None);
        let mut bad: &[u8] = b"1x3\nabc";
        assert!(read_helper_record(&mut std::io::BufReader::new(&mut bad)).is_err());
        let mut short: &[u8] = b"1 9\nabc";
        assert!(read_helper_record(&mut std::io::BufReader::new(&mut short)).is_err());
    }
}
