//! Fuzzing the signature input files of `verify_batch`: lines built from fields of the right and
//! wrong lengths, hex and not, separated by spaces and tabs, with CR line ends, blank lines and
//! non-ASCII text. Every line must get exactly one verdict, a malformed one `0` and one warning,
//! never a panic.

use proptest::prelude::*;

use super::*;
use crate::fuzzing::config;
use crate::gpu::sigverify::CpuSignatureVerifier;

fn field() -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9a-f]{64}",
        "[0-9A-F]{128}",
        "[0-9a-fA-F]{0,140}",
        "[0-9a-fg-z]{1,8}",
        "\\PC{1,6}",
    ]
}

fn line() -> impl Strategy<Value = String> {
    (
        prop::collection::vec(field(), 0..5),
        prop_oneof![Just(" "), Just("\t"), Just("  "), Just(" \u{a0}")],
        any::<bool>(),
    )
        .prop_map(|(fields, separator, carriage_return)| {
            let mut line = fields.join(separator);
            if carriage_return {
                line.push('\r');
            }
            line
        })
}

proptest! {
    #![proptest_config(config(15_000))]

    #[test]
    fn fuzz_signature_input_files(lines in prop::collection::vec(line(), 0..6), trailing_newline in any::<bool>()) {
        let mut text = lines.join("\n");
        if trailing_newline {
            text.push('\n');
        }
        let mut verdicts = Vec::new();
        let mut warnings = Vec::new();
        verify_lines(&text, &CpuSignatureVerifier::new(), &mut verdicts, &mut warnings)
            .expect("the CPU verifier and in-memory writers do not fail");
        let verdicts = String::from_utf8(verdicts).expect("ASCII verdicts");
        let body = text.strip_suffix('\n').unwrap_or(&text);
        let expected_lines = if body.is_empty() { 0 } else { body.split('\n').count() };
        prop_assert_eq!(verdicts.lines().count(), expected_lines);
        prop_assert!(verdicts.lines().all(|verdict| verdict == "0" || verdict == "1"));
        let malformed = if body.is_empty() {
            0
        } else {
            body.split('\n')
                .filter(|line| parse_item_line(line.strip_suffix('\r').unwrap_or(line)).is_err())
                .count()
        };
        prop_assert_eq!(String::from_utf8_lossy(&warnings).lines().count(), malformed);
        for line in body.split('\n') {
            if let Ok(item) = parse_item_line(line.strip_suffix('\r').unwrap_or(line)) {
                prop_assert_eq!(parse_item_line(&format_item_line(&item)), Ok(item));
            }
        }
    }
}
