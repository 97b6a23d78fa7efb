//! The overlay's protocol and state logic, with no I/O.
//!
//! Everything a broker decides about the tree lives here: who is whose
//! parent ([`topology`]), where a message goes next ([`route`]), whether a
//! joining child is acceptable ([`hello`]), how healthy each subtree is
//! ([`health`]) and whether events arrived in order ([`events`]). The broker
//! crate wraps these in sockets; this crate is tested deterministically.
#![forbid(unsafe_code)]

pub mod events;
pub mod health;
pub mod hello;
pub mod liveness;
pub mod pending;
pub mod route;
pub mod topology;

pub use topology::Topology;
