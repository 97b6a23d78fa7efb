//! Proof that the initiator holds the secret of the link key it asks to
//! bind (so nobody can bind someone else's public key to their own
//! principal): an HMAC-SHA256 over the transcript, keyed with the X25519
//! shared secret of the link key and the acceptor's CURVE server key. Only
//! the holder of the link secret (or of the server secret) can compute it.
//! Pure functions; secrets are zeroized.

use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// Length of a proof.
pub const POP_LEN: usize = 32;

fn hmac_sha256(key: &[u8; 32], msg: &[u8]) -> [u8; 32] {
    let mut k = Zeroizing::new([0u8; 64]);
    k[..32].copy_from_slice(key);
    let mut ipad = Zeroizing::new([0x36u8; 64]);
    let mut opad = Zeroizing::new([0x5cu8; 64]);
    for i in 0..64 {
        ipad[i] ^= k[i];
        opad[i] ^= k[i];
    }
    let inner = Sha256::new()
        .chain_update(&ipad[..])
        .chain_update(msg)
        .finalize();
    Sha256::new()
        .chain_update(&opad[..])
        .chain_update(inner)
        .finalize()
        .into()
}

/// X25519 of `secret` and `public`; `None` if `public` is a low-order
/// point (the result would not depend on the secret).
fn shared(secret: &[u8; 32], public: &[u8; 32]) -> Option<Zeroizing<[u8; 32]>> {
    let s = x25519_dalek::StaticSecret::from(*secret);
    let ss = s.diffie_hellman(&x25519_dalek::PublicKey::from(*public));
    ss.was_contributory()
        .then(|| Zeroizing::new(*ss.as_bytes()))
}

/// The initiator's proof: it holds `link_secret`, and speaks to the holder
/// of `server_public`, about `transcript`.
pub fn prove(
    link_secret: &[u8; 32],
    server_public: &[u8; 32],
    transcript: &[u8],
) -> Option<[u8; 32]> {
    let k = shared(link_secret, server_public)?;
    Some(hmac_sha256(&k, transcript))
}

/// The acceptor's check of a proof, in constant time.
pub fn verify(
    server_secret: &[u8; 32],
    link_public: &[u8; 32],
    transcript: &[u8],
    proof: &[u8; 32],
) -> bool {
    let Some(k) = shared(server_secret, link_public) else {
        return false;
    };
    let want = hmac_sha256(&k, transcript);
    want.iter()
        .zip(proof)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use canopy_security::CurveKeypair;

    #[test]
    fn only_the_link_secret_proves() {
        let link = CurveKeypair::generate().unwrap();
        let server = CurveKeypair::generate().unwrap();
        let other = CurveKeypair::generate().unwrap();
        let p = prove(link.secret(), server.public(), b"t").unwrap();
        assert!(verify(server.secret(), link.public(), b"t", &p));
        // Another transcript, another claimed key, another prover: refused.
        assert!(!verify(server.secret(), link.public(), b"u", &p));
        assert!(!verify(server.secret(), other.public(), b"t", &p));
        let q = prove(other.secret(), server.public(), b"t").unwrap();
        assert!(!verify(server.secret(), link.public(), b"t", &q));
        let mut r = p;
        r[0] ^= 1;
        assert!(!verify(server.secret(), link.public(), b"t", &r));
    }

    #[test]
    fn low_order_keys_prove_nothing() {
        let server = CurveKeypair::generate().unwrap();
        // The all-zero point: X25519 with it is zero whatever the secret.
        assert!(!verify(server.secret(), &[0u8; 32], b"t", &[0u8; 32]));
        assert!(prove(server.secret(), &[0u8; 32], b"t").is_none());
    }

    #[test]
    fn hmac_matches_rfc_4231_case_2_shape() {
        // RFC 4231 test case 2 uses a 4-byte key; ours is zero-padded to 32
        // bytes, which HMAC treats identically.
        let mut key = [0u8; 32];
        key[..4].copy_from_slice(b"Jefe");
        let mac = hmac_sha256(&key, b"what do ya want for nothing?");
        let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
