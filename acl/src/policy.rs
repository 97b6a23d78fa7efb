//! The policy file: TOML in, validated [`Acl`] out, every refusal with
//! `file:line:col`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::Read;
use std::ops::Range;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use canopy_proto::Roles;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use toml::value::Datetime;
use toml::Spanned;

use crate::cidr::Cidr;
use crate::principal::{valid_group_name, Pattern, Principal, RawPattern};
use crate::Mech;

/// Largest policy file accepted, in bytes.
pub const MAX_POLICY_BYTES: u64 = 16 << 20;
/// Delegate timeout when `timeout_ms` is absent.
pub const DEFAULT_DELEGATE_TIMEOUT: Duration = Duration::from_millis(1000);
/// Largest `timeout_ms` accepted: a delegate blocks the ZAP handler.
pub const MAX_DELEGATE_TIMEOUT_MS: u64 = 10_000;

/// Why a policy was refused.
#[derive(Debug, thiserror::Error)]
pub enum AclError {
    /// Anything wrong inside the text, with its position (1-based line and
    /// column, the column counted in characters).
    #[error("{origin}:{line}:{col}: {message}")]
    Parse {
        origin: String,
        line: usize,
        col: usize,
        message: String,
    },
    #[error(
        "cannot read policy file {path}: {source}; check the path and that this user may read it"
    )]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("policy file {path} is not a regular file; point to the policy file itself")]
    NotAFile { path: PathBuf },
    #[error("policy file {path} is larger than {MAX_POLICY_BYTES} bytes; check that it is the right file")]
    TooLarge { path: PathBuf },
    #[error("policy file {path} is writable by group or others (mode {mode:04o}); run `chmod go-w {path}` and make sure it is owned by the broker's user or root")]
    Writable { path: PathBuf, mode: u32 },
    /// Owned by someone else, or reached through a directory or symlink
    /// that someone else controls (OpenSSH `StrictModes`).
    #[error("policy file refused: {0}")]
    Untrusted(#[from] canopy_security::trust::TrustError),
}

/// What a rule does when it matches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Allow(Roles),
    Deny,
    Delegate(DelegateSpec),
    /// `register = [...]`: the service namespaces (patterns) the principal
    /// may offer with `service.add`. Grants no role by itself.
    Register(Vec<String>),
}

/// A `delegate = { ... }` table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DelegateSpec {
    /// Absolute path of the program (no `PATH` search).
    pub program: PathBuf,
    /// Arguments after the program name.
    pub args: Vec<String>,
    pub timeout: Duration,
    /// The roles granted on a plain "yes", and the most the program may
    /// grant: an answer naming other roles is refused.
    pub roles: Roles,
}

/// One validated `[[rule]]`.
#[derive(Clone, Debug)]
pub struct Rule {
    pub(crate) name: String,
    pub(crate) line: usize,
    pub(crate) comment: Option<String>,
    pub(crate) pattern: Pattern,
    pub(crate) mechanism: Option<Mech>,
    pub(crate) network: Option<Vec<Cidr>>,
    pub(crate) expires: Option<SystemTime>,
    pub(crate) action: Action,
    /// `topics = [...]` on a roles rule: its roles hold only on these topic
    /// patterns (`backup.*`), not everywhere.
    pub(crate) topics: Option<Vec<String>>,
    /// `host_case = "insensitive"`: the host part of a `service/host@REALM`
    /// pattern matches in any ASCII case. Never the default.
    pub(crate) fold_host: bool,
}

impl Rule {
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Line of the rule's `[[rule]]` header (or of its inline table).
    pub fn line(&self) -> usize {
        self.line
    }
    /// The rule's `comment`, if any (for people and tools; never matched).
    pub fn comment(&self) -> Option<&str> {
        self.comment.as_deref()
    }
    pub fn pattern(&self) -> &Pattern {
        &self.pattern
    }
    pub fn mechanism(&self) -> Option<Mech> {
        self.mechanism
    }
    pub fn network(&self) -> Option<&[Cidr]> {
        self.network.as_deref()
    }
    pub fn expires(&self) -> Option<SystemTime> {
        self.expires
    }
    pub fn action(&self) -> &Action {
        &self.action
    }
    /// The topic patterns a roles rule is scoped to (`None`: everywhere).
    pub fn topics(&self) -> Option<&[String]> {
        self.topics.as_deref()
    }
    /// True if the rule was written with `host_case = "insensitive"`.
    pub fn host_case_insensitive(&self) -> bool {
        self.fold_host
    }
}

/// A parsed, validated policy. Immutable: reload by parsing a new one.
#[derive(Clone, Debug)]
pub struct Acl {
    pub(crate) origin: String,
    pub(crate) rules: Vec<Rule>,
    pub(crate) groups: BTreeMap<String, Arc<BTreeSet<Principal>>>,
    pub(crate) digest: String,
    pub(crate) index: RuleIndex,
}

/// Which rules can match a principal, so a decision does not scan every
/// rule: rules naming exact principals (or key groups, expanded) are found
/// by hash; wildcard rules are always candidates. Both lists are in file
/// order.
#[derive(Clone, Debug, Default)]
pub(crate) struct RuleIndex {
    pub(crate) exact: std::collections::HashMap<Principal, Vec<usize>>,
    pub(crate) general: Vec<usize>,
}

impl RuleIndex {
    fn build(rules: &[Rule]) -> RuleIndex {
        let mut ix = RuleIndex::default();
        for (i, r) in rules.iter().enumerate() {
            match &r.pattern {
                // Matched in any case: not found by exact hash.
                _ if r.fold_host => ix.general.push(i),
                Pattern::Exact(p) => ix.exact.entry(p.clone()).or_default().push(i),
                Pattern::Group { members, .. } => {
                    for m in members.iter() {
                        let v = ix.exact.entry(m.clone()).or_default();
                        if v.last() != Some(&i) {
                            v.push(i);
                        }
                    }
                }
                _ => ix.general.push(i),
            }
        }
        ix
    }

    /// Candidate rule indices for `p`, ascending (file order).
    pub(crate) fn candidates(&self, p: &Principal) -> impl Iterator<Item = usize> + '_ {
        let exact: &[usize] = self.exact.get(p).map(Vec::as_slice).unwrap_or(&[]);
        let (mut a, mut b) = (exact.iter().peekable(), self.general.iter().peekable());
        std::iter::from_fn(move || match (a.peek(), b.peek()) {
            (Some(&&x), Some(&&y)) => {
                if x <= y {
                    a.next();
                    if x == y {
                        b.next();
                    }
                    Some(x)
                } else {
                    b.next();
                    Some(y)
                }
            }
            (Some(&&x), None) => {
                a.next();
                Some(x)
            }
            (None, Some(&&y)) => {
                b.next();
                Some(y)
            }
            (None, None) => None,
        })
    }
}

// ---- raw TOML shape -------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    keys: BTreeMap<Spanned<String>, BTreeMap<Spanned<String>, Spanned<String>>>,
    #[serde(default)]
    rule: Vec<Spanned<RawRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Spanned<String>,
    principal: Spanned<String>,
    #[serde(default)]
    comment: Option<String>,
    #[serde(default)]
    mechanism: Option<Spanned<String>>,
    #[serde(default)]
    network: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    expires: Option<Spanned<Datetime>>,
    #[serde(default)]
    roles: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    deny: Option<Spanned<bool>>,
    #[serde(default)]
    delegate: Option<Spanned<RawDelegate>>,
    #[serde(default)]
    host_case: Option<Spanned<String>>,
    #[serde(default)]
    topics: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    register: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDelegate {
    program: Spanned<String>,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    timeout_ms: Option<Spanned<i64>>,
    roles: Spanned<Vec<Spanned<String>>>,
}

// ---- positions --------------------------------------------------------------

pub(crate) use canopy_security::text::line_col;

struct Ctx<'a> {
    text: &'a str,
    origin: &'a str,
}

impl Ctx<'_> {
    fn err(&self, span: Range<usize>, message: impl Into<String>) -> AclError {
        let (line, col) = line_col(self.text, span.start);
        AclError::Parse {
            origin: self.origin.to_owned(),
            line,
            col,
            message: message.into(),
        }
    }

    fn line(&self, span: &Range<usize>) -> usize {
        line_col(self.text, span.start).0
    }
}

fn parse_roles(ctx: &Ctx<'_>, list: &Spanned<Vec<Spanned<String>>>) -> Result<Roles, AclError> {
    if list.get_ref().is_empty() {
        return Err(ctx.err(
            list.span(),
            "empty role list; name at least one of peer, owner, admin, operator, user (to refuse, write deny = true)",
        ));
    }
    list.get_ref().iter().try_fold(Roles::NONE, |acc, r| {
        Roles::parse_one(r.get_ref())
            .map(|one| acc.union(one))
            .map_err(|_| {
                ctx.err(
                    r.span(),
                    format!(
                        "unknown role '{}'; use one of peer, owner, admin, operator, user",
                        r.get_ref()
                    ),
                )
            })
    })
}

/// A non-empty list of topic or namespace patterns.
fn patterns(
    ctx: &Ctx<'_>,
    list: &Spanned<Vec<Spanned<String>>>,
    key: &str,
    example: &str,
) -> Result<Vec<String>, AclError> {
    if list.get_ref().is_empty() {
        return Err(ctx.err(
            list.span(),
            format!("empty {key} list matches nothing; list at least one pattern, e.g. {example}"),
        ));
    }
    list.get_ref()
        .iter()
        .map(|p| {
            if canopy_proto::grant::valid_topic_pattern(p.get_ref()) {
                Ok(p.get_ref().clone())
            } else {
                Err(ctx.err(
                    p.span(),
                    format!(
                        "bad {key} pattern {:?}: use letters, digits, '_', '.' or '-', optionally ending in '*'; e.g. {example}",
                        p.get_ref()
                    ),
                ))
            }
        })
        .collect()
}

fn check_name(ctx: &Ctx<'_>, name: &Spanned<String>) -> Result<(), AclError> {
    let n = name.get_ref();
    if n.trim().is_empty() {
        return Err(ctx.err(
            name.span(),
            "empty rule name; give the rule a short unique name",
        ));
    }
    if n.len() > 128 || n.chars().any(char::is_control) {
        return Err(ctx.err(
            name.span(),
            "rule name is longer than 128 bytes or has control characters; use a short plain name",
        ));
    }
    Ok(())
}

impl Acl {
    /// Parse a policy from text. `origin` names it in errors and verdicts
    /// (usually the file's path).
    pub fn parse(text: &str, origin: &str) -> Result<Acl, AclError> {
        let ctx = Ctx { text, origin };
        let raw: RawPolicy = toml::from_str(text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            ctx.err(span, canopy_security::text::toml_advice(e.message(), ""))
        })?;

        let mut groups = BTreeMap::new();
        for (gname, members) in &raw.keys {
            if !valid_group_name(gname.get_ref()) {
                return Err(ctx.err(
                    gname.span(),
                    format!(
                        "bad key group name {:?}; use letters, digits, '_' or '-'",
                        gname.get_ref()
                    ),
                ));
            }
            let mut set = BTreeSet::new();
            for (principal, label) in members {
                let p = Principal::parse(principal.get_ref())
                    .map_err(|e| ctx.err(principal.span(), e.to_string()))?;
                if label.get_ref().trim().is_empty()
                    || label.get_ref().chars().any(char::is_control)
                {
                    return Err(ctx.err(
                        label.span(),
                        "empty or unprintable label; say whose key this is, e.g. \"alice-laptop\"",
                    ));
                }
                set.insert(p);
            }
            groups.insert(gname.get_ref().clone(), Arc::new(set));
        }

        let mut names: HashMap<String, usize> = HashMap::new();
        let mut rules = Vec::with_capacity(raw.rule.len());
        for spanned in &raw.rule {
            let r = spanned.get_ref();
            let rule_span = spanned.span();
            let line = ctx.line(&rule_span);

            check_name(&ctx, &r.name)?;
            if let Some(first) = names.insert(r.name.get_ref().clone(), ctx.line(&r.name.span())) {
                return Err(ctx.err(
                    r.name.span(),
                    format!(
                        "duplicate rule name {:?} (first used on line {first}); give each rule a unique name",
                        r.name.get_ref()
                    ),
                ));
            }

            let pattern = match Pattern::parse(r.principal.get_ref())
                .map_err(|e| ctx.err(r.principal.span(), e.to_string()))?
            {
                RawPattern::Resolved(p) => p,
                RawPattern::Group(g) => match groups.get(&g) {
                    Some(members) => Pattern::Group {
                        name: g,
                        members: Arc::clone(members),
                    },
                    None => {
                        return Err(ctx.err(
                            r.principal.span(),
                            format!("key group {g:?} is not defined; add a [keys.{g}] table or fix the name"),
                        ))
                    }
                },
            };

            let fold_host = match &r.host_case {
                None => false,
                Some(v) => {
                    let fold = match v.get_ref().as_str() {
                        "exact" => false,
                        "insensitive" => true,
                        other => {
                            return Err(ctx.err(
                                v.span(),
                                format!("host_case {other:?} is not known; write \"exact\" (the default) or \"insensitive\""),
                            ))
                        }
                    };
                    if fold && !pattern.has_literal_host() {
                        return Err(ctx.err(
                            v.span(),
                            format!(
                                "host_case = \"insensitive\" applies only to a service/host@REALM pattern with a host written out; principal {:?} has none, so remove host_case",
                                r.principal.get_ref()
                            ),
                        ));
                    }
                    fold
                }
            };

            let mechanism = match &r.mechanism {
                None => None,
                Some(m) => Some(m.get_ref().parse::<Mech>().map_err(|_| {
                    ctx.err(
                        m.span(),
                        format!(
                            "unknown mechanism {:?}; use curve, gssapi or local (or leave it out for any)",
                            m.get_ref()
                        ),
                    )
                })?),
            };
            if let (Some(m), Some(mech), Some(kinds)) = (&r.mechanism, mechanism, pattern.kinds()) {
                if !kinds.is_empty() && !kinds.iter().any(|k| k.mechanism() == mech) {
                    return Err(ctx.err(
                        m.span(),
                        format!(
                            "this rule can never match: principal {:?} never comes with mechanism {mech}; fix the mechanism or remove it",
                            r.principal.get_ref()
                        ),
                    ));
                }
            }

            let network = match &r.network {
                None => None,
                Some(list) => {
                    if list.get_ref().is_empty() {
                        return Err(ctx.err(
                            list.span(),
                            "empty network list matches nothing; list at least one cidr, or remove network to allow any address",
                        ));
                    }
                    let mut nets = Vec::with_capacity(list.get_ref().len());
                    for n in list.get_ref() {
                        nets.push(
                            n.get_ref()
                                .parse::<Cidr>()
                                .map_err(|e| ctx.err(n.span(), e.to_string()))?,
                        );
                    }
                    Some(nets)
                }
            };

            let expires = match &r.expires {
                None => None,
                Some(dt) => Some(crate::time::toml_instant(dt.get_ref()).ok_or_else(|| {
                    ctx.err(
                        dt.span(),
                        "expires needs a full date-time with an offset; write e.g. 2027-01-01T00:00:00Z",
                    )
                })?),
            };

            if let Some(d) = &r.deny {
                if !*d.get_ref() {
                    return Err(ctx.err(
                        d.span(),
                        "deny = false has no meaning; remove it, or write deny = true to refuse",
                    ));
                }
            }
            let action = match (&r.roles, &r.deny, &r.delegate, &r.register) {
                (Some(roles), None, None, None) => Action::Allow(parse_roles(&ctx, roles)?),
                (None, Some(_), None, None) => Action::Deny,
                (None, None, Some(d), None) => Action::Delegate(delegate_spec(&ctx, d)?),
                (None, None, None, Some(list)) => Action::Register(patterns(
                    &ctx,
                    list,
                    "register",
                    "a namespace such as \"kvs\", or a prefix such as \"backup*\"",
                )?),
                (None, None, None, None) => {
                    return Err(ctx.err(
                        rule_span,
                        format!(
                        "rule {:?} says neither roles, deny, delegate nor register; add exactly one of them",
                        r.name.get_ref()
                    ),
                    ))
                }
                _ => {
                    // Point at the second of the conflicting fields.
                    let mut spans = Vec::new();
                    if let Some(x) = &r.roles {
                        spans.push(x.span());
                    }
                    if let Some(x) = &r.deny {
                        spans.push(x.span());
                    }
                    if let Some(x) = &r.delegate {
                        spans.push(x.span());
                    }
                    if let Some(x) = &r.register {
                        spans.push(x.span());
                    }
                    spans.sort_by_key(|s| s.start);
                    return Err(ctx.err(
                        spans[1].clone(),
                        format!(
                            "rule {:?} has more than one of roles, deny, delegate and register; keep exactly one (write a separate rule for the other)",
                            r.name.get_ref()
                        ),
                    ));
                }
            };

            let topics = match (&r.topics, &action) {
                (None, _) => None,
                (Some(list), Action::Allow(roles)) => {
                    if roles.contains(Roles::PEER) {
                        return Err(ctx.err(
                            list.span(),
                            "topics scopes client roles to services; peer is not a client role, so write a separate rule for peer without topics",
                        ));
                    }
                    Some(patterns(
                        &ctx,
                        list,
                        "topics",
                        "a topic such as \"backup.start\", or a prefix such as \"backup.*\"",
                    )?)
                }
                (Some(list), _) => {
                    return Err(ctx.err(
                        list.span(),
                        "topics applies only to a rule with roles; remove it, or move it to the rule that grants the roles",
                    ))
                }
            };

            rules.push(Rule {
                name: r.name.get_ref().clone(),
                line,
                comment: r.comment.clone(),
                pattern,
                mechanism,
                network,
                expires,
                action,
                topics,
                fold_host,
            });
        }

        let index = RuleIndex::build(&rules);
        Ok(Acl {
            origin: origin.to_owned(),
            rules,
            groups,
            digest: hex(&Sha256::digest(text.as_bytes())),
            index,
        })
    }

    /// Read and parse a policy file. Refuses a file that group or others can
    /// write, one that is not a regular file, one larger than
    /// [`MAX_POLICY_BYTES`], and one that is not trusted as
    /// [`canopy_security::trust::check_trusted`] says for this process's
    /// effective uid: owned by root or that uid, every directory on its path
    /// too and not writable by others, no symlink someone else owns.
    pub fn load(path: impl AsRef<Path>) -> Result<Acl, AclError> {
        let path = path.as_ref();
        let read_err = |source| AclError::Read {
            path: path.to_owned(),
            source,
        };
        let mut file = File::open(path).map_err(read_err)?;
        // Check the file we opened, not the path again.
        let meta = file.metadata().map_err(read_err)?;
        if !meta.is_file() {
            return Err(AclError::NotAFile {
                path: path.to_owned(),
            });
        }
        let mode = meta.permissions().mode();
        if mode & 0o022 != 0 {
            return Err(AclError::Writable {
                path: path.to_owned(),
                mode: mode & 0o7777,
            });
        }
        let trusted = canopy_security::trust::check_trusted(
            path,
            canopy_security::trust::TrustKind::File,
            canopy_security::trust::service_uid(),
        )?;
        if !trusted.same_file(&meta) {
            return Err(canopy_security::trust::TrustError::Replaced {
                path: path.to_owned(),
            }
            .into());
        }
        if meta.len() > MAX_POLICY_BYTES {
            return Err(AclError::TooLarge {
                path: path.to_owned(),
            });
        }
        let mut text = String::new();
        (&mut file)
            .take(MAX_POLICY_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(read_err)?;
        Acl::parse(&text, &path.display().to_string())
    }

    /// Where the policy came from, as given to [`Acl::parse`].
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The rules in file order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The key groups by name.
    pub fn groups(&self) -> impl Iterator<Item = (&str, &BTreeSet<Principal>)> {
        self.groups.iter().map(|(k, v)| (k.as_str(), &**v))
    }

    /// Hex SHA-256 of the policy text (recorded in the audit log on reload).
    pub fn digest(&self) -> &str {
        &self.digest
    }
}

fn delegate_spec(ctx: &Ctx<'_>, d: &Spanned<RawDelegate>) -> Result<DelegateSpec, AclError> {
    let d = d.get_ref();
    let program = d.program.get_ref();
    if !program.starts_with('/') || program.chars().any(char::is_control) {
        return Err(ctx.err(
            d.program.span(),
            format!("delegate program {program:?} is not an absolute path; write the full path, e.g. /usr/libexec/canopy-check"),
        ));
    }
    let timeout = match &d.timeout_ms {
        None => DEFAULT_DELEGATE_TIMEOUT,
        Some(t) => {
            let ms = *t.get_ref();
            if !(1..=MAX_DELEGATE_TIMEOUT_MS as i64).contains(&ms) {
                return Err(ctx.err(
                    t.span(),
                    format!("timeout_ms {ms} is out of range; use 1 to {MAX_DELEGATE_TIMEOUT_MS} (the zap handler waits for it)"),
                ));
            }
            Duration::from_millis(ms.unsigned_abs())
        }
    };
    Ok(DelegateSpec {
        program: PathBuf::from(program),
        args: d.args.clone(),
        timeout,
        roles: parse_roles(ctx, &d.roles)?,
    })
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_characters() {
        let t = "ab\nçd\n\nx";
        assert_eq!(line_col(t, 0), (1, 1));
        assert_eq!(line_col(t, 3), (2, 1));
        assert_eq!(line_col(t, 5), (2, 2)); // after the 2-byte 'ç'
        assert_eq!(line_col(t, 7), (3, 1));
        assert_eq!(line_col(t, 8), (4, 1));
        assert_eq!(line_col(t, 9), (4, 2));
        assert_eq!(line_col(t, 4), (2, 1)); // inside 'ç': rounds down
        assert_eq!(line_col(t, 999), (4, 2));
    }

    #[test]
    fn toml_messages_get_advice() {
        assert_eq!(
            canopy_security::text::toml_advice("unknown field `x`, expected `y`", ""),
            "unknown field `x`, expected `y`; remove it or correct its spelling"
        );
        assert_eq!(
            canopy_security::text::toml_advice("Invalid key\n", ""),
            "invalid key; fix the toml syntax"
        );
    }
}
