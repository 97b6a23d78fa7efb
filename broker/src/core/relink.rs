//! The core's side of key rotation: `key.switch`, `key.reload`,
//! `key.status`, and moving a parent-child link to a new connection
//! without losing a message (docs/protocol.md §3.6). The phases are
//! `crate::rotate`'s pure state machines; here they are driven, with
//! messages queued as `(Header, payload)`.

use super::keys::{
    relink_verdict, Held, KeyRing, KeyStatus, Phase, Rebind, RelinkVerdict, UpLink, DRAINED_TOPIC,
    REKEY_TOPIC, RELINK_TOPIC,
};
use super::{BrokerCore, Event, ParentState, Transmit, HEARTBEAT_TOPIC};
use canopy_overlay::hello::{Hello, HelloCheck, HELLO_TOPIC};
use canopy_overlay::liveness::Peer;
use canopy_proto::{errno, Header, MsgType, PROTOCOL_VERSION};
use canopy_security::{decode_public_key, z85};
use std::collections::HashMap;
use tracing::{debug, error, info, warn};

/// All rotation state of one core.
pub(super) struct Rotation<P> {
    /// This broker has certificate files (a system instance).
    pub has_files: bool,
    pub ring: KeyRing,
    pub up: UpLink<(Header, P)>,
    pub held: HashMap<u32, Held<(Header, P)>>,
    pub rebind: Option<Rebind>,
    /// Relinks made, for distinct routing ids.
    pub generation: u64,
    /// When the loop must come round soon (a relink is moving).
    pub busy_until: Option<u64>,
}

impl<P> Default for Rotation<P> {
    fn default() -> Self {
        Rotation {
            has_files: false,
            ring: KeyRing::default(),
            up: UpLink::default(),
            held: HashMap::new(),
            rebind: None,
            generation: 0,
            busy_until: None,
        }
    }
}

impl<P> Rotation<P> {
    pub fn busy(&self) -> bool {
        self.up.active() || self.rebind.is_some() || !self.held.is_empty()
    }

    /// While a link moves, the timers run every 10 ms.
    pub fn deadline(&self) -> Option<u64> {
        self.busy_until.filter(|_| self.busy())
    }
}

impl<P: AsRef<[u8]> + From<Vec<u8>>> BrokerCore<P> {
    /// This broker has certificate files: keys rotate (system instances).
    pub fn enable_key_files(&mut self) {
        self.rot.has_files = true;
    }

    fn relink_limit_ms(&self) -> u64 {
        self.timing.lost_ms.clamp(1000, 10_000)
    }

    pub(super) fn keys_reloaded(&mut self, req: Option<Header>, result: Result<KeyRing, String>) {
        let by = req
            .as_ref()
            .map(|h| h.userid.clone())
            .unwrap_or_else(|| "SIGHUP".into());
        let ring = match result {
            Ok(r) => r,
            Err(e) => {
                error!(by = %by, "rotate: key reload failed: {e}");
                if let Some(h) = req {
                    self.respond_err(&h, errno::EINVAL, &e);
                }
                return;
            }
        };
        let neighbours: Vec<u32> = self
            .topo
            .parent(self.rank)
            .into_iter()
            .chain(self.topo.children(self.rank))
            .collect();
        let with_next: Vec<String> = neighbours
            .iter()
            .filter(|r| ring.keys(**r).len() > 1)
            .map(u32::to_string)
            .collect();
        let children: Vec<u32> = self.topo.children(self.rank).collect();
        self.events
            .push_back(Event::AdmitPeers(ring.zap_entries(&children)));
        // The load at start comes the same way as a SIGHUP's; only a
        // reload is worth a warning.
        let first = self.rot.ring == KeyRing::default();
        self.rot.ring = ring;
        self.recheck_children();
        let msg = format!(
            "reloaded {} neighbour certificates; ranks with a next key: {}",
            neighbours.len(),
            if with_next.is_empty() {
                "none".to_string()
            } else {
                with_next.join(",")
            }
        );
        match &req {
            None if first => info!(
                "rotate: rank {}: {}",
                self.rank,
                msg.replacen("reloaded", "loaded", 1)
            ),
            None => warn!("rotate: SIGHUP: rank {}: {msg}", self.rank),
            Some(h) => warn!(
                "rotate: key reload by {}: rank {}: {msg}",
                h.userid, self.rank
            ),
        }
        if let Some(h) = req {
            self.respond(&h, P::from(msg.into_bytes()));
        }
    }

    /// `key.status`: the key in use and what is moving.
    pub(super) fn key_status(&mut self, h: Header) {
        let mut children_moving: Vec<u32> = self.rot.held.keys().copied().collect();
        if let Some(rb) = &self.rot.rebind {
            children_moving.extend(rb.waiting.iter().copied());
        }
        children_moving.sort_unstable();
        children_moving.dedup();
        let st = KeyStatus {
            rank: self.rank,
            public_key: self.info.public_key.clone(),
            parent_moving: self.rot.up.active(),
            children_moving,
            rebinding: self.rot.rebind.is_some(),
            admitted: self.rot.ring.z85_map(),
        };
        let body = serde_json::to_vec(&st).unwrap_or_default();
        self.respond(&h, P::from(body))
    }

    /// `key.switch` (admin): have the shell load the `.next` key.
    pub(super) fn key_switch(&mut self, h: Header) {
        if self.rot.up.active() || self.rot.rebind.is_some() {
            return self.respond_err(
                &h,
                errno::EAGAIN,
                "a key switch is already in progress on this broker; retry in a moment",
            );
        }
        if !self.rot.has_files {
            return self.respond_err(
                &h,
                errno::EINVAL,
                "this broker has no certificate files: keys rotate only in system instances (canopy broker --config)",
            );
        }
        self.events.push_back(Event::LoadNextKey { req: h });
    }

    /// The `.next` key is loaded: move the parent link to it, and have the
    /// children move to the new server key.
    pub(super) fn next_key(&mut self, h: Header, result: Result<[u8; 32], String>) {
        let key = match result {
            Ok(k) => k,
            Err(e) => {
                let msg = format!("rank {}: {e}", self.rank);
                error!(by = %h.userid, "rotate: switch refused: {msg}");
                return self.respond_err(&h, errno::EINVAL, &msg);
            }
        };
        let new_pub = z85::encode(&key);
        if new_pub == self.info.public_key {
            let msg = format!(
                "rank {} already uses key {new_pub}; run `canopy key retire` to finish",
                self.rank
            );
            return self.respond_err(&h, errno::EINVAL, &msg);
        }
        warn!(by = %h.userid, rank = self.rank, from = %self.info.public_key, to = %new_pub, "rotate: switching keys");
        let msg = format!("rank {}: switching to key {new_pub}", self.rank);
        self.respond(&h, P::from(msg.into_bytes()));
        self.events.push_back(Event::AdoptKey);
        if self.topo.children(self.rank).next().is_some() {
            let online: Vec<u32> = self.children.keys().copied().collect();
            self.rot.rebind = Some(Rebind::new(
                online.iter().copied(),
                self.now,
                self.relink_limit_ms(),
            ));
            for c in online {
                self.send_child(
                    c,
                    Header::control(REKEY_TOPIC),
                    P::from(new_pub.clone().into_bytes()),
                );
            }
        }
        self.info.public_key = new_pub;
        if self.parent_state == ParentState::Online {
            self.start_uplink();
        }
        self.rot.busy_until = Some(self.now + 10);
    }

    /// Ask the parent to hold our traffic; queue what goes up meanwhile.
    fn start_uplink(&mut self) {
        if self.rot.up.active() {
            return;
        }
        self.send_parent(Header::control(RELINK_TOPIC), P::from(Vec::new()));
        self.rot.up.start(self.now);
        self.rot.busy_until = Some(self.now + 10);
    }

    /// Control from the parent: `drained` or `rekey`. True if handled.
    pub(super) fn rotation_control(&mut self, h: &Header, payload: &[u8]) -> bool {
        match h.topic.as_str() {
            DRAINED_TOPIC => {
                self.up_drained();
                true
            }
            REKEY_TOPIC => {
                self.parent_rekey(payload);
                true
            }
            _ => false,
        }
    }

    /// The parent moves to a new server key: it must be one configured for
    /// it (current or `.next`); then relink to it.
    fn parent_rekey(&mut self, payload: &[u8]) {
        let Some(parent) = self.topo.parent(self.rank) else {
            return;
        };
        let key = std::str::from_utf8(payload)
            .ok()
            .and_then(|t| decode_public_key(t.trim()).ok());
        let Some(key) = key else {
            warn!(parent, "rotate: the parent sent a malformed rekey; ignored");
            return;
        };
        if !self.rot.ring.allows_key(parent, &key) {
            error!(
                parent,
                key = %z85::encode(&key),
                "rotate: the parent asks to move to a key that is not one of its configured keys; run `canopy key reload` after installing its .next certificate. Keeping the current link"
            );
            return;
        }
        info!(parent, key = %z85::encode(&key), "rotate: the parent moves to a new key; relinking");
        if let Some(card) = self.parent_card.as_mut() {
            card.public_key = key;
        }
        self.start_uplink();
    }

    /// `drained`: nothing more comes on the old connection. Connect anew
    /// and say hello with the same session.
    fn up_drained(&mut self) {
        if !self.rot.up.drained() {
            debug!("rotate: unexpected drained from the parent; ignored");
            return;
        }
        let Some(card) = self.parent_card.clone() else {
            return;
        };
        let Some(endpoint) = card.endpoint.clone() else {
            return;
        };
        self.rot.generation += 1;
        self.events.push_back(Event::ConnectParent {
            endpoint,
            server_key: card.public_key,
            identity: format!(
                "{}:{:016x}:{}",
                self.rank, self.session, self.rot.generation
            )
            .into_bytes(),
            relink: true,
        });
        self.send_hello(false);
    }

    /// Whether a message from the parent is the answer to a relink hello.
    pub(super) fn is_relink_answer(&self, h: &Header) -> bool {
        self.rot.up.phase == Some(Phase::Joining)
            && h.msg_type == MsgType::Response
            && h.topic == HELLO_TOPIC
            && h.route.is_empty()
    }

    /// The parent answered the relink hello.
    pub(super) fn up_joined(&mut self, h: &Header, payload: &[u8]) {
        let now = self.now;
        if h.errnum != 0 {
            let why = String::from_utf8_lossy(payload).into_owned();
            self.lose_parent(&format!("the parent refused the relink: {why}"));
            return;
        }
        let started = self.rot.up.started_ms;
        let queue = self.rot.up.joined();
        let n = queue.len();
        self.parent_peer = Some(Peer::new(now));
        for (h, p) in queue {
            self.transmits.push_back(Transmit::Parent(h, p));
        }
        info!("rotate: parent link re-established on a new connection in {} ms ({n} queued messages sent)", now.saturating_sub(started));
    }

    /// Control from a child: it asks to move its link. Mark the old
    /// connection drained (its last message) and hold the child's traffic.
    pub(super) fn child_relink(&mut self, rank: u32, rid: Vec<u8>) {
        self.send_rid(&rid, Header::control(DRAINED_TOPIC), P::from(Vec::new()));
        let now = self.now;
        if let Some(l) = self.children.get_mut(&rank) {
            l.peer = Peer::new(now);
        }
        if let Some(rb) = self.rot.rebind.as_mut() {
            rb.relinking(rank, rid.clone());
        }
        self.rot.held.insert(
            rank,
            Held {
                old_rid: rid,
                since_ms: now,
                queue: Vec::new(),
            },
        );
        self.rot.busy_until = Some(now + 10);
        info!(
            rank,
            "rotate: a child is moving to a new connection; holding its traffic"
        );
    }

    /// A hello on a new connection: if it continues a held child's session,
    /// move the link there. True if handled (accepted or refused).
    pub(super) fn relink_hello(
        &mut self,
        rid: &[u8],
        user_id: &str,
        h: &Header,
        payload: &[u8],
    ) -> bool {
        let Ok(hello) = Hello::decode(payload) else {
            return false;
        };
        let rank = hello.rank;
        let online = self.children.get(&rank).map(|c| c.session);
        let held = self.rot.held.contains_key(&rank);
        let admitted = self.hello_expected(rank, user_id).as_deref() == Some(user_id);
        let mut verdict = relink_verdict(held, online, hello.session, admitted);
        if verdict == RelinkVerdict::Accept {
            let check = HelloCheck {
                topo: &self.topo,
                my_rank: self.rank,
                my_version: PROTOCOL_VERSION,
                my_instance: &self.instance,
                authenticated: user_id,
                expected: Some(user_id),
                online_session: None,
            }
            .check(&hello);
            if let Err(e) = check {
                verdict = RelinkVerdict::Refuse(e.to_string());
            }
        }
        match verdict {
            RelinkVerdict::NotRelink => false,
            RelinkVerdict::Refuse(why) => {
                warn!(verdict = %"deny", rank, principal = %user_id, reason = %format!("relink: {why}"), "overlay: relink refused");
                let resp = h.response(self.rank, errno::EPERM);
                self.transmits.push_back(Transmit::Child(
                    rid.to_vec(),
                    resp,
                    P::from(why.into_bytes()),
                ));
                true
            }
            RelinkVerdict::Accept => {
                let Some(held) = self.rot.held.remove(&rank) else {
                    return false;
                };
                let now = self.now;
                if let Some(l) = self.children.get_mut(&rank) {
                    l.rid = rid.to_vec();
                    l.principal = user_id.to_string();
                    l.peer = Peer::new(now);
                }
                self.by_rid.remove(&held.old_rid);
                self.by_rid.insert(rid.to_vec(), rank);
                let resp = h.response(self.rank, 0);
                self.transmits
                    .push_back(Transmit::Child(rid.to_vec(), resp, P::from(Vec::new())));
                let n = held.queue.len();
                for (qh, qp) in held.queue {
                    self.transmits
                        .push_back(Transmit::Child(rid.to_vec(), qh, qp));
                }
                info!(
                    verdict = %"allow",
                    rank,
                    principal = %user_id,
                    ms = now.saturating_sub(held.since_ms),
                    held = n,
                    "overlay: child relinked"
                );
                true
            }
        }
    }

    /// Timers: relinks that take too long, and the ROUTER's rebind once
    /// every child has left the old listener.
    pub(super) fn rotation_tick(&mut self) {
        self.join_with_other_key();
        if !self.rot.busy() {
            return;
        }
        let now = self.now;
        self.rot.busy_until = Some(now + 10);
        let limit = self.relink_limit_ms();
        if self.rot.up.overdue(now, limit) {
            self.lose_parent("the parent did not complete the relink in time");
        }
        let stale: Vec<u32> = self
            .rot
            .held
            .iter()
            .filter(|(_, h)| now.saturating_sub(h.since_ms) > limit)
            .map(|(r, _)| *r)
            .collect();
        for r in stale {
            self.rot.held.remove(&r);
            self.lose_child(r, "it asked to relink and did not come back in time");
        }
        let Some(rb) = self.rot.rebind.as_mut() else {
            return;
        };
        // A heartbeat on each old connection: the shell reports the ones
        // that are gone (`ChildGone`), which leaves them out.
        let ready = rb.ready(now, |_| true);
        if !ready {
            for rid in rb.old_rids.clone() {
                self.transmits.push_back(Transmit::Child(
                    rid,
                    Header::control(HEARTBEAT_TOPIC),
                    P::from(Vec::new()),
                ));
            }
            return;
        }
        let rb = self.rot.rebind.take().expect("checked");
        if !rb.waiting.is_empty() {
            warn!(children = ?rb.waiting, "rotate: children did not relink in time; they rejoin with the new key");
        }
        info!("rotate: every child has left the old listener or timed out; rebinding");
        self.events.push_back(Event::Rebind {
            since_switch_ms: now.saturating_sub(rb.started_ms),
        });
    }

    /// Joining a parent that does not answer: during a rotation it may use
    /// either of its configured keys (say this broker restarted after the
    /// parent switched), so try the other one.
    fn join_with_other_key(&mut self) {
        if self.parent_state != ParentState::Joining
            || self.rejoin_at.is_some()
            || self.rot.up.active()
        {
            return;
        }
        let Some(parent) = self.topo.parent(self.rank) else {
            return;
        };
        let now = self.now;
        let since = self.parent_peer.as_ref().map_or(now, |p| p.last_heard_ms());
        let wait = (4 * self.timing.heartbeat_ms).clamp(500, 5000);
        let Some(card) = self.parent_card.as_mut() else {
            return;
        };
        let Some(key) = super::keys::other_key(
            self.rot.ring.keys(parent),
            &card.public_key,
            now - since,
            wait,
        ) else {
            return;
        };
        card.public_key = key;
        info!(parent, ms = now - since, key = %z85::encode(&key), "rotate: the parent has not answered; trying its other configured key");
        self.connect_parent();
    }
}
