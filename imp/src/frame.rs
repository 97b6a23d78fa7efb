//! How the broker talks to `canopy-imp run` (docs/imp.md, "Framing").
//!
//! **Input (the helper's stdin).** A header line, then two length-prefixed
//! frames, then the command's own stdin:
//!
//! ```text
//! canopy-imp/1\n
//! <len>\n<user certificate envelope, len bytes>
//! <len>\n<exec request envelope, len bytes>
//! <everything after this is the command's stdin>
//! ```
//!
//! `len` is ASCII decimal, 1 to [`MAX_ENVELOPE_BYTES`], no sign, no leading
//! zero. The helper reads exactly these bytes (a byte at a time for the
//! header lines) and never more, so the command inherits stdin positioned
//! right after the request.
//!
//! **Output (the helper's stdout).** Records, each a tag, a space, an
//! ASCII decimal length, `\n`, and that many bytes:
//!
//! * `1` — bytes the command wrote to its stdout;
//! * `2` — bytes the command wrote to its stderr;
//! * `R` — the receipt envelope (the last record when the command ran);
//! * `X` — why nothing ran, or why the helper failed after starting the
//!   command (a lower-case message; the last record).
//!
//! The helper's own stderr carries the same messages for people.

use std::io::{self, Read, Write};

use crate::envelope::MAX_ENVELOPE_BYTES;

/// The first line of the input.
pub const MAGIC: &[u8] = b"canopy-imp/1\n";

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("malformed input: it does not start with \"canopy-imp/1\"; the broker must send the framing of docs/imp.md")]
    Magic,
    #[error(
        "malformed input: bad length line for the {0}; it must be decimal digits and a newline"
    )]
    Length(&'static str),
    #[error(
        "malformed input: the {what} is {len} bytes, more than the {MAX_ENVELOPE_BYTES} allowed"
    )]
    TooLarge { what: &'static str, len: usize },
    #[error("malformed input: stdin ended inside the {0}")]
    Truncated(&'static str),
    #[error("cannot read stdin: {0}")]
    Io(#[from] io::Error),
}

fn read_byte(r: &mut dyn Read, what: &'static str) -> Result<u8, FrameError> {
    let mut b = [0u8];
    loop {
        match r.read(&mut b) {
            Ok(0) => return Err(FrameError::Truncated(what)),
            Ok(_) => return Ok(b[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

fn read_frame(r: &mut dyn Read, what: &'static str) -> Result<Vec<u8>, FrameError> {
    let mut len: usize = 0;
    let mut digits = 0;
    loop {
        let b = read_byte(r, what)?;
        match b {
            b'\n' if digits > 0 => break,
            b'0' if digits == 0 => return Err(FrameError::Length(what)),
            b'0'..=b'9' if digits < 7 => {
                len = len * 10 + usize::from(b - b'0');
                digits += 1;
            }
            _ => return Err(FrameError::Length(what)),
        }
    }
    if len > MAX_ENVELOPE_BYTES {
        return Err(FrameError::TooLarge { what, len });
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => FrameError::Truncated(what),
        _ => FrameError::Io(e),
    })?;
    Ok(buf)
}

/// The helper's fd 0, read with `read(2)` and no buffer (Rust's
/// `Stdin` buffers, which would swallow the command's stdin).
pub struct UnbufferedStdin;

impl Read for UnbufferedStdin {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use std::os::fd::{AsFd, AsRawFd};
        let fd = io::stdin().as_fd().as_raw_fd();
        nix::unistd::read(fd, buf).map_err(io::Error::from)
    }
}

/// The two envelopes, as read.
#[derive(Debug, PartialEq, Eq)]
pub struct Input {
    pub cert: Vec<u8>,
    pub request: Vec<u8>,
}

/// Read the header and the two frames, and nothing after them.
pub fn read_input(r: &mut dyn Read) -> Result<Input, FrameError> {
    for &m in MAGIC {
        if read_byte(r, "header").map_err(|_| FrameError::Magic)? != m {
            return Err(FrameError::Magic);
        }
    }
    let cert = read_frame(r, "certificate")?;
    let request = read_frame(r, "request")?;
    Ok(Input { cert, request })
}

/// The input for `cert` and `request` (for the broker, tools and tests).
pub fn encode_input(cert: &[u8], request: &[u8]) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    for f in [cert, request] {
        out.extend_from_slice(format!("{}\n", f.len()).as_bytes());
        out.extend_from_slice(f);
    }
    out
}

/// Output record tags.
pub const TAG_STDOUT: u8 = b'1';
pub const TAG_STDERR: u8 = b'2';
pub const TAG_RECEIPT: u8 = b'R';
pub const TAG_REFUSED: u8 = b'X';

/// Write one output record.
pub fn write_record(w: &mut dyn Write, tag: u8, data: &[u8]) -> io::Result<()> {
    let mut head = vec![tag, b' '];
    head.extend_from_slice(format!("{}\n", data.len()).as_bytes());
    w.write_all(&head)?;
    w.write_all(data)?;
    w.flush()
}

/// Split the helper's output into records (for the broker and tests).
/// `None` if it is not a well-formed sequence of records.
pub fn read_records(mut data: &[u8]) -> Option<Vec<(u8, Vec<u8>)>> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let tag = data[0];
        if data.get(1) != Some(&b' ') {
            return None;
        }
        let nl = data.iter().position(|&b| b == b'\n')?;
        let len: usize = std::str::from_utf8(&data[2..nl]).ok()?.parse().ok()?;
        let end = (nl + 1).checked_add(len)?;
        let body = data.get(nl + 1..end)?;
        out.push((tag, body.to_vec()));
        data = &data[end..];
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_round_trips_and_leaves_the_rest_unread() {
        let mut bytes = encode_input(b"cert", b"{request}");
        bytes.extend_from_slice(b"stdin of the command");
        let mut r = io::Cursor::new(bytes);
        let i = read_input(&mut r).unwrap();
        assert_eq!(i.cert, b"cert");
        assert_eq!(i.request, b"{request}");
        let mut rest = String::new();
        r.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "stdin of the command");
    }

    #[test]
    fn bad_input_is_refused() {
        let bad = |b: &[u8]| read_input(&mut io::Cursor::new(b.to_vec())).unwrap_err();
        assert!(matches!(bad(b"canopy-imp/2\n"), FrameError::Magic));
        assert!(matches!(
            bad(b"canopy-imp/1\n04\nabcd"),
            FrameError::Length(_)
        ));
        assert!(matches!(bad(b"canopy-imp/1\n\n"), FrameError::Length(_)));
        assert!(matches!(bad(b"canopy-imp/1\n-1\n"), FrameError::Length(_)));
        assert!(matches!(
            bad(b"canopy-imp/1\n4\nab"),
            FrameError::Truncated("certificate")
        ));
        assert!(matches!(
            bad(b"canopy-imp/1\n99999999\n"),
            FrameError::Length(_)
        ));
        assert!(matches!(
            bad(b"canopy-imp/1\n65537\n"),
            FrameError::TooLarge { len: 65537, .. }
        ));
        assert!(matches!(
            bad(b"canopy-imp/1\n1\na"),
            FrameError::Truncated("request")
        ));
    }

    #[test]
    fn records_round_trip() {
        let mut out = Vec::new();
        write_record(&mut out, TAG_STDOUT, b"hello\n").unwrap();
        write_record(&mut out, TAG_STDERR, b"").unwrap();
        write_record(&mut out, TAG_RECEIPT, b"{}").unwrap();
        assert_eq!(
            read_records(&out).unwrap(),
            vec![
                (TAG_STDOUT, b"hello\n".to_vec()),
                (TAG_STDERR, vec![]),
                (TAG_RECEIPT, b"{}".to_vec())
            ]
        );
        assert!(read_records(b"1 5\nabc").is_none());
    }
}
