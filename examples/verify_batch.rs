//! Verifies a file of ed25519 signatures and prints one verdict per line.
//!
//! ```text
//! cargo run --release --example verify_batch -- --backend gpu|cpu [--kernel-timeout-ms MS] FILE
//! cargo run --release --example verify_batch -- --generate COUNT [--seed SEED] FILE
//! ```
//!
//! FILE has one item per line, `PUBKEY_HEX SIGNATURE_HEX MESSAGE_HEX` (the message may be empty:
//! the line then ends after the signature). stdout gets exactly one line per item, `1` (valid
//! under ed25519-dalek's `verify_strict`) or `0`, in order, and nothing else; a malformed line
//! prints `0` and a warning on stderr. Exit status 2 for bad arguments or an unreadable file, 1
//! when the backend fails (the message says which GPU bound ran out, if one did).
//! `--kernel-timeout-ms` sets `kernel_launch_timeout` (default 10 s), the bound of one
//! submission; batches are split to fit it, and compiling the kernel has its own bound.
//!
//! `--generate` writes COUNT items to FILE: honest signatures on random 32-byte messages by
//! distinct keys, with every seventh message altered after signing (its verdict is `0`), so a
//! test input of any size is one command away. Progress of GPU compiles and long batches goes to
//! stderr through `tracing` (`RUST_LOG=debug` for more).

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use consensus::gpu::sigverify::vectors::random_valid_items;
use consensus::gpu::sigverify::{format_item_line, verify_lines};
use consensus::gpu::{
    CpuSignatureVerifier, GpuConfig, GpuContext, GpuSignatureVerifier, SigVerifyError,
    SignatureVerifier,
};

const USAGE: &str = "usage: verify_batch --backend gpu|cpu [--kernel-timeout-ms MS] FILE\n       \
                     verify_batch --generate COUNT [--seed SEED] FILE";

/// What the command line asks for.
struct Args {
    mode: Mode,
    seed: u64,
    kernel_timeout: Option<Duration>,
    path: String,
}

/// Verify with a backend, or generate a file of this many items.
enum Mode {
    Verify(String),
    Generate(usize),
}

fn parse_args(args: &[String]) -> Option<Args> {
    let mut backend = None;
    let mut generate = None;
    let mut parsed = Args {
        mode: Mode::Generate(0),
        seed: 1,
        kernel_timeout: None,
        path: String::new(),
    };
    let mut path = None;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--backend" => backend = Some(args.next()?.clone()),
            "--generate" => generate = Some(args.next()?.parse().ok()?),
            "--seed" => parsed.seed = args.next()?.parse().ok()?,
            "--kernel-timeout-ms" => {
                parsed.kernel_timeout = Some(Duration::from_millis(args.next()?.parse().ok()?));
            }
            flag if flag.starts_with("--backend=") => {
                backend = Some(flag["--backend=".len()..].to_owned());
            }
            flag if flag.starts_with("--") => return None,
            file if path.is_none() => path = Some(file.to_owned()),
            _ => return None,
        }
    }
    parsed.path = path?;
    parsed.mode = match (backend, generate) {
        (Some(backend), None) => Mode::Verify(backend),
        (None, Some(count)) => Mode::Generate(count),
        _ => return None,
    };
    Some(parsed)
}

fn main() -> ExitCode {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .try_init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(args) = parse_args(&args) else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let path = args.path.as_str();
    let backend = match &args.mode {
        Mode::Generate(count) => return generate(*count, args.seed, path),
        Mode::Verify(backend) => backend.as_str(),
    };
    let verifier: Box<dyn SignatureVerifier> = match backend {
        "cpu" => Box::new(CpuSignatureVerifier::new()),
        "gpu" => {
            let mut config = GpuConfig::default();
            if let Some(bound) = args.kernel_timeout {
                config.kernel_launch_timeout = bound;
            }
            let built = GpuContext::new(config)
                .map_err(SigVerifyError::from)
                .map(Arc::new)
                .and_then(GpuSignatureVerifier::new);
            match built {
                Ok(verifier) => Box::new(verifier),
                Err(error) => {
                    eprintln!("error: GPU backend unavailable: {error}");
                    return ExitCode::from(1);
                }
            }
        }
        other => {
            eprintln!("error: unknown backend {other:?}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) => {
            eprintln!("error: cannot read {path}: {error}");
            return ExitCode::from(2);
        }
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut warnings = std::io::stderr();
    let result = verify_lines(&text, verifier.as_ref(), &mut out, &mut warnings)
        .and_then(|()| out.flush().map_err(Into::into));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::from(1)
        }
    }
}

/// Writes `count` items (every seventh altered after signing) to `path`.
fn generate(count: usize, seed: u64, path: &str) -> ExitCode {
    let mut text = String::with_capacity(count * 260);
    for (index, mut item) in random_valid_items(seed, count, 32).into_iter().enumerate() {
        if index % 7 == 6 {
            item.message[0] ^= 1;
        }
        text.push_str(&format_item_line(&item));
        text.push('\n');
    }
    match std::fs::write(path, text) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: cannot write {path}: {error}");
            ExitCode::from(2)
        }
    }
}
