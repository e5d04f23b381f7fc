//! The kernel's side: the notification socket, the dumps, and kernel messages read into
//! [`Event`]s.
//!
//! Notifications are read from a socket of our own rather than through netlink-proto, for
//! two reasons. After an overflow the kernel has dropped notifications, and those still
//! queued are older than the loss: replayed on a fresh dump they would bring back what the
//! lost ones removed, so the backlog is thrown away before the dump ([`resync`]). And link
//! messages are read for their header only: netlink-packet-route fails on some link
//! attributes of some kernels, and an unread link deletion would leave stale entries.
//! Dumps go over a second socket: netlink-proto matches replies by sequence number, and a
//! notification carries the sequence number of whoever made the change.

use std::{io, net::IpAddr, sync::Arc};

use futures::TryStreamExt;
use nix::errno::Errno;
use rtnetlink::{
    RouteMessageBuilder,
    constants::{RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_ROUTE, RTMGRP_LINK, RTMGRP_NEIGH},
    packet_core::{NLM_F_REPLACE, NetlinkBuffer, NetlinkMessage, NetlinkPayload},
    packet_route::{
        AddressFamily, RouteNetlinkMessage,
        neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage},
        route::{RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteType},
    },
    sys::{AsyncSocket, AsyncSocketExt, SocketAddr, TokioSocket, protocols::NETLINK_ROUTE},
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

use super::{Event, InterfacesError, Neighbour, Route, Shared, Table};

/// The notification groups: links, IPv4 and IPv6 routes, neighbours.
const GROUPS: u32 = RTMGRP_LINK | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE | RTMGRP_NEIGH;

/// The receive buffer asked for, as iproute2 does (the kernel caps it at `net.core.rmem_max`).
const RECEIVE_BUFFER: i32 = 1 << 20;

/// Datagrams applied under one write lock, so that readers get in during long bursts.
pub(super) const BATCH: usize = 256;

// linux/rtnetlink.h
const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_NEWNEIGH: u16 = 28;
const RTM_DELNEIGH: u16 = 29;
// linux/if.h
const IFF_UP: u32 = 1;

/// The task that keeps the table current.
pub(super) struct Follower {
    shared: Arc<Shared>,
    subscription: Subscription,
    requests: Requests,
}

/// The socket for dumps, and its connection's task (aborted when dropped).
pub(super) struct Requests {
    handle: rtnetlink::Handle,
    task: JoinHandle<()>,
}

/// The notification socket.
pub(super) struct Subscription {
    socket: TokioSocket,
}

/// One read of the notification socket.
#[derive(Debug, PartialEq)]
pub(super) enum Received {
    /// What one datagram says.
    Events(Vec<Event>),
    /// Notifications were lost: the socket's buffer overflowed (ENOBUFS), or one did not
    /// parse.
    Lost,
}

/// What applying a batch of datagrams did.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Batch {
    pub(super) changed: bool,
    pub(super) lost: bool,
}

// === impl Follower ===

impl Follower {
    pub(super) fn new(shared: Arc<Shared>, subscription: Subscription, requests: Requests) -> Self {
        Self {
            shared,
            subscription,
            requests,
        }
    }

    pub(super) async fn run(mut self, shutdown: CancellationToken) {
        let result = tokio::select! {
            biased;
            () = shutdown.cancelled() => Ok(()),
            result = self.follow() => result,
        };
        match result {
            Ok(()) => debug!("stopped"),
            Err(error) => error!(%error, "no longer following the node's routes and neighbours"),
        }
    }

    async fn follow(&mut self) -> Result<(), InterfacesError> {
        loop {
            let first = self.subscription.next().await?;
            // Read before the lock is taken, so that readers wait for no system call.
            let received = gather(first, || self.subscription.try_next(), BATCH)?;
            let batch = apply(&mut self.shared.table.write(), received);
            if batch.changed {
                self.shared.bump();
            }
            if batch.lost {
                warn!("netlink notifications were lost: reading all routes and neighbours again");
                let table = resync(&self.requests, &mut self.subscription).await?;
                *self.shared.table.write() = table;
                self.shared.bump();
            }
        }
    }
}

impl Drop for Follower {
    // Also when the task is dropped unfinished, with its runtime.
    fn drop(&mut self) {
        self.shared.stopped.cancel();
    }
}

// === impl Requests ===

impl Requests {
    /// A netlink socket for requests, in the calling thread's network namespace.
    pub(super) fn open() -> Result<Self, InterfacesError> {
        let (connection, handle, _) =
            rtnetlink::new_connection().map_err(InterfacesError::Socket)?;
        Ok(Self {
            handle,
            task: tokio::spawn(connection),
        })
    }
}

impl Drop for Requests {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// === impl Subscription ===

impl Subscription {
    /// A socket subscribed to [`GROUPS`], in the calling thread's network namespace.
    pub(super) fn open() -> Result<Self, InterfacesError> {
        let mut socket = TokioSocket::new(NETLINK_ROUTE).map_err(InterfacesError::Socket)?;
        let raw = socket.socket_mut();
        raw.bind(&SocketAddr::new(0, GROUPS))
            .map_err(InterfacesError::Socket)?;
        // Fewer overflows in bursts, as when many pods start at once.
        if let Err(error) = raw.set_rx_buf_sz(RECEIVE_BUFFER) {
            debug!(%error, "netlink receive buffer left at its default size");
        }
        Ok(Self { socket })
    }

    /// The next datagram, when it comes.
    async fn next(&mut self) -> Result<Received, InterfacesError> {
        received(self.socket.recv_from_full().await)
    }

    /// The next datagram, if one is queued.
    fn try_next(&mut self) -> Result<Option<Received>, InterfacesError> {
        match self.socket.socket_ref().recv_from_full() {
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => Ok(None),
            result => received(result).map(Some),
        }
    }

    /// Throws away what is queued, and the overflow error; how many datagrams that was.
    fn discard(&mut self) -> Result<usize, InterfacesError> {
        // Truncated reads are fine here.
        let mut buffer = Vec::with_capacity(1 << 16);
        let mut count = 0;
        loop {
            buffer.clear();
            match self.socket.socket_ref().recv(&mut buffer, 0) {
                Ok(_) => count += 1,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return Ok(count),
                Err(error) if error.raw_os_error() == Some(Errno::ENOBUFS as i32) => {}
                Err(error) => return Err(InterfacesError::Receive(error)),
            }
        }
    }
}

/// A read of the notification socket, as events.
fn received(result: io::Result<(Vec<u8>, SocketAddr)>) -> Result<Received, InterfacesError> {
    match result {
        // Only the kernel (port 0) speaks for the kernel.
        Ok((datagram, from)) if from.port_number() == 0 => Ok(parse(&datagram)),
        Ok(_) => Ok(Received::Events(Vec::new())),
        Err(error) if error.raw_os_error() == Some(Errno::ENOBUFS as i32) => Ok(Received::Lost),
        Err(error) => Err(InterfacesError::Receive(error)),
    }
}

/// `first` and what else is queued (`more`): at most `limit` datagrams, up to a loss.
pub(super) fn gather(
    first: Received,
    mut more: impl FnMut() -> Result<Option<Received>, InterfacesError>,
    limit: usize,
) -> Result<Vec<Received>, InterfacesError> {
    let mut received = vec![first];
    while received.len() < limit && received.last() != Some(&Received::Lost) {
        match more()? {
            Some(next) => received.push(next),
            None => break,
        }
    }
    Ok(received)
}

/// Applies datagrams in order, stopping at a loss (which calls for a [`resync`]).
pub(super) fn apply(table: &mut Table, received: Vec<Received>) -> Batch {
    let mut batch = Batch::default();
    for received in received {
        let Received::Events(events) = received else {
            batch.lost = true;
            break;
        };
        for event in events {
            batch.changed |= table.apply(event);
        }
    }
    batch
}

/// Reads the kernel's host routes and neighbours whole, after throwing away the queued
/// notifications: they are older than the dump, and after a loss they may lack the messages
/// that undid them. What queues during the dump may be newer than parts of it, so it is
/// applied on top: in order, it ends where the kernel is.
pub(super) async fn resync(
    requests: &Requests,
    subscription: &mut Subscription,
) -> Result<Table, InterfacesError> {
    loop {
        let discarded = subscription.discard()?;
        debug!(discarded, "reading all routes and neighbours");
        let mut table = dump(&requests.handle).await?;
        let queued = gather(
            Received::Events(Vec::new()),
            || subscription.try_next(),
            BATCH * 16,
        )?;
        if !apply(&mut table, queued).lost {
            return Ok(table);
        }
        warn!("netlink notifications were lost while reading the tables: reading again");
    }
}

/// The kernel's host routes and neighbours, as a table.
async fn dump(handle: &rtnetlink::Handle) -> Result<Table, InterfacesError> {
    let routes = |source| InterfacesError::Dump {
        what: "routes",
        source,
    };
    let neighbours = |source| InterfacesError::Dump {
        what: "neighbours",
        source,
    };
    let mut table = Table::default();
    let v4 = RouteMessageBuilder::<std::net::Ipv4Addr>::default().build();
    let v6 = RouteMessageBuilder::<std::net::Ipv6Addr>::default().build();
    for request in [v4, v6] {
        let mut stream = handle.route().get(request).execute();
        while let Some(message) = stream.try_next().await.map_err(routes)? {
            if let Some(event) = event(&RouteNetlinkMessage::NewRoute(message), 0) {
                table.apply(event);
            }
        }
    }
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        let request = handle.neighbours().get().set_address_family(family);
        let mut stream = request.execute();
        while let Some(message) = stream.try_next().await.map_err(neighbours)? {
            if let Some(event) = event(&RouteNetlinkMessage::NewNeighbour(message), 0) {
                table.apply(event);
            }
        }
    }
    Ok(table)
}

/// The events of one datagram. A message of interest that does not parse makes it
/// [`Received::Lost`].
pub(super) fn parse(datagram: &[u8]) -> Received {
    let mut events = Vec::new();
    let mut rest = datagram;
    while !rest.is_empty() {
        let Ok(message) = NetlinkBuffer::new_checked(rest) else {
            warn!(
                bytes = rest.len(),
                "a netlink datagram ends in a malformed message"
            );
            return Received::Lost;
        };
        let len = message.length() as usize;
        let kind = message.message_type();
        let bytes = rest.get(..len).unwrap_or_default();
        match notification(kind, bytes, message.payload()) {
            Ok(event) => events.extend(event),
            Err(error) => {
                warn!(%error, kind, "a netlink notification that does not parse");
                return Received::Lost;
            }
        }
        // Messages start 4-byte aligned.
        rest = rest.get(len.next_multiple_of(4)..).unwrap_or_default();
    }
    Received::Events(events)
}

/// What one notification (`bytes`, of which `payload` follows the header) says.
fn notification(kind: u16, bytes: &[u8], payload: &[u8]) -> Result<Option<Event>, String> {
    match kind {
        RTM_NEWLINK | RTM_DELLINK => {
            // struct ifinfomsg: family, pad, type (u16), index (i32), flags (u32), change.
            let field = |at: usize| {
                let field = payload.get(at..at + 4)?;
                Some(u32::from_ne_bytes(field.try_into().ok()?))
            };
            let (Some(ifindex), Some(flags)) = (field(4), field(8)) else {
                return Err(format!("a link message of {} bytes", payload.len()));
            };
            Ok(if kind == RTM_DELLINK {
                Some(Event::LinkGone { ifindex })
            } else if flags & IFF_UP == 0 {
                Some(Event::LinkDown { ifindex })
            } else {
                None
            })
        }
        RTM_NEWROUTE | RTM_DELROUTE | RTM_NEWNEIGH | RTM_DELNEIGH => {
            let message = NetlinkMessage::<RouteNetlinkMessage>::deserialize(bytes)
                .map_err(|error| error.to_string())?;
            Ok(match &message.payload {
                NetlinkPayload::InnerMessage(inner) => event(inner, message.header.flags),
                _ => None,
            })
        }
        _ => Ok(None),
    }
}

/// What a route or neighbour message (with its netlink header's flags) says, if anything.
pub(super) fn event(message: &RouteNetlinkMessage, flags: u16) -> Option<Event> {
    match message {
        RouteNetlinkMessage::NewRoute(m) => host_route(m).map(|(ip, route)| Event::Route {
            ip,
            route,
            replace: flags & NLM_F_REPLACE != 0,
        }),
        RouteNetlinkMessage::DelRoute(m) => {
            host_route(m).map(|(ip, route)| Event::RouteGone { ip, route })
        }
        RouteNetlinkMessage::NewNeighbour(m) => {
            let (ip, ifindex, mac) = neighbour(m)?;
            Some(match mac {
                Some(mac) => Event::Neighbour {
                    ip,
                    neighbour: Neighbour { ifindex, mac },
                },
                None => Event::NeighbourGone { ip, ifindex },
            })
        }
        RouteNetlinkMessage::DelNeighbour(m) => {
            let (ip, ifindex, _) = neighbour(m)?;
            Some(Event::NeighbourGone { ip, ifindex })
        }
        _ => None,
    }
}

/// A unicast host route of the main table with one output interface.
fn host_route(message: &RouteMessage) -> Option<(IpAddr, Route)> {
    let header = &message.header;
    let host = match header.address_family {
        AddressFamily::Inet => 32,
        AddressFamily::Inet6 => 128,
        _ => return None,
    };
    // Cloned entries are IPv6 exceptions (PMTU, redirects), not routes; a source-specific
    // route holds for some senders only.
    if header.destination_prefix_length != host
        || header.source_prefix_length != 0
        || header.kind != RouteType::Unicast
        || header.flags.contains(RouteFlags::Cloned)
    {
        return None;
    }
    // Tables above 255 are in the attribute only.
    let mut table = u32::from(header.table);
    let (mut ip, mut ifindex, mut priority) = (None, None, 0);
    for attribute in &message.attributes {
        match attribute {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(RouteAddress::Inet(v4)) => ip = Some(IpAddr::V4(*v4)),
            RouteAttribute::Destination(RouteAddress::Inet6(v6)) => ip = Some(IpAddr::V6(*v6)),
            RouteAttribute::Oif(index) => ifindex = Some(*index),
            RouteAttribute::Priority(p) => priority = *p,
            _ => {}
        }
    }
    if table != u32::from(RouteHeader::RT_TABLE_MAIN) {
        return None;
    }
    // A multipath route has no single output interface, and is no pod's.
    Some((
        ip?,
        Route {
            ifindex: ifindex?,
            priority,
        },
    ))
}

/// An IPv4 or IPv6 neighbour entry: its address, interface, and Ethernet address if it has
/// one (failed and incomplete entries do not).
fn neighbour(message: &NeighbourMessage) -> Option<(IpAddr, u32, Option<[u8; 6]>)> {
    // Proxy entries answer for addresses that live elsewhere; bridge (FDB) entries have no IP.
    if message.header.flags.contains(NeighbourFlags::Proxy)
        || !matches!(
            message.header.family,
            AddressFamily::Inet | AddressFamily::Inet6
        )
    {
        return None;
    }
    let (mut ip, mut mac) = (None, None);
    for attribute in &message.attributes {
        match attribute {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                ip = Some(IpAddr::V4(*v4));
            }
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                ip = Some(IpAddr::V6(*v6));
            }
            NeighbourAttribute::LinkLayerAddress(bytes) => {
                mac = <[u8; 6]>::try_from(bytes.as_slice()).ok();
            }
            _ => {}
        }
    }
    // Multicast entries (NOARP, derived MACs) are no pod's.
    let ip = ip.filter(|ip| !ip.is_multicast())?;
    Some((ip, message.header.ifindex, mac))
}
