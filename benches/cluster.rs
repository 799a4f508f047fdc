//! The in-process cluster benchmark of `examples/bench.rs` at small sizes, so regressions show in
//! `cargo bench`: 3 members, memory store, in-process network, empty proposals, 1 and 64 clients.
//! Run: `cargo bench --bench cluster`.

mod common;

use std::time::{Duration, Instant};

use common::{Setup, start_cluster};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let cluster = runtime.block_on(start_cluster(3, Setup::Local));
    let leader = runtime.block_on(cluster.leader());
    let mut group = c.benchmark_group("in_process_3_members");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(4));
    for clients in [1u64, 64] {
        const PER_CLIENT: u64 = 50;
        group.throughput(Throughput::Elements(clients * PER_CLIENT));
        group.bench_with_input(
            BenchmarkId::new("clients", clients),
            &clients,
            |b, &clients| {
                b.to_async(&runtime).iter_custom(|iterations| {
                    let leader = leader.clone();
                    async move {
                        let started = Instant::now();
                        for _ in 0..iterations {
                            common::propose_concurrently(&leader, clients, PER_CLIENT, &[]).await;
                        }
                        started.elapsed()
                    }
                });
            },
        );
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
