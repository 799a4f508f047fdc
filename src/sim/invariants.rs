//! The safety properties the simulator checks as the run goes (Raft paper, Figure 3; the first
//! and the last hold for every core, the middle two are Raft's own, see [`SimProtocol`]):
//!
//! - election safety: at most one leader per term, over the whole run;
//! - log matching: two logs holding an entry with the same index and term are identical up to it;
//! - leader completeness: an entry committed in term T is in the log of every leader of a term > T;
//! - state-machine safety: no two nodes apply different entries at one index (a global map of
//!   index → first applied entry, across crashes and restarts).
//!
//! Each check returns the first [`Violation`] it finds; the simulator stops there and reports the
//! seed.

use std::collections::BTreeMap;
use std::fmt;

use crate::protocol::raft::RaftLog;
use crate::sim::SimProtocol;
use crate::{Entry, LogIndex, NodeId, Term};

/// A broken property, with what is needed to understand it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Violation {
    /// Two nodes led the same term.
    ElectionSafety {
        /// The term.
        term: Term,
        /// The leader seen first.
        first: NodeId,
        /// The other one.
        second: NodeId,
    },
    /// Two logs agree on an entry's term but differ below it.
    LogMatching {
        /// One node.
        a: NodeId,
        /// The other.
        b: NodeId,
        /// The highest index where their terms agree.
        agree_at: LogIndex,
        /// An index below it where the entries differ.
        differ_at: LogIndex,
    },
    /// A leader lacks an entry committed in an earlier term.
    LeaderCompleteness {
        /// The leader.
        leader: NodeId,
        /// Its term.
        term: Term,
        /// The committed entry's index.
        index: LogIndex,
        /// The term in which the entry was first seen committed.
        committed_in: Term,
    },
    /// Two different entries were applied at one index.
    StateMachineSafety {
        /// The index.
        index: LogIndex,
        /// The node applying the second, different entry.
        node: NodeId,
        /// What was applied there first (term, debug rendering).
        first: String,
        /// What `node` applied.
        second: String,
    },
    /// Two replicas executed through one sequence number into different states: they executed
    /// different batches somewhere (PBFT agreement).
    Agreement {
        /// One replica.
        a: NodeId,
        /// The other.
        b: NodeId,
        /// The sequence number both executed through.
        seq: u64,
    },
    /// An honest replica holds evidence against another honest one (every simulated replica
    /// runs honest code, so any evidence is a false accusation).
    FalseAccusation {
        /// The replica holding the evidence.
        accuser: NodeId,
        /// The replica it names.
        accused: NodeId,
    },
    /// A GPU-optimized Raft node counted an acknowledgement no certificate can carry, holds a
    /// certificate that does not verify or names another log, or committed past it.
    Certificate {
        /// The node.
        node: NodeId,
        /// What is wrong.
        detail: String,
    },
    /// A node's state machine refused an entry (gap, reordering or an undecodable command).
    Apply {
        /// The node.
        node: NodeId,
        /// The refusal.
        detail: String,
    },
    /// The log store refused the core's writes.
    Storage {
        /// The node.
        node: NodeId,
        /// The error.
        detail: String,
    },
    /// The healed cluster did not make progress in time.
    Liveness {
        /// What did not happen.
        detail: String,
    },
    /// The client history has no linearization.
    Linearizability {
        /// The checker's verdict.
        detail: String,
    },
    /// The linearizability checker could not decide within its step budget.
    CheckerBudget {
        /// The checker's report.
        detail: String,
    },
    /// A leader committed an entry that no quorum of its voters stores (learners counted, or
    /// one majority of a joint membership ignored).
    CommitWithoutQuorum {
        /// The leader.
        leader: NodeId,
        /// The index it committed.
        index: LogIndex,
        /// Its membership then.
        membership: String,
    },
    /// A scenario's own expectation failed (e.g. a rejoining node deposed the leader).
    Scenario {
        /// What was expected.
        detail: String,
    },
}

impl Violation {
    /// True for the properties Raft promises regardless of timing (as opposed to progress, checker
    /// budget or a scenario's expectation).
    pub fn is_safety(&self) -> bool {
        matches!(
            self,
            Violation::ElectionSafety { .. }
                | Violation::LogMatching { .. }
                | Violation::LeaderCompleteness { .. }
                | Violation::StateMachineSafety { .. }
                | Violation::Agreement { .. }
                | Violation::FalseAccusation { .. }
                | Violation::Certificate { .. }
                | Violation::Linearizability { .. }
                | Violation::CommitWithoutQuorum { .. }
        )
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::ElectionSafety {
                term,
                first,
                second,
            } => {
                write!(
                    f,
                    "election safety: {first} and {second} both led term {term}"
                )
            }
            Violation::LogMatching {
                a,
                b,
                agree_at,
                differ_at,
            } => write!(
                f,
                "log matching: {a} and {b} agree on the term at index {agree_at} but differ at {differ_at}"
            ),
            Violation::LeaderCompleteness {
                leader,
                term,
                index,
                committed_in,
            } => write!(
                f,
                "leader completeness: {leader}, leader of term {term}, lacks index {index} committed in term {committed_in}"
            ),
            Violation::StateMachineSafety {
                index,
                node,
                first,
                second,
            } => write!(
                f,
                "state-machine safety: {node} applied {second} at index {index}, where {first} was applied before"
            ),
            Violation::Apply { node, detail } => write!(f, "apply on {node}: {detail}"),
            Violation::Storage { node, detail } => write!(f, "storage on {node}: {detail}"),
            Violation::Liveness { detail } => write!(f, "liveness: {detail}"),
            Violation::Linearizability { detail } => write!(f, "linearizability: {detail}"),
            Violation::CheckerBudget { detail } => {
                write!(f, "linearizability checker budget: {detail}")
            }
            Violation::Agreement { a, b, seq } => write!(
                f,
                "agreement: {a} and {b} executed through sequence {seq} into different states"
            ),
            Violation::FalseAccusation { accuser, accused } => {
                write!(
                    f,
                    "false accusation: {accuser} holds evidence against honest {accused}"
                )
            }
            Violation::CommitWithoutQuorum {
                leader,
                index,
                membership,
            } => write!(
                f,
                "commit without a quorum: {leader} committed {index}, not stored by a quorum of \
                 {membership}"
            ),
            Violation::Scenario { detail } => write!(f, "scenario: {detail}"),
            Violation::Certificate { node, detail } => {
                write!(f, "commit certificate on {node}: {detail}")
            }
        }
    }
}

/// The record of the run the checks compare against.
#[derive(Debug, Default)]
pub struct SafetyMonitor {
    /// Term → the node seen leading it.
    leaders: BTreeMap<Term, NodeId>,
    /// Index → (first entry applied there, term of the node that first applied it). A node learns
    /// that an entry is committed only from a leader of its own term, so that term is at least the
    /// term in which the entry was committed; taking the first observation keeps it tight.
    applied: BTreeMap<LogIndex, (Entry, Term)>,
}

impl SafetyMonitor {
    /// A monitor that has seen nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Terms that had a leader, with the leader.
    pub fn leaders(&self) -> &BTreeMap<Term, NodeId> {
        &self.leaders
    }

    /// The entry first applied at each index.
    pub fn applied(&self) -> &BTreeMap<LogIndex, (Entry, Term)> {
        &self.applied
    }

    /// Called after every step of `node`: election safety, and the core's own check the first
    /// time a leader is seen in its term.
    pub fn observe_node<P: SimProtocol>(&mut self, node: &P) -> Result<(), Violation> {
        let status = node.status();
        if !status.is_leader {
            return Ok(());
        }
        let (term, id) = (status.term, node.id());
        match self.leaders.get(&term) {
            Some(&first) if first != id => {
                return Err(Violation::ElectionSafety {
                    term,
                    first,
                    second: id,
                });
            }
            Some(_) => return Ok(()),
            None => {}
        }
        self.leaders.insert(term, id);
        P::check_new_leader(node, self)
    }

    /// Called for every entry a node applies, with the node's term at that moment.
    pub fn observe_applied(
        &mut self,
        node: NodeId,
        term: Term,
        entry: &Entry,
    ) -> Result<(), Violation> {
        match self.applied.get(&entry.index) {
            Some((first, _)) if first != entry => Err(Violation::StateMachineSafety {
                index: entry.index,
                node,
                first: format!("{first:?}"),
                second: format!("{entry:?}"),
            }),
            Some(_) => Ok(()),
            None => {
                self.applied.insert(entry.index, (entry.clone(), term));
                Ok(())
            }
        }
    }
}

/// Log matching over every pair of `logs`.
pub fn check_log_matching(logs: &[(NodeId, &RaftLog)]) -> Result<(), Violation> {
    for (i, &(a, log_a)) in logs.iter().enumerate() {
        for &(b, log_b) in &logs[i + 1..] {
            // Only where both logs still hold entries: below, they were compacted into
            // snapshots (state-machine safety checks what those applied).
            let start = log_a.first_index().max(log_b.first_index());
            let common = log_a.last_index().min(log_b.last_index());
            let Some(agree_at) = (start..=common)
                .rev()
                .find(|&k| log_a.term_at(k).is_some() && log_a.term_at(k) == log_b.term_at(k))
            else {
                continue;
            };
            if let Some(differ_at) = (start..=agree_at).find(|&k| log_a.entry(k) != log_b.entry(k))
            {
                return Err(Violation::LogMatching {
                    a,
                    b,
                    agree_at,
                    differ_at,
                });
            }
        }
    }
    Ok(())
}
