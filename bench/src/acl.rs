//! `acl`: decisions per second of the policy engine behind the ZAP handler,
//! for a synthetic policy of N rules (every rule kind but delegates).

use anyhow::{Context, Result};
use canopy_acl::{synthetic_policy, synthetic_principal, Acl, Query};
use serde::Serialize;
use std::time::{Instant, SystemTime};

use crate::stats::Summary;

pub struct AclParams {
    pub rules: usize,
    pub decisions: usize,
    pub runs: u32,
}

#[derive(Serialize)]
pub struct AclReport {
    pub rules: usize,
    pub decisions_per_run: usize,
    pub parse_ms: Summary,
    pub decisions_per_s: Summary,
    pub allowed_fraction: f64,
}

pub fn run(p: &AclParams) -> Result<AclReport> {
    let text = synthetic_policy(p.rules);
    let mut parse_ms = Vec::new();
    let mut rates = Vec::new();
    let mut allowed = 0usize;
    let now = SystemTime::now();
    // Every principal that appears in the policy, plus strangers (default deny).
    let queries: Vec<(String, canopy_acl::Mech)> =
        (0..p.rules * 2).map(synthetic_principal).collect();
    let addr = Some("10.5.1.2".parse().context("address")?);
    for _ in 0..p.runs {
        let t0 = Instant::now();
        let acl = Acl::parse(&text, "synthetic").map_err(|e| anyhow::anyhow!("{e}"))?;
        parse_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        allowed = 0;
        let t0 = Instant::now();
        for i in 0..p.decisions {
            let (principal, mechanism) = &queries[i % queries.len()];
            let v = acl.decide(&Query {
                principal,
                mechanism: *mechanism,
                address: addr,
                now,
            });
            allowed += v.allow as usize;
        }
        rates.push(p.decisions as f64 / t0.elapsed().as_secs_f64());
    }
    Ok(AclReport {
        rules: p.rules,
        decisions_per_run: p.decisions,
        parse_ms: Summary::of(parse_ms).context("no runs")?,
        decisions_per_s: Summary::of(rates).context("no runs")?,
        allowed_fraction: allowed as f64 / p.decisions as f64,
    })
}

pub fn table(r: &AclReport) -> String {
    format!(
        "acl: {} rules, {} decisions per run\n  parse      {:.1} ms [{:.1}, {:.1}]\n  decisions  {:.0}/s [{:.0}, {:.0}]  ({:.0}% allowed)\n",
        r.rules,
        r.decisions_per_run,
        r.parse_ms.median,
        r.parse_ms.min,
        r.parse_ms.max,
        r.decisions_per_s.median,
        r.decisions_per_s.min,
        r.decisions_per_s.max,
        r.allowed_fraction * 100.0
    )
}
