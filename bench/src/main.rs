//! `canopy-bench`: named, reproducible benchmarks of a canopy instance.
//!
//! Scenarios: `start` (launch-to-exit wall time per instance size), `rpc`
//! (`broker.ping` latency and throughput to chosen ranks of one instance),
//! `service` (the same for a service offered by an async Rust client,
//! next to `broker.ping`),
//! `event` (publish rate and one-way delivery latency on every rank),
//! `link` (one CURVE link against a raw libzmq pair), `memory` (broker
//! RSS idle and after routing), `acl` (policy decisions), `hostile`
//! (RSS and owner ping latency while hostile clients push at their
//! budgets) and `smoke`
//! (all of them, tiny, for CI). Each prints the machine and a table on
//! stdout, progress on stderr, and with `--json FILE` writes the results.
//! `report` turns the JSON in docs/bench into the table in
//! docs/performance.md and the SVG plots.
#![forbid(unsafe_code)]

mod acl;
mod event;
mod exec;
mod gss;
mod gssbind;
mod hostile;
mod instance;
mod link;
mod machine;
mod memory;
mod report;
mod rpc;
mod service;
mod start;
mod stats;
mod wire;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use machine::Machine;
use serde::Serialize;
use stats::{parse_pads, parse_ranks, parse_sizes, List};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Named, reproducible benchmarks of a canopy instance.
#[derive(Debug, Parser)]
#[command(name = "canopy-bench", version, about)]
struct Cli {
    /// The canopy binary (default: `canopy` next to this executable).
    #[arg(long, global = true, value_name = "PATH")]
    canopy: Option<PathBuf>,
    /// Also write the results as JSON to FILE.
    #[arg(long, global = true, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Directory in which to make the instances' runtime directories
    /// (default: where `canopy start` would, $XDG_RUNTIME_DIR or the temp dir).
    #[arg(long, global = true, value_name = "DIR")]
    rundir: Option<PathBuf>,
    /// Seconds an instance may take to come up (passed to `canopy start
    /// --timeout`; the benchmark gives up 10 s later).
    #[arg(long, global = true, default_value_t = 60.0, value_name = "SECS")]
    timeout: f64,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Wall time of `canopy start --size N -- true` (spawn to exit) per N.
    Start(StartArgs),
    /// broker.ping latency (window 1: p50, p99) and throughput (a window
    /// in flight) from rank 0's local connector to each target rank.
    Rpc(RpcArgs),
    /// Latency and throughput of a service offered by an async Rust client
    /// (echo.echo) at each target rank, next to broker.ping in the same
    /// runs; reports the targets (p50 <= ping + 25 us, throughput >= 70%).
    Service(ServiceArgs),
    /// ACL decisions per second for a synthetic policy of N rules (the
    /// engine behind the ZAP handler; no broker needed).
    Acl(AclArgs),
    /// Event publish rate (window 1 and a larger window) and one-way
    /// latency from publish to delivery on every rank.
    Event(EventArgs),
    /// One-way messages/s and bytes/s over one CURVE link between two
    /// brokers, against a raw libzmq DEALER->ROUTER pair with CURVE.
    Link(LinkArgs),
    /// Broker RSS when idle and after rounds of routed messages.
    Memory(MemoryArgs),
    /// Rank 0's RSS while hostile local clients (a uid each, needs root)
    /// push at their budgets, and the owner's ping p50/p99 during the
    /// attack against without it.
    Hostile(HostileArgs),
    /// Wall time of `canopy exec -n -r all true` per instance size,
    /// against the targets (10 ms at 8, 45 ms at 64, 1.5 s at 1,024).
    Exec(ExecArgs),
    /// Every scenario with tiny parameters; non-zero exit if anything
    /// fails. No timing assertions.
    Smoke,
    /// Regenerate the table in docs/performance.md and the SVG plots from
    /// the JSON results (no measurement).
    Report(report::ReportArgs),
}

#[derive(Debug, Args)]
struct EventArgs {
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    size: u32,
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    fanout: u32,
    /// Events published one at a time, each once the previous one has
    /// reached every rank (latency).
    #[arg(long, default_value_t = 1000)]
    latency_events: u32,
    /// Events published at window 1 (rate).
    #[arg(long, default_value_t = 2000)]
    rate1_events: u32,
    /// Events published with --window in flight (rate).
    #[arg(long, default_value_t = 20000)]
    rate_events: u32,
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    window: u32,
    /// Payload bytes beyond the 9-byte time stamp.
    #[arg(long, default_value_t = 0)]
    pad: usize,
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    reply_timeout: f64,
}

#[derive(Debug, Args)]
struct LinkArgs {
    /// Payload sizes in bytes, comma-separated.
    #[arg(long, default_value = "0,64,1024,4096,16384,65536", value_parser = parse_pads)]
    pad: List<usize>,
    /// Bytes per measurement (payload + 100 per message); sets the count.
    #[arg(long, default_value_t = 256 << 20)]
    budget: u64,
    /// Fewest and most messages per measurement.
    #[arg(long, default_value_t = 2000)]
    min_messages: u64,
    #[arg(long, default_value_t = 200_000)]
    max_messages: u64,
    /// One-way messages between synchronous echoes.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    batch: u32,
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    reply_timeout: f64,
}

#[derive(Debug, Args)]
struct MemoryArgs {
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(2..))]
    size: u32,
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    fanout: u32,
    /// One-way messages per round, rank 0 to the last rank.
    #[arg(long, default_value_t = 1_000_000)]
    messages: u64,
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    #[arg(long, default_value_t = 0)]
    pad: usize,
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    batch: u32,
    /// Idle seconds before each reading.
    #[arg(long, default_value_t = 1.0, value_name = "SECS")]
    settle: f64,
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    reply_timeout: f64,
}

#[derive(Debug, Args)]
struct HostileArgs {
    /// Hostile clients, each a uid of its own.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    clients: u32,
    /// Pings each sends without reading the replies.
    #[arg(long, default_value_t = 40)]
    pings: u32,
    /// Payload bytes of each ping.
    #[arg(long, default_value_t = 1 << 20)]
    pad: usize,
    /// Owner pings timed with and without the attack.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    owner_pings: u32,
    /// Seconds the hostile clients hold their connections unread.
    #[arg(long, default_value_t = 5.0, value_name = "SECS")]
    hold: f64,
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
}

fn hostile_params(cli: &Cli, a: &HostileArgs) -> Result<hostile::HostileParams> {
    Ok(hostile::HostileParams {
        clients: a.clients,
        pings: a.pings,
        pad: a.pad,
        owner_pings: a.owner_pings,
        hold: secs(a.hold, "--hold")?,
        runs: a.runs,
        start_timeout: secs(cli.timeout, "--timeout")?,
        rundir: cli.rundir.clone(),
    })
}

#[derive(Debug, Args)]
struct AclArgs {
    /// Rules in the synthetic policy.
    #[arg(long, default_value_t = 1000)]
    rules: usize,
    /// Decisions timed per run.
    #[arg(long, default_value_t = 200_000)]
    decisions: usize,
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
}

#[derive(Debug, Args)]
struct StartArgs {
    /// Instance sizes, comma-separated.
    #[arg(long, default_value = "1,2,4,8,16,64", value_parser = parse_sizes)]
    sizes: List<u32>,
    /// Measured runs per size.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    fanout: u32,
    /// Unrecorded sweeps over all sizes first (cold caches).
    #[arg(long, default_value_t = 1)]
    warmup: u32,
}

#[derive(Debug, Args)]
struct ExecArgs {
    /// Instance sizes, comma-separated.
    #[arg(long, default_value = "8,64,1024", value_parser = parse_sizes)]
    sizes: List<u32>,
    /// Measured runs per size.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    fanout: u32,
    /// Unrecorded runs per size first.
    #[arg(long, default_value_t = 3)]
    warmup: u32,
    /// Also measure size 8 through this canopy-imp, installed setuid root
    /// for brokers running as an unprivileged user (root only).
    #[arg(long, value_name = "PATH")]
    helper: Option<PathBuf>,
}

fn exec_params(cli: &Cli, a: &ExecArgs) -> Result<exec::ExecParams> {
    Ok(exec::ExecParams {
        sizes: a.sizes.0.clone(),
        fanout: a.fanout,
        runs: a.runs,
        warmup: a.warmup,
        start_timeout: secs(cli.timeout, "--timeout")?,
        rundir: cli.rundir.clone(),
        helper: a.helper.clone(),
    })
}

#[derive(Debug, Args)]
struct RpcArgs {
    /// Brokers in the instance.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    size: u32,
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    fanout: u32,
    /// Target ranks, comma-separated.
    #[arg(long, default_value = "0,1,7", value_parser = parse_ranks)]
    ranks: List<u32>,
    /// Timed sequential RPCs per run; the throughput phase sends 5x this.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..))]
    count: u32,
    /// Untimed sequential RPCs before the timed ones.
    #[arg(long, default_value_t = 200)]
    warmup: u32,
    /// Requests kept in flight in the throughput phase.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    window: u32,
    /// Payload bytes; a comma-separated list measures each (e.g. 0,1024,65536).
    #[arg(long, default_value = "0", value_parser = parse_pads)]
    pad: List<usize>,
    /// Runs (a fresh client connection each, same instance).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    /// Seconds to wait for any one reply.
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    reply_timeout: f64,
}

#[derive(Debug, Args)]
struct ServiceArgs {
    #[command(flatten)]
    rpc: RpcArgs,
    /// Worker threads of the echo providers' tokio runtime; 0: a
    /// current-thread runtime.
    #[arg(long, default_value_t = 1)]
    provider_threads: u32,
}

#[derive(Serialize)]
struct Report<'a> {
    tool: &'static str,
    version: &'static str,
    scenario: &'static str,
    timestamp_unix: u64,
    canopy: String,
    machine: &'a Machine,
    #[serde(skip_serializing_if = "Option::is_none")]
    start: Option<start::StartReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rpc: Option<rpc::RpcReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    service: Option<service::ServiceReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    acl: Option<acl::AclReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    event: Option<event::EventReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    link: Option<link::LinkReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    memory: Option<memory::MemoryReport>,
    /// Results of scenarios without a field here, by name (see [`extra`]).
    #[serde(flatten)]
    extra: std::collections::BTreeMap<&'static str, serde_json::Value>,
    /// The directory the instances' runtime directories were made in,
    /// and its file system.
    rundir: String,
    rundir_fs: String,
    /// /proc/loadavg when the scenario finished (`machine.loadavg` is at
    /// its start): a busy machine shows here.
    loadavg_end: String,
    /// Wall time of the whole scenario, seconds.
    duration_s: f64,
    /// Failures (smoke only: it reports what completed before failing).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    errors: Vec<String>,
}

fn secs(s: f64, what: &str) -> Result<Duration> {
    Duration::try_from_secs_f64(s)
        .with_context(|| format!("{what} must be a non-negative number of seconds"))
}

fn find_canopy(explicit: Option<&Path>) -> Result<PathBuf> {
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None => std::env::current_exe()
            .context("cannot find this executable")?
            .with_file_name("canopy"),
    };
    if !path.is_file() {
        bail!(
            "no canopy binary at {}; build it (cargo build --release -p canopy-broker) or pass --canopy PATH",
            path.display()
        );
    }
    Ok(path)
}

fn start_params(cli: &Cli, a: &StartArgs) -> Result<start::StartParams> {
    Ok(start::StartParams {
        sizes: a.sizes.0.clone(),
        fanout: a.fanout,
        runs: a.runs,
        warmup: a.warmup,
        timeout: secs(cli.timeout, "--timeout")?,
        rundir: cli.rundir.clone(),
    })
}

fn rpc_params(cli: &Cli, a: &RpcArgs) -> Result<rpc::RpcParams> {
    let p = rpc::RpcParams {
        size: a.size,
        fanout: a.fanout,
        ranks: a.ranks.0.clone(),
        pads: a.pad.0.clone(),
        count: a.count,
        warmup: a.warmup,
        window: a.window,
        runs: a.runs,
        reply_timeout: secs(a.reply_timeout, "--reply-timeout")?,
        start_timeout: secs(cli.timeout, "--timeout")?,
        rundir: cli.rundir.clone(),
    };
    rpc::validate(&p)?;
    Ok(p)
}

fn service_params(cli: &Cli, a: &ServiceArgs) -> Result<service::ServiceParams> {
    Ok(service::ServiceParams {
        rpc: rpc_params(cli, &a.rpc)?,
        provider_threads: a.provider_threads as usize,
    })
}

fn event_params(cli: &Cli, a: &EventArgs) -> Result<event::EventParams> {
    Ok(event::EventParams {
        size: a.size,
        fanout: a.fanout,
        latency_events: a.latency_events,
        rate1_events: a.rate1_events,
        rate_events: a.rate_events,
        window: a.window,
        pad: a.pad,
        runs: a.runs,
        reply_timeout: secs(a.reply_timeout, "--reply-timeout")?,
        start_timeout: secs(cli.timeout, "--timeout")?,
        rundir: cli.rundir.clone(),
    })
}

fn link_params(cli: &Cli, a: &LinkArgs) -> Result<link::LinkParams> {
    if a.min_messages > a.max_messages {
        bail!("--min-messages must not exceed --max-messages");
    }
    Ok(link::LinkParams {
        pads: a.pad.0.clone(),
        budget_bytes: a.budget,
        min_messages: a.min_messages,
        max_messages: a.max_messages,
        batch: a.batch,
        runs: a.runs,
        reply_timeout: secs(a.reply_timeout, "--reply-timeout")?,
        start_timeout: secs(cli.timeout, "--timeout")?,
        rundir: cli.rundir.clone(),
    })
}

fn memory_params(cli: &Cli, a: &MemoryArgs) -> Result<memory::MemoryParams> {
    Ok(memory::MemoryParams {
        size: a.size,
        fanout: a.fanout,
        messages: a.messages,
        rounds: a.rounds,
        pad: a.pad,
        batch: a.batch,
        settle: secs(a.settle, "--settle")?,
        reply_timeout: secs(a.reply_timeout, "--reply-timeout")?,
        start_timeout: secs(cli.timeout, "--timeout")?,
        rundir: cli.rundir.clone(),
    })
}

/// Every scenario's parameters for `smoke`: tiny, one run each.
struct SmokeParams {
    start: start::StartParams,
    exec: exec::ExecParams,
    rpc: rpc::RpcParams,
    service: service::ServiceParams,
    event: event::EventParams,
    link: link::LinkParams,
    memory: memory::MemoryParams,
    hostile: hostile::HostileParams,
}

fn smoke_params(cli: &Cli) -> Result<SmokeParams> {
    Ok(SmokeParams {
        exec: exec_params(
            cli,
            &ExecArgs {
                sizes: List(vec![2]),
                runs: 2,
                fanout: 2,
                warmup: 1,
                helper: None,
            },
        )?,
        start: start_params(
            cli,
            &StartArgs {
                sizes: List(vec![1, 2]),
                runs: 1,
                fanout: 2,
                warmup: 0,
            },
        )?,
        rpc: rpc_params(
            cli,
            &RpcArgs {
                size: 2,
                fanout: 2,
                ranks: List(vec![0, 1]),
                count: 50,
                warmup: 10,
                window: 8,
                pad: List(vec![0, 1024]),
                runs: 1,
                reply_timeout: 10.0,
            },
        )?,
        service: service_params(
            cli,
            &ServiceArgs {
                rpc: RpcArgs {
                    size: 2,
                    fanout: 2,
                    ranks: List(vec![0, 1]),
                    count: 50,
                    warmup: 10,
                    window: 8,
                    pad: List(vec![0]),
                    runs: 1,
                    reply_timeout: 10.0,
                },
                provider_threads: 1,
            },
        )?,
        event: event_params(
            cli,
            &EventArgs {
                size: 4,
                fanout: 2,
                latency_events: 20,
                rate1_events: 50,
                rate_events: 200,
                window: 8,
                pad: 0,
                runs: 1,
                reply_timeout: 10.0,
            },
        )?,
        link: link_params(
            cli,
            &LinkArgs {
                pad: List(vec![0, 4096]),
                budget: 1 << 20,
                min_messages: 100,
                max_messages: 2000,
                batch: 64,
                runs: 1,
                reply_timeout: 10.0,
            },
        )?,
        memory: memory_params(
            cli,
            &MemoryArgs {
                size: 3,
                fanout: 2,
                messages: 2000,
                rounds: 1,
                pad: 0,
                batch: 64,
                settle: 0.1,
                reply_timeout: 10.0,
            },
        )?,
        hostile: hostile_params(
            cli,
            &HostileArgs {
                clients: 4,
                pings: 40,
                pad: 1 << 20,
                owner_pings: 50,
                hold: 1.0,
                runs: 1,
            },
        )?,
    })
}

/// Smoke checks that results exist and are sane numbers, not how fast.
fn check_smoke(r: &Report) -> Result<()> {
    let ok = |x: &stats::Summary| x.samples.iter().all(|v| v.is_finite() && *v > 0.0);
    if let Some(s) = &r.start {
        if s.results.len() != s.params.sizes.len() || !s.results.iter().all(|x| ok(&x.wall_s)) {
            bail!("start: missing or invalid results");
        }
    }
    if let Some(e) = r.extra.get("exec") {
        let n = e["results"].as_array().map_or(0, Vec::len);
        let good = e["results"].as_array().is_some_and(|v| {
            v.iter()
                .all(|x| x["wall_ms"]["median"].as_f64().is_some_and(|m| m > 0.0))
        });
        if n != e["params"]["sizes"].as_array().map_or(0, Vec::len) || !good {
            bail!("exec: missing or invalid results");
        }
    }
    if let Some(r) = &r.rpc {
        if r.results.len() != r.params.ranks.len() * r.params.pads.len()
            || !r
                .results
                .iter()
                .all(|x| ok(&x.latency_p50_us) && ok(&x.latency_p99_us) && ok(&x.throughput_rps))
        {
            bail!("rpc: missing or invalid results");
        }
    }
    if let Some(r) = &r.service {
        let side_ok = |x: &service::Side| {
            ok(&x.latency_p50_us) && ok(&x.latency_p99_us) && ok(&x.throughput_rps)
        };
        if r.results.len() != r.params.rpc.ranks.len() * r.params.rpc.pads.len()
            || !r
                .results
                .iter()
                .all(|x| side_ok(&x.ping) && side_ok(&x.service))
        {
            bail!("service: missing or invalid results");
        }
    }
    if let Some(e) = &r.event {
        if !e.all_received
            || e.ranks.len() != e.params.size as usize
            || !ok(&e.rate_window_1)
            || !ok(&e.rate_window_n)
            || !e.ranks.iter().all(|x| ok(&x.p50_us))
        {
            bail!("event: missing or invalid results");
        }
    }
    if let Some(l) = &r.link {
        if l.results.len() != l.params.pads.len()
            || !l
                .results
                .iter()
                .all(|x| ok(&x.raw_msgs_per_s) && ok(&x.broker_msgs_per_s))
        {
            bail!("link: missing or invalid results");
        }
    }
    if let Some(m) = &r.memory {
        if m.brokers.len() != m.params.size as usize || m.max_idle_kib == 0 {
            bail!("memory: missing or invalid results");
        }
    }
    let teardowns = [
        ("rpc", r.rpc.as_ref().map(|x| &x.teardown)),
        ("service", r.service.as_ref().map(|x| &x.teardown)),
        ("event", r.event.as_ref().map(|x| &x.teardown)),
        ("link", r.link.as_ref().map(|x| &x.teardown)),
        ("memory", r.memory.as_ref().map(|x| &x.teardown)),
    ];
    for (name, t) in teardowns {
        if let Some(t) = t.filter(|t| !t.clean) {
            bail!("{name}: {}", t.describe());
        }
    }
    Ok(())
}

fn main() {
    if let Some(code) = gss::run_if_requested() {
        std::process::exit(code);
    }
    if let Some(code) = gssbind::run_if_requested() {
        std::process::exit(code);
    }
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => {}
        Err(e) => {
            eprintln!("canopy-bench: error: {e:#}");
            std::process::exit(1);
        }
    }
}

/// Run one scenario, print its table and keep its result (or, with
/// `keep_going`, its error) in `report`.
fn scenario<T>(
    report: &mut Report,
    name: &str,
    keep_going: bool,
    f: impl FnOnce() -> Result<T>,
    table: impl FnOnce(&T) -> String,
    put: impl FnOnce(&mut Report, T),
) -> Result<()> {
    match f() {
        Ok(r) => {
            println!("{}", table(&r));
            put(report, r);
            Ok(())
        }
        Err(e) if keep_going => {
            eprintln!("canopy-bench: {name}: {e:#}");
            report.errors.push(format!("{name}: {e:#}"));
            Ok(())
        }
        Err(e) => Err(e),
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// What a scenario does, given the report to fill and the canopy binary.
type Body<'a> = Box<dyn FnOnce(&mut Report, &Path) -> Result<()> + 'a>;

/// For [`scenario`]'s `put`: keep a result that has no field of its own in
/// [`Report`] (a scenario added later) in the JSON under `name`.
fn extra<T: Serialize>(name: &'static str) -> impl FnOnce(&mut Report, T) {
    move |r, x| match serde_json::to_value(x) {
        Ok(v) => {
            r.extra.insert(name, v);
        }
        Err(e) => r
            .errors
            .push(format!("{name}: cannot record the result: {e}")),
    }
}

fn run(cli: &Cli) -> Result<()> {
    // Each scenario: its name, whether it needs the canopy binary, and
    // what it does. To add one, add a `Cmd` variant and an arm, e.g.
    //   Cmd::Gss(a) => ("gss", true, Box::new(move |r, c| {
    //       scenario(r, "gss", false, || gss::run(c, a), gss::table, extra("gss"))
    //   })),
    let (name, needs_canopy, body): (&'static str, bool, Body) = match &cli.cmd {
        Cmd::Report(a) => return report::run(a),
        Cmd::Start(a) => {
            let p = start_params(cli, a)?;
            (
                "start",
                true,
                Box::new(move |r, c| {
                    scenario(
                        r,
                        "start",
                        false,
                        || start::run(c, &p),
                        start::table,
                        |r, x| r.start = Some(x),
                    )
                }),
            )
        }
        Cmd::Rpc(a) => {
            let p = rpc_params(cli, a)?;
            (
                "rpc",
                true,
                Box::new(move |r, c| {
                    scenario(
                        r,
                        "rpc",
                        false,
                        || rpc::run(c, &p),
                        rpc::table,
                        |r, x| r.rpc = Some(x),
                    )
                }),
            )
        }
        Cmd::Service(a) => {
            let p = service_params(cli, a)?;
            (
                "service",
                true,
                Box::new(move |r, c| {
                    scenario(
                        r,
                        "service",
                        false,
                        || service::run(c, &p),
                        service::table,
                        |r, x| r.service = Some(x),
                    )
                }),
            )
        }
        Cmd::Acl(a) => {
            let p = acl::AclParams {
                rules: a.rules,
                decisions: a.decisions,
                runs: a.runs,
            };
            (
                "acl",
                false,
                Box::new(move |r, _| {
                    scenario(
                        r,
                        "acl",
                        false,
                        || acl::run(&p),
                        acl::table,
                        |r, x| r.acl = Some(x),
                    )
                }),
            )
        }
        Cmd::Event(a) => {
            let p = event_params(cli, a)?;
            (
                "event",
                true,
                Box::new(move |r, c| {
                    scenario(
                        r,
                        "event",
                        false,
                        || event::run(c, &p),
                        event::table,
                        |r, x| r.event = Some(x),
                    )
                }),
            )
        }
        Cmd::Link(a) => {
            let p = link_params(cli, a)?;
            (
                "link",
                true,
                Box::new(move |r, c| {
                    scenario(
                        r,
                        "link",
                        false,
                        || link::run(c, &p),
                        link::table,
                        |r, x| r.link = Some(x),
                    )
                }),
            )
        }
        Cmd::Memory(a) => {
            let p = memory_params(cli, a)?;
            (
                "memory",
                true,
                Box::new(move |r, c| {
                    scenario(
                        r,
                        "memory",
                        false,
                        || memory::run(c, &p),
                        memory::table,
                        |r, x| r.memory = Some(x),
                    )
                }),
            )
        }
        Cmd::Hostile(a) => {
            let p = hostile_params(cli, a)?;
            (
                "hostile",
                true,
                Box::new(move |r, c| {
                    scenario(
                        r,
                        "hostile",
                        false,
                        || hostile::run(c, &p),
                        hostile::table,
                        extra("hostile"),
                    )
                }),
            )
        }
        Cmd::Exec(a) => {
            let p = exec_params(cli, a)?;
            (
                "exec",
                true,
                Box::new(move |r, c| {
                    scenario(
                        r,
                        "exec",
                        false,
                        || exec::run(c, &p),
                        exec::table,
                        extra("exec"),
                    )
                }),
            )
        }
        Cmd::Smoke => {
            let sp = smoke_params(cli)?;
            ("smoke", true, Box::new(move |r, c| smoke(r, c, &sp)))
        }
    };
    measure(cli, name, needs_canopy, body)
}

/// Every scenario, tiny; failures are collected, not fatal.
fn smoke(r: &mut Report, c: &Path, sp: &SmokeParams) -> Result<()> {
    let ap = acl::AclParams {
        rules: 100,
        decisions: 1000,
        runs: 1,
    };
    scenario(
        r,
        "acl",
        true,
        || acl::run(&ap),
        acl::table,
        |r, x| r.acl = Some(x),
    )?;
    scenario(
        r,
        "start",
        true,
        || start::run(c, &sp.start),
        start::table,
        |r, x| r.start = Some(x),
    )?;
    scenario(
        r,
        "exec",
        true,
        || exec::run(c, &sp.exec),
        exec::table,
        extra("exec"),
    )?;
    scenario(
        r,
        "rpc",
        true,
        || rpc::run(c, &sp.rpc),
        rpc::table,
        |r, x| r.rpc = Some(x),
    )?;
    scenario(
        r,
        "service",
        true,
        || service::run(c, &sp.service),
        service::table,
        |r, x| r.service = Some(x),
    )?;
    scenario(
        r,
        "event",
        true,
        || event::run(c, &sp.event),
        event::table,
        |r, x| r.event = Some(x),
    )?;
    scenario(
        r,
        "link",
        true,
        || link::run(c, &sp.link),
        link::table,
        |r, x| r.link = Some(x),
    )?;
    scenario(
        r,
        "memory",
        true,
        || memory::run(c, &sp.memory),
        memory::table,
        |r, x| r.memory = Some(x),
    )?;
    // Other uids need root: elsewhere the scenario is skipped, not failed.
    if nix::unistd::geteuid().is_root() {
        scenario(
            r,
            "hostile",
            true,
            || hostile::run(c, &sp.hostile),
            hostile::table,
            extra("hostile"),
        )?;
    } else {
        eprintln!("canopy-bench: smoke: hostile skipped: needs root to run clients as other uids");
    }
    if let Err(e) = check_smoke(r) {
        r.errors.push(format!("{e:#}"));
    }
    Ok(())
}

/// Print the machine, run `body`, print and (with --json) write the report.
fn measure(cli: &Cli, name: &'static str, needs_canopy: bool, body: Body) -> Result<()> {
    let canopy = if needs_canopy {
        find_canopy(cli.canopy.as_deref())?
    } else {
        PathBuf::from("-")
    };
    instance::stop_instances_on_signals()?;
    let machine = Machine::probe();
    println!(
        "canopy-bench {} scenario {name}; canopy {}",
        env!("CARGO_PKG_VERSION"),
        canopy.display()
    );
    println!("{}\n", machine.describe());
    let rundir = cli.rundir.clone().unwrap_or_else(instance::default_parent);
    if needs_canopy {
        println!(
            "instances in {} ({})",
            rundir.display(),
            instance::fs_kind(&rundir)
        );
    }
    let t0 = std::time::Instant::now();
    let mut report = Report {
        tool: "canopy-bench",
        version: env!("CARGO_PKG_VERSION"),
        scenario: name,
        timestamp_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        canopy: canopy.display().to_string(),
        machine: &machine,
        start: None,
        rpc: None,
        service: None,
        acl: None,
        event: None,
        link: None,
        memory: None,
        extra: Default::default(),
        rundir: rundir.display().to_string(),
        rundir_fs: instance::fs_kind(&rundir),
        loadavg_end: String::new(),
        duration_s: 0.0,
        errors: Vec::new(),
    };
    body(&mut report, &canopy)?;
    report.loadavg_end = loadavg();
    report.duration_s = t0.elapsed().as_secs_f64();
    println!(
        "loadavg at start {}, at end {}; {:.1} s",
        machine.loadavg, report.loadavg_end, report.duration_s
    );
    if let Some(path) = &cli.json {
        let text = serde_json::to_string_pretty(&report)? + "\n";
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("canopy-bench: wrote {}", path.display());
    }
    if !report.errors.is_empty() {
        bail!("{}", report.errors.join("; "));
    }
    if name == "smoke" {
        println!("\nsmoke: ok");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("canopy-bench").chain(args.iter().copied()))
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn start_defaults_and_lists() {
        let c = parse(&["start"]).unwrap();
        let Cmd::Start(a) = &c.cmd else { panic!() };
        assert_eq!(a.sizes.0, vec![1, 2, 4, 8, 16, 64]);
        assert_eq!((a.runs, a.fanout), (5, 2));
        let c = parse(&[
            "start", "--sizes", "1,8", "--runs", "3", "--json", "/x.json",
        ])
        .unwrap();
        let Cmd::Start(a) = &c.cmd else { panic!() };
        assert_eq!(a.sizes.0, vec![1, 8]);
        assert_eq!(a.runs, 3);
        assert_eq!(c.json.as_deref(), Some(Path::new("/x.json")));
        assert!(parse(&["start", "--sizes", "1,0"]).is_err());
        assert!(parse(&["start", "--sizes", ""]).is_err());
        assert!(parse(&["start", "--runs", "0"]).is_err());
    }

    #[test]
    fn rpc_defaults_and_validation() {
        let c = parse(&["rpc"]).unwrap();
        let Cmd::Rpc(a) = &c.cmd else { panic!() };
        assert_eq!((a.size, a.fanout, a.count, a.window), (8, 2, 2000, 64));
        assert_eq!(a.ranks.0, vec![0, 1, 7]);
        assert_eq!(a.pad.0, vec![0]);
        let p = rpc_params(&c, a).unwrap();
        assert_eq!(p.requests(), 10_000);
        let c = parse(&["rpc", "--size", "4", "--ranks", "0,4"]).unwrap();
        let Cmd::Rpc(a) = &c.cmd else { panic!() };
        assert!(rpc_params(&c, a)
            .unwrap_err()
            .to_string()
            .contains("rank 4"));
        let c = parse(&["rpc", "--pad", "0,1024,65536"]).unwrap();
        let Cmd::Rpc(a) = &c.cmd else { panic!() };
        assert_eq!(a.pad.0, vec![0, 1024, 65536]);
        assert!(parse(&["rpc", "--window", "0"]).is_err());
        let c = parse(&["rpc", "--reply-timeout=-1"]).unwrap();
        let Cmd::Rpc(a) = &c.cmd else { panic!() };
        assert!(rpc_params(&c, a).is_err());
    }

    #[test]
    fn service_defaults_match_rpc() {
        let c = parse(&["service"]).unwrap();
        let Cmd::Service(a) = &c.cmd else { panic!() };
        let p = service_params(&c, a).unwrap();
        assert_eq!(p.rpc.ranks, vec![0, 1, 7]);
        assert_eq!((p.rpc.size, p.rpc.window, p.provider_threads), (8, 64, 1));
        let c = parse(&["service", "--size", "4", "--ranks", "0,9"]).unwrap();
        let Cmd::Service(a) = &c.cmd else { panic!() };
        assert!(service_params(&c, a).is_err());
    }

    #[test]
    fn smoke_is_tiny() {
        let c = parse(&["smoke"]).unwrap();
        let p = smoke_params(&c).unwrap();
        assert_eq!((p.start.sizes.clone(), p.start.runs), (vec![1, 2], 1));
        assert_eq!((p.rpc.count, p.rpc.runs), (50, 1));
        assert_eq!((p.service.rpc.count, p.service.rpc.runs), (50, 1));
        assert_eq!(p.event.runs, 1);
        assert!(p.link.messages(0) <= 2000 && p.memory.messages <= 2000);
    }

    #[test]
    fn extra_results_go_into_the_json_by_name() {
        let m = Machine::probe();
        let mut r = Report {
            tool: "canopy-bench",
            version: "0",
            scenario: "x",
            timestamp_unix: 0,
            canopy: String::new(),
            machine: &m,
            start: None,
            rpc: None,
            service: None,
            acl: None,
            event: None,
            link: None,
            memory: None,
            extra: Default::default(),
            rundir: String::new(),
            rundir_fs: String::new(),
            loadavg_end: String::new(),
            duration_s: 0.0,
            errors: Vec::new(),
        };
        scenario(
            &mut r,
            "gss",
            false,
            || Ok(vec![1, 2]),
            |_| String::new(),
            extra("gss"),
        )
        .unwrap();
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["gss"], serde_json::json!([1, 2]));
        assert!(v.get("start").is_none());
    }

    #[test]
    fn missing_canopy_is_explained() {
        let e = find_canopy(Some(Path::new("/nonexistent/canopy"))).unwrap_err();
        assert!(e.to_string().contains("--canopy"), "{e}");
    }
}
