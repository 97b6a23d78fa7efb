//! Bad input to `canopy start`: each fails with a non-zero exit and a
//! message that says what is wrong, and leaves nothing behind.
#![forbid(unsafe_code)]

use canopy_t::{canopy_bin, run_canopy, run_test, text};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(60);
const RUN: Duration = Duration::from_secs(30);

/// Assert a non-zero exit whose stderr contains every needle.
fn assert_fails(out: &Output, needles: &[&str]) {
    let stderr = text(&out.stderr);
    assert!(
        !out.status.success() && out.status.code().is_some(),
        "expected a non-zero exit, got {:?}\nstdout:\n{}\nstderr:\n{stderr}",
        out.status,
        text(&out.stdout)
    );
    for n in needles {
        assert!(stderr.contains(n), "stderr lacks {n:?}:\n{stderr}");
    }
}

fn assert_empty(dir: &Path) {
    let left: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(
        left.is_empty(),
        "left behind in {}: {left:?}",
        dir.display()
    );
}

#[test]
fn size_zero() {
    run_test(LIMIT, || {
        let tmp = tempfile::tempdir().unwrap();
        let out = run_canopy(
            &[
                "start",
                "--size",
                "0",
                "--rundir",
                tmp.path().to_str().unwrap(),
            ],
            &[],
            RUN,
        );
        assert_fails(&out, &["--size must be at least 1"]);
        assert_empty(tmp.path());
    });
}

#[test]
fn size_not_a_number() {
    run_test(LIMIT, || {
        let out = run_canopy(&["start", "--size", "abc"], &[], RUN);
        assert_fails(&out, &["invalid value 'abc'", "--size"]);
    });
}

#[test]
fn rundir_not_writable() {
    run_test(LIMIT, || {
        let out = run_canopy(&["start", "--rundir", "/proc", "--", "true"], &[], RUN);
        assert_fails(
            &out,
            &["cannot create a runtime directory in /proc", "--rundir"],
        );
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("does-not-exist");
        let out = run_canopy(
            &["start", "--rundir", missing.to_str().unwrap(), "--", "true"],
            &[],
            RUN,
        );
        assert_fails(
            &out,
            &["cannot create a runtime directory in", "does-not-exist"],
        );
        assert_empty(tmp.path());
    });
}

/// An executable shell script in `dir`.
fn script(dir: &Path, name: &str, body: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p.to_str().unwrap().to_string()
}

#[test]
fn broker_exits_during_start() {
    run_test(LIMIT, || {
        let tmp = tempfile::tempdir().unwrap();
        let rundir = tmp.path().join("run");
        std::fs::create_dir(&rundir).unwrap();
        let broker = script(tmp.path(), "broker-exit", "exit 3");
        let out = run_canopy(
            &[
                "start",
                "--size",
                "2",
                "--rundir",
                rundir.to_str().unwrap(),
                "--",
                "true",
            ],
            &[("CANOPY_BROKER", &broker)],
            RUN,
        );
        assert_fails(
            &out,
            &["broker rank", "exited with status 3", "during start"],
        );
        assert_empty(&rundir);
    });
}

#[test]
fn broker_killed_by_a_signal_during_start() {
    run_test(LIMIT, || {
        let tmp = tempfile::tempdir().unwrap();
        let rundir = tmp.path().join("run");
        std::fs::create_dir(&rundir).unwrap();
        let broker = script(tmp.path(), "broker-kill", "kill -9 $$");
        let out = run_canopy(
            &[
                "start",
                "--size",
                "1",
                "--rundir",
                rundir.to_str().unwrap(),
                "--",
                "true",
            ],
            &[("CANOPY_BROKER", &broker)],
            RUN,
        );
        assert_fails(
            &out,
            &["broker rank 0", "killed by signal 9", "during start"],
        );
        assert_empty(&rundir);
    });
}

#[test]
fn one_broker_of_several_crashes_during_start() {
    run_test(LIMIT, || {
        let tmp = tempfile::tempdir().unwrap();
        let rundir = tmp.path().join("run");
        std::fs::create_dir(&rundir).unwrap();
        // Rank 2 dies; the others are real brokers, stuck waiting for it.
        let broker = script(
            tmp.path(),
            "broker-rank2",
            &format!(
                "[ \"$PMI_RANK\" = 2 ] && exit 3\nexec '{}' \"$@\"",
                canopy_bin().display()
            ),
        );
        let t0 = std::time::Instant::now();
        let out = run_canopy(
            &[
                "start",
                "--size",
                "4",
                "--rundir",
                rundir.to_str().unwrap(),
                "--",
                "true",
            ],
            &[("CANOPY_BROKER", &broker)],
            RUN,
        );
        let took = t0.elapsed();
        assert_fails(
            &out,
            &["broker rank 2", "exited with status 3", "during start"],
        );
        assert_empty(&rundir);
        eprintln!("failed start took {took:?}");
        assert!(took < Duration::from_secs(5), "failed start took {took:?}");
    });
}

#[test]
fn port_in_use() {
    run_test(LIMIT, || {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let tmp = tempfile::tempdir().unwrap();
        let out = run_canopy(
            &[
                "start",
                "--size",
                "3",
                "--tcp",
                "--port",
                &port.to_string(),
                "--rundir",
                tmp.path().to_str().unwrap(),
                "--",
                "true",
            ],
            &[],
            RUN,
        );
        assert_fails(
            &out,
            &[
                &format!("127.0.0.1:{port}"),
                "Address already in use",
                "broker rank 0",
            ],
        );
        assert_empty(tmp.path());
        drop(taken);
    });
}

/// When one broker fails after the others have entered the PMI barrier,
/// `canopy start` should stop the others at once, not wait out its grace
/// period and SIGKILL them.
#[test]
fn failed_start_stops_the_other_brokers_promptly() {
    run_test(LIMIT, || {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port().to_string();
        let tmp = tempfile::tempdir().unwrap();
        let t0 = std::time::Instant::now();
        let out = run_canopy(
            &[
                "start",
                "--size",
                "3",
                "--tcp",
                "--port",
                &port,
                "--rundir",
                tmp.path().to_str().unwrap(),
                "--",
                "true",
            ],
            &[],
            RUN,
        );
        let took = t0.elapsed();
        assert_fails(&out, &["Address already in use"]);
        let stderr = text(&out.stderr);
        assert!(
            !stderr.contains("did not stop within"),
            "brokers had to be killed:\n{stderr}"
        );
        assert!(
            took < Duration::from_millis(800),
            "failed start took {took:?}"
        );
    });
}
