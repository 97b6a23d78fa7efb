//! Entry point of the `imp_envelope` fuzz target in `fuzz/` (see
//! docs/security.md, "Fuzzing"). Never panics on hostile bytes; panics only
//! when a property of the parsers or of the checks is violated.

use std::path::Path;

use ed25519_dalek::SigningKey;

use crate::cert::{CertKind, UserCert};
use crate::config::ImpConfig;
use crate::envelope::{b64_decode, b64_encode, sign, Envelope, EXEC_REQUEST_TYPE};
use crate::frame::{encode_input, read_input};
use crate::replay::MemoryReplayCache;
use crate::request::ExecRequest;
use crate::verify::{check, Account, Accounts, Roots, Submitter, Target};

const NOW: u64 = 1_800_000_000;

struct OneUser;

impl Accounts for OneUser {
    fn user(&self, name: &str) -> Option<Account> {
        (name == "alice").then(|| Account {
            name: "alice".into(),
            uid: 1000,
            gid: 1000,
            groups: vec![1000],
            home: "/home/alice".into(),
            shell: "/bin/sh".into(),
        })
    }
    fn group_gid(&self, _: &str) -> Option<u32> {
        None
    }
}

/// The helper's input parsers, on anything:
///
/// * the stdin framing: whatever it accepts encodes back to a prefix of
///   the input;
/// * the envelope: whatever parses has canonical base64 (its payload
///   re-encodes to the text given) and verifies only with the right key;
/// * the request body: whatever parses passes its shape check and
///   round-trips through JSON;
/// * the certificate body likewise;
/// * the checks: the input signed as a request by a certified user key,
///   when approved, is for this instance and rank, not expired, and a
///   second run is refused as a replay; the same bytes with one bit
///   flipped are never approved.
pub fn envelope(data: &[u8]) {
    if let Ok(i) = read_input(&mut std::io::Cursor::new(data)) {
        let again = encode_input(&i.cert, &i.request);
        assert!(data.starts_with(&again), "framing does not round-trip");
    }

    if let Ok(env) = Envelope::parse(data) {
        let v: serde_json::Value = serde_json::from_slice(data).expect("parsed as an envelope");
        let payload = v["payload"].as_str().expect("payload is a string");
        assert_eq!(
            b64_encode(env.unverified_body()),
            payload,
            "non-canonical base64 accepted"
        );
        assert_eq!(b64_decode(payload).as_deref(), Some(env.unverified_body()));
        let stranger = SigningKey::from_bytes(&[0x55; 32]);
        assert!(
            env.verify(EXEC_REQUEST_TYPE, &stranger.verifying_key(), "fuzz")
                .is_err(),
            "an envelope verified with a key that never signed it"
        );
    }

    if let Ok(r) = ExecRequest::parse(data) {
        r.check().expect("a parsed request passes its checks");
        assert_eq!(ExecRequest::parse(&r.to_body()).as_ref(), Ok(&r));
    }
    if let Ok(c) = UserCert::parse(data) {
        let body = serde_json::to_vec(&c).expect("serializes");
        assert_eq!(UserCert::parse(&body).as_ref(), Ok(&c));
    }

    checks(data);
}

fn checks(body: &[u8]) -> bool {
    let ca = SigningKey::from_bytes(&[1; 32]);
    let user = SigningKey::from_bytes(&[3; 32]);
    let config = ImpConfig::parse(
        "broker_user = \"canopy\"\nusers = [\"alice\"]\ntrusted_ca_keys = [\"/ca.pub\"]\nreceipt_key = \"/r.key\"\nreplay_cache = \"/replay\"\nmax_request_lifetime = 600\n",
        "fuzz.toml",
    )
    .expect("the fuzz config parses");
    let (_, cert) = UserCert::issue(
        CertKind::Ca,
        "alice@FUZZ",
        "alice",
        &user.verifying_key(),
        NOW - 10,
        NOW + 10,
        &ca,
    );
    let cas = [ca.verifying_key()];
    let roots = Roots {
        config: &config,
        cas: &cas,
        nodes: &[],
    };
    let target = Target {
        instance: "sys".into(),
        rank: 1,
        submitter: Submitter::User("alice@FUZZ".into()),
    };
    let resolve = |p: &Path| p == Path::new("/bin/true");
    let wire = sign(EXEC_REQUEST_TYPE, body, &user);
    let mut cache = MemoryReplayCache::default();
    let run = |wire: &[u8], cache: &mut MemoryReplayCache| {
        check(&roots, &cert, wire, &target, NOW, cache, &OneUser, &resolve)
    };
    let approved = run(&wire, &mut cache);
    if let Ok(a) = &approved {
        assert_eq!(a.request.instance, "sys");
        assert!(a.request.ranks.contains(&1));
        assert!(NOW < a.request.not_after);
        assert!(a.request.not_after - a.request.issued_at <= 600);
        assert_eq!(a.account.uid, 1000);
        assert!(run(&wire, &mut cache).is_err(), "replay approved");
    }
    // One flipped bit anywhere in the body: never approved.
    if !body.is_empty() {
        let mut v: serde_json::Value = serde_json::from_slice(&wire).expect("our envelope");
        let mut b = body.to_vec();
        let i = body.len() / 2;
        b[i] ^= 1;
        v["payload"] = b64_encode(&b).into();
        let tampered = serde_json::to_vec(&v).expect("serializes");
        assert!(
            run(&tampered, &mut MemoryReplayCache::default()).is_err(),
            "a tampered request was approved"
        );
    }
    approved.is_ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_valid_request_body_is_approved_by_the_fuzz_harness_checks() {
        // Keeps the harness honest: its approval path must be reachable.
        let body = br#"{"v":1,"principal":"alice@FUZZ","argv":["true"],"cwd":"/","env":{},"instance":"sys","ranks":[1],"audience":{"kind":"user"},"issued_at":1799999990,"not_after":1800000100,"nonce":"00000000000000000000000000000000"}"#;
        super::envelope(body);
        assert!(super::checks(body), "the harness never reaches approval");
    }
}
