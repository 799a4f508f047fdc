//! PBFT engines end to end: four replicas with their own keys, in process and over TCP with
//! fjall, through the public API only.

use std::time::{Duration, Instant};

use consensus::keys::{generate_key_file, public_key_hex};
use consensus::protocol::pbft::PbftNode;
use consensus::{
    Algorithm, ConsensusConfig, ConsensusEngine, ConsensusResult, Error, LocalNetwork, Proposal,
};

const NAMES: [&str; 4] = ["p1", "p2", "p3", "p4"];

/// Writes a key per replica under `dir` and returns every replica's configuration (peers as
/// `peer_entry(name)`).
fn configs(
    dir: &std::path::Path,
    peer_entry: impl Fn(usize, &str) -> String,
) -> Vec<ConsensusConfig> {
    let keys: Vec<_> = NAMES
        .iter()
        .map(|name| {
            let path = dir.join(format!("{name}.key"));
            let public = generate_key_file(&path).unwrap();
            (path, public_key_hex(&public))
        })
        .collect();
    NAMES
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let peers: Vec<String> = NAMES
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(j, peer)| peer_entry(j, peer))
                .collect();
            let mut config = ConsensusConfig::default()
                .algorithm(Algorithm::Pbft)
                .node_id(*name)
                .peers(peers)
                .key_file(&keys[i].0)
                .view_change_timeout(Duration::from_millis(300))
                .request_timeout(Duration::from_secs(5))
                // Every PBFT message is signed; peer TLS is the TLS suites' subject.
                .insecure_plaintext(true);
            for (peer, (_, public)) in NAMES.iter().zip(&keys) {
                config = config.validator(*peer, public.clone());
            }
            config
        })
        .collect()
}

async fn propose_until_committed(engines: &[ConsensusEngine], at: usize, value: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match engines[at].propose(Proposal::new("k", value)).await {
            Ok(ConsensusResult::Committed { index, .. }) => return index,
            other => assert!(
                Instant::now() < deadline,
                "{value} never committed: {other:?}"
            ),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_replicas_in_process_commit_through_any_replica_and_survive_a_dead_primary() {
    let dir = tempfile::tempdir().unwrap();
    let network = LocalNetwork::<PbftNode>::default();
    let mut engines = Vec::new();
    for config in configs(dir.path(), |_, peer| peer.to_string()) {
        let mut engine = ConsensusEngine::new(config)
            .unwrap()
            .with_local_network(&network);
        engine.start().await.unwrap();
        engines.push(engine);
    }
    let mut indexes = Vec::new();
    for (i, value) in ["a", "b", "c", "d"].iter().enumerate() {
        indexes.push(propose_until_committed(&engines, i, value).await);
    }
    indexes.sort();
    indexes.dedup();
    assert_eq!(indexes.len(), 4, "four distinct log positions");
    let primary = engines
        .iter()
        .position(|e| e.is_leader())
        .expect("a primary");
    engines[primary].stop().await.unwrap();
    let survivor = (primary + 1) % 4;
    let index = propose_until_committed(&engines, survivor, "after").await;
    assert!(index > 4);
    let new_primary = engines
        .iter()
        .position(|e| e.is_leader())
        .expect("a new primary");
    assert_ne!(new_primary, primary);
    assert!(
        engines[survivor].metrics().current_term() >= 1,
        "the view moved on"
    );
    // The validator set is the configured one.
    match engines[survivor].add_learner("99", None).await {
        Err(consensus::Error::Membership(consensus::MembershipError::Unsupported(_))) => {}
        other => panic!("PBFT took a membership change: {other:?}"),
    }
    assert!(engines[survivor].membership().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_replicas_over_tcp_with_fjall_keep_committed_writes_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let ports: Vec<u16> = (0..4)
        .map(|_| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        })
        .collect();
    let configs: Vec<_> = configs(dir.path(), |j, peer| {
        format!("{peer}@127.0.0.1:{}", ports[j])
    })
    .into_iter()
    .enumerate()
    .map(|(i, config)| {
        config
            .bind_address(format!("127.0.0.1:{}", ports[i]))
            .persistent_state(dir.path().join(NAMES[i]))
    })
    .collect();
    let mut engines = Vec::new();
    for config in &configs {
        engines.push(ConsensusEngine::new(config.clone()).unwrap());
    }
    let starts = engines.iter_mut().map(|e| e.start());
    for result in futures::future::join_all(starts).await {
        result.unwrap();
    }
    let first = propose_until_committed(&engines, 1, "durable").await;
    // Restart one replica from its data dir: it keeps what it executed.
    engines[3].stop().await.unwrap();
    engines[3] = ConsensusEngine::new(configs[3].clone()).unwrap();
    engines[3].start().await.unwrap();
    let second = propose_until_committed(&engines, 3, "after-restart").await;
    assert!(second > first);
    for engine in &mut engines {
        engine.stop().await.unwrap();
    }
}

#[tokio::test]
async fn pbft_refuses_three_replicas_a_missing_key_and_unnamed_tcp_peers() {
    let dir = tempfile::tempdir().unwrap();
    let config = configs(dir.path(), |_, peer| peer.to_string()).remove(0);
    let three = config.clone().peers(vec!["p2", "p3"]);
    let error = ConsensusEngine::new(three).unwrap_err();
    assert!(error.to_string().contains("4"), "{error}");
    let missing = config.clone().key_file(dir.path().join("absent.key"));
    assert!(matches!(
        ConsensusEngine::new(missing),
        Err(Error::Config(_))
    ));
    let unnamed =
        config
            .bind_address("127.0.0.1:0")
            .peers(vec!["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]);
    match ConsensusEngine::new(unnamed) {
        Err(error) => assert!(matches!(error, Error::Config(_)), "{error}"),
        Ok(mut engine) => {
            let error = engine.start().await.unwrap_err();
            assert!(error.to_string().contains("name@host:port"), "{error}");
        }
    }
}

/// With `gpu_enabled` the replicas check signatures with the automatic verifier over a GPU
/// context. On a machine with a GPU adapter the context must open (CONSENSUS_REQUIRE_GPU makes a
/// missing one a failure); on one without, the test says why it skips. Either way the cluster
/// commits: the verifier's CPU path answers batches below its crossover.
#[cfg(feature = "gpu")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_enabled_replicas_open_the_automatic_verifier_and_commit() {
    let adapters = consensus::gpu::GpuContext::adapters();
    if adapters.is_empty() {
        assert!(
            std::env::var_os("CONSENSUS_REQUIRE_GPU").is_none(),
            "CONSENSUS_REQUIRE_GPU is set and no GPU adapter is present"
        );
        eprintln!("skipped: no GPU adapter on this machine");
        return;
    }
    eprintln!("adapters: {adapters:?}");
    let dir = tempfile::tempdir().unwrap();
    let network = LocalNetwork::<PbftNode>::default();
    let mut engines = Vec::new();
    for config in configs(dir.path(), |_, peer| peer.to_string()) {
        let mut engine = ConsensusEngine::new(config.gpu_enabled(true))
            .unwrap()
            .with_local_network(&network);
        engine.start().await.unwrap();
        engines.push(engine);
    }
    assert!(propose_until_committed(&engines, 2, "on-gpu-settings").await >= 1);
    let software = adapters[0].device_type == wgpu::DeviceType::Cpu;
    for engine in &engines {
        match engine.gpu_signature_verifier() {
            Some(Ok(adapter)) => eprintln!("GPU verifier on {adapter}"),
            // lavapipe on some hosts fails the verifier's own self-check (see tests/sigverify.rs);
            // a hardware GPU must pass it.
            Some(Err(reason)) if software => {
                eprintln!("skipped the GPU part: the software adapter's verifier: {reason}")
            }
            other => panic!("no GPU verifier with a hardware adapter present: {other:?}"),
        }
    }
}

/// Counts the batches it is given, then counts their votes on the CPU.
#[derive(Default)]
struct CountingAggregator {
    batches: std::sync::atomic::AtomicUsize,
    votes: std::sync::atomic::AtomicUsize,
}

impl consensus::gpu::VoteAggregator for CountingAggregator {
    fn aggregate_votes<'a>(
        &'a self,
        votes: &'a [consensus::gpu::Vote],
    ) -> futures::future::BoxFuture<
        'a,
        Result<consensus::gpu::VoteOutcome, consensus::gpu::VoteError>,
    > {
        use std::sync::atomic::Ordering::Relaxed;
        self.batches.fetch_add(1, Relaxed);
        self.votes.fetch_add(votes.len(), Relaxed);
        let cpu = consensus::gpu::CpuVoteAggregator::new(self.threshold());
        Box::pin(async move { cpu.aggregate_blocking(votes) })
    }

    fn threshold(&self) -> consensus::gpu::Threshold {
        consensus::gpu::Threshold::MajorityOfVotesCast
    }
}

/// The replicas' prepares and commits are counted by the aggregator they were given, and its
/// counts are what commits: an aggregator that counts nothing would stall the cluster.
///
/// Not every replica need count every slot: one that fell behind (on a loaded host, the first
/// one started may send before the others listen) catches up from commit certificates, whose
/// signers are checked one by one. But each slot commits only once a quorum of replicas counted
/// its prepares (the pre-prepare and two prepares at least), so a quorum of counters saw votes,
/// and together at least `slots × quorum × 3`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn votes_are_counted_by_the_configured_vote_aggregator() {
    use std::sync::Arc;
    use std::sync::atomic::Ordering::Relaxed;
    let dir = tempfile::tempdir().unwrap();
    let network = LocalNetwork::<PbftNode>::default();
    let counters: Vec<Arc<CountingAggregator>> = (0..NAMES.len()).map(|_| Arc::default()).collect();
    let mut engines = Vec::new();
    for (config, counter) in configs(dir.path(), |_, peer| peer.to_string())
        .into_iter()
        .zip(&counters)
    {
        let mut engine = ConsensusEngine::new(config)
            .unwrap()
            .with_vote_aggregator(counter.clone())
            .with_local_network(&network);
        engine.start().await.unwrap();
        engines.push(engine);
    }
    for (i, value) in ["a", "b", "c"].iter().enumerate() {
        propose_until_committed(&engines, i, value).await;
    }
    let (slots, quorum) = (3, 3);
    let mut counting = 0;
    let mut total = 0;
    for (name, counter) in NAMES.iter().zip(&counters) {
        let (batches, votes) = (counter.batches.load(Relaxed), counter.votes.load(Relaxed));
        eprintln!("{name}: {votes} votes in {batches} batches");
        counting += usize::from(batches >= 1);
        total += votes;
    }
    assert!(counting >= quorum, "only {counting} replicas counted votes");
    assert!(
        total >= slots * quorum * 3,
        "{total} votes counted for {slots} slots"
    );
}
