//! Thin, safe wrappers over the system calls the engines share: listening sockets with
//! SO_REUSEPORT, backend sockets, the open-file limit, CPU pinning and pipes for splice.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// A listening socket for one worker: SO_REUSEPORT so every worker has its own accept queue
/// on the same address, IPV6_V6ONLY for v6 binds (v4 and v6 VIPs are separate listeners),
/// IP_FREEBIND so an anycast VIP can be bound before it is configured on `lo`.
pub fn listener(addr: SocketAddr, backlog: i32) -> io::Result<OwnedFd> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    let _ = if addr.is_ipv6() {
        socket.set_freebind_v6(true)
    } else {
        socket.set_freebind_v4(true)
    };
    socket.set_tcp_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    Ok(socket.into())
}

/// Fails with `AddrInUse` when another socket is bound to `addr` (or overlaps it, e.g. a
/// wildcard bind on the same port). The listeners use SO_REUSEPORT, which would otherwise let
/// this process silently share a port another process (of the same user) listens on, each
/// getting a part of the connections; a plain bind, as Postfix and Dovecot do, refuses that.
/// Port 0 (any free port) is not checked.
pub fn ensure_unclaimed(addr: SocketAddr) -> io::Result<()> {
    if addr.port() == 0 {
        return Ok(());
    }
    let probe = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.cloexec(),
        Some(Protocol::TCP),
    )?;
    // Connections in TIME_WAIT on the port are no conflict.
    probe.set_reuse_address(true)?;
    if addr.is_ipv6() {
        probe.set_only_v6(true)?;
    }
    let _ = if addr.is_ipv6() {
        probe.set_freebind_v6(true)
    } else {
        probe.set_freebind_v4(true)
    };
    probe.bind(&addr.into()).map_err(|e| {
        if e.kind() == io::ErrorKind::AddrInUse {
            io::Error::new(
                io::ErrorKind::AddrInUse,
                "address already in use by another socket (another process listens there)",
            )
        } else {
            e
        }
    })
}

/// A non-blocking TCP socket for connecting to `addr`.
pub fn backend_socket(addr: SocketAddr) -> io::Result<OwnedFd> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    socket.set_tcp_nodelay(true)?;
    Ok(socket.into())
}

/// Starts a non-blocking connect; Ok(true) when already connected, Ok(false) when in progress.
pub fn start_connect(fd: RawFd, addr: &SockAddr) -> io::Result<bool> {
    let socket = borrow(fd);
    let r = match socket.connect(addr) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(false),
        Err(e) => Err(e),
    };
    let _ = socket.into_raw_fd();
    r
}

/// The pending error on a socket (SO_ERROR), e.g. after a non-blocking connect.
pub fn take_error(fd: RawFd) -> io::Result<Option<io::Error>> {
    let socket = borrow(fd);
    let r = socket.take_error();
    let _ = socket.into_raw_fd();
    r
}

/// Peer address of a connected socket (one system call).
pub fn peer_addr(fd: RawFd) -> io::Result<SocketAddr> {
    let socket = borrow(fd);
    let r = socket.peer_addr().and_then(|a| {
        a.as_socket()
            .ok_or_else(|| io::Error::other("peer is not inet"))
    });
    let _ = socket.into_raw_fd();
    r.map(normalize)
}

/// Local address of a socket (one system call).
pub fn local_addr(fd: RawFd) -> io::Result<SocketAddr> {
    let socket = borrow(fd);
    let r = socket.local_addr().and_then(|a| {
        a.as_socket()
            .ok_or_else(|| io::Error::other("local is not inet"))
    });
    let _ = socket.into_raw_fd();
    r.map(normalize)
}

/// IPv4-mapped IPv6 addresses are shown as IPv4.
pub fn normalize(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

/// Shuts down the write half (sends FIN).
pub fn shutdown_write(fd: RawFd) {
    let socket = borrow(fd);
    let _ = socket.shutdown(std::net::Shutdown::Write);
    let _ = socket.into_raw_fd();
}

/// Closes a descriptor the caller owns.
pub fn close(fd: RawFd) {
    if fd >= 0 {
        // SAFETY: the caller passes a descriptor it owns and never uses again.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
    }
}

fn borrow(fd: RawFd) -> Socket {
    // SAFETY: the returned Socket is always turned back into a raw fd by the caller with
    // `into_raw_fd`, so it never closes a descriptor it does not own.
    unsafe { Socket::from_raw_fd(fd) }
}

/// Raises RLIMIT_NOFILE's soft limit to the hard limit; returns the limit now in force.
pub fn raise_nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return raised.rlim_cur;
        }
    }
    lim.rlim_cur
}

/// CPUs this process may run on, in order.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is this thread; size and pointer describe `set`.
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0
    {
        return (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect();
    }
    // SAFETY: CPU_ISSET reads the set initialised above.
    (0..libc::CPU_SETSIZE as usize)
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect()
}

/// Pins the calling thread to `cpu`.
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes into the set we own; the CPU numbers come from allowed_cpus, so
    // they are below CPU_SETSIZE (CPU_SET would panic, not corrupt memory, otherwise).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is this thread; size and pointer describe `set`.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A pipe for splice relaying, non-blocking, sized to `size` bytes if allowed.
pub fn pipe(size: i32) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two descriptors into the array we pass.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both descriptors are open and owned by us alone.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: F_SETPIPE_SZ on a pipe we own; failure (over /proc/sys/fs/pipe-max-size) is ignored.
    unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, size) };
    Ok((r, w))
}

/// splice(2) without offsets, non-blocking, moving pages where possible.
pub fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are open; null offsets mean "current position" for pipes/sockets.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Monotonic milliseconds (CLOCK_MONOTONIC_COARSE is plenty for timeouts).
pub fn now_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

/// Monotonic nanoseconds (precise, for the connect-time histogram).
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Creates a TUN interface named `name` that lives exactly as long as the returned descriptor
/// (non-persistent): when the process exits, however it exits, the kernel deletes the interface
/// and every route through it. The anycast glue routes its kernel-table VIP routes through such
/// an interface, so a crashed process cannot leave routes behind that BIRD or FRR would keep
/// announcing. No packet is ever sent through it: nothing looks the table up for forwarding.
pub fn open_tun(name: &str) -> io::Result<OwnedFd> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['/', ' ', '\0']) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a valid interface name"),
        ));
    }
    // SAFETY: open(2) with a NUL-terminated literal path; returns a new descriptor or -1.
    let fd = unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data (arrays, integers and a union of such); all zeroes is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads (and may update the name in) the ifreq we pass by pointer, which
    // lives across the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF as _, &mut req) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_another_socket_listens_on_is_claimed() {
        let other = listener("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let addr = local_addr(other.as_raw_fd()).unwrap();
        let err = ensure_unclaimed(addr).expect_err("in use");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        drop(other);
        ensure_unclaimed(addr).expect("free once closed");
        assert!(ensure_unclaimed("127.0.0.1:0".parse().unwrap()).is_ok());
    }
}
