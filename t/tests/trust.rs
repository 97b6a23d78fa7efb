//! Trusted files only (docs/security.md, "Trusted files"): every file or
//! directory whose contents decide access must be owned by root or the
//! broker's user, not writable by group or other, on a path whose
//! directories obey the same rule; secrets (keytabs) must not be readable
//! by group or other; `--rundir` must not be a symlink. Each case builds
//! the bad layout, runs the real `canopy` binary, and expects the
//! documented refusal (naming the path, what was found and the fix), a
//! non-zero exit and no entry; then the correct layout is accepted.
//!
//! "Owned by another user" uses a real unprivileged user
//! (`canopy_t::users::OTHER_USER`), so those cases need root and are
//! skipped (saying so) without it.
#![forbid(unsafe_code)]

use canopy_t::cluster::Cluster;
use canopy_t::users::{is_root, other_user, OTHER_USER};
use canopy_t::{canopy_bin, run_canopy, run_test, text, wait_until, RPC_TIMEOUT};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::os::unix::fs::{chown, lchown, symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(120);
const RUN: Duration = Duration::from_secs(30);

/// The other user's uid, or `None` (and a note) when not root.
fn other(name: &str) -> Option<u32> {
    if !is_root() {
        eprintln!("SKIPPED part of {name}: needs root to give files to {OTHER_USER}");
        return None;
    }
    Some(other_user())
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()));
}

fn mkdir(p: &Path, mode: u32) -> PathBuf {
    std::fs::create_dir(p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
    chmod(p, mode);
    p.to_owned()
}

fn file(p: &Path, text: &str, mode: u32) -> PathBuf {
    std::fs::write(p, text).unwrap();
    chmod(p, mode);
    p.to_owned()
}

/// A temp dir of mode 0755 (tempfile makes 0700, which nobody else can
/// enter).
fn tempdir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    chmod(d.path(), 0o755);
    d
}

/// The run failed, and its stderr has every needle.
fn refused(out: &Output, needles: &[&str]) {
    let err = text(&out.stderr);
    assert!(
        !out.status.success(),
        "accepted, expected a refusal naming {needles:?}\nstderr:\n{err}"
    );
    for n in needles {
        assert!(err.contains(n), "refusal lacks {n:?}:\n{err}");
    }
}

fn accepted(out: &Output) {
    assert!(
        out.status.success(),
        "refused a correct layout:\n{}",
        text(&out.stderr)
    );
}

/// `canopy start ARGS -- touch MARKER`: the marker says whether the
/// command got in.
fn start_and_touch(args: &[&str], marker: &Path) -> Output {
    let mut a: Vec<&str> = vec!["start"];
    a.extend_from_slice(args);
    a.extend(["--", "touch", marker.to_str().unwrap()]);
    run_canopy(&a, &[], Duration::from_secs(60))
}

const POLICY: &str = "[[rule]]\nname = \"ops\"\nprincipal = \"unix:root\"\nroles = [\"user\"]\n";

#[test]
fn policy_owned_by_another_user_is_refused() {
    run_test(LIMIT, || {
        let d = tempdir();
        let policy = file(&d.path().join("policy.toml"), POLICY, 0o644);
        let marker = d.path().join("got-in");
        let p = policy.to_str().unwrap();
        // Correct: ours (or root's), 0644.
        accepted(&start_and_touch(&["--policy", p], &marker));
        assert!(marker.exists());
        std::fs::remove_file(&marker).unwrap();
        let Some(uid) = other("policy_owned_by_another_user_is_refused") else {
            return;
        };
        chown(&policy, Some(uid), None).unwrap();
        let out = start_and_touch(&["--policy", p], &marker);
        refused(
            &out,
            &[
                p,
                &format!("owned by {OTHER_USER}"),
                &format!("chown root {p}"),
            ],
        );
        assert!(!marker.exists(), "the command ran");
        // The same file through `acl check` offline.
        let out = run_canopy(&["acl", "check", "unix:root", "--policy", p], &[], RUN);
        refused(&out, &[p, OTHER_USER]);
    });
}

#[test]
fn policy_reached_through_another_users_directory_or_an_open_one_is_refused() {
    run_test(LIMIT, || {
        let d = tempdir();
        let real = file(&d.path().join("policy.toml"), POLICY, 0o644);
        let marker = d.path().join("got-in");
        // Correct: a symlink in a directory of ours.
        let ours = mkdir(&d.path().join("ours"), 0o755);
        let link = ours.join("policy.toml");
        symlink(&real, &link).unwrap();
        accepted(&start_and_touch(
            &["--policy", link.to_str().unwrap()],
            &marker,
        ));
        std::fs::remove_file(&marker).unwrap();

        // A group/other-writable directory on the way.
        let open = mkdir(&d.path().join("open"), 0o777);
        let link = open.join("policy.toml");
        symlink(&real, &link).unwrap();
        let out = start_and_touch(&["--policy", link.to_str().unwrap()], &marker);
        let o = open.to_str().unwrap();
        refused(&out, &[o, "mode 0777", &format!("chmod go-w {o}")]);
        assert!(!marker.exists());

        let Some(uid) = other("policy_reached_through_another_users_directory") else {
            return;
        };
        // A directory owned by another user, holding a symlink to ours.
        let theirs = mkdir(&d.path().join("theirs"), 0o755);
        let link = theirs.join("policy.toml");
        symlink(&real, &link).unwrap();
        chown(&theirs, Some(uid), None).unwrap();
        let out = start_and_touch(&["--policy", link.to_str().unwrap()], &marker);
        let t = theirs.to_str().unwrap();
        refused(&out, &[t, &format!("owned by {OTHER_USER}"), "chown root"]);
        assert!(!marker.exists());
        // A symlink owned by another user, in our own directory.
        let link = ours.join("theirs.toml");
        symlink(&real, &link).unwrap();
        lchown(&link, Some(uid), None).unwrap();
        let out = start_and_touch(&["--policy", link.to_str().unwrap()], &marker);
        refused(&out, &["symlink", link.to_str().unwrap(), OTHER_USER]);
        assert!(!marker.exists());
    });
}

/// `canopy broker --config` of rank 0, expected to refuse at once.
fn system_broker(c: &Cluster, config: &str) -> Output {
    run_canopy(
        &[
            "broker",
            "--config",
            c.path(config).to_str().unwrap(),
            "--hostname",
            "n0",
            "--force-root",
            "--rundir",
            c.rundir(0).to_str().unwrap(),
        ],
        &[],
        RUN,
    )
}

/// The whole cluster comes up and answers (the layout is accepted).
fn cluster_accepted(c: &mut Cluster) {
    c.start_all();
    c.wait_full(Duration::from_secs(20));
    let mut cl = c.client(0);
    cl.rpc("broker.ping", 1, b"ok", RPC_TIMEOUT).unwrap();
    c.kill(0);
    c.kill(1);
}

#[test]
fn certificate_directory_writable_by_others_is_refused() {
    run_test(LIMIT, || {
        let mut c = Cluster::new(2);
        let pubdir = c.path("pub");
        let p = pubdir.to_str().unwrap().to_owned();
        for mode in [0o777, 0o775, 0o757] {
            chmod(&pubdir, mode);
            let out = system_broker(&c, "canopy.toml");
            refused(
                &out,
                &[
                    "certificate directory refused",
                    &p,
                    &format!("mode {mode:04o}"),
                    &format!("chmod go-w {p}"),
                ],
            );
            assert!(!c.rundir(0).join("local-0").exists(), "a broker came up");
        }
        // A sticky world-writable directory is refused too (anyone can add
        // a <host>.key), with other advice than chmod go-w.
        chmod(&pubdir, 0o1777);
        let out = system_broker(&c, "canopy.toml");
        refused(&out, &["certificate directory refused", &p, "install -d"]);
        chmod(&pubdir, 0o755);
        cluster_accepted(&mut c);
    });
}

#[test]
fn certificate_directory_owned_by_another_user_is_refused() {
    run_test(LIMIT, || {
        let Some(uid) = other("certificate_directory_owned_by_another_user_is_refused") else {
            return;
        };
        let mut c = Cluster::new(2);
        let pubdir = c.path("pub");
        let p = pubdir.to_str().unwrap().to_owned();
        chown(&pubdir, Some(uid), None).unwrap();
        let out = system_broker(&c, "canopy.toml");
        refused(
            &out,
            &[
                "certificate directory refused",
                &p,
                &format!("owned by {OTHER_USER}"),
                &format!("chown root {p}"),
            ],
        );
        chown(&pubdir, Some(0), None).unwrap();
        cluster_accepted(&mut c);
    });
}

#[test]
fn keytab_readable_by_others_is_refused() {
    run_test(LIMIT, || {
        let c = Cluster::new(2);
        let kt = c.path("canopy.keytab");
        file(&kt, "not a real keytab", 0o644);
        let krb5 = file(&c.path("krb5.conf"), "", 0o644);
        let gss = format!(
            "{}\n[gssapi]\nservice = \"canopy\"\nkeytab = \"{}\"\nrealm = \"TEST.REALM\"\n",
            c.config_text(&c.hosts_text(2)),
            kt.display()
        )
        .replace("[bootstrap]\n", "[bootstrap]\nmechanism = \"gssapi\"\n");
        c.write("gss.toml", &gss);
        let k = kt.to_str().unwrap();
        let run = || {
            run_canopy(
                &[
                    "broker",
                    "--config",
                    c.path("gss.toml").to_str().unwrap(),
                    "--hostname",
                    "n0",
                    "--force-root",
                    "--rundir",
                    c.rundir(0).to_str().unwrap(),
                ],
                &[("KRB5_CONFIG", krb5.to_str().unwrap())],
                RUN,
            )
        };
        for mode in [0o644, 0o640, 0o604] {
            chmod(&kt, mode);
            let out = run();
            refused(
                &out,
                &[
                    "keytab refused",
                    k,
                    &format!("mode {mode:04o}"),
                    &format!("chmod 600 {k}"),
                ],
            );
        }
        // 0600: the keytab passes the trust check (this junk one then
        // fails in Kerberos, for another reason).
        chmod(&kt, 0o600);
        let out = run();
        assert!(
            !text(&out.stderr).contains("keytab refused"),
            "{}",
            text(&out.stderr)
        );

        // A user instance's client keytab, from the environment.
        let d = tempdir();
        let marker = d.path().join("got-in");
        chmod(&kt, 0o644);
        let out = run_canopy(
            &[
                "start",
                "--mechanism",
                "gssapi",
                "--rundir",
                d.path().to_str().unwrap(),
                "--",
                "touch",
                marker.to_str().unwrap(),
            ],
            &[
                ("KRB5_CONFIG", krb5.to_str().unwrap()),
                ("KRB5_CLIENT_KTNAME", &format!("FILE:{k}")),
                ("KRB5CCNAME", "MEMORY:trust"),
            ],
            Duration::from_secs(60),
        );
        refused(&out, &["keytab refused", k, "chmod 600"]);
        assert!(!marker.exists());
    });
}

#[test]
fn audit_log_directory_writable_by_group_is_refused() {
    run_test(LIMIT, || {
        let d = tempdir();
        let policy = file(&d.path().join("policy.toml"), POLICY, 0o644);
        let logs = mkdir(&d.path().join("log"), 0o775);
        let audit = logs.join("audit.log");
        let marker = d.path().join("got-in");
        let args = [
            "--policy",
            policy.to_str().unwrap(),
            "--audit",
            audit.to_str().unwrap(),
        ];
        let out = start_and_touch(&args, &marker);
        let l = logs.to_str().unwrap();
        refused(
            &out,
            &[
                "audit log refused",
                l,
                "mode 0775",
                &format!("chmod go-w {l}"),
            ],
        );
        assert!(!marker.exists());
        assert!(!audit.exists(), "an audit log was created");
        chmod(&logs, 0o755);
        accepted(&start_and_touch(&args, &marker));
        assert!(marker.exists());
        assert!(audit.exists());
        if let Some(uid) = other("audit_log_directory_owned_by_another_user") {
            std::fs::remove_file(&marker).unwrap();
            chown(&logs, Some(uid), None).unwrap();
            let out = start_and_touch(&args, &marker);
            refused(&out, &["audit log refused", l, OTHER_USER]);
            assert!(!marker.exists());
        }
    });
}

/// A `canopy broker` left running by a test: killed and reaped on drop.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.0.id() as i32), Signal::SIGKILL);
        let _ = self.0.wait();
    }
}

/// A singleton `canopy broker ARGS` (env: extra environment) that must
/// come up: its local socket appears at `socket`.
fn singleton_comes_up(args: &[&str], env: &[(&str, &str)], socket: &Path) {
    let child = Command::new(canopy_bin())
        .arg("broker")
        .args(args)
        .env_remove("PMI_FD")
        .env_remove("CANOPY_URI")
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut d = Daemon(child);
    let up = wait_until(Duration::from_secs(20), || socket.exists());
    if !up {
        let _ = kill(Pid::from_raw(d.0.id() as i32), Signal::SIGKILL);
        let mut err = String::new();
        if let Some(mut e) = d.0.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        panic!("the broker did not come up at {}:\n{err}", socket.display());
    }
    let mut c = canopy_client::Client::connect(Some(&format!("local://{}", socket.display())))
        .expect("connect to the singleton");
    c.rpc("broker.ping", 0, b"up", RPC_TIMEOUT).unwrap();
    drop(d);
}

fn singleton(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut a = vec!["broker"];
    a.extend_from_slice(args);
    let mut cmd = Command::new(canopy_bin());
    cmd.args(&a)
        .env_remove("PMI_FD")
        .env_remove("CANOPY_URI")
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied());
    canopy_t::run_command(&mut cmd, RUN)
}

#[test]
fn broker_rundir_must_be_a_private_directory_of_ours_not_a_symlink() {
    run_test(LIMIT, || {
        let d = tempdir();
        // Correct: a directory of ours, mode 0700.
        let good = mkdir(&d.path().join("run"), 0o700);
        let g = good.to_str().unwrap();
        singleton_comes_up(
            &["--rundir", g, "--instance", "t"],
            &[],
            &good.join("local-0"),
        );

        // Group-writable.
        chmod(&good, 0o770);
        let out = singleton(&["--rundir", g, "--instance", "t"], &[]);
        refused(&out, &["runtime directory refused", g, "mode 0770"]);
        chmod(&good, 0o700);

        // A symlink, even to a directory of ours.
        let link = d.path().join("link");
        symlink(&good, &link).unwrap();
        let l = link.to_str().unwrap();
        let out = singleton(&["--rundir", l, "--instance", "t"], &[]);
        refused(&out, &["runtime directory refused", l, "symlink", g]);

        let Some(uid) = other("broker_rundir_symlink_owned_by_someone_else") else {
            return;
        };
        // A symlink owned by someone else, to a directory they own.
        let theirs = mkdir(&d.path().join("theirs"), 0o700);
        chown(&theirs, Some(uid), None).unwrap();
        let link2 = d.path().join("link2");
        symlink(&theirs, &link2).unwrap();
        lchown(&link2, Some(uid), None).unwrap();
        let l2 = link2.to_str().unwrap();
        let out = singleton(&["--rundir", l2, "--instance", "t"], &[]);
        refused(&out, &["runtime directory refused", l2, "symlink"]);
        assert_eq!(std::fs::read_dir(&theirs).unwrap().count(), 0);
        // Their directory itself.
        let t = theirs.to_str().unwrap();
        let out = singleton(&["--rundir", t, "--instance", "t"], &[]);
        refused(&out, &["runtime directory refused", t, OTHER_USER]);
        assert_eq!(std::fs::read_dir(&theirs).unwrap().count(), 0);
    });
}

#[test]
fn start_rundir_owned_by_another_user_is_refused() {
    run_test(LIMIT, || {
        let d = tempdir();
        let parent = mkdir(&d.path().join("parent"), 0o755);
        let marker = d.path().join("got-in");
        let p = parent.to_str().unwrap();
        accepted(&start_and_touch(&["--rundir", p], &marker));
        assert!(marker.exists());
        std::fs::remove_file(&marker).unwrap();
        // Group-writable (not sticky): anyone in the group could move our
        // directory aside.
        chmod(&parent, 0o775);
        let out = start_and_touch(&["--rundir", p], &marker);
        refused(
            &out,
            &["runtime directory refused", p, "mode 0775", "chmod go-w"],
        );
        assert!(!marker.exists());
        chmod(&parent, 0o755);
        // A symlink as --rundir.
        let link = d.path().join("link");
        symlink(&parent, &link).unwrap();
        let out = start_and_touch(&["--rundir", link.to_str().unwrap()], &marker);
        refused(&out, &["runtime directory refused", "symlink"]);
        assert!(!marker.exists());

        let Some(uid) = other("start_rundir_owned_by_another_user_is_refused") else {
            return;
        };
        chown(&parent, Some(uid), None).unwrap();
        let out = start_and_touch(&["--rundir", p], &marker);
        refused(
            &out,
            &[
                "runtime directory refused",
                p,
                &format!("owned by {OTHER_USER}"),
                &format!("chown root {p}"),
            ],
        );
        assert!(!marker.exists());
        assert_eq!(
            std::fs::read_dir(&parent).unwrap().count(),
            0,
            "something was created in their directory"
        );
    });
}

#[test]
fn private_dir_planted_as_a_symlink_by_another_user_is_refused() {
    run_test(LIMIT, || {
        // The default runtime directory of `canopy broker --instance X` is
        // $XDG_RUNTIME_DIR/canopy-X.
        let d = tempdir();
        let xdg = mkdir(&d.path().join("xdg"), 0o1777);
        let x = xdg.to_str().unwrap();
        let env = [("XDG_RUNTIME_DIR", x)];
        // Correct: nothing planted; the broker creates its own.
        singleton_comes_up(
            &["--instance", "good"],
            &env,
            &xdg.join("canopy-good/local-0"),
        );
        let made = std::fs::symlink_metadata(xdg.join("canopy-good")).unwrap();
        assert!(made.is_dir());
        assert_eq!(made.permissions().mode() & 0o7777, 0o700);

        let Some(uid) = other("private_dir_planted_as_a_symlink_by_another_user") else {
            return;
        };
        // Planted by another user: a symlink to their directory.
        let theirs = mkdir(&d.path().join("theirs"), 0o777);
        chown(&theirs, Some(uid), None).unwrap();
        let planted = xdg.join("canopy-victim");
        symlink(&theirs, &planted).unwrap();
        lchown(&planted, Some(uid), None).unwrap();
        let out = singleton(&["--instance", "victim"], &env);
        refused(
            &out,
            &[
                "runtime directory refused",
                planted.to_str().unwrap(),
                "symlink",
            ],
        );
        assert_eq!(std::fs::read_dir(&theirs).unwrap().count(), 0);
        // Planted as a real directory of theirs, mode 0700.
        let planted2 = mkdir(&xdg.join("canopy-victim2"), 0o700);
        chown(&planted2, Some(uid), None).unwrap();
        let out = singleton(&["--instance", "victim2"], &env);
        refused(
            &out,
            &[
                "runtime directory refused",
                planted2.to_str().unwrap(),
                OTHER_USER,
            ],
        );
    });
}
