//! Replication: proposals and batching, pipelined appends, heartbeats, back-off and commit.
use bytes::Bytes;
use crate::protocol::raft::node::RaftNode;
use crate::protocol::raft::output::Output;
impl RaftNode {
    pub(crate) fn tick_leader(&mut self, _out: &mut Output) {}
    pub(crate) fn propose(&mut self, _r: u64, _d: Bytes, _out: &mut Output) {}
    pub(crate) fn flush_proposals(&mut self, _out: &mut Output) {}
}
