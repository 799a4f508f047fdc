// ed25519_decode.wgsl: first verification kernel. Checks s < L, decodes A and R as
// curve25519-dalek does, rejects small-order A or R, reduces h mod L, and writes the state record
// (layout in ed25519_batch.wgsl). Needs field, curve, scalar and batch before it.

@group(0) @binding(0) var<storage, read> items: array<u32>;
@group(0) @binding(1) var<storage, read_write> state: array<u32>;
@group(0) @binding(2) var<uniform> params: Params;

fn load_item_words8(base: u32) -> array<u32, 8> {
    var r: array<u32, 8>;
    for (var i = 0u; i < 8u; i++) {
        r[i] = items[base + i];
    }
    return r;
}

// Whether the item survives the checks that need no scalar multiplication; stores A on success.
fn decode_item(index: u32) -> bool {
    let base = index * ITEM_WORDS;
    let out = index * STATE_WORDS;
    let s_words = load_item_words8(base + 16u);
    if (sc_at_least_l(s_words)) {
        return false;
    }
    // A and R through one loop so the (inlined) decompression exists once in the kernel.
    for (var which = 0u; which < 2u; which++) {
        let decoded = pt_decompress(load_item_words8(base + which * 8u));
        if (!decoded.ok || pt_is_small_order(decoded.point)) {
            return false;
        }
        if (which == 0u) {
            for (var i = 0u; i < 20u; i++) {
                state[out + STATE_POINT + i] = decoded.point.X[i];
                state[out + STATE_POINT + 20u + i] = decoded.point.Y[i];
                state[out + STATE_POINT + 40u + i] = decoded.point.Z[i];
                state[out + STATE_POINT + 60u + i] = decoded.point.T[i];
            }
        }
    }
    var h: array<u32, 16>;
    for (var i = 0u; i < 16u; i++) {
        h[i] = items[base + 24u + i];
    }
    let k = sc_reduce_512(h);
    for (var i = 0u; i < 8u; i++) {
        state[out + STATE_K + i] = k[i];
        state[out + STATE_S + i] = s_words[i];
        state[out + STATE_R + i] = items[base + 8u + i];
    }
    return true;
}

@compute @workgroup_size(64)
fn decode_main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let index = gid.x;
    if (index >= params.count) {
        return;
    }
    state[index * STATE_WORDS + STATE_STATUS] = select(0u, 1u, decode_item(index));
}
