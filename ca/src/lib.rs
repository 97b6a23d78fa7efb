//! `canopy-ca`: the site CA for `canopy exec` (issue 14), offered as a
//! service (`ca.issue`, `ca.info`) by a client of one broker.
//!
//! The CA certifies a user's Ed25519 key for the principal the broker
//! authenticated, and for the local account that principal maps to. It
//! trusts only what its own broker authenticated: a request must carry
//! [`canopy_proto::FLAG_DIRECT`] (the caller is a client of this broker,
//! known by `SO_PEERCRED` or by the Kerberos key exchange), never a stamp
//! forwarded by another broker. The decisions here do no I/O: the account
//! database and the clock are passed in. docs/imp.md ("Site CA").

#![forbid(unsafe_code)]

use std::collections::BTreeSet;
use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};

use canopy_imp::cert::{valid_user_name, CertKind, UserCert};
use canopy_imp::config::MAX_LIFETIME;
use canopy_imp::envelope::{b64_decode, b64_encode, key_id, UnixTime};
use canopy_imp::request::valid_name;
use canopy_proto::errno;
use canopy_security::text::{line_col, toml_advice};
use canopy_security::trust::{check_trusted, TrustError, TrustKind};
use ed25519_dalek::{SigningKey, VerifyingKey};
use serde::Deserialize;
use toml::Spanned;
use zeroize::Zeroizing;

/// Where `canopy-ca` reads its configuration (`--config` overrides it).
pub const DEFAULT_CONFIG: &str = "/etc/canopy/ca.toml";
/// The namespace offered when the config names none.
pub const DEFAULT_NAMESPACE: &str = "ca";
/// Largest ca.toml accepted.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// The methods offered, with the least role a caller needs.
pub const METHODS: [(&str, &str); 2] = [("issue", "user"), ("info", "user")];

// ----- configuration -----

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{origin}:{line}:{col}: {message}")]
    Parse {
        origin: String,
        line: usize,
        col: usize,
        message: String,
    },
    #[error("cannot read {path}: {source}; check the path (give another with --config)")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is larger than {MAX_CONFIG_BYTES} bytes; check that it is the right file")]
    TooLarge { path: PathBuf },
    #[error("{what} refused: {source}")]
    Untrusted {
        what: &'static str,
        #[source]
        source: TrustError,
    },
    #[error("secret key {path} does not exist; make it with `canopy-ca keygen --out {path}` (and give {path}.pub to the nodes' imp.toml)")]
    KeyMissing { path: PathBuf },
    #[error("secret key {path} is owned by uid {owner}, not by the user canopy-ca runs as (uid {me}); run `chown {me} {path}`, or run canopy-ca as its owner")]
    KeyOwner { path: PathBuf, owner: u32, me: u32 },
    #[error("secret key {path} has mode {mode:04o}; it must be 0600 or stricter: run `chmod 600 {path}`")]
    KeyMode { path: PathBuf, mode: u32 },
    #[error("secret key {path} is not an ed25519 secret key (one line `ed25519-secret:<base64>`); make one with `canopy-ca keygen --out {path}`")]
    KeyFormat { path: PathBuf },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    secret_key: Spanned<String>,
    lifetime: Option<Spanned<i64>>,
    #[serde(default)]
    realms: Vec<Spanned<String>>,
    namespace: Option<Spanned<String>>,
    kind: Option<Spanned<String>>,
}

/// A validated ca.toml.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaConfig {
    /// Where it was read from (for messages).
    pub origin: String,
    /// The CA's secret key file (mode 0600 or stricter, owned by the user
    /// canopy-ca runs as).
    pub secret_key: PathBuf,
    /// Lifetime of the certificates issued, in seconds (1 to
    /// [`MAX_LIFETIME`]); a caller may ask for less, never more.
    pub lifetime: u64,
    /// Kerberos realms whose `user@REALM` principals map to local `user`.
    pub realms: BTreeSet<String>,
    /// The namespace offered (default `ca`).
    pub namespace: String,
    /// `ca` (a site CA), or `node-attestation`: a node vouching for its own
    /// local users only (`unix:NAME` by `SO_PEERCRED`), with the node's
    /// key, which imp.toml accepts only under `[node_attestations]`.
    pub kind: CertKind,
}

fn valid_namespace(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

impl CaConfig {
    /// Parse ca.toml text; `origin` names it in errors (`file:line:col`).
    pub fn parse(text: &str, origin: &str) -> Result<CaConfig, ConfigError> {
        let err = |span: Range<usize>, message: String| {
            let (line, col) = line_col(text, span.start);
            ConfigError::Parse {
                origin: origin.to_owned(),
                line,
                col,
                message,
            }
        };
        let raw: Raw = toml::from_str(text).map_err(|e| {
            err(
                e.span().unwrap_or(0..0),
                toml_advice(e.message(), " (see etc/ca.toml)"),
            )
        })?;
        let key = raw.secret_key.get_ref();
        if !key.starts_with('/') || key.contains('\0') {
            return Err(err(
                raw.secret_key.span(),
                format!("secret_key: {key:?} is not an absolute path; write the full path, e.g. \"/etc/canopy/ca/ca.key\""),
            ));
        }
        let lifetime = match &raw.lifetime {
            None => MAX_LIFETIME,
            Some(s) => {
                let v = *s.get_ref();
                if !(1..=MAX_LIFETIME as i64).contains(&v) {
                    return Err(err(
                        s.span(),
                        format!(
                            "lifetime: {v} is out of range; give seconds from 1 to {MAX_LIFETIME}"
                        ),
                    ));
                }
                v as u64
            }
        };
        let mut realms = BTreeSet::new();
        for (i, r) in raw.realms.iter().enumerate() {
            let v = r.get_ref();
            if !valid_name(v) || v.contains('@') || v.contains('/') {
                return Err(err(
                    r.span(),
                    format!("realms[{i}]: {v:?} is not a Kerberos realm; write the realm alone, e.g. \"HPC.EXAMPLE\""),
                ));
            }
            realms.insert(v.clone());
        }
        let namespace = match &raw.namespace {
            None => DEFAULT_NAMESPACE.to_owned(),
            Some(s) => {
                let v = s.get_ref();
                if !valid_namespace(v) {
                    return Err(err(
                        s.span(),
                        format!("namespace: {v:?} is not a namespace; use lower-case letters, digits, '-' and '_', e.g. \"ca\""),
                    ));
                }
                v.clone()
            }
        };
        let kind = match &raw.kind {
            None => CertKind::Ca,
            Some(k) => match k.get_ref().as_str() {
                "ca" => CertKind::Ca,
                "node-attestation" if realms.is_empty() => CertKind::NodeAttestation,
                "node-attestation" => {
                    return Err(err(
                        k.span(),
                        "kind: a node attests only its own local users (unix:NAME); remove realms, or use kind = \"ca\"".into(),
                    ))
                }
                other => {
                    return Err(err(
                        k.span(),
                        format!("kind: {other:?} is not a kind; write \"ca\" or \"node-attestation\""),
                    ))
                }
            },
        };
        Ok(CaConfig {
            origin: origin.to_owned(),
            secret_key: PathBuf::from(key),
            lifetime,
            realms,
            namespace,
            kind,
        })
    }

    /// Read and parse ca.toml, refusing it unless it is a regular file
    /// owned by root or `uid` that group and other cannot write, on a path
    /// nobody else controls (it decides which realms are believed).
    pub fn load(path: &Path, uid: u32) -> Result<CaConfig, ConfigError> {
        let t =
            check_trusted(path, TrustKind::File, uid).map_err(|source| ConfigError::Untrusted {
                what: "ca.toml",
                source,
            })?;
        let file = t.open().map_err(|source| ConfigError::Untrusted {
            what: "ca.toml",
            source,
        })?;
        let mut text = String::new();
        file.take(MAX_CONFIG_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?;
        if text.len() as u64 > MAX_CONFIG_BYTES {
            return Err(ConfigError::TooLarge {
                path: path.to_owned(),
            });
        }
        CaConfig::parse(&text, &path.display().to_string())
    }

    /// Read the CA's secret key: a trusted secret (not readable or
    /// writable by group or other), owned by `uid` itself, mode 0600 or
    /// stricter.
    pub fn load_key(&self, uid: u32) -> Result<SigningKey, ConfigError> {
        let path = &self.secret_key;
        let t = check_trusted(path, TrustKind::Secret, uid).map_err(|source| match &source {
            TrustError::Io { path: p, source: e }
                if p == path && e.kind() == std::io::ErrorKind::NotFound =>
            {
                ConfigError::KeyMissing { path: path.clone() }
            }
            _ => ConfigError::Untrusted {
                what: "the ca's secret key",
                source,
            },
        })?;
        if t.uid != uid {
            return Err(ConfigError::KeyOwner {
                path: path.clone(),
                owner: t.uid,
                me: uid,
            });
        }
        if t.mode & !0o600 != 0 {
            return Err(ConfigError::KeyMode {
                path: path.clone(),
                mode: t.mode,
            });
        }
        let mut text = Zeroizing::new(String::new());
        t.open()
            .map_err(|source| ConfigError::Untrusted {
                what: "the ca's secret key",
                source,
            })?
            .take(4096)
            .read_to_string(&mut text)
            .map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            })?;
        canopy_imp::keys::parse_secret(&text)
            .ok_or_else(|| ConfigError::KeyFormat { path: path.clone() })
    }
}

// ----- decisions -----

/// Why a request was refused. Each message is for the caller and says
/// what to do; [`Refusal::errnum`] is the errno answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the ca authenticates callers directly: run canopy cert request on the ca's host, or connect to its broker with kerberos")]
    NotDirect,
    #[error("principal {principal} is a curve key, which names no local account; connect with kerberos or as a local user on the ca's host")]
    CurveKey { principal: String },
    #[error("uid {uid} has no user name on the ca's host, so it cannot be certified; ask the administrator to fix the account")]
    UnresolvedUid { uid: String },
    #[error("realm {realm} of principal {principal} is not one the ca maps to local users; ask the ca's administrator to add it to realms in ca.toml")]
    Realm { principal: String, realm: String },
    #[error("principal {principal} is not a user principal (user@REALM or a local user); request a certificate as a user")]
    NotAUser { principal: String },
    #[error("principal {principal} maps to {user:?}, which is not a valid local user name; ask the administrator")]
    BadUserName { principal: String, user: String },
    #[error("principal {principal} maps to user {user}, which does not exist on the ca's host; ask the administrator to create the account")]
    NoAccount { principal: String, user: String },
    #[error("cannot look up user {user} on the ca's host ({reason}); nothing was issued: retry later, or ask the administrator to check the account database")]
    Lookup { user: String, reason: String },
    #[error("principal {principal} maps to {user} (uid 0): the ca never certifies root; request a certificate as an ordinary user")]
    Root { principal: String, user: String },
    #[error("malformed ca.issue request: {0}; send {{\"public_key\": \"<base64 of your 32-byte ed25519 public key>\", \"lifetime_s\": SECONDS}} (canopy cert request does)")]
    Malformed(String),
    #[error("{0}")]
    Method(String),
}

impl Refusal {
    /// The errno to answer with.
    pub fn errnum(&self) -> u32 {
        match self {
            Refusal::Malformed(_) => errno::EINVAL,
            Refusal::Method(_) => errno::ENOSYS,
            Refusal::Lookup { .. } => errno::EAGAIN,
            _ => errno::EPERM,
        }
    }
}

/// The account database, as the CA sees it.
pub trait Accounts {
    /// The uid of local user `name`: `Ok(None)` if there is no such user,
    /// `Err` if the database could not answer.
    fn uid_of(&self, name: &str) -> Result<Option<u32>, String>;
}

/// The host's account database (`getpwnam`).
pub struct SystemAccounts;

impl Accounts for SystemAccounts {
    fn uid_of(&self, name: &str) -> Result<Option<u32>, String> {
        nix::unistd::User::from_name(name)
            .map(|u| u.map(|u| u.uid.as_raw()))
            .map_err(|e| e.to_string())
    }
}

/// The local user name a principal maps to (before the account is looked
/// up): `unix:NAME` (a local client of the CA's broker, by
/// `SO_PEERCRED`) is `NAME`; `user@REALM` is `user` when `REALM` is in
/// `realms`; anything else is refused.
pub fn map_principal(principal: &str, realms: &BTreeSet<String>) -> Result<String, Refusal> {
    let user = if let Some(name) = principal.strip_prefix("unix:") {
        if let Some(uid) = name.strip_prefix('#') {
            return Err(Refusal::UnresolvedUid {
                uid: uid.to_owned(),
            });
        }
        name.to_owned()
    } else if principal.starts_with("curve:") {
        return Err(Refusal::CurveKey {
            principal: principal.to_owned(),
        });
    } else if let Some((name, realm)) = principal.rsplit_once('@') {
        if !realms.contains(realm) {
            return Err(Refusal::Realm {
                principal: principal.to_owned(),
                realm: realm.to_owned(),
            });
        }
        // `service/host@REALM` is a service, not a user.
        if name.contains('/') || name.contains('@') {
            return Err(Refusal::NotAUser {
                principal: principal.to_owned(),
            });
        }
        name.to_owned()
    } else {
        return Err(Refusal::NotAUser {
            principal: principal.to_owned(),
        });
    };
    if !valid_user_name(&user) {
        return Err(Refusal::BadUserName {
            principal: principal.to_owned(),
            user,
        });
    }
    Ok(user)
}

/// The body of `ca.issue`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IssueBody {
    public_key: String,
    lifetime_s: Option<u64>,
}

/// A certificate issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    pub cert: UserCert,
    /// The envelope, as answered to the caller.
    pub envelope: Vec<u8>,
    /// The key id of the certified (user's) key.
    pub subject_keyid: String,
}

/// Whether a delivered request's flags say its broker authenticated the
/// caller itself ([`canopy_proto::FLAG_DIRECT`]).
pub fn is_direct(flags: u8) -> bool {
    flags & canopy_proto::FLAG_DIRECT != 0
}

/// One `ca.issue` request: who asked (as the broker stamped it), whether
/// the broker authenticated them itself, and the payload.
pub struct IssueInput<'a> {
    pub principal: &'a str,
    pub direct: bool,
    pub payload: &'a [u8],
}

/// Decide a `ca.issue` request and, if allowed, sign the certificate:
/// the caller must be direct, its principal must map to an existing
/// account other than root, the payload must name an Ed25519 public key;
/// the lifetime is the one asked for, at most the configured one.
pub fn issue(
    cfg: &CaConfig,
    key: &SigningKey,
    input: &IssueInput,
    accounts: &dyn Accounts,
    now: UnixTime,
) -> Result<Issued, Refusal> {
    if !input.direct {
        return Err(Refusal::NotDirect);
    }
    if !valid_name(input.principal) {
        return Err(Refusal::NotAUser {
            principal: input.principal.to_owned(),
        });
    }
    let user = map_principal(input.principal, &cfg.realms)?;
    let uid = accounts
        .uid_of(&user)
        .map_err(|reason| Refusal::Lookup {
            user: user.clone(),
            reason,
        })?
        .ok_or_else(|| Refusal::NoAccount {
            principal: input.principal.to_owned(),
            user: user.clone(),
        })?;
    if uid == 0 || user == "root" {
        return Err(Refusal::Root {
            principal: input.principal.to_owned(),
            user,
        });
    }
    let body: IssueBody = serde_json::from_slice(input.payload)
        .map_err(|e| Refusal::Malformed(canopy_imp::envelope::lower_first(e.to_string())))?;
    let subject = parse_public_key(&body.public_key).ok_or_else(|| {
        Refusal::Malformed(
            "public_key is not the standard base64 of a 32-byte ed25519 public key".into(),
        )
    })?;
    let lifetime = match body.lifetime_s {
        Some(0) => {
            return Err(Refusal::Malformed(
                "lifetime_s is 0; ask for at least one second, or leave it out".into(),
            ))
        }
        Some(s) => s.min(cfg.lifetime),
        None => cfg.lifetime,
    };
    let (cert, envelope) = UserCert::issue(
        cfg.kind,
        input.principal,
        &user,
        &subject,
        now,
        now.saturating_add(lifetime),
        key,
    );
    Ok(Issued {
        cert,
        envelope,
        subject_keyid: key_id(&subject),
    })
}

/// An Ed25519 public key from standard base64.
pub fn parse_public_key(b64: &str) -> Option<VerifyingKey> {
    let b: [u8; 32] = b64_decode(b64)?.try_into().ok()?;
    VerifyingKey::from_bytes(&b).ok()
}

/// The answer to `ca.info`: the CA's public key and key id.
pub fn info(cfg: &CaConfig, key: &SigningKey) -> Vec<u8> {
    let pk = key.verifying_key();
    serde_json::json!({
        "public_key": b64_encode(pk.as_bytes()),
        "keyid": key_id(&pk),
        "namespace": cfg.namespace,
        "lifetime": cfg.lifetime,
    })
    .to_string()
    .into_bytes()
}

/// What the CA answers a delivered request, and the line it logs.
pub struct Answer {
    /// 0, or the errno of a refusal.
    pub errnum: u32,
    /// The answer's payload (on a refusal, the message).
    pub payload: Vec<u8>,
    /// One log line: principal, user, keyid and not_after, or the reason.
    /// Never a secret.
    pub log: String,
}

/// Handle one request delivered for `topic` (`NS.METHOD`).
pub fn handle(
    cfg: &CaConfig,
    key: &SigningKey,
    topic: &str,
    input: &IssueInput,
    accounts: &dyn Accounts,
    now: UnixTime,
) -> Answer {
    let method = topic
        .strip_prefix(cfg.namespace.as_str())
        .and_then(|m| m.strip_prefix('.'))
        .unwrap_or(topic);
    let refused = |r: Refusal| Answer {
        errnum: r.errnum(),
        log: format!(
            "ca: refused {topic}: principal={} direct={} reason: {r}",
            input.principal, input.direct
        ),
        payload: r.to_string().into_bytes(),
    };
    match method {
        "info" => Answer {
            errnum: 0,
            payload: info(cfg, key),
            log: format!("ca: info for principal={}", input.principal),
        },
        "issue" => match issue(cfg, key, input, accounts, now) {
            Ok(i) => Answer {
                errnum: 0,
                log: format!(
                    "ca: issued principal={} user={} keyid={} not_after={}",
                    i.cert.principal, i.cert.user, i.subject_keyid, i.cert.not_after
                ),
                payload: i.envelope,
            },
            Err(r) => refused(r),
        },
        m => refused(Refusal::Method(format!(
            "{} has no method '{m}'; it offers info, issue",
            cfg.namespace
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use canopy_imp::envelope::{Envelope, USER_CERT_TYPE};
    use std::collections::BTreeMap;

    const CONF: &str = r#"
secret_key = "/etc/canopy/ca/ca.key"
lifetime = 600
realms = ["HPC.EXAMPLE"]
"#;

    struct Db(BTreeMap<&'static str, u32>, bool);

    impl Accounts for Db {
        fn uid_of(&self, name: &str) -> Result<Option<u32>, String> {
            if self.1 {
                return Err("sssd is down".into());
            }
            Ok(self.0.get(name).copied())
        }
    }

    fn db() -> Db {
        Db(
            [("alice", 1000), ("bob", 1001), ("root", 0), ("toor", 0)]
                .into_iter()
                .collect(),
            false,
        )
    }

    fn cfg() -> CaConfig {
        CaConfig::parse(CONF, "ca.toml").unwrap()
    }

    fn ca_key() -> SigningKey {
        SigningKey::from_bytes(&[1; 32])
    }

    fn user_key() -> SigningKey {
        SigningKey::from_bytes(&[2; 32])
    }

    fn payload(lifetime: Option<u64>) -> Vec<u8> {
        let mut v =
            serde_json::json!({"public_key": b64_encode(user_key().verifying_key().as_bytes())});
        if let Some(l) = lifetime {
            v["lifetime_s"] = l.into();
        }
        v.to_string().into_bytes()
    }

    fn ask(principal: &str, direct: bool, body: &[u8]) -> Result<Issued, Refusal> {
        issue(
            &cfg(),
            &ca_key(),
            &IssueInput {
                principal,
                direct,
                payload: body,
            },
            &db(),
            1000,
        )
    }

    fn parse_err(text: &str) -> String {
        CaConfig::parse(text, "ca.toml").unwrap_err().to_string()
    }

    #[test]
    fn a_node_attests_only_its_own_local_users_with_its_kind() {
        let c = CaConfig::parse(
            "secret_key = \"/k\"\nkind = \"node-attestation\"\n",
            "ca.toml",
        )
        .unwrap();
        assert_eq!(c.kind, CertKind::NodeAttestation);
        assert_eq!(cfg().kind, CertKind::Ca);
        let input = |principal| IssueInput {
            principal,
            direct: true,
            payload: b"",
        };
        let body = payload(None);
        let ok = issue(
            &c,
            &ca_key(),
            &IssueInput {
                payload: &body,
                ..input("unix:alice")
            },
            &db(),
            1000,
        )
        .unwrap();
        assert_eq!(ok.cert.kind, CertKind::NodeAttestation);
        assert_eq!(ok.cert.user, "alice");
        let e = issue(
            &c,
            &ca_key(),
            &IssueInput {
                payload: &body,
                ..input("alice@HPC.EXAMPLE")
            },
            &db(),
            1000,
        )
        .unwrap_err();
        assert!(matches!(e, Refusal::Realm { .. }), "{e}");
        let e = parse_err(
            "secret_key = \"/k\"\nrealms = [\"HPC.EXAMPLE\"]\nkind = \"node-attestation\"\n",
        );
        assert!(
            e.contains("ca.toml:3") && e.contains("remove realms"),
            "{e}"
        );
        let e = parse_err("secret_key = \"/k\"\nkind = \"notary\"\n");
        assert!(
            e.contains("ca.toml:2") && e.contains("\"notary\" is not a kind"),
            "{e}"
        );
    }

    #[test]
    fn the_config_has_defaults_and_refusals_name_file_line_and_key() {
        let c = CaConfig::parse("secret_key = \"/k\"\n", "ca.toml").unwrap();
        assert_eq!(c.lifetime, MAX_LIFETIME);
        assert_eq!(c.namespace, "ca");
        assert!(c.realms.is_empty());
        let c = cfg();
        assert_eq!(c.lifetime, 600);
        assert!(c.realms.contains("HPC.EXAMPLE"));

        let e = parse_err("secret_key = \"/k\"\nlifetime = 7200\n");
        assert!(
            e.starts_with(
                "ca.toml:2:12: lifetime: 7200 is out of range; give seconds from 1 to 3600"
            ),
            "{e}"
        );
        let e = parse_err("secret_key = \"/k\"\nlifetime = 0\n");
        assert!(e.contains("lifetime: 0 is out of range"), "{e}");
        let e = parse_err("secret_key = \"k\"\n");
        assert!(
            e.starts_with("ca.toml:1:14: secret_key: \"k\" is not an absolute path"),
            "{e}"
        );
        let e = parse_err("secret_key = \"/k\"\nrealms = [\"A\", \"alice@B\"]\n");
        assert!(e.starts_with("ca.toml:2:16: realms[1]"), "{e}");
        let e = parse_err("secret_key = \"/k\"\nnamespace = \"c.a\"\n");
        assert!(e.starts_with("ca.toml:2:13: namespace"), "{e}");
        let e = parse_err("secret_key = \"/k\"\nrealm = [\"A\"]\n");
        assert!(
            e.starts_with("ca.toml:2:1: unknown field `realm`") && e.contains("see etc/ca.toml"),
            "{e}"
        );
        let e = parse_err("lifetime = 60\n");
        assert!(
            e.contains("missing field `secret_key`") && e.contains("add it"),
            "{e}"
        );
        let e = parse_err("secret_key = \"/k\"\nlifetime = \"1h\"\n");
        assert!(e.starts_with("ca.toml:2:12: invalid type"), "{e}");
    }

    #[test]
    fn principals_map_to_local_users_only_from_listed_realms() {
        let realms: BTreeSet<String> = ["HPC.EXAMPLE".to_string()].into();
        let m = |p: &str| map_principal(p, &realms);
        assert_eq!(m("unix:alice"), Ok("alice".into()));
        assert_eq!(m("alice@HPC.EXAMPLE"), Ok("alice".into()));
        assert!(matches!(
            m("alice@OTHER.EXAMPLE"),
            Err(Refusal::Realm { .. })
        ));
        // Realms are compared exactly.
        assert!(matches!(m("alice@hpc.example"), Err(Refusal::Realm { .. })));
        assert!(matches!(
            m("host/node1@HPC.EXAMPLE"),
            Err(Refusal::NotAUser { .. })
        ));
        assert!(matches!(
            m("unix:#1234"),
            Err(Refusal::UnresolvedUid { .. })
        ));
        assert!(matches!(
            m("curve:rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf"),
            Err(Refusal::CurveKey { .. })
        ));
        assert!(matches!(m("alice"), Err(Refusal::NotAUser { .. })));
        assert!(matches!(
            m("Alice@HPC.EXAMPLE"),
            Err(Refusal::BadUserName { .. })
        ));
        assert!(matches!(
            m("@HPC.EXAMPLE"),
            Err(Refusal::BadUserName { .. })
        ));
    }

    #[test]
    fn a_direct_caller_gets_a_certificate_the_ca_key_verifies() {
        let i = ask("alice@HPC.EXAMPLE", true, &payload(None)).unwrap();
        let env = Envelope::parse(&i.envelope).unwrap();
        let body = env
            .verify(USER_CERT_TYPE, &ca_key().verifying_key(), "certificate")
            .unwrap();
        let c = UserCert::parse(body).unwrap();
        assert_eq!(c, i.cert);
        assert_eq!(c.kind, CertKind::Ca);
        assert_eq!(c.principal, "alice@HPC.EXAMPLE");
        assert_eq!(c.user, "alice");
        assert_eq!(c.public_key(), Some(user_key().verifying_key()));
        assert_eq!((c.not_before, c.not_after), (1000, 1600));
        assert_eq!(c.issuer, key_id(&ca_key().verifying_key()));
        assert_eq!(i.subject_keyid, key_id(&user_key().verifying_key()));
    }

    #[test]
    fn the_lifetime_is_capped_by_the_config() {
        let life = |l| {
            let c = ask("unix:bob", true, &payload(l)).unwrap().cert;
            c.not_after - c.not_before
        };
        assert_eq!(life(Some(60)), 60);
        assert_eq!(life(Some(100_000)), 600);
        assert_eq!(life(None), 600);
        assert!(matches!(
            ask("unix:bob", true, &payload(Some(0))),
            Err(Refusal::Malformed(_))
        ));
    }

    #[test]
    fn a_request_without_flag_direct_is_refused_whoever_it_names() {
        let r = ask("alice@HPC.EXAMPLE", false, &payload(None)).unwrap_err();
        assert_eq!(r, Refusal::NotDirect);
        assert_eq!(r.errnum(), errno::EPERM);
        assert_eq!(
            r.to_string(),
            "the ca authenticates callers directly: run canopy cert request on the ca's host, or connect to its broker with kerberos"
        );
        assert!(is_direct(
            canopy_proto::FLAG_DIRECT | canopy_proto::FLAG_NORESPONSE
        ));
        assert!(!is_direct(
            canopy_proto::FLAG_NORESPONSE | canopy_proto::FLAG_MORE
        ));
        assert!(!is_direct(0));
        // Through handle: the log says why.
        let a = handle(
            &cfg(),
            &ca_key(),
            "ca.issue",
            &IssueInput {
                principal: "unix:alice",
                direct: false,
                payload: &payload(None),
            },
            &db(),
            1000,
        );
        assert_eq!(a.errnum, errno::EPERM);
        assert!(a.log.contains("refused ca.issue: principal=unix:alice direct=false reason: the ca authenticates callers directly"), "{}", a.log);
    }

    #[test]
    fn root_unknown_accounts_and_a_failing_account_database_are_refused() {
        let r = ask("unix:root", true, &payload(None)).unwrap_err();
        assert!(matches!(r, Refusal::Root { .. }), "{r}");
        assert!(r.to_string().contains("never certifies root"));
        // Another name for uid 0.
        assert!(matches!(
            ask("toor@HPC.EXAMPLE", true, &payload(None)),
            Err(Refusal::Root { .. })
        ));
        let r = ask("carol@HPC.EXAMPLE", true, &payload(None)).unwrap_err();
        assert_eq!(
            r.to_string(),
            "principal carol@HPC.EXAMPLE maps to user carol, which does not exist on the ca's host; ask the administrator to create the account"
        );
        let down = Db(BTreeMap::new(), true);
        let r = issue(
            &cfg(),
            &ca_key(),
            &IssueInput {
                principal: "unix:alice",
                direct: true,
                payload: &payload(None),
            },
            &down,
            1000,
        )
        .unwrap_err();
        assert!(matches!(r, Refusal::Lookup { .. }) && r.to_string().contains("sssd is down"));
    }

    #[test]
    fn malformed_payloads_and_unknown_methods_are_refused() {
        for body in [
            &b"not json"[..],
            br#"{"public_key":"AAAA"}"#,
            br#"{"public_key":"x","extra":1}"#,
            br#"{}"#,
        ] {
            let r = ask("unix:alice", true, body).unwrap_err();
            assert_eq!(r.errnum(), errno::EINVAL, "{r}");
            assert!(
                r.to_string().starts_with("malformed ca.issue request"),
                "{r}"
            );
        }
        let a = handle(
            &cfg(),
            &ca_key(),
            "ca.drop",
            &IssueInput {
                principal: "unix:alice",
                direct: true,
                payload: b"",
            },
            &db(),
            1000,
        );
        assert_eq!(a.errnum, errno::ENOSYS);
        let a = handle(
            &cfg(),
            &ca_key(),
            "ca.info",
            &IssueInput {
                principal: "unix:alice",
                direct: false,
                payload: b"",
            },
            &db(),
            1000,
        );
        assert_eq!(a.errnum, 0);
        let v: serde_json::Value = serde_json::from_slice(&a.payload).unwrap();
        assert_eq!(v["keyid"], key_id(&ca_key().verifying_key()));
        assert_eq!(
            parse_public_key(v["public_key"].as_str().unwrap()),
            Some(ca_key().verifying_key())
        );
    }

    #[test]
    fn issued_log_lines_hold_no_secret() {
        let a = handle(
            &cfg(),
            &ca_key(),
            "ca.issue",
            &IssueInput {
                principal: "unix:alice",
                direct: true,
                payload: &payload(Some(60)),
            },
            &db(),
            1000,
        );
        assert_eq!(a.errnum, 0);
        assert_eq!(
            a.log,
            format!(
                "ca: issued principal=unix:alice user=alice keyid={} not_after=1060",
                key_id(&user_key().verifying_key())
            )
        );
        let secret = b64_encode(&ca_key().to_bytes());
        assert!(!a.log.contains(&secret));
    }

    #[test]
    fn the_secret_key_must_be_private_and_owned_by_the_ca_user() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ca.key");
        canopy_imp::keys::write_pair(&p, &ca_key()).unwrap();
        let c = CaConfig::parse(&format!("secret_key = \"{}\"\n", p.display()), "ca.toml").unwrap();
        let me = nix::unistd::geteuid().as_raw();
        let missing = CaConfig {
            secret_key: d.path().join("none.key"),
            ..c.clone()
        };
        let e = missing.load_key(me).unwrap_err().to_string();
        assert!(
            e.contains("does not exist; make it with `canopy-ca keygen --out"),
            "{e}"
        );
        assert_eq!(c.load_key(me).unwrap().to_bytes(), ca_key().to_bytes());
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = c.load_key(me).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        // Executable by the owner only: still more than 0600.
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o700)).unwrap();
        let e = c.load_key(me).unwrap_err().to_string();
        assert!(
            e.contains("mode 0700") && e.contains("0600 or stricter"),
            "{e}"
        );
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert!(c.load_key(me).is_ok());
        // Not the running user's (root would do for check_trusted, not here).
        if me != 0 {
            let e = c.load_key(0).unwrap_err().to_string();
            assert!(!e.is_empty());
        }
    }
}
