//! Scenario `service`: RPCs to a service offered by a *client*
//! (docs/protocol.md §6.1) next to `broker.ping`, in the same instance and
//! run.
//!
//! At each target rank an async Rust provider ([`AsyncClient::serve`], in
//! this process, on a tokio runtime of its own) offers `echo.echo` on that
//! rank's local connector. From rank 0's local connector, as in `rpc`, each
//! run measures `broker.ping` and then `echo.echo` at each rank: window-1
//! latency (p50, p99) and throughput with a window in flight. The extra
//! path of a client service is broker -> provider connection -> handler
//! task -> broker; the targets: p50 at most 25 us above `broker.ping` at
//! every depth, and window throughput at least 70% of `broker.ping`'s.
//!
//! On a small VM, a wake-up that lands on an idle vCPU costs tens of
//! microseconds, and the service path has two more of them than
//! `broker.ping`: `taskset -c 1 canopy-bench service` (everything on one
//! CPU) gives steadier, comparable figures.

use crate::instance::{Instance, Teardown};
use crate::rpc::{cell, measure, RpcParams, Sample, PING};
use crate::stats::{hops, Summary};
use anyhow::{anyhow, Context, Result};
use canopy_client::aio::{AsyncClient, Request};
use serde::Serialize;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

/// The echo service every provider offers.
pub const NAMESPACE: &str = "echo";
pub const TOPIC: &str = "echo.echo";
/// Targets, reported (not enforced).
pub const TARGET_P50_EXTRA_US: f64 = 25.0;
pub const TARGET_THROUGHPUT_RATIO: f64 = 0.70;

#[derive(Clone, Debug, Serialize)]
pub struct ServiceParams {
    #[serde(flatten)]
    pub rpc: RpcParams,
    /// Worker threads of the providers' tokio runtime; 0: a
    /// current-thread runtime (everything on the providers' one thread).
    pub provider_threads: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct Side {
    pub latency_p50_us: Summary,
    pub latency_p99_us: Summary,
    pub throughput_rps: Summary,
}

#[derive(Clone, Debug, Serialize)]
pub struct ServiceResult {
    pub rank: u32,
    pub hops: u32,
    pub pad: usize,
    /// `broker.ping`, measured in the same runs.
    pub ping: Side,
    /// `echo.echo`, served by a client on `rank`.
    pub service: Side,
    /// Median service p50 minus median ping p50, microseconds.
    pub p50_extra_us: f64,
    /// Median service throughput over median ping throughput.
    pub throughput_ratio: f64,
    /// Both targets met.
    pub targets_met: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct ServiceReport {
    pub params: ServiceParams,
    pub requests_per_throughput_run: u64,
    pub instance_start_s: f64,
    pub teardown: Teardown,
    pub target_p50_extra_us: f64,
    pub target_throughput_ratio: f64,
    pub results: Vec<ServiceResult>,
}

pub fn run(canopy: &Path, p: &ServiceParams) -> Result<ServiceReport> {
    let rp = &p.rpc;
    crate::rpc::validate(rp)?;
    let mut inst = Instance::start(
        canopy,
        rp.size,
        rp.fanout,
        rp.start_timeout,
        rp.rundir.as_deref(),
    )?;
    let uri0 = inst.uri(0);
    let uris: Vec<(u32, String)> = rp.ranks.iter().map(|&r| (r, inst.uri(r))).collect();
    let instance_start_s = inst.start_s;
    eprintln!(
        "service: {} brokers up in {instance_start_s:.3} s at {uri0}",
        rp.size
    );
    let stall = rp.reply_timeout + Duration::from_secs(5);
    let (samples, teardown) = inst.run(stall, |prog| {
        let providers = Providers::start(&uris, p.provider_threads, rp.reply_timeout)?;
        prog.tick();
        let r = measure(&uri0, &p.rpc, &[PING, TOPIC], "service", prog);
        providers.stop();
        r
    })?;

    let mut results = Vec::new();
    let n = rp.pads.len();
    for (i, &rank) in rp.ranks.iter().enumerate() {
        for (j, &pad) in rp.pads.iter().enumerate() {
            let side = |k: usize| -> Result<Side> {
                let runs: Vec<Sample> =
                    samples.iter().map(|run| run[(i * n + j) * 2 + k]).collect();
                let sum = |f: fn(&Sample) -> f64| {
                    Summary::of(runs.iter().map(f).collect()).ok_or_else(|| anyhow!("no runs"))
                };
                Ok(Side {
                    latency_p50_us: sum(|s| s.p50_us)?,
                    latency_p99_us: sum(|s| s.p99_us)?,
                    throughput_rps: sum(|s| s.rps)?,
                })
            };
            let (ping, service) = (side(0)?, side(1)?);
            let p50_extra_us = service.latency_p50_us.median - ping.latency_p50_us.median;
            let throughput_ratio =
                service.throughput_rps.median / ping.throughput_rps.median.max(f64::MIN_POSITIVE);
            results.push(ServiceResult {
                rank,
                hops: hops(rank, rp.fanout),
                pad,
                ping,
                service,
                p50_extra_us,
                throughput_ratio,
                targets_met: p50_extra_us <= TARGET_P50_EXTRA_US
                    && throughput_ratio >= TARGET_THROUGHPUT_RATIO,
            });
        }
    }
    Ok(ServiceReport {
        params: p.clone(),
        requests_per_throughput_run: rp.requests(),
        instance_start_s,
        teardown,
        target_p50_extra_us: TARGET_P50_EXTRA_US,
        target_throughput_ratio: TARGET_THROUGHPUT_RATIO,
        results,
    })
}

/// The echo providers, one per target rank, on a thread of their own
/// that drives their tokio runtime until [`Providers::stop`].
struct Providers {
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Providers {
    fn start(uris: &[(u32, String)], threads: usize, timeout: Duration) -> Result<Providers> {
        let rt = if threads == 0 {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
        } else {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .thread_name("echo-provider")
                .enable_all()
                .build()
        }
        .context("cannot start the providers' tokio runtime")?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let uris = uris.to_vec();
        let thread = std::thread::Builder::new()
            .name("echo-providers".into())
            .spawn(move || {
                rt.block_on(async move {
                    match start_providers(&uris, timeout).await {
                        Ok(clients) => {
                            let _ = ready_tx.send(Ok(()));
                            let _ = stop_rx.await;
                            // Dropped here: the connections close before
                            // the instance stops.
                            drop(clients);
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                });
                rt.shutdown_timeout(Duration::from_secs(2));
            })
            .context("cannot start the providers' thread")?;
        match ready_rx.recv_timeout(timeout + Duration::from_secs(5)) {
            Ok(Ok(())) => Ok(Providers { stop, thread }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(anyhow!(
                "the echo providers did not start within {timeout:?}"
            )),
        }
    }

    fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}

/// An echo provider on each target rank's local connector.
async fn start_providers(uris: &[(u32, String)], timeout: Duration) -> Result<Vec<AsyncClient>> {
    let mut out: Vec<AsyncClient> = Vec::new();
    for (rank, uri) in uris {
        let c = AsyncClient::connect(Some(uri))
            .await
            .with_context(|| format!("cannot connect a provider to rank {rank}"))?;
        let reg = tokio::time::timeout(
            timeout,
            c.serve(NAMESPACE, [("echo", "user")], |r: Request| async move {
                Ok(r.payload)
            }),
        )
        .await
        .map_err(|_| anyhow!("service.add on rank {rank}: no answer within {timeout:?}"))?
        .with_context(|| format!("cannot offer {NAMESPACE} on rank {rank}"))?;
        if reg.rank != *rank {
            return Err(anyhow!(
                "service.add on rank {rank}'s connector registered on rank {}",
                reg.rank
            ));
        }
        out.push(c);
    }
    Ok(out)
}

pub fn table(r: &ServiceReport) -> String {
    let p = &r.params.rpc;
    let mut s = format!(
        "service: {TOPIC} served by an async Rust client on the target rank, next to broker.ping, \
         from rank 0's local connector; `canopy start --size {} --fanout {}` (up in {:.3} s)\n\
         \x20    latency: {} sequential RPCs after {} warm-up; throughput: {} RPCs, {} in flight; \
         provider runtime: {}\n\
         \x20    median over {} run(s) [min, max]; targets: p50 <= ping + {TARGET_P50_EXTRA_US} us, \
         throughput >= {:.0}% of ping\n",
        p.size,
        p.fanout,
        r.instance_start_s,
        p.count,
        p.warmup,
        r.requests_per_throughput_run,
        p.window,
        match r.params.provider_threads {
            0 => "current-thread".to_string(),
            n => format!("{n} worker thread(s)"),
        },
        p.runs,
        TARGET_THROUGHPUT_RATIO * 100.0
    );
    let _ = writeln!(
        s,
        "{:>5} {:>4} {:>7} {:>8}  {:>24}  {:>24}  {:>24}",
        "rank", "hops", "pad", "topic", "p50 us", "p99 us", "req/s"
    );
    for x in &r.results {
        for (name, side) in [("ping", &x.ping), ("service", &x.service)] {
            let _ = writeln!(
                s,
                "{:>5} {:>4} {:>7} {:>8}  {:>24}  {:>24}  {:>24}",
                x.rank,
                x.hops,
                x.pad,
                name,
                cell(&side.latency_p50_us, 1),
                cell(&side.latency_p99_us, 1),
                cell(&side.throughput_rps, 0)
            );
        }
        let _ = writeln!(
            s,
            "{:>5} {:>4} {:>7} {:>8}  p50 +{:.1} us (target <= {TARGET_P50_EXTRA_US}), throughput {:.0}% of ping (target >= {:.0}%): {}",
            "",
            "",
            "",
            "",
            x.p50_extra_us,
            x.throughput_ratio * 100.0,
            TARGET_THROUGHPUT_RATIO * 100.0,
            if x.targets_met { "met" } else { "MISSED" }
        );
    }
    if !r.teardown.clean {
        let _ = writeln!(s, "warning: {}", r.teardown.describe());
    }
    s
}
