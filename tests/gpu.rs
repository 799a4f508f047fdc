//! GPU runtime and vote aggregation suite: the wgpu backend against the CPU reference.
//!
//! GPU tests follow the `CONSENSUS_REQUIRE_GPU` rule of `tests/common/gpu.rs`: they skip with a
//! printed reason when no adapter works, and fail when the variable is `1`.

#[path = "common/gpu.rs"]
mod gpu_common;

use std::time::Duration;

use consensus::gpu::context::{BufferPool, GpuConfig, GpuContext, GpuError};
use gpu_common::gpu_context_or_skip;

#[test]
fn adapters_are_listed_in_a_stable_order_and_bad_device_ids_are_typed_errors() {
    let Some(context) = gpu_context_or_skip("adapters_listed") else {
        return;
    };
    let adapters = GpuContext::adapters();
    assert!(!adapters.is_empty());
    assert_eq!(
        adapters,
        GpuContext::adapters(),
        "order must be deterministic"
    );
    assert_eq!(adapters[0].name, context.adapter_name());
    let count = adapters.len();
    let error = GpuContext::new(GpuConfig {
        device_id: count as u32,
        ..GpuConfig::default()
    })
    .expect_err("index past the end");
    assert_eq!(
        error,
        GpuError::DeviceIdOutOfRange {
            device_id: count as u32,
            adapter_count: count
        }
    );
}

#[test]
fn pipelines_are_compiled_once_and_shader_errors_are_typed() {
    let Some(context) = gpu_context_or_skip("pipelines_compiled_once") else {
        return;
    };
    const SOURCE: &str = "@group(0) @binding(0) var<storage, read_write> data: array<u32>;\n\
        @compute @workgroup_size(64) fn double(@builtin(global_invocation_id) id: vec3<u32>) {\n\
            if id.x < arrayLength(&data) { data[id.x] = data[id.x] * 2u; } }";
    let first = context
        .compute_pipeline("test-double", SOURCE, "double")
        .unwrap();
    let second = context
        .compute_pipeline("test-double", SOURCE, "double")
        .unwrap();
    assert!(std::sync::Arc::ptr_eq(&first, &second));
    let broken = context.compute_pipeline("test-broken", "fn nope( {", "main");
    assert!(matches!(broken, Err(GpuError::Shader { .. })), "{broken:?}");
}

#[test]
fn pool_reuses_buffers_and_reads_back_kernel_output() {
    let Some(context) = gpu_context_or_skip("pool_reuses_buffers") else {
        return;
    };
    const SOURCE: &str = "@group(0) @binding(0) var<storage, read_write> data: array<u32>;\n\
        @compute @workgroup_size(64) fn add_one(@builtin(global_invocation_id) id: vec3<u32>) {\n\
            if id.x < arrayLength(&data) { data[id.x] = data[id.x] + 1u; } }";
    let pipeline = context
        .compute_pipeline("test-add-one", SOURCE, "add_one")
        .unwrap();
    let input: Vec<u32> = (0..1000).collect();
    let bytes = (input.len() * 4) as u64;
    for round in 0..3 {
        let storage = context
            .buffers()
            .acquire(
                "test-data",
                bytes,
                wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_DST
                    | wgpu::BufferUsages::COPY_SRC,
            )
            .unwrap();
        let staging = context
            .buffers()
            .acquire(
                "test-staging",
                bytes,
                wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            )
            .unwrap();
        context
            .queue()
            .write_buffer(&storage, 0, bytemuck::cast_slice(&input));
        let bind_group = context
            .device()
            .create_bind_group(&wgpu::BindGroupDescriptor {
                label: None,
                layout: &pipeline.get_bind_group_layout(0),
                entries: &[wgpu::BindGroupEntry {
                    binding: 0,
                    resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                        buffer: &storage,
                        offset: 0,
                        size: std::num::NonZeroU64::new(bytes),
                    }),
                }],
            });
        let mut encoder = context.device().create_command_encoder(&Default::default());
        {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &bind_group, &[]);
            pass.dispatch_workgroups((input.len() as u32).div_ceil(64), 1, 1);
        }
        encoder.copy_buffer_to_buffer(&storage, 0, &staging, 0, bytes);
        let submission = context.submit([encoder.finish()]).unwrap();
        context.wait_for_submission(Some(submission)).unwrap();
        let output: Vec<u32> = context.read_back(&staging, bytes).unwrap();
        assert_eq!(
            output,
            input.iter().map(|x| x + 1).collect::<Vec<_>>(),
            "round {round}"
        );
    }
    let stats = context.buffers().stats();
    assert!(stats.reuses >= 4, "{stats:?}");
    assert!(BufferPool::size_class(bytes) >= bytes);
}

#[test]
fn pool_is_bounded_by_memory_pool_size() {
    let Some(_shared) = gpu_context_or_skip("pool_is_bounded") else {
        return;
    };
    let context = GpuContext::new(GpuConfig {
        memory_pool_size: 1 << 20,
        kernel_launch_timeout: Duration::from_secs(60),
        ..GpuConfig::default()
    })
    .unwrap();
    let usage = wgpu::BufferUsages::STORAGE;
    let held = context.buffers().acquire("a", 600 << 10, usage).unwrap();
    let error = context
        .buffers()
        .acquire("b", 600 << 10, usage)
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(error, GpuError::PoolExhausted { capacity, .. } if capacity == 1 << 20));
    drop(held);
    // The idle buffer is evicted to make room for a differently sized one.
    let other = context.buffers().acquire("c", 700 << 10, usage).unwrap();
    assert!(context.buffers().stats().allocated_bytes <= 1 << 20);
    drop(other);
}

mod smoke {
    use super::*;
    use consensus::gpu::votes::*;
    use std::sync::Arc;

    #[test]
    fn smoke_gpu_equals_cpu() {
        let Some(context) = gpu_context_or_skip("smoke") else { return };
        let gpu = GpuVoteAggregator::with_context(Arc::clone(&context)).unwrap();
        let cpu = CpuVoteAggregator::new(Threshold::default());
        let mut state = 99u64;
        let mut next = || { state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); state >> 33 };
        for n in [1usize, 3, 255, 257, 5000, 100_000] {
            let votes: Vec<Vote> = (0..n).map(|_| Vote::new((next() % (n as u64 / 2 + 1)) as u32, next() % 3, next() % 2 == 0).in_term(next() % 2).with_weight((next() % 5) as u32)).collect();
            let a = cpu.aggregate_blocking(&votes).unwrap();
            let b = gpu.aggregate_blocking(&votes).unwrap();
            assert_eq!(a, b, "n={n}");
            eprintln!("n={n} tallies={} equivocations={}", a.tallies.len(), a.equivocations.len());
        }
    }
}
