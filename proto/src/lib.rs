//! Canopy's wire format.
//!
//! Every Canopy message is two parts: a small binary **header** and an opaque
//! **payload**. On the overlay (ZeroMQ) they travel as two frames; on the
//! local UNIX-socket connector they are framed by [`frame`]. Brokers decode
//! and re-encode only the header when they route; the payload is moved, never
//! parsed or copied. The exact byte layout is in `docs/protocol.md`.
//!
//! This crate does no I/O, so every codec path is tested deterministically.
#![forbid(unsafe_code)]

pub mod errno;
pub mod exec;
pub mod frame;
pub mod fuzz;
pub mod grant;
mod header;
mod roles;

pub use grant::Grant;
pub use header::{
    decode_header, Header, Hop, MsgType, ProtoError, FLAG_DIRECT, FLAG_MORE, FLAG_NORESPONSE,
};
pub use roles::{RoleParseError, Roles};

/// Protocol version carried in every header and in the hello handshake.
pub const PROTOCOL_VERSION: u8 = 1;
/// First byte of every header: guards against stray or foreign traffic.
pub const MAGIC: u8 = 0xCA;
/// `nodeid` meaning "the nearest broker that offers the service, searching upstream".
pub const NODEID_ANY: u32 = u32::MAX;
/// Largest number of hops a route stack may hold. A 1024-broker binary
/// tree is 10 deep; this leaves room for clients at both ends.
pub const MAX_ROUTE: usize = 64;
/// Largest topic, in bytes.
pub const MAX_TOPIC: usize = 255;
/// Largest user id (principal), in bytes.
pub const MAX_USERID: usize = 1024;
