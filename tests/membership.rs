//! Membership changes through the engine's API: a node started to join is added as a learner,
//! catches up, is promoted while the leader is removed, and the cluster goes on without it.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use consensus::protocol::RejectReason;
use consensus::{
    ConsensusConfig, ConsensusEngine, ConsensusResult, Error, LocalNetwork, MembershipError,
    NodeId, Proposal,
};

const NAMES: [&str; 4] = ["m1", "m2", "m3", "m4"];

fn id(name: &str) -> NodeId {
    NodeId::from_name(name)
}

async fn start(network: &LocalNetwork, name: &str, joining: bool) -> ConsensusEngine {
    let voters = &NAMES[..3];
    let peers: Vec<&str> = voters.iter().copied().filter(|n| *n != name).collect();
    let config = ConsensusConfig::default()
        .node_id(name)
        .peers(peers)
        .joining(joining)
        .request_timeout(Duration::from_secs(3));
    let mut engine = ConsensusEngine::new(config)
        .unwrap()
        .with_local_network(network);
    engine.start().await.unwrap();
    engine
}

#[path = "common/engines.rs"]
mod engines;

async fn leader_among(engines: &[ConsensusEngine], candidates: &[usize]) -> usize {
    engines::single_leader(engines, candidates, Duration::from_secs(5)).await
}

async fn commit(engine: &ConsensusEngine, value: &str) -> u64 {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        match engine.propose(Proposal::new("k", value)).await {
            Ok(ConsensusResult::Committed { index, .. }) => return index,
            other => assert!(Instant::now() < until, "{value} never committed: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn wait_for_index(engine: &ConsensusEngine, index: u64) {
    let until = Instant::now() + Duration::from_secs(5);
    while engine.metrics().last_applied_index < index {
        assert!(
            Instant::now() < until,
            "{} stopped short of {index}",
            engine.node_id()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_node_is_added_promoted_and_replaces_the_removed_leader() {
    let network = LocalNetwork::new();
    let mut engines = Vec::new();
    for name in &NAMES[..3] {
        engines.push(start(&network, name, false).await);
    }
    engines.push(start(&network, NAMES[3], true).await);
    let leader = leader_among(&engines, &[0, 1, 2]).await;
    commit(&engines[leader], "before").await;
    assert!(
        engines[3].membership().unwrap().voters.is_empty(),
        "a joining node knows no voters"
    );

    // Refused, with nothing changed: an empty voter set (forwarded by a follower to the leader,
    // whose refusal comes back), an address without a port.
    let follower = (leader + 1) % 3;
    match engines[follower].change_membership([]).await {
        Err(Error::Membership(MembershipError::NoVoters)) => {}
        other => panic!("an empty voter set: {other:?}"),
    }
    match engines[leader].add_learner(NAMES[3], Some("nowhere")).await {
        Err(Error::Membership(MembershipError::BadAddress { .. })) => {}
        other => panic!("an address without a port: {other:?}"),
    }

    // Asked of a follower: it goes to the leader, and the follower answers once it sees the
    // change commit.
    let membership = engines[follower].add_learner(NAMES[3], None).await.unwrap();
    assert!(membership.is_learner(id(NAMES[3])));
    let index = commit(&engines[leader], "with a learner").await;
    wait_for_index(&engines[3], index).await;
    // Asked again (a retried join), of the leader and of a follower: already done.
    engines[leader].add_learner(NAMES[3], None).await.unwrap();
    engines[follower].add_learner(NAMES[3], None).await.unwrap();

    // Promote the learner and remove the leader, in one change.
    let voters: BTreeSet<NodeId> = NAMES
        .iter()
        .map(|name| id(name))
        .filter(|&voter| voter != engines[leader].node_id())
        .collect();
    let membership = engines[leader]
        .change_membership(voters.iter().copied())
        .await
        .unwrap();
    assert_eq!(membership.voters, voters);
    assert!(!membership.is_joint());

    let remaining: Vec<usize> = (0..4).filter(|&i| i != leader).collect();
    let new_leader = leader_among(&engines, &remaining).await;
    assert!(
        !engines[leader].is_leader(),
        "the removed leader stepped down"
    );
    let index = commit(&engines[3], "after the change").await;
    for &i in &remaining {
        wait_for_index(&engines[i], index).await;
        assert_eq!(engines[i].membership().unwrap().voters, voters, "{i}");
    }
    assert!(voters.contains(&engines[new_leader].node_id()));
    // The removed node says so to its callers.
    match engines[leader]
        .propose(Proposal::new("k", "too late"))
        .await
    {
        Ok(ConsensusResult::Rejected {
            reason: RejectReason::Removed,
        }) => {}
        other => panic!("a removed node took a proposal: {other:?}"),
    }
    let removed_at = tokio::time::timeout(Duration::from_secs(5), engines[leader].removed())
        .await
        .expect("the removed node learns it was removed");
    let committed = engines[leader].metrics().last_committed_index();
    assert!(
        removed_at > 0 && removed_at <= committed,
        "{removed_at} {committed}"
    );
    for engine in &mut engines {
        engine.stop().await.unwrap();
    }
}

/// The membership lives in the fjall log: engines stopped and started again over their data
/// directories come back with the changed voters, and a learner with an empty voter list of its
/// own learns them again from its log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_membership_survives_a_restart_of_every_node() {
    let dir = tempfile::tempdir().unwrap();
    let network = LocalNetwork::new();
    let config = |name: &str| {
        let peers: Vec<&str> = NAMES[..3].iter().copied().filter(|n| *n != name).collect();
        ConsensusConfig::default()
            .node_id(name)
            .peers(peers)
            .joining(name == NAMES[3])
            .persistent_state(dir.path().join(name))
            .request_timeout(Duration::from_secs(3))
    };
    let start = |name: &'static str| {
        let network = network.clone();
        let config = config(name);
        async move {
            let mut engine = ConsensusEngine::new(config)
                .unwrap()
                .with_local_network(&network);
            engine.start().await.unwrap();
            engine
        }
    };
    let mut engines = Vec::new();
    for name in NAMES {
        engines.push(start(name).await);
    }
    let leader = leader_among(&engines, &[0, 1, 2]).await;
    engines[leader].add_learner(NAMES[3], None).await.unwrap();
    // Node 4 becomes a voter; a follower of the three is removed, the leader stays.
    let removed = (leader + 1) % 3;
    let voters: BTreeSet<NodeId> = (0..4)
        .filter(|&i| i != removed)
        .map(|i| id(NAMES[i]))
        .collect();
    engines[leader]
        .change_membership(voters.iter().copied())
        .await
        .unwrap();
    let index = commit(&engines[leader], "before the restart").await;
    for i in (0..4).filter(|&i| i != removed) {
        wait_for_index(&engines[i], index).await;
    }
    for engine in &mut engines {
        engine.stop().await.unwrap();
    }
    drop(engines);

    let mut engines = Vec::new();
    for name in NAMES {
        engines.push(start(name).await);
    }
    for i in (0..4).filter(|&i| i != removed) {
        let membership = engines[i].membership().unwrap();
        assert_eq!(membership.voters, voters, "{} after its restart", NAMES[i]);
        assert!(!membership.is_joint());
    }
    let live: Vec<usize> = (0..4).filter(|&i| i != removed).collect();
    let leader = leader_among(&engines, &live).await;
    commit(&engines[leader], "after the restart").await;
    // The removed node's log holds the membership without it; whether that committed it cannot
    // tell after a restart (Raft keeps no commit index on disk), and no member talks to it: it
    // refuses, as removed or for want of a leader, and never commits anything.
    let seen = engines[removed].membership().unwrap();
    assert!(!seen.contains(id(NAMES[removed])), "{seen}");
    match engines[removed]
        .propose(Proposal::new("k", "removed"))
        .await
    {
        Ok(ConsensusResult::Rejected {
            reason: RejectReason::Removed | RejectReason::NoLeader,
        }) => {}
        other => panic!("the removed node took a proposal after its restart: {other:?}"),
    }
    for engine in &mut engines {
        engine.stop().await.unwrap();
    }
}
