//! PmiServer against PmiClient and against raw lines.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::{Duration, Instant};

use canopy_pmi::{AbortInfo, PmiClient, PmiError, PmiEvent, PmiServer, PmiServerHandle};

const WAIT: Duration = Duration::from_secs(10);

/// The server thread ends soon after it closes its event channel (the
/// channel closes first, so `is_finished` may lag by a moment).
fn finishes(h: &PmiServerHandle) -> bool {
    let deadline = Instant::now() + WAIT;
    while !h.is_finished() {
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(1));
    }
    true
}

fn next_event(h: &PmiServerHandle) -> PmiEvent {
    h.events()
        .recv_timeout(WAIT)
        .expect("expected a pmi event within 10 s")
}

/// A raw connection for sending hand-written lines.
struct Raw {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Raw {
    fn new(s: UnixStream) -> Self {
        s.set_read_timeout(Some(WAIT)).unwrap();
        Raw {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
        }
    }
    fn send(&mut self, bytes: &[u8]) {
        self.w.write_all(bytes).unwrap();
    }
    fn line(&mut self) -> String {
        let mut l = String::new();
        self.r.read_line(&mut l).unwrap();
        l
    }
    fn call(&mut self, line: &str) -> String {
        self.send(line.as_bytes());
        self.line()
    }
    /// True if nothing arrives within `d`.
    fn silent_for(&mut self, d: Duration) -> bool {
        self.r.get_ref().set_read_timeout(Some(d)).unwrap();
        let mut l = String::new();
        let res = self.r.read_line(&mut l);
        self.r.get_ref().set_read_timeout(Some(WAIT)).unwrap();
        match res {
            Err(e) => matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
            Ok(_) => false,
        }
    }
    fn at_eof(&mut self) -> bool {
        let mut buf = [0u8; 64];
        loop {
            match self.r.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(_) => return false,
            }
        }
    }
}

fn run_job(size: u32) -> Duration {
    let start = Instant::now();
    let (server, children) = PmiServer::new(size).unwrap();
    let handle = server.spawn().unwrap();
    let threads: Vec<_> = children
        .into_iter()
        .enumerate()
        .map(|(rank, s)| {
            thread::spawn(move || {
                let rank = rank as u32;
                let mut c = PmiClient::connect(s, rank, size).unwrap();
                c.init().unwrap();
                assert_eq!(c.universe_size().unwrap(), size as i32);
                assert_eq!(c.appnum().unwrap(), 0);
                c.put(&format!("uri-{rank}"), &format!("tcp://10.0.0.{rank}:5000"))
                    .unwrap();
                c.barrier().unwrap();
                // Every rank reads every other rank's key.
                for other in 0..size {
                    let v = c.get(&format!("uri-{other}")).unwrap();
                    assert_eq!(v, format!("tcp://10.0.0.{other}:5000"));
                }
                // A second barrier works too (the count resets).
                c.barrier().unwrap();
                c.finalize().unwrap();
                c.kvsname().unwrap().to_owned()
            })
        })
        .collect();
    let names: Vec<String> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(
        names.windows(2).all(|w| w[0] == w[1]),
        "one kvsname per job"
    );

    let mut finalized = vec![false; size as usize];
    for _ in 0..size {
        match next_event(&handle) {
            PmiEvent::Finalized { rank } => finalized[rank as usize] = true,
            other => panic!("unexpected event {other:?}"),
        }
    }
    assert!(finalized.iter().all(|&f| f));
    // All clients dropped their connections: the server ends by itself and
    // closes the event channel, without reporting a disconnect.
    assert!(handle.events().recv_timeout(WAIT).is_err());
    assert!(finishes(&handle));
    assert_eq!(handle.aborted(), None);
    start.elapsed()
}

#[test]
fn four_ranks_exchange_keys_through_a_barrier() {
    run_job(4);
}

#[test]
fn sixty_four_ranks_complete_quickly() {
    let took = run_job(64);
    assert!(took < Duration::from_secs(5), "64 ranks took {took:?}");
}

#[test]
fn a_thousand_ranks_on_one_server_thread() {
    // Raw lines from one thread: every rank puts, enters the barrier, then
    // all read barrier_out and one key each.
    let size = 1024u32;
    let (server, children) = match PmiServer::new(size) {
        Ok(pair) => pair,
        // 2048 descriptors: a soft limit of 1024 cannot hold them. That is the
        // launcher's documented limit, not a bug here.
        Err(e @ PmiError::Socketpair { .. }) => {
            eprintln!("skipping the 1024-rank test: {e}");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let handle = server.spawn().unwrap();
    let start = Instant::now();
    let mut raws: Vec<Raw> = children.into_iter().map(Raw::new).collect();
    for (rank, r) in raws.iter_mut().enumerate() {
        assert_eq!(
            r.call(&format!("cmd=put key=k{rank} value=v{rank}\n")),
            "cmd=put_result rc=0 msg=success\n"
        );
        r.send(b"cmd=barrier_in\n");
    }
    for (rank, r) in raws.iter_mut().enumerate() {
        assert_eq!(r.line(), "cmd=barrier_out\n");
        let next = (rank + 1) % size as usize;
        assert_eq!(
            r.call(&format!("cmd=get key=k{next}\n")),
            format!("cmd=get_result rc=0 msg=success value=v{next}\n")
        );
    }
    let took = start.elapsed();
    assert!(took < Duration::from_secs(10), "1024 ranks took {took:?}");
    handle.stop();
}

#[test]
fn barrier_waits_for_the_last_rank() {
    let (server, children) = PmiServer::new(4).unwrap();
    let handle = server.spawn().unwrap();
    let mut raws: Vec<Raw> = children.into_iter().map(Raw::new).collect();
    for r in &mut raws[..3] {
        r.send(b"cmd=barrier_in\n");
    }
    for r in &mut raws[..3] {
        assert!(
            r.silent_for(Duration::from_millis(200)),
            "barrier_out before the last rank entered"
        );
    }
    // The last rank can still be served while the others wait.
    assert_eq!(
        raws[3].call("cmd=put key=late value=1\n"),
        "cmd=put_result rc=0 msg=success\n"
    );
    raws[3].send(b"cmd=barrier_in\n");
    for r in &mut raws {
        assert_eq!(r.line(), "cmd=barrier_out\n");
    }
    drop(handle);
}

#[test]
fn replies_match_hydra_byte_for_byte() {
    let (server, children) = PmiServer::new(2).unwrap();
    let kvs = server.kvsname().to_owned();
    let handle = server.spawn().unwrap();
    let mut r = Raw::new(children.into_iter().next().unwrap());
    assert_eq!(
        r.call("cmd=init pmi_version=1 pmi_subversion=1\n"),
        "cmd=response_to_init pmi_version=1 pmi_subversion=1 rc=0\n"
    );
    assert_eq!(
        r.call("cmd=get_maxes\n"),
        "cmd=maxes kvsname_max=256 keylen_max=64 vallen_max=1024 rc=0\n"
    );
    assert_eq!(
        r.call("cmd=get_my_kvsname\n"),
        format!("cmd=my_kvsname kvsname={kvs} rc=0\n")
    );
    assert_eq!(r.call("cmd=get_appnum\n"), "cmd=appnum appnum=0 rc=0\n");
    assert_eq!(
        r.call("cmd=get_universe_size\n"),
        "cmd=universe_size size=2 rc=0\n"
    );
    assert_eq!(
        r.call(&format!("cmd=put kvsname={kvs} key=k value=a=b==\n")),
        "cmd=put_result rc=0 msg=success\n"
    );
    assert_eq!(
        r.call(&format!("cmd=get kvsname={kvs} key=k\n")),
        "cmd=get_result rc=0 msg=success value=a=b==\n"
    );
    assert_eq!(
        r.call(&format!("cmd=get kvsname={kvs} key=nosuch\n")),
        "cmd=get_result rc=-1 msg=key_nosuch_not_found value=unknown\n"
    );
    assert_eq!(r.call("cmd=finalize\n"), "cmd=finalize_ack\n");
    drop(handle);
}

#[test]
fn malformed_input_gets_errors_or_a_closed_connection_never_a_crash() {
    let (server, children) = PmiServer::new(3).unwrap();
    let handle = server.spawn().unwrap();
    let mut it = children.into_iter();
    let mut a = Raw::new(it.next().unwrap());
    let mut b = Raw::new(it.next().unwrap());
    let mut c = Raw::new(it.next().unwrap());

    // Errors the protocol can answer: the connection stays usable.
    let reply = a.call("cmd=put key=k value=has space\n");
    assert!(
        reply.starts_with("cmd=put_result rc=-1 msg=bad_request:"),
        "{reply}"
    );
    assert_eq!(
        reply.trim_end().matches(' ').count(),
        2,
        "one token per field: {reply}"
    );
    let reply = a.call("cmd=get kvsname=x\n");
    assert!(
        reply.starts_with("cmd=get_result rc=-1 msg=bad_request:"),
        "{reply}"
    );
    assert!(reply.ends_with(" value=unknown\n"), "{reply}");
    assert_eq!(
        a.call("cmd=init pmi_version=one pmi_subversion=1\n"),
        "cmd=response_to_init pmi_version=1 pmi_subversion=1 rc=-1\n"
    );
    assert_eq!(
        a.call("cmd=init pmi_version=2 pmi_subversion=0\n"),
        "cmd=response_to_init pmi_version=1 pmi_subversion=1 rc=-1\n"
    );
    assert_eq!(
        a.call(&format!("cmd=put key={} value=v\n", "k".repeat(64))),
        "cmd=put_result rc=-1 msg=pmi_key_is_64_bytes_but_at_most_63_are_allowed;_shorten_it\n"
    );
    assert_eq!(
        a.call(&format!("cmd=put key=k value={}\n", "v".repeat(1024))),
        "cmd=put_result rc=-1 msg=value_longer_than_1023_bytes\n"
    );
    assert_eq!(
        a.call("cmd=put kvsname=someone_else key=k value=v\n"),
        "cmd=put_result rc=-1 msg=unknown_kvsname_someone_else\n"
    );
    assert_eq!(a.call("cmd=get_appnum\n"), "cmd=appnum appnum=0 rc=0\n");

    // Errors it cannot: that connection is closed and reported.
    a.send(b"hello world\n");
    assert!(a.at_eof());
    match next_event(&handle) {
        PmiEvent::ProtocolError { rank: 0, reason } => assert!(reason.contains("cmd="), "{reason}"),
        other => panic!("{other:?}"),
    }
    b.send(b"cmd=put key=\xff\xfe value=v\n");
    assert!(b.at_eof());
    assert!(matches!(
        next_event(&handle),
        PmiEvent::ProtocolError { rank: 1, .. }
    ));
    // The server hangs up part-way through, so this write may fail.
    let _ = c.w.write_all(&vec![b'x'; 64 * 1024]);
    assert!(c.at_eof());
    match next_event(&handle) {
        PmiEvent::ProtocolError { rank: 2, reason } => {
            assert!(reason.contains("longer"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    // Every connection is gone, so the server thread ends on its own.
    assert!(handle.events().recv_timeout(WAIT).is_err());
    assert!(finishes(&handle));
}

#[test]
fn unknown_commands_and_mcmd_close_only_that_rank() {
    let (server, children) = PmiServer::new(2).unwrap();
    let handle = server.spawn().unwrap();
    let mut it = children.into_iter();
    let mut a = Raw::new(it.next().unwrap());
    let mut b = Raw::new(it.next().unwrap());
    a.send(b"mcmd=spawn\nnprocs=1\nexecname=/bin/true\nendcmd\n");
    assert!(a.at_eof());
    assert!(matches!(
        next_event(&handle),
        PmiEvent::ProtocolError { rank: 0, .. }
    ));
    b.send(b"cmd=bogus\n");
    assert!(b.at_eof());
    match next_event(&handle) {
        PmiEvent::ProtocolError { rank: 1, reason } => {
            assert!(reason.contains("bogus"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn entering_the_barrier_twice_is_a_protocol_error() {
    let (server, children) = PmiServer::new(2).unwrap();
    let handle = server.spawn().unwrap();
    let mut a = Raw::new(children.into_iter().next().unwrap());
    a.send(b"cmd=barrier_in\ncmd=barrier_in\n");
    assert!(a.at_eof());
    assert!(matches!(
        next_event(&handle),
        PmiEvent::ProtocolError { rank: 0, .. }
    ));
}

#[test]
fn abort_is_recorded_and_reported() {
    let (server, children) = PmiServer::new(2).unwrap();
    let handle = server.spawn().unwrap();
    let mut it = children.into_iter();
    let mut c0 = PmiClient::connect(it.next().unwrap(), 0, 2).unwrap();
    let mut c1 = PmiClient::connect(it.next().unwrap(), 1, 2).unwrap();
    c1.init().unwrap();
    c1.abort(7, "cannot bind port 5000").unwrap();
    assert_eq!(
        next_event(&handle),
        PmiEvent::Abort {
            rank: 1,
            code: Some(7),
            msg: Some("cannot_bind_port_5000".into())
        }
    );
    assert_eq!(
        handle.aborted(),
        Some(AbortInfo {
            rank: 1,
            code: Some(7),
            msg: Some("cannot_bind_port_5000".into())
        })
    );
    // A later abort does not replace the first.
    c0.abort(9, "me too").unwrap();
    assert!(matches!(
        next_event(&handle),
        PmiEvent::Abort { rank: 0, .. }
    ));
    assert_eq!(handle.aborted().unwrap().rank, 1);
}

#[test]
fn a_rank_that_hangs_up_before_finalize_is_reported() {
    let (server, children) = PmiServer::new(2).unwrap();
    let handle = server.spawn().unwrap();
    let mut it = children.into_iter();
    let mut c0 = PmiClient::connect(it.next().unwrap(), 0, 2).unwrap();
    c0.init().unwrap();
    drop(c0);
    assert_eq!(next_event(&handle), PmiEvent::Disconnected { rank: 0 });
    // A rank that finalizes and then hangs up is not a disconnect.
    let mut c1 = PmiClient::connect(it.next().unwrap(), 1, 2).unwrap();
    c1.init().unwrap();
    c1.finalize().unwrap();
    drop(c1);
    assert_eq!(next_event(&handle), PmiEvent::Finalized { rank: 1 });
    assert!(
        handle.events().recv_timeout(WAIT).is_err(),
        "no further events"
    );
}

#[test]
fn stopping_the_server_makes_a_blocked_client_fail() {
    let (server, children) = PmiServer::new(2).unwrap();
    let handle = server.spawn().unwrap();
    let mut it = children.into_iter();
    let _rank1_never_arrives = it.next_back().unwrap();
    let s0 = it.next().unwrap();
    let t = thread::spawn(move || {
        let mut c = PmiClient::connect(s0, 0, 2).unwrap();
        c.init().unwrap();
        c.barrier()
    });
    thread::sleep(Duration::from_millis(100));
    let start = Instant::now();
    handle.stop();
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "stop must be prompt"
    );
    match t.join().unwrap() {
        Err(PmiError::Closed { op: "barrier_in" }) => {}
        other => panic!("expected Closed, got {other:?}"),
    }
}

#[test]
fn dropping_the_handle_stops_the_server() {
    let (server, children) = PmiServer::new(1).unwrap();
    let handle = server.spawn().unwrap();
    let mut c = PmiClient::connect(children.into_iter().next().unwrap(), 0, 1).unwrap();
    c.init().unwrap();
    drop(handle);
    assert!(matches!(c.barrier(), Err(PmiError::Closed { .. })));
}

#[test]
fn client_against_server_reports_maxima_and_missing_keys() {
    let (server, children) = PmiServer::new(1).unwrap();
    let _handle = server.spawn().unwrap();
    let mut c = PmiClient::connect(children.into_iter().next().unwrap(), 0, 1).unwrap();
    c.init().unwrap();
    assert_eq!(c.max_key_len(), 63);
    assert_eq!(c.max_value_len(), 1023);
    assert!(matches!(c.get("absent"), Err(PmiError::KeyNotFound { .. })));
}

#[test]
fn zero_ranks_is_an_error() {
    let err = PmiServer::new(0).unwrap_err();
    assert!(matches!(err, PmiError::ZeroSize));
    assert!(err.to_string().contains("at least one rank"));
}
