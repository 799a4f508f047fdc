//! Durable state of a node: the log and the hard state (current term and vote).
//!
//! [`LogStore`] is the small trait the engine and the simulator drive; [`MemoryLogStore`] keeps
//! everything in memory but models durability exactly (what was not synced is lost in a crash),
//! which is what the simulator needs. Every protocol core writes through one [`LogWrite`], so
//! this module depends on no protocol: the cores import it, never the reverse.

mod fjall;
mod memory;

pub use self::fjall::{
    DATABASE_DIR, FjallLogStore, HARD_STATE_KEY, LOG_KEYSPACE, META_KEYSPACE, SNAPSHOT_KEY,
    SnapshotMeta, SyncPolicy,
};
pub use memory::MemoryLogStore;

use serde::{Deserialize, Serialize};

use crate::error::StorageError;
use crate::types::{Entry, LogIndex, NodeId, Term};

/// The state a node must never forget: a Raft node that forgot its vote could vote twice in one
/// term. (A PBFT replica keeps its view in `term`.)
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
    /// Every durable log entry, in index order and contiguous. The first need not be index 1:
    /// a compacted store starts after its snapshot.
    pub entries: Vec<Entry>,
}

/// One durable write a protocol core asks for: a new hard state, a truncation of the log's
/// tail, and entries to append, carried out in that order as one unit.
///
/// A core accumulates the writes of several steps into one `LogWrite` (group commit);
/// [`LogWrite::merge_log`] keeps the result equal to doing them one after another.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogWrite {
    /// Persist this hard state (term, vote).
    pub hard_state: Option<HardState>,
    /// Remove every stored entry at or after this index, before appending [`LogWrite::append`].
    pub truncate_from: Option<LogIndex>,
    /// Entries to append to the log, in index order.
    pub append: Vec<Entry>,
}

impl LogWrite {
    /// True when there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.hard_state.is_none() && self.truncate_from.is_none() && self.append.is_empty()
    }

    /// Empties every field, keeping allocations for reuse.
    pub fn clear(&mut self) {
        self.hard_state = None;
        self.truncate_from = None;
        self.append.clear();
    }

    /// The last entry this write appends: its index and term.
    pub fn last_appended(&self) -> Option<(LogIndex, Term)> {
        self.append.last().map(|e| (e.index, e.term))
    }

    /// Adds a log write after the ones already held: drop stored entries from `truncate_from`
    /// (if any), then append `entries`. Merged so that one persist has the effect of all the
    /// writes in order.
    pub fn merge_log(&mut self, truncate_from: Option<LogIndex>, entries: &[Entry]) {
        if let Some(from) = truncate_from {
            self.append.retain(|e| e.index < from);
            self.truncate_from = Some(self.truncate_from.map_or(from, |t| t.min(from)));
        }
        debug_assert!(
            match (self.append.last(), entries.first()) {
                (Some(last), Some(first)) => last.index + 1 == first.index,
                _ => true,
            },
            "log writes of one output must be contiguous"
        );
        self.append.extend_from_slice(entries);
    }
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

    /// Carries out one [`LogWrite`] and syncs it: when it returns `Ok` the whole write is
    /// durable. Does nothing (not even a sync) when the write is empty.
    fn persist(&mut self, write: &LogWrite) -> Result<(), StorageError> {
        if write.is_empty() {
            return Ok(());
        }
        if let Some(hard_state) = write.hard_state {
            self.save_hard_state(hard_state)?;
        }
        if let Some(from) = write.truncate_from {
            self.truncate_from(from)?;
        }
        if !write.append.is_empty() {
            self.append(&write.append)?;
        }
        self.sync()
    }
}
