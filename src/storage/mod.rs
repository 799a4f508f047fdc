//! Durable state of a node: the log and the hard state (current term and vote).
//!
//! [`LogStore`] is the small trait the engine and the simulator drive; [`MemoryLogStore`] keeps
//! everything in memory but models durability exactly (what was not synced is lost in a crash),
//! which is what the simulator needs.

mod fjall;
mod memory;

pub use self::fjall::{
    DATABASE_DIR, FjallLogStore, HARD_STATE_KEY, LOG_KEYSPACE, META_KEYSPACE, SNAPSHOT_KEY,
    SnapshotMeta, SyncPolicy,
};
pub use memory::MemoryLogStore;

use serde::{Deserialize, Serialize};

use crate::error::StorageError;
use crate::protocol::raft::Output;
use crate::types::{Entry, LogIndex, NodeId, Term};

/// The state Raft must never forget: a node that forgot its vote could vote twice in one term.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HardState {
    /// The latest term this node has seen.
    pub term: Term,
    /// The candidate this node voted for in `term`, if any.
    pub voted_for: Option<NodeId>,
}

/// What a store hands back on start-up.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveredState {
    /// The last hard state made durable.
    pub hard_state: HardState,
    /// Every durable log entry, in index order from index 1.
    pub entries: Vec<Entry>,
}

/// Storage of the log and the hard state.
///
/// Writes may be buffered; only [`LogStore::sync`] promises durability: when it returns `Ok`,
/// every earlier write survives a crash. Writes are applied in call order.
pub trait LogStore: Send {
    /// Records the hard state.
    fn save_hard_state(&mut self, hard_state: HardState) -> Result<(), StorageError>;
    /// Removes every entry with index `>= from`.
    fn truncate_from(&mut self, from: LogIndex) -> Result<(), StorageError>;
    /// Appends entries; the first must directly follow the last stored entry.
    fn append(&mut self, entries: &[Entry]) -> Result<(), StorageError>;
    /// Makes every earlier write durable.
    fn sync(&mut self) -> Result<(), StorageError>;
    /// Reads back the durable state.
    fn recover(&mut self) -> Result<RecoveredState, StorageError>;

    /// Carries out the persistence part of a core [`Output`] and syncs it: the first step of the
    /// driver's contract. Does nothing (not even a sync) when there is nothing to persist.
    fn persist(&mut self, output: &Output) -> Result<(), StorageError> {
        if output.hard_state.is_none() && output.truncate_from.is_none() && output.append.is_empty()
        {
            return Ok(());
        }
        if let Some(hard_state) = output.hard_state {
            self.save_hard_state(hard_state)?;
        }
        if let Some(from) = output.truncate_from {
            self.truncate_from(from)?;
        }
        if !output.append.is_empty() {
            self.append(&output.append)?;
        }
        self.sync()
    }
}
