//! The acceptor: a TCP listener on its own threads. Kerberos calls (which
//! may read a keytab, a replay cache or reach a KDC) happen here and never
//! on a thread that routes messages.

use crate::bindings::Bindings;
use crate::client::{read_msg_by, write_msg, MAX_ROUNDS};
use crate::krb::{acceptor_cred, check_flags, Acceptor};
use crate::wire::{Msg, Purpose, Transcript, NONCE_LEN};
use crate::{canonical_principal, GssError};
use canopy_security::curve_principal;
use libgssapi::credential::Cred;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Decides whether an authenticated principal may bind a key for a purpose.
pub type Admit = dyn Fn(Purpose, &str) -> Result<(), String> + Send + Sync;

/// Most exchanges served at once; more wait in the listen backlog.
pub const MAX_CONCURRENT: usize = 32;

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
    pub admit: Arc<Admit>,
    /// Cap on a binding's lifetime (the ticket's end is used if earlier).
    pub max_lifetime: Option<Duration>,
    /// Read/write timeout per message.
    pub timeout: Duration,
}

/// A running acceptor. Dropping it stops accepting.
pub struct KexServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl KexServer {
    /// Acquire the acceptor credentials (fails at once if the keytab lacks
    /// the key) and serve exchanges on `listener` on a new thread.
    pub fn start(listener: TcpListener, cfg: ServerConfig) -> Result<KexServer, GssError> {
        canonical_principal(&cfg.principal)?;
        let cred = acceptor_cred(&cfg.principal)?;
        let addr = listener.local_addr().map_err(|source| GssError::Io {
            peer: "listener".into(),
            source,
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("canopy-gss-kex".into())
            .spawn(move || serve(listener, cfg, cred, stop2))
            .map_err(|source| GssError::Io {
                peer: "thread".into(),
                source,
            })?;
        Ok(KexServer {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for KexServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(listener: TcpListener, cfg: ServerConfig, cred: Cred, stop: Arc<AtomicBool>) {
    let busy = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let s = match conn {
            Ok(s) => s,
            Err(e) => {
                warn!("gss: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if busy.load(Ordering::SeqCst) >= MAX_CONCURRENT {
            warn!("gss: verdict=deny reason=\"{MAX_CONCURRENT} exchanges already in progress\"; closed a connection");
            continue;
        }
        busy.fetch_add(1, Ordering::SeqCst);
        let (cfg, cred, busy2) = (cfg.clone(), cred.clone(), busy.clone());
        let spawned = std::thread::Builder::new()
            .name("canopy-gss-conn".into())
            .spawn(move || {
                exchange(s, &cfg, cred);
                busy2.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            busy.fetch_sub(1, Ordering::SeqCst);
            warn!("gss: cannot start a thread for an exchange; closed a connection");
        }
    }
}

fn exchange(mut s: TcpStream, cfg: &ServerConfig, cred: Cred) {
    let peer = s
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into());
    let _ = s.set_read_timeout(Some(cfg.timeout));
    let _ = s.set_write_timeout(Some(cfg.timeout));
    let _ = s.set_nodelay(true);
    let start = Instant::now();
    match run(&mut s, &peer, cfg, cred) {
        Ok((principal, key, purpose, lifetime, renewed)) => info!(
            "gss: verdict=allow principal={principal} key={key} purpose={} address={peer} lifetime={}s {} took={:.1}ms",
            purpose.as_str(),
            lifetime.as_secs(),
            if renewed { "renewed" } else { "bound" },
            start.elapsed().as_secs_f64() * 1e3
        ),
        Err((who, e)) => {
            warn!(
                "gss: verdict=deny principal={} address={peer} reason=\"{}\"",
                who.as_deref().unwrap_or("-"),
                crate::krb::clean(&e.to_string())
            );
            let reason = match &e {
                // Tell the peer why, unless it is about our own setup.
                GssError::Io { .. } => return,
                other => crate::krb::clean(&other.to_string()),
            };
            let _ = write_msg(&mut s, &Msg::Refused { reason }, &peer);
        }
    }
}

type Ok5 = (String, String, Purpose, Duration, bool);

fn run(
    s: &mut TcpStream,
    peer: &str,
    cfg: &ServerConfig,
    cred: Cred,
) -> Result<Ok5, (Option<String>, GssError)> {
    // The whole exchange, however the peer paces its bytes.
    let deadline = Instant::now() + cfg.timeout * 3;
    let anon = |e| (None, e);
    let (purpose, link_key, token) = match read_msg_by(s, peer, deadline).map_err(anon)? {
        Msg::Hello {
            purpose,
            link_key,
            token,
        } => (purpose, link_key, token),
        other => {
            return Err((
                None,
                GssError::Protocol(format!("expected hello, got {}", other.kind())),
            ))
        }
    };
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::getrandom(&mut nonce).map_err(|e| {
        (
            None,
            GssError::Protocol(format!("no randomness for a nonce: {e}")),
        )
    })?;
    let mut ctx = Acceptor::new(cred);
    let mut token = token;
    let mut rounds = 0;
    loop {
        rounds += 1;
        let out = ctx.step(&token).map_err(anon)?;
        let complete = ctx.is_complete();
        write_msg(
            s,
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
    (cfg.admit)(purpose, &who).map_err(|r| named(GssError::Auth(r)))?;
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
    write_msg(
        s,
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
