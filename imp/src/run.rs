//! The privileged steps of `canopy-imp run`, after [`crate::verify::check`]
//! approved a request.
//!
//! The crate forbids `unsafe`, so there is no `fork` here. Instead:
//!
//! * **The monitor** (the process the broker started, real uid = the
//!   broker's user, effective uid root) spawns the second stage with
//!   `std::process::Command`, which sets the child's real, effective and
//!   saved uid and gid to 0 before exec (`uid(0)`, `gid(0)`), with an
//!   empty environment except [`STAGE2_ENV`], stdin inherited and stdout
//!   and stderr piped. The monitor keeps its credentials, so the broker can
//!   still signal it, and stays root (never the target user, who could
//!   otherwise ptrace it and read the receipt key). It forwards SIGINT,
//!   SIGTERM, SIGHUP and SIGQUIT to the command's process group (and
//!   SIGUSR1 as SIGKILL, which cannot be caught), passes
//!   stdout and stderr through as records while hashing them, waits, kills
//!   whatever is left in the group, and signs the receipt.
//! * **The second stage** (`canopy-imp _exec`, [`stage2_main`]) runs only
//!   when its real uid is 0: the broker's user, invoking the setuid binary
//!   itself, has a real uid of its own and is refused, so only the monitor
//!   (or root) can start it. It makes a new session, sets the groups, gid
//!   and uid (each return checked), confirms that the ids are what was
//!   asked and that `setresuid(0, 0, 0)` now fails, asks for SIGKILL when
//!   the monitor dies, changes directory as the user, marks every
//!   descriptor above 2 close-on-exec, and execs the command with the
//!   environment the monitor built.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use nix::sys::signal::{kill, Signal};
use nix::unistd::{Gid, Group, Pid, Uid, User};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use signal_hook::iterator::Signals;

use crate::envelope::hex;
use crate::frame::{write_record, TAG_STDERR, TAG_STDOUT};
use crate::receipt::Exit;
use crate::verify::{Account, Accounts, Approved};

/// The environment variable that carries [`Stage2`] to the second stage.
pub const STAGE2_ENV: &str = "CANOPY_IMP_STAGE2";
/// The environment variable that names another imp.toml; honoured only
/// when the helper is not running setuid (see [`config_path`]).
pub const CONFIG_ENV: &str = "CANOPY_IMP_CONFIG";
/// Variables kept from the helper's own environment (locale, time zone).
pub const KEPT_ENV: &[&str] = &["LANG", "LANGUAGE", "TZ", "TERM"];
/// Exit status of the helper when it refused or failed before the
/// command ran (the `X` record says why).
pub const EXIT_REFUSED: u8 = 125;

/// The account database of this node.
pub struct SystemAccounts;

impl Accounts for SystemAccounts {
    fn user(&self, name: &str) -> Option<Account> {
        let u = User::from_name(name).ok()??;
        let cname = CString::new(name).ok()?;
        let mut groups: Vec<u32> = nix::unistd::getgrouplist(&cname, u.gid)
            .ok()?
            .into_iter()
            .map(Gid::as_raw)
            .collect();
        if !groups.contains(&u.gid.as_raw()) {
            groups.push(u.gid.as_raw());
        }
        groups.sort_unstable();
        groups.dedup();
        Some(Account {
            name: u.name,
            uid: u.uid.as_raw(),
            gid: u.gid.as_raw(),
            groups,
            home: u.dir,
            shell: u.shell,
        })
    }

    fn group_gid(&self, name: &str) -> Option<u32> {
        Some(Group::from_name(name).ok()??.gid.as_raw())
    }
}

/// Whether `p` is a regular file someone may execute (for the lookup of
/// bare command names; the exec itself runs as the user).
pub fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// True when the process runs with other credentials than its invoker's
/// (setuid or setgid): then nothing from the environment is trusted.
pub fn privileged_invocation() -> bool {
    let (Ok(u), Ok(g)) = (nix::unistd::getresuid(), nix::unistd::getresgid()) else {
        return true;
    };
    u.real != u.effective || u.real != u.saved || g.real != g.effective || g.real != g.saved
}

/// The imp.toml to read: [`crate::config::DEFAULT_CONFIG`], or
/// `$CANOPY_IMP_CONFIG` when the helper is not running setuid or setgid.
/// A setuid helper never lets its invoker choose its policy; without
/// setuid the helper has no more rights than whoever started it, so a
/// root-run test or an administrator checking a new file may point it
/// elsewhere (the file must still be root-owned and trusted).
pub fn config_path(env: Option<std::ffi::OsString>, privileged: bool) -> PathBuf {
    match env {
        Some(p) if !privileged && !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(crate::config::DEFAULT_CONFIG),
    }
}

/// What the second stage does, as the monitor decided it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage2 {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub cwd: String,
    pub program: PathBuf,
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// The monitor's pid: the second stage exits if its parent is not it
    /// by the time SIGKILL-on-parent-death is armed.
    pub monitor: i32,
}

/// The command's environment: the kept variables of the helper's own
/// environment, the account's `HOME`, `USER`, `LOGNAME`, `SHELL`, `PATH`
/// from imp.toml's search path, `CANOPY_EXEC_INSTANCE` and
/// `CANOPY_EXEC_RANK`, then the request's `env` over all of these.
pub fn command_env(
    approved: &Approved,
    search_path: &[PathBuf],
    rank: u32,
    inherited: impl Iterator<Item = (String, String)>,
) -> BTreeMap<String, String> {
    let mut env: BTreeMap<String, String> = inherited
        .filter(|(k, _)| KEPT_ENV.contains(&k.as_str()) || k.starts_with("LC_"))
        .filter(|(k, v)| !k.contains(['=', '\0']) && !v.contains('\0'))
        .collect();
    let a = &approved.account;
    env.insert("HOME".into(), a.home.to_string_lossy().into_owned());
    env.insert("USER".into(), a.name.clone());
    env.insert("LOGNAME".into(), a.name.clone());
    env.insert("SHELL".into(), a.shell.to_string_lossy().into_owned());
    let path: Vec<_> = search_path.iter().map(|p| p.to_string_lossy()).collect();
    env.insert("PATH".into(), path.join(":"));
    env.insert(
        "CANOPY_EXEC_INSTANCE".into(),
        approved.request.instance.clone(),
    );
    env.insert("CANOPY_EXEC_RANK".into(), rank.to_string());
    for (k, v) in &approved.request.env {
        env.insert(k.clone(), v.clone());
    }
    env
}

/// The second stage's orders for an approved request.
pub fn stage2_for(approved: &Approved, env: BTreeMap<String, String>) -> Stage2 {
    Stage2 {
        uid: approved.account.uid,
        gid: approved.account.gid,
        groups: approved.account.groups.clone(),
        cwd: approved.request.cwd.clone(),
        program: approved.program.clone(),
        argv: approved.request.argv.clone(),
        env,
        monitor: std::process::id() as i32,
    }
}

/// Start the second stage (`/proc/self/exe _exec`) with real, effective and
/// saved ids 0, an environment of [`STAGE2_ENV`] only, stdin inherited and
/// stdout and stderr piped.
pub fn spawn_stage2(orders: &Stage2) -> std::io::Result<Child> {
    let json = serde_json::to_string(orders).expect("stage 2 orders always serialize");
    Command::new("/proc/self/exe")
        .arg("_exec")
        .env_clear()
        .env(STAGE2_ENV, json)
        .uid(0)
        .gid(0)
        .stdin(Stdio::inherit())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
}

/// What the monitor saw of the command.
pub struct Outcome {
    pub exit: Exit,
    pub stdout_sha256: String,
    pub stderr_sha256: String,
}

fn pump(mut from: impl Read, tag: u8, out: Arc<Mutex<dyn Write + Send>>) -> String {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut broken = false;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        h.update(&buf[..n]);
        if !broken {
            // The broker went away: keep draining (and hashing) so the
            // command is not blocked on a full pipe.
            let mut w = out.lock().unwrap_or_else(|p| p.into_inner());
            broken = write_record(&mut *w, tag, &buf[..n]).is_err();
        }
    }
    hex(&h.finalize())
}

/// Send `sig` to the command's process group (it made a new session), or
/// to the command alone if the group is not there yet.
pub fn signal_command(pid: u32, sig: Signal) {
    let pid = pid as i32;
    if kill(Pid::from_raw(-pid), sig).is_err() {
        let _ = kill(Pid::from_raw(pid), sig);
    }
}

/// Catch the signals the monitor forwards (before the command starts, so
/// none is lost in between; they are queued until [`supervise`] runs).
pub fn forwarded_signals() -> std::io::Result<Signals> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1};
    Signals::new([SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1])
}

/// Pass the command's output through as records while hashing it, forward
/// the broker's signals (SIGUSR1 as SIGKILL), wait for the command, then SIGKILL whatever is
/// left in its process group.
pub fn supervise(
    mut child: Child,
    mut signals: Signals,
    out: Arc<Mutex<dyn Write + Send>>,
) -> std::io::Result<Outcome> {
    let pid = child.id();
    let handle = signals.handle();
    let forwarder = std::thread::spawn(move || {
        for s in signals.forever() {
            // SIGKILL cannot be caught: SIGUSR1 asks for it.
            let s = if s == signal_hook::consts::SIGUSR1 {
                Signal::SIGKILL as i32
            } else {
                s
            };
            if let Ok(sig) = Signal::try_from(s) {
                signal_command(pid, sig);
            }
        }
    });
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    let o = out.clone();
    let t_out = std::thread::spawn(move || pump(stdout, TAG_STDOUT, o));
    let e = out.clone();
    let t_err = std::thread::spawn(move || pump(stderr, TAG_STDERR, e));
    let status = child.wait();
    // Whatever the command left behind in its group goes with it.
    let _ = kill(Pid::from_raw(-(pid as i32)), Signal::SIGKILL);
    let stdout_sha256 = t_out.join().unwrap_or_default();
    let stderr_sha256 = t_err.join().unwrap_or_default();
    handle.close();
    let _ = forwarder.join();
    let status = status?;
    let exit = match (status.code(), status.signal()) {
        (Some(c), _) => Exit::Status(c),
        (None, Some(s)) => Exit::Signal(s),
        (None, None) => Exit::Status(-1),
    };
    Ok(Outcome {
        exit,
        stdout_sha256,
        stderr_sha256,
    })
}

/// Why the second stage stopped before the command ran.
#[derive(Debug, thiserror::Error)]
pub enum Stage2Error {
    #[error("the _exec stage runs only when started by `canopy-imp run` (real uid {0} is not 0); run `canopy-imp run`")]
    NotFromMonitor(u32),
    #[error("the _exec stage got no valid orders in {STAGE2_ENV}: {0}")]
    Orders(String),
    #[error("{step} failed: {source}; nothing ran")]
    Step {
        step: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("after dropping privileges {what}; nothing ran")]
    Check { what: String },
    #[error("the helper's monitor went away before the command started; nothing ran")]
    Orphaned,
    #[error("cannot change directory to {cwd} as uid {uid}: {source}; choose a directory the user can enter")]
    Chdir {
        cwd: String,
        uid: u32,
        #[source]
        source: nix::Error,
    },
}

fn step<T>(step: &'static str, r: nix::Result<T>) -> Result<T, Stage2Error> {
    r.map_err(|source| Stage2Error::Step { step, source })
}

/// Drop to the orders' user and check that it stuck. Public for the
/// integration test's description; called only by [`stage2_main`].
pub fn drop_privileges(o: &Stage2) -> Result<(), Stage2Error> {
    use nix::unistd::{getgroups, getresgid, getresuid, setgroups, setresgid, setresuid};
    if o.uid == 0 || o.gid == 0 || o.groups.contains(&0) {
        return Err(Stage2Error::Check {
            what: "the orders name root".into(),
        });
    }
    let groups: Vec<Gid> = o.groups.iter().map(|g| Gid::from_raw(*g)).collect();
    let (uid, gid) = (Uid::from_raw(o.uid), Gid::from_raw(o.gid));
    step("setgroups", setgroups(&groups))?;
    step("setresgid", setresgid(gid, gid, gid))?;
    step("setresuid", setresuid(uid, uid, uid))?;

    let u = step("getresuid", getresuid())?;
    let g = step("getresgid", getresgid())?;
    if (u.real, u.effective, u.saved) != (uid, uid, uid)
        || (g.real, g.effective, g.saved) != (gid, gid, gid)
    {
        return Err(Stage2Error::Check {
            what: format!("the ids are {u:?} {g:?}, not uid {} gid {}", o.uid, o.gid),
        });
    }
    let mut have: Vec<u32> = step("getgroups", getgroups())?
        .into_iter()
        .map(Gid::as_raw)
        .collect();
    have.sort_unstable();
    have.dedup();
    let mut want = o.groups.clone();
    want.sort_unstable();
    want.dedup();
    if have != want {
        return Err(Stage2Error::Check {
            what: format!("the groups are {have:?}, not {want:?}"),
        });
    }
    let root = Uid::from_raw(0);
    if setresuid(root, root, root).is_ok() || nix::unistd::seteuid(root).is_ok() {
        return Err(Stage2Error::Check {
            what: "root could be regained".into(),
        });
    }
    let groot = Gid::from_raw(0);
    if setresgid(groot, groot, groot).is_ok() {
        return Err(Stage2Error::Check {
            what: "group root could be regained".into(),
        });
    }
    Ok(())
}

/// Mark every descriptor above 2 close-on-exec.
fn close_stray_fds() -> Result<(), Stage2Error> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map_err(|e| Stage2Error::Check {
            what: format!(
                "/proc/self/fd cannot be read ({e}), so stray descriptors cannot be closed"
            ),
        })?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > 2)
        .collect();
    for fd in fds {
        // The directory's own descriptor is gone by now: EBADF is fine.
        match fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)) {
            Ok(_) | Err(nix::Error::EBADF) => {}
            Err(source) => {
                return Err(Stage2Error::Step {
                    step: "fcntl(FD_CLOEXEC)",
                    source,
                })
            }
        }
    }
    Ok(())
}

/// The second stage: see the module documentation. Returns only on
/// failure (the caller prints the error and exits 126 or 127, as a shell
/// does).
pub fn stage2_main() -> Stage2Error {
    match stage2() {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

enum Never {}

fn stage2() -> Result<Never, Stage2Error> {
    let ids = step("getresuid", nix::unistd::getresuid())?;
    if ids.real.as_raw() != 0 || ids.effective.as_raw() != 0 {
        return Err(Stage2Error::NotFromMonitor(ids.real.as_raw()));
    }
    let orders: Stage2 = std::env::var(STAGE2_ENV)
        .map_err(|e| Stage2Error::Orders(e.to_string()))
        .and_then(|j| serde_json::from_str(&j).map_err(|e| Stage2Error::Orders(e.to_string())))?;
    step("setsid", nix::unistd::setsid())?;
    drop_privileges(&orders)?;
    step(
        "prctl(PR_SET_PDEATHSIG)",
        nix::sys::prctl::set_pdeathsig(Signal::SIGKILL),
    )?;
    if nix::unistd::getppid().as_raw() != orders.monitor {
        return Err(Stage2Error::Orphaned);
    }
    nix::unistd::chdir(orders.cwd.as_str()).map_err(|source| Stage2Error::Chdir {
        cwd: orders.cwd.clone(),
        uid: orders.uid,
        source,
    })?;
    close_stray_fds()?;
    let mut cmd = Command::new(&orders.program);
    cmd.arg0(&orders.argv[0])
        .args(&orders.argv[1..])
        .env_clear()
        .envs(&orders.env);
    let err = cmd.exec();
    Err(Stage2Error::Check {
        what: format!("exec of {} failed: {err}", orders.program.display()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_path_is_never_chosen_by_a_setuid_invoker() {
        let other = Some(std::ffi::OsString::from("/tmp/evil.toml"));
        assert_eq!(
            config_path(other.clone(), true),
            PathBuf::from("/etc/canopy/imp.toml")
        );
        assert_eq!(config_path(other, false), PathBuf::from("/tmp/evil.toml"));
        assert_eq!(
            config_path(None, false),
            PathBuf::from("/etc/canopy/imp.toml")
        );
    }

    #[test]
    fn the_second_stage_refuses_a_caller_that_is_not_root() {
        if nix::unistd::getuid().is_root() {
            return; // Checked by the integration test as the broker user.
        }
        assert!(matches!(stage2_main(), Stage2Error::NotFromMonitor(_)));
    }

    #[test]
    fn the_command_environment_is_an_allowlist_plus_the_request() {
        let req = crate::request::tests::sample();
        let a = Approved {
            request: req,
            cert: crate::cert::UserCert::issue(
                crate::cert::CertKind::Ca,
                "alice@EXAMPLE.ORG",
                "alice",
                &ed25519_dalek::SigningKey::from_bytes(&[1; 32]).verifying_key(),
                0,
                1,
                &ed25519_dalek::SigningKey::from_bytes(&[2; 32]),
            )
            .0,
            account: Account {
                name: "alice".into(),
                uid: 1000,
                gid: 1000,
                groups: vec![1000],
                home: "/home/alice".into(),
                shell: "/bin/bash".into(),
            },
            program: "/usr/bin/id".into(),
            request_digest: String::new(),
        };
        let inherited = [
            ("LD_PRELOAD", "/tmp/evil.so"),
            ("LANG", "de_DE.UTF-8"),
            ("LC_TIME", "C"),
            ("PATH", "/tmp/broker"),
            ("CANOPY_IMP_CONFIG", "/tmp/x"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let env = command_env(
            &a,
            &[PathBuf::from("/usr/bin"), PathBuf::from("/bin")],
            2,
            inherited.into_iter(),
        );
        assert_eq!(env.get("LD_PRELOAD"), None);
        assert_eq!(env.get("CANOPY_IMP_CONFIG"), None);
        assert_eq!(env["LC_TIME"], "C");
        assert_eq!(env["PATH"], "/usr/bin:/bin");
        assert_eq!(env["HOME"], "/home/alice");
        assert_eq!(env["USER"], "alice");
        assert_eq!(env["CANOPY_EXEC_RANK"], "2");
        // The request's env wins (LANG=C in the sample).
        assert_eq!(env["LANG"], "C");
    }
}
