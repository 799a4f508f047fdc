//! Connection hints: what the nodes' transports tell them when a peer's connections break
//! ([`ConnectionHints`](crate::sim::ConnectionHints)): the crash of a peer, reported after the
//! data it had sent and sometimes lost, and false reports about live peers.

use rand::RngExt;

use crate::NodeId;
use crate::protocol::Input;
use crate::sim::{Action, Sim, SimProtocol};

impl<P: SimProtocol> Sim<P> {
    /// Tells each live node, with the configured chance and delay, that `peer`'s connections
    /// broke (see [`ConnectionHints`](crate::sim::ConnectionHints)). A hint comes after
    /// whatever `peer` had already sent that node, as a reset comes after the data on a TCP
    /// connection.
    pub(super) fn hint_unreachable(&mut self, peer: NodeId) {
        let hints = self.config.connection_hints;
        if hints.delivery_probability <= 0.0 {
            return;
        }
        for node in 0..self.nodes.len() {
            let live = self.nodes[node].core.is_some() && self.nodes[node].id != peer;
            if live && self.rng.random_bool(hints.delivery_probability.min(1.0)) {
                let address = self.nodes[node].address;
                let after_data = self.network.last_delivery_at(peer, address).unwrap_or(0);
                let at = (self.now_us + self.rng.random_range(0..=hints.max_delay_us))
                    .max(after_data + 1);
                let incarnation = self.nodes[node].incarnation;
                self.schedule(
                    at,
                    Action::Hint {
                        node,
                        incarnation,
                        peer,
                    },
                );
            }
        }
    }

    /// Tells one random live node that a live peer (the leader, when there is one) is
    /// unreachable, as a blip on its connections would: a false hint.
    pub fn false_hint(&mut self) {
        let live: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].core.is_some())
            .collect();
        if live.len() < 2 {
            return;
        }
        let node = live[self.rng.random_range(0..live.len())];
        let peer = match self.leader() {
            Some(leader) if leader != self.nodes[node].id => leader,
            _ => {
                let others: Vec<NodeId> = live
                    .iter()
                    .map(|&i| self.nodes[i].id)
                    .filter(|&id| id != self.nodes[node].id)
                    .collect();
                others[self.rng.random_range(0..others.len())]
            }
        };
        self.hints_delivered.1 += 1;
        self.step(node, Input::PeerUnreachable { peer });
    }
}
