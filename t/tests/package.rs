//! The Debian package (`scripts/deb.sh`, `[package.metadata.deb]` in
//! broker/Cargo.toml), installed on this machine with `dpkg -i`: the
//! binary reports its version, the shipped example configs pass
//! `canopy config check`, the manual, completions and unit are in place,
//! the `canopy` system user exists; then the package is purged.
//!
//! The .deb is `$CANOPY_DEB` if set (e.g. from `scripts/deb.sh`), else it
//! is made here from the already-built `canopy` binary next to this test
//! (`scripts/deb.sh --binary`): no compiling.
//! Needs root, dpkg and cargo-deb (`scripts/test.sh` installs it). A
//! guard purges the package, and removes the `canopy` user and group if
//! this test created them, however the test ends.
#![forbid(unsafe_code)]

use canopy_t::{canopy_bin, run_command, run_test, text};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(900);
const STEP: Duration = Duration::from_secs(180);
const EXAMPLES: &str = "/usr/share/doc/canopy/examples";

fn ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({:?})\nstdout:\n{}\nstderr:\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
}

fn exists(user_or_group: &str, db: &str) -> bool {
    Command::new("getent")
        .args([db, user_or_group])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn installed() -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", "canopy"])
        .output()
        .is_ok_and(|o| {
            text(&o.stdout).contains("installed") && !text(&o.stdout).contains("not-installed")
        })
}

/// dpkg, retried while another dpkg or apt holds the lock (up to 2 min).
fn dpkg(args: &[&str]) -> Output {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let out = run_command(Command::new("dpkg").args(args), STEP);
        let err = text(&out.stderr);
        if out.status.success() || !err.contains("lock") || Instant::now() > deadline {
            return out;
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// Purges the package and removes what this test created, however the
/// test ends (a failed assertion unwinds through it).
struct Cleanup {
    user_existed: bool,
    group_existed: bool,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let purge = std::panic::catch_unwind(|| dpkg(&["--purge", "canopy"]));
        if let Ok(out) = &purge {
            if !out.status.success() {
                eprintln!(
                    "cleanup: dpkg --purge canopy failed:\n{}{}",
                    text(&out.stdout),
                    text(&out.stderr)
                );
            }
        }
        // Debian keeps a package's system user on purge; this test made it.
        if !self.user_existed && exists("canopy", "passwd") {
            let _ = Command::new("deluser")
                .args(["--system", "--quiet", "canopy"])
                .stderr(std::process::Stdio::null())
                .status();
        }
        if !self.group_existed && exists("canopy", "group") {
            let _ = Command::new("delgroup")
                .args(["--system", "--quiet", "canopy"])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

/// Make the .deb from the built binary with `scripts/deb.sh --binary`.
fn build_deb(out_dir: &Path) -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace");
    let has_cargo_deb = Command::new("cargo")
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        has_cargo_deb,
        "cargo-deb is missing: run `cargo install cargo-deb --locked` (scripts/test.sh does), or set CANOPY_DEB to a .deb made by scripts/deb.sh"
    );
    let out = run_command(
        Command::new(workspace.join("scripts/deb.sh"))
            .arg("--binary")
            .arg(canopy_bin())
            .arg("--output")
            .arg(out_dir),
        STEP,
    );
    ok(&out, "scripts/deb.sh");
    std::fs::read_dir(out_dir)
        .expect("read the output dir")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .unwrap_or_else(|| panic!("scripts/deb.sh wrote no .deb in {}", out_dir.display()))
}

#[test]
fn the_deb_installs_runs_and_purges() {
    run_test(LIMIT, || {
        assert!(
            nix::unistd::getuid().is_root(),
            "this test installs a package: run it as root (CI does)"
        );
        assert!(
            !installed(),
            "a canopy package is already installed on this machine; this test would replace and purge it: `dpkg --purge canopy` first"
        );
        assert!(
            !Path::new("/usr/bin/canopy").exists(),
            "/usr/bin/canopy exists outside any package; this test would overwrite it: move it away first"
        );
        let t0 = Instant::now();
        let tmp = tempfile::tempdir().unwrap();
        let deb = match std::env::var_os("CANOPY_DEB") {
            Some(p) => PathBuf::from(p),
            None => build_deb(tmp.path()),
        };
        let built = t0.elapsed();

        let _cleanup = Cleanup {
            user_existed: exists("canopy", "passwd"),
            group_existed: exists("canopy", "group"),
        };
        ok(&dpkg(&["-i", deb.to_str().unwrap()]), "dpkg -i");
        let installed_at = t0.elapsed();

        // --version: the version, the git revision, what is built in.
        let v = run_command(Command::new("/usr/bin/canopy").arg("--version"), STEP);
        ok(&v, "canopy --version");
        let v = text(&v.stdout);
        assert!(
            v.starts_with(&format!("canopy {} (git ", env!("CARGO_PKG_VERSION")))
                && v.contains("gssapi"),
            "{v}"
        );
        // The same build as the one tested, unless it came from elsewhere.
        if std::env::var_os("CANOPY_DEB").is_none() {
            let here = run_command(Command::new(canopy_bin()).arg("--version"), STEP);
            assert_eq!(text(&here.stdout), v);
        }

        // The shipped examples pass `config check`: one file, the split
        // directory (same fingerprint), and the Kerberos one.
        let mut fingerprints = Vec::new();
        for example in ["canopy.toml", "conf.d", "gssapi.toml"] {
            let path = format!("{EXAMPLES}/{example}");
            let out = run_command(
                Command::new("/usr/bin/canopy").args(["config", "check", &path]),
                STEP,
            );
            ok(&out, &format!("canopy config check {path}"));
            let o = text(&out.stdout);
            assert!(o.contains(&format!("{path}: ok")), "{o}");
            fingerprints.push(
                o.lines()
                    .find(|l| l.contains("fingerprint"))
                    .unwrap_or_else(|| panic!("no fingerprint in:\n{o}"))
                    .to_string(),
            );
        }
        assert_eq!(fingerprints[0], fingerprints[1]);

        // The service user and group, not a login account.
        let pw = run_command(Command::new("getent").args(["passwd", "canopy"]), STEP);
        ok(&pw, "getent passwd canopy (the canopy user)");
        let pw = text(&pw.stdout);
        let fields: Vec<&str> = pw.trim().split(':').collect();
        let uid: u32 = fields[2].parse().unwrap();
        assert!(uid < 1000, "canopy is not a system user: {pw}");
        assert!(
            fields[6].ends_with("nologin") || fields[6].ends_with("false"),
            "{pw}"
        );
        assert!(exists("canopy", "group"), "no canopy group");

        // The manual, completions and unit.
        let man = |p: &str| Path::new(&format!("{p}.gz")).is_file();
        for page in [
            "/usr/share/man/man1/canopy.1",
            "/usr/share/man/man1/canopy-start.1",
            "/usr/share/man/man1/canopy-broker.1",
            "/usr/share/man/man1/canopy-overlay-status.1",
            "/usr/share/man/man1/canopy-key-new.1",
            "/usr/share/man/man5/canopy.toml.5",
        ] {
            assert!(man(page), "{page} is not installed");
        }
        let page5 = std::fs::read("/usr/share/man/man5/canopy.toml.5.gz").unwrap();
        assert_eq!(page5[..2], [0x1f, 0x8b], "canopy.toml.5.gz is not gzipped");
        for f in [
            "/usr/share/bash-completion/completions/canopy",
            "/usr/share/zsh/vendor-completions/_canopy",
            "/usr/share/fish/vendor_completions.d/canopy.fish",
            "/lib/systemd/system/canopy.service",
            "/usr/share/doc/canopy/operations.md",
            "/usr/bin/canopy-ca",
            "/usr/bin/canopy-broker",
            "/usr/share/doc/canopy/examples/canopy.service.d/exec.conf",
            "/usr/share/doc/canopy/examples/imp.toml",
            "/usr/share/doc/canopy/examples/ca.toml",
        ] {
            assert!(Path::new(f).is_file(), "{f} is not installed");
        }
        let bash =
            std::fs::read_to_string("/usr/share/bash-completion/completions/canopy").unwrap();
        assert!(
            bash.contains("complete") && bash.contains("overlay"),
            "{bash}"
        );
        // The exec helper is installed root-owned but not setuid: the
        // admin turns it on (docs/operations.md).
        {
            use std::os::unix::fs::MetadataExt;
            let md = std::fs::metadata("/usr/lib/canopy/canopy-imp").expect("canopy-imp installed");
            assert_eq!((md.uid(), md.mode() & 0o7777), (0, 0o755));
        }
        // The hidden packaging subcommand is not offered.
        assert!(!bash.contains("generate-manual"));
        // The installed unit is valid, and its sandbox is not weak.
        {
            let v = run_command(
                Command::new("systemd-analyze").args([
                    "verify",
                    "--man=no",
                    "/lib/systemd/system/canopy.service",
                ]),
                STEP,
            );
            assert!(
                v.status.success() && !text(&v.stderr).contains("canopy.service"),
                "systemd-analyze verify: {}{}",
                text(&v.stdout),
                text(&v.stderr)
            );
            let sec = run_command(
                Command::new("systemd-analyze").args([
                    "security",
                    "--offline=true",
                    "/lib/systemd/system/canopy.service",
                ]),
                STEP,
            );
            let out = text(&sec.stdout);
            let level = out
                .lines()
                .find_map(|l| {
                    l.split("Overall exposure level for canopy.service: ")
                        .nth(1)
                })
                .and_then(|l| l.split_whitespace().next())
                .and_then(|n| n.parse::<f64>().ok())
                .unwrap_or_else(|| panic!("systemd-analyze security: {out}{}", text(&sec.stderr)));
            assert!(level <= 4.0, "exposure {level} (at most 4.0, OK): {out}");
        }
        let listed = run_command(Command::new("dpkg").args(["-L", "canopy"]), STEP);
        assert!(text(&listed.stdout).contains("/usr/bin/canopy"));

        // Purge: the binary goes, the package is gone.
        ok(&dpkg(&["--purge", "canopy"]), "dpkg --purge canopy");
        assert!(!installed(), "canopy is still installed after the purge");
        assert!(!Path::new("/usr/bin/canopy").exists());
        eprintln!(
            "package: .deb ready after {:.1} s, installed after {:.1} s, all done after {:.1} s",
            built.as_secs_f64(),
            installed_at.as_secs_f64(),
            t0.elapsed().as_secs_f64()
        );
    });
}
