//! The ZAP handler thread.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use canopy_proto::MAX_USERID;
use tracing::{error, info, warn};

use crate::codec::{parse_request, ZapReply, LINK_KEY_PROPERTY, ROLES_PROPERTY, SCOPE_PROPERTY};
use crate::policy::{AuthRequest, Decision, Policy};
use crate::ZapError;

/// Where libzmq looks for the ZAP handler, in the socket's own Context.
pub const ZAP_ENDPOINT: &str = "inproc://zeromq.zap.01";

static CONTROL_SEQ: AtomicU64 = AtomicU64::new(0);

/// Starts ZAP handlers. See [`ZapHandler::start`].
#[derive(Debug)]
pub struct ZapHandler;

/// Counters of the handler's verdicts since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZapStats {
    /// Requests answered 200.
    pub allowed: u64,
    /// Requests the policy denied (answered 400), plus every request
    /// refused after the policy panicked (answered 500).
    pub denied: u64,
    /// Requests that failed to parse (answered 400 or 500).
    pub malformed: u64,
}

#[derive(Default)]
struct Counters {
    allowed: AtomicU64,
    denied: AtomicU64,
    malformed: AtomicU64,
}

/// Clears the alive flag when the handler thread ends, however it ends.
struct AliveGuard(Arc<AtomicBool>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// Reports whether a handler is still alive; see [`ZapHandle::watch`].
#[derive(Clone, Debug)]
pub struct ZapWatch(Arc<AtomicBool>);

impl ZapWatch {
    /// Same as [`ZapHandle::alive`]; false forever once the handler stopped.
    pub fn alive(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// A running handler. Stops (and joins the thread) on [`ZapHandle::stop`] or
/// on drop.
pub struct ZapHandle {
    control: Mutex<zmq::Socket>,
    thread: Option<JoinHandle<()>>,
    alive: Arc<AtomicBool>,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for ZapHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZapHandle")
            .field("alive", &self.alive())
            .field("stats", &self.stats())
            .finish()
    }
}

fn sock_err(op: &'static str) -> impl FnOnce(zmq::Error) -> ZapError {
    move |source| ZapError::Socket { op, source }
}

impl ZapHandler {
    /// Bind a REP socket at [`ZAP_ENDPOINT`] in `ctx`, in the caller's
    /// thread, then serve it on a new thread named `canopy-zap`.
    ///
    /// When this returns `Ok`, the handler is bound: server sockets created
    /// afterwards in `ctx` will consult it. Fails if libzmq lacks CURVE, or
    /// if a handler is already bound in `ctx`.
    ///
    /// The handler thread logs through the `tracing` dispatcher that is the
    /// default in the calling thread.
    pub fn start(ctx: &zmq::Context, policy: Arc<dyn Policy>) -> Result<ZapHandle, ZapError> {
        crate::require_curve()?;
        let rep = ctx
            .socket(zmq::REP)
            .map_err(sock_err("create the zap socket"))?;
        rep.set_linger(0)
            .map_err(sock_err("set linger on the zap socket"))?;
        rep.bind(ZAP_ENDPOINT).map_err(|source| ZapError::Bind {
            endpoint: ZAP_ENDPOINT,
            source,
        })?;

        let control_ep = format!(
            "inproc://canopy-zap-control-{}-{}",
            std::process::id(),
            CONTROL_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let inner = ctx
            .socket(zmq::PAIR)
            .map_err(sock_err("create the control socket"))?;
        inner
            .set_linger(0)
            .map_err(sock_err("set linger on the control socket"))?;
        inner
            .bind(&control_ep)
            .map_err(sock_err("bind the control socket"))?;
        let outer = ctx
            .socket(zmq::PAIR)
            .map_err(sock_err("create the control socket"))?;
        outer
            .set_linger(0)
            .map_err(sock_err("set linger on the control socket"))?;
        outer
            .connect(&control_ep)
            .map_err(sock_err("connect the control socket"))?;

        let alive = Arc::new(AtomicBool::new(true));
        let counters = Arc::new(Counters::default());
        let dispatch = tracing::dispatcher::get_default(|d| d.clone());
        let thread = {
            let guard = AliveGuard(alive.clone());
            let counters = counters.clone();
            let alive = alive.clone();
            std::thread::Builder::new()
                .name("canopy-zap".to_owned())
                .spawn(move || {
                    let _guard = guard;
                    tracing::dispatcher::with_default(&dispatch, || {
                        serve(rep, inner, policy.as_ref(), &counters, &alive)
                    });
                })
                // The closure (and so the guard) is dropped on failure.
                .map_err(ZapError::Spawn)?
        };
        Ok(ZapHandle {
            control: Mutex::new(outer),
            thread: Some(thread),
            alive,
            counters,
        })
    }
}

impl ZapHandle {
    /// Is the handler serving requests? libzmq admits every peer when no
    /// handler is bound, so treat `false` as fatal: stop accepting peers.
    /// It is false after [`ZapHandle::stop`], after the thread ended for any
    /// reason (including a panic), and after a policy panicked (the handler
    /// then refuses every request until stopped).
    pub fn alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    /// A cheap, clonable view of [`ZapHandle::alive`] for other threads,
    /// which stays valid after the handle is stopped or dropped.
    pub fn watch(&self) -> ZapWatch {
        ZapWatch(self.alive.clone())
    }

    pub fn stats(&self) -> ZapStats {
        ZapStats {
            allowed: self.counters.allowed.load(Ordering::Relaxed),
            denied: self.counters.denied.load(Ordering::Relaxed),
            malformed: self.counters.malformed.load(Ordering::Relaxed),
        }
    }

    /// Signal the thread to stop and wait for it. Its sockets are closed
    /// with linger 0, so the Context can be dropped afterwards. libzmq
    /// releases the inproc endpoint asynchronously, so a new
    /// [`ZapHandler::start`] on the same Context right after may briefly fail
    /// with [`ZapError::Bind`]; retry it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        {
            let control = self.control.lock().unwrap_or_else(PoisonError::into_inner);
            // Fails only if the thread is already gone; joining is enough then.
            let _ = control.send("stop", zmq::DONTWAIT);
        }
        if thread.join().is_err() {
            error!("zap: handler thread had panicked");
        }
    }
}

impl Drop for ZapHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn serve(
    rep: zmq::Socket,
    control: zmq::Socket,
    policy: &dyn Policy,
    counters: &Counters,
    alive: &AtomicBool,
) {
    let mut poisoned = false;
    loop {
        let (rep_ready, stop) = {
            let mut items = [
                rep.as_poll_item(zmq::POLLIN),
                control.as_poll_item(zmq::POLLIN),
            ];
            match zmq::poll(&mut items, -1) {
                Ok(_) => {}
                Err(zmq::Error::EINTR) => continue,
                Err(e) => {
                    error!(error = %e, "zap: poll failed, handler stopping; peers will be admitted unchecked");
                    return;
                }
            }
            (items[0].is_readable(), items[1].is_readable())
        };
        if stop {
            return;
        }
        if !rep_ready {
            continue;
        }
        let frames = match rep.recv_multipart(zmq::DONTWAIT) {
            Ok(f) => f,
            Err(zmq::Error::EAGAIN) | Err(zmq::Error::EINTR) => continue,
            Err(e) => {
                error!(error = %e, "zap: receive failed, handler stopping; peers will be admitted unchecked");
                return;
            }
        };
        let reply = answer(&frames, policy, counters, &mut poisoned);
        if poisoned {
            alive.store(false, Ordering::SeqCst);
        }
        if let Err(e) = rep.send_multipart(reply.encode(), 0) {
            // The requesting session has gone; nothing to admit.
            warn!(error = %e, "zap: could not send reply");
        }
    }
}

/// Build the reply to one request, logging one line per verdict.
fn answer(
    frames: &[Vec<u8>],
    policy: &dyn Policy,
    counters: &Counters,
    poisoned: &mut bool,
) -> ZapReply {
    let req = match parse_request(frames) {
        Ok(req) => req,
        Err(ZapError::BadRequest {
            status_code,
            request_id,
            reason,
        }) => {
            counters.malformed.fetch_add(1, Ordering::Relaxed);
            // A REP socket must answer every request, so one without a
            // request id still gets a 500 (libzmq rejects its empty id).
            warn!(verdict = %"error", status = status_code, reason = ?reason, "zap: malformed request");
            let id = request_id.unwrap_or_default();
            return if status_code == 400 {
                ZapReply::deny(id, reason)
            } else {
                ZapReply::error(id, reason)
            };
        }
        Err(e) => {
            counters.malformed.fetch_add(1, Ordering::Relaxed);
            warn!(verdict = %"error", reason = %e, "zap: malformed request");
            return ZapReply::error(Vec::new(), "malformed request");
        }
    };
    let principal = req.principal().unwrap_or_default();
    let shown = if principal.is_empty() {
        "-"
    } else {
        principal.as_str()
    };
    let ask = AuthRequest {
        mechanism: req.mechanism,
        principal: &principal,
        address: &req.address,
        domain: &req.domain,
    };

    let decision = if *poisoned {
        None
    } else {
        match catch_unwind(AssertUnwindSafe(|| policy.decide(&ask))) {
            Ok(d) => Some(d),
            Err(_) => {
                *poisoned = true;
                error!(
                    principal = %shown,
                    "zap: policy panicked; refusing every peer from now on. Restart the broker"
                );
                None
            }
        }
    };

    let deny = |status: u16, reason: &str| {
        counters.denied.fetch_add(1, Ordering::Relaxed);
        warn!(
            verdict = %"deny",
            principal = %shown,
            address = %req.address,
            mechanism = %req.mechanism,
            reason = ?reason,
            domain = %req.domain,
            "zap:"
        );
        if status == 400 {
            ZapReply::deny(req.request_id.clone(), reason)
        } else {
            ZapReply::error(req.request_id.clone(), reason)
        }
    };

    let allow = |user_id: String, grant: canopy_proto::Grant, reason: String| {
        let scope = if grant.is_plain() {
            String::new()
        } else {
            grant.encode_scope()
        };
        // libzmq hands User-Id to applications as a C string: an empty,
        // NUL-bearing or oversized id would be misread downstream.
        if user_id.is_empty() || user_id.len() > MAX_USERID || user_id.chars().any(char::is_control)
        {
            return deny(500, "policy returned an unusable user id");
        }
        counters.allowed.fetch_add(1, Ordering::Relaxed);
        info!(
            verdict = %"allow",
            principal = %shown,
            address = %req.address,
            mechanism = %req.mechanism,
            reason = ?reason,
            domain = %req.domain,
            user_id = %user_id,
            roles = %grant.roles,
            scope = %scope,
            "zap:"
        );
        let mut meta = vec![(
            ROLES_PROPERTY.to_owned(),
            grant.roles.to_string().into_bytes(),
        )];
        if !grant.is_plain() {
            meta.push((SCOPE_PROPERTY.to_owned(), scope.into_bytes()));
        }
        // The CURVE key itself, so the application can re-check a
        // key-based grant (e.g. a Kerberos binding) on every message.
        if req.mechanism == crate::codec::Mechanism::Curve && !principal.is_empty() {
            meta.push((LINK_KEY_PROPERTY.to_owned(), principal.clone().into_bytes()));
        }
        ZapReply::allow(req.request_id.clone(), user_id, meta)
    };

    match decision {
        None => deny(500, "zap handler failed"),
        Some(Decision::Deny { reason }) => deny(400, &reason),
        Some(Decision::Allow {
            user_id,
            roles,
            reason,
        }) => allow(user_id, canopy_proto::Grant::plain(roles), reason),
        Some(Decision::AllowScoped {
            user_id,
            grant,
            reason,
        }) => allow(user_id, grant, reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alive_guard_clears_flag_when_thread_panics() {
        let flag = Arc::new(AtomicBool::new(true));
        let guard = AliveGuard(flag.clone());
        let t = std::thread::spawn(move || {
            let _g = guard;
            panic!("boom");
        });
        assert!(t.join().is_err());
        assert!(!flag.load(Ordering::SeqCst));
    }
}
