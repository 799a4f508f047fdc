//! Unit tests of ReadIndex and lease reads on the instant-delivery cluster of `tests.rs`. The
//! simulator's linearizability checker covers them under faults.

use super::tests::Cluster;
use super::*;
use crate::protocol::ReadState;
use crate::types::{LogIndex, Term};

fn read(cluster: &mut Cluster, at: NodeId, request_id: u64) {
    cluster.step(at, Input::Read { request_id });
    cluster.step(at, Input::FlushProposals);
}

/// `candidate`'s vote request at `term` (not a leadership transfer) for `voter`, for a log
/// ending at `last_log_index` in `last_log_term`.
fn vote_request(
    candidate: NodeId,
    voter: NodeId,
    term: Term,
    last_log_index: LogIndex,
    last_log_term: Term,
) -> Input {
    Input::Message(Envelope {
        from: candidate,
        to: voter,
        message: Message::RequestVote {
            term,
            last_log_index,
            last_log_term,
            leadership_transfer: false,
        },
    })
}

/// Whether `out` grants a vote.
fn grants_a_vote(out: &Output) -> bool {
    out.messages_after_write.iter().any(|e| {
        matches!(
            e.message,
            Message::RequestVoteResponse { granted: true, .. }
        )
    })
}

/// The read indexes output so far, as `(node, request id, index)`.
fn served(cluster: &Cluster) -> Vec<(NodeId, u64, LogIndex)> {
    cluster
        .reads
        .iter()
        .map(|&(node, ReadState { request_id, index })| (node, request_id, index))
        .collect()
}

#[test]
fn a_leader_serves_a_read_at_its_commit_index_once_a_quorum_answered_a_round() {
    let mut cluster = Cluster::new(3, |_| {});
    let leader = cluster.elect();
    cluster.propose(leader, 1, "a");
    let commit = cluster.nodes[&leader].commit_index();
    let follower = cluster.another_than(leader);
    let other = cluster.other_than(&[leader, follower]);
    // Both followers' answers held back: no quorum has confirmed the leadership yet.
    cluster.slow.insert((follower, leader));
    cluster.slow.insert((other, leader));
    read(&mut cluster, leader, 7);
    assert!(
        served(&cluster).is_empty(),
        "served before any round came back"
    );
    // One answer is a quorum with the leader itself.
    let held = std::mem::take(&mut cluster.held);
    let (first, rest): (Vec<_>, Vec<_>) = held.into_iter().partition(
        |(_, input)| matches!(input, Input::Message(envelope) if envelope.from == follower),
    );
    cluster.held = rest;
    for (to, input) in first {
        cluster.step(to, input);
    }
    assert_eq!(served(&cluster), vec![(leader, 7, commit)]);
}

#[test]
fn reads_that_arrive_while_a_round_is_out_ride_the_next_one() {
    let mut cluster = Cluster::new(3, |_| {});
    let leader = cluster.elect();
    let followers: Vec<NodeId> = cluster
        .nodes
        .keys()
        .copied()
        .filter(|&id| id != leader)
        .collect();
    for &follower in &followers {
        cluster.slow.insert((follower, leader));
    }
    let round = |cluster: &Cluster| {
        let state = cluster.nodes[&leader].leader_state.as_ref().unwrap();
        state.reads.round
    };
    let before = round(&cluster);
    read(&mut cluster, leader, 1);
    assert_eq!(
        round(&cluster),
        before + 1,
        "a lone read starts a round at once"
    );
    cluster.step(leader, Input::Read { request_id: 2 });
    cluster.step(leader, Input::Read { request_id: 3 });
    assert_eq!(
        round(&cluster),
        before + 1,
        "the others wait for the batch's end"
    );
    cluster.step(leader, Input::FlushProposals);
    assert_eq!(
        round(&cluster),
        before + 2,
        "one round for the batch of two"
    );
    for request_id in 4..20 {
        read(&mut cluster, leader, request_id);
    }
    assert_eq!(
        round(&cluster),
        before + READ_ROUNDS_IN_FLIGHT,
        "no more rounds out than the bound"
    );
    assert!(served(&cluster).is_empty());
    cluster.slow.clear();
    // The answers serve every read, starting the round the last ones need as they come in.
    for (to, input) in std::mem::take(&mut cluster.held) {
        cluster.step(to, input);
    }
    let ids: Vec<u64> = served(&cluster).iter().map(|&(_, id, _)| id).collect();
    assert_eq!(ids, (1..20).collect::<Vec<u64>>());
}

#[test]
fn a_follower_serves_a_read_at_the_index_its_leader_answers() {
    let mut cluster = Cluster::new(3, |_| {});
    let leader = cluster.elect();
    cluster.propose(leader, 1, "a");
    cluster.propose(leader, 2, "b");
    let follower = cluster.another_than(leader);
    read(&mut cluster, follower, 9);
    let commit = cluster.nodes[&leader].commit_index();
    assert_eq!(served(&cluster), vec![(follower, 9, commit)]);
    assert!(
        cluster.nodes[&follower].commit_index() >= commit,
        "the round's heartbeat brought the commit along"
    );
    assert_eq!(cluster.nodes[&follower].waiting_reads(), 0);
}

#[test]
fn a_deposed_leader_never_serves_a_read_that_misses_the_new_leaders_writes() {
    let mut cluster = Cluster::new(3, |_| {});
    let old = cluster.elect();
    cluster.isolate(old);
    // The others elect a new leader and commit a write the old one never saw.
    let mut new = None;
    for _ in 0..200 {
        cluster.tick_all(1);
        new = cluster.leaders().into_iter().find(|&id| id != old);
        if new.is_some() {
            break;
        }
    }
    let new = new.expect("the majority elects a leader");
    cluster.propose(new, 5, "written");
    let written_at = cluster.nodes[&new].commit_index();
    // The old leader (if it still thinks it leads) must not answer from its stale state.
    read(&mut cluster, old, 11);
    assert!(served(&cluster).is_empty());
    cluster.heal();
    cluster.tick_all(30);
    let reads = served(&cluster);
    assert_eq!(reads.len(), 1, "served once, after the heal: {reads:?}");
    let (node, id, index) = reads[0];
    assert_eq!((node, id), (old, 11));
    assert!(
        index >= written_at,
        "read index {index} misses {written_at}"
    );
}

#[test]
fn a_follower_without_a_leader_refuses_its_reads_after_retention() {
    let mut cluster = Cluster::new(3, |_| {});
    let leader = cluster.elect();
    let follower = cluster.another_than(leader);
    cluster.isolate(follower);
    cluster.step(follower, Input::Read { request_id: 4 });
    let timeout = cluster.nodes[&follower].config().election_timeout_ticks as usize;
    for _ in 0..timeout * (READ_RETENTION_ELECTION_TIMEOUTS as usize + 1) {
        cluster.step(follower, Input::Tick);
    }
    assert!(served(&cluster).is_empty());
    assert!(
        cluster
            .rejected
            .iter()
            .any(|r| r.request_id == 4 && r.reason == RejectReason::NoLeader),
        "{:?}",
        cluster.rejected
    );
    assert_eq!(cluster.nodes[&follower].waiting_reads(), 0);
}

#[test]
fn a_lease_serves_reads_without_a_round_until_it_runs_out() {
    let mut cluster = Cluster::new(3, |config| config.lease_reads = true);
    // No one votes within an election timeout of starting (the lease's promise).
    let leader = cluster.elect();
    cluster.propose(leader, 1, "a");
    cluster.tick_all(2); // a heartbeat round answered: the lease runs
    assert!(cluster.nodes[&leader].holds_lease());
    cluster.isolate(leader);
    read(&mut cluster, leader, 3);
    assert_eq!(served(&cluster).len(), 1, "served from the lease alone");
    let lease = cluster.nodes[&leader].config().lease_ticks() as usize;
    for _ in 0..lease {
        cluster.step(leader, Input::Tick);
    }
    assert!(!cluster.nodes[&leader].holds_lease());
    read(&mut cluster, leader, 4);
    assert_eq!(served(&cluster).len(), 1, "no lease, no quorum: not served");
}

#[test]
fn a_voter_that_heard_a_leasing_leader_grants_no_vote_inside_the_lease() {
    let mut cluster = Cluster::new(3, |config| {
        config.lease_reads = true;
        config.pre_vote = false;
    });
    let leader = cluster.elect();
    cluster.tick_all(2);
    let voter = cluster.another_than(leader);
    let term = cluster.nodes[&voter].term();
    let candidate = cluster.other_than(&[leader, voter]);
    let last = cluster.nodes[&candidate].log().last_index();
    let last_term = cluster.nodes[&candidate].log().last_term();
    // Even after the voter moved to the candidate's term for another reason.
    cluster.nodes.get_mut(&voter).unwrap().term = term + 1;
    cluster.nodes.get_mut(&voter).unwrap().leader = None;
    let mut out = Output::default();
    let request = vote_request(candidate, voter, term + 1, last, last_term);
    cluster
        .nodes
        .get_mut(&voter)
        .unwrap()
        .step(request, &mut out);
    assert!(!grants_a_vote(&out), "a vote inside the lease: {out:?}");
}

#[test]
fn handing_leadership_over_ends_the_lease_for_the_term() {
    let mut cluster = Cluster::new(3, |config| config.lease_reads = true);
    let leader = cluster.elect();
    cluster.tick_all(2);
    assert!(cluster.nodes[&leader].holds_lease());
    let target = cluster.another_than(leader);
    // The hand-over message is held: the transfer has not happened, the lease is gone anyway.
    cluster.slow.insert((leader, target));
    cluster.step(
        leader,
        Input::Control(Control::TransferLeadership { to: target }),
    );
    assert!(cluster.nodes[&leader].is_leader());
    assert!(!cluster.nodes[&leader].holds_lease());
    cluster.tick_all(2);
    assert!(cluster.nodes[&leader].is_leader());
    assert!(
        !cluster.nodes[&leader].holds_lease(),
        "not renewed this term"
    );
}

#[test]
fn lease_reads_need_check_quorum() {
    let mut config = RaftConfig::new(NodeId(1), vec![NodeId(1), NodeId(2), NodeId(3)]);
    config.lease_reads = true;
    config.check_quorum = false;
    let error = config.validate().unwrap_err().to_string();
    assert!(error.contains("check_quorum"), "{error}");
    config.check_quorum = true;
    config.validate().unwrap();
    assert_eq!(config.lease_ticks(), 8, "T = 10, 5% drift: 9 * 95 / 105");
    config.election_timeout_ticks = 3;
    config.heartbeat_interval_ticks = 1;
    config.max_clock_drift_percent = 50;
    assert_eq!(config.lease_ticks(), 0);
    assert!(config.validate().is_err());
}

#[test]
fn a_voter_grants_no_vote_for_an_election_timeout_after_it_starts_under_leases() {
    // It may have answered a leasing leader's round just before it restarted.
    let mut cluster = Cluster::new(3, |config| {
        config.lease_reads = true;
        config.pre_vote = false;
    });
    let request = |term| vote_request(NodeId(2), NodeId(1), term, 0, 0);
    let voter = cluster.nodes.get_mut(&NodeId(1)).unwrap();
    let mut out = Output::default();
    voter.step(request(1), &mut out);
    assert!(!grants_a_vote(&out), "granted right after starting");
    let timeout = voter.config().election_timeout_ticks;
    // Ticks without a campaign of its own (its timer is longer than one timeout).
    voter.election_timeout = timeout * 3;
    for _ in 0..timeout {
        voter.step(Input::Tick, &mut Output::default());
    }
    let mut out = Output::default();
    voter.step(request(2), &mut out);
    assert!(
        grants_a_vote(&out),
        "the promise ends after a timeout: {out:?}"
    );
}

#[test]
fn a_followers_request_vouches_for_it_so_three_nodes_need_no_round_for_its_reads() {
    for size in [3, 5] {
        let mut cluster = Cluster::new(size, |_| {});
        let leader = cluster.elect();
        let follower = cluster.another_than(leader);
        // Every answer to the leader is held, except what the asking follower sends.
        for id in (1..=size).map(NodeId) {
            if id != leader && id != follower {
                cluster.slow.insert((id, leader));
            }
        }
        // The follower's own heartbeat answers are held too: only its request reaches the
        // leader.
        let before = cluster.nodes[&leader]
            .leader_state
            .as_ref()
            .unwrap()
            .reads
            .round;
        cluster.step(follower, Input::Read { request_id: 5 });
        cluster.step(follower, Input::FlushProposals);
        let reads = served(&cluster);
        if size == 3 {
            assert_eq!(
                reads.len(),
                1,
                "leader + asking follower are a quorum of three"
            );
            let after = cluster.nodes[&leader]
                .leader_state
                .as_ref()
                .unwrap()
                .reads
                .round;
            assert_eq!(after, before, "no round was needed");
        } else {
            // Of five, the leader and the follower are two: a round must bring a third.
            let round_started = cluster.nodes[&leader]
                .leader_state
                .as_ref()
                .unwrap()
                .reads
                .round
                > before;
            assert!(reads.is_empty() && round_started, "{reads:?}");
            cluster.slow.clear();
            for (to, input) in std::mem::take(&mut cluster.held) {
                cluster.step(to, input);
            }
            assert_eq!(served(&cluster).len(), 1);
        }
    }
}
