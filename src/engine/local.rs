//! An in-process network: engines in one process exchange messages through each other's
//! [`Inbox`] with no serialization and no sockets. For benchmarks, tests and embedding several
//! replicas in one program.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::engine::driver::Inbox;
use crate::protocol::raft::Message;
use crate::transport::Transport;
use crate::types::NodeId;

/// Connects the engines of one process. Clone it freely: clones share the same members.
#[derive(Clone, Debug, Default)]
pub struct LocalNetwork {
    inboxes: Arc<RwLock<HashMap<NodeId, Inbox>>>,
}

impl LocalNetwork {
    /// An empty network.
    pub fn new() -> Self {
        Self::default()
    }

    /// The sending side for `node`.
    pub fn transport(&self, node: NodeId) -> LocalTransport {
        LocalTransport {
            from: node,
            network: self.clone(),
        }
    }

    /// Makes `node` reachable through `inbox` (replacing an earlier registration, as a restarted
    /// node does).
    pub(crate) fn register(&self, node: NodeId, inbox: Inbox) {
        if let Ok(mut inboxes) = self.inboxes.write() {
            inboxes.insert(node, inbox);
        }
    }

    /// Makes `node` unreachable, as if its process stopped.
    pub fn disconnect(&self, node: NodeId) {
        if let Ok(mut inboxes) = self.inboxes.write() {
            inboxes.remove(&node);
        }
    }
}

/// One node's handle on a [`LocalNetwork`].
#[derive(Clone, Debug)]
pub struct LocalTransport {
    from: NodeId,
    network: LocalNetwork,
}

impl Transport<Message> for LocalTransport {
    fn send(&self, to: NodeId, message: Message) {
        let inbox = self
            .network
            .inboxes
            .read()
            .ok()
            .and_then(|inboxes| inboxes.get(&to).cloned());
        if let Some(inbox) = inbox {
            inbox.deliver(self.from, message);
        }
    }
}
