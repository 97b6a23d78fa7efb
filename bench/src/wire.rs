//! A bare local-connector client for streaming one-way messages.
//!
//! [`canopy_client::Client`] waits for a response to each request; to load
//! a link with messages this writes pre-encoded `broker.ping` requests with
//! `FLAG_NORESPONSE` (the target handles them and answers nothing), many
//! per `write`, and every `batch` messages one ordinary ping whose response
//! shows that everything before it has arrived (the path is FIFO). At most
//! two batches are in flight, so no queue grows without bound: the broker's
//! sockets have no high-water mark, and nothing is dropped.

use crate::instance::Progress;
use anyhow::{anyhow, bail, Context, Result};
use canopy_proto::frame::{encode_raw_frame, FrameDecoder};
use canopy_proto::{errno, Header, MsgType, FLAG_NORESPONSE};
use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

pub const PING: &str = "broker.ping";

pub struct Stream {
    sock: UnixStream,
    dec: FrameDecoder,
    out: Vec<u8>,
    next_tag: u32,
    rbuf: Vec<u8>,
}

impl Stream {
    /// Connect to a local connector socket (`local-R` in the runtime dir).
    pub fn connect(path: &Path) -> Result<Stream> {
        let sock = UnixStream::connect(path)
            .with_context(|| format!("cannot connect to {}", path.display()))?;
        Ok(Stream {
            sock,
            dec: FrameDecoder::new(),
            out: Vec::new(),
            next_tag: 1,
            rbuf: vec![0; 65536],
        })
    }

    /// The encoded frame of one one-way ping to `rank` with `payload`.
    pub fn oneway_frame(rank: u32, payload: &[u8]) -> Result<Vec<u8>> {
        let mut h = Header::request(PING, rank, 0);
        h.flags |= FLAG_NORESPONSE;
        let mut out = Vec::new();
        encode_raw_frame(&h.encode()?, payload, &mut out);
        Ok(out)
    }

    fn push_sync(&mut self, rank: u32) -> Result<u32> {
        let tag = self.next_tag;
        self.next_tag = self.next_tag.wrapping_add(1).max(1);
        let h = Header::request(PING, rank, tag);
        encode_raw_frame(&h.encode()?, &[], &mut self.out);
        Ok(tag)
    }

    fn flush(&mut self) -> Result<()> {
        self.sock
            .write_all(&self.out)
            .context("cannot write to the local connector; did the broker exit?")?;
        self.out.clear();
        Ok(())
    }

    /// Wait for the response with `tag`.
    fn wait(&mut self, tag: u32, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            while let Some((h, p)) = self.dec.next_frame()? {
                if h.msg_type != MsgType::Response || h.matchtag != tag {
                    continue;
                }
                if h.errnum != 0 {
                    bail!(
                        "{PING} to rank {} failed: {}: {}",
                        h.nodeid,
                        errno::name(h.errnum),
                        String::from_utf8_lossy(&p)
                    );
                }
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("no response within {timeout:?}");
            }
            self.sock.set_read_timeout(Some(left))?;
            match self.sock.read(&mut self.rbuf) {
                Ok(0) => bail!("the broker closed the local connection"),
                Ok(n) => self.dec.push(&self.rbuf[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    bail!("no response within {timeout:?}")
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Send `count` one-way pings of `payload` to `rank`, in batches of
    /// `batch` each followed by a synchronous ping; returns the time from
    /// the first write to the last batch's response.
    pub fn stream(
        &mut self,
        rank: u32,
        payload: &[u8],
        count: u64,
        batch: u32,
        timeout: Duration,
        progress: &Progress,
    ) -> Result<Duration> {
        let frame = Stream::oneway_frame(rank, payload)?;
        let batch = u64::from(batch.max(1));
        let mut outstanding: VecDeque<u32> = VecDeque::new();
        let mut sent = 0u64;
        let t0 = Instant::now();
        while sent < count {
            let n = batch.min(count - sent);
            for _ in 0..n {
                self.out.extend_from_slice(&frame);
            }
            outstanding.push_back(self.push_sync(rank)?);
            self.flush()?;
            sent += n;
            if outstanding.len() >= 2 {
                let t = outstanding.pop_front().expect("two outstanding");
                self.wait(t, timeout)?;
                progress.tick();
            }
        }
        while let Some(t) = outstanding.pop_front() {
            self.wait(t, timeout)?;
            progress.tick();
        }
        Ok(t0.elapsed())
    }

    /// One request, waiting for its response (an error response is an
    /// error).
    pub fn rpc(
        &mut self,
        topic: &str,
        nodeid: u32,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<()> {
        let tag = self.next_tag;
        self.next_tag = self.next_tag.wrapping_add(1).max(1);
        let h = Header::request(topic, nodeid, tag);
        encode_raw_frame(&h.encode()?, payload, &mut self.out);
        self.flush()?;
        self.wait(tag, timeout)
            .map_err(|e| anyhow!("{topic}: {e:#}"))
    }

    /// The next event, waiting up to `timeout` (other messages are
    /// dropped). Reads into one reused buffer: unlike
    /// `canopy_client::Client`, which zeroes a 64 KiB buffer on the stack
    /// for every receive, so that a subscriber thread per rank would cost
    /// the machine more than the brokers do.
    pub fn next_event(&mut self, timeout: Duration) -> Result<(Header, Vec<u8>)> {
        let deadline = Instant::now() + timeout;
        loop {
            while let Some((h, p)) = self.dec.next_frame()? {
                if h.msg_type == MsgType::Event {
                    return Ok((h, p));
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("no event within {timeout:?}");
            }
            self.sock.set_read_timeout(Some(left))?;
            match self.sock.read(&mut self.rbuf) {
                Ok(0) => bail!("the broker closed the local connection"),
                Ok(n) => self.dec.push(&self.rbuf[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    bail!("no event within {timeout:?}")
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// One synchronous ping (e.g. to check that the path is up).
    pub fn ping(&mut self, rank: u32, timeout: Duration) -> Result<()> {
        let t = self.push_sync(rank)?;
        self.flush()?;
        self.wait(t, timeout)
            .map_err(|e| anyhow!("ping rank {rank}: {e:#}"))
    }
}

/// The principal a local client of this user is stamped with
/// (`unix:NAME`, as the broker does).
pub fn principal() -> String {
    let uid = nix::unistd::getuid();
    match nix::unistd::User::from_uid(uid) {
        Ok(Some(u)) => format!("unix:{}", u.name),
        _ => format!("unix:#{uid}"),
    }
}
