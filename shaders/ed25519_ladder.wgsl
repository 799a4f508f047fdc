// ed25519_ladder.wgsl: second verification kernel: [s]B - [k]A for every item still alive.
// A 4-bit fixed window over -A (16 cached multiples, entry 0 the identity so the loop has no
// data-dependent branch), then one addition of a base-table entry per 4-bit window of s.
// Needs field, curve, scalar and batch before it.
//
// base_table: entry (w * 16 + j) = [j * 16^w] B as affine Niels (60 words), from
// ed25519_table.wgsl.

@group(0) @binding(0) var<storage, read_write> state: array<u32>;
@group(0) @binding(1) var<storage, read> base_table: array<u32>;
@group(0) @binding(2) var<uniform> params: Params;

const NIELS_WORDS: u32 = 60u;

fn load_state_fe(base: u32) -> Fe {
    var r: Fe;
    for (var i = 0u; i < 20u; i++) {
        r[i] = state[base + i];
    }
    return r;
}

fn load_table_fe(base: u32) -> Fe {
    var r: Fe;
    for (var i = 0u; i < 20u; i++) {
        r[i] = base_table[base + i];
    }
    return r;
}

// A base-table entry as a cached point (Z = 1), so one addition routine serves both scalars.
fn load_base_cached(window: u32, digit: u32) -> Cached {
    let base = (window * 16u + digit) * NIELS_WORDS;
    return Cached(load_table_fe(base), load_table_fe(base + 20u), FE_ONE,
        load_table_fe(base + 40u));
}

@compute @workgroup_size(64)
fn ladder_main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let index = gid.x;
    if (index >= params.count) {
        return;
    }
    let base = index * STATE_WORDS;
    if (state[base + STATE_STATUS] == 0u) {
        return;
    }
    var k: array<u32, 8>;
    var s: array<u32, 8>;
    for (var i = 0u; i < 8u; i++) {
        k[i] = state[base + STATE_K + i];
        s[i] = state[base + STATE_S + i];
    }
    let p = base + STATE_POINT;
    let a = Ext(load_state_fe(p), load_state_fe(p + 20u), load_state_fe(p + 40u),
        load_state_fe(p + 60u));

    var table: array<Cached, 16>;
    table[0] = Cached(FE_ONE, FE_ONE, FE_ONE, FE_ZERO);
    let neg_a = pt_neg(a);
    table[1] = pt_to_cached(neg_a);
    var multiple = neg_a;
    for (var j = 2u; j < 16u; j++) {
        multiple = pt_add_cached(multiple, table[1]);
        table[j] = pt_to_cached(multiple);
    }
    // One loop of 128 steps: steps 0..63 are the windows of k from the top (4 doublings, then
    // an addition from the -A table), steps 64..127 add the base-table entry of each window of
    // s. A single addition call site keeps the kernel small.
    var q = pt_identity();
    for (var step = 0u; step < 128u; step++) {
        var addend: Cached;
        if (step < 64u) {
            if (step > 0u) {
                for (var i = 0u; i < 4u; i++) {
                    q = pt_double(q);
                }
            }
            addend = table[sc_nibble(k, 63u - step)];
        } else {
            addend = load_base_cached(step - 64u, sc_nibble(s, step - 64u));
        }
        q = pt_add_cached(q, addend);
    }
    for (var i = 0u; i < 20u; i++) {
        state[p + i] = q.X[i];
        state[p + 20u + i] = q.Y[i];
        state[p + 40u + i] = q.Z[i];
        state[p + 60u + i] = q.T[i];
    }
}
