//! The canopy broker, its launcher and its tools.
//!
//! * [`node`]: the broker's socket loop around `canopy_overlay`'s logic.
//! * [`bootstrap`]: `canopy broker`, bootstrapped through PMI-1.
//! * [`launcher`]: `canopy start`, a personal instance on this machine.
//! * [`tools`]: `canopy ping`, `overlay status`, `event pub|sub`.
#![forbid(unsafe_code)]

pub mod admission;
pub mod authz;
pub mod bootstrap;
pub mod core;
pub mod error;
pub mod gss;
pub mod launcher;
pub mod local;
pub mod node;
pub mod rotate;
pub mod sockets;
pub mod system;
pub mod tools;

pub use error::BrokerError;
