//! Elections: pre-vote, votes, check-quorum leases, leadership transfer and priority hand-over.
use crate::protocol::raft::node::RaftNode;
use crate::protocol::raft::message::Envelope;
use crate::protocol::raft::output::Output;
use crate::types::NodeId;
impl RaftNode {
    pub(crate) fn start_campaign(&mut self, _transfer: bool, _out: &mut Output) {}
    pub(crate) fn receive(&mut self, _e: Envelope, _out: &mut Output) {}
    pub(crate) fn transfer_leadership(&mut self, _to: NodeId, _out: &mut Output) {}
}
