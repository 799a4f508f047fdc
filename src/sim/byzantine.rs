//! Byzantine replicas for the simulator: real PBFT code and a real key, with what it sends
//! rewritten to misbehave (after commonware's simplex mocks: conflicter, equivocator,
//! impersonator, outdated). Every other replica of the run is honest, and the checks know
//! which is which: agreement and linearizability among the honest, no evidence against an
//! honest replica, and (checked at the end of a run) evidence against every Byzantine replica
//! that actually did something provable.

use std::collections::BTreeMap;

use bytes::Bytes;

use crate::error::ConfigError;
use crate::protocol::pbft::{
    Batch, Control, Digest, Message, PbftConfig, PbftNode, Request, Signed, Statement,
    test_signing_key,
};
use crate::protocol::{Envelope, Input, Output, Protocol, Status};
use crate::sim::invariants::{SafetyMonitor, Violation};
use crate::sim::protocol::SimProtocol;
use crate::storage::RecoveredState;
use crate::types::{NodeId, ProposalTag};

/// How a Byzantine replica misbehaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Behaviour {
    /// As primary, sends every other backup a different batch for each sequence number.
    EquivocatingPrimary,
    /// Sends a conflicting PREPARE and COMMIT (another digest) beside each one it sends.
    DoubleVoter,
    /// Sends statements in other replicas' names with signatures that cannot verify.
    Impersonator,
    /// Sends its own statements of earlier views again, long after.
    Replayer,
    /// Sends nothing at all.
    Silent,
}

impl Behaviour {
    /// Every behaviour.
    pub const ALL: [Behaviour; 5] = [
        Behaviour::EquivocatingPrimary,
        Behaviour::DoubleVoter,
        Behaviour::Impersonator,
        Behaviour::Replayer,
        Behaviour::Silent,
    ];

    /// True for a behaviour that leaves evidence (the others must accuse no one).
    pub fn is_provable(self) -> bool {
        matches!(
            self,
            Behaviour::EquivocatingPrimary | Behaviour::DoubleVoter
        )
    }
}

/// The settings of a cluster with Byzantine replicas.
#[derive(Clone, Debug)]
pub struct MaverickSettings {
    /// Every replica's PBFT settings.
    pub pbft: PbftConfig,
    /// The Byzantine replicas and what each does.
    pub byzantine: BTreeMap<NodeId, Behaviour>,
}

/// A PBFT replica that may misbehave.
#[derive(Debug)]
pub struct Maverick {
    node: PbftNode,
    behaviour: Option<Behaviour>,
    key: ed25519_dalek::SigningKey,
    /// Statements sent in earlier views, for the replayer (bounded).
    old: Vec<Envelope<Message>>,
    /// Set once it sent something provable.
    offended: bool,
    /// Every Byzantine replica of the run (a crashed one is not among the live nodes the
    /// checks see, and evidence against it is still no false accusation).
    byzantine: Vec<NodeId>,
}

/// How many old messages a replayer keeps.
const REPLAYS_KEPT: usize = 64;

impl Maverick {
    /// A replica with `config`'s settings and key that misbehaves as `behaviour` says (honest
    /// code when `None`), for running outside the simulator (the `maverick` example: a
    /// Byzantine replica on TCP beside real nodes).
    pub fn new(
        config: PbftConfig,
        recovered: RecoveredState,
        behaviour: Option<Behaviour>,
    ) -> Result<Self, ConfigError> {
        let key = config.signing_key.clone();
        let id = config.id;
        Ok(Maverick {
            node: PbftNode::new(config, recovered)?,
            behaviour,
            key,
            old: Vec::new(),
            offended: false,
            byzantine: behaviour.map(|_| id).into_iter().collect(),
        })
    }

    /// The honest code inside.
    pub fn node(&self) -> &PbftNode {
        &self.node
    }

    /// Its misbehaviour, if it has one.
    pub fn behaviour(&self) -> Option<Behaviour> {
        self.behaviour
    }

    /// True once it sent something that proves it Byzantine.
    pub fn offended(&self) -> bool {
        self.offended
    }

    fn sign(&self, statement: Statement) -> Signed {
        Signed::sign(statement, self.node.id(), &self.key)
    }

    /// Rewrites what the honest code asked to send.
    fn misbehave(
        &mut self,
        behaviour: Behaviour,
        out: &mut Output<Message>,
        sent_before: usize,
        after_write_before: usize,
    ) {
        let messages = out.messages.split_off(sent_before);
        let after_write = out.messages_after_write.split_off(after_write_before);
        let messages = self.rewrite(behaviour, messages);
        let after_write = self.rewrite(behaviour, after_write);
        out.messages.extend(messages);
        out.messages_after_write.extend(after_write);
    }

    fn rewrite(
        &mut self,
        behaviour: Behaviour,
        messages: Vec<Envelope<Message>>,
    ) -> Vec<Envelope<Message>> {
        let mut sent = Vec::with_capacity(messages.len());
        for envelope in messages {
            match behaviour {
                Behaviour::Silent => {}
                Behaviour::EquivocatingPrimary => {
                    if envelope.to.0 % 2 == 1
                        && let Message::PrePrepare { pre_prepare, batch } = &envelope.message
                        && let Statement::PrePrepare { view, seq, .. } = pre_prepare.statement
                    {
                        let other = other_batch(batch);
                        let forged = self.sign(Statement::PrePrepare {
                            view,
                            seq,
                            digest: other.digest(),
                        });
                        self.offended = true;
                        sent.push(Envelope {
                            message: Message::PrePrepare {
                                pre_prepare: forged,
                                batch: other,
                            },
                            ..envelope
                        });
                    } else {
                        sent.push(envelope);
                    }
                }
                Behaviour::DoubleVoter => {
                    if let Message::Signed(signed) = &envelope.message
                        && let Some((view, seq, digest)) = signed.statement.phase()
                    {
                        let other = Digest::of(&[b"another", &digest.0]);
                        let statement = match signed.statement {
                            Statement::Commit { .. } => Statement::Commit {
                                view,
                                seq,
                                digest: other,
                            },
                            _ => Statement::Prepare {
                                view,
                                seq,
                                digest: other,
                            },
                        };
                        let conflicting = self.sign(statement);
                        self.offended = true;
                        sent.push(Envelope {
                            message: Message::Signed(conflicting),
                            ..envelope.clone()
                        });
                    }
                    sent.push(envelope);
                }
                Behaviour::Impersonator => {
                    // Its own message goes out as is; beside it, one in another's name.
                    if let Message::Signed(signed) = &envelope.message {
                        // Another member than itself and the receiver: a name the
                        // receiver knows a key for.
                        let me = self.node.id();
                        let victim = (self.node.members().iter().copied())
                            .find(|&m| m != me && m != envelope.to)
                            .unwrap_or(envelope.to);
                        let mut forged = signed.clone();
                        forged.signer = victim;
                        sent.push(Envelope {
                            message: Message::Signed(forged),
                            ..envelope.clone()
                        });
                        let mut garbage = signed.clone();
                        garbage.signature = Bytes::from_static(&[0xee; 64]);
                        sent.push(Envelope {
                            message: Message::Signed(garbage),
                            ..envelope.clone()
                        });
                    }
                    sent.push(envelope);
                }
                Behaviour::Replayer => {
                    if matches!(
                        envelope.message,
                        Message::Signed(_) | Message::PrePrepare { .. }
                    ) && self.old.len() < REPLAYS_KEPT
                    {
                        self.old.push(envelope.clone());
                    }
                    sent.push(envelope);
                    if self.node.view() > 0 {
                        sent.extend(self.old.iter().take(4).cloned());
                        let turn = 4.min(self.old.len());
                        self.old.rotate_left(turn);
                    }
                }
            }
        }
        sent
    }
}

/// A batch unlike `batch`, for an equivocation.
fn other_batch(batch: &Batch) -> Batch {
    let mut other = batch.clone();
    match other.requests.pop() {
        Some(_) if !other.requests.is_empty() => {}
        _ => other.requests.push(Request {
            tag: ProposalTag {
                proposer: NodeId(u64::MAX),
                request_id: batch.requests.len() as u64,
            },
            data: Bytes::from_static(b"equivocated"),
        }),
    }
    other
}

impl Protocol for Maverick {
    type Message = Message;
    type Control = Control;
    const AUTHENTICATES: bool = true;

    fn id(&self) -> NodeId {
        self.node.id()
    }

    fn step(&mut self, input: Input<Message, Control>, out: &mut Output<Message>) {
        // Only what this step adds is rewritten: the output may still hold (already
        // rewritten) messages of earlier steps waiting for their write.
        let (sent_before, after_write_before) =
            (out.messages.len(), out.messages_after_write.len());
        self.node.step(input, out);
        if let Some(behaviour) = self.behaviour {
            self.misbehave(behaviour, out, sent_before, after_write_before);
        }
    }

    fn authenticate(&mut self, messages: &mut Vec<Envelope<Message>>) -> usize {
        self.node.authenticate(messages)
    }

    fn step_round(&mut self, messages: &mut Vec<Envelope<Message>>, out: &mut Output<Message>) {
        let (sent_before, after_write_before) =
            (out.messages.len(), out.messages_after_write.len());
        self.node.step_round(messages, out);
        if let Some(behaviour) = self.behaviour {
            self.misbehave(behaviour, out, sent_before, after_write_before);
        }
    }

    fn status(&self) -> Status {
        self.node.status()
    }

    fn into_recovered_state(self) -> RecoveredState {
        self.node.into_recovered_state()
    }
}

impl SimProtocol for Maverick {
    type Settings = MaverickSettings;

    fn start(
        settings: &MaverickSettings,
        id: NodeId,
        members: Vec<NodeId>,
        seed: u64,
        recovered: RecoveredState,
    ) -> Result<Self, ConfigError> {
        let node = PbftNode::start(&settings.pbft, id, members, seed, recovered)?;
        Ok(Maverick {
            node,
            behaviour: settings.byzantine.get(&id).copied(),
            key: test_signing_key(id),
            old: Vec::new(),
            offended: false,
            byzantine: settings.byzantine.keys().copied().collect(),
        })
    }

    fn carries_proposals(message: &Message) -> bool {
        PbftNode::carries_proposals(message)
    }

    fn transfer_to(_to: NodeId) -> Option<Control> {
        None
    }

    fn check_new_leader(_node: &Self, _monitor: &SafetyMonitor) -> Result<(), Violation> {
        Ok(())
    }

    fn is_honest(&self) -> bool {
        self.behaviour.is_none()
    }

    /// The PBFT checks among the honest replicas, and no evidence against an honest one.
    fn check_all(nodes: &[&Self], _monitor: &SafetyMonitor) -> Result<(), Violation> {
        let Some(byzantine) = nodes.first().map(|n| &n.byzantine) else {
            return Ok(());
        };
        let honest: Vec<&PbftNode> = nodes
            .iter()
            .filter(|n| n.behaviour.is_none())
            .map(|n| &n.node)
            .collect();
        for node in &honest {
            if let Some(&accused) = node.evidence().keys().find(|id| !byzantine.contains(id)) {
                return Err(Violation::FalseAccusation {
                    accuser: node.id(),
                    accused,
                });
            }
        }
        crate::sim::protocol::check_agreement(&honest)
    }
}

impl crate::sim::SimConfig<MaverickSettings> {
    /// A PBFT chaos configuration (see [`SimConfig::pbft_chaos`](crate::sim::SimConfig::pbft_chaos))
    /// where between one and f replicas are Byzantine, each with a behaviour drawn from the
    /// seed (`behaviours` to choose from).
    pub fn byzantine(seed: u64, behaviours: &[Behaviour]) -> Self {
        use rand::{RngExt, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(crate::sim::mix(seed, 0xb42));
        let pbft = crate::sim::SimConfig::pbft_chaos(seed);
        let f = (pbft.nodes - 1) / 3;
        let count = rng.random_range(1..=f.max(1));
        let mut byzantine = BTreeMap::new();
        while byzantine.len() < count {
            let id = NodeId(rng.random_range(1..=pbft.nodes as u64));
            let behaviour = behaviours[rng.random_range(0..behaviours.len())];
            byzantine.insert(id, behaviour);
        }
        // The first primary is replica 1: an equivocator there misbehaves from the start.
        if behaviours.contains(&Behaviour::EquivocatingPrimary) && rng.random_bool(0.5) {
            byzantine.pop_first();
            byzantine.insert(NodeId(1), Behaviour::EquivocatingPrimary);
        }
        pbft.map_protocol(|pbft| MaverickSettings { pbft, byzantine })
    }
}
