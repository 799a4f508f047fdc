//! CPU (all cores) vs GPU ed25519 batch verification, 64-byte messages, batch sizes from 64 up to
//! 2^20 (about 10^6), and the crossover batch size.
//!
//! `cargo bench --bench sigverify` runs criterion groups `sigverify/cpu` and `sigverify/gpu`,
//! then prints a table of medians (verifications per second) and the smallest batch size at which
//! the GPU beats the CPU. The largest batch is capped so the bench finishes on a small machine:
//! `SIGVERIFY_BENCH_MAX_CPU` (default 16384) and `SIGVERIFY_BENCH_MAX_GPU` (default 16384 on a
//! real GPU, 256 on a software adapter) raise or lower the caps; set both to 1048576 on a GPU
//! host. Without a GPU adapter only the CPU rows are measured.
//!
//! It also prints the CPU's SHA-512 rate for `R ‖ A ‖ M` on all cores (the hashing the GPU
//! backend does on CPU threads, overlapped with the previous dispatch), so it can be compared with
//! the GPU's verification rate.

use std::sync::Arc;
use std::time::{Duration, Instant};

use consensus::gpu::sigverify::vectors::{self, OwnedItem};
use consensus::gpu::{
    CpuSignatureVerifier, GpuConfig, GpuContext, GpuSignatureVerifier, SigVerifyError,
    SignatureVerifier,
};
use criterion::{BenchmarkId, Criterion, Throughput};

const BATCH_SIZES: [usize; 8] = [64, 256, 1024, 4096, 16_384, 65_536, 262_144, 1_048_576];

fn env_cap(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

/// Signed items, a few hundred distinct keys as in a validator set, reused cyclically so large
/// batches do not spend minutes signing.
fn items(count: usize) -> Vec<OwnedItem> {
    let distinct = vectors::random_valid_items(77, count.min(4096), 64);
    (0..count)
        .map(|index| distinct[index % distinct.len()].clone())
        .collect()
}

fn median_seconds(verifier: &dyn SignatureVerifier, items: &[OwnedItem], runs: usize) -> f64 {
    let refs: Vec<_> = items.iter().map(OwnedItem::as_item).collect();
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            let verdicts = verifier.verify_batch(&refs).expect("verification runs");
            assert!(verdicts.iter().all(|&ok| ok), "bench items are all valid");
            start.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// Hashes per second of SHA-512(R ‖ A ‖ M) on all cores, median of 3 passes.
fn sha512_rate(items: &[OwnedItem]) -> f64 {
    use rayon::prelude::*;
    use sha2::{Digest, Sha512};
    let mut times: Vec<f64> = (0..3)
        .map(|_| {
            let start = Instant::now();
            let digests: Vec<[u8; 64]> = items
                .par_iter()
                .with_min_len(64)
                .map(|item| {
                    let mut hasher = Sha512::new();
                    hasher.update(&item.signature[..32]);
                    hasher.update(item.public_key);
                    hasher.update(&item.message);
                    hasher.finalize().into()
                })
                .collect();
            assert_eq!(digests.len(), items.len());
            start.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    items.len() as f64 / times[1]
}

fn main() {
    let mut criterion = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();

    let gpu = GpuContext::new(GpuConfig {
        kernel_launch_timeout: Duration::from_secs(600),
        pipeline_compile_timeout: Duration::from_secs(600),
        ..GpuConfig::default()
    })
    .map_err(SigVerifyError::from)
    .map(Arc::new)
    .and_then(|context| {
        let software = context.adapter_info().device_type == wgpu::DeviceType::Cpu;
        let start = Instant::now();
        let verifier = GpuSignatureVerifier::new(context)?;
        eprintln!(
            "GPU verifier built (kernel compiled, table uploaded, self-check passed) in {:.2} s",
            start.elapsed().as_secs_f64()
        );
        Ok((verifier, software))
    });
    let (gpu, gpu_cap) = match gpu {
        Ok((verifier, software)) => {
            eprintln!("GPU adapter: {}", verifier.context().adapter_name());
            let cap = env_cap(
                "SIGVERIFY_BENCH_MAX_GPU",
                if software { 256 } else { 16_384 },
            );
            (Some(verifier), cap)
        }
        Err(error) => {
            eprintln!("no GPU backend ({error}); CPU rows only");
            (None, 0)
        }
    };
    let cpu = CpuSignatureVerifier::new();
    let cpu_cap = env_cap("SIGVERIFY_BENCH_MAX_CPU", 16_384);
    eprintln!("CPU threads: {}", rayon::current_num_threads());
    let hash_rate = sha512_rate(&items(65_536));
    println!("CPU SHA-512 of R||A||M (64-byte messages), all cores: {hash_rate:.0} hashes/s");

    let mut group = criterion.benchmark_group("sigverify");
    for &size in BATCH_SIZES.iter() {
        let batch = items(size);
        let refs: Vec<_> = batch.iter().map(OwnedItem::as_item).collect();
        group.throughput(Throughput::Elements(size as u64));
        if size <= cpu_cap {
            group.bench_with_input(BenchmarkId::new("cpu", size), &refs, |bencher, refs| {
                bencher.iter(|| cpu.verify_batch(refs).expect("cpu"));
            });
        }
        if let Some(gpu) = gpu.as_ref().filter(|_| size <= gpu_cap) {
            group.bench_with_input(BenchmarkId::new("gpu", size), &refs, |bencher, refs| {
                bencher.iter(|| gpu.verify_batch(refs).expect("gpu"));
            });
        }
    }
    group.finish();

    // The table and the crossover, from medians of 3 timed runs each.
    println!("\n| batch | CPU verif/s | GPU verif/s | GPU/CPU |");
    println!("|------:|------------:|------------:|--------:|");
    let mut crossover = None;
    for &size in BATCH_SIZES.iter() {
        if size > cpu_cap && size > gpu_cap {
            continue;
        }
        let batch = items(size);
        let cpu_rate = (size <= cpu_cap).then(|| size as f64 / median_seconds(&cpu, &batch, 3));
        let gpu_rate = gpu
            .as_ref()
            .filter(|_| size <= gpu_cap)
            .map(|gpu| size as f64 / median_seconds(gpu, &batch, 3));
        let show = |rate: Option<f64>| rate.map_or("-".to_string(), |rate| format!("{rate:.0}"));
        let ratio = match (cpu_rate, gpu_rate) {
            (Some(cpu_rate), Some(gpu_rate)) => {
                if gpu_rate > cpu_rate && crossover.is_none() {
                    crossover = Some(size);
                }
                format!("{:.3}", gpu_rate / cpu_rate)
            }
            _ => "-".to_string(),
        };
        println!(
            "| {size} | {} | {} | {ratio} |",
            show(cpu_rate),
            show(gpu_rate)
        );
    }
    match (crossover, gpu.is_some()) {
        (Some(size), _) => println!("crossover: the GPU is faster from a batch of {size}"),
        (None, true) => println!("crossover: the GPU was not faster at any measured batch size"),
        (None, false) => println!("crossover: not measured (no GPU backend)"),
    }
    criterion.final_summary();
}
