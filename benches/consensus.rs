//! Three nodes over tarpc on loopback: (a) one client, sequential 64-byte proposals, latency
//! p50/p99; (b) 256 concurrent proposers, throughput; each with the memory store and with fjall
//! (fsync per batch); each over plain TCP and over mutual TLS 1.3 (`tls_*`). Run:
//! `cargo bench --bench consensus`.

mod common;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::latency::Latencies;
use common::{Setup, start_cluster};
use consensus::{ConsensusResult, Proposal};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const PAYLOAD: [u8; 64] = [7; 64];

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for (label, setup) in [
        ("tcp_memory", Setup::TcpMemory),
        ("tcp_fjall", Setup::TcpFjall),
        ("tls_memory", Setup::TlsMemory),
        ("tls_fjall", Setup::TlsFjall),
    ] {
        let cluster = runtime.block_on(start_cluster(3, setup));
        let leader = runtime.block_on(cluster.leader());
        let mut group = c.benchmark_group(label);
        group
            .sample_size(20)
            .measurement_time(Duration::from_secs(5));

        let samples = Mutex::new(Latencies::new());
        group.throughput(Throughput::Elements(1));
        group.bench_function("sequential_64B", |b| {
            b.to_async(&runtime).iter_custom(|iterations| {
                let leader = leader.clone();
                let samples = &samples;
                async move {
                    let mut total = Duration::ZERO;
                    for _ in 0..iterations {
                        let started = Instant::now();
                        let result = leader.propose(Proposal::from_bytes(&PAYLOAD[..])).await;
                        let took = started.elapsed();
                        assert!(matches!(result, Ok(ConsensusResult::Committed { .. })));
                        samples.lock().unwrap().record(took);
                        total += took;
                    }
                    total
                }
            });
        });
        let latencies = samples.into_inner().unwrap();
        // Nothing recorded when a filter left this function out: no line rather than zeros.
        if !latencies.is_empty() {
            println!(
                "{label}/sequential_64B latency over {} proposals: p50 {:?}, p99 {:?}",
                latencies.len(),
                latencies.quantile(0.5),
                latencies.quantile(0.99)
            );
        }

        const PROPOSERS: u64 = 256;
        const PER_PROPOSER: u64 = 40;
        group.throughput(Throughput::Elements(PROPOSERS * PER_PROPOSER));
        group.bench_function("concurrent_256", |b| {
            b.to_async(&runtime).iter_custom(|iterations| {
                let leader = leader.clone();
                async move {
                    let started = Instant::now();
                    for _ in 0..iterations {
                        common::propose_concurrently(&leader, PROPOSERS, PER_PROPOSER, &PAYLOAD)
                            .await;
                    }
                    started.elapsed()
                }
            });
        });
        group.finish();
        drop(leader);
        drop(cluster);
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
