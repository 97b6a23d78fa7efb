//! Entry points of the fuzz targets in `fuzz/` (see docs/security.md,
//! "Fuzzing"). Each takes arbitrary bytes, must never panic on them, and
//! panics only when a property of the codec is violated, so that both the
//! fuzzer and the regression replay (`tests/fuzz_regressions.rs`) report it.

use crate::frame::{encode_frame, FrameDecoder, FrameError};
use crate::{decode_header, Header};

/// Message header: decoding never panics, and whatever decodes re-encodes
/// to exactly the same bytes (one encoding per header, so nothing that
/// compares or hashes encoded headers can be fooled by a second spelling).
pub fn header(data: &[u8]) {
    let Ok(h) = decode_header(data) else {
        return;
    };
    let again = h
        .encode()
        .expect("a decoded header must be encodable within the same limits");
    assert_eq!(h.encoded_len(), again.len(), "encoded_len is wrong");
    assert_eq!(again, data, "decoded header re-encodes differently");
    assert_eq!(
        decode_header(&again).as_ref(),
        Ok(&h),
        "round trip changed the header"
    );
}

/// Outcome of feeding a stream to a [`FrameDecoder`].
#[derive(Debug, PartialEq)]
struct Decoded {
    frames: Vec<(Header, Vec<u8>)>,
    error: Option<FrameError>,
    consumed: usize,
    pending: usize,
}

fn decode_stream(stream: &[u8], mut next_chunk: impl FnMut() -> usize) -> Decoded {
    let mut d = FrameDecoder::new();
    let mut out = Decoded {
        frames: Vec::new(),
        error: None,
        consumed: 0,
        pending: 0,
    };
    let mut at = 0;
    while at < stream.len() {
        let n = next_chunk().clamp(1, stream.len() - at);
        d.push(&stream[at..at + n]);
        at += n;
        loop {
            match d.next_frame() {
                Ok(Some((h, p))) => {
                    out.consumed += 8 + h.encoded_len() + p.len();
                    out.frames.push((h, p));
                }
                Ok(None) => break,
                Err(e) => {
                    out.error = Some(e);
                    return out;
                }
            }
        }
        assert_eq!(
            d.pending(),
            at - out.consumed,
            "pending() disagrees with what was pushed and returned"
        );
    }
    out.pending = d.pending();
    out
}

/// Local-connector framing. The first byte seeds the chunk sizes; the rest
/// is the stream. Feeding it in arbitrary chunks must give exactly what
/// feeding it at once gives, and every frame returned must re-encode to the
/// bytes it was read from.
pub fn frames(data: &[u8]) {
    let Some((&seed, stream)) = data.split_first() else {
        return;
    };
    let whole = decode_stream(stream, || stream.len());
    let mut x = u32::from(seed) | 0x100;
    let chunked = decode_stream(stream, || {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        // Mostly small chunks, sometimes large ones.
        match (x >> 16) % 8 {
            0 => 1 + ((x >> 8) % 4096) as usize,
            _ => 1 + ((x >> 8) % 16) as usize,
        }
    });
    assert_eq!(whole, chunked, "chunking changed the decoded frames");
    let mut at = 0;
    for (h, p) in &whole.frames {
        let mut enc = Vec::new();
        encode_frame(h, p, &mut enc).expect("a decoded frame must be encodable");
        assert_eq!(
            enc,
            &stream[at..at + enc.len()],
            "decoded frame re-encodes differently"
        );
        at += enc.len();
    }
    assert_eq!(at, whole.consumed);
}
