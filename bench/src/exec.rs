//! Scenario `exec`: wall time of `canopy exec -n -r all true` (spawn of the
//! client to its exit) in a personal instance of each size, the command
//! fanned out down the tree and every rank's exit streamed back. flux-core
//! 0.88 measured on this kind of machine (2026-11-30, minimal instance):
//! `flux exec -r all true` 15 ms at size 8 and 89 ms at size 64. Targets:
//! at most 10 ms at 8, 45 ms at 64 and 1.5 s at 1,024 (reported, not
//! enforced).
//!
//! With `--helper PATH` (root only) it also measures size 8 *through the
//! helper*, as in a system instance: the brokers run as an unprivileged
//! user (`canopy-bench`, created if missing) with `PATH` installed setuid
//! root and an `imp.toml` bind-mounted on `/etc/canopy` in a private mount
//! namespace; the client (root) signs each request with a key certified
//! for the account `nobody`. Target: at most 5 ms more per rank than the
//! direct path measured in the same run.

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
    /// Also measure through this `canopy-imp` (size 8).
    pub helper: Option<PathBuf>,
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
pub struct HelperResult {
    pub size: u32,
    /// Through the helper, milliseconds.
    pub helper_ms: Summary,
    /// Direct, in the same run.
    pub direct_ms: Summary,
    /// (helper median - direct median) / size.
    pub extra_per_rank_ms: f64,
    pub target_extra_per_rank_ms: f64,
    pub target_met: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct ExecReport {
    pub params: ExecParams,
    pub results: Vec<ExecResult>,
    pub helper: Option<HelperResult>,
}

/// The helper path's target: extra milliseconds per rank.
pub const TARGET_HELPER_EXTRA_MS: f64 = 5.0;
const HELPER_SIZE: u32 = 8;
const BENCH_USER: &str = "canopy-bench";
/// The environment variable a personal instance reads for its helper
/// (`canopy_broker::exec::HELPER_ENV`).
const HELPER_ENV: &str = "CANOPY_EXEC_HELPER";

/// The targets: (size, milliseconds).
pub const TARGETS: &[(u32, f64)] = &[(8, 10.0), (64, 45.0), (1024, 1500.0)];

pub fn run(canopy: &Path, p: &ExecParams) -> Result<ExecReport> {
    let mut results = Vec::new();
    let mut direct8 = None;
    for &size in &p.sizes {
        let samples = measure(canopy, canopy, size, p, &[], None)?;
        let wall_ms = Summary::of(samples).ok_or_else(|| anyhow!("no runs"))?;
        if size == HELPER_SIZE {
            direct8 = Some(wall_ms.clone());
        }
        let target_ms = TARGETS.iter().find(|t| t.0 == size).map(|t| t.1);
        eprintln!("exec: size {size}: median {:.2} ms", wall_ms.median);
        results.push(ExecResult {
            size,
            target_met: target_ms.map(|t| wall_ms.median <= t),
            wall_ms,
            target_ms,
        });
    }
    let helper = match &p.helper {
        None => None,
        Some(h) => {
            let direct_ms = match direct8 {
                Some(d) => d,
                None => Summary::of(measure(canopy, canopy, HELPER_SIZE, p, &[], None)?)
                    .ok_or_else(|| anyhow!("no runs"))?,
            };
            let site = HelperSite::new(canopy, h)?;
            let samples = measure(
                canopy,
                &site.wrapper,
                HELPER_SIZE,
                p,
                &["--allow".into(), "unix:root=user".into()],
                Some(&site.home),
            )?;
            let helper_ms = Summary::of(samples).ok_or_else(|| anyhow!("no runs"))?;
            let extra = (helper_ms.median - direct_ms.median) / HELPER_SIZE as f64;
            eprintln!(
                "exec: through the helper at {HELPER_SIZE}: median {:.2} ms ({extra:.2} ms more per rank)",
                helper_ms.median
            );
            Some(HelperResult {
                size: HELPER_SIZE,
                helper_ms,
                direct_ms,
                extra_per_rank_ms: extra,
                target_extra_per_rank_ms: TARGET_HELPER_EXTRA_MS,
                target_met: extra <= TARGET_HELPER_EXTRA_MS,
            })
        }
    };
    Ok(ExecReport {
        params: p.clone(),
        results,
        helper,
    })
}

/// Start an instance of `size` with `launcher` (canopy, or the helper
/// site's wrapper) and time `canopy exec` against it.
fn measure(
    canopy: &Path,
    launcher: &Path,
    size: u32,
    p: &ExecParams,
    extra: &[String],
    home: Option<&Path>,
) -> Result<Vec<f64>> {
    let mut inst = Instance::start_with(
        launcher,
        size,
        p.fanout,
        p.start_timeout,
        p.rundir.as_deref(),
        extra,
    )?;
    let uri = inst.uri(0);
    eprintln!("exec: {size} brokers up in {:.3} s", inst.start_s);
    // Every exec must finish well within this, or the instance is torn
    // down (which ends the client too).
    let stall = Duration::from_secs(30);
    let (samples, teardown) = inst.run(stall, |prog| {
        let mut v = Vec::new();
        for i in 0..p.warmup + p.runs {
            let ms = once(canopy, &uri, home)?;
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
    Ok(samples)
}

/// A system instance's exec path on one host: the helper setuid root, its
/// imp.toml on a private `/etc/canopy`, brokers as [`BENCH_USER`], and
/// root's signing key certified for `nobody`. Removed when dropped.
struct HelperSite {
    dir: PathBuf,
    /// Runs `canopy` as the broker user with the site's /etc/canopy.
    wrapper: PathBuf,
    home: PathBuf,
    made_etc: bool,
}

impl HelperSite {
    fn new(canopy: &Path, helper: &Path) -> Result<HelperSite> {
        use canopy_imp::cert::{CertKind, UserCert};
        use canopy_imp::keys;
        use std::os::unix::fs::PermissionsExt;
        if !nix::unistd::geteuid().is_root() {
            bail!("exec --helper needs root: it installs the helper setuid root and runs the brokers as {BENCH_USER}");
        }
        if nix::unistd::User::from_name(BENCH_USER)?.is_none() {
            let st = Command::new("useradd")
                .args(["--system", "--no-create-home", BENCH_USER])
                .status()
                .context("cannot run useradd")?;
            if !st.success() {
                bail!("cannot create the user {BENCH_USER}: useradd {st}");
            }
        }
        let chmod =
            |p: &Path, m: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m));
        let dir = std::env::temp_dir().join(format!("canopy-bench-imp-{}", std::process::id()));
        std::fs::create_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let mut site = HelperSite {
            dir: dir.clone(),
            wrapper: dir.join("canopy-as-service"),
            home: dir.join("home"),
            made_etc: false,
        };
        chmod(&dir, 0o755)?;
        let imp = dir.join("canopy-imp");
        std::fs::copy(helper, &imp).with_context(|| format!("cannot copy {}", helper.display()))?;
        std::os::unix::fs::chown(&imp, Some(0), Some(0))?;
        chmod(&imp, 0o4755)?;
        let bin = dir.join("canopy");
        std::fs::copy(canopy, &bin)?;
        chmod(&bin, 0o755)?;
        let etc = dir.join("etc");
        std::fs::create_dir_all(etc.join("imp/replay"))?;
        chmod(&etc, 0o755)?;
        chmod(&etc.join("imp"), 0o755)?;
        chmod(&etc.join("imp/replay"), 0o700)?;
        let ca = keys::generate()?;
        let ca_pub = keys::write_pair(&dir.join("ca.key"), &ca)?;
        std::fs::copy(&ca_pub, etc.join("imp/ca.pub"))?;
        chmod(&etc.join("imp/ca.pub"), 0o644)?;
        keys::write_pair(&etc.join("imp/receipt.key"), &keys::generate()?)?;
        let toml = format!(
            "broker_user = \"{BENCH_USER}\"\nusers = [\"nobody\"]\nsearch_path = [\"/usr/bin\", \"/bin\"]\ntrusted_ca_keys = [\"/etc/canopy/imp/ca.pub\"]\nreceipt_key = \"/etc/canopy/imp/receipt.key\"\nreplay_cache = \"/etc/canopy/imp/replay\"\n"
        );
        std::fs::write(etc.join("imp.toml"), toml)?;
        chmod(&etc.join("imp.toml"), 0o644)?;
        // root's key, certified for nobody.
        let user_dir = site.home.join(".canopy");
        std::fs::create_dir_all(&user_dir)?;
        chmod(&site.home, 0o700)?;
        chmod(&user_dir, 0o700)?;
        let user_key = canopy_imp::userkeys::load_or_create_key(&user_dir)?;
        let now = canopy_imp::userkeys::now();
        let (_, cert) = UserCert::issue(
            CertKind::Ca,
            "unix:root",
            "nobody",
            &user_key.verifying_key(),
            now.saturating_sub(60),
            now + 3600,
            &ca,
        );
        canopy_imp::userkeys::save_cert(&user_dir, &cert)?;
        if !Path::new("/etc/canopy").exists() {
            std::fs::create_dir("/etc/canopy")?;
            site.made_etc = true;
        }
        // `canopy start --rundir SCRATCH ...` as the broker user, in a
        // mount namespace where /etc/canopy is the site's.
        let inner = dir.join("as-service");
        std::fs::write(
            &inner,
            format!(
                "#!/bin/sh\nset -e\nmount --bind {etc} /etc/canopy\nchown {BENCH_USER}: \"$3\"\nexport {HELPER_ENV}={imp}\nexec setpriv --reuid={BENCH_USER} --regid={BENCH_USER} --init-groups -- {bin} \"$@\"\n",
                etc = etc.display(),
                imp = imp.display(),
                bin = bin.display(),
            ),
        )?;
        chmod(&inner, 0o755)?;
        std::fs::write(
            &site.wrapper,
            format!(
                "#!/bin/sh\nexec unshare --mount --propagation private {} \"$@\"\n",
                inner.display()
            ),
        )?;
        chmod(&site.wrapper, 0o755)?;
        Ok(site)
    }
}

impl Drop for HelperSite {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        if self.made_etc {
            let _ = std::fs::remove_dir("/etc/canopy");
        }
    }
}

/// One `canopy exec -n -r all true`: milliseconds from spawn to exit.
fn once(canopy: &Path, uri: &str, home: Option<&Path>) -> Result<f64> {
    let t0 = Instant::now();
    let mut cmd = Command::new(canopy);
    if let Some(h) = home {
        cmd.env("HOME", h);
    }
    let out = cmd
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
    if let Some(h) = &r.helper {
        let _ = writeln!(
            s,
            "through the helper at {}: median {:.2} ms (direct {:.2} ms): {:.2} ms more per rank, target {:.0}, met: {}",
            h.size,
            h.helper_ms.median,
            h.direct_ms.median,
            h.extra_per_rank_ms,
            h.target_extra_per_rank_ms,
            if h.target_met { "yes" } else { "no" }
        );
    }
    s
}
