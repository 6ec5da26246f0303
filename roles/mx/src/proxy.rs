//! The PROXY protocol header (v1 or v2) in front of an SMTP session, from the load balancers.
//!
//! A connection from a trusted address (`trusted_proxies`) must start with a header, which
//! gives the real client address; every check (iprev, SPF, rate limits, DNSBL) then uses that
//! address. From anyone else no header is read: a client that sends one anyway has it treated as
//! SMTP and refused like any other garbage, so nobody can forge their address.

use std::net::SocketAddr;
use std::time::Duration;

use ringmail_proxy_core::proxy_protocol::{self, Parsed};
use tokio::io::{AsyncRead, AsyncReadExt};

/// The most bytes a header may take before it is refused (v1 is at most 107 bytes; v2 headers
/// from our LBs carry no large TLVs).
const MAX_HEADER: usize = 1024;

/// What the header said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyInfo {
    /// The client as the LB saw it; `None` for a LOCAL/UNKNOWN header (the LB's own health
    /// check), in which case the TCP peer is used.
    pub client: Option<SocketAddr>,
    /// Bytes that followed the header in the same reads (the client's first command).
    pub rest: Vec<u8>,
}

/// Reads one PROXY header within `timeout`.
pub async fn read_header<S: AsyncRead + Unpin>(
    stream: &mut S,
    timeout: Duration,
) -> Result<ProxyInfo, String> {
    let mut buf = Vec::with_capacity(256);
    let read = async {
        loop {
            match proxy_protocol::parse_with_limit(&buf, MAX_HEADER) {
                Ok(Parsed::Complete { header, len }) => {
                    return Ok(ProxyInfo {
                        client: header.addresses.map(|(src, _)| src),
                        rest: buf.get(len..).unwrap_or_default().to_vec(),
                    });
                }
                Ok(Parsed::Incomplete) => {}
                Err(e) => return Err(format!("invalid PROXY header: {e}")),
            }
            if buf.len() >= MAX_HEADER {
                return Err("PROXY header too long".to_string());
            }
            let mut chunk = [0u8; 512];
            let n = stream
                .read(&mut chunk)
                .await
                .map_err(|e| format!("reading the PROXY header: {e}"))?;
            if n == 0 {
                return Err("connection closed before the PROXY header".to_string());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| "no PROXY header in time".to_string())?
}

/// Reads one PROXY header from a TCP stream without consuming anything after it (the header is
/// peeked until complete, then exactly its bytes are read), so the stream can be handed on as
/// is, e.g. to a TLS handshake. Within `timeout`.
pub async fn read_header_exact(
    stream: &mut tokio::net::TcpStream,
    timeout: Duration,
) -> Result<Option<SocketAddr>, String> {
    let read = async {
        let mut buf = vec![0u8; MAX_HEADER];
        let mut last = 0;
        loop {
            let n = stream
                .peek(&mut buf)
                .await
                .map_err(|e| format!("reading the PROXY header: {e}"))?;
            if n == 0 {
                return Err("connection closed before the PROXY header".to_string());
            }
            match proxy_protocol::parse_with_limit(&buf[..n], MAX_HEADER) {
                Ok(Parsed::Complete { header, len }) => {
                    let mut consumed = vec![0u8; len];
                    stream
                        .read_exact(&mut consumed)
                        .await
                        .map_err(|e| format!("reading the PROXY header: {e}"))?;
                    return Ok(header.addresses.map(|(src, _)| src));
                }
                Ok(Parsed::Incomplete) if n >= MAX_HEADER => {
                    return Err("PROXY header too long".to_string());
                }
                Ok(Parsed::Incomplete) => {
                    // peek returns at once while data is queued: wait a little for the rest.
                    if n == last {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    last = n;
                }
                Err(e) => return Err(format!("invalid PROXY header: {e}")),
            }
        }
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| "no PROXY header in time".to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn v1_and_v2_headers_with_trailing_bytes() {
        let mut v1: &[u8] = b"PROXY TCP4 192.0.2.7 10.0.0.1 40000 25\r\nEHLO x\r\n";
        let info = read_header(&mut v1, Duration::from_secs(1)).await.unwrap();
        assert_eq!(info.client, Some("192.0.2.7:40000".parse().unwrap()));
        assert_eq!(info.rest, b"EHLO x\r\n");

        let mut v2 = Vec::new();
        proxy_protocol::encode(
            proxy_protocol::Version::V2,
            "[2001:db8::7]:5000".parse().unwrap(),
            "[2001:db8::1]:25".parse().unwrap(),
            &mut v2,
        );
        let mut r: &[u8] = &v2;
        let info = read_header(&mut r, Duration::from_secs(1)).await.unwrap();
        assert_eq!(info.client, Some("[2001:db8::7]:5000".parse().unwrap()));
        assert!(info.rest.is_empty());
    }

    #[tokio::test]
    async fn garbage_and_eof_are_refused() {
        let mut smtp: &[u8] = b"EHLO attacker\r\n";
        assert!(
            read_header(&mut smtp, Duration::from_secs(1))
                .await
                .is_err()
        );
        let mut short: &[u8] = b"PROXY TCP4 1.2.3.4";
        assert!(
            read_header(&mut short, Duration::from_secs(1))
                .await
                .is_err()
        );
        let mut bare_lf: &[u8] = b"PROXY TCP4 192.0.2.7 10.0.0.1 40000 25\nEHLO\r\n";
        assert!(
            read_header(&mut bare_lf, Duration::from_secs(1))
                .await
                .is_err()
        );
    }
}
