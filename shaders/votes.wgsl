// Vote aggregation kernels (src/gpu/votes/gpu.rs drives them; semantics in src/gpu/votes/mod.rs).
//
// Data layout, all in group 0 (one bind group shared by every entry point):
//   binding 0  votes          array<Vote>, 28-byte records (GpuVote in Rust), `params.vote_count` used
//   binding 1  params         Params (uniform)
//   binding 2  ballot_table   open-addressing hash table of ballots (term, voter), `table_mask + 1`
//                             slots; a slot holds 0 (empty) or (index of the ballot's first vote + 1),
//                             with bit 31 (FLAG) set once the ballot equivocates
//   binding 3  ballot_aux     per ballot slot: the evidence record index of an equivocating ballot
//   binding 4  proposal_table open-addressing hash table of (term, proposal): 0 or (first vote + 1)
//   binding 5  proposal_ids   per proposal slot: the tally record index of that proposal
//   binding 6  counters       [0] tallies created, [1] equivocating ballots found
//   binding 7  tallies        TALLY_WORDS u32 per tally record:
//                             term_lo, term_hi, proposal_lo, proposal_hi, yes_count, no_count,
//                             yes_weight_lo, yes_weight_hi, no_weight_lo, no_weight_hi
//   binding 8  evidence       EVIDENCE_WORDS u32 per equivocating ballot:
//                             voter, term_lo, term_hi, then the smallest distinct vote and the second
//                             smallest as (proposal_hi, proposal_lo, approve, weight), each word
//                             stored bit-inverted so that atomicMax computes a minimum; 1 pad word
// Group 1 (only `prepare`): binding 0 `indirect`, the workgroup counts of the evidence passes.
//
// Why hash tables with vote indices: a slot is claimed with one 32-bit compare-exchange of the
// claiming vote's index, and keys are compared by reading both votes from the immutable input, so
// multi-word keys need no locks. Every per-vote kernel walks the votes with a grid stride.

struct Vote {
    voter: u32,
    weight: u32,
    approve: u32,
    proposal_lo: u32,
    proposal_hi: u32,
    term_lo: u32,
    term_hi: u32,
}

struct Params {
    vote_count: u32,
    table_mask: u32,
    tally_capacity: u32,
    evidence_capacity: u32,
    evidence_workgroups: u32,
    pad0: u32,
    pad1: u32,
    pad2: u32,
}

const WORKGROUP: u32 = 256u;
const FLAG: u32 = 0x80000000u;
const INDEX_MASK: u32 = 0x7fffffffu;
const NONE: u32 = 0xffffffffu;
const TALLY_WORDS: u32 = 10u;
const EVIDENCE_WORDS: u32 = 12u;
const BALLOT_SEED: u32 = 0x9e3779b9u;
const PROPOSAL_SEED: u32 = 0x85ebca6bu;

@group(0) @binding(0) var<storage, read> votes: array<Vote>;
@group(0) @binding(1) var<uniform> params: Params;
@group(0) @binding(2) var<storage, read_write> ballot_table: array<atomic<u32>>;
@group(0) @binding(3) var<storage, read_write> ballot_aux: array<u32>;
@group(0) @binding(4) var<storage, read_write> proposal_table: array<atomic<u32>>;
@group(0) @binding(5) var<storage, read_write> proposal_ids: array<u32>;
@group(0) @binding(6) var<storage, read_write> counters: array<atomic<u32>>;
@group(0) @binding(7) var<storage, read_write> tallies: array<atomic<u32>>;
@group(0) @binding(8) var<storage, read_write> evidence: array<atomic<u32>>;
@group(1) @binding(0) var<storage, read_write> indirect: array<u32>;

fn mix32(value: u32) -> u32 {
    var x = value;
    x ^= x >> 16u;
    x *= 0x7feb352du;
    x ^= x >> 15u;
    x *= 0x846ca68bu;
    x ^= x >> 16u;
    return x;
}

fn ballot_hash(v: Vote) -> u32 {
    return mix32(mix32(mix32(v.voter ^ BALLOT_SEED) ^ v.term_lo) + v.term_hi) & params.table_mask;
}

fn proposal_hash(v: Vote) -> u32 {
    let h = mix32(mix32(mix32(v.proposal_lo ^ PROPOSAL_SEED) ^ v.proposal_hi) + v.term_lo);
    return mix32(h ^ v.term_hi) & params.table_mask;
}

fn same_ballot(a: Vote, b: Vote) -> bool {
    return a.voter == b.voter && a.term_lo == b.term_lo && a.term_hi == b.term_hi;
}

fn same_proposal(a: Vote, b: Vote) -> bool {
    return a.proposal_lo == b.proposal_lo && a.proposal_hi == b.proposal_hi
        && a.term_lo == b.term_lo && a.term_hi == b.term_hi;
}

fn same_choice(a: Vote, b: Vote) -> bool {
    return a.proposal_lo == b.proposal_lo && a.proposal_hi == b.proposal_hi
        && a.approve == b.approve && a.weight == b.weight;
}

// The order of votes inside a ballot: (proposal, approve, weight), most significant word first.
fn order_words(v: Vote) -> vec4<u32> {
    return vec4<u32>(v.proposal_hi, v.proposal_lo, v.approve, v.weight);
}

fn stride(groups: vec3<u32>) -> u32 {
    return groups.x * WORKGROUP;
}

// Claims or finds the ballot of vote `i`; flags the ballot when `i` differs from its first vote.
fn insert_ballot(i: u32, v: Vote) {
    var slot = ballot_hash(v);
    loop {
        var word = atomicLoad(&ballot_table[slot]);
        if word == 0u {
            let claim = atomicCompareExchangeWeak(&ballot_table[slot], 0u, i + 1u);
            if claim.exchanged {
                return;
            }
            word = claim.old_value;
            if word == 0u {
                continue; // spurious failure of the weak exchange
            }
        }
        let first = votes[(word & INDEX_MASK) - 1u];
        if same_ballot(first, v) {
            if !same_choice(first, v) {
                let before = atomicOr(&ballot_table[slot], FLAG);
                if (before & FLAG) == 0u {
                    let record = atomicAdd(&counters[1], 1u);
                    ballot_aux[slot] = record;
                    if record < params.evidence_capacity {
                        let base = record * EVIDENCE_WORDS;
                        atomicStore(&evidence[base], v.voter);
                        atomicStore(&evidence[base + 1u], v.term_lo);
                        atomicStore(&evidence[base + 2u], v.term_hi);
                        for (var k = 3u; k < EVIDENCE_WORDS; k += 1u) {
                            atomicStore(&evidence[base + k], 0u);
                        }
                    }
                }
            }
            return;
        }
        slot = (slot + 1u) & params.table_mask;
    }
}

// Claims or finds the (term, proposal) of vote `i`; the claiming vote opens its tally record.
fn insert_proposal(i: u32, v: Vote) {
    var slot = proposal_hash(v);
    loop {
        var word = atomicLoad(&proposal_table[slot]);
        if word == 0u {
            let claim = atomicCompareExchangeWeak(&proposal_table[slot], 0u, i + 1u);
            if claim.exchanged {
                let record = atomicAdd(&counters[0], 1u);
                proposal_ids[slot] = record;
                if record < params.tally_capacity {
                    let base = record * TALLY_WORDS;
                    atomicStore(&tallies[base], v.term_lo);
                    atomicStore(&tallies[base + 1u], v.term_hi);
                    atomicStore(&tallies[base + 2u], v.proposal_lo);
                    atomicStore(&tallies[base + 3u], v.proposal_hi);
                    for (var k = 4u; k < TALLY_WORDS; k += 1u) {
                        atomicStore(&tallies[base + k], 0u);
                    }
                }
                return;
            }
            word = claim.old_value;
            if word == 0u {
                continue;
            }
        }
        if same_proposal(votes[word - 1u], v) {
            return;
        }
        slot = (slot + 1u) & params.table_mask;
    }
}

@compute @workgroup_size(256)
fn insert(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    // Runs of votes on one proposal (the common case) touch the shared proposal slot once per
    // invocation instead of once per vote.
    var previous = Vote(0u, 0u, 0u, 0u, 0u, 0u, 0u);
    var has_previous = false;
    for (var i = id.x; i < params.vote_count; i += stride(groups)) {
        let v = votes[i];
        insert_ballot(i, v);
        if !has_previous || !same_proposal(previous, v) {
            insert_proposal(i, v);
        }
        previous = v;
        has_previous = true;
    }
}

// The ballot slot of vote `i` (present after `insert`) and its table word.
fn find_ballot(i: u32, v: Vote) -> vec2<u32> {
    var slot = ballot_hash(v);
    for (var probe = 0u; probe <= params.table_mask; probe += 1u) {
        let word = atomicLoad(&ballot_table[slot]);
        if word == 0u {
            return vec2<u32>(NONE, 0u); // unreachable after `insert`; ends the probe regardless
        }
        let first = (word & INDEX_MASK) - 1u;
        if first == i || same_ballot(votes[first], v) {
            return vec2<u32>(slot, word);
        }
        slot = (slot + 1u) & params.table_mask;
    }
    return vec2<u32>(NONE, 0u);
}

fn find_tally(i: u32, v: Vote) -> u32 {
    var slot = proposal_hash(v);
    for (var probe = 0u; probe <= params.table_mask; probe += 1u) {
        let word = atomicLoad(&proposal_table[slot]);
        if word == 0u {
            return NONE;
        }
        if word - 1u == i || same_proposal(votes[word - 1u], v) {
            return proposal_ids[slot];
        }
        slot = (slot + 1u) & params.table_mask;
    }
    return NONE;
}

// Adds (lo, hi) to the 64-bit counter at tallies[at], tallies[at + 1]; the carry of the low word
// follows from the value the atomic add saw, so concurrent adds stay exact.
fn add_wide(at: u32, lo: u32, hi: u32) {
    if lo == 0u && hi == 0u {
        return;
    }
    let before = atomicAdd(&tallies[at], lo);
    let carry = select(0u, 1u, before + lo < before);
    if hi + carry != 0u {
        atomicAdd(&tallies[at + 1u], hi + carry);
    }
}

// Counts each ballot's first vote unless the ballot equivocates. Each invocation sums its run of
// votes for one tally locally and flushes with atomics when the tally changes.
//
// Workgroup memory of `tally` (zero-initialised): the highest tally record + 1 and the bit-inverted
// lowest record that the group's invocations end on, and the group's sums of one shared record
// (yes, no, yes_weight lo/hi, no_weight lo/hi).
var<workgroup> group_highest: atomic<u32>;
var<workgroup> group_lowest_inverted: atomic<u32>;
var<workgroup> group_sums: array<atomic<u32>, 6>;

@compute @workgroup_size(256)
fn tally(
    @builtin(global_invocation_id) id: vec3<u32>,
    @builtin(local_invocation_index) local_index: u32,
    @builtin(num_workgroups) groups: vec3<u32>,
) {
    var current = NONE;
    // The last (term, proposal) looked up and its record, to skip the table for runs of one.
    var cached_vote = Vote(0u, 0u, 0u, 0u, 0u, 0u, 0u);
    var cached_record = NONE;
    var yes = 0u;
    var no = 0u;
    var yes_lo = 0u;
    var yes_hi = 0u;
    var no_lo = 0u;
    var no_hi = 0u;
    for (var i = id.x; i < params.vote_count; i += stride(groups)) {
        let v = votes[i];
        let ballot = find_ballot(i, v);
        if ballot.x == NONE || ballot.y != i + 1u {
            continue; // a later copy, or the ballot equivocates (FLAG set)
        }
        if cached_record == NONE || !same_proposal(cached_vote, v) {
            cached_record = find_tally(i, v);
            cached_vote = v;
        }
        let record = cached_record;
        if record >= params.tally_capacity {
            continue;
        }
        if record != current {
            if current != NONE {
                flush(current, vec2<u32>(yes, no), vec4<u32>(yes_lo, yes_hi, no_lo, no_hi));
            }
            current = record;
            yes = 0u;
            no = 0u;
            yes_lo = 0u;
            yes_hi = 0u;
            no_lo = 0u;
            no_hi = 0u;
        }
        if v.approve != 0u {
            yes += 1u;
            yes_lo += v.weight;
            yes_hi += select(0u, 1u, yes_lo < v.weight);
        } else {
            no += 1u;
            no_lo += v.weight;
            no_hi += select(0u, 1u, no_lo < v.weight);
        }
    }
    // Usually every invocation of a workgroup ends on the same tally (one proposal): sum the
    // runs in workgroup memory and flush once per workgroup instead of once per invocation.
    if current != NONE {
        atomicMax(&group_highest, current + 1u);
        atomicMax(&group_lowest_inverted, ~current);
    }
    workgroupBarrier();
    let highest = atomicLoad(&group_highest);
    let lowest = ~atomicLoad(&group_lowest_inverted);
    let one_run = highest != 0u && highest - 1u == lowest;
    if current != NONE {
        if one_run {
            if yes != 0u { atomicAdd(&group_sums[0], yes); }
            if no != 0u { atomicAdd(&group_sums[1], no); }
            add_wide_in_group(2u, yes_lo, yes_hi);
            add_wide_in_group(4u, no_lo, no_hi);
        } else {
            flush(current, vec2<u32>(yes, no), vec4<u32>(yes_lo, yes_hi, no_lo, no_hi));
        }
    }
    workgroupBarrier();
    if one_run && local_index == 0u {
        flush(
            lowest,
            vec2<u32>(atomicLoad(&group_sums[0]), atomicLoad(&group_sums[1])),
            vec4<u32>(
                atomicLoad(&group_sums[2]),
                atomicLoad(&group_sums[3]),
                atomicLoad(&group_sums[4]),
                atomicLoad(&group_sums[5]),
            ),
        );
    }
}

// Adds counts (yes, no) and weights (yes_lo, yes_hi, no_lo, no_hi) to tally record `record`.
fn flush(record: u32, counts: vec2<u32>, weights: vec4<u32>) {
    let base = record * TALLY_WORDS;
    if counts.x != 0u { atomicAdd(&tallies[base + 4u], counts.x); }
    if counts.y != 0u { atomicAdd(&tallies[base + 5u], counts.y); }
    add_wide(base + 6u, weights.x, weights.y);
    add_wide(base + 8u, weights.z, weights.w);
}

// `add_wide` on the workgroup sums.
fn add_wide_in_group(at: u32, lo: u32, hi: u32) {
    let before = atomicAdd(&group_sums[at], lo);
    let carry = select(0u, 1u, before + lo < before);
    atomicAdd(&group_sums[at + 1u], hi + carry);
}

// Skips the eight evidence passes entirely when no ballot equivocates.
@compute @workgroup_size(1)
fn prepare() {
    let found = atomicLoad(&counters[1]);
    indirect[0] = select(0u, params.evidence_workgroups, found > 0u);
    indirect[1] = 1u;
    indirect[2] = 1u;
}

// Pass `stage` of the lexicographic minimum: stages 0..3 find the smallest distinct vote of each
// equivocating ballot one word at a time (a word competes only if all earlier words equal the
// minimum found so far); stages 4..7 do the same among the votes that differ from that minimum.
fn evidence_stage(first_id: u32, groups: vec3<u32>, stage: u32) {
    for (var i = first_id; i < params.vote_count; i += stride(groups)) {
        let v = votes[i];
        let ballot = find_ballot(i, v);
        if ballot.x == NONE || (ballot.y & FLAG) == 0u {
            continue;
        }
        let record = ballot_aux[ballot.x];
        if record >= params.evidence_capacity {
            continue;
        }
        let base = record * EVIDENCE_WORDS;
        let words = order_words(v);
        var offset = 3u;
        var word = stage;
        if stage >= 4u {
            let smallest = vec4<u32>(
                ~atomicLoad(&evidence[base + 3u]),
                ~atomicLoad(&evidence[base + 4u]),
                ~atomicLoad(&evidence[base + 5u]),
                ~atomicLoad(&evidence[base + 6u]),
            );
            if all(words == smallest) {
                continue;
            }
            offset = 7u;
            word = stage - 4u;
        }
        var competes = true;
        for (var k = 0u; k < word; k += 1u) {
            if words[k] != ~atomicLoad(&evidence[base + offset + k]) {
                competes = false;
            }
        }
        if competes {
            atomicMax(&evidence[base + offset + word], ~words[word]);
        }
    }
}

@compute @workgroup_size(256)
fn evidence0(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    evidence_stage(id.x, groups, 0u);
}

@compute @workgroup_size(256)
fn evidence1(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    evidence_stage(id.x, groups, 1u);
}

@compute @workgroup_size(256)
fn evidence2(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    evidence_stage(id.x, groups, 2u);
}

@compute @workgroup_size(256)
fn evidence3(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    evidence_stage(id.x, groups, 3u);
}

@compute @workgroup_size(256)
fn evidence4(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    evidence_stage(id.x, groups, 4u);
}

@compute @workgroup_size(256)
fn evidence5(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    evidence_stage(id.x, groups, 5u);
}

@compute @workgroup_size(256)
fn evidence6(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    evidence_stage(id.x, groups, 6u);
}

@compute @workgroup_size(256)
fn evidence7(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    evidence_stage(id.x, groups, 7u);
}
