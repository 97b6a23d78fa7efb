//! `canopy-bench gss-soak [MESSAGES] [WINDOW] [curve]`: the gssapi soak
//! (with `curve`, the same run over plain CURVE, for comparison).
//!
//! Starts a throwaway MIT realm (`canopy_t::krb`) and a 2-broker user
//! instance over `--mechanism gssapi`, then sends MESSAGES (default 1M)
//! `broker.ping` requests from rank 0's local connector to rank 1, so every
//! request and response crosses the Kerberos-bound CURVE link, WINDOW
//! (default 64) in flight. Prints both brokers' RSS at 100k messages and at
//! the end, and fails (exit 1) if either grew by more than 5 %. Also
//! prints the link handshake time the child logged.

use anyhow::{bail, Context, Result};
use canopy_client::Client;
use canopy_t::krb::Realm;
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// If the command line asks for the soak, run it and return the exit code.
pub fn run_if_requested() -> Option<i32> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) != Some("gss-soak") {
        return None;
    }
    let n = args
        .get(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000u64);
    let window = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(64u64);
    let mech = if args.get(4).map(String::as_str) == Some("curve") {
        "curve"
    } else {
        "gssapi"
    };
    Some(match soak(n, window, mech) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("canopy-bench: gss-soak: error: {e:#}");
            1
        }
    })
}

fn rss_kib(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")
}

/// Broker pids whose command line names `marker`, by rank.
fn brokers(marker: &str) -> Vec<u32> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(c) = std::fs::read(format!("/proc/{pid}/cmdline")) {
            let c = String::from_utf8_lossy(&c);
            if c.contains(marker) && c.contains("broker") {
                v.push(pid);
            }
        }
    }
    v.sort();
    v
}

fn soak(n: u64, window: u64, mech: &str) -> Result<()> {
    let canopy = std::env::current_exe()?
        .parent()
        .context("exe dir")?
        .join("canopy");
    let realm = Realm::start(&["alice"]);
    let scratch = tempfile_dir()?;
    let mut env = realm.env("alice");
    env.push(("RUST_LOG".into(), "warn,canopy_broker::gss=info".into()));
    let mut child = Command::new(&canopy)
        .args(["start", "--size", "2", "--mechanism", mech, "--rundir"])
        .arg(&scratch)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {}", canopy.display()))?;
    let result = (|| -> Result<()> {
        // Read stdout to its end (the launcher must never see a closed pipe).
        let out = std::io::BufReader::new(child.stdout.take().context("stdout")?);
        let (utx, urx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                if let Some(u) = line.strip_prefix("export CANOPY_URI=") {
                    let _ = utx.send(u.to_string());
                }
            }
        });
        let uri = urx
            .recv_timeout(Duration::from_secs(60))
            .context("canopy start printed no CANOPY_URI")?;
        // Drain the brokers' log for good (a full pipe would stall them),
        // picking out the child's handshake time.
        let err = std::io::BufReader::new(child.stderr.take().context("stderr")?);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in err.lines().map_while(Result::ok) {
                if l.contains("WARN") || l.contains("ERROR") || l.contains("panicked") {
                    eprintln!("{l}");
                }
                if let Some(t) = l.split("(took ").nth(1) {
                    let _ = tx.send(t.trim_end_matches(')').to_string());
                }
            }
        });
        let took = rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| "?".into());
        if mech == "gssapi" {
            println!("gss link handshake (child to parent, first ticket): {took}");
        }
        let pids = brokers(&scratch.display().to_string());
        if pids.len() != 2 {
            bail!("expected 2 brokers, found {pids:?}");
        }
        let mut c = Client::connect(Some(&uri))?;
        let payload = [0x5au8; 64];
        let (mut sent, mut done) = (0u64, 0u64);
        let mut at_100k = None;
        let t0 = Instant::now();
        while done < n {
            while sent < n && sent - done < window {
                c.send("broker.ping", 1, &payload)?;
                sent += 1;
            }
            let m = c.recv(Duration::from_secs(10))?;
            if m.header.errnum != 0 {
                bail!("ping {done} failed: errnum {}", m.header.errnum);
            }
            done += 1;
            if done == 100_000.min(n / 10).max(1) && at_100k.is_none() {
                at_100k = Some((
                    done,
                    pids.iter()
                        .map(|&p| rss_kib(p))
                        .collect::<Result<Vec<_>>>()?,
                ));
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        let end: Vec<u64> = pids.iter().map(|&p| rss_kib(p)).collect::<Result<_>>()?;
        let (k, mid) = at_100k.context("no midpoint")?;
        println!("{n} pings over the {mech} link in {secs:.1} s ({:.0} msg/s round trips, window {window})", n as f64 / secs);
        let mut worst = 0.0f64;
        for (i, (a, b)) in mid.iter().zip(&end).enumerate() {
            let g = (*b as f64 - *a as f64) / *a as f64 * 100.0;
            worst = worst.max(g);
            println!("rank {i} RSS: {a} KiB at {k} messages, {b} KiB at {n} ({g:+.1} %)");
        }
        if worst > 5.0 {
            bail!("broker RSS grew {worst:.1} % from {k} to {n} messages (limit 5 %)");
        }
        println!("ok: RSS flat within 5 %");
        Ok(())
    })();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&scratch);
    drop(realm);
    result
}

fn tempfile_dir() -> Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("cbench-gss-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
