//! Black-box tests of the `consensus-node` binary: real processes on loopback, each test with its
//! own ports and temp dirs, driven over HTTP.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use consensus::node::client::{self, HttpResponse};
use serde_json::Value;

const BINARY: &str = env!("CARGO_BIN_EXE_consensus-node");
/// Per-request client timeout: above the nodes' 2 s request deadline.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

#[path = "common/ports.rs"]
mod ports;
use ports::free_ports;

struct Node {
    name: String,
    http: SocketAddr,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    /// Runs the `maverick` example with this behaviour instead of `consensus-node`.
    maverick: Option<&'static str>,
    /// Extra command-line arguments (`--join ADDR`).
    args: Vec<String>,
}

impl Node {
    fn new(files: consensus::node::LoopbackNodeFiles, maverick: Option<&'static str>) -> Node {
        Node {
            name: files.name,
            http: files.http,
            config: files.config,
            log: files.log,
            child: None,
            maverick,
            args: Vec::new(),
        }
    }

    fn spawn(&mut self) {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut command = match self.maverick {
            Some(behaviour) => {
                let mut command = Command::new(maverick_binary());
                command.args(["--behaviour", behaviour]);
                command
            }
            None => Command::new(BINARY),
        };
        let child = command
            .arg("--config")
            .arg(&self.config)
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// SIGKILL: no shutdown, no flush beyond what the node already synced.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }
}

struct Cluster {
    _dir: tempfile::TempDir,
    nodes: Vec<Node>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
    }
}

impl Cluster {
    /// Writes the configurations of `size` nodes and starts them.
    fn start(size: usize) -> Cluster {
        Cluster::start_of(size, consensus::Algorithm::Raft)
    }

    /// Writes the configurations of `size` nodes of `algorithm` and starts them.
    fn start_of(size: usize, algorithm: consensus::Algorithm) -> Cluster {
        Cluster::start_with(size, algorithm, |_| None)
    }

    /// [`Cluster::start_of`], where the node named `name` runs the `maverick` example with the
    /// behaviour `maverick(name)` says, if it says one.
    fn start_with(
        size: usize,
        algorithm: consensus::Algorithm,
        maverick: impl Fn(&str) -> Option<&'static str>,
    ) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let ports = free_ports(2 * size);
        let files =
            consensus::node::write_loopback_cluster_of(dir.path(), &ports, algorithm).unwrap();
        let mut nodes = Vec::new();
        for files in files {
            let behaviour = maverick(&files.name);
            let mut node = Node::new(files, behaviour);
            node.spawn();
            nodes.push(node);
        }
        Cluster { _dir: dir, nodes }
    }

    /// A Raft cluster of `founders` running nodes, and `size - founders` more configured to
    /// join it (no `bootstrap_peers`), not started.
    fn start_with_joiners(
        size: usize,
        founders: usize,
        algorithm: consensus::Algorithm,
    ) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let ports = free_ports(2 * size);
        let files = consensus::node::write_loopback_cluster_with_joiners(
            dir.path(),
            &ports,
            founders,
            algorithm,
        )
        .unwrap();
        let mut nodes: Vec<Node> = files.into_iter().map(|f| Node::new(f, None)).collect();
        for node in &mut nodes[..founders] {
            node.spawn();
        }
        Cluster { _dir: dir, nodes }
    }

    /// Waits up to 15 s for node `i` to exit on its own and returns how it exited; `waiting_for`
    /// is the failure message.
    async fn exit_of(&mut self, i: usize, waiting_for: &str) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let child = self.nodes[i].child.as_mut().expect("the node runs");
            if let Some(exit) = child.try_wait().unwrap() {
                self.nodes[i].child = None;
                return exit;
            }
            assert!(Instant::now() < deadline, "{waiting_for}\n{}", self.logs());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGTERM to node `i`, and how it exited (see [`Cluster::exit_of`]).
    async fn terminate(&mut self, i: usize) -> std::process::ExitStatus {
        let pid = self.nodes[i].child.as_ref().expect("the node runs").id();
        let status = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        self.exit_of(i, "no exit after SIGTERM").await
    }

    fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| {
                let text = std::fs::read_to_string(&n.log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                format!(
                    "--- {} ---\n{}",
                    n.name,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    async fn call(
        &self,
        node: usize,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Option<HttpResponse> {
        client::request(self.nodes[node].http, method, path, body, CLIENT_TIMEOUT)
            .await
            .ok()
    }

    async fn status(&self, node: usize) -> Option<Value> {
        let response = self.call(node, "GET", "/status", b"").await?;
        assert_eq!(response.status, 200, "{}", response.text());
        serde_json::from_slice(&response.body).ok()
    }

    /// Waits until every node in `among` names the same leader, itself one of `among`.
    async fn leader(&self, among: &[usize], within: Duration) -> usize {
        let deadline = Instant::now() + within;
        loop {
            let mut statuses = Vec::new();
            for &i in among {
                statuses.push(self.status(i).await);
            }
            let leaders: Vec<Option<&str>> = statuses
                .iter()
                .map(|s| s.as_ref().and_then(|s| s["leader"].as_str()))
                .collect();
            if let Some(Some(leader)) = leaders.first()
                && leaders.iter().all(|l| *l == Some(leader))
                && let Some(position) = statuses
                    .iter()
                    .position(|s| s.as_ref().and_then(|s| s["node_id"].as_str()) == Some(leader))
            {
                return among[position];
            }
            assert!(
                Instant::now() < deadline,
                "no agreed leader among {among:?} within {within:?}: {statuses:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends the request until it gets a non-5xx answer or `within` passes; a 5xx or no answer
    /// means the outcome is unknown, so only idempotent requests are retried this way.
    async fn until_answered(
        &self,
        nodes: &[usize],
        method: &str,
        path: &str,
        body: &[u8],
        within: Duration,
    ) -> HttpResponse {
        let deadline = Instant::now() + within;
        let mut attempt = 0;
        loop {
            let node = nodes[attempt % nodes.len()];
            attempt += 1;
            match self.call(node, method, path, body).await {
                Some(response) if response.status < 500 => return response,
                last => assert!(
                    Instant::now() < deadline,
                    "{method} {path}: no answer within {within:?}, last {last:?}\n{}",
                    self.logs()
                ),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Every acknowledged write is there, read through `node`.
async fn check_acknowledged(
    cluster: &Cluster,
    node: usize,
    acked: &BTreeMap<String, Option<String>>,
) {
    for (key, value) in acked {
        let response = cluster
            .until_answered(
                &[node],
                "GET",
                &format!("/kv/{key}"),
                b"",
                Duration::from_secs(15),
            )
            .await;
        match value {
            Some(value) => {
                assert_eq!(
                    response.status,
                    200,
                    "{key} on node {node}: {}",
                    response.text()
                );
                assert_eq!(response.text(), *value, "{key} on node {node}");
            }
            None => assert_eq!(
                response.status,
                404,
                "{key} on node {node}: {}",
                response.text()
            ),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_cluster_serves_fails_over_and_a_restarted_node_has_every_write() {
    let mut cluster = Cluster::start(3);
    let all = [0, 1, 2];
    let leader = cluster.leader(&all, Duration::from_secs(20)).await;
    let follower = (leader + 1) % 3;
    let other = (leader + 2) % 3;
    let mut acked: BTreeMap<String, Option<String>> = BTreeMap::new();

    // Write through a follower, read through another node.
    for i in 0..10 {
        let (key, value) = (format!("k{i}"), format!("v{i}"));
        let response = cluster
            .until_answered(
                &[follower],
                "PUT",
                &format!("/kv/{key}"),
                value.as_bytes(),
                Duration::from_secs(15),
            )
            .await;
        assert_eq!(response.status, 200, "{}", response.text());
        acked.insert(key, Some(value));
    }
    let read = cluster.call(other, "GET", "/kv/k3", b"").await.unwrap();
    assert_eq!((read.status, read.text().as_str()), (200, "v3"));
    let missing = cluster
        .call(other, "GET", "/kv/nothing", b"")
        .await
        .unwrap();
    assert_eq!(missing.status, 404);

    // Compare-and-swap: a match swaps; a stale one is 409 with the current value.
    let swap = cluster
        .call(
            other,
            "POST",
            "/kv/k1/cas",
            br#"{"from": "v1", "to": "w1"}"#,
        )
        .await
        .unwrap();
    assert_eq!(swap.status, 200, "{}", swap.text());
    acked.insert("k1".into(), Some("w1".into()));
    let stale = cluster
        .call(
            follower,
            "POST",
            "/kv/k1/cas",
            br#"{"from": "v1", "to": "x1"}"#,
        )
        .await
        .unwrap();
    assert_eq!(stale.status, 409);
    let current: Value = serde_json::from_slice(&stale.body).unwrap();
    assert_eq!(current["current"], "w1");
    let create = cluster
        .call(
            leader,
            "POST",
            "/kv/fresh/cas",
            br#"{"from": null, "to": "new"}"#,
        )
        .await
        .unwrap();
    assert_eq!(create.status, 200, "{}", create.text());
    acked.insert("fresh".into(), Some("new".into()));
    let bad = cluster
        .call(leader, "POST", "/kv/k1/cas", b"{\"to\": 3}")
        .await
        .unwrap();
    assert_eq!(bad.status, 400, "{}", bad.text());

    // Delete, absent keys too.
    for key in ["k2", "never-written"] {
        let response = cluster
            .call(follower, "DELETE", &format!("/kv/{key}"), b"")
            .await
            .unwrap();
        assert_eq!(response.status, 200, "{}", response.text());
        acked.insert(key.into(), None);
    }

    // Status and metrics.
    let status = cluster.status(other).await.unwrap();
    assert_eq!(status["members"].as_array().unwrap().len(), 3, "{status}");
    // Role and leader agree (a re-election may have happened since, so either role is valid).
    let leads = status["leader"] == status["node_id"];
    assert_eq!(
        status["role"],
        if leads { "leader" } else { "follower" },
        "{status}"
    );
    assert!(status["commit_index"].as_u64().unwrap() >= 14, "{status}");
    let metrics = cluster
        .call(follower, "GET", "/metrics", b"")
        .await
        .unwrap();
    for name in [
        "consensus_term_current",
        "consensus_committed_index",
        "consensus_proposal_latency_seconds",
        "consensus_vote_processing_duration_seconds",
        "consensus_leader_changes",
        "consensus_byzantine_detections",
    ] {
        assert!(metrics.text().contains(name), "{name} missing");
    }

    // SIGKILL the leader; keep writing through the survivors.
    cluster.nodes[leader].kill();
    let survivors = [follower, other];
    for i in 0..10 {
        let (key, value) = (format!("after{i}"), format!("a{i}"));
        // A PUT of the same value is idempotent: retrying after an unknown outcome is safe.
        let response = cluster
            .until_answered(
                &survivors,
                "PUT",
                &format!("/kv/{key}"),
                value.as_bytes(),
                Duration::from_secs(20),
            )
            .await;
        assert_eq!(response.status, 200, "{}", response.text());
        acked.insert(key, Some(value));
    }
    let new_leader = cluster.leader(&survivors, Duration::from_secs(20)).await;
    assert_ne!(new_leader, leader);

    // Restart the old leader from its data dir: it rejoins and serves every acknowledged write.
    cluster.nodes[leader].spawn();
    cluster.leader(&all, Duration::from_secs(20)).await;
    for node in all {
        check_acknowledged(&cluster, node, &acked).await;
    }
    // Its own state machine caught up by replay, not only through reads routed to the leader.
    let target = cluster.status(new_leader).await.unwrap()["commit_index"]
        .as_u64()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let applied = cluster
            .status(leader)
            .await
            .and_then(|s| s["applied_index"].as_u64());
        if applied >= Some(target) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "restarted node applied {applied:?} < {target}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_four_node_pbft_cluster_serves_through_any_node_and_survives_its_primary() {
    let cluster = Cluster::start_of(4, consensus::Algorithm::Pbft);
    let all = [0, 1, 2, 3];
    let primary = cluster.leader(&all, Duration::from_secs(30)).await;
    let status = cluster.status(primary).await.expect("status");
    assert_eq!(status["algorithm"], "pbft", "{status}");
    assert_eq!(status["f"], 1, "{status}");
    assert_eq!(status["view"], status["term"], "{status}");
    assert_eq!(status["primary"], status["leader"], "{status}");
    assert_eq!(status["excluded"], serde_json::json!([]), "{status}");
    let report = cluster
        .call(primary, "GET", "/byzantine", b"")
        .await
        .expect("answer");
    assert_eq!(report.status, 200);
    let report: Value = serde_json::from_slice(&report.body).unwrap();
    assert_eq!(
        report["detections"],
        serde_json::json!([]),
        "an honest cluster accuses no one"
    );
    let backup = (primary + 1) % 4;
    let put = cluster.call(backup, "PUT", "/kv/greeting", b"hello").await;
    assert_eq!(put.map(|r| r.status), Some(200), "{}", cluster.logs());
    for node in all {
        let get = cluster
            .call(node, "GET", "/kv/greeting", b"")
            .await
            .expect("answer");
        assert_eq!(get.text(), "hello", "node {node}");
    }
    let mut cluster = cluster;
    cluster.nodes[primary].kill();
    let survivors: Vec<usize> = all.into_iter().filter(|&n| n != primary).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let put = cluster.call(backup, "PUT", "/kv/greeting", b"again").await;
        if put.as_ref().is_some_and(|r| r.status == 200) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no write after the primary died\n{}",
            cluster.logs()
        );
    }
    let new_primary = cluster.leader(&survivors, Duration::from_secs(30)).await;
    assert_ne!(new_primary, primary);
    let status = cluster.status(new_primary).await.expect("status");
    assert!(status["view"].as_u64() >= Some(1), "{status}");
}

/// SIGTERM to the leader of three: it hands leadership over before it stops, and a client
/// writing through a follower all along gets every write acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_stopped_with_sigterm_hands_over_and_no_write_through_a_follower_fails() {
    let mut cluster = Cluster::start(3);
    let all = [0, 1, 2];
    let leader = cluster.leader(&all, Duration::from_secs(20)).await;
    let follower = (leader + 1) % 3;
    let through = cluster.nodes[follower].http;
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicUsize::new(0));
    let writer = {
        let (stop, written) = (stop.clone(), written.clone());
        tokio::spawn(async move {
            let mut answers = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let path = format!("/kv/w{}", answers.len());
                let answer = client::request(through, "PUT", &path, b"v", CLIENT_TIMEOUT).await;
                answers.push(
                    answer
                        .map(|r| (r.status, r.text()))
                        .map_err(|e| e.to_string()),
                );
                written.fetch_add(1, Ordering::Relaxed);
            }
            answers
        })
    };
    let wait_for_writes = |at_least: usize| {
        let written = written.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(15);
            while written.load(Ordering::Relaxed) < at_least {
                assert!(Instant::now() < deadline, "the writer is stuck");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    wait_for_writes(20).await; // some before the stop
    let exit = cluster.terminate(leader).await;
    assert!(exit.success(), "{exit:?}\n{}", cluster.logs());
    let survivors: Vec<usize> = all.iter().copied().filter(|&i| i != leader).collect();
    cluster.leader(&survivors, Duration::from_secs(20)).await;
    wait_for_writes(written.load(Ordering::Relaxed) + 20).await; // and some after
    stop.store(true, Ordering::Relaxed);
    let answers = writer.await.unwrap();
    let failed: Vec<_> = answers
        .iter()
        .filter(|a| !matches!(a, Ok((200, _))))
        .collect();
    assert!(answers.len() > 10, "too few writes: {}", answers.len());
    assert!(
        failed.is_empty(),
        "failed writes: {failed:?}\n{}",
        cluster.logs()
    );
    let log = std::fs::read_to_string(&cluster.nodes[leader].log).unwrap();
    assert!(
        log.contains("handed leadership over before stopping"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_body_gets_413_and_sigterm_stops_the_node_cleanly() {
    let mut cluster = Cluster::start(1);
    cluster.leader(&[0], Duration::from_secs(20)).await;
    let ok = cluster
        .until_answered(&[0], "PUT", "/kv/small", b"fits", Duration::from_secs(15))
        .await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    let huge = vec![b'x'; consensus::node::http::MAX_BODY_BYTES + 1];
    let refused = cluster.call(0, "PUT", "/kv/huge", &huge).await.unwrap();
    assert_eq!(refused.status, 413, "{}", refused.text());
    let refused = cluster
        .call(0, "POST", "/kv/huge/cas", &huge)
        .await
        .unwrap();
    assert_eq!(refused.status, 413, "{}", refused.text());
    // The node still serves, and the refused value was never written.
    let missing = cluster.call(0, "GET", "/kv/huge", b"").await.unwrap();
    assert_eq!(missing.status, 404, "{}", missing.text());
    let read = cluster.call(0, "GET", "/kv/small", b"").await.unwrap();
    assert_eq!((read.status, read.text().as_str()), (200, "fits"));

    // SIGTERM: the node stops on its own, with success.
    let exit = cluster.terminate(0).await;
    assert!(exit.success(), "{exit:?}\n{}", cluster.logs());
    assert!(
        cluster.logs().contains("node stopped"),
        "{}",
        cluster.logs()
    );
}

/// Runs the binary on `config` and returns its exit code and stderr.
fn run_with_config(dir: &Path, config: &str, extra: &[&str]) -> (Option<i32>, String) {
    let path = dir.join("node.toml");
    std::fs::write(&path, config).unwrap();
    let output = Command::new(BINARY)
        .arg("--config")
        .arg(&path)
        .args(extra)
        .output()
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn a_malformed_config_exits_2_with_one_line_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let good = "[consensus]\nnode_id = \"a\"\nbind_address = \"127.0.0.1:1\"\n\
                election_timeout_ms = 300\nheartbeat_interval_ms = 50\n\n[http]\naddress = \"127.0.0.1:2\"\n";
    let cases = [
        (
            good.replace("heartbeat_interval_ms = 50", "heartbeat_interval_ms = 500"),
            "heartbeat_interval_ms",
        ),
        (
            good.replace("election_timeout_ms", "election_timout_ms"),
            "election_timout_ms",
        ),
        (good.replace("node_id = \"a\"", "node_id = "), "line 2"),
        (
            good.replace("127.0.0.1:2", "not-an-address"),
            "not-an-address",
        ),
        (
            good.replace("address = \"127.0.0.1:2\"", ""),
            "http.address",
        ),
        (good.replace("[consensus]", "[consenssus]"), "[consensus]"),
    ];
    for (config, named) in cases {
        let (code, stderr) = run_with_config(dir.path(), &config, &[]);
        assert_eq!(code, Some(2), "{stderr}");
        assert!(stderr.contains(named), "expected {named:?} in {stderr:?}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr:?}");
    }
    let (code, stderr) = run_with_config(dir.path(), good, &["--http", "bad"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("bad"), "{stderr}");
    let output = Command::new(BINARY)
        .args(["--config", "/nonexistent/node.toml"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("/nonexistent/node.toml"), "{stderr}");
    let output = Command::new(BINARY).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
}

/// Runs `consensus-node keygen FILE`.
fn keygen(path: &Path) -> std::process::Output {
    Command::new(BINARY)
        .arg("keygen")
        .arg(path)
        .output()
        .unwrap()
}

#[test]
fn keygen_prints_the_public_key_of_a_new_file_and_never_overwrites_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.key");
    let output = keygen(&path);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(stderr.is_empty(), "{stderr}");
    let stdout = String::from_utf8(output.stdout).unwrap();
    let public_key = stdout.strip_suffix('\n').unwrap_or(&stdout);
    assert!(
        public_key.len() == 64
            && public_key
                .chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)),
        "only the public key in lowercase hex: {stdout:?}"
    );
    // The printed key is the file's: a configuration listing it loads.
    let identity = consensus::ConsensusConfig::default()
        .algorithm(consensus::Algorithm::GpuOptimizedRaft)
        .node_id("a")
        .key_file(&path)
        .validator("a", public_key)
        .signing_identity()
        .unwrap();
    assert_eq!(
        consensus::keys::public_key_hex(&identity.signing_key.verifying_key()),
        public_key
    );
    let written = std::fs::read(&path).unwrap();
    let again = keygen(&path);
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert_eq!(again.status.code(), Some(2), "{stderr}");
    assert!(again.stdout.is_empty());
    assert!(
        stderr.contains(&path.display().to_string()) && stderr.contains("overwrite"),
        "{stderr}"
    );
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr:?}");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        written,
        "the key is unchanged"
    );
}

#[test]
fn a_signed_algorithm_with_a_bad_key_or_table_exits_2_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let public: BTreeMap<&str, String> = ["a", "b", "c", "d"]
        .into_iter()
        .map(|name| {
            let key = consensus::keys::generate_key_file(dir.path().join(format!("{name}.key")));
            (name, consensus::keys::public_key_hex(&key.unwrap()))
        })
        .collect();
    let a_key = dir.path().join("a.key").display().to_string();
    let config = |algorithm: &str, key_file: &str, a_public: &str, members: &[&str]| {
        let peers: Vec<String> = members[1..]
            .iter()
            .enumerate()
            .map(|(i, name)| format!("\"{name}@127.0.0.1:{}\"", 7002 + i))
            .collect();
        let mut table = format!("a = \"{a_public}\"\n");
        for name in &members[1..] {
            table.push_str(&format!("{name} = \"{}\"\n", public[name]));
        }
        format!(
            "[consensus]\nalgorithm = \"{algorithm}\"\nnode_id = \"a\"\n\
             bind_address = \"127.0.0.1:7001\"\nbootstrap_peers = [{}]\nkey_file = \"{key_file}\"\n\n\
             [consensus.validators]\n{table}\n[http]\naddress = \"127.0.0.1:1\"\n",
            peers.join(", ")
        )
    };
    let all = ["a", "b", "c", "d"];
    let missing_file = dir.path().join("none.key").display().to_string();
    let cases = [
        // a's entry lists b's key: the file does not match, and both keys are shown.
        (
            config("pbft", &a_key, &public["b"], &all),
            vec!["does not match", a_key.as_str(), public["b"].as_str()],
        ),
        (
            config("gpu_optimized_raft", &a_key, &public["b"], &all),
            vec!["does not match", a_key.as_str()],
        ),
        (
            config("pbft", &missing_file, &public["a"], &all),
            vec!["none.key", "cannot read"],
        ),
        (
            config("pbft", &a_key, &public["a"], &all[..3]),
            vec!["3f + 1", "3 configured"],
        ),
        (
            config("pbft", &a_key, "not-a-key", &all),
            vec!["\"a\"", "not-a-key"],
        ),
        (
            config("gpu_optimized_raft", &a_key, &public["a"], &all)
                .replace(&format!("c = \"{}\"\n", public["c"]), ""),
            vec!["no public key for member \"c\""],
        ),
    ];
    for (text, named) in cases {
        let (code, stderr) = run_with_config(dir.path(), &text, &[]);
        assert_eq!(code, Some(2), "{stderr}\n{text}");
        for part in named {
            assert!(stderr.contains(part), "expected {part:?} in {stderr:?}");
        }
        assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr:?}");
    }
}

/// The `maverick` example's binary, which `cargo test` builds beside the test binaries
/// (`target/<profile>/examples/`).
fn maverick_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap();
    let binary = profile_dir
        .join("examples")
        .join(format!("maverick{}", std::env::consts::EXE_SUFFIX));
    assert!(
        binary.exists(),
        "{} is missing: `cargo test` builds it; alone, `cargo build --example maverick`",
        binary.display()
    );
    binary
}

/// The value of an unlabelled Prometheus sample, or the sum over its labels.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Three honest `consensus-node`s and one `maverick` process per behaviour, on TCP: writes
/// through the honest nodes all succeed and read back everywhere; a provable behaviour ends
/// with the maverick excluded by every honest node (`/status`) and counted (`/metrics`); an
/// unprovable one blames no one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn honest_nodes_exclude_a_provably_byzantine_process_and_blame_no_one_else() {
    use consensus::NodeId;
    // Primaries go by rank: the member with the smallest id leads view 0, the next view 1.
    let mut ranked = ["node-1", "node-2", "node-3", "node-4"];
    ranked.sort_by_key(|name| NodeId::from_name(name));
    for (behaviour, provable) in [
        ("equivocate", true),
        ("double-vote", true),
        ("bad-view-change", true),
        ("forge", false),
        ("replay", false),
        ("silent", false),
        ("garbage", false),
    ] {
        // The equivocator needs to lead view 0, the bad view change to lead the next view
        // (view 0's primary is killed for it); the others misbehave as a backup.
        let maverick_name = match behaviour {
            "equivocate" => ranked[0],
            "bad-view-change" => ranked[1],
            _ => ranked[3],
        };
        let mut cluster = Cluster::start_with(4, consensus::Algorithm::Pbft, |name| {
            (name == maverick_name).then_some(behaviour)
        });
        let maverick = cluster
            .nodes
            .iter()
            .position(|n| n.name == maverick_name)
            .unwrap();
        let honest: Vec<usize> = (0..4).filter(|&i| i != maverick).collect();
        let maverick_id = NodeId::from_name(maverick_name).to_string();
        let context =
            |cluster: &Cluster, what: &str| format!("{behaviour}: {what}\n{}", cluster.logs());

        // Writes through every honest node, one at a time; for the bad view change, view 0's
        // primary is killed halfway and restarted once the maverick's NEW-VIEW was refused
        // (with it excluded and one honest replica down, no quorum is left until then).
        let mut acked = BTreeMap::new();
        for i in 0..30 {
            if behaviour == "bad-view-change" && i == 15 {
                let first_primary = cluster.nodes.iter().position(|n| n.name == ranked[0]);
                let first_primary = first_primary.unwrap();
                cluster.nodes[first_primary].kill();
                let others: Vec<usize> = honest
                    .iter()
                    .copied()
                    .filter(|&n| n != first_primary)
                    .collect();
                // A request waiting is what makes backups suspect the dead primary.
                let waiting = client::request(
                    cluster.nodes[others[0]].http,
                    "PUT",
                    "/kv/waiting",
                    b"w",
                    Duration::from_secs(1),
                );
                let _ = waiting.await;
                excluded_everywhere(&cluster, &others, &maverick_id, behaviour).await;
                cluster.nodes[first_primary].spawn();
            }
            let (key, value) = (format!("{behaviour}-{i}"), format!("v{i}"));
            let response = cluster
                .until_answered(
                    &[honest[i % 3]],
                    "PUT",
                    &format!("/kv/{key}"),
                    value.as_bytes(),
                    Duration::from_secs(30),
                )
                .await;
            assert_eq!(
                response.status,
                200,
                "{}",
                context(&cluster, &response.text())
            );
            acked.insert(key, Some(value));
        }
        for &node in &honest {
            check_acknowledged(&cluster, node, &acked).await;
        }
        let context = |what: &str| context(&cluster, what);

        if provable {
            excluded_everywhere(&cluster, &honest, &maverick_id, behaviour).await;
        }
        for &node in &honest {
            if !provable {
                let status = cluster.status(node).await.expect("status");
                assert_eq!(
                    status["excluded"],
                    serde_json::json!([]),
                    "{}",
                    context(&format!("{status}"))
                );
            }
            let metrics = cluster.call(node, "GET", "/metrics", b"").await.unwrap();
            let detections = metric(&metrics.text(), "consensus_byzantine_detections_total");
            let report = cluster.call(node, "GET", "/byzantine", b"").await.unwrap();
            let report: Value = serde_json::from_slice(&report.body).unwrap();
            let accused: Vec<&str> = report["detections"]
                .as_array()
                .expect("detections")
                .iter()
                .filter_map(|d| d["offender"].as_str())
                .collect();
            if provable {
                assert!(detections >= 1.0, "{}", context("no detection counted"));
                assert_eq!(accused, [maverick_id.as_str()], "{}", context("accused"));
                let offence = match behaviour {
                    "equivocate" => "equivocating_primary",
                    "double-vote" => "double_vote",
                    _ => "unjustified_new_view",
                };
                assert_eq!(
                    report["detections"][0]["offence"],
                    offence,
                    "{}",
                    context(&format!("{report}"))
                );
            } else {
                assert_eq!(detections, 0.0, "{}", context("a detection counted"));
                assert!(accused.is_empty(), "{}", context(&format!("{report}")));
            }
            // What the unprovable ones sent is dropped and counted, by reason.
            let reason = match behaviour {
                "forge" => Some("bad_signature"),
                "garbage" => Some("malformed"),
                "replay" => Some("stale"),
                _ => None,
            };
            if let Some(reason) = reason {
                let sample = format!("consensus_invalid_messages_total{{reason=\"{reason}\"}}");
                let counted = metric(&metrics.text(), &sample);
                assert!(
                    counted >= 1.0,
                    "{}",
                    context(&format!("no {reason} counted"))
                );
            }
        }
        eprintln!(
            "{behaviour}: {} writes acknowledged and read back on the 3 honest nodes; maverick excluded: {provable}",
            acked.len()
        );
    }
}

/// Waits until every node of `nodes` excludes `offender` (and only it).
async fn excluded_everywhere(cluster: &Cluster, nodes: &[usize], offender: &str, behaviour: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    for &node in nodes {
        loop {
            let status = cluster.status(node).await;
            let excluded: Vec<&str> = status
                .as_ref()
                .and_then(|s| s["excluded"].as_array())
                .map(|e| e.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            if excluded == [offender] {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{behaviour}: node {node} never excluded {offender}: {status:?}\n{}",
                cluster.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gpu_optimized_raft_cluster_checks_signed_requests_and_its_data_dirs_verify_offline() {
    use consensus::client_signature::{client_signing_bytes, http_statement};
    use consensus::node::http::{CLIENT_KEY_HEADER, CLIENT_SIGNATURE_HEADER};
    use ed25519_dalek::Signer as _;

    let mut cluster = Cluster::start_of(3, consensus::Algorithm::GpuOptimizedRaft);
    let all = [0, 1, 2];
    let leader = cluster.leader(&all, Duration::from_secs(30)).await;
    let follower = (leader + 1) % 3;
    let status = cluster.status(leader).await.expect("status");
    assert_eq!(status["algorithm"], "gpu_optimized_raft", "{status}");

    let key = ed25519_dalek::SigningKey::from_bytes(&[5; 32]);
    let public = hex(key.verifying_key().as_bytes());
    let sign = |method: &str, path: &str, body: &[u8]| {
        let statement = http_statement(method, path, body);
        hex(&key.sign(&client_signing_bytes(&statement)).to_bytes())
    };
    let signed_call = |node: usize,
                       method: &'static str,
                       path: &'static str,
                       body: &'static [u8],
                       signature: String| {
        let address = cluster.nodes[node].http;
        let public = public.clone();
        async move {
            let headers = [
                (CLIENT_KEY_HEADER, public.as_str()),
                (CLIENT_SIGNATURE_HEADER, signature.as_str()),
            ];
            client::request_with_headers(address, method, path, &headers, body, CLIENT_TIMEOUT)
                .await
                .expect("an answer")
        }
    };
    // Signed, through the leader and through a follower (the leader checks it again).
    for (node, path, body) in [(leader, "/kv/a", &b"1"[..]), (follower, "/kv/b", &b"2"[..])] {
        let response = signed_call(node, "PUT", path, body, sign("PUT", path, body)).await;
        assert_eq!(response.status, 200, "{path}: {}", response.text());
    }
    let response = signed_call(
        follower,
        "DELETE",
        "/kv/b",
        b"",
        sign("DELETE", "/kv/b", b""),
    )
    .await;
    assert_eq!(response.status, 200, "{}", response.text());
    // A signature over another body is refused with a reason, and never applied.
    let response = signed_call(follower, "PUT", "/kv/a", b"666", sign("PUT", "/kv/a", b"1")).await;
    assert_eq!(response.status, 403, "{}", response.text());
    let reason: Value = serde_json::from_slice(&response.body).expect("JSON");
    assert_eq!(reason["error"], "client_signature", "{reason}");
    assert!(
        reason["reason"]
            .as_str()
            .is_some_and(|r| r.contains("does not verify")),
        "{reason}"
    );
    // Half a header pair is a bad request.
    let response = client::request_with_headers(
        cluster.nodes[leader].http,
        "PUT",
        "/kv/a",
        &[(CLIENT_KEY_HEADER, public.as_str())],
        b"3",
        CLIENT_TIMEOUT,
    )
    .await
    .expect("an answer");
    assert_eq!(response.status, 400, "{}", response.text());
    // Unsigned requests still work without an allow-list.
    let response = cluster
        .call(follower, "PUT", "/kv/c", b"plain")
        .await
        .expect("answer");
    assert_eq!(response.status, 200, "{}", response.text());
    for node in all {
        let get = cluster
            .until_answered(&[node], "GET", "/kv/a", b"", Duration::from_secs(10))
            .await;
        assert_eq!(get.text(), "1", "node {node}");
    }
    // Followers receive the newest certificate with a heartbeat; then every data dir checks.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for node in &mut cluster.nodes {
        node.kill();
    }
    for name in ["node-1", "node-2", "node-3"] {
        let data_dir = cluster._dir.path().join(name);
        let output = Command::new(BINARY)
            .arg("verify-log")
            .arg(&data_dir)
            .arg("--config")
            .arg(cluster._dir.path().join(format!("{name}.toml")))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert_eq!(output.status.code(), Some(0), "{name}: {stdout}");
        assert!(
            stdout.contains("3 client signatures verified"),
            "{name}: {stdout}"
        );
    }
    // A data dir that is not one.
    let output = Command::new(BINARY)
        .args(["verify-log", "/nonexistent/dir"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
}

/// Writes a loopback cluster's files into `dir`, adds `lines` to the first node's `[http]`
/// table (the last table of the file), and starts that node alone; the caller kills it.
fn spawn_one_node_with_http_lines(
    dir: &Path,
    lines: &str,
) -> (consensus::node::LoopbackNodeFiles, Child) {
    let nodes = consensus::node::write_loopback_cluster(dir, &free_ports(2)).unwrap();
    let node = nodes.into_iter().next().unwrap();
    let text = std::fs::read_to_string(&node.config).unwrap();
    std::fs::write(&node.config, format!("{text}{lines}")).unwrap();
    let child = Command::new(BINARY)
        .arg("--config")
        .arg(&node.config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    (node, child)
}

/// `[http] token_file`: writes and admin routes without `Authorization: Bearer <token>`, or
/// with another token, get 401 and change nothing; reads and `/status` stay open; with the
/// token, writes go through. An empty token file is a configuration error (exit 2).
#[test]
fn a_bearer_token_guards_writes_and_admin_routes() {
    let dir = tempfile::tempdir().unwrap();
    let token_path = dir.path().join("token");
    std::fs::write(&token_path, "s3cret-token\n").unwrap();
    let token_line = format!("token_file = {:?}\n", token_path.display().to_string());
    let (node, mut child) = spawn_one_node_with_http_lines(dir.path(), &token_line);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let call = |method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]| {
        runtime
            .block_on(client::request_with_headers(
                node.http,
                method,
                path,
                headers,
                body,
                CLIENT_TIMEOUT,
            ))
            .ok()
    };
    let authorized = [("authorization", "Bearer s3cret-token")];
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let answer = call("PUT", "/kv/a", &authorized, b"1");
        if answer.as_ref().is_some_and(|answer| answer.status == 200) {
            break;
        }
        assert!(
            Instant::now() < until,
            "the node never took an authorized write: {:?}",
            answer.map(|answer| (
                answer.status,
                String::from_utf8_lossy(&answer.body).into_owned()
            ))
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let wrong = [("authorization", "Bearer s3cret-tokeN")];
    for (method, path, headers, body) in [
        ("PUT", "/kv/a", &[][..], &b"2"[..]),
        ("PUT", "/kv/a", &wrong[..], b"2"),
        ("DELETE", "/kv/a", &[][..], b""),
        ("POST", "/kv/a/cas", &[][..], br#"{"from":"1","to":"2"}"#),
        ("GET", "/metrics", &[][..], b""),
        ("GET", "/byzantine", &[][..], b""),
    ] {
        let answer = call(method, path, headers, body).expect("the node answers");
        assert_eq!(answer.status, 401, "{method} {path}");
        assert!(String::from_utf8_lossy(&answer.body).contains("unauthorized"));
    }
    let read = call("GET", "/kv/a", &[], b"").unwrap();
    assert_eq!(
        (read.status, read.body.as_slice()),
        (200, &b"1"[..]),
        "nothing changed"
    );
    assert_eq!(call("GET", "/status", &[], b"").unwrap().status, 200);
    assert_eq!(
        call("GET", "/metrics", &authorized, b"").unwrap().status,
        200
    );
    child.kill().unwrap();
    child.wait().unwrap();

    std::fs::write(&token_path, "  \n").unwrap();
    let output = Command::new(BINARY)
        .arg("--config")
        .arg(&node.config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("token_file"), "{stderr}");
}

/// One HTTPS request by hand (`Connection: close`), verifying the node's certificate against
/// `ca` for the name `localhost`. Returns the status line's code and the raw response, or the
/// error that kept it from answering.
async fn https_request(
    address: SocketAddr,
    ca: &Path,
    request: &str,
) -> Result<(u16, String), String> {
    use rustls::pki_types::pem::PemObject;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = rustls::RootCertStore::empty();
    for certificate in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(certificate.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let stream = tokio::net::TcpStream::connect(address)
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut stream = connector
        .connect(name, stream)
        .await
        .map_err(|e| e.to_string())?;
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await; // a close without close_notify is fine
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("not an HTTP response: {answer:?}"))?;
    Ok((status, answer))
}

/// `[http] tls = true` with a token: the API answers over HTTPS with the node's certificate
/// (verified against the cluster CA written by `gen-certs`), writes need the token, and a plain
/// HTTP request gets no answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_is_served_over_https_with_the_nodes_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let token_path = dir.path().join("token");
    std::fs::write(&token_path, "tls-token").unwrap();
    let http_lines = format!(
        "tls = true\ntoken_file = {:?}\n",
        token_path.display().to_string()
    );
    let (node, mut child) = spawn_one_node_with_http_lines(dir.path(), &http_lines);
    let ca = dir.path().join("certs").join("ca.pem");
    let put = |token: &str| {
        format!(
            "PUT /kv/secure HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\
             Content-Length: 2\r\nConnection: close\r\n\r\nok"
        )
    };
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let answer = https_request(node.http, &ca, &put("tls-token")).await;
        if matches!(answer, Ok((200, _))) {
            break;
        }
        assert!(Instant::now() < until, "no HTTPS write: {answer:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, _) = https_request(node.http, &ca, &put("wrong")).await.unwrap();
    assert_eq!(status, 401);
    let get = "GET /kv/secure HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    let (status, answer) = https_request(node.http, &ca, get).await.unwrap();
    assert_eq!(status, 200);
    assert!(answer.ends_with("ok"), "{answer:?}");
    // Plain HTTP to the HTTPS port gets no HTTP answer.
    let plain = client::request(node.http, "GET", "/status", b"", Duration::from_secs(2)).await;
    assert!(plain.is_err(), "{plain:?}");
    // Another CA's clients refuse the node's certificate.
    let other = tempfile::tempdir().unwrap();
    consensus::transport::tcp::tls::generate_certificates(other.path(), &["x".to_string()])
        .unwrap();
    let refused = https_request(node.http, &other.path().join("ca.pem"), get).await;
    assert!(refused.is_err(), "{refused:?}");
    child.kill().unwrap();
    child.wait().unwrap();
}

/// `gen-certs` writes a CA and one certificate per node, reuses the CA to add a node, refuses
/// to overwrite, and says what to put in `[consensus.tls]`.
#[test]
fn gen_certs_writes_a_ca_and_node_certificates_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let output = Command::new(BINARY)
        .arg("gen-certs")
        .arg(&certs)
        .args(["--nodes", "node-1,node-2"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert!(stdout.contains("node-2: [consensus.tls]"), "{stdout}");
    for file in [
        "ca.pem",
        "ca.key",
        "node-1.pem",
        "node-1.key",
        "node-2.pem",
        "node-2.key",
    ] {
        assert!(certs.join(file).exists(), "{file}");
    }
    let ca = std::fs::read(certs.join("ca.pem")).unwrap();
    let output = Command::new(BINARY)
        .arg("gen-certs")
        .arg(&certs)
        .args(["--nodes", "node-3"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert_eq!(
        std::fs::read(certs.join("ca.pem")).unwrap(),
        ca,
        "CA reused"
    );
    consensus::TlsFiles::in_dir(&certs, "node-3")
        .load()
        .unwrap();
    for args in [
        &["gen-certs", "DIR", "--nodes", "node-1"][..],
        &["gen-certs", "DIR"][..],
        &["gen-certs", "DIR", "--nodes", "../escape"][..],
    ] {
        let args: Vec<String> = args
            .iter()
            .map(|a| a.replace("DIR", &certs.display().to_string()))
            .collect();
        let output = Command::new(BINARY).args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    }
}

/// Peers over plain TCP only when the file says so, and then the node warns at start-up; a
/// certificate of another node is refused at start-up.
#[test]
fn plain_tcp_needs_insecure_plaintext_and_the_node_warns_about_it() {
    let dir = tempfile::tempdir().unwrap();
    let ports = free_ports(2);
    let base = format!(
        "[consensus]\nnode_id = \"solo\"\nbind_address = \"127.0.0.1:{}\"\n\n[http]\naddress = \
         \"127.0.0.1:{}\"\n",
        ports[0], ports[1]
    );
    let (code, stderr) = run_with_config(dir.path(), &base, &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("insecure_plaintext"), "{stderr}");

    let plain = base.replace("[http]", "insecure_plaintext = true\n\n[http]");
    let path = dir.path().join("plain.toml");
    std::fs::write(&path, plain).unwrap();
    let mut child = Command::new(BINARY)
        .arg("--config")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::Read;
        let mut text = Vec::new();
        let mut chunk = [0u8; 4096];
        while let Ok(n) = stderr.read(&mut chunk) {
            if n == 0 {
                break;
            }
            text.extend_from_slice(&chunk[..n]);
            if String::from_utf8_lossy(&text).contains("node started") {
                break;
            }
        }
        String::from_utf8_lossy(&text).into_owned()
    });
    let text = reader.join().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        text.contains("insecure_plaintext = true") && text.contains("WARN"),
        "{text}"
    );

    let certs = dir.path().join("certs");
    consensus::transport::tcp::tls::generate_certificates(&certs, &["other".to_string()]).unwrap();
    let tls = consensus::TlsFiles::in_dir(&certs, "other");
    let wrong = base.replace(
        "[http]",
        &format!(
            "[consensus.tls]\ncert = {:?}\nkey = {:?}\nca = {:?}\n\n[http]",
            tls.cert.display().to_string(),
            tls.key.display().to_string(),
            tls.ca.display().to_string()
        ),
    );
    let (code, stderr) = run_with_config(dir.path(), &wrong, &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("tls.cert") && stderr.contains("other"),
        "{stderr}"
    );
}

/// `GET /cluster` on `node`, as JSON.
async fn cluster_view(cluster: &Cluster, node: usize) -> Value {
    let response = cluster
        .until_answered(&[node], "GET", "/cluster", b"", Duration::from_secs(15))
        .await;
    assert_eq!(response.status, 200, "{}", response.text());
    serde_json::from_slice(&response.body).unwrap()
}

/// The names in a JSON array, sorted.
fn names(list: &Value) -> Vec<String> {
    let mut names: Vec<String> = list
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"))
        .iter()
        .map(|name| name.as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

/// Starts node `joiner` with `--join` through node `via`'s HTTP address, waits until each of
/// `watch` shows it (node-4) as the one learner, and checks it caught up: it reads
/// `/kv/before-7`, written as "v" before it joined. Answers the last view seen.
async fn join_as_learner(
    cluster: &mut Cluster,
    joiner: usize,
    via: usize,
    watch: &[usize],
) -> Value {
    cluster.nodes[joiner].args = vec!["--join".into(), cluster.nodes[via].http.to_string()];
    cluster.nodes[joiner].spawn();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Value::Null;
    for &node in watch {
        loop {
            seen = cluster_view(cluster, node).await;
            if names(&seen["learners"]) == ["node-4"] {
                break;
            }
            assert!(Instant::now() < deadline, "{seen}\n{}", cluster.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let read = cluster
        .until_answered(
            &[joiner],
            "GET",
            "/kv/before-7",
            b"",
            Duration::from_secs(15),
        )
        .await;
    assert_eq!((read.status, read.text().as_str()), (200, "v"));
    seen
}

/// The founders' names (nodes 0 to 2) without node `removed`, with `added`, sorted: a voter set
/// that replaces one founder.
fn founders_but(cluster: &Cluster, removed: usize, added: &str) -> Vec<String> {
    let mut voters: Vec<String> = [0, 1, 2]
        .into_iter()
        .filter(|&i| i != removed)
        .map(|i| cluster.nodes[i].name.clone())
        .chain([added.to_string()])
        .collect();
    voters.sort();
    voters
}

/// Sends a membership change until it is not refused for the group's state at the time (409,
/// or 5xx: no leader yet, deadline passed); returns the answer.
async fn change_until_settled(
    cluster: &Cluster,
    node: usize,
    method: &str,
    path: &str,
    body: &str,
) -> HttpResponse {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answer = cluster.call(node, method, path, body.as_bytes()).await;
        match answer {
            Some(answer) if answer.status != 409 && answer.status < 500 => return answer,
            last => assert!(
                Instant::now() < deadline,
                "{method} {path} {body}: still refused, last {last:?}\n{}",
                cluster.logs()
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A cluster whose nodes serve their API over HTTPS (`[http] tls = true`): a fourth node joins
/// with `--join`, asking over HTTPS and trusting the member's certificate because it comes from
/// the cluster's CA, and becomes a learner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_a_cluster_whose_api_is_https() {
    let dir = tempfile::tempdir().unwrap();
    let files = consensus::node::write_loopback_cluster_with_joiners(
        dir.path(),
        &free_ports(8),
        3,
        consensus::Algorithm::Raft,
    )
    .unwrap();
    for file in &files {
        let text = std::fs::read_to_string(&file.config).unwrap();
        std::fs::write(&file.config, format!("{text}tls = true\n")).unwrap();
    }
    let ca = dir.path().join("certs").join("ca.pem");
    let mut cluster = Cluster {
        _dir: dir,
        nodes: files.into_iter().map(|f| Node::new(f, None)).collect(),
    };
    for node in &mut cluster.nodes[..3] {
        node.spawn();
    }
    cluster.nodes[3].args = vec!["--join".into(), cluster.nodes[0].http.to_string()];
    cluster.nodes[3].spawn();
    let get = "GET /cluster HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    let deadline = Instant::now() + Duration::from_secs(45);
    loop {
        let answer = https_request(cluster.nodes[1].http, &ca, get).await;
        if let Ok((200, text)) = &answer
            && let Some((_, body)) = text.split_once("\r\n\r\n")
            && let Ok(view) = serde_json::from_str::<Value>(body)
            && names(&view["learners"]) == ["node-4"]
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node-4 is no learner; last: {answer:?}\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Issue 16, by hand over HTTP as the README shows it: a fourth node joins with `--join`
/// through a follower, catches up as a learner, and is promoted while the first leader is
/// removed; bad changes are 400 and change nothing; joining again after a restart is harmless.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_over_http_is_promoted_and_the_old_leader_is_removed() {
    let mut cluster = Cluster::start_with_joiners(4, 3, consensus::Algorithm::Raft);
    let leader = cluster.leader(&[0, 1, 2], Duration::from_secs(20)).await;
    let follower = (leader + 1) % 3;
    for i in 0..20 {
        let response = cluster
            .until_answered(
                &[leader],
                "PUT",
                &format!("/kv/before-{i}"),
                b"v",
                Duration::from_secs(15),
            )
            .await;
        assert_eq!(response.status, 200, "{}", response.text());
    }
    let founders = vec!["node-1", "node-2", "node-3"];
    let view = cluster_view(&cluster, follower).await;
    assert_eq!(names(&view["voters"]), founders, "{view}");
    assert_eq!(names(&view["learners"]), Vec::<String>::new(), "{view}");
    assert_eq!(
        view["leader"],
        cluster.nodes[leader].name.as_str(),
        "{view}"
    );
    assert!(view["addresses"]["node-1"].is_string(), "{view}");

    // Changes that cannot be made as asked: 400, nothing changed.
    for (method, path, body) in [
        ("PUT", "/cluster/voters", "[]"),
        ("PUT", "/cluster/voters", r#"["node-1", "node-9"]"#),
        ("PUT", "/cluster/voters", "not json"),
        (
            "POST",
            "/cluster/learners",
            r#"{"id": "node-1", "address": "127.0.0.1:1"}"#,
        ),
        (
            "POST",
            "/cluster/learners",
            r#"{"id": "node-5", "address": "no port"}"#,
        ),
    ] {
        let answer = change_until_settled(&cluster, follower, method, path, body).await;
        assert_eq!(
            answer.status,
            400,
            "{method} {path} {body}: {}",
            answer.text()
        );
    }
    assert_eq!(
        names(&cluster_view(&cluster, leader).await["voters"]),
        founders
    );

    // node-4 joins through a follower's HTTP address and becomes a learner everywhere.
    let joiner = 3;
    join_as_learner(&mut cluster, joiner, follower, &[0, 1, 2]).await;

    // Promote it and remove the leader in one change, asked of the learner itself.
    let voters = founders_but(&cluster, leader, "node-4");
    let body = serde_json::to_string(&voters).unwrap();
    let answer = change_until_settled(&cluster, joiner, "PUT", "/cluster/voters", &body).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let view: Value = serde_json::from_slice(&answer.body).unwrap();
    assert_eq!(names(&view["voters"]), voters, "{view}");
    assert!(view.get("joint_with").is_none(), "final, not joint: {view}");

    let remaining: Vec<usize> = (0..4).filter(|&i| i != leader).collect();
    let new_leader = cluster.leader(&remaining, Duration::from_secs(20)).await;
    assert_ne!(new_leader, leader);
    let write = cluster
        .until_answered(&[joiner], "PUT", "/kv/after", b"w", Duration::from_secs(15))
        .await;
    assert_eq!(write.status, 200, "{}", write.text());
    for &node in &remaining {
        assert_eq!(names(&cluster_view(&cluster, node).await["voters"]), voters);
        let read = cluster
            .until_answered(&[node], "GET", "/kv/after", b"", Duration::from_secs(15))
            .await;
        assert_eq!(
            (read.status, read.text().as_str()),
            (200, "w"),
            "node {node}"
        );
    }

    // The removed node stops on its own and says why.
    let exit = cluster.exit_of(leader, "the removed node still runs").await;
    assert!(exit.success(), "{exit:?}");
    let log = std::fs::read_to_string(&cluster.nodes[leader].log).unwrap();
    assert!(log.contains("removed from the cluster"), "{log}");

    // Restarted with --join still given, it finds itself a voter and asks nothing.
    cluster.nodes[joiner].kill();
    cluster.nodes[joiner].spawn();
    let read = cluster
        .until_answered(
            &[joiner],
            "GET",
            "/kv/before-3",
            b"",
            Duration::from_secs(20),
        )
        .await;
    assert_eq!(
        (read.status, read.text().as_str()),
        (200, "v"),
        "{}",
        cluster.logs()
    );
    assert_eq!(
        names(&cluster_view(&cluster, new_leader).await["voters"]),
        voters
    );
}

/// Issue 16 for GPU-optimized Raft, over HTTP: a learner is refused without its public key
/// (400, nothing changed); a fourth node, configured with its own key alone, joins with
/// `--join` (it sends its key, and learns the members' from the log), is promoted while the
/// first leader is removed, and serves; `GET /cluster` shows every member's key; and the new
/// node's data directory verifies offline against the memberships its certificates name; the
/// removed leader stops on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gpu_raft_node_joins_over_http_with_its_key_and_replaces_the_leader() {
    let mut cluster = Cluster::start_with_joiners(4, 3, consensus::Algorithm::GpuOptimizedRaft);
    let leader = cluster.leader(&[0, 1, 2], Duration::from_secs(20)).await;
    let follower = (leader + 1) % 3;
    for i in 0..10 {
        let response = cluster
            .until_answered(
                &[leader],
                "PUT",
                &format!("/kv/before-{i}"),
                b"v",
                Duration::from_secs(15),
            )
            .await;
        assert_eq!(response.status, 200, "{}", response.text());
    }
    let view = cluster_view(&cluster, follower).await;
    assert_eq!(
        view["keys"].as_object().map(|keys| keys.len()),
        Some(3),
        "{view}"
    );
    for body in [
        r#"{"id": "node-9", "address": "127.0.0.1:1"}"#,
        r#"{"id": "node-9", "address": "127.0.0.1:1", "public_key": "abcd"}"#,
        // The identity point: small order, under which signatures prove nothing.
        r#"{"id": "node-9", "address": "127.0.0.1:1", "public_key": "0100000000000000000000000000000000000000000000000000000000000000"}"#,
    ] {
        let answer =
            change_until_settled(&cluster, follower, "POST", "/cluster/learners", body).await;
        assert_eq!(answer.status, 400, "{body}: {}", answer.text());
    }

    let joiner = 3;
    let view = join_as_learner(&mut cluster, joiner, follower, &[leader]).await;
    assert_eq!(
        view["keys"].as_object().map(|keys| keys.len()),
        Some(4),
        "{view}"
    );

    let voters = founders_but(&cluster, leader, "node-4");
    let body = serde_json::to_string(&voters).unwrap();
    let answer = change_until_settled(&cluster, joiner, "PUT", "/cluster/voters", &body).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let remaining: Vec<usize> = (0..4).filter(|&i| i != leader).collect();
    cluster.leader(&remaining, Duration::from_secs(20)).await;
    for i in 0..5 {
        let write = cluster
            .until_answered(
                &[joiner],
                "PUT",
                &format!("/kv/after-{i}"),
                b"w",
                Duration::from_secs(15),
            )
            .await;
        assert_eq!(write.status, 200, "{}", write.text());
    }
    // The removed leader stops on its own and says why.
    let exit = cluster.exit_of(leader, "the removed node still runs").await;
    assert!(exit.success(), "{exit:?}");
    let log = std::fs::read_to_string(&cluster.nodes[leader].log).unwrap();
    assert!(log.contains("removed from the cluster"), "{log}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.nodes[joiner].kill();
    let report = consensus::verify_log(&cluster._dir.path().join("node-4"), None)
        .unwrap_or_else(|error| panic!("node-4's data directory: {error}"));
    assert!(report.certified_through > 10, "{report:?}");
}
