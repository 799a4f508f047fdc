//! An in-process network: engines in one process exchange messages through each other's
//! [`Inbox`] with no serialization and no sockets. For benchmarks, tests and embedding several
//! replicas in one program.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::engine::driver::Inbox;
use crate::protocol::Protocol;
use crate::protocol::raft::RaftNode;
use crate::sync::{read, write};
use crate::telemetry::TraceAttachment;
use crate::transport::Transport;
use crate::types::NodeId;

/// Connects the engines of one process that run core `P`. Clone it freely: clones share the
/// same members.
pub struct LocalNetwork<P: Protocol = RaftNode> {
    inboxes: Arc<RwLock<HashMap<NodeId, Inbox<P>>>>,
}

impl<P: Protocol> Clone for LocalNetwork<P> {
    fn clone(&self) -> Self {
        LocalNetwork {
            inboxes: self.inboxes.clone(),
        }
    }
}

impl<P: Protocol> Default for LocalNetwork<P> {
    fn default() -> Self {
        LocalNetwork {
            inboxes: Arc::default(),
        }
    }
}

impl<P: Protocol> std::fmt::Debug for LocalNetwork<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalNetwork")
            .field("members", &read(&self.inboxes).len())
            .finish()
    }
}

impl LocalNetwork<RaftNode> {
    /// An empty network of Raft engines. (One of another core's: `LocalNetwork::<Core>::default()`,
    /// e.g. `LocalNetwork::<PbftNode>::default()`; `new` stays Raft's so that the type of a
    /// plain `LocalNetwork::new()` needs no annotation.)
    pub fn new() -> Self {
        Self::default()
    }
}

impl<P: Protocol> LocalNetwork<P> {
    /// The sending side for `node`.
    pub fn transport(&self, node: NodeId) -> LocalTransport<P> {
        LocalTransport {
            from: node,
            network: self.clone(),
        }
    }

    /// Makes `node` reachable through `inbox` (replacing an earlier registration, as a restarted
    /// node does).
    pub(crate) fn register(&self, node: NodeId, inbox: Inbox<P>) {
        write(&self.inboxes).insert(node, inbox);
    }

    /// Makes `node` unreachable, as if its process stopped.
    pub fn disconnect(&self, node: NodeId) {
        write(&self.inboxes).remove(&node);
    }
}

/// One node's handle on a [`LocalNetwork`].
#[derive(Clone, Debug)]
pub struct LocalTransport<P: Protocol = RaftNode> {
    from: NodeId,
    network: LocalNetwork<P>,
}

impl<P: Protocol> Transport<P::Message> for LocalTransport<P> {
    fn send(&self, to: NodeId, message: P::Message) {
        let inbox = read(&self.network.inboxes).get(&to).cloned();
        if let Some(inbox) = inbox {
            inbox.deliver(self.from, message);
        }
    }

    fn send_traced(&self, to: NodeId, message: P::Message, trace: TraceAttachment) {
        let inbox = read(&self.network.inboxes).get(&to).cloned();
        if let Some(inbox) = inbox {
            inbox.deliver_traced(self.from, message, Some(Box::new(trace)));
        }
    }
}
