//! The driver's spans of elections and leader changes (see [`crate::telemetry`]).
//!
//! - `consensus.election`: from the moment this node knows no leader until it learns one
//!   (`consensus.term` and `consensus.leader` are recorded at the end);
//! - `consensus.pre_vote` and `consensus.vote`, children of the election: each round this node
//!   runs itself, from its start until its next round starts or a leader is learned;
//! - `consensus.leader_change`: one per leader learned.
//!
//! Under PBFT a leader change is a view change, its term the view; PBFT runs no rounds. These
//! spans are kept whatever the sampling ratio: they are rare, and what an operator looks for.

use tracing::Span;

use crate::protocol::ElectionRound;
use crate::types::{NodeId, Term};

/// The election under way on one node, if any.
#[derive(Default)]
pub(crate) struct ElectionTraces {
    /// Boxed: the driver holds this beside its hot fields, and elections are rare.
    current: Option<Box<Election>>,
}

struct Election {
    span: Span,
    /// The round this node runs now, a child of `span`.
    round: Option<Span>,
}

impl ElectionTraces {
    /// The node learned of a new leader (`Some`), or lost track of the old one (`None`).
    pub(crate) fn leader_changed(&mut self, node: NodeId, term: Term, leader: Option<NodeId>) {
        let Some(leader) = leader else {
            self.election(node, term);
            return;
        };
        if let Some(election) = self.current.take() {
            let Election { span, round } = *election;
            drop(round); // a round closes before the election that holds it
            span.record("consensus.term", term);
            span.record("consensus.leader", tracing::field::display(leader));
        }
        let _change = tracing::info_span!(
            target: "consensus::trace",
            "consensus.leader_change",
            consensus.node = %node,
            consensus.term = term,
            consensus.leader = %leader,
            consensus.is_leader = leader == node,
        );
    }

    /// The node began a round of an election. (A node that starts with no leader has no
    /// election span until its first round, which opens one.)
    pub(crate) fn round(&mut self, node: NodeId, round: ElectionRound, term: Term) {
        let election = self.election(node, term);
        election.round = None; // the previous round ends before this one begins
        let parent = &election.span;
        election.round = Some(match round {
            ElectionRound::PreVote => tracing::info_span!(
                target: "consensus::trace",
                parent: parent,
                "consensus.pre_vote",
                consensus.node = %node,
                consensus.term = term,
            ),
            ElectionRound::Vote => tracing::info_span!(
                target: "consensus::trace",
                parent: parent,
                "consensus.vote",
                consensus.node = %node,
                consensus.term = term,
            ),
        });
    }

    /// The election under way, opened if there is none.
    fn election(&mut self, node: NodeId, term: Term) -> &mut Election {
        self.current.get_or_insert_with(|| {
            Box::new(Election {
                span: tracing::info_span!(
                    target: "consensus::trace",
                    "consensus.election",
                    consensus.node = %node,
                    consensus.term = term,
                    consensus.leader = tracing::field::Empty,
                ),
                round: None,
            })
        })
    }
}
