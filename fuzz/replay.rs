// The replay of fuzz inputs shared by each crate's
// `tests/fuzz_regressions.rs` (`include!`d there): every file under
// `fuzz/regressions/<target>/` and `fuzz/seeds/<target>/` goes through the
// function the fuzz target calls.

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut n = 0;
    for kind in ["regressions", "seeds"] {
        let Ok(dir) = std::fs::read_dir(root.join(kind).join(target)) else {
            continue;
        };
        for entry in dir {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            eprintln!("replaying {}", path.display());
            run(&data);
            n += 1;
        }
    }
    assert!(
        n > 0,
        "no inputs for fuzz target {target} under {}",
        root.display()
    );
}
