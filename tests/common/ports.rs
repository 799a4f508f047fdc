//! Free loopback ports for the suites and examples that start real servers. Include it standalone
//! with `#[path = "common/ports.rs"] mod ports;` (from an example:
//! `#[path = "../tests/common/ports.rs"]`); it uses nothing else from `tests/common`.

#![allow(dead_code)]

use std::net::TcpListener;

/// `count` ports free at the time of asking (all held at once, so they differ).
pub fn try_free_ports(count: usize) -> std::io::Result<Vec<u16>> {
    let listeners: Vec<TcpListener> = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()?;
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
