//! Policy files must be trusted (issue 12): owned by root or the broker's
//! user, on a path nobody else can change, not reached through someone
//! else's symlink.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;

use canopy_acl::{Acl, AclError};

const POLICY: &str = "[[rule]]\nname = \"a\"\nprincipal = \"*\"\ndeny = true\n";
const OTHER: u32 = 65534;

fn root() -> bool {
    let uid = std::os::unix::fs::MetadataExt::uid(&fs::metadata("/proc/self").unwrap());
    if uid != 0 {
        eprintln!("skipped: needs root to give files to uid {OTHER}");
    }
    uid == 0
}

fn write(p: &Path, mode: u32) {
    fs::write(p, POLICY).unwrap();
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn policy_in_an_open_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let open = dir.path().join("open");
    fs::create_dir(&open).unwrap();
    fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
    let p = open.join("policy.toml");
    write(&p, 0o644);
    let e = Acl::load(&p).unwrap_err();
    assert!(matches!(e, AclError::Untrusted(_)), "{e}");
    assert!(
        e.to_string()
            .contains(&format!("chmod go-w {}", open.display())),
        "{e}"
    );
    fs::set_permissions(&open, fs::Permissions::from_mode(0o755)).unwrap();
    Acl::load(&p).unwrap();
}

#[test]
fn policy_owned_by_another_user_is_refused() {
    if !root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("policy.toml");
    write(&p, 0o644);
    Acl::load(&p).unwrap();
    std::os::unix::fs::chown(&p, Some(OTHER), None).unwrap();
    let e = Acl::load(&p).unwrap_err();
    assert!(matches!(e, AclError::Untrusted(_)), "{e}");
    let m = e.to_string();
    assert!(
        m.contains(&p.display().to_string()) && m.contains("chown"),
        "{m}"
    );
}

#[test]
fn policy_through_a_symlink_in_another_users_directory_is_refused() {
    if !root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("policy.toml");
    write(&real, 0o644);
    let theirs = dir.path().join("mallory");
    fs::create_dir(&theirs).unwrap();
    fs::set_permissions(&theirs, fs::Permissions::from_mode(0o755)).unwrap();
    let link = theirs.join("policy.toml");
    symlink(&real, &link).unwrap();
    // Ours, the link is followed.
    Acl::load(&link).unwrap();
    std::os::unix::fs::chown(&theirs, Some(OTHER), None).unwrap();
    let e = Acl::load(&link).unwrap_err();
    assert!(matches!(e, AclError::Untrusted(_)), "{e}");
    assert!(e.to_string().contains(&theirs.display().to_string()), "{e}");
}

#[test]
fn audit_log_needs_a_trusted_directory() {
    use canopy_acl::{AuditError, AuditLog};
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    fs::create_dir(&logs).unwrap();
    fs::set_permissions(&logs, fs::Permissions::from_mode(0o755)).unwrap();
    let log = logs.join("audit.log");
    AuditLog::open(&log).unwrap();
    // Group-writable: group could replace the log.
    fs::set_permissions(&logs, fs::Permissions::from_mode(0o775)).unwrap();
    let e = AuditLog::open(&log).unwrap_err();
    assert!(matches!(e, AuditError::Untrusted(_)), "{e}");
    assert!(
        e.to_string()
            .contains(&format!("chmod go-w {}", logs.display())),
        "{e}"
    );
    // Shared like /tmp: anyone could have made the log first.
    fs::set_permissions(&logs, fs::Permissions::from_mode(0o1777)).unwrap();
    let e = AuditLog::open(&log).unwrap_err();
    assert!(matches!(e, AuditError::Untrusted(_)), "{e}");
    assert!(!e.to_string().contains("chmod go-w"), "{e}");
    fs::set_permissions(&logs, fs::Permissions::from_mode(0o755)).unwrap();
    // A symlink in place of the log is not followed.
    let link = logs.join("link.log");
    symlink(&log, &link).unwrap();
    assert!(AuditLog::open(&link).is_err());
    // An existing log owned by someone else.
    if root() {
        std::os::unix::fs::chown(&log, Some(OTHER), None).unwrap();
        let e = AuditLog::open(&log).unwrap_err();
        assert!(matches!(e, AuditError::Untrusted(_)), "{e}");
    }
}
