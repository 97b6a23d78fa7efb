//! `exec.run`: run a command on a set of ranks, fanned out down the tree,
//! with output, exits and failures streamed back (docs/protocol.md §6.2).
//!
//! Every broker the request reaches holds a *session*: the request it
//! received (its route leads back upstream), whether it runs the command
//! itself, and one sub-request per neighbour it forwarded a share of the
//! ranks to. Records from the local command and from the sub-requests are
//! relayed upstream as responses flagged MORE; when the local command has
//! ended and every sub-request has ended, the session sends its final
//! response and is forgotten.
//!
//! The decisions made here:
//! - **Who may run.** In a personal instance (`ExecMode::Owner`) the
//!   command runs as the broker's own user, so only a caller with the
//!   `owner` role may start it. In a system instance (`ExecMode::Helper`)
//!   the command runs through `canopy-imp`, which checks the user's signed
//!   request; the broker only decides who *submitted* it (the user, or a
//!   service it registered) and forwards the signed bytes untouched.
//! - **Fan-out.** Each broker splits its share of the ranks by the
//!   neighbour each lies beyond, never sending back the way it came.
//! - **Control.** `exec.kill` and `exec.write` reach a session only over
//!   the link that started it (the client connection, or the neighbour),
//!   so nobody else can signal or feed another's command.
//! - **Cleanup.** When a session's upstream goes away (client closed or
//!   revoked, parent or child lost), its command is killed and its
//!   sub-sessions are told to kill theirs.
//! - **Budget.** At most [`MAX_SESSIONS`] sessions per broker.

use super::{BrokerCore, Event, Hop};
use canopy_overlay::pending::Link;
use canopy_proto::exec::{self as wire, Record};
use canopy_proto::{errno, Header, MsgType, Roles, FLAG_MORE};
use std::collections::{BTreeSet, HashMap};
use tracing::{debug, info, warn};

pub const RUN_TOPIC: &str = "exec.run";
pub const KILL_TOPIC: &str = "exec.kill";
pub const WRITE_TOPIC: &str = "exec.write";

/// Sessions one broker holds at once (each may have a local command).
pub const MAX_SESSIONS: usize = 4096;

/// An outbox past this many bytes is sent at once.
const OUTBOX_BYTES: usize = 256 * 1024;

/// Signals a caller may send to its command.
pub const SIGNALS: &[i32] = &[1, 2, 3, 9, 10, 12, 15];

/// How this broker runs commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecMode {
    /// Personal instance: directly, as the broker's user; owner only.
    Owner,
    /// System instance: through the `canopy-imp` helper, as the user the
    /// signed request's certificate names.
    Helper,
    /// No exec on this broker.
    Off,
}

/// The request envelope inside a signed body (`stdin flag | helper
/// input`), without checking it (the helper does).
pub fn signed_request(body: &[u8]) -> Option<&[u8]> {
    let (&flag, input) = body.split_first()?;
    if flag != b'0' && flag != b'1' {
        return None;
    }
    let mut r = input;
    let parsed = canopy_imp::frame::read_input(&mut r).ok()?;
    // The request is the last frame: its bytes end where the input does.
    let n = parsed.request.len();
    (r.is_empty() && input.len() >= n).then(|| &input[input.len() - n..])
}

/// Start a command for session `sid` on this rank.
#[derive(Debug)]
pub struct Spawn {
    pub sid: u64,
    /// The client's body, untouched (a run spec, or the signed input).
    pub body: Vec<u8>,
    /// Who submitted it: a principal, or `service:NAME`.
    pub submitter: String,
    pub principal: String,
}

#[derive(Debug, PartialEq, Eq)]
enum Local {
    No,
    Running,
    Done,
}

struct Sub {
    link: Link,
    tag: u32,
    /// Ranks sent this way that have not reported an exit or failure.
    open: BTreeSet<u32>,
    done: bool,
}

struct Session {
    up: Header,
    key: (Hop, u32),
    /// System instance, this broker is the origin: what the audit log
    /// records against (the request envelope's SHA-256).
    audit: Option<String>,
    local: Local,
    subs: Vec<Sub>,
    /// Records waiting to go upstream (length-prefixed).
    outbox: Vec<u8>,
}

#[derive(Default)]
pub(super) struct Sessions {
    next_sid: u64,
    next_tag: u32,
    by_sid: HashMap<u64, Session>,
    by_up: HashMap<(Hop, u32), u64>,
    by_sub: HashMap<u32, u64>,
    /// Sessions with records in their outbox.
    dirty: Vec<u64>,
}

impl Sessions {
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.by_sid.len()
    }
}

fn failed(rank: u32, code: u8, reason: &str) -> Vec<u8> {
    Record::Failed { rank, code, reason }.encode()
}

impl<P: AsRef<[u8]> + From<Vec<u8>>> BrokerCore<P> {
    /// `exec.run`, from a client (this broker is the origin) or from a
    /// neighbour (a share of the ranks).
    pub(super) fn exec_run(&mut self, h: Header, payload: P) {
        let Some(&from) = h.route.last() else {
            return;
        };
        if super::no_response(&h) {
            return self.respond_err(
                &h,
                errno::EINVAL,
                "exec.run streams its answer; send it without NORESPONSE",
            );
        }
        let origin = matches!(from, Hop::Local(_));
        let Some((ranks, submit_as, body)) = wire::decode_run(payload.as_ref()) else {
            return self.respond_err(
                &h,
                errno::EPROTO,
                "malformed exec.run payload: it must be a u16 prefix length, `RANKS\\nAS`, then the body (docs/protocol.md §6.2)",
            );
        };
        let mut audit = None;
        let submitter = match self.exec_mode {
            ExecMode::Off => {
                return self.respond_err(
                    &h,
                    errno::ENOSYS,
                    &format!("exec is not enabled on rank {}; a system instance needs [exec] helper in its config", self.rank),
                )
            }
            ExecMode::Owner => {
                if !h.roles.contains(Roles::OWNER) {
                    warn!(verdict = %"deny", principal = %h.userid, topic = RUN_TOPIC, reason = %"not the owner", "exec: refused");
                    let msg = format!(
                        "exec in a personal instance runs commands as the instance owner, so only the owner may use it; principal {} has roles '{}'",
                        h.userid, h.roles
                    );
                    return self.respond_err(&h, errno::EPERM, &msg);
                }
                if origin && !submit_as.is_empty() {
                    return self.respond_err(&h, errno::EINVAL, "submitting as a service is for system instances only (the request must be signed)");
                }
                h.userid.clone()
            }
            ExecMode::Helper if origin => {
                let Hop::Local(id) = from else { unreachable!() };
                let digest = match signed_request(body) {
                    Some(req) => canopy_imp::envelope::sha256_hex(req),
                    None => {
                        return self.respond_err(&h, errno::EPROTO, "this is a system instance: commands run as you through canopy-imp, so the request must be signed (canopy exec does this with ~/.canopy/exec.key and exec.cert; run canopy cert request first)");
                    }
                };
                match self.exec_submitter(id, &h.userid, submit_as) {
                    Ok(s) => {
                        audit = Some(digest);
                        s
                    }
                    Err(msg) => {
                        warn!(verdict = %"deny", principal = %h.userid, topic = RUN_TOPIC, reason = %msg, "exec: refused");
                        self.exec_audit(&h.userid, format!("exec refused: request sha256 {digest}: {msg}"));
                        return self.respond_err(&h, errno::EPERM, &msg);
                    }
                }
            }
            ExecMode::Helper => {
                if submit_as.is_empty() {
                    return self.respond_err(&h, errno::EPROTO, "exec.run from a neighbour names no submitter");
                }
                submit_as.to_string()
            }
        };
        let targets = match wire::parse_ranks(ranks, self.topo.size()) {
            Ok(t) => t,
            Err(e) => return self.respond_err(&h, errno::EINVAL, &e),
        };
        let key = (from, h.matchtag);
        if self.exec.by_up.contains_key(&key) {
            return self.respond_err(&h, errno::EEXIST, "an exec.run with this matchtag is still running on this connection; use a fresh matchtag");
        }
        if self.exec.by_sid.len() >= MAX_SESSIONS {
            let msg = format!(
                "rank {} already holds {MAX_SESSIONS} exec sessions (budget); retry when some end",
                self.rank
            );
            return self.respond_err(&h, errno::EAGAIN, &msg);
        }
        // Split the ranks by where each lies: here, below a child, or
        // beyond the parent (never back the way the request came).
        let mut local = false;
        let mut down: Vec<(u32, Vec<u32>)> = Vec::new();
        let mut up: Vec<u32> = Vec::new();
        for &r in &targets {
            if r == self.rank {
                local = true;
            } else if let Some(c) = self.topo.child_toward(self.rank, r) {
                match down.iter_mut().find(|(x, _)| *x == c) {
                    Some((_, v)) => v.push(r),
                    None => down.push((c, vec![r])),
                }
            } else {
                up.push(r);
            }
        }
        let came_down = from == Hop::Parent;
        let backwards =
            (came_down && !up.is_empty()) || down.iter().any(|(c, _)| from == Hop::Child(*c));
        if backwards {
            return self.respond_err(
                &h,
                errno::EPROTO,
                "exec.run names ranks that lie back the way it came",
            );
        }
        self.exec.next_sid += 1;
        let sid = self.exec.next_sid;
        if origin {
            info!(principal = %h.userid, submitter = %submitter, ranks = %ranks, "exec: started");
        }
        if let Some(d) = &audit {
            self.exec_audit(
                &h.userid,
                format!("exec request sha256 {d} submitted by {submitter} for ranks {ranks}"),
            );
        }
        let mut s = Session {
            up: h.clone(),
            key,
            audit,
            local: if local { Local::Running } else { Local::No },
            subs: Vec::new(),
            outbox: Vec::new(),
        };
        let mut early: Vec<Vec<u8>> = Vec::new();
        let mut shares: Vec<(Link, Vec<u32>)> =
            down.into_iter().map(|(c, v)| (Link::Child(c), v)).collect();
        if !up.is_empty() {
            shares.push((Link::Parent, up));
        }
        for (link, share) in shares {
            let reachable = match link {
                Link::Parent => self.parent_state == super::ParentState::Online,
                Link::Child(c) => self.children.contains_key(&c),
            };
            if !reachable {
                let why = match link {
                    Link::Parent => format!("rank {} has not joined its parent", self.rank),
                    Link::Child(c) => format!("rank {c}, on the way, is not online"),
                };
                for r in share {
                    early.push(failed(r, 126, &format!("rank {r} is unreachable: {why}")));
                }
                continue;
            }
            self.exec.next_tag = self.exec.next_tag.wrapping_add(1).max(1);
            while self.exec.by_sub.contains_key(&self.exec.next_tag) {
                self.exec.next_tag = self.exec.next_tag.wrapping_add(1).max(1);
            }
            let tag = self.exec.next_tag;
            let nodeid = match link {
                Link::Parent => self.topo.parent(self.rank).unwrap_or(0),
                Link::Child(c) => c,
            };
            let mut sh = Header::request(RUN_TOPIC, nodeid, tag);
            sh.userid.clone_from(&h.userid);
            sh.roles = h.roles;
            let p = wire::encode_run(&wire::encode_ranks(&share), &submitter, body);
            self.pending.insert(link, super::in_flight(&sh, p.len()));
            match link {
                Link::Parent => self.send_parent(sh, P::from(p)),
                Link::Child(c) => {
                    self.send_child(c, sh, P::from(p));
                }
            }
            self.exec.by_sub.insert(tag, sid);
            s.subs.push(Sub {
                link,
                tag,
                open: share.into_iter().collect(),
                done: false,
            });
        }
        if local {
            self.events.push_back(Event::ExecSpawn(Spawn {
                sid,
                body: body.to_vec(),
                submitter,
                principal: h.userid.clone(),
            }));
        }
        self.exec.by_up.insert(key, sid);
        self.exec.by_sid.insert(sid, s);
        for rec in early {
            self.exec_up(sid, &rec);
        }
        self.exec_maybe_finish(sid);
    }

    /// Who submits a signed request in a system instance: the caller, or
    /// `service:NAME` for a namespace this very connection offers.
    fn exec_submitter(&self, id: u32, principal: &str, submit_as: &str) -> Result<String, String> {
        if submit_as.is_empty() {
            return Ok(principal.to_string());
        }
        let Some(name) = submit_as.strip_prefix("service:") else {
            return Err(format!(
                "cannot submit as {submit_as:?}: only service:NAME is allowed"
            ));
        };
        let offers = self
            .clients
            .get(&id)
            .is_some_and(|c| c.offers.iter().any(|o| o == name));
        if offers {
            Ok(submit_as.to_string())
        } else {
            Err(format!("{principal} may not submit as service {name}: this connection does not offer that namespace (register it with service.add first)"))
        }
    }

    /// A record from this rank's own command.
    pub(super) fn exec_local_record(&mut self, sid: u64, record: Vec<u8>) {
        let Some(s) = self.exec.by_sid.get_mut(&sid) else {
            return;
        };
        let fin = Record::decode(&record).is_some_and(|r| r.is_final());
        if fin {
            s.local = Local::Done;
        }
        self.exec_up(sid, &record);
        if fin {
            self.exec_maybe_finish(sid);
        }
    }

    /// A response to one of this broker's sub-requests (its route ended
    /// here). True if it was one.
    pub(super) fn exec_sub_response(&mut self, h: &Header, payload: P) -> bool {
        if h.topic != RUN_TOPIC {
            return false;
        }
        let Some(&sid) = self.exec.by_sub.get(&h.matchtag) else {
            debug!(
                matchtag = h.matchtag,
                "exec: a response for an ended session dropped"
            );
            return true;
        };
        let Some(s) = self.exec.by_sid.get_mut(&sid) else {
            return true;
        };
        let Some(sub) = s.subs.iter_mut().find(|x| x.tag == h.matchtag) else {
            return true;
        };
        let more = h.flags & FLAG_MORE != 0;
        // Records (on success; the last response may carry some too): only
        // those for ranks sent that way, not yet ended, are passed on.
        let mut pass: Vec<Vec<u8>> = Vec::new();
        if h.errnum == 0 {
            match wire::records(payload.as_ref()) {
                Some(recs) => {
                    for r in recs {
                        let Some(rec) = Record::decode(r) else {
                            debug!("exec: a malformed record dropped");
                            continue;
                        };
                        if !sub.open.contains(&rec.rank()) {
                            debug!(
                                rank = rec.rank(),
                                "exec: a record for a rank not sent that way dropped"
                            );
                            continue;
                        }
                        if rec.is_final() {
                            sub.open.remove(&rec.rank());
                        }
                        pass.push(r.to_vec());
                    }
                }
                None => debug!("exec: a malformed response dropped"),
            }
        }
        if more && h.errnum == 0 {
            for r in pass {
                self.exec_up(sid, &r);
            }
            return true;
        }
        // The end of that share: ranks that said nothing more failed.
        let reason = if h.errnum == 0 {
            "its broker ended the stream without reporting an exit".to_string()
        } else {
            String::from_utf8_lossy(payload.as_ref()).into_owned()
        };
        let open: Vec<u32> = std::mem::take(&mut sub.open).into_iter().collect();
        sub.done = true;
        self.exec.by_sub.remove(&h.matchtag);
        for r in pass {
            self.exec_up(sid, &r);
        }
        for r in open {
            let rec = failed(r, 126, &format!("rank {r}: {reason}"));
            self.exec_up(sid, &rec);
        }
        self.exec_maybe_finish(sid);
        true
    }

    /// Queue one record for upstream. Records wait in the session's outbox
    /// until the shell's loop ends its turn ([`BrokerCore::flush_exec`]),
    /// so what arrives together leaves as one response, and the last ones
    /// ride on the last response. At the origin of a signed request,
    /// refusals and receipts are audited.
    fn exec_up(&mut self, sid: u64, record: &[u8]) {
        let Some(s) = self.exec.by_sid.get_mut(&sid) else {
            return;
        };
        if s.outbox.is_empty() {
            self.exec.dirty.push(sid);
        }
        wire::push_record(&mut s.outbox, record);
        let full = s.outbox.len() >= OUTBOX_BYTES;
        if let Some(d) = &s.audit {
            let what = match Record::decode(record) {
                Some(Record::Receipt(rank, env)) => Some(format!(
                    "exec receipt sha256 {} from rank {rank} for request sha256 {d}",
                    canopy_imp::envelope::sha256_hex(env)
                )),
                Some(Record::Failed { rank, reason, .. }) => Some(format!(
                    "exec refused on rank {rank} for request sha256 {d}: {reason}"
                )),
                _ => None,
            };
            if let Some(what) = what {
                let principal = s.up.userid.clone();
                self.exec_audit(&principal, what);
            }
        }
        if full {
            self.exec_send(sid, true);
        }
    }

    /// Send a session's outbox upstream, flagged MORE, or as the last
    /// response (the session is then forgotten).
    fn exec_send(&mut self, sid: u64, more: bool) {
        let Some(s) = self.exec.by_sid.get_mut(&sid) else {
            return;
        };
        if more && s.outbox.is_empty() {
            return;
        }
        let payload = std::mem::take(&mut s.outbox);
        let mut r = s.up.response(self.rank, 0);
        if more {
            r.flags = FLAG_MORE;
        } else {
            let s = self.exec.by_sid.remove(&sid).expect("present");
            self.exec.by_up.remove(&s.key);
        }
        self.route_response(r, P::from(payload));
    }

    /// The end of a turn of the shell's loop: every session's waiting
    /// records go upstream.
    pub fn flush_exec(&mut self) {
        for sid in std::mem::take(&mut self.exec.dirty) {
            self.exec_send(sid, true);
        }
    }

    fn exec_maybe_finish(&mut self, sid: u64) {
        let Some(s) = self.exec.by_sid.get(&sid) else {
            return;
        };
        if s.local == Local::Running || s.subs.iter().any(|x| !x.done) {
            return;
        }
        self.exec_send(sid, false);
    }

    fn exec_audit(&mut self, principal: &str, what: String) {
        self.events.push_back(Event::Job(super::Job::ExecAudit {
            principal: principal.to_string(),
            what,
        }));
    }

    /// `exec.kill` / `exec.write` from a client (a request) or a neighbour
    /// (a control message): for the session `from` started.
    pub(super) fn exec_control(
        &mut self,
        from: Hop,
        h: &Header,
        payload: &[u8],
    ) -> Result<(), (u32, String)> {
        let Some((tag, data)) = wire::decode_control(payload) else {
            return Err((
                errno::EPROTO,
                format!(
                    "malformed {} payload: it must start with the exec.run's u32 matchtag",
                    h.topic
                ),
            ));
        };
        let Some(&sid) = self.exec.by_up.get(&(from, tag)) else {
            return Err((
                errno::ENOENT,
                format!(
                    "no exec.run with matchtag {tag} is running for this connection on rank {}",
                    self.rank
                ),
            ));
        };
        if h.topic == KILL_TOPIC {
            let sig = std::str::from_utf8(data)
                .ok()
                .and_then(|t| t.parse::<i32>().ok());
            match sig {
                Some(sig) if SIGNALS.contains(&sig) => self.exec_signal(sid, sig),
                _ => {
                    return Err((
                        errno::EINVAL,
                        format!("exec.kill takes a signal number among {SIGNALS:?}"),
                    ))
                }
            }
        } else {
            self.exec_write(sid, data);
        }
        Ok(())
    }

    /// `exec.kill` or `exec.write` sent by a client to its own broker.
    pub(super) fn exec_control_rpc(&mut self, h: Header, payload: P) {
        let Some(&from @ Hop::Local(_)) = h.route.last().filter(|_| h.route.len() == 1) else {
            return self.respond_err(
                &h,
                errno::EINVAL,
                "send exec.kill and exec.write to the broker the exec.run was sent to (rank ANY)",
            );
        };
        match self.exec_control(from, &h, payload.as_ref()) {
            Ok(()) => self.respond(&h, P::from(Vec::new())),
            Err((e, msg)) => self.respond_err(&h, e, &msg),
        }
    }

    fn exec_signal(&mut self, sid: u64, sig: i32) {
        let Some(s) = self.exec.by_sid.get(&sid) else {
            return;
        };
        if s.local == Local::Running {
            self.events.push_back(Event::ExecSignal { sid, sig });
        }
        let body = sig.to_string().into_bytes();
        self.exec_forward(sid, KILL_TOPIC, &body);
    }

    fn exec_write(&mut self, sid: u64, data: &[u8]) {
        let Some(s) = self.exec.by_sid.get(&sid) else {
            return;
        };
        if s.local == Local::Running {
            self.events.push_back(Event::ExecStdin {
                sid,
                data: data.to_vec(),
            });
        }
        self.exec_forward(sid, WRITE_TOPIC, data);
    }

    /// A control message to every share still running.
    fn exec_forward(&mut self, sid: u64, topic: &str, data: &[u8]) {
        let Some(s) = self.exec.by_sid.get(&sid) else {
            return;
        };
        let targets: Vec<(Link, u32)> = s
            .subs
            .iter()
            .filter(|x| !x.done)
            .map(|x| (x.link, x.tag))
            .collect();
        for (link, tag) in targets {
            let mut c = Header::request(topic, 0, 0);
            c.msg_type = MsgType::Control;
            let p = P::from(wire::encode_control(tag, data));
            match link {
                Link::Parent => {
                    c.nodeid = self.topo.parent(self.rank).unwrap_or(0);
                    self.send_parent(c, p)
                }
                Link::Child(r) => {
                    c.nodeid = r;
                    self.send_child(r, c, p);
                }
            }
        }
    }

    /// The upstream `hop` is gone (client closed or cut, parent or child
    /// lost): its sessions' commands are killed and forgotten.
    pub(super) fn exec_upstream_gone(&mut self, hop: Hop) {
        if self.exec.by_sid.is_empty() {
            return;
        }
        let gone: Vec<u64> = self
            .exec
            .by_up
            .iter()
            .filter(|((h, _), _)| *h == hop)
            .map(|(_, &sid)| sid)
            .collect();
        for sid in gone {
            debug!(
                sid,
                "exec: the session's requester is gone; killing its commands"
            );
            self.exec_signal(sid, 9);
            if let Some(s) = self.exec.by_sid.remove(&sid) {
                self.exec.by_up.remove(&s.key);
                for sub in s.subs {
                    self.exec.by_sub.remove(&sub.tag);
                }
            }
        }
    }
}
