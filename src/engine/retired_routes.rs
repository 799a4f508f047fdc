//! Forgetting the transport's routes to members removed from the group.
//!
//! A dialing transport (TCP) reaches every member it was told of and redials one that stops
//! answering, for as long as it runs. A member removed by a committed membership is dropped
//! from the transport, but only after a grace period: until it hears of its removal (the
//! entry committing, or the "removed" refusal its next vote request draws) it still needs
//! this node's answers to learn it should stop.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::membership::Membership;
use crate::types::NodeId;

/// The grace period, in election timeouts: a removed member campaigns within one or two of
/// them and is told it was removed; the rest is margin for a slow or restarting node.
pub(crate) const GRACE_ELECTION_TIMEOUTS: u32 = 20;

/// The members this node has known, and those whose routes go once their grace ran out.
#[derive(Debug)]
pub(crate) struct RetiredRoutes {
    /// This node (never retired).
    own: NodeId,
    /// Every member of a membership seen here, less those already retired.
    known: BTreeSet<NodeId>,
    /// Removed members, and when their routes go.
    due: BTreeMap<NodeId, Instant>,
    grace: Duration,
}

impl RetiredRoutes {
    /// For node `own`, whose membership at start (if its core changes members) is `start`.
    pub(crate) fn new(own: NodeId, start: Option<&Membership>, grace: Duration) -> Self {
        RetiredRoutes {
            own,
            known: start.map(Membership::all_members).unwrap_or_default(),
            due: BTreeMap::new(),
            grace,
        }
    }

    /// `membership` came into force at `now`; `committed` once its entry is committed. Members
    /// it leaves out are retired `grace` after a committed one did; one that is back keeps its
    /// route.
    pub(crate) fn changed(&mut self, membership: &Membership, committed: bool, now: Instant) {
        let members = membership.all_members();
        self.due.retain(|id, _| !members.contains(id));
        if committed {
            for &id in self.known.difference(&members) {
                if id != self.own {
                    self.due.entry(id).or_insert(now + self.grace);
                }
            }
        }
        self.known.extend(members);
    }

    /// The members whose routes go now, each once.
    pub(crate) fn take_due(&mut self, now: Instant) -> Vec<NodeId> {
        if self.due.is_empty() {
            return Vec::new();
        }
        let gone: Vec<NodeId> = self
            .due
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(&id, _)| id)
            .collect();
        for id in &gone {
            self.due.remove(id);
            self.known.remove(id);
        }
        gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn membership(voters: &[u64], learners: &[u64]) -> Membership {
        let mut membership =
            Membership::of_voters(voters.iter().copied().map(NodeId).collect::<BTreeSet<_>>());
        membership.learners = learners.iter().copied().map(NodeId).collect();
        membership
    }

    #[test]
    fn a_member_removed_by_a_committed_membership_is_retired_after_the_grace() {
        let grace = Duration::from_secs(10);
        let start = Instant::now();
        let mut routes = RetiredRoutes::new(NodeId(1), Some(&membership(&[1, 2, 3], &[])), grace);
        // Appended, not committed: nothing is due yet.
        routes.changed(&membership(&[1, 2], &[]), false, start);
        assert!(routes.take_due(start + 2 * grace).is_empty());
        routes.changed(&membership(&[1, 2], &[]), true, start);
        assert!(
            routes.take_due(start + grace / 2).is_empty(),
            "within the grace"
        );
        assert_eq!(routes.take_due(start + grace), vec![NodeId(3)]);
        assert!(routes.take_due(start + 3 * grace).is_empty(), "each once");
    }

    #[test]
    fn a_member_added_back_in_the_grace_keeps_its_route_and_this_node_is_never_retired() {
        let grace = Duration::from_secs(10);
        let start = Instant::now();
        let mut routes = RetiredRoutes::new(NodeId(1), Some(&membership(&[1, 2, 3], &[])), grace);
        routes.changed(&membership(&[2, 3], &[]), true, start);
        routes.changed(&membership(&[2], &[3]), true, start);
        assert_eq!(
            routes.take_due(start + grace),
            Vec::<NodeId>::new(),
            "3 is a learner again; 1 (this node) stays"
        );
        routes.changed(&membership(&[2], &[]), true, start + grace);
        assert_eq!(routes.take_due(start + 2 * grace), vec![NodeId(3)]);
    }
}
