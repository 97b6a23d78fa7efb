//! A synchronous client for a broker's local connector (a UNIX socket).
//!
//! Tools find the broker through `--uri` or the `CANOPY_URI` environment
//! variable, which `canopy start` sets for the command it runs. A URI is
//! `local://PATH` (or a bare path).
#![forbid(unsafe_code)]

use canopy_proto::frame::{encode_frame, FrameDecoder, FrameError};
use canopy_proto::{errno, Header, MsgType};
use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub use canopy_proto::NODEID_ANY;

/// Environment variable naming the broker to talk to.
pub const URI_ENV: &str = "CANOPY_URI";

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no broker given: pass --uri or set CANOPY_URI (canopy start sets it for the command it runs)")]
    NoUri,
    #[error("unsupported uri '{0}': use local://PATH")]
    BadUri(String),
    #[error(
        "cannot connect to broker at {path}: {source}; is the instance running? (check CANOPY_URI)"
    )]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("broker refused the connection: {0}")]
    Refused(String),
    #[error("lost connection to broker: {0}; the instance may have shut down")]
    Io(#[from] std::io::Error),
    #[error("broker closed the connection; the instance may have shut down")]
    Closed,
    #[error("no response within {0:?}; the target may be down or overloaded")]
    Timeout(Duration),
    #[error("broker sent a malformed frame: {0}")]
    Frame(#[from] FrameError),
    #[error("{topic} failed on rank {rank}: {name}: {message}")]
    Remote {
        topic: String,
        rank: u32,
        errnum: u32,
        name: &'static str,
        message: String,
    },
}

impl ClientError {
    /// The remote error number, if this is a remote error.
    pub fn errnum(&self) -> Option<u32> {
        match self {
            ClientError::Remote { errnum, .. } => Some(*errnum),
            _ => None,
        }
    }
}

/// A message from the broker.
#[derive(Debug, Clone)]
pub struct Msg {
    pub header: Header,
    pub payload: Vec<u8>,
}

pub struct Client {
    stream: UnixStream,
    decoder: FrameDecoder,
    next_tag: u32,
    /// Messages received while waiting for something else.
    backlog: VecDeque<Msg>,
    wbuf: Vec<u8>,
}

/// Resolve a URI from an explicit value or the environment.
pub fn resolve_uri(explicit: Option<&str>) -> Result<PathBuf, ClientError> {
    let uri = match explicit {
        Some(u) => u.to_string(),
        None => std::env::var(URI_ENV).map_err(|_| ClientError::NoUri)?,
    };
    if let Some(p) = uri.strip_prefix("local://") {
        Ok(PathBuf::from(p))
    } else if uri.starts_with('/') {
        Ok(PathBuf::from(uri))
    } else {
        Err(ClientError::BadUri(uri))
    }
}

impl Client {
    /// Connect to `--uri` if given, else to `CANOPY_URI`.
    pub fn connect(uri: Option<&str>) -> Result<Client, ClientError> {
        let path = resolve_uri(uri)?;
        let stream = UnixStream::connect(&path).map_err(|source| ClientError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Client {
            stream,
            decoder: FrameDecoder::new(),
            next_tag: 1,
            backlog: VecDeque::new(),
            wbuf: Vec::new(),
        })
    }

    /// Send a request without waiting; returns its matchtag.
    pub fn send(&mut self, topic: &str, nodeid: u32, payload: &[u8]) -> Result<u32, ClientError> {
        let tag = self.next_tag;
        self.next_tag = self.next_tag.wrapping_add(1).max(1);
        let h = Header::request(topic, nodeid, tag);
        self.wbuf.clear();
        encode_frame(&h, payload, &mut self.wbuf)?;
        self.stream.write_all(&self.wbuf)?;
        Ok(tag)
    }

    /// Receive the next message (response or event), waiting up to `timeout`.
    pub fn recv(&mut self, timeout: Duration) -> Result<Msg, ClientError> {
        if let Some(m) = self.backlog.pop_front() {
            return Ok(m);
        }
        self.recv_wire(timeout)
    }

    fn recv_wire(&mut self, timeout: Duration) -> Result<Msg, ClientError> {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 65536];
        loop {
            if let Some((header, payload)) = self.decoder.next_frame()? {
                if header.msg_type == MsgType::Response
                    && header.matchtag == 0
                    && header.errnum != 0
                {
                    return Err(ClientError::Refused(
                        String::from_utf8_lossy(&payload).into(),
                    ));
                }
                return Ok(Msg { header, payload });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ClientError::Timeout(timeout));
            }
            self.stream.set_read_timeout(Some(left))?;
            match self.stream.read(&mut buf) {
                Ok(0) => return Err(ClientError::Closed),
                Ok(n) => self.decoder.push(&buf[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Err(ClientError::Timeout(timeout))
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Wait for the response with `tag`; other messages are kept for later.
    pub fn wait(&mut self, tag: u32, timeout: Duration) -> Result<Msg, ClientError> {
        if let Some(i) = self
            .backlog
            .iter()
            .position(|m| m.header.msg_type == MsgType::Response && m.header.matchtag == tag)
        {
            let m = self.backlog.remove(i).expect("index valid");
            return check(m);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let m = self.recv_wire(left).map_err(|e| match e {
                ClientError::Timeout(_) => ClientError::Timeout(timeout),
                e => e,
            })?;
            if m.header.msg_type == MsgType::Response && m.header.matchtag == tag {
                return check(m);
            }
            self.backlog.push_back(m);
        }
    }

    /// One request, one response.
    pub fn rpc(
        &mut self,
        topic: &str,
        nodeid: u32,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<Msg, ClientError> {
        let tag = self.send(topic, nodeid, payload)?;
        self.wait(tag, timeout)
    }

    /// Subscribe to events matching `pattern` (`*`, `prefix.*` or exact).
    pub fn subscribe(&mut self, pattern: &str, timeout: Duration) -> Result<(), ClientError> {
        self.rpc("event.subscribe", NODEID_ANY, pattern.as_bytes(), timeout)
            .map(|_| ())
    }

    /// Publish an event through rank 0; returns its sequence number.
    pub fn publish(
        &mut self,
        topic: &str,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<u64, ClientError> {
        let mut body = Vec::with_capacity(2 + topic.len() + payload.len());
        body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
        body.extend_from_slice(topic.as_bytes());
        body.extend_from_slice(payload);
        let m = self.rpc("event.pub", 0, &body, timeout)?;
        let seq: [u8; 8] = m.payload.as_slice().try_into().map_err(|_| {
            ClientError::Frame(FrameError::Header(canopy_proto::ProtoError::TooShort(
                m.payload.len(),
            )))
        })?;
        Ok(u64::from_be_bytes(seq))
    }

    /// The next event, waiting up to `timeout`.
    pub fn next_event(&mut self, timeout: Duration) -> Result<Msg, ClientError> {
        if let Some(i) = self
            .backlog
            .iter()
            .position(|m| m.header.msg_type == MsgType::Event)
        {
            return Ok(self.backlog.remove(i).expect("index valid"));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let m = self.recv_wire(left)?;
            if m.header.msg_type == MsgType::Event {
                return Ok(m);
            }
            self.backlog.push_back(m);
        }
    }
}

fn check(m: Msg) -> Result<Msg, ClientError> {
    if m.header.errnum == 0 {
        return Ok(m);
    }
    Err(ClientError::Remote {
        topic: m.header.topic.clone(),
        rank: m.header.nodeid,
        errnum: m.header.errnum,
        name: errno::name(m.header.errnum),
        message: String::from_utf8_lossy(&m.payload).into_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        assert_eq!(
            resolve_uri(Some("local:///a/b")).unwrap(),
            PathBuf::from("/a/b")
        );
        assert_eq!(resolve_uri(Some("/a/b")).unwrap(), PathBuf::from("/a/b"));
        assert!(matches!(
            resolve_uri(Some("tcp://x")),
            Err(ClientError::BadUri(_))
        ));
    }

    #[test]
    fn talks_to_a_fake_broker_over_a_socketpair() {
        // A real socketpair standing in for the broker end, answering one
        // request with an error and sending an event first.
        let (a, b) = UnixStream::pair().unwrap();
        let mut c = Client {
            stream: a,
            decoder: FrameDecoder::new(),
            next_tag: 1,
            backlog: VecDeque::new(),
            wbuf: Vec::new(),
        };
        let t = std::thread::spawn(move || {
            let mut b = b;
            let mut d = FrameDecoder::new();
            let mut buf = [0u8; 4096];
            let (h, _) = loop {
                let n = b.read(&mut buf).unwrap();
                d.push(&buf[..n]);
                if let Some(f) = d.next_frame().unwrap() {
                    break f;
                }
            };
            let mut out = Vec::new();
            encode_frame(&Header::event("e.x", 4), b"ev", &mut out).unwrap();
            encode_frame(&h.response(7, errno::EPERM), b"needs admin", &mut out).unwrap();
            b.write_all(&out).unwrap();
        });
        let err = c.rpc("x.y", 7, b"", Duration::from_secs(5)).unwrap_err();
        assert_eq!(err.errnum(), Some(errno::EPERM));
        assert!(err.to_string().contains("needs admin"), "{err}");
        let ev = c.next_event(Duration::from_secs(1)).unwrap();
        assert_eq!(ev.header.seq, 4);
        assert!(matches!(
            c.recv(Duration::from_millis(50)),
            Err(ClientError::Closed) | Err(ClientError::Timeout(_))
        ));
        t.join().unwrap();
    }
}
