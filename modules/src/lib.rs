//! Services hosted by the broker.
//!
//! A module registers methods by full topic (`broker.ping`). The role each
//! method needs is declared in the broker's one service table
//! (`canopy_broker::core::services::SERVICES`), which the broker checks
//! before the module sees the request, and calls [`Module::handle`] on its own thread: there is no
//! thread hop between the routing loop and a module.
#![forbid(unsafe_code)]

mod ping;
mod status;

pub use ping::Ping;
pub use status::{OverlayStatus, RankStatus, StatusReport};

use canopy_overlay::{health::Health, Topology};
use canopy_proto::Header;

/// What a module can see of its broker.
pub struct Ctx<'a> {
    pub rank: u32,
    pub topo: &'a Topology,
    pub health: &'a Health,
    /// Milliseconds on the broker's monotonic clock.
    pub now_ms: u64,
    /// Static facts about this broker (endpoint, public key, instance).
    pub info: &'a BrokerInfo,
}

/// Facts about a broker that do not change while it runs.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct BrokerInfo {
    pub instance: String,
    /// The endpoint this broker's children connect to, if it has any.
    pub endpoint: Option<String>,
    /// This broker's CURVE public key (Z85). Public, not secret.
    pub public_key: String,
    /// The remote client endpoint (CURVE, same public key), if any.
    pub client_endpoint: Option<String>,
    /// The local connector's socket path.
    pub local_uri: String,
    pub pid: u32,
}

/// A module's answer.
pub enum Reply {
    /// Respond with this payload.
    Ok(Vec<u8>),
    /// Respond with the request's own payload, untouched (no copy).
    Echo,
    /// Respond with an error number and a message saying what to do.
    Err(u32, String),
}

pub trait Module {
    /// The methods this module offers (their roles are in the broker's
    /// service table).
    fn methods(&self) -> &'static [&'static str];
    /// Handle one request for one of [`Module::methods`].
    fn handle(&mut self, ctx: &Ctx<'_>, header: &Header, payload: &[u8]) -> Reply;
}

/// The broker's set of modules, looked up by method name.
#[derive(Default)]
pub struct Registry {
    modules: Vec<Box<dyn Module>>,
    methods: std::collections::HashMap<&'static str, usize>,
}

/// Why a method could not be registered.
#[derive(Debug, PartialEq, Eq)]
pub struct DuplicateMethod(pub &'static str);

impl Registry {
    /// The standard set: `broker.ping` and `overlay.status`.
    pub fn standard() -> Registry {
        let mut r = Registry::default();
        r.register(Box::new(Ping))
            .expect("standard modules are distinct");
        r.register(Box::new(OverlayStatus))
            .expect("standard modules are distinct");
        r
    }

    pub fn register(&mut self, m: Box<dyn Module>) -> Result<(), DuplicateMethod> {
        let idx = self.modules.len();
        for name in m.methods() {
            if self.methods.contains_key(name) {
                return Err(DuplicateMethod(name));
            }
            self.methods.insert(name, idx);
        }
        self.modules.push(m);
        Ok(())
    }

    /// Whether `method` is offered here.
    pub fn offers(&self, method: &str) -> bool {
        self.methods.contains_key(method)
    }

    /// Dispatch. The caller has already checked the method's role.
    pub fn handle(&mut self, ctx: &Ctx<'_>, header: &Header, payload: &[u8]) -> Option<Reply> {
        let idx = *self.methods.get(header.topic.as_str())?;
        Some(self.modules[idx].handle(ctx, header, payload))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_lookup_and_duplicates() {
        let mut r = Registry::standard();
        assert!(r.offers("broker.ping"));
        assert!(r.offers("overlay.status"));
        assert!(!r.offers("nope"));
        assert_eq!(
            r.register(Box::new(Ping)).unwrap_err(),
            DuplicateMethod("broker.ping")
        );
    }
}
