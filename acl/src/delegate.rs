//! Running delegate programs: request as JSON on stdin, verdict from the
//! exit status and stdout, killed (with its whole process group) on timeout.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use canopy_proto::Roles;
use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use serde::Deserialize;

use crate::decide::{DelegateReply, DelegateRequest, Delegator};
use crate::policy::DelegateSpec;

/// Most stdout read from a delegate; more is bad output.
pub const MAX_DELEGATE_OUTPUT: u64 = 64 << 10;
const MAX_STDERR: u64 = 4 << 10;
/// `PATH` given to delegates (their environment is otherwise empty).
pub const DELEGATE_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Runs delegate programs as child processes.
///
/// The program gets the request as one JSON line on stdin, an empty
/// environment except `PATH`, `/` as working directory, and its own process
/// group. Its verdict:
///
/// * exit status 0 and empty stdout: allow, with the rule's roles;
/// * exit status 0 and a JSON object on stdout,
///   `{"allow": true|false, "roles": ["user"], "reason": "..."}` (`roles`
///   and `reason` optional, no other fields): that answer;
/// * anything else (non-zero status, death by signal, other output, more
///   than [`MAX_DELEGATE_OUTPUT`] bytes, failure to start, or no exit
///   within the rule's `timeout_ms`): a failure, which grants nothing.
///
/// On timeout the whole process group is killed with SIGKILL and reaped;
/// the group is also killed after a normal exit, so no helper it started
/// outlives it.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcessDelegator;

impl Delegator for ProcessDelegator {
    fn ask(&self, spec: &DelegateSpec, req: &DelegateRequest<'_>) -> Result<DelegateReply, String> {
        run_delegate(spec, req)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireReply {
    allow: bool,
    #[serde(default)]
    roles: Option<Vec<String>>,
    #[serde(default)]
    reason: Option<String>,
}

/// Interpret the stdout of a delegate that exited with status 0.
pub fn parse_reply(stdout: &[u8]) -> Result<DelegateReply, String> {
    if stdout.iter().all(u8::is_ascii_whitespace) {
        return Ok(DelegateReply {
            allow: true,
            roles: None,
            reason: None,
        });
    }
    let bad = |e: &dyn std::fmt::Display| {
        format!("bad output ({e}); a delegate prints nothing or one json object like {{\"allow\":true,\"roles\":[\"user\"]}}")
    };
    let value: serde_json::Value = serde_json::from_slice(stdout).map_err(|e| bad(&e))?;
    if !value.is_object() {
        return Err(bad(&"not a json object"));
    }
    let wire = WireReply::deserialize(value).map_err(|e| bad(&e))?;
    let roles = match wire.roles {
        None => None,
        Some(list) => Some(list.iter().try_fold(Roles::NONE, |acc, r| {
            Roles::parse_one(r)
                .map(|one| acc.union(one))
                .map_err(|e| format!("bad output: {e}"))
        })?),
    };
    Ok(DelegateReply {
        allow: wire.allow,
        roles,
        reason: wire.reason,
    })
}

fn read_capped(
    mut r: impl Read + Send + 'static,
    cap: u64,
) -> mpsc::Receiver<std::io::Result<Vec<u8>>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = Vec::new();
        let res = (&mut r).take(cap + 1).read_to_end(&mut buf).map(|_| buf);
        let _ = tx.send(res);
    });
    rx
}

fn first_line(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    match text.lines().find(|l| !l.trim().is_empty()) {
        Some(l) => format!(" (stderr: {})", crate::decide::quote(l.trim())),
        None => String::new(),
    }
}

/// Run one delegate program for one request. See [`ProcessDelegator`].
pub fn run_delegate(
    spec: &DelegateSpec,
    req: &DelegateRequest<'_>,
) -> Result<DelegateReply, String> {
    let program = spec.program.display().to_string();
    let input = req.to_json() + "\n";
    let mut child = Command::new(&spec.program)
        .args(&spec.args)
        .env_clear()
        .env("PATH", DELEGATE_PATH)
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| {
            format!("cannot start {program}: {e}; check the path and that it is executable")
        })?;
    let start = Instant::now();
    let deadline = start + spec.timeout;
    let pid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
    let kill_group = || {
        let _ = killpg(pid, Signal::SIGKILL);
    };

    if let Some(mut stdin) = child.stdin.take() {
        // A program that exits without reading its input is fine.
        thread::spawn(move || {
            let _ = stdin.write_all(input.as_bytes());
        });
    }
    let out_rx = child
        .stdout
        .take()
        .map(|s| read_capped(s, MAX_DELEGATE_OUTPUT));
    let err_rx = child.stderr.take().map(|s| read_capped(s, MAX_STDERR));

    // Wait for the exit without reaping (WNOWAIT), so that the group id
    // cannot be reused before we kill what is left of the group.
    let mut nap = Duration::from_micros(100);
    let exited = loop {
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
        match waitid(Id::Pid(pid), flags) {
            Ok(WaitStatus::StillAlive) => {}
            Ok(_) => break true,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                kill_group();
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("cannot wait for {program}: {e}"));
            }
        }
        let now = Instant::now();
        if now >= deadline {
            break false;
        }
        thread::sleep(nap.min(deadline - now));
        nap = (nap * 2).min(Duration::from_millis(5));
    };
    kill_group();
    let status = child.wait();
    if !exited {
        return Err(format!(
            "{program} did not answer within {} ms; killed it",
            spec.timeout.as_millis()
        ));
    }
    let status = status.map_err(|e| format!("cannot reap {program}: {e}"))?;

    // Everything in the group is dead, so the pipes close promptly unless a
    // process left the group. Output, exit and stderr share the one
    // timeout: nothing waits past the deadline.
    let left = || deadline.saturating_duration_since(Instant::now());
    let stderr = err_rx
        .and_then(|rx| rx.recv_timeout(left()).ok())
        .and_then(Result::ok)
        .unwrap_or_default();
    let stdout = out_rx.map(|rx| rx.recv_timeout(left()));
    if Instant::now() > deadline {
        return Err(format!(
            "{program} answered after its timeout of {} ms; a late answer is a deny",
            spec.timeout.as_millis()
        ));
    }
    if let Some(Ok(Ok(bytes))) = &stdout {
        if bytes.len() as u64 > MAX_DELEGATE_OUTPUT {
            return Err(format!(
                "{program} wrote more than {MAX_DELEGATE_OUTPUT} bytes; a delegate prints at most one small json object"
            ));
        }
    }
    if !status.success() {
        return Err(format!(
            "{program} exited with {status}{}",
            first_line(&stderr)
        ));
    }
    let stdout = match stdout {
        Some(Ok(Ok(bytes))) => bytes,
        Some(Ok(Err(e))) => return Err(format!("cannot read the output of {program}: {e}")),
        Some(Err(_)) => {
            return Err(format!(
                "{program} exited but its output was not closed; do not leave background processes holding stdout"
            ))
        }
        None => Vec::new(),
    };
    parse_reply(&stdout).map_err(|e| format!("{program}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_parsing() {
        let yes = parse_reply(b"").unwrap();
        assert!(yes.allow && yes.roles.is_none());
        assert!(parse_reply(b" \n").unwrap().allow);
        let r = parse_reply(br#"{"allow":true,"roles":["user","Operator"]}"#).unwrap();
        assert_eq!(r.roles, Some(Roles::USER.union(Roles::OPERATOR)));
        let r = parse_reply(br#"{"allow":false,"reason":"locked"}"#).unwrap();
        assert!(!r.allow);
        assert_eq!(r.reason.as_deref(), Some("locked"));
        assert!(parse_reply(b"yes").is_err());
        assert!(parse_reply(br#"{"allow":"true"}"#).is_err());
        assert!(parse_reply(br#"{"allow":true,"extra":1}"#).is_err());
        assert!(parse_reply(br#"{"allow":true,"roles":["wizard"]}"#).is_err());
        assert!(parse_reply(br#"{"allow":true} {"allow":true}"#).is_err());
        assert!(parse_reply(br#"[true]"#).is_err());
    }
}
