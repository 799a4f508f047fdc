//! The linearizability checker's own tests: histories known not to be linearizable that it must
//! reject, linearizable ones (including operations that never returned, with and without effect)
//! that it must accept, and large generated histories that it must decide quickly.

mod common;

use consensus::sim::linearizability::{
    CheckOutcome, HistoryError, KvInput, KvModel, KvOutput, Operation, check_kv,
};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

const BUDGET: u64 = 1_000_000;
const X: u64 = 1;
const Y: u64 = 2;

type Op = Operation<KvInput, KvOutput>;

fn done(client: u64, input: KvInput, call_us: u64, return_us: u64, output: KvOutput) -> Op {
    Operation {
        client,
        input,
        call_us,
        response: Some((return_us, output)),
    }
}

fn pending(client: u64, input: KvInput, call_us: u64) -> Op {
    Operation {
        client,
        input,
        call_us,
        response: None,
    }
}

fn put(key: u64, value: u64) -> KvInput {
    KvInput::Put { key, value }
}

fn get(key: u64) -> KvInput {
    KvInput::Get { key }
}

fn cas(key: u64, expected: Option<u64>, new: u64) -> KvInput {
    KvInput::Cas { key, expected, new }
}

fn verdict(history: &[Op]) -> CheckOutcome {
    check_kv(history, BUDGET).expect("well-formed history").0
}

fn assert_linearizable(history: &[Op]) {
    assert_eq!(verdict(history), CheckOutcome::Linearizable, "{history:#?}");
}

fn assert_not_linearizable(history: &[Op]) {
    let outcome = verdict(history);
    assert!(
        matches!(outcome, CheckOutcome::NotLinearizable { .. }),
        "{outcome:?} for {history:#?}"
    );
}

// ---- histories that must be rejected ----

#[test]
fn rejects_a_stale_read_after_a_completed_write() {
    assert_not_linearizable(&[
        done(1, put(X, 1), 0, 10, KvOutput::Put),
        done(2, get(X), 20, 30, KvOutput::Get(None)),
    ]);
}

#[test]
fn rejects_reading_an_overwritten_value() {
    assert_not_linearizable(&[
        done(1, put(X, 1), 0, 10, KvOutput::Put),
        done(1, put(X, 2), 20, 30, KvOutput::Put),
        done(2, get(X), 40, 50, KvOutput::Get(Some(1))),
    ]);
}

#[test]
fn rejects_a_lost_cas() {
    assert_not_linearizable(&[
        done(1, put(X, 1), 0, 10, KvOutput::Put),
        done(1, cas(X, Some(1), 2), 20, 30, KvOutput::Cas(true)),
        done(2, get(X), 40, 50, KvOutput::Get(Some(1))),
    ]);
}

#[test]
fn rejects_two_cas_from_the_same_value_both_succeeding() {
    assert_not_linearizable(&[
        done(1, put(X, 1), 0, 10, KvOutput::Put),
        done(2, cas(X, Some(1), 2), 20, 40, KvOutput::Cas(true)),
        done(3, cas(X, Some(1), 3), 20, 40, KvOutput::Cas(true)),
    ]);
}

#[test]
fn rejects_a_read_of_a_value_never_written() {
    assert_not_linearizable(&[
        done(1, put(X, 1), 0, 10, KvOutput::Put),
        done(2, get(X), 5, 15, KvOutput::Get(Some(7))),
    ]);
}

#[test]
fn rejects_a_cas_failing_where_it_must_succeed() {
    assert_not_linearizable(&[
        done(1, put(X, 1), 0, 10, KvOutput::Put),
        done(2, cas(X, Some(1), 2), 20, 30, KvOutput::Cas(false)),
    ]);
}

#[test]
fn rejects_reads_going_back_in_time_across_clients() {
    // The write of 2 overlaps both reads, but once one read has seen 2, a later read cannot see 1.
    assert_not_linearizable(&[
        done(1, put(X, 1), 0, 10, KvOutput::Put),
        done(1, put(X, 2), 15, 100, KvOutput::Put),
        done(2, get(X), 20, 30, KvOutput::Get(Some(2))),
        done(3, get(X), 40, 50, KvOutput::Get(Some(1))),
    ]);
}

#[test]
fn rejects_a_read_explained_only_by_a_write_invoked_after_it_returned() {
    assert_not_linearizable(&[
        done(1, get(X), 0, 10, KvOutput::Get(Some(5))),
        pending(2, put(X, 5), 20),
    ]);
}

#[test]
fn rejects_a_pending_write_taking_effect_twice() {
    // A write that never returned takes effect at most once: 3, then 4, then 3 again is impossible.
    assert_not_linearizable(&[
        pending(1, put(X, 3), 0),
        done(2, get(X), 10, 20, KvOutput::Get(Some(3))),
        done(2, put(X, 4), 30, 40, KvOutput::Put),
        done(2, get(X), 50, 60, KvOutput::Get(Some(3))),
    ]);
}

#[test]
fn finds_the_violation_in_one_key_among_healthy_ones() {
    let mut history = Vec::new();
    for i in 0..20 {
        history.push(done(1, put(Y, i), i * 100, i * 100 + 10, KvOutput::Put));
        history.push(done(
            2,
            get(Y),
            i * 100 + 20,
            i * 100 + 30,
            KvOutput::Get(Some(i)),
        ));
    }
    history.push(done(3, put(X, 1), 0, 10, KvOutput::Put));
    history.push(done(3, get(X), 20, 30, KvOutput::Get(None)));
    match verdict(&history) {
        CheckOutcome::NotLinearizable {
            partition,
            operations,
            ..
        } => {
            assert_eq!(partition, X);
            assert_eq!(operations, vec![40, 41]);
        }
        other => panic!("expected a violation on key X, got {other:?}"),
    }
}

// ---- histories that must be accepted ----

#[test]
fn accepts_the_empty_history() {
    assert_linearizable(&[]);
}

#[test]
fn accepts_either_value_from_a_read_concurrent_with_a_write() {
    for seen in [None, Some(1)] {
        assert_linearizable(&[
            done(1, put(X, 1), 0, 30, KvOutput::Put),
            done(2, get(X), 10, 20, KvOutput::Get(seen)),
        ]);
    }
}

#[test]
fn accepts_concurrent_cas_where_exactly_one_wins() {
    assert_linearizable(&[
        done(1, put(X, 1), 0, 10, KvOutput::Put),
        done(2, cas(X, Some(1), 2), 20, 40, KvOutput::Cas(false)),
        done(3, cas(X, Some(1), 3), 20, 40, KvOutput::Cas(true)),
        done(3, get(X), 50, 60, KvOutput::Get(Some(3))),
    ]);
}

#[test]
fn accepts_a_pending_write_that_took_effect() {
    assert_linearizable(&[
        pending(1, put(X, 3), 5),
        done(2, get(X), 10, 20, KvOutput::Get(Some(3))),
    ]);
}

#[test]
fn accepts_a_pending_write_that_did_not_take_effect() {
    assert_linearizable(&[
        pending(1, put(X, 3), 5),
        done(2, get(X), 10, 20, KvOutput::Get(None)),
        done(2, get(X), 30, 40, KvOutput::Get(None)),
    ]);
}

#[test]
fn accepts_a_pending_write_that_took_effect_long_after_its_client_gave_up() {
    assert_linearizable(&[
        pending(1, put(X, 3), 5),
        done(1, put(Y, 1), 1_000, 1_010, KvOutput::Put),
        done(2, get(X), 2_000, 2_010, KvOutput::Get(None)),
        done(2, get(X), 9_000, 9_010, KvOutput::Get(Some(3))),
    ]);
}

#[test]
fn accepts_a_pending_cas_with_or_without_effect() {
    for seen in [1, 2] {
        assert_linearizable(&[
            done(1, put(X, 1), 0, 10, KvOutput::Put),
            pending(1, cas(X, Some(1), 2), 20),
            done(2, get(X), 30, 40, KvOutput::Get(Some(seen))),
        ]);
    }
}

#[test]
fn accepts_a_cas_on_an_absent_key() {
    assert_linearizable(&[
        done(1, cas(X, None, 4), 0, 10, KvOutput::Cas(true)),
        done(1, cas(X, None, 5), 20, 30, KvOutput::Cas(false)),
        done(1, get(X), 40, 50, KvOutput::Get(Some(4))),
    ]);
}

#[test]
fn ignores_pending_reads() {
    assert_linearizable(&[
        done(1, put(X, 1), 0, 10, KvOutput::Put),
        pending(2, get(X), 20),
    ]);
}

#[test]
fn an_operation_invoked_at_the_instant_another_returns_overlaps_it() {
    assert_linearizable(&[
        done(1, put(X, 1), 0, 10, KvOutput::Put),
        done(2, get(X), 10, 20, KvOutput::Get(None)),
    ]);
    assert_not_linearizable(&[
        done(1, put(X, 1), 0, 10, KvOutput::Put),
        done(2, get(X), 11, 20, KvOutput::Get(None)),
    ]);
}

#[test]
fn an_unobserved_pending_write_can_explain_a_failed_cas() {
    assert_linearizable(&[
        done(1, put(X, 1), 0, 10, KvOutput::Put),
        pending(2, put(X, 7), 15),
        done(1, cas(X, Some(1), 2), 20, 30, KvOutput::Cas(false)),
    ]);
}

#[test]
fn observed_pending_writes_keep_their_identity() {
    // Both pending writes are seen, in the order 6 then 5: each must take effect once.
    assert_linearizable(&[
        pending(1, put(X, 5), 0),
        pending(2, put(X, 6), 0),
        done(3, get(X), 10, 20, KvOutput::Get(Some(6))),
        done(3, get(X), 30, 40, KvOutput::Get(Some(5))),
    ]);
    assert_not_linearizable(&[
        pending(1, put(X, 5), 0),
        pending(2, put(X, 6), 0),
        done(3, get(X), 10, 20, KvOutput::Get(Some(6))),
        done(3, get(X), 30, 40, KvOutput::Get(Some(5))),
        done(3, get(X), 50, 60, KvOutput::Get(Some(6))),
    ]);
}

#[test]
fn many_pending_writes_are_decided_within_a_small_budget() {
    // Forty writes that never returned (as a long partition of the leader leaves behind) would be
    // 2^40 subsets to the plain search.
    let mut history: Vec<Op> = (0..40)
        .map(|i| pending(i, put(X, 100 + i), i * 10))
        .collect();
    history.push(done(50, put(X, 1), 1_000, 1_010, KvOutput::Put));
    history.push(done(50, get(X), 1_100, 1_110, KvOutput::Get(Some(117))));
    history.push(done(
        50,
        cas(X, Some(1), 2),
        1_200,
        1_210,
        KvOutput::Cas(false),
    ));
    let (outcome, stats) = check_kv(&history, 20_000).unwrap();
    assert_eq!(outcome, CheckOutcome::Linearizable, "{stats:?}");
    // A read of "absent" after a completed write has no explanation, pending writes or not.
    history.push(done(50, get(X), 1_300, 1_310, KvOutput::Get(None)));
    let (outcome, stats) = check_kv(&history, 20_000).unwrap();
    assert!(
        matches!(outcome, CheckOutcome::NotLinearizable { .. }),
        "{outcome:?} {stats:?}"
    );
}

// ---- malformed input and the step budget ----

#[test]
fn refuses_a_response_before_its_invocation() {
    let history = [done(1, put(X, 1), 10, 5, KvOutput::Put)];
    assert_eq!(
        check_kv(&history, BUDGET),
        Err(HistoryError::ReturnBeforeCall {
            index: 0,
            call_us: 10,
            return_us: 5
        })
    );
}

#[test]
fn reports_an_exhausted_budget_instead_of_passing() {
    let history = random_linearizable_history(3, 8, 300, 2, 0.1);
    let (outcome, _) = check_kv(&history, 10).unwrap();
    assert!(
        matches!(outcome, CheckOutcome::BudgetExceeded { .. }),
        "{outcome:?}"
    );
}

// ---- generated histories ----

/// A history produced by a real sequential execution: each operation gets a linearization point
/// inside its interval and the store answers in point order. Some operations never return; of
/// those, about half took effect.
fn random_linearizable_history(
    seed: u64,
    clients: u64,
    ops_per_client: usize,
    keys: u64,
    pending_fraction: f64,
) -> Vec<Op> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    // (linearization point, client, input, call, return, pending, takes effect)
    let mut planned = Vec::new();
    let mut next_value = 10;
    for client in 0..clients {
        let mut now = rng.random_range(0..50);
        for _ in 0..ops_per_client {
            let key = rng.random_range(0..keys);
            let input = match rng.random_range(0..3) {
                0 => {
                    next_value += 1;
                    put(key, next_value)
                }
                1 => get(key),
                _ => {
                    next_value += 1;
                    cas(key, Some(next_value - rng.random_range(1..4)), next_value)
                }
            };
            let call = now;
            let point = call + rng.random_range(1..100);
            let ret = point + rng.random_range(1..100);
            let is_pending = rng.random_bool(pending_fraction);
            let takes_effect = !is_pending || rng.random_bool(0.5);
            planned.push((point, client, input, call, ret, is_pending, takes_effect));
            now = ret + rng.random_range(1..60);
        }
    }
    planned.sort_by_key(|p| (p.0, p.1));
    let mut store = std::collections::BTreeMap::new();
    let mut history = Vec::new();
    for (_, client, input, call, ret, is_pending, takes_effect) in planned {
        if !takes_effect {
            history.push(pending(client, input, call));
            continue;
        }
        let (value, output) = KvModel::apply(store.get(&input.key()).copied(), &input);
        if let Some(value) = value {
            store.insert(input.key(), value);
        }
        history.push(if is_pending {
            pending(client, input, call)
        } else {
            done(client, input, call, ret, output)
        });
    }
    history
}

#[test]
fn accepts_generated_linearizable_histories_quickly() {
    let started = std::time::Instant::now();
    for seed in 0..50 {
        let history = random_linearizable_history(seed, 6, 80, 3, 0.05);
        let (outcome, _) = check_kv(&history, BUDGET).unwrap();
        assert_eq!(outcome, CheckOutcome::Linearizable, "seed {seed}");
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed.as_secs() < 20,
        "50 histories of 480 operations took {elapsed:?}"
    );
}

#[test]
fn rejects_generated_histories_with_one_read_corrupted() {
    let mut rejected = 0;
    for seed in 0..50 {
        let mut history = random_linearizable_history(seed, 6, 80, 3, 0.05);
        // Corrupt the answer of one completed read to a value no one wrote.
        let Some(read) = history
            .iter_mut()
            .find(|op| matches!(op.input, KvInput::Get { .. }) && op.response.is_some())
        else {
            continue;
        };
        if let Some((_, output)) = read.response.as_mut() {
            *output = KvOutput::Get(Some(u64::MAX));
        }
        let (outcome, _) = check_kv(&history, BUDGET).unwrap();
        assert!(
            matches!(outcome, CheckOutcome::NotLinearizable { .. }),
            "seed {seed}: {outcome:?}"
        );
        rejected += 1;
    }
    assert!(rejected >= 45);
}

#[test]
fn rejects_generated_histories_with_a_read_moved_after_a_later_write() {
    // Take a completed read that saw a value, then make it start after a completed overwrite of
    // that key by a different value has returned: the read is now stale.
    let mut rejected = 0;
    for seed in 0..100 {
        let mut history = random_linearizable_history(seed, 4, 60, 2, 0.0);
        let reads: Vec<usize> = (0..history.len())
            .filter(|&i| matches!(history[i].response, Some((_, KvOutput::Get(Some(_))))))
            .collect();
        let mut mutated = false;
        'outer: for &r in &reads {
            let (key, seen) = match (history[r].input, history[r].response) {
                (KvInput::Get { key }, Some((_, KvOutput::Get(Some(v))))) => (key, v),
                _ => continue,
            };
            for w in 0..history.len() {
                if let (KvInput::Put { key: k, value }, Some((ret, _))) =
                    (history[w].input, history[w].response)
                    && k == key
                    && value != seen
                    && ret > history[r].call_us
                {
                    // Every write of `seen` must have returned before the overwrite began, or it
                    // could be placed after the overwrite and explain the read again.
                    let overwrite_call = history[w].call_us;
                    let rewritten = history.iter().any(|op| {
                        let writes_seen = matches!(op.input,
                            KvInput::Put { key: k2, value: v } | KvInput::Cas { key: k2, new: v, .. }
                            if k2 == key && v == seen);
                        writes_seen && !matches!(op.response, Some((ret2, _)) if ret2 < overwrite_call)
                    });
                    if rewritten {
                        continue;
                    }
                    history[r].call_us = ret + 1;
                    history[r].response = Some((ret + 2, KvOutput::Get(Some(seen))));
                    mutated = true;
                    break 'outer;
                }
            }
        }
        if mutated {
            let (outcome, _) = check_kv(&history, BUDGET).unwrap();
            assert!(
                matches!(outcome, CheckOutcome::NotLinearizable { .. }),
                "seed {seed}: {outcome:?}"
            );
            rejected += 1;
        }
    }
    assert!(rejected >= 20, "only {rejected} histories could be mutated");
}

// ---- differential test against brute force ----

/// Every order of every subset of the pending operations together with all completed ones that
/// respects real time: the definition, searched without any pruning.
fn brute_force_linearizable(history: &[Op]) -> bool {
    fn search(history: &[Op], placed: &mut Vec<bool>, state: Option<u64>) -> bool {
        use consensus::sim::linearizability::Model;
        let unplaced_completed: Vec<usize> = (0..history.len())
            .filter(|&j| !placed[j] && history[j].response.is_some())
            .collect();
        if unplaced_completed.is_empty() {
            return true;
        }
        for i in 0..history.len() {
            if placed[i] {
                continue;
            }
            let must_wait = unplaced_completed.iter().any(|&j| {
                j != i
                    && history[j]
                        .response
                        .is_some_and(|(ret, _)| ret < history[i].call_us)
            });
            if must_wait {
                continue;
            }
            let output = history[i].response.as_ref().map(|(_, o)| o);
            if let Some(next) = KvModel.step(&state, &history[i].input, output) {
                placed[i] = true;
                if search(history, placed, next) {
                    return true;
                }
                placed[i] = false;
            }
        }
        false
    }
    search(history, &mut vec![false; history.len()], None)
}

/// A small random single-key history with random (often wrong) answers over few values.
fn random_small_history(rng: &mut ChaCha8Rng) -> Vec<Op> {
    let len = rng.random_range(1..8);
    // Writes draw from more values than reads return, so some written values go unobserved.
    let value = |rng: &mut ChaCha8Rng| rng.random_range(1..6u64);
    (0..len)
        .map(|client| {
            let input = match rng.random_range(0..3) {
                0 => put(X, value(rng)),
                1 => get(X),
                _ => {
                    let expected = if rng.random_bool(0.2) {
                        None
                    } else {
                        Some(rng.random_range(1..4))
                    };
                    cas(X, expected, value(rng))
                }
            };
            let call = rng.random_range(0..20);
            if rng.random_bool(0.3) {
                return pending(client, input, call);
            }
            let ret = call + rng.random_range(0..10);
            let output = match input {
                KvInput::Put { .. } => KvOutput::Put,
                KvInput::Get { .. } => KvOutput::Get(if rng.random_bool(0.2) {
                    None
                } else {
                    Some(value(rng))
                }),
                KvInput::Cas { .. } => KvOutput::Cas(rng.random_bool(0.5)),
            };
            done(client, input, call, ret, output)
        })
        .collect()
}

#[test]
fn agrees_with_brute_force_on_random_small_histories() {
    let mut rng = ChaCha8Rng::seed_from_u64(99);
    let (mut accepted, mut rejected) = (0, 0);
    for case in 0..20_000 {
        let history = random_small_history(&mut rng);
        let expected = brute_force_linearizable(&history);
        let outcome = verdict(&history);
        assert_eq!(
            outcome == CheckOutcome::Linearizable,
            expected,
            "case {case}: checker says {outcome:?}, brute force says {expected}: {history:#?}"
        );
        if expected {
            accepted += 1
        } else {
            rejected += 1
        }
    }
    assert!(
        accepted > 2_000 && rejected > 2_000,
        "accepted {accepted}, rejected {rejected}"
    );
}
