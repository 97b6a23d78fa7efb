//! Configuration of a Canopy **system instance**: one broker per node,
//! bootstrapped from TOML the way flux-core bootstraps from its
//! `[bootstrap]` table (see `flux-config-bootstrap(5)` and
//! `docs/config.md`).
//!
//! ```toml
//! [bootstrap]
//! default_port = 8050
//! default_bind = "tcp://eth0:%p"
//! default_connect = "tcp://%h:%p"
//! curve_cert = "/etc/canopy/curve/%h.key_secret"
//! curve_public_certs = "/etc/canopy/curve/public"
//! hosts = [ { host = "node[0-127]" } ]
//! ```
//!
//! * [`Config::load`] reads a file, or every `*.toml` of a directory in
//!   lexical order, merging tables (a key set in two files is an error),
//!   and refuses files or a directory that group or others can write, or
//!   that are not trusted for the broker's user (owned by root or that
//!   user, on a path nobody else can change: `canopy_security::trust`).
//! * Every error names the file, the line and column, and the key, e.g.
//!   `/etc/canopy/system/hosts.toml:7:12: bootstrap.hosts[2].parent: ...`.
//! * Resolution is pure: [`Config::rank_of`], [`Config::topology`],
//!   [`Config::bind_endpoint`], [`Config::connect_endpoint`],
//!   [`Config::cert_path`], [`Config::public_cert_path`] and
//!   [`Config::fingerprint`], which brokers compare at hello so that a node
//!   with a different host list is refused.
//!
//! The crate does no network I/O; it reads only the configuration files.
#![forbid(unsafe_code)]

pub mod budgets;
mod config;
mod error;
pub mod fuzz;
pub mod hostlist;
mod raw;
mod template;
mod tree;

pub use budgets::{parse_size, BudgetKey, BudgetSettings};
pub use config::{
    Bootstrap, ClientsConfig, Config, GssapiConfig, HostEntry, Mechanism, PolicyConfig,
    PublicCerts, Timing, DEFAULT_BIND, DEFAULT_CONNECT, DEFAULT_PORT,
};
pub use error::{ConfigError, Location};
pub use hostlist::HostlistError;
pub use template::substitute_host_rank;
pub use tree::Tree;
