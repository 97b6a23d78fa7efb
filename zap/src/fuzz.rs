//! Entry point of the `zap` fuzz target in `fuzz/` (see docs/security.md,
//! "Fuzzing"). Never panics on hostile bytes; panics only when a property
//! of the codec is violated.

use crate::codec::{decode_metadata, encode_metadata, parse_request, ZapReply, ZAP_VERSION};
use crate::Mechanism;

/// Cuts fuzz input into frames: each frame is a length byte `n` (below
/// 0xf0: `n` bytes; else two bytes give `(n - 0xf0) << 8 | next`) and that
/// many bytes, the last frame cut short where the input ends.
pub fn split_frames(mut data: &[u8]) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    while let Some((&n, rest)) = data.split_first() {
        let (len, rest) = if n < 0xf0 {
            (usize::from(n), rest)
        } else {
            match rest.split_first() {
                Some((&lo, rest)) => (usize::from(n - 0xf0) << 8 | usize::from(lo), rest),
                None => (0, rest),
            }
        };
        let len = len.min(rest.len());
        frames.push(rest[..len].to_vec());
        data = &rest[len..];
    }
    frames
}

/// ZAP request codec: parse arbitrary frames; a request that parses must
/// have a principal for CURVE and GSSAPI, print without panicking, and
/// parse again, identical, from the frames a REP socket would deliver for
/// it. Every frame is also tried as ZMTP metadata, which must re-encode to
/// the same bytes, and as the metadata of a reply.
pub fn request(data: &[u8]) {
    let frames = split_frames(data);
    if let Ok(req) = parse_request(&frames) {
        let _ = format!("{req:?}");
        match req.mechanism {
            Mechanism::Curve | Mechanism::Gssapi => {
                assert!(req.principal().is_some(), "parsed request has no principal")
            }
            Mechanism::Null | Mechanism::Plain => assert!(req.principal().is_none()),
        }
        let mut again = vec![
            ZAP_VERSION.to_vec(),
            req.request_id.clone(),
            req.domain.clone().into_bytes(),
            req.address.clone().into_bytes(),
            req.identity.clone(),
            req.mechanism.as_str().as_bytes().to_vec(),
        ];
        again.extend(req.credentials.iter().cloned());
        assert_eq!(parse_request(&again).ok(), Some(req.clone()), "rep form");
        again.insert(0, Vec::new());
        assert_eq!(parse_request(&again).ok(), Some(req), "delimiter form");
    }
    for frame in &frames {
        let Ok(entries) = decode_metadata(frame) else {
            continue;
        };
        let encoded = encode_metadata(&entries).expect("decoded metadata must encode");
        assert_eq!(&encoded, frame, "metadata re-encodes differently");
        let reply = ZapReply::allow(b"1".to_vec(), "u".into(), entries.clone()).encode();
        assert_eq!(reply.len(), 6);
        assert_eq!(decode_metadata(&reply[5]).ok(), Some(entries));
    }
}
