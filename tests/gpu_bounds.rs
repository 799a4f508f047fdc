//! The two bounds of GPU waits: compiling a kernel (pipeline creation and the warm-up dispatch,
//! `pipeline_compile_timeout`) and one submission (`kernel_launch_timeout`), with batches split
//! into submissions sized from the adapter's measured throughput so that a batch of any size
//! completes on a slow adapter while a dispatch that overruns still times out.
//!
//! GPU tests follow the project rule: with `CONSENSUS_REQUIRE_GPU=1` a missing adapter fails,
//! otherwise they print why and return. `GPU_BOUNDS_ITEMS` sets the batch of the splitting test
//! (default 400: over a second of llvmpipe time, far past its 200 ms bound). CI runs this suite a
//! second time with `MESA_SHADER_CACHE_DISABLE=true`, every compile from scratch.

#[path = "common/gpu.rs"]
mod gpu_common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use consensus::gpu::sigverify::vectors::{self, OwnedItem};
use consensus::gpu::sigverify::{SigVerifyError, format_item_line};
use consensus::gpu::{
    CpuSignatureVerifier, GpuConfig, GpuContext, GpuError, SignatureVerifier, WaitBound,
};

/// A context of its own with the given bounds, or `None` (reason printed) without an adapter.
fn context_with(
    test_name: &str,
    kernel_launch_timeout: Duration,
    pipeline_compile_timeout: Duration,
) -> Option<Arc<GpuContext>> {
    gpu_common::gpu_context_or_skip(test_name)?;
    let context = GpuContext::new(GpuConfig {
        kernel_launch_timeout,
        pipeline_compile_timeout,
        ..gpu_common::test_gpu_config()
    })
    .expect("the adapter that opened for the shared context opens again");
    Some(Arc::new(context))
}

/// Honest signatures with every fifth one tampered.
fn mixed_items(seed: u64, count: usize) -> Vec<OwnedItem> {
    let mut items = vectors::random_valid_items(seed, count, 32);
    for item in items.iter_mut().step_by(5) {
        item.message[0] ^= 1;
    }
    items
}

#[test]
fn a_batch_longer_than_the_kernel_bound_completes_in_submissions_that_fit() {
    let name = "a_batch_longer_than_the_kernel_bound_completes_in_submissions_that_fit";
    let bound = Duration::from_millis(200);
    let Some(context) = context_with(name, bound, Duration::from_secs(900)) else {
        return;
    };
    // Built under the compile bound: on a cold cache the compile alone is far past 200 ms.
    let Some(verifier) = gpu_common::verifier_or_skip(name, Arc::clone(&context)) else {
        return;
    };
    let count = std::env::var("GPU_BOUNDS_ITEMS")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(400usize);
    let items = mixed_items(7, count);
    let refs: Vec<_> = items.iter().map(OwnedItem::as_item).collect();
    let before = context.metrics();
    let started = Instant::now();
    let verdicts = verifier.verify_batch(&refs).expect("every submission fits");
    let elapsed = started.elapsed();
    let after = context.metrics();
    assert_eq!(verdicts, CpuSignatureVerifier::new().verdicts(&refs));
    assert_eq!(after.timeouts, 0, "no wait ran out");
    let submissions = after.submissions - before.submissions;
    eprintln!(
        "{count} items in {elapsed:?} over {submissions} submissions under a {bound:?} bound \
         (now {} items per submission)",
        verifier.items_per_submission()
    );
    if context.adapter_info().device_type == wgpu::DeviceType::Cpu {
        // A software adapter must take longer than the bound, or the test shows nothing.
        assert!(elapsed > bound * 2, "{elapsed:?}: raise GPU_BOUNDS_ITEMS");
    }
    if elapsed > bound {
        // Each submission waited less than the bound, so the batch needed several.
        let at_least = elapsed.as_nanos().div_ceil(bound.as_nanos()) / 2;
        assert!(
            submissions as u128 >= at_least.max(2),
            "{submissions} submissions in {elapsed:?}"
        );
        assert!(verifier.items_per_submission() < count);
    }
}

#[test]
fn a_dispatch_past_kernel_launch_timeout_fails_naming_that_bound() {
    let name = "a_dispatch_past_kernel_launch_timeout_fails_naming_that_bound";
    let Some(context) = context_with(name, Duration::from_nanos(1), Duration::from_secs(900))
    else {
        return;
    };
    // The kernel compiles and warms up under the compile bound, so a 1 ns dispatch bound does not
    // stop the verifier from being built...
    let Some(verifier) = gpu_common::verifier_or_skip(name, Arc::clone(&context)) else {
        return;
    };
    assert_eq!(context.metrics().timeouts, 0);
    assert_eq!(verifier.items_per_submission(), 1);
    // ...but a dispatch that runs longer than 1 ns (a hang, as far as the bound knows) still
    // times out, and says which bound ran out.
    let items = mixed_items(8, 4);
    let refs: Vec<_> = items.iter().map(OwnedItem::as_item).collect();
    let error = verifier.verify_batch(&refs).expect_err("1 ns is too short");
    assert!(
        matches!(
            error,
            SigVerifyError::Gpu(GpuError::Timeout {
                bound: WaitBound::KernelLaunch,
                ..
            })
        ),
        "{error}"
    );
    assert!(
        error.to_string().contains("kernel_launch_timeout"),
        "{error}"
    );
    assert_eq!(context.metrics().timeouts, 1);
}

#[test]
fn a_pipeline_build_past_pipeline_compile_timeout_fails_naming_that_bound() {
    let name = "a_pipeline_build_past_pipeline_compile_timeout_fails_naming_that_bound";
    let Some(context) = context_with(name, Duration::from_secs(10), Duration::from_nanos(1)) else {
        return;
    };
    // Big enough (a few thousand statements) that parsing alone takes far longer than 1 ns plus
    // starting the build thread.
    let body: String = (0..4000)
        .map(|index| {
            format!(
                "    out[{}] = out[{}] * {index}u + 1u;\n",
                index % 64,
                (index + 1) % 64
            )
        })
        .collect();
    let shader: &'static str = Box::leak(
        format!(
            "@group(0) @binding(0) var<storage, read_write> out: array<u32>;\n\
             @compute @workgroup_size(1) fn main() {{\n{body}}}\n"
        )
        .into_boxed_str(),
    );
    let error = context
        .compute_pipeline("bounds_test", shader, "main")
        .expect_err("no driver builds a pipeline in 1 ns");
    assert!(
        matches!(
            error,
            GpuError::Timeout {
                bound: WaitBound::PipelineCompile,
                ..
            }
        ),
        "{error}"
    );
    assert!(
        error.to_string().contains("pipeline_compile_timeout"),
        "{error}"
    );
}

/// The first run on a cold shader cache, as a new user's: `verify_batch --backend gpu` with the
/// Mesa cache disabled and a dispatch bound (500 ms) far below the compile time (seconds on
/// llvmpipe) completes, logs the warm-up, and gives the CPU backend's verdicts.
#[test]
fn verify_batch_on_a_cold_shader_cache_with_a_short_kernel_bound() {
    let name = "verify_batch_on_a_cold_shader_cache_with_a_short_kernel_bound";
    let Some(context) = gpu_common::gpu_context_or_skip(name) else {
        return;
    };
    let binary = gpu_common::build_verify_batch_example();
    let directory = tempfile::tempdir().expect("tempdir");
    let path = directory.path().join("items.txt");
    let items = mixed_items(9, 150);
    let text: String = items
        .iter()
        .map(|item| format_item_line(item) + "\n")
        .collect();
    std::fs::write(&path, text).expect("write input");
    let output = std::process::Command::new(&binary)
        .args(["--backend", "gpu", "--kernel-timeout-ms", "500"])
        .arg(&path)
        .env("MESA_SHADER_CACHE_DISABLE", "true")
        .env("RUST_LOG", "info")
        .output()
        .expect("example runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success()
        && stderr.contains("self-check")
        && context.adapter_info().device_type == wgpu::DeviceType::Cpu
    {
        eprintln!("skipping {name}: the software adapter fails the self-check: {stderr}");
        return;
    }
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("warmed up"), "{stderr}");
    let refs: Vec<_> = items.iter().map(OwnedItem::as_item).collect();
    let expected: String = CpuSignatureVerifier::new()
        .verdicts(&refs)
        .into_iter()
        .map(|valid| format!("{}\n", u8::from(valid)))
        .collect();
    assert_eq!(String::from_utf8_lossy(&output.stdout), expected);
}
