//! A Kerberos key-exchange initiator for the integration tests, run in a
//! child process so that its Kerberos environment (`KRB5_CONFIG`,
//! `KRB5_CLIENT_KTNAME`, ...) never touches the test process.
//!
//! `canopy-t-kex ADDR TARGET PURPOSE COUNT [PAUSE_MS]` binds COUNT fresh
//! CURVE keys, one after another, at the key exchange ADDR whose acceptor
//! is TARGET, for PURPOSE (`client` or `overlay`), as the default principal
//! of the environment; it sleeps PAUSE_MS between binds. It prints one
//! line per bind, `ok MICROSECONDS` or `error MICROSECONDS MESSAGE`, then
//! `done OK ERRORS`. Exit status: 0 when every bind succeeded, 1 otherwise,
//! 64 usage.
#![forbid(unsafe_code)]

use canopy_gss::{ClientConfig, Purpose};
use std::time::{Duration, Instant};

fn usage() -> ! {
    eprintln!("usage: canopy-t-kex ADDR TARGET client|overlay COUNT [PAUSE_MS]");
    std::process::exit(64);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 5 || args.len() > 6 {
        usage();
    }
    let purpose = match args[3].as_str() {
        "client" => Purpose::Client,
        "overlay" => Purpose::Overlay,
        _ => usage(),
    };
    let Ok(count) = args[4].parse::<u64>() else {
        usage()
    };
    let pause = match args.get(5).map(|s| s.parse::<u64>()) {
        None => Duration::ZERO,
        Some(Ok(ms)) => Duration::from_millis(ms),
        Some(Err(_)) => usage(),
    };
    let cfg = ClientConfig {
        principal: None,
        target: args[2].clone(),
        purpose,
        expect_server_key: None,
        timeout: Duration::from_secs(5),
        kdc_timeout: canopy_gss::krb::kdc_timeout(),
    };
    let (mut ok, mut bad) = (0u64, 0u64);
    for _ in 0..count {
        let link = canopy_security::CurveKeypair::generate().unwrap_or_else(|e| {
            eprintln!("cannot generate a key: {e}");
            std::process::exit(1)
        });
        let t = Instant::now();
        let r = canopy_gss::handshake(&args[1], &cfg, &link);
        let us = t.elapsed().as_micros();
        match r {
            Ok(_) => {
                ok += 1;
                println!("ok {us}");
            }
            Err(e) => {
                bad += 1;
                println!("error {us} {e}");
            }
        }
        std::thread::sleep(pause);
    }
    println!("done {ok} {bad}");
    std::process::exit(i32::from(bad > 0));
}
