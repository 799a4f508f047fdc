//! GPU test helper shared by the suites that run kernels: opens one [`GpuContext`] per test binary
//! and applies the project's environment rule.
//!
//! With `CONSENSUS_REQUIRE_GPU=1`, having no working adapter is a test failure (panic with the
//! reason). Without it, a GPU test prints why it skips (`eprintln!`) and returns early. A GPU test
//! must never pass by quietly using the CPU.
//!
//! Include it standalone with `#[path = "common/gpu.rs"] mod gpu_common;`; it uses nothing else
//! from `tests/common`.

#![allow(dead_code)]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use consensus::gpu::GpuSignatureVerifier;
use consensus::gpu::context::{GpuConfig, GpuContext};
use consensus::gpu::sigverify::SigVerifyError;

/// Name of the variable that makes a missing GPU adapter a failure.
pub const REQUIRE_GPU_VAR: &str = "CONSENSUS_REQUIRE_GPU";

/// Whether `CONSENSUS_REQUIRE_GPU` is set to `1` (or `true`).
pub fn gpu_required() -> bool {
    matches!(
        std::env::var(REQUIRE_GPU_VAR).as_deref().map(str::trim),
        Ok("1") | Ok("true")
    )
}

/// The configuration tests use: adapter 0, a 3 GiB pool (room for inputs over 2^24 votes) and a
/// wait bound generous enough for software Vulkan on two shared cores, so a slow adapter fails
/// loudly instead of timing out into a CPU answer.
pub fn test_gpu_config() -> GpuConfig {
    GpuConfig {
        device_id: 0,
        memory_pool_size: 3 << 30,
        kernel_launch_timeout: Duration::from_secs(300),
        pipeline_compile_timeout: Duration::from_secs(900),
        enable_peer_access: false,
    }
}

fn shared_context() -> &'static Result<Arc<GpuContext>, String> {
    static CONTEXT: OnceLock<Result<Arc<GpuContext>, String>> = OnceLock::new();
    CONTEXT.get_or_init(|| {
        GpuContext::new(test_gpu_config())
            .map(Arc::new)
            .map_err(|error| error.to_string())
    })
}

/// Returns the shared test context, or `None` (after printing why `test_name` skips) when no
/// adapter works and `CONSENSUS_REQUIRE_GPU` is not `1`.
///
/// # Panics
/// When no adapter works and `CONSENSUS_REQUIRE_GPU=1`.
pub fn gpu_context_or_skip(test_name: &str) -> Option<Arc<GpuContext>> {
    match shared_context() {
        Ok(context) => Some(Arc::clone(context)),
        Err(reason) if gpu_required() => panic!(
            "{test_name}: {REQUIRE_GPU_VAR}=1 but no GPU adapter works: {reason} \
             (install mesa-vulkan-drivers for software Vulkan, or unset {REQUIRE_GPU_VAR})"
        ),
        Err(reason) => {
            eprintln!(
                "skipping {test_name}: no usable GPU adapter ({reason}); \
                 set {REQUIRE_GPU_VAR}=1 to make this a failure"
            );
            None
        }
    }
}

/// The ed25519 GPU verifier on `context`, or `None` (with the reason printed) when a software
/// adapter fails the verifier's start-up self-check: the verifier refuses such a device in
/// production too (seen on llvmpipe with LLVM 15). A hardware adapter that fails it, or any
/// other error, fails the test.
pub fn verifier_or_skip(test_name: &str, context: Arc<GpuContext>) -> Option<GpuSignatureVerifier> {
    let software = context.adapter_info().device_type == wgpu::DeviceType::Cpu;
    match GpuSignatureVerifier::new(context) {
        Ok(verifier) => Some(verifier),
        Err(error @ SigVerifyError::SelfCheckFailed { .. }) if software => {
            eprintln!("skipping {test_name}: the software adapter fails the self-check: {error}");
            None
        }
        Err(error) => panic!("{test_name}: building the verifier failed: {error}"),
    }
}

/// Builds the `verify_batch` example with the cargo running this test and returns its path.
///
/// The build runs without the package variables cargo gives a test process (`CARGO_PKG_*`,
/// `CARGO_MANIFEST_*`, ...): build scripts (ring's among them) track some of them, so a build
/// that saw them rebuilt half the tree, and the next `cargo test` rebuilt it back, about 100 s
/// each on 2 cores. The caller's own settings (`CARGO_INCREMENTAL`, `CARGO_TARGET_DIR`,
/// `CARGO_PROFILE_*`, ...) stay: without the CI's `CARGO_INCREMENTAL=0` the example built
/// under another hash, and the crate was compiled again for it.
pub fn build_verify_batch_example() -> String {
    /// Prefixes of the variables cargo sets for the test process itself.
    const SET_FOR_THE_TEST: [&str; 7] = [
        "CARGO_PKG_",
        "CARGO_MANIFEST_",
        "CARGO_CRATE_",
        "CARGO_BIN_",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_TARGET_TMPDIR",
        "CARGO_RUSTC_CURRENT_DIR",
    ];
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let manifest_dir = env!("CARGO_MANIFEST_DIR");
    let mut build = std::process::Command::new(&cargo);
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if SET_FOR_THE_TEST
            .iter()
            .any(|prefix| name.starts_with(prefix))
        {
            build.env_remove(name.as_ref());
        }
    }
    let status = build
        .args(["build", "--quiet", "--example", "verify_batch"])
        .current_dir(manifest_dir)
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building the example failed");
    let target_dir =
        std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| format!("{manifest_dir}/target"));
    format!("{target_dir}/debug/examples/verify_batch")
}
