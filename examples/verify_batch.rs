//! Verifies a file of ed25519 signatures and prints one verdict per line.
//!
//! ```text
//! cargo run --release --example verify_batch -- --backend gpu|cpu FILE
//! ```
//!
//! FILE has one item per line, `PUBKEY_HEX SIGNATURE_HEX MESSAGE_HEX` (the message may be empty:
//! the line then ends after the signature). stdout gets exactly one line per item, `1` (valid
//! under ed25519-dalek's `verify_strict`) or `0`, in order, and nothing else; a malformed line
//! prints `0` and a warning on stderr. Exit status 2 for bad arguments or an unreadable file, 1
//! when the backend fails.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

use consensus::gpu::sigverify::verify_lines;
use consensus::gpu::{
    CpuSignatureVerifier, GpuConfig, GpuContext, GpuSignatureVerifier, SigVerifyError,
    SignatureVerifier,
};

const USAGE: &str = "usage: verify_batch --backend gpu|cpu FILE";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (backend, path) = match args.as_slice() {
        [flag, backend, path] if flag == "--backend" => (backend.as_str(), path.as_str()),
        [flag, path] if flag.starts_with("--backend=") => {
            (&flag["--backend=".len()..], path.as_str())
        }
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let verifier: Box<dyn SignatureVerifier> = match backend {
        "cpu" => Box::new(CpuSignatureVerifier::new()),
        "gpu" => {
            let built = GpuContext::new(GpuConfig::default())
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
