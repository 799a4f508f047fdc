//! Free loopback ports for the suites that start real servers. Include it standalone with
//! `#[path = "common/ports.rs"] mod ports;`; it uses nothing else from `tests/common`.

#![allow(dead_code)]

use std::net::TcpListener;

/// `count` ports free at the time of asking (all held at once, so they differ).
pub fn free_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners
        .iter()
        .map(|listener| listener.local_addr().unwrap().port())
        .collect()
}

/// One port free at the time of asking.
pub fn free_port() -> u16 {
    free_ports(1)[0]
}
