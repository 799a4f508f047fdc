// ed25519_curve.wgsl: points of the twisted Edwards curve -x^2 + y^2 = 1 + d x^2 y^2 over the
// field of ed25519_field.wgsl. Formulas are the complete extended-coordinate ones (Hisil, Wong,
// Carter, Dawson 2008) in the arrangement of the ed25519 reference code, so they also work for
// the identity, doubling and small-order points without special cases.
//
// Layouts:
// - `Ext` (extended): x = X/Z, y = Y/Z, x*y = T/Z.
// - `Cached`: (Y+X, Y-X, Z, 2d*T), a point prepared for repeated additions.
// - `Niels`: affine (y+x, y-x, 2d*x*y), the base-point table entries (60 words each).

struct Ext {
    X: Fe,
    Y: Fe,
    Z: Fe,
    T: Fe,
}

struct Cached {
    YpX: Fe,
    YmX: Fe,
    Z: Fe,
    T2d: Fe,
}

struct Niels {
    ypx: Fe,
    ymx: Fe,
    xy2d: Fe,
}

fn pt_identity() -> Ext {
    return Ext(FE_ZERO, FE_ONE, FE_ONE, FE_ZERO);
}

fn pt_base() -> Ext {
    return Ext(FE_BASE_X, FE_BASE_Y, FE_ONE, FE_BASE_T);
}

fn pt_neg(p: Ext) -> Ext {
    return Ext(fe_neg(p.X), p.Y, p.Z, fe_neg(p.T));
}

fn pt_to_cached(p: Ext) -> Cached {
    return Cached(fe_add(p.Y, p.X), fe_sub(p.Y, p.X), p.Z, fe_mul(p.T, FE_D2));
}

// From the "completed" form ((X:Z), (Y:T)) to extended coordinates.
fn pt_from_completed(x: Fe, y: Fe, z: Fe, t: Fe) -> Ext {
    return Ext(fe_mul(x, t), fe_mul(y, z), fe_mul(z, t), fe_mul(x, y));
}

// 2P; T of the input is not used.
fn pt_double(p: Ext) -> Ext {
    let xx = fe_sq(p.X);
    let yy = fe_sq(p.Y);
    let zz = fe_sq(p.Z);
    let zz2 = fe_add(zz, zz);
    let xy2 = fe_sub(fe_sq(fe_add(p.X, p.Y)), fe_add(yy, xx));
    let y_sum = fe_add(yy, xx);
    let y_diff = fe_sub(yy, xx);
    return pt_from_completed(xy2, y_sum, y_diff, fe_sub(zz2, y_diff));
}

// P + Q for a cached Q.
fn pt_add_cached(p: Ext, q: Cached) -> Ext {
    let a = fe_mul(fe_add(p.Y, p.X), q.YpX);
    let b = fe_mul(fe_sub(p.Y, p.X), q.YmX);
    let c = fe_mul(q.T2d, p.T);
    let zz = fe_mul(p.Z, q.Z);
    let d = fe_add(zz, zz);
    return pt_from_completed(fe_sub(a, b), fe_add(a, b), fe_add(d, c), fe_sub(d, c));
}

// P + Q for an affine Q (Z = 1).
fn pt_add_niels(p: Ext, q: Niels) -> Ext {
    let a = fe_mul(fe_add(p.Y, p.X), q.ypx);
    let b = fe_mul(fe_sub(p.Y, p.X), q.ymx);
    let c = fe_mul(q.xy2d, p.T);
    let d = fe_add(p.Z, p.Z);
    return pt_from_completed(fe_sub(a, b), fe_add(a, b), fe_add(d, c), fe_sub(d, c));
}

fn pt_is_identity(p: Ext) -> bool {
    return fe_is_zero(p.X) && fe_equal(p.Y, p.Z);
}

// [8]P = identity, as curve25519-dalek's is_small_order.
fn pt_is_small_order(p: Ext) -> bool {
    var q = p;
    for (var i = 0u; i < 3u; i++) {
        q = pt_double(q);
    }
    return pt_is_identity(q);
}

struct SqrtRatio {
    was_square: bool,
    r: Fe,
}

// sqrt(u/v) exactly as curve25519-dalek's FieldElement::sqrt_ratio_i: the nonnegative root, and
// whether u/v was a square (u = 0 counts as a square).
fn fe_sqrt_ratio_i(u: Fe, v: Fe) -> SqrtRatio {
    let v3 = fe_mul(fe_sq(v), v);
    let v7 = fe_mul(fe_sq(v3), v);
    var r = fe_mul(fe_mul(u, v3), fe_pow_p58(fe_mul(u, v7)));
    let check = fe_mul(v, fe_sq(r));
    let neg_u = fe_neg(u);
    let correct_sign = fe_equal(check, u);
    let flipped_sign = fe_equal(check, neg_u);
    let flipped_sign_i = fe_equal(check, fe_mul(neg_u, FE_SQRT_M1));
    if (flipped_sign || flipped_sign_i) {
        r = fe_mul(r, FE_SQRT_M1);
    }
    if (fe_is_negative(r)) {
        r = fe_neg(r);
    }
    return SqrtRatio(correct_sign || flipped_sign, r);
}

struct Decompressed {
    ok: bool,
    point: Ext,
}

// curve25519-dalek's CompressedEdwardsY::decompress: y from the low 255 bits (not reduced), x the
// nonnegative root negated when bit 255 is set (so x = 0 with the bit set is accepted).
fn pt_decompress(words: array<u32, 8>) -> Decompressed {
    let y = fe_from_words(words);
    let yy = fe_sq(y);
    let u = fe_sub(yy, FE_ONE);
    let v = fe_add(fe_mul(yy, FE_D), FE_ONE);
    let root = fe_sqrt_ratio_i(u, v);
    var x = root.r;
    if ((words[7] >> 31u) == 1u) {
        x = fe_neg(x);
    }
    return Decompressed(root.was_square, Ext(x, y, FE_ONE, fe_mul(x, y)));
}

// Canonical encoding: y with the sign of x in bit 255.
fn pt_compress(p: Ext) -> array<u32, 8> {
    let z_inv = fe_invert(p.Z);
    let x = fe_mul(p.X, z_inv);
    var words = fe_to_words(fe_mul(p.Y, z_inv));
    if (fe_is_negative(x)) {
        words[7] |= 0x80000000u;
    }
    return words;
}
