//! Liveness: a stopped broker becomes torpid, then lost, then recovers; a
//! killed middle rank fails every request in flight through it with
//! EHOSTUNREACH, promptly, and requests to its subtree fail at once.
#![forbid(unsafe_code)]

use canopy_proto::errno;
use canopy_t::{run_canopy, run_test, text, wait_until, Instance};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(60);
const FAST: &[&str] = &[
    "--keep-going",
    "--heartbeat",
    "0.1",
    "--torpid",
    "0.5",
    "--lost",
    "1.5",
];

fn pid_of(inst: &Instance, rank: u32) -> Pid {
    let (pid, _) = inst
        .broker_pids()
        .into_iter()
        .find(|&(_, r)| r == rank)
        .unwrap_or_else(|| panic!("rank {rank} is not running"));
    Pid::from_raw(pid)
}

/// Rank `rank`'s state as rank 0 sees it.
fn state_of(inst: &Instance, rank: u32) -> String {
    let s = inst.status(0);
    s["ranks"]
        .as_array()
        .and_then(|a| a.iter().find(|r| r["rank"] == rank))
        .and_then(|r| r["state"].as_str())
        .unwrap_or("missing")
        .to_string()
}

#[test]
fn stopped_leaf_goes_torpid_then_lost_then_recovers() {
    run_test(LIMIT, || {
        let inst = Instance::start(4, 2, FAST);
        inst.assert_all_ranks_answer();
        let leaf = pid_of(&inst, 3);
        let t0 = Instant::now();
        kill(leaf, Signal::SIGSTOP).unwrap();

        assert!(
            wait_until(Duration::from_secs(3), || state_of(&inst, 3) == "torpid"),
            "rank 3 never became torpid; state {}",
            state_of(&inst, 3)
        );
        let torpid_after = t0.elapsed();
        assert!(
            torpid_after >= Duration::from_millis(400),
            "torpid too early: {torpid_after:?} (torpid timeout 0.5 s)"
        );
        assert!(
            wait_until(Duration::from_secs(4), || state_of(&inst, 3) == "lost"),
            "rank 3 never became lost; state {}",
            state_of(&inst, 3)
        );
        let lost_after = t0.elapsed();
        assert!(
            lost_after >= Duration::from_millis(1400) && lost_after < Duration::from_secs(4),
            "lost after {lost_after:?} (lost timeout 1.5 s)"
        );
        assert_eq!(inst.status(0)["health"], "degraded");
        // While lost, requests to it fail at once instead of hanging.
        let mut c = inst.client(0);
        let t = Instant::now();
        let err = Instance::ping(&mut c, 3, b"x").unwrap_err();
        assert_eq!(err.errnum(), Some(errno::EHOSTUNREACH), "{err}");
        assert!(t.elapsed() < Duration::from_secs(1));

        // A script waiting for full gives up at its timeout, saying why.
        let o = run_canopy(
            &["overlay", "status", "--wait", "full", "--timeout", "0.5s"],
            &[("CANOPY_URI", inst.uri())],
            Duration::from_secs(10),
        );
        assert_eq!(o.status.code(), Some(1), "{o:?}");
        assert!(
            text(&o.stderr).contains("is degraded, not full"),
            "{}",
            text(&o.stderr)
        );

        kill(leaf, Signal::SIGCONT).unwrap();
        // ... and returns as soon as it is.
        let o = run_canopy(
            &["overlay", "status", "--wait", "full", "--timeout", "10s"],
            &[("CANOPY_URI", inst.uri())],
            Duration::from_secs(20),
        );
        assert_eq!(o.status.code(), Some(0), "{o:?}");
        assert!(
            text(&o.stdout).contains("3: full (online"),
            "{}",
            text(&o.stdout)
        );
        assert_eq!(inst.status(0)["health"], "full");
        inst.assert_all_ranks_answer();
    });
}

#[test]
fn killed_middle_rank_fails_requests_in_flight() {
    run_test(LIMIT, || {
        let inst = Instance::start(8, 2, FAST);
        inst.assert_all_ranks_answer();
        // Freeze rank 7 so that requests to it stay in flight, then kill
        // rank 1, the middle of the path 0 -> 1 -> 3 -> 7.
        let leaf = pid_of(&inst, 7);
        kill(leaf, Signal::SIGSTOP).unwrap();
        let mut c = inst.client(0);
        let tags: Vec<u32> = (0..20)
            .map(|i| c.send("broker.ping", 7, format!("{i}").as_bytes()).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        let t0 = Instant::now();
        kill(pid_of(&inst, 1), Signal::SIGKILL).unwrap();
        for tag in tags {
            let err = c
                .wait(tag, Duration::from_secs(2))
                .expect_err("a request through a killed rank cannot succeed");
            assert_eq!(
                err.errnum(),
                Some(errno::EHOSTUNREACH),
                "request {tag}: {err}"
            );
        }
        let took = t0.elapsed();
        assert!(
            took < Duration::from_secs(2),
            "in-flight requests answered after {took:?}"
        );
        // New requests into the lost subtree fail at once.
        for rank in [1, 3, 4, 7] {
            let err = Instance::ping(&mut c, rank, b"").unwrap_err();
            assert_eq!(
                err.errnum(),
                Some(errno::EHOSTUNREACH),
                "rank {rank}: {err}"
            );
        }
        assert_eq!(state_of(&inst, 1), "lost");
        assert_eq!(inst.status(0)["health"], "degraded");
        // The other half of the tree is unaffected.
        for rank in [0, 2, 5, 6] {
            Instance::ping(&mut c, rank, b"ok").unwrap();
        }
        let _ = kill(leaf, Signal::SIGCONT);
        // The launcher reports the death when it reaps the broker, which
        // may come after the overlay noticed.
        assert!(
            inst.wait_log_line(
                &["broker rank 1", "continuing degraded"],
                Duration::from_secs(5)
            )
            .is_some(),
            "launcher did not report rank 1:\n{}",
            inst.stderr_text()
        );
    });
}
