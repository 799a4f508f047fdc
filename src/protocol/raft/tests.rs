//! Unit tests of the core with instant, lossless delivery. The simulator (`tests/chaos.rs`) covers
//! faults; these pin down single behaviours.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;

use super::*;
use crate::storage::RecoveredState;
use crate::types::{Entry, LogIndex, Payload, ProposalTag};

/// Nodes that deliver every message at once, unless its link is cut.
pub(super) struct Cluster {
    pub(super) nodes: BTreeMap<NodeId, RaftNode>,
    committed: BTreeMap<NodeId, Vec<Entry>>,
    /// Events each node output, in order.
    pub(super) events: Vec<(NodeId, crate::protocol::Event)>,
    pub(super) rejected: Vec<Rejection>,
    /// Read indexes each node output, in order.
    pub(super) reads: Vec<(NodeId, crate::protocol::ReadState)>,
    /// Snapshots each node was handed to restore, in order.
    pub(super) restored: Vec<(NodeId, crate::storage::Snapshot)>,
    cut: BTreeSet<(NodeId, NodeId)>,
    /// Links whose messages wait in `held` until released.
    pub(super) slow: BTreeSet<(NodeId, NodeId)>,
    pub(super) held: Vec<(NodeId, Input)>,
}

impl Cluster {
    pub(super) fn new(size: u64, tweak: impl Fn(&mut RaftConfig)) -> Self {
        let voters: Vec<NodeId> = (1..=size).map(NodeId).collect();
        let nodes = voters
            .iter()
            .map(|&id| {
                let mut config = RaftConfig::new(id, voters.clone());
                config.seed = id.0;
                tweak(&mut config);
                (
                    id,
                    RaftNode::new(config, RecoveredState::default()).unwrap(),
                )
            })
            .collect();
        Cluster {
            nodes,
            committed: BTreeMap::new(),
            events: Vec::new(),
            rejected: Vec::new(),
            reads: Vec::new(),
            restored: Vec::new(),
            cut: BTreeSet::new(),
            slow: BTreeSet::new(),
            held: Vec::new(),
        }
    }

    pub(super) fn step(&mut self, id: NodeId, input: Input) {
        let mut queue = VecDeque::from([(id, input)]);
        while let Some((id, input)) = queue.pop_front() {
            let mut out = Output::default();
            let node = self.nodes.get_mut(&id).unwrap();
            node.step(input, &mut out);
            // The write is durable at once here: acknowledge it, as a driver does after its fsync.
            crate::protocol::Durability::of(&out.write).tell(node, &mut out);
            self.committed
                .entry(id)
                .or_default()
                .append(&mut out.committed);
            self.rejected.append(&mut out.rejected);
            self.events
                .extend(out.events.drain(..).map(|event| (id, event)));
            self.reads
                .extend(out.reads.drain(..).map(|read| (id, read)));
            self.restored.extend(out.restore.take().map(|s| (id, s)));
            let messages = out
                .messages
                .drain(..)
                .chain(out.messages_after_write.drain(..));
            for envelope in messages {
                let link = (envelope.from, envelope.to);
                if self.slow.contains(&link) {
                    self.held.push((envelope.to, Input::Message(envelope)));
                } else if !self.cut.contains(&link) {
                    queue.push_back((envelope.to, Input::Message(envelope)));
                }
            }
        }
    }

    pub(super) fn tick_all(&mut self, ticks: usize) {
        for _ in 0..ticks {
            let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
            for id in ids {
                self.step(id, Input::Tick);
            }
        }
    }

    pub(super) fn leaders(&self) -> Vec<NodeId> {
        self.nodes
            .values()
            .filter(|n| n.is_leader())
            .map(|n| n.id())
            .collect()
    }

    /// The first member (by id) that is not `id`.
    pub(super) fn another_than(&self, id: NodeId) -> NodeId {
        self.other_than(&[id])
    }

    /// The first member (by id) that is none of `ids`.
    pub(super) fn other_than(&self, ids: &[NodeId]) -> NodeId {
        self.nodes
            .keys()
            .copied()
            .find(|other| !ids.contains(other))
            .unwrap()
    }

    pub(super) fn elect(&mut self) -> NodeId {
        for _ in 0..100 {
            self.tick_all(1);
            if let [leader] = self.leaders()[..] {
                return leader;
            }
        }
        panic!("no leader after 100 ticks");
    }

    pub(super) fn isolate(&mut self, id: NodeId) {
        for &other in self.nodes.keys() {
            if other != id {
                self.cut.insert((id, other));
                self.cut.insert((other, id));
            }
        }
    }

    pub(super) fn heal(&mut self) {
        self.cut.clear();
    }

    pub(super) fn propose(&mut self, at: NodeId, request_id: u64, data: &'static str) {
        self.step(
            at,
            Input::Propose {
                request_id,
                data: Bytes::from_static(data.as_bytes()),
            },
        );
        self.step(at, Input::FlushProposals);
    }

    pub(super) fn commands_applied(&self, id: NodeId) -> Vec<Bytes> {
        self.committed
            .get(&id)
            .map(|entries| {
                entries
                    .iter()
                    .filter_map(|e| match &e.payload {
                        Payload::Command { data, .. } => Some(data.clone()),
                        Payload::Blank | Payload::Membership(_) => None,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[test]
fn a_single_node_elects_itself_and_commits() {
    let mut cluster = Cluster::new(1, |_| {});
    let leader = cluster.elect();
    cluster.propose(leader, 1, "a");
    assert_eq!(
        cluster.commands_applied(leader),
        vec![Bytes::from_static(b"a")]
    );
}

#[test]
fn three_nodes_elect_one_leader_and_replicate_to_all() {
    let mut cluster = Cluster::new(3, |_| {});
    let leader = cluster.elect();
    for i in 0..10 {
        cluster.propose(leader, i, "x");
    }
    cluster.tick_all(3); // heartbeats carry the final commit index to followers
    for id in 1..=3 {
        assert_eq!(cluster.commands_applied(NodeId(id)).len(), 10, "node {id}");
    }
    let terms: BTreeSet<u64> = cluster.nodes.values().map(|n| n.term()).collect();
    assert_eq!(terms.len(), 1);
}

#[test]
fn a_follower_forwards_proposals_to_the_leader() {
    let mut cluster = Cluster::new(3, |_| {});
    let leader = cluster.elect();
    let follower = cluster.another_than(leader);
    cluster.propose(follower, 7, "forwarded");
    cluster.step(leader, Input::FlushProposals);
    cluster.tick_all(3);
    let applied = &cluster.committed[&follower];
    let tag = applied.iter().find_map(|e| match &e.payload {
        Payload::Command { tag, .. } => Some(*tag),
        Payload::Blank | Payload::Membership(_) => None,
    });
    assert_eq!(
        tag,
        Some(ProposalTag {
            proposer: follower,
            request_id: 7
        })
    );
}

/// The proposing follower's acknowledgement is held while the other follower's commits the
/// entry: the leader tells the proposer the commit at once ([`Message::Commit`]), without
/// waiting for the proposer's own acknowledgement, the next append or a heartbeat.
#[test]
fn a_proposing_follower_learns_its_commit_before_its_own_acknowledgement_is_in() {
    let mut cluster = Cluster::new(3, |_| {});
    let leader = cluster.elect();
    let mut followers = cluster.nodes.keys().copied().filter(|&id| id != leader);
    let (proposer, other) = (followers.next().unwrap(), followers.next().unwrap());
    cluster.slow.insert((proposer, leader));
    cluster.propose(proposer, 7, "forwarded");
    // The forward itself was held: let it through, then hold the acknowledgement.
    for (to, input) in std::mem::take(&mut cluster.held) {
        cluster.step(to, input);
    }
    cluster.step(leader, Input::FlushProposals);
    assert!(
        cluster.commands_applied(other).is_empty() && !cluster.held.is_empty(),
        "the proposer's acknowledgement is held"
    );
    assert_eq!(
        cluster.commands_applied(leader).len(),
        1,
        "committed by the other"
    );
    assert_eq!(
        cluster.commands_applied(proposer),
        vec![Bytes::from_static(b"forwarded")],
        "no tick has passed and the proposer's acknowledgement is still held"
    );
}

/// A commit for an entry the follower does not hold (or holds from another term) is ignored;
/// one for the leader's entry commits through it.
#[test]
fn a_follower_applies_a_commit_only_for_the_leaders_entry() {
    let mut cluster = Cluster::new(3, |_| {});
    let leader = cluster.elect();
    let follower = cluster.another_than(leader);
    cluster.slow.insert((leader, follower));
    cluster.propose(leader, 1, "x"); // committed through the other follower
    let commit = cluster.nodes[&leader].commit_index();
    let term = cluster.nodes[&leader].term();
    let commit_of = |cluster: &Cluster| cluster.nodes[&follower].commit_index();
    let before = commit_of(&cluster);
    assert!(before < commit);
    let deliver = |cluster: &mut Cluster, commit, commit_term| {
        let message = Message::Commit {
            term,
            commit,
            commit_term,
        };
        let envelope = Envelope {
            from: leader,
            to: follower,
            message,
        };
        cluster.step(follower, Input::Message(envelope));
    };
    deliver(&mut cluster, commit, term);
    assert_eq!(commit_of(&cluster), before, "the entry has not arrived");
    cluster.slow.clear();
    for (to, input) in std::mem::take(&mut cluster.held) {
        cluster.step(to, input);
    }
    let released = commit_of(&cluster);
    assert!(released < commit, "the append carried the older commit");
    deliver(&mut cluster, commit, term + 1);
    assert_eq!(commit_of(&cluster), released, "another term's entry");
    deliver(&mut cluster, commit, term);
    assert_eq!(commit_of(&cluster), commit);
}

/// A follower's proposals of one round reach the leader in one message, when the driver
/// flushes, not one message per proposal.
#[test]
fn a_follower_forwards_a_rounds_proposals_in_one_message() {
    let mut cluster = Cluster::new(3, |_| {});
    let leader = cluster.elect();
    let follower = cluster.another_than(leader);
    let node = cluster.nodes.get_mut(&follower).unwrap();
    let mut out = Output::default();
    for request_id in 1..=3 {
        let data = Bytes::from_static(b"x");
        node.step(Input::Propose { request_id, data }, &mut out);
    }
    assert!(out.messages.is_empty(), "nothing leaves before the flush");
    node.step(Input::FlushProposals, &mut out);
    let forwards: Vec<Vec<u64>> = out
        .messages
        .iter()
        .filter_map(|envelope| match &envelope.message {
            Message::ForwardProposals { proposals, .. } => {
                Some(proposals.iter().map(|(id, _)| *id).collect())
            }
            _ => None,
        })
        .collect();
    assert_eq!(forwards, vec![vec![1, 2, 3]]);
    assert_eq!(node.kept_proposals(), 3, "kept until they commit");
}

#[test]
fn a_rejoining_partitioned_node_does_not_depose_the_leader() {
    let mut cluster = Cluster::new(3, |_| {});
    let leader = cluster.elect();
    let term = cluster.nodes[&leader].term();
    let loner = cluster.another_than(leader);
    cluster.isolate(loner);
    cluster.tick_all(200); // the loner campaigns over and over, but pre-vote keeps its term
    assert_eq!(cluster.nodes[&loner].term(), term);
    cluster.heal();
    cluster.tick_all(50);
    assert_eq!(cluster.leaders(), vec![leader]);
    assert_eq!(cluster.nodes[&leader].term(), term);
}

#[test]
fn an_isolated_leader_steps_down_by_check_quorum() {
    let mut cluster = Cluster::new(3, |_| {});
    let leader = cluster.elect();
    cluster.isolate(leader);
    cluster.tick_all(40);
    assert!(!cluster.nodes[&leader].is_leader());
    let leaders = cluster.leaders();
    assert_eq!(leaders.len(), 1);
    assert_ne!(leaders[0], leader);
}

#[test]
fn leadership_transfer_hands_over_and_the_target_leads() {
    let mut cluster = Cluster::new(5, |_| {});
    let leader = cluster.elect();
    cluster.propose(leader, 1, "before");
    let target = cluster.another_than(leader);
    cluster.step(
        leader,
        Input::Control(Control::TransferLeadership { to: target }),
    );
    cluster.tick_all(2);
    assert_eq!(cluster.leaders(), vec![target]);
}

#[test]
fn priority_based_election_ends_with_the_highest_priority_node_leading() {
    let mut cluster = Cluster::new(5, |config| {
        config.priority_based = true;
        config.priorities.insert(NodeId(4), 10);
        config.priorities.insert(NodeId(2), 5);
    });
    cluster.elect();
    cluster.tick_all(30);
    assert_eq!(cluster.leaders(), vec![NodeId(4)]);
}

#[test]
fn batching_appends_a_full_batch_at_once_and_the_rest_at_the_timeout() {
    let mut cluster = Cluster::new(3, |config| {
        config.batch_size = 4;
        config.batch_timeout_ticks = 3;
    });
    let leader = cluster.elect();
    let last_before = cluster.nodes[&leader].log().last_index();
    for i in 0..6 {
        cluster.step(
            leader,
            Input::Propose {
                request_id: i,
                data: Bytes::from_static(b"p"),
            },
        );
    }
    let after_first_batch = cluster.nodes[&leader].log().last_index();
    assert_eq!(
        after_first_batch,
        last_before + 4,
        "a full batch is appended at once"
    );
    cluster.tick_all(3);
    assert_eq!(cluster.nodes[&leader].log().last_index(), last_before + 6);
}

#[test]
fn oversized_and_excess_proposals_are_refused_with_reasons() {
    let mut cluster = Cluster::new(1, |config| {
        config.max_batch_bytes = 64;
        config.max_pending_proposals = 2;
        config.batch_size = 100;
        config.batch_timeout_ticks = 100;
    });
    let leader = cluster.elect();
    let big = Bytes::from(vec![0u8; 100]);
    cluster.step(
        leader,
        Input::Propose {
            request_id: 1,
            data: big,
        },
    );
    for request_id in 2..=4 {
        cluster.step(
            leader,
            Input::Propose {
                request_id,
                data: Bytes::from_static(b"s"),
            },
        );
    }
    let reasons: Vec<(u64, RejectReason)> = cluster
        .rejected
        .iter()
        .map(|r| (r.request_id, r.reason.clone()))
        .collect();
    assert_eq!(
        reasons,
        vec![
            (
                1,
                RejectReason::TooLarge {
                    size: 116,
                    limit: 64
                }
            ),
            (4, RejectReason::Overloaded { limit: 2 }),
        ]
    );
}

#[test]
fn a_lagging_follower_catches_up_through_fast_back_off() {
    let mut cluster = Cluster::new(3, |config| config.max_entries_per_append = 3);
    let leader = cluster.elect();
    let lagger = cluster.another_than(leader);
    cluster.cut.insert((leader, lagger));
    for i in 0..20 {
        cluster.propose(leader, i, "y");
    }
    cluster.heal();
    cluster.tick_all(20);
    let leader_log: Vec<(LogIndex, u64)> = cluster.nodes[&leader]
        .log()
        .slice(1, 100)
        .iter()
        .map(|e| (e.index, e.term))
        .collect();
    let lagger_log: Vec<(LogIndex, u64)> = cluster.nodes[&lagger]
        .log()
        .slice(1, 100)
        .iter()
        .map(|e| (e.index, e.term))
        .collect();
    assert_eq!(leader_log, lagger_log);
    assert_eq!(cluster.commands_applied(lagger).len(), 20);
}

#[test]
fn the_commit_rule_waits_for_an_entry_of_the_current_term() {
    // A leader whose only uncommitted entry is from an earlier term must not count it committed
    // until an entry of its own term is replicated.
    let voters: Vec<NodeId> = (1..=3).map(NodeId).collect();
    let old = |index| Entry {
        term: 1,
        index,
        payload: Payload::Blank,
    };
    let recovered = RecoveredState {
        hard_state: crate::storage::HardState {
            term: 2,
            voted_for: None,
        },
        entries: vec![old(1), old(2)],
        ..Default::default()
    };
    let mut config = RaftConfig::new(NodeId(1), voters);
    config.pre_vote = false;
    let mut node = RaftNode::new(config, recovered).unwrap();
    let mut out = Output::default();
    for _ in 0..40 {
        node.step(Input::Tick, &mut out);
        if node.role() == Role::Candidate {
            break;
        }
    }
    assert_eq!(node.role(), Role::Candidate);
    // Its vote for itself is on disk, as a driver reports after the write.
    let hard_state = out
        .write
        .hard_state
        .expect("the candidate records its vote");
    node.step(Input::HardStateDurable(hard_state), &mut out);
    let term = node.term();
    let vote = Message::RequestVoteResponse {
        term,
        granted: true,
    };
    node.step(
        Input::Message(Envelope {
            from: NodeId(2),
            to: NodeId(1),
            message: vote,
        }),
        &mut out,
    );
    assert!(node.is_leader());
    // Node 2 acknowledges index 2 (the old entries) but not the new blank entry at index 3.
    let ack = Message::AppendEntriesResponse {
        term,
        index: 2,
        reject: None,
    };
    node.step(
        Input::Message(Envelope {
            from: NodeId(2),
            to: NodeId(1),
            message: ack,
        }),
        &mut out,
    );
    assert_eq!(
        node.commit_index(),
        0,
        "an earlier-term entry was committed by counting"
    );
    let ack = Message::AppendEntriesResponse {
        term,
        index: 3,
        reject: None,
    };
    node.step(
        Input::Message(Envelope {
            from: NodeId(2),
            to: NodeId(1),
            message: ack,
        }),
        &mut out,
    );
    assert_eq!(
        node.commit_index(),
        0,
        "the leader counted its own entry before it was durable"
    );
    node.step(Input::Durable { index: 3, term }, &mut out);
    assert_eq!(node.commit_index(), 3);
}

#[test]
fn an_election_reports_its_pre_vote_and_vote_rounds_before_the_leader() {
    use crate::protocol::{ElectionRound, Event};
    let mut cluster = Cluster::new(3, |_| {});
    let leader = cluster.elect();
    let term = cluster.nodes[&leader].term();
    let winner: Vec<&Event> = cluster
        .events
        .iter()
        .filter(|(id, _)| *id == leader)
        .map(|(_, event)| event)
        .filter(|event| {
            matches!(
                event,
                Event::ElectionRound { .. }
                    | Event::LeaderChanged {
                        leader: Some(_),
                        ..
                    }
            )
        })
        .collect();
    assert_eq!(
        winner,
        [
            &Event::ElectionRound {
                round: ElectionRound::PreVote,
                term
            },
            &Event::ElectionRound {
                round: ElectionRound::Vote,
                term
            },
            &Event::LeaderChanged {
                term,
                leader: Some(leader)
            },
        ],
        "the winner's election, in order"
    );
    // A leadership transfer skips the pre-vote.
    let target = cluster.another_than(leader);
    cluster.events.clear();
    cluster.step(
        leader,
        Input::Control(Control::TransferLeadership { to: target }),
    );
    cluster.tick_all(2);
    let rounds: Vec<&Event> = cluster
        .events
        .iter()
        .filter(|(id, event)| *id == target && matches!(event, Event::ElectionRound { .. }))
        .map(|(_, event)| event)
        .collect();
    assert_eq!(
        rounds,
        [&Event::ElectionRound {
            round: ElectionRound::Vote,
            term: term + 1
        }]
    );
}

#[test]
fn a_node_votes_once_per_term() {
    let voters: Vec<NodeId> = (1..=3).map(NodeId).collect();
    let mut node = RaftNode::new(
        RaftConfig::new(NodeId(1), voters),
        RecoveredState::default(),
    )
    .unwrap();
    let mut out = Output::default();
    for candidate in [2, 3] {
        let ask = Message::RequestVote {
            term: 5,
            last_log_index: 0,
            last_log_term: 0,
            leadership_transfer: false,
        };
        let envelope = Envelope {
            from: NodeId(candidate),
            to: NodeId(1),
            message: ask,
        };
        node.step(Input::Message(envelope), &mut out);
    }
    assert!(out.messages.is_empty(), "a vote waits for the write");
    let grants: Vec<bool> = out
        .messages_after_write
        .iter()
        .filter_map(|e| match e.message {
            Message::RequestVoteResponse { granted, .. } => Some(granted),
            _ => None,
        })
        .collect();
    assert_eq!(grants, vec![true, false]);
    assert_eq!(out.write.hard_state.unwrap().voted_for, Some(NodeId(2)));
}

#[test]
fn a_sole_voter_leads_only_once_its_vote_is_durable() {
    // Led at once, a sole voter killed before its vote reached the disk would come back in the
    // older term, free to vote in this one for another node, which would lead it too (chaos
    // seeds 3110783 and 3392937, after membership changes left one voter).
    let me = NodeId(1);
    let mut node = RaftNode::new(RaftConfig::new(me, vec![me]), RecoveredState::default()).unwrap();
    let mut out = Output::default();
    for _ in 0..100 {
        node.step(Input::Tick, &mut out);
        if node.role() == Role::Candidate {
            break;
        }
    }
    assert_eq!(node.role(), Role::Candidate, "it campaigns alone");
    let vote = out
        .write
        .hard_state
        .expect("the candidate records its vote");
    assert_eq!(vote.voted_for, Some(me));
    assert_eq!(vote.term, node.term());
    // What an earlier write made durable (its vote in an older term) does not count.
    let older = crate::storage::HardState {
        term: vote.term - 1,
        voted_for: Some(me),
    };
    node.step(Input::HardStateDurable(older), &mut out);
    assert!(!node.is_leader());
    node.step(Input::HardStateDurable(vote), &mut out);
    assert!(node.is_leader());
    assert_eq!(node.term(), vote.term);
}

#[test]
fn a_leader_sends_appends_before_its_write_is_durable_but_commits_only_after() {
    let mut node = RaftNode::new(
        RaftConfig::new(NodeId(1), vec![NodeId(1)]),
        RecoveredState::default(),
    )
    .unwrap();
    let mut out = Output::default();
    while node.role() != Role::Candidate {
        node.step(Input::Tick, &mut out);
    }
    let vote = out
        .write
        .hard_state
        .expect("the candidate records its vote");
    node.step(Input::HardStateDurable(vote), &mut out);
    assert!(node.is_leader());
    let (blank_index, term) = out.write.last_appended().expect("the leader's blank entry");
    assert_eq!(
        node.commit_index(),
        0,
        "a single voter waits for its own fsync"
    );
    out.clear();
    node.step(
        Input::Propose {
            request_id: 7,
            data: Bytes::from_static(b"x"),
        },
        &mut out,
    );
    node.step(Input::FlushProposals, &mut out);
    assert_eq!(node.commit_index(), 0);
    // An acknowledgement of an entry no longer in the log (other term) is ignored.
    node.step(
        Input::Durable {
            index: blank_index,
            term: term + 1,
        },
        &mut out,
    );
    assert_eq!(node.commit_index(), 0);
    node.step(
        Input::Durable {
            index: blank_index + 1,
            term,
        },
        &mut out,
    );
    assert_eq!(node.commit_index(), blank_index + 1);
    assert_eq!(node.durable_index(), blank_index + 1);
    assert_eq!(out.committed.len(), 2);

    // With peers: the appends go out in `messages`, before the write.
    let voters: Vec<NodeId> = (1..=3).map(NodeId).collect();
    let mut cluster = Cluster::new(3, |_| {});
    let leader = cluster.elect();
    let mut out = Output::default();
    let node = cluster.nodes.get_mut(&leader).unwrap();
    node.step(
        Input::Propose {
            request_id: 1,
            data: Bytes::from_static(b"y"),
        },
        &mut out,
    );
    node.step(Input::FlushProposals, &mut out);
    assert!(!out.write.append.is_empty());
    let appends = out
        .messages
        .iter()
        .filter(|e| matches!(e.message, Message::AppendEntries { .. }))
        .count();
    assert_eq!(appends, voters.len() - 1);
}

#[test]
fn a_node_recovered_from_a_compacted_log_starts_past_index_1() {
    let entries: Vec<Entry> = (41..=45)
        .map(|index| Entry {
            index,
            term: 3,
            payload: Payload::Blank,
        })
        .collect();
    let recovered = RecoveredState {
        hard_state: crate::storage::HardState {
            term: 3,
            voted_for: None,
        },
        entries,
        ..Default::default()
    };
    let node = RaftNode::new(RaftConfig::new(NodeId(1), vec![NodeId(1)]), recovered).unwrap();
    assert_eq!(node.log().first_index(), 41);
    assert_eq!(node.log().last_index(), 45);
    assert_eq!(node.commit_index(), 40, "what was compacted was committed");
    let gap = RecoveredState {
        entries: vec![
            Entry {
                index: 41,
                term: 3,
                payload: Payload::Blank,
            },
            Entry {
                index: 43,
                term: 3,
                payload: Payload::Blank,
            },
        ],
        ..RecoveredState::default()
    };
    assert!(RaftNode::new(RaftConfig::new(NodeId(1), vec![NodeId(1)]), gap).is_err());
}
