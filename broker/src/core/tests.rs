//! The core's scenarios on a simulated clock: no sockets, no threads.

use super::sim::*;
use super::*;
use canopy_proto::NODEID_ANY;

fn ok_once(s: &Sim, rank: u32, id: u32, tag: u32) -> Got {
    let r = s.responses(rank, id, tag);
    assert_eq!(r.len(), 1, "exactly one response to tag {tag}: {r:?}");
    assert_eq!(
        r[0].header.errnum,
        0,
        "{}",
        String::from_utf8_lossy(&r[0].payload)
    );
    r[0].clone()
}

fn allow(rules: &'static [(&'static str, Roles)]) -> Policy {
    Box::new(move |s: &Subject| {
        let p = s.principal.clone().unwrap_or_default();
        if p.starts_with("curve:") {
            return Ok((p, Grant::plain(Roles::PEER)));
        }
        match rules.iter().find(|(n, _)| *n == p) {
            Some((_, r)) => Ok((p, Grant::plain(*r))),
            None => Err((p, "no rule grants a role".into())),
        }
    })
}

#[test]
fn a_tree_joins_and_every_rank_answers() {
    let mut s = Sim::new(7, 2);
    s.run_for(50);
    assert!(s.full(), "every rank online");
    let c = s.connect(0, OWNER_UID);
    for r in 0..7 {
        let t = s.request(0, c, "broker.ping", r, b"x");
        s.settle();
        assert_eq!(ok_once(&s, 0, c, t).payload, b"x");
    }
    let t = s.request(0, c, "broker.ping", 9, b"");
    s.settle();
    assert_eq!(s.responses(0, c, t)[0].header.errnum, errno::EHOSTUNREACH);
    let t = s.request(0, c, "no.such", 3, b"");
    s.settle();
    assert_eq!(s.responses(0, c, t)[0].header.errnum, errno::ENOSYS);
}

#[test]
fn a_rejoining_child_gets_the_events_it_missed_in_order() {
    let mut s = Sim::new(3, 1); // 0 - 1 - 2
    s.run_for(50);
    let publisher = s.connect(0, OWNER_UID);
    let sub = s.connect(2, OWNER_UID);
    let t = s.request(2, sub, "event.subscribe", NODEID_ANY, b"job.*");
    s.settle();
    ok_once(&s, 2, sub, t);
    for i in 0..3 {
        s.publish(0, publisher, "job.x", &[i]);
    }
    s.settle();
    assert_eq!(s.events(2, sub).len(), 3);
    // The link 1-2 breaks; two events are published meanwhile.
    s.cut.insert(2);
    for i in 3..5 {
        s.publish(0, publisher, "job.x", &[i]);
    }
    s.run_for(300);
    assert!(!s.nodes[2].core.joined(), "rank 2 noticed the loss");
    assert_eq!(
        s.nodes[1].core.health().get(2).unwrap().state,
        canopy_overlay::health::RankState::Lost
    );
    s.cut.remove(&2);
    s.run_for(3000);
    assert!(s.full(), "rank 2 rejoined");
    let seqs: Vec<u64> = s.events(2, sub).iter().map(|g| g.header.seq).collect();
    assert_eq!(
        seqs,
        vec![1, 2, 3, 4, 5],
        "missed events replayed once, in order"
    );
    let data: Vec<u8> = s.events(2, sub).iter().map(|g| g.payload[0]).collect();
    assert_eq!(data, vec![0, 1, 2, 3, 4]);
}

#[test]
fn a_request_over_a_lost_link_is_answered_once_with_ehostunreach() {
    let mut s = Sim::new(3, 1);
    s.run_for(50);
    let c = s.connect(0, OWNER_UID);
    s.stalled.insert(2);
    let t = s.request(0, c, "broker.ping", 2, b"p");
    s.settle();
    assert!(s.responses(0, c, t).is_empty(), "rank 2 is stalled");
    s.cut.insert(2);
    s.run_for(300);
    let r = s.responses(0, c, t);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].header.errnum, errno::EHOSTUNREACH);
    assert!(String::from_utf8_lossy(&r[0].payload).contains("rank 2 was lost"));
    // Rank 2 wakes up and answers from its old session: dropped.
    s.cut.remove(&2);
    s.unstall(2);
    s.run_for(3000);
    assert_eq!(s.responses(0, c, t).len(), 1, "still exactly one answer");
    assert!(s.full());
    let t2 = s.request(0, c, "broker.ping", 2, b"again");
    s.settle();
    ok_once(&s, 0, c, t2);
}

#[test]
fn a_parent_that_never_answers_the_hello_is_retried() {
    let mut s = Sim::new(2, 1);
    s.cut.insert(1); // the hello never arrives
    s.run_for(1000);
    assert!(!s.nodes[1].core.joined());
    s.cut.remove(&1);
    s.run_for(2000);
    assert!(s.nodes[1].core.joined(), "joined after the cause went away");
    assert!(s.full());
}

fn rotation_sim() -> Sim {
    let mut s = Sim::new(3, 1); // 0 - 1 - 2
    let next: [u8; 32] = [0x77; 32];
    let ring = KeyRing::new(HashMap::from([
        (0, vec![s.nodes[0].key]),
        (1, vec![s.nodes[1].key, next]),
        (2, vec![s.nodes[2].key]),
    ]));
    for r in 0..3 {
        let n = &mut s.nodes[r];
        n.ring = Some(ring.clone());
        n.core.enable_key_files();
        n.core.handle(
            0,
            Input::KeysReloaded {
                req: None,
                result: Ok(ring.clone()),
            },
        );
    }
    s.nodes[1].next_key = Some(next);
    s.run_for(50);
    assert!(s.full());
    s
}

#[test]
fn a_key_switch_relinks_both_links_without_losing_a_message() {
    let mut s = rotation_sim();
    let next = s.nodes[1].next_key.unwrap();
    let c = s.connect(0, OWNER_UID);
    let sub = s.connect(2, OWNER_UID);
    let t = s.request(2, sub, "event.subscribe", NODEID_ANY, b"*");
    s.settle();
    ok_once(&s, 2, sub, t);
    let sw = s.request(0, c, "key.switch", 1, b"");
    let mut tags = Vec::new();
    // Traffic through the moving links while they move: one ping and one
    // event every 2 ms for 200 ms, delivered a step at a time.
    for i in 0..100u8 {
        tags.push(s.request(0, c, "broker.ping", 2, &[i]));
        s.publish(0, c, "rot.e", &[i]);
        s.run_for(2);
    }
    s.run_for(500);
    let r = ok_once(&s, 0, c, sw);
    assert!(String::from_utf8_lossy(&r.payload).contains("switching to key"));
    assert_eq!(s.nodes[1].key, next, "rank 1 uses its new key");
    assert_eq!(s.nodes[1].rebinds, 1, "rank 1 listens with the new key");
    for (i, t) in tags.iter().enumerate() {
        assert_eq!(ok_once(&s, 0, c, *t).payload, vec![i as u8]);
    }
    let seqs: Vec<u64> = s.events(2, sub).iter().map(|g| g.header.seq).collect();
    assert_eq!(
        seqs,
        (1..=100).collect::<Vec<u64>>(),
        "every event once, in order"
    );
    assert!(s.full());
    assert!(s.nodes.iter().all(|n| n.exit.is_none()));
}

#[test]
fn a_key_reload_disconnects_a_child_whose_key_is_no_longer_admitted() {
    let mut s = rotation_sim();
    // Rank 2's key is dropped from rank 1's ring.
    let ring = KeyRing::new(HashMap::from([
        (0, vec![s.nodes[0].key]),
        (1, vec![s.nodes[1].key]),
    ]));
    s.nodes[1].ring = Some(ring);
    s.nodes[1].core.handle(s.now, Input::Hangup);
    s.run_for(10);
    assert!(
        matches!(s.nodes[2].exit, Some(Exit::Disconnected(ref why)) if why.contains("no longer admitted"))
    );
}

#[test]
fn a_reload_cuts_talkers_and_silent_subscribers_at_once() {
    let mut s = Sim::new(3, 2);
    s.policy = allow(&[("unix:u2000", Roles::USER), ("unix:u3000", Roles::USER)]);
    s.run_for(50);
    let owner = s.connect(0, OWNER_UID);
    let talker = s.connect(0, 2000);
    let silent = s.connect(1, 3000);
    s.run_for(5);
    let t = s.request(0, talker, "broker.ping", 2, b"hi");
    let sub = s.request(1, silent, "event.subscribe", NODEID_ANY, b"*");
    s.run_for(5);
    ok_once(&s, 0, talker, t);
    ok_once(&s, 1, silent, sub);
    s.publish(0, owner, "a.b", b"1");
    s.run_for(5);
    assert_eq!(s.events(1, silent).len(), 1);

    s.policy = allow(&[]);
    s.nodes[0].core.handle(s.now, Input::Hangup);
    s.nodes[1].core.handle(s.now, Input::Hangup);
    s.run_for(10);
    for (rank, id) in [(0, talker), (1, silent)] {
        let got = s.got(rank, id);
        let last = got.last().unwrap();
        assert_eq!(last.header.errnum, errno::EPERM);
        assert_eq!(last.header.topic, REVOKED_TOPIC);
        assert!(String::from_utf8_lossy(&last.payload).contains("access revoked"));
        assert!(s.closed.contains(&(rank, id)), "cut at the reload");
    }
    let before = (s.got(0, talker).len(), s.got(1, silent).len());
    s.publish(0, owner, "a.b", b"2");
    let t2 = s.request(0, talker, "broker.ping", 0, b"again");
    s.run_for(10);
    assert_eq!(
        (s.got(0, talker).len(), s.got(1, silent).len()),
        before,
        "nothing more, not even events"
    );
    assert!(s.responses(0, talker, t2).is_empty());
    // The owner (by uid) is not decided again and keeps working.
    let t3 = s.request(0, owner, "broker.ping", 2, b"");
    s.run_for(5);
    ok_once(&s, 0, owner, t3);
}

#[test]
fn a_reload_disconnects_a_child_the_policy_now_denies() {
    let mut s = Sim::new(3, 2);
    s.policy = allow(&[]);
    s.run_for(50);
    let two = s.principal(2);
    s.policy = Box::new(move |sub: &Subject| {
        let p = sub.principal.clone().unwrap_or_default();
        if p == two {
            Err((p, "denied by rule \"stolen\"".into()))
        } else {
            Ok((p, Grant::plain(Roles::PEER)))
        }
    });
    s.nodes[0].core.handle(s.now, Input::Hangup);
    s.run_for(10);
    assert!(matches!(s.nodes[2].exit, Some(Exit::Disconnected(ref why)) if why.contains("stolen")));
    assert!(s.nodes[1].exit.is_none());
}

#[test]
fn a_policy_granted_owner_is_decided_again_after_a_reload() {
    let mut s = Sim::new(2, 1);
    s.policy = allow(&[("unix:u2000", Roles::OWNER)]);
    s.run_for(50);
    let granted = s.connect(0, 2000);
    let real = s.connect(0, OWNER_UID);
    s.run_for(5);
    let t = s.request(0, granted, "acl.reload", 0, b"");
    s.run_for(5);
    ok_once(&s, 0, granted, t);
    s.policy = allow(&[]);
    let t = s.request(0, real, "acl.reload", 0, b"");
    s.run_for(10);
    ok_once(&s, 0, real, t);
    assert!(
        s.closed.contains(&(0, granted)),
        "a policy-granted owner loses access with its rule"
    );
    assert!(
        !s.closed.contains(&(0, real)),
        "the instance owner, by uid, stays"
    );
}

#[test]
fn admission_waits_on_a_slow_delegate_without_holding_anyone_else() {
    let mut s = Sim::new(4, 2);
    s.policy = allow(&[("unix:u2000", Roles::USER)]);
    s.decide_ms = 5000;
    s.run_for(50);
    let slow = s.connect(0, 2000);
    let t = s.request(0, slow, "broker.ping", 3, b"s");
    let owner = s.connect(0, OWNER_UID);
    let start = s.now;
    for r in 0..4 {
        let t = s.request(0, owner, "broker.ping", r, b"o");
        s.settle();
        ok_once(&s, 0, owner, t);
    }
    assert_eq!(
        s.now, start,
        "the owner was served while the decision was pending"
    );
    assert!(
        s.got(0, slow).is_empty(),
        "the waiting client got nothing yet"
    );
    s.run_for(4900);
    assert!(s.responses(0, slow, t).is_empty());
    s.run_for(200);
    assert_eq!(ok_once(&s, 0, slow, t).payload, b"s");
}

#[test]
fn a_denied_admission_gets_one_eperm_and_a_close() {
    let mut s = Sim::new(1, 2);
    s.policy = allow(&[]);
    let c = s.connect(0, 2000);
    let t = s.request(0, c, "broker.ping", 0, b"");
    s.run_for(10);
    let got = s.got(0, c);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].header.errnum, errno::EPERM);
    assert!(s.responses(0, c, t).is_empty());
    assert!(s.closed.contains(&(0, c)));
}

#[test]
fn pending_admissions_are_bounded() {
    let mut s = Sim::new(1, 2);
    s.policy = allow(&[("unix:u2000", Roles::USER)]);
    s.decide_ms = 10_000;
    let ids: Vec<u32> = (0..MAX_PENDING_ADMISSIONS + 3)
        .map(|_| s.connect(0, 2000))
        .collect();
    let refused: Vec<&u32> = ids
        .iter()
        .filter(|id| s.closed.contains(&(0, **id)))
        .collect();
    assert_eq!(
        refused.len(),
        3,
        "the ones past the bound are refused at once"
    );
    let r = &s.got(0, *refused[0])[0];
    assert_eq!(r.header.errnum, errno::EAGAIN);
    let owner = s.connect(0, OWNER_UID);
    let t = s.request(0, owner, "broker.ping", 0, b"");
    s.settle();
    ok_once(&s, 0, owner, t);
}

#[test]
fn a_role_is_checked_before_the_service_runs() {
    let mut s = Sim::new(2, 1);
    s.policy = allow(&[("unix:u2000", Roles::USER)]);
    s.run_for(50);
    let u = s.connect(1, 2000);
    s.run_for(5);
    let t = s.request(1, u, "overlay.disconnect", 0, b"1");
    let p = s.publish(1, u, "x.y", b"");
    s.run_for(5);
    for tag in [t, p] {
        let r = s.responses(1, u, tag);
        assert_eq!(r[0].header.errnum, errno::EPERM, "{r:?}");
    }
    assert!(s.full(), "nothing was disconnected");
}

#[test]
fn requests_toward_a_stalled_neighbour_are_bounded_in_bytes() {
    // A client budget above the neighbour's, so the neighbour's is met first.
    let budgets = Budgets {
        neighbour_bytes: 8 << 20,
        ..Budgets::default()
    };
    let mut s = Sim::with_budgets(3, 1, budgets);
    s.run_for(50);
    let c = s.connect(0, OWNER_UID);
    s.stalled.insert(1); // SIGSTOP: it reads nothing
    let pad = vec![0u8; 1 << 20];
    let budget = budgets.neighbour_bytes / (1 << 20);
    let tags: Vec<u32> = (0..budget + 10)
        .map(|_| s.request(0, c, "broker.ping", 2, &pad))
        .collect();
    s.settle();
    let refused: Vec<u32> = tags
        .iter()
        .filter(|t| {
            s.responses(0, c, **t)
                .first()
                .is_some_and(|g| g.header.errnum == errno::EAGAIN)
        })
        .copied()
        .collect();
    assert_eq!(
        refused.len(),
        10,
        "past the budget, the sender gets EAGAIN at once"
    );
    let r = &s.responses(0, c, refused[0])[0];
    assert!(String::from_utf8_lossy(&r.payload).contains("rank 1 is not keeping up"));
    // The owner's other traffic is unaffected.
    let t = s.request(0, c, "broker.ping", 0, b"");
    s.settle();
    ok_once(&s, 0, c, t);
    // Once rank 1 is lost, every held request gets EHOSTUNREACH, once.
    s.cut.insert(1);
    s.run_for(2000);
    for t in &tags[..budget] {
        let r = s.responses(0, c, *t);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].header.errnum, errno::EHOSTUNREACH);
    }
}

#[test]
fn requests_in_flight_per_client_are_bounded() {
    let mut s = Sim::new(2, 1);
    s.run_for(50);
    let c = s.connect(0, OWNER_UID);
    s.stalled.insert(1);
    let n = Budgets::default().in_flight;
    let tags: Vec<u32> = (0..n + 1)
        .map(|_| s.request(0, c, "broker.ping", 1, b""))
        .collect();
    s.settle();
    let last = s.responses(0, c, tags[n]);
    assert_eq!(last[0].header.errnum, errno::EAGAIN, "{last:?}");
    assert!(
        s.responses(0, c, tags[0]).is_empty(),
        "the first ones are still in flight"
    );
    // Answers free the budget.
    s.unstall(1);
    s.settle();
    let t = s.request(0, c, "broker.ping", 1, b"");
    s.settle();
    ok_once(&s, 0, c, t);
}

#[test]
fn connections_per_uid_are_bounded() {
    let mut s = Sim::new(1, 2);
    s.policy = allow(&[("unix:u2000", Roles::USER)]);
    let n = Budgets::default().connections;
    let ids: Vec<u32> = (0..n + 2)
        .map(|_| {
            let id = s.connect(0, 2000);
            s.run_for(2);
            id
        })
        .collect();
    let refused: Vec<&u32> = ids
        .iter()
        .filter(|id| s.closed.contains(&(0, **id)))
        .collect();
    assert_eq!(refused.len(), 2);
    assert_eq!(s.got(0, *refused[0])[0].header.errnum, errno::EAGAIN);
    // The owner is not counted against another uid's budget.
    let o = s.connect(0, OWNER_UID);
    let t = s.request(0, o, "broker.ping", 0, b"");
    s.settle();
    ok_once(&s, 0, o, t);
}

/// Exited nodes vanish as real brokers would: their links are cut and
/// their parent's router monitor reports a closed connection. Returns the
/// ranks in the order they exited.
fn reap_exits(s: &mut Sim, order: &mut Vec<u32>) {
    loop {
        s.settle();
        let new: Vec<u32> = (0..s.nodes.len() as u32)
            .filter(|r| s.nodes[*r as usize].exit.is_some() && !order.contains(r))
            .collect();
        if new.is_empty() {
            return;
        }
        for r in new {
            order.push(r);
            s.cut.insert(r);
            if let Some(p) = s.topo.parent(r) {
                let now = s.now;
                s.nodes[p as usize].core.handle(now, Input::ChildClosed);
            }
        }
    }
}

fn launcher_sim(size: u32, fanout: u32) -> Sim {
    let mut s = Sim::new(size, fanout);
    for n in &mut s.nodes {
        n.core.enable_launcher_mode();
    }
    s.policy = allow(&[("unix:u2000", Roles::OPERATOR)]);
    s.run_for(50);
    assert!(s.full(), "every rank online");
    s
}

#[test]
fn launcher_mode_the_owners_shutdown_ends_every_broker_children_first() {
    let mut s = launcher_sim(7, 2);
    // An operator may publish events, but not end the instance.
    let guest = s.connect(0, 2000);
    let t = s.publish(0, guest, SHUTDOWN_TOPIC, b"0");
    s.run_for(20);
    let r = s.responses(0, guest, t);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].header.errnum, errno::EPERM);
    assert!(String::from_utf8_lossy(&r[0].payload).contains("owner"));
    s.run_for(100);
    assert!(s.nodes.iter().all(|n| n.exit.is_none()), "nobody exits");

    let owner = s.connect(0, OWNER_UID);
    s.publish(0, owner, SHUTDOWN_TOPIC, b"3");
    let mut order = Vec::new();
    reap_exits(&mut s, &mut order);
    assert_eq!(order.len(), 7, "every rank exits at once: {order:?}");
    for (r, n) in s.nodes.iter().enumerate() {
        assert_eq!(n.exit, Some(Exit::Shutdown { status: 3 }), "rank {r}");
    }
    // A broker leaves only after its children: the event reached them.
    for r in 1..7u32 {
        let p = s.topo.parent(r).unwrap();
        let pos = |x: u32| order.iter().position(|&y| y == x).unwrap();
        assert!(pos(r) < pos(p), "rank {r} before its parent {p}: {order:?}");
    }
    assert_eq!(*order.last().unwrap(), 0);
}

#[test]
fn launcher_mode_a_child_that_never_leaves_delays_its_parent_at_most_the_wait() {
    let mut s = launcher_sim(3, 2);
    // Rank 2 hears the event but does not go away (hung).
    let owner = s.connect(0, OWNER_UID);
    s.publish(0, owner, SHUTDOWN_TOPIC, b"0");
    let mut order = Vec::new();
    s.settle();
    s.cut.insert(1);
    let now = s.now;
    s.nodes[0].core.handle(now, Input::ChildClosed);
    s.settle();
    assert!(s.nodes[0].exit.is_none(), "rank 0 waits for rank 2");
    let t0 = s.now;
    while s.nodes[0].exit.is_none() && s.now < t0 + 10_000 {
        s.run_for(50);
    }
    reap_exits(&mut s, &mut order);
    assert_eq!(s.nodes[0].exit, Some(Exit::Shutdown { status: 0 }));
    let waited = s.now - t0;
    assert!(waited <= timing().lost_ms.min(5000) + 100, "{waited} ms");
}

#[test]
fn launcher_mode_losing_the_parent_ends_the_subtree_fail_closed() {
    let mut s = launcher_sim(7, 2);
    // Rank 1 dies: its children see the connection close.
    s.cut.insert(1);
    s.nodes[1].exit = Some(Exit::Disconnected("killed".into()));
    for c in [3u32, 4] {
        let now = s.now;
        s.nodes[c as usize].core.handle(
            now,
            Input::ParentGone {
                reason: "the connection to the parent closed".into(),
            },
        );
    }
    s.run_for(1000);
    for c in [3u32, 4] {
        match &s.nodes[c as usize].exit {
            Some(Exit::Orphaned { parent: 1, reason }) => {
                assert!(reason.contains("closed"), "{reason}")
            }
            other => panic!("rank {c}: {other:?}"),
        }
    }
    for r in [0u32, 2, 5, 6] {
        assert_eq!(s.nodes[r as usize].exit, None, "rank {r} keeps running");
    }
}

#[test]
fn without_launcher_mode_instance_shutdown_is_an_ordinary_event() {
    let mut s = Sim::new(3, 2);
    s.run_for(50);
    let owner = s.connect(0, OWNER_UID);
    s.publish(0, owner, SHUTDOWN_TOPIC, b"0");
    s.cut.insert(1);
    let now = s.now;
    s.nodes[2]
        .core
        .handle(now, Input::ParentGone { reason: "x".into() });
    s.run_for(3000);
    assert!(s.nodes.iter().all(|n| n.exit.is_none()));
}

#[test]
fn a_first_decision_pending_at_a_reload_is_made_again_under_the_new_policy() {
    let mut s = Sim::new(1, 2);
    s.policy = allow(&[("unix:u2000", Roles::USER)]);
    s.decide_ms = 100;
    // The reload starts, then a client connects: its first decision is
    // made under the old policy and arrives after the reload completed.
    s.nodes[0].core.handle(s.now, Input::Hangup);
    s.run_for(1);
    let c = s.connect(0, 2000);
    let t = s.request(0, c, "broker.ping", 0, b"");
    s.policy = allow(&[]);
    s.run_for(500);
    assert!(
        s.responses(0, c, t).is_empty(),
        "served under the old policy"
    );
    assert!(s.closed.contains(&(0, c)));
    assert_eq!(s.got(0, c)[0].header.errnum, errno::EPERM);
}

fn remote(s: &mut Sim, rid: Vec<u8>, principal: &str, topic: &str) -> u32 {
    let tag = 900;
    let now = s.now;
    s.nodes[0].core.handle(
        now,
        Input::Remote {
            rid,
            user_id: principal.into(),
            grant: Grant::plain(Roles::USER),
            address: "127.0.0.1".into(),
            header: Header::request(topic, 0, tag),
            payload: Vec::new(),
        },
    );
    s.settle();
    tag
}

#[test]
fn a_principal_reconnecting_past_its_connection_budget_is_not_locked_out() {
    let mut s = Sim::new(1, 2);
    let n = Budgets::default().connections;
    // Many short-lived remote connections (each `canopy ping` is one);
    // libzmq never says they closed.
    for i in 0..n + 5 {
        let tag = remote(
            &mut s,
            vec![(i % 250) as u8, (i / 250) as u8],
            "curve:alice",
            "broker.ping",
        );
        let last = s.remote_inbox.last().expect("an answer");
        assert_eq!(last.1.header.matchtag, tag);
        assert_eq!(
            last.1.header.errnum, 0,
            "connection {i} refused: {:?}",
            last.1
        );
    }
    assert!(s.nodes[0].core.clients() <= n, "entries stay bounded");
    // A subscriber holding the budget with subscriptions is not evicted;
    // then a new connection is refused rather than dropping it.
    let mut t = Sim::new(1, 2);
    for i in 0..n {
        let rid = (i % 250) as u8;
        let now = t.now;
        t.nodes[0].core.handle(
            now,
            Input::Remote {
                rid: vec![rid, (i / 250) as u8],
                user_id: "curve:bob".into(),
                grant: Grant::plain(Roles::USER),
                address: String::new(),
                header: Header::request("event.subscribe", NODEID_ANY, 1),
                payload: b"*".to_vec(),
            },
        );
    }
    t.settle();
    assert_eq!(t.nodes[0].core.clients(), n);
    remote(&mut t, vec![251, 9], "curve:bob", "broker.ping");
    assert_eq!(t.nodes[0].core.clients(), n, "refused, nobody evicted");
    assert_eq!(
        t.remote_inbox.last().unwrap().1.header.errnum,
        errno::EAGAIN
    );
}

#[test]
fn a_refused_child_retries_and_joins_once_the_cause_is_fixed() {
    let mut s = Sim::new(4, 2);
    assert!(s.full());
    // Rank 1 comes back with a key rank 0 does not admit for it.
    let good = s.nodes[1].key;
    s.nodes[1].key = [0x77; 32];
    let now = s.now;
    s.nodes[1].core.handle(now, Input::ParentKeyChanged);
    s.run_for(4000);
    assert!(
        s.nodes[1].exit.is_none(),
        "a broker outside a launcher does not exit when refused"
    );
    let e = s.nodes[0].core.health().get(1).unwrap();
    assert_eq!(e.state, RankState::Refused, "{e:?}");
    assert!(e.reason.contains("refused by rank 0"), "{e:?}");
    assert!(!s.full());
    // Fixed (the admin installs the right key): it joins within the retry
    // bound, with no restart.
    s.nodes[1].key = good;
    s.run_for(REFUSED_RETRY_MAX_MS + 1000);
    assert!(s.full(), "{:?}", s.nodes[0].core.health().get(1));
    assert!(s.nodes[1].exit.is_none());
}

#[test]
fn a_key_refused_by_the_parents_zap_handler_is_retried_except_under_a_launcher() {
    // The shell reports a failed CURVE handshake as ParentRefused.
    let refuse = |s: &mut Sim, r: u32| {
        let now = s.now;
        s.nodes[r as usize].core.handle(
            now,
            Input::ParentRefused {
                reason: "the parent's ZAP handler refused this broker's key".into(),
            },
        );
    };
    let mut s = Sim::new(3, 2);
    refuse(&mut s, 1);
    s.settle();
    assert!(s.nodes[1].exit.is_none());
    assert!(
        !s.nodes[1].core.joined(),
        "the refused connection is dropped"
    );
    s.run_for(REFUSED_RETRY_MIN_MS + 500);
    assert!(s.nodes[1].core.joined(), "retried after the backoff");
    assert!(s.full());

    s.nodes[2].core.enable_launcher_mode();
    refuse(&mut s, 2);
    s.settle();
    assert!(
        matches!(s.nodes[2].exit, Some(Exit::HelloRefused { parent: 0, ref reason }) if reason.contains("ZAP")),
        "{:?}",
        s.nodes[2].exit
    );
}

#[test]
fn a_clean_stop_is_offline_not_lost() {
    let mut s = Sim::new(4, 2);
    assert!(s.full());
    let now = s.now;
    s.nodes[1].core.handle(now, Input::Stopping);
    assert!(s.nodes[1].core.awaiting_goodbye_ack());
    s.settle();
    // The parent answered the goodbye, so the shell may close the link:
    // the goodbye is no longer in flight.
    assert!(!s.nodes[1].core.awaiting_goodbye_ack());
    s.stalled.insert(1); // the process is gone
    for r in [1, 3] {
        let e = s.nodes[0].core.health().get(r).unwrap();
        assert_eq!(e.state, RankState::Offline, "rank {r}: {e:?}");
        assert_eq!(e.reason, "stopped cleanly");
    }
    assert_eq!(
        s.nodes[0].core.health().get(2).unwrap().state,
        RankState::Online
    );
    // A crash, by contrast, is lost.
    s.cut.insert(2);
    s.run_for(3000);
    assert_eq!(
        s.nodes[0].core.health().get(2).unwrap().state,
        RankState::Lost
    );
}

/// A broker stopped while the answer to its hello is still on its way:
/// the parent already shows it online, so it says goodbye all the same.
#[test]
fn a_stop_before_the_hello_answer_arrives_is_offline_too() {
    let mut s = Sim::unsettled(2, 1, Budgets::default());
    s.stalled.insert(1); // rank 1 reads nothing yet
    s.settle();
    let e = s.nodes[0].core.health().get(1).unwrap();
    assert_eq!(e.state, RankState::Online, "{e:?}");
    assert!(!s.nodes[1].core.joined());
    let now = s.now;
    s.nodes[1].core.handle(now, Input::Stopping);
    assert!(s.nodes[1].core.awaiting_goodbye_ack());
    s.settle();
    let e = s.nodes[0].core.health().get(1).unwrap();
    assert_eq!(e.state, RankState::Offline, "{e:?}");
    assert_eq!(e.reason, "stopped cleanly");
    s.unstall(1);
    s.settle();
    assert!(!s.nodes[1].core.awaiting_goodbye_ack());
}

/// One event goes out as one `Transmit::Event` to settled subscribers; a
/// subscriber whose access is being decided again gets it only once the
/// decision allows it, and exactly once.
#[test]
fn an_event_waits_for_a_subscriber_being_decided_again() {
    let mut s = Sim::new(2, 1);
    s.policy = allow(&[("unix:u2000", Roles::USER)]);
    s.run_for(50);
    let owner = s.connect(0, OWNER_UID);
    let settled = s.connect(1, OWNER_UID);
    let pending = s.connect(1, 2000);
    s.run_for(5);
    for id in [settled, pending] {
        let t = s.request(1, id, "event.subscribe", NODEID_ANY, b"*");
        s.settle();
        ok_once(&s, 1, id, t);
    }
    // A slow re-decision on rank 1 (the owner, known by uid, is not
    // re-decided).
    s.decide_ms = 1000;
    s.nodes[1].core.handle(s.now, Input::Hangup);
    // The new policy is read (1 s), then each client is decided under it
    // (1 s more): publish in between.
    s.run_for(1005);
    s.publish(0, owner, "a.b", b"1");
    s.run_for(5);
    assert_eq!(
        s.events(1, settled).len(),
        1,
        "the settled subscriber waits for nobody"
    );
    assert!(
        s.events(1, pending).is_empty(),
        "delivered before the decision"
    );
    s.run_for(1100);
    for id in [settled, pending] {
        let ev = s.events(1, id);
        assert_eq!(ev.len(), 1, "client {id}: {ev:?}");
        assert_eq!(ev[0].payload, b"1");
    }
}

#[test]
fn a_handshake_refused_for_its_key_shows_the_only_offline_child_refused() {
    let mut s = Sim::new(3, 2);
    s.run_for(50);
    assert!(s.full());
    s.cut.insert(2);
    s.run_for(3000);
    assert_eq!(
        s.nodes[0].core.health().get(2).unwrap().state,
        RankState::Lost
    );
    let now = s.now;
    s.nodes[0].core.handle(
        now,
        Input::PeerRefused {
            address: "10.0.0.2".into(),
            reason: "unknown key".into(),
        },
    );
    let e = s.nodes[0].core.health().get(2).unwrap();
    assert_eq!(e.state, RankState::Refused, "{e:?}");
    assert!(e.reason.contains("refused its key (unknown key)"), "{e:?}");
    // With two children offline and no addresses to tell them apart,
    // nobody is blamed.
    s.cut.insert(1);
    s.run_for(3000);
    let now = s.now;
    s.nodes[0].core.handle(
        now,
        Input::PeerRefused {
            address: "10.0.0.1".into(),
            reason: "unknown key".into(),
        },
    );
    assert_eq!(
        s.nodes[0].core.health().get(1).unwrap().state,
        RankState::Lost
    );
}
