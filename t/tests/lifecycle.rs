//! How an instance ends: a broker dying takes the instance down; SIGINT
//! (Ctrl-C) stops it. Either way nothing is left behind.
#![forbid(unsafe_code)]

use canopy_t::{process_alive, run_test, Instance};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(60);

/// No broker of `inst` is alive and its runtime directory is gone.
fn assert_nothing_left(inst: &Instance) {
    let alive: Vec<_> = inst
        .initial_broker_pids()
        .iter()
        .filter(|&&(pid, _)| process_alive(pid))
        .collect();
    assert!(alive.is_empty(), "brokers still running: {alive:?}");
    assert!(
        !inst.rundir().exists(),
        "runtime directory {} left behind: {:?}",
        inst.rundir().display(),
        std::fs::read_dir(inst.rundir())
            .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
            .ok()
    );
}

#[test]
fn killing_one_broker_ends_the_instance() {
    run_test(LIMIT, || {
        let mut inst = Instance::start(8, 2, &[]);
        inst.assert_all_ranks_answer();
        let (pid, rank) = inst
            .broker_pids()
            .into_iter()
            .find(|&(_, r)| r == 3)
            .expect("rank 3 is running");
        let t0 = Instant::now();
        kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
        let status = inst.wait_exit(Duration::from_secs(2));
        let took = t0.elapsed();
        let stderr = inst.stderr_text();
        let status = status.unwrap_or_else(|| {
            panic!("canopy start still running 2 s after rank {rank} was killed:\n{stderr}")
        });
        assert!(
            !status.success() && status.code().is_some(),
            "canopy start should exit non-zero, got {status:?}"
        );
        assert!(
            stderr.contains(&format!("broker rank {rank} (pid {pid})"))
                && stderr.contains("killed by signal 9"),
            "stderr does not name the dead broker:\n{stderr}"
        );
        eprintln!("instance ended {took:?} after the kill");
        assert_nothing_left(&inst);
    });
}

#[test]
fn sigint_stops_the_instance() {
    run_test(LIMIT, || {
        let mut inst = Instance::start(8, 2, &[]);
        inst.assert_all_ranks_answer();
        assert!(inst.local_path(0).exists() && inst.tbon_path(0).exists());
        let t0 = Instant::now();
        inst.signal(Signal::SIGINT);
        let status = inst.wait_exit(Duration::from_secs(1));
        let took = t0.elapsed();
        let status = status.unwrap_or_else(|| {
            panic!(
                "canopy start still running 1 s after SIGINT:\n{}",
                inst.stderr_text()
            )
        });
        assert_eq!(status.code(), Some(130), "{}", inst.stderr_text());
        eprintln!("instance stopped {took:?} after SIGINT");
        assert_nothing_left(&inst);
        assert_eq!(
            std::fs::read_dir(inst.tempdir())
                .unwrap()
                .flatten()
                .map(|e| e.file_name().into_string().unwrap())
                .collect::<Vec<_>>(),
            vec!["start.stderr".to_string()],
            "files left in --rundir"
        );
    });
}

#[test]
fn sigterm_stops_the_instance() {
    run_test(LIMIT, || {
        let mut inst = Instance::start(4, 2, &[]);
        inst.signal(Signal::SIGTERM);
        let status = inst
            .wait_exit(Duration::from_secs(1))
            .expect("canopy start still running 1 s after SIGTERM");
        assert_eq!(status.code(), Some(128 + 15), "{}", inst.stderr_text());
        assert_nothing_left(&inst);
    });
}

/// A reader that goes away before `canopy start` prints its `export`
/// lines (a script that closed the pipe) does not take the instance down.
#[test]
fn a_closed_stdout_does_not_kill_the_launcher() {
    run_test(LIMIT, || {
        let rundir = tempfile::Builder::new()
            .prefix("canopy-t-pipe-")
            .tempdir()
            .unwrap();
        let mut child = std::process::Command::new(canopy_t::canopy_bin())
            .args(["start", "--size", "2", "--rundir"])
            .arg(rundir.path())
            .env_remove("CANOPY_URI")
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let pgid = Pid::from_raw(child.id() as i32);
        // The runtime directory is made inside --rundir.
        let local0 = || {
            std::fs::read_dir(rundir.path())
                .ok()?
                .flatten()
                .map(|e| e.path().join("local-0"))
                .find(|p| p.exists())
        };
        let up = canopy_t::wait_until(Duration::from_secs(20), || {
            let Some(p) = local0() else { return false };
            canopy_client::Client::connect(Some(&format!("local://{}", p.display())))
                .and_then(|mut c| c.rpc("broker.ping", 1, b"", canopy_t::RPC_TIMEOUT))
                .is_ok()
        });
        std::thread::sleep(Duration::from_millis(300));
        let early = child.try_wait().unwrap();
        let _ = kill(pgid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break Some(s);
            }
            if Instant::now() > deadline {
                let _ = nix::sys::signal::killpg(pgid, Signal::SIGKILL);
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        assert!(up, "the instance never answered; stderr:\n{err}");
        assert!(early.is_none(), "the launcher exited ({early:?}):\n{err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(status.is_some(), "no exit within 15 s of SIGTERM:\n{err}");
    });
}
