//! Entry point of the `pmi` fuzz target in `fuzz/` (see docs/security.md,
//! "Fuzzing"). Never panics on hostile bytes; panics only when a property
//! of the codec is violated.

use crate::wire::{command_name, parse_reply, parse_request};

/// PMI-1 wire parser: the input (as text, lossily) is parsed as a request
/// and as a reply; whatever parses must encode to a line that parses back
/// to the same message, and must have the command name the line had.
pub fn wire(data: &[u8]) {
    let line = String::from_utf8_lossy(data);
    let name = command_name(&line);
    if let Ok(req) = parse_request(&line) {
        assert_eq!(name, Some(req.name()), "command name of a request");
        let enc = req.encode();
        assert_eq!(
            parse_request(&enc).as_ref(),
            Ok(&req),
            "request {enc:?} does not parse back"
        );
        let _ = req.to_string();
    }
    if let Ok(rep) = parse_reply(&line) {
        assert_eq!(name, Some(rep.name()), "command name of a reply");
        let enc = rep.encode();
        assert_eq!(
            parse_reply(&enc).as_ref(),
            Ok(&rep),
            "reply {enc:?} does not parse back"
        );
        let _ = rep.to_string();
    }
}
