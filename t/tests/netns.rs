//! The network-namespace harness (`canopy_t::netns`): hosts reach each
//! other over TCP and canopy's own CURVE client port, a cut host is
//! partitioned and heals, and nothing outlives a net: not its processes,
//! namespaces, interfaces or addresses, also when the test panics or hangs.
#![forbid(unsafe_code)]

use canopy_client::Client;
use canopy_t::netns::{self, Host, Net};
use canopy_t::{canopy_bin, process_alive, run_command, text, wait_until, RPC_TIMEOUT};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(90);
/// Every host's broker listens for remote clients on this port (each
/// namespace has its own ports).
const PORT: u16 = 7700;

/// A process we started; SIGKILLed (its group) and reaped on drop.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(mut cmd: Command, log: PathBuf) -> Proc {
        let f = std::fs::File::create(&log).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
        Proc { child, log }
    }

    fn log(&self) -> String {
        std::fs::read(&self.log)
            .map(|b| text(&b))
            .unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = killpg(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Namespaces, root-namespace interfaces and root-namespace addresses
/// (in `subnet`) that a net with `prefix` left, found with `ip` directly.
fn remains(prefix: &str, subnet: Ipv4Addr) -> Vec<String> {
    let ip = |args: &[&str]| {
        let o = run_command(Command::new("ip").args(args), Duration::from_secs(10));
        assert!(o.status.success(), "ip {args:?}: {}", text(&o.stderr));
        text(&o.stdout)
    };
    let mut left: Vec<String> = ip(&["netns", "list"])
        .lines()
        .filter(|l| l.starts_with(prefix))
        .map(|l| format!("namespace: {l}"))
        .collect();
    left.extend(
        ip(&["-o", "link", "show"])
            .lines()
            .filter(|l| l.contains(&format!(" {prefix}")))
            .map(|l| format!("link: {l}")),
    );
    let net24 = subnet.octets()[..3]
        .iter()
        .map(u8::to_string)
        .collect::<Vec<_>>()
        .join(".")
        + ".";
    left.extend(
        ip(&["-o", "-4", "addr", "show"])
            .lines()
            .filter(|l| l.contains(&format!("inet {net24}")))
            .map(|l| format!("address: {l}")),
    );
    left
}

fn in_range(a: Ipv4Addr) -> bool {
    let o = a.octets();
    o[0] == 198 && (o[1] == 18 || o[1] == 19)
}

/// Whether `from` completes a TCP handshake with `to:PORT` within `secs`
/// (bash's /dev/tcp inside the namespace, killed after `secs`).
fn tcp_reach(from: &Host, to: Ipv4Addr, secs: u32) -> bool {
    let mut cmd = from.command("timeout");
    cmd.args(["-s", "KILL", &secs.to_string(), "bash", "-c"])
        .arg("exec 3<>/dev/tcp/$0/$1")
        .arg(to.to_string())
        .arg(PORT.to_string());
    run_command(&mut cmd, Duration::from_secs(secs as u64 + 20))
        .status
        .success()
}

/// `canopy ping --count 1` from `from` to the broker on `to`, over CURVE.
fn canopy_ping(from: &Host, to: Ipv4Addr, server_key: &str, key: &Path, secs: u32) -> Output {
    let mut cmd = from.command(canopy_bin());
    cmd.args(["ping", "--count", "1", "--timeout", &secs.to_string()])
        .env("CANOPY_URI", format!("tcp://{to}:{PORT}"))
        .env("CANOPY_KEY", key)
        .env("CANOPY_SERVER_KEY", server_key)
        .env_remove("CANOPY_BROKER")
        .env("RUST_LOG", "warn");
    run_command(&mut cmd, Duration::from_secs(secs as u64 + 30))
}

/// A singleton broker on `host` accepting remote clients on `PORT`.
fn start_broker(host: &Host, dir: &Path, policy: &Path) -> Proc {
    let rundir = dir.join(format!("host{}", host.index()));
    let mut cmd = host.command(canopy_bin());
    cmd.arg("broker")
        .arg("--rundir")
        .arg(&rundir)
        .arg("--listen-clients")
        .arg(format!("tcp://{}:{PORT}", host.ip()))
        .arg("--policy")
        .arg(policy)
        .env_remove("CANOPY_URI")
        .env_remove("CANOPY_BROKER")
        .env("RUST_LOG", "warn");
    Proc::spawn(cmd, dir.join(format!("host{}.log", host.index())))
}

/// The broker's public key, once it answers `overlay.status` on its local
/// socket (reachable from the root namespace: it is a file).
fn broker_key(host: &Host, dir: &Path, proc: &Proc) -> String {
    let uri = format!(
        "local://{}",
        dir.join(format!("host{}/local-0", host.index())).display()
    );
    let mut status = None;
    wait_until(Duration::from_secs(20), || {
        status = Client::connect(Some(&uri))
            .ok()
            .and_then(|mut c| c.rpc("overlay.status", 0, b"", RPC_TIMEOUT).ok());
        status.is_some()
    });
    let m = status.unwrap_or_else(|| {
        panic!(
            "the broker on host {} never answered on {uri}; log:\n{}",
            host.index(),
            proc.log()
        )
    });
    let s: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
    assert_eq!(
        s["broker"]["client_endpoint"],
        format!("tcp://{}:{PORT}", host.ip()),
        "{s}"
    );
    s["broker"]["public_key"].as_str().unwrap().to_string()
}

/// Every ordered pair of distinct hosts.
fn pairs(n: usize) -> Vec<(usize, usize)> {
    (0..n)
        .flat_map(|a| (0..n).filter(move |&b| b != a).map(move |b| (a, b)))
        .collect()
}

#[test]
fn three_hosts_reach_each_other_and_a_cut_host_is_partitioned_until_healed() {
    if !netns::can_run("netns") {
        return;
    }
    // The temp dir outlives the body, so it goes even if the body hangs.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    netns::run_test(LIMIT, move || {
        let net = Net::new(3).unwrap();
        let prefix = net.prefix().to_string();
        let (subnet, len) = net.subnet();
        assert_eq!(len, 24);
        assert!(in_range(subnet) && in_range(net.bridge_ip()), "{net:?}");
        assert!(net.bridge().len() <= 15 && net.bridge().starts_with(&prefix));
        let ns = run_command(
            Command::new("ip").args(["netns", "list"]),
            Duration::from_secs(10),
        );
        let ns = text(&ns.stdout);
        for (i, h) in net.hosts().iter().enumerate() {
            assert_eq!(h.index(), i);
            assert!(in_range(h.ip()), "host {i} has {}", h.ip());
            assert_eq!(h.ip().octets()[..3], subnet.octets()[..3]);
            assert!(h.name().starts_with(&prefix) && h.veth().len() <= 15);
            assert!(
                ns.lines()
                    .any(|l| l.split_whitespace().next() == Some(h.name())),
                "namespace {} missing from `ip netns list`:\n{ns}",
                h.name()
            );
            // Loopback is up, and eth0 has the host's address.
            let o = run_command(
                h.command("ip").args(["-o", "addr", "show"]),
                Duration::from_secs(10),
            );
            let addrs = text(&o.stdout);
            let has = |dev: &str, inet: &str| {
                addrs.lines().any(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    f.len() > 3 && f[1].split('@').next() == Some(dev) && f[3] == inet
                })
            };
            assert!(has("lo", "127.0.0.1/8"), "{addrs}");
            assert!(has("eth0", &format!("{}/24", h.ip())), "{addrs}");
            let o = run_command(
                h.command("ip").args(["-o", "link", "show", "lo"]),
                Duration::from_secs(10),
            );
            assert!(text(&o.stdout).contains(",UP,"), "{}", text(&o.stdout));
        }
        let ips: Vec<Ipv4Addr> = net.hosts().iter().map(Host::ip).collect();
        assert!(ips[0] != ips[1] && ips[1] != ips[2] && ips[0] != ips[2]);

        // A client key, allowed from this net's /24 only.
        let kp = canopy_security::CurveKeypair::generate().unwrap();
        let key = dir.as_path().join("client");
        canopy_security::cert::write_pair(&kp, "client", &key, &dir.as_path().join("client.pub"))
            .unwrap();
        let policy = dir.as_path().join("policy.toml");
        std::fs::write(
            &policy,
            format!(
                "[[rule]]\nname = \"netns-client\"\nprincipal = \"{}\"\nnetwork = [\"{subnet}/24\"]\nroles = [\"user\"]\n",
                canopy_security::curve_principal(kp.public())
            ),
        )
        .unwrap();
        std::fs::set_permissions(&policy, std::fs::Permissions::from_mode(0o644)).unwrap();

        let brokers: Vec<Proc> = net
            .hosts()
            .iter()
            .map(|h| start_broker(h, dir.as_path(), &policy))
            .collect();
        let keys: Vec<String> = net
            .hosts()
            .iter()
            .zip(&brokers)
            .map(|(h, p)| broker_key(h, dir.as_path(), p))
            .collect();

        // Every host reaches every other: TCP, then a CURVE ping.
        for (a, b) in pairs(3) {
            assert!(
                tcp_reach(net.host(a), ips[b], 5),
                "host {a} cannot connect to host {b} ({}:{PORT}); log of {b}:\n{}",
                ips[b],
                brokers[b].log()
            );
            let o = canopy_ping(net.host(a), ips[b], &keys[b], &key, 10);
            assert!(
                o.status.success(),
                "canopy ping from host {a} to host {b} failed: {}{}\nbroker log:\n{}",
                text(&o.stdout),
                text(&o.stderr),
                brokers[b].log()
            );
        }
        // The test process reaches them through the bridge.
        for ip in &ips {
            TcpStream::connect_timeout(&SocketAddr::from((*ip, PORT)), Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("root namespace cannot reach {ip}:{PORT}: {e}"));
        }

        // Cut host 1: it and the others cannot reach each other; 0 and 2
        // still can.
        net.cut(1).unwrap();
        let results: Vec<((usize, usize), bool)> = std::thread::scope(|s| {
            let handles: Vec<_> = pairs(3)
                .into_iter()
                .map(|(a, b)| {
                    let (net, ips) = (&net, &ips);
                    s.spawn(move || ((a, b), tcp_reach(net.host(a), ips[b], 2)))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for ((a, b), ok) in results {
            let expect = a != 1 && b != 1;
            assert_eq!(
                ok, expect,
                "with host 1 cut, host {a} -> host {b} connected: {ok}"
            );
        }
        assert!(
            TcpStream::connect_timeout(&SocketAddr::from((ips[1], PORT)), Duration::from_secs(2))
                .is_err(),
            "root namespace reached the cut host"
        );
        let o = canopy_ping(net.host(0), ips[1], &keys[1], &key, 1);
        assert!(
            !o.status.success(),
            "canopy ping reached the cut host: {}",
            text(&o.stdout)
        );

        // Heal: everything connects again, the same brokers still running.
        net.heal(1).unwrap();
        assert!(
            wait_until(Duration::from_secs(15), || tcp_reach(
                net.host(0),
                ips[1],
                2
            )),
            "host 0 cannot reach host 1 after heal"
        );
        for (a, b) in pairs(3) {
            assert!(
                tcp_reach(net.host(a), ips[b], 5),
                "after heal: host {a} -> host {b}"
            );
        }
        for (a, b) in [(0, 1), (1, 2)] {
            let o = canopy_ping(net.host(a), ips[b], &keys[b], &key, 10);
            assert!(
                o.status.success(),
                "after heal, canopy ping host {a} -> host {b}: {}",
                text(&o.stderr)
            );
        }

        let pids: Vec<i32> = brokers.iter().map(|p| p.child.id() as i32).collect();
        net.destroy().unwrap();
        // Teardown killed the brokers inside the namespaces.
        assert!(
            wait_until(Duration::from_secs(5), || pids
                .iter()
                .all(|&p| !process_alive(p))),
            "brokers survived the net's teardown"
        );
        drop(brokers);
        drop(net);
        let left = remains(&prefix, subnet);
        assert!(left.is_empty(), "left behind: {left:#?}");
    });
}

#[test]
fn drop_kills_every_process_and_removes_namespaces_interfaces_and_addresses() {
    if !netns::can_run("netns") {
        return;
    }
    netns::run_test(LIMIT, || {
        let a = Net::new(2).unwrap();
        let b = Net::new(1).unwrap();
        // Concurrent nets never share a name or a subnet.
        assert_ne!(a.prefix(), b.prefix());
        assert_ne!(a.subnet(), b.subnet());
        let mut direct = a
            .host(0)
            .command("sleep")
            .arg("600")
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        // A grandchild in a session of its own, whose parent exits. It
        // prints its pid from inside the new session, so the pid is read
        // only once it has left the command's process group (which
        // run_command kills at the end).
        let o = run_command(
            a.host(1).command("sh").args([
                "-c",
                "p=$(setsid sh -c 'echo $$; exec sleep 601 >/dev/null 2>&1 </dev/null' &); echo $p",
            ]),
            Duration::from_secs(10),
        );
        let orphan: i32 = text(&o.stdout).trim().parse().expect("a pid");
        assert!(process_alive(orphan));
        assert!(process_alive(direct.id() as i32));

        let (pa, sa) = (a.prefix().to_string(), a.subnet().0);
        let (pb, sb) = (b.prefix().to_string(), b.subnet().0);
        drop(a);
        let st = direct.wait().unwrap();
        assert_eq!(st.signal(), Some(9), "{st:?}");
        assert!(!process_alive(orphan), "the orphan survived");
        let left = remains(&pa, sa);
        assert!(left.is_empty(), "left behind: {left:#?}");
        // The other net is untouched.
        assert!(remains(&pb, sb).len() >= 3, "{:?}", remains(&pb, sb));

        // destroy() is idempotent and drop after it does nothing more.
        b.destroy().unwrap();
        b.destroy().unwrap();
        drop(b);
        let left = remains(&pb, sb);
        assert!(left.is_empty(), "left behind: {left:#?}");
    });
}

/// A child reaped on drop (after it was killed by a net's teardown; it is
/// killed here if it was not, within 5 s).
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let exited = wait_until(Duration::from_secs(5), || {
            matches!(self.0.try_wait(), Ok(Some(_)) | Err(_))
        });
        if !exited {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[test]
fn a_panicking_or_hung_test_leaves_nothing_behind() {
    if !netns::can_run("netns") {
        return;
    }
    // Panic: the net drops during unwinding.
    netns::run_test(LIMIT, || {
        let (tx, rx) = mpsc::channel();
        let res = std::thread::spawn(move || {
            // Declared first, dropped last: after the net killed it.
            let _child: Reaped;
            let net = Net::new(1).unwrap();
            _child = Reaped(net.host(0).command("sleep").arg("600").spawn().unwrap());
            tx.send((
                net.prefix().to_string(),
                net.subnet().0,
                _child.0.id() as i32,
            ))
            .unwrap();
            panic!("deliberate panic with a net alive");
        })
        .join();
        assert!(res.is_err());
        let (prefix, subnet, pid) = rx.recv().unwrap();
        assert!(!process_alive(pid), "process outlived the panic");
        let left = remains(&prefix, subnet);
        assert!(left.is_empty(), "after a panic, left behind: {left:#?}");
    });

    // Hang: the body never returns, so its net never drops; run_test
    // tears it down when the limit passes.
    let (tx, rx) = mpsc::channel();
    let res = std::panic::catch_unwind(|| {
        netns::run_test(Duration::from_secs(3), move || {
            let _child: Reaped;
            let net = Net::new(2).unwrap();
            _child = Reaped(net.host(1).command("sleep").arg("600").spawn().unwrap());
            tx.send((
                net.prefix().to_string(),
                net.subnet().0,
                _child.0.id() as i32,
            ))
            .unwrap();
            std::thread::sleep(Duration::from_secs(60));
            drop(net);
        })
    });
    let err = res.expect_err("the hung body must fail the test");
    let msg = err
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| err.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default();
    assert!(msg.contains("did not finish"), "{msg}");
    let (prefix, subnet, pid) = rx.recv().unwrap();
    assert!(
        wait_until(Duration::from_secs(2), || !process_alive(pid)),
        "process outlived the hung test"
    );
    let left = remains(&prefix, subnet);
    assert!(left.is_empty(), "after a hang, left behind: {left:#?}");
}
