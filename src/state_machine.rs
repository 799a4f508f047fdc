//! The user's replicated state: [`StateMachine`] receives every committed command, in log order,
//! on every node.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// A deterministic state machine replicated by the engine.
///
/// `apply` must be deterministic: the same commands in the same order must produce the same state
/// and responses on every node, or replicas diverge. It runs on the engine's driver thread, so it
/// should be quick; long work belongs elsewhere.
pub trait StateMachine: Send + 'static {
    /// What clients submit. Encoded into the log with `bincode`.
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
}

/// The engine's type-erased view of a state machine.
pub(crate) trait ErasedStateMachine: Send {
    /// Decodes and applies a committed entry. `Err` when the bytes do not decode as a command of
    /// this state machine (e.g. a raw [`Proposal`](crate::Proposal) of another shape); the
    /// state machine is then left untouched, the same way on every node.
    fn apply_bytes(&mut self, data: &[u8]) -> Result<Box<dyn std::any::Any + Send>, String>;
}

impl<S: StateMachine> ErasedStateMachine for S {
    fn apply_bytes(&mut self, data: &[u8]) -> Result<Box<dyn std::any::Any + Send>, String> {
        let command: S::Command = bincode::deserialize(data).map_err(|e| e.to_string())?;
        Ok(Box::new(self.apply(command)))
    }
}

/// Encodes a command the way [`ErasedStateMachine::apply_bytes`] decodes it.
pub(crate) fn encode_command<C: Serialize>(command: &C) -> Result<Vec<u8>, String> {
    bincode::serialize(command).map_err(|e| e.to_string())
}
