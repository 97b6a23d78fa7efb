//! Scenario `exec`: wall time of `canopy exec -n -r all true` (spawn of the
//! client to its exit) in a personal instance of each size, the command
//! fanned out down the tree and every rank's exit streamed back. flux-core
//! 0.88 measured on this kind of machine (2026-11-30, minimal instance):
//! `flux exec -r all true` 15 ms at size 8 and 89 ms at size 64. Targets:
//! at most 10 ms at 8, 45 ms at 64 and 1.5 s at 1,024 (reported, not
//! enforced).

use crate::instance::Instance;
use crate::stats::Summary;
use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Clone, Debug, Serialize)]
pub struct ExecParams {
    pub sizes: Vec<u32>,
    pub fanout: u32,
    /// Measured runs per size.
    pub runs: u32,
    /// Unrecorded runs per size first.
    pub warmup: u32,
    #[serde(rename = "start_timeout_s", serialize_with = "crate::start::secs")]
    pub start_timeout: Duration,
    #[serde(skip)]
    pub rundir: Option<PathBuf>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ExecResult {
    pub size: u32,
    /// Spawn of `canopy exec` to its exit, milliseconds.
    pub wall_ms: Summary,
    /// The target for this size, if the issue set one.
    pub target_ms: Option<f64>,
    pub target_met: Option<bool>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ExecReport {
    pub params: ExecParams,
    pub results: Vec<ExecResult>,
}

/// The targets: (size, milliseconds).
pub const TARGETS: &[(u32, f64)] = &[(8, 10.0), (64, 45.0), (1024, 1500.0)];

pub fn run(canopy: &Path, p: &ExecParams) -> Result<ExecReport> {
    let mut results = Vec::new();
    for &size in &p.sizes {
        let mut inst =
            Instance::start(canopy, size, p.fanout, p.start_timeout, p.rundir.as_deref())?;
        let uri = inst.uri(0);
        eprintln!("exec: {size} brokers up in {:.3} s", inst.start_s);
        // Every exec must finish well within this, or the instance is torn
        // down (which ends the client too).
        let stall = Duration::from_secs(30);
        let (samples, teardown) = inst.run(stall, |prog| {
            let mut v = Vec::new();
            for i in 0..p.warmup + p.runs {
                let ms = once(canopy, &uri)?;
                prog.tick();
                if i >= p.warmup {
                    v.push(ms);
                }
            }
            Ok(v)
        })?;
        if !teardown.clean {
            bail!("exec: size {size}: {}", teardown.describe());
        }
        let wall_ms = Summary::of(samples).ok_or_else(|| anyhow!("no runs"))?;
        let target_ms = TARGETS.iter().find(|t| t.0 == size).map(|t| t.1);
        eprintln!("exec: size {size}: median {:.2} ms", wall_ms.median);
        results.push(ExecResult {
            size,
            target_met: target_ms.map(|t| wall_ms.median <= t),
            wall_ms,
            target_ms,
        });
    }
    Ok(ExecReport {
        params: p.clone(),
        results,
    })
}

/// One `canopy exec -n -r all true`: milliseconds from spawn to exit.
fn once(canopy: &Path, uri: &str) -> Result<f64> {
    let t0 = Instant::now();
    let out = Command::new(canopy)
        .args(["exec", "-n", "-r", "all", "true"])
        .env("CANOPY_URI", uri)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .context("cannot run canopy exec")?;
    let ms = t0.elapsed().as_secs_f64() * 1000.0;
    if !out.status.success() {
        bail!(
            "canopy exec -r all true: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(ms)
}

pub fn table(r: &ExecReport) -> String {
    let p = &r.params;
    let mut s = format!(
        "exec: wall time of `canopy exec -n -r all true` (spawn to exit), ms, fanout {}\n\
         \x20     {} run(s) per size after {} warm-up run(s); flux-core 0.88: 15 ms at 8, 89 ms at 64\n",
        p.fanout, p.runs, p.warmup
    );
    let _ = writeln!(
        s,
        "{:>6}  {:>9}  {:>9}  {:>9}  {:>8}  {:>4}",
        "size", "median", "min", "max", "target", "met"
    );
    for x in &r.results {
        let (t, m) = match (x.target_ms, x.target_met) {
            (Some(t), Some(m)) => (format!("{t:.0}"), if m { "yes" } else { "no" }),
            _ => ("-".into(), "-"),
        };
        let _ = writeln!(
            s,
            "{:>6}  {:>9.2}  {:>9.2}  {:>9.2}  {:>8}  {:>4}",
            x.size, x.wall_ms.median, x.wall_ms.min, x.wall_ms.max, t, m
        );
    }
    s
}
