//! Who votes and who only listens: the members of a replicated group, and how a quorum is
//! counted while the voters change (joint consensus, Raft thesis §4.3).
//!
//! A membership is carried by a log entry ([`Payload::Membership`](crate::types::Payload)) and
//! takes effect on each node as soon as the entry is in its log, committed or not (thesis §4.1):
//! that is what makes two leaders of one term impossible across a change. A change of voters
//! goes through a *joint* membership, in which both the old and the new voters must agree, then
//! the new voters alone; learners receive the log and snapshots but never count toward a
//! quorum.
//!
//! A membership also carries the peer addresses of the members added while the group ran
//! ([`Membership::addresses`]), so that every member, and every later snapshot, can reach them;
//! the members a node started with are reached through its own configuration. For GPU-optimized
//! Raft, whose members sign what they promise, it also carries every member's public key
//! ([`Membership::keys`]), so that a node that joins later checks signatures with nothing but
//! the log.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::types::NodeId;

/// The members of a group as of one log entry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Membership {
    /// The voters: a majority of them must agree to elect a leader or to commit an entry.
    pub voters: BTreeSet<NodeId>,
    /// While a change of voters is under way (a joint membership), the voters before it, of
    /// whom a majority must agree as well; empty otherwise.
    pub outgoing: BTreeSet<NodeId>,
    /// Members that receive the log but neither vote nor count toward any quorum. Never a
    /// voter at the same time.
    pub learners: BTreeSet<NodeId>,
    /// Peer addresses of members added while the group ran, as `name@host:port` (the form of
    /// `bootstrap_peers`): each member dials them when the membership takes effect. A member
    /// without one here is reached through the configuration it started with.
    pub addresses: BTreeMap<NodeId, String>,
    /// The ed25519 public keys of the members, for the algorithms whose members sign
    /// (GPU-optimized Raft: every member's, carried from one membership to the next); empty
    /// for Raft. A member's signatures are checked against the key of the membership they were
    /// counted under.
    pub keys: BTreeMap<NodeId, [u8; 32]>,
}

impl Membership {
    /// A membership of `voters` alone.
    pub fn of_voters(voters: impl IntoIterator<Item = NodeId>) -> Self {
        Membership {
            voters: voters.into_iter().collect(),
            ..Membership::default()
        }
    }

    /// True while a change of voters is half done: both the voters and the outgoing voters
    /// must agree.
    pub fn is_joint(&self) -> bool {
        !self.outgoing.is_empty()
    }

    /// True if `id` votes: it is a voter, or an outgoing voter of a joint membership.
    pub fn is_voter(&self, id: NodeId) -> bool {
        self.voters.contains(&id) || self.outgoing.contains(&id)
    }

    /// True if `id` is a learner.
    pub fn is_learner(&self, id: NodeId) -> bool {
        self.learners.contains(&id) && !self.is_voter(id)
    }

    /// True if `id` is a member of any kind.
    pub fn contains(&self, id: NodeId) -> bool {
        self.is_voter(id) || self.learners.contains(&id)
    }

    /// Every member that votes (both voter sets of a joint membership), in id order.
    pub fn all_voters(&self) -> BTreeSet<NodeId> {
        self.voters.union(&self.outgoing).copied().collect()
    }

    /// Every member, voting or not, in id order.
    pub fn all_members(&self) -> BTreeSet<NodeId> {
        let mut members = self.all_voters();
        members.extend(self.learners.iter().copied());
        members
    }

    /// The highest value that a majority of the voters reach, and of the outgoing voters too
    /// when the membership is joint (the lower of the two): given each voter's match index it
    /// is the index a quorum stores. No voters reach nothing (0).
    pub fn quorum_value(&self, value: impl Fn(NodeId) -> u64) -> u64 {
        let majority_of = |set: &BTreeSet<NodeId>| {
            let mut values: Vec<u64> = set.iter().map(|&id| value(id)).collect();
            values.sort_unstable_by(|a, b| b.cmp(a));
            values.get(set.len() / 2).copied().unwrap_or(0)
        };
        let incoming = majority_of(&self.voters);
        if self.is_joint() {
            incoming.min(majority_of(&self.outgoing))
        } else {
            incoming
        }
    }

    /// True if the members for which `agrees` holds are a quorum: a majority of the voters, and
    /// of the outgoing voters when the membership is joint.
    pub fn has_quorum(&self, agrees: impl Fn(NodeId) -> bool) -> bool {
        self.quorum_value(|id| u64::from(agrees(id))) >= 1
    }

    /// The smallest number of voters whose agreement is a quorum on its own, were the others
    /// silent: a majority of each voter set (the sets may overlap; this counts the larger
    /// majority, which is what "a cluster of one" or "of two" tests need).
    pub fn smallest_quorum(&self) -> usize {
        let incoming = self.voters.len() / 2 + 1;
        if self.is_joint() {
            incoming.max(self.outgoing.len() / 2 + 1)
        } else {
            incoming
        }
    }
}

impl std::fmt::Display for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = |set: &BTreeSet<NodeId>| {
            set.iter()
                .map(NodeId::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        write!(f, "voters [{}]", list(&self.voters))?;
        if self.is_joint() {
            write!(f, " joint with [{}]", list(&self.outgoing))?;
        }
        if !self.learners.is_empty() {
            write!(f, ", learners [{}]", list(&self.learners))?;
        }
        Ok(())
    }
}

/// A membership change asked of the leader.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MembershipChange {
    /// Add `id` as a learner: it receives the log (or a snapshot) and never votes. Asked again
    /// for a learner it is already done; with another address, the address is replaced.
    AddLearner {
        /// The new member.
        id: NodeId,
        /// Where members dial it (`name@host:port`), when they do not know already.
        address: Option<String>,
        /// Its ed25519 public key: required by GPU-optimized Raft, whose members sign their
        /// acknowledgements; ignored by Raft.
        key: Option<[u8; 32]>,
    },
    /// Make `voters` the whole voter set, through a joint membership: learners named are
    /// promoted, voters not named are removed, learners not named stay learners.
    ChangeVoters(BTreeSet<NodeId>),
}

impl MembershipChange {
    /// Adds `id` as a learner that the transport already reaches (no address).
    pub fn learner(id: NodeId) -> Self {
        MembershipChange::AddLearner {
            id,
            address: None,
            key: None,
        }
    }
}

/// Why a membership change was refused. A refused change appended nothing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum MembershipError {
    /// Only the leader changes the membership.
    #[error("not the leader; the leader is {leader:?}")]
    NotLeader {
        /// The leader this node knows of, if any.
        leader: Option<NodeId>,
    },
    /// A change is still in flight (a joint membership, or a membership entry not yet
    /// committed); one change at a time.
    #[error("another membership change is in flight: {pending}")]
    ChangeInProgress {
        /// The membership not yet final.
        pending: Box<Membership>,
    },
    /// A group needs at least one voter.
    #[error("the new voter set is empty")]
    NoVoters,
    /// A new voter must first join as a learner and catch up.
    #[error("{0} is neither a voter nor a learner: add it as a learner first")]
    UnknownNode(NodeId),
    /// The learner to promote is still catching up: promoting it now would stall commits.
    #[error("learner {id} has stored through {matched}, the leader's commit is {commit}")]
    LearnerBehind {
        /// The learner.
        id: NodeId,
        /// The last index it is known to store.
        matched: u64,
        /// The leader's commit index.
        commit: u64,
    },
    /// A majority of the new voters has not been heard from lately: the group would stop.
    #[error("no quorum of the new voters is reachable (heard lately: {reachable:?})")]
    NoReachableQuorum {
        /// The new voters the leader heard from lately (itself included).
        reachable: Vec<NodeId>,
    },
    /// The node to add as a learner already votes.
    #[error("{0} is already a voter")]
    AlreadyVoter(NodeId),
    /// This protocol keeps the members it started with.
    #[error("this protocol does not change its membership: {0}")]
    Unsupported(String),
    /// GPU-optimized Raft checks every member's signatures: a learner is added with its
    /// public key.
    #[error("{0} needs its public key to be added: its acknowledgements are signed")]
    MissingKey(NodeId),
    /// The public key given for a learner is no ed25519 point, or a small-order one, under
    /// which a forger can make signatures that verify for almost any message.
    #[error("{0}'s public key is not a usable ed25519 key (no curve point, or a small-order one)")]
    WeakKey(NodeId),
    /// A member's address is not `name@host:port` with a port.
    #[error("bad member address {address:?}: {reason}")]
    BadAddress {
        /// The address given.
        address: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl MembershipError {
    /// True when the change cannot be made as asked (an empty or unknown voter set, a voter
    /// added as a learner, a bad address, a protocol that keeps its members), as opposed to one
    /// refused for the group's state at the time (another change in flight, a learner behind,
    /// no quorum reachable, no leader), which may succeed later.
    pub fn is_bad_request(&self) -> bool {
        matches!(
            self,
            MembershipError::NoVoters
                | MembershipError::UnknownNode(_)
                | MembershipError::AlreadyVoter(_)
                | MembershipError::Unsupported(_)
                | MembershipError::BadAddress { .. }
                | MembershipError::MissingKey(_)
                | MembershipError::WeakKey(_)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(list: &[u64]) -> BTreeSet<NodeId> {
        list.iter().copied().map(NodeId).collect()
    }

    #[test]
    fn a_quorum_is_a_majority_of_each_voter_set() {
        let simple = Membership::of_voters(ids(&[1, 2, 3]));
        assert!(simple.has_quorum(|id| id.0 <= 2));
        assert!(!simple.has_quorum(|id| id.0 == 1));
        let joint = Membership {
            voters: ids(&[3, 4, 5]),
            outgoing: ids(&[1, 2, 3]),
            learners: ids(&[9]),
            ..Membership::default()
        };
        // 3, 4, 5 are a majority of the new voters only.
        assert!(!joint.has_quorum(|id| id.0 >= 3));
        assert!(joint.has_quorum(|id| id.0 >= 2));
        // Learners never count.
        assert!(!joint.has_quorum(|id| id.0 == 9 || id.0 == 3));
    }

    #[test]
    fn the_quorum_value_is_the_lower_majority_of_a_joint_membership() {
        let joint = Membership {
            voters: ids(&[3, 4, 5]),
            outgoing: ids(&[1, 2, 3]),
            learners: BTreeSet::new(),
            ..Membership::default()
        };
        let matched = |id: NodeId| [0, 10, 9, 8, 2, 1][id.0 as usize];
        // New voters: 8, 2, 1 -> 2; old voters: 10, 9, 8 -> 9.
        assert_eq!(joint.quorum_value(matched), 2);
        assert_eq!(Membership::default().quorum_value(matched), 0);
        assert_eq!(joint.smallest_quorum(), 2);
    }

    #[test]
    fn roles_are_exclusive_and_displayed() {
        let joint = Membership {
            voters: ids(&[2, 3]),
            outgoing: ids(&[1, 2]),
            learners: ids(&[4]),
            ..Membership::default()
        };
        assert!(joint.is_voter(NodeId(1)) && !joint.is_learner(NodeId(1)));
        assert!(joint.is_learner(NodeId(4)) && joint.contains(NodeId(4)));
        assert!(!joint.contains(NodeId(5)));
        assert_eq!(joint.all_members(), ids(&[1, 2, 3, 4]));
        assert_eq!(
            joint.to_string(),
            "voters [n2, n3] joint with [n1, n2], learners [n4]"
        );
    }
}
