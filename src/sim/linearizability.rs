//! A linearizability checker: the Wing–Gong search with Lowe's memoization, decomposed per key, in
//! the manner of Porcupine.
//!
//! A history is a list of operations, each with the simulated time its client invoked it and, if it
//! ever returned, the time and value of the response. The history is linearizable if every
//! operation can be given a single instant between its invocation and its response such that the
//! responses are what a sequential [`Model`] would answer in that order. Operations that never
//! returned may have taken effect or not: they respond at "+infinity", may be placed anywhere after
//! their invocation, and may also be left out (which is the same as placing them after everything
//! else, since nothing observes them there).
//!
//! The search keeps the history as a doubly linked list of call and return events in time order.
//! It repeatedly tries to linearize the earliest pending call that the model accepts, removing the
//! operation's events from the list ("lifting" it); reaching a return event means the operation it
//! belongs to must already have been linearized, so it backtracks. The set of linearized operations
//! together with the model state is memoized, so each configuration is explored once. Every search
//! has a step budget: a history too hard to decide within it is reported as such, never passed.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Debug;
use std::hash::Hash;

/// A sequential specification.
pub trait Model {
    /// The state of one partition (one key).
    type State: Clone + Eq + Hash + Debug;
    /// What a client asks. Equal inputs have equal effects (the search relies on it to treat
    /// identical operations that never returned as interchangeable).
    type Input: Clone + Debug + Eq + Hash;
    /// What a client is answered.
    type Output: Clone + Debug + PartialEq;

    /// The state before any operation.
    fn init(&self) -> Self::State;

    /// The state after `input` is applied to `state`, if the answer `output` is what the sequential
    /// specification gives there; `None` if it is not. `output` is `None` for an operation that
    /// never returned: any answer is acceptable, only the effect matters.
    fn step(
        &self,
        state: &Self::State,
        input: &Self::Input,
        output: Option<&Self::Output>,
    ) -> Option<Self::State>;

    /// The partition (key) an operation belongs to; operations of different partitions commute.
    fn partition(&self, input: &Self::Input) -> u64;

    /// True if the operation never changes the state, so that one that never returned can be
    /// dropped from the history.
    fn is_read_only(&self, input: &Self::Input) -> bool;
}

/// One operation of a history.
#[derive(Clone, Debug, PartialEq)]
pub struct Operation<I, O> {
    /// Which client invoked it (for reports; a client's operations do not overlap).
    pub client: u64,
    /// What was asked.
    pub input: I,
    /// When it was invoked (simulated microseconds).
    pub call_us: u64,
    /// When and with what it returned; `None` if it never did.
    pub response: Option<(u64, O)>,
}

/// A history that does not describe executions (the checker refuses it rather than guess).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HistoryError {
    /// An operation returned before it was invoked.
    #[error("operation {index} returns at {return_us} us, before its invocation at {call_us} us")]
    ReturnBeforeCall {
        /// Position in the history.
        index: usize,
        /// Invocation time.
        call_us: u64,
        /// Response time.
        return_us: u64,
    },
}

/// The verdict on a history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckOutcome {
    /// Some order of the operations explains every response.
    Linearizable,
    /// No order does. `operations` are the history indices of the failing partition; `longest`
    /// is the most operations of it that could be linearized together.
    NotLinearizable {
        /// The partition (key) with no linearization.
        partition: u64,
        /// History indices of that partition's operations.
        operations: Vec<usize>,
        /// Operations of the deepest linearizable prefix the search found.
        longest: usize,
    },
    /// The search ran out of steps on this partition before deciding.
    BudgetExceeded {
        /// The partition being searched.
        partition: u64,
        /// Steps taken in it.
        steps: u64,
    },
}

/// Statistics of one check, for reports and tuning.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CheckStats {
    /// Partitions searched.
    pub partitions: usize,
    /// Search steps over all partitions.
    pub steps: u64,
    /// Operations that never returned and could change the state.
    pub pending_writes: usize,
}

const NONE: usize = usize::MAX;

/// One event of the linked list: an operation's call or return.
#[derive(Clone, Copy, Debug)]
struct Event {
    /// Index of the operation in the partition.
    op: usize,
    /// For a call, the index of its return event (`NONE` if the operation never returned);
    /// `NONE` for a return event.
    matching_return: usize,
    is_call: bool,
    prev: usize,
    next: usize,
}

struct EventList {
    /// `events[0]` is the head sentinel.
    events: Vec<Event>,
}

impl EventList {
    fn unlink(&mut self, e: usize) {
        let Event { prev, next, .. } = self.events[e];
        self.events[prev].next = next;
        if next != NONE {
            self.events[next].prev = prev;
        }
    }

    /// Reinserts `e` where it was; valid because lifts are undone in reverse order.
    fn relink(&mut self, e: usize) {
        let Event { prev, next, .. } = self.events[e];
        self.events[prev].next = e;
        if next != NONE {
            self.events[next].prev = e;
        }
    }

    fn lift(&mut self, call: usize) {
        self.unlink(call);
        let ret = self.events[call].matching_return;
        if ret != NONE {
            self.unlink(ret);
        }
    }

    fn unlift(&mut self, call: usize) {
        let ret = self.events[call].matching_return;
        if ret != NONE {
            self.relink(ret);
        }
        self.relink(call);
    }
}

/// Checks `history` against `model`, spending at most `step_budget` search steps per partition.
pub fn check<M: Model>(
    model: &M,
    history: &[Operation<M::Input, M::Output>],
    step_budget: u64,
) -> Result<(CheckOutcome, CheckStats), HistoryError> {
    let mut partitions: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
    let mut stats = CheckStats::default();
    for (index, op) in history.iter().enumerate() {
        if let Some((return_us, _)) = op.response
            && return_us < op.call_us
        {
            return Err(HistoryError::ReturnBeforeCall {
                index,
                call_us: op.call_us,
                return_us,
            });
        }
        if op.response.is_none() {
            if model.is_read_only(&op.input) {
                continue; // a read that never answered observed nothing and changed nothing
            }
            stats.pending_writes += 1;
        }
        partitions
            .entry(model.partition(&op.input))
            .or_default()
            .push(index);
    }
    for (&partition, indices) in &partitions {
        stats.partitions += 1;
        let ops: Vec<&Operation<M::Input, M::Output>> =
            indices.iter().map(|&i| &history[i]).collect();
        let (verdict, steps) = search(model, &ops, step_budget);
        stats.steps += steps;
        match verdict {
            Search::Linearizable => {}
            Search::NotLinearizable { longest } => {
                let outcome = CheckOutcome::NotLinearizable {
                    partition,
                    operations: indices.clone(),
                    longest,
                };
                return Ok((outcome, stats));
            }
            Search::OutOfBudget => {
                return Ok((CheckOutcome::BudgetExceeded { partition, steps }, stats));
            }
        }
    }
    Ok((CheckOutcome::Linearizable, stats))
}

enum Search {
    Linearizable,
    NotLinearizable { longest: usize },
    OutOfBudget,
}

/// The Wing–Gong–Lowe search over one partition.
fn search<M: Model>(
    model: &M,
    ops: &[&Operation<M::Input, M::Output>],
    step_budget: u64,
) -> (Search, u64) {
    // Events in time order; at equal times calls come first, so that an operation returning at the
    // instant another is invoked counts as concurrent with it (the permissive reading).
    let mut order: Vec<(u64, u8, usize)> = Vec::with_capacity(2 * ops.len());
    for (i, op) in ops.iter().enumerate() {
        order.push((op.call_us, 0, i));
        if let Some((return_us, _)) = op.response {
            order.push((return_us, 1, i));
        }
    }
    order.sort_unstable();
    let head = Event {
        op: NONE,
        matching_return: NONE,
        is_call: false,
        prev: NONE,
        next: NONE,
    };
    let mut list = EventList { events: vec![head] };
    let mut call_event = vec![NONE; ops.len()];
    for (position, &(_, kind, op)) in order.iter().enumerate() {
        let e = position + 1;
        let next = if position + 1 < order.len() {
            e + 1
        } else {
            NONE
        };
        list.events.push(Event {
            op,
            matching_return: NONE,
            is_call: kind == 0,
            prev: e - 1,
            next,
        });
        if kind == 0 {
            call_event[op] = e;
        } else {
            list.events[call_event[op]].matching_return = e;
        }
    }
    if !order.is_empty() {
        list.events[0].next = 1;
    }

    // Operations that never returned, grouped by identical input. Once invoked before the earliest
    // remaining return, such an operation stays a candidate for good, so two of one group are
    // interchangeable: only the first of each group still in the list is ever tried.
    let mut group_of = vec![NONE; ops.len()];
    let mut groups: Vec<BTreeSet<usize>> = Vec::new();
    let mut group_ids: HashMap<&M::Input, usize> = HashMap::new();
    for (i, op) in ops.iter().enumerate() {
        if op.response.is_none() {
            let next_id = groups.len();
            let id = *group_ids.entry(&op.input).or_insert(next_id);
            if id == next_id {
                groups.push(BTreeSet::new());
            }
            group_of[i] = id;
            groups[id].insert(call_event[i]);
        }
    }

    let completed = ops.iter().filter(|op| op.response.is_some()).count();
    let mut remaining_completed = completed;
    let words = ops.len().div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut seen: HashSet<(Vec<u64>, M::State)> = HashSet::new();
    let mut stack: Vec<(usize, M::State)> = Vec::new();
    let mut state = model.init();
    let mut cursor = list.events[0].next;
    let mut steps = 0u64;
    let mut longest = 0usize;

    loop {
        if remaining_completed == 0 {
            // Every operation that returned is placed; the ones that never returned can go last.
            return (Search::Linearizable, steps);
        }
        steps += 1;
        if steps > step_budget {
            return (Search::OutOfBudget, steps);
        }
        let event = if cursor == NONE {
            None
        } else {
            Some(list.events[cursor])
        };
        match event {
            Some(event) if event.is_call => {
                let op = ops[event.op];
                let output = op.response.as_ref().map(|(_, output)| output);
                let group = group_of[event.op];
                if group != NONE && groups[group].first() != Some(&cursor) {
                    cursor = event.next; // an identical earlier one was tried at this depth
                    continue;
                }
                let next_state = model.step(&state, &op.input, output);
                // Placing an operation that never returned where it changes nothing only removes
                // options: leaving it out is always at least as good.
                let dominated = group != NONE && next_state.as_ref() == Some(&state);
                if let Some(next_state) = next_state.filter(|_| !dominated) {
                    let (word, bit) = (event.op / 64, 1u64 << (event.op % 64));
                    linearized[word] |= bit;
                    if seen.insert((linearized.clone(), next_state.clone())) {
                        stack.push((cursor, std::mem::replace(&mut state, next_state)));
                        list.lift(cursor);
                        if op.response.is_some() {
                            remaining_completed -= 1;
                        } else {
                            groups[group].remove(&cursor);
                        }
                        longest = longest.max(stack.len());
                        cursor = list.events[0].next;
                        continue;
                    }
                    linearized[word] &= !bit;
                }
                cursor = event.next;
            }
            // A return event (or the end of the list, reachable only if a completed operation is
            // somehow unplaced): the operation must have been linearized earlier. Backtrack.
            _ => {
                let Some((call, previous_state)) = stack.pop() else {
                    return (Search::NotLinearizable { longest }, steps);
                };
                state = previous_state;
                let op = list.events[call].op;
                linearized[op / 64] &= !(1u64 << (op % 64));
                list.unlift(call);
                if ops[op].response.is_some() {
                    remaining_completed += 1;
                } else {
                    groups[group_of[op]].insert(call);
                }
                cursor = list.events[call].next;
            }
        }
    }
}

/// Operations on the replicated key-value store of the simulator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum KvInput {
    /// Sets `key` to `value`.
    Put {
        /// The key.
        key: u64,
        /// The new value.
        value: u64,
    },
    /// Reads `key`.
    Get {
        /// The key.
        key: u64,
    },
    /// Sets `key` to `new` if it holds `expected` (`None`: if it is absent).
    Cas {
        /// The key.
        key: u64,
        /// The value required for the swap.
        expected: Option<u64>,
        /// The value swapped in.
        new: u64,
    },
}

impl KvInput {
    /// The key the operation touches.
    pub fn key(&self) -> u64 {
        match *self {
            KvInput::Put { key, .. } | KvInput::Get { key } | KvInput::Cas { key, .. } => key,
        }
    }
}

/// Answers of the key-value store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KvOutput {
    /// A put was applied.
    Put,
    /// The value read (`None`: absent).
    Get(Option<u64>),
    /// Whether the compare-and-swap swapped.
    Cas(bool),
}

/// The sequential key-value store: each key an independent register, absent at first.
#[derive(Clone, Copy, Debug, Default)]
pub struct KvModel;

impl KvModel {
    /// What the store answers and becomes when `input` is applied to a key holding `value`. The
    /// replicated state machine of the simulator uses this very function, so model and
    /// implementation cannot drift apart.
    pub fn apply(value: Option<u64>, input: &KvInput) -> (Option<u64>, KvOutput) {
        match *input {
            KvInput::Put { value: new, .. } => (Some(new), KvOutput::Put),
            KvInput::Get { .. } => (value, KvOutput::Get(value)),
            KvInput::Cas { expected, new, .. } => {
                if value == expected {
                    (Some(new), KvOutput::Cas(true))
                } else {
                    (value, KvOutput::Cas(false))
                }
            }
        }
    }
}

impl Model for KvModel {
    type State = Option<u64>;
    type Input = KvInput;
    type Output = KvOutput;

    fn init(&self) -> Option<u64> {
        None
    }

    fn step(
        &self,
        state: &Option<u64>,
        input: &KvInput,
        output: Option<&KvOutput>,
    ) -> Option<Option<u64>> {
        let (next, expected_output) = KvModel::apply(*state, input);
        match output {
            Some(output) if *output != expected_output => None,
            _ => Some(next),
        }
    }

    fn partition(&self, input: &KvInput) -> u64 {
        input.key()
    }

    fn is_read_only(&self, input: &KvInput) -> bool {
        matches!(input, KvInput::Get { .. })
    }
}

/// A key-value history, as the simulator records it.
pub type KvHistory = Vec<Operation<KvInput, KvOutput>>;

/// The value given to writes that never returned and whose value nobody observed.
const UNOBSERVED: u64 = u64::MAX;

/// Rewrites the value of every write that never returned to `u64::MAX` when no operation
/// could tell that value apart from another such one: no read returned it and no
/// compare-and-swap expected it. Such values only ever make a read or a swap fail, whichever
/// they are, so the rewrite keeps the verdict and lets the search treat those writes as
/// interchangeable. Keys where some operation uses `u64::MAX` itself are left alone.
pub fn canonicalize_kv(
    history: &[Operation<KvInput, KvOutput>],
) -> Vec<Operation<KvInput, KvOutput>> {
    let mut observed: BTreeSet<(u64, u64)> = BTreeSet::new();
    let mut uses_sentinel: BTreeSet<u64> = BTreeSet::new();
    for op in history {
        let key = op.input.key();
        match op.input {
            KvInput::Put { value, .. } if value == UNOBSERVED => {
                uses_sentinel.insert(key);
            }
            KvInput::Cas { expected, new, .. } => {
                if let Some(expected) = expected {
                    observed.insert((key, expected));
                }
                if new == UNOBSERVED || expected == Some(UNOBSERVED) {
                    uses_sentinel.insert(key);
                }
            }
            _ => {}
        }
        if let Some((_, KvOutput::Get(Some(value)))) = op.response {
            observed.insert((key, value));
            if value == UNOBSERVED {
                uses_sentinel.insert(key);
            }
        }
    }
    let mut canonical = history.to_vec();
    for op in canonical.iter_mut().filter(|op| op.response.is_none()) {
        let key = op.input.key();
        if uses_sentinel.contains(&key) {
            continue;
        }
        match &mut op.input {
            KvInput::Put { value, .. } | KvInput::Cas { new: value, .. } => {
                if !observed.contains(&(key, *value)) {
                    *value = UNOBSERVED;
                }
            }
            KvInput::Get { .. } => {}
        }
    }
    canonical
}

/// Checks a key-value history (after [`canonicalize_kv`]).
pub fn check_kv(
    history: &[Operation<KvInput, KvOutput>],
    step_budget: u64,
) -> Result<(CheckOutcome, CheckStats), HistoryError> {
    check(&KvModel, &canonicalize_kv(history), step_budget)
}
