//! Byzantine replicas for the simulator: real PBFT code and a real key, with what it sends
//! rewritten to misbehave (after commonware's simplex mocks: conflicter, equivocator,
//! impersonator, outdated, twins). Every other replica of the run is honest, and the checks
//! know which is which: agreement and linearizability among the honest, no evidence against an
//! honest replica, and (checked at the end of a run) that evidence is held by every live
//! honest replica or by none, and only against a replica from which something provable left.
//!
//! The behaviours ([`Behaviour`]):
//!
//! - provable: an equivocating primary, a double voter (two conflicting signed statements), a
//!   bogus view-changer as primary of a new view (a NEW-VIEW that drops prepared requests), and
//!   twins (two instances of honest code with one key, see [`Twins`](crate::sim::Twins));
//! - unprovable, so they must blame no one: an impersonator (statements in others' names), a
//!   replayer (its own old statements), a silent replica, garbage (malformed, truncated, absurd
//!   and oversized messages), and the bogus view-changer's forged prepared certificates.
//!
//! Whether a replica offended is decided by what actually left it ([`Ledger`]), not by what it
//! meant to do: a forgery a crash discarded, or two conflicting votes of which one never left,
//! prove nothing.

mod bogus_view_change;
mod garbage;
mod ledger;

pub use ledger::{Actions, Ledger};

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::error::ConfigError;
use crate::protocol::pbft::{
    Batch, Control, Digest, Message, PbftConfig, PbftNode, Request, Signed, Statement,
    test_signing_key,
};
use crate::protocol::{Envelope, Input, Output, Protocol, Status};
use crate::sim::invariants::{SafetyMonitor, Violation};
use crate::sim::protocol::SimProtocol;
use crate::storage::RecoveredState;
use crate::sync::lock;
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
    /// Beside its messages, sends malformed and absurd ones: signatures of the wrong length,
    /// statements for views and sequence numbers near `u64::MAX`, pre-prepares whose batch is
    /// not the one they name, batches and requests over the limits, certificates with thousands
    /// of entries, nested new-views, evidence that proves nothing (see `garbage.rs`).
    Garbage,
    /// Beside each VIEW-CHANGE, sends one with a forged prepared certificate (unprovable); as
    /// primary of a new view, sends a NEW-VIEW that drops the prepared requests (provable).
    BogusViewChange,
    /// Runs as two instances of honest code with one key, each talking to its own side of the
    /// cluster ([`Twins`](crate::sim::Twins); only through [`SimConfig::twins`]).
    ///
    /// [`SimConfig::twins`]: crate::sim::SimConfig::twins
    Twins,
}

impl Behaviour {
    /// Every behaviour of a single replica ([`SimConfig::byzantine`] draws from them); twins
    /// need a layout of the cluster and have their own configuration.
    ///
    /// [`SimConfig::byzantine`]: crate::sim::SimConfig::byzantine
    pub const ALL: [Behaviour; 7] = [
        Behaviour::EquivocatingPrimary,
        Behaviour::DoubleVoter,
        Behaviour::Impersonator,
        Behaviour::Replayer,
        Behaviour::Silent,
        Behaviour::Garbage,
        Behaviour::BogusViewChange,
    ];

    /// True for a behaviour that can leave evidence (when its offence actually left the
    /// replica, see [`Ledger`]); the others must accuse no one.
    pub fn is_provable(self) -> bool {
        matches!(
            self,
            Behaviour::EquivocatingPrimary
                | Behaviour::DoubleVoter
                | Behaviour::BogusViewChange
                | Behaviour::Twins
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
    /// What the Byzantine replicas sent, shared by all their instances (one run's).
    ledger: Arc<Mutex<Ledger>>,
}

impl MaverickSettings {
    /// `pbft` everywhere, `byzantine` misbehaving, and an empty ledger: settings for one run.
    pub fn new(pbft: PbftConfig, byzantine: BTreeMap<NodeId, Behaviour>) -> Self {
        MaverickSettings {
            pbft,
            byzantine,
            ledger: Arc::default(),
        }
    }

    /// What Byzantine replica `id` did so far.
    pub fn actions(&self, id: NodeId) -> Actions {
        lock(&self.ledger).actions(id)
    }
}

/// A PBFT replica that may misbehave.
#[derive(Debug)]
pub struct Maverick {
    node: PbftNode,
    behaviour: Option<Behaviour>,
    key: ed25519_dalek::SigningKey,
    /// Statements sent in earlier views, for the replayer (bounded).
    old: Vec<Envelope<Message>>,
    /// Every Byzantine replica of the run, with its public key (a crashed one is not among the
    /// live nodes the checks see, and evidence against it is still no false accusation). The
    /// keys are derived once: deriving one per delivered statement took 40% of a run.
    byzantine: BTreeMap<NodeId, ed25519_dalek::VerifyingKey>,
    ledger: Arc<Mutex<Ledger>>,
    /// Draws the garbage and the forgeries.
    rng: ChaCha8Rng,
    /// The settings every replica runs with (garbage is made to just miss their limits).
    limits: PbftConfig,
    /// What it heard lately that garbage is made of.
    heard: garbage::Heard,
    /// Its honest NEW-VIEWs' signatures, each with the tampered one sent instead, if it had a
    /// prepared request to drop (the last few).
    tampered: Vec<(Bytes, Option<Signed>)>,
    /// Its honest VIEW-CHANGEs' signatures, each with the forged one sent beside it (the last
    /// few).
    forged: Vec<(Bytes, Signed)>,
}

/// How many old messages a replayer keeps.
const REPLAYS_KEPT: usize = 64;

impl Maverick {
    /// A replica with `config`'s settings and key that misbehaves as `behaviour` says (honest
    /// code when `None`), for running outside the simulator (the `maverick` example: a
    /// Byzantine replica on TCP beside real nodes). `seed` draws its garbage and forgeries.
    /// Hand each message it sends to [`SimProtocol::sent`] for [`Maverick::offended`] to know.
    pub fn new(
        config: PbftConfig,
        recovered: RecoveredState,
        behaviour: Option<Behaviour>,
        seed: u64,
    ) -> Result<Self, ConfigError> {
        let key = config.signing_key.clone();
        let id = config.id;
        Ok(Maverick {
            node: PbftNode::new(config.clone(), recovered)?,
            behaviour,
            key,
            old: Vec::new(),
            byzantine: behaviour
                .map(|_| (id, config.signing_key.verifying_key()))
                .into_iter()
                .collect(),
            ledger: Arc::default(),
            rng: ChaCha8Rng::seed_from_u64(seed),
            limits: config,
            heard: garbage::Heard::default(),
            tampered: Vec::new(),
            forged: Vec::new(),
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

    /// True once something that proves it Byzantine left it (or its twin).
    pub fn offended(&self) -> bool {
        lock(&self.ledger).offended(self.node.id())
    }

    /// Records in the ledger the Byzantine replicas' statements in `messages`, which this
    /// honest replica received and authenticated.
    fn record_delivered(&self, messages: &[Envelope<Message>]) {
        let mut ledger = lock(&self.ledger);
        for envelope in messages {
            envelope.message.for_each_signed(&mut |signed: &Signed| {
                if let Some(key) = self.byzantine.get(&signed.signer) {
                    ledger.record_delivered(key, signed);
                }
            });
        }
    }

    fn sign(&self, statement: Statement) -> Signed {
        // Its own key, honestly used (what it says may be a lie; the signature is not).
        Signed::sign_and_tell(
            statement,
            self.node.id(),
            &self.key,
            Some(&*self.limits.verifier),
        )
    }

    /// Counts one piece of misbehaviour of kind `what` it made.
    fn count(&self, what: &'static str) {
        lock(&self.ledger).count(self.node.id(), what);
    }

    /// Runs the honest code's `step`, then rewrites what it added to `out`. Only that: the
    /// output may still hold (already rewritten) messages of earlier steps waiting for their
    /// write.
    fn rewriting(
        &mut self,
        out: &mut Output<Message>,
        step: impl FnOnce(&mut PbftNode, &mut Output<Message>),
    ) {
        let (sent_before, after_write_before) =
            (out.messages.len(), out.messages_after_write.len());
        step(&mut self.node, out);
        if let Some(behaviour) = self.behaviour {
            self.misbehave(behaviour, out, sent_before, after_write_before);
        }
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
                Behaviour::Twins => sent.push(envelope),
                Behaviour::EquivocatingPrimary => sent.push(self.equivocate(envelope)),
                Behaviour::DoubleVoter => {
                    sent.extend(self.double_vote(&envelope));
                    sent.push(envelope);
                }
                Behaviour::Impersonator => {
                    sent.extend(impersonate(&envelope, self.node.id(), self.node.members()));
                    sent.push(envelope);
                }
                Behaviour::Replayer => self.replay(envelope, &mut sent),
                Behaviour::Garbage => {
                    sent.extend(self.maybe_garbage(&envelope));
                    sent.push(envelope);
                }
                Behaviour::BogusViewChange => self.bogus_view_change(envelope, &mut sent),
            }
        }
        sent
    }

    /// To odd-numbered backups, a pre-prepare for another batch.
    fn equivocate(&mut self, envelope: Envelope<Message>) -> Envelope<Message> {
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
            return Envelope {
                message: Message::PrePrepare {
                    pre_prepare: forged,
                    batch: other,
                },
                ..envelope
            };
        }
        envelope
    }

    /// A prepare or commit like the one in `envelope`, for another digest.
    fn double_vote(&self, envelope: &Envelope<Message>) -> Option<Envelope<Message>> {
        let Message::Signed(signed) = &envelope.message else {
            return None;
        };
        let (view, seq, digest) = signed.statement.phase()?;
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
        Some(Envelope {
            message: Message::Signed(self.sign(statement)),
            ..envelope.clone()
        })
    }

    /// Keeps its first statements, and once they are old (past view 0, or once it kept all it
    /// keeps: by then their sequence numbers are long executed) sends a few with each message.
    fn replay(&mut self, envelope: Envelope<Message>, sent: &mut Vec<Envelope<Message>>) {
        if matches!(
            envelope.message,
            Message::Signed(_) | Message::PrePrepare { .. }
        ) && self.old.len() < REPLAYS_KEPT
        {
            self.old.push(envelope.clone());
        }
        sent.push(envelope);
        if self.node.view() > 0 || self.old.len() == REPLAYS_KEPT {
            sent.extend(self.old.iter().take(4).cloned());
            let turn = 4.min(self.old.len());
            self.old.rotate_left(turn);
        }
    }
}

/// Beside a signed message of `me`: the same in another member's name, and the same with a
/// signature that cannot verify.
fn impersonate(
    envelope: &Envelope<Message>,
    me: NodeId,
    members: &[NodeId],
) -> Vec<Envelope<Message>> {
    let Message::Signed(signed) = &envelope.message else {
        return Vec::new();
    };
    // A member other than itself and the receiver: a name the receiver knows a key for.
    let victim = (members.iter().copied())
        .find(|&m| m != me && m != envelope.to)
        .unwrap_or(envelope.to);
    let mut forged = signed.clone();
    forged.signer = victim;
    let mut garbage = signed.clone();
    garbage.signature = Bytes::from_static(&[0xee; 64]);
    [forged, garbage]
        .into_iter()
        .map(|signed| Envelope {
            message: Message::Signed(signed),
            ..envelope.clone()
        })
        .collect()
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
        if let (Some(Behaviour::Garbage), Input::Message(envelope)) = (self.behaviour, &input) {
            self.heard.hear(&envelope.message);
        }
        self.rewriting(out, |node, out| node.step(input, out));
    }

    fn authenticate(&mut self, messages: &mut Vec<Envelope<Message>>) -> usize {
        let refused = self.node.authenticate(messages);
        if self.behaviour.is_none() {
            self.record_delivered(messages);
        }
        refused
    }

    fn step_round(&mut self, messages: &mut Vec<Envelope<Message>>, out: &mut Output<Message>) {
        if self.behaviour == Some(Behaviour::Garbage) {
            for envelope in messages.iter() {
                self.heard.hear(&envelope.message);
            }
        }
        self.rewriting(out, |node, out| node.step_round(messages, out));
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
            byzantine: settings
                .byzantine
                .keys()
                .map(|&id| (id, test_signing_key(id).verifying_key()))
                .collect(),
            ledger: Arc::clone(&settings.ledger),
            rng: ChaCha8Rng::seed_from_u64(seed),
            limits: settings.pbft.clone(),
            heard: garbage::Heard::default(),
            tampered: Vec::new(),
            forged: Vec::new(),
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

    /// Records in the ledger what a Byzantine replica's message proves about it.
    fn sent(&mut self, envelope: &Envelope<Message>) {
        if self.behaviour.is_none() {
            return;
        }
        let id = self.node.id();
        let key = self.key.verifying_key();
        let mut ledger = lock(&self.ledger);
        envelope.message.for_each_signed(&mut |signed: &Signed| {
            ledger.record_statement(id, &key, signed);
        });
        if let Message::Signed(signed) = &envelope.message
            && let Statement::NewView(new_view) = &signed.statement
            && self
                .tampered
                .iter()
                .any(|(_, tampered)| tampered.as_ref() == Some(signed))
        {
            ledger.record_unjustified_new_view(signed, new_view.view);
        }
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
            if let Some(&accused) = node
                .evidence()
                .keys()
                .find(|id| !byzantine.contains_key(id))
            {
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
    /// seed (`behaviours` to choose from; not [`Behaviour::Twins`], which has
    /// [`SimConfig::twins`](crate::sim::SimConfig::twins)).
    pub fn byzantine(seed: u64, behaviours: &[Behaviour]) -> Self {
        use rand::{RngExt, SeedableRng};
        debug_assert!(
            !behaviours.contains(&Behaviour::Twins),
            "twins need a layout"
        );
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
        // Replica 2 is the primary of view 1, the first view that starts with a NEW-VIEW.
        if let Some((&id, _)) = byzantine
            .iter()
            .find(|(_, b)| **b == Behaviour::BogusViewChange)
            && !byzantine.contains_key(&NodeId(2))
            && rng.random_bool(0.5)
        {
            byzantine.remove(&id);
            byzantine.insert(NodeId(2), Behaviour::BogusViewChange);
        }
        pbft.map_protocol(|pbft| MaverickSettings::new(pbft, byzantine))
    }

    /// A PBFT chaos configuration where between one and f replicas run as twins (see
    /// [`Twins`](crate::sim::Twins)), the others split at random between two sides (at least
    /// one on each); half the seeds keep the sides apart until the cluster heals. With at most
    /// f twinned replicas any two quorums still share an honest replica, so every safety check
    /// must hold (and at most one side can commit while they are apart).
    pub fn twins(seed: u64) -> Self {
        use rand::{RngExt, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(crate::sim::mix(seed, 0x7715));
        let mut config = crate::sim::SimConfig::pbft_chaos(seed);
        let n = config.nodes as u64;
        let f = (config.nodes - 1) / 3;
        let count = rng.random_range(1..=f);
        let mut ids: Vec<NodeId> = (1..=n).map(NodeId).collect();
        for i in (1..ids.len()).rev() {
            ids.swap(i, rng.random_range(0..=i));
        }
        let (twinned, honest) = ids.split_at(count);
        let cut = rng.random_range(1..honest.len());
        config.twins = crate::sim::Twins {
            twinned: twinned.iter().copied().collect(),
            side_one: honest[cut..].iter().copied().collect(),
            separate_sides: rng.random_bool(0.5),
        };
        let byzantine = twinned.iter().map(|&id| (id, Behaviour::Twins)).collect();
        config.map_protocol(|pbft| MaverickSettings::new(pbft, byzantine))
    }

    /// The twins control: four replicas of which f + 1 = 2 (replicas 1 and 2) run as twins,
    /// the sides {1, 2, 3} and {1, 2, 4} kept apart (each 2f + 1 ids, so each can commit on
    /// its own), no other fault. PBFT promises nothing here: the checks must find a safety
    /// violation, which shows that they can.
    pub fn twins_beyond_f(seed: u64) -> Self {
        let mut config = crate::sim::SimConfig::pbft(seed, 4);
        config.twins = crate::sim::Twins {
            twinned: [NodeId(1), NodeId(2)].into(),
            side_one: [NodeId(4)].into(),
            separate_sides: true,
        };
        let byzantine = [(NodeId(1), Behaviour::Twins), (NodeId(2), Behaviour::Twins)].into();
        config.map_protocol(|pbft| MaverickSettings::new(pbft, byzantine))
    }
}
