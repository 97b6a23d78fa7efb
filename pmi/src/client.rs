//! A synchronous PMI-1 client, for a broker started by `mpiexec` or `canopy start`.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::wire::{self, Reply, Request, WireError};
use crate::PmiError;

/// Set once `PMI_FD` has been taken, so a second `from_env` cannot create a
/// second owner of the same descriptor.
pub(crate) static PMI_FD_TAKEN: AtomicBool = AtomicBool::new(false);

/// A PMI-1 client over one connection to the process manager.
///
/// Every call sends one line and waits for its answer; `barrier` waits until
/// every rank has entered. If the process manager closes the connection, the
/// call returns [`PmiError::Closed`].
#[derive(Debug)]
pub struct PmiClient<S: Read + Write = UnixStream> {
    stream: BufReader<S>,
    rank: u32,
    size: u32,
    kvsname: Option<String>,
    kvsname_max: usize,
    keylen_max: usize,
    vallen_max: usize,
    finalized: bool,
    timeout: Option<std::time::Duration>,
}

impl PmiClient<UnixStream> {
    /// Builds a client from `PMI_FD`, `PMI_RANK` and `PMI_SIZE`.
    ///
    /// Returns `Ok(None)` when `PMI_FD` is unset (not started by a PMI
    /// launcher). Takes ownership of the descriptor (it becomes close-on-exec)
    /// and so succeeds at most once per process. Does not talk to the server:
    /// call [`PmiClient::init`] next.
    pub fn from_env() -> Result<Option<Self>, PmiError> {
        let lookup = |name: &str| std::env::var_os(name).map(|v| v.to_string_lossy().into_owned());
        if lookup("PMI_FD").is_none() {
            return Ok(None);
        }
        if PMI_FD_TAKEN.swap(true, Ordering::SeqCst) {
            return Err(PmiError::AlreadyTaken);
        }
        let result = Self::from_lookup(lookup);
        if !matches!(result, Ok(Some(_))) {
            // Nothing was taken; let a corrected retry through.
            PMI_FD_TAKEN.store(false, Ordering::SeqCst);
        }
        result
    }

    /// [`PmiClient::from_env`] with the environment supplied by `lookup`.
    pub(crate) fn from_lookup(
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Self>, PmiError> {
        let Some(fd_text) = lookup("PMI_FD") else {
            return Ok(None);
        };
        let fd: i32 = parse_env("PMI_FD", &fd_text)?;
        let rank: u32 = parse_env("PMI_RANK", &require_env(&lookup, "PMI_RANK")?)?;
        let size: u32 = parse_env("PMI_SIZE", &require_env(&lookup, "PMI_SIZE")?)?;
        check_rank_size(rank, size)?;
        let owned = canopy_sys::take_inherited_fd(fd).map_err(|source| PmiError::Fd {
            value: fd_text.clone(),
            source,
        })?;
        Ok(Some(Self::connect(UnixStream::from(owned), rank, size)?))
    }

    /// Bounds how long any one call waits for its answer (`None`, the
    /// default: forever). A call that runs over fails with
    /// [`PmiError::Io`] of kind `WouldBlock`, and the connection is then
    /// unusable. (Through the [`crate::Pmi`] trait it is [`PmiError::Timeout`].)
    pub fn set_timeout(&mut self, timeout: Option<std::time::Duration>) -> Result<(), PmiError> {
        self.stream
            .get_ref()
            .set_read_timeout(timeout)
            .map_err(|source| PmiError::Io {
                op: "set_timeout",
                source,
            })?;
        self.timeout = timeout;
        Ok(())
    }

    /// The timeout set with [`PmiClient::set_timeout`].
    pub fn timeout(&self) -> Option<std::time::Duration> {
        self.timeout
    }
}

pub(crate) fn require_env(
    lookup: &impl Fn(&str) -> Option<String>,
    var: &'static str,
) -> Result<String, PmiError> {
    lookup(var).ok_or(PmiError::Env {
        var,
        value: String::new(),
        reason: "it is not set",
    })
}

pub(crate) fn parse_env<T: std::str::FromStr>(
    var: &'static str,
    value: &str,
) -> Result<T, PmiError> {
    value.trim().parse().map_err(|_| PmiError::Env {
        var,
        value: value.to_owned(),
        reason: "it is not a non-negative decimal integer",
    })
}

pub(crate) fn check_rank_size(rank: u32, size: u32) -> Result<(), PmiError> {
    if size == 0 {
        return Err(PmiError::Env {
            var: "PMI_SIZE",
            value: size.to_string(),
            reason: "the job size must be at least 1",
        });
    }
    if rank >= size {
        return Err(PmiError::Env {
            var: "PMI_RANK",
            value: rank.to_string(),
            reason: "the rank must be less than PMI_SIZE",
        });
    }
    Ok(())
}

impl<S: Read + Write> PmiClient<S> {
    /// Wraps an already connected stream. Checks `rank < size`; does not talk
    /// to the server (call [`PmiClient::init`]).
    pub fn connect(stream: S, rank: u32, size: u32) -> Result<Self, PmiError> {
        check_rank_size(rank, size)?;
        Ok(PmiClient {
            stream: BufReader::new(stream),
            rank,
            size,
            kvsname: None,
            kvsname_max: wire::KVSNAME_MAX,
            keylen_max: wire::KEYLEN_MAX,
            vallen_max: wire::VALLEN_MAX,
            finalized: false,
            timeout: None,
        })
    }

    /// Handshake: `init`, `get_maxes` and `get_my_kvsname`.
    pub fn init(&mut self) -> Result<(), PmiError> {
        let req = Request::Init {
            pmi_version: wire::PMI_VERSION,
            pmi_subversion: wire::PMI_SUBVERSION,
        };
        match self.call(&req)? {
            Reply::ResponseToInit {
                rc: 0,
                pmi_version: 1,
                ..
            } => {}
            Reply::ResponseToInit {
                rc,
                pmi_version,
                pmi_subversion,
            } => {
                return Err(PmiError::VersionMismatch {
                    rc,
                    pmi_version,
                    pmi_subversion,
                })
            }
            other => return Err(unexpected("response_to_init", &other)),
        }
        match self.call(&Request::GetMaxes)? {
            Reply::Maxes {
                kvsname_max,
                keylen_max,
                vallen_max,
            } => {
                self.kvsname_max = kvsname_max;
                self.keylen_max = keylen_max;
                self.vallen_max = vallen_max;
            }
            other => return Err(unexpected("maxes", &other)),
        }
        match self.call(&Request::GetMyKvsname)? {
            Reply::MyKvsname { kvsname } => {
                if kvsname.len() >= self.kvsname_max.max(1) {
                    return Err(PmiError::Wire(WireError::TooLong {
                        field: "kvsname",
                        len: kvsname.len(),
                        max: self.kvsname_max.saturating_sub(1),
                    }));
                }
                self.kvsname = Some(kvsname);
            }
            other => return Err(unexpected("my_kvsname", &other)),
        }
        Ok(())
    }

    /// This process's rank, from `PMI_RANK` or [`PmiClient::connect`].
    pub fn rank(&self) -> u32 {
        self.rank
    }

    /// The number of ranks in the job.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// The job's kvsname, once [`PmiClient::init`] has run.
    pub fn kvsname(&self) -> Option<&str> {
        self.kvsname.as_deref()
    }

    /// Longest key in bytes that the server accepts (its `keylen_max` less one).
    pub fn max_key_len(&self) -> usize {
        self.keylen_max.saturating_sub(1)
    }

    /// Longest value in bytes that the server accepts (its `vallen_max` less one).
    pub fn max_value_len(&self) -> usize {
        self.vallen_max.saturating_sub(1)
    }

    /// `PMI_Get_appnum`.
    pub fn appnum(&mut self) -> Result<i32, PmiError> {
        self.require_init("get_appnum")?;
        match self.call(&Request::GetAppnum)? {
            Reply::Appnum { appnum } => Ok(appnum),
            other => Err(unexpected("appnum", &other)),
        }
    }

    /// `PMI_Get_universe_size`; -1 means unlimited.
    pub fn universe_size(&mut self) -> Result<i32, PmiError> {
        self.require_init("get_universe_size")?;
        match self.call(&Request::GetUniverseSize)? {
            Reply::UniverseSize { size } => Ok(size),
            other => Err(unexpected("universe_size", &other)),
        }
    }

    /// Stores `key`=`value` in the job's KVS. Neither may contain spaces,
    /// newlines or backslashes, or be empty or longer than the server allows;
    /// such input is refused before anything is sent.
    pub fn put(&mut self, key: &str, value: &str) -> Result<(), PmiError> {
        let kvsname = self.require_init("put")?.to_owned();
        let req = Request::put(&kvsname, key, value, self.keylen_max, self.vallen_max)?;
        match self.call(&req)? {
            Reply::PutResult { rc: 0, .. } => Ok(()),
            Reply::PutResult { rc, msg } => Err(PmiError::Failed {
                cmd: "put",
                rc,
                msg,
            }),
            other => Err(unexpected("put_result", &other)),
        }
    }

    /// Reads `key` from the job's KVS. A key that no rank has put is
    /// [`PmiError::KeyNotFound`]. Keys put by other ranks are only sure to
    /// be visible after a [`PmiClient::barrier`] that follows their `put`.
    pub fn get(&mut self, key: &str) -> Result<String, PmiError> {
        let kvsname = self.require_init("get")?.to_owned();
        let req = Request::get(&kvsname, key, self.keylen_max)?;
        match self.call(&req)? {
            Reply::GetResult { rc: 0, value, .. } => Ok(value),
            Reply::GetResult { rc, msg, .. } => {
                if msg.ends_with("not_found") {
                    Err(PmiError::KeyNotFound {
                        key: key.to_owned(),
                    })
                } else {
                    Err(PmiError::Failed {
                        cmd: "get",
                        rc,
                        msg,
                    })
                }
            }
            other => Err(unexpected("get_result", &other)),
        }
    }

    /// Waits until every rank has entered the barrier.
    pub fn barrier(&mut self) -> Result<(), PmiError> {
        self.require_init("barrier_in")?;
        match self.call(&Request::BarrierIn)? {
            Reply::BarrierOut => Ok(()),
            other => Err(unexpected("barrier_out", &other)),
        }
    }

    /// Tells the process manager this rank is done. Later calls fail with
    /// [`PmiError::Finalized`].
    pub fn finalize(&mut self) -> Result<(), PmiError> {
        self.require_init("finalize")?;
        let reply = self.call(&Request::Finalize)?;
        self.finalized = true;
        match reply {
            Reply::FinalizeAck => Ok(()),
            other => Err(unexpected("finalize_ack", &other)),
        }
    }

    /// Asks the process manager to end the whole job with `code`. There is no
    /// reply: the caller should exit with `code` right after. `msg` is sent
    /// with whitespace replaced by `_`.
    pub fn abort(&mut self, code: i32, msg: &str) -> Result<(), PmiError> {
        let msg = wire::sanitize_message(msg);
        let req = Request::Abort {
            code: Some(code),
            msg: (!msg.is_empty()).then_some(msg),
        };
        self.send(&req)
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &S {
        self.stream.get_ref()
    }

    fn require_init(&self, op: &'static str) -> Result<&str, PmiError> {
        if self.finalized {
            return Err(PmiError::Finalized { op });
        }
        self.kvsname
            .as_deref()
            .ok_or(PmiError::NotInitialized { op })
    }

    fn send(&mut self, req: &Request) -> Result<(), PmiError> {
        let line = req.encode();
        let stream = self.stream.get_mut();
        stream
            .write_all(line.as_bytes())
            .and_then(|()| stream.flush())
            .map_err(|e| io_error(req.name(), e))
    }

    fn call(&mut self, req: &Request) -> Result<Reply, PmiError> {
        self.send(req)?;
        let line = self.read_line(req.name())?;
        Ok(wire::parse_reply(&line)?)
    }

    fn read_line(&mut self, op: &'static str) -> Result<String, PmiError> {
        let mut buf = Vec::new();
        let n = (&mut self.stream)
            .take(wire::MAX_LINE as u64)
            .read_until(b'\n', &mut buf)
            .map_err(|e| io_error(op, e))?;
        if n == 0 {
            return Err(PmiError::Closed { op });
        }
        if buf.last() != Some(&b'\n') {
            if buf.len() >= wire::MAX_LINE {
                return Err(PmiError::LineTooLong {
                    max: wire::MAX_LINE,
                });
            }
            // EOF in the middle of a line.
            return Err(PmiError::Closed { op });
        }
        String::from_utf8(buf).map_err(|_| PmiError::NotUtf8)
    }
}

impl<S: Read + Write + AsFd> AsFd for PmiClient<S> {
    /// The connection's descriptor, e.g. to poll it for EOF (the launcher
    /// died). Do not read from it while a call is in progress.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.stream.get_ref().as_fd()
    }
}

fn io_error(op: &'static str, e: io::Error) -> PmiError {
    match e.kind() {
        io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionAborted => PmiError::Closed { op },
        _ => PmiError::Io { op, source: e },
    }
}

fn unexpected(expected: &'static str, got: &Reply) -> PmiError {
    PmiError::Unexpected {
        expected,
        got: got.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::io::{BufRead, BufReader, Write};
    use std::os::fd::IntoRawFd;
    use std::thread;

    /// A fake server answering scripted lines; returns what it received.
    fn scripted(replies: Vec<&'static str>) -> (UnixStream, thread::JoinHandle<Vec<String>>) {
        let (a, b) = UnixStream::pair().unwrap();
        let h = thread::spawn(move || {
            let mut r = BufReader::new(b.try_clone().unwrap());
            let mut w = b;
            let mut got = Vec::new();
            for reply in replies {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap() == 0 {
                    break;
                }
                got.push(line);
                if !reply.is_empty() {
                    w.write_all(reply.as_bytes()).unwrap();
                }
            }
            got
        });
        (a, h)
    }

    const HYDRA_INIT: [&str; 3] = [
        "cmd=response_to_init pmi_version=1 pmi_subversion=1 rc=0\n",
        "cmd=maxes kvsname_max=256 keylen_max=64 vallen_max=1024\n",
        "cmd=my_kvsname kvsname=kvs_1_0\n",
    ];

    #[test]
    fn talks_like_mpich_to_a_hydra_style_server() {
        let mut replies = HYDRA_INIT.to_vec();
        replies.extend([
            "cmd=put_result rc=0 msg=success\n",
            "cmd=barrier_out\n",
            "cmd=get_result rc=0 msg=success value=hello\n",
            "cmd=get_result rc=-1 msg=key_nope_not_found value=unknown\n",
            "cmd=finalize_ack\n",
        ]);
        let (s, server) = scripted(replies);
        let mut c = PmiClient::connect(s, 1, 2).unwrap();
        c.init().unwrap();
        assert_eq!(c.kvsname(), Some("kvs_1_0"));
        assert_eq!(c.max_key_len(), 63);
        c.put("k1", "v1").unwrap();
        c.barrier().unwrap();
        assert_eq!(c.get("k0").unwrap(), "hello");
        match c.get("nope") {
            Err(PmiError::KeyNotFound { key }) => assert_eq!(key, "nope"),
            other => panic!("expected KeyNotFound, got {other:?}"),
        }
        c.finalize().unwrap();
        assert!(matches!(c.barrier(), Err(PmiError::Finalized { .. })));
        let sent = server.join().unwrap();
        assert_eq!(
            sent,
            [
                "cmd=init pmi_version=1 pmi_subversion=1\n",
                "cmd=get_maxes\n",
                "cmd=get_my_kvsname\n",
                "cmd=put kvsname=kvs_1_0 key=k1 value=v1\n",
                "cmd=barrier_in\n",
                "cmd=get kvsname=kvs_1_0 key=k0\n",
                "cmd=get kvsname=kvs_1_0 key=nope\n",
                "cmd=finalize\n",
            ]
        );
    }

    #[test]
    fn server_eof_is_an_error_not_a_hang() {
        // Server reads init, then closes without answering.
        let (s, server) = scripted(vec![""]);
        let mut c = PmiClient::connect(s, 0, 1).unwrap();
        let err = c.init().unwrap_err();
        assert!(matches!(err, PmiError::Closed { op: "init" }), "{err:?}");
        server.join().unwrap();
        // Further calls keep failing cleanly (write to a closed peer).
        let err = c.init().unwrap_err();
        assert!(matches!(err, PmiError::Closed { .. }), "{err:?}");
    }

    #[test]
    fn eof_during_barrier_is_an_error() {
        let mut replies = HYDRA_INIT.to_vec();
        replies.push(""); // read barrier_in, then hang up
        let (s, server) = scripted(replies);
        let mut c = PmiClient::connect(s, 0, 2).unwrap();
        c.init().unwrap();
        let err = c.barrier().unwrap_err();
        assert!(
            matches!(err, PmiError::Closed { op: "barrier_in" }),
            "{err:?}"
        );
        assert!(err.to_string().contains("closed the pmi connection"));
        server.join().unwrap();
    }

    #[test]
    fn truncated_reply_is_closed() {
        let (s, server) = scripted(vec!["cmd=response_to_init pmi_ver"]);
        let mut c = PmiClient::connect(s, 0, 1).unwrap();
        assert!(matches!(c.init().unwrap_err(), PmiError::Closed { .. }));
        server.join().unwrap();
    }

    #[test]
    fn wrong_reply_and_version_mismatch() {
        let (s, server) = scripted(vec!["cmd=barrier_out\n"]);
        let mut c = PmiClient::connect(s, 0, 1).unwrap();
        match c.init().unwrap_err() {
            PmiError::Unexpected { expected, got } => {
                assert_eq!(expected, "response_to_init");
                assert_eq!(got, "cmd=barrier_out");
            }
            other => panic!("{other:?}"),
        }
        server.join().unwrap();

        let (s, server) = scripted(vec![
            "cmd=response_to_init pmi_version=2 pmi_subversion=0 rc=-1\n",
        ]);
        let mut c = PmiClient::connect(s, 0, 1).unwrap();
        assert!(matches!(
            c.init().unwrap_err(),
            PmiError::VersionMismatch {
                rc: -1,
                pmi_version: 2,
                ..
            }
        ));
        server.join().unwrap();
    }

    #[test]
    fn bad_put_is_refused_before_sending_and_server_maxima_apply() {
        let mut replies = HYDRA_INIT.to_vec();
        replies[1] = "cmd=maxes kvsname_max=256 keylen_max=8 vallen_max=16\n";
        replies.push("cmd=put_result rc=0 msg=success\n");
        let (s, server) = scripted(replies);
        let mut c = PmiClient::connect(s, 0, 1).unwrap();
        assert!(matches!(
            c.put("k", "v"),
            Err(PmiError::NotInitialized { op: "put" })
        ));
        c.init().unwrap();
        let err = c.put("k", "has space").unwrap_err();
        assert!(err.to_string().contains("without spaces"), "{err}");
        assert!(matches!(
            c.put("k", &"v".repeat(16)).unwrap_err(),
            PmiError::Wire(WireError::TooLong {
                field: "value",
                max: 15,
                ..
            })
        ));
        assert!(matches!(
            c.put("longerkey", "v").unwrap_err(),
            PmiError::Wire(WireError::TooLong { field: "key", .. })
        ));
        c.put("k", &"v".repeat(15)).unwrap();
        drop(c);
        let sent = server.join().unwrap();
        assert_eq!(
            sent.len(),
            4,
            "only the valid put reached the server: {sent:?}"
        );
    }

    #[test]
    fn abort_sends_sanitized_message_without_waiting() {
        let (s, server) = scripted(vec![""]);
        let mut c = PmiClient::connect(s, 0, 1).unwrap();
        c.abort(3, "out of memory\n").unwrap();
        drop(c);
        assert_eq!(
            server.join().unwrap(),
            ["cmd=abort exitcode=3 message=out_of_memory_\n"]
        );
    }

    #[test]
    fn rank_and_size_are_checked() {
        let (a, _b) = UnixStream::pair().unwrap();
        assert!(matches!(
            PmiClient::connect(a, 2, 2).unwrap_err(),
            PmiError::Env {
                var: "PMI_RANK",
                ..
            }
        ));
        let (a, _b) = UnixStream::pair().unwrap();
        assert!(matches!(
            PmiClient::connect(a, 0, 0).unwrap_err(),
            PmiError::Env {
                var: "PMI_SIZE",
                ..
            }
        ));
    }

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn from_env_without_pmi_fd_is_none() {
        assert!(PmiClient::from_lookup(env(&[("PMI_RANK", "0")]))
            .unwrap()
            .is_none());
    }

    #[test]
    fn from_env_bad_values_name_the_variable() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (
                &[("PMI_FD", "seven"), ("PMI_RANK", "0"), ("PMI_SIZE", "1")],
                "PMI_FD=seven",
            ),
            (
                &[("PMI_FD", "5"), ("PMI_RANK", "-1"), ("PMI_SIZE", "1")],
                "PMI_RANK=-1",
            ),
            (
                &[("PMI_FD", "5"), ("PMI_RANK", "0"), ("PMI_SIZE", "x")],
                "PMI_SIZE=x",
            ),
            (&[("PMI_FD", "5"), ("PMI_SIZE", "1")], "PMI_RANK"),
            (
                &[("PMI_FD", "5"), ("PMI_RANK", "4"), ("PMI_SIZE", "4")],
                "PMI_RANK=4",
            ),
            (
                &[("PMI_FD", "999999"), ("PMI_RANK", "0"), ("PMI_SIZE", "1")],
                "PMI_FD=999999",
            ),
            (
                &[("PMI_FD", "1"), ("PMI_RANK", "0"), ("PMI_SIZE", "1")],
                "PMI_FD=1",
            ),
        ];
        for (vars, want) in cases {
            let err = PmiClient::from_lookup(env(vars)).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains(want), "{vars:?}: {msg}");
            assert!(msg.contains("canopy start"), "says what to do: {msg}");
        }
    }

    #[test]
    fn from_env_takes_the_inherited_fd() {
        let (mine, theirs) = UnixStream::pair().unwrap();
        let raw = theirs.into_raw_fd().to_string();
        let server = thread::spawn(move || {
            let mut r = BufReader::new(mine.try_clone().unwrap());
            let mut w = mine;
            for reply in HYDRA_INIT {
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                w.write_all(reply.as_bytes()).unwrap();
            }
        });
        let mut c = PmiClient::from_lookup(env(&[
            ("PMI_FD", &raw),
            ("PMI_RANK", "3"),
            ("PMI_SIZE", "4"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((c.rank(), c.size()), (3, 4));
        c.init().unwrap();
        assert!(canopy_sys::is_cloexec(c.as_fd()).unwrap());
        server.join().unwrap();
    }
}
