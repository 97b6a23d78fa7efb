//! `exec.run` on a simulated clock (docs/protocol.md §6.2): fan-out down
//! and up the tree, records relayed to the caller, the final response,
//! who may run, lost ranks named, control only by the session's own link,
//! and cleanup when the caller goes.

use super::sim::*;
use super::*;
use canopy_proto::exec::{encode_control, encode_run, Ended, Record};
use canopy_proto::{FLAG_MORE, NODEID_ANY};

fn allow_user(uid: u32) -> Policy {
    Box::new(move |s: &Subject| {
        let p = s.principal.clone().unwrap_or_default();
        if p.starts_with("curve:") {
            return Ok((p, Grant::plain(Roles::PEER)));
        }
        if p == format!("unix:u{uid}") {
            return Ok((p, Grant::plain(Roles::USER)));
        }
        Err((p, "no rule".into()))
    })
}

fn run(s: &mut Sim, rank: u32, id: u32, ranks: &str) -> u32 {
    let tag = s.request(
        rank,
        id,
        exec::RUN_TOPIC,
        NODEID_ANY,
        &encode_run(ranks, "", b"BODY"),
    );
    s.settle();
    tag
}

/// The session id the command on `rank` was started with (the only one).
fn sid(s: &Sim, rank: u32) -> u64 {
    let sp = &s.nodes[rank as usize].core_spawned();
    assert_eq!(sp.len(), 1, "rank {rank} started {} commands", sp.len());
    sp[0]
}

trait Spawned {
    fn core_spawned(&self) -> Vec<u64>;
}
impl Spawned for Node {
    fn core_spawned(&self) -> Vec<u64> {
        self.spawned.iter().map(|x| x.sid).collect()
    }
}

/// Records the caller got for `tag`, and whether the last response ended
/// the stream (and nothing came after it).
fn records(s: &Sim, rank: u32, id: u32, tag: u32) -> (Vec<Vec<u8>>, bool) {
    let rs = s.responses(rank, id, tag);
    let mut recs = Vec::new();
    let mut ended = false;
    for g in &rs {
        assert!(!ended, "a response after the final one");
        assert_eq!(
            g.header.errnum,
            0,
            "{}",
            String::from_utf8_lossy(&g.payload)
        );
        for r in canopy_proto::exec::records(&g.payload).expect("length-prefixed records") {
            recs.push(r.to_vec());
        }
        if g.header.flags & FLAG_MORE == 0 {
            ended = true;
        }
    }
    (recs, ended)
}

fn finish_all(s: &mut Sim, ranks: impl IntoIterator<Item = u32>) {
    for r in ranks {
        let sid = sid(s, r);
        s.exec_record(
            r,
            sid,
            Record::Stdout(r, format!("out{r}").as_bytes()).encode(),
        );
        s.exec_record(r, sid, Record::Exit(r, Ended::Status(r as i32)).encode());
    }
    s.settle();
}

#[test]
fn all_ranks_run_once_and_every_record_reaches_the_caller() {
    let mut s = Sim::new(7, 2);
    let c = s.connect(0, OWNER_UID);
    let tag = run(&mut s, 0, c, "all");
    for r in 0..7 {
        let sp = &s.nodes[r as usize].spawned;
        assert_eq!(sp.len(), 1, "rank {r}");
        assert_eq!(sp[0].body, b"BODY", "the body is forwarded untouched");
        assert_eq!(sp[0].principal, "unix:owner");
    }
    let (recs, ended) = records(&s, 0, c, tag);
    assert!(
        recs.is_empty() && !ended,
        "nothing before the commands say so"
    );
    finish_all(&mut s, 0..7);
    let (recs, ended) = records(&s, 0, c, tag);
    assert!(ended, "the stream ended once every rank exited");
    // The last records ride on the last response.
    let rs = s.responses(0, c, tag);
    assert!(!rs.last().unwrap().payload.is_empty());
    let mut outs: Vec<u32> = Vec::new();
    let mut exits: Vec<(u32, i32)> = Vec::new();
    for p in &recs {
        match Record::decode(p).unwrap() {
            Record::Stdout(r, d) => {
                assert_eq!(d, format!("out{r}").as_bytes());
                assert!(!exits.iter().any(|e| e.0 == r), "output after its exit");
                outs.push(r)
            }
            Record::Exit(r, Ended::Status(st)) => exits.push((r, st)),
            other => panic!("unexpected {other:?}"),
        }
    }
    outs.sort();
    exits.sort();
    assert_eq!(outs, (0..7).collect::<Vec<_>>());
    assert_eq!(exits, (0..7).map(|r| (r, r as i32)).collect::<Vec<_>>());
    for r in 0..7 {
        assert_eq!(s.nodes[r].core.exec.len(), 0, "rank {r} forgot the session");
    }
}

#[test]
fn records_gathered_in_one_turn_leave_as_one_response() {
    let mut s = Sim::new(3, 2);
    let c = s.connect(0, OWNER_UID);
    let tag = run(&mut s, 0, c, "0");
    let sid = sid(&s, 0);
    // Two records in one turn of the shell's loop (no flush between).
    let now = s.now;
    for d in [&b"a"[..], b"b"] {
        let rec = Record::Stdout(0, d).encode();
        s.nodes[0]
            .core
            .handle(now, Input::ExecRecord { sid, record: rec });
    }
    s.settle();
    let rs = s.responses(0, c, tag);
    assert_eq!(rs.len(), 1, "one response");
    assert_eq!(rs[0].header.flags & FLAG_MORE, FLAG_MORE);
    let got = canopy_proto::exec::records(&rs[0].payload).unwrap();
    assert_eq!(
        got,
        vec![
            &Record::Stdout(0, b"a").encode()[..],
            &Record::Stdout(0, b"b").encode()[..]
        ]
    );
    // The exit goes with the last response.
    s.exec_record(0, sid, Record::Exit(0, Ended::Status(0)).encode());
    s.settle();
    let rs = s.responses(0, c, tag);
    assert_eq!(rs.len(), 2);
    assert_eq!(rs[1].header.flags & FLAG_MORE, 0);
    assert_eq!(
        canopy_proto::exec::records(&rs[1].payload).unwrap(),
        vec![&Record::Exit(0, Ended::Status(0)).encode()[..]]
    );
}

#[test]
fn a_caller_on_a_leaf_reaches_every_rank_once_up_and_down() {
    let mut s = Sim::new(7, 2);
    let c = s.connect(5, OWNER_UID);
    let tag = run(&mut s, 5, c, "0-6");
    for r in 0..7 {
        assert_eq!(s.nodes[r].spawned.len(), 1, "rank {r}");
    }
    finish_all(&mut s, 0..7);
    let (recs, ended) = records(&s, 5, c, tag);
    assert!(ended);
    assert_eq!(recs.len(), 14);
    // A subset: only the named ranks run.
    let c2 = s.connect(3, OWNER_UID);
    let t2 = run(&mut s, 3, c2, "2,4");
    let ran: Vec<usize> = (0..7).filter(|&r| s.nodes[r].spawned.len() == 2).collect();
    assert_eq!(ran, vec![2, 4]);
    for r in [2u32, 4] {
        let sid = s.nodes[r as usize].spawned[1].sid;
        s.exec_record(r, sid, Record::Exit(r, Ended::Signal(9)).encode());
    }
    s.settle();
    let (recs, ended) = records(&s, 3, c2, t2);
    assert!(ended);
    assert_eq!(recs.len(), 2);
}

#[test]
fn only_the_owner_may_exec_in_a_personal_instance() {
    let mut s = Sim::new(3, 2);
    s.policy = allow_user(2000);
    s.run_for(50);
    let c = s.connect(0, 2000);
    s.run_for(5);
    let tag = run(&mut s, 0, c, "all");
    s.run_for(5);
    let r = s.responses(0, c, tag);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].header.errnum, errno::EPERM);
    let msg = String::from_utf8_lossy(&r[0].payload);
    assert!(msg.contains("only the owner"), "{msg}");
    for n in &s.nodes {
        assert!(n.spawned.is_empty(), "nothing ran");
    }
}

#[test]
fn bad_requests_are_refused_with_the_reason() {
    let mut s = Sim::new(3, 2);
    let c = s.connect(0, OWNER_UID);
    let cases: [(&[u8], u32, &str); 4] = [
        (b"\0", errno::EPROTO, "malformed exec.run"),
        (
            &encode_run("0-9", "", b"x"),
            errno::EINVAL,
            "does not exist",
        ),
        (&encode_run("2,1", "", b"x"), errno::EINVAL, "ascending"),
        (
            &encode_run("all", "service:x", b"x"),
            errno::EINVAL,
            "system instances",
        ),
    ];
    for (payload, e, want) in cases {
        let tag = s.request(0, c, exec::RUN_TOPIC, NODEID_ANY, payload);
        s.settle();
        let r = s.responses(0, c, tag);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].header.errnum, e);
        let msg = String::from_utf8_lossy(&r[0].payload);
        assert!(msg.contains(want), "{msg}");
    }
    for n in &s.nodes {
        assert!(n.spawned.is_empty());
    }
}

#[test]
fn a_lost_subtree_is_named_rank_by_rank_and_the_stream_still_ends() {
    let mut s = Sim::new(7, 2);
    let c = s.connect(0, OWNER_UID);
    let tag = run(&mut s, 0, c, "all");
    // Rank 1's subtree is 1, 3, 4. Rank 3 finishes before the link breaks.
    let s3 = sid(&s, 3);
    s.exec_record(3, s3, Record::Exit(3, Ended::Status(0)).encode());
    s.settle();
    s.cut.insert(1);
    s.run_for(3000);
    finish_all(&mut s, [0, 2, 5, 6]);
    let (recs, ended) = records(&s, 0, c, tag);
    assert!(ended, "the stream ends without the lost ranks");
    let mut failed: Vec<u32> = Vec::new();
    for p in &recs {
        if let Record::Failed { rank, code, reason } = Record::decode(p).unwrap() {
            assert_eq!(code, 126);
            assert!(reason.contains("rank 1 was lost"), "{reason}");
            failed.push(rank);
        }
    }
    failed.sort();
    assert_eq!(failed, vec![1, 4], "rank 3 had already exited");
    // Rank 1 lost its parent: its command and its children's were killed.
    assert!(s.nodes[1].signals.iter().any(|&(_, sig)| sig == 9));
}

#[test]
fn control_reaches_only_the_callers_own_session() {
    let mut s = Sim::new(3, 2);
    let c = s.connect(0, OWNER_UID);
    let other = s.connect(0, OWNER_UID);
    let tag = run(&mut s, 0, c, "all");
    // Another connection cannot signal or feed it, even knowing the tag.
    let t = s.request(
        0,
        other,
        exec::KILL_TOPIC,
        NODEID_ANY,
        &encode_control(tag, b"2"),
    );
    s.settle();
    assert_eq!(s.responses(0, other, t)[0].header.errnum, errno::ENOENT);
    let t = s.request(
        0,
        other,
        exec::WRITE_TOPIC,
        NODEID_ANY,
        &encode_control(tag, b"x"),
    );
    s.settle();
    assert_eq!(s.responses(0, other, t)[0].header.errnum, errno::ENOENT);
    for n in &s.nodes {
        assert!(n.signals.is_empty() && n.stdin.is_empty());
    }
    // Its own connection can; only listed signals.
    let t = s.request(
        0,
        c,
        exec::KILL_TOPIC,
        NODEID_ANY,
        &encode_control(tag, b"11"),
    );
    s.settle();
    assert_eq!(s.responses(0, c, t)[0].header.errnum, errno::EINVAL);
    let t = s.request(
        0,
        c,
        exec::KILL_TOPIC,
        NODEID_ANY,
        &encode_control(tag, b"2"),
    );
    s.request(
        0,
        c,
        exec::WRITE_TOPIC,
        NODEID_ANY,
        &encode_control(tag, b"abc"),
    );
    s.request(
        0,
        c,
        exec::WRITE_TOPIC,
        NODEID_ANY,
        &encode_control(tag, b""),
    );
    s.settle();
    assert_eq!(s.responses(0, c, t)[0].header.errnum, 0);
    for (r, n) in s.nodes.iter().enumerate() {
        let sid = n.spawned[0].sid;
        assert_eq!(n.signals, vec![(sid, 2)], "rank {r}");
        assert_eq!(
            n.stdin,
            vec![(sid, b"abc".to_vec()), (sid, vec![])],
            "rank {r}"
        );
    }
}

#[test]
fn a_caller_that_goes_away_leaves_nothing_running() {
    let mut s = Sim::new(7, 2);
    let c = s.connect(0, OWNER_UID);
    let tag = run(&mut s, 0, c, "all");
    s.close(0, c);
    s.settle();
    for (r, n) in s.nodes.iter().enumerate() {
        let sid = n.spawned[0].sid;
        assert_eq!(n.signals, vec![(sid, 9)], "rank {r}'s command was killed");
    }
    assert_eq!(s.nodes[0].core.exec.len(), 0);
    // The killed commands report; nothing is delivered, sessions end.
    finish_all(&mut s, 0..7);
    assert!(s.responses(0, c, tag).is_empty());
    for r in 0..7 {
        assert_eq!(s.nodes[r].core.exec.len(), 0, "rank {r}");
    }
}
