//! Evidence of Byzantine behaviour: the offender's own signed statements that, together, break
//! a rule of the protocol. Anyone holding the validator keys and the cluster's parameters can
//! check a piece of evidence alone; nothing that could have been made by someone else (a bad
//! signature, garbage, a replay, silence) is ever evidence.
//!
//! A replica that finds evidence persists it, tells every other replica, and (with
//! [`PunishmentPolicy::Exclude`]) stops counting the offender: its messages are dropped, and a
//! primary proven faulty is replaced at once. Each replica checks evidence it receives itself
//! before acting on it (its signatures are checked with the rest of the round's by
//! [`Protocol::authenticate`](crate::protocol::Protocol::authenticate)).

use serde::{Deserialize, Serialize};

use crate::types::NodeId;

use super::message::{Signed, Statement};

/// What a replica does about a replica proven Byzantine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum PunishmentPolicy {
    /// Drop the offender's messages, never count it toward a quorum again, and replace it at
    /// once if it is the primary.
    #[default]
    Exclude,
    /// Keep and share the evidence, tell the application; change nothing else.
    Report,
}

/// A provable offence.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Evidence {
    /// Two different signed statements of one kind from one replica for one (view, sequence
    /// number): an equivocating primary (two PRE-PREPAREs) or a double vote (two PREPAREs or two
    /// COMMITs).
    Conflicting {
        /// One statement.
        first: Signed,
        /// The other, for another digest.
        second: Signed,
    },
    /// A signed NEW-VIEW whose re-proposals do not follow from the VIEW-CHANGEs it carries (or
    /// that carries too few valid ones).
    UnjustifiedNewView {
        /// The primary's signed [`Statement::NewView`].
        new_view: Signed,
    },
}

/// The kind of an offence, for reports and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Offence {
    /// Two PRE-PREPAREs for one slot.
    EquivocatingPrimary,
    /// Two PREPAREs or two COMMITs for one slot.
    DoubleVote,
    /// A NEW-VIEW that does not follow from its VIEW-CHANGEs.
    UnjustifiedNewView,
}

impl Offence {
    /// A stable name for logs and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Offence::EquivocatingPrimary => "equivocating_primary",
            Offence::DoubleVote => "double_vote",
            Offence::UnjustifiedNewView => "unjustified_new_view",
        }
    }
}

impl Evidence {
    /// The replica the evidence accuses: the signer of its statements.
    pub fn offender(&self) -> NodeId {
        match self {
            Evidence::Conflicting { first, .. } => first.signer,
            Evidence::UnjustifiedNewView { new_view } => new_view.signer,
        }
    }

    /// What rule it breaks.
    pub fn offence(&self) -> Offence {
        match self {
            Evidence::Conflicting { first, .. } => match first.statement {
                Statement::PrePrepare { .. } => Offence::EquivocatingPrimary,
                _ => Offence::DoubleVote,
            },
            Evidence::UnjustifiedNewView { .. } => Offence::UnjustifiedNewView,
        }
    }

    /// Every signed statement the evidence rests on, nested ones included.
    pub fn for_each_signed<'a>(&'a self, visit: &mut impl FnMut(&'a Signed)) {
        match self {
            Evidence::Conflicting { first, second } => {
                visit(first);
                visit(second);
            }
            Evidence::UnjustifiedNewView { new_view } => new_view.for_each_signed(visit),
        }
    }

    /// True when two statements conflict: one signer, one kind, one (view, sequence number),
    /// two digests. (Signatures are checked apart, in batches.)
    pub fn conflicting(first: &Signed, second: &Signed) -> bool {
        let same_kind = matches!(
            (&first.statement, &second.statement),
            (Statement::PrePrepare { .. }, Statement::PrePrepare { .. })
                | (Statement::Prepare { .. }, Statement::Prepare { .. })
                | (Statement::Commit { .. }, Statement::Commit { .. })
        );
        match (first.statement.phase(), second.statement.phase()) {
            (Some((view_a, seq_a, digest_a)), Some((view_b, seq_b, digest_b))) => {
                same_kind
                    && first.signer == second.signer
                    && view_a == view_b
                    && seq_a == seq_b
                    && digest_a != digest_b
            }
            _ => false,
        }
    }
}
