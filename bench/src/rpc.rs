//! Scenario `rpc`: `broker.ping` latency (window 1) and throughput
//! (a window of requests in flight) from rank 0's local connector to
//! chosen ranks of one instance.

use crate::instance::{Instance, Progress, Teardown};
use crate::start::secs;
use crate::stats::{hops, percentile, Summary};
use anyhow::{anyhow, bail, Context, Result};
use canopy_client::{Client, Msg};
use canopy_proto::{errno, MsgType};
use serde::Serialize;
use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub(crate) const PING: &str = "broker.ping";

#[derive(Clone, Debug, Serialize)]
pub struct RpcParams {
    pub size: u32,
    pub fanout: u32,
    pub ranks: Vec<u32>,
    /// Payload sizes in bytes.
    pub pads: Vec<usize>,
    /// Sequential RPCs timed for latency.
    pub count: u32,
    /// Sequential RPCs before those, not timed.
    pub warmup: u32,
    /// Requests in flight during the throughput phase.
    pub window: u32,
    pub runs: u32,
    /// Longest wait for any one reply.
    #[serde(rename = "reply_timeout_s", serialize_with = "secs")]
    pub reply_timeout: Duration,
    /// Passed to `canopy start --timeout`.
    #[serde(rename = "start_timeout_s", serialize_with = "secs")]
    pub start_timeout: Duration,
    #[serde(skip)]
    pub rundir: Option<PathBuf>,
}

impl RpcParams {
    /// Requests per throughput phase: `count * 5`.
    pub fn requests(&self) -> u64 {
        self.count as u64 * 5
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct RpcResult {
    pub rank: u32,
    /// Tree hops from rank 0 to `rank`.
    pub hops: u32,
    pub pad: usize,
    /// Per-run p50 of the sequential RPC round trips, microseconds.
    pub latency_p50_us: Summary,
    /// Per-run p99 of the same, microseconds.
    pub latency_p99_us: Summary,
    /// Per-run requests completed per second with `window` in flight.
    pub throughput_rps: Summary,
}

#[derive(Clone, Debug, Serialize)]
pub struct RpcReport {
    pub params: RpcParams,
    pub requests_per_throughput_run: u64,
    /// Spawn of `canopy start` to its printing CANOPY_URI, seconds.
    pub instance_start_s: f64,
    pub teardown: Teardown,
    pub results: Vec<RpcResult>,
}

/// One run's statistics for one (rank, pad).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Sample {
    pub p50_us: f64,
    pub p99_us: f64,
    pub rps: f64,
}

pub fn validate(p: &RpcParams) -> Result<()> {
    if let Some(r) = p.ranks.iter().find(|r| **r >= p.size) {
        bail!(
            "rank {r} is not in an instance of size {} (ranks 0..={})",
            p.size,
            p.size - 1
        );
    }
    Ok(())
}

pub fn run(canopy: &Path, p: &RpcParams) -> Result<RpcReport> {
    validate(p)?;
    let mut inst = Instance::start(
        canopy,
        p.size,
        p.fanout,
        p.start_timeout,
        p.rundir.as_deref(),
    )?;
    let uri = inst.uri(0);
    let instance_start_s = inst.start_s;
    eprintln!(
        "rpc: {} brokers up in {instance_start_s:.3} s at {uri}",
        p.size
    );
    // If nothing completes for a reply timeout (+5 s), the instance is
    // torn down, which ends whatever the measurement waits on.
    let stall = p.reply_timeout + Duration::from_secs(5);
    let (samples, teardown) = inst.run(stall, |prog| measure(&uri, p, &[PING], "rpc", prog))?;

    let mut results = Vec::new();
    for (i, &rank) in p.ranks.iter().enumerate() {
        for (j, &pad) in p.pads.iter().enumerate() {
            let runs: Vec<Sample> = samples
                .iter()
                .map(|run| run[i * p.pads.len() + j])
                .collect();
            let sum = |f: fn(&Sample) -> f64| {
                Summary::of(runs.iter().map(f).collect()).ok_or_else(|| anyhow!("no runs"))
            };
            results.push(RpcResult {
                rank,
                hops: hops(rank, p.fanout),
                pad,
                latency_p50_us: sum(|s| s.p50_us)?,
                latency_p99_us: sum(|s| s.p99_us)?,
                throughput_rps: sum(|s| s.rps)?,
            });
        }
    }
    Ok(RpcReport {
        params: p.clone(),
        requests_per_throughput_run: p.requests(),
        instance_start_s,
        teardown,
        results,
    })
}

/// All runs; each run is, for every (rank, pad) in order, rank-major,
/// each of `topics` in turn. `label` prefixes the progress lines.
pub(crate) fn measure(
    uri: &str,
    p: &RpcParams,
    topics: &[&str],
    label: &str,
    ticks: &Progress,
) -> Result<Vec<Vec<Sample>>> {
    let mut all = Vec::new();
    for run in 1..=p.runs {
        let mut this = Vec::new();
        for &rank in &p.ranks {
            for &pad in &p.pads {
                for &topic in topics {
                    let s = measure_one(uri, topic, rank, pad, p, ticks)
                        .with_context(|| format!("run {run}, {topic}, rank {rank}, pad {pad}"))?;
                    eprintln!(
                        "{label}: run {run}/{} {topic} rank {rank} pad {pad}: p50 {:.1} us, p99 {:.1} us, {:.0} req/s",
                        p.runs, s.p50_us, s.p99_us, s.rps
                    );
                    this.push(s);
                }
            }
        }
        all.push(this);
    }
    Ok(all)
}

/// Latency (window 1) and throughput (`p.window` in flight) of `topic`,
/// an echo, at `rank`, over a fresh connection to `uri`.
fn measure_one(
    uri: &str,
    topic: &str,
    rank: u32,
    pad: usize,
    p: &RpcParams,
    ticks: &Progress,
) -> Result<Sample> {
    let tick = || ticks.tick();
    let mut c = Client::connect(Some(uri))?;
    tick();
    let payload: Vec<u8> = (0..pad).map(|i| b'a' + (i % 26) as u8).collect();
    let t = p.reply_timeout;

    for _ in 0..p.warmup {
        let m = c.rpc(topic, rank, &payload, t)?;
        check_echo(&m, rank, &payload)?;
        tick();
    }
    let mut lat = Vec::with_capacity(p.count as usize);
    for _ in 0..p.count {
        let t0 = Instant::now();
        let m = c.rpc(topic, rank, &payload, t)?;
        let dt = t0.elapsed();
        check_echo(&m, rank, &payload)?;
        lat.push(dt.as_secs_f64() * 1e6);
        tick();
    }

    let total = p.requests();
    let window = p.window as usize;
    let mut inflight: HashSet<u32> = HashSet::with_capacity(window);
    let (mut sent, mut done) = (0u64, 0u64);
    let t0 = Instant::now();
    while done < total {
        while sent < total && inflight.len() < window {
            inflight.insert(c.send(topic, rank, &payload)?);
            sent += 1;
        }
        let m = c.recv(t)?;
        if m.header.msg_type != MsgType::Response || !inflight.remove(&m.header.matchtag) {
            continue;
        }
        if m.header.errnum != 0 {
            bail!(
                "{topic} failed on rank {}: {}: {}",
                m.header.nodeid,
                errno::name(m.header.errnum),
                String::from_utf8_lossy(&m.payload)
            );
        }
        if m.payload.len() != pad {
            bail!(
                "rank {} echoed {} bytes for a {pad}-byte {topic}",
                m.header.nodeid,
                m.payload.len()
            );
        }
        done += 1;
        tick();
    }
    let rps = total as f64 / t0.elapsed().as_secs_f64();

    let q = |x| percentile(&lat, x).ok_or_else(|| anyhow!("no latency samples"));
    Ok(Sample {
        p50_us: q(50.0)?,
        p99_us: q(99.0)?,
        rps,
    })
}

fn check_echo(m: &Msg, rank: u32, payload: &[u8]) -> Result<()> {
    if m.payload != payload {
        bail!(
            "rank {rank} echoed {} bytes that differ from the {} sent",
            m.payload.len(),
            payload.len()
        );
    }
    Ok(())
}

pub(crate) fn cell(s: &Summary, prec: usize) -> String {
    format!(
        "{:.prec$} [{:.prec$}, {:.prec$}]",
        s.median,
        s.min,
        s.max,
        prec = prec
    )
}

pub fn table(r: &RpcReport) -> String {
    let p = &r.params;
    let mut s = format!(
        "rpc: broker.ping from rank 0's local connector; `canopy start --size {} --fanout {}` \
         (up in {:.3} s)\n\
         \x20    latency: {} sequential RPCs after {} warm-up; throughput: {} RPCs, {} in flight\n\
         \x20    median over {} run(s) [min, max]\n",
        p.size,
        p.fanout,
        r.instance_start_s,
        p.count,
        p.warmup,
        r.requests_per_throughput_run,
        p.window,
        p.runs
    );
    let _ = writeln!(
        s,
        "{:>5} {:>4} {:>7}  {:>28}  {:>28}  {:>28}",
        "rank", "hops", "pad", "p50 us", "p99 us", "req/s"
    );
    for x in &r.results {
        let _ = writeln!(
            s,
            "{:>5} {:>4} {:>7}  {:>28}  {:>28}  {:>28}",
            x.rank,
            x.hops,
            x.pad,
            cell(&x.latency_p50_us, 1),
            cell(&x.latency_p99_us, 1),
            cell(&x.throughput_rps, 0)
        );
    }
    if !r.teardown.clean {
        let _ = writeln!(s, "warning: {}", r.teardown.describe());
    }
    s
}
