//! `AclPolicy` behind the ZAP handler's `Policy` trait: decisions, lenient
//! addresses, atomic reload, and the audit trail.

use std::sync::Arc;

use canopy_acl::{verify, Acl, AclPolicy, AuditLog, Mech, NoDelegates};
use canopy_proto::Roles;
use canopy_zap::{AuthRequest, Decision, Mechanism, Policy};

const KEY: &str = "curve:rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7";

fn policy_v1() -> String {
    format!(
        r#"
[[rule]]
name = "brokers"
principal = "canopy/*@HPC.EXAMPLE"
network = ["10.0.0.0/8"]
roles = ["peer"]

[[rule]]
name = "laptop"
principal = "{KEY}"
roles = ["admin"]
"#
    )
}

fn ask<'a>(mechanism: Mechanism, principal: &'a str, address: &'a str) -> AuthRequest<'a> {
    AuthRequest {
        mechanism,
        principal,
        address,
        domain: "canopy-client",
    }
}

#[test]
fn zap_decisions() {
    let p =
        AclPolicy::new(Acl::parse(&policy_v1(), "v1.toml").unwrap()).with_delegator(NoDelegates);

    // The user id is the principal exactly as authenticated (nothing folded).
    match p.decide(&ask(
        Mechanism::Gssapi,
        "canopy/Node7.HPC.example@HPC.EXAMPLE",
        "10.1.2.3",
    )) {
        Decision::Allow {
            user_id,
            roles,
            reason,
        } => {
            assert_eq!(user_id, "canopy/Node7.HPC.example@HPC.EXAMPLE");
            assert_eq!(roles, Roles::PEER);
            assert!(reason.contains("\"brokers\" (v1.toml:2)"), "{reason}");
        }
        d => panic!("{d:?}"),
    }
    // An empty (ipc) or unparseable address is unknown: network rules do not match.
    for addr in ["", "garbage", "10.1.2.3:99"] {
        assert!(
            matches!(
                p.decide(&ask(Mechanism::Gssapi, "canopy/n@HPC.EXAMPLE", addr)),
                Decision::Deny { .. }
            ),
            "{addr:?}"
        );
    }
    assert!(matches!(
        p.decide(&ask(
            Mechanism::Gssapi,
            "canopy/n@HPC.EXAMPLE",
            "[::ffff:10.0.0.1]"
        )),
        Decision::Allow { .. }
    ));
    assert!(matches!(
        p.decide(&ask(Mechanism::Curve, KEY, "")),
        Decision::Allow {
            roles: Roles::ADMIN,
            ..
        }
    ));
    // NULL and PLAIN are refused whatever the policy.
    for m in [Mechanism::Null, Mechanism::Plain] {
        match p.decide(&ask(m, "", "10.0.0.1")) {
            Decision::Deny { reason } => assert!(reason.contains("is not accepted"), "{reason}"),
            d => panic!("{d:?}"),
        }
    }
    // A CURVE key presented as a GSSAPI name is refused.
    assert!(matches!(
        p.decide(&ask(Mechanism::Gssapi, KEY, "")),
        Decision::Deny { .. }
    ));

    // The same through `check`, as the local connector would call it.
    let v = p.check("unix:alice", Mech::Local, "");
    assert!(!v.allow);
}

#[test]
fn reload_swaps_atomically_and_a_bad_policy_never_replaces_the_old() {
    let p =
        AclPolicy::new(Acl::parse(&policy_v1(), "v1.toml").unwrap()).with_delegator(NoDelegates);
    let held: Arc<Acl> = p.current();
    assert_eq!(p.generation(), 0);

    // The caller parses first; a bad file never reaches reload.
    let bad = Acl::parse(
        "[[rule]]\nname = \"x\"\nprincipal = \"*\"\nroles = [\"wizard\"]\n",
        "v2.toml",
    );
    assert!(bad.is_err());
    assert_eq!(p.current().origin(), "v1.toml");
    assert!(matches!(
        p.decide(&ask(Mechanism::Curve, KEY, "")),
        Decision::Allow { .. }
    ));

    let v2 = format!("[[rule]]\nname = \"revoked\"\nprincipal = \"{KEY}\"\ndeny = true\n");
    p.reload(Acl::parse(&v2, "v2.toml").unwrap());
    assert_eq!(p.generation(), 1);
    assert_eq!(p.current().origin(), "v2.toml");
    match p.decide(&ask(Mechanism::Curve, KEY, "")) {
        Decision::Deny { reason } => {
            assert!(reason.contains("\"revoked\" (v2.toml:1)"), "{reason}")
        }
        d => panic!("{d:?}"),
    }
    // Whoever held the old policy still has a whole, unchanged one.
    assert_eq!(held.origin(), "v1.toml");
    assert_eq!(held.rules().len(), 2);
}

#[test]
fn decisions_and_reloads_are_audited() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let p = AclPolicy::with_audit(
        Acl::parse(&policy_v1(), "v1.toml").unwrap(),
        AuditLog::open(&path).unwrap(),
    )
    .unwrap()
    .with_delegator(NoDelegates);
    p.decide(&ask(Mechanism::Curve, KEY, "10.0.0.9"));
    p.decide(&ask(Mechanism::Gssapi, "eve@ELSEWHERE", "10.0.0.9"));
    p.decide(&ask(Mechanism::Null, "", "10.0.0.9"));
    p.reload(Acl::parse(&policy_v1(), "v1b.toml").unwrap());
    p.record_role_refusal(
        KEY,
        Some(Mech::Curve),
        Some("10.0.0.9"),
        Roles::ADMIN,
        "needs owner",
    )
    .unwrap();
    assert_eq!(verify(&path), Ok(6));
    let events: Vec<String> = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["event"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(
        events,
        ["reload", "admit", "deny", "deny", "reload", "role-refusal"]
    );
    assert_eq!(p.last_audit_error(), None);
}

#[test]
fn an_unwritable_audit_log_is_refused_at_start() {
    // Writes to /dev/full fail with ENOSPC. (That an admit becomes a deny
    // when the log fails later is a unit test in src/zap.rs.)
    if !std::path::Path::new("/dev/full").exists() {
        return;
    }
    let acl = Acl::parse(&policy_v1(), "v1.toml").unwrap();
    let e = AclPolicy::with_audit(acl, AuditLog::open("/dev/full").unwrap()).unwrap_err();
    assert!(e.to_string().contains("check free space"), "{e}");
}
