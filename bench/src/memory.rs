//! Scenario `memory`: resident set size of every broker when idle, and
//! after each of several rounds of routed messages.
//!
//! A client on rank 0 streams one-way `broker.ping`s to the deepest rank
//! (see [`crate::wire`]), so every broker on the path routes each message.
//! RSS (`VmRSS` in /proc/PID/status) is read from every broker of the
//! instance after it has been idle for a moment, and after each round.

use crate::instance::Instance;
use crate::stats::hops;
use crate::wire::Stream;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Clone, Debug, Serialize)]
pub struct MemoryParams {
    pub size: u32,
    pub fanout: u32,
    /// One-way messages per round.
    pub messages: u64,
    pub rounds: u32,
    pub pad: usize,
    pub batch: u32,
    /// Idle time before each reading, seconds.
    #[serde(rename = "settle_s", serialize_with = "crate::start::secs")]
    pub settle: Duration,
    #[serde(rename = "reply_timeout_s", serialize_with = "crate::start::secs")]
    pub reply_timeout: Duration,
    #[serde(rename = "start_timeout_s", serialize_with = "crate::start::secs")]
    pub start_timeout: Duration,
    #[serde(skip)]
    pub rundir: Option<PathBuf>,
}

#[derive(Clone, Debug, Serialize)]
pub struct BrokerRss {
    pub rank: u32,
    pub depth: u32,
    /// Routes the streamed messages.
    pub on_path: bool,
    pub idle_kib: u64,
    /// After each round (round k: k * messages routed).
    pub after_kib: Vec<u64>,
    /// When idle: anonymous (private heap, stacks) and file-backed
    /// (the binary and shared libraries, the same pages in every broker)
    /// parts of VmRSS, and the proportional set size (shared pages
    /// divided among the processes that map them).
    pub idle_anon_kib: u64,
    pub idle_file_kib: u64,
    pub idle_pss_kib: u64,
    /// The same after the last round.
    pub final_anon_kib: u64,
    pub final_pss_kib: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct MemoryReport {
    pub params: MemoryParams,
    pub instance_start_s: f64,
    pub teardown: crate::instance::Teardown,
    /// The rank the messages were sent to, from rank 0.
    pub target_rank: u32,
    /// Messages per second in each round.
    pub round_msgs_per_s: Vec<f64>,
    pub brokers: Vec<BrokerRss>,
    /// Largest idle RSS of any broker.
    pub max_idle_kib: u64,
    /// Largest idle private (anonymous) and proportional memory.
    pub max_idle_anon_kib: u64,
    pub max_idle_pss_kib: u64,
    /// Largest RSS of any broker after the last round.
    pub max_final_kib: u64,
    /// Largest growth of any broker from after round 1 to after the last
    /// round (0 with one round): growth that continues is a leak.
    pub max_growth_after_first_kib: i64,
    /// Largest growth of any broker from idle to after the last round.
    pub max_growth_from_idle_kib: i64,
}

/// Broker pid -> rank, found in /proc: processes whose command line names
/// the scratch directory and whose environment has PMI_RANK.
pub fn broker_pids(scratch: &Path) -> BTreeMap<u32, i32> {
    let dir = scratch.as_os_str().as_encoded_bytes().to_vec();
    let mut out = BTreeMap::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in procs.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if !args.iter().any(|a| *a == b"broker") || !args.iter().any(|a| a.starts_with(&dir)) {
            continue;
        }
        let Ok(env) = std::fs::read(e.path().join("environ")) else {
            continue;
        };
        if let Some(rank) = env
            .split(|b| *b == 0)
            .find_map(|v| v.strip_prefix(b"PMI_RANK="))
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.parse::<u32>().ok())
        {
            out.insert(rank, pid);
        }
    }
    out
}

/// A `Key:   N kB` field of a /proc file.
fn kib_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// VmRSS, RssAnon, RssFile and Pss of `pid`, KiB.
#[derive(Clone, Copy, Debug, Default)]
pub struct Mem {
    pub rss: u64,
    pub anon: u64,
    pub file: u64,
    pub pss: u64,
}

pub fn mem(pid: i32) -> Result<Mem> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status; did the broker exit?"))?;
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    Ok(Mem {
        rss: kib_field(&status, "VmRSS:")
            .with_context(|| format!("no VmRSS in /proc/{pid}/status"))?,
        anon: kib_field(&status, "RssAnon:").unwrap_or(0),
        file: kib_field(&status, "RssFile:").unwrap_or(0),
        pss: kib_field(&rollup, "Pss:").unwrap_or(0),
    })
}

fn read_all(pids: &BTreeMap<u32, i32>) -> Result<Vec<Mem>> {
    pids.values().map(|&p| mem(p)).collect()
}

pub fn run(canopy: &Path, p: &MemoryParams) -> Result<MemoryReport> {
    let mut inst = Instance::start(
        canopy,
        p.size,
        p.fanout,
        p.start_timeout,
        p.rundir.as_deref(),
    )?;
    eprintln!("memory: {} brokers up in {:.3} s", p.size, inst.start_s);
    let pids = broker_pids(inst.launcher.scratch());
    if pids.len() != p.size as usize || pids.keys().copied().ne(0..p.size) {
        bail!(
            "found {} broker processes in /proc for an instance of size {}; cannot read their memory",
            pids.len(),
            p.size
        );
    }
    let target = p.size - 1;
    let uri0 = inst.dir.join("local-0");
    let stall = p.reply_timeout + Duration::from_secs(5);
    let ((idle, after, rates), teardown) = inst.run(stall, |prog| {
        let mut s = Stream::connect(&uri0)?;
        s.ping(target, p.reply_timeout)?;
        std::thread::sleep(p.settle);
        let idle = read_all(&pids)?;
        let payload = vec![b'm'; p.pad];
        let mut after = Vec::new();
        let mut rates = Vec::new();
        for round in 1..=p.rounds {
            let dt = s.stream(target, &payload, p.messages, p.batch, p.reply_timeout, prog)?;
            let rate = p.messages as f64 / dt.as_secs_f64();
            std::thread::sleep(p.settle);
            let rss = read_all(&pids)?;
            eprintln!(
                "memory: round {round}/{}: {} messages to rank {target} at {rate:.0}/s; largest RSS {} KiB",
                p.rounds,
                p.messages,
                rss.iter().map(|m| m.rss).max().unwrap_or(0)
            );
            after.push(rss);
            rates.push(rate);
        }
        Ok((idle, after, rates))
    })?;
    let path: Vec<u32> = {
        let mut v = vec![target];
        let mut r = target;
        while r > 0 {
            r = (r - 1) / p.fanout.max(1);
            v.push(r);
        }
        v
    };
    let brokers: Vec<BrokerRss> = pids
        .keys()
        .enumerate()
        .map(|(i, &rank)| BrokerRss {
            rank,
            depth: hops(rank, p.fanout),
            on_path: path.contains(&rank),
            idle_kib: idle[i].rss,
            after_kib: after.iter().map(|a| a[i].rss).collect(),
            idle_anon_kib: idle[i].anon,
            idle_file_kib: idle[i].file,
            idle_pss_kib: idle[i].pss,
            final_anon_kib: after.last().map_or(idle[i].anon, |a| a[i].anon),
            final_pss_kib: after.last().map_or(idle[i].pss, |a| a[i].pss),
        })
        .collect();
    let last = |b: &BrokerRss| b.after_kib.last().copied().unwrap_or(b.idle_kib);
    let first = |b: &BrokerRss| b.after_kib.first().copied().unwrap_or(b.idle_kib);
    Ok(MemoryReport {
        params: p.clone(),
        instance_start_s: inst.start_s,
        teardown,
        target_rank: target,
        round_msgs_per_s: rates,
        max_idle_kib: brokers.iter().map(|b| b.idle_kib).max().unwrap_or(0),
        max_idle_anon_kib: brokers.iter().map(|b| b.idle_anon_kib).max().unwrap_or(0),
        max_idle_pss_kib: brokers.iter().map(|b| b.idle_pss_kib).max().unwrap_or(0),
        max_final_kib: brokers.iter().map(last).max().unwrap_or(0),
        max_growth_after_first_kib: brokers
            .iter()
            .map(|b| last(b) as i64 - first(b) as i64)
            .max()
            .unwrap_or(0),
        max_growth_from_idle_kib: brokers
            .iter()
            .map(|b| last(b) as i64 - b.idle_kib as i64)
            .max()
            .unwrap_or(0),
        brokers,
    })
}

pub fn table(r: &MemoryReport) -> String {
    let p = &r.params;
    let mut s = format!(
        "memory: VmRSS per broker, size {} fanout {}; {} round(s) of {} one-way messages ({} B) \
         from rank 0 to rank {}\n",
        p.size, p.fanout, p.rounds, p.messages, p.pad, r.target_rank
    );
    let _ = write!(
        s,
        "{:>6} {:>6} {:>5} {:>9} {:>9} {:>9} {:>9} {:>10}",
        "rank", "depth", "path", "anon KiB", "file KiB", "Pss KiB", "final Pss", "RSS idle"
    );
    for k in 1..=r.params.rounds {
        let _ = write!(s, " {:>10}", format!("after {k}"));
    }
    s.push('\n');
    for b in &r.brokers {
        let _ = write!(
            s,
            "{:>6} {:>6} {:>5} {:>9} {:>9} {:>9} {:>9} {:>10}",
            b.rank,
            b.depth,
            if b.on_path { "yes" } else { "" },
            b.idle_anon_kib,
            b.idle_file_kib,
            b.idle_pss_kib,
            b.final_pss_kib,
            b.idle_kib
        );
        for a in &b.after_kib {
            let _ = write!(s, " {a:>10}");
        }
        s.push('\n');
    }
    let _ = writeln!(
        s,
        "  VmRSS: largest idle {} KiB (anon {} KiB, Pss {} KiB), largest final {} KiB; growth from idle {} KiB, after round 1 {} KiB; rounds at {} msg/s",
        r.max_idle_kib,
        r.max_idle_anon_kib,
        r.max_idle_pss_kib,
        r.max_final_kib,
        r.max_growth_from_idle_kib,
        r.max_growth_after_first_kib,
        r.round_msgs_per_s
            .iter()
            .map(|x| format!("{x:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if !r.teardown.clean {
        let _ = writeln!(s, "warning: {}", r.teardown.describe());
    }
    s
}
