//! HAProxy PROXY protocol. (API skeleton: filled in by the PROXY protocol work.)
use std::net::SocketAddr;

/// PROXY protocol version sent to a pool's backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// Appends a PROXY header announcing a TCP connection from `src` to `dst`.
pub fn encode(version: Version, src: SocketAddr, dst: SocketAddr, out: &mut Vec<u8>) {
    let _ = (version, src, dst, out);
}
