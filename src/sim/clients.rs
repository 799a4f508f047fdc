//! The simulated clients: invocation, node choice, retries on refusal, deadlines, answers, and
//! the liveness probe.

use bytes::Bytes;
use rand::RngExt;

use crate::LogIndex;
use crate::protocol::Input;
use crate::sim::linearizability::{KvInput, KvOutput, Operation};
use crate::sim::{Action, ClientState, OpMeta, PROBE_KEY, Sim, SimProtocol};
use crate::state_machine::encode_command;

impl<P: SimProtocol> Sim<P> {
    pub(super) fn think_time(&mut self) -> u64 {
        let (low, high) = self.config.think_us;
        self.rng.random_range(low..=high.max(low))
    }

    /// Lets the regular clients start invoking operations.
    pub fn start_clients(&mut self) {
        for client in 0..self.config.clients {
            self.clients[client].active = true;
            let at = self.now_us + self.think_time();
            self.schedule(at, Action::Invoke { client });
        }
    }

    /// Stops the regular clients from invoking new operations (outstanding ones run their course).
    pub fn stop_clients(&mut self) {
        for client in &mut self.clients[..self.config.clients] {
            client.active = false;
        }
    }

    /// True when no regular client has an operation outstanding.
    pub fn clients_quiet(&self) -> bool {
        self.clients[..self.config.clients]
            .iter()
            .all(|c| c.state == ClientState::Idle)
    }

    /// Starts the liveness probe: one client that writes a fresh value to its own key, retrying
    /// every 500 ms, until one write completes.
    pub fn start_probe(&mut self) {
        let probe = self.config.clients;
        self.clients[probe].active = true;
        self.clients[probe].timeout_us = 500_000;
        self.schedule(self.now_us, Action::Invoke { client: probe });
    }

    /// The log index of the probe's completed write, once it completed.
    pub fn probe_index(&self) -> Option<LogIndex> {
        let probe = self.config.clients;
        if self.clients[probe].completed == 0 {
            return None;
        }
        self.history
            .iter()
            .zip(&self.ops)
            .rev()
            .find(|(op, meta)| {
                op.client == probe as u64 && op.response.is_some() && meta.index.is_some()
            })?
            .1
            .index
    }

    pub(super) fn choose_input(&mut self, client: usize) -> KvInput {
        if self.clients[client].probe {
            self.next_value += 1;
            return KvInput::Put {
                key: PROBE_KEY,
                value: self.next_value,
            };
        }
        let key = self.rng.random_range(0..self.config.keys);
        match self.rng.random_range(0..10) {
            0..4 => {
                self.next_value += 1;
                KvInput::Put {
                    key,
                    value: self.next_value,
                }
            }
            4..7 => KvInput::Get { key },
            _ => {
                self.next_value += 1;
                let expected = match self.clients[client].seen.get(&key) {
                    Some(&seen) if self.rng.random_bool(0.8) => seen,
                    _ => None,
                };
                KvInput::Cas {
                    key,
                    expected,
                    new: self.next_value,
                }
            }
        }
    }

    pub(super) fn invoke(&mut self, client: usize) {
        let c = &self.clients[client];
        if !c.active || c.state != ClientState::Idle || (c.probe && c.completed > 0) {
            return;
        }
        let input = self.choose_input(client);
        let op = self.history.len();
        let deadline_us = self.now_us + self.clients[client].timeout_us;
        self.history.push(Operation {
            client: client as u64,
            input,
            call_us: self.now_us,
            response: None,
        });
        self.ops.push(OpMeta {
            // Encoded as the engine encodes a `StateMachine` command.
            data: Bytes::from(encode_command(&input).unwrap_or_default()),
            deadline_us,
            abandoned: false,
            index: None,
        });
        self.schedule(deadline_us, Action::Deadline { client, op });
        let node = self.pick_node(client, None);
        self.attempt(client, op, node);
    }

    pub(super) fn pick_node(&mut self, client: usize, avoid: Option<usize>) -> usize {
        let c = &mut self.clients[client];
        if let Some(hint) = c.hint.take()
            && hint < self.nodes.len()
        {
            return hint;
        }
        if let Some(preferred) = c.preferred
            && Some(preferred) != avoid
            && self.rng.random_bool(0.7)
        {
            return preferred;
        }
        loop {
            let node = self.rng.random_range(0..self.nodes.len());
            if Some(node) != avoid || self.nodes.len() == 1 {
                return node;
            }
        }
    }

    pub(super) fn attempt(&mut self, client: usize, op: usize, node: usize) {
        if self.nodes[node].core.is_none() {
            // Connection refused: a definite refusal.
            self.clients[client].state = ClientState::Backoff { op };
            self.clients[client].preferred = None;
            let at = self.now_us + self.rng.random_range(1_000..10_000);
            self.schedule(at, Action::Retry { client, op });
            return;
        }
        let deadline = self.now_us + self.config.client_timeout_us;
        let read = P::SERVES_READS
            && !self.config.reads_through_log
            && matches!(self.history[op].input, KvInput::Get { .. });
        let apply = &mut self.nodes[node].apply;
        let request_id = if read {
            let command = self.ops[op].data.clone();
            apply.submit_read((client, op), self.now_us, deadline, command)
        } else {
            apply.submit((client, op), self.now_us, deadline)
        };
        self.clients[client].state = ClientState::Waiting {
            op,
            node,
            request_id,
        };
        if read {
            self.step(node, Input::Read { request_id });
        } else {
            let data = P::client_command(&self.ops[op].data, client);
            self.step(node, Input::Propose { request_id, data });
        }
        self.maybe_flush(node);
    }

    pub(super) fn refused(&mut self, client: usize, op: usize, hint: Option<usize>) {
        let ClientState::Waiting {
            op: current, node, ..
        } = self.clients[client].state
        else {
            return;
        };
        if current != op {
            return;
        }
        self.clients[client].state = ClientState::Backoff { op };
        self.clients[client].hint = hint;
        if self.clients[client].preferred == Some(node) {
            self.clients[client].preferred = None;
        }
        let at = self.now_us + self.rng.random_range(1_000..20_000);
        self.schedule(at, Action::Retry { client, op });
    }

    pub(super) fn retry(&mut self, client: usize, op: usize) {
        if self.clients[client].state != (ClientState::Backoff { op }) {
            return;
        }
        if self.now_us >= self.ops[op].deadline_us {
            self.abandon(client, op);
            return;
        }
        let node = self.pick_node(client, None);
        self.attempt(client, op, node);
    }

    pub(super) fn abandon(&mut self, client: usize, op: usize) {
        // Every attempt was refused: the operation never took effect.
        self.ops[op].abandoned = true;
        self.clients[client].state = ClientState::Idle;
        let at = self.now_us + self.think_time();
        self.schedule(at, Action::Invoke { client });
    }

    pub(super) fn deadline(&mut self, client: usize, op: usize) {
        match self.clients[client].state {
            ClientState::Backoff { op: current } if current == op => self.abandon(client, op),
            ClientState::Waiting { op: current, .. } if current == op => {
                // Silence: the operation may still take effect, but nobody will hear of it (the
                // node's apply stage still holds the request until its own deadline).
                self.clients[client].state = ClientState::Idle;
                self.clients[client].preferred = None;
                let at = self.now_us + self.think_time();
                self.schedule(at, Action::Invoke { client });
            }
            _ => {}
        }
    }

    pub(super) fn complete(
        &mut self,
        client: usize,
        op: usize,
        node: usize,
        output: KvOutput,
        index: LogIndex,
    ) {
        self.history[op].response = Some((self.now_us, output));
        self.ops[op].index = Some(index);
        let c = &mut self.clients[client];
        c.completed += 1;
        c.state = ClientState::Idle;
        c.preferred = Some(node);
        let key = self.history[op].input.key();
        match (self.history[op].input, output) {
            (KvInput::Put { value, .. }, _) => {
                c.seen.insert(key, Some(value));
            }
            (KvInput::Get { .. }, KvOutput::Get(value)) => {
                c.seen.insert(key, value);
            }
            (KvInput::Cas { new, .. }, KvOutput::Cas(true)) => {
                c.seen.insert(key, Some(new));
            }
            _ => {}
        }
        let at = self.now_us + self.think_time();
        self.schedule(at, Action::Invoke { client });
    }
}
