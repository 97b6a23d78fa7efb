//! Helpers for the hostile-input and attack tests (`t/tests/hostile.rs`,
//! `t/tests/attacks.rs`) and the hostile benchmark: a broker's resident
//! memory sampled while an attack runs, the owner's ping latency measured
//! alongside, raw sockets that speak just enough (or not enough) of the
//! protocols, and peers run as another uid.

use crate::users::OTHER_USER;
use crate::{wait_until, Instance};
use canopy_client::{Client, TcpKeys};
use std::io::{BufRead, BufReader, ErrorKind, Read};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Resident set size of `pid`, in KiB (0 if it is gone).
pub fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Samples a process's RSS every 10 ms on a thread; [`RssWatch::stop`]
/// returns the largest seen.
pub struct RssWatch {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl RssWatch {
    pub fn start(pid: i32) -> RssWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(rss_kib(pid)));
        let (s, p) = (stop.clone(), peak.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(rss_kib(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        RssWatch {
            stop,
            peak,
            thread: Some(thread),
        }
    }

    /// The peak so far, in KiB.
    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }

    /// Stop sampling; the peak in KiB.
    pub fn stop(mut self) -> u64 {
        self.halt();
        self.peak()
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for RssWatch {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Latency figures of a run of pings.
#[derive(Clone, Debug, Default)]
pub struct Latency {
    pub count: usize,
    pub failed: usize,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

impl Latency {
    pub fn of(mut lat: Vec<Duration>, failed: usize) -> Latency {
        lat.sort();
        let at = |q: f64| {
            lat.get(((lat.len() as f64 * q) as usize).min(lat.len().saturating_sub(1)))
                .copied()
                .unwrap_or_default()
        };
        Latency {
            count: lat.len(),
            failed,
            p50: at(0.50),
            p99: at(0.99),
            max: lat.last().copied().unwrap_or_default(),
        }
    }
}

/// The owner pinging its broker on a thread of its own while an attack
/// runs: `count` pings `every` apart, each with `timeout`.
pub struct Pinger {
    thread: Option<JoinHandle<Latency>>,
}

impl Pinger {
    /// Ping `rank` through a fresh client of `uri` (the owner's).
    pub fn start(uri: &str, rank: u32, count: usize, every: Duration) -> Pinger {
        let mut c = Client::connect(Some(uri)).expect("the owner connects");
        Pinger::start_with(
            move |payload| {
                c.rpc("broker.ping", rank, payload, Duration::from_secs(5))
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            },
            count,
            every,
        )
    }

    /// Ping with `ping` (one round trip, an error if it failed).
    pub fn start_with<F>(mut ping: F, count: usize, every: Duration) -> Pinger
    where
        F: FnMut(&[u8]) -> Result<(), String> + Send + 'static,
    {
        let thread = std::thread::spawn(move || {
            let mut lat = Vec::with_capacity(count);
            let mut failed = 0;
            for _ in 0..count {
                let t = Instant::now();
                match ping(b"") {
                    Ok(()) => lat.push(t.elapsed()),
                    Err(e) => {
                        failed += 1;
                        eprintln!("owner ping failed: {e}");
                    }
                }
                std::thread::sleep(every.saturating_sub(t.elapsed()));
            }
            Latency::of(lat, failed)
        });
        Pinger {
            thread: Some(thread),
        }
    }

    /// Wait for the pings to finish.
    pub fn finish(mut self) -> Latency {
        self.thread
            .take()
            .expect("finished once")
            .join()
            .expect("the pinger panicked")
    }
}

/// Read until the peer closes (true) or `timeout` passes (false).
pub fn closed_within(s: &mut UnixStream, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 65536];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        s.set_read_timeout(Some(left)).expect("set a read timeout");
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return true, // reset
        }
    }
}

/// The same for a TCP stream.
pub fn tcp_closed_within(s: &mut std::net::TcpStream, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 65536];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        s.set_read_timeout(Some(left)).expect("set a read timeout");
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return true,
        }
    }
}

/// A ZeroMQ DEALER with a socket monitor, for handshakes a test sets up
/// by hand (wrong keys, other mechanisms).
pub struct ZPeer {
    pub sock: zmq::Socket,
    mon: zmq::Socket,
    _ctx: zmq::Context,
}

static MONITORS: AtomicU32 = AtomicU32::new(0);

/// The monitor stops before its receiver goes (see
/// `canopy_sys::stop_monitor`): else the context's end could block.
impl Drop for ZPeer {
    fn drop(&mut self) {
        let _ = canopy_sys::stop_monitor(&mut self.sock);
    }
}

impl ZPeer {
    /// A DEALER configured by `setup` (which also connects it).
    pub fn new(setup: impl FnOnce(&zmq::Socket)) -> ZPeer {
        let ctx = zmq::Context::new();
        let sock = ctx.socket(zmq::DEALER).expect("a DEALER");
        sock.set_linger(0).expect("set linger");
        let ep = format!(
            "inproc://hostile-monitor-{}",
            MONITORS.fetch_add(1, Ordering::Relaxed)
        );
        sock.monitor(&ep, zmq::SocketEvent::ALL as i32)
            .expect("monitor");
        let mon = ctx.socket(zmq::PAIR).expect("a PAIR");
        mon.set_linger(0).expect("set linger");
        mon.connect(&ep).expect("connect the monitor");
        setup(&sock);
        ZPeer {
            sock,
            mon,
            _ctx: ctx,
        }
    }

    /// Send one message of `frames` without blocking (a DEALER queues it
    /// while it connects). False if it could not be queued.
    pub fn send(&self, frames: &[&[u8]]) -> bool {
        let n = frames.len();
        frames.iter().enumerate().all(|(i, f)| {
            let more = if i + 1 < n { zmq::SNDMORE } else { 0 };
            self.sock.send(*f, more | zmq::DONTWAIT).is_ok()
        })
    }

    /// Monitor events seen within `timeout`, stopping early at any of `until`.
    pub fn events(&self, timeout: Duration, until: &[zmq::SocketEvent]) -> Vec<zmq::SocketEvent> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero()
                || self
                    .mon
                    .poll(zmq::POLLIN, left.as_millis().max(1) as i64)
                    .unwrap_or(0)
                    == 0
            {
                return seen;
            }
            let Ok(parts) = self.mon.recv_multipart(0) else {
                return seen;
            };
            let ev = zmq::SocketEvent::from_raw(u16::from_le_bytes([parts[0][0], parts[0][1]]));
            seen.push(ev);
            if until.contains(&ev) {
                return seen;
            }
        }
    }

    /// Whether anything arrives within `timeout`.
    pub fn receives_within(&self, timeout: Duration) -> bool {
        self.sock
            .poll(zmq::POLLIN, timeout.as_millis() as i64)
            .unwrap_or(0)
            > 0
    }
}

/// Write a policy file (0644).
pub fn write_policy(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write a policy");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).expect("chmod a policy");
}

/// One `[[rule]]` of a policy.
pub fn rule(name: &str, principal: &str, roles: &str) -> String {
    format!("[[rule]]\nname = \"{name}\"\nprincipal = \"{principal}\"\nroles = [{roles}]\n\n")
}

/// A fresh CURVE key pair written to `dir/NAME` (secret) and
/// `dir/NAME.pub`; returns the secret's path and the key's principal.
pub fn remote_key(dir: &Path, name: &str) -> (PathBuf, String) {
    let kp = canopy_security::CurveKeypair::generate().expect("keygen");
    let key = dir.join(name);
    canopy_security::cert::write_pair(&kp, name, &key, &dir.join(format!("{name}.pub")))
        .expect("write a key pair");
    (key, canopy_security::curve_principal(kp.public()))
}

/// Rank 0's remote client endpoint and its server public key (Z85).
pub fn client_endpoint(inst: &Instance) -> (String, String) {
    let s = inst.status(0);
    let ep = s["broker"]["client_endpoint"]
        .as_str()
        .unwrap_or_else(|| panic!("no client_endpoint in {s}"))
        .to_string();
    let server = s["broker"]["public_key"]
        .as_str()
        .unwrap_or_else(|| panic!("no public_key in {s}"))
        .to_string();
    (ep, server)
}

/// A remote CURVE client of rank 0 with the key at `key`.
pub fn remote_client(inst: &Instance, key: &Path) -> Client {
    let (ep, server) = client_endpoint(inst);
    Client::connect_tcp(&ep, &TcpKeys::load(key, &server).expect("load keys"))
        .expect("connect to the client endpoint")
}

/// A process run as another uid (`runuser -u OTHER_USER`), its stdout
/// collected line by line; killed and reaped when dropped.
pub struct UserProc {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl UserProc {
    /// `prog ARGS...` as OTHER_USER.
    pub fn spawn(prog: &Path, args: &[&str]) -> UserProc {
        // A process group of its own, killed as a whole: killing runuser
        // alone would leave the program running.
        let mut child = Command::new("runuser")
            .args(["-u", OTHER_USER, "--"])
            .arg(prog)
            .args(args)
            .env("RUST_LOG", "warn")
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("run runuser");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().expect("piped stdout");
        let l2 = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                l2.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
        UserProc { child, lines }
    }

    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn has(&self, needle: &str) -> bool {
        self.lines().iter().any(|l| l.contains(needle))
    }

    pub fn wait_for(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.has(needle))
    }

    /// Wait up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let mut st = None;
        wait_until(timeout, || {
            st = self.child.try_wait().ok().flatten();
            st.is_some()
        });
        st
    }
}

impl Drop for UserProc {
    fn drop(&mut self) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// SIGCONT for a stopped process when dropped, so a failing test never
/// leaves a broker stopped.
pub struct Continue(pub i32);

impl Drop for Continue {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0),
            nix::sys::signal::Signal::SIGCONT,
        );
    }
}
