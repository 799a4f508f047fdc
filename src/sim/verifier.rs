//! A signature verifier for simulations: the CPU reference, with every verdict remembered.
//!
//! In a simulated PBFT cluster one signed statement is checked by every replica it reaches,
//! again on every retransmission, and again inside every certificate that quotes it; the
//! verdicts are a pure function of (key, message, signature), so remembering them changes no
//! outcome and makes a seed several times faster.

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

impl SignatureVerifier for MemoizingVerifier {
    fn verify_batch(&self, items: &[SignatureItem<'_>]) -> Result<Vec<bool>, SigVerifyError> {
        let mut verdicts = lock(&self.verdicts);
        if verdicts.len() > REMEMBERED {
            verdicts.clear();
        }
        Ok(items
            .iter()
            .map(|item| {
                let key = (item.public_key, item.signature, Digest::of(&[item.message]));
                *verdicts
                    .entry(key)
                    .or_insert_with(|| verify_strict_reference(item))
            })
            .collect())
    }

    fn backend_name(&self) -> &'static str {
        "cpu-memoized"
    }
}
