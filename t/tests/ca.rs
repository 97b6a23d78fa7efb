//! The site CA and receipts, end to end with real processes (issue 14):
//! `canopy-ca` offers `ca` on rank 0 of a real instance; the real
//! `canopy cert request` gets a certificate that verifies with the CA key
//! and certifies the user's own key and account; a request relayed from
//! rank 1 (not authenticated by the CA's broker) is refused with the
//! reason; `canopy receipt verify` accepts signed receipts and names the
//! line of an edited one.
//!
//! As root, the user is canopy-t-other (the CA never certifies root), let
//! in with `--allow`; otherwise it is the user running the test.
#![forbid(unsafe_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use canopy_client::ClientError;
use canopy_imp::cert::{CertKind, UserCert};
use canopy_imp::envelope::{b64_decode, b64_encode, key_id, sha256_hex, Envelope, USER_CERT_TYPE};
use canopy_imp::receipt::{Exit, Receipt};
use canopy_imp::request::{sign_request, Audience, ExecRequest};
use canopy_proto::errno;
use canopy_t::users::{is_root, other_user, OTHER_USER};
use canopy_t::{
    ca_bin, canopy_bin, run_canopy, run_command, run_test, text, Daemon, Instance, RPC_TIMEOUT,
};

const LIMIT: Duration = Duration::from_secs(120);
const RUN: Duration = Duration::from_secs(30);

/// Who runs `canopy cert request`, and how.
struct User {
    name: String,
    /// As root: a copy of `canopy` the other user can run.
    canopy: PathBuf,
    home: tempfile::TempDir,
}

impl User {
    fn new(inst: &Instance) -> User {
        let home = tempfile::tempdir().unwrap();
        if !is_root() {
            let me = nix::unistd::User::from_uid(nix::unistd::geteuid())
                .unwrap()
                .expect("the test's user has a name");
            return User {
                name: me.name,
                canopy: canopy_bin(),
                home,
            };
        }
        let uid = other_user();
        nix::unistd::chown(home.path(), Some(nix::unistd::Uid::from_raw(uid)), None).unwrap();
        std::fs::set_permissions(home.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let canopy = inst.tempdir().join("canopy");
        std::fs::copy(canopy_bin(), &canopy).unwrap();
        std::fs::set_permissions(&canopy, std::fs::Permissions::from_mode(0o755)).unwrap();
        User {
            name: OTHER_USER.to_string(),
            canopy,
            home,
        }
    }

    /// `canopy ARGS` as this user, with HOME set to the temp home.
    fn canopy(&self, args: &[&str]) -> Output {
        let home = format!("HOME={}", self.home.path().display());
        let mut cmd = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", OTHER_USER, "--", "env", &home])
                .arg(&self.canopy);
            c
        } else {
            let mut c = Command::new(&self.canopy);
            c.env("HOME", self.home.path());
            c
        };
        cmd.args(args)
            .env_remove("CANOPY_URI")
            .env("RUST_LOG", "warn");
        run_command(&mut cmd, RUN)
    }

    fn dir(&self) -> PathBuf {
        self.home.path().join(".canopy")
    }
}

/// The CA's key pair (made by the real `canopy-ca keygen`) and config.
fn ca_files(dir: &Path) -> (PathBuf, ed25519_dalek::VerifyingKey) {
    let key = dir.join("ca.key");
    let out = run_command(
        Command::new(ca_bin()).args(["keygen", "--out", key.to_str().unwrap()]),
        RUN,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let public = canopy_imp::keys::read_public(&dir.join("ca.key.pub")).unwrap();
    assert!(
        text(&out.stdout).contains(&key_id(&public)),
        "{}",
        text(&out.stdout)
    );
    let config = dir.join("ca.toml");
    std::fs::write(
        &config,
        format!(
            "secret_key = \"{}\"\nlifetime = 600\nrealms = [\"HPC.EXAMPLE\"]\n",
            key.display()
        ),
    )
    .unwrap();
    (config, public)
}

fn issue_payload() -> Vec<u8> {
    let k = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    format!(
        "{{\"public_key\":\"{}\"}}",
        b64_encode(k.verifying_key().as_bytes())
    )
    .into_bytes()
}

fn refusal(r: Result<canopy_client::Msg, ClientError>) -> (u32, String) {
    match r {
        Err(ClientError::Remote {
            errnum, message, ..
        }) => (errnum, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn cert_request_gets_a_certificate_the_ca_key_verifies_and_relayed_requests_are_refused() {
    run_test(LIMIT, || {
        let allow = format!("unix:{OTHER_USER}=user");
        let inst = if is_root() {
            other_user();
            Instance::start(2, 2, &["--allow", &allow])
        } else {
            Instance::start(2, 2, &[])
        };
        let cadir = tempfile::tempdir().unwrap();
        let (config, ca_public) = ca_files(cadir.path());
        let ca = Daemon::spawn(
            Command::new(ca_bin())
                .args([
                    "--config",
                    config.to_str().unwrap(),
                    "--uri",
                    &inst.local_uri(0),
                ])
                .env("RUST_LOG", "info"),
            &cadir.path().join("ca.stderr"),
        );
        assert!(
            ca.wait_for("canopy-ca: serving ca on rank 0", Duration::from_secs(20)),
            "canopy-ca did not start: {:?}\n{}",
            ca.lines(),
            ca.stderr_text()
        );
        let user = User::new(&inst);
        let uri0 = inst.local_uri(0);
        let principal = format!("unix:{}", user.name);

        // A lifetime above the CA's is capped to it (600 s).
        let out = user.canopy(&["cert", "request", "--lifetime", "100000", "--uri", &uri0]);
        assert!(
            out.status.success(),
            "{}\n{}",
            text(&out.stderr),
            ca.stderr_text()
        );
        let printed = text(&out.stdout);
        assert!(
            printed.contains(&format!("principal: {principal}\n")),
            "{printed}"
        );
        assert!(
            printed.contains(&format!("user:      {}\n", user.name)),
            "{printed}"
        );
        assert!(
            printed.contains("saved:     ~/.canopy/exec.cert"),
            "{printed}"
        );

        // The saved certificate verifies with the CA's key, for the user's
        // own key and account.
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let key_file = user.dir().join("exec.key");
        let cert_file = user.dir().join("exec.cert");
        assert_eq!(mode(&key_file), 0o600);
        assert_eq!(mode(&cert_file), 0o600);
        let user_key =
            canopy_imp::keys::parse_secret(&std::fs::read_to_string(&key_file).unwrap()).unwrap();
        let wire = std::fs::read(&cert_file).unwrap();
        let env = Envelope::parse(&wire).unwrap();
        let body = env
            .verify(USER_CERT_TYPE, &ca_public, "certificate")
            .unwrap_or_else(|e| panic!("{e}"));
        let cert = UserCert::parse(body).unwrap();
        assert_eq!(cert.kind, CertKind::Ca);
        assert_eq!(cert.principal, principal);
        assert_eq!(cert.user, user.name);
        assert_eq!(cert.public_key(), Some(user_key.verifying_key()));
        assert_eq!(cert.issuer, key_id(&ca_public));
        assert_eq!(cert.not_after - cert.not_before, 600);

        let out = user.canopy(&["cert", "show"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let shown = text(&out.stdout);
        assert!(
            shown.contains("status:     valid") && shown.contains("(your exec.key)"),
            "{shown}"
        );

        // Relayed from rank 1: not authenticated by the CA's broker.
        let uri1 = inst.local_uri(1);
        let out = user.canopy(&["cert", "request", "--ca-rank", "0", "--uri", &uri1]);
        assert!(!out.status.success());
        assert!(
            text(&out.stderr).contains("the ca authenticates callers directly: run canopy cert request on the ca's host, or connect to its broker with kerberos"),
            "{}",
            text(&out.stderr)
        );
        let mut c1 = inst.client(1);
        let (e, msg) = refusal(c1.rpc("ca.issue", 0, &issue_payload(), RPC_TIMEOUT));
        assert_eq!(e, errno::EPERM, "{msg}");
        assert!(
            msg.contains("the ca authenticates callers directly"),
            "{msg}"
        );
        // The certificate saved before is untouched by the refusal.
        assert_eq!(std::fs::read(&cert_file).unwrap(), wire);

        if is_root() {
            // Direct, but root: never certified.
            let mut c0 = inst.client(0);
            let (e, msg) = refusal(c0.rpc("ca.issue", 0, &issue_payload(), RPC_TIMEOUT));
            assert_eq!(e, errno::EPERM, "{msg}");
            assert!(msg.contains("never certifies root"), "{msg}");
        }

        // One log line per decision, naming the principal and no secret.
        let log = ca.stderr_text();
        assert!(
            log.contains(&format!(
                "ca: issued principal={principal} user={} keyid={} not_after={}",
                user.name,
                key_id(&user_key.verifying_key()),
                cert.not_after
            )),
            "{log}"
        );
        assert!(
            log.contains(&format!(
                "ca: refused ca.issue: principal={principal} direct=false"
            )),
            "{log}"
        );
        let secret = std::fs::read_to_string(cadir.path().join("ca.key")).unwrap();
        let secret = secret.trim().trim_start_matches("ed25519-secret:");
        assert!(!log.contains(secret));
        drop(ca);
    });
}

/// A request envelope and its receipts from two nodes.
struct Receipts {
    dir: tempfile::TempDir,
    request: PathBuf,
    keys: [PathBuf; 2],
}

impl Receipts {
    fn new() -> Receipts {
        let dir = tempfile::tempdir().unwrap();
        let user = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
        let req = ExecRequest {
            v: 1,
            principal: "alice@HPC.EXAMPLE".into(),
            argv: vec!["hostname".into()],
            cwd: "/".into(),
            env: Default::default(),
            instance: "canopy".into(),
            ranks: vec![0, 1],
            audience: Audience::User,
            issued_at: 100,
            not_after: 200,
            nonce: "00112233445566778899aabbccddeeff".into(),
        };
        let wire = sign_request(&req, &user);
        let request = dir.path().join("request.json");
        std::fs::write(&request, &wire).unwrap();
        let mut lines = Vec::new();
        let mut keys = Vec::new();
        for rank in 0..2u32 {
            let node = canopy_imp::keys::generate().unwrap();
            let path = dir.path().join(format!("node{rank}.key"));
            keys.push(canopy_imp::keys::write_pair(&path, &node).unwrap());
            let r = Receipt {
                v: 1,
                request_digest: sha256_hex(&wire),
                rank,
                host: format!("node{rank}"),
                uid: 1000,
                start: 150,
                end: 151,
                exit: Exit::Status(rank as i32),
                stdout_sha256: sha256_hex(format!("node{rank}\n").as_bytes()),
                stderr_sha256: sha256_hex(b""),
            };
            lines.push(String::from_utf8(r.sign(&node)).unwrap());
        }
        let r = Receipts {
            dir,
            request,
            keys: [keys[0].clone(), keys[1].clone()],
        };
        r.write(&lines);
        r
    }

    fn file(&self) -> PathBuf {
        self.dir.path().join("receipts.jsonl")
    }

    fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(self.file())
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn write(&self, lines: &[String]) {
        std::fs::write(self.file(), lines.join("\n") + "\n").unwrap();
    }

    fn verify(&self, keys: &[&Path], request: bool) -> Output {
        let file = self.file();
        let mut args = vec!["receipt", "verify", file.to_str().unwrap()];
        for k in keys {
            args.extend(["--node-key", k.to_str().unwrap()]);
        }
        if request {
            args.extend(["--request", self.request.to_str().unwrap()]);
        }
        run_canopy(&args, &[], RUN)
    }
}

#[test]
fn receipt_verify_accepts_signed_receipts_and_names_the_line_of_a_bad_one() {
    run_test(LIMIT, || {
        let r = Receipts::new();
        let keys = [r.keys[0].as_path(), r.keys[1].as_path()];
        let file = r.file().display().to_string();

        let out = r.verify(&keys, true);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let printed = text(&out.stdout);
        assert_eq!(printed.lines().count(), 2, "{printed}");
        assert!(
            printed.contains(&format!(
                "{file}:1: ok rank 0 host node0 uid 1000 exit status 0"
            )) && printed.contains(&format!(
                "{file}:2: ok rank 1 host node1 uid 1000 exit status 1"
            )),
            "{printed}"
        );
        let digest = sha256_hex(&std::fs::read(&r.request).unwrap());
        assert!(printed.contains(&format!("request {digest}")), "{printed}");

        // A receipt for another request.
        std::fs::write(&r.request, b"{\"other\":1}").unwrap();
        let out = r.verify(&keys, true);
        assert!(!out.status.success());
        assert!(
            text(&out.stderr).contains(&format!(
                "{file}:1: FAILED: the receipt is for request {digest}, not for the request given"
            )),
            "{}",
            text(&out.stderr)
        );

        // Wrong node key: only node 0's given.
        let out = r.verify(&keys[..1], false);
        assert!(!out.status.success());
        let err = text(&out.stderr);
        assert!(
            err.contains(&format!("{file}:2: FAILED: receipt signed by key"))
                && err.contains("not among the node keys given")
                && err.contains("1 of 2 receipts"),
            "{err}"
        );

        let good = r.lines();
        // One byte of line 2's payload edited.
        let mut edited = good.clone();
        let at = edited[1].find("\"payload\":\"").unwrap() + 11 + 20;
        let c = if &edited[1][at..at + 1] == "A" {
            "B"
        } else {
            "A"
        };
        edited[1].replace_range(at..at + 1, c);
        r.write(&edited);
        let out = r.verify(&keys, false);
        assert!(!out.status.success());
        let err = text(&out.stderr);
        assert!(err.contains(&format!("{file}:2: FAILED: ")), "{err}");
        assert!(!err.contains(&format!("{file}:1: FAILED")), "{err}");
        assert!(text(&out.stdout).contains(&format!("{file}:1: ok")));

        // A field changed and the payload re-encoded, the signature kept.
        let mut v: serde_json::Value = serde_json::from_str(&good[0]).unwrap();
        let body = String::from_utf8(b64_decode(v["payload"].as_str().unwrap()).unwrap()).unwrap();
        let forged = body.replace("\"exit\":{\"status\":0}", "\"exit\":{\"status\":1}");
        assert_ne!(forged, body);
        v["payload"] = b64_encode(forged.as_bytes()).into();
        r.write(&[v.to_string(), good[1].clone()]);
        let out = r.verify(&keys, false);
        assert!(!out.status.success());
        let err = text(&out.stderr);
        assert!(
            err.contains(&format!(
                "{file}:1: FAILED: receipt: bad signature on the receipt"
            )),
            "{err}"
        );
    });
}
