//! The canopy broker, its launcher and its tools.
//!
//! * [`node`]: the broker's socket loop around `canopy_overlay`'s logic.
//! * [`boot`]: the one bootstrap interface; [`bootstrap`] (PMI) and
//!   [`system`] (a config file) implement it.
//! * [`allocation`]: `canopy start` under a launcher (srun, mpiexec).
//! * [`launcher`]: `canopy start`, a personal instance on this machine.
//! * [`tools`]: `canopy ping`, `overlay status`, `event pub|sub`.
#![forbid(unsafe_code)]

pub mod admission;
pub mod allocation;
pub mod authz;
pub mod boot;
pub mod bootstrap;
pub mod core;
pub mod error;
pub mod exec;
pub mod exec_cli;
pub mod gss;
pub mod hostcheck;
pub mod iface;
mod ingress;
pub mod launcher;
pub mod local;
pub mod node;
mod rekey;
pub mod rotate;
pub mod sockets;
pub mod system;
pub mod tools;

pub use error::BrokerError;
