//! Disk faults: a failed fsync stops the node with a typed error and is never retried (through
//! the engine with a fault-injecting store, and through the `consensus-node` binary with its
//! failpoint: exit code and message).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use consensus::node::client;
use consensus::node::{EXIT_STORAGE, FAILPOINT_FSYNC_ERROR_AFTER, write_loopback_cluster};
use consensus::storage::{FaultInjectingStore, FjallLogStore, SyncPolicy};
use consensus::{ConsensusConfig, ConsensusEngine, Error, Proposal, StorageError};

const BINARY: &str = env!("CARGO_BIN_EXE_consensus-node");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A one-node engine on a fjall store in `dir` wrapped in a fault injector.
async fn solo_engine(dir: &Path) -> (ConsensusEngine, consensus::storage::FaultHandle) {
    let store = FaultInjectingStore::new(
        FjallLogStore::open(dir, SyncPolicy::EveryBatch).expect("open the store"),
    );
    let handle = store.handle();
    let config = ConsensusConfig::default()
        .node_id("solo")
        .bind_address(format!("127.0.0.1:{}", free_port()))
        .request_timeout(Duration::from_secs(2));
    let mut engine = ConsensusEngine::new(config)
        .expect("valid config")
        .with_log_store(store);
    engine.start().await.expect("starts");
    let until = Instant::now() + Duration::from_secs(10);
    while !engine.is_leader() {
        assert!(Instant::now() < until, "a one-node cluster elects itself");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (engine, handle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fsync_stops_the_engine_with_a_typed_error_and_is_not_retried() {
    let dir = tempfile::tempdir().unwrap();
    let (mut engine, faults) = solo_engine(dir.path()).await;
    for index in 0..5 {
        engine
            .propose(Proposal::new(format!("k{index}"), "v"))
            .await
            .expect("writes succeed while the disk works");
    }
    faults.fail_syncs_from_now();
    let failed = engine.propose(Proposal::new("doomed", "v")).await;
    assert!(
        failed.is_err(),
        "a write whose fsync failed is never acknowledged"
    );
    tokio::time::timeout(Duration::from_secs(5), engine.storage_failed())
        .await
        .expect("the engine reports the storage failure");
    let attempts = faults.sync_attempts();
    // The driver is gone: later calls fail at once, and nothing syncs again.
    let later = engine.propose(Proposal::new("later", "v")).await;
    assert!(later.is_err());
    assert_eq!(
        faults.sync_attempts(),
        attempts,
        "a failed fsync is never retried"
    );
    match engine.stop().await {
        Err(Error::Storage(StorageError::SyncFailed { source, .. })) => {
            assert_eq!(source.raw_os_error(), Some(5), "{source}");
        }
        other => panic!("expected the typed fsync failure, got {other:?}"),
    }
}

#[test]
fn the_node_binary_exits_with_the_storage_code_and_message_when_fsync_fails() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = write_loopback_cluster(dir.path(), &[free_port(), free_port()]).unwrap();
    let node = &nodes[0];
    let mut child = Command::new(BINARY)
        .arg("--config")
        .arg(&node.config)
        // The election and the leader's first entry sync; the first client write's fails.
        .env(FAILPOINT_FSYNC_ERROR_AFTER, "2")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let until = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < until,
            "the node did not stop after its fsync failed"
        );
        // Writes until one needs a sync; errors are expected once the store failed.
        let _ = runtime.block_on(client::request(
            node.http,
            "PUT",
            "/kv/key",
            b"value",
            Duration::from_secs(1),
        ));
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(i32::from(EXIT_STORAGE)), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.contains("fsync") && last.contains("never retried") && last.contains("os error 5"),
        "the last line names the failure: {last}\n{stderr}"
    );
}
