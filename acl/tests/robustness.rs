//! Hostile input never panics: mutated policies, odd principals, damaged
//! audit logs. Deterministic (xorshift), so failures reproduce.

use std::time::SystemTime;

use canopy_acl::{
    parse_address, verify, Acl, AclError, AuditEvent, AuditKind, AuditLog, Mech, NoDelegates, Query,
};
use canopy_proto::Roles;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

const PIECES: &[&str] = &[
    "[[rule]]",
    "[keys.x]",
    "=",
    "\"",
    "'",
    "[",
    "]",
    "{",
    "}",
    ",",
    "\n",
    "#",
    "*",
    "@",
    "/",
    ":",
    "name",
    "principal",
    "roles",
    "deny",
    "true",
    "network",
    "expires",
    "delegate",
    "2027-01-01T00:00:00Z",
    "10.0.0.0/8",
    "::/0",
    "é",
    "\u{0}",
    "\\",
    "keys:x",
    "curve:",
    "unix:",
    "user",
    "peer",
    "ß@R",
];

#[test]
fn mutated_policies_never_panic() {
    let golden = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/policy-golden.toml"
    ))
    .unwrap();
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    let mut refused = 0;
    for _ in 0..3000 {
        let mut text = golden.clone();
        for _ in 0..1 + rng.below(4) {
            let mut at = rng.below(text.len() + 1);
            while !text.is_char_boundary(at) {
                at -= 1;
            }
            match rng.below(3) {
                0 => text.insert_str(at, PIECES[rng.below(PIECES.len())]),
                1 => {
                    let mut end = (at + 1 + rng.below(8)).min(text.len());
                    while !text.is_char_boundary(end) {
                        end += 1;
                    }
                    text.replace_range(at..end, "");
                }
                _ => text.insert(
                    at,
                    char::from_u32(rng.next() as u32 % 0x3000).unwrap_or('?'),
                ),
            }
        }
        match Acl::parse(&text, "fuzz.toml") {
            Ok(acl) => {
                let q = Query {
                    principal: "alice@HPC.EXAMPLE",
                    mechanism: Mech::Gssapi,
                    address: parse_address("10.0.0.1"),
                    now: SystemTime::now(),
                };
                let v = acl.decide_with(&q, &NoDelegates);
                assert_eq!(v.allow, !v.grant().is_empty());
                assert!(v.allow || v.grant().is_plain());
            }
            Err(AclError::Parse {
                line, col, message, ..
            }) => {
                assert!(line >= 1 && line <= text.lines().count() + 1, "{line}");
                assert!(col >= 1);
                assert!(!message.is_empty());
                refused += 1;
            }
            Err(e) => panic!("unexpected error kind: {e}"),
        }
    }
    assert!(
        refused > 1000,
        "mutations should mostly break the policy ({refused})"
    );
}

#[test]
fn odd_principals_never_panic_and_never_get_in_by_accident() {
    let acl = Acl::parse(
        "[[rule]]\nname = \"realm\"\nprincipal = \"*@R\"\nroles = [\"user\"]\n",
        "p.toml",
    )
    .unwrap();
    let chars = [
        'a', 'R', '@', '/', '*', ':', '\\', ' ', '\n', 'é', '\u{202e}', '.', '$', '-',
    ];
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for _ in 0..20_000 {
        let s: String = (0..rng.below(12))
            .map(|_| chars[rng.below(chars.len())])
            .collect();
        for mech in [Mech::Curve, Mech::Gssapi, Mech::Local] {
            let q = Query {
                principal: &s,
                mechanism: mech,
                address: None,
                now: SystemTime::now(),
            };
            let v = acl.decide_with(&q, &NoDelegates);
            if v.allow {
                // Only one-component names of realm R, by GSSAPI, get in.
                assert_eq!(mech, Mech::Gssapi, "{s:?}");
                assert_eq!(v.roles, Roles::USER);
                let (name, realm) = s.split_once('@').unwrap();
                assert_eq!(realm, "R", "{s:?}");
                assert!(
                    !name.is_empty() && !name.contains(['/', '*', ':', '\\', ' ', '\n']),
                    "{s:?}"
                );
            }
        }
    }
}

#[test]
fn damaged_audit_logs_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.log");
    let mut log = AuditLog::open(&path).unwrap();
    for i in 0..4 {
        log.append(&AuditEvent {
            kind: AuditKind::Admit,
            principal: Some(format!("ünïcödé{i}@R")),
            address: None,
            mechanism: Some("gssapi".into()),
            roles: Roles::USER,
            rule: None,
            reason: "é".repeat(i),
        })
        .unwrap();
    }
    drop(log);
    let good = std::fs::read(&path).unwrap();
    assert_eq!(verify(&path), Ok(4));
    let mut rng = Rng(0xDEAD_BEEF_CAFE_F00D);
    for _ in 0..2000 {
        let mut bytes = good.clone();
        let at = rng.below(bytes.len());
        match rng.below(3) {
            0 => bytes[at] = rng.next() as u8,
            1 => {
                bytes.remove(at);
            }
            _ => bytes.truncate(at),
        }
        std::fs::write(&path, &bytes).unwrap();
        let whole_lines_cut =
            good.starts_with(&bytes) && (bytes.is_empty() || bytes.ends_with(b"\n"));
        if whole_lines_cut {
            // Cutting whole lines off the end is the documented blind spot
            // (anchor AuditLog::head elsewhere); the rest still verifies.
            let lines = bytes.iter().filter(|&&b| b == b'\n').count();
            assert_eq!(verify(&path), Ok(lines));
        } else if bytes != good {
            assert!(verify(&path).is_err(), "damage at byte {at} went unnoticed");
        }
        let _ = AuditLog::open(&path);
    }
}
