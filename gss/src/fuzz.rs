//! Entry point of the `gss_wire` fuzz target in `fuzz/` (see
//! docs/security.md, "Fuzzing"). Never panics on hostile bytes; panics only
//! when a property of the codec is violated.

use crate::wire::{Msg, MAX_FRAME};

/// Key-exchange codec: the input is a frame body (and, when its first four
/// bytes announce exactly the rest, a whole frame). A body that decodes
/// must encode to a frame of the same body, and decode to the same
/// message; only a refusal's reason may differ, as the decoder replaces
/// control characters and invalid UTF-8 and the encoder keeps at most 1000
/// characters.
pub fn wire(data: &[u8]) {
    check_body(data);
    if let Some((head, body)) = data.split_first_chunk::<4>() {
        if let Ok(n) = Msg::frame_len(*head) {
            assert!((1..=MAX_FRAME).contains(&n));
            if n == body.len() {
                check_body(body);
            }
        }
    }
}

fn check_body(body: &[u8]) {
    let Ok(msg) = Msg::decode(body) else {
        return;
    };
    let _ = msg.kind();
    let frame = match msg.encode() {
        Ok(f) => f,
        // Only a body over the frame limit may fail to encode.
        Err(e) => {
            assert!(
                body.len() > MAX_FRAME,
                "decoded {msg:?} does not encode: {e}"
            );
            return;
        }
    };
    let (head, again) = frame.split_first_chunk::<4>().expect("frame has a header");
    assert_eq!(
        Msg::frame_len(*head).ok(),
        Some(again.len()),
        "frame length"
    );
    let decoded = Msg::decode(again).expect("an encoded message must decode");
    match (&msg, &decoded) {
        (Msg::Refused { reason }, Msg::Refused { reason: r2 }) => {
            let kept: String = reason.chars().take(1000).collect();
            assert_eq!(&kept, r2, "refusal reason changed beyond truncation");
            if reason.chars().count() <= 1000 {
                assert_eq!(Msg::decode(again).ok(), Some(msg));
            }
        }
        _ => {
            assert_eq!(decoded, msg, "round trip changed the message");
            assert_eq!(again, body, "decoded message re-encodes differently");
        }
    }
}
