//! Netlink I/O for the anycast glue: VIP addresses on `lo` and host routes
//! in a dedicated kernel routing table.
//!
//! Two independent pieces share one rtnetlink connection ([`Netlink`]):
//!
//! * [`LoopbackVips`] puts every VIP on `lo` as a /32 or /128 so the host
//!   accepts traffic for it. Addresses that were already there are left
//!   alone: only the ones ringmail added are removed again.
//! * [`KernelTable`] is the "kernel table" mode for an external BGP daemon
//!   (BIRD, FRR): ringmail installs `VIP/32 dev lo` (or `/128`) in table N
//!   with protocol [`RTPROT_RINGMAIL`] while a VIP is healthy and deletes it
//!   when it is not; the daemon learns the table and announces what is in it.
//!
//! # What BIRD 2 needs to learn the routes (checked with BIRD 2.0.12)
//!
//! `protocol kernel { kernel table N; learn; ipv4 { import all; }; }` imports
//! the routes, provided that
//!
//! * a `protocol device` is configured: without it BIRD does not know `lo`
//!   and logs "KRT: Received route ... with unknown ifindex 1" instead of
//!   importing;
//! * the route protocol is not `kernel` (2): BIRD's `learn` skips kernel
//!   routes (`learn all` does not exist in 2.0.12), and not `bird` (12),
//!   which BIRD takes for its own export. Any other number is imported and
//!   shows up as `krt_source` in filters. The scope (link or host) does not
//!   matter.
//!
//! The protocol is 114 rather than `bgp` (186): FRR's zebra treats 186 (and
//! 11, 187..=198) as its own, sweeping such routes at start.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures_util::stream::TryStreamExt;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::{AddressMessageBuilder, Handle, RouteMessageBuilder};

/// Route protocol number (`rtm_protocol`) of the routes ringmail installs.
///
/// 114 is not in iproute2's `rt_protos`, not `kernel` (2, which BIRD's
/// `learn` skips), not `bird` (12) and outside FRR's own range (11, 186..=198,
/// which zebra sweeps at start). To show it by name in `ip route`:
/// `echo "114 ringmail" > /etc/iproute2/rt_protos.d/ringmail.conf`.
pub const RTPROT_RINGMAIL: u8 = 114;

/// The loopback interface the VIPs live on.
pub const LOOPBACK: &str = "lo";

/// Metric (priority) of a kernel-table route in normal operation.
pub const ROUTE_METRIC: u32 = 1000;

/// Metric of a kernel-table route during the drain's graceful phase: BIRD sees it as
/// `krt_metric`, and the shipped export filters add GRACEFUL_SHUTDOWN (65535:0) and the prepend.
pub const GRACEFUL_METRIC: u32 = 2000;

const EPERM: i32 = 1;
const ESRCH: i32 = 3;
const EEXIST: i32 = 17;
const ENODEV: i32 = 19;
const EADDRNOTAVAIL: i32 = 99;

/// The netlink operation that failed, for [`NetlinkError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Looking up an interface by name.
    LookupLink,
    /// Dumping the addresses of an interface.
    ListAddresses,
    /// `RTM_NEWADDR`.
    AddAddress,
    /// `RTM_DELADDR`.
    DeleteAddress,
    /// Dumping routes.
    ListRoutes,
    /// `RTM_NEWROUTE` (replace).
    AddRoute,
    /// `RTM_DELROUTE`.
    DeleteRoute,
    /// `RTM_NEWLINK` setting an interface up.
    SetLinkUp,
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Operation::LookupLink => "looking up interface",
            Operation::ListAddresses => "listing addresses of",
            Operation::AddAddress => "adding address",
            Operation::DeleteAddress => "deleting address",
            Operation::ListRoutes => "listing routes of",
            Operation::AddRoute => "installing route",
            Operation::DeleteRoute => "deleting route",
            Operation::SetLinkUp => "setting up interface",
        })
    }
}

/// Errors of the netlink layer. Each names the operation and its subject
/// (an address, a route with its table, an interface).
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The rtnetlink socket could not be opened.
    #[error("opening the rtnetlink socket failed: {0}")]
    Connect(#[source] std::io::Error),
    /// The kernel refused with EPERM.
    #[error(
        "{op} {subject}: operation not permitted (EPERM): needs CAP_NET_ADMIN (run as root or grant the capability)"
    )]
    PermissionDenied {
        /// What was being done.
        op: Operation,
        /// On what.
        subject: String,
    },
    /// The interface does not exist.
    #[error("{op} {name:?}: no such interface")]
    NoSuchInterface {
        /// What was being done.
        op: Operation,
        /// The interface name.
        name: String,
    },
    /// The kernel answered with another errno.
    #[error("{op} {subject}: {message} (errno {errno})")]
    Kernel {
        /// What was being done.
        op: Operation,
        /// On what.
        subject: String,
        /// The positive errno.
        errno: i32,
        /// `strerror` of it.
        message: String,
    },
    /// rtnetlink failed without an errno (connection gone, bad answer).
    #[error("{op} {subject}: {source}")]
    Rtnetlink {
        /// What was being done.
        op: Operation,
        /// On what.
        subject: String,
        /// The library error.
        #[source]
        source: rtnetlink::Error,
    },
    /// A table number ringmail refuses to manage.
    #[error(
        "routing table {0} is reserved (0 unspec, 253 default, 254 main, 255 local): use a dedicated table"
    )]
    ReservedTable(u32),
}

impl NetlinkError {
    /// The positive errno the kernel answered with, if any.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::PermissionDenied { .. } => Some(EPERM),
            NetlinkError::Kernel { errno, .. } => Some(*errno),
            NetlinkError::Connect(e) => e.raw_os_error(),
            _ => None,
        }
    }

    fn from_rtnetlink(op: Operation, subject: impl Into<String>, e: rtnetlink::Error) -> Self {
        let subject = subject.into();
        match e {
            rtnetlink::Error::NetlinkError(msg) if msg.raw_code() != 0 => {
                let errno = msg.raw_code().abs();
                if errno == EPERM {
                    NetlinkError::PermissionDenied { op, subject }
                } else {
                    NetlinkError::Kernel {
                        op,
                        subject,
                        errno,
                        message: std::io::Error::from_raw_os_error(errno).to_string(),
                    }
                }
            }
            source => NetlinkError::Rtnetlink {
                op,
                subject,
                source,
            },
        }
    }
}

fn errno_of(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(msg) if msg.raw_code() != 0 => Some(msg.raw_code().abs()),
        _ => None,
    }
}

fn host_prefix(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

/// One rtnetlink connection; its I/O task runs on the current tokio runtime
/// and is stopped when this is dropped. Create it inside the network
/// namespace it should act on (the socket is bound at creation).
#[derive(Debug)]
pub struct Netlink {
    handle: Handle,
    task: tokio::task::JoinHandle<()>,
}

impl Netlink {
    /// Opens the socket and spawns the connection task. Must be called from
    /// within a tokio runtime.
    pub fn new() -> Result<Self, NetlinkError> {
        let (conn, handle, _messages) =
            rtnetlink::new_connection().map_err(NetlinkError::Connect)?;
        let task = tokio::spawn(conn);
        Ok(Netlink { handle, task })
    }

    /// The rtnetlink handle, for requests this module does not cover.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Interface index of `name`.
    pub async fn link_index(&self, name: &str) -> Result<u32, NetlinkError> {
        let mut links = self.handle.link().get().match_name(name).execute();
        match links.try_next().await {
            Ok(Some(link)) => Ok(link.header.index),
            Ok(None) => Err(NetlinkError::NoSuchInterface {
                op: Operation::LookupLink,
                name: name.to_owned(),
            }),
            Err(e) if errno_of(&e) == Some(ENODEV) => Err(NetlinkError::NoSuchInterface {
                op: Operation::LookupLink,
                name: name.to_owned(),
            }),
            Err(e) => Err(NetlinkError::from_rtnetlink(
                Operation::LookupLink,
                format!("{name:?}"),
                e,
            )),
        }
    }

    /// Addresses (any prefix length) on interface `index`.
    pub async fn addresses(&self, index: u32) -> Result<Vec<IpAddr>, NetlinkError> {
        let msgs: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(|e| {
                NetlinkError::from_rtnetlink(
                    Operation::ListAddresses,
                    format!("interface index {index}"),
                    e,
                )
            })?;
        let mut out = Vec::new();
        for msg in msgs {
            // IFA_LOCAL is the address itself; IFA_ADDRESS is the peer on
            // point-to-point links and equals IFA_LOCAL otherwise. IPv6
            // sends only IFA_ADDRESS.
            let local = msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let addr = local.or_else(|| {
                msg.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })
            });
            if let Some(ip) = addr {
                out.push(ip);
            }
        }
        Ok(out)
    }
}

impl Drop for Netlink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn address_message(index: u32, ip: IpAddr) -> AddressMessage {
    match ip {
        IpAddr::V4(v4) => AddressMessageBuilder::<Ipv4Addr>::new()
            .index(index)
            .address(v4, 32)
            .build(),
        IpAddr::V6(v6) => {
            let mut msg = AddressMessageBuilder::<Ipv6Addr>::new()
                .index(index)
                .address(v6, 128)
                .build();
            // No duplicate address detection: usable at once (the kernel
            // skips DAD on loopback anyway, this makes it explicit).
            msg.header.flags = AddressHeaderFlags::Nodad;
            msg.attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
            msg
        }
    }
}

/// The VIPs on `lo`, and which of them ringmail added.
#[derive(Debug)]
pub struct LoopbackVips {
    handle: Handle,
    index: u32,
    owned: Vec<IpAddr>,
    preexisting: Vec<IpAddr>,
}

impl LoopbackVips {
    /// Puts every address of `vips` on `lo` (/32 or /128). An address that
    /// is already on `lo` (with any prefix length) is recorded as not ours
    /// and left alone. If one add fails, the addresses added so far are
    /// removed again and the error is returned.
    pub async fn add(nl: &Netlink, vips: &[IpAddr]) -> Result<Self, NetlinkError> {
        let index = nl.link_index(LOOPBACK).await?;
        let present = nl.addresses(index).await?;
        let mut this = LoopbackVips {
            handle: nl.handle.clone(),
            index,
            owned: Vec::new(),
            preexisting: Vec::new(),
        };
        for &ip in vips {
            if this.owned.contains(&ip) || this.preexisting.contains(&ip) {
                continue;
            }
            if present.contains(&ip) {
                this.preexisting.push(ip);
                continue;
            }
            let mut req = this.handle.address().add(index, ip, host_prefix(ip));
            *req.message_mut() = address_message(index, ip);
            match req.execute().await {
                Ok(()) => this.owned.push(ip),
                // Appeared between the dump and the add: someone else's.
                Err(e) if errno_of(&e) == Some(EEXIST) => this.preexisting.push(ip),
                Err(e) => {
                    let err = NetlinkError::from_rtnetlink(
                        Operation::AddAddress,
                        format!("{ip}/{} on {LOOPBACK}", host_prefix(ip)),
                        e,
                    );
                    // Best effort: the add error is the one to report.
                    let _ = this.remove_owned().await;
                    return Err(err);
                }
            }
        }
        Ok(this)
    }

    /// The addresses ringmail added (and will remove).
    pub fn owned(&self) -> &[IpAddr] {
        &self.owned
    }

    /// The addresses that were on `lo` already (never removed).
    pub fn preexisting(&self) -> &[IpAddr] {
        &self.preexisting
    }

    /// Deletes the addresses ringmail added. An address already gone is
    /// fine. Every address is tried; the first error is returned and the
    /// addresses that failed stay in [`owned`](Self::owned) for a retry.
    pub async fn remove_owned(&mut self) -> Result<(), NetlinkError> {
        let mut first_err = None;
        let mut kept = Vec::new();
        for ip in std::mem::take(&mut self.owned) {
            let msg = address_message(self.index, ip);
            match self.handle.address().del(msg).execute().await {
                Ok(()) => {}
                Err(e) if errno_of(&e) == Some(EADDRNOTAVAIL) => {}
                Err(e) => {
                    kept.push(ip);
                    first_err.get_or_insert(NetlinkError::from_rtnetlink(
                        Operation::DeleteAddress,
                        format!("{ip}/{} on {LOOPBACK}", host_prefix(ip)),
                        e,
                    ));
                }
            }
        }
        self.owned = kept;
        first_err.map_or(Ok(()), Err)
    }
}

/// VIPs made local without an address on `lo` ("AnyIP"): a route
/// `local VIP dev lo table local proto 114` per VIP. The host accepts their
/// traffic as with an address, but no interface address exists, so a routing
/// daemon that turns interface addresses into connected routes (FRR's zebra)
/// does not shadow the kernel-table routes of [`KernelTable`] with them.
/// Sockets bind to the VIPs with IP_FREEBIND (the load balancer sets it).
///
/// Ownership is by protocol number: every proto-114 local route for a VIP is
/// ringmail's, so leftovers of a crashed run are replaced at start and all of
/// them are removed at exit.
#[derive(Debug)]
pub struct LocalVips {
    handle: Handle,
    lo_index: u32,
    vips: Vec<IpAddr>,
}

/// The kernel's `local` routing table.
const RT_TABLE_LOCAL: u32 = 255;

impl LocalVips {
    fn message(&self, ip: IpAddr) -> RouteMessage {
        let mut msg = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(ip, host_prefix(ip))
            .expect("host prefix is valid for its own family")
            .output_interface(self.lo_index)
            .protocol(RouteProtocol::from(RTPROT_RINGMAIL))
            .kind(RouteType::Local)
            .scope(RouteScope::Host)
            .build();
        msg.header.table = RT_TABLE_LOCAL as u8;
        msg.attributes.push(RouteAttribute::Table(RT_TABLE_LOCAL));
        msg
    }

    /// Installs a local route for every VIP (idempotent: replaces).
    pub async fn add(nl: &Netlink, vips: &[IpAddr]) -> Result<Self, NetlinkError> {
        let mut this = LocalVips {
            handle: nl.handle.clone(),
            lo_index: nl.link_index(LOOPBACK).await?,
            vips: Vec::new(),
        };
        for &ip in vips {
            if this.vips.contains(&ip) {
                continue;
            }
            let res = this
                .handle
                .route()
                .add(this.message(ip))
                .replace()
                .execute()
                .await;
            if let Err(e) = res {
                let err = NetlinkError::from_rtnetlink(
                    Operation::AddRoute,
                    format!("local {ip}/{} dev {LOOPBACK} table local", host_prefix(ip)),
                    e,
                );
                let _ = this.remove().await;
                return Err(err);
            }
            this.vips.push(ip);
        }
        Ok(this)
    }

    /// The VIPs with a local route.
    pub fn vips(&self) -> &[IpAddr] {
        &self.vips
    }

    /// Deletes the local routes (a missing one is fine); the first error is returned.
    pub async fn remove(&mut self) -> Result<(), NetlinkError> {
        let mut first_err = None;
        let mut kept = Vec::new();
        for ip in std::mem::take(&mut self.vips) {
            match self.handle.route().del(self.message(ip)).execute().await {
                Ok(()) => {}
                Err(e) if errno_of(&e) == Some(ESRCH) => {}
                Err(e) => {
                    kept.push(ip);
                    first_err.get_or_insert(NetlinkError::from_rtnetlink(
                        Operation::DeleteRoute,
                        format!("local {ip}/{} dev {LOOPBACK} table local", host_prefix(ip)),
                        e,
                    ));
                }
            }
        }
        self.vips = kept;
        first_err.map_or(Ok(()), Err)
    }
}

/// Host routes for VIPs in a dedicated kernel routing table, for a BGP
/// daemon that learns that table (see the module docs).
///
/// Every route is `VIP/32` (or `/128`) `dev lo table N proto 114`, type
/// unicast; IPv4 routes have scope link (what `ip route add ... dev lo`
/// gives), IPv6 routes the kernel's default metric (1024).
#[derive(Debug, Clone)]
pub struct KernelTable {
    handle: Handle,
    table: u32,
    lo_index: u32,
}

impl KernelTable {
    /// Table `table` (any number but 0, 253, 254, 255; above 255 is fine), routes via `lo`.
    pub async fn new(nl: &Netlink, table: u32) -> Result<Self, NetlinkError> {
        Self::with_device(nl, table, LOOPBACK).await
    }

    /// Table `table` with routes via `device`, which is set up first. ringmail passes a TUN
    /// interface that lives as long as the process: if the process dies, the kernel deletes
    /// the interface and these routes with it, and the routing daemon withdraws them.
    pub async fn with_device(nl: &Netlink, table: u32, device: &str) -> Result<Self, NetlinkError> {
        if matches!(table, 0 | 253..=255) {
            return Err(NetlinkError::ReservedTable(table));
        }
        let lo_index = nl.link_index(device).await?;
        if device != LOOPBACK {
            nl.handle
                .link()
                .set(rtnetlink::LinkUnspec::new_with_index(lo_index).up().build())
                .execute()
                .await
                .map_err(|e| {
                    NetlinkError::from_rtnetlink(Operation::SetLinkUp, device.to_string(), e)
                })?;
        }
        Ok(KernelTable {
            handle: nl.handle.clone(),
            table,
            lo_index,
        })
    }

    /// The table number.
    pub fn table(&self) -> u32 {
        self.table
    }

    fn route_message(&self, ip: IpAddr, metric: u32) -> RouteMessage {
        let mut msg = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(ip, host_prefix(ip))
            .expect("host prefix is valid for its own family")
            .priority(metric)
            .output_interface(self.lo_index)
            .protocol(RouteProtocol::from(RTPROT_RINGMAIL))
            .kind(RouteType::Unicast)
            .scope(match ip {
                IpAddr::V4(_) => RouteScope::Link,
                IpAddr::V6(_) => RouteScope::Universe,
            })
            .build();
        // Like iproute2: the header byte holds the table if it fits,
        // RT_TABLE_UNSPEC otherwise; RTA_TABLE always carries all 32 bits.
        msg.header.table = u8::try_from(self.table).unwrap_or(RouteHeader::RT_TABLE_UNSPEC);
        msg.attributes.push(RouteAttribute::Table(self.table));
        msg
    }

    fn subject(&self, ip: IpAddr) -> String {
        format!(
            "{ip}/{} dev {LOOPBACK} table {}",
            host_prefix(ip),
            self.table
        )
    }

    /// Installs (or replaces) the host route for `ip` with [`ROUTE_METRIC`]. Idempotent.
    pub async fn announce(&self, ip: IpAddr) -> Result<(), NetlinkError> {
        self.announce_with(ip, false).await
    }

    /// Installs the host route for `ip`; `graceful` marks the drain phase with
    /// [`GRACEFUL_METRIC`], which the routing daemon's export filter turns into the
    /// GRACEFUL_SHUTDOWN community (see deploy/examples). The new route goes in before the one
    /// with the other metric is deleted, so the VIP is never missing from the table.
    pub async fn announce_with(&self, ip: IpAddr, graceful: bool) -> Result<(), NetlinkError> {
        let (metric, other) = if graceful {
            (GRACEFUL_METRIC, ROUTE_METRIC)
        } else {
            (ROUTE_METRIC, GRACEFUL_METRIC)
        };
        self.handle
            .route()
            .add(self.route_message(ip, metric))
            .replace()
            .execute()
            .await
            .map_err(|e| NetlinkError::from_rtnetlink(Operation::AddRoute, self.subject(ip), e))?;
        self.delete(ip, other).await
    }

    /// Deletes the host route for `ip` (ours only: the protocol must match), whichever metric it
    /// has. A missing route is fine.
    pub async fn withdraw(&self, ip: IpAddr) -> Result<(), NetlinkError> {
        self.delete(ip, ROUTE_METRIC).await?;
        self.delete(ip, GRACEFUL_METRIC).await
    }

    async fn delete(&self, ip: IpAddr, metric: u32) -> Result<(), NetlinkError> {
        match self
            .handle
            .route()
            .del(self.route_message(ip, metric))
            .execute()
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if errno_of(&e) == Some(ESRCH) => Ok(()),
            Err(e) => Err(NetlinkError::from_rtnetlink(
                Operation::DeleteRoute,
                self.subject(ip),
                e,
            )),
        }
    }

    /// Destinations of every route in the table with protocol
    /// [`RTPROT_RINGMAIL`], IPv4 first.
    pub async fn list(&self) -> Result<Vec<IpAddr>, NetlinkError> {
        let mut out = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut query = RouteMessage::default();
            query.header.address_family = family;
            let routes: Vec<RouteMessage> = self
                .handle
                .route()
                .get(query)
                .execute()
                .try_collect()
                .await
                .map_err(|e| {
                    NetlinkError::from_rtnetlink(
                        Operation::ListRoutes,
                        format!("table {}", self.table),
                        e,
                    )
                })?;
            for r in routes {
                if r.header.protocol != RouteProtocol::from(RTPROT_RINGMAIL)
                    || route_table(&r) != self.table
                {
                    continue;
                }
                let dst = r.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Destination(RouteAddress::Inet(v4)) => Some(IpAddr::V4(*v4)),
                    RouteAttribute::Destination(RouteAddress::Inet6(v6)) => Some(IpAddr::V6(*v6)),
                    _ => None,
                });
                if let Some(ip) = dst
                    && r.header.destination_prefix_length == host_prefix(ip)
                {
                    out.push(ip);
                }
            }
        }
        Ok(out)
    }

    /// Deletes every route with protocol [`RTPROT_RINGMAIL`] in the table
    /// (leftovers of a crashed run at start, everything at exit). Returns
    /// how many were deleted.
    pub async fn flush(&self) -> Result<usize, NetlinkError> {
        let ips = self.list().await?;
        for &ip in &ips {
            self.withdraw(ip).await?;
        }
        Ok(ips.len())
    }
}

fn route_table(r: &RouteMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(r.header.table))
}
