//! Runs `examples/bench.rs` with small numbers and checks its verdict: a benchmark that loses
//! operations is wrong, not fast, so the example itself verifies that every member applied every
//! operation and exits non-zero otherwise.

use std::path::PathBuf;
use std::process::Command;

/// `cargo test` builds the examples next to the test binaries' `deps` folder.
fn example_binary(name: &str) -> PathBuf {
    let test_binary = std::env::current_exe().expect("test binary path");
    let profile_dir = test_binary
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target dir");
    profile_dir
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX))
}

fn run_bench(args: &[&str]) -> String {
    let binary = example_binary("bench");
    assert!(
        binary.exists(),
        "{} is missing: cargo test builds examples",
        binary.display()
    );
    let output = Command::new(&binary)
        .args(args)
        .output()
        .expect("run the bench example");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "bench {args:?} failed: {}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[test]
fn every_operation_is_committed_and_applied_on_every_member() {
    for (clients, members, batch) in [("1", "1", "1"), ("8", "3", "1"), ("16", "5", "4")] {
        let stdout = run_bench(&["-c", clients, "-n", "2k", "-m", members, "-b", batch]);
        assert!(
            stdout.contains("verified: every member applied 2000 operations"),
            "{stdout}"
        );
        let last = stdout.lines().last().unwrap_or_default();
        let expected =
            format!("clients: {clients}, n: 2000, batch: {batch}, members: {members}: time: ");
        assert!(last.starts_with(&expected), "last line: {last}");
        assert!(
            last.contains("ns/op: ") && last.contains("op/ms: "),
            "last line: {last}"
        );
        assert!(stdout.contains("submit->commit: p50"), "{stdout}");
    }
}

#[test]
fn bad_arguments_are_refused_with_exit_code_2() {
    let binary = example_binary("bench");
    for args in [&["-m", "2"][..], &["-n", "lots"], &["--frobnicate"]] {
        let output = Command::new(&binary)
            .args(args)
            .output()
            .expect("run the bench example");
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        assert!(!output.stderr.is_empty());
    }
}
