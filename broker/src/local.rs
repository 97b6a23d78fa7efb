//! The local connector's sockets: a UNIX listener and one stream per
//! client, with the length-prefixed framing (docs/protocol.md §2). The uid
//! comes from `SO_PEERCRED`; what a client may do is the core's decision.

use crate::core::idmap::IdMap;
use crate::core::{Budgets, Input, Queued};
use crate::error::BrokerError;
use crate::sockets::Frame;
use canopy_proto::frame::{encode_frame, encode_raw_frame, FrameDecoder};
use canopy_proto::Header;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tracing::{info, warn};

struct Stream {
    stream: UnixStream,
    uid: u32,
    dec: FrameDecoder,
    out: Vec<u8>,
    out_pos: usize,
    /// Close once `out` is written.
    closing: bool,
    dead: bool,
    /// Since when it has not been read because of its budgets.
    paused_since: Option<Instant>,
}

/// A connection that has not been read for this long because it (or its
/// uid) is at its budget, and that still holds replies it has not read or
/// a frame it has not finished sending, is cut: it will not read (or its
/// uid's other connections hold the budget and will not read).
const STALL_CUT: Duration = Duration::from_secs(5);

pub struct Local {
    listener: UnixListener,
    pub path: PathBuf,
    streams: IdMap<u32, Stream>,
    /// One read buffer for every client (not zeroed per read).
    rbuf: Box<[u8]>,
    budgets: Budgets,
    /// Unsent bytes: per uid, and in total.
    by_uid: IdMap<u32, usize>,
    total: usize,
    /// The instance owner's uid: not paused for the broker's total budget
    /// (other clients' backlog must not lock the owner out).
    owner: Option<u32>,
}

impl Local {
    pub fn bind(path: &Path, budgets: Budgets) -> Result<Local, BrokerError> {
        let _ = std::fs::remove_file(path);
        let io = |what: &'static str| {
            let path = path.to_path_buf();
            move |source| BrokerError::Io { what, path, source }
        };
        let listener = UnixListener::bind(path).map_err(io("bind the local connector"))?;
        listener
            .set_nonblocking(true)
            .map_err(io("configure the local connector"))?;
        Ok(Local {
            listener,
            path: path.to_path_buf(),
            streams: IdMap::default(),
            rbuf: vec![0u8; 65536].into_boxed_slice(),
            budgets,
            by_uid: IdMap::default(),
            total: 0,
            owner: None,
        })
    }

    pub fn listener_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// Each client's id and fd, and whether it has output pending.
    /// Each client's id and fd, whether to read from it, and whether it
    /// has output pending. A connection whose unsent replies plus partly
    /// read frame reach its budget, or whose uid's reach the per-uid
    /// budget, is not read until it reads its replies: the kernel's socket
    /// buffer holds what it sends meanwhile, and it holds no more of the
    /// broker's memory than its budgets.
    ///
    /// A connection paused so for [`STALL_CUT`] with replies still unread,
    /// or a frame half sent, is cut (logged once with the figures; `flush` reports it closed).
    pub fn fds(&mut self) -> Vec<(u32, RawFd, bool, bool)> {
        let b = self.budgets;
        let mut decoding: IdMap<u32, usize> = IdMap::default();
        let mut all = self.total;
        for s in self.streams.values() {
            let pending = s.dec.pending();
            if pending > 0 {
                *decoding.entry(s.uid).or_default() += pending;
                all += pending;
            }
        }
        let now = Instant::now();
        let by_uid = &self.by_uid;
        let owner = self.owner;
        self.streams
            .iter_mut()
            .map(|(id, s)| {
                let unsent = s.out.len() - s.out_pos;
                let conn = unsent + s.dec.pending();
                let uid = by_uid.get(&s.uid).copied().unwrap_or(0)
                    + decoding.get(&s.uid).copied().unwrap_or(0);
                // At the broker's total, only the owner is still read.
                let read = conn < b.client_bytes
                    && uid < b.principal_bytes
                    && (all < b.total_bytes || owner == Some(s.uid));
                if read {
                    s.paused_since = None;
                } else if (unsent > 0 || s.dec.pending() > 0)
                    && !s.dead
                    && now.duration_since(*s.paused_since.get_or_insert(now)) >= STALL_CUT
                {
                    warn!(
                        verdict = %"deny",
                        client = *id,
                        uid = s.uid,
                        unsent,
                        partial_frame = s.dec.pending(),
                        uid_held = uid,
                        client_budget = b.client_bytes,
                        uid_budget = b.principal_bytes,
                        "budget: local client has not read its replies for {}s while at its budget (or holds a frame its uid's budget does not let it finish); disconnecting it",
                        STALL_CUT.as_secs()
                    );
                    s.dead = true;
                }
                (*id, s.stream.as_raw_fd(), read && !s.dead, unsent > 0)
            })
            .collect()
    }

    /// Accept every waiting connection: `(id, uid)` for each, ids from
    /// `new_id`.
    pub fn accept(&mut self, mut new_id: impl FnMut() -> u32) -> Vec<Input<Frame>> {
        let mut out = Vec::new();
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return out,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!("local: accept failed: {e}");
                    return out;
                }
            };
            let uid = match nix::sys::socket::getsockopt(
                &stream.as_fd(),
                nix::sys::socket::sockopt::PeerCredentials,
            ) {
                Ok(c) => c.uid(),
                Err(e) => {
                    warn!(verdict = %"deny", mechanism = %"peercred", reason = %format!("cannot read SO_PEERCRED: {e}"), "local: connection refused");
                    continue;
                }
            };
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let id = new_id();
            self.streams.insert(
                id,
                Stream {
                    stream,
                    uid,
                    dec: FrameDecoder::with_max_payload(self.budgets.max_message),
                    out: Vec::new(),
                    out_pos: 0,
                    closing: false,
                    dead: false,
                    paused_since: None,
                },
            );
            out.push(Input::LocalConnected { id, uid });
        }
    }

    /// What client `id` sent. Frames are decoded after every read, so a
    /// frame whose length prefix is over the max message is refused (and
    /// the client cut, logged once) before its payload is buffered: at
    /// most one read buffer past the prefix is ever held.
    pub fn read(&mut self, id: u32) -> Vec<Input<Frame>> {
        let buf = &mut self.rbuf;
        let mut out = Vec::new();
        let Some(s) = self.streams.get_mut(&id) else {
            return out;
        };
        let queued = Queued {
            conn: s.out.len() - s.out_pos,
            uid: self.by_uid.get(&s.uid).copied().unwrap_or(0),
            total: self.total,
        };
        while !s.dead {
            let more = match s.stream.read(buf) {
                Ok(0) => {
                    if s.dec.pending() > 0 {
                        info!(
                            client = id,
                            uid = s.uid,
                            discarded = s.dec.pending(),
                            "local: client closed the connection in the middle of a frame; the partial frame is discarded"
                        );
                    }
                    s.dead = true;
                    false
                }
                Ok(n) => {
                    s.dec.push(&buf[..n]);
                    n == buf.len()
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => false,
                Err(e) if e.kind() == ErrorKind::Interrupted => true,
                Err(_) => {
                    s.dead = true;
                    false
                }
            };
            loop {
                match s.dec.next_frame() {
                    Ok(Some((header, p))) if !s.closing => out.push(Input::Local {
                        id,
                        header,
                        payload: Frame::Bytes(p),
                        queued,
                    }),
                    // A refused or revoked client: nothing it sends counts.
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(e) => {
                        warn!(
                            verdict = %"deny",
                            client = id,
                            uid = s.uid,
                            max_message = self.budgets.max_message,
                            "local: bad frame ({e}); disconnecting the client"
                        );
                        s.dead = true;
                        break;
                    }
                }
            }
            // Read on only while this connection is within its budget
            // (what it left unread, and what it has sent that is not yet a
            // whole frame); the next poll decides again.
            if !more || s.out.len() - s.out_pos + s.dec.pending() >= self.budgets.client_bytes {
                break;
            }
        }
        out
    }

    /// The instance owner's uid (see the `owner` field).
    pub fn set_owner(&mut self, uid: u32) {
        self.owner = Some(uid);
    }

    /// The budgets this connector enforces.
    pub fn budgets(&self) -> Budgets {
        self.budgets
    }

    pub fn queue(&mut self, id: u32, h: &Header, payload: &[u8]) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        if s.dead {
            return;
        }
        let before = s.out.len();
        if let Err(e) = encode_frame(h, payload, &mut s.out) {
            warn!(client = id, "local: cannot encode a message: {e}");
        }
        self.charge(id, before);
    }

    /// The same with a header already encoded (an event for several
    /// clients).
    pub fn queue_encoded(&mut self, id: u32, header: &[u8], payload: &[u8]) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        if s.dead {
            return;
        }
        let before = s.out.len();
        encode_raw_frame(header, payload, &mut s.out);
        self.charge(id, before);
    }

    /// Count what was just queued for `id` (its output was `before` bytes
    /// long) against the budgets, and cut whoever is over one.
    fn charge(&mut self, id: u32, before: usize) {
        let Some(s) = self.streams.get(&id) else {
            return;
        };
        let added = s.out.len() - before;
        let (uid, backlog) = (s.uid, s.out.len() - s.out_pos);
        *self.by_uid.entry(uid).or_default() += added;
        self.total += added;
        // A client that will not read: its connection, then its uid's
        // largest, then the broker's largest is cut, logged once with the
        // figures. Clients that read keep nothing queued and lose nothing.
        let b = self.budgets;
        let victim = if backlog > b.client_bytes {
            Some((id, "this connection", backlog, b.client_bytes))
        } else if self.by_uid.get(&uid).copied().unwrap_or(0) > b.principal_bytes {
            self.largest(Some(uid))
                .map(|v| (v, "this uid", self.by_uid[&uid], b.principal_bytes))
        } else if self.total > b.total_bytes {
            self.largest(None)
                .map(|v| (v, "this broker", self.total, b.total_bytes))
        } else {
            None
        };
        if let Some((victim, over, held, budget)) = victim {
            if let Some(v) = self.streams.get_mut(&victim) {
                warn!(
                    client = victim,
                    uid = v.uid,
                    queued = v.out.len() - v.out_pos,
                    over,
                    held,
                    budget,
                    "budget: local client is not reading; disconnecting it"
                );
                v.dead = true;
            }
        }
    }

    /// The stream with the most unsent bytes (of `uid`, if given).
    fn largest(&self, uid: Option<u32>) -> Option<u32> {
        self.streams
            .iter()
            .filter(|(_, s)| !s.dead && uid.is_none_or(|u| s.uid == u))
            .max_by_key(|(_, s)| s.out.len() - s.out_pos)
            .map(|(id, _)| *id)
    }

    /// Close `id` once what is queued for it is written.
    pub fn close(&mut self, id: u32) {
        if let Some(s) = self.streams.get_mut(&id) {
            s.closing = true;
        }
    }

    /// Write what is pending; the ids of clients now closed.
    pub fn flush(&mut self) -> Vec<u32> {
        let mut closed = Vec::new();
        for (id, s) in self.streams.iter_mut() {
            let before = s.out.len() - s.out_pos;
            while s.out_pos < s.out.len() && !s.dead {
                match s.stream.write(&s.out[s.out_pos..]) {
                    Ok(n) => s.out_pos += n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => s.dead = true,
                }
            }
            if s.out_pos == s.out.len() {
                s.out.clear();
                s.out_pos = 0;
                if s.out.capacity() > canopy_proto::frame::KEEP_CAPACITY {
                    s.out = Vec::new();
                }
            }
            let mut gone = before - (s.out.len() - s.out_pos);
            if s.dead || (s.closing && s.out.is_empty()) {
                closed.push(*id);
                gone += s.out.len() - s.out_pos;
            }
            if gone > 0 {
                self.total -= gone;
                if let Some(u) = self.by_uid.get_mut(&s.uid) {
                    *u -= gone;
                    if *u == 0 {
                        self.by_uid.remove(&s.uid);
                    }
                }
            }
        }
        for id in &closed {
            self.streams.remove(id);
        }
        closed
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
