//! Entry point of the `acl_policy` fuzz target in `fuzz/` (see
//! docs/security.md, "Fuzzing"). Never panics on hostile bytes; panics only
//! when a property of the parser or of the decisions is violated.

use std::time::{Duration, SystemTime};

use crate::principal::{Pattern, Principal, RawPattern};
use crate::{Acl, Action, Cidr, NoDelegates, Query};

/// Policy parser. The input (as text, lossily) is parsed as a policy;
/// whatever parses must parse again to the same rules, and a policy with
/// only allow rules must admit the exact principal of each rule that has
/// no mechanism, network or expiry condition, with at least its roles.
/// Every line is also tried as a principal, a pattern and a CIDR, whose
/// canonical text must parse back to the same value.
pub fn policy(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    for line in text.lines() {
        let line = line.trim();
        if let Ok(p) = Principal::parse(line) {
            let canon = p.canonical();
            let again = Principal::parse(&canon)
                .unwrap_or_else(|e| panic!("canonical principal {canon:?} is refused: {e}"));
            assert_eq!(again, p, "canonical form of {line:?} parses differently");
        }
        if let Ok(RawPattern::Resolved(pat)) = Pattern::parse(line) {
            let shown = pat.to_string();
            match Pattern::parse(&shown) {
                Ok(RawPattern::Resolved(again)) => {
                    assert_eq!(again, pat, "pattern {line:?} shown as {shown:?}")
                }
                _ => panic!("pattern {line:?} shown as {shown:?} does not parse back"),
            }
        }
        if let Ok(c) = line.parse::<Cidr>() {
            let shown = c.to_string();
            assert_eq!(shown.parse::<Cidr>().ok(), Some(c), "cidr {line:?}");
        }
    }

    let Ok(acl) = Acl::parse(&text, "fuzz.toml") else {
        return;
    };
    let again = Acl::parse(&text, "fuzz.toml").expect("a policy parses the same way twice");
    assert_eq!(acl.digest(), again.digest());
    assert_eq!(acl.rules().len(), again.rules().len());
    for (a, b) in acl.rules().iter().zip(again.rules()) {
        assert_eq!(a.name(), b.name());
        assert_eq!(a.pattern(), b.pattern());
        assert_eq!(a.action(), b.action());
    }

    let only_allow = acl
        .rules()
        .iter()
        .all(|r| matches!(r.action(), Action::Allow(_)));
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    for rule in acl.rules() {
        let Pattern::Exact(p) = rule.pattern() else {
            continue;
        };
        let mech = p.kind().mechanism();
        let canon = p.canonical();
        let v = acl.decide_with(
            &Query {
                principal: &canon,
                mechanism: mech,
                address: None,
                now,
            },
            &NoDelegates,
        );
        let unconditional =
            rule.mechanism().is_none() && rule.network().is_none() && rule.expires().is_none();
        match rule.action() {
            Action::Allow(roles) if only_allow && unconditional && !roles.is_empty() => {
                assert!(v.allow, "rule {} does not admit {canon}", rule.name());
                assert!(v.roles.contains(*roles), "rule {} roles", rule.name());
            }
            Action::Deny if unconditional => {
                assert!(!v.allow, "deny rule {} does not deny {canon}", rule.name())
            }
            _ => {}
        }
    }
}
