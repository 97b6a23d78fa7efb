//! `imp.toml`: what the helper allows, read from a root-owned file
//! (`/etc/canopy/imp.toml`). Every refusal names `file:line:col` and the
//! key. See `etc/imp.toml` for an annotated example and docs/imp.md.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};

use canopy_security::trust::{check_trusted, TrustError, TrustKind};
use ed25519_dalek::{SigningKey, VerifyingKey};
use serde::Deserialize;
use toml::Spanned;
use zeroize::Zeroizing;

use crate::cert::valid_user_name;
use crate::keys::{self, KeyError};
use crate::request::valid_name;

/// Where the helper reads its configuration.
pub const DEFAULT_CONFIG: &str = "/etc/canopy/imp.toml";
/// The longest request lifetime the helper ever accepts, in seconds;
/// `max_request_lifetime` may only lower it.
pub const MAX_LIFETIME: u64 = 3600;
/// Largest imp.toml accepted.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// `search_path` when absent.
pub const DEFAULT_SEARCH_PATH: &[&str] = &["/usr/local/bin", "/usr/bin", "/bin"];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{origin}:{line}:{col}: {message}")]
    Parse {
        origin: String,
        line: usize,
        col: usize,
        message: String,
    },
    #[error("cannot read {path}: {source}; check the path (the helper reads {DEFAULT_CONFIG})")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is larger than {MAX_CONFIG_BYTES} bytes; check that it is the right file")]
    TooLarge { path: PathBuf },
    #[error("imp.toml refused: {0}")]
    Untrusted(#[from] TrustError),
    #[error("key refused: {0}")]
    Key(#[from] KeyError),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    broker_user: Spanned<String>,
    #[serde(default)]
    users: Vec<Spanned<String>>,
    #[serde(default)]
    groups: Vec<Spanned<String>>,
    commands: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    user_commands: BTreeMap<Spanned<String>, Vec<Spanned<String>>>,
    trusted_ca_keys: Vec<Spanned<String>>,
    node_attestations: Option<Spanned<RawAttestations>>,
    receipt_key: Spanned<String>,
    replay_cache: Spanned<String>,
    max_request_lifetime: Option<Spanned<i64>>,
    search_path: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    instances: BTreeMap<Spanned<String>, Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAttestations {
    accept: Spanned<bool>,
    #[serde(default)]
    keys: Vec<Spanned<String>>,
}

/// A validated imp.toml. Paths are not opened here: see
/// [`ImpConfig::load_keys`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImpConfig {
    pub origin: String,
    /// The only user that may invoke the helper.
    pub broker_user: String,
    pub users: BTreeSet<String>,
    pub groups: BTreeSet<String>,
    /// Global command allowlist (absolute paths); `None`: any command.
    pub commands: Option<BTreeSet<PathBuf>>,
    /// Per-user allowlists; a user listed here gets this list instead of
    /// the global one.
    pub user_commands: BTreeMap<String, BTreeSet<PathBuf>>,
    pub trusted_ca_keys: Vec<PathBuf>,
    /// Node keys whose attestations are accepted; `None`: none are.
    pub node_attestation_keys: Option<Vec<PathBuf>>,
    pub receipt_key: PathBuf,
    pub replay_cache: PathBuf,
    pub max_request_lifetime: u64,
    /// Where a bare command name is looked up (never the request's PATH).
    pub search_path: Vec<PathBuf>,
    /// Instance id → this node's rank in it. Empty: the broker's
    /// `--instance` and `--rank` are taken as given.
    pub instances: BTreeMap<String, u32>,
}

/// The keys imp.toml names, read from trusted files.
pub struct Keys {
    pub cas: Vec<VerifyingKey>,
    pub nodes: Vec<VerifyingKey>,
    pub receipt: SigningKey,
}

use canopy_security::text::line_col;

struct Ctx<'a> {
    text: &'a str,
    origin: &'a str,
}

impl Ctx<'_> {
    fn err(&self, span: Range<usize>, message: impl Into<String>) -> ConfigError {
        let (line, col) = line_col(self.text, span.start);
        ConfigError::Parse {
            origin: self.origin.to_owned(),
            line,
            col,
            message: message.into(),
        }
    }

    fn abs(&self, key: &str, s: &Spanned<String>) -> Result<PathBuf, ConfigError> {
        let p = s.get_ref();
        if !p.starts_with('/') || p.contains('\0') {
            return Err(self.err(
                s.span(),
                format!("{key}: {p:?} is not an absolute path; write the full path, e.g. \"/usr/bin/hostname\""),
            ));
        }
        Ok(PathBuf::from(p))
    }

    fn abs_list(&self, key: &str, list: &[Spanned<String>]) -> Result<Vec<PathBuf>, ConfigError> {
        list.iter()
            .enumerate()
            .map(|(i, s)| self.abs(&format!("{key}[{i}]"), s))
            .collect()
    }

    fn user(&self, key: &str, s: &Spanned<String>) -> Result<String, ConfigError> {
        let u = s.get_ref();
        if u == "root" {
            return Err(self.err(
                s.span(),
                format!("{key}: root is always refused and may not be listed; remove it"),
            ));
        }
        if !valid_user_name(u) {
            return Err(self.err(
                s.span(),
                format!("{key}: {u:?} is not a valid user or group name; correct it"),
            ));
        }
        Ok(u.clone())
    }
}

impl ImpConfig {
    /// Parse imp.toml text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<ImpConfig, ConfigError> {
        let ctx = Ctx { text, origin };
        let raw: Raw = toml::from_str(text).map_err(|e| {
            ctx.err(
                e.span().unwrap_or(0..0),
                canopy_security::text::toml_advice(e.message(), " (see etc/imp.toml)"),
            )
        })?;

        let broker_user = ctx.user("broker_user", &raw.broker_user)?;
        let mut users = BTreeSet::new();
        for (i, u) in raw.users.iter().enumerate() {
            users.insert(ctx.user(&format!("users[{i}]"), u)?);
        }
        let mut groups = BTreeSet::new();
        for (i, g) in raw.groups.iter().enumerate() {
            groups.insert(ctx.user(&format!("groups[{i}]"), g)?);
        }
        if users.contains(&broker_user) {
            let s = raw
                .users
                .iter()
                .find(|u| *u.get_ref() == broker_user)
                .unwrap();
            return Err(ctx.err(
                s.span(),
                format!("users: {broker_user} is the broker's user; whoever controls the broker could run anything as it: remove it"),
            ));
        }
        if users.is_empty() && groups.is_empty() {
            return Err(ctx.err(
                0..0,
                "no users or groups are allowed, so nothing could ever run; list them in users = [...] or groups = [...]",
            ));
        }
        let commands = match &raw.commands {
            Some(list) => Some(ctx.abs_list("commands", list)?.into_iter().collect()),
            None => None,
        };
        let mut user_commands = BTreeMap::new();
        for (u, list) in &raw.user_commands {
            let name = ctx.user("user_commands", u)?;
            let key = format!("user_commands.{name}");
            user_commands.insert(name, ctx.abs_list(&key, list)?.into_iter().collect());
        }
        let trusted_ca_keys = ctx.abs_list("trusted_ca_keys", &raw.trusted_ca_keys)?;
        let node_attestation_keys = match &raw.node_attestations {
            Some(a) if *a.get_ref().accept.get_ref() => {
                let a = a.get_ref();
                if a.keys.is_empty() {
                    return Err(ctx.err(
                        a.accept.span(),
                        "node_attestations.accept is true but node_attestations.keys is empty; list the public keys of the nodes whose attestations are accepted",
                    ));
                }
                Some(ctx.abs_list("node_attestations.keys", &a.keys)?)
            }
            _ => None,
        };
        if trusted_ca_keys.is_empty() && node_attestation_keys.is_none() {
            return Err(ctx.err(
                0..0,
                "trusted_ca_keys is empty and node attestations are off, so no certificate could ever be accepted; list the CA's public key file",
            ));
        }
        let receipt_key = ctx.abs("receipt_key", &raw.receipt_key)?;
        let replay_cache = ctx.abs("replay_cache", &raw.replay_cache)?;
        let max_request_lifetime = match &raw.max_request_lifetime {
            None => MAX_LIFETIME,
            Some(s) => {
                let v = *s.get_ref();
                if !(1..=MAX_LIFETIME as i64).contains(&v) {
                    return Err(ctx.err(
                        s.span(),
                        format!("max_request_lifetime: {v} is out of range; give seconds from 1 to {MAX_LIFETIME}"),
                    ));
                }
                v as u64
            }
        };
        let search_path = match &raw.search_path {
            Some(list) => ctx.abs_list("search_path", list)?,
            None => DEFAULT_SEARCH_PATH.iter().map(PathBuf::from).collect(),
        };
        let mut instances = BTreeMap::new();
        for (id, rank) in &raw.instances {
            if !valid_name(id.get_ref()) {
                return Err(ctx.err(
                    id.span(),
                    "instances: the instance id has spaces or control characters; correct it",
                ));
            }
            let r = u32::try_from(*rank.get_ref()).map_err(|_| {
                ctx.err(
                    rank.span(),
                    format!(
                        "instances.{}: {} is not a rank (0 to {})",
                        id.get_ref(),
                        rank.get_ref(),
                        u32::MAX
                    ),
                )
            })?;
            instances.insert(id.get_ref().clone(), r);
        }
        Ok(ImpConfig {
            origin: origin.to_owned(),
            broker_user,
            users,
            groups,
            commands,
            user_commands,
            trusted_ca_keys,
            node_attestation_keys,
            receipt_key,
            replay_cache,
            max_request_lifetime,
            search_path,
            instances,
        })
    }

    /// Read and parse imp.toml, refusing it unless it is a regular file
    /// owned by root (or `owner_uid`) that group and other cannot write,
    /// on a path nobody else controls.
    pub fn load(path: &Path, owner_uid: u32) -> Result<ImpConfig, ConfigError> {
        let trusted = check_trusted(path, TrustKind::File, owner_uid)?;
        let file = trusted.open()?;
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
        ImpConfig::parse(&text, &path.display().to_string())
    }

    /// Read the CA and node public keys (trusted files) and the receipt
    /// secret key (a trusted secret: mode 0600 or stricter).
    pub fn load_keys(&self, owner_uid: u32) -> Result<Keys, ConfigError> {
        let public = |p: &PathBuf| -> Result<VerifyingKey, ConfigError> {
            let t = check_trusted(p, TrustKind::File, owner_uid)?;
            let mut text = String::new();
            t.open()?
                .take(4096)
                .read_to_string(&mut text)
                .map_err(|source| ConfigError::Read {
                    path: p.clone(),
                    source,
                })?;
            keys::parse_public(&text).ok_or_else(|| {
                KeyError::Format {
                    path: p.clone(),
                    what: "an ed25519 public key",
                    prefix: "ed25519:",
                }
                .into()
            })
        };
        let cas = self
            .trusted_ca_keys
            .iter()
            .map(public)
            .collect::<Result<_, _>>()?;
        let nodes = match &self.node_attestation_keys {
            Some(list) => list.iter().map(public).collect::<Result<_, _>>()?,
            None => Vec::new(),
        };
        let t = check_trusted(&self.receipt_key, TrustKind::Secret, owner_uid)?;
        let mut text = Zeroizing::new(String::new());
        t.open()?
            .take(4096)
            .read_to_string(&mut text)
            .map_err(|source| ConfigError::Read {
                path: self.receipt_key.clone(),
                source,
            })?;
        let receipt = keys::secret_from(&text, &self.receipt_key)?;
        Ok(Keys {
            cas,
            nodes,
            receipt,
        })
    }

    /// The allowlist that applies to `user`, if any.
    pub fn allowlist(&self, user: &str) -> Option<&BTreeSet<PathBuf>> {
        self.user_commands.get(user).or(self.commands.as_ref())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const MINIMAL: &str = r#"
broker_user = "canopy"
users = ["alice"]
groups = ["hpc"]
trusted_ca_keys = ["/etc/canopy/imp/ca.pub"]
receipt_key = "/etc/canopy/imp/receipt.key"
replay_cache = "/var/lib/canopy-imp/replay"
"#;

    fn err(text: &str) -> String {
        ImpConfig::parse(text, "imp.toml").unwrap_err().to_string()
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = ImpConfig::parse(MINIMAL, "imp.toml").unwrap();
        assert_eq!(c.max_request_lifetime, MAX_LIFETIME);
        assert_eq!(c.search_path[1], PathBuf::from("/usr/bin"));
        assert!(c.commands.is_none() && c.node_attestation_keys.is_none());
        assert!(c.allowlist("alice").is_none());
    }

    #[test]
    fn root_is_refused_wherever_it_is_listed() {
        let e = err(&MINIMAL.replace(r#"["alice"]"#, r#"["alice", "root"]"#));
        assert_eq!(
            e,
            "imp.toml:3:19: users[1]: root is always refused and may not be listed; remove it"
        );
        assert!(err(&MINIMAL.replace(r#"["hpc"]"#, r#"["root"]"#)).contains("groups[0]: root"));
        assert!(err(&MINIMAL.replace(r#""canopy""#, r#""root""#)).contains("broker_user: root"));
        let e = err(&format!("{MINIMAL}[user_commands]\nroot = [\"/bin/sh\"]\n"));
        assert!(e.contains("user_commands: root"), "{e}");
    }

    #[test]
    fn refusals_name_position_and_key() {
        let e = err(&format!("{MINIMAL}colour = 1\n"));
        assert!(e.starts_with("imp.toml:8:1: unknown field `colour`"), "{e}");
        assert!(e.contains("remove it or correct its spelling"), "{e}");
        let e = err(&format!("{MINIMAL}commands = [\"hostname\"]\n"));
        assert!(
            e.starts_with("imp.toml:8:13: commands[0]: \"hostname\" is not an absolute path"),
            "{e}"
        );
        let e = err(&format!("{MINIMAL}max_request_lifetime = 7200\n"));
        assert!(
            e.contains("max_request_lifetime: 7200 is out of range"),
            "{e}"
        );
        let e = err(&MINIMAL.replace("receipt_key = ", "# receipt_key = "));
        assert!(e.contains("missing field `receipt_key`"), "{e}");
        let e = err(&format!("{MINIMAL}[node_attestations]\naccept = true\n"));
        assert!(e.contains("node_attestations.keys is empty"), "{e}");
        let e = err(&MINIMAL.replace(r#"["alice"]"#, r#"["canopy"]"#));
        assert!(e.contains("is the broker's user"), "{e}");
        let e = err(&format!("{MINIMAL}[instances]\nsys = -1\n"));
        assert!(e.contains("instances.sys: -1 is not a rank"), "{e}");
    }

    #[test]
    fn per_user_allowlists_replace_the_global_one() {
        let c = ImpConfig::parse(
            &format!(
                "{MINIMAL}commands = [\"/usr/bin/id\"]\n[user_commands]\nbob = [\"/bin/true\"]\n"
            ),
            "imp.toml",
        )
        .unwrap();
        assert!(c
            .allowlist("alice")
            .unwrap()
            .contains(Path::new("/usr/bin/id")));
        assert!(!c
            .allowlist("bob")
            .unwrap()
            .contains(Path::new("/usr/bin/id")));
    }

    #[test]
    fn load_refuses_a_writable_file() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("imp.toml");
        std::fs::write(&p, MINIMAL).unwrap();
        let me = nix::unistd::geteuid().as_raw();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        ImpConfig::load(&p, me).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).unwrap();
        let e = ImpConfig::load(&p, me).unwrap_err().to_string();
        assert!(e.contains("writable by group or other"), "{e}");
    }
}
