//! Scenario `start`: wall time of `canopy start --size N -- true`.

use crate::instance::{Launcher, Scratch, GRACE};
use crate::stats::Summary;
use anyhow::{anyhow, bail, Result};
use serde::Serialize;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Clone, Debug, Serialize)]
pub struct StartParams {
    pub sizes: Vec<u32>,
    pub fanout: u32,
    pub runs: u32,
    /// Unrecorded sweeps over all sizes before the measured ones.
    pub warmup: u32,
    /// Passed to `canopy start --timeout`.
    #[serde(rename = "timeout_s", serialize_with = "secs")]
    pub timeout: Duration,
    #[serde(skip)]
    pub rundir: Option<PathBuf>,
}

pub fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

#[derive(Clone, Debug, Serialize)]
pub struct StartResult {
    pub size: u32,
    pub fanout: u32,
    /// Spawn of `canopy start` to its exit, in seconds.
    pub wall_s: Summary,
}

#[derive(Clone, Debug, Serialize)]
pub struct StartReport {
    pub params: StartParams,
    pub results: Vec<StartResult>,
}

/// Runs are interleaved (every size once per round) so that slow drift in
/// the machine's state spreads over all sizes.
pub fn run(canopy: &Path, p: &StartParams) -> Result<StartReport> {
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); p.sizes.len()];
    for round in 0..p.warmup + p.runs {
        let warm = round < p.warmup;
        for (i, &size) in p.sizes.iter().enumerate() {
            let s = once(canopy, size, p)?;
            if warm {
                eprintln!("start: size {size} warm-up: {s:.3} s");
            } else {
                eprintln!(
                    "start: size {size} run {}/{}: {s:.3} s",
                    round - p.warmup + 1,
                    p.runs
                );
                samples[i].push(s);
            }
        }
    }
    let results = p
        .sizes
        .iter()
        .zip(samples)
        .map(|(&size, s)| {
            Ok(StartResult {
                size,
                fanout: p.fanout,
                wall_s: Summary::of(s).ok_or_else(|| anyhow!("no samples"))?,
            })
        })
        .collect::<Result<_>>()?;
    Ok(StartReport {
        params: p.clone(),
        results,
    })
}

/// One `canopy start --size N -- true`: seconds from spawn to exit.
fn once(canopy: &Path, size: u32, p: &StartParams) -> Result<f64> {
    let scratch = Scratch::new(p.rundir.as_deref())?;
    let args: Vec<String> = vec![
        "--size".into(),
        size.to_string(),
        "--fanout".into(),
        p.fanout.to_string(),
        "--timeout".into(),
        p.timeout.as_secs_f64().to_string(),
        "--".into(),
        "true".into(),
    ];
    let t0 = Instant::now();
    let mut l = Launcher::spawn(canopy, &args, false, scratch)?;
    match l.wait_exit(p.timeout + GRACE)? {
        Some((st, at)) if st.success() => Ok(at.duration_since(t0).as_secs_f64()),
        Some((st, _)) => bail!("canopy start --size {size} -- true: {st} (see its messages above)"),
        // Dropping `l` tears it down.
        None => bail!(
            "canopy start --size {size} -- true did not finish within {:?}",
            p.timeout + GRACE
        ),
    }
}

pub fn table(r: &StartReport) -> String {
    let p = &r.params;
    let mut s = format!(
        "start: wall time of `canopy start --size N --fanout {} -- true` (spawn to exit), seconds\n\
         \x20      {} run(s) per size, {} warm-up sweep(s) not counted\n",
        p.fanout, p.runs, p.warmup
    );
    let _ = writeln!(
        s,
        "{:>6}  {:>9}  {:>9}  {:>9}",
        "size", "median", "min", "max"
    );
    for x in &r.results {
        let _ = writeln!(
            s,
            "{:>6}  {:>9.3}  {:>9.3}  {:>9.3}",
            x.size, x.wall_s.median, x.wall_s.min, x.wall_s.max
        );
    }
    s
}
