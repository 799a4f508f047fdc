//! Signing keys of the algorithms that sign their messages (PBFT, GPU-optimized Raft): a replica's
//! identity is its ed25519 public key.
//!
//! A node's secret key lives in [`ConsensusConfig::key_file`] (64 hex characters, written by
//! [`generate_key_file`] or `consensus-node keygen FILE`), and every member's public key in
//! [`ConsensusConfig::validators`]. [`ConsensusConfig::signing_identity`] reads and cross-checks
//! both into a [`SigningIdentity`], the form the engines use.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::Write;
use std::path::Path;

use ed25519_dalek::{SigningKey, VerifyingKey};
use rand::TryRng;

use crate::config::{Algorithm, ConsensusConfig};
use crate::error::ConfigError;
use crate::types::NodeId;

/// This node's signing key and every member's public key, checked against each other.
#[derive(Clone)]
pub struct SigningIdentity {
    /// This node ([`ConsensusConfig::id`]).
    pub node: NodeId,
    /// This node's secret key; its public half is `validators[&node]`.
    pub signing_key: SigningKey,
    /// Every member's public key, this node's included, by [`NodeId::from_name`] of its name.
    pub validators: BTreeMap<NodeId, VerifyingKey>,
}

/// Shows the public key, never the secret one.
impl fmt::Debug for SigningIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningIdentity")
            .field("node", &self.node)
            .field(
                "public_key",
                &public_key_hex(&self.signing_key.verifying_key()),
            )
            .field("validators", &self.validators.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// Why [`generate_key_file`] wrote no key.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// The file exists; a key file is never overwritten, since the old key may be the one the
    /// other members list.
    #[error("key file {path} already exists; refusing to overwrite it")]
    Exists {
        /// The file.
        path: String,
    },
    /// Creating or writing the file failed.
    #[error("cannot write key file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The operating system's random source failed.
    #[error("cannot generate a key: the operating system's random source failed: {0}")]
    Entropy(String),
}

/// Writes a fresh random ed25519 secret key to `path` (64 lowercase hex characters and a newline)
/// and returns its public key. Refuses to overwrite an existing file; on unix the file is created
/// with mode 0600 (narrowed further by the umask). The key comes from the operating system's
/// random source, and the file is synced before this returns.
pub fn generate_key_file(path: impl AsRef<Path>) -> Result<VerifyingKey, KeyFileError> {
    let path = path.as_ref();
    let mut secret = [0u8; 32];
    rand::rngs::SysRng
        .try_fill_bytes(&mut secret)
        .map_err(|error| KeyFileError::Entropy(error.to_string()))?;
    let signing_key = SigningKey::from_bytes(&secret);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let io_error = |source| KeyFileError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut file = options.open(path).map_err(|error| {
        if error.kind() == std::io::ErrorKind::AlreadyExists {
            KeyFileError::Exists {
                path: path.display().to_string(),
            }
        } else {
            io_error(error)
        }
    })?;
    let written = file
        .write_all(format!("{}\n", encode_hex(&secret)).as_bytes())
        .and_then(|()| file.sync_all());
    if let Err(error) = written {
        // The file is ours (create_new) and incomplete: leaving it would make the retry refuse.
        drop(file);
        let _ = std::fs::remove_file(path);
        return Err(io_error(error));
    }
    Ok(signing_key.verifying_key())
}

/// `key` as 64 lowercase hex characters, the form of [`ConsensusConfig::validators`] and of
/// `consensus-node keygen`'s output.
pub fn public_key_hex(key: &VerifyingKey) -> String {
    encode_hex(key.as_bytes())
}

pub(crate) fn encode_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    bytes
        .iter()
        .flat_map(|&byte| {
            [
                DIGITS[usize::from(byte >> 4)],
                DIGITS[usize::from(byte & 15)],
            ]
        })
        .map(char::from)
        .collect()
}

/// Decodes 64 hex characters (either case) into 32 bytes. The error says what is wrong without
/// quoting the text, which may be a secret.
fn decode_key_hex(text: &str) -> Result<[u8; 32], String> {
    decode_hex::<32>(text)
}

/// `N` bytes from `2N` hex digits; the error says what is wrong.
pub(crate) fn decode_hex<const N: usize>(text: &str) -> Result<[u8; N], String> {
    let count = text.chars().count();
    if count != 2 * N {
        return Err(format!(
            "expected {} hex characters ({N} bytes), found {count} characters",
            2 * N
        ));
    }
    let digits = text
        .chars()
        .enumerate()
        .map(|(position, c)| {
            c.to_digit(16)
                .map(|digit| digit as u8) // below 16
                .ok_or_else(|| format!("character {} is not a hex digit", position + 1))
        })
        .collect::<Result<Vec<u8>, String>>()?;
    let mut bytes = [0u8; N];
    for (byte, pair) in bytes.iter_mut().zip(digits.chunks_exact(2)) {
        *byte = (pair[0] << 4) | pair[1];
    }
    Ok(bytes)
}

/// The public key of `node`'s validators entry `value`, or what is wrong with it.
fn parse_public_key(node: &str, value: &str) -> Result<VerifyingKey, ConfigError> {
    public_key_from_hex(value).map_err(|problem| ConfigError::InvalidValidatorKey {
        node: node.to_string(),
        value: value.to_string(),
        problem,
    })
}

/// A member's ed25519 public key from 64 hex characters, refused when the bytes are no curve
/// point or a small-order one; the error says what is wrong.
pub(crate) fn public_key_from_hex(text: &str) -> Result<VerifyingKey, String> {
    public_key_from_bytes(&decode_key_hex(text)?)
}

/// A member's ed25519 public key from its 32 bytes, refused as [`public_key_from_hex`] says.
pub(crate) fn public_key_from_bytes(bytes: &[u8; 32]) -> Result<VerifyingKey, String> {
    let key = VerifyingKey::from_bytes(bytes).map_err(|_| {
        "not an ed25519 public key: the bytes do not decode to a curve point".to_string()
    })?;
    if key.is_weak() {
        // A small-order key admits signatures that verify for almost any message.
        return Err("a small-order (weak) point, under which signatures prove nothing".into());
    }
    Ok(key)
}

impl ConsensusConfig {
    /// Every member's name, this node's first: the names [`ConsensusConfig::validators`] is keyed
    /// by.
    fn member_names(&self) -> Vec<&str> {
        let mut names = vec![self.node_id.as_str()];
        names.extend(self.peer_names());
        names
    }

    /// Part of [`ConsensusConfig::validate`], for every algorithm: each validators entry names a
    /// member and holds a usable public key.
    pub(crate) fn validate_validator_table(&self) -> Result<(), ConfigError> {
        let members = self.member_names();
        for (node, value) in &self.validators {
            if !members.contains(&node.as_str()) {
                return Err(ConfigError::UnknownValidator { node: node.clone() });
            }
            parse_public_key(node, value)?;
        }
        Ok(())
    }

    /// [`ConsensusConfig::validate`], plus what the algorithms that sign their messages
    /// ([`Algorithm::signs_messages`]) need: PBFT at least four members (n = 3f + 1), a
    /// `key_file`, and a validators entry for every member, this node included. For Raft it is
    /// `validate` alone. The key file itself is read by [`ConsensusConfig::signing_identity`].
    pub fn validate_signing(&self) -> Result<(), ConfigError> {
        self.validate()?;
        if self.algorithm.signs_messages() {
            self.check_signing_setup()?;
        }
        Ok(())
    }

    /// The checks of [`ConsensusConfig::validate_signing`] beyond `validate`, whatever the
    /// algorithm; answers the key file's path.
    fn check_signing_setup(&self) -> Result<&Path, ConfigError> {
        let configured = self.voter_ids().len();
        if self.algorithm == Algorithm::Pbft && configured < 4 {
            return Err(ConfigError::TooFewReplicas { configured });
        }
        let path = self
            .key_file
            .as_deref()
            .ok_or(ConfigError::MissingKeyFile)?;
        // A node started to join needs only its own key: it learns the members' from the
        // memberships in the log (GPU-optimized Raft carries every member's key in them).
        let needed = if self.joining {
            vec![self.node_id.as_str()]
        } else {
            self.member_names()
        };
        if let Some(missing) = needed
            .into_iter()
            .find(|name| !self.validators.contains_key(*name))
        {
            return Err(ConfigError::MissingValidator {
                node: missing.to_string(),
            });
        }
        Ok(path)
    }

    /// The keys of [`ConsensusConfig::client_keys`], or `None` when it is empty (any client).
    pub fn client_key_set(&self) -> Result<Option<BTreeSet<[u8; 32]>>, ConfigError> {
        if self.client_keys.is_empty() {
            return Ok(None);
        }
        self.client_keys
            .iter()
            .map(|hex| Ok(parse_public_key("client_keys", hex)?.to_bytes()))
            .collect::<Result<BTreeSet<_>, _>>()
            .map(Some)
    }

    /// The public keys of [`ConsensusConfig::validators`], by [`NodeId::from_name`] of each
    /// name; an entry that is not a key is an error naming it.
    pub fn validator_keys(&self) -> Result<BTreeMap<NodeId, VerifyingKey>, ConfigError> {
        self.validators
            .iter()
            .map(|(name, value)| Ok((NodeId::from_name(name), parse_public_key(name, value)?)))
            .collect()
    }

    /// Reads [`ConsensusConfig::key_file`] and checks it against this node's entry in
    /// [`ConsensusConfig::validators`], after everything [`ConsensusConfig::validate_signing`]
    /// checks for a signed algorithm (whatever [`ConsensusConfig::algorithm`] says: asking for
    /// an identity means wanting one).
    ///
    /// The file must hold 64 hex characters, surrounding whitespace allowed. Errors name the
    /// file and what is wrong, never its contents; a key that does not match shows both public
    /// keys.
    pub fn signing_identity(&self) -> Result<SigningIdentity, ConfigError> {
        self.validate()?;
        let path = self.check_signing_setup()?;
        let key_file_error = |problem: String| ConfigError::KeyFile {
            path: path.display().to_string(),
            problem,
        };
        let text = std::fs::read_to_string(path)
            .map_err(|error| key_file_error(format!("cannot read it: {error}")))?;
        let secret = decode_key_hex(text.trim())
            .map_err(|problem| key_file_error(format!("not an ed25519 secret key: {problem}")))?;
        let signing_key = SigningKey::from_bytes(&secret);
        let validators = self.validator_keys()?;
        let configured = &self.validators[&self.node_id]; // check_signing_setup found it
        if parse_public_key(&self.node_id, configured)? != signing_key.verifying_key() {
            return Err(ConfigError::KeyMismatch {
                path: path.display().to_string(),
                node: self.node_id.clone(),
                actual: public_key_hex(&signing_key.verifying_key()),
                configured: configured.clone(),
            });
        }
        Ok(SigningIdentity {
            node: self.id(),
            signing_key,
            validators,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic key for member `seed`.
    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn public(seed: u8) -> String {
        public_key_hex(&key(seed).verifying_key())
    }

    /// Four PBFT members a, b, c, d with keys 1..=4 and `a`'s key file in `dir`.
    fn pbft(dir: &Path) -> ConsensusConfig {
        let path = dir.join("a.key");
        std::fs::write(&path, format!("{}\n", encode_hex(&key(1).to_bytes()))).unwrap();
        ConsensusConfig::default()
            .algorithm(Algorithm::Pbft)
            .node_id("a")
            .peers(["b@127.0.0.1:7002", "c@127.0.0.1:7003", "d@127.0.0.1:7004"])
            .key_file(path)
            .validator("a", public(1))
            .validator("b", public(2))
            .validator("c", public(3))
            .validator("d", public(4))
    }

    #[test]
    fn hex_round_trips_and_names_what_is_wrong() {
        let bytes: [u8; 32] = std::array::from_fn(|i| (i * 37) as u8);
        let text = encode_hex(&bytes);
        assert_eq!(text.len(), 64);
        assert_eq!(decode_key_hex(&text).unwrap(), bytes);
        assert_eq!(decode_key_hex(&text.to_uppercase()).unwrap(), bytes);
        let short = decode_key_hex(&text[..62]).unwrap_err();
        assert!(short.contains("found 62"), "{short}");
        let bad = decode_key_hex(&format!("{}g{}", &text[..4], &text[5..])).unwrap_err();
        assert!(bad.contains("character 5"), "{bad}");
        let wide = decode_key_hex(&format!("é{}", &text[1..])).unwrap_err();
        assert!(wide.contains("character 1"), "{wide}");
    }

    #[test]
    fn a_complete_pbft_configuration_validates_and_loads() {
        let dir = tempfile::tempdir().unwrap();
        let config = pbft(dir.path());
        config.validate_signing().unwrap();
        let identity = config.signing_identity().unwrap();
        assert_eq!(identity.node, NodeId::from_name("a"));
        assert_eq!(identity.signing_key.to_bytes(), key(1).to_bytes());
        assert_eq!(identity.validators.len(), 4);
        assert_eq!(
            identity.validators[&NodeId::from_name("c")],
            key(3).verifying_key()
        );
    }

    #[test]
    fn pbft_needs_four_replicas() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = pbft(dir.path()).peers(["b@127.0.0.1:7002", "c@127.0.0.1:7003"]);
        config.validators.remove("d");
        let error = config.validate_signing().unwrap_err();
        assert_eq!(error, ConfigError::TooFewReplicas { configured: 3 });
        let message = error.to_string();
        assert!(message.contains("3f + 1 >= 4") && message.contains("3 configured"));
        // GPU-optimized Raft is Raft: three members are enough.
        config.algorithm = Algorithm::GpuOptimizedRaft;
        config.validate_signing().unwrap();
    }

    #[test]
    fn a_signed_algorithm_needs_a_key_file_and_raft_does_not() {
        let dir = tempfile::tempdir().unwrap();
        for algorithm in [Algorithm::Pbft, Algorithm::GpuOptimizedRaft] {
            let mut config = pbft(dir.path()).algorithm(algorithm);
            config.key_file = None;
            assert_eq!(config.validate_signing(), Err(ConfigError::MissingKeyFile));
            assert!(
                config
                    .validate_signing()
                    .unwrap_err()
                    .to_string()
                    .contains("key_file"),
                "the message names the key"
            );
        }
        let raft = ConsensusConfig::default().algorithm(Algorithm::Raft);
        raft.validate_signing().unwrap();
        // Asking for an identity still needs one.
        assert_eq!(
            raft.signing_identity().unwrap_err(),
            ConfigError::MissingKeyFile
        );
    }

    #[test]
    fn a_malformed_validator_key_is_named_with_its_problem() {
        let dir = tempfile::tempdir().unwrap();
        let good = public(2);
        let off_curve = format!("02{}", "00".repeat(31));
        // The identity point: decodes, but has order 1.
        let small_order = format!("01{}", "00".repeat(31));
        let cases = [
            (
                format!("{}zz", &good[..62]),
                "character 63 is not a hex digit",
            ),
            (good[..60].to_string(), "found 60 characters"),
            (format!("{good}00"), "found 66 characters"),
            (off_curve, "do not decode to a curve point"),
            (small_order, "small-order"),
        ];
        for (value, problem) in cases {
            let config = pbft(dir.path()).validator("b", value.clone());
            // Malformed for every algorithm: `validate` itself refuses it.
            let error = config
                .clone()
                .algorithm(Algorithm::Raft)
                .validate()
                .unwrap_err();
            let ConfigError::InvalidValidatorKey {
                node,
                value: shown,
                problem: said,
            } = &error
            else {
                panic!("expected InvalidValidatorKey, got {error:?}");
            };
            assert_eq!((node.as_str(), shown), ("b", &value));
            assert!(said.contains(problem), "{said:?} should say {problem:?}");
            let message = error.to_string();
            assert!(
                message.contains("\"b\"") && message.contains(&value),
                "{message}"
            );
        }
    }

    #[test]
    fn every_member_needs_an_entry_and_entries_must_be_members() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = pbft(dir.path());
        config.validators.remove("c");
        let error = config.validate_signing().unwrap_err();
        assert_eq!(error, ConfigError::MissingValidator { node: "c".into() });
        assert!(error.to_string().contains("part before '@'"), "{error}");
        // This node counts too.
        let mut config = pbft(dir.path());
        config.validators.remove("a");
        assert_eq!(
            config.validate_signing(),
            Err(ConfigError::MissingValidator { node: "a".into() })
        );
        // A peer given as host:port is keyed by the whole entry.
        let mut config =
            pbft(dir.path()).peers(["b@127.0.0.1:7002", "c@127.0.0.1:7003", "10.0.0.4:7004"]);
        config.validators.remove("d");
        assert_eq!(
            config.validate_signing(),
            Err(ConfigError::MissingValidator {
                node: "10.0.0.4:7004".into()
            })
        );
        config
            .validator("10.0.0.4:7004", public(4))
            .validate_signing()
            .unwrap();
        // An entry for a node that is not a member is a typo, refused for every algorithm.
        let config = pbft(dir.path())
            .algorithm(Algorithm::Raft)
            .validator("e", public(5));
        assert_eq!(
            config.validate(),
            Err(ConfigError::UnknownValidator { node: "e".into() })
        );
    }

    #[test]
    fn a_key_file_that_does_not_match_shows_both_keys() {
        let dir = tempfile::tempdir().unwrap();
        let config = pbft(dir.path()).validator("a", public(9));
        // The table alone is fine; only reading the file finds the mismatch.
        config.validate_signing().unwrap();
        let error = config.signing_identity().unwrap_err();
        let ConfigError::KeyMismatch {
            path,
            node,
            actual,
            configured,
        } = &error
        else {
            panic!("expected KeyMismatch, got {error:?}");
        };
        assert_eq!(node, "a");
        assert!(path.ends_with("a.key"), "{path}");
        assert_eq!((actual, configured), (&public(1), &public(9)));
        let message = error.to_string();
        assert!(message.contains(&public(1)) && message.contains(&public(9)));
    }

    #[test]
    fn key_file_errors_name_the_file_and_never_its_contents() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.key");
        let secret = encode_hex(&key(1).to_bytes());
        let config = pbft(dir.path());
        // Surrounding whitespace is fine.
        std::fs::write(&path, format!("  \n{secret}\r\n\n")).unwrap();
        config.signing_identity().unwrap();
        for (contents, problem) in [
            (format!("{secret}{secret}"), "found 128 characters"),
            (
                format!("{}x{}", &secret[..32], &secret[33..]),
                "character 33",
            ),
            (String::new(), "found 0 characters"),
        ] {
            std::fs::write(&path, &contents).unwrap();
            let error = config.signing_identity().unwrap_err();
            let message = error.to_string();
            assert!(
                matches!(error, ConfigError::KeyFile { .. })
                    && message.contains(&path.display().to_string())
                    && message.contains(problem),
                "{message}"
            );
            assert!(!message.contains(&secret[..16]), "leaks the key: {message}");
        }
        std::fs::remove_file(&path).unwrap();
        let error = config.signing_identity().unwrap_err().to_string();
        assert!(
            error.contains(&path.display().to_string()) && error.contains("cannot read"),
            "{error}"
        );
    }

    #[test]
    fn a_generated_key_file_loads_and_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fresh.key");
        let public_key = generate_key_file(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.ends_with('\n') && text.trim().len() == 64, "{text:?}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        }
        let config = pbft(dir.path())
            .key_file(&path)
            .validator("a", public_key_hex(&public_key));
        let identity = config.signing_identity().unwrap();
        assert_eq!(identity.signing_key.verifying_key(), public_key);
        let error = generate_key_file(&path).unwrap_err();
        assert!(matches!(error, KeyFileError::Exists { .. }), "{error}");
        assert!(error.to_string().contains("fresh.key"), "{error}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text, "unchanged");
        // Two keys are never the same.
        let other = generate_key_file(dir.path().join("other.key")).unwrap();
        assert_ne!(other, public_key);
        let error = generate_key_file(dir.path().join("missing/dir.key")).unwrap_err();
        assert!(matches!(error, KeyFileError::Io { .. }), "{error}");
    }

    #[test]
    fn debug_shows_the_public_key_and_not_the_secret() {
        let dir = tempfile::tempdir().unwrap();
        let identity = pbft(dir.path()).signing_identity().unwrap();
        let shown = format!("{identity:?}");
        assert!(shown.contains(&public(1)), "{shown}");
        let secret = encode_hex(&key(1).to_bytes());
        assert!(!shown.contains(&secret[..16]), "{shown}");
        // The bytes as Debug would print an array, too.
        assert!(
            !shown.contains(&format!("{:?}", &key(1).to_bytes()[..4])),
            "{shown}"
        );
    }

    #[test]
    fn the_validators_table_and_key_file_parse_from_toml() {
        let text = format!(
            r#"
[consensus]
algorithm = "pbft"
node_id = "a"
bootstrap_peers = ["b@127.0.0.1:7002", "c@127.0.0.1:7003", "10.0.0.4:7004"]
key_file = "/etc/stratoswarm/a.key"

[consensus.validators]
a = "{}"
b = "{}"
c = "{}"
"10.0.0.4:7004" = "{}"
"#,
            public(1),
            public(2),
            public(3),
            public(4)
        );
        let config = ConsensusConfig::from_toml_str(&text).unwrap();
        assert_eq!(
            config.key_file.as_deref(),
            Some(Path::new("/etc/stratoswarm/a.key"))
        );
        assert_eq!(config.validators.len(), 4);
        assert_eq!(config.validators["10.0.0.4:7004"], public(4));
        config.validate_signing().unwrap();
        // A bad entry is refused while loading, naming it.
        let bad = text.replace(&public(3), "c0ffee");
        let error = ConsensusConfig::from_toml_str(&bad)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("\"c\"") && error.contains("c0ffee"),
            "{error}"
        );
        // A value that is not a string is a TOML error naming the line.
        let bad = text.replace(&format!("\"{}\"", public(2)), "42");
        let error = ConsensusConfig::from_toml_str(&bad)
            .unwrap_err()
            .to_string();
        assert!(error.contains("b = 42"), "{error}");
    }
}
