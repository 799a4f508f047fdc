//! A real Prometheus server scrapes three `consensus-node`s while they take writes and lose their
//! leader; its HTTP API must then show every seed metric for every node, the leader change, and
//! one committed index across the cluster.
//!
//! Needs the `prometheus` binary (Debian package `prometheus`; `.ci/run` installs it). Where it
//! is missing the test prints why and passes, except under CI (`CI` set), where that is a
//! failure.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use consensus::node::client;
use serde_json::Value;

const BINARY: &str = env!("CARGO_BIN_EXE_consensus-node");
const TIMEOUT: Duration = Duration::from_secs(5);

/// The spec's six metric names, each as a series Prometheus stores (a histogram by its count).
const SEED_SERIES: [&str; 6] = [
    "consensus_term_current",
    "consensus_committed_index",
    "consensus_proposal_latency_seconds_count",
    "consensus_vote_processing_duration_seconds_count",
    "consensus_leader_changes_total",
    "consensus_byzantine_detections_total",
];

#[path = "common/ports.rs"]
mod ports;
use ports::free_ports;

/// `prometheus` on the PATH, or `None` after saying why the test skips (a failure under CI).
fn prometheus_binary() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("prometheus"))
            .find(|candidate| candidate.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install the prometheus binary (apt-get install prometheus)"
        );
        eprintln!("skipping: no `prometheus` binary on the PATH (apt-get install prometheus)");
    }
    found
}

/// Child processes killed when the test ends, however it ends.
#[derive(Default)]
struct Processes(BTreeMap<String, Child>);

impl Processes {
    fn start(&mut self, name: &str, command: &mut Command) {
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.0.insert(name.to_string(), child);
    }

    fn kill(&mut self, name: &str) {
        if let Some(mut child) = self.0.remove(name) {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        for child in self.0.values_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn get(address: SocketAddr, path: &str) -> Option<Value> {
    let response = client::request(address, "GET", path, b"", TIMEOUT)
        .await
        .ok()?;
    (response.status == 200)
        .then(|| serde_json::from_slice(&response.body).ok())
        .flatten()
}

/// Percent-encodes a query parameter.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' | b'-' => {
                (byte as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

/// Runs an instant query; each result series as (instance, value).
async fn query(prometheus: SocketAddr, promql: &str) -> Vec<(String, f64)> {
    let path = format!("/api/v1/query?query={}", encode(promql));
    let Some(answer) = get(prometheus, &path).await else {
        return Vec::new();
    };
    answer["data"]["result"]
        .as_array()
        .map(|series| {
            series
                .iter()
                .filter_map(|one| {
                    let instance = one["metric"]["instance"].as_str()?.to_string();
                    let value = one["value"][1].as_str()?.parse().ok()?;
                    Some((instance, value))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Polls `check` every 250 ms until it holds or `within` passes; returns whether it held.
async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The node all of `nodes` name as leader, by index.
async fn agreed_leader(nodes: &[(String, SocketAddr)], among: &[usize]) -> Option<usize> {
    let mut leaders = Vec::new();
    for &i in among {
        let status = get(nodes[i].1, "/status").await?;
        leaders.push((
            status["leader"].as_str()?.to_string(),
            status["node_id"].clone(),
        ));
    }
    let leader = &leaders[0].0;
    if leaders.iter().any(|(l, _)| l != leader) {
        return None;
    }
    among
        .iter()
        .zip(&leaders)
        .find(|(_, (_, id))| id.as_str() == Some(leader))
        .map(|(&i, _)| i)
}

async fn put(address: SocketAddr, key: &str) -> bool {
    let path = format!("/kv/{key}");
    client::request(address, "PUT", &path, b"value", TIMEOUT)
        .await
        .is_ok_and(|response| response.status == 200)
}

fn write_prometheus_config(dir: &Path, targets: &[SocketAddr]) -> PathBuf {
    let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
    let text = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: \
         consensus\n    scrape_interval: 500ms\n    static_configs:\n      - targets: [{}]\n",
        targets.join(", ")
    );
    let path = dir.join("prometheus.yml");
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_every_node_through_writes_and_a_leader_kill() {
    let Some(prometheus_binary) = prometheus_binary() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ports = free_ports(7);
    let files = consensus::node::write_loopback_cluster(dir.path(), &ports[..6]).unwrap();
    let nodes: Vec<(String, SocketAddr)> = files.iter().map(|f| (f.name.clone(), f.http)).collect();
    let mut processes = Processes::default();
    let start_node = |processes: &mut Processes, i: usize| {
        processes.start(
            &files[i].name,
            Command::new(BINARY).arg("--config").arg(&files[i].config),
        );
    };
    for i in 0..3 {
        start_node(&mut processes, i);
    }
    let prometheus: SocketAddr = ([127, 0, 0, 1], ports[6]).into();
    let config = write_prometheus_config(
        dir.path(),
        &nodes.iter().map(|(_, http)| *http).collect::<Vec<_>>(),
    );
    processes.start(
        "prometheus",
        Command::new(&prometheus_binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={prometheus}")),
    );

    let all = [0, 1, 2];
    let until = Instant::now() + Duration::from_secs(30);
    let leader = loop {
        if let Some(leader) = agreed_leader(&nodes, &all).await {
            break leader;
        }
        assert!(Instant::now() < until, "the nodes never agreed on a leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for i in 0..30 {
        assert!(
            put(nodes[i % 3].1, &format!("before-{i}")).await,
            "write {i}"
        );
    }
    // Every node scraped, and its seed metrics stored, before the kill.
    let everyone_scraped = || async {
        let mut all_there = true;
        for series in SEED_SERIES {
            all_there &= query(prometheus, series).await.len() == 3;
        }
        all_there
    };
    assert!(
        eventually(Duration::from_secs(60), everyone_scraped).await,
        "Prometheus never stored every seed series of every node"
    );
    let changes_before: BTreeMap<String, f64> = query(prometheus, "consensus_leader_changes_total")
        .await
        .into_iter()
        .collect();

    // SIGKILL the leader; the others elect another and take writes.
    processes.kill(&files[leader].name);
    let survivors: Vec<usize> = all.into_iter().filter(|&i| i != leader).collect();
    assert!(
        eventually(Duration::from_secs(30), || async {
            agreed_leader(&nodes, &survivors).await.is_some()
        })
        .await,
        "no new leader among the survivors"
    );
    for i in 0..30 {
        assert!(
            put(nodes[survivors[i % 2]].1, &format!("after-{i}")).await,
            "write {i} after the kill"
        );
    }
    // The leader change shows in Prometheus for the survivors.
    let rose = eventually(Duration::from_secs(30), || async {
        let now = query(prometheus, "consensus_leader_changes_total").await;
        survivors.iter().all(|&i| {
            let instance = nodes[i].1.to_string();
            let before = changes_before.get(&instance).copied().unwrap_or(f64::MAX);
            now.iter()
                .any(|(at, value)| *at == instance && *value > before)
        })
    })
    .await;
    assert!(
        rose,
        "consensus_leader_changes_total did not rise: {changes_before:?}"
    );

    // The killed node comes back and catches up: every node, every seed series, one committed
    // index across all three.
    start_node(&mut processes, leader);
    assert!(
        eventually(Duration::from_secs(60), everyone_scraped).await,
        "the restarted node's series never came back"
    );
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let last = query(prometheus, "consensus_committed_index").await;
        let agreed = last.len() == 3
            && last
                .iter()
                .all(|(_, value)| *value == last[0].1 && *value >= 61.0);
        if agreed {
            break;
        }
        assert!(
            Instant::now() < until,
            "committed indexes in Prometheus disagree: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let up = query(prometheus, "up").await;
    assert_eq!(up.len(), 3, "{up:?}");
    assert!(up.iter().all(|(_, value)| *value == 1.0), "{up:?}");

    // Every query of the example Grafana dashboard is valid PromQL that this Prometheus answers.
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("examples/observability/grafana-dashboard.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let expressions: Vec<&str> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|panel| panel["targets"].as_array().unwrap())
        .map(|target| target["expr"].as_str().unwrap())
        .collect();
    assert!(expressions.len() >= 10);
    for expression in expressions {
        let answer = get(
            prometheus,
            &format!("/api/v1/query?query={}", encode(expression)),
        )
        .await
        .unwrap_or_default();
        assert_eq!(answer["status"], "success", "{expression}: {answer}");
    }
}
