//! Unit tests of the PBFT rules, on a hand-driven cluster: every message is delivered (after
//! authentication) unless a test cuts a replica off.

use std::collections::{BTreeSet, VecDeque};

use bytes::Bytes;

use super::*;
use crate::protocol::{InvalidReason, Protocol};
use crate::storage::RecoveredState;
use crate::types::NodeId;

struct Cluster {
    nodes: Vec<Option<PbftNode>>,
    in_flight: VecDeque<Envelope>,
    /// Replicas whose messages, both ways, are dropped.
    cut_off: BTreeSet<NodeId>,
    /// Links (from, to) whose messages are dropped.
    cut_links: BTreeSet<(NodeId, NodeId)>,
    committed: Vec<Vec<crate::types::Entry>>,
    rejected: Vec<crate::protocol::Rejection>,
    /// Each replica's batches reported prepared: (sequence, the tags of their requests).
    prepared: Vec<Vec<(u64, Vec<crate::types::ProposalTag>)>>,
    /// Audits and statement answers delivered.
    audits_delivered: usize,
    statements_delivered: usize,
}

fn config(id: u64, n: u64) -> PbftConfig {
    let members: Vec<NodeId> = (1..=n).map(NodeId).collect();
    let mut config = PbftConfig::new(
        NodeId(id),
        members.clone(),
        test_signing_key(NodeId(id)),
        test_validators(&members),
    );
    config.checkpoint_interval = 4;
    config.batch_size = 2;
    config.view_change_timeout_ticks = 5;
    config.retransmit_ticks = 2;
    config
}

impl Cluster {
    fn new(n: u64) -> Cluster {
        Cluster::with(n, |_| {})
    }

    fn with(n: u64, adjust: impl Fn(&mut PbftConfig)) -> Cluster {
        let nodes = (1..=n)
            .map(|id| {
                let mut config = config(id, n);
                adjust(&mut config);
                Some(PbftNode::new(config, RecoveredState::default()).unwrap())
            })
            .collect();
        Cluster {
            nodes,
            in_flight: VecDeque::new(),
            cut_off: BTreeSet::new(),
            cut_links: BTreeSet::new(),
            committed: vec![Vec::new(); n as usize],
            rejected: Vec::new(),
            prepared: vec![Vec::new(); n as usize],
            audits_delivered: 0,
            statements_delivered: 0,
        }
    }

    fn node(&self, id: u64) -> &PbftNode {
        self.nodes[id as usize - 1].as_ref().unwrap()
    }

    fn step(&mut self, id: u64, input: Input) {
        let Some(node) = self.nodes[id as usize - 1].as_mut() else {
            return;
        };
        let mut out = Output::default();
        node.step(input, &mut out);
        self.in_flight.extend(out.messages.drain(..));
        self.in_flight.extend(out.messages_after_write.drain(..));
        self.committed[id as usize - 1].append(&mut out.committed);
        self.rejected.append(&mut out.rejected);
        for event in out.events.drain(..) {
            if let crate::protocol::Event::Prepared {
                sequence,
                proposals,
                ..
            } = event
            {
                self.prepared[id as usize - 1].push((sequence, proposals));
            }
        }
    }

    /// Delivers messages until none is left (or `limit` were delivered).
    fn run(&mut self) {
        let mut delivered = 0;
        while let Some(envelope) = self.in_flight.pop_front() {
            delivered += 1;
            assert!(delivered < 200_000, "message storm");
            if self.cut_off.contains(&envelope.from)
                || self.cut_off.contains(&envelope.to)
                || self.cut_links.contains(&(envelope.from, envelope.to))
            {
                continue;
            }
            let to = envelope.to.0;
            let Some(node) = self.nodes[to as usize - 1].as_mut() else {
                continue;
            };
            let mut round = vec![envelope];
            node.authenticate(&mut round);
            if let Some(envelope) = round.pop() {
                match envelope.message {
                    Message::Audit(_) => self.audits_delivered += 1,
                    Message::Statements(_) => self.statements_delivered += 1,
                    _ => {}
                }
                self.step(to, Input::Message(envelope));
            }
        }
    }

    fn tick_all(&mut self, ticks: u32) {
        for _ in 0..ticks {
            for id in 1..=self.nodes.len() as u64 {
                self.step(id, Input::Tick);
            }
            self.run();
        }
    }

    fn propose(&mut self, at: u64, request_id: u64, data: &'static [u8]) {
        self.step(
            at,
            Input::Propose {
                request_id,
                data: Bytes::from_static(data),
            },
        );
        self.step(at, Input::FlushProposals);
        self.run();
        // The primary cuts forwarded requests at its next flush.
        let primary = self.live_primary();
        if let Some(primary) = primary {
            self.step(primary, Input::FlushProposals);
        }
        self.run();
    }

    /// Ticks the live replicas, delivering everything except the new-views sent to replica
    /// `to`, until one is sent; returns the first.
    fn intercept_new_view_to(&mut self, to: u64) -> Signed {
        for _ in 0..40 {
            for id in 1..=self.nodes.len() as u64 {
                if !self.cut_off.contains(&NodeId(id)) {
                    self.step(id, Input::Tick);
                }
            }
            let mut intercepted = None;
            while let Some(envelope) = self.in_flight.pop_front() {
                if self.cut_off.contains(&envelope.from) || self.cut_off.contains(&envelope.to) {
                    continue;
                }
                if let Message::Signed(signed) = &envelope.message
                    && matches!(signed.statement, Statement::NewView(_))
                    && envelope.to == NodeId(to)
                {
                    intercepted.get_or_insert_with(|| signed.clone());
                    continue;
                }
                let receiver = envelope.to.0;
                self.step(receiver, Input::Message(envelope));
            }
            if let Some(new_view) = intercepted {
                return new_view;
            }
        }
        panic!("no new-view was sent to replica {to}");
    }

    fn live_primary(&self) -> Option<u64> {
        self.nodes
            .iter()
            .flatten()
            .find(|n| n.status().is_leader && !self.cut_off.contains(&n.id()))
            .map(|n| n.id().0)
    }

    fn data_applied(&self, id: u64) -> Vec<Bytes> {
        self.committed[id as usize - 1]
            .iter()
            .filter_map(|e| match &e.payload {
                crate::types::Payload::Command { data, .. } => Some(data.clone()),
                _ => None,
            })
            .collect()
    }
}

#[test]
fn config_refuses_fewer_than_four_replicas_and_a_foreign_key() {
    let error = PbftNode::new(config(1, 3), RecoveredState::default()).unwrap_err();
    assert!(error.to_string().contains("3f + 1"), "{error}");
    let mut wrong_key = config(1, 4);
    wrong_key.signing_key = test_signing_key(NodeId(2));
    let error = PbftNode::new(wrong_key, RecoveredState::default()).unwrap_err();
    assert!(error.to_string().contains("signing_key"), "{error}");
    let mut missing = config(1, 4);
    missing.validators.remove(&NodeId(3));
    let error = PbftNode::new(missing, RecoveredState::default()).unwrap_err();
    assert!(error.to_string().contains("n3"), "{error}");
}

#[test]
fn a_request_at_the_primary_executes_everywhere_in_one_order() {
    let mut cluster = Cluster::new(4);
    assert_eq!(
        cluster.live_primary(),
        Some(1),
        "view 0: the lowest id leads"
    );
    cluster.propose(1, 1, b"a");
    cluster.propose(1, 2, b"b");
    for id in 1..=4 {
        assert_eq!(
            cluster.data_applied(id),
            vec![Bytes::from("a"), Bytes::from("b")]
        );
        assert_eq!(cluster.node(id).executed_seq(), 2);
    }
    let digests: BTreeSet<_> = (1..=4).map(|id| cluster.node(id).state_digest()).collect();
    assert_eq!(digests.len(), 1);
    // Each replica reports each batch prepared once, with its requests' tags (for traces).
    let tag = |request_id| crate::types::ProposalTag {
        proposer: NodeId(1),
        request_id,
    };
    for id in 1..=4 {
        assert_eq!(
            cluster.prepared[id as usize - 1],
            vec![(1, vec![tag(1)]), (2, vec![tag(2)])],
            "replica {id}"
        );
    }
}

#[test]
fn a_request_at_a_backup_is_forwarded_and_executes_once() {
    let mut cluster = Cluster::new(4);
    cluster.propose(3, 7, b"x");
    for id in 1..=4 {
        assert_eq!(
            cluster.data_applied(id),
            vec![Bytes::from("x")],
            "replica {id}"
        );
    }
    let entry = &cluster.committed[2][0];
    let crate::types::Payload::Command { tag, .. } = &entry.payload else {
        panic!("a command");
    };
    assert_eq!((tag.proposer, tag.request_id), (NodeId(3), 7));
    // Retransmitting the forward after execution does not execute it twice.
    cluster.tick_all(10);
    assert_eq!(cluster.data_applied(1).len(), 1);
}

#[test]
fn one_silent_replica_does_not_stop_progress_but_two_do() {
    let mut cluster = Cluster::new(4);
    cluster.cut_off.insert(NodeId(4));
    cluster.propose(1, 1, b"a");
    assert_eq!(cluster.data_applied(1), vec![Bytes::from("a")]);
    cluster.cut_off.insert(NodeId(3));
    cluster.propose(1, 2, b"b");
    assert_eq!(cluster.data_applied(1).len(), 1, "2 of 4 cannot commit");
}

#[test]
fn a_bad_signature_drops_the_message_and_is_counted() {
    let mut cluster = Cluster::new(4);
    cluster.step(
        1,
        Input::Propose {
            request_id: 1,
            data: Bytes::from_static(b"a"),
        },
    );
    cluster.step(1, Input::FlushProposals);
    let mut forged = cluster
        .in_flight
        .iter()
        .find(|e| e.to == NodeId(2) && matches!(e.message, Message::PrePrepare { .. }))
        .cloned()
        .unwrap();
    if let Message::PrePrepare { pre_prepare, .. } = &mut forged.message {
        let mut signature = pre_prepare.signature.to_vec();
        signature[5] ^= 1;
        pre_prepare.signature = signature.into();
    }
    let node = cluster.nodes[1].as_mut().unwrap();
    let mut round = vec![forged.clone()];
    assert_eq!(node.authenticate(&mut round), 1);
    assert!(round.is_empty());
    assert_eq!(node.invalid_messages().get(InvalidReason::BadSignature), 1);
    // A well-signed pre-prepare from a replica that is not the primary is ignored.
    let impostor = Signed::sign(
        Statement::PrePrepare {
            view: 0,
            seq: 1,
            digest: Batch::default().digest(),
        },
        NodeId(3),
        &test_signing_key(NodeId(3)),
    );
    let mut out = Output::default();
    node.step(
        Input::Message(Envelope {
            from: NodeId(3),
            to: NodeId(2),
            message: Message::PrePrepare {
                pre_prepare: impostor,
                batch: Batch::default(),
            },
        }),
        &mut out,
    );
    assert!(
        out.messages_after_write.is_empty(),
        "no prepare for an impostor's pre-prepare"
    );
}

#[test]
fn checkpoints_become_stable_and_garbage_is_collected() {
    let mut cluster = Cluster::new(4);
    for request in 0..20 {
        cluster.propose(1, request, b"v");
    }
    for id in 1..=4 {
        let node = cluster.node(id);
        assert_eq!(node.executed_seq(), 20);
        assert_eq!(node.stable_checkpoint(), 20, "replica {id}");
        assert_eq!(
            node.slots_held(),
            0,
            "slots at or below the checkpoint are gone"
        );
        let state = node.clone_records();
        assert!(
            !state.keys().any(|k| k.starts_with(records::SLOT_PREFIX)),
            "slot records below the checkpoint are deleted"
        );
    }
}

#[test]
fn the_primary_stops_at_the_high_watermark_until_a_checkpoint_is_stable() {
    // With two of four replicas cut off nothing commits, so no checkpoint becomes stable.
    let mut cluster = Cluster::new(4);
    let window = 2 * 4;
    cluster.cut_off.insert(NodeId(2));
    cluster.cut_off.insert(NodeId(3));
    for request in 0..(window + 5) {
        cluster.step(
            1,
            Input::Propose {
                request_id: request,
                data: Bytes::from_static(b"v"),
            },
        );
        cluster.step(1, Input::FlushProposals);
    }
    cluster.run();
    let primary = cluster.node(1);
    assert_eq!(
        primary.next_seq - 1,
        window,
        "assigned exactly up to the high watermark"
    );
    // A pre-prepare beyond the high watermark is refused by a backup.
    let batch = Batch::default();
    let far = Signed::sign(
        Statement::PrePrepare {
            view: 0,
            seq: window + 1,
            digest: batch.digest(),
        },
        NodeId(1),
        &test_signing_key(NodeId(1)),
    );
    let backup = cluster.nodes[3].as_mut().unwrap();
    let mut out = Output::default();
    backup.step(
        Input::Message(Envelope {
            from: NodeId(1),
            to: NodeId(4),
            message: Message::PrePrepare {
                pre_prepare: far,
                batch,
            },
        }),
        &mut out,
    );
    assert!(out.messages_after_write.is_empty());
}

#[test]
fn a_silent_primary_is_replaced_and_waiting_requests_execute() {
    let mut cluster = Cluster::new(4);
    cluster.propose(1, 1, b"before");
    cluster.cut_off.insert(NodeId(1));
    cluster.propose(2, 2, b"after");
    assert_eq!(
        cluster.data_applied(2).len(),
        1,
        "the old primary cannot order it"
    );
    cluster.tick_all(30);
    assert_eq!(
        cluster.live_primary(),
        Some(2),
        "view 1: the next replica leads"
    );
    for id in 2..=4 {
        assert_eq!(
            cluster.data_applied(id),
            vec![Bytes::from("before"), Bytes::from("after")],
            "replica {id}"
        );
        assert_eq!(cluster.node(id).view(), 1);
    }
}

#[test]
fn a_prepared_batch_survives_the_view_change() {
    let mut cluster = Cluster::new(4);
    // Let the batch prepare everywhere but lose every commit.
    cluster.step(
        1,
        Input::Propose {
            request_id: 1,
            data: Bytes::from_static(b"p"),
        },
    );
    cluster.step(1, Input::FlushProposals);
    let mut commits_dropped = 0;
    while let Some(envelope) = cluster.in_flight.pop_front() {
        if matches!(&envelope.message, Message::Signed(s) if matches!(s.statement, Statement::Commit { .. }))
        {
            commits_dropped += 1;
            continue;
        }
        let to = envelope.to.0;
        cluster.step(to, Input::Message(envelope));
    }
    assert!(commits_dropped > 0);
    assert!(cluster.data_applied(2).is_empty());
    cluster.cut_off.insert(NodeId(1));
    cluster.tick_all(30);
    for id in 2..=4 {
        assert_eq!(
            cluster.data_applied(id),
            vec![Bytes::from("p")],
            "replica {id}"
        );
    }
}

#[test]
fn a_new_view_whose_reproposals_do_not_follow_is_refused() {
    // Without detection, so that the forger is not excluded and its genuine new-view counts.
    let mut cluster = Cluster::with(4, |config| config.detection_enabled = false);
    cluster.propose(1, 1, b"a");
    cluster.cut_off.insert(NodeId(1));
    cluster.propose(3, 2, b"b");
    // Replica 2 (the next primary) sends its new-view; the one to replica 3 is held back.
    let new_view = cluster.intercept_new_view_to(3);
    let Statement::NewView(mut body) = new_view.statement.clone() else {
        unreachable!()
    };
    // Re-propose an extra batch nobody prepared, signed by the new primary itself.
    body.pre_prepares.push(Signed::sign(
        Statement::PrePrepare {
            view: body.view,
            seq: 2,
            digest: Batch::default().digest(),
        },
        NodeId(2),
        &test_signing_key(NodeId(2)),
    ));
    let forged = Signed::sign(
        Statement::NewView(body),
        NodeId(2),
        &test_signing_key(NodeId(2)),
    );
    let backup = cluster.nodes[2].as_mut().unwrap();
    assert!(backup.is_changing_view());
    let mut out = Output::default();
    backup.step(
        Input::Message(Envelope {
            from: NodeId(2),
            to: NodeId(3),
            message: Message::Signed(forged),
        }),
        &mut out,
    );
    assert!(
        backup.is_changing_view(),
        "the forged new-view is not followed"
    );
    let mut out = Output::default();
    backup.step(
        Input::Message(Envelope {
            from: NodeId(2),
            to: NodeId(3),
            message: Message::Signed(new_view),
        }),
        &mut out,
    );
    assert!(!backup.is_changing_view(), "the genuine one is");
}

#[test]
fn a_replica_that_was_cut_off_catches_up_through_checkpoints() {
    let mut cluster = Cluster::new(4);
    cluster.cut_off.insert(NodeId(4));
    for request in 0..30 {
        cluster.propose(1, request, b"v");
    }
    assert_eq!(cluster.node(4).executed_seq(), 0);
    cluster.cut_off.clear();
    cluster.tick_all(10);
    let lagging = cluster.node(4);
    assert_eq!(lagging.executed_seq(), cluster.node(1).executed_seq());
    assert_eq!(lagging.state_digest(), cluster.node(1).state_digest());
    assert_eq!(cluster.data_applied(4).len(), 30);
}

#[test]
fn a_restarted_replica_recovers_its_view_log_and_promises() {
    let mut cluster = Cluster::new(4);
    cluster.propose(1, 1, b"a");
    cluster.propose(1, 2, b"b");
    let node = cluster.nodes[2].take().unwrap();
    let (executed, state) = (node.executed_seq(), node.state_digest());
    let recovered = node.into_recovered_state();
    let restarted = PbftNode::new(config(3, 4), recovered).unwrap();
    assert_eq!(restarted.executed_seq(), executed);
    assert_eq!(restarted.state_digest(), state);
    cluster.nodes[2] = Some(restarted);
    cluster.committed[2].clear();
    cluster.tick_all(1);
    assert_eq!(
        cluster.data_applied(3).len(),
        2,
        "the log is replayed to the state machine"
    );
    cluster.propose(1, 3, b"c");
    assert_eq!(cluster.data_applied(3).len(), 3);
}

/// A primary cut off after proposing learns a stable checkpoint past what it executed (from
/// the others' checkpoint votes) and restarts: the slot records of its own pre-prepares below
/// the checkpoint are gone, and it must still never sign a second pre-prepare for one of
/// those sequence numbers in its view.
#[test]
fn a_primary_restarted_past_a_checkpoint_it_never_executed_proposes_above_it() {
    let mut cluster = Cluster::new(4);
    cluster.propose(1, 1, b"a");
    assert_eq!(cluster.node(1).executed_seq(), 1);
    cluster.cut_off.insert(NodeId(1));
    cluster.propose(1, 2, b"b"); // pre-prepared at 2 by the primary alone
    let checkpoint = Statement::Checkpoint {
        seq: 8,
        state: Digest::of(&[b"the others' state at 8"]),
    };
    for by in 2..=4 {
        deliver_to(
            &mut cluster,
            1,
            by,
            Message::Signed(signed(checkpoint.clone(), by)),
        );
    }
    let node = cluster.nodes[0].take().unwrap();
    assert_eq!((node.executed_seq(), node.stable_checkpoint()), (1, 8));
    let restarted = PbftNode::new(config(1, 4), node.into_recovered_state()).unwrap();
    cluster.nodes[0] = Some(restarted);
    cluster.in_flight.clear();
    cluster.step(
        1,
        Input::Propose {
            request_id: 3,
            data: Bytes::from_static(b"c"),
        },
    );
    cluster.step(1, Input::FlushProposals);
    let proposed: Vec<Seq> = cluster
        .in_flight
        .iter()
        .filter_map(|envelope| match &envelope.message {
            Message::PrePrepare { pre_prepare, .. } => pre_prepare.statement.phase(),
            _ => None,
        })
        .map(|(_, seq, _)| seq)
        .collect();
    assert!(!proposed.is_empty(), "the primary proposes");
    assert!(
        proposed.iter().all(|&seq| seq > 8),
        "proposed at {proposed:?}, at or below the stable checkpoint"
    );
}

fn signed(statement: Statement, by: u64) -> Signed {
    Signed::sign(statement, NodeId(by), &test_signing_key(NodeId(by)))
}

fn deliver_to(cluster: &mut Cluster, to: u64, from: u64, message: Message) {
    let node = cluster.nodes[to as usize - 1].as_mut().unwrap();
    let mut round = vec![Envelope {
        from: NodeId(from),
        to: NodeId(to),
        message,
    }];
    node.authenticate(&mut round);
    if let Some(envelope) = round.pop() {
        cluster.step(to, Input::Message(envelope));
    }
}

fn digest_of(data: &'static [u8]) -> Digest {
    Batch {
        requests: vec![Request {
            tag: crate::types::ProposalTag {
                proposer: NodeId(1),
                request_id: 1,
            },
            data: Bytes::from_static(data),
        }],
    }
    .digest()
}

#[test]
fn a_double_vote_is_proven_shared_and_its_signer_excluded_everywhere() {
    let mut cluster = Cluster::new(4);
    let first = signed(
        Statement::Prepare {
            view: 0,
            seq: 1,
            digest: digest_of(b"x"),
        },
        3,
    );
    let second = signed(
        Statement::Prepare {
            view: 0,
            seq: 1,
            digest: digest_of(b"y"),
        },
        3,
    );
    deliver_to(&mut cluster, 2, 3, Message::Signed(first));
    deliver_to(&mut cluster, 2, 3, Message::Signed(second));
    cluster.run(); // the evidence travels
    for id in [1, 2, 4] {
        let node = cluster.node(id);
        assert_eq!(
            node.evidence().keys().copied().collect::<Vec<_>>(),
            vec![NodeId(3)],
            "replica {id}"
        );
        assert_eq!(node.evidence()[&NodeId(3)].offence(), Offence::DoubleVote);
        assert!(node.excluded().contains(&NodeId(3)), "replica {id}");
    }
    // The three others still commit without it.
    cluster.propose(1, 1, b"after");
    for id in [1, 2, 4] {
        assert_eq!(
            cluster.data_applied(id),
            vec![Bytes::from("after")],
            "replica {id}"
        );
    }
}

#[test]
fn an_equivocating_primary_is_proven_and_replaced_at_once() {
    let mut cluster = Cluster::new(4);
    let batch_a = Batch {
        requests: vec![Request {
            tag: crate::types::ProposalTag {
                proposer: NodeId(1),
                request_id: 1,
            },
            data: Bytes::from_static(b"a"),
        }],
    };
    let batch_b = Batch {
        requests: vec![Request {
            tag: crate::types::ProposalTag {
                proposer: NodeId(1),
                request_id: 2,
            },
            data: Bytes::from_static(b"b"),
        }],
    };
    let pre_a = signed(
        Statement::PrePrepare {
            view: 0,
            seq: 1,
            digest: batch_a.digest(),
        },
        1,
    );
    let pre_b = signed(
        Statement::PrePrepare {
            view: 0,
            seq: 1,
            digest: batch_b.digest(),
        },
        1,
    );
    deliver_to(
        &mut cluster,
        2,
        1,
        Message::PrePrepare {
            pre_prepare: pre_a,
            batch: batch_a,
        },
    );
    deliver_to(
        &mut cluster,
        2,
        1,
        Message::PrePrepare {
            pre_prepare: pre_b,
            batch: batch_b,
        },
    );
    let backup = cluster.node(2);
    assert_eq!(
        backup.evidence()[&NodeId(1)].offence(),
        Offence::EquivocatingPrimary
    );
    assert!(
        backup.is_changing_view() && backup.view() == 1,
        "no timeout waited: {backup:?}"
    );
    cluster.cut_off.insert(NodeId(1));
    cluster.run();
    cluster.tick_all(5);
    for id in 2..=4 {
        let node = cluster.node(id);
        assert!(node.excluded().contains(&NodeId(1)), "replica {id}");
        assert_eq!(node.primary(), NodeId(2), "replica {id}: {node:?}");
    }
}

#[test]
fn what_proves_nothing_accuses_no_one() {
    let mut cluster = Cluster::new(4);
    // The same digest twice is a retransmission, not an offence.
    let vote = signed(
        Statement::Commit {
            view: 0,
            seq: 1,
            digest: digest_of(b"x"),
        },
        3,
    );
    deliver_to(&mut cluster, 2, 3, Message::Signed(vote.clone()));
    deliver_to(&mut cluster, 2, 3, Message::Signed(vote.clone()));
    // Evidence with one byte changed fails its signature check and is dropped.
    let other = signed(
        Statement::Commit {
            view: 0,
            seq: 1,
            digest: digest_of(b"y"),
        },
        3,
    );
    let mut forged = other.clone();
    let mut bytes = forged.signature.to_vec();
    bytes[0] ^= 1;
    forged.signature = bytes.into();
    deliver_to(
        &mut cluster,
        4,
        1,
        Message::Evidence(Box::new(Evidence::Conflicting {
            first: vote.clone(),
            second: forged,
        })),
    );
    // Statements of two signers, or two views, do not conflict.
    let other_signer = signed(
        Statement::Commit {
            view: 0,
            seq: 1,
            digest: digest_of(b"y"),
        },
        4,
    );
    deliver_to(
        &mut cluster,
        1,
        2,
        Message::Evidence(Box::new(Evidence::Conflicting {
            first: vote.clone(),
            second: other_signer,
        })),
    );
    let other_view = signed(
        Statement::Commit {
            view: 1,
            seq: 1,
            digest: digest_of(b"y"),
        },
        3,
    );
    deliver_to(
        &mut cluster,
        1,
        2,
        Message::Evidence(Box::new(Evidence::Conflicting {
            first: vote,
            second: other_view,
        })),
    );
    cluster.run();
    for id in 1..=4 {
        assert!(
            cluster.node(id).evidence().is_empty(),
            "replica {id} accused someone"
        );
    }
    assert_eq!(cluster.node(4).invalid_messages().total(), 1);
}

#[test]
fn under_report_the_offender_is_named_but_still_heard() {
    let mut cluster = Cluster::with(4, |config| {
        config.punishment_policy = PunishmentPolicy::Report
    });
    let first = signed(
        Statement::Prepare {
            view: 0,
            seq: 1,
            digest: digest_of(b"x"),
        },
        3,
    );
    let second = signed(
        Statement::Prepare {
            view: 0,
            seq: 1,
            digest: digest_of(b"y"),
        },
        3,
    );
    deliver_to(&mut cluster, 2, 3, Message::Signed(first));
    deliver_to(&mut cluster, 2, 3, Message::Signed(second));
    cluster.run();
    for id in [1, 2, 4] {
        assert!(cluster.node(id).evidence().contains_key(&NodeId(3)));
        assert!(cluster.node(id).excluded().is_empty());
    }
}

#[test]
fn evidence_survives_a_restart() {
    let mut cluster = Cluster::new(4);
    let first = signed(
        Statement::Commit {
            view: 0,
            seq: 1,
            digest: digest_of(b"x"),
        },
        4,
    );
    let second = signed(
        Statement::Commit {
            view: 0,
            seq: 1,
            digest: digest_of(b"y"),
        },
        4,
    );
    deliver_to(&mut cluster, 2, 4, Message::Signed(first));
    deliver_to(&mut cluster, 2, 4, Message::Signed(second));
    let node = cluster.nodes[1].take().unwrap();
    let restarted = PbftNode::new(config(2, 4), node.into_recovered_state()).unwrap();
    assert!(restarted.evidence().contains_key(&NodeId(4)));
    assert!(restarted.excluded().contains(&NodeId(4)));
}

/// With replica 1 (the primary of view 0) cut off, replica 2's NEW-VIEW for view 1 as sent to
/// replica 3 (held back from it), and a copy that re-proposes an extra batch nobody prepared,
/// signed by replica 2 too.
fn genuine_and_unjustified_new_views(cluster: &mut Cluster) -> (Signed, Signed) {
    cluster.propose(1, 1, b"a");
    cluster.cut_off.insert(NodeId(1));
    cluster.propose(3, 2, b"b");
    let genuine = cluster.intercept_new_view_to(3);
    let Statement::NewView(mut body) = genuine.statement.clone() else {
        unreachable!()
    };
    body.pre_prepares.push(signed(
        Statement::PrePrepare {
            view: body.view,
            seq: 99,
            digest: Batch::default().digest(),
        },
        2,
    ));
    (genuine, signed(Statement::NewView(body), 2))
}

fn assert_proven_unjustified(node: &PbftNode, primary: NodeId) {
    assert_eq!(
        node.evidence()[&primary].offence(),
        Offence::UnjustifiedNewView
    );
    assert!(node.excluded().contains(&primary));
}

#[test]
fn a_new_view_that_does_not_follow_is_evidence_against_its_primary() {
    let mut cluster = Cluster::new(4);
    let (_, forged) = genuine_and_unjustified_new_views(&mut cluster);
    deliver_to(&mut cluster, 3, 2, Message::Signed(forged));
    assert_proven_unjustified(cluster.node(3), NodeId(2));
}

/// A NEW-VIEW that arrives after its view started, or after the replica moved past it, starts
/// nothing, but an unjustified one still proves its primary faulty (the others it reached in
/// time hold that proof, and evidence must reach every honest replica or none); a genuine one
/// proves nothing, however late.
#[test]
fn an_unjustified_new_view_arriving_late_is_still_evidence() {
    let mut cluster = Cluster::new(4);
    let (genuine, forged) = genuine_and_unjustified_new_views(&mut cluster);
    deliver_to(&mut cluster, 3, 2, Message::Signed(genuine.clone()));
    assert!(!cluster.node(3).is_changing_view());
    // The view it started, and then a view past it (its primary cut off too).
    deliver_to(&mut cluster, 3, 2, Message::Signed(genuine.clone()));
    cluster.cut_off.insert(NodeId(2));
    cluster.tick_all(20);
    let backup = cluster.node(3);
    assert!(backup.view() > 1 && backup.is_changing_view());
    deliver_to(&mut cluster, 3, 2, Message::Signed(genuine));
    assert!(
        cluster.node(3).evidence().is_empty(),
        "a genuine new-view accuses no one"
    );
    deliver_to(&mut cluster, 3, 2, Message::Signed(forged));
    assert_proven_unjustified(cluster.node(3), NodeId(2));
}

/// Partitions `left` from `right`, both ways.
fn partition(cluster: &mut Cluster, left: &[u64], right: &[u64]) {
    for &a in left {
        for &b in right {
            cluster.cut_links.insert((NodeId(a), NodeId(b)));
            cluster.cut_links.insert((NodeId(b), NodeId(a)));
        }
    }
}

fn one_request_batch(request_id: u64, data: &'static [u8]) -> Batch {
    Batch {
        requests: vec![Request {
            tag: crate::types::ProposalTag {
                proposer: NodeId(1),
                request_id,
            },
            data: Bytes::from_static(data),
        }],
    }
}

/// n = 5 tolerates one fault, like n = 4, but its quorum is 4, not 2f + 1 = 3: an
/// equivocating primary that reaches two halves which cannot hear each other gets three votes
/// on each side (its own and two backups'), which must commit nothing. With quorums of 3 both
/// halves would commit, different batches at one sequence number.
#[test]
fn five_replicas_need_quorums_of_four_against_an_equivocating_primary() {
    let mut cluster = Cluster::new(5);
    partition(&mut cluster, &[2, 3], &[4, 5]);
    cluster.cut_off.insert(NodeId(1));
    for (batch, backups) in [
        (one_request_batch(1, b"a"), [2, 3]),
        (one_request_batch(2, b"b"), [4, 5]),
    ] {
        let digest = batch.digest();
        let pre_prepare = signed(
            Statement::PrePrepare {
                view: 0,
                seq: 1,
                digest,
            },
            1,
        );
        let commit = signed(
            Statement::Commit {
                view: 0,
                seq: 1,
                digest,
            },
            1,
        );
        for to in backups {
            let message = Message::PrePrepare {
                pre_prepare: pre_prepare.clone(),
                batch: batch.clone(),
            };
            deliver_to(&mut cluster, to, 1, message);
            deliver_to(&mut cluster, to, 1, Message::Signed(commit.clone()));
        }
    }
    cluster.run();
    for id in 2..=5 {
        assert_eq!(cluster.node(id).executed_seq(), 0, "replica {id} executed");
        assert!(cluster.committed[id as usize - 1].is_empty());
    }
    assert_eq!(cluster.node(2).quorum_size(), 4);
    assert_eq!(Cluster::new(4).node(2).quorum_size(), 3);
    assert_eq!(Cluster::new(7).node(2).quorum_size(), 5);
}

/// Counts what passes through it, then counts on the CPU.
#[derive(Default)]
struct CountingAggregator {
    calls: std::sync::atomic::AtomicUsize,
    largest: std::sync::atomic::AtomicUsize,
}

impl crate::gpu::VoteAggregator for CountingAggregator {
    fn aggregate_votes<'a>(
        &'a self,
        votes: &'a [crate::gpu::votes::Vote],
    ) -> futures::future::BoxFuture<
        'a,
        Result<crate::gpu::votes::VoteOutcome, crate::gpu::votes::VoteError>,
    > {
        use std::sync::atomic::Ordering::Relaxed;
        self.calls.fetch_add(1, Relaxed);
        self.largest.fetch_max(votes.len(), Relaxed);
        let cpu = crate::gpu::votes::CpuVoteAggregator::new(self.threshold());
        Box::pin(async move { cpu.aggregate_blocking(votes) })
    }

    fn threshold(&self) -> crate::gpu::votes::Threshold {
        crate::gpu::votes::Threshold::MajorityOfVotesCast
    }
}

/// A round holding the prepares of many sequence numbers is counted in one aggregator call
/// holding all their votes, and what it counts is what commits.
#[test]
fn a_rounds_prepares_are_counted_in_one_aggregator_batch() {
    use std::sync::atomic::Ordering::Relaxed;
    let counter = std::sync::Arc::new(CountingAggregator::default());
    let shared = counter.clone();
    let mut cluster = Cluster::with(4, move |config| {
        config.votes = shared.clone();
        config.checkpoint_interval = 64;
    });
    // Replica 2 takes eight pre-prepares, then a round of replica 3's and 4's prepares.
    let mut prepares = Vec::new();
    for seq in 1..=8u64 {
        let batch = one_request_batch(seq, b"x");
        let digest = batch.digest();
        let pre_prepare = signed(
            Statement::PrePrepare {
                view: 0,
                seq,
                digest,
            },
            1,
        );
        deliver_to(
            &mut cluster,
            2,
            1,
            Message::PrePrepare { pre_prepare, batch },
        );
        for by in [3, 4] {
            prepares.push(Envelope {
                from: NodeId(by),
                to: NodeId(2),
                message: Message::Signed(signed(
                    Statement::Prepare {
                        view: 0,
                        seq,
                        digest,
                    },
                    by,
                )),
            });
        }
    }
    cluster.in_flight.clear();
    let calls_before = counter.calls.load(Relaxed);
    let node = cluster.nodes[1].as_mut().unwrap();
    assert_eq!(node.authenticate(&mut prepares), 0);
    let mut out = Output::default();
    node.step_round(&mut prepares, &mut out);
    assert_eq!(
        counter.calls.load(Relaxed),
        calls_before + 1,
        "one batch per round"
    );
    // Per slot: the pre-prepare (the primary's vote) and three prepares (replica 2's own).
    assert_eq!(counter.largest.load(Relaxed), 8 * 4);
    let commits = out
        .messages_after_write
        .iter()
        .filter(|e| matches!(&e.message, Message::Signed(s) if matches!(s.statement, Statement::Commit { .. })))
        .count();
    assert_eq!(
        commits,
        8 * 3,
        "replica 2 commits every slot, to each of its three peers"
    );
}

/// Each kind of unusable message is dropped and counted under its own reason, and none of
/// them is evidence against anyone.
#[test]
fn dropped_messages_are_counted_by_reason() {
    let mut cluster = Cluster::new(4);
    let digest = digest_of(b"x");
    let prepare = |seq, by| {
        signed(
            Statement::Prepare {
                view: 0,
                seq,
                digest,
            },
            by,
        )
    };
    let mut truncated = prepare(1, 3);
    truncated.signature = Bytes::from_static(&[7; 10]);
    let mut unknown = prepare(1, 3);
    unknown.signer = NodeId(99);
    let mut forged = prepare(1, 3);
    forged.signer = NodeId(4);
    for message in [truncated, unknown, forged, prepare(0, 3)] {
        deliver_to(&mut cluster, 2, 3, Message::Signed(message));
    }
    let counts = cluster.node(2).invalid_messages();
    assert_eq!(counts.get(InvalidReason::Malformed), 1, "{counts:?}");
    assert_eq!(counts.get(InvalidReason::UnknownSigner), 1, "{counts:?}");
    assert_eq!(counts.get(InvalidReason::BadSignature), 1, "{counts:?}");
    assert_eq!(counts.get(InvalidReason::Stale), 1, "{counts:?}");
    assert_eq!(counts.total(), 4);
    assert!(cluster.node(2).evidence().is_empty());
}

#[test]
fn evidence_is_repeated_to_a_replica_until_it_is_known_to_hold_it() {
    let mut cluster = Cluster::new(4);
    cluster.cut_off.insert(NodeId(4));
    let vote = |digest| {
        let statement = Statement::Prepare {
            view: 0,
            seq: 1,
            digest,
        };
        Message::Signed(signed(statement, 3))
    };
    deliver_to(&mut cluster, 2, 3, vote(digest_of(b"x")));
    deliver_to(&mut cluster, 2, 3, vote(digest_of(b"y")));
    cluster.run();
    let evidence_in_flight = |cluster: &mut Cluster| {
        for id in 1..=4 {
            cluster.step(id, Input::Tick);
            cluster.step(id, Input::Tick);
        }
        let evidence: Vec<(NodeId, NodeId)> = cluster
            .in_flight
            .iter()
            .filter(|e| matches!(e.message, Message::Evidence(_)))
            .map(|e| (e.from, e.to))
            .collect();
        cluster.run();
        evidence
    };
    // Replicas 1 and 2 told each other; replica 4, cut off, still hears it from both.
    assert_eq!(
        evidence_in_flight(&mut cluster),
        vec![(NodeId(1), NodeId(4)), (NodeId(2), NodeId(4))]
    );
    assert!(cluster.node(4).evidence().is_empty());
    cluster.cut_off.clear();
    cluster.tick_all(4);
    assert!(cluster.node(4).evidence().contains_key(&NodeId(3)));
    assert_eq!(
        evidence_in_flight(&mut cluster),
        Vec::new(),
        "everyone knows"
    );
}

/// Two votes of one replica for one slot that reach a replica on either side of a view change
/// still convict it: the slot forgot the first when its view changed, the index of statements
/// seen did not.
#[test]
fn conflicting_votes_heard_across_a_view_change_are_evidence() {
    let mut cluster = Cluster::new(4);
    let vote = |data| {
        let statement = Statement::Prepare {
            view: 0,
            seq: 1,
            digest: digest_of(data),
        };
        Message::Signed(signed(statement, 3))
    };
    deliver_to(&mut cluster, 2, 3, vote(b"x"));
    let mut out = Output::default();
    cluster.nodes[1]
        .as_mut()
        .unwrap()
        .start_view_change(1, &mut out);
    assert!(
        cluster
            .node(2)
            .slots
            .get(&1)
            .is_none_or(|s| s.prepares.is_empty() || s.view == 0)
    );
    deliver_to(&mut cluster, 2, 3, vote(b"y"));
    assert_eq!(
        cluster.node(2).evidence()[&NodeId(3)].offence(),
        Offence::DoubleVote
    );
}

/// Replica 1 equivocates at (view 0, seq 1): one pre-prepare reaches only replica 2, the other
/// only replica 3 (which then restarts), and the prepares they send are lost. Neither can
/// prove anything alone; with retransmission and view changes held off (each would also pass
/// the primary's pre-prepare on), only the audits can bring the halves together, and every
/// honest replica ends up holding the evidence. With audits off, the same run proves nothing
/// (the control).
#[test]
fn halves_of_an_equivocation_held_apart_meet_through_audits_across_a_restart() {
    for audits in [true, false] {
        let adjust = move |config: &mut PbftConfig| {
            config.retransmit_ticks = u32::MAX;
            config.view_change_timeout_ticks = u32::MAX;
            if !audits {
                config.audit_interval_ticks = u32::MAX;
            }
        };
        let mut cluster = Cluster::with(4, adjust);
        let batch = |data: &'static [u8]| Batch {
            requests: vec![Request {
                tag: crate::types::ProposalTag {
                    proposer: NodeId(1),
                    request_id: 1,
                },
                data: Bytes::from_static(data),
            }],
        };
        let pre_prepare = |batch: &Batch| {
            let statement = Statement::PrePrepare {
                view: 0,
                seq: 1,
                digest: batch.digest(),
            };
            signed(statement, 1)
        };
        let (a, b) = (batch(b"a"), batch(b"b"));
        cluster.cut_off.insert(NodeId(1));
        for (to, batch) in [(2, a), (3, b)] {
            let pre_prepare = pre_prepare(&batch);
            deliver_to(
                &mut cluster,
                to,
                1,
                Message::PrePrepare { pre_prepare, batch },
            );
        }
        cluster.in_flight.clear();
        assert!(
            (2..=4).all(|id| cluster.node(id).evidence().is_empty()),
            "one half each proves nothing yet: {:?}",
            (2..=4)
                .map(|id| cluster.node(id).evidence().clone())
                .collect::<Vec<_>>()
        );
        let node = cluster.nodes[2].take().unwrap();
        let mut settings = config(3, 4);
        adjust(&mut settings);
        let restarted = PbftNode::new(settings, node.into_recovered_state());
        cluster.nodes[2] = Some(restarted.unwrap());
        cluster.tick_all(40);
        for id in 2..=4 {
            let evidence = cluster.node(id).evidence();
            if audits {
                assert_eq!(
                    evidence.get(&NodeId(1)).map(Evidence::offence),
                    Some(Offence::EquivocatingPrimary),
                    "replica {id}"
                );
            } else {
                assert!(evidence.is_empty(), "replica {id}: {evidence:?}");
            }
        }
        assert_eq!(cluster.statements_delivered > 0, audits);
    }
}

/// Where every replica is honest, audits name one digest per slot, everyone's the same: they
/// cost one message per peer per audit and never an answer.
#[test]
fn a_healthy_cluster_audits_without_exchanging_statements() {
    let mut cluster = Cluster::new(4);
    for request_id in 1..=6 {
        cluster.propose(2, request_id, b"x");
        cluster.tick_all(3);
    }
    cluster.tick_all(40);
    assert!(cluster.committed.iter().all(|c| c.len() == 6));
    assert!(cluster.audits_delivered > 0);
    assert_eq!(cluster.statements_delivered, 0);
}
