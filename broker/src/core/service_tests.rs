//! Services offered by clients, on a simulated clock (docs/protocol.md
//! §6.1): routing to the provider and back, roles per method and per
//! namespace, the end of a registration, bounds and bad input.

use super::sim::*;
use super::*;
use canopy_proto::NODEID_ANY;

const KVS: &[u8] = br#"{"namespace":"kvs","methods":{"get":"user","put":"operator"}}"#;

/// A test rule: principal, roles everywhere, scoped roles, register.
type Rule = (
    &'static str,
    Roles,
    &'static [(&'static str, Roles)],
    &'static [&'static str],
);

fn grants(rules: &'static [Rule]) -> Policy {
    Box::new(move |s: &Subject| {
        let p = s.principal.clone().unwrap_or_default();
        if p.starts_with("curve:") {
            return Ok((p, Grant::plain(Roles::PEER)));
        }
        match rules.iter().find(|(n, ..)| *n == p) {
            Some((_, r, scoped, register)) => Ok((
                p,
                Grant {
                    roles: *r,
                    scoped: scoped.iter().map(|(t, r)| (t.to_string(), *r)).collect(),
                    register: register.iter().map(|x| x.to_string()).collect(),
                },
            )),
            None => Err((p, "no rule grants a role".into())),
        }
    })
}

fn one(s: &Sim, rank: u32, id: u32, tag: u32) -> Got {
    let r = s.responses(rank, id, tag);
    assert_eq!(r.len(), 1, "exactly one response to tag {tag}: {r:?}");
    r[0].clone()
}

fn text(g: &Got) -> String {
    String::from_utf8_lossy(&g.payload).into_owned()
}

/// A 7-rank binary tree with the owner offering `kvs` on rank 3.
fn with_kvs() -> (Sim, u32) {
    let mut s = Sim::new(7, 2);
    s.policy = grants(&[("unix:u2000", Roles::USER, &[], &[])]);
    s.run_for(50);
    assert!(s.full());
    let p = s.connect(3, OWNER_UID);
    let t = s.request(3, p, "service.add", NODEID_ANY, KVS);
    s.settle();
    let r = one(&s, 3, p, t);
    assert_eq!(r.header.errnum, 0, "{}", text(&r));
    assert_eq!(text(&r), r#"{"namespace":"kvs","rank":3}"#);
    (s, p)
}

#[test]
fn a_request_reaches_the_provider_and_its_answer_the_caller() {
    let (mut s, p) = with_kvs();
    let caller = s.connect(0, 2000);
    s.run_for(5);
    let t = s.request(0, caller, "kvs.get", 3, b"k1");
    s.settle();
    let got = s.requests(3, p);
    assert_eq!(got.len(), 1);
    let d = &got[0].header;
    assert_eq!(
        (d.topic.as_str(), d.userid.as_str()),
        ("kvs.get", "unix:u2000")
    );
    assert_eq!(d.roles, Roles::USER);
    assert!(d.route.is_empty(), "the provider sees no route");
    assert_ne!(d.matchtag, 0);
    assert_eq!(got[0].payload, b"k1");
    s.answer(3, p, d.matchtag, 0, b"v1");
    s.settle();
    let r = one(&s, 0, caller, t);
    assert_eq!((r.header.errnum, r.header.nodeid), (0, 3));
    assert_eq!(r.payload, b"v1");
    // Its own errnum and message reach the caller too.
    let t2 = s.request(0, caller, "kvs.get", 3, b"missing");
    s.settle();
    let d2 = s.requests(3, p).last().unwrap().header.clone();
    s.answer(3, p, d2.matchtag, errno::ENOENT, b"no such key: missing");
    s.settle();
    let r2 = one(&s, 0, caller, t2);
    assert_eq!(r2.header.errnum, errno::ENOENT);
    assert_eq!(text(&r2), "no such key: missing");
}

#[test]
fn any_goes_to_the_nearest_provider_upstream() {
    let (mut s, p) = with_kvs();
    // From rank 3 itself, ANY is served there.
    let c3 = s.connect(3, OWNER_UID);
    let t = s.request(3, c3, "kvs.get", NODEID_ANY, b"x");
    s.settle();
    assert_eq!(s.requests(3, p).len(), 1);
    assert!(s.responses(3, c3, t).is_empty(), "waiting for the provider");
    // From rank 1 (rank 3's parent), ANY goes up to rank 0: nobody offers
    // kvs upstream, so ENOSYS.
    let c1 = s.connect(1, OWNER_UID);
    let t1 = s.request(1, c1, "kvs.get", NODEID_ANY, b"x");
    s.settle();
    let r = one(&s, 1, c1, t1);
    assert_eq!(r.header.errnum, errno::ENOSYS);
    assert!(
        text(&r).contains("no service offers 'kvs.get'"),
        "{}",
        text(&r)
    );
}

#[test]
fn methods_not_declared_get_enosys_and_roles_are_checked_before_delivery() {
    let (mut s, p) = with_kvs();
    let caller = s.connect(0, 2000);
    s.run_for(5);
    let t = s.request(0, caller, "kvs.drop", 3, b"");
    let t2 = s.request(0, caller, "kvs.put", 3, b"k=v");
    s.settle();
    let r = one(&s, 0, caller, t);
    assert_eq!(r.header.errnum, errno::ENOSYS);
    assert!(
        text(&r).contains("has no method 'drop'; it offers get, put"),
        "{}",
        text(&r)
    );
    let r2 = one(&s, 0, caller, t2);
    assert_eq!(r2.header.errnum, errno::EPERM);
    assert!(
        text(&r2).contains("kvs.put requires role 'operator' in namespace 'kvs'"),
        "{}",
        text(&r2)
    );
    assert!(s.requests(3, p).is_empty(), "the provider saw nothing");
}

#[test]
fn a_scoped_operator_is_operator_on_its_namespace_only() {
    let mut s = Sim::new(3, 2);
    s.policy = grants(&[(
        "unix:u2000",
        Roles::USER,
        &[("backup.*", Roles::OPERATOR)],
        &[],
    )]);
    s.run_for(50);
    let owner = s.connect(2, OWNER_UID);
    for body in [
        &br#"{"namespace":"backup","methods":{"start":"operator"}}"#[..],
        &br#"{"namespace":"job","methods":{"cancel":"operator"}}"#[..],
    ] {
        let t = s.request(2, owner, "service.add", NODEID_ANY, body);
        s.settle();
        assert_eq!(one(&s, 2, owner, t).header.errnum, 0);
    }
    let alice = s.connect(0, 2000);
    s.run_for(5);
    let ok = s.request(0, alice, "backup.start", 2, b"");
    let no = s.request(0, alice, "job.cancel", 2, b"");
    s.settle();
    let d = s.requests(2, owner);
    assert_eq!(d.len(), 1, "only backup.start is delivered");
    assert_eq!(d[0].header.topic, "backup.start");
    assert!(d[0].header.roles.satisfies(Roles::OPERATOR));
    assert!(s.responses(0, alice, ok).is_empty());
    let r = one(&s, 0, alice, no);
    assert_eq!(r.header.errnum, errno::EPERM);
    assert!(text(&r).contains("job.cancel requires role 'operator' in namespace 'job'; principal unix:u2000 has roles 'user' there"), "{}", text(&r));
    // Built-in operator topics stay out of reach.
    let pubt = s.publish(0, alice, "job.done", b"");
    s.settle();
    assert_eq!(one(&s, 0, alice, pubt).header.errnum, errno::EPERM);
}

#[test]
fn a_provider_that_goes_away_fails_every_waiting_caller_at_once() {
    let (mut s, p) = with_kvs();
    let caller = s.connect(0, 2000);
    s.run_for(5);
    let tags: Vec<u32> = (0..5)
        .map(|_| s.request(0, caller, "kvs.get", 3, b"k"))
        .collect();
    s.settle();
    assert_eq!(s.requests(3, p).len(), 5);
    let now = s.now;
    s.nodes[3].core.handle(now, Input::ClientClosed { id: p });
    s.settle();
    for t in tags {
        let r = one(&s, 0, caller, t);
        assert_eq!(r.header.errnum, errno::ENOSYS);
        assert!(
            text(&r).contains("service kvs on rank 3 went away"),
            "{}",
            text(&r)
        );
    }
    let later = s.request(0, caller, "kvs.get", 3, b"k");
    s.settle();
    let r = one(&s, 0, caller, later);
    assert_eq!(r.header.errnum, errno::ENOSYS);
    // The namespace is free again.
    let p2 = s.connect(3, OWNER_UID);
    let t = s.request(3, p2, "service.add", NODEID_ANY, KVS);
    s.settle();
    assert_eq!(one(&s, 3, p2, t).header.errnum, 0);
}

#[test]
fn service_remove_answers_what_waits_and_frees_the_name() {
    let (mut s, p) = with_kvs();
    let caller = s.connect(0, 2000);
    s.run_for(5);
    let t = s.request(0, caller, "kvs.get", 3, b"k");
    s.settle();
    let other = s.connect(3, OWNER_UID);
    let not_mine = s.request(
        3,
        other,
        "service.remove",
        NODEID_ANY,
        br#"{"namespace":"kvs"}"#,
    );
    let rm = s.request(
        3,
        p,
        "service.remove",
        NODEID_ANY,
        br#"{"namespace":"kvs"}"#,
    );
    s.settle();
    assert_eq!(one(&s, 3, other, not_mine).header.errnum, errno::ENOENT);
    let r = one(&s, 3, p, rm);
    assert_eq!(text(&r), r#"{"failed":1,"namespace":"kvs"}"#);
    assert_eq!(one(&s, 0, caller, t).header.errnum, errno::ENOSYS);
}

#[test]
fn registrations_are_refused_clearly() {
    let (mut s, _p) = with_kvs();
    let owner = s.connect(3, OWNER_UID);
    let dup = s.request(3, owner, "service.add", NODEID_ANY, KVS);
    let reserved = s.request(
        3,
        owner,
        "service.add",
        NODEID_ANY,
        br#"{"namespace":"broker","methods":{"x":"user"}}"#,
    );
    let junk = s.request(3, owner, "service.add", NODEID_ANY, b"{\"namespace\":");
    let elsewhere = s.request(3, owner, "service.add", 0, KVS);
    s.settle();
    let r = one(&s, 3, owner, dup);
    assert_eq!(r.header.errnum, errno::EEXIST);
    assert!(
        text(&r).contains("already offered on rank 3 by unix:"),
        "{}",
        text(&r)
    );
    assert_eq!(one(&s, 3, owner, reserved).header.errnum, errno::EPERM);
    assert_eq!(one(&s, 3, owner, junk).header.errnum, errno::EPROTO);
    let r = one(&s, 3, owner, elsewhere);
    assert_eq!(r.header.errnum, errno::EINVAL);
    assert!(text(&r).contains("the broker you are connected to"));
    // A user without a register grant.
    let user = s.connect(3, 2000);
    s.run_for(5);
    let t = s.request(
        3,
        user,
        "service.add",
        NODEID_ANY,
        br#"{"namespace":"mine","methods":{"x":"user"}}"#,
    );
    s.settle();
    let r = one(&s, 3, user, t);
    assert_eq!(r.header.errnum, errno::EPERM);
    assert!(
        text(&r).contains("may not register namespace \"mine\""),
        "{}",
        text(&r)
    );
}

#[test]
fn a_register_grant_lets_a_user_offer_and_a_reload_that_drops_it_ends_the_service() {
    let mut s = Sim::new(2, 2);
    s.policy = grants(&[
        ("unix:u2000", Roles::USER, &[], &["backup*"]),
        ("unix:u3000", Roles::USER, &[], &[]),
    ]);
    s.run_for(50);
    let prov = s.connect(1, 2000);
    s.run_for(5);
    let t = s.request(
        1,
        prov,
        "service.add",
        NODEID_ANY,
        br#"{"namespace":"backup","methods":{"start":"user"}}"#,
    );
    s.settle();
    assert_eq!(one(&s, 1, prov, t).header.errnum, 0);
    let caller = s.connect(0, 3000);
    s.run_for(5);
    let c = s.request(0, caller, "backup.start", 1, b"");
    s.settle();
    assert_eq!(s.requests(1, prov).len(), 1);
    // The grant to register goes; the provider keeps its connection but
    // not its service, and the waiting caller is answered.
    s.policy = grants(&[
        ("unix:u2000", Roles::USER, &[], &[]),
        ("unix:u3000", Roles::USER, &[], &[]),
    ]);
    s.nodes[1].core.handle(s.now, Input::Hangup);
    s.run_for(10);
    let r = one(&s, 0, caller, c);
    assert_eq!(r.header.errnum, errno::ENOSYS);
    assert!(!s.closed.contains(&(1, prov)));
    let again = s.request(0, caller, "backup.start", 1, b"");
    s.settle();
    assert_eq!(one(&s, 0, caller, again).header.errnum, errno::ENOSYS);
}

#[test]
fn a_provider_can_answer_only_what_it_was_given() {
    let (mut s, p) = with_kvs();
    let caller = s.connect(0, 2000);
    s.run_for(5);
    let t = s.request(0, caller, "kvs.get", 3, b"k");
    s.settle();
    let token = s.requests(3, p)[0].header.matchtag;
    s.answer(3, p, token.wrapping_add(7), 0, b"forged");
    s.settle();
    let err: Vec<Got> = s
        .got(3, p)
        .into_iter()
        .filter(|g| g.header.topic == provided::SERVICE_ERROR_TOPIC)
        .collect();
    assert_eq!(err.len(), 1);
    assert_eq!(err[0].header.errnum, errno::ENOENT);
    assert!(
        s.responses(0, caller, t).is_empty(),
        "the caller got nothing forged"
    );
    s.answer(3, p, token, 0, b"real");
    s.answer(3, p, token, 0, b"twice");
    s.settle();
    let r = one(&s, 0, caller, t);
    assert_eq!(r.payload, b"real");
    // A caller elsewhere cannot answer for the provider either: only the
    // connection the request was delivered to.
    let intruder = s.connect(3, OWNER_UID);
    let t2 = s.request(0, caller, "kvs.get", 3, b"k2");
    s.settle();
    let token2 = s.requests(3, p).last().unwrap().header.matchtag;
    s.answer(3, intruder, token2, 0, b"forged");
    s.settle();
    assert!(s.responses(0, caller, t2).is_empty());
}

#[test]
fn a_provider_that_never_answers_holds_at_most_its_budget() {
    let budgets = Budgets {
        in_flight: 8,
        ..Budgets::default()
    };
    let mut s = Sim::with_budgets(2, 2, budgets);
    s.run_for(50);
    let p = s.connect(1, OWNER_UID);
    let t = s.request(1, p, "service.add", NODEID_ANY, KVS);
    s.settle();
    assert_eq!(one(&s, 1, p, t).header.errnum, 0);
    let mut refused = 0;
    for _ in 0..4 {
        let c = s.connect(0, OWNER_UID);
        let tags: Vec<u32> = (0..4)
            .map(|_| s.request(0, c, "kvs.get", 1, b"k"))
            .collect();
        s.settle();
        for t in tags {
            match s.responses(0, c, t).as_slice() {
                [] => {}
                [r] if r.header.errnum == errno::EAGAIN => refused += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    assert_eq!(s.requests(1, p).len(), 8);
    assert_eq!(refused, 8);
}

#[test]
fn a_provider_publishes_in_its_own_namespace_only() {
    let mut s = Sim::new(2, 2);
    s.policy = grants(&[("unix:u2000", Roles::USER, &[], &["kvs"])]);
    s.run_for(50);
    let prov = s.connect(1, 2000);
    s.run_for(5);
    let t = s.request(1, prov, "service.add", NODEID_ANY, KVS);
    s.settle();
    assert_eq!(one(&s, 1, prov, t).header.errnum, 0);
    let own = s.publish(1, prov, "kvs.changed", b"k");
    let other = s.publish(1, prov, "job.done", b"k");
    s.settle();
    assert_eq!(one(&s, 1, prov, own).header.errnum, 0);
    assert_eq!(one(&s, 1, prov, other).header.errnum, errno::EPERM);
}

#[test]
fn service_list_shows_built_in_and_offered_namespaces() {
    let (mut s, _p) = with_kvs();
    let c = s.connect(0, OWNER_UID);
    let t = s.request(0, c, "service.list", 3, b"");
    s.settle();
    let r = one(&s, 0, c, t);
    let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
    assert_eq!(v["rank"], 3);
    let list = v["services"].as_array().unwrap();
    let kvs = list.iter().find(|x| x["namespace"] == "kvs").unwrap();
    assert_eq!(kvs["provider"], "unix:owner");
    assert_eq!(kvs["methods"]["put"], "operator");
    let broker = list.iter().find(|x| x["namespace"] == "broker").unwrap();
    assert_eq!(broker["provider"], "broker");
    assert_eq!(broker["methods"]["ping"], "user");
    // event.pub is served by rank 0 only.
    let event = list.iter().find(|x| x["namespace"] == "event").unwrap();
    assert!(event["methods"].get("pub").is_none());
}

#[test]
fn a_remote_provider_holding_requests_is_probed_and_its_loss_fails_them() {
    let mut s = Sim::new(2, 2);
    s.run_for(50);
    let rid = vec![9u8];
    let remote = |s: &mut Sim, topic: &str, tag: u32, body: &[u8]| {
        let now = s.now;
        s.nodes[0].core.handle(
            now,
            Input::Remote {
                rid: vec![9u8],
                user_id: "curve:prov".into(),
                grant: Grant {
                    roles: Roles::USER,
                    scoped: Vec::new(),
                    register: vec!["kvs".into()],
                },
                address: "10.0.0.9".into(),
                header: Header::request(topic, NODEID_ANY, tag),
                payload: body.to_vec(),
            },
        );
        s.settle();
    };
    remote(&mut s, "service.add", 1, KVS);
    let added = s.remote_inbox.last().unwrap().1.clone();
    assert_eq!(added.header.errnum, 0, "{}", text(&added));
    let caller = s.connect(0, OWNER_UID);
    let t = s.request(0, caller, "kvs.get", 0, b"k");
    s.settle();
    assert_eq!(s.remote_inbox.last().unwrap().1.header.topic, "kvs.get");
    // While it holds the request, the provider is probed.
    s.run_for(provided::PROVIDER_PROBE_MS + 50);
    let probes = s
        .remote_inbox
        .iter()
        .filter(|(r, g)| *r == rid && g.header.msg_type == MsgType::Control)
        .count();
    assert!(probes >= 1, "no probe: {:?}", s.remote_inbox);
    assert!(s.responses(0, caller, t).is_empty());
    // A probe's send fails: the connection is gone, and so is the service.
    let now = s.now;
    s.nodes[0]
        .core
        .handle(now, Input::RemoteGone { rid: rid.clone() });
    s.settle();
    let r = one(&s, 0, caller, t);
    assert_eq!(r.header.errnum, errno::ENOSYS, "{}", text(&r));
    // Nothing held: no more probes.
    let before = s.remote_inbox.len();
    s.run_for(3 * provided::PROVIDER_PROBE_MS);
    assert_eq!(s.remote_inbox.len(), before);
}
