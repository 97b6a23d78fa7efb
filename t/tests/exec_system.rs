//! `canopy exec` in a system instance (issue 14), on four hosts in network
//! namespaces: brokers run as the service user `canopy` exactly as the
//! shipped unit runs them, and commands run as the requesting user through
//! the real `canopy-imp`, installed setuid root, configured by a root-owned
//! `/etc/canopy/imp.toml` on each host. The real site CA (`canopy-ca`)
//! runs on node0 as its own user and certifies users' keys.
//!
//! - `canopy exec -r all id -un` by alice prints `alice` once per rank,
//!   and its receipts verify offline (an edited one does not);
//! - bob's first exec gets his certificate from the CA by itself; imp.toml
//!   does not list him, so he is refused on every rank, with why;
//! - each bad input is a request captured and then modified, replayed,
//!   left to expire, sent to a rank outside it, or signed under a
//!   certificate nobody trusts, has expired, or names root; a malformed
//!   envelope; and the helper run by someone other than the broker's user.
//!   Each is refused naming the rank, nothing runs, and the origin's audit
//!   log records it;
//! - a service delegated alice's request runs it later, as alice; the same
//!   service cannot run a modified copy, and alice cannot submit a request
//!   meant for the service.
#![forbid(unsafe_code)]

use canopy_imp::cert::{CertKind, UserCert};
use canopy_imp::envelope::{self, b64_decode, b64_encode};
use canopy_proto::exec::{decode_run, encode_run};
use canopy_t::netns;
use canopy_t::site::*;
use canopy_t::users::{ensure_user, other_user, OTHER_USER};
use canopy_t::{ca_bin, imp_bin, run_command, text, wait_until, Daemon};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(300);
const ALICE: &str = OTHER_USER;
const BOB: &str = "canopy-t-bob";
const CA_USER: &str = "canopy-t-ca";
const SCHED: &str = "canopy-t-sched";

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn chown(p: &Path, uid: u32) {
    std::os::unix::fs::chown(p, Some(uid), Some(uid_gid(uid))).unwrap();
}

fn uid_gid(uid: u32) -> u32 {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .unwrap()
        .unwrap()
        .gid
        .as_raw()
}

fn uid_of(name: &str) -> u32 {
    nix::unistd::User::from_name(name)
        .unwrap()
        .unwrap()
        .uid
        .as_raw()
}

struct Exec {
    site: Site,
    imp: PathBuf,
    /// Per user, a home directory (for ~/.canopy).
    homes: PathBuf,
    ca_key: ed25519_dalek::SigningKey,
    node_pubs: Vec<PathBuf>,
    _ca: Option<Daemon>,
}

impl Exec {
    fn home(&self, user: &str) -> PathBuf {
        let h = self.homes.join(user);
        if !h.exists() {
            std::fs::create_dir(&h).unwrap();
            chown(&h, uid_of(user));
            chmod(&h, 0o700);
        }
        h
    }

    /// `canopy ARGS` on node `i` as `user`, with its HOME.
    fn canopy(&self, i: usize, user: &str, args: &[&str]) -> Output {
        let home = self.home(user);
        let mut cmd = self.site.on(i, user, "0022", &self.site.canopy, args);
        cmd.env("HOME", &home);
        run_command(&mut cmd, Duration::from_secs(40))
    }

    fn ok(&self, i: usize, user: &str, args: &[&str]) -> String {
        self.site
            .expect_ok(i, user, args, self.canopy(i, user, args))
    }

    /// A file in `user`'s home, readable by them.
    fn put(&self, user: &str, name: &str, bytes: &[u8]) -> String {
        let p = self.home(user).join(name);
        std::fs::write(&p, bytes).unwrap();
        chown(&p, uid_of(user));
        p.display().to_string()
    }

    /// Submit a payload as `user` on node0; refused on `ranks`, each
    /// naming `why`; nothing on stdout.
    fn refused(&self, user: &str, payload: &[u8], ranks: &[u32], why: &str) -> String {
        let f = self.put(user, "payload", payload);
        let out = self.canopy(0, user, &["exec", "-n", "--submit", &f]);
        let err = text(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(126),
            "{why}: {err}\n{}",
            text(&out.stdout)
        );
        assert_eq!(text(&out.stdout), "", "{why}: nothing ran");
        for r in ranks {
            let line = err
                .lines()
                .find(|l| l.contains(&format!("rank {r}")))
                .unwrap_or_else(|| panic!("rank {r} not named for {why}:\n{err}"));
            assert!(line.contains(why), "rank {r}: want {why:?}:\n{err}");
        }
        err
    }

    fn audit(&self) -> String {
        std::fs::read_to_string(self.site.host_dir(0).join("run/audit.log")).unwrap_or_default()
    }
}

/// The request envelope inside a payload, and a function putting a new
/// one in its place.
fn split(payload: &[u8]) -> (String, String, u8, Vec<u8>, Vec<u8>) {
    let (ranks, submit_as, body) = decode_run(payload).expect("a payload");
    let mut r = &body[1..];
    let input = canopy_imp::frame::read_input(&mut r).expect("helper input");
    (
        ranks.into(),
        submit_as.into(),
        body[0],
        input.cert,
        input.request,
    )
}

fn join(ranks: &str, submit_as: &str, flag: u8, cert: &[u8], request: &[u8]) -> Vec<u8> {
    let mut body = vec![flag];
    body.extend_from_slice(&canopy_imp::frame::encode_input(cert, request));
    encode_run(ranks, submit_as, &body)
}

/// The envelope with its signed body changed by `f`, signature kept.
fn tamper(env: &[u8], f: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    let mut e: serde_json::Value = serde_json::from_slice(env).unwrap();
    let body = b64_decode(e["payload"].as_str().unwrap()).unwrap();
    let mut v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    f(&mut v);
    e["payload"] = b64_encode(&serde_json::to_vec(&v).unwrap()).into();
    serde_json::to_vec(&e).unwrap()
}

/// The request body of an envelope.
fn body_of(env: &[u8]) -> serde_json::Value {
    let e: serde_json::Value = serde_json::from_slice(env).unwrap();
    serde_json::from_slice(&b64_decode(e["payload"].as_str().unwrap()).unwrap()).unwrap()
}

fn now() -> u64 {
    canopy_imp::userkeys::now()
}

fn setup() -> Exec {
    let mut site = Site::new();
    site.exec_drop_in = true;
    other_user();
    for u in [BOB, CA_USER, SCHED] {
        ensure_user(u);
    }
    let dir = site.dir.path().to_path_buf();
    // The helper, setuid root, where every host's broker can run it.
    let imp = dir.join("canopy-imp");
    std::fs::copy(imp_bin(), &imp).unwrap();
    std::os::unix::fs::chown(&imp, Some(0), Some(0)).unwrap();
    chmod(&imp, 0o4755);
    let ca_copy = dir.join("canopy-ca");
    std::fs::copy(ca_bin(), &ca_copy).unwrap();
    chmod(&ca_copy, 0o755);
    let homes = dir.join("home");
    std::fs::create_dir(&homes).unwrap();
    chmod(&homes, 0o755);

    // The CA's key, on node0, owned by the CA's user.
    let ca_dir = site.etc(0).join("ca");
    std::fs::create_dir(&ca_dir).unwrap();
    let ca_key = canopy_imp::keys::generate().unwrap();
    let ca_pub = canopy_imp::keys::write_pair(&ca_dir.join("ca.key"), &ca_key).unwrap();
    chown(&ca_dir.join("ca.key"), uid_of(CA_USER));
    chown(&ca_dir, uid_of(CA_USER));
    chmod(&ca_dir, 0o700);
    site.write(
        0,
        "ca.toml",
        "secret_key = \"/etc/canopy/ca/ca.key\"\nlifetime = 600\nrealms = []\nnamespace = \"ca\"\n",
    );

    let mut node_pubs = Vec::new();
    for i in 0..HOSTS {
        // The instance: exec through the helper, an audit log.
        let config = site.config().replace(
            "file = \"/etc/canopy/policy.toml\"\n",
            "file = \"/etc/canopy/policy.toml\"\naudit_log = \"/run/canopy/audit.log\"\n",
        ) + &format!("\n[exec]\nhelper = \"{}\"\n", imp.display());
        site.write(i, "canopy.toml", &config);
        let policy = site.policy()
            + &format!(
                "\n[[rule]]\nname = \"site-ca\"\nprincipal = \"unix:{CA_USER}\"\nmechanism = \"local\"\nregister = [\"ca\"]\n\n[[rule]]\nname = \"scheduler\"\nprincipal = \"unix:{SCHED}\"\nmechanism = \"local\"\nregister = [\"sched\"]\n"
            );
        site.write(i, "policy.toml", &policy);
        // The helper's files: root's.
        let d = site.etc(i).join("imp");
        std::fs::create_dir(&d).unwrap();
        chmod(&d, 0o755);
        std::fs::copy(&ca_pub, d.join("ca.pub")).unwrap();
        chmod(&d.join("ca.pub"), 0o644);
        let rk = canopy_imp::keys::generate().unwrap();
        let rpub = canopy_imp::keys::write_pair(&d.join("receipt.key"), &rk).unwrap();
        let copy = dir.join(format!("node{i}.receipt.pub"));
        std::fs::copy(&rpub, &copy).unwrap();
        node_pubs.push(copy);
        std::fs::create_dir(d.join("replay")).unwrap();
        chmod(&d.join("replay"), 0o700);
        site.write(
            i,
            "imp.toml",
            &format!(
                "broker_user = \"canopy\"\nusers = [\"{ALICE}\"]\nsearch_path = [\"/usr/bin\", \"/bin\"]\ntrusted_ca_keys = [\"/etc/canopy/imp/ca.pub\"]\nreceipt_key = \"/etc/canopy/imp/receipt.key\"\nreplay_cache = \"/etc/canopy/imp/replay\"\nmax_request_lifetime = 600\n"
            ),
        );
    }
    site.init_keys();
    for i in [3, 1, 2, 0] {
        site.start(i);
    }
    site.wait_full();
    let mut cmd = site.on(
        0,
        CA_USER,
        "0077",
        &ca_copy,
        &["--config", "/etc/canopy/ca.toml"],
    );
    let ca = Daemon::spawn(&mut cmd, &dir.join("ca.log"));
    let e = Exec {
        site,
        imp,
        homes,
        ca_key,
        node_pubs,
        _ca: Some(ca),
    };
    let up = wait_until(Duration::from_secs(15), || {
        e.ok(0, ALICE, &["service", "list"]).contains("ca")
    });
    assert!(up, "the CA did not register\n{}", e.site.logs());
    e
}

#[test]
fn exec_runs_as_the_user_through_the_helper_in_network_namespaces() {
    if !netns::can_run("exec_runs_as_the_user_through_the_helper_in_network_namespaces") {
        return;
    }
    netns::run_test(LIMIT, || {
        let _mp = MountPoint::ensure();
        let e = setup();
        // Brokers stay unprivileged.
        for i in 0..HOSTS {
            let st = std::fs::read_to_string(format!("/proc/{}/status", e.site.pid(i))).unwrap();
            let uid = st.lines().find(|l| l.starts_with("Uid:")).unwrap();
            assert!(
                !uid.split_whitespace().skip(1).any(|u| u == "0"),
                "node{i}: {uid}"
            );
        }

        // alice: a certificate from the CA, then her command on every rank.
        e.ok(0, ALICE, &["cert", "request"]);
        let receipts = e.home(ALICE).join("receipts");
        let out = e.ok(
            0,
            ALICE,
            &[
                "exec",
                "-n",
                "-r",
                "all",
                "--receipts",
                receipts.to_str().unwrap(),
                "id",
                "-un",
            ],
        );
        assert_eq!(out, format!("{ALICE}\n").repeat(4), "{}", e.site.logs());
        // From another node, with labels: each rank's own host.
        let out = e.ok(
            2,
            ALICE,
            &["exec", "-n", "--label-io", "-r", "1,3", "hostname"],
        );
        let mut lines: Vec<&str> = out.lines().collect();
        lines.sort();
        assert_eq!(lines, ["1: node1", "3: node3"]);

        // The receipts verify offline against the nodes' keys.
        let mut verify: Vec<String> = vec![
            "receipt".into(),
            "verify".into(),
            receipts.display().to_string(),
        ];
        for p in &e.node_pubs {
            verify.push("--node-key".into());
            verify.push(p.display().to_string());
        }
        let v: Vec<&str> = verify.iter().map(String::as_str).collect();
        let out = e.ok(0, ALICE, &v);
        assert_eq!(out.lines().count(), 4, "{out}");
        let alice_uid = uid_of(ALICE).to_string();
        assert!(out.lines().all(|l| l.contains(&alice_uid)), "{out}");
        // An edited receipt does not.
        let text_r = std::fs::read_to_string(&receipts).unwrap();
        let first = text_r.lines().next().unwrap();
        let edited = tamper(first.as_bytes(), |v| v["uid"] = 0.into());
        let bad = String::from_utf8(edited).unwrap() + "\n" + &text_r;
        std::fs::write(&receipts, bad).unwrap();
        let out = e.canopy(0, ALICE, &v);
        assert!(!out.status.success());
        let err = text(&out.stderr);
        assert!(err.contains(":1") && err.contains("signature"), "{err}");
        let audit = e.audit();
        assert!(audit.contains("exec request sha256"), "{audit}");
        // node0's log: the first exec (the second went through node2).
        assert_eq!(audit.matches("exec receipt sha256").count(), 4, "{audit}");

        // bob's first exec asks the CA for his certificate by itself; but
        // imp.toml does not list him.
        let out = e.canopy(0, BOB, &["exec", "-n", "-r", "all", "id", "-un"]);
        assert_eq!(out.status.code(), Some(126), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout), "");
        let err = text(&out.stderr);
        assert!(
            err.contains("asking the site ca now") && err.contains("certified by the site ca"),
            "{err}"
        );
        for r in 0..4 {
            let line = err
                .lines()
                .find(|l| l.starts_with(&format!("canopy exec: rank {r}:")))
                .unwrap_or("");
            assert!(
                line.contains(BOB) && line.contains("not allowed"),
                "rank {r}:\n{err}"
            );
        }

        // Bad input: a request alice signed, captured, then misused.
        let marker = e.home(ALICE).join("ran");
        let m = marker.display().to_string();
        let capture = |ranks: &str, lifetime: &str| -> Vec<u8> {
            let f = e.home(ALICE).join("captured").display().to_string();
            e.ok(
                0,
                ALICE,
                &[
                    "exec",
                    "-n",
                    "-r",
                    ranks,
                    "--lifetime",
                    lifetime,
                    "--out",
                    &f,
                    "touch",
                    &m,
                ],
            );
            std::fs::read(&f).unwrap()
        };
        let good = capture("all", "300");
        let (ranks, sub, flag, cert, req) = split(&good);
        // Tampered: argv, ranks or expiry changed after signing.
        for (what, f) in [
            (
                "argv",
                Box::new(|v: &mut serde_json::Value| v["argv"] = serde_json::json!(["id"]))
                    as Box<dyn Fn(&mut serde_json::Value)>,
            ),
            (
                "ranks",
                Box::new(|v: &mut serde_json::Value| v["ranks"] = serde_json::json!([0])),
            ),
            (
                "expiry",
                Box::new(|v: &mut serde_json::Value| v["not_after"] = (now() + 3000).into()),
            ),
        ] {
            let bad = join(&ranks, &sub, flag, &cert, &tamper(&req, f));
            e.refused(ALICE, &bad, &[0, 1, 2, 3], "signature");
            assert!(!marker.exists(), "a request with its {what} changed ran");
        }
        // Malformed.
        let bad = join(&ranks, &sub, flag, &cert, b"{\"payloadType\":1}");
        e.refused(ALICE, &bad, &[0, 1, 2, 3], "malformed");
        // Once is fine; again is a replay.
        let f = e.put(ALICE, "good", &good);
        e.ok(0, ALICE, &["exec", "-n", "--submit", &f]);
        assert!(marker.exists());
        std::fs::remove_file(&marker).unwrap();
        e.refused(ALICE, &good, &[0, 1, 2, 3], "replay");
        assert!(!marker.exists());
        // Expired.
        let short = capture("all", "1");
        std::thread::sleep(Duration::from_millis(2100));
        e.refused(ALICE, &short, &[0, 1, 2, 3], "expired");
        // A rank outside the request (the prefix widened by the sender).
        let one = capture("1", "300");
        let (_, s1, f1, c1, r1) = split(&one);
        let wide = join("1-2", &s1, f1, &c1, &r1);
        e.refused(ALICE, &wide, &[2], "rank 2");
        // Rank 1 is in the request, and ran it.
        assert!(marker.exists());
        std::fs::remove_file(&marker).unwrap();
        // Certificates: unknown issuer, expired, naming root.
        let user_key = canopy_imp::keys::generate().unwrap();
        let request_for = |cert: &[u8], principal: &str| {
            let mut v = body_of(&r1);
            v["principal"] = principal.into();
            v["nonce"] = envelope::hex(&now().to_be_bytes().repeat(2)).into();
            let body = serde_json::to_vec(&v).unwrap();
            let req = envelope::sign(envelope::EXEC_REQUEST_TYPE, &body, &user_key);
            join("1", "", b'0', cert, &req)
        };
        let principal = format!("unix:{ALICE}");
        let rogue = canopy_imp::keys::generate().unwrap();
        let (_, c) = UserCert::issue(
            CertKind::Ca,
            &principal,
            ALICE,
            &user_key.verifying_key(),
            now() - 10,
            now() + 600,
            &rogue,
        );
        e.refused(ALICE, &request_for(&c, &principal), &[1], "certificate");
        let (_, c) = UserCert::issue(
            CertKind::Ca,
            &principal,
            ALICE,
            &user_key.verifying_key(),
            now() - 600,
            now() - 60,
            &e.ca_key,
        );
        e.refused(ALICE, &request_for(&c, &principal), &[1], "expired");
        let (_, c) = UserCert::issue(
            CertKind::Ca,
            &principal,
            "root",
            &user_key.verifying_key(),
            now() - 10,
            now() + 600,
            &e.ca_key,
        );
        e.refused(ALICE, &request_for(&c, &principal), &[1], "root");
        assert!(!marker.exists(), "nothing ran");
        let audit = e.audit();
        assert!(
            audit.matches("exec refused on rank").count() >= 20,
            "{audit}"
        );

        // The helper run by anyone but the broker's user.
        let mut cmd = e.site.on(
            0,
            ALICE,
            "0022",
            &e.imp,
            &[
                "run",
                "--instance",
                "x",
                "--rank",
                "0",
                "--submitter",
                "unix:x",
            ],
        );
        let out = run_command(&mut cmd, Duration::from_secs(20));
        assert_eq!(out.status.code(), Some(125), "{}", text(&out.stderr));
        assert!(
            text(&out.stderr).contains("canopy"),
            "names the broker's user: {}",
            text(&out.stderr)
        );

        // Delegation: alice signs for the scheduler; it runs the request
        // later, as alice, unchanged.
        let d = e.home(ALICE).join("for-sched");
        e.ok(
            0,
            ALICE,
            &[
                "exec",
                "-n",
                "-r",
                "0,3",
                "--delegate",
                "sched",
                "--out",
                d.to_str().unwrap(),
                "id",
                "-un",
            ],
        );
        let payload = std::fs::read(&d).unwrap();
        // alice herself may not submit what she meant for the service: not
        // as the service (her broker refuses), nor as herself (the helper).
        let f = e.put(ALICE, "delegated", &payload);
        let out = e.canopy(0, ALICE, &["exec", "--submit", &f]);
        assert!(
            text(&out.stderr).contains("may not submit as service sched"),
            "{}",
            text(&out.stderr)
        );
        let (rk, _, fl, ce, rq) = split(&payload);
        e.refused(ALICE, &join(&rk, "", fl, &ce, &rq), &[0, 3], "audience");
        let f = e.put(SCHED, "delegated", &payload);
        let out = e.ok(0, SCHED, &["exec", "--submit", &f, "--as-service", "sched"]);
        assert_eq!(out, format!("{ALICE}\n{ALICE}\n"));
        // A modified copy (other ranks, other command) is refused.
        let (rk, sb, fl, ce, rq) = split(&payload);
        let changed = join(
            &rk,
            &sb,
            fl,
            &ce,
            &tamper(&rq, |v| v["argv"] = serde_json::json!(["touch", m.clone()])),
        );
        let f = e.put(SCHED, "changed", &changed);
        let out = e.canopy(0, SCHED, &["exec", "--submit", &f, "--as-service", "sched"]);
        assert_eq!(out.status.code(), Some(126), "{}", text(&out.stderr));
        assert!(
            text(&out.stderr).contains("signature"),
            "{}",
            text(&out.stderr)
        );
        assert!(!marker.exists());
        // Another client cannot submit as the service it does not hold.
        let f = e.put(BOB, "delegated", &payload);
        let out = e.canopy(0, BOB, &["exec", "--submit", &f, "--as-service", "sched"]);
        assert!(!out.status.success());
        assert!(
            text(&out.stderr).contains("register"),
            "{}",
            text(&out.stderr)
        );
    });
}
