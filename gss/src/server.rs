//! The acceptor: a TCP listener on its own threads. Kerberos calls (which
//! may read a keytab, a replay cache or reach a KDC) happen here and never
//! on a thread that routes messages.

use crate::bindings::Bindings;
use crate::client::{read_msg_by, write_msg, MAX_ROUNDS};
use crate::krb::{acceptor_cred, check_flags, Acceptor};
use crate::ratelog::RateLog;
use crate::wire::{Msg, Purpose, Transcript, NONCE_LEN};
use crate::{canonical_principal, GssError};
use canopy_security::curve_principal;
use libgssapi::credential::Cred;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Write one message, all of it before `deadline`.
fn write_by(s: &mut TcpStream, deadline: Instant, m: &Msg, peer: &str) -> Result<(), GssError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(GssError::Io {
            peer: peer.to_string(),
            source: std::io::Error::new(std::io::ErrorKind::TimedOut, "the exchange took too long"),
        });
    }
    let _ = s.set_write_timeout(Some(left));
    write_msg(s, m, peer)
}

/// Decides whether an authenticated principal may bind a key for a purpose.
/// Arguments: the purpose, the authenticated principal, the peer's IP
/// address (as ZAP gives it).
pub type Admit = dyn Fn(Purpose, &str, &str) -> Result<(), String> + Send + Sync;

/// How much of the acceptor one connection, one address and one principal
/// may hold; see docs/security.md ("The key exchange under attack").
///
/// A connection first waits, on one event-loop thread that never blocks,
/// for its whole Hello; only then does it take a worker. So an outsider
/// without a ticket holds at most one pending slot per connection, for at
/// most `first_message`; when the pending slots of an address (or all of
/// them) are full, the oldest pending connection makes room for the new
/// one, so trickling bytes never locks a newcomer out. Workers run the
/// Kerberos step at once (no ticket: refused in microseconds) and refuse a
/// principal that `admit` refuses before waiting for its proof, so only an
/// admitted principal can keep a worker, for at most `exchange` and at most
/// `per_principal` workers at a time. `overlay_workers` workers serve
/// nothing but overlay exchanges, so clients cannot crowd out renewals.
#[derive(Clone, Debug)]
pub struct Limits {
    /// The whole Hello must arrive within this of the connection.
    pub first_message: Duration,
    /// The whole exchange must end within this of the connection.
    pub exchange: Duration,
    /// Connections waiting for their Hello, in all.
    pub max_pending: usize,
    /// Connections waiting for their Hello, per source address.
    pub per_address: usize,
    /// Workers for any exchange.
    pub workers: usize,
    /// Further workers reserved for overlay exchanges.
    pub overlay_workers: usize,
    /// Exchanges one authenticated principal may have in progress.
    pub per_principal: usize,
    /// Hellos waiting for a worker, per purpose; past it, refused as busy.
    pub queue: usize,
    /// Interval of the rate-limited warnings.
    pub log_interval: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            first_message: Duration::from_secs(1),
            exchange: Duration::from_secs(2),
            max_pending: 512,
            per_address: 64,
            workers: 4,
            overlay_workers: 2,
            per_principal: 4,
            queue: 256,
            log_interval: crate::ratelog::INTERVAL,
        }
    }
}

/// What the acceptor needs.
#[derive(Clone)]
pub struct ServerConfig {
    /// Our principal (the keytab must hold its key).
    pub principal: String,
    /// The CURVE public key initiators will connect to; vouched for by MIC.
    pub server_key: [u8; 32],
    /// Its secret, to check each initiator's proof of possession of its
    /// link key ([`crate::pop`]).
    pub server_secret: zeroize::Zeroizing<[u8; 32]>,
    pub bindings: Arc<Bindings>,
    /// Consulted as soon as the initiator is authenticated, before it may
    /// bind anything (the ACL for clients, the peer list for the overlay).
    pub admit: Arc<Admit>,
    /// Cap on a binding's lifetime (the ticket's end is used if earlier).
    pub max_lifetime: Option<Duration>,
    pub limits: Limits,
}

/// A running acceptor. Dropping it stops accepting.
pub struct KexServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    queue: Arc<Queue>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Joined on drop: the last of them releases the Kerberos credential,
    /// which must happen before the process exits (MIT's library aborts
    /// if it is used while its destructors run).
    workers: Vec<std::thread::JoinHandle<()>>,
}

impl KexServer {
    /// Acquire the acceptor credentials (fails at once if the keytab lacks
    /// the key) and serve exchanges on `listener` on new threads.
    pub fn start(listener: TcpListener, cfg: ServerConfig) -> Result<KexServer, GssError> {
        canonical_principal(&cfg.principal)?;
        let cred = acceptor_cred(&cfg.principal)?;
        let io = |peer: &str| {
            let peer = peer.to_string();
            move |source| GssError::Io { peer, source }
        };
        let addr = listener.local_addr().map_err(io("listener"))?;
        listener.set_nonblocking(true).map_err(io("listener"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let queue = Arc::new(Queue::default());
        let shared = Arc::new(Shared {
            log: RateLog::new(cfg.limits.log_interval),
            cfg,
            cred,
            inflight: Mutex::new(HashMap::new()),
        });
        let l = &shared.cfg.limits;
        let (general, reserved) = (l.workers.max(1), l.overlay_workers);
        let mut workers = Vec::with_capacity(general + reserved);
        for i in 0..general + reserved {
            let (q, sh) = (queue.clone(), shared.clone());
            let overlay_only = i >= general;
            let spawned = std::thread::Builder::new()
                .name("canopy-gss-work".into())
                .spawn(move || worker(&q, &sh, overlay_only));
            match spawned {
                Ok(h) => workers.push(h),
                Err(e) => {
                    queue.stop();
                    for w in workers {
                        let _ = w.join();
                    }
                    return Err(io("thread")(e));
                }
            }
        }
        let (stop2, q2) = (stop.clone(), queue.clone());
        let thread = match std::thread::Builder::new()
            .name("canopy-gss-kex".into())
            .spawn(move || serve(listener, shared, q2, stop2))
        {
            Ok(t) => t,
            Err(e) => {
                queue.stop();
                for w in workers {
                    let _ = w.join();
                }
                return Err(io("thread")(e));
            }
        };
        Ok(KexServer {
            addr,
            stop,
            queue,
            thread: Some(thread),
            workers,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for KexServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.queue.stop();
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Each finishes its exchange (bounded by the exchange deadline).
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

struct Shared {
    cfg: ServerConfig,
    cred: Cred,
    log: RateLog,
    /// Exchanges in progress per authenticated principal.
    inflight: Mutex<HashMap<String, usize>>,
}

impl Shared {
    /// A rate-limited warning: one line per cause per interval.
    fn warn(&self, cause: &str, line: String) {
        if let Some(l) = self.log.note(cause, &line, Instant::now()) {
            warn!("{l}");
        }
    }
}

/// A connection whose Hello is complete, waiting for a worker.
struct Job {
    s: TcpStream,
    peer: String,
    accepted: Instant,
    purpose: Purpose,
    link_key: [u8; 32],
    token: Vec<u8>,
}

#[derive(Default)]
struct Queue {
    jobs: Mutex<(VecDeque<Job>, VecDeque<Job>, bool)>,
    cv: Condvar,
}

impl Queue {
    /// Queue a job; gives it back if its purpose's queue is full.
    fn push(&self, j: Job, cap: usize) -> Result<(), Job> {
        let mut g = self.jobs.lock().unwrap_or_else(PoisonError::into_inner);
        let q = if j.purpose == Purpose::Overlay {
            &mut g.0
        } else {
            &mut g.1
        };
        if q.len() >= cap {
            return Err(j);
        }
        q.push_back(j);
        self.cv.notify_all();
        Ok(())
    }

    /// The next job (overlay first); `None` once stopped.
    fn pop(&self, overlay_only: bool) -> Option<Job> {
        let mut g = self.jobs.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if g.2 {
                return None;
            }
            if let Some(j) = g.0.pop_front() {
                return Some(j);
            }
            if !overlay_only {
                if let Some(j) = g.1.pop_front() {
                    return Some(j);
                }
            }
            g = self.cv.wait(g).unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn stop(&self) {
        let mut g = self.jobs.lock().unwrap_or_else(PoisonError::into_inner);
        g.2 = true;
        g.0.clear();
        g.1.clear();
        self.cv.notify_all();
    }
}

fn worker(q: &Queue, sh: &Shared, overlay_only: bool) {
    while let Some(j) = q.pop(overlay_only) {
        exchange(j, sh);
    }
}

/// A connection still sending its Hello.
struct Pending {
    s: TcpStream,
    ip: IpAddr,
    peer: String,
    accepted: Instant,
    buf: Vec<u8>,
}

enum Progress {
    More,
    Done(Msg),
    Closed,
    Bad(GssError),
}

impl Pending {
    /// Read what is there without blocking.
    fn read(&mut self) -> Progress {
        loop {
            let want = if self.buf.len() < 4 {
                4
            } else {
                let h = [self.buf[0], self.buf[1], self.buf[2], self.buf[3]];
                match Msg::frame_len(h) {
                    Ok(n) => 4 + n,
                    Err(e) => return Progress::Bad(e),
                }
            };
            if self.buf.len() == want && want > 4 {
                return match Msg::decode(&self.buf[4..]) {
                    Ok(m) => Progress::Done(m),
                    Err(e) => Progress::Bad(e),
                };
            }
            let at = self.buf.len();
            self.buf.resize(want, 0);
            match self.s.read(&mut self.buf[at..]) {
                Ok(0) => return Progress::Closed,
                Ok(n) => self.buf.truncate(at + n),
                Err(e) => {
                    self.buf.truncate(at);
                    return match e.kind() {
                        std::io::ErrorKind::WouldBlock => Progress::More,
                        std::io::ErrorKind::Interrupted => continue,
                        _ => Progress::Closed,
                    };
                }
            }
        }
    }
}

fn serve(listener: TcpListener, sh: Arc<Shared>, q: Arc<Queue>, stop: Arc<AtomicBool>) {
    let l = sh.cfg.limits.clone();
    let mut pending: Vec<Pending> = Vec::new();
    let mut last_flush = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        let now = Instant::now();
        // Wake for the nearest first-message deadline, or to flush the log.
        let wait = pending
            .iter()
            .map(|p| (p.accepted + l.first_message).saturating_duration_since(now))
            .min()
            .unwrap_or(Duration::from_millis(500))
            .min(Duration::from_millis(500));
        let (accept, ready) = {
            let mut fds = Vec::with_capacity(pending.len() + 1);
            fds.push(PollFd::new(listener.as_fd(), PollFlags::POLLIN));
            for p in &pending {
                fds.push(PollFd::new(p.s.as_fd(), PollFlags::POLLIN));
            }
            let ms = u16::try_from(wait.as_millis().max(1)).unwrap_or(500);
            if let Err(e) = poll(&mut fds, PollTimeout::from(ms)) {
                if e != nix::errno::Errno::EINTR {
                    warn!("gss: poll failed: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                }
                continue;
            }
            let hit = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
            (
                hit(&fds[0]),
                fds[1..].iter().map(hit).collect::<Vec<bool>>(),
            )
        };
        if stop.load(Ordering::SeqCst) {
            return;
        }
        // Read what arrived; hand complete Hellos to the workers.
        let now = Instant::now();
        let mut keep = Vec::with_capacity(pending.len());
        for (p, ready) in pending.drain(..).zip(ready) {
            if !ready {
                if now.duration_since(p.accepted) >= l.first_message {
                    sh.warn(
                        "slow-hello",
                        format!(
                            "gss: verdict=deny principal=- address={} reason=\"no complete hello within {:.1}s of connecting; closed (slow or idle peer)\"",
                            p.peer,
                            l.first_message.as_secs_f64()
                        ),
                    );
                } else {
                    keep.push(p);
                }
                continue;
            }
            if let Some(p) = advance(p, &sh, &q, now) {
                keep.push(p);
            }
        }
        pending = keep;
        if accept {
            accept_all(&listener, &mut pending, &sh, &q, &stop);
        }
        if now.duration_since(last_flush) >= Duration::from_secs(1) {
            last_flush = now;
            for line in sh.log.flush(now) {
                warn!("{line}");
            }
        }
    }
}

/// Read what a pending connection sent; hand a complete Hello to the
/// workers. Returns the connection if it is still waiting for its Hello.
fn advance(mut p: Pending, sh: &Shared, q: &Queue, now: Instant) -> Option<Pending> {
    let l = &sh.cfg.limits;
    match p.read() {
        Progress::More if now.duration_since(p.accepted) < l.first_message => return Some(p),
        Progress::More => sh.warn(
            "slow-hello",
            format!(
                "gss: verdict=deny principal=- address={} reason=\"no complete hello within {:.1}s of connecting; closed (slow or idle peer)\"",
                p.peer,
                l.first_message.as_secs_f64()
            ),
        ),
        Progress::Closed => {}
        Progress::Bad(e) => refuse_early(sh, p.s, &p.peer, "bad-hello", e),
        Progress::Done(Msg::Hello {
            purpose,
            link_key,
            token,
        }) => {
            let _ = p.s.set_nonblocking(false);
            let job = Job {
                s: p.s,
                peer: p.peer,
                accepted: p.accepted,
                purpose,
                link_key,
                token,
            };
            if let Err(j) = q.push(job, l.queue) {
                refuse_early(
                    sh,
                    j.s,
                    &j.peer,
                    "busy",
                    GssError::Busy(format!(
                        "{} {} exchanges are waiting",
                        l.queue,
                        j.purpose.as_str()
                    )),
                );
            }
        }
        Progress::Done(other) => refuse_early(
            sh,
            p.s,
            &p.peer,
            "bad-hello",
            GssError::Protocol(format!("expected hello, got {}", other.kind())),
        ),
    }
    None
}

/// Accept every connection waiting; make room for each by closing the
/// oldest pending connection of its address, or of all, when full.
fn accept_all(
    listener: &TcpListener,
    pending: &mut Vec<Pending>,
    sh: &Shared,
    q: &Queue,
    stop: &AtomicBool,
) {
    let l = &sh.cfg.limits;
    // A bounded batch, so that pending connections are read between
    // bursts of new ones.
    for _ in 0..256 {
        let (s, addr) = match listener.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // Out of descriptors, most likely: closing the oldest
                // pending connection frees one.
                sh.warn(
                    "accept",
                    format!("gss: accept failed: {e}; closing the oldest pending connection"),
                );
                if !pending.is_empty() {
                    pending.remove(0);
                }
                return;
            }
        };
        if stop.load(Ordering::SeqCst) {
            return;
        }
        if s.set_nonblocking(true).is_err() {
            continue;
        }
        let _ = s.set_nodelay(true);
        let ip = addr.ip();
        let same = pending.iter().filter(|p| p.ip == ip).count();
        // `pending` is in order of arrival: the first match is the oldest.
        let evict = if same >= l.per_address.max(1) {
            pending
                .iter()
                .position(|p| p.ip == ip)
                .map(|i| (i, "per-address"))
        } else if pending.len() >= l.max_pending.max(1) {
            Some((0, "total"))
        } else {
            None
        };
        if let Some((i, which)) = evict {
            let old = pending.remove(i);
            sh.warn(
                &format!("evict-{which}"),
                format!(
                    "gss: verdict=deny principal=- address={} reason=\"the {which} limit of connections waiting for a hello ({}) was reached; closed the oldest to admit a new one\"",
                    old.peer,
                    if which == "total" { l.max_pending } else { l.per_address }
                ),
            );
        }
        // A Hello that came with the connection is handed on at once, so
        // a burst of other connections cannot evict it before it is read.
        let now = Instant::now();
        let p = Pending {
            s,
            ip,
            peer: addr.to_string(),
            accepted: now,
            buf: Vec::new(),
        };
        if let Some(p) = advance(p, sh, q, now) {
            pending.push(p);
        }
    }
}

/// Refuse a connection before any Kerberos step (best effort, no waiting).
fn refuse_early(sh: &Shared, mut s: TcpStream, peer: &str, cause: &str, e: GssError) {
    let reason = crate::krb::clean(&e.to_string());
    sh.warn(
        cause,
        format!("gss: verdict=deny principal=- address={peer} reason=\"{reason}\""),
    );
    if let Ok(f) = (Msg::Refused { reason }).encode() {
        let _ = s.write(&f);
    }
}

/// Decrements a principal's count of exchanges in progress when dropped.
struct Inflight<'a> {
    sh: &'a Shared,
    who: String,
}

impl Drop for Inflight<'_> {
    fn drop(&mut self) {
        let mut m = self
            .sh
            .inflight
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = m.get_mut(&self.who) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.who);
            }
        }
    }
}

fn exchange(j: Job, sh: &Shared) {
    let mut s = j.s;
    let peer = j.peer;
    let deadline = j.accepted + sh.cfg.limits.exchange;
    let _ = s.set_nodelay(true);
    let start = Instant::now();
    let hello = (j.purpose, j.link_key, j.token);
    match run(&mut s, &peer, sh, hello, deadline) {
        Ok((principal, key, purpose, lifetime, renewed)) => info!(
            "gss: verdict=allow principal={principal} key={key} purpose={} address={peer} lifetime={}s {} took={:.1}ms",
            purpose.as_str(),
            lifetime.as_secs(),
            if renewed { "renewed" } else { "bound" },
            start.elapsed().as_secs_f64() * 1e3
        ),
        Err((who, e)) => {
            let reason = crate::krb::clean(&e.to_string());
            let cause = format!("{}:{}", e.cause(), who.as_deref().unwrap_or("-"));
            sh.warn(
                &cause,
                format!(
                    "gss: verdict=deny principal={} address={peer} reason=\"{reason}\"",
                    who.as_deref().unwrap_or("-"),
                ),
            );
            // Tell the peer why, unless it is about our own setup.
            if !matches!(e, GssError::Io { .. }) {
                let left = deadline.saturating_duration_since(Instant::now());
                let _ = s.set_write_timeout(Some(left.max(Duration::from_millis(100))));
                let _ = write_msg(&mut s, &Msg::Refused { reason }, &peer);
            }
        }
    }
}

type Ok5 = (String, String, Purpose, Duration, bool);

fn run(
    s: &mut TcpStream,
    peer: &str,
    sh: &Shared,
    (purpose, link_key, token): (Purpose, [u8; 32], Vec<u8>),
    deadline: Instant,
) -> Result<Ok5, (Option<String>, GssError)> {
    let cfg = &sh.cfg;
    let anon = |e| (None, e);
    let ip = peer
        .parse::<SocketAddr>()
        .map(|a| a.ip().to_string())
        .unwrap_or_default();
    let ip = ip.as_str();
    if Instant::now() >= deadline {
        return Err(anon(GssError::Busy(
            "the exchange waited too long for a worker".into(),
        )));
    }
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::getrandom(&mut nonce).map_err(|e| {
        (
            None,
            GssError::Protocol(format!("no randomness for a nonce: {e}")),
        )
    })?;
    let mut ctx = Acceptor::new(sh.cred.clone());
    let mut token = token;
    let mut rounds = 0;
    loop {
        rounds += 1;
        let out = ctx.step(&token).map_err(anon)?;
        let complete = ctx.is_complete();
        write_by(
            s,
            deadline,
            &Msg::Challenge {
                nonce,
                server_key: cfg.server_key,
                complete,
                token: out.unwrap_or_default(),
            },
            peer,
        )
        .map_err(anon)?;
        if complete {
            break;
        }
        if rounds >= MAX_ROUNDS {
            return Err((
                None,
                GssError::Protocol(format!("no complete context after {MAX_ROUNDS} rounds")),
            ));
        }
        token = match read_msg_by(s, peer, deadline).map_err(anon)? {
            Msg::Token { token } => token,
            other => {
                return Err((
                    None,
                    GssError::Protocol(format!("expected token, got {}", other.kind())),
                ))
            }
        };
    }
    check_flags(ctx.flags().map_err(anon)?).map_err(anon)?;
    let who = ctx.source().map_err(anon)?;
    let named = |e| (Some(who.clone()), e);
    // The principal is known: refuse at once what the policy refuses
    // (before it can hold this worker waiting for a proof), and cap how
    // many exchanges one principal may have in progress.
    (cfg.admit)(purpose, &who, ip).map_err(|r| named(GssError::Auth(r)))?;
    let _inflight = {
        let mut m = sh.inflight.lock().unwrap_or_else(PoisonError::into_inner);
        let n = m.entry(who.clone()).or_insert(0);
        if *n >= cfg.limits.per_principal {
            return Err(named(GssError::Busy(format!(
                "{who} already has {n} exchanges in progress; wait for them to finish"
            ))));
        }
        *n += 1;
        Inflight {
            sh,
            who: who.clone(),
        }
    };
    let t = Transcript {
        purpose,
        initiator: who.clone(),
        acceptor: canonical_principal(&cfg.principal).map_err(named)?,
        link_key,
        server_key: cfg.server_key,
        nonce,
    };
    let (claimed_s, pop, mic) = match read_msg_by(s, peer, deadline).map_err(named)? {
        Msg::Proof {
            lifetime_s,
            pop,
            mic,
        } => (lifetime_s, pop, mic),
        other => {
            return Err(named(GssError::Protocol(format!(
                "expected proof, got {}",
                other.kind()
            ))))
        }
    };
    ctx.verify_mic(&t.initiator(claimed_s), &mic).map_err(|e| {
        named(GssError::Auth(format!(
            "the initiator's proof over the transcript does not verify ({e}); tampered handshake"
        )))
    })?;
    if !crate::pop::verify(&cfg.server_secret, &link_key, &t.initiator(claimed_s), &pop) {
        return Err(named(GssError::Auth(
            "the initiator did not prove it holds the secret of the key it asked to bind; refused"
                .into(),
        )));
    }
    // MIT's acceptor lifetime includes the clock-skew allowance; the
    // initiator's (MIC-protected) ticket lifetime is exact, and can only
    // shorten the binding.
    let mut lifetime = ctx
        .lifetime()
        .map_err(named)?
        .min(Duration::from_secs(claimed_s.into()));
    if let Some(max) = cfg.max_lifetime {
        lifetime = lifetime.min(max);
    }
    if lifetime.is_zero() {
        return Err(named(GssError::Auth(
            "the initiator's ticket has expired; renew it (kinit) and retry".into(),
        )));
    }
    let lifetime_s = u32::try_from(lifetime.as_secs()).unwrap_or(u32::MAX);
    let key = curve_principal(&link_key);
    let now = Instant::now();
    let renewed = cfg
        .bindings
        .bind(&key, &who, purpose, now + lifetime, now)
        .map_err(|e| named(GssError::Auth(e.to_string())))?;
    let reply_mic = ctx.get_mic(&t.acceptor(lifetime_s)).map_err(named)?;
    write_by(
        s,
        deadline,
        &Msg::Bound {
            server_key: cfg.server_key,
            lifetime_s,
            mic: reply_mic,
        },
        peer,
    )
    .map_err(named)?;
    Ok((who, key, purpose, lifetime, renewed))
}
