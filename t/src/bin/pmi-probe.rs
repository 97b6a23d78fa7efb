//! A PMI probe for the Slurm tests: each task bootstraps through
//! `canopy_pmi::from_env` (PMI-2 under `srun --mpi=pmi2`, PMI-1 with
//! `CANOPY_PMI=1` or under hydra), puts one value, fences, reads every
//! rank's value and prints one line:
//!
//! ```text
//! probe rank=3 size=8 version=pmi-2 job=5.0 slurm_job=5 node=n0 netns=net:[4026531840] values=0:v0.4711,...
//! ```
//!
//! Each value is `v<rank>.<pid>`, so a value that did not come through the
//! KVS cannot be guessed. With `--hold` it then prints `holding rank=R` and
//! sleeps until killed (for scancel tests); otherwise it finalizes. With
//! `--stall R`, rank R never fences (it sleeps 60 s, then exits 4), so the
//! other ranks' fence times out (`CANOPY_PMI_TIMEOUT`).
//!
//! Exit status: 0 done, 2 a PMI error (printed to stderr, as `pmi-probe:
//! <error>`), 3 no PMI launcher at all, 64 usage.
#![forbid(unsafe_code)]

use std::io::Write;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (hold, stall) = match args.as_slice() {
        [] => (false, None),
        [a] if a == "--hold" => (true, None),
        [a, r] if a == "--stall" => match r.parse::<u32>() {
            Ok(r) => (false, Some(r)),
            Err(_) => usage(),
        },
        _ => usage(),
    };
    let mut pmi = match canopy_pmi::from_env() {
        Ok(Some(p)) => p,
        Ok(None) => {
            eprintln!("pmi-probe: not started by a pmi launcher (PMI_FD is not set)");
            std::process::exit(3);
        }
        Err(e) => fail(e),
    };
    let rank = pmi.rank();
    let size = pmi.size();
    if stall == Some(rank) {
        // Never reach the fence (for timeout tests); bounded, in case
        // nobody kills us.
        std::thread::sleep(std::time::Duration::from_secs(60));
        std::process::exit(4);
    }
    let mine = format!("v{rank}.{}", std::process::id());
    pmi.put(&format!("probe.{rank}"), &mine)
        .unwrap_or_else(|e| fail(e));
    pmi.fence().unwrap_or_else(|e| fail(e));
    let values: Vec<String> = (0..size)
        .map(|r| {
            let v = pmi.get(&format!("probe.{r}")).unwrap_or_else(|e| fail(e));
            format!("{r}:{v}")
        })
        .collect();
    let slurm_job = std::env::var("SLURM_JOB_ID").unwrap_or_else(|_| "-".into());
    let node = std::env::var("SLURMD_NODENAME").unwrap_or_else(|_| "-".into());
    let netns = std::fs::read_link("/proc/self/ns/net")
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "-".into());
    println!(
        "probe rank={rank} size={size} version={} job={} slurm_job={slurm_job} node={node} netns={netns} values={}",
        pmi.version(),
        pmi.job_id(),
        values.join(",")
    );
    let _ = std::io::stdout().flush();
    if hold {
        println!("holding rank={rank}");
        let _ = std::io::stdout().flush();
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
    // Everyone has read everything before anyone finalizes.
    pmi.fence().unwrap_or_else(|e| fail(e));
    pmi.finalize().unwrap_or_else(|e| fail(e));
}

fn usage() -> ! {
    eprintln!("usage: pmi-probe [--hold | --stall RANK]");
    std::process::exit(64);
}

fn fail(e: canopy_pmi::PmiError) -> ! {
    eprintln!("pmi-probe: {e}");
    std::process::exit(2);
}
