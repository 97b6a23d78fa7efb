//! The PMI-1 "simple" wire protocol, as text, with no I/O.
//!
//! Each message is one line: `cmd=NAME key=value key=value\n`. Tokens are
//! separated by spaces, a value runs to the next space or the end of the line
//! and may itself contain `=` (it is split at the first one). Values can never
//! contain a space or a newline, so [`Request::put`] refuses them.
//!
//! The formats follow MPICH's client (`simple_pmi.c`, later `pmi_v1.c`) and
//! the hydra proxy (`hydra_pmi_proxy`) of MPICH 4.0, checked against a live
//! `mpiexec` from Debian's mpich 4.0.2:
//!
//! ```text
//! cmd=init pmi_version=1 pmi_subversion=1   -> cmd=response_to_init pmi_version=1 pmi_subversion=1 rc=0
//! cmd=get_maxes                             -> cmd=maxes kvsname_max=256 keylen_max=64 vallen_max=1024
//! cmd=get_my_kvsname                        -> cmd=my_kvsname kvsname=kvs_6225_0_765629194_vm
//! cmd=get_appnum                            -> cmd=appnum appnum=0
//! cmd=get_universe_size                     -> cmd=universe_size size=-1
//! cmd=put kvsname=K key=k value=v           -> cmd=put_result rc=0 msg=success
//! cmd=get kvsname=K key=k                   -> cmd=get_result rc=0 msg=success value=v
//! cmd=get kvsname=K key=nosuch              -> cmd=get_result rc=-1 msg=key_nosuch_not_found value=unknown
//! cmd=barrier_in                            -> cmd=barrier_out
//! cmd=finalize                              -> cmd=finalize_ack
//! cmd=abort exitcode=7 message=boom         -> (no reply; the launcher ends the job)
//! ```
//!
//! Hydra 4.0 sends no `rc` with `maxes`, `my_kvsname`, `appnum` and
//! `universe_size`; newer servers may. [`parse_reply`] accepts both, and
//! [`Reply::encode`] appends `rc=0` (every MPICH client ignores keys it does
//! not look for).

use std::collections::HashMap;
use std::fmt;

use thiserror::Error;

/// PMI version this crate speaks.
pub const PMI_VERSION: u32 = 1;
/// PMI subversion this crate speaks.
pub const PMI_SUBVERSION: u32 = 1;
/// Longest kvsname a server hands out, as hydra advertises it.
pub const KVSNAME_MAX: usize = 256;
/// Key buffer size hydra advertises; keys are at most `KEYLEN_MAX - 1` bytes
/// (MPICH sizes its buffers with the terminating NUL included).
pub const KEYLEN_MAX: usize = 64;
/// Value buffer size hydra advertises; values are at most `VALLEN_MAX - 1` bytes.
pub const VALLEN_MAX: usize = 1024;
/// Longest line either side of this crate reads, newline included.
pub const MAX_LINE: usize = 16 * 1024;

/// What was wrong with a line, or with a value meant for one.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WireError {
    /// The line was empty.
    #[error("empty pmi line; send `cmd=NAME key=value ...` terminated by a newline")]
    Empty,
    /// The line did not start with `cmd=`.
    #[error("pmi line `{line}` does not start with `cmd=`; send `cmd=NAME key=value ...`")]
    NoCmd { line: String },
    /// The multi-line `mcmd=spawn` form (PMI_Spawn_multiple).
    #[error("`mcmd=` lines (PMI_Spawn_multiple) are not supported; start all ranks up front")]
    Mcmd,
    /// A command this crate does not know.
    #[error("unknown pmi command `{cmd}`; only the PMI-1 simple commands (init, get_maxes, put, get, barrier_in, finalize, ...) are supported")]
    UnknownCommand { cmd: String },
    /// A required field was missing.
    #[error("pmi `{cmd}` line lacks `{field}=`; add it")]
    MissingField { cmd: String, field: &'static str },
    /// A numeric field did not parse.
    #[error(
        "pmi `{cmd}` line has {field}=`{value}`, which is not an integer; send a decimal integer"
    )]
    BadInteger {
        cmd: String,
        field: &'static str,
        value: String,
    },
    /// A token had no `=`.
    #[error("pmi token `{token}` has no `=`; write tokens as key=value")]
    BadToken { token: String },
    /// A key or value contains a character the line format cannot carry.
    #[error("pmi {field} `{value}` contains {what}; encode it without spaces, newlines or backslashes (e.g. hex or base64)")]
    BadChar {
        field: &'static str,
        value: String,
        what: &'static str,
    },
    /// A key or value is empty.
    #[error("pmi {field} is empty; give it at least one character")]
    EmptyField { field: &'static str },
    /// A key or value is too long.
    #[error("pmi {field} is {len} bytes but at most {max} are allowed; shorten it")]
    TooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    /// A reply without its own rc field reported failure.
    #[error("process manager answered `{cmd}` with rc={rc} ({msg}); check the launcher's log")]
    Failed { cmd: String, rc: i32, msg: String },
}

/// A message from a PMI client (a rank) to the process manager.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `cmd=init pmi_version=1 pmi_subversion=1`
    Init {
        pmi_version: u32,
        pmi_subversion: u32,
    },
    /// `cmd=get_maxes`
    GetMaxes,
    /// `cmd=get_appnum`
    GetAppnum,
    /// `cmd=get_my_kvsname`
    GetMyKvsname,
    /// `cmd=get_universe_size`
    GetUniverseSize,
    /// `cmd=put kvsname=K key=k value=v`. An empty `kvsname` means "my own".
    Put {
        kvsname: String,
        key: String,
        value: String,
    },
    /// `cmd=get kvsname=K key=k`. An empty `kvsname` means "my own".
    Get { kvsname: String, key: String },
    /// `cmd=barrier_in`
    BarrierIn,
    /// `cmd=finalize`
    Finalize,
    /// `cmd=abort exitcode=N message=M` (both optional). Has no reply.
    Abort {
        code: Option<i32>,
        msg: Option<String>,
    },
}

/// A message from the process manager to a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `cmd=response_to_init pmi_version=1 pmi_subversion=1 rc=0`
    ResponseToInit {
        rc: i32,
        pmi_version: u32,
        pmi_subversion: u32,
    },
    /// `cmd=maxes kvsname_max=256 keylen_max=64 vallen_max=1024 rc=0`
    Maxes {
        kvsname_max: usize,
        keylen_max: usize,
        vallen_max: usize,
    },
    /// `cmd=appnum appnum=0 rc=0`
    Appnum { appnum: i32 },
    /// `cmd=my_kvsname kvsname=K rc=0`
    MyKvsname { kvsname: String },
    /// `cmd=universe_size size=N rc=0` (-1 means unlimited)
    UniverseSize { size: i32 },
    /// `cmd=put_result rc=0 msg=success`
    PutResult { rc: i32, msg: String },
    /// `cmd=get_result rc=0 msg=success value=v`; a missing key is
    /// `rc=-1 msg=key_K_not_found value=unknown`.
    GetResult { rc: i32, value: String, msg: String },
    /// `cmd=barrier_out`
    BarrierOut,
    /// `cmd=finalize_ack`
    FinalizeAck,
}

/// The command name of a line (`put` for `cmd=put key=...`), if it has one.
/// Lets a server answer a malformed `put` with a `put_result` error.
pub fn command_name(line: &str) -> Option<&str> {
    let first = line
        .trim_start_matches(' ')
        .split([' ', '\n', '\r'])
        .next()?;
    first.strip_prefix("cmd=").filter(|c| !c.is_empty())
}

/// A parsed line: command name plus its fields (first occurrence wins).
struct Line<'a> {
    cmd: &'a str,
    fields: HashMap<&'a str, &'a str>,
}

impl<'a> Line<'a> {
    fn parse(line: &'a str) -> Result<Self, WireError> {
        if line.trim_start_matches(' ').starts_with("mcmd=") {
            return Err(WireError::Mcmd);
        }
        let line = line.strip_suffix('\n').unwrap_or(line);
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.contains('\n') {
            return Err(WireError::BadChar {
                field: "line",
                value: line.to_owned(),
                what: "an embedded newline",
            });
        }
        // Only one `\r` may end a line: a value ending in `\r` would lose
        // it when written back out and read again (`cmd=put ... value=v\r\r\n`
        // stored "v\r" but served "v"), found by the `pmi` fuzz target.
        if line.contains('\r') {
            return Err(WireError::BadChar {
                field: "line",
                value: line.to_owned(),
                what: "an embedded carriage return",
            });
        }
        let mut tokens = line.split(' ').filter(|t| !t.is_empty());
        let first = tokens.next().ok_or(WireError::Empty)?;
        let cmd = match first.strip_prefix("cmd=") {
            Some(cmd) if !cmd.is_empty() => cmd,
            _ => {
                return Err(WireError::NoCmd {
                    line: line.to_owned(),
                })
            }
        };
        let mut fields = HashMap::new();
        for token in tokens {
            let (k, v) = token.split_once('=').ok_or_else(|| WireError::BadToken {
                token: token.to_owned(),
            })?;
            fields.entry(k).or_insert(v);
        }
        Ok(Line { cmd, fields })
    }

    fn opt(&self, field: &str) -> Option<&'a str> {
        self.fields.get(field).copied()
    }

    fn req(&self, field: &'static str) -> Result<&'a str, WireError> {
        self.opt(field).ok_or_else(|| WireError::MissingField {
            cmd: self.cmd.to_owned(),
            field,
        })
    }

    fn int<T: std::str::FromStr>(&self, field: &'static str) -> Result<T, WireError> {
        let v = self.req(field)?;
        self.parse_int(field, v)
    }

    fn opt_int<T: std::str::FromStr>(&self, field: &'static str) -> Result<Option<T>, WireError> {
        self.opt(field)
            .map(|v| self.parse_int(field, v))
            .transpose()
    }

    fn parse_int<T: std::str::FromStr>(
        &self,
        field: &'static str,
        v: &str,
    ) -> Result<T, WireError> {
        v.parse().map_err(|_| WireError::BadInteger {
            cmd: self.cmd.to_owned(),
            field,
            value: v.to_owned(),
        })
    }

    /// `rc` for replies that carry it only optionally; non-zero is an error.
    fn check_rc(&self) -> Result<(), WireError> {
        match self.opt_int::<i32>("rc")? {
            None | Some(0) => Ok(()),
            Some(rc) => Err(WireError::Failed {
                cmd: self.cmd.to_owned(),
                rc,
                msg: self.opt("msg").unwrap_or("no message").to_owned(),
            }),
        }
    }
}

/// Checks that `value` can travel in a line as the field `field`: non-empty,
/// shorter than `max` bytes (`max` counts MPICH's terminating NUL), and free
/// of space, tab, newline, carriage return and backslash (MPICH 4.1+ reads a
/// backslash as an escape, MPICH 4.0 does not).
pub fn check_value(field: &'static str, value: &str, max: usize) -> Result<(), WireError> {
    if value.is_empty() {
        return Err(WireError::EmptyField { field });
    }
    if value.len() >= max {
        return Err(WireError::TooLong {
            field,
            len: value.len(),
            max: max.saturating_sub(1),
        });
    }
    let bad = |what| WireError::BadChar {
        field,
        value: value.to_owned(),
        what,
    };
    for c in value.chars() {
        match c {
            ' ' | '\t' => return Err(bad("a space")),
            '\n' | '\r' => return Err(bad("a newline")),
            '\\' => return Err(bad("a backslash")),
            c if c.is_control() => return Err(bad("a control character")),
            _ => {}
        }
    }
    Ok(())
}

/// Turns free text (an abort message) into one value: whitespace and
/// backslashes become `_`, control characters are dropped, and it is cut to
/// fit [`VALLEN_MAX`].
pub fn sanitize_message(msg: &str) -> String {
    let mut out = String::new();
    for c in msg.chars() {
        let c = match c {
            c if c.is_whitespace() || c == '\\' => '_',
            c if c.is_control() => continue,
            c => c,
        };
        if out.len() + c.len_utf8() >= VALLEN_MAX {
            break;
        }
        out.push(c);
    }
    out
}

impl Request {
    /// A `put` of `key`=`value`, checked against the maxima the server gave.
    pub fn put(
        kvsname: &str,
        key: &str,
        value: &str,
        keylen_max: usize,
        vallen_max: usize,
    ) -> Result<Self, WireError> {
        check_value("key", key, keylen_max)?;
        check_value("value", value, vallen_max)?;
        Ok(Request::Put {
            kvsname: kvsname.to_owned(),
            key: key.to_owned(),
            value: value.to_owned(),
        })
    }

    /// A `get` of `key`, checked against the server's key maximum.
    pub fn get(kvsname: &str, key: &str, keylen_max: usize) -> Result<Self, WireError> {
        check_value("key", key, keylen_max)?;
        Ok(Request::Get {
            kvsname: kvsname.to_owned(),
            key: key.to_owned(),
        })
    }

    /// The command name, e.g. `barrier_in`.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Init { .. } => "init",
            Request::GetMaxes => "get_maxes",
            Request::GetAppnum => "get_appnum",
            Request::GetMyKvsname => "get_my_kvsname",
            Request::GetUniverseSize => "get_universe_size",
            Request::Put { .. } => "put",
            Request::Get { .. } => "get",
            Request::BarrierIn => "barrier_in",
            Request::Finalize => "finalize",
            Request::Abort { .. } => "abort",
        }
    }

    /// The line, newline included. Fields are written as given; build `put`
    /// and `get` with [`Request::put`] / [`Request::get`] to have them checked.
    pub fn encode(&self) -> String {
        let mut s = format!("cmd={}", self.name());
        match self {
            Request::Init {
                pmi_version,
                pmi_subversion,
            } => {
                s += &format!(" pmi_version={pmi_version} pmi_subversion={pmi_subversion}");
            }
            Request::Put {
                kvsname,
                key,
                value,
            } => {
                if !kvsname.is_empty() {
                    s += &format!(" kvsname={kvsname}");
                }
                s += &format!(" key={key} value={value}");
            }
            Request::Get { kvsname, key } => {
                if !kvsname.is_empty() {
                    s += &format!(" kvsname={kvsname}");
                }
                s += &format!(" key={key}");
            }
            Request::Abort { code, msg } => {
                if let Some(code) = code {
                    s += &format!(" exitcode={code}");
                }
                if let Some(msg) = msg {
                    s += &format!(" message={msg}");
                }
            }
            Request::GetMaxes
            | Request::GetAppnum
            | Request::GetMyKvsname
            | Request::GetUniverseSize
            | Request::BarrierIn
            | Request::Finalize => {}
        }
        s.push('\n');
        s
    }
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.encode().trim_end())
    }
}

impl Reply {
    /// The command name, e.g. `barrier_out`.
    pub fn name(&self) -> &'static str {
        match self {
            Reply::ResponseToInit { .. } => "response_to_init",
            Reply::Maxes { .. } => "maxes",
            Reply::Appnum { .. } => "appnum",
            Reply::MyKvsname { .. } => "my_kvsname",
            Reply::UniverseSize { .. } => "universe_size",
            Reply::PutResult { .. } => "put_result",
            Reply::GetResult { .. } => "get_result",
            Reply::BarrierOut => "barrier_out",
            Reply::FinalizeAck => "finalize_ack",
        }
    }

    /// The line, newline included, in the field order hydra uses.
    pub fn encode(&self) -> String {
        let body = match self {
            Reply::ResponseToInit {
                rc,
                pmi_version,
                pmi_subversion,
            } => format!(" pmi_version={pmi_version} pmi_subversion={pmi_subversion} rc={rc}"),
            Reply::Maxes {
                kvsname_max,
                keylen_max,
                vallen_max,
            } => format!(
                " kvsname_max={kvsname_max} keylen_max={keylen_max} vallen_max={vallen_max} rc=0"
            ),
            Reply::Appnum { appnum } => format!(" appnum={appnum} rc=0"),
            Reply::MyKvsname { kvsname } => format!(" kvsname={kvsname} rc=0"),
            Reply::UniverseSize { size } => format!(" size={size} rc=0"),
            Reply::PutResult { rc, msg } => format!(" rc={rc} msg={msg}"),
            Reply::GetResult { rc, value, msg } => format!(" rc={rc} msg={msg} value={value}"),
            Reply::BarrierOut | Reply::FinalizeAck => String::new(),
        };
        format!("cmd={}{body}\n", self.name())
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.encode().trim_end())
    }
}

/// Parses one request line (trailing newline optional).
///
/// Unknown extra fields are ignored, as MPICH's servers do. `put` accepts an
/// empty or missing `value` (hydra stores ""), and both `put` and `get`
/// accept a missing `kvsname` (PMI 1.1 makes it optional).
pub fn parse_request(line: &str) -> Result<Request, WireError> {
    let l = Line::parse(line)?;
    Ok(match l.cmd {
        "init" => Request::Init {
            pmi_version: l.int("pmi_version")?,
            pmi_subversion: l.int("pmi_subversion")?,
        },
        "get_maxes" => Request::GetMaxes,
        "get_appnum" => Request::GetAppnum,
        "get_my_kvsname" => Request::GetMyKvsname,
        "get_universe_size" => Request::GetUniverseSize,
        "put" => Request::Put {
            kvsname: l.opt("kvsname").unwrap_or_default().to_owned(),
            key: l.req("key")?.to_owned(),
            value: l.opt("value").unwrap_or_default().to_owned(),
        },
        "get" => Request::Get {
            kvsname: l.opt("kvsname").unwrap_or_default().to_owned(),
            key: l.req("key")?.to_owned(),
        },
        "barrier_in" => Request::BarrierIn,
        "finalize" => Request::Finalize,
        "abort" => Request::Abort {
            code: l.opt_int("exitcode")?,
            msg: l.opt("message").map(str::to_owned),
        },
        other => {
            return Err(WireError::UnknownCommand {
                cmd: other.to_owned(),
            })
        }
    })
}

/// Parses one reply line (trailing newline optional).
///
/// For replies whose variant has no `rc` (`maxes`, `appnum`, ...), a present
/// non-zero `rc` is returned as [`WireError::Failed`].
pub fn parse_reply(line: &str) -> Result<Reply, WireError> {
    let l = Line::parse(line)?;
    let msg = |default: &str| l.opt("msg").unwrap_or(default).to_owned();
    Ok(match l.cmd {
        "response_to_init" => Reply::ResponseToInit {
            rc: l.opt_int("rc")?.unwrap_or(0),
            pmi_version: l.int("pmi_version")?,
            pmi_subversion: l.int("pmi_subversion")?,
        },
        "maxes" => {
            l.check_rc()?;
            Reply::Maxes {
                kvsname_max: l.int("kvsname_max")?,
                keylen_max: l.int("keylen_max")?,
                vallen_max: l.int("vallen_max")?,
            }
        }
        "appnum" => {
            l.check_rc()?;
            Reply::Appnum {
                appnum: l.int("appnum")?,
            }
        }
        "my_kvsname" => {
            l.check_rc()?;
            Reply::MyKvsname {
                kvsname: l.req("kvsname")?.to_owned(),
            }
        }
        "universe_size" => {
            l.check_rc()?;
            Reply::UniverseSize {
                size: l.int("size")?,
            }
        }
        "put_result" => Reply::PutResult {
            rc: l.opt_int("rc")?.unwrap_or(0),
            msg: msg("success"),
        },
        "get_result" => {
            let mut rc = l.opt_int("rc")?.unwrap_or(0);
            // PMI 1.1 also allows `found=FALSE` with rc=0 for a missing key.
            if rc == 0
                && l.opt("found")
                    .is_some_and(|f| f.eq_ignore_ascii_case("false"))
            {
                rc = -1;
            }
            if rc == 0 {
                Reply::GetResult {
                    rc,
                    value: l.opt("value").unwrap_or_default().to_owned(),
                    msg: msg("success"),
                }
            } else {
                Reply::GetResult {
                    rc,
                    value: l.opt("value").unwrap_or("unknown").to_owned(),
                    msg: msg("key_not_found"),
                }
            }
        }
        "barrier_out" => Reply::BarrierOut,
        "finalize_ack" => Reply::FinalizeAck,
        other => {
            return Err(WireError::UnknownCommand {
                cmd: other.to_owned(),
            })
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines exactly as MPICH 4.0.2's client sends them and hydra answers.
    #[test]
    fn golden_lines_from_hydra() {
        let kvs = "kvs_6225_0_765629194_vm";
        let cases: Vec<(&str, Reply)> = vec![
            (
                "cmd=response_to_init pmi_version=1 pmi_subversion=1 rc=0\n",
                Reply::ResponseToInit {
                    rc: 0,
                    pmi_version: 1,
                    pmi_subversion: 1,
                },
            ),
            (
                "cmd=maxes kvsname_max=256 keylen_max=64 vallen_max=1024\n",
                Reply::Maxes {
                    kvsname_max: 256,
                    keylen_max: 64,
                    vallen_max: 1024,
                },
            ),
            (
                "cmd=my_kvsname kvsname=kvs_6225_0_765629194_vm\n",
                Reply::MyKvsname {
                    kvsname: kvs.into(),
                },
            ),
            ("cmd=appnum appnum=0\n", Reply::Appnum { appnum: 0 }),
            (
                "cmd=universe_size size=-1\n",
                Reply::UniverseSize { size: -1 },
            ),
            (
                "cmd=put_result rc=0 msg=success\n",
                Reply::PutResult {
                    rc: 0,
                    msg: "success".into(),
                },
            ),
            (
                "cmd=get_result rc=0 msg=success value=(vector,(0,1,1))\n",
                Reply::GetResult {
                    rc: 0,
                    value: "(vector,(0,1,1))".into(),
                    msg: "success".into(),
                },
            ),
            (
                "cmd=get_result rc=-1 msg=key_nosuch_not_found value=unknown\n",
                Reply::GetResult {
                    rc: -1,
                    value: "unknown".into(),
                    msg: "key_nosuch_not_found".into(),
                },
            ),
            ("cmd=barrier_out\n", Reply::BarrierOut),
            ("cmd=finalize_ack\n", Reply::FinalizeAck),
        ];
        for (line, want) in cases {
            assert_eq!(parse_reply(line).unwrap(), want, "{line}");
        }

        let requests: Vec<(&str, Request)> = vec![
            (
                "cmd=init pmi_version=1 pmi_subversion=1\n",
                Request::Init {
                    pmi_version: 1,
                    pmi_subversion: 1,
                },
            ),
            ("cmd=get_maxes\n", Request::GetMaxes),
            ("cmd=get_appnum\n", Request::GetAppnum),
            ("cmd=get_my_kvsname\n", Request::GetMyKvsname),
            ("cmd=get_universe_size\n", Request::GetUniverseSize),
            (
                "cmd=put kvsname=kvs_6225_0_765629194_vm key=k0 value=v0\n",
                Request::Put {
                    kvsname: kvs.into(),
                    key: "k0".into(),
                    value: "v0".into(),
                },
            ),
            (
                "cmd=get kvsname=kvs_6225_0_765629194_vm key=k1\n",
                Request::Get {
                    kvsname: kvs.into(),
                    key: "k1".into(),
                },
            ),
            ("cmd=barrier_in\n", Request::BarrierIn),
            ("cmd=finalize\n", Request::Finalize),
            (
                "cmd=abort exitcode=7 message=boom\n",
                Request::Abort {
                    code: Some(7),
                    msg: Some("boom".into()),
                },
            ),
        ];
        for (line, want) in requests {
            assert_eq!(parse_request(line).unwrap(), want, "{line}");
            // Our encoding of requests is byte-for-byte MPICH's.
            assert_eq!(want.encode(), line);
        }
    }

    #[test]
    fn reply_encoding_is_exact() {
        let cases = [
            (
                Reply::ResponseToInit {
                    rc: 0,
                    pmi_version: 1,
                    pmi_subversion: 1,
                },
                "cmd=response_to_init pmi_version=1 pmi_subversion=1 rc=0\n",
            ),
            (
                Reply::Maxes {
                    kvsname_max: 256,
                    keylen_max: 64,
                    vallen_max: 1024,
                },
                "cmd=maxes kvsname_max=256 keylen_max=64 vallen_max=1024 rc=0\n",
            ),
            (
                Reply::MyKvsname {
                    kvsname: "kvs_1_0".into(),
                },
                "cmd=my_kvsname kvsname=kvs_1_0 rc=0\n",
            ),
            (Reply::Appnum { appnum: 0 }, "cmd=appnum appnum=0 rc=0\n"),
            (
                Reply::UniverseSize { size: 4 },
                "cmd=universe_size size=4 rc=0\n",
            ),
            (
                Reply::PutResult {
                    rc: 0,
                    msg: "success".into(),
                },
                "cmd=put_result rc=0 msg=success\n",
            ),
            (
                Reply::GetResult {
                    rc: 0,
                    value: "abc".into(),
                    msg: "success".into(),
                },
                "cmd=get_result rc=0 msg=success value=abc\n",
            ),
            (Reply::BarrierOut, "cmd=barrier_out\n"),
            (Reply::FinalizeAck, "cmd=finalize_ack\n"),
        ];
        for (reply, line) in cases {
            assert_eq!(reply.encode(), line);
            assert_eq!(parse_reply(line).unwrap(), reply, "round trip {line}");
        }
    }

    #[test]
    fn values_may_contain_equals_signs() {
        let r = parse_reply("cmd=get_result rc=0 msg=success value=a=b==\n").unwrap();
        assert_eq!(
            r,
            Reply::GetResult {
                rc: 0,
                value: "a=b==".into(),
                msg: "success".into()
            }
        );
        let put = Request::put("kvs", "k", "YWJj==", KEYLEN_MAX, VALLEN_MAX).unwrap();
        assert_eq!(parse_request(&put.encode()).unwrap(), put);
    }

    #[test]
    fn lenient_about_spacing_crlf_order_and_extra_fields() {
        assert_eq!(
            parse_request("cmd=put  key=k   value=v kvsname=K extra=1\r\n").unwrap(),
            Request::Put {
                kvsname: "K".into(),
                key: "k".into(),
                value: "v".into()
            }
        );
        // Missing kvsname and empty value, both accepted by hydra.
        assert_eq!(
            parse_request("cmd=put key=k value=").unwrap(),
            Request::Put {
                kvsname: String::new(),
                key: "k".into(),
                value: String::new()
            }
        );
        assert_eq!(
            parse_request("cmd=abort").unwrap(),
            Request::Abort {
                code: None,
                msg: None
            }
        );
    }

    #[test]
    fn found_false_means_missing() {
        match parse_reply("cmd=get_result found=FALSE rc=0").unwrap() {
            Reply::GetResult { rc, .. } => assert_ne!(rc, 0),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn nonzero_rc_on_rc_less_replies_is_an_error() {
        let err = parse_reply("cmd=maxes rc=-1 msg=nope").unwrap_err();
        assert_eq!(
            err,
            WireError::Failed {
                cmd: "maxes".into(),
                rc: -1,
                msg: "nope".into()
            }
        );
    }

    #[test]
    fn malformed_lines_name_what_is_wrong() {
        assert_eq!(parse_request("\n").unwrap_err(), WireError::Empty);
        assert_eq!(parse_request("   ").unwrap_err(), WireError::Empty);
        assert!(matches!(
            parse_request("hello world").unwrap_err(),
            WireError::NoCmd { .. }
        ));
        assert!(matches!(
            parse_request("cmd=").unwrap_err(),
            WireError::NoCmd { .. }
        ));
        assert_eq!(
            parse_request("mcmd=spawn\nnprocs=1\nexecname=x\nendcmd\n").unwrap_err(),
            WireError::Mcmd
        );
        assert_eq!(
            parse_request("cmd=bogus").unwrap_err(),
            WireError::UnknownCommand {
                cmd: "bogus".into()
            }
        );
        assert_eq!(
            parse_request("cmd=get kvsname=K").unwrap_err(),
            WireError::MissingField {
                cmd: "get".into(),
                field: "key"
            }
        );
        assert_eq!(
            parse_request("cmd=init pmi_version=x pmi_subversion=1").unwrap_err(),
            WireError::BadInteger {
                cmd: "init".into(),
                field: "pmi_version",
                value: "x".into()
            }
        );
        assert_eq!(
            parse_request("cmd=put key=k oops").unwrap_err(),
            WireError::BadToken {
                token: "oops".into()
            }
        );
        assert!(matches!(
            parse_request("cmd=put key=k\nvalue=v").unwrap_err(),
            WireError::BadChar { .. }
        ));
        let msg = parse_request("cmd=get kvsname=K").unwrap_err().to_string();
        assert!(msg.contains("`key=`") && msg.contains("add it"), "{msg}");
    }

    #[test]
    fn put_refuses_values_that_cannot_travel() {
        let put = |k: &str, v: &str| Request::put("K", k, v, KEYLEN_MAX, VALLEN_MAX);
        for (v, what) in [
            ("a b", "a space"),
            ("a\tb", "a space"),
            ("a\nb", "a newline"),
            ("a\rb", "a newline"),
            ("a\\b", "a backslash"),
        ] {
            match put("k", v).unwrap_err() {
                WireError::BadChar { field, what: w, .. } => {
                    assert_eq!(field, "value");
                    assert_eq!(w, what, "{v:?}");
                }
                other => panic!("{v:?}: {other:?}"),
            }
        }
        assert!(matches!(
            put("a key", "v").unwrap_err(),
            WireError::BadChar { field: "key", .. }
        ));
        assert_eq!(
            put("", "v").unwrap_err(),
            WireError::EmptyField { field: "key" }
        );
        assert_eq!(
            put("k", "").unwrap_err(),
            WireError::EmptyField { field: "value" }
        );
        let msg = put("k", "a b").unwrap_err().to_string();
        assert!(msg.contains("without spaces"), "{msg}");
    }

    #[test]
    fn maxima_count_the_nul_like_mpich() {
        let k63 = "k".repeat(KEYLEN_MAX - 1);
        let k64 = "k".repeat(KEYLEN_MAX);
        let v1023 = "v".repeat(VALLEN_MAX - 1);
        let v1024 = "v".repeat(VALLEN_MAX);
        assert!(Request::put("K", &k63, &v1023, KEYLEN_MAX, VALLEN_MAX).is_ok());
        assert_eq!(
            Request::put("K", &k64, "v", KEYLEN_MAX, VALLEN_MAX).unwrap_err(),
            WireError::TooLong {
                field: "key",
                len: 64,
                max: 63
            }
        );
        assert_eq!(
            Request::put("K", "k", &v1024, KEYLEN_MAX, VALLEN_MAX).unwrap_err(),
            WireError::TooLong {
                field: "value",
                len: 1024,
                max: 1023
            }
        );
        assert!(Request::get("K", &k64, KEYLEN_MAX).is_err());
        // A longest legal put fits comfortably in one line.
        let line = Request::put(
            &"n".repeat(KVSNAME_MAX - 1),
            &k63,
            &v1023,
            KEYLEN_MAX,
            VALLEN_MAX,
        )
        .unwrap()
        .encode();
        assert!(line.len() < MAX_LINE);
    }

    #[test]
    fn abort_message_is_sanitized_into_one_value() {
        let m = sanitize_message("rank 3 died:\n\tout of memory \\o/");
        assert_eq!(m, "rank_3_died:__out_of_memory__o/");
        assert!(check_value("message", &m, VALLEN_MAX).is_ok());
        let long = sanitize_message(&"x".repeat(5000));
        assert_eq!(long.len(), VALLEN_MAX - 1);
        let line = Request::Abort {
            code: Some(3),
            msg: Some(m.clone()),
        }
        .encode();
        assert_eq!(
            parse_request(&line).unwrap(),
            Request::Abort {
                code: Some(3),
                msg: Some(m)
            }
        );
    }

    #[test]
    fn command_name_of_lines() {
        assert_eq!(command_name("cmd=put key=k value=a b\n"), Some("put"));
        assert_eq!(command_name("cmd=barrier_in"), Some("barrier_in"));
        assert_eq!(command_name("cmd= x"), None);
        assert_eq!(command_name("garbage"), None);
        assert_eq!(command_name(""), None);
    }

    #[test]
    fn a_carriage_return_only_ends_a_line() {
        let put = parse_request("cmd=put key=k value=v\r\n").unwrap();
        assert_eq!(put, Request::put("", "k", "v", 64, 1024).unwrap());
        for line in [
            "cmd=put key=k value=v\r\r\n",
            "cmd=put key=k\rx value=v\n",
            "cmd=get_result rc=0 msg=ok value=v\r\r\n",
        ] {
            let e = parse_request(line)
                .err()
                .or(parse_reply(line).err())
                .unwrap_or_else(|| panic!("{line:?} was accepted"));
            assert!(
                matches!(
                    e,
                    WireError::BadChar {
                        what: "an embedded carriage return",
                        ..
                    }
                ),
                "{line:?}: {e}"
            );
        }
    }
}
