//! User certificates (`application/vnd.canopy.user-cert+json`): a site CA
//! (kind `ca`) or a node vouching for its own local users (kind
//! `node-attestation`) binds a user's Ed25519 public key to a principal
//! and a local account, for a short time. See docs/imp.md.

use ed25519_dalek::{SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::envelope::{b64_decode, b64_encode, is_hex, key_id, sign, UnixTime, USER_CERT_TYPE};
use crate::request::valid_name;

pub const CERT_VERSION: u32 = 1;

/// Who issued the certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CertKind {
    /// Issued by a site CA listed in `trusted_ca_keys`.
    Ca,
    /// Issued by a node for one of its local users; accepted only when
    /// imp.toml enables `[node_attestations]` and lists the node's key.
    NodeAttestation,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserCert {
    pub v: u32,
    pub kind: CertKind,
    pub principal: String,
    /// The local account the principal runs as.
    pub user: String,
    /// Standard base64 of the user's 32-byte Ed25519 public key.
    pub public_key: String,
    pub not_before: UnixTime,
    pub not_after: UnixTime,
    /// Key id of the signing CA or node key (must be the envelope's keyid).
    pub issuer: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CertError {
    #[error("malformed certificate: {0}; get a new one with `canopy cert request`")]
    Malformed(String),
}

/// A local user name as POSIX and shadow-utils accept it:
/// `[a-z_][a-z0-9_.-]*` (a trailing `$` allowed), at most 32 bytes.
pub fn valid_user_name(s: &str) -> bool {
    let body = s.strip_suffix('$').unwrap_or(s);
    let mut b = body.bytes();
    !s.is_empty()
        && s.len() <= 32
        && matches!(b.next(), Some(c) if c.is_ascii_lowercase() || c == b'_')
        && b.all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'_' | b'.' | b'-')
        })
}

impl UserCert {
    /// Parse and check the shape of a verified body.
    pub fn parse(body: &[u8]) -> Result<UserCert, CertError> {
        let c: UserCert =
            serde_json::from_slice(body).map_err(|e| CertError::Malformed(e.to_string()))?;
        let bad = |m: &str| Err(CertError::Malformed(m.to_owned()));
        if c.v != CERT_VERSION {
            return bad("unknown version v");
        }
        if !valid_name(&c.principal) {
            return bad("principal must have no spaces or control characters");
        }
        if !valid_user_name(&c.user) {
            return bad("user is not a valid local user name");
        }
        if c.not_after <= c.not_before {
            return bad("not_after is not later than not_before");
        }
        if !is_hex(&c.issuer, 64) {
            return bad("issuer is not a key id (64 lower-case hex digits)");
        }
        if c.public_key().is_none() {
            return bad("public_key is not the base64 of an ed25519 public key");
        }
        Ok(c)
    }

    /// The user's key.
    pub fn public_key(&self) -> Option<VerifyingKey> {
        let b: [u8; 32] = b64_decode(&self.public_key)?.try_into().ok()?;
        VerifyingKey::from_bytes(&b).ok()
    }

    /// A certificate for `user_key`, with `issuer` filled in from
    /// `issuer_key`, signed into an envelope (for the CA, tools and tests).
    #[allow(clippy::too_many_arguments)]
    pub fn issue(
        kind: CertKind,
        principal: &str,
        user: &str,
        user_key: &VerifyingKey,
        not_before: UnixTime,
        not_after: UnixTime,
        issuer_key: &SigningKey,
    ) -> (UserCert, Vec<u8>) {
        let c = UserCert {
            v: CERT_VERSION,
            kind,
            principal: principal.to_owned(),
            user: user.to_owned(),
            public_key: b64_encode(user_key.as_bytes()),
            not_before,
            not_after,
            issuer: key_id(&issuer_key.verifying_key()),
        };
        let body = serde_json::to_vec(&c).expect("a certificate always serializes");
        let env = sign(USER_CERT_TYPE, &body, issuer_key);
        (c, env)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_parse_back_and_bad_ones_do_not() {
        let ca = SigningKey::from_bytes(&[1; 32]);
        let user = SigningKey::from_bytes(&[2; 32]);
        let (c, env) = UserCert::issue(
            CertKind::NodeAttestation,
            "alice@R",
            "alice",
            &user.verifying_key(),
            10,
            20,
            &ca,
        );
        let e = crate::envelope::Envelope::parse(&env).unwrap();
        let body = e
            .verify(USER_CERT_TYPE, &ca.verifying_key(), "certificate")
            .unwrap();
        assert_eq!(UserCert::parse(body).unwrap(), c);
        assert!(String::from_utf8_lossy(body).contains(r#""kind":"node-attestation""#));
        let text = String::from_utf8(body.to_vec()).unwrap();
        for (from, to) in [
            (r#""user":"alice""#, r#""user":"Alice;rm""#),
            (r#""not_after":20"#, r#""not_after":10"#),
            (r#""v":1"#, r#""v":1,"v":1"#),
            (r#""kind":"node-attestation""#, r#""kind":"self""#),
        ] {
            let t = text.replace(from, to);
            assert!(UserCert::parse(t.as_bytes()).is_err(), "{t}");
        }
        assert!(valid_user_name("svc$") && valid_user_name("a.b-c_1"));
        assert!(!valid_user_name("") && !valid_user_name("1abc") && !valid_user_name("a b"));
    }
}
