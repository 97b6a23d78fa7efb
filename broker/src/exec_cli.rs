//! `canopy exec`: send one `exec.run` to the local broker, which fans it
//! out down the tree, and stream what comes back: each rank's stdout and
//! stderr (kept apart, optionally labelled), failures named with their
//! reason, receipts (system instances) into a file. Ctrl-C forwards SIGINT,
//! a second one SIGKILL; stdin goes to the command on every target rank
//! unless `-n`. The exit status is the highest of the ranks'.

use crate::core::exec::{KILL_TOPIC, RUN_TOPIC, WRITE_TOPIC};
use canopy_client::{Client, ClientError};
use canopy_proto::exec::{self as wire, Record};
use canopy_proto::{MsgType, FLAG_MORE, NODEID_ANY};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, TryRecvError};
use std::sync::Arc;
use std::time::Duration;

/// What to run and how.
#[derive(Clone)]
pub struct ExecArgs {
    pub ranks: String,
    pub argv: Vec<String>,
    pub cwd: String,
    pub env: Vec<(String, String)>,
    pub label_io: bool,
    pub stdin: bool,
    pub receipts: Option<std::path::PathBuf>,
    /// How long a signed request stays valid, seconds.
    pub lifetime: u64,
    /// Sign even when the broker runs as this user.
    pub sign: bool,
    /// Restricted delegation: the request's audience is this service.
    pub delegate: Option<String>,
    /// Write the signed payload here and run nothing.
    pub out: Option<std::path::PathBuf>,
    /// Send this pre-built payload as is.
    pub submit: Option<std::path::PathBuf>,
    /// Register this namespace and submit as its service.
    pub as_service: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Identity(#[from] canopy_imp::userkeys::UserKeyError),
    #[error("{0}; see canopy exec --help")]
    Usage(String),
    #[error("cannot read or write {path}: {source}; check the path")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "cannot write receipts to {path}: {source}; check the directory exists and is writable"
    )]
    Receipts {
        path: String,
        source: std::io::Error,
    },
}

/// The body a personal instance's broker runs (crate::exec::RunSpec).
pub fn direct_body(a: &ExecArgs) -> Vec<u8> {
    let env: serde_json::Map<String, serde_json::Value> = a
        .env
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    serde_json::json!({
        "argv": a.argv,
        "cwd": a.cwd,
        "env": env,
        "stdin": a.stdin,
    })
    .to_string()
    .into_bytes()
}

/// Lines of one rank's stream, for `--label-io`.
#[derive(Default)]
struct Partial {
    buf: Vec<u8>,
}

/// A request signed with the user's key (`~/.canopy`), for the instance
/// the client is connected to, and its rank set: the body of a system
/// instance's `exec.run` (`stdin flag | canopy-imp input`, docs/imp.md).
pub fn signed_body(
    c: &mut Client,
    a: &ExecArgs,
    audience: canopy_imp::request::Audience,
) -> Result<(Vec<u8>, String), ExecError> {
    use canopy_imp::{envelope, frame, request, userkeys};
    let st = c.rpc(
        "overlay.status",
        NODEID_ANY,
        br#"{"summary":true}"#,
        Duration::from_secs(10),
    )?;
    let v: serde_json::Value = serde_json::from_slice(&st.payload).map_err(|e| {
        ExecError::Refused(format!("the broker's overlay status is unreadable: {e}"))
    })?;
    let instance = v["broker"]["instance"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let size = v["size"].as_u64().unwrap_or(0) as u32;
    let ranks = wire::parse_ranks(&a.ranks, size).map_err(ExecError::Usage)?;
    let dir = userkeys::default_dir()?;
    let (key, cert_env, cert) = userkeys::load_identity(&dir)?;
    let now = userkeys::now();
    let mut nonce = [0u8; 16];
    getrandom::getrandom(&mut nonce)
        .map_err(|e| ExecError::Refused(format!("cannot get random bytes for a nonce: {e}")))?;
    let req = request::ExecRequest {
        v: request::REQUEST_VERSION,
        principal: cert.principal.clone(),
        argv: a.argv.clone(),
        cwd: a.cwd.clone(),
        env: a.env.iter().cloned().collect(),
        instance,
        ranks: ranks.clone(),
        audience,
        issued_at: now,
        not_after: now + a.lifetime,
        nonce: envelope::hex(&nonce),
    };
    let json = serde_json::to_vec(&req).expect("a request serializes");
    let signed = envelope::sign(envelope::EXEC_REQUEST_TYPE, &json, &key);
    let mut body = vec![if a.stdin { b'1' } else { b'0' }];
    body.extend_from_slice(&frame::encode_input(&cert_env, &signed));
    Ok((body, wire::encode_ranks(&ranks)))
}

/// Run it; returns the exit status (the highest of the ranks').
pub fn run(uri: Option<&str>, a: ExecArgs) -> Result<i32, ExecError> {
    let mut c = Client::connect(uri)?;
    // A broker running as someone else (a system instance, or any remote
    // one) runs commands through canopy-imp: the request is signed.
    let own = !a.sign && c.broker_uid() == Some(nix::unistd::getuid().as_raw());
    if let Some(path) = &a.out {
        let (aud, submit_as) = match &a.delegate {
            Some(name) => (
                canopy_imp::request::Audience::Service { name: name.clone() },
                format!("service:{name}"),
            ),
            None => (canopy_imp::request::Audience::User, String::new()),
        };
        let (body, ranks) = signed_body(&mut c, &a, aud)?;
        let payload = wire::encode_run(&ranks, &submit_as, &body);
        std::fs::write(path, &payload).map_err(|source| ExecError::Write {
            path: path.display().to_string(),
            source,
        })?;
        return Ok(0);
    }
    let payload = match &a.submit {
        Some(path) => {
            let p = std::fs::read(path).map_err(|source| ExecError::Write {
                path: path.display().to_string(),
                source,
            })?;
            match &a.as_service {
                None => p,
                Some(name) => {
                    let add =
                        serde_json::json!({"namespace": name, "methods": {"submit": "owner"}});
                    c.rpc(
                        "service.add",
                        NODEID_ANY,
                        add.to_string().as_bytes(),
                        Duration::from_secs(10),
                    )?;
                    let Some((ranks, _, body)) = wire::decode_run(&p) else {
                        return Err(ExecError::Usage(format!(
                            "{} is not an exec.run payload written by canopy exec --out",
                            path.display()
                        )));
                    };
                    wire::encode_run(ranks, &format!("service:{name}"), body)
                }
            }
        }
        None => {
            let (body, ranks) = if own {
                (direct_body(&a), a.ranks.clone())
            } else {
                signed_body(&mut c, &a, canopy_imp::request::Audience::User)?
            };
            wire::encode_run(&ranks, "", &body)
        }
    };
    let tag = c.send(RUN_TOPIC, NODEID_ANY, &payload)?;

    let interrupted = Arc::new(AtomicBool::new(false));
    let _ = signal_hook::flag::register(signal_hook::consts::SIGINT, interrupted.clone());
    let _ = signal_hook::flag::register(signal_hook::consts::SIGTERM, interrupted.clone());
    let stdin_rx = a.stdin.then(spawn_stdin_reader);
    let mut stdin_open = a.stdin;

    let mut receipts = match &a.receipts {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|source| ExecError::Receipts {
                    path: p.display().to_string(),
                    source,
                })?,
        ),
        None => None,
    };
    let mut out = std::io::stdout().lock();
    let mut err = std::io::stderr();
    let mut partial: HashMap<(u32, bool), Partial> = HashMap::new();
    let mut status = 0i32;
    let mut ints = 0u32;
    // Writes not yet acknowledged: stdin is sent at most this far ahead.
    let mut unacked = 0usize;
    const AHEAD: usize = 8;
    loop {
        if interrupted.swap(false, Ordering::SeqCst) {
            ints += 1;
            if ints > 2 {
                // The commands were sent SIGKILL; stop waiting for their
                // last records (closing the connection makes every broker
                // kill what is left of this exec).
                let _ = writeln!(
                    err,
                    "canopy exec: interrupted three times: not waiting any longer"
                );
                return Ok(128 + 9);
            }
            let sig = if ints == 1 { 2 } else { 9 };
            if ints == 1 {
                let _ = writeln!(
                    err,
                    "canopy exec: interrupt: sending SIGINT (again for SIGKILL, a third time to stop waiting)"
                );
            }
            let _ = c.send(
                KILL_TOPIC,
                NODEID_ANY,
                &wire::encode_control(tag, sig.to_string().as_bytes()),
            );
        }
        if let Some(rx) = &stdin_rx {
            while stdin_open && unacked < AHEAD {
                match rx.try_recv() {
                    Ok(chunk) => {
                        let eof = chunk.is_empty();
                        c.send(WRITE_TOPIC, NODEID_ANY, &wire::encode_control(tag, &chunk))?;
                        unacked += 1;
                        if eof {
                            stdin_open = false;
                        }
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        c.send(WRITE_TOPIC, NODEID_ANY, &wire::encode_control(tag, b""))?;
                        stdin_open = false;
                    }
                }
            }
        }
        let m = match c.recv(Duration::from_millis(50)) {
            Ok(m) => m,
            Err(ClientError::Timeout(_)) => continue,
            Err(e) => return Err(e.into()),
        };
        if m.header.msg_type != MsgType::Response {
            continue;
        }
        if m.header.matchtag != tag {
            // An answer to exec.kill or exec.write: only errors matter.
            unacked = unacked.saturating_sub(1);
            if m.header.errnum != 0 {
                let _ = writeln!(err, "canopy exec: {}", String::from_utf8_lossy(&m.payload));
            }
            continue;
        }
        if m.header.errnum != 0 {
            return Err(ExecError::Refused(
                String::from_utf8_lossy(&m.payload).into_owned(),
            ));
        }
        // Each response carries records; the last one may carry some too.
        let last = m.header.flags & FLAG_MORE == 0;
        let recs = wire::records(&m.payload).unwrap_or_default();
        for r in recs {
            let Some(rec) = Record::decode(r) else {
                continue;
            };
            match rec {
                Record::Stdout(r, d) | Record::Stderr(r, d) => {
                    let is_out = matches!(rec, Record::Stdout(..));
                    let w: &mut dyn Write = if is_out { &mut out } else { &mut err };
                    if a.label_io {
                        let p = partial.entry((r, is_out)).or_default();
                        p.buf.extend_from_slice(d);
                        while let Some(i) = p.buf.iter().position(|&b| b == b'\n') {
                            let line: Vec<u8> = p.buf.drain(..=i).collect();
                            let _ = write!(w, "{r}: ");
                            let _ = w.write_all(&line);
                        }
                    } else {
                        let _ = w.write_all(d);
                    }
                    let _ = w.flush();
                }
                Record::Exit(r, e) => {
                    flush_partial(&mut partial, r, &mut out, &mut err);
                    status = status.max(e.code());
                    if let wire::Ended::Signal(s) = e {
                        let _ = writeln!(err, "canopy exec: rank {r}: killed by signal {s}");
                    }
                }
                Record::Failed { rank, code, reason } => {
                    flush_partial(&mut partial, rank, &mut out, &mut err);
                    status = status.max(code as i32);
                    let _ = writeln!(err, "canopy exec: {reason}");
                }
                Record::Receipt(_, d) => {
                    if let Some(f) = &mut receipts {
                        let mut line = d.to_vec();
                        line.push(b'\n');
                        f.write_all(&line).map_err(|source| ExecError::Receipts {
                            path: a.receipts.as_ref().expect("set").display().to_string(),
                            source,
                        })?;
                    }
                }
            }
        }
        if last {
            break;
        }
    }
    let ranks: Vec<u32> = partial.keys().map(|k| k.0).collect();
    for r in ranks {
        flush_partial(&mut partial, r, &mut out, &mut err);
    }
    let _ = out.flush();
    Ok(status)
}

/// What is left of a rank's lines without a newline, labelled.
fn flush_partial(
    partial: &mut HashMap<(u32, bool), Partial>,
    rank: u32,
    out: &mut dyn Write,
    err: &mut dyn Write,
) {
    for is_out in [true, false] {
        if let Some(p) = partial.remove(&(rank, is_out)) {
            if !p.buf.is_empty() {
                let w: &mut dyn Write = if is_out { &mut *out } else { &mut *err };
                let _ = write!(w, "{rank}: ");
                let _ = w.write_all(&p.buf);
                let _ = w.write_all(b"\n");
            }
        }
    }
}

/// Stdin in chunks; an empty chunk is the end.
fn spawn_stdin_reader() -> Receiver<Vec<u8>> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = tx.send(Vec::new());
                    return;
                }
                Ok(n) => {
                    if tx.send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
            }
        }
    });
    rx
}
