//! The driver: one OS thread per engine that owns the protocol core, the log store, the state
//! machine and the pending client requests (the apply stage), and carries out the core's
//! [`Output`] in the order the protocol contract demands.
//!
//! A dedicated thread (not a task of the caller's runtime) because the log store's fsync blocks,
//! and because a thread woken by a channel answers in microseconds without competing with client
//! tasks. Everything that reaches the core passes through one bounded channel, so inputs are
//! totally ordered and back-pressure is explicit.
//!
//! The thread runs a single-threaded tokio runtime of its own (see [`start_thread`]), and the
//! engine's TCP transport runs on that runtime too: its sockets, tarpc's tasks, and the
//! delivery of inbound messages, which the task that read them queues for the driver. So a
//! message travels between the driver and its sockets without a cross-thread wake-up: measured
//! with `examples/latency_budget.rs`, the hand-offs between the driver's thread and transport
//! tasks on the caller's runtime were about half of a commit's time (`benches/LATENCY_NOTES.md`).
//! The driver yields to the transport's tasks while it polls for input. A store that waits for
//! the disk writes on a blocking thread while the driver goes on with its inputs (see
//! [`Driver::carry_out`]): acknowledgements, commits and reads do not wait for this node's
//! fsync, and each fsync covers what arrived during the one before.

use std::sync::atomic::{AtomicBool, Ordering, fence};
use std::sync::mpsc::{Receiver, SendError, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{Notify, oneshot, watch};

use crate::engine::apply::{Answer, ApplyStage, Response, Unanswered};
use crate::engine::election_traces::ElectionTraces;
use crate::engine::precise_timer::PreciseTimer;
use crate::engine::reply::ReplyPoster;
use crate::engine::retained::RetainedState;
use crate::engine::snapshots::{SnapshotSpans, SnapshotTaker};
use crate::engine::traces::ProposalTraces;
use crate::error::StorageError;
use crate::metrics::Metrics;
use crate::protocol::{Durability, Envelope, Event, Input, Output, Protocol};
use crate::storage::{LogStore, Snapshot};
use crate::sync::lock;
use crate::telemetry::TraceAttachment;
use crate::telemetry::latency_probe::{self, Hop};
use crate::transport::Transport;
use crate::types::{LogIndex, NodeId, ProposalTag, Term};

/// What the driver answers a client with.
pub(crate) type Reply = Result<Applied, Unanswered>;

/// A committed and applied proposal.
pub(crate) struct Applied {
    pub(crate) index: LogIndex,
    pub(crate) term: Term,
    /// When the driver learned the entry was committed, and when it finished applying it.
    pub(crate) committed_at: Instant,
    pub(crate) applied_at: Instant,
    /// The state machine's response.
    pub(crate) response: Response,
}

/// Where one answer goes: the caller's reply channel and its dispatcher route.
pub(crate) type ReplyTo = (oneshot::Sender<Reply>, u32);

/// Everything that reaches the driver thread of a core `P`.
pub(crate) enum DriverInput<P: Protocol> {
    /// A client's proposal. Its deadline counts from when the driver takes it in (one clock
    /// reading per round of inputs), so that a call reads no clock on the client's side.
    Propose {
        data: Bytes,
        reply: oneshot::Sender<Reply>,
        /// Where the answer goes (see [`crate::engine::reply`]).
        route: u32,
        /// The proposal's span, when it is traced (see [`crate::telemetry`]).
        trace: Option<Box<tracing::Span>>,
    },
    /// A client's linearizable read of a read-only command (see [`crate::protocol::ReadState`]);
    /// ordered through the log like a proposal when the core serves no reads.
    Read {
        command: Bytes,
        reply: oneshot::Sender<Reply>,
        route: u32,
    },
    Peer {
        from: NodeId,
        message: P::Message,
    },
    /// A peer's message that carries a traced proposal, with its trace context. Boxed (and
    /// rare), so that the common inputs stay as small as they were without tracing.
    TracedPeer(Box<(NodeId, P::Message, TraceAttachment)>),
    Control(P::Control),
    /// A membership change; answered once the membership it makes is committed, or refused.
    ChangeMembership {
        change: crate::membership::MembershipChange,
        reply: oneshot::Sender<MembershipAnswer>,
    },
    /// The transport's hint that every connection to this peer broke.
    PeerUnreachable(NodeId),
    Shutdown,
}

/// The answer to a membership change: the membership it made, once committed.
pub(crate) type MembershipAnswer =
    std::result::Result<crate::membership::Membership, crate::membership::MembershipError>;

/// A client's request on its way to the driver: the same for every core, turned into the
/// driver input of the one running ([`ClientRequest::into_input`]).
pub(crate) enum ClientRequest {
    /// See [`DriverInput::Propose`].
    Propose {
        data: Bytes,
        reply: oneshot::Sender<Reply>,
        route: u32,
        trace: Option<Box<tracing::Span>>,
    },
    /// See [`DriverInput::Read`].
    Read {
        command: Bytes,
        reply: oneshot::Sender<Reply>,
        route: u32,
    },
}

impl ClientRequest {
    /// The driver input of a core `P` that carries this request.
    pub(crate) fn into_input<P: Protocol>(self) -> DriverInput<P> {
        match self {
            ClientRequest::Propose {
                data,
                reply,
                route,
                trace,
            } => DriverInput::Propose {
                data,
                reply,
                route,
                trace,
            },
            ClientRequest::Read {
                command,
                reply,
                route,
            } => DriverInput::Read {
                command,
                reply,
                route,
            },
        }
    }
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

/// What wakes a driver that waits for input on its runtime. A sender rings only while the
/// driver says it waits: a busy driver (thousands of clients) costs its senders one shared read,
/// not a write to a contended cache line each.
#[derive(Default)]
struct Doorbell {
    notify: Notify,
    waiting: AtomicBool,
}

impl Doorbell {
    /// Called after queueing an input.
    fn ring(&self) {
        // Pairs with the fence in `Driver::wait`: either the driver sees the input queued, or
        // this sees it waiting.
        fence(Ordering::SeqCst);
        if self.waiting.load(Ordering::Relaxed) && self.waiting.swap(false, Ordering::AcqRel) {
            self.notify.notify_one();
        }
    }
}

/// The sending half of a driver's input queue: a bounded channel, and the doorbell that wakes
/// the driver when it waits on its runtime.
pub(crate) struct DriverSender<P: Protocol> {
    queue: SyncSender<DriverInput<P>>,
    doorbell: Arc<Doorbell>,
}

impl<P: Protocol> Clone for DriverSender<P> {
    fn clone(&self) -> Self {
        DriverSender {
            queue: self.queue.clone(),
            doorbell: self.doorbell.clone(),
        }
    }
}

impl<P: Protocol> DriverSender<P> {
    /// Queues `input` unless the queue is full or the driver is gone.
    pub(crate) fn try_send(
        &self,
        input: DriverInput<P>,
    ) -> std::result::Result<(), TrySendError<DriverInput<P>>> {
        self.queue.try_send(input)?;
        self.doorbell.ring();
        Ok(())
    }

    /// Queues `input`, waiting for room.
    pub(crate) fn send(
        &self,
        input: DriverInput<P>,
    ) -> std::result::Result<(), SendError<DriverInput<P>>> {
        self.queue.send(input)?;
        self.doorbell.ring();
        Ok(())
    }
}

/// The receiving half of a driver's input queue (see [`DriverSender`]).
pub(crate) struct DriverReceiver<P: Protocol> {
    queue: Receiver<DriverInput<P>>,
    doorbell: Arc<Doorbell>,
}

/// A driver's input queue of `capacity` inputs.
pub(crate) fn input_queue<P: Protocol>(capacity: usize) -> (DriverSender<P>, DriverReceiver<P>) {
    let (queue, receiver) = std::sync::mpsc::sync_channel(capacity);
    let doorbell = Arc::new(Doorbell::default());
    (
        DriverSender {
            queue,
            doorbell: doorbell.clone(),
        },
        DriverReceiver {
            queue: receiver,
            doorbell,
        },
    )
}

/// Where peers' messages for this node go in. Cheap to clone; never blocks: when the driver's
/// queue is full the message is dropped, which the protocol tolerates like any network loss.
pub struct Inbox<P: Protocol> {
    pub(crate) sender: DriverSender<P>,
}

impl<P: Protocol> Clone for Inbox<P> {
    fn clone(&self) -> Self {
        Inbox {
            sender: self.sender.clone(),
        }
    }
}

impl<P: Protocol> std::fmt::Debug for Inbox<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Inbox")
    }
}

impl<P: Protocol> Inbox<P> {
    /// Delivers a message from `from`. Returns false if it was dropped (queue full or engine
    /// stopped).
    pub fn deliver(&self, from: NodeId, message: P::Message) -> bool {
        self.deliver_traced(from, message, None)
    }

    /// [`Inbox::deliver`], with the trace attachment that came with the message.
    pub fn deliver_traced(
        &self,
        from: NodeId,
        message: P::Message,
        trace: Option<Box<TraceAttachment>>,
    ) -> bool {
        let input = match trace {
            None => DriverInput::Peer { from, message },
            Some(trace) => DriverInput::TracedPeer(Box::new((from, message, *trace))),
        };
        match self.sender.try_send(input) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
        }
    }

    /// Passes on the transport's hint that every connection to `peer` broke (see
    /// [`Input::PeerUnreachable`]). Returns false if it was dropped, as a message would be.
    pub fn peer_unreachable(&self, peer: NodeId) -> bool {
        self.sender
            .try_send(DriverInput::PeerUnreachable(peer))
            .is_ok()
    }
}

/// A driver's thread, started before its driver is built so that the TCP transport can start
/// on its runtime.
pub(crate) struct DriverThread<P: Protocol> {
    /// The thread's runtime.
    pub(crate) runtime: tokio::runtime::Handle,
    /// Where the driver goes once built; dropped unsent if the start fails.
    pub(crate) driver: oneshot::Sender<Driver<P>>,
    /// Dropped once the transport's tasks have shut down: the thread then ends.
    pub(crate) release: oneshot::Sender<()>,
    pub(crate) thread: std::thread::JoinHandle<Result<(), StorageError>>,
}

/// Starts a driver's thread: a single-threaded runtime, built, run and dropped on the thread
/// (a runtime must not be dropped inside another runtime's task), that runs the driver once it
/// is sent, and the transport's tasks until released. The driver runs as a task of that
/// runtime rather than as its main future: a message the transport's tasks queue then wakes it
/// with a push on the runtime's own queue, where waking the main future costs a system call.
pub(crate) async fn start_thread<P: Protocol>(
    name: String,
    with_io: bool,
    storage_failed: watch::Sender<bool>,
) -> std::io::Result<DriverThread<P>>
where
    Driver<P>: Send,
{
    let (driver_tx, driver_rx) = oneshot::channel::<Driver<P>>();
    let (release, released) = oneshot::channel::<()>();
    let (runtime_tx, runtime_rx) = oneshot::channel();
    let thread = std::thread::Builder::new().name(name).spawn(move || {
        let mut builder = tokio::runtime::Builder::new_current_thread();
        builder.enable_time();
        if with_io {
            builder.enable_io();
        }
        let runtime = match builder.build() {
            Ok(runtime) => runtime,
            Err(error) => {
                let _ = runtime_tx.send(Err(error));
                return Ok(());
            }
        };
        let _ = runtime_tx.send(Ok(runtime.handle().clone()));
        runtime.block_on(async move {
            let result = match driver_rx.await {
                Ok(driver) => match tokio::spawn(driver.run()).await {
                    Ok(result) => result,
                    Err(error) => match error.try_into_panic() {
                        Ok(panic) => std::panic::resume_unwind(panic),
                        Err(_) => Ok(()), // cancelled: the runtime is going away
                    },
                },
                Err(_) => Ok(()), // the start failed
            };
            if let Err(error) = &result {
                // Never retried: the caller learns of it and stops the node.
                tracing::error!(%error, "the driver stopped: the store failed");
                storage_failed.send_replace(true);
            }
            // The transport's tasks run here until the engine has shut them down.
            let _ = released.await;
            result
        })
    })?;
    let runtime = runtime_rx
        .await
        .map_err(|_| std::io::Error::other("the thread ended before its runtime started"))??;
    Ok(DriverThread {
        runtime,
        driver: driver_tx,
        release,
        thread,
    })
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
    /// Whether the transport's tasks run on the driver's runtime (TCP): the driver then yields
    /// to them while it polls and before an fsync, instead of yielding its thread.
    pub(crate) io_on_this_thread: bool,
    /// Whether the driver's runtime has an I/O reactor (TCP, or a linger to time): a linger is
    /// then timed to the microsecond (see [`PreciseTimer`]).
    pub(crate) reactor_on_this_thread: bool,
    /// Under lease reads, a driver that woke late (a stalled thread, a long fsync) steps the
    /// ticks it missed, up to this many, before it handles the round's inputs: a leader's lease
    /// is counted in its ticks and must not outlast real time. `None` steps one tick however
    /// late (a stall then does not count toward anyone's timeouts), as without leases.
    pub(crate) catch_up_ticks: Option<u32>,
    /// How long a write may be in flight before the driver stops and waits for it (see
    /// [`Driver::wait`]): the shortest time without word from a leader (or primary) before
    /// the others replace it.
    pub(crate) write_stall: Duration,
    /// How long a leader keeps gathering proposals after a write of several entries (see
    /// [`ConsensusConfig::leader_linger`](crate::ConsensusConfig::leader_linger)); zero for
    /// PBFT.
    pub(crate) linger: Duration,
    /// How the linger scales with the write before it (see
    /// [`ConsensusConfig::leader_linger_per_entry`](crate::ConsensusConfig::leader_linger_per_entry)).
    pub(crate) linger_per_entry: Option<Duration>,
}

/// How long a leader gathers proposals after a write of `entries` entries: nothing after a
/// lone client's write (one entry), else `linger`, scaled to the write by `per_entry` when
/// that is set.
fn linger_after(linger: Duration, per_entry: Option<Duration>, entries: usize) -> Duration {
    if entries < 2 {
        return Duration::ZERO;
    }
    match per_entry {
        Some(per_entry) => {
            let entries = u32::try_from(entries).unwrap_or(u32::MAX);
            per_entry.saturating_mul(entries).min(linger)
        }
        None => linger,
    }
}

/// When an idle driver wakes without an input: at the next tick, or earlier when a leader's
/// linger ends first.
#[derive(Clone, Copy)]
enum WakeBy {
    Tick(Instant),
    LingerEnds(Instant),
}

impl WakeBy {
    fn at(self) -> Instant {
        match self {
            WakeBy::Tick(at) | WakeBy::LingerEnds(at) => at,
        }
    }

    /// Sleeps until then: a tick on tokio's millisecond timer (ticks are tens of
    /// milliseconds), a linger on `linger_timer` (it is a fraction of an fsync).
    async fn sleep(self, linger_timer: &mut PreciseTimer) {
        match self {
            WakeBy::Tick(at) => tokio::time::sleep_until(at.into()).await,
            WakeBy::LingerEnds(at) => linger_timer.sleep_until(at).await,
        }
    }
}

/// What the driver's wait for work ended with.
enum Wait<P: Protocol> {
    Input(DriverInput<P>),
    TickDue,
    /// The write in flight finished (see [`InFlight`]).
    Persisted(Box<PersistJoin>),
    Disconnected,
}

/// What the blocking thread hands back: the write (to reuse, and to read what it covered) and
/// how it went.
type PersistOutcome = (crate::storage::LogWrite, Result<(), StorageError>);
type PersistJoin = std::result::Result<PersistOutcome, tokio::task::JoinError>;

/// A write on the blocking thread, with the rest of the output it came in (its messages
/// already sent), which waits for it: acknowledgements and votes, the committed entries it
/// holds, the events and the answers.
pub(crate) struct InFlight<M> {
    output: Output<M>,
    started: Instant,
    handle: tokio::task::JoinHandle<PersistOutcome>,
}

pub(crate) struct Driver<P: Protocol> {
    pub(crate) node: P,
    /// Shared with the blocking thread that persists when the store waits for the disk (see
    /// [`Driver::carry_out`]); only one of them holds it at a time.
    pub(crate) store: Arc<Mutex<Box<dyn LogStore>>>,
    /// Whether persists go to a blocking thread: the store waits for the disk and the
    /// transport's tasks run on this thread.
    pub(crate) persist_beside: bool,
    /// The write on the blocking thread while the driver goes on (only with
    /// [`Driver::persist_beside`]; see [`Driver::carry_out`]).
    pub(crate) in_flight: Option<InFlight<P::Message>>,
    /// An emptied output kept to reuse its allocations for the next write in flight.
    pub(crate) spare_output: Output<P::Message>,
    /// Until when a leader keeps its proposals after its last write (see
    /// [`DriverSettings::linger`]).
    pub(crate) linger_until: Option<Instant>,
    pub(crate) transport: Arc<dyn Transport<P::Message>>,
    pub(crate) inputs: DriverReceiver<P>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) leader: watch::Sender<LeaderInfo>,
    pub(crate) leader_callbacks: LeaderCallbacks,
    /// Detections, excluded replicas, detectors and callbacks (see [`crate::byzantine`]).
    pub(crate) byzantine: crate::byzantine::SharedByzantine,
    pub(crate) settings: DriverSettings,
    /// Pending requests, dedup and the state machine: the stage the simulator runs too.
    pub(crate) apply: ApplyStage<ReplyTo, Instant>,
    /// Scratch space for the apply stage's answers, kept to reuse its allocation.
    pub(crate) answers: Vec<Answer<ReplyTo, Instant>>,
    /// Delivers the answers of applied requests.
    pub(crate) replies: ReplyPoster,
    /// Where an engine without a durable store keeps the node's state between a stop and the
    /// next start (see [`crate::engine::retained`]); `None` with a real store.
    pub(crate) retain: Option<RetainedState>,
    /// The core's dropped-message counts already added to the metrics.
    pub(crate) invalid_seen: crate::protocol::InvalidCounts,
    /// The last log index the store holds durably (what it recovered, then what each persist
    /// appended, less what a persist truncated).
    pub(crate) persisted_through: LogIndex,
    /// The traced proposals this node follows (see [`crate::telemetry`]).
    pub(crate) traces: ProposalTraces,
    /// The spans of the election under way, if any.
    pub(crate) elections: ElectionTraces,
    /// When the next snapshot is due, and the one being serialized (see
    /// [`crate::engine::snapshots`]).
    pub(crate) snapshots: SnapshotTaker,
    /// The spans of the snapshot being taken and of transfers under way.
    pub(crate) snapshot_spans: SnapshotSpans,
    /// The membership in force, for [`crate::ConsensusEngine::membership`].
    pub(crate) membership: Arc<Mutex<Option<crate::membership::Membership>>>,
    /// Callers of membership changes, started here or forwarded to the leader.
    pub(crate) membership_calls: crate::engine::membership_calls::MembershipCalls,
    /// Set while a committed membership leaves this node out (see
    /// [`crate::ConsensusEngine::removed`]).
    pub(crate) removed: tokio::sync::watch::Sender<Option<LogIndex>>,
    /// Removed members the transport forgets once they had time to hear of it.
    pub(crate) retired_routes: crate::engine::retired_routes::RetiredRoutes,
}

impl<P: Protocol> Driver<P> {
    /// Runs until shutdown or a storage failure; the error is what stopped it.
    pub(crate) async fn run(mut self) -> Result<(), StorageError> {
        let mut out = Output::default();
        // A round's peer messages, authenticated together before any is stepped.
        let mut peer_messages: Vec<Envelope<P::Message>> = Vec::new();
        let mut next_tick = Instant::now() + self.settings.tick;
        // Lingers are fractions of an fsync: tokio's millisecond timer would stretch them.
        let mut linger_timer = PreciseTimer::new(self.settings.reactor_on_this_thread);
        self.publish_leader();
        loop {
            // A leader's linger ends a wait early, so that its round then goes out.
            let wake_by = match self.linger_until {
                Some(until) if until < next_tick => WakeBy::LingerEnds(until),
                _ => WakeBy::Tick(next_tick),
            };
            let first = match self.wait(wake_by, &mut linger_timer).await {
                Wait::Input(input) => Some(input),
                Wait::TickDue => None,
                Wait::Persisted(joined) => {
                    // What waited for the write goes on, and the next write starts; after a
                    // stall (see `wait`), once the ticks it missed are stepped.
                    if let Some(limit) = self.settings.catch_up_ticks {
                        next_tick = self.catch_up(Instant::now(), next_tick, limit, &mut out);
                    }
                    if let Err(error) = self.complete_persist(*joined, &mut out).await {
                        return Err(self.store_failed(error));
                    }
                    continue;
                }
                Wait::Disconnected => break,
            };
            // One clock reading per round: requests received in it share their submit time
            // (the round is short; reading the clock per request showed in profiles).
            let now = Instant::now();
            let mut shutdown = false;
            if let Some(limit) = self.settings.catch_up_ticks {
                next_tick = self.catch_up(now, next_tick, limit, &mut out);
            }
            if let Some(input) = first {
                shutdown |= self.handle(input, now, &mut out, &mut peer_messages);
                for _ in 1..self.settings.max_inputs_per_round {
                    match self.inputs.queue.try_recv() {
                        Ok(input) => {
                            shutdown |= self.handle(input, now, &mut out, &mut peer_messages)
                        }
                        Err(_) => break,
                    }
                }
            }
            self.step_peer_round(&mut peer_messages, &mut out);
            if now >= next_tick {
                self.node.step(Input::Tick, &mut out);
                for id in self.retired_routes.take_due(now) {
                    self.transport.remove_member(id);
                }
                // On the cadence, unless a whole tick was missed: the runtime's timer wakes the
                // driver up to a millisecond late, which must not slow the ticks down.
                next_tick = if now < next_tick + self.settings.tick {
                    next_tick + self.settings.tick
                } else {
                    now + self.settings.tick
                };
                self.apply.expire(now, &mut self.answers);
                if !self.traces.is_empty() {
                    self.traces.expire(now, self.settings.request_timeout);
                }
                // Once a tick is often enough for a gauge, and keeps it off the hot path.
                self.metrics
                    .set_replication_lag(&self.node.replication_lag());
            }
            if self.settings.flush_on_drain && !self.holds_proposals() {
                self.node.step(Input::FlushProposals, &mut out);
            }
            self.take_finished_snapshot(&mut out);
            // While a write is in flight, `out` gathers the rounds' outputs for the next one.
            let carried = if self.in_flight.is_some() {
                self.meanwhile(&mut out);
                Ok(())
            } else {
                self.carry_out(&mut out).await
            };
            if let Err(error) = carried {
                return Err(self.store_failed(error));
            }
            if P::COMPACTS_LOG && self.snapshots.due(self.apply.applied_index()) {
                self.start_snapshot();
            }
            if shutdown {
                break;
            }
        }
        // What was asked for is written before the engine stops (a write left half done is
        // safe, but a finished one leaves the store where the core's state says).
        while let Some(in_flight) = &mut self.in_flight {
            let joined = (&mut in_flight.handle).await;
            if let Err(error) = self.complete_persist(joined, &mut out).await {
                return Err(self.store_failed(error));
            }
        }
        self.fail_all("engine stopped");
        // Every output was carried out before the loop ended, so the core's state is what a
        // durable store would now hold.
        if let Some(retain) = self.retain {
            retain.keep(self.node.into_recovered_state());
        }
        Ok(())
    }

    /// Steps the whole ticks missed before `now` (all but the one due now, which the round steps
    /// after its inputs as usual), at most `limit`; returns when the next tick is due.
    fn catch_up(
        &mut self,
        now: Instant,
        next_tick: Instant,
        limit: u32,
        out: &mut Output<P::Message>,
    ) -> Instant {
        let tick = self.settings.tick;
        let mut next_tick = next_tick;
        let mut stepped = 0;
        while now >= next_tick + tick && stepped < limit {
            self.node.step(Input::Tick, out);
            next_tick += tick;
            stepped += 1;
        }
        if now >= next_tick + tick {
            next_tick = now; // past the limit: the rest is forgotten, the due tick runs now
        }
        next_tick
    }

    /// The next input, or why there is none: the tick is due, or every sender is gone (seen
    /// at the next tick). Polls for [`DriverSettings::spin`] before parking (see there why),
    /// yielding between polls so that what it waits for runs first: the transport's tasks on
    /// this runtime, or the threads that may share its core on a machine with few cores.
    async fn wait(&mut self, wake_by: WakeBy, linger_timer: &mut PreciseTimer) -> Wait<P> {
        let next_tick = wake_by.at();
        // A write in flight this long is a disk that stalls: the driver then waits for it and
        // does nothing else, as a node whose disk hangs must. A leader's heartbeats stop, and
        // the others elect a leader whose disk works rather than follow one that can commit
        // nothing of its own; its ticks are caught up once the write is done (see
        // `catch_up_ticks`), so that a lease it held is not stretched by the stall.
        let stall = self.settings.write_stall;
        if let Some(in_flight) = &mut self.in_flight
            && in_flight.started.elapsed() >= stall
        {
            return Wait::Persisted(Box::new((&mut in_flight.handle).await));
        }
        // Not while a write is in flight: its completion wakes the driver anyway, and polling
        // then takes the cores from the other work a round needs (measured: PUT through every
        // node of `kv_vs_etcd` gained from parking, a leader's PUTs lost from polling).
        if !self.settings.spin.is_zero() && self.in_flight.is_none() {
            let spin_until = Instant::now() + self.settings.spin;
            loop {
                match self.inputs.queue.try_recv() {
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
                if self.settings.io_on_this_thread {
                    tokio::task::yield_now().await;
                }
            }
        }
        let doorbell = &*self.inputs.doorbell;
        loop {
            // Listening, and saying so, before looking: an input queued in between still rings.
            let rung = doorbell.notify.notified();
            tokio::pin!(rung);
            rung.as_mut().enable();
            doorbell.waiting.store(true, Ordering::Relaxed);
            fence(Ordering::SeqCst);
            let in_flight = &mut self.in_flight;
            let persisted = async move {
                match in_flight {
                    Some(in_flight) => (&mut in_flight.handle).await,
                    None => std::future::pending().await,
                }
            };
            let wait = match self.inputs.queue.try_recv() {
                Ok(input) => Some(Wait::Input(input)),
                Err(TryRecvError::Disconnected) => Some(Wait::Disconnected),
                Err(TryRecvError::Empty) if Instant::now() >= next_tick => Some(Wait::TickDue),
                Err(TryRecvError::Empty) => tokio::select! {
                    biased;
                    () = &mut rung => None, // the ringer cleared `waiting`
                    joined = persisted => Some(Wait::Persisted(Box::new(joined))),
                    () = wake_by.sleep(linger_timer) => Some(Wait::TickDue),
                },
            };
            if let Some(wait) = wait {
                doorbell.waiting.store(false, Ordering::Relaxed);
                return wait;
            }
        }
    }

    /// Authenticates and steps the peer messages gathered so far, as one round.
    fn step_peer_round(
        &mut self,
        peer_messages: &mut Vec<Envelope<P::Message>>,
        out: &mut Output<P::Message>,
    ) {
        if peer_messages.is_empty() {
            return;
        }
        // A signing core checks the round's signatures in one batch, then counts its votes in
        // one aggregator batch as it steps the round: both are timed.
        let checking = Instant::now();
        self.node.authenticate(peer_messages);
        self.node.step_round(peer_messages, out);
        if P::AUTHENTICATES {
            self.metrics.record_vote_processing(checking.elapsed());
        }
        let invalid = self.node.invalid_messages();
        for (reason, count) in invalid.since(&self.invalid_seen) {
            self.metrics.record_invalid_messages(reason, count);
        }
        self.invalid_seen = invalid;
    }

    /// Feeds one input, received at `now`, to the core (a peer message goes to `peer_messages`
    /// instead, to be authenticated with the rest of the round's); true on shutdown.
    fn handle(
        &mut self,
        input: DriverInput<P>,
        now: Instant,
        out: &mut Output<P::Message>,
        peer_messages: &mut Vec<Envelope<P::Message>>,
    ) -> bool {
        match input {
            DriverInput::Propose {
                data,
                reply,
                route,
                trace,
            } => {
                latency_probe::stamp(Hop::Proposed, self.node.id());
                let deadline = now + self.settings.request_timeout;
                let request_id = self.apply.submit((reply, route), now, deadline);
                if let Some(span) = trace {
                    let tag = ProposalTag {
                        proposer: self.node.id(),
                        request_id,
                    };
                    self.traces.proposed(tag, *span, now);
                }
                self.node.step(Input::Propose { request_id, data }, out);
            }
            DriverInput::Read {
                command,
                reply,
                route,
            } => {
                let deadline = now + self.settings.request_timeout;
                if P::SERVES_READS {
                    let request_id = self
                        .apply
                        .submit_read((reply, route), now, deadline, command);
                    self.node.step(Input::Read { request_id }, out);
                } else {
                    let request_id = self.apply.submit((reply, route), now, deadline);
                    let data = command;
                    self.node.step(Input::Propose { request_id, data }, out);
                }
            }
            DriverInput::Peer { from, message } => {
                latency_probe::stamp(Hop::DriverTook, self.node.id());
                peer_messages.push(Envelope {
                    from,
                    to: self.node.id(),
                    message,
                });
            }
            DriverInput::TracedPeer(traced) => {
                let (from, message, attachment) = *traced;
                self.traces.received::<P>(from, &message, &attachment, now);
                peer_messages.push(Envelope {
                    from,
                    to: self.node.id(),
                    message,
                })
            }
            DriverInput::Control(control) => self.node.step(Input::Control(control), out),
            DriverInput::ChangeMembership { change, reply } => {
                self.change_membership(change, reply, out)
            }
            DriverInput::PeerUnreachable(peer) => {
                // After the messages that arrived before it: a leader's last heartbeat must not
                // cancel the hint that its connections broke after it.
                self.step_peer_round(peer_messages, out);
                self.node.step(Input::PeerUnreachable { peer }, out);
            }
            DriverInput::Shutdown => return true,
        }
        false
    }

    /// The core's contract (see [`crate::protocol`]): send what may go at once, apply what is
    /// committed and already on this node's disk, persist, send what waited for the write, apply
    /// the rest and answer, then tell the core what is durable, and carry out what that step
    /// asked for in turn.
    ///
    /// When the store waits for the disk ([`Driver::persist_beside`]) the write goes to a
    /// blocking thread and the rest of `out` waits for it in [`Driver::in_flight`], while the
    /// driver goes on with its inputs ([`Driver::meanwhile`]): a follower applies the commits
    /// its leader announces, and a leader counts its followers' acknowledgements, during its
    /// own fsync instead of after it. The next write starts when this one is done
    /// ([`Driver::complete_persist`]), so writes stay in order and each fsync covers what
    /// arrived during the previous one. Call only with no write in flight.
    async fn carry_out(&mut self, out: &mut Output<P::Message>) -> Result<(), StorageError> {
        debug_assert!(self.in_flight.is_none(), "one write in flight at a time");
        loop {
            self.before_write(out)?;
            let mut write_took = Duration::ZERO;
            if !out.write.is_empty() {
                if self.persist_beside {
                    self.start_persist(out);
                    return Ok(());
                }
                let started = Instant::now();
                lock(&self.store).persist(&out.write)?;
                write_took = started.elapsed();
                self.metrics.record_fsync(write_took);
            } else if !out.write.snapshot_parts.is_empty() {
                // Parts of a snapshot still arriving, written ahead and not synced.
                lock(&self.store).persist(&out.write)?;
            }
            let durable = self.after_write(out, write_took)?;
            if !durable.tell(&mut self.node, out) || out.is_empty() {
                return Ok(());
            }
        }
    }

    /// What may happen before `out`'s write is durable: restore a leader's snapshot, let the
    /// transport know of new members, send the messages that promise nothing, and apply the
    /// committed entries an earlier write made durable here.
    fn before_write(&mut self, out: &mut Output<P::Message>) -> Result<(), StorageError> {
        // Transfers first: a snapshot that fits in one chunk starts and is restored in the
        // same output.
        for event in &out.events {
            self.snapshot_spans.transfer(self.node.id(), event);
        }
        // A leader's snapshot replaces the applied state before anything after it applies;
        // it counts as installed once this output's write made it durable too.
        if let Some(snapshot) = &out.restore {
            self.restore(snapshot)?;
        }
        if !self.traces.is_empty() && !out.write.append.is_empty() {
            self.traces.appending(&out.write.append);
        }
        self.add_new_members(out);
        for envelope in out.messages.drain(..) {
            send::<P>(&*self.transport, &self.traces, self.node.id(), envelope);
        }
        // Under load a round that learns a commit usually also appends newer entries: the
        // committed ones a previous persist made durable are answered before this one's
        // fsync rather than after it.
        self.apply_durable_committed(out);
        Ok(())
    }

    /// Applies the entries of `out.committed` this node already holds durably (the first ones:
    /// the rest wait for `out`'s write).
    fn apply_durable_committed(&mut self, out: &mut Output<P::Message>) {
        let durable_through = self.durable_through(out);
        let durable_committed = out
            .committed
            .partition_point(|entry| entry.index <= durable_through);
        if durable_committed > 0 {
            self.apply_committed(out, durable_committed);
        }
    }

    /// Before the messages: a leader's first append to a member it just added.
    fn add_new_members(&self, out: &Output<P::Message>) {
        for event in &out.events {
            if let Event::MembershipChanged { membership, .. } = event {
                for (&id, address) in &membership.addresses {
                    self.transport.add_member(id, address);
                }
            }
        }
    }

    /// Hands `out`'s write to a blocking thread; the rest of `out` waits for it.
    fn start_persist(&mut self, out: &mut Output<P::Message>) {
        let store = self.store.clone();
        let write = std::mem::take(&mut out.write);
        let handle = tokio::task::spawn_blocking(move || {
            let result = lock(&store).persist(&write);
            (write, result)
        });
        let spare = std::mem::take(&mut self.spare_output);
        self.in_flight = Some(InFlight {
            output: std::mem::replace(out, spare),
            started: Instant::now(),
            handle,
        });
    }

    /// While a write is in flight: what the rounds since asked for that need not wait for it.
    /// Messages that promise nothing leave (unless a membership change must reach the
    /// transport first), refusals are answered, reads wait only for their index to apply, and
    /// committed entries already durable here apply; everything else waits in `out` for the
    /// next write.
    fn meanwhile(&mut self, out: &mut Output<P::Message>) {
        let changes_membership = out
            .events
            .iter()
            .any(|e| matches!(e, Event::MembershipChanged { .. }));
        if !changes_membership {
            for envelope in out.messages.drain(..) {
                send::<P>(&*self.transport, &self.traces, self.node.id(), envelope);
            }
        }
        // Entries committed before a snapshot from the leader apply after it is restored.
        if out.restore.is_none() {
            self.apply_durable_committed(out);
        }
        if !out.reads.is_empty() {
            self.apply
                .reads_ready(out.reads.drain(..), &mut self.answers);
        }
        self.apply.reject(out.rejected.drain(..), &mut self.answers);
        if !self.answers.is_empty() {
            self.answer(None);
        }
    }

    /// The write in flight finished: carries out what waited for it, tells the core, then
    /// carries out `out` (what the rounds since gathered, and what that step asked for), which
    /// starts the next write.
    async fn complete_persist(
        &mut self,
        joined: PersistJoin,
        out: &mut Output<P::Message>,
    ) -> Result<(), StorageError> {
        let Some(InFlight {
            mut output,
            started,
            handle: _,
        }) = self.in_flight.take()
        else {
            return Ok(());
        };
        let (write, result) = match joined {
            Ok(outcome) => outcome,
            Err(error) => match error.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                Err(_) => {
                    return Err(StorageError::Io(std::io::Error::other(
                        "the runtime shut down during a write",
                    )));
                }
            },
        };
        let entries_written = write.append.len();
        output.write = write;
        result?;
        let write_took = started.elapsed();
        self.metrics.record_fsync(write_took);
        let durable = self.after_write(&mut output, write_took)?;
        self.spare_output = output;
        durable.tell(&mut self.node, out);
        if self.settings.flush_on_drain {
            // A write of several entries means several clients: the next round waits a little
            // to carry more of them (the more the write carried, the longer, when scaled). A
            // lone client's write (one entry) never waits.
            let settings = &self.settings;
            let linger = linger_after(settings.linger, settings.linger_per_entry, entries_written);
            if !linger.is_zero() && self.node.status().is_leader {
                self.linger_until = Some(Instant::now() + linger);
            } else {
                self.node.step(Input::FlushProposals, out);
            }
        }
        self.carry_out(out).await
    }

    /// What `out` held back until its write was durable: send the acknowledgements and votes,
    /// apply the committed entries, serve reads, answer, and handle the events. Returns what
    /// the write made durable, to tell the core; leaves `out` empty.
    fn after_write(
        &mut self,
        out: &mut Output<P::Message>,
        write_took: Duration,
    ) -> Result<Durability, StorageError> {
        self.persisted_through = self.durable_through(out);
        if let Some(snapshot) = &out.write.snapshot {
            // What it covers is as durable as the log before it was.
            self.persisted_through = self.persisted_through.max(snapshot.index);
        }
        if let Some(snapshot) = out.restore.take() {
            self.metrics.record_snapshot_installed(snapshot.data.len());
            tracing::info!(
                node = %self.node.id(),
                index = snapshot.index,
                bytes = snapshot.data.len(),
                "installed the leader's snapshot"
            );
        }
        let durable = Durability::of(&out.write);
        if let Some((index, _)) = durable.last_appended {
            self.persisted_through = index;
            if !self.traces.is_empty() {
                self.traces.persisted(index, write_took);
            }
        }
        debug_assert!(out.messages.is_empty(), "sent before the write");
        for envelope in out.messages_after_write.drain(..) {
            send::<P>(&*self.transport, &self.traces, self.node.id(), envelope);
        }
        if !self.traces.is_empty() {
            self.traces.acknowledged();
        }
        if !out.committed.is_empty() {
            let all = out.committed.len();
            self.apply_committed(out, all);
        }
        if !out.reads.is_empty() {
            self.apply
                .reads_ready(out.reads.drain(..), &mut self.answers);
        }
        self.apply.reject(out.rejected.drain(..), &mut self.answers);
        let leader_changed = out
            .events
            .iter()
            .any(|e| matches!(e, Event::LeaderChanged { .. }));
        self.handle_events(&out.events);
        out.clear();
        if !self.answers.is_empty() {
            self.answer(None);
        }
        let status = self.node.status();
        self.metrics.set_term(status.term);
        self.metrics.set_committed_index(status.commit_index);
        self.metrics.set_log_entries(status.log_entries);
        if leader_changed {
            self.metrics.record_leader_change();
            self.publish_leader();
        }
        Ok(durable)
    }

    /// Notes the events of a carried-out output: detections, elections, leader and membership
    /// changes, and answers to forwarded membership calls.
    fn handle_events(&mut self, events: &[Event]) {
        for event in events {
            match *event {
                Event::ByzantineDetected { offender, offence } => {
                    self.metrics.record_byzantine_detection();
                    lock(&self.byzantine).detected(offender, offence);
                }
                Event::ElectionRound { round, term } => {
                    self.elections.round(self.node.id(), round, term);
                }
                Event::LeaderChanged { term, leader } => {
                    self.elections.leader_changed(self.node.id(), term, leader);
                    if leader != Some(self.node.id()) {
                        self.membership_calls.leadership_lost(leader);
                    }
                }
                Event::Prepared {
                    view,
                    sequence,
                    ref proposals,
                } => {
                    if !self.traces.is_empty() {
                        self.traces.prepared(view, sequence, proposals);
                    }
                }
                Event::MembershipChanged {
                    index,
                    ref membership,
                    committed,
                } => {
                    tracing::info!(node = %self.node.id(), index, %membership, committed,
                        "membership changed");
                    *lock(&self.membership) = Some(membership.clone());
                    self.retired_routes
                        .changed(membership, committed, Instant::now());
                    if membership.contains(self.node.id()) {
                        self.removed.send_replace(None); // added (back)
                    }
                    self.membership_calls.changed(index, membership, committed);
                }
                Event::MembershipRefused { ref error } => {
                    tracing::info!(node = %self.node.id(), %error, "membership change refused");
                }
                Event::MembershipForwarded { tag, leader } => {
                    tracing::info!(node = %self.node.id(), tag, %leader,
                        "membership change forwarded to the leader");
                }
                Event::MembershipForwardAnswered { tag, ref result } => {
                    self.membership_calls.answered(tag, result.clone());
                }
                Event::Removed { index } => {
                    tracing::warn!(node = %self.node.id(), index,
                        "removed from the cluster by the membership committed at this index");
                    self.removed.send_replace(Some(index));
                }
                Event::SnapshotSendStarted { .. }
                | Event::SnapshotSendFinished { .. }
                | Event::SnapshotReceiveStarted { .. } => {}
            }
        }
    }

    /// Steps a membership change. A change the core refused, or one that asked for what is
    /// already in force, is answered at once; otherwise the caller waits for the membership it
    /// appended (the final one, after a joint one) to commit.
    fn change_membership(
        &mut self,
        change: crate::membership::MembershipChange,
        reply: oneshot::Sender<MembershipAnswer>,
        out: &mut Output<P::Message>,
    ) {
        use crate::membership::MembershipError;
        let unsupported = || {
            MembershipError::Unsupported("this protocol keeps the members it started with".into())
        };
        let Some(control) = P::membership_control(change) else {
            let _ = reply.send(Err(unsupported()));
            return;
        };
        let first = out.events.len();
        self.node.step(Input::Control(control), out);
        for event in &out.events[first..] {
            match event {
                Event::MembershipRefused { error } => {
                    let _ = reply.send(Err(error.clone()));
                    return;
                }
                Event::MembershipChanged {
                    index,
                    committed: false,
                    ..
                } => {
                    self.membership_calls.started(*index, reply);
                    return;
                }
                Event::MembershipForwarded { tag, .. } => {
                    self.membership_calls.forwarded(*tag, reply);
                    return;
                }
                _ => {}
            }
        }
        let _ = reply.send(self.node.membership().ok_or_else(unsupported));
    }

    /// Replaces the applied state with a leader's snapshot (this node had fallen behind the
    /// leader's log). A snapshot this state machine cannot read stops the engine: applying the
    /// entries after it to a state that is not the one before them would diverge silently.
    fn restore(&mut self, snapshot: &Snapshot) -> Result<(), StorageError> {
        let started = Instant::now();
        if let Err(detail) = self.apply.restore(snapshot, &mut self.answers) {
            return Err(StorageError::Corrupt {
                location: format!("the leader's snapshot through index {}", snapshot.index),
                detail,
            });
        }
        self.snapshots.installed(snapshot.index);
        self.snapshot_spans.installed(started.elapsed());
        self.metrics.set_applied_index(self.apply.applied_index());
        Ok(())
    }

    /// Captures the applied state for a snapshot (the only part that stops the driver, and
    /// measured) and leaves its serialization to a thread of its own.
    fn start_snapshot(&mut self) {
        let started = Instant::now();
        let Some(capture) = self.apply.capture_snapshot() else {
            tracing::info!(
                node = %self.node.id(),
                "the state machine takes no snapshots: the log is kept whole"
            );
            self.snapshots.stop();
            return;
        };
        let blocked = started.elapsed();
        self.metrics.record_snapshot_capture(blocked);
        self.snapshot_spans
            .taking(self.node.id(), capture.index, blocked);
        self.snapshots.start(capture);
    }

    /// Hands a snapshot finished beside the driver to the core, which persists it and compacts
    /// the log behind the previous one. A failed one is logged and the log kept until the next.
    fn take_finished_snapshot(&mut self, out: &mut Output<P::Message>) {
        let Some((written, took)) = self.snapshots.finished() else {
            return;
        };
        match written {
            Ok(snapshot) => {
                self.metrics
                    .record_snapshot_taken(snapshot.data.len(), took);
                self.snapshot_spans.taken(Some(snapshot.data.len()), took);
                self.node.step(Input::SnapshotTaken(snapshot), out);
            }
            Err(error) => {
                self.snapshot_spans.taken(None, took);
                tracing::warn!(
                    node = %self.node.id(),
                    %error,
                    "taking a snapshot failed; the log is kept until the next one"
                )
            }
        }
    }

    /// Applies the first `count` newly committed entries and answers their proposers on this
    /// node. The answers go out after those entries are applied, all stamped with one clock
    /// reading: the state machine has finished with each of them by then.
    fn apply_committed(&mut self, out: &mut Output<P::Message>, count: usize) {
        let committed_at = Instant::now();
        if !self.traces.is_empty() {
            self.traces.committed(&out.committed[..count]);
        }
        self.apply
            .apply(out.committed.drain(..count), &mut self.answers);
        self.answer(Some(committed_at));
        latency_probe::stamp(Hop::Answered, self.node.id());
        self.metrics.set_applied_index(self.apply.applied_index());
    }

    /// Delivers the stage's answers. Applied ones record their commit latency first, so that a
    /// client reading the metrics after its answer sees its commit.
    fn answer(&mut self, committed_at: Option<Instant>) {
        let applied_at = Instant::now();
        let committed_at = committed_at.unwrap_or(applied_at);
        // Requests received in one round share their submit time, hence their latency: one
        // subtraction and one metrics update per run of such requests, not per request.
        let mut run: Option<(Instant, u64)> = None;
        let commits = self
            .answers
            .iter()
            .filter(|a| a.outcome.as_ref().is_ok_and(|applied| !applied.read));
        for answer in commits {
            match &mut run {
                Some((submitted, count)) if *submitted == answer.submitted => *count += 1,
                _ => {
                    if let Some((submitted, count)) = run {
                        let latency = applied_at.saturating_duration_since(submitted);
                        self.metrics.record_commits(latency, count);
                    }
                    run = Some((answer.submitted, 1));
                }
            }
        }
        if let Some((submitted, count)) = run {
            let latency = applied_at.saturating_duration_since(submitted);
            self.metrics.record_commits(latency, count);
        }
        let metrics = &self.metrics;
        let deliveries = self.answers.drain(..).map(|answer| {
            let (reply, route) = answer.reply;
            let outcome = match answer.outcome {
                Ok(entry) => Ok(Applied {
                    index: entry.index,
                    term: entry.term,
                    committed_at,
                    applied_at,
                    response: entry.response,
                }),
                Err(unanswered) => {
                    match unanswered {
                        Unanswered::Rejected(_) => metrics.record_rejection(),
                        Unanswered::TimedOut => metrics.record_timeout(),
                        Unanswered::Stopped(_) => metrics.record_stopped(),
                    }
                    Err(unanswered)
                }
            };
            (route, (reply, outcome))
        });
        self.replies.post(deliveries);
    }

    /// A leader whose write is in flight keeps the proposals that arrive in its batch until
    /// the write is done, so that the next write (one fsync here and one on each follower)
    /// carries all of them rather than one append per round: what the driver waiting for its
    /// fsync did before writes went beside it; and, with [`DriverSettings::linger`], for that
    /// long after a write of several entries. Followers forward at once; their own writes do
    /// not concern the leader's rounds.
    fn holds_proposals(&mut self) -> bool {
        if self
            .linger_until
            .is_some_and(|until| Instant::now() >= until)
        {
            self.linger_until = None;
        }
        (self.in_flight.is_some() || self.linger_until.is_some()) && self.node.status().is_leader
    }

    /// The last index whose entry this node holds durably as `out` stands: a truncation waiting
    /// in `out` replaces what was durable from there on.
    fn durable_through(&self, out: &Output<P::Message>) -> LogIndex {
        match out.write.truncate_from {
            Some(from) => self.persisted_through.min(from.saturating_sub(1)),
            None => self.persisted_through,
        }
    }

    /// Logs a failure of the store and answers every pending request with it; returns it.
    fn store_failed(&mut self, error: StorageError) -> StorageError {
        tracing::error!(node = %self.node.id(), %error, "log store failed; engine stopping");
        self.fail_all(&format!("log store failed: {error}"));
        error
    }

    fn fail_all(&mut self, reason: &str) {
        self.apply.fail_all(reason, &mut self.answers);
        self.answer(None);
    }

    fn publish_leader(&self) {
        let status = self.node.status();
        let info = LeaderInfo {
            term: status.term,
            leader: status.leader,
            is_leader: status.is_leader,
        };
        self.leader.send_replace(info);
        for callback in lock(&self.leader_callbacks).iter() {
            callback(info.leader);
        }
    }
}

/// Sends one message, with the trace attachment of a traced proposal it carries (looked up
/// only while some proposal is traced).
fn send<P: Protocol>(
    transport: &dyn Transport<P::Message>,
    traces: &ProposalTraces,
    this: NodeId,
    envelope: Envelope<P::Message>,
) {
    latency_probe::stamp(Hop::Sent, this);
    let attachment = if traces.is_empty() {
        None
    } else {
        traces.attachment_for::<P>(this, envelope.to, &envelope.message)
    };
    match attachment {
        Some(attachment) => transport.send_traced(envelope.to, envelope.message, attachment),
        None => transport.send(envelope.to, envelope.message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leader_lingers_after_writes_of_several_entries_scaled_to_them_when_asked() {
        let micros = Duration::from_micros;
        // Unscaled: the whole linger after any write of two entries or more.
        assert_eq!(linger_after(micros(200), None, 1), Duration::ZERO);
        assert_eq!(linger_after(micros(200), None, 2), micros(200));
        assert_eq!(linger_after(micros(200), None, 50), micros(200));
        // Scaled: the write's entries times the step, capped by the linger.
        let step = Some(micros(70));
        assert_eq!(linger_after(micros(1000), step, 1), Duration::ZERO);
        assert_eq!(linger_after(micros(1000), step, 2), micros(140));
        assert_eq!(linger_after(micros(1000), step, 14), micros(980));
        assert_eq!(linger_after(micros(1000), step, 15), micros(1000));
        assert_eq!(linger_after(micros(1000), step, usize::MAX), micros(1000));
        // No linger configured: none, however large the write.
        assert_eq!(linger_after(Duration::ZERO, step, 100), Duration::ZERO);
        assert_eq!(linger_after(Duration::ZERO, None, 100), Duration::ZERO);
    }
}
