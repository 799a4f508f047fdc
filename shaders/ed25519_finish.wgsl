// ed25519_finish.wgsl: third verification kernel: the canonical encoding of [s]B - [k]A must
// equal the signature's R bytes exactly (so a non-canonical R never verifies). Writes one verdict
// word per item: 1 valid, 0 invalid. Needs field, curve and batch before it.

@group(0) @binding(0) var<storage, read> state: array<u32>;
@group(0) @binding(1) var<storage, read_write> verdicts: array<u32>;
@group(0) @binding(2) var<uniform> params: Params;

fn load_state_fe(base: u32) -> Fe {
    var r: Fe;
    for (var i = 0u; i < 20u; i++) {
        r[i] = state[base + i];
    }
    return r;
}

@compute @workgroup_size(64)
fn finish_main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let index = gid.x;
    if (index >= params.count) {
        return;
    }
    let base = index * STATE_WORDS;
    if (state[base + STATE_STATUS] == 0u) {
        verdicts[index] = 0u;
        return;
    }
    let p = base + STATE_POINT;
    let q = Ext(load_state_fe(p), load_state_fe(p + 20u), load_state_fe(p + 40u),
        load_state_fe(p + 60u));
    let encoded = pt_compress(q);
    var same: bool;
    same = true;
    for (var i = 0u; i < 8u; i++) {
        same = same && (encoded[i] == state[base + STATE_R + i]);
    }
    verdicts[index] = select(0u, 1u, same);
}
