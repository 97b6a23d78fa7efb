//! Canopy's ZAP handler (ZeroMQ RFC 27).
//!
//! libzmq asks a ZAP handler, bound at `inproc://zeromq.zap.01` in the same
//! Context, whether each peer that completes a CURVE (or GSSAPI) handshake
//! with a server socket that has a `zap_domain` may connect. This crate
//! provides that handler: [`ZapHandler::start`] binds it and serves it on a
//! thread, asking a [`Policy`] (usually a [`KeySetPolicy`]) for each peer.
//! An admitted peer's messages carry the property `User-Id` (its canonical
//! principal, e.g. `curve:<Z85 public key>`) and `Roles` (e.g. `peer,user`),
//! readable with `zmq::Message::gets`.
//!
//! # libzmq fails open: check `alive()`
//!
//! **If no handler is bound at `inproc://zeromq.zap.01`, libzmq admits
//! every peer** that completes the handshake, with no `User-Id`. So:
//!
//! 1. call [`ZapHandler::start`] before any server socket binds, on the same
//!    Context, and abort if it fails;
//! 2. check [`ZapHandle::alive`] regularly (e.g. on every poll wake-up) and
//!    treat `false` as fatal: stop accepting peers and shut down;
//! 3. on every message, also check that `User-Id` is present and authorized
//!    (defence in depth);
//! 4. keep the [`ZapHandle`] alive as long as the server sockets; at
//!    shutdown stop it (or drop it) before dropping the Context.
//!
//! If a policy panics, the handler keeps its socket bound and answers every
//! later request with 500 (so nobody gets in), and `alive()` turns false.
//! If the thread ends for any other reason, the drop guard clears `alive()`.
//!
//! # Logging
//!
//! One line per verdict through `tracing` (info for allow, warn for deny),
//! with the fields `verdict`, `principal`, `address`, `mechanism`, `reason`
//! and `domain`. CURVE public keys and GSSAPI names are logged; secret keys
//! are never seen, and PLAIN passwords are never logged.
//!
//! # What the REP socket receives
//!
//! See [`codec`]: with libzmq 4.3.4 the handler's REP socket receives
//! `["1.0", "1", domain, address, identity, mechanism, credentials...]`;
//! the envelope and empty delimiter are stripped by REP.
//!
//! ```no_run
//! use std::sync::Arc;
//! use canopy_proto::Roles;
//! use canopy_zap::{codec::curve_principal, KeySetPolicy, ZapHandler};
//!
//! let ctx = zmq::Context::new();
//! let keys = Arc::new(KeySetPolicy::new());
//! let client = zmq::CurveKeyPair::new().unwrap();
//! keys.insert(curve_principal(&client.public_key).unwrap(), "node1", Roles::PEER);
//! let zap = ZapHandler::start(&ctx, keys.clone()).unwrap(); // before any bind
//! let server = ctx.socket(zmq::ROUTER).unwrap();
//! server.set_zap_domain("canopy").unwrap();
//! // ... set_curve_server, keys, bind, then in the loop:
//! assert!(zap.alive(), "zap handler died: refusing to continue");
//! ```
#![forbid(unsafe_code)]

pub mod codec;
pub mod fuzz;
mod handler;
mod policy;

pub use codec::{Mechanism, ZapReply, ZapRequest, SCOPE_PROPERTY};
pub use handler::{ZapHandle, ZapHandler, ZapStats, ZapWatch, ZAP_ENDPOINT};
pub use policy::{AuthRequest, Decision, KeyEntry, KeySetPolicy, Policy};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum ZapError {
    /// A ZAP request that cannot be parsed. `status_code` is what to reply
    /// (400 for a wrong version, 500 otherwise); `request_id` is set when
    /// one could be extracted.
    #[error(
        "malformed zap request: {reason}; only libzmq should send to \
         inproc://zeromq.zap.01, so look for code that connects there"
    )]
    BadRequest {
        status_code: u16,
        request_id: Option<Vec<u8>>,
        reason: String,
    },
    #[error(
        "invalid zap metadata: {0}; use names of 1-255 characters from \
         [A-Za-z0-9-_.+] and values under 4 GiB"
    )]
    Metadata(String),
    #[error(
        "could not bind the zap handler at {endpoint}: {source}; start exactly \
         one zap handler per zmq context, before any server socket binds"
    )]
    Bind {
        endpoint: &'static str,
        source: zmq::Error,
    },
    #[error("could not {op}: {source}; check that the zmq context is not shutting down")]
    Socket {
        op: &'static str,
        source: zmq::Error,
    },
    #[error("could not start the zap handler thread: {0}; check the process thread limit")]
    Spawn(std::io::Error),
    #[error(
        "libzmq was built without curve; install libzmq3-dev and link the system \
         libzmq (see .cargo/config.toml)"
    )]
    NoCurve,
}

/// Fail unless the linked libzmq supports CURVE.
pub fn require_curve() -> Result<(), ZapError> {
    if zmq::has("curve") == Some(true) {
        Ok(())
    } else {
        Err(ZapError::NoCurve)
    }
}
