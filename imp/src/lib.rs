//! `canopy-imp`: the privilege-separated helper that runs `canopy exec`
//! commands as the requesting user in a system instance (issue 14).
//!
//! The broker stays unprivileged and only relays. This crate verifies a
//! user-signed, scoped request and the user's certificate ([`verify`]),
//! runs the command as that user ([`run`]), and signs a receipt
//! ([`receipt`]). It has no network code. docs/imp.md gives the formats,
//! the order of the checks and the threat model.

#![forbid(unsafe_code)]

pub mod cert;
pub mod config;
pub mod envelope;
pub mod frame;
pub mod fuzz;
pub mod keys;
pub mod receipt;
pub mod replay;
pub mod request;
pub mod run;
pub mod userkeys;
pub mod verify;

#[cfg(test)]
mod verify_tests;
