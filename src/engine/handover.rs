//! The first step of a clean stop: a Raft leader hands leadership to its most caught-up voter
//! and waits, bounded, until another node leads, so that the cluster goes on without waiting
//! out an election timeout and no client of the other nodes sees the stop.

use std::time::Duration;

use tokio::sync::watch;

use crate::engine::core::CoreInputs;
use crate::engine::driver::{DriverInput, LeaderInfo};
use crate::protocol::raft::Control;
use crate::types::NodeId;

/// Asks the driver behind `inputs` to hand over if it leads ([`Control::HandOver`]) and waits
/// until this node knows another leader, or `bound` passes. Returns whether another node leads
/// (false also when this node did not lead, or runs a core without leaders to hand over).
pub(crate) async fn hand_over(
    inputs: &CoreInputs,
    leader: &watch::Sender<LeaderInfo>,
    me: NodeId,
    bound: Duration,
) -> bool {
    if !leader.borrow().is_leader {
        return false;
    }
    let asked = match inputs {
        CoreInputs::Raft(sender) => sender
            .try_send(DriverInput::Control(Control::HandOver))
            .is_ok(),
        CoreInputs::GpuRaft(sender) => sender
            .try_send(DriverInput::Control(Control::HandOver))
            .is_ok(),
        // A PBFT primary is fixed by the view number: nothing to hand over.
        CoreInputs::Pbft(_) => false,
    };
    if !asked {
        return false;
    }
    let mut info = leader.subscribe();
    let handed = info.wait_for(|info| !info.is_leader && info.leader.is_some_and(|l| l != me));
    let handed = matches!(tokio::time::timeout(bound, handed).await, Ok(Ok(_)));
    if handed {
        tracing::info!(node = %me, "handed leadership over before stopping");
    } else {
        tracing::warn!(node = %me, ?bound, "no other leader in time; stopping anyway");
    }
    handed
}
