//! The record of what the Byzantine replicas of a run sent (see [`Ledger`]).

use std::collections::{BTreeMap, BTreeSet};

use ed25519_dalek::{Signature, VerifyingKey};

use crate::protocol::pbft::{Digest, Seq, Signed, Statement, View};
use crate::types::NodeId;

/// Statements remembered per replica at most; a run signs a few thousand. Past the bound a
/// conflict with a forgotten statement goes unnoticed (the suite would then report evidence
/// against a replica the ledger thinks innocent, never the reverse).
const STATEMENTS_KEPT: usize = 1 << 18;

/// The kinds of statement two of which, differing only in digest, prove an offence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    PrePrepare,
    Prepare,
    Commit,
}

/// What each Byzantine replica of a run actually sent, as the simulator handed it to the
/// network: the record that says whether a replica offended provably (two conflicting signed
/// statements, or an unjustified NEW-VIEW, left it), and counts of what each behaviour did.
///
/// It is shared by every instance of a replica (its incarnations across restarts, and a twin's
/// two instances), because an offence can be split between them: an equivocator's forged
/// pre-prepare sent before a crash conflicts with the honest one it sends after, and each twin
/// sends one of two conflicting votes.
#[derive(Debug, Default)]
pub struct Ledger {
    replicas: BTreeMap<NodeId, Record>,
}

/// What one replica sent.
#[derive(Debug, Default)]
struct Record {
    /// Its statements as they left it.
    sent: Statements,
    /// Its statements as honest replicas received them (signatures checked): an offence both
    /// halves of which reached honest replicas is one that honest replicas can prove.
    delivered: Statements,
    counts: BTreeMap<&'static str, u64>,
    /// Views for which an unjustified NEW-VIEW left, and the signatures of those NEW-VIEWs.
    unjustified_new_views: BTreeSet<View>,
    unjustified_signatures: BTreeSet<bytes::Bytes>,
    /// Whether an unjustified NEW-VIEW of it reached an honest replica.
    unjustified_delivered: bool,
}

/// One signer's statements, seen from one vantage point.
#[derive(Debug, Default)]
struct Statements {
    /// Per (kind, view, seq), the first statement of this signer, with its digest. Signatures
    /// are checked only when two differ: only then can it matter.
    first: BTreeMap<(Kind, View, Seq), (Digest, Signed)>,
    /// Two of them conflict.
    conflicting: bool,
    /// The (kind, view, sequence number) of the first two that did.
    conflict_at: Option<(&'static str, View, Seq)>,
}

impl Statements {
    /// Records `signed` (by the owner of `key`); true once two conflict.
    fn record(&mut self, key: &VerifyingKey, signed: &Signed) -> bool {
        if self.conflicting {
            return true; // proven once is enough (and a double voter conflicts in every message)
        }
        let kind = match signed.statement {
            Statement::PrePrepare { .. } => Kind::PrePrepare,
            Statement::Prepare { .. } => Kind::Prepare,
            Statement::Commit { .. } => Kind::Commit,
            _ => return false,
        };
        let Some((view, seq, digest)) = signed.statement.phase() else {
            return false;
        };
        match self.first.get(&(kind, view, seq)) {
            None if self.first.len() < STATEMENTS_KEPT => {
                self.first
                    .insert((kind, view, seq), (digest, signed.clone()));
            }
            Some((held_digest, held)) if *held_digest != digest => {
                if !verifies(signed, key) {
                    return false; // a bad signature proves nothing
                }
                if verifies(held, key) {
                    self.conflicting = true;
                    self.conflict_at = Some((kind.name(), view, seq));
                } else {
                    self.first
                        .insert((kind, view, seq), (digest, signed.clone()));
                }
            }
            _ => {}
        }
        self.conflicting
    }
}

/// What one Byzantine replica did in a run, for the suite's report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Actions {
    /// Something provable left it: two conflicting signed statements, or an unjustified
    /// NEW-VIEW.
    pub offended: bool,
    /// Honest replicas received (and could check) everything that proves it Byzantine:
    /// both conflicting statements, or the unjustified NEW-VIEW. Only then can every honest
    /// replica be expected to hold evidence against it; an offence whose half was lost on
    /// the way proves nothing to anyone.
    pub offence_delivered: bool,
    /// The kind of statement, view and sequence number at which honest replicas first received
    /// two conflicting statements of it.
    pub delivered_conflict_at: Option<(&'static str, View, Seq)>,
    /// Messages of each kind of misbehaviour that left it (per recipient).
    pub counts: BTreeMap<&'static str, u64>,
    /// Views for which an unjustified NEW-VIEW of it left.
    pub unjustified_new_views: usize,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::PrePrepare => "pre-prepare",
            Kind::Prepare => "prepare",
            Kind::Commit => "commit",
        }
    }
}

impl Record {
    fn offended(&self) -> bool {
        self.sent.conflicting || !self.unjustified_new_views.is_empty()
    }
}

impl Ledger {
    /// Records a statement inside a message that left `signer` (one of its own, or one it
    /// passes on); a second statement of `signer` for one (kind, view, seq) with another
    /// digest, both signatures valid under `key`, is an offence.
    pub(super) fn record_statement(&mut self, signer: NodeId, key: &VerifyingKey, signed: &Signed) {
        if signed.signer == signer {
            self.replicas
                .entry(signer)
                .or_default()
                .sent
                .record(key, signed);
        }
    }

    /// Records a statement of Byzantine `signer` that an honest replica received and
    /// authenticated (on its own or inside a certificate).
    pub(super) fn record_delivered(&mut self, key: &VerifyingKey, signed: &Signed) {
        let record = self.replicas.entry(signed.signer).or_default();
        if let Statement::NewView(_) = signed.statement
            && record.unjustified_signatures.contains(&signed.signature)
        {
            record.unjustified_delivered = true;
        }
        record.delivered.record(key, signed);
    }

    /// An unjustified NEW-VIEW of `signer` for `view` left it.
    pub(super) fn record_unjustified_new_view(&mut self, new_view: &Signed, view: View) {
        let record = self.replicas.entry(new_view.signer).or_default();
        record.unjustified_new_views.insert(view);
        record
            .unjustified_signatures
            .insert(new_view.signature.clone());
    }

    /// Counts one message of kind `what` that left `signer`.
    pub(super) fn count(&mut self, signer: NodeId, what: &'static str) {
        let record = self.replicas.entry(signer).or_default();
        *record.counts.entry(what).or_default() += 1;
    }

    /// True once something provable left `id`.
    pub fn offended(&self, id: NodeId) -> bool {
        self.replicas.get(&id).is_some_and(Record::offended)
    }

    /// What `id` did.
    pub fn actions(&self, id: NodeId) -> Actions {
        self.replicas
            .get(&id)
            .map(|record| Actions {
                offended: record.offended(),
                offence_delivered: record.delivered.conflicting || record.unjustified_delivered,
                delivered_conflict_at: record.delivered.conflict_at,
                counts: record.counts.clone(),
                unjustified_new_views: record.unjustified_new_views.len(),
            })
            .unwrap_or_default()
    }
}

fn verifies(signed: &Signed, key: &VerifyingKey) -> bool {
    let Ok(signature) = Signature::from_slice(&signed.signature) else {
        return false;
    };
    let bytes = Signed::signing_bytes(&signed.statement, signed.signer);
    key.verify_strict(&bytes, &signature).is_ok()
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::protocol::pbft::test_signing_key;

    fn prepare(digest: &[u8], by: NodeId) -> Signed {
        let statement = Statement::Prepare {
            view: 3,
            seq: 7,
            digest: Digest::of(&[digest]),
        };
        Signed::sign(statement, by, &test_signing_key(by))
    }

    #[test]
    fn two_valid_statements_for_one_slot_offend_and_nothing_else_does() {
        let me = NodeId(2);
        let key = test_signing_key(me).verifying_key();
        let mut ledger = Ledger::default();
        let record = |ledger: &mut Ledger, statements: &[Signed]| {
            for signed in statements {
                ledger.record_statement(me, &key, signed);
            }
        };
        record(&mut ledger, &[prepare(b"a", me), prepare(b"a", me)]);
        assert!(!ledger.offended(me), "the same statement twice");
        let mut unsigned = prepare(b"b", me);
        unsigned.signature = Bytes::from_static(&[0; 63]);
        record(&mut ledger, &[unsigned]);
        assert!(!ledger.offended(me), "a bad signature proves nothing");
        record(&mut ledger, &[prepare(b"b", NodeId(3))]);
        assert!(!ledger.offended(me), "another signer's statement");
        record(&mut ledger, &[prepare(b"b", me)]);
        assert!(ledger.offended(me));
        assert!(!ledger.offended(NodeId(3)));
    }

    #[test]
    fn a_bad_first_statement_gives_way_to_a_valid_one() {
        let me = NodeId(1);
        let key = test_signing_key(me).verifying_key();
        let mut ledger = Ledger::default();
        let mut bad = prepare(b"a", me);
        bad.signature = Bytes::from_static(&[0xee; 64]);
        for signed in [bad, prepare(b"b", me)] {
            ledger.record_statement(me, &key, &signed);
        }
        assert!(!ledger.offended(me));
        ledger.record_statement(me, &key, &prepare(b"a", me));
        assert!(ledger.offended(me), "b, then a, both valid");
    }
}
