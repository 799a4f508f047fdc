//! Snapshots (Raft §7): compacting the log behind the driver's snapshots, and sending a
//! snapshot in chunks to a follower whose next entry the leader's log no longer holds.
//!
//! - The driver snapshots the applied state every so many entries and says so with
//!   [`Input::SnapshotTaken`](crate::protocol::Input::SnapshotTaken). The core keeps the newest
//!   snapshot (to send) and compacts the log it covers, keeping a tail behind the head so that
//!   a follower a little behind catches up from the log and only one far behind (or new, or
//!   restored from an old disk) needs the snapshot. With `log_retention` (the driver's interval)
//!   the tail is that many entries and compaction follows each durable write, so the log
//!   never holds much more than one interval; without it, the log the *previous* snapshot
//!   covered is dropped when a new one is taken (between one and two intervals held, more
//!   while a snapshot is being serialized).
//! - A leader that finds a follower's next index compacted away sends
//!   [`Message::InstallSnapshot`] chunks of at most `snapshot_chunk_bytes`, a few in flight
//!   ([`SNAPSHOT_CHUNKS_IN_FLIGHT`]), each with a CRC-32 of its bytes and the CRC-32 of the whole. The
//!   follower keeps the bytes it received in order and answers each chunk with how many it
//!   holds ([`Message::InstallSnapshotResponse`]); the leader resumes from there after a lost or
//!   damaged chunk, a restart of the follower (which starts again from 0; a late answer from
//!   before the restart is caught at the next silence), or a silence: a
//!   heartbeat answer when no chunk was answered for a while (an election timeout at first,
//!   doubled at each silence; see [`OutgoingSnapshot::patience`]). The transfer keeps the
//!   snapshot it started with even if the leader takes a newer one meanwhile, so frequent
//!   snapshots cannot starve a slow transfer.
//! - A follower with every byte checks the whole checksum, then installs: if its log holds the
//!   snapshot's last entry it keeps what follows (Raft §7), otherwise it drops its log; it
//!   commits through the snapshot, asks the store to save it, and hands it to the driver in
//!   [`Output::restore`](crate::protocol::Output::restore). Its final answer leaves only after
//!   that write is durable.

use bytes::{Bytes, BytesMut};

use crate::protocol::Event;
use crate::protocol::raft::Output;
use crate::protocol::raft::config::SNAPSHOT_CHUNKS_IN_FLIGHT;
use crate::protocol::raft::message::Message;
use crate::protocol::raft::node::{RaftNode, Role};
use crate::protocol::raft::progress::ProgressState;
use crate::storage::Snapshot;
use crate::types::{LogIndex, NodeId, Term};

/// The most a follower reserves up front for a snapshot it starts receiving.
const MAX_PREALLOCATED: u64 = 4 << 30;

/// The longest a leader waits for a chunk's answer before it sends the chunks in flight
/// again, in election timeouts (see [`OutgoingSnapshot::patience`]).
const MAX_PATIENCE_ELECTION_TIMEOUTS: u64 = 64;

/// A snapshot on its way to one follower.
#[derive(Clone, Debug)]
pub(crate) struct OutgoingSnapshot {
    pub(crate) snapshot: Snapshot,
    /// CRC-32 of the whole snapshot.
    checksum: u32,
    /// The offset of the next chunk to send.
    sent: u64,
    /// The bytes the follower last said it holds.
    acked: u64,
    /// Some chunk was sent (an empty snapshot is one empty chunk).
    sent_any: bool,
    /// The leader's tick when chunks last left or the follower last reported progress.
    quiet_since: u64,
    /// Ticks of silence after which the chunks in flight are presumed lost: an election
    /// timeout, doubled each time it runs out (up to [`MAX_PATIENCE_ELECTION_TIMEOUTS`]) and
    /// reset by progress. A heartbeat answer alone proves nothing about the chunks: under load
    /// heartbeats leave every few ticks and are answered well before a window of megabyte
    /// chunks is decoded and stored, and sending the window again at each of them buried the
    /// follower under copies (a 1 GiB transfer took 29 s, mostly resending its first window).
    patience: u64,
    /// The offset the leader last went back to after an answer without progress: the other
    /// answers naming it (to chunks sent before it went back) are not news.
    rewound_to: Option<u64>,
    /// The lowest answer below `acked` (and above 0) since the last progress, set aside as
    /// stale. Usually it is: it left the follower before the answer that set `acked`. But an
    /// answer from before a follower's restart can arrive after the restart's own answers and
    /// set `acked` past what the follower now holds; then every later answer names less and
    /// looks stale. So when a silence runs out, the leader resumes from the lowest such answer
    /// instead (see `snapshot_heartbeat`).
    lowest_set_aside: Option<u64>,
}

impl OutgoingSnapshot {
    pub(crate) fn new(snapshot: Snapshot, checksum: u32, now: u64, patience: u64) -> Self {
        OutgoingSnapshot {
            checksum,
            snapshot,
            sent: 0,
            acked: 0,
            sent_any: false,
            quiet_since: now,
            patience,
            rewound_to: None,
            lowest_set_aside: None,
        }
    }

    fn total(&self) -> u64 {
        self.snapshot.data.len() as u64
    }
}

/// A snapshot a follower is receiving: the bytes so far, in order.
#[derive(Debug)]
pub(crate) struct IncomingSnapshot {
    index: LogIndex,
    term: Term,
    total: u64,
    checksum: u32,
    data: BytesMut,
    /// CRC-32 of `data`, combined from the chunks' as they arrive: each byte is hashed once
    /// (with the chunk's check), not again in a pass over the whole at the end.
    crc_so_far: crc32fast::Hasher,
    membership: Option<crate::membership::Membership>,
}

/// One chunk of [`Message::InstallSnapshot`], as the follower handles it.
pub(crate) struct SnapshotChunk {
    pub(crate) index: LogIndex,
    pub(crate) snapshot_term: Term,
    pub(crate) total: u64,
    pub(crate) checksum: u32,
    pub(crate) offset: u64,
    pub(crate) data: Bytes,
    pub(crate) chunk_checksum: u32,
    pub(crate) membership: Option<crate::membership::Membership>,
}

impl RaftNode {
    /// [`Input::SnapshotTaken`](crate::protocol::Input::SnapshotTaken): keep the snapshot and
    /// drop the log the previous one covered.
    pub(crate) fn on_snapshot_taken(&mut self, snapshot: Snapshot, out: &mut Output) {
        let newer = self
            .snapshot
            .as_ref()
            .is_none_or(|held| snapshot.index > held.index);
        if !newer
            || snapshot.index > self.commit_index
            || self.log.term_at(snapshot.index) != Some(snapshot.term)
        {
            return;
        }
        let mut snapshot = snapshot;
        snapshot.membership = Some(self.members.at(snapshot.index).clone());
        self.members.rebase(snapshot.index);
        out.write.snapshot = Some(snapshot.clone());
        let previous = self.snapshot.replace(snapshot);
        if self.config.log_retention > 0 {
            self.compact_log(out);
        } else if let Some(previous) = previous
            && previous.index >= self.log.first_index()
        {
            self.log.compact_through(previous.index, previous.term);
            out.write.compact(previous.index);
        }
    }

    /// Compacts the log through the lower of the latest snapshot's index and
    /// `log_retention` entries behind the last one, once that drops at least an eighth of
    /// `log_retention` entries (compacting in steps keeps the store's deletions batched).
    pub(crate) fn compact_log(&mut self, out: &mut Output) {
        let retention = self.config.log_retention;
        let Some(snapshot) = &self.snapshot else {
            return;
        };
        if retention == 0 {
            return;
        }
        let last = self.log.last_index();
        let mut through = snapshot.index.min(last.saturating_sub(retention));
        if let Some(needed) = self.needed_by_live_followers() {
            // Keep what a live follower still needs (one receiving a snapshot needs the log
            // after it), or it would chase snapshot after snapshot; but never more than four
            // intervals: a follower that slow is sent a newer snapshot.
            let floor = snapshot.index.min(last.saturating_sub(4 * retention));
            through = through.min(needed).max(floor);
        }
        let step = (retention / 8).max(1);
        if through < self.log.first_index() + step - 1 {
            return;
        }
        let Some(term) = self.log.term_at(through) else {
            return;
        };
        self.log.compact_through(through, term);
        out.write.compact(through);
    }

    /// On a leader, the lowest index a live follower (one heard from in the current
    /// check-quorum round) has not acknowledged, or one receiving a snapshot needs next (that
    /// snapshot's index: it may be silent for a while as it writes and restores it).
    fn needed_by_live_followers(&self) -> Option<LogIndex> {
        let leader = self.leader_state.as_ref()?;
        leader
            .progress
            .values()
            .filter_map(|progress| match &progress.outgoing_snapshot {
                Some(outgoing) => Some(outgoing.snapshot.index),
                None => progress.recently_active.then_some(progress.match_index),
            })
            .min()
    }

    /// The snapshot this node holds (taken here or installed from a leader), if any.
    pub fn snapshot(&self) -> Option<&Snapshot> {
        self.snapshot.as_ref()
    }

    /// Called by `send_appends` when `peer`'s next entry was compacted away: starts sending it
    /// the snapshot. Returns false when there is none to send (the log was recovered compacted
    /// but the snapshot is not held: cannot happen with a store that returns its snapshot).
    pub(crate) fn start_snapshot_transfer(&mut self, peer: NodeId, out: &mut Output) -> bool {
        let Some(snapshot) = self.snapshot.clone() else {
            return false;
        };
        let checksum = match self.snapshot_checksum {
            Some((index, checksum)) if index == snapshot.index => checksum,
            _ => {
                let checksum = crc32fast::hash(&snapshot.data);
                self.snapshot_checksum = Some((snapshot.index, checksum));
                checksum
            }
        };
        let (now, patience) = (self.leader_ticks(), self.initial_snapshot_patience());
        let Some(progress) = self.progress_mut(peer) else {
            return false;
        };
        progress.state = ProgressState::Snapshot;
        out.events.push(Event::SnapshotSendStarted {
            to: peer,
            index: snapshot.index,
            bytes: snapshot.data.len() as u64,
        });
        progress.outgoing_snapshot = Some(OutgoingSnapshot::new(snapshot, checksum, now, patience));
        self.send_snapshot_chunks(peer, out);
        true
    }

    /// The leader's tick count (0 on other roles).
    fn leader_ticks(&self) -> u64 {
        self.leader_state
            .as_ref()
            .map_or(0, |state| state.reads.ticks)
    }

    /// [`OutgoingSnapshot::patience`] before the first silence.
    fn initial_snapshot_patience(&self) -> u64 {
        u64::from(self.config.election_timeout_ticks.max(1))
    }

    /// Sends `peer` the next chunks of its snapshot, up to the window.
    pub(crate) fn send_snapshot_chunks(&mut self, peer: NodeId, out: &mut Output) {
        let term = self.term;
        let chunk_bytes = self.config.snapshot_chunk_bytes as u64;
        let window = chunk_bytes * SNAPSHOT_CHUNKS_IN_FLIGHT as u64;
        let now = self.leader_ticks();
        let mut chunks = Vec::new();
        if let Some(outgoing) = self
            .progress_mut(peer)
            .and_then(|p| p.outgoing_snapshot.as_mut())
        {
            let total = outgoing.total();
            while (outgoing.sent < total || !outgoing.sent_any)
                && outgoing.sent.saturating_sub(outgoing.acked) < window
            {
                let end = (outgoing.sent + chunk_bytes).min(total);
                let data = outgoing
                    .snapshot
                    .data
                    .slice(outgoing.sent as usize..end as usize);
                chunks.push(Message::InstallSnapshot {
                    term,
                    index: outgoing.snapshot.index,
                    snapshot_term: outgoing.snapshot.term,
                    total,
                    checksum: outgoing.checksum,
                    offset: outgoing.sent,
                    chunk_checksum: crc32fast::hash(&data),
                    data,
                    membership: outgoing.snapshot.membership.clone().map(Box::new),
                });
                outgoing.sent = end;
                outgoing.sent_any = true;
                outgoing.quiet_since = now;
            }
        }
        for chunk in chunks {
            self.send(peer, chunk, out);
        }
    }

    /// Leader side of [`Message::InstallSnapshotResponse`].
    pub(crate) fn handle_install_snapshot_response(
        &mut self,
        from: NodeId,
        index: LogIndex,
        received: u64,
        out: &mut Output,
    ) {
        let (now, patience) = (self.leader_ticks(), self.initial_snapshot_patience());
        let Some(progress) = self.progress_heard_from(from) else {
            return;
        };
        let Some(outgoing) = progress.outgoing_snapshot.as_mut() else {
            return; // an answer to a transfer that ended
        };
        if index != outgoing.snapshot.index {
            return;
        }
        if received >= outgoing.total() && outgoing.sent_any {
            progress.snapshot_installed(index);
            out.events
                .push(Event::SnapshotSendFinished { to: from, index });
            self.send_appends(from, out);
            return;
        }
        if received <= outgoing.acked {
            // No progress: a chunk was lost or refused, or the follower restarted and lost
            // what it held. Resume from what it holds, once: the chunks already in flight
            // behind the lost one draw the same answer, and going back for each of them would
            // send the window again and again. An answer below an earlier one is stale (it
            // left before that one), unless the follower lost everything.
            let stale = received < outgoing.acked && received > 0;
            if stale {
                let lowest = outgoing.lowest_set_aside.get_or_insert(received);
                *lowest = (*lowest).min(received);
                return;
            }
            if outgoing.rewound_to == Some(received) {
                return;
            }
            outgoing.rewound_to = Some(received);
            outgoing.sent = received;
        } else {
            outgoing.rewound_to = None;
            outgoing.lowest_set_aside = None;
            outgoing.quiet_since = now;
            outgoing.patience = patience;
        }
        outgoing.acked = received;
        outgoing.sent = outgoing.sent.max(received);
        self.send_snapshot_chunks(from, out);
    }

    /// A heartbeat answer from a follower receiving a snapshot (so it is there and hears this
    /// leader): if no chunk left and none was answered with progress for its
    /// [`OutgoingSnapshot::patience`], the chunks in flight are presumed lost and sent again
    /// from what the follower last said it holds (the lowest answer set aside as stale since
    /// the last progress, if any: a whole silence of such answers means the follower holds
    /// less than the leader believed), and the patience doubles.
    pub(crate) fn snapshot_heartbeat(&mut self, from: NodeId, out: &mut Output) {
        let now = self.leader_ticks();
        let most = self
            .initial_snapshot_patience()
            .saturating_mul(MAX_PATIENCE_ELECTION_TIMEOUTS);
        let Some(outgoing) = self
            .progress_mut(from)
            .and_then(|p| p.outgoing_snapshot.as_mut())
        else {
            return;
        };
        if now.saturating_sub(outgoing.quiet_since) >= outgoing.patience {
            outgoing.patience = outgoing.patience.saturating_mul(2).min(most);
            if let Some(lowest) = outgoing.lowest_set_aside.take() {
                outgoing.acked = outgoing.acked.min(lowest);
            }
            outgoing.sent = outgoing.acked;
            outgoing.rewound_to = Some(outgoing.acked);
            if outgoing.acked == 0 {
                outgoing.sent_any = false;
            }
            self.send_snapshot_chunks(from, out);
        }
    }

    /// Follower side of [`Message::InstallSnapshot`].
    pub(crate) fn handle_install_snapshot(
        &mut self,
        leader: NodeId,
        chunk: SnapshotChunk,
        out: &mut Output,
    ) {
        if self.role == Role::Leader {
            return;
        }
        let (term, index) = (self.term, chunk.index);
        let answer = |node: &Self, received: u64, out: &mut Output| {
            let message = Message::InstallSnapshotResponse {
                term,
                index,
                received,
            };
            node.send(leader, message, out);
        };
        if index <= self.commit_index {
            // Everything it covers is committed here already: nothing to install.
            answer(self, chunk.total, out);
            return;
        }
        let matches = |held: &IncomingSnapshot| {
            (held.index, held.term, held.total, held.checksum)
                == (index, chunk.snapshot_term, chunk.total, chunk.checksum)
        };
        if !self.incoming_snapshot.as_ref().is_some_and(matches) {
            // Another snapshot than the one held in part: the leader sends one at a time, so
            // it gave up on that one (or a new leader has another). Start on it from its
            // beginning.
            if chunk.offset != 0 {
                answer(self, 0, out);
                return;
            }
            out.events.push(Event::SnapshotReceiveStarted {
                from: leader,
                index,
                bytes: chunk.total,
            });
            self.incoming_snapshot = Some(IncomingSnapshot {
                index,
                term: chunk.snapshot_term,
                total: chunk.total,
                checksum: chunk.checksum,
                // The whole at once (up to a bound: the size is the leader's word), so that
                // the bytes are copied once, not again at each doubling.
                data: BytesMut::with_capacity(chunk.total.min(MAX_PREALLOCATED) as usize),
                crc_so_far: crc32fast::Hasher::new(),
                membership: chunk.membership.clone(),
            });
        }
        let Some(incoming) = self.incoming_snapshot.as_mut() else {
            return;
        };
        let held = incoming.data.len() as u64;
        let fits = chunk.offset + chunk.data.len() as u64 <= incoming.total;
        let chunk_crc = (chunk.offset == held && fits).then(|| {
            let mut crc = crc32fast::Hasher::new();
            crc.update(&chunk.data);
            crc
        });
        let Some(chunk_crc) =
            chunk_crc.filter(|crc| crc.clone().finalize() == chunk.chunk_checksum)
        else {
            // Out of order, too long, or damaged: ask again from what is held.
            answer(self, held, out);
            return;
        };
        incoming.crc_so_far.combine(&chunk_crc);
        incoming.data.extend_from_slice(&chunk.data);
        // The store may write it now, so that saving the whole only syncs it.
        out.write.snapshot_parts.push(crate::storage::SnapshotPart {
            index,
            offset: chunk.offset,
            data: chunk.data.clone(),
        });
        let held = incoming.data.len() as u64;
        if held < incoming.total {
            answer(self, held, out);
            return;
        }
        let Some(incoming) = self.incoming_snapshot.take() else {
            return;
        };
        let data = incoming.data.freeze();
        if incoming.crc_so_far.finalize() != incoming.checksum {
            answer(self, 0, out); // every chunk checked out but the whole does not: start over
            return;
        }
        self.install_snapshot(
            Snapshot {
                index,
                term: incoming.term,
                data,
                membership: incoming.membership,
            },
            out,
        );
        answer(self, incoming.total, out);
    }

    /// Replaces the committed prefix of this follower's log with `snapshot` (whose index is
    /// past the commit index): keeps the entries after it when the log holds its last entry,
    /// drops the log otherwise, and hands it to the driver to restore.
    fn install_snapshot(&mut self, snapshot: Snapshot, out: &mut Output) {
        let (index, term) = (snapshot.index, snapshot.term);
        debug_assert!(index > self.commit_index);
        let commit_before = self.commit_index;
        // Keeping the log after the snapshot keeps the memberships it holds.
        let mut membership_changed = false;
        if self.log.term_at(index) == Some(term) {
            self.log.compact_through(index, term);
            self.durable_index = self.durable_index.max(index);
            self.members.rebase(index);
        } else {
            // Entries past the commit index may conflict with the leader's; those at or below
            // it are covered by the snapshot and go with the compaction.
            let first_uncommitted = self.commit_index + 1;
            if first_uncommitted <= self.log.last_index() {
                out.write.merge_log(Some(first_uncommitted), &[]);
            }
            self.log.reset_to(index, term);
            self.durable_index = index;
            let membership = snapshot.membership.clone();
            let membership = membership.unwrap_or_else(|| self.members.at(index).clone());
            membership_changed = self.members.reset(index, membership);
        }
        out.write.snapshot = Some(snapshot.clone());
        out.write.compact(index);
        self.commit_index = index;
        out.restore = Some(snapshot.clone());
        self.snapshot = Some(snapshot);
        self.release_reads_after_term_commit(out);
        if membership_changed {
            self.membership_changed(out);
        }
        self.membership_committed(commit_before, out);
    }
}

#[cfg(test)]
mod tests;
