//! A raw local-socket peer for the integration tests, run as another user
//! (`runuser`, or `setpriv` for a uid with no name), so it sees exactly
//! what the broker sends a client, without racing the broker's close.
//!
//! `canopy-t-peer read-local PATH TIMEOUT_MS` connects and only reads.
//! `canopy-t-peer sub-local PATH TIMEOUT_MS PATTERN` subscribes to PATTERN,
//! then only reads (a silent subscriber).
//! `canopy-t-peer talk-local PATH TIMEOUT_MS PATTERN` subscribes, then sends
//! a `broker.ping` to rank 0 every 50 ms while it reads.
//!
//! Each prints one line per frame (`frame type=.. errnum=.. matchtag=..
//! topic=.. payload=..`), then `closed` when the broker closes the
//! connection. Exit status: 0 closed, 2 cannot connect, 3 timed out, 4 bad
//! frame or I/O error, 64 usage.
#![forbid(unsafe_code)]

use canopy_proto::frame::{encode_frame, FrameDecoder};
use canopy_proto::Header;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (mode, path, ms, pattern) = match args.as_slice() {
        [_, cmd, path, ms] if cmd == "read-local" => (cmd.clone(), path.clone(), ms, None),
        [_, cmd, path, ms, pat] if cmd == "sub-local" || cmd == "talk-local" => {
            (cmd.clone(), path.clone(), ms, Some(pat.clone()))
        }
        _ => usage(),
    };
    let Ok(ms) = ms.parse::<u64>() else { usage() };
    let mut s = match UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e) => {
            println!("connect error: {e}");
            std::process::exit(2);
        }
    };
    let send = |s: &mut UnixStream, topic: &str, tag: u32, payload: &[u8]| {
        let mut out = Vec::new();
        encode_frame(&Header::request(topic, 0, tag), payload, &mut out).unwrap();
        // A closed connection shows up on the next read.
        let _ = s.write_all(&out);
    };
    if let Some(p) = &pattern {
        send(&mut s, "event.subscribe", 1, p.as_bytes());
    }
    let talk = mode == "talk-local";
    let deadline = Instant::now() + Duration::from_millis(ms);
    let mut next_ping = Instant::now();
    let mut tag = 100;
    let mut dec = FrameDecoder::new();
    let mut buf = [0u8; 4096];
    loop {
        match dec.next_frame() {
            Ok(Some((h, p))) => {
                println!(
                    "frame type={:?} errnum={} matchtag={} topic={} payload={}",
                    h.msg_type,
                    h.errnum,
                    h.matchtag,
                    h.topic,
                    String::from_utf8_lossy(&p)
                );
                continue;
            }
            Ok(None) => {}
            Err(e) => {
                println!("bad frame: {e}");
                std::process::exit(4);
            }
        }
        let now = Instant::now();
        if now >= deadline {
            println!("timeout");
            std::process::exit(3);
        }
        if talk && now >= next_ping {
            tag += 1;
            send(&mut s, "broker.ping", tag, b"talk");
            next_ping = now + Duration::from_millis(50);
        }
        let wait = deadline.min(if talk { next_ping } else { deadline }) - now;
        let _ = s.set_read_timeout(Some(wait.max(Duration::from_millis(1))));
        match s.read(&mut buf) {
            Ok(0) => {
                println!("closed");
                std::process::exit(0);
            }
            Ok(n) => dec.push(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                println!("closed");
                std::process::exit(0);
            }
            Err(e) => {
                println!("read error: {e}");
                std::process::exit(4);
            }
        }
    }
}

fn usage() -> ! {
    eprintln!("usage: canopy-t-peer read-local PATH TIMEOUT_MS | sub-local|talk-local PATH TIMEOUT_MS PATTERN");
    std::process::exit(64);
}
