//! The CPU backend and reference: ed25519-dalek's `verify_strict` per item, spread over all cores
//! with rayon.
//!
//! Why there is no "batch check first" fast path: `ed25519_dalek::verify_batch` checks one random
//! linear combination of the *cofactorless* equations and does none of `verify_strict`'s
//! rejections (small-order `A` or `R`, non-canonical `R` encodings). Worse, its coefficients come
//! from a transcript of the inputs alone (no fresh randomness in ed25519-dalek 3), so an item
//! whose equation is off by a small-order point (a mixed-order `R`, for instance) passes a batch
//! with probability about 1/2 to 1/8 per try and can be ground until it does, while
//! `verify_strict` rejects it on every try. A passing batch therefore does not prove any
//! `verify_strict` verdict, and the pre-checks that would close the gap (prime-order subgroup
//! membership of every `A` and `R`, i.e. `[L]P = 0`) cost more than the batch saves. The tests
//! below show both gaps on concrete inputs. Per-item checks on all cores are exact and already
//! scale linearly with cores.

use rayon::prelude::*;

use super::{SigVerifyError, SignatureItem, SignatureVerifier, verify_strict_reference};

/// Below this many items per rayon task, splitting costs more than it saves (one strict
/// verification is ~40 µs on one core).
const MIN_ITEMS_PER_TASK: usize = 8;

/// ed25519-dalek `verify_strict` on all cores: the reference every other backend must equal.
#[derive(Debug, Default, Clone, Copy)]
pub struct CpuSignatureVerifier;

impl CpuSignatureVerifier {
    /// The CPU verifier (it uses rayon's global pool, i.e. all cores).
    pub fn new() -> Self {
        Self
    }

    /// Verdicts without the `Result` wrapper: the CPU backend cannot fail.
    pub fn verdicts(&self, items: &[SignatureItem<'_>]) -> Vec<bool> {
        items
            .par_iter()
            .with_min_len(MIN_ITEMS_PER_TASK)
            .map(verify_strict_reference)
            .collect()
    }
}

impl SignatureVerifier for CpuSignatureVerifier {
    fn verify_batch(&self, items: &[SignatureItem<'_>]) -> Result<Vec<bool>, SigVerifyError> {
        Ok(self.verdicts(items))
    }

    fn backend_name(&self) -> &'static str {
        "cpu"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::sigverify::vectors;

    fn batch_accepts(items: &[vectors::OwnedItem]) -> bool {
        let messages: Vec<&[u8]> = items.iter().map(|item| item.message.as_slice()).collect();
        let signatures: Vec<ed25519_dalek::Signature> = items
            .iter()
            .map(|item| ed25519_dalek::Signature::from_bytes(&item.signature))
            .collect();
        let keys: Vec<ed25519_dalek::VerifyingKey> = items
            .iter()
            .map(|item| {
                ed25519_dalek::VerifyingKey::from_bytes(&item.public_key).expect("key decodes")
            })
            .collect();
        ed25519_dalek::verify_batch(&messages, &signatures, &keys).is_ok()
    }

    #[test]
    fn cpu_matches_reference_on_valid_and_tampered_items() {
        let mut items = vectors::random_valid_items(11, 40, 64);
        for item in items.iter_mut().skip(1).step_by(3) {
            item.message[0] ^= 1;
        }
        let refs: Vec<_> = items.iter().map(|item| item.as_item()).collect();
        let verdicts = CpuSignatureVerifier::new().verdicts(&refs);
        let expected: Vec<bool> = (0..40).map(|index| index % 3 != 1).collect();
        assert_eq!(verdicts, expected);
    }

    /// A weak key (the identity) with `R` = identity and `s` = 0 satisfies the batch equation for
    /// every message; `verify_strict` rejects it. A batch pass cannot stand in for strict verdicts.
    #[test]
    fn dalek_batch_accepts_small_order_key_that_strict_rejects() {
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let mut signature = [0u8; 64];
        signature[..32].copy_from_slice(&identity);
        let item = vectors::OwnedItem {
            public_key: identity,
            message: b"any message".to_vec(),
            signature,
        };
        assert!(batch_accepts(std::slice::from_ref(&item)));
        assert!(!verify_strict_reference(&item.as_item()));
    }

    /// A signature whose `R` carries a small-order component (mixed order, so not rejected as
    /// small order) fails `verify_strict` on every message, yet passes the batch equation for
    /// roughly half the messages because the batch coefficient is even half the time.
    #[test]
    fn dalek_batch_accepts_mixed_order_r_that_strict_rejects() {
        let mut batch_passes = 0;
        for counter in 0..32u8 {
            let item = vectors::mixed_order_r_item(5, &[counter; 16]);
            assert!(!verify_strict_reference(&item.as_item()));
            if batch_accepts(std::slice::from_ref(&item)) {
                batch_passes += 1;
            }
        }
        assert!(
            batch_passes > 0,
            "expected some batch passes, got {batch_passes}"
        );
    }
}
