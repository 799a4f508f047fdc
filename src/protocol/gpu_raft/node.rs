//! [`GpuRaftNode`]: the Raft core wrapped so that every promise it makes is signed and every
//! promise it counts was checked.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;

use super::certificate::{CommitCertificate, SignedAck};
use super::chain::LogChain;
use super::config::GpuRaftConfig;
use super::{Control, Envelope, Input, Message, Output};
use crate::client_signature::unframe;
use crate::error::ConfigError;
use crate::gpu::sigverify::{sign_and_tell, verdicts_or_reference};
use crate::gpu::votes::CpuVoteAggregator;
use crate::gpu::{SignatureItem, Threshold, Vote, VoteOutcome};
use crate::protocol::raft::{self, RaftNode, SignedVote, VoteEquivocation};
use crate::protocol::{Event, InvalidCounts, InvalidReason, Protocol, Status};
use crate::storage::RecoveredState;
use crate::types::{LogIndex, NodeId, Term};

/// Domain separation for pre-votes: a granted pre-vote promises nothing, so its signature must
/// never read as a vote's.
const PRE_VOTE_DOMAIN: &[u8] = b"stratoswarm-consensus/raft-pre-vote/v1";

/// Record keys, all under one prefix so that they never meet another core's.
const LATEST_CERTIFICATE: &[u8] = b"gpu_raft/certificate";
const CERTIFICATE_HISTORY: &[u8] = b"gpu_raft/certificate/";
const EVIDENCE: &[u8] = b"gpu_raft/evidence/";
/// The validators' public keys, so that a data directory can be checked offline
/// ([`verify_log`](crate::verify_log)).
pub(crate) const VALIDATORS: &[u8] = b"gpu_raft/validators";

/// A certificate is kept for good (besides the latest) once per this many indices: each one
/// certifies its whole prefix, so the history only narrows down where a damaged log goes wrong,
/// and costs a record per this many entries instead of one per commit.
pub const CERTIFICATE_SPACING: LogIndex = 1024;

/// The key of the kept certificate at `index`.
fn history_key(index: LogIndex) -> Vec<u8> {
    let mut key = CERTIFICATE_HISTORY.to_vec();
    key.extend_from_slice(&index.to_be_bytes());
    key
}

/// Whether `key` is one of the kept certificates.
pub(crate) fn is_history_key(key: &[u8]) -> bool {
    key.len() == CERTIFICATE_HISTORY.len() + 8 && key.starts_with(CERTIFICATE_HISTORY)
}

/// The key of the latest certificate.
pub(crate) fn latest_key() -> &'static [u8] {
    LATEST_CERTIFICATE
}

/// The signing bytes of a pre-vote for `candidate` in `term`.
fn pre_vote_bytes(term: Term, candidate: NodeId, voter: NodeId) -> Vec<u8> {
    let mut bytes = PRE_VOTE_DOMAIN.to_vec();
    bytes.extend_from_slice(&voter.0.to_be_bytes());
    bytes.extend_from_slice(&term.to_be_bytes());
    bytes.extend_from_slice(&candidate.0.to_be_bytes());
    bytes
}

/// One node of GPU-optimized Raft. See the [module documentation](super).
pub struct GpuRaftNode {
    config: GpuRaftConfig,
    inner: RaftNode,
    /// Digests and chain values of the inner log, updated with every write it asks for.
    chain: LogChain,
    /// What the inner core output in the step being translated.
    scratch: raft::Output,
    /// Leader: the newest checked acknowledgement of each voter in `acks_term` (its own
    /// included).
    acks: BTreeMap<NodeId, SignedAck>,
    acks_term: Term,
    /// The newest certificate this node holds, and the last one kept for good.
    certificate: Option<CommitCertificate>,
    kept_index: LogIndex,
    /// Leader: per peer, when it last got a certificate.
    certificate_sent: BTreeMap<NodeId, CertificatePace>,
    /// Leader: the highest index it committed that its certificate does not cover yet (a
    /// quorum of followers alone did not hold it, and its own signature waits for the next
    /// tick: one signature per tick, not one per commit), with the index of the membership it
    /// was counted under.
    uncertified: (LogIndex, LogIndex),
    /// Candidate: the signed votes granted to it in `votes_term`.
    votes_received: BTreeMap<NodeId, SignedVote>,
    votes_term: Term,
    /// The term whose leadership this node announced with its votes, and its commit index
    /// then (what it committed before it counted anything itself).
    announced_term: Term,
    commit_when_elected: LogIndex,
    evidence: BTreeMap<NodeId, VoteEquivocation>,
    invalid: InvalidCounts,
    /// Acknowledgements this node counted that later failed a check; stays 0 (the simulator
    /// asserts it).
    miscounted: u64,
    /// The validators' record is written with the first output.
    validators_written: bool,
    /// Signed client proposals waiting to be checked together: `(request_id, framed data,
    /// signature check)`.
    pending_signed: Vec<(u64, Bytes, ClientCheck)>,
}

/// What a client's signature must verify: key, signature, signed bytes.
type ClientCheck = ([u8; 32], [u8; 64], Vec<u8>);

/// Under load a follower gets the leader's newest certificate with one heartbeat in this many.
const CERTIFICATE_HEARTBEATS: u32 = 10;

/// When a follower last got a certificate.
#[derive(Clone, Copy, Debug, Default)]
struct CertificatePace {
    /// The index of the last certificate sent.
    sent: LogIndex,
    /// Heartbeats since.
    heartbeats: u32,
    /// The leader's certificate index at the previous heartbeat.
    seen_at_last_heartbeat: LogIndex,
}

impl std::fmt::Debug for GpuRaftNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuRaftNode")
            .field("inner", &self.inner)
            .field("certificate", &self.certificate.as_ref().map(|c| c.index))
            .finish_non_exhaustive()
    }
}

impl GpuRaftNode {
    /// A node starting from what its store recovered. Refuses a configuration whose keys do not
    /// fit ([`GpuRaftConfig::validate`]) and records that do not decode (a damaged store).
    pub fn new(config: GpuRaftConfig, recovered: RecoveredState) -> Result<Self, ConfigError> {
        config.validate()?;
        let corrupt = |what: &str| ConfigError::Invalid {
            field: "recovered.records",
            value: what.to_string(),
            reason: "a GPU-optimized Raft record does not decode; the store is damaged",
        };
        let mut certificate: Option<CommitCertificate> = None;
        let mut kept_index = 0;
        let mut evidence = BTreeMap::new();
        for (key, value) in &recovered.records {
            if key.as_slice() == LATEST_CERTIFICATE {
                certificate =
                    Some(CommitCertificate::decode(value).ok_or_else(|| corrupt("certificate"))?);
            } else if is_history_key(key) {
                let kept: CommitCertificate =
                    CommitCertificate::decode(value).ok_or_else(|| corrupt("kept certificate"))?;
                kept_index = kept_index.max(kept.index);
            } else if key.starts_with(EVIDENCE) {
                let proof: VoteEquivocation =
                    crate::encoding::decode_whole(value).map_err(|_| corrupt("evidence"))?;
                evidence.insert(proof.offender(), proof);
            }
        }
        if recovered
            .entries
            .first()
            .is_some_and(|entry| entry.index != 1)
        {
            return Err(ConfigError::Invalid {
                field: "recovered.entries",
                value: String::new(),
                reason: "GPU-optimized Raft chains its log from index 1; compacted logs are not supported",
            });
        }
        let chain = LogChain::of(&recovered.entries);
        let mut inner = RaftNode::new(config.raft.clone(), recovered)?;
        inner.commit_by_certificate = true;
        inner.require_member_keys(bootstrap_keys(&config).collect());
        Ok(GpuRaftNode {
            config,
            inner,
            chain,
            scratch: raft::Output::default(),
            acks: BTreeMap::new(),
            acks_term: 0,
            certificate,
            kept_index,
            certificate_sent: BTreeMap::new(),
            uncertified: (0, 0),
            votes_received: BTreeMap::new(),
            votes_term: 0,
            announced_term: 0,
            commit_when_elected: 0,
            evidence,
            invalid: InvalidCounts::default(),
            miscounted: 0,
            validators_written: false,
            pending_signed: Vec::new(),
        })
    }

    /// The Raft core inside.
    pub fn raft(&self) -> &RaftNode {
        &self.inner
    }

    /// The settings the node runs with.
    pub fn config(&self) -> &GpuRaftConfig {
        &self.config
    }

    /// The newest commit certificate this node holds.
    pub fn certificate(&self) -> Option<&CommitCertificate> {
        self.certificate.as_ref()
    }

    /// The chain value of this node's log at `index`, if the log reaches it.
    pub fn chain_at(&self, index: LogIndex) -> Option<[u8; 32]> {
        self.chain.at(index)
    }

    /// Checks `certificate` alone against the membership it names in this node's log (its
    /// voters and their keys), with the configured verifier. Whether it certifies this node's
    /// log is [`GpuRaftNode::chain_at`]'s to tell.
    pub fn check_certificate(
        &self,
        certificate: &CommitCertificate,
    ) -> Result<(), super::CertificateError> {
        let membership = self
            .inner
            .membership_set_at(certificate.membership_index)
            .ok_or(super::CertificateError::UnknownMembership(
                certificate.membership_index,
            ))?;
        certificate.verify_under(membership, &*self.config.verifier)
    }

    /// The proofs this node holds, by offender.
    pub fn evidence(&self) -> &BTreeMap<NodeId, VoteEquivocation> {
        &self.evidence
    }

    /// A leader's commit index when it took office: everything it committed beyond this, it
    /// committed by counting signed acknowledgements, so its certificate covers it.
    pub fn commit_when_elected(&self) -> LogIndex {
        self.commit_when_elected
    }

    /// Counted acknowledgements that a later check found bad: always 0 unless the core is
    /// broken (the simulator asserts it after every run).
    pub fn miscounted_acks(&self) -> u64 {
        self.miscounted
    }

    /// Feeds one input. A peer message must have passed [`Protocol::authenticate`].
    pub fn step(&mut self, input: Input, out: &mut Output) {
        match input {
            Input::Message(envelope) => self.receive(envelope, out),
            Input::Tick => {
                self.check_client_signatures(out);
                self.complete_certificate(out);
                self.step_inner(raft::Input::Tick, out);
            }
            Input::Propose { request_id, data } => self.propose(request_id, data, out),
            // A read's leadership check is the inner core's heartbeat round: its answers come
            // unsigned, over the authenticated transport, as heartbeats do; what a read needs
            // is a quorum still in the leader's term, not a promise about anyone's log.
            Input::Read { request_id } => self.step_inner(raft::Input::Read { request_id }, out),
            // A membership change is Raft's, with the members' keys carried in every membership
            // (the core refuses a learner without one): see `certify` for how it is counted.
            Input::Control(control) => self.step_inner(raft::Input::Control(control), out),
            Input::FlushProposals => {
                self.check_client_signatures(out);
                self.step_inner(raft::Input::FlushProposals, out);
            }
            Input::Durable { index, term } => {
                self.step_inner(raft::Input::Durable { index, term }, out)
            }
            Input::HardStateDurable(hard_state) => {
                self.step_inner(raft::Input::HardStateDurable(hard_state), out)
            }
            Input::PeerUnreachable { peer } => {
                self.step_inner(raft::Input::PeerUnreachable { peer }, out)
            }
            // The signed acknowledgements name a hash chain over the whole log, which a
            // compacted log could not extend: GPU-optimized Raft keeps its log whole.
            Input::SnapshotTaken(_) => {}
        }
        self.certify(out);
        self.seal_acks(out);
    }

    /// Signs the acknowledgements of this output, keeping only the highest to each leader in
    /// each term: it implies every lower one (log matching), so a follower that took in several
    /// appends in one round signs once rather than once per append.
    fn seal_acks(&self, out: &mut Output) {
        let mut highest: BTreeMap<(NodeId, Term), LogIndex> = BTreeMap::new();
        for envelope in &out.messages_after_write {
            if let Message::Ack(ack) = &envelope.message {
                let index = highest.entry((envelope.to, ack.term)).or_default();
                *index = (*index).max(ack.index);
            }
        }
        if highest.is_empty() {
            return;
        }
        out.messages_after_write
            .retain(|envelope| match &envelope.message {
                Message::Ack(ack) => {
                    let key = (envelope.to, ack.term);
                    // The first copy of the highest one stays; the others go.
                    let keep = highest.get(&key) == Some(&ack.index);
                    if keep {
                        highest.remove(&key);
                    }
                    keep
                }
                _ => true,
            });
        let key = &self.config.signing_key;
        let verifier = Some(&*self.config.verifier);
        for envelope in &mut out.messages_after_write {
            if let Message::Ack(ack) = &mut envelope.message
                && ack.signature.is_empty()
            {
                *ack = SignedAck::sign_and_tell(
                    ack.voter, ack.term, ack.index, ack.chain, key, verifier,
                );
            }
        }
    }

    /// A client's proposal, in its frame (see [`client_signature`](crate::client_signature)):
    /// an unsigned one goes to the core at once (unless the allow-list demands signatures); a
    /// signed one waits to be checked with the others, up to a batch.
    fn propose(&mut self, request_id: u64, data: Bytes, out: &mut Output) {
        let refuse = |out: &mut Output, reason| {
            out.rejected.push(crate::protocol::Rejection {
                request_id,
                reason: crate::protocol::RejectReason::ClientSignature { reason },
            });
        };
        let framed = match unframe(&data) {
            Ok(framed) => framed,
            Err(error) => return refuse(out, error.0),
        };
        match framed.to_check() {
            None if self.config.client_keys.is_some() => {
                refuse(out, "this cluster accepts signed commands only")
            }
            None => self.step_inner(raft::Input::Propose { request_id, data }, out),
            Some(check) => {
                if let Some(allowed) = &self.config.client_keys
                    && !allowed.contains(&check.0)
                {
                    return refuse(out, "the client's key is not allowed");
                }
                self.pending_signed.push((request_id, data, check));
                if self.pending_signed.len() >= self.config.raft.batch_size.max(1) {
                    self.check_client_signatures(out);
                }
            }
        }
    }

    /// Checks the waiting client signatures as one batch: the valid proposals go to the core
    /// in order, the others are refused.
    fn check_client_signatures(&mut self, out: &mut Output) {
        if self.pending_signed.is_empty() {
            return;
        }
        let pending = std::mem::take(&mut self.pending_signed);
        let items: Vec<SignatureItem<'_>> = pending
            .iter()
            .map(|(_, _, (public_key, signature, message))| SignatureItem {
                public_key: *public_key,
                message,
                signature: *signature,
            })
            .collect();
        let verdicts = verdicts_or_reference(&*self.config.verifier, &items);
        drop(items);
        for ((request_id, data, _), valid) in pending.into_iter().zip(verdicts) {
            if valid {
                self.step_inner(raft::Input::Propose { request_id, data }, out);
            } else {
                out.rejected.push(crate::protocol::Rejection {
                    request_id,
                    reason: crate::protocol::RejectReason::ClientSignature {
                        reason: "the signature does not verify",
                    },
                });
            }
        }
    }

    fn receive(&mut self, envelope: Envelope, out: &mut Output) {
        let Envelope { from, to, message } = envelope;
        let plain = match message {
            Message::Raft(message) => message,
            Message::Grant {
                term,
                pre_vote,
                signature,
            } => {
                if pre_vote {
                    raft::Message::PreVoteResponse {
                        term,
                        granted: true,
                    }
                } else {
                    self.note_vote(SignedVote {
                        term,
                        candidate: to,
                        voter: from,
                        signature,
                    });
                    raft::Message::RequestVoteResponse {
                        term,
                        granted: true,
                    }
                }
            }
            Message::Ack(ack) => {
                if self.inner.is_leader() && ack.term == self.inner.term() {
                    if self.chain.at(ack.index) != Some(ack.chain) {
                        // Signed, but over another log than ours: never counted.
                        self.invalid.add(InvalidReason::Malformed, 1);
                        return;
                    }
                    self.note_ack(ack.clone());
                }
                raft::Message::AppendEntriesResponse {
                    term: ack.term,
                    index: ack.index,
                    reject: None,
                }
            }
            Message::Certified {
                message,
                certificate,
            } => {
                self.step_inner(
                    raft::Input::Message(raft::Envelope { from, to, message }),
                    out,
                );
                self.hold_certificate(*certificate, out);
                return;
            }
            Message::Elected { term, votes } => {
                for vote in votes {
                    if vote.term == term && vote.candidate == from {
                        self.check_votes(vote, out);
                    }
                }
                return;
            }
        };
        self.step_inner(
            raft::Input::Message(raft::Envelope {
                from,
                to,
                message: plain,
            }),
            out,
        );
    }

    /// A leader keeps each voter's newest acknowledgement of its term.
    fn note_ack(&mut self, ack: SignedAck) {
        if self.acks_term != self.inner.term() {
            self.acks.clear();
            self.acks_term = self.inner.term();
        }
        match self.acks.get(&ack.voter) {
            Some(held) if held.index >= ack.index => {}
            _ => {
                self.acks.insert(ack.voter, ack);
            }
        }
    }

    /// A candidate keeps the votes granted to it, to cut evidence from the winner's.
    fn note_vote(&mut self, vote: SignedVote) {
        if vote.term != self.votes_term {
            self.votes_received.clear();
            self.votes_term = vote.term;
        }
        self.votes_received.insert(vote.voter, vote);
    }

    /// `vote`, announced by the candidate it elected, against the vote its voter gave this
    /// node in the same term: two of them for two candidates prove the voter broke its promise.
    fn check_votes(&mut self, vote: SignedVote, out: &mut Output) {
        if self.evidence.contains_key(&vote.voter) || vote.term != self.votes_term {
            return;
        }
        let Some(mine) = self.votes_received.get(&vote.voter) else {
            return;
        };
        let Ok(proof) = VoteEquivocation::new(mine.clone(), vote) else {
            return;
        };
        let offender = proof.offender();
        let mut key = EVIDENCE.to_vec();
        key.extend_from_slice(&offender.0.to_be_bytes());
        out.write.put_record(key, encode(&proof));
        self.evidence.insert(offender, proof);
        out.events.push(Event::ByzantineDetected {
            offender,
            offence: "vote_equivocation",
        });
    }

    /// A follower keeps a certificate newer than its own when it certifies this node's log.
    fn hold_certificate(&mut self, certificate: CommitCertificate, out: &mut Output) {
        let newer = self
            .certificate
            .as_ref()
            .is_none_or(|held| certificate.index > held.index);
        if newer
            && self.chain.at(certificate.index) == Some(certificate.chain)
            && self.inner.log().term_at(certificate.index) == Some(certificate.term)
        {
            self.keep(certificate, out);
        }
    }

    /// Makes `certificate` the newest, persisted (and kept for good once per
    /// [`CERTIFICATE_SPACING`] indices).
    fn keep(&mut self, certificate: CommitCertificate, out: &mut Output) {
        if self
            .certificate
            .as_ref()
            .is_some_and(|held| held.index >= certificate.index)
        {
            return;
        }
        let bytes = encode(&certificate);
        if certificate.index >= self.kept_index + CERTIFICATE_SPACING {
            self.kept_index = certificate.index;
            out.write
                .put_record(history_key(certificate.index), bytes.clone());
        }
        out.write.put_record(LATEST_CERTIFICATE, bytes);
        self.certificate = Some(certificate);
    }

    /// Steps the inner core and translates what it output.
    fn step_inner(&mut self, input: raft::Input, out: &mut Output) {
        let mut scratch = std::mem::take(&mut self.scratch);
        self.inner.step(input, &mut scratch);
        self.translate(&mut scratch, out);
        self.scratch = scratch;
    }

    /// Carries the inner output over: follows its log write with the chain, signs its granted
    /// votes and successful acknowledgements, attaches the newest certificate to appends.
    fn translate(&mut self, scratch: &mut raft::Output, out: &mut Output) {
        if !self.validators_written {
            self.validators_written = true;
            out.write
                .put_record(VALIDATORS, encode(&self.validator_table()));
        }
        let write = &mut scratch.write;
        if let Some(from) = write.truncate_from {
            self.chain.truncate_from(from);
        }
        self.chain.append(&write.append);
        out.write.merge_log(write.truncate_from, &write.append);
        if let Some(hard_state) = write.hard_state {
            out.write.hard_state = Some(hard_state);
        }
        out.write.records.append(&mut write.records);
        out.write.snapshot_parts.append(&mut write.snapshot_parts);
        write.clear();
        for envelope in scratch.messages.drain(..) {
            if let Some(envelope) = self.sign(envelope) {
                out.messages.push(envelope);
            }
        }
        for envelope in scratch.messages_after_write.drain(..) {
            if let Some(envelope) = self.sign(envelope) {
                out.messages_after_write.push(envelope);
            }
        }
        for mut entry in scratch.committed.drain(..) {
            // The state machine applies the command alone; the log keeps its frame.
            if let crate::types::Payload::Command { data, .. } = &mut entry.payload {
                match unframe(data) {
                    Ok(framed) => *data = framed.command().clone(),
                    // Only framed commands are ever appended; an unframed one came from a
                    // damaged log and is applied as it is, which the operator's verify-log
                    // will show.
                    Err(error) => tracing::error!(index = entry.index, %error, "unframed command"),
                }
            }
            out.committed.push(entry);
        }
        out.rejected.append(&mut scratch.rejected);
        out.reads.append(&mut scratch.reads);
        out.events.append(&mut scratch.events);
        self.announce_election(out);
    }

    /// One outgoing message of the inner core, signed where it promises something.
    fn sign(&mut self, envelope: raft::Envelope) -> Option<Envelope> {
        let raft::Envelope { from, to, message } = envelope;
        let key = &self.config.signing_key;
        let verifier = Some(&*self.config.verifier);
        let message = match message {
            raft::Message::PreVoteResponse {
                term,
                granted: true,
            } => Message::Grant {
                term,
                pre_vote: true,
                signature: Bytes::copy_from_slice(&sign_and_tell(
                    key,
                    &pre_vote_bytes(term, to, from),
                    verifier,
                )),
            },
            raft::Message::RequestVoteResponse {
                term,
                granted: true,
            } => Message::Grant {
                term,
                pre_vote: false,
                signature: SignedVote::sign_and_tell(term, to, from, key, verifier).signature,
            },
            raft::Message::AppendEntriesResponse {
                term,
                index,
                reject: None,
            } => {
                // Signed when the step ends, once per recipient and term (see `seal_acks`).
                let chain = self.chain.at(index)?;
                Message::Ack(SignedAck {
                    voter: from,
                    term,
                    index,
                    chain,
                    signature: Bytes::new(),
                })
            }
            // Certificates ride on heartbeats only, and under load on one heartbeat in
            // `CERTIFICATE_HEARTBEATS`: with n voters a certificate holds n/2 + 1 signatures
            // that every follower checks, so sending one with every append would cost the
            // cluster n²/2 verifications per commit. A certificate that stood still for a
            // heartbeat (the cluster went idle) goes out at once.
            message @ raft::Message::Heartbeat { .. } => {
                let index = self.certificate.as_ref().map_or(0, |c| c.index);
                let pace = self.certificate_sent.entry(to).or_default();
                pace.heartbeats += 1;
                let settled = pace.seen_at_last_heartbeat == index;
                pace.seen_at_last_heartbeat = index;
                match &self.certificate {
                    Some(certificate)
                        if self.inner.is_leader()
                            && certificate.term == self.inner.term()
                            && pace.sent < certificate.index
                            && (settled || pace.heartbeats >= CERTIFICATE_HEARTBEATS)
                            // It holds the certified log, and with it the membership the
                            // certificate names.
                            && self
                                .inner
                                .progress(to)
                                .is_some_and(|p| p.match_index >= certificate.index) =>
                    {
                        pace.sent = certificate.index;
                        pace.heartbeats = 0;
                        Message::Certified {
                            message,
                            certificate: Box::new(certificate.clone()),
                        }
                    }
                    _ => Message::Raft(message),
                }
            }
            message => Message::Raft(message),
        };
        Some(Envelope { from, to, message })
    }

    /// A new leader tells every peer the votes that elected it.
    fn announce_election(&mut self, out: &mut Output) {
        let term = self.inner.term();
        if !self.inner.is_leader() || self.announced_term == term {
            return;
        }
        self.announced_term = term;
        self.commit_when_elected = self.inner.commit_index();
        self.certificate_sent.clear();
        self.uncertified = (0, 0);
        let votes: Vec<SignedVote> = if self.votes_term == term {
            self.votes_received.values().cloned().collect()
        } else {
            Vec::new()
        };
        if votes.is_empty() {
            return;
        }
        let me = self.inner.id();
        let voters = self.inner.membership().all_voters();
        for peer in voters.into_iter().filter(|&peer| peer != me) {
            out.messages.push(Envelope {
                from: me,
                to: peer,
                message: Message::Elected {
                    term,
                    votes: votes.clone(),
                },
            });
        }
    }

    /// Leader: counts the signed acknowledgements of its term (its own among them) with the
    /// vote aggregator, commits the highest index a quorum holds, and keeps the certificate.
    fn certify(&mut self, out: &mut Output) {
        if !self.inner.is_leader() {
            return;
        }
        let term = self.inner.term();
        let me = self.inner.id();
        let durable = self.inner.durable_index();
        let own_stale = self
            .acks
            .get(&me)
            .is_none_or(|ack| ack.index < durable || self.acks_term != term);
        if own_stale
            && durable > self.inner.commit_index()
            && let Some(chain) = self.chain.at(durable)
        {
            // Signed only if a certificate needs it (see `build_certificate`).
            self.note_ack(SignedAck {
                voter: me,
                term,
                index: durable,
                chain,
                signature: Bytes::new(),
            });
        }
        if self.acks_term != term {
            return;
        }
        // Counted under the membership in force, and only acknowledgements that reach its
        // entry: then every index committed is at or past that entry, so a certificate's
        // membership lies inside the log it certifies (a stricter rule than Raft's, which only
        // delays a commit until the membership entry itself is stored by a quorum).
        let membership_index = self.inner.membership_index();
        let membership = self.inner.membership();
        let commit = self.inner.commit_index();
        let log = self.inner.log();
        let mut candidates: Vec<LogIndex> = self
            .acks
            .values()
            .map(|ack| ack.index)
            .filter(|&index| {
                index > commit && index >= membership_index && log.term_at(index) == Some(term)
            })
            .collect();
        candidates.sort_unstable();
        candidates.dedup();
        if candidates.is_empty() {
            return;
        }
        // One ballot per candidate and voter set: a joint membership needs a majority of the
        // incoming voters and one of the outgoing voters, each its own ballot. Each ballot is
        // its own "term" for the aggregator, which takes a voter's second vote in one term for
        // an equivocation and drops it: with one term, a voter whose acknowledgement reaches
        // several candidates would count for the lowest alone.
        #[cfg(any(test, feature = "sim"))]
        let joint = membership.is_joint() && !self.config.injected_bugs.ignore_outgoing_voters;
        #[cfg(not(any(test, feature = "sim")))]
        let joint = membership.is_joint();
        let sets: Vec<&BTreeSet<NodeId>> = if joint {
            vec![&membership.voters, &membership.outgoing]
        } else {
            vec![&membership.voters]
        };
        let ranks: BTreeMap<NodeId, u32> = membership.all_voters().into_iter().zip(0..).collect();
        let mut votes = Vec::with_capacity(candidates.len() * self.acks.len() * sets.len());
        for (candidate, &index) in candidates.iter().enumerate() {
            for (set_number, set) in sets.iter().enumerate() {
                let ballot = (candidate * sets.len() + set_number) as u64;
                for ack in self.acks.values().filter(|ack| ack.index >= index) {
                    if let Some(&rank) = ranks.get(&ack.voter).filter(|_| set.contains(&ack.voter))
                    {
                        votes.push(Vote::new(rank, ballot, true).in_term(ballot));
                    }
                }
            }
        }
        let outcome = self.aggregate(&votes);
        let Some(index) = candidates
            .iter()
            .enumerate()
            .rev()
            .find(|&(candidate, _)| {
                sets.iter().enumerate().all(|(set_number, set)| {
                    let ballot = (candidate * sets.len() + set_number) as u64;
                    outcome
                        .tally(ballot, ballot)
                        .is_some_and(|tally| tally.yes_count as usize > set.len() / 2)
                })
            })
            .map(|(_, &index)| index)
        else {
            return;
        };
        let counted = (index, membership_index);
        match self.build_certificate(term, counted, false) {
            Some(certificate) => self.keep(certificate, out),
            None if self.can_certify(counted) => self.uncertified = counted,
            None => {
                self.miscounted += 1;
                return;
            }
        }
        self.step_commit(index, out);
    }

    /// Leader: completes the certificate of what it committed on its own signature (once per
    /// tick, before the tick's heartbeats leave).
    fn complete_certificate(&mut self, out: &mut Output) {
        let held = self.certificate.as_ref().map_or(0, |c| c.index);
        if !self.inner.is_leader() || self.uncertified.0 <= held {
            return;
        }
        match self.build_certificate(self.inner.term(), self.uncertified, true) {
            Some(certificate) => self.keep(certificate, out),
            None => self.miscounted += 1,
        }
    }

    /// Whether acknowledgements (the leader's own unsigned one included) of a quorum of the
    /// membership set at `counted.1` reach `counted.0`.
    fn can_certify(&self, (index, membership_index): (LogIndex, LogIndex)) -> bool {
        let Some(membership) = self.inner.membership_set_at(membership_index) else {
            return false;
        };
        membership.has_quorum(|id| self.acks.get(&id).is_some_and(|ack| ack.index >= index))
    }

    /// Leader: the certificate of everything it committed, its own acknowledgement signed if
    /// it must be (for checks: the node's state is unchanged).
    pub fn certificate_of_commit(&self) -> Option<CommitCertificate> {
        let held = self.certificate.as_ref().map_or(0, |c| c.index);
        if self.uncertified.0 <= held || !self.inner.is_leader() {
            return self.certificate.clone();
        }
        self.build_certificate(self.inner.term(), self.uncertified, true)
    }

    /// The certificate for `counted.0`, counted under the membership set at `counted.1`: the
    /// acknowledgements of its voters closest above the index, the followers' first, until
    /// they are a quorum. The leader's own is signed only when the certificate needs it, and
    /// then only with `sign_own` (else `None`).
    fn build_certificate(
        &self,
        term: Term,
        (index, membership_index): (LogIndex, LogIndex),
        sign_own: bool,
    ) -> Option<CommitCertificate> {
        let membership = self.inner.membership_set_at(membership_index)?;
        let mut candidates: Vec<&SignedAck> = self
            .acks
            .values()
            .filter(|ack| ack.index >= index && membership.is_voter(ack.voter))
            .collect();
        candidates.sort_by_key(|ack| (ack.signature.is_empty(), ack.index));
        let mut chosen: Vec<&SignedAck> = Vec::with_capacity(candidates.len());
        for ack in candidates {
            if membership.has_quorum(|id| chosen.iter().any(|held| held.voter == id)) {
                break;
            }
            chosen.push(ack);
        }
        if !membership.has_quorum(|id| chosen.iter().any(|held| held.voter == id)) {
            return None;
        }
        let key = &self.config.signing_key;
        let mut acks = Vec::with_capacity(chosen.len());
        for ack in chosen {
            if ack.signature.is_empty() {
                if !sign_own {
                    return None;
                }
                acks.push(SignedAck::sign_and_tell(
                    ack.voter,
                    ack.term,
                    ack.index,
                    ack.chain,
                    key,
                    Some(&*self.config.verifier),
                ));
            } else {
                acks.push(ack.clone());
            }
        }
        let highest = acks.iter().map(|ack| ack.index).max()?;
        acks.sort_by_key(|ack| ack.voter);
        Some(CommitCertificate {
            term,
            index,
            chain: self.chain.at(index)?,
            path: self.chain.digests(index + 1, highest)?,
            acks,
            membership_index,
        })
    }

    fn step_commit(&mut self, index: LogIndex, out: &mut Output) {
        let mut scratch = std::mem::take(&mut self.scratch);
        self.inner.commit_certified(index, &mut scratch);
        self.translate(&mut scratch, out);
        self.scratch = scratch;
    }

    fn aggregate(&self, votes: &[Vote]) -> VoteOutcome {
        match futures::executor::block_on(self.config.votes.aggregate_votes(votes)) {
            Ok(outcome) => outcome,
            Err(error) => {
                tracing::warn!(node = %self.inner.id(), %error,
                    "vote aggregator failed; counting this round on the CPU");
                CpuVoteAggregator::new(Threshold::MajorityOfVotesCast)
                    .aggregate_blocking(votes)
                    .unwrap_or_default()
            }
        }
    }

    /// The public keys of the voters this node started with, in id order: the membership that
    /// certificates counted before any change name (index 0).
    fn validator_table(&self) -> Vec<(NodeId, [u8; 32])> {
        bootstrap_keys(&self.config).collect()
    }

    /// The public key `id` signs with: the one the membership in force carries, else the one
    /// this node was configured with.
    fn key_of(&self, id: NodeId) -> Option<[u8; 32]> {
        self.inner
            .membership()
            .keys
            .get(&id)
            .copied()
            .or_else(|| self.config.validators.get(&id).map(|key| key.to_bytes()))
    }

    /// Why `envelope` is refused before any signature is checked, if it is; else pushes what
    /// its signatures must verify. Messages that promise nothing are taken from any sender the
    /// transport let through, as Raft takes them: a member that has not yet stored the entry
    /// adding a new leader must still take that leader's appends to learn of it.
    fn admit(
        &self,
        envelope: &Envelope,
        checks: &mut Vec<(Vec<u8>, [u8; 32], [u8; 64])>,
    ) -> Result<(), InvalidReason> {
        let Envelope { from, to, message } = envelope;
        let key_of = |id: &NodeId| self.key_of(*id).ok_or(InvalidReason::UnknownSigner);
        let signature_of = |bytes: &Bytes| {
            <[u8; 64]>::try_from(bytes.as_ref()).map_err(|_| InvalidReason::Malformed)
        };
        match message {
            Message::Raft(message) => match message {
                // A promise must come signed.
                raft::Message::PreVoteResponse { granted: true, .. }
                | raft::Message::RequestVoteResponse { granted: true, .. }
                | raft::Message::AppendEntriesResponse { reject: None, .. } => {
                    Err(InvalidReason::Malformed)
                }
                // The leader checks forwarded commands again: a follower is not trusted with
                // its clients' signatures.
                raft::Message::ForwardProposals { proposals, .. } => {
                    for (_, data) in proposals {
                        let framed = unframe(data).map_err(|_| InvalidReason::Malformed)?;
                        match (framed.to_check(), &self.config.client_keys) {
                            (None, Some(_)) => return Err(InvalidReason::Malformed),
                            (None, None) => {}
                            (Some((key, _, _)), Some(allowed)) if !allowed.contains(&key) => {
                                return Err(InvalidReason::UnknownSigner);
                            }
                            (Some((key, signature, bytes)), _) => {
                                checks.push((bytes, key, signature))
                            }
                        }
                    }
                    Ok(())
                }
                _ => Ok(()),
            },
            Message::Grant {
                term,
                pre_vote,
                signature,
            } => {
                let bytes = if *pre_vote {
                    pre_vote_bytes(*term, *to, *from)
                } else {
                    SignedVote::signing_bytes(*term, *to, *from)
                };
                checks.push((bytes, key_of(from)?, signature_of(signature)?));
                Ok(())
            }
            Message::Ack(ack) => {
                if ack.voter != *from {
                    return Err(InvalidReason::Malformed);
                }
                #[cfg(any(test, feature = "sim"))]
                if self.config.injected_bugs.accept_unchecked_acks {
                    return Ok(());
                }
                // Every acknowledgement is checked, even one at or below the commit index that
                // cannot move the commit: the leader tells a follower the commit capped at what
                // that follower acknowledged, so an unchecked one could make a follower apply
                // entries it does not hold (the simulator found exactly that when it was tried).
                let bytes = SignedAck::signing_bytes(ack.voter, ack.term, ack.index, &ack.chain);
                checks.push((bytes, key_of(from)?, signature_of(&ack.signature)?));
                Ok(())
            }
            Message::Certified { certificate, .. } => {
                // Counted under a membership this node's log does not hold (it lags, or holds
                // another entry there): it cannot judge it, and an honest leader sends
                // certificates only to followers that store their index.
                let membership = self
                    .inner
                    .membership_set_at(certificate.membership_index)
                    .ok_or(InvalidReason::Stale)?;
                let parts = certificate
                    .signed_parts(membership)
                    .map_err(|_| InvalidReason::Malformed)?;
                for (voter, bytes, signature) in parts {
                    let signature = signature.ok_or(InvalidReason::Malformed)?;
                    let key = membership
                        .keys
                        .get(&voter)
                        .copied()
                        .ok_or(InvalidReason::UnknownSigner)?;
                    checks.push((bytes, key, signature));
                }
                Ok(())
            }
            Message::Elected { term, votes } => {
                // Every vote is by a distinct signer this node knows a key of.
                let known = self.inner.membership().keys.len() + self.config.validators.len();
                if votes.len() > known {
                    return Err(InvalidReason::Malformed);
                }
                for vote in votes {
                    if vote.term != *term || vote.candidate != *from {
                        return Err(InvalidReason::Malformed);
                    }
                    let bytes = SignedVote::signing_bytes(vote.term, vote.candidate, vote.voter);
                    checks.push((bytes, key_of(&vote.voter)?, signature_of(&vote.signature)?));
                }
                Ok(())
            }
        }
    }
}

/// The configured keys of the voters a node starts with (its bootstrap membership's).
fn bootstrap_keys(config: &GpuRaftConfig) -> impl Iterator<Item = (NodeId, [u8; 32])> + '_ {
    config
        .raft
        .voters
        .iter()
        .filter_map(|id| Some((*id, config.validators.get(id)?.to_bytes())))
}

fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("encoding into a Vec cannot fail")
}

impl Protocol for GpuRaftNode {
    type Message = Message;
    type Control = Control;

    fn carried_proposals(
        message: &Message,
        sender: NodeId,
        visit: &mut dyn FnMut(crate::types::ProposalTag),
    ) -> crate::protocol::Carriage {
        match message {
            Message::Raft(message) | Message::Certified { message, .. } => {
                RaftNode::carried_proposals(message, sender, visit)
            }
            _ => crate::protocol::Carriage::Nothing,
        }
    }

    const AUTHENTICATES: bool = true;

    const SERVES_READS: bool = true;

    fn id(&self) -> NodeId {
        self.inner.id()
    }

    fn step(&mut self, input: Input, out: &mut Output) {
        GpuRaftNode::step(self, input, out);
    }

    /// Checks every signature of the round in one batch through the configured verifier (on a
    /// backend failure, on the CPU) and drops each message with a bad, missing or unknown one.
    fn authenticate(&mut self, messages: &mut Vec<Envelope>) -> usize {
        let mut refused: Vec<Option<InvalidReason>> = vec![None; messages.len()];
        let mut owners = Vec::new();
        let mut checks = Vec::new();
        for (index, envelope) in messages.iter().enumerate() {
            let before = checks.len();
            match self.admit(envelope, &mut checks) {
                Ok(()) => owners.extend(std::iter::repeat_n(index, checks.len() - before)),
                Err(reason) => {
                    checks.truncate(before);
                    refused[index] = Some(reason);
                }
            }
        }
        let items: Vec<SignatureItem<'_>> = checks
            .iter()
            .map(|(message, public_key, signature)| SignatureItem {
                public_key: *public_key,
                message,
                signature: *signature,
            })
            .collect();
        let verdicts = verdicts_or_reference(&*self.config.verifier, &items);
        crate::protocol::drop_refused(messages, refused, owners, verdicts, &mut self.invalid)
    }

    /// Steps the round's messages, then certifies once: the round's acknowledgements are
    /// counted in one vote-aggregator batch.
    fn step_round(&mut self, messages: &mut Vec<Envelope>, out: &mut Output) {
        for envelope in messages.drain(..) {
            self.receive(envelope, out);
        }
        self.certify(out);
        self.seal_acks(out);
    }

    fn invalid_messages(&self) -> InvalidCounts {
        self.invalid
    }

    fn status(&self) -> Status {
        Status {
            term: self.inner.term(),
            leader: self.inner.leader(),
            is_leader: self.inner.is_leader(),
            commit_index: self.inner.commit_index(),
            log_entries: self.inner.log().last_index() + 1 - self.inner.log().first_index(),
        }
    }

    fn replication_lag(&self) -> Vec<(NodeId, u64)> {
        crate::protocol::Protocol::replication_lag(&self.inner)
    }

    fn membership(&self) -> Option<crate::membership::Membership> {
        Some(self.inner.membership().clone())
    }

    /// Asked like Raft's, and refused in [`GpuRaftNode::step`] with its reason.
    fn membership_control(change: crate::membership::MembershipChange) -> Option<Control> {
        Some(Control::ChangeMembership(change))
    }

    fn into_recovered_state(self) -> RecoveredState {
        let mut records = BTreeMap::new();
        records.insert(VALIDATORS.to_vec(), encode(&self.validator_table()));
        if let Some(certificate) = &self.certificate {
            records.insert(LATEST_CERTIFICATE.to_vec(), encode(certificate));
            // The kept history is on disk in a real store; the latest alone restarts a node.
        }
        for (offender, proof) in &self.evidence {
            let mut key = EVIDENCE.to_vec();
            key.extend_from_slice(&offender.0.to_be_bytes());
            records.insert(key, encode(proof));
        }
        let mut recovered = self.inner.into_recovered_state();
        recovered.records = records;
        recovered
    }
}
