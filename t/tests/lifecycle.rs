//! How an instance ends: a broker dying takes the instance down; SIGINT
//! (Ctrl-C) stops it. Either way nothing is left behind.
#![forbid(unsafe_code)]

use canopy_t::{process_alive, run_test, Instance};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
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
