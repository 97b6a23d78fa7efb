use crate::{Ctx, Module, Reply};
use canopy_proto::Header;

/// `broker.ping`: echoes the payload back.
pub struct Ping;

impl Module for Ping {
    fn methods(&self) -> &'static [&'static str] {
        &["broker.ping"]
    }

    fn handle(&mut self, _ctx: &Ctx<'_>, _h: &Header, _payload: &[u8]) -> Reply {
        Reply::Echo
    }
}
