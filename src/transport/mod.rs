//! How messages leave a node. The engine hands every outgoing message to a [`Transport`]; inbound
//! messages arrive on a channel the transport was built with.

use crate::telemetry::TraceAttachment;
use crate::types::NodeId;

/// Sends messages to peers, fire and forget: delivery may fail, be delayed, reordered or
/// duplicated, and the protocols tolerate all of that. Implementations batch per peer and bound
/// their queues, dropping (and counting) what does not fit rather than blocking the node.
pub trait Transport<M>: Send + Sync {
    /// Queues `message` for `to`.
    fn send(&self, to: NodeId, message: M);

    /// Queues `message`, which carries a traced proposal, for `to` with the trace context the
    /// receiver continues the proposal's trace from (see [`crate::telemetry`]). A transport
    /// that cannot carry it sends the message alone, which costs the trace, not the message.
    fn send_traced(&self, to: NodeId, message: M, trace: TraceAttachment) {
        let _ = trace;
        self.send(to, message);
    }

    /// Member `id` listens at `address` (`name@host:port`, from a membership entry; see
    /// [`crate::membership::Membership::addresses`]): a transport that dials its peers starts
    /// reaching it, unless it already does. Transports that reach every node without dialing
    /// (the in-process and simulated networks) ignore it, which is why it has a default.
    fn add_member(&self, id: NodeId, address: &str) {
        let _ = (id, address);
    }

    /// Member `id` left the group (its removal committed a while ago, so it had time to hear
    /// of it): a transport that dials its peers stops reaching it. The others ignore it.
    fn remove_member(&self, id: NodeId) {
        let _ = id;
    }
}

pub mod simulated;
pub mod tcp;
