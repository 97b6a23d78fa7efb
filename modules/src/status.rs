use crate::{BrokerInfo, Ctx, Module, Reply};
use canopy_overlay::health::{RankState, SubtreeHealth};
use canopy_proto::Header;
use serde::{Deserialize, Serialize};

/// `overlay.status`: this broker's view of its subtree.
pub struct OverlayStatus;

/// The JSON body of an `overlay.status` response.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StatusReport {
    pub rank: u32,
    pub size: u32,
    pub fanout: u32,
    /// Health of the subtree rooted at `rank`.
    pub health: SubtreeHealth,
    /// How many ranks of the subtree are online.
    pub online: usize,
    pub broker: BrokerInfoView,
    /// Every rank of the subtree, breadth first.
    pub ranks: Vec<RankStatus>,
}

/// The public parts of [`BrokerInfo`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BrokerInfoView {
    pub instance: String,
    pub endpoint: Option<String>,
    pub public_key: String,
    #[serde(default)]
    pub client_endpoint: Option<String>,
    pub pid: u32,
}

impl From<&BrokerInfo> for BrokerInfoView {
    fn from(i: &BrokerInfo) -> Self {
        BrokerInfoView {
            instance: i.instance.clone(),
            endpoint: i.endpoint.clone(),
            public_key: i.public_key.clone(),
            client_endpoint: i.client_endpoint.clone(),
            pid: i.pid,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RankStatus {
    pub rank: u32,
    pub parent: Option<u32>,
    pub state: RankState,
    pub health: SubtreeHealth,
    /// Seconds in the current state.
    pub duration_s: f64,
    pub reason: String,
    /// Events this rank missed (gaps in the event sequence) so far.
    #[serde(default)]
    pub missed_events: u64,
}

impl Module for OverlayStatus {
    fn methods(&self) -> &'static [&'static str] {
        &["overlay.status"]
    }

    fn handle(&mut self, ctx: &Ctx<'_>, _h: &Header, payload: &[u8]) -> Reply {
        // `{"summary":true}` leaves out the per-rank list (cheap polling).
        let summary = serde_json::from_slice::<serde_json::Value>(payload)
            .ok()
            .and_then(|v| v.get("summary").and_then(|s| s.as_bool()))
            .unwrap_or(false);
        let ranks = if summary {
            Vec::new()
        } else {
            ctx.topo
                .subtree(ctx.rank)
                .into_iter()
                .filter_map(|r| {
                    let e = ctx.health.get(r)?;
                    Some(RankStatus {
                        rank: r,
                        parent: ctx.topo.parent(r),
                        state: e.state,
                        health: ctx.health.subtree_health(r),
                        duration_s: ctx.now_ms.saturating_sub(e.since_ms) as f64 / 1000.0,
                        reason: e.reason.clone(),
                        missed_events: e.missed_events,
                    })
                })
                .collect()
        };
        let report = StatusReport {
            rank: ctx.rank,
            size: ctx.topo.size(),
            fanout: ctx.topo.fanout(),
            health: ctx.health.subtree_health(ctx.rank),
            online: ctx.health.online_count(),
            broker: ctx.info.into(),
            ranks,
        };
        match serde_json::to_vec(&report) {
            Ok(b) => Reply::Ok(b),
            Err(e) => Reply::Err(
                canopy_proto::errno::EPROTO,
                format!("cannot encode status: {e}"),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use canopy_overlay::{health::Health, Topology};

    #[test]
    fn reports_subtree() {
        let topo = Topology::new(8, 2).unwrap();
        let mut health = Health::new(topo, 1, 0);
        health.set(3, RankState::Online, "hello", 500);
        let info = BrokerInfo {
            instance: "i".into(),
            public_key: "k".into(),
            ..Default::default()
        };
        let ctx = Ctx {
            rank: 1,
            topo: &topo,
            health: &health,
            now_ms: 2500,
            info: &info,
        };
        let h = Header::request("overlay.status", 1, 1);
        let Reply::Ok(body) = OverlayStatus.handle(&ctx, &h, b"") else {
            panic!("expected a report");
        };
        let r: StatusReport = serde_json::from_slice(&body).unwrap();
        assert_eq!(r.rank, 1);
        assert_eq!(r.health, SubtreeHealth::Partial);
        assert_eq!(
            r.ranks.iter().map(|x| x.rank).collect::<Vec<_>>(),
            vec![1, 3, 4, 7]
        );
        assert_eq!(r.ranks[1].state, RankState::Online);
        assert_eq!(r.ranks[1].duration_s, 2.0);
        assert_eq!(r.ranks[2].state, RankState::Offline);
        assert_eq!(r.ranks[0].parent, Some(0));
    }
}
