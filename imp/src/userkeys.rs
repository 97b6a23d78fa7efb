//! A user's exec identity, kept in `~/.canopy/`:
//!
//! * `exec.key`: the user's Ed25519 secret key (`ed25519-secret:<base64>`),
//!   mode 0600, made by [`load_or_create_key`] the first time;
//! * `exec.cert`: the certificate envelope the site CA issued for that key
//!   (`canopy cert request`), mode 0600, written by [`save_cert`].
//!
//! Both are refused, naming the file and the fix, when another user could
//! read the key or change either file (the [`canopy_security::trust`]
//! rules: owned by the user, not writable by group or other, nor any
//! directory above them; the key not readable by group or other either).
//! [`load_identity`] gives `canopy exec` the key, the exact certificate
//! bytes to send and the certificate, refusing an expired one.

use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use canopy_security::trust::{check_trusted, TrustError, TrustKind};
use ed25519_dalek::SigningKey;
use zeroize::Zeroizing;

use crate::cert::UserCert;
use crate::envelope::{Envelope, UnixTime, MAX_ENVELOPE_BYTES, USER_CERT_TYPE};
use crate::keys;

pub use crate::request::sign_request;

/// The directory under `$HOME`.
pub const DIR_NAME: &str = ".canopy";
/// The user's secret key, in [`DIR_NAME`].
pub const KEY_FILE: &str = "exec.key";
/// The user's certificate envelope, in [`DIR_NAME`].
pub const CERT_FILE: &str = "exec.cert";
/// Clock skew allowed before a certificate's `not_before` (as the helper).
pub const SKEW: UnixTime = 60;

#[derive(Debug, thiserror::Error)]
pub enum UserKeyError {
    #[error("HOME is not set, so ~/{DIR_NAME} cannot be found; set HOME to your home directory")]
    NoHome,
    #[error("cannot create {path}: {source}; check that your home directory exists and is writable by you")]
    CreateDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} refused: {source}")]
    Untrusted {
        path: String,
        #[source]
        source: TrustError,
    },
    #[error("{path} is owned by uid {owner}, not by you (uid {me}); remove it and run canopy cert request")]
    NotYours { path: String, owner: u32, me: u32 },
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}; check the permissions of {dir}")]
    Write {
        path: String,
        dir: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not an exec key (one line `ed25519-secret:<base64 of 32 bytes>`); remove it and run canopy cert request to make a new key")]
    BadKey { path: String },
    #[error("{path} does not exist; run canopy cert request")]
    Missing { path: String },
    #[error("{path} is not a certificate ({why}); run canopy cert request")]
    BadCert { path: String, why: String },
    #[error("{path} certifies another key than {key}; run canopy cert request")]
    OtherKey { path: String, key: String },
    #[error("{path} expired at {at}; run canopy cert request")]
    Expired { path: String, at: String },
    #[error(
        "{path} is not valid before {at}; check this host's clock, or run canopy cert request"
    )]
    NotYetValid { path: String, at: String },
    #[error("cannot get random bytes for a key: {0}")]
    Random(String),
}

type E = UserKeyError;

/// `$HOME/.canopy`.
pub fn default_dir() -> Result<PathBuf, UserKeyError> {
    match std::env::var_os("HOME") {
        Some(h) if !h.is_empty() => Ok(PathBuf::from(h).join(DIR_NAME)),
        _ => Err(E::NoHome),
    }
}

/// `path` for messages, with `$HOME` shown as `~`.
pub fn shown(path: &Path) -> String {
    if let Some(home) = std::env::var_os("HOME").filter(|h| !h.is_empty() && h != "/") {
        if let Ok(rest) = path.strip_prefix(&home) {
            return format!("~/{}", rest.display());
        }
    }
    path.display().to_string()
}

fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// The identity directory, created (mode 0700) if missing; refused if
/// group or other can write it or any directory above it.
fn ensure_dir(dir: &Path) -> Result<(), UserKeyError> {
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(source) => {
            return Err(E::CreateDir {
                path: shown(dir),
                source,
            })
        }
    }
    trusted(dir, TrustKind::Directory).map(|_| ())
}

/// [`check_trusted`] for the running user, also refusing a file root owns
/// (an identity file must be the user's own).
fn trusted(path: &Path, kind: TrustKind) -> Result<canopy_security::trust::TrustedFile, E> {
    let me = euid();
    let t = check_trusted(path, kind, me).map_err(|source| match &source {
        TrustError::Io { source: io, .. } if io.kind() == std::io::ErrorKind::NotFound => {
            E::Missing { path: shown(path) }
        }
        _ => E::Untrusted {
            path: shown(path),
            source,
        },
    })?;
    if t.uid != me {
        return Err(E::NotYours {
            path: shown(path),
            owner: t.uid,
            me,
        });
    }
    Ok(t)
}

/// Read a trusted file of at most `limit` bytes.
fn read_trusted(path: &Path, kind: TrustKind, limit: u64) -> Result<Zeroizing<Vec<u8>>, E> {
    let t = trusted(path, kind)?;
    let file = t.open().map_err(|source| E::Untrusted {
        path: shown(path),
        source,
    })?;
    let mut buf = Zeroizing::new(Vec::new());
    file.take(limit)
        .read_to_end(&mut buf)
        .map_err(|source| E::Read {
            path: shown(path),
            source,
        })?;
    Ok(buf)
}

/// Read the secret key at `path` (mode 0600 or stricter, the user's own).
pub fn read_key(path: &Path) -> Result<SigningKey, UserKeyError> {
    let bytes = read_trusted(path, TrustKind::Secret, 4096)?;
    let text = std::str::from_utf8(&bytes).map_err(|_| E::BadKey { path: shown(path) })?;
    keys::parse_secret(text).ok_or_else(|| E::BadKey { path: shown(path) })
}

/// The user's key in `dir` (`exec.key`), made (mode 0600) if there is
/// none yet. `dir` is created (mode 0700) if missing.
pub fn load_or_create_key(dir: &Path) -> Result<SigningKey, UserKeyError> {
    ensure_dir(dir)?;
    let path = dir.join(KEY_FILE);
    let opened = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path);
    let mut f = match opened {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return read_key(&path),
        Err(source) => {
            return Err(E::Write {
                path: shown(&path),
                dir: shown(dir),
                source,
            })
        }
    };
    let key = keys::generate().map_err(|e| E::Random(e.to_string()))?;
    let werr = |source| E::Write {
        path: shown(&path),
        dir: shown(dir),
        source,
    };
    f.write_all(keys::secret_text(&key).as_bytes())
        .map_err(werr)?;
    f.sync_all().map_err(werr)?;
    drop(f);
    // What is there now must pass the same checks as a key read later.
    read_key(&path)
}

/// Save a certificate envelope as `dir/exec.cert` (mode 0600), replacing
/// the old one atomically.
pub fn save_cert(dir: &Path, envelope: &[u8]) -> Result<PathBuf, UserKeyError> {
    ensure_dir(dir)?;
    let path = dir.join(CERT_FILE);
    let tmp = dir.join(format!(".{CERT_FILE}.{}", std::process::id()));
    let werr = |p: &Path| {
        let p = shown(p);
        move |source| E::Write {
            path: p,
            dir: shown(dir),
            source,
        }
    };
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(werr(&tmp))?;
    f.write_all(envelope).map_err(werr(&tmp))?;
    f.sync_all().map_err(werr(&tmp))?;
    drop(f);
    std::fs::rename(&tmp, &path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        werr(&path)(e)
    })?;
    Ok(path)
}

/// The saved certificate: its exact envelope bytes and its body. The
/// signature is not checked (the user need not hold the CA's key; the
/// helper checks it); expiry is not checked either (see
/// [`load_identity`]).
pub fn read_cert(dir: &Path) -> Result<(Vec<u8>, UserCert), UserKeyError> {
    let path = dir.join(CERT_FILE);
    let bytes = read_trusted(&path, TrustKind::File, MAX_ENVELOPE_BYTES as u64 + 1)?;
    let mut wire = bytes.to_vec();
    while wire.last().is_some_and(u8::is_ascii_whitespace) {
        wire.pop();
    }
    let bad = |why: String| E::BadCert {
        path: shown(&path),
        why,
    };
    let env = Envelope::parse(&wire).map_err(|e| bad(e.to_string()))?;
    if env.payload_type() != USER_CERT_TYPE {
        return Err(bad(format!(
            "its type is {:?}, not {USER_CERT_TYPE:?}",
            env.payload_type()
        )));
    }
    let cert = UserCert::parse(env.unverified_body()).map_err(|e| bad(e.to_string()))?;
    Ok((wire, cert))
}

/// Seconds since the Unix epoch now.
pub fn now() -> UnixTime {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The key, the certificate's exact envelope bytes, and the certificate,
/// from `dir`: refused (naming the file and what to do) if either file is
/// missing or not trusted, the certificate is for another key, or it has
/// expired.
pub fn load_identity(dir: &Path) -> Result<(SigningKey, Vec<u8>, UserCert), UserKeyError> {
    load_identity_at(dir, now())
}

/// [`load_identity`] at time `now`.
pub fn load_identity_at(
    dir: &Path,
    now: UnixTime,
) -> Result<(SigningKey, Vec<u8>, UserCert), UserKeyError> {
    let key_path = dir.join(KEY_FILE);
    let key = read_key(&key_path)?;
    let (wire, cert) = read_cert(dir)?;
    let path = shown(&dir.join(CERT_FILE));
    if cert.public_key() != Some(key.verifying_key()) {
        return Err(E::OtherKey {
            path,
            key: shown(&key_path),
        });
    }
    if now >= cert.not_after {
        return Err(E::Expired {
            path,
            at: fmt_time(cert.not_after),
        });
    }
    if now.saturating_add(SKEW) < cert.not_before {
        return Err(E::NotYetValid {
            path,
            at: fmt_time(cert.not_before),
        });
    }
    Ok((key, wire, cert))
}

/// `YYYY-MM-DD HH:MM:SS UTC` for Unix seconds.
pub fn fmt_time(t: UnixTime) -> String {
    let days = (t / 86_400) as i64;
    let secs = t % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cert::CertKind;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    fn chmod(p: &Path, m: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    }

    fn cert_for(key: &SigningKey, not_before: u64, not_after: u64) -> Vec<u8> {
        let ca = SigningKey::from_bytes(&[9; 32]);
        UserCert::issue(
            CertKind::Ca,
            "unix:alice",
            "alice",
            &key.verifying_key(),
            not_before,
            not_after,
            &ca,
        )
        .1
    }

    #[test]
    fn the_key_is_made_once_private_and_read_back() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join(DIR_NAME);
        let k = load_or_create_key(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(KEY_FILE)), 0o600);
        let again = load_or_create_key(&dir).unwrap();
        assert_eq!(k.to_bytes(), again.to_bytes());
    }

    #[test]
    fn a_key_others_can_read_or_a_directory_others_can_write_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join(DIR_NAME);
        load_or_create_key(&dir).unwrap();
        let key = dir.join(KEY_FILE);
        chmod(&key, 0o640);
        let e = load_or_create_key(&dir).unwrap_err().to_string();
        assert!(e.contains("exec.key") && e.contains("chmod 600"), "{e}");
        chmod(&key, 0o600);
        chmod(&dir, 0o777);
        let e = load_or_create_key(&dir).unwrap_err().to_string();
        assert!(e.contains(".canopy") && e.contains("chmod go-w"), "{e}");
        chmod(&dir, 0o700);
        std::fs::write(&key, "ed25519-secret:short\n").unwrap();
        let e = load_or_create_key(&dir).unwrap_err().to_string();
        assert!(e.contains("is not an exec key"), "{e}");
    }

    #[test]
    fn the_saved_certificate_loads_until_it_expires() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join(DIR_NAME);
        // No key, no certificate yet: say what to run.
        let e = load_identity_at(&dir, 150).unwrap_err().to_string();
        assert!(
            e.contains("exec.key does not exist; run canopy cert request"),
            "{e}"
        );
        let k = load_or_create_key(&dir).unwrap();
        let e = load_identity_at(&dir, 150).unwrap_err().to_string();
        assert!(
            e.contains("exec.cert does not exist; run canopy cert request"),
            "{e}"
        );
        let wire = cert_for(&k, 100, 200);
        let path = save_cert(&dir, &wire).unwrap();
        assert_eq!(mode(&path), 0o600);
        let (key, bytes, cert) = load_identity_at(&dir, 150).unwrap();
        assert_eq!(key.to_bytes(), k.to_bytes());
        assert_eq!(bytes, wire);
        assert_eq!(cert.user, "alice");
        let e = load_identity_at(&dir, 200).unwrap_err().to_string();
        assert!(
            e.contains("exec.cert expired at 1970-01-01 00:03:20 UTC; run canopy cert request"),
            "{e}"
        );
        let e = load_identity_at(&dir, 10).unwrap_err().to_string();
        assert!(e.contains("not valid before"), "{e}");
        // A certificate for another key.
        let other = SigningKey::from_bytes(&[3; 32]);
        save_cert(&dir, &cert_for(&other, 100, 200)).unwrap();
        let e = load_identity_at(&dir, 150).unwrap_err().to_string();
        assert!(e.contains("certifies another key"), "{e}");
        // Not a certificate.
        save_cert(&dir, b"{}").unwrap();
        let e = load_identity_at(&dir, 150).unwrap_err().to_string();
        assert!(e.contains("is not a certificate"), "{e}");
        // Writable by others.
        save_cert(&dir, &wire).unwrap();
        chmod(&path, 0o622);
        let e = load_identity_at(&dir, 150).unwrap_err().to_string();
        assert!(e.contains("exec.cert") && e.contains("writable"), "{e}");
    }

    #[test]
    fn sign_request_makes_an_envelope_the_certified_key_verifies() {
        let k = SigningKey::from_bytes(&[4; 32]);
        let r = crate::request::tests::sample();
        let wire = sign_request(&r, &k);
        let env = Envelope::parse(&wire).unwrap();
        let body = env
            .verify(
                crate::envelope::EXEC_REQUEST_TYPE,
                &k.verifying_key(),
                "request",
            )
            .unwrap();
        assert_eq!(crate::request::ExecRequest::parse(body).unwrap(), r);
    }

    #[test]
    fn times_are_shown_in_utc() {
        assert_eq!(fmt_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(fmt_time(1_796_000_000), "2026-11-30 00:53:20 UTC");
        assert_eq!(fmt_time(951_782_400), "2000-02-29 00:00:00 UTC");
    }
}
