//! Snapshots through the public API: engines over TCP with fjall data directories take
//! snapshots every `snapshot_interval` applied entries and compact their logs; a follower that
//! missed the compacted entries catches up from the leader's snapshot, sent in chunks over the
//! same transport; a restarted node starts from its latest snapshot and replays only the log
//! after it. Each snapshot, and each transfer at both ends, is a span.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

use consensus::node::kv::{KvCommand, KvResponse, KvStore};
use consensus::storage::{FjallLogStore, LogStore, SyncPolicy};
use consensus::types::NodeId;
use consensus::{ConsensusConfig, ConsensusEngine};

#[path = "common/ports.rs"]
mod ports;

const INTERVAL: u64 = 16;

struct Node {
    name: String,
    bind: String,
    peers: Vec<String>,
    dir: std::path::PathBuf,
}

impl Node {
    async fn start(&self) -> ConsensusEngine {
        let config = ConsensusConfig::default()
            .node_id(self.name.as_str())
            .bind_address(self.bind.as_str())
            .peers(self.peers.clone())
            .persistent_state(&self.dir)
            .insecure_plaintext(true)
            .snapshot_interval(INTERVAL)
            .request_timeout(Duration::from_secs(3));
        let mut engine = ConsensusEngine::new(config).unwrap();
        engine.set_state_machine(KvStore::new()).unwrap();
        engine.start().await.unwrap();
        engine
    }

    /// What its data directory holds once its engine stopped: the log's first and last
    /// index, and the snapshot's index.
    fn stored(&self) -> (u64, u64, Option<u64>) {
        let mut store = FjallLogStore::open(&self.dir, SyncPolicy::EveryBatch).unwrap();
        let recovered = store.recover().unwrap();
        let first = recovered.entries.first().map_or(0, |e| e.index);
        let last = recovered.entries.last().map_or(0, |e| e.index);
        (first, last, recovered.snapshot.map(|s| s.index))
    }
}

fn nodes(dir: &std::path::Path) -> Vec<Node> {
    let names = ["alpha", "bravo", "charlie"];
    names
        .iter()
        .zip(ports::loopback_members(&names))
        .map(|(name, member)| Node {
            name: name.to_string(),
            bind: member.bind,
            peers: member.peers,
            dir: dir.join(name),
        })
        .collect()
}

async fn wait_until(what: &str, deadline: Duration, mut condition: impl FnMut() -> bool) {
    let until = Instant::now() + deadline;
    while !condition() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn leader_of(engines: &[Option<ConsensusEngine>]) -> Option<usize> {
    engines
        .iter()
        .position(|e| e.as_ref().is_some_and(|e| e.is_leader()))
}

async fn put(engine: &ConsensusEngine, i: usize) {
    let command = KvCommand::Put {
        key: format!("key-{i:04}").into_bytes(),
        value: format!("value-{i}").into_bytes(),
    };
    let response = engine.execute_command::<KvStore>(command).await.unwrap();
    assert_eq!(response, KvResponse::Done);
}

/// Reads every key of `0..count` through `engine` (a linearizable read, served on that node
/// once it has applied what the leader committed before the read).
async fn assert_holds_all(engine: &ConsensusEngine, count: usize, who: &str) {
    for i in 0..count {
        let key = format!("key-{i:04}").into_bytes();
        let response = engine
            .read::<KvStore>(KvCommand::Get { key })
            .await
            .unwrap();
        let expected = Some(format!("value-{i}").into_bytes());
        assert_eq!(response, KvResponse::Value(expected), "{who}: key {i}");
    }
}

/// A closed span: its name and its fields' values as text.
type ClosedSpan = (String, BTreeMap<String, String>);

/// Records every closed span of the engine's snapshot work, with its fields.
#[derive(Clone, Default)]
struct SnapshotSpanRecorder {
    closed: Arc<Mutex<Vec<ClosedSpan>>>,
}

struct Fields(BTreeMap<String, String>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().to_string(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_string(), value.to_string());
    }
}

impl<S: tracing::Subscriber + for<'a> LookupSpan<'a>> Layer<S> for SnapshotSpanRecorder {
    fn on_new_span(&self, attributes: &Attributes<'_>, id: &Id, context: Context<'_, S>) {
        if !attributes
            .metadata()
            .name()
            .starts_with("consensus.snapshot")
        {
            return;
        }
        let mut fields = Fields(BTreeMap::new());
        attributes.record(&mut fields);
        if let Some(span) = context.span(id) {
            span.extensions_mut().insert(fields);
        }
    }
    fn on_record(&self, id: &Id, values: &Record<'_>, context: Context<'_, S>) {
        if let Some(span) = context.span(id)
            && let Some(fields) = span.extensions_mut().get_mut::<Fields>()
        {
            values.record(fields);
        }
    }
    fn on_close(&self, id: Id, context: Context<'_, S>) {
        let Some(span) = context.span(&id) else {
            return;
        };
        if let Some(fields) = span.extensions_mut().remove::<Fields>() {
            let name = span.metadata().name().to_string();
            self.closed.lock().unwrap().push((name, fields.0));
        }
    }
}

impl SnapshotSpanRecorder {
    /// Whether a span named `name` closed with every field of `expected` as given.
    fn closed(&self, name: &str, expected: &[(&str, String)]) -> bool {
        self.closed.lock().unwrap().iter().any(|(closed, fields)| {
            closed == name
                && expected
                    .iter()
                    .all(|(key, value)| fields.get(*key) == Some(value))
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_behind_the_compacted_log_catches_up_from_a_snapshot_and_restarts_from_one() {
    let spans = SnapshotSpanRecorder::default();
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(spans.clone()))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let nodes = nodes(dir.path());
    let mut engines: Vec<Option<ConsensusEngine>> =
        futures::future::join_all(nodes.iter().map(Node::start))
            .await
            .into_iter()
            .map(Some)
            .collect();
    wait_until("a leader known to all", Duration::from_secs(10), || {
        leader_of(&engines).is_some()
            && engines
                .iter()
                .flatten()
                .all(|e| e.current_leader().is_some())
    })
    .await;
    let leader = leader_of(&engines).unwrap();
    for i in 0..10 {
        put(engines[leader].as_ref().unwrap(), i).await;
    }

    // A follower stops; the others commit many intervals, snapshot and compact past it. (A
    // leader keeps up to four intervals for a follower it heard from lately, and the follower
    // may have stored a few intervals more than the first ten puts before it stopped.)
    let behind = (leader + 1) % 3;
    engines[behind].take().unwrap().stop().await.unwrap();
    let written = 10 + 12 * INTERVAL as usize;
    for i in 10..written {
        put(engines[leader].as_ref().unwrap(), i).await;
    }
    let taken = |engine: &ConsensusEngine| engine.metrics().snapshots_taken;
    wait_until(
        "the leader to take snapshots",
        Duration::from_secs(10),
        || taken(engines[leader].as_ref().unwrap()) >= 3,
    )
    .await;
    let (first, _, snapshot) = nodes[behind].stored();
    assert!(first <= 11 && snapshot.is_none(), "{first} {snapshot:?}");

    // Back, it can only catch up from the leader's snapshot: its next entry is compacted away.
    engines[behind] = Some(nodes[behind].start().await);
    let restarted = engines[behind].as_ref().unwrap();
    wait_until(
        "the snapshot to be installed",
        Duration::from_secs(15),
        || restarted.metrics().snapshots_installed >= 1,
    )
    .await;
    assert_holds_all(restarted, written, "the follower that caught up").await;
    let id = |node: &Node| NodeId::from_name(&node.name).to_string();
    let (leader_id, behind_id) = (id(&nodes[leader]), id(&nodes[behind]));
    let outcome = |outcome: &str| ("consensus.snapshot.outcome", outcome.to_string());
    wait_until("the transfer's spans", Duration::from_secs(10), || {
        spans.closed(
            "consensus.snapshot",
            &[("consensus.node", leader_id.clone()), outcome("taken")],
        ) && spans.closed(
            "consensus.snapshot_send",
            &[
                ("consensus.node", leader_id.clone()),
                ("consensus.follower", behind_id.clone()),
                outcome("sent"),
            ],
        ) && spans.closed(
            "consensus.snapshot_receive",
            &[
                ("consensus.node", behind_id.clone()),
                ("consensus.leader", leader_id.clone()),
                outcome("installed"),
            ],
        )
    })
    .await;
    put(restarted, written).await; // and it serves writes (forwarded) after it
    let written = written + 1;
    assert!(restarted.metrics().snapshot_blocked_max < Duration::from_secs(1));

    // Every node restarts from its own snapshot and the log after it.
    for engine in engines.iter_mut() {
        engine.take().unwrap().stop().await.unwrap();
    }
    for node in &nodes {
        let (first, last, snapshot) = node.stored();
        let snapshot = snapshot.unwrap_or_else(|| panic!("{} holds no snapshot", node.name));
        assert!(
            snapshot + 1 >= first,
            "{}: a gap after the snapshot",
            node.name
        );
        assert!(
            last - first < 2 * INTERVAL + 8,
            "{}: {first}..={last} is more than two intervals",
            node.name
        );
    }
    let engines: Vec<ConsensusEngine> = futures::future::join_all(nodes.iter().map(Node::start))
        .await
        .into_iter()
        .collect();
    for (engine, node) in engines.iter().zip(&nodes) {
        assert_holds_all(engine, written, &node.name).await;
    }
    for mut engine in engines {
        engine.stop().await.unwrap();
    }
}
