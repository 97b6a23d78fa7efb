//! Signed envelopes over exact bytes (DSSE-style, see docs/imp.md).
//!
//! A body is signed as it is: the signature covers the pre-authentication
//! encoding
//!
//! ```text
//! PAE(type, body) = "DSSEv1" SP LEN(type) SP type SP LEN(body) SP body
//! ```
//!
//! where `SP` is one space (0x20) and `LEN` is the length in bytes as ASCII
//! decimal with no leading zeros. The wire form is JSON:
//!
//! ```json
//! {"payloadType":"application/vnd.canopy.exec-request+json",
//!  "payload":"<base64 of the body>",
//!  "signatures":[{"keyid":"<64 hex>","sig":"<base64 of 64 bytes>"}]}
//! ```
//!
//! Verification decodes the payload, checks the signature over the PAE of
//! those exact bytes, and only then parses the body: nothing is ever
//! re-serialized, so there is no canonical form to get wrong. Base64 is the
//! standard alphabet with canonical padding; anything else is refused.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Largest envelope accepted on the wire, in bytes.
pub const MAX_ENVELOPE_BYTES: usize = 64 * 1024;

/// `payloadType` of an exec request.
pub const EXEC_REQUEST_TYPE: &str = "application/vnd.canopy.exec-request+json";
/// `payloadType` of a user certificate (or node attestation).
pub const USER_CERT_TYPE: &str = "application/vnd.canopy.user-cert+json";
/// `payloadType` of a receipt.
pub const RECEIPT_TYPE: &str = "application/vnd.canopy.receipt+json";

/// Why an envelope was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    #[error("malformed envelope: it is {0} bytes, more than the {MAX_ENVELOPE_BYTES} allowed; send a smaller request")]
    TooLarge(usize),
    #[error("malformed envelope: {0}; send the JSON envelope exactly as it was signed (see docs/imp.md)")]
    Json(String),
    #[error("malformed envelope: {field} is not canonical base64 (standard alphabet, with padding); re-encode it")]
    Base64 { field: &'static str },
    #[error(
        "malformed envelope: it has {0} signatures, exactly one is required; sign it with one key"
    )]
    SignatureCount(usize),
    #[error("malformed envelope: keyid {0:?} is not 64 lower-case hex digits (the sha-256 of the public key); use the key id the signing tool prints")]
    KeyId(String),
    #[error(
        "malformed envelope: the signature is {0} bytes, not 64; sign it again with an ed25519 key"
    )]
    SignatureLength(usize),
    #[error(
        "wrong envelope type {found:?}, expected {expected:?}; send the right kind of document"
    )]
    Type {
        found: String,
        expected: &'static str,
    },
    #[error("envelope signed by key {found}, expected key {expected}; sign it with the key the certificate names")]
    WrongKey { found: String, expected: String },
    #[error("bad signature on the {what}: it was changed after it was signed, or signed by another key; sign it again")]
    BadSignature { what: &'static str },
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireEnvelope {
    #[serde(rename = "payloadType")]
    payload_type: String,
    payload: String,
    signatures: Vec<WireSignature>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireSignature {
    keyid: String,
    sig: String,
}

/// The pre-authentication encoding of `body` under `payload_type`.
pub fn pae(payload_type: &str, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload_type.len() + body.len() + 32);
    out.extend_from_slice(b"DSSEv1 ");
    out.extend_from_slice(payload_type.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload_type.as_bytes());
    out.push(b' ');
    out.extend_from_slice(body.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(body);
    out
}

/// The key id of a public key: lower-case hex SHA-256 of its 32 bytes.
pub fn key_id(key: &VerifyingKey) -> String {
    hex(&Sha256::digest(key.as_bytes()))
}

/// A parser's message with its first letter lower-cased, unless it starts
/// an acronym (`EOF while parsing` stays as it is).
pub fn lower_first(msg: String) -> String {
    let mut c = msg.chars();
    match (c.next(), c.next()) {
        (Some(f), Some(g)) if f.is_uppercase() && !g.is_uppercase() => {
            f.to_lowercase().chain(msg.chars().skip(1)).collect()
        }
        _ => msg,
    }
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// SHA-256 of `bytes`, as lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// True if `s` is exactly `len` lower-case hex digits.
pub fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Strict base64 (standard alphabet, canonical padding).
pub fn b64_decode(s: &str) -> Option<Vec<u8>> {
    STANDARD.decode(s).ok()
}

/// Standard base64 with padding.
pub fn b64_encode(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

/// Sign `body` as `payload_type` with `key`; returns the wire bytes.
pub fn sign(payload_type: &str, body: &[u8], key: &SigningKey) -> Vec<u8> {
    let sig = key.sign(&pae(payload_type, body));
    let wire = WireEnvelope {
        payload_type: payload_type.to_owned(),
        payload: b64_encode(body),
        signatures: vec![WireSignature {
            keyid: key_id(&key.verifying_key()),
            sig: b64_encode(&sig.to_bytes()),
        }],
    };
    serde_json::to_vec(&wire).expect("an envelope always serializes")
}

/// A structurally valid envelope whose signature is not checked yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    payload_type: String,
    body: Vec<u8>,
    keyid: String,
    sig: [u8; 64],
}

impl Envelope {
    /// Parse the wire bytes: size bound, JSON with exactly the three
    /// fields, canonical base64, exactly one signature of 64 bytes, a
    /// well-formed key id. The signature is not checked here.
    pub fn parse(wire: &[u8]) -> Result<Envelope, EnvelopeError> {
        if wire.len() > MAX_ENVELOPE_BYTES {
            return Err(EnvelopeError::TooLarge(wire.len()));
        }
        let w: WireEnvelope = serde_json::from_slice(wire)
            .map_err(|e| EnvelopeError::Json(lower_first(e.to_string())))?;
        let body = b64_decode(&w.payload).ok_or(EnvelopeError::Base64 { field: "payload" })?;
        if w.signatures.len() != 1 {
            return Err(EnvelopeError::SignatureCount(w.signatures.len()));
        }
        let s = &w.signatures[0];
        if !is_hex(&s.keyid, 64) {
            return Err(EnvelopeError::KeyId(s.keyid.clone()));
        }
        let sig = b64_decode(&s.sig).ok_or(EnvelopeError::Base64 { field: "sig" })?;
        let sig: [u8; 64] = sig
            .as_slice()
            .try_into()
            .map_err(|_| EnvelopeError::SignatureLength(sig.len()))?;
        Ok(Envelope {
            payload_type: w.payload_type,
            body,
            keyid: s.keyid.clone(),
            sig,
        })
    }

    pub fn payload_type(&self) -> &str {
        &self.payload_type
    }

    /// The key id the signer claims (not yet verified).
    pub fn keyid(&self) -> &str {
        &self.keyid
    }

    /// The body, before its signature is checked. Only for tools that
    /// show or digest it; decisions use [`Envelope::verify`].
    pub fn unverified_body(&self) -> &[u8] {
        &self.body
    }

    /// Check the type, that `key` is the key the envelope names, and the
    /// signature over the PAE of the exact body; return the body.
    pub fn verify(
        &self,
        expected_type: &'static str,
        key: &VerifyingKey,
        what: &'static str,
    ) -> Result<&[u8], EnvelopeError> {
        if self.payload_type != expected_type {
            return Err(EnvelopeError::Type {
                found: self.payload_type.clone(),
                expected: expected_type,
            });
        }
        let id = key_id(key);
        if self.keyid != id {
            return Err(EnvelopeError::WrongKey {
                found: self.keyid.clone(),
                expected: id,
            });
        }
        let sig = Signature::from_bytes(&self.sig);
        key.verify_strict(&pae(&self.payload_type, &self.body), &sig)
            .map_err(|_| EnvelopeError::BadSignature { what })?;
        Ok(&self.body)
    }
}

/// Seconds since the Unix epoch, as the bodies carry them.
pub type UnixTime = u64;

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> SigningKey {
        SigningKey::from_bytes(&[n; 32])
    }

    #[test]
    fn pae_matches_the_dsse_definition() {
        assert_eq!(pae("t", b"hello"), b"DSSEv1 1 t 5 hello".to_vec());
        assert_eq!(pae("", b""), b"DSSEv1 0  0 ".to_vec());
    }

    #[test]
    fn sign_then_verify_returns_the_exact_body() {
        let k = key(1);
        let body = br#"{"b": 1,  "a":2}"#;
        let wire = sign(RECEIPT_TYPE, body, &k);
        let env = Envelope::parse(&wire).unwrap();
        assert_eq!(
            env.verify(RECEIPT_TYPE, &k.verifying_key(), "receipt")
                .unwrap(),
            body
        );
    }

    #[test]
    fn another_key_or_type_or_body_is_refused() {
        let k = key(1);
        let wire = sign(RECEIPT_TYPE, b"x", &k);
        let env = Envelope::parse(&wire).unwrap();
        assert!(matches!(
            env.verify(RECEIPT_TYPE, &key(2).verifying_key(), "receipt"),
            Err(EnvelopeError::WrongKey { .. })
        ));
        assert!(matches!(
            env.verify(EXEC_REQUEST_TYPE, &k.verifying_key(), "receipt"),
            Err(EnvelopeError::Type { .. })
        ));
        // Same signature, other body.
        let mut v: serde_json::Value = serde_json::from_slice(&wire).unwrap();
        v["payload"] = b64_encode(b"y").into();
        let env = Envelope::parse(&serde_json::to_vec(&v).unwrap()).unwrap();
        assert_eq!(
            env.verify(RECEIPT_TYPE, &k.verifying_key(), "receipt"),
            Err(EnvelopeError::BadSignature { what: "receipt" })
        );
        // The signature binds the type too.
        let mut v: serde_json::Value = serde_json::from_slice(&wire).unwrap();
        v["payloadType"] = EXEC_REQUEST_TYPE.into();
        let env = Envelope::parse(&serde_json::to_vec(&v).unwrap()).unwrap();
        assert!(env
            .verify(EXEC_REQUEST_TYPE, &k.verifying_key(), "request")
            .is_err());
    }

    #[test]
    fn malformed_envelopes_are_refused() {
        let k = key(1);
        let good: serde_json::Value =
            serde_json::from_slice(&sign(RECEIPT_TYPE, b"x", &k)).unwrap();
        let bad = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut v = good.clone();
            f(&mut v);
            Envelope::parse(&serde_json::to_vec(&v).unwrap()).unwrap_err()
        };
        assert!(matches!(
            bad(&|v| v["extra"] = 1.into()),
            EnvelopeError::Json(_)
        ));
        assert!(matches!(
            bad(&|v| v["payload"] = "eA".into()),
            EnvelopeError::Base64 { field: "payload" }
        ));
        assert!(matches!(
            bad(&|v| v["payload"] = "eB==".into()),
            EnvelopeError::Base64 { .. }
        ));
        assert!(matches!(
            bad(&|v| v["signatures"] = serde_json::json!([])),
            EnvelopeError::SignatureCount(0)
        ));
        assert!(matches!(
            bad(&|v| {
                let s = v["signatures"][0].clone();
                v["signatures"] = serde_json::json!([s.clone(), s]);
            }),
            EnvelopeError::SignatureCount(2)
        ));
        assert!(matches!(
            bad(&|v| v["signatures"][0]["keyid"] = "ABC".into()),
            EnvelopeError::KeyId(_)
        ));
        assert!(matches!(
            bad(&|v| v["signatures"][0]["sig"] = b64_encode(&[0; 63]).into()),
            EnvelopeError::SignatureLength(63)
        ));
        assert!(matches!(
            Envelope::parse(&vec![b' '; MAX_ENVELOPE_BYTES + 1]),
            Err(EnvelopeError::TooLarge(_))
        ));
        assert!(matches!(
            Envelope::parse(b"{\"payloadType\":\"a\",\"payloadType\":\"b\"}"),
            Err(EnvelopeError::Json(_))
        ));
    }
}

#[cfg(test)]
mod independent {
    use super::*;

    /// The seed envelopes in fuzz/seeds/imp_envelope were made by a
    /// separate implementation (Python's `cryptography`, following
    /// docs/imp.md): they must verify here, so the documented PAE is the
    /// one implemented.
    #[test]
    fn envelopes_made_from_the_documentation_verify() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/imp_envelope");
        for (file, seed, ty) in [
            ("request-envelope.json", 3u8, EXEC_REQUEST_TYPE),
            ("cert-envelope.json", 1u8, USER_CERT_TYPE),
        ] {
            let wire = std::fs::read(dir.join(file)).unwrap();
            let key = SigningKey::from_bytes(&[seed; 32]).verifying_key();
            let env = Envelope::parse(&wire).unwrap();
            env.verify(ty, &key, "seed")
                .unwrap_or_else(|e| panic!("{file}: {e}"));
        }
    }
}
