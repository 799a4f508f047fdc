//! The callers of membership changes waiting on the driver: changes started on this node (the
//! leader), and changes this follower forwarded to its leader.
//!
//! A caller is answered once a final (not joint) membership at or past the entry its change
//! appended commits here, so a change of voters answers after both of its entries. A leader
//! that loses its leadership answers its own callers `NotLeader` (the change may still commit,
//! but this node can no longer tell); a forwarded change waits on, since the follower learns
//! the commit from whichever leader comes next, or its caller's deadline passes.

use std::collections::HashMap;

use tokio::sync::oneshot;

use crate::engine::driver::MembershipAnswer;
use crate::membership::{Membership, MembershipError};
use crate::types::{LogIndex, NodeId};

type Reply = oneshot::Sender<MembershipAnswer>;

#[derive(Default)]
pub(crate) struct MembershipCalls {
    /// Changes started here, each with the index of the entry it appended.
    own: Vec<(LogIndex, Reply)>,
    /// Changes forwarded to the leader and not answered yet, by request tag.
    forwarded: HashMap<u64, Reply>,
    /// Forwarded changes the leader accepted, each with the index of the entry it appended.
    accepted: Vec<(LogIndex, Reply)>,
    /// The index of the latest final membership committed here, and that membership.
    settled: Option<(LogIndex, Membership)>,
}

impl MembershipCalls {
    /// A change started on this node appended its entry at `index`.
    pub(crate) fn started(&mut self, index: LogIndex, reply: Reply) {
        self.own.push((index, reply));
    }

    /// A change went to the leader as request `tag`.
    pub(crate) fn forwarded(&mut self, tag: u64, reply: Reply) {
        self.forwarded.insert(tag, reply);
    }

    /// The leader answered request `tag`.
    pub(crate) fn answered(&mut self, tag: u64, result: Result<LogIndex, MembershipError>) {
        let Some(reply) = self.forwarded.remove(&tag) else {
            return; // answered twice, or its caller gave up
        };
        match (result, &self.settled) {
            (Err(error), _) => {
                let _ = reply.send(Err(error));
            }
            // Already committed here (a change asked again that the leader found done).
            (Ok(index), Some((settled, membership))) if index <= *settled => {
                let _ = reply.send(Ok(membership.clone()));
            }
            (Ok(index), _) => self.accepted.push((index, reply)),
        }
    }

    /// The membership in force changed on this node; a committed final one answers every
    /// caller whose entry it covers.
    pub(crate) fn changed(&mut self, index: LogIndex, membership: &Membership, committed: bool) {
        if !committed || membership.is_joint() {
            return;
        }
        if self.settled.as_ref().is_none_or(|(at, _)| *at <= index) {
            self.settled = Some((index, membership.clone()));
        }
        for waiting in [&mut self.own, &mut self.accepted] {
            let (done, still): (Vec<_>, Vec<_>) = std::mem::take(waiting)
                .into_iter()
                .partition(|(at, _)| *at <= index);
            *waiting = still;
            for (_, reply) in done {
                let _ = reply.send(Ok(membership.clone()));
            }
        }
    }

    /// This node no longer leads (`leader` does, if known): its own callers cannot learn the
    /// outcome here any more.
    pub(crate) fn leadership_lost(&mut self, leader: Option<NodeId>) {
        for (_, reply) in self.own.drain(..) {
            let _ = reply.send(Err(MembershipError::NotLeader { leader }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settled(voters: &[u64]) -> Membership {
        Membership::of_voters(voters.iter().copied().map(NodeId))
    }

    #[test]
    fn a_forwarded_change_answers_on_the_commit_of_its_entry_or_at_once_if_past() {
        let mut calls = MembershipCalls::default();
        let (first, mut first_answer) = oneshot::channel();
        calls.forwarded(1, first);
        calls.answered(1, Ok(7));
        calls.changed(6, &settled(&[1, 2, 3]), true);
        assert!(first_answer.try_recv().is_err(), "index 6 does not cover 7");
        let mut joint = settled(&[1, 2, 4]);
        joint.outgoing = [1, 2, 3].map(NodeId).into();
        calls.changed(7, &joint, true);
        assert!(
            first_answer.try_recv().is_err(),
            "a joint membership is not final"
        );
        calls.changed(8, &settled(&[1, 2, 4]), true);
        assert_eq!(first_answer.try_recv().unwrap(), Ok(settled(&[1, 2, 4])));

        // The leader found it done at an index this node has already seen commit.
        let (second, mut second_answer) = oneshot::channel();
        calls.forwarded(2, second);
        calls.answered(2, Ok(5));
        assert_eq!(second_answer.try_recv().unwrap(), Ok(settled(&[1, 2, 4])));

        let (third, mut third_answer) = oneshot::channel();
        calls.forwarded(3, third);
        calls.answered(3, Err(MembershipError::NoVoters));
        assert_eq!(
            third_answer.try_recv().unwrap(),
            Err(MembershipError::NoVoters)
        );
    }

    #[test]
    fn losing_leadership_answers_own_changes_only() {
        let mut calls = MembershipCalls::default();
        let (own, mut own_answer) = oneshot::channel();
        calls.started(4, own);
        let (forwarded, mut forwarded_answer) = oneshot::channel();
        calls.forwarded(1, forwarded);
        calls.answered(1, Ok(4));
        calls.leadership_lost(Some(NodeId(2)));
        assert_eq!(
            own_answer.try_recv().unwrap(),
            Err(MembershipError::NotLeader {
                leader: Some(NodeId(2))
            })
        );
        assert!(forwarded_answer.try_recv().is_err());
        calls.changed(4, &settled(&[1, 2]), true);
        assert_eq!(forwarded_answer.try_recv().unwrap(), Ok(settled(&[1, 2])));
    }
}
