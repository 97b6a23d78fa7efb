//! `canopy-bench gss-bind [BINDS]`: Kerberos key-exchange bind latency,
//! quiet and under a slow-loris attack.
//!
//! Starts a throwaway MIT realm (`canopy_t::krb`) and a 1-broker user
//! instance over `--mechanism gssapi` with a remote client endpoint, then
//! binds BINDS (default 200) fresh CURVE keys one after another from a
//! child process (`canopy-bench gss-bind-client`, which holds the realm's
//! environment), first on a quiet listener, then while 200 connections
//! trickle one byte a second into the key-exchange port (reconnecting when
//! closed). Prints p50, p99 and max of each run; fails (exit 1) if a bind
//! fails or the attacked p99 is 200 ms or more.

use anyhow::{bail, Context, Result};
use canopy_t::krb::Realm;
use std::io::{BufRead, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// If the command line asks for this benchmark (or its client), run it and
/// return the exit code.
pub fn run_if_requested() -> Option<i32> {
    let args: Vec<String> = std::env::args().collect();
    let r = match args.get(1).map(String::as_str) {
        Some("gss-bind") => bench(args.get(2).and_then(|s| s.parse().ok()).unwrap_or(200)),
        Some("gss-bind-client") => client(&args[2..]),
        _ => return None,
    };
    Some(match r {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("canopy-bench: {}: error: {e:#}", args[1]);
            1
        }
    })
}

/// The child: bind N keys at KEX for TARGET, print each latency in µs.
fn client(args: &[String]) -> Result<()> {
    let [kex, target, n] = args else {
        bail!("usage: canopy-bench gss-bind-client KEX TARGET N");
    };
    let n: u32 = n.parse().context("N")?;
    let cfg = canopy_gss::ClientConfig {
        principal: None,
        target: target.clone(),
        purpose: canopy_gss::Purpose::Client,
        expect_server_key: None,
        timeout: Duration::from_secs(5),
        kdc_timeout: canopy_gss::krb::kdc_timeout(),
    };
    for _ in 0..n {
        let link = canopy_security_keypair()?;
        let t = Instant::now();
        canopy_gss::handshake(kex, &cfg, &link)?;
        println!("{}", t.elapsed().as_micros());
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

fn canopy_security_keypair() -> Result<canopy_security::CurveKeypair> {
    canopy_security::CurveKeypair::generate().map_err(|e| anyhow::anyhow!("{e}"))
}

/// 200 connections trickling a byte a second until `stop`.
fn slow_loris(addr: String, n: usize, stop: Arc<AtomicBool>) -> u64 {
    let open = || {
        let s = TcpStream::connect(&addr).ok()?;
        s.set_nonblocking(true).ok()?;
        Some((s, 0usize))
    };
    let header = [0u8, 0, 0x80, 0];
    let mut conns: Vec<Option<(TcpStream, usize)>> = (0..n).map(|_| open()).collect();
    let mut reconnects = 0;
    while !stop.load(Ordering::SeqCst) {
        for c in conns.iter_mut() {
            let alive = match c {
                Some((s, sent)) => {
                    let b = header.get(*sent).copied().unwrap_or(1);
                    *sent += 1;
                    let mut x = [0u8; 64];
                    matches!(s.write(&[b]), Ok(1)) && s.read(&mut x).is_err()
                }
                None => false,
            };
            if !alive {
                *c = open();
                reconnects += 1;
            }
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    reconnects
}

fn quantiles(mut v: Vec<u64>) -> (f64, f64, f64) {
    v.sort_unstable();
    let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize] as f64 / 1e3;
    (q(0.5), q(0.99), q(1.0))
}

fn bench(binds: u32) -> Result<()> {
    let exe = std::env::current_exe()?;
    let canopy = exe.parent().context("exe dir")?.join("canopy");
    let realm = Realm::start(&["alice"]);
    let env = realm.env("alice");
    let scratch = std::env::temp_dir().join(format!("cbench-gssbind-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let ep = format!("tcp://127.0.0.1:{port}");
    let mut child = Command::new(&canopy)
        .args(["start", "--size", "1", "--mechanism", "gssapi"])
        .args(["--listen-clients", &ep, "--rundir"])
        .arg(&scratch)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("cannot run {}", canopy.display()))?;
    let result = (|| -> Result<()> {
        let out = std::io::BufReader::new(child.stdout.take().context("stdout")?);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                for k in ["CANOPY_KEX", "CANOPY_GSS_TARGET"] {
                    if let Some(v) = line.strip_prefix(&format!("export {k}=")) {
                        let _ = tx.send((k, v.to_string()));
                    }
                }
            }
        });
        let (mut kex, mut target) = (None, None);
        while kex.is_none() || target.is_none() {
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(("CANOPY_KEX", v)) => kex = Some(v),
                Ok((_, v)) => target = Some(v),
                Err(_) => bail!("canopy start printed no CANOPY_KEX or CANOPY_GSS_TARGET"),
            }
        }
        let (kex, target) = (kex.unwrap_or_default(), target.unwrap_or_default());
        let run = || -> Result<Vec<u64>> {
            let out = Command::new(&exe)
                .args(["gss-bind-client", &kex, &target, &binds.to_string()])
                .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .stderr(Stdio::inherit())
                .output()?;
            if !out.status.success() {
                bail!("the binding client failed");
            }
            Ok(String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect())
        };
        let quiet = quantiles(run()?);
        let stop = Arc::new(AtomicBool::new(false));
        let attack = {
            let (a, s) = (kex.clone(), stop.clone());
            std::thread::spawn(move || slow_loris(a, 200, s))
        };
        std::thread::sleep(Duration::from_millis(1500));
        let attacked = run();
        stop.store(true, Ordering::SeqCst);
        let reconnects = attack.join().unwrap_or(0);
        let attacked = quantiles(attacked?);
        println!("bind latency, {binds} binds each (ms):");
        println!("| listener | p50 | p99 | max |");
        println!("|---|---|---|---|");
        for (name, (p50, p99, max)) in [
            ("quiet".to_string(), quiet),
            (
                format!("200 slow-loris connections ({reconnects} reconnects)"),
                attacked,
            ),
        ] {
            println!("| {name} | {p50:.2} | {p99:.2} | {max:.2} |");
        }
        if attacked.1 >= 200.0 {
            bail!("p99 under attack is {:.1} ms, not under 200 ms", attacked.1);
        }
        Ok(())
    })();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&scratch);
    result
}
