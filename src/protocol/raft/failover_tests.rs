//! Unit tests of failover: the transport's hint that the leader is unreachable, proposals kept
//! across a change of leader, and the hand-over before a clean stop. Same instant, lossless
//! delivery as `tests.rs`, whose cluster they use.

use bytes::Bytes;

use super::tests::Cluster;
use super::*;
use crate::types::NodeId;

#[test]
fn without_a_leader_a_proposal_is_held_for_two_election_timeouts_then_refused() {
    let mut cluster = Cluster::new(3, |_| {});
    cluster.isolate(NodeId(2)); // it never learns of a leader
    cluster.propose(NodeId(2), 9, "nobody leads");
    assert!(
        cluster.rejected.is_empty(),
        "refused while an election may be on"
    );
    for _ in 0..2 * 10 {
        cluster.step(NodeId(2), Input::Tick);
    }
    assert!(
        cluster.rejected.is_empty(),
        "refused within two election timeouts"
    );
    for _ in 0..2 {
        cluster.step(NodeId(2), Input::Tick);
    }
    assert_eq!(
        cluster.rejected,
        vec![Rejection {
            request_id: 9,
            reason: RejectReason::NoLeader
        }]
    );
    assert_eq!(cluster.nodes[&NodeId(2)].kept_proposals(), 0);
}

#[test]
fn a_proposal_made_before_a_leader_is_known_commits_once_one_is() {
    let mut cluster = Cluster::new(3, |_| {});
    cluster.propose(NodeId(2), 9, "early");
    let leader = cluster.elect();
    cluster.step(leader, Input::FlushProposals);
    cluster.tick_all(3);
    assert!(cluster.rejected.is_empty());
    for id in 1..=3 {
        assert_eq!(
            cluster.commands_applied(NodeId(id)),
            vec![Bytes::from_static(b"early")],
            "node {id}"
        );
    }
    assert_eq!(cluster.nodes[&NodeId(2)].kept_proposals(), 0);
}

/// The follower forwards to a leader that dies before appending: the follower sends the
/// proposal again to the leader elected next.
#[test]
fn a_forwarded_proposal_lost_with_its_leader_goes_to_the_next_leader() {
    let mut cluster = Cluster::new(3, |_| {});
    let old = cluster.elect();
    let follower = followers_of(&cluster, old)[0];
    cluster.isolate(old); // dies: the forward never arrives
    cluster.propose(follower, 5, "survives");
    assert_eq!(cluster.nodes[&follower].kept_proposals(), 1);
    for &peer in &followers_of(&cluster, old) {
        cluster.step(peer, Input::PeerUnreachable { peer: old });
    }
    cluster.tick_all(4);
    let new = new_leaders(&cluster, old);
    assert_eq!(new.len(), 1);
    cluster.step(new[0], Input::FlushProposals);
    cluster.tick_all(3);
    for id in followers_of(&cluster, old) {
        assert_eq!(
            cluster.commands_applied(id),
            vec![Bytes::from_static(b"survives")],
            "node {id}"
        );
    }
    assert_eq!(cluster.nodes[&follower].kept_proposals(), 0);
    assert!(cluster.rejected.is_empty());
}

#[test]
fn proposals_during_an_abandoned_transfer_wait_and_then_commit() {
    let mut cluster = Cluster::new(3, |_| {});
    let leader = cluster.elect();
    let target = followers_of(&cluster, leader)[0];
    cluster.isolate(target); // the transfer cannot finish
    cluster.step(
        leader,
        Input::Control(Control::TransferLeadership { to: target }),
    );
    cluster.propose(leader, 3, "during");
    assert!(cluster.rejected.is_empty());
    assert!(
        cluster.commands_applied(leader).is_empty(),
        "appended mid-transfer"
    );
    cluster.heal();
    cluster.tick_all(12); // the transfer times out after an election timeout; the batch goes
    assert!(cluster.rejected.is_empty());
    assert_eq!(
        cluster.commands_applied(leader),
        vec![Bytes::from_static(b"during")]
    );
}

/// A clean stop: the leader hands over; proposals made meanwhile at the leader and at another
/// follower commit once, under the new leader.
#[test]
fn hand_over_picks_a_caught_up_voter_and_loses_no_proposal() {
    let mut cluster = Cluster::new(3, |_| {});
    let leader = cluster.elect();
    cluster.propose(leader, 1, "before");
    let followers = followers_of(&cluster, leader);
    // The first follower lags (its link is held), so the other is the most caught up.
    cluster.slow.insert((leader, followers[0]));
    cluster.propose(leader, 2, "lagging");
    cluster.slow.insert((leader, followers[1])); // hold the TimeoutNow
    cluster.step(leader, Input::Control(Control::HandOver));
    assert_eq!(cluster.nodes[&leader].transfer_target(), Some(followers[1]));
    cluster.propose(leader, 3, "at the old leader");
    cluster.propose(followers[0], 4, "at a follower");
    cluster.slow.clear();
    for (to, input) in std::mem::take(&mut cluster.held) {
        cluster.step(to, input);
    }
    cluster.tick_all(3);
    assert_eq!(cluster.leaders(), vec![followers[1]]);
    cluster.step(followers[1], Input::FlushProposals);
    cluster.tick_all(3);
    assert!(cluster.rejected.is_empty(), "{:?}", cluster.rejected);
    let mut applied = cluster.commands_applied(followers[1]);
    applied.sort();
    let expected: Vec<Bytes> = ["at a follower", "at the old leader", "before", "lagging"]
        .iter()
        .map(|s| Bytes::from(s.as_bytes()))
        .collect();
    assert_eq!(applied, expected);
}

/// The followers of `leader`, in id order.
fn followers_of(cluster: &Cluster, leader: NodeId) -> Vec<NodeId> {
    cluster
        .nodes
        .keys()
        .copied()
        .filter(|&id| id != leader)
        .collect()
}

/// Leaders other than `old` (a cut-off old leader still believes it leads).
fn new_leaders(cluster: &Cluster, old: NodeId) -> Vec<NodeId> {
    cluster
        .leaders()
        .into_iter()
        .filter(|&id| id != old)
        .collect()
}

#[test]
fn followers_told_their_leader_is_unreachable_elect_a_new_one_before_the_timeout() {
    for reverse in [false, true] {
        let mut cluster = Cluster::new(3, |_| {});
        let old = cluster.elect();
        let term = cluster.nodes[&old].term();
        cluster.isolate(old); // killed: its connections break
        let mut followers = followers_of(&cluster, old);
        if reverse {
            followers.reverse(); // the second in id order hears first
        }
        for &follower in &followers {
            cluster.step(follower, Input::PeerUnreachable { peer: old });
        }
        // Well within one election timeout (10 ticks): the staggered start is 2 ticks.
        cluster.tick_all(4);
        let elected = new_leaders(&cluster, old);
        assert_eq!(elected.len(), 1, "reverse {reverse}: {elected:?}");
        assert_eq!(cluster.nodes[&elected[0]].term(), term + 1);
    }
}

#[test]
fn without_the_hint_the_followers_wait_for_their_election_timeout() {
    let mut cluster = Cluster::new(3, |_| {});
    let old = cluster.elect();
    cluster.isolate(old);
    cluster.tick_all(4);
    assert!(new_leaders(&cluster, old).is_empty());
}

#[test]
fn a_false_hint_does_not_depose_a_leader_that_holds_a_quorum() {
    let mut cluster = Cluster::new(5, |_| {});
    let leader = cluster.elect();
    let term = cluster.nodes[&leader].term();
    let followers = followers_of(&cluster, leader);
    // A blip on one follower's connections, then on another's: never a quorum at once.
    for &follower in &followers[..2] {
        cluster.step(follower, Input::PeerUnreachable { peer: leader });
        cluster.tick_all(30);
        assert_eq!(cluster.leaders(), vec![leader]);
        assert_eq!(cluster.nodes[&leader].term(), term);
        assert_eq!(cluster.nodes[&follower].leader(), Some(leader));
    }
}

#[test]
fn a_hint_only_starts_a_pre_vote_and_never_moves_the_term() {
    let mut cluster = Cluster::new(3, |_| {});
    let old = cluster.elect();
    let term = cluster.nodes[&old].term();
    cluster.isolate(old);
    let followers = followers_of(&cluster, old);
    // Only the first follower hears; the second still honours the lease and refuses.
    cluster.step(followers[0], Input::PeerUnreachable { peer: old });
    assert_eq!(cluster.nodes[&followers[0]].role(), Role::PreCandidate);
    assert_eq!(cluster.nodes[&followers[0]].term(), term);
    assert_eq!(cluster.nodes[&followers[1]].term(), term);

    // Without pre-vote the hint is ignored: it must never bump a term directly.
    let mut cluster = Cluster::new(3, |config| config.pre_vote = false);
    let old = cluster.elect();
    let term = cluster.nodes[&old].term();
    cluster.isolate(old);
    let follower = followers_of(&cluster, old)[0];
    cluster.step(follower, Input::PeerUnreachable { peer: old });
    assert_eq!(cluster.nodes[&follower].role(), Role::Follower);
    assert_eq!(cluster.nodes[&follower].term(), term);
}

#[test]
fn a_hint_about_a_peer_that_is_not_the_leader_changes_nothing() {
    let mut cluster = Cluster::new(3, |_| {});
    let leader = cluster.elect();
    let followers = followers_of(&cluster, leader);
    cluster.step(followers[0], Input::PeerUnreachable { peer: followers[1] });
    cluster.step(leader, Input::PeerUnreachable { peer: followers[0] });
    assert_eq!(cluster.nodes[&followers[0]].role(), Role::Follower);
    assert_eq!(cluster.leaders(), vec![leader]);
}

#[test]
fn a_pre_candidate_asks_again_a_voter_that_refused_before_its_own_hint_arrived() {
    // The second follower would wait long before campaigning itself: only the retry helps.
    let mut cluster = Cluster::new(3, |config| config.unreachable_leader_stagger_ticks = 100);
    let old = cluster.elect();
    cluster.isolate(old);
    let followers = followers_of(&cluster, old);
    cluster.step(followers[0], Input::PeerUnreachable { peer: old });
    assert_eq!(cluster.nodes[&followers[0]].role(), Role::PreCandidate); // refused by the lease
    cluster.step(followers[1], Input::PeerUnreachable { peer: old });
    cluster.tick_all(3);
    assert_eq!(new_leaders(&cluster, old), vec![followers[0]]);
}

/// A follower's proposal reaches a leader that appends it and is then cut off; the follower
/// becomes leader, buffers its kept proposal again, and steps down before appending it. The
/// first copy may still commit (the old leader's log holds it), so the proposal must never be
/// refused as if it had not left the follower: that would let its client retry a command that
/// then runs twice.
#[test]
fn a_proposal_that_left_once_is_never_refused_after_its_proposer_led_and_stepped_down() {
    let mut cluster = Cluster::new(3, |config| {
        config.pre_vote = false;
        config.check_quorum = false;
        config.batch_size = 1_000;
        config.batch_timeout_ticks = 1_000;
    });
    let leader = cluster.elect();
    let follower = cluster.another_than(leader);
    let third = cluster.other_than(&[leader, follower]);
    // The leader hears the follower but nobody hears the leader any more.
    cluster.slow.insert((leader, follower));
    cluster.slow.insert((leader, third));
    let before = cluster.nodes[&leader].log().last_index();
    cluster.propose(follower, 7, "forwarded once");
    cluster.step(leader, Input::FlushProposals);
    assert_eq!(cluster.nodes[&leader].log().last_index(), before + 1);
    cluster.isolate(leader);
    cluster.held.clear();
    for _ in 0..100 {
        cluster.step(follower, Input::Tick);
        if cluster.nodes[&follower].is_leader() {
            break;
        }
    }
    assert!(cluster.nodes[&follower].is_leader());
    let buffered = &cluster.nodes[&follower]
        .leader_state
        .as_ref()
        .unwrap()
        .batch;
    assert_eq!(buffered.proposals.len(), 1, "kept, buffered, not appended");
    // A newer term reaches it before it appends: it steps down with no leader known.
    let term = cluster.nodes[&follower].term() + 1;
    cluster.isolate(follower);
    cluster.step(
        follower,
        Input::Message(Envelope {
            from: third,
            to: follower,
            message: Message::HeartbeatResponse { term, round: 0 },
        }),
    );
    assert!(!cluster.nodes[&follower].is_leader());
    for _ in 0..100 {
        cluster.step(follower, Input::Tick);
    }
    assert!(
        cluster.rejected.iter().all(|r| r.request_id != 7),
        "refused although a copy may commit: {:?}",
        cluster.rejected
    );
}

/// Two pre-candidates with equal logs: in its first round the one with the lower id keeps its
/// claim (so that followers starting together do not split the vote), but once a round of its
/// own elected no one it yields, since it may be unable to win. (Chaos seed 1044623: the lower
/// one needed the vote of a node that did not know it, and for as long as the run lasted it
/// refused the higher one, which could have won with its vote.)
#[test]
fn a_pre_candidate_whose_round_elected_no_one_yields_to_an_equal_log() {
    let mut cluster = Cluster::new(3, |_| {});
    let (lower, higher) = (NodeId(1), NodeId(3));
    cluster.isolate(lower);
    let grants_pre_vote = |cluster: &mut Cluster| {
        let node = cluster.nodes.get_mut(&lower).unwrap();
        let request = Message::PreVote {
            term: node.term() + 1,
            last_log_index: node.log().last_index(),
            last_log_term: node.log().last_term(),
        };
        let mut out = Output::default();
        node.step(
            Input::Message(Envelope {
                from: higher,
                to: lower,
                message: request,
            }),
            &mut out,
        );
        let answers: Vec<bool> = out
            .messages
            .iter()
            .chain(&out.messages_after_write)
            .filter_map(|envelope| match envelope.message {
                Message::PreVoteResponse { granted, .. } if envelope.to == higher => Some(granted),
                _ => None,
            })
            .collect();
        assert_eq!(answers.len(), 1, "one answer: {out:?}");
        answers[0]
    };
    let rounds = |cluster: &Cluster| {
        cluster
            .events
            .iter()
            .filter(|(id, event)| {
                *id == lower
                    && matches!(
                        event,
                        crate::protocol::Event::ElectionRound {
                            round: crate::protocol::ElectionRound::PreVote,
                            ..
                        }
                    )
            })
            .count()
    };
    let timeout = cluster.nodes[&lower].config().election_timeout_ticks as usize;
    for _ in 0..timeout * 2 {
        if rounds(&cluster) == 1 {
            break;
        }
        cluster.step(lower, Input::Tick);
    }
    assert_eq!(rounds(&cluster), 1);
    assert_eq!(cluster.nodes[&lower].role(), Role::PreCandidate);
    assert!(
        !grants_pre_vote(&mut cluster),
        "first round: the lower id keeps its claim"
    );
    for _ in 0..timeout * 2 {
        if rounds(&cluster) == 2 {
            break;
        }
        cluster.step(lower, Input::Tick);
    }
    assert_eq!(rounds(&cluster), 2);
    assert!(grants_pre_vote(&mut cluster), "second round: it yields");
}
