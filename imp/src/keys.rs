//! Ed25519 key files.
//!
//! * A public key file holds `ed25519:` followed by the standard base64 of
//!   the 32-byte key, on one line (blank lines and lines starting with `#`
//!   are ignored).
//! * A secret key file holds `ed25519-secret:` followed by the base64 of
//!   the 32-byte seed. It must be mode 0600 (or stricter) and owned by root.
//!
//! `canopy-imp keygen PATH` writes `PATH` (secret) and `PATH.pub`.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ed25519_dalek::{SigningKey, VerifyingKey};
use zeroize::Zeroizing;

use crate::envelope::{b64_decode, b64_encode};

const PUBLIC_PREFIX: &str = "ed25519:";
const SECRET_PREFIX: &str = "ed25519-secret:";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key file {path}: {source}; check the path in imp.toml")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("key file {path} is not {what} (one line `{prefix}<base64 of 32 bytes>`); make it with `canopy-imp keygen`")]
    Format {
        path: PathBuf,
        what: &'static str,
        prefix: &'static str,
    },
    #[error(
        "key file {path} holds an invalid ed25519 public key; make it with `canopy-imp keygen`"
    )]
    Invalid { path: PathBuf },
    #[error("cannot write key file {path}: {source}; check that the directory exists and that it does not exist yet")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot get random bytes for a key: {0}")]
    Random(String),
}

fn one_line(text: &str) -> Option<&str> {
    let mut lines = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'));
    let first = lines.next()?;
    lines.next().is_none().then_some(first)
}

/// Parse the text of a public key file.
pub fn parse_public(text: &str) -> Option<VerifyingKey> {
    let b = b64_decode(one_line(text)?.strip_prefix(PUBLIC_PREFIX)?)?;
    VerifyingKey::from_bytes(&b.try_into().ok()?).ok()
}

/// Parse the text of a secret key file.
pub fn parse_secret(text: &str) -> Option<SigningKey> {
    let b = Zeroizing::new(b64_decode(one_line(text)?.strip_prefix(SECRET_PREFIX)?)?);
    let seed: &[u8; 32] = b.as_slice().try_into().ok()?;
    Some(SigningKey::from_bytes(seed))
}

/// The text of a public key file.
pub fn public_text(key: &VerifyingKey) -> String {
    format!("{PUBLIC_PREFIX}{}\n", b64_encode(key.as_bytes()))
}

/// The text of a secret key file.
pub fn secret_text(key: &SigningKey) -> Zeroizing<String> {
    Zeroizing::new(format!("{SECRET_PREFIX}{}\n", b64_encode(key.as_bytes())))
}

/// Read a public key file (the caller checks that it is trusted).
pub fn read_public(path: &Path) -> Result<VerifyingKey, KeyError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_public(&text).ok_or_else(|| KeyError::Format {
        path: path.to_owned(),
        what: "an ed25519 public key",
        prefix: PUBLIC_PREFIX,
    })
}

/// Parse secret key text read from `path`.
pub fn secret_from(text: &str, path: &Path) -> Result<SigningKey, KeyError> {
    parse_secret(text).ok_or_else(|| KeyError::Format {
        path: path.to_owned(),
        what: "an ed25519 secret key",
        prefix: SECRET_PREFIX,
    })
}

/// A new random key.
pub fn generate() -> Result<SigningKey, KeyError> {
    let mut seed = Zeroizing::new([0u8; 32]);
    getrandom::getrandom(seed.as_mut()).map_err(|e| KeyError::Random(e.to_string()))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Write `path` (mode 0600, must not exist) and `path.pub` (mode 0644).
pub fn write_pair(path: &Path, key: &SigningKey) -> Result<PathBuf, KeyError> {
    let write = |p: &Path, mode: u32, text: &str| -> Result<(), KeyError> {
        let err = |source| KeyError::Write {
            path: p.to_owned(),
            source,
        };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(p)
            .map_err(err)?;
        f.write_all(text.as_bytes()).map_err(err)
    };
    let mut pub_path = path.as_os_str().to_owned();
    pub_path.push(".pub");
    let pub_path = PathBuf::from(pub_path);
    write(path, 0o600, &secret_text(key))?;
    write(&pub_path, 0o644, &public_text(&key.verifying_key()))?;
    Ok(pub_path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_round_trip_and_bad_ones_are_refused() {
        let k = SigningKey::from_bytes(&[7; 32]);
        assert_eq!(
            parse_public(&format!("# node1\n{}", public_text(&k.verifying_key()))),
            Some(k.verifying_key())
        );
        assert_eq!(
            parse_secret(&secret_text(&k)).unwrap().to_bytes(),
            k.to_bytes()
        );
        assert!(parse_public(&secret_text(&k)).is_none());
        assert!(parse_secret(&public_text(&k.verifying_key())).is_none());
        let two = format!("{0}{0}", public_text(&k.verifying_key()));
        assert!(parse_public(&two).is_none());
        assert!(parse_public("ed25519:AAAA\n").is_none());
    }

    #[test]
    fn write_pair_makes_a_private_secret_and_refuses_to_overwrite() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k");
        let k = generate().unwrap();
        let pubp = write_pair(&p, &k).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o077, 0);
        assert_eq!(read_public(&pubp).unwrap(), k.verifying_key());
        assert!(write_pair(&p, &k).is_err());
    }
}
