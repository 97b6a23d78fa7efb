//! `canopy-bench`: named, reproducible benchmarks of a canopy instance.
//!
//! Scenarios: `start` (launch-to-exit wall time per instance size), `rpc`
//! (`broker.ping` latency and throughput to chosen ranks of one instance)
//! and `smoke` (both, tiny, for CI). Each prints the machine and a table on
//! stdout, progress on stderr, and with `--json FILE` writes the results.
#![forbid(unsafe_code)]

mod acl;
mod gss;
mod instance;
mod machine;
mod rpc;
mod start;
mod stats;

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
    /// ACL decisions per second for a synthetic policy of N rules (the
    /// engine behind the ZAP handler; no broker needed).
    Acl(AclArgs),
    /// Every scenario with tiny parameters; non-zero exit if anything
    /// fails. No timing assertions.
    Smoke,
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
    acl: Option<acl::AclReport>,
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

/// The smoke parameters: sizes 1,2; count 50; one run.
fn smoke_params(cli: &Cli) -> Result<(start::StartParams, rpc::RpcParams)> {
    let s = start_params(
        cli,
        &StartArgs {
            sizes: List(vec![1, 2]),
            runs: 1,
            fanout: 2,
            warmup: 0,
        },
    )?;
    let r = rpc_params(
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
    )?;
    Ok((s, r))
}

/// Smoke checks that results exist and are sane numbers, not how fast.
fn check_smoke(s: &start::StartReport, r: &rpc::RpcReport) -> Result<()> {
    let ok = |x: &stats::Summary| x.samples.iter().all(|v| v.is_finite() && *v > 0.0);
    if s.results.len() != s.params.sizes.len() || !s.results.iter().all(|x| ok(&x.wall_s)) {
        bail!("start: missing or invalid results");
    }
    if r.results.len() != r.params.ranks.len() * r.params.pads.len()
        || !r
            .results
            .iter()
            .all(|x| ok(&x.latency_p50_us) && ok(&x.latency_p99_us) && ok(&x.throughput_rps))
    {
        bail!("rpc: missing or invalid results");
    }
    if !r.teardown.clean {
        bail!("rpc: {}", r.teardown.describe());
    }
    Ok(())
}

fn main() {
    if let Some(code) = gss::run_if_requested() {
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

fn run(cli: &Cli) -> Result<()> {
    let canopy = find_canopy(cli.canopy.as_deref())?;
    let machine = Machine::probe();
    let scenario = match cli.cmd {
        Cmd::Start(_) => "start",
        Cmd::Rpc(_) => "rpc",
        Cmd::Acl(_) => "acl",
        Cmd::Smoke => "smoke",
    };
    println!(
        "canopy-bench {} scenario {scenario}; canopy {}",
        env!("CARGO_PKG_VERSION"),
        canopy.display()
    );
    println!("{}\n", machine.describe());
    let mut report = Report {
        tool: "canopy-bench",
        version: env!("CARGO_PKG_VERSION"),
        scenario,
        timestamp_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        canopy: canopy.display().to_string(),
        machine: &machine,
        start: None,
        rpc: None,
        acl: None,
        errors: Vec::new(),
    };
    match &cli.cmd {
        Cmd::Start(a) => {
            let r = start::run(&canopy, &start_params(cli, a)?)?;
            print!("{}", start::table(&r));
            report.start = Some(r);
        }
        Cmd::Rpc(a) => {
            let r = rpc::run(&canopy, &rpc_params(cli, a)?)?;
            print!("{}", rpc::table(&r));
            report.rpc = Some(r);
        }
        Cmd::Acl(a) => {
            let r = acl::run(&acl::AclParams {
                rules: a.rules,
                decisions: a.decisions,
                runs: a.runs,
            })?;
            print!("{}", acl::table(&r));
            report.acl = Some(r);
        }
        Cmd::Smoke => {
            match acl::run(&acl::AclParams {
                rules: 100,
                decisions: 1000,
                runs: 1,
            }) {
                Ok(r) => {
                    println!("{}", acl::table(&r));
                    report.acl = Some(r);
                }
                Err(e) => report.errors.push(format!("acl: {e:#}")),
            }
            let (sp, rp) = smoke_params(cli)?;
            match start::run(&canopy, &sp) {
                Ok(r) => {
                    println!("{}", start::table(&r));
                    report.start = Some(r);
                }
                Err(e) => report.errors.push(format!("start: {e:#}")),
            }
            match rpc::run(&canopy, &rp) {
                Ok(r) => {
                    print!("{}", rpc::table(&r));
                    report.rpc = Some(r);
                }
                Err(e) => report.errors.push(format!("rpc: {e:#}")),
            }
            if let (Some(s), Some(r)) = (&report.start, &report.rpc) {
                if let Err(e) = check_smoke(s, r) {
                    report.errors.push(format!("{e:#}"));
                }
            }
        }
    }
    if let Some(path) = &cli.json {
        let text = serde_json::to_string_pretty(&report)? + "\n";
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("canopy-bench: wrote {}", path.display());
    }
    if !report.errors.is_empty() {
        bail!("{}", report.errors.join("; "));
    }
    if scenario == "smoke" {
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
    fn smoke_is_tiny() {
        let c = parse(&["smoke"]).unwrap();
        let (s, r) = smoke_params(&c).unwrap();
        assert_eq!((s.sizes.clone(), s.runs), (vec![1, 2], 1));
        assert_eq!((r.count, r.runs), (50, 1));
    }

    #[test]
    fn missing_canopy_is_explained() {
        let e = find_canopy(Some(Path::new("/nonexistent/canopy"))).unwrap_err();
        assert!(e.to_string().contains("--canopy"), "{e}");
    }
}
