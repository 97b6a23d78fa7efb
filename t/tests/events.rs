//! An event published at rank 0 reaches a subscriber at every rank, in order.
#![forbid(unsafe_code)]

use canopy_proto::MsgType;
use canopy_t::{run_test, Instance, RPC_TIMEOUT};
use std::time::Duration;

const N: u64 = 50;

fn events_reach_every_rank(size: u32, fanout: u32) {
    let inst = Instance::start(size, fanout, &[]);
    let mut subs: Vec<_> = (0..size)
        .map(|r| {
            let mut c = inst.client(r);
            c.subscribe("test.*", RPC_TIMEOUT)
                .unwrap_or_else(|e| panic!("subscribe at rank {r}: {e}"));
            c
        })
        .collect();

    let mut publisher = inst.client(0);
    let mut seqs = Vec::new();
    for i in 0..N {
        let payload = format!("event {i}");
        let seq = publisher
            .publish("test.tick", payload.as_bytes(), RPC_TIMEOUT)
            .unwrap_or_else(|e| panic!("publish #{i}: {e}"));
        seqs.push(seq);
    }
    let first = seqs[0];
    assert_eq!(
        seqs,
        (first..first + N).collect::<Vec<_>>(),
        "rank 0 did not number the events consecutively"
    );
    // One event the subscribers did not ask for, then one they did: each
    // must see the second right after the 50, with the first's seq skipped.
    let other = publisher
        .publish("other.tick", b"not for you", RPC_TIMEOUT)
        .expect("publish other.tick");
    let end = publisher
        .publish("test.end", b"end", RPC_TIMEOUT)
        .expect("publish test.end");
    assert_eq!((other, end), (first + N, first + N + 1));

    for (rank, c) in subs.iter_mut().enumerate() {
        for i in 0..N {
            let m = c
                .next_event(RPC_TIMEOUT)
                .unwrap_or_else(|e| panic!("rank {rank}: event #{i} missing: {e}"));
            assert_eq!(m.header.msg_type, MsgType::Event);
            assert_eq!(
                m.header.seq,
                first + i,
                "rank {rank}: event #{i} out of order"
            );
            assert_eq!(m.header.topic, "test.tick", "rank {rank}");
            assert_eq!(
                m.payload,
                format!("event {i}").into_bytes(),
                "rank {rank}: event #{i} has the wrong payload"
            );
        }
        let m = c
            .next_event(RPC_TIMEOUT)
            .unwrap_or_else(|e| panic!("rank {rank}: test.end missing: {e}"));
        assert_eq!(
            (m.header.topic.as_str(), m.header.seq, m.payload.as_slice()),
            ("test.end", end, &b"end"[..]),
            "rank {rank}: expected test.end after the 50 events (other.tick filtered out)"
        );
    }
}

#[test]
fn events_reach_all_8_ranks_in_order() {
    run_test(Duration::from_secs(60), || events_reach_every_rank(8, 2));
}

#[test]
fn events_reach_all_13_ranks_in_order_fanout_3() {
    run_test(Duration::from_secs(60), || events_reach_every_rank(13, 3));
}
