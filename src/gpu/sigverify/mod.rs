//! Batch ed25519 signature verification with one contract for every backend: each verdict equals
//! `ed25519_dalek::VerifyingKey::from_bytes(key)` followed by `verify_strict(message, signature)`
//! for that item, on every input, adversarial ones included.
//!
//! Backends:
//! - [`CpuSignatureVerifier`]: ed25519-dalek on all cores (rayon), the reference.
//! - [`GpuSignatureVerifier`]: one WGSL kernel (`shaders/ed25519_verify.wgsl`) that interprets a
//!   straight-line program of field operations mod 2^255-19 on 13-bit limbs: point decompression,
//!   small-order checks, a double-scalar multiplication with a precomputed base-point table, and
//!   the comparison of the canonical encoding of `[s]B - [k]A` with the signature's `R` bytes;
//!   the reduction of the 512-bit hash mod L and the `s < L` check run before the program. The
//!   program is generated and checked on the CPU (`program.rs`); SHA-512 of `R‖A‖M` runs on CPU
//!   threads, overlapped with the previous dispatch. It checks itself against the CPU reference
//!   when built and refuses to exist if any verdict differs.
//! - [`AutoSignatureVerifier`]: the CPU below [`GPU_CROSSOVER_BATCH`] items, the GPU above, and the
//!   CPU again (counted) when the GPU fails.
//!
//! The GPU and automatic backends need the `gpu` feature; the CPU backend, the reference, the
//! test vectors and the text format are always built.
//!
//! What `verify_strict` accepts, spelled out (the GPU kernel mirrors each point):
//! - the key decodes as curve25519-dalek's `CompressedEdwardsY::decompress` does: bit 255 is the
//!   sign of x, y is read mod p (so the 19 encodings y ≥ p are read as y - p), a y with no x is
//!   rejected, and x = 0 with the sign bit set is *accepted* (negating 0 changes nothing);
//! - `R` decodes the same way, `s < L` (a set bit 255 is rejected too);
//! - neither `A` nor `R` has small order (`[8]P = identity`); points of mixed order pass;
//! - `k = SHA-512(R_bytes ‖ A_bytes ‖ M) mod L` with the bytes as given (non-canonical key
//!   encodings are hashed as they are), and the canonical encoding of `[s]B - [k]A` equals the
//!   32 `R` bytes exactly (so a non-canonical `R` encoding never verifies).

#[cfg(feature = "gpu")]
mod auto;
// Everything the wgpu backend alone needs: the base-point table, the generated verification
// program and the generator of the unrolled field WGSL.
#[cfg(feature = "gpu")]
mod base_table;
#[cfg(all(test, feature = "gpu"))]
mod codegen;
mod cpu;
#[cfg(feature = "gpu")]
mod gpu;
mod input;
#[cfg(feature = "gpu")]
mod program;
pub mod vectors;

#[cfg(feature = "gpu")]
#[cfg_attr(docsrs, doc(cfg(feature = "gpu")))]
pub use auto::{AutoSignatureVerifier, GPU_CROSSOVER_BATCH};
pub use cpu::CpuSignatureVerifier;
#[cfg(feature = "gpu")]
#[cfg_attr(docsrs, doc(cfg(feature = "gpu")))]
pub use gpu::{
    BuildingBlock, GpuSignatureVerifier, GpuVerifierOptions, SOFTWARE_ADAPTER_OPS_PER_DISPATCH,
    run_building_block,
};
pub use input::{
    ParseItemError, VerifyLinesError, format_item_line, parse_item_line, verify_lines,
};

use super::GpuError;

/// Length in bytes of an ed25519 public key.
pub const PUBLIC_KEY_BYTES: usize = 32;
/// Length in bytes of an ed25519 signature (`R ‖ s`).
pub const SIGNATURE_BYTES: usize = 64;

/// One signature to check: the signer's public key, the signed message and the signature bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignatureItem<'a> {
    /// The public key `A` as sent (possibly not a valid encoding).
    pub public_key: [u8; PUBLIC_KEY_BYTES],
    /// The message that was signed.
    pub message: &'a [u8],
    /// The signature `R ‖ s` as sent.
    pub signature: [u8; SIGNATURE_BYTES],
}

impl<'a> SignatureItem<'a> {
    /// Builds an item from byte slices of any length.
    ///
    /// # Errors
    /// [`SigVerifyError::KeyLength`] or [`SigVerifyError::SignatureLength`] when a slice has the
    /// wrong length; callers that must answer per item treat such an item as invalid.
    pub fn from_slices(
        public_key: &[u8],
        signature: &[u8],
        message: &'a [u8],
    ) -> Result<Self, SigVerifyError> {
        let public_key: [u8; PUBLIC_KEY_BYTES] = public_key
            .try_into()
            .map_err(|_| SigVerifyError::KeyLength(public_key.len()))?;
        let signature: [u8; SIGNATURE_BYTES] = signature
            .try_into()
            .map_err(|_| SigVerifyError::SignatureLength(signature.len()))?;
        Ok(Self {
            public_key,
            message,
            signature,
        })
    }
}

/// What can go wrong while verifying a batch. An invalid signature is not an error: it is a
/// `false` verdict.
#[derive(Debug, thiserror::Error)]
pub enum SigVerifyError {
    /// A public key slice was not 32 bytes long.
    #[error("public key must be {PUBLIC_KEY_BYTES} bytes, got {0}")]
    KeyLength(usize),
    /// A signature slice was not 64 bytes long.
    #[error("signature must be {SIGNATURE_BYTES} bytes, got {0}")]
    SignatureLength(usize),
    /// The GPU backend failed (no adapter, shader compile, timeout, device lost, readback).
    #[error(transparent)]
    Gpu(#[from] GpuError),
    /// The GPU kernels disagreed with the CPU reference on the known-answer check run when the
    /// GPU verifier is built, so the GPU backend is refused.
    #[error("GPU self-check failed: {mismatches} of {checked} verdicts differ from the CPU")]
    SelfCheckFailed {
        /// Verdicts that differed.
        mismatches: usize,
        /// Verdicts compared.
        checked: usize,
    },
}

/// Verifies batches of ed25519 signatures.
///
/// Contract: `verify_batch(items)[i]` is `true` exactly when
/// `VerifyingKey::from_bytes(&items[i].public_key)` succeeds and `verify_strict(items[i].message,
/// &Signature::from_bytes(&items[i].signature))` returns `Ok`; the result has one verdict per item,
/// in order. The call blocks until all verdicts are known (run it on a blocking thread from async
/// code).
pub trait SignatureVerifier: Send + Sync {
    /// Checks every item; see the trait documentation for the exact meaning of a verdict.
    ///
    /// # Errors
    /// Only a backend failure (GPU lost, timed out, unmappable); never an invalid signature.
    fn verify_batch(&self, items: &[SignatureItem<'_>]) -> Result<Vec<bool>, SigVerifyError>;

    /// A short name for logs and metrics ("cpu", "gpu", "auto").
    fn backend_name(&self) -> &'static str;

    /// Told of a signature this process just made over `item.message` with the secret key of
    /// `item.public_key`: valid by construction (a key made from a secret is never one that
    /// `verify_strict` refuses). A verifier that remembers verdicts may record it as checked;
    /// the default, which every production backend keeps, ignores it. The simulator's
    /// `sim::MemoizingVerifier` (feature `sim`) records it, so a simulated cluster
    /// checks by curve arithmetic only what no honest replica signed.
    fn signed_here(&self, item: &SignatureItem<'_>) {
        let _ = item;
    }
}

/// `verifier`'s verdicts for `items`, or the reference's when its backend fails (or answers
/// the wrong number): a backend failure says nothing about the signatures, so a caller never
/// takes it for a bad one. What every batch check of the consensus cores goes through.
pub fn verdicts_or_reference(
    verifier: &dyn SignatureVerifier,
    items: &[SignatureItem<'_>],
) -> Vec<bool> {
    match verifier.verify_batch(items) {
        Ok(verdicts) if verdicts.len() == items.len() => verdicts,
        _ => items.iter().map(verify_strict_reference).collect(),
    }
}

/// Signs `message` with `key` and tells `verifier` of it (see
/// [`SignatureVerifier::signed_here`]): how the consensus cores sign, so that a simulated
/// cluster's memoizing verifier need not check again what a replica signed itself.
pub(crate) fn sign_and_tell(
    key: &ed25519_dalek::SigningKey,
    message: &[u8],
    verifier: Option<&dyn SignatureVerifier>,
) -> [u8; SIGNATURE_BYTES] {
    use ed25519_dalek::Signer as _;
    let signature = key.sign(message).to_bytes();
    if let Some(verifier) = verifier {
        verifier.signed_here(&SignatureItem {
            public_key: key.verifying_key().to_bytes(),
            message,
            signature,
        });
    }
    signature
}

/// The reference verdict for one item: ed25519-dalek's strict verification.
pub fn verify_strict_reference(item: &SignatureItem<'_>) -> bool {
    let Ok(key) = ed25519_dalek::VerifyingKey::from_bytes(&item.public_key) else {
        return false;
    };
    let signature = ed25519_dalek::Signature::from_bytes(&item.signature);
    key.verify_strict(item.message, &signature).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_slices_rejects_wrong_lengths() {
        assert!(matches!(
            SignatureItem::from_slices(&[0; 31], &[0; 64], b""),
            Err(SigVerifyError::KeyLength(31))
        ));
        assert!(matches!(
            SignatureItem::from_slices(&[0; 32], &[0; 65], b""),
            Err(SigVerifyError::SignatureLength(65))
        ));
        let item = SignatureItem::from_slices(&[7; 32], &[9; 64], b"m").expect("right lengths");
        assert_eq!(item.public_key, [7; 32]);
        assert_eq!(item.signature, [9; 64]);
    }
}
