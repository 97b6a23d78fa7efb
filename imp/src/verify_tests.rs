//! Every refusal of issue 14's "Bad input" list that the helper judges,
//! on requests that were signed and then captured, modified or replayed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;

use crate::cert::{CertKind, UserCert};
use crate::config::ImpConfig;
use crate::envelope::{b64_decode, b64_encode, sign, EnvelopeError, EXEC_REQUEST_TYPE};
use crate::replay::{MemoryReplayCache, ReplayError};
use crate::request::{tests::sample, Audience, ExecRequest};
use crate::verify::{check, Account, Accounts, Approved, Refusal, Roots, Submitter, Target};

const NOW: u64 = 1_000_100;

fn key(n: u8) -> SigningKey {
    SigningKey::from_bytes(&[n; 32])
}

fn ca() -> SigningKey {
    key(1)
}
fn node() -> SigningKey {
    key(2)
}
fn alice_key() -> SigningKey {
    key(3)
}

const CONFIG: &str = r#"
broker_user = "canopy"
users = ["alice", "toor", "mallory", "ghost"]
groups = ["hpc"]
trusted_ca_keys = ["/etc/canopy/imp/ca.pub"]
receipt_key = "/etc/canopy/imp/receipt.key"
replay_cache = "/var/lib/canopy-imp/replay"
max_request_lifetime = 600
[node_attestations]
accept = true
keys = ["/etc/canopy/imp/node1.pub"]
"#;

struct Fake(HashMap<&'static str, Account>);

fn account(name: &str, uid: u32, gid: u32, groups: &[u32]) -> Account {
    Account {
        name: name.into(),
        uid,
        gid,
        groups: groups.to_vec(),
        home: PathBuf::from("/home").join(name),
        shell: PathBuf::from("/bin/sh"),
    }
}

impl Accounts for Fake {
    fn user(&self, name: &str) -> Option<Account> {
        self.0.get(name).cloned()
    }
    fn group_gid(&self, name: &str) -> Option<u32> {
        (name == "hpc").then_some(2000)
    }
}

fn accounts() -> Fake {
    Fake(HashMap::from([
        ("alice", account("alice", 1000, 1000, &[1000])),
        ("bob", account("bob", 1001, 1001, &[1001])),
        ("carol", account("carol", 1002, 1002, &[1002, 2000])),
        ("root", account("root", 0, 0, &[0])),
        ("toor", account("toor", 0, 0, &[0])),
        ("mallory", account("mallory", 1003, 0, &[0])),
    ]))
}

fn resolve(p: &Path) -> bool {
    p == Path::new("/usr/bin/id") || p == Path::new("/bin/true")
}

struct World {
    config: ImpConfig,
    cache: MemoryReplayCache,
    target: Target,
    now: u64,
}

impl World {
    fn new() -> World {
        World::with(CONFIG)
    }
    fn with(config: &str) -> World {
        World {
            config: ImpConfig::parse(config, "imp.toml").unwrap(),
            cache: MemoryReplayCache::default(),
            target: Target {
                instance: "sys".into(),
                rank: 1,
                submitter: Submitter::User("alice@EXAMPLE.ORG".into()),
            },
            now: NOW,
        }
    }
    fn run(&mut self, cert: &[u8], request: &[u8]) -> Result<Approved, Refusal> {
        let cas = [ca().verifying_key()];
        let nodes = [node().verifying_key()];
        let roots = Roots {
            config: &self.config,
            cas: &cas,
            nodes: &nodes,
        };
        check(
            &roots,
            cert,
            request,
            &self.target,
            self.now,
            &mut self.cache,
            &accounts(),
            &resolve,
        )
    }
}

fn cert_for(user: &str, kind: CertKind, issuer: &SigningKey) -> Vec<u8> {
    UserCert::issue(
        kind,
        "alice@EXAMPLE.ORG",
        user,
        &alice_key().verifying_key(),
        NOW - 1000,
        NOW + 1000,
        issuer,
    )
    .1
}

fn alice_cert() -> Vec<u8> {
    cert_for("alice", CertKind::Ca, &ca())
}

fn signed(r: &ExecRequest) -> Vec<u8> {
    sign(EXEC_REQUEST_TYPE, &r.to_body(), &alice_key())
}

/// Edit the signed payload of a captured envelope, keeping its signature.
fn tamper(wire: &[u8], from: &str, to: &str) -> Vec<u8> {
    let mut v: serde_json::Value = serde_json::from_slice(wire).unwrap();
    let body = String::from_utf8(b64_decode(v["payload"].as_str().unwrap()).unwrap()).unwrap();
    assert!(body.contains(from), "{body} has no {from}");
    v["payload"] = b64_encode(body.replace(from, to).as_bytes()).into();
    serde_json::to_vec(&v).unwrap()
}

#[test]
fn a_good_request_is_approved() {
    let mut w = World::new();
    let wire = signed(&sample());
    let a = w.run(&alice_cert(), &wire).unwrap();
    assert_eq!(a.program, PathBuf::from("/usr/bin/id"));
    assert_eq!(a.account.uid, 1000);
    assert_eq!(a.request, sample());
    assert_eq!(a.request_digest, crate::envelope::sha256_hex(&wire));
}

#[test]
fn tampered_argv_ranks_or_expiry_are_refused() {
    let wire = signed(&sample());
    for (from, to) in [
        (r#"["id","-un"]"#, r#"["id","-u"]"#),
        (r#""ranks":[0,1,2]"#, r#""ranks":[0,1,2,3]"#),
        (r#""not_after":1000300"#, r#""not_after":1000400"#),
        (r#""cwd":"/""#, r#""cwd":"/tmp""#),
    ] {
        let mut w = World::new();
        let err = w.run(&alice_cert(), &tamper(&wire, from, to)).unwrap_err();
        assert!(
            matches!(
                err,
                Refusal::RequestSignature(EnvelopeError::BadSignature { .. })
            ),
            "{err}"
        );
        assert!(
            err.to_string().starts_with("tampered or forged request"),
            "{err}"
        );
        assert!(
            w.cache.entries.is_empty(),
            "a refused request used up its nonce"
        );
    }
}

#[test]
fn a_replayed_request_is_refused() {
    let mut w = World::new();
    let wire = signed(&sample());
    w.run(&alice_cert(), &wire).unwrap();
    let err = w.run(&alice_cert(), &wire).unwrap_err();
    assert!(
        matches!(err, Refusal::Replay(ReplayError::Replayed)),
        "{err}"
    );
    assert!(err.to_string().starts_with("replayed request"), "{err}");
    // The same request on another rank of the request is another run.
    w.target.rank = 2;
    w.run(&alice_cert(), &wire).unwrap();
}

#[test]
fn expired_future_or_too_long_requests_are_refused() {
    let mut w = World::new();
    w.now = sample().not_after;
    let err = w.run(&alice_cert(), &signed(&sample())).unwrap_err();
    assert!(matches!(err, Refusal::Expired { .. }), "{err}");
    assert!(err.to_string().starts_with("expired request"), "{err}");
    assert!(w.cache.entries.is_empty());

    let mut w = World::new();
    let mut r = sample();
    r.issued_at = NOW + 120;
    r.not_after = NOW + 200;
    let err = w.run(&alice_cert(), &signed(&r)).unwrap_err();
    assert!(matches!(err, Refusal::NotYetIssued { .. }), "{err}");

    let mut r = sample();
    r.not_after = r.issued_at + 601;
    let err = w.run(&alice_cert(), &signed(&r)).unwrap_err();
    assert!(
        matches!(
            err,
            Refusal::LifetimeTooLong {
                lifetime: 601,
                max: 600
            }
        ),
        "{err}"
    );
}

#[test]
fn wrong_audience_or_rank_is_refused() {
    let mut w = World::new();
    w.target.instance = "other".into();
    let err = w.run(&alice_cert(), &signed(&sample())).unwrap_err();
    assert!(matches!(err, Refusal::WrongInstance { .. }), "{err}");
    assert!(err.to_string().starts_with("wrong audience"), "{err}");

    let mut w = World::new();
    w.target.rank = 7;
    let err = w.run(&alice_cert(), &signed(&sample())).unwrap_err();
    assert!(
        matches!(err, Refusal::RankNotInRequest { rank: 7, .. }),
        "{err}"
    );

    // Pinned by imp.toml: the broker cannot claim another rank.
    let mut w = World::with(&format!("{CONFIG}[instances]\nsys = 2\n"));
    let err = w.run(&alice_cert(), &signed(&sample())).unwrap_err();
    assert!(
        matches!(err, Refusal::RankPinned { claimed: 1, .. }),
        "{err}"
    );
    w.target.rank = 2;
    w.run(&alice_cert(), &signed(&sample())).unwrap();

    // A user-audience request submitted by someone else.
    let mut w = World::new();
    w.target.submitter = Submitter::User("mallory@EXAMPLE.ORG".into());
    let err = w.run(&alice_cert(), &signed(&sample())).unwrap_err();
    assert!(matches!(err, Refusal::WrongSubmitter { .. }), "{err}");
    w.target.submitter = Submitter::Service("sched".into());
    let err = w.run(&alice_cert(), &signed(&sample())).unwrap_err();
    assert!(matches!(err, Refusal::WrongSubmitter { .. }), "{err}");
}

#[test]
fn restricted_delegation_runs_only_for_the_named_service_and_unmodified() {
    let mut r = sample();
    r.audience = Audience::Service {
        name: "sched".into(),
    };
    let wire = signed(&r);
    for s in [
        Submitter::User("alice@EXAMPLE.ORG".into()),
        Submitter::Service("other".into()),
    ] {
        let mut w = World::new();
        w.target.submitter = s;
        let err = w.run(&alice_cert(), &wire).unwrap_err();
        assert!(matches!(err, Refusal::WrongSubmitter { .. }), "{err}");
    }
    let mut w = World::new();
    w.target.submitter = Submitter::Service("sched".into());
    // The service cannot widen the request...
    let widened = tamper(&wire, r#""ranks":[0,1,2]"#, r#""ranks":[0,1,2,3]"#);
    assert!(matches!(
        w.run(&alice_cert(), &widened),
        Err(Refusal::RequestSignature(_))
    ));
    let other_cmd = tamper(&wire, r#"["id","-un"]"#, r#"["true","-un"]"#);
    assert!(matches!(
        w.run(&alice_cert(), &other_cmd),
        Err(Refusal::RequestSignature(_))
    ));
    // ...but runs it as signed.
    w.run(&alice_cert(), &wire).unwrap();
}

#[test]
fn unknown_expired_or_misused_certificates_are_refused() {
    let wire = signed(&sample());
    let mut w = World::new();
    // Signed by a key imp.toml does not list.
    let err = w
        .run(&cert_for("alice", CertKind::Ca, &key(9)), &wire)
        .unwrap_err();
    assert!(matches!(err, Refusal::UnknownIssuer(_)), "{err}");
    assert!(
        err.to_string().starts_with("unknown certificate issuer"),
        "{err}"
    );
    // A node key cannot issue a CA certificate.
    let err = w
        .run(&cert_for("alice", CertKind::Ca, &node()), &wire)
        .unwrap_err();
    assert!(matches!(err, Refusal::IssuerKind { .. }), "{err}");
    // Expired, not yet valid.
    for (nb, na, expired) in [(NOW - 100, NOW, true), (NOW + 61, NOW + 1000, false)] {
        let c = UserCert::issue(
            CertKind::Ca,
            "alice@EXAMPLE.ORG",
            "alice",
            &alice_key().verifying_key(),
            nb,
            na,
            &ca(),
        )
        .1;
        let err = w.run(&c, &wire).unwrap_err();
        if expired {
            assert!(matches!(err, Refusal::CertExpired { .. }), "{err}");
        } else {
            assert!(matches!(err, Refusal::CertNotYetValid { .. }), "{err}");
        }
    }
    // A tampered certificate (the user edited their account in it).
    let err = w
        .run(
            &tamper(&alice_cert(), r#""user":"alice""#, r#""user":"carol""#),
            &wire,
        )
        .unwrap_err();
    assert!(matches!(err, Refusal::CertSignature(_)), "{err}");
    // A request signed by another key than the certified one.
    let forged = sign(EXEC_REQUEST_TYPE, &sample().to_body(), &key(4));
    let err = w.run(&alice_cert(), &forged).unwrap_err();
    assert!(matches!(err, Refusal::WrongUserKey { .. }), "{err}");
    // A request for another principal than the certificate's.
    let mut r = sample();
    r.principal = "bob@EXAMPLE.ORG".into();
    let err = w.run(&alice_cert(), &signed(&r)).unwrap_err();
    assert!(matches!(err, Refusal::PrincipalMismatch { .. }), "{err}");
    assert!(w.cache.entries.is_empty());
}

#[test]
fn node_attestations_only_when_imp_toml_accepts_them() {
    let wire = signed(&sample());
    let att = cert_for("alice", CertKind::NodeAttestation, &node());
    World::new().run(&att, &wire).unwrap();
    let off = CONFIG.replace("accept = true", "accept = false");
    let err = World::with(&off).run(&att, &wire).unwrap_err();
    assert!(
        matches!(err, Refusal::IssuerKind { .. } | Refusal::UnknownIssuer(_)),
        "{err}"
    );
    // A CA key may not sign as a node either unless listed as a node.
    let err = World::new()
        .run(&cert_for("alice", CertKind::NodeAttestation, &ca()), &wire)
        .unwrap_err();
    assert!(matches!(err, Refusal::IssuerKind { .. }), "{err}");
}

#[test]
fn users_not_allowed_and_root_are_refused() {
    let wire = signed(&sample());
    let cases = [
        ("bob", "not allowed by imp.toml"),
        ("root", "root is always refused"),
        ("toor", "root is always refused"),
        ("mallory", "root is always refused"),
        ("ghost", "has no account"),
    ];
    for (user, msg) in cases {
        let mut w = World::new();
        let err = w
            .run(&cert_for(user, CertKind::Ca, &ca()), &wire)
            .unwrap_err();
        assert!(err.to_string().contains(msg), "{user}: {err}");
    }
    // carol is allowed through group hpc.
    let mut w = World::new();
    let a = w
        .run(&cert_for("carol", CertKind::Ca, &ca()), &wire)
        .unwrap();
    assert_eq!(a.account.uid, 1002);
}

#[test]
fn commands_are_looked_up_and_allowlisted() {
    let mut r = sample();
    r.argv[0] = "bin/id".into();
    let err = World::new().run(&alice_cert(), &signed(&r)).unwrap_err();
    assert!(matches!(err, Refusal::RelativeCommand(_)), "{err}");
    r.argv[0] = "nosuch".into();
    let err = World::new().run(&alice_cert(), &signed(&r)).unwrap_err();
    assert!(matches!(err, Refusal::CommandNotFound { .. }), "{err}");

    let listed = CONFIG.replace(
        "max_request_lifetime = 600",
        "max_request_lifetime = 600\ncommands = [\"/bin/true\"]",
    );
    let err = World::with(&listed)
        .run(&alice_cert(), &signed(&sample()))
        .unwrap_err();
    assert!(matches!(err, Refusal::CommandNotAllowed { .. }), "{err}");
    let mut r = sample();
    r.argv[0] = "/bin/true".into();
    World::with(&listed)
        .run(&alice_cert(), &signed(&r))
        .unwrap();
    // A per-user list replaces the global one.
    let per_user = format!("{listed}[user_commands]\nalice = [\"/usr/bin/id\"]\n");
    World::with(&per_user)
        .run(&alice_cert(), &signed(&sample()))
        .unwrap();
}

#[test]
fn malformed_envelopes_are_refused() {
    let wire = signed(&sample());
    let mut w = World::new();
    let err = w.run(b"not json", &wire).unwrap_err();
    assert!(matches!(err, Refusal::CertEnvelope(_)), "{err}");
    assert!(
        err.to_string()
            .starts_with("certificate: malformed envelope"),
        "{err}"
    );
    let err = w.run(&alice_cert(), b"{\"payloadType\":1}").unwrap_err();
    assert!(matches!(err, Refusal::RequestEnvelope(_)), "{err}");
    // A well-signed body that is not a request.
    let junk = sign(EXEC_REQUEST_TYPE, b"{\"v\":1}", &alice_key());
    let err = w.run(&alice_cert(), &junk).unwrap_err();
    assert!(matches!(err, Refusal::Request(_)), "{err}");
    // A certificate sent as the request.
    let err = w.run(&alice_cert(), &alice_cert()).unwrap_err();
    assert!(matches!(err, Refusal::WrongUserKey { .. }), "{err}");
}

#[test]
fn checks_run_in_the_issue_order() {
    // Wrong rank and expired: the audience (2) is reported before expiry (3).
    let mut w = World::new();
    w.target.rank = 9;
    w.now = sample().not_after + 1;
    assert!(matches!(
        w.run(&alice_cert(), &signed(&sample())),
        Err(Refusal::RankNotInRequest { .. })
    ));
    // Expired and replayed: expiry (3) before the nonce (4).
    let mut w = World::new();
    w.run(&alice_cert(), &signed(&sample())).unwrap();
    w.now = sample().not_after;
    assert!(matches!(
        w.run(&alice_cert(), &signed(&sample())),
        Err(Refusal::Expired { .. })
    ));
    // Replayed and user not allowed: the nonce (4) before the user (5).
    let mut w = World::new();
    let bob = cert_for("bob", CertKind::Ca, &ca());
    assert!(matches!(
        w.run(&bob, &signed(&sample())),
        Err(Refusal::UserNotAllowed(_))
    ));
    assert!(matches!(
        w.run(&bob, &signed(&sample())),
        Err(Refusal::Replay(_))
    ));
}
