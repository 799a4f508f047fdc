//! What the simulator needs of a core beyond [`Protocol`]: how to start a node, which messages
//! carry proposals, and the core's own invariants.

use crate::error::ConfigError;
use crate::protocol::gpu_raft::{GpuRaftConfig, GpuRaftNode, Message as GpuRaftMessage};
use crate::protocol::pbft::{
    Control as PbftControl, Message as PbftMessage, PbftConfig, PbftNode, test_signing_key,
    test_validators,
};
use crate::protocol::raft::{Control, Message, RaftConfig, RaftNode};
use crate::protocol::{Envelope, Protocol};
use crate::sim::invariants::{SafetyMonitor, Violation, check_log_matching};
use crate::sim::mix;
use crate::storage::RecoveredState;
use crate::types::NodeId;

/// A core the simulator can run. The shared invariants (one leader per term, state-machine
/// safety, linearizability) hold for every core; the ones here are the core's own.
pub trait SimProtocol: Protocol + Sized {
    /// The core's settings, shared by every node (per-node fields are filled in by
    /// [`SimProtocol::start`]).
    type Settings: Clone + std::fmt::Debug;

    /// Starts node `id` of `members` from what its store recovered, with randomness from `seed`.
    fn start(
        settings: &Self::Settings,
        id: NodeId,
        members: Vec<NodeId>,
        seed: u64,
        recovered: RecoveredState,
    ) -> Result<Self, ConfigError>;

    /// True for a message that hands the receiver client proposals (the simulator sometimes
    /// flushes the receiver's batch right after, as the engine does when its queue drains).
    fn carries_proposals(message: &Self::Message) -> bool;

    /// The operator request that hands leadership to `to`, if the core has one (the fault
    /// injector uses it).
    fn transfer_to(to: NodeId) -> Option<Self::Control>;

    /// Checked the first time `node` is seen leading its term, against what was applied so far.
    fn check_new_leader(node: &Self, monitor: &SafetyMonitor) -> Result<(), Violation>;

    /// The pairwise checks over every live node, run every 100 ms of simulated time.
    fn check_all(nodes: &[&Self], monitor: &SafetyMonitor) -> Result<(), Violation>;

    /// False for a deliberately Byzantine node: the liveness check does not wait for it to
    /// catch up (honest replicas may rightly refuse to help it), and what it applies is not
    /// held to state-machine safety.
    fn is_honest(&self) -> bool {
        true
    }

    /// Called with each message of this node as the simulator hands it to the network (what a
    /// crash discarded, or the twins' routing held back, never left).
    fn sent(&mut self, envelope: &Envelope<Self::Message>) {
        let _ = envelope;
    }

    /// What client `client` hands a node for the command `data` (the core's framing, a client
    /// signature). The command itself by default.
    fn client_command(data: &bytes::Bytes, client: usize) -> bytes::Bytes {
        let _ = client;
        data.clone()
    }

    /// What an adversary on the network (holding no member's key) could make of `envelope`:
    /// a copy with a field or signature changed, or claiming another sender. `entropy` picks
    /// which. None for a core that trusts its transport (the default), whose messages anyone
    /// on the network could forge at will.
    fn forge(envelope: &Envelope<Self::Message>, entropy: u64) -> Option<Envelope<Self::Message>> {
        let _ = (envelope, entropy);
        None
    }

    /// A membership change for this leader, picked with `entropy` among `nodes` (every node
    /// the simulation runs, spares included). None for a core whose members are fixed (the
    /// default).
    fn change_members(&self, nodes: &[NodeId], entropy: u64) -> Option<Self::Control> {
        let _ = (nodes, entropy);
        None
    }

    /// Checked on the leader once the healed cluster settled (its probe committed and applied
    /// everywhere): nothing the core started may be left half done.
    fn check_settled(&self) -> Result<(), Violation> {
        Ok(())
    }

    /// What the node's state looks like, for a failure report (beyond its [`Status`]).
    ///
    /// [`Status`]: crate::protocol::Status
    fn describe(&self) -> String {
        String::new()
    }

    /// The nodes that must catch up by the end of a run, as this leader sees the membership;
    /// None for a core whose members are fixed (then every node must).
    fn members(&self) -> Option<std::collections::BTreeSet<NodeId>> {
        None
    }

    /// Checked when this leader's commit index moved from `before`: the new commit is backed
    /// by a quorum. `nodes` are every node's id with its core (None while crashed).
    fn check_commit(
        &self,
        before: crate::types::LogIndex,
        nodes: &[(NodeId, Option<&Self>)],
    ) -> Result<(), Violation> {
        let _ = (before, nodes);
        Ok(())
    }
}

impl SimProtocol for RaftNode {
    type Settings = RaftConfig;

    fn start(
        settings: &RaftConfig,
        id: NodeId,
        members: Vec<NodeId>,
        seed: u64,
        recovered: RecoveredState,
    ) -> Result<Self, ConfigError> {
        let mut config = settings.clone();
        config.id = id;
        config.voters = members;
        config.seed = seed;
        RaftNode::new(config, recovered)
    }

    fn carries_proposals(message: &Message) -> bool {
        matches!(message, Message::ForwardProposals { .. })
    }

    fn transfer_to(to: NodeId) -> Option<Control> {
        Some(Control::TransferLeadership { to })
    }

    /// Leader completeness: every entry seen committed in an earlier term is in the new
    /// leader's log (a leader's log only grows during its term, so once suffices).
    fn check_new_leader(node: &Self, monitor: &SafetyMonitor) -> Result<(), Violation> {
        check_leader_completeness(node, monitor)
    }

    fn check_all(nodes: &[&Self], monitor: &SafetyMonitor) -> Result<(), Violation> {
        let logs: Vec<_> = nodes.iter().map(|n| (n.id(), n.log())).collect();
        check_log_matching(&logs)?;
        for node in nodes {
            check_leader_completeness(node, monitor)?;
        }
        Ok(())
    }

    /// Adds a random non-member as a learner (half the time, when there is one), or makes a
    /// random non-empty subset of the members the voters: promotions, removals, both, or a
    /// change to the same voters.
    fn change_members(&self, nodes: &[NodeId], entropy: u64) -> Option<Control> {
        use crate::protocol::raft::MembershipChange;
        let membership = self.membership();
        let outsiders: Vec<NodeId> = nodes
            .iter()
            .copied()
            .filter(|&id| !membership.contains(id))
            .collect();
        if !outsiders.is_empty() && entropy & 1 == 0 {
            let id = outsiders[(entropy >> 1) as usize % outsiders.len()];
            return Some(Control::ChangeMembership(MembershipChange::AddLearner {
                id,
                address: None,
                key: None,
            }));
        }
        let members: Vec<NodeId> = membership.all_members().into_iter().collect();
        let mut bits = mix(entropy, 0x6d);
        let mut voters: std::collections::BTreeSet<NodeId> = members
            .iter()
            .copied()
            .filter(|_| {
                bits = bits.rotate_right(1);
                bits & 1 == 1
            })
            .collect();
        if voters.is_empty() {
            voters.insert(members[(entropy >> 8) as usize % members.len()]);
        }
        Some(Control::ChangeMembership(MembershipChange::ChangeVoters(
            voters,
        )))
    }

    fn members(&self) -> Option<std::collections::BTreeSet<NodeId>> {
        Some(self.membership().all_members())
    }

    fn describe(&self) -> String {
        format!("{:?}, {}", self.role(), self.membership())
    }

    /// A joint membership is completed by the leader that sees it committed, whichever leader
    /// appended it: one left joint would refuse every later change.
    fn check_settled(&self) -> Result<(), Violation> {
        if self.membership().is_joint() {
            return Err(Violation::Liveness {
                detail: format!(
                    "leader {} still in the joint membership {} after the cluster settled",
                    self.id(),
                    self.membership()
                ),
            });
        }
        Ok(())
    }

    /// Learners never count: the leader's new commit index is stored by a majority of its
    /// voters (of both sets in a joint membership). A crashed voter's log is out of sight and
    /// counted as holding it, and so is an entry a voter compacted into its snapshot (a stale
    /// leader can learn late of what the group committed long since: chaos seed 2029166), so
    /// this can only miss a violation, never invent one; what snapshots hold is checked by the
    /// state-machine safety checks.
    fn check_commit(
        &self,
        before: crate::types::LogIndex,
        nodes: &[(NodeId, Option<&Self>)],
    ) -> Result<(), Violation> {
        let commit = self.commit_index();
        if commit <= before {
            return Ok(());
        }
        let Some(term) = self.log().term_at(commit) else {
            return Ok(()); // compacted at once: the snapshot's own checks cover it
        };
        let me = self.id();
        let holds = |id: NodeId| {
            id == me && self.durable_index() >= commit
                || nodes.iter().any(|(node, core)| {
                    *node == id
                        && core.is_none_or(|core| {
                            core.log().first_index() > commit
                                || core.log().term_at(commit) == Some(term)
                                    && core.durable_index() >= commit
                        })
                })
        };
        if self.membership().has_quorum(holds) {
            return Ok(());
        }
        Err(Violation::CommitWithoutQuorum {
            leader: me,
            index: commit,
            membership: self.membership().to_string(),
        })
    }
}

impl SimProtocol for GpuRaftNode {
    type Settings = GpuRaftConfig;

    /// Every node's key is [`test_signing_key`] of its id; a voter is configured with all the
    /// voters' keys, a spare with its own alone (it learns the others from the memberships
    /// in the log, as a node started to join does).
    fn start(
        settings: &GpuRaftConfig,
        id: NodeId,
        members: Vec<NodeId>,
        seed: u64,
        recovered: RecoveredState,
    ) -> Result<Self, ConfigError> {
        let mut config = settings.clone();
        config.raft.id = id;
        config.raft.seed = seed;
        let mut known = members.clone();
        if !known.contains(&id) {
            known.push(id);
        }
        config.validators = test_validators(&known);
        config.raft.voters = members;
        config.signing_key = test_signing_key(id);
        GpuRaftNode::new(config, recovered)
    }

    fn carries_proposals(message: &GpuRaftMessage) -> bool {
        message.carries_proposals()
    }

    /// Odd clients sign their commands (with a key of their own), even ones do not.
    fn client_command(data: &bytes::Bytes, client: usize) -> bytes::Bytes {
        let signature = (client % 2 == 1).then(|| {
            let key = test_signing_key(NodeId(1_000 + client as u64));
            crate::ClientSignature::sign(data, &key)
        });
        crate::client_signature::frame(data, signature.as_ref()).expect("small commands frame")
    }

    fn transfer_to(to: NodeId) -> Option<Control> {
        Some(Control::TransferLeadership { to })
    }

    fn check_new_leader(node: &Self, monitor: &SafetyMonitor) -> Result<(), Violation> {
        check_framed_leader_completeness(node, monitor)
    }

    /// Raft's changes, a learner added with its key (as an operator gives it).
    fn change_members(&self, nodes: &[NodeId], entropy: u64) -> Option<Control> {
        use crate::protocol::raft::MembershipChange;
        match self.raft().change_members(nodes, entropy)? {
            Control::ChangeMembership(MembershipChange::AddLearner { id, address, .. }) => {
                Some(Control::ChangeMembership(MembershipChange::AddLearner {
                    id,
                    address,
                    key: Some(test_signing_key(id).verifying_key().to_bytes()),
                }))
            }
            control => Some(control),
        }
    }

    fn members(&self) -> Option<std::collections::BTreeSet<NodeId>> {
        SimProtocol::members(self.raft())
    }

    fn describe(&self) -> String {
        self.raft().describe()
    }

    fn check_settled(&self) -> Result<(), Violation> {
        self.raft().check_settled()
    }

    /// Raft's check on the inner cores: the leader counts signed acknowledgements itself, and
    /// what it commits must still be stored by a quorum of its voters, learners never counted.
    fn check_commit(
        &self,
        before: crate::types::LogIndex,
        nodes: &[(NodeId, Option<&Self>)],
    ) -> Result<(), Violation> {
        let inner: Vec<(NodeId, Option<&RaftNode>)> = nodes
            .iter()
            .map(|(id, core)| (*id, core.map(|core| core.raft())))
            .collect();
        self.raft().check_commit(before, &inner)
    }

    /// Raft's checks on the inner logs; no evidence against anyone (all run honest code);
    /// and the certificates: every node's newest one verifies under the voters' keys and
    /// names its own log's chain value, no node ever counted an acknowledgement a certificate
    /// could not carry, and what a leader committed in its term (beyond what it had committed
    /// when elected, which earlier leaders certified) is covered by its certificate.
    fn check_all(nodes: &[&Self], monitor: &SafetyMonitor) -> Result<(), Violation> {
        let logs: Vec<_> = nodes.iter().map(|n| (n.id(), n.raft().log())).collect();
        check_log_matching(&logs)?;
        for node in nodes {
            check_framed_leader_completeness(node, monitor)?;
            if let Some(&accused) = node.evidence().keys().next() {
                return Err(Violation::FalseAccusation {
                    accuser: node.id(),
                    accused,
                });
            }
            let broken = |detail: String| {
                Err(Violation::Certificate {
                    node: node.id(),
                    detail,
                })
            };
            if node.miscounted_acks() > 0 {
                return broken(format!(
                    "{} acknowledgements miscounted",
                    node.miscounted_acks()
                ));
            }
            let commit = node.raft().commit_index();
            let counted = node.raft().is_leader() && commit > node.commit_when_elected();
            let mut held = vec![node.certificate().cloned()];
            if counted {
                // What the leader committed is covered by its certificate, or by the one it
                // completes with its own signature at the next tick.
                let of_commit = node.certificate_of_commit();
                match &of_commit {
                    Some(certificate) if certificate.index >= commit => {}
                    Some(certificate) => {
                        return broken(format!(
                            "leader committed {commit} past its certificate at {}",
                            certificate.index
                        ));
                    }
                    None => {
                        return broken(format!("leader committed {commit} without a certificate"));
                    }
                }
                held.push(of_commit);
            }
            for certificate in held.into_iter().flatten() {
                if let Err(error) = node.check_certificate(&certificate) {
                    return broken(format!("certificate at {}: {error}", certificate.index));
                }
                if node.chain_at(certificate.index) != Some(certificate.chain) {
                    return broken(format!(
                        "certificate at {} names another log",
                        certificate.index
                    ));
                }
            }
        }
        Ok(())
    }

    /// A bit flipped in a signature, an index or term raised under the old signature, an
    /// acknowledgement passed off as another voter's, or one re-signed with a key no voter
    /// holds.
    fn forge(
        envelope: &Envelope<GpuRaftMessage>,
        entropy: u64,
    ) -> Option<Envelope<GpuRaftMessage>> {
        let mut forged = envelope.clone();
        let flip = |signature: &mut bytes::Bytes| {
            let mut bytes = signature.to_vec();
            if let Some(byte) = bytes.get_mut((entropy >> 8) as usize % 64) {
                *byte ^= 1 << ((entropy >> 16) % 8);
            }
            *signature = bytes.into();
        };
        let outsider = test_signing_key(NodeId(u64::MAX));
        match &mut forged.message {
            GpuRaftMessage::Ack(ack) => match entropy % 4 {
                0 => flip(&mut ack.signature),
                1 => ack.index += 1 + entropy % 5,
                // Another voter's name on this one's acknowledgement: the chain value is right,
                // only the signature gives it away.
                2 => {
                    let other = NodeId(1 + (entropy >> 24) % 5);
                    ack.voter = other;
                    forged.from = other;
                }
                _ => {
                    *ack = crate::protocol::gpu_raft::SignedAck::sign(
                        ack.voter,
                        ack.term,
                        ack.index + 1,
                        ack.chain,
                        &outsider,
                    );
                }
            },
            GpuRaftMessage::Grant {
                term, signature, ..
            } => match entropy % 2 {
                0 => flip(signature),
                _ => *term += 1,
            },
            GpuRaftMessage::Certified { certificate, .. } => match certificate.acks.first_mut() {
                Some(ack) if entropy.is_multiple_of(2) => flip(&mut ack.signature),
                _ => certificate.index += 1,
            },
            GpuRaftMessage::Elected { votes, .. } => flip(&mut votes.first_mut()?.signature),
            // A client's signature broken on the way to the leader.
            GpuRaftMessage::Raft(Message::ForwardProposals { proposals, .. }) => {
                let (_, data) = proposals
                    .iter_mut()
                    .find(|(_, data)| data.first() == Some(&1) && data.len() > 97)?;
                let mut bytes = data.to_vec();
                bytes[33 + (entropy >> 8) as usize % 64] ^= 1;
                *data = bytes.into();
            }
            // Promises nothing: an adversary could send any such message; the transport's
            // authentication (not this core) is what stops it.
            GpuRaftMessage::Raft(_) => return None,
        }
        Some(forged)
    }
}

/// [`check_leader_completeness`] for GPU-optimized Raft, whose log keeps each command in its
/// frame while the state machine applies the command alone.
fn check_framed_leader_completeness(
    node: &GpuRaftNode,
    monitor: &SafetyMonitor,
) -> Result<(), Violation> {
    let raft = node.raft();
    if !raft.is_leader() {
        return Ok(());
    }
    let term = raft.term();
    for (&index, (entry, committed_in)) in monitor.applied() {
        let held = raft.log().entry(index).map(|held| {
            let mut held = held.clone();
            if let crate::types::Payload::Command { data, .. } = &mut held.payload
                && let Ok(framed) = crate::client_signature::unframe(data)
            {
                *data = framed.command().clone();
            }
            held
        });
        if *committed_in < term && held.as_ref() != Some(entry) {
            return Err(Violation::LeaderCompleteness {
                leader: raft.id(),
                term,
                index,
                committed_in: *committed_in,
            });
        }
    }
    Ok(())
}

/// Every entry seen committed in a term below the leader's is in its log.
pub fn check_leader_completeness(
    node: &RaftNode,
    monitor: &SafetyMonitor,
) -> Result<(), Violation> {
    if !node.is_leader() {
        return Ok(());
    }
    let term = node.term();
    let log = node.log();
    // What the log compacted away is covered by a snapshot of committed entries; it must at
    // least agree on the term of its last entry, which log matching extends to the rest.
    let compacted_through = log.first_index() - 1;
    for (&index, (entry, committed_in)) in monitor.applied() {
        let holds = if index < compacted_through {
            true
        } else if index == compacted_through {
            log.term_at(index).is_none_or(|t| t == entry.term)
        } else {
            log.entry(index) == Some(entry)
        };
        if *committed_in < term && !holds {
            return Err(Violation::LeaderCompleteness {
                leader: node.id(),
                term,
                index,
                committed_in: *committed_in,
            });
        }
    }
    Ok(())
}

impl SimProtocol for PbftNode {
    type Settings = PbftConfig;

    /// Every replica's key is [`test_signing_key`] of its id, and every replica knows all of
    /// them.
    fn start(
        settings: &PbftConfig,
        id: NodeId,
        members: Vec<NodeId>,
        seed: u64,
        recovered: RecoveredState,
    ) -> Result<Self, ConfigError> {
        let _ = seed; // PBFT draws nothing at random: its primary follows the view number
        let mut config = settings.clone();
        config.validators = test_validators(&members);
        config.signing_key = test_signing_key(id);
        config.id = id;
        config.members = members;
        PbftNode::new(config, recovered)
    }

    fn carries_proposals(message: &PbftMessage) -> bool {
        matches!(message, PbftMessage::Forward(_))
    }

    fn transfer_to(_to: NodeId) -> Option<PbftControl> {
        None
    }

    fn check_new_leader(_node: &Self, _monitor: &SafetyMonitor) -> Result<(), Violation> {
        Ok(())
    }

    /// No replica holds evidence against another (all run honest code), and agreement: the
    /// executed logs of every two replicas agree on their common prefix, and two replicas
    /// that executed through the same sequence number hold the same state chain (so they
    /// executed the same batches, null ones included).
    fn check_all(nodes: &[&Self], _monitor: &SafetyMonitor) -> Result<(), Violation> {
        for node in nodes {
            if let Some(&accused) = node.evidence().keys().next() {
                return Err(Violation::FalseAccusation {
                    accuser: node.id(),
                    accused,
                });
            }
        }
        check_agreement(nodes)
    }
}

/// PBFT agreement among `nodes`: their executed logs agree on their common prefix, and two
/// that executed through the same sequence number hold the same state chain.
pub(crate) fn check_agreement(nodes: &[&PbftNode]) -> Result<(), Violation> {
    for (i, a) in nodes.iter().enumerate() {
        for b in &nodes[i + 1..] {
            let common = a.log().len().min(b.log().len());
            if let Some(index) = (0..common).find(|&i| a.log()[i] != b.log()[i]) {
                return Err(Violation::StateMachineSafety {
                    index: index as u64 + 1,
                    node: b.id(),
                    first: format!("{:?} on {}", a.log()[index], a.id()),
                    second: format!("{:?}", b.log()[index]),
                });
            }
            if a.executed_seq() == b.executed_seq() && a.state_digest() != b.state_digest() {
                return Err(Violation::Agreement {
                    a: a.id(),
                    b: b.id(),
                    seq: a.executed_seq(),
                });
            }
        }
    }
    Ok(())
}
