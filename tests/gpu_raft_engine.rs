//! GPU-optimized Raft engines end to end, through the public API: three voters with their own
//! keys and fjall data directories, in process; then every data directory checked offline with
//! `verify_log`, and damaged ones refused with the first bad index.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use consensus::keys::{generate_key_file, public_key_hex};
use consensus::protocol::gpu_raft::GpuRaftNode;
use consensus::storage::{FjallLogStore, LogStore, SyncPolicy};
use consensus::{
    Algorithm, ConsensusConfig, ConsensusEngine, ConsensusResult, Entry, LocalNetwork, NodeId,
    Payload, Proposal, VerifyLogError, verify_log,
};

const NAMES: [&str; 3] = ["g1", "g2", "g3"];

fn configs(dir: &Path) -> Vec<ConsensusConfig> {
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
                .filter(|peer| *peer != name)
                .map(|peer| peer.to_string())
                .collect();
            let mut config = ConsensusConfig::default()
                .algorithm(Algorithm::GpuOptimizedRaft)
                .node_id(*name)
                .peers(peers)
                .key_file(&keys[i].0)
                .persistent_state(dir.join(name))
                .request_timeout(Duration::from_secs(5));
            for (peer, (_, public)) in NAMES.iter().zip(&keys) {
                config = config.validator(*peer, public.clone());
            }
            config
        })
        .collect()
}

async fn propose_until_committed(engine: &ConsensusEngine, value: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match engine.propose(Proposal::new("k", value)).await {
            Ok(ConsensusResult::Committed { index, .. }) => return index,
            other => {
                assert!(
                    Instant::now() < deadline,
                    "{value} never committed: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_voters_commit_and_every_data_directory_verifies_offline() {
    let dir = tempfile::tempdir().unwrap();
    let network = LocalNetwork::<GpuRaftNode>::default();
    let configs = configs(dir.path());
    let mut engines = Vec::new();
    for config in configs.clone() {
        let mut engine = ConsensusEngine::new(config)
            .expect("gpu_optimized_raft is accepted")
            .with_local_network(&network);
        engine.start().await.unwrap();
        engines.push(engine);
    }
    let mut last = 0;
    for n in 0..30 {
        last = propose_until_committed(&engines[n % 3], &format!("v{n}")).await;
    }
    for engine in &engines {
        let metrics = engine.metrics();
        assert!(
            metrics.vote_processing_time() > Duration::ZERO,
            "every node timed its signature batches"
        );
        assert_eq!(metrics.gpu_cpu_fallbacks, 0);
    }
    // Followers receive the newest certificate with the next heartbeat.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for engine in &mut engines {
        engine.stop().await.unwrap();
    }
    let pinned = configs[0].validator_keys().unwrap();
    for name in NAMES {
        let report = verify_log(&dir.path().join(name), Some(&pinned))
            .unwrap_or_else(|error| panic!("{name}: {error}"));
        assert!(report.entries >= last, "{name}: {report:?}");
        assert!(
            report.certified_through >= last,
            "{name} certified only {report:?}, committed {last}"
        );
        assert_eq!(report.validators, 3);
    }

    // Keys other than the cluster's are refused.
    let mut strangers = BTreeMap::new();
    for name in NAMES {
        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]).verifying_key();
        strangers.insert(NodeId::from_name(name), key);
    }
    assert!(matches!(
        verify_log(&dir.path().join("g1"), Some(&strangers)),
        Err(VerifyLogError::ValidatorsDiffer)
    ));
    assert!(matches!(
        verify_log(&dir.path().join("nowhere"), None),
        Err(VerifyLogError::NotADirectory(_))
    ));

    // One entry rewritten on disk (its data changed, everything else kept) is found.
    let damaged = dir.path().join("g2");
    let rewritten_at = 5;
    {
        let mut store = FjallLogStore::open(&damaged, SyncPolicy::EveryBatch).unwrap();
        let recovered = store.recover().unwrap();
        let mut tail: Vec<Entry> = recovered.entries[rewritten_at as usize - 1..].to_vec();
        if let Payload::Command { data, .. } = &mut tail[0].payload {
            *data = bytes::Bytes::from_static(b"forged");
        } else {
            tail[0].payload = Payload::Command {
                tag: consensus::ProposalTag {
                    proposer: NodeId(1),
                    request_id: 1,
                },
                data: bytes::Bytes::from_static(b"forged"),
            };
        }
        store.truncate_from(rewritten_at).unwrap();
        store.append(&tail).unwrap();
        store.sync().unwrap();
    }
    match verify_log(&damaged, None) {
        Err(VerifyLogError::Bad { index, why }) => {
            assert!(index <= rewritten_at, "reported {index}: {why}");
        }
        other => panic!("a rewritten entry went unnoticed: {other:?}"),
    }
}

#[test]
fn a_configuration_of_gpu_optimized_raft_needs_keys() {
    let text = r#"
[consensus]
algorithm = "gpu_optimized_raft"
node_id = "g1"
bootstrap_peers = ["g2", "g3"]
"#;
    let config = ConsensusConfig::from_toml_str(text).unwrap();
    let error = ConsensusEngine::new(config).expect_err("no key file");
    assert!(error.to_string().contains("key"), "{error}");
}

#[cfg(feature = "gpu")]
#[path = "common/gpu.rs"]
mod gpu_common;

/// The real WGSL kernels on the consensus path: every round's signatures go to the GPU
/// verifier and every round's acknowledgements to the GPU aggregator (not the automatic ones,
/// which would keep small batches on the CPU). The cluster commits, the logs verify, and the
/// context shows GPU submissions and no CPU fallback.
#[cfg(feature = "gpu")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gpu_verifier_and_aggregator_carry_a_cluster() {
    use consensus::gpu::GpuVoteAggregator;
    use std::sync::Arc;

    let Some(context) =
        gpu_common::gpu_context_or_skip("the_gpu_verifier_and_aggregator_carry_a_cluster")
    else {
        return;
    };
    let Some(verifier) = gpu_common::verifier_or_skip(
        "the_gpu_verifier_and_aggregator_carry_a_cluster",
        context.clone(),
    ) else {
        return;
    };
    let verifier = Arc::new(verifier);
    let votes = Arc::new(GpuVoteAggregator::with_context(context.clone()).expect("aggregator"));
    let before = context.metrics();
    let dir = tempfile::tempdir().unwrap();
    let network = LocalNetwork::<GpuRaftNode>::default();
    let mut engines = Vec::new();
    for config in configs(dir.path()) {
        let mut engine = ConsensusEngine::new(config.request_timeout(Duration::from_secs(60)))
            .unwrap()
            .with_signature_verifier(verifier.clone())
            .with_vote_aggregator(votes.clone())
            .with_local_network(&network);
        engine.start().await.unwrap();
        engines.push(engine);
    }
    let key = ed25519_dalek::SigningKey::from_bytes(&[4; 32]);
    for n in 0..6 {
        let proposal = Proposal::signed(format!("v{n}").into_bytes(), &key);
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            match engines[n % 3].propose(proposal.clone()).await {
                Ok(ConsensusResult::Committed { .. }) => break,
                other => assert!(Instant::now() < deadline, "{n}: {other:?}"),
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for engine in &mut engines {
        engine.stop().await.unwrap();
    }
    for name in NAMES {
        let report = verify_log(&dir.path().join(name), None)
            .unwrap_or_else(|error| panic!("{name}: {error}"));
        assert_eq!(report.client_signatures, 6, "{name}: {report:?}");
    }
    let after = context.metrics();
    assert!(
        after.submissions > before.submissions,
        "no GPU submission: the test would have passed on the CPU"
    );
    assert_eq!(
        after.cpu_fallbacks, before.cpu_fallbacks,
        "a batch fell back to the CPU"
    );
    eprintln!(
        "GPU submissions on the consensus path: {} ({})",
        after.submissions - before.submissions,
        context.adapter_name()
    );
}

/// Membership through the public API: a node started to join with its own key alone is
/// refused without its key, added as a learner with it, catches up (learning the members' keys
/// from the log), is promoted in place of a follower, and commits with its signatures; every
/// data directory, the new node's included, then checks out offline against the memberships
/// its certificates name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_with_its_key_and_replaces_a_voter() {
    let dir = tempfile::tempdir().unwrap();
    let network = LocalNetwork::<GpuRaftNode>::default();
    let mut engines = Vec::new();
    for config in configs(dir.path()) {
        let mut engine = ConsensusEngine::new(config)
            .unwrap()
            .with_local_network(&network);
        engine.start().await.unwrap();
        engines.push(engine);
    }
    let joiner_key = dir.path().join("g4.key");
    let joiner_public = generate_key_file(&joiner_key).unwrap();
    let joiner_config = ConsensusConfig::default()
        .algorithm(Algorithm::GpuOptimizedRaft)
        .node_id("g4")
        .peers(NAMES)
        .joining(true)
        .key_file(&joiner_key)
        .validator("g4", public_key_hex(&joiner_public))
        .persistent_state(dir.path().join("g4"))
        .request_timeout(Duration::from_secs(5));
    let mut joiner = ConsensusEngine::new(joiner_config.clone())
        .expect("a joining node needs only its own key")
        .with_local_network(&network);
    joiner.start().await.unwrap();
    engines.push(joiner);
    propose_until_committed(&engines[0], "before").await;

    // Asked of a follower or the leader alike; without its key, nothing changes.
    let refused = engines[1].add_learner("g4", None).await;
    assert!(
        matches!(
            refused,
            Err(consensus::Error::Membership(
                consensus::MembershipError::MissingKey(_)
            ))
        ),
        "{refused:?}"
    );
    // Nor with a small-order key (here the curve's identity), under which forgeries verify.
    let mut identity = [0u8; 32];
    identity[0] = 1;
    let weak = ed25519_dalek::VerifyingKey::from_bytes(&identity).unwrap();
    let refused = engines[1].add_learner_with_key("g4", None, &weak).await;
    assert!(
        matches!(
            refused,
            Err(consensus::Error::Membership(
                consensus::MembershipError::WeakKey(_)
            ))
        ),
        "{refused:?}"
    );
    let membership = engines[1]
        .add_learner_with_key("g4", None, &joiner_public)
        .await
        .expect("added with its key");
    assert!(membership.is_learner(NodeId::from_name("g4")));
    assert_eq!(membership.keys.len(), 4, "every member's key: {membership}");

    let leader = engines
        .iter()
        .position(|engine| engine.is_leader())
        .expect("a leader");
    let removed = (0..3).find(|&i| i != leader).unwrap();
    let voters: Vec<NodeId> = ["g1", "g2", "g3", "g4"]
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != removed)
        .map(|(_, name)| NodeId::from_name(name))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    let membership = loop {
        // The learner may still be catching up: refused with `LearnerBehind` until it has.
        match engines[leader].change_membership(voters.clone()).await {
            Ok(membership) => break membership,
            Err(error) => assert!(Instant::now() < deadline, "{error}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!membership.is_joint());
    assert!(
        !membership
            .keys
            .contains_key(&NodeId::from_name(NAMES[removed]))
    );

    let mut last = 0;
    for n in 0..10 {
        // Through the new voter (forwarded to the leader) and the leader.
        let engine = if n % 2 == 0 { 3 } else { leader };
        last = propose_until_committed(&engines[engine], &format!("after{n}")).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for engine in &mut engines {
        engine.stop().await.unwrap();
    }
    for (i, name) in ["g1", "g2", "g3", "g4"].iter().enumerate() {
        if i == removed {
            continue;
        }
        let report = verify_log(&dir.path().join(name), None)
            .unwrap_or_else(|error| panic!("{name}: {error}"));
        assert!(
            report.certified_through >= last,
            "{name} certified only {report:?}, committed {last}"
        );
        assert!(report.validators >= 3, "{name}: {report:?}");
    }
    // `verify-log --config` of the joiner: its configuration names its own key alone.
    let pinned = joiner_config.validator_keys().unwrap();
    verify_log(&dir.path().join("g4"), Some(&pinned)).expect("the joiner's own configuration");
}
