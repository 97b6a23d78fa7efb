//! The handler against real libzmq sockets over CURVE on loopback TCP.
//!
//! Every wait is bounded; every socket has linger 0 and is declared after
//! the Context and the handle, so it is dropped first.

use std::sync::Arc;
use std::time::{Duration, Instant};

use canopy_proto::Roles;
use canopy_zap::codec::{curve_principal, parse_request, ZapReply};
use canopy_zap::{
    AuthRequest, Decision, KeySetPolicy, Mechanism, Policy, ZapError, ZapHandler, ZAP_ENDPOINT,
};

mod common;
use common::*;

#[test]
fn curve_is_available() {
    require_curve();
    canopy_zap::require_curve().unwrap();
}

#[test]
fn rep_socket_receives_frames_from_version_on() {
    // Documents exactly what libzmq 4.3.4 delivers to a REP socket at the
    // ZAP endpoint, and that ZapReply::encode is what it expects back.
    require_curve();
    let ctx = zmq::Context::new();
    let rep = ctx.socket(zmq::REP).unwrap();
    rep.set_linger(0).unwrap();
    rep.bind(ZAP_ENDPOINT).unwrap();
    let skeys = keypair();
    let ckeys = keypair();
    let (srv, ep) = server(&ctx, &skeys);
    let _cli = client(&ctx, &ep, &skeys.public_key, Some(&ckeys));

    assert_eq!(
        rep.poll(zmq::POLLIN, PATIENCE.as_millis() as i64).unwrap(),
        1
    );
    let frames = rep.recv_multipart(0).unwrap();
    let expected: Vec<Vec<u8>> = vec![
        b"1.0".to_vec(),
        b"1".to_vec(),
        b"canopy".to_vec(),
        b"127.0.0.1".to_vec(),
        Vec::new(),
        b"CURVE".to_vec(),
        ckeys.public_key.to_vec(),
    ];
    assert_eq!(frames, expected);
    let req = parse_request(&frames).unwrap();
    let principal = curve_principal(&ckeys.public_key).unwrap();
    assert_eq!(req.principal().as_deref(), Some(principal.as_str()));

    let reply = ZapReply::allow(
        req.request_id,
        principal.clone(),
        vec![("Roles".into(), b"user".to_vec())],
    );
    rep.send_multipart(reply.encode(), 0).unwrap();
    let mut msg = recv_within(&srv, PATIENCE).expect("admitted message");
    assert_eq!(msg[1].as_str(), Some("hello"));
    assert_eq!(msg[1].gets("User-Id"), Some(principal.as_str()));
    assert_eq!(msg[1].gets("Roles"), Some("user"));
}

#[test]
fn libzmq_fails_open_without_a_handler() {
    // Why ZapHandle::alive matters: with a ZAP domain but no handler bound,
    // libzmq admits an arbitrary key.
    require_curve();
    let ctx = zmq::Context::new();
    let skeys = keypair();
    let (srv, ep) = server(&ctx, &skeys);
    let _cli = client(&ctx, &ep, &skeys.public_key, Some(&keypair()));
    assert!(
        recv_within(&srv, PATIENCE).is_some(),
        "libzmq no longer fails open?"
    );
}

#[test]
fn allowed_key_gets_user_id_and_roles() {
    require_curve();
    let ctx = zmq::Context::new();
    let ckeys = keypair();
    let principal = curve_principal(&ckeys.public_key).unwrap();
    assert_eq!(
        principal,
        format!("curve:{}", zmq::z85_encode(&ckeys.public_key).unwrap())
    );
    let keys = Arc::new(KeySetPolicy::new());
    keys.insert(principal.clone(), "node1", Roles::PEER.union(Roles::USER));
    let zap = ZapHandler::start(&ctx, keys).unwrap();
    assert!(zap.alive());
    let skeys = keypair();
    let (srv, ep) = server(&ctx, &skeys);
    let _cli = client(&ctx, &ep, &skeys.public_key, Some(&ckeys));

    let mut msg = recv_within(&srv, PATIENCE).expect("allowed client's message");
    assert_eq!(msg.len(), 2);
    assert_eq!(msg[1].as_str(), Some("hello"));
    assert_eq!(msg[1].gets("User-Id"), Some(principal.as_str()));
    assert_eq!(msg[1].gets("Roles"), Some("peer,user"));
    // The routing-id frame that ROUTER prepends carries no metadata; only
    // the frames that came over the wire do.
    assert_eq!(msg[0].gets("User-Id"), None);
    let stats = zap.stats();
    assert_eq!((stats.allowed, stats.denied, stats.malformed), (1, 0, 0));
    assert!(zap.alive());
}

#[test]
fn unknown_key_is_denied() {
    require_curve();
    let ctx = zmq::Context::new();
    let keys = Arc::new(KeySetPolicy::new());
    keys.insert(
        curve_principal(&keypair().public_key).unwrap(),
        "other",
        Roles::USER,
    );
    let zap = ZapHandler::start(&ctx, keys).unwrap();
    let skeys = keypair();
    let (srv, ep) = server(&ctx, &skeys);
    let _cli = client(&ctx, &ep, &skeys.public_key, Some(&keypair()));

    assert!(
        recv_within(&srv, QUIET).is_none(),
        "unknown key got through"
    );
    assert!(wait_until(|| zap.stats().denied >= 1), "no deny counted");
    assert_eq!(zap.stats().allowed, 0);
    assert!(zap.alive());
}

#[test]
fn null_mechanism_client_is_refused() {
    require_curve();
    let ctx = zmq::Context::new();
    let keys = Arc::new(KeySetPolicy::new());
    let zap = ZapHandler::start(&ctx, keys).unwrap();
    let skeys = keypair();
    let (srv, ep) = server(&ctx, &skeys);
    let _cli = client(&ctx, &ep, &skeys.public_key, None);

    assert!(
        recv_within(&srv, QUIET).is_none(),
        "NULL client got through"
    );
    assert_eq!(zap.stats().allowed, 0);
    assert!(zap.alive());
}

#[test]
fn key_set_changes_apply_while_running() {
    require_curve();
    let ctx = zmq::Context::new();
    let keys = Arc::new(KeySetPolicy::new());
    let zap = ZapHandler::start(&ctx, keys.clone()).unwrap();
    let skeys = keypair();
    let (srv, ep) = server(&ctx, &skeys);
    let ckeys = keypair();
    let principal = curve_principal(&ckeys.public_key).unwrap();

    // Empty set: denied.
    let c1 = client(&ctx, &ep, &skeys.public_key, Some(&ckeys));
    assert!(recv_within(&srv, QUIET).is_none());
    assert!(wait_until(|| zap.stats().denied == 1));
    drop(c1);

    // Inserted: admitted.
    keys.insert(principal.clone(), "late", Roles::OPERATOR);
    let c2 = client(&ctx, &ep, &skeys.public_key, Some(&ckeys));
    let mut msg = recv_within(&srv, PATIENCE).expect("admitted after insert");
    assert_eq!(msg[1].gets("User-Id"), Some(principal.as_str()));
    assert_eq!(msg[1].gets("Roles"), Some("operator"));
    drop(c2);

    // Replaced by another set: denied again.
    keys.replace_all([("curve:someoneelse", "x", Roles::USER)]);
    let _c3 = client(&ctx, &ep, &skeys.public_key, Some(&ckeys));
    assert!(recv_within(&srv, QUIET).is_none());
    assert!(wait_until(|| zap.stats().denied == 2));
    assert_eq!(zap.stats().allowed, 1);
}

#[test]
fn second_handler_in_same_context_is_refused() {
    require_curve();
    let ctx = zmq::Context::new();
    let first = ZapHandler::start(&ctx, Arc::new(KeySetPolicy::new())).unwrap();
    let err = ZapHandler::start(&ctx, Arc::new(KeySetPolicy::new())).unwrap_err();
    assert!(matches!(err, ZapError::Bind { .. }), "{err}");
    assert!(err.to_string().contains("one zap handler per zmq context"));
    assert!(first.alive());
    // A handler in another context is independent.
    let other = zmq::Context::new();
    let h = ZapHandler::start(&other, Arc::new(KeySetPolicy::new())).unwrap();
    h.stop();
}

#[test]
fn stop_clears_alive_and_releases_the_endpoint() {
    require_curve();
    let ctx = zmq::Context::new();
    let zap = ZapHandler::start(&ctx, Arc::new(KeySetPolicy::new())).unwrap();
    let watch = zap.watch();
    assert!(zap.alive() && watch.alive());
    let t = Instant::now();
    zap.stop();
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "stop took {:?}",
        t.elapsed()
    );
    assert!(!watch.alive());
    // The endpoint is free again, so the sockets really closed. libzmq's
    // reaper unregisters an inproc endpoint asynchronously after close, so
    // a rebind may fail for a moment.
    let mut again = None;
    assert!(wait_until(|| {
        again = ZapHandler::start(&ctx, Arc::new(KeySetPolicy::new())).ok();
        again.is_some()
    }));
    let again = again.unwrap();
    let w2 = again.watch();
    drop(again);
    assert!(!w2.alive());
    // And the Context can be dropped without blocking.
    drop(ctx);
}

struct PanicPolicy;

impl Policy for PanicPolicy {
    fn decide(&self, _req: &AuthRequest<'_>) -> Decision {
        panic!("test policy panics on purpose");
    }
}

#[test]
fn panicking_policy_clears_alive_and_fails_closed() {
    require_curve();
    let ctx = zmq::Context::new();
    let zap = ZapHandler::start(&ctx, Arc::new(PanicPolicy)).unwrap();
    let watch = zap.watch();
    let skeys = keypair();
    let (srv, ep) = server(&ctx, &skeys);
    let _c1 = client(&ctx, &ep, &skeys.public_key, Some(&keypair()));

    assert!(
        wait_until(|| !zap.alive()),
        "alive() still true after a panic"
    );
    assert!(
        recv_within(&srv, QUIET).is_none(),
        "peer admitted despite panic"
    );
    // While the handle is held, later peers are refused too (no fail-open).
    let _c2 = client(&ctx, &ep, &skeys.public_key, Some(&keypair()));
    assert!(
        recv_within(&srv, QUIET).is_none(),
        "peer admitted after panic"
    );
    assert!(wait_until(|| zap.stats().denied >= 2));
    assert!(!watch.alive());
    zap.stop();
    assert!(!watch.alive());
}

/// A tracing writer into a shared buffer.
#[test]
fn mechanism_display_names() {
    let names: Vec<String> = [
        Mechanism::Null,
        Mechanism::Plain,
        Mechanism::Curve,
        Mechanism::Gssapi,
    ]
    .iter()
    .map(ToString::to_string)
    .collect();
    assert_eq!(names, ["NULL", "PLAIN", "CURVE", "GSSAPI"]);
}

#[test]
fn handler_answers_malformed_requests() {
    require_curve();
    let ctx = zmq::Context::new();
    let zap = ZapHandler::start(&ctx, Arc::new(KeySetPolicy::new())).unwrap();
    let req = ctx.socket(zmq::REQ).unwrap();
    req.set_linger(0).unwrap();
    req.set_rcvtimeo(PATIENCE.as_millis() as i32).unwrap();
    req.connect(ZAP_ENDPOINT).unwrap();
    // (request frames, expected status, expected request id)
    type Case<'a> = (Vec<&'a [u8]>, &'a [u8], &'a [u8]);
    let cases: Vec<Case> = vec![
        (vec![b"2.0", b"7"], b"400", b"7"),
        (vec![b"1.0"], b"500", b""),
        (
            vec![b"1.0", b"8", b"d", b"1.2.3.4", b"", b"CURVE", b"short"],
            b"500",
            b"8",
        ),
        (vec![b"\xff\xfe"], b"400", b""),
    ];
    for (frames, status, id) in &cases {
        req.send_multipart(frames.iter(), 0).unwrap();
        let reply = req
            .recv_multipart(0)
            .expect("a reply to a malformed request");
        assert_eq!(reply.len(), 6);
        assert_eq!(reply[0], b"1.0");
        assert_eq!(&reply[1], id);
        assert_eq!(&reply[2], status);
        assert!(reply[4].is_empty(), "no user id on error");
    }
    assert_eq!(zap.stats().malformed, cases.len() as u64);
    // A well-formed NULL request is denied by the key set (no principal).
    req.send_multipart(
        [&b"1.0"[..], b"9", b"d", b"1.2.3.4", b"", b"NULL"].iter(),
        0,
    )
    .unwrap();
    let reply = req.recv_multipart(0).unwrap();
    assert_eq!(reply[2], b"400");
    assert_eq!(zap.stats().denied, 1);
    assert!(zap.alive());
}
