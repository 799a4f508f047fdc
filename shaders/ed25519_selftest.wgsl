// ed25519_selftest.wgsl: small kernels that expose the building blocks of the verification
// kernel (field arithmetic, exponentiation, scalar reduction) so the tests can compare each with
// a CPU reference on its own. Needs field, scalar and batch before it.
//
// Bindings: 0 `inputs` (read), 1 `outputs` (read_write), 2 `params` (uniform; `count` cases).
// field_main:  16 words in (a, b as 32-byte strings) -> 32 out: a*b, a+b, a-b, a^4 (canonical).
// field_pow_main: 16 words in (a, unused) -> 16 out: 1/a, a^(2^200) (long multiplication loops).
// scalar_main: 16 words in (h) -> 9 out: h mod L (8 words), [h < 2^256 part] >= L flag.

@group(0) @binding(0) var<storage, read> inputs: array<u32>;
@group(0) @binding(1) var<storage, read_write> outputs: array<u32>;
@group(0) @binding(2) var<uniform> params: Params;

fn input_words8(base: u32) -> array<u32, 8> {
    var r: array<u32, 8>;
    for (var i = 0u; i < 8u; i++) {
        r[i] = inputs[base + i];
    }
    return r;
}

fn store_words8(base: u32, words: array<u32, 8>) {
    for (var i = 0u; i < 8u; i++) {
        outputs[base + i] = words[i];
    }
}

@compute @workgroup_size(64)
fn field_main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let index = gid.x;
    if (index >= params.count) {
        return;
    }
    let a = fe_from_words(input_words8(index * 16u));
    let b = fe_from_words(input_words8(index * 16u + 8u));
    let out = index * 32u;
    store_words8(out, fe_to_words(fe_mul(a, b)));
    store_words8(out + 8u, fe_to_words(fe_add(a, b)));
    store_words8(out + 16u, fe_to_words(fe_sub(a, b)));
    store_words8(out + 24u, fe_to_words(fe_pow2k(a, 2u)));
}

@compute @workgroup_size(64)
fn field_pow_main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let index = gid.x;
    if (index >= params.count) {
        return;
    }
    let a = fe_from_words(input_words8(index * 16u));
    let out = index * 16u;
    store_words8(out, fe_to_words(fe_invert(a)));
    store_words8(out + 8u, fe_to_words(fe_pow2k(a, 200u)));
}

@compute @workgroup_size(64)
fn scalar_main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let index = gid.x;
    if (index >= params.count) {
        return;
    }
    var h: array<u32, 16>;
    for (var i = 0u; i < 16u; i++) {
        h[i] = inputs[index * 16u + i];
    }
    store_words8(index * 9u, sc_reduce_512(h));
    outputs[index * 9u + 8u] = select(0u, 1u, sc_at_least_l(input_words8(index * 16u)));
}
