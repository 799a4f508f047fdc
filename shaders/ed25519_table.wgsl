// ed25519_table.wgsl: builds the base-point table once: entry (w * 16 + j) = [j * 16^w] B as
// affine Niels (y+x, y-x, 2d*x*y), 60 words (three 20-limb elements). 1024 invocations, one per
// entry. Needs field, curve and batch (for `Params`) before it.

@group(0) @binding(0) var<storage, read_write> table_out: array<u32>;
@group(0) @binding(1) var<uniform> params: Params;

@compute @workgroup_size(64)
fn build_table_main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let entry = gid.x;
    if (entry >= 1024u) {
        return;
    }
    let window = entry / 16u;
    let digit = entry % 16u;
    var p = pt_base();
    for (var i = 0u; i < window * 4u; i++) {
        p = pt_double(p);
    }
    let p_cached = pt_to_cached(p);
    var q = pt_identity();
    for (var b = 4u; b > 0u; b--) {
        q = pt_double(q);
        if (((digit >> (b - 1u)) & 1u) == 1u) {
            q = pt_add_cached(q, p_cached);
        }
    }
    let z_inv = fe_invert(q.Z);
    let x = fe_mul(q.X, z_inv);
    let y = fe_mul(q.Y, z_inv);
    let niels = Niels(fe_add(y, x), fe_sub(y, x), fe_mul(fe_mul(x, y), FE_D2));
    let base = entry * 60u;
    for (var i = 0u; i < 20u; i++) {
        table_out[base + i] = niels.ypx[i];
        table_out[base + 20u + i] = niels.ymx[i];
        table_out[base + 40u + i] = niels.xy2d[i];
    }
}
