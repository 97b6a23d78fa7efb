//! A throwaway MIT Kerberos realm for tests (and for a site's own tests).
//!
//! [`Realm::start`] is one call: a temp dir, a free port on 127.0.0.1, a
//! KDC database, principals with random keys and one keytab each, and a
//! `krb5kdc -n` whose pid this process owns. Nothing touches the test
//! process's own environment: [`Realm::env`] returns the variables to hand
//! to child processes (`KRB5_CONFIG`, `KRB5_KDC_PROFILE`, `KRB5CCNAME`,
//! `KRB5_KTNAME`, `KRB5_CLIENT_KTNAME`, `KRB5RCACHEDIR`). The KDC can be
//! stopped and started again on the same port; dropping the realm kills it
//! and removes the directory.
//!
//! When the MIT tools are not installed, [`missing_tools`] says which, so a
//! test can report itself skipped with the reason.

use crate::{run_command, text, track, untrack, Tracked};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The test realm's name.
pub const REALM: &str = "CANOPY.TEST";

const TOOLS: [&str; 3] = ["krb5kdc", "kdb5_util", "kadmin.local"];

/// Where the tools are looked for: `PATH`, then the sbin directories
/// (Debian installs the KDC tools in /usr/sbin, often not on a user's PATH).
fn search_dirs() -> Vec<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .collect()
}

fn find_tool(name: &str) -> Option<PathBuf> {
    find_in(&search_dirs(), name)
}

fn find_in(dirs: &[PathBuf], name: &str) -> Option<PathBuf> {
    dirs.iter().map(|d| d.join(name)).find(|p| p.is_file())
}

/// `None` if the MIT KDC tools are installed, else why the Kerberos tests
/// cannot run.
pub fn missing_tools() -> Option<String> {
    missing_in(&search_dirs())
}

fn missing_in(dirs: &[PathBuf]) -> Option<String> {
    let missing: Vec<&str> = TOOLS
        .into_iter()
        .filter(|t| find_in(dirs, t).is_none())
        .collect();
    (!missing.is_empty()).then(|| {
        format!(
            "{} not installed; install the Debian packages krb5-kdc, krb5-admin-server and krb5-user (scripts/deps.sh does)",
            missing.join(", ")
        )
    })
}

/// Options for [`Realm::start_with`].
#[derive(Clone, Debug, Default)]
pub struct RealmOpts {
    /// Longest ticket the KDC issues (`max_life`), e.g. `Some(20s)`.
    pub max_life: Option<Duration>,
    /// The address the KDC listens on, and clients find it at (default
    /// 127.0.0.1): e.g. a network-namespace bridge's, for brokers on the
    /// other side of it.
    pub listen: Option<std::net::Ipv4Addr>,
}

/// A running throwaway realm.
pub struct Realm {
    dir: tempfile::TempDir,
    port: u16,
    addr: std::net::Ipv4Addr,
    kdc: Option<Child>,
    track_id: u64,
    cc_seq: AtomicU64,
}

fn free_port() -> u16 {
    for _ in 0..100 {
        let t = TcpListener::bind("127.0.0.1:0").expect("cannot bind a tcp port");
        let port = t.local_addr().expect("local addr").port();
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no port free for both tcp and udp on 127.0.0.1");
}

/// File-name form of a principal: `canopy/node1@R` → `canopy_node1_R`.
pub fn file_name(principal: &str) -> String {
    principal
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

impl Realm {
    /// Start a realm with these principals (without `@REALM`; it is added).
    /// Panics with the tool's output if a step fails.
    pub fn start(principals: &[&str]) -> Realm {
        Realm::start_with(principals, RealmOpts::default())
    }

    pub fn start_with(principals: &[&str], opts: RealmOpts) -> Realm {
        if let Some(why) = missing_tools() {
            panic!("cannot start a test realm: {why}");
        }
        let dir = tempfile::Builder::new()
            .prefix("canopy-krb-")
            .tempdir()
            .expect("cannot create the realm's temp dir");
        let port = free_port();
        let addr = opts
            .listen
            .unwrap_or(std::net::Ipv4Addr::LOCALHOST)
            .to_string();
        let d = dir.path().display().to_string();
        let max_life = opts
            .max_life
            .map(|l| format!("  max_life = {}s\n", l.as_secs().max(1)))
            .unwrap_or_default();
        std::fs::write(
            dir.path().join("kdc.conf"),
            format!(
                "[kdcdefaults]\n kdc_listen = {addr}:{port}\n kdc_tcp_listen = {addr}:{port}\n\n\
                 [realms]\n {REALM} = {{\n  database_name = {d}/principal\n  key_stash_file = {d}/stash\n  \
                 acl_file = {d}/kadm5.acl\n  kdc_listen = {addr}:{port}\n  kdc_tcp_listen = {addr}:{port}\n{max_life}  \
                 supported_enctypes = aes256-cts-hmac-sha1-96:normal aes128-cts-hmac-sha1-96:normal\n }}\n\n\
                 [logging]\n kdc = FILE:{d}/kdc.log\n"
            ),
        )
        .expect("write kdc.conf");
        std::fs::write(
            dir.path().join("krb5.conf"),
            format!(
                "[libdefaults]\n default_realm = {REALM}\n dns_lookup_kdc = false\n dns_lookup_realm = false\n \
                 rdns = false\n dns_canonicalize_hostname = false\n udp_preference_limit = 1\n \
                 kdc_timeout = 1000\n max_retries = 1\n\n\
                 [realms]\n {REALM} = {{\n  kdc = {addr}:{port}\n }}\n"
            ),
        )
        .expect("write krb5.conf");
        std::fs::write(dir.path().join("kadm5.acl"), "").expect("write kadm5.acl");
        std::fs::create_dir(dir.path().join("rcache")).expect("create rcache dir");
        let track_id = track(Tracked {
            dir: Some(dir.path().to_path_buf()),
            ..Tracked::default()
        });
        let mut realm = Realm {
            dir,
            port,
            addr: opts.listen.unwrap_or(std::net::Ipv4Addr::LOCALHOST),
            kdc: None,
            track_id,
            cc_seq: AtomicU64::new(0),
        };
        realm.admin_tool(
            "kdb5_util",
            &["create", "-s", "-P", "canopy-test-master", "-r", REALM],
        );
        for p in principals {
            realm.add_principal(p);
        }
        realm.start_kdc();
        realm
    }

    fn base_env(&self) -> Vec<(String, String)> {
        let d = self.dir.path();
        vec![
            (
                "KRB5_CONFIG".into(),
                d.join("krb5.conf").display().to_string(),
            ),
            (
                "KRB5_KDC_PROFILE".into(),
                d.join("kdc.conf").display().to_string(),
            ),
            (
                "KRB5RCACHEDIR".into(),
                d.join("rcache").display().to_string(),
            ),
        ]
    }

    fn admin_tool(&self, tool: &str, args: &[&str]) -> String {
        let bin = find_tool(tool).unwrap_or_else(|| panic!("{tool} not found"));
        let mut cmd = Command::new(bin);
        cmd.args(args).envs(self.base_env());
        let out = run_command(&mut cmd, Duration::from_secs(30));
        assert!(
            out.status.success(),
            "{tool} {args:?} failed: {}\n{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    fn kadmin(&self, query: &str) {
        self.admin_tool("kadmin.local", &["-r", REALM, "-q", query]);
    }

    /// Add a principal with a random key and export it to its own keytab
    /// ([`Realm::keytab`]).
    pub fn add_principal(&self, name: &str) {
        let full = self.principal(name);
        self.kadmin(&format!("addprinc -randkey {full}"));
        let kt = self.keytab(name);
        self.kadmin(&format!("ktadd -k {} {full}", kt.display()));
    }

    /// Export `name`'s keys again (a new key version) into `file`, e.g. to
    /// build a keytab holding several principals.
    pub fn export_to(&self, name: &str, file: &Path) {
        self.kadmin(&format!(
            "ktadd -k {} {}",
            file.display(),
            self.principal(name)
        ));
    }

    /// `name@REALM`.
    pub fn principal(&self, name: &str) -> String {
        format!("{name}@{REALM}")
    }

    /// The keytab file holding `name`'s key.
    pub fn keytab(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{}.keytab", file_name(name)))
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Environment for a process that acts as `name`: its keytab serves as
    /// both client keytab (initiator) and acceptor keytab, with a fresh
    /// credential cache file.
    pub fn env(&self, name: &str) -> Vec<(String, String)> {
        let kt = format!("FILE:{}", self.keytab(name).display());
        self.env_with_keytab(&kt)
    }

    /// Like [`Realm::env`], with an explicit keytab (`FILE:/path`).
    pub fn env_with_keytab(&self, keytab: &str) -> Vec<(String, String)> {
        let n = self.cc_seq.fetch_add(1, Ordering::Relaxed);
        let mut env = self.base_env();
        env.push((
            "KRB5CCNAME".into(),
            format!("FILE:{}/cc-{n}", self.dir.path().display()),
        ));
        env.push(("KRB5_KTNAME".into(), keytab.to_string()));
        env.push(("KRB5_CLIENT_KTNAME".into(), keytab.to_string()));
        env
    }

    /// Start the KDC (again), on the same port; waits until it accepts TCP.
    pub fn start_kdc(&mut self) {
        if self.kdc.is_some() {
            return;
        }
        let bin = find_tool("krb5kdc").expect("krb5kdc not found");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("krb5kdc.stderr"))
            .expect("open kdc stderr log");
        let child = Command::new(bin)
            .args(["-n", "-r", REALM])
            .envs(self.base_env())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("cannot start krb5kdc");
        let marker = self.dir.path().display().to_string();
        let pid = child.id() as i32;
        if let Some((_, t)) = crate::registry()
            .iter_mut()
            .find(|(i, _)| *i == self.track_id)
        {
            t.pids = vec![pid];
            t.marker = "krb5kdc".into();
        }
        let _ = marker;
        self.kdc = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect((self.addr, self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "krb5kdc did not listen on {}:{} within 10 s; see {}",
                self.addr,
                self.port,
                self.dir.path().join("kdc.log").display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stop the KDC (SIGTERM, then SIGKILL); the realm's files stay.
    pub fn stop_kdc(&mut self) {
        if let Some(mut c) = self.kdc.take() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(3);
            loop {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                if Instant::now() >= deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// True while the KDC runs.
    pub fn kdc_running(&self) -> bool {
        self.kdc.is_some()
    }

    /// The KDC's log, for failure messages.
    pub fn kdc_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("kdc.log")).unwrap_or_default()
    }
}

impl Drop for Realm {
    fn drop(&mut self) {
        self.stop_kdc();
        untrack(self.track_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_tools_are_named_with_the_packages_to_install() {
        let empty = tempfile::tempdir().unwrap();
        let why = missing_in(&[empty.path().to_path_buf()]).expect("nothing is installed there");
        for t in TOOLS {
            assert!(why.contains(t), "{why}");
        }
        assert!(
            why.contains("krb5-kdc") && why.contains("scripts/deps.sh"),
            "{why}"
        );
        for t in TOOLS {
            std::fs::write(empty.path().join(t), "").unwrap();
        }
        assert_eq!(missing_in(&[empty.path().to_path_buf()]), None);
    }

    #[test]
    fn file_names_of_principals() {
        assert_eq!(file_name("canopy/node1@R.X"), "canopy_node1_R_X");
    }
}
