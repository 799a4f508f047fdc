//! Signed client commands: a client's ed25519 signature carried with its proposal, checked by
//! GPU-optimized Raft in batches before the command is appended, and kept in the log so that
//! [`verify_log`](crate::verify_log) checks it again offline.
//!
//! A client signs a *statement*: by default the command bytes themselves
//! ([`ClientSignature::sign`]). The HTTP node lets clients sign the request instead
//! ([`http_statement`]), since a client of a JSON or text API cannot be asked to reproduce the
//! node's internal command encoding; the node then derives the command from that same request.
//! Raft trusts its nodes to derive commands honestly, as it trusts them with everything else;
//! the signature proves who asked for what.
//!
//! # The entry frame
//! Under GPU-optimized Raft every command in the log is framed, so that a signed and an
//! unsigned command can never be confused:
//! - `0x00 ‖ command`: unsigned;
//! - `0x01 ‖ public key (32) ‖ signature (64) ‖ statement length (u32, big-endian) ‖ statement ‖
//!   command`, where an empty statement means the command itself was signed.
//!
//! The state machine sees only the command.

use bytes::Bytes;
use ed25519_dalek::{Signer as _, SigningKey};

/// Domain separation: a client's signature reads as nothing else this crate signs.
const CLIENT_DOMAIN: &[u8] = b"stratoswarm-consensus/client-command/v1";

const UNSIGNED: u8 = 0;
const SIGNED: u8 = 1;
const SIGNED_HEADER: usize = 1 + 32 + 64 + 4;

/// A client's signature over a statement of its command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientSignature {
    /// The client's ed25519 public key.
    pub public_key: [u8; 32],
    /// ed25519 over [`client_signing_bytes`] of the statement.
    pub signature: [u8; 64],
    /// What was signed, when it is not the command bytes themselves (see [`http_statement`]).
    pub statement: Option<Bytes>,
}

impl ClientSignature {
    /// `key`'s signature over `command` itself.
    pub fn sign(command: &[u8], key: &SigningKey) -> Self {
        ClientSignature {
            public_key: key.verifying_key().to_bytes(),
            signature: key.sign(&client_signing_bytes(command)).to_bytes(),
            statement: None,
        }
    }

    /// `key`'s signature over `statement`, which describes the command (e.g. an HTTP request).
    pub fn sign_statement(statement: impl Into<Bytes>, key: &SigningKey) -> Self {
        let statement = statement.into();
        ClientSignature {
            public_key: key.verifying_key().to_bytes(),
            signature: key.sign(&client_signing_bytes(&statement)).to_bytes(),
            statement: Some(statement),
        }
    }
}

/// The bytes a client signs for `statement`: a domain tag, then the statement.
pub fn client_signing_bytes(statement: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(CLIENT_DOMAIN.len() + statement.len());
    bytes.extend_from_slice(CLIENT_DOMAIN);
    bytes.extend_from_slice(statement);
    bytes
}

/// The statement an HTTP client signs for a request: `METHOD path` (the path as sent, e.g.
/// `/kv/user-7`), a newline, then the body (empty for `DELETE`).
pub fn http_statement(method: &str, path: &str, body: &[u8]) -> Vec<u8> {
    let mut statement = Vec::with_capacity(method.len() + path.len() + 2 + body.len());
    statement.extend_from_slice(method.as_bytes());
    statement.push(b' ');
    statement.extend_from_slice(path.as_bytes());
    statement.push(b'\n');
    statement.extend_from_slice(body);
    statement
}

/// A command in its log frame, taken apart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Framed {
    /// No signature.
    Unsigned {
        /// What the state machine applies.
        command: Bytes,
    },
    /// Signed by a client.
    Signed {
        /// The client's signature and, when not the command, the statement signed.
        signature: ClientSignature,
        /// What the state machine applies.
        command: Bytes,
    },
}

impl Framed {
    /// What the state machine applies.
    pub(crate) fn command(&self) -> &Bytes {
        match self {
            Framed::Unsigned { command } | Framed::Signed { command, .. } => command,
        }
    }

    /// The signature to check, with the bytes it must cover (none for an unsigned command).
    pub(crate) fn to_check(&self) -> Option<([u8; 32], [u8; 64], Vec<u8>)> {
        match self {
            Framed::Unsigned { .. } => None,
            Framed::Signed { signature, command } => {
                let statement = signature.statement.as_ref().unwrap_or(command);
                Some((
                    signature.public_key,
                    signature.signature,
                    client_signing_bytes(statement),
                ))
            }
        }
    }
}

/// Why bytes are not a framed command.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("not a framed command: {0}")]
pub struct FrameError(pub &'static str);

/// Frames `command`, signed or not, for the log.
pub(crate) fn frame(
    command: &[u8],
    signature: Option<&ClientSignature>,
) -> Result<Bytes, FrameError> {
    let Some(signature) = signature else {
        let mut framed = Vec::with_capacity(1 + command.len());
        framed.push(UNSIGNED);
        framed.extend_from_slice(command);
        return Ok(framed.into());
    };
    let statement = signature.statement.as_deref().unwrap_or_default();
    let length = u32::try_from(statement.len()).map_err(|_| FrameError("statement over 4 GiB"))?;
    let mut framed = Vec::with_capacity(SIGNED_HEADER + statement.len() + command.len());
    framed.push(SIGNED);
    framed.extend_from_slice(&signature.public_key);
    framed.extend_from_slice(&signature.signature);
    framed.extend_from_slice(&length.to_be_bytes());
    framed.extend_from_slice(statement);
    framed.extend_from_slice(command);
    Ok(framed.into())
}

/// Takes a framed command apart (without checking its signature).
pub(crate) fn unframe(framed: &Bytes) -> Result<Framed, FrameError> {
    match framed.first() {
        Some(&UNSIGNED) => Ok(Framed::Unsigned {
            command: framed.slice(1..),
        }),
        Some(&SIGNED) => {
            if framed.len() < SIGNED_HEADER {
                return Err(FrameError("signed frame shorter than its header"));
            }
            let public_key: [u8; 32] = framed[1..33].try_into().expect("32 bytes");
            let signature: [u8; 64] = framed[33..97].try_into().expect("64 bytes");
            let length = u32::from_be_bytes(framed[97..101].try_into().expect("4 bytes")) as usize;
            let Some(command_start) = SIGNED_HEADER.checked_add(length) else {
                return Err(FrameError("statement length overflows"));
            };
            if command_start > framed.len() {
                return Err(FrameError("statement longer than the frame"));
            }
            let statement = (length > 0).then(|| framed.slice(SIGNED_HEADER..command_start));
            Ok(Framed::Signed {
                signature: ClientSignature {
                    public_key,
                    signature,
                    statement,
                },
                command: framed.slice(command_start..),
            })
        }
        Some(_) => Err(FrameError("unknown frame kind")),
        None => Err(FrameError("empty")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::SignatureItem;
    use crate::gpu::sigverify::verify_strict_reference;

    fn verifies(framed: &Framed) -> bool {
        let (public_key, signature, message) = framed.to_check().expect("signed");
        verify_strict_reference(&SignatureItem {
            public_key,
            message: &message,
            signature,
        })
    }

    #[test]
    fn frames_round_trip_and_signatures_cover_the_statement() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let unsigned = frame(b"cmd", None).unwrap();
        assert_eq!(
            unframe(&unsigned).unwrap(),
            Framed::Unsigned {
                command: Bytes::from_static(b"cmd")
            }
        );
        let signed = ClientSignature::sign(b"cmd", &key);
        let framed = unframe(&frame(b"cmd", Some(&signed)).unwrap()).unwrap();
        assert_eq!(framed.command().as_ref(), b"cmd");
        assert!(verifies(&framed));

        let statement = http_statement("PUT", "/kv/a", b"1");
        let over_request = ClientSignature::sign_statement(statement, &key);
        let framed = unframe(&frame(b"encoded", Some(&over_request)).unwrap()).unwrap();
        assert_eq!(framed.command().as_ref(), b"encoded");
        assert!(verifies(&framed));

        // Another command under the same signature does not verify.
        let other = unframe(&frame(b"cmD", Some(&signed)).unwrap()).unwrap();
        assert!(!verifies(&other));
    }

    #[test]
    fn malformed_frames_are_errors_not_panics() {
        for bytes in [
            &b""[..],
            &[2, 0, 0][..],
            &[1; 50][..],
            &[[1u8; 97].as_slice(), &[0xff, 0xff, 0xff, 0xff]].concat()[..],
        ] {
            assert!(
                unframe(&Bytes::copy_from_slice(bytes)).is_err(),
                "{bytes:?}"
            );
        }
    }
}
