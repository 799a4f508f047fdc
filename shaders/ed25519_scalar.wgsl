// ed25519_scalar.wgsl: scalars mod L = 2^252 + 27742317777372353535851937790883648493, as 8
// little-endian u32 words.

const SCALAR_L: array<u32, 8> = array<u32, 8>(0x5cf5d3edu, 0x5812631au, 0xa2f79cd6u,
    0x14def9deu, 0u, 0u, 0u, 0x10000000u);

// a >= L (a as a 256-bit integer; a set bit 255 makes it >= L as well).
fn sc_at_least_l(a: array<u32, 8>) -> bool {
    for (var w = 8u; w > 0u; w--) {
        let i = w - 1u;
        if (a[i] != SCALAR_L[i]) {
            return a[i] > SCALAR_L[i];
        }
    }
    return true;
}

// a - L, for L <= a < 2^256.
fn sc_sub_l(a: array<u32, 8>) -> array<u32, 8> {
    var r: array<u32, 8>;
    var borrow = 0u;
    for (var i = 0u; i < 8u; i++) {
        let d = a[i] - SCALAR_L[i];
        let d2 = d - borrow;
        borrow = select(0u, 1u, a[i] < SCALAR_L[i]) | select(0u, 1u, d < borrow);
        r[i] = d2;
    }
    return r;
}

// A 512-bit little-endian integer (16 words) mod L, bit by bit from the top: r = 2r + bit, minus
// L when r >= L. r < L < 2^253 keeps 2r + 1 within 256 bits. Simple and plainly correct; it is a
// few percent of one verification.
fn sc_reduce_512(h: array<u32, 16>) -> array<u32, 8> {
    var r: array<u32, 8>;
    for (var w = 0u; w < 8u; w++) {
        r[w] = 0u;
    }
    for (var b = 512u; b > 0u; b--) {
        let bit_index = b - 1u;
        let bit = (h[bit_index / 32u] >> (bit_index % 32u)) & 1u;
        for (var w = 7u; w > 0u; w--) {
            r[w] = (r[w] << 1u) | (r[w - 1u] >> 31u);
        }
        r[0] = (r[0] << 1u) | bit;
        if (sc_at_least_l(r)) {
            r = sc_sub_l(r);
        }
    }
    return r;
}

// The 4-bit window `index` (0..63) of a scalar.
fn sc_nibble(a: array<u32, 8>, index: u32) -> u32 {
    return (a[index / 8u] >> ((index % 8u) * 4u)) & 15u;
}
