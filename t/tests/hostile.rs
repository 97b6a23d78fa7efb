//! Hostile input, case by case (issue 12). Each case checks three things:
//! the broker refused or cut the attacker, it logged the refusal (a line
//! written after the case began), and it still serves the owner (a ping
//! right after). Cases are rows of a table per class; each class shares one
//! instance, so the whole file runs in well under a minute.
//!
//! Classes: the handshake on the overlay and remote client endpoints;
//! malformed, forged and spoofed messages from an admitted client;
//! local-socket abuse; authorization and revocation; liveness abuse. (Files
//! and permissions are in `t/tests/trust.rs`.)
#![forbid(unsafe_code)]

use canopy_client::{ClientError, TcpKeys};
use canopy_proto::{errno, Header, Hop, MsgType, Roles};
use canopy_t::hostile::{
    client_endpoint, closed_within, remote_client, remote_key, rule, tcp_closed_within,
    write_policy, Continue, UserProc, ZPeer,
};
use canopy_t::users::{is_root, open_to_other_users, other_user, OTHER_USER};
use canopy_t::{run_canopy, run_test, text, wait_until, Instance, RPC_TIMEOUT};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use zmq::SocketEvent as Ev;

const LIMIT: Duration = Duration::from_secs(150);
/// How long a refusal may take to reach the log.
const LOG_WAIT: Duration = Duration::from_secs(5);

/// What the cases of one class share.
struct Ctx {
    inst: Instance,
    dir: tempfile::TempDir,
    policy: PathBuf,
    /// A remote key with the `user` role, and its principal.
    user: (PathBuf, String),
    /// A remote key with the `operator` role.
    operator: (PathBuf, String),
    /// The test peer, where OTHER_USER can run it (root only).
    peer: Option<PathBuf>,
}

/// One row: the attack, which asserts that the broker refused or cut it,
/// and returns what one log line written since the case began must hold.
struct Case {
    name: &'static str,
    /// Needs root (another uid); skipped otherwise.
    root: bool,
    run: fn(&Ctx) -> Vec<String>,
}

const fn case(name: &'static str, run: fn(&Ctx) -> Vec<String>) -> Case {
    Case {
        name,
        root: false,
        run,
    }
}

const fn root_case(name: &'static str, run: fn(&Ctx) -> Vec<String>) -> Case {
    Case {
        name,
        root: true,
        run,
    }
}

fn needles(n: &[&str]) -> Vec<String> {
    n.iter().map(|s| s.to_string()).collect()
}

/// The policy every class starts with: the two remote keys, and
/// OTHER_USER as a user.
fn base_policy(user: &str, operator: &str) -> String {
    format!(
        "{}{}{}",
        rule("user-key", user, "\"user\""),
        rule("operator-key", operator, "\"operator\""),
        rule("other", &format!("unix:{OTHER_USER}"), "\"user\"")
    )
}

impl Ctx {
    fn new(size: u32, extra: &[&str]) -> Ctx {
        let dir = tempfile::tempdir().unwrap();
        let user = remote_key(dir.path(), "user");
        let operator = remote_key(dir.path(), "operator");
        let policy = dir.path().join("policy.toml");
        write_policy(&policy, &base_policy(&user.1, &operator.1));
        let mut args = vec![
            "--policy",
            policy.to_str().unwrap(),
            "--listen-clients",
            "tcp://127.0.0.1:*",
            "--heartbeat",
            "0.2",
            "--torpid",
            "1",
            "--lost",
            "2",
        ];
        args.extend_from_slice(extra);
        let inst = Instance::start_with_env(size, 2, &args, &[("RUST_LOG", "info")]);
        let peer = if is_root() {
            other_user();
            Some(open_to_other_users(&inst).1)
        } else {
            None
        };
        Ctx {
            inst,
            dir,
            policy,
            user,
            operator,
            peer,
        }
    }

    fn log_since(&self, mark: usize) -> String {
        let all = self.inst.stderr_text();
        all.get(mark..).unwrap_or("").to_string()
    }

    /// Run every case; panics listing the ones that failed.
    fn run(&self, cases: &[Case]) {
        let mut owner = self.inst.client(0);
        let mut failed = Vec::new();
        let mut ran = 0;
        for c in cases {
            if c.root && self.peer.is_none() {
                eprintln!("SKIPPED case {}: needs root to run as another uid", c.name);
                continue;
            }
            ran += 1;
            let t0 = Instant::now();
            let mark = self.inst.stderr_text().len();
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| (c.run)(self)));
            let needles = match result {
                Ok(n) => n,
                Err(p) => {
                    let msg = p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    failed.push(format!("{}: not refused: {msg}", c.name));
                    continue;
                }
            };
            let mut line = None;
            wait_until(LOG_WAIT, || {
                line = self
                    .log_since(mark)
                    .lines()
                    .find(|l| needles.iter().all(|n| l.contains(n.as_str())))
                    .map(str::to_string);
                line.is_some()
            });
            if line.is_none() {
                failed.push(format!(
                    "{}: no log line with {needles:?}; logged since:\n{}",
                    c.name,
                    self.log_since(mark)
                ));
                continue;
            }
            if let Err(e) = Instance::ping(&mut owner, 0, b"still serving") {
                failed.push(format!(
                    "{}: the owner's ping failed afterwards: {e}",
                    c.name
                ));
                owner = self.inst.client(0);
                continue;
            }
            println!("case {}: ok in {:?}", c.name, t0.elapsed());
        }
        assert!(
            failed.is_empty(),
            "{} of {ran} cases failed:\n{}",
            failed.len(),
            failed.join("\n---\n")
        );
        self.inst.assert_all_ranks_answer();
    }
}

// ----- raw bytes -----

/// A ZMTP 3.0 greeting announcing `mechanism`, as a client.
fn greeting(mechanism: &str) -> Vec<u8> {
    let mut g = vec![0xff, 0, 0, 0, 0, 0, 0, 0, 1, 0x7f, 3, 0];
    let mut m = mechanism.as_bytes().to_vec();
    m.resize(20, 0);
    g.extend_from_slice(&m);
    g.push(0);
    g.resize(64, 0);
    g
}

fn garbage(n: usize) -> Vec<u8> {
    (0..n as u32).map(|i| (i * 7919 % 251) as u8).collect()
}

/// A raw connection to the overlay (ipc) or client (TCP) endpoint.
enum Raw {
    Unix(UnixStream),
    Tcp(std::net::TcpStream),
}

impl Raw {
    fn connect(ctx: &Ctx, overlay: bool) -> Raw {
        if overlay {
            Raw::Unix(UnixStream::connect(ctx.inst.tbon_path(0)).expect("connect to tbon-0"))
        } else {
            let (ep, _) = client_endpoint(&ctx.inst);
            let addr = ep.trim_start_matches("tcp://");
            Raw::Tcp(std::net::TcpStream::connect(addr).expect("connect to the client endpoint"))
        }
    }

    fn write(&mut self, b: &[u8]) {
        let _ = match self {
            Raw::Unix(s) => s.write_all(b),
            Raw::Tcp(s) => s.write_all(b),
        };
    }

    fn closed_within(&mut self, t: Duration) -> bool {
        match self {
            Raw::Unix(s) => closed_within(s, t),
            Raw::Tcp(s) => tcp_closed_within(s, t),
        }
    }
}

fn endpoint(ctx: &Ctx, overlay: bool) -> String {
    if overlay {
        ctx.inst.tbon_endpoint(0)
    } else {
        client_endpoint(&ctx.inst).0
    }
}

fn server_key(ctx: &Ctx) -> [u8; 32] {
    let st = ctx.inst.status(0);
    canopy_security::decode_public_key(st["broker"]["public_key"].as_str().unwrap()).unwrap()
}

fn which(overlay: bool) -> &'static str {
    if overlay {
        "endpoint=overlay"
    } else {
        "endpoint=client"
    }
}

/// A peer whose handshake must fail: no HANDSHAKE_SUCCEEDED, one of the
/// failures, and nothing delivered to it.
fn assert_handshake_fails(p: &ZPeer) {
    let h = Header::request("broker.ping", 0, 1).encode().unwrap();
    p.send(&[&h, b"let me in"]);
    let fails = [
        Ev::HANDSHAKE_FAILED_PROTOCOL,
        Ev::HANDSHAKE_FAILED_NO_DETAIL,
        Ev::HANDSHAKE_FAILED_AUTH,
    ];
    let mut until = fails.to_vec();
    until.push(Ev::HANDSHAKE_SUCCEEDED);
    let ev = p.events(Duration::from_secs(5), &until);
    assert!(
        !ev.contains(&Ev::HANDSHAKE_SUCCEEDED),
        "the handshake succeeded: {ev:?}"
    );
    assert!(
        ev.iter().any(|e| fails.contains(e)) || ev.contains(&Ev::DISCONNECTED),
        "no handshake failure seen: {ev:?}"
    );
    assert!(
        !p.receives_within(Duration::from_millis(300)),
        "a refused peer got a reply"
    );
}

fn curve_peer(ep: &str, server: &[u8; 32], kp: &canopy_security::CurveKeypair) -> ZPeer {
    ZPeer::new(|s| {
        s.set_identity(b"1:0123456789abcdef").unwrap();
        s.set_curve_serverkey(server).unwrap();
        s.set_curve_publickey(kp.public()).unwrap();
        s.set_curve_secretkey(kp.secret()).unwrap();
        s.connect(ep).unwrap();
    })
}

// ----- class 1: the handshake -----

fn h_garbage(ctx: &Ctx, overlay: bool) -> Vec<String> {
    let mut r = Raw::connect(ctx, overlay);
    r.write(&garbage(16384));
    assert!(
        r.closed_within(Duration::from_secs(5)),
        "garbage kept its connection"
    );
    needles(&["zmq: a connection closed", which(overlay)])
}

fn h_null(ctx: &Ctx, overlay: bool) -> Vec<String> {
    let ep = endpoint(ctx, overlay);
    let p = ZPeer::new(|s| s.connect(&ep).unwrap());
    assert_handshake_fails(&p);
    needles(&["handshake failed", which(overlay)])
}

fn h_plain(ctx: &Ctx, overlay: bool) -> Vec<String> {
    let ep = endpoint(ctx, overlay);
    let p = ZPeer::new(|s| {
        s.set_plain_username(Some("root")).unwrap();
        s.set_plain_password(Some("root")).unwrap();
        s.connect(&ep).unwrap();
    });
    assert_handshake_fails(&p);
    needles(&["handshake failed", which(overlay)])
}

fn h_unknown_key(ctx: &Ctx, overlay: bool) -> Vec<String> {
    let rogue = canopy_security::CurveKeypair::generate().unwrap();
    let principal = canopy_security::curve_principal(rogue.public());
    let p = curve_peer(&endpoint(ctx, overlay), &server_key(ctx), &rogue);
    assert_handshake_fails(&p);
    vec!["verdict=deny".into(), principal]
}

fn h_wrong_server_key(ctx: &Ctx, overlay: bool) -> Vec<String> {
    let kp = canopy_security::CurveKeypair::generate().unwrap();
    let wrong = canopy_security::CurveKeypair::generate().unwrap();
    let p = curve_peer(&endpoint(ctx, overlay), wrong.public(), &kp);
    assert_handshake_fails(&p);
    needles(&["handshake failed", which(overlay)])
}

fn h_truncated_greeting(ctx: &Ctx, overlay: bool) -> Vec<String> {
    let mut r = Raw::connect(ctx, overlay);
    r.write(&greeting("CURVE")[..11]);
    assert!(
        r.closed_within(Duration::from_secs(6)),
        "a truncated greeting kept its connection"
    );
    needles(&["handshake failed", which(overlay), "failure=no_detail"])
}

fn h_half_open(ctx: &Ctx, overlay: bool) -> Vec<String> {
    let mut r = Raw::connect(ctx, overlay);
    r.write(&greeting("CURVE"));
    assert!(
        r.closed_within(Duration::from_secs(6)),
        "a handshake that never completes kept its connection"
    );
    needles(&["handshake failed", which(overlay), "failure=no_detail"])
}

fn h_flood(ctx: &Ctx, overlay: bool) -> Vec<String> {
    let t0 = Instant::now();
    let mut conns: Vec<Raw> = (0..200).map(|_| Raw::connect(ctx, overlay)).collect();
    for (i, c) in conns.iter_mut().enumerate() {
        if i % 2 == 0 {
            c.write(&greeting("NULL"));
        } else {
            c.write(&garbage(256));
        }
    }
    for c in conns.iter_mut() {
        assert!(
            c.closed_within(Duration::from_secs(5)),
            "a connection of the flood was kept"
        );
    }
    // Logged, but at most ~20 lines a second.
    let secs = t0.elapsed().as_secs() + 2;
    let lines = ctx
        .inst
        .stderr_text()
        .lines()
        .filter(|l| l.contains("zmq: ") && l.contains(which(overlay)))
        .count();
    assert!(
        lines as u64 <= 21 * secs + 40,
        "{lines} log lines for a flood of 200 connections in {secs} s"
    );
    needles(&["zmq: ", which(overlay)])
}

fn h_user_key_on_overlay(ctx: &Ctx) -> Vec<String> {
    let keys = TcpKeys::load(&ctx.user.0, &client_endpoint(&ctx.inst).1).unwrap();
    let p = curve_peer(
        &ctx.inst.tbon_endpoint(0),
        &keys.server_public,
        &keys.client,
    );
    assert_handshake_fails(&p);
    vec!["verdict=deny".into(), ctx.user.1.clone()]
}

#[test]
fn handshake_on_the_overlay_and_client_endpoints() {
    run_test(LIMIT, || {
        let ctx = Ctx::new(2, &[]);
        ctx.run(&[
            case("overlay: garbage bytes", |c| h_garbage(c, true)),
            case("client: garbage bytes", |c| h_garbage(c, false)),
            case("overlay: NULL mechanism", |c| h_null(c, true)),
            case("client: NULL mechanism", |c| h_null(c, false)),
            case("overlay: PLAIN mechanism", |c| h_plain(c, true)),
            case("client: PLAIN mechanism", |c| h_plain(c, false)),
            case("overlay: unknown CURVE key", |c| h_unknown_key(c, true)),
            case("client: unknown CURVE key", |c| h_unknown_key(c, false)),
            case("overlay: wrong server key", |c| h_wrong_server_key(c, true)),
            case("client: wrong server key", |c| h_wrong_server_key(c, false)),
            case("overlay: truncated greeting", |c| {
                h_truncated_greeting(c, true)
            }),
            case("client: truncated greeting", |c| {
                h_truncated_greeting(c, false)
            }),
            case("overlay: half-open handshake", |c| h_half_open(c, true)),
            case("client: half-open handshake", |c| h_half_open(c, false)),
            case(
                "overlay: a user key tries to join the tree",
                h_user_key_on_overlay,
            ),
            case("overlay: flood of 200 bad connections", |c| {
                h_flood(c, true)
            }),
            case("client: flood of 200 bad connections", |c| {
                h_flood(c, false)
            }),
        ]);
    });
}

// ----- class 2: malformed, forged and spoofed messages -----

/// A remote client with the key at `key`, its handshake done.
fn admitted(ctx: &Ctx, key: &Path) -> ZPeer {
    let (ep, server) = client_endpoint(&ctx.inst);
    let keys = TcpKeys::load(key, &server).unwrap();
    let p = ZPeer::new(|s| {
        s.set_curve_serverkey(&keys.server_public).unwrap();
        s.set_curve_publickey(keys.client.public()).unwrap();
        s.set_curve_secretkey(keys.client.secret()).unwrap();
        s.connect(&ep).unwrap();
    });
    let ev = p.events(Duration::from_secs(5), &[Ev::HANDSHAKE_SUCCEEDED]);
    assert!(
        ev.contains(&Ev::HANDSHAKE_SUCCEEDED),
        "not admitted: {ev:?}"
    );
    p
}

fn user_peer(ctx: &Ctx) -> ZPeer {
    admitted(ctx, &ctx.user.0)
}

/// Nothing comes back within a second (the message was dropped), and the
/// same connection is still served afterwards.
fn assert_dropped(p: &ZPeer) {
    assert!(
        !p.receives_within(Duration::from_secs(1)),
        "a reply came back: {:?}",
        p.sock.recv_multipart(0)
    );
}

/// The reply to a request: its header.
fn reply(p: &ZPeer) -> Header {
    assert!(
        p.receives_within(Duration::from_secs(5)),
        "no reply within 5 s"
    );
    let m = p.sock.recv_multipart(0).unwrap();
    canopy_proto::decode_header(&m[0]).unwrap()
}

fn request(topic: &str, nodeid: u32) -> Header {
    Header::request(topic, nodeid, 7)
}

fn enc(h: &Header) -> Vec<u8> {
    h.encode().unwrap()
}

fn m_bytes(ctx: &Ctx, hdr: Vec<u8>, expect: &str) -> Vec<String> {
    let p = user_peer(ctx);
    p.send(&[&hdr, b"x"]);
    assert_dropped(&p);
    vec![
        "remote: dropped an undecodable message".into(),
        expect.into(),
        ctx.user.1.clone(),
    ]
}

fn m_bad_magic(ctx: &Ctx) -> Vec<String> {
    let mut h = enc(&request("broker.ping", 0));
    h[0] = 0;
    m_bytes(ctx, h, "bad magic")
}

fn m_bad_version(ctx: &Ctx) -> Vec<String> {
    let mut h = enc(&request("broker.ping", 0));
    h[1] = 99;
    m_bytes(ctx, h, "unsupported protocol version 99")
}

fn m_bad_type(ctx: &Ctx) -> Vec<String> {
    let mut h = enc(&request("broker.ping", 0));
    h[2] = 77;
    m_bytes(ctx, h, "unknown message type 77")
}

fn m_oversized_topic_field(ctx: &Ctx) -> Vec<String> {
    let mut h = enc(&request("broker.ping", 0));
    h[28..30].copy_from_slice(&300u16.to_be_bytes());
    h.resize(h.len() + 300 - "broker.ping".len(), b'a');
    m_bytes(ctx, h, "topic is 300 bytes")
}

fn m_oversized_userid(ctx: &Ctx) -> Vec<String> {
    let mut h = enc(&request("broker.ping", 0));
    h[30..32].copy_from_slice(&5000u16.to_be_bytes());
    h.resize(h.len() + 5000, b'u');
    m_bytes(ctx, h, "userid is 5000 bytes")
}

fn m_truncated_header(ctx: &Ctx) -> Vec<String> {
    let h = enc(&request("broker.ping", 0));
    m_bytes(ctx, h[..h.len() - 3].to_vec(), "truncated")
}

fn m_short_header(ctx: &Ctx) -> Vec<String> {
    m_bytes(ctx, vec![0xca, 1, 1], "too short")
}

fn m_bad_utf8(ctx: &Ctx) -> Vec<String> {
    // The topic is the header's last field here: its last byte.
    let mut h = enc(&request("broker.pingX", 0));
    let at = h.len() - 1;
    h[at] = 0xff;
    m_bytes(ctx, h, "not valid UTF-8")
}

fn m_bad_hop(ctx: &Ctx) -> Vec<String> {
    let mut hd = request("broker.ping", 0);
    hd.route = vec![Hop::Local(3)];
    let mut h = enc(&hd);
    let at = h.len() - 5;
    h[at] = 9;
    m_bytes(ctx, h, "unknown route hop kind 9")
}

fn m_wrong_frame_count(ctx: &Ctx) -> Vec<String> {
    let p = user_peer(ctx);
    let h = enc(&request("broker.ping", 0));
    p.send(&[&h, b"a", b"b", b"c"]);
    assert_dropped(&p);
    needles(&["wrong number of frames"])
}

fn m_not_a_request(ctx: &Ctx, t: MsgType) -> Vec<String> {
    let p = user_peer(ctx);
    let mut h = request("broker.ping", 0);
    h.msg_type = t;
    p.send(&[&enc(&h), b"x"]);
    assert_dropped(&p);
    vec![
        "not a request".into(),
        format!("msg_type={t:?}"),
        ctx.user.1.clone(),
    ]
}

fn m_expect_refusal(ctx: &Ctx, p: &ZPeer, h: Header, errnum: u32) {
    m_expect_refusal_of(ctx, p, h, b"x", errnum)
}

fn m_expect_refusal_of(ctx: &Ctx, p: &ZPeer, h: Header, payload: &[u8], errnum: u32) {
    p.send(&[&enc(&h), payload]);
    let r = reply(p);
    assert_eq!(r.msg_type, MsgType::Response);
    assert_eq!(
        r.errnum, errnum,
        "{} got errnum {} (wanted {errnum})",
        h.topic, r.errnum
    );
    let _ = ctx;
}

fn m_forged_identity(ctx: &Ctx) -> Vec<String> {
    let p = user_peer(ctx);
    let mut h = request("acl.reload", 0);
    h.userid = "unix:root".into();
    h.roles = Roles::OWNER.union(Roles::ADMIN);
    m_expect_refusal(ctx, &p, h, errno::EPERM);
    vec![
        "authz: request refused".into(),
        format!("principal={}", ctx.user.1),
        "topic=acl.reload".into(),
    ]
}

fn m_forged_route(ctx: &Ctx) -> Vec<String> {
    let p = user_peer(ctx);
    let mut h = request("acl.check", 0);
    h.route = vec![Hop::Child(1), Hop::Local(1), Hop::Parent];
    h.userid = "unix:root".into();
    h.roles = Roles::PEER;
    m_expect_refusal(ctx, &p, h, errno::EPERM);
    vec![
        "authz: request refused".into(),
        format!("principal={}", ctx.user.1),
        "topic=acl.check".into(),
    ]
}

fn m_no_such_rank(ctx: &Ctx) -> Vec<String> {
    let p = user_peer(ctx);
    m_expect_refusal(ctx, &p, request("broker.ping", 999), errno::EHOSTUNREACH);
    vec![
        "route: request refused".into(),
        "nodeid=999".into(),
        ctx.user.1.clone(),
    ]
}

fn m_huge_topic(ctx: &Ctx) -> Vec<String> {
    let p = user_peer(ctx);
    let topic = "t".repeat(canopy_proto::MAX_TOPIC);
    m_expect_refusal(ctx, &p, request(&topic, 0), errno::ENOSYS);
    vec!["route: request refused".into(), ctx.user.1.clone()]
}

fn m_event_pub_as_user(ctx: &Ctx) -> Vec<String> {
    let p = user_peer(ctx);
    let mut body = 3u16.to_be_bytes().to_vec();
    body.extend_from_slice(b"a.b");
    p.send(&[&enc(&request("event.pub", 0)), &body]);
    let r = reply(&p);
    assert_eq!(r.errnum, errno::EPERM);
    vec![
        "authz: request refused".into(),
        "topic=event.pub".into(),
        ctx.user.1.clone(),
    ]
}

fn m_admin_topic_as_user(ctx: &Ctx, topic: &'static str) -> Vec<String> {
    let p = user_peer(ctx);
    m_expect_refusal(ctx, &p, request(topic, 0), errno::EPERM);
    vec![
        "authz: request refused".into(),
        format!("topic={topic}"),
        ctx.user.1.clone(),
    ]
}

fn m_over_max_payload(ctx: &Ctx) -> Vec<String> {
    let p = user_peer(ctx);
    let big = vec![0u8; (16 << 20) + 1024];
    m_expect_refusal_of(ctx, &p, request("broker.ping", 0), &big, errno::EMSGSIZE);
    vec![
        "budget: request refused".into(),
        "errnum=90".into(),
        ctx.user.1.clone(),
    ]
}

fn m_over_max_frame(ctx: &Ctx) -> Vec<String> {
    let p = user_peer(ctx);
    // Over ZMQ_MAXMSGSIZE (payload maximum plus header maximum).
    let big = vec![0u8; (16 << 20) + 16384];
    p.send(&[&enc(&request("broker.ping", 0)), &big]);
    let ev = p.events(Duration::from_secs(10), &[Ev::DISCONNECTED]);
    assert!(ev.contains(&Ev::DISCONNECTED), "not cut: {ev:?}");
    needles(&["zmq: a connection closed", "endpoint=client"])
}

/// A response from a client is a service provider's answer
/// (docs/protocol.md §6.1): one to a request never delivered to it gets
/// the `service.error` note (ENOENT, the same matchtag), goes nowhere
/// else, and is logged.
fn assert_stray_note(h: &Header) {
    assert_eq!(
        (h.msg_type, h.topic.as_str(), h.errnum, h.matchtag),
        (
            MsgType::Response,
            "service.error",
            canopy_proto::errno::ENOENT,
            7
        ),
        "{h:?}"
    );
}

fn m_stray_response(ctx: &Ctx) -> Vec<String> {
    let p = user_peer(ctx);
    let mut h = request("broker.ping", 0);
    h.msg_type = MsgType::Response;
    p.send(&[&enc(&h), b"x"]);
    assert_stray_note(&reply(&p));
    assert_dropped(&p);
    needles(&[
        "a response to no request delivered to this connection",
        &ctx.user.1,
    ])
}

fn m_local_response_from_owner(ctx: &Ctx) -> Vec<String> {
    let mut s = UnixStream::connect(ctx.inst.local_path(0)).unwrap();
    let mut h = request("broker.ping", 0);
    h.msg_type = MsgType::Response;
    let mut out = Vec::new();
    canopy_proto::frame::encode_frame(&h, b"x", &mut out).unwrap();
    s.write_all(&out).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut dec = canopy_proto::frame::FrameDecoder::new();
    let mut b = [0u8; 4096];
    let note = loop {
        if let Some((h, _)) = dec.next_frame().unwrap() {
            break h;
        }
        let n = std::io::Read::read(&mut s, &mut b).expect("the service.error note");
        assert!(n > 0, "the broker closed the connection");
        dec.push(&b[..n]);
    };
    assert_stray_note(&note);
    needles(&[
        "a response to no request delivered to this connection",
        "principal=unix:root",
    ])
}

#[test]
fn malformed_forged_and_spoofed_messages() {
    run_test(LIMIT, || {
        let ctx = Ctx::new(2, &[]);
        ctx.run(&[
            case("bad magic byte", m_bad_magic),
            case("unsupported protocol version", m_bad_version),
            case("unknown message type", m_bad_type),
            case(
                "oversized header: topic length field over the maximum",
                m_oversized_topic_field,
            ),
            case("oversized header: 5000-byte userid", m_oversized_userid),
            case("truncated header", m_truncated_header),
            case("header shorter than its fixed part", m_short_header),
            case("invalid UTF-8 in the topic", m_bad_utf8),
            case("unknown route hop kind", m_bad_hop),
            case("wrong number of frames", m_wrong_frame_count),
            case("response-typed message from a client", |c| {
                m_stray_response(c)
            }),
            case("event-typed message from a client", |c| {
                m_not_a_request(c, MsgType::Event)
            }),
            case("control-typed message from a client", |c| {
                m_not_a_request(c, MsgType::Control)
            }),
            case("forged userid and roles", m_forged_identity),
            case("forged route stack", m_forged_route),
            case("routing to a nonexistent rank", m_no_such_rank),
            case("huge topic no service offers", m_huge_topic),
            case("event.pub as a user", m_event_pub_as_user),
            case("admin-only acl.reload as a user", |c| {
                m_admin_topic_as_user(c, "acl.reload")
            }),
            case("admin-only key.switch as a user", |c| {
                m_admin_topic_as_user(c, "key.switch")
            }),
            case("admin-only overlay.disconnect as a user", |c| {
                m_admin_topic_as_user(c, "overlay.disconnect")
            }),
            case(
                "a payload over the maximum message size",
                m_over_max_payload,
            ),
            case("a frame over ZMQ_MAXMSGSIZE", m_over_max_frame),
            case(
                "local: a response-typed frame from the owner",
                m_local_response_from_owner,
            ),
        ]);
    });
}

// ----- class 3: local-socket abuse -----

fn local(ctx: &Ctx) -> UnixStream {
    UnixStream::connect(ctx.inst.local_path(0)).unwrap()
}

fn l_raw(ctx: &Ctx, bytes: &[u8], expect: &str) -> Vec<String> {
    let mut s = local(ctx);
    s.write_all(bytes).unwrap();
    assert!(
        closed_within(&mut s, Duration::from_secs(5)),
        "the broker kept a connection that sent {} bad bytes",
        bytes.len()
    );
    needles(&["local: bad frame", expect, "disconnecting"])
}

fn prefix(hlen: u32, plen: u32) -> Vec<u8> {
    let mut b = hlen.to_be_bytes().to_vec();
    b.extend_from_slice(&plen.to_be_bytes());
    b
}

fn l_header_len_over_max(ctx: &Ctx) -> Vec<String> {
    l_raw(ctx, &[0xff; 64], "header length")
}

fn l_payload_len_over_max(ctx: &Ctx) -> Vec<String> {
    let h = enc(&request("broker.ping", 0));
    let mut b = prefix(h.len() as u32, 100 << 20);
    b.extend_from_slice(&h);
    // Only the prefix and header: the broker must not wait for 100 MiB.
    l_raw(ctx, &b, "payload length")
}

fn l_undecodable(ctx: &Ctx) -> Vec<String> {
    let mut b = prefix(40, 0);
    b.extend_from_slice(&[0xab; 40]);
    l_raw(ctx, &b, "bad magic")
}

fn l_header_len_mismatch(ctx: &Ctx) -> Vec<String> {
    let h = enc(&request("broker.ping", 0));
    let mut b = prefix(h.len() as u32 - 4, 0);
    b.extend_from_slice(&h[..h.len() - 4]);
    l_raw(ctx, &b, "truncated")
}

fn l_empty_header(ctx: &Ctx) -> Vec<String> {
    l_raw(ctx, &prefix(0, 0), "too short")
}

fn l_partial_then_close(ctx: &Ctx) -> Vec<String> {
    let mut s = local(ctx);
    let h = enc(&request("broker.ping", 0));
    let mut b = prefix(h.len() as u32, 1000);
    b.extend_from_slice(&h);
    b.extend_from_slice(&[1; 100]);
    s.write_all(&b).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    drop(s);
    needles(&[
        "closed the connection in the middle of a frame",
        "discarded=",
    ])
}

fn peer_of(ctx: &Ctx) -> &Path {
    ctx.peer.as_deref().expect("root cases have the peer")
}

fn l_too_many_connections(ctx: &Ctx) -> Vec<String> {
    let local0 = ctx.inst.local_path(0);
    let mut p = UserProc::spawn(
        peer_of(ctx),
        &[
            "flood-local",
            local0.to_str().unwrap(),
            "20000",
            "65",
            "-",
            "500",
        ],
    );
    p.wait_exit(Duration::from_secs(20));
    let lines = p.lines();
    let refused: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains(&format!("errnum={} ", errno::EAGAIN)))
        .collect();
    assert_eq!(refused.len(), 1, "one of 65 connections refused: {lines:?}");
    assert!(
        refused[0].contains("budget 64"),
        "the refusal names the budget: {}",
        refused[0]
    );
    assert_eq!(
        lines.iter().filter(|l| l.ends_with(" closed")).count(),
        1,
        "only the refused connection is closed: {lines:?}"
    );
    vec![
        "too many connections for this uid".into(),
        format!("uid={}", other_user()),
        "budget=64".into(),
    ]
}

fn l_never_reads(ctx: &Ctx) -> Vec<String> {
    let local0 = ctx.inst.local_path(0);
    let mib16 = (16 << 20).to_string();
    let sizes = format!("{mib16},{mib16},{mib16}");
    let mut p = UserProc::spawn(
        peer_of(ctx),
        &[
            "flood-local",
            local0.to_str().unwrap(),
            "20000",
            "1",
            &sizes,
            "1000",
        ],
    );
    p.wait_exit(Duration::from_secs(25));
    let lines = p.lines();
    assert!(
        lines
            .iter()
            .any(|l| l.contains(&format!("errnum={} ", errno::EAGAIN)) || l == "conn 0 closed"),
        "a client that never reads was neither refused nor cut: {lines:?}"
    );
    // The core names the principal; the local connector, which cuts a
    // client that will not read, knows only its uid.
    vec!["budget:".into(), "verdict=deny".into()]
}

#[test]
fn local_socket_abuse() {
    run_test(LIMIT, || {
        let ctx = Ctx::new(1, &[]);
        ctx.run(&[
            case(
                "length prefix: header over the maximum",
                l_header_len_over_max,
            ),
            case(
                "length prefix: payload over the maximum",
                l_payload_len_over_max,
            ),
            case("invalid framing: undecodable header", l_undecodable),
            case(
                "invalid framing: header length disagrees with the header",
                l_header_len_mismatch,
            ),
            case("invalid framing: empty header", l_empty_header),
            case("partial frame, then close", l_partial_then_close),
            root_case(
                "65 connections of one uid (budget 64)",
                l_too_many_connections,
            ),
            root_case("connect, send max-size pings, never read", l_never_reads),
        ]);
    });
}

// ----- class 4: authorization and revocation -----

fn acl_reload(ctx: &Ctx) {
    let out = run_canopy(
        &["acl", "reload"],
        &[("CANOPY_URI", ctx.inst.uri())],
        Duration::from_secs(10),
    );
    assert!(out.status.success(), "acl reload: {}", text(&out.stderr));
}

fn a_unknown_remote_key(ctx: &Ctx) -> Vec<String> {
    let (key, principal) = remote_key(ctx.dir.path(), "stranger");
    let (ep, server) = client_endpoint(&ctx.inst);
    let keys = TcpKeys::load(&key, &server).unwrap();
    let p = curve_peer(&ep, &keys.server_public, &keys.client);
    assert_handshake_fails(&p);
    vec!["verdict=deny".into(), principal]
}

fn a_denied_remote_key(ctx: &Ctx) -> Vec<String> {
    let (key, principal) = remote_key(ctx.dir.path(), "denied");
    write_policy(
        &ctx.policy,
        &format!(
            "[[rule]]\nname = \"no\"\nprincipal = \"{principal}\"\ndeny = true\n\n{}",
            base_policy(&ctx.user.1, &ctx.operator.1)
        ),
    );
    acl_reload(ctx);
    let (ep, server) = client_endpoint(&ctx.inst);
    let keys = TcpKeys::load(&key, &server).unwrap();
    let p = curve_peer(&ep, &keys.server_public, &keys.client);
    assert_handshake_fails(&p);
    vec!["verdict=deny".into(), principal]
}

fn a_denied_local_user(ctx: &Ctx) -> Vec<String> {
    write_policy(&ctx.policy, &rule("user-key", &ctx.user.1, "\"user\""));
    acl_reload(ctx);
    let local0 = ctx.inst.local_path(0);
    let mut p = UserProc::spawn(
        peer_of(ctx),
        &["read-local", local0.to_str().unwrap(), "5000"],
    );
    p.wait_exit(Duration::from_secs(10));
    write_policy(&ctx.policy, &base_policy(&ctx.user.1, &ctx.operator.1));
    acl_reload(ctx);
    assert!(p.has("errnum=1 ") && p.has("closed"), "{:?}", p.lines());
    vec![
        "verdict=deny".into(),
        format!("principal=unix:{OTHER_USER}"),
    ]
}

fn a_remote_revoked_mid_stream(ctx: &Ctx) -> Vec<String> {
    let (key, principal) = remote_key(ctx.dir.path(), "revoked");
    let with = format!(
        "{}{}",
        base_policy(&ctx.user.1, &ctx.operator.1),
        rule("soon-revoked", &principal, "\"user\"")
    );
    write_policy(&ctx.policy, &with);
    acl_reload(ctx);
    let mut c = remote_client(&ctx.inst, &key);
    Instance::ping(&mut c, 1, b"before").expect("admitted before the revocation");
    write_policy(&ctx.policy, &base_policy(&ctx.user.1, &ctx.operator.1));
    acl_reload(ctx);
    let r = c.rpc("broker.ping", 0, b"after", Duration::from_secs(3));
    assert!(
        matches!(
            &r,
            Err(ClientError::Refused(_)) | Err(ClientError::Timeout(_))
        ) || r.as_ref().err().and_then(ClientError::errnum) == Some(errno::EPERM),
        "a revoked client was served: {r:?}"
    );
    vec!["access revoked".into(), principal]
}

fn a_revoked_key_reconnects(ctx: &Ctx) -> Vec<String> {
    // The key revoked in the case before comes back on a new connection.
    let key = ctx.dir.path().join("revoked");
    let (ep, server) = client_endpoint(&ctx.inst);
    let keys = TcpKeys::load(&key, &server).unwrap();
    let principal = canopy_security::curve_principal(keys.client.public());
    let p = curve_peer(&ep, &keys.server_public, &keys.client);
    assert_handshake_fails(&p);
    vec!["verdict=deny".into(), principal]
}

fn a_local_revoked_mid_stream(ctx: &Ctx) -> Vec<String> {
    let local0 = ctx.inst.local_path(0);
    let p = UserProc::spawn(
        peer_of(ctx),
        &["talk-local", local0.to_str().unwrap(), "20000", "*"],
    );
    assert!(
        p.wait_for("payload=talk", Duration::from_secs(10)),
        "{:?}",
        p.lines()
    );
    write_policy(&ctx.policy, &rule("user-key", &ctx.user.1, "\"user\""));
    acl_reload(ctx);
    let cut = p.wait_for("closed", Duration::from_secs(5));
    write_policy(&ctx.policy, &base_policy(&ctx.user.1, &ctx.operator.1));
    acl_reload(ctx);
    assert!(
        cut,
        "a revoked local client kept its connection: {:?}",
        p.lines()
    );
    assert!(p.has("access revoked"), "{:?}", p.lines());
    vec!["access revoked".into(), format!("unix:{OTHER_USER}")]
}

fn a_user_reloads_the_policy(ctx: &Ctx) -> Vec<String> {
    let mut c = remote_client(&ctx.inst, &ctx.user.0);
    let r = c.rpc("acl.reload", 0, b"", RPC_TIMEOUT);
    assert_eq!(
        r.as_ref().err().and_then(ClientError::errnum),
        Some(errno::EPERM),
        "{r:?}"
    );
    vec![
        "authz: request refused".into(),
        "topic=acl.reload".into(),
        ctx.user.1.clone(),
    ]
}

#[test]
fn authorization_and_revocation() {
    run_test(LIMIT, || {
        let ctx = Ctx::new(2, &[]);
        ctx.run(&[
            case("a remote key no rule names", a_unknown_remote_key),
            case("a remote key with a deny rule", a_denied_remote_key),
            root_case("a local user no rule names", a_denied_local_user),
            case(
                "a remote client revoked mid-stream",
                a_remote_revoked_mid_stream,
            ),
            case("the revoked key reconnects", a_revoked_key_reconnects),
            root_case(
                "a local client revoked mid-stream",
                a_local_revoked_mid_stream,
            ),
            case("a user asks for acl.reload", a_user_reloads_the_policy),
        ]);
    });
}

// ----- class 5: liveness abuse -----

fn v_sigstop_neighbour(ctx: &Ctx) -> Vec<String> {
    let pid = ctx
        .inst
        .broker_pids()
        .iter()
        .find(|&&(_, r)| r == 1)
        .map(|&(p, _)| p)
        .expect("rank 1 runs");
    kill(Pid::from_raw(pid), Signal::SIGSTOP).unwrap();
    let _cont = Continue(pid);
    let mut c = ctx.inst.client(0);
    let r = c.rpc("broker.ping", 1, b"", Duration::from_secs(6));
    assert_eq!(
        r.as_ref().err().and_then(ClientError::errnum),
        Some(errno::EHOSTUNREACH),
        "a ping to a stopped rank: {r:?}"
    );
    // Meanwhile rank 0 and rank 2 answer promptly.
    for rank in [0, 2] {
        let t = Instant::now();
        Instance::ping(&mut c, rank, b"").unwrap();
        assert!(t.elapsed() < Duration::from_millis(500), "rank {rank} slow");
    }
    // Continued, rank 1 rejoins and is served again.
    drop(_cont);
    let back = wait_until(Duration::from_secs(15), || {
        Instance::ping(&mut c, 1, b"").is_ok()
    });
    assert!(back, "rank 1 did not come back after SIGCONT");
    needles(&["overlay: lost rank 1"])
}

fn v_local_slow_subscriber(ctx: &Ctx) -> Vec<String> {
    // OTHER_USER opens connections and never reads; the owner fills them.
    let local0 = ctx.inst.local_path(0);
    let mut p = UserProc::spawn(
        peer_of(ctx),
        &[
            "flood-local",
            local0.to_str().unwrap(),
            "20000",
            "2",
            &format!("{},{}", 12 << 20, 12 << 20),
            "1500",
        ],
    );
    p.wait_exit(Duration::from_secs(25));
    let lines = p.lines();
    assert!(
        lines
            .iter()
            .any(|l| l.ends_with(" closed") || l.contains(&format!("errnum={} ", errno::EAGAIN))),
        "two slow connections of one uid were neither refused nor cut: {lines:?}"
    );
    vec!["budget:".into(), "verdict=deny".into()]
}

#[test]
fn liveness_abuse() {
    run_test(LIMIT, || {
        let ctx = Ctx::new(3, &[]);
        ctx.run(&[
            root_case(
                "one uid's two connections that never read 12 MiB replies",
                v_local_slow_subscriber,
            ),
            case("SIGSTOP of a neighbour", v_sigstop_neighbour),
        ]);
    });
}

/// A remote client that never reads its replies. The budgets count a
/// request until its reply is handed to libzmq; what libzmq then queues
/// toward the client is bounded only by CLIENT_HWM (1,000 messages), not
/// in bytes, so 16 MiB replies that are never read pile up in the broker.
#[test]
#[ignore = "known hole: replies queued by libzmq toward a remote client are not counted in bytes (issue 12)"]
fn a_remote_client_that_never_reads_is_bounded() {
    run_test(LIMIT, || {
        let ctx = Ctx::new(1, &[]);
        let pid = ctx.inst.broker_pids()[0].0;
        let base = canopy_t::hostile::rss_kib(pid);
        let watch = canopy_t::hostile::RssWatch::start(pid);
        let p = user_peer(&ctx);
        p.sock.set_rcvhwm(1).unwrap();
        let big = vec![0u8; 16 << 20];
        for tag in 1..=8u32 {
            let h = Header::request("broker.ping", 0, tag);
            assert!(p.send(&[&enc(&h), &big]));
            std::thread::sleep(Duration::from_millis(300));
        }
        std::thread::sleep(Duration::from_secs(2));
        let growth = watch.stop().saturating_sub(base);
        println!("a remote client that never reads: +{growth} KiB");
        assert!(
            growth < 64_000_000 / 1024,
            "the broker grew by {growth} KiB"
        );
    });
}
