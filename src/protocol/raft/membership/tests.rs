//! Membership changes in a cluster with instant delivery (the simulator covers faults).

use std::collections::BTreeSet;

use crate::membership::{Membership, MembershipError};
use crate::protocol::Event;
use crate::protocol::raft::tests::Cluster;
use crate::protocol::raft::{Control, Input, MembershipChange, RaftConfig, RaftNode};
use crate::storage::RecoveredState;
use crate::types::NodeId;

fn ids(list: &[u64]) -> BTreeSet<NodeId> {
    list.iter().copied().map(NodeId).collect()
}

/// A cluster of voters 1..=3 and a node 4 that knows them but is no member yet (a node started
/// to join).
fn cluster_with_a_spare() -> (Cluster, NodeId) {
    let mut cluster = Cluster::new(3, |_| {});
    let mut config = RaftConfig::new(NodeId(4), Vec::new());
    config.seed = 4;
    let spare = RaftNode::new(config, RecoveredState::default()).unwrap();
    cluster.nodes.insert(NodeId(4), spare);
    let leader = cluster.elect();
    (cluster, leader)
}

fn change(cluster: &mut Cluster, at: NodeId, change: MembershipChange) {
    cluster.step(at, Input::Control(Control::ChangeMembership(change)));
}

fn refusals(cluster: &Cluster) -> Vec<MembershipError> {
    cluster
        .events
        .iter()
        .filter_map(|(_, event)| match event {
            Event::MembershipRefused { error } => Some(error.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_learner_receives_the_log_and_never_counts_toward_a_quorum() {
    let (mut cluster, leader) = cluster_with_a_spare();
    let learner = NodeId(4);
    cluster.propose(leader, 1, "before");
    change(&mut cluster, leader, MembershipChange::learner(learner));
    cluster.propose(leader, 2, "after");
    cluster.tick_all(3);
    assert_eq!(cluster.commands_applied(learner).len(), 2, "caught up");
    assert!(cluster.nodes[&learner].membership().is_learner(learner));
    assert!(refusals(&cluster).is_empty());

    // With both other voters cut off, the leader and the learner are no quorum.
    let voters: Vec<NodeId> = ids(&[1, 2, 3])
        .into_iter()
        .filter(|&id| id != leader)
        .collect();
    for &voter in &voters {
        cluster.isolate(voter);
    }
    let commit = cluster.nodes[&leader].commit_index();
    cluster.propose(leader, 3, "no quorum");
    cluster.tick_all(2);
    assert_eq!(cluster.nodes[&leader].commit_index(), commit);
    assert!(
        cluster.nodes[&learner].log().last_index() > commit,
        "the learner stores the entry"
    );

    // A learner never campaigns, however long it hears nothing.
    cluster.isolate(leader);
    cluster.tick_all(60);
    assert!(!cluster.nodes[&learner].is_leader());
    assert_eq!(
        cluster.nodes[&learner].term(),
        cluster.nodes[&leader].term()
    );
}

#[test]
fn a_voter_change_goes_through_a_joint_membership_and_a_removed_leader_steps_down() {
    let (mut cluster, leader) = cluster_with_a_spare();
    let learner = NodeId(4);
    change(&mut cluster, leader, MembershipChange::learner(learner));
    cluster.tick_all(2);
    let mut voters = ids(&[1, 2, 3, 4]);
    voters.remove(&leader);
    change(
        &mut cluster,
        leader,
        MembershipChange::ChangeVoters(voters.clone()),
    );
    cluster.tick_all(2);
    assert!(refusals(&cluster).is_empty(), "{:?}", refusals(&cluster));

    // The leader saw the joint membership, then the final one, committed.
    let committed: Vec<&Membership> = cluster
        .events
        .iter()
        .filter(|(id, _)| *id == leader)
        .filter_map(|(_, event)| match event {
            Event::MembershipChanged {
                membership,
                committed: true,
                ..
            } => Some(membership),
            _ => None,
        })
        .collect();
    assert!(committed.iter().any(|m| m.is_joint() && m.voters == voters));
    assert_eq!(
        committed.last().map(|m| (&m.voters, m.is_joint())),
        Some((&voters, false))
    );
    assert!(
        cluster
            .events
            .iter()
            .any(|(id, event)| *id == leader && matches!(event, Event::Removed { .. })),
        "the old leader reports its removal"
    );
    assert!(!cluster.nodes[&leader].is_leader(), "it stepped down");

    // The new voters elect a leader among themselves and commit without the old one.
    cluster.isolate(leader);
    let new_leader = cluster.elect();
    assert!(voters.contains(&new_leader));
    cluster.propose(new_leader, 9, "after the change");
    cluster.tick_all(3);
    for &voter in &voters {
        assert_eq!(
            cluster.commands_applied(voter).last().map(|b| &b[..]),
            Some(&b"after the change"[..]),
            "{voter}"
        );
    }
    let old_term = cluster.nodes[&leader].term();
    cluster.tick_all(60);
    assert_eq!(
        cluster.nodes[&leader].term(),
        old_term,
        "a removed node never campaigns"
    );
}

#[test]
fn unsound_or_concurrent_changes_are_refused_with_their_reason() {
    let (mut cluster, leader) = cluster_with_a_spare();
    let follower = cluster.other_than(&[leader, NodeId(4)]);
    // A follower forwards the change to its leader, whose refusal comes back to it.
    change(
        &mut cluster,
        follower,
        MembershipChange::ChangeVoters(BTreeSet::new()),
    );
    let answers: Vec<_> = cluster
        .events
        .iter()
        .filter_map(|(at, event)| match event {
            Event::MembershipForwardAnswered { result, .. } => Some((*at, result.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(answers, [(follower, Err(MembershipError::NoVoters))]);
    // The spare knows no leader to forward to.
    change(
        &mut cluster,
        NodeId(4),
        MembershipChange::learner(NodeId(4)),
    );
    change(
        &mut cluster,
        leader,
        MembershipChange::ChangeVoters(ids(&[1, 2, 9])),
    );
    change(&mut cluster, leader, MembershipChange::learner(leader));
    let refused = refusals(&cluster);
    assert_eq!(refused[0], MembershipError::NotLeader { leader: None });
    assert_eq!(refused[1], MembershipError::UnknownNode(NodeId(9)));
    assert_eq!(refused[2], MembershipError::AlreadyVoter(leader));
    assert_eq!(
        cluster.nodes[&leader].membership(),
        &Membership::of_voters(ids(&[1, 2, 3]))
    );

    // A second change while the first is not committed.
    let others: Vec<NodeId> = ids(&[1, 2, 3])
        .into_iter()
        .filter(|&id| id != leader)
        .collect();
    cluster.isolate(others[0]);
    cluster.isolate(others[1]);
    cluster.isolate(NodeId(4));
    change(&mut cluster, leader, MembershipChange::learner(NodeId(4)));
    change(&mut cluster, leader, MembershipChange::learner(NodeId(5)));
    assert!(matches!(
        refusals(&cluster)[3],
        MembershipError::ChangeInProgress { .. }
    ));
    cluster.heal();
    cluster.tick_all(3);

    // A learner cut off since it joined is behind; a voter set without a live majority stops.
    cluster.isolate(NodeId(4));
    for i in 0..(RaftConfig::new(leader, vec![leader]).max_entries_per_append as u64 + 2) {
        cluster.propose(leader, 100 + i, "x");
    }
    let mut with_learner = ids(&[1, 2, 3]);
    with_learner.insert(NodeId(4));
    change(
        &mut cluster,
        leader,
        MembershipChange::ChangeVoters(with_learner),
    );
    assert!(matches!(
        refusals(&cluster)[4],
        MembershipError::LearnerBehind { id: NodeId(4), .. }
    ));
    cluster.heal();
    cluster.tick_all(12);
    // Caught up, then silent for two check-quorum rounds: {leader, 4} would have no quorum.
    cluster.isolate(NodeId(4));
    cluster.tick_all(25);
    assert_eq!(cluster.leaders(), vec![leader]);
    change(
        &mut cluster,
        leader,
        MembershipChange::ChangeVoters([leader, NodeId(4)].into()),
    );
    assert!(matches!(
        &refusals(&cluster)[5],
        MembershipError::NoReachableQuorum { reachable } if reachable == &vec![leader]
    ));
}

#[test]
fn a_joint_membership_needs_both_majorities_to_commit() {
    let (mut cluster, leader) = cluster_with_a_spare();
    change(&mut cluster, leader, MembershipChange::learner(NodeId(4)));
    cluster.tick_all(2);
    // Old voters {1, 2, 3}, new voters {leader, 4}: cut the learner before the joint entry
    // reaches it, so only the old majority can store it.
    cluster.isolate(NodeId(4));
    change(
        &mut cluster,
        leader,
        MembershipChange::ChangeVoters([leader, NodeId(4)].into()),
    );
    assert!(refusals(&cluster).is_empty(), "{:?}", refusals(&cluster));
    let commit = cluster.nodes[&leader].commit_index();
    assert!(cluster.nodes[&leader].membership().is_joint());
    cluster.propose(leader, 1, "x");
    cluster.tick_all(2);
    assert_eq!(
        cluster.nodes[&leader].commit_index(),
        commit,
        "the old voters alone do not commit in a joint membership"
    );
    cluster.heal();
    cluster.tick_all(4);
    assert!(cluster.nodes[&leader].commit_index() > commit);
    assert!(!cluster.nodes[&leader].membership().is_joint());
    assert_eq!(
        cluster.nodes[&leader].membership().voters,
        BTreeSet::from([leader, NodeId(4)])
    );
}

#[test]
fn a_restart_and_a_snapshot_keep_the_membership() {
    let (mut cluster, leader) = cluster_with_a_spare();
    change(&mut cluster, leader, MembershipChange::learner(NodeId(4)));
    cluster.propose(leader, 1, "x");
    cluster.tick_all(2);
    let membership = cluster.nodes[&leader].membership().clone();
    assert!(membership.is_learner(NodeId(4)));

    // From the log alone.
    let node = cluster.nodes.remove(&NodeId(4)).unwrap();
    let config = node.config().clone();
    let restarted = RaftNode::new(config.clone(), node.into_recovered_state()).unwrap();
    assert_eq!(restarted.membership(), &membership);

    // From a snapshot after which the log holds nothing.
    let index = cluster.nodes[&leader].commit_index();
    let term = cluster.nodes[&leader].log().term_at(index).unwrap();
    let recovered = RecoveredState {
        snapshot: Some(crate::storage::Snapshot {
            index,
            term,
            data: bytes::Bytes::new(),
            membership: Some(membership.clone()),
        }),
        ..RecoveredState::default()
    };
    let restarted = RaftNode::new(config, recovered).unwrap();
    assert_eq!(restarted.membership(), &membership);
}

/// A follower whose uncommitted membership entry is replaced, at the same index, by another
/// leader's different one reports the membership now in force.
#[test]
fn a_membership_replaced_at_the_same_index_is_reported() {
    use crate::protocol::raft::{Envelope, Message, Output};
    use crate::types::{Entry, Payload};
    let voters: Vec<NodeId> = (1..=3).map(NodeId).collect();
    let mut follower = RaftNode::new(
        RaftConfig::new(NodeId(3), voters),
        RecoveredState::default(),
    )
    .unwrap();
    let append = |term, membership: &Membership| {
        Input::Message(Envelope {
            from: NodeId(term),
            to: NodeId(3),
            message: Message::AppendEntries {
                term,
                prev_log_index: 0,
                prev_log_term: 0,
                entries: vec![Entry {
                    term,
                    index: 1,
                    payload: Payload::Membership(Box::new(membership.clone())),
                }],
                leader_commit: 0,
            },
        })
    };
    let first = Membership {
        learners: ids(&[4]),
        ..Membership::of_voters(ids(&[1, 2, 3]))
    };
    let second = Membership {
        learners: ids(&[5]),
        ..Membership::of_voters(ids(&[1, 2, 3]))
    };
    let mut out = Output::default();
    follower.step(append(1, &first), &mut out);
    let mut out = Output::default();
    follower.step(append(2, &second), &mut out);
    assert_eq!(follower.membership(), &second);
    assert!(
        out.events.iter().any(|event| matches!(
            event,
            Event::MembershipChanged { index: 1, membership, committed: false } if *membership == second
        )),
        "{:?}",
        out.events
    );
}

/// A voter answers (pre-)vote requests from a node outside the membership it knows: a voter of a
/// newer membership whose entry has not reached it yet may need its vote. (Chaos seed 1044623:
/// the pre-candidate of a joint membership that the tie-break favoured needed the vote of a
/// voter lacking the entry that added it, which ignored its pre-votes as a stranger's, and the
/// group elected no one.) Whether such a vote counts is the candidate's affair: it counts only
/// its own membership's voters.
#[test]
fn a_voter_answers_vote_requests_from_outside_its_membership() {
    use crate::protocol::raft::{Envelope, Message, Output};
    let mut cluster = Cluster::new(3, |_| {});
    let (voter, stranger) = (NodeId(1), NodeId(9));
    let requests = [
        Message::PreVote {
            term: 1,
            last_log_index: 0,
            last_log_term: 0,
        },
        Message::RequestVote {
            term: 1,
            last_log_index: 0,
            last_log_term: 0,
            leadership_transfer: false,
        },
    ];
    for request in requests {
        let mut out = Output::default();
        cluster.nodes.get_mut(&voter).unwrap().step(
            Input::Message(Envelope {
                from: stranger,
                to: voter,
                message: request.clone(),
            }),
            &mut out,
        );
        let granted = out
            .messages
            .iter()
            .chain(&out.messages_after_write)
            .any(|envelope| {
                envelope.to == stranger
                    && matches!(
                        envelope.message,
                        Message::PreVoteResponse { granted: true, .. }
                            | Message::RequestVoteResponse { granted: true, .. }
                    )
            });
        assert!(granted, "{request:?} unanswered: {out:?}");
    }
}
