//! Delegate rules: the evaluator with closures (no processes), then the
//! real process runner with small shell scripts.

use std::cell::{Cell, RefCell};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use canopy_acl::{
    parse_address, run_delegate, Acl, Action, DelegateReply, DelegateRequest, DelegateSpec, Mech,
    Query,
};
use canopy_proto::Roles;

const POLICY: &str = r#"
[[rule]]
name = "realm"
principal = "*@R"
roles = ["user"]

[[rule]]
name = "ldap-ops"
principal = "*@R"
delegate = { program = "/nonexistent/ldap-check", timeout_ms = 300, roles = ["operator", "user"] }

[[rule]]
name = "svc-check"
principal = "svc/*@R"
delegate = { program = "/nonexistent/svc-check", roles = ["peer"] }

[[rule]]
name = "banned"
principal = "mallory@R"
deny = true
"#;

fn q(principal: &str) -> Query<'_> {
    Query {
        principal,
        mechanism: Mech::Gssapi,
        address: parse_address("10.0.0.7"),
        now: SystemTime::now(),
    }
}

fn acl() -> Acl {
    Acl::parse(POLICY, "delegates.toml").unwrap()
}

#[test]
fn a_yes_adds_the_rules_roles_and_the_request_is_complete() {
    let seen = RefCell::new(Vec::new());
    let yes = |spec: &DelegateSpec, req: &DelegateRequest<'_>| {
        seen.borrow_mut()
            .push((spec.program.clone(), req.to_json()));
        Ok(DelegateReply {
            allow: true,
            roles: None,
            reason: None,
        })
    };
    // The principal reaches the delegate exactly as authenticated.
    let v = acl().decide_with(&q("svc/host.example@R"), &yes);
    assert!(v.allow);
    assert_eq!(v.roles, Roles::PEER);
    assert_eq!(v.rule.as_ref().unwrap().name, "svc-check");
    assert_eq!(v.principal, "svc/host.example@R");
    let seen = seen.into_inner();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].0, Path::new("/nonexistent/svc-check"));
    assert_eq!(
        seen[0].1,
        r#"{"principal":"svc/host.example@R","mechanism":"gssapi","address":"10.0.0.7","rule":"svc-check"}"#
    );
}

#[test]
fn delegate_roles_are_united_with_static_ones_and_capped() {
    let answer = Cell::new(Some(Roles::OPERATOR));
    let d = |_: &DelegateSpec, _: &DelegateRequest<'_>| {
        Ok(DelegateReply {
            allow: true,
            roles: answer.get(),
            reason: None,
        })
    };
    let v = acl().decide_with(&q("alice@R"), &d);
    assert_eq!(v.roles, Roles::OPERATOR.union(Roles::USER));
    let names: Vec<_> = v.matched.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["realm", "ldap-ops"]);
    assert_eq!(v.rule.as_ref().unwrap().name, "realm");

    // Asking for more than the rule's roles is refused outright.
    answer.set(Some(Roles::ADMIN));
    let v = acl().decide_with(&q("alice@R"), &d);
    assert_eq!(v.roles, Roles::USER, "only the static rule grants");
    assert!(
        v.reason.contains("allowed by rule \"realm\""),
        "{}",
        v.reason
    );

    answer.set(Some(Roles::ADMIN));
    let v = acl().decide_with(&q("svc/h@R"), &d);
    assert!(!v.allow);
    assert!(
        v.reason.contains("delegate rule \"svc-check\" (delegates.toml:12) answered roles admin, beyond its limit peer; refused"),
        "{}",
        v.reason
    );
}

#[test]
fn failures_and_no_grant_nothing_and_do_not_veto() {
    let fail = |_: &DelegateSpec, _: &DelegateRequest<'_>| Err("timed out".to_owned());
    let v = acl().decide_with(&q("svc/h@R"), &fail);
    assert!(!v.allow);
    assert_eq!(v.rule, None);
    assert!(
        v.reason.contains(
            "default deny; delegate rule \"svc-check\" (delegates.toml:12) failed: timed out"
        ),
        "{}",
        v.reason
    );

    let no = |_: &DelegateSpec, _: &DelegateRequest<'_>| {
        Ok(DelegateReply {
            allow: false,
            roles: Some(Roles::PEER),
            reason: Some("not in\ngroup".into()),
        })
    };
    let v = acl().decide_with(&q("svc/h@R"), &no);
    assert!(!v.allow);
    assert!(
        v.reason.contains("said no: \"not in\\ngroup\""),
        "{}",
        v.reason
    );

    // A "no" from a delegate does not take away what a static rule grants.
    let v = acl().decide_with(&q("alice@R"), &no);
    assert!(v.allow);
    assert_eq!(v.roles, Roles::USER);
}

#[test]
fn delegates_are_not_run_when_a_deny_matches_or_nothing_is_to_gain() {
    let calls = Cell::new(0);
    let count = |_: &DelegateSpec, _: &DelegateRequest<'_>| {
        calls.set(calls.get() + 1);
        Ok(DelegateReply {
            allow: true,
            roles: None,
            reason: None,
        })
    };
    let v = acl().decide_with(&q("mallory@R"), &count);
    assert!(!v.allow);
    assert_eq!(v.rule.as_ref().unwrap().name, "banned");
    assert_eq!(calls.get(), 0);

    // A rule granting user,operator statically makes ldap-ops pointless.
    let text = format!("{POLICY}\n[[rule]]\nname = \"static-ops\"\nprincipal = \"bob@R\"\nroles = [\"operator\"]\n");
    let acl = Acl::parse(&text, "x.toml").unwrap();
    let v = acl.decide_with(&q("bob@R"), &count);
    assert_eq!(v.roles, Roles::OPERATOR.union(Roles::USER));
    assert_eq!(calls.get(), 0);
    let v = acl.decide_with(&q("alice@R"), &count);
    assert_eq!(v.roles, Roles::OPERATOR.union(Roles::USER));
    assert_eq!(calls.get(), 1);
}

// ---- real processes -------------------------------------------------------

fn write_script(dir: &Path, name: &str, body: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn spec(program: &Path, args: &[&Path], timeout_ms: u64, roles: Roles) -> DelegateSpec {
    DelegateSpec {
        program: program.to_owned(),
        args: args.iter().map(|a| a.display().to_string()).collect(),
        timeout: Duration::from_millis(timeout_ms),
        roles,
    }
}

/// Gone, or a zombie waiting for a parent that does not reap (as PID 1 in
/// some containers): either way no longer running.
fn not_running(pid: &str) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
    }
}

fn wait_until(mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + Duration::from_secs(5);
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// All real-process cases run in one test: writing an executable while
/// another test thread forks could make exec fail with ETXTBSY.
#[test]
fn real_delegate_programs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let input = d.join("input.json");
    let allow = write_script(d, "allow.sh", "cat > \"$1\"\nexit 0");
    let json = write_script(
        d,
        "json.sh",
        "cat >/dev/null\necho '{\"allow\":true,\"roles\":[\"user\"],\"reason\":\"in ldap\"}'",
    );
    let deny = write_script(
        d,
        "deny.sh",
        "cat >/dev/null\necho 'account locked' >&2\nexit 3",
    );
    let say_no = write_script(d, "no.sh", "echo '{\"allow\":false,\"reason\":\"locked\"}'");
    let garbage = write_script(d, "garbage.sh", "echo maybe");
    let slow = write_script(
        d,
        "slow.sh",
        "echo $$ > \"$1\"\nsleep 30 &\necho $! > \"$1.child\"\nwait",
    );
    let leaves_child = write_script(d, "bg.sh", "sleep 30 &\necho $! > \"$1\"\nexit 0");
    let env = write_script(d, "env.sh", "env > \"$1\"");
    let chatty = write_script(d, "chatty.sh", "yes allow");

    let req = DelegateRequest {
        principal: "alice@R",
        mechanism: Mech::Gssapi,
        address: parse_address("fd00::1"),
        rule: "ldap",
    };
    let both = Roles::OPERATOR.union(Roles::USER);

    // Exit 0, no output: allow with the rule's roles; stdin got the request.
    let r = run_delegate(&spec(&allow, &[&input], 2000, both), &req).unwrap();
    assert_eq!(
        r,
        DelegateReply {
            allow: true,
            roles: None,
            reason: None
        }
    );
    let sent = std::fs::read_to_string(&input).unwrap();
    assert_eq!(
        sent,
        "{\"principal\":\"alice@R\",\"mechanism\":\"gssapi\",\"address\":\"fd00::1\",\"rule\":\"ldap\"}\n"
    );

    // JSON on stdout overrides.
    let r = run_delegate(&spec(&json, &[], 2000, both), &req).unwrap();
    assert_eq!(r.roles, Some(Roles::USER));
    assert_eq!(r.reason.as_deref(), Some("in ldap"));
    let r = run_delegate(&spec(&say_no, &[], 2000, both), &req).unwrap();
    assert!(!r.allow);

    // Non-zero exit: failure, with the status and stderr's first line.
    let e = run_delegate(&spec(&deny, &[], 2000, both), &req).unwrap_err();
    assert!(e.contains("exited with exit status: 3"), "{e}");
    assert!(e.contains("(stderr: \"account locked\")"), "{e}");

    let e = run_delegate(&spec(&garbage, &[], 2000, both), &req).unwrap_err();
    assert!(e.contains("bad output"), "{e}");

    let e = run_delegate(&spec(&chatty, &[], 2000, both), &req).unwrap_err();
    assert!(e.contains("wrote more than 65536 bytes"), "{e}");

    let e = run_delegate(&spec(&d.join("missing.sh"), &[], 2000, both), &req).unwrap_err();
    assert!(
        e.contains("cannot start") && e.contains("check the path"),
        "{e}"
    );

    // The environment is emptied but for PATH.
    let env_out = d.join("env.txt");
    run_delegate(&spec(&env, &[&env_out], 2000, both), &req).unwrap();
    let vars: Vec<String> = std::fs::read_to_string(&env_out)
        .unwrap()
        .lines()
        .map(|l| l.split('=').next().unwrap_or_default().to_owned())
        .filter(|k| !matches!(k.as_str(), "PWD" | "SHLVL" | "_" | "OLDPWD"))
        .collect();
    assert_eq!(vars, ["PATH"]);

    // Too slow: killed, with its children, and reported in time.
    let pidfile = d.join("slow.pid");
    let started = Instant::now();
    let e = run_delegate(&spec(&slow, &[&pidfile], 300, both), &req).unwrap_err();
    let took = started.elapsed();
    assert!(e.contains("did not answer within 300 ms; killed it"), "{e}");
    assert!(took >= Duration::from_millis(300), "{took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    let shell = std::fs::read_to_string(&pidfile).unwrap();
    let child = std::fs::read_to_string(d.join("slow.pid.child")).unwrap();
    assert!(not_running(shell.trim()), "the script survived");
    assert!(
        wait_until(|| not_running(child.trim())),
        "its sleep survived"
    );

    // A program that exits but leaves a child behind: the child is killed
    // and the answer is not held up by it.
    let bg_pid = d.join("bg.pid");
    let started = Instant::now();
    let r = run_delegate(&spec(&leaves_child, &[&bg_pid], 5000, both), &req).unwrap();
    assert!(r.allow);
    assert!(started.elapsed() < Duration::from_secs(3));
    let bg = std::fs::read_to_string(&bg_pid).unwrap();
    assert!(
        wait_until(|| not_running(bg.trim())),
        "background child survived"
    );

    // Through the evaluator: the slow delegate fails closed, the allowing
    // one grants.
    let policy = format!(
        "[[rule]]\nname = \"slow\"\nprincipal = \"*@R\"\ndelegate = {{ program = \"{}\", args = [\"{}\"], timeout_ms = 200, roles = [\"admin\"] }}\n\n\
         [[rule]]\nname = \"ok\"\nprincipal = \"alice@R\"\ndelegate = {{ program = \"{}\", roles = [\"operator\", \"user\"] }}\n",
        slow.display(),
        d.join("slow2.pid").display(),
        json.display()
    );
    let acl = Acl::parse(&policy, "procs.toml").unwrap();
    assert!(matches!(acl.rules()[0].action(), Action::Delegate(_)));
    let v = acl.decide(&q("alice@R"));
    assert!(v.allow, "{}", v.reason);
    assert_eq!(v.roles, Roles::USER);
    assert_eq!(v.rule.as_ref().unwrap().name, "ok");
    let v = acl.decide(&q("bob@R"));
    assert!(!v.allow);
    assert!(
        v.reason.contains("did not answer within 200 ms"),
        "{}",
        v.reason
    );
}

#[test]
fn an_answer_after_the_timeout_is_a_deny() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // It allows and exits at once, but its output stays open (held by a
    // process outside its group) past the timeout: output, exit and stderr
    // share the one timeout, so the answer is late.
    let late = write_script(
        d,
        "late.sh",
        "setsid sleep 0.45 &\nsleep 0.1\necho '{\"allow\": true}'\nexit 0",
    );
    let on_time = write_script(d, "ok.sh", "echo '{\"allow\": true}'");
    let req = DelegateRequest {
        principal: "alice@R",
        mechanism: Mech::Gssapi,
        address: None,
        rule: "late",
    };
    let started = std::time::Instant::now();
    let err = run_delegate(&spec(&late, &[], 300, Roles::USER), &req).unwrap_err();
    assert!(err.contains("after its timeout"), "{err}");
    assert!(
        started.elapsed() < Duration::from_millis(420),
        "waited past the timeout: {:?}",
        started.elapsed()
    );
    assert!(
        run_delegate(&spec(&on_time, &[], 300, Roles::USER), &req)
            .unwrap()
            .allow
    );
}
