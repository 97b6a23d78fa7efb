//! Framing for the local UNIX-socket connector.
//!
//! A stream carries a sequence of frames:
//!
//! ```text
//! u32 BE header_len | u32 BE payload_len | header bytes | payload bytes
//! ```
//!
//! [`FrameDecoder`] reassembles frames from arbitrary read chunks and
//! rejects oversized ones before buffering them.

use crate::header::{decode_header, Header, ProtoError};

/// Largest payload accepted on the local connector (64 MiB).
pub const MAX_PAYLOAD: usize = 64 << 20;
/// Largest header accepted on the local connector.
pub const MAX_HEADER: usize = 8192;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame header length {0} exceeds {MAX_HEADER}; the peer is not speaking the canopy protocol")]
    HeaderTooLong(usize),
    #[error("frame payload length {0} exceeds {MAX_PAYLOAD}; send smaller payloads")]
    PayloadTooLong(usize),
    #[error("frame payload length {len} exceeds this broker's max message of {max} bytes; send smaller payloads")]
    PayloadOverLimit { len: usize, max: usize },
    #[error(transparent)]
    Header(#[from] ProtoError),
}

/// Append one encoded frame to `out`.
pub fn encode_frame(header: &Header, payload: &[u8], out: &mut Vec<u8>) -> Result<(), FrameError> {
    if payload.len() > MAX_PAYLOAD {
        return Err(FrameError::PayloadTooLong(payload.len()));
    }
    let hlen = header.encoded_len();
    out.reserve(8 + hlen + payload.len());
    out.extend_from_slice(&(hlen as u32).to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    header.encode_into(out)?;
    out.extend_from_slice(payload);
    Ok(())
}

/// Like [`encode_frame`] but for an already-encoded header.
pub fn encode_raw_frame(header: &[u8], payload: &[u8], out: &mut Vec<u8>) {
    out.reserve(8 + header.len() + payload.len());
    out.extend_from_slice(&(header.len() as u32).to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(header);
    out.extend_from_slice(payload);
}

/// A buffer emptied with more capacity than this gives it back, so a
/// connection that once sent (or was sent) a large frame does not keep
/// holding its memory.
pub const KEEP_CAPACITY: usize = 1 << 20;

/// Incremental frame reassembly.
pub struct FrameDecoder {
    buf: Vec<u8>,
    start: usize,
    max_payload: usize,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        FrameDecoder {
            buf: Vec::new(),
            start: 0,
            max_payload: MAX_PAYLOAD,
        }
    }
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// A decoder that refuses, from its length prefix alone, a frame whose
    /// payload exceeds `max` bytes (at most [`MAX_PAYLOAD`]).
    pub fn with_max_payload(max: usize) -> Self {
        FrameDecoder {
            max_payload: max.min(MAX_PAYLOAD),
            ..Self::default()
        }
    }

    /// The lengths of the next frame's header and payload, once its 8-byte
    /// prefix has arrived: a caller can refuse the frame before buffering
    /// it.
    pub fn next_lengths(&self) -> Option<(usize, usize)> {
        let avail = &self.buf[self.start..];
        if avail.len() < 8 {
            return None;
        }
        let hlen = u32::from_be_bytes([avail[0], avail[1], avail[2], avail[3]]) as usize;
        let plen = u32::from_be_bytes([avail[4], avail[5], avail[6], avail[7]]) as usize;
        Some((hlen, plen))
    }

    /// Add bytes read from the stream.
    pub fn push(&mut self, data: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
            if self.buf.capacity() > KEEP_CAPACITY {
                self.buf = Vec::new();
            }
        }
        self.buf.extend_from_slice(data);
    }

    /// Bytes buffered but not yet returned as frames.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next complete frame, if any: the decoded header and the payload.
    /// An error means the stream is corrupt and must be closed.
    pub fn next_frame(&mut self) -> Result<Option<(Header, Vec<u8>)>, FrameError> {
        let avail = &self.buf[self.start..];
        if avail.len() < 8 {
            self.compact();
            return Ok(None);
        }
        let hlen = u32::from_be_bytes([avail[0], avail[1], avail[2], avail[3]]) as usize;
        let plen = u32::from_be_bytes([avail[4], avail[5], avail[6], avail[7]]) as usize;
        if hlen > MAX_HEADER {
            return Err(FrameError::HeaderTooLong(hlen));
        }
        if plen > MAX_PAYLOAD {
            return Err(FrameError::PayloadTooLong(plen));
        }
        if plen > self.max_payload {
            return Err(FrameError::PayloadOverLimit {
                len: plen,
                max: self.max_payload,
            });
        }
        if avail.len() < 8 + hlen + plen {
            self.compact();
            return Ok(None);
        }
        let header = decode_header(&avail[8..8 + hlen])?;
        let end = self.start + 8 + hlen + plen;
        if self.start == 0 && end == self.buf.len() && plen > KEEP_CAPACITY {
            // A large frame that is all the buffer holds: hand over the
            // buffer itself rather than a copy (no second allocation of
            // the payload's size).
            let mut b = std::mem::take(&mut self.buf);
            b.drain(..8 + hlen);
            return Ok(Some((header, b)));
        }
        let payload = self.buf[self.start + 8 + hlen..end].to_vec();
        self.start = end;
        Ok(Some((header, payload)))
    }

    fn compact(&mut self) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_configured_limit_is_enforced_from_the_prefix() {
        let h = Header::request("broker.ping", 7, 42);
        let mut stream = Vec::new();
        encode_frame(&h, &[1u8; 1024], &mut stream).unwrap();
        let first = stream.len();
        encode_frame(&h, &[2u8; 1025], &mut stream).unwrap();
        let mut d = FrameDecoder::with_max_payload(1024);
        d.push(&stream);
        assert_eq!(d.next_frame().unwrap().unwrap().1.len(), 1024);
        // Only the prefix of the second frame has to be there.
        let mut d2 = FrameDecoder::with_max_payload(1024);
        d2.push(&stream[first..first + 8]);
        assert_eq!(d2.next_lengths().map(|l| l.1), Some(1025));
        assert_eq!(
            d2.next_frame(),
            Err(FrameError::PayloadOverLimit {
                len: 1025,
                max: 1024
            })
        );
        assert!(matches!(
            d.next_frame(),
            Err(FrameError::PayloadOverLimit { len: 1025, .. })
        ));
        assert_eq!(FrameDecoder::new().next_lengths(), None);
    }

    #[test]
    fn a_large_frame_alone_is_handed_over_intact() {
        let h = Header::request("broker.ping", 7, 42);
        let big: Vec<u8> = (0..(3 << 20) as u32).map(|i| (i % 251) as u8).collect();
        let mut stream = Vec::new();
        encode_frame(&h, &big, &mut stream).unwrap();
        let mut d = FrameDecoder::new();
        for c in stream.chunks(65536) {
            d.push(c);
        }
        let (hh, p) = d.next_frame().unwrap().unwrap();
        assert_eq!(hh, h);
        assert_eq!(p, big);
        assert_eq!(d.pending(), 0);
        // The decoder goes on with the next frames.
        let mut more = Vec::new();
        encode_frame(&h, b"after", &mut more).unwrap();
        encode_frame(&h, &big, &mut more).unwrap();
        d.push(&more);
        assert_eq!(d.next_frame().unwrap().unwrap().1, b"after");
        assert_eq!(d.next_frame().unwrap().unwrap().1, big);
        assert!(d.next_frame().unwrap().is_none());
    }

    #[test]
    fn reassembles_across_chunks() {
        let h = Header::request("broker.ping", 7, 42);
        let mut stream = Vec::new();
        encode_frame(&h, b"hello", &mut stream).unwrap();
        encode_frame(&h, b"", &mut stream).unwrap();
        encode_frame(&h, &vec![9u8; 3000], &mut stream).unwrap();
        for chunk in [1usize, 3, 7, 64, 10000] {
            let mut d = FrameDecoder::new();
            let mut got = Vec::new();
            for c in stream.chunks(chunk) {
                d.push(c);
                while let Some((hh, p)) = d.next_frame().unwrap() {
                    assert_eq!(hh, h);
                    got.push(p);
                }
            }
            assert_eq!(got.len(), 3, "chunk size {chunk}");
            assert_eq!(got[0], b"hello");
            assert!(got[1].is_empty());
            assert_eq!(got[2].len(), 3000);
            assert_eq!(d.pending(), 0);
        }
    }

    #[test]
    fn rejects_oversize_before_buffering() {
        let mut d = FrameDecoder::new();
        d.push(&(MAX_HEADER as u32 + 1).to_be_bytes());
        d.push(&0u32.to_be_bytes());
        assert_eq!(
            d.next_frame().unwrap_err(),
            FrameError::HeaderTooLong(MAX_HEADER + 1)
        );
        let mut d = FrameDecoder::new();
        d.push(&40u32.to_be_bytes());
        d.push(&u32::MAX.to_be_bytes());
        assert!(matches!(d.next_frame(), Err(FrameError::PayloadTooLong(_))));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut d = FrameDecoder::new();
        d.push(&[0, 0, 0, 40, 0, 0, 0, 0]);
        d.push(&[0xAB; 40]);
        assert!(matches!(d.next_frame(), Err(FrameError::Header(_))));
    }
}
