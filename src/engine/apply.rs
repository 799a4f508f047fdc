//! The apply stage: what happens to committed entries and to the clients waiting on them. It is
//! sans-IO like the cores (time is a value passed in, answers are returned as data), so the
//! driver thread and the simulator run the very same code, and a bug in answering, dedup or
//! deadlines shows up in simulation.
//!
//! It holds the requests made on this node (keyed by the request ids it hands out), the filter
//! that applies each proposal at most once ([`AppliedProposals`]), and the state machine.
//! Entries are applied in index order; a request is answered only after its entry was applied,
//! with what the state machine answered; a refused request is answered with the core's typed
//! reason; a request whose deadline passed is answered "outcome unknown".
//!
//! Reads served outside the log ([`ApplyStage::submit_read`]) wait here too: once the core
//! gives a read its index ([`ReadState`]), it is served as soon as everything through that
//! index is applied, by applying the read-only command to the state machine on this node alone.

use std::any::Any;
use std::collections::{BTreeSet, HashMap};

use bytes::Bytes;

use crate::engine::pending::PendingTable;
use crate::protocol::raft::AppliedProposals;
use crate::protocol::{ReadState, RejectReason, Rejection};
use crate::state_machine::{ErasedStateMachine, SnapshotWriter};
use crate::storage::Snapshot;
use crate::types::{Entry, LogIndex, NodeId, Payload, Term};

/// The first bytes of every snapshot the apply stage writes, then a format version.
const SNAPSHOT_MAGIC: &[u8; 4] = b"SSNP";
const SNAPSHOT_VERSION: u8 = 1;

/// The applied state through one index, captured on the driver thread and written out
/// elsewhere ([`SnapshotCapture::write`]): the table of applied proposals (which must travel
/// with the state, or a replica restored from it would apply a duplicate again) and the state
/// machine's [`SnapshotWriter`].
pub(crate) struct SnapshotCapture {
    pub(crate) index: LogIndex,
    pub(crate) term: Term,
    applied_proposals: Vec<u8>,
    state: Option<SnapshotWriter>,
}

impl SnapshotCapture {
    /// A capture of `state` alone (no applied proposals), for the snapshot taker's tests.
    #[cfg(test)]
    pub(crate) fn of_state(index: LogIndex, term: Term, state: SnapshotWriter) -> Self {
        SnapshotCapture {
            index,
            term,
            applied_proposals: Vec::new(),
            state: Some(state),
        }
    }

    /// Encodes the snapshot: magic, version, the table's length and bytes, a flag saying
    /// whether a state machine's state follows, then that state.
    pub(crate) fn write(self) -> std::io::Result<Snapshot> {
        let mut data = Vec::with_capacity(self.applied_proposals.len() + 64);
        data.extend_from_slice(SNAPSHOT_MAGIC);
        data.push(SNAPSHOT_VERSION);
        data.extend_from_slice(&(self.applied_proposals.len() as u64).to_le_bytes());
        data.extend_from_slice(&self.applied_proposals);
        data.push(u8::from(self.state.is_some()));
        if let Some(write_state) = self.state {
            write_state(&mut data)?;
        }
        Ok(Snapshot {
            index: self.index,
            term: self.term,
            data: data.into(),
            // The core adds its membership when it is told of the snapshot.
            membership: None,
        })
    }
}

/// What the state machine answered for one entry: its response, or why the entry did not
/// decode as its command; `None` when no state machine is set.
pub(crate) type Response = Option<Result<Box<dyn Any + Send>, String>>;

/// A request whose entry was applied, or a read that was served.
pub(crate) struct AppliedEntry {
    /// The entry's index; a read's read index.
    pub(crate) index: LogIndex,
    /// The entry's term; 0 for a read.
    pub(crate) term: Term,
    pub(crate) response: Response,
    /// A read served outside the log (not a commit).
    pub(crate) read: bool,
}

/// Why a request got no commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Unanswered {
    /// Never appended; will never commit.
    Rejected(RejectReason),
    /// Unknown outcome: the deadline passed first.
    TimedOut,
    /// The engine stopped (or failed) before the outcome was known.
    Stopped(String),
}

/// One answer for the caller of [`ApplyStage::submit`]: where it goes (`reply`), when the request
/// was made, and the outcome.
pub(crate) struct Answer<R, T> {
    pub(crate) reply: R,
    pub(crate) submitted: T,
    pub(crate) outcome: Result<AppliedEntry, Unanswered>,
}

struct Waiting<R, T> {
    reply: R,
    submitted: T,
    deadline: T,
    /// A read (its command waits in [`ApplyStage::read_commands`], so that the many proposals
    /// do not carry room for one).
    read: bool,
}

impl<R, T> Waiting<R, T> {
    /// This request's answer.
    fn answer(self, outcome: Result<AppliedEntry, Unanswered>) -> Answer<R, T> {
        Answer {
            reply: self.reply,
            submitted: self.submitted,
            outcome,
        }
    }
}

/// Deliberate apply-stage bugs, for proving that the simulator catches them (feature `sim`).
#[cfg(any(test, feature = "sim"))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyBugs {
    /// Apply every copy of a proposal, not only the first (a forwarded proposal duplicated by
    /// the network then runs twice).
    pub apply_duplicates: bool,
}

/// See the [module documentation](self). `R` is what an answer is delivered to (a reply channel
/// in the engine, a client number in the simulator); `T` is a moment (an `Instant` in the
/// engine, simulated microseconds in the simulator).
pub(crate) struct ApplyStage<R, T> {
    me: NodeId,
    pending: PendingTable<Waiting<R, T>>,
    applied_proposals: AppliedProposals,
    state_machine: Option<Box<dyn ErasedStateMachine>>,
    applied_index: LogIndex,
    /// The term of the entry at `applied_index`.
    applied_term: Term,
    duplicates_skipped: u64,
    /// Reads whose index is known and not yet applied: `(index, request id)`.
    reads_ready: BTreeSet<(LogIndex, u64)>,
    /// The commands of the reads waiting, by request id.
    read_commands: HashMap<u64, Bytes>,
    #[cfg(any(test, feature = "sim"))]
    pub(crate) bugs: ApplyBugs,
}

impl<R, T: Copy + Ord> ApplyStage<R, T> {
    /// A stage for node `me` whose request ids start at `first_request_id`. Start the ids at a
    /// random base in the engine, so that entries proposed before a restart never match a
    /// request made after it.
    pub(crate) fn new(
        me: NodeId,
        first_request_id: u64,
        state_machine: Option<Box<dyn ErasedStateMachine>>,
    ) -> Self {
        ApplyStage {
            me,
            pending: PendingTable::new(first_request_id),
            applied_proposals: AppliedProposals::default(),
            state_machine,
            applied_index: 0,
            applied_term: 0,
            duplicates_skipped: 0,
            reads_ready: BTreeSet::new(),
            read_commands: HashMap::new(),
            #[cfg(any(test, feature = "sim"))]
            bugs: ApplyBugs::default(),
        }
    }

    /// Records a request made at `submitted` that must be answered by `deadline`; returns the
    /// request id to propose it under. Deadlines must not decrease from one call to the next
    /// (one timeout counted from a clock that does not go back), which is what lets
    /// [`ApplyStage::expire`] look only at the oldest requests.
    pub(crate) fn submit(&mut self, reply: R, submitted: T, deadline: T) -> u64 {
        self.pending.push(Waiting {
            reply,
            submitted,
            deadline,
            read: false,
        })
    }

    /// Records a read of the read-only `command`, as [`ApplyStage::submit`] records a request;
    /// returns the request id to give the core in [`Input::Read`](crate::protocol::Input::Read).
    pub(crate) fn submit_read(
        &mut self,
        reply: R,
        submitted: T,
        deadline: T,
        command: Bytes,
    ) -> u64 {
        let request_id = self.pending.push(Waiting {
            reply,
            submitted,
            deadline,
            read: true,
        });
        self.read_commands.insert(request_id, command);
        request_id
    }

    /// The core gave reads their index: each is served once everything through it is applied
    /// (at once when it already is).
    pub(crate) fn reads_ready(
        &mut self,
        reads: impl IntoIterator<Item = ReadState>,
        answers: &mut Vec<Answer<R, T>>,
    ) {
        for ReadState { request_id, index } in reads {
            if index <= self.applied_index {
                self.serve_read(request_id, index, answers);
            } else {
                self.reads_ready.insert((index, request_id));
            }
        }
    }

    /// Serves the ready reads whose index is applied now.
    fn serve_applied_reads(&mut self, answers: &mut Vec<Answer<R, T>>) {
        while let Some(&(index, request_id)) = self.reads_ready.first()
            && index <= self.applied_index
        {
            self.reads_ready.pop_first();
            self.serve_read(request_id, index, answers);
        }
    }

    /// Answers read `request_id` with what its command reads from the state machine now. A
    /// read that timed out meanwhile is gone and is skipped.
    fn serve_read(&mut self, request_id: u64, index: LogIndex, answers: &mut Vec<Answer<R, T>>) {
        let Some(command) = self.read_commands.remove(&request_id) else {
            return; // answered already (timed out), or not a read
        };
        let Some(waiting) = self.pending.remove(request_id) else {
            return;
        };
        debug_assert!(waiting.read, "a read index for proposal {request_id}");
        let response = self
            .state_machine
            .as_mut()
            .map(|sm| sm.apply_bytes(&command));
        answers.push(waiting.answer(Ok(AppliedEntry {
            index,
            term: 0,
            response,
            read: true,
        })));
    }

    /// Applies newly committed entries, in index order, and answers this node's requests among
    /// them (in `answers`, after every entry of the batch was applied).
    pub(crate) fn apply(
        &mut self,
        committed: impl IntoIterator<Item = Entry>,
        answers: &mut Vec<Answer<R, T>>,
    ) {
        for entry in committed {
            if entry.index <= self.applied_index {
                continue; // covered by a snapshot restored in the same round
            }
            debug_assert!(
                self.applied_index == 0 || entry.index == self.applied_index + 1,
                "entries applied out of order: {} after {}",
                entry.index,
                self.applied_index
            );
            self.applied_index = entry.index;
            self.applied_term = entry.term;
            let Payload::Command { tag, data } = entry.payload else {
                continue;
            };
            if !self.applied_proposals.first_application(tag) && !self.applies_duplicates() {
                self.duplicates_skipped += 1;
                continue; // a duplicate of a proposal applied (and answered) before
            }
            let response = self.state_machine.as_mut().map(|sm| sm.apply_bytes(&data));
            if tag.proposer != self.me {
                continue;
            }
            if let Some(waiting) = self.pending.remove(tag.request_id) {
                answers.push(waiting.answer(Ok(AppliedEntry {
                    index: entry.index,
                    term: entry.term,
                    response,
                    read: false,
                })));
            }
        }
        if !self.reads_ready.is_empty() {
            self.serve_applied_reads(answers);
        }
    }

    /// Captures the applied state for a snapshot, or `None` when nothing is applied yet or the
    /// state machine takes no snapshots ([`StateMachine::snapshot`](crate::StateMachine)).
    pub(crate) fn capture_snapshot(&self) -> Option<SnapshotCapture> {
        if self.applied_index == 0 {
            return None;
        }
        let state = match &self.state_machine {
            Some(machine) => Some(machine.snapshot_writer()?),
            None => None,
        };
        Some(SnapshotCapture {
            index: self.applied_index,
            term: self.applied_term,
            applied_proposals: self.applied_proposals.encode(),
            state,
        })
    }

    /// Replaces the applied state with `snapshot` (a leader's, or this node's own at start-up):
    /// the state machine, the table of applied proposals and the applied index. Reads waiting
    /// for an index it reaches are served. Requests of this node whose entries it covers are
    /// left to their deadlines: their outcome is not known here.
    pub(crate) fn restore(
        &mut self,
        snapshot: &Snapshot,
        answers: &mut Vec<Answer<R, T>>,
    ) -> Result<(), String> {
        let data = &snapshot.data[..];
        let malformed = |what: &str| format!("snapshot through index {}: {what}", snapshot.index);
        let rest = data
            .strip_prefix(SNAPSHOT_MAGIC.as_slice())
            .ok_or_else(|| malformed("not a snapshot of this engine (bad magic)"))?;
        let (&version, rest) = rest.split_first().ok_or_else(|| malformed("cut short"))?;
        if version != SNAPSHOT_VERSION {
            return Err(malformed(&format!("unknown format version {version}")));
        }
        let (length, rest) = rest
            .split_first_chunk::<8>()
            .ok_or_else(|| malformed("cut short"))?;
        let length = usize::try_from(u64::from_le_bytes(*length))
            .ok()
            .filter(|&length| length < rest.len())
            .ok_or_else(|| malformed("the table of applied proposals overruns the snapshot"))?;
        let (table, rest) = rest.split_at(length);
        let applied_proposals = AppliedProposals::decode(table).map_err(|e| malformed(&e))?;
        let (&has_state, state) = rest.split_first().ok_or_else(|| malformed("cut short"))?;
        match (&mut self.state_machine, has_state) {
            (Some(machine), 1) => {
                // A slice of the snapshot's buffer, not a copy (see `restore_from_bytes`).
                let state = snapshot.data.slice_ref(state);
                machine.restore_bytes(state).map_err(|e| malformed(&e))?
            }
            (Some(_), _) => return Err(malformed("holds no state machine state")),
            (None, 0 | 1) => {}
            (None, _) => return Err(malformed("bad state flag")),
        }
        self.applied_proposals = applied_proposals;
        self.applied_index = snapshot.index;
        self.applied_term = snapshot.term;
        self.serve_applied_reads(answers);
        Ok(())
    }

    /// Answers refused requests with the core's reason.
    pub(crate) fn reject(
        &mut self,
        rejected: impl IntoIterator<Item = Rejection>,
        answers: &mut Vec<Answer<R, T>>,
    ) {
        for rejection in rejected {
            if let Some(waiting) = self.pending.remove(rejection.request_id) {
                if waiting.read {
                    self.read_commands.remove(&rejection.request_id);
                }
                answers.push(waiting.answer(Err(Unanswered::Rejected(rejection.reason))));
            }
        }
    }

    /// Answers "outcome unknown" to every request whose deadline is at or before `now`.
    pub(crate) fn expire(&mut self, now: T, answers: &mut Vec<Answer<R, T>>) {
        let read_commands = &mut self.read_commands;
        self.pending.expire_front(
            |waiting| waiting.deadline <= now,
            |request_id, waiting| {
                if waiting.read {
                    read_commands.remove(&request_id);
                }
                answers.push(waiting.answer(Err(Unanswered::TimedOut)))
            },
        );
    }

    /// Answers every waiting request with [`Unanswered::Stopped`].
    pub(crate) fn fail_all(&mut self, reason: &str, answers: &mut Vec<Answer<R, T>>) {
        self.reads_ready.clear();
        self.read_commands.clear();
        for waiting in self.pending.drain() {
            answers.push(waiting.answer(Err(Unanswered::Stopped(reason.to_string()))));
        }
    }

    /// The index of the last entry applied (0 before any).
    pub(crate) fn applied_index(&self) -> LogIndex {
        self.applied_index
    }

    /// Copies of already-applied proposals skipped so far.
    #[cfg(any(test, feature = "sim"))]
    pub(crate) fn duplicates_skipped(&self) -> u64 {
        self.duplicates_skipped
    }

    fn applies_duplicates(&self) -> bool {
        #[cfg(any(test, feature = "sim"))]
        return self.bugs.apply_duplicates;
        #[cfg(not(any(test, feature = "sim")))]
        false
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::state_machine::StateMachine;
    use crate::types::ProposalTag;

    /// Sums the numbers it is given and answers the running total.
    struct Sum(u64);

    impl StateMachine for Sum {
        type Command = u64;
        type Response = u64;
        fn apply(&mut self, command: u64) -> u64 {
            self.0 += command;
            self.0
        }
    }

    fn command(proposer: u64, request_id: u64, index: LogIndex, value: u64) -> Entry {
        let data = crate::state_machine::encode_command(&value).unwrap();
        Entry {
            index,
            term: 1,
            payload: Payload::Command {
                tag: ProposalTag {
                    proposer: NodeId(proposer),
                    request_id,
                },
                data: Bytes::from(data),
            },
        }
    }

    fn total(answer: &Answer<&'static str, u64>) -> u64 {
        let applied = answer.outcome.as_ref().ok().unwrap();
        let response = applied.response.as_ref().unwrap().as_ref().unwrap();
        *response.downcast_ref::<u64>().unwrap()
    }

    #[test]
    fn answers_after_applying_once_and_only_its_own_requests() {
        let mut stage = ApplyStage::new(NodeId(1), 100, Some(Box::new(Sum(0))));
        let a = stage.submit("a", 0, 50);
        let b = stage.submit("b", 1, 51);
        assert_eq!((a, b), (100, 101));
        let mut answers = Vec::new();
        stage.apply(
            [
                command(1, a, 1, 5),
                command(2, a, 2, 7), // another node's request with the same id
                command(1, a, 3, 5), // a duplicate: not applied again, not answered again
                command(1, b, 4, 1),
            ],
            &mut answers,
        );
        let replies: Vec<_> = answers.iter().map(|a| (a.reply, total(a))).collect();
        assert_eq!(replies, vec![("a", 5), ("b", 13)]);
        assert_eq!(stage.applied_index(), 4);
        assert_eq!(stage.duplicates_skipped(), 1);
    }

    #[test]
    fn a_read_is_served_once_its_index_is_applied_and_never_counts_as_a_commit() {
        let mut stage = ApplyStage::new(NodeId(1), 0, Some(Box::new(Sum(0))));
        let read_command = Bytes::from(crate::state_machine::encode_command(&0u64).unwrap());
        let early = stage.submit_read("early", 0, 50, read_command.clone());
        let late = stage.submit_read("late", 0, 50, read_command);
        let mut answers = Vec::new();
        stage.apply([command(2, 9, 1, 5)], &mut answers);
        stage.reads_ready(
            [
                ReadState {
                    request_id: late,
                    index: 2,
                },
                ReadState {
                    request_id: early,
                    index: 1,
                },
            ],
            &mut answers,
        );
        let served: Vec<_> = answers.iter().map(|a| (a.reply, total(a))).collect();
        assert_eq!(served, vec![("early", 5)], "index 1 is applied, 2 is not");
        stage.apply([command(2, 10, 2, 7)], &mut answers);
        let served: Vec<_> = answers.iter().map(|a| (a.reply, total(a))).collect();
        assert_eq!(served, vec![("early", 5), ("late", 12)], "sees entry 2");
        assert!(answers.iter().all(|a| a.outcome.as_ref().unwrap().read));
        assert_eq!(stage.applied_index(), 2, "a read applies no entry");
        // A read that times out, and one refused, leave nothing behind.
        let command = Bytes::from(crate::state_machine::encode_command(&0u64).unwrap());
        stage.submit_read("expires", 1, 60, command.clone());
        let refused = stage.submit_read("refused", 1, 70, command);
        stage.expire(65, &mut answers);
        let reason = RejectReason::NoLeader;
        stage.reject(
            [Rejection {
                request_id: refused,
                reason,
            }],
            &mut answers,
        );
        assert!(stage.read_commands.is_empty());
        assert_eq!(answers.len(), 4);
    }

    #[test]
    fn refusals_and_deadlines_answer_what_they_say() {
        let mut stage: ApplyStage<&str, u64> = ApplyStage::new(NodeId(1), 0, None);
        let refused = stage.submit("refused", 0, 10);
        stage.submit("late", 1, 11);
        stage.submit("later", 2, 30);
        let mut answers = Vec::new();
        let reason = RejectReason::NotLeader {
            leader: Some(NodeId(2)),
        };
        stage.reject(
            [Rejection {
                request_id: refused,
                reason: reason.clone(),
            }],
            &mut answers,
        );
        stage.expire(20, &mut answers);
        stage.fail_all("stopping", &mut answers);
        let outcomes: Vec<_> = answers
            .iter()
            .map(|a| (a.reply, a.outcome.as_ref().err().cloned()))
            .collect();
        assert_eq!(
            outcomes,
            vec![
                ("refused", Some(Unanswered::Rejected(reason))),
                ("late", Some(Unanswered::TimedOut)),
                ("later", Some(Unanswered::Stopped("stopping".into()))),
            ]
        );
    }
}
