//! Mutual TLS 1.3 between peers: who a peer is comes from its certificate, never from what it
//! says.
//!
//! Every node holds a certificate issued by the cluster's CA. Its subject's common name (CN) is
//! the node's name (`node_id` in the configuration; the [`NodeId`] is
//! [`NodeId::from_name`] of it). Both ends of a connection present their certificates and check
//! the other's chain against the CA; the listener then accepts a handshake only for the name its
//! peer's certificate carries, and the dialer only from a peer whose certificate names the
//! node it expects (or, for a `host:port` peer, whatever node the CA vouched for).
//!
//! Host names are not checked: peers are identified by node name, not by address, so a node
//! may move between hosts with the same certificate. `consensus-node gen-certs` also writes the
//! node name, `localhost` and the loopback addresses as subject alternative names, so that the
//! same certificate serves the HTTP API to ordinary TLS clients on the node's host.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

use crate::types::NodeId;

/// Why TLS material could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// The OS error.
        reason: String,
    },
    /// [`generate_certificates`] would overwrite a file.
    #[error("{path} already exists; remove it to issue a new certificate")]
    Exists {
        /// The file.
        path: String,
    },
    /// A file holds no PEM item of the expected kind, or a malformed one.
    #[error("{what}: {reason}")]
    Pem {
        /// Which input (`cert`, `key`, `ca`, with the file when read from one).
        what: String,
        /// What is wrong.
        reason: String,
    },
    /// The node's own certificate is unusable: not issued by the CA, expired, not for both
    /// client and server authentication, or without a node name.
    #[error("certificate: {0}")]
    Certificate(String),
    /// rustls refused the combination (e.g. the key does not match the certificate).
    #[error("TLS configuration: {0}")]
    Rustls(String),
}

/// This node's TLS identity and the cluster CA, ready for the transport: what
/// [`TcpTransportConfig::tls`](super::TcpTransportConfig::tls) takes. Cheap to clone.
#[derive(Clone)]
pub struct PeerTls {
    inner: Arc<Inner>,
}

struct Inner {
    node_name: String,
    /// This node's chain and the CA, compared by [`PartialEq`].
    chain: Vec<CertificateDer<'static>>,
    ca: Vec<CertificateDer<'static>>,
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    serving: Arc<ServerConfig>,
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerTls")
            .field("node_name", &self.inner.node_name)
            .finish_non_exhaustive()
    }
}

impl PartialEq for PeerTls {
    fn eq(&self, other: &Self) -> bool {
        self.inner.chain == other.inner.chain && self.inner.ca == other.inner.ca
    }
}

impl Eq for PeerTls {}

/// The name a dialer sends as SNI. Listeners ignore it: they have one certificate.
const SNI: &str = "consensus-peer";

impl PeerTls {
    /// Reads this node's certificate chain (`cert`, PEM, the node's certificate first), its
    /// private key (`key`, PEM: PKCS#8, PKCS#1 or SEC1) and the cluster CA (`ca`, PEM, one or
    /// more certificates), and checks that the CA issued the node's certificate.
    pub fn load(cert: &Path, key: &Path, ca: &Path) -> Result<Self, TlsError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|error| TlsError::File {
                path: path.display().to_string(),
                reason: error.to_string(),
            })
        };
        let named = |what: &str, path: &Path| format!("{what} {}", path.display());
        let chain = parse_certificates(&read(cert)?, &named("cert", cert))?;
        let key_der = parse_key(&read(key)?, &named("key", key))?;
        let authorities = parse_certificates(&read(ca)?, &named("ca", ca))?;
        Self::new(chain, key_der, authorities)
    }

    /// [`PeerTls::load`] from PEM text already in memory.
    pub fn from_pem(cert: &[u8], key: &[u8], ca: &[u8]) -> Result<Self, TlsError> {
        Self::new(
            parse_certificates(cert, "cert")?,
            parse_key(key, "key")?,
            parse_certificates(ca, "ca")?,
        )
    }

    fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        ca: Vec<CertificateDer<'static>>,
    ) -> Result<Self, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        for authority in &ca {
            roots
                .add(authority.clone())
                .map_err(|error| TlsError::Pem {
                    what: "ca".into(),
                    reason: error.to_string(),
                })?;
        }
        let roots = Arc::new(roots);
        let own = chain
            .first()
            .ok_or_else(|| TlsError::Certificate("the cert file holds no certificate".into()))?;
        let node_name = certified_name(own).map_err(TlsError::Certificate)?;

        let rustls_error = |error: rustls::Error| TlsError::Rustls(error.to_string());
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .map_err(|error| TlsError::Rustls(error.to_string()))?;
        let server_verifier = Arc::new(ClusterServerVerifier {
            roots,
            algorithms: provider.signature_verification_algorithms,
        });
        // What every peer checks at each handshake, checked once here with the same verifiers,
        // so that a wrong file is a start-up error rather than a cluster that never connects.
        let now = UnixTime::now();
        server_verifier
            .verify_server_cert(own, &chain[1..], &Self::server_name(), &[], now)
            .map_err(|error| {
                TlsError::Certificate(format!(
                    "not usable as a peer certificate under this CA: {error}"
                ))
            })?;
        client_verifier
            .verify_client_cert(own, &chain[1..], now)
            .map_err(|error| {
                TlsError::Certificate(format!(
                    "not usable as a peer (client) certificate under this CA: {error}"
                ))
            })?;
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(rustls_error)?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(rustls_error)?;
        let mut serving = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(rustls_error)?
            .with_no_client_auth()
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(rustls_error)?;
        serving.alpn_protocols = vec![b"http/1.1".to_vec()];
        let client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(rustls_error)?
            .dangerous()
            .with_custom_certificate_verifier(server_verifier)
            .with_client_auth_cert(chain.clone(), key)
            .map_err(rustls_error)?;
        Ok(PeerTls {
            inner: Arc::new(Inner {
                node_name,
                chain,
                ca,
                server: Arc::new(server),
                client: Arc::new(client),
                serving: Arc::new(serving),
            }),
        })
    }

    /// The node name this node's certificate carries.
    pub fn node_name(&self) -> &str {
        &self.inner.node_name
    }

    /// The id of [`PeerTls::node_name`].
    pub fn node_id(&self) -> NodeId {
        NodeId::from_name(&self.inner.node_name)
    }

    /// The rustls server configuration: TLS 1.3, a client certificate from the CA required.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.inner.server.clone()
    }

    /// The rustls client configuration: TLS 1.3, this node's certificate presented, the
    /// server's chain checked against the CA (its name is checked by the caller, see
    /// [`certified_node_id`]).
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.inner.client.clone()
    }

    /// A rustls server configuration for clients that are not peers (the HTTP API): TLS 1.3
    /// with this node's certificate, no client certificate asked for, ALPN `http/1.1`.
    pub fn serving_config(&self) -> Arc<ServerConfig> {
        self.inner.serving.clone()
    }

    pub(crate) fn server_name() -> ServerName<'static> {
        ServerName::try_from(SNI).expect("a valid DNS name")
    }
}

/// The id of the node a verified certificate names (see the module documentation); `None` for
/// a certificate without exactly one common name.
pub fn certified_node_id(certificate: &CertificateDer<'_>) -> Option<NodeId> {
    certified_name(certificate)
        .ok()
        .map(|name| NodeId::from_name(&name))
}

/// The id the peer's verified certificate names, once a handshake is done on `connection`
/// (client or server side).
pub(super) fn certified_peer(connection: &rustls::CommonState) -> Option<NodeId> {
    connection
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(certified_node_id)
}

/// The subject's single common name.
fn certified_name(certificate: &CertificateDer<'_>) -> Result<String, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(certificate)
        .map_err(|error| format!("not a valid X.509 certificate: {error}"))?;
    let mut names = parsed.subject().iter_common_name();
    let name = names
        .next()
        .ok_or("the subject has no common name (CN), which must be the node's name")?;
    if names.next().is_some() {
        return Err("the subject has more than one common name (CN)".into());
    }
    let name = name
        .as_str()
        .map_err(|_| "the subject's common name is not a string".to_string())?;
    if name.is_empty() {
        return Err("the subject's common name is empty".into());
    }
    Ok(name.to_string())
}

/// Checks a listener's chain against the cluster CA and that it names a node, but not its host
/// name: the dialer compares the named node with the one it expects after the handshake.
#[derive(Debug)]
struct ClusterServerVerifier {
    roots: Arc<RootCertStore>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ClusterServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        certified_name(end_entity).map_err(|reason| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
                Arc::new(NoNodeName(reason)),
            )))
        })?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct NoNodeName(String);

fn parse_certificates(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certificates = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| TlsError::Pem {
            what: what.to_string(),
            reason: error.to_string(),
        })?;
    if certificates.is_empty() {
        return Err(TlsError::Pem {
            what: what.to_string(),
            reason: "no PEM certificate found".into(),
        });
    }
    Ok(certificates)
}

fn parse_key(pem: &[u8], what: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|error| TlsError::Pem {
        what: what.to_string(),
        reason: format!("no usable PEM private key: {error}"),
    })
}

/// What [`generate_certificates`] wrote for one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeCertificateFiles {
    /// The node's name (the certificate's CN).
    pub node: String,
    /// `<node>.pem`: the node's certificate.
    pub cert: std::path::PathBuf,
    /// `<node>.key`: its private key (mode 0600 on Unix).
    pub key: std::path::PathBuf,
}

/// How long generated certificates are valid, in years from the start of the current year.
const GENERATED_VALIDITY_YEARS: i32 = 10;

/// Writes a quick-start PKI into `dir` (created if missing): the cluster CA (`ca.pem`,
/// `ca.key`) and, for each of `nodes`, `<node>.pem` and `<node>.key` issued by it, with the
/// node's name as CN, the name (when it is a DNS name), `localhost`, `127.0.0.1` and `::1` as
/// subject alternative names, and both server and client authentication. Keys are ECDSA P-256;
/// certificates are valid for 10 years. When `dir` already holds `ca.pem` and `ca.key` that CA
/// issues the new certificates (to add a node later); existing node files are never
/// overwritten (an error names the first one). A production cluster's own PKI works as well:
/// any CA, with node certificates carrying the node's name as their single CN.
pub fn generate_certificates(
    dir: &Path,
    nodes: &[String],
) -> Result<Vec<NodeCertificateFiles>, TlsError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let generation = |error: rcgen::Error| TlsError::Certificate(error.to_string());
    let file_error = |path: &Path, error: std::io::Error| TlsError::File {
        path: path.display().to_string(),
        reason: error.to_string(),
    };
    if nodes.is_empty() {
        return Err(TlsError::Certificate("no node names given".into()));
    }
    for (i, node) in nodes.iter().enumerate() {
        check_node_name(node)?;
        if nodes[..i].contains(node) {
            return Err(TlsError::Certificate(format!("node {node:?} named twice")));
        }
    }
    std::fs::create_dir_all(dir).map_err(|error| file_error(dir, error))?;
    let planned: Vec<NodeCertificateFiles> = nodes
        .iter()
        .map(|node| NodeCertificateFiles {
            node: node.clone(),
            cert: dir.join(format!("{node}.pem")),
            key: dir.join(format!("{node}.key")),
        })
        .collect();
    if let Some(existing) = planned
        .iter()
        .flat_map(|files| [&files.cert, &files.key])
        .find(|path| path.exists())
    {
        return Err(TlsError::Exists {
            path: existing.display().to_string(),
        });
    }
    let year = current_year();
    let (start, end) = (
        rcgen::date_time_ymd(year, 1, 1),
        rcgen::date_time_ymd(year + GENERATED_VALIDITY_YEARS, 1, 1),
    );
    let (ca_cert_path, ca_key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
    let issuer = if ca_cert_path.exists() && ca_key_path.exists() {
        let read =
            |path: &Path| std::fs::read_to_string(path).map_err(|error| file_error(path, error));
        let key = KeyPair::from_pem(&read(&ca_key_path)?).map_err(|error| TlsError::Pem {
            what: format!("key {}", ca_key_path.display()),
            reason: error.to_string(),
        })?;
        Issuer::from_ca_cert_pem(&read(&ca_cert_path)?, key).map_err(|error| TlsError::Pem {
            what: format!("ca {}", ca_cert_path.display()),
            reason: error.to_string(),
        })?
    } else {
        let key = KeyPair::generate().map_err(generation)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(generation)?;
        params
            .distinguished_name
            .push(DnType::CommonName, "stratoswarm-consensus cluster CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        (params.not_before, params.not_after) = (start, end);
        let cert = params.self_signed(&key).map_err(generation)?;
        write_private(&ca_key_path, &key.serialize_pem())?;
        std::fs::write(&ca_cert_path, cert.pem())
            .map_err(|error| file_error(&ca_cert_path, error))?;
        Issuer::new(params, key)
    };
    for files in &planned {
        let node = &files.node;
        let mut names = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
        if rustls::pki_types::DnsName::try_from(node.as_str()).is_ok() && node != "localhost" {
            names.insert(0, node.clone());
        }
        let mut params = CertificateParams::new(names).map_err(generation)?;
        params
            .distinguished_name
            .push(DnType::CommonName, node.as_str());
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        (params.not_before, params.not_after) = (start, end);
        let key = KeyPair::generate().map_err(generation)?;
        let cert = params.signed_by(&key, &issuer).map_err(generation)?;
        write_private(&files.key, &key.serialize_pem())?;
        std::fs::write(&files.cert, cert.pem()).map_err(|error| file_error(&files.cert, error))?;
    }
    Ok(planned)
}

/// A node name usable as a certificate CN and as a file name in the certificate directory.
fn check_node_name(node: &str) -> Result<(), TlsError> {
    let fine = !node.is_empty()
        && node.len() <= 64
        && !node.starts_with('.')
        && node
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if fine && node != "ca" {
        Ok(())
    } else {
        Err(TlsError::Certificate(format!(
            "node name {node:?} must be 1 to 64 of [A-Za-z0-9._-], not starting with '.', and \
             not \"ca\""
        )))
    }
}

/// The current year (UTC, to within a day at the turn of the year: certificates start on the
/// first of January of it).
fn current_year() -> i32 {
    const SECONDS_PER_YEAR: u64 = 31_556_952; // 365.2425 days
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs());
    1970 + i32::try_from(seconds / SECONDS_PER_YEAR).unwrap_or(0)
}

/// Writes a private key readable by its owner only.
fn write_private(path: &Path, text: &str) -> Result<(), TlsError> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options
        .open(path)
        .and_then(|mut file| file.write_all(text.as_bytes()))
        .map_err(|error| TlsError::File {
            path: path.display().to_string(),
            reason: error.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::{Duration, Instant};

    use tokio::net::TcpStream;
    use tokio_util::codec::LengthDelimitedCodec;

    use super::super::wire::{
        Codec, Hello, PROTOCOL_VERSION, PeerServiceClient, Refusal, encode_message, seal_payload,
    };
    use super::super::{PeerAddress, TcpTransport, TcpTransportConfig};
    use super::*;
    use crate::transport::Transport;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|name| name.to_string()).collect()
    }

    fn identity(dir: &Path, node: &str) -> PeerTls {
        PeerTls::load(
            &dir.join(format!("{node}.pem")),
            &dir.join(format!("{node}.key")),
            &dir.join("ca.pem"),
        )
        .unwrap()
    }

    fn config(node: &str, tls: Option<PeerTls>) -> TcpTransportConfig {
        let mut config =
            TcpTransportConfig::new(NodeId::from_name(node), "c", "127.0.0.1:0".parse().unwrap());
        config.tls = tls;
        config.reconnect_backoff_min = Duration::from_millis(5);
        config.reconnect_backoff_max = Duration::from_millis(50);
        config
    }

    /// `node@address`: a peer given with the id it must prove.
    fn named(node: &str, address: SocketAddr) -> PeerAddress {
        PeerAddress::with_id(NodeId::from_name(node), "127.0.0.1", address.port())
    }

    fn context() -> tarpc::context::Context {
        let mut context = tarpc::context::current();
        context.deadline = Instant::now() + Duration::from_secs(5);
        context
    }

    /// A hand-driven peer: TLS with `client` (any certificate, any claim), or plain TCP.
    async fn raw_client(
        address: SocketAddr,
        client: Option<Arc<ClientConfig>>,
    ) -> std::io::Result<PeerServiceClient> {
        let stream = TcpStream::connect(address).await?;
        let stream: super::super::PeerStream = match client {
            None => tokio_util::either::Either::Left(stream),
            Some(client) => {
                let connector = tokio_rustls::TlsConnector::from(client);
                let stream = connector.connect(PeerTls::server_name(), stream).await?;
                tokio_util::either::Either::Right(stream.into())
            }
        };
        let framed = LengthDelimitedCodec::builder().new_framed(stream);
        let transport = tarpc::serde_transport::new(framed, Codec::default());
        Ok(PeerServiceClient::new(tarpc::client::Config::default(), transport).spawn())
    }

    /// A client configuration that trusts the real CA's listeners but presents `chain`/`key`,
    /// which need not come from that CA: what an outsider with its own certificate sends.
    fn presenting(real_ca: &Path, chain: &Path, key: &Path) -> Arc<ClientConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        for ca in parse_certificates(&std::fs::read(real_ca).unwrap(), "ca").unwrap() {
            roots.add(ca).unwrap();
        }
        let verifier = Arc::new(ClusterServerVerifier {
            roots: Arc::new(roots),
            algorithms: provider.signature_verification_algorithms,
        });
        let chain = parse_certificates(&std::fs::read(chain).unwrap(), "cert").unwrap();
        let key = parse_key(&std::fs::read(key).unwrap(), "key").unwrap();
        Arc::new(
            ClientConfig::builder_with_provider(provider)
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_client_auth_cert(chain, key)
                .unwrap(),
        )
    }

    fn hello(claimed: &str) -> Hello {
        Hello {
            protocol_version: PROTOCOL_VERSION,
            cluster_id: "c".into(),
            node_id: NodeId::from_name(claimed),
        }
    }

    /// Tries everything an outsider can do on one connection: introduce itself as `node-2`,
    /// then deliver a batch. Returns whether any step was accepted.
    async fn attack(address: SocketAddr, client: Option<Arc<ClientConfig>>) -> bool {
        let Ok(client) = raw_client(address, client).await else {
            return false;
        };
        let forged = seal_payload(encode_message(&"forged".to_owned()).unwrap(), false);
        let introduced = matches!(client.hello(context(), hello("node-2")).await, Ok(Ok(_)));
        let delivered = matches!(client.deliver(context(), forged).await, Ok(Ok(())));
        introduced || delivered
    }

    #[tokio::test]
    async fn only_peers_certified_by_the_cluster_ca_get_messages_in_and_as_who_they_are() {
        let pki = tempfile::tempdir().unwrap();
        let outsider = tempfile::tempdir().unwrap();
        generate_certificates(pki.path(), &names(&["node-1", "node-2", "node-3"])).unwrap();
        generate_certificates(outsider.path(), &names(&["node-2"])).unwrap();

        let (server, mut inbound) = TcpTransport::<String>::start(
            config("node-1", Some(identity(pki.path(), "node-1"))),
            vec![],
        )
        .await
        .unwrap();
        let address = server.local_addr();

        // The real node-2 gets its messages in, tagged with its certified id.
        let node_2 = NodeId::from_name("node-2");
        let (honest, _honest_inbound) = TcpTransport::<String>::start(
            config("node-2", Some(identity(pki.path(), "node-2"))),
            vec![named("node-1", address)],
        )
        .await
        .unwrap();
        honest.send(NodeId::from_name("node-1"), "honest".into());
        let first = tokio::time::timeout(Duration::from_secs(10), inbound.recv())
            .await
            .unwrap();
        let first = first.map(|got| (got.from, got.message));
        assert_eq!(first, Some((node_2, "honest".to_owned())));

        // No certificate at all (plain TCP), a certificate of another CA claiming node-2, and
        // a valid certificate of node-3 claiming node-2: none gets anything in.
        assert!(!attack(address, None).await, "plain TCP got in");
        let foreign = presenting(
            &pki.path().join("ca.pem"),
            &outsider.path().join("node-2.pem"),
            &outsider.path().join("node-2.key"),
        );
        assert!(
            !attack(address, Some(foreign)).await,
            "another CA's certificate got in"
        );
        let impostor = identity(pki.path(), "node-3").client_config();
        let client = raw_client(address, Some(impostor.clone())).await.unwrap();
        let refused = client.hello(context(), hello("node-2")).await.unwrap();
        assert_eq!(
            refused,
            Err(Refusal::NotCertified {
                certified: NodeId::from_name("node-3"),
                claimed: node_2,
            })
        );
        assert!(
            !attack(address, Some(impostor)).await,
            "node-3 got in as node-2"
        );
        // A plain-TCP transport configured as node-2 never connects either.
        let (plain, _plain_inbound) =
            TcpTransport::<String>::start(config("node-2", None), vec![named("node-1", address)])
                .await
                .unwrap();
        for _ in 0..10 {
            plain.send(NodeId::from_name("node-1"), "forged".into());
        }

        // The honest peer still gets through; nothing else ever arrived.
        honest.send(NodeId::from_name("node-1"), "honest again".into());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let next = tokio::time::timeout_at(deadline.into(), inbound.recv())
                .await
                .expect("the honest peer's second message never arrived");
            let super::super::Inbound { from, message, .. } = next.unwrap();
            assert_ne!(message, "forged", "a forged message reached the receiver");
            assert_eq!(from, node_2);
            if message == "honest again" {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(inbound.try_recv().is_err(), "nothing else arrived");
        assert!(
            server.stats().connections_rejected >= 4,
            "{:?}",
            server.stats()
        );
        assert_eq!(plain.stats().connections_established, 0);
        assert_eq!(server.stats().messages_received, 2);
        plain.shutdown().await;
        honest.shutdown().await;
        server.shutdown().await;
    }

    #[tokio::test]
    async fn a_dialer_only_talks_to_the_node_it_expects() {
        let pki = tempfile::tempdir().unwrap();
        let outsider = tempfile::tempdir().unwrap();
        generate_certificates(pki.path(), &names(&["node-1", "node-2", "node-3"])).unwrap();
        generate_certificates(outsider.path(), &names(&["node-2"])).unwrap();
        let node_2 = NodeId::from_name("node-2");
        // Listening where node-2 should be: node-3 (right CA, wrong node) and an outsider's
        // node-2 (wrong CA).
        let (node_3, mut node_3_inbound) = TcpTransport::<String>::start(
            config("node-3", Some(identity(pki.path(), "node-3"))),
            vec![],
        )
        .await
        .unwrap();
        let (fake_2, mut fake_2_inbound) = TcpTransport::<String>::start(
            config("node-2", Some(identity(outsider.path(), "node-2"))),
            vec![],
        )
        .await
        .unwrap();
        let (dialer, _inbound) = TcpTransport::<String>::start(
            config("node-1", Some(identity(pki.path(), "node-1"))),
            vec![
                named("node-2", node_3.local_addr()),
                PeerAddress::without_id("127.0.0.1", fake_2.local_addr().port()),
            ],
        )
        .await
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            dialer.send(node_2, "for node-2".into());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(node_3_inbound.try_recv().is_err());
        assert!(fake_2_inbound.try_recv().is_err());
        let stats = dialer.stats();
        assert_eq!(stats.connections_established, 0, "{stats:?}");
        assert!(stats.dial_failures >= 2, "{stats:?}");
        assert_eq!(
            dialer.known_peers(),
            vec![node_2],
            "the host:port peer stays unknown"
        );
        dialer.shutdown().await;
        node_3.shutdown().await;
        fake_2.shutdown().await;
    }

    #[test]
    fn loading_checks_the_files_and_generation_never_overwrites() {
        let pki = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let written = generate_certificates(pki.path(), &names(&["a", "b"])).unwrap();
        assert_eq!(written.len(), 2);
        generate_certificates(other.path(), &names(&["a"])).unwrap();
        let tls = identity(pki.path(), "a");
        assert_eq!(tls.node_name(), "a");
        assert_eq!(tls.node_id(), NodeId::from_name("a"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&written[0].key)
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }

        // A certificate of another CA, a key that is not the certificate's, missing files and
        // files of the wrong kind: each a typed error naming the problem.
        let p = |dir: &tempfile::TempDir, file: &str| dir.path().join(file);
        let foreign = PeerTls::load(&p(&other, "a.pem"), &p(&other, "a.key"), &p(&pki, "ca.pem"));
        assert!(
            matches!(foreign, Err(TlsError::Certificate(_))),
            "{foreign:?}"
        );
        let mismatched = PeerTls::load(&p(&pki, "a.pem"), &p(&pki, "b.key"), &p(&pki, "ca.pem"));
        assert!(
            matches!(mismatched, Err(TlsError::Rustls(_))),
            "{mismatched:?}"
        );
        let missing = PeerTls::load(&p(&pki, "z.pem"), &p(&pki, "a.key"), &p(&pki, "ca.pem"));
        assert!(
            matches!(&missing, Err(TlsError::File { path, .. }) if path.ends_with("z.pem")),
            "{missing:?}"
        );
        let swapped = PeerTls::load(&p(&pki, "a.key"), &p(&pki, "a.pem"), &p(&pki, "ca.pem"));
        assert!(matches!(swapped, Err(TlsError::Pem { .. })), "{swapped:?}");
        let garbage = PeerTls::from_pem(b"-----BEGIN CERTIFICATE-----\n!!\n", b"", b"");
        assert!(garbage.is_err());

        // Adding a node later reuses the CA; existing files are refused, as are bad names.
        let added = generate_certificates(pki.path(), &names(&["c"])).unwrap();
        let c = identity(pki.path(), "c");
        assert_eq!(c.node_name(), "c");
        assert_eq!(added[0].cert, p(&pki, "c.pem"));
        let again = generate_certificates(pki.path(), &names(&["b"]));
        assert!(matches!(again, Err(TlsError::Exists { .. })), "{again:?}");
        for bad in ["", "../x", ".hidden", "a b", "ca"] {
            let refused = generate_certificates(other.path(), &names(&[bad]));
            assert!(matches!(refused, Err(TlsError::Certificate(_))), "{bad:?}");
        }
        let twice = generate_certificates(other.path(), &names(&["x", "x"]));
        assert!(matches!(twice, Err(TlsError::Certificate(_))));

        // The transport refuses a certificate of another node than its node_id.
        let mut config = config("b", Some(tls));
        assert!(config.validate().is_err());
        config.node_id = NodeId::from_name("a");
        config.validate().unwrap();
    }

    /// The PEM files are outside input: damaged certificates, keys and CAs (bytes flipped,
    /// cut, inserted, or swapped between the three) load or give a typed error, never panic.
    /// Built with the other fuzz tests (default features; see `crate::fuzzing`).
    #[cfg(all(feature = "gpu", feature = "server"))]
    #[test]
    fn fuzz_tls_files() {
        use proptest::prelude::*;
        let pki = tempfile::tempdir().unwrap();
        generate_certificates(pki.path(), &names(&["a"])).unwrap();
        let read = |file: &str| std::fs::read(pki.path().join(file)).unwrap();
        let files = [read("a.pem"), read("a.key"), read("ca.pem")];
        let mut runner = proptest::test_runner::TestRunner::new(crate::fuzzing::config(2_000));
        let damage = (
            0..3usize,
            prop::sample::select(vec![0usize, 1, 2]),
            any::<usize>(),
            0..4u8,
            any::<u8>(),
            0..64usize,
        );
        runner
            .run(&damage, |(target, source, at, kind, byte, length)| {
                let mut inputs = files.clone();
                let victim = &mut inputs[target];
                let at = at % (victim.len() + 1);
                match kind {
                    0 => {
                        if at < victim.len() {
                            victim[at] ^= byte | 1;
                        }
                    }
                    1 => victim.truncate(at),
                    2 => victim
                        .splice(at..at, std::iter::repeat_n(byte, length))
                        .for_each(drop),
                    _ => inputs[target] = files[source].clone(),
                }
                match PeerTls::from_pem(&inputs[0], &inputs[1], &inputs[2]) {
                    Ok(tls) => prop_assert_eq!(tls.node_name(), "a"),
                    Err(error) => prop_assert!(!error.to_string().is_empty()),
                }
                Ok(())
            })
            .unwrap();
    }
}
