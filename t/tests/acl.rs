//! Per-principal access control, end to end: remote CURVE clients with
//! their own keys against an instance whose policy grants them roles.
#![forbid(unsafe_code)]

use canopy_client::{Client, ClientError, TcpKeys};
use canopy_proto::errno;
use canopy_t::{run_canopy, run_test, text, wait_until, Instance, RPC_TIMEOUT};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(60);

/// A client identity: secret certificate path and principal.
struct Ident {
    key: PathBuf,
    principal: String,
}

fn ident(dir: &Path, name: &str) -> Ident {
    let kp = canopy_security::CurveKeypair::generate().unwrap();
    let key = dir.join(name);
    let mut public = key.clone().into_os_string();
    public.push(".pub");
    canopy_security::cert::write_pair(&kp, name, &key, Path::new(&public)).unwrap();
    Ident {
        key,
        principal: canopy_security::curve_principal(kp.public()),
    }
}

fn write_policy(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
}

fn rule(name: &str, principal: &str, roles: &str) -> String {
    format!("[[rule]]\nname = \"{name}\"\nprincipal = \"{principal}\"\nroles = [{roles}]\n\n")
}

/// Rank 0's remote client endpoint and public key.
fn endpoint(inst: &Instance) -> (String, String) {
    let s = inst.status(0);
    (
        s["broker"]["client_endpoint"]
            .as_str()
            .expect("rank 0 has a client endpoint")
            .to_string(),
        s["broker"]["public_key"].as_str().unwrap().to_string(),
    )
}

fn remote(inst: &Instance, who: &Ident) -> Client {
    let (ep, server) = endpoint(inst);
    let keys = TcpKeys::load(&who.key, &server).unwrap();
    Client::connect_tcp(&ep, &keys).unwrap()
}

const LISTEN: &[&str] = &["--listen-clients", "tcp://127.0.0.1:*"];

fn start_with(policy_args: &[&str]) -> Instance {
    let mut args: Vec<&str> = LISTEN.to_vec();
    args.extend_from_slice(policy_args);
    Instance::start(4, 2, &args)
}

#[test]
fn guest_can_ping_but_not_publish_or_disconnect_and_operator_can_publish() {
    run_test(LIMIT, || {
        let dir = tempfile::tempdir().unwrap();
        let guest = ident(dir.path(), "guest");
        let op = ident(dir.path(), "op");
        let allow_guest = format!("{}=user", guest.principal);
        let allow_op = format!("{}=operator", op.principal);
        let inst = start_with(&["--allow", &allow_guest, "--allow", &allow_op]);

        let mut g = remote(&inst, &guest);
        for rank in 0..4 {
            let m = Instance::ping(&mut g, rank, b"hi").unwrap();
            assert_eq!(m.payload, b"hi");
        }
        let err = g.publish("test.x", b"no", RPC_TIMEOUT).unwrap_err();
        assert_eq!(err.errnum(), Some(errno::EPERM), "{err}");
        assert!(
            err.to_string().contains("requires role 'operator'"),
            "{err}"
        );
        let err = g
            .rpc("overlay.disconnect", 0, b"1", RPC_TIMEOUT)
            .unwrap_err();
        assert_eq!(err.errnum(), Some(errno::EPERM), "{err}");
        assert!(err.to_string().contains("requires role 'admin'"), "{err}");

        let mut o = remote(&inst, &op);
        let seq = o.publish("test.x", b"yes", RPC_TIMEOUT).unwrap();
        assert_eq!(seq, 1);
        let err = o
            .rpc("overlay.disconnect", 0, b"1", RPC_TIMEOUT)
            .unwrap_err();
        assert_eq!(
            err.errnum(),
            Some(errno::EPERM),
            "operator is not admin: {err}"
        );
        // The whole tree is still there: nothing was disconnected.
        inst.assert_all_ranks_answer();
    });
}

#[test]
fn denied_and_unknown_principals_cannot_connect() {
    run_test(LIMIT, || {
        let dir = tempfile::tempdir().unwrap();
        let banned = ident(dir.path(), "banned");
        let stranger = ident(dir.path(), "stranger");
        let policy = dir.path().join("policy.toml");
        write_policy(
            &policy,
            &format!(
                "{}[[rule]]\nname = \"ban\"\nprincipal = \"{}\"\ndeny = true\n",
                rule("everyone", "curve:*", "\"user\""),
                banned.principal
            ),
        );
        let inst = start_with(&["--policy", policy.to_str().unwrap()]);
        for (who, why) in [(&banned, "ban"), (&stranger, "")] {
            let mut c = remote(&inst, who);
            let t0 = Instant::now();
            let res = Instance::ping(&mut c, 0, b"");
            if who.principal == banned.principal {
                let err = res.expect_err("a banned key must not get through");
                assert!(
                    matches!(err, ClientError::Refused(_)),
                    "expected a refusal, got {err}"
                );
                assert!(
                    t0.elapsed() < Duration::from_secs(3),
                    "refusal was not prompt"
                );
                let line = inst.wait_log_line(
                    &["verdict=deny", &banned.principal, why],
                    Duration::from_secs(5),
                );
                assert!(line.is_some(), "no deny log line:\n{}", inst.stderr_text());
            } else {
                // `curve:*` lets any other key in as a user.
                res.unwrap();
            }
        }
    });
}

#[test]
fn reload_revokes_and_a_broken_policy_keeps_the_old_one() {
    run_test(LIMIT, || {
        let dir = tempfile::tempdir().unwrap();
        let alice = ident(dir.path(), "alice");
        let bob = ident(dir.path(), "bob");
        let policy = dir.path().join("policy.toml");
        let audit = dir.path().join("audit.log");
        write_policy(
            &policy,
            &(rule("alice", &alice.principal, "\"user\"")
                + &rule("bob", &bob.principal, "\"user\"")),
        );
        let inst = start_with(&[
            "--policy",
            policy.to_str().unwrap(),
            "--audit",
            audit.to_str().unwrap(),
        ]);
        let mut a = remote(&inst, &alice);
        let mut b = remote(&inst, &bob);
        Instance::ping(&mut a, 1, b"").unwrap();
        Instance::ping(&mut b, 1, b"").unwrap();

        // A broken policy is refused, reported, and the old one stays.
        write_policy(
            &policy,
            "[[rule]]\nname = \"x\"\nprincipal = \"curve:*\"\nroles = [\"wizard\"]\n",
        );
        let out = run_canopy(&["acl", "reload", "--uri", inst.uri()], &[], RPC_TIMEOUT);
        assert!(!out.status.success(), "a broken policy was accepted");
        let said = text(&out.stdout) + &text(&out.stderr);
        assert!(said.contains("policy.toml:4"), "no file:line in: {said}");
        assert!(said.contains("wizard"), "{said}");
        Instance::ping(&mut a, 1, b"").unwrap();
        Instance::ping(&mut b, 1, b"").unwrap();

        // Revoke bob: his connection is refused from its next message on.
        write_policy(&policy, &rule("alice", &alice.principal, "\"user\""));
        let out = run_canopy(&["acl", "reload", "--uri", inst.uri()], &[], RPC_TIMEOUT);
        assert!(out.status.success(), "reload failed: {}", text(&out.stdout));
        let err = Instance::ping(&mut b, 1, b"").unwrap_err();
        assert!(
            err.to_string().contains("revoked"),
            "bob was not cut off: {err}"
        );
        Instance::ping(&mut a, 1, b"").unwrap();
        // A new connection from bob is refused at the handshake.
        let mut b2 = remote(&inst, &bob);
        assert!(Instance::ping(&mut b2, 0, b"").is_err());

        // The audit log recorded all of it, chained; an edit is detected.
        let out = run_canopy(
            &["audit", "verify", audit.to_str().unwrap()],
            &[],
            RPC_TIMEOUT,
        );
        assert!(out.status.success(), "{}", text(&out.stdout));
        let log = std::fs::read_to_string(&audit).unwrap();
        assert!(log.contains("\"event\":\"reload\""));
        assert!(log.contains("\"event\":\"admit\""));
        assert!(log.contains("\"event\":\"deny\""));
        let edited = log.replacen("\"roles\":[\"user\"]", "\"roles\":[\"owner\"]", 1);
        assert_ne!(edited, log);
        let forged = dir.path().join("forged.log");
        std::fs::write(&forged, edited).unwrap();
        let out = run_canopy(
            &["audit", "verify", forged.to_str().unwrap()],
            &[],
            RPC_TIMEOUT,
        );
        assert!(!out.status.success(), "an edited audit log verified");
        assert!(text(&out.stdout).contains("line"), "{}", text(&out.stdout));
    });
}

#[test]
fn delegate_program_is_honoured_and_fails_closed_on_timeout() {
    run_test(LIMIT, || {
        let dir = tempfile::tempdir().unwrap();
        let yes = ident(dir.path(), "yes");
        let slow = ident(dir.path(), "slow");
        let script = dir.path().join("site-check");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nread req\ncase \"$req\" in\n  *'{}'*) exit 0 ;;\n  *) sleep 5; exit 0 ;;\nesac\n",
                yes.principal.replace('\'', "")
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let policy = dir.path().join("policy.toml");
        write_policy(
            &policy,
            &format!(
                "[[rule]]\nname = \"site\"\nprincipal = \"curve:*\"\ndelegate = {{ program = \"{}\", timeout_ms = 300, roles = [\"user\"] }}\n",
                script.display()
            ),
        );
        let inst = start_with(&["--policy", policy.to_str().unwrap()]);
        let mut y = remote(&inst, &yes);
        Instance::ping(&mut y, 0, b"").unwrap();
        let mut s = remote(&inst, &slow);
        let t0 = Instant::now();
        let err = Instance::ping(&mut s, 0, b"").expect_err("a timed-out delegate must deny");
        assert!(matches!(err, ClientError::Refused(_)), "{err}");
        assert!(
            t0.elapsed() < Duration::from_secs(4),
            "took {:?}",
            t0.elapsed()
        );
        assert!(
            wait_until(Duration::from_secs(5), || inst
                .stderr_text()
                .contains("verdict=deny")),
            "{}",
            inst.stderr_text()
        );
    });
}

#[test]
fn acl_check_offline_and_online() {
    run_test(LIMIT, || {
        let dir = tempfile::tempdir().unwrap();
        let policy = dir.path().join("policy.toml");
        write_policy(
            &policy,
            "[[rule]]\nname = \"realm\"\nprincipal = \"*@TEST.REALM\"\nnetwork = [\"10.0.0.0/8\"]\nroles = [\"user\"]\n",
        );
        let p = policy.to_str().unwrap();
        let out = run_canopy(
            &[
                "acl",
                "check",
                "alice@TEST.REALM",
                "--address",
                "10.1.2.3",
                "--policy",
                p,
            ],
            &[],
            RPC_TIMEOUT,
        );
        let said = text(&out.stdout);
        assert!(out.status.success(), "{said}{}", text(&out.stderr));
        assert!(
            said.contains("allow") && said.contains("policy.toml:1 realm"),
            "{said}"
        );
        let out = run_canopy(
            &[
                "acl",
                "check",
                "alice@TEST.REALM",
                "--address",
                "192.0.2.1",
                "--policy",
                p,
            ],
            &[],
            RPC_TIMEOUT,
        );
        assert_eq!(out.status.code(), Some(2), "{}", text(&out.stdout));
        assert!(text(&out.stdout).contains("deny"));

        let inst = start_with(&["--policy", p]);
        let out = run_canopy(
            &[
                "acl",
                "check",
                "alice@TEST.REALM",
                "--address",
                "10.9.9.9",
                "--uri",
                inst.uri(),
            ],
            &[],
            RPC_TIMEOUT,
        );
        let said = text(&out.stdout);
        assert!(out.status.success(), "{said}{}", text(&out.stderr));
        assert!(said.contains("roles=user"), "{said}");
    });
}

#[test]
fn bad_policies_are_refused_at_start() {
    run_test(LIMIT, || {
        let dir = tempfile::tempdir().unwrap();
        let policy = dir.path().join("policy.toml");
        write_policy(&policy, "[[rule]]\nname = \"a\"\nprincipal = \"curve:*\"\nroles = [\"user\"]\nnetwork = [\"10.0.0.0/33\"]\n");
        let out = run_canopy(
            &["start", "--policy", policy.to_str().unwrap(), "--", "true"],
            &[],
            Duration::from_secs(20),
        );
        assert!(!out.status.success());
        let err = text(&out.stderr);
        assert!(err.contains("policy.toml:5"), "{err}");
        // Writable by others: refused.
        write_policy(&policy, &rule("a", "curve:*", "\"user\""));
        std::fs::set_permissions(&policy, std::fs::Permissions::from_mode(0o666)).unwrap();
        let out = run_canopy(
            &["start", "--policy", policy.to_str().unwrap(), "--", "true"],
            &[],
            Duration::from_secs(20),
        );
        assert!(!out.status.success());
        assert!(
            text(&out.stderr).contains("chmod go-w"),
            "{}",
            text(&out.stderr)
        );
        // --allow with an unknown role.
        let out = run_canopy(
            &["start", "--allow", "unix:bob=wizard", "--", "true"],
            &[],
            Duration::from_secs(20),
        );
        assert!(!out.status.success());
        assert!(
            text(&out.stderr).contains("wizard"),
            "{}",
            text(&out.stderr)
        );
    });
}

#[test]
fn a_remote_curve_subscriber_notices_a_hung_or_dead_rank_0_within_5_s() {
    run_test(LIMIT, || {
        let dir = tempfile::tempdir().unwrap();
        let user = ident(dir.path(), "user");
        let allow = format!("{}=user", user.principal);
        for sig in [
            nix::sys::signal::Signal::SIGSTOP,
            nix::sys::signal::Signal::SIGKILL,
        ] {
            let inst = start_with(&["--allow", &allow]);
            let mut sub = remote(&inst, &user);
            sub.subscribe("x.*", RPC_TIMEOUT).unwrap();
            let mut c = inst.client(0);
            let got = wait_until(Duration::from_secs(5), || {
                c.publish("x.y", b"hello", RPC_TIMEOUT).unwrap();
                sub.next_event(Duration::from_millis(200)).is_ok()
            });
            assert!(got, "the remote subscriber got no event");
            let rank0 = inst
                .broker_pids()
                .into_iter()
                .find(|(_, r)| *r == 0)
                .expect("rank 0")
                .0;
            let pid = nix::unistd::Pid::from_raw(rank0);
            nix::sys::signal::kill(pid, sig).unwrap();
            let t0 = Instant::now();
            // Drain what was already on its way, then the loss is reported.
            let err = loop {
                match sub.next_event(Duration::from_secs(30)) {
                    Ok(_) => continue,
                    Err(e) => break e,
                }
            };
            let took = t0.elapsed();
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
            assert!(matches!(err, ClientError::Lost(_)), "{sig}: {err}");
            assert!(
                took < Duration::from_secs(5),
                "{sig}: noticed after {took:?}"
            );
            // Every later call fails at once, without blocking.
            let t1 = Instant::now();
            assert!(matches!(
                sub.rpc("broker.ping", 0, b"", RPC_TIMEOUT),
                Err(ClientError::Lost(_))
            ));
            assert!(t1.elapsed() < Duration::from_millis(100));
            println!("{sig}: the remote subscriber noticed in {took:?}: {err}");
        }
    });
}
