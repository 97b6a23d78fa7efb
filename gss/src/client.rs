//! The initiator's side of the key exchange.

use crate::krb::{check_flags, initiator_cred, Initiator};
use crate::wire::{Msg, Purpose, Transcript};
use crate::{canonical_principal, GssError};
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// Most GSS rounds accepted before the context must be complete (Kerberos
/// needs one).
pub const MAX_ROUNDS: usize = 4;

/// What the initiator needs.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Our principal; `None` takes the default one of the credential cache
    /// or client keytab.
    pub principal: Option<String>,
    /// The acceptor's principal (`service/host@REALM` or `name@REALM`).
    pub target: String,
    pub purpose: Purpose,
    /// If set, the server key the acceptor vouches for must be this one.
    pub expect_server_key: Option<[u8; 32]>,
    /// Connect, read and write timeout.
    pub timeout: Duration,
    /// Longest wait for the KDC (getting tickets), see
    /// [`crate::krb::kdc_timeout`].
    pub kdc_timeout: Duration,
}

/// The outcome of a successful exchange.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bound {
    /// Our canonical principal, as bound.
    pub principal: String,
    /// The acceptor's canonical principal, mutually authenticated.
    pub acceptor: String,
    /// The CURVE server key the acceptor vouched for.
    pub server_key: [u8; 32],
    /// How long the binding lasts from now.
    pub lifetime: Duration,
    /// How long the exchange took.
    pub took: Duration,
}

pub(crate) fn write_msg(s: &mut TcpStream, m: &Msg, peer: &str) -> Result<(), GssError> {
    let f = m.encode()?;
    s.write_all(&f).map_err(|source| GssError::Io {
        peer: peer.to_string(),
        source,
    })
}

pub(crate) fn read_msg(s: &mut TcpStream, peer: &str) -> Result<Msg, GssError> {
    read_msg_by(s, peer, Instant::now() + Duration::from_secs(3600))
}

/// Read one message, all of it before `deadline` (a peer trickling bytes
/// cannot hold a connection longer).
pub(crate) fn read_msg_by(
    s: &mut TcpStream,
    peer: &str,
    deadline: Instant,
) -> Result<Msg, GssError> {
    let io = |source| GssError::Io {
        peer: peer.to_string(),
        source,
    };
    let mut h = [0u8; 4];
    read_by(s, &mut h, deadline).map_err(io)?;
    let n = Msg::frame_len(h)?;
    let mut body = vec![0u8; n];
    read_by(s, &mut body, deadline).map_err(io)?;
    Msg::decode(&body)
}

fn read_by(s: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> std::io::Result<()> {
    let mut at = 0;
    let base = s.read_timeout()?;
    while at < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the exchange took too long",
            ));
        }
        let t = base.map_or(left, |b| b.min(left));
        s.set_read_timeout(Some(t))?;
        match s.read(&mut buf[at..]) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => at += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                let why = if Instant::now() >= deadline {
                    "the exchange took too long".to_string()
                } else {
                    format!("the peer sent nothing for {:.1}s", t.as_secs_f64())
                };
                return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, why));
            }
            Err(e) => return Err(e),
        }
    }
    s.set_read_timeout(base)?;
    Ok(())
}

fn refused(peer: &str, m: Msg, expected: &str) -> GssError {
    match m {
        Msg::Refused { reason } => GssError::Refused {
            peer: peer.to_string(),
            reason,
        },
        other => GssError::Protocol(format!("expected {expected}, got {}", other.kind())),
    }
}

/// [`handshake`], retried with a short, growing pause while the acceptor
/// answers that it is busy (at most `tries` attempts).
pub fn handshake_retrying_busy(
    addr: &str,
    cfg: &ClientConfig,
    link: &canopy_security::CurveKeypair,
    tries: u32,
) -> Result<Bound, GssError> {
    let mut pause = Duration::from_millis(20);
    let mut left = tries.max(1);
    loop {
        left -= 1;
        match handshake(addr, cfg, link) {
            Err(e) if e.is_busy() && left > 0 => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(500));
            }
            r => return r,
        }
    }
}

/// Run the exchange with the acceptor at `addr`, binding `link`'s public
/// key (proving we hold its secret; our
/// fresh CURVE public key) to our principal. Credentials are acquired
/// before connecting, so a missing credential fails at once.
pub fn handshake(
    addr: &str,
    cfg: &ClientConfig,
    link: &canopy_security::CurveKeypair,
) -> Result<Bound, GssError> {
    let link_key = link.public();
    let start = Instant::now();
    let acceptor = canonical_principal(&cfg.target)?;
    // Both steps may reach the KDC (a ticket-granting ticket from the
    // client keytab, then a service ticket): bounded, so a hung KDC fails
    // this exchange in `kdc_timeout`.
    let (principal, target, acc) = (cfg.principal.clone(), cfg.target.clone(), acceptor.clone());
    let who = cfg
        .principal
        .clone()
        .unwrap_or_else(|| "the default principal".into());
    let (mut ctx, me, first) = crate::krb::with_kdc_deadline(cfg.kdc_timeout, who, move || {
        let (cred, me) = initiator_cred(principal.as_deref())?;
        let mut ctx = Initiator::new(cred, &target)?;
        let first = ctx.step(None).map_err(|e| match e {
            GssError::Gss { detail, .. } => GssError::Credentials(format!(
                "cannot get a Kerberos ticket for {acc} as {me}: {detail}; check that the KDC is reachable (KRB5_CONFIG) and that {acc} exists"
            )),
            e => e,
        })?;
        Ok((ctx, me, first))
    })?;
    let first = first.ok_or_else(|| GssError::Protocol("gss produced no initial token".into()))?;

    let sa = addr
        .to_socket_addrs()
        .map_err(|source| GssError::Io {
            peer: addr.to_string(),
            source,
        })?
        .next()
        .ok_or_else(|| GssError::Io {
            peer: addr.to_string(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no address"),
        })?;
    let mut s = TcpStream::connect_timeout(&sa, cfg.timeout).map_err(|source| GssError::Io {
        peer: addr.to_string(),
        source,
    })?;
    let io = |source| GssError::Io {
        peer: addr.to_string(),
        source,
    };
    s.set_read_timeout(Some(cfg.timeout)).map_err(io)?;
    s.set_write_timeout(Some(cfg.timeout)).map_err(io)?;
    s.set_nodelay(true).ok();

    write_msg(
        &mut s,
        &Msg::Hello {
            purpose: cfg.purpose,
            link_key: *link_key,
            token: first,
        },
        addr,
    )?;
    let mut nonce = None;
    let mut announced: Option<[u8; 32]> = None;
    for _ in 0..MAX_ROUNDS {
        match read_msg(&mut s, addr)? {
            Msg::Challenge {
                nonce: n,
                server_key: sk,
                complete,
                token,
            } => {
                if *nonce.get_or_insert(n) != n || *announced.get_or_insert(sk) != sk {
                    return Err(GssError::Protocol(
                        "the acceptor changed its nonce or server key".into(),
                    ));
                }
                let out = if token.is_empty() && ctx.is_complete() {
                    None
                } else {
                    ctx.step(Some(&token))?
                };
                match out {
                    Some(t) => write_msg(&mut s, &Msg::Token { token: t }, addr)?,
                    None if ctx.is_complete() && complete => break,
                    None => {
                        return Err(GssError::Protocol(
                            "the contexts disagree on completion".into(),
                        ))
                    }
                }
            }
            other => return Err(refused(addr, other, "challenge")),
        }
    }
    if !ctx.is_complete() {
        return Err(GssError::Protocol(format!(
            "no complete context after {MAX_ROUNDS} rounds"
        )));
    }
    check_flags(ctx.flags()?)?;
    let nonce = nonce.ok_or_else(|| GssError::Protocol("no nonce".into()))?;
    let server_key = announced.ok_or_else(|| GssError::Protocol("no server key".into()))?;
    if let Some(want) = cfg.expect_server_key {
        if want != server_key {
            return Err(GssError::Auth(format!(
                "{acceptor} announced a CURVE server key other than the one this link expects; refusing to connect"
            )));
        }
    }
    let t = Transcript {
        purpose: cfg.purpose,
        initiator: me.clone(),
        acceptor: acceptor.clone(),
        link_key: *link_key,
        server_key,
        nonce,
    };
    let lifetime_s = u32::try_from(ctx.lifetime()?.as_secs()).unwrap_or(u32::MAX);
    let mic = ctx.get_mic(&t.initiator(lifetime_s))?;
    let pop = crate::pop::prove(link.secret(), &server_key, &t.initiator(lifetime_s)).ok_or_else(
        || GssError::Auth("the acceptor's CURVE server key is a low-order point; refusing".into()),
    )?;
    write_msg(
        &mut s,
        &Msg::Proof {
            lifetime_s,
            pop,
            mic,
        },
        addr,
    )?;
    match read_msg(&mut s, addr)? {
        Msg::Bound {
            server_key: bound_key,
            lifetime_s,
            mic,
        } => {
            if bound_key != server_key {
                return Err(GssError::Auth(
                    "the acceptor vouched for a server key other than the one it announced".into(),
                ));
            }
            ctx.verify_mic(&t.acceptor(lifetime_s), &mic)
                .map_err(|e| {
                    GssError::Auth(format!(
                        "the acceptor's proof does not verify ({e}); the server key may have been tampered with"
                    ))
                })?;
            Ok(Bound {
                principal: me,
                acceptor,
                server_key,
                lifetime: Duration::from_secs(lifetime_s.into()),
                took: start.elapsed(),
            })
        }
        other => Err(refused(addr, other, "bound")),
    }
}
