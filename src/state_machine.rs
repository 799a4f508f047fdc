//! The user's replicated state: [`StateMachine`] receives every committed command, in log order,
//! on every node.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Writes a snapshot of a state machine's state as bytes. [`StateMachine::snapshot`] makes it on
/// the driver thread, which waits meanwhile, so it should only capture the state cheaply (a
/// clone, a reference-counted handle, a copy-on-write view); the engine then runs it on a
/// background thread while the driver goes on applying.
pub type SnapshotWriter = Box<dyn FnOnce(&mut dyn std::io::Write) -> std::io::Result<()> + Send>;

/// A deterministic state machine replicated by the engine.
///
/// `apply` must be deterministic: the same commands in the same order must produce the same state
/// and responses on every node, or replicas diverge. It runs on the engine's driver thread, so it
/// should be quick; long work belongs elsewhere.
pub trait StateMachine: Send + 'static {
    /// What clients submit. Encoded into the log with postcard (a serde format: any
    /// `Serialize`/`Deserialize` type works, and a command must decode from exactly the bytes
    /// it encoded to).
    type Command: Serialize + DeserializeOwned + Send + 'static;
    /// What applying a command returns to the client that submitted it.
    type Response: Send + 'static;

    /// Applies one committed command.
    fn apply(&mut self, command: Self::Command) -> Self::Response;

    /// Whether `command` only reads: applying it changes nothing. Such a command is served
    /// without a log write ([`ConsensusEngine::read`](crate::ConsensusEngine::read), per
    /// [`ConsensusConfig::read_mode`](crate::ConsensusConfig::read_mode)): `apply` runs on the
    /// one node that serves it, which is why it must not change the state. A node whose disk is
    /// fuller than its reserve
    /// ([`ConsensusConfig::disk_reserve_bytes`](crate::ConsensusConfig::disk_reserve_bytes))
    /// refuses every command but these (with `read_mode = "log"` they go into the reserve). The
    /// default, `false`, treats every command as a write.
    fn is_read_only(_command: &Self::Command) -> bool {
        false
    }

    /// Captures the state for a snapshot: the returned writer streams it as bytes, which
    /// [`StateMachine::restore`] must turn back into the same state. The engine calls it every
    /// [`ConsensusConfig::snapshot_interval`](crate::ConsensusConfig::snapshot_interval) applied
    /// entries, keeps the bytes durably, drops the log behind the previous snapshot, and sends
    /// the snapshot to followers the log no longer reaches.
    ///
    /// The default, `None`, means the state machine takes no snapshots: the engine then keeps
    /// the whole log (it grows without bound, and a restart replays it from the start), which
    /// is how state machines written before snapshots existed keep working unchanged.
    fn snapshot(&self) -> Option<SnapshotWriter> {
        None
    }

    /// Replaces the whole state with the one a [`SnapshotWriter`] of this state machine wrote
    /// (on this node or on another: the bytes come from the leader when a follower is too far
    /// behind). Called only where [`StateMachine::snapshot`] returns writers; the default
    /// refuses. An error stops the node (its state is no longer known), with the message.
    fn restore(&mut self, snapshot: &mut dyn std::io::Read) -> std::io::Result<()> {
        let _ = snapshot;
        Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "this state machine does not restore snapshots (StateMachine::restore)",
        ))
    }

    /// [`StateMachine::restore`] from the snapshot's bytes, all in memory: what the engine
    /// calls. The default reads them through [`StateMachine::restore`]; a state machine whose
    /// state is made of byte strings can override it to keep slices of `snapshot` (each a
    /// reference-counted view of the one buffer, no copy) instead of copying every byte into
    /// allocations of its own, as [`KvStore`](crate::node::kv::KvStore) does. The buffer then
    /// lives as long as any slice of it.
    fn restore_from_bytes(&mut self, snapshot: bytes::Bytes) -> std::io::Result<()> {
        self.restore(&mut snapshot.as_ref())
    }
}

/// The engine's type-erased view of a state machine.
pub(crate) trait ErasedStateMachine: Send {
    /// Decodes and applies a committed entry. `Err` when the bytes do not decode as a command of
    /// this state machine (e.g. a raw [`Proposal`](crate::Proposal) of another shape); the
    /// state machine is then left untouched, the same way on every node.
    fn apply_bytes(&mut self, data: &[u8]) -> Result<Box<dyn std::any::Any + Send>, String>;

    /// [`StateMachine::snapshot`].
    fn snapshot_writer(&self) -> Option<SnapshotWriter>;

    /// [`StateMachine::restore_from_bytes`].
    fn restore_bytes(&mut self, data: bytes::Bytes) -> Result<(), String>;
}

impl<S: StateMachine> ErasedStateMachine for S {
    fn apply_bytes(&mut self, data: &[u8]) -> Result<Box<dyn std::any::Any + Send>, String> {
        let command: S::Command = crate::encoding::decode_whole(data).map_err(|e| e.to_string())?;
        Ok(Box::new(self.apply(command)))
    }

    fn snapshot_writer(&self) -> Option<SnapshotWriter> {
        self.snapshot()
    }

    fn restore_bytes(&mut self, data: bytes::Bytes) -> Result<(), String> {
        self.restore_from_bytes(data).map_err(|e| e.to_string())
    }
}

/// Encodes a command the way [`ErasedStateMachine::apply_bytes`] decodes it.
pub(crate) fn encode_command<C: Serialize>(command: &C) -> Result<Vec<u8>, String> {
    crate::encoding::to_vec(command).map_err(|e| e.to_string())
}
