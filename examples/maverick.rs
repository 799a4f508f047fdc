//! A Byzantine PBFT replica on TCP, for trying a cluster's defences with real processes: it
//! takes a `consensus-node` configuration file (its id, key, peers and validators) and runs the
//! honest PBFT code of that node, rewriting what it sends as one of the simulator's Byzantine
//! behaviours says.
//!
//! ```text
//! cargo run --release --example maverick -- --config FILE --behaviour B
//! ```
//! B is one of:
//! - `equivocate`: as the primary, a different batch to each half of the backups (provable);
//! - `double-vote`: a conflicting PREPARE and COMMIT beside each one it sends (provable);
//! - `forge`: statements in other members' names, with signatures that cannot verify;
//! - `replay`: its own statements of earlier sequence numbers and views, again, long after;
//! - `silent`: says nothing at all;
//! - `garbage`: beside its messages, malformed and absurd ones (bad signature lengths, huge
//!   numbers, certificates of thousands of entries, batches that do not match their digest);
//! - `bad-view-change`: beside each VIEW-CHANGE a forged one (a prepared certificate it cannot
//!   have), and, as primary of a new view, a NEW-VIEW that drops a prepared request (provable).
//!
//! The forged, replayed, garbage and silent ones prove nothing, and honest replicas must blame no one for
//! them. The maverick serves no clients and keeps nothing on disk. It prints one line a second
//! (view, executed sequence number, whether it sent something provable) and stops on SIGTERM or
//! Ctrl-C.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use consensus::ConsensusConfig;
use consensus::protocol::{Envelope, Input, Output, Protocol};
use consensus::sim::SimProtocol;
use consensus::sim::byzantine::{Behaviour, Maverick};
use consensus::storage::RecoveredState;
use consensus::transport::Transport;
use consensus::transport::tcp::{Inbound, TcpTransport};

/// Peer messages stepped as one round at most (one signature batch).
const MAX_ROUND: usize = 1024;

fn behaviour_named(name: &str) -> Option<Behaviour> {
    Some(match name {
        "equivocate" => Behaviour::EquivocatingPrimary,
        "double-vote" => Behaviour::DoubleVoter,
        "forge" => Behaviour::Impersonator,
        "replay" => Behaviour::Replayer,
        "silent" => Behaviour::Silent,
        "garbage" => Behaviour::Garbage,
        "bad-view-change" => Behaviour::BogusViewChange,
        _ => return None,
    })
}

const BEHAVIOURS: &str = "equivocate, double-vote, forge, replay, silent, garbage, bad-view-change";

fn main() -> ExitCode {
    let mut config_path = None;
    let mut behaviour = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--config", Some(path)) => config_path = Some(path),
            ("--behaviour", Some(name)) => match behaviour_named(&name) {
                Some(b) => behaviour = Some(b),
                None => return usage(&format!("unknown behaviour {name:?}")),
            },
            _ => return usage(&format!("unexpected argument {arg:?}")),
        }
    }
    let (Some(config_path), Some(behaviour)) = (config_path, behaviour) else {
        return usage("--config and --behaviour are required");
    };
    let config = match ConsensusConfig::from_toml_file(&config_path) {
        Ok(config) => config,
        Err(error) => return usage(&format!("{config_path}: {error}")),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    match runtime.block_on(run(config, behaviour)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("maverick: {error}");
            ExitCode::FAILURE
        }
    }
}

fn usage(problem: &str) -> ExitCode {
    eprintln!(
        "maverick: {problem}\nusage: maverick --config FILE --behaviour B  (B: {BEHAVIOURS})"
    );
    ExitCode::from(2)
}

/// Drives the core by hand, as the engine's driver does: authenticate and step each round of
/// peer messages, tick, cut batches, send what the core asks.
async fn run(config: ConsensusConfig, behaviour: Behaviour) -> Result<(), String> {
    let identity = config.signing_identity().map_err(|e| e.to_string())?;
    let pbft = config.pbft_config(&identity);
    let mut core = Maverick::new(
        pbft,
        RecoveredState::default(),
        Some(behaviour),
        rand_seed(),
    )
    .map_err(|e| e.to_string())?;
    let peers = config.peer_addresses().map_err(|e| e.to_string())?;
    let transport_config = config.tcp_transport_config().map_err(|e| e.to_string())?;
    let (transport, mut inbound) = TcpTransport::start(transport_config, peers)
        .await
        .map_err(|e| e.to_string())?;
    eprintln!(
        "maverick {} ({behaviour:?}) listening on {}",
        config.node_id,
        transport.local_addr()
    );
    let mut ticks = tokio::time::interval(config.tick());
    let mut out = Output::default();
    let mut round = Vec::new();
    let mut next_report = Instant::now() + Duration::from_secs(1);
    loop {
        tokio::select! {
            received = inbound.recv() => {
                let Some(Inbound { from, message, .. }) = received else { break };
                round.push(Envelope { from, to: core.id(), message });
                while round.len() < MAX_ROUND {
                    match inbound.try_recv() {
                        Ok(Inbound { from, message, .. }) => round.push(Envelope { from, to: core.id(), message }),
                        Err(_) => break,
                    }
                }
                core.authenticate(&mut round);
                core.step_round(&mut round, &mut out);
            }
            _ = ticks.tick() => core.step(Input::Tick, &mut out),
            _ = consensus::node::shutdown_signal() => break,
        }
        core.step(Input::FlushProposals, &mut out);
        // Nothing is kept on disk: what the core asked to write is dropped, and what waited for
        // the write leaves at once.
        for envelope in out
            .messages
            .drain(..)
            .chain(out.messages_after_write.drain(..))
        {
            core.sent(&envelope); // what left is what proves it Byzantine
            transport.send(envelope.to, envelope.message);
        }
        out.clear();
        if Instant::now() >= next_report {
            next_report += Duration::from_secs(1);
            let node = core.node();
            eprintln!(
                "maverick {}: view {}, executed {}, offended {}",
                config.node_id,
                node.view(),
                node.executed_seq(),
                core.offended()
            );
        }
    }
    transport.shutdown().await;
    Ok(())
}

/// A seed for the garbage and forgeries: different per run.
fn rand_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}
