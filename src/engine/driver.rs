//! The driver: one OS thread per engine that owns the protocol core, the log store, the state
//! machine and the pending client requests, and carries out the core's [`Output`] in the order
//! its contract demands (persist, then send, then apply).
//!
//! A dedicated thread (not a tokio task) because the log store's fsync blocks, and because a
//! thread woken by a channel answers in microseconds without competing with client tasks.
//! Everything that reaches the core passes through one bounded channel, so inputs are totally
//! ordered and back-pressure is explicit.

use std::any::Any;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{oneshot, watch};

use crate::engine::pending::PendingTable;
use crate::engine::reply::ReplyPoster;
use crate::engine::retained::RetainedState;
use crate::metrics::Metrics;
use crate::protocol::raft::{
    AppliedProposals, Envelope, Event, Input, Message, Output, RaftNode, Role,
};
use crate::state_machine::ErasedStateMachine;
use crate::storage::LogStore;
use crate::transport::Transport;
use crate::types::{LogIndex, NodeId, Payload, Term};

/// What the driver answers a client with.
pub(crate) type Reply = Result<Applied, DriverError>;

/// A committed and applied proposal.
pub(crate) struct Applied {
    pub(crate) index: LogIndex,
    pub(crate) term: Term,
    /// When the driver learned the entry was committed, and when it finished applying it.
    pub(crate) committed_at: Instant,
    pub(crate) applied_at: Instant,
    /// The state machine's response, or why the entry did not decode as its command; `None` when
    /// no state machine is set.
    pub(crate) response: Option<Result<Box<dyn Any + Send>, String>>,
}

/// Why a request got no commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DriverError {
    /// Never appended; will never commit.
    Rejected(String),
    /// Unknown outcome: the deadline passed first.
    TimedOut,
    /// The engine stopped (or failed) before the outcome was known.
    Stopped(String),
}

/// Everything that reaches the driver thread.
pub(crate) enum DriverInput {
    /// A client's proposal. Its deadline counts from when the driver takes it in (one clock
    /// reading per round of inputs), so that a call reads no clock on the client's side.
    Propose {
        data: Bytes,
        reply: oneshot::Sender<Reply>,
        /// Where the answer goes (see [`crate::engine::reply`]).
        route: u32,
    },
    Peer {
        from: NodeId,
        message: Message,
    },
    TransferLeadership {
        to: NodeId,
    },
    Shutdown,
}

/// Who leads, as the driver last saw it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LeaderInfo {
    /// The term this is true in.
    pub term: Term,
    /// The leader, if known.
    pub leader: Option<NodeId>,
    /// Whether this node is that leader.
    pub is_leader: bool,
}

/// Callbacks run on leader changes.
pub(crate) type LeaderCallbacks = Arc<Mutex<Vec<Box<dyn Fn(Option<NodeId>) + Send>>>>;

/// Where peers' messages for this node go in. Cheap to clone; never blocks: when the driver's
/// queue is full the message is dropped, which the protocol tolerates like any network loss.
#[derive(Clone)]
pub struct Inbox {
    pub(crate) sender: SyncSender<DriverInput>,
}

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Inbox")
    }
}

impl Inbox {
    /// Delivers a message from `from`. Returns false if it was dropped (queue full or engine
    /// stopped).
    pub fn deliver(&self, from: NodeId, message: Message) -> bool {
        match self.sender.try_send(DriverInput::Peer { from, message }) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
        }
    }
}

pub(crate) struct Pending {
    reply: oneshot::Sender<Reply>,
    route: u32,
    submitted: Instant,
    deadline: Instant,
}

/// Settings the driver needs beyond the core's.
pub(crate) struct DriverSettings {
    pub(crate) tick: Duration,
    /// How long a proposal may wait for its answer, from when the driver takes it in.
    pub(crate) request_timeout: Duration,
    /// Flush the proposal batch whenever the input queue drains (batch timeout zero).
    pub(crate) flush_on_drain: bool,
    /// Inputs handled between two persists, to bound the latency one busy burst adds.
    pub(crate) max_inputs_per_round: usize,
    /// How long an idle driver polls its queue before it parks. Waking a parked thread costs a
    /// system call on each side and a scheduler round trip (about ten microseconds on a small
    /// virtual machine), and a commit needs about four such hand-offs; a driver that polls
    /// briefly catches the answer it is waiting for without one. Zero parks at once.
    pub(crate) spin: Duration,
}

/// What the driver's wait for work ended with.
enum Wait {
    Input(DriverInput),
    TickDue,
    Disconnected,
}

pub(crate) struct Driver {
    pub(crate) node: RaftNode,
    pub(crate) store: Box<dyn LogStore>,
    pub(crate) transport: Arc<dyn Transport<Message>>,
    pub(crate) state_machine: Option<Box<dyn ErasedStateMachine>>,
    pub(crate) inputs: Receiver<DriverInput>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) leader: watch::Sender<LeaderInfo>,
    pub(crate) leader_callbacks: LeaderCallbacks,
    pub(crate) settings: DriverSettings,
    /// The first request id. Ids start at a random base so that entries proposed before a
    /// restart never match a request made after it.
    pub(crate) first_request_id: u64,
    pub(crate) applied_index: LogIndex,
    pub(crate) applied_proposals: AppliedProposals,
    /// Scratch space for [`Driver::apply_committed`], kept to reuse its allocation.
    pub(crate) answered: Vec<Answer>,
    /// Delivers the answers of applied requests.
    pub(crate) replies: ReplyPoster,
    /// Where an engine without a durable store keeps the node's state between a stop and the
    /// next start (see [`crate::engine::retained`]); `None` with a real store.
    pub(crate) retain: Option<RetainedState>,
}

/// A request whose entry was applied, waiting for its answer: the request, the entry's index and
/// term, and the state machine's response.
pub(crate) type Answer = (
    Pending,
    LogIndex,
    Term,
    Option<Result<Box<dyn Any + Send>, String>>,
);

impl Driver {
    /// Runs until shutdown or a storage failure; the error is what stopped it.
    pub(crate) fn run(mut self) -> Result<(), String> {
        let mut pending = PendingTable::new(self.first_request_id);
        let mut out = Output::default();
        let mut next_tick = Instant::now() + self.settings.tick;
        self.publish_leader();
        loop {
            let first = match self.wait(next_tick) {
                Wait::Input(input) => Some(input),
                Wait::TickDue => None,
                Wait::Disconnected => break,
            };
            // One clock reading per round: requests received in it share their submit time
            // (the round is short; reading the clock per request showed in profiles).
            let now = Instant::now();
            let mut shutdown = false;
            if let Some(input) = first {
                shutdown |= self.handle(input, now, &mut pending, &mut out);
                for _ in 1..self.settings.max_inputs_per_round {
                    match self.inputs.try_recv() {
                        Ok(input) => shutdown |= self.handle(input, now, &mut pending, &mut out),
                        Err(_) => break,
                    }
                }
            }
            if now >= next_tick {
                self.node.step(Input::Tick, &mut out);
                next_tick = now + self.settings.tick;
                expire(&mut pending, now);
            }
            if self.settings.flush_on_drain {
                self.node.step(Input::FlushProposals, &mut out);
            }
            if let Err(error) = self.carry_out(&mut out, &mut pending) {
                let reason = format!("log store failed: {error}");
                tracing::error!(node = %self.node.id(), %reason, "engine stopping");
                fail_all(&mut pending, &reason);
                return Err(reason);
            }
            if shutdown {
                break;
            }
        }
        fail_all(&mut pending, "engine stopped");
        // Every output was carried out before the loop ended, so the core's state is what a
        // durable store would now hold.
        if let Some(retain) = self.retain {
            retain.keep(self.node.into_recovered_state());
        }
        Ok(())
    }

    /// The next input, or why there is none: the tick is due, or every sender is gone. Polls
    /// for [`DriverSettings::spin`] before parking (see there why), yielding the processor
    /// between polls so that the threads it waits for (on a machine with few cores they may
    /// share its core) run first.
    fn wait(&self, next_tick: Instant) -> Wait {
        if !self.settings.spin.is_zero() {
            let spin_until = Instant::now() + self.settings.spin;
            loop {
                match self.inputs.try_recv() {
                    Ok(input) => return Wait::Input(input),
                    Err(TryRecvError::Disconnected) => return Wait::Disconnected,
                    Err(TryRecvError::Empty) => {}
                }
                let now = Instant::now();
                if now >= next_tick {
                    return Wait::TickDue;
                }
                if now >= spin_until {
                    break;
                }
                std::thread::yield_now();
            }
        }
        let wait = next_tick.saturating_duration_since(Instant::now());
        match self.inputs.recv_timeout(wait) {
            Ok(input) => Wait::Input(input),
            Err(RecvTimeoutError::Timeout) => Wait::TickDue,
            Err(RecvTimeoutError::Disconnected) => Wait::Disconnected,
        }
    }

    /// Feeds one input, received at `now`, to the core; true on shutdown.
    fn handle(
        &mut self,
        input: DriverInput,
        now: Instant,
        pending: &mut PendingTable<Pending>,
        out: &mut Output,
    ) -> bool {
        match input {
            DriverInput::Propose { data, reply, route } => {
                let request_id = pending.push(Pending {
                    reply,
                    route,
                    submitted: now,
                    deadline: now + self.settings.request_timeout,
                });
                self.node.step(Input::Propose { request_id, data }, out);
            }
            DriverInput::Peer { from, message } => {
                let envelope = Envelope {
                    from,
                    to: self.node.id(),
                    message,
                };
                self.node.step(Input::Message(envelope), out);
            }
            DriverInput::TransferLeadership { to } => {
                self.node.step(Input::TransferLeadership { to }, out);
            }
            DriverInput::Shutdown => return true,
        }
        false
    }

    /// The core's contract: persist, then send, then apply.
    fn carry_out(
        &mut self,
        out: &mut Output,
        pending: &mut PendingTable<Pending>,
    ) -> Result<(), crate::error::StorageError> {
        self.store.persist(out)?;
        for envelope in out.messages.drain(..) {
            self.transport.send(envelope.to, envelope.message);
        }
        if !out.committed.is_empty() {
            self.apply_committed(out, pending);
        }
        for rejection in out.rejected.drain(..) {
            if let Some(request) = pending.remove(rejection.request_id) {
                self.metrics.record_rejection();
                let _ = request
                    .reply
                    .send(Err(DriverError::Rejected(rejection.reason.to_string())));
            }
        }
        let leader_changed = out
            .events
            .iter()
            .any(|e| matches!(e, Event::LeaderChanged { .. }));
        out.clear();
        self.metrics.set_term(self.node.term());
        self.metrics.set_committed_index(self.node.commit_index());
        if leader_changed {
            self.metrics.record_leader_change();
            self.publish_leader();
        }
        Ok(())
    }

    /// Applies the newly committed entries and answers their proposers on this node. The
    /// answers go out after the whole batch is applied, all stamped with one clock reading:
    /// the state machine has finished with each of them by then.
    fn apply_committed(&mut self, out: &mut Output, pending: &mut PendingTable<Pending>) {
        let me = self.node.id();
        let committed_at = Instant::now();
        let mut answered = std::mem::take(&mut self.answered);
        for entry in out.committed.drain(..) {
            self.applied_index = entry.index;
            let Payload::Command { tag, data } = entry.payload else {
                continue;
            };
            if !self.applied_proposals.first_application(tag) {
                continue; // a duplicate of a proposal applied (and answered) before
            }
            let response = self.state_machine.as_mut().map(|sm| sm.apply_bytes(&data));
            if tag.proposer != me {
                continue;
            }
            if let Some(request) = pending.remove(tag.request_id) {
                answered.push((request, entry.index, entry.term, response));
            }
        }
        let applied_at = Instant::now();
        // Requests received in one round share their submit time, hence their latency: one
        // subtraction and one metrics update per run of such requests, not per request. The
        // metrics go first, so that a client reading them after its answer sees its commit.
        let mut run: Option<(Instant, u64)> = None;
        for (request, ..) in &answered {
            match &mut run {
                Some((submitted, count)) if *submitted == request.submitted => *count += 1,
                _ => {
                    if let Some((submitted, count)) = run {
                        let latency = applied_at.saturating_duration_since(submitted);
                        self.metrics.record_commits(latency, count);
                    }
                    run = Some((request.submitted, 1));
                }
            }
        }
        if let Some((submitted, count)) = run {
            let latency = applied_at.saturating_duration_since(submitted);
            self.metrics.record_commits(latency, count);
        }
        let deliveries = answered.drain(..).map(|(request, index, term, response)| {
            let applied = Applied {
                index,
                term,
                committed_at,
                applied_at,
                response,
            };
            (request.route, (request.reply, Ok(applied)))
        });
        self.replies.post(deliveries);
        self.answered = answered;
        self.metrics.set_applied_index(self.applied_index);
    }

    fn publish_leader(&self) {
        let info = LeaderInfo {
            term: self.node.term(),
            leader: self.node.leader(),
            is_leader: self.node.role() == Role::Leader,
        };
        self.leader.send_replace(info);
        if let Ok(callbacks) = self.leader_callbacks.lock() {
            for callback in callbacks.iter() {
                callback(info.leader);
            }
        }
    }
}

/// Answers requests whose deadline passed (outcome unknown). Deadlines grow with the request id
/// (one timeout, counted from a clock that does not go back), so only the front of the table is
/// looked at: scanning every waiting request each tick pulled each reply channel across cores.
/// A request whose caller gave up stays until it is answered or expires, like any other.
fn expire(pending: &mut PendingTable<Pending>, now: Instant) {
    pending.expire_front(
        |r| r.deadline <= now,
        |request| {
            let _ = request.reply.send(Err(DriverError::TimedOut));
        },
    );
}

fn fail_all(pending: &mut PendingTable<Pending>, reason: &str) {
    for request in pending.drain() {
        let _ = request
            .reply
            .send(Err(DriverError::Stopped(reason.to_string())));
    }
}
