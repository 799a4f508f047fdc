// ed25519_batch.wgsl: what the verification kernel (ed25519_verify.wgsl) and the building-block
// test kernels (ed25519_selftest.wgsl) share: the uniform parameters and the item layout.
//
// Input record (`items`, 40 words per item): A bytes (8 words, little-endian), R bytes (8),
// s bytes (8), h = SHA-512(R || A || M) (16 words), the hash computed on the CPU over the bytes
// exactly as sent.

struct Params {
    // Items (or test cases) in this dispatch.
    count: u32,
    // Always 20; a uniform so that compilers cannot unroll the rarer limb loops (see
    // ed25519_field.wgsl).
    limbs: u32,
    // The ops of the verification program this dispatch runs, [op_begin, op_end)
    // (ed25519_verify.wgsl); 0 for the test kernels.
    op_begin: u32,
    op_end: u32,
}

const ITEM_WORDS: u32 = 40u;
