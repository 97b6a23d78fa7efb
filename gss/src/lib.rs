//! Kerberos for Canopy without libzmq's GSSAPI mechanism.
//!
//! libzmq's own GSSAPI mechanism ignores a ZAP denial, leaks on every
//! wrapped message and runs Kerberos on libzmq's I/O thread, so Canopy
//! never uses it. Instead, in the manner of RFC 4462 (GSS key exchange for
//! SSH), the initiator makes a fresh CURVE keypair for a link and proves
//! with a Kerberos (GSS-API) context that its public key belongs to its
//! principal; the acceptor proves its own principal and vouches for its
//! CURVE server key the same way. The acceptor then records `key →
//! principal, expiry` in a [`Bindings`] table that its ZAP policy consults;
//! CURVE carries the traffic.
//!
//! * [`wire`]: the pure codec of the exchange and the transcript both MICs
//!   cover (length-limited, versioned, hostile bytes are an error);
//! * [`bindings`]: the table;
//! * [`krb`]: a thin wrapper over `libgssapi` (credentials, contexts, MIC);
//! * [`server`]: the acceptor, on its own threads over TCP (the KDC is never
//!   contacted on a thread that routes messages);
//! * [`client`]: the initiator's handshake.
//!
//! See docs/security.md for the threat model and the handshake step by step.
#![forbid(unsafe_code)]

pub mod bindings;
pub mod client;
pub mod fuzz;
pub mod krb;
pub mod pop;
pub mod ratelog;
pub mod server;
pub mod wire;

pub use bindings::{BindError, Binding, Bindings};
pub use client::{handshake, Bound, ClientConfig};
pub use server::{KexServer, Limits, ServerConfig};
pub use wire::{Msg, Purpose, Transcript};

/// Errors of this crate. Messages are lower-case and say what to do.
#[derive(Debug, thiserror::Error)]
pub enum GssError {
    /// Credentials are missing, expired or unreadable.
    #[error("{0}")]
    Credentials(String),
    /// A GSS-API call failed (the mechanism's message is included).
    #[error("kerberos {op} failed: {detail}")]
    Gss { op: &'static str, detail: String },
    /// The peer sent something that is not canopy-gss-v1.
    #[error("key exchange protocol error: {0}")]
    Protocol(String),
    /// The peer refused us.
    #[error("refused by {peer}: {reason}")]
    Refused { peer: String, reason: String },
    /// Authentication checks failed on our side.
    #[error("authentication failed: {0}")]
    Auth(String),
    #[error("key exchange with {peer} failed: {source}; check that the peer's key-exchange address is right and reachable")]
    Io {
        peer: String,
        source: std::io::Error,
    },
    #[error("invalid principal {name:?}: {reason}")]
    Name { name: String, reason: String },
    /// The acceptor is at one of its limits; the initiator may retry.
    #[error("the key exchange is busy ({0}); retry shortly")]
    Busy(String),
}

/// How a refusal for being busy starts (see [`GssError::Busy`]).
const BUSY_PREFIX: &str = "the key exchange is busy";

impl GssError {
    /// The acceptor refused only because it was at a limit: retrying
    /// shortly may succeed.
    pub fn is_busy(&self) -> bool {
        match self {
            GssError::Busy(_) => true,
            GssError::Refused { reason, .. } => reason.starts_with(BUSY_PREFIX),
            _ => false,
        }
    }

    /// A short name of the kind of error, for rate-limited logging.
    pub fn cause(&self) -> &'static str {
        match self {
            GssError::Credentials(_) => "credentials",
            GssError::Gss { .. } => "gss",
            GssError::Protocol(_) => "protocol",
            GssError::Refused { .. } => "refused",
            GssError::Auth(_) => "auth",
            GssError::Io { .. } => "io",
            GssError::Name { .. } => "name",
            GssError::Busy(_) => "busy",
        }
    }
}

/// Canonical form of a Kerberos principal for the ACL and the logs:
/// `name@REALM` or `service/host@REALM`, exactly as the KDC authenticated
/// it: every part case-sensitive, nothing folded (see
/// `canopy_acl::Principal`).
pub fn canonical_principal(display: &str) -> Result<String, GssError> {
    let p = canopy_acl::principal::Principal::parse(display).map_err(|e| GssError::Name {
        name: display.to_string(),
        reason: e.to_string(),
    })?;
    match p.kind() {
        canopy_acl::principal::Kind::Kerberos => Ok(p.canonical()),
        _ => Err(GssError::Name {
            name: display.to_string(),
            reason: "not a kerberos principal; write name@REALM or service/host@REALM".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_refusal_is_recognised_on_the_other_side() {
        let busy = GssError::Busy("4 client exchanges are waiting".into());
        assert!(busy.is_busy());
        // What the initiator gets back: the acceptor's message as a reason.
        let seen = GssError::Refused {
            peer: "127.0.0.1:1".into(),
            reason: busy.to_string(),
        };
        assert!(seen.is_busy(), "{seen}");
        let other = GssError::Refused {
            peer: "127.0.0.1:1".into(),
            reason: "carol@R is not an expected peer principal".into(),
        };
        assert!(!other.is_busy());
    }
}
