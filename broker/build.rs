//! Records what `canopy --version` reports: the git revision of the
//! checkout being built (or `CANOPY_GIT_REV` if set, e.g. when building
//! from a tarball; "unknown" outside a git checkout) and the optional
//! parts built in.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

fn main() {
    let dir = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
    );
    println!("cargo:rerun-if-env-changed=CANOPY_GIT_REV");
    println!("cargo:rerun-if-changed=build.rs");
    let rev = match std::env::var("CANOPY_GIT_REV") {
        Ok(r) if !r.trim().is_empty() => r.trim().to_string(),
        _ => {
            // Rebuild when HEAD moves: HEAD itself (a branch switch) and the
            // branch it points to (a commit), in this worktree or the main one.
            if let Some(git_dir) = git(&dir, &["rev-parse", "--absolute-git-dir"]) {
                let git_dir = PathBuf::from(git_dir);
                println!("cargo:rerun-if-changed={}", git_dir.join("HEAD").display());
                let common = git(&dir, &["rev-parse", "--git-common-dir"])
                    .map(|c| {
                        let c = PathBuf::from(c);
                        if c.is_absolute() {
                            c
                        } else {
                            dir.join(c)
                        }
                    })
                    .unwrap_or_else(|| git_dir.clone());
                if let Some(r) = git(&dir, &["symbolic-ref", "-q", "HEAD"]) {
                    for base in [&git_dir, &common] {
                        let p = base.join(&r);
                        if p.exists() {
                            println!("cargo:rerun-if-changed={}", p.display());
                        }
                    }
                }
                let packed = common.join("packed-refs");
                if packed.exists() {
                    println!("cargo:rerun-if-changed={}", packed.display());
                }
            }
            git(&dir, &["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".to_string())
        }
    };
    // Kerberos (GSSAPI): canopy-gss is a required dependency of this crate
    // (broker/Cargo.toml), so it is always built in today. Should it become
    // an optional feature `gssapi`, test CARGO_FEATURE_GSSAPI here.
    let gssapi = true;
    let version = std::env::var("CARGO_PKG_VERSION").expect("cargo sets CARGO_PKG_VERSION");
    let features = if gssapi { "curve, gssapi" } else { "curve" };
    // The man pages' date: the commit's, so that a rebuild is identical.
    let date = if rev == "unknown" {
        String::new()
    } else {
        git(&dir, &["log", "-1", "--format=%cs", "HEAD"]).unwrap_or_default()
    };
    println!("cargo:rustc-env=CANOPY_BUILD_DATE={date}");
    println!("cargo:rustc-env=CANOPY_GIT_REV={rev}");
    println!("cargo:rustc-env=CANOPY_FEATURES={features}");
    println!("cargo:rustc-env=CANOPY_LONG_VERSION={version} (git {rev}; built with {features})");
}
