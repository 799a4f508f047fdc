//! Seeded generators of ed25519 test inputs: honest signatures, and the adversarial cases where a
//! verifier that is not exactly `verify_strict` would give a different verdict (small-order and
//! mixed-order points in every encoding, non-canonical encodings, non-canonical `s`, flipped bits).
//!
//! The tests, the bench and the example use these; every generator is deterministic in its seed
//! so a failing case can be reproduced. Expected verdicts always come from
//! [`super::verify_strict_reference`], never from the generator's intent: a generator only aims at
//! a corner, the reference says what the right answer there is.

use curve25519_dalek::constants::{ED25519_BASEPOINT_POINT, EIGHT_TORSION};
use curve25519_dalek::edwards::{CompressedEdwardsY, EdwardsPoint};
use curve25519_dalek::scalar::Scalar;
use ed25519_dalek::{Signer, SigningKey};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use sha2::{Digest, Sha512};

use super::SignatureItem;

/// The group order L = 2^252 + 27742317777372353535851937790883648493, little-endian.
pub const GROUP_ORDER_L: [u8; 32] = [
    0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9, 0xde, 0x14,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
];

/// The field prime p = 2^255 - 19, little-endian.
pub const FIELD_PRIME_P: [u8; 32] = [
    0xed, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f,
];

/// An item that owns its message; [`OwnedItem::as_item`] borrows it as a [`SignatureItem`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedItem {
    /// Public key bytes.
    pub public_key: [u8; 32],
    /// Message bytes.
    pub message: Vec<u8>,
    /// Signature bytes `R ‖ s`.
    pub signature: [u8; 64],
}

impl OwnedItem {
    /// Borrows this item for a verifier.
    pub fn as_item(&self) -> SignatureItem<'_> {
        SignatureItem {
            public_key: self.public_key,
            message: &self.message,
            signature: self.signature,
        }
    }
}

/// An adversarial case with a name saying which corner it aims at.
#[derive(Debug, Clone)]
pub struct LabeledItem {
    /// What the case is (e.g. "small-order A #3, equation holds").
    pub label: String,
    /// The input.
    pub item: OwnedItem,
}

/// Adds `value` (little-endian bytes) to `bytes` in place, dropping a carry out of bit 255.
fn add_le(bytes: &mut [u8; 32], value: &[u8; 32]) {
    let mut carry = 0u16;
    for (byte, add) in bytes.iter_mut().zip(value) {
        let sum = u16::from(*byte) + u16::from(*add) + carry;
        *byte = sum as u8;
        carry = sum >> 8;
    }
}

/// A signing key drawn from `rng`.
fn signing_key(rng: &mut ChaCha20Rng) -> SigningKey {
    let mut secret = [0u8; 32];
    rng.fill_bytes(&mut secret);
    SigningKey::from_bytes(&secret)
}

/// A uniformly random scalar.
fn random_scalar(rng: &mut ChaCha20Rng) -> Scalar {
    let mut wide = [0u8; 64];
    rng.fill_bytes(&mut wide);
    Scalar::from_bytes_mod_order_wide(&wide)
}

/// `count` honest signatures by `count` different keys on random messages of `message_len` bytes.
pub fn random_valid_items(seed: u64, count: usize, message_len: usize) -> Vec<OwnedItem> {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    (0..count)
        .map(|_| {
            let key = signing_key(&mut rng);
            let mut message = vec![0u8; message_len];
            rng.fill_bytes(&mut message);
            sign_item(&key, message)
        })
        .collect()
}

/// An honest signature by `key` on `message`.
pub fn sign_item(key: &SigningKey, message: Vec<u8>) -> OwnedItem {
    let signature = key.sign(&message).to_bytes();
    OwnedItem {
        public_key: key.verifying_key().to_bytes(),
        message,
        signature,
    }
}

/// Every 32-byte string that curve25519-dalek decodes to a point of small order (the 8 torsion
/// points): canonical encodings, both sign bits where x = 0 (the sign bit is then ignored), and
/// the encodings with y ≥ p (y = p reads as 0, y = p + 1 as 1), with both sign bits.
pub fn small_order_encodings() -> Vec<[u8; 32]> {
    let mut encodings: Vec<[u8; 32]> = Vec::new();
    for point in EIGHT_TORSION.iter() {
        let canonical = point.compress().to_bytes();
        let mut with_y_plus_p = canonical;
        with_y_plus_p[31] &= 0x7f;
        let y_is_small = with_y_plus_p[1..].iter().all(|&byte| byte == 0) && with_y_plus_p[0] < 19;
        let mut candidates = vec![canonical, flip_sign(canonical)];
        if y_is_small {
            add_le(&mut with_y_plus_p, &FIELD_PRIME_P);
            candidates.push(with_y_plus_p);
            candidates.push(flip_sign(with_y_plus_p));
        }
        for candidate in candidates {
            let decodes_small = CompressedEdwardsY(candidate)
                .decompress()
                .is_some_and(|decoded| decoded.is_small_order());
            if decodes_small && !encodings.contains(&candidate) {
                encodings.push(candidate);
            }
        }
    }
    encodings
}

/// The encoding with the sign bit (bit 255) flipped.
fn flip_sign(mut encoding: [u8; 32]) -> [u8; 32] {
    encoding[31] ^= 0x80;
    encoding
}

/// The 38 encodings with y in [p, 2^255) (y - p in 0..19), both sign bits; some decode (to the
/// point with y - p), some do not.
pub fn y_at_least_p_encodings() -> Vec<[u8; 32]> {
    let mut encodings = Vec::new();
    for offset in 0..19u8 {
        let mut encoding = FIELD_PRIME_P;
        let mut add = [0u8; 32];
        add[0] = offset;
        add_le(&mut encoding, &add);
        encodings.push(encoding);
        encodings.push(flip_sign(encoding));
    }
    encodings
}

/// k = SHA-512(R ‖ A ‖ M) mod L, on the bytes as given.
fn challenge(r_bytes: &[u8; 32], a_bytes: &[u8; 32], message: &[u8]) -> Scalar {
    let mut hasher = Sha512::new();
    hasher.update(r_bytes);
    hasher.update(a_bytes);
    hasher.update(message);
    let digest: [u8; 64] = hasher.finalize().into();
    Scalar::from_bytes_mod_order_wide(&digest)
}

/// Builds a signature from known discrete logs: `A` is the point encoded by `a_bytes`, equal to
/// `[a]B + (torsion)`, and `R` (encoded by `r_bytes`) is `[r]B + (torsion)`; `s = r + k·a`. Tries
/// messages `prefix ‖ counter` until the cofactorless equation `[s]B - [k]A = R` holds (when
/// `equation_holds`) or fails; `None` when no counter below 64 gives that, or an encoding does
/// not decode.
pub fn grind_equation(
    a_bytes: [u8; 32],
    a: Scalar,
    r_bytes: [u8; 32],
    r: Scalar,
    prefix: &[u8],
    equation_holds: bool,
) -> Option<OwnedItem> {
    let a_point = CompressedEdwardsY(a_bytes).decompress()?;
    let r_point = CompressedEdwardsY(r_bytes).decompress()?;
    for counter in 0..64u8 {
        let mut message = prefix.to_vec();
        message.push(counter);
        let k = challenge(&r_bytes, &a_bytes, &message);
        let s = r + k * a;
        let lhs = EdwardsPoint::vartime_double_scalar_mul_basepoint(&k, &(-a_point), &s);
        if (lhs == r_point) == equation_holds {
            let mut signature = [0u8; 64];
            signature[..32].copy_from_slice(&r_bytes);
            signature[32..].copy_from_slice(s.as_bytes());
            return Some(OwnedItem {
                public_key: a_bytes,
                message,
                signature,
            });
        }
    }
    None
}

/// A signature whose `R = [r]B + T` with `T` of order 8 (mixed order): `verify_strict` rejects it
/// on every message (the equation is off by `T`), but it is not small order.
pub fn mixed_order_r_item(seed: u64, message: &[u8]) -> OwnedItem {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let a = random_scalar(&mut rng);
    let r = random_scalar(&mut rng);
    let a_bytes = (ED25519_BASEPOINT_POINT * a).compress().to_bytes();
    let r_bytes = (ED25519_BASEPOINT_POINT * r + EIGHT_TORSION[1])
        .compress()
        .to_bytes();
    let k = challenge(&r_bytes, &a_bytes, message);
    let s = r + k * a;
    let mut signature = [0u8; 64];
    signature[..32].copy_from_slice(&r_bytes);
    signature[32..].copy_from_slice(s.as_bytes());
    OwnedItem {
        public_key: a_bytes,
        message: message.to_vec(),
        signature,
    }
}

/// All adversarial cases, with labels; the expected verdict of each is the reference's.
pub fn adversarial_items(seed: u64) -> Vec<LabeledItem> {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let mut out = Vec::new();
    let mut push = |label: String, item: OwnedItem| out.push(LabeledItem { label, item });
    let key = signing_key(&mut rng);
    let valid = sign_item(&key, b"adversarial base message".to_vec());
    let basepoint_mul = |scalar: Scalar| (ED25519_BASEPOINT_POINT * scalar).compress().to_bytes();

    // Every small-order encoding as A (its discrete log is 0 plus torsion), with the equation made
    // to hold and made to fail, and as R (r = 0 plus torsion) against a mixed-order key whose
    // torsion lets the equation hold: a verifier that skips the small-order checks says 1.
    for (index, encoding) in small_order_encodings().into_iter().enumerate() {
        let r = random_scalar(&mut rng);
        for holds in [true, false] {
            if let Some(item) =
                grind_equation(encoding, Scalar::ZERO, basepoint_mul(r), r, b"soA", holds)
            {
                push(format!("small-order A #{index}, equation {holds}"), item);
            }
        }
        let a = random_scalar(&mut rng);
        let mixed_a = (ED25519_BASEPOINT_POINT * a + EIGHT_TORSION[1])
            .compress()
            .to_bytes();
        for holds in [true, false] {
            if let Some(item) = grind_equation(mixed_a, a, encoding, Scalar::ZERO, b"soR", holds) {
                push(format!("small-order R #{index}, equation {holds}"), item);
            }
        }
        // The small-order encoding as R under an honest key with a random s.
        let mut signature = valid.signature;
        signature[..32].copy_from_slice(&encoding);
        push(
            format!("small-order R #{index}, honest key"),
            OwnedItem {
                signature,
                ..valid.clone()
            },
        );
    }

    // Mixed-order keys and R (torsion components of every order): valid under verify_strict
    // exactly when the torsion cancels in the cofactorless equation.
    for (torsion_index, torsion) in EIGHT_TORSION.iter().enumerate().skip(1) {
        let a = random_scalar(&mut rng);
        let r = random_scalar(&mut rng);
        let a_bytes = (ED25519_BASEPOINT_POINT * a + torsion)
            .compress()
            .to_bytes();
        for holds in [true, false] {
            if let Some(item) = grind_equation(a_bytes, a, basepoint_mul(r), r, b"mxA", holds) {
                push(
                    format!("mixed-order A (T{torsion_index}), equation {holds}"),
                    item,
                );
            }
            let r_bytes = (ED25519_BASEPOINT_POINT * r + torsion)
                .compress()
                .to_bytes();
            if let Some(item) = grind_equation(a_bytes, a, r_bytes, r, b"mxAR", holds) {
                push(
                    format!("mixed-order A and R (T{torsion_index}), equation {holds}"),
                    item,
                );
            }
        }
        push(
            format!("mixed-order R (T{torsion_index})"),
            mixed_order_r_item(seed ^ torsion_index as u64, b"mixed R"),
        );
    }

    // y ≥ p encodings (decodable or not) as A and as R; x = 0 with the sign bit is among the
    // small-order encodings above (identity and (0, -1)).
    for (index, encoding) in y_at_least_p_encodings().into_iter().enumerate() {
        push(
            format!("y>=p encoding #{index} as A"),
            OwnedItem {
                public_key: encoding,
                ..valid.clone()
            },
        );
        let mut signature = valid.signature;
        signature[..32].copy_from_slice(&encoding);
        push(
            format!("y>=p encoding #{index} as R"),
            OwnedItem {
                signature,
                ..valid.clone()
            },
        );
    }
    // A non-canonical R encoding of a valid signature's own R point: only possible when y < 19,
    // so emulate it with the sign bit of x = 0 instead: flip the sign bit of R (decodes to -R).
    let mut signature = valid.signature;
    signature[31] ^= 0x80;
    push(
        "R sign bit flipped".to_string(),
        OwnedItem {
            signature,
            ..valid.clone()
        },
    );

    // Non-canonical s: s = L, s + L for a valid signature, bit 253 set, bit 255 set, s = L - 1.
    let mut s_cases: Vec<(String, [u8; 32])> = vec![("s = L".to_string(), GROUP_ORDER_L)];
    let mut s_plus_l: [u8; 32] = valid.signature[32..].try_into().expect("32 bytes");
    add_le(&mut s_plus_l, &GROUP_ORDER_L);
    s_cases.push(("s + L of a valid signature".to_string(), s_plus_l));
    let mut s_bit_253: [u8; 32] = valid.signature[32..].try_into().expect("32 bytes");
    s_bit_253[31] |= 0x20;
    s_cases.push(("s with bit 253 set".to_string(), s_bit_253));
    let mut s_bit_255: [u8; 32] = valid.signature[32..].try_into().expect("32 bytes");
    s_bit_255[31] |= 0x80;
    s_cases.push(("s with bit 255 set".to_string(), s_bit_255));
    let mut l_minus_one = GROUP_ORDER_L;
    l_minus_one[0] -= 1;
    s_cases.push(("s = L - 1".to_string(), l_minus_one));
    s_cases.push(("s = 2^256 - 1".to_string(), [0xff; 32]));
    for (label, s) in s_cases {
        let mut signature = valid.signature;
        signature[32..].copy_from_slice(&s);
        push(
            label,
            OwnedItem {
                signature,
                ..valid.clone()
            },
        );
    }

    // One flipped bit in the key, the message and the signature of a valid item (a spread of
    // positions including the first and last bit and the sign bits).
    for bit in (0..256).step_by(17).chain([255]) {
        let mut item = valid.clone();
        item.public_key[bit / 8] ^= 1 << (bit % 8);
        push(format!("key bit {bit} flipped"), item);
    }
    for bit in (0..valid.message.len() * 8).step_by(23) {
        let mut item = valid.clone();
        item.message[bit / 8] ^= 1 << (bit % 8);
        push(format!("message bit {bit} flipped"), item);
    }
    for bit in (0..512).step_by(13).chain([255, 511]) {
        let mut item = valid.clone();
        item.signature[bit / 8] ^= 1 << (bit % 8);
        push(format!("signature bit {bit} flipped"), item);
    }

    // Empty and long messages, valid and tampered.
    let empty = sign_item(&key, Vec::new());
    push("empty message".to_string(), empty.clone());
    let mut tampered = empty;
    tampered.message.push(0);
    push("empty message, byte appended".to_string(), tampered);
    let mut long_message = vec![0u8; 10_000];
    rng.fill_bytes(&mut long_message);
    let long = sign_item(&key, long_message);
    push("10 kB message".to_string(), long.clone());
    let mut tampered = long;
    tampered.message[9_999] ^= 0x80;
    push("10 kB message, last bit flipped".to_string(), tampered);
    push("valid base item".to_string(), valid);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::sigverify::verify_strict_reference;

    #[test]
    fn small_order_encodings_cover_every_torsion_point() {
        let encodings = small_order_encodings();
        // 8 canonical, + sign-flipped x = 0 (identity, (0,-1)), + y = p and y = p + 1 (both signs).
        assert_eq!(encodings.len(), 14, "{encodings:02x?}");
        for encoding in &encodings {
            let point = CompressedEdwardsY(*encoding).decompress().expect("decodes");
            assert!(point.is_small_order());
        }
    }

    #[test]
    fn adversarial_set_hits_both_verdicts_in_the_tricky_corners() {
        let items = adversarial_items(1);
        let verdict = |prefix: &str| -> Vec<bool> {
            items
                .iter()
                .filter(|case| case.label.starts_with(prefix))
                .map(|case| verify_strict_reference(&case.item.as_item()))
                .collect()
        };
        // Small-order A or R never verifies, even when the equation holds.
        assert!(verdict("small-order").iter().all(|&ok| !ok));
        assert!(verdict("small-order A").len() >= 14);
        // Mixed-order keys verify exactly when the equation holds.
        for case in items
            .iter()
            .filter(|case| case.label.starts_with("mixed-order A"))
        {
            let ok = verify_strict_reference(&case.item.as_item());
            assert_eq!(ok, case.label.ends_with("equation true"), "{}", case.label);
        }
        assert!(verdict("s ").iter().all(|&ok| !ok));
        assert_eq!(verdict("valid base item"), vec![true]);
        assert_eq!(verdict("empty message"), vec![true, false]);
    }
}
