//! Principals, their canonical form, and the principal patterns of rules.
//!
//! See the crate documentation for the canonicalization rules.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use crate::Mech;

/// Longest principal accepted, in bytes (the header's user-id limit).
pub const MAX_PRINCIPAL: usize = canopy_proto::MAX_USERID;

/// Prefix of a CURVE principal.
pub const CURVE_PREFIX: &str = "curve:";
/// Prefix of a local (UNIX socket) principal.
pub const UNIX_PREFIX: &str = "unix:";
/// Prefix of a key-group pattern.
pub const GROUP_PREFIX: &str = "keys:";

const FORMS: &str = "name@REALM, service/host@REALM, curve:<40 z85 characters> or unix:<user>";

/// Why a principal or pattern was refused. Every message says what to write
/// instead; the offending text is quoted with escapes, so that hostile
/// input cannot forge log lines.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrincipalError {
    #[error("the principal is empty; write {FORMS}")]
    Empty,
    #[error("the principal is {0} bytes long, more than {MAX_PRINCIPAL}; use a shorter name")]
    TooLong(usize),
    #[error("principal {0:?} contains a control character; remove it")]
    Control(String),
    #[error("principal {0:?} has no @REALM; write name@REALM or service/host@REALM")]
    NoRealm(String),
    #[error("principal {0:?} has more than one '@'; write name@REALM (escaped characters are not supported)")]
    TwoAts(String),
    #[error("principal {principal:?} has an empty {part}; write name@REALM or service/host@REALM")]
    EmptyPart {
        principal: String,
        part: &'static str,
    },
    #[error("principal {0:?} has more than two components; canopy accepts name@REALM and service/host@REALM only")]
    TooManyComponents(String),
    #[error("principal {principal:?} contains {found:?}, which a kerberos principal may not contain here; remove it (whitespace, '\\\\', ':' and '*' are refused)")]
    BadChar { principal: String, found: char },
    #[error("{0:?} is not a curve key ({1}); write curve: followed by the 40 z85 characters of a public key")]
    BadCurve(String, String),
    #[error("{0:?} is not a local user: write unix: followed by a user name of letters, digits, '.', '_', '-' or '@' (not starting with '-'; '$' only at the end)")]
    BadUnix(String),
    #[error("pattern {0:?} has a partial wildcard; '*' may only stand for a whole component, as in *@REALM or service/*@REALM")]
    PartialWildcard(String),
    #[error("pattern {0:?} has a wildcard realm; write the realm out exactly (realms are case-sensitive)")]
    WildRealm(String),
    #[error("pattern {0:?} names no key group; write keys:GROUP with a group name of letters, digits, '_' or '-'")]
    BadGroupName(String),
}

/// A canonical principal.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Principal {
    /// `name@REALM` or `service/host@REALM`, every part exactly as the KDC
    /// spells it (case-sensitive; nothing is folded).
    Kerberos {
        name: String,
        instance: Option<String>,
        realm: String,
    },
    /// `curve:<40 Z85 characters>`.
    Curve { z85: String },
    /// `unix:<user>`.
    Unix { user: String },
}

/// The kind of a principal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Kerberos,
    Curve,
    Unix,
}

impl Kind {
    /// The only mechanism a principal of this kind can arrive with.
    pub fn mechanism(self) -> Mech {
        match self {
            Kind::Kerberos => Mech::Gssapi,
            Kind::Curve => Mech::Curve,
            Kind::Unix => Mech::Local,
        }
    }
}

fn common_checks(text: &str) -> Result<(), PrincipalError> {
    if text.is_empty() {
        return Err(PrincipalError::Empty);
    }
    if text.len() > MAX_PRINCIPAL {
        return Err(PrincipalError::TooLong(text.len()));
    }
    if text.chars().any(char::is_control) {
        return Err(PrincipalError::Control(text.to_owned()));
    }
    Ok(())
}

/// One component of a Kerberos name, or a wildcard standing for one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Part {
    Any,
    Is(String),
}

impl Part {
    fn matches(&self, s: &str) -> bool {
        match self {
            Part::Any => true,
            Part::Is(v) => v == s,
        }
    }
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Part::Any => f.write_str("*"),
            Part::Is(s) => f.write_str(s),
        }
    }
}

/// Split a Kerberos name into (name, instance, realm), each kept exactly as
/// written: a principal is compared as the KDC authenticated it, so
/// `svc/NODE1@R` and `svc/node1@R` are two principals (the KDC holds a key
/// for each). With `wild`, a whole component may be `*`.
fn split_kerberos(text: &str, wild: bool) -> Result<(Part, Option<Part>, String), PrincipalError> {
    let owned = || text.to_owned();
    let mut at = text.split('@');
    let local = at.next().unwrap_or_default();
    let Some(realm) = at.next() else {
        return Err(PrincipalError::NoRealm(owned()));
    };
    if at.next().is_some() {
        return Err(PrincipalError::TwoAts(owned()));
    }
    if realm.is_empty() {
        return Err(PrincipalError::EmptyPart {
            principal: owned(),
            part: "realm",
        });
    }
    let bad = |c: char| c.is_whitespace() || matches!(c, '\\' | ':' | '*');
    if realm == "*" && wild {
        return Err(PrincipalError::WildRealm(owned()));
    }
    if let Some(found) = realm.chars().find(|&c| bad(c) || c == '/') {
        return Err(PrincipalError::BadChar {
            principal: owned(),
            found,
        });
    }
    let comps: Vec<&str> = local.split('/').collect();
    if comps.len() > 2 {
        return Err(PrincipalError::TooManyComponents(owned()));
    }
    let mut parts = Vec::with_capacity(2);
    for (i, c) in comps.iter().enumerate() {
        let part = if i == 0 { "name" } else { "host" };
        if c.is_empty() {
            return Err(PrincipalError::EmptyPart {
                principal: owned(),
                part,
            });
        }
        if wild && *c == "*" {
            parts.push(Part::Any);
            continue;
        }
        if wild && c.contains('*') {
            return Err(PrincipalError::PartialWildcard(owned()));
        }
        if let Some(found) = c.chars().find(|&ch| bad(ch)) {
            return Err(PrincipalError::BadChar {
                principal: owned(),
                found,
            });
        }
        parts.push(Part::Is((*c).to_owned()));
    }
    let mut parts = parts.into_iter();
    let name = parts.next().unwrap_or(Part::Any);
    Ok((name, parts.next(), realm.to_owned()))
}

fn valid_unix_user(user: &str) -> bool {
    if let Some(uid) = user.strip_prefix('#') {
        return !uid.is_empty() && uid.len() <= 10 && uid.bytes().all(|b| b.is_ascii_digit());
    }
    let n = user.len();
    n > 0
        && !user.starts_with('-')
        && user.char_indices().all(|(i, c)| {
            c.is_ascii_alphanumeric()
                || matches!(c, '.' | '_' | '-' | '@')
                || (c == '$' && i + 1 == n)
        })
}

fn parse_curve(text: &str, key: &str) -> Result<Principal, PrincipalError> {
    let bad = |why: String| PrincipalError::BadCurve(text.to_owned(), why);
    if key.len() != 40 {
        return Err(bad(format!("got {} characters", key.chars().count())));
    }
    let bytes = canopy_security::z85::decode(key).map_err(|e| bad(e.to_string()))?;
    if bytes.len() != 32 {
        return Err(bad(format!("decodes to {} bytes", bytes.len())));
    }
    Ok(Principal::Curve {
        z85: key.to_owned(),
    })
}

impl Principal {
    /// `unix:#UID`: a local uid whose user name could not be resolved
    /// (name service down, or no passwd entry). No name rule and no
    /// wildcard matches it, allow or deny alike; only a rule naming
    /// `unix:#UID` exactly.
    pub fn is_unresolved_uid(&self) -> bool {
        matches!(self, Principal::Unix { user } if user.starts_with('#'))
    }

    /// Parse and canonicalize a principal. The form is chosen by prefix:
    /// `curve:` and `unix:` first (Z85 keys may contain `@` and `/`), then
    /// Kerberos.
    pub fn parse(text: &str) -> Result<Principal, PrincipalError> {
        common_checks(text)?;
        if let Some(key) = text.strip_prefix(CURVE_PREFIX) {
            return parse_curve(text, key);
        }
        if let Some(user) = text.strip_prefix(UNIX_PREFIX) {
            if !valid_unix_user(user) {
                return Err(PrincipalError::BadUnix(text.to_owned()));
            }
            return Ok(Principal::Unix {
                user: user.to_owned(),
            });
        }
        let (name, instance, realm) = split_kerberos(text, false)?;
        let lit = |p: Part| match p {
            Part::Is(s) => s,
            Part::Any => String::from("*"), // unreachable: wild is false
        };
        Ok(Principal::Kerberos {
            name: lit(name),
            instance: instance.map(lit),
            realm,
        })
    }

    pub fn kind(&self) -> Kind {
        match self {
            Principal::Kerberos { .. } => Kind::Kerberos,
            Principal::Curve { .. } => Kind::Curve,
            Principal::Unix { .. } => Kind::Unix,
        }
    }

    /// The canonical text (also what `Display` prints).
    pub fn canonical(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Principal::Kerberos {
                name,
                instance: Some(i),
                realm,
            } => write!(f, "{name}/{i}@{realm}"),
            Principal::Kerberos {
                name,
                instance: None,
                realm,
            } => write!(f, "{name}@{realm}"),
            Principal::Curve { z85 } => write!(f, "{CURVE_PREFIX}{z85}"),
            Principal::Unix { user } => write!(f, "{UNIX_PREFIX}{user}"),
        }
    }
}

impl std::str::FromStr for Principal {
    type Err = PrincipalError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Principal::parse(s)
    }
}

/// Which principals a rule is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// `*`: every principal.
    Any,
    /// `curve:*`: every CURVE key.
    AnyCurve,
    /// `unix:*`: every local user.
    AnyUnix,
    /// One principal, compared in canonical form.
    Exact(Principal),
    /// A Kerberos pattern with at least one `*` component (`*@R`,
    /// `service/*@R`, `*/host@R`, `*/*@R`). The number of components must
    /// match: `*@R` does not match `service/host@R`.
    Kerberos {
        name: Part,
        instance: Option<Part>,
        realm: String,
    },
    /// `keys:GROUP`: every principal listed in `[keys.GROUP]`.
    Group {
        name: String,
        members: Arc<BTreeSet<Principal>>,
    },
}

/// A pattern before key groups are resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum RawPattern {
    Resolved(Pattern),
    Group(String),
}

pub(crate) fn valid_group_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

impl Pattern {
    /// Parse a pattern; `keys:GROUP` is returned unresolved.
    pub(crate) fn parse(text: &str) -> Result<RawPattern, PrincipalError> {
        common_checks(text)?;
        let done = |p| Ok(RawPattern::Resolved(p));
        match text {
            "*" => return done(Pattern::Any),
            "curve:*" => return done(Pattern::AnyCurve),
            "unix:*" => return done(Pattern::AnyUnix),
            _ => {}
        }
        if let Some(group) = text.strip_prefix(GROUP_PREFIX) {
            if !valid_group_name(group) {
                return Err(PrincipalError::BadGroupName(text.to_owned()));
            }
            return Ok(RawPattern::Group(group.to_owned()));
        }
        if text.starts_with(CURVE_PREFIX) || text.starts_with(UNIX_PREFIX) {
            return Principal::parse(text).map(|p| RawPattern::Resolved(Pattern::Exact(p)));
        }
        let (name, instance, realm) = split_kerberos(text, true)?;
        match (name, instance) {
            (Part::Is(name), None) => done(Pattern::Exact(Principal::Kerberos {
                name,
                instance: None,
                realm,
            })),
            (Part::Is(name), Some(Part::Is(i))) => done(Pattern::Exact(Principal::Kerberos {
                name,
                instance: Some(i),
                realm,
            })),
            (name, instance) => done(Pattern::Kerberos {
                name,
                instance,
                realm,
            }),
        }
    }

    /// Does this pattern cover `p`?
    pub fn matches(&self, p: &Principal) -> bool {
        match (self, p) {
            // A uid whose name could not be resolved matches no wildcard:
            // only a rule naming `unix:#UID` itself.
            (Pattern::Any | Pattern::AnyUnix, p) if p.is_unresolved_uid() => false,
            (Pattern::Any, _) => true,
            (Pattern::AnyCurve, Principal::Curve { .. }) => true,
            (Pattern::AnyUnix, Principal::Unix { .. }) => true,
            (Pattern::Exact(e), p) => e == p,
            (
                Pattern::Kerberos {
                    name,
                    instance,
                    realm,
                },
                Principal::Kerberos {
                    name: n,
                    instance: i,
                    realm: r,
                },
            ) => {
                realm == r
                    && name.matches(n)
                    && match (instance, i) {
                        (None, None) => true,
                        (Some(pi), Some(i)) => pi.matches(i),
                        _ => false,
                    }
            }
            (Pattern::Group { members, .. }, p) => members.contains(p),
            _ => false,
        }
    }

    /// True for a Kerberos pattern whose host (instance) is written out:
    /// `service/host@R` or `*/host@R`.
    pub(crate) fn has_literal_host(&self) -> bool {
        match self {
            Pattern::Exact(Principal::Kerberos { instance, .. }) => instance.is_some(),
            Pattern::Kerberos { instance, .. } => matches!(instance, Some(Part::Is(_))),
            _ => false,
        }
    }

    /// [`Pattern::matches`], with the host part compared in any ASCII case
    /// (a rule's explicit `host_case = "insensitive"`). Name and realm stay
    /// exact.
    pub fn matches_any_host_case(&self, p: &Principal) -> bool {
        let Principal::Kerberos {
            name: n,
            instance: Some(i),
            realm: r,
        } = p
        else {
            return self.matches(p);
        };
        let (name, host, realm) = match self {
            Pattern::Exact(Principal::Kerberos {
                name,
                instance: Some(h),
                realm,
            }) => (Part::Is(name.clone()), h.as_str(), realm),
            Pattern::Kerberos {
                name,
                instance: Some(Part::Is(h)),
                realm,
            } => (name.clone(), h.as_str(), realm),
            _ => return self.matches(p),
        };
        realm == r && name.matches(n) && host.eq_ignore_ascii_case(i)
    }

    /// The principal kinds this pattern can match (`None`: all).
    pub(crate) fn kinds(&self) -> Option<Vec<Kind>> {
        match self {
            Pattern::Any => None,
            Pattern::AnyCurve => Some(vec![Kind::Curve]),
            Pattern::AnyUnix => Some(vec![Kind::Unix]),
            Pattern::Exact(p) => Some(vec![p.kind()]),
            Pattern::Kerberos { .. } => Some(vec![Kind::Kerberos]),
            Pattern::Group { members, .. } => {
                let mut k: Vec<Kind> = members.iter().map(Principal::kind).collect();
                k.dedup();
                Some(k)
            }
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pattern::Any => f.write_str("*"),
            Pattern::AnyCurve => f.write_str("curve:*"),
            Pattern::AnyUnix => f.write_str("unix:*"),
            Pattern::Exact(p) => p.fmt(f),
            Pattern::Kerberos {
                name,
                instance: Some(i),
                realm,
            } => write!(f, "{name}/{i}@{realm}"),
            Pattern::Kerberos {
                name,
                instance: None,
                realm,
            } => write!(f, "{name}@{realm}"),
            Pattern::Group { name, .. } => write!(f, "{GROUP_PREFIX}{name}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7";

    fn canon(s: &str) -> String {
        Principal::parse(s).unwrap().canonical()
    }

    fn pat(s: &str) -> Pattern {
        match Pattern::parse(s).unwrap() {
            RawPattern::Resolved(p) => p,
            RawPattern::Group(g) => panic!("unexpected group {g}"),
        }
    }

    #[test]
    fn kerberos_canonical_form() {
        assert_eq!(canon("alice@HPC.EXAMPLE"), "alice@HPC.EXAMPLE");
        // The instance is kept exactly: no part is case-folded, because
        // the KDC holds distinct keys for principals that differ in case.
        assert_eq!(
            canon("canopy/Node1.HPC.Example@HPC.EXAMPLE"),
            "canopy/Node1.HPC.Example@HPC.EXAMPLE"
        );
        assert_ne!(canon("svc/NODE1@R"), canon("svc/node1@R"));
        // Name and realm keep their case: these are three principals.
        assert_ne!(canon("Alice@HPC.EXAMPLE"), canon("alice@HPC.EXAMPLE"));
        assert_ne!(canon("alice@hpc.example"), canon("alice@HPC.EXAMPLE"));
        // The service name is not a host name: its case is kept.
        assert_eq!(canon("HTTP/web.example@R"), "HTTP/web.example@R");
        let p = Principal::parse("host/x@R").unwrap();
        assert_eq!(
            p,
            Principal::Kerberos {
                name: "host".into(),
                instance: Some("x".into()),
                realm: "R".into()
            }
        );
        assert_eq!(p.kind().mechanism(), Mech::Gssapi);
    }

    #[test]
    fn curve_and_unix() {
        let c = format!("curve:{KEY}");
        assert_eq!(canon(&c), c);
        assert_eq!(Principal::parse(&c).unwrap().kind(), Kind::Curve);
        assert_eq!(canon("unix:alice"), "unix:alice");
        assert_eq!(canon("unix:uid1000"), "unix:uid1000");
        assert_eq!(canon("unix:MACHINE$"), "unix:MACHINE$");
        assert_eq!(canon("unix:alice@ad.example"), "unix:alice@ad.example");
    }

    #[test]
    fn malformed_principals_are_refused() {
        use PrincipalError as E;
        let err = |s: &str| Principal::parse(s).unwrap_err();
        assert_eq!(err(""), E::Empty);
        assert!(matches!(err("alice"), E::NoRealm(_)));
        assert!(matches!(err("a@b@C"), E::TwoAts(_)));
        assert!(matches!(err("@R"), E::EmptyPart { part: "name", .. }));
        assert!(matches!(err("alice@"), E::EmptyPart { part: "realm", .. }));
        assert!(matches!(err("svc/@R"), E::EmptyPart { part: "host", .. }));
        assert!(matches!(err("/h@R"), E::EmptyPart { part: "name", .. }));
        assert!(matches!(err("a/b/c@R"), E::TooManyComponents(_)));
        assert!(matches!(err("al\nice@R"), E::Control(_)));
        assert!(matches!(err("al\u{7f}ice@R"), E::Control(_)));
        assert!(matches!(err("al ice@R"), E::BadChar { found: ' ', .. }));
        assert!(matches!(err("a\\b@R"), E::BadChar { found: '\\', .. }));
        assert!(matches!(err("*@R"), E::BadChar { found: '*', .. }));
        assert!(matches!(err("a@R/x"), E::BadChar { found: '/', .. }));
        // A GSSAPI name can never pose as a CURVE or local principal.
        assert!(matches!(err("curve:x@R"), E::BadCurve(..)));
        assert!(matches!(err("keys:x@R"), E::BadChar { found: ':', .. }));
        assert!(matches!(err("curve:short"), E::BadCurve(..)));
        assert!(matches!(err(&format!("curve:{KEY}x")), E::BadCurve(..)));
        assert!(matches!(
            err("curve:rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf\""),
            E::BadCurve(..)
        ));
        assert!(matches!(err("unix:"), E::BadUnix(_)));
        assert!(matches!(err("unix:-rf"), E::BadUnix(_)));
        assert!(matches!(err("unix:a b"), E::BadUnix(_)));
        assert!(matches!(err("unix:a$b"), E::BadUnix(_)));
        assert!(matches!(err(&"a".repeat(2000)), E::TooLong(2000)));
        // Messages quote the input with escapes and say what to do.
        let m = err("al\nice@R").to_string();
        assert!(
            m.contains("\"al\\nice@R\"") && m.contains("remove it"),
            "{m}"
        );
    }

    #[test]
    fn patterns() {
        let alice = Principal::parse("alice@R").unwrap();
        let svc = Principal::parse("canopy/n1.example@R").unwrap();
        let other_realm = Principal::parse("alice@S").unwrap();
        let key = Principal::parse(&format!("curve:{KEY}")).unwrap();
        let bob = Principal::parse("unix:bob").unwrap();

        assert!(pat("*").matches(&alice) && pat("*").matches(&key) && pat("*").matches(&bob));
        assert!(pat("*@R").matches(&alice));
        assert!(!pat("*@R").matches(&svc), "*@R is for one-component names");
        assert!(!pat("*@R").matches(&other_realm));
        assert!(!pat("*@r").matches(&alice), "realms are case-sensitive");
        assert!(pat("canopy/*@R").matches(&svc));
        assert!(!pat("canopy/*@R").matches(&alice));
        assert!(pat("*/*@R").matches(&svc));
        assert!(pat("*/n1.example@R").matches(&svc));
        assert!(
            !pat("*/N1.Example@R").matches(&svc),
            "pattern hosts are exact too"
        );
        assert!(!pat("canopy/N1.EXAMPLE@R").matches(&svc));
        assert!(!pat("svc/node1@R").matches(&Principal::parse("svc/NODE1@R").unwrap()));
        assert_eq!(
            pat("canopy/N1.EXAMPLE@R").to_string(),
            "canopy/N1.EXAMPLE@R"
        );
        assert!(pat("curve:*").matches(&key) && !pat("curve:*").matches(&bob));
        assert!(pat("unix:*").matches(&bob) && !pat("unix:*").matches(&alice));
        let unresolved = Principal::parse("unix:#65534").unwrap();
        assert!(unresolved.is_unresolved_uid() && !bob.is_unresolved_uid());
        assert!(
            !pat("unix:*").matches(&unresolved),
            "no wildcard matches an unresolved uid"
        );
        assert!(!pat("*").matches(&unresolved));
        assert!(!pat("unix:nobody").matches(&unresolved));
        assert!(pat("unix:#65534").matches(&unresolved));
        assert!(!pat("unix:#65535").matches(&unresolved));
        assert!(Principal::parse("unix:#").is_err() && Principal::parse("unix:#1a").is_err());
        assert!(pat("unix:bob").matches(&bob));
        assert!(pat(&format!("curve:{KEY}")).matches(&key));

        use PrincipalError as E;
        let err = |s: &str| Pattern::parse(s).unwrap_err();
        assert!(matches!(err("al*@R"), E::PartialWildcard(_)));
        assert!(matches!(err("*@*"), E::WildRealm(_)));
        assert!(matches!(err("canopy/n*@R"), E::PartialWildcard(_)));
        assert!(matches!(err("keys:"), E::BadGroupName(_)));
        assert!(matches!(err("keys:a.b"), E::BadGroupName(_)));
        assert!(matches!(err("unix:a*"), E::BadUnix(_)));
        assert_eq!(
            Pattern::parse("keys:ops").unwrap(),
            RawPattern::Group("ops".into())
        );
    }
}
