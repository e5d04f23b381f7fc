//! [`Interfaces`] against the real kernel (root only): a "node" namespace with veths into two
//! "pod" namespaces and a bridge, changed with `ip` from outside, must show every change in
//! `locate` through netlink notifications alone (waits are on `changes()`, bounded, never
//! sleeps), and must come out right after the kernel dropped notifications for a full
//! socket buffer. No namespace has a route out of the machine; the addresses are from the
//! benchmarking range 198.18.0.0/15 and the documentation range 2001:db8::/32.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::{net::IpAddr, sync::mpsc, thread, time::Duration};

use podiam_agent::interfaces::{Interfaces, Location};
use podiam_tests::netns;
use tokio_util::sync::CancellationToken;

/// How long a change may take to show.
const SETTLE: Duration = Duration::from_secs(5);

const MAC_7: [u8; 6] = [2, 0, 0, 0, 0, 7];
const MAC_8: [u8; 6] = [2, 0, 0, 0, 0, 8];

/// The test's namespaces and the thread that follows the node's; all gone on drop, also
/// after a failed assertion.
struct Lab {
    node: String,
    pods: [String; 2],
    shutdown: CancellationToken,
    thread: Option<thread::JoinHandle<()>>,
    /// Held while the node thread is blocked (see [`Lab::start`]); dropped to resume it.
    blocked: Option<mpsc::Sender<()>>,
}

impl Lab {
    /// Namespaces named for the test (`tag`) and this process.
    fn new(tag: &str) -> Self {
        let id = std::process::id();
        let lab = Lab {
            node: format!("pdm-{tag}-node-{id}"),
            pods: [
                format!("pdm-{tag}-pod1-{id}"),
                format!("pdm-{tag}-pod2-{id}"),
            ],
            shutdown: CancellationToken::new(),
            thread: None,
            blocked: None,
        };
        for name in lab.names() {
            netns::ip(&["netns", "add", name]).unwrap();
        }
        lab.node(&["link", "set", "lo", "up"]);
        lab
    }

    fn names(&self) -> [&str; 3] {
        [&self.node, &self.pods[0], &self.pods[1]]
    }

    /// `ip -n NODE ARGS`.
    fn node(&self, args: &[&str]) {
        netns::ip(&[&["-n", self.node.as_str()][..], args].concat()).unwrap();
    }

    /// `ip -n POD ARGS`.
    fn pod(&self, pod: usize, args: &[&str]) {
        netns::ip(&[&["-n", self.pods[pod].as_str()][..], args].concat()).unwrap();
    }

    /// A veth `NAME` in the node, its peer `PEER` in the pod, both up.
    fn veth(&self, name: &str, pod: usize, peer: &str) -> u32 {
        let pod_ns = self.pods[pod].as_str();
        self.node(&[
            "link", "add", name, "type", "veth", "peer", "name", peer, "netns", pod_ns,
        ]);
        self.node(&["link", "set", name, "up"]);
        self.pod(pod, &["link", "set", peer, "up"]);
        self.ifindex(name)
    }

    /// The index of the node's interface `name`.
    fn ifindex(&self, name: &str) -> u32 {
        let out = netns::run("ip", &["-n", &self.node, "-j", "link", "show", "dev", name]).unwrap();
        let links: serde_json::Value = serde_json::from_str(&out).unwrap();
        links[0]["ifindex"].as_u64().unwrap() as u32
    }

    /// Starts [`Interfaces`] on a thread inside the node namespace (its sockets are made
    /// there), with a runtime of its own. With `block`, that thread then blocks (and with
    /// it its runtime: nothing reads the sockets) until [`Lab::unblock`].
    fn start(&mut self, block: bool) -> Interfaces {
        let (tx, rx) = mpsc::channel();
        let (node, shutdown) = (self.node.clone(), self.shutdown.clone());
        let (blocked, unblocked) = mpsc::channel::<()>();
        if block {
            self.blocked = Some(blocked);
        }
        self.thread = Some(thread::spawn(move || {
            let run = || -> anyhow::Result<()> {
                netns::enter(&node)?;
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                runtime.block_on(async {
                    let started = Interfaces::start(shutdown.clone()).await;
                    let ok = started.is_ok();
                    let _ = tx.send(started.map_err(|e| e.to_string()));
                    if ok {
                        // Blocks until the sender is dropped (at once unless `block`).
                        let _ = unblocked.recv();
                        shutdown.cancelled().await;
                    }
                });
                Ok(())
            };
            if let Err(error) = run() {
                eprintln!("node thread: {error:#}");
            }
        }));
        rx.recv_timeout(Duration::from_secs(10))
            .expect("Interfaces::start did not return")
            .expect("Interfaces::start")
    }

    /// Resumes the node thread blocked by [`Lab::start`].
    fn unblock(&mut self) {
        self.blocked = None;
    }

    /// The messages the kernel dropped for the node's netlink sockets (full buffers).
    fn netlink_drops(&self) -> u64 {
        let out = netns::run(
            "ip",
            &["netns", "exec", &self.node, "cat", "/proc/net/netlink"],
        )
        .unwrap();
        // sk Eth Pid Groups Rmem Wmem Dump Locks Drops Inode
        out.lines()
            .skip(1)
            .filter_map(|line| line.split_whitespace().nth(8)?.parse::<u64>().ok())
            .sum()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.blocked = None;
        self.shutdown.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        for name in self.names() {
            if let Err(error) = netns::destroy(name) {
                eprintln!("removing netns {name}: {error:#}");
            }
        }
    }
}

/// Waits until `ip` is located at `want`, woken by `changes()`, for at most [`SETTLE`].
async fn until(interfaces: &Interfaces, ip: &str, want: Option<Location>) {
    let ip: IpAddr = ip.parse().unwrap();
    let mut changes = interfaces.changes();
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        changes.borrow_and_update();
        if interfaces.locate(ip) == want {
            return;
        }
        assert!(
            interfaces.healthy(),
            "Interfaces stopped following the kernel"
        );
        if tokio::time::timeout_at(deadline, changes.changed())
            .await
            .is_err()
        {
            panic!(
                "{ip} is at {:?}, not {want:?}, {SETTLE:?} after the change",
                interfaces.locate(ip)
            );
        }
    }
}

/// Whether this machine can run the test; says loudly why not.
fn can_run() -> bool {
    if !netns::root_or_skip("interfaces") {
        eprintln!("SKIPPED: interfaces needs root (network namespaces)");
        return false;
    }
    if netns::run("ip", &["netns", "list"]).is_err() {
        eprintln!("\n*** SKIPPED: interfaces needs `ip netns` (iproute2) ***\n");
        return false;
    }
    true
}

#[tokio::test]
async fn follows_routes_neighbours_and_links() {
    if !can_run() {
        return;
    }
    let mut lab = Lab::new("if");
    // Already there before the start: found by the initial read.
    let early = lab.veth("early-h", 0, "eth9");
    lab.node(&["route", "add", "198.18.0.9/32", "dev", "early-h"]);
    let interfaces = lab.start(false);
    assert_eq!(
        interfaces.locate("198.18.0.9".parse().unwrap()),
        Some(Location::Route { ifindex: early })
    );

    // 1. A routed pod: a host route to its veth, IPv4 and IPv6.
    let a = lab.veth("podA-h", 0, "eth0");
    lab.node(&["route", "add", "198.18.0.5/32", "dev", "podA-h"]);
    lab.node(&["-6", "route", "add", "2001:db8::5/128", "dev", "podA-h"]);
    until(
        &interfaces,
        "198.18.0.5",
        Some(Location::Route { ifindex: a }),
    )
    .await;
    until(
        &interfaces,
        "2001:db8::5",
        Some(Location::Route { ifindex: a }),
    )
    .await;

    // 2. The pod goes with its veth. The kernel says nothing of the IPv4 route.
    lab.node(&["link", "del", "podA-h"]);
    until(&interfaces, "198.18.0.5", None).await;
    until(&interfaces, "2001:db8::5", None).await;

    // 3. A new pod on the reused IP: a new veth, a new index.
    let b = lab.veth("podB-h", 1, "eth0");
    assert_ne!(a, b);
    lab.node(&["route", "add", "198.18.0.5/32", "dev", "podB-h"]);
    lab.node(&["-6", "route", "add", "2001:db8::5/128", "dev", "podB-h"]);
    until(
        &interfaces,
        "198.18.0.5",
        Some(Location::Route { ifindex: b }),
    )
    .await;
    until(
        &interfaces,
        "2001:db8::5",
        Some(Location::Route { ifindex: b }),
    )
    .await;

    // A route replaced in place (no deletion is sent), then its veth set down (the kernel
    // drops the IPv4 route silently).
    let c = lab.veth("podC-h", 0, "eth1");
    lab.node(&["route", "replace", "198.18.0.5/32", "dev", "podC-h"]);
    lab.node(&["-6", "route", "replace", "2001:db8::5/128", "dev", "podC-h"]);
    until(
        &interfaces,
        "198.18.0.5",
        Some(Location::Route { ifindex: c }),
    )
    .await;
    until(
        &interfaces,
        "2001:db8::5",
        Some(Location::Route { ifindex: c }),
    )
    .await;
    lab.node(&["link", "set", "podC-h", "down"]);
    until(&interfaces, "198.18.0.5", None).await;
    until(&interfaces, "2001:db8::5", None).await;

    // 4. A bridged pod: only a neighbour entry on the bridge.
    lab.node(&["link", "add", "br0", "type", "bridge"]);
    lab.node(&["link", "set", "br0", "up"]);
    let br0 = lab.ifindex("br0");
    let neighbour = |mac| Some(Location::Neighbour { ifindex: br0, mac });
    lab.node(&[
        "neigh",
        "add",
        "198.18.1.7",
        "lladdr",
        "02:00:00:00:00:07",
        "dev",
        "br0",
        "nud",
        "permanent",
    ]);
    lab.node(&[
        "neigh",
        "add",
        "2001:db8:1::7",
        "lladdr",
        "02:00:00:00:00:07",
        "dev",
        "br0",
        "nud",
        "permanent",
    ]);
    until(&interfaces, "198.18.1.7", neighbour(MAC_7)).await;
    until(&interfaces, "2001:db8:1::7", neighbour(MAC_7)).await;
    // Another pod on the IP: another MAC.
    lab.node(&[
        "neigh",
        "replace",
        "198.18.1.7",
        "lladdr",
        "02:00:00:00:00:08",
        "dev",
        "br0",
        "nud",
        "permanent",
    ]);
    until(&interfaces, "198.18.1.7", neighbour(MAC_8)).await;

    // A host route wins over the neighbour entry, and when it goes the entry is back.
    lab.node(&["route", "add", "198.18.1.7/32", "dev", "podB-h"]);
    until(
        &interfaces,
        "198.18.1.7",
        Some(Location::Route { ifindex: b }),
    )
    .await;
    lab.node(&["route", "del", "198.18.1.7/32", "dev", "podB-h"]);
    until(&interfaces, "198.18.1.7", neighbour(MAC_8)).await;

    // An entry that failed has no MAC: the address is no longer known to live there.
    lab.node(&[
        "neigh",
        "replace",
        "198.18.1.7",
        "dev",
        "br0",
        "nud",
        "failed",
    ]);
    until(&interfaces, "198.18.1.7", None).await;

    // The bridge goes: its entries with it.
    lab.node(&["link", "del", "br0"]);
    until(&interfaces, "2001:db8:1::7", None).await;

    // Untouched throughout.
    assert_eq!(
        interfaces.locate("198.18.0.9".parse().unwrap()),
        Some(Location::Route { ifindex: early })
    );
    assert!(interfaces.healthy());
    lab.shutdown.cancel();
    tokio::time::timeout(SETTLE, interfaces.stopped())
        .await
        .expect("stops on shutdown");
    assert!(!interfaces.healthy());
}

/// The notifications still queued after an overflow are older than the ones lost: routes
/// added and then deleted must not come back when they are replayed.
#[tokio::test]
async fn reads_everything_again_after_an_overflow() {
    if !can_run() {
        return;
    }
    let mut lab = Lab::new("ifo");
    let bulk = lab.veth("bulk-h", 0, "eth0");
    let moved = lab.veth("moved-h", 1, "eth0");
    lab.node(&["route", "add", "198.19.255.1/32", "dev", "bulk-h"]);
    lab.node(&["route", "add", "198.19.255.2/32", "dev", "bulk-h"]);
    let interfaces = lab.start(true);
    assert_eq!(
        interfaces.locate("198.19.255.2".parse().unwrap()),
        Some(Location::Route { ifindex: bulk })
    );

    // Far more notifications than a socket buffer holds while nothing reads: the kernel
    // drops some and reports ENOBUFS.
    let batch = tempfile::NamedTempFile::new().unwrap();
    let mut commands = String::new();
    for n in 0..8000u32 {
        let (hi, lo) = (n / 250, n % 250 + 1);
        commands += &format!("route add 198.19.{hi}.{lo}/32 dev bulk-h\n");
    }
    for n in 0..4000u32 {
        let (hi, lo) = (n / 250, n % 250 + 1);
        commands += &format!("route del 198.19.{hi}.{lo}/32 dev bulk-h\n");
    }
    commands += "route del 198.19.255.1/32 dev bulk-h\n";
    commands += "route replace 198.19.255.2/32 dev moved-h\n";
    std::fs::write(batch.path(), commands).unwrap();
    lab.node(&["-batch", batch.path().to_str().unwrap()]);
    assert!(
        lab.netlink_drops() > 0,
        "the test did not overflow the socket"
    );
    lab.unblock();

    until(
        &interfaces,
        "198.19.255.2",
        Some(Location::Route { ifindex: moved }),
    )
    .await;
    until(&interfaces, "198.19.255.1", None).await;
    for n in 0..8000u32 {
        let (hi, lo) = (n / 250, n % 250 + 1);
        let ip = format!("198.19.{hi}.{lo}");
        let want = (n >= 4000).then_some(Location::Route { ifindex: bulk });
        until(&interfaces, &ip, want).await;
    }
    assert!(interfaces.healthy());
}
