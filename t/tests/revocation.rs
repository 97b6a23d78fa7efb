//! Access decided again, end to end, as an attacker or a new user would
//! try it: revocation by `acl reload` while connected (talking and silent
//! clients, local and remote), a policy-granted owner, a uid with no name,
//! and delegate programs that hang or answer late.
#![forbid(unsafe_code)]

use canopy_client::{Client, ClientError, TcpKeys};
use canopy_t::users::{open_to_other_users, other_user, OTHER_USER};
use canopy_t::{run_canopy, run_test, text, wait_until, Instance, RPC_TIMEOUT};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(90);

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn skip_unless_root(name: &str) -> bool {
    if !is_root() {
        eprintln!("SKIPPED {name}: needs root to run clients as another uid");
        return true;
    }
    false
}

/// A peer process (t/src/bin/canopy-t-peer.rs) run as another uid, its
/// output collected line by line; killed when dropped.
struct Peer {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Peer {
    /// `as_user`: `runuser -u USER` or `setpriv --reuid UID`.
    fn spawn(as_user: &[&str], peer: &Path, args: &[&str]) -> Peer {
        let mut child = Command::new(as_user[0])
            .args(&as_user[1..])
            .arg(peer)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().unwrap();
        let l2 = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                l2.lock().unwrap().push(line);
            }
        });
        Peer { child, lines }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    fn has(&self, needle: &str) -> bool {
        self.lines().iter().any(|l| l.contains(needle))
    }

    fn wait_for(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.has(needle))
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Peer {
    /// The peer as OTHER_USER on the local socket `local`.
    fn as_other(peer: &Path, local: &Path, mode: &str, ms: &str, pattern: &str) -> Peer {
        let local = local.to_str().unwrap();
        Peer::spawn(
            &["runuser", "-u", OTHER_USER, "--"],
            peer,
            &[mode, local, ms, pattern],
        )
    }
}

fn write_policy(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
}

fn rule(name: &str, principal: &str, roles: &str) -> String {
    format!("[[rule]]\nname = \"{name}\"\nprincipal = \"{principal}\"\nroles = [{roles}]\n\n")
}

fn remote_key(dir: &Path) -> (PathBuf, String) {
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

fn acl_reload(inst: &Instance) {
    let out = run_canopy(
        &["acl", "reload"],
        &[("CANOPY_URI", inst.uri())],
        Duration::from_secs(10),
    );
    assert!(out.status.success(), "acl reload: {}", text(&out.stderr));
}

fn publish(inst: &Instance, topic: &str, data: &[u8]) {
    inst.client(0).publish(topic, data, RPC_TIMEOUT).unwrap();
}

#[test]
fn revoked_clients_get_one_eperm_then_nothing_not_even_events() {
    run_test(LIMIT, || {
        if skip_unless_root("revoked_clients_get_one_eperm_then_nothing_not_even_events") {
            return;
        }
        other_user();
        let dir = tempfile::tempdir().unwrap();
        let (key, remote_principal) = remote_key(dir.path());
        let policy = dir.path().join("policy.toml");
        let keep = rule("somebody", "unix:root", "\"user\"");
        write_policy(
            &policy,
            &format!(
                "{keep}{}{}",
                rule("other", &format!("unix:{OTHER_USER}"), "\"user\""),
                rule("remote", &remote_principal, "\"user\"")
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
        let (_, peer) = open_to_other_users(&inst);
        let local0 = inst.local_path(0);
        let talker = Peer::as_other(&peer, &local0, "talk-local", "60000", "rev.*");
        let silent = Peer::as_other(&peer, &local0, "sub-local", "60000", "rev.*");
        let mut rc = remote(&inst, &key);
        rc.subscribe("rev.*", RPC_TIMEOUT).unwrap();
        Instance::ping(&mut rc, 3, b"before").unwrap();
        assert!(
            talker.wait_for("payload=talk", Duration::from_secs(10)),
            "the talker is served: {:?}",
            talker.lines()
        );
        // Both local peers are subscribed once an event reaches them.
        let published = wait_until(Duration::from_secs(10), || {
            publish(&inst, "rev.a", b"first");
            talker.has("topic=rev.a") && silent.has("topic=rev.a")
        });
        assert!(
            published,
            "events reach the subscribers: {:?} {:?}",
            talker.lines(),
            silent.lines()
        );
        rc.next_event(RPC_TIMEOUT).unwrap();

        write_policy(&policy, &keep);
        acl_reload(&inst);

        for (name, p) in [("talker", &talker), ("silent subscriber", &silent)] {
            assert!(
                p.wait_for("closed", Duration::from_secs(5)),
                "the {name} was not cut at the reload: {:?}",
                p.lines()
            );
            let lines = p.lines();
            let eperm: Vec<&String> = lines
                .iter()
                .filter(|l| l.contains("payload=permission denied: access revoked"))
                .collect();
            assert_eq!(eperm.len(), 1, "one EPERM for the {name}: {lines:?}");
            assert!(eperm[0].contains("errnum=1 "), "{}", eperm[0]);
            let at = lines.iter().position(|l| l == eperm[0]).unwrap();
            assert_eq!(
                &lines[at + 1..],
                ["closed"],
                "nothing after the EPERM for the {name}"
            );
        }
        // The remote client: one refusal, then nothing: no events, no replies.
        let err = loop {
            match rc.next_event(Duration::from_secs(5)) {
                Ok(_) => continue, // events published before the reload
                Err(e) => break e,
            }
        };
        assert!(
            matches!(&err, ClientError::Refused(m) if m.contains("access revoked")),
            "{err}"
        );
        publish(&inst, "rev.b", b"after");
        let after = rc.next_event(Duration::from_secs(2));
        assert!(
            matches!(after, Err(ClientError::Timeout(_))),
            "a revoked remote client got {after:?}"
        );
        let tag = rc.send("broker.ping", 0, b"after").unwrap();
        let r = rc.wait(tag, Duration::from_secs(2));
        assert!(
            matches!(r, Err(ClientError::Timeout(_))),
            "a revoked remote client got a reply: {r:?}"
        );
        for p in [&talker, &silent] {
            assert!(!p.has("rev.b"), "{:?}", p.lines());
        }
        assert!(inst
            .wait_log_line(
                &["verdict=deny", &remote_principal, "access revoked"],
                Duration::from_secs(5)
            )
            .is_some());
        assert!(inst
            .wait_log_line(
                &[
                    "verdict=deny",
                    &format!("unix:{OTHER_USER}"),
                    "access revoked"
                ],
                Duration::from_secs(5)
            )
            .is_some());
        // Everyone else is still served.
        inst.assert_all_ranks_answer();
    });
}

#[test]
fn a_policy_granted_owner_loses_access_when_its_rule_is_removed() {
    run_test(LIMIT, || {
        if skip_unless_root("a_policy_granted_owner_loses_access_when_its_rule_is_removed") {
            return;
        }
        other_user();
        let dir = tempfile::tempdir().unwrap();
        let policy = dir.path().join("policy.toml");
        let keep = rule("root", "unix:root", "\"user\"");
        write_policy(
            &policy,
            &format!(
                "{keep}{}",
                rule("co-owner", &format!("unix:{OTHER_USER}"), "\"owner\"")
            ),
        );
        let inst = Instance::start(2, 2, &["--policy", policy.to_str().unwrap()]);
        let (_, peer) = open_to_other_users(&inst);
        let local0 = inst.local_path(0);
        let p = Peer::as_other(&peer, &local0, "talk-local", "60000", "*");
        assert!(
            p.wait_for("payload=talk", Duration::from_secs(10)),
            "{:?}",
            p.lines()
        );
        write_policy(&policy, &keep);
        acl_reload(&inst);
        assert!(
            p.wait_for("closed", Duration::from_secs(5)),
            "a policy-granted owner kept its access: {:?}",
            p.lines()
        );
        assert!(p.has("access revoked"), "{:?}", p.lines());
        // The instance owner, known by uid, is not affected.
        inst.assert_all_ranks_answer();
    });
}

/// A uid with no passwd entry.
fn nameless_uid() -> u32 {
    (54_321..60_000)
        .find(|u| {
            nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(*u))
                .ok()
                .flatten()
                .is_none()
        })
        .unwrap()
}

#[test]
fn a_uid_without_a_name_matches_no_wildcard_and_escapes_no_deny() {
    run_test(LIMIT, || {
        if skip_unless_root("a_uid_without_a_name_matches_no_wildcard_and_escapes_no_deny") {
            return;
        }
        let uid = nameless_uid();
        let dir = tempfile::tempdir().unwrap();
        let policy = dir.path().join("policy.toml");
        let everyone = format!(
            "{}[[rule]]\nname = \"no-nobody\"\nprincipal = \"unix:nobody\"\ndeny = true\n\n{}",
            rule("any-local", "unix:*", "\"user\""),
            rule("anyone", "*", "\"user\"")
        );
        write_policy(&policy, &everyone);
        let inst = Instance::start(1, 2, &["--policy", policy.to_str().unwrap()]);
        let (_, peer) = open_to_other_users(&inst);
        let local0 = inst.local_path(0);
        let setpriv = [
            "setpriv".to_string(),
            format!("--reuid={uid}"),
            format!("--regid={uid}"),
            "--clear-groups".into(),
            "--".into(),
        ];
        let setpriv: Vec<&str> = setpriv.iter().map(String::as_str).collect();
        let p = Peer::spawn(
            &setpriv,
            &peer,
            &["talk-local", local0.to_str().unwrap(), "10000", "*"],
        );
        assert!(
            p.wait_for("closed", Duration::from_secs(5)),
            "{:?}",
            p.lines()
        );
        assert!(
            p.has(&format!("payload=permission denied: unix:#{uid}")),
            "{:?}",
            p.lines()
        );
        assert!(
            !p.has("payload=talk"),
            "a nameless uid was served by a wildcard: {:?}",
            p.lines()
        );
        assert!(inst
            .wait_log_line(
                &["verdict=deny", &format!("unix:#{uid}")],
                Duration::from_secs(5)
            )
            .is_some());
        // A rule naming the uid itself admits it.
        write_policy(
            &policy,
            &format!(
                "{everyone}{}",
                rule("that-uid", &format!("unix:#{uid}"), "\"user\"")
            ),
        );
        acl_reload(&inst);
        let p = Peer::spawn(
            &setpriv,
            &peer,
            &["talk-local", local0.to_str().unwrap(), "10000", "*"],
        );
        assert!(
            p.wait_for("payload=talk", Duration::from_secs(5)),
            "{:?}",
            p.lines()
        );
    });
}

fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

#[test]
fn a_hanging_delegate_delays_only_the_client_it_decides() {
    run_test(LIMIT, || {
        if skip_unless_root("a_hanging_delegate_delays_only_the_client_it_decides") {
            return;
        }
        other_user();
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let hang = script(dir.path(), "hang.sh", "sleep 9");
        let policy = dir.path().join("policy.toml");
        write_policy(
            &policy,
            &format!(
                "[[rule]]\nname = \"slow-ldap\"\nprincipal = \"unix:{OTHER_USER}\"\ndelegate = {{ program = \"{}\", timeout_ms = 8000, roles = [\"user\"] }}\n",
                hang.display()
            ),
        );
        let inst = Instance::start(
            4,
            2,
            &[
                "--policy",
                policy.to_str().unwrap(),
                "--lost",
                "3",
                "--torpid",
                "2",
                "--heartbeat",
                "0.5",
            ],
        );
        let (_, peer) = open_to_other_users(&inst);
        let local0 = inst.local_path(0);
        // Several connections, each waiting on its own hung delegate.
        let waiting: Vec<Peer> = (0..6)
            .map(|_| Peer::as_other(&peer, &local0, "talk-local", "20000", "*"))
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        let mut c = inst.client(0);
        let mut lat = Vec::new();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(5) {
            for rank in 0..4 {
                let t = Instant::now();
                Instance::ping(&mut c, rank, b"").unwrap();
                lat.push(t.elapsed());
            }
        }
        lat.sort();
        let p99 = lat[lat.len() * 99 / 100];
        println!(
            "owner ping while 6 delegates hang: {} pings, p50 {:?}, p99 {:?}",
            lat.len(),
            lat[lat.len() / 2],
            p99
        );
        assert!(
            p99 < Duration::from_millis(50),
            "owner ping p99 {p99:?} while delegates hang"
        );
        for p in &waiting {
            assert!(
                !p.has("payload=talk"),
                "a client waiting on its delegate was served"
            );
        }
        let st = inst.status(0);
        assert!(
            !st.to_string().contains("lost"),
            "a neighbour was declared lost: {st}"
        );
        assert!(
            !inst.stderr_text().contains("overlay: lost rank"),
            "{}",
            inst.stderr_text()
        );
    });
}

#[test]
fn a_delegate_answer_after_its_timeout_is_a_deny() {
    run_test(LIMIT, || {
        if skip_unless_root("a_delegate_answer_after_its_timeout_is_a_deny") {
            return;
        }
        other_user();
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        // It allows, exits at once, but its output stays open (held by a
        // process outside its group) until after the timeout.
        let late = script(
            dir.path(),
            "late.sh",
            "setsid sleep 0.45 &\nsleep 0.1\necho '{\"allow\": true}'\nexit 0",
        );
        let on_time = script(dir.path(), "ok.sh", "echo '{\"allow\": true}'");
        let policy = dir.path().join("policy.toml");
        let with = |program: &Path| {
            format!(
                "[[rule]]\nname = \"late\"\nprincipal = \"unix:{OTHER_USER}\"\ndelegate = {{ program = \"{}\", timeout_ms = 400, roles = [\"user\"] }}\n",
                program.display()
            )
        };
        write_policy(&policy, &with(&late));
        let inst = Instance::start(1, 2, &["--policy", policy.to_str().unwrap()]);
        let (_, peer) = open_to_other_users(&inst);
        let local0 = inst.local_path(0);
        let p = Peer::as_other(&peer, &local0, "talk-local", "10000", "*");
        assert!(
            p.wait_for("closed", Duration::from_secs(5)),
            "{:?}",
            p.lines()
        );
        assert!(
            !p.has("payload=talk"),
            "a late answer was honoured: {:?}",
            p.lines()
        );
        assert!(p.has("errnum=1 "), "{:?}", p.lines());
        assert!(
            inst.wait_log_line(
                &["verdict=deny", "after its timeout"],
                Duration::from_secs(5)
            )
            .is_some(),
            "{}",
            inst.stderr_text()
        );
        // The same rule with a prompt delegate admits.
        write_policy(&policy, &with(&on_time));
        acl_reload(&inst);
        let p = Peer::as_other(&peer, &local0, "talk-local", "10000", "*");
        assert!(
            p.wait_for("payload=talk", Duration::from_secs(5)),
            "{:?}",
            p.lines()
        );
    });
}
