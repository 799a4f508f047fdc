//! Vote aggregation throughput: CPU backend vs GPU backend end to end (convert, upload, tally,
//! read back) and resident (votes already on the device), 10^3 votes up to `VOTES_BENCH_MAX`
//! (default 10^6, so that a run on software Vulkan stays short; set 100000000 on a real GPU).
//! Prints the crossover size where the GPU end to end beats the CPU.
//!
//! ```text
//! cargo bench --bench votes
//! VOTES_BENCH_MAX=100000000 cargo bench --bench votes
//! ```
//! Without a GPU adapter only the CPU rows run (and a line says why).

use std::sync::Arc;
use std::time::{Duration, Instant};

use consensus::gpu::context::{GpuConfig, GpuContext};
use consensus::gpu::votes::{CpuVoteAggregator, GpuVoteAggregator, Threshold, Vote};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

fn max_votes() -> usize {
    std::env::var("VOTES_BENCH_MAX")
        .ok()
        .and_then(|text| text.parse::<f64>().ok())
        .map(|value| value as usize)
        .unwrap_or(1_000_000)
}

/// One term, one proposal, every voter once, two thirds approving.
fn votes(count: usize) -> Vec<Vote> {
    (0..count as u32)
        .map(|voter| Vote::new(voter, 1, voter.wrapping_mul(2_654_435_761) % 3 != 0))
        .collect()
}

fn sizes() -> Vec<usize> {
    let mut sizes = Vec::new();
    let mut size = 1_000;
    while size <= max_votes() {
        sizes.push(size);
        size *= 10;
    }
    sizes
}

fn gpu() -> Option<GpuVoteAggregator> {
    let config = GpuConfig {
        memory_pool_size: 8 << 30,
        kernel_launch_timeout: Duration::from_secs(600),
        pipeline_compile_timeout: Duration::from_secs(600),
        ..GpuConfig::default()
    };
    match GpuContext::new(config) {
        Ok(context) => GpuVoteAggregator::with_context(Arc::new(context)).ok(),
        Err(error) => {
            eprintln!("votes bench: no GPU adapter ({error}); CPU rows only");
            None
        }
    }
}

fn bench_votes(criterion: &mut Criterion) {
    let cpu = CpuVoteAggregator::new(Threshold::default());
    let gpu = gpu();
    if let Some(gpu) = &gpu {
        eprintln!("votes bench: adapter {}", gpu.context().adapter_name());
    }
    let mut group = criterion.benchmark_group("votes");
    group.sample_size(10);
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(3));
    let mut medians: Vec<(usize, Duration, Option<Duration>)> = Vec::new();
    for count in sizes() {
        let batch = votes(count);
        group.throughput(Throughput::Elements(count as u64));
        group.bench_with_input(BenchmarkId::new("cpu", count), &batch, |bencher, batch| {
            bencher.iter(|| cpu.aggregate_blocking(batch).expect("cpu"))
        });
        let Some(gpu) = &gpu else {
            continue;
        };
        group.bench_with_input(
            BenchmarkId::new("gpu_end_to_end", count),
            &batch,
            |bencher, batch| bencher.iter(|| gpu.aggregate_blocking(batch).expect("gpu")),
        );
        if let Ok(resident) = gpu.upload(&batch) {
            group.bench_with_input(
                BenchmarkId::new("gpu_resident", count),
                &resident,
                |bencher, resident| {
                    bencher.iter(|| gpu.aggregate_resident(resident).expect("gpu resident"))
                },
            );
        }
        // Criterion keeps its estimates to itself; a quick median of 5 for the crossover line.
        let median = |run: &dyn Fn()| {
            let mut samples: Vec<Duration> = (0..5)
                .map(|_| {
                    let start = Instant::now();
                    run();
                    start.elapsed()
                })
                .collect();
            samples.sort();
            samples[2]
        };
        let cpu_median = median(&|| {
            std::hint::black_box(cpu.aggregate_blocking(&batch).ok());
        });
        let gpu_median = median(&|| {
            std::hint::black_box(gpu.aggregate_blocking(&batch).ok());
        });
        medians.push((count, cpu_median, Some(gpu_median)));
    }
    group.finish();
    let crossover = medians
        .iter()
        .rev()
        .take_while(|(_, cpu, gpu)| gpu.is_some_and(|gpu| gpu < *cpu))
        .last()
        .map(|(count, _, _)| *count);
    match (gpu.is_some(), crossover) {
        (false, _) => eprintln!("votes bench: crossover: no GPU"),
        (true, Some(count)) => {
            eprintln!("votes bench: crossover: GPU end to end wins from {count} votes")
        }
        (true, None) => eprintln!(
            "votes bench: crossover: none up to {} votes (CPU always faster)",
            max_votes()
        ),
    }
}

criterion_group!(benches, bench_votes);
criterion_main!(benches);
