//! Multi-host tests on one machine: every "host" is a Linux network
//! namespace with one veth interface plugged into a bridge in the root
//! namespace, all on one /24 of the benchmarking range 198.18.0.0/15.
//!
//! ```text
//!   root namespace:  bridge <prefix>-br  198.18.X.1/24   (the test process)
//!                      |-- <prefix>-0 ==veth== eth0 198.18.X.2  in namespace <prefix>-0
//!                      |-- <prefix>-1 ==veth== eth0 198.18.X.3  in namespace <prefix>-1
//!                      ...
//! ```
//!
//! * Names start with a per-[`Net`] prefix `cnp` + the pid (5 base-36
//!   digits) + a counter (2 base-36 digits), so nets of parallel tests and
//!   test binaries never share a name, and every interface name fits the
//!   kernel's 15 characters.
//! * The /24 is picked at random among those that no address in the root
//!   namespace uses (each live [`Net`] holds one there, on its bridge), and
//!   re-checked after it is claimed.
//! * [`Net::cut`] takes a host's veth down at the bridge (a pulled cable: the
//!   host keeps its address, nothing reaches it); [`Net::heal`] plugs it in
//!   again.
//! * Dropping a [`Net`] SIGKILLs every process in its namespaces (`ip netns
//!   pids`), then deletes the veths, namespaces and bridge. It never panics
//!   and may run more than once. [`run_test`] (this module's) also tears
//!   down the nets of a test body that overran its limit, whose drops never
//!   run; and [`Net::new`] removes what a killed test process left behind
//!   (names whose pid is dead).
//!
//! Needs root and `ip` (iproute2): see [`Net::available`] and [`can_run`].
//! If the root namespace filters bridged traffic (`br_netfilter` with an
//! iptables FORWARD policy of DROP, as Docker sets up), hosts cannot reach
//! each other; the tests then fail on their first connection.
#![forbid(unsafe_code)]

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::cell::Cell;
use std::io::Read;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The only addresses a [`Net`] uses: 198.18.0.0/15 (RFC 2544, benchmarking).
pub const RANGE: (Ipv4Addr, u8) = (Ipv4Addr::new(198, 18, 0, 0), 15);
/// Number of /24s in [`RANGE`].
const SUBNETS: u32 = 512;
/// Most hosts in one [`Net`] (addresses .2 to .201 of its /24).
pub const MAX_HOSTS: usize = 200;
/// Every name starts with this.
const NAME_TAG: &str = "cnp";
/// Limit for one `ip` command.
const IP_TIMEOUT: Duration = Duration::from_secs(20);

static COUNTER: AtomicU64 = AtomicU64::new(0);
static NEXT_SCOPE: AtomicU64 = AtomicU64::new(1);
/// Serialises choosing and claiming a /24 within this process.
static SUBNET_LOCK: Mutex<()> = Mutex::new(());
/// Live nets, by the [`run_test`] scope that created them (0: none).
static LIVE: Mutex<Vec<(u64, Arc<Inner>)>> = Mutex::new(Vec::new());

thread_local! {
    static SCOPE: Cell<u64> = const { Cell::new(0) };
}

fn live() -> std::sync::MutexGuard<'static, Vec<(u64, Arc<Inner>)>> {
    LIVE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One host: a network namespace with `eth0` on the bridge.
#[derive(Debug, Clone)]
pub struct Host {
    index: usize,
    name: String,
    veth: String,
    ip: Ipv4Addr,
}

impl Host {
    /// The namespace's name (for `ip netns exec` / `ip -n`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The host's address (on its `eth0`).
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// Its position in the [`Net`].
    pub fn index(&self) -> usize {
        self.index
    }

    /// The root-namespace end of its veth pair (a bridge port).
    pub fn veth(&self) -> &str {
        &self.veth
    }

    /// `ip netns exec NAME PROGRAM`: add arguments, environment and stdio
    /// as usual. `ip` execs the program, so the child's pid is the
    /// program's. Everything it starts is SIGKILLed when the [`Net`] goes.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }
}

struct Inner {
    prefix: String,
    bridge: String,
    /// Network address of the /24.
    subnet: Ipv4Addr,
    hosts: Vec<Host>,
    /// Torn down already.
    done: Mutex<bool>,
}

/// A bridge and `n` hosts; torn down when dropped.
pub struct Net {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("prefix", &self.inner.prefix)
            .field("subnet", &self.inner.subnet)
            .field("hosts", &self.inner.hosts)
            .finish()
    }
}

enum CreateError {
    /// Another interface uses the /24 we claimed: try another.
    Conflict,
    Other(String),
}

impl From<String> for CreateError {
    fn from(e: String) -> Self {
        CreateError::Other(e)
    }
}

impl Net {
    /// Whether nets can be made here: root, `ip` (iproute2) present and
    /// network namespaces supported. `Err` says why not.
    pub fn available() -> Result<(), String> {
        let euid = nix::unistd::geteuid();
        if !euid.is_root() {
            return Err(format!(
                "network namespaces need root (running as uid {euid})"
            ));
        }
        match run_cmd(Command::new("ip").arg("-V"), IP_TIMEOUT) {
            Ok(o) if o.status.success() => {}
            Ok(o) => return Err(format!("`ip -V` failed: {}", stderr_of(&o))),
            Err(e) => return Err(format!("cannot run `ip` (Debian package iproute2): {e}")),
        }
        if !Path::new("/proc/self/ns/net").exists() {
            return Err("this kernel has no network namespaces".into());
        }
        Ok(())
    }

    /// A bridge in the root namespace and `n_hosts` namespaces on it, with
    /// addresses .2, .3, ... of a free /24 of 198.18.0.0/15 (the bridge
    /// has .1) and loopback up in each.
    pub fn new(n_hosts: usize) -> Result<Net, String> {
        if n_hosts == 0 || n_hosts > MAX_HOSTS {
            return Err(format!("a Net has 1 to {MAX_HOSTS} hosts, not {n_hosts}"));
        }
        Net::available()?;
        sweep_stale();
        let mut tried = Vec::new();
        for _ in 0..16 {
            let net = {
                let _claim = SUBNET_LOCK.lock().unwrap_or_else(PoisonError::into_inner);
                let used = used_subnets()?;
                let Some(k) = pick_subnet(&used, &tried) else {
                    return Err(format!(
                        "no free /24 in 198.18.0.0/15 (in use: {} of {SUBNETS})",
                        used.len()
                    ));
                };
                tried.push(k);
                let net = Net::plan(k, n_hosts);
                match net.create_bridge() {
                    Ok(()) => net,
                    Err(CreateError::Conflict) => continue, // `net` drops: torn down
                    Err(CreateError::Other(e)) => return Err(e),
                }
            };
            net.create_hosts()?;
            return Ok(net);
        }
        Err(format!(
            "could not claim a free /24 in 198.18.0.0/15 (tried {} of them)",
            tried.len()
        ))
    }

    /// Names and addresses for subnet index `k`, registered for teardown
    /// before anything exists.
    fn plan(k: u32, n: usize) -> Net {
        let c = COUNTER.fetch_add(1, Ordering::Relaxed) % (36 * 36);
        let prefix = format!(
            "{NAME_TAG}{}{}",
            base36(std::process::id() as u64, 5),
            base36(c, 2)
        );
        let subnet = subnet_addr(k);
        let hosts = (0..n)
            .map(|i| Host {
                index: i,
                name: format!("{prefix}-{i}"),
                veth: format!("{prefix}-{i}"),
                ip: host_addr(subnet, i),
            })
            .collect();
        let inner = Arc::new(Inner {
            bridge: format!("{prefix}-br"),
            prefix,
            subnet,
            hosts,
            done: Mutex::new(false),
        });
        let scope = SCOPE.with(Cell::get);
        live().push((scope, inner.clone()));
        Net { inner }
    }

    fn create_bridge(&self) -> Result<(), CreateError> {
        let br = &self.inner.bridge;
        ip(&["link", "add", br, "type", "bridge"])?;
        let addr = format!("{}/24", self.bridge_ip());
        ip(&["addr", "add", &addr, "dev", br])?;
        // Someone else (another process) claimed the same /24 meanwhile?
        let mine = subnet_index(self.inner.subnet).unwrap_or(u32::MAX);
        for (dev, k) in root_subnets()? {
            if &dev != br && k.contains(&mine) {
                return Err(CreateError::Conflict);
            }
        }
        ip(&["link", "set", br, "up"])?;
        Ok(())
    }

    fn create_hosts(&self) -> Result<(), String> {
        let br = &self.inner.bridge;
        for h in &self.inner.hosts {
            ip(&["netns", "add", &h.name])?;
            ip(&[
                "link", "add", &h.veth, "type", "veth", "peer", "name", "eth0", "netns", &h.name,
            ])?;
            ip(&["link", "set", &h.veth, "master", br, "up"])?;
            let addr = format!("{}/24", h.ip);
            ip(&["-n", &h.name, "addr", "add", &addr, "dev", "eth0"])?;
            ip(&["-n", &h.name, "link", "set", "eth0", "up"])?;
            ip(&["-n", &h.name, "link", "set", "lo", "up"])?;
        }
        Ok(())
    }

    /// Host `i` (panics if there is no such host).
    pub fn host(&self, i: usize) -> &Host {
        self.inner.hosts.get(i).unwrap_or_else(|| {
            panic!(
                "host {i} does not exist: this net has {} hosts",
                self.inner.hosts.len()
            )
        })
    }

    pub fn hosts(&self) -> &[Host] {
        &self.inner.hosts
    }

    pub fn len(&self) -> usize {
        self.inner.hosts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inner.hosts.is_empty()
    }

    /// The prefix of every name this net uses (namespaces, veths, bridge).
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// The bridge's name (in the root namespace).
    pub fn bridge(&self) -> &str {
        &self.inner.bridge
    }

    /// The bridge's address: the test process reaches every host from it.
    pub fn bridge_ip(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.inner.subnet) + 1)
    }

    /// The net's /24 (network address, prefix length 24).
    pub fn subnet(&self) -> (Ipv4Addr, u8) {
        (self.inner.subnet, 24)
    }

    /// Partition host `i`: its veth goes down at the bridge, so nothing
    /// reaches it and it reaches nothing (its own interface stays
    /// configured, as when a cable is pulled).
    pub fn cut(&self, i: usize) -> Result<(), String> {
        ip(&["link", "set", self.host(i).veth(), "down"])
    }

    /// Undo [`Net::cut`].
    pub fn heal(&self, i: usize) -> Result<(), String> {
        ip(&["link", "set", self.host(i).veth(), "up"])
    }

    /// Tear down now (as drop does) and report what is left, if anything.
    /// Calling it again, or dropping afterwards, does nothing more.
    pub fn destroy(&self) -> Result<(), String> {
        self.inner.teardown();
        let left = leftovers(&self.inner.prefix);
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "left behind after teardown of {}: {}",
                self.inner.prefix,
                left.join(", ")
            ))
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.inner.teardown();
        live().retain(|(_, n)| !Arc::ptr_eq(n, &self.inner));
    }
}

impl Inner {
    /// Kill every process in the namespaces, delete veths, namespaces and
    /// bridge. Errors are ignored (whatever did not exist is fine); never
    /// panics; does nothing the second time.
    fn teardown(&self) {
        let mut done = self.done.lock().unwrap_or_else(PoisonError::into_inner);
        if *done {
            return;
        }
        *done = true;
        let names: Vec<&str> = self.hosts.iter().map(|h| h.name.as_str()).collect();
        kill_ns_processes(&names);
        for h in &self.hosts {
            // Deleting our end deletes the pair at once; deleting only the
            // namespace would leave the veth to an asynchronous cleanup.
            let _ = ip(&["link", "del", &h.veth]);
            let _ = ip(&["netns", "del", &h.name]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
        // Anything else with our prefix (a half-made host).
        remove_by_prefix(&self.prefix);
    }
}

/// Like [`crate::run_test`], and if the body overruns its limit, the
/// [`Net`]s it made (whose drops never run, the body being stuck) are torn
/// down too before the test fails.
pub fn run_test<F: FnOnce() + Send + 'static>(limit: Duration, body: F) {
    let scope = NEXT_SCOPE.fetch_add(1, Ordering::Relaxed);
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        crate::run_test(limit, move || {
            SCOPE.with(|s| s.set(scope));
            body();
        })
    }));
    let stuck: Vec<Arc<Inner>> = {
        let mut l = live();
        let (mine, rest) = std::mem::take(&mut *l)
            .into_iter()
            .partition(|(s, _)| *s == scope);
        *l = rest;
        mine.into_iter().map(|(_, n)| n).collect()
    };
    for n in &stuck {
        n.teardown();
    }
    if let Err(panic) = res {
        std::panic::resume_unwind(panic);
    }
}

/// For a test: `true` if it can run. When not root it prints
/// `skipped: <test>: <reason>` and returns `false`; as root, anything else
/// missing (no `ip`) is a failure, not a skip.
pub fn can_run(test: &str) -> bool {
    match Net::available() {
        Ok(()) => true,
        Err(why) if !nix::unistd::geteuid().is_root() => {
            println!("skipped: {test}: {why}");
            false
        }
        Err(why) => panic!("{test}: network namespaces are unusable as root: {why}"),
    }
}

/// Namespaces and root-namespace interfaces whose names start with
/// `prefix`.
pub fn leftovers(prefix: &str) -> Vec<String> {
    let mut left: Vec<String> = netns_names()
        .into_iter()
        .filter(|n| n.starts_with(prefix))
        .map(|n| format!("namespace {n}"))
        .collect();
    left.extend(
        link_names()
            .into_iter()
            .filter(|n| n.starts_with(prefix))
            .map(|n| format!("interface {n}")),
    );
    left
}

// ----- helpers -----

/// Run a command with a limit, capturing its output; never panics. On
/// overrun the command is SIGKILLed and this is an error.
fn run_cmd(cmd: &mut Command, timeout: Duration) -> Result<Output, String> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    let drain = |r: Option<Box<dyn Read + Send>>| {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            let _ = tx.send(buf);
        });
        rx
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
            _ => break None,
        }
    };
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(format!(
            "{cmd:?} did not finish within {timeout:?}; killed it"
        ));
    };
    let grace = Duration::from_secs(5);
    Ok(Output {
        status,
        stdout: out.recv_timeout(grace).unwrap_or_default(),
        stderr: err.recv_timeout(grace).unwrap_or_default(),
    })
}

fn stderr_of(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).trim().to_string()
}

/// `ip ARGS`; its stdout, or an error with its stderr.
fn ip_out(args: &[&str]) -> Result<String, String> {
    let o = run_cmd(Command::new("ip").args(args), IP_TIMEOUT)?;
    if o.status.success() {
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    } else {
        Err(format!("`ip {}` failed: {}", args.join(" "), stderr_of(&o)))
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    ip_out(args).map(|_| ())
}

fn netns_names() -> Vec<String> {
    ip_out(&["netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// Interface names in the root namespace (`eth0@if5` gives `eth0`).
fn link_names() -> Vec<String> {
    ip_out(&["-o", "link", "show"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(|n| {
            let n = n.trim_end_matches(':');
            n.split_once('@').map_or(n, |(a, _)| a).to_string()
        })
        .collect()
}

/// SIGKILL every process in the namespaces until none is left (or 5 s).
fn kill_ns_processes(names: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut any = false;
        for ns in names {
            let Ok(out) = ip_out(&["netns", "pids", ns]) else {
                continue; // no such namespace (any more)
            };
            for pid in out.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
                any = true;
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        if !any || Instant::now() >= deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Delete every namespace and root-namespace interface starting with
/// `prefix`, after killing the namespaces' processes.
fn remove_by_prefix(prefix: &str) {
    let ns: Vec<String> = netns_names()
        .into_iter()
        .filter(|n| n.starts_with(prefix))
        .collect();
    let refs: Vec<&str> = ns.iter().map(String::as_str).collect();
    kill_ns_processes(&refs);
    for l in link_names().into_iter().filter(|n| n.starts_with(prefix)) {
        let _ = ip(&["link", "del", &l]);
    }
    for n in &ns {
        let _ = ip(&["netns", "del", n]);
    }
}

/// Remove what earlier test processes, now dead, left behind (they were
/// killed before their nets dropped).
fn sweep_stale() {
    let me = std::process::id() as u64;
    let mut dead: Vec<String> = Vec::new();
    for name in netns_names().into_iter().chain(link_names()) {
        if !name.is_ascii() {
            continue;
        }
        let Some(prefix) = name.get(..NAME_TAG.len() + 7) else {
            continue;
        };
        if !name.starts_with(NAME_TAG) || name.as_bytes().get(prefix.len()) != Some(&b'-') {
            continue;
        }
        let Some(pid) = from_base36(&prefix[NAME_TAG.len()..NAME_TAG.len() + 5]) else {
            continue;
        };
        if from_base36(&prefix[NAME_TAG.len() + 5..]).is_none() {
            continue;
        }
        if pid != me
            && !Path::new(&format!("/proc/{pid}")).exists()
            && !dead.iter().any(|d| d == prefix)
        {
            dead.push(prefix.to_string());
        }
    }
    for prefix in dead {
        remove_by_prefix(&prefix);
    }
}

fn base36(mut v: u64, width: usize) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = vec![b'0'; width];
    for slot in out.iter_mut().rev() {
        *slot = DIGITS[(v % 36) as usize];
        v /= 36;
    }
    String::from_utf8(out).unwrap_or_default()
}

fn from_base36(s: &str) -> Option<u64> {
    if s.is_empty()
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
    {
        return None;
    }
    u64::from_str_radix(s, 36).ok()
}

/// Network address of the k-th /24 of [`RANGE`].
fn subnet_addr(k: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(RANGE.0) + (k % SUBNETS) * 256)
}

fn subnet_index(a: Ipv4Addr) -> Option<u32> {
    let off = u32::from(a).checked_sub(u32::from(RANGE.0))?;
    (off < SUBNETS * 256).then_some(off / 256)
}

fn host_addr(subnet: Ipv4Addr, i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(subnet) + 2 + i as u32)
}

fn mask(len: u32) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - len.min(32))
    }
}

/// The /24s of [`RANGE`] that `addr/len` overlaps.
fn overlapped(addr: Ipv4Addr, len: u32) -> std::ops::Range<u32> {
    let net = u32::from(addr) & mask(len);
    let first = net;
    let last = net | !mask(len);
    let lo = u32::from(RANGE.0);
    let hi = lo + SUBNETS * 256 - 1;
    if last < lo || first > hi {
        return 0..0;
    }
    let a = (first.max(lo) - lo) / 256;
    let b = (last.min(hi) - lo) / 256;
    a..b + 1
}

/// (interface, /24s of the range it has addresses in) for every IPv4
/// address in the root namespace.
fn root_subnets() -> Result<Vec<(String, std::ops::Range<u32>)>, String> {
    let out = ip_out(&["-o", "-4", "addr", "show"])?;
    let mut v = Vec::new();
    for line in out.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(dev), Some(cidr)) = (
            f.get(1),
            f.iter()
                .position(|w| *w == "inet")
                .and_then(|p| f.get(p + 1)),
        ) else {
            continue;
        };
        let Some((a, l)) = cidr.split_once('/') else {
            continue;
        };
        let (Ok(a), Ok(l)) = (a.parse::<Ipv4Addr>(), l.parse::<u32>()) else {
            continue;
        };
        let r = overlapped(a, l);
        if !r.is_empty() {
            v.push((dev.to_string(), r));
        }
    }
    Ok(v)
}

fn used_subnets() -> Result<Vec<u32>, String> {
    let mut used: Vec<u32> = root_subnets()?.into_iter().flat_map(|(_, r)| r).collect();
    used.sort_unstable();
    used.dedup();
    Ok(used)
}

/// A random free /24, not one of `tried`.
fn pick_subnet(used: &[u32], tried: &[u32]) -> Option<u32> {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut x = nanos ^ ((std::process::id() as u64) << 32) ^ COUNTER.load(Ordering::Relaxed);
    // splitmix64
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    let start = (x % SUBNETS as u64) as u32;
    (0..SUBNETS)
        .map(|d| (start + d) % SUBNETS)
        .find(|k| !used.contains(k) && !tried.contains(k))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_and_parse() {
        let p = format!("{NAME_TAG}{}{}", base36(4_194_304, 5), base36(1295, 2));
        assert_eq!(p.len(), 10);
        assert!(format!("{p}-{}", MAX_HOSTS - 1).len() <= 15);
        assert_eq!(from_base36(&p[3..8]), Some(4_194_304));
        assert_eq!(from_base36(&p[8..10]), Some(1295));
    }

    #[test]
    fn addresses_stay_in_range() {
        for k in [0, 1, 255, 256, 511] {
            let s = subnet_addr(k);
            let last = host_addr(s, MAX_HOSTS - 1);
            for a in [s, last] {
                assert_eq!(u32::from(a) & mask(15), u32::from(RANGE.0), "{a}");
            }
            assert_eq!(subnet_index(s), Some(k));
            assert_eq!(u32::from(last) & 0xff, 201);
        }
        assert_eq!(subnet_addr(256), Ipv4Addr::new(198, 19, 0, 0));
        assert_eq!(overlapped(Ipv4Addr::new(198, 18, 7, 9), 24), 7..8);
        assert_eq!(overlapped(Ipv4Addr::new(198, 19, 0, 1), 16), 256..512);
        assert_eq!(overlapped(Ipv4Addr::new(10, 0, 0, 1), 8), 0..0);
        assert_eq!(overlapped(Ipv4Addr::new(192, 0, 0, 1), 2), 0..512);
        assert_eq!(pick_subnet(&(1..512).collect::<Vec<_>>(), &[]), Some(0));
        assert_eq!(pick_subnet(&(1..512).collect::<Vec<_>>(), &[0]), None);
    }
}
