//! A site of hosts in network namespaces running a system instance as
//! the shipped unit does (issue 15), shared by the admin's-day and the
//! exec tests: each host has its own network, its own host name (a UTS
//! namespace) and its own `/etc/canopy` and `/run/canopy` (bind mounts in
//! a mount namespace of its own), so every command runs exactly as on a
//! real node, with the paths of the shipped unit and no `CANOPY_URI`.

use crate::netns::Net;
use crate::users::{other_user, OTHER_USER};
use crate::{canopy_bin, run_command, text, wait_until};
use nix::unistd::Pid;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

pub const HOSTS: usize = 4;
pub const PORT: u16 = 8060;
pub const CLIENTS_PORT: u16 = 7700;
pub const SERVICE_USER: &str = "canopy";
pub const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Runs a program "on" a host: its host name, its /etc/canopy and a
/// /run/canopy of its own, as a user, with a umask.
pub const ON_HOST: &str = r#"#!/bin/sh
# on-host HOSTNAME HOSTDIR USER UMASK PROGRAM ARGS...
set -e
h=$1; d=$2; u=$3; m=$4; shift 4
hostname "$h"
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir /run/canopy
mount --bind "$d/run" /run/canopy
mount --bind "$d/etc" /etc/canopy
umask "$m"
if [ "$u" = root ]; then exec "$@"; fi
# NoNewPrivileges=yes unless the exec drop-in says no (CANOPY_T_NNP=0).
if [ "${CANOPY_T_NNP:-1}" = 0 ]; then
  exec setpriv --reuid="$u" --regid="$u" --init-groups -- "$@"
fi
exec setpriv --reuid="$u" --regid="$u" --init-groups --no-new-privs -- "$@"
"#;

/// What the shipped unit says about running the broker.
pub struct Unit {
    pub exec: Vec<String>,
    pub user: String,
    pub group: String,
    pub umask: String,
    pub env: Vec<(String, String)>,
    pub runtime_mode: u32,
}

pub fn shipped_unit() -> Unit {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../etc/canopy.service");
    let unit = std::fs::read_to_string(path).unwrap();
    let get = |k: &str| {
        unit.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("{path} has no {k}="))
            .to_string()
    };
    let env = unit
        .lines()
        .filter_map(|l| l.strip_prefix("Environment="))
        .flat_map(|l| l.split_whitespace())
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Unit {
        exec: get("ExecStart")
            .split_whitespace()
            .map(str::to_string)
            .collect(),
        user: get("User"),
        group: get("Group"),
        umask: get("UMask"),
        env,
        runtime_mode: u32::from_str_radix(&get("RuntimeDirectoryMode"), 8).unwrap(),
    }
}

pub fn service_user() -> (u32, u32) {
    let lookup = || nix::unistd::User::from_name(SERVICE_USER).ok().flatten();
    if lookup().is_none() {
        // As the unit's header (and the package's postinst) says.
        run_command(
            Command::new("useradd").args([
                "--system",
                "--no-create-home",
                "--home-dir",
                "/var/lib/canopy",
                "--shell",
                "/usr/sbin/nologin",
                SERVICE_USER,
            ]),
            Duration::from_secs(30),
        );
    }
    let u = lookup().expect("the canopy service user");
    (u.uid.as_raw(), u.gid.as_raw())
}

/// `/etc/canopy` must exist to be mounted over; made (and removed after)
/// if it does not. The tests of this file hold it one at a time.
pub struct MountPoint {
    pub made: bool,
    pub _one_at_a_time: std::sync::MutexGuard<'static, ()>,
}

pub static MOUNT_POINT: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl MountPoint {
    pub fn ensure() -> MountPoint {
        let guard = MOUNT_POINT
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let p = Path::new("/etc/canopy");
        let made = !p.exists();
        if made {
            std::fs::create_dir(p).unwrap();
        }
        MountPoint {
            made,
            _one_at_a_time: guard,
        }
    }
}

impl Drop for MountPoint {
    fn drop(&mut self) {
        if self.made {
            let _ = std::fs::remove_dir("/etc/canopy");
        }
    }
}

/// A broker started as the unit would; SIGKILLed on drop.
pub struct Broker {
    pub child: Child,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Site {
    pub net: Net,
    pub dir: tempfile::TempDir,
    pub unit: Unit,
    pub canopy: PathBuf,
    pub brokers: Vec<Option<Broker>>,
    pub svc: (u32, u32),
    /// Added to the unit's environment (the Kerberos leg's KRB5_CONFIG).
    pub extra_env: Vec<(String, String)>,
    /// Brokers start with `etc/canopy.service.d/exec.conf` applied (its
    /// `NoNewPrivileges=`), as on a node with `canopy exec` enabled.
    pub exec_drop_in: bool,
}

pub fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

pub fn chown(p: &Path, (uid, gid): (u32, u32)) {
    std::os::unix::fs::chown(p, Some(uid), Some(gid)).unwrap();
}

/// `cp -a`: contents, mode and owner.
pub fn copy(from: &Path, to: &Path) {
    let out = run_command(
        Command::new("cp").arg("-a").arg(from).arg(to),
        Duration::from_secs(10),
    );
    assert!(
        out.status.success(),
        "cp -a {} {}: {}",
        from.display(),
        to.display(),
        text(&out.stderr)
    );
}

impl Site {
    #[allow(clippy::new_without_default)] // makes namespaces: not a default
    pub fn new() -> Site {
        let net = Net::new(HOSTS).expect("network namespaces");
        let dir = tempfile::Builder::new()
            .prefix("canopy-day-")
            .tempdir()
            .unwrap();
        chmod(dir.path(), 0o755);
        let unit = shipped_unit();
        let svc = service_user();
        other_user();
        // The binary where the service user can run it, as /usr/bin/canopy.
        let canopy = dir.path().join("canopy");
        std::fs::copy(canopy_bin(), &canopy).unwrap();
        chmod(&canopy, 0o755);
        std::fs::write(dir.path().join("on-host"), ON_HOST).unwrap();
        chmod(&dir.path().join("on-host"), 0o755);
        let s = Site {
            net,
            dir,
            unit,
            canopy,
            brokers: (0..HOSTS).map(|_| None).collect(),
            svc,
            extra_env: Vec::new(),
            exec_drop_in: false,
        };
        for i in 0..HOSTS {
            let etc = s.etc(i);
            std::fs::create_dir_all(etc.join("keys")).unwrap();
            std::fs::create_dir_all(etc.join("public")).unwrap();
            chmod(&etc, 0o755);
            chmod(&etc.join("keys"), 0o755);
            chmod(&etc.join("public"), 0o755);
            // systemd's RuntimeDirectory=canopy, RuntimeDirectoryMode.
            let run = s.host_dir(i).join("run");
            std::fs::create_dir(&run).unwrap();
            chown(&run, svc);
            chmod(&run, s.unit.runtime_mode);
            s.write(i, "canopy.toml", &s.config());
            s.write(i, "policy.toml", &s.policy());
        }
        s
    }

    pub fn host_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("host{i}"))
    }

    pub fn etc(&self, i: usize) -> PathBuf {
        self.host_dir(i).join("etc")
    }

    pub fn write(&self, i: usize, name: &str, body: &str) {
        let p = self.etc(i).join(name);
        std::fs::write(&p, body).unwrap();
        chmod(&p, 0o644);
    }

    pub fn workstation_key(&self) -> PathBuf {
        self.dir.path().join("ws/me")
    }

    /// The CURVE instance: each host's key pair under /etc/canopy.
    pub fn config(&self) -> String {
        self.config_with(
            "curve_cert = \"/etc/canopy/keys/%h.key_secret\"\ncurve_public_certs = \"/etc/canopy/public\"\n",
            "",
        )
    }

    /// The same four hosts as a gssapi instance: Kerberos between the
    /// brokers, and for remote clients at node0 (`[clients]`).
    pub fn kerberos_config(&self) -> String {
        self.config_with(
            "mechanism = \"gssapi\"\n",
            "[gssapi]\nkeytab = \"/etc/canopy/canopy.keytab\"\nrealm = \"CANOPY.TEST\"\n\n",
        )
    }

    /// The four hosts, the policy and `[clients]` at node0; `bootstrap`
    /// and `tables` add the mechanism's keys and tables.
    pub fn config_with(&self, bootstrap: &str, tables: &str) -> String {
        let hosts: String = (0..HOSTS)
            .map(|i| {
                let ip = self.net.host(i).ip();
                format!("  {{ host = \"node{i}\", bind = \"tcp://{ip}:%p\", connect = \"tcp://{ip}:%p\" }},\n")
            })
            .collect();
        let ip0 = self.net.host(0).ip();
        format!(
            "[bootstrap]\n{bootstrap}default_port = {PORT}\nfanout = 2\nhosts = [\n{hosts}]\n\n{tables}[timing]\nheartbeat = 0.2\ntorpid = 1.0\nlost = 3.0\n\n[policy]\nfile = \"/etc/canopy/policy.toml\"\n\n[clients]\nbind = \"tcp://{ip0}:{CLIENTS_PORT}\"\nhosts = [\"node0\"]\n"
        )
    }

    pub fn policy(&self) -> String {
        let key = self.workstation_key();
        std::fs::create_dir_all(key.parent().unwrap()).unwrap();
        if !key.exists() {
            let kp = canopy_security::CurveKeypair::generate().unwrap();
            canopy_security::cert::write_pair(&kp, "workstation", &key, &key.with_extension("pub"))
                .unwrap();
        }
        let public = canopy_security::cert::load_public(&key.with_extension("pub")).unwrap();
        let principal = canopy_security::curve_principal(&public.public);
        format!(
            "[[rule]]\nname = \"local-users\"\nprincipal = \"unix:*\"\nmechanism = \"local\"\nroles = [\"user\"]\n\n[[rule]]\nname = \"root-admin\"\nprincipal = \"unix:root\"\nmechanism = \"local\"\nroles = [\"admin\"]\n\n[[rule]]\nname = \"workstation\"\nprincipal = \"{principal}\"\nroles = [\"operator\"]\n"
        )
    }

    /// A command on host `i` as `user`, with a clean environment.
    pub fn on(&self, i: usize, user: &str, umask: &str, program: &Path, args: &[&str]) -> Command {
        let mut cmd = self.net.host(i).command("unshare");
        cmd.args(["--uts", "--mount", "--propagation", "private"])
            .arg(self.dir.path().join("on-host"))
            .arg(format!("node{i}"))
            .arg(self.host_dir(i))
            .args([user, umask])
            .arg(program)
            .args(args)
            .env_clear()
            .env("PATH", PATH)
            .stdin(Stdio::null());
        cmd
    }

    /// Run `canopy ARGS` on host `i` as `user`.
    pub fn canopy(&self, i: usize, user: &str, args: &[&str]) -> Output {
        let mut cmd = self.on(i, user, "0022", &self.canopy, args);
        run_command(&mut cmd, Duration::from_secs(40))
    }

    pub fn ok(&self, i: usize, user: &str, args: &[&str]) -> String {
        self.expect_ok(i, user, args, self.canopy(i, user, args))
    }

    /// The stdout of `canopy ARGS` run on host `i` as `user`, which must
    /// have succeeded; else fail with its output and every broker's log.
    pub fn expect_ok(&self, i: usize, user: &str, args: &[&str], out: Output) -> String {
        assert!(
            out.status.success(),
            "canopy {} on node{i} as {user}: {}{}\n{}",
            args.join(" "),
            text(&out.stdout),
            text(&out.stderr),
            self.logs()
        );
        text(&out.stdout)
    }

    /// Start host `i`'s broker exactly as the shipped unit does.
    pub fn start(&mut self, i: usize) {
        let exec = &self.unit.exec;
        assert_eq!(exec[0], "/usr/bin/canopy", "the unit runs /usr/bin/canopy");
        assert_eq!(self.unit.user, self.unit.group);
        let args: Vec<&str> = exec[1..].iter().map(String::as_str).collect();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("node{i}.log")))
            .unwrap();
        let mut cmd = self.on(i, &self.unit.user, &self.unit.umask, &self.canopy, &args);
        cmd.envs(self.unit.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .envs(self.extra_env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("CANOPY_T_NNP", if self.nnp() { "1" } else { "0" })
            .stdout(Stdio::null())
            .stderr(log);
        self.brokers[i] = Some(Broker {
            child: cmd.spawn().unwrap(),
        });
    }

    /// Whether brokers start with NoNewPrivileges: the unit's setting,
    /// or the exec drop-in's when it is applied.
    pub fn nnp(&self) -> bool {
        let file = if self.exec_drop_in {
            "canopy.service.d/exec.conf"
        } else {
            "canopy.service"
        };
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../etc")
            .join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        let v = text
            .lines()
            .filter_map(|l| l.strip_prefix("NoNewPrivileges="))
            .next_back()
            .unwrap_or_else(|| panic!("{} has no NoNewPrivileges=", path.display()));
        v.trim() != "no"
    }

    pub fn pid(&self, i: usize) -> Pid {
        Pid::from_raw(self.brokers[i].as_ref().unwrap().child.id() as i32)
    }

    pub fn logs(&self) -> String {
        (0..HOSTS)
            .map(|i| {
                let l = std::fs::read_to_string(self.dir.path().join(format!("node{i}.log")))
                    .unwrap_or_default();
                format!("--- node{i}\n{l}")
            })
            .collect()
    }

    /// Rank `r`'s state and reason in rank 0's overlay status.
    pub fn state(&self, r: usize) -> (String, String) {
        let out = self.canopy(0, OTHER_USER, &["overlay", "status", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let e = &v["ranks"][r];
        (
            e["state"].as_str().unwrap_or("?").to_string(),
            e["reason"].as_str().unwrap_or("").to_string(),
        )
    }

    pub fn wait_state(&self, r: usize, want: &str, within: Duration) -> (String, String) {
        let mut last = (String::new(), String::new());
        let ok = wait_until(within, || {
            last = self.state(r);
            last.0 == want
        });
        assert!(ok, "rank {r} is {last:?}, not {want}\n{}", self.logs());
        last
    }

    pub fn wait_full(&self) {
        let up = wait_until(Duration::from_secs(10), || {
            (0..HOSTS).all(|i| self.host_dir(i).join("run/local").exists())
        });
        assert!(
            up,
            "not every broker made /run/canopy/local\n{}",
            self.logs()
        );
        self.ok(
            0,
            OTHER_USER,
            &["overlay", "status", "--wait", "full", "--timeout", "20s"],
        );
    }

    pub fn secret(&self, i: usize, name: &str) -> PathBuf {
        self.etc(i).join("keys").join(name)
    }
}

impl Site {
    /// `canopy key init --owner canopy` on node0 as root, then each
    /// secret to its own host only and the public certificates everywhere.
    /// Returns what `key init` printed.
    pub fn init_keys(&self) -> String {
        let out = self.ok(
            0,
            "root",
            &[
                "key",
                "init",
                "--config",
                "/etc/canopy/canopy.toml",
                "--owner",
                SERVICE_USER,
            ],
        );
        for i in 1..HOSTS {
            for f in std::fs::read_dir(self.etc(0).join("public")).unwrap() {
                copy(&f.unwrap().path(), &self.etc(i).join("public"));
            }
            let name = format!("node{i}.key_secret");
            copy(&self.secret(0, &name), &self.etc(i).join("keys"));
            std::fs::remove_file(self.secret(0, &name)).unwrap();
        }
        for i in 0..HOSTS {
            let md = std::fs::metadata(self.secret(i, &format!("node{i}.key_secret"))).unwrap();
            assert_eq!((md.uid(), md.mode() & 0o777), (self.svc.0, 0o600));
        }
        out
    }
}
