// ed25519_verify.wgsl: one invocation verifies one signature, with the verdict of ed25519-dalek's
// VerifyingKey::from_bytes + verify_strict. Needs ed25519_field/curve/scalar.wgsl before it.
//
// Bindings:
// 0 `items` (read): 40 words per item: A bytes (8 words, little-endian), R bytes (8), s bytes
//   (8), h = SHA-512(R || A || M) (16 words, the digest bytes little-endian), computed on the CPU
//   from the bytes exactly as sent.
// 1 `verdicts` (read_write): one word per item, 1 valid, 0 invalid.
// 2 `base_table` (read): [j * 16^w] B for w in 0..64, j in 0..16, as Niels (60 words), entry
//   (w * 16 + j); built once by ed25519_table.wgsl.
// 3 `params` (uniform): `count` items in this dispatch.

const ITEM_WORDS: u32 = 40u;
const NIELS_WORDS: u32 = 60u;

struct Params {
    count: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<storage, read> items: array<u32>;
@group(0) @binding(1) var<storage, read_write> verdicts: array<u32>;
@group(0) @binding(2) var<storage, read> base_table: array<u32>;
@group(0) @binding(3) var<uniform> params: Params;

fn load_words8(base: u32) -> array<u32, 8> {
    var r: array<u32, 8>;
    for (var i = 0u; i < 8u; i++) {
        r[i] = items[base + i];
    }
    return r;
}

fn load_fe_table(base: u32) -> Fe {
    var r: Fe;
    for (var i = 0u; i < 20u; i++) {
        r[i] = base_table[base + i];
    }
    return r;
}

fn load_niels(window: u32, digit: u32) -> Niels {
    let base = (window * 16u + digit) * NIELS_WORDS;
    return Niels(load_fe_table(base), load_fe_table(base + 20u), load_fe_table(base + 40u));
}

// [s]B - [k]A: a 4-bit fixed window over -A (16 cached multiples, entry 0 the identity so the
// loop has no data-dependent branch), then one table addition per 4-bit window of s.
fn double_scalar_mul(k: array<u32, 8>, a: Ext, s: array<u32, 8>) -> Ext {
    var table: array<Cached, 16>;
    table[0] = Cached(FE_ONE, FE_ONE, FE_ONE, FE_ZERO);
    let neg_a = pt_neg(a);
    table[1] = pt_to_cached(neg_a);
    var multiple = neg_a;
    for (var j = 2u; j < 16u; j++) {
        multiple = pt_add_cached(multiple, table[1]);
        table[j] = pt_to_cached(multiple);
    }
    var q = pt_identity();
    for (var w = 64u; w > 0u; w--) {
        if (w < 64u) {
            q = pt_double(pt_double(pt_double(pt_double(q))));
        }
        q = pt_add_cached(q, table[sc_nibble(k, w - 1u)]);
    }
    for (var w = 0u; w < 64u; w++) {
        q = pt_add_niels(q, load_niels(w, sc_nibble(s, w)));
    }
    return q;
}

fn verify_one(index: u32) -> bool {
    let base = index * ITEM_WORDS;
    let a_words = load_words8(base);
    let r_words = load_words8(base + 8u);
    let s_words = load_words8(base + 16u);
    if (sc_at_least_l(s_words)) {
        return false;
    }
    let a = pt_decompress(a_words);
    if (!a.ok || pt_is_small_order(a.point)) {
        return false;
    }
    let r = pt_decompress(r_words);
    if (!r.ok || pt_is_small_order(r.point)) {
        return false;
    }
    var h: array<u32, 16>;
    for (var i = 0u; i < 16u; i++) {
        h[i] = items[base + 24u + i];
    }
    let k = sc_reduce_512(h);
    let encoded = pt_compress(double_scalar_mul(k, a.point, s_words));
    var same = true;
    for (var i = 0u; i < 8u; i++) {
        same = same && (encoded[i] == r_words[i]);
    }
    return same;
}

@compute @workgroup_size(64)
fn verify_main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let index = gid.x;
    if (index >= params.count) {
        return;
    }
    verdicts[index] = select(0u, 1u, verify_one(index));
}
