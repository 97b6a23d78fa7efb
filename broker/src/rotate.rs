//! Key rotation without downtime: the files, the keys each broker accepts,
//! and the I/O-free state of a link being moved to a new key.
//!
//! The procedure (docs/operations.md, "Rotating a node's key"):
//!
//! 1. `canopy key new HOST` writes `<curve_cert>.next` (secret, 0600) and
//!    `<public cert>.next` next to HOST's current certificates.
//! 2. `canopy key reload` (or SIGHUP): every broker re-reads its
//!    neighbours' public certificates, current and `.next`, and admits both
//!    keys for that rank (ZAP and the hello check).
//! 3. `canopy key switch HOST`: HOST's broker loads its `.next` secret and
//!    *relinks*: to its parent with its new client key, and it tells its
//!    children to relink to it with its new server key, then rebinds its
//!    ROUTER with that key.
//! 4. `canopy key retire HOST` moves the `.next` files over the old ones and
//!    reloads every broker, so the old key is no longer admitted.
//!
//! A **relink** moves one parent-child link to a new connection without
//! losing a message and without a new session:
//!
//! ```text
//!  child                                   parent
//!  pause: queue what goes up  -- relink -->  hold: queue what goes down
//!  (last message on the old link)            <-- drained -- (last message on it)
//!  close the old connection, connect anew
//!  (new keys), hello with the same session -- hello -->  same session, held:
//!                                            move the link, answer, flush queue
//!  flush queue  <-- hello ok --
//! ```
//!
//! Requests in flight stay tracked on the link (they are keyed by rank, not
//! connection), so their responses find their way on the new connection.
//! A parent whose server key changes sends `rekey` with the new public key
//! to each child (which must be that rank's configured next key), waits
//! until every child has relinked away from the old listener, then rebinds.

use canopy_config::Config;
use canopy_security::{cert, CurveKeypair};
use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

pub use crate::core::keys::*;

/// Suffix of the certificates of a key being introduced.
pub const NEXT_SUFFIX: &str = ".next";

/// `PATH.next`.
pub fn next_path(p: &Path) -> PathBuf {
    let mut s = p.as_os_str().to_os_string();
    s.push(NEXT_SUFFIX);
    PathBuf::from(s)
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RotateError {
    #[error("{0}")]
    Files(String),
    #[error("rank {0} is not in the config")]
    NoSuchRank(u32),
}

fn ferr(e: impl std::fmt::Display) -> RotateError {
    RotateError::Files(e.to_string())
}

/// Refuse a file that group or other can write.
pub fn check_not_writable(path: &Path, what: &str) -> Result<(), RotateError> {
    let md = std::fs::metadata(path)
        .map_err(|e| ferr(format!("cannot read {what} {}: {e}", path.display())))?;
    let mode = md.permissions().mode() & 0o777;
    if mode & 0o022 != 0 {
        return Err(ferr(format!(
            "refusing {what} {}: group or other can write it (mode {mode:o}); run chmod go-w {}",
            path.display(),
            path.display()
        )));
    }
    Ok(())
}

/// A public key from a certificate that others cannot write.
pub fn load_public_key(path: &Path) -> Result<[u8; 32], RotateError> {
    check_not_writable(path, "public certificate")?;
    Ok(cert::load_public(path).map_err(ferr)?.public)
}

/// Where this broker's secret and its neighbours' public certificates are.
#[derive(Clone, Debug)]
pub struct KeyFiles {
    pub rank: u32,
    pub secret: PathBuf,
    /// Public certificate of this rank, its parent and its children.
    pub public: HashMap<u32, PathBuf>,
}

impl KeyFiles {
    pub fn from_config(
        config: &Config,
        rank: u32,
        neighbours: impl IntoIterator<Item = u32>,
    ) -> Result<KeyFiles, RotateError> {
        let secret = config
            .cert_path(rank)
            .ok_or(RotateError::NoSuchRank(rank))?;
        let mut public = HashMap::new();
        for r in neighbours.into_iter().chain([rank]) {
            public.insert(
                r,
                config
                    .public_cert_path(r)
                    .ok_or(RotateError::NoSuchRank(r))?,
            );
        }
        Ok(KeyFiles {
            rank,
            secret,
            public,
        })
    }

    /// Every neighbour's accepted keys: its current certificate, then its
    /// `.next` one if present. A missing current certificate is an error;
    /// so is a bad `.next` one (fail closed: the old ring stays).
    pub fn load_ring(&self) -> Result<KeyRing, RotateError> {
        let mut keys = HashMap::new();
        for (&rank, path) in &self.public {
            if rank == self.rank {
                continue;
            }
            let mut v = vec![load_public_key(path)?];
            let next = next_path(path);
            if next.exists() {
                let k = load_public_key(&next)?;
                if !v.contains(&k) {
                    v.push(k);
                }
            }
            keys.insert(rank, v);
        }
        Ok(KeyRing::new(keys))
    }

    /// The keypair to switch to: `<curve_cert>.next`, which must match this
    /// rank's `.next` public certificate (the key the neighbours admit).
    pub fn load_next(&self) -> Result<CurveKeypair, RotateError> {
        let path = next_path(&self.secret);
        let kp = cert::load_secret(&path)
            .map_err(|e| {
                ferr(format!(
                    "{e}; write the next key first with `canopy key new HOST`"
                ))
            })?
            .keypair()
            .ok_or_else(|| ferr(format!("{} has no secret key", path.display())))?;
        if let Some(p) = self.public.get(&self.rank) {
            let pubnext = next_path(p);
            let k = load_public_key(&pubnext).map_err(|e| {
                ferr(format!(
                    "{e}; the neighbours admit the new key only from {}",
                    pubnext.display()
                ))
            })?;
            if &k != kp.public() {
                return Err(ferr(format!(
                    "{} does not hold the public key of {}; run `canopy key new` again",
                    pubnext.display(),
                    path.display()
                )));
            }
        }
        Ok(kp)
    }
}

/// A host's certificate paths from the config: (rank, secret, public).
pub fn host_paths(config: &Config, host: &str) -> Result<(u32, PathBuf, PathBuf), RotateError> {
    let rank = config.rank_of(host).ok_or_else(|| {
        ferr(format!(
            "host {host} is not in the [bootstrap] hosts of the config; name a listed host"
        ))
    })?;
    let secret = config.cert_path(rank).ok_or_else(|| {
        ferr("the config has no bootstrap.curve_cert: rotation needs per-node certificates")
    })?;
    let public = config.public_cert_path(rank).ok_or_else(|| {
        ferr("the config has no bootstrap.curve_public_certs: rotation needs per-node certificates")
    })?;
    Ok((rank, secret, public))
}

/// `canopy key new HOST`: write HOST's next keypair beside its current
/// certificates. Refuses to overwrite an existing next key.
pub fn write_next(
    config: &Config,
    host: &str,
) -> Result<(u32, PathBuf, PathBuf, String), RotateError> {
    let (rank, secret, public) = host_paths(config, host)?;
    let (sn, pn) = (next_path(&secret), next_path(&public));
    for p in [&sn, &pn] {
        if p.exists() {
            return Err(ferr(format!(
                "{} already exists: a rotation of {host} is in progress; finish it with `canopy key switch` and `canopy key retire`, or remove the .next files to start over",
                p.display()
            )));
        }
    }
    let kp = CurveKeypair::generate().map_err(ferr)?;
    let name = config.host(rank).unwrap_or(host).to_string();
    cert::write_pair(&kp, &name, &sn, &pn).map_err(ferr)?;
    // Run as root for a broker's service user, the new files must stay
    // that user's, as the ones they will replace are.
    let owned = keep_owner(&sn, &secret).and_then(|()| keep_owner(&pn, &public));
    if let Err(e) = owned {
        let _ = std::fs::remove_file(&sn);
        let _ = std::fs::remove_file(&pn);
        return Err(e);
    }
    Ok((rank, sn, pn, kp.public_z85()))
}

/// `canopy key init`: a key pair for every host of `config`, the secret
/// certificates owned by `owner` (uid, gid) if given. Nothing is written
/// if any of the files exists already. Returns (host, secret, public) for
/// each host.
pub fn init_keys(
    config: &Config,
    owner: Option<(u32, u32)>,
) -> Result<Vec<(String, PathBuf, PathBuf)>, RotateError> {
    let mut plan = Vec::new();
    for rank in 0..config.size() {
        let host = config.host(rank).unwrap_or_default().to_string();
        let (_, secret, public) = host_paths(config, &host)?;
        for p in [&secret, &public] {
            if p.exists() {
                return Err(ferr(format!(
                    "{} already exists: key init writes a new layout and replaces nothing; rotate an existing key with `canopy key new {host}`, or move the old files aside",
                    p.display()
                )));
            }
        }
        plan.push((host, secret, public));
    }
    for (_, secret, public) in &plan {
        for dir in [secret.parent(), public.parent()].into_iter().flatten() {
            std::fs::create_dir_all(dir)
                .map_err(|e| ferr(format!("cannot create {}: {e}", dir.display())))?;
        }
    }
    let write = |host: &str, secret: &Path, public: &Path| -> Result<(), RotateError> {
        let kp = CurveKeypair::generate().map_err(ferr)?;
        cert::write_pair(&kp, host, secret, public).map_err(ferr)?;
        match owner {
            Some((uid, gid)) => chown_to(secret, uid, gid, "run key init as root"),
            None => Ok(()),
        }
    };
    for (i, (host, secret, public)) in plan.iter().enumerate() {
        if let Err(e) = write(host, secret, public) {
            // All or nothing: a half-written layout would make the next
            // attempt refuse with "already exists".
            for (_, s, p) in &plan[..=i] {
                let _ = std::fs::remove_file(s);
                let _ = std::fs::remove_file(p);
            }
            return Err(e);
        }
    }
    Ok(plan)
}

/// Give `path` to `uid`:`gid`; `fix` says how to get the right to.
fn chown_to(path: &Path, uid: u32, gid: u32, fix: &str) -> Result<(), RotateError> {
    nix::unistd::chown(
        path,
        Some(nix::unistd::Uid::from_raw(uid)),
        Some(nix::unistd::Gid::from_raw(gid)),
    )
    .map_err(|e| {
        ferr(format!(
            "cannot give {} to uid {uid}, gid {gid}: {e}; {fix}",
            path.display()
        ))
    })
}

/// Give `new` the owner and group of `like` (the file it will replace),
/// if `like` exists and they differ from ours.
fn keep_owner(new: &Path, like: &Path) -> Result<(), RotateError> {
    use std::os::unix::fs::MetadataExt;
    let Ok(md) = std::fs::metadata(like) else {
        return Ok(());
    };
    let (uid, gid) = (md.uid(), md.gid());
    if uid == nix::unistd::geteuid().as_raw() && gid == nix::unistd::getegid().as_raw() {
        return Ok(());
    }
    chown_to(
        new,
        uid,
        gid,
        &format!(
            "it would replace {}, which they own; run `canopy key new` as that user or as root",
            like.display()
        ),
    )
}

/// `canopy key retire HOST`, on disk: the `.next` certificates replace the
/// current ones (each an atomic rename). The public `.next` must exist; the
/// secret one only on HOST itself. Returns what was moved.
pub fn promote_next(config: &Config, host: &str) -> Result<Vec<PathBuf>, RotateError> {
    let (_, secret, public) = host_paths(config, host)?;
    let pn = next_path(&public);
    let new_pub = load_public_key(&pn).map_err(|e| {
        ferr(format!(
            "{e}; there is no next key to retire to (write one with `canopy key new {host}`)"
        ))
    })?;
    let sn = next_path(&secret);
    let mut moved = Vec::new();
    if sn.exists() {
        // Only compared with the public `.next`, never used: as root (the
        // admin moving the service user's files) a secret owned by the
        // service user is read as it is; anyone else loads it with the
        // usual ownership checks. The mode is checked either way.
        let cert = if nix::unistd::geteuid().is_root() {
            let mode = std::fs::metadata(&sn).map_err(ferr)?.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(ferr(format!(
                    "{} is readable or writable by group or others (mode {mode:04o}); run `chmod 600 {}`",
                    sn.display(),
                    sn.display()
                )));
            }
            let text = zeroize::Zeroizing::new(std::fs::read_to_string(&sn).map_err(ferr)?);
            cert::parse(&text, &sn).map_err(ferr)?
        } else {
            cert::load_secret(&sn).map_err(ferr)?
        };
        let kp = cert
            .keypair()
            .ok_or_else(|| ferr(format!("{} has no secret key", sn.display())))?;
        if kp.public() != &new_pub {
            return Err(ferr(format!(
                "{} and {} hold different keys; nothing was changed",
                sn.display(),
                pn.display()
            )));
        }
        std::fs::rename(&sn, &secret).map_err(|e| {
            ferr(format!(
                "cannot move {} to {}: {e}",
                sn.display(),
                secret.display()
            ))
        })?;
        moved.push(secret);
    }
    std::fs::rename(&pn, &public).map_err(|e| {
        ferr(format!(
            "cannot move {} to {}: {e}",
            pn.display(),
            public.display()
        ))
    })?;
    moved.push(public);
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;
    use canopy_security::z85;

    #[test]
    fn new_then_retire_moves_the_files_and_refuses_to_overwrite() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("pub")).unwrap();
        let text = format!(
            "[bootstrap]\ncurve_cert = \"{0}/%h.key_secret\"\ncurve_public_certs = \"{0}/pub\"\nhosts = [ {{ host = \"n[0-1]\" }} ]\n",
            d.path().display()
        );
        let config = Config::parse(&text, "t.toml").unwrap();
        let (rank, sn, pn, key) = write_next(&config, "n1").unwrap();
        assert_eq!(rank, 1);
        assert_eq!(sn, d.path().join("n1.key_secret.next"));
        assert_eq!(pn, d.path().join("pub/n1.key.next"));
        let mode = std::fs::metadata(&sn).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0);
        let e = write_next(&config, "n1").unwrap_err().to_string();
        assert!(
            e.contains("already exists") && e.contains("in progress"),
            "{e}"
        );
        assert!(write_next(&config, "n9")
            .unwrap_err()
            .to_string()
            .contains("not in the [bootstrap] hosts"));
        let moved = promote_next(&config, "n1").unwrap();
        assert_eq!(
            moved,
            vec![d.path().join("n1.key_secret"), d.path().join("pub/n1.key")]
        );
        assert!(!sn.exists() && !pn.exists());
        let now = load_public_key(&d.path().join("pub/n1.key")).unwrap();
        assert_eq!(z85::encode(&now), key);
        // Nothing left to retire.
        let e = promote_next(&config, "n1").unwrap_err().to_string();
        assert!(e.contains("canopy key new n1"), "{e}");
    }

    /// `key new` run as root keeps the owner of the files it will replace
    /// (issue 15 #6), so `key switch` works for the broker's user.
    #[test]
    fn new_keys_keep_the_owner_of_the_current_ones() {
        use std::os::unix::fs::MetadataExt;
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED new_keys_keep_the_owner_of_the_current_ones: needs root");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("pub")).unwrap();
        let text = format!(
            "[bootstrap]\ncurve_cert = \"{0}/%h.key_secret\"\ncurve_public_certs = \"{0}/pub\"\nhosts = [ {{ host = \"n[0-1]\" }} ]\n",
            d.path().display()
        );
        let config = Config::parse(&text, "t.toml").unwrap();
        let kp = CurveKeypair::generate().unwrap();
        let (secret, public) = (d.path().join("n1.key_secret"), d.path().join("pub/n1.key"));
        cert::write_pair(&kp, "n1", &secret, &public).unwrap();
        let (service, group) = (
            nix::unistd::Uid::from_raw(65534),
            nix::unistd::Gid::from_raw(65534),
        );
        for f in [&secret, &public] {
            nix::unistd::chown(f.as_path(), Some(service), Some(group)).unwrap();
        }
        let (_, sn, pn, _) = write_next(&config, "n1").unwrap();
        for f in [&sn, &pn] {
            let md = std::fs::metadata(f).unwrap();
            assert_eq!((md.uid(), md.gid()), (65534, 65534), "{}", f.display());
        }
        assert_eq!(std::fs::metadata(&sn).unwrap().mode() & 0o077, 0);
    }

    #[test]
    fn next_path_appends() {
        assert_eq!(
            next_path(Path::new("/etc/c/n1.key_secret")),
            PathBuf::from("/etc/c/n1.key_secret.next")
        );
    }

    #[test]
    fn files_load_current_and_next_and_refuse_mismatch() {
        let d = tempfile::tempdir().unwrap();
        let p = |n: &str| d.path().join(n);
        let a = CurveKeypair::generate().unwrap();
        let b = CurveKeypair::generate().unwrap();
        let c = CurveKeypair::generate().unwrap();
        cert::write_pair(&a, "n1", &p("n1.key_secret"), &p("n1.key")).unwrap();
        cert::write_pair(&c, "n0", &p("n0.key_secret"), &p("n0.key")).unwrap();
        let files = KeyFiles {
            rank: 1,
            secret: p("n1.key_secret"),
            public: HashMap::from([(1, p("n1.key")), (0, p("n0.key"))]),
        };
        assert_eq!(files.load_ring().unwrap().keys(0), &[*c.public()]);
        assert!(files.load_next().is_err(), "no .next yet");
        cert::write_pair(
            &b,
            "n1",
            &next_path(&p("n1.key_secret")),
            &next_path(&p("n1.key")),
        )
        .unwrap();
        assert_eq!(files.load_next().unwrap().public(), b.public());
        // The parent's next key shows up in the ring.
        let c2 = CurveKeypair::generate().unwrap();
        cert::write_pair(
            &c2,
            "n0",
            &next_path(&p("n0.key_secret")),
            &next_path(&p("n0.key")),
        )
        .unwrap();
        assert_eq!(
            files.load_ring().unwrap().keys(0),
            &[*c.public(), *c2.public()]
        );
        // A .next public cert that does not match the .next secret.
        std::fs::remove_file(next_path(&p("n1.key"))).unwrap();
        std::fs::write(next_path(&p("n1.key")), cert::public_text(&c, "n1")).unwrap();
        let e = files.load_next().unwrap_err().to_string();
        assert!(e.contains("does not hold the public key"), "{e}");
        // Writable by others: refused.
        std::fs::set_permissions(
            next_path(&p("n0.key")),
            std::fs::Permissions::from_mode(0o666),
        )
        .unwrap();
        let e = files.load_ring().unwrap_err().to_string();
        assert!(e.contains("chmod go-w"), "{e}");
    }
}
