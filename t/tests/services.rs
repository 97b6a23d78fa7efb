//! Services offered by clients, end to end with real brokers (issue 13):
//! a provider on rank 3 called from the CLI on rank 0, roles per method
//! and per namespace enforced before delivery, a provider killed with
//! SIGKILL mid-request, duplicate registrations, registering without the
//! grant, and a remote CURVE client offering a service.
#![forbid(unsafe_code)]

use canopy_client::{Client, ClientError};
use canopy_proto::{errno, NODEID_ANY};
use canopy_t::hostile::{remote_client, remote_key, write_policy};
use canopy_t::{run_canopy, run_test, text, wait_until, Instance, RPC_TIMEOUT};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(90);
const KVS: &str = r#"{"namespace":"kvs","methods":{"get":"user","put":"operator"}}"#;

/// Serve `kvs` on a connection in a thread: `get K` answers `value-of-K`,
/// `get missing` answers ENOENT; each request's caller is recorded.
struct Provider {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<(String, String, String)>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Provider {
    fn start(mut c: Client, body: &str) -> Provider {
        let r = c.rpc("service.add", NODEID_ANY, body.as_bytes(), RPC_TIMEOUT);
        assert!(r.is_ok(), "service.add: {r:?}");
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (st, sn) = (stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                let m = match c.next_request(Duration::from_millis(100)) {
                    Ok(m) => m,
                    Err(ClientError::Timeout(_)) => continue,
                    Err(e) => panic!("provider: {e}"),
                };
                let h = &m.header;
                let arg = String::from_utf8_lossy(&m.payload).into_owned();
                sn.lock()
                    .unwrap()
                    .push((h.topic.clone(), h.userid.clone(), h.roles.to_string()));
                let (e, reply) = match arg.as_str() {
                    "missing" => (errno::ENOENT, "no such key: missing".to_string()),
                    _ => (0, format!("{}-of-{arg}", h.topic)),
                };
                c.respond(h.matchtag, e, reply.as_bytes()).unwrap();
            }
        });
        Provider {
            stop,
            seen,
            thread: Some(thread),
        }
    }

    fn seen(&self) -> Vec<(String, String, String)> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn rpc_cli(inst: &Instance, args: &[&str]) -> std::process::Output {
    let mut a = vec!["rpc"];
    a.extend_from_slice(args);
    run_canopy(&a, &[("CANOPY_URI", inst.uri())], Duration::from_secs(20))
}

#[test]
fn a_provider_on_rank_3_is_called_from_the_cli_on_rank_0() {
    run_test(LIMIT, || {
        let inst = Instance::start(4, 2, &[]);
        let p = Provider::start(inst.client(3), KVS);
        let out = rpc_cli(&inst, &["-r", "3", "kvs.get", "k1"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout).trim(), "kvs.get-of-k1");
        // The service's own errno and message reach the caller.
        let out = rpc_cli(&inst, &["-r", "3", "kvs.get", "missing"]);
        assert!(!out.status.success());
        assert!(
            text(&out.stderr).contains("no such key: missing"),
            "{}",
            text(&out.stderr)
        );
        // A method it did not declare: ENOSYS, naming what it offers.
        let out = rpc_cli(&inst, &["-r", "3", "kvs.drop"]);
        assert!(!out.status.success());
        assert!(
            text(&out.stderr).contains("has no method 'drop'; it offers get, put"),
            "{}",
            text(&out.stderr)
        );
        let seen = p.seen();
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert!(
            seen[0].1.starts_with("unix:"),
            "the caller's principal: {seen:?}"
        );
        // service list shows it on rank 3, with its provider.
        let out = run_canopy(
            &["service", "list", "-r", "3"],
            &[("CANOPY_URI", inst.uri())],
            Duration::from_secs(20),
        );
        let listing = text(&out.stdout);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert!(
            listing.contains("kvs") && listing.contains("put(operator)"),
            "{listing}"
        );
        let out = run_canopy(
            &["service", "list", "-r", "all", "--json"],
            &[("CANOPY_URI", inst.uri())],
            Duration::from_secs(20),
        );
        let lines: Vec<String> = text(&out.stdout).lines().map(str::to_owned).collect();
        assert_eq!(lines.len(), 4, "{lines:?}");
        let offered: Vec<bool> = lines
            .iter()
            .map(|l| l.contains("\"namespace\":\"kvs\""))
            .collect();
        assert_eq!(offered, [false, false, false, true]);
    });
}

fn errnum(r: Result<canopy_client::Msg, ClientError>) -> (u32, String) {
    match r {
        Ok(m) => (0, text(&m.payload)),
        Err(e) => (e.errnum().unwrap_or(u32::MAX), e.to_string()),
    }
}

#[test]
fn roles_per_method_and_per_namespace_are_enforced_before_delivery() {
    run_test(LIMIT, || {
        let dir = tempfile::tempdir().unwrap();
        let (alice_key, alice) = remote_key(dir.path(), "alice");
        let (bob_key, _) = remote_key(dir.path(), "bob");
        let (svc_key, svc) = remote_key(dir.path(), "svc");
        let me = format!(
            "unix:{}",
            nix::unistd::User::from_uid(nix::unistd::geteuid())
                .unwrap()
                .unwrap()
                .name
        );
        let policy = dir.path().join("policy.toml");
        write_policy(
            &policy,
            &format!(
                r#"
[[rule]]
name = "me"
principal = "{me}"
roles = ["owner"]

[[rule]]
name = "users"
principal = "curve:*"
roles = ["user"]

[[rule]]
name = "alice-backup"
principal = "{alice}"
roles = ["operator"]
topics = ["backup.*"]

[[rule]]
name = "svc-registers"
principal = "{svc}"
register = ["remote*"]
"#
            ),
        );
        let inst = Instance::start(
            4,
            2,
            &[
                "--policy",
                policy.to_str().unwrap(),
                "--listen-clients",
                "tcp://127.0.0.1:*",
            ],
        );
        let backup = Provider::start(
            inst.client(2),
            r#"{"namespace":"backup","methods":{"start":"operator","status":"user"}}"#,
        );
        let job = Provider::start(
            inst.client(2),
            r#"{"namespace":"job","methods":{"cancel":"operator"}}"#,
        );
        let mut a = remote_client(&inst, &alice_key);
        let (e, body) = errnum(a.rpc("backup.start", 2, b"nightly", RPC_TIMEOUT));
        assert_eq!(e, 0, "{body}");
        assert_eq!(body, "backup.start-of-nightly");
        let (e, msg) = errnum(a.rpc("job.cancel", 2, b"42", RPC_TIMEOUT));
        assert_eq!(e, errno::EPERM, "{msg}");
        assert!(
            msg.contains("job.cancel requires role 'operator' in namespace 'job'"),
            "{msg}"
        );
        let mut b = remote_client(&inst, &bob_key);
        let (e, msg) = errnum(b.rpc("backup.start", 2, b"nightly", RPC_TIMEOUT));
        assert_eq!(e, errno::EPERM, "{msg}");
        let (e, _) = errnum(b.rpc("backup.status", 2, b"", RPC_TIMEOUT));
        assert_eq!(e, 0);
        // Refused requests never reached a provider; the one delivered
        // carried alice's principal and her roles for that topic.
        let seen = backup.seen();
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert_eq!(
            seen[0],
            ("backup.start".into(), alice.clone(), "operator,user".into())
        );
        assert!(job.seen().is_empty());
        // whoami shows the scoped grant.
        let w = a
            .rpc("broker.whoami", NODEID_ANY, b"", RPC_TIMEOUT)
            .unwrap();
        let w: serde_json::Value = serde_json::from_slice(&w.payload).unwrap();
        assert_eq!(w["scoped"][0]["topics"], "backup.*", "{w}");

        // Registering without the grant: EPERM. With it: a remote client
        // offers a service that a local caller uses.
        let (e, msg) = errnum(b.rpc(
            "service.add",
            NODEID_ANY,
            br#"{"namespace":"remote1","methods":{"x":"user"}}"#,
            RPC_TIMEOUT,
        ));
        assert_eq!(e, errno::EPERM, "{msg}");
        assert!(
            msg.contains("may not register namespace \"remote1\""),
            "{msg}"
        );
        let _remote_provider = Provider::start(
            remote_client(&inst, &svc_key),
            r#"{"namespace":"remote1","methods":{"x":"user"}}"#,
        );
        let out = rpc_cli(&inst, &["-r", "0", "remote1.x", "hi"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout).trim(), "remote1.x-of-hi");
        // A duplicate registration of the same namespace on the same rank.
        // (service.add is sent on the provider's own broker.)
        let out = run_canopy(
            &[
                "rpc",
                "service.add",
                r#"{"namespace":"job","methods":{"x":"user"}}"#,
            ],
            &[("CANOPY_URI", &inst.local_uri(2))],
            Duration::from_secs(20),
        );
        assert!(!out.status.success());
        assert!(
            text(&out.stderr).contains("namespace \"job\" is already offered on rank 2"),
            "{}",
            text(&out.stderr)
        );
        drop(job);
    });
}

/// `canopy-t-peer hold-service`: a provider that never answers.
struct Holder {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Holder {
    fn spawn(path: &Path, ns: &str) -> Holder {
        let mut child = Command::new(env!("CARGO_BIN_EXE_canopy-t-peer"))
            .args(["hold-service", path.to_str().unwrap(), ns])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let l2 = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                l2.lock().unwrap().push(line);
            }
        });
        Holder { child, lines }
    }

    fn count(&self, prefix: &str) -> usize {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.starts_with(prefix))
            .count()
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_provider_killed_mid_request_fails_every_caller_within_a_second() {
    run_test(LIMIT, || {
        let inst = Instance::start(4, 2, &[]);
        let mut holder = Holder::spawn(&inst.local_path(3), "hang");
        assert!(
            wait_until(Duration::from_secs(10), || holder.count("registered") == 1),
            "the holder registered"
        );
        const CALLERS: usize = 8;
        let answers = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        for _ in 0..CALLERS {
            let mut c = inst.client(0);
            let answers = answers.clone();
            threads.push(std::thread::spawn(move || {
                let r = c.rpc("hang.get", 3, b"x", Duration::from_secs(30));
                answers.lock().unwrap().push((Instant::now(), errnum(r)));
            }));
        }
        assert!(
            wait_until(Duration::from_secs(10), || holder.count("request hang.get")
                == CALLERS),
            "every request reached the provider"
        );
        assert!(answers.lock().unwrap().is_empty(), "nobody answered yet");
        let killed = Instant::now();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(holder.child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let _ = holder.child.wait();
        for t in threads {
            t.join().unwrap();
        }
        let answers = answers.lock().unwrap();
        assert_eq!(answers.len(), CALLERS);
        for (at, (e, msg)) in answers.iter() {
            assert_eq!(*e, errno::ENOSYS, "{msg}");
            assert!(msg.contains("service hang on rank 3 went away"), "{msg}");
            let after = at.saturating_duration_since(killed);
            assert!(
                after < Duration::from_secs(1),
                "answered {after:?} after the kill"
            );
        }
        // The namespace is free again, and rank 3 still serves.
        let mut c = inst.client(0);
        let (e, _) = errnum(c.rpc("hang.get", 3, b"x", RPC_TIMEOUT));
        assert_eq!(e, errno::ENOSYS);
        Instance::ping(&mut c, 3, b"ok").unwrap();
    });
}

#[test]
fn acl_check_shows_roles_per_namespace() {
    run_test(LIMIT, || {
        let dir = tempfile::tempdir().unwrap();
        let policy = dir.path().join("policy.toml");
        write_policy(
            &policy,
            "[[rule]]\nname = \"users\"\nprincipal = \"*@HPC.EXAMPLE\"\nroles = [\"user\"]\n\n\
             [[rule]]\nname = \"alice-backup\"\nprincipal = \"alice@HPC.EXAMPLE\"\nroles = [\"operator\"]\ntopics = [\"backup.*\"]\n\n\
             [[rule]]\nname = \"alice-registers\"\nprincipal = \"alice@HPC.EXAMPLE\"\nregister = [\"backup\"]\n",
        );
        let p = policy.to_str().unwrap();
        let out = run_canopy(
            &["acl", "check", "--policy", p, "alice@HPC.EXAMPLE"],
            &[],
            Duration::from_secs(10),
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        let o = text(&out.stdout);
        assert!(o.contains("roles per namespace:"), "{o}");
        assert!(o.contains("(everywhere)     user"), "{o}");
        assert!(o.contains("backup.*         operator"), "{o}");
        assert!(o.contains("may register: backup"), "{o}");
        let out = run_canopy(
            &["acl", "check", "--policy", p, "bob@HPC.EXAMPLE"],
            &[],
            Duration::from_secs(10),
        );
        assert!(
            !text(&out.stdout).contains("roles per namespace"),
            "{}",
            text(&out.stdout)
        );
    });
}
