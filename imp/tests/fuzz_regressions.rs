//! Replays every input kept under `fuzz/regressions/<target>/` and
//! `fuzz/seeds/<target>/` through the same function the fuzz target calls,
//! so a bug the fuzzer once found stays fixed without cargo-fuzz.

include!("../../fuzz/replay.rs");

#[test]
fn imp_envelope() {
    replay("imp_envelope", canopy_imp::fuzz::envelope);
}
