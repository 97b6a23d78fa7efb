//! CURVE certificates interoperate with pyzmq (Debian's python3-zmq) both
//! ways, and `canopy keygen` guards secrets: mode 0600, never overwritten,
//! and a secret that group or other can read is refused with the fix.
#![forbid(unsafe_code)]

use canopy_t::{run_canopy, run_command, run_test, text};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(60);
const CMD: Duration = Duration::from_secs(30);
/// Debian's interpreter, whose `zmq` module is the python3-zmq package
/// (not whatever `python3` comes first in PATH).
const PYTHON: &str = "/usr/bin/python3";

fn python(script: &str, args: &[&Path]) -> Output {
    let mut cmd = Command::new(PYTHON);
    cmd.arg("-c")
        .arg(script)
        .args(args)
        .env_remove("PYTHONPATH")
        .env_remove("PYTHONHOME")
        .env("PYTHONDONTWRITEBYTECODE", "1");
    run_command(&mut cmd, CMD)
}

/// Why pyzmq cannot be used, if it cannot.
fn pyzmq_missing() -> Option<String> {
    if !Path::new(PYTHON).is_file() {
        return Some(format!(
            "{PYTHON} is not installed (Debian package python3-zmq)"
        ));
    }
    let o = python("import zmq.auth", &[]);
    (!o.status.success()).then(|| {
        format!(
            "{PYTHON} cannot import zmq (Debian package python3-zmq): {}",
            text(&o.stderr).trim()
        )
    })
}

fn skip_without_pyzmq(test: &str) -> bool {
    match pyzmq_missing() {
        Some(why) => {
            println!("skipped: {test}: {why}");
            true
        }
        None => false,
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn pub_path(p: &Path) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(".pub");
    PathBuf::from(s)
}

/// The value of `public-key = "..."` in a certificate's text.
fn public_key_in(cert_text: &str) -> String {
    cert_text
        .lines()
        .find_map(|l| {
            let v = l.trim().strip_prefix("public-key")?.trim_start();
            let v = v.strip_prefix('=')?.trim();
            Some(v.trim_matches('"').to_string())
        })
        .unwrap_or_else(|| panic!("no public-key in:\n{cert_text}"))
}

#[test]
fn pyzmq_certificates_load_in_canopy_once_private() {
    if skip_without_pyzmq("certs") {
        return;
    }
    run_test(LIMIT, || {
        let dir = tempfile::tempdir().unwrap();
        let o = python(
            "import os, sys, zmq.auth\n\
             os.umask(0o022)\n\
             pub, sec = zmq.auth.create_certificates(sys.argv[1], 'node7')\n\
             p, s = zmq.auth.load_certificate(sec)\n\
             print(pub); print(sec); print(p.decode()); print(s.decode())",
            &[dir.path()],
        );
        assert!(o.status.success(), "pyzmq: {}", text(&o.stderr));
        let out = text(&o.stdout);
        let lines: Vec<&str> = out.lines().collect();
        let [pub_file, secret_file, py_public, py_secret] = lines[..] else {
            panic!("unexpected pyzmq output:\n{out}");
        };
        assert_eq!(py_public.len(), 40, "{py_public}");
        assert_eq!(py_secret.len(), 40, "{py_secret}");
        let secret_file = Path::new(secret_file);
        assert_eq!(mode(secret_file), 0o644, "pyzmq writes its secret 0644");

        // Readable by group and other: refused, and told how to fix it.
        let o = run_canopy(
            &["keygen", "--public", secret_file.to_str().unwrap()],
            &[],
            CMD,
        );
        assert!(!o.status.success(), "a 0644 secret was accepted");
        let err = text(&o.stderr);
        assert!(
            err.contains("chmod 600") && err.contains(secret_file.to_str().unwrap()),
            "refusal does not say `chmod 600 FILE`: {err}"
        );
        assert!(
            o.stdout.is_empty(),
            "printed despite refusing: {}",
            text(&o.stdout)
        );

        std::fs::set_permissions(secret_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let o = run_canopy(
            &["keygen", "--public", secret_file.to_str().unwrap()],
            &[],
            CMD,
        );
        assert!(
            o.status.success(),
            "canopy keygen --public {}: {}",
            secret_file.display(),
            text(&o.stderr)
        );
        let printed = text(&o.stdout);
        assert_eq!(public_key_in(&printed), py_public, "{printed}");
        // It is a public certificate: no secret in it.
        assert!(!printed.contains("secret-key"), "{printed}");
        assert!(!printed.contains(py_secret), "printed the secret key");
        // pyzmq's own public file says the same.
        let pub_text = std::fs::read_to_string(pub_file).unwrap();
        assert_eq!(public_key_in(&pub_text), py_public);
    });
}

#[test]
fn canopy_certificates_load_in_pyzmq() {
    if skip_without_pyzmq("certs") {
        return;
    }
    run_test(LIMIT, || {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("alice");
        let public = pub_path(&secret);
        let o = run_canopy(
            &["keygen", secret.to_str().unwrap(), "--name", "alice-laptop"],
            &[],
            CMD,
        );
        assert!(o.status.success(), "canopy keygen: {}", text(&o.stderr));
        let said = text(&o.stdout) + &text(&o.stderr);
        assert_eq!(mode(&secret), 0o600, "secret certificate mode");
        assert_eq!(
            mode(&public) & 0o022,
            0,
            "public certificate writable by others"
        );

        let printed = run_canopy(&["keygen", "--public", secret.to_str().unwrap()], &[], CMD);
        assert!(printed.status.success(), "{}", text(&printed.stderr));
        let canopy_public = public_key_in(&text(&printed.stdout));
        assert!(
            said.contains(&canopy_public),
            "keygen did not report the public key {canopy_public}: {said}"
        );
        let secret_text = std::fs::read_to_string(&secret).unwrap();
        assert!(
            secret_text.contains("name = \"alice-laptop\""),
            "{secret_text}"
        );

        let o = python(
            "import sys, zmq, zmq.auth\n\
             p, s = zmq.auth.load_certificate(sys.argv[1])\n\
             q, none = zmq.auth.load_certificate(sys.argv[2])\n\
             assert none is None, none\n\
             assert zmq.curve_public(s) == p, 'secret does not match public'\n\
             print(p.decode()); print(s.decode()); print(q.decode())",
            &[&secret, &public],
        );
        assert!(
            o.status.success(),
            "pyzmq cannot load them: {}",
            text(&o.stderr)
        );
        let out = text(&o.stdout);
        let lines: Vec<&str> = out.lines().collect();
        let [py_public, py_secret, py_public_from_pub] = lines[..] else {
            panic!("unexpected pyzmq output:\n{out}");
        };
        assert_eq!(py_public, canopy_public);
        assert_eq!(py_public_from_pub, canopy_public);
        assert_eq!(py_secret, public_key_in_secret(&secret_text));
    });
}

fn public_key_in_secret(secret_text: &str) -> String {
    secret_text
        .lines()
        .find_map(|l| {
            let v = l.trim().strip_prefix("secret-key")?.trim_start();
            Some(v.strip_prefix('=')?.trim().trim_matches('"').to_string())
        })
        .unwrap_or_else(|| panic!("no secret-key in:\n{secret_text}"))
}

#[test]
fn keygen_never_overwrites_and_writes_the_secret_0600() {
    run_test(LIMIT, || {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("node");
        let public = pub_path(&secret);
        let o = run_canopy(&["keygen", secret.to_str().unwrap()], &[], CMD);
        assert!(o.status.success(), "{}", text(&o.stderr));
        assert_eq!(mode(&secret), 0o600);
        let (s0, p0) = (
            std::fs::read(&secret).unwrap(),
            std::fs::read(&public).unwrap(),
        );

        // Again on the same path: refused, both files untouched.
        let o = run_canopy(&["keygen", secret.to_str().unwrap()], &[], CMD);
        assert!(!o.status.success(), "keygen overwrote {}", secret.display());
        let err = text(&o.stderr);
        assert!(err.contains("exists"), "{err}");
        assert_eq!(std::fs::read(&secret).unwrap(), s0, "secret changed");
        assert_eq!(std::fs::read(&public).unwrap(), p0, "public changed");
        assert_eq!(mode(&secret), 0o600);

        // Only the public file exists: refused, and it is untouched.
        let other = dir.path().join("other");
        let other_pub = pub_path(&other);
        std::fs::write(&other_pub, b"keep me\n").unwrap();
        let o = run_canopy(&["keygen", other.to_str().unwrap()], &[], CMD);
        assert!(
            !o.status.success(),
            "keygen overwrote {}",
            other_pub.display()
        );
        assert!(text(&o.stderr).contains("exists"), "{}", text(&o.stderr));
        assert_eq!(std::fs::read(&other_pub).unwrap(), b"keep me\n");

        // A umask that would let everyone read does not: 0600 is explicit.
        let loose = dir.path().join("loose");
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg("umask 000 && exec \"$0\" keygen \"$1\"")
            .arg(canopy_t::canopy_bin())
            .arg(&loose)
            .env("RUST_LOG", "warn");
        let o = run_command(&mut cmd, CMD);
        assert!(o.status.success(), "{}", text(&o.stderr));
        assert_eq!(mode(&loose), 0o600, "secret mode under umask 000");
    });
}
