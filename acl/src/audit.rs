//! A hash-chained, append-only audit log: one JSON line per decision.
//!
//! # Format
//!
//! Each line is a JSON object with the fields, in this order:
//!
//! ```text
//! {"seq":1,"ts":"2026-05-01T12:00:00.000Z","rank":3,"host":"node3","event":"admit","principal":"alice@R",
//!  "address":"10.0.0.1","mechanism":"gssapi","roles":["user"],
//!  "rule":"/etc/canopy/policy.toml:12 users","reason":"...","prev":"000...0","hash":"<hex>"}
//! ```
//!
//! (one line in the file). `seq` counts from 1 and equals the line number;
//! `rank` and `host` name the broker that wrote the entry (absent from logs
//! written without them, [`AuditLog::set_origin`]);
//! `event` is `admit`, `deny`, `role-refusal` or `reload`; `principal`,
//! `address`, `mechanism` and `rule` may be `null`; `prev` is the previous
//! line's `hash` (64 zeros on the first line).
//!
//! `hash` is the lower-case hex SHA-256 of the 64 ASCII characters of
//! `prev` followed by the line's *body*: the line as written, without the
//! trailing `,"hash":"..."` member (so the body ends `..."prev":"<hex>"}`).
//! The body is serde_json's compact output of the fields in the order above;
//! [`verify`] insists on exactly that form, so an entry cannot be re-encoded
//! (reordered keys, added spaces) without breaking the chain.
//!
//! # What the chain proves
//!
//! Editing any field, deleting, inserting or reordering lines, or cutting a
//! line short is caught by [`verify`] at the first entry affected. Cutting
//! whole lines off the *end* is not detectable from the file alone: keep the
//! latest [`AuditLog::head`] somewhere else (the broker's log, a remote
//! syslog) to anchor it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use canopy_proto::Roles;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::decide::{Query, Verdict};
use crate::policy::{hex, Acl};

/// `prev` of the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
const HASH_MEMBER: &str = ",\"hash\":\"";
/// `,"hash":"` + 64 hex digits + `"}`.
const SUFFIX_LEN: usize = HASH_MEMBER.len() + 64 + 2;
/// Longest line read back when reopening a log.
const MAX_LINE: u64 = 1 << 20;

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AuditKind {
    Admit,
    Deny,
    /// An admitted principal asked for something its roles do not allow.
    RoleRefusal,
    /// A new policy took effect.
    Reload,
    /// `canopy exec`: a request started (its digest), a rank refused it,
    /// or a rank's receipt came back (its digest).
    Exec,
}

impl AuditKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AuditKind::Admit => "admit",
            AuditKind::Deny => "deny",
            AuditKind::RoleRefusal => "role-refusal",
            AuditKind::Reload => "reload",
            AuditKind::Exec => "exec",
        }
    }
}

/// One entry to append (the log adds `seq`, `ts`, `prev` and `hash`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditEvent {
    pub kind: AuditKind,
    pub principal: Option<String>,
    pub address: Option<String>,
    pub mechanism: Option<String>,
    pub roles: Roles,
    /// `origin:line name` of the deciding rule.
    pub rule: Option<String>,
    pub reason: String,
}

impl AuditEvent {
    /// The record of a decision.
    pub fn decision(q: &Query<'_>, v: &Verdict) -> AuditEvent {
        AuditEvent {
            kind: if v.allow {
                AuditKind::Admit
            } else {
                AuditKind::Deny
            },
            principal: Some(v.principal.clone()),
            address: q.address.map(|a| a.to_string()),
            mechanism: Some(q.mechanism.as_str().to_owned()),
            roles: v.roles,
            rule: v.rule.as_ref().map(ToString::to_string),
            reason: v.reason.clone(),
        }
    }

    /// The record of a policy taking effect.
    pub fn reload(acl: &Acl) -> AuditEvent {
        AuditEvent {
            kind: AuditKind::Reload,
            principal: None,
            address: None,
            mechanism: None,
            roles: Roles::NONE,
            rule: None,
            reason: format!(
                "policy {} loaded: {} rules, sha256 {}",
                acl.origin(),
                acl.rules().len(),
                acl.digest()
            ),
        }
    }

    /// The record of a request refused for want of a role. `roles` are the
    /// roles the principal holds.
    /// The record of an exec request, refusal or receipt.
    pub fn exec(principal: &str, what: &str) -> AuditEvent {
        AuditEvent {
            kind: AuditKind::Exec,
            principal: Some(principal.to_owned()),
            address: None,
            mechanism: None,
            roles: Roles::NONE,
            rule: None,
            reason: what.to_owned(),
        }
    }

    pub fn role_refusal(
        principal: &str,
        mechanism: Option<&str>,
        address: Option<&str>,
        roles: Roles,
        what: &str,
    ) -> AuditEvent {
        AuditEvent {
            kind: AuditKind::RoleRefusal,
            principal: Some(principal.to_owned()),
            address: address.map(str::to_owned),
            mechanism: mechanism.map(str::to_owned),
            roles,
            rule: None,
            reason: what.to_owned(),
        }
    }
}

/// The canonical body: field order is the struct's order.
#[derive(Serialize, Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct Body {
    seq: u64,
    ts: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rank: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    host: Option<String>,
    event: String,
    principal: Option<String>,
    address: Option<String>,
    mechanism: Option<String>,
    roles: Vec<String>,
    rule: Option<String>,
    reason: String,
    prev: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error(
        "cannot open audit log {path}: {source}; check that the directory exists and is writable"
    )]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write audit log {path}: {source}; check free space and permissions")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("audit log {path} is in use by another process (another broker?); give each broker its own log, e.g. with %h (host) or %r (rank) in the path")]
    InUse { path: PathBuf },
    #[error("the last entry of audit log {path} is damaged ({reason}); run `verify` on it, move it aside and start a new log")]
    Damaged { path: PathBuf, reason: String },
    /// The log or its directory is not trusted (owned by someone else,
    /// writable by others, reached through someone else's symlink).
    #[error("audit log refused: {0}")]
    Untrusted(#[from] canopy_security::trust::TrustError),
}

/// The first bad entry of a log. `line` is 1-based (0: the file could not
/// be read at all).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("audit log line {line}: {reason}")]
pub struct VerifyError {
    pub line: usize,
    pub reason: String,
}

fn chain_hash(prev: &str, body: &str) -> String {
    let mut h = Sha256::new();
    h.update(prev.as_bytes());
    h.update(body.as_bytes());
    hex(&h.finalize())
}

/// Check one line (without its newline) as entry number `seq` following
/// `prev`; returns its hash.
fn check_line(line: &str, seq: u64, prev: &str) -> Result<String, String> {
    if line.len() < SUFFIX_LEN || !line.ends_with("\"}") {
        return Err("truncated or malformed: the line does not end with a hash member".into());
    }
    let split = line.len() - SUFFIX_LEN;
    let (Some(head), Some(tail)) = (line.get(..split), line.get(split..)) else {
        return Err("truncated or malformed: the line does not end with a hash member".into());
    };
    let hash = tail
        .strip_prefix(HASH_MEMBER)
        .and_then(|t| t.strip_suffix("\"}"))
        .filter(|h| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        .ok_or("truncated or malformed: the line does not end with a hash member")?;
    let body = format!("{head}}}");
    let parsed: Body = serde_json::from_str(&body).map_err(|e| format!("malformed entry: {e}"))?;
    let again = serde_json::to_string(&parsed).map_err(|e| e.to_string())?;
    if again != body {
        return Err("entry is not in canonical form: it was re-encoded or edited".into());
    }
    if parsed.seq != seq {
        return Err(format!(
            "sequence number {} where {seq} was expected: a line was deleted, inserted or moved",
            parsed.seq
        ));
    }
    if parsed.prev != prev {
        return Err("prev does not match the hash of the line before: a line was deleted, inserted or moved".into());
    }
    let want = chain_hash(prev, &body);
    if want != hash {
        return Err("hash mismatch: the entry was edited".into());
    }
    Ok(want)
}

/// Check a whole log; returns the number of entries. Reports the first bad
/// entry (see the module docs for what is caught).
pub fn verify(path: impl AsRef<Path>) -> Result<usize, VerifyError> {
    let path = path.as_ref();
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|e| VerifyError {
            line: 0,
            reason: format!(
                "cannot read {}: {e}; check the path and permissions",
                path.display()
            ),
        })?;
    let mut prev = GENESIS.to_owned();
    let mut count = 0usize;
    let mut rest = &bytes[..];
    while !rest.is_empty() {
        let line_no = count + 1;
        let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
            return Err(VerifyError {
                line: line_no,
                reason: "truncated line: no newline at the end of the file".into(),
            });
        };
        let line = std::str::from_utf8(&rest[..nl]).map_err(|_| VerifyError {
            line: line_no,
            reason: "not utf-8".into(),
        })?;
        prev = check_line(line, line_no as u64, &prev).map_err(|reason| VerifyError {
            line: line_no,
            reason,
        })?;
        count = line_no;
        rest = &rest[nl + 1..];
    }
    Ok(count)
}

/// An open audit log, appending entries that continue its chain.
#[derive(Debug)]
pub struct AuditLog {
    file: File,
    path: PathBuf,
    seq: u64,
    prev: String,
    sync: bool,
    origin: Option<(u32, String)>,
}

/// The last line of a file that ends with a newline (without it), or
/// `None` for an empty file.
fn last_line(file: &mut File) -> Result<Option<String>, String> {
    let len = file.seek(SeekFrom::End(0)).map_err(|e| e.to_string())?;
    if len == 0 {
        return Ok(None);
    }
    let start = len.saturating_sub(MAX_LINE + 1);
    file.seek(SeekFrom::Start(start))
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    file.read_to_end(&mut buf).map_err(|e| e.to_string())?;
    if buf.last() != Some(&b'\n') {
        return Err("the file does not end with a newline (a write was cut short)".into());
    }
    buf.pop();
    let from = match buf.iter().rposition(|&b| b == b'\n') {
        Some(i) => i + 1,
        None if start == 0 => 0,
        None => return Err("the last line is too long".into()),
    };
    String::from_utf8(buf[from..].to_vec())
        .map(Some)
        .map_err(|_| "the last line is not utf-8".into())
}

impl AuditLog {
    /// Open (creating with mode 0600) a log for appending. An existing log
    /// is continued from its last entry, which must be intact (its own hash
    /// is checked; run [`verify`] for the whole chain). The log's directory
    /// must be trusted as a [`canopy_security::trust::TrustKind::Directory`]
    /// and a regular log as a file, for this process's user; the log must
    /// not be a symlink.
    pub fn open(path: impl AsRef<Path>) -> Result<AuditLog, AuditError> {
        let path = path.as_ref().to_owned();
        let open_err = |source| AuditError::Open {
            path: path.clone(),
            source,
        };
        // The directory decides who can replace the log: it must be trusted
        // (not shared, like /tmp), and so must an existing log.
        use canopy_security::trust::{check_trusted, service_uid, TrustError, TrustKind};
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
            _ => PathBuf::from("."),
        };
        check_trusted(&dir, TrustKind::Directory, service_uid())?;
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
            .open(&path)
            .map_err(open_err)?;
        // One writer per log: two brokers appending to one file would break
        // its chain. The lock goes with the file descriptor.
        if file.metadata().map_err(open_err)?.is_file() {
            use std::os::fd::AsRawFd;
            // flock(2) on our own descriptor; released when it closes.
            #[allow(deprecated)]
            match nix::fcntl::flock(
                file.as_raw_fd(),
                nix::fcntl::FlockArg::LockExclusiveNonblock,
            ) {
                Ok(()) => {}
                Err(nix::errno::Errno::EWOULDBLOCK) => {
                    return Err(AuditError::InUse { path: path.clone() })
                }
                Err(e) => return Err(open_err(e.into())),
            }
        }
        let meta = file.metadata().map_err(open_err)?;
        // A device or pipe (a log shipper) has no contents to replace.
        if meta.is_file() && !check_trusted(&path, TrustKind::File, service_uid())?.same_file(&meta)
        {
            return Err(TrustError::Replaced { path: path.clone() }.into());
        }
        let damaged = |reason: String| AuditError::Damaged {
            path: path.clone(),
            reason,
        };
        let (seq, prev) = match last_line(&mut file).map_err(damaged)? {
            None => (0, GENESIS.to_owned()),
            Some(line) => {
                let body_end = line.len().saturating_sub(SUFFIX_LEN);
                let body = format!("{}}}", line.get(..body_end).unwrap_or_default());
                let parsed: Body = serde_json::from_str(&body)
                    .map_err(|e| damaged(format!("malformed entry: {e}")))?;
                let hash = check_line(&line, parsed.seq, &parsed.prev).map_err(damaged)?;
                (parsed.seq, hash)
            }
        };
        Ok(AuditLog {
            file,
            path,
            seq,
            prev,
            sync: false,
            origin: None,
        })
    }

    /// Name the broker (rank and host) in every entry from now on.
    pub fn set_origin(&mut self, rank: u32, host: &str) {
        self.origin = Some((rank, host.to_string()));
    }

    /// Also `fdatasync` after every entry (off by default; each entry is
    /// always written with one `write` and no user-space buffering).
    pub fn set_sync(&mut self, sync: bool) {
        self.sync = sync;
    }

    /// Append an entry stamped with the current time; returns its `seq`.
    pub fn append(&mut self, ev: &AuditEvent) -> Result<u64, AuditError> {
        self.append_at(ev, SystemTime::now())
    }

    /// Append an entry stamped with `ts`; returns its `seq`.
    pub fn append_at(&mut self, ev: &AuditEvent, ts: SystemTime) -> Result<u64, AuditError> {
        let seq = self.seq + 1;
        let body = Body {
            seq,
            ts: crate::time::rfc3339(ts),
            rank: self.origin.as_ref().map(|o| o.0),
            host: self.origin.as_ref().map(|o| o.1.clone()),
            event: ev.kind.as_str().to_owned(),
            principal: ev.principal.clone(),
            address: ev.address.clone(),
            mechanism: ev.mechanism.clone(),
            roles: ev.roles.names().into_iter().map(str::to_owned).collect(),
            rule: ev.rule.clone(),
            reason: ev.reason.clone(),
            prev: self.prev.clone(),
        };
        let body = serde_json::to_string(&body).map_err(|e| AuditError::Write {
            path: self.path.clone(),
            source: std::io::Error::other(e),
        })?;
        let hash = chain_hash(&self.prev, &body);
        let mut line = String::with_capacity(body.len() + SUFFIX_LEN + 1);
        line.push_str(&body[..body.len() - 1]);
        line.push_str(HASH_MEMBER);
        line.push_str(&hash);
        line.push_str("\"}\n");
        let write_err = |source| AuditError::Write {
            path: self.path.clone(),
            source,
        };
        let before = self.file.metadata().map(|m| m.len());
        if let Err(e) = self.file.write_all(line.as_bytes()) {
            // Do not leave half a line for the next entry to follow.
            if let Ok(len) = before {
                let _ = self.file.set_len(len);
            }
            return Err(write_err(e));
        }
        self.file.flush().map_err(write_err)?;
        if self.sync {
            self.file.sync_data().map_err(write_err)?;
        }
        self.seq = seq;
        self.prev = hash;
        Ok(seq)
    }

    /// Number of entries in the log.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Hash of the last entry ([`GENESIS`] for an empty log): record it
    /// elsewhere to detect truncation.
    pub fn head(&self) -> &str {
        &self.prev
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}
