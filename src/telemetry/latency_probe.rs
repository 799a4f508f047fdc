//! Timestamps of a proposal's hops through the engine and the TCP transport, for latency
//! budgets: where a commit's time goes between the client's call and its answer
//! (`examples/latency_budget.rs` prints the table).
//!
//! Compiled in with the `latency-probe` feature only; without it `stamp` is an empty inline
//! function and nothing is recorded. While armed, every stamp takes a global lock: the probe is
//! for one proposal at a time (a single client), not for loaded runs.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crate::types::NodeId;

/// A point on a proposal's path. The same point is passed on the leader and on followers; the
/// node a stamp carries tells them apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hop {
    /// The driver took a client's proposal from its queue.
    Proposed,
    /// The driver handed a message to the transport.
    Sent,
    /// The transport's peer task took a batch of queued messages to send.
    BatchTaken,
    /// The receiving node's tarpc handler got a batch.
    BatchArrived,
    /// One of the batch's messages is being queued for the driver (on the task that read it).
    Forwarded,
    /// The driver took a peer's message from its queue.
    DriverTook,
    /// The driver applied committed entries and handed their answers on.
    Answered,
}

/// One recorded hop.
#[derive(Clone, Copy, Debug)]
pub struct Stamp {
    pub hop: Hop,
    pub node: NodeId,
    pub at: Instant,
}

static ARMED: AtomicBool = AtomicBool::new(false);
static STAMPS: Mutex<Vec<Stamp>> = Mutex::new(Vec::new());

/// Whether this build records stamps (the `latency-probe` feature).
pub const ENABLED: bool = cfg!(feature = "latency-probe");

/// Forgets what was recorded and starts recording.
pub fn arm() {
    crate::sync::lock(&STAMPS).clear();
    ARMED.store(true, Ordering::SeqCst);
}

/// Stops recording and returns the stamps since [`arm`], in the order they were taken.
pub fn take() -> Vec<Stamp> {
    ARMED.store(false, Ordering::SeqCst);
    std::mem::take(&mut *crate::sync::lock(&STAMPS))
}

/// Records that `node` passed `hop` now, if armed.
#[inline(always)]
pub(crate) fn stamp(hop: Hop, node: NodeId) {
    #[cfg(feature = "latency-probe")]
    if ARMED.load(Ordering::Relaxed) {
        let at = Instant::now();
        crate::sync::lock(&STAMPS).push(Stamp { hop, node, at });
    }
    #[cfg(not(feature = "latency-probe"))]
    let _ = (hop, node);
}
