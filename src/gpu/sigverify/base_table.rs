//! The base-point table the GPU verifier reads: entry `w·16 + j` is `[j·16^w]B` (w < 64, j < 16)
//! as an affine "Niels" point `(y + x, y − x, 2d·x·y)`, each coordinate as 20 limbs of 13 bits
//! (the layout of `shaders/ed25519_field.wgsl`), 60 words per entry, 240 KiB in all.
//!
//! It is computed once on the CPU with exact big-integer arithmetic (a few milliseconds) and
//! uploaded; the unit tests check every entry against curve25519-dalek's `[scalar]B`.

use num_bigint::BigUint;

/// Limbs per field element in the kernel's layout.
pub(crate) const LIMBS: usize = 20;
/// Bits per limb.
const LIMB_BITS: u32 = 13;
/// Windows of 4 bits in a scalar below 2^256.
pub(crate) const WINDOWS: usize = 64;
/// Words per table entry (three elements).
pub(crate) const NIELS_WORDS: usize = 3 * LIMBS;

/// Exact arithmetic mod p = 2^255 − 19 for the table and the tests.
pub(crate) mod field {
    use num_bigint::BigUint;

    /// p = 2^255 − 19.
    pub(crate) fn modulus() -> BigUint {
        (BigUint::from(1u32) << 255u32) - 19u32
    }

    /// L = 2^252 + 27742317777372353535851937790883648493, the prime order of B.
    #[cfg(test)]
    pub(crate) fn group_order() -> BigUint {
        (BigUint::from(1u32) << 252u32)
            + "27742317777372353535851937790883648493"
                .parse::<BigUint>()
                .expect("decimal literal")
    }

    pub(crate) fn invert(a: &BigUint) -> BigUint {
        let p = modulus();
        a.modpow(&(&p - 2u32), &p)
    }

    /// d = −121665 / 121666.
    pub(crate) fn d() -> BigUint {
        let p = modulus();
        (&p - 121_665u32) * invert(&BigUint::from(121_666u32)) % &p
    }

    /// sqrt(−1) = 2^((p − 1) / 4), the root curve25519-dalek uses.
    pub(crate) fn sqrt_m1() -> BigUint {
        let p = modulus();
        BigUint::from(2u32).modpow(&((&p - 1u32) >> 2u32), &p)
    }

    pub(crate) fn sub(a: &BigUint, b: &BigUint) -> BigUint {
        let p = modulus();
        (a + &p - (b % &p)) % &p
    }
}

/// An affine point.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Affine {
    x: BigUint,
    y: BigUint,
}

/// An affine point prepared for additions: `(y + x, y − x, 2d·x·y)`, all canonical.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NielsPoint {
    pub(crate) y_plus_x: BigUint,
    pub(crate) y_minus_x: BigUint,
    pub(crate) xy2d: BigUint,
}

/// Affine addition on −x² + y² = 1 + d·x²·y² (complete: the identity and doubling included).
fn add(a: &Affine, b: &Affine) -> Affine {
    let p = field::modulus();
    let d = field::d();
    let xx = &a.x * &b.x % &p;
    let yy = &a.y * &b.y % &p;
    let dxxyy = d * &xx % &p * &yy % &p;
    let x_num = (&a.x * &b.y + &a.y * &b.x) % &p;
    let y_num = (&yy + &xx) % &p;
    let x_den = (BigUint::from(1u32) + &dxxyy) % &p;
    let y_den = field::sub(&BigUint::from(1u32), &dxxyy);
    Affine {
        x: x_num * field::invert(&x_den) % &p,
        y: y_num * field::invert(&y_den) % &p,
    }
}

/// B: y = 4/5 and the even x.
fn base_point() -> Affine {
    let p = field::modulus();
    let y = BigUint::from(4u32) * field::invert(&BigUint::from(5u32)) % &p;
    let yy = &y * &y % &p;
    let u = field::sub(&yy, &BigUint::from(1u32));
    let v = (field::d() * &yy + 1u32) % &p;
    let xx = u * field::invert(&v) % &p;
    // p ≡ 5 (mod 8): a root is xx^((p+3)/8), times sqrt(−1) when its square is −xx.
    let mut x = xx.modpow(&((&p + 3u32) >> 3u32), &p);
    if &x * &x % &p != xx {
        x = x * field::sqrt_m1() % &p;
    }
    if x.bit(0) {
        x = &p - x;
    }
    Affine { x, y }
}

fn niels(point: &Affine) -> NielsPoint {
    let p = field::modulus();
    NielsPoint {
        y_plus_x: (&point.y + &point.x) % &p,
        y_minus_x: field::sub(&point.y, &point.x),
        xy2d: field::d() * 2u32 % &p * &point.x % &p * &point.y % &p,
    }
}

/// The table as points: entry `w·16 + j` is `[j·16^w]B`.
pub(crate) fn niels_table() -> Vec<NielsPoint> {
    let identity = Affine {
        x: BigUint::ZERO,
        y: BigUint::from(1u32),
    };
    let mut table = Vec::with_capacity(WINDOWS * 16);
    let mut window_base = base_point();
    for _ in 0..WINDOWS {
        let mut multiple = identity.clone();
        for _ in 0..16 {
            table.push(niels(&multiple));
            multiple = add(&multiple, &window_base);
        }
        // After 16 additions `multiple` is 16·window_base, the next window's base.
        window_base = multiple;
    }
    table
}

/// `value` (below 2^260) as 20 limbs of 13 bits.
pub(crate) fn limbs(value: &BigUint) -> [u32; LIMBS] {
    let mut out = [0u32; LIMBS];
    for (index, limb) in out.iter_mut().enumerate() {
        let shifted: BigUint = value >> (LIMB_BITS as usize * index);
        *limb = shifted.iter_u32_digits().next().unwrap_or(0) & ((1 << LIMB_BITS) - 1);
    }
    out
}

/// The table in the kernel's layout: 1024 entries × 60 words.
pub(crate) fn table_words() -> Vec<u32> {
    niels_table()
        .iter()
        .flat_map(|entry| {
            let mut words = [0u32; NIELS_WORDS];
            words[..LIMBS].copy_from_slice(&limbs(&entry.y_plus_x));
            words[LIMBS..2 * LIMBS].copy_from_slice(&limbs(&entry.y_minus_x));
            words[2 * LIMBS..].copy_from_slice(&limbs(&entry.xy2d));
            words
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use curve25519_dalek::constants::ED25519_BASEPOINT_POINT;
    use curve25519_dalek::scalar::Scalar;

    use super::*;

    /// The compressed encoding of an entry, recovered from its Niels form.
    fn compress(entry: &NielsPoint) -> [u8; 32] {
        let p = field::modulus();
        let half = field::invert(&BigUint::from(2u32));
        let y = (&entry.y_plus_x + &entry.y_minus_x) * &half % &p;
        let x = field::sub(&entry.y_plus_x, &entry.y_minus_x) * &half % &p;
        let mut bytes = [0u8; 32];
        let y_bytes = y.to_bytes_le();
        bytes[..y_bytes.len()].copy_from_slice(&y_bytes);
        bytes[31] |= u8::from(x.bit(0)) << 7;
        bytes
    }

    #[test]
    fn every_entry_is_the_right_multiple_of_b() {
        let table = niels_table();
        assert_eq!(table.len(), WINDOWS * 16);
        let sixteen = Scalar::from(16u64);
        let mut window_scalar = Scalar::ONE;
        for window in 0..WINDOWS {
            for digit in 0..16u64 {
                let expected = (ED25519_BASEPOINT_POINT * (window_scalar * Scalar::from(digit)))
                    .compress()
                    .to_bytes();
                assert_eq!(
                    compress(&table[window * 16 + digit as usize]),
                    expected,
                    "window {window} digit {digit}"
                );
            }
            window_scalar *= sixteen;
        }
    }

    #[test]
    fn limbs_round_trip_and_table_layout() {
        let value = field::modulus() - 1u32;
        let limbs = limbs(&value);
        let back = limbs
            .iter()
            .rev()
            .fold(BigUint::ZERO, |acc, &limb| (acc << LIMB_BITS) + limb);
        assert_eq!(back, value);
        let words = table_words();
        assert_eq!(words.len(), WINDOWS * 16 * NIELS_WORDS);
        // Entry 0 is the identity: (1, 1, 0).
        assert_eq!(words[0], 1);
        assert_eq!(words[LIMBS], 1);
        assert!(words[1..LIMBS].iter().all(|&word| word == 0));
        assert!(words[2 * LIMBS..NIELS_WORDS].iter().all(|&word| word == 0));
    }

    /// The constants written as limbs in `shaders/ed25519_field.wgsl`, against their definitions.
    #[test]
    fn wgsl_field_constants_are_right() {
        let source = include_str!("../../../shaders/ed25519_field.wgsl");
        let parse = |name: &str| -> Vec<u32> {
            let start = source
                .find(&format!("const {name}: Fe = array<u32, 20>("))
                .unwrap_or_else(|| panic!("{name} in the shader"));
            let body = &source[start..];
            let open = body.find('(').expect("open") + 1;
            let close = body.find(')').expect("close");
            body[open..close]
                .split(',')
                .map(|word| word.trim().trim_end_matches('u').parse().expect("limb"))
                .collect()
        };
        let p = field::modulus();
        let base = base_point();
        let cases = [
            ("FE_D", field::d()),
            ("FE_D2", field::d() * 2u32 % &p),
            ("FE_SQRT_M1", field::sqrt_m1()),
            ("FE_BASE_X", base.x.clone()),
            ("FE_BASE_Y", base.y.clone()),
            ("FE_BASE_T", &base.x * &base.y % &p),
        ];
        for (name, value) in cases {
            assert_eq!(parse(name), limbs(&value).to_vec(), "{name}");
        }
    }
}
