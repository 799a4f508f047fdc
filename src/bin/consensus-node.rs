//! `consensus-node --config FILE [--http ADDR]`: one replicated key-value node over HTTP;
//! `consensus-node keygen FILE`: writes a signing key and prints its public key;
//! `consensus-node verify-log DIR [--config FILE]`: checks a GPU-optimized Raft data directory.
//! Everything lives in [`consensus::node`]; see it for the configuration and the API.

#[global_allocator]
static ALLOCATOR: consensus::node::NodeAllocator = consensus::node::NodeAllocator;

fn main() -> std::process::ExitCode {
    consensus::node::main(std::env::args_os().skip(1))
}
