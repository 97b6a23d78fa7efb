//! `canopy start`: a personal instance of N brokers on this machine.
//!
//! The launcher creates a private runtime directory, serves PMI-1 to its
//! brokers (they exchange business cards through it), waits until rank 0
//! reports the whole tree online, runs the user's command with
//! `CANOPY_URI` set, and tears everything down afterwards. Brokers run in
//! their own process group, so a Ctrl-C reaches the launcher and the
//! command, and the launcher stops the brokers in order.

use crate::bootstrap::check_libzmq;
use canopy_client::Client;
use canopy_modules::StatusReport;
use canopy_overlay::Topology;
use canopy_pmi::PmiServer;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::collections::HashMap;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("--size must be at least 1 (got {0})")]
    Size(u32),
    #[error("{0}")]
    Topology(#[from] canopy_overlay::topology::TopologyError),
    #[error("{0}")]
    Broker(#[from] crate::error::BrokerError),
    #[error("cannot create a runtime directory in {dir}: {source}; pass --rundir DIR naming a writable directory")]
    Rundir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start broker rank {rank} ({path}): {source}")]
    Spawn {
        rank: u32,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot run '{cmd}': {source}")]
    Command {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("pmi: {0}")]
    Pmi(String),
    #[error("broker rank {rank} (pid {pid}) {how} during start; the instance is shut down (see the broker's messages above)")]
    DiedDuringStart { rank: u32, pid: i32, how: String },
    #[error("the instance did not come up within {timeout:?}: {online} of {size} brokers online; raise --timeout or check the broker messages above")]
    Timeout {
        timeout: Duration,
        online: usize,
        size: u32,
    },
    #[error("runtime directory refused: {0}")]
    Untrusted(#[from] canopy_security::trust::TrustError),
    #[error("interrupted during start")]
    Interrupted,
    #[error("system error: {0}")]
    Sys(String),
}

/// Options for `canopy start`.
#[derive(Clone, Debug)]
pub struct StartOpts {
    pub size: u32,
    pub fanout: u32,
    /// Use TCP on 127.0.0.1 instead of ipc.
    pub tcp: bool,
    /// With `tcp`: rank r binds `port + r` (0 = any free port).
    pub port: u16,
    /// Parent directory for the runtime directory.
    pub rundir: Option<PathBuf>,
    /// The broker executable (default: this one).
    pub broker_path: Option<PathBuf>,
    pub timeout: Duration,
    /// Keep the instance running, degraded, when a broker other than rank
    /// 0 dies (default: end the instance).
    pub keep_going: bool,
    /// A policy to write into the runtime directory and hand every broker
    /// (from `--allow`).
    pub policy_text: Option<String>,
    /// Extra arguments for every `canopy broker` (e.g. timings).
    pub broker_args: Vec<String>,
    /// A policy may admit other local users (`--allow`, `--policy`): once
    /// every broker is up, open the runtime directory to them (traverse
    /// only) and the local connectors (the policy decides who gets in).
    pub open_to_others: bool,
    pub command: Vec<String>,
}

struct Rundir(PathBuf);

impl Drop for Rundir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn make_rundir(parent: Option<&Path>) -> Result<Rundir, StartError> {
    let parent = match parent {
        Some(p) => p.to_path_buf(),
        None => match std::env::var_os("XDG_RUNTIME_DIR") {
            Some(d) if !d.is_empty() && Path::new(&d).is_dir() => PathBuf::from(d),
            _ => std::env::temp_dir(),
        },
    };
    let mut rnd = [0u8; 6];
    getrandom::getrandom(&mut rnd).map_err(|e| StartError::Sys(e.to_string()))?;
    let name: String = rnd.iter().map(|b| format!("{b:02x}")).collect();
    let dir = parent.join(format!("canopy-{name}"));
    // The parent must be ours or root's and nobody else's to change (or
    // sticky, as /tmp): else its owner could move our directory aside and
    // plant a fake socket. The directory is checked once created.
    use canopy_security::trust;
    match trust::create_private_dir(&dir, trust::service_uid()) {
        Ok(_) => {}
        // The directory could not be made (or the parent is missing).
        Err(trust::TrustError::Io { path, source }) if path == dir || !parent.is_dir() => {
            return Err(StartError::Rundir {
                dir: parent.clone(),
                source,
            })
        }
        Err(e) => return Err(e.into()),
    }
    Ok(Rundir(dir))
}

/// Let other local users reach the brokers' local connectors: the runtime
/// directory becomes 0711 (they may traverse it, not list it or add to
/// it) and each `local-R` socket 0666; the policy decides who gets in.
/// Done once every broker is up, so each broker's own check of its
/// private directory has passed. A parent directory they cannot traverse
/// is reported, with the fix.
fn open_local_connectors(dir: &Path, size: u32) {
    use std::os::unix::fs::PermissionsExt;
    let chmod = |p: &Path, mode: u32| {
        if let Err(e) = std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)) {
            say(&format!("cannot open {} to other users: {e}", p.display()));
        }
    };
    chmod(dir, 0o711);
    for r in 0..size {
        chmod(&dir.join(format!("local-{r}")), 0o666);
    }
    if let Some(parent) = dir.parent() {
        let closed = std::fs::metadata(parent).is_ok_and(|m| m.permissions().mode() & 0o001 == 0);
        if closed {
            say(&format!(
                "other users cannot reach this instance's sockets: {} is closed to them (mode {:o}); start with --rundir /tmp (or another directory they can traverse)",
                parent.display(),
                std::fs::metadata(parent).map(|m| m.permissions().mode() & 0o7777).unwrap_or(0)
            ));
        }
    }
}

fn describe(status: WaitStatus) -> Option<(String, i32)> {
    match status {
        WaitStatus::Exited(_, code) => Some((format!("exited with status {code}"), code)),
        WaitStatus::Signaled(_, sig, core) => Some((
            format!(
                "was killed by signal {} ({}){}",
                sig as i32,
                sig.as_str(),
                if core { ", core dumped" } else { "" }
            ),
            128 + sig as i32,
        )),
        _ => None,
    }
}

/// Every child of the launcher: the brokers and the command. One reaper
/// sees them all, so no exit status is lost. Stopped on drop.
struct Children {
    brokers: HashMap<i32, u32>,
    command: Option<i32>,
    /// The command's exit: text and exit code.
    command_exit: Option<(String, i32)>,
}

impl Children {
    /// Reap whatever has exited. Returns the brokers that exited:
    /// (pid, rank, how, code). The command's exit goes to `command_exit`.
    fn reap(&mut self) -> Vec<(i32, u32, String)> {
        let mut out = Vec::new();
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(st) => {
                    let Some(pid) = st.pid().map(Pid::as_raw) else {
                        break;
                    };
                    let Some((how, code)) = describe(st) else {
                        continue;
                    };
                    if self.command == Some(pid) {
                        self.command = None;
                        self.command_exit = Some((how, code));
                    } else if let Some(rank) = self.brokers.remove(&pid) {
                        out.push((pid, rank, how));
                    }
                }
            }
        }
        out
    }

    fn alive(&self) -> impl Iterator<Item = i32> + '_ {
        self.brokers.keys().copied().chain(self.command)
    }

    /// SIGTERM everyone still running, wait up to `grace`, then SIGKILL.
    fn stop(&mut self, grace: Duration) {
        for pid in self.alive() {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let deadline = Instant::now() + grace;
        loop {
            self.reap();
            if self.alive().next().is_none() || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let left: Vec<i32> = self.alive().collect();
        for pid in left {
            tracing::warn!("pid {pid} did not stop within {grace:?}; killing it");
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            let _ = waitpid(Pid::from_raw(pid), None);
        }
        self.brokers.clear();
        self.command = None;
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        if self.alive().next().is_some() {
            self.stop(Duration::from_secs(1));
        }
    }
}

/// The broker-only binary, installed next to `canopy`.
pub const BROKER_BIN: &str = "canopy-broker";
/// Set for `canopy-broker` by `canopy` when it runs the one next to it:
/// the version that one must be.
pub const EXPECT_VERSION_ENV: &str = "CANOPY_EXPECT_VERSION";
/// This build's version, as `--version` shows it.
pub const VERSION: &str = env!("CANOPY_LONG_VERSION");

/// `canopy-broker` next to this executable, if it is there (and this is
/// not it).
pub fn sibling_broker() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    if exe.file_name().is_some_and(|n| n == BROKER_BIN) {
        return None;
    }
    let path = exe.with_file_name(BROKER_BIN);
    path.is_file().then_some(path)
}

/// One line to stderr in a single write, so that brokers' log lines on the
/// same stderr cannot split it.
pub fn say(msg: &str) {
    use std::io::Write;
    let _ = std::io::stderr().write_all(format!("canopy: {msg}\n").as_bytes());
}

fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

/// A pipe that becomes readable on SIGINT, SIGTERM, SIGHUP or SIGCHLD.
struct Signals {
    r: UnixStream,
    flags: Vec<(i32, std::sync::Arc<std::sync::atomic::AtomicBool>)>,
}

impl Signals {
    fn new() -> Result<Signals, StartError> {
        use signal_hook::consts::*;
        let (r, w) = UnixStream::pair().map_err(|e| StartError::Sys(e.to_string()))?;
        r.set_nonblocking(true).ok();
        w.set_nonblocking(true).ok();
        let mut flags = Vec::new();
        for sig in [SIGINT, SIGTERM, SIGHUP, SIGCHLD] {
            let w2 = w.try_clone().map_err(|e| StartError::Sys(e.to_string()))?;
            signal_hook::low_level::pipe::register(sig, w2)
                .map_err(|e| StartError::Sys(e.to_string()))?;
            if sig != SIGCHLD {
                let f = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                signal_hook::flag::register(sig, f.clone())
                    .map_err(|e| StartError::Sys(e.to_string()))?;
                flags.push((sig, f));
            }
        }
        Ok(Signals { r, flags })
    }

    /// Wait until a signal arrives or `timeout` passes.
    fn wait(&mut self, timeout: Duration) {
        let mut fds = [nix::poll::PollFd::new(
            self.r.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let ms = timeout.as_millis().min(u16::MAX as u128) as u16;
        let _ = nix::poll::poll(&mut fds, ms);
        let mut buf = [0u8; 64];
        while matches!(self.r.read(&mut buf), Ok(n) if n > 0) {}
    }

    /// The terminating signal received, if any.
    fn terminated(&self) -> Option<i32> {
        self.flags
            .iter()
            .find(|(_, f)| f.load(std::sync::atomic::Ordering::SeqCst))
            .map(|(s, _)| *s)
    }
}

/// Run an instance. Returns the exit code `canopy start` should exit with.
pub fn start(opts: StartOpts) -> Result<i32, StartError> {
    if opts.size == 0 {
        return Err(StartError::Size(0));
    }
    let topo = Topology::new(opts.size, opts.fanout)?;
    check_libzmq()?;
    raise_fd_limit();
    let mut signals = Signals::new()?;
    let rundir = make_rundir(opts.rundir.as_deref())?;
    let mut inst = [0u8; 8];
    getrandom::getrandom(&mut inst).map_err(|e| StartError::Sys(e.to_string()))?;
    let instance: String = inst.iter().map(|b| format!("{b:02x}")).collect();
    // `--broker-path`, else `canopy-broker` next to this binary (the same
    // build, checked), else this binary.
    let (broker_path, sibling) = match (&opts.broker_path, sibling_broker()) {
        (Some(p), _) => (p.clone(), false),
        (None, Some(p)) => (p, true),
        (None, None) => (
            std::env::current_exe().map_err(|e| StartError::Sys(e.to_string()))?,
            false,
        ),
    };

    let mut broker_args = opts.broker_args.clone();
    if let Some(text) = &opts.policy_text {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = rundir.0.join("policy.toml");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut f| f.write_all(text.as_bytes()).map(|()| f))
            .map_err(|e| StartError::Sys(format!("cannot write {}: {e}", path.display())))?;
        let _ = f.flush();
        broker_args.push("--policy".into());
        broker_args.push(path.display().to_string());
    }
    let (server, ends) = PmiServer::new(opts.size).map_err(|e| StartError::Pmi(e.to_string()))?;
    let pmi = server.spawn().map_err(|e| StartError::Pmi(e.to_string()))?;
    let mut brokers = Children {
        brokers: HashMap::new(),
        command: None,
        command_exit: None,
    };
    for (rank, end) in ends.into_iter().enumerate() {
        let rank = rank as u32;
        canopy_sys::clear_cloexec(end.as_fd()).map_err(|e| StartError::Sys(e.to_string()))?;
        let mut cmd = Command::new(&broker_path);
        cmd.arg("broker")
            .arg("--fanout")
            .arg(opts.fanout.to_string())
            .arg("--rundir")
            .arg(&rundir.0)
            .arg("--instance")
            .arg(&instance)
            .args(&broker_args)
            .env("PMI_FD", end.as_raw_fd().to_string())
            .env("PMI_RANK", rank.to_string())
            .env("PMI_SIZE", opts.size.to_string())
            .env_remove("CANOPY_URI")
            .stdin(Stdio::null())
            .process_group(0);
        if opts.tcp {
            cmd.arg("--tcp").arg("--port").arg(opts.port.to_string());
        }
        if sibling {
            cmd.env(EXPECT_VERSION_ENV, VERSION);
        }
        let child = cmd.spawn().map_err(|source| StartError::Spawn {
            rank,
            path: broker_path.clone(),
            source,
        })?;
        brokers.brokers.insert(child.id() as i32, rank);
        drop(end);
    }

    // Wait for the whole tree to come up.
    let local0 = rundir.0.join("local-0");
    let uri = format!("local://{}", local0.display());
    let deadline = Instant::now() + opts.timeout;
    let mut client: Option<Client> = None;
    let mut online = 0usize;
    loop {
        if let Some((pid, rank, how)) = brokers.reap().into_iter().next() {
            // Close PMI first: brokers blocked in a barrier then exit at once.
            pmi.stop();
            brokers.stop(Duration::from_secs(1));
            return Err(StartError::DiedDuringStart { rank, pid, how });
        }
        if signals.terminated().is_some() {
            pmi.stop();
            brokers.stop(Duration::from_secs(1));
            return Err(StartError::Interrupted);
        }
        if client.is_none() && local0.exists() {
            client = Client::connect(Some(&uri)).ok();
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
                        if r.online == topo.size() as usize {
                            break;
                        }
                    }
                }
                Err(_) => client = None,
            }
        }
        if Instant::now() > deadline {
            pmi.stop();
            brokers.stop(Duration::from_secs(1));
            return Err(StartError::Timeout {
                timeout: opts.timeout,
                online,
                size: opts.size,
            });
        }
        signals.wait(Duration::from_millis(if online > 0 { 2 } else { 1 }));
    }
    drop(client);
    if opts.open_to_others {
        open_local_connectors(&rundir.0, opts.size);
    }
    // gssapi: rank 0's key exchange, for remote clients.
    let kex: Vec<(&str, String)> = std::fs::read_to_string(rundir.0.join("kex-0"))
        .ok()
        .and_then(|s| {
            let (addr, who) = s.trim().split_once(' ')?;
            Some(vec![
                ("CANOPY_KEX", addr.to_string()),
                ("CANOPY_GSS_TARGET", who.to_string()),
            ])
        })
        .unwrap_or_default();

    // Run the command, or wait for a signal.
    if let Some((prog, args)) = opts.command.split_first() {
        match Command::new(prog)
            .args(args)
            .envs(kex.iter().map(|(k, v)| (*k, v.as_str())))
            .env("CANOPY_URI", &uri)
            .spawn()
        {
            Ok(child) => brokers.command = Some(child.id() as i32),
            Err(source) => {
                brokers.stop(Duration::from_secs(1));
                pmi.stop();
                return Err(StartError::Command {
                    cmd: prog.clone(),
                    source,
                });
            }
        }
    } else {
        // One write, errors ignored: a reader that closed its end of the
        // pipe early (a script that took the first line) must not take
        // the instance down (println! panics on EPIPE).
        let mut text = format!(
            "canopy: {} brokers up (instance {instance}); Ctrl-C to stop\nexport CANOPY_URI={uri}\n",
            opts.size
        );
        for (k, v) in &kex {
            text.push_str(&format!("export {k}={v}\n"));
        }
        let mut out = std::io::stdout().lock();
        let _ = std::io::Write::write_all(&mut out, text.as_bytes())
            .and_then(|()| std::io::Write::flush(&mut out));
    }

    let code = loop {
        let mut fatal = None;
        for (pid, rank, how) in brokers.reap() {
            if opts.keep_going && rank != 0 {
                say(&format!(
                    "broker rank {rank} (pid {pid}) {how}; continuing degraded (--keep-going)"
                ));
            } else {
                fatal.get_or_insert((pid, rank, how));
            }
        }
        if let Some((pid, rank, how)) = fatal {
            say(&format!(
                "broker rank {rank} (pid {pid}) {how}; shutting down the instance"
            ));
            break 1;
        }
        if let Some((_, c)) = &brokers.command_exit {
            break *c;
        }
        if let Some(sig) = signals.terminated() {
            break 128 + sig;
        }
        signals.wait(Duration::from_millis(200));
    };
    // Stops the brokers and, if the instance ended first, the command.
    brokers.stop(Duration::from_secs(1));
    pmi.stop();
    drop(rundir);
    Ok(code)
}
