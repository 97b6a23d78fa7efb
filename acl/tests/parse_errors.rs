//! Every kind of bad policy is refused with `file:line:col` and a message
//! that says what is wrong and what to do.

use std::os::unix::fs::PermissionsExt;

use canopy_acl::{Acl, AclError};

const KEY: &str = "curve:rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7";

/// Parse `text` as `bad.toml`; expect a parse error at `line:col` whose
/// message contains `phrase`.
#[track_caller]
fn refused(text: &str, line: usize, col: usize, phrase: &str) -> String {
    match Acl::parse(text, "bad.toml") {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e @ AclError::Parse { .. }) => {
            let shown = e.to_string();
            let AclError::Parse {
                origin,
                line: l,
                col: c,
                message,
            } = e
            else {
                unreachable!()
            };
            assert_eq!(origin, "bad.toml");
            assert_eq!((l, c), (line, col), "position of: {message}\n{text}");
            assert!(message.contains(phrase), "{message:?} lacks {phrase:?}");
            assert!(
                shown.starts_with(&format!("bad.toml:{line}:{col}: ")),
                "{shown}"
            );
            // Lower-case first letter, and advice after a semicolon.
            assert!(
                message.starts_with(|c: char| !c.is_uppercase()),
                "{message}"
            );
            assert!(message.contains("; "), "no advice in {message:?}");
            message
        }
        Err(e) => panic!("wrong error kind: {e}"),
    }
}

#[test]
fn toml_syntax_error() {
    let m = refused(
        "# comment\n[[rule]]\nname = \"a\nroles = [\"user\"]\n",
        3,
        10,
        "string",
    );
    assert!(m.ends_with("fix the toml syntax"), "{m}");
    refused("[[rule]\nname = \"a\"\n", 1, 7, "fix the toml syntax");
    refused(
        "[[rule]]\nname = \"a\"\nname = \"b\"\n",
        3,
        1,
        "duplicate key",
    );
}

#[test]
fn unknown_keys() {
    let m = refused("bogus = 1\n", 1, 1, "unknown field `bogus`");
    assert!(m.ends_with("remove it or correct its spelling"), "{m}");
    refused(
        "[[rule]]\nname = \"a\"\nprincpal = \"*\"\nroles = [\"user\"]\n",
        3,
        1,
        "unknown field `princpal`",
    );
    refused(
        "[[rule]]\nname = \"a\"\nprincipal = \"*\"\ndelegate = { program = \"/x\", roles = [\"user\"], timout_ms = 5 }\n",
        4,
        48,
        "unknown field `timout_ms`",
    );
    refused(
        "[[rule]]\nname = \"a\"\nprincipal = \"*\"\nroles = [\"user\"]\n\n[rule.delegate]\nprogram = \"/x\"\nroles = [\"user\"]\nretries = 3\n",
        9,
        1,
        "unknown field `retries`",
    );
}

#[test]
fn missing_and_mistyped_fields() {
    refused(
        "\n[[rule]]\nprincipal = \"*\"\nroles = [\"user\"]\n",
        2,
        1,
        "missing field `name`; add it",
    );
    refused(
        "[[rule]]\nname = \"a\"\nroles = [\"user\"]\n",
        1,
        1,
        "missing field `principal`",
    );
    refused(
        "[[rule]]\nname = 7\nprincipal = \"*\"\nroles = [\"user\"]\n",
        2,
        8,
        "invalid type",
    );
    refused(
        "[[rule]]\nname = \"a\"\nprincipal = \"*\"\nroles = \"user\"\n",
        4,
        9,
        "invalid type",
    );
}

#[test]
fn bad_cidr() {
    let base = "[[rule]]\nname = \"a\"\nprincipal = \"*\"\nroles = [\"user\"]\n";
    let m = refused(
        &format!("{base}network = [\"10.0.0.0/8\", \"10.0.0.1/8\"]\n"),
        5,
        26,
        "host bits set",
    );
    assert!(m.contains("write the network address 10.0.0.0/8"), "{m}");
    refused(
        &format!("{base}network = [\"fd00::/129\"]\n"),
        5,
        12,
        "prefix length",
    );
    refused(
        &format!("{base}network = [\"10.0.0.256/32\"]\n"),
        5,
        12,
        "not an ip address",
    );
    refused(
        &format!("{base}network = [\"bogus\"]\n"),
        5,
        12,
        "not an ip address",
    );
    refused(
        &format!("{base}network = []\n"),
        5,
        11,
        "empty network list",
    );
}

#[test]
fn unknown_role() {
    let m = refused(
        "[[rule]]\nname = \"a\"\nprincipal = \"*\"\nroles = [\"user\", \"wizard\"]\n",
        4,
        18,
        "unknown role 'wizard'",
    );
    assert!(
        m.contains("use one of peer, owner, admin, operator, user"),
        "{m}"
    );
    refused(
        "[[rule]]\nname = \"a\"\nprincipal = \"*\"\ndelegate = { program = \"/x\", roles = [\"root\"] }\n",
        4,
        39,
        "unknown role 'root'",
    );
    refused(
        "[[rule]]\nname = \"a\"\nprincipal = \"*\"\nroles = []\n",
        4,
        9,
        "empty role list",
    );
}

#[test]
fn duplicate_rule_name() {
    let m = refused(
        "[[rule]]\nname = \"ops\"\nprincipal = \"*\"\nroles = [\"user\"]\n\n[[rule]]\nname = \"ops\"\nprincipal = \"*\"\ndeny = true\n",
        7,
        8,
        "duplicate rule name \"ops\"",
    );
    assert!(m.contains("first used on line 2"), "{m}");
    refused(
        "[[rule]]\nname = \" \"\nprincipal = \"*\"\ndeny = true\n",
        2,
        8,
        "empty rule name",
    );
}

#[test]
fn scoped_roles_and_register_grants_are_checked() {
    refused(
        "[[rule]]\nname = \"x\"\nprincipal = \"*\"\ndeny = true\ntopics = [\"a.*\"]\n",
        5,
        10,
        "topics applies only to a rule with roles",
    );
    refused(
        "[[rule]]\nname = \"x\"\nprincipal = \"*\"\nroles = [\"user\"]\ntopics = [\"a b\"]\n",
        5,
        11,
        "bad topics pattern \"a b\"",
    );
    refused(
        "[[rule]]\nname = \"x\"\nprincipal = \"*\"\nroles = [\"user\"]\ntopics = []\n",
        5,
        10,
        "empty topics list",
    );
    refused(
        "[[rule]]\nname = \"x\"\nprincipal = \"*\"\nroles = [\"peer\"]\ntopics = [\"a.*\"]\n",
        5,
        10,
        "peer is not a client role",
    );
    refused(
        "[[rule]]\nname = \"x\"\nprincipal = \"*\"\nregister = [\"kv*s\"]\n",
        4,
        13,
        "bad register pattern",
    );
    refused(
        "[[rule]]\nname = \"x\"\nprincipal = \"*\"\nregister = [\"kvs\"]\nroles = [\"user\"]\n",
        5,
        9,
        "more than one of",
    );
}

#[test]
fn roles_and_deny_both_or_neither() {
    let m = refused(
        "[[rule]]\nname = \"x\"\nprincipal = \"*\"\nroles = [\"user\"]\ndeny = true\n",
        5,
        8,
        "more than one of roles, deny, delegate and register",
    );
    assert!(m.contains("keep exactly one"), "{m}");
    refused(
        "[[rule]]\nname = \"x\"\nprincipal = \"*\"\ndeny = true\ndelegate = { program = \"/x\", roles = [\"user\"] }\n",
        5,
        12,
        "more than one of",
    );
    refused(
        "[keys.a]\n\n[[rule]]\nname = \"x\"\nprincipal = \"*\"\n",
        3,
        1,
        "neither roles, deny, delegate nor register",
    );
    refused(
        "[[rule]]\nname = \"x\"\nprincipal = \"*\"\ndeny = false\n",
        4,
        8,
        "deny = false has no meaning",
    );
    // Case-insensitive hosts are an explicit option, for hosts only.
    refused(
        "[[rule]]\nname = \"x\"\nprincipal = \"alice@R\"\nhost_case = \"insensitive\"\nroles = [\"user\"]\n",
        4,
        13,
        "applies only to a service/host@REALM pattern",
    );
    refused(
        "[[rule]]\nname = \"x\"\nprincipal = \"svc/*@R\"\nhost_case = \"insensitive\"\nroles = [\"user\"]\n",
        4,
        13,
        "has none, so remove host_case",
    );
    refused(
        "[[rule]]\nname = \"x\"\nprincipal = \"svc/h@R\"\nhost_case = \"lower\"\nroles = [\"user\"]\n",
        4,
        13,
        "write \"exact\" (the default) or \"insensitive\"",
    );
}

#[test]
fn bad_principal_patterns() {
    let rule =
        |p: &str| format!("[[rule]]\nname = \"x\"\nprincipal = \"{p}\"\nroles = [\"user\"]\n");
    refused(&rule("al*@R"), 3, 13, "partial wildcard");
    refused(&rule("*@*"), 3, 13, "wildcard realm");
    refused(&rule("a@b@R"), 3, 13, "more than one '@'");
    refused(&rule("alice"), 3, 13, "has no @REALM");
    refused(&rule("a/b/c@R"), 3, 13, "more than two components");
    refused(&rule("@R"), 3, 13, "empty name");
    refused(&rule("curve:tooshort"), 3, 13, "is not a curve key");
    refused(&rule("unix:-x"), 3, 13, "is not a local user");
    refused(
        &rule("keys:nope"),
        3,
        13,
        "key group \"nope\" is not defined",
    );
    refused(&rule(""), 3, 13, "the principal is empty");
    refused(
        "[[rule]]\nname = \"x\"\nprincipal = \"a\\u0007@R\"\nroles = [\"user\"]\n",
        3,
        13,
        "control character",
    );
}

#[test]
fn bad_mechanism_expiry_delegate_and_keys() {
    let base = "[[rule]]\nname = \"x\"\n";
    refused(
        &format!("{base}principal = \"*\"\nmechanism = \"kerberos\"\nroles = [\"user\"]\n"),
        4,
        13,
        "unknown mechanism \"kerberos\"",
    );
    refused(
        &format!("{base}principal = \"unix:*\"\nmechanism = \"curve\"\nroles = [\"user\"]\n"),
        4,
        13,
        "can never match",
    );
    refused(
        &format!("{base}principal = \"*\"\nexpires = 2027-01-01\nroles = [\"user\"]\n"),
        4,
        11,
        "full date-time with an offset",
    );
    refused(
        &format!("{base}principal = \"*\"\nexpires = 2027-01-01T00:00:00\nroles = [\"user\"]\n"),
        4,
        11,
        "full date-time with an offset",
    );
    refused(
        &format!(
            "{base}principal = \"*\"\ndelegate = {{ program = \"check\", roles = [\"user\"] }}\n"
        ),
        4,
        24,
        "not an absolute path",
    );
    refused(
        &format!("{base}principal = \"*\"\ndelegate = {{ program = \"/x\", timeout_ms = 0, roles = [\"user\"] }}\n"),
        4,
        43,
        "timeout_ms 0 is out of range",
    );
    refused(
        &format!("{base}principal = \"*\"\ndelegate = {{ program = \"/x\", timeout_ms = 60000, roles = [\"user\"] }}\n"),
        4,
        43,
        "out of range",
    );
    refused(
        "[keys.ops]\n\"curve:nope\" = \"laptop\"\n",
        2,
        1,
        "is not a curve key",
    );
    refused(
        &format!("[keys.ops]\n\"{KEY}\" = \"\"\n"),
        2,
        52,
        "empty or unprintable label",
    );
    refused(
        &format!("[keys.\"a b\"]\n\"{KEY}\" = \"x\"\n"),
        1,
        7,
        "bad key group name",
    );
}

#[test]
fn good_policy_parses_with_every_feature() {
    let text = format!(
        r#"
[keys.ops]
"{KEY}" = "alice-laptop"

[[rule]]
name = "brokers"
principal = "canopy/*@HPC.EXAMPLE"
mechanism = "gssapi"
network = ["10.0.0.0/8", "fd00::/8", "192.0.2.1"]
expires = 2027-01-01T00:00:00Z
roles = ["peer"]

[[rule]]
name = "ops"
principal = "keys:ops"
roles = ["admin", "USER"]

[[rule]]
name = "ldap"
principal = "*@HPC.EXAMPLE"
delegate = {{ program = "/usr/libexec/canopy-ldap-check", args = ["--fast"], timeout_ms = 500, roles = ["user"] }}

rule.comment = "this is not how arrays of tables work"
"#
    );
    // A dotted key after [[rule]] belongs to that rule: `rule` is unknown there.
    refused(&text, 23, 1, "unknown field `rule`");
    let text = text.replace(
        "rule.comment = \"this is not how arrays of tables work\"\n",
        "",
    );
    let acl = Acl::parse(&text, "good.toml").unwrap();
    assert_eq!(acl.rules().len(), 3);
    assert_eq!(acl.rules()[0].line(), 5);
    assert_eq!(acl.rules()[1].line(), 13);
    assert_eq!(acl.rules()[2].line(), 18);
    assert_eq!(acl.rules()[0].network().unwrap().len(), 3);
    match acl.rules()[2].action() {
        canopy_acl::Action::Delegate(d) => {
            assert_eq!(d.timeout.as_millis(), 500);
            assert_eq!(d.args, ["--fast"]);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(acl.digest().len(), 64);
    assert_eq!(Acl::parse("", "empty").unwrap().rules().len(), 0);
}

#[test]
fn load_refuses_writable_and_unreadable_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.toml");
    std::fs::write(
        &path,
        "[[rule]]\nname = \"a\"\nprincipal = \"*\"\ndeny = true\n",
    )
    .unwrap();
    let set =
        |mode| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();

    set(0o644);
    let acl = Acl::load(&path).unwrap();
    assert_eq!(acl.origin(), path.display().to_string());

    for mode in [0o664, 0o646, 0o666] {
        set(mode);
        let e = Acl::load(&path).unwrap_err();
        assert!(matches!(e, AclError::Writable { .. }), "{mode:o}: {e}");
        let m = e.to_string();
        assert!(m.contains(&format!("chmod go-w {}", path.display())), "{m}");
        assert!(m.contains(&format!("mode {mode:04o}")), "{m}");
    }

    set(0o600);
    let missing = dir.path().join("nope.toml");
    let e = Acl::load(&missing).unwrap_err();
    assert!(matches!(e, AclError::Read { .. }), "{e}");
    assert!(e.to_string().contains("check the path"), "{e}");

    let e = Acl::load(dir.path()).unwrap_err();
    assert!(
        matches!(e, AclError::NotAFile { .. } | AclError::Read { .. }),
        "{e}"
    );

    // Unreadable: only meaningful when not running as root.
    set(0o000);
    if std::fs::read(&path).is_err() {
        let e = Acl::load(&path).unwrap_err();
        assert!(matches!(e, AclError::Read { .. }), "{e}");
    }
    set(0o600);

    // A parse error from load names the file.
    std::fs::write(&path, "[[rule]]\nname = \"a\"\n").unwrap();
    let e = Acl::load(&path).unwrap_err().to_string();
    assert!(
        e.starts_with(&format!(
            "{}:1:1: missing field `principal`",
            path.display()
        )),
        "{e}"
    );
}
