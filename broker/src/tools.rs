//! Client tools: `ping`, `overlay status`, `event pub` and `event sub`.

use canopy_client::{Client, ClientError, NODEID_ANY};
use canopy_modules::{RankStatus, StatusReport};
use std::io::Write;
use std::time::{Duration, Instant};

/// Why a tool failed.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// Talking to the broker failed, or it answered with an error.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// Found by the tool itself (bad input, a check before acting): the
    /// broker did not refuse anything.
    #[error("{0}")]
    Local(String),
    /// The broker answered with something the tool cannot read.
    #[error("{0}; is the broker the same canopy version as this tool?")]
    Reply(String),
    /// Writing the output failed. A `BrokenPipe` means the reader went
    /// away (`| head -1`): see [`ToolError::reader_gone`].
    #[error("cannot write the output: {0}")]
    Output(#[source] std::io::Error),
}

impl ToolError {
    /// The output's reader closed its end (EPIPE): not an error to report.
    pub fn reader_gone(&self) -> bool {
        matches!(self, ToolError::Output(e) if e.kind() == std::io::ErrorKind::BrokenPipe)
    }
}

fn output(r: std::io::Result<()>) -> Result<(), ToolError> {
    r.map_err(ToolError::Output)
}

/// Summary of a ping run.
pub struct PingSummary {
    pub sent: u32,
    pub rtts: Vec<Duration>,
}

/// `canopy ping`: one line per reply, then a min/avg/max summary.
pub fn ping(
    uri: Option<&str>,
    rank: Option<u32>,
    count: u32,
    pad: usize,
    interval: Duration,
    timeout: Duration,
    out: &mut dyn Write,
) -> Result<PingSummary, ToolError> {
    let mut c = Client::connect(uri)?;
    let payload: Vec<u8> = (0..pad).map(|i| b'a' + (i % 26) as u8).collect();
    let nodeid = rank.unwrap_or(NODEID_ANY);
    let mut rtts = Vec::with_capacity(count as usize);
    for seq in 0..count {
        if seq > 0 && !interval.is_zero() {
            std::thread::sleep(interval);
        }
        let t0 = Instant::now();
        let m = c.rpc("broker.ping", nodeid, &payload, timeout)?;
        let rtt = t0.elapsed();
        if m.payload != payload {
            return Err(ToolError::Reply(format!(
                "rank {} echoed {} bytes that differ from the {} sent",
                m.header.nodeid,
                m.payload.len(),
                payload.len()
            )));
        }
        output(writeln!(
            out,
            "broker.ping rank={} seq={seq} bytes={} time={:.3} ms",
            m.header.nodeid,
            pad,
            rtt.as_secs_f64() * 1e3
        ))?;
        output(out.flush())?;
        rtts.push(rtt);
    }
    if !rtts.is_empty() {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let min = rtts.iter().min().copied().unwrap_or_default();
        let max = rtts.iter().max().copied().unwrap_or_default();
        let avg = rtts.iter().sum::<Duration>() / rtts.len() as u32;
        output(writeln!(
            out,
            "--- {count} sent, {} received, rtt min/avg/max = {:.3}/{:.3}/{:.3} ms",
            rtts.len(),
            ms(min),
            ms(avg),
            ms(max)
        ))?;
        output(out.flush())?;
    }
    Ok(PingSummary { sent: count, rtts })
}

/// Fetch `overlay.status` from a rank.
pub fn status(uri: Option<&str>, rank: u32, timeout: Duration) -> Result<StatusReport, ToolError> {
    let mut c = Client::connect(uri)?;
    let m = c.rpc("overlay.status", rank, b"", timeout)?;
    serde_json::from_slice(&m.payload)
        .map_err(|e| ToolError::Reply(format!("rank {rank} sent an unreadable status: {e}")))
}

/// Render the status as an indented tree.
pub fn render_status(r: &StatusReport) -> String {
    let mut s = format!(
        "instance {}: {} brokers, fanout {}, {} of {} online here, health {}\n",
        r.broker.instance,
        r.size,
        r.fanout,
        r.online,
        r.ranks.len(),
        r.health
    );
    let by_rank: std::collections::HashMap<u32, &RankStatus> =
        r.ranks.iter().map(|x| (x.rank, x)).collect();
    fn walk(
        s: &mut String,
        by_rank: &std::collections::HashMap<u32, &RankStatus>,
        rank: u32,
        prefix: &str,
        last: bool,
        root: bool,
    ) {
        let Some(x) = by_rank.get(&rank) else { return };
        let branch = if root {
            ""
        } else if last {
            "└─ "
        } else {
            "├─ "
        };
        let missed = if x.missed_events > 0 {
            format!(" [missed {} events]", x.missed_events)
        } else {
            String::new()
        };
        let host = x
            .host
            .as_deref()
            .map(|h| format!(" on {h}"))
            .unwrap_or_default();
        s.push_str(&format!(
            "{prefix}{branch}{rank}: {} ({}, {:.1}s: {}){missed}{host}\n",
            x.health,
            serde_json::to_value(x.state)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default(),
            x.duration_s,
            x.reason
        ));
        // From each rank's parent, so that any tree shape renders.
        let mut kids: Vec<u32> = by_rank
            .values()
            .filter(|x| x.parent == Some(rank))
            .map(|x| x.rank)
            .collect();
        kids.sort_unstable();
        let child_prefix = if root {
            prefix.to_string()
        } else {
            format!("{prefix}{}", if last { "   " } else { "│  " })
        };
        for (i, k) in kids.iter().enumerate() {
            walk(s, by_rank, *k, &child_prefix, i + 1 == kids.len(), false);
        }
    }
    walk(&mut s, &by_rank, r.rank, "", true, true);
    s
}

/// `canopy event pub`: returns the sequence number.
pub fn event_pub(
    uri: Option<&str>,
    topic: &str,
    payload: &[u8],
    timeout: Duration,
) -> Result<u64, ToolError> {
    Ok(Client::connect(uri)?.publish(topic, payload, timeout)?)
}

/// `canopy event sub`: print `count` events (0 = until interrupted, or
/// until the output cannot be written: the reader went away).
pub fn event_sub(
    uri: Option<&str>,
    pattern: &str,
    count: u64,
    timeout: Option<Duration>,
    out: &mut dyn Write,
) -> Result<u64, ToolError> {
    let mut c = Client::connect(uri)?;
    c.subscribe(pattern, Duration::from_secs(10))?;
    let mut n = 0;
    while count == 0 || n < count {
        let m = c.next_event(timeout.unwrap_or(Duration::from_secs(u32::MAX as u64)))?;
        output(writeln!(
            out,
            "{} {} {}",
            m.header.seq,
            m.header.topic,
            String::from_utf8_lossy(&m.payload)
        ))?;
        output(out.flush())?;
        n += 1;
    }
    Ok(n)
}

/// `canopy overlay disconnect RANK`: ask RANK's parent to drop its link.
pub fn disconnect(uri: Option<&str>, rank: u32, timeout: Duration) -> Result<u32, ToolError> {
    let mut c = Client::connect(uri)?;
    let (parents, size) = tree_of(&mut c, timeout)?;
    let parent = parents.get(&rank).copied().flatten().ok_or_else(|| {
        ToolError::Local(format!(
            "rank {rank} has no parent (rank 0, or outside the instance of size {size}); nothing to disconnect it from"
        ))
    })?;
    c.rpc(
        "overlay.disconnect",
        parent,
        rank.to_string().as_bytes(),
        timeout,
    )?;
    Ok(parent)
}

/// One rank's outcome: its message, or why it refused.
pub type RankResult = (u32, Result<String, String>);

/// `canopy acl reload`: every rank re-reads its policy. Per-rank results.
pub fn acl_reload(uri: Option<&str>, timeout: Duration) -> Result<Vec<RankResult>, ToolError> {
    let mut c = Client::connect(uri)?;
    let m = c.rpc("overlay.status", 0, br#"{"summary":true}"#, timeout)?;
    let r: StatusReport = serde_json::from_slice(&m.payload)
        .map_err(|e| ToolError::Reply(format!("rank 0 sent an unreadable status: {e}")))?;
    let mut out = Vec::new();
    for rank in 0..r.size {
        let res = match c.rpc("acl.reload", rank, b"", timeout) {
            Ok(m) => Ok(without_rank_prefix(
                rank,
                &String::from_utf8_lossy(&m.payload),
            )),
            Err(
                e @ ClientError::Remote {
                    errnum: canopy_proto::errno::EPERM,
                    ..
                },
            ) => return Err(e.into()),
            Err(e) => Err(e.to_string()),
        };
        out.push((rank, res));
    }
    Ok(out)
}

/// A rank's reply without a leading `rank N: ` (the tool adds its own).
fn without_rank_prefix(rank: u32, msg: &str) -> String {
    msg.strip_prefix(&format!("rank {rank}: "))
        .unwrap_or(msg)
        .to_string()
}

fn acl_mech(principal: &str, mechanism: Option<&str>) -> Result<canopy_acl::Mech, ToolError> {
    match mechanism {
        Some(m) => m.parse().map_err(|e: canopy_acl::MechParseError| {
            ToolError::Local(format!("--mechanism {m}: {e}"))
        }),
        None if principal.starts_with("unix:") => Ok(canopy_acl::Mech::Local),
        None if principal.starts_with("curve:") => Ok(canopy_acl::Mech::Curve),
        None => Ok(canopy_acl::Mech::Gssapi),
    }
}

/// `canopy acl check --policy FILE`: decide offline.
pub fn acl_check_offline(
    policy: &std::path::Path,
    principal: &str,
    mechanism: Option<&str>,
    address: Option<&str>,
) -> Result<crate::authz::Explained, ToolError> {
    let acl = canopy_acl::Acl::load(policy).map_err(|e| ToolError::Local(e.to_string()))?;
    let address = match address {
        Some(a) => Some(a.parse().map_err(|_| {
            ToolError::Local(format!(
                "--address {a} is not an IP address; give one such as 10.0.0.5 or ::1"
            ))
        })?),
        None => None,
    };
    let q = canopy_acl::Query {
        principal,
        mechanism: acl_mech(principal, mechanism)?,
        address,
        now: std::time::SystemTime::now(),
    };
    Ok(acl.decide(&q).into())
}

/// `canopy whoami`: how the broker this tool connects to sees it.
pub fn whoami(uri: Option<&str>, timeout: Duration) -> Result<serde_json::Value, ToolError> {
    let mut c = Client::connect(uri)?;
    let m = c.rpc("broker.whoami", canopy_proto::NODEID_ANY, b"", timeout)?;
    serde_json::from_slice(&m.payload)
        .map_err(|e| ToolError::Reply(format!("the broker sent an unreadable answer: {e}")))
}

/// `canopy acl check` against the running instance (rank 0).
pub fn acl_check_online(
    uri: Option<&str>,
    principal: &str,
    mechanism: Option<&str>,
    address: Option<&str>,
    timeout: Duration,
) -> Result<crate::authz::Explained, ToolError> {
    let mech = acl_mech(principal, mechanism)?;
    let body = serde_json::json!({
        "principal": principal,
        "mechanism": mech.as_str(),
        "address": address,
    });
    let mut c = Client::connect(uri)?;
    let m = c.rpc("acl.check", 0, body.to_string().as_bytes(), timeout)?;
    serde_json::from_slice(&m.payload)
        .map_err(|e| ToolError::Reply(format!("rank 0 sent an unreadable verdict: {e}")))
}

/// `overlay status --wait HEALTH`: poll until the subtree's health is
/// `want`. Ok(report) when reached, Err(last report) on timeout.
pub fn wait_health(
    uri: Option<&str>,
    rank: u32,
    want: &str,
    timeout: Duration,
) -> Result<Result<StatusReport, StatusReport>, ToolError> {
    const STATES: [&str; 5] = ["full", "partial", "degraded", "lost", "offline"];
    if !STATES.contains(&want) {
        return Err(ToolError::Local(format!(
            "--wait {want}: expected one of {}",
            STATES.join(", ")
        )));
    }
    let deadline = Instant::now() + timeout;
    let mut c = Client::connect(uri)?;
    loop {
        let m = c.rpc(
            "overlay.status",
            rank,
            b"",
            timeout.max(Duration::from_secs(1)),
        )?;
        let r: StatusReport = serde_json::from_slice(&m.payload)
            .map_err(|e| ToolError::Reply(format!("rank {rank} sent an unreadable status: {e}")))?;
        if r.health.to_string() == want {
            return Ok(Ok(r));
        }
        if Instant::now() >= deadline {
            return Ok(Err(r));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `canopy key reload`: every rank re-reads its neighbours' certificates.
pub fn key_reload(uri: Option<&str>, timeout: Duration) -> Result<Vec<RankResult>, ToolError> {
    let mut c = Client::connect(uri)?;
    let m = c.rpc("overlay.status", 0, br#"{"summary":true}"#, timeout)?;
    let r: StatusReport = serde_json::from_slice(&m.payload)
        .map_err(|e| ToolError::Reply(format!("rank 0 sent an unreadable status: {e}")))?;
    let mut out = Vec::new();
    for rank in 0..r.size {
        // The broker's reply names its rank (`rank 0: reloaded ...`); the
        // caller prints `rank N: ` before each line, so drop it here.
        let res = match c.rpc(crate::rotate::RELOAD_TOPIC, rank, b"", timeout) {
            Ok(m) => Ok(without_rank_prefix(
                rank,
                &String::from_utf8_lossy(&m.payload),
            )),
            Err(
                e @ ClientError::Remote {
                    errnum: canopy_proto::errno::EPERM,
                    ..
                },
            ) => return Err(e.into()),
            Err(e) => Err(e.to_string()),
        };
        out.push((rank, res));
    }
    Ok(out)
}

/// `key.status` of RANK.
pub fn key_status(
    c: &mut Client,
    rank: u32,
    timeout: Duration,
) -> Result<crate::rotate::KeyStatus, ToolError> {
    let m = c.rpc(crate::rotate::STATUS_TOPIC, rank, b"", timeout)?;
    serde_json::from_slice(&m.payload)
        .map_err(|e| ToolError::Reply(format!("rank {rank} sent an unreadable key status: {e}")))
}

/// `canopy key switch`: RANK's broker moves to its next key; then wait
/// (up to `wait`) until none of its links is moving. Returns the switch
/// reply, and the final status with the time it took to settle.
pub fn key_switch(
    uri: Option<&str>,
    rank: u32,
    next_key: Option<&str>,
    timeout: Duration,
    wait: Duration,
) -> Result<(String, crate::rotate::KeyStatus, Duration), ToolError> {
    let mut c = Client::connect(uri)?;
    let t0 = Instant::now();
    if let Some(next) = next_key {
        // Fail before switching if a neighbour would refuse the new key.
        let (parents, _) = tree_of(&mut c, timeout)?;
        let mut neighbours: Vec<u32> = parents
            .iter()
            .filter(|(_, p)| **p == Some(rank))
            .map(|(r, _)| *r)
            .collect();
        neighbours.extend(parents.get(&rank).copied().flatten());
        neighbours.sort_unstable();
        for n in neighbours {
            let st = match key_status(&mut c, n, timeout) {
                Ok(st) => st,
                // Not online: it reads the certificates when it starts.
                Err(ToolError::Client(ClientError::Remote {
                    errnum: canopy_proto::errno::EHOSTUNREACH,
                    ..
                })) => continue,
                Err(e) => return Err(e),
            };
            if !st
                .admitted
                .get(&rank)
                .is_some_and(|ks| ks.iter().any(|k| k == next))
            {
                return Err(ToolError::Local(format!(
                    "rank {n} does not admit rank {rank}'s next key {next} yet: install its .next public certificate there and run `canopy key reload`; nothing was switched"
                )));
            }
        }
    }
    let m = c.rpc(crate::rotate::SWITCH_TOPIC, rank, b"", timeout)?;
    let reply = String::from_utf8_lossy(&m.payload).into_owned();
    loop {
        let st = key_status(&mut c, rank, timeout)?;
        if st.settled() || t0.elapsed() > wait {
            return Ok((reply, st, t0.elapsed()));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The public key RANK's broker uses now (Z85).
pub fn key_in_use(uri: Option<&str>, rank: u32, timeout: Duration) -> Result<String, ToolError> {
    let r = status(uri, rank, timeout)?;
    Ok(r.broker.public_key)
}

/// Every rank's parent, from rank 0's `overlay.status` (any tree shape),
/// and the instance size.
fn tree_of(
    c: &mut Client,
    timeout: Duration,
) -> Result<(std::collections::HashMap<u32, Option<u32>>, u32), ToolError> {
    let m = c.rpc("overlay.status", 0, b"", timeout)?;
    let r: StatusReport = serde_json::from_slice(&m.payload)
        .map_err(|e| ToolError::Reply(format!("rank 0 sent an unreadable status: {e}")))?;
    Ok((r.ranks.iter().map(|x| (x.rank, x.parent)).collect(), r.size))
}

/// `canopy config check PATH`: load and validate the config, then refuse
/// what every broker would refuse at start although the config model
/// accepts it, with the broker's reason. Returns the summary.
pub fn config_check(path: &std::path::Path) -> Result<String, ToolError> {
    let summary = crate::system::config_check(path).map_err(|e| ToolError::Local(e.to_string()))?;
    let config =
        canopy_config::Config::load(path).map_err(|e| ToolError::Local(format!("config: {e}")))?;
    startup_check(&config, path)?;
    Ok(summary)
}

/// What a broker of this config refuses at start that `Config::load`
/// lets through: with CURVE, every broker loads its own secret
/// certificate, so `bootstrap.curve_cert` is needed even for one host.
fn startup_check(config: &canopy_config::Config, path: &std::path::Path) -> Result<(), ToolError> {
    if config.mechanism() == canopy_config::Mechanism::Curve {
        if let Some(rank) = (0..config.size()).find(|r| config.cert_path(*r).is_none()) {
            return Err(ToolError::Local(format!(
                "config: no secret certificate is configured for rank {rank} ({}), so its broker would refuse to start; set bootstrap.curve_cert in {} to each node's secret certificate, e.g. \"/etc/canopy/curve/%h.key_secret\" (write one with `canopy keygen`)",
                config.host(rank).unwrap_or("?"),
                path.display()
            )));
        }
    }
    Ok(())
}

/// `canopy rpc`: one request, its response's payload.
pub fn rpc(
    uri: Option<&str>,
    topic: &str,
    rank: Option<u32>,
    payload: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>, ToolError> {
    let mut c = Client::connect(uri)?;
    let m = c.rpc(topic, rank.unwrap_or(NODEID_ANY), payload, timeout)?;
    Ok(m.payload)
}

/// `canopy service list`: each selected rank's `service.list` answer.
/// `rank`: a number, `all`, or `None` for the local broker.
pub fn service_list(
    uri: Option<&str>,
    rank: Option<&str>,
    timeout: Duration,
) -> Result<Vec<serde_json::Value>, ToolError> {
    let mut c = Client::connect(uri)?;
    let ranks: Vec<u32> = match rank {
        None => vec![NODEID_ANY],
        Some("all") => {
            let m = c.rpc("overlay.status", 0, br#"{"summary":true}"#, timeout)?;
            let v: serde_json::Value = serde_json::from_slice(&m.payload).map_err(|e| {
                ToolError::Reply(format!("rank 0 sent an unreadable overlay status: {e}"))
            })?;
            let size = v["size"]
                .as_u64()
                .ok_or_else(|| ToolError::Reply("rank 0's overlay status has no size".into()))?;
            (0..size as u32).collect()
        }
        Some(r) => vec![r.parse().map_err(|_| {
            ToolError::Local(format!(
                "--rank {r:?} is neither a rank number nor 'all'; e.g. -r 3 or -r all"
            ))
        })?],
    };
    let mut out = Vec::with_capacity(ranks.len());
    for r in ranks {
        let topic = "service.list";
        let m = if r == NODEID_ANY {
            // The local broker: service.list is served everywhere, so ANY
            // stops at the first broker.
            c.rpc(topic, NODEID_ANY, b"", timeout)?
        } else {
            c.rpc(topic, r, b"", timeout)?
        };
        out.push(serde_json::from_slice(&m.payload).map_err(|e| {
            ToolError::Reply(format!("rank {r} sent an unreadable service list: {e}"))
        })?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rank_prefix_is_dropped_once() {
        assert_eq!(
            without_rank_prefix(0, "rank 0: reloaded 2 neighbour certificates"),
            "reloaded 2 neighbour certificates"
        );
        // Another rank's name, or none, stays.
        assert_eq!(without_rank_prefix(1, "rank 0: x"), "rank 0: x");
        assert_eq!(without_rank_prefix(3, "reloaded"), "reloaded");
        assert_eq!(without_rank_prefix(3, "rank 3: rank 3: x"), "rank 3: x");
    }

    #[test]
    fn a_one_host_curve_config_needs_a_secret_certificate() {
        let path = std::path::Path::new("solo.toml");
        let no_cert = canopy_config::Config::parse(
            "[bootstrap]\nhosts = [ { host = \"solo\" } ]\n",
            "solo.toml",
        )
        .unwrap();
        let e = startup_check(&no_cert, path).unwrap_err().to_string();
        assert!(
            e.contains("no secret certificate is configured for rank 0 (solo)")
                && e.contains("bootstrap.curve_cert"),
            "{e}"
        );
        let with_cert = canopy_config::Config::parse(
            "[bootstrap]\ncurve_cert = \"/etc/canopy/curve/%h.key_secret\"\nhosts = [ { host = \"solo\" } ]\n",
            "solo.toml",
        )
        .unwrap();
        startup_check(&with_cert, path).unwrap();
        let gss = canopy_config::Config::parse(
            "[bootstrap]\nmechanism = \"gssapi\"\nhosts = [ { host = \"solo\" } ]\n[gssapi]\n",
            "solo.toml",
        )
        .unwrap();
        startup_check(&gss, path).unwrap();
    }

    #[test]
    fn only_a_broken_pipe_means_the_reader_went_away() {
        let gone = ToolError::Output(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
        assert!(gone.reader_gone());
        let full = ToolError::Output(std::io::Error::from(std::io::ErrorKind::StorageFull));
        assert!(!full.reader_gone());
        // The broker's socket closing is not the output's reader.
        let sock = ToolError::Client(ClientError::Io(std::io::Error::from(
            std::io::ErrorKind::BrokenPipe,
        )));
        assert!(!sock.reader_gone());
    }
}
