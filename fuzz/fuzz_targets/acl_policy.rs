#![no_main]
#![forbid(unsafe_code)]

// The property checks live in the library, so that `cargo test` replays
// fuzz/regressions/acl_policy and fuzz/seeds/acl_policy through the same function.
libfuzzer_sys::fuzz_target!(|data: &[u8]| canopy_acl::fuzz::policy(data));
