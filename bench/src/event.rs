//! Scenario `event`: publish rate at window 1 and at a larger window, and
//! one-way latency from publish to delivery on every rank, with a check
//! that every rank received every event, in order.
//!
//! A client on rank 0 publishes `bench.event` (rank 0 sequences events);
//! one subscriber per rank, each on its own thread in this process, takes
//! the events from its rank's local connector (with [`Stream`], which
//! reads into a reused buffer; see [`Stream::next_event`]). Each event carries the
//! publisher's clock (nanoseconds since a shared origin in this process),
//! so a subscriber's receive time minus it is the one-way latency.
//!
//! Phase 1 (latency) publishes the next event only once the previous one
//! has reached every subscriber: one event in the system at a time, so
//! the latency is the path's, not a queue's. Phase 2 publishes at window 1
//! (the next publish when rank 0 has acknowledged the previous one) and
//! gives the window-1 rate; phase 3 keeps `window` publish requests in
//! flight and gives the rate at that window, and the rate at which the
//! events reached every rank.

use crate::instance::{Instance, Progress};
use crate::stats::{hops, percentile, Summary};
use crate::wire::Stream;
use anyhow::{anyhow, bail, Context, Result};
use canopy_client::Client;
use canopy_proto::{errno, MsgType};
use serde::Serialize;
use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const TOPIC: &str = "bench.event";

#[derive(Clone, Debug, Serialize)]
pub struct EventParams {
    pub size: u32,
    pub fanout: u32,
    /// Events published one at a time, each after the previous one
    /// reached every rank (latency phase).
    pub latency_events: u32,
    /// Events published at window 1 (window-1 rate phase).
    pub rate1_events: u32,
    /// Events published with `window` in flight (rate phase).
    pub rate_events: u32,
    pub window: u32,
    /// Payload bytes beyond the 9-byte stamp.
    pub pad: usize,
    pub runs: u32,
    #[serde(rename = "reply_timeout_s", serialize_with = "crate::start::secs")]
    pub reply_timeout: Duration,
    #[serde(rename = "start_timeout_s", serialize_with = "crate::start::secs")]
    pub start_timeout: Duration,
    #[serde(skip)]
    pub rundir: Option<PathBuf>,
}

#[derive(Clone, Debug, Serialize)]
pub struct RankLatency {
    pub rank: u32,
    pub depth: u32,
    /// One-way latency with one event in the system at a time, per-run
    /// p50 and p99, microseconds.
    pub p50_us: Summary,
    pub p99_us: Summary,
    /// One-way latency during the window-1 rate phase, p50.
    pub window1_p50_us: Summary,
    /// One-way latency during the window-N rate phase (queueing
    /// included), p50.
    pub loaded_p50_us: Summary,
}

#[derive(Clone, Debug, Serialize)]
pub struct EventReport {
    pub params: EventParams,
    pub instance_start_s: f64,
    pub teardown: crate::instance::Teardown,
    /// Events acknowledged per second by rank 0, window 1.
    pub rate_window_1: Summary,
    /// Events acknowledged per second by rank 0, window `window`.
    pub rate_window_n: Summary,
    /// Rate-phase events divided by the time until the last subscriber
    /// had the last event.
    pub delivered_window_n: Summary,
    /// Every rank received every event, in order, in every run.
    pub all_received: bool,
    pub ranks: Vec<RankLatency>,
}

/// What one subscriber saw in one run.
struct Seen {
    seqs: Vec<u64>,
    /// (phase, latency in ns)
    lat: Vec<(u8, u64)>,
    /// When it received its last event, ns since the origin.
    last_ns: u64,
}

struct RunOut {
    rate1: f64,
    rate_n: f64,
    delivered_n: f64,
    /// Per rank: p50, p99 (phase 1), p50 (phase 2), p50 (phase 3), us.
    lat: Vec<(f64, f64, f64, f64)>,
}

fn stamp(phase: u8, origin: Instant, pad: &[u8]) -> Vec<u8> {
    let ns = origin.elapsed().as_nanos() as u64;
    let mut body = Vec::with_capacity(2 + TOPIC.len() + 9 + pad.len());
    body.extend_from_slice(&(TOPIC.len() as u16).to_be_bytes());
    body.extend_from_slice(TOPIC.as_bytes());
    body.push(phase);
    body.extend_from_slice(&ns.to_be_bytes());
    body.extend_from_slice(pad);
    body
}

pub fn run(canopy: &Path, p: &EventParams) -> Result<EventReport> {
    if p.latency_events == 0 || p.rate1_events == 0 || p.rate_events == 0 {
        bail!("each phase needs events: give --latency-events, --rate1-events and --rate-events above 0");
    }
    let mut inst = Instance::start(
        canopy,
        p.size,
        p.fanout,
        p.start_timeout,
        p.rundir.as_deref(),
    )?;
    eprintln!("event: {} brokers up in {:.3} s", p.size, inst.start_s);
    let uris: Vec<String> = (0..p.size).map(|r| inst.uri(r)).collect();
    let paths: Vec<PathBuf> = (0..p.size)
        .map(|r| inst.dir.join(format!("local-{r}")))
        .collect();
    let stall = p.reply_timeout + Duration::from_secs(5);
    let (outs, teardown) = inst.run(stall, |prog| {
        let mut outs = Vec::new();
        for run in 1..=p.runs {
            let o = one_run(&uris[0], &paths, p, prog).with_context(|| format!("run {run}"))?;
            eprintln!(
                "event: run {run}/{}: window 1 {:.0}/s, window {} {:.0}/s (all delivered {:.0}/s); leaf p50 {:.0} us",
                p.runs,
                o.rate1,
                p.window,
                o.rate_n,
                o.delivered_n,
                o.lat.last().map(|l| l.0).unwrap_or(0.0)
            );
            outs.push(o);
        }
        Ok(outs)
    })?;
    let sum = |f: &dyn Fn(&RunOut) -> f64| {
        Summary::of(outs.iter().map(f).collect()).ok_or_else(|| anyhow!("no runs"))
    };
    let mut ranks = Vec::new();
    for r in 0..p.size as usize {
        ranks.push(RankLatency {
            rank: r as u32,
            depth: hops(r as u32, p.fanout),
            p50_us: sum(&|o| o.lat[r].0)?,
            p99_us: sum(&|o| o.lat[r].1)?,
            window1_p50_us: sum(&|o| o.lat[r].2)?,
            loaded_p50_us: sum(&|o| o.lat[r].3)?,
        });
    }
    Ok(EventReport {
        params: p.clone(),
        instance_start_s: inst.start_s,
        teardown,
        rate_window_1: sum(&|o| o.rate1)?,
        rate_window_n: sum(&|o| o.rate_n)?,
        delivered_window_n: sum(&|o| o.delivered_n)?,
        all_received: true,
        ranks,
    })
}

/// One run: subscribers on `paths` (local connectors, one per rank), the
/// publisher on `uri0`.
fn one_run(uri0: &str, paths: &[PathBuf], p: &EventParams, prog: &Progress) -> Result<RunOut> {
    let t = p.reply_timeout;
    let expected = (p.latency_events + p.rate1_events + p.rate_events) as usize;
    let mut subs = Vec::new();
    for (r, path) in paths.iter().enumerate() {
        let mut c = Stream::connect(path).with_context(|| format!("rank {r}"))?;
        c.rpc(
            "event.subscribe",
            canopy_proto::NODEID_ANY,
            TOPIC.as_bytes(),
            t,
        )
        .with_context(|| format!("subscribe at rank {r}"))?;
        subs.push(c);
    }
    let mut publisher = Client::connect(Some(uri0))?;
    let pad = vec![b'e'; p.pad];
    let origin = Instant::now();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (published, rate1, rate_n, t_n0, seen) = std::thread::scope(|s| {
        let handles: Vec<_> = subs
            .into_iter()
            .enumerate()
            .map(|(r, c)| {
                let tx = tx.clone();
                s.spawn(move || subscribe(r, c, expected, origin, t, &tx, prog))
            })
            .collect();
        drop(tx);
        let publ = publish(&mut publisher, p, origin, &pad, &rx, paths.len(), prog);
        drop(rx);
        let seen: Vec<Result<Seen>> = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow!("a subscriber thread panicked")))
            })
            .collect();
        let (a, b, c, d) = publ?;
        let seen = seen.into_iter().collect::<Result<Vec<_>>>()?;
        Ok::<_, anyhow::Error>((a, b, c, d, seen))
    })?;
    let mut lat = Vec::new();
    let mut last = 0u64;
    for (r, sn) in seen.iter().enumerate() {
        if sn.seqs != published {
            let got: HashSet<u64> = sn.seqs.iter().copied().collect();
            let missing = published.iter().filter(|q| !got.contains(q)).count();
            let why = if missing == 0 {
                "in a different order".to_string()
            } else {
                format!("{missing} missing")
            };
            bail!(
                "rank {r} received {} of the {} published events ({why})",
                sn.seqs.len(),
                published.len()
            );
        }
        let ph = |x: u8| -> Vec<f64> {
            sn.lat
                .iter()
                .filter(|(q, _)| *q == x)
                .map(|(_, ns)| *ns as f64 / 1e3)
                .collect()
        };
        let (l1, l2, l3) = (ph(1), ph(2), ph(3));
        let q = |v: &[f64], x| percentile(v, x).unwrap_or(f64::NAN);
        lat.push((q(&l1, 50.0), q(&l1, 99.0), q(&l2, 50.0), q(&l3, 50.0)));
        last = last.max(sn.last_ns);
    }
    let delivered_n = if p.rate_events > 0 {
        p.rate_events as f64 / ((last.saturating_sub(t_n0)) as f64 / 1e9)
    } else {
        f64::NAN
    };
    Ok(RunOut {
        rate1,
        rate_n,
        delivered_n,
        lat,
    })
}

/// Publish the three phases; returns the sequence numbers in order, the
/// window-1 and window-N rates and when phase 3 started (ns since the
/// origin). `delivered` gets one message per subscriber per phase-1 event.
fn publish(
    c: &mut Client,
    p: &EventParams,
    origin: Instant,
    pad: &[u8],
    delivered: &std::sync::mpsc::Receiver<()>,
    subscribers: usize,
    prog: &Progress,
) -> Result<(Vec<u64>, f64, f64, u64)> {
    let t = p.reply_timeout;
    let mut seqs = Vec::with_capacity((p.latency_events + p.rate1_events + p.rate_events) as usize);
    for i in 0..p.latency_events {
        let m = c.rpc("event.pub", 0, &stamp(1, origin, pad), t)?;
        seqs.push(seq_of(&m.payload)?);
        for _ in 0..subscribers {
            delivered
                .recv_timeout(t)
                .map_err(|_| anyhow!("event #{i} did not reach every subscriber within {t:?}"))?;
        }
        prog.tick();
    }
    let t0 = Instant::now();
    for _ in 0..p.rate1_events {
        let m = c.rpc("event.pub", 0, &stamp(2, origin, pad), t)?;
        seqs.push(seq_of(&m.payload)?);
        prog.tick();
    }
    let rate1 = p.rate1_events as f64 / t0.elapsed().as_secs_f64();
    // Phase 3: acks may come back in any order; keep them by tag.
    let total = p.rate_events as usize;
    let mut by_tag: std::collections::HashMap<u32, usize> = Default::default();
    let mut acked = vec![0u64; total];
    let (mut sent, mut done) = (0usize, 0usize);
    let t_n0 = origin.elapsed().as_nanos() as u64;
    let t1 = Instant::now();
    while done < total {
        while sent < total && by_tag.len() < p.window as usize {
            let tag = c.send("event.pub", 0, &stamp(3, origin, pad))?;
            by_tag.insert(tag, sent);
            sent += 1;
        }
        let m = c.recv(t)?;
        if m.header.msg_type != MsgType::Response {
            continue;
        }
        let Some(i) = by_tag.remove(&m.header.matchtag) else {
            continue;
        };
        if m.header.errnum != 0 {
            bail!(
                "event.pub failed: {}: {}",
                errno::name(m.header.errnum),
                String::from_utf8_lossy(&m.payload)
            );
        }
        acked[i] = seq_of(&m.payload)?;
        done += 1;
        prog.tick();
    }
    let rate_n = total as f64 / t1.elapsed().as_secs_f64();
    seqs.extend(acked);
    Ok((seqs, rate1, rate_n, t_n0))
}

fn seq_of(payload: &[u8]) -> Result<u64> {
    let b: [u8; 8] = payload.try_into().map_err(|_| {
        anyhow!(
            "event.pub answered {} bytes, not a sequence number",
            payload.len()
        )
    })?;
    Ok(u64::from_be_bytes(b))
}

fn subscribe(
    rank: usize,
    mut c: Stream,
    expected: usize,
    origin: Instant,
    t: Duration,
    delivered: &std::sync::mpsc::Sender<()>,
    prog: &Progress,
) -> Result<Seen> {
    let mut seen = Seen {
        seqs: Vec::with_capacity(expected),
        lat: Vec::with_capacity(expected),
        last_ns: 0,
    };
    while seen.seqs.len() < expected {
        let (header, payload) = match c.next_event(t) {
            Ok(m) => m,
            Err(e) => bail!(
                "rank {rank} received {} of {expected} events, then: {e}",
                seen.seqs.len()
            ),
        };
        let now = origin.elapsed().as_nanos() as u64;
        if header.topic != TOPIC || payload.len() < 9 {
            continue;
        }
        let sent = u64::from_be_bytes(payload[1..9].try_into().expect("8 bytes"));
        seen.seqs.push(header.seq);
        seen.lat.push((payload[0], now.saturating_sub(sent)));
        seen.last_ns = now;
        if payload[0] == 1 {
            let _ = delivered.send(());
        }
        prog.tick();
    }
    Ok(seen)
}

pub fn table(r: &EventReport) -> String {
    let p = &r.params;
    let mut s = format!(
        "event: `{TOPIC}` published at rank 0, one subscriber per rank; size {} fanout {}; \
         {} events one at a time, {} at window 1, {} at window {}; median over {} run(s) [min, max]\n",
        p.size, p.fanout, p.latency_events, p.rate1_events, p.rate_events, p.window, p.runs
    );
    let c = |x: &Summary| format!("{:.0} [{:.0}, {:.0}]", x.median, x.min, x.max);
    let _ = writeln!(s, "  publish rate, window 1:  {}/s", c(&r.rate_window_1));
    let _ = writeln!(
        s,
        "  publish rate, window {}: {}/s; all delivered on every rank: {}/s",
        p.window,
        c(&r.rate_window_n),
        c(&r.delivered_window_n)
    );
    let _ = writeln!(
        s,
        "  every rank received every event in order: {}",
        if r.all_received { "yes" } else { "NO" }
    );
    let _ = writeln!(
        s,
        "{:>6} {:>6}  {:>20} {:>20} {:>20} {:>22}",
        "rank",
        "depth",
        "p50 us (1 at a time)",
        "p99 us",
        "p50 us (window 1)",
        format!("p50 us (window {})", p.window)
    );
    for x in &r.ranks {
        let _ = writeln!(
            s,
            "{:>6} {:>6}  {:>20} {:>20} {:>20} {:>22}",
            x.rank,
            x.depth,
            c(&x.p50_us),
            c(&x.p99_us),
            c(&x.window1_p50_us),
            c(&x.loaded_p50_us)
        );
    }
    if !r.teardown.clean {
        let _ = writeln!(s, "warning: {}", r.teardown.describe());
    }
    s
}
