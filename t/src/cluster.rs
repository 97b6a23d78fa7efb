//! A system instance on one machine: `canopy broker --config` processes on
//! 127.0.0.1, each with its own port, hostname (`n0`, `n1`, ...) and key,
//! started, killed, stopped and restarted one by one.
//!
//! Every broker is registered with [`crate::run_test`]'s watchdog (by pid,
//! checked against the cluster's directory in its command line), so a test
//! that overruns its limit still leaves nothing behind; dropping the
//! [`Cluster`] SIGKILLs and reaps them all and removes the directory.

use crate::{canopy_bin, track, track_pids, untrack, wait_until, Tracked, RPC_TIMEOUT};
use canopy_client::Client;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Fast liveness timings for tests (seconds): heartbeat, torpid, lost.
pub const FAST_TIMING: (f64, f64, f64) = (0.1, 0.5, 1.5);

/// `n` distinct free TCP ports on 127.0.0.1.
pub fn free_ports(n: usize) -> Vec<u16> {
    let ls: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    ls.iter()
        .map(|l| l.local_addr().expect("local addr").port())
        .collect()
}

/// A cluster description on disk (config, per-node secrets, public certs)
/// and the brokers running it.
pub struct Cluster {
    dir: tempfile::TempDir,
    size: u32,
    ports: Vec<u16>,
    nodes: Vec<Option<Child>>,
    watch: u64,
    /// A command every broker is started under (`PROGRAM ARGS... canopy
    /// broker ...`), e.g. a sandbox.
    wrapper: Vec<std::ffi::OsString>,
}

impl Cluster {
    /// `size` nodes in a fanout-2 tree with [`FAST_TIMING`]; none started.
    pub fn new(size: u32) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("canopy-cluster-")
            .tempdir()
            .expect("create a temp dir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod the temp dir");
        for d in ["sec", "pub"] {
            std::fs::create_dir(dir.path().join(d)).expect("mkdir");
        }
        std::fs::set_permissions(
            dir.path().join("sec"),
            std::fs::Permissions::from_mode(0o700),
        )
        .expect("chmod sec");
        let watch = track(Tracked {
            marker: dir.path().display().to_string(),
            dir: Some(dir.path().to_path_buf()),
            ..Tracked::default()
        });
        let c = Cluster {
            dir,
            size,
            ports: free_ports(size as usize),
            nodes: (0..size).map(|_| None).collect(),
            watch,
            wrapper: Vec::new(),
        };
        for r in 0..size {
            c.keygen(&format!("n{r}"));
        }
        c.write("canopy.toml", &c.config_text(&c.hosts_text(size)));
        c
    }

    /// A fresh key pair for `host`: secret in `sec/HOST.key_secret`, public
    /// certificate in `pub/HOST.key` (replacing any).
    pub fn keygen(&self, host: &str) {
        let kp = canopy_security::CurveKeypair::generate().expect("keygen");
        let secret = self.path(&format!("sec/{host}.key_secret"));
        let _ = std::fs::remove_file(&secret);
        let public = self.path(&format!("pub/{host}.key"));
        let _ = std::fs::remove_file(&public);
        canopy_security::cert::write_pair(&kp, host, &secret, &public)
            .expect("write a certificate");
    }

    /// The `hosts` entries of the first `n` nodes, one per line.
    pub fn hosts_text(&self, n: u32) -> String {
        (0..n)
            .map(|r| {
                let p = self.ports[r as usize];
                format!(
                    "  {{ host = \"n{r}\", bind = \"tcp://127.0.0.1:{p}\", connect = \"tcp://127.0.0.1:{p}\" }},\n"
                )
            })
            .collect()
    }

    /// A whole config (fanout 2, [`FAST_TIMING`]) with these `hosts` lines.
    pub fn config_text(&self, hosts: &str) -> String {
        let (hb, torpid, lost) = FAST_TIMING;
        let d = self.dir.path().display();
        format!(
            "[bootstrap]\ncurve_cert = \"{d}/sec/%h.key_secret\"\ncurve_public_certs = \"{d}/pub\"\nfanout = 2\nhosts = [\n{hosts}]\n\n[timing]\nheartbeat = {hb}\ntorpid = {torpid}\nlost = {lost}\n"
        )
    }

    /// Rank `rank`'s TCP port.
    pub fn port(&self, rank: u32) -> u16 {
        self.ports[rank as usize]
    }

    pub fn size(&self) -> u32 {
        self.size
    }

    /// A path in the cluster's directory.
    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// Write a file (0644) in the cluster's directory.
    pub fn write(&self, name: &str, text: &str) {
        let p = self.path(name);
        std::fs::write(&p, text).expect("write a config");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    }

    /// Rank `rank`'s runtime directory.
    pub fn rundir(&self, rank: u32) -> PathBuf {
        self.path(&format!("run-n{rank}"))
    }

    /// Rank `rank`'s local connector.
    pub fn uri(&self, rank: u32) -> String {
        format!("local://{}/local-{rank}", self.rundir(rank).display())
    }

    /// Everything rank `rank`'s brokers (all incarnations) logged.
    pub fn log(&self, rank: u32) -> String {
        std::fs::read_to_string(self.path(&format!("n{rank}.log"))).unwrap_or_default()
    }

    /// Every rank's log, for a failure message.
    pub fn logs(&self) -> String {
        (0..self.size)
            .map(|r| format!("--- n{r}\n{}", self.log(r)))
            .collect()
    }

    /// Start (or restart: the old process is killed first) rank `rank`.
    pub fn start(&mut self, rank: u32) {
        self.start_as(rank, &format!("n{rank}"), "canopy.toml");
    }

    /// Start rank `rank`'s slot as hostname `host` with config file
    /// `config` (in the cluster's directory), replacing what ran there.
    pub fn start_as(&mut self, rank: u32, host: &str, config: &str) {
        self.kill(rank);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path(&format!("n{rank}.log")))
            .expect("open a log");
        let mut cmd = match self.wrapper.split_first() {
            Some((prog, args)) => {
                let mut c = Command::new(prog);
                c.args(args).arg(canopy_bin());
                c
            }
            None => Command::new(canopy_bin()),
        };
        let child = cmd
            .args(["broker", "--config"])
            .arg(self.path(config))
            .args(["--hostname", host, "--force-root", "--rundir"])
            .arg(self.rundir(rank))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn canopy broker");
        track_pids(self.watch, &[child.id() as i32]);
        self.nodes[rank as usize] = Some(child);
    }

    /// Start every broker from now on under `wrapper` (its program and
    /// arguments; the broker's command line follows them).
    pub fn set_wrapper(&mut self, wrapper: Vec<std::ffi::OsString>) {
        self.wrapper = wrapper;
    }

    /// The `hosts` entries of the first `n` nodes, each binding `bind`
    /// (`%p`: its port), connecting over 127.0.0.1.
    pub fn hosts_binding(&self, n: u32, bind: &str) -> String {
        (0..n)
            .map(|r| {
                let p = self.ports[r as usize];
                let b = bind.replace("%p", &p.to_string());
                format!(
                    "  {{ host = \"n{r}\", bind = \"{b}\", connect = \"tcp://127.0.0.1:{p}\" }},\n"
                )
            })
            .collect()
    }

    /// Start every rank.
    pub fn start_all(&mut self) {
        for r in 0..self.size {
            self.start(r);
        }
    }

    /// The pid of rank `rank`'s broker, if running.
    pub fn pid(&self, rank: u32) -> Option<i32> {
        self.nodes[rank as usize].as_ref().map(|c| c.id() as i32)
    }

    /// SIGKILL rank `rank` and reap it.
    pub fn kill(&mut self, rank: u32) {
        if let Some(mut c) = self.nodes[rank as usize].take() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGKILL);
            let _ = c.wait();
        }
    }

    /// Send `sig` (SIGSTOP, SIGCONT, ...) to rank `rank`.
    pub fn signal(&self, rank: u32, sig: Signal) {
        if let Some(p) = self.pid(rank) {
            let _ = kill(Pid::from_raw(p), sig);
        }
    }

    /// A client of rank `rank`, retrying while its broker comes up (10 s).
    pub fn client(&self, rank: u32) -> Client {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match Client::connect(Some(&self.uri(rank))) {
                Ok(c) => return c,
                Err(e) if Instant::now() > deadline => {
                    panic!("rank {rank}: {e}\n{}", self.logs())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// `overlay.status` of rank `rank`, if it answers.
    pub fn status(&self, rank: u32) -> Option<serde_json::Value> {
        let mut c = Client::connect(Some(&self.uri(rank))).ok()?;
        let m = c.rpc("overlay.status", rank, b"", RPC_TIMEOUT).ok()?;
        serde_json::from_slice(&m.payload).ok()
    }

    /// Wait until rank 0 reports the whole instance full; panics with
    /// every log if it is not within `within`.
    pub fn wait_full(&self, within: Duration) {
        let ok = wait_until(within, || {
            self.status(0).is_some_and(|s| s["health"] == "full")
        });
        assert!(
            ok,
            "instance not full after {within:?}: {:?}\nlogs:\n{}",
            self.status(0),
            self.logs()
        );
    }

    /// Has rank `rank`'s broker exited? Reaps it if so.
    pub fn exited(&mut self, rank: u32) -> Option<std::process::ExitStatus> {
        self.nodes[rank as usize]
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Every rank answers a ping routed from rank 0.
    pub fn assert_all_answer(&self) {
        let mut c = self.client(0);
        for r in 0..self.size {
            let m = c
                .rpc("broker.ping", r, b"hi", RPC_TIMEOUT)
                .unwrap_or_else(|e| panic!("rank {r}: {e}\n{}", self.logs()));
            assert_eq!(m.header.nodeid, r);
        }
    }

    /// Resident set size of rank `rank`'s broker, in KiB.
    pub fn rss_kib(&self, rank: u32) -> Option<u64> {
        let pid = self.pid(rank)?;
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        s.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for r in 0..self.size {
            self.kill(r);
        }
        untrack(self.watch);
    }
}
