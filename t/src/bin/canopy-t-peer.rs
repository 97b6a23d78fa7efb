//! A raw local-socket peer for the integration tests, run as another user
//! (`runuser`): it connects and only reads, so it sees exactly what the
//! broker sends a client it refuses, without racing the broker's close.
//!
//! `canopy-t-peer read-local PATH TIMEOUT_MS` prints one line per frame
//! (`frame type=.. errnum=.. matchtag=.. payload=..`), then `closed` when the
//! broker closes the connection. Exit status: 0 closed, 2 cannot connect,
//! 3 timed out, 4 bad frame or I/O error, 64 usage.
#![forbid(unsafe_code)]

use canopy_proto::frame::FrameDecoder;
use std::io::{ErrorKind, Read};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (path, ms) = match args.as_slice() {
        [_, cmd, path, ms] if cmd == "read-local" => match ms.parse::<u64>() {
            Ok(ms) => (path.clone(), ms),
            Err(_) => usage(),
        },
        _ => usage(),
    };
    let mut s = match UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e) => {
            println!("connect error: {e}");
            std::process::exit(2);
        }
    };
    let deadline = Instant::now() + Duration::from_millis(ms);
    let mut dec = FrameDecoder::new();
    let mut buf = [0u8; 4096];
    loop {
        match dec.next_frame() {
            Ok(Some((h, p))) => {
                println!(
                    "frame type={:?} errnum={} matchtag={} payload={}",
                    h.msg_type,
                    h.errnum,
                    h.matchtag,
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
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            println!("timeout");
            std::process::exit(3);
        }
        let _ = s.set_read_timeout(Some(left));
        match s.read(&mut buf) {
            Ok(0) => {
                println!("closed");
                std::process::exit(0);
            }
            Ok(n) => dec.push(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => {
                println!("read error: {e}");
                std::process::exit(4);
            }
        }
    }
}

fn usage() -> ! {
    eprintln!("usage: canopy-t-peer read-local PATH TIMEOUT_MS");
    std::process::exit(64);
}
