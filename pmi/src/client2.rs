//! A synchronous PMI-2 client, for a task started by `srun --mpi=pmi2`.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use crate::wire::{self, Reply};
use crate::wire2::{self, Command, Wire2Error};
use crate::PmiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    New,
    Ready,
    Finalized,
    /// A timeout or a garbled frame left the stream at an unknown point.
    Broken,
}

/// A PMI-2 client over one connection to the process manager.
///
/// [`Pmi2Client::init`] sends the plain-text `init` line, then `fullinit`
/// and `job-getid`; every later call is one frame out and one frame back
/// ([`crate::wire2`]). `fence` is PMI-2's commit and barrier in one: it
/// returns once every rank has fenced, and keys put before it are then
/// visible to every rank.
///
/// With a timeout set ([`Pmi2Client::set_timeout`]), a call whose answer
/// does not come in time fails with [`PmiError::Timeout`]; the connection
/// is then unusable, and the task should abort or exit.
#[derive(Debug)]
pub struct Pmi2Client<S: Read + Write = UnixStream> {
    stream: BufReader<S>,
    rank: u32,
    size: u32,
    jobid: String,
    state: State,
    timeout: Option<Duration>,
}

impl Pmi2Client<UnixStream> {
    /// Bounds how long any one call waits for its answer (`None`: forever).
    pub fn set_timeout(&mut self, timeout: Option<Duration>) -> Result<(), PmiError> {
        self.stream
            .get_ref()
            .set_read_timeout(timeout)
            .map_err(|e| PmiError::Io {
                op: "set_timeout",
                source: e,
            })?;
        self.timeout = timeout;
        Ok(())
    }
}

impl<S: Read + Write> Pmi2Client<S> {
    /// Wraps a connected stream. `rank` and `size` come from `PMI_RANK` and
    /// `PMI_SIZE`, `jobid` from `PMI_JOBID` (empty if unset); `init` checks
    /// them against what the server says. Does not talk to the server.
    pub fn connect(stream: S, rank: u32, size: u32, jobid: &str) -> Result<Self, PmiError> {
        crate::client::check_rank_size(rank, size)?;
        Ok(Pmi2Client {
            stream: BufReader::new(stream),
            rank,
            size,
            jobid: jobid.to_owned(),
            state: State::New,
            timeout: None,
        })
    }

    /// Handshake: the `init` line, `fullinit` and `job-getid`.
    pub fn init(&mut self) -> Result<(), PmiError> {
        if self.state != State::New {
            return Err(PmiError::Garbage {
                rank: self.rank,
                version: 2,
                detail: "init called twice".into(),
            });
        }
        self.write(wire2::INIT_LINE.as_bytes(), "init")?;
        let line = self.read_line("init")?;
        match wire::parse_reply(&line) {
            Ok(Reply::ResponseToInit {
                rc: 0,
                pmi_version: wire2::PMI2_VERSION,
                pmi_subversion: wire2::PMI2_SUBVERSION,
            }) => {}
            Ok(Reply::ResponseToInit {
                rc,
                pmi_version,
                pmi_subversion,
            }) => {
                return Err(PmiError::Pmi2Refused {
                    rank: self.rank,
                    rc,
                    pmi_version,
                    pmi_subversion,
                })
            }
            Ok(other) => {
                return Err(self.garbage(format!(
                    "answered `init` with `{other}` instead of `cmd=response_to_init`"
                )))
            }
            Err(e) => {
                return Err(self.garbage(format!("answered `init` with `{}`: {e}", line.trim_end())))
            }
        }
        self.state = State::Ready;
        let jobid = if self.jobid.is_empty() {
            "-1".to_owned()
        } else {
            self.jobid.clone()
        };
        let r = self.call(
            Command::new("fullinit")
                .arg("pmijobid", jobid)
                .arg("pmirank", self.rank.to_string())
                .arg("threaded", "FALSE"),
            "fullinit",
        )?;
        let (rank, size) = match (r.int("rank"), r.int("size")) {
            (Ok(rank), Ok(size)) => (rank, size),
            (Err(e), _) | (_, Err(e)) => return Err(self.protocol(e)),
        };
        if rank != i64::from(self.rank) || size != i64::from(self.size) {
            return Err(self.garbage(format!(
                "says this task is rank {rank} of {size}, but PMI_RANK and PMI_SIZE say {} of {}",
                self.rank, self.size
            )));
        }
        let r = self.call(Command::new("job-getid"), "job-getid")?;
        match r.require("jobid") {
            Ok(j) => self.jobid = j.to_owned(),
            Err(e) => return Err(self.protocol(e)),
        }
        Ok(())
    }

    /// This task's rank.
    pub fn rank(&self) -> u32 {
        self.rank
    }

    /// The number of ranks in the job.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// The job's id: `PMI_JOBID` until `init`, then what the server says.
    pub fn jobid(&self) -> &str {
        &self.jobid
    }

    /// The timeout set with `set_timeout`.
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// Stores `key`=`value` for the next fence. Keys are at most 63 bytes
    /// without `;`, `=` or whitespace; values at most 1023 bytes without
    /// `;` ([`wire2::check_value`]); bad ones are refused before sending.
    pub fn put(&mut self, key: &str, value: &str) -> Result<(), PmiError> {
        self.require_ready("kvs-put")?;
        wire2::check_key(key)?;
        wire2::check_value(value)?;
        self.call(
            Command::new("kvs-put").arg("key", key).arg("value", value),
            "kvs-put",
        )?;
        Ok(())
    }

    /// Commits this rank's puts and waits until every rank has fenced.
    pub fn fence(&mut self) -> Result<(), PmiError> {
        self.require_ready("kvs-fence")?;
        self.call(Command::new("kvs-fence"), "kvs-fence")?;
        Ok(())
    }

    /// Reads `key`; a key no rank put before the last fence is
    /// [`PmiError::KeyNotFound`].
    pub fn get(&mut self, key: &str) -> Result<String, PmiError> {
        self.require_ready("kvs-get")?;
        wire2::check_key(key)?;
        let r = self.call(
            Command::new("kvs-get")
                .arg("jobid", self.jobid.clone())
                .arg("srcid", "-1")
                .arg("key", key),
            "kvs-get",
        )?;
        if !r.flag("found") {
            return Err(PmiError::KeyNotFound {
                key: key.to_owned(),
            });
        }
        match r.require("value") {
            Ok(v) => Ok(v.to_owned()),
            Err(e) => Err(self.protocol(e)),
        }
    }

    /// Tells the process manager this rank is done (it then closes the
    /// connection). Later calls fail with [`PmiError::Finalized`].
    pub fn finalize(&mut self) -> Result<(), PmiError> {
        self.require_ready("finalize")?;
        let r = self.call(Command::new("finalize"), "finalize");
        self.state = State::Finalized;
        r.map(drop)
    }

    /// Asks the process manager to end the whole job. There is no reply:
    /// the caller should exit with `code` right after (PMI-2's abort has no
    /// exit code; `code` goes into the message).
    pub fn abort(&mut self, code: i32, msg: &str) -> Result<(), PmiError> {
        let msg = wire2::sanitize_message(&format!("exit code {code}: {msg}"));
        let frame = Command::new("abort")
            .arg("isworld", "TRUE")
            .arg("msg", msg)
            .encode()?;
        self.write(&frame, "abort")
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &S {
        self.stream.get_ref()
    }

    fn require_ready(&self, op: &'static str) -> Result<(), PmiError> {
        match self.state {
            State::Ready => Ok(()),
            State::New => Err(PmiError::NotInitialized { op }),
            State::Finalized => Err(PmiError::Finalized { op }),
            State::Broken => Err(PmiError::Garbage {
                rank: self.rank,
                version: 2,
                detail: format!("`{op}` after an earlier call timed out or was garbled; the connection is unusable"),
            }),
        }
    }

    /// Sends `cmd` and reads its `<cmd>-response`; a non-zero rc is
    /// [`PmiError::Failed`].
    fn call(&mut self, cmd: Command, op: &'static str) -> Result<Command, PmiError> {
        let frame = cmd.encode()?;
        self.write(&frame, op)?;
        let reply = self.read_frame(op)?;
        let want = format!("{}-response", cmd.name());
        if reply.name() != want {
            return Err(self.garbage(format!(
                "answered `{op}` with `{reply}` instead of `cmd={want}`"
            )));
        }
        let rc = match reply.rc() {
            Ok(rc) => rc,
            Err(e) => return Err(self.protocol(e)),
        };
        if rc != 0 {
            return Err(PmiError::Failed {
                cmd: op,
                rc: i32::try_from(rc).unwrap_or(i32::MIN),
                msg: reply
                    .get("errmsg")
                    .or(reply.get("msg"))
                    .unwrap_or("no message")
                    .to_owned(),
            });
        }
        Ok(reply)
    }

    fn write(&mut self, bytes: &[u8], op: &'static str) -> Result<(), PmiError> {
        let s = self.stream.get_mut();
        s.write_all(bytes)
            .and_then(|()| s.flush())
            .map_err(|e| self.io_error(op, e))
    }

    fn read_frame(&mut self, op: &'static str) -> Result<Command, PmiError> {
        let mut header = [0u8; wire2::HEADER_LEN];
        self.read_exact(&mut header, op)?;
        let len = match wire2::parse_header(&header) {
            Ok(len) => len,
            Err(e) => return Err(self.protocol(e)),
        };
        let mut body = vec![0u8; len];
        self.read_exact(&mut body, op)?;
        Command::parse_body(&body).map_err(|e| self.protocol(e))
    }

    fn read_exact(&mut self, buf: &mut [u8], op: &'static str) -> Result<(), PmiError> {
        self.stream
            .read_exact(buf)
            .map_err(|e| self.io_error(op, e))
    }

    /// The PMI-1 form answer to the `init` line.
    fn read_line(&mut self, op: &'static str) -> Result<String, PmiError> {
        let mut buf = Vec::new();
        let read = (&mut self.stream)
            .take(wire::MAX_LINE as u64)
            .read_until(b'\n', &mut buf);
        let n = read.map_err(|e| self.io_error(op, e))?;
        if n == 0 || buf.last() != Some(&b'\n') {
            if buf.len() >= wire::MAX_LINE {
                return Err(self.garbage(format!(
                    "answered `init` with a line longer than {} bytes",
                    wire::MAX_LINE
                )));
            }
            return Err(PmiError::Closed { op });
        }
        String::from_utf8(buf)
            .map_err(|_| self.garbage("answered `init` with bytes that are not utf-8".into()))
    }

    fn io_error(&mut self, op: &'static str, e: io::Error) -> PmiError {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                self.state = State::Broken;
                PmiError::Timeout {
                    rank: self.rank,
                    op,
                    after: self.timeout.unwrap_or_default(),
                }
            }
            io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionAborted => PmiError::Closed { op },
            _ => PmiError::Io { op, source: e },
        }
    }

    fn protocol(&mut self, e: Wire2Error) -> PmiError {
        self.garbage(e.to_string())
    }

    fn garbage(&mut self, detail: String) -> PmiError {
        self.state = State::Broken;
        PmiError::Garbage {
            rank: self.rank,
            version: 2,
            detail,
        }
    }
}

impl<S: Read + Write + AsFd> AsFd for Pmi2Client<S> {
    /// The connection's descriptor, e.g. to poll it for EOF (the launcher
    /// died). Do not read from it while a call is in progress.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.stream.get_ref().as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;
    use std::time::Instant;

    /// A scripted server: reads the init line, then one frame per entry in
    /// `replies` and answers it with the entry's raw bytes (nothing if
    /// empty; [`HANG`]: no answer ever). Returns what it received.
    fn scripted(
        init_reply: &'static str,
        replies: Vec<&'static [u8]>,
    ) -> (UnixStream, thread::JoinHandle<Vec<String>>) {
        let (a, b) = UnixStream::pair().unwrap();
        let h = thread::spawn(move || {
            let mut r = BufReader::new(b.try_clone().unwrap());
            let mut w = b;
            let mut got = Vec::new();
            let mut line = String::new();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                return got;
            }
            got.push(line);
            w.write_all(init_reply.as_bytes()).unwrap();
            for reply in replies {
                let mut h = [0u8; 6];
                if r.read_exact(&mut h).is_err() {
                    break;
                }
                let len = wire2::parse_header(&h).unwrap();
                let mut body = vec![0u8; len];
                r.read_exact(&mut body).unwrap();
                got.push(String::from_utf8(body).unwrap());
                if reply == HANG {
                    // Keep the connection open, unanswered, until the client closes it.
                    let _ = r.read_to_end(&mut Vec::new());
                    break;
                }
                if !reply.is_empty() {
                    let _ = w.write_all(reply);
                }
            }
            got
        });
        (a, h)
    }

    /// A reply that never comes.
    const HANG: &[u8] = b"HANG";

    fn frame(body: &str) -> &'static [u8] {
        Box::leak(
            format!("{:<6}{body}", body.len())
                .into_bytes()
                .into_boxed_slice(),
        )
    }

    const OK_INIT: &str = "cmd=response_to_init rc=0 pmi_version=2 pmi_subversion=0\n";

    fn fullinit(rank: u32, size: u32) -> &'static [u8] {
        frame(Box::leak(
            format!("cmd=fullinit-response;rc=0;pmi-version=2;pmi-subversion=0;rank={rank};size={size};appnum=-1;debugged=FALSE;pmiverbose=FALSE;")
                .into_boxed_str(),
        ))
    }

    #[test]
    fn talks_like_slurm_expects() {
        let (s, server) = scripted(
            OK_INIT,
            vec![
                fullinit(1, 2),
                frame("cmd=job-getid-response;rc=0;jobid=7.0;"),
                frame("cmd=kvs-put-response;rc=0;"),
                frame("cmd=kvs-fence-response;rc=0;"),
                frame("cmd=kvs-get-response;rc=0;found=TRUE;value=v0;;x;"),
                frame("cmd=kvs-get-response;rc=0;found=FALSE;"),
                frame("cmd=finalize-response;rc=0;"),
            ],
        );
        let mut c = Pmi2Client::connect(s, 1, 2, "7.0").unwrap();
        assert!(matches!(
            c.put("k", "v"),
            Err(PmiError::NotInitialized { .. })
        ));
        c.init().unwrap();
        assert_eq!(c.jobid(), "7.0");
        c.put("k1", "v1").unwrap();
        assert!(c.put("k;", "v").is_err(), "refused before sending");
        c.fence().unwrap();
        assert_eq!(c.get("k0").unwrap(), "v0;x");
        assert!(matches!(c.get("nope"), Err(PmiError::KeyNotFound { key }) if key == "nope"));
        c.finalize().unwrap();
        assert!(matches!(c.fence(), Err(PmiError::Finalized { .. })));
        drop(c);
        assert_eq!(
            server.join().unwrap(),
            [
                wire2::INIT_LINE,
                "cmd=fullinit;pmijobid=7.0;pmirank=1;threaded=FALSE;",
                "cmd=job-getid;",
                "cmd=kvs-put;key=k1;value=v1;",
                "cmd=kvs-fence;",
                "cmd=kvs-get;jobid=7.0;srcid=-1;key=k0;",
                "cmd=kvs-get;jobid=7.0;srcid=-1;key=nope;",
                "cmd=finalize;",
            ]
        );
    }

    #[test]
    fn garbage_from_the_server_names_the_rank() {
        // A PMI-1 answer where a PMI-2 frame belongs.
        let (s, server) = scripted(OK_INIT, vec![b"cmd=barrier_out\n"]);
        let mut c = Pmi2Client::connect(s, 5, 8, "1.0").unwrap();
        let err = c.init().unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(
                err,
                PmiError::Garbage {
                    rank: 5,
                    version: 2,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(
            msg.contains("rank 5") && msg.contains("CANOPY_PMI"),
            "{msg}"
        );
        server.join().unwrap();

        // Garbage instead of the init answer.
        let (s, server) = scripted("hello there\n", vec![]);
        let mut c = Pmi2Client::connect(s, 2, 8, "1.0").unwrap();
        let err = c.init().unwrap_err();
        assert!(matches!(err, PmiError::Garbage { rank: 2, .. }), "{err:?}");
        server.join().unwrap();

        // A well-formed frame that answers the wrong command.
        let (s, server) = scripted(
            OK_INIT,
            vec![fullinit(0, 1), frame("cmd=kvs-fence-response;rc=0;")],
        );
        let mut c = Pmi2Client::connect(s, 0, 1, "1.0").unwrap();
        let err = c.init().unwrap_err();
        assert!(err.to_string().contains("cmd=job-getid-response"), "{err}");
        server.join().unwrap();
    }

    #[test]
    fn refusal_and_rank_mismatch() {
        let (s, server) = scripted(
            "cmd=response_to_init rc=1 pmi_version=1 pmi_subversion=1\n",
            vec![],
        );
        let mut c = Pmi2Client::connect(s, 0, 2, "1.0").unwrap();
        let err = c.init().unwrap_err();
        assert!(
            matches!(
                err,
                PmiError::Pmi2Refused {
                    rank: 0,
                    rc: 1,
                    pmi_version: 1,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("CANOPY_PMI=1"), "{err}");
        server.join().unwrap();

        let (s, server) = scripted(OK_INIT, vec![fullinit(3, 4)]);
        let mut c = Pmi2Client::connect(s, 1, 4, "1.0").unwrap();
        let err = c.init().unwrap_err().to_string();
        assert!(
            err.contains("rank 3 of 4") && err.contains("1 of 4"),
            "{err}"
        );
        server.join().unwrap();
    }

    #[test]
    fn failed_rc_is_reported_with_the_servers_message() {
        let (s, server) = scripted(
            OK_INIT,
            vec![
                fullinit(0, 1),
                frame("cmd=job-getid-response;rc=0;jobid=1.0;"),
                frame("cmd=kvs-fence-response;rc=-1;errmsg=mpi/pmi2: failed to send temp kvs;"),
            ],
        );
        let mut c = Pmi2Client::connect(s, 0, 1, "").unwrap();
        c.init().unwrap();
        match c.fence().unwrap_err() {
            PmiError::Failed { cmd, rc, msg } => {
                assert_eq!((cmd, rc), ("kvs-fence", -1));
                assert!(msg.contains("failed to send"), "{msg}");
            }
            other => panic!("{other:?}"),
        }
        server.join().unwrap();
    }

    #[test]
    fn a_fence_that_never_completes_times_out() {
        let (s, server) = scripted(
            OK_INIT,
            vec![
                fullinit(3, 4),
                frame("cmd=job-getid-response;rc=0;jobid=1.0;"),
                HANG, // reads the fence, never answers
            ],
        );
        let mut c = Pmi2Client::connect(s, 3, 4, "1.0").unwrap();
        c.init().unwrap();
        c.set_timeout(Some(Duration::from_millis(200))).unwrap();
        let t = Instant::now();
        let err = c.fence().unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(
            matches!(
                err,
                PmiError::Timeout {
                    rank: 3,
                    op: "kvs-fence",
                    ..
                }
            ),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("rank 3") && msg.contains("kvs-fence") && msg.contains("200ms"),
            "{msg}"
        );
        // The connection is now unusable, and says so.
        assert!(matches!(c.get("k"), Err(PmiError::Garbage { .. })));
        drop(c);
        server.join().unwrap();
    }

    #[test]
    fn server_eof_is_closed() {
        let (s, server) = scripted(OK_INIT, vec![b""]);
        let mut c = Pmi2Client::connect(s, 0, 1, "1.0").unwrap();
        let err = c.init().unwrap_err();
        assert!(
            matches!(err, PmiError::Closed { op: "fullinit" }),
            "{err:?}"
        );
        server.join().unwrap();
    }

    #[test]
    fn abort_sends_isworld_without_waiting() {
        let (s, server) = scripted(
            OK_INIT,
            vec![
                fullinit(0, 1),
                frame("cmd=job-getid-response;rc=0;jobid=1.0;"),
                b"",
            ],
        );
        let mut c = Pmi2Client::connect(s, 0, 1, "1.0").unwrap();
        c.init().unwrap();
        c.abort(3, "bad; thing").unwrap();
        drop(c);
        let got = server.join().unwrap();
        assert_eq!(
            got[3],
            "cmd=abort;isworld=TRUE;msg=exit code 3: bad_ thing;"
        );
    }
}
