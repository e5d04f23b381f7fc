use std::net::IpAddr;

use rtnetlink::{
    packet_core::{NLM_F_REPLACE, NetlinkMessage},
    packet_route::{
        AddressFamily, RouteNetlinkMessage,
        link::{LinkFlags, LinkMessage},
        neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage},
        route::{RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteType},
    },
};

use super::{
    kernel::{Batch, Received, apply, event, gather, parse},
    *,
};

const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 0xa];
const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 0xb];

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn route(ip_: &str, ifindex: u32, priority: u32) -> Event {
    Event::Route {
        ip: ip(ip_),
        route: Route { ifindex, priority },
        replace: false,
    }
}

fn neighbour(ip_: &str, ifindex: u32, mac: [u8; 6]) -> Event {
    Event::Neighbour {
        ip: ip(ip_),
        neighbour: Neighbour { ifindex, mac },
    }
}

fn table(events: impl IntoIterator<Item = Event>) -> Table {
    let mut table = Table::default();
    for event in events {
        table.apply(event);
    }
    table
}

/// A host route message as the kernel sends it for `ip route add IP dev IFINDEX`.
fn mk_route(ip_: &str, ifindex: u32) -> RouteMessage {
    let ip = ip(ip_);
    let mut m = RouteMessage::default();
    m.header.address_family = if ip.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    m.header.destination_prefix_length = if ip.is_ipv4() { 32 } else { 128 };
    m.header.table = RouteHeader::RT_TABLE_MAIN;
    m.header.kind = RouteType::Unicast;
    m.attributes.push(RouteAttribute::Table(254));
    m.attributes.push(RouteAttribute::Destination(ip.into()));
    m.attributes.push(RouteAttribute::Oif(ifindex));
    m
}

fn mk_neighbour(ip_: &str, ifindex: u32, lladdr: Option<&[u8]>) -> NeighbourMessage {
    let ip = ip(ip_);
    let mut m = NeighbourMessage::default();
    m.header.family = if ip.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    m.header.ifindex = ifindex;
    m.attributes.push(NeighbourAttribute::Destination(match ip {
        IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
        IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
    }));
    if let Some(lladdr) = lladdr {
        m.attributes
            .push(NeighbourAttribute::LinkLayerAddress(lladdr.to_vec()));
    }
    m
}

fn mk_link(index: u32, up: bool) -> LinkMessage {
    let mut m = LinkMessage::default();
    m.header.index = index;
    if up {
        m.header.flags = LinkFlags::Up;
    }
    m
}

#[test]
fn route_wins_over_neighbour() {
    let mut t = table([neighbour("198.18.0.5", 3, MAC_A)]);
    assert_eq!(
        t.locate(ip("198.18.0.5")),
        Some(Location::Neighbour {
            ifindex: 3,
            mac: MAC_A
        })
    );
    assert!(t.apply(route("198.18.0.5", 7, 0)));
    assert_eq!(
        t.locate(ip("198.18.0.5")),
        Some(Location::Route { ifindex: 7 })
    );
    // The route goes: the neighbour entry is where the address lives again.
    assert!(t.apply(Event::RouteGone {
        ip: ip("198.18.0.5"),
        route: Route {
            ifindex: 7,
            priority: 0
        },
    }));
    assert_eq!(
        t.locate(ip("198.18.0.5")),
        Some(Location::Neighbour {
            ifindex: 3,
            mac: MAC_A
        })
    );
}

#[test]
fn link_gone_removes_its_routes_and_neighbours() {
    let mut t = table([
        route("198.18.0.5", 5, 0),
        route("2001:db8::5", 5, 1024),
        neighbour("198.18.1.7", 5, MAC_A),
        route("198.18.0.6", 6, 0),
        neighbour("198.18.1.8", 6, MAC_B),
    ]);
    assert!(t.apply(Event::LinkGone { ifindex: 5 }));
    assert_eq!(
        t,
        table([route("198.18.0.6", 6, 0), neighbour("198.18.1.8", 6, MAC_B)])
    );
    assert!(
        !t.apply(Event::LinkGone { ifindex: 5 }),
        "nothing left to remove"
    );
}

#[test]
fn link_down_drops_only_ipv4_routes() {
    // The kernel flushes IPv4 routes of a downed interface silently, but announces the
    // IPv6 ones and the neighbours it drops.
    let mut t = table([
        route("198.18.0.5", 5, 0),
        route("2001:db8::5", 5, 1024),
        neighbour("198.18.1.7", 5, MAC_A),
    ]);
    assert!(t.apply(Event::LinkDown { ifindex: 5 }));
    assert_eq!(t.locate(ip("198.18.0.5")), None);
    assert_eq!(
        t.locate(ip("2001:db8::5")),
        Some(Location::Route { ifindex: 5 })
    );
    assert!(t.locate(ip("198.18.1.7")).is_some());
    assert!(!t.apply(Event::LinkDown { ifindex: 5 }));
}

#[test]
fn lowest_metric_then_oldest_route_wins() {
    let mut t = table([route("198.18.0.5", 5, 100), route("198.18.0.5", 6, 100)]);
    // An appended route of the same metric is not used while the first exists.
    assert_eq!(
        t.locate(ip("198.18.0.5")),
        Some(Location::Route { ifindex: 5 })
    );
    t.apply(route("198.18.0.5", 7, 10));
    assert_eq!(
        t.locate(ip("198.18.0.5")),
        Some(Location::Route { ifindex: 7 })
    );
    assert!(
        !t.apply(route("198.18.0.5", 7, 10)),
        "a repeat changes nothing"
    );
}

#[test]
fn replace_takes_the_place_of_the_route_of_its_metric() {
    let mut t = table([route("198.18.0.5", 5, 0), route("198.18.0.5", 9, 50)]);
    let replace = |ifindex| Event::Route {
        ip: ip("198.18.0.5"),
        route: Route {
            ifindex,
            priority: 0,
        },
        replace: true,
    };
    assert!(t.apply(replace(6)));
    assert_eq!(
        t.locate(ip("198.18.0.5")),
        Some(Location::Route { ifindex: 6 })
    );
    assert!(!t.apply(replace(6)));
    // Deleting the replacement leaves the other metric's route, not the replaced one.
    t.apply(Event::RouteGone {
        ip: ip("198.18.0.5"),
        route: Route {
            ifindex: 6,
            priority: 0,
        },
    });
    assert_eq!(
        t.locate(ip("198.18.0.5")),
        Some(Location::Route { ifindex: 9 })
    );
}

#[test]
fn neighbour_changes() {
    let mut t = table([neighbour("198.18.1.7", 3, MAC_A)]);
    assert!(
        !t.apply(neighbour("198.18.1.7", 3, MAC_A)),
        "state changes only"
    );
    assert!(t.apply(neighbour("198.18.1.7", 3, MAC_B)));
    assert_eq!(
        t.locate(ip("198.18.1.7")),
        Some(Location::Neighbour {
            ifindex: 3,
            mac: MAC_B
        })
    );
    // The same address on a second interface: the latest statement wins, and its removal
    // leaves the first.
    t.apply(neighbour("198.18.1.7", 4, MAC_A));
    assert_eq!(
        t.locate(ip("198.18.1.7")),
        Some(Location::Neighbour {
            ifindex: 4,
            mac: MAC_A
        })
    );
    assert!(t.apply(Event::NeighbourGone {
        ip: ip("198.18.1.7"),
        ifindex: 4
    }));
    assert_eq!(
        t.locate(ip("198.18.1.7")),
        Some(Location::Neighbour {
            ifindex: 3,
            mac: MAC_B
        })
    );
    t.apply(Event::NeighbourGone {
        ip: ip("198.18.1.7"),
        ifindex: 3,
    });
    assert_eq!(t, Table::default(), "no empty entries left behind");
}

#[test]
fn route_messages() {
    let new = |m: RouteMessage, flags| event(&RouteNetlinkMessage::NewRoute(m), flags);
    assert_eq!(
        new(mk_route("198.18.0.5", 4), 0),
        Some(route("198.18.0.5", 4, 0))
    );
    let mut v6 = mk_route("2001:db8::5", 4);
    v6.attributes.push(RouteAttribute::Priority(1024));
    assert_eq!(new(v6, 0), Some(route("2001:db8::5", 4, 1024)));
    assert_eq!(
        new(mk_route("198.18.0.5", 4), NLM_F_REPLACE),
        Some(Event::Route {
            ip: ip("198.18.0.5"),
            route: Route {
                ifindex: 4,
                priority: 0
            },
            replace: true,
        })
    );
    assert_eq!(
        event(&RouteNetlinkMessage::DelRoute(mk_route("198.18.0.5", 4)), 0),
        Some(Event::RouteGone {
            ip: ip("198.18.0.5"),
            route: Route {
                ifindex: 4,
                priority: 0
            },
        })
    );

    // Not host routes of the main table with one interface.
    let mut subnet = mk_route("198.18.0.0", 4);
    subnet.header.destination_prefix_length = 24;
    let mut local = mk_route("198.18.0.5", 4);
    local.header.kind = RouteType::Local;
    let mut other_table = mk_route("198.18.0.5", 4);
    other_table.header.table = 252;
    other_table.attributes[0] = RouteAttribute::Table(1000);
    let mut cloned = mk_route("2001:db8::5", 4);
    cloned.header.flags = RouteFlags::Cloned;
    let mut multipath = mk_route("198.18.0.5", 4);
    multipath
        .attributes
        .retain(|a| !matches!(a, RouteAttribute::Oif(_)));
    let mut from = mk_route("2001:db8::5", 4);
    from.header.source_prefix_length = 64;
    for m in [subnet, local, other_table, cloned, multipath, from] {
        assert_eq!(new(m.clone(), 0), None, "{m:?}");
    }
}

#[test]
fn neighbour_messages() {
    let new = |m| event(&RouteNetlinkMessage::NewNeighbour(m), 0);
    assert_eq!(
        new(mk_neighbour("198.18.1.7", 3, Some(&MAC_A))),
        Some(neighbour("198.18.1.7", 3, MAC_A))
    );
    assert_eq!(
        new(mk_neighbour("2001:db8:1::7", 3, Some(&MAC_A))),
        Some(neighbour("2001:db8:1::7", 3, MAC_A))
    );
    // Failed and incomplete entries carry no link-layer address: the address is no longer
    // known to live there.
    let gone = Some(Event::NeighbourGone {
        ip: ip("198.18.1.7"),
        ifindex: 3,
    });
    assert_eq!(new(mk_neighbour("198.18.1.7", 3, None)), gone);
    assert_eq!(new(mk_neighbour("198.18.1.7", 3, Some(&[1; 20]))), gone);
    assert_eq!(
        event(
            &RouteNetlinkMessage::DelNeighbour(mk_neighbour("198.18.1.7", 3, Some(&MAC_A))),
            0
        ),
        gone
    );

    let mut proxy = mk_neighbour("198.18.1.7", 3, None);
    proxy.header.flags = NeighbourFlags::Proxy;
    let mut fdb = mk_neighbour("198.18.1.7", 3, Some(&MAC_A));
    fdb.header.family = AddressFamily::Bridge;
    let multicast = mk_neighbour("ff02::16", 3, Some(&[0x33, 0x33, 0, 0, 0, 0x16]));
    for m in [proxy, fdb, multicast] {
        assert_eq!(new(m.clone()), None, "{m:?}");
    }
}

/// `messages` as the kernel sends them, in one datagram.
fn datagram(messages: impl IntoIterator<Item = RouteNetlinkMessage>) -> Vec<u8> {
    let mut datagram = Vec::new();
    for message in messages {
        let mut message = NetlinkMessage::from(message);
        message.finalize();
        let at = datagram.len();
        datagram.resize(at + message.buffer_len(), 0);
        message.serialize(&mut datagram[at..]);
        datagram.resize(datagram.len().next_multiple_of(4), 0);
    }
    datagram
}

#[test]
fn link_messages_are_read_for_their_header() {
    let received = parse(&datagram([
        RouteNetlinkMessage::NewLink(mk_link(5, true)),
        RouteNetlinkMessage::NewLink(mk_link(5, false)),
        RouteNetlinkMessage::DelLink(mk_link(6, false)),
    ]));
    assert_eq!(
        received,
        Received::Events(vec![
            Event::LinkDown { ifindex: 5 },
            Event::LinkGone { ifindex: 6 }
        ])
    );

    // Attributes netlink-packet-route cannot read do not hide a deletion.
    let mut bytes = datagram([RouteNetlinkMessage::DelLink(mk_link(7, false))]);
    bytes.extend_from_slice(&[8, 0, 0xff, 0x7f, 1, 2, 3]);
    bytes[0] += 7;
    assert_eq!(
        parse(&bytes),
        Received::Events(vec![Event::LinkGone { ifindex: 7 }])
    );
}

#[test]
fn datagrams_that_do_not_parse_are_losses() {
    let route = RouteNetlinkMessage::NewRoute(mk_route("198.18.0.5", 4));
    let good = datagram([route.clone(), route]);
    assert_eq!(
        parse(&good),
        Received::Events(vec![
            route_event("198.18.0.5", 4),
            route_event("198.18.0.5", 4)
        ])
    );
    // A truncated last message, a header alone, a route message with a broken attribute.
    assert_eq!(parse(&good[..good.len() - 3]), Received::Lost);
    assert_eq!(parse(&good[..10]), Received::Lost);
    let mut broken = datagram([RouteNetlinkMessage::NewRoute(mk_route("198.18.0.5", 4))]);
    broken.extend_from_slice(&[3, 0, 1, 0]);
    broken[0] += 4;
    assert_eq!(parse(&broken), Received::Lost);
    assert_eq!(parse(&[]), Received::Events(Vec::new()));
    // Messages of no interest are skipped.
    let mut address = datagram([RouteNetlinkMessage::NewRoute(mk_route("198.18.0.5", 4))]);
    address[4] = 20; // RTM_NEWADDR
    assert_eq!(parse(&address), Received::Events(Vec::new()));
}

fn route_event(ip_: &str, ifindex: u32) -> Event {
    route(ip_, ifindex, 0)
}

#[test]
fn a_batch_stops_at_a_loss() {
    let none = || Received::Events(Vec::new());
    let mut queued = vec![
        Received::Events(vec![route_event("198.18.0.6", 4)]),
        Received::Lost,
        Received::Events(vec![route_event("198.18.0.5", 4)]),
    ];
    let mut more = || Ok(queued.pop());

    let received = gather(none(), &mut more, 100).unwrap();
    assert_eq!(received.len(), 3, "{received:?}");
    let mut t = Table::default();
    assert_eq!(
        apply(&mut t, received),
        Batch {
            changed: true,
            lost: true
        }
    );
    assert!(t.locate(ip("198.18.0.5")).is_some());

    // The limit leaves the rest queued, in order.
    assert_eq!(gather(none(), &mut more, 1).unwrap(), vec![none()]);
    let received = gather(none(), &mut more, 100).unwrap();
    assert_eq!(
        apply(&mut t, received),
        Batch {
            changed: true,
            lost: false
        }
    );
    assert!(t.locate(ip("198.18.0.6")).is_some());
}

#[test]
fn static_table_and_set() {
    let a = Location::Route { ifindex: 4 };
    let b = Location::Neighbour {
        ifindex: 3,
        mac: MAC_A,
    };
    let interfaces = Interfaces::from_static([(ip("198.18.0.5"), a)]);
    assert!(interfaces.healthy());
    let mut changes = interfaces.changes();
    assert_eq!(interfaces.locate(ip("198.18.0.5")), Some(a));

    interfaces.set(ip("198.18.0.5"), Some(a));
    assert!(!changes.has_changed().unwrap(), "same location: no change");
    interfaces.set(ip("198.18.0.5"), Some(b));
    assert!(changes.has_changed().unwrap());
    changes.borrow_and_update();
    assert_eq!(interfaces.locate(ip("198.18.0.5")), Some(b));

    interfaces.clone().set(ip("198.18.0.5"), None);
    assert!(changes.has_changed().unwrap(), "clones share the table");
    assert_eq!(interfaces.locate(ip("198.18.0.5")), None);
}
