// ed25519_verify.wgsl: ed25519 verify_strict, one invocation per signature, as an interpreter of
// the straight-line program built by src/gpu/sigverify/program.rs (the op codes and the register
// and flag counts below must match it). Needs field, scalar and batch before it.
//
// Why an interpreter: drivers inline every function, so structured code with several point
// doublings, additions and exponentiations holds dozens of copies of the unrolled field
// multiplication; llvmpipe needed minutes to compile that and stops all loops of an invocation
// after 65535 iterations. Here each field operation has one call site, the program (6655 ops) is
// data that every invocation reads at the same index at the same time (no divergence).
//
// One dispatch runs the ops [params.op_begin, params.op_end). On hardware GPUs that is the whole
// program. On llvmpipe it is a segment short enough to stay under the 65535-iteration limit (the
// field operations still hold loops there, ~50 iterations per op were measured), and the
// invocation's whole state (registers, flags, verdict so far, k) goes through `state` between
// segments: loaded unless the segment starts the program, stored unless it ends it.
//
// Bindings: items (40 words per item: A, R, s, SHA-512(R || A || M)), the program, the
// base-point table (entry w * 16 + j = [j * 16^w]B as affine Niels, 60 words), one verdict word
// per item (1 valid, 0 invalid, written by the segment that ends the program), params, and the
// state between segments (STATE_WORDS per item, word-major: word w of item i at w * count + i, so
// neighbouring invocations touch neighbouring words).

@group(0) @binding(0) var<storage, read> items: array<u32>;
@group(0) @binding(1) var<storage, read> program: array<u32>;
@group(0) @binding(2) var<storage, read> base_table: array<u32>;
@group(0) @binding(3) var<storage, read_write> verdicts: array<u32>;
@group(0) @binding(4) var<uniform> params: Params;
@group(0) @binding(5) var<storage, read_write> state: array<u32>;

const REGISTERS: u32 = 104u;
const FLAGS: u32 = 16u;
const NIELS_WORDS: u32 = 60u;
// Registers, flags, the verdict so far, k.
const STATE_FLAGS: u32 = REGISTERS * PACKED_WORDS;
const STATE_OK: u32 = STATE_FLAGS + FLAGS;
const STATE_K: u32 = STATE_OK + 1u;
const STATE_WORDS: u32 = STATE_K + 8u;

fn state_at(word: u32, index: u32) -> u32 {
    return word * params.count + index;
}

// The register file holds elements with two limbs per word: every value stored is carried (limbs
// < 2^14), and halving the bytes matters because the file lives in (local) memory, indexed by op.
const PACKED_WORDS: u32 = 10u;
alias Packed = array<u32, 10>;

fn fe_pack(a: Fe) -> Packed {
    return Packed(a[0] | (a[1] << 16u), a[2] | (a[3] << 16u), a[4] | (a[5] << 16u),
        a[6] | (a[7] << 16u), a[8] | (a[9] << 16u), a[10] | (a[11] << 16u),
        a[12] | (a[13] << 16u), a[14] | (a[15] << 16u), a[16] | (a[17] << 16u),
        a[18] | (a[19] << 16u));
}

fn fe_unpack(p: Packed) -> Fe {
    let m = 0xffffu;
    return Fe(p[0] & m, p[0] >> 16u, p[1] & m, p[1] >> 16u, p[2] & m, p[2] >> 16u, p[3] & m,
        p[3] >> 16u, p[4] & m, p[4] >> 16u, p[5] & m, p[5] >> 16u, p[6] & m, p[6] >> 16u,
        p[7] & m, p[7] >> 16u, p[8] & m, p[8] >> 16u, p[9] & m, p[9] >> 16u);
}

fn fe_constant(which: u32) -> Fe {
    // A switch rather than an indexed constant array: llvmpipe produced wrong values for a
    // dynamically indexed constant array argument.
    switch which {
        case 1u: { return FE_ONE; }
        case 2u: { return FE_D; }
        case 3u: { return FE_D2; }
        case 4u: { return FE_SQRT_M1; }
        default: { return FE_ZERO; }
    }
}

fn fe_limbs_zero(a: Fe) -> bool {
    var acc = 0u;
    for (var i = 0u; i < 20u; i++) {
        acc |= a[i];
    }
    return acc == 0u;
}

fn table_fe(base: u32) -> Fe {
    var r: Fe;
    for (var i = 0u; i < 20u; i++) {
        r[i] = base_table[base + i];
    }
    return r;
}

@compute @workgroup_size(64)
fn verify_main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let index = gid.x;
    if (index >= params.count) {
        return;
    }
    let base = index * ITEM_WORDS;
    // encodings[0..8] = A, [8..16] = R.
    var encodings: array<u32, 16>;
    for (var i = 0u; i < 16u; i++) {
        encodings[i] = items[base + i];
    }
    var s: array<u32, 8>;
    for (var i = 0u; i < 8u; i++) {
        s[i] = items[base + 16u + i];
    }
    var regs: array<Packed, REGISTERS>;
    var flags: array<u32, FLAGS>;
    var k: array<u32, 8>;
    var ok: bool;
    if (params.op_begin == 0u) {
        var h: array<u32, 16>;
        for (var i = 0u; i < 16u; i++) {
            h[i] = items[base + 24u + i];
        }
        k = sc_reduce_512(h);
        ok = !sc_at_least_l(s);
    } else {
        for (var r = 0u; r < REGISTERS; r++) {
            for (var i = 0u; i < PACKED_WORDS; i++) {
                regs[r][i] = state[state_at(r * PACKED_WORDS + i, index)];
            }
        }
        for (var f = 0u; f < FLAGS; f++) {
            flags[f] = state[state_at(STATE_FLAGS + f, index)];
        }
        ok = state[state_at(STATE_OK, index)] == 1u;
        for (var i = 0u; i < 8u; i++) {
            k[i] = state[state_at(STATE_K + i, index)];
        }
    }

    for (var pc = params.op_begin; pc < params.op_end; pc++) {
        let op = program[pc];
        let code = op & 0xffu;
        let d = (op >> 8u) & 0xffu;
        let a = (op >> 16u) & 0xffu;
        let b = op >> 24u;
        switch code {
            case 0u: {
                regs[d] = fe_pack(fe_mul(fe_unpack(regs[a]), fe_unpack(regs[b])));
            }
            case 1u: {
                regs[d] = fe_pack(fe_add(fe_unpack(regs[a]), fe_unpack(regs[b])));
            }
            case 2u: {
                regs[d] = fe_pack(fe_sub(fe_unpack(regs[a]), fe_unpack(regs[b])));
            }
            case 3u: {
                regs[d] = fe_pack(fe_canonical(fe_unpack(regs[a])));
            }
            case 4u: {
                regs[d] = fe_pack(fe_constant(a));
            }
            case 5u: {
                var words: array<u32, 8>;
                for (var i = 0u; i < 8u; i++) {
                    words[i] = encodings[a * 8u + i];
                }
                regs[d] = fe_pack(fe_from_words(words));
            }
            case 6u: {
                flags[d] = select(0u, 1u, fe_limbs_zero(fe_unpack(regs[a])));
            }
            case 7u: {
                flags[d] = regs[a][0] & 1u;
            }
            case 8u: {
                flags[d] = flags[a] | flags[b];
            }
            case 9u: {
                flags[d] = flags[a] & flags[b];
            }
            case 10u: {
                ok = ok && flags[a] == 1u;
            }
            case 11u: {
                ok = ok && flags[a] == 0u;
            }
            case 12u: {
                // Branch-free, so lanes with different flags stay together.
                let take = flags[b] == 1u;
                let source = regs[a];
                var into = regs[d];
                for (var i = 0u; i < PACKED_WORDS; i++) {
                    into[i] = select(into[i], source[i], take);
                }
                regs[d] = into;
            }
            case 13u: {
                flags[d] = encodings[a * 8u + 7u] >> 31u;
            }
            case 14u: {
                let j = sc_nibble(k, a);
                for (var c = 0u; c < 4u; c++) {
                    regs[d + c] = regs[4u * j + c];
                }
            }
            case 15u: {
                let entry = (a * 16u + sc_nibble(s, a)) * NIELS_WORDS;
                regs[d] = fe_pack(table_fe(entry));
                regs[d + 1u] = fe_pack(table_fe(entry + 20u));
                regs[d + 2u] = fe_pack(FE_ONE);
                regs[d + 3u] = fe_pack(table_fe(entry + 40u));
            }
            case 16u: {
                var r_words: array<u32, 8>;
                for (var i = 0u; i < 8u; i++) {
                    r_words[i] = encodings[8u + i];
                }
                let r_y = fe_from_words(r_words);
                let y = fe_unpack(regs[d]);
                var same = (r_words[7] >> 31u) == flags[a];
                for (var i = 0u; i < 20u; i++) {
                    same = same && y[i] == r_y[i];
                }
                ok = ok && same;
            }
            default: {}
        }
    }
    if (params.op_end < arrayLength(&program)) {
        for (var r = 0u; r < REGISTERS; r++) {
            for (var i = 0u; i < PACKED_WORDS; i++) {
                state[state_at(r * PACKED_WORDS + i, index)] = regs[r][i];
            }
        }
        for (var f = 0u; f < FLAGS; f++) {
            state[state_at(STATE_FLAGS + f, index)] = flags[f];
        }
        state[state_at(STATE_OK, index)] = select(0u, 1u, ok);
        for (var i = 0u; i < 8u; i++) {
            state[state_at(STATE_K + i, index)] = k[i];
        }
    } else {
        verdicts[index] = select(0u, 1u, ok);
    }
}
