//! A signature verifier for simulations: the CPU reference, with every verdict remembered.
//!
//! In a simulated PBFT cluster one signed statement is checked by every replica it reaches,
//! again on every retransmission, and again inside every certificate that quotes it; the
//! verdicts are a pure function of (key, message, signature), so remembering them changes no
//! outcome and makes a seed several times faster. What a simulated replica signs itself it
//! reports ([`SignatureVerifier::signed_here`]), and that verdict is known without a check: the
//! curve arithmetic is spent only on what no replica's own signing produced (forgeries,
//! impersonations, corrupted copies).

use std::collections::HashMap;
use std::sync::Mutex;

use crate::gpu::sigverify::{
    SigVerifyError, SignatureItem, SignatureVerifier, verify_strict_reference,
};
use crate::protocol::pbft::Digest;
use crate::sync::lock;

/// Verdicts remembered at most; the memory is cleared when it is full.
const REMEMBERED: usize = 1 << 20;

/// What a verdict is remembered by: the public key, the signature and the message's digest.
type Question = ([u8; 32], [u8; 64], Digest);

/// [`verify_strict_reference`] with a memory of its verdicts.
#[derive(Debug, Default)]
pub struct MemoizingVerifier {
    verdicts: Mutex<HashMap<Question, bool>>,
}

impl MemoizingVerifier {
    fn question(item: &SignatureItem<'_>) -> Question {
        (item.public_key, item.signature, Digest::of(&[item.message]))
    }

    fn verdicts(&self) -> std::sync::MutexGuard<'_, HashMap<Question, bool>> {
        let mut verdicts = lock(&self.verdicts);
        if verdicts.len() > REMEMBERED {
            verdicts.clear();
        }
        verdicts
    }
}

impl SignatureVerifier for MemoizingVerifier {
    fn verify_batch(&self, items: &[SignatureItem<'_>]) -> Result<Vec<bool>, SigVerifyError> {
        let mut verdicts = self.verdicts();
        Ok(items
            .iter()
            .map(|item| {
                *verdicts
                    .entry(Self::question(item))
                    .or_insert_with(|| verify_strict_reference(item))
            })
            .collect())
    }

    fn signed_here(&self, item: &SignatureItem<'_>) {
        self.verdicts().insert(Self::question(item), true);
    }

    fn backend_name(&self) -> &'static str {
        "cpu-memoized"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::CpuSignatureVerifier;
    use crate::gpu::sigverify::sign_and_tell;
    use crate::protocol::pbft::test_signing_key;
    use crate::types::NodeId;

    fn item<'a>(key: [u8; 32], message: &'a [u8], signature: [u8; 64]) -> SignatureItem<'a> {
        SignatureItem {
            public_key: key,
            message,
            signature,
        }
    }

    #[test]
    fn what_a_replica_signed_is_known_and_anything_else_is_checked() {
        let verifier = MemoizingVerifier::default();
        let (alice, bob) = (test_signing_key(NodeId(1)), test_signing_key(NodeId(2)));
        let signature = sign_and_tell(&alice, b"prepare 7", Some(&verifier));
        let alice_key = alice.verifying_key().to_bytes();
        let bob_key = bob.verifying_key().to_bytes();
        let verdicts = verifier
            .verify_batch(&[
                item(alice_key, b"prepare 7", signature),
                // The same signature over other bytes, or claimed by another key: checked, refused.
                item(alice_key, b"prepare 8", signature),
                item(bob_key, b"prepare 7", signature),
            ])
            .unwrap();
        assert_eq!(verdicts, [true, false, false]);
        // What it is told it takes as checked without the curve: so only the signer may tell.
        let mut forged = signature;
        forged[0] ^= 1;
        verifier.signed_here(&item(alice_key, b"told", forged));
        assert_eq!(
            verifier
                .verify_batch(&[item(alice_key, b"told", forged)])
                .unwrap(),
            [true]
        );
    }

    #[test]
    fn a_production_verifier_ignores_what_it_is_told() {
        let verifier = CpuSignatureVerifier;
        let alice = test_signing_key(NodeId(1));
        let mut forged = sign_and_tell(&alice, b"commit", Some(&verifier));
        forged[0] ^= 1;
        let told = item(alice.verifying_key().to_bytes(), b"commit", forged);
        verifier.signed_here(&told);
        assert_eq!(verifier.verify_batch(&[told]).unwrap(), [false]);
    }
}
