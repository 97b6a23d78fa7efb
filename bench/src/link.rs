//! Scenario `link`: one-way messages per second over one CURVE link
//! between two brokers, against a raw libzmq DEALER -> ROUTER pair with
//! CURVE over `ipc://`, in the same run and with the same traffic.
//!
//! Broker side: a 2-broker instance; a client on rank 1's local connector
//! streams one-way `broker.ping`s to rank 0 (see [`crate::wire`]), so every
//! message crosses rank 1's DEALER -> rank 0's ROUTER once. Raw side: a
//! DEALER and a ROUTER in this process, each on its own thread, sending
//! the same two frames (a canopy header as rank 1 would forward it, and the
//! payload), with the same batches and synchronous echoes. The raw pair is
//! the practical limit; the report gives the broker's share of it. Each
//! run alternates the two sides in slices and compares their total times.

use crate::instance::{Instance, Progress, Scratch};
use crate::stats::Summary;
use crate::wire::{Stream, PING};
use anyhow::{anyhow, bail, Context, Result};
use canopy_proto::{Header, Hop, FLAG_NORESPONSE};
use serde::Serialize;
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Clone, Debug, Serialize)]
pub struct LinkParams {
    /// Payload sizes in bytes.
    pub pads: Vec<usize>,
    /// Bytes (payload + 100) sent per measurement; sets the message count.
    pub budget_bytes: u64,
    /// Message count limits per measurement.
    pub min_messages: u64,
    pub max_messages: u64,
    /// One-way messages between synchronous echoes (two batches in flight).
    pub batch: u32,
    pub runs: u32,
    #[serde(rename = "reply_timeout_s", serialize_with = "crate::start::secs")]
    pub reply_timeout: Duration,
    #[serde(rename = "start_timeout_s", serialize_with = "crate::start::secs")]
    pub start_timeout: Duration,
    #[serde(skip)]
    pub rundir: Option<PathBuf>,
}

impl LinkParams {
    pub fn messages(&self, pad: usize) -> u64 {
        (self.budget_bytes / (pad as u64 + 100)).clamp(self.min_messages, self.max_messages)
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct LinkResult {
    pub pad: usize,
    pub messages: u64,
    /// Header frame bytes per message (same on both sides).
    pub header_bytes: usize,
    pub raw_msgs_per_s: Summary,
    pub broker_msgs_per_s: Summary,
    /// Payload bytes per second.
    pub raw_bytes_per_s: Summary,
    pub broker_bytes_per_s: Summary,
    /// Per run: broker / raw, measured back to back.
    pub ratio: Summary,
}

#[derive(Clone, Debug, Serialize)]
pub struct LinkReport {
    pub params: LinkParams,
    pub instance_start_s: f64,
    pub teardown: crate::instance::Teardown,
    pub results: Vec<LinkResult>,
}

/// The header a one-way ping carries over the link: as the client sent it,
/// stamped with its identity and route by rank 1.
fn link_header() -> Result<Vec<u8>> {
    let mut h = Header::request(PING, 0, 0);
    h.flags |= FLAG_NORESPONSE;
    h.userid = crate::wire::principal();
    h.route = vec![Hop::Local(1)];
    Ok(h.encode()?)
}

pub fn run(canopy: &Path, p: &LinkParams) -> Result<LinkReport> {
    let raw_dir = Scratch::new(p.rundir.as_deref())?;
    let mut inst = Instance::start(canopy, 2, 2, p.start_timeout, p.rundir.as_deref())?;
    eprintln!("link: 2 brokers up in {:.3} s", inst.start_s);
    let uri1 = inst.dir.join("local-1");
    let hdr = link_header()?;
    let stall = p.reply_timeout + Duration::from_secs(5);
    // samples[pad index] = (raw, broker) per run
    let (samples, teardown) = inst.run(stall, |prog| {
        let mut raw = RawPair::new(raw_dir.path())?;
        let mut s = Stream::connect(&uri1)?;
        s.ping(0, p.reply_timeout)?;
        raw.ping(p.reply_timeout)?;
        let mut samples: Vec<Vec<(f64, f64)>> = vec![Vec::new(); p.pads.len()];
        for run in 1..=p.runs {
            for (i, &pad) in p.pads.iter().enumerate() {
                let payload = vec![b'x'; pad];
                let n = p.messages(pad);
                // Alternate in slices, so that both sides see the same
                // mix of whatever else the machine is doing.
                let (mut rt, mut bt) = (Duration::ZERO, Duration::ZERO);
                let slices = SLICES.min(n).max(1);
                for k in 0..slices {
                    let m = n / slices + u64::from(k < n % slices);
                    rt += raw
                        .stream(&hdr, &payload, m, p.batch, p.reply_timeout, prog)
                        .with_context(|| format!("raw pair, pad {pad}"))?;
                    bt += s
                        .stream(0, &payload, m, p.batch, p.reply_timeout, prog)
                        .with_context(|| format!("broker link, pad {pad}"))?;
                }
                let (r, b) = (n as f64 / rt.as_secs_f64(), n as f64 / bt.as_secs_f64());
                eprintln!(
                    "link: run {run}/{} pad {pad}: raw {r:.0} msg/s, broker {b:.0} msg/s ({:.0}%)",
                    p.runs,
                    100.0 * b / r
                );
                samples[i].push((r, b));
            }
        }
        raw.close()?;
        Ok(samples)
    })?;
    let mut results = Vec::new();
    for (i, &pad) in p.pads.iter().enumerate() {
        let s = &samples[i];
        let sum = |f: &dyn Fn(&(f64, f64)) -> f64| {
            Summary::of(s.iter().map(f).collect()).ok_or_else(|| anyhow!("no runs"))
        };
        results.push(LinkResult {
            pad,
            messages: p.messages(pad),
            header_bytes: hdr.len(),
            raw_msgs_per_s: sum(&|x| x.0)?,
            broker_msgs_per_s: sum(&|x| x.1)?,
            raw_bytes_per_s: sum(&|x| x.0 * pad as f64)?,
            broker_bytes_per_s: sum(&|x| x.1 * pad as f64)?,
            ratio: sum(&|x| x.1 / x.0)?,
        });
    }
    Ok(LinkReport {
        params: p.clone(),
        instance_start_s: inst.start_s,
        teardown,
        results,
    })
}

const STOP: u8 = 0xff;

/// Each run alternates raw and broker this many times.
const SLICES: u64 = 4;

/// A DEALER -> ROUTER pair with CURVE over ipc, the ROUTER on a thread
/// that echoes every message without `FLAG_NORESPONSE` (header frame
/// only). The two sockets are in separate contexts, like two brokers.
struct RawPair {
    /// One context per side, as two brokers have: each its own I/O
    /// thread, so encryption and decryption can run on different cores.
    _ctx: (zmq::Context, zmq::Context),
    dealer: zmq::Socket,
    receiver: Option<std::thread::JoinHandle<Result<u64>>>,
    next_tag: u32,
}

fn zerr(what: &'static str) -> impl Fn(zmq::Error) -> anyhow::Error {
    move |e| anyhow!("raw libzmq pair: {what}: {e}")
}

impl RawPair {
    fn new(dir: &Path) -> Result<RawPair> {
        if !zmq::has("curve").unwrap_or(false) {
            bail!("this libzmq has no CURVE; link the system libzmq (see docs/operations.md)");
        }
        let ctx = zmq::Context::new();
        let server = zmq::CurveKeyPair::new().map_err(zerr("make keys"))?;
        let client = zmq::CurveKeyPair::new().map_err(zerr("make keys"))?;
        let ep = format!("ipc://{}/raw-link", dir.display());
        let rctx = zmq::Context::new();
        let router = rctx.socket(zmq::ROUTER).map_err(zerr("socket"))?;
        router.set_linger(0).map_err(zerr("linger"))?;
        router.set_sndhwm(0).map_err(zerr("hwm"))?;
        router.set_rcvhwm(0).map_err(zerr("hwm"))?;
        router.set_curve_server(true).map_err(zerr("curve"))?;
        router
            .set_curve_secretkey(&server.secret_key)
            .map_err(zerr("curve"))?;
        router.bind(&ep).map_err(zerr("bind"))?;
        let dealer = ctx.socket(zmq::DEALER).map_err(zerr("socket"))?;
        dealer.set_linger(0).map_err(zerr("linger"))?;
        dealer.set_sndhwm(0).map_err(zerr("hwm"))?;
        dealer.set_rcvhwm(0).map_err(zerr("hwm"))?;
        dealer
            .set_curve_serverkey(&server.public_key)
            .map_err(zerr("curve"))?;
        dealer
            .set_curve_publickey(&client.public_key)
            .map_err(zerr("curve"))?;
        dealer
            .set_curve_secretkey(&client.secret_key)
            .map_err(zerr("curve"))?;
        dealer.connect(&ep).map_err(zerr("connect"))?;
        let receiver = std::thread::spawn(move || receive(router));
        Ok(RawPair {
            _ctx: (ctx, rctx),
            dealer,
            receiver: Some(receiver),
            next_tag: 1,
        })
    }

    fn send_sync(&mut self) -> Result<u32> {
        let tag = self.next_tag;
        self.next_tag = self.next_tag.wrapping_add(1).max(1);
        let h = Header::request(PING, 0, tag).encode()?;
        self.dealer
            .send(h, zmq::SNDMORE)
            .and_then(|()| self.dealer.send(&[][..], 0))
            .map_err(zerr("send"))?;
        Ok(tag)
    }

    fn wait(&mut self, tag: u32, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if self
                .dealer
                .poll(zmq::POLLIN, left.as_millis() as i64)
                .map_err(zerr("poll"))?
                == 0
            {
                bail!("raw libzmq pair: no echo within {timeout:?}");
            }
            let m = self.dealer.recv_bytes(0).map_err(zerr("receive"))?;
            if let Ok(h) = canopy_proto::decode_header(&m) {
                if h.matchtag == tag {
                    return Ok(());
                }
            }
        }
    }

    fn ping(&mut self, timeout: Duration) -> Result<()> {
        let t = self.send_sync()?;
        self.wait(t, timeout)
    }

    /// Same protocol as [`Stream::stream`].
    fn stream(
        &mut self,
        hdr: &[u8],
        payload: &[u8],
        count: u64,
        batch: u32,
        timeout: Duration,
        progress: &Progress,
    ) -> Result<Duration> {
        let batch = u64::from(batch.max(1));
        let mut outstanding: VecDeque<u32> = VecDeque::new();
        let mut sent = 0u64;
        let t0 = Instant::now();
        while sent < count {
            let n = batch.min(count - sent);
            for _ in 0..n {
                self.dealer
                    .send(hdr, zmq::SNDMORE)
                    .and_then(|()| self.dealer.send(payload, 0))
                    .map_err(zerr("send"))?;
            }
            outstanding.push_back(self.send_sync()?);
            sent += n;
            if outstanding.len() >= 2 {
                let t = outstanding.pop_front().expect("two outstanding");
                self.wait(t, timeout)?;
                progress.tick();
            }
        }
        while let Some(t) = outstanding.pop_front() {
            self.wait(t, timeout)?;
            progress.tick();
        }
        Ok(t0.elapsed())
    }

    fn close(&mut self) -> Result<()> {
        self.dealer.send(&[STOP][..], 0).map_err(zerr("send"))?;
        if let Some(r) = self.receiver.take() {
            r.join()
                .map_err(|_| anyhow!("raw libzmq pair: the receiver panicked"))??;
        }
        Ok(())
    }
}

impl Drop for RawPair {
    fn drop(&mut self) {
        if self.receiver.is_some() {
            let _ = self.close();
        }
    }
}

/// The ROUTER's loop: count messages, echo the synchronous ones.
fn receive(router: zmq::Socket) -> Result<u64> {
    let mut n = 0u64;
    let mut rid = zmq::Message::new();
    let mut hdr = zmq::Message::new();
    let mut body = zmq::Message::new();
    loop {
        // Give up eventually if the sender is gone without a STOP.
        if router.poll(zmq::POLLIN, 60_000).map_err(zerr("poll"))? == 0 {
            bail!("raw libzmq pair: receiver idle for 60 s");
        }
        router.recv(&mut rid, 0).map_err(zerr("receive"))?;
        router.recv(&mut hdr, 0).map_err(zerr("receive"))?;
        if hdr.get_more() {
            router.recv(&mut body, 0).map_err(zerr("receive"))?;
        }
        if hdr.first() == Some(&STOP) {
            return Ok(n);
        }
        n += 1;
        if hdr.len() > 3 && hdr[3] & FLAG_NORESPONSE == 0 {
            router
                .send(&rid[..], zmq::SNDMORE)
                .and_then(|()| router.send(&hdr[..], 0))
                .map_err(zerr("send"))?;
        }
    }
}

fn human_rate(x: f64) -> String {
    if x >= 1e9 {
        format!("{:.2}G", x / 1e9)
    } else if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1}k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

pub fn table(r: &LinkReport) -> String {
    let p = &r.params;
    let mut s = format!(
        "link: one-way messages over one CURVE link (rank 1 -> rank 0) vs a raw libzmq DEALER->ROUTER\n\
         \x20     pair with CURVE over ipc, same frames; batches of {} + sync; median over {} run(s) [min, max]\n",
        p.batch, p.runs
    );
    let _ = writeln!(
        s,
        "{:>7} {:>8}  {:>10} {:>10} {:>10} {:>10}  {:>22}",
        "pad", "msgs", "raw msg/s", "canopy", "raw B/s", "canopy", "ratio"
    );
    for x in &r.results {
        let _ = writeln!(
            s,
            "{:>7} {:>8}  {:>10} {:>10} {:>10} {:>10}  {:>22}",
            x.pad,
            x.messages,
            human_rate(x.raw_msgs_per_s.median),
            human_rate(x.broker_msgs_per_s.median),
            human_rate(x.raw_bytes_per_s.median),
            human_rate(x.broker_bytes_per_s.median),
            format!(
                "{:.0}% [{:.0}, {:.0}]",
                100.0 * x.ratio.median,
                100.0 * x.ratio.min,
                100.0 * x.ratio.max
            )
        );
    }
    if !r.teardown.clean {
        let _ = writeln!(s, "warning: {}", r.teardown.describe());
    }
    s
}
