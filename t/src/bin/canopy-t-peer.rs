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
//! `canopy-t-peer flood-local PATH TIMEOUT_MS CONNS SIZES HOLD_MS` opens
//! CONNS connections; each sends one `broker.ping` to rank 0 per size in
//! SIZES (comma-separated payload bytes, `-` for none) without reading, holds them
//! HOLD_MS more without reading, then reads what each got (a slow reader).
//! It prints `conn N sent K of M` (and `conn N send error: ..`), then the
//! frames as `conn N frame ..`, then `conn N closed` or `conn N open`.
//!
//! `canopy-t-peer hold-service PATH NAMESPACE` registers NAMESPACE with one
//! method, `get` (role user), prints `registered`, then prints `request
//! TOPIC` for each request delivered to it and never answers (a provider
//! that hangs, to be killed).
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
    if let [_, cmd, path, ms, conns, sizes, hold] = args.as_slice() {
        if cmd == "flood-local" {
            flood(path, ms, conns, sizes, hold);
        }
    }
    if let [_, cmd, path, ns] = args.as_slice() {
        if cmd == "hold-service" {
            hold_service(path, ns);
        }
    }
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
                println!("frame {}", describe(&h, &p));
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

/// One frame as `type=.. errnum=.. matchtag=.. topic=.. payload=..`; a
/// payload over 200 bytes is shown as its length.
fn describe(h: &Header, p: &[u8]) -> String {
    let payload = if p.len() > 200 {
        format!("<{} bytes>", p.len())
    } else {
        String::from_utf8_lossy(p).into_owned()
    };
    format!(
        "type={:?} errnum={} matchtag={} topic={} payload={payload}",
        h.msg_type, h.errnum, h.matchtag, h.topic
    )
}

/// The slow-reader attack: see the module documentation.
fn flood(path: &str, ms: &str, conns: &str, sizes: &str, hold: &str) -> ! {
    let (Ok(ms), Ok(conns), Ok(hold)) =
        (ms.parse::<u64>(), conns.parse::<u32>(), hold.parse::<u64>())
    else {
        usage()
    };
    let sizes = if sizes == "-" { "" } else { sizes };
    let Ok(sizes) = sizes
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::parse::<usize>)
        .collect::<Result<Vec<_>, _>>()
    else {
        usage()
    };
    let deadline = Instant::now() + Duration::from_millis(ms);
    let mut streams = Vec::new();
    for n in 0..conns {
        match UnixStream::connect(path) {
            Ok(s) => streams.push(s),
            Err(e) => {
                println!("conn {n} connect error: {e}");
                std::process::exit(2);
            }
        }
    }
    // Each connection writes on a thread of its own: a write the broker
    // does not take must not hold up the others.
    let writers: Vec<_> = streams
        .iter()
        .enumerate()
        .map(|(n, s)| {
            let mut s = s.try_clone().expect("clone a stream");
            let sizes = sizes.clone();
            std::thread::spawn(move || {
                let _ = s.set_write_timeout(Some(deadline - Instant::now()));
                let mut sent = 0;
                for (i, &size) in sizes.iter().enumerate() {
                    let mut out = Vec::new();
                    let h = Header::request("broker.ping", 0, i as u32 + 1);
                    let p = vec![0x5a; size];
                    // Framed by hand: past the local connector's limit too.
                    let hb = h.encode().expect("a small header");
                    canopy_proto::frame::encode_raw_frame(&hb, &p, &mut out);
                    if let Err(e) = s.write_all(&out) {
                        println!("conn {n} send error: {e}");
                        break;
                    }
                    sent += 1;
                }
                println!("conn {n} sent {sent} of {}", sizes.len());
            })
        })
        .collect();
    for w in writers {
        let _ = w.join();
    }
    std::thread::sleep(
        Duration::from_millis(hold).min(deadline.saturating_duration_since(Instant::now())),
    );
    // One window for all the connections: each is read until it closes or
    // the window ends.
    let end = Instant::now() + Duration::from_millis(1500);
    for (n, s) in streams.iter_mut().enumerate() {
        let mut dec = FrameDecoder::new();
        let mut buf = vec![0u8; 1 << 16];
        let state = loop {
            while let Ok(Some((h, p))) = dec.next_frame() {
                println!("conn {n} frame {}", describe(&h, &p));
            }
            let now = Instant::now();
            if now >= deadline {
                break "open";
            }
            let left = (end.min(deadline) - now).max(Duration::from_millis(20));
            let _ = s.set_read_timeout(Some(left));
            match s.read(&mut buf) {
                Ok(0) => break "closed",
                Ok(k) => dec.push(&buf[..k]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    break "open"
                }
                Err(_) => break "closed",
            }
        };
        println!("conn {n} {state}");
    }
    std::process::exit(0);
}

fn usage() -> ! {
    eprintln!("usage: canopy-t-peer read-local PATH TIMEOUT_MS | sub-local|talk-local PATH TIMEOUT_MS PATTERN | flood-local PATH TIMEOUT_MS CONNS SIZES HOLD_MS");
    std::process::exit(64);
}

fn hold_service(path: &str, ns: &str) -> ! {
    let mut s = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e) => {
            println!("connect error: {e}");
            std::process::exit(2);
        }
    };
    let body = format!(r#"{{"namespace":"{ns}","methods":{{"get":"user"}}}}"#);
    let mut out = Vec::new();
    encode_frame(
        &Header::request("service.add", canopy_proto::NODEID_ANY, 1),
        body.as_bytes(),
        &mut out,
    )
    .unwrap();
    if s.write_all(&out).is_err() {
        std::process::exit(4);
    }
    let mut dec = FrameDecoder::new();
    let mut buf = vec![0u8; 65536];
    loop {
        let n = match s.read(&mut buf) {
            Ok(0) | Err(_) => std::process::exit(0),
            Ok(n) => n,
        };
        dec.push(&buf[..n]);
        while let Ok(Some((h, p))) = dec.next_frame() {
            match h.msg_type {
                canopy_proto::MsgType::Response if h.matchtag == 1 && h.errnum == 0 => {
                    println!("registered")
                }
                canopy_proto::MsgType::Response => {
                    println!(
                        "refused errnum={} {}",
                        h.errnum,
                        String::from_utf8_lossy(&p)
                    );
                    std::process::exit(4);
                }
                canopy_proto::MsgType::Request => println!("request {}", h.topic),
                _ => {}
            }
        }
    }
}
