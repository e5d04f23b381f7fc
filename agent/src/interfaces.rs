//! Where each pod address on the node lives: the host interface it sits behind, learnt from
//! the kernel over rtnetlink and kept current by the kernel's notifications (no polling).
//!
//! Data model: two tables keyed by IP. Routed CNIs (Calico, the AWS VPC CNI) give each pod
//! a host route (`IP/32`, `IP/128`) in the main table out of its veth: a
//! [`Location::Route`]. Bridged CNIs leave a neighbour (ARP/NDP) entry: the bridge's index
//! and the pod's MAC, a [`Location::Neighbour`]. When both exist the route wins: a host
//! route to a veth is the stronger statement.
//!
//! Why: a pod that takes over the IP of a deleted pod arrives on a new veth (a new interface
//! index) or with a new MAC, so binding a pod to where its IP lived when first seen catches
//! IP reuse on the node, before the Kubernetes API says anything.
//!
//! The kernel does not announce everything: the IPv4 routes of an interface vanish silently
//! when it goes down or away, so link events clear them here. When notifications are lost
//! (a full socket buffer), both tables are read again whole (see `interfaces/kernel.rs`).

use std::{collections::HashMap, net::IpAddr, sync::Arc};

use parking_lot::RwLock;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug};

mod kernel;

/// Where an address lives on the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Location {
    /// Behind a host route (`/32`, `/128`) of the main table (routed CNIs).
    Route {
        /// The route's output interface: the pod's veth.
        ifindex: u32,
    },
    /// Behind a neighbour (ARP or NDP) entry (bridged CNIs).
    Neighbour {
        /// The entry's interface, typically the bridge.
        ifindex: u32,
        /// The entry's link-layer (Ethernet) address.
        mac: [u8; 6],
    },
}

/// The node's pod addresses and where each lives, following the kernel. Cheap to clone:
/// clones share one table.
#[derive(Clone, Debug)]
pub struct Interfaces {
    shared: Arc<Shared>,
}

/// Why [`Interfaces`] could not start, or stopped following the kernel.
#[derive(Debug, thiserror::Error)]
pub enum InterfacesError {
    /// No netlink socket, or not subscribed.
    #[error("opening a netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    /// The kernel did not list its routes or neighbours.
    #[error("listing {what} over netlink: {source}")]
    Dump {
        /// `routes` or `neighbours`.
        what: &'static str,
        /// The netlink error.
        #[source]
        source: rtnetlink::Error,
    },
    /// Reading notifications failed (not an overflow, which is handled).
    #[error("reading netlink notifications: {0}")]
    Receive(#[source] std::io::Error),
}

#[derive(Debug)]
struct Shared {
    table: RwLock<Table>,
    changes: watch::Sender<u64>,
    /// Cancelled once the table no longer follows the kernel.
    stopped: CancellationToken,
}

/// The kernel's host routes and neighbour entries by address: a plain synchronous index.
#[derive(Debug, Default, PartialEq)]
struct Table {
    /// Host routes, lowest metric first, older first among equals: the kernel uses the first.
    routes: HashMap<IpAddr, Vec<Route>>,
    /// Neighbour entries, one per interface, the most recently changed last.
    neighbours: HashMap<IpAddr, Vec<Neighbour>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Route {
    ifindex: u32,
    priority: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Neighbour {
    ifindex: u32,
    mac: [u8; 6],
}

/// What one kernel message says about locations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Event {
    /// A host route was added, or replaced the route of its metric.
    Route {
        ip: IpAddr,
        route: Route,
        replace: bool,
    },
    /// A host route was deleted.
    RouteGone { ip: IpAddr, route: Route },
    /// A neighbour entry was added or changed.
    Neighbour { ip: IpAddr, neighbour: Neighbour },
    /// A neighbour entry was deleted, or lost its link-layer address (failed, incomplete).
    NeighbourGone { ip: IpAddr, ifindex: u32 },
    /// An interface went down: the kernel drops its IPv4 routes without a notification.
    LinkDown { ifindex: u32 },
    /// An interface was deleted or left the namespace: everything on it goes.
    LinkGone { ifindex: u32 },
}

// === impl Interfaces ===

impl Interfaces {
    /// Opens netlink sockets in the calling thread's network namespace, subscribes to link,
    /// IPv4/IPv6 route and neighbour notifications, reads the current host routes (main
    /// table, unicast, `/32` and `/128`) and neighbours, and keeps the table current from
    /// the notifications until `shutdown` is cancelled. Returns once the initial read is in.
    pub async fn start(shutdown: CancellationToken) -> Result<Self, InterfacesError> {
        // Both sockets are made here, in the caller's namespace; the task only uses them.
        let mut subscription = kernel::Subscription::open()?;
        let requests = kernel::Requests::open()?;
        let table = kernel::resync(&requests, &mut subscription).await?;
        debug!(
            routes = table.routes.len(),
            neighbours = table.neighbours.len(),
            "read the node's host routes and neighbours"
        );
        let interfaces = Self::with(table);
        let follower = kernel::Follower::new(interfaces.shared.clone(), subscription, requests);
        tokio::spawn(
            follower
                .run(shutdown)
                .instrument(tracing::info_span!("interfaces")),
        );
        Ok(interfaces)
    }

    /// A fixed table, for tests and agents run without netlink; change it with [`Self::set`].
    pub fn from_static(entries: impl IntoIterator<Item = (IpAddr, Location)>) -> Self {
        let mut table = Table::default();
        for (ip, location) in entries {
            table.set(ip, Some(location));
        }
        Self::with(table)
    }

    fn with(table: Table) -> Self {
        Self {
            shared: Arc::new(Shared {
                table: RwLock::new(table),
                changes: watch::Sender::new(0),
                stopped: CancellationToken::new(),
            }),
        }
    }

    /// Sets (or with `None` removes) where `ip` lives, by hand, and signals [`Self::changes`]
    /// if that changed its location. Meant for [`Self::from_static`] tables: on one that
    /// follows the kernel, the next notification about `ip` overrides it.
    pub fn set(&self, ip: IpAddr, location: Option<Location>) {
        let changed = self.shared.table.write().set(ip, location);
        if changed {
            self.shared.bump();
        }
    }

    /// Where `ip` lives now, if anywhere known: a read lock and a map lookup.
    pub fn locate(&self, ip: IpAddr) -> Option<Location> {
        self.shared.table.read().locate(ip)
    }

    /// A receiver that is marked changed whenever a location may have changed, for callers
    /// waiting for an address's location to appear or settle.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.shared.changes.subscribe()
    }

    /// Whether the table still follows the kernel (always true for a static table). False
    /// once the netlink task has ended: after `shutdown`, or on an error (logged).
    pub fn healthy(&self) -> bool {
        !self.shared.stopped.is_cancelled()
    }

    /// Resolves when the table no longer follows the kernel (never for a static table).
    pub async fn stopped(&self) {
        self.shared.stopped.cancelled().await;
    }
}

// === impl Shared ===

impl Shared {
    fn bump(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }
}

// === impl Table ===

impl Table {
    fn locate(&self, ip: IpAddr) -> Option<Location> {
        if let Some(route) = self.routes.get(&ip).and_then(|routes| routes.first()) {
            return Some(Location::Route {
                ifindex: route.ifindex,
            });
        }
        let neighbour = self.neighbours.get(&ip)?.last()?;
        Some(Location::Neighbour {
            ifindex: neighbour.ifindex,
            mac: neighbour.mac,
        })
    }

    /// Replaces whatever is known of `ip`; whether its location changed.
    fn set(&mut self, ip: IpAddr, location: Option<Location>) -> bool {
        let before = self.locate(ip);
        self.routes.remove(&ip);
        self.neighbours.remove(&ip);
        match location {
            Some(Location::Route { ifindex }) => {
                self.routes.insert(
                    ip,
                    vec![Route {
                        ifindex,
                        priority: 0,
                    }],
                );
            }
            Some(Location::Neighbour { ifindex, mac }) => {
                self.neighbours.insert(ip, vec![Neighbour { ifindex, mac }]);
            }
            None => {}
        }
        before != location
    }

    /// Applies one event; whether the table changed.
    fn apply(&mut self, event: Event) -> bool {
        match event {
            Event::Route { ip, route, replace } => {
                let routes = self.routes.entry(ip).or_default();
                let len = routes.len();
                if replace {
                    routes.retain(|r| r.priority != route.priority || *r == route);
                }
                let mut changed = routes.len() != len;
                if !routes.contains(&route) {
                    let at = routes.partition_point(|r| r.priority <= route.priority);
                    routes.insert(at, route);
                    changed = true;
                }
                changed
            }
            Event::RouteGone { ip, route } => remove(&mut self.routes, ip, |r| *r == route),
            Event::Neighbour { ip, neighbour } => {
                let entries = self.neighbours.entry(ip).or_default();
                if entries.contains(&neighbour) {
                    return false;
                }
                entries.retain(|n| n.ifindex != neighbour.ifindex);
                entries.push(neighbour);
                true
            }
            Event::NeighbourGone { ip, ifindex } => {
                remove(&mut self.neighbours, ip, |n| n.ifindex == ifindex)
            }
            Event::LinkDown { ifindex } => {
                let mut changed = false;
                self.routes.retain(|ip, routes| {
                    if ip.is_ipv4() {
                        let len = routes.len();
                        routes.retain(|r| r.ifindex != ifindex);
                        changed |= routes.len() != len;
                    }
                    !routes.is_empty()
                });
                changed
            }
            Event::LinkGone { ifindex } => {
                let routes = remove_all(&mut self.routes, |r| r.ifindex == ifindex);
                let neighbours = remove_all(&mut self.neighbours, |n| n.ifindex == ifindex);
                routes || neighbours
            }
        }
    }
}

/// Removes the entries of `ip` that match, and `ip` itself once it has none; whether any went.
fn remove<T>(map: &mut HashMap<IpAddr, Vec<T>>, ip: IpAddr, gone: impl Fn(&T) -> bool) -> bool {
    let Some(entries) = map.get_mut(&ip) else {
        return false;
    };
    let len = entries.len();
    entries.retain(|e| !gone(e));
    let changed = entries.len() != len;
    if entries.is_empty() {
        map.remove(&ip);
    }
    changed
}

/// Removes the matching entries of every address; whether any went.
fn remove_all<T>(map: &mut HashMap<IpAddr, Vec<T>>, gone: impl Fn(&T) -> bool) -> bool {
    let mut changed = false;
    map.retain(|_, entries| {
        let len = entries.len();
        entries.retain(|e| !gone(e));
        changed |= entries.len() != len;
        !entries.is_empty()
    });
    changed
}

#[cfg(test)]
mod tests;
