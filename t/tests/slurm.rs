//! PMI under a real Slurm (the `canopy_t::slurm` harness: munged,
//! slurmctld and slurmd from a temp dir). The probe (`pmi-probe`) uses
//! `canopy_pmi::from_env`, as a broker will.
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

#[test]
fn pmix_only_is_a_clear_error() {
    if !can_run("pmix_only_is_a_clear_error") {
        return;
    }
    run_test(LIMIT, || {
        let slurm = Slurm::start();
        let list = slurm.srun(&["--mpi=list"], &[], SRUN_LIMIT);
        let plugins = text(&list.stdout) + &text(&list.stderr);
        if !plugins.contains("pmix") {
            panic!("srun --mpi=list offers no pmix; install libpmix-dev (scripts/deps.sh does):\n{plugins}");
        }
        let out = slurm.srun(&["-n", "2", "--mpi=pmix", probe()], &[], SRUN_LIMIT);
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        for r in 0..2 {
            assert!(
                stderr.lines().any(|l| l.contains(&format!("rank {r}:"))
                    && l.contains("only pmix")
                    && l.contains("--mpi=pmi2")),
                "rank {r}:\n{stderr}"
            );
        }
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
