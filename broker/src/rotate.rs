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
use canopy_security::{cert, curve_principal, CurveKeypair};
use std::collections::{BTreeSet, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Admin: switch this broker to its `.next` key.
pub const SWITCH_TOPIC: &str = "key.switch";
/// Admin: re-read the neighbours' public certificates.
pub const RELOAD_TOPIC: &str = "key.reload";
/// Control, child to parent, the last message on the old connection:
/// "hold my traffic, I am moving to a new connection".
pub const RELINK_TOPIC: &str = "overlay.relink";
/// Control, parent to child, the last message on the old connection.
pub const DRAINED_TOPIC: &str = "overlay.drained";
/// Control, parent to child: "relink to me with this server key" (Z85).
pub const REKEY_TOPIC: &str = "overlay.rekey";

/// User: this broker's key and whether any of its links is moving (JSON
/// [`KeyStatus`]).
pub const STATUS_TOPIC: &str = "key.status";

/// The answer to `key.status`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeyStatus {
    pub rank: u32,
    /// The public key in use (Z85).
    pub public_key: String,
    /// The parent link is moving to a new connection.
    pub parent_moving: bool,
    /// Children whose links are moving to this broker.
    pub children_moving: Vec<u32>,
    /// The ROUTER is waiting to rebind with a new key.
    pub rebinding: bool,
    /// The keys (Z85) this broker admits for each neighbour rank.
    #[serde(default)]
    pub admitted: std::collections::BTreeMap<u32, Vec<String>>,
}

impl KeyStatus {
    /// No link of this broker is moving.
    pub fn settled(&self) -> bool {
        !self.parent_moving && self.children_moving.is_empty() && !self.rebinding
    }
}

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
        Ok(KeyRing { keys })
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
    Ok((rank, sn, pn, kp.public_z85()))
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
        let kp = cert::load_secret(&sn)
            .map_err(ferr)?
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

/// The CURVE keys admitted for each neighbour rank.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyRing {
    keys: HashMap<u32, Vec<[u8; 32]>>,
}

impl KeyRing {
    pub fn new(keys: HashMap<u32, Vec<[u8; 32]>>) -> KeyRing {
        KeyRing { keys }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn keys(&self, rank: u32) -> &[[u8; 32]] {
        self.keys.get(&rank).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Every neighbour's admitted keys, as Z85.
    pub fn z85_map(&self) -> std::collections::BTreeMap<u32, Vec<String>> {
        self.keys
            .iter()
            .map(|(r, ks)| {
                (
                    *r,
                    ks.iter().map(|k| canopy_security::z85::encode(k)).collect(),
                )
            })
            .collect()
    }

    pub fn allows_key(&self, rank: u32, key: &[u8; 32]) -> bool {
        self.keys(rank).contains(key)
    }

    /// The principals admitted for `rank`.
    pub fn principals(&self, rank: u32) -> Vec<String> {
        self.keys(rank).iter().map(curve_principal).collect()
    }

    /// For the hello check: `principal` if it is admitted for `rank`, else
    /// `rank`'s current principal (which then differs, and the check
    /// refuses); `None` if the ring does not know `rank`.
    pub fn expected(&self, rank: u32, principal: &str) -> Option<String> {
        let ps = self.principals(rank);
        if ps.iter().any(|p| p == principal) {
            Some(principal.to_string())
        } else {
            ps.into_iter().next()
        }
    }

    /// (principal, name) for ZAP: every admitted key of each of `children`.
    pub fn zap_entries(&self, children: &[u32]) -> Vec<(String, String)> {
        let mut v = Vec::new();
        for &c in children {
            for p in self.principals(c) {
                v.push((p, format!("rank {c}")));
            }
        }
        v
    }
}

/// Joining a parent that has not answered for `silent_ms`: after `wait_ms`,
/// the next of its configured keys (current, next) to try, if there is
/// another one (a retired key being tried counts as no key).
pub fn other_key(
    keys: &[[u8; 32]],
    trying: &[u8; 32],
    silent_ms: u64,
    wait_ms: u64,
) -> Option<[u8; 32]> {
    if keys.is_empty() || keys == [*trying] || silent_ms < wait_ms {
        return None;
    }
    let i = keys
        .iter()
        .position(|k| k == trying)
        .map_or(0, |i| (i + 1) % keys.len());
    Some(keys[i])
}

/// Child side of a relink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// `relink` sent on the old connection; waiting for `drained`.
    Draining,
    /// New connection made, hello sent; waiting for its answer.
    Joining,
}

/// This broker moving its parent link; `T` is a queued message.
pub struct UpLink<T> {
    pub phase: Option<Phase>,
    pub started_ms: u64,
    /// What was to go up meanwhile, in order.
    pub queue: Vec<T>,
}

impl<T> Default for UpLink<T> {
    fn default() -> Self {
        UpLink {
            phase: None,
            started_ms: 0,
            queue: Vec::new(),
        }
    }
}

impl<T> UpLink<T> {
    pub fn active(&self) -> bool {
        self.phase.is_some()
    }

    /// Begin: from now on sends to the parent are queued.
    pub fn start(&mut self, now_ms: u64) -> bool {
        if self.phase.is_some() {
            return false;
        }
        self.phase = Some(Phase::Draining);
        self.started_ms = now_ms;
        true
    }

    /// `drained` arrived on the old connection: make the new one.
    pub fn drained(&mut self) -> bool {
        if self.phase == Some(Phase::Draining) {
            self.phase = Some(Phase::Joining);
            true
        } else {
            false
        }
    }

    /// The hello on the new connection was accepted: send what was queued.
    pub fn joined(&mut self) -> Vec<T> {
        self.phase = None;
        std::mem::take(&mut self.queue)
    }

    /// Whether the parent has not answered for `limit_ms`: give up and
    /// rejoin the ordinary way.
    pub fn overdue(&self, now_ms: u64, limit_ms: u64) -> bool {
        self.phase.is_some() && now_ms.saturating_sub(self.started_ms) > limit_ms
    }

    /// Give up: the queue is returned so its requests can be failed.
    pub fn abandon(&mut self) -> Vec<T> {
        self.phase = None;
        std::mem::take(&mut self.queue)
    }
}

/// Parent side: a child that asked to relink.
pub struct Held<T> {
    pub old_rid: Vec<u8>,
    pub since_ms: u64,
    pub queue: Vec<T>,
}

/// Why the parent accepts or refuses a relink hello.
#[derive(Debug, PartialEq, Eq)]
pub enum RelinkVerdict {
    /// Not a relink: treat it as an ordinary hello.
    NotRelink,
    Accept,
    Refuse(String),
}

/// Decide a hello that arrives on an unknown connection while `rank` is
/// online with `online_session`: it is a relink if the child asked to
/// relink (`held`) and says hello with the same session; its key must be
/// one the ring admits for that rank.
pub fn relink_verdict(
    held: bool,
    online_session: Option<u64>,
    hello_session: u64,
    key_admitted: bool,
) -> RelinkVerdict {
    if online_session != Some(hello_session) {
        return RelinkVerdict::NotRelink;
    }
    if !held {
        return RelinkVerdict::Refuse(
            "a second connection with the session of an online rank, without a relink request"
                .into(),
        );
    }
    if !key_admitted {
        return RelinkVerdict::Refuse("the key is not admitted for this rank".into());
    }
    RelinkVerdict::Accept
}

/// A broker rebinding its ROUTER with a new server key: which children must
/// move off the old listener first.
pub struct Rebind {
    pub started_ms: u64,
    pub deadline_ms: u64,
    /// Children told to relink that have not asked yet.
    pub waiting: BTreeSet<u32>,
    /// Old connections of children that have been drained.
    pub old_rids: Vec<Vec<u8>>,
}

impl Rebind {
    pub fn new(children: impl IntoIterator<Item = u32>, now_ms: u64, limit_ms: u64) -> Rebind {
        Rebind {
            started_ms: now_ms,
            deadline_ms: now_ms + limit_ms,
            waiting: children.into_iter().collect(),
            old_rids: Vec::new(),
        }
    }

    /// `rank` asked to relink from `old_rid`.
    pub fn relinking(&mut self, rank: u32, old_rid: Vec<u8>) {
        self.waiting.remove(&rank);
        self.old_rids.push(old_rid);
    }

    /// Ready when every child has relinked and closed its old connection
    /// (`connected` says whether one is still open), or the deadline passed.
    pub fn ready(&mut self, now_ms: u64, mut connected: impl FnMut(&[u8]) -> bool) -> bool {
        self.old_rids.retain(|r| connected(r));
        (self.waiting.is_empty() && self.old_rids.is_empty()) || now_ms >= self.deadline_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use canopy_security::z85;

    fn key(b: u8) -> [u8; 32] {
        [b; 32]
    }

    #[test]
    fn ring_admits_current_and_next_only_for_their_rank() {
        let ring = KeyRing::new(HashMap::from([
            (1, vec![key(1), key(11)]),
            (2, vec![key(2)]),
        ]));
        assert!(ring.allows_key(1, &key(11)));
        assert!(!ring.allows_key(2, &key(11)));
        let p11 = curve_principal(&key(11));
        let p1 = curve_principal(&key(1));
        assert_eq!(ring.expected(1, &p11).as_deref(), Some(p11.as_str()));
        // Rank 2 does not admit rank 1's next key: the check sees rank 2's.
        assert_eq!(ring.expected(2, &p11), Some(curve_principal(&key(2))));
        assert_eq!(ring.expected(3, &p1), None);
        let z = ring.zap_entries(&[1]);
        assert_eq!(z.len(), 2);
        assert!(z.iter().all(|(_, n)| n == "rank 1"));
    }

    #[test]
    fn uplink_phases() {
        let mut u: UpLink<(Vec<u8>, Vec<u8>)> = UpLink::default();
        assert!(!u.drained(), "drained before a relink is ignored");
        assert!(u.start(100));
        assert!(!u.start(101), "one relink at a time");
        assert!(!u.overdue(150, 100));
        assert!(u.overdue(201, 100));
        u.queue.push((vec![1], b"x".to_vec()));
        assert!(u.drained());
        assert!(!u.drained());
        assert_eq!(u.phase, Some(Phase::Joining));
        let q = u.joined();
        assert_eq!(q.len(), 1);
        assert!(!u.active());
    }

    #[test]
    fn relink_needs_the_same_session_a_request_and_an_admitted_key() {
        assert_eq!(
            relink_verdict(true, None, 5, true),
            RelinkVerdict::NotRelink
        );
        assert_eq!(
            relink_verdict(true, Some(4), 5, true),
            RelinkVerdict::NotRelink
        );
        assert_eq!(
            relink_verdict(true, Some(5), 5, true),
            RelinkVerdict::Accept
        );
        assert!(matches!(
            relink_verdict(false, Some(5), 5, true),
            RelinkVerdict::Refuse(_)
        ));
        assert!(matches!(
            relink_verdict(true, Some(5), 5, false),
            RelinkVerdict::Refuse(_)
        ));
    }

    #[test]
    fn rebind_waits_for_every_child_or_the_deadline() {
        let mut r = Rebind::new([3, 4], 0, 1000);
        assert!(!r.ready(10, |_| true));
        r.relinking(3, b"a".to_vec());
        assert!(!r.ready(20, |_| false));
        r.relinking(4, b"b".to_vec());
        assert!(!r.ready(30, |rid| rid == b"b"));
        assert!(r.ready(40, |_| false));
        let mut late = Rebind::new([3], 0, 1000);
        assert!(late.ready(1000, |_| true));
    }

    #[test]
    fn a_silent_parent_is_tried_with_its_other_key() {
        let ks = [key(1), key(2)];
        assert_eq!(other_key(&ks, &key(1), 100, 500), None, "not yet");
        assert_eq!(other_key(&ks, &key(1), 600, 500), Some(key(2)));
        assert_eq!(other_key(&ks, &key(2), 600, 500), Some(key(1)));
        assert_eq!(other_key(&ks, &key(9), 600, 500), Some(key(1)));
        assert_eq!(other_key(&ks[..1], &key(1), 9999, 500), None);
        // The key being tried was retired meanwhile: use the one left.
        assert_eq!(other_key(&ks[1..], &key(1), 9999, 500), Some(key(2)));
        assert_eq!(other_key(&[], &key(1), 9999, 500), None);
    }

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
