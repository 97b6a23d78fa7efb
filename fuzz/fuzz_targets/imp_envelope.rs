#![no_main]
#![forbid(unsafe_code)]

// The property checks live in the library, so that `cargo test` replays
// fuzz/regressions/imp_envelope and fuzz/seeds/imp_envelope through the
// same function.
libfuzzer_sys::fuzz_target!(|data: &[u8]| canopy_imp::fuzz::envelope(data));
