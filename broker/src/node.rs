//! The broker's socket shell: sockets, one poll loop, one send path, and
//! nothing that decides.
//!
//! One thread owns every socket and polls them together: the ROUTER its
//! children connect to, the DEALER to its parent, the local connector's
//! listener and clients, the remote client ROUTER, libzmq monitors, the PMI
//! fd (to notice the launcher going away), a signal pipe, and the admission
//! worker's wake-up socket. What arrives is decoded and stamped with the
//! identity the transport authenticated (`ingress.rs`), and handed to
//! [`crate::core::BrokerCore`], which decides everything; the shell then
//! carries out the core's events and sends its transmits.

use crate::admission::Worker;
use crate::authz::{BrokerPolicy, Mech};
use crate::core::{BrokerCore, Event, Input, Transmit};
use crate::error::BrokerError;
use crate::ingress;
use crate::local::Local;
use crate::rekey::Rekey;
use crate::rotate::KeyFiles;
use canopy_modules::BrokerInfo;
use canopy_overlay::liveness::Timing;
use canopy_proto::Roles;
use canopy_security::CurveKeypair;
use canopy_zap::ZapHandle;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, error, info, warn};

pub use crate::admission::unix_principal;
pub use crate::core::Card;
pub use crate::sockets::{bind, Bound, Frame, Plan, Signals, Transport};
use crate::sockets::{
    close_monitored, disconnect_monitor, drain_monitor, drain_parent_monitor, parent_dealer,
    recv_parts, send, send_slice, zerr, zs,
};

/// Messages taken from one socket before the others get a turn.
const BATCH: usize = 256;
/// How long a cleanly stopping broker waits for its parent to acknowledge
/// its goodbye.
const GOODBYE_WAIT: Duration = Duration::from_secs(1);

pub struct Broker {
    core: BrokerCore<Frame>,
    start: Instant,
    ctx: zmq::Context,
    zap: ZapHandle,
    policy: Arc<BrokerPolicy>,
    worker: Worker,
    /// This rank's `exec.run` commands.
    runner: crate::exec::Runner,
    /// Commands to start once what the core sent is out.
    spawns: Vec<crate::core::exec::Spawn>,
    router: Option<zmq::Socket>,
    client_router: Option<zmq::Socket>,
    dealer: Option<zmq::Socket>,
    /// DISCONNECTED events of the router and the dealer.
    router_monitor: Option<zmq::Socket>,
    /// Announce a clean stop to the parent ([`Broker::with_clean_stop`]).
    clean_stop: bool,
    dealer_monitor: Option<zmq::Socket>,
    /// Failed handshakes on the remote client endpoint (logged only; drained
    /// on every turn of the loop, so it needs no poll item).
    client_monitor: Option<zmq::Socket>,
    local: Local,
    ipc_path: Option<PathBuf>,
    endpoint: Option<String>,
    keys: CurveKeypair,
    timing: Timing,
    /// Key rotation: certificate files, the staged key, a rebind.
    rekey: Rekey,
    pmi_fd: Option<OwnedFd>,
    signals: Signals,
    hdr: Vec<u8>,
    /// A fatal error met while carrying out the core's events.
    fatal: Option<BrokerError>,
}

impl Broker {
    /// Finish setting up from a bootstrap plan and the already bound sockets.
    pub fn new(
        mut plan: Plan,
        bound: Bound,
        pmi_fd: Option<OwnedFd>,
        signals: Signals,
    ) -> Result<Broker, BrokerError> {
        let Bound {
            ctx,
            zap,
            policy,
            router,
            endpoint,
            client_router,
            client_endpoint,
        } = bound;
        let mut seed = [0u8; 8];
        getrandom::getrandom(&mut seed).map_err(BrokerError::Random)?;
        let budgets = plan.budgets;
        let mut local = Local::bind(&plan.rundir.join(format!("local-{}", plan.rank)), budgets)?;
        local.set_owner(plan.owner_uid);
        let ipc_path = endpoint
            .as_deref()
            .and_then(|e| e.strip_prefix("ipc://"))
            .map(PathBuf::from);
        let info = BrokerInfo {
            instance: plan.instance.clone(),
            endpoint: endpoint.clone(),
            public_key: plan.keys.public_z85(),
            client_endpoint,
            local_uri: format!("local://{}", local.path.display()),
            pid: std::process::id(),
            host: plan.host.clone(),
            hosts: plan.hosts.clone(),
        };
        let worker = Worker::start(policy.clients.clone()).map_err(|source| BrokerError::Io {
            what: "start the admission worker",
            path: local.path.clone(),
            source,
        })?;
        let mech = match policy.gss.get() {
            Some(_) => Mech::Gssapi,
            None => Mech::Curve,
        };
        let core = BrokerCore::new(plan.core_config(info, mech, u64::from_be_bytes(seed)), 0);
        let runner = crate::exec::Runner::new(plan.rank, plan.exec, plan.instance, plan.host)
            .map_err(|source| BrokerError::Io {
                what: "start the exec runner",
                path: local.path.clone(),
                source,
            })?;
        let monitor = |s: &Option<zmq::Socket>| s.as_ref().map(|s| disconnect_monitor(&ctx, s));
        let router_monitor = monitor(&router).transpose()?;
        let client_monitor = monitor(&client_router).transpose()?;
        let mut b = Broker {
            core,
            start: Instant::now(),
            ctx,
            zap,
            policy,
            worker,
            runner,
            spawns: Vec::new(),
            router,
            client_router,
            dealer: None,
            router_monitor,
            clean_stop: false,
            dealer_monitor: None,
            client_monitor,
            local,
            ipc_path,
            endpoint,
            keys: plan.keys,
            timing: plan.timing,
            rekey: Rekey::default(),
            pmi_fd,
            signals,
            hdr: Vec::with_capacity(256),
            fatal: None,
        };
        b.pump()?;
        Ok(b)
    }

    /// Enable rotation (system instances): where the certificates are.
    /// Loads the neighbours' keys, current and next, and admits them.
    pub fn with_key_files(mut self, files: KeyFiles) -> Result<Broker, BrokerError> {
        let (rekey, ring) = Rekey::with_files(files)?;
        self.rekey = rekey;
        self.core.enable_key_files();
        let now = self.now_ms();
        self.core.handle(
            now,
            Input::KeysReloaded {
                req: None,
                result: Ok(ring),
            },
        );
        self.pump()?;
        Ok(self)
    }

    /// Launcher mode (an instance started by srun or mpiexec): see
    /// [`BrokerCore::enable_launcher_mode`].
    pub fn with_launcher_mode(mut self) -> Broker {
        self.core.enable_launcher_mode();
        self
    }

    /// A system instance's broker: on SIGTERM it tells its parent it is
    /// stopping (so the node shows `offline`, not `lost`) and waits up to
    /// `GOODBYE_WAIT` for the parent's answer. A personal instance's
    /// brokers all stop together, and stop at once.
    pub fn with_clean_stop(mut self) -> Broker {
        self.clean_stop = true;
        self
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Feed the core, and carry out at once what it wants: a message is
    /// sent as soon as it is routed, so the next broker starts on it while
    /// this one reads the rest of its batch. A fatal event is kept for the
    /// loop to return.
    fn input(&mut self, input: Input<Frame>) {
        let now = self.now_ms();
        self.core.handle(now, input);
        if let Err(e) = self.drain_core() {
            self.fatal.get_or_insert(e);
        }
    }

    /// Run until a signal, the launcher going away, or a fatal error.
    pub fn run(mut self) -> Result<(), BrokerError> {
        let result = self.event_loop();
        self.shutdown();
        result
    }

    fn shutdown(&mut self) {
        self.runner.kill_all();
        if let Some(p) = &self.ipc_path {
            let _ = std::fs::remove_file(p);
        }
        close_monitored(&mut self.router, &mut self.router_monitor);
        close_monitored(&mut self.dealer, &mut self.dealer_monitor);
        close_monitored(&mut self.client_router, &mut self.client_monitor);
    }

    fn event_loop(&mut self) -> Result<(), BrokerError> {
        loop {
            if !self.zap.alive() {
                error!("zap handler died: no connection can be authenticated, so this broker stops admitting anyone and exits");
                return Err(BrokerError::ZapDied);
            }
            if crate::gss::parent_key_changed(&self.policy) {
                self.input(Input::ParentKeyChanged);
            }
            // Expiry is revocation: a remote client whose binding ended is
            // cut before anything more is delivered to it.
            let (expired, next_expiry) = crate::gss::expired_remote(&self.policy);
            for (rid, reason) in expired {
                self.input(Input::RemoteExpired { rid, reason });
            }
            for (address, reason) in self.policy.take_refused_peers() {
                self.input(Input::PeerRefused { address, reason });
            }
            let now = self.now_ms();
            if now >= self.core.poll_timeout() {
                self.core.handle_timeout(now);
            }
            if let (Some(router), Some(ep)) = (&self.router, &self.endpoint) {
                self.rekey.retry_rebind(router, ep)?;
            }
            self.pump()?;
            let mut timeout = self
                .core
                .poll_timeout()
                .saturating_sub(self.now_ms())
                .clamp(1, 1000) as i64;
            if let Some(d) = next_expiry {
                timeout = timeout.min(d.as_millis() as i64 + 1);
            }
            if self.rekey.rebinding() {
                timeout = 2;
            }
            if let Some(d) = self.runner.expire() {
                timeout = timeout.min(d.as_millis() as i64 + 1);
            }
            let clients = self.local.fds();
            let pipes = self.runner.poll_fds();
            let revents: Vec<zmq::PollEvents>;
            {
                let fd = |f: Option<i32>| zmq::PollItem::from_fd(f.unwrap_or(-1), zmq::POLLIN);
                let mut items = vec![
                    fd(Some(self.signals.pipe.as_raw_fd())),
                    fd(self.pmi_fd.as_ref().map(|f| f.as_raw_fd())),
                    fd(Some(self.local.listener_fd())),
                    fd(Some(self.worker.wake.as_raw_fd())),
                    fd(Some(self.runner.wake.as_raw_fd())),
                    zs(&self.router),
                    zs(&self.dealer),
                    zs(&self.client_router),
                    zs(&self.router_monitor),
                    zs(&self.dealer_monitor),
                ];
                for (_, fd, read, write) in &clients {
                    let mut ev = zmq::PollEvents::empty();
                    if *read {
                        ev |= zmq::POLLIN;
                    }
                    if *write {
                        ev |= zmq::POLLOUT;
                    }
                    items.push(zmq::PollItem::from_fd(*fd, ev));
                }
                for (_, _, fd, write) in &pipes {
                    let ev = if *write { zmq::POLLOUT } else { zmq::POLLIN };
                    items.push(zmq::PollItem::from_fd(*fd, ev));
                }
                match zmq::poll(&mut items, timeout) {
                    Ok(_) => {}
                    Err(zmq::Error::EINTR) => continue,
                    Err(e) => return Err(zerr("poll")(e)),
                }
                revents = items.iter().map(|i| i.get_revents()).collect();
            }
            let readable = |i: usize| revents[i].bits() != 0;
            if readable(0) {
                let mut b = [0u8; 64];
                while matches!(self.signals.pipe.read(&mut b), Ok(n) if n > 0) {}
            }
            if self.signals.term.load(Ordering::SeqCst) {
                info!("received a termination signal; shutting down");
                // Tell the parent this is a clean stop (offline, not lost).
                if self.clean_stop {
                    self.input(Input::Stopping);
                    self.pump()?;
                    self.await_goodbye_ack()?;
                }
                return Ok(());
            }
            if self.signals.hup.swap(false, Ordering::SeqCst) {
                self.input(Input::Hangup);
            }
            if readable(1) {
                // The launcher never writes after the bootstrap: readable
                // means it closed its end, i.e. it went away.
                return Err(BrokerError::LauncherGone);
            }
            if readable(2) {
                let core = &mut self.core;
                for input in self.local.accept(|| core.new_client_id()) {
                    self.input(input);
                }
            }
            if readable(3) {
                let mut b = [0u8; 256];
                while matches!((&self.worker.wake).read(&mut b), Ok(n) if n > 0) {}
                while let Some(d) = self.worker.try_done() {
                    self.input(Input::Done(d));
                }
            }
            if readable(4) {
                self.runner.reap();
                self.exec_records();
            }
            if readable(5) {
                self.drain(Source::Child)?;
            }
            if readable(6) {
                self.drain(Source::Parent)?;
            }
            if readable(7) {
                self.drain(Source::Remote)?;
            }
            if self
                .client_monitor
                .as_ref()
                .is_some_and(|m| drain_monitor(m, "client"))
            {
                self.input(Input::RemoteClosed);
            }
            if readable(8)
                && self
                    .router_monitor
                    .as_ref()
                    .is_some_and(|m| drain_monitor(m, "overlay"))
            {
                // What a child sent before it closed (its goodbye) is in
                // the ROUTER's queue before the monitor says it closed, but
                // poll may not have shown it yet: take it first.
                self.drain(Source::Child)?;
                self.input(Input::ChildClosed);
            }
            if readable(9) {
                let seen = self
                    .dealer_monitor
                    .as_ref()
                    .map(drain_parent_monitor)
                    .unwrap_or_default();
                if let Some(why) = seen.refused {
                    self.input(Input::ParentRefused { reason: why.into() });
                } else if seen.closed {
                    // Likewise the parent's last words (a disconnect note).
                    self.drain(Source::Parent)?;
                    self.input(Input::ParentGone {
                        reason: "the connection to the parent closed".into(),
                    });
                }
            }
            for (i, (id, _, _, _)) in clients.iter().enumerate() {
                if revents[10 + i].intersects(zmq::POLLIN | zmq::POLLERR) {
                    for input in self.local.read(*id) {
                        self.input(input);
                    }
                }
            }
            let base = 10 + clients.len();
            for (i, (sid, pipe, _, _)) in pipes.iter().enumerate() {
                if revents[base + i].bits() != 0 {
                    self.runner.ready(*sid, *pipe);
                }
            }
            self.exec_records();
            self.pump()?;
        }
    }

    /// Hand the records this rank's commands produced to the core.
    fn exec_records(&mut self) {
        for (sid, record) in self.runner.drain() {
            self.input(Input::ExecRecord { sid, record });
        }
    }

    /// Carry out what the core wants: its events, then its transmits, until
    /// neither is left; then write what local clients have pending.
    fn pump(&mut self) -> Result<(), BrokerError> {
        // Records of exec.run sessions gathered this turn leave together.
        self.core.flush_exec();
        self.drain_core()?;
        for id in self.local.flush() {
            self.input(Input::ClientClosed { id });
        }
        match self.fatal.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The core's events, then its transmits, until neither is left.
    fn drain_core(&mut self) -> Result<(), BrokerError> {
        loop {
            let mut any = false;
            while let Some(ev) = self.core.poll_event() {
                any = true;
                self.apply(ev)?;
            }
            while let Some(t) = self.core.poll_transmit() {
                any = true;
                self.transmit(t);
            }
            // Commands start once their shares of an exec.run are on
            // their way to the neighbours: a spawn takes a while, and the
            // subtree should not wait for it.
            for spawn in std::mem::take(&mut self.spawns) {
                any = true;
                let sid = spawn.sid;
                if let Some(record) = self.runner.spawn(spawn) {
                    let now = self.now_ms();
                    self.core.handle(now, Input::ExecRecord { sid, record });
                }
            }
            if !any {
                return Ok(());
            }
        }
    }

    fn apply(&mut self, ev: Event) -> Result<(), BrokerError> {
        match ev {
            Event::ConnectParent {
                endpoint,
                server_key,
                identity,
                relink,
            } => self.connect_parent(&endpoint, server_key, &identity, relink)?,
            Event::ParentLost => {
                crate::gss::parent_lost(&self.policy);
                close_monitored(&mut self.dealer, &mut self.dealer_monitor);
            }
            Event::Close { id } => self.local.close(id),
            Event::Job(job) => self.worker.submit(job),
            Event::ReloadKeys { req } => {
                let result = self.rekey.reload();
                self.input(Input::KeysReloaded { req, result });
            }
            Event::LoadNextKey { req } => {
                let result = self.rekey.load_next();
                self.input(Input::NextKey { req, result });
            }
            Event::AdoptKey => self.rekey.adopt(&mut self.keys, self.router.is_some()),
            Event::AdmitPeers(entries) => {
                self.policy
                    .peers
                    .replace_all(entries.into_iter().map(|(p, n)| (p, n, Roles::PEER)));
            }
            Event::Rebind { since_switch_ms } => {
                if let (Some(router), Some(ep)) = (&self.router, &self.endpoint) {
                    self.rekey.start_rebind(router, ep, since_switch_ms)?;
                }
            }
            Event::ExecSpawn(spawn) => self.spawns.push(spawn),
            Event::ExecSignal { sid, sig } => self.runner.signal(sid, sig),
            Event::ExecStdin { sid, data } => self.runner.stdin(sid, data),
            // Records the runner made meanwhile are fed at the loop's next
            // turn (exec_records), never from inside the core's drain.
            Event::Exit(e) => return Err(e.into()),
        }
        Ok(())
    }

    fn transmit(&mut self, t: Transmit<Frame>) {
        enum To {
            Parent,
            Child,
            Remote,
        }
        let (to, rid, h, payload) = match t {
            Transmit::Parent(h, p) => (To::Parent, None, h, p),
            Transmit::Child(rid, h, p) => (To::Child, Some(rid), h, p),
            Transmit::Remote(rid, h, p) => (To::Remote, Some(rid), h, p),
            Transmit::Local(id, h, p) => return self.local.queue(id, &h, p.as_ref()),
            Transmit::Event {
                children,
                locals,
                header,
                payload,
            } => return self.multicast(&children, &locals, header, payload),
        };
        let sock = match to {
            To::Parent => &self.dealer,
            To::Child => &self.router,
            To::Remote => &self.client_router,
        };
        let Some(sock) = sock else {
            return;
        };
        self.hdr.clear();
        if let Err(e) = h.encode_into(&mut self.hdr) {
            warn!(topic = %h.topic, "cannot encode a message: {e}");
            return;
        }
        let Err(e) = send(sock, rid.as_deref(), &self.hdr, payload) else {
            return;
        };
        if e == zmq::Error::EAGAIN && !matches!(to, To::Remote) {
            // The neighbour's queue is at its high-water mark.
            return self.input(Input::SendFull { rid, header: h });
        }
        let input = match (to, rid) {
            (To::Child, Some(rid)) => Input::ChildGone { rid },
            (To::Remote, Some(rid)) => {
                debug!("remote: client gone ({e})");
                Input::RemoteGone { rid }
            }
            _ => Input::ParentGone {
                reason: format!("cannot send to the parent: {e}"),
            },
        };
        self.input(input);
    }

    /// One event to several children and local clients: the header is
    /// encoded once.
    fn multicast(
        &mut self,
        children: &[Vec<u8>],
        locals: &[u32],
        h: canopy_proto::Header,
        payload: Frame,
    ) {
        self.hdr.clear();
        if let Err(e) = h.encode_into(&mut self.hdr) {
            warn!(topic = %h.topic, "cannot encode a message: {e}");
            return;
        }
        for id in locals {
            self.local.queue_encoded(*id, &self.hdr, payload.as_ref());
        }
        let Some(sock) = &self.router else {
            return;
        };
        let mut failed = Vec::new();
        for rid in children {
            if let Err(e) = send_slice(sock, rid, &self.hdr, payload.as_ref()) {
                failed.push((rid.clone(), e));
            }
        }
        for (rid, e) in failed {
            let input = if e == zmq::Error::EAGAIN {
                Input::SendFull {
                    rid: Some(rid),
                    header: h.clone(),
                }
            } else {
                Input::ChildGone { rid }
            };
            self.input(input);
        }
    }

    fn connect_parent(
        &mut self,
        ep: &str,
        key: [u8; 32],
        id: &[u8],
        relink: bool,
    ) -> Result<(), BrokerError> {
        let key = match relink {
            true => key,
            false => crate::gss::parent_key(&self.policy).unwrap_or(key),
        };
        close_monitored(&mut self.dealer, &mut self.dealer_monitor);
        let max = self.local.budgets().max_message;
        let (s, m) = parent_dealer(
            &self.ctx,
            ep,
            &key,
            &self.keys,
            id,
            relink,
            &self.timing,
            max,
        )?;
        self.dealer = Some(s);
        self.dealer_monitor = Some(m);
        Ok(())
    }

    // ----- receiving -----

    /// Take up to `BATCH` messages from one socket to the core, each made
    /// an input by `ingress` (decoded and stamped with its identity).
    fn drain(&mut self, from: Source) -> Result<(), BrokerError> {
        for _ in 0..BATCH {
            let (sock, what) = match from {
                Source::Parent => (&self.dealer, "the parent"),
                Source::Child => (&self.router, "a child"),
                Source::Remote => (&self.client_router, "a remote client"),
            };
            let Some(sock) = sock else {
                return Ok(());
            };
            let Some((first, parts)) = recv_parts(sock, what)? else {
                return Ok(());
            };
            let input = match from {
                Source::Parent => ingress::from_parent(first, parts),
                Source::Child => ingress::from_child(&self.policy, first, parts),
                Source::Remote => ingress::from_remote(&self.policy, first, parts),
            };
            if let Some(input) = input {
                self.input(input);
            }
        }
        Ok(())
    }

    /// Wait, for at most `GOODBYE_WAIT`, until the parent acknowledges
    /// the goodbye. libzmq sends in the background and the process exits
    /// right after this, so without the answer the goodbye could still be
    /// in flight (and the parent would show this rank lost, not offline).
    fn await_goodbye_ack(&mut self) -> Result<(), BrokerError> {
        let deadline = Instant::now() + GOODBYE_WAIT;
        while self.core.awaiting_goodbye_ack() {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(dealer) = &self.dealer else {
                break;
            };
            if left.is_zero() {
                debug!("overlay: the parent did not acknowledge the goodbye in time");
                break;
            }
            let ready = dealer
                .poll(zmq::POLLIN, left.as_millis().max(1) as i64)
                .map_err(zerr("poll the parent link"))?;
            if ready > 0 {
                self.drain(Source::Parent)?;
                self.pump()?;
            }
        }
        Ok(())
    }
}

/// The socket a message is taken from.
#[derive(Clone, Copy)]
enum Source {
    Parent,
    Child,
    Remote,
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.shutdown();
    }
}
