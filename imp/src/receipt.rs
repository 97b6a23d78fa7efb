//! Receipts (`application/vnd.canopy.receipt+json`): what a node ran for a
//! request, signed by the node's receipt key, verifiable offline against
//! the nodes' public keys. See docs/imp.md.

use ed25519_dalek::{SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::envelope::{is_hex, key_id, sign, Envelope, EnvelopeError, UnixTime, RECEIPT_TYPE};

pub const RECEIPT_VERSION: u32 = 1;

/// How the command ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum Exit {
    /// Exited with this status.
    Status(i32),
    /// Killed by this signal number.
    Signal(i32),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Receipt {
    pub v: u32,
    /// SHA-256 (hex) of the request envelope's exact wire bytes.
    pub request_digest: String,
    pub rank: u32,
    pub host: String,
    pub uid: u32,
    pub start: UnixTime,
    pub end: UnixTime,
    pub exit: Exit,
    pub stdout_sha256: String,
    pub stderr_sha256: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReceiptError {
    #[error("receipt: {0}")]
    Envelope(#[from] EnvelopeError),
    #[error("receipt signed by key {0}, which is not among the node keys given; pass the executing node's public key")]
    UnknownKey(String),
    #[error("malformed receipt: {0}")]
    Malformed(String),
}

impl Receipt {
    /// Sign into an envelope with the node's receipt key.
    pub fn sign(&self, key: &SigningKey) -> Vec<u8> {
        let body = serde_json::to_vec(self).expect("a receipt always serializes");
        sign(RECEIPT_TYPE, &body, key)
    }

    fn check(&self) -> Result<(), ReceiptError> {
        let bad = |m: &str| Err(ReceiptError::Malformed(m.to_owned()));
        if self.v != RECEIPT_VERSION {
            return bad("unknown version v");
        }
        for (name, d) in [
            ("request_digest", &self.request_digest),
            ("stdout_sha256", &self.stdout_sha256),
            ("stderr_sha256", &self.stderr_sha256),
        ] {
            if !is_hex(d, 64) {
                return Err(ReceiptError::Malformed(format!(
                    "{name} is not 64 lower-case hex digits"
                )));
            }
        }
        if self.end < self.start {
            return bad("end is before start");
        }
        Ok(())
    }
}

/// Verify a receipt envelope offline against the nodes' public keys: the
/// key it names must be one of `node_keys`, the signature must hold over
/// the exact body, and the body must be well-formed. Returns the receipt
/// and the key that signed it.
pub fn verify_receipt<'k>(
    wire: &[u8],
    node_keys: &'k [VerifyingKey],
) -> Result<(Receipt, &'k VerifyingKey), ReceiptError> {
    let env = Envelope::parse(wire)?;
    let key = node_keys
        .iter()
        .find(|k| key_id(k) == env.keyid())
        .ok_or_else(|| ReceiptError::UnknownKey(env.keyid().to_owned()))?;
    let body = env.verify(RECEIPT_TYPE, key, "receipt")?;
    let r: Receipt =
        serde_json::from_slice(body).map_err(|e| ReceiptError::Malformed(e.to_string()))?;
    r.check()?;
    Ok((r, key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{b64_decode, b64_encode, sha256_hex};

    fn sample() -> Receipt {
        Receipt {
            v: 1,
            request_digest: sha256_hex(b"request"),
            rank: 3,
            host: "node3".into(),
            uid: 1000,
            start: 100,
            end: 101,
            exit: Exit::Signal(9),
            stdout_sha256: sha256_hex(b""),
            stderr_sha256: sha256_hex(b"err"),
        }
    }

    #[test]
    fn a_receipt_verifies_and_an_edited_one_does_not() {
        let node = SigningKey::from_bytes(&[5; 32]);
        let other = SigningKey::from_bytes(&[6; 32]);
        let wire = sample().sign(&node);
        let keys = [other.verifying_key(), node.verifying_key()];
        let (r, k) = verify_receipt(&wire, &keys).unwrap();
        assert_eq!(r, sample());
        assert_eq!(*k, node.verifying_key());
        assert!(String::from_utf8_lossy(
            &b64_decode(
                serde_json::from_slice::<serde_json::Value>(&wire).unwrap()["payload"]
                    .as_str()
                    .unwrap()
            )
            .unwrap()
        )
        .contains(r#""exit":{"signal":9}"#));

        // Edit the exit status inside the signed payload.
        let mut v: serde_json::Value = serde_json::from_slice(&wire).unwrap();
        let body = b64_decode(v["payload"].as_str().unwrap()).unwrap();
        let edited = String::from_utf8(body)
            .unwrap()
            .replace(r#"{"signal":9}"#, r#"{"status":0}"#);
        v["payload"] = b64_encode(edited.as_bytes()).into();
        let err = verify_receipt(&serde_json::to_vec(&v).unwrap(), &keys).unwrap_err();
        assert_eq!(
            err,
            ReceiptError::Envelope(EnvelopeError::BadSignature { what: "receipt" })
        );

        // Unknown node key.
        assert!(matches!(
            verify_receipt(&wire, &[other.verifying_key()]),
            Err(ReceiptError::UnknownKey(_))
        ));
        // Signed, but not a receipt body.
        let junk = crate::envelope::sign(RECEIPT_TYPE, b"{}", &node);
        assert!(matches!(
            verify_receipt(&junk, &keys),
            Err(ReceiptError::Malformed(_))
        ));
    }
}
