//! Builds the PMIx shim (csrc/pmix_shim.c) when libpmix's headers are
//! present, and sets `cfg(canopy_pmix)`; without them the crate builds as
//! before and `pmix::Pmix::init` says how to get PMIx support.

use std::path::PathBuf;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(canopy_pmix)");
    println!("cargo::rerun-if-changed=csrc/pmix_shim.c");
    println!("cargo::rerun-if-env-changed=CANOPY_NO_PMIX");
    if std::env::var_os("CANOPY_NO_PMIX").is_some() {
        return;
    }
    // Debian's libpmix-dev keeps pmix.h under its own prefix.
    let candidates = [
        (
            "/usr/lib/x86_64-linux-gnu/pmix2/include",
            "/usr/lib/x86_64-linux-gnu/pmix2/lib",
        ),
        (
            "/usr/lib/aarch64-linux-gnu/pmix2/include",
            "/usr/lib/aarch64-linux-gnu/pmix2/lib",
        ),
        ("/usr/include/pmix", "/usr/lib"),
        ("/usr/include", "/usr/lib"),
        ("/usr/local/include", "/usr/local/lib"),
    ];
    let found = candidates
        .iter()
        .map(|(i, l)| (PathBuf::from(i), PathBuf::from(l)))
        .find(|(i, _)| i.join("pmix.h").is_file());
    let Some((include, lib)) = found else {
        println!("cargo::warning=libpmix not found (install libpmix-dev for srun --mpi=pmix); building without PMIx");
        return;
    };
    println!(
        "cargo::rerun-if-changed={}",
        include.join("pmix.h").display()
    );
    // libpmix is not linked: the shim loads it with dlopen on the first
    // PMIx launch, trying the directory found here first.
    cc::Build::new()
        .file("csrc/pmix_shim.c")
        .include(&include)
        .define(
            "CANOPY_PMIX_LIBDIR",
            format!("\"{}\"", lib.display()).as_str(),
        )
        .warnings(true)
        .compile("canopy_pmix_shim");
    println!("cargo::rustc-link-lib=dylib=dl");
    println!("cargo::rustc-cfg=canopy_pmix");
}
