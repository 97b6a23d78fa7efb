//! Hostlists: the compact host notation HPC admins already use (RFC 29 in
//! flux-core, the same as Slurm's).
//!
//! * `node[0-3,7]` is `node0 node1 node2 node3 node7`;
//! * `node[08-10]` keeps the padding of the lower bound: `node08 node09 node10`;
//! * `rack[1-2]n[1-3]` takes every combination, leftmost group slowest:
//!   `rack1n1 rack1n2 rack1n3 rack2n1 ...`;
//! * `login1,node[1-2]` lists several at the top level, in order.
//!
//! Host names may hold ASCII letters, digits, `-`, `_` and `.`, must not
//! start with `-` or `.` and must not end with `.`, so a host name can be
//! used safely as a file name (`<dir>/<host>.key`).
//!
//! [`expand`] never allocates more than [`MAX_HOSTS`] names: it counts a
//! list before it expands it.

use std::fmt::Write as _;

/// The largest number of hosts one configuration (and one hostlist) may name.
pub const MAX_HOSTS: usize = 1_000_000;

/// Longest number inside brackets, in digits (keeps arithmetic in `u64`).
const MAX_DIGITS: usize = 18;

/// What is wrong with a hostlist. Positions are 1-based character positions
/// within the hostlist string.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostlistError {
    #[error("hostlist is empty; name at least one host, e.g. \"node[0-3]\"")]
    Empty,
    #[error("empty host name at position {pos}; remove the stray ',' or fill in the name")]
    EmptyName { pos: usize },
    #[error("'[' at position {pos} is never closed; add the matching ']'")]
    Unclosed { pos: usize },
    #[error("']' at position {pos} has no matching '['; remove it or add the '['")]
    UnexpectedClose { pos: usize },
    #[error("'[' at position {pos} is inside another '['; brackets do not nest, write e.g. \"rack[1-2]n[1-3]\"")]
    Nested { pos: usize },
    #[error("empty range at position {pos}; write a number or a range such as 0-3 between the brackets and commas")]
    EmptyRange { pos: usize },
    #[error("`{text}` at position {pos} is not a number or a range; write e.g. 0-3 or 7")]
    BadRange { pos: usize, text: String },
    #[error("number `{text}` at position {pos} is too long; use at most 18 digits")]
    NumberTooLong { pos: usize, text: String },
    #[error("range {lo}-{hi} at position {pos} is reversed; write it low to high, {hi}-{lo}")]
    Reversed { pos: usize, lo: String, hi: String },
    #[error("range {lo}-{hi} at position {pos} mixes padded and unpadded bounds; pad the lower bound to the width of the upper, e.g. {padded}-{hi}")]
    Padding {
        pos: usize,
        lo: String,
        hi: String,
        padded: String,
    },
    #[error("character {ch:?} at position {pos} cannot be part of a host name; use letters, digits, '-', '_' and '.'")]
    BadChar { pos: usize, ch: char },
    #[error("host name at position {pos} starts or ends with {ch:?}; host names must start with a letter or digit and must not end with '.'")]
    BadEdge { pos: usize, ch: char },
    #[error("hostlist names more than {max} hosts; split the instance or fix the range", max = MAX_HOSTS)]
    TooLarge,
}

impl HostlistError {
    /// The 1-based character position the error is at, if any.
    pub fn position(&self) -> Option<usize> {
        match self {
            HostlistError::Empty | HostlistError::TooLarge => None,
            HostlistError::EmptyName { pos }
            | HostlistError::Unclosed { pos }
            | HostlistError::UnexpectedClose { pos }
            | HostlistError::Nested { pos }
            | HostlistError::EmptyRange { pos }
            | HostlistError::BadRange { pos, .. }
            | HostlistError::NumberTooLong { pos, .. }
            | HostlistError::Reversed { pos, .. }
            | HostlistError::Padding { pos, .. }
            | HostlistError::BadChar { pos, .. }
            | HostlistError::BadEdge { pos, .. } => Some(*pos),
        }
    }
}

/// One bracket group: the ranges inside `[...]`.
#[derive(Debug, Clone)]
struct Group {
    ranges: Vec<Range>,
}

#[derive(Debug, Clone, Copy)]
struct Range {
    lo: u64,
    hi: u64,
    width: usize,
}

impl Group {
    fn count(&self) -> u64 {
        self.ranges.iter().map(|r| r.hi - r.lo + 1).sum()
    }
}

#[derive(Debug, Clone)]
enum Segment {
    Literal(String),
    Group(Group),
}

/// One top-level, comma-separated element: literals and bracket groups.
#[derive(Debug, Clone)]
struct Pattern {
    segments: Vec<Segment>,
}

impl Pattern {
    /// How many names this pattern makes, or `None` past [`MAX_HOSTS`].
    fn count(&self) -> Option<u64> {
        let mut n: u64 = 1;
        for s in &self.segments {
            if let Segment::Group(g) = s {
                n = n.checked_mul(g.count())?;
                if n > MAX_HOSTS as u64 {
                    return None;
                }
            }
        }
        Some(n)
    }

    fn expand_into(&self, out: &mut Vec<String>) {
        // An odometer over the groups, leftmost slowest.
        let groups: Vec<&Group> = self
            .segments
            .iter()
            .filter_map(|s| match s {
                Segment::Group(g) => Some(g),
                Segment::Literal(_) => None,
            })
            .collect();
        let values: Vec<Vec<String>> = groups
            .iter()
            .map(|g| {
                g.ranges
                    .iter()
                    .flat_map(|r| (r.lo..=r.hi).map(move |v| pad(v, r.width)))
                    .collect()
            })
            .collect();
        let mut idx = vec![0usize; values.len()];
        loop {
            let mut name = String::new();
            let mut gi = 0;
            for s in &self.segments {
                match s {
                    Segment::Literal(l) => name.push_str(l),
                    Segment::Group(_) => {
                        name.push_str(&values[gi][idx[gi]]);
                        gi += 1;
                    }
                }
            }
            out.push(name);
            // advance the odometer from the right
            let mut k = values.len();
            loop {
                if k == 0 {
                    return;
                }
                k -= 1;
                idx[k] += 1;
                if idx[k] < values[k].len() {
                    break;
                }
                idx[k] = 0;
            }
        }
    }
}

fn pad(v: u64, width: usize) -> String {
    format!("{v:0width$}")
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.'
}

/// Parse a whole hostlist into its top-level patterns.
fn parse(list: &str) -> Result<Vec<Pattern>, HostlistError> {
    if list.trim().is_empty() {
        return Err(HostlistError::Empty);
    }
    let chars: Vec<char> = list.chars().collect();
    let mut patterns = Vec::new();
    let mut i = 0;
    loop {
        // one top-level element, up to a ',' outside brackets or the end
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        let start = i;
        let mut segments = Vec::new();
        let mut literal = String::new();
        while i < chars.len() && chars[i] != ',' {
            let c = chars[i];
            if c == '[' {
                if !literal.is_empty() {
                    segments.push(Segment::Literal(std::mem::take(&mut literal)));
                }
                let (group, next) = parse_group(&chars, i)?;
                segments.push(Segment::Group(group));
                i = next;
            } else if c == ']' {
                return Err(HostlistError::UnexpectedClose { pos: i + 1 });
            } else if c.is_whitespace() {
                // allow spaces only before the next ','
                let mut j = i;
                while j < chars.len() && chars[j].is_whitespace() {
                    j += 1;
                }
                if j < chars.len() && chars[j] != ',' {
                    return Err(HostlistError::BadChar { pos: i + 1, ch: c });
                }
                i = j;
            } else if is_name_char(c) {
                literal.push(c);
                i += 1;
            } else {
                return Err(HostlistError::BadChar { pos: i + 1, ch: c });
            }
        }
        if !literal.is_empty() {
            segments.push(Segment::Literal(literal));
        }
        if segments.is_empty() {
            return Err(HostlistError::EmptyName { pos: start + 1 });
        }
        check_edges(&segments, start)?;
        patterns.push(Pattern { segments });
        if i >= chars.len() {
            break;
        }
        i += 1; // skip ','
        if i >= chars.len() {
            return Err(HostlistError::EmptyName { pos: i + 1 });
        }
    }
    Ok(patterns)
}

/// A name must not start with '-' or '.' nor end with '.'.
fn check_edges(segments: &[Segment], start: usize) -> Result<(), HostlistError> {
    if let Some(Segment::Literal(l)) = segments.first() {
        let c = l.chars().next().unwrap_or('a');
        if c == '-' || c == '.' {
            return Err(HostlistError::BadEdge {
                pos: start + 1,
                ch: c,
            });
        }
    }
    if let Some(Segment::Literal(l)) = segments.last() {
        if l.ends_with('.') {
            return Err(HostlistError::BadEdge {
                pos: start + 1,
                ch: '.',
            });
        }
    }
    Ok(())
}

/// Parse `[...]` starting at `open`; returns the group and the index after `]`.
fn parse_group(chars: &[char], open: usize) -> Result<(Group, usize), HostlistError> {
    let mut i = open + 1;
    let mut ranges = Vec::new();
    let mut item_start = i;
    let mut item = String::new();
    loop {
        let Some(&c) = chars.get(i) else {
            return Err(HostlistError::Unclosed { pos: open + 1 });
        };
        match c {
            '[' => return Err(HostlistError::Nested { pos: i + 1 }),
            ',' | ']' => {
                ranges.push(parse_range(item.trim(), item_start + 1)?);
                item.clear();
                i += 1;
                item_start = i;
                if c == ']' {
                    return Ok((Group { ranges }, i));
                }
            }
            _ => {
                item.push(c);
                i += 1;
            }
        }
    }
}

fn parse_range(text: &str, pos: usize) -> Result<Range, HostlistError> {
    if text.is_empty() {
        return Err(HostlistError::EmptyRange { pos });
    }
    let (lo_s, hi_s) = match text.split_once('-') {
        Some((a, b)) => (a.trim(), b.trim()),
        None => (text, text),
    };
    let number = |s: &str| -> Result<u64, HostlistError> {
        if s.is_empty() || !s.chars().all(|c| c.is_ascii_digit()) {
            return Err(HostlistError::BadRange {
                pos,
                text: text.to_string(),
            });
        }
        if s.len() > MAX_DIGITS {
            return Err(HostlistError::NumberTooLong {
                pos,
                text: s.to_string(),
            });
        }
        s.parse::<u64>().map_err(|_| HostlistError::BadRange {
            pos,
            text: text.to_string(),
        })
    };
    let lo = number(lo_s)?;
    let hi = number(hi_s)?;
    if lo > hi {
        return Err(HostlistError::Reversed {
            pos,
            lo: lo_s.to_string(),
            hi: hi_s.to_string(),
        });
    }
    let padded = |s: &str| s.len() > 1 && s.starts_with('0');
    let width = if padded(lo_s) { lo_s.len() } else { 0 };
    if padded(hi_s) && hi_s.len() != lo_s.len() {
        return Err(HostlistError::Padding {
            pos,
            lo: lo_s.to_string(),
            hi: hi_s.to_string(),
            padded: pad(lo, hi_s.len()),
        });
    }
    Ok(Range { lo, hi, width })
}

/// How many hosts `list` names, without expanding it.
pub fn count(list: &str) -> Result<usize, HostlistError> {
    let mut total: u64 = 0;
    for p in parse(list)? {
        total += p.count().ok_or(HostlistError::TooLarge)?;
        if total > MAX_HOSTS as u64 {
            return Err(HostlistError::TooLarge);
        }
    }
    Ok(total as usize)
}

/// Expand a hostlist into host names, in order. Duplicates are kept (the
/// caller decides whether they are an error).
pub fn expand(list: &str) -> Result<Vec<String>, HostlistError> {
    let patterns = parse(list)?;
    let mut total: u64 = 0;
    for p in &patterns {
        total += p.count().ok_or(HostlistError::TooLarge)?;
        if total > MAX_HOSTS as u64 {
            return Err(HostlistError::TooLarge);
        }
    }
    let mut out = Vec::with_capacity(total as usize);
    for p in &patterns {
        p.expand_into(&mut out);
    }
    Ok(out)
}

/// Split a host name around its last run of digits: `node12-ib` is
/// (`node`, `12`, `-ib`).
fn split_number(host: &str) -> Option<(&str, &str, &str)> {
    let bytes = host.as_bytes();
    let end = bytes.iter().rposition(|b| b.is_ascii_digit())? + 1;
    let start = bytes[..end]
        .iter()
        .rposition(|b| !b.is_ascii_digit())
        .map_or(0, |p| p + 1);
    if end - start > MAX_DIGITS {
        return None;
    }
    Some((&host[..start], &host[start..end], &host[end..]))
}

/// Compress host names into a hostlist that [`expand`]s back to exactly
/// the same names in the same order: `node0 node1 node2 node7 login1`
/// becomes `node[0-2,7],login1`.
pub fn compress<S: AsRef<str>>(hosts: &[S]) -> String {
    struct Run<'a> {
        prefix: &'a str,
        suffix: &'a str,
        width: usize,
        ranges: Vec<(u64, u64)>,
        first_digits: &'a str,
    }
    let mut runs: Vec<Result<Run<'_>, &str>> = Vec::new();
    for h in hosts {
        let h = h.as_ref();
        let Some((prefix, digits, suffix)) = split_number(h) else {
            runs.push(Err(h));
            continue;
        };
        let Ok(n) = digits.parse::<u64>() else {
            runs.push(Err(h));
            continue;
        };
        if let Some(Ok(run)) = runs.last_mut() {
            if run.prefix == prefix && run.suffix == suffix && pad(n, run.width) == digits {
                match run.ranges.last_mut() {
                    Some((_, hi)) if hi.checked_add(1) == Some(n) => *hi = n,
                    _ => run.ranges.push((n, n)),
                }
                continue;
            }
        }
        let width = if digits.len() > 1 && digits.starts_with('0') {
            digits.len()
        } else {
            0
        };
        runs.push(Ok(Run {
            prefix,
            suffix,
            width,
            ranges: vec![(n, n)],
            first_digits: digits,
        }));
    }
    let mut out = String::new();
    for (i, run) in runs.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match run {
            Err(h) => out.push_str(h),
            Ok(r) if r.ranges.len() == 1 && r.ranges[0].0 == r.ranges[0].1 => {
                let _ = write!(out, "{}{}{}", r.prefix, r.first_digits, r.suffix);
            }
            Ok(r) => {
                out.push_str(r.prefix);
                out.push('[');
                for (j, (lo, hi)) in r.ranges.iter().enumerate() {
                    if j > 0 {
                        out.push(',');
                    }
                    out.push_str(&pad(*lo, r.width));
                    if hi != lo {
                        // the upper bound only needs its own digits
                        let _ = write!(out, "-{}", pad(*hi, r.width));
                    }
                }
                out.push(']');
                out.push_str(r.suffix);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(s: &str) -> Vec<String> {
        expand(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn simple_ranges_and_singles() {
        assert_eq!(
            ex("node[0-3,7]"),
            ["node0", "node1", "node2", "node3", "node7"]
        );
        assert_eq!(ex("login1"), ["login1"]);
        assert_eq!(ex("node[5]"), ["node5"]);
        assert_eq!(ex("n[9-11]"), ["n9", "n10", "n11"]);
        assert_eq!(ex("node[3-4]-ib"), ["node3-ib", "node4-ib"]);
    }

    #[test]
    fn zero_padding_follows_lower_bound() {
        let v = ex("node[00-10]");
        assert_eq!(v.len(), 11);
        assert_eq!(v[0], "node00");
        assert_eq!(v[9], "node09");
        assert_eq!(v[10], "node10");
        assert_eq!(ex("n[007]"), ["n007"]);
        assert_eq!(ex("n[098-101]"), ["n098", "n099", "n100", "n101"]);
        assert!(matches!(
            expand("n[1-05]"),
            Err(HostlistError::Padding { .. })
        ));
    }

    #[test]
    fn multiple_groups_leftmost_slowest() {
        assert_eq!(
            ex("rack[1-2]n[1-3]"),
            ["rack1n1", "rack1n2", "rack1n3", "rack2n1", "rack2n2", "rack2n3"]
        );
    }

    #[test]
    fn top_level_lists_keep_order() {
        assert_eq!(ex("a,b[1-2]"), ["a", "b1", "b2"]);
        assert_eq!(ex("z, a[2,1]"), ["z", "a2", "a1"]);
        assert_eq!(count("a,b[1-2],c[0-9]x[0-9]").unwrap(), 103);
    }

    #[test]
    fn bad_syntax_is_reported_with_position() {
        assert_eq!(expand(""), Err(HostlistError::Empty));
        assert_eq!(expand("  "), Err(HostlistError::Empty));
        assert_eq!(expand("node[0-3"), Err(HostlistError::Unclosed { pos: 5 }));
        assert_eq!(
            expand("node0-3]"),
            Err(HostlistError::UnexpectedClose { pos: 8 })
        );
        assert_eq!(expand("a[1[2]]"), Err(HostlistError::Nested { pos: 4 }));
        assert!(matches!(
            expand("n[5-3]"),
            Err(HostlistError::Reversed { pos: 3, .. })
        ));
        assert_eq!(expand("n[]"), Err(HostlistError::EmptyRange { pos: 3 }));
        assert_eq!(expand("n[1,]"), Err(HostlistError::EmptyRange { pos: 5 }));
        assert!(matches!(
            expand("n[a-b]"),
            Err(HostlistError::BadRange { .. })
        ));
        assert!(matches!(
            expand("n[1-2-3]"),
            Err(HostlistError::BadRange { .. })
        ));
        assert_eq!(expand("a,,b"), Err(HostlistError::EmptyName { pos: 3 }));
        assert_eq!(expand("a,"), Err(HostlistError::EmptyName { pos: 3 }));
        assert_eq!(
            expand("a/b"),
            Err(HostlistError::BadChar { pos: 2, ch: '/' })
        );
        assert_eq!(
            expand("a b"),
            Err(HostlistError::BadChar { pos: 2, ch: ' ' })
        );
        assert!(matches!(expand(".."), Err(HostlistError::BadEdge { .. })));
        assert!(matches!(
            expand("../etc"),
            Err(HostlistError::BadChar { ch: '/', .. })
        ));
        assert!(matches!(expand("-n"), Err(HostlistError::BadEdge { .. })));
        assert!(matches!(expand("n."), Err(HostlistError::BadEdge { .. })));
        assert!(matches!(
            expand("n[1234567890123456789]"),
            Err(HostlistError::NumberTooLong { .. })
        ));
        // messages say what to do
        let msg = expand("n[5-3]").unwrap_err().to_string();
        assert!(msg.contains("write it low to high, 3-5"), "{msg}");
    }

    #[test]
    fn too_large_is_refused_before_allocating() {
        assert_eq!(expand("n[0-999999]").unwrap().len(), 1_000_000);
        assert_eq!(expand("n[0-1000000]"), Err(HostlistError::TooLarge));
        assert_eq!(expand("n[0-999999999999]"), Err(HostlistError::TooLarge));
        assert_eq!(expand("a[0-999]b[0-9999]"), Err(HostlistError::TooLarge));
        assert_eq!(
            expand("a[0-599999],b[0-599999]"),
            Err(HostlistError::TooLarge)
        );
        assert_eq!(
            count("a[0-599999],b[0-599999]"),
            Err(HostlistError::TooLarge)
        );
    }

    #[test]
    fn compress_round_trips() {
        let cases: &[&[&str]] = &[
            &["node0", "node1", "node2", "node7", "login1"],
            &["node08", "node09", "node10", "node11"],
            &["node10", "node09"],
            &["a", "b", "c"],
            &["n1-ib", "n2-ib", "n3", "n4"],
            &["rack1n1", "rack1n2", "rack2n1"],
            &["x5", "x3", "x4"],
            &["n001", "n002", "n1000"],
        ];
        for hosts in cases {
            let c = compress(hosts);
            assert_eq!(expand(&c).unwrap(), *hosts, "compressed {c}");
        }
        assert_eq!(
            compress(&["node0", "node1", "node2", "node7", "login1"]),
            "node[0-2,7],login1"
        );
        assert_eq!(compress(&["node08", "node09", "node10"]), "node[08-10]");
        assert_eq!(compress(&["n5"]), "n5");
        assert_eq!(compress::<&str>(&[]), "");
    }
}
