//! Waiting on running engines. Include it standalone with
//! `#[path = "common/engines.rs"] mod engines;`; it uses nothing else from `tests/common`.

#![allow(dead_code)]

use std::time::{Duration, Instant};

use consensus::ConsensusEngine;

/// The index of the one engine among `among` that leads, once exactly one does; panics after
/// `deadline`.
pub async fn single_leader(
    engines: &[ConsensusEngine],
    among: &[usize],
    deadline: Duration,
) -> usize {
    let until = Instant::now() + deadline;
    loop {
        let leaders: Vec<usize> = among
            .iter()
            .copied()
            .filter(|&i| engines[i].is_leader())
            .collect();
        if let [only] = leaders[..] {
            return only;
        }
        assert!(
            Instant::now() < until,
            "no single leader among {among:?} within {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
