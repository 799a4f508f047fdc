//! Engines driving the real core end to end: in-process clusters over a `LocalNetwork`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use consensus::protocol::RejectReason;
use consensus::{
    ConsensusConfig, ConsensusEngine, ConsensusResult, Error, LocalNetwork, NodeId, Proposal,
    ReadMode, StateMachine,
};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
enum KvCommand {
    Set(String, String),
    Get(String),
}

/// A key-value store that also records the order it applied commands in, shared with the test.
#[derive(Clone, Default)]
struct KvStore {
    data: BTreeMap<String, String>,
    applied: Arc<Mutex<Vec<String>>>,
}

impl StateMachine for KvStore {
    type Command = KvCommand;
    type Response = Option<String>;

    fn is_read_only(command: &KvCommand) -> bool {
        matches!(command, KvCommand::Get(_))
    }

    fn apply(&mut self, command: KvCommand) -> Option<String> {
        match command {
            KvCommand::Set(key, value) => {
                self.applied.lock().unwrap().push(format!("{key}={value}"));
                self.data.insert(key, value)
            }
            KvCommand::Get(key) => self.data.get(&key).cloned(),
        }
    }
}

#[path = "common/engines.rs"]
mod engines;

struct Cluster {
    engines: Vec<ConsensusEngine>,
    applied: Vec<Arc<Mutex<Vec<String>>>>,
}

async fn start_cluster(names: &[&str]) -> Cluster {
    start_cluster_with(names, |config| config).await
}

async fn start_cluster_with(
    names: &[&str],
    tweak: impl Fn(ConsensusConfig) -> ConsensusConfig,
) -> Cluster {
    let network = LocalNetwork::new();
    let mut engines = Vec::new();
    let mut applied = Vec::new();
    for name in names {
        let peers: Vec<&str> = names.iter().copied().filter(|n| n != name).collect();
        let config = ConsensusConfig::default()
            .node_id(*name)
            .peers(peers)
            .request_timeout(Duration::from_secs(2));
        let config = tweak(config);
        let mut engine = ConsensusEngine::new(config)
            .unwrap()
            .with_local_network(&network);
        let store = KvStore::default();
        applied.push(store.applied.clone());
        engine.set_state_machine(store).unwrap();
        engine.start().await.unwrap();
        engines.push(engine);
    }
    Cluster { engines, applied }
}

impl Cluster {
    async fn leader(&self, deadline: Duration) -> usize {
        let all: Vec<usize> = (0..self.engines.len()).collect();
        engines::single_leader(&self.engines, &all, deadline).await
    }

    async fn wait_applied(&self, count: usize, skip: Option<usize>) {
        let until = Instant::now() + Duration::from_secs(5);
        loop {
            let done = (0..self.applied.len())
                .filter(|&i| Some(i) != skip)
                .all(|i| self.applied[i].lock().unwrap().len() >= count);
            if done {
                return;
            }
            assert!(
                Instant::now() < until,
                "replicas did not apply {count} commands"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proposals_commit_and_every_state_machine_agrees() {
    let cluster = start_cluster(&["a", "b", "c"]).await;
    let leader = cluster.leader(Duration::from_secs(5)).await;
    for i in 0..20 {
        let engine = &cluster.engines[(leader + i) % 3]; // followers forward to the leader
        let command = KvCommand::Set(format!("k{i}"), format!("v{i}"));
        let previous = engine.execute_command::<KvStore>(command).await.unwrap();
        assert_eq!(previous, None);
    }
    let read = cluster.engines[leader].execute_command::<KvStore>(KvCommand::Get("k7".into()));
    assert_eq!(read.await.unwrap(), Some("v7".into()));
    cluster.wait_applied(20, None).await;
    let histories: Vec<Vec<String>> = cluster
        .applied
        .iter()
        .map(|a| a.lock().unwrap().clone())
        .collect();
    assert_eq!(histories[0], histories[1]);
    assert_eq!(histories[1], histories[2]);
    let metrics = cluster.engines[leader].metrics();
    assert!(metrics.current_term() >= 1);
    assert!(metrics.last_committed_index() >= 21);
    assert!(
        cluster.engines[leader]
            .prometheus_metrics()
            .contains("consensus_term_current")
    );
}

/// Drivers that park at once when idle (`driver_spin` zero, as a local cluster's nodes run)
/// lose no wake-up: every command through every node commits and every replica applies it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drivers_that_never_spin_commit_through_every_node() {
    let cluster =
        start_cluster_with(&["a", "b", "c"], |c| c.driver_spin(Some(Duration::ZERO))).await;
    let leader = cluster.leader(Duration::from_secs(5)).await;
    for i in 0..30 {
        let engine = &cluster.engines[(leader + i) % 3];
        let command = KvCommand::Set(format!("k{i}"), format!("v{i}"));
        assert_eq!(
            engine.execute_command::<KvStore>(command).await.unwrap(),
            None
        );
    }
    cluster.wait_applied(30, None).await;
    for engine in &cluster.engines {
        let read = engine.execute_command::<KvStore>(KvCommand::Get("k29".into()));
        assert_eq!(read.await.unwrap(), Some("v29".into()));
    }
}

/// In-process engines that set a leader linger (their driver's runtime then gets a reactor to
/// time it): concurrent writes through every node make writes of several entries, after which
/// the leader lingers; every write still commits and every replica applies it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lingering_leader_in_process_commits_every_concurrent_write() {
    let cluster = start_cluster_with(&["a", "b", "c"], |c| {
        c.leader_linger(Some(Duration::from_micros(400)))
            .leader_linger_per_entry(Some(Duration::from_micros(40)))
    })
    .await;
    let leader = cluster.leader(Duration::from_secs(5)).await;
    let writes = (0..60).map(|i| {
        let engine = &cluster.engines[(leader + i) % 3];
        engine.execute_command::<KvStore>(KvCommand::Set(format!("k{i}"), format!("v{i}")))
    });
    for write in futures::future::join_all(writes).await {
        assert_eq!(write.expect("the write committed"), None);
    }
    cluster.wait_applied(60, None).await;
    for engine in &cluster.engines {
        let read = engine.execute_command::<KvStore>(KvCommand::Get("k59".into()));
        assert_eq!(read.await.unwrap(), Some("v59".into()));
    }
}

/// Reads through every node, right after a write acknowledged through another: each sees the
/// write (linearizable), and none writes to the log (the commit index stays where the writes
/// left it), under ReadIndex and under leases; with `ReadMode::Log` every read is an entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_on_any_node_see_every_acknowledged_write_without_a_log_write() {
    for mode in [ReadMode::ReadIndex, ReadMode::Lease, ReadMode::Log] {
        let cluster = start_cluster_with(&["a", "b", "c"], |config| config.read_mode(mode)).await;
        let leader = cluster.leader(Duration::from_secs(5)).await;
        for i in 0..30 {
            let writer = &cluster.engines[(leader + i) % 3];
            let key = format!("k{}", i % 4);
            let command = KvCommand::Set(key.clone(), format!("v{i}"));
            writer.execute_command::<KvStore>(command).await.unwrap();
            let reader = &cluster.engines[(leader + i + 1) % 3];
            let seen = reader.read::<KvStore>(KvCommand::Get(key)).await.unwrap();
            assert_eq!(seen, Some(format!("v{i}")), "{mode:?}: read {i} is stale");
        }
        let committed = cluster.engines[leader].metrics().last_committed_index();
        for i in 0..60 {
            let reader = &cluster.engines[(leader + i) % 3];
            let key = format!("k{}", i % 4);
            let seen = reader.execute_command::<KvStore>(KvCommand::Get(key));
            assert!(seen.await.unwrap().is_some());
        }
        let after = cluster.engines[leader].metrics().last_committed_index();
        match mode {
            ReadMode::Log => assert!(after >= committed + 60, "{mode:?}: {committed} -> {after}"),
            _ => assert_eq!(after, committed, "{mode:?}: reads wrote to the log"),
        }
        let refused = cluster.engines[leader]
            .read::<KvStore>(KvCommand::Set("k".into(), "v".into()))
            .await;
        assert!(matches!(refused, Err(Error::NotReadOnly)), "{refused:?}");
    }
}

/// A clean stop of the leader starts with a hand-over: the leader knows another leader before
/// it stops, and proposals made at a follower meanwhile commit (none refused, none lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_leader_hands_over_first_and_no_proposal_fails() {
    let mut cluster = start_cluster(&["h-1", "h-2", "h-3"]).await;
    let leader = cluster.leader(Duration::from_secs(5)).await;
    let follower = (leader + 1) % 3;
    assert!(
        !cluster.engines[follower].hand_over_leadership().await,
        "a follower has nothing to hand over"
    );
    let mut calls = Vec::new();
    for i in 0..20 {
        let proposal = Proposal::new(format!("k{i}"), "v");
        calls.push(cluster.engines[follower].propose(proposal));
    }
    let (handed, results) = tokio::join!(
        cluster.engines[leader].hand_over_leadership(),
        futures::future::join_all(calls)
    );
    assert!(handed, "no other leader within two election timeouts");
    assert!(!cluster.engines[leader].is_leader());
    for result in results {
        let result = result.unwrap();
        assert!(
            matches!(result, ConsensusResult::Committed { .. }),
            "{result:?}"
        );
    }
    cluster.engines[leader].stop().await.unwrap();
    let until = Instant::now() + Duration::from_secs(5);
    let new_leader = loop {
        if let Some(i) = (0..3).find(|&i| i != leader && cluster.engines[i].is_leader()) {
            break i;
        }
        assert!(Instant::now() < until, "no leader after the hand-over");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let result = cluster.engines[new_leader]
        .propose(Proposal::new("after", "1"))
        .await
        .unwrap();
    assert!(matches!(result, ConsensusResult::Committed { .. }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_survives_the_leader_stopping() {
    let mut cluster = start_cluster(&["a", "b", "c"]).await;
    let leader = cluster.leader(Duration::from_secs(5)).await;
    let result = cluster.engines[leader]
        .propose(Proposal::new("x", "1"))
        .await
        .unwrap();
    assert!(
        matches!(result, ConsensusResult::Committed { .. }),
        "{result:?}"
    );
    let changes = Arc::new(Mutex::new(Vec::new()));
    let survivor = (leader + 1) % 3;
    let seen = changes.clone();
    cluster.engines[survivor]
        .leader_election()
        .on_leader_change(move |leader| seen.lock().unwrap().push(leader));
    cluster.engines[leader].stop().await.unwrap();
    let until = Instant::now() + Duration::from_secs(5);
    let new_leader = loop {
        let leaders: Vec<usize> = (0..3)
            .filter(|&i| i != leader && cluster.engines[i].is_leader())
            .collect();
        if let [only] = leaders[..] {
            break only;
        }
        assert!(Instant::now() < until, "no new leader");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let result = cluster.engines[new_leader]
        .propose(Proposal::new("y", "2"))
        .await
        .unwrap();
    assert!(
        matches!(result, ConsensusResult::Committed { .. }),
        "{result:?}"
    );
    assert!(
        changes
            .lock()
            .unwrap()
            .iter()
            .any(|l| *l == Some(cluster.engines[new_leader].node_id()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_memory_engines_stopped_and_started_again_keep_their_log() {
    let mut cluster = start_cluster(&["a", "b", "c"]).await;
    let leader = cluster.leader(Duration::from_secs(5)).await;
    for i in 0..10 {
        let command = KvCommand::Set(format!("k{i}"), format!("v{i}"));
        cluster.engines[leader]
            .execute_command::<KvStore>(command)
            .await
            .unwrap();
    }
    cluster.wait_applied(10, None).await;
    let before = cluster.applied[0].lock().unwrap().clone();
    let term_before = cluster.engines[leader].metrics().current_term();
    for engine in &mut cluster.engines {
        engine.stop().await.unwrap();
    }
    // Fresh state machines: whatever they apply comes from the retained logs.
    for (engine, applied) in cluster.engines.iter_mut().zip(&mut cluster.applied) {
        let store = KvStore::default();
        *applied = store.applied.clone();
        engine.set_state_machine(store).unwrap();
        engine.start().await.unwrap();
    }
    // Three nodes starting at once may need more than one election: a leader seen here can
    // have stepped down by the time the command reaches it. A refusal was never appended, so
    // trying again cannot apply the command twice.
    let until = Instant::now() + Duration::from_secs(10);
    let (leader, previous) = loop {
        let leader = cluster.leader(Duration::from_secs(5)).await;
        let command = KvCommand::Set("k3".into(), "again".into());
        match cluster.engines[leader]
            .execute_command::<KvStore>(command)
            .await
        {
            Ok(previous) => break (leader, previous),
            Err(Error::Rejected(reason)) if Instant::now() < until => {
                eprintln!("refused ({reason}); finding the leader again");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(error) => panic!("the command failed: {error}"),
        }
    };
    assert_eq!(
        previous,
        Some("v3".into()),
        "the old entries were applied again"
    );
    cluster.wait_applied(11, None).await;
    for applied in &cluster.applied {
        let history = applied.lock().unwrap().clone();
        assert_eq!(history[..10], before[..], "every member kept its log");
        assert_eq!(history[10], "k3=again");
    }
    assert!(
        cluster.engines[leader].metrics().current_term() > term_before,
        "terms carry on from the retained ones"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_quorum_a_call_ends_by_its_deadline() {
    let network = LocalNetwork::new();
    let config = ConsensusConfig::default()
        .node_id("lonely")
        .peers(vec!["gone-1", "gone-2"])
        .request_timeout(Duration::from_millis(300));
    let mut engine = ConsensusEngine::new(config)
        .unwrap()
        .with_local_network(&network);
    engine.start().await.unwrap();
    let started = Instant::now();
    match engine.propose(Proposal::new("k", "v")).await {
        // Typed across the engine boundary: a caller can match the reason and redirect.
        Ok(ConsensusResult::Rejected { reason }) => assert!(
            matches!(
                reason,
                RejectReason::NoLeader | RejectReason::NotLeader { leader: None }
            ),
            "{reason}"
        ),
        Err(Error::Timeout) => {}
        other => panic!("expected a rejection or a timeout, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(engine.current_leader(), None::<NodeId>);
}

#[test]
fn a_signing_algorithm_without_its_key_is_refused_at_new() {
    let config = ConsensusConfig::default().algorithm(consensus::Algorithm::GpuOptimizedRaft);
    let error = ConsensusEngine::new(config).unwrap_err();
    assert!(matches!(error, Error::Config(_)), "{error}");
    assert!(error.to_string().contains("key"), "{error}");
}

// ---- Engines over real TCP (tarpc) on loopback, with fjall data directories ----

#[path = "common/ports.rs"]
mod ports;
use ports::free_port;

struct TcpNode {
    name: String,
    bind: String,
    peers: Vec<String>,
    dir: std::path::PathBuf,
    tls: consensus::TlsFiles,
}

impl TcpNode {
    /// This node's name, addresses and TLS files.
    fn config(&self) -> ConsensusConfig {
        ConsensusConfig::default()
            .node_id(self.name.as_str())
            .bind_address(self.bind.as_str())
            .peers(self.peers.clone())
            .tls(self.tls.clone())
    }

    async fn start(&self) -> (ConsensusEngine, Arc<Mutex<Vec<String>>>) {
        let config = self
            .config()
            .persistent_state(&self.dir)
            .request_timeout(Duration::from_secs(3));
        let mut engine = ConsensusEngine::new(config).unwrap();
        let store = KvStore::default();
        let applied = store.applied.clone();
        engine.set_state_machine(store).unwrap();
        engine.start().await.unwrap();
        (engine, applied)
    }
}

/// A cluster CA and certificates for `names` in `dir/certs`.
fn certificates(dir: &std::path::Path, names: &[&str]) -> std::path::PathBuf {
    let certs = dir.join("certs");
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    consensus::transport::tcp::tls::generate_certificates(&certs, &names).unwrap();
    certs
}

/// Three engines over TCP with mutual TLS.
fn tcp_nodes(dir: &std::path::Path) -> Vec<TcpNode> {
    let names = ["alpha", "bravo", "charlie"];
    let certs = certificates(dir, &names);
    names
        .iter()
        .zip(ports::loopback_members(&names))
        .map(|(name, member)| TcpNode {
            name: name.to_string(),
            bind: member.bind,
            peers: member.peers,
            dir: dir.join(name),
            tls: consensus::TlsFiles::in_dir(&certs, name),
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_cluster_with_fjall_commits_fails_over_and_a_restarted_node_catches_up() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = tcp_nodes(dir.path());
    let mut engines = Vec::new();
    let mut applied = Vec::new();
    let started = futures::future::join_all(nodes.iter().map(|n| n.start())).await;
    for (engine, log) in started {
        engines.push(Some(engine));
        applied.push(log);
    }
    let leader_of = |engines: &Vec<Option<ConsensusEngine>>| {
        engines
            .iter()
            .position(|e| e.as_ref().is_some_and(|e| e.is_leader()))
    };
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
        let engine = engines[(leader + i) % 3].as_ref().unwrap();
        let command = KvCommand::Set(format!("k{i}"), format!("v{i}"));
        engine.execute_command::<KvStore>(command).await.unwrap();
    }
    wait_until("every replica to apply 10", Duration::from_secs(10), || {
        applied.iter().all(|a| a.lock().unwrap().len() >= 10)
    })
    .await;
    let first = applied[0].lock().unwrap().clone();
    assert!(
        applied.iter().all(|a| *a.lock().unwrap() == first),
        "replicas disagree"
    );

    // Stop the leader; the other two elect a new one and keep committing.
    engines[leader].take().unwrap().stop().await.unwrap();
    wait_until("a new leader", Duration::from_secs(10), || {
        leader_of(&engines).is_some()
    })
    .await;
    let new_leader = leader_of(&engines).unwrap();
    for i in 10..20 {
        let command = KvCommand::Set(format!("k{i}"), format!("v{i}"));
        engines[new_leader]
            .as_ref()
            .unwrap()
            .execute_command::<KvStore>(command)
            .await
            .unwrap();
    }

    // The stopped node restarts from its data directory and catches up.
    let (restarted, restarted_log) = nodes[leader].start().await;
    engines[leader] = Some(restarted);
    wait_until(
        "the restarted node to catch up",
        Duration::from_secs(15),
        || restarted_log.lock().unwrap().len() >= 20,
    )
    .await;
    let survivor_log = applied[new_leader].lock().unwrap().clone();
    assert_eq!(*restarted_log.lock().unwrap(), survivor_log);
    for engine in engines.iter_mut().flatten() {
        engine.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_peer_address_is_a_config_error_naming_it() {
    let config = ConsensusConfig::default()
        .node_id("a")
        .bind_address(format!("127.0.0.1:{}", free_port()))
        .peers(vec!["b@nowhere"])
        .insecure_plaintext(true);
    let error = refusal_at_start(ConsensusEngine::new(config).unwrap()).await;
    assert!(
        error.contains("bootstrap_peers") && error.contains("b@nowhere"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_given_as_host_port_are_identified_by_their_certificates() {
    let names = ["east", "west", "north"];
    let ports: Vec<u16> = names.iter().map(|_| free_port()).collect();
    let dir = tempfile::tempdir().unwrap();
    let certs = certificates(dir.path(), &names);
    let starts = names.iter().zip(&ports).map(|(name, port)| {
        let peers: Vec<String> = ports
            .iter()
            .filter(|p| *p != port)
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let config = ConsensusConfig::default()
            .node_id(*name)
            .bind_address(format!("127.0.0.1:{port}"))
            .peers(peers)
            .tls(consensus::TlsFiles::in_dir(&certs, name));
        async move {
            let mut engine = ConsensusEngine::new(config).unwrap();
            engine.start().await.unwrap();
            engine
        }
    });
    // Each start waits for its unnamed peers' handshakes, so they must start together.
    let engines = futures::future::join_all(starts).await;
    let leader = commit_once_then_stop(engines).await;
    let expected: Vec<NodeId> = names.iter().map(|n| NodeId::from_name(n)).collect();
    assert!(expected.contains(&leader));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_needs_tls_or_an_explicit_insecure_plaintext_and_a_certificate_of_this_node() {
    let dir = tempfile::tempdir().unwrap();
    let certs = certificates(dir.path(), &["a", "b"]);
    let base = ConsensusConfig::default()
        .node_id("a")
        .bind_address(format!("127.0.0.1:{}", free_port()))
        .peers(vec![format!("b@127.0.0.1:{}", free_port())]);
    let error = refusal_at_start(ConsensusEngine::new(base.clone()).unwrap()).await;
    assert!(error.contains("insecure_plaintext"), "{error}");
    // b's certificate on a: refused before anything listens.
    let wrong = base.clone().tls(consensus::TlsFiles::in_dir(&certs, "b"));
    let error = refusal_at_start(ConsensusEngine::new(wrong).unwrap()).await;
    assert!(
        error.contains("tls.cert") && error.contains("\"b\""),
        "{error}"
    );
    let missing = base.clone().tls(consensus::TlsFiles::in_dir(&certs, "z"));
    let error = refusal_at_start(ConsensusEngine::new(missing).unwrap()).await;
    assert!(error.contains("z.pem"), "{error}");
    let both = base
        .clone()
        .tls(consensus::TlsFiles::in_dir(&certs, "a"))
        .insecure_plaintext(true);
    assert!(ConsensusEngine::new(both).is_err());
    let mut plain = ConsensusEngine::new(base.insecure_plaintext(true)).unwrap();
    plain.start().await.unwrap();
    plain.stop().await.unwrap();
}

/// Why `engine` refuses to start (it must refuse).
async fn refusal_at_start(mut engine: ConsensusEngine) -> String {
    engine.start().await.unwrap_err().to_string()
}

/// Waits for one of `engines` to lead, commits one proposal through it, stops them all and
/// returns the leader's id.
async fn commit_once_then_stop(mut engines: Vec<ConsensusEngine>) -> NodeId {
    let any_leader = |engines: &Vec<ConsensusEngine>| engines.iter().position(|e| e.is_leader());
    wait_until("a leader", Duration::from_secs(10), || {
        any_leader(&engines).is_some()
    })
    .await;
    let leader = any_leader(&engines).unwrap();
    let result = engines[leader]
        .propose(Proposal::new("k", "v"))
        .await
        .unwrap();
    assert!(
        matches!(result, ConsensusResult::Committed { .. }),
        "{result:?}"
    );
    let leader = engines[leader].node_id();
    for engine in &mut engines {
        engine.stop().await.unwrap();
    }
    leader
}

/// A TLS identity handed to the engine (here from PEM text in memory, as from a secret store)
/// secures a cluster whose configurations name no TLS files at all, and is held to the same
/// checks as files: a certificate of another node, or `insecure_plaintext` beside it, is
/// refused at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_identity_given_in_memory_secures_a_cluster_without_tls_files() {
    use consensus::transport::tcp::PeerTls;
    let names = ["pem-a", "pem-b", "pem-c"];
    let dir = tempfile::tempdir().unwrap();
    let certs = certificates(dir.path(), &names);
    let identity = |name: &str| {
        let read = |file: String| std::fs::read(certs.join(file)).unwrap();
        PeerTls::from_pem(
            &read(format!("{name}.pem")),
            &read(format!("{name}.key")),
            &read("ca.pem".into()),
        )
        .unwrap()
    };
    let members = ports::loopback_members(&names);
    let config = |name: &str, member: &ports::LoopbackMember| {
        ConsensusConfig::default()
            .node_id(name)
            .bind_address(member.bind.as_str())
            .peers(member.peers.clone())
    };
    // The files exist, but nothing names them: the engines only have the identities.
    let starts = names.iter().zip(&members).map(|(name, member)| {
        let engine = ConsensusEngine::new(config(name, member))
            .unwrap()
            .with_peer_tls(identity(name));
        async move {
            let mut engine = engine;
            engine.start().await.unwrap();
            engine
        }
    });
    commit_once_then_stop(futures::future::join_all(starts).await).await;

    let spare = ports::loopback_members(&["pem-a"]).remove(0);
    let error = refusal_at_start(
        ConsensusEngine::new(config("pem-a", &spare))
            .unwrap()
            .with_peer_tls(identity("pem-b")),
    )
    .await;
    assert!(
        error.contains("tls.cert") && error.contains("\"pem-b\""),
        "{error}"
    );
    let error = refusal_at_start(
        ConsensusEngine::new(config("pem-a", &spare).insecure_plaintext(true))
            .unwrap()
            .with_peer_tls(identity("pem-a")),
    )
    .await;
    assert!(error.contains("insecure_plaintext"), "{error}");
}

/// Outsiders keep dialing a TLS cluster's members as one of them: over plain TCP, and with a
/// certificate of another CA naming a member. None ever connects, and the cluster commits on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_cluster_commits_while_outsiders_fail_to_join_it() {
    use consensus::transport::Transport;
    use consensus::transport::tcp::{PeerAddress, TcpTransport, TcpTransportConfig};
    let dir = tempfile::tempdir().unwrap();
    let nodes = tcp_nodes(dir.path());
    let foreign = tempfile::tempdir().unwrap();
    let foreign_certs = certificates(foreign.path(), &["delta"]);
    let mut engines = Vec::new();
    for (engine, _) in futures::future::join_all(nodes.iter().map(|n| n.start())).await {
        engines.push(engine);
    }
    let targets: Vec<PeerAddress> = nodes
        .iter()
        .map(|n| {
            let port = n.bind.rsplit_once(':').unwrap().1.parse().unwrap();
            PeerAddress::with_id(NodeId::from_name(&n.name), "127.0.0.1", port)
        })
        .collect();
    // Outsiders claim to be "delta"; the driver's count of messages by sender must never
    // name it (the transport's unit tests cover a valid certificate claiming a member).
    let delta = NodeId::from_name("delta");
    let mut outsiders = Vec::new();
    for tls in [
        None,
        Some(
            consensus::TlsFiles::in_dir(&foreign_certs, "delta")
                .load()
                .unwrap(),
        ),
    ] {
        let mut config =
            TcpTransportConfig::new(delta, "stratoswarm", "127.0.0.1:0".parse().unwrap());
        config.tls = tls;
        config.reconnect_backoff_min = Duration::from_millis(5);
        config.reconnect_backoff_max = Duration::from_millis(20);
        let (outsider, _inbound) = TcpTransport::<Vec<u8>>::start(config, targets.clone())
            .await
            .unwrap();
        outsiders.push((outsider, _inbound));
    }
    wait_until("a leader", Duration::from_secs(10), || {
        engines.iter().any(|e| e.is_leader())
    })
    .await;
    for i in 0..30 {
        for (outsider, _) in &outsiders {
            for target in &targets {
                outsider.send(target.node_id.unwrap(), vec![0xff; 64]);
            }
        }
        let engine = &engines[i % 3];
        let command = KvCommand::Set(format!("k{i}"), format!("v{i}"));
        engine.execute_command::<KvStore>(command).await.unwrap();
    }
    for (outsider, _) in &outsiders {
        let stats = outsider.stats();
        assert_eq!(stats.connections_established, 0, "{stats:?}");
        assert!(stats.dial_failures > 0, "{stats:?}");
        assert_eq!(stats.messages_delivered, 0, "{stats:?}");
    }
    for engine in &engines {
        let text = engine.prometheus_metrics();
        assert!(!text.contains(&format!("from=\"{delta}\"")), "{text}");
        let senders: Vec<&str> = text
            .lines()
            .filter_map(|line| line.strip_prefix("consensus_peer_messages_received_total{from=\""))
            .filter_map(|rest| rest.split('"').next())
            .collect();
        assert!(!senders.is_empty(), "{text}");
        assert!(
            senders
                .iter()
                .all(|from| ["alpha", "bravo", "charlie"].contains(from)),
            "only members' messages reached the driver: {senders:?}"
        );
    }
    for (outsider, _) in outsiders {
        outsider.shutdown().await;
    }
    for engine in &mut engines {
        engine.stop().await.unwrap();
    }
}

/// Counts how many times each command was applied, shared with the test.
#[derive(Clone, Default)]
struct ApplyCounter {
    counts: Arc<Mutex<BTreeMap<u64, u32>>>,
}

impl StateMachine for ApplyCounter {
    type Command = u64;
    type Response = ();

    fn apply(&mut self, command: u64) {
        *self.counts.lock().unwrap().entry(command).or_default() += 1;
    }
}

/// The leader dies (no hand-over) while clients write through both followers, and more calls
/// are made at the followers after it stopped hearing anything (so their forwards are surely
/// lost with it): every proposal forwarded to it and not yet committed goes to the next leader
/// under its own tag, so every call gets a success answer (none waits out its deadline), and
/// every command is applied exactly once on each survivor, however many copies reached a log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proposals_forwarded_to_a_leader_that_dies_commit_once_through_the_next() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    const CLIENTS_PER_FOLLOWER: u64 = 16;
    const CALLS_PER_CLIENT: u64 = 20;
    const LATE_CALLS_PER_FOLLOWER: u64 = 8;
    const KILL_AFTER: usize = 100;
    let network = LocalNetwork::new();
    let names = ["r-1", "r-2", "r-3"];
    let mut engines = Vec::new();
    let mut counts = Vec::new();
    for name in names {
        let peers: Vec<&str> = names.iter().copied().filter(|n| *n != name).collect();
        let config = ConsensusConfig::default()
            .node_id(name)
            .peers(peers)
            .request_timeout(Duration::from_secs(3));
        let mut engine = ConsensusEngine::new(config)
            .unwrap()
            .with_local_network(&network);
        let counter = ApplyCounter::default();
        counts.push(counter.counts.clone());
        engine.set_state_machine(counter).unwrap();
        engine.start().await.unwrap();
        engines.push(Some(Arc::new(engine)));
    }
    let until = Instant::now() + Duration::from_secs(5);
    let leader = loop {
        let leaders: Vec<usize> = (0..3)
            .filter(|&i| engines[i].as_ref().is_some_and(|e| e.is_leader()))
            .collect();
        if let [only] = leaders[..] {
            break only;
        }
        assert!(Instant::now() < until, "no leader");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let followers: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    let acknowledged = Arc::new(AtomicUsize::new(0));
    // Each call's id is (client << 32) | call; late calls use clients past the others.
    let call = |follower: usize, client: u64, calls: std::ops::Range<u64>| {
        let engine = engines[follower].clone().unwrap();
        let acknowledged = acknowledged.clone();
        tokio::spawn(async move {
            let mut failures = Vec::new();
            for call in calls {
                let id = (client << 32) | call;
                match engine.execute_command::<ApplyCounter>(id).await {
                    Ok(()) => {
                        acknowledged.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(error) => failures.push((id, error.to_string())),
                }
            }
            failures
        })
    };
    let mut clients = Vec::new();
    for (f, &follower) in followers.iter().enumerate() {
        for client in 0..CLIENTS_PER_FOLLOWER {
            let client = f as u64 * CLIENTS_PER_FOLLOWER + client;
            clients.push(call(follower, client, 0..CALLS_PER_CLIENT));
        }
    }
    let until = Instant::now() + Duration::from_secs(10);
    while acknowledged.load(Ordering::SeqCst) < KILL_AFTER {
        assert!(Instant::now() < until, "the clients made no progress");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // Nothing reaches the leader any more, but its heartbeats still reach the followers, which
    // go on forwarding to it: the late calls' forwards are lost with it.
    let dead = engines[leader].as_ref().unwrap().node_id();
    network.disconnect(dead);
    for (f, &follower) in followers.iter().enumerate() {
        for late in 0..LATE_CALLS_PER_FOLLOWER {
            let client = 2 * CLIENTS_PER_FOLLOWER + f as u64 * LATE_CALLS_PER_FOLLOWER + late;
            clients.push(call(follower, client, 0..1));
        }
    }
    // Dropping the engine stops its driver without a hand-over: a crash. The followers learn it
    // only when its heartbeats stop, so the late calls were forwarded to it either way.
    drop(engines[leader].take());
    for client in clients {
        let failures = client.await.unwrap();
        assert!(failures.is_empty(), "calls failed: {failures:?}");
    }
    let total = 2 * (CLIENTS_PER_FOLLOWER * CALLS_PER_CLIENT + LATE_CALLS_PER_FOLLOWER);
    for &survivor in &followers {
        let until = Instant::now() + Duration::from_secs(5);
        loop {
            let counts = counts[survivor].lock().unwrap().clone();
            if counts.len() as u64 == total {
                let repeated: Vec<_> = counts.iter().filter(|(_, n)| **n != 1).collect();
                assert!(repeated.is_empty(), "applied more than once: {repeated:?}");
                break;
            }
            assert!(
                Instant::now() < until,
                "{} of {total} commands applied on a survivor",
                counts.len()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// A member removed from a group over TCP is forgotten by the others' transports once its
/// removal committed and a grace period passed (20 election timeouts: 3 s here): nothing
/// redials its address after that, where before they redialed it for as long as they ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_member_is_no_longer_dialed_after_the_grace() {
    let names = ["keep-a", "keep-b", "leaver"];
    let ports: Vec<u16> = names.iter().map(|_| free_port()).collect();
    let starts = names.iter().zip(&ports).map(|(name, port)| {
        let peers: Vec<String> = names
            .iter()
            .zip(&ports)
            .filter(|(other, _)| *other != name)
            .map(|(other, p)| format!("{other}@127.0.0.1:{p}"))
            .collect();
        let config = ConsensusConfig::default()
            .node_id(*name)
            .bind_address(format!("127.0.0.1:{port}"))
            .peers(peers)
            .insecure_plaintext(true);
        async move {
            let mut engine = ConsensusEngine::new(config).unwrap();
            engine.start().await.unwrap();
            engine
        }
    });
    let mut engines = futures::future::join_all(starts).await;
    let leader_of = |engines: &Vec<ConsensusEngine>| engines.iter().position(|e| e.is_leader());
    wait_until("a leader", Duration::from_secs(10), || {
        leader_of(&engines).is_some()
    })
    .await;
    // The leaver must not lead: hand over by removing it only while another node leads.
    let deadline = Instant::now() + Duration::from_secs(20);
    let membership = loop {
        if let Some(leader) = leader_of(&engines).filter(|&l| l != 2) {
            let keep = [NodeId::from_name("keep-a"), NodeId::from_name("keep-b")];
            match engines[leader].change_membership(keep).await {
                Ok(membership) => break membership,
                Err(error) => assert!(Instant::now() < deadline, "{error}"),
            }
        } else {
            assert!(Instant::now() < deadline, "the leaver kept leading");
            engines[2].hand_over_leadership().await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        !membership.contains(NodeId::from_name("leaver")),
        "{membership}"
    );
    let mut leaver = engines.pop().unwrap();
    leaver.stop().await.unwrap();
    // Its address answers again, so that a redial would be seen.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", ports[2]))
        .await
        .unwrap();
    let dials = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = dials.clone();
    let accepting = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drop(stream);
        }
    });
    // The grace (3 s from the commit) and then some: dials seen until then do not count.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let before = dials.load(std::sync::atomic::Ordering::SeqCst);
    // Longer than the transport's longest redial backoff (2 s).
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = dials.load(std::sync::atomic::Ordering::SeqCst);
    accepting.abort();
    assert_eq!(
        after, before,
        "the removed member's address was dialed again"
    );
    let result = engines[0].propose(Proposal::new("after", "v")).await;
    assert!(
        matches!(result, Ok(ConsensusResult::Committed { .. })),
        "the two left go on: {result:?}"
    );
    for engine in &mut engines {
        engine.stop().await.unwrap();
    }
}

/// A store whose writes wait while its gate is closed: a disk that hangs, on demand.
struct GatedStore {
    inner: consensus::storage::MemoryLogStore,
    gate: Arc<Gate>,
}

#[derive(Default)]
struct Gate {
    /// Whether writes wait, and how many are waiting now.
    state: Mutex<(bool, usize)>,
    changed: std::sync::Condvar,
}

impl Gate {
    fn close(&self) {
        self.state.lock().unwrap().0 = true;
    }

    fn open(&self) {
        self.state.lock().unwrap().0 = false;
        self.changed.notify_all();
    }

    fn waiting(&self) -> usize {
        self.state.lock().unwrap().1
    }

    fn pass(&self) {
        let mut state = self.state.lock().unwrap();
        state.1 += 1;
        while state.0 {
            state = self.changed.wait(state).unwrap();
        }
        state.1 -= 1;
    }
}

impl consensus::storage::LogStore for GatedStore {
    fn save_hard_state(
        &mut self,
        hard_state: consensus::storage::HardState,
    ) -> Result<(), consensus::StorageError> {
        self.inner.save_hard_state(hard_state)
    }

    fn truncate_from(&mut self, from: u64) -> Result<(), consensus::StorageError> {
        self.inner.truncate_from(from)
    }

    fn append(&mut self, entries: &[consensus::Entry]) -> Result<(), consensus::StorageError> {
        self.inner.append(entries)
    }

    fn sync(&mut self) -> Result<(), consensus::StorageError> {
        self.inner.sync()
    }

    fn recover(&mut self) -> Result<consensus::storage::RecoveredState, consensus::StorageError> {
        self.inner.recover()
    }

    fn write_records(
        &mut self,
        records: &[consensus::storage::RecordWrite],
    ) -> Result<(), consensus::StorageError> {
        self.inner.write_records(records)
    }

    /// Like a disk: the engine then writes beside its driver.
    fn waits_for_disk(&self) -> bool {
        true
    }

    fn persist(
        &mut self,
        write: &consensus::storage::LogWrite,
    ) -> Result<(), consensus::StorageError> {
        if !write.is_empty() {
            self.gate.pass();
        }
        self.inner.persist(write)
    }
}

/// A leader's followers commit what it is writing while its own fsync runs, and a leader whose
/// disk hangs is replaced. Its followers' acknowledgements commit the entry it is writing (they
/// are a quorum without it): they apply it and serve a linearizable read of it while it still
/// leads. Only its own client waits, since a node applies an entry once it holds it durably.
/// Past an election timeout the hung leader stops, as a node whose disk hangs must: the others
/// elect a leader and commit without it. Once its disk answers again it follows, and its client
/// gets the answer of the entry it proposed. (When the driver waited for each write, the leader
/// counted no acknowledgement during its own fsync, so nothing was applied anywhere before
/// another leader took over.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_commits_through_its_followers_while_its_disk_works_and_is_replaced_if_it_hangs() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = tcp_nodes(dir.path());
    let mut engines = Vec::new();
    let mut applied = Vec::new();
    let mut gates = Vec::new();
    for node in &nodes {
        // A long election timeout, so that what happens before it is not a race with it.
        let election = consensus::ElectionConfig::default()
            .election_timeout(Duration::from_secs(1))
            .heartbeat_interval(Duration::from_millis(20));
        let config = node
            .config()
            .election(election)
            .request_timeout(Duration::from_secs(30));
        let gate = Arc::new(Gate::default());
        let store = GatedStore {
            inner: Default::default(),
            gate: gate.clone(),
        };
        let mut engine = ConsensusEngine::new(config).unwrap().with_log_store(store);
        let state_machine = KvStore::default();
        applied.push(state_machine.applied.clone());
        engine.set_state_machine(state_machine).unwrap();
        engine.start().await.unwrap();
        engines.push(engine);
        gates.push(gate);
    }
    let leader_of = |engines: &Vec<ConsensusEngine>| engines.iter().position(|e| e.is_leader());
    wait_until("a leader known to all", Duration::from_secs(20), || {
        leader_of(&engines).is_some() && engines.iter().all(|e| e.current_leader().is_some())
    })
    .await;
    let leader = leader_of(&engines).unwrap();
    let set = |key: &str, value: &str| KvCommand::Set(key.into(), value.into());
    engines[leader]
        .execute_command::<KvStore>(set("k0", "v0"))
        .await
        .unwrap();
    wait_until("every replica to apply k0", Duration::from_secs(10), || {
        applied.iter().all(|a| a.lock().unwrap().len() == 1)
    })
    .await;

    gates[leader].close();
    let answer = {
        let put = engines[leader].execute_command::<KvStore>(set("k1", "v1"));
        tokio::pin!(put);
        hang_then_open(&engines, &applied, &gates, leader, put).await
    };
    assert_eq!(answer.unwrap(), None, "k1 was new");
    wait_until(
        "the old leader to apply k1 and k2",
        Duration::from_secs(10),
        || *applied[leader].lock().unwrap() == ["k0=v0", "k1=v1", "k2=v2"],
    )
    .await;
    for engine in &mut engines {
        engine.stop().await.unwrap();
    }
}

/// While `put`, made through `leader`, waits for the leader's hung write: the followers apply
/// it and serve it to a read while the leader still leads; then one of them takes over and
/// commits k2. Then opens the gate and returns `put`'s answer.
async fn hang_then_open(
    engines: &[ConsensusEngine],
    applied: &[Arc<Mutex<Vec<String>>>],
    gates: &[Arc<Gate>],
    leader: usize,
    mut put: std::pin::Pin<&mut impl std::future::Future<Output = Result<Option<String>, Error>>>,
) -> Result<Option<String>, Error> {
    let leader_id = engines[leader].node_id();
    let followers: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    let meanwhile = async {
        wait_until(
            "the leader's write to hang",
            Duration::from_secs(10),
            || gates[leader].waiting() == 1,
        )
        .await;
        wait_until("the followers to apply k1", Duration::from_secs(10), || {
            followers
                .iter()
                .all(|&i| applied[i].lock().unwrap().last().map(String::as_str) == Some("k1=v1"))
        })
        .await;
        for &i in &followers {
            let seen = engines[i]
                .read::<KvStore>(KvCommand::Get("k1".into()))
                .await
                .unwrap();
            assert_eq!(seen.as_deref(), Some("v1"));
        }
        // Before any election (a follower waits at least 1 s without heartbeats): under the
        // hung leader.
        for engine in engines {
            assert_eq!(engine.current_leader(), Some(leader_id));
        }
        assert_eq!(
            applied[leader].lock().unwrap().len(),
            1,
            "applied before it was durable"
        );

        wait_until("a follower to take over", Duration::from_secs(20), || {
            followers.iter().any(|&i| engines[i].is_leader())
        })
        .await;
        let new_leader = *followers.iter().find(|&&i| engines[i].is_leader()).unwrap();
        let command = KvCommand::Set("k2".into(), "v2".into());
        engines[new_leader]
            .execute_command::<KvStore>(command)
            .await
            .unwrap();
        assert_eq!(gates[leader].waiting(), 1, "the write still hangs");
    };
    tokio::select! {
        biased;
        answer = &mut put => panic!("answered while the leader's write hangs: {answer:?}"),
        () = meanwhile => {}
    }
    gates[leader].open();
    put.await
}
