//! Instances of several sizes come up and every rank answers `broker.ping`.
#![forbid(unsafe_code)]

use canopy_t::{canopy_bin, run_canopy, run_test, text, Instance};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(60);

/// Every rank answers through rank 0, and through its own local socket a
/// ping to the "mirror" rank answers too (routing up, then down).
fn every_rank_answers(size: u32, fanout: u32) {
    let inst = Instance::start(size, fanout, &[]);
    assert_eq!(
        inst.initial_broker_pids().len(),
        size as usize,
        "expected {size} broker processes"
    );
    let ranks: Vec<u32> = inst.initial_broker_pids().iter().map(|&(_, r)| r).collect();
    assert_eq!(ranks, (0..size).collect::<Vec<_>>());
    inst.assert_all_ranks_answer();
    for rank in 0..size {
        let target = size - 1 - rank;
        let mut c = inst.client(rank);
        let payload = format!("from {rank} to {target}").into_bytes();
        let m = Instance::ping(&mut c, target, &payload)
            .unwrap_or_else(|e| panic!("ping {rank} -> {target}: {e}"));
        assert_eq!(m.header.nodeid, target);
        assert_eq!(m.payload, payload);
    }
    // A rank that does not exist is refused, not silently dropped.
    let mut c = inst.client(0);
    let err = Instance::ping(&mut c, size, b"x").expect_err("ping to a rank past the end");
    assert_eq!(
        err.errnum(),
        Some(canopy_proto::errno::EHOSTUNREACH),
        "unexpected error for rank {size}: {err}"
    );
}

#[test]
fn size_1_every_rank_answers() {
    run_test(LIMIT, || every_rank_answers(1, 2));
}

#[test]
fn size_2_every_rank_answers() {
    run_test(LIMIT, || every_rank_answers(2, 2));
}

#[test]
fn size_8_every_rank_answers() {
    run_test(LIMIT, || every_rank_answers(8, 2));
}

#[test]
fn size_32_every_rank_answers() {
    run_test(LIMIT, || every_rank_answers(32, 2));
}

#[test]
fn start_runs_ping_as_its_command() {
    run_test(LIMIT, || {
        let tmp = tempfile::tempdir().unwrap();
        let bin = canopy_bin();
        let out = run_canopy(
            &[
                "start",
                "--size",
                "8",
                "--fanout",
                "2",
                "--rundir",
                tmp.path().to_str().unwrap(),
                "--",
                bin.to_str().unwrap(),
                "ping",
                "--rank",
                "7",
                "--count",
                "3",
            ],
            &[],
            Duration::from_secs(30),
        );
        let stdout = text(&out.stdout);
        assert!(
            out.status.success(),
            "{:?}\nstdout:\n{stdout}\nstderr:\n{}",
            out.status,
            text(&out.stderr)
        );
        let replies: Vec<&str> = stdout
            .lines()
            .filter(|l| l.starts_with("broker.ping "))
            .collect();
        assert_eq!(replies.len(), 3, "stdout:\n{stdout}");
        for (i, l) in replies.iter().enumerate() {
            assert!(
                l.contains("rank=7") && l.contains(&format!("seq={i}")),
                "bad reply line: {l}"
            );
        }
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with("--- 3 sent, 3 received")),
            "no summary line:\n{stdout}"
        );
        assert_eq!(
            std::fs::read_dir(tmp.path()).unwrap().count(),
            0,
            "runtime directory left behind"
        );
    });
}

#[test]
fn start_passes_on_the_command_exit_code() {
    run_test(LIMIT, || {
        let tmp = tempfile::tempdir().unwrap();
        let out = run_canopy(
            &[
                "start",
                "--size",
                "2",
                "--rundir",
                tmp.path().to_str().unwrap(),
                "--",
                "sh",
                "-c",
                "test -S \"${CANOPY_URI#local://}\" && exit 7",
            ],
            &[],
            Duration::from_secs(30),
        );
        assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
    });
}
