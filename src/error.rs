//! The crate's error types. Each module boundary has its own enum; [`Error`] gathers them for the
//! public API.

use crate::protocol::RejectReason;
use crate::types::LogIndex;

/// A configuration that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A field holds a value that is out of range or inconsistent with another.
    #[error("invalid {field} = {value}: {reason}")]
    Invalid {
        /// The field's name as the builder and TOML file spell it.
        field: &'static str,
        /// The offending value.
        value: String,
        /// What it should be.
        reason: &'static str,
    },
    /// A configuration file could not be read.
    #[error("cannot read config file {path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// A configuration file is not valid TOML for our keys.
    #[error("invalid config file: {reason}")]
    Toml {
        /// The parser's explanation, naming the key.
        reason: String,
    },
    /// PBFT is configured with fewer than four members: it tolerates `f` faulty replicas out of
    /// `n = 3f + 1`, so it needs at least four.
    #[error(
        "PBFT needs n = 3f + 1 >= 4 replicas; {configured} configured \
         (node_id plus bootstrap_peers)"
    )]
    TooFewReplicas {
        /// How many members are configured, this node included.
        configured: usize,
    },
    /// A signed algorithm (PBFT, GPU-optimized Raft) has no `key_file`.
    #[error(
        "key_file is not set: pbft and gpu_optimized_raft sign every message with this node's \
         ed25519 secret key (`consensus-node keygen FILE` writes one)"
    )]
    MissingKeyFile,
    /// An entry of `[consensus.validators]` is not a usable ed25519 public key.
    #[error("invalid public key for {node:?} in validators ({value:?}): {problem}")]
    InvalidValidatorKey {
        /// The member the entry is for.
        node: String,
        /// The entry's value.
        value: String,
        /// What is wrong with it.
        problem: String,
    },
    /// `[consensus.validators]` has no entry for a member.
    #[error(
        "validators has no public key for member {node:?} (the table is keyed by node_id and by \
         each bootstrap_peers name: the part before '@', or the whole entry when it has no '@')"
    )]
    MissingValidator {
        /// The member without a key.
        node: String,
    },
    /// `[consensus.validators]` names a node that is not a member.
    #[error(
        "validators names {node:?}, which is not a member (neither node_id nor a bootstrap_peers \
         name)"
    )]
    UnknownValidator {
        /// The entry's name.
        node: String,
    },
    /// The TLS files of `[consensus.tls]` are unreadable or unusable: the message names the file
    /// and what is wrong (never a key's contents).
    #[error("[consensus.tls]: {problem}")]
    Tls {
        /// What is wrong, from [`TlsError`](crate::transport::tcp::TlsError).
        problem: String,
    },
    /// The key file is unreadable or does not hold a secret key. The message never quotes the
    /// file's contents.
    #[error("key file {path}: {problem}")]
    KeyFile {
        /// The file.
        path: String,
        /// What went wrong (the I/O error, or what the contents should be).
        problem: String,
    },
    /// The key file's secret key is not the one whose public key `[consensus.validators]` lists
    /// for this node.
    #[error(
        "key file {path} does not match validators entry {node:?}: the file's public key is \
         {actual}, the table says {configured}"
    )]
    KeyMismatch {
        /// The key file.
        path: String,
        /// This node's name.
        node: String,
        /// The public half of the file's secret key, in hex.
        actual: String,
        /// This node's entry in the table.
        configured: String,
    },
}

/// A TLS identity that cannot be loaded or written is a configuration error, wherever it is read.
impl From<crate::transport::tcp::TlsError> for ConfigError {
    fn from(error: crate::transport::tcp::TlsError) -> Self {
        ConfigError::Tls {
            problem: error.to_string(),
        }
    }
}

impl ConfigError {
    /// `Err(ConfigError::Invalid { .. })`, the answer of every `validate` in the crate.
    pub(crate) fn invalid<T>(
        field: &'static str,
        value: String,
        reason: &'static str,
    ) -> Result<T, ConfigError> {
        Err(ConfigError::Invalid {
            field,
            value,
            reason,
        })
    }
}

/// A log store failed. The node must not go on running on a store in an unknown state.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The underlying storage failed.
    #[error("storage I/O failed: {0}")]
    Io(#[from] std::io::Error),
    /// An fsync of the store failed. The node stops: a failed fsync is never retried, because
    /// Linux may already have dropped the dirty pages it failed to write, so a retry that
    /// succeeds would report as durable data that is gone.
    #[error(
        "fsync of {what} failed: {source}; the node stops (a failed fsync is never retried: \
         the kernel may have dropped the pages it could not write)"
    )]
    SyncFailed {
        /// What was being synced (e.g. "journal").
        what: &'static str,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The disk holding the state directory has less free space than the reserve: writes are
    /// refused until space returns; reads go on (into the reserve).
    #[error(
        "disk full: {available_bytes} bytes free under {path}, below the reserve of \
         {reserve_bytes} bytes kept for reads and protocol state; writes are refused until \
         space returns"
    )]
    DiskFull {
        /// The state directory.
        path: String,
        /// Bytes free on its filesystem.
        available_bytes: u64,
        /// The configured reserve (`disk_reserve_mb`).
        reserve_bytes: u64,
    },
    /// A stored record does not decode or breaks the log's invariants.
    #[error("corrupt record at {location}: {detail}")]
    Corrupt {
        /// Which record (e.g. "log index 17" or "hard state").
        location: String,
        /// What is wrong with it.
        detail: String,
    },
    /// A stored record was written in a format this release no longer reads (e.g. a log entry
    /// from before commands were encoded with postcard). Nothing is lost by refusing it: the
    /// data directory is untouched, and a release that reads that version can still open it.
    #[error(
        "record at {location} is format version {version}, which this release does not read: {reason}"
    )]
    UnsupportedVersion {
        /// Which record (e.g. "log index 17").
        location: String,
        /// The version byte it carries.
        version: u8,
        /// Why it is not read.
        reason: &'static str,
    },
    /// A write would leave a gap or rewrite history below the given index.
    #[error("non-contiguous log write: expected index {expected}, got {got}")]
    NonContiguous {
        /// The index the store expected next.
        expected: LogIndex,
        /// The index it was given.
        got: LogIndex,
    },
    /// A backend-specific failure.
    #[error("storage backend: {0}")]
    Backend(String),
    /// The store does not keep a core's records (it relies on the default
    /// [`LogStore::write_records`](crate::storage::LogStore::write_records)), so the core that
    /// asked to write some cannot run on it: forgetting them could break its safety.
    #[error(
        "this log store does not keep records, but the protocol core asked to write some: \
         use a store that implements LogStore::write_records"
    )]
    RecordsUnsupported,
    /// The store does not keep snapshots (it relies on the defaults of
    /// [`LogStore::save_snapshot`](crate::storage::LogStore::save_snapshot) and
    /// [`LogStore::compact_through`](crate::storage::LogStore::compact_through)), so a core
    /// that compacts its log cannot run on it.
    #[error(
        "this log store does not keep snapshots, but the protocol core asked to save one or to \
         compact the log: use a store that implements LogStore::save_snapshot and \
         LogStore::compact_through, or set snapshot_interval = 0"
    )]
    SnapshotsUnsupported,
    /// A record's key or value is over the bounds every store keeps
    /// ([`MAX_RECORD_KEY_BYTES`](crate::storage::MAX_RECORD_KEY_BYTES),
    /// [`MAX_RECORD_VALUE_BYTES`](crate::storage::MAX_RECORD_VALUE_BYTES)).
    #[error(
        "record too large: key of {key_bytes} bytes (at most {}), value of {value_bytes} bytes \
         (at most {})",
        crate::storage::MAX_RECORD_KEY_BYTES,
        crate::storage::MAX_RECORD_VALUE_BYTES
    )]
    RecordTooLarge {
        /// The key's length.
        key_bytes: usize,
        /// The value's length (0 for a delete).
        value_bytes: usize,
    },
}

/// Errors of the public API.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// See [`ConfigError`].
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// See [`StorageError`].
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// A membership change was refused (see [`MembershipError`](crate::MembershipError)).
    #[error("membership change refused: {0}")]
    Membership(#[from] crate::membership::MembershipError),
    /// A feature or algorithm this version does not provide.
    #[error("{what} is not supported: {reason}")]
    Unsupported {
        /// What was asked for.
        what: String,
        /// Why it cannot be had.
        reason: &'static str,
    },
    /// The call does not fit the engine's state (e.g. propose before start).
    #[error("invalid state: {0}")]
    InvalidState(&'static str),
    /// The proposal was refused and never appended.
    #[error("rejected: {0}")]
    Rejected(RejectReason),
    /// The deadline passed before the outcome was known: the proposal may or may not commit.
    #[error("timed out; the outcome is unknown")]
    Timeout,
    /// The engine stopped before answering.
    #[error("engine stopped: {0}")]
    Stopped(String),
    /// [`ConsensusEngine::read`](crate::ConsensusEngine::read) was given a command the state
    /// machine does not mark read-only: applied on one node alone it would make the replicas
    /// diverge.
    #[error("the command is not read-only (StateMachine::is_read_only): order it through the log")]
    NotReadOnly,
    /// Encoding a command, decoding it, or the response type, went wrong.
    #[error("state machine: {0}")]
    StateMachine(String),
    /// An operating-system call failed.
    #[error("I/O: {0}")]
    Io(String),
}

/// Shorthand for results of the public API.
pub type Result<T, E = Error> = std::result::Result<T, E>;
