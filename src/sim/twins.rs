//! Twins: one replica run as two instances (see [`Twins`]).

use std::collections::BTreeSet;

use crate::types::NodeId;

/// Which replicas run as twins, and who hears which instance. A twinned replica (after Bano et
/// al., "Twins: BFT Systems Made Robust", and Diem's twins testing) runs as two instances of
/// honest code holding one key and one node id, each talking to its own part of the cluster.
/// Together the two instances are a Byzantine replica
/// that equivocates in every way honest code can be made to: two primaries for one view, two
/// votes for one slot, two NEW-VIEWs, all validly signed.
///
/// The simulator hosts both instances, and the network routes between them:
///
/// - every replica that is not twinned sits on one of two sides, 0 or 1;
/// - instance 0 of a twinned replica has the replica's id as its network address, instance 1
///   the address `n + k + 1` for the `k`-th twinned replica in id order (`n` the cluster size),
///   so the network's links, partitions and crashes act on each instance apart;
/// - a message for a twinned replica goes to the instance on the sender's side (a twin's
///   instance `k` is on side `k`), and a twin's instance `k` reaches only side `k`;
/// - with [`Twins::separate_sides`], replicas on different sides do not hear each other either,
///   until the cluster heals ([`Sim::heal_everything`](crate::sim::Sim::heal_everything));
///   the twins' own routing never heals.
///
/// The routing is the only difference: an instance's messages carry the replica's id as their
/// sender, like its twin's, so an honest replica can tell the two apart only by what the
/// network delivers to it. Each instance has its own store, apply stage and clients.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Twins {
    /// Replicas that run as two instances with one key.
    pub twinned: BTreeSet<NodeId>,
    /// The replicas, not twinned, on side 1; every other one is on side 0.
    pub side_one: BTreeSet<NodeId>,
    /// Replicas on different sides hear nothing from each other until the cluster heals.
    pub separate_sides: bool,
}

impl Twins {
    /// The network address of the second instance of every twinned replica, in order, for a
    /// cluster of `nodes` replicas.
    pub fn second_addresses(&self, nodes: usize) -> impl Iterator<Item = (NodeId, NodeId)> + '_ {
        self.twinned
            .iter()
            .enumerate()
            .map(move |(k, &id)| (id, NodeId((nodes + k + 1) as u64)))
    }

    /// The side of the instance at network `address` whose replica is `id` (a twin's first
    /// instance has its id as its address).
    pub(crate) fn side_of(&self, id: NodeId, address: NodeId) -> usize {
        if self.twinned.contains(&id) {
            usize::from(address != id)
        } else {
            usize::from(self.side_one.contains(&id))
        }
    }

    /// Where a message from the instance at `from_address` (replica `from`) to replica `to` goes,
    /// if anywhere, in a cluster of `nodes`; `sides_joined` once the cluster healed (separate
    /// sides hear each other from then on).
    pub(crate) fn route(
        &self,
        nodes: usize,
        from: NodeId,
        from_address: NodeId,
        to: NodeId,
        sides_joined: bool,
    ) -> Option<NodeId> {
        let side = self.side_of(from, from_address);
        if self.twinned.contains(&to) {
            return match side {
                0 => Some(to),
                _ => self
                    .second_addresses(nodes)
                    .find(|&(id, _)| id == to)
                    .map(|(_, address)| address),
            };
        }
        let same_side = self.side_of(to, to) == side;
        let from_twin = self.twinned.contains(&from);
        let sides_hear_each_other = sides_joined || !self.separate_sides;
        (same_side || (!from_twin && sides_hear_each_other)).then_some(to)
    }

    /// The settings make sense for a cluster of `nodes`: twins and sides name members, and no
    /// replica is both twinned and on a side.
    pub(crate) fn validate(&self, nodes: usize) -> Result<(), String> {
        let member = |id: &NodeId| (1..=nodes as u64).contains(&id.0);
        if let Some(id) = self
            .twinned
            .iter()
            .chain(&self.side_one)
            .find(|id| !member(id))
        {
            return Err(format!("{id} is not a member of a {nodes}-replica cluster"));
        }
        if let Some(id) = self.side_one.intersection(&self.twinned).next() {
            return Err(format!("{id} is twinned: its instances have a side each"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(separate_sides: bool) -> Twins {
        Twins {
            twinned: [NodeId(1), NodeId(2)].into(),
            side_one: [NodeId(4)].into(),
            separate_sides,
        }
    }

    #[test]
    fn each_instance_talks_to_its_own_side_only() {
        let twins = layout(true);
        // n = 4: replica 1's second instance is at 5, replica 2's at 6.
        let route = |from, address, to, joined| {
            twins.route(4, NodeId(from), NodeId(address), NodeId(to), joined)
        };
        // Side 0 (3, and the first instances) reaches the first instances.
        assert_eq!(route(3, 3, 1, false), Some(NodeId(1)));
        assert_eq!(route(1, 1, 2, false), Some(NodeId(2)));
        // Side 1 (4, and the second instances) reaches the second instances.
        assert_eq!(route(4, 4, 1, false), Some(NodeId(5)));
        assert_eq!(route(2, 6, 1, false), Some(NodeId(5)));
        // A twin's instance never reaches the other side, healed or not.
        assert_eq!(route(1, 5, 3, false), None);
        assert_eq!(route(1, 5, 3, true), None);
        assert_eq!(route(1, 1, 4, true), None);
        // Honest replicas on two sides hear each other once the cluster healed.
        assert_eq!(route(3, 3, 4, false), None);
        assert_eq!(route(3, 3, 4, true), Some(NodeId(4)));
        assert_eq!(
            layout(false).route(4, NodeId(3), NodeId(3), NodeId(4), false),
            Some(NodeId(4))
        );
    }

    #[test]
    fn settings_that_name_strangers_or_a_twin_on_a_side_are_refused() {
        assert!(layout(true).validate(4).is_ok());
        assert!(layout(true).validate(3).is_err());
        let mut twin_on_a_side = layout(true);
        twin_on_a_side.side_one.insert(NodeId(1));
        assert!(twin_on_a_side.validate(4).is_err());
    }
}
