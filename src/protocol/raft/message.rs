//! Messages Raft nodes exchange. Every message carries the sender's term so that a stale node learns
//! of a newer term from whatever it receives first.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::types::{Entry, LogIndex, Term};

/// Hint a follower returns with a rejected append, so the leader can skip a whole conflicting term
/// in one round trip instead of probing one index at a time (Raft §5.3, "fast back-off").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConflictHint {
    /// The term of the follower's entry at the rejected `prev_log_index`, if it had one.
    pub conflict_term: Option<Term>,
    /// The first index the leader should try next: the start of `conflict_term` in the follower's
    /// log, or one past the follower's last entry when the follower's log was too short.
    pub first_index: LogIndex,
}

/// The Raft protocol messages.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// "Would you vote for me at `term`?" Sent before a real election, without bumping the
    /// sender's term, so that a node cut off from the cluster cannot disrupt it on rejoining.
    PreVote {
        /// The term the candidate would campaign in (its current term + 1).
        term: Term,
        /// Index of the candidate's last log entry.
        last_log_index: LogIndex,
        /// Term of the candidate's last log entry.
        last_log_term: Term,
    },
    /// Answer to [`Message::PreVote`].
    PreVoteResponse {
        /// The term of the pre-vote being answered (when granted) or the responder's term.
        term: Term,
        /// Whether the responder would vote for the candidate.
        granted: bool,
    },
    /// A real vote request (Raft §5.2).
    RequestVote {
        /// The candidate's term.
        term: Term,
        /// Index of the candidate's last log entry.
        last_log_index: LogIndex,
        /// Term of the candidate's last log entry.
        last_log_term: Term,
        /// Set when the election was asked for by the current leader ([`Message::TimeoutNow`]): voters
        /// then grant even though they heard from a live leader recently.
        leadership_transfer: bool,
    },
    /// Answer to [`Message::RequestVote`].
    RequestVoteResponse {
        /// The responder's term.
        term: Term,
        /// Whether the vote was granted.
        granted: bool,
    },
    /// Log replication (Raft §5.3). Carries no entries only when probing.
    AppendEntries {
        /// The leader's term.
        term: Term,
        /// Index of the entry just before `entries`.
        prev_log_index: LogIndex,
        /// Term of the entry at `prev_log_index`.
        prev_log_term: Term,
        /// Entries to store, in index order starting at `prev_log_index + 1`.
        entries: Vec<Entry>,
        /// The leader's commit index.
        leader_commit: LogIndex,
    },
    /// Answer to [`Message::AppendEntries`].
    AppendEntriesResponse {
        /// The responder's term.
        term: Term,
        /// On success, the index up to which the follower's log now matches the leader's.
        /// On rejection, the `prev_log_index` that did not match.
        index: LogIndex,
        /// `None` on success, the back-off hint on rejection.
        reject: Option<ConflictHint>,
    },
    /// Leader liveness and commit propagation, sent every heartbeat interval, and at once when a
    /// read needs the leader's leadership confirmed (see `read_index.rs`).
    Heartbeat {
        /// The leader's term.
        term: Term,
        /// The leader's commit index, capped at what the follower is known to hold.
        commit: LogIndex,
        /// The number of this heartbeat round in the leader's term: a quorum answering round
        /// `n` proves the sender still led when it sent round `n`.
        round: u64,
    },
    /// Answer to [`Message::Heartbeat`]; lets the leader count the follower as live (check-quorum),
    /// confirm its leadership for reads, and resume replication to a follower it was probing.
    HeartbeatResponse {
        /// The responder's term.
        term: Term,
        /// The round of the heartbeat answered.
        round: u64,
    },
    /// Sent by a leader handing over leadership: the recipient starts an election at once.
    TimeoutNow {
        /// The leader's term.
        term: Term,
    },
    /// Client proposals a follower received, passed on to the leader it knows.
    ForwardProposals {
        /// The follower's term, so a leader of a different term can drop stale forwards.
        term: Term,
        /// `(request_id, data)` pairs; the proposer is the envelope's sender.
        proposals: Vec<(u64, Bytes)>,
    },
    /// The leader's commit index, sent as soon as it covers a proposal the recipient forwarded
    /// (whose client waits on that follower). Unlike a heartbeat's it is not capped at what the
    /// leader knows the follower holds, which would make it wait for the follower's own
    /// acknowledgement: the follower commits only if its entry at `commit` has `commit_term`
    /// (same index and term, same log up to there: Raft §5.3). Nothing answers it. Last of the
    /// variants, so that the others keep their encoding.
    Commit {
        /// The leader's term.
        term: Term,
        /// The leader's commit index.
        commit: LogIndex,
        /// The term of the leader's entry at `commit`.
        commit_term: Term,
    },
    /// Reads a follower's clients made there, passed on to the leader it knows for their read
    /// index. Reads are idempotent, so the follower sends them again freely (to a new leader, or
    /// when no answer came).
    ReadIndex {
        /// The follower's term.
        term: Term,
        /// The follower's request ids of the reads.
        read_ids: Vec<u64>,
    },
    /// The leader's answer to [`Message::ReadIndex`]: the reads `read_ids` may be served once
    /// the follower has applied through `index` (the leader's commit index when the reads
    /// arrived, confirmed by a quorum's heartbeat answers since).
    ReadIndexResponse {
        /// The leader's term.
        term: Term,
        /// The follower's request ids, as it sent them.
        read_ids: Vec<u64>,
        /// The read index.
        index: LogIndex,
        /// The term of the leader's entry at `index`: a follower whose entry there has this
        /// term holds the leader's log up to it (Raft §5.3) and commits through it at once, as
        /// on [`Message::Commit`], instead of waiting for the next heartbeat to learn it.
        index_term: Term,
    },
    /// One chunk of the leader's snapshot, for a follower whose next entry the leader's log no
    /// longer holds (see `snapshot.rs`).
    InstallSnapshot {
        /// The leader's term.
        term: Term,
        /// The last entry the snapshot covers.
        index: LogIndex,
        /// That entry's term.
        snapshot_term: Term,
        /// The snapshot's size in bytes.
        total: u64,
        /// CRC-32 of the whole snapshot.
        checksum: u32,
        /// Where this chunk starts in the snapshot.
        offset: u64,
        /// CRC-32 of `data`.
        chunk_checksum: u32,
        /// The chunk's bytes.
        data: Bytes,
        /// The membership in force at `index` (the snapshot's; see [`crate::membership`]).
        /// Boxed, as the large fields of the other variants: every message in the driver's
        /// input queue is as large as the largest variant.
        membership: Option<Box<crate::membership::Membership>>,
    },
    /// Answer to [`Message::InstallSnapshot`]: how many bytes of the snapshot ending at `index`
    /// the follower holds in order (`total` once installed: then it is durable).
    InstallSnapshotResponse {
        /// The follower's term.
        term: Term,
        /// The snapshot's last index, as sent.
        index: LogIndex,
        /// Bytes held from the start.
        received: u64,
    },
    /// A membership change asked of a follower, passed on to the leader it knows.
    ForwardMembership {
        /// The follower's term.
        term: Term,
        /// The follower's number for the request, sent back in the answer.
        tag: u64,
        /// The change.
        change: crate::membership::MembershipChange,
    },
    /// The leader's answer to [`Message::ForwardMembership`]: the index of the membership entry
    /// whose commit completes the change (the joint one's for a change of voters, which the
    /// final one follows), or why it was refused.
    MembershipAnswer {
        /// The leader's term.
        term: Term,
        /// The follower's number for the request.
        tag: u64,
        /// The entry's index, or the refusal (boxed: see `InstallSnapshot::membership`).
        result: Result<LogIndex, Box<crate::membership::MembershipError>>,
    },
}

impl Message {
    /// The term the message carries.
    pub fn term(&self) -> Term {
        match self {
            Message::PreVote { term, .. }
            | Message::PreVoteResponse { term, .. }
            | Message::RequestVote { term, .. }
            | Message::RequestVoteResponse { term, .. }
            | Message::AppendEntries { term, .. }
            | Message::AppendEntriesResponse { term, .. }
            | Message::Heartbeat { term, .. }
            | Message::Commit { term, .. }
            | Message::ReadIndex { term, .. }
            | Message::ReadIndexResponse { term, .. }
            | Message::HeartbeatResponse { term, .. }
            | Message::TimeoutNow { term }
            | Message::InstallSnapshot { term, .. }
            | Message::InstallSnapshotResponse { term, .. }
            | Message::ForwardMembership { term, .. }
            | Message::MembershipAnswer { term, .. }
            | Message::ForwardProposals { term, .. } => *term,
        }
    }

    /// Payload bytes, for size limits and accounting.
    pub fn size_bytes(&self) -> usize {
        match self {
            Message::AppendEntries { entries, .. } => {
                entries
                    .iter()
                    .map(|e| e.payload.size_bytes() + 16)
                    .sum::<usize>()
                    + 32
            }
            Message::ForwardProposals { proposals, .. } => {
                proposals.iter().map(|(_, d)| d.len() + 8).sum::<usize>() + 16
            }
            Message::ReadIndex { read_ids, .. } | Message::ReadIndexResponse { read_ids, .. } => {
                read_ids.len() * 8 + 24
            }
            Message::InstallSnapshot { data, .. } => data.len() + 64,
            _ => 32,
        }
    }
}

impl Message {
    /// True for the messages only a leader sends: whoever sends one claims to lead its term.
    pub fn is_from_leader(&self) -> bool {
        matches!(
            self,
            Message::AppendEntries { .. }
                | Message::Heartbeat { .. }
                | Message::Commit { .. }
                | Message::InstallSnapshot { .. }
                | Message::TimeoutNow { .. }
        )
    }

    /// True for a candidate's requests for a (pre-)vote, which a voter answers whether or not
    /// the sender is in the membership it knows (see the term rules in `election.rs`).
    pub fn asks_for_vote(&self) -> bool {
        matches!(self, Message::PreVote { .. } | Message::RequestVote { .. })
    }

    /// True for messages that promise nothing about the sender's durable state, so they may
    /// leave before the write of the same output is durable: a leader's appends, heartbeats,
    /// commits, read indexes and hand-over, a follower's forwarded proposals and reads, and a
    /// pre-vote request (which changes no state), snapshot chunks. Votes and acknowledgements
    /// (a snapshot's included) wait for the write.
    pub fn may_precede_write(&self) -> bool {
        matches!(
            self,
            Message::AppendEntries { .. }
                | Message::Heartbeat { .. }
                | Message::Commit { .. }
                | Message::TimeoutNow { .. }
                | Message::ForwardProposals { .. }
                | Message::ReadIndex { .. }
                | Message::ReadIndexResponse { .. }
                | Message::InstallSnapshot { .. }
                | Message::PreVote { .. }
                | Message::ForwardMembership { .. }
                | Message::MembershipAnswer { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every message in the driver's input queue takes the room of the largest variant, and is
    /// copied in and out of it: a rare message must box what is large (a membership inline in
    /// `InstallSnapshot` and a refusal in `MembershipAnswer` doubled it, and showed as copies
    /// in the in-process bench's profile).
    #[test]
    fn a_message_is_no_larger_than_a_snapshot_chunk_needs() {
        assert!(
            std::mem::size_of::<Message>() <= 104,
            "{} bytes",
            std::mem::size_of::<Message>()
        );
    }
}
