//! The handler's log lines, in a test binary of their own: tracing caches
//! per call site whether anyone listens, and other tests' handler threads
//! starting at the same time raced with this test's subscriber (the deny
//! line was sometimes never captured).

use std::io::Write;
use std::sync::{Arc, Mutex};

use canopy_proto::Roles;
use canopy_zap::codec::curve_principal;
use canopy_zap::{KeySetPolicy, ZapHandler};

mod common;
use common::*;

#[derive(Clone, Default)]
struct LogBuf(Arc<Mutex<Vec<u8>>>);

impl Write for LogBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogBuf {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[test]
fn one_log_line_per_verdict_without_secrets() {
    require_curve();
    // One global subscriber for this test binary: a scoped one races with
    // the other tests' handler threads over tracing's per-callsite
    // interest cache (the deny line was sometimes never captured). Other
    // tests' lines land in the buffer too; this test reads only the lines
    // naming its own (fresh) keys.
    static BUF: std::sync::OnceLock<LogBuf> = std::sync::OnceLock::new();
    let buf = BUF
        .get_or_init(|| {
            let buf = LogBuf::default();
            let writer = buf.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_ansi(false)
                .with_max_level(tracing::Level::INFO)
                .with_writer(move || writer.clone())
                .finish();
            tracing::subscriber::set_global_default(subscriber)
                .expect("no other global subscriber in this test binary");
            buf
        })
        .clone();
    let ctx = zmq::Context::new();
    let good = keypair();
    let bad = keypair();
    let skeys = keypair();
    let good_p = curve_principal(&good.public_key).unwrap();
    let bad_p = curve_principal(&bad.public_key).unwrap();
    let keys = Arc::new(KeySetPolicy::new());
    keys.insert(good_p.clone(), "node1", Roles::PEER);
    let zap = ZapHandler::start(&ctx, keys).unwrap();
    let (srv, ep) = server(&ctx, &skeys);
    let _c1 = client(&ctx, &ep, &skeys.public_key, Some(&good));
    assert!(recv_within(&srv, PATIENCE).is_some());
    let _c2 = client(&ctx, &ep, &skeys.public_key, Some(&bad));
    assert!(recv_within(&srv, QUIET).is_none());
    // The handler counts a denial just before it logs it: wait for both.
    let mine = |log: &str| -> Vec<String> {
        log.lines()
            .filter(|l| l.contains(&good_p) || l.contains(&bad_p))
            .map(str::to_string)
            .collect()
    };
    assert!(wait_until(
        || zap.stats().denied == 1 && mine(&buf.text()).len() >= 2
    ));
    zap.stop();

    let log = mine(&buf.text()).join("\n");
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 2, "{log}");
    let allow = lines
        .iter()
        .find(|l| l.contains("verdict=allow"))
        .expect(&log);
    assert!(allow.contains(" INFO "), "{allow}");
    assert!(allow.contains(&format!("principal={good_p}")), "{allow}");
    assert!(
        allow.contains("address=127.0.0.1 mechanism=CURVE"),
        "{allow}"
    );
    let deny = lines
        .iter()
        .find(|l| l.contains("verdict=deny"))
        .expect(&log);
    assert!(deny.contains(" WARN "), "{deny}");
    assert!(deny.contains(&format!("principal={bad_p}")), "{deny}");
    assert!(deny.contains("reason=\"unknown key\""), "{deny}");
    for secret in [&good.secret_key, &bad.secret_key, &skeys.secret_key] {
        let z = zmq::z85_encode(secret).unwrap();
        let all = buf.text();
        assert!(!all.contains(&z), "secret key in the log: {all}");
    }
}
