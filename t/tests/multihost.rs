//! The system instance across hosts: four network namespaces on a bridge
//! (198.18.0.0/15), each with its own address and its own CURVE key, each
//! running `canopy broker --config` with one shared config over TCP.
//!
//! * `four_hosts_reach_full_health_and_impostors_cannot_join`: full health
//!   (`canopy overlay status --wait full`), every rank answers a ping, a
//!   host with a well-formed key not in the config cannot join, and a host
//!   presenting node2's key while claiming rank 3 is refused.
//! * `key_rotation_under_traffic_loses_nothing`: node1 (rank 1, which has
//!   a parent and a child) rotates its key with `canopy key new / reload /
//!   switch / retire` while clients keep pipelined RPCs to every rank in
//!   flight and events flow to a subscriber below node1; every RPC is
//!   answered, every event arrives once and in order, and afterwards the
//!   old key is refused.
//!
//! The test process stays in the root namespace and talks to each broker
//! through its local connector (a UNIX socket in a shared directory).
#![forbid(unsafe_code)]

use canopy_client::Client;
use canopy_t::netns::{self, Host, Net};
use canopy_t::{canopy_bin, run_canopy, text, wait_until, RPC_TIMEOUT};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(150);
const HOSTS: u32 = 4;
const PORT: u16 = 8050;

/// One broker process in a namespace; its process group is SIGKILLed on drop.
struct Proc {
    child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = killpg(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Four hosts node0..node3 (plus spare namespaces for impostors), their
/// keys, the shared config, and the brokers.
struct Site {
    net: Net,
    dir: tempfile::TempDir,
    procs: Vec<Option<Proc>>,
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

impl Site {
    fn new(spare: usize) -> Site {
        let net = Net::new(HOSTS as usize + spare).expect("network namespaces");
        let dir = tempfile::Builder::new()
            .prefix("canopy-mh-")
            .tempdir()
            .unwrap();
        chmod(dir.path(), 0o755);
        for d in ["sec", "pub", "imp"] {
            std::fs::create_dir(dir.path().join(d)).unwrap();
        }
        chmod(&dir.path().join("sec"), 0o700);
        chmod(&dir.path().join("imp"), 0o700);
        let s = Site {
            net,
            dir,
            procs: (0..HOSTS + spare as u32).map(|_| None).collect(),
        };
        for r in 0..HOSTS {
            let kp = canopy_security::CurveKeypair::generate().unwrap();
            canopy_security::cert::write_pair(
                &kp,
                &format!("node{r}"),
                &s.path(&format!("sec/node{r}.key_secret")),
                &s.path(&format!("pub/node{r}.key")),
            )
            .unwrap();
        }
        // Another local user may use the instance, but not administer it.
        s.write(
            "policy.toml",
            &format!("[[rule]]\nname = \"other-user\"\nprincipal = \"unix:{OTHER_USER}\"\nroles = [\"user\"]\n"),
        );
        s.write("canopy.toml", &s.config_text("sec"));
        // Impostors use the same host list (same fingerprint) but read
        // their secret from imp/.
        s.write("impostor.toml", &s.config_text("imp"));
        s
    }

    fn config_text(&self, secdir: &str) -> String {
        let d = self.dir.path().display();
        let hosts: String = (0..HOSTS)
            .map(|r| {
                let ip = self.net.host(r as usize).ip();
                format!(
                    "  {{ host = \"node{r}\", bind = \"tcp://{ip}:%p\", connect = \"tcp://{ip}:%p\" }},\n"
                )
            })
            .collect();
        format!(
            "[bootstrap]\ndefault_port = {PORT}\ncurve_cert = \"{d}/{secdir}/%h.key_secret\"\ncurve_public_certs = \"{d}/pub\"\nfanout = 2\nhosts = [\n{hosts}]\n\n[timing]\nheartbeat = 0.2\ntorpid = 1.0\nlost = 3.0\n\n[policy]\nfile = \"{d}/policy.toml\"\n"
        )
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn write(&self, name: &str, text: &str) {
        let p = self.path(name);
        std::fs::write(&p, text).unwrap();
        chmod(&p, 0o644);
    }

    fn cfg(&self) -> String {
        self.path("canopy.toml").display().to_string()
    }

    fn uri(&self, rank: u32) -> String {
        format!("local://{}/local-{rank}", self.path("run").display())
    }

    fn log(&self, slot: usize) -> String {
        std::fs::read(self.path(&format!("host{slot}.log")))
            .map(|b| text(&b))
            .unwrap_or_default()
    }

    fn logs(&self) -> String {
        (0..self.procs.len())
            .map(|i| format!("--- host{i}\n{}", self.log(i)))
            .collect()
    }

    /// Start `canopy broker --config CONFIG --hostname NAME` on host `slot`.
    fn start(&mut self, slot: usize, name: &str, config: &str) {
        let host: Host = self.net.host(slot).clone();
        let rundir = self.path(if config == "canopy.toml" {
            "run"
        } else {
            "run-impostor"
        });
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path(&format!("host{slot}.log")))
            .unwrap();
        let mut cmd = host.command(canopy_bin());
        cmd.args(["broker", "--config"]).arg(self.path(config));
        if config == "canopy.toml" {
            // The environment form of --hostname.
            cmd.env("CANOPY_HOSTNAME", name);
        } else {
            cmd.args(["--hostname", name]);
        }
        cmd.args(["--force-root", "--rundir"])
            .arg(rundir)
            .env("RUST_LOG", "info")
            .env_remove("CANOPY_URI")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0);
        let child = cmd.spawn().unwrap();
        self.procs[slot] = Some(Proc { child });
    }

    fn stop(&mut self, slot: usize) {
        self.procs[slot] = None;
    }

    fn canopy(&self, args: &[&str]) -> (bool, String) {
        let out = run_canopy(args, &[], Duration::from_secs(30));
        (
            out.status.success(),
            format!("{}{}", text(&out.stdout), text(&out.stderr)),
        )
    }

    fn wait_full(&self) {
        let uri = self.uri(0);
        // The local connector appears once rank 0 is up.
        assert!(
            wait_until(Duration::from_secs(10), || Client::connect(Some(&uri))
                .is_ok()),
            "rank 0 never came up:\n{}",
            self.logs()
        );
        let (ok, out) = self.canopy(&[
            "overlay",
            "status",
            "--wait",
            "full",
            "--timeout",
            "10s",
            "--uri",
            &uri,
        ]);
        assert!(ok, "not full: {out}\n{}", self.logs());
    }

    fn client(&self, rank: u32) -> Client {
        let uri = self.uri(rank);
        let mut last = None;
        let ok = wait_until(Duration::from_secs(10), || {
            match Client::connect(Some(&uri)) {
                Ok(c) => {
                    last = Some(c);
                    true
                }
                Err(_) => false,
            }
        });
        assert!(ok, "cannot connect to rank {rank}");
        last.unwrap()
    }

    fn rank_state(&self, rank: u32) -> String {
        let mut c = self.client(0);
        let m = c.rpc("overlay.status", 0, b"", RPC_TIMEOUT).unwrap();
        let s: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        s["ranks"][rank as usize]["state"]
            .as_str()
            .unwrap_or("?")
            .to_string()
    }

    fn public_z85(&self, file: &str) -> String {
        let c = canopy_security::cert::load_public(&self.path(file)).unwrap();
        canopy_security::z85::encode(&c.public)
    }
}

const OTHER_USER: &str = "canopy-t-other";

/// The uid of OTHER_USER, creating it if needed (as t/tests/security.rs).
fn other_user() -> u32 {
    let lookup = || {
        nix::unistd::User::from_name(OTHER_USER)
            .ok()
            .flatten()
            .map(|u| u.uid.as_raw())
    };
    if let Some(uid) = lookup() {
        return uid;
    }
    let out = canopy_t::run_command(
        std::process::Command::new("useradd").args(["--system", "--no-create-home", OTHER_USER]),
        Duration::from_secs(30),
    );
    lookup().unwrap_or_else(|| {
        panic!(
            "cannot create user {OTHER_USER}: {:?}\n{}",
            out.status,
            text(&out.stderr)
        )
    })
}

/// Run a copy of `canopy` (in the site's directory) as OTHER_USER.
fn canopy_as_other_user(site: &Site, args: &[&str]) -> (bool, String) {
    other_user();
    let copy = site.path("canopy");
    if !copy.exists() {
        std::fs::copy(canopy_bin(), &copy).unwrap();
        chmod(&copy, 0o755);
    }
    let out = canopy_t::run_command(
        std::process::Command::new("runuser")
            .args(["-u", OTHER_USER, "--"])
            .arg(&copy)
            .args(args)
            .env("RUST_LOG", "warn")
            .env_remove("CANOPY_URI"),
        Duration::from_secs(30),
    );
    (
        out.status.success(),
        format!("{}{}", text(&out.stdout), text(&out.stderr)),
    )
}

fn ping_all(site: &Site) {
    for r in 0..HOSTS {
        let (ok, out) = site.canopy(&[
            "ping",
            "--rank",
            &r.to_string(),
            "--count",
            "1",
            "--uri",
            &site.uri(0),
        ]);
        assert!(ok && out.contains(&format!("rank={r}")), "rank {r}: {out}");
    }
}

#[test]
fn four_hosts_reach_full_health_and_impostors_cannot_join() {
    if !netns::can_run("four_hosts_reach_full_health_and_impostors_cannot_join") {
        return;
    }
    netns::run_test(LIMIT, || {
        let mut site = Site::new(1);
        for r in 0..HOSTS as usize {
            site.start(r, &format!("node{r}"), "canopy.toml");
        }
        site.wait_full();
        ping_all(&site);
        // Each broker listens on its own host's address.
        let mut c = site.client(0);
        for r in 0..2u32 {
            let m = c.rpc("overlay.status", r, b"", RPC_TIMEOUT).unwrap();
            let s: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            let ep = s["broker"]["endpoint"].as_str().unwrap().to_string();
            assert_eq!(
                ep,
                format!("tcp://{}:{PORT}", site.net.host(r as usize).ip()),
                "{s}"
            );
        }

        // node3 goes away; an impostor host with a well-formed key that is
        // not in the config claims its place.
        site.stop(3);
        assert!(
            wait_until(Duration::from_secs(10), || site.rank_state(3) != "online"),
            "rank 3 still online after its broker died"
        );
        let imp = canopy_security::CurveKeypair::generate().unwrap();
        canopy_security::cert::write_pair(
            &imp,
            "node3",
            &site.path("imp/node3.key_secret"),
            &site.path("imp/node3.pub"),
        )
        .unwrap();
        let imp_principal = format!("curve:{}", imp.public_z85());
        site.start(4, "node3", "impostor.toml");
        assert!(
            wait_until(Duration::from_secs(10), || {
                let l = site.log(1);
                l.contains("verdict=deny") && l.contains(&imp_principal)
            }),
            "rank 1 did not deny the impostor key {imp_principal}:\n{}",
            site.logs()
        );
        std::thread::sleep(Duration::from_millis(500));
        assert_ne!(site.rank_state(3), "online", "the impostor joined");
        let e = c.rpc("broker.ping", 3, b"", RPC_TIMEOUT).unwrap_err();
        assert_eq!(e.errnum(), Some(canopy_proto::errno::EHOSTUNREACH), "{e}");
        site.stop(4);

        // A host presenting node2's (valid) key while claiming rank 3.
        std::fs::remove_file(site.path("imp/node3.key_secret")).unwrap();
        std::fs::copy(
            site.path("sec/node2.key_secret"),
            site.path("imp/node3.key_secret"),
        )
        .unwrap();
        chmod(&site.path("imp/node3.key_secret"), 0o600);
        let node2 = format!("curve:{}", site.public_z85("pub/node2.key"));
        let before = site.log(1).matches(&node2).count();
        site.start(4, "node3", "impostor.toml");
        assert!(
            wait_until(Duration::from_secs(10), || {
                site.log(1)
                    .lines()
                    .filter(|l| l.contains(&node2) && l.contains("verdict=deny"))
                    .count()
                    > before
            }),
            "rank 1 did not refuse node2's key claiming rank 3:\n{}",
            site.logs()
        );
        std::thread::sleep(Duration::from_millis(500));
        assert_ne!(site.rank_state(3), "online", "node2's key joined as rank 3");
        // node2 itself is unaffected.
        assert_eq!(site.rank_state(2), "online");
        site.stop(4);

        // The real node3 comes back.
        site.start(3, "node3", "canopy.toml");
        site.wait_full();
        ping_all(&site);
        drop(c);
        site.procs.clear();
        site.net.destroy().unwrap();
    });
}

/// What a traffic thread saw.
struct Traffic {
    answered: u64,
    failed: Vec<String>,
    /// The longest a window of requests took to be answered.
    slowest: Duration,
}

/// Pipelined pings to `targets` from the broker at `uri`, WINDOW in flight,
/// until `stop`.
fn traffic(uri: String, targets: Vec<u32>, stop: Arc<AtomicBool>) -> Traffic {
    const WINDOW: usize = 16;
    let mut c = Client::connect(Some(&uri)).unwrap();
    let mut ok = 0u64;
    let mut failed = Vec::new();
    let mut n = 0u64;
    let mut slowest = Duration::ZERO;
    // Stops at the first failure: the test fails anyway, and a thread left
    // spinning against dead brokers would only slow the other tests.
    while !stop.load(Ordering::Relaxed) && failed.is_empty() {
        let mut tags = Vec::with_capacity(WINDOW);
        let t0 = Instant::now();
        for i in 0..WINDOW {
            let rank = targets[(n as usize + i) % targets.len()];
            let payload = format!("{n}-{i}");
            match c.send("broker.ping", rank, payload.as_bytes()) {
                Ok(t) => tags.push((t, rank, payload)),
                Err(e) => failed.push(format!("send to rank {rank}: {e}")),
            }
        }
        for (t, rank, payload) in tags {
            match c.wait(t, RPC_TIMEOUT) {
                Ok(m) if m.payload == payload.as_bytes() && m.header.nodeid == rank => ok += 1,
                Ok(m) => failed.push(format!("rank {rank}: wrong echo from {}", m.header.nodeid)),
                Err(e) => failed.push(format!("rank {rank}: {e}")),
            }
        }
        slowest = slowest.max(t0.elapsed());
        n += 1;
    }
    Traffic {
        answered: ok,
        failed,
        slowest,
    }
}

/// The `... in N ms` figures of the log lines containing `what`.
fn ms_in(log: &str, what: &str) -> Vec<u64> {
    log.lines()
        .filter_map(|l| l.split(what).nth(1))
        .filter_map(|after| {
            after
                .split(|c: char| !c.is_ascii_digit())
                .find(|s| !s.is_empty())?
                .parse()
                .ok()
        })
        .collect()
}

/// Occurrences of `what` in host `slot`'s log.
fn count(site: &Site, slot: usize, what: &str) -> usize {
    site.log(slot).matches(what).count()
}

const UP_MOVED: &str = "parent link re-established on a new connection in ";
const REBOUND: &str = "listening for children with the new key ";

/// `canopy key new`, `key reload`, `key switch`: rank `rank` (host
/// node<rank>) moves to a new key; returns it (Z85) once every link of
/// that rank has moved (its parent link, and each child's link to it).
fn switch(site: &Site, rank: u32, children: &[u32]) -> (String, Duration) {
    let cfg = site.cfg();
    let uri0 = site.uri(0);
    let host = format!("node{rank}");
    let (ok, out) = site.canopy(&["key", "new", &host, "--config", &cfg]);
    assert!(ok, "{out}");
    let mode = std::fs::metadata(site.path(&format!("sec/{host}.key_secret.next")))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "next secret readable by others");
    let new_pub = site.public_z85(&format!("pub/{host}.key.next"));
    // Before the reload the neighbours would refuse the new key: the
    // switch is refused and nothing changes.
    let (ok, out) = site.canopy(&["key", "switch", &host, "--config", &cfg, "--uri", &uri0]);
    assert!(!ok && out.contains("does not admit"), "{out}");
    let (ok, out) = site.canopy(&["key", "reload", "--uri", &uri0]);
    assert!(ok, "{out}");
    assert!(out.contains("rank 0:") && out.contains("rank 3:"), "{out}");
    let up_before = count(site, rank as usize, UP_MOVED);
    let rebind_before = count(site, rank as usize, REBOUND);
    let kids_before: Vec<usize> = children
        .iter()
        .map(|c| count(site, *c as usize, UP_MOVED))
        .collect();
    let t0 = Instant::now();
    let (ok, out) = site.canopy(&["key", "switch", &host, "--config", &cfg, "--uri", &uri0]);
    assert!(ok, "{out}");
    assert!(
        out.contains(&new_pub) && out.contains("links moved to key"),
        "{out}"
    );
    if let Some(l) = out.lines().find(|l| l.contains("links moved")) {
        println!("canopy key switch {host}: {l}");
    }
    let moved = wait_until(Duration::from_secs(10), || {
        (rank == 0 || count(site, rank as usize, UP_MOVED) > up_before)
            && (children.is_empty() || count(site, rank as usize, REBOUND) > rebind_before)
            && children
                .iter()
                .zip(&kids_before)
                .all(|(c, b)| count(site, *c as usize, UP_MOVED) > *b)
    });
    let took = t0.elapsed();
    assert!(moved, "{host}'s links did not move:\n{}", site.logs());
    let (ok, out) = site.canopy(&[
        "overlay",
        "status",
        "--rank",
        &rank.to_string(),
        "--json",
        "--uri",
        &uri0,
    ]);
    assert!(
        ok && out.contains(&new_pub),
        "{host} does not use its new key: {out}"
    );
    (new_pub, took)
}

/// `canopy key retire`: the next key replaces the old one everywhere.
fn retire(site: &Site, rank: u32, new_pub: &str) {
    let host = format!("node{rank}");
    let (ok, out) = site.canopy(&[
        "key",
        "retire",
        &host,
        "--config",
        &site.cfg(),
        "--uri",
        &site.uri(0),
    ]);
    assert!(ok, "{out}");
    assert!(!site.path(&format!("pub/{host}.key.next")).exists());
    assert!(!site.path(&format!("sec/{host}.key_secret.next")).exists());
    assert_eq!(site.public_z85(&format!("pub/{host}.key")), new_pub);
}

#[test]
fn key_rotation_under_traffic_loses_nothing() {
    if !netns::can_run("key_rotation_under_traffic_loses_nothing") {
        return;
    }
    netns::run_test(LIMIT, || {
        let mut site = Site::new(0);
        for r in 0..HOSTS as usize {
            site.start(r, &format!("node{r}"), "canopy.toml");
        }
        site.wait_full();
        ping_all(&site);
        let uri0 = site.uri(0);

        // A user who is not an admin may read key.status but not reload
        // or switch keys.
        let (ok, out) = canopy_as_other_user(
            &site,
            &["ping", "--rank", "1", "--count", "1", "--uri", &uri0],
        );
        assert!(ok, "the other user cannot use the instance at all: {out}");
        let (ok, out) = canopy_as_other_user(&site, &["key", "reload", "--uri", &uri0]);
        assert!(!ok && out.contains("admin"), "{out}");
        let before = site.public_z85("pub/node1.key");
        let (ok, out) = canopy_as_other_user(
            &site,
            &[
                "key",
                "switch",
                "node1",
                "--config",
                &site.cfg(),
                "--uri",
                &uri0,
            ],
        );
        assert!(!ok && out.contains("admin"), "{out}");
        let (ok, out) =
            site.canopy(&["overlay", "status", "--rank", "1", "--json", "--uri", &uri0]);
        assert!(ok && out.contains(&before), "{out}");

        // Traffic: from rank 0 down to every rank (through node1 to rank
        // 3), from rank 3 up through node1, and events published at rank 2
        // to a subscriber on rank 3, below node1.
        let stop = Arc::new(AtomicBool::new(false));
        let mut sub = site.client(3);
        sub.subscribe("rot.*", RPC_TIMEOUT).unwrap();
        let t_down = {
            let (u, s) = (uri0.clone(), stop.clone());
            std::thread::spawn(move || traffic(u, vec![0, 1, 2, 3], s))
        };
        let t_up = {
            let (u, s) = (site.uri(3), stop.clone());
            std::thread::spawn(move || traffic(u, vec![0, 1, 2], s))
        };
        let t_pub = {
            let (u, s) = (site.uri(2), stop.clone());
            std::thread::spawn(move || {
                let mut c = Client::connect(Some(&u)).unwrap();
                let mut sent = 0u64;
                let mut failed = Vec::new();
                while !s.load(Ordering::Relaxed) && failed.is_empty() {
                    match c.publish("rot.tick", sent.to_string().as_bytes(), RPC_TIMEOUT) {
                        Ok(_) => sent += 1,
                        Err(e) => failed.push(e.to_string()),
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                (sent, failed)
            })
        };
        std::thread::sleep(Duration::from_millis(300));

        // node1 (a parent link and a child), then the root (children
        // only), then a leaf (a parent link only): each rotated fully.
        let mut took = Vec::new();
        for (rank, children) in [(1u32, vec![3u32]), (0, vec![1, 2]), (3, vec![])] {
            let (new_pub, t) = switch(&site, rank, &children);
            took.push((rank, t));
            std::thread::sleep(Duration::from_millis(300));
            retire(&site, rank, &new_pub);
            std::thread::sleep(Duration::from_millis(300));
        }
        stop.store(true, Ordering::Relaxed);
        let down = t_down.join().unwrap();
        let up = t_up.join().unwrap();
        let (down_ok, down_failed, up_ok, up_failed) =
            (down.answered, down.failed, up.answered, up.failed);
        let (published, pub_failed) = t_pub.join().unwrap();

        // Every event arrives at rank 3, once, in order.
        let mut got = Vec::new();
        while (got.len() as u64) < published {
            match sub.next_event(Duration::from_secs(5)) {
                Ok(m) => got.push(String::from_utf8_lossy(&m.payload).parse::<u64>().unwrap()),
                Err(e) => panic!(
                    "after {} of {published} events: {e}\n{}",
                    got.len(),
                    site.logs()
                ),
            }
        }
        let expected: Vec<u64> = (0..published).collect();
        for i in 0..HOSTS as usize {
            for l in site
                .log(i)
                .lines()
                .filter(|l| l.contains("rotate: ") || l.contains("relink"))
            {
                println!("host{i}: {l}");
            }
        }
        let moved: Vec<(usize, Vec<u64>, Vec<u64>)> = (0..HOSTS as usize)
            .map(|i| {
                (
                    i,
                    ms_in(&site.log(i), UP_MOVED),
                    ms_in(&site.log(i), REBOUND),
                )
            })
            .collect();
        println!(
            "rotation of node1, node0, node3 under traffic: {down_ok} RPCs from rank 0 and {up_ok} from rank 3 answered, {} failed; {published} events, {} received in order; switch-to-moved {took:?}; slowest window of 16 RPCs: {:?} from rank 0, {:?} from rank 3; per host (parent link moved in ms, rebound after ms): {moved:?}",
            down_failed.len() + up_failed.len(),
            got.len(),
            down.slowest,
            up.slowest
        );
        assert!(
            down_failed.is_empty() && up_failed.is_empty() && pub_failed.is_empty(),
            "lost work: down {down_failed:?} up {up_failed:?} pub {pub_failed:?}\n{}",
            site.logs()
        );
        assert!(down_ok > 100 && up_ok > 100 && published > 50);
        assert_eq!(got, expected, "events lost, repeated or reordered");
        for i in 0..HOSTS as usize {
            assert!(
                !site.log(i).contains("lost the parent link")
                    && !site.log(i).contains("overlay: lost rank"),
                "host{i}: a link was dropped instead of moved:\n{}",
                site.logs()
            );
        }
        drop(sub);

        // A child restarted in the middle of a rotation (its parent switched,
        // the old key not yet retired) finds its parent with the next key.
        let old_secret = std::fs::read(site.path("sec/node1.key_secret")).unwrap();
        let old_pub = site.public_z85("pub/node1.key");
        let (new_pub, _) = switch(&site, 1, &[3]);
        site.stop(3);
        assert!(wait_until(Duration::from_secs(10), || site.rank_state(3) != "online"));
        site.start(3, "node3", "canopy.toml");
        assert!(
            wait_until(Duration::from_secs(10), || site
                .log(3)
                .contains("trying its other configured key")),
            "node3 did not try node1's next key:\n{}",
            site.log(3)
        );
        site.wait_full();
        ping_all(&site);
        retire(&site, 1, &new_pub);

        // The retired key is no longer admitted: an impostor holding it on
        // node1's host is refused by rank 0; node1 restarts with its new
        // key and rejoins.
        site.stop(1);
        assert!(wait_until(Duration::from_secs(10), || site.rank_state(1) != "online"));
        std::fs::write(site.path("imp/node1.key_secret"), &old_secret).unwrap();
        chmod(&site.path("imp/node1.key_secret"), 0o600);
        site.start(1, "node1", "impostor.toml");
        let old_principal = format!("curve:{old_pub}");
        assert!(
            wait_until(Duration::from_secs(10), || site
                .log(0)
                .lines()
                .any(|l| l.contains("verdict=deny") && l.contains(&old_principal))),
            "rank 0 did not refuse the retired key:\n{}",
            site.logs()
        );
        site.stop(1);
        site.start(1, "node1", "canopy.toml");
        site.wait_full();
        ping_all(&site);
        site.procs.clear();
        site.net.destroy().unwrap();
    });
}
