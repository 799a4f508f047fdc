//! What the engine needs of each protocol core it can run: how to build it from the
//! configuration, and how its typed channels and transports fit the engine's one set of
//! fields. The engine is generic over the core everywhere else (driver, apply stage,
//! transports); these enums are where the algorithm chosen at run time meets those types.

use std::sync::Arc;
use std::sync::mpsc::TrySendError;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::config::ConsensusConfig;
use crate::engine::LocalNetwork;
use crate::engine::driver::{DriverInput, DriverSender};
use crate::error::{ConfigError, Error, Result};
use crate::keys::SigningIdentity;
use crate::protocol::Protocol;
use crate::protocol::gpu_raft::{GpuRaftConfig, GpuRaftNode};
use crate::protocol::pbft::{PbftConfig, PbftNode};
use crate::protocol::raft::{self, RaftNode};
use crate::storage::RecoveredState;
use crate::transport::tcp::TcpTransport;
use crate::types::NodeId;

/// A core the engine can drive.
pub(crate) trait EngineCore: Protocol + Sized
where
    Self::Message: Serialize + DeserializeOwned,
{
    /// Whether peers given as bare `host:port` may join the member set by the id they tell in
    /// the handshake. A core whose members are fixed by keys (PBFT) needs them named.
    const LEARNS_MEMBERS_BY_HANDSHAKE: bool;

    /// Checks what building the core will check, before anything irreversible happens.
    fn check(engine: &CoreSettings, members: &[NodeId]) -> Result<()>;

    /// Builds the core from the configuration and what the store recovered.
    fn build(
        engine: &CoreSettings,
        members: Vec<NodeId>,
        recovered: RecoveredState,
    ) -> Result<Self>;

    /// The engine's handle on a driver of this core.
    fn inputs(sender: DriverSender<Self>) -> CoreInputs;

    /// The engine's handle on a TCP transport of this core's messages.
    fn tcp(transport: Arc<TcpTransport<Self::Message>>) -> TcpHandle;

    /// The in-process network of this core the engine was given, if that is the one it has.
    fn local_network(network: &Network) -> Option<&LocalNetwork<Self>>;
}

/// What the cores are built from: the configuration and, for cores that sign, the identity.
pub(crate) struct CoreSettings {
    pub(crate) config: ConsensusConfig,
    pub(crate) identity: Option<SigningIdentity>,
    /// The verifier a signing core checks peers' signatures with; the CPU one when `None`.
    pub(crate) verifier: Option<Arc<dyn crate::gpu::SignatureVerifier>>,
    /// What counts a PBFT round's prepares and commits; the CPU aggregator when `None`.
    pub(crate) votes: Option<Arc<dyn crate::gpu::VoteAggregator>>,
    /// Detection and punishment (PBFT).
    pub(crate) byzantine: crate::byzantine::ByzantineConfig,
}

impl EngineCore for RaftNode {
    const LEARNS_MEMBERS_BY_HANDSHAKE: bool = true;

    fn check(engine: &CoreSettings, members: &[NodeId]) -> Result<()> {
        let mut config = engine.config.raft_config();
        config.voters = bootstrap_voters(engine, members.to_vec());
        config.validate()?;
        Ok(())
    }

    fn build(
        engine: &CoreSettings,
        members: Vec<NodeId>,
        recovered: RecoveredState,
    ) -> Result<Self> {
        let mut config = engine.config.raft_config();
        config.voters = bootstrap_voters(engine, members);
        config.seed = rand::random();
        Ok(RaftNode::new(config, recovered)?)
    }

    fn inputs(sender: DriverSender<Self>) -> CoreInputs {
        CoreInputs::Raft(sender)
    }

    fn tcp(transport: Arc<TcpTransport<Self::Message>>) -> TcpHandle {
        TcpHandle::Raft(transport)
    }

    fn local_network(network: &Network) -> Option<&LocalNetwork<Self>> {
        match network {
            Network::Raft(network) => Some(network),
            _ => None,
        }
    }
}

impl EngineCore for PbftNode {
    const LEARNS_MEMBERS_BY_HANDSHAKE: bool = false;

    fn check(engine: &CoreSettings, members: &[NodeId]) -> Result<()> {
        pbft_config(engine, members.to_vec())?.validate()?;
        Ok(())
    }

    fn build(
        engine: &CoreSettings,
        members: Vec<NodeId>,
        recovered: RecoveredState,
    ) -> Result<Self> {
        Ok(PbftNode::new(pbft_config(engine, members)?, recovered)?)
    }

    fn inputs(sender: DriverSender<Self>) -> CoreInputs {
        CoreInputs::Pbft(sender)
    }

    fn tcp(transport: Arc<TcpTransport<Self::Message>>) -> TcpHandle {
        TcpHandle::Pbft(transport)
    }

    fn local_network(network: &Network) -> Option<&LocalNetwork<Self>> {
        match network {
            Network::Pbft(network) => Some(network),
            _ => None,
        }
    }
}

impl EngineCore for GpuRaftNode {
    const LEARNS_MEMBERS_BY_HANDSHAKE: bool = false;

    fn check(engine: &CoreSettings, members: &[NodeId]) -> Result<()> {
        gpu_raft_config(engine, members.to_vec())?.validate()?;
        Ok(())
    }

    fn build(
        engine: &CoreSettings,
        members: Vec<NodeId>,
        recovered: RecoveredState,
    ) -> Result<Self> {
        Ok(GpuRaftNode::new(
            gpu_raft_config(engine, members)?,
            recovered,
        )?)
    }

    fn inputs(sender: DriverSender<Self>) -> CoreInputs {
        CoreInputs::GpuRaft(sender)
    }

    fn tcp(transport: Arc<TcpTransport<Self::Message>>) -> TcpHandle {
        TcpHandle::GpuRaft(transport)
    }

    fn local_network(network: &Network) -> Option<&LocalNetwork<Self>> {
        match network {
            Network::GpuRaft(network) => Some(network),
            _ => None,
        }
    }
}

/// The voters a Raft or GPU-optimized Raft node starts with: `members`, or none for a node that
/// joins a running cluster ([`ConsensusConfig::joining`]): it learns them from the leader that adds it.
fn bootstrap_voters(engine: &CoreSettings, members: Vec<NodeId>) -> Vec<NodeId> {
    if engine.config.joining {
        Vec::new()
    } else {
        members
    }
}

/// The GPU-optimized Raft settings: Raft's from the configuration over `members`, with the
/// engine's keys, verifier and vote counter.
fn gpu_raft_config(engine: &CoreSettings, members: Vec<NodeId>) -> Result<GpuRaftConfig> {
    let identity = engine.identity.as_ref().ok_or(Error::InvalidState(
        "a GPU-optimized Raft engine needs its signing identity (ConsensusConfig::signing_identity)",
    ))?;
    let mut raft = engine.config.raft_config();
    raft.voters = bootstrap_voters(engine, members);
    raft.seed = rand::random();
    let mut config = GpuRaftConfig::new(
        raft,
        identity.signing_key.clone(),
        identity.validators.clone(),
    );
    if let Some(verifier) = &engine.verifier {
        config.verifier = verifier.clone();
    }
    if let Some(votes) = &engine.votes {
        config.votes = votes.clone();
    }
    config.client_keys = engine.config.client_key_set()?;
    Ok(config)
}

/// The PBFT settings of the configuration (see [`ConsensusConfig::pbft_config`]), over
/// `members`, with the engine's verifier, vote counter and Byzantine settings.
fn pbft_config(engine: &CoreSettings, members: Vec<NodeId>) -> Result<PbftConfig> {
    let identity = engine.identity.as_ref().ok_or(Error::InvalidState(
        "a PBFT engine needs its signing identity (ConsensusConfig::signing_identity)",
    ))?;
    let mut pbft = engine.config.pbft_config(identity);
    pbft.members = members;
    if let Some(verifier) = &engine.verifier {
        pbft.verifier = verifier.clone();
    }
    if let Some(votes) = &engine.votes {
        pbft.votes = votes.clone();
    }
    pbft.detection_enabled = engine.byzantine.detection_enabled;
    pbft.punishment_policy = engine.byzantine.punishment_policy;
    Ok(pbft)
}

/// The engine's in-process network, of the core it runs. (Public only so that the sealed
/// [`EngineNetwork`] can name it; this module is private.)
#[derive(Clone, Debug)]
pub enum Network {
    Raft(LocalNetwork<RaftNode>),
    Pbft(LocalNetwork<PbftNode>),
    GpuRaft(LocalNetwork<GpuRaftNode>),
}

impl Network {
    pub(crate) fn disconnect(&self, node: NodeId) {
        match self {
            Network::Raft(network) => network.disconnect(node),
            Network::Pbft(network) => network.disconnect(node),
            Network::GpuRaft(network) => network.disconnect(node),
        }
    }
}

/// An in-process network an engine can join: one of Raft's or one of PBFT's.
pub trait EngineNetwork: sealed::Sealed {}

pub(crate) mod sealed {
    use super::{GpuRaftNode, LocalNetwork, Network, PbftNode, RaftNode};

    /// Only the crate's own networks, so that the engine knows every kind it may be given.
    pub trait Sealed {
        fn to_network(&self) -> Network;
    }

    impl Sealed for LocalNetwork<RaftNode> {
        fn to_network(&self) -> Network {
            Network::Raft(self.clone())
        }
    }

    impl Sealed for LocalNetwork<PbftNode> {
        fn to_network(&self) -> Network {
            Network::Pbft(self.clone())
        }
    }

    impl Sealed for LocalNetwork<GpuRaftNode> {
        fn to_network(&self) -> Network {
            Network::GpuRaft(self.clone())
        }
    }
}

impl EngineNetwork for LocalNetwork<RaftNode> {}
impl EngineNetwork for LocalNetwork<PbftNode> {}
impl EngineNetwork for LocalNetwork<GpuRaftNode> {}

/// The sending end of the running driver's input queue.
pub(crate) enum CoreInputs {
    Raft(DriverSender<RaftNode>),
    Pbft(DriverSender<PbftNode>),
    GpuRaft(DriverSender<GpuRaftNode>),
}

impl CoreInputs {
    /// Queues a client's proposal or read.
    pub(crate) fn submit(
        &self,
        request: crate::engine::driver::ClientRequest,
    ) -> std::result::Result<(), TrySendError<()>> {
        match self {
            CoreInputs::Raft(sender) => sender.try_send(request.into_input()).map_err(forget_input),
            CoreInputs::Pbft(sender) => sender.try_send(request.into_input()).map_err(forget_input),
            CoreInputs::GpuRaft(sender) => {
                sender.try_send(request.into_input()).map_err(forget_input)
            }
        }
    }

    /// Asks a Raft leader to hand over to `to`; PBFT has no such request.
    pub(crate) fn transfer_leadership(&self, to: NodeId) -> Result<()> {
        let control = raft::Control::TransferLeadership { to };
        let full = Error::Rejected(crate::protocol::RejectReason::QueueFull);
        match self {
            CoreInputs::Raft(sender) => sender
                .try_send(DriverInput::Control(control))
                .map_err(|_| full),
            CoreInputs::GpuRaft(sender) => sender
                .try_send(DriverInput::Control(control))
                .map_err(|_| full),
            CoreInputs::Pbft(_) => Err(Error::Unsupported {
                what: "leadership transfer under PBFT".into(),
                reason: "a PBFT primary is fixed by the view number; a view change replaces it",
            }),
        }
    }

    /// Asks the driver for a membership change (Raft; PBFT's validators are fixed).
    pub(crate) fn change_membership(
        &self,
        change: crate::membership::MembershipChange,
        reply: tokio::sync::oneshot::Sender<crate::engine::driver::MembershipAnswer>,
    ) -> Result<()> {
        let full = Error::Rejected(crate::protocol::RejectReason::QueueFull);
        match self {
            CoreInputs::Raft(sender) => sender
                .try_send(DriverInput::ChangeMembership { change, reply })
                .map_err(|_| full),
            CoreInputs::GpuRaft(sender) => sender
                .try_send(DriverInput::ChangeMembership { change, reply })
                .map_err(|_| full),
            CoreInputs::Pbft(_) => Err(Error::Membership(
                crate::membership::MembershipError::Unsupported(
                    "PBFT keeps the validator set it started with".into(),
                ),
            )),
        }
    }

    /// Asks the driver to stop; `blocking` waits for room in the queue.
    pub(crate) fn shutdown(&self, blocking: bool) {
        match (self, blocking) {
            (CoreInputs::Raft(sender), true) => drop(sender.send(DriverInput::Shutdown)),
            (CoreInputs::Raft(sender), false) => drop(sender.try_send(DriverInput::Shutdown)),
            (CoreInputs::Pbft(sender), true) => drop(sender.send(DriverInput::Shutdown)),
            (CoreInputs::Pbft(sender), false) => drop(sender.try_send(DriverInput::Shutdown)),
            (CoreInputs::GpuRaft(sender), true) => drop(sender.send(DriverInput::Shutdown)),
            (CoreInputs::GpuRaft(sender), false) => drop(sender.try_send(DriverInput::Shutdown)),
        }
    }
}

/// The kind of a failed send, without the input it gives back.
fn forget_input<T>(error: TrySendError<T>) -> TrySendError<()> {
    match error {
        TrySendError::Full(_) => TrySendError::Full(()),
        TrySendError::Disconnected(_) => TrySendError::Disconnected(()),
    }
}

/// The running TCP transport, of the core's messages.
pub(crate) enum TcpHandle {
    Raft(Arc<TcpTransport<raft::Message>>),
    Pbft(Arc<TcpTransport<crate::protocol::pbft::Message>>),
    GpuRaft(Arc<TcpTransport<crate::protocol::gpu_raft::Message>>),
}

impl TcpHandle {
    /// Closes the listener and connections (frees the port for a restart) when this is the
    /// last handle.
    pub(crate) async fn shutdown(self) {
        match self {
            TcpHandle::Raft(transport) => {
                if let Ok(transport) = Arc::try_unwrap(transport) {
                    transport.shutdown().await;
                }
            }
            TcpHandle::Pbft(transport) => {
                if let Ok(transport) = Arc::try_unwrap(transport) {
                    transport.shutdown().await;
                }
            }
            TcpHandle::GpuRaft(transport) => {
                if let Ok(transport) = Arc::try_unwrap(transport) {
                    transport.shutdown().await;
                }
            }
        }
    }
}

/// Refuses peers given as bare `host:port` for a core whose members must be named.
pub(crate) fn require_named_peers(config: &ConsensusConfig) -> Result<()> {
    if let Some(unnamed) = config.peers.iter().find(|p| !p.contains('@')) {
        return Err(ConfigError::Invalid {
            field: "bootstrap_peers",
            value: unnamed.clone(),
            reason: "the members of a signing algorithm are fixed by their keys: give every peer \
                     as name@host:port, with the name its [consensus.validators] entry uses",
        }
        .into());
    }
    Ok(())
}

/// The verifier and vote counter a signing engine (PBFT, GPU-optimized Raft) with
/// [`ConsensusConfig::gpu_enabled`] uses: the
/// automatic ones (GPU above their crossovers, CPU below; a software adapter is never chosen)
/// over one GPU context per process and adapter, opened by the first engine that asks and
/// shared by the rest. Without an adapter, or when the GPU verifier cannot be built (a failed
/// self-check), both run on the CPU alone and the reason is logged once. On a software adapter
/// the vote pipelines are not even compiled: no batch would ever go to them.
#[cfg(feature = "gpu")]
pub(crate) fn shared_gpu_verifier(config: &ConsensusConfig) -> SharedVerifier {
    use std::collections::BTreeMap;
    use std::sync::{Mutex, OnceLock};

    use crate::gpu::votes::{CpuVoteAggregator, Threshold, VoteAggregator};
    use crate::gpu::{
        AdaptiveVoteAggregator, AutoSignatureVerifier, GpuContext, GpuSignatureVerifier,
        GpuVoteAggregator,
    };
    use wgpu::DeviceType;

    static OPENED: OnceLock<Mutex<BTreeMap<u32, SharedVerifier>>> = OnceLock::new();
    let mut opened = crate::sync::lock(OPENED.get_or_init(Mutex::default));
    let device = config.gpu_device;
    let verifier = opened.entry(device).or_insert_with(|| {
        let mut gpu_config = config.gpu_config.clone();
        gpu_config.device_id = device;
        gpu_config.memory_pool_size = config.gpu_memory_pool;
        let gpu = GpuContext::new(gpu_config)
            .map_err(|error| error.to_string())
            .and_then(|context| {
                GpuSignatureVerifier::new(Arc::new(context)).map_err(|error| error.to_string())
            });
        let threshold = Threshold::MajorityOfVotesCast; // the cores apply their own quorums
        let votes: Arc<dyn VoteAggregator> = match &gpu {
            Ok(verifier) if verifier.context().adapter_info().device_type != DeviceType::Cpu => {
                match GpuVoteAggregator::with_context(verifier.context().clone()) {
                    Ok(gpu) => Arc::new(AdaptiveVoteAggregator::new(gpu)),
                    Err(error) => {
                        tracing::warn!(%error, "votes: no GPU aggregator; the CPU counts them");
                        Arc::new(CpuVoteAggregator::new(threshold))
                    }
                }
            }
            _ => Arc::new(CpuVoteAggregator::new(threshold)),
        };
        let (gpu, status) = match gpu {
            Ok(gpu) => {
                let adapter = gpu.context().adapter_name().to_string();
                tracing::info!(%adapter, "signatures: GPU verifier ready");
                (Some(gpu), Ok(adapter))
            }
            Err(reason) => {
                tracing::warn!(%reason, "signatures: no GPU verifier; the CPU checks them");
                (None, Err(reason))
            }
        };
        SharedVerifier {
            context: gpu.as_ref().map(|gpu| gpu.context().clone()),
            verifier: Arc::new(AutoSignatureVerifier::new(gpu)),
            votes,
            gpu: status,
        }
    });
    verifier.clone()
}

/// The verifier and vote counter opened for `gpu_enabled`, and what became of its GPU.
#[cfg(feature = "gpu")]
#[derive(Clone)]
pub(crate) struct SharedVerifier {
    pub(crate) verifier: Arc<dyn crate::gpu::SignatureVerifier>,
    pub(crate) votes: Arc<dyn crate::gpu::VoteAggregator>,
    /// The GPU context both run on, when there is one (it counts their CPU fallbacks).
    pub(crate) context: Option<Arc<crate::gpu::GpuContext>>,
    /// The adapter the GPU verifier runs on, or why there is none.
    pub(crate) gpu: std::result::Result<String, String>,
}
