//! PMI under a real Slurm (the `canopy_t::slurm` harness: munged,
//! slurmctld and slurmd from a temp dir). The probe (`pmi-probe`) uses
//! `canopy_pmi::from_env`, as a broker will.
//!
//! The `canopy_start_*` tests run `canopy start` under srun: each task one
//! broker (PMI-2, and PMIx through libpmix).
//!
//! `pmi2_across_four_nodes_in_network_namespaces` runs one slurmd per
//! network namespace (`canopy_t::netns`), so the tasks of one job really sit
//! on four addresses.
//!
//! Needs root and Debian's munge, slurmctld, slurmd and slurm-client
//! (scripts/deps.sh installs them); without them each test prints
//! `skipped: <test>: <reason>`.

use canopy_t::netns::{self, Net};
use canopy_t::run_test;
use canopy_t::slurm::{can_run, Slurm};
use canopy_t::{process_alive, text, wait_until};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(90);
const SRUN_LIMIT: Duration = Duration::from_secs(45);

fn probe() -> &'static str {
    env!("CARGO_BIN_EXE_pmi-probe")
}

/// A probe line's fields: `key=value` after `probe`.
fn fields(line: &str) -> BTreeMap<String, String> {
    line.split_whitespace()
        .skip(1)
        .filter_map(|t| t.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Checks that `n` probe lines came from ranks 0..n, each with the same
/// `n` values, value r being `v<r>.<pid>`; returns the fields of rank 0.
fn check_probe_lines(stdout: &str, n: u32, version: &str) -> BTreeMap<String, String> {
    let lines: Vec<&str> = stdout.lines().filter(|l| l.starts_with("probe ")).collect();
    assert_eq!(lines.len(), n as usize, "one line per rank:\n{stdout}");
    let mut by_rank = BTreeMap::new();
    for l in &lines {
        let f = fields(l);
        assert_eq!(f["size"], n.to_string(), "{l}");
        assert_eq!(f["version"], version, "{l}");
        let rank: u32 = f["rank"].parse().unwrap();
        assert!(
            by_rank.insert(rank, f).is_none(),
            "rank {rank} twice:\n{stdout}"
        );
    }
    assert_eq!(
        by_rank.keys().copied().collect::<Vec<_>>(),
        (0..n).collect::<Vec<_>>()
    );
    let values = by_rank[&0]["values"].clone();
    let parsed: Vec<(u32, String)> = values
        .split(',')
        .map(|kv| {
            let (r, v) = kv.split_once(':').expect("rank:value");
            (r.parse().unwrap(), v.to_string())
        })
        .collect();
    assert_eq!(parsed.len(), n as usize, "{values}");
    for (i, (r, v)) in parsed.iter().enumerate() {
        assert_eq!(*r, i as u32);
        assert!(v.starts_with(&format!("v{r}.")), "rank {r}'s value is {v}");
    }
    for (rank, f) in &by_rank {
        assert_eq!(f["values"], values, "rank {rank} saw other values");
        assert_eq!(f["job"], by_rank[&0]["job"], "one job id");
    }
    by_rank[&0].clone()
}

/// `pid (command line)` for each pid, for failure messages.
fn describe(pids: &[i32]) -> String {
    pids.iter()
        .map(|p| {
            let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            format!("{p} ({})", text(&cmd).replace('\0', " ").trim())
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[test]
fn harness_starts_quickly_and_leaves_nothing_behind() {
    if !can_run("harness_starts_quickly_and_leaves_nothing_behind") {
        return;
    }
    run_test(LIMIT, || {
        let t0 = Instant::now();
        let mut slurm = Slurm::start();
        let took = t0.elapsed();
        println!(
            "slurm harness: idle after {took:?} (harness's own count {:?})",
            slurm.started_in()
        );
        assert!(took < Duration::from_secs(5), "took {took:?}");
        let out = slurm.srun(&["-n", "2", "hostname"], &[], SRUN_LIMIT);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout).lines().count(), 2);
        let dir = slurm.dir().to_path_buf();
        let pids: Vec<i32> = ["munged.pid", "slurmctld.pid", "slurmd-n0.pid"]
            .iter()
            .map(|f| {
                std::fs::read_to_string(dir.join(f))
                    .unwrap_or_else(|e| panic!("{f}: {e}"))
                    .trim()
                    .parse()
                    .unwrap()
            })
            .collect();
        assert!(pids.iter().all(|&p| process_alive(p)));
        let t1 = Instant::now();
        slurm.stop();
        println!("slurm harness: stopped in {:?}", t1.elapsed());
        assert!(
            pids.iter().all(|&p| !process_alive(p)),
            "a daemon outlived stop"
        );
        let left = slurm.job_processes();
        assert!(left.is_empty(), "left behind: {}", describe(&left));
        drop(slurm);
        assert!(!dir.exists(), "{} is left behind", dir.display());
    });
}

#[test]
fn pmi2_under_srun_eight_ranks_see_every_value() {
    if !can_run("pmi2_under_srun_eight_ranks_see_every_value") {
        return;
    }
    run_test(LIMIT, || {
        let slurm = Slurm::start();
        let t0 = Instant::now();
        let out = slurm.srun(&["-n", "8", "--mpi=pmi2", probe()], &[], SRUN_LIMIT);
        let stdout = text(&out.stdout);
        assert!(
            out.status.success(),
            "srun failed ({}):\n{stdout}\n{}\n{}",
            out.status,
            text(&out.stderr),
            slurm.logs()
        );
        println!("srun -n 8 --mpi=pmi2 pmi-probe: {:?}", t0.elapsed());
        let f = check_probe_lines(&stdout, 8, "pmi-2");
        // The PMI-2 job id is Slurm's `<job>.<step>`.
        assert!(
            f["job"].starts_with(&format!("{}.", f["slurm_job"])),
            "job id {} vs slurm job {}",
            f["job"],
            f["slurm_job"]
        );
    });
}

#[test]
fn pmi1_under_srun_when_forced() {
    if !can_run("pmi1_under_srun_when_forced") {
        return;
    }
    run_test(LIMIT, || {
        let slurm = Slurm::start();
        let out = slurm.srun(
            &["-n", "8", "--mpi=pmi2", probe()],
            &[("CANOPY_PMI", "1")],
            SRUN_LIMIT,
        );
        let stdout = text(&out.stdout);
        assert!(
            out.status.success(),
            "srun failed ({}):\n{stdout}\n{}\n{}",
            out.status,
            text(&out.stderr),
            slurm.logs()
        );
        check_probe_lines(&stdout, 8, "pmi-1");
    });
}

#[test]
fn srun_without_mpi_is_a_clear_error() {
    if !can_run("srun_without_mpi_is_a_clear_error") {
        return;
    }
    run_test(LIMIT, || {
        let slurm = Slurm::start();
        let out = slurm.srun(&["-n", "3", probe()], &[], SRUN_LIMIT);
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(text(&out.stdout).is_empty(), "{}", text(&out.stdout));
        for r in 0..3 {
            let line = stderr
                .lines()
                .find(|l| l.contains(&format!("rank {r} of 3")))
                .unwrap_or_else(|| panic!("no error naming rank {r}:\n{stderr}"));
            assert!(line.contains("srun --mpi=pmi2"), "{line}");
            println!("{line}");
        }
    });
}

/// `srun --mpi=pmix`'s plugin, or a panic saying how to get it.
fn require_pmix(slurm: &Slurm) {
    let list = slurm.srun(&["--mpi=list"], &[], SRUN_LIMIT);
    let plugins = text(&list.stdout) + &text(&list.stderr);
    if !plugins.contains("pmix") {
        panic!("srun --mpi=list offers no pmix; install libpmix-dev (scripts/deps.sh does):\n{plugins}");
    }
}

#[test]
fn pmix_under_srun_eight_ranks_see_every_value() {
    if !can_run("pmix_under_srun_eight_ranks_see_every_value") {
        return;
    }
    run_test(LIMIT, || {
        let slurm = Slurm::start();
        require_pmix(&slurm);
        let t0 = Instant::now();
        let out = slurm.srun(&["-n", "8", "--mpi=pmix", probe()], &[], SRUN_LIMIT);
        let stdout = text(&out.stdout);
        assert!(
            out.status.success(),
            "srun failed ({}):\n{stdout}\n{}\n{}",
            out.status,
            text(&out.stderr),
            slurm.logs()
        );
        println!("srun -n 8 --mpi=pmix pmi-probe: {:?}", t0.elapsed());
        let f = check_probe_lines(&stdout, 8, "pmix");
        // The PMIx namespace is Slurm's `slurm.pmix.<job>.<step>`.
        assert!(
            f["job"].contains(&format!(".{}.", f["slurm_job"])),
            "namespace {} vs slurm job {}",
            f["job"],
            f["slurm_job"]
        );
    });
}

#[test]
fn scancel_ends_every_task_within_two_seconds() {
    if !can_run("scancel_ends_every_task_within_two_seconds") {
        return;
    }
    run_test(LIMIT, || {
        let slurm = Slurm::start();
        let mut job = slurm.spawn_srun(&["-n", "8", "--mpi=pmi2", probe(), "--hold"], &[]);
        let lines = job
            .wait_lines(8, SRUN_LIMIT, |l| l.starts_with("holding "))
            .to_vec();
        let holding = lines.iter().filter(|l| l.starts_with("holding ")).count();
        if holding < 8 {
            job.wait(Duration::from_secs(1));
            let (_, err) = job.output();
            panic!(
                "only {holding} of 8 tasks wired up:\n{}\n{err}\n{}",
                lines.join("\n"),
                slurm.logs()
            );
        }
        let f = fields(lines.iter().find(|l| l.starts_with("probe ")).unwrap());
        let jobid = f["slurm_job"].clone();
        let tasks: Vec<i32> = slurm
            .job_processes()
            .into_iter()
            .filter(|&p| {
                std::fs::read_link(format!("/proc/{p}/exe")).is_ok_and(|e| e.ends_with("pmi-probe"))
            })
            .collect();
        assert_eq!(tasks.len(), 8, "8 probe processes: {tasks:?}");

        let t0 = Instant::now();
        let mut scancel = slurm.command("scancel");
        scancel.arg(&jobid);
        let out = canopy_t::run_command(&mut scancel, Duration::from_secs(10));
        assert!(out.status.success(), "scancel: {}", text(&out.stderr));
        let gone = wait_until(Duration::from_secs(2), || {
            tasks.iter().all(|&p| !process_alive(p))
        });
        let took = t0.elapsed();
        println!("scancel: every task gone after {took:?}");
        assert!(
            gone,
            "tasks still alive 2 s after scancel: {:?}",
            tasks
                .iter()
                .filter(|&&p| process_alive(p))
                .collect::<Vec<_>>()
        );
        let st = job
            .wait(Duration::from_secs(5))
            .expect("srun exits after scancel");
        assert!(!st.success(), "srun of a cancelled job fails: {st}");
        assert!(
            wait_until(Duration::from_secs(5), || slurm.job_processes().is_empty()),
            "job processes left: {}",
            describe(&slurm.job_processes())
        );
    });
}

#[test]
fn pmi2_across_four_nodes_in_network_namespaces() {
    let name = "pmi2_across_four_nodes_in_network_namespaces";
    if !can_run(name) || !netns::can_run(name) {
        return;
    }
    netns::run_test(LIMIT, || {
        let net = Net::new(4).expect("network namespaces");
        let t0 = Instant::now();
        let slurm = Slurm::start_in(&net);
        println!("4-node slurm in namespaces: idle after {:?}", t0.elapsed());
        let t1 = Instant::now();
        let out = slurm.srun(
            &[
                "-N",
                "4",
                "-n",
                "8",
                "--ntasks-per-node=2",
                "--mpi=pmi2",
                probe(),
            ],
            &[],
            SRUN_LIMIT,
        );
        let stdout = text(&out.stdout);
        assert!(
            out.status.success(),
            "srun failed ({}):\n{stdout}\n{}\n{}",
            out.status,
            text(&out.stderr),
            slurm.logs()
        );
        println!("srun -N 4 -n 8 --mpi=pmi2 pmi-probe: {:?}", t1.elapsed());
        check_probe_lines(&stdout, 8, "pmi-2");
        let mut per_node: BTreeMap<String, u32> = BTreeMap::new();
        let mut netns_of: BTreeMap<String, String> = BTreeMap::new();
        for l in stdout.lines().filter(|l| l.starts_with("probe ")) {
            let f = fields(l);
            *per_node.entry(f["node"].clone()).or_default() += 1;
            let prev = netns_of.insert(f["node"].clone(), f["netns"].clone());
            assert!(
                prev.is_none_or(|p| p == f["netns"]),
                "{l}: one namespace per node"
            );
        }
        let mine = std::fs::read_link("/proc/self/ns/net")
            .unwrap()
            .display()
            .to_string();
        let distinct: std::collections::BTreeSet<&String> = netns_of.values().collect();
        assert_eq!(distinct.len(), 4, "four network namespaces: {netns_of:?}");
        assert!(
            !distinct.contains(&mine),
            "no task in the test's own namespace"
        );
        assert_eq!(
            per_node.into_iter().collect::<Vec<_>>(),
            (0..4).map(|i| (format!("node{i}"), 2)).collect::<Vec<_>>(),
            "two tasks on each of the four nodes"
        );
    });
}

#[test]
fn a_fence_that_never_completes_times_out_naming_the_rank() {
    if !can_run("a_fence_that_never_completes_times_out_naming_the_rank") {
        return;
    }
    run_test(LIMIT, || {
        let slurm = Slurm::start();
        let t0 = Instant::now();
        // Rank 2 never fences; -K ends the step once a rank fails.
        let out = slurm.srun(
            &["-n", "3", "-K", "--mpi=pmi2", probe(), "--stall", "2"],
            &[("CANOPY_PMI_TIMEOUT", "1")],
            SRUN_LIMIT,
        );
        let took = t0.elapsed();
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(took < Duration::from_secs(20), "srun took {took:?}");
        for r in [0, 1] {
            let line = stderr
                .lines()
                .find(|l| {
                    l.contains(&format!(
                        "rank {r}: pmi `kvs-fence` got no answer within 1s"
                    ))
                })
                .unwrap_or_else(|| panic!("no timeout naming rank {r}:\n{stderr}"));
            assert!(line.contains("CANOPY_PMI_TIMEOUT"), "{line}");
            println!("{line}");
        }
    });
}

// ----- canopy start under srun -----

fn canopy() -> String {
    canopy_t::canopy_bin().display().to_string()
}

/// The `canopy` processes (brokers) among the cluster's job processes
/// (`canopy start` under srun runs its broker in itself; `canopy-broker`
/// too, should it ever hand over).
fn brokers(slurm: &Slurm) -> Vec<i32> {
    slurm
        .job_processes()
        .into_iter()
        .filter(|&p| {
            std::fs::read_link(format!("/proc/{p}/exe")).is_ok_and(|e| {
                e.file_name()
                    .is_some_and(|n| n == "canopy" || n == "canopy-broker")
            })
        })
        .collect()
}

fn fail_with(slurm: &Slurm, out: &std::process::Output) -> String {
    format!(
        "srun: {}\nstdout:\n{}\nstderr:\n{}\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr),
        slurm.logs()
    )
}

#[test]
fn canopy_start_under_srun_pmi2_pings_rank_7() {
    if !can_run("canopy_start_under_srun_pmi2_pings_rank_7") {
        return;
    }
    run_test(LIMIT, || start_and_ping_rank_7("--mpi=pmi2"));
}

#[test]
fn canopy_start_under_srun_pmix_pings_rank_7() {
    if !can_run("canopy_start_under_srun_pmix_pings_rank_7") {
        return;
    }
    run_test(LIMIT, || start_and_ping_rank_7("--mpi=pmix"));
}

/// `srun -n 8 MPI canopy start -- canopy ping --rank 7 --count 3`.
fn start_and_ping_rank_7(mpi: &str) {
    let slurm = Slurm::start();
    if mpi == "--mpi=pmix" {
        require_pmix(&slurm);
    }
    let rundir = tempfile::tempdir().unwrap();
    let bin = canopy();
    let t0 = Instant::now();
    let out = slurm.srun(
        &[
            "-n",
            "8",
            mpi,
            &bin,
            "start",
            "--rundir",
            rundir.path().to_str().unwrap(),
            "--",
            &bin,
            "ping",
            "--rank",
            "7",
            "--count",
            "3",
        ],
        &[],
        SRUN_LIMIT,
    );
    println!(
        "srun -n 8 {mpi} canopy start -- canopy ping --rank 7: {:?}",
        t0.elapsed()
    );
    assert!(out.status.success(), "{}", fail_with(&slurm, &out));
    let stdout = text(&out.stdout);
    let pings: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("broker.ping rank=7 "))
        .collect();
    assert_eq!(pings.len(), 3, "{stdout}");
    assert!(stdout.contains("3 sent, 3 received"), "{stdout}");
    assert!(
        wait_until(Duration::from_secs(5), || brokers(&slurm).is_empty()),
        "brokers left: {}",
        describe(&brokers(&slurm))
    );
    let left: Vec<_> = std::fs::read_dir(rundir.path())
        .unwrap()
        .flatten()
        .collect();
    assert!(left.is_empty(), "left in the runtime dir: {left:?}");
}

#[test]
fn canopy_start_under_srun_the_commands_exit_status_propagates() {
    if !can_run("canopy_start_under_srun_the_commands_exit_status_propagates") {
        return;
    }
    run_test(LIMIT, || {
        let slurm = Slurm::start();
        let bin = canopy();
        let t0 = Instant::now();
        let out = slurm.srun(
            &[
                "-n",
                "4",
                "--mpi=pmi2",
                &bin,
                "start",
                "--",
                "sh",
                "-c",
                "exit 3",
            ],
            &[],
            SRUN_LIMIT,
        );
        println!("exit 3 under srun -n 4: {:?}", t0.elapsed());
        assert_eq!(out.status.code(), Some(3), "{}", fail_with(&slurm, &out));
        // Every task exited with 3, not only rank 0: srun -l reports each
        // task that failed, and nothing failed otherwise.
        let stderr = text(&out.stderr);
        assert!(!stderr.contains("error: rank"), "{stderr}");
        let out = slurm.srun(
            &["-n", "2", "--mpi=pmi2", &bin, "start", "--", "true"],
            &[],
            SRUN_LIMIT,
        );
        assert!(out.status.success(), "{}", fail_with(&slurm, &out));
        assert!(
            wait_until(Duration::from_secs(5), || brokers(&slurm).is_empty()),
            "brokers left: {}",
            describe(&brokers(&slurm))
        );
    });
}

#[test]
fn canopy_start_under_srun_scancel_ends_every_broker_within_two_seconds() {
    if !can_run("canopy_start_under_srun_scancel_ends_every_broker_within_two_seconds") {
        return;
    }
    run_test(LIMIT, || {
        let slurm = Slurm::start();
        let rundir = tempfile::tempdir().unwrap();
        let bin = canopy();
        let mut job = slurm.spawn_srun(
            &[
                "-n",
                "8",
                "--mpi=pmi2",
                &bin,
                "start",
                "--rundir",
                rundir.path().to_str().unwrap(),
            ],
            &[],
        );
        let lines = job
            .wait_lines(1, SRUN_LIMIT, |l| l.starts_with("export CANOPY_URI="))
            .to_vec();
        let Some(uri) = lines
            .iter()
            .find_map(|l| l.strip_prefix("export CANOPY_URI="))
            .map(str::to_string)
        else {
            job.wait(Duration::from_secs(1));
            let (_, err) = job.output();
            panic!(
                "no CANOPY_URI from rank 0:\n{}\n{err}\n{}",
                lines.join("\n"),
                slurm.logs()
            );
        };
        assert!(
            lines.iter().any(|l| l.contains("8 brokers up")),
            "{lines:?}"
        );
        // The instance works from outside the job, on rank 0's node.
        let mut status = std::process::Command::new(&bin);
        status.args(["overlay", "status"]).env("CANOPY_URI", &uri);
        let st = canopy_t::run_command(&mut status, Duration::from_secs(10));
        assert!(st.status.success(), "{}", text(&st.stderr));
        let tree = text(&st.stdout);
        assert!(tree.contains("8 of 8 online"), "{tree}");
        assert!(tree.contains(" on n0"), "hosts named: {tree}");

        let pids = brokers(&slurm);
        assert_eq!(pids.len(), 8, "8 brokers: {}", describe(&pids));
        let jobid = slurm_job_of(pids[0]);
        let t0 = Instant::now();
        let mut scancel = slurm.command("scancel");
        scancel.arg(&jobid);
        let out = canopy_t::run_command(&mut scancel, Duration::from_secs(10));
        assert!(out.status.success(), "scancel: {}", text(&out.stderr));
        let gone = wait_until(Duration::from_secs(2), || {
            pids.iter().all(|&p| !process_alive(p))
        });
        println!("scancel: every broker gone after {:?}", t0.elapsed());
        assert!(
            gone,
            "brokers alive 2 s after scancel: {}",
            describe(
                &pids
                    .iter()
                    .copied()
                    .filter(|&p| process_alive(p))
                    .collect::<Vec<_>>()
            )
        );
        job.wait(Duration::from_secs(5)).expect("srun exits");
        assert!(
            wait_until(Duration::from_secs(5), || slurm.job_processes().is_empty()),
            "job processes left: {}",
            describe(&slurm.job_processes())
        );
        let left: Vec<_> = std::fs::read_dir(rundir.path())
            .unwrap()
            .flatten()
            .collect();
        assert!(left.is_empty(), "left in the runtime dir: {left:?}");
    });
}

/// `SLURM_JOB_ID` from a task's environment.
fn slurm_job_of(pid: i32) -> String {
    let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    text(&env)
        .split('\0')
        .find_map(|kv| kv.strip_prefix("SLURM_JOB_ID="))
        .map(str::to_string)
        .unwrap_or_else(|| panic!("pid {pid} has no SLURM_JOB_ID"))
}

#[test]
fn canopy_start_under_srun_bad_input_names_the_rank_and_the_fix() {
    if !can_run("canopy_start_under_srun_bad_input_names_the_rank_and_the_fix") {
        return;
    }
    run_test(LIMIT, || {
        let slurm = Slurm::start();
        let bin = canopy();
        let check = |args: &[&str], want: &[&str], ranks: u32| {
            let mut all = vec![];
            all.extend_from_slice(args);
            let out = slurm.srun(&all, &[], SRUN_LIMIT);
            let stderr = text(&out.stderr);
            assert!(!out.status.success(), "{args:?} succeeded:\n{stderr}");
            // ranks 0: the job is aborted at the first error, so some
            // rank, not every one, says it.
            let named: Vec<String> = if ranks == 0 {
                vec!["rank ".to_string()]
            } else {
                (0..ranks).map(|r| format!("rank {r}")).collect()
            };
            for r in named {
                let line = stderr
                    .lines()
                    .find(|l| l.contains(&r) && want.iter().all(|w| l.contains(w)))
                    .unwrap_or_else(|| {
                        panic!("{args:?}: no error naming {r} and {want:?}:\n{stderr}")
                    });
                println!("{line}");
            }
        };
        // An interface hint that matches no address (TEST-NET-3).
        check(
            &[
                "-n",
                "2",
                "--mpi=pmi2",
                &bin,
                "start",
                "--interface",
                "203.0.113.0/24",
                "--",
                "true",
            ],
            &[
                "--interface 203.0.113.0/24",
                "no address of this host",
                "pass --interface",
            ],
            2,
        );
        check(
            &[
                "-n",
                "2",
                "--mpi=pmi2",
                &bin,
                "start",
                "--interface",
                "nosuch0",
                "--",
                "true",
            ],
            &["no interface is called nosuch0"],
            2,
        );
        // srun without --mpi: no PMI is offered.
        check(
            &["-n", "3", &bin, "start", "--", "true"],
            &["srun --mpi=pmi2"],
            3,
        );
        // --size that disagrees with the number of tasks.
        check(
            &[
                "-n",
                "2",
                "--mpi=pmi2",
                &bin,
                "start",
                "--size",
                "4",
                "--",
                "true",
            ],
            &["--size 4", "2 tasks", "drop --size"],
            0,
        );
        assert!(
            wait_until(Duration::from_secs(5), || brokers(&slurm).is_empty()),
            "brokers left: {}",
            describe(&brokers(&slurm))
        );
    });
}

#[test]
fn canopy_start_across_four_nodes_one_address_each_and_status_names_the_hosts() {
    let name = "canopy_start_across_four_nodes_one_address_each_and_status_names_the_hosts";
    if !can_run(name) || !netns::can_run(name) {
        return;
    }
    netns::run_test(LIMIT, || {
        let net = Net::new(4).expect("network namespaces");
        let slurm = Slurm::start_in(&net);
        let (subnet, bits) = net.subnet();
        let cidr = format!("{subnet}/{bits}");
        let bin = canopy();
        // A chain (fanout 1) of 8 brokers, two per node: 0-1 on node0, 2-3
        // on node1, ...; ranks 0 to 6 listen, on four addresses; links
        // within a node use ipc, between nodes TCP.
        let script = format!(
            "{bin} overlay status --wait full --timeout 10s >/dev/null && {bin} overlay status && \
             for r in 0 1 2 3 4 5 6 7; do {bin} overlay status --rank $r --json || exit 1; done && \
             echo --ss-- && ss -Htn state established"
        );
        let t0 = Instant::now();
        let out = slurm.srun(
            &[
                "-N",
                "4",
                "-n",
                "8",
                "--ntasks-per-node=2",
                "--mpi=pmi2",
                &bin,
                "start",
                "--fanout",
                "1",
                "--interface",
                &cidr,
                "--",
                "sh",
                "-c",
                &script,
            ],
            &[],
            SRUN_LIMIT,
        );
        println!("srun -N 4 -n 8 canopy start: {:?}", t0.elapsed());
        assert!(out.status.success(), "{}", fail_with(&slurm, &out));
        let stdout = text(&out.stdout);
        println!("{}", stdout.lines().take(10).collect::<Vec<_>>().join("\n"));
        let tree_end = stdout.find('{').expect("json after the tree");
        let tree = &stdout[..tree_end];
        assert!(tree.contains("8 of 8 online here, health full"), "{tree}");
        for n in 0..4 {
            assert!(
                tree.contains(&format!(" on node{n}")),
                "node{n} named:\n{tree}"
            );
        }
        let (json, ss) = stdout[tree_end..]
            .split_once("--ss--")
            .expect("ss output after the reports");
        let reports: Vec<serde_json::Value> = serde_json::Deserializer::from_str(json)
            .into_iter::<serde_json::Value>()
            .collect::<Result<_, _>>()
            .expect("one JSON report per rank");
        assert_eq!(reports.len(), 8);
        // Rank 0's report names every rank's host, two ranks per node.
        let hosts: Vec<String> = reports[0]["ranks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["host"].as_str().unwrap_or("?").to_string())
            .collect();
        assert_eq!(
            hosts,
            ["node0", "node0", "node1", "node1", "node2", "node2", "node3", "node3"],
            "{}",
            reports[0]
        );
        let mut addrs = std::collections::BTreeSet::new();
        for (r, rep) in reports.iter().enumerate() {
            assert_eq!(rep["rank"], r as u64);
            assert_eq!(rep["broker"]["host"], format!("node{}", r / 2));
            if r < 7 {
                let ep = rep["broker"]["endpoint"].as_str().unwrap_or_default();
                let addr = ep
                    .strip_prefix("tcp://")
                    .and_then(|a| a.rsplit_once(':'))
                    .map(|(a, _)| a.to_string())
                    .unwrap_or_else(|| panic!("rank {r} listens on {ep}, not tcp"));
                assert_eq!(
                    addr,
                    net.host(r / 2).ip().to_string(),
                    "rank {r} listens on its node's address"
                );
                addrs.insert(addr);
            }
        }
        assert_eq!(addrs.len(), 4, "four addresses: {addrs:?}");
        // TCP connections in node0's namespace (rank 0 runs the command
        // there): rank 1, on node0 too, reached rank 0 over ipc, so no TCP
        // connection ends at rank 0's port; rank 2, on node1, reached rank 1
        // over TCP.
        let port = |r: usize| {
            let ep = reports[r]["broker"]["endpoint"]
                .as_str()
                .unwrap()
                .to_string();
            ep.rsplit_once(':').unwrap().1.to_string()
        };
        let locals: Vec<String> = ss
            .lines()
            .filter_map(|l| l.split_whitespace().nth(2).map(str::to_string))
            .collect();
        let at = |p: &str| {
            locals
                .iter()
                .filter(|l| l.ends_with(&format!(":{p}")))
                .count()
        };
        assert_eq!(at(&port(0)), 0, "rank 1 -> 0 is ipc, not TCP:\n{ss}");
        assert_eq!(at(&port(1)), 1, "rank 2 -> 1 is TCP:\n{ss}");
    });
}

/// The wire-up benchmark of docs/performance.md ("Inside an allocation"):
/// for 4, 16 and 64 tasks on one node, the wall time of `srun -n N true`
/// (the launcher's own cost), of `srun -n N --mpi=pmi2|pmix canopy start
/// -- true` (launch, wire-up, the command, shutdown), and of `canopy start
/// --size N -- true` on the same machine in the same run; median and
/// [min, max] of 5 runs each. Run it with a release build:
/// `cargo test --release -p canopy-t --test slurm wireup_benchmark -- --ignored --nocapture`.
#[test]
#[ignore = "a benchmark; run it on purpose (docs/performance.md)"]
fn wireup_benchmark() {
    if !can_run("wireup_benchmark") {
        return;
    }
    run_test(Duration::from_secs(600), || {
        let slurm = Slurm::start();
        require_pmix(&slurm);
        let bin = canopy();
        let runs = 5;
        let load = || std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        println!("load at start: {}", load().trim());
        let time = |f: &dyn Fn() -> std::process::Output| -> (f64, f64, f64) {
            let mut v: Vec<f64> = (0..runs)
                .map(|_| {
                    let t0 = Instant::now();
                    let out = f();
                    let took = t0.elapsed().as_secs_f64() * 1e3;
                    assert!(
                        out.status.success(),
                        "{}\n{}",
                        text(&out.stdout),
                        text(&out.stderr)
                    );
                    took
                })
                .collect();
            v.sort_by(|a, b| a.partial_cmp(b).unwrap());
            (v[runs / 2], v[0], v[runs - 1])
        };
        let fmt = |(m, lo, hi): (f64, f64, f64)| format!("{m:.0} [{lo:.0}, {hi:.0}]");
        println!("| tasks | `srun true` | `srun --mpi=pmi2 canopy start -- true` | `srun --mpi=pmix canopy start -- true` | `canopy start --size N -- true` |");
        println!("|---:|---:|---:|---:|---:|");
        for n in [4u32, 16, 64] {
            let ns = n.to_string();
            let srun = |extra: &[&str]| {
                let mut args = vec!["-n", &ns, "-O"];
                args.extend_from_slice(extra);
                slurm.srun(&args, &[], SRUN_LIMIT)
            };
            let t_true = time(&|| srun(&["true"]));
            let t_pmi2 = time(&|| srun(&["--mpi=pmi2", &bin, "start", "--", "true"]));
            let t_pmix = time(&|| srun(&["--mpi=pmix", &bin, "start", "--", "true"]));
            let t_local = time(&|| {
                let mut c = std::process::Command::new(&bin);
                c.args(["start", "--size", &ns, "--", "true"]);
                canopy_t::run_command(&mut c, SRUN_LIMIT)
            });
            println!(
                "| {n} | {} | {} | {} | {} |",
                fmt(t_true),
                fmt(t_pmi2),
                fmt(t_pmix),
                fmt(t_local)
            );
        }
        println!("load at end: {}", load().trim());
    });
}

#[test]
fn canopy_start_under_srun_a_rank_that_dies_during_wire_up_is_named_by_the_others() {
    let name = "canopy_start_under_srun_a_rank_that_dies_during_wire_up_is_named_by_the_others";
    if !can_run(name) {
        return;
    }
    run_test(LIMIT, || {
        let slurm = Slurm::start();
        let bin = canopy();
        // Rank 2 exits before it reaches the fence.
        let script =
            format!("if [ \"$SLURM_PROCID\" = 2 ]; then exit 7; fi; exec {bin} start -- true");
        let t0 = Instant::now();
        let out = slurm.srun(
            &["-n", "3", "--mpi=pmi2", "sh", "-c", &script],
            &[("CANOPY_PMI_TIMEOUT", "2")],
            SRUN_LIMIT,
        );
        let took = t0.elapsed();
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(took < Duration::from_secs(20), "took {took:?}");
        for r in [0, 1] {
            let line = stderr
                .lines()
                .find(|l| {
                    l.contains(&format!(
                        "rank {r}: pmi `kvs-fence` got no answer within 2s"
                    ))
                })
                .unwrap_or_else(|| panic!("no timeout naming rank {r}:\n{stderr}"));
            assert!(line.contains("PMI_SIZE tasks"), "{line}");
            println!("{line}");
        }
        assert!(
            wait_until(Duration::from_secs(5), || brokers(&slurm).is_empty()),
            "brokers left: {}",
            describe(&brokers(&slurm))
        );
    });
}
