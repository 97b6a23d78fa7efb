//! Who may talk to a broker: CURVE peers with unknown keys, NULL-mechanism
//! peers and garbage on the overlay socket get nothing; garbage on the local
//! socket and clients of another uid are disconnected; the instance keeps
//! working afterwards.
#![forbid(unsafe_code)]

use canopy_proto::Header;
use canopy_t::users::{as_other_user, is_root, open_to_other_users, other_user, OTHER_USER};
use canopy_t::{run_canopy, run_test, text, Instance};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(60);

/// Rank 0's CURVE public key, from `overlay.status`.
fn rank0_public_key(inst: &Instance) -> [u8; 32] {
    let st = inst.status(0);
    assert_eq!(
        st["broker"]["endpoint"].as_str(),
        Some(inst.tbon_endpoint(0).as_str()),
        "overlay.status names another ROUTER endpoint: {st}"
    );
    let z85 = st["broker"]["public_key"]
        .as_str()
        .unwrap_or_else(|| panic!("no broker.public_key in {st}"));
    canopy_security::decode_public_key(z85).expect("public key is 40 Z85 characters")
}

/// A DEALER with a socket monitor attached.
struct Peer {
    sock: zmq::Socket,
    mon: zmq::Socket,
    _ctx: zmq::Context,
}

static MONITORS: AtomicU32 = AtomicU32::new(0);

/// The monitor stops before its receiver goes (see
/// `canopy_sys::stop_monitor`): else the context's end could block.
impl Drop for Peer {
    fn drop(&mut self) {
        let _ = canopy_sys::stop_monitor(&mut self.sock);
    }
}

impl Peer {
    fn new(setup: impl FnOnce(&zmq::Socket)) -> Peer {
        let ctx = zmq::Context::new();
        let sock = ctx.socket(zmq::DEALER).unwrap();
        sock.set_linger(0).unwrap();
        setup(&sock);
        let ep = format!(
            "inproc://monitor-{}",
            MONITORS.fetch_add(1, Ordering::Relaxed)
        );
        sock.monitor(&ep, zmq::SocketEvent::ALL as i32).unwrap();
        let mon = ctx.socket(zmq::PAIR).unwrap();
        mon.set_linger(0).unwrap();
        mon.connect(&ep).unwrap();
        Peer {
            sock,
            mon,
            _ctx: ctx,
        }
    }

    /// Send a request header (+ payload) without blocking.
    fn send_request(&self, topic: &str, nodeid: u32, payload: &[u8]) {
        let h = Header::request(topic, nodeid, 1).encode().unwrap();
        self.sock
            .send(&h[..], zmq::SNDMORE | zmq::DONTWAIT)
            .and_then(|()| self.sock.send(payload, zmq::DONTWAIT))
            .expect("a DEALER queues messages while it connects");
    }

    /// Monitor events seen within `timeout`, stopping early at any of `until`.
    fn events(&self, timeout: Duration, until: &[zmq::SocketEvent]) -> Vec<zmq::SocketEvent> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.mon.poll(zmq::POLLIN, left.as_millis() as i64).unwrap() == 0 {
                return seen;
            }
            let parts = self.mon.recv_multipart(0).unwrap();
            let ev = zmq::SocketEvent::from_raw(u16::from_le_bytes([parts[0][0], parts[0][1]]));
            seen.push(ev);
            if until.contains(&ev) {
                return seen;
            }
        }
    }

    /// Whether anything arrives within `timeout`.
    fn receives_within(&self, timeout: Duration) -> bool {
        self.sock
            .poll(zmq::POLLIN, timeout.as_millis() as i64)
            .unwrap()
            > 0
    }
}

#[test]
fn unknown_curve_key_is_denied() {
    run_test(LIMIT, || {
        let inst = Instance::start(4, 2, &[]);
        let server_key = rank0_public_key(&inst);
        let rogue = zmq::CurveKeyPair::new().unwrap();
        let principal = canopy_security::curve_principal(&rogue.public_key);
        let peer = Peer::new(|s| {
            s.set_identity(b"1:0123456789abcdef").unwrap();
            s.set_curve_serverkey(&server_key).unwrap();
            s.set_curve_publickey(&rogue.public_key).unwrap();
            s.set_curve_secretkey(&rogue.secret_key).unwrap();
            s.connect(&inst.tbon_endpoint(0)).unwrap();
        });
        peer.send_request("overlay.hello", 0, b"rank 1 says hello");
        peer.send_request("broker.ping", 0, b"let me in");

        let events = peer.events(
            Duration::from_secs(5),
            &[
                zmq::SocketEvent::HANDSHAKE_FAILED_AUTH,
                zmq::SocketEvent::HANDSHAKE_SUCCEEDED,
            ],
        );
        assert!(
            events.contains(&zmq::SocketEvent::HANDSHAKE_FAILED_AUTH),
            "handshake was not refused by authentication; monitor saw {events:?}"
        );
        assert!(!events.contains(&zmq::SocketEvent::HANDSHAKE_SUCCEEDED));
        assert!(
            !peer.receives_within(Duration::from_secs(1)),
            "the rogue peer got a reply"
        );
        let line = inst.wait_log_line(
            &["verdict=deny", "unknown key", &principal],
            Duration::from_secs(5),
        );
        assert!(
            line.is_some(),
            "no ZAP deny line for {principal}; log:\n{}",
            inst.stderr_text()
        );
        inst.assert_all_ranks_answer();
    });
}

#[test]
fn null_mechanism_and_garbage_get_nothing() {
    run_test(LIMIT, || {
        let inst = Instance::start(4, 2, &[]);
        let peer = Peer::new(|s| {
            s.set_identity(b"1:0123456789abcdef").unwrap();
            s.connect(&inst.tbon_endpoint(0)).unwrap();
        });
        peer.send_request("broker.ping", 0, b"no curve");
        let events = peer.events(
            Duration::from_secs(5),
            &[
                zmq::SocketEvent::HANDSHAKE_SUCCEEDED,
                zmq::SocketEvent::HANDSHAKE_FAILED_PROTOCOL,
                zmq::SocketEvent::HANDSHAKE_FAILED_NO_DETAIL,
                zmq::SocketEvent::HANDSHAKE_FAILED_AUTH,
            ],
        );
        assert!(
            !events.contains(&zmq::SocketEvent::HANDSHAKE_SUCCEEDED),
            "a NULL-mechanism peer completed a handshake: {events:?}"
        );
        assert!(
            events.iter().any(|e| matches!(
                e,
                zmq::SocketEvent::HANDSHAKE_FAILED_PROTOCOL
                    | zmq::SocketEvent::HANDSHAKE_FAILED_NO_DETAIL
                    | zmq::SocketEvent::HANDSHAKE_FAILED_AUTH
            )),
            "no handshake failure seen: {events:?}"
        );
        assert!(
            !peer.receives_within(Duration::from_secs(1)),
            "a NULL-mechanism peer got a reply"
        );

        // Raw bytes on the overlay socket: the broker closes the connection.
        let mut raw = UnixStream::connect(inst.tbon_path(0)).expect("connect to tbon-0");
        let garbage: Vec<u8> = (0..16384u32).map(|i| (i * 7919 % 251) as u8).collect();
        let _ = raw.write_all(&garbage);
        assert!(
            closed_within(&mut raw, Duration::from_secs(5)),
            "the broker kept a connection that sent garbage"
        );
        inst.assert_all_ranks_answer();
    });
}

/// Read until the peer closes (true) or `timeout` passes (false).
fn closed_within(s: &mut UnixStream, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return true, // reset
        }
    }
}

#[test]
fn garbage_on_the_local_socket_disconnects_only_that_client() {
    run_test(LIMIT, || {
        let inst = Instance::start(2, 2, &[]);
        // A header length far beyond the limit.
        let mut a = UnixStream::connect(inst.local_path(0)).unwrap();
        a.write_all(&[0xff; 64]).unwrap();
        assert!(closed_within(&mut a, Duration::from_secs(5)));
        // Plausible lengths, undecodable header.
        let mut b = UnixStream::connect(inst.local_path(1)).unwrap();
        let mut frame = Vec::new();
        frame.extend_from_slice(&40u32.to_be_bytes());
        frame.extend_from_slice(&0u32.to_be_bytes());
        frame.extend_from_slice(&[0xab; 40]);
        b.write_all(&frame).unwrap();
        assert!(closed_within(&mut b, Duration::from_secs(5)));
        assert!(
            inst.wait_log_line(&["bad frame", "disconnecting"], Duration::from_secs(5))
                .is_some(),
            "no log line about the bad frame:\n{}",
            inst.stderr_text()
        );
        inst.assert_all_ranks_answer();
    });
}

#[test]
fn another_uid_is_refused_at_the_local_socket() {
    run_test(LIMIT, || {
        if !is_root() {
            eprintln!(
                "SKIPPED another_uid_is_refused_at_the_local_socket: needs root to create and switch to user {OTHER_USER}"
            );
            return;
        }
        let uid = other_user();
        let inst = Instance::start(2, 2, &[]);
        let (canopy, peer) = open_to_other_users(&inst);
        let local0 = inst.local_path(0);

        // What the broker tells a refused client, read by a peer that sends
        // nothing: one EPERM frame saying why, then the connection closes.
        let out = as_other_user(&peer, &["read-local", local0.to_str().unwrap(), "5000"]);
        let stdout = text(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(0),
            "the broker did not close the connection:\n{stdout}{}",
            text(&out.stderr)
        );
        let frames: Vec<&str> = stdout.lines().filter(|l| l.starts_with("frame ")).collect();
        assert_eq!(frames.len(), 1, "expected one refusal frame:\n{stdout}");
        assert!(
            frames[0].contains("errnum=1 ")
                && frames[0].contains("payload=permission denied")
                && frames[0].contains(&format!("unix:{OTHER_USER}")),
            "not an EPERM refusal naming {OTHER_USER}: {}",
            frames[0]
        );

        // The CLI gets no answer and fails.
        let out = as_other_user(
            &canopy,
            &[
                "ping",
                "--count",
                "1",
                "--timeout",
                "5",
                "--uri",
                inst.uri(),
            ],
        );
        assert!(
            !out.status.success(),
            "{OTHER_USER} could ping:\n{}",
            text(&out.stdout)
        );
        assert!(
            !text(&out.stdout).contains("broker.ping"),
            "{OTHER_USER} got a ping reply:\n{}",
            text(&out.stdout)
        );

        let line = inst.wait_log_line(
            &[
                "verdict=deny",
                &format!("principal=unix:{OTHER_USER}"),
                &format!("uid={uid}"),
            ],
            Duration::from_secs(5),
        );
        assert!(
            line.is_some(),
            "no deny line for {OTHER_USER} in the log:\n{}",
            inst.stderr_text()
        );
        // The owner still gets in, through the same (now world-writable) socket.
        let out = run_canopy(
            &["ping", "--count", "1", "--uri", inst.uri()],
            &[],
            Duration::from_secs(30),
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        inst.assert_all_ranks_answer();
    });
}

/// The CLI should tell a refused user why. It writes its request right
/// after connecting; if the broker has already refused and closed the
/// connection, the write fails with EPIPE and the client reports "lost
/// connection: Broken pipe" without reading the refusal waiting for it.
#[test]
fn another_uid_is_told_permission_denied() {
    run_test(LIMIT, || {
        if !is_root() {
            eprintln!("SKIPPED another_uid_is_told_permission_denied: needs root");
            return;
        }
        other_user();
        let inst = Instance::start(1, 2, &[]);
        let (canopy, _) = open_to_other_users(&inst);
        for i in 0..5 {
            let out = as_other_user(
                &canopy,
                &[
                    "ping",
                    "--count",
                    "1",
                    "--timeout",
                    "5",
                    "--uri",
                    inst.uri(),
                ],
            );
            let stderr = text(&out.stderr);
            assert!(!out.status.success(), "run {i}: {OTHER_USER} could ping");
            assert!(
                stderr.contains("permission denied") && stderr.contains("not the owner"),
                "run {i}: expected the broker's refusal, got: {stderr}"
            );
        }
    });
}
