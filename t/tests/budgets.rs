//! Configured budgets reach every endpoint of real brokers: `canopy start
//! --max-message` (passed on to the brokers it launches) and `[budgets]`
//! in a system instance's config. An oversized message is refused (the
//! local connector cuts the client from the frame's length prefix; the
//! remote CURVE endpoint answers EMSGSIZE, or libzmq drops a frame over
//! ZMQ_MAXMSGSIZE), and small messages are still answered.
#![forbid(unsafe_code)]

use canopy_client::{Client, TcpKeys};
use canopy_t::cluster::Cluster;
use canopy_t::{run_canopy, run_test, text, Instance, RPC_TIMEOUT};
use std::path::Path;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(90);

fn remote_key(dir: &Path) -> (std::path::PathBuf, String) {
    let kp = canopy_security::CurveKeypair::generate().unwrap();
    let key = dir.join("remote");
    canopy_security::cert::write_pair(&kp, "remote", &key, &dir.join("remote.pub")).unwrap();
    (key, canopy_security::curve_principal(kp.public()))
}

fn remote(inst: &Instance, key: &Path) -> Client {
    let s = inst.status(0);
    let ep = s["broker"]["client_endpoint"].as_str().unwrap();
    let server = s["broker"]["public_key"].as_str().unwrap();
    Client::connect_tcp(ep, &TcpKeys::load(key, server).unwrap()).unwrap()
}

#[test]
fn start_max_message_refuses_a_2kib_ping_locally_and_remotely_and_answers_small_ones() {
    run_test(LIMIT, || {
        let dir = tempfile::tempdir().unwrap();
        let (key, principal) = remote_key(dir.path());
        let policy = dir.path().join("policy.toml");
        std::fs::write(
            &policy,
            format!(
                "[[rule]]\nname = \"remote\"\nprincipal = \"{principal}\"\nroles = [\"user\"]\n"
            ),
        )
        .unwrap();
        let inst = Instance::start(
            2,
            2,
            &[
                "--max-message",
                "1024",
                "--policy",
                policy.to_str().unwrap(),
                "--listen-clients",
                "tcp://127.0.0.1:*",
            ],
        );
        // Local: a small ping through rank 0 to rank 1 and back.
        let mut c = inst.client(0);
        let small = vec![7u8; 1000];
        assert_eq!(Instance::ping(&mut c, 1, &small).unwrap().payload, small);
        // A 2 KiB ping: the connection is cut from the length prefix.
        let big = vec![9u8; 2048];
        assert!(
            Instance::ping(&mut c, 0, &big).is_err(),
            "a 2 KiB ping was answered"
        );
        let line = inst
            .wait_log_line(&["local: bad frame", "2048"], Duration::from_secs(10))
            .unwrap_or_else(|| panic!("no refusal logged:\n{}", inst.stderr_text()));
        assert!(line.contains("max message of 1024 bytes"), "{line}");
        // Logged once for that client.
        let n = inst
            .stderr_text()
            .lines()
            .filter(|l| l.contains("local: bad frame"))
            .count();
        assert_eq!(n, 1, "{}", inst.stderr_text());
        // The broker still serves a new local client (on every rank).
        let mut c = inst.client(0);
        assert_eq!(Instance::ping(&mut c, 1, &small).unwrap().payload, small);
        let mut c1 = inst.client(1);
        assert!(Instance::ping(&mut c1, 1, &big).is_err());
        let mut c1 = inst.client(1);
        assert_eq!(Instance::ping(&mut c1, 0, &small).unwrap().payload, small);

        // Remote CURVE client: 2 KiB is answered EMSGSIZE by the core.
        let mut rc = remote(&inst, &key);
        assert_eq!(Instance::ping(&mut rc, 1, &small).unwrap().payload, small);
        match rc.rpc("broker.ping", 0, &big, RPC_TIMEOUT) {
            Err(e) => {
                let msg = e.to_string();
                assert!(
                    msg.contains("over this broker's limit of 1024 bytes"),
                    "{msg}"
                );
            }
            Ok(m) => panic!("a 2 KiB remote ping was answered: {:?}", m.header),
        }
        assert_eq!(Instance::ping(&mut rc, 0, &small).unwrap().payload, small);
        // Past ZMQ_MAXMSGSIZE (max message + 8 KiB of header), libzmq drops
        // the connection before buffering the frame: no answer.
        let huge = vec![1u8; 64 << 10];
        assert!(rc
            .rpc("broker.ping", 0, &huge, Duration::from_secs(2))
            .is_err());
        let mut rc2 = remote(&inst, &key);
        assert_eq!(Instance::ping(&mut rc2, 0, &small).unwrap().payload, small);
        drop(inst);
    });
}

#[test]
fn start_refuses_budgets_out_of_order_before_starting_anything() {
    run_test(LIMIT, || {
        let dir = tempfile::tempdir().unwrap();
        let out = run_canopy(
            &[
                "start",
                "--rundir",
                dir.path().to_str().unwrap(),
                "--max-message",
                "64MiB",
                "--",
                "true",
            ],
            &[],
            Duration::from_secs(20),
        );
        assert!(!out.status.success());
        let err = text(&out.stderr);
        assert!(err.contains("--max-message"), "{err}");
        assert!(
            err.contains("raise client_bytes or lower max_message"),
            "{err}"
        );
        // Nothing was created.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let out = run_canopy(
            &["start", "--connections", "0", "--", "true"],
            &[],
            Duration::from_secs(20),
        );
        assert!(!out.status.success());
        assert!(
            text(&out.stderr).contains("--connections"),
            "{}",
            text(&out.stderr)
        );
        let out = run_canopy(
            &["start", "--max-message", "16MB", "--", "true"],
            &[],
            Duration::from_secs(20),
        );
        assert!(!out.status.success());
        assert!(
            text(&out.stderr).contains("binary unit"),
            "{}",
            text(&out.stderr)
        );
        // A consistent set is accepted and the command runs inside.
        let out = run_canopy(
            &[
                "start",
                "--rundir",
                dir.path().to_str().unwrap(),
                "--max-message",
                "1KiB",
                "--client-bytes",
                "64KiB",
                "--principal-bytes",
                "1MiB",
                "--total-bytes",
                "2MiB",
                "--connections",
                "4",
                "--",
                "true",
            ],
            &[],
            Duration::from_secs(60),
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
    });
}

#[test]
fn system_instance_budgets_table_limits_messages() {
    run_test(LIMIT, || {
        let mut cl = Cluster::new(2);
        let text_ = cl.config_text(&cl.hosts_text(2));
        cl.write(
            "canopy.toml",
            &format!("{text_}\n[budgets]\nmax_message = \"1KiB\"\nclient_bytes = \"64KiB\"\n"),
        );
        cl.start_all();
        cl.wait_full(Duration::from_secs(20));
        let small = vec![3u8; 512];
        let mut c = cl.client(0);
        assert_eq!(
            c.rpc("broker.ping", 1, &small, RPC_TIMEOUT)
                .unwrap()
                .payload,
            small
        );
        assert!(c.rpc("broker.ping", 1, &[0u8; 2048], RPC_TIMEOUT).is_err());
        let mut c = cl.client(0);
        assert_eq!(
            c.rpc("broker.ping", 1, &small, RPC_TIMEOUT)
                .unwrap()
                .payload,
            small
        );
        assert!(cl.log(0).contains("local: bad frame"), "{}", cl.logs());

        // A flag overriding [budgets] that breaks the order is refused,
        // naming the flag; a bad [budgets] names file, line and key.
        let out = run_canopy(
            &[
                "broker",
                "--config",
                cl.path("canopy.toml").to_str().unwrap(),
                "--hostname",
                "n0",
                "--force-root",
                "--max-message",
                "128KiB",
            ],
            &[],
            Duration::from_secs(20),
        );
        assert!(!out.status.success());
        assert!(
            text(&out.stderr).contains("--max-message"),
            "{}",
            text(&out.stderr)
        );
        cl.write(
            "bad.toml",
            &format!("{text_}\n[budgets]\nconnections = -1\n"),
        );
        let out = run_canopy(
            &[
                "broker",
                "--config",
                cl.path("bad.toml").to_str().unwrap(),
                "--hostname",
                "n0",
                "--force-root",
            ],
            &[],
            Duration::from_secs(20),
        );
        assert!(!out.status.success());
        let err = text(&out.stderr);
        assert!(err.contains("bad.toml:"), "{err}");
        assert!(err.contains("budgets.connections"), "{err}");
        drop(cl);
    });
}
