//! The audit log's hash chain: append, reopen, verify, and tampering of
//! each kind caught at the right line.

use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use canopy_acl::audit::GENESIS;
use canopy_acl::{
    parse_address, verify, Acl, AuditError, AuditEvent, AuditKind, AuditLog, Mech, NoDelegates,
    Query, VerifyError,
};
use canopy_proto::Roles;
use sha2::{Digest, Sha256};

const POLICY: &str = "[[rule]]\nname = \"users\"\nprincipal = \"*@R\"\nroles = [\"user\"]\n\n[[rule]]\nname = \"no-mallory\"\nprincipal = \"mallory@R\"\ndeny = true\n";

fn events() -> Vec<AuditEvent> {
    let acl = Acl::parse(POLICY, "p.toml").unwrap();
    let mut out = vec![AuditEvent::reload(&acl)];
    for (who, addr) in [
        ("alice@R", Some("10.0.0.1")),
        ("mallory@R", None),
        ("eve@S", Some("fd00::1")),
    ] {
        let q = Query {
            principal: who,
            mechanism: Mech::Gssapi,
            address: addr.and_then(parse_address),
            now: UNIX_EPOCH,
        };
        out.push(AuditEvent::decision(&q, &acl.decide_with(&q, &NoDelegates)));
    }
    out.push(AuditEvent::role_refusal(
        "alice@R",
        Some("gssapi"),
        Some("10.0.0.1"),
        Roles::USER,
        "overlay.disconnect needs admin",
    ));
    out
}

fn write_log(path: &Path) {
    let mut log = AuditLog::open(path).unwrap();
    for (i, ev) in events().iter().enumerate() {
        let seq = log
            .append_at(
                ev,
                UNIX_EPOCH + Duration::from_secs(1_780_000_000 + i as u64),
            )
            .unwrap();
        assert_eq!(seq, i as u64 + 1);
    }
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn put(path: &Path, lines: &[String]) {
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(path, text).unwrap();
}

#[test]
fn entries_have_the_documented_shape_and_hashes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    write_log(&path);
    assert_eq!(verify(&path), Ok(5));

    let ls = lines(&path);
    let v: Vec<serde_json::Value> = ls
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(v[0]["event"], "reload");
    assert_eq!(v[0]["principal"], serde_json::Value::Null);
    assert!(v[0]["reason"]
        .as_str()
        .unwrap()
        .contains("2 rules, sha256 "));
    assert_eq!(v[1]["event"], "admit");
    assert_eq!(v[1]["principal"], "alice@R");
    assert_eq!(v[1]["address"], "10.0.0.1");
    assert_eq!(v[1]["mechanism"], "gssapi");
    assert_eq!(v[1]["roles"], serde_json::json!(["user"]));
    assert_eq!(v[1]["rule"], "p.toml:1 users");
    assert_eq!(v[1]["ts"], "2026-05-28T20:26:41.000Z");
    assert_eq!(v[2]["event"], "deny");
    assert_eq!(v[2]["rule"], "p.toml:6 no-mallory");
    assert_eq!(v[2]["address"], serde_json::Value::Null);
    assert_eq!(v[3]["event"], "deny");
    assert_eq!(v[3]["rule"], serde_json::Value::Null);
    assert_eq!(v[4]["event"], "role-refusal");
    assert_eq!(v[4]["roles"], serde_json::json!(["user"]));

    // Field order is fixed, and the hash is sha256(prev || line without hash).
    let keys: Vec<&str> = ls[1]
        .trim_start_matches('{')
        .split(",\"")
        .map(|kv| kv.trim_start_matches('"').split('"').next().unwrap())
        .collect();
    assert_eq!(
        keys,
        [
            "seq",
            "ts",
            "event",
            "principal",
            "address",
            "mechanism",
            "roles",
            "rule",
            "reason",
            "prev",
            "hash"
        ]
    );
    let mut prev = GENESIS.to_owned();
    for (i, line) in ls.iter().enumerate() {
        assert_eq!(v[i]["seq"], i as u64 + 1);
        assert_eq!(v[i]["prev"], prev.as_str());
        let cut = line.rfind(",\"hash\":\"").unwrap();
        let body = format!("{}}}", &line[..cut]);
        let mut h = Sha256::new();
        h.update(prev.as_bytes());
        h.update(body.as_bytes());
        let hash: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(v[i]["hash"], hash.as_str(), "line {}", i + 1);
        prev = hash;
    }
}

#[test]
fn reopening_continues_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    write_log(&path);
    let head = lines(&path).last().unwrap().clone();
    let mut log = AuditLog::open(&path).unwrap();
    assert_eq!(log.seq(), 5);
    assert!(head.contains(log.head()));
    let ev = &events()[1];
    assert_eq!(log.append(ev).unwrap(), 6);
    drop(log);
    let mut log = AuditLog::open(&path).unwrap();
    log.set_sync(true);
    assert_eq!(log.append(ev).unwrap(), 7);
    assert_eq!(verify(&path), Ok(7));

    // An empty file is a fresh log.
    let empty = dir.path().join("empty.log");
    std::fs::write(&empty, "").unwrap();
    let mut log = AuditLog::open(&empty).unwrap();
    assert_eq!((log.seq(), log.head()), (0, GENESIS));
    log.append(ev).unwrap();
    assert_eq!(verify(&empty), Ok(1));
    assert_eq!(verify(dir.path().join("none.log")).unwrap_err().line, 0);
}

#[test]
fn an_edited_field_is_caught_at_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    write_log(&path);
    let orig = lines(&path);

    // deny -> admit on line 3.
    let mut ls = orig.clone();
    ls[2] = ls[2].replace("\"event\":\"deny\"", "\"event\":\"admit\"");
    assert_ne!(ls[2], orig[2]);
    put(&path, &ls);
    let e = verify(&path).unwrap_err();
    assert_eq!(e.line, 3, "{e}");
    assert!(e.reason.contains("hash mismatch"), "{e}");

    // A changed role on line 2.
    let mut ls = orig.clone();
    ls[1] = ls[1].replace("[\"user\"]", "[\"owner\"]");
    put(&path, &ls);
    assert_eq!(verify(&path).unwrap_err().line, 2);

    // The same content re-encoded (extra space) is not canonical.
    let mut ls = orig.clone();
    ls[3] = ls[3].replacen("\"seq\":4", "\"seq\": 4", 1);
    put(&path, &ls);
    let e = verify(&path).unwrap_err();
    assert_eq!(e.line, 4);
    assert!(e.reason.contains("canonical"), "{e}");

    // A forged hash on line 4 breaks line 5's prev.
    let mut ls = orig.clone();
    let n = ls[3].len();
    ls[3].replace_range(n - 4..n - 2, "00");
    put(&path, &ls);
    assert_eq!(verify(&path).unwrap_err().line, 4);
}

#[test]
fn deleted_reordered_and_truncated_lines_are_caught() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    write_log(&path);
    let orig = lines(&path);

    let mut ls = orig.clone();
    ls.remove(2);
    put(&path, &ls);
    let e = verify(&path).unwrap_err();
    assert_eq!(
        e,
        VerifyError {
            line: 3,
            reason: "sequence number 4 where 3 was expected: a line was deleted, inserted or moved"
                .into()
        }
    );

    // The first line deleted.
    put(&path, &orig[1..]);
    assert_eq!(verify(&path).unwrap_err().line, 1);

    let mut ls = orig.clone();
    ls.swap(1, 2);
    put(&path, &ls);
    assert_eq!(verify(&path).unwrap_err().line, 2);

    // A line with its seq fixed up after a deletion still fails: prev.
    let mut ls = orig.clone();
    ls.remove(1);
    ls[1] = ls[1].replacen("\"seq\":3", "\"seq\":2", 1);
    put(&path, &ls);
    let e = verify(&path).unwrap_err();
    assert_eq!(e.line, 2);
    assert!(e.reason.contains("prev does not match"), "{e}");

    // Cut in the middle of the last line (no newline at the end).
    let mut text = orig.join("\n");
    text.truncate(text.len() - 30);
    std::fs::write(&path, &text).unwrap();
    let e = verify(&path).unwrap_err();
    assert_eq!(e.line, 5);
    assert!(e.reason.contains("truncated"), "{e}");
    // ... and reopening such a log refuses to extend it.
    let e = AuditLog::open(&path).unwrap_err();
    assert!(matches!(e, AuditError::Damaged { .. }), "{e}");
    assert!(e.to_string().contains("move it aside"), "{e}");

    // Cut short but ending in a newline.
    let mut ls = orig.clone();
    let n = ls[4].len();
    ls[4].truncate(n - 20);
    put(&path, &ls);
    let e = verify(&path).unwrap_err();
    assert_eq!(e.line, 5);
    assert!(AuditLog::open(&path).is_err());

    // Garbage in the middle.
    let mut ls = orig.clone();
    ls[1] = "not json at all".into();
    put(&path, &ls);
    assert_eq!(verify(&path).unwrap_err().line, 2);
}

#[test]
fn kinds_have_their_names() {
    let names: Vec<_> = [
        AuditKind::Admit,
        AuditKind::Deny,
        AuditKind::RoleRefusal,
        AuditKind::Reload,
    ]
    .iter()
    .map(|k| k.as_str())
    .collect();
    assert_eq!(names, ["admit", "deny", "role-refusal", "reload"]);
}

/// Issue 15 #10: every entry names the broker that wrote it, and a second
/// writer of the same log is refused rather than breaking the chain.
#[test]
fn entries_carry_rank_and_host_and_a_log_has_one_writer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let mut log = AuditLog::open(&path).unwrap();
    log.set_origin(3, "node3");
    log.append(&events()[0]).unwrap();
    let line = lines(&path).pop().unwrap();
    assert!(
        line.contains(r#""rank":3,"host":"node3","event":"#),
        "{line}"
    );
    let e = AuditLog::open(&path).unwrap_err();
    assert!(matches!(e, canopy_acl::AuditError::InUse { .. }), "{e}");
    assert!(e.to_string().contains("%h"), "{e}");
    drop(log);
    // Once the writer is gone the log is continued, old and new entries
    // (with and without an origin) in one chain.
    let mut log = AuditLog::open(&path).unwrap();
    log.append(&events()[1]).unwrap();
    assert_eq!(verify(&path), Ok(2));
}
