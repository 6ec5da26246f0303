//! HAProxy PROXY protocol, versions 1 and 2 (haproxy's `doc/proxy-protocol.txt`).
//!
//! Sending side: [`encode`] appends the header announcing a proxied TCP connection to a backend,
//! [`encode_local_v2`] the v2 `LOCAL` header (health checks), [`encode_v2_with_tlvs`] a v2 header
//! carrying TLVs and optionally a CRC32c. When the two addresses are of different families, the
//! IPv4 one is written as an IPv4-mapped IPv6 address (v2 `TCP over IPv6`, v1 `TCP6`), since the
//! protocol has no mixed form.
//!
//! Receiving side: [`parse`] is a strict, incremental parser. It is handed whatever bytes have
//! arrived so far and answers
//!
//! - [`Parsed::Incomplete`] when more bytes could still make a valid header,
//! - [`Parsed::Complete`] with the header and its length in bytes (the payload follows), or
//! - an error as soon as a byte arrives that no continuation could make valid. A client that
//!   does not speak PROXY is refused after its first byte, never left hanging until a timeout.
//!
//! The answers are monotonic: if a prefix of some input parses as complete or as an error,
//! the whole input gives the same answer.
//!
//! v1 rules enforced: the exact `PROXY ` prefix, protocol `TCP4`, `TCP6` or `UNKNOWN`, single
//! spaces, addresses that parse as the announced family (IPv4 octets without leading zeros),
//! decimal ports `0..=65535` without sign, spaces or leading zeros, nothing after the
//! destination port, a CRLF line end (a bare LF is an error) within 107 bytes. After `UNKNOWN`
//! everything up to the CRLF is ignored, as the specification requires.
//!
//! v2 rules enforced: the 12-byte signature, version 2, command `LOCAL` or `PROXY`, a total
//! length within a cap (default [`DEFAULT_MAX_V2_LEN`]). For `LOCAL` the whole address block is
//! discarded (family ignored, no addresses, no TLVs), as the specification says. For `PROXY`:
//!
//! | family/protocol byte       | result                                                   |
//! |----------------------------|----------------------------------------------------------|
//! | `0x00` UNSPEC              | accepted, no addresses (use the connection's own)         |
//! | `0x11` TCP4, `0x21` TCP6   | accepted with addresses; block at least 12 / 36 bytes    |
//! | `0x31`, `0x32` UNIX        | accepted, no addresses; block at least 216 bytes         |
//! | `0x12`, `0x22` UDP         | error: a datagram header on a stream connection          |
//! | anything else              | error                                                    |
//!
//! The bytes after the addresses are walked as TLVs; a TLV running past the block is an error.
//! A `PP2_TYPE_CRC32C` TLV must be 4 bytes long and is verified (CRC32c of the whole header with
//! the checksum field zeroed).
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The v2 signature that opens every v2 header.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Longest v1 header, CRLF included.
pub const V1_MAX_LEN: usize = 107;
/// Fixed part of a v2 header: signature, version/command, family/protocol, length.
pub const V2_FIXED_LEN: usize = 16;
/// Default cap on a whole v2 header (fixed part, addresses and TLVs).
pub const DEFAULT_MAX_V2_LEN: usize = 4096;

/// TLV type of the CRC32c checksum.
pub const PP2_TYPE_CRC32C: u8 = 0x03;

const V1_PREFIX: &[u8] = b"PROXY ";
const INET_LEN: usize = 12;
const INET6_LEN: usize = 36;
const UNIX_LEN: usize = 216;

/// PROXY protocol version sent to a pool's backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// What the sender asks of the receiver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// The connection was made by the proxy itself (health check): use the real endpoints.
    Local,
    /// The connection is relayed on behalf of a client.
    Proxy,
}

/// One v2 Type-Length-Value record, raw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tlv {
    pub kind: u8,
    pub value: Vec<u8>,
}

/// A parsed PROXY header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: Version,
    pub command: Command,
    /// `(source, destination)`; `None` for v1 `UNKNOWN`, v2 `LOCAL`, `UNSPEC` and UNIX sockets.
    pub addresses: Option<(SocketAddr, SocketAddr)>,
    /// v2 TLVs in order of appearance (the CRC32c one included); always empty for v1.
    pub tlvs: Vec<Tlv>,
}

/// Outcome of feeding the bytes received so far to [`parse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// Valid so far; more bytes are needed.
    Incomplete,
    /// A whole header of `len` bytes; whatever follows is payload.
    Complete { header: Header, len: usize },
}

/// Why bytes are not a valid PROXY header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("not a PROXY protocol header")]
    NotProxy,
    #[error("PROXY v1 header longer than {V1_MAX_LEN} bytes")]
    V1TooLong,
    #[error("PROXY v1 header ends in a bare LF")]
    V1BareLf,
    #[error("PROXY v1 header: CR not followed by LF")]
    V1MissingLf,
    #[error("PROXY v1 header: unknown protocol")]
    V1BadProtocol,
    #[error("PROXY v1 header: invalid address")]
    V1BadAddress,
    #[error("PROXY v1 header: invalid port")]
    V1BadPort,
    #[error("PROXY v1 header: missing fields, extra fields or bad spacing")]
    V1Malformed,
    #[error("PROXY v2 header: unsupported version {0:#x}")]
    V2BadVersion(u8),
    #[error("PROXY v2 header: unknown command {0:#x}")]
    V2BadCommand(u8),
    #[error("PROXY v2 header: invalid family/protocol byte {0:#04x}")]
    V2BadFamily(u8),
    #[error("PROXY v2 header: datagram protocol {0:#04x} on a stream connection")]
    V2UnsupportedProtocol(u8),
    #[error("PROXY v2 header of {len} bytes exceeds the limit of {max}")]
    V2TooLong { len: usize, max: usize },
    #[error("PROXY v2 address block of {len} bytes, family needs {need}")]
    V2AddressTooShort { len: usize, need: usize },
    #[error("PROXY v2 TLV runs past the end of the header")]
    V2TlvOverflow,
    #[error("PROXY v2 CRC32c TLV of {0} bytes, expected 4")]
    V2BadCrcLength(usize),
    #[error("PROXY v2 CRC32c mismatch: header says {expected:#010x}, computed {actual:#010x}")]
    V2BadChecksum { expected: u32, actual: u32 },
}

// ---------------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------------

/// Both addresses in one family: if they differ, the IPv4 one becomes IPv4-mapped IPv6.
fn same_family(src: SocketAddr, dst: SocketAddr) -> (SocketAddr, SocketAddr) {
    let widen = |a: SocketAddr| match a.ip() {
        IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), a.port()),
        IpAddr::V6(_) => a,
    };
    if src.is_ipv4() == dst.is_ipv4() {
        (src, dst)
    } else {
        (widen(src), widen(dst))
    }
}

/// Appends a PROXY header announcing a TCP connection from `src` to `dst`.
pub fn encode(version: Version, src: SocketAddr, dst: SocketAddr, out: &mut Vec<u8>) {
    let (src, dst) = same_family(src, dst);
    match version {
        Version::V1 => {
            let proto = if src.is_ipv4() { "TCP4" } else { "TCP6" };
            // Writing into a Vec cannot fail.
            let _ = write!(
                out,
                "PROXY {proto} {} {} {} {}\r\n",
                src.ip(),
                dst.ip(),
                src.port(),
                dst.port()
            );
        }
        Version::V2 => {
            let start = out.len();
            v2_start(out, 0x21, src, dst);
            patch_v2_len(out, start);
        }
    }
}

/// Appends the header a proxy sends on its own connections (health checks): v1
/// `PROXY UNKNOWN`, v2 `LOCAL`. The receiver then uses the TCP peer address.
pub fn encode_local(version: Version, out: &mut Vec<u8>) {
    match version {
        Version::V1 => out.extend_from_slice(b"PROXY UNKNOWN\r\n"),
        Version::V2 => encode_local_v2(out),
    }
}

/// Appends a v2 `LOCAL` header (no addresses): the connection is the proxy's own.
pub fn encode_local_v2(out: &mut Vec<u8>) {
    out.extend_from_slice(&V2_SIGNATURE);
    out.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
}

/// Appends a v2 `PROXY` header for a TCP connection from `src` to `dst` carrying `tlvs`,
/// followed by a CRC32c TLV when `crc` is set. Fails (appending nothing) when a TLV value or the
/// whole header does not fit the 16-bit length fields.
pub fn encode_v2_with_tlvs(
    src: SocketAddr,
    dst: SocketAddr,
    tlvs: &[Tlv],
    crc: bool,
    out: &mut Vec<u8>,
) -> Result<(), ProxyError> {
    let (src, dst) = same_family(src, dst);
    let addr_len = if src.is_ipv4() { INET_LEN } else { INET6_LEN };
    let tlv_len: usize =
        tlvs.iter().map(|t| 3 + t.value.len()).sum::<usize>() + if crc { 7 } else { 0 };
    let total = V2_FIXED_LEN + addr_len + tlv_len;
    if total - V2_FIXED_LEN > usize::from(u16::MAX) {
        return Err(ProxyError::V2TooLong {
            len: total,
            max: V2_FIXED_LEN + usize::from(u16::MAX),
        });
    }
    let start = out.len();
    v2_start(out, 0x21, src, dst);
    for t in tlvs {
        // Bounded by the total check above.
        let l = u16::try_from(t.value.len()).unwrap_or(u16::MAX);
        out.push(t.kind);
        out.extend_from_slice(&l.to_be_bytes());
        out.extend_from_slice(&t.value);
    }
    if crc {
        out.extend_from_slice(&[PP2_TYPE_CRC32C, 0, 4, 0, 0, 0, 0]);
    }
    patch_v2_len(out, start);
    if crc {
        let sum = crc32c(out.get(start..).unwrap_or_default());
        let end = out.len();
        if let Some(field) = out.get_mut(end - 4..) {
            field.copy_from_slice(&sum.to_be_bytes());
        }
    }
    Ok(())
}

/// Signature, version/command, family, a zero length placeholder, then the address block.
fn v2_start(out: &mut Vec<u8>, ver_cmd: u8, src: SocketAddr, dst: SocketAddr) {
    out.extend_from_slice(&V2_SIGNATURE);
    out.push(ver_cmd);
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.extend_from_slice(&[0x11, 0, 0]);
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        (s, d) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            out.extend_from_slice(&[0x21, 0, 0]);
            out.extend_from_slice(&v6(s).octets());
            out.extend_from_slice(&v6(d).octets());
        }
    }
    out.extend_from_slice(&src.port().to_be_bytes());
    out.extend_from_slice(&dst.port().to_be_bytes());
}

/// Writes the length of the v2 header starting at `start` into its length field.
fn patch_v2_len(out: &mut [u8], start: usize) {
    let len = out.len().saturating_sub(start + V2_FIXED_LEN);
    let len = u16::try_from(len).unwrap_or(u16::MAX);
    if let Some(field) = out.get_mut(start + 14..start + 16) {
        field.copy_from_slice(&len.to_be_bytes());
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------------------------

/// Parses the PROXY header at the start of `buf` (v1 or v2, told apart by the first byte), with
/// v2 headers capped at [`DEFAULT_MAX_V2_LEN`] bytes.
pub fn parse(buf: &[u8]) -> Result<Parsed, ProxyError> {
    parse_with_limit(buf, DEFAULT_MAX_V2_LEN)
}

/// Like [`parse`] with v2 headers (fixed part included) capped at `max_v2_len` bytes.
pub fn parse_with_limit(buf: &[u8], max_v2_len: usize) -> Result<Parsed, ProxyError> {
    match buf.first() {
        None => Ok(Parsed::Incomplete),
        Some(b'P') => parse_v1(buf),
        Some(b'\r') => parse_v2(buf, max_v2_len),
        Some(_) => Err(ProxyError::NotProxy),
    }
}

/// What the fields of a v1 line amount to.
enum V1Line {
    /// Valid so far, line not finished.
    Partial,
    Unknown,
    Tcp(SocketAddr, SocketAddr),
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, ProxyError> {
    let window = buf.get(..V1_MAX_LEN).unwrap_or(buf);
    let end = window.iter().position(|&b| b == b'\r' || b == b'\n');
    let content = window.get(..end.unwrap_or(window.len())).unwrap_or(window);
    let line = v1_fields(content, end.is_some())?;
    let Some(pos) = end else {
        return if buf.len() >= V1_MAX_LEN {
            Err(ProxyError::V1TooLong)
        } else {
            Ok(Parsed::Incomplete)
        };
    };
    if window.get(pos) == Some(&b'\n') {
        return Err(ProxyError::V1BareLf);
    }
    if pos + 2 > V1_MAX_LEN {
        return Err(ProxyError::V1TooLong);
    }
    match buf.get(pos + 1) {
        None => Ok(Parsed::Incomplete),
        Some(b'\n') => {
            let addresses = match line {
                V1Line::Tcp(s, d) => Some((s, d)),
                V1Line::Unknown => None,
                // Unreachable: a terminated line is never partial; refuse rather than panic.
                V1Line::Partial => return Err(ProxyError::V1Malformed),
            };
            let header = Header {
                version: Version::V1,
                command: Command::Proxy,
                addresses,
                tlvs: Vec::new(),
            };
            Ok(Parsed::Complete {
                header,
                len: pos + 2,
            })
        }
        Some(_) => Err(ProxyError::V1MissingLf),
    }
}

#[derive(Clone, Copy)]
enum Field {
    Ip4,
    Ip6,
    Port,
}

/// Validates the v1 line `content` (without the line end). When `terminated` is false the line
/// may continue, so its last field is only checked for being a possible prefix.
fn v1_fields(content: &[u8], terminated: bool) -> Result<V1Line, ProxyError> {
    let n = content.len().min(V1_PREFIX.len());
    if content.get(..n) != V1_PREFIX.get(..n) {
        return Err(ProxyError::NotProxy);
    }
    let Some(rest) = content.get(V1_PREFIX.len()..) else {
        return if terminated {
            Err(ProxyError::V1Malformed)
        } else {
            Ok(V1Line::Partial)
        };
    };
    // Each token is "final" when a space follows it or the line is terminated.
    let mut tokens = rest.split(|&b| b == b' ').peekable();
    let mut next_token = || {
        tokens
            .next()
            .map(|t| (t, terminated || tokens.peek().is_some()))
    };

    let (proto, done) = next_token().ok_or(ProxyError::V1Malformed)?;
    let family = if done {
        match proto {
            b"TCP4" => Field::Ip4,
            b"TCP6" => Field::Ip6,
            b"UNKNOWN" => return Ok(V1Line::Unknown),
            _ => return Err(ProxyError::V1BadProtocol),
        }
    } else if [&b"TCP4"[..], b"TCP6", b"UNKNOWN"]
        .iter()
        .any(|p| p.starts_with(proto))
    {
        return Ok(V1Line::Partial);
    } else {
        return Err(ProxyError::V1BadProtocol);
    };

    let mut ips = [IpAddr::V4(Ipv4Addr::UNSPECIFIED); 2];
    let mut ports = [0u16; 2];
    for (k, field) in [family, family, Field::Port, Field::Port]
        .into_iter()
        .enumerate()
    {
        let Some((tok, done)) = next_token() else {
            return Err(ProxyError::V1Malformed);
        };
        check_prefix(field, tok)?;
        if !done {
            return Ok(V1Line::Partial);
        }
        match field {
            Field::Ip4 | Field::Ip6 => {
                if tok.is_empty() {
                    return Err(ProxyError::V1Malformed);
                }
                let text = std::str::from_utf8(tok).map_err(|_| ProxyError::V1BadAddress)?;
                let ip = match field {
                    Field::Ip4 => text.parse::<Ipv4Addr>().map(IpAddr::V4),
                    _ => text.parse::<Ipv6Addr>().map(IpAddr::V6),
                };
                let slot = ips.get_mut(k).ok_or(ProxyError::V1Malformed)?;
                *slot = ip.map_err(|_| ProxyError::V1BadAddress)?;
            }
            Field::Port => {
                if tok.is_empty() {
                    return Err(ProxyError::V1Malformed);
                }
                let value = tok.iter().fold(0u32, |v, &d| v * 10 + u32::from(d - b'0'));
                let port = u16::try_from(value).map_err(|_| ProxyError::V1BadPort)?;
                *ports.get_mut(k - 2).ok_or(ProxyError::V1Malformed)? = port;
            }
        }
    }
    if next_token().is_some() {
        // A space after the destination port: whatever follows is junk.
        return Err(ProxyError::V1Malformed);
    }
    Ok(V1Line::Tcp(
        SocketAddr::new(ips[0], ports[0]),
        SocketAddr::new(ips[1], ports[1]),
    ))
}

/// Checks, character by character, that `tok` can begin a valid field of this kind. Every
/// check depends only on the characters before, so a failing prefix fails the same way in
/// any longer input.
fn check_prefix(field: Field, tok: &[u8]) -> Result<(), ProxyError> {
    match field {
        Field::Ip4 => {
            if tok.len() > 15 {
                return Err(ProxyError::V1BadAddress);
            }
            let mut parts = 1;
            let mut digits = 0;
            let mut value = 0u32;
            for &b in tok {
                match b {
                    b'0'..=b'9' => {
                        if digits == 1 && value == 0 {
                            return Err(ProxyError::V1BadAddress); // leading zero
                        }
                        digits += 1;
                        value = value * 10 + u32::from(b - b'0');
                        if value > 255 {
                            return Err(ProxyError::V1BadAddress);
                        }
                    }
                    b'.' if digits > 0 && parts < 4 => {
                        parts += 1;
                        digits = 0;
                        value = 0;
                    }
                    _ => return Err(ProxyError::V1BadAddress),
                }
            }
            Ok(())
        }
        Field::Ip6 => {
            // Longest textual form: 6 groups and a dotted quad (45 characters).
            if tok.len() > 45
                || !tok
                    .iter()
                    .all(|b| b.is_ascii_hexdigit() || *b == b':' || *b == b'.')
            {
                return Err(ProxyError::V1BadAddress);
            }
            Ok(())
        }
        Field::Port => {
            let mut value = 0u32;
            for (i, &b) in tok.iter().enumerate() {
                if !b.is_ascii_digit() || (i == 1 && tok.first() == Some(&b'0')) {
                    return Err(ProxyError::V1BadPort);
                }
                value = value * 10 + u32::from(b - b'0');
                if value > u32::from(u16::MAX) {
                    return Err(ProxyError::V1BadPort);
                }
            }
            Ok(())
        }
    }
}

fn parse_v2(buf: &[u8], max_len: usize) -> Result<Parsed, ProxyError> {
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf.get(..n) != V2_SIGNATURE.get(..n) {
        return Err(ProxyError::NotProxy);
    }
    let Some(&ver_cmd) = buf.get(12) else {
        return Ok(Parsed::Incomplete);
    };
    if ver_cmd >> 4 != 2 {
        return Err(ProxyError::V2BadVersion(ver_cmd >> 4));
    }
    let command = match ver_cmd & 0x0f {
        0 => Command::Local,
        1 => Command::Proxy,
        c => return Err(ProxyError::V2BadCommand(c)),
    };
    let Some(&fam) = buf.get(13) else {
        return Ok(Parsed::Incomplete);
    };
    // Size of the address part of the block, and whether it maps to socket addresses.
    let need = match (command, fam) {
        (Command::Local, _) => 0,
        (Command::Proxy, 0x00) => 0,
        (Command::Proxy, 0x11) => INET_LEN,
        (Command::Proxy, 0x21) => INET6_LEN,
        (Command::Proxy, 0x31 | 0x32) => UNIX_LEN,
        (Command::Proxy, 0x12 | 0x22) => return Err(ProxyError::V2UnsupportedProtocol(fam)),
        (Command::Proxy, _) => return Err(ProxyError::V2BadFamily(fam)),
    };
    let (Some(&hi), Some(&lo)) = (buf.get(14), buf.get(15)) else {
        return Ok(Parsed::Incomplete);
    };
    let block_len = usize::from(u16::from_be_bytes([hi, lo]));
    let total = V2_FIXED_LEN + block_len;
    if total > max_len {
        return Err(ProxyError::V2TooLong {
            len: total,
            max: max_len,
        });
    }
    if block_len < need {
        return Err(ProxyError::V2AddressTooShort {
            len: block_len,
            need,
        });
    }
    let Some(header_bytes) = buf.get(..total) else {
        return Ok(Parsed::Incomplete);
    };
    let block = header_bytes.get(V2_FIXED_LEN..).unwrap_or_default();

    if command == Command::Local {
        let header = Header {
            version: Version::V2,
            command,
            addresses: None,
            tlvs: Vec::new(),
        };
        return Ok(Parsed::Complete { header, len: total });
    }

    let addresses = match fam {
        0x11 => {
            let ip = |o: usize| -> Option<IpAddr> {
                let b: [u8; 4] = block.get(o..o + 4)?.try_into().ok()?;
                Some(IpAddr::V4(Ipv4Addr::from(b)))
            };
            v2_addresses(block, ip(0), ip(4), 8)
        }
        0x21 => {
            let ip = |o: usize| -> Option<IpAddr> {
                let b: [u8; 16] = block.get(o..o + 16)?.try_into().ok()?;
                Some(IpAddr::V6(Ipv6Addr::from(b)))
            };
            v2_addresses(block, ip(0), ip(16), 32)
        }
        _ => None,
    };

    // TLVs follow the addresses and fill the rest of the block.
    let mut tlvs = Vec::new();
    let mut crc_at = None;
    let mut off = need;
    while off < block.len() {
        let (Some(&kind), Some(&h), Some(&l)) =
            (block.get(off), block.get(off + 1), block.get(off + 2))
        else {
            return Err(ProxyError::V2TlvOverflow);
        };
        let len = usize::from(u16::from_be_bytes([h, l]));
        let value = block
            .get(off + 3..off + 3 + len)
            .ok_or(ProxyError::V2TlvOverflow)?;
        if kind == PP2_TYPE_CRC32C {
            if len != 4 {
                return Err(ProxyError::V2BadCrcLength(len));
            }
            crc_at = Some(V2_FIXED_LEN + off + 3);
        }
        tlvs.push(Tlv {
            kind,
            value: value.to_vec(),
        });
        off += 3 + len;
    }
    if let Some(at) = crc_at {
        let field = header_bytes
            .get(at..at + 4)
            .ok_or(ProxyError::V2TlvOverflow)?;
        let expected = u32::from_be_bytes([field[0], field[1], field[2], field[3]]);
        let before = header_bytes.get(..at).unwrap_or_default();
        let after = header_bytes.get(at + 4..).unwrap_or_default();
        let actual = !crc32c_update(crc32c_update(crc32c_update(!0, before), &[0; 4]), after);
        if actual != expected {
            return Err(ProxyError::V2BadChecksum { expected, actual });
        }
    }
    let header = Header {
        version: Version::V2,
        command,
        addresses,
        tlvs,
    };
    Ok(Parsed::Complete { header, len: total })
}

fn v2_addresses(
    block: &[u8],
    src: Option<IpAddr>,
    dst: Option<IpAddr>,
    ports_at: usize,
) -> Option<(SocketAddr, SocketAddr)> {
    let port = |o: usize| -> Option<u16> {
        Some(u16::from_be_bytes([*block.get(o)?, *block.get(o + 1)?]))
    };
    Some((
        SocketAddr::new(src?, port(ports_at)?),
        SocketAddr::new(dst?, port(ports_at + 2)?),
    ))
}

// ---------------------------------------------------------------------------------------------
// CRC32c (Castagnoli), reflected polynomial 0x82F63B78, as used by the PP2_TYPE_CRC32C TLV.
// ---------------------------------------------------------------------------------------------

const CRC32C_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82F6_3B78
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

fn crc32c_update(mut crc: u32, data: &[u8]) -> u32 {
    for &b in data {
        crc = CRC32C_TABLE[usize::from((crc as u8) ^ b)] ^ (crc >> 8);
    }
    crc
}

/// CRC32c (Castagnoli) of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    !crc32c_update(!0, data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{SocketAddrV4, SocketAddrV6};

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn complete(buf: &[u8]) -> (Header, usize) {
        match parse(buf) {
            Ok(Parsed::Complete { header, len }) => (header, len),
            other => panic!("expected a complete header for {buf:?}, got {other:?}"),
        }
    }

    /// Every strict prefix is Incomplete, the whole is Complete, and payload after it is kept.
    fn assert_prefixes_incomplete(buf: &[u8]) {
        for i in 0..buf.len() {
            assert_eq!(
                parse(&buf[..i]),
                Ok(Parsed::Incomplete),
                "prefix {i} of {buf:?}"
            );
        }
        let (h, len) = complete(buf);
        assert_eq!(len, buf.len());
        let mut more = buf.to_vec();
        more.extend_from_slice(b"EHLO x\r\n");
        assert_eq!(parse(&more), Ok(Parsed::Complete { header: h, len }));
    }

    fn err(buf: &[u8]) -> ProxyError {
        match parse(buf) {
            Err(e) => e,
            other => panic!(
                "expected an error for {:?}, got {other:?}",
                String::from_utf8_lossy(buf)
            ),
        }
    }

    #[test]
    fn crc32c_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn v1_round_trips() {
        let cases = [
            (
                "192.0.2.1:56324",
                "198.51.100.7:25",
                "PROXY TCP4 192.0.2.1 198.51.100.7 56324 25\r\n",
            ),
            (
                "[2001:db8::1]:1",
                "[2001:db8::2]:587",
                "PROXY TCP6 2001:db8::1 2001:db8::2 1 587\r\n",
            ),
            (
                "192.0.2.1:0",
                "[2001:db8::2]:65535",
                "PROXY TCP6 ::ffff:192.0.2.1 2001:db8::2 0 65535\r\n",
            ),
        ];
        for (src, dst, text) in cases {
            let mut out = Vec::new();
            encode(Version::V1, sa(src), sa(dst), &mut out);
            assert_eq!(String::from_utf8(out.clone()).unwrap(), text);
            assert_prefixes_incomplete(&out);
            let (h, _) = complete(&out);
            let (es, ed) = same_family(sa(src), sa(dst));
            assert_eq!(h.addresses, Some((es, ed)));
            assert_eq!((h.version, h.command), (Version::V1, Command::Proxy));
        }
    }

    #[test]
    fn v2_round_trips() {
        for (src, dst) in [
            ("192.0.2.1:56324", "198.51.100.7:25"),
            ("[2001:db8::1]:1", "[2001:db8::2]:587"),
            ("[2001:db8::1]:1", "10.0.0.1:993"),
        ] {
            let mut out = Vec::new();
            encode(Version::V2, sa(src), sa(dst), &mut out);
            assert_prefixes_incomplete(&out);
            let (h, len) = complete(&out);
            assert_eq!(len, if sa(src).is_ipv4() { 28 } else { 52 });
            assert_eq!(h.addresses, Some(same_family(sa(src), sa(dst))));
            assert_eq!(
                (h.version, h.command, h.tlvs.len()),
                (Version::V2, Command::Proxy, 0)
            );
        }
        let mut out = Vec::new();
        encode_local_v2(&mut out);
        assert_prefixes_incomplete(&out);
        let (h, len) = complete(&out);
        assert_eq!((h.command, h.addresses, len), (Command::Local, None, 16));
    }

    #[test]
    fn v2_tlvs_and_crc_round_trip() {
        let tlvs = vec![
            Tlv {
                kind: 0x02,
                value: b"mx.example.org".to_vec(),
            },
            Tlv {
                kind: 0xE0,
                value: vec![],
            },
            Tlv {
                kind: 0x04,
                value: vec![0; 5],
            },
        ];
        let mut out = Vec::new();
        encode_v2_with_tlvs(
            sa("192.0.2.1:4000"),
            sa("192.0.2.2:25"),
            &tlvs,
            true,
            &mut out,
        )
        .unwrap();
        assert_prefixes_incomplete(&out);
        let (h, _) = complete(&out);
        assert_eq!(&h.tlvs[..3], &tlvs[..]);
        assert_eq!(h.tlvs[3].kind, PP2_TYPE_CRC32C);
        // Flip any single bit of the header: the checksum (or the framing) catches it.
        // (Except the CRC TLV's own type byte: turning it into another type removes the check.)
        let crc_type_at = out.len() - 7;
        for i in (16..out.len()).filter(|&i| i != crc_type_at) {
            let mut bad = out.clone();
            bad[i] ^= 0x10;
            assert!(parse(&bad).is_err(), "flipped byte {i} went unnoticed");
        }
        // Too big to encode.
        let huge = vec![Tlv {
            kind: 1,
            value: vec![0; 70_000],
        }];
        let mut out = Vec::new();
        assert!(
            encode_v2_with_tlvs(sa("192.0.2.1:1"), sa("192.0.2.2:2"), &huge, false, &mut out)
                .is_err()
        );
        assert!(out.is_empty());
    }

    /// Byte vectors written by hand from the specification, as HAProxy emits them.
    #[test]
    fn known_good_vectors() {
        // v1 examples from section 2.1.
        let (h, len) = complete(b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n");
        assert_eq!(len, 56);
        assert_eq!(
            h.addresses,
            Some((sa("255.255.255.255:65535"), sa("255.255.255.255:65535")))
        );
        let worst = b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        assert_eq!(worst.len(), 107);
        assert_eq!(
            complete(worst),
            (
                Header {
                    version: Version::V1,
                    command: Command::Proxy,
                    addresses: None,
                    tlvs: vec![]
                },
                107
            )
        );
        let tcp6 = b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        assert_eq!(tcp6.len(), 104);
        assert!(complete(tcp6).0.addresses.is_some());
        assert_eq!(complete(b"PROXY UNKNOWN\r\n").1, 15);

        // v2 TCP4 192.168.0.1:56324 -> 192.168.0.11:443.
        let v4: &[u8] = &[
            0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54,
            0x0A, // signature
            0x21, 0x11, 0x00, 0x0C, // v2 PROXY, TCP/IPv4, 12 bytes
            0xC0, 0xA8, 0x00, 0x01, 0xC0, 0xA8, 0x00, 0x0B, // addresses
            0xDC, 0x04, 0x01, 0xBB, // ports 56324, 443
        ];
        let mut out = Vec::new();
        encode(
            Version::V2,
            sa("192.168.0.1:56324"),
            sa("192.168.0.11:443"),
            &mut out,
        );
        assert_eq!(out, v4);
        assert_eq!(
            complete(v4).0.addresses,
            Some((sa("192.168.0.1:56324"), sa("192.168.0.11:443")))
        );

        // v2 TCP6 2001:db8::1:25 -> 2001:db8::2:2525 with a PP2_TYPE_AUTHORITY TLV "a".
        let v6: &[u8] = &[
            0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, //
            0x21, 0x21, 0x00, 0x28, // 36 + 4 bytes
            0x20, 0x01, 0x0D, 0xB8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, //
            0x20, 0x01, 0x0D, 0xB8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02, //
            0x00, 0x19, 0x09, 0xDD, // ports 25, 2525
            0x02, 0x00, 0x01, b'a', // TLV authority
        ];
        let (h, len) = complete(v6);
        assert_eq!(len, 56);
        assert_eq!(
            h.addresses,
            Some((sa("[2001:db8::1]:25"), sa("[2001:db8::2]:2525")))
        );
        assert_eq!(
            h.tlvs,
            vec![Tlv {
                kind: 2,
                value: b"a".to_vec()
            }]
        );

        // LOCAL as sent by HAProxy health checks.
        let local: &[u8] = &[
            0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, 0x20, 0x00,
            0x00, 0x00,
        ];
        assert_eq!(complete(local).0.command, Command::Local);

        // v2 TCP4 with a CRC32c TLV; checksum computed independently of this module's encoder.
        let mut crc: Vec<u8> = v4.to_vec();
        crc[15] = 0x13; // 12 + 7
        crc.extend_from_slice(&[0x03, 0x00, 0x04, 0, 0, 0, 0]);
        let sum = crc32c(&crc);
        crc[28 + 3..].copy_from_slice(&sum.to_be_bytes());
        assert_eq!(complete(&crc).0.tlvs.len(), 1);
    }

    #[test]
    fn v2_unspec_and_unix() {
        let mut hdr = V2_SIGNATURE.to_vec();
        hdr.extend_from_slice(&[0x21, 0x00, 0x00, 0x03, 0xE0, 0x00, 0x00]);
        let (h, _) = complete(&hdr);
        assert_eq!((h.addresses, h.tlvs.len()), (None, 1));

        let mut unix = V2_SIGNATURE.to_vec();
        unix.extend_from_slice(&[0x21, 0x31, 0x00, 0xD8]);
        unix.extend_from_slice(&[b'/'; 216]);
        assert_eq!(complete(&unix).0.addresses, None);
        unix[15] = 0xD7;
        assert_eq!(
            err(&unix),
            ProxyError::V2AddressTooShort {
                len: 215,
                need: 216
            }
        );
    }

    #[test]
    fn v1_hostile_inputs() {
        use ProxyError::*;
        let cases: &[(&[u8], ProxyError)] = &[
            (b"GET / HTTP/1.1\r\n", NotProxy),
            (b"EHLO", NotProxy),
            (b"PROXZ", NotProxy),
            (b"proxy TCP4", NotProxy),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", V1BareLf),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX", V1MissingLf),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", V1BadPort),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 -1\r\n", V1BadPort),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1e3 2\r\n", V1BadPort),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", V1BadPort),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", V1BadPort),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 99999999999999999999 2\r\n",
                V1BadPort,
            ),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8  1 2\r\n", V1Malformed),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", V1Malformed),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 junk\r\n", V1Malformed),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", V1Malformed),
            (b"PROXY TCP4\r\n", V1Malformed),
            (b"PROXY\r\n", V1Malformed),
            (b"PROXY TCP5 1.2.3.4", V1BadProtocol),
            (b"PROXY UNKNOWNX\r\n", V1BadProtocol),
            (b"PROXY  TCP4", V1BadProtocol),
            (b"PROXY TCP4 2001:db8::1 5.6.7.8 1 2\r\n", V1BadAddress),
            (b"PROXY TCP6 1.2.3.4 2001:db8::1 1 2\r\n", V1BadAddress),
            (b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", V1BadAddress),
            (b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", V1BadAddress),
            (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", V1BadAddress),
            (b"PROXY TCP4 1.2.3.4.5 5.6.7.8 1 2\r\n", V1BadAddress),
            (b"PROXY TCP6 2001:db8:::1 ::1 1 2\r\n", V1BadAddress),
            (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", V1BadAddress),
        ];
        for (input, expected) in cases {
            assert_eq!(
                &err(input),
                expected,
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
        // Errors come as soon as the offending byte arrives.
        assert_eq!(err(b"G"), NotProxy);
        assert_eq!(err(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536"), V1BadPort);
        assert_eq!(err(b"PROXY TCP4 1.2.3.4x"), V1BadAddress);
        assert_eq!(err(b"PROXY TCP4 300"), V1BadAddress);
        assert_eq!(err(b"PROXY X"), V1BadProtocol);
        assert_eq!(err(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 "), V1Malformed);
        // Overlong: a line with no CRLF within 107 bytes, and an UNKNOWN line one byte too long.
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.resize(200, b'a');
        assert_eq!(err(&long), V1TooLong);
        assert_eq!(parse(&long[..106]), Ok(Parsed::Incomplete));
        assert_eq!(err(&long[..107]), V1TooLong);
        let mut over = long[..106].to_vec();
        over.extend_from_slice(b"\r\n");
        assert_eq!(err(&over), V1TooLong);
        over.truncate(105);
        over.extend_from_slice(b"\r\n");
        assert_eq!(complete(&over).1, 107);
        // Anything goes after UNKNOWN, including bytes that are not UTF-8.
        assert!(
            complete(b"PROXY UNKNOWN \xff\x00 whatever\r\n")
                .0
                .addresses
                .is_none()
        );
    }

    #[test]
    fn v2_hostile_inputs() {
        use ProxyError::*;
        let with = |ver_cmd: u8, fam: u8, len: u16, rest: &[u8]| {
            let mut v = V2_SIGNATURE.to_vec();
            v.push(ver_cmd);
            v.push(fam);
            v.extend_from_slice(&len.to_be_bytes());
            v.extend_from_slice(rest);
            v
        };
        assert_eq!(err(b"\r\n\r\n\0\r\nQUIX"), NotProxy);
        assert_eq!(err(b"\r\r"), NotProxy);
        assert_eq!(err(&with(0x11, 0x11, 12, &[])[..13]), V2BadVersion(1));
        assert_eq!(err(&with(0x31, 0x11, 12, &[])[..13]), V2BadVersion(3));
        assert_eq!(err(&with(0x22, 0x11, 12, &[])[..13]), V2BadCommand(2));
        assert_eq!(err(&with(0x21, 0x41, 12, &[])[..14]), V2BadFamily(0x41));
        assert_eq!(err(&with(0x21, 0x13, 12, &[])[..14]), V2BadFamily(0x13));
        assert_eq!(err(&with(0x21, 0x10, 12, &[])[..14]), V2BadFamily(0x10));
        assert_eq!(err(&with(0x21, 0x01, 0, &[])[..14]), V2BadFamily(0x01));
        assert_eq!(
            err(&with(0x21, 0x12, 12, &[])[..14]),
            V2UnsupportedProtocol(0x12)
        );
        assert_eq!(
            err(&with(0x21, 0x22, 36, &[])[..14]),
            V2UnsupportedProtocol(0x22)
        );
        // Huge length refused as soon as the length field is in, not after 64 KiB arrive.
        assert_eq!(
            err(&with(0x21, 0x11, 0xFFFF, &[])),
            V2TooLong {
                len: 16 + 0xFFFF,
                max: 4096
            }
        );
        assert_eq!(
            parse_with_limit(&with(0x21, 0x11, 100, &[]), 64),
            Err(V2TooLong { len: 116, max: 64 })
        );
        assert_eq!(
            err(&with(0x21, 0x11, 11, &[0; 11])),
            V2AddressTooShort { len: 11, need: 12 }
        );
        assert_eq!(
            err(&with(0x21, 0x21, 12, &[0; 12])),
            V2AddressTooShort { len: 12, need: 36 }
        );
        // TLV overruns: header of a TLV cut short, value longer than the block.
        assert_eq!(err(&with(0x21, 0x11, 14, &[0; 14])), V2TlvOverflow);
        let mut tlv = vec![0; 12];
        tlv.extend_from_slice(&[0x02, 0x00, 0x05, b'a', b'b']);
        assert_eq!(err(&with(0x21, 0x11, 17, &tlv)), V2TlvOverflow);
        let mut tlv = vec![0; 12];
        tlv.extend_from_slice(&[0x02, 0xFF, 0xFF]);
        assert_eq!(err(&with(0x21, 0x11, 15, &tlv)), V2TlvOverflow);
        // CRC TLV of the wrong size, and a wrong checksum.
        let mut bad = vec![0; 12];
        bad.extend_from_slice(&[0x03, 0x00, 0x02, 0xAB, 0xCD]);
        assert_eq!(err(&with(0x21, 0x11, 17, &bad)), V2BadCrcLength(2));
        let mut bad = vec![0; 12];
        bad.extend_from_slice(&[0x03, 0x00, 0x04, 0xDE, 0xAD, 0xBE, 0xEF]);
        assert!(matches!(
            err(&with(0x21, 0x11, 19, &bad)),
            V2BadChecksum {
                expected: 0xDEAD_BEEF,
                ..
            }
        ));
        // LOCAL ignores whatever block follows, even unknown families.
        let (h, len) = complete(&with(0x20, 0xFF, 3, &[1, 2, 3]));
        assert_eq!(
            (h.command, h.addresses, h.tlvs.len(), len),
            (Command::Local, None, 0, 19)
        );
    }

    #[test]
    fn scoped_ipv6_encodes_without_scope() {
        let src = SocketAddr::V6(SocketAddrV6::new("fe80::1".parse().unwrap(), 10, 7, 3));
        let dst = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 25));
        for v in [Version::V1, Version::V2] {
            let mut out = Vec::new();
            encode(v, src, dst, &mut out);
            let (h, _) = complete(&out);
            let (s, d) = h.addresses.unwrap();
            assert_eq!((s.ip(), s.port()), (src.ip(), 10));
            assert_eq!(d, sa("[::ffff:10.0.0.1]:25"));
        }
    }

    /// Arbitrary inputs: no panics, and every prefix is Incomplete or gives the final answer.
    #[test]
    fn pseudo_random_inputs_are_monotonic() {
        let mut seeds: Vec<Vec<u8>> = Vec::new();
        let mut out = Vec::new();
        encode(
            Version::V1,
            sa("[2001:db8::1]:1"),
            sa("[2001:db8::2]:587"),
            &mut out,
        );
        seeds.push(out.clone());
        out.clear();
        encode_v2_with_tlvs(
            sa("1.2.3.4:5"),
            sa("6.7.8.9:10"),
            &[Tlv {
                kind: 1,
                value: vec![9; 4],
            }],
            true,
            &mut out,
        )
        .unwrap();
        seeds.push(out);
        let mut state = 0x1234_5678_9abc_def0u64;
        let mut rnd = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..3000 {
            let mut input = seeds[round % 2].clone();
            for _ in 0..(rnd() % 3) {
                let i = (rnd() as usize) % input.len();
                input[i] = rnd() as u8;
            }
            let full = parse(&input);
            for i in 0..input.len() {
                let p = parse(&input[..i]);
                if p != Ok(Parsed::Incomplete) {
                    assert_eq!(p, full, "prefix {i} of {input:?}");
                }
            }
        }
    }
}
