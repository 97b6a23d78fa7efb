//! The key-exchange messages: a pure, I/O-free codec and the transcript
//! that both MICs cover.
//!
//! Every message is one frame: a 4-byte big-endian body length (at most
//! [`MAX_FRAME`]), then the body: version byte [`VERSION`], type byte, and
//! the fields of that type. Variable fields are a 2-byte big-endian length
//! and the bytes. Decoding hostile bytes returns an error, never panics, and
//! never allocates more than the frame limit.

use crate::GssError;

/// Protocol version byte; anything else is refused (there is no downgrade).
pub const VERSION: u8 = 1;
/// Largest frame body accepted or sent, in bytes.
pub const MAX_FRAME: usize = 64 * 1024;
/// Domain-separation label at the start of every transcript.
pub const LABEL: &[u8] = b"canopy-gss-v1";
/// Nonce length, bytes.
pub const NONCE_LEN: usize = 32;

/// What the initiator wants its key bound for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Purpose {
    /// A child broker's overlay link to its parent.
    Overlay,
    /// A client connection to the remote client endpoint.
    Client,
}

impl Purpose {
    fn byte(self) -> u8 {
        match self {
            Purpose::Overlay => 1,
            Purpose::Client => 2,
        }
    }
    fn from_byte(b: u8) -> Option<Purpose> {
        match b {
            1 => Some(Purpose::Overlay),
            2 => Some(Purpose::Client),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::Overlay => "overlay",
            Purpose::Client => "client",
        }
    }
}

/// One key-exchange message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Msg {
    /// Initiator → acceptor: purpose, the link's CURVE public key, the
    /// first GSS token.
    Hello {
        purpose: Purpose,
        link_key: [u8; 32],
        token: Vec<u8>,
    },
    /// Acceptor → initiator: the fresh nonce and the acceptor's CURVE
    /// server key (both the same in every Challenge), the acceptor's GSS
    /// token (may be empty when its context is complete and it has nothing
    /// to say), and whether its context is complete.
    Challenge {
        nonce: [u8; NONCE_LEN],
        server_key: [u8; 32],
        complete: bool,
        token: Vec<u8>,
    },
    /// Initiator → acceptor: a further GSS token (multi-round mechanisms).
    Token { token: Vec<u8> },
    /// Initiator → acceptor: the remaining lifetime of its ticket in
    /// seconds (the acceptor binds for no longer than this or its own
    /// context's lifetime) and a MIC over [`Transcript::initiator`].
    /// `pop` proves the initiator holds the link key's secret
    /// ([`crate::pop`]).
    Proof {
        lifetime_s: u32,
        pop: [u8; 32],
        mic: Vec<u8>,
    },
    /// Acceptor → initiator: the acceptor's CURVE server key, the binding's
    /// lifetime in seconds, and a MIC over [`Transcript::acceptor`].
    Bound {
        server_key: [u8; 32],
        lifetime_s: u32,
        mic: Vec<u8>,
    },
    /// Either side: refused, with a reason for the log.
    Refused { reason: String },
}

const T_HELLO: u8 = 1;
const T_CHALLENGE: u8 = 2;
const T_TOKEN: u8 = 3;
const T_PROOF: u8 = 4;
const T_BOUND: u8 = 5;
const T_REFUSED: u8 = 6;

fn put_var(out: &mut Vec<u8>, b: &[u8]) -> Result<(), GssError> {
    let n = u16::try_from(b.len()).map_err(|_| {
        GssError::Protocol(format!(
            "a field of {} bytes is longer than 65535; this token is too large for canopy-gss-v1",
            b.len()
        ))
    })?;
    out.extend_from_slice(&n.to_be_bytes());
    out.extend_from_slice(b);
    Ok(())
}

impl Msg {
    /// Encode as a whole frame (length prefix included).
    pub fn encode(&self) -> Result<Vec<u8>, GssError> {
        let mut b = vec![0, 0, 0, 0, VERSION];
        match self {
            Msg::Hello {
                purpose,
                link_key,
                token,
            } => {
                b.push(T_HELLO);
                b.push(purpose.byte());
                b.extend_from_slice(link_key);
                put_var(&mut b, token)?;
            }
            Msg::Challenge {
                nonce,
                server_key,
                complete,
                token,
            } => {
                b.push(T_CHALLENGE);
                b.extend_from_slice(nonce);
                b.extend_from_slice(server_key);
                b.push(u8::from(*complete));
                put_var(&mut b, token)?;
            }
            Msg::Token { token } => {
                b.push(T_TOKEN);
                put_var(&mut b, token)?;
            }
            Msg::Proof {
                lifetime_s,
                pop,
                mic,
            } => {
                b.push(T_PROOF);
                b.extend_from_slice(&lifetime_s.to_be_bytes());
                b.extend_from_slice(pop);
                put_var(&mut b, mic)?;
            }
            Msg::Bound {
                server_key,
                lifetime_s,
                mic,
            } => {
                b.push(T_BOUND);
                b.extend_from_slice(server_key);
                b.extend_from_slice(&lifetime_s.to_be_bytes());
                put_var(&mut b, mic)?;
            }
            Msg::Refused { reason } => {
                b.push(T_REFUSED);
                let r: String = reason.chars().take(1000).collect();
                put_var(&mut b, r.as_bytes())?;
            }
        }
        let body = b.len() - 4;
        if body > MAX_FRAME {
            return Err(GssError::Protocol(format!(
                "message of {body} bytes exceeds the {MAX_FRAME}-byte limit"
            )));
        }
        b[..4].copy_from_slice(&(body as u32).to_be_bytes());
        Ok(b)
    }

    /// The body length announced by a 4-byte frame header, checked against
    /// the limit.
    pub fn frame_len(header: [u8; 4]) -> Result<usize, GssError> {
        let n = u32::from_be_bytes(header) as usize;
        if n == 0 || n > MAX_FRAME {
            return Err(GssError::Protocol(format!(
                "frame length {n} is outside 1..={MAX_FRAME}; the peer does not speak canopy-gss-v1"
            )));
        }
        Ok(n)
    }

    /// Decode one frame body (without the length prefix).
    pub fn decode(body: &[u8]) -> Result<Msg, GssError> {
        let mut r = Reader { b: body, at: 0 };
        let v = r.u8()?;
        if v != VERSION {
            return Err(GssError::Protocol(format!(
                "version {v} is not supported (this side speaks only version {VERSION}); upgrade both sides"
            )));
        }
        let msg = match r.u8()? {
            T_HELLO => {
                let p = r.u8()?;
                let purpose = Purpose::from_byte(p)
                    .ok_or_else(|| GssError::Protocol(format!("unknown purpose {p}")))?;
                Msg::Hello {
                    purpose,
                    link_key: r.array()?,
                    token: r.var()?,
                }
            }
            T_CHALLENGE => Msg::Challenge {
                nonce: r.array()?,
                server_key: r.array()?,
                complete: match r.u8()? {
                    0 => false,
                    1 => true,
                    x => return Err(GssError::Protocol(format!("bad completion flag {x}"))),
                },
                token: r.var()?,
            },
            T_TOKEN => Msg::Token { token: r.var()? },
            T_PROOF => Msg::Proof {
                lifetime_s: u32::from_be_bytes(r.array()?),
                pop: r.array()?,
                mic: r.var()?,
            },
            T_BOUND => Msg::Bound {
                server_key: r.array()?,
                lifetime_s: u32::from_be_bytes(r.array()?),
                mic: r.var()?,
            },
            T_REFUSED => Msg::Refused {
                reason: String::from_utf8_lossy(&r.var()?)
                    .chars()
                    .map(|c| if c.is_control() { '?' } else { c })
                    .collect(),
            },
            t => return Err(GssError::Protocol(format!("unknown message type {t}"))),
        };
        if r.at != body.len() {
            return Err(GssError::Protocol(format!(
                "{} trailing bytes after the message",
                body.len() - r.at
            )));
        }
        Ok(msg)
    }

    /// A short name for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Msg::Hello { .. } => "hello",
            Msg::Challenge { .. } => "challenge",
            Msg::Token { .. } => "token",
            Msg::Proof { .. } => "proof",
            Msg::Bound { .. } => "bound",
            Msg::Refused { .. } => "refused",
        }
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], GssError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.b.len());
        match end {
            Some(e) => {
                let s = &self.b[self.at..e];
                self.at = e;
                Ok(s)
            }
            None => Err(GssError::Protocol(format!(
                "truncated message: needed {n} more bytes at offset {}, have {}",
                self.at,
                self.b.len() - self.at.min(self.b.len())
            ))),
        }
    }
    fn u8(&mut self) -> Result<u8, GssError> {
        Ok(self.take(1)?[0])
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], GssError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn var(&mut self) -> Result<Vec<u8>, GssError> {
        let n = u16::from_be_bytes(self.array()?) as usize;
        Ok(self.take(n)?.to_vec())
    }
}

/// What both MICs bind together. Every variable field is length-prefixed,
/// so no two different transcripts encode to the same bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transcript {
    pub purpose: Purpose,
    /// Canonical initiator principal (as the acceptor authenticated it).
    pub initiator: String,
    /// Canonical acceptor principal (as the initiator targeted it).
    pub acceptor: String,
    pub link_key: [u8; 32],
    /// The acceptor's CURVE server key, as it announced it.
    pub server_key: [u8; 32],
    pub nonce: [u8; NONCE_LEN],
}

impl Transcript {
    fn base(&self, role: &[u8]) -> Vec<u8> {
        let mut t = Vec::with_capacity(160);
        for part in [
            LABEL,
            role,
            &[self.purpose.byte()],
            self.initiator.as_bytes(),
            self.acceptor.as_bytes(),
            &self.link_key,
            &self.server_key,
            &self.nonce,
        ] {
            t.extend_from_slice(&(part.len() as u32).to_be_bytes());
            t.extend_from_slice(part);
        }
        t
    }

    /// What the initiator's MIC covers: the base transcript and the
    /// lifetime it claims.
    pub fn initiator(&self, lifetime_s: u32) -> Vec<u8> {
        let mut t = self.base(b"initiator");
        t.extend_from_slice(&lifetime_s.to_be_bytes());
        t
    }

    /// What the acceptor's MIC covers: the base transcript (with the server
    /// key it vouches for) and the lifetime it granted.
    pub fn acceptor(&self, lifetime_s: u32) -> Vec<u8> {
        let mut t = self.base(b"acceptor");
        t.extend_from_slice(&lifetime_s.to_be_bytes());
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Msg> {
        vec![
            Msg::Hello {
                purpose: Purpose::Overlay,
                link_key: [7; 32],
                token: vec![1, 2, 3],
            },
            Msg::Challenge {
                nonce: [9; 32],
                server_key: [8; 32],
                complete: true,
                token: vec![],
            },
            Msg::Token {
                token: vec![5; 300],
            },
            Msg::Proof {
                lifetime_s: 20,
                pop: [6; 32],
                mic: vec![4; 28],
            },
            Msg::Bound {
                server_key: [3; 32],
                lifetime_s: 36000,
                mic: vec![1; 28],
            },
            Msg::Refused {
                reason: "not in the acl".into(),
            },
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for m in samples() {
            let f = m.encode().unwrap();
            let n = Msg::frame_len(f[..4].try_into().unwrap()).unwrap();
            assert_eq!(n, f.len() - 4);
            assert_eq!(Msg::decode(&f[4..]).unwrap(), m);
        }
    }

    #[test]
    fn every_truncation_is_an_error() {
        for m in samples() {
            let f = m.encode().unwrap();
            let body = &f[4..];
            for cut in 0..body.len() {
                let e = Msg::decode(&body[..cut]).unwrap_err();
                assert!(matches!(e, GssError::Protocol(_)), "{e}");
            }
        }
    }

    #[test]
    fn trailing_bytes_wrong_version_and_unknown_type_are_refused() {
        let mut f = Msg::Proof {
            lifetime_s: 1,
            pop: [0; 32],
            mic: vec![1],
        }
        .encode()
        .unwrap()[4..]
            .to_vec();
        f.push(0);
        assert!(Msg::decode(&f)
            .unwrap_err()
            .to_string()
            .contains("trailing"));
        let mut v = Msg::Proof {
            lifetime_s: 1,
            pop: [0; 32],
            mic: vec![1],
        }
        .encode()
        .unwrap()[4..]
            .to_vec();
        v[0] = 0;
        assert!(Msg::decode(&v)
            .unwrap_err()
            .to_string()
            .contains("version 0"));
        assert!(Msg::decode(&[VERSION, 99])
            .unwrap_err()
            .to_string()
            .contains("unknown message type"));
        assert!(Msg::decode(&[VERSION, T_HELLO, 3])
            .unwrap_err()
            .to_string()
            .contains("purpose"));
        assert!(Msg::decode(&[]).is_err());
    }

    #[test]
    fn frame_limits() {
        assert!(Msg::frame_len([0, 0, 0, 0]).is_err());
        assert!(Msg::frame_len((MAX_FRAME as u32 + 1).to_be_bytes()).is_err());
        assert_eq!(
            Msg::frame_len((MAX_FRAME as u32).to_be_bytes()).unwrap(),
            MAX_FRAME
        );
        // A token too large for a field is an error, not a truncation.
        assert!(Msg::Token {
            token: vec![0; 70_000]
        }
        .encode()
        .is_err());
    }

    #[test]
    fn garbage_never_panics() {
        // A deterministic pseudo-random walk over short inputs.
        let mut x: u32 = 0x1234_5678;
        for len in 0..200 {
            for _ in 0..50 {
                let mut b = Vec::with_capacity(len);
                for _ in 0..len {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    b.push(x as u8);
                }
                if !b.is_empty() {
                    b[0] = VERSION;
                }
                let _ = Msg::decode(&b);
            }
        }
    }

    #[test]
    fn refusal_reasons_cannot_forge_log_lines() {
        let f = Msg::Refused {
            reason: "a\nverdict=allow".into(),
        }
        .encode()
        .unwrap();
        match Msg::decode(&f[4..]).unwrap() {
            Msg::Refused { reason } => assert_eq!(reason, "a?verdict=allow"),
            m => panic!("{m:?}"),
        }
    }

    #[test]
    fn transcripts_separate_every_field() {
        let t = Transcript {
            purpose: Purpose::Overlay,
            initiator: "alice@R".into(),
            acceptor: "canopy/n1@R".into(),
            link_key: [1; 32],
            server_key: [3; 32],
            nonce: [2; 32],
        };
        let base = t.initiator(1);
        let mut u = t.clone();
        u.initiator = "alice@".into();
        u.acceptor = "Rcanopy/n1@R".into();
        assert_ne!(
            u.initiator(1),
            base,
            "moving bytes between fields changes the transcript"
        );
        let mut u = t.clone();
        u.purpose = Purpose::Client;
        assert_ne!(u.initiator(1), base);
        let mut u = t.clone();
        u.link_key[0] = 0;
        assert_ne!(u.initiator(1), base);
        let mut u = t.clone();
        u.nonce[31] = 0;
        assert_ne!(u.initiator(1), base);
        let mut u = t.clone();
        u.server_key[0] = 0;
        assert_ne!(u.initiator(1), base);
        assert_ne!(t.initiator(1), t.initiator(2));
        // The two directions never collide.
        assert_ne!(t.acceptor(1), t.initiator(1));
        assert_ne!(t.acceptor(1), t.acceptor(2));
    }
}
