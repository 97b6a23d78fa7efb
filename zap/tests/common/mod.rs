//! Helpers shared by the handler's test binaries: real libzmq sockets
//! over CURVE on loopback TCP, every wait bounded.
#![allow(dead_code)]

use std::time::{Duration, Instant};

pub const QUIET: Duration = Duration::from_millis(500);
pub const PATIENCE: Duration = Duration::from_secs(5);

pub fn require_curve() {
    assert_eq!(
        zmq::has("curve"),
        Some(true),
        "libzmq lacks CURVE: install libzmq3-dev and link the system libzmq (.cargo/config.toml)"
    );
}

pub fn keypair() -> zmq::CurveKeyPair {
    zmq::CurveKeyPair::new().expect("generate a curve key pair")
}

/// A CURVE ROUTER with a ZAP domain, bound on an ephemeral loopback port.
pub fn server(ctx: &zmq::Context, keys: &zmq::CurveKeyPair) -> (zmq::Socket, String) {
    let s = ctx.socket(zmq::ROUTER).unwrap();
    s.set_linger(0).unwrap();
    s.set_curve_server(true).unwrap();
    s.set_curve_secretkey(&keys.secret_key).unwrap();
    s.set_zap_domain("canopy").unwrap();
    s.bind("tcp://127.0.0.1:*").unwrap();
    let ep = s.get_last_endpoint().unwrap().unwrap();
    (s, ep)
}

/// A DEALER that connects with CURVE (`Some(keys)`) or NULL (`None`) and
/// queues one message.
pub fn client(
    ctx: &zmq::Context,
    ep: &str,
    server_pub: &[u8; 32],
    keys: Option<&zmq::CurveKeyPair>,
) -> zmq::Socket {
    let c = ctx.socket(zmq::DEALER).unwrap();
    c.set_linger(0).unwrap();
    if let Some(k) = keys {
        c.set_curve_serverkey(server_pub).unwrap();
        c.set_curve_publickey(&k.public_key).unwrap();
        c.set_curve_secretkey(&k.secret_key).unwrap();
    }
    c.connect(ep).unwrap();
    let deadline = Instant::now() + PATIENCE;
    loop {
        match c.send("hello", zmq::DONTWAIT) {
            Ok(()) => break,
            Err(zmq::Error::EAGAIN) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => panic!("client send failed: {e}"),
        }
    }
    c
}

/// Receive one multipart message (routing id + payload), or `None` after `wait`.
pub fn recv_within(s: &zmq::Socket, wait: Duration) -> Option<Vec<zmq::Message>> {
    if s.poll(zmq::POLLIN, wait.as_millis() as i64).unwrap() == 0 {
        return None;
    }
    let mut parts = Vec::new();
    loop {
        let mut m = zmq::Message::new();
        s.recv(&mut m, 0).unwrap();
        let more = m.get_more();
        parts.push(m);
        if !more {
            return Some(parts);
        }
    }
}

pub fn wait_until(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + PATIENCE;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    cond()
}
