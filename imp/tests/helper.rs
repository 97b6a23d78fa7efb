//! `canopy-imp run` for real: the binary copied into a temporary directory,
//! owned by root and made setuid (mode 4755), started through `setpriv` by
//! a non-root "broker user" (`nobody`), running commands as a target user
//! (`daemon`). Its imp.toml is the real path, `/etc/canopy/imp.toml`: each
//! run is in a private mount namespace (`unshare --mount`) where a
//! temporary directory is bind-mounted on `/etc/canopy`, so a setuid
//! helper that never takes its config path from its invoker can be tested
//! without touching the host's `/etc` (which gets a private overlay there,
//! so `/etc/canopy` need not exist on the host).
//!
//! Needs root (to chown and mount); prints "skipped: ..." otherwise.

#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use canopy_imp::cert::{CertKind, UserCert};
use canopy_imp::envelope::{b64_decode, b64_encode, sha256_hex, sign, EXEC_REQUEST_TYPE};
use canopy_imp::frame::{
    encode_input, read_records, TAG_RECEIPT, TAG_REFUSED, TAG_STDERR, TAG_STDOUT,
};
use canopy_imp::keys;
use canopy_imp::receipt::{verify_receipt, Exit};
use canopy_imp::request::{new_nonce, Audience, ExecRequest};
use ed25519_dalek::SigningKey;
use nix::sys::signal::{kill, Signal};
use nix::unistd::{Pid, User};

const LIMIT: Duration = Duration::from_secs(30);
const BROKER: &str = "nobody";
const TARGET: &str = "daemon";
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

struct World {
    dir: tempfile::TempDir,
    ca: SigningKey,
    node: SigningKey,
    user: SigningKey,
    broker_gid: u32,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn have(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

fn setup() -> Result<World, String> {
    if !nix::unistd::geteuid().is_root() {
        return Err(
            "not root (the helper must be made setuid root and run in a mount namespace)".into(),
        );
    }
    for p in ["setpriv", "unshare", "mount"] {
        if !have(p) {
            return Err(format!("{p} is not installed"));
        }
    }
    let broker = User::from_name(BROKER).unwrap().ok_or("no user nobody")?;
    User::from_name(TARGET).unwrap().ok_or("no user daemon")?;
    let dir = tempfile::Builder::new()
        .prefix("canopy-imp-test")
        .tempdir_in("/tmp")
        .unwrap();
    let flags = nix::sys::statvfs::statvfs(dir.path()).unwrap().flags();
    if flags.contains(nix::sys::statvfs::FsFlags::ST_NOSUID) {
        return Err("/tmp is mounted nosuid".into());
    }
    chmod(dir.path(), 0o755);
    let bin = dir.path().join("canopy-imp");
    std::fs::copy(env!("CARGO_BIN_EXE_canopy-imp"), &bin).unwrap();
    std::os::unix::fs::chown(&bin, Some(0), Some(0)).unwrap();
    chmod(&bin, 0o4755);

    let ca = keys::generate().unwrap();
    let node = keys::generate().unwrap();
    let user = keys::generate().unwrap();
    let etc = dir.path().join("etc");
    std::fs::create_dir(&etc).unwrap();
    chmod(&etc, 0o755);
    std::fs::write(etc.join("ca.pub"), keys::public_text(&ca.verifying_key())).unwrap();
    std::fs::write(etc.join("receipt.key"), keys::secret_text(&node).as_bytes()).unwrap();
    chmod(&etc.join("receipt.key"), 0o600);
    let replay = dir.path().join("replay");
    std::fs::create_dir(&replay).unwrap();
    chmod(&replay, 0o700);
    std::fs::write(
        etc.join("imp.toml"),
        format!(
            "broker_user = \"{BROKER}\"\nusers = [\"{TARGET}\"]\ntrusted_ca_keys = [\"/etc/canopy/ca.pub\"]\nreceipt_key = \"/etc/canopy/receipt.key\"\nreplay_cache = \"{}\"\nmax_request_lifetime = 600\n\n[instances]\nt = 0\n",
            replay.display()
        ),
    )
    .unwrap();
    chmod(&etc.join("imp.toml"), 0o644);
    Ok(World {
        dir,
        ca,
        node,
        user,
        broker_gid: broker.gid.as_raw(),
    })
}

struct Ran {
    records: Vec<(u8, Vec<u8>)>,
    code: Option<i32>,
}

impl Ran {
    fn tagged(&self, tag: u8) -> Vec<u8> {
        self.records
            .iter()
            .filter(|(t, _)| *t == tag)
            .flat_map(|(_, b)| b.clone())
            .collect()
    }
    fn text(&self, tag: u8) -> String {
        String::from_utf8_lossy(&self.tagged(tag)).into_owned()
    }
}

/// Kills the child if the test fails before it is reaped.
struct Reaper(Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

impl World {
    fn cert(&self, user: &str) -> Vec<u8> {
        UserCert::issue(
            CertKind::Ca,
            "someone@TEST",
            user,
            &self.user.verifying_key(),
            now() - 60,
            now() + 600,
            &self.ca,
        )
        .1
    }

    fn request(&self, argv: &[&str]) -> ExecRequest {
        ExecRequest {
            v: 1,
            principal: "someone@TEST".into(),
            argv: argv.iter().map(|s| s.to_string()).collect(),
            cwd: "/".into(),
            env: Default::default(),
            instance: "t".into(),
            ranks: vec![0, 1],
            audience: Audience::User,
            issued_at: now(),
            not_after: now() + 120,
            nonce: new_nonce().unwrap(),
        }
    }

    fn sign(&self, r: &ExecRequest) -> Vec<u8> {
        sign(EXEC_REQUEST_TYPE, &r.to_body(), &self.user)
    }

    /// Start the setuid helper as `invoker` with `args` and `stdin`.
    fn start(
        &self,
        invoker: &str,
        gid: u32,
        args: &[&str],
        stdin: Vec<u8>,
    ) -> (Reaper, mpsc::Receiver<Vec<u8>>) {
        // /etc gets a private overlay (so /etc/canopy can be made without
        // touching the host's), then the test's etc is bound on it.
        let script = r#"d=$0 u=$1 g=$2; shift 2
o=$(mktemp -d -p "$d") && mkdir "$o/u" "$o/w" &&
mount -t overlay overlay -o lowerdir=/etc,upperdir="$o/u",workdir="$o/w" /etc &&
mkdir -p /etc/canopy && mount --bind "$d/etc" /etc/canopy &&
exec setpriv --reuid="$u" --regid="$g" --clear-groups -- "$d/canopy-imp" "$@""#;
        let mut child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", script])
            .arg(self.dir.path())
            .arg(invoker)
            .arg(gid.to_string())
            .args(args)
            .env_clear()
            .env("PATH", PATH)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut input = child.stdin.take().unwrap();
        std::thread::spawn(move || {
            let _ = input.write_all(&stdin);
        });
        let mut out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        (Reaper(child), rx)
    }

    fn finish(&self, mut child: Reaper, rx: mpsc::Receiver<Vec<u8>>, mut out: Vec<u8>) -> Ran {
        let deadline = Instant::now() + LIMIT;
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(b) => out.extend(b),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            assert!(
                Instant::now() < deadline,
                "the helper did not finish in {LIMIT:?}"
            );
        }
        let status = loop {
            if let Some(s) = child.0.try_wait().unwrap() {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "the helper did not exit in {LIMIT:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let records = read_records(&out).unwrap_or_else(|| panic!("bad records: {out:?}"));
        Ran {
            records,
            code: status.code(),
        }
    }

    fn run_as(&self, invoker: &str, gid: u32, cert: &[u8], request: &[u8], stdin: &[u8]) -> Ran {
        let mut input = encode_input(cert, request);
        input.extend_from_slice(stdin);
        let args = [
            "run",
            "--instance",
            "t",
            "--rank",
            "0",
            "--host",
            "h0",
            "--submitter",
            "someone@TEST",
        ];
        let (child, rx) = self.start(invoker, gid, &args, input);
        self.finish(child, rx, Vec::new())
    }

    fn run(&self, cert: &[u8], request: &[u8]) -> Ran {
        self.run_as(BROKER, self.broker_gid, cert, request, b"")
    }

    fn receipt(&self, ran: &Ran) -> canopy_imp::receipt::Receipt {
        let wire = ran.tagged(TAG_RECEIPT);
        assert!(
            !wire.is_empty(),
            "no receipt; refused: {}",
            ran.text(TAG_REFUSED)
        );
        verify_receipt(&wire, &[self.node.verifying_key()])
            .unwrap()
            .0
    }
}

fn refused(ran: &Ran, reason: &str) {
    let why = ran.text(TAG_REFUSED);
    assert!(
        why.contains(reason),
        "expected a refusal with {reason:?}, got {why:?}"
    );
    assert!(why.starts_with("rank 0: "), "{why}");
    assert!(ran.tagged(TAG_STDOUT).is_empty() && ran.tagged(TAG_RECEIPT).is_empty());
    assert_eq!(ran.code, Some(125));
}

#[test]
fn the_setuid_helper_runs_as_the_user_refuses_bad_input_and_signs_receipts() {
    let w = match setup() {
        Ok(w) => w,
        Err(why) => {
            println!("skipped: {why}");
            return;
        }
    };
    let cert = w.cert(TARGET);
    let daemon = User::from_name(TARGET).unwrap().unwrap();

    // `id -un` runs as the target user; the receipt verifies offline.
    let request = w.sign(&w.request(&["id", "-un"]));
    let ran = w.run(&cert, &request);
    assert_eq!(
        ran.text(TAG_STDOUT),
        "daemon\n",
        "refused: {}",
        ran.text(TAG_REFUSED)
    );
    assert_eq!(ran.code, Some(0));
    let r = w.receipt(&ran);
    assert_eq!(r.uid, daemon.uid.as_raw());
    assert_eq!(
        (r.rank, r.host.as_str(), r.exit),
        (0, "h0", Exit::Status(0))
    );
    assert_eq!(r.request_digest, sha256_hex(&request));
    assert_eq!(r.stdout_sha256, sha256_hex(b"daemon\n"));
    assert_eq!(r.stderr_sha256, sha256_hex(b""));
    assert!(r.start <= r.end && r.end <= now());
    // The offline tool agrees; an edited receipt fails.
    let rfile = w.dir.path().join("receipt.json");
    std::fs::write(&rfile, ran.tagged(TAG_RECEIPT)).unwrap();
    let npub = w.dir.path().join("node.pub");
    std::fs::write(&npub, keys::public_text(&w.node.verifying_key())).unwrap();
    let verify = |file: &Path| {
        Command::new(env!("CARGO_BIN_EXE_canopy-imp"))
            .arg("verify-receipt")
            .arg("--node-key")
            .arg(&npub)
            .arg(file)
            .output()
            .unwrap()
    };
    assert!(verify(&rfile).status.success());
    let mut v: serde_json::Value = serde_json::from_slice(&ran.tagged(TAG_RECEIPT)).unwrap();
    let body = String::from_utf8(b64_decode(v["payload"].as_str().unwrap()).unwrap()).unwrap();
    v["payload"] = b64_encode(body.replace("\"uid\":1,", "\"uid\":0,").as_bytes()).into();
    std::fs::write(&rfile, serde_json::to_vec(&v).unwrap()).unwrap();
    let out = verify(&rfile);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad signature on the receipt"));

    // The same request again: replayed.
    refused(&w.run(&cert, &request), "replayed request");

    // Invoked by anyone but the broker's user.
    let fresh = w.sign(&w.request(&["id", "-un"]));
    refused(
        &w.run_as(TARGET, daemon.gid.as_raw(), &cert, &fresh, b""),
        "may be run only by the broker's user nobody",
    );
    // The second stage cannot be started directly by the broker's user.
    let (child, rx) = w.start(BROKER, w.broker_gid, &["_exec"], Vec::new());
    let ran = w.finish(child, rx, Vec::new());
    assert_eq!(ran.code, Some(126));

    // The tools drop to the invoker: no root-owned files for the broker.
    let evil = w.dir.path().join("etc").join("evil");
    let (child, rx) = w.start(
        BROKER,
        w.broker_gid,
        &["keygen", evil.to_str().unwrap()],
        Vec::new(),
    );
    let ran = w.finish(child, rx, Vec::new());
    assert_eq!(ran.code, Some(1));
    assert!(!evil.exists(), "keygen wrote as root for the broker's user");

    // Tampered after signing: argv changed in the captured envelope.
    let mut v: serde_json::Value = serde_json::from_slice(&fresh).unwrap();
    let body = String::from_utf8(b64_decode(v["payload"].as_str().unwrap()).unwrap()).unwrap();
    v["payload"] = b64_encode(body.replace("\"-un\"", "\"-u\"").as_bytes()).into();
    refused(
        &w.run(&cert, &serde_json::to_vec(&v).unwrap()),
        "tampered or forged request",
    );

    // A user imp.toml does not allow, and root.
    // (A refused user still uses up the nonce: the replay check comes first.)
    let fresh = || w.sign(&w.request(&["id", "-un"]));
    refused(
        &w.run(&w.cert("bin"), &fresh()),
        "user bin is not allowed by imp.toml",
    );
    refused(
        &w.run(&w.cert("root"), &fresh()),
        "target user root is always refused",
    );
    // A malformed envelope.
    refused(
        &w.run(&cert, b"{\"payloadType\":"),
        "request: malformed envelope",
    );
    // Wrong rank claimed by the broker (imp.toml pins t to rank 0).
    let input = encode_input(&cert, &w.sign(&w.request(&["true"])));
    let (child, rx) = w.start(
        BROKER,
        w.broker_gid,
        &[
            "run",
            "--instance",
            "t",
            "--rank",
            "1",
            "--submitter",
            "someone@TEST",
        ],
        input,
    );
    let ran = w.finish(child, rx, Vec::new());
    assert!(
        ran.text(TAG_REFUSED).contains("wrong audience"),
        "{}",
        ran.text(TAG_REFUSED)
    );

    // Groups, environment, cwd, stdin after the frames, stderr, exit status.
    let mut req = w.request(&[
        "sh",
        "-c",
        "id -u; id -G; echo \"$FOO $CANOPY_EXEC_RANK $HOME\"; pwd; cat; echo oops >&2; exit 3",
    ]);
    req.env.insert("FOO".into(), "bar".into());
    req.cwd = "/usr".into();
    let ran = w.run_as(BROKER, w.broker_gid, &cert, &w.sign(&req), b"from stdin\n");
    let expect = format!(
        "{uid}\n{gid}\nbar 0 {home}\n/usr\nfrom stdin\n",
        uid = daemon.uid,
        gid = daemon.gid,
        home = daemon.dir.display()
    );
    assert_eq!(
        ran.text(TAG_STDOUT),
        expect,
        "refused: {}",
        ran.text(TAG_REFUSED)
    );
    assert_eq!(ran.text(TAG_STDERR), "oops\n");
    assert_eq!(ran.code, Some(3));
    let r = w.receipt(&ran);
    assert_eq!(r.exit, Exit::Status(3));
    assert_eq!(r.stderr_sha256, sha256_hex(b"oops\n"));

    // Signals from the broker reach the command and what it started:
    // SIGTERM as itself, SIGUSR1 as SIGKILL (which cannot be caught).
    for (sig, expect) in [(Signal::SIGTERM, 15), (Signal::SIGUSR1, 9)] {
        let req = w.request(&["sh", "-c", "sleep 30 & echo started; wait"]);
        let input = encode_input(&cert, &w.sign(&req));
        let args = [
            "run",
            "--instance",
            "t",
            "--rank",
            "0",
            "--submitter",
            "someone@TEST",
        ];
        let (child, rx) = w.start(BROKER, w.broker_gid, &args, input);
        let mut out = Vec::new();
        let deadline = Instant::now() + LIMIT;
        while !String::from_utf8_lossy(&out).contains("started") {
            assert!(Instant::now() < deadline, "the command did not start");
            if let Ok(b) = rx.recv_timeout(Duration::from_millis(100)) {
                out.extend(b);
            }
        }
        let t = Instant::now();
        kill(Pid::from_raw(child.0.id() as i32), sig).unwrap();
        let ran = w.finish(child, rx, out);
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{sig} was not forwarded"
        );
        assert_eq!(w.receipt(&ran).exit, Exit::Signal(expect), "{sig}");
        assert_eq!(ran.code, Some(128 + expect));
        let left = Command::new("pgrep")
            .args(["-u", TARGET, "-f", "sleep 30"])
            .output()
            .unwrap();
        assert!(
            left.stdout.is_empty(),
            "left running: {}",
            String::from_utf8_lossy(&left.stdout)
        );
    }
}
