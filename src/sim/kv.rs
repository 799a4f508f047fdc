//! The replicated key-value state machine the simulator runs on every node by default: put, get
//! and compare-and-swap on `u64` keys and values, answering exactly what [`KvModel`] says. Gets
//! are read-only: the simulated clients send them down the core's read path (ReadIndex or
//! lease reads) unless [`SimConfig::reads_through_log`](crate::sim::SimConfig::reads_through_log)
//! orders them through the log; either way the checker holds them to linearizability.
//!
//! Exactly-once execution of a proposal duplicated by the network is not its job here: the
//! engine's apply stage, which the simulator runs, filters copies out before they reach it.

use std::collections::BTreeMap;

use crate::sim::linearizability::{KvInput, KvModel, KvOutput};
use crate::state_machine::{SnapshotWriter, StateMachine};

/// One replica of the store.
#[derive(Clone, Debug, Default)]
pub struct KvStateMachine {
    values: BTreeMap<u64, u64>,
}

impl KvStateMachine {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// The value of `key`.
    pub fn get(&self, key: u64) -> Option<u64> {
        self.values.get(&key).copied()
    }
}

impl StateMachine for KvStateMachine {
    type Command = KvInput;
    type Response = KvOutput;

    fn is_read_only(command: &KvInput) -> bool {
        matches!(command, KvInput::Get { .. })
    }

    fn apply(&mut self, command: KvInput) -> KvOutput {
        let key = command.key();
        let (value, output) = KvModel::apply(self.get(key), &command);
        if let Some(value) = value {
            self.values.insert(key, value);
        }
        output
    }

    /// A copy of the map, encoded off the driver's path.
    fn snapshot(&self) -> Option<SnapshotWriter> {
        let values = self.values.clone();
        Some(Box::new(move |out| {
            let bytes = postcard::to_stdvec(&values).map_err(std::io::Error::other)?;
            out.write_all(&bytes)
        }))
    }

    fn restore(&mut self, snapshot: &mut dyn std::io::Read) -> std::io::Result<()> {
        let mut bytes = Vec::new();
        snapshot.read_to_end(&mut bytes)?;
        self.values = crate::encoding::decode_whole(&bytes).map_err(std::io::Error::other)?;
        Ok(())
    }
}
