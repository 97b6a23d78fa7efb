//! Scenario `hostile`: rank 0's RSS while `--clients` hostile local
//! clients, each under a uid of its own, push at their budgets, and the
//! owner's `broker.ping` p50/p99 during the attack against the same
//! without it.
//!
//! Each hostile client is `canopy-t-peer flood-local` (t/src/bin) run with
//! `setpriv --reuid UID` for a uid with no passwd entry, admitted as a
//! `user` by a policy rule naming that uid. It sends `--pings` pings of
//! `--pad` bytes on one connection and never reads the replies, so its
//! connection reaches the per-connection budget (refused with EAGAIN, cut
//! once its unsent replies pass the budget), and together they reach the
//! broker's total budget. Needs root (to run as other uids) and the
//! `canopy-t-peer` binary next to `canopy` (`cargo build --release -p
//! canopy-t`).

use crate::instance::Instance;
use crate::stats::percentile;
use anyhow::{bail, Context, Result};
use canopy_client::Client;
use serde::Serialize;
use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The broker's default total budget (`Budgets::total_bytes`), KiB.
pub const TOTAL_BUDGET_KIB: u64 = 256 << 10;

#[derive(Clone, Debug, Serialize)]
pub struct HostileParams {
    pub clients: u32,
    /// Pings each hostile client sends without reading.
    pub pings: u32,
    /// Payload bytes of each.
    pub pad: usize,
    /// Owner pings timed in each phase.
    pub owner_pings: u32,
    /// How long the hostile clients hold their connections unread, seconds.
    #[serde(rename = "hold_s", serialize_with = "crate::start::secs")]
    pub hold: Duration,
    pub runs: u32,
    #[serde(rename = "start_timeout_s", serialize_with = "crate::start::secs")]
    pub start_timeout: Duration,
    #[serde(skip)]
    pub rundir: Option<PathBuf>,
}

#[derive(Clone, Debug, Serialize)]
pub struct HostileRun {
    pub idle_kib: u64,
    pub peak_kib: u64,
    /// Peak less idle less the total budget: what the broker held beyond
    /// its budget (negative: it stayed under the budget).
    pub overhead_kib: i64,
    pub quiet_p50_us: f64,
    pub quiet_p99_us: f64,
    pub attack_p50_us: f64,
    pub attack_p99_us: f64,
    pub owner_failures: u32,
    /// Hostile connections refused (EAGAIN) or cut.
    pub refused_or_cut: u32,
}

#[derive(Clone, Debug, Serialize)]
pub struct HostileReport {
    pub params: HostileParams,
    pub total_budget_kib: u64,
    pub runs: Vec<HostileRun>,
    /// Medians over the runs.
    pub peak_kib: u64,
    pub overhead_kib: i64,
    pub quiet_p50_us: f64,
    pub quiet_p99_us: f64,
    pub attack_p50_us: f64,
    pub attack_p99_us: f64,
}

fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// `n` uids with no passwd entry.
fn nameless_uids(n: u32) -> Vec<u32> {
    (61_000..70_000)
        .filter(|u| {
            nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(*u))
                .ok()
                .flatten()
                .is_none()
        })
        .take(n as usize)
        .collect()
}

fn chmod(p: &Path, mode: u32) -> Result<()> {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", p.display()))
}

/// Owner pings of rank 0, one at a time: latencies in µs and failures.
fn owner_pings(uri: &str, n: u32) -> Result<(Vec<f64>, u32)> {
    let mut c = Client::connect(Some(uri))?;
    let mut lat = Vec::with_capacity(n as usize);
    let mut failed = 0;
    for _ in 0..n {
        let t = Instant::now();
        match c.rpc("broker.ping", 0, b"", Duration::from_secs(5)) {
            Ok(_) => lat.push(t.elapsed().as_secs_f64() * 1e6),
            Err(_) => failed += 1,
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok((lat, failed))
}

/// A directory of our own for the policy and the peer, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<TempDir> {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "canopy-bench-hostile-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&p).with_context(|| format!("mkdir {}", p.display()))?;
        Ok(TempDir(p))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Hostile peers, killed (process group) when dropped.
struct Peers(Vec<Child>);

impl Drop for Peers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = c.wait();
        }
    }
}

fn one_run(canopy: &Path, peer_src: &Path, p: &HostileParams) -> Result<HostileRun> {
    let uids = nameless_uids(p.clients);
    if uids.len() < p.clients as usize {
        bail!("cannot find {} uids without a passwd entry", p.clients);
    }
    let policy_dir = TempDir::new()?;
    chmod(policy_dir.path(), 0o711)?;
    let policy = policy_dir.path().join("policy.toml");
    let mut text = String::new();
    for u in &uids {
        let _ = write!(
            text,
            "[[rule]]\nname = \"u{u}\"\nprincipal = \"unix:#{u}\"\nroles = [\"user\"]\n\n"
        );
    }
    std::fs::write(&policy, text)?;
    chmod(&policy, 0o644)?;
    let peer = policy_dir.path().join("peer");
    std::fs::copy(peer_src, &peer).context("copy canopy-t-peer")?;
    chmod(&peer, 0o755)?;
    let extra = vec!["--policy".to_string(), policy.display().to_string()];
    let mut inst =
        Instance::start_with(canopy, 1, 2, p.start_timeout, p.rundir.as_deref(), &extra)?;
    let uri = inst.uri(0);
    let local0 = inst.dir.join("local-0");
    chmod(inst.launcher.scratch(), 0o711)?;
    chmod(&inst.dir, 0o711)?;
    chmod(&local0, 0o777)?;
    let pid = *crate::memory::broker_pids(inst.launcher.scratch())
        .get(&0)
        .context("no rank 0 broker found")?;
    let p = p.clone();
    let stall = Duration::from_secs(60);
    let (run, _) = inst.run(stall, move |progress| {
        // Quiet: the owner alone.
        let (quiet, qfail) = owner_pings(&uri, p.owner_pings)?;
        progress.tick();
        std::thread::sleep(Duration::from_millis(300));
        let idle = rss_kib(pid);
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(idle));
        let sampler = {
            let (stop, peak) = (stop.clone(), peak.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
        };
        let sizes = vec![p.pad.to_string(); p.pings as usize].join(",");
        let hold_ms = p.hold.as_millis().to_string();
        let limit_ms = (p.hold.as_millis() + 30_000).to_string();
        let mut peers = Peers(Vec::new());
        for u in &uids {
            let child = Command::new("setpriv")
                .arg(format!("--reuid={u}"))
                .arg(format!("--regid={u}"))
                .args(["--clear-groups", "--"])
                .arg(&peer)
                .args([
                    "flood-local",
                    local0.to_str().context("a UTF-8 path")?,
                    &limit_ms,
                    "1",
                    &sizes,
                    &hold_ms,
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .process_group(0)
                .spawn()
                .context("run setpriv (the hostile scenario needs root)")?;
            peers.0.push(child);
        }
        // Let them connect and start pushing, then time the owner.
        std::thread::sleep(Duration::from_millis(200));
        let (attack, afail) = owner_pings(&uri, p.owner_pings)?;
        progress.tick();
        let mut refused = 0;
        for c in peers.0.iter_mut() {
            let out = std::mem::take(&mut c.stdout);
            let _ = c.wait();
            if let Some(mut o) = out {
                let mut s = String::new();
                let _ = std::io::Read::read_to_string(&mut o, &mut s);
                if s.contains("errnum=11 ") || s.contains("conn 0 closed") {
                    refused += 1;
                }
            }
            progress.tick();
        }
        stop.store(true, Ordering::Relaxed);
        let _ = sampler.join();
        let peak = peak.load(Ordering::Relaxed);
        let pct = |v: &[f64], q| percentile(v, q).unwrap_or(f64::NAN);
        Ok(HostileRun {
            idle_kib: idle,
            peak_kib: peak,
            overhead_kib: peak as i64 - idle as i64 - TOTAL_BUDGET_KIB as i64,
            quiet_p50_us: pct(&quiet, 50.0),
            quiet_p99_us: pct(&quiet, 99.0),
            attack_p50_us: pct(&attack, 50.0),
            attack_p99_us: pct(&attack, 99.0),
            owner_failures: qfail + afail,
            refused_or_cut: refused,
        })
    })?;
    Ok(run)
}

pub fn run(canopy: &Path, p: &HostileParams) -> Result<HostileReport> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the hostile scenario runs clients as other uids: run it as root");
    }
    let peer = canopy.with_file_name("canopy-t-peer");
    if !peer.is_file() {
        bail!(
            "no {} ; build it: cargo build --release -p canopy-t",
            peer.display()
        );
    }
    let mut runs = Vec::new();
    for i in 0..p.runs {
        eprintln!("hostile: run {} of {}", i + 1, p.runs);
        runs.push(one_run(canopy, &peer, p)?);
    }
    let med = |f: &dyn Fn(&HostileRun) -> f64| {
        crate::stats::median(&runs.iter().map(f).collect::<Vec<_>>()).unwrap_or(f64::NAN)
    };
    Ok(HostileReport {
        params: p.clone(),
        total_budget_kib: TOTAL_BUDGET_KIB,
        peak_kib: med(&|r| r.peak_kib as f64) as u64,
        overhead_kib: med(&|r| r.overhead_kib as f64) as i64,
        quiet_p50_us: med(&|r| r.quiet_p50_us),
        quiet_p99_us: med(&|r| r.quiet_p99_us),
        attack_p50_us: med(&|r| r.attack_p50_us),
        attack_p99_us: med(&|r| r.attack_p99_us),
        runs,
    })
}

pub fn table(r: &HostileReport) -> String {
    let p = &r.params;
    let mut s = format!(
        "hostile: {} local clients (a uid each) x {} pings of {} B unread; rank 0 RSS and owner ping (medians of {} runs)\n",
        p.clients, p.pings, p.pad, p.runs
    );
    let _ = writeln!(
        s,
        "{:>10} {:>10} {:>12} {:>10} {:>10} {:>10} {:>10} {:>8}",
        "idle MiB",
        "peak MiB",
        "over budget",
        "quiet p50",
        "quiet p99",
        "attack p50",
        "attack p99",
        "refused"
    );
    for x in &r.runs {
        let _ = writeln!(
            s,
            "{:>10.1} {:>10.1} {:>10.1}Mi {:>8.0}us {:>8.0}us {:>8.0}us {:>8.0}us {:>8}",
            x.idle_kib as f64 / 1024.0,
            x.peak_kib as f64 / 1024.0,
            x.overhead_kib as f64 / 1024.0,
            x.quiet_p50_us,
            x.quiet_p99_us,
            x.attack_p50_us,
            x.attack_p99_us,
            x.refused_or_cut
        );
    }
    let _ = writeln!(
        s,
        "median: peak {:.1} MiB (budget {} MiB, beyond it {:.1} MiB); owner ping p50 {:.0} -> {:.0} us, p99 {:.0} -> {:.0} us",
        r.peak_kib as f64 / 1024.0,
        r.total_budget_kib / 1024,
        r.overhead_kib as f64 / 1024.0,
        r.quiet_p50_us,
        r.attack_p50_us,
        r.quiet_p99_us,
        r.attack_p99_us
    );
    s
}
