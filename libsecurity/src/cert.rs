//! ZPL CURVE certificates, the format of flux-core (`flux keygen`), czmq
//! (`zcert`) and pyzmq (`zmq.auth.create_certificates`):
//!
//! ```text
//! #   ZeroMQ CURVE **Secret** Certificate
//! #   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.
//!
//! metadata
//!     name = "node1"
//! curve
//!     public-key = "<40 Z85 chars>"
//!     secret-key = "<40 Z85 chars>"
//! ```
//!
//! A public certificate has the same layout without `secret-key`. Secret
//! certificates that group or other can read are refused, as flux does, and
//! the public key must match the secret key.

use crate::{z85, CurveKeypair};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot read certificate {path}: {source}; check the path and its permissions")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write certificate {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("refusing secret certificate {path}: group or other can read it (mode {mode:o}); run chmod 600 {path}")]
    Permissions { path: PathBuf, mode: u32 },
    #[error("{path}:{line}: {msg}")]
    Syntax {
        path: PathBuf,
        line: usize,
        msg: String,
    },
    #[error("{path}: no curve public-key; is this a ZeroMQ CURVE certificate?")]
    NoPublicKey { path: PathBuf },
    #[error("{path}: no curve secret-key; this is a public certificate, pass the secret one")]
    NoSecretKey { path: PathBuf },
    #[error("{path}: public-key does not match secret-key; regenerate the certificate with canopy keygen")]
    Mismatch { path: PathBuf },
    /// Owned by someone else, or reached through a directory or symlink
    /// that someone else controls (see [`crate::trust`]).
    #[error("certificate refused: {0}")]
    Untrusted(#[from] crate::trust::TrustError),
}

/// A parsed certificate. `secret` is present only in secret certificates.
pub struct Cert {
    pub public: [u8; 32],
    pub secret: Option<Zeroizing<[u8; 32]>>,
    pub metadata: Vec<(String, String)>,
}

impl std::fmt::Debug for Cert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cert")
            .field("public", &z85::encode(&self.public))
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("metadata", &self.metadata)
            .finish()
    }
}

impl Cert {
    /// The `name` metadata, if any.
    pub fn name(&self) -> Option<&str> {
        self.metadata
            .iter()
            .find(|(k, _)| k == "name")
            .map(|(_, v)| v.as_str())
    }

    /// The keypair of a secret certificate.
    pub fn keypair(&self) -> Option<CurveKeypair> {
        self.secret
            .as_ref()
            .map(|s| CurveKeypair::from_secret(Zeroizing::new(**s)))
    }
}

/// Parse certificate text; `path` is used in error messages only.
pub fn parse(text: &str, path: &Path) -> Result<Cert, CertError> {
    let syntax = |line: usize, msg: String| CertError::Syntax {
        path: path.to_path_buf(),
        line,
        msg,
    };
    let mut section = String::new();
    let mut public = None;
    let mut secret: Option<Zeroizing<[u8; 32]>> = None;
    let mut metadata = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let trimmed = raw.trim_end();
        if trimmed.trim().is_empty() || trimmed.trim_start().starts_with('#') {
            continue;
        }
        let indented = trimmed.starts_with(' ') || trimmed.starts_with('\t');
        let body = trimmed.trim();
        if !indented {
            if body.contains('=') {
                return Err(syntax(
                    line,
                    format!("'{body}' must be indented under a section (metadata or curve)"),
                ));
            }
            section = body.to_string();
            continue;
        }
        let (key, value) = body
            .split_once('=')
            .ok_or_else(|| syntax(line, format!("expected 'name = \"value\"', found '{body}'")))?;
        let key = key.trim();
        let value = value.trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(value);
        match (section.as_str(), key) {
            ("curve", "public-key") => {
                public =
                    Some(decode_key(value).map_err(|m| syntax(line, format!("public-key: {m}")))?)
            }
            ("curve", "secret-key") => {
                secret = Some(Zeroizing::new(
                    decode_key(value).map_err(|m| syntax(line, format!("secret-key: {m}")))?,
                ))
            }
            ("curve", other) => {
                return Err(syntax(
                    line,
                    format!("unknown curve field '{other}'; expected public-key or secret-key"),
                ))
            }
            ("metadata", k) => metadata.push((k.to_string(), value.to_string())),
            ("", _) => return Err(syntax(line, "field outside any section".into())),
            (s, _) => {
                return Err(syntax(
                    line,
                    format!("unknown section '{s}'; expected metadata or curve"),
                ))
            }
        }
    }
    let public = public.ok_or_else(|| CertError::NoPublicKey {
        path: path.to_path_buf(),
    })?;
    if let Some(s) = &secret {
        let derived = CurveKeypair::from_secret(Zeroizing::new(**s));
        if *derived.public() != public {
            return Err(CertError::Mismatch {
                path: path.to_path_buf(),
            });
        }
    }
    Ok(Cert {
        public,
        secret,
        metadata,
    })
}

fn decode_key(v: &str) -> Result<[u8; 32], String> {
    if v.len() != 40 {
        return Err(format!("expected 40 Z85 characters, found {}", v.len()));
    }
    let b = z85::decode(v).map_err(|e| e.to_string())?;
    b.try_into().map_err(|_| "wrong key length".to_string())
}

/// Check `path` as [`crate::trust::check_trusted`] does for this process's
/// effective uid, and read the file that was checked.
fn read_trusted(path: &Path, kind: crate::trust::TrustKind) -> Result<String, CertError> {
    use std::io::Read;
    // A missing or unreachable file keeps its plain "cannot read" error.
    std::fs::metadata(path).map_err(|source| CertError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let trusted = crate::trust::check_trusted(path, kind, crate::trust::service_uid())?;
    let mut text = String::new();
    trusted
        .open()?
        .read_to_string(&mut text)
        .map_err(|source| CertError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(text)
}

/// Load a secret certificate, refusing one that group or other can read,
/// and one that is not trusted ([`crate::trust::TrustKind::Secret`]: owned
/// by root or this process's user, on a path nobody else can change).
pub fn load_secret(path: &Path) -> Result<Cert, CertError> {
    let md = std::fs::metadata(path).map_err(|source| CertError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mode = md.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(CertError::Permissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    let text = Zeroizing::new(read_trusted(path, crate::trust::TrustKind::Secret)?);
    let cert = parse(&text, path)?;
    if cert.secret.is_none() {
        return Err(CertError::NoSecretKey {
            path: path.to_path_buf(),
        });
    }
    Ok(cert)
}

/// Load a public certificate (a secret one is accepted; only its public
/// key is used), refusing one that is not trusted
/// ([`crate::trust::TrustKind::File`]: owned by root or this process's
/// user, not writable by others, on a path nobody else can change).
pub fn load_public(path: &Path) -> Result<Cert, CertError> {
    let text = Zeroizing::new(read_trusted(path, crate::trust::TrustKind::File)?);
    let mut c = parse(&text, path)?;
    c.secret = None;
    Ok(c)
}

fn render(kp: &CurveKeypair, name: &str, with_secret: bool) -> Zeroizing<String> {
    let mut s = String::new();
    if with_secret {
        s.push_str("#   ZeroMQ CURVE **Secret** Certificate\n");
        s.push_str("#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.\n");
    } else {
        s.push_str("#   ZeroMQ CURVE Public Certificate\n");
        s.push_str("#   Exchange securely, or use a secure mechanism to verify the contents\n");
        s.push_str("#   of this file after exchange. Store public certificates in your home\n");
        s.push_str("#   directory, in the .curve subdirectory.\n");
    }
    s.push_str("\nmetadata\n");
    s.push_str(&format!("    name = \"{}\"\n", name.replace('"', "")));
    s.push_str("curve\n");
    s.push_str(&format!("    public-key = \"{}\"\n", kp.public_z85()));
    if with_secret {
        s.push_str(&format!(
            "    secret-key = \"{}\"\n",
            z85::encode(kp.secret())
        ));
    }
    Zeroizing::new(s)
}

/// The public certificate text for a keypair.
pub fn public_text(kp: &CurveKeypair, name: &str) -> String {
    render(kp, name, false).to_string()
}

/// Write a secret certificate (mode 0600, never overwriting) and its
/// public certificate.
pub fn write_pair(
    kp: &CurveKeypair,
    name: &str,
    secret_path: &Path,
    public_path: &Path,
) -> Result<(), CertError> {
    let werr = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CertError::Write { path, source }
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(secret_path)
        .map_err(werr(secret_path))?;
    f.write_all(render(kp, name, true).as_bytes())
        .map_err(werr(secret_path))?;
    let mut p = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(public_path)
        .map_err(werr(public_path))?;
    p.write_all(public_text(kp, name).as_bytes())
        .map_err(werr(public_path))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_then_load() {
        let dir = tempfile::tempdir().unwrap();
        let kp = CurveKeypair::generate().unwrap();
        let s = dir.path().join("node1.key_secret");
        let p = dir.path().join("node1.key");
        write_pair(&kp, "node1", &s, &p).unwrap();
        let c = load_secret(&s).unwrap();
        assert_eq!(c.public, *kp.public());
        assert_eq!(c.name(), Some("node1"));
        assert_eq!(c.keypair().unwrap().secret(), kp.secret());
        let pc = load_public(&p).unwrap();
        assert_eq!(pc.public, *kp.public());
        assert!(pc.secret.is_none());
        assert!(matches!(
            load_secret(&p),
            Err(CertError::Permissions { .. }) | Err(CertError::NoSecretKey { .. })
        ));
        // Never overwrite.
        assert!(matches!(
            write_pair(&kp, "x", &s, &p),
            Err(CertError::Write { .. })
        ));
        // Debug never shows the secret.
        assert!(!format!("{c:?}").contains(&z85::encode(kp.secret())));
    }

    #[test]
    fn refuses_readable_secret() {
        let dir = tempfile::tempdir().unwrap();
        let kp = CurveKeypair::generate().unwrap();
        let s = dir.path().join("a_secret");
        let p = dir.path().join("a");
        write_pair(&kp, "a", &s, &p).unwrap();
        std::fs::set_permissions(&s, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = load_secret(&s).unwrap_err();
        assert!(
            matches!(e, CertError::Permissions { mode: 0o640, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("chmod 600"));
    }

    #[test]
    fn refuses_untrusted_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let kp = CurveKeypair::generate().unwrap();
        let certs = dir.path().join("public");
        std::fs::create_dir(&certs).unwrap();
        let s = dir.path().join("n1.key_secret");
        let p = certs.join("n1.key");
        write_pair(&kp, "n1", &s, &p).unwrap();
        load_public(&p).unwrap();
        // A certificate directory anyone can write: anyone could plant a key.
        std::fs::set_permissions(&certs, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = load_public(&p).unwrap_err();
        assert!(
            matches!(
                e,
                CertError::Untrusted(crate::trust::TrustError::DirWritable { .. })
            ),
            "{e}"
        );
        assert!(e
            .to_string()
            .contains(&format!("chmod go-w {}", certs.display())));
        std::fs::set_permissions(&certs, std::fs::Permissions::from_mode(0o755)).unwrap();
        // A certificate owned by another user (needs root to arrange).
        if nix::unistd::geteuid().is_root() {
            std::os::unix::fs::chown(&s, Some(65534), None).unwrap();
            std::os::unix::fs::chown(&p, Some(65534), None).unwrap();
            let e = load_secret(&s).unwrap_err();
            assert!(
                matches!(
                    e,
                    CertError::Untrusted(crate::trust::TrustError::Owner { .. })
                ),
                "{e}"
            );
            assert!(e.to_string().contains("chown root"), "{e}");
            assert!(matches!(load_public(&p), Err(CertError::Untrusted(_))));
        } else {
            eprintln!("skipped: the other-owner case needs root");
        }
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let p = Path::new("x.cert");
        let e = parse(
            "metadata\n    name = \"a\"\ncurve\n    public-key = \"short\"\n",
            p,
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("x.cert:4: public-key"), "{e}");
        let e = parse("curve\n    colour = \"red\"\n", p).unwrap_err();
        assert!(e.to_string().contains("x.cert:2"), "{e}");
        let e = parse("metadata\n", p).unwrap_err();
        assert!(matches!(e, CertError::NoPublicKey { .. }));
        let a = CurveKeypair::generate().unwrap();
        let b = CurveKeypair::generate().unwrap();
        let text = format!(
            "curve\n    public-key = \"{}\"\n    secret-key = \"{}\"\n",
            a.public_z85(),
            z85::encode(b.secret())
        );
        assert!(matches!(parse(&text, p), Err(CertError::Mismatch { .. })));
    }
}
