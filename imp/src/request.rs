//! The exec request body (`application/vnd.canopy.exec-request+json`),
//! signed by the user's key. See docs/imp.md for the field table.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use crate::envelope::{is_hex, lower_first, UnixTime};

/// The only version of the body.
pub const REQUEST_VERSION: u32 = 1;
/// Most `argv` entries accepted.
pub const MAX_ARGV: usize = 4096;
/// Most `env` entries accepted.
pub const MAX_ENV: usize = 1024;
/// Longest principal, instance id, user or service name.
pub const MAX_NAME: usize = 256;

/// Who may submit the request to the helper.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawAudience", into = "RawAudience")]
pub enum Audience {
    /// The user themself, through the broker that authenticated them.
    User,
    /// Restricted delegation: only the named service (registered through
    /// the services mechanism) may submit it.
    Service { name: String },
}

/// The wire form of [`Audience`]: `{"kind":"user"}` or
/// `{"kind":"service","name":"sched"}`, nothing else.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudience {
    kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
}

impl TryFrom<RawAudience> for Audience {
    type Error = String;
    fn try_from(r: RawAudience) -> Result<Audience, String> {
        match (r.kind.as_str(), r.name) {
            ("user", None) => Ok(Audience::User),
            ("service", Some(name)) => Ok(Audience::Service { name }),
            ("user", Some(_)) => Err("audience of kind user has no name".into()),
            ("service", None) => Err("audience of kind service needs a name".into()),
            (k, _) => Err(format!(
                "unknown audience kind {k:?}, expected \"user\" or \"service\""
            )),
        }
    }
}

impl From<Audience> for RawAudience {
    fn from(a: Audience) -> RawAudience {
        match a {
            Audience::User => RawAudience {
                kind: "user".into(),
                name: None,
            },
            Audience::Service { name } => RawAudience {
                kind: "service".into(),
                name: Some(name),
            },
        }
    }
}

/// An exec request, as signed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    pub v: u32,
    pub principal: String,
    pub argv: Vec<String>,
    pub cwd: String,
    #[serde(deserialize_with = "unique_map")]
    pub env: BTreeMap<String, String>,
    pub instance: String,
    pub ranks: Vec<u32>,
    pub audience: Audience,
    pub issued_at: UnixTime,
    pub not_after: UnixTime,
    pub nonce: String,
}

/// Why a request body is refused (before any policy check).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("malformed request: {0}; build it with `canopy exec` or as docs/imp.md says")]
    Json(String),
    #[error("malformed request: {0}")]
    Field(String),
}

/// A JSON object into a map, refusing a key given twice (serde's maps keep
/// the last one silently; a signed document must not mean two things).
fn unique_map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = BTreeMap<String, String>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an object of strings")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some((k, v)) = m.next_entry::<String, String>()? {
                if out.contains_key(&k) {
                    return Err(serde::de::Error::custom(format!("duplicate env key {k:?}")));
                }
                out.insert(k, v);
            }
            Ok(out)
        }
    }
    d.deserialize_map(V)
}

/// A name (principal, instance, user, service): 1 to [`MAX_NAME`] bytes,
/// no whitespace or control characters.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_NAME && !s.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// An environment variable name: `[A-Za-z_][A-Za-z0-9_]*`.
pub fn valid_env_name(s: &str) -> bool {
    let mut b = s.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_alphabetic() || c == b'_')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_')
        && s.len() <= MAX_NAME
}

impl ExecRequest {
    /// Parse and check the shape of a body (the signature over it has been
    /// checked already: this never sees unauthenticated bytes in the
    /// helper, but the fuzz target feeds it anything).
    pub fn parse(body: &[u8]) -> Result<ExecRequest, RequestError> {
        let r: ExecRequest = serde_json::from_slice(body)
            .map_err(|e| RequestError::Json(lower_first(e.to_string())))?;
        r.check()?;
        Ok(r)
    }

    /// The shape rules of docs/imp.md.
    pub fn check(&self) -> Result<(), RequestError> {
        let bad = |m: String| Err(RequestError::Field(m));
        if self.v != REQUEST_VERSION {
            return bad(format!(
                "v is {}, this helper knows only version {REQUEST_VERSION}; upgrade the helper or the client",
                self.v
            ));
        }
        if !valid_name(&self.principal) {
            return bad("principal must be 1 to 256 characters with no spaces or control characters, e.g. \"alice@REALM\"".into());
        }
        if self.argv.is_empty() || self.argv[0].is_empty() {
            return bad("argv is empty; give the command to run".into());
        }
        if self.argv.len() > MAX_ARGV {
            return bad(format!(
                "argv has {} entries, at most {MAX_ARGV} are allowed",
                self.argv.len()
            ));
        }
        if self.argv.iter().any(|a| a.contains('\0')) {
            return bad("argv contains a NUL character; remove it".into());
        }
        if !self.cwd.starts_with('/') || self.cwd.contains('\0') {
            return bad(format!(
                "cwd {:?} is not an absolute path; give e.g. \"/home/alice\"",
                self.cwd
            ));
        }
        if self.env.len() > MAX_ENV {
            return bad(format!(
                "env has {} entries, at most {MAX_ENV} are allowed",
                self.env.len()
            ));
        }
        for (k, v) in &self.env {
            if !valid_env_name(k) {
                return bad(format!(
                    "env name {k:?} is not a valid variable name ([A-Za-z_][A-Za-z0-9_]*)"
                ));
            }
            if v.contains('\0') {
                return bad(format!(
                    "env value of {k} contains a NUL character; remove it"
                ));
            }
        }
        if !valid_name(&self.instance) {
            return bad(
                "instance must be 1 to 256 characters with no spaces or control characters".into(),
            );
        }
        if self.ranks.is_empty() {
            return bad("ranks is empty; name at least one rank".into());
        }
        if let Audience::Service { name } = &self.audience {
            if !valid_name(name) {
                return bad(
                    "audience.name must be a service name with no spaces or control characters"
                        .into(),
                );
            }
        }
        if self.not_after <= self.issued_at {
            return bad(
                "not_after is not later than issued_at; choose a lifetime of a few minutes".into(),
            );
        }
        if !is_hex(&self.nonce, 32) {
            return bad("nonce must be 32 lower-case hex digits (16 random bytes)".into());
        }
        Ok(())
    }

    /// The body as JSON bytes (for clients and tests; the helper never
    /// re-serializes what it verifies).
    pub fn to_body(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a request always serializes")
    }
}

/// Sign `req` with the user's key into an envelope
/// (`application/vnd.canopy.exec-request+json`): the wire bytes the
/// brokers forward byte for byte.
pub fn sign_request(req: &ExecRequest, key: &ed25519_dalek::SigningKey) -> Vec<u8> {
    crate::envelope::sign(crate::envelope::EXEC_REQUEST_TYPE, &req.to_body(), key)
}

/// 16 random bytes as 32 hex digits.
pub fn new_nonce() -> Result<String, getrandom::Error> {
    let mut b = [0u8; 16];
    getrandom::getrandom(&mut b)?;
    Ok(crate::envelope::hex(&b))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample() -> ExecRequest {
        ExecRequest {
            v: 1,
            principal: "alice@EXAMPLE.ORG".into(),
            argv: vec!["id".into(), "-un".into()],
            cwd: "/".into(),
            env: BTreeMap::from([("LANG".into(), "C".into())]),
            instance: "sys".into(),
            ranks: vec![0, 1, 2],
            audience: Audience::User,
            issued_at: 1_000_000,
            not_after: 1_000_300,
            nonce: "0123456789abcdef0123456789abcdef".into(),
        }
    }

    #[test]
    fn round_trips_and_reads_the_documented_form() {
        let r = sample();
        assert_eq!(ExecRequest::parse(&r.to_body()).unwrap(), r);
        let doc = br#"{"v":1,"principal":"alice@EXAMPLE.ORG","argv":["id","-un"],"cwd":"/","env":{"LANG":"C"},
            "instance":"sys","ranks":[0,1,2],"audience":{"kind":"user"},"issued_at":1000000,
            "not_after":1000300,"nonce":"0123456789abcdef0123456789abcdef"}"#;
        assert_eq!(ExecRequest::parse(doc).unwrap(), r);
        let svc = String::from_utf8_lossy(doc)
            .replace(r#"{"kind":"user"}"#, r#"{"kind":"service","name":"sched"}"#);
        assert_eq!(
            ExecRequest::parse(svc.as_bytes()).unwrap().audience,
            Audience::Service {
                name: "sched".into()
            }
        );
    }

    #[test]
    fn bad_shapes_are_refused() {
        let body = String::from_utf8(sample().to_body()).unwrap();
        for (from, to) in [
            (r#""v":1"#, r#""v":2"#),
            (r#"["id","-un"]"#, "[]"),
            (r#""cwd":"/""#, r#""cwd":"tmp""#),
            (r#""ranks":[0,1,2]"#, r#""ranks":[]"#),
            (r#""ranks":[0,1,2]"#, r#""ranks":[-1]"#),
            (
                r#""nonce":"0123456789abcdef0123456789abcdef""#,
                r#""nonce":"00""#,
            ),
            (r#"{"LANG":"C"}"#, r#"{"LANG":"C","LANG":"D"}"#),
            (r#"{"LANG":"C"}"#, r#"{"A=B":"C"}"#),
            (r#"{"kind":"user"}"#, r#"{"kind":"root"}"#),
            (r#"{"kind":"user"}"#, r#"{"kind":"user","name":"x"}"#),
            (r#""v":1"#, r#""v":1,"extra":true"#),
            (r#""not_after":1000300"#, r#""not_after":1000000"#),
            (
                r#""principal":"alice@EXAMPLE.ORG""#,
                r#""principal":"al ice""#,
            ),
        ] {
            assert!(body.contains(from), "{from}");
            let b = body.replace(from, to);
            assert!(
                ExecRequest::parse(b.as_bytes()).is_err(),
                "{b} was accepted"
            );
        }
    }
}
