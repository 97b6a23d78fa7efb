//! The golden decision table: every row of tests/decisions.tsv is decided
//! against tests/policy-golden.toml with a fixed clock.

use std::path::PathBuf;
use std::time::SystemTime;

use canopy_acl::{parse_address, Acl, Mech, NoDelegates, Query};

const DEFAULT_NOW: &str = "2026-06-01T00:00:00Z";

fn here(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(name)
}

/// Parse an RFC 3339 instant through the policy parser's own datetime
/// support: a one-rule policy whose expiry is that instant. Returns the
/// instant as the rule's expiry.
fn instant(text: &str) -> SystemTime {
    let acl = Acl::parse(
        &format!("[[rule]]\nname = \"t\"\nprincipal = \"*\"\nexpires = {text}\ndeny = true\n"),
        "clock",
    )
    .unwrap_or_else(|e| panic!("bad time {text}: {e}"));
    acl.rules()[0].expires().unwrap()
}

#[test]
fn golden_decisions() {
    let acl = Acl::load(here("policy-golden.toml")).expect("golden policy parses");
    let table = std::fs::read_to_string(here("decisions.tsv")).unwrap();
    let default_now = instant(DEFAULT_NOW);
    let mut rows = 0;
    let mut failures = Vec::new();
    for (n, line) in table.lines().enumerate() {
        let line_no = n + 1;
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let cols: Vec<&str> = line.split('\t').collect();
        assert!(
            (6..=8).contains(&cols.len()),
            "decisions.tsv:{line_no}: expected 6 to 8 tab-separated columns, got {}",
            cols.len()
        );
        let mech: Mech = cols[0]
            .parse()
            .unwrap_or_else(|e| panic!("decisions.tsv:{line_no}: {e}"));
        let address = match cols[2] {
            "-" => None,
            a => Some(
                parse_address(a)
                    .unwrap_or_else(|| panic!("decisions.tsv:{line_no}: bad address {a}")),
            ),
        };
        let now = match cols.get(6) {
            None | Some(&"-") => default_now,
            Some(t) => instant(t),
        };
        let want_scope = cols.get(7).copied();
        let want_allow = match cols[3] {
            "allow" => true,
            "deny" => false,
            v => panic!("decisions.tsv:{line_no}: verdict must be allow or deny, not {v}"),
        };
        let want_roles = if cols[4] == "-" { "none" } else { cols[4] };
        let want_rule = (cols[5] != "-").then_some(cols[5]);

        let q = Query {
            principal: cols[1],
            mechanism: mech,
            address,
            now,
        };
        let v = acl.decide_with(&q, &NoDelegates);
        let got_rule = v.rule.as_ref().map(|r| r.name.as_str());
        let got_scope = v.grant().encode_scope();
        if v.allow != want_allow
            || v.roles.to_string() != want_roles
            || got_rule != want_rule
            || want_scope.is_some_and(|w| w != got_scope)
        {
            failures.push(format!(
                "decisions.tsv:{line_no}: {line}\n    got {} roles={} rule={} scope={got_scope} ({})",
                if v.allow { "allow" } else { "deny" },
                v.roles,
                got_rule.unwrap_or("-"),
                v.reason
            ));
        }
        // Invariants that hold for every row.
        assert_eq!(v.allow, !v.grant().is_empty(), "decisions.tsv:{line_no}");
        assert!(v.allow || v.grant().is_plain(), "decisions.tsv:{line_no}");
        if let Some(r) = &v.rule {
            assert!(r.origin.ends_with("policy-golden.toml"));
            assert!(r.line > 0);
        }
        rows += 1;
    }
    assert!(
        failures.is_empty(),
        "{} of {rows} rows differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(
        rows >= 30,
        "the table should have at least 30 rows, has {rows}"
    );
}

#[test]
fn verdict_reports_rule_lines_and_all_grants() {
    let acl = Acl::load(here("policy-golden.toml")).unwrap();
    let text = std::fs::read_to_string(here("policy-golden.toml")).unwrap();
    let header_line = |name: &str| {
        // The 0-based index of the name line is the 1-based number of the
        // [[rule]] header just above it.
        text.lines()
            .position(|l| l == format!("name = \"{name}\""))
            .unwrap()
    };
    let v = acl.decide_with(
        &Query {
            principal: "carol@HPC.EXAMPLE",
            mechanism: Mech::Gssapi,
            address: None,
            now: instant(DEFAULT_NOW),
        },
        &NoDelegates,
    );
    assert!(v.allow);
    let names: Vec<_> = v.matched.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["realm-users", "carol-operator"]);
    assert_eq!(v.matched[0].line, header_line("realm-users"));
    assert_eq!(v.matched[1].line, header_line("carol-operator"));
    assert!(
        v.reason.contains("allowed by rules \"realm-users\""),
        "{}",
        v.reason
    );
    assert!(v.reason.ends_with("roles operator,user"), "{}", v.reason);
    assert_eq!(
        v.rule.as_ref().unwrap().to_string(),
        format!(
            "{}:{} realm-users",
            acl.origin(),
            header_line("realm-users")
        )
    );

    let deny = acl.decide_with(
        &Query {
            principal: "mallory@HPC.EXAMPLE",
            mechanism: Mech::Gssapi,
            address: None,
            now: instant(DEFAULT_NOW),
        },
        &NoDelegates,
    );
    assert_eq!(deny.rule.as_ref().unwrap().line, header_line("mallory"));
    assert!(deny.reason.starts_with("denied by rule \"mallory\""));
    assert!(deny.matched.is_empty());

    let none = acl.decide_with(
        &Query {
            principal: "nobody@ELSEWHERE",
            mechanism: Mech::Gssapi,
            address: parse_address("10.1.1.1"),
            now: instant(DEFAULT_NOW),
        },
        &NoDelegates,
    );
    assert_eq!(none.rule, None);
    assert_eq!(
        none.reason,
        "no rule grants nobody@ELSEWHERE (gssapi from 10.1.1.1) a role; default deny"
    );
}
