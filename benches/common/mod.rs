//! Cluster set-up shared by the benches.
// Each bench uses part of these helpers.
#![allow(dead_code)]

pub mod latency;

use std::sync::Arc;
use std::time::{Duration, Instant};

use consensus::{ConsensusConfig, ConsensusEngine, ConsensusResult, LocalNetwork, Proposal};

/// Where the members talk and keep their logs.
#[derive(Clone, Copy, Debug)]
pub enum Setup {
    /// In-process network, memory log store.
    Local,
    /// tarpc over loopback TCP, memory log store.
    TcpMemory,
    /// tarpc over loopback TCP, fjall log store with an fsync per batch.
    TcpFjall,
    /// As `TcpMemory`, over mutual TLS 1.3.
    TlsMemory,
    /// As `TcpFjall`, over mutual TLS 1.3.
    TlsFjall,
}

impl Setup {
    fn tls(self) -> bool {
        matches!(self, Setup::TlsMemory | Setup::TlsFjall)
    }

    fn fjall(self) -> bool {
        matches!(self, Setup::TcpFjall | Setup::TlsFjall)
    }
}

/// A running cluster; dropping it stops the members.
pub struct Cluster {
    pub engines: Vec<Arc<ConsensusEngine>>,
    _dir: Option<tempfile::TempDir>,
}

impl Cluster {
    /// The current leader (waits up to 10 s for one).
    pub async fn leader(&self) -> Arc<ConsensusEngine> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(leader) = self.engines.iter().find(|e| e.is_leader()) {
                return leader.clone();
            }
            assert!(Instant::now() < deadline, "no leader within 10 s");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// Starts `members` engines.
pub async fn start_cluster(members: usize, setup: Setup) -> Cluster {
    let names: Vec<String> = (1..=members).map(|i| format!("bench-{i}")).collect();
    let ports: Vec<u16> = names
        .iter()
        .map(|_| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        })
        .collect();
    let dir = (setup.fjall() || setup.tls()).then(|| tempfile::tempdir().unwrap());
    let certs = setup.tls().then(|| {
        let certs = dir.as_ref().unwrap().path().join("certs");
        consensus::transport::tcp::tls::generate_certificates(&certs, &names).unwrap();
        certs
    });
    let network = LocalNetwork::new();
    let mut engines = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let peers: Vec<String> = names
            .iter()
            .zip(&ports)
            .filter(|(other, _)| *other != name)
            .map(|(other, port)| match setup {
                Setup::Local => other.clone(),
                _ => format!("{other}@127.0.0.1:{port}"),
            })
            .collect();
        let mut config = ConsensusConfig::default()
            .node_id(name.as_str())
            .peers(peers)
            .bind_address(format!("127.0.0.1:{}", ports[i]))
            .request_timeout(Duration::from_secs(30));
        if let (Some(dir), true) = (&dir, setup.fjall()) {
            config = config.persistent_state(dir.path().join(name));
        }
        config = match &certs {
            Some(certs) => config.tls(consensus::TlsFiles::in_dir(certs, name)),
            None => config.insecure_plaintext(true),
        };
        let engine = ConsensusEngine::new(config).unwrap();
        let engine = match setup {
            Setup::Local => engine.with_local_network(&network),
            _ => engine,
        };
        engines.push(engine);
    }
    let mut started = Vec::new();
    for mut engine in engines {
        // TCP members wait for each other's handshakes only for peers without names; ours are
        // named, so starting one after another is fine.
        engine.start().await.unwrap();
        started.push(Arc::new(engine));
    }
    Cluster {
        engines: started,
        _dir: dir,
    }
}

/// `proposers` concurrent tasks each propose `payload` `per_proposer` times, one after another,
/// asserting every proposal commits; returns when all are done.
pub async fn propose_concurrently(
    leader: &Arc<ConsensusEngine>,
    proposers: u64,
    per_proposer: u64,
    payload: &'static [u8],
) {
    let tasks: Vec<_> = (0..proposers)
        .map(|_| {
            let leader = leader.clone();
            tokio::spawn(async move {
                for _ in 0..per_proposer {
                    let result = leader.propose(Proposal::from_bytes(payload)).await;
                    assert!(
                        matches!(result, Ok(ConsensusResult::Committed { .. })),
                        "{result:?}"
                    );
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
}
