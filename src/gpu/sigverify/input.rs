//! The text format of `examples/verify_batch.rs`: one item per line,
//! `PUBKEY_HEX SIGNATURE_HEX MESSAGE_HEX`, where the message may be empty (the line then ends
//! after the signature). Parsing is here so it is tested directly.

use std::io::Write;

use super::{
    PUBLIC_KEY_BYTES, SIGNATURE_BYTES, SigVerifyError, SignatureVerifier, vectors::OwnedItem,
};

/// Why a line is not an item.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseItemError {
    /// Fewer than two or more than three whitespace-separated fields.
    #[error("expected 2 or 3 fields (key, signature, optional message), got {0}")]
    FieldCount(usize),
    /// A field is not an even-length string of hex digits.
    #[error("{field} is not valid hex")]
    Hex {
        /// Which field ("public key", "signature", "message").
        field: &'static str,
    },
    /// The key is not 32 bytes.
    #[error("public key must be {PUBLIC_KEY_BYTES} bytes, got {0}")]
    KeyLength(usize),
    /// The signature is not 64 bytes.
    #[error("signature must be {SIGNATURE_BYTES} bytes, got {0}")]
    SignatureLength(usize),
}

/// Decodes a hex string (either case) into bytes.
fn decode_hex(text: &str, field: &'static str) -> Result<Vec<u8>, ParseItemError> {
    let digits = text.as_bytes();
    if !digits.len().is_multiple_of(2) {
        return Err(ParseItemError::Hex { field });
    }
    let nibble = |digit: u8| -> Result<u8, ParseItemError> {
        match digit {
            b'0'..=b'9' => Ok(digit - b'0'),
            b'a'..=b'f' => Ok(digit - b'a' + 10),
            b'A'..=b'F' => Ok(digit - b'A' + 10),
            _ => Err(ParseItemError::Hex { field }),
        }
    };
    digits
        .chunks_exact(2)
        .map(|pair| Ok((nibble(pair[0])? << 4) | nibble(pair[1])?))
        .collect()
}

/// Parses one line of the `verify_batch` input format.
///
/// # Errors
/// A [`ParseItemError`] naming what is malformed; the caller prints `0` for such a line.
pub fn parse_item_line(line: &str) -> Result<OwnedItem, ParseItemError> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    if !(2..=3).contains(&fields.len()) {
        return Err(ParseItemError::FieldCount(fields.len()));
    }
    let public_key = decode_hex(fields[0], "public key")?;
    let signature = decode_hex(fields[1], "signature")?;
    let message = match fields.get(2) {
        Some(text) => decode_hex(text, "message")?,
        None => Vec::new(),
    };
    let public_key: [u8; PUBLIC_KEY_BYTES] = public_key
        .as_slice()
        .try_into()
        .map_err(|_| ParseItemError::KeyLength(public_key.len()))?;
    let signature: [u8; SIGNATURE_BYTES] = signature
        .as_slice()
        .try_into()
        .map_err(|_| ParseItemError::SignatureLength(signature.len()))?;
    Ok(OwnedItem {
        public_key,
        message,
        signature,
    })
}

/// Formats an item as one line of the `verify_batch` input format (lower-case hex; no message
/// field when the message is empty), the inverse of [`parse_item_line`].
pub fn format_item_line(item: &OwnedItem) -> String {
    let hex = |bytes: &[u8]| -> String {
        use std::fmt::Write as _;
        bytes.iter().fold(String::new(), |mut text, byte| {
            // Writing to a String cannot fail.
            let _ = write!(text, "{byte:02x}");
            text
        })
    };
    let mut line = format!("{} {}", hex(&item.public_key), hex(&item.signature));
    if !item.message.is_empty() {
        line.push(' ');
        line.push_str(&hex(&item.message));
    }
    line
}

/// Failure of [`verify_lines`]: the verifier failed or an output stream did.
#[derive(Debug, thiserror::Error)]
pub enum VerifyLinesError {
    /// The backend failed (GPU lost, timed out...).
    #[error(transparent)]
    Verify(#[from] SigVerifyError),
    /// Writing a verdict or a warning failed.
    #[error("writing output failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Verifies every line of `text` as one batch and writes one line per input line to `verdicts`:
/// `1` or `0`, in order. A malformed line gets `0` there and a warning naming its line number on
/// `warnings`. A trailing newline does not make an extra item; every other line, blank ones
/// included, is an item.
///
/// # Errors
/// [`VerifyLinesError`] when the verifier or a writer fails.
pub fn verify_lines(
    text: &str,
    verifier: &dyn SignatureVerifier,
    verdicts: &mut dyn Write,
    warnings: &mut dyn Write,
) -> Result<(), VerifyLinesError> {
    let text = text.strip_suffix('\n').unwrap_or(text);
    if text.is_empty() {
        return Ok(());
    }
    let parsed: Vec<Result<OwnedItem, ParseItemError>> = text
        .split('\n')
        .map(|line| parse_item_line(line.strip_suffix('\r').unwrap_or(line)))
        .collect();
    let items: Vec<_> = parsed
        .iter()
        .filter_map(|line| line.as_ref().ok().map(OwnedItem::as_item))
        .collect();
    let mut results = verifier.verify_batch(&items)?.into_iter();
    for (index, line) in parsed.iter().enumerate() {
        let valid = match line {
            Ok(_) => results.next().unwrap_or(false),
            Err(error) => {
                writeln!(warnings, "warning: line {}: {error}", index + 1)?;
                false
            }
        };
        writeln!(verdicts, "{}", u8::from(valid))?;
    }
    Ok(())
}

#[cfg(all(test, feature = "gpu", feature = "server"))]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_items_with_and_without_message() {
        let key = "ab".repeat(32);
        let signature = "CD".repeat(64);
        let item = parse_item_line(&format!("{key} {signature} 00ff")).expect("valid line");
        assert_eq!(item.public_key, [0xab; 32]);
        assert_eq!(item.signature, [0xcd; 64]);
        assert_eq!(item.message, vec![0x00, 0xff]);
        let item = parse_item_line(&format!("{key} {signature}")).expect("empty message");
        assert!(item.message.is_empty());
        for item in crate::gpu::sigverify::vectors::random_valid_items(9, 3, 2) {
            assert_eq!(parse_item_line(&format_item_line(&item)), Ok(item));
        }
    }

    #[test]
    fn verify_lines_answers_every_line_in_order() {
        let items = crate::gpu::sigverify::vectors::random_valid_items(3, 2, 5);
        let line = |item: &OwnedItem| {
            let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
            format!(
                "{} {} {}",
                hex(&item.public_key),
                hex(&item.signature),
                hex(&item.message)
            )
        };
        let mut tampered = items[1].clone();
        tampered.message[0] ^= 1;
        let text = format!(
            "{}\nnot hex\n{}\n{}\n",
            line(&items[0]),
            line(&tampered),
            line(&items[1])
        );
        let mut out = Vec::new();
        let mut warnings = Vec::new();
        let verifier = crate::gpu::sigverify::CpuSignatureVerifier::new();
        verify_lines(&text, &verifier, &mut out, &mut warnings).expect("cpu never fails");
        assert_eq!(String::from_utf8(out).expect("ascii"), "1\n0\n0\n1\n");
        let warnings = String::from_utf8(warnings).expect("utf-8");
        assert!(warnings.contains("line 2"), "{warnings}");
        assert_eq!(warnings.lines().count(), 1);
    }

    #[test]
    fn rejects_malformed_lines() {
        let key = "ab".repeat(32);
        let signature = "cd".repeat(64);
        assert_eq!(parse_item_line(""), Err(ParseItemError::FieldCount(0)));
        assert_eq!(
            parse_item_line(&format!("{key} {signature} 00 11")),
            Err(ParseItemError::FieldCount(4))
        );
        assert_eq!(
            parse_item_line(&format!("{key}0 {signature}")),
            Err(ParseItemError::Hex {
                field: "public key"
            })
        );
        assert_eq!(
            parse_item_line(&format!("{key} {signature} 0g")),
            Err(ParseItemError::Hex { field: "message" })
        );
        assert_eq!(
            parse_item_line(&format!("{key}00 {signature}")),
            Err(ParseItemError::KeyLength(33))
        );
        assert_eq!(
            parse_item_line(&format!("{key} {}", "cd".repeat(63))),
            Err(ParseItemError::SignatureLength(63))
        );
    }
}
