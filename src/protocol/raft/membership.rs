//! Membership changes in the Raft core: learners, and voter changes through a joint membership
//! (Raft thesis §4.3; see [`crate::membership`]).
//!
//! Every membership entry takes effect on a node as soon as it is in its log. The leader
//! accepts one change at a time: `ChangeVoters` appends the joint membership (old and new
//! voters); once that commits the leader appends the final one (new voters alone), and a leader
//! that is not among them steps down when the final one commits. A node that sees a committed
//! membership without itself reports [`Event::Removed`] and stays quiet.

use std::collections::BTreeSet;

use crate::membership::{Membership, MembershipChange, MembershipError};
use crate::protocol::Event;
use crate::protocol::raft::node::{RaftNode, Role};
use crate::protocol::raft::progress::Progress;
use crate::protocol::raft::{Message, Output};
use crate::types::{Entry, LogIndex, NodeId, Payload};

/// The memberships a node's log holds: the one in force at `base_index` (the snapshot's, or
/// the bootstrap voters at 0) and each membership entry after it, in index order.
#[derive(Clone, Debug)]
pub(crate) struct MembershipLog {
    base_index: LogIndex,
    base: Membership,
    changes: Vec<(LogIndex, Membership)>,
}

impl MembershipLog {
    pub(crate) fn new(base_index: LogIndex, base: Membership) -> Self {
        MembershipLog {
            base_index,
            base,
            changes: Vec::new(),
        }
    }

    /// The membership in force: the last one in the log.
    pub(crate) fn latest(&self) -> &Membership {
        self.changes.last().map_or(&self.base, |(_, m)| m)
    }

    /// The index of the entry that set the latest membership (the base's index if none did).
    pub(crate) fn latest_index(&self) -> LogIndex {
        self.changes.last().map_or(self.base_index, |(i, _)| *i)
    }

    /// The membership in force at `index` (at the base for an index before it).
    pub(crate) fn at(&self, index: LogIndex) -> &Membership {
        self.changes
            .iter()
            .rev()
            .find(|(i, _)| *i <= index)
            .map_or(&self.base, |(_, m)| m)
    }

    /// Notes the membership an appended entry carries; true if it is now the one in force.
    pub(crate) fn appended(&mut self, entry: &Entry) -> bool {
        if let Payload::Membership(membership) = &entry.payload
            && entry.index > self.latest_index()
        {
            self.changes
                .push((entry.index, membership.as_ref().clone()));
            return true;
        }
        false
    }

    /// The log lost its entries from `from` on: their memberships no longer hold. True if the
    /// one in force went with them.
    pub(crate) fn truncated_from(&mut self, from: LogIndex) -> bool {
        let before = self.changes.len();
        self.changes.retain(|(index, _)| *index < from);
        self.changes.len() != before
    }

    /// A snapshot through `index` now covers the log up to there: the membership in force at
    /// `index` becomes the base.
    pub(crate) fn rebase(&mut self, index: LogIndex) {
        if index <= self.base_index {
            return;
        }
        self.base = self.at(index).clone();
        self.base_index = index;
        self.changes.retain(|(i, _)| *i > index);
    }

    /// The membership set at exactly `index`: the base's at its index, else a membership entry's
    /// (`None` when the log holds no membership entry there).
    pub(crate) fn set_at(&self, index: LogIndex) -> Option<&Membership> {
        if index == self.base_index {
            return Some(&self.base);
        }
        self.changes
            .iter()
            .find(|(i, _)| *i == index)
            .map(|(_, membership)| membership)
    }

    /// Gives the base membership (the bootstrap voters, before any entry) its members' keys.
    pub(crate) fn set_base_keys(&mut self, keys: std::collections::BTreeMap<NodeId, [u8; 32]>) {
        self.base.keys = keys;
    }

    /// The log was replaced by a snapshot through `index` that carries `membership`. True if
    /// that is not the membership in force before, set at the same index.
    pub(crate) fn reset(&mut self, index: LogIndex, membership: Membership) -> bool {
        let changed = (self.latest_index(), self.latest()) != (index, &membership);
        self.base_index = index;
        self.base = membership;
        self.changes.clear();
        changed
    }
}

impl RaftNode {
    /// The membership in force on this node (the last one in its log).
    pub fn membership(&self) -> &Membership {
        self.members.latest()
    }

    /// The index of the entry that set the membership in force (0 for the bootstrap voters).
    pub fn membership_index(&self) -> LogIndex {
        self.members.latest_index()
    }

    /// The membership an entry at exactly `index` set (the bootstrap one at 0), if this node's
    /// log holds one there.
    pub fn membership_set_at(&self, index: LogIndex) -> Option<&Membership> {
        self.members.set_at(index)
    }

    /// Makes every change keep its members' public keys: a learner is refused without one
    /// ([`MembershipError::MissingKey`]). `keys` are the bootstrap voters' (GPU-optimized Raft).
    pub(crate) fn require_member_keys(
        &mut self,
        keys: std::collections::BTreeMap<NodeId, [u8; 32]>,
    ) {
        self.member_keys_required = true;
        self.members.set_base_keys(keys);
    }

    /// True if the latest membership is committed and not joint: a new change may start.
    fn membership_settled(&self) -> bool {
        !self.membership().is_joint() && self.members.latest_index() <= self.commit_index
    }

    /// A change asked of this node: started here on the leader, forwarded to the leader a
    /// follower knows (when it forwards proposals), refused otherwise.
    pub(crate) fn change_membership_asked(&mut self, change: MembershipChange, out: &mut Output) {
        match self.leader {
            Some(leader)
                if self.role != Role::Leader
                    && leader != self.config.id
                    && self.config.forward_proposals =>
            {
                self.membership_requests += 1;
                let tag = self.membership_requests;
                let term = self.term;
                self.send(
                    leader,
                    Message::ForwardMembership { term, tag, change },
                    out,
                );
                out.events.push(Event::MembershipForwarded { tag, leader });
            }
            _ => {
                if let Err(error) = self.change_membership(change, out) {
                    out.events.push(Event::MembershipRefused { error });
                }
            }
        }
    }

    /// A follower's forwarded change: started here if this node leads, and answered either way
    /// (a node that no longer leads answers `NotLeader`, naming the leader it knows).
    pub(crate) fn handle_forwarded_membership(
        &mut self,
        from: NodeId,
        tag: u64,
        change: MembershipChange,
        out: &mut Output,
    ) {
        let result = self.change_membership(change, out).map_err(Box::new);
        let term = self.term;
        self.send(from, Message::MembershipAnswer { term, tag, result }, out);
    }

    /// Starts `change` on the leader; refuses it (appending nothing) when this node does not
    /// lead, when another change is in flight, or when the change is unsound. Returns the index
    /// of the membership entry appended.
    pub(crate) fn change_membership(
        &mut self,
        change: MembershipChange,
        out: &mut Output,
    ) -> Result<LogIndex, MembershipError> {
        if self.role != Role::Leader {
            return Err(MembershipError::NotLeader {
                leader: self.leader,
            });
        }
        if !self.membership_settled() {
            return Err(MembershipError::ChangeInProgress {
                pending: Box::new(self.membership().clone()),
            });
        }
        let current = self.membership().clone();
        let next = match change {
            MembershipChange::AddLearner { id, address, key } => {
                if current.is_voter(id) {
                    return Err(MembershipError::AlreadyVoter(id));
                }
                // Raft signs nothing: a key given to it is not kept.
                let key = key.filter(|_| self.member_keys_required);
                if self.member_keys_required && key.is_none() && !current.keys.contains_key(&id) {
                    return Err(MembershipError::MissingKey(id));
                }
                // The configuration's keys are checked when it is loaded; a key arriving here
                // (the engine's API, a join) is checked the same way before it enters the log.
                if key
                    .as_ref()
                    .is_some_and(|bytes| crate::keys::public_key_from_bytes(bytes).is_err())
                {
                    return Err(MembershipError::WeakKey(id));
                }
                let same_address =
                    address.is_none() || current.addresses.get(&id) == address.as_ref();
                let same_key = key.is_none() || current.keys.get(&id) == key.as_ref();
                if current.learners.contains(&id) && same_address && same_key {
                    // Asked again (a node retrying its join): already done.
                    return Ok(self.members.latest_index());
                }
                let mut next = current;
                next.learners.insert(id);
                if let Some(address) = address {
                    next.addresses.insert(id, address);
                }
                if let Some(key) = key {
                    next.keys.insert(id, key);
                }
                next
            }
            MembershipChange::ChangeVoters(voters) => {
                self.check_new_voters(&current, &voters)?;
                if voters == current.voters {
                    return Ok(self.members.latest_index());
                }
                let learners = current
                    .learners
                    .iter()
                    .copied()
                    .filter(|id| !voters.contains(id))
                    .collect();
                Membership {
                    voters,
                    outgoing: current.voters,
                    learners,
                    addresses: current.addresses,
                    keys: current.keys,
                }
            }
        };
        Ok(self.append_membership(next, out))
    }

    fn check_new_voters(
        &self,
        current: &Membership,
        voters: &BTreeSet<NodeId>,
    ) -> Result<(), MembershipError> {
        if voters.is_empty() {
            return Err(MembershipError::NoVoters);
        }
        if let Some(&unknown) = voters.iter().find(|&&id| !current.contains(id)) {
            return Err(MembershipError::UnknownNode(unknown));
        }
        let commit = self.commit_index;
        let slack = self.config.max_entries_per_append as u64;
        for &id in voters.iter().filter(|&&id| current.is_learner(id)) {
            let matched = self.progress(id).map_or(0, |p| p.match_index);
            if matched + slack < commit {
                return Err(MembershipError::LearnerBehind {
                    id,
                    matched,
                    commit,
                });
            }
        }
        let me = self.config.id;
        let heard = |id: NodeId| id == me || self.progress(id).is_some_and(|p| p.heard_lately());
        let incoming = Membership::of_voters(voters.iter().copied());
        if !incoming.has_quorum(heard) {
            return Err(MembershipError::NoReachableQuorum {
                reachable: voters.iter().copied().filter(|&id| heard(id)).collect(),
            });
        }
        Ok(())
    }

    /// Appends `membership` as the leader's next entry; it takes effect at once.
    fn append_membership(&mut self, membership: Membership, out: &mut Output) -> LogIndex {
        self.flush_proposals(out);
        let index = self.log.last_index() + 1;
        let entry = Entry {
            term: self.term,
            index,
            payload: Payload::Membership(Box::new(membership)),
        };
        self.append_to_own_log(vec![entry], out);
        index
    }

    /// The latest membership changed (appended here or truncated away): a leader starts or
    /// stops replicating to the members that came or went, and reports it.
    pub(crate) fn membership_changed(&mut self, out: &mut Output) {
        let membership = self.membership().clone();
        out.events.push(Event::MembershipChanged {
            index: self.members.latest_index(),
            membership: membership.clone(),
            committed: self.members.latest_index() <= self.commit_index,
        });
        if membership.contains(self.config.id) {
            self.removed = false; // added back
        }
        let last_index = self.log.last_index();
        let max_inflight = self.config.max_inflight_appends;
        let removing = self.removed_awaiting_commit();
        let replicas: Vec<NodeId> = self.replicas().collect();
        let Some(state) = self.leader_state.as_mut() else {
            return;
        };
        state
            .progress
            .retain(|id, _| membership.contains(*id) || removing.contains(id));
        for id in replicas {
            state
                .progress
                .entry(id)
                .or_insert_with(|| Progress::new(last_index, max_inflight));
        }
        if matches!(state.transfer, Some((to, _)) if !membership.is_voter(to)) {
            state.transfer = None;
        }
    }

    /// Members that the latest, uncommitted membership drops and the one before had: the
    /// leader keeps replicating to them until the change commits, so that they learn of it.
    fn removed_awaiting_commit(&self) -> BTreeSet<NodeId> {
        let latest_index = self.members.latest_index();
        if latest_index <= self.commit_index {
            return BTreeSet::new();
        }
        let before = self.members.at(latest_index - 1);
        let latest = self.membership();
        before
            .all_members()
            .into_iter()
            .filter(|id| !latest.contains(*id))
            .collect()
    }

    /// The commit index moved: a leader completes a committed joint membership with the final
    /// one, stops replicating to the members it dropped, and steps down if it is not a voter;
    /// any node finding itself outside a committed membership reports that it was removed.
    pub(crate) fn membership_committed(&mut self, before: LogIndex, out: &mut Output) {
        let latest_index = self.members.latest_index();
        let newly_committed = latest_index > before;
        let completes_joint = self.role == Role::Leader && self.membership().is_joint();
        // Checked before anything is cloned: this runs on every commit.
        if latest_index > self.commit_index || !(newly_committed || completes_joint) {
            return;
        }
        let membership = self.membership().clone();
        if newly_committed {
            out.events.push(Event::MembershipChanged {
                index: latest_index,
                membership: membership.clone(),
                committed: true,
            });
        }
        if self.role == Role::Leader && membership.is_joint() {
            // Also when the joint membership committed under an earlier leader, which fell
            // before appending the final one: a new leader completes the change.
            let mut last = Membership {
                outgoing: BTreeSet::new(),
                ..membership
            };
            let kept = last.all_members();
            last.addresses.retain(|id, _| kept.contains(id));
            last.keys.retain(|id, _| kept.contains(id));
            self.append_membership(last, out);
            return;
        }
        if !newly_committed {
            return;
        }
        let me = self.config.id;
        if self.role == Role::Leader {
            // Tell the members just removed that their removal committed (best effort: a
            // removed member that misses it stays a non-voter of the joint membership's
            // successor in its log, or campaigns in vain: voters ignore strangers' votes).
            let (term, commit) = (self.term, self.commit_index);
            let commit_term = self.log.term_at(commit).unwrap_or(term);
            let removed: Vec<NodeId> = self
                .leader_state
                .as_ref()
                .map(|state| {
                    state
                        .progress
                        .keys()
                        .copied()
                        .filter(|id| !membership.contains(*id))
                        .collect()
                })
                .unwrap_or_default();
            for id in removed {
                self.send(
                    id,
                    Message::Commit {
                        term,
                        commit,
                        commit_term,
                    },
                    out,
                );
                if let Some(state) = self.leader_state.as_mut() {
                    state.progress.remove(&id);
                }
            }
            if !membership.is_voter(me) {
                self.step_down_removed(out);
            }
        }
        if !membership.contains(me) && !self.removed {
            self.removed = true;
            out.events.push(Event::Removed {
                index: latest_index,
            });
        }
    }

    /// A leader outside the voters it just committed steps down, first telling a live voter
    /// whose log matches its own to campaign at once (else the voters elect one after an
    /// election timeout).
    fn step_down_removed(&mut self, out: &mut Output) {
        let last_index = self.log.last_index();
        let membership = self.membership().clone();
        let successor = self.leader_state.as_ref().and_then(|state| {
            state
                .progress
                .iter()
                .filter(|(id, p)| {
                    membership.is_voter(**id) && p.recently_active && p.match_index == last_index
                })
                .map(|(&id, _)| (self.config.priority_of(id), std::cmp::Reverse(id)))
                .max()
                .map(|(_, std::cmp::Reverse(id))| id)
        });
        let term = self.term;
        if let Some(successor) = successor {
            self.forfeit_lease();
            self.send(successor, Message::TimeoutNow { term }, out);
        }
        self.become_follower(term, None, out);
    }
}

#[cfg(test)]
mod tests;
