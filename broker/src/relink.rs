//! The broker's side of key rotation (a child module of `node`, so that it
//! can reach the broker's sockets): `key.reload`, `key.switch`, and moving
//! a parent-child link to a new connection without losing a message. The
//! decisions are in `crate::rotate`; this file only does the I/O.

use super::*;
use crate::rotate::{
    relink_verdict, Held, KeyFiles, KeyRing, Rebind, RelinkVerdict, DRAINED_TOPIC, REKEY_TOPIC,
    RELINK_TOPIC,
};
use canopy_security::{decode_public_key, z85};

static RELINK_GEN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl Broker {
    /// Enable rotation (system instances): where the certificates are.
    /// Loads the neighbours' keys, current and next, and admits them.
    pub fn with_key_files(mut self, files: KeyFiles) -> Result<Broker, BrokerError> {
        let ring = files
            .load_ring()
            .map_err(|e| BrokerError::Config(e.to_string()))?;
        self.rot.files = Some(files);
        self.apply_ring(ring);
        Ok(self)
    }

    fn apply_ring(&mut self, ring: KeyRing) {
        let children: Vec<u32> = self.topo.children(self.rank).collect();
        let entries = ring.zap_entries(&children);
        self._policy
            .peers
            .replace_all(entries.into_iter().map(|(p, n)| (p, n, Roles::PEER)));
        self.rot.ring = ring;
    }

    /// The principal the hello check expects for `rank` given who
    /// authenticated: from the key ring when there is one.
    pub(super) fn hello_expected(&self, rank: u32, user_id: &str) -> Option<String> {
        if self.rot.ring.is_empty() {
            self.expected.get(&rank).cloned()
        } else {
            self.rot.ring.expected(rank, user_id)
        }
    }

    /// Re-read the neighbours' public certificates (current and `.next`).
    pub(super) fn reload_keys(&mut self) -> Result<String, String> {
        let Some(files) = &self.rot.files else {
            return Err("this broker has no certificate files to reload: keys rotate only in system instances (canopy broker --config)".into());
        };
        let ring = files
            .load_ring()
            .map_err(|e| format!("{e}; the previous keys stay in force"))?;
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
        self.apply_ring(ring);
        Ok(format!(
            "rank {}: reloaded {} neighbour certificates; ranks with a next key: {}",
            self.rank,
            neighbours.len(),
            if with_next.is_empty() {
                "none".to_string()
            } else {
                with_next.join(",")
            }
        ))
    }

    pub(super) fn key_reload_rpc(&mut self, h: Header) {
        match self.reload_keys() {
            Ok(msg) => {
                warn!("rotate: key reload by {}: {msg}", h.userid);
                self.respond(&h, Payload::Bytes(msg.into_bytes()))
            }
            Err(e) => {
                error!("rotate: key reload by {} failed: {e}", h.userid);
                self.respond_err(&h, errno::EINVAL, &e)
            }
        }
    }

    /// `key.status`: the key in use and what is moving.
    pub(super) fn key_status_rpc(&mut self, h: Header) {
        let mut children_moving: Vec<u32> = self.rot.held.keys().copied().collect();
        if let Some(rb) = &self.rot.rebind {
            children_moving.extend(rb.waiting.iter().copied());
        }
        children_moving.sort_unstable();
        children_moving.dedup();
        let st = crate::rotate::KeyStatus {
            rank: self.rank,
            public_key: self.keys.public_z85(),
            parent_moving: self.rot.up.active(),
            children_moving,
            rebinding: self.rot.rebind.is_some(),
            admitted: self.rot.ring.z85_map(),
        };
        let body = serde_json::to_vec(&st).unwrap_or_default();
        self.respond(&h, Payload::Bytes(body))
    }

    fn relink_limit_ms(&self) -> u64 {
        self.timing.lost_ms.clamp(1000, 10_000)
    }

    /// `key.switch` (admin): load the `.next` secret, move the parent link
    /// to it, and have the children move to the new server key.
    pub(super) fn key_switch(&mut self, h: Header) {
        if self.rot.up.active() || self.rot.rebind.is_some() {
            return self.respond_err(
                &h,
                errno::EAGAIN,
                "a key switch is already in progress on this broker; retry in a moment",
            );
        }
        let Some(files) = &self.rot.files else {
            return self.respond_err(
                &h,
                errno::EINVAL,
                "this broker has no certificate files: keys rotate only in system instances (canopy broker --config)",
            );
        };
        let kp = match files.load_next() {
            Ok(kp) => kp,
            Err(e) => {
                let msg = format!("rank {}: {e}", self.rank);
                error!("rotate: switch by {} refused: {msg}", h.userid);
                return self.respond_err(&h, errno::EINVAL, &msg);
            }
        };
        if kp.public() == self.keys.public() {
            let msg = format!(
                "rank {} already uses key {}; run `canopy key retire` to finish",
                self.rank,
                kp.public_z85()
            );
            return self.respond_err(&h, errno::EINVAL, &msg);
        }
        let now = self.now_ms();
        let new_pub = kp.public_z85();
        warn!(
            "rotate: switch by {}: rank {} moves from key {} to {}",
            h.userid,
            self.rank,
            self.keys.public_z85(),
            new_pub
        );
        let msg = format!("rank {}: switching to key {new_pub}", self.rank);
        self.respond(&h, Payload::Bytes(msg.into_bytes()));

        if self.router.is_some() {
            let online: Vec<u32> = self.children.keys().copied().collect();
            self.rot.rebind = Some(Rebind::new(
                online.iter().copied(),
                now,
                self.relink_limit_ms(),
            ));
            self.rot.pending_server = Some(CurveKeypair::from_secret(zeroize::Zeroizing::new(
                *kp.secret(),
            )));
            for c in online {
                self.send_child(
                    c,
                    &Header::control(REKEY_TOPIC),
                    Payload::Bytes(new_pub.clone().into_bytes()),
                );
            }
        }
        self.keys = kp;
        self.info.public_key = new_pub;
        if self.parent_state == ParentState::Online && self.dealer.is_some() {
            self.start_uplink();
        }
    }

    /// Ask the parent to hold our traffic; queue what goes up meanwhile.
    fn start_uplink(&mut self) {
        let now = self.now_ms();
        if self.rot.up.active() {
            return;
        }
        match self.send_parent(&Header::control(RELINK_TOPIC), Payload::Bytes(Vec::new())) {
            Ok(()) => {
                self.rot.up.start(now);
            }
            Err(e) => self.lose_parent(&format!("cannot ask the parent to relink: {e}")),
        }
    }

    /// While relinking upward, sends are queued. True if `h` was taken.
    pub(super) fn queue_up(&mut self, h: &Header, payload: Payload) -> Option<Payload> {
        if !self.rot.up.active() {
            return Some(payload);
        }
        if h.topic == HEARTBEAT_TOPIC && h.msg_type == MsgType::Control {
            return None;
        }
        let mut hdr = Vec::new();
        if h.encode_into(&mut hdr).is_ok() {
            self.rot.up.queue.push((hdr, payload.into_msg()));
        }
        None
    }

    /// A send to a child whose link is moving is queued. Returns the
    /// payload back if the child is not held.
    pub(super) fn queue_down(
        &mut self,
        rid: &[u8],
        h: &Header,
        payload: Payload,
    ) -> Option<Payload> {
        let Some(held) = self.rot.held_rid(rid) else {
            return Some(payload);
        };
        if h.topic == HEARTBEAT_TOPIC && h.msg_type == MsgType::Control {
            return None;
        }
        let mut hdr = Vec::new();
        if h.encode_into(&mut hdr).is_ok() {
            held.queue.push((hdr, payload.into_msg()));
        }
        None
    }

    /// Control from the parent: `drained` or `rekey`. True if handled.
    pub(super) fn rotation_control(
        &mut self,
        h: &Header,
        payload: &Payload,
    ) -> Result<bool, BrokerError> {
        match h.topic.as_str() {
            DRAINED_TOPIC => {
                self.up_drained()?;
                Ok(true)
            }
            REKEY_TOPIC => {
                self.parent_rekey(payload.as_slice());
                Ok(true)
            }
            _ => Ok(false),
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
            warn!("rotate: parent rank {parent} sent a malformed rekey; ignored");
            return;
        };
        if !self.rot.ring.allows_key(parent, &key) {
            error!(
                "rotate: parent rank {parent} asks to move to key {}, which is not one of its configured keys; run `canopy key reload` after installing its .next certificate. Keeping the current link",
                z85::encode(&key)
            );
            return;
        }
        info!(
            "rotate: parent rank {parent} moves to key {}; relinking",
            z85::encode(&key)
        );
        if let Some(card) = self.parent_card.as_mut() {
            card.public_key = key;
        }
        self.start_uplink();
    }

    /// `drained`: nothing more comes on the old connection. Close it and
    /// say hello, with the same session, on a new one with the current keys.
    fn up_drained(&mut self) -> Result<(), BrokerError> {
        if !self.rot.up.drained() {
            debug!("rotate: unexpected drained from the parent; ignored");
            return Ok(());
        }
        let Some(card) = self.parent_card.clone() else {
            return Ok(());
        };
        let Some(ep) = card.endpoint.clone() else {
            return Ok(());
        };
        self.dealer = None;
        self.dealer_monitor = None;
        let s = self
            ._ctx
            .socket(zmq::DEALER)
            .map_err(zerr("create dealer"))?;
        s.set_linger(0).map_err(zerr("set linger"))?;
        s.set_sndhwm(0).map_err(zerr("set sndhwm"))?;
        s.set_rcvhwm(0).map_err(zerr("set rcvhwm"))?;
        // The new connection may first meet the parent's old listener
        // (rebinding with a new key): retry soon, backing off to 1 s.
        s.set_reconnect_ivl(5).map_err(zerr("set reconnect_ivl"))?;
        s.set_reconnect_ivl_max(1000)
            .map_err(zerr("set reconnect_ivl_max"))?;
        let gen = RELINK_GEN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let rid = format!("{}:{:016x}:{gen}", self.rank, self.session).into_bytes();
        s.set_identity(&rid).map_err(zerr("set identity"))?;
        s.set_curve_serverkey(&card.public_key)
            .map_err(zerr("set curve server key"))?;
        s.set_curve_publickey(self.keys.public())
            .map_err(zerr("set curve public key"))?;
        s.set_curve_secretkey(self.keys.secret())
            .map_err(zerr("set curve secret key"))?;
        s.connect(&ep).map_err(|e| BrokerError::Bind {
            endpoint: ep.clone(),
            reason: format!("connect: {}", e.message()),
        })?;
        self.dealer_monitor = Some(disconnect_monitor(&self._ctx, &s)?);
        let hello = Hello {
            rank: self.rank,
            version: PROTOCOL_VERSION,
            session: self.session,
            instance: self.instance.clone(),
            last_event: None,
        };
        let parent = self.topo.parent(self.rank).unwrap_or(0);
        let mut hdr = Vec::new();
        Header::request(HELLO_TOPIC, parent, 0)
            .encode_into(&mut hdr)
            .map_err(|e| BrokerError::Bootstrap(e.to_string()))?;
        s.send(&hdr[..], zmq::SNDMORE | zmq::DONTWAIT)
            .and_then(|()| s.send(hello.encode(), zmq::DONTWAIT))
            .map_err(zerr("send hello to the parent"))?;
        self.dealer = Some(s);
        Ok(())
    }

    /// Whether a message from the parent is the answer to a relink hello.
    pub(super) fn is_relink_answer(&self, h: &Header) -> bool {
        self.rot.up.phase == Some(crate::rotate::Phase::Joining)
            && h.msg_type == MsgType::Response
            && h.topic == HELLO_TOPIC
            && h.route.is_empty()
    }

    /// The parent answered the relink hello.
    pub(super) fn up_joined(&mut self, h: &Header, payload: &Payload) {
        let now = self.now_ms();
        if h.errnum != 0 {
            let why = String::from_utf8_lossy(payload.as_slice()).into_owned();
            self.lose_parent(&format!("the parent refused the relink: {why}"));
            return;
        }
        let started = self.rot.up.started_ms;
        let queue = self.rot.up.joined();
        let n = queue.len();
        self.parent_peer = Some(Peer::new(now));
        if let Some(d) = &self.dealer {
            for (hdr, msg) in queue {
                if let Err(e) = d
                    .send(&hdr[..], zmq::SNDMORE | zmq::DONTWAIT)
                    .and_then(|()| d.send(msg, zmq::DONTWAIT))
                {
                    warn!("rotate: cannot send a queued message to the parent: {e}");
                }
            }
        }
        info!(
            "rotate: parent link re-established on a new connection in {} ms ({n} queued messages sent)",
            now.saturating_sub(started)
        );
    }

    /// Control from a child: it asks to move its link. Mark the old
    /// connection drained (its last message) and hold the child's traffic.
    pub(super) fn child_relink(&mut self, rank: u32, rid: Vec<u8>) {
        self.send_router_rid(
            &rid,
            &Header::control(DRAINED_TOPIC),
            Payload::Bytes(Vec::new()),
        );
        let now = self.now_ms();
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
        info!("rotate: rank {rank} is moving to a new connection; holding its traffic");
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
                warn!("overlay: verdict=deny rank={rank} principal={user_id} mechanism=CURVE reason=\"relink: {why}\"");
                let resp = h.response(self.rank, errno::EPERM);
                self.send_router_rid(rid, &resp, Payload::Bytes(why.into_bytes()));
                true
            }
            RelinkVerdict::Accept => {
                let Some(held) = self.rot.held.remove(&rank) else {
                    return false;
                };
                let now = self.now_ms();
                if let Some(l) = self.children.get_mut(&rank) {
                    l.rid = rid.to_vec();
                    l.principal = user_id.to_string();
                    l.peer = Peer::new(now);
                }
                self.by_rid.remove(&held.old_rid);
                self.by_rid.insert(rid.to_vec(), rank);
                let resp = h.response(self.rank, 0);
                self.send_router_rid(rid, &resp, Payload::Bytes(Vec::new()));
                let n = held.queue.len();
                if let Some(router) = &self.router {
                    for (hdr, msg) in held.queue {
                        if let Err(e) = router
                            .send(rid, zmq::SNDMORE | zmq::DONTWAIT)
                            .and_then(|()| router.send(&hdr[..], zmq::SNDMORE | zmq::DONTWAIT))
                            .and_then(|()| router.send(msg, zmq::DONTWAIT))
                        {
                            warn!("rotate: cannot send a held message to rank {rank}: {e}");
                        }
                    }
                }
                info!(
                    "overlay: verdict=allow rank={rank} principal={user_id} mechanism=CURVE reason=\"relinked after {} ms, {n} held messages sent\"",
                    now.saturating_sub(held.since_ms)
                );
                true
            }
        }
    }

    /// Whether rotation needs the loop to come round soon.
    pub(super) fn rotation_busy(&self) -> bool {
        self.rot.up.active() || self.rot.rebind.is_some() || !self.rot.held.is_empty()
    }

    /// Timers: relinks that take too long, and the ROUTER's rebind once
    /// every child has left the old listener.
    pub(super) fn rotation_tick(&mut self) -> Result<(), BrokerError> {
        self.join_with_other_key()?;
        if !self.rotation_busy() {
            return Ok(());
        }
        let now = self.now_ms();
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
        let ready = match (self.rot.rebind.as_mut(), self.router.as_ref()) {
            (Some(rb), Some(router)) => {
                let mut hb = Vec::new();
                let _ = Header::control(HEARTBEAT_TOPIC).encode_into(&mut hb);
                rb.ready(now, |rid| {
                    router
                        .send(rid, zmq::SNDMORE | zmq::DONTWAIT)
                        .and_then(|()| router.send(&hb[..], zmq::SNDMORE | zmq::DONTWAIT))
                        .and_then(|()| router.send(&b""[..], zmq::DONTWAIT))
                        .is_ok()
                })
            }
            (Some(_), None) => true,
            _ => false,
        };
        if ready {
            self.rebind_router()?;
        }
        Ok(())
    }

    /// Joining a parent that does not answer: during a rotation it may use
    /// either of its configured keys (say this broker restarted after the
    /// parent switched), so try the other one.
    fn join_with_other_key(&mut self) -> Result<(), BrokerError> {
        if self.parent_state != ParentState::Joining
            || self.dealer.is_none()
            || self.rot.up.active()
        {
            return Ok(());
        }
        let Some(parent) = self.topo.parent(self.rank) else {
            return Ok(());
        };
        let now = self.now_ms();
        let since = self.parent_peer.as_ref().map_or(now, |p| p.last_heard_ms());
        let wait = (4 * self.timing.heartbeat_ms).clamp(500, 5000);
        let Some(card) = self.parent_card.as_mut() else {
            return Ok(());
        };
        let Some(key) = crate::rotate::other_key(
            self.rot.ring.keys(parent),
            &card.public_key,
            now - since,
            wait,
        ) else {
            return Ok(());
        };
        card.public_key = key;
        info!(
            "rotate: parent rank {parent} has not answered for {} ms; trying its other configured key {}",
            now - since,
            z85::encode(&key)
        );
        self.connect_parent()
    }

    /// Listen again on the same endpoint with the new server key.
    fn rebind_router(&mut self) -> Result<(), BrokerError> {
        let Some(rb) = self.rot.rebind.take() else {
            return Ok(());
        };
        let Some(kp) = self.rot.pending_server.take() else {
            return Ok(());
        };
        let (Some(router), Some(ep)) = (&self.router, self.info.endpoint.clone()) else {
            return Ok(());
        };
        if !rb.waiting.is_empty() {
            warn!(
                "rotate: children {:?} did not relink in time; they rejoin with the new key",
                rb.waiting
            );
        }
        router.unbind(&ep).map_err(zerr("unbind the router"))?;
        router
            .set_curve_secretkey(kp.secret())
            .map_err(zerr("set curve secret key"))?;
        // The old listener closes asynchronously: retry briefly.
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match router.bind(&ep) {
                Ok(()) => break,
                Err(zmq::Error::EADDRINUSE) if Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(2))
                }
                Err(e) => {
                    return Err(BrokerError::Bind {
                        endpoint: ep,
                        reason: format!("rebinding with the new key: {}", e.message()),
                    })
                }
            }
        }
        let now = self.now_ms();
        info!(
            "rotate: listening for children with the new key {} ms after the switch",
            now.saturating_sub(rb.started_ms)
        );
        Ok(())
    }
}
