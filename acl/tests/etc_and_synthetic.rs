//! Every policy shipped in etc/ parses, the example policy decides as its
//! comments say, and the synthetic benchmark policy is valid and behaves.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use canopy_acl::{
    parse_address, synthetic_policy, synthetic_principal, Acl, DelegateReply, DelegateRequest,
    DelegateSpec, Mech, NoDelegates, Query,
};
use canopy_proto::Roles;

fn etc() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../etc")
}

/// `*.toml` files under `dir` (recursively) that hold a `[[rule]]` table.
fn policies(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            policies(&p, out);
        } else if p.extension().is_some_and(|x| x == "toml") {
            let text = std::fs::read_to_string(&p).unwrap();
            if text.lines().any(|l| l.trim_start().starts_with("[[rule]]")) {
                out.push(p);
            }
        }
    }
}

#[test]
fn every_policy_in_etc_parses() {
    let mut found = Vec::new();
    policies(&etc(), &mut found);
    assert!(
        found.iter().any(|p| p.ends_with("etc/policy.toml")),
        "etc/policy.toml not found in {found:?}"
    );
    for p in &found {
        // parse, not load: a checkout's file modes depend on the umask.
        let text = std::fs::read_to_string(p).unwrap();
        let acl = Acl::parse(&text, &p.display().to_string()).unwrap_or_else(|e| panic!("{e}"));
        assert!(!acl.rules().is_empty(), "{}", p.display());
    }
}

#[test]
fn the_example_policy_decides_as_documented() {
    let text = std::fs::read_to_string(etc().join("policy.toml")).unwrap();
    let acl = Acl::parse(&text, "policy.toml").unwrap();
    let now = SystemTime::now();
    let ask = |principal: &str, mech: Mech, addr: &str| {
        let q = Query {
            principal,
            mechanism: mech,
            address: parse_address(addr),
            now,
        };
        acl.decide_with(&q, &NoDelegates)
    };
    let v = ask(
        "canopy/Node1.hpc.example@HPC.EXAMPLE",
        Mech::Gssapi,
        "10.2.3.4",
    );
    assert_eq!((v.allow, v.roles), (true, Roles::PEER));
    assert!(
        !ask(
            "canopy/node1.hpc.example@HPC.EXAMPLE",
            Mech::Gssapi,
            "172.16.0.1"
        )
        .allow
    );
    assert!(
        !ask(
            "canopy/node13.hpc.example@HPC.EXAMPLE",
            Mech::Gssapi,
            "10.0.0.13"
        )
        .allow
    );
    let v = ask("carol@HPC.EXAMPLE", Mech::Gssapi, "10.0.0.1");
    assert_eq!(v.roles, Roles::ADMIN.union(Roles::USER));
    let v = ask("carol@HPC.EXAMPLE", Mech::Gssapi, "192.168.100.7");
    assert_eq!(v.rule.unwrap().name, "guest-network");
    let v = ask(
        "curve:rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7",
        Mech::Curve,
        "10.0.0.1",
    );
    assert_eq!(v.roles, Roles::ADMIN);
    let v = ask(
        "curve:JTKVSB%%)wK0E.X)V>+}o?pNmC{O&4W4b!Ni{Lh6",
        Mech::Curve,
        "10.0.0.1",
    );
    assert_eq!(v.rule.unwrap().name, "retired-keys");
    let v = ask("unix:root", Mech::Local, "");
    assert_eq!(v.roles, Roles::OWNER.union(Roles::USER));

    // The delegate rule, answered yes without a process.
    let yes = |_: &DelegateSpec, req: &DelegateRequest<'_>| {
        assert_eq!(req.rule, "directory-operators");
        Ok(DelegateReply {
            allow: true,
            roles: None,
            reason: None,
        })
    };
    let q = Query {
        principal: "erin@HPC.EXAMPLE",
        mechanism: Mech::Gssapi,
        address: None,
        now,
    };
    let v = acl.decide_with(&q, &yes);
    assert_eq!(v.roles, Roles::OPERATOR.union(Roles::USER));
}

#[test]
fn synthetic_policy_is_valid_and_every_rule_is_reachable() {
    let n = 1000;
    let text = synthetic_policy(n);
    let acl = Acl::parse(&text, "synthetic.toml").unwrap();
    assert_eq!(acl.rules().len(), n);
    let now = SystemTime::now();
    for i in 0..n {
        let (principal, mechanism) = synthetic_principal(i);
        let address = if i % 10 == 5 {
            parse_address(&format!("10.{}.0.1", i % 256))
        } else {
            None
        };
        let q = Query {
            principal: &principal,
            mechanism,
            address,
            now,
        };
        let v = acl.decide_with(&q, &NoDelegates);
        let want = if i % 10 == 8 {
            "r8".to_owned()
        } else {
            format!("r{i}")
        };
        assert_eq!(
            v.rule.as_ref().map(|r| r.name.as_str()),
            Some(want.as_str()),
            "rule {i}: {}",
            v.reason
        );
        assert_eq!(v.allow, i % 10 != 0, "rule {i}: {}", v.reason);
    }
    // Smaller sizes are valid too.
    for n in [0, 1, 7, 10] {
        assert_eq!(
            Acl::parse(&synthetic_policy(n), "s").unwrap().rules().len(),
            n
        );
    }
}
