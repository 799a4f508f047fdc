//! Unit tests of compaction and snapshot transfer on the instant-delivery cluster of
//! `tests.rs`. The simulator covers them under faults (crashes, loss, reordering).

use bytes::Bytes;

use crate::protocol::raft::tests::Cluster;
use crate::protocol::raft::{Envelope, Input, Message, Output, RaftConfig, RaftNode};
use crate::storage::{RecoveredState, Snapshot};
use crate::types::{Entry, LogIndex, NodeId, Payload};

/// The snapshot a driver would take of `node` at `index`: its data names the index, so that a
/// test can tell snapshots apart.
fn snapshot_of(node: &RaftNode, index: LogIndex) -> Snapshot {
    Snapshot {
        index,
        term: node.log().term_at(index).unwrap(),
        data: Bytes::from(format!("the state through {index}, padded to span chunks").repeat(3)),
        membership: None,
    }
}

fn take_snapshot(cluster: &mut Cluster, id: NodeId, index: LogIndex) -> Output {
    let snapshot = snapshot_of(&cluster.nodes[&id], index);
    let mut out = Output::default();
    cluster
        .nodes
        .get_mut(&id)
        .unwrap()
        .step(Input::SnapshotTaken(snapshot), &mut out);
    out
}

fn small_chunks(config: &mut RaftConfig) {
    config.snapshot_chunk_bytes = 16;
}

#[test]
fn a_snapshot_compacts_the_log_behind_the_previous_one() {
    let mut cluster = Cluster::new(3, small_chunks);
    let leader = cluster.elect();
    for i in 0..10 {
        cluster.propose(leader, i, "x");
    }
    let commit = cluster.nodes[&leader].commit_index();
    assert!(commit >= 10);
    let first = take_snapshot(&mut cluster, leader, 5);
    assert_eq!(first.write.snapshot.as_ref().map(|s| s.index), Some(5));
    assert_eq!(first.write.compact_through, None, "the first keeps the log");
    assert_eq!(cluster.nodes[&leader].log().first_index(), 1);
    let second = take_snapshot(&mut cluster, leader, commit);
    assert_eq!(second.write.compact_through, Some(5));
    let node = &cluster.nodes[&leader];
    assert_eq!(node.log().first_index(), 6);
    assert_eq!(node.log().term_at(5), Some(snapshot_of(node, commit).term));
    assert_eq!(node.snapshot().map(|s| s.index), Some(commit));

    // Ignored: an older one, one past the commit index, one naming another term.
    for snapshot in [
        snapshot_of(node, 7),
        Snapshot {
            index: commit + 1,
            ..snapshot_of(node, commit)
        },
        Snapshot {
            term: 99,
            ..snapshot_of(node, commit)
        },
    ] {
        let mut out = Output::default();
        let node = cluster.nodes.get_mut(&leader).unwrap();
        node.step(Input::SnapshotTaken(snapshot), &mut out);
        assert!(out.write.is_empty(), "{out:?}");
        assert_eq!(node.snapshot().map(|s| s.index), Some(commit));
    }
}

#[test]
fn with_a_retention_the_log_keeps_that_many_entries_behind_its_head() {
    let mut cluster = Cluster::new(3, |config| {
        small_chunks(config);
        config.log_retention = 8;
    });
    let leader = cluster.elect();
    for i in 0..6 {
        cluster.propose(leader, i, "x");
    }
    let first_snapshot = cluster.nodes[&leader].commit_index();
    let out = take_snapshot(&mut cluster, leader, first_snapshot);
    assert_eq!(
        out.write.compact_through, None,
        "fewer than 8 entries behind the head"
    );
    // Once the head is 8 past the snapshot, durable writes compact up to it, and no further.
    for i in 6..20 {
        cluster.propose(leader, i, "x");
    }
    let node = &cluster.nodes[&leader];
    assert_eq!(node.log().first_index(), first_snapshot + 1);
    let last = node.log().last_index();
    assert!(last >= first_snapshot + 14, "{last}");
    // A new snapshot at the head lets it drop all but the last 8.
    let out = take_snapshot(&mut cluster, leader, last);
    assert_eq!(out.write.compact_through, Some(last - 8));
    let node = &cluster.nodes[&leader];
    assert_eq!(node.log().first_index(), last - 7);
    assert_eq!(node.log().last_index(), last);
    // Followers without a snapshot of their own keep their whole log.
    let follower = cluster
        .nodes
        .keys()
        .copied()
        .find(|&id| id != leader)
        .unwrap();
    assert_eq!(cluster.nodes[&follower].log().first_index(), 1);
}

/// Three nodes whose leader compacted its log past what one follower (cut off meanwhile)
/// holds, healed again: `(cluster, leader, that follower, the leader's commit index)`.
fn compacted_past_a_follower() -> (Cluster, NodeId, NodeId, LogIndex) {
    let mut cluster = Cluster::new(3, small_chunks);
    let leader = cluster.elect();
    let behind = cluster.another_than(leader);
    cluster.isolate(behind);
    for i in 0..10 {
        cluster.propose(leader, i, "x");
    }
    let commit = cluster.nodes[&leader].commit_index();
    take_snapshot(&mut cluster, leader, 4);
    take_snapshot(&mut cluster, leader, commit);
    cluster.heal();
    (cluster, leader, behind, commit)
}

#[test]
fn a_follower_behind_the_compacted_log_gets_the_snapshot_in_chunks_then_entries() {
    let (mut cluster, leader, behind, commit) = compacted_past_a_follower();
    cluster.tick_all(10);

    let sent = cluster.nodes[&leader].snapshot().cloned().unwrap();
    assert!(
        sent.data.len() > 4 * 16,
        "spans more chunks than are in flight"
    );
    assert_eq!(cluster.restored, vec![(behind, sent.clone())]);
    let follower = &cluster.nodes[&behind];
    assert_eq!(follower.snapshot(), Some(&sent));
    assert!(follower.commit_index() >= commit);
    assert_eq!(follower.log().first_index(), commit + 1);
    // Replication goes on from the log after it.
    cluster.propose(leader, 100, "after the snapshot");
    cluster.tick_all(3);
    assert!(
        cluster
            .commands_applied(behind)
            .contains(&Bytes::from_static(b"after the snapshot"))
    );
    let leader_log = cluster.nodes[&leader].log().last_index();
    assert_eq!(cluster.nodes[&behind].log().last_index(), leader_log);
}

/// The offset of the chunk `input` carries, if it carries one.
fn chunk_offset(input: &Input) -> Option<u64> {
    match input {
        Input::Message(Envelope {
            message: Message::InstallSnapshot { offset, .. },
            ..
        }) => Some(*offset),
        _ => None,
    }
}

/// The offsets of the chunks among `held`.
fn chunks(held: &[(NodeId, Input)]) -> Vec<u64> {
    held.iter()
        .filter_map(|(_, input)| chunk_offset(input))
        .collect()
}

/// Delivers everything held but the chunks (until nothing else is held).
fn pass_all_but_chunks(cluster: &mut Cluster) {
    loop {
        let (chunks, others): (Vec<_>, Vec<_>) = std::mem::take(&mut cluster.held)
            .into_iter()
            .partition(|(_, input)| {
                matches!(
                    input,
                    Input::Message(Envelope {
                        message: Message::InstallSnapshot { .. },
                        ..
                    })
                )
            });
        cluster.held = chunks;
        if others.is_empty() {
            return;
        }
        for (to, input) in others {
            cluster.step(to, input);
        }
    }
}

/// Ticks until the leader has sent its first window of chunks over a slow link (where they
/// stay held), delivering everything else.
fn hold_first_window(cluster: &mut Cluster) {
    for _ in 0..20 {
        cluster.tick_all(1);
        pass_all_but_chunks(cluster);
        if !chunks(&cluster.held).is_empty() {
            break;
        }
    }
}

#[test]
fn a_lost_chunk_is_sent_again_from_what_the_follower_holds() {
    let (mut cluster, leader, behind, _) = compacted_past_a_follower();
    cluster.slow.insert((leader, behind));
    hold_first_window(&mut cluster);
    let total = cluster.nodes[&leader].snapshot().unwrap().data.len() as u64;
    let window = (0..total)
        .step_by(16)
        .take(crate::protocol::raft::config::SNAPSHOT_CHUNKS_IN_FLIGHT)
        .collect::<Vec<_>>();
    assert!(window.len() > 2, "the test needs a hole between chunks");
    assert_eq!(chunks(&cluster.held), window, "a window of chunks");
    // The second chunk is lost; the others arrive (what the leader sends next is held).
    let held = std::mem::take(&mut cluster.held);
    for (to, input) in held {
        let lost = matches!(
            &input,
            Input::Message(Envelope {
                message: Message::InstallSnapshot { offset: 16, .. },
                ..
            })
        );
        if !lost {
            cluster.step(to, input);
        }
    }
    assert!(cluster.restored.is_empty(), "not installed with a hole");
    // The follower answered the chunks after the hole with the 16 bytes it holds: the leader
    // resumed from there, never from 0.
    pass_all_but_chunks(&mut cluster);
    let resent = chunks(&cluster.held);
    assert!(!resent.contains(&0), "{resent:?}");
    // Once, although every chunk after the hole drew the same answer.
    assert_eq!(
        resent.iter().filter(|&&offset| offset == 16).count(),
        1,
        "{resent:?}"
    );
    cluster.slow.clear();
    for (to, input) in std::mem::take(&mut cluster.held) {
        cluster.step(to, input);
    }
    cluster.tick_all(10);
    let sent = cluster.nodes[&leader].snapshot().cloned().unwrap();
    assert_eq!(cluster.restored, vec![(behind, sent)]);
}

/// A heartbeat answer proves that the follower is there, not that the chunks in flight are
/// lost: the leader sends them again only after an election timeout without progress, and
/// waits twice as long before each next time. (Under load heartbeats are answered well before
/// a window of megabyte chunks is stored, and sending the window again at each answer buried a
/// 1 GiB transfer under copies of its first 16 MiB.)
#[test]
fn chunks_in_flight_are_sent_again_only_after_a_silence_that_grows() {
    let (mut cluster, leader, behind, _) = compacted_past_a_follower();
    let config = cluster.nodes[&leader].config().clone();
    let (timeout, heartbeat) = (
        config.election_timeout_ticks as usize,
        config.heartbeat_interval_ticks as usize,
    );
    cluster.slow.insert((leader, behind));
    // Every chunk is lost; heartbeats and their answers go through.
    let mut sent_at = Vec::new();
    for tick in 0..timeout * 12 {
        cluster.tick_all(1);
        pass_all_but_chunks(&mut cluster);
        let lost = std::mem::take(&mut cluster.held);
        if chunks(&lost).contains(&0) {
            sent_at.push(tick);
        }
    }
    let gaps: Vec<usize> = sent_at.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps.len() >= 2, "sent at ticks {sent_at:?}");
    for (i, &gap) in gaps.iter().take(3).enumerate() {
        let patience = timeout << i;
        assert!(
            (patience..=patience + heartbeat).contains(&gap),
            "resend {i} came {gap} ticks after the one before, not after {patience} \
             (sent at ticks {sent_at:?})"
        );
    }
    // With the link healed, the transfer completes.
    cluster.slow.clear();
    cluster.tick_all(timeout * 8);
    let sent = cluster.nodes[&leader].snapshot().cloned().unwrap();
    assert_eq!(cluster.restored, vec![(behind, sent)]);
}

/// An answer that left the follower before it restarted (and lost the chunks it held) can
/// reach the leader after the restart's own answers, naming more than the follower now holds.
/// The follower's later answers then name less than the leader believes, and look like stale
/// ones; after a silence the leader must resume from what they name, or the transfer stalls
/// for good (chaos seed 1103926).
#[test]
fn an_answer_from_before_a_restart_does_not_stall_the_transfer() {
    let (mut cluster, leader, behind, _) = compacted_past_a_follower();
    let config = cluster.nodes[&leader].config().clone();
    let timeout = config.election_timeout_ticks as usize;
    cluster.slow.insert((leader, behind));
    hold_first_window(&mut cluster);
    let total = cluster.nodes[&leader].snapshot().unwrap().data.len() as u64;
    assert!(
        total > 6 * 16,
        "the test needs chunks past the stale answer"
    );
    // The follower gets the first chunk alone and says it holds 16 bytes.
    let held = std::mem::take(&mut cluster.held);
    let (first, rest): (Vec<_>, Vec<_>) = held
        .into_iter()
        .partition(|(_, input)| chunk_offset(input) == Some(0));
    for (to, input) in first {
        cluster.step(to, input);
    }
    pass_all_but_chunks(&mut cluster);
    // The stale answer: 96 bytes, from before a restart.
    let (term, index) = (
        cluster.nodes[&leader].term(),
        cluster.nodes[&leader].snapshot().unwrap().index,
    );
    cluster.step(
        leader,
        Input::Message(Envelope {
            from: behind,
            to: leader,
            message: Message::InstallSnapshotResponse {
                term,
                index,
                received: 96,
            },
        }),
    );
    // The chunks from 96 on reach the follower, which holds 16 and says so each time; the
    // others are lost.
    for (to, input) in rest {
        if chunk_offset(&input).is_some_and(|offset| offset >= 96) {
            cluster.step(to, input);
        }
    }
    // A silence later the leader resumes from 16, not from 96.
    let mut resent = Vec::new();
    for _ in 0..timeout * 3 {
        cluster.tick_all(1);
        pass_all_but_chunks(&mut cluster);
        resent.extend(chunks(&cluster.held));
        if resent.contains(&16) {
            break;
        }
        // Lost, as in the silence.
        cluster.held.clear();
    }
    assert!(resent.contains(&16), "resent {resent:?}");
    cluster.slow.clear();
    for (to, input) in std::mem::take(&mut cluster.held) {
        cluster.step(to, input);
    }
    cluster.tick_all(timeout * 4);
    let sent = cluster.nodes[&leader].snapshot().cloned().unwrap();
    assert_eq!(cluster.restored, vec![(behind, sent)]);
}

/// One chunk of `data` as a leader of term `term` would send it.
fn chunk(term: u64, data: &[u8], offset: usize, length: usize, index: LogIndex) -> Message {
    let part = Bytes::copy_from_slice(&data[offset..offset + length]);
    Message::InstallSnapshot {
        term,
        index,
        snapshot_term: term,
        total: data.len() as u64,
        checksum: crc32fast::hash(data),
        offset: offset as u64,
        chunk_checksum: crc32fast::hash(&part),
        data: part,
        membership: None,
    }
}

fn received(out: &Output) -> Vec<u64> {
    out.messages
        .iter()
        .chain(&out.messages_after_write)
        .filter_map(|e| match e.message {
            Message::InstallSnapshotResponse { received, .. } => Some(received),
            _ => None,
        })
        .collect()
}

/// Node 2 of two voters: a follower that has heard from no leader yet.
fn new_follower() -> RaftNode {
    let voters = vec![NodeId(1), NodeId(2)];
    RaftNode::new(
        RaftConfig::new(NodeId(2), voters),
        RecoveredState::default(),
    )
    .unwrap()
}

/// Hands `follower` (see [`new_follower`]) one message from node 1; returns what it did.
fn from_leader(follower: &mut RaftNode, message: Message) -> Output {
    let mut out = Output::default();
    let envelope = Envelope {
        from: NodeId(1),
        to: NodeId(2),
        message,
    };
    follower.step(Input::Message(envelope), &mut out);
    out
}

#[test]
fn damaged_chunks_and_a_damaged_whole_are_refused() {
    let mut follower = new_follower();
    let data = b"0123456789abcdef".to_vec();
    let mut deliver = |message| from_leader(&mut follower, message);
    // A chunk whose bytes do not match its checksum is not kept.
    let mut damaged = chunk(1, &data, 0, 8, 20);
    if let Message::InstallSnapshot { chunk_checksum, .. } = &mut damaged {
        *chunk_checksum ^= 1;
    }
    assert_eq!(received(&deliver(damaged)), vec![0]);
    assert_eq!(received(&deliver(chunk(1, &data, 0, 8, 20))), vec![8]);
    // Out of order: answered with what is held.
    assert_eq!(received(&deliver(chunk(1, &data, 12, 4, 20))), vec![8]);
    // A whole whose checksum does not match: nothing installed, start again from 0.
    let mut last = chunk(1, &data, 8, 8, 20);
    if let Message::InstallSnapshot { checksum, .. } = &mut last {
        *checksum ^= 1;
    }
    // The altered whole checksum is another snapshot to the follower: it starts over.
    let out = deliver(last);
    assert_eq!(received(&out), vec![0]);
    assert!(out.restore.is_none());
    // The real last chunk completes it.
    let out = deliver(chunk(1, &data, 8, 8, 20));
    assert_eq!(received(&out), vec![16]);
    let restored = out.restore.expect("installed");
    assert_eq!((restored.index, &restored.data[..]), (20, &data[..]));
    assert_eq!(out.write.compact_through, Some(20));
    assert!(
        out.messages_after_write.iter().any(|e| matches!(
            e.message,
            Message::InstallSnapshotResponse { received: 16, .. }
        )),
        "the final answer waits for the write"
    );
    assert_eq!(follower.commit_index(), 20);
    assert_eq!(follower.log().last_index(), 20);
    assert_eq!(follower.log().last_term(), 1);
}

/// Every chunk matches its own checksum, but the whole the chunks make does not match the
/// checksum they all declare: refused once the last chunk is in, nothing installed; the same
/// chunks under the right checksum install.
#[test]
fn a_whole_whose_chunks_check_out_but_not_its_checksum_is_refused() {
    let mut follower = new_follower();
    let data = b"three chunks of snapshot".to_vec();
    let mut deliver = |message| from_leader(&mut follower, message);
    let declaring = |offset, length, declared: u32| {
        let mut message = chunk(1, &data, offset, length, 30);
        if let Message::InstallSnapshot { checksum, .. } = &mut message {
            *checksum = declared;
        }
        message
    };
    let wrong = crc32fast::hash(&data) ^ 0x8000_0000;
    assert_eq!(received(&deliver(declaring(0, 10, wrong))), vec![10]);
    assert_eq!(received(&deliver(declaring(10, 10, wrong))), vec![20]);
    let out = deliver(declaring(20, 4, wrong));
    assert_eq!(received(&out), vec![0], "start again from the beginning");
    assert!(out.restore.is_none());
    let right = crc32fast::hash(&data);
    deliver(declaring(0, 10, right));
    deliver(declaring(10, 10, right));
    let out = deliver(declaring(20, 4, right));
    assert_eq!(received(&out), vec![24]);
    let restored = out.restore.expect("installed");
    assert_eq!((restored.index, &restored.data[..]), (30, &data[..]));
}

#[test]
fn a_node_restarts_from_its_snapshot_and_the_log_after_it() {
    let entry = |index, term| Entry {
        index,
        term,
        payload: Payload::Blank,
    };
    let config = RaftConfig::new(NodeId(1), vec![NodeId(1), NodeId(2), NodeId(3)]);
    let snapshot = Snapshot {
        index: 8,
        term: 2,
        data: Bytes::from_static(b"state"),
        membership: None,
    };
    // The store kept an interval of entries before the snapshot and some after it.
    let recovered = RecoveredState {
        entries: (5..=10).map(|i| entry(i, 2)).collect(),
        snapshot: Some(snapshot.clone()),
        ..Default::default()
    };
    let node = RaftNode::new(config.clone(), recovered).unwrap();
    assert_eq!(node.commit_index(), 8);
    assert_eq!((node.log().first_index(), node.log().last_index()), (5, 10));
    assert_eq!(node.snapshot(), Some(&snapshot));
    // Only the snapshot.
    let recovered = RecoveredState {
        snapshot: Some(snapshot.clone()),
        ..Default::default()
    };
    let node = RaftNode::new(config.clone(), recovered).unwrap();
    assert_eq!((node.commit_index(), node.log().last_index()), (8, 8));
    assert_eq!(node.log().last_term(), 2);
    // A log that disagrees with its snapshot, or leaves a gap after it, is refused.
    for entries in [
        (5..=10).map(|i| entry(i, 3)).collect::<Vec<_>>(),
        (10..=12).map(|i| entry(i, 2)).collect(),
    ] {
        let recovered = RecoveredState {
            entries,
            snapshot: Some(snapshot.clone()),
            ..Default::default()
        };
        assert!(RaftNode::new(config.clone(), recovered).is_err());
    }
}
