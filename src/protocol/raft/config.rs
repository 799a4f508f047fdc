//! Settings of one Raft node, in ticks and counts (the engine converts durations to ticks).

use std::collections::BTreeMap;

use crate::error::ConfigError;
use crate::types::NodeId;

/// Deliberate protocol bugs, for proving that the simulator's checkers catch them. Every switch is
/// off by default; only builds with the `sim` feature (and the crate's own tests) can turn one on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InjectedBugs {
    /// Grant a vote to every candidate of the current term, even after voting for another.
    pub vote_twice_in_a_term: bool,
    /// Commit by counting replicas even when the entry is from an earlier term (the Raft paper's
    /// Figure 8 bug).
    pub commit_previous_term_by_counting: bool,
    /// Serve reads at the leader's commit index without confirming its leadership first (a
    /// deposed leader then answers from stale state).
    pub read_without_confirming_leadership: bool,
    /// Count learners as voters when committing (they store the log, but a quorum of them
    /// and the leader need not hold a majority of the voters).
    pub count_learners_in_quorum: bool,
}

/// Chunks of a snapshot in flight to one follower (sent, not yet answered): enough to cover
/// the round trip of a chunk through both drivers and the transport (measured on loopback: a
/// window of 4 MiB moved 0.11 GB/s, bound by that round trip).
pub const SNAPSHOT_CHUNKS_IN_FLIGHT: usize = 16;

/// Settings of one Raft node.
#[derive(Clone, Debug)]
pub struct RaftConfig {
    /// This node.
    pub id: NodeId,
    /// Every voting member at the group's start, this node included; empty for a node that
    /// joins a running group (it neither votes nor campaigns until a leader adds it, and learns
    /// the members from the leader's log or snapshot). Once the log holds a membership entry,
    /// that entry decides (see [`crate::membership`]).
    pub voters: Vec<NodeId>,
    /// A follower that hears nothing from a leader for a random number of ticks in
    /// `[election_timeout_ticks, 2 * election_timeout_ticks)` starts an election.
    pub election_timeout_ticks: u32,
    /// A leader sends heartbeats every this many ticks. Must be below `election_timeout_ticks`.
    pub heartbeat_interval_ticks: u32,
    /// Run a pre-vote round before a real election (Raft thesis §9.6).
    pub pre_vote: bool,
    /// A leader steps down when it has not heard from a quorum for an election timeout, and
    /// followers that heard from a leader within an election timeout refuse to vote for others.
    pub check_quorum: bool,
    /// When set, a leader hands leadership to a caught-up voter whose priority is higher than its
    /// own, so the highest-priority reachable node ends up leading.
    pub priority_based: bool,
    /// Election priority per node; absent nodes have priority 0.
    pub priorities: BTreeMap<NodeId, u32>,
    /// Append messages in flight (sent, not yet acknowledged) per follower.
    pub max_inflight_appends: usize,
    /// Upper bound on entries per append message.
    pub max_entries_per_append: usize,
    /// Upper bound on payload bytes per append message (one larger entry is still sent alone).
    pub max_bytes_per_append: usize,
    /// Entries the log keeps behind its last one once a snapshot covers them; 0 keeps what the
    /// previous snapshot did not cover (see `snapshot.rs`). With the driver's
    /// snapshot interval here, the log holds at most about one interval plus the entries
    /// appended while a snapshot is serialized: the log is compacted through the lower of the
    /// latest snapshot's index and `last_index - log_retention` whenever that point is an
    /// eighth of `log_retention` past the log's first entry.
    pub log_retention: u64,
    /// Bytes per chunk of a snapshot sent to a follower (see `snapshot.rs`); a few chunks are in
    /// flight at once ([`SNAPSHOT_CHUNKS_IN_FLIGHT`]). Must fit in one transport frame.
    pub snapshot_chunk_bytes: usize,
    /// Buffer proposals on the leader and append them together; when off, every proposal is
    /// appended as soon as it arrives.
    pub enable_batching: bool,
    /// Append the buffer once it holds this many proposals.
    pub batch_size: usize,
    /// Append the buffer once its oldest proposal has waited this many ticks.
    pub batch_timeout_ticks: u32,
    /// Append the buffer once it holds this many bytes; also the largest proposal accepted.
    pub max_batch_bytes: usize,
    /// Bound on proposals buffered and not yet appended; more are refused as overloaded.
    pub max_pending_proposals: usize,
    /// A follower passes proposals on to the leader it knows instead of refusing them.
    pub forward_proposals: bool,
    /// When the transport reports the leader unreachable
    /// ([`Input::PeerUnreachable`](crate::protocol::Input::PeerUnreachable)), the followers
    /// start their pre-votes this many ticks apart, in the order of their ids (the first at
    /// once), so that they do not split the vote by campaigning at the same instant.
    pub unreachable_leader_stagger_ticks: u32,
    /// A pre-candidate asks again, this many ticks apart, the voters that refused or did not
    /// answer its pre-vote (0: never). A pre-vote changes nothing on the voter, so asking again
    /// is free; it matters after a crash, when a voter refused only because its own hint that
    /// the leader is gone had not arrived yet.
    pub pre_vote_retry_ticks: u32,
    /// Serve linearizable reads on the leader from a lease, without a heartbeat round per read
    /// (Raft thesis §6.4.1); requires `check_quorum`. The lease rests on clocks: it is safe
    /// while no node's tick runs more than [`RaftConfig::max_clock_drift_percent`] off another's
    /// and a leader's driver does not lose ticks (the engine's driver steps the ticks it missed). To
    /// make it hold, a voter refuses every vote for an election timeout after it last heard
    /// from a leader, and after its own start, even when its transport said the leader is gone:
    /// failover after a crash then waits out a whole election timeout. Off by default: without
    /// a lease each read confirms the leadership with a heartbeat round (ReadIndex), which
    /// needs no clock at all.
    pub lease_reads: bool,
    /// The bound on clock drift between nodes that lease reads assume, in percent (default 5):
    /// the lease is shortened by it (see [`RaftConfig::lease_ticks`]).
    pub max_clock_drift_percent: u32,
    /// Seeds the election-timeout randomness. Give each node its own.
    pub seed: u64,
    /// Deliberate bugs for the simulator's self-tests (feature `sim`).
    #[cfg(any(test, feature = "sim"))]
    pub injected_bugs: InjectedBugs,
}

impl RaftConfig {
    /// Settings with the usual values: election timeout 10 ticks, heartbeat every 2, pre-vote and
    /// check-quorum on, 64 appends in flight, batches of up to 1,024 proposals or 1 MiB.
    pub fn new(id: NodeId, voters: Vec<NodeId>) -> Self {
        RaftConfig {
            id,
            voters,
            election_timeout_ticks: 10,
            heartbeat_interval_ticks: 2,
            pre_vote: true,
            check_quorum: true,
            priority_based: false,
            priorities: BTreeMap::new(),
            max_inflight_appends: 64,
            max_entries_per_append: 4096,
            max_bytes_per_append: 1 << 20,
            log_retention: 0,
            snapshot_chunk_bytes: 1 << 20,
            enable_batching: true,
            batch_size: 1024,
            batch_timeout_ticks: 1,
            max_batch_bytes: 1 << 20,
            max_pending_proposals: 65_536,
            forward_proposals: true,
            unreachable_leader_stagger_ticks: 2,
            pre_vote_retry_ticks: 2,
            lease_reads: false,
            max_clock_drift_percent: 5,
            seed: 0,
            #[cfg(any(test, feature = "sim"))]
            injected_bugs: InjectedBugs::default(),
        }
    }

    /// The injected bugs in force: none outside simulator builds.
    pub(crate) fn bugs(&self) -> InjectedBugs {
        #[cfg(any(test, feature = "sim"))]
        return self.injected_bugs;
        #[cfg(not(any(test, feature = "sim")))]
        InjectedBugs::default()
    }

    /// How many of its own ticks a leader's lease lasts from the moment it sent the heartbeat
    /// round a quorum answered. A voter that answered refuses votes until `T` of its ticks
    /// (`T` = [`RaftConfig::election_timeout_ticks`]) have passed since it heard the leader, which
    /// is at least `T - 1` tick lengths of real time (its first tick may come at once). With
    /// ticks that differ by at most `d`%, `L` leader ticks last at most `L` of its tick lengths,
    /// so the lease is the largest `L` with `L (100 + d) <= (T - 1)(100 - d)`.
    pub fn lease_ticks(&self) -> u32 {
        let drift = u64::from(self.max_clock_drift_percent.min(99));
        let voter_ticks = u64::from(self.election_timeout_ticks.saturating_sub(1));
        let lease = voter_ticks * (100 - drift) / (100 + drift);
        u32::try_from(lease).unwrap_or(u32::MAX)
    }

    /// The priority of `node` (0 when not configured).
    pub fn priority_of(&self, node: NodeId) -> u32 {
        self.priorities.get(&node).copied().unwrap_or(0)
    }

    /// Checks that the settings can work together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = ConfigError::invalid::<()>;
        // Empty: a node joining a running group, which learns its members from the leader.
        if !self.voters.is_empty() && !self.voters.contains(&self.id) {
            return invalid(
                "voters",
                format!("{:?}", self.voters),
                "must include this node's id (or be empty, for a node that joins a running group)",
            );
        }
        let mut sorted = self.voters.clone();
        sorted.sort();
        sorted.dedup();
        if sorted.len() != self.voters.len() {
            return invalid(
                "voters",
                format!("{:?}", self.voters),
                "must not repeat a node",
            );
        }
        if self.heartbeat_interval_ticks == 0 {
            return invalid("heartbeat_interval_ticks", "0".into(), "must be at least 1");
        }
        if self.election_timeout_ticks <= self.heartbeat_interval_ticks {
            return invalid(
                "election_timeout_ticks",
                self.election_timeout_ticks.to_string(),
                "must exceed the heartbeat interval",
            );
        }
        if self.lease_reads && !self.check_quorum {
            return invalid(
                "lease_reads",
                "true".into(),
                "needs check_quorum: without it voters do not honour a leader's lease",
            );
        }
        if self.lease_reads && self.lease_ticks() == 0 {
            return invalid(
                "lease_reads",
                "true".into(),
                "the election timeout is too short for a lease at this clock drift bound",
            );
        }
        for (field, value) in [
            ("max_inflight_appends", self.max_inflight_appends),
            ("max_entries_per_append", self.max_entries_per_append),
            ("max_bytes_per_append", self.max_bytes_per_append),
            ("snapshot_chunk_bytes", self.snapshot_chunk_bytes),
            ("batch_size", self.batch_size),
            ("max_batch_bytes", self.max_batch_bytes),
            ("max_pending_proposals", self.max_pending_proposals),
        ] {
            if value == 0 {
                return invalid(field, "0".into(), "must be at least 1");
            }
        }
        Ok(())
    }
}
