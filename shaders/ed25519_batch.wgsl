// ed25519_batch.wgsl: what the three verification kernels (decode, ladder, finish) share: the
// uniform parameters and the layout of the per-item state they pass along in a storage buffer.
// Verification is split in three kernels because drivers inline every function: one kernel with
// all of it compiles for many minutes on llvmpipe, three smaller ones in well under a minute, and
// smaller kernels also need fewer registers on real GPUs.
//
// Input record (`items`, 40 words per item): A bytes (8 words, little-endian), R bytes (8),
// s bytes (8), h = SHA-512(R || A || M) (16 words), the hash computed on the CPU over the bytes
// exactly as sent.
//
// State record (`state`, STATE_WORDS per item):
//   [0]        status: 1 while the item may still be valid, 0 once rejected
//   [1, 9)     k = h mod L (8 words)
//   [9, 17)    s (8 words)
//   [17, 25)   R bytes (8 words)
//   [25, 105)  a point (X, Y, Z, T; 20 limbs each): A after decode, [s]B - [k]A after the ladder

struct Params {
    // Items in this dispatch.
    count: u32,
    // Always 20; a uniform so that compilers cannot unroll limb loops (see ed25519_field.wgsl).
    limbs: u32,
    _pad0: u32,
    _pad1: u32,
}

const ITEM_WORDS: u32 = 40u;
const STATE_WORDS: u32 = 105u;
const STATE_STATUS: u32 = 0u;
const STATE_K: u32 = 1u;
const STATE_S: u32 = 9u;
const STATE_R: u32 = 17u;
const STATE_POINT: u32 = 25u;
