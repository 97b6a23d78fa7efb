//! Faults under load, on an 8-broker system instance (fanout 2: the path
//! 0 -> 1 -> 3 -> 7):
//!
//! * a soak: 200,000 RPCs to random ranks while a random non-root broker
//!   is killed and restarted every 1.5 s; every RPC gets exactly one
//!   answer (a response or an error), and no broker's memory grows beyond
//!   a small bound;
//! * events through a stopped and a killed broker: never duplicated, the
//!   ones published while a link was down are replayed when it comes
//!   back, and every gap that cannot be replayed is reported, in
//!   `overlay status`, by the rank that saw it.
#![forbid(unsafe_code)]

use canopy_client::Client;
use canopy_proto::{errno, MsgType};
use canopy_t::cluster::Cluster;
use canopy_t::{run_test, wait_until, RPC_TIMEOUT};
use nix::sys::signal::Signal;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// A small xorshift generator: reproducible from the seed it prints.
struct Rng(u64);

impl Rng {
    fn seeded() -> Rng {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            | 1;
        println!("rng seed {seed}");
        Rng(seed)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

const SOAK_RPCS: u32 = 200_000;
const WINDOW: usize = 64;
/// Paced so the run spans enough kill/restart cycles.
const SOAK_RATE: f64 = 12_000.0;
const CHURN_EVERY: Duration = Duration::from_millis(1_500);
/// How long a killed broker stays down.
const DOWN_FOR: Duration = Duration::from_millis(400);
/// Allowed RSS growth of a broker over the soak.
const RSS_BOUND_KIB: u64 = 16 * 1024;

#[test]
fn soak_every_rpc_gets_exactly_one_answer_while_brokers_die() {
    run_test(Duration::from_secs(300), || {
        let mut cl = Cluster::new(8);
        cl.start_all();
        cl.wait_full(Duration::from_secs(30));
        let mut c = cl.client(0);
        // Warm up (allocator pools, routing tables), then take the baseline.
        for i in 0..5_000u32 {
            let r = i % 8;
            c.rpc("broker.ping", r, b"warm", RPC_TIMEOUT)
                .unwrap_or_else(|e| panic!("warm-up ping to rank {r}: {e}"));
        }
        let rss0: Vec<Option<u64>> = (0..8).map(|r| cl.rss_kib(r)).collect();

        let mut rng = Rng::seeded();
        let mut outstanding: HashMap<u32, (u32, Vec<u8>)> = HashMap::new();
        let mut answers: BTreeMap<u32, u64> = BTreeMap::new(); // errnum -> count
        let mut answered = 0u32;
        let mut sent = 0u32;
        let mut killed: Vec<u32> = Vec::new();
        let mut down: Option<(u32, Instant)> = None;
        let mut next_churn = Instant::now() + CHURN_EVERY;
        let t0 = Instant::now();
        let mut last_answer = Instant::now();
        while answered < SOAK_RPCS {
            // Churn: kill a random non-root rank, restart it DOWN_FOR later.
            let now = Instant::now();
            if let Some((r, at)) = down {
                if now >= at + DOWN_FOR {
                    cl.start(r);
                    down = None;
                }
            } else if now >= next_churn {
                let r = 1 + rng.below(7) as u32;
                cl.kill(r);
                killed.push(r);
                down = Some((r, now));
                next_churn = now + CHURN_EVERY;
            }
            // Keep the window full, at the paced rate.
            while sent < SOAK_RPCS
                && outstanding.len() < WINDOW
                && t0.elapsed().as_secs_f64() * SOAK_RATE >= sent as f64
            {
                let rank = rng.below(8) as u32;
                let payload = sent.to_be_bytes().to_vec();
                let tag = c.send("broker.ping", rank, &payload).unwrap();
                outstanding.insert(tag, (rank, payload));
                sent += 1;
            }
            match c.recv(Duration::from_millis(20)) {
                Ok(m) => {
                    assert_eq!(m.header.msg_type, MsgType::Response, "{m:?}");
                    let Some((rank, payload)) = outstanding.remove(&m.header.matchtag) else {
                        panic!(
                            "a second (or unasked-for) answer for tag {}: {m:?}",
                            m.header.matchtag
                        );
                    };
                    if m.header.errnum == 0 {
                        assert_eq!(m.header.nodeid, rank, "answered by the wrong rank");
                        assert_eq!(m.payload, payload, "an answer to another request");
                    }
                    *answers.entry(m.header.errnum).or_default() += 1;
                    answered += 1;
                    last_answer = Instant::now();
                }
                Err(canopy_client::ClientError::Timeout(_)) => {
                    assert!(
                        outstanding.is_empty() || last_answer.elapsed() < Duration::from_secs(5),
                        "{} requests unanswered for 5 s (e.g. to ranks {:?}); logs:\n{}",
                        outstanding.len(),
                        outstanding
                            .values()
                            .map(|(r, _)| *r)
                            .take(10)
                            .collect::<Vec<_>>(),
                        cl.logs()
                    );
                }
                Err(e) => panic!("the client connection failed: {e}"),
            }
        }
        let took = t0.elapsed();
        assert!(outstanding.is_empty());
        if let Some((r, _)) = down {
            cl.start(r);
        }
        // Nothing more arrives: no late duplicates.
        match c.recv(Duration::from_millis(500)) {
            Err(canopy_client::ClientError::Timeout(_)) => {}
            other => panic!("an answer after every request was answered: {other:?}"),
        }
        let ok = answers.get(&0).copied().unwrap_or(0);
        let unreach = answers.get(&errno::EHOSTUNREACH).copied().unwrap_or(0);
        assert_eq!(
            ok + unreach,
            SOAK_RPCS as u64,
            "answers other than success or EHOSTUNREACH: {answers:?}"
        );
        assert!(killed.len() >= 5, "only {} kills happened", killed.len());
        assert!(
            unreach > 0,
            "no request met a dead broker: the soak tested nothing"
        );

        // Everyone is back, and the brokers that lived through it did not
        // grow beyond the bound.
        cl.wait_full(Duration::from_secs(30));
        for r in 0..8 {
            let m = c.rpc("broker.ping", r, b"after", RPC_TIMEOUT).unwrap();
            assert_eq!(m.header.nodeid, r);
        }
        let mut growth = Vec::new();
        for r in 0..8u32 {
            if r != 0 && killed.contains(&r) {
                continue;
            }
            let (Some(before), Some(after)) = (rss0[r as usize], cl.rss_kib(r)) else {
                continue;
            };
            growth.push((r, before, after));
            assert!(
                after <= before + RSS_BOUND_KIB,
                "rank {r} grew from {before} KiB to {after} KiB over the soak"
            );
        }
        assert!(
            growth.iter().any(|(r, ..)| *r == 0),
            "rank 0's memory was not measured"
        );
        println!(
            "soak: {SOAK_RPCS} RPCs in {:.1} s ({:.0}/s): {ok} answered, {unreach} EHOSTUNREACH; {} kills (ranks {killed:?}); RSS KiB before -> after (ranks never killed): {growth:?}",
            took.as_secs_f64(),
            SOAK_RPCS as f64 / took.as_secs_f64(),
            killed.len()
        );
    });
}

/// Events seen by a subscriber on rank 7, until the "churn.end" event.
/// `seen` follows the last sequence number it got.
fn subscribe_on(
    cl: &Cluster,
    rank: u32,
    seen: Arc<AtomicU64>,
) -> (mpsc::Receiver<()>, std::thread::JoinHandle<Vec<u64>>) {
    let uri = cl.uri(rank);
    let (ready_tx, ready_rx) = mpsc::channel();
    let h = std::thread::spawn(move || {
        let mut c = Client::connect(Some(&uri)).unwrap();
        c.subscribe("churn.*", RPC_TIMEOUT).unwrap();
        let _ = ready_tx.send(());
        let mut seqs = Vec::new();
        loop {
            let m = c
                .next_event(Duration::from_secs(60))
                .expect("the end event never came");
            if m.header.topic == "churn.end" {
                return seqs;
            }
            seqs.push(m.header.seq);
            seen.store(m.header.seq, Ordering::SeqCst);
        }
    });
    (ready_rx, h)
}

/// Publish `n` events at ~`rate`/s from rank 0; their sequence numbers.
fn publish(c: &mut Client, n: u32, rate: f64) -> Vec<u64> {
    let t0 = Instant::now();
    (0..n)
        .map(|i| {
            let due = Duration::from_secs_f64(i as f64 / rate);
            if let Some(wait) = due.checked_sub(t0.elapsed()) {
                std::thread::sleep(wait);
            }
            c.publish("churn.tick", &i.to_be_bytes(), RPC_TIMEOUT)
                .unwrap()
        })
        .collect()
}

/// `missed_events` of `rank` in `at`'s status.
fn missed(cl: &Cluster, at: u32, rank: u32) -> Option<u64> {
    let s = cl.status(at)?;
    s["ranks"].as_array()?.iter().find(|x| x["rank"] == rank)?["missed_events"].as_u64()
}

#[test]
fn events_through_a_stop_and_a_kill_are_never_duplicated_and_gaps_are_reported() {
    run_test(Duration::from_secs(150), || {
        let mut cl = Cluster::new(8);
        cl.start_all();
        cl.wait_full(Duration::from_secs(30));
        let seen = Arc::new(AtomicU64::new(0));
        let (ready, sub) = subscribe_on(&cl, 7, seen.clone());
        ready.recv_timeout(RPC_TIMEOUT).expect("subscriber ready");
        let mut c = cl.client(0);

        // Phase A: rank 3 (7's parent) stops long enough to be declared
        // lost on both sides, then resumes: the events published meanwhile
        // are replayed, so rank 7 misses none.
        let mut published = publish(&mut c, 100, 200.0);
        cl.signal(3, Signal::SIGSTOP);
        assert!(
            wait_until(Duration::from_secs(5), || cl.status(0).is_some_and(|s| s
                ["ranks"]
                .as_array()
                .is_some_and(|a| a
                    .iter()
                    .any(|x| x["rank"] == 3 && x["state"] == "lost")))),
            "rank 3 was never lost: {:?}",
            cl.status(0)
        );
        published.extend(publish(&mut c, 300, 200.0));
        cl.signal(3, Signal::SIGCONT);
        cl.wait_full(Duration::from_secs(20));
        published.extend(publish(&mut c, 100, 200.0));
        let phase_a_end = *published.last().unwrap();
        // (Delivery is asynchronous: let the tail of phase A arrive.)
        assert!(
            wait_until(Duration::from_secs(10), || seen.load(Ordering::SeqCst)
                >= phase_a_end),
            "rank 7's subscriber never got event {phase_a_end} (last {})",
            seen.load(Ordering::SeqCst)
        );
        assert!(
            cl.log(1).contains("events: replaying") || cl.log(3).contains("events: replaying"),
            "no rank replayed events to a rejoining child; logs:\n{}",
            cl.logs()
        );
        assert!(
            wait_until(Duration::from_secs(5), || missed(&cl, 7, 7) == Some(0)),
            "rank 7 reports missed events after a replayable outage: {:?}",
            cl.status(7)
        );

        // Phase B: rank 3 is killed and restarted: the new rank 3 holds no
        // history, so rank 7 cannot get what was published meanwhile and
        // must report the gap.
        cl.kill(3);
        published.extend(publish(&mut c, 200, 200.0));
        cl.start(3);
        cl.wait_full(Duration::from_secs(20));
        published.extend(publish(&mut c, 100, 200.0));
        c.publish("churn.end", b"", RPC_TIMEOUT).unwrap();
        let got = sub.join().expect("subscriber panicked");

        // Never duplicated, always in order.
        assert!(
            got.windows(2).all(|w| w[0] < w[1]),
            "events out of order or duplicated at rank 7"
        );
        // Phase A: everything arrived.
        let got_a: Vec<u64> = got.iter().copied().filter(|&s| s <= phase_a_end).collect();
        let want_a: Vec<u64> = published
            .iter()
            .copied()
            .filter(|&s| s <= phase_a_end)
            .collect();
        assert_eq!(
            got_a.len(),
            want_a.len(),
            "events lost through a stopped parent (replay): {:?} (first published {:?}); rank 7 log:\n{}",
            want_a.iter().filter(|s| !got_a.contains(s)).collect::<Vec<_>>(),
            want_a.first(),
            cl.log(7)
        );
        assert_eq!(got_a, want_a);
        // Phase B: the lost ones are exactly what rank 7 reports missing.
        let lost: u64 = published.iter().filter(|s| !got.contains(s)).count() as u64;
        assert!(
            lost > 0,
            "no event was lost while rank 3 was dead: nothing tested"
        );
        assert_eq!(got.last(), published.last(), "the last events must arrive");
        assert!(
            wait_until(Duration::from_secs(5), || missed(&cl, 7, 7) == Some(lost)),
            "rank 7 lost {lost} events but reports {:?}",
            missed(&cl, 7, 7)
        );
        // ... and rank 0's status shows it too; the restarted rank 3
        // resumed from the current sequence with nothing missed.
        assert!(
            wait_until(Duration::from_secs(5), || missed(&cl, 0, 7) == Some(lost)),
            "rank 0 does not show rank 7's gap: {:?}",
            cl.status(0)
        );
        assert_eq!(missed(&cl, 3, 3), Some(0), "{:?}", cl.status(3));
        let text = canopy_t::run_canopy(
            &["overlay", "status"],
            &[("CANOPY_URI", &cl.uri(0))],
            RPC_TIMEOUT,
        );
        let out = canopy_t::text(&text.stdout);
        assert!(
            out.contains(&format!("[missed {lost} events]")),
            "overlay status does not show the gap:\n{out}"
        );
    });
}

#[test]
fn responses_meant_for_a_previous_incarnation_are_dropped() {
    run_test(Duration::from_secs(90), || {
        let mut cl = Cluster::new(3);
        cl.start_all();
        cl.wait_full(Duration::from_secs(30));
        // Requests from rank 1's first client to a frozen rank 2 wait at
        // rank 0 ...
        let mut old = cl.client(1);
        cl.signal(2, Signal::SIGSTOP);
        for i in 0..20 {
            old.send("broker.ping", 2, format!("old-{i}").as_bytes())
                .unwrap();
        }
        std::thread::sleep(Duration::from_millis(100));
        // ... while rank 1 dies and comes back as a new incarnation, whose
        // first client has the same client id and the same matchtags.
        cl.kill(1);
        drop(old);
        cl.start(1);
        let mut new = cl.client(1);
        assert!(
            wait_until(Duration::from_secs(5), || new
                .rpc("broker.ping", 0, b"up", RPC_TIMEOUT)
                .is_ok()),
            "rank 1 did not rejoin: {}",
            cl.logs()
        );
        let tags: Vec<u32> = (0..20)
            .map(|i| {
                new.send("broker.ping", 2, format!("new-{i}").as_bytes())
                    .unwrap()
            })
            .collect();
        cl.signal(2, Signal::SIGCONT);
        // The new client gets its own answers, and nothing else.
        for (i, tag) in tags.into_iter().enumerate() {
            let m = new.wait(tag, RPC_TIMEOUT).unwrap_or_else(|e| {
                panic!("request {i}: {e}\n{}", cl.logs());
            });
            assert_eq!(
                String::from_utf8_lossy(&m.payload),
                format!("new-{i}"),
                "a response meant for the previous incarnation was delivered"
            );
        }
        match new.recv(Duration::from_millis(500)) {
            Err(canopy_client::ClientError::Timeout(_)) => {}
            other => panic!("an extra message reached the new incarnation: {other:?}"),
        }
    });
}
