//! A network partition between hosts: three hosts (network namespaces on a
//! bridge, each with its own address) run a system instance over TCP; one
//! host's cable is pulled for 30 s. Neither side hangs: rank 0 reports the
//! host lost and fails requests to it at once, the cut host fails requests
//! to the rest at once, and when the cable is back the cut host rejoins by
//! itself and the instance returns to full.
#![forbid(unsafe_code)]

use canopy_client::Client;
use canopy_proto::errno;
use canopy_t::netns::{self, Net};
use canopy_t::{canopy_bin, wait_until, RPC_TIMEOUT};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

const PORT: u16 = 7810;
const PARTITION: Duration = Duration::from_secs(30);

/// Brokers we started: killed and reaped on drop (the net's teardown also
/// kills everything in its namespaces, even if this drop never runs).
struct Brokers(Vec<Child>);

impl Drop for Brokers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn uri(dir: &Path, rank: usize) -> String {
    format!("local://{}/run-n{rank}/local-{rank}", dir.display())
}

fn status(dir: &Path, rank: usize) -> Option<serde_json::Value> {
    let mut c = Client::connect(Some(&uri(dir, rank))).ok()?;
    let m = c
        .rpc("overlay.status", rank as u32, b"", Duration::from_secs(2))
        .ok()?;
    serde_json::from_slice(&m.payload).ok()
}

fn state_of(dir: &Path, rank: u32) -> String {
    status(dir, 0)
        .and_then(|s| {
            s["ranks"]
                .as_array()?
                .iter()
                .find(|r| r["rank"] == rank)
                .and_then(|r| r["state"].as_str().map(String::from))
        })
        .unwrap_or_else(|| "unknown".into())
}

fn logs(dir: &Path) -> String {
    (0..3)
        .map(|r| {
            format!(
                "--- n{r}\n{}",
                std::fs::read_to_string(dir.join(format!("n{r}.log"))).unwrap_or_default()
            )
        })
        .collect()
}

/// A ping from `from`'s local connector to `to` fails at once with
/// EHOSTUNREACH (does not hang).
fn assert_unreachable_fast(dir: &Path, from: usize, to: u32) {
    let mut c = Client::connect(Some(&uri(dir, from))).unwrap();
    let t = Instant::now();
    let err = c
        .rpc("broker.ping", to, b"x", RPC_TIMEOUT)
        .expect_err("a ping across the partition cannot succeed");
    assert_eq!(
        err.errnum(),
        Some(errno::EHOSTUNREACH),
        "rank {from} -> {to}: {err}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "rank {from} -> {to} took {:?} to fail",
        t.elapsed()
    );
}

#[test]
fn a_host_cut_off_for_30_s_is_lost_then_rejoins_by_itself() {
    if !netns::can_run("partition") {
        return;
    }
    let tmp = tempfile::Builder::new()
        .prefix("canopy-part-")
        .tempdir()
        .unwrap();
    let dir: PathBuf = tmp.path().to_path_buf();
    netns::run_test(Duration::from_secs(120), move || {
        let net = Net::new(3).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        for d in ["sec", "pub"] {
            std::fs::create_dir(dir.join(d)).unwrap();
        }
        std::fs::set_permissions(dir.join("sec"), std::fs::Permissions::from_mode(0o700)).unwrap();
        let mut hosts = String::new();
        for h in net.hosts() {
            let name = format!("n{}", h.index());
            let kp = canopy_security::CurveKeypair::generate().unwrap();
            canopy_security::cert::write_pair(
                &kp,
                &name,
                &dir.join(format!("sec/{name}.key_secret")),
                &dir.join(format!("pub/{name}.key")),
            )
            .unwrap();
            let ep = format!("tcp://{}:{PORT}", h.ip());
            hosts.push_str(&format!(
                "  {{ host = \"{name}\", bind = \"{ep}\", connect = \"{ep}\" }},\n"
            ));
        }
        let d = dir.display();
        let cfg = dir.join("canopy.toml");
        std::fs::write(
            &cfg,
            format!(
                "[bootstrap]\ncurve_cert = \"{d}/sec/%h.key_secret\"\ncurve_public_certs = \"{d}/pub\"\nfanout = 2\nhosts = [\n{hosts}]\n\n[timing]\nheartbeat = 0.2\ntorpid = 1\nlost = 3\n"
            ),
        )
        .unwrap();
        let mut brokers = Brokers(Vec::new());
        for h in net.hosts() {
            let r = h.index();
            let log = std::fs::File::create(dir.join(format!("n{r}.log"))).unwrap();
            let mut cmd = h.command(canopy_bin());
            cmd.args(["broker", "--config"])
                .arg(&cfg)
                .args(["--hostname", &format!("n{r}"), "--force-root", "--rundir"])
                .arg(dir.join(format!("run-n{r}")))
                .env("RUST_LOG", "info")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log);
            brokers.0.push(cmd.spawn().unwrap());
        }
        let full = || status(&dir, 0).is_some_and(|s| s["health"] == "full");
        assert!(
            wait_until(Duration::from_secs(30), full),
            "never full: {:?}\n{}",
            status(&dir, 0),
            logs(&dir)
        );

        // Pull host 2's cable.
        net.cut(2).unwrap();
        let t0 = Instant::now();
        assert!(
            wait_until(Duration::from_secs(10), || state_of(&dir, 2) == "lost"),
            "rank 0 never saw rank 2 lost: {:?}",
            status(&dir, 0)
        );
        println!("rank 2 lost after {:?}", t0.elapsed());
        assert_unreachable_fast(&dir, 0, 2);
        // The cut side notices too, and fails its requests upward at once.
        assert!(
            wait_until(Duration::from_secs(10), || std::fs::read_to_string(
                dir.join("n2.log")
            )
            .unwrap_or_default()
            .contains("lost the parent link")),
            "rank 2 never noticed its parent was gone:\n{}",
            logs(&dir)
        );
        assert_unreachable_fast(&dir, 2, 0);
        // The rest of the instance works throughout.
        let mut c = Client::connect(Some(&uri(&dir, 0))).unwrap();
        c.rpc("broker.ping", 1, b"ok", RPC_TIMEOUT).unwrap();
        assert_eq!(status(&dir, 0).unwrap()["health"], "degraded");

        let rest = PARTITION.saturating_sub(t0.elapsed());
        std::thread::sleep(rest);
        // Still partitioned at the end, and nothing hung meanwhile.
        assert_eq!(state_of(&dir, 2), "lost");
        assert_unreachable_fast(&dir, 2, 0);

        net.heal(2).unwrap();
        let t1 = Instant::now();
        assert!(
            wait_until(Duration::from_secs(20), full),
            "not full 20 s after the partition healed: {:?}\n{}",
            status(&dir, 0),
            logs(&dir)
        );
        println!("full again {:?} after healing", t1.elapsed());
        for r in 0..3 {
            let m = c.rpc("broker.ping", r, b"back", RPC_TIMEOUT).unwrap();
            assert_eq!(m.header.nodeid, r);
        }
        let mut c2 = Client::connect(Some(&uri(&dir, 2))).unwrap();
        c2.rpc("broker.ping", 0, b"up", RPC_TIMEOUT).unwrap();
        drop(brokers);
        net.destroy().unwrap();
    });
    drop(tmp);
}
