//! Shared by the fuzz tests of the decoders that read outside bytes (peer frames, HTTP bodies,
//! the configuration file, on-disk records, signature input files): how many cases each runs.
//!
//! `FUZZ_CASES=N` runs N cases per decoder instead of the defaults (which sum to over 100,000 and
//! run in seconds). The fuzz tests are built only with the default features: the CPU-only unit
//! test run in CI would repeat the same decoders.
//!
//! Allocation is bounded by construction and asserted on the lengths: every length a decoder
//! reads from outside (a frame's prefix, a compressed body's size) is compared with its limit
//! before anything of that size is allocated, and the tests assert that an input declaring more
//! than the limit gets the length error. Lengths inside postcard values are checked
//! against the bytes actually left, and serde caps what a declared collection length
//! preallocates at 1 MiB. (A probe of every allocation would need a global allocator, which is
//! `unsafe` code the crate forbids.)

use proptest::test_runner::Config;

/// The proptest configuration of a fuzz test: `default_cases`, or `FUZZ_CASES` when set.
pub(crate) fn config(default_cases: u32) -> Config {
    let cases = std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(default_cases);
    Config {
        cases,
        ..Config::default()
    }
}
