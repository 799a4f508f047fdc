//! What a leader knows about one follower's log, and how much it may send it.

use std::collections::VecDeque;

use crate::types::LogIndex;

/// How the leader is replicating to a follower.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgressState {
    /// The follower's match point is unknown: one append at a time until one succeeds.
    Probe,
    /// The follower is in step: appends are pipelined, up to the in-flight bound.
    Replicate,
    /// The follower's next entry was compacted away: it is being sent the snapshot
    /// ([`Progress::outgoing_snapshot`]), and no appends until it is installed.
    Snapshot,
}

/// Replication progress of one follower (the shape of raft-rs's `Progress`).
#[derive(Clone, Debug)]
pub struct Progress {
    /// Highest index known to match the leader's log.
    pub match_index: LogIndex,
    /// Next index to send.
    pub next_index: LogIndex,
    /// Probe or pipelined replication.
    pub state: ProgressState,
    /// In probe state: an append is outstanding, wait for its answer or the next heartbeat.
    pub probe_sent: bool,
    /// Heard from the follower since the last check-quorum round.
    pub recently_active: bool,
    /// Heard from the follower in the check-quorum round before.
    pub active_last_round: bool,
    /// The match index advanced since the last heartbeat was sent.
    pub acked_since_heartbeat: bool,
    /// The highest commit index sent to the follower that it can apply (an append's or
    /// heartbeat's commit, capped at what the follower holds).
    pub commit_sent: LogIndex,
    /// The last committed index of an entry the follower proposed: its client waits until the
    /// follower learns of that commit.
    pub owed_commit: LogIndex,
    /// The highest commit index sent to the follower in a [`Message::Commit`], which it applies
    /// only if it holds the entry there.
    ///
    /// [`Message::Commit`]: crate::protocol::raft::Message::Commit
    pub commit_told: LogIndex,
    /// The highest heartbeat round the follower answered in this term (reads and the lease
    /// count these).
    pub round_answered: u64,
    /// The snapshot being sent, in [`ProgressState::Snapshot`].
    pub(crate) outgoing_snapshot: Option<crate::protocol::raft::snapshot::OutgoingSnapshot>,
    /// Last index of each append in flight, oldest first.
    inflight: VecDeque<LogIndex>,
    max_inflight: usize,
}

impl Progress {
    /// Progress of a follower about which nothing is known, when the leader's last index is
    /// `last_index`.
    pub fn new(last_index: LogIndex, max_inflight: usize) -> Self {
        Progress {
            match_index: 0,
            next_index: last_index + 1,
            state: ProgressState::Probe,
            probe_sent: false,
            recently_active: false,
            active_last_round: false,
            acked_since_heartbeat: false,
            commit_sent: 0,
            owed_commit: 0,
            commit_told: 0,
            round_answered: 0,
            outgoing_snapshot: None,
            inflight: VecDeque::with_capacity(max_inflight),
            max_inflight,
        }
    }

    /// Heard from the follower in this check-quorum round or the one before.
    pub fn heard_lately(&self) -> bool {
        self.recently_active || self.active_last_round
    }

    /// Whether another append may be sent now.
    pub fn can_send(&self) -> bool {
        match self.state {
            ProgressState::Probe => !self.probe_sent,
            ProgressState::Replicate => self.inflight.len() < self.max_inflight,
            ProgressState::Snapshot => false,
        }
    }

    /// Appends in flight.
    pub fn inflight_count(&self) -> usize {
        self.inflight.len()
    }

    /// Records an append carrying entries up to `last_sent_index` (equal to `next_index - 1` for an
    /// empty probe).
    pub fn on_append_sent(&mut self, last_sent_index: LogIndex) {
        match self.state {
            ProgressState::Probe => self.probe_sent = true,
            ProgressState::Replicate => {
                self.next_index = last_sent_index + 1;
                self.inflight.push_back(last_sent_index);
            }
            ProgressState::Snapshot => {}
        }
    }

    /// The follower installed the snapshot through `index`: probe from just after it.
    pub fn snapshot_installed(&mut self, index: LogIndex) {
        self.outgoing_snapshot = None;
        self.state = ProgressState::Probe;
        self.probe_sent = false;
        self.inflight.clear();
        if index > self.match_index {
            self.match_index = index;
            self.acked_since_heartbeat = true;
        }
        self.next_index = self.match_index + 1;
    }

    /// The follower acknowledged a match up to `index`. Returns true if that was news.
    pub fn on_match(&mut self, index: LogIndex) -> bool {
        while self.inflight.front().is_some_and(|&sent| sent <= index) {
            self.inflight.pop_front();
        }
        let advanced = index > self.match_index;
        if advanced {
            self.match_index = index;
            self.acked_since_heartbeat = true;
        }
        if let Some(outgoing) = &self.outgoing_snapshot {
            // A late answer to an append sent before the transfer: it says where the follower
            // was, not that it has what the snapshot covers.
            if index < outgoing.snapshot.index {
                return advanced;
            }
            self.outgoing_snapshot = None;
            self.state = ProgressState::Probe;
        }
        self.next_index = self.next_index.max(index + 1);
        if self.state == ProgressState::Probe {
            self.state = ProgressState::Replicate;
            self.probe_sent = false;
            self.inflight.clear();
        }
        advanced
    }

    /// The follower refused an append whose previous index was `rejected_prev_index`; the next try
    /// starts at `retry_from`. Returns false for a stale refusal that must be ignored.
    pub fn on_reject(&mut self, rejected_prev_index: LogIndex, retry_from: LogIndex) -> bool {
        if rejected_prev_index <= self.match_index || self.state == ProgressState::Snapshot {
            // An old append answered late: the log matches there, we know better (or the
            // follower is being sent a snapshot).
            return false;
        }
        if self.state == ProgressState::Probe && rejected_prev_index + 1 != self.next_index {
            return false; // not the probe we are waiting for
        }
        self.next_index = retry_from.clamp(self.match_index + 1, rejected_prev_index.max(1));
        self.become_probe();
        true
    }

    /// Falls back to probing (after a rejection, or when the follower seems lost).
    pub fn become_probe(&mut self) {
        self.state = ProgressState::Probe;
        self.probe_sent = false;
        self.inflight.clear();
        self.next_index = self.next_index.max(self.match_index + 1);
    }

    /// A heartbeat answer arrived while the follower lags `leader_last_index`. A probing leader
    /// may try again; a pipeline that saw no acknowledgement for a whole heartbeat interval has
    /// probably lost an append, so replication restarts from the match point.
    pub fn on_heartbeat_response(&mut self, leader_last_index: LogIndex) {
        if self.state == ProgressState::Snapshot {
            return; // the transfer resumes on its own (see `snapshot.rs`)
        }
        self.probe_sent = false;
        let stalled = self.state == ProgressState::Replicate && !self.acked_since_heartbeat;
        if stalled && self.match_index < leader_last_index {
            self.become_probe();
            self.next_index = self.match_index + 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipelining_is_bounded_and_acks_free_the_window() {
        let mut p = Progress::new(10, 2);
        assert!(p.can_send());
        p.on_append_sent(10);
        assert!(!p.can_send(), "probe allows one outstanding append");
        assert!(p.on_match(10));
        assert_eq!(p.state, ProgressState::Replicate);
        p.on_append_sent(12);
        p.on_append_sent(14);
        assert!(!p.can_send());
        assert_eq!(p.next_index, 15);
        p.on_match(12);
        assert!(p.can_send());
        assert_eq!(p.inflight_count(), 1);
    }

    #[test]
    fn rejection_backs_off_and_stale_rejections_are_ignored() {
        let mut p = Progress::new(20, 4);
        p.on_match(5);
        p.on_append_sent(10);
        p.on_append_sent(20);
        assert!(p.on_reject(10, 7));
        assert_eq!(p.next_index, 7);
        assert_eq!(p.state, ProgressState::Probe);
        assert!(!p.on_reject(3, 2), "below the match index");
        assert!(
            !p.on_reject(10, 8),
            "answers a probe we are not waiting for"
        );
        assert_eq!(p.next_index, 7);
        assert!(p.on_reject(6, 1));
        assert_eq!(p.next_index, 6, "never below match + 1");
    }

    #[test]
    fn a_stalled_pipeline_restarts_from_the_match_point() {
        let mut p = Progress::new(0, 8);
        p.on_match(3);
        p.on_append_sent(6);
        p.on_append_sent(9);
        p.acked_since_heartbeat = true;
        p.on_heartbeat_response(9);
        assert_eq!(
            (p.state, p.next_index),
            (ProgressState::Replicate, 10),
            "acks are flowing"
        );
        p.acked_since_heartbeat = false;
        p.on_heartbeat_response(9);
        assert_eq!((p.state, p.next_index), (ProgressState::Probe, 4));
    }
}
