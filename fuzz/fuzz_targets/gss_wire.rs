#![no_main]
#![forbid(unsafe_code)]

// The property checks live in the library, so that `cargo test` replays
// fuzz/regressions/gss_wire and fuzz/seeds/gss_wire through the same function.
libfuzzer_sys::fuzz_target!(|data: &[u8]| canopy_gss::fuzz::wire(data));
