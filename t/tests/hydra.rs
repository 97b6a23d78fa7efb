//! Launching through MPICH's hydra (PMI-1), as docs/operations.md shows:
//! `mpiexec -n 8 canopy broker --rundir DIR` forms one instance, every rank
//! answers through `local://DIR/local-0`, and ending mpiexec ends every
//! broker.
#![forbid(unsafe_code)]

use canopy_client::Client;
use canopy_t::{canopy_bin, process_alive, run_command, run_test, text, wait_until, RPC_TIMEOUT};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(120);
const SIZE: u32 = 8;
/// Set in mpiexec's environment, which hydra passes to its proxy and to
/// every broker: finds them all in /proc, whatever their process group.
const MARK_VAR: &str = "CANOPY_T_HYDRA";

/// Marks of the jobs running now, so that a test that overruns its limit
/// (and so never drops its guard) still has them killed.
static LIVE: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn live() -> std::sync::MutexGuard<'static, Vec<String>> {
    LIVE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// MPICH's hydra mpiexec, or why there is none. `mpiexec` may be another
/// MPI's (Open MPI speaks PMIx, not PMI-1), so prefer the explicit names.
fn hydra_mpiexec() -> Result<PathBuf, String> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut seen = Vec::new();
    for name in ["mpiexec.mpich", "mpiexec.hydra", "mpiexec"] {
        for dir in std::env::split_paths(&path) {
            let p = dir.join(name);
            if !p.is_file() {
                continue;
            }
            let o = run_command(Command::new(&p).arg("--version"), Duration::from_secs(20));
            if text(&o.stdout).contains("HYDRA") {
                return Ok(p);
            }
            seen.push(p.display().to_string());
        }
    }
    if seen.is_empty() {
        Err("mpiexec is not installed (Debian package mpich)".into())
    } else {
        Err(format!(
            "no MPICH hydra mpiexec (found {}, not hydra; install the Debian package mpich)",
            seen.join(", ")
        ))
    }
}

/// Live processes whose environment carries `MARK_VAR=mark`.
fn marked(mark: &str) -> Vec<i32> {
    let needle = format!("{MARK_VAR}={mark}").into_bytes();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .map(|env| env.split(|&b| b == 0).any(|kv| kv == needle.as_slice()))
                .unwrap_or(false)
                && process_alive(pid)
        })
        .collect()
}

/// `canopy broker` processes among `pids` (not mpiexec, whose arguments
/// say the same): `canopy broker`, or the `canopy-broker` next to it that
/// it hands over to.
fn brokers(pids: &[i32]) -> Vec<i32> {
    let bin = canopy_bin();
    let bins =
        [bin.with_file_name("canopy-broker"), bin].map(|b| b.into_os_string().into_encoded_bytes());
    pids.iter()
        .copied()
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .map(|c| {
                    let argv: Vec<&[u8]> = c.split(|&b| b == 0).collect();
                    argv.len() > 1
                        && bins.iter().any(|b| argv[0] == b.as_slice())
                        && argv[1] == b"broker"
                })
                .unwrap_or(false)
        })
        .collect()
}

/// SIGKILL every process of the job (mpiexec, proxy, brokers).
fn kill_marked(mark: &str) {
    for _ in 0..50 {
        let pids = marked(mark);
        if pids.is_empty() {
            return;
        }
        for p in pids {
            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `mpiexec -n SIZE canopy broker --rundir DIR`, ended on drop.
struct Hydra {
    child: Child,
    pid: i32,
    mark: String,
    rundir: PathBuf,
    log: PathBuf,
    status: Option<ExitStatus>,
    stopped: bool,
}

impl Hydra {
    /// The job's files go in `dir`, whose path also marks its processes.
    fn start(mpiexec: &Path, size: u32, dir: &Path) -> Hydra {
        let rundir = dir.join("instance");
        let log = dir.join("mpiexec.log");
        let mark = dir.display().to_string();
        let f = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(mpiexec);
        cmd.arg("-n")
            .arg(size.to_string())
            .arg(canopy_bin())
            .arg("broker")
            .arg("--rundir")
            .arg(&rundir)
            .env_remove("CANOPY_URI")
            .env_remove("CANOPY_BROKER")
            .env("RUST_LOG", "warn")
            .env(MARK_VAR, &mark)
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .process_group(0);
        live().push(mark.clone());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
        Hydra {
            pid: child.id() as i32,
            child,
            mark,
            rundir,
            log,
            status: None,
            stopped: false,
        }
    }

    fn log(&self) -> String {
        std::fs::read(&self.log)
            .map(|b| text(&b))
            .unwrap_or_default()
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// SIGTERM to mpiexec; after `grace`, SIGKILL to its process group.
    /// Then every process of the job still alive is SIGKILLed. Returns
    /// mpiexec's exit status if it exited by itself. Never panics.
    fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        let mut graceful = self.status;
        if self.exited().is_none() {
            let _ = kill(Pid::from_raw(self.pid), Signal::SIGTERM);
            wait_until(grace, || self.exited().is_some());
            graceful = self.status;
        }
        if !self.stopped {
            // Whatever is left of mpiexec's group (the group outlives a
            // reaped leader only while members remain).
            let _ = killpg(Pid::from_raw(self.pid), Signal::SIGKILL);
            self.stopped = true;
        }
        if self.status.is_none() {
            self.status = self.child.wait().ok();
        }
        kill_marked(&self.mark);
        graceful
    }
}

impl Drop for Hydra {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
        let mark = self.mark.clone();
        live().retain(|m| *m != mark);
    }
}

/// `overlay.status` from rank 0 through `local://DIR/local-0`, if it
/// answers.
fn status(uri: &str) -> Option<serde_json::Value> {
    let mut c = Client::connect(Some(uri)).ok()?;
    let m = c.rpc("overlay.status", 0, b"", RPC_TIMEOUT).ok()?;
    serde_json::from_slice(&m.payload).ok()
}

#[test]
fn mpiexec_launches_an_instance_where_every_rank_answers() {
    let mpiexec = match hydra_mpiexec() {
        Ok(p) => p,
        Err(why) => {
            println!("skipped: hydra: {why}");
            return;
        }
    };
    // The temp dir outlives the body, so it goes even if the body hangs.
    let tmp = tempfile::Builder::new()
        .prefix("canopy-t-hydra-")
        .tempdir()
        .unwrap();
    let dir = tmp.path().to_path_buf();
    let res = std::panic::catch_unwind(|| run_test(LIMIT, move || body(&mpiexec, &dir)));
    // A body that overran its limit never dropped its guard.
    for mark in std::mem::take(&mut *live()) {
        kill_marked(&mark);
    }
    drop(tmp);
    if let Err(panic) = res {
        std::panic::resume_unwind(panic);
    }
}

fn body(mpiexec: &Path, dir: &Path) {
    let mut job = Hydra::start(mpiexec, SIZE, dir);
    let uri = format!("local://{}", job.rundir.join("local-0").display());

    // Poll rank 0 until the whole instance is online.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = None;
    loop {
        if let Some(st) = job.exited() {
            panic!(
                "mpiexec exited ({st}) before the instance came up:\n{}",
                job.log()
            );
        }
        if let Some(s) = status(&uri) {
            let full = s["online"] == SIZE;
            last = Some(s);
            if full {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "rank 0 never reported {SIZE} online; last overlay.status: {}\nmpiexec log:\n{}",
            last.map(|s| s.to_string()).unwrap_or_else(|| "none".into()),
            job.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let s = last.unwrap();
    assert_eq!(s["size"], SIZE, "{s}");
    assert_eq!(s["online"], SIZE, "{s}");
    assert_eq!(s["health"], "full", "{s}");
    // The instance id is the PMI kvsname hydra gave it.
    let instance = s["broker"]["instance"].as_str().unwrap_or_default();
    assert!(
        instance.starts_with("kvs_"),
        "instance id {instance:?}: {s}"
    );
    let ranks = s["ranks"].as_array().expect("ranks");
    assert_eq!(ranks.len(), SIZE as usize, "{s}");
    assert!(ranks.iter().all(|r| r["state"] == "online"), "{s}");

    // Every rank answers a ping routed from rank 0.
    let mut c = Client::connect(Some(&uri)).unwrap();
    for rank in 0..SIZE {
        let payload = format!("hydra ping {rank}").into_bytes();
        let m = c
            .rpc("broker.ping", rank, &payload, RPC_TIMEOUT)
            .unwrap_or_else(|e| panic!("rank {rank} did not answer: {e}\n{}", job.log()));
        assert_eq!(m.header.nodeid, rank);
        assert_eq!(m.header.errnum, 0);
        assert_eq!(m.payload, payload);
    }
    // One broker per rank, all launched by this mpiexec.
    let pids = brokers(&marked(&job.mark));
    assert_eq!(pids.len(), SIZE as usize, "brokers: {pids:?}");
    drop(c);

    // SIGTERM to mpiexec ends the job; nothing may be left.
    let graceful = job.stop(Duration::from_secs(10));
    assert!(
        wait_until(Duration::from_secs(5), || pids
            .iter()
            .all(|&p| !process_alive(p))),
        "brokers left after mpiexec ended: {:?}",
        pids.iter()
            .filter(|&&p| process_alive(p))
            .collect::<Vec<_>>()
    );
    assert!(
        marked(&job.mark).is_empty(),
        "processes of the job left: {:?}",
        marked(&job.mark)
    );
    assert!(
        graceful.is_some(),
        "mpiexec did not exit within 10 s of SIGTERM (killed it)\n{}",
        job.log()
    );
}

/// `mpiexec -n 4 canopy start -- COMMAND`: each task is a broker (PMI-1),
/// rank 0 runs the command, and mpiexec returns its exit status.
#[test]
fn mpiexec_canopy_start_runs_the_command_and_returns_its_status() {
    let mpiexec = match hydra_mpiexec() {
        Ok(p) => p,
        Err(why) => {
            println!("skipped: hydra: {why}");
            return;
        }
    };
    let tmp = tempfile::Builder::new()
        .prefix("canopy-t-hydra-start-")
        .tempdir()
        .unwrap();
    let dir = tmp.path().to_path_buf();
    let mark = dir.display().to_string();
    live().push(mark.clone());
    let res = std::panic::catch_unwind(|| {
        let dir = dir.clone();
        run_test(LIMIT, move || {
            let bin = canopy_bin().display().to_string();
            let script = format!("{bin} ping --rank 3 --count 2 && exit 3");
            let mut cmd = Command::new(&mpiexec);
            cmd.args(["-n", "4"])
                .arg(&bin)
                .args(["start", "--rundir"])
                .arg(&dir)
                .args(["--", "sh", "-c", &script])
                .env_remove("CANOPY_URI")
                .env(MARK_VAR, dir.display().to_string())
                .process_group(0);
            let t0 = Instant::now();
            let out = run_command(&mut cmd, Duration::from_secs(60));
            println!("mpiexec -n 4 canopy start: {:?}", t0.elapsed());
            let stdout = text(&out.stdout);
            assert_eq!(
                out.status.code(),
                Some(3),
                "{}\n{stdout}\n{}",
                out.status,
                text(&out.stderr)
            );
            assert_eq!(
                stdout
                    .lines()
                    .filter(|l| l.starts_with("broker.ping rank=3 "))
                    .count(),
                2,
                "{stdout}"
            );
            let mark = dir.display().to_string();
            assert!(
                wait_until(Duration::from_secs(5), || marked(&mark).is_empty()),
                "processes left: {:?}",
                marked(&mark)
            );
            let left: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().collect();
            assert!(left.is_empty(), "left in the runtime dir: {left:?}");
        })
    });
    // Only this test's processes: the other test may still run.
    live().retain(|m| *m != mark);
    kill_marked(&mark);
    drop(tmp);
    if let Err(panic) = res {
        std::panic::resume_unwind(panic);
    }
}
