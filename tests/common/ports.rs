//! Free loopback ports for the suites and examples that start real servers. Include it standalone
//! with `#[path = "common/ports.rs"] mod ports;` (from an example:
//! `#[path = "../tests/common/ports.rs"]`); it uses nothing else from `tests/common`.

#![allow(dead_code)]

use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};

/// Ports are handed out from here, below Linux's ephemeral range (32768-60999 by default). A
/// port from that range (what binding port 0 gives) can be taken, between the asking and a
/// server's bind, as the source port of some connection: another test's, or a dialer's own
/// connection to that very port while nothing listens there (TCP's self-connect), and a
/// `restart` onto it then failed with "address already in use" for its whole deadline.
const RANGE: std::ops::Range<u32> = 15_000..32_000;

/// Candidates this process has tried so far.
static TRIED: AtomicU32 = AtomicU32::new(0);

/// The next port to try: the walk through [`RANGE`] starts where the process id puts it, so
/// that two test processes rarely start on the same ports, and never offers one port twice in
/// one process.
fn next_candidate() -> u16 {
    let span = RANGE.end - RANGE.start;
    let start = std::process::id().wrapping_mul(7_919) % span;
    let step = TRIED.fetch_add(1, Ordering::Relaxed);
    (RANGE.start + start.wrapping_add(step) % span) as u16
}

/// `count` ports free at the time of asking (all held at once, so they differ), none of them
/// handed out before by this process.
pub fn try_free_ports(count: usize) -> std::io::Result<Vec<u16>> {
    let mut listeners = Vec::with_capacity(count);
    let mut tried = 0;
    while listeners.len() < count {
        tried += 1;
        if tried > RANGE.end - RANGE.start {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "no free loopback port below the ephemeral range",
            ));
        }
        if let Ok(listener) = TcpListener::bind(("127.0.0.1", next_candidate())) {
            listeners.push(listener);
        }
    }
    listeners
        .iter()
        .map(|listener| listener.local_addr().map(|address| address.port()))
        .collect()
}

/// [`try_free_ports`], for a test: no free port is a failure.
pub fn free_ports(count: usize) -> Vec<u16> {
    try_free_ports(count).expect("free loopback ports")
}

/// One port free at the time of asking.
pub fn free_port() -> u16 {
    free_ports(1)[0]
}

/// One member of a loopback cluster: its bind address and its peers as `name@host:port`.
pub struct LoopbackMember {
    pub bind: String,
    pub peers: Vec<String>,
}

/// A loopback cluster of `names` on free ports, one member per name, in order.
pub fn loopback_members(names: &[&str]) -> Vec<LoopbackMember> {
    let ports = free_ports(names.len());
    names
        .iter()
        .zip(&ports)
        .map(|(name, port)| LoopbackMember {
            bind: format!("127.0.0.1:{port}"),
            peers: names
                .iter()
                .zip(&ports)
                .filter(|(other, _)| *other != name)
                .map(|(other, p)| format!("{other}@127.0.0.1:{p}"))
                .collect(),
        })
        .collect()
}
