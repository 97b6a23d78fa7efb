//! Another local user for the tests that check what a broker does with a
//! uid other than its owner's: created on demand (`useradd`, root only),
//! with copies of the binaries that user can run.

use crate::{canopy_bin, run_command, text, Instance};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub const OTHER_USER: &str = "canopy-t-other";

/// The uid of OTHER_USER, creating it if needed.
pub fn other_user() -> u32 {
    ensure_user(OTHER_USER)
}

/// The uid of a local system user `name`, creating it if needed (root).
pub fn ensure_user(name: &str) -> u32 {
    let lookup = || {
        nix::unistd::User::from_name(name)
            .ok()
            .flatten()
            .map(|u| u.uid.as_raw())
    };
    if let Some(uid) = lookup() {
        return uid;
    }
    let out = run_command(
        Command::new("useradd").args(["--system", "--no-create-home", name]),
        Duration::from_secs(30),
    );
    // Another run may have created it meanwhile; only the lookup counts.
    lookup().unwrap_or_else(|| {
        panic!(
            "cannot create user {name}: {:?}\n{}",
            out.status,
            text(&out.stderr)
        )
    })
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Make the instance's rank 0 socket reachable by anyone, so that the
/// broker itself (not file permissions) has to refuse another user, and
/// put copies of `canopy` and the test peer where that user can run them.
/// Returns (canopy, peer).
pub fn open_to_other_users(inst: &Instance) -> (PathBuf, PathBuf) {
    let chmod = |p: &Path, mode| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()))
    };
    chmod(inst.tempdir(), 0o711);
    chmod(inst.rundir(), 0o711);
    chmod(&inst.local_path(0), 0o777);
    let copy = |from: &Path, name: &str| {
        let to = inst.tempdir().join(name);
        std::fs::copy(from, &to).unwrap();
        chmod(&to, 0o755);
        to
    };
    (copy(&canopy_bin(), "canopy"), copy(&peer_bin(), "peer"))
}

/// Run `prog` as the other user. A just-copied binary can be briefly
/// "busy" (ETXTBSY): another test thread may fork while the copy's write
/// descriptor is open, and the forked child holds it until it execs. That
/// window is short, so retry.
pub fn as_other_user(prog: &Path, args: &[&str]) -> std::process::Output {
    let mut tries = 0;
    loop {
        let out = run_command(
            Command::new("runuser")
                .args(["-u", OTHER_USER, "--"])
                .arg(prog)
                .args(args)
                .env("RUST_LOG", "warn"),
            Duration::from_secs(30),
        );
        tries += 1;
        if tries == 50 || !text(&out.stderr).contains("Text file busy") {
            return out;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The test peer (t/src/bin/canopy-t-peer.rs), next to the test binary.
pub fn peer_bin() -> PathBuf {
    let mut p = canopy_bin();
    p.set_file_name("canopy-t-peer");
    p
}
