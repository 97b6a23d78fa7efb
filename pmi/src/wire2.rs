//! The PMI-2 wire protocol, as bytes, with no I/O.
//!
//! A PMI-2 connection starts in PMI-1 form: the client sends the plain line
//! [`INIT_LINE`] and the process manager answers with a PMI-1 line
//! (`cmd=response_to_init rc=0 pmi_version=2 pmi_subversion=0`, parsed by
//! [`crate::wire::parse_reply`]). From then on every message in either
//! direction is a **frame**: a 6-byte header holding the body's length in
//! decimal ASCII, padded with spaces (Slurm writes `%-6d`, so `"25    "`),
//! followed by the body, a list of `key=value;` pairs whose first key is
//! `cmd`:
//!
//! ```text
//! 59    cmd=fullinit;pmijobid=12.0;pmirank=3;threaded=FALSE;
//! ```
//!
//! A `;` inside a value is written twice (`;;`), as the PMI-2 wire
//! specification defines; keys may contain neither `;` nor `=`. (Slurm's
//! own server, in 22.05, does not decode `;;` in what clients send, so
//! [`crate::Pmi2Client`] refuses values with a `;` rather than rely on it.)
//!
//! The commands this crate uses, as Slurm 22.05's `mpi/pmi2` plugin
//! answers them:
//!
//! ```text
//! cmd=fullinit;pmijobid=J;pmirank=R;threaded=FALSE;
//!     -> cmd=fullinit-response;rc=0;pmi-version=2;pmi-subversion=0;rank=R;size=N;appnum=-1;debugged=FALSE;pmiverbose=FALSE;
//! cmd=job-getid;              -> cmd=job-getid-response;rc=0;jobid=J;
//! cmd=kvs-put;key=k;value=v;  -> cmd=kvs-put-response;rc=0;
//! cmd=kvs-fence;              -> cmd=kvs-fence-response;rc=0;      (once every rank has fenced)
//! cmd=kvs-get;jobid=J;srcid=-1;key=k;
//!     -> cmd=kvs-get-response;rc=0;found=TRUE;value=v;   or  ...;rc=0;found=FALSE;
//! cmd=finalize;               -> cmd=finalize-response;rc=0;       (then the server closes)
//! cmd=abort;isworld=TRUE;msg=m;  (no reply; the launcher ends the job)
//! ```

use std::fmt;

use thiserror::Error;

/// PMI version this module speaks.
pub const PMI2_VERSION: u32 = 2;
/// PMI subversion this module speaks.
pub const PMI2_SUBVERSION: u32 = 0;
/// The plain-text line that opens a PMI-2 connection.
pub const INIT_LINE: &str = "cmd=init pmi_version=2 pmi_subversion=0\n";
/// Length of the frame header.
pub const HEADER_LEN: usize = 6;
/// Largest body a frame may carry (MPICH's `PMII_MAX_COMMAND_LEN`).
pub const MAX_BODY: usize = 64 * 1024;
/// Longest key in bytes (PMI-2's `PMI2_MAX_KEYLEN` less the NUL).
pub const MAX_KEY: usize = 63;
/// Longest value in bytes (PMI-2's `PMI2_MAX_VALLEN` less the NUL).
pub const MAX_VALUE: usize = 1023;

/// What was wrong with a frame, or with a key or value meant for one.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Wire2Error {
    /// The 6-byte header is not a decimal length.
    #[error("pmi-2 frame header `{header}` is not a length in decimal digits")]
    BadHeader { header: String },
    /// The frame (or a body to be sent) is longer than [`MAX_BODY`].
    #[error("pmi-2 frame of {len} bytes is longer than the {max} allowed")]
    TooLong { len: usize, max: usize },
    /// The body is not UTF-8.
    #[error("pmi-2 frame body is not utf-8")]
    NotUtf8,
    /// The body does not start with `cmd=`.
    #[error("pmi-2 frame `{body}` does not start with `cmd=`")]
    NoCmd { body: String },
    /// A pair has no `=`.
    #[error("pmi-2 frame has `{token}` where a key=value pair should be")]
    NoEquals { token: String },
    /// A required field is missing.
    #[error("pmi-2 `{cmd}` lacks `{field}=`")]
    MissingField { cmd: String, field: &'static str },
    /// A numeric field did not parse.
    #[error("pmi-2 `{cmd}` has {field}=`{value}`, which is not an integer")]
    BadInteger {
        cmd: String,
        field: &'static str,
        value: String,
    },
    /// A key or value cannot be carried.
    #[error("pmi-2 {field} `{value}` {what}; encode it (e.g. hex or base64) without `;`, `=` or control characters")]
    BadChar {
        field: &'static str,
        value: String,
        what: &'static str,
    },
    /// A key or value is empty.
    #[error("pmi-2 {field} is empty; give it at least one character")]
    Empty { field: &'static str },
    /// A key or value is too long.
    #[error("pmi-2 {field} is {len} bytes but at most {max} are allowed; shorten it")]
    FieldTooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
}

/// One PMI-2 command or response: a name and its pairs, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    name: String,
    pairs: Vec<(String, String)>,
}

impl Command {
    /// A command named `name` with no pairs yet.
    pub fn new(name: impl Into<String>) -> Self {
        Command {
            name: name.into(),
            pairs: Vec::new(),
        }
    }

    /// Appends `key=value` (builder style).
    pub fn arg(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.pairs.push((key.into(), value.into()));
        self
    }

    /// The command's name (the value of `cmd`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The pairs after `cmd`, in order (keys may repeat).
    pub fn pairs(&self) -> &[(String, String)] {
        &self.pairs
    }

    /// The first value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The value of `field`, which must be present.
    pub fn require(&self, field: &'static str) -> Result<&str, Wire2Error> {
        self.get(field).ok_or_else(|| Wire2Error::MissingField {
            cmd: self.name.clone(),
            field,
        })
    }

    /// The value of `field` as an integer; it must be present.
    pub fn int(&self, field: &'static str) -> Result<i64, Wire2Error> {
        let v = self.require(field)?;
        v.trim().parse().map_err(|_| Wire2Error::BadInteger {
            cmd: self.name.clone(),
            field,
            value: v.to_owned(),
        })
    }

    /// `rc`, which a response must carry.
    pub fn rc(&self) -> Result<i64, Wire2Error> {
        self.int("rc")
    }

    /// The value of a boolean field (`TRUE`/`FALSE`, any case); absent or
    /// anything else is false.
    pub fn flag(&self, field: &str) -> bool {
        self.get(field)
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
    }

    /// The body: `cmd=NAME;key=value;...;` with `;` in values doubled.
    pub fn encode_body(&self) -> String {
        let mut out = String::with_capacity(16 + self.pairs.len() * 16);
        out.push_str("cmd=");
        escape_into(&mut out, &self.name);
        out.push(';');
        for (k, v) in &self.pairs {
            out.push_str(k);
            out.push('=');
            escape_into(&mut out, v);
            out.push(';');
        }
        out
    }

    /// The whole frame: header and body. Fails if the body is longer than
    /// [`MAX_BODY`].
    pub fn encode(&self) -> Result<Vec<u8>, Wire2Error> {
        let body = self.encode_body();
        if body.len() > MAX_BODY {
            return Err(Wire2Error::TooLong {
                len: body.len(),
                max: MAX_BODY,
            });
        }
        let mut out = format!("{:<width$}", body.len(), width = HEADER_LEN).into_bytes();
        out.extend_from_slice(body.as_bytes());
        Ok(out)
    }

    /// Parses a body (without its header). The final `;` may be missing.
    pub fn parse_body(body: &[u8]) -> Result<Command, Wire2Error> {
        let body = std::str::from_utf8(body).map_err(|_| Wire2Error::NotUtf8)?;
        let mut pairs = Vec::new();
        let mut rest = body;
        while !rest.is_empty() {
            let Some(eq) = rest
                .find(['=', ';'])
                .filter(|&i| rest.as_bytes()[i] == b'=')
            else {
                let end = rest.find(';').unwrap_or(rest.len());
                return Err(Wire2Error::NoEquals {
                    token: rest[..end].to_owned(),
                });
            };
            let key = &rest[..eq];
            let (value, consumed) = unescape_value(&rest[eq + 1..]);
            pairs.push((key.to_owned(), value));
            rest = &rest[eq + 1 + consumed..];
        }
        let mut it = pairs.into_iter();
        match it.next() {
            Some((k, name)) if k == "cmd" && !name.is_empty() => Ok(Command {
                name,
                pairs: it.collect(),
            }),
            _ => Err(Wire2Error::NoCmd {
                body: body.chars().take(200).collect(),
            }),
        }
    }
}

impl fmt::Display for Command {
    /// The body, as it travels, cut to 200 characters (for error messages).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let body = self.encode_body();
        let cut: String = body.chars().take(200).collect();
        f.write_str(&cut)?;
        if cut.len() < body.len() {
            f.write_str("...")?;
        }
        Ok(())
    }
}

/// The body length a 6-byte header announces. Leading and trailing spaces
/// are allowed (servers differ in how they pad); anything else is refused,
/// as is a length over [`MAX_BODY`].
pub fn parse_header(header: &[u8]) -> Result<usize, Wire2Error> {
    let bad = || Wire2Error::BadHeader {
        header: String::from_utf8_lossy(header).escape_debug().to_string(),
    };
    if header.len() != HEADER_LEN {
        return Err(bad());
    }
    let text = std::str::from_utf8(header)
        .map_err(|_| bad())?
        .trim_matches(' ');
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let len: usize = text.parse().map_err(|_| bad())?;
    if len > MAX_BODY {
        return Err(Wire2Error::TooLong { len, max: MAX_BODY });
    }
    Ok(len)
}

/// `;` doubled.
fn escape_into(out: &mut String, v: &str) {
    for c in v.chars() {
        if c == ';' {
            out.push(';');
        }
        out.push(c);
    }
}

/// Reads a value up to its terminating `;` (a doubled `;` is a literal
/// one). Returns the value and how many bytes it used, terminator included.
fn unescape_value(s: &str) -> (String, usize) {
    let b = s.as_bytes();
    let mut out = String::new();
    let mut start = 0;
    let mut i = 0;
    while i < b.len() {
        if b[i] == b';' {
            out.push_str(&s[start..i]);
            if b.get(i + 1) == Some(&b';') {
                out.push(';');
                i += 2;
                start = i;
                continue;
            }
            return (out, i + 1);
        }
        i += 1;
    }
    out.push_str(&s[start..]);
    (out, b.len())
}

/// Checks a key for a `kvs-put` or `kvs-get`: non-empty, at most
/// [`MAX_KEY`] bytes, no `;`, `=`, whitespace or control characters.
pub fn check_key(key: &str) -> Result<(), Wire2Error> {
    check("key", key, MAX_KEY, true)
}

/// Checks a value for a `kvs-put`: non-empty, at most [`MAX_VALUE`] bytes,
/// no `;` (Slurm's server does not decode `;;`) and no control characters.
pub fn check_value(value: &str) -> Result<(), Wire2Error> {
    check("value", value, MAX_VALUE, false)
}

fn check(field: &'static str, v: &str, max: usize, is_key: bool) -> Result<(), Wire2Error> {
    if v.is_empty() {
        return Err(Wire2Error::Empty { field });
    }
    if v.len() > max {
        return Err(Wire2Error::FieldTooLong {
            field,
            len: v.len(),
            max,
        });
    }
    let bad = |what| Wire2Error::BadChar {
        field,
        value: v.chars().take(100).collect(),
        what,
    };
    for c in v.chars() {
        match c {
            ';' => return Err(bad("contains `;`")),
            '=' if is_key => return Err(bad("contains `=`")),
            c if is_key && c.is_whitespace() => return Err(bad("contains whitespace")),
            c if c.is_control() => return Err(bad("contains a control character")),
            _ => {}
        }
    }
    Ok(())
}

/// Turns free text (an abort message) into a value: `;` and control
/// characters become `_`, and it is cut to [`MAX_VALUE`] bytes.
pub fn sanitize_message(msg: &str) -> String {
    let mut out = String::new();
    for c in msg.chars() {
        let c = if c == ';' || c.is_control() { '_' } else { c };
        if out.len() + c.len_utf8() > MAX_VALUE {
            break;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_a_frame_with_a_left_justified_header() {
        let c = Command::new("fullinit")
            .arg("pmijobid", "12.0")
            .arg("pmirank", "3")
            .arg("threaded", "FALSE");
        let body = "cmd=fullinit;pmijobid=12.0;pmirank=3;threaded=FALSE;";
        assert_eq!(c.encode_body(), body);
        let frame = c.encode().unwrap();
        assert_eq!(
            &frame[..HEADER_LEN],
            format!("{:<6}", body.len()).as_bytes()
        );
        assert_eq!(&frame[HEADER_LEN..], body.as_bytes());
        assert_eq!(
            Command::new("kvs-fence").encode().unwrap(),
            b"14    cmd=kvs-fence;"
        );
    }

    #[test]
    fn parses_what_slurm_sends() {
        let body = b"cmd=fullinit-response;rc=0;pmi-version=2;pmi-subversion=0;rank=3;size=8;appnum=-1;debugged=FALSE;pmiverbose=FALSE;";
        let c = Command::parse_body(body).unwrap();
        assert_eq!(c.name(), "fullinit-response");
        assert_eq!(c.rc().unwrap(), 0);
        assert_eq!(c.int("rank").unwrap(), 3);
        assert_eq!(c.int("size").unwrap(), 8);
        assert_eq!(c.int("appnum").unwrap(), -1);
        assert!(!c.flag("debugged"));
        let g = Command::parse_body(b"cmd=kvs-get-response;rc=0;found=TRUE;value=a,b=c;").unwrap();
        assert!(g.flag("found"));
        assert_eq!(g.get("value"), Some("a,b=c"), "a value may hold `=`");
        let nf = Command::parse_body(b"cmd=kvs-get-response;rc=0;found=FALSE;").unwrap();
        assert!(!nf.flag("found"));
        assert_eq!(nf.get("value"), None);
    }

    #[test]
    fn semicolons_in_values_are_doubled_and_round_trip() {
        for v in ["a;b", ";", ";;", "x;", ";x", "plain", "", "a;;;b;"] {
            let c = Command::new("kvs-put").arg("key", "k").arg("value", v);
            let body = c.encode_body();
            let back = Command::parse_body(body.as_bytes()).unwrap();
            assert_eq!(back, c, "value {v:?} via {body:?}");
        }
        assert_eq!(
            Command::new("abort").arg("msg", "x;y").encode_body(),
            "cmd=abort;msg=x;;y;"
        );
        let c = Command::parse_body(b"cmd=kvs-put;value=a;;b;key=k;").unwrap();
        assert_eq!(c.get("value"), Some("a;b"));
        assert_eq!(c.get("key"), Some("k"));
    }

    #[test]
    fn missing_final_semicolon_and_repeated_keys() {
        let c = Command::parse_body(b"cmd=spawn;argv=a;argv=b").unwrap();
        assert_eq!(c.get("argv"), Some("a"), "first wins");
        assert_eq!(c.pairs().len(), 2);
    }

    #[test]
    fn garbage_bodies_are_refused() {
        assert!(matches!(
            Command::parse_body(b"rc=0;cmd=x;"),
            Err(Wire2Error::NoCmd { .. })
        ));
        assert!(matches!(
            Command::parse_body(b""),
            Err(Wire2Error::NoCmd { .. })
        ));
        assert!(matches!(
            Command::parse_body(b"cmd=;rc=0;"),
            Err(Wire2Error::NoCmd { .. })
        ));
        assert_eq!(
            Command::parse_body(b"cmd=x;junk;rc=0;"),
            Err(Wire2Error::NoEquals {
                token: "junk".into()
            })
        );
        assert_eq!(
            Command::parse_body(b"cmd=x;trailing"),
            Err(Wire2Error::NoEquals {
                token: "trailing".into()
            })
        );
        assert_eq!(
            Command::parse_body(&[b'c', b'm', b'd', b'=', 0xff]),
            Err(Wire2Error::NotUtf8)
        );
        let c = Command::parse_body(b"cmd=x;rc=zero;").unwrap();
        assert!(matches!(
            c.rc(),
            Err(Wire2Error::BadInteger { field: "rc", .. })
        ));
        assert!(matches!(
            c.int("size"),
            Err(Wire2Error::MissingField { field: "size", .. })
        ));
    }

    #[test]
    fn headers() {
        assert_eq!(parse_header(b"25    ").unwrap(), 25);
        assert_eq!(parse_header(b"    25").unwrap(), 25, "right-justified too");
        assert_eq!(parse_header(b"000007").unwrap(), 7);
        assert_eq!(parse_header(b"65536 ").unwrap(), MAX_BODY);
        assert!(matches!(
            parse_header(b"65537 "),
            Err(Wire2Error::TooLong { len: 65537, .. })
        ));
        for bad in [
            &b"cmd=re"[..],
            b"      ",
            b"-1    ",
            b"1 2   ",
            b"12\n   ",
            b"25",
            b"\xff\xff\xff\xff\xff\xff",
        ] {
            let err = parse_header(bad).unwrap_err();
            assert!(
                matches!(err, Wire2Error::BadHeader { .. }),
                "{bad:?}: {err:?}"
            );
        }
        // A PMI-1 line where a frame should be reads as a bad header.
        let err = parse_header(&b"cmd=response_to_init"[..6]).unwrap_err();
        assert!(err.to_string().contains("`cmd=re`"), "{err}");
    }

    #[test]
    fn too_long_body_is_refused_on_encode() {
        let c = Command::new("kvs-put").arg("value", "v".repeat(MAX_BODY));
        assert!(matches!(c.encode(), Err(Wire2Error::TooLong { .. })));
    }

    #[test]
    fn keys_and_values_are_checked() {
        assert!(check_key("canopy.7").is_ok());
        assert!(check_value("0123abcd,tcp://10.0.0.1:5000").is_ok());
        assert!(check_value("with space is fine").is_ok());
        assert!(matches!(
            check_key(""),
            Err(Wire2Error::Empty { field: "key" })
        ));
        assert!(matches!(
            check_key(&"k".repeat(MAX_KEY + 1)),
            Err(Wire2Error::FieldTooLong { field: "key", .. })
        ));
        assert!(check_key(&"k".repeat(MAX_KEY)).is_ok());
        assert!(matches!(
            check_value(&"v".repeat(MAX_VALUE + 1)),
            Err(Wire2Error::FieldTooLong { field: "value", .. })
        ));
        for k in ["a;b", "a=b", "a b", "a\nb"] {
            assert!(
                matches!(check_key(k), Err(Wire2Error::BadChar { .. })),
                "{k:?}"
            );
        }
        let err = check_value("a;b").unwrap_err();
        assert!(err.to_string().contains("`;`"), "{err}");
        assert!(check_value("a\u{1}b").is_err());
    }

    #[test]
    fn abort_messages_are_sanitized() {
        assert_eq!(sanitize_message("out;of\nmemory"), "out_of_memory");
        assert_eq!(sanitize_message(&"x".repeat(5000)).len(), MAX_VALUE);
    }

    #[test]
    fn display_cuts_long_bodies() {
        let c = Command::new("kvs-put").arg("value", "v".repeat(500));
        let s = c.to_string();
        assert!(s.ends_with("...") && s.len() == 203, "{}", s.len());
    }
}
