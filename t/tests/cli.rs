//! Small things the command line must get right (issue 15): output into a
//! closed pipe, error messages that say why and do not blame the broker
//! for local mistakes, `config check` agreeing with the broker, `key
//! reload`'s lines, and journald priorities on log lines.
#![forbid(unsafe_code)]

use canopy_t::cluster::Cluster;
use canopy_t::{canopy_bin, run_canopy, run_command, run_test, text, wait_until, Instance};
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(120);
const RUN: Duration = Duration::from_secs(30);
/// What a tool exits with when its output's reader went away.
const READER_GONE: i32 = 141;

/// Run canopy with its stdout a pipe whose reader has already gone, as in
/// `canopy ... | head -0`. Returns the exit status and stderr; the process
/// group is killed if it overruns `timeout` (then the status is None).
fn run_into_closed_pipe(args: &[&str], timeout: Duration) -> (Option<ExitStatus>, String) {
    // The read end is closed before the command starts: a quick tool
    // could otherwise write before the test closed it.
    let (read, write) = nix::unistd::pipe().unwrap();
    drop(read);
    let mut child = Command::new(canopy_bin())
        .args(args)
        .env_remove("CANOPY_URI")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::from(write))
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    (status, err)
}

fn assert_reader_gone(args: &[&str], status: Option<ExitStatus>, err: &str) {
    assert!(
        !err.contains("panicked"),
        "canopy {args:?} panicked:\n{err}"
    );
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(READER_GONE),
        "canopy {args:?} into a closed pipe: {status:?}, stderr:\n{err}"
    );
    assert!(err.is_empty(), "canopy {args:?} said something:\n{err}");
}

/// #7: every tool that prints stops quietly (status 141, no panic, no
/// message) when its reader has gone, `canopy overlay status --json |
/// head -1` included.
#[test]
fn tools_writing_into_a_closed_pipe_exit_quietly() {
    run_test(LIMIT, || {
        let inst = Instance::start(2, 2, &[]);
        let uri = inst.uri().to_string();
        let tmp = tempfile::tempdir().unwrap();
        let policy = tmp.path().join("policy.toml");
        std::fs::write(
            &policy,
            "[[rule]]\nname = \"bob\"\nprincipal = \"unix:bob\"\nroles = [\"user\"]\n",
        )
        .unwrap();
        let key = tmp.path().join("k");
        let out = run_canopy(&["keygen", key.to_str().unwrap()], &[], RUN);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let config = tmp.path().join("c.toml");
        std::fs::write(
            &config,
            "[bootstrap]\ncurve_cert = \"/k/%h\"\nhosts = [ { host = \"solo\" } ]\n",
        )
        .unwrap();
        let audit = tmp.path().join("audit.log");
        std::fs::write(&audit, "").unwrap();
        let manual = tmp.path().join("manual");
        let cases: Vec<Vec<&str>> = vec![
            vec!["overlay", "status", "--json", "--uri", &uri],
            vec!["overlay", "status", "--uri", &uri],
            vec![
                "overlay",
                "status",
                "--wait",
                "full",
                "--timeout",
                "5s",
                "--uri",
                &uri,
            ],
            vec!["ping", "--rank", "1", "--count", "2", "--uri", &uri],
            vec!["event", "pub", "t.x", "hello", "--uri", &uri],
            vec!["acl", "reload", "--uri", &uri],
            vec![
                "acl",
                "check",
                "unix:bob",
                "--policy",
                policy.to_str().unwrap(),
            ],
            vec!["keygen", "--public", key.to_str().unwrap()],
            vec!["config", "check", config.to_str().unwrap()],
            vec!["audit", "verify", audit.to_str().unwrap()],
            vec!["generate-manual", manual.to_str().unwrap()],
        ];
        for args in &cases {
            let (status, err) = run_into_closed_pipe(args, RUN);
            assert_reader_gone(args, status, &err);
        }
    });
}

/// #7: `event sub` (no --count) into a closed pipe stops at the first
/// event instead of running on, writing nowhere.
#[test]
fn event_sub_stops_when_its_reader_has_gone() {
    run_test(LIMIT, || {
        let inst = Instance::start(1, 2, &[]);
        let uri = inst.uri().to_string();
        let args = ["event", "sub", "t.*", "--uri", &uri];
        let sub = std::thread::spawn({
            let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
            move || {
                let a: Vec<&str> = args.iter().map(String::as_str).collect();
                run_into_closed_pipe(&a, Duration::from_secs(20))
            }
        });
        // Publish until the subscriber has seen one and gone.
        let done = wait_until(Duration::from_secs(20), || {
            let out = run_canopy(&["event", "pub", "t.x", "hi", "--uri", &uri], &[], RUN);
            assert!(out.status.success(), "{}", text(&out.stderr));
            std::thread::sleep(Duration::from_millis(100));
            sub.is_finished()
        });
        assert!(
            done,
            "event sub still running 20 s after its reader went away"
        );
        let (status, err) = sub.join().unwrap();
        assert_reader_gone(&args, status, &err);
    });
}

/// #8: an unknown role says which one and what the roles are.
#[test]
fn an_unknown_role_in_allow_says_why() {
    run_test(LIMIT, || {
        let out = run_canopy(
            &["start", "--allow", "unix:bob=wizard", "--", "true"],
            &[],
            RUN,
        );
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains("--allow unix:bob=wizard")
                && err.contains("unknown role 'wizard'")
                && err.contains("peer, owner, admin, operator, user"),
            "{err}"
        );
    });
}

/// #9: mistakes found by the tool itself are not reported as the broker
/// refusing the connection.
#[test]
fn local_errors_do_not_blame_the_broker() {
    run_test(LIMIT, || {
        let inst = Instance::start(2, 2, &[]);
        let uri = inst.uri().to_string();
        let tmp = tempfile::tempdir().unwrap();
        let bad = tmp.path().join("bad.toml");
        std::fs::write(
            &bad,
            "[[rule]]\nname = \"x\"\nprincipal = \"unix:bob\"\nroles = [\"wizard\"]\n",
        )
        .unwrap();
        let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
            (
                vec![
                    "acl",
                    "check",
                    "unix:bob",
                    "--policy",
                    bad.to_str().unwrap(),
                ],
                vec!["bad.toml:4", "wizard"],
            ),
            (
                vec!["overlay", "status", "--wait", "ful", "--uri", &uri],
                vec!["--wait ful: expected one of full, partial"],
            ),
            (
                vec!["overlay", "disconnect", "0", "--uri", &uri],
                vec!["rank 0 has no parent"],
            ),
            (
                vec![
                    "acl",
                    "check",
                    "unix:bob",
                    "--mechanism",
                    "smoke",
                    "--uri",
                    &uri,
                ],
                vec!["--mechanism smoke"],
            ),
        ];
        for (args, needles) in cases {
            let out = run_canopy(&args, &[], RUN);
            let err = text(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
            assert!(!err.contains("refused the connection"), "{args:?}: {err}");
            for n in needles {
                assert!(err.contains(n), "{args:?}: stderr lacks {n:?}:\n{err}");
            }
        }
        // The instance is untouched: rank 0 was not disconnected.
        inst.assert_all_ranks_answer();
    });
}

/// #11: a one-host CURVE config without `curve_cert` fails `config check`
/// for the reason the broker gives when it refuses to start.
#[test]
fn config_check_refuses_what_the_broker_refuses() {
    run_test(LIMIT, || {
        let tmp = tempfile::tempdir().unwrap();
        let config = tmp.path().join("solo.toml");
        std::fs::write(
            &config,
            "[bootstrap]\nhosts = [ { host = \"solo\", bind = \"tcp://127.0.0.1:1\", connect = \"tcp://127.0.0.1:1\" } ]\n",
        )
        .unwrap();
        let reason = "no secret certificate is configured for rank 0";
        let check = run_canopy(&["config", "check", config.to_str().unwrap()], &[], RUN);
        let check_err = text(&check.stderr);
        assert_eq!(check.status.code(), Some(1), "{check_err}");
        assert!(
            check_err.contains(reason) && check_err.contains("bootstrap.curve_cert"),
            "{check_err}"
        );
        assert!(!text(&check.stdout).contains(": ok"));
        let rundir = tmp.path().join("run");
        let broker = run_canopy(
            &[
                "broker",
                "--config",
                config.to_str().unwrap(),
                "--hostname",
                "solo",
                "--force-root",
                "--rundir",
                rundir.to_str().unwrap(),
            ],
            &[],
            RUN,
        );
        let broker_err = text(&broker.stderr);
        assert!(!broker.status.success(), "{broker_err}");
        assert!(broker_err.contains(reason), "{broker_err}");
        // With the certificate configured, both accept it.
        std::fs::write(
            &config,
            format!(
                "[bootstrap]\ncurve_cert = \"{}/%h.key_secret\"\nhosts = [ {{ host = \"solo\" }} ]\n",
                tmp.path().display()
            ),
        )
        .unwrap();
        let check = run_canopy(&["config", "check", config.to_str().unwrap()], &[], RUN);
        assert!(check.status.success(), "{}", text(&check.stderr));
    });
}

/// #12: `key reload` names each rank once.
#[test]
fn key_reload_names_each_rank_once() {
    run_test(LIMIT, || {
        let mut c = Cluster::new(3);
        c.start_all();
        c.wait_full(Duration::from_secs(20));
        let out = run_canopy(&["key", "reload", "--uri", &c.uri(0)], &[], RUN);
        let o = text(&out.stdout);
        assert!(out.status.success(), "{o}{}", text(&out.stderr));
        let lines: Vec<&str> = o.lines().collect();
        assert_eq!(lines.len(), 3, "{o}");
        for (r, line) in lines.iter().enumerate() {
            assert!(
                line.starts_with(&format!("rank {r}: reloaded ")),
                "line {r}: {line:?}\n{o}"
            );
            assert!(!line.contains(&format!("rank {r}: rank {r}")), "{o}");
        }
    });
}

/// Run `canopy start --allow ... -- canopy acl reload` under `sh`, with
/// `JOURNAL_STREAM` set to stderr's device and inode when `journal` (as
/// systemd does), else to something else; returns the combined stderr.
fn acl_reload_log(journal: bool) -> String {
    let stream = if journal {
        "$(stat -L -c %d:%i /proc/self/fd/2)"
    } else {
        "0:0"
    };
    let script = format!(
        "JOURNAL_STREAM={stream}; export JOURNAL_STREAM; exec \"$0\" start --allow unix:nobody=user -- \"$0\" acl reload"
    );
    let out = run_command(
        Command::new("sh")
            .args(["-c", &script])
            .arg(canopy_bin())
            .env_remove("CANOPY_URI")
            .env("RUST_LOG", "warn"),
        RUN,
    );
    let err = text(&out.stderr);
    assert!(out.status.success(), "{}{err}", text(&out.stdout));
    err
}

/// Under journald, a warn line (the broker logs a policy reload at warn)
/// starts with `<4>`; with a JOURNAL_STREAM
/// that is not stderr (inherited, then redirected), no prefix.
#[test]
fn log_lines_carry_journald_priorities_when_stderr_is_the_journal() {
    run_test(LIMIT, || {
        let err = acl_reload_log(true);
        let line = err
            .lines()
            .find(|l| l.contains("acl: reload"))
            .unwrap_or_else(|| panic!("no acl reload warning in:\n{err}"));
        assert!(line.starts_with("<4>"), "{line:?}");
        assert!(line.contains("WARN"), "{line:?}");
        let err = acl_reload_log(false);
        let line = err
            .lines()
            .find(|l| l.contains("acl: reload"))
            .unwrap_or_else(|| panic!("no acl reload warning in:\n{err}"));
        assert!(!line.starts_with('<'), "{line:?}");
    });
}

/// `canopy whoami` (issue 15): the principal, mechanism, roles and
/// deciding rule as the broker sees this connection, for a local client
/// and for a remote CURVE client.
#[test]
fn whoami_shows_how_the_broker_sees_a_local_and_a_remote_client() {
    use canopy_t::hostile::{client_endpoint, remote_key, rule, write_policy};
    run_test(LIMIT, || {
        let dir = tempfile::tempdir().unwrap();
        let (key, principal) = remote_key(dir.path(), "alice");
        let policy = dir.path().join("policy.toml");
        write_policy(&policy, &rule("workstations", &principal, "\"user\""));
        let inst = Instance::start(
            2,
            2,
            &[
                "--policy",
                policy.to_str().unwrap(),
                "--listen-clients",
                "tcp://127.0.0.1:*",
            ],
        );
        // Local, the owner.
        let out = run_canopy(&["whoami", "--uri", inst.uri()], &[], RUN);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let local = text(&out.stdout);
        assert!(local.contains("mechanism: local"), "{local}");
        assert!(local.contains("roles:     owner"), "{local}");
        // Remote, over CURVE, as the policy's `workstations` rule admits it.
        let (ep, server) = client_endpoint(&inst);
        let out = run_canopy(
            &[
                "whoami",
                "--json",
                "--uri",
                &ep,
                "--key",
                key.to_str().unwrap(),
                "--server-key",
                &server,
            ],
            &[],
            RUN,
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["principal"], principal.as_str(), "{v}");
        assert_eq!(v["mechanism"], "curve", "{v}");
        assert_eq!(v["roles"], "user", "{v}");
        let rule = v["rule"].as_str().unwrap_or_default();
        assert!(
            rule.contains("policy.toml") && rule.contains("workstations"),
            "{v}"
        );
    });
}

/// Issue 15 #13: `canopy start --allow unix:USER=user` lets USER in with no
/// hand work on the runtime directory: once the brokers are up it is
/// opened to others (traverse only) and the sockets too; a parent
/// directory closed to them is reported with the fix.
#[test]
fn start_allow_lets_another_local_user_in_without_hand_work() {
    use canopy_t::users::{as_other_user, other_user, OTHER_USER};
    use std::os::unix::fs::PermissionsExt;
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED start_allow_lets_another_local_user_in_without_hand_work: needs root");
        return;
    }
    run_test(LIMIT, || {
        other_user();
        // A parent directory closed to others is reported, with the fix.
        let closed = tempfile::tempdir().unwrap();
        std::fs::set_permissions(closed.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let allow = format!("unix:{OTHER_USER}=user");
        let out = run_canopy(
            &[
                "start",
                "--rundir",
                closed.path().to_str().unwrap(),
                "--allow",
                &allow,
                "--",
                "true",
            ],
            &[],
            RUN,
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert!(
            text(&out.stderr).contains("other users cannot reach this instance's sockets")
                && text(&out.stderr).contains("--rundir /tmp"),
            "{}",
            text(&out.stderr)
        );
        let inst = Instance::start(2, 2, &["--allow", &allow]);
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(inst.rundir()), 0o711);
        // The parent (the test's temp dir, as /tmp would be) is open to
        // others: the other user gets in, with no hand work.
        let canopy = inst.tempdir().join("canopy");
        std::fs::copy(canopy_bin(), &canopy).unwrap();
        std::fs::set_permissions(&canopy, std::fs::Permissions::from_mode(0o755)).unwrap();
        let uri = format!("local://{}", inst.local_path(1).display());
        let out = as_other_user(
            &canopy,
            &["ping", "--count", "1", "--rank", "0", "--uri", &uri],
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        let out = as_other_user(&canopy, &["whoami", "--uri", &uri]);
        assert!(
            text(&out.stdout).contains(&format!("unix:{OTHER_USER}")),
            "{}",
            text(&out.stdout)
        );
        assert!(
            text(&out.stdout).contains("roles:     user"),
            "{}",
            text(&out.stdout)
        );
    });
}

/// The file name of the executable a process runs.
fn exe_name(pid: i32) -> String {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// `canopy start` runs `canopy-broker`, the broker without the tools'
/// code, when it is next to `canopy`; `canopy broker` hands over to it;
/// and a `canopy-broker` from another build refuses to run for `canopy`.
#[test]
fn brokers_run_the_broker_only_binary_of_the_same_build() {
    run_test(LIMIT, || {
        let inst = Instance::start(3, 2, &[]);
        let pids = inst.broker_pids();
        assert_eq!(pids.len(), 3, "{pids:?}");
        for (pid, rank) in pids {
            assert_eq!(exe_name(pid), "canopy-broker", "rank {rank}");
        }
        inst.assert_all_ranks_answer();

        // `canopy broker` (a singleton here) becomes canopy-broker.
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new(canopy_bin());
        cmd.arg("broker")
            .arg("--rundir")
            .arg(dir.path().join("run"))
            .env("RUST_LOG", "warn");
        let d = canopy_t::Daemon::spawn(&mut cmd, &dir.path().join("stderr"));
        assert!(
            wait_until(RUN, || exe_name(d.pid()) == "canopy-broker"),
            "canopy broker runs {:?}: {}",
            exe_name(d.pid()),
            d.stderr_text()
        );
        drop(d);

        let mut broker = canopy_bin();
        broker.set_file_name("canopy-broker");
        let out = run_command(
            Command::new(&broker)
                .args(["broker", "--help"])
                .env("CANOPY_EXPECT_VERSION", "0.0.1 (another build)"),
            RUN,
        );
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let err = text(&out.stderr);
        assert!(
            err.contains("but canopy is 0.0.1 (another build); install both from the same build"),
            "{err}"
        );
        // Run by hand it takes the same arguments, `broker` or not.
        for args in [&["--help"][..], &["broker", "--help"]] {
            let out = run_command(Command::new(&broker).args(args), RUN);
            assert!(out.status.success(), "{args:?}: {out:?}");
            assert!(text(&out.stdout).contains("Usage: canopy broker [OPTIONS]"));
        }
    });
}
