//! Unit tests of the wrapper: a tiny lock-step cluster, and messages forged by hand.

use std::collections::BTreeMap;

use bytes::Bytes;

use super::*;
use crate::gpu::CpuSignatureVerifier;
use crate::protocol::pbft::{test_signing_key, test_validators};
use crate::protocol::raft::{RaftConfig, SignedVote};
use crate::protocol::{InvalidReason, Protocol, RejectReason};
use crate::storage::RecoveredState;
use crate::types::{Entry, NodeId};

fn unsigned(command: &[u8]) -> Bytes {
    crate::client_signature::frame(command, None).unwrap()
}

fn signed(command: &[u8], client: u8) -> Bytes {
    let key = ed25519_dalek::SigningKey::from_bytes(&[client; 32]);
    let signature = crate::ClientSignature::sign(command, &key);
    crate::client_signature::frame(command, Some(&signature)).unwrap()
}

fn ids(n: u64) -> Vec<NodeId> {
    (1..=n).map(NodeId).collect()
}

fn node(id: NodeId, voters: &[NodeId]) -> GpuRaftNode {
    let mut raft = RaftConfig::new(id, voters.to_vec());
    raft.seed = id.0;
    let config = GpuRaftConfig::new(raft, test_signing_key(id), test_validators(voters));
    GpuRaftNode::new(config, RecoveredState::default()).expect("valid")
}

/// Nodes stepped in lock step: every message is delivered in the next round, every write is
/// durable at once.
struct Cluster {
    nodes: Vec<GpuRaftNode>,
    queue: Vec<Envelope>,
    committed: BTreeMap<NodeId, Vec<Entry>>,
    /// Messages from these senders are dropped.
    muted: Vec<NodeId>,
}

impl Cluster {
    fn new(n: u64) -> Self {
        let voters = ids(n);
        Cluster {
            nodes: voters.iter().map(|&id| node(id, &voters)).collect(),
            queue: Vec::new(),
            committed: BTreeMap::new(),
            muted: Vec::new(),
        }
    }

    fn carry(&mut self, index: usize, mut out: Output) {
        loop {
            let durable = crate::protocol::Durability::of(&out.write);
            self.queue.append(&mut out.messages);
            self.queue.append(&mut out.messages_after_write);
            let id = self.nodes[index].id();
            self.committed
                .entry(id)
                .or_default()
                .append(&mut out.committed);
            let mut next = Output::default();
            if !durable.tell(&mut self.nodes[index], &mut next) {
                return;
            }
            out = next;
        }
    }

    fn step(&mut self, index: usize, input: Input) {
        let mut out = Output::default();
        self.nodes[index].step(input, &mut out);
        self.carry(index, out);
    }

    /// Delivers everything queued, one authenticated round per receiver.
    fn deliver(&mut self) {
        let queued = std::mem::take(&mut self.queue);
        for index in 0..self.nodes.len() {
            let id = self.nodes[index].id();
            let mut round: Vec<Envelope> = queued
                .iter()
                .filter(|e| e.to == id && !self.muted.contains(&e.from))
                .cloned()
                .collect();
            self.nodes[index].authenticate(&mut round);
            let mut out = Output::default();
            self.nodes[index].step_round(&mut round, &mut out);
            self.carry(index, out);
        }
    }

    /// Proposes `data` on node `index` and flushes its batch.
    fn propose(&mut self, index: usize, request_id: u64, data: Bytes) {
        self.step(index, Input::Propose { request_id, data });
        self.step(index, Input::FlushProposals);
    }

    fn tick(&mut self) {
        for index in 0..self.nodes.len() {
            self.step(index, Input::Tick);
        }
        self.deliver();
    }

    fn leader(&mut self) -> usize {
        for _ in 0..200 {
            if let Some(index) = self.nodes.iter().position(|n| n.raft().is_leader()) {
                return index;
            }
            self.tick();
        }
        panic!("no leader elected");
    }
}

#[test]
fn a_leader_commits_what_signed_acks_certify_and_followers_keep_the_certificate() {
    let mut cluster = Cluster::new(3);
    let leader = cluster.leader();
    for request_id in 0..10 {
        let data = unsigned(format!("command {request_id}").as_bytes());
        cluster.step(leader, Input::Propose { request_id, data });
    }
    cluster.step(leader, Input::FlushProposals);
    // Followers get the certificate with a heartbeat once it stood still for one.
    for _ in 0..30 {
        cluster.tick();
    }
    let validators = test_validators(&ids(3));
    let last = cluster.nodes[leader].raft().log().last_index();
    for node in &cluster.nodes {
        assert_eq!(node.raft().commit_index(), last, "{node:?} did not commit");
        let certificate = node.certificate().expect("every node holds a certificate");
        assert_eq!(certificate.index, last);
        assert_eq!(node.chain_at(certificate.index), Some(certificate.chain));
        certificate
            .verify(&validators, &CpuSignatureVerifier)
            .expect("the certificate verifies");
        assert_eq!(node.miscounted_acks(), 0);
    }
    let applied = &cluster.committed[&cluster.nodes[leader].id()];
    assert_eq!(applied.len() as u64, last);
}

#[test]
fn forged_unsigned_and_foreign_acks_are_never_counted() {
    let mut cluster = Cluster::new(3);
    let leader = cluster.leader();
    let leader_id = cluster.nodes[leader].id();
    let followers: Vec<NodeId> = ids(3).into_iter().filter(|&id| id != leader_id).collect();
    cluster.muted = followers.clone();
    cluster.propose(leader, 1, unsigned(b"x"));
    cluster.deliver();
    let commit = cluster.nodes[leader].raft().commit_index();
    let node = &mut cluster.nodes[leader];
    let term = node.raft().term();
    let last = node.raft().log().last_index();
    let chain = node.chain_at(last).expect("in the log");
    let from = followers[0];
    let envelope = |message| Envelope {
        from,
        to: leader_id,
        message,
    };
    let mut forged = SignedAck::sign(from, term, last, chain, &test_signing_key(from));
    let mut signature = forged.signature.to_vec();
    signature[3] ^= 0x40;
    forged.signature = signature.into();
    // Signed with the sender's own key, but over a chain value of another log.
    let foreign = SignedAck::sign(from, term, last, [9; 32], &test_signing_key(from));
    // Signed by another node than the one it claims.
    let impersonated = SignedAck::sign(from, term, last, chain, &test_signing_key(followers[1]));
    let mut round = vec![
        envelope(Message::Raft(raft::Message::AppendEntriesResponse {
            term,
            index: last,
            reject: None,
        })),
        envelope(Message::Ack(forged)),
        envelope(Message::Ack(foreign)),
        envelope(Message::Ack(impersonated)),
    ];
    assert_eq!(
        node.authenticate(&mut round),
        3,
        "one in the middle survives"
    );
    assert_eq!(round.len(), 1);
    let mut out = Output::default();
    node.step_round(&mut round, &mut out);
    let invalid = node.invalid_messages();
    assert_eq!(invalid.get(InvalidReason::BadSignature), 2);
    assert_eq!(invalid.get(InvalidReason::Malformed), 2);
    assert_eq!(
        node.raft().commit_index(),
        commit,
        "nothing forged is counted"
    );

    // The genuine acknowledgement commits.
    let genuine = SignedAck::sign(from, term, last, chain, &test_signing_key(from));
    let mut round = vec![envelope(Message::Ack(genuine))];
    assert_eq!(node.authenticate(&mut round), 0);
    let mut out = Output::default();
    node.step_round(&mut round, &mut out);
    assert_eq!(node.raft().commit_index(), last);
    assert_eq!(out.committed.last().map(|e| e.index), Some(last));
}

#[test]
fn a_voter_that_votes_for_two_candidates_is_proven_by_its_own_signatures() {
    let voters = ids(3);
    let mut candidate = node(NodeId(1), &voters);
    let (voter, winner) = (NodeId(3), NodeId(2));
    let vote_for =
        |candidate: NodeId| SignedVote::sign(7, candidate, voter, &test_signing_key(voter));
    let mut round = vec![Envelope {
        from: voter,
        to: NodeId(1),
        message: Message::Grant {
            term: 7,
            pre_vote: false,
            signature: vote_for(NodeId(1)).signature,
        },
    }];
    round.push(Envelope {
        from: winner,
        to: NodeId(1),
        message: Message::Elected {
            term: 7,
            votes: vec![vote_for(winner)],
        },
    });
    assert_eq!(candidate.authenticate(&mut round), 0);
    let mut out = Output::default();
    candidate.step_round(&mut round, &mut out);
    assert!(
        out.events
            .contains(&crate::protocol::Event::ByzantineDetected {
                offender: voter,
                offence: "vote_equivocation",
            })
    );
    let proof = &candidate.evidence()[&voter];
    assert_eq!(
        proof.verify(&test_validators(&voters), &CpuSignatureVerifier),
        Ok(voter)
    );
    // A vote announced in another's name with a bad signature is dropped unread.
    let mut forged = vote_for(winner);
    forged.signature = Bytes::from(vec![0; 64]);
    let mut round = vec![Envelope {
        from: winner,
        to: NodeId(1),
        message: Message::Elected {
            term: 7,
            votes: vec![forged],
        },
    }];
    assert_eq!(candidate.authenticate(&mut round), 1);
}

#[test]
fn a_restarted_node_keeps_its_certificate_and_evidence() {
    let mut cluster = Cluster::new(3);
    let leader = cluster.leader();
    cluster.propose(leader, 1, unsigned(b"x"));
    for _ in 0..4 {
        cluster.tick();
    }
    let node = cluster.nodes.remove(leader);
    let held = node.certificate().cloned().expect("certificate");
    let config = node.config().clone();
    let recovered = node.into_recovered_state();
    let restarted = GpuRaftNode::new(config.clone(), recovered.clone()).expect("restarts");
    assert_eq!(restarted.certificate(), Some(&held));
    assert_eq!(restarted.chain_at(held.index), Some(held.chain));

    let mut damaged = recovered;
    for value in damaged.records.values_mut() {
        value.truncate(3);
    }
    let error = GpuRaftNode::new(config, damaged).expect_err("a damaged record is refused");
    assert!(error.to_string().contains("damaged"), "{error}");
}

#[test]
fn signed_commands_are_checked_as_a_batch_and_a_bad_one_in_the_middle_is_refused_alone() {
    let mut cluster = Cluster::new(3);
    let leader = cluster.leader();
    let mut forged = signed(b"c2", 9).to_vec();
    forged[40] ^= 1;
    let proposals = [
        signed(b"c1", 9),
        Bytes::from(forged),
        signed(b"c3", 8),
        Bytes::from_static(&[7, 7]), // no frame at all
    ];
    let mut out = Output::default();
    for (request_id, data) in proposals.into_iter().enumerate() {
        let request_id = request_id as u64;
        cluster.nodes[leader].step(Input::Propose { request_id, data }, &mut out);
    }
    let refused: Vec<(u64, &RejectReason)> = out
        .rejected
        .iter()
        .map(|r| (r.request_id, &r.reason))
        .collect();
    assert_eq!(
        refused.len(),
        1,
        "only the frameless one is refused at once: {refused:?}"
    );
    cluster.nodes[leader].step(Input::FlushProposals, &mut out);
    let refused: Vec<u64> = out.rejected.iter().map(|r| r.request_id).collect();
    assert_eq!(refused, [3, 1]);
    assert!(matches!(
        out.rejected[1].reason,
        RejectReason::ClientSignature { reason } if reason.contains("verify")
    ));
    cluster.carry(leader, out);
    for _ in 0..4 {
        cluster.tick();
    }
    let applied: Vec<Bytes> = cluster.committed[&cluster.nodes[leader].id()]
        .iter()
        .filter_map(|entry| match &entry.payload {
            crate::types::Payload::Command { data, .. } => Some(data.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(
        applied,
        [Bytes::from_static(b"c1"), Bytes::from_static(b"c3")]
    );
}

#[test]
fn an_allow_list_refuses_strangers_and_unsigned_commands() {
    let voters = ids(1);
    let mut raft = RaftConfig::new(NodeId(1), voters.clone());
    raft.seed = 1;
    let mut config =
        GpuRaftConfig::new(raft, test_signing_key(NodeId(1)), test_validators(&voters));
    let allowed = ed25519_dalek::SigningKey::from_bytes(&[9; 32])
        .verifying_key()
        .to_bytes();
    config.client_keys = Some([allowed].into());
    let mut node = GpuRaftNode::new(config, RecoveredState::default()).unwrap();
    let mut out = Output::default();
    for (request_id, data) in [unsigned(b"a"), signed(b"b", 8), signed(b"c", 9)]
        .into_iter()
        .enumerate()
    {
        node.step(
            Input::Propose {
                request_id: request_id as u64,
                data,
            },
            &mut out,
        );
    }
    node.step(Input::FlushProposals, &mut out);
    // The allowed client's command passes the check (and meets a node not yet leader).
    let refused: Vec<u64> = out
        .rejected
        .iter()
        .filter(|r| matches!(r.reason, RejectReason::ClientSignature { .. }))
        .map(|r| r.request_id)
        .collect();
    assert_eq!(refused, [0, 1], "{:?}", out.rejected);
}

/// A node started to join: no members, its own key alone.
fn joining_node(id: NodeId) -> GpuRaftNode {
    let mut raft = RaftConfig::new(id, Vec::new());
    raft.seed = id.0;
    let config = GpuRaftConfig::new(raft, test_signing_key(id), test_validators(&[id]));
    GpuRaftNode::new(config, RecoveredState::default()).expect("valid")
}

fn change(cluster: &mut Cluster, leader: usize, change: crate::membership::MembershipChange) {
    cluster.step(
        leader,
        Input::Control(raft::Control::ChangeMembership(change)),
    );
}

fn key_of(id: u64) -> Option<[u8; 32]> {
    Some(test_signing_key(NodeId(id)).verifying_key().to_bytes())
}

fn learner_with_key(id: u64) -> crate::membership::MembershipChange {
    crate::membership::MembershipChange::AddLearner {
        id: NodeId(id),
        address: None,
        key: key_of(id),
    }
}

/// Everything every live node committed is the same log, and each node's newest certificate
/// verifies against the membership it names in that node's own log.
fn assert_certified(cluster: &Cluster, nodes: &[usize]) {
    for &index in nodes {
        let node = &cluster.nodes[index];
        let certificate = node.certificate().expect("every node holds a certificate");
        assert_eq!(node.chain_at(certificate.index), Some(certificate.chain));
        node.check_certificate(certificate)
            .unwrap_or_else(|error| panic!("{node:?}: {error}"));
        assert_eq!(node.miscounted_acks(), 0);
    }
}

/// A learner is added only with its key; it takes the log from a leader whose key it learns
/// from the membership; then the voters change through a joint membership, the learner votes
/// and signs, a removed voter is gone, and every certificate names the membership it was
/// counted under.
#[test]
fn members_change_with_their_keys_in_the_log() {
    let mut cluster = Cluster::new(3);
    cluster.nodes.push(joining_node(NodeId(4)));
    let leader = cluster.leader();
    let mut out = Output::default();
    cluster.nodes[leader].step(
        Input::Control(raft::Control::ChangeMembership(
            crate::membership::MembershipChange::learner(NodeId(4)),
        )),
        &mut out,
    );
    assert!(
        out.write.append.is_empty(),
        "nothing appended without a key"
    );
    assert!(
        matches!(
            out.events[..],
            [crate::protocol::Event::MembershipRefused {
                error: crate::membership::MembershipError::MissingKey(NodeId(4))
            }]
        ),
        "{:?}",
        out.events
    );
    // Nor with a small-order key: the identity point (y = 1).
    let mut identity = [0u8; 32];
    identity[0] = 1;
    let mut out = Output::default();
    cluster.nodes[leader].step(
        Input::Control(raft::Control::ChangeMembership(
            crate::membership::MembershipChange::AddLearner {
                id: NodeId(4),
                address: None,
                key: Some(identity),
            },
        )),
        &mut out,
    );
    assert!(
        out.write.append.is_empty(),
        "nothing appended with a weak key"
    );
    assert!(
        matches!(
            out.events[..],
            [crate::protocol::Event::MembershipRefused {
                error: crate::membership::MembershipError::WeakKey(NodeId(4))
            }]
        ),
        "{:?}",
        out.events
    );

    change(&mut cluster, leader, learner_with_key(4));
    for _ in 0..30 {
        cluster.tick();
    }
    let learner = &cluster.nodes[3];
    assert!(learner.raft().membership().is_learner(NodeId(4)));
    assert_eq!(
        learner.raft().membership().keys.get(&NodeId(4)).copied(),
        key_of(4)
    );
    assert_eq!(
        learner.raft().membership().keys.len(),
        4,
        "every member's key travels in the membership"
    );
    assert_eq!(
        learner.raft().commit_index(),
        cluster.nodes[leader].raft().commit_index()
    );

    // Replace a follower by the learner.
    let removed = (0..3).find(|&i| i != leader).unwrap();
    let removed_id = cluster.nodes[removed].id();
    let voters: std::collections::BTreeSet<NodeId> = [1, 2, 3, 4]
        .map(NodeId)
        .into_iter()
        .filter(|&id| id != removed_id)
        .collect();
    change(
        &mut cluster,
        leader,
        crate::membership::MembershipChange::ChangeVoters(voters.clone()),
    );
    for _ in 0..30 {
        cluster.tick();
    }
    let membership = cluster.nodes[leader].raft().membership().clone();
    assert_eq!(membership.voters, voters, "{membership}");
    assert!(
        !membership.is_joint(),
        "{membership} at {}, commit {} of {}: {:?}",
        cluster.nodes[leader].raft().membership_index(),
        cluster.nodes[leader].raft().commit_index(),
        cluster.nodes[leader].raft().log().last_index(),
        cluster
            .nodes
            .iter()
            .map(|n| (n.id(), n.raft().log().last_index(), n.raft().commit_index()))
            .collect::<Vec<_>>()
    );
    assert!(!membership.keys.contains_key(&removed_id));
    assert!(cluster.nodes[leader].raft().is_leader());

    for request_id in 0..5 {
        cluster.propose(leader, request_id, unsigned(b"after the change"));
    }
    for _ in 0..30 {
        cluster.tick();
    }
    let live: Vec<usize> = (0..4).filter(|&i| i != removed).collect();
    let last = cluster.nodes[leader].raft().log().last_index();
    for &index in &live {
        assert_eq!(cluster.nodes[index].raft().commit_index(), last);
        assert_eq!(
            cluster.nodes[index].certificate().map(|c| c.index),
            Some(last),
            "node {} holds the newest certificate",
            cluster.nodes[index].id()
        );
    }
    let certificate = cluster.nodes[leader].certificate().unwrap();
    assert_eq!(
        certificate.membership_index,
        cluster.nodes[leader].raft().membership_index()
    );
    assert!(
        certificate
            .acks
            .iter()
            .all(|ack| voters.contains(&ack.voter)),
        "only the new voters sign: {:?}",
        certificate.acks
    );
    assert!(certificate.membership_index > 0);
    assert_certified(&cluster, &live);
}

/// While a joint membership is in force, acknowledgements of the new voters alone commit
/// nothing: a majority of the outgoing voters must store the entry too.
#[test]
fn a_joint_membership_needs_a_majority_of_both_voter_sets() {
    let mut cluster = Cluster::new(3);
    cluster.nodes.push(joining_node(NodeId(4)));
    cluster.nodes.push(joining_node(NodeId(5)));
    let leader = cluster.leader();
    let leader_id = cluster.nodes[leader].id();
    for id in [4, 5] {
        change(&mut cluster, leader, learner_with_key(id));
        for _ in 0..20 {
            cluster.tick();
        }
    }
    assert_eq!(
        cluster.nodes[leader].raft().membership().learners.len(),
        2,
        "{}",
        cluster.nodes[leader].raft().membership()
    );
    let old_followers: Vec<NodeId> = ids(3).into_iter().filter(|&id| id != leader_id).collect();
    cluster.muted = old_followers.clone();
    let commit_before = cluster.nodes[leader].raft().commit_index();
    let new_voters = [leader_id, NodeId(4), NodeId(5)].into_iter().collect();
    change(
        &mut cluster,
        leader,
        crate::membership::MembershipChange::ChangeVoters(new_voters),
    );
    for _ in 0..4 {
        cluster.tick();
    }
    let node = &cluster.nodes[leader];
    assert!(node.raft().membership().is_joint());
    assert_eq!(
        node.raft().commit_index(),
        commit_before,
        "the new voters alone committed the joint membership"
    );
    cluster.muted.clear();
    for _ in 0..30 {
        cluster.tick();
    }
    let node = &cluster.nodes[leader];
    assert!(!node.raft().membership().is_joint());
    assert_eq!(node.raft().commit_index(), node.raft().log().last_index());
    let live: Vec<usize> = (0..5)
        .filter(|&i| {
            let id = cluster.nodes[i].id();
            id == leader_id || id.0 >= 4
        })
        .collect();
    assert_certified(&cluster, &live);
}
