//! `exec.run`'s wire format (docs/protocol.md §6.2): the routing prefix of
//! a request, rank sets, and the records streamed back.
//!
//! A request's payload is `u16 prefix length | prefix | body`. The prefix
//! is two lines of text, `RANKS` and `AS`; the body is opaque to every
//! broker but the one that runs the command (a JSON run spec in a personal
//! instance, the helper's signed input in a system instance), and is
//! forwarded byte for byte.
//!
//! Each response carries one or more records, each `u32 length
//! (big-endian) | record`, a record being `tag | rank (u32 big-endian) |
//! data`. A broker relaying many ranks' records packs what it has into one
//! response per turn of its loop.

/// Largest rank set accepted in a prefix (ranks, not bytes).
pub const MAX_RANKS: usize = 1 << 20;

/// A record tag.
pub const REC_STDOUT: u8 = b'1';
pub const REC_STDERR: u8 = b'2';
/// The command ended: data is `s` and a decimal status, or `k` and a
/// decimal signal number.
pub const REC_EXIT: u8 = b'E';
/// The rank could not run the command: data is one byte, the exit status
/// to count for it (126 refused or unreachable, 127 not found), then the
/// reason as text.
pub const REC_FAILED: u8 = b'F';
/// A receipt envelope signed by the executing node (system instances).
pub const REC_RECEIPT: u8 = b'R';

/// How a rank's command ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    Status(i32),
    Signal(i32),
}

impl Ended {
    /// The shell's convention: a status, or 128 + the signal.
    pub fn code(self) -> i32 {
        match self {
            Ended::Status(s) => s,
            Ended::Signal(s) => 128 + s,
        }
    }
}

/// One streamed record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record<'a> {
    Stdout(u32, &'a [u8]),
    Stderr(u32, &'a [u8]),
    Exit(u32, Ended),
    Failed {
        rank: u32,
        code: u8,
        reason: &'a str,
    },
    Receipt(u32, &'a [u8]),
}

impl Record<'_> {
    pub fn rank(&self) -> u32 {
        match *self {
            Record::Stdout(r, _)
            | Record::Stderr(r, _)
            | Record::Exit(r, _)
            | Record::Receipt(r, _) => r,
            Record::Failed { rank, .. } => rank,
        }
    }

    /// Whether this record ends the rank's part (exit or failure).
    pub fn is_final(&self) -> bool {
        matches!(self, Record::Exit(..) | Record::Failed { .. })
    }

    pub fn encode(&self) -> Vec<u8> {
        let (tag, rank) = match self {
            Record::Stdout(r, _) => (REC_STDOUT, *r),
            Record::Stderr(r, _) => (REC_STDERR, *r),
            Record::Exit(r, _) => (REC_EXIT, *r),
            Record::Failed { rank, .. } => (REC_FAILED, *rank),
            Record::Receipt(r, _) => (REC_RECEIPT, *r),
        };
        let mut out = Vec::with_capacity(16);
        out.push(tag);
        out.extend_from_slice(&rank.to_be_bytes());
        match self {
            Record::Stdout(_, d) | Record::Stderr(_, d) | Record::Receipt(_, d) => {
                out.extend_from_slice(d)
            }
            Record::Exit(_, Ended::Status(s)) => out.extend_from_slice(format!("s{s}").as_bytes()),
            Record::Exit(_, Ended::Signal(s)) => out.extend_from_slice(format!("k{s}").as_bytes()),
            Record::Failed { code, reason, .. } => {
                out.push(*code);
                out.extend_from_slice(reason.as_bytes());
            }
        }
        out
    }

    /// Decode one record; `None` if it is malformed.
    pub fn decode(b: &[u8]) -> Option<Record<'_>> {
        let (&tag, rest) = b.split_first()?;
        let rank = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
        let data = &rest[4..];
        Some(match tag {
            REC_STDOUT => Record::Stdout(rank, data),
            REC_STDERR => Record::Stderr(rank, data),
            REC_RECEIPT => Record::Receipt(rank, data),
            REC_EXIT => {
                let t = std::str::from_utf8(data).ok()?;
                let n = |s: &str| -> Option<i32> {
                    if s.is_empty() || s.len() > 11 {
                        return None;
                    }
                    s.parse().ok()
                };
                match t.split_at_checked(1)? {
                    ("s", v) => Record::Exit(rank, Ended::Status(n(v)?)),
                    ("k", v) => Record::Exit(rank, Ended::Signal(n(v)?)),
                    _ => return None,
                }
            }
            REC_FAILED => {
                let (&code, reason) = data.split_first()?;
                Record::Failed {
                    rank,
                    code,
                    reason: std::str::from_utf8(reason).ok()?,
                }
            }
            _ => return None,
        })
    }
}

/// Append one record to a response payload being built.
pub fn push_record(out: &mut Vec<u8>, record: &[u8]) {
    out.extend_from_slice(&(record.len() as u32).to_be_bytes());
    out.extend_from_slice(record);
}

/// The records of a response payload, in order; `None` if it is not a
/// sequence of length-prefixed records (nothing of it is then trusted).
pub fn records(mut b: &[u8]) -> Option<Vec<&[u8]>> {
    let mut v = Vec::new();
    while !b.is_empty() {
        let n = u32::from_be_bytes(b.get(..4)?.try_into().ok()?) as usize;
        let r = b.get(4..4 + n)?;
        v.push(r);
        b = &b[4 + n..];
    }
    Some(v)
}

/// Ranks as a compact set: `0-3,7,9-10`, ascending, no repeats.
pub fn encode_ranks(ranks: &[u32]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < ranks.len() {
        let start = ranks[i];
        let mut end = start;
        while i + 1 < ranks.len() && ranks[i + 1] == end + 1 {
            i += 1;
            end = ranks[i];
        }
        if !out.is_empty() {
            out.push(',');
        }
        if start == end {
            out.push_str(&start.to_string());
        } else {
            out.push_str(&format!("{start}-{end}"));
        }
        i += 1;
    }
    out
}

/// Parse a rank set (`all`, or `0-3,7`) for an instance of `size` ranks:
/// ascending and without repeats. Errors say what is wrong.
pub fn parse_ranks(s: &str, size: u32) -> Result<Vec<u32>, String> {
    let s = s.trim();
    if s == "all" {
        return Ok((0..size).collect());
    }
    if s.is_empty() {
        return Err("the rank set is empty; give ranks like 0-3,7 or all".into());
    }
    let mut out: Vec<u32> = Vec::new();
    for part in s.split(',') {
        let num = |t: &str| -> Result<u32, String> {
            t.parse::<u32>()
                .map_err(|_| format!("{t:?} in the rank set is not a rank number"))
        };
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => {
                let a = num(part)?;
                (a, a)
            }
        };
        if a > b {
            return Err(format!("range {part} runs backwards; write it low-high"));
        }
        if b >= size {
            return Err(format!(
                "rank {b} does not exist in this instance of size {size}"
            ));
        }
        if out.last().is_some_and(|&l| a <= l) {
            return Err(format!(
                "the rank set {s:?} is not ascending or repeats a rank; write ranks in order once each"
            ));
        }
        if out.len() + (b - a) as usize + 1 > MAX_RANKS {
            return Err(format!("the rank set names more than {MAX_RANKS} ranks"));
        }
        out.extend(a..=b);
    }
    Ok(out)
}

/// Build a request payload: the prefix, then the body.
pub fn encode_run(ranks: &str, submit_as: &str, body: &[u8]) -> Vec<u8> {
    let prefix = format!("{ranks}\n{submit_as}");
    let mut out = Vec::with_capacity(2 + prefix.len() + body.len());
    out.extend_from_slice(&(prefix.len().min(u16::MAX as usize) as u16).to_be_bytes());
    out.extend_from_slice(prefix.as_bytes());
    out.extend_from_slice(body);
    out
}

/// Split a request payload into its prefix lines (`RANKS`, `AS`) and body.
pub fn decode_run(b: &[u8]) -> Option<(&str, &str, &[u8])> {
    let n = u16::from_be_bytes(b.get(..2)?.try_into().ok()?) as usize;
    let prefix = std::str::from_utf8(b.get(2..2 + n)?).ok()?;
    let (ranks, submit_as) = prefix.split_once('\n')?;
    Some((ranks, submit_as, &b[2 + n..]))
}

/// `exec.kill` and `exec.write` payloads: the matchtag of the `exec.run`
/// the sender started (on this link), then a signal number (kill) or the
/// bytes for stdin (write; empty means end of input).
pub fn encode_control(matchtag: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + data.len());
    out.extend_from_slice(&matchtag.to_be_bytes());
    out.extend_from_slice(data);
    out
}

pub fn decode_control(b: &[u8]) -> Option<(u32, &[u8])> {
    let tag = u32::from_be_bytes(b.get(..4)?.try_into().ok()?);
    Some((tag, &b[4..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let recs = [
            Record::Stdout(3, b"hi\n"),
            Record::Stderr(0, b""),
            Record::Exit(7, Ended::Status(2)),
            Record::Exit(7, Ended::Signal(9)),
            Record::Failed {
                rank: 1,
                code: 127,
                reason: "no such file",
            },
            Record::Receipt(4, b"{}"),
        ];
        for r in recs {
            assert_eq!(Record::decode(&r.encode()), Some(r.clone()));
        }
        assert_eq!(Record::decode(b"E\0\0\0\x01s"), None);
        assert_eq!(Record::decode(b"E\0\0\0\x01x1"), None);
        assert_eq!(Record::decode(b"Z\0\0\0\x01"), None);
        assert_eq!(Record::decode(b"1\0\0"), None);
        assert_eq!(Ended::Signal(2).code(), 130);
    }

    #[test]
    fn records_pack_into_one_payload() {
        let a = Record::Stdout(1, b"x").encode();
        let b = Record::Exit(2, Ended::Status(0)).encode();
        let mut p = Vec::new();
        push_record(&mut p, &a);
        push_record(&mut p, &b);
        assert_eq!(records(&p).unwrap(), vec![&a[..], &b[..]]);
        assert_eq!(records(b"").unwrap(), Vec::<&[u8]>::new());
        assert!(records(&p[..p.len() - 1]).is_none(), "truncated");
        assert!(records(b"\0\0").is_none());
    }

    #[test]
    fn rank_sets() {
        assert_eq!(encode_ranks(&[0, 1, 2, 3, 7, 9, 10]), "0-3,7,9-10");
        assert_eq!(
            parse_ranks("0-3,7,9-10", 11).unwrap(),
            vec![0, 1, 2, 3, 7, 9, 10]
        );
        assert_eq!(parse_ranks("all", 3).unwrap(), vec![0, 1, 2]);
        assert!(parse_ranks("3", 3).unwrap_err().contains("does not exist"));
        assert!(parse_ranks("2,1", 3).unwrap_err().contains("ascending"));
        assert!(parse_ranks("1,1", 3).unwrap_err().contains("ascending"));
        assert!(parse_ranks("2-1", 3).unwrap_err().contains("backwards"));
        assert!(parse_ranks("x", 3).unwrap_err().contains("not a rank"));
        assert!(parse_ranks("", 3).is_err());
        assert!(parse_ranks("0-4294967295", u32::MAX).is_err());
    }

    #[test]
    fn run_payload() {
        let p = encode_run("0-3", "service:sched", b"body");
        assert_eq!(decode_run(&p), Some(("0-3", "service:sched", &b"body"[..])));
        assert_eq!(decode_run(b"\0"), None);
        assert_eq!(decode_run(b"\0\x05ab"), None);
        assert_eq!(decode_run(b"\0\x02ab"), None);
        let c = encode_control(9, b"x");
        assert_eq!(decode_control(&c), Some((9, &b"x"[..])));
    }
}
