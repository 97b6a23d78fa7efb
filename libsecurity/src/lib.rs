//! Canopy's key material.
//!
//! * [`z85`]: the ZeroMQ Z85 text encoding (RFC 32) used for CURVE keys.
//! * [`CurveKeypair`]: an X25519 keypair for libzmq's CURVE mechanism. The
//!   secret half is zeroized on drop and never appears in `Debug` output.
//! * [`curve_principal`]: the canonical principal of a CURVE public key.
//! * [`trust`]: OpenSSH `StrictModes` for files that decide access.
//! * [`text`]: `file:line:col` positions and advice for their parse errors.
#![forbid(unsafe_code)]

pub mod cert;
pub mod text;
pub mod trust;
pub mod z85;

use zeroize::Zeroizing;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("the system random number generator failed: {0}; check that /dev/urandom is readable")]
    Random(String),
    #[error(transparent)]
    Z85(#[from] z85::Z85Error),
    #[error("a CURVE key is 32 bytes (40 Z85 characters), got {0} bytes; check the key text")]
    KeyLength(usize),
}

/// An X25519 keypair for CURVE.
pub struct CurveKeypair {
    public: [u8; 32],
    secret: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for CurveKeypair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CurveKeypair")
            .field("public", &z85::encode(&self.public))
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl CurveKeypair {
    /// A fresh random keypair.
    pub fn generate() -> Result<CurveKeypair, KeyError> {
        let mut secret = Zeroizing::new([0u8; 32]);
        getrandom::getrandom(&mut secret[..]).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(Self::from_secret(secret))
    }

    /// The keypair for a given secret key (the public key is derived).
    pub fn from_secret(secret: Zeroizing<[u8; 32]>) -> CurveKeypair {
        let s = x25519_dalek::StaticSecret::from(*secret);
        let public = x25519_dalek::PublicKey::from(&s).to_bytes();
        CurveKeypair { public, secret }
    }

    pub fn public(&self) -> &[u8; 32] {
        &self.public
    }

    /// The secret key. Handle with care: never log it.
    pub fn secret(&self) -> &[u8; 32] {
        &self.secret
    }

    /// The public key as 40 Z85 characters.
    pub fn public_z85(&self) -> String {
        z85::encode(&self.public)
    }
}

/// Decode a 40-character Z85 public key.
pub fn decode_public_key(text: &str) -> Result<[u8; 32], KeyError> {
    let b = z85::decode(text)?;
    b.as_slice()
        .try_into()
        .map_err(|_| KeyError::KeyLength(b.len()))
}

/// The canonical principal of a CURVE public key: `curve:<Z85>`.
pub fn curve_principal(public: &[u8; 32]) -> String {
    format!("curve:{}", z85::encode(public))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keypairs_are_distinct_and_derivable() {
        let a = CurveKeypair::generate().unwrap();
        let b = CurveKeypair::generate().unwrap();
        assert_ne!(a.public(), b.public());
        let a2 = CurveKeypair::from_secret(Zeroizing::new(*a.secret()));
        assert_eq!(a.public(), a2.public());
        assert_eq!(a.public_z85().len(), 40);
        assert_eq!(decode_public_key(&a.public_z85()).unwrap(), *a.public());
        assert!(curve_principal(a.public()).starts_with("curve:"));
    }

    #[test]
    fn debug_never_shows_secret() {
        let a = CurveKeypair::generate().unwrap();
        let dbg = format!("{a:?}");
        assert!(dbg.contains("<redacted>"));
        assert!(!dbg.contains(&z85::encode(a.secret())));
    }

    #[test]
    fn matches_libsodium_vector() {
        // RFC 7748 section 6.1 test vector (Alice).
        let sk = z85_hex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a");
        let pk = z85_hex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a");
        let kp = CurveKeypair::from_secret(Zeroizing::new(sk));
        assert_eq!(*kp.public(), pk);
    }

    fn z85_hex(h: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&h[2 * i..2 * i + 2], 16).unwrap();
        }
        out
    }

    #[test]
    fn bad_public_keys() {
        assert!(matches!(decode_public_key("abc"), Err(KeyError::Z85(_))));
        assert_eq!(decode_public_key("HelloWorld"), Err(KeyError::KeyLength(8)));
    }
}
