//! The sans-IO protocol cores: messages and ticks in, actions out. Nothing in here touches a
//! clock, a socket, a disk or a global random number generator.
//!
//! # The seam every core plugs into
//! A core implements [`Protocol`]: the driver thread (and the simulator, and unit tests) feeds it
//! one [`Input`] at a time and carries out the [`Output`] it accumulates. What varies between
//! protocols is the message type and the control requests ([`Protocol::Message`],
//! [`Protocol::Control`]); what a driver does with an output does not, so the output, the
//! refusals and the events are shared types, and so is the durable write ([`LogWrite`]).
//!
//! Why one durable-write type rather than one per protocol: every core keeps a totally ordered
//! log of commands plus a small hard state, and the crate promises one log store for all of them
//! (`fjall` on disk, memory in tests). Durable state that is neither (a certificate, a checkpoint
//! proof, a view-change message) goes in the core's records, a small ordered key-value map
//! written through the same [`LogWrite`] ([`RecordWrite`](crate::storage::RecordWrite)). A core
//! that needs yet another kind of durable state extends [`LogWrite`] and the store together, so
//! that every store keeps honouring every core.
//!
//! # The driver's contract
//! After one or more calls to [`Protocol::step`] that wrote into the same [`Output`]:
//! 1. [`Output::messages`] may be sent at once, before the write is durable (a leader's appends
//!    go out while its own fsync runs);
//! 2. persist [`Output::write`] and make it durable;
//! 3. then send [`Output::messages_after_write`] (votes and acknowledgements: a promise that
//!    must survive a crash);
//! 4. then, if [`Output::restore`] holds a snapshot (a leader sent it), replace the state
//!    machine's state with it and skip the committed entries it covers; apply
//!    [`Output::committed`], in order, and answer [`Output::rejected`]. Committed
//!    entries that an earlier write already made durable here may be applied before step 2:
//!    they are on a quorum's disks and on this node's, and under load the round that learns a
//!    commit usually also appends newer entries, whose fsync the answers need not wait for;
//!    serve each read of [`Output::reads`] once everything through its index is applied;
//! 5. then tell the core what is durable ([`Durability::tell`]): with
//!    [`Input::HardStateDurable`] the hard state the write carried, with [`Input::Durable`] the
//!    last entry it appended; and carry out whatever those steps output the same way.
//!
//! The core never counts its own entries toward a quorum, nor its own vote toward an election,
//! before step 5 told it they are on disk, so a driver that persists asynchronously stays safe.
//!
//! # Snapshots
//! A core that compacts its log ([`Protocol::COMPACTS_LOG`]) is told of each snapshot the
//! driver took of its applied state with [`Input::SnapshotTaken`]; it then asks the store (in
//! [`Output::write`]) to keep the snapshot and to drop the log entries the *previous* snapshot
//! covered, so that the log holds about two snapshot intervals and a follower a little behind
//! still catches up from the log. A follower too far behind receives the snapshot from the
//! leader in chunks, and its core hands it to the driver in [`Output::restore`].

pub mod gpu_raft;
pub mod pbft;
pub mod raft;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

pub use crate::storage::LogWrite;
use crate::storage::{HardState, RecoveredState, Snapshot};
use crate::types::{Entry, LogIndex, NodeId, ProposalTag, Term};

/// A message with its sender and receiver.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope<M> {
    /// The sender.
    pub from: NodeId,
    /// The receiver.
    pub to: NodeId,
    /// The payload.
    pub message: M,
}

/// One thing that happens to a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input<M, C> {
    /// One unit of logical time passed. Timeouts are counted in ticks; the driver decides how
    /// long a tick is.
    Tick,
    /// A message from a peer.
    Message(Envelope<M>),
    /// A client's proposal, identified by a request id unique on this node. When the entry
    /// carrying it is committed it shows up in [`Output::committed`] tagged with this node and
    /// this id; if it cannot be accepted, a [`Rejection`] with this id is emitted instead.
    Propose {
        /// Unique on this node; chosen by the driver.
        request_id: u64,
        /// The command bytes.
        data: Bytes,
    },
    /// A protocol-specific request from the operator (e.g. Raft's leadership transfer).
    Control(C),
    /// A client's linearizable read, identified by a request id unique on this node (the same
    /// id space as [`Input::Propose`]). The core answers with a [`ReadState`] in
    /// [`Output::reads`] once it knows an index at which reading the state machine is
    /// linearizable, or refuses it with a [`Rejection`]. A core that cannot
    /// ([`Protocol::SERVES_READS`] false) refuses every read.
    Read {
        /// Unique on this node; chosen by the driver.
        request_id: u64,
    },
    /// Append buffered proposals now. The engine sends this when its input queue is drained, so
    /// proposals that arrived together go out together without waiting for the batch timeout.
    FlushProposals,
    /// A hint from the transport: every connection to `peer` just broke (reset, refused or
    /// closed), which is what a killed process or a closed port looks like. It may be false (a
    /// network blip) and it may never come (a silent partition), so a core may only act on it
    /// in ways that are safe either way: Raft starts a pre-vote early when `peer` is its
    /// leader; PBFT ignores it.
    PeerUnreachable {
        /// The peer whose connections broke.
        peer: NodeId,
    },
    /// The hard state a write carried is durable (the write's [`LogWrite::hard_state`]; a
    /// driver steps this after every write that carried one). A Raft candidate counts its own
    /// vote only then: counted at once, a sole voter would lead the new term before anything
    /// recorded it, and after a crash before the write it could vote in that term again, for
    /// another node, which would then lead the same term.
    ///
    /// [`LogWrite::hard_state`]: crate::storage::LogWrite::hard_state
    HardStateDurable(HardState),
    /// The log is durable through `index`, whose entry has `term` (the term guards against an
    /// acknowledgement of entries that a later truncation already replaced).
    Durable {
        /// The last durable index.
        index: LogIndex,
        /// The term of the entry at `index` when it was written.
        term: Term,
    },
    /// The driver captured the applied state through `snapshot.index` (whose entry has
    /// `snapshot.term`) in `snapshot.data`. A core that compacts its log keeps it to send to
    /// followers and asks the store to save it and drop the log before the previous snapshot;
    /// a core that does not ([`Protocol::COMPACTS_LOG`] false) ignores it. Ignored too when it
    /// is not newer than the snapshot held, or names an index not committed here.
    SnapshotTaken(Snapshot),
}

/// Why a proposal was refused. A refused proposal was never appended to any log.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RejectReason {
    /// This node is not the leader and knows of none to forward to.
    #[error("no leader is known")]
    NoLeader,
    /// This node is not the leader and does not forward proposals.
    #[error("not the leader; the leader is {leader:?}")]
    NotLeader {
        /// The leader this node knows of, if any.
        leader: Option<NodeId>,
    },
    /// The leader is handing over leadership and accepts no proposals until that ends. (Raft
    /// no longer refuses for this reason: proposals made during a transfer wait for its end and
    /// go to the new leader.)
    #[error("leadership transfer in progress")]
    TransferInProgress,
    /// The buffer of proposals waiting to be appended is full.
    #[error("too many pending proposals (limit {limit})")]
    Overloaded {
        /// The configured bound.
        limit: usize,
    },
    /// The proposal is larger than one batch may be.
    #[error("proposal of {size} bytes exceeds max_batch_bytes {limit}")]
    TooLarge {
        /// The proposal's size.
        size: usize,
        /// The configured bound.
        limit: usize,
    },
    /// The engine's input queue is full: the driver thread is behind. Retry later.
    #[error("engine input queue is full")]
    QueueFull,
    /// A committed membership change removed this node from the cluster (Raft, GPU-optimized Raft): it takes no
    /// requests; ask a member.
    #[error("this node was removed from the cluster")]
    Removed,
    /// GPU-optimized Raft refused a client's signature: it does not verify, its key is not in
    /// the allow-list, the command is unsigned where signatures are required, or its frame is
    /// malformed.
    #[error("client signature refused: {reason}")]
    ClientSignature {
        /// Why.
        reason: &'static str,
    },
    /// The protocol serves no reads outside its log ([`Protocol::SERVES_READS`]): order the
    /// read through the log instead.
    #[error("this protocol serves reads only through its log")]
    ReadsThroughLog,
}

/// A read's index: once the state machine has applied every entry through `index`, the read
/// with `request_id` may be served from it, and what it sees is linearizable (Raft thesis
/// §6.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadState {
    /// The id given in [`Input::Read`].
    pub request_id: u64,
    /// Serve the read once this index is applied.
    pub index: LogIndex,
}

/// A refused proposal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// The id given in [`Input::Propose`].
    pub request_id: u64,
    /// Why.
    pub reason: RejectReason,
}

/// A round of a Raft election (see [`Event::ElectionRound`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ElectionRound {
    /// The pre-vote: would a quorum vote for this node in the next term? Asked without raising
    /// the term, so a node that cannot win (cut off, or behind) disturbs no one.
    PreVote,
    /// The vote itself, in a term this node raised.
    Vote,
}

/// Something the driver may want to tell the world about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// This node holds proof that `offender` misbehaved (once per offender; see
    /// [`pbft::Evidence`]).
    ByzantineDetected {
        /// The replica the proof names.
        offender: NodeId,
        /// What it did ([`pbft::Offence::as_str`]).
        offence: &'static str,
    },
    /// Raft: this node began a round of an election, for traces: a pre-vote (asking whether
    /// it could win `term`, its own term unchanged) or the vote in `term`. The election ends
    /// with [`Event::LeaderChanged`] naming a leader.
    ElectionRound {
        /// Which round.
        round: ElectionRound,
        /// The term the round is for.
        term: Term,
    },
    /// The node learned of a new leader, or lost track of the old one.
    LeaderChanged {
        /// The term in which this is so.
        term: Term,
        /// The leader, or `None` while an election is on.
        leader: Option<NodeId>,
    },
    /// This leader began sending `to` its snapshot through `index`, `bytes` long (`to`'s next
    /// entry was compacted away), or began it again after giving up on an earlier one.
    SnapshotSendStarted {
        /// The follower.
        to: NodeId,
        /// The snapshot's last index.
        index: LogIndex,
        /// The snapshot's length.
        bytes: u64,
    },
    /// `to` holds the whole snapshot through `index` that this leader sent it.
    SnapshotSendFinished {
        /// The follower.
        to: NodeId,
        /// The snapshot's last index.
        index: LogIndex,
    },
    /// PBFT: the batch at `sequence` is prepared on this replica in `view` (a quorum agreed
    /// on its order, and this replica's commit is going out); `proposals` are its requests'
    /// tags, for traces. Its commit shows as the batch's entries in [`Output::committed`].
    Prepared {
        /// The view.
        view: u64,
        /// The batch's sequence number.
        sequence: u64,
        /// The tags of the batch's requests, in order.
        proposals: Vec<ProposalTag>,
    },
    /// This node began receiving the leader's snapshot through `index`, `bytes` long; it
    /// ends with [`Output::restore`] once every chunk arrived and checked out.
    SnapshotReceiveStarted {
        /// The leader.
        from: NodeId,
        /// The snapshot's last index.
        index: LogIndex,
        /// The snapshot's length.
        bytes: u64,
    },
    /// Raft: the membership in force changed (a membership entry was appended, or truncated
    /// away), or the latest one committed (`committed`).
    MembershipChanged {
        /// The index of the entry that set it.
        index: LogIndex,
        /// The membership.
        membership: crate::membership::Membership,
        /// True once the entry is committed.
        committed: bool,
    },
    /// Raft: a membership change asked of this node was refused; nothing was appended.
    MembershipRefused {
        /// Why.
        error: crate::membership::MembershipError,
    },
    /// Raft: a membership change asked of this follower went to the leader it knows, as
    /// request `tag`; [`Event::MembershipForwardAnswered`] follows when the leader answers.
    MembershipForwarded {
        /// This node's number for the request.
        tag: u64,
        /// The leader it went to.
        leader: NodeId,
    },
    /// Raft: the leader answered forwarded request `tag`: the index of the membership entry
    /// whose commit completes the change (see [`Event::MembershipChanged`]), or the refusal.
    MembershipForwardAnswered {
        /// This node's number for the request.
        tag: u64,
        /// The entry's index, or why the leader refused.
        result: Result<LogIndex, crate::membership::MembershipError>,
    },
    /// Raft: a committed membership (set by the entry at `index`) leaves this node out. It
    /// neither votes nor campaigns any more; its driver should stop it.
    Removed {
        /// The index of the membership entry.
        index: LogIndex,
    },
}

/// Actions for the driver, accumulated over one or more steps. See the module documentation for
/// the order in which they must be carried out.
#[derive(Debug)]
pub struct Output<M> {
    /// What to make durable.
    pub write: LogWrite,
    /// Messages that may leave before [`Output::write`] is durable.
    pub messages: Vec<Envelope<M>>,
    /// Messages that may leave only once [`Output::write`] is durable.
    pub messages_after_write: Vec<Envelope<M>>,
    /// Newly committed entries, in index order, to apply once durable here (see the driver's
    /// contract in the [module documentation](self)).
    pub committed: Vec<Entry>,
    /// Proposals and reads refused.
    pub rejected: Vec<Rejection>,
    /// Reads whose index is known: serve each once its index is applied (after
    /// [`Output::committed`]).
    pub reads: Vec<ReadState>,
    /// A snapshot from the leader that replaces this node's applied state: restore the state
    /// machine from it before applying [`Output::committed`], of which only the entries past
    /// `restore.index` are still to apply. Durable through [`Output::write`] like the rest.
    pub restore: Option<Snapshot>,
    /// Notifications.
    pub events: Vec<Event>,
}

/// What a durable write tells its core (step 5 of the driver's contract, see the
/// [module documentation](self)): the hard state it carried and the last entry it appended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Durability {
    /// The hard state the write carried, if any.
    pub hard_state: Option<HardState>,
    /// The last entry the write appended (index and term), if any.
    pub last_appended: Option<(LogIndex, Term)>,
}

impl Durability {
    /// What `write` makes durable.
    pub fn of(write: &LogWrite) -> Self {
        Durability {
            hard_state: write.hard_state,
            last_appended: write.last_appended(),
        }
    }

    /// Steps `core` with what became durable, hard state first; false when there was nothing
    /// to tell.
    pub fn tell<P: Protocol>(self, core: &mut P, out: &mut Output<P::Message>) -> bool {
        if let Some(hard_state) = self.hard_state {
            core.step(Input::HardStateDurable(hard_state), out);
        }
        if let Some((index, term)) = self.last_appended {
            core.step(Input::Durable { index, term }, out);
        }
        self.hard_state.is_some() || self.last_appended.is_some()
    }
}

impl<M> Default for Output<M> {
    fn default() -> Self {
        Output {
            write: LogWrite::default(),
            messages: Vec::new(),
            messages_after_write: Vec::new(),
            committed: Vec::new(),
            rejected: Vec::new(),
            reads: Vec::new(),
            restore: None,
            events: Vec::new(),
        }
    }
}

impl<M> Output<M> {
    /// True when there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.write.is_empty()
            && self.messages.is_empty()
            && self.messages_after_write.is_empty()
            && self.committed.is_empty()
            && self.rejected.is_empty()
            && self.reads.is_empty()
            && self.restore.is_none()
            && self.events.is_empty()
    }

    /// Empties every field, keeping allocations for reuse.
    pub fn clear(&mut self) {
        self.write.clear();
        self.messages.clear();
        self.messages_after_write.clear();
        self.committed.clear();
        self.rejected.clear();
        self.reads.clear();
        self.restore = None;
        self.events.clear();
    }
}

/// Who leads and how far the log is committed, as one node sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Status {
    /// The node's current term (a PBFT replica's view).
    pub term: Term,
    /// The leader (primary) this node knows of.
    pub leader: Option<NodeId>,
    /// True if this node is that leader.
    pub is_leader: bool,
    /// Highest index known to be committed.
    pub commit_index: LogIndex,
    /// Entries the log holds (after the snapshot, for a core that compacts its log).
    pub log_entries: u64,
}

/// Why a peer message was dropped unread: the `reason` label of
/// `consensus_invalid_messages_total`. None of these is evidence against the sender: a bad
/// signature can be forged in anyone's name, garbage can come from anyone, and an old message
/// may be an honest one that arrived late.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum InvalidReason {
    /// A signature that does not verify against its claimed signer's key.
    BadSignature,
    /// A sender or signer that is not a member with a known key.
    UnknownSigner,
    /// Bytes that are not a message: a signature of the wrong length, or (counted by the TCP
    /// transport, per connection it closes) a frame that is oversized or does not decode.
    Malformed,
    /// A statement about a view or sequence number this replica has moved past: replays, and
    /// honest messages that arrived late (a trickle around view changes and checkpoints is
    /// normal).
    Stale,
    /// A message from a replica this one excludes as proven Byzantine.
    Excluded,
}

impl InvalidReason {
    /// Every reason.
    pub const ALL: [InvalidReason; 5] = [
        InvalidReason::BadSignature,
        InvalidReason::UnknownSigner,
        InvalidReason::Malformed,
        InvalidReason::Stale,
        InvalidReason::Excluded,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            InvalidReason::BadSignature => "bad_signature",
            InvalidReason::UnknownSigner => "unknown_signer",
            InvalidReason::Malformed => "malformed",
            InvalidReason::Stale => "stale",
            InvalidReason::Excluded => "excluded",
        }
    }
}

/// Peer messages a core dropped unread since it started, by reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InvalidCounts([u64; InvalidReason::ALL.len()]);

impl InvalidCounts {
    /// Dropped for `reason`.
    pub fn get(&self, reason: InvalidReason) -> u64 {
        self.0[reason as usize]
    }

    /// Counts `count` more dropped for `reason`.
    pub fn add(&mut self, reason: InvalidReason, count: u64) {
        self.0[reason as usize] += count;
    }

    /// Dropped for any reason.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    /// Per reason, what `self` counts beyond `earlier`.
    pub fn since(&self, earlier: &InvalidCounts) -> impl Iterator<Item = (InvalidReason, u64)> {
        let (now, then) = (self.0, earlier.0);
        InvalidReason::ALL
            .into_iter()
            .map(move |reason| {
                let index = reason as usize;
                (reason, now[index].saturating_sub(then[index]))
            })
            .filter(|&(_, count)| count > 0)
    }
}

/// The end of a signing core's [`Protocol::authenticate`]: marks `bad_signature` each message
/// that owns (`owners[i]` is the message of signature `i`) a signature whose verdict is false,
/// drops every refused message from `messages`, counts each refusal in `invalid`, and returns how
/// many were dropped. `refused` holds one slot per message, `Some` for those already refused.
pub(crate) fn drop_refused<M>(
    messages: &mut Vec<Envelope<M>>,
    mut refused: Vec<Option<InvalidReason>>,
    owners: Vec<usize>,
    verdicts: Vec<bool>,
    invalid: &mut InvalidCounts,
) -> usize {
    for (owner, valid) in owners.into_iter().zip(verdicts) {
        if !valid {
            refused[owner].get_or_insert(InvalidReason::BadSignature);
        }
    }
    let mut index = 0;
    messages.retain(|_| {
        let keep = refused[index].is_none();
        index += 1;
        keep
    });
    for &reason in refused.iter().flatten() {
        invalid.add(reason, 1);
    }
    refused.iter().flatten().count()
}

/// What carrying proposals means to a message's receiver: which span it opens for a traced one
/// (see [`crate::telemetry`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Carriage {
    /// The message carries no proposal.
    Nothing,
    /// Client proposals on their way to the leader (primary), which orders them.
    Forwarded,
    /// Ordered proposals (log entries, a pre-prepared batch) for the receiver to store.
    Entries,
}

/// A sans-IO consensus core. See the [module documentation](self) for the driver's contract.
pub trait Protocol: Send + 'static {
    /// For traces: calls `visit` with the tag of each proposal that `message`, sent by `sender`,
    /// carries, and says what carrying them means. The default carries nothing (no proposal's
    /// trace crosses nodes).
    fn carried_proposals(
        message: &Self::Message,
        sender: NodeId,
        visit: &mut dyn FnMut(ProposalTag),
    ) -> Carriage {
        let _ = (message, sender, visit);
        Carriage::Nothing
    }

    /// What nodes of this protocol send each other.
    type Message: Clone + std::fmt::Debug + Send + 'static;
    /// Operator requests beyond proposals (e.g. a leadership transfer).
    type Control: Clone + std::fmt::Debug + Send + 'static;

    /// This node's id.
    fn id(&self) -> NodeId;

    /// Feeds one input; what the driver must do is appended to `out`.
    fn step(&mut self, input: Input<Self::Message, Self::Control>, out: &mut Output<Self::Message>);

    /// True when [`Protocol::authenticate`] checks something (signatures), so that a driver
    /// measures it.
    const AUTHENTICATES: bool = false;

    /// True when the core answers [`Input::Read`] with read indexes; a driver orders the reads
    /// of a core that does not through its log.
    const SERVES_READS: bool = false;

    /// True when the core compacts its log behind the snapshots it is given
    /// ([`Input::SnapshotTaken`]); a driver takes none for a core that does not.
    const COMPACTS_LOG: bool = false;

    /// Checks the authenticity of a round of peer messages in one batch, before any of them is
    /// stepped, and removes those that fail; returns how many it removed. A core whose messages
    /// carry signatures (PBFT) checks them all here at once, so that a GPU verifier sees whole
    /// batches; a core that trusts its transport (Raft) keeps everything, which is the default.
    /// A driver must pass every peer message through it.
    fn authenticate(&mut self, messages: &mut Vec<Envelope<Self::Message>>) -> usize {
        let _ = messages;
        0
    }

    /// Steps a round of authenticated peer messages (what [`Protocol::authenticate`] kept), in
    /// order, leaving `messages` empty. A core may settle what the whole round changed at its
    /// end rather than after each message: PBFT counts the round's prepares and commits in one
    /// [`VoteAggregator`](crate::gpu::VoteAggregator) batch. The default steps each message.
    fn step_round(
        &mut self,
        messages: &mut Vec<Envelope<Self::Message>>,
        out: &mut Output<Self::Message>,
    ) {
        for envelope in messages.drain(..) {
            self.step(Input::Message(envelope), out);
        }
    }

    /// Peer messages dropped unread so far, by reason (none for a core that trusts its
    /// transport, the default).
    fn invalid_messages(&self) -> InvalidCounts {
        InvalidCounts::default()
    }

    /// Who leads and how far the log is committed.
    fn status(&self) -> Status;

    /// On a leader, each follower's replication lag: how many entries of the leader's log it is
    /// not known to hold. Empty on a follower, and for a core without a leader's log (PBFT).
    fn replication_lag(&self) -> Vec<(NodeId, u64)> {
        Vec::new()
    }

    /// The membership in force here, for a core that changes its members (Raft, GPU-optimized Raft); `None` for
    /// one whose members are fixed at start.
    fn membership(&self) -> Option<crate::membership::Membership> {
        None
    }

    /// The operator request that asks for `change`, for a core that changes its members;
    /// `None` for one that does not (the engine refuses the change itself).
    fn membership_control(change: crate::membership::MembershipChange) -> Option<Self::Control> {
        let _ = change;
        None
    }

    /// What a store holding every write this node asked for would recover: hard state, log and
    /// records. For a driver that stops after carrying out every output, that is exactly its
    /// durable state (an engine without a data dir restarts from it).
    fn into_recovered_state(self) -> RecoveredState
    where
        Self: Sized;
}
