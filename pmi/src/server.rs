//! A PMI-1 process manager for `canopy start`: one thread serves every rank.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tracing::{debug, warn};

use crate::wire::{self, Reply, Request};
use crate::PmiError;

/// Most bytes of keys and values the KVS holds, so one rank cannot exhaust
/// the launcher's memory.
pub const MAX_KVS_BYTES: usize = 64 << 20;
/// Most reply bytes queued for a rank that does not read them.
const MAX_PENDING_OUTPUT: usize = 1 << 20;

/// Something the launcher should know about a rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PmiEvent {
    /// The rank sent `cmd=abort`: the job should be torn down.
    Abort {
        rank: u32,
        code: Option<i32>,
        msg: Option<String>,
    },
    /// The rank finalized cleanly.
    Finalized { rank: u32 },
    /// The rank's connection closed before it finalized (it probably died).
    Disconnected { rank: u32 },
    /// The rank sent something the server could not answer; its connection
    /// was closed.
    ProtocolError { rank: u32, reason: String },
}

/// An abort request as recorded by the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AbortInfo {
    pub rank: u32,
    /// The exit code the rank asked for (`None`: it gave none; PMI's default is 1).
    pub code: Option<i32>,
    pub msg: Option<String>,
}

/// A PMI-1 server for one job of `size` ranks, not yet running.
#[derive(Debug)]
pub struct PmiServer {
    kvsname: String,
    conns: Vec<UnixStream>,
}

static JOB_COUNTER: AtomicU64 = AtomicU64::new(0);

impl PmiServer {
    /// Creates the server and one socketpair per rank. Returns, in rank
    /// order, the child's end of each pair: the launcher clears its
    /// close-on-exec flag (`canopy_sys::clear_cloexec`) and passes its number
    /// as `PMI_FD`, with `PMI_RANK` and `PMI_SIZE`.
    pub fn new(size: u32) -> Result<(PmiServer, Vec<UnixStream>), PmiError> {
        if size == 0 {
            return Err(PmiError::ZeroSize);
        }
        let mut conns = Vec::with_capacity(size as usize);
        let mut children = Vec::with_capacity(size as usize);
        for rank in 0..size {
            let (ours, theirs) =
                UnixStream::pair().map_err(|source| PmiError::Socketpair { rank, source })?;
            ours.set_nonblocking(true)
                .map_err(|source| PmiError::Socketpair { rank, source })?;
            conns.push(ours);
            children.push(theirs);
        }
        let kvsname = format!(
            "kvs_{}_{}",
            std::process::id(),
            JOB_COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        Ok((PmiServer { kvsname, conns }, children))
    }

    /// The job's kvsname, as `get_my_kvsname` reports it.
    pub fn kvsname(&self) -> &str {
        &self.kvsname
    }

    /// The number of ranks.
    pub fn size(&self) -> u32 {
        self.conns.len() as u32
    }

    /// Starts serving on a new thread.
    pub fn spawn(self) -> Result<PmiServerHandle, PmiError> {
        let (wake_tx, wake_rx) = UnixStream::pair().map_err(PmiError::Spawn)?;
        let (events_tx, events_rx) = mpsc::channel();
        let aborted = Arc::new(Mutex::new(None));
        let state = State::new(self.kvsname, self.conns, events_tx, Arc::clone(&aborted));
        let thread = thread::Builder::new()
            .name("canopy-pmi".into())
            .spawn(move || state.run(wake_rx))
            .map_err(PmiError::Spawn)?;
        Ok(PmiServerHandle {
            events: events_rx,
            aborted,
            wake: Some(wake_tx),
            thread: Some(thread),
        })
    }
}

/// A running [`PmiServer`]. Dropping it stops the server.
#[derive(Debug)]
pub struct PmiServerHandle {
    events: Receiver<PmiEvent>,
    aborted: Arc<Mutex<Option<AbortInfo>>>,
    wake: Option<UnixStream>,
    thread: Option<JoinHandle<()>>,
}

impl PmiServerHandle {
    /// Events in the order they happened. The channel disconnects when the
    /// server thread ends: after [`PmiServerHandle::stop`], or once every
    /// rank's connection has closed.
    pub fn events(&self) -> &Receiver<PmiEvent> {
        &self.events
    }

    /// The first abort any rank sent, if one did.
    pub fn aborted(&self) -> Option<AbortInfo> {
        self.aborted
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Whether the server thread has ended (all connections closed, or stopped).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Stops the server thread and waits for it. The ranks' connections are
    /// closed, so their pending calls fail with EOF.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        // Closing our end of the wake pair makes the server's poll return.
        drop(self.wake.take());
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                warn!("pmi server thread panicked");
            }
        }
    }
}

impl Drop for PmiServerHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[derive(Debug)]
struct Conn {
    rank: u32,
    stream: Option<UnixStream>,
    inbuf: Vec<u8>,
    outbuf: Vec<u8>,
    in_barrier: bool,
    finalized: bool,
}

struct State {
    kvsname: String,
    conns: Vec<Conn>,
    kvs: HashMap<String, String>,
    kvs_bytes: usize,
    in_barrier: usize,
    events: Sender<PmiEvent>,
    aborted: Arc<Mutex<Option<AbortInfo>>>,
}

enum Verdict {
    Keep,
    Close(Option<String>),
}

impl State {
    fn new(
        kvsname: String,
        streams: Vec<UnixStream>,
        events: Sender<PmiEvent>,
        aborted: Arc<Mutex<Option<AbortInfo>>>,
    ) -> Self {
        let conns = streams
            .into_iter()
            .enumerate()
            .map(|(rank, stream)| Conn {
                rank: rank as u32,
                stream: Some(stream),
                inbuf: Vec::new(),
                outbuf: Vec::new(),
                in_barrier: false,
                finalized: false,
            })
            .collect();
        State {
            kvsname,
            conns,
            kvs: HashMap::new(),
            kvs_bytes: 0,
            in_barrier: 0,
            events,
            aborted,
        }
    }

    fn emit(&self, event: PmiEvent) {
        debug!(?event, "pmi event");
        // The launcher may have dropped the receiver; that is its choice.
        let _ = self.events.send(event);
    }

    fn run(mut self, wake: UnixStream) {
        let mut ready: Vec<(usize, PollFlags)> = Vec::new();
        loop {
            if self.conns.iter().all(|c| c.stream.is_none()) {
                debug!("all pmi connections closed; server done");
                return;
            }
            ready.clear();
            let mut index = Vec::with_capacity(self.conns.len());
            {
                let mut fds = Vec::with_capacity(self.conns.len() + 1);
                fds.push(PollFd::new(wake.as_fd(), PollFlags::POLLIN));
                for (i, c) in self.conns.iter().enumerate() {
                    if let Some(s) = &c.stream {
                        let mut flags = PollFlags::POLLIN;
                        if !c.outbuf.is_empty() {
                            flags |= PollFlags::POLLOUT;
                        }
                        fds.push(PollFd::new(s.as_fd(), flags));
                        index.push(i);
                    }
                }
                match poll(&mut fds, PollTimeout::NONE) {
                    Ok(_) => {}
                    Err(Errno::EINTR) => continue,
                    Err(e) => {
                        warn!(error = %e, "pmi server cannot poll its connections; stopping");
                        return;
                    }
                }
                if fds[0].revents().is_some_and(|r| !r.is_empty()) {
                    debug!("pmi server stopped");
                    return;
                }
                for (pfd, &i) in fds[1..].iter().zip(&index) {
                    if let Some(r) = pfd.revents() {
                        if !r.is_empty() {
                            ready.push((i, r));
                        }
                    }
                }
            }
            for &(i, revents) in &ready {
                if revents.contains(PollFlags::POLLOUT) {
                    self.flush(i);
                }
                if revents.intersects(
                    PollFlags::POLLIN
                        | PollFlags::POLLHUP
                        | PollFlags::POLLERR
                        | PollFlags::POLLNVAL,
                ) {
                    self.read_from(i);
                }
            }
            if self.in_barrier > 0 && self.in_barrier == self.conns.len() {
                self.release_barrier();
            }
            for i in 0..self.conns.len() {
                if !self.conns[i].outbuf.is_empty() {
                    self.flush(i);
                }
            }
        }
    }

    fn release_barrier(&mut self) {
        debug!(ranks = self.in_barrier, "pmi barrier complete");
        self.in_barrier = 0;
        let line = Reply::BarrierOut.encode();
        for c in &mut self.conns {
            c.in_barrier = false;
            if c.stream.is_some() {
                c.outbuf.extend_from_slice(line.as_bytes());
            }
        }
    }

    /// Reads what `conns[i]` has and answers every complete line.
    fn read_from(&mut self, i: usize) {
        let mut eof = false;
        let mut chunk = [0u8; 8192];
        // Bounded per wake-up so one chatty rank cannot starve the others;
        // poll is level-triggered and brings us back for the rest.
        for _ in 0..8 {
            let Some(stream) = self.conns[i].stream.as_mut() else {
                return;
            };
            match stream.read(&mut chunk) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => self.conns[i].inbuf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    debug!(rank = self.conns[i].rank, error = %e, "pmi read failed");
                    eof = true;
                    break;
                }
            }
        }

        while let Some(pos) = self.conns[i].inbuf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.conns[i].inbuf.drain(..=pos).collect();
            let verdict = match std::str::from_utf8(&line) {
                Ok(text) => self.handle_line(i, text),
                Err(_) => Verdict::Close(Some("line is not utf-8".into())),
            };
            if let Verdict::Close(reason) = verdict {
                self.close(i, reason);
                return;
            }
        }
        if self.conns[i].inbuf.len() > wire::MAX_LINE {
            let reason = format!("line longer than {} bytes", wire::MAX_LINE);
            self.close(i, Some(reason));
            return;
        }
        if eof {
            // A final line without newline is ignored, as MPICH's readers do.
            self.close(i, None);
        }
    }

    fn handle_line(&mut self, i: usize, line: &str) -> Verdict {
        let rank = self.conns[i].rank;
        let req = match wire::parse_request(line) {
            Ok(req) => req,
            Err(err) => {
                warn!(rank, line = line.trim_end(), error = %err, "malformed pmi line");
                let msg = format!("bad_request:{}", wire::sanitize_message(&err.to_string()));
                let reply = match wire::command_name(line) {
                    Some("put") => Reply::PutResult { rc: -1, msg },
                    Some("get") => Reply::GetResult {
                        rc: -1,
                        value: "unknown".into(),
                        msg,
                    },
                    Some("init") => Reply::ResponseToInit {
                        rc: -1,
                        pmi_version: wire::PMI_VERSION,
                        pmi_subversion: wire::PMI_SUBVERSION,
                    },
                    _ => return Verdict::Close(Some(err.to_string())),
                };
                return self.reply(i, &reply);
            }
        };
        let reply = match req {
            Request::Init {
                pmi_version,
                pmi_subversion,
            } => {
                let ok = pmi_version == wire::PMI_VERSION && pmi_subversion <= wire::PMI_SUBVERSION;
                if !ok {
                    warn!(
                        rank,
                        pmi_version, pmi_subversion, "unsupported pmi version requested"
                    );
                }
                Reply::ResponseToInit {
                    rc: if ok { 0 } else { -1 },
                    pmi_version: wire::PMI_VERSION,
                    pmi_subversion: wire::PMI_SUBVERSION,
                }
            }
            Request::GetMaxes => Reply::Maxes {
                kvsname_max: wire::KVSNAME_MAX,
                keylen_max: wire::KEYLEN_MAX,
                vallen_max: wire::VALLEN_MAX,
            },
            Request::GetAppnum => Reply::Appnum { appnum: 0 },
            Request::GetMyKvsname => Reply::MyKvsname {
                kvsname: self.kvsname.clone(),
            },
            Request::GetUniverseSize => Reply::UniverseSize {
                size: i32::try_from(self.conns.len()).unwrap_or(i32::MAX),
            },
            Request::Put {
                kvsname,
                key,
                value,
            } => self.put(&kvsname, key, value),
            Request::Get { kvsname, key } => self.get(&kvsname, &key),
            Request::BarrierIn => {
                let c = &mut self.conns[i];
                if c.in_barrier {
                    return Verdict::Close(Some("entered the barrier twice".into()));
                }
                c.in_barrier = true;
                self.in_barrier += 1;
                return Verdict::Keep;
            }
            Request::Finalize => {
                self.conns[i].finalized = true;
                self.emit(PmiEvent::Finalized { rank });
                Reply::FinalizeAck
            }
            Request::Abort { code, msg } => {
                warn!(rank, ?code, ?msg, "rank asked to abort the job");
                {
                    let mut slot = self
                        .aborted
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner());
                    if slot.is_none() {
                        *slot = Some(AbortInfo {
                            rank,
                            code,
                            msg: msg.clone(),
                        });
                    }
                }
                self.emit(PmiEvent::Abort { rank, code, msg });
                return Verdict::Keep;
            }
        };
        self.reply(i, &reply)
    }

    fn reply(&mut self, i: usize, reply: &Reply) -> Verdict {
        let c = &mut self.conns[i];
        c.outbuf.extend_from_slice(reply.encode().as_bytes());
        if c.outbuf.len() > MAX_PENDING_OUTPUT {
            return Verdict::Close(Some("does not read its replies".into()));
        }
        Verdict::Keep
    }

    fn kvsname_ok(&self, kvsname: &str) -> bool {
        kvsname.is_empty() || kvsname == self.kvsname
    }

    fn put(&mut self, kvsname: &str, key: String, value: String) -> Reply {
        let fail = |msg: String| Reply::PutResult { rc: -1, msg };
        if !self.kvsname_ok(kvsname) {
            return fail(format!("unknown_kvsname_{kvsname}"));
        }
        if let Err(e) = wire::check_value("key", &key, wire::KEYLEN_MAX) {
            return fail(wire::sanitize_message(&e.to_string()));
        }
        if value.len() >= wire::VALLEN_MAX {
            return fail(format!("value_longer_than_{}_bytes", wire::VALLEN_MAX - 1));
        }
        let old = self.kvs.get(&key).map_or(0, |v| key.len() + v.len());
        let new_bytes = self.kvs_bytes - old + key.len() + value.len();
        if new_bytes > MAX_KVS_BYTES {
            return fail("kvs_full".into());
        }
        self.kvs_bytes = new_bytes;
        // Like hydra 4.0, a second put of a key replaces its value.
        self.kvs.insert(key, value);
        Reply::PutResult {
            rc: 0,
            msg: "success".into(),
        }
    }

    fn get(&self, kvsname: &str, key: &str) -> Reply {
        if !self.kvsname_ok(kvsname) {
            return Reply::GetResult {
                rc: -1,
                value: "unknown".into(),
                msg: format!("unknown_kvsname_{kvsname}"),
            };
        }
        match self.kvs.get(key) {
            Some(v) => Reply::GetResult {
                rc: 0,
                value: v.clone(),
                msg: "success".into(),
            },
            None => Reply::GetResult {
                rc: -1,
                value: "unknown".into(),
                msg: format!("key_{key}_not_found"),
            },
        }
    }

    fn flush(&mut self, i: usize) {
        let c = &mut self.conns[i];
        let Some(stream) = c.stream.as_mut() else {
            c.outbuf.clear();
            return;
        };
        while !c.outbuf.is_empty() {
            match stream.write(&c.outbuf) {
                Ok(0) => break,
                Ok(n) => {
                    c.outbuf.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // The peer is gone; its read side will report EOF.
                    debug!(rank = c.rank, error = %e, "pmi write failed");
                    c.outbuf.clear();
                    break;
                }
            }
        }
    }

    /// Closes `conns[i]`, reporting why unless it finalized and hung up.
    fn close(&mut self, i: usize, protocol_error: Option<String>) {
        let c = &mut self.conns[i];
        if c.stream.is_none() {
            return;
        }
        let rank = c.rank;
        // Send what is queued (e.g. the finalize_ack or an error reply) first.
        self.flush(i);
        let c = &mut self.conns[i];
        c.stream = None;
        c.inbuf.clear();
        c.outbuf.clear();
        if c.in_barrier {
            // It can no longer leave the barrier; the others stay blocked until
            // the launcher, told below, ends the job.
            c.in_barrier = false;
            self.in_barrier -= 1;
        }
        let finalized = c.finalized;
        match protocol_error {
            Some(reason) => {
                warn!(rank, %reason, "closing pmi connection");
                self.emit(PmiEvent::ProtocolError { rank, reason });
            }
            None if !finalized => self.emit(PmiEvent::Disconnected { rank }),
            None => debug!(rank, "pmi connection closed after finalize"),
        }
    }
}
