#![no_main]
#![forbid(unsafe_code)]

// The property checks live in the library, so that `cargo test` replays
// fuzz/regressions/zap and fuzz/seeds/zap through the same function.
libfuzzer_sys::fuzz_target!(|data: &[u8]| canopy_zap::fuzz::request(data));
