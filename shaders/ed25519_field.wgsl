// ed25519_field.wgsl: arithmetic in GF(p), p = 2^255 - 19, with 32-bit integers only.
//
// Layout: a field element `Fe` is 20 limbs of 13 bits, value = sum(limb[i] * 2^(13 i)), so it
// holds up to 2^260. Why 13 bits: a product of two limbs is < 2^28 and a column of 20 such
// products is < 2^32 as long as every limb is <= 14654, so schoolbook multiplication needs no
// high multiply and no 64-bit type. Elements are kept "loose": after `fe_carry` every limb is
// <= 8191 except limb 0 (<= 8799), and the value is any representative mod p below 2^260. Only
// `fe_canonical` produces the unique representative in [0, p), used for comparisons and
// encodings. Reduction uses 2^260 = 32 * 2^255 = 32 * 19 = 608 (mod p).
//
// Every function returns a carried (loose) element, so any result may feed `fe_mul` directly.
//
// `fe_carry`, `fe_add`, `fe_sub` and `fe_mul` are in ed25519_field_unrolled.wgsl, generated as
// straight-line code (see there why); this file must be followed by that one.
//
// The rarer limb loops here (canonical form, zero test) run to `limb_count()`, the uniform
// `params.limbs` (always 20; every kernel binds `params`), which the compiler cannot see, so they
// stay loops rather than being unrolled at every inlined call site.
fn limb_count() -> u32 {
    return params.limbs;
}

alias Fe = array<u32, 20>;

const LIMB_BITS: u32 = 13u;
const LIMB_MASK: u32 = 0x1fffu;
// 2^260 mod p.
const FOLD_260: u32 = 608u;

// 64 p = 2^261 - 1216 written with every limb >= 15168, so `a + P64 - b` never goes negative for
// a carried `b` (limbs <= 8799).
const FE_P64: Fe = array<u32, 20>(15168u, 16382u, 16382u, 16382u, 16382u, 16382u, 16382u,
    16382u, 16382u, 16382u, 16382u, 16382u, 16382u, 16382u, 16382u, 16382u, 16382u, 16382u,
    16382u, 16382u);
const FE_ZERO: Fe = array<u32, 20>(0u, 0u, 0u, 0u, 0u, 0u, 0u, 0u, 0u, 0u, 0u, 0u, 0u, 0u, 0u,
    0u, 0u, 0u, 0u, 0u);
const FE_ONE: Fe = array<u32, 20>(1u, 0u, 0u, 0u, 0u, 0u, 0u, 0u, 0u, 0u, 0u, 0u, 0u, 0u, 0u,
    0u, 0u, 0u, 0u, 0u);
// d = -121665 / 121666, 2d, sqrt(-1) = 2^((p-1)/4), and the base point B (x even, y = 4/5),
// all mod p, in 13-bit limbs (generated from the integers; the tests check B through signatures).
const FE_D: Fe = array<u32, 20>(6307u, 6859u, 4740u, 5787u, 5982u, 3157u, 1287u, 2472u, 4106u,
    3u, 6694u, 3827u, 1943u, 928u, 3635u, 8142u, 2927u, 1905u, 219u, 164u);
const FE_D2: Fe = array<u32, 20>(4441u, 5527u, 1289u, 3383u, 3773u, 6315u, 2574u, 4944u, 20u,
    7u, 5196u, 7655u, 3886u, 1856u, 7270u, 8092u, 5855u, 3810u, 438u, 72u);
const FE_SQRT_M1: Fe = array<u32, 20>(176u, 4213u, 2514u, 7222u, 3150u, 4668u, 5311u, 213u,
    792u, 6522u, 5609u, 7159u, 2451u, 1664u, 3245u, 7137u, 4033u, 1026u, 201u, 87u);
const FE_BASE_X: Fe = array<u32, 20>(5402u, 6446u, 6179u, 3162u, 3221u, 5081u, 5270u, 3090u,
    3271u, 841u, 5911u, 7085u, 799u, 4721u, 6914u, 2687u, 3438u, 5790u, 6733u, 66u);
const FE_BASE_Y: Fe = array<u32, 20>(1624u, 4915u, 6553u, 3276u, 1638u, 4915u, 6553u, 3276u,
    1638u, 4915u, 6553u, 3276u, 1638u, 4915u, 6553u, 3276u, 1638u, 4915u, 6553u, 204u);
const FE_BASE_T: Fe = array<u32, 20>(7587u, 3518u, 3305u, 7445u, 5853u, 2426u, 7493u, 4110u,
    4255u, 2311u, 6367u, 2391u, 2278u, 5415u, 5531u, 3788u, 6027u, 6270u, 471u, 207u);

fn fe_neg(a: Fe) -> Fe {
    return fe_sub(FE_ZERO, a);
}

fn fe_sq(a: Fe) -> Fe {
    return fe_mul(a, a);
}

// a^(2^k).
fn fe_pow2k(a: Fe, k: u32) -> Fe {
    var r = a;
    for (var i = 0u; i < k; i++) {
        r = fe_sq(r);
    }
    return r;
}

// a^e for the exponents used here, e = 2^(top + 1) - 2^low_bits + low_value: bits low_bits..top
// are all 1 and the low bits are `low_value`. Square-and-multiply from the top bit. An addition
// chain would save ~40% of these multiplications, but each of its steps is a separate inlined
// copy of fe_mul; one loop keeps the kernels small enough to compile quickly. (The exponent is
// described by three numbers rather than an array because a dynamically indexed constant array
// argument produced wrong bits on llvmpipe.)
fn fe_pow_ones(a: Fe, top: u32, low_bits: u32, low_value: u32) -> Fe {
    // The top bit is set, so after it r = a; starting there also avoids initialising from the
    // FE_ONE constant, which gave wrong results inside this loop on llvmpipe.
    var r = a;
    for (var b = top; b > 0u; b--) {
        let bit = b - 1u;
        r = fe_sq(r);
        let with_a = fe_mul(r, a);
        let take = bit >= low_bits || ((low_value >> bit) & 1u) == 1u;
        if (take) {
            r = with_a;
        }
    }
    return r;
}

// a^(p - 2) = a^(2^255 - 21): bits 254..5 set, low five bits 01011. The inverse; 0 for 0.
fn fe_invert(a: Fe) -> Fe {
    return fe_pow_ones(a, 254u, 5u, 11u);
}

// a^((p - 5) / 8) = a^(2^252 - 3): bits 251..2 set, low two bits 01. The core of the square root.
fn fe_pow_p58(a: Fe) -> Fe {
    return fe_pow_ones(a, 251u, 2u, 1u);
}

// The unique representative in [0, p), limbs exactly 13 bits (limb 19 <= 255).
fn fe_canonical(input: Fe) -> Fe {
    var x = fe_carry(input);
    // Fold bits >= 255 (2^255 = 19) twice: value < 2^255 afterwards.
    for (var round = 0u; round < 2u; round++) {
        let high = x[19] >> 8u;
        x[19] &= 0xffu;
        x[0] += high * 19u;
        for (var i = 0u; i < limb_count() - 1u; i++) {
            x[i + 1u] += x[i] >> LIMB_BITS;
            x[i] &= LIMB_MASK;
        }
    }
    // x in [0, 2^255): x >= p exactly when x + 19 >= 2^255, and then x - p = x + 19 - 2^255.
    var t = x;
    t[0] += 19u;
    for (var i = 0u; i < limb_count() - 1u; i++) {
        t[i + 1u] += t[i] >> LIMB_BITS;
        t[i] &= LIMB_MASK;
    }
    if ((t[19] >> 8u) != 0u) {
        t[19] &= 0xffu;
        return t;
    }
    return x;
}

fn fe_is_zero(a: Fe) -> bool {
    let c = fe_canonical(a);
    var acc: u32;
    acc = 0u;
    for (var i = 0u; i < limb_count(); i++) {
        acc |= c[i];
    }
    return acc == 0u;
}

fn fe_equal(a: Fe, b: Fe) -> bool {
    return fe_is_zero(fe_sub(a, b));
}

// The "sign" of x in ed25519: the low bit of its canonical representative.
fn fe_is_negative(a: Fe) -> bool {
    return (fe_canonical(a)[0] & 1u) == 1u;
}

// Little-endian 32-byte string as 8 words -> element, ignoring bit 255 and NOT reducing mod p
// (as curve25519-dalek's FieldElement::from_bytes: y >= p is read as y - p by the arithmetic).
fn fe_from_words(words_in: array<u32, 8>) -> Fe {
    var words = words_in;
    words[7] &= 0x7fffffffu;
    var r: Fe;
    for (var i = 0u; i < 20u; i++) {
        let bit = i * LIMB_BITS;
        let w = bit / 32u;
        let shift = bit % 32u;
        var v = words[w] >> shift;
        if (shift > 19u && w < 7u) {
            v |= words[w + 1u] << (32u - shift);
        }
        r[i] = v & LIMB_MASK;
    }
    return r;
}

// Canonical little-endian encoding (bit 255 clear) as 8 words.
fn fe_to_words(a: Fe) -> array<u32, 8> {
    let c = fe_canonical(a);
    var words: array<u32, 8>;
    for (var w = 0u; w < 8u; w++) {
        words[w] = 0u;
    }
    for (var i = 0u; i < 20u; i++) {
        let bit = i * LIMB_BITS;
        let w = bit / 32u;
        let shift = bit % 32u;
        words[w] |= c[i] << shift;
        if (shift > 19u && w < 7u) {
            words[w + 1u] |= c[i] >> (32u - shift);
        }
    }
    return words;
}
