//! ed25519 `verify_strict` written as one straight-line program of field operations, which the
//! WGSL kernel (`shaders/ed25519_verify.wgsl`) interprets with a single call site per operation.
//!
//! Why a program instead of structured WGSL: GPU drivers inline every function, so a kernel that
//! calls a point doubling, an addition and an exponentiation in several places contains dozens of
//! copies of the unrolled 400-product field multiplication. llvmpipe (the software adapter CI
//! uses) then spends minutes in LLVM and, worse, stops every loop of an invocation after 65 535
//! iterations in total. The interpreter holds exactly one `fe_mul`, one `fe_add`, one `fe_sub`
//! and one canonicalisation; the 6 655 operations of a verification are data in a storage buffer
//! that every invocation reads in lockstep (the same op at the same time, so no divergence on a
//! real GPU), and the whole verification is one loop over them (on llvmpipe, split over several
//! dispatches; see `gpu.rs`).
//!
//! Each op is one `u32`: `code | d << 8 | a << 16 | b << 24`. Registers hold field elements (see
//! [`REGISTERS`]), flags hold booleans (see [`FLAGS`]). The item's `A`, `R` and `s` words and
//! `k = h mod L` are inputs the kernel computes before the program runs; the program's verdict is
//! the conjunction of every `Require`/`Forbid` (and the kernel's own `s < L` check).
//!
//! The program is generated here (not written by hand in WGSL) so that it can be checked on the
//! CPU: the unit tests run it through an exact big-integer emulator on the adversarial vectors and
//! compare every verdict with ed25519-dalek.

use std::sync::OnceLock;

/// Field-element registers the program uses; `REGISTERS` in `shaders/ed25519_verify.wgsl` (a
/// unit test checks both agree).
pub(crate) const REGISTERS: u8 = 104;
/// Boolean flags the program uses; `FLAGS` in `shaders/ed25519_verify.wgsl`.
pub(crate) const FLAGS: u8 = 16;

/// Operation codes; the `switch` in `shaders/ed25519_verify.wgsl` uses the same numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Op {
    /// `r[d] = r[a] * r[b]`
    Mul = 0,
    /// `r[d] = r[a] + r[b]`
    Add = 1,
    /// `r[d] = r[a] - r[b]`
    Sub = 2,
    /// `r[d] = ` the canonical representative of `r[a]` (what `IsZero`, `Odd`, `Final` read).
    Canon = 3,
    /// `r[d] = ` constant number `a` (see [`Const`]).
    Const = 4,
    /// `r[d] = ` the low 255 bits of point encoding `a` (0: `A`, 1: `R`), not reduced mod p.
    LoadY = 5,
    /// `f[d] = (r[a] == 0)` for a canonical `r[a]`.
    IsZero = 6,
    /// `f[d] = ` the low bit of a canonical `r[a]` (ed25519's "negative").
    Odd = 7,
    /// `f[d] = f[a] || f[b]`
    Or = 8,
    /// `f[d] = f[a] && f[b]`
    And = 9,
    /// The item is valid only if `f[a]`.
    Require = 10,
    /// The item is valid only if not `f[a]`.
    Forbid = 11,
    /// `if f[b] { r[d] = r[a] }`
    Select = 12,
    /// `f[d] = ` bit 255 of point encoding `a` (0: `A`, 1: `R`).
    SignBit = 13,
    /// `r[d..d+4] = ` entry `nibble(k, a)` of the `-A` table (registers `4j..4j+4`).
    SelectNegA = 14,
    /// `r[d..d+4] = ` base-table entry `(a, nibble(s, a))` as a cached point with `Z = 1`.
    SelectBase = 15,
    /// The item is valid only if the canonical `r[d]` equals `R`'s low 255 bits and `f[a]`
    /// equals `R`'s bit 255: the canonical encoding of the result equals `R` byte for byte.
    Final = 16,
}

/// Constants `Op::Const` can load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Const {
    Zero = 0,
    One = 1,
    /// d = -121665/121666
    D = 2,
    /// 2d
    D2 = 3,
    /// sqrt(-1) = 2^((p-1)/4)
    SqrtM1 = 4,
}

/// A field-element register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Reg(pub(crate) u8);
/// A flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Flag(pub(crate) u8);

/// A point in four registers: extended (X, Y, Z, T) or cached (Y+X, Y-X, Z, 2d·T).
#[derive(Debug, Clone, Copy)]
struct Point([Reg; 4]);

impl Point {
    const fn at(first: u8) -> Self {
        Self([Reg(first), Reg(first + 1), Reg(first + 2), Reg(first + 3)])
    }
    fn x(self) -> Reg {
        self.0[0]
    }
    fn y(self) -> Reg {
        self.0[1]
    }
    fn z(self) -> Reg {
        self.0[2]
    }
    fn t(self) -> Reg {
        self.0[3]
    }
}

/// Which encoded point of the item an op reads.
#[derive(Debug, Clone, Copy)]
enum Encoding {
    PublicKey = 0,
    R = 1,
}

// Register map. 0..64: the table of j·(-A) for j = 0..15 as cached points (SelectNegA reads
// it by index, so it must start at 0).
const NEG_A_TABLE: u8 = 0;
const ACC: Point = Point::at(64);
const ADDEND: Point = Point::at(68);
const DECODED: Point = Point::at(72);
const SCRATCH_POINT: Point = Point::at(76);
const NEG_A: Point = Point::at(80);
const MULTIPLE: Point = Point::at(84);
const ZERO: Reg = Reg(88);
const ONE: Reg = Reg(89);
/// Temporaries 90..104, used by one routine at a time.
const TEMP: u8 = 90;

const fn temp(index: u8) -> Reg {
    Reg(TEMP + index)
}

// Flags.
const VALID_SQUARE: Flag = Flag(0);
const CORRECT_SIGN: Flag = Flag(1);
const FLIPPED_SIGN: Flag = Flag(2);
const FLIPPED_SIGN_I: Flag = Flag(3);
const FLIPPED_ANY: Flag = Flag(4);
const NEGATIVE: Flag = Flag(5);
const SIGN_BIT: Flag = Flag(6);
const X_IS_ZERO: Flag = Flag(7);
const Y_IS_Z: Flag = Flag(8);
const SMALL_ORDER: Flag = Flag(9);
const RESULT_X_ODD: Flag = Flag(10);

/// Builds the op stream.
#[derive(Debug, Default)]
struct Assembler {
    ops: Vec<u32>,
}

impl Assembler {
    fn emit(&mut self, op: Op, d: u8, a: u8, b: u8) {
        self.ops.push(
            u32::from(op as u8) | u32::from(d) << 8 | u32::from(a) << 16 | u32::from(b) << 24,
        );
    }

    fn mul(&mut self, d: Reg, a: Reg, b: Reg) {
        self.emit(Op::Mul, d.0, a.0, b.0);
    }
    fn square(&mut self, d: Reg, a: Reg) {
        self.mul(d, a, a);
    }
    fn add(&mut self, d: Reg, a: Reg, b: Reg) {
        self.emit(Op::Add, d.0, a.0, b.0);
    }
    fn sub(&mut self, d: Reg, a: Reg, b: Reg) {
        self.emit(Op::Sub, d.0, a.0, b.0);
    }
    fn canon(&mut self, d: Reg, a: Reg) {
        self.emit(Op::Canon, d.0, a.0, 0);
    }
    fn constant(&mut self, d: Reg, value: Const) {
        self.emit(Op::Const, d.0, value as u8, 0);
    }
    fn load_y(&mut self, d: Reg, encoding: Encoding) {
        self.emit(Op::LoadY, d.0, encoding as u8, 0);
    }
    fn sign_bit(&mut self, f: Flag, encoding: Encoding) {
        self.emit(Op::SignBit, f.0, encoding as u8, 0);
    }
    /// `f = (a == b)` in the field; clobbers `scratch`.
    fn equal(&mut self, f: Flag, a: Reg, b: Reg, scratch: Reg) {
        self.sub(scratch, a, b);
        self.canon(scratch, scratch);
        self.emit(Op::IsZero, f.0, scratch.0, 0);
    }
    /// `f = (a == -b)` in the field; clobbers `scratch`.
    fn equal_negated(&mut self, f: Flag, a: Reg, b: Reg, scratch: Reg) {
        self.add(scratch, a, b);
        self.canon(scratch, scratch);
        self.emit(Op::IsZero, f.0, scratch.0, 0);
    }
    /// `f = ` whether `a` is "negative" (odd canonical value); clobbers `scratch`.
    fn is_negative(&mut self, f: Flag, a: Reg, scratch: Reg) {
        self.canon(scratch, a);
        self.emit(Op::Odd, f.0, scratch.0, 0);
    }
    fn or(&mut self, d: Flag, a: Flag, b: Flag) {
        self.emit(Op::Or, d.0, a.0, b.0);
    }
    fn and(&mut self, d: Flag, a: Flag, b: Flag) {
        self.emit(Op::And, d.0, a.0, b.0);
    }
    fn require(&mut self, f: Flag) {
        self.emit(Op::Require, 0, f.0, 0);
    }
    fn forbid(&mut self, f: Flag) {
        self.emit(Op::Forbid, 0, f.0, 0);
    }
    fn select(&mut self, d: Reg, a: Reg, when: Flag) {
        self.emit(Op::Select, d.0, a.0, when.0);
    }
    /// `a = -a` when `when`; clobbers `scratch`.
    fn negate_if(&mut self, a: Reg, when: Flag, scratch: Reg) {
        self.sub(scratch, ZERO, a);
        self.select(a, scratch, when);
    }

    /// `d = a^(2^k)`, k >= 1.
    fn pow2k(&mut self, d: Reg, a: Reg, k: u32) {
        self.square(d, a);
        for _ in 1..k {
            self.square(d, d);
        }
    }

    /// The common start of the inversion and square-root chains (ref10's): `t0 = z^11` and
    /// returns `z^(2^250 - 1)` in `t1`. Uses temps 0..4.
    fn pow_2_250_minus_1(&mut self, z: Reg) -> (Reg, Reg) {
        let (t0, t1, t2, t3) = (temp(0), temp(1), temp(2), temp(3));
        self.square(t0, z); // z^2
        self.pow2k(t1, t0, 2); // z^8
        self.mul(t1, z, t1); // z^9
        self.mul(t0, t0, t1); // z^11
        self.square(t2, t0); // z^22
        self.mul(t1, t1, t2); // z^(2^5 - 1)
        self.pow2k(t2, t1, 5);
        self.mul(t1, t2, t1); // z^(2^10 - 1)
        self.pow2k(t2, t1, 10);
        self.mul(t2, t2, t1); // z^(2^20 - 1)
        self.pow2k(t3, t2, 20);
        self.mul(t2, t3, t2); // z^(2^40 - 1)
        self.pow2k(t2, t2, 10);
        self.mul(t1, t2, t1); // z^(2^50 - 1)
        self.pow2k(t2, t1, 50);
        self.mul(t2, t2, t1); // z^(2^100 - 1)
        self.pow2k(t3, t2, 100);
        self.mul(t2, t3, t2); // z^(2^200 - 1)
        self.pow2k(t2, t2, 50);
        self.mul(t1, t2, t1); // z^(2^250 - 1)
        (t0, t1)
    }

    /// `d = z^(p - 2) = z^(2^255 - 21)`, the inverse (0 for 0). Uses temps 0..4.
    fn invert(&mut self, d: Reg, z: Reg) {
        let (z11, t1) = self.pow_2_250_minus_1(z);
        self.pow2k(t1, t1, 5); // z^(2^255 - 32)
        self.mul(d, t1, z11);
    }

    /// `d = z^((p - 5) / 8) = z^(2^252 - 3)`. Uses temps 0..4.
    fn pow_p58(&mut self, d: Reg, z: Reg) {
        let (_, t1) = self.pow_2_250_minus_1(z);
        self.pow2k(t1, t1, 2); // z^(2^252 - 4)
        self.mul(d, t1, z);
    }

    /// curve25519-dalek's `CompressedEdwardsY::decompress` of `encoding` into `out` (extended),
    /// requiring that it decodes. Uses temps 0..14 (all of them).
    fn decompress(&mut self, out: Point, encoding: Encoding) {
        let (y, yy, u, v) = (out.y(), temp(4), temp(5), temp(6));
        let (v3, v7, power, r) = (temp(7), temp(8), temp(9), temp(10));
        // r·i reuses `power`'s register, free once r is known.
        let (check, scratch, i, r_i) = (temp(11), temp(12), temp(13), power);
        self.load_y(y, encoding);
        self.square(yy, y);
        self.sub(u, yy, ONE);
        self.constant(scratch, Const::D);
        self.mul(v, yy, scratch);
        self.add(v, v, ONE);
        // sqrt_ratio_i(u, v), exactly as curve25519-dalek computes it.
        self.square(v3, v);
        self.mul(v3, v3, v);
        self.square(v7, v3);
        self.mul(v7, v7, v);
        self.mul(scratch, u, v7);
        self.pow_p58(power, scratch);
        self.mul(r, u, v3);
        self.mul(r, r, power);
        self.square(check, r);
        self.mul(check, check, v);
        self.equal(CORRECT_SIGN, check, u, scratch);
        self.equal_negated(FLIPPED_SIGN, check, u, scratch);
        self.constant(i, Const::SqrtM1);
        self.mul(r_i, u, i);
        self.equal_negated(FLIPPED_SIGN_I, check, r_i, scratch);
        self.or(FLIPPED_ANY, FLIPPED_SIGN, FLIPPED_SIGN_I);
        self.mul(r_i, r, i);
        self.select(r, r_i, FLIPPED_ANY);
        self.is_negative(NEGATIVE, r, scratch);
        self.negate_if(r, NEGATIVE, scratch);
        self.or(VALID_SQUARE, CORRECT_SIGN, FLIPPED_SIGN);
        self.require(VALID_SQUARE);
        // x = ±r by the sign bit (x = 0 with the bit set stays 0, as dalek accepts it).
        self.sign_bit(SIGN_BIT, encoding);
        self.negate_if(r, SIGN_BIT, scratch);
        self.add(out.x(), r, ZERO);
        self.constant(out.z(), Const::One);
        self.mul(out.t(), out.x(), out.y());
    }

    /// `dst = 2 * src` (extended; `src.T` unused). `dst` may equal `src`. Without `with_t` the
    /// result's T is not computed (a doubling that feeds another doubling does not need it).
    /// Uses temps 0..8.
    fn double(&mut self, dst: Point, src: Point, with_t: bool) {
        let (xx, yy, zz2, sum, y_sum, y_diff, xy2, t) = (
            temp(0),
            temp(1),
            temp(2),
            temp(3),
            temp(4),
            temp(5),
            temp(6),
            temp(7),
        );
        self.square(xx, src.x());
        self.square(yy, src.y());
        self.square(zz2, src.z());
        self.add(zz2, zz2, zz2);
        self.add(sum, src.x(), src.y());
        self.square(sum, sum);
        self.add(y_sum, yy, xx);
        self.sub(y_diff, yy, xx);
        self.sub(xy2, sum, y_sum);
        self.sub(t, zz2, y_diff);
        // Completed ((xy2 : t), (y_sum : y_diff)) to extended.
        self.mul(dst.x(), xy2, t);
        self.mul(dst.y(), y_sum, y_diff);
        self.mul(dst.z(), y_diff, t);
        if with_t {
            self.mul(dst.t(), xy2, y_sum);
        }
    }

    /// `dst = p + q` for extended `p` and cached `q`. `dst` may equal `p`. Uses temps 0..6.
    fn add_cached(&mut self, dst: Point, p: Point, q: Point) {
        let (pp, mm, tt2d, zz2, scratch) = (temp(0), temp(1), temp(2), temp(3), temp(4));
        self.add(scratch, p.y(), p.x());
        self.mul(pp, scratch, q.x());
        self.sub(scratch, p.y(), p.x());
        self.mul(mm, scratch, q.y());
        self.mul(tt2d, p.t(), q.t());
        self.mul(zz2, p.z(), q.z());
        self.add(zz2, zz2, zz2);
        let (x, y, z, t) = (temp(5), pp, temp(6), zz2);
        // Completed ((pp - mm : zz2 - tt2d), (pp + mm : zz2 + tt2d)).
        self.sub(x, pp, mm);
        self.add(y, pp, mm);
        self.add(z, zz2, tt2d);
        self.sub(t, zz2, tt2d);
        self.mul(dst.x(), x, t);
        self.mul(dst.y(), y, z);
        self.mul(dst.z(), z, t);
        self.mul(dst.t(), x, y);
    }

    /// `dst = ` the cached form of extended `p`. Uses temp 0.
    fn cache_point(&mut self, dst: Point, p: Point) {
        self.add(dst.x(), p.y(), p.x());
        self.sub(dst.y(), p.y(), p.x());
        self.add(dst.z(), p.z(), ZERO);
        self.constant(temp(0), Const::D2);
        self.mul(dst.t(), p.t(), temp(0));
    }

    /// Forbids points of small order (`[8]P` is the identity), as curve25519-dalek's
    /// `is_small_order`. Uses temps 0..8.
    fn forbid_small_order(&mut self, p: Point) {
        self.double(SCRATCH_POINT, p, false);
        self.double(SCRATCH_POINT, SCRATCH_POINT, false);
        self.double(SCRATCH_POINT, SCRATCH_POINT, false);
        self.canon(temp(0), SCRATCH_POINT.x());
        self.emit(Op::IsZero, X_IS_ZERO.0, temp(0).0, 0);
        self.equal(Y_IS_Z, SCRATCH_POINT.y(), SCRATCH_POINT.z(), temp(0));
        self.and(SMALL_ORDER, X_IS_ZERO, Y_IS_Z);
        self.forbid(SMALL_ORDER);
    }

    fn negate_point(&mut self, dst: Point, p: Point) {
        self.sub(dst.x(), ZERO, p.x());
        self.add(dst.y(), p.y(), ZERO);
        self.add(dst.z(), p.z(), ZERO);
        self.sub(dst.t(), ZERO, p.t());
    }
}

/// Table entry `j` of the `-A` table (cached `j·(-A)`).
fn neg_a_entry(j: u8) -> Point {
    Point::at(NEG_A_TABLE + 4 * j)
}

fn build() -> Vec<u32> {
    let mut asm = Assembler::default();
    asm.constant(ZERO, Const::Zero);
    asm.constant(ONE, Const::One);

    // R: must decode and must not have small order; its point is not needed afterwards.
    asm.decompress(DECODED, Encoding::R);
    asm.forbid_small_order(DECODED);
    // A: the same checks, then kept.
    asm.decompress(DECODED, Encoding::PublicKey);
    asm.forbid_small_order(DECODED);

    // Table of j·(-A), j = 0..15; entry 0 the identity in cached form (1, 1, 1, 0).
    let identity = neg_a_entry(0);
    asm.add(identity.x(), ONE, ZERO);
    asm.add(identity.y(), ONE, ZERO);
    asm.add(identity.z(), ONE, ZERO);
    asm.add(identity.t(), ZERO, ZERO);
    asm.negate_point(NEG_A, DECODED);
    asm.cache_point(neg_a_entry(1), NEG_A);
    let mut previous = NEG_A;
    for j in 2..16u8 {
        asm.add_cached(MULTIPLE, previous, neg_a_entry(1));
        asm.cache_point(neg_a_entry(j), MULTIPLE);
        previous = MULTIPLE;
    }

    // [s]B - [k]A: the 64 4-bit windows of k from the top (four doublings, then one addition
    // from the -A table), then one base-table addition per window of s (entries are [j·16^w]B).
    asm.constant(ACC.x(), Const::Zero);
    asm.constant(ACC.y(), Const::One);
    asm.constant(ACC.z(), Const::One);
    asm.constant(ACC.t(), Const::Zero);
    for window in (0..64u8).rev() {
        if window != 63 {
            for doubling in 0..4 {
                asm.double(ACC, ACC, doubling == 3);
            }
        }
        asm.emit(Op::SelectNegA, ADDEND.x().0, window, 0);
        asm.add_cached(ACC, ACC, ADDEND);
    }
    for window in 0..64u8 {
        asm.emit(Op::SelectBase, ADDEND.x().0, window, 0);
        asm.add_cached(ACC, ACC, ADDEND);
    }

    // Encode and compare with R's bytes.
    let (z_inverse, x, y) = (temp(10), temp(11), temp(12));
    asm.invert(z_inverse, ACC.z());
    asm.mul(x, ACC.x(), z_inverse);
    asm.mul(y, ACC.y(), z_inverse);
    asm.canon(x, x);
    asm.canon(y, y);
    asm.emit(Op::Odd, RESULT_X_ODD.0, x.0, 0);
    asm.emit(Op::Final, y.0, RESULT_X_ODD.0, 0);
    asm.ops
}

/// Words of one invocation's state between program segments (`STATE_WORDS` in the shader):
/// registers (two 13-bit limbs per word), flags, the verdict so far, and k.
pub(crate) const STATE_WORDS: usize = REGISTERS as usize * 10 + FLAGS as usize + 1 + 8;

/// The verification program (built once).
pub(crate) fn verify_program() -> &'static [u32] {
    static PROGRAM: OnceLock<Vec<u32>> = OnceLock::new();
    PROGRAM.get_or_init(build)
}

#[cfg(test)]
mod tests {
    //! An exact emulator of the program (big integers mod p) checked against ed25519-dalek.

    use num_bigint::BigUint;
    use sha2::{Digest, Sha512};

    use super::super::base_table::{self, field};
    use super::super::vectors;
    use super::super::{SignatureItem, verify_strict_reference};
    use super::*;

    fn decode(op: u32) -> (u32, usize, usize, usize) {
        (
            op & 0xff,
            ((op >> 8) & 0xff) as usize,
            ((op >> 16) & 0xff) as usize,
            (op >> 24) as usize,
        )
    }

    fn nibble(scalar: &[u8; 32], window: usize) -> usize {
        usize::from((scalar[window / 2] >> ((window % 2) * 4)) & 15)
    }

    /// Runs the program on one item exactly as the kernel does (same prologue).
    fn emulate(item: &SignatureItem<'_>, table: &[base_table::NielsPoint]) -> bool {
        let p = field::modulus();
        let s: [u8; 32] = item.signature[32..].try_into().expect("32 bytes");
        let mut ok = BigUint::from_bytes_le(&s) < field::group_order();
        let mut hasher = Sha512::new();
        hasher.update(&item.signature[..32]);
        hasher.update(item.public_key);
        hasher.update(item.message);
        let digest: [u8; 64] = hasher.finalize().into();
        let k_value = BigUint::from_bytes_le(&digest) % field::group_order();
        let mut k = [0u8; 32];
        let k_bytes = k_value.to_bytes_le();
        k[..k_bytes.len()].copy_from_slice(&k_bytes);
        let encodings: [[u8; 32]; 2] = [
            item.public_key,
            item.signature[..32].try_into().expect("32 bytes"),
        ];
        let low_255 = |bytes: &[u8; 32]| {
            let mut bytes = *bytes;
            bytes[31] &= 0x7f;
            BigUint::from_bytes_le(&bytes)
        };
        let mut regs = vec![BigUint::ZERO; usize::from(REGISTERS)];
        let mut flags = vec![false; usize::from(FLAGS)];
        for &op in verify_program() {
            let (code, d, a, b) = decode(op);
            match code {
                0 => regs[d] = (&regs[a] * &regs[b]) % &p,
                1 => regs[d] = (&regs[a] + &regs[b]) % &p,
                2 => regs[d] = (&regs[a] + &p - &regs[b]) % &p,
                3 => regs[d] = &regs[a] % &p,
                4 => {
                    regs[d] = match a {
                        0 => BigUint::ZERO,
                        1 => BigUint::from(1u32),
                        2 => field::d(),
                        3 => field::d() * 2u32 % &p,
                        4 => field::sqrt_m1(),
                        other => panic!("constant {other}"),
                    }
                }
                5 => regs[d] = low_255(&encodings[a]) % &p,
                6 => flags[d] = regs[a] == BigUint::ZERO,
                7 => flags[d] = regs[a].bit(0),
                8 => flags[d] = flags[a] || flags[b],
                9 => flags[d] = flags[a] && flags[b],
                10 => ok &= flags[a],
                11 => ok &= !flags[a],
                12 => {
                    if flags[b] {
                        regs[d] = regs[a].clone();
                    }
                }
                13 => flags[d] = encodings[a][31] >> 7 == 1,
                14 => {
                    let j = nibble(&k, a);
                    for c in 0..4 {
                        regs[d + c] = regs[4 * j + c].clone();
                    }
                }
                15 => {
                    let entry = &table[a * 16 + nibble(&s, a)];
                    regs[d] = entry.y_plus_x.clone();
                    regs[d + 1] = entry.y_minus_x.clone();
                    regs[d + 2] = BigUint::from(1u32);
                    regs[d + 3] = entry.xy2d.clone();
                }
                16 => {
                    let r = &encodings[1];
                    ok &= regs[d] == low_255(r) && flags[a] == (r[31] >> 7 == 1);
                }
                other => panic!("op code {other}"),
            }
        }
        ok
    }

    #[test]
    fn program_fits_its_register_and_flag_files() {
        let program = verify_program();
        for &op in program {
            let (code, d, a, b) = decode(op);
            let regs = usize::from(REGISTERS);
            match code {
                0..=2 => assert!(d < regs && a < regs && b < regs),
                3..=5 => assert!(d < regs && a < regs),
                14 | 15 => assert!(d + 4 <= regs && a < 64),
                _ => {}
            }
        }
        // 6 655 operations today: the figure the segment size for llvmpipe was chosen from.
        assert!(program.len() < 8_000, "{} ops", program.len());
    }

    #[test]
    fn emulated_program_matches_verify_strict_on_all_vectors() {
        let table = base_table::niels_table();
        let mut cases: Vec<(String, vectors::OwnedItem)> = vectors::adversarial_items(3)
            .into_iter()
            .map(|case| (case.label, case.item))
            .collect();
        for item in vectors::random_valid_items(11, 8, 64) {
            cases.push(("random valid".to_string(), item));
        }
        let mut valid = 0;
        for (label, item) in &cases {
            let item = item.as_item();
            let expected = verify_strict_reference(&item);
            valid += usize::from(expected);
            assert_eq!(emulate(&item, &table), expected, "{label}");
        }
        assert!(valid >= 8, "the cases include valid signatures ({valid})");
    }
}
