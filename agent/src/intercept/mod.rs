//! Interception: the DNAT that sends pods' traffic for 169.254.169.254:80 to the agent
//! (and, with `--pod-identity`, for the container-credentials address 169.254.170.23:80
//! to its own listener), and the rules that keep it closed whatever happens.
//!
//! Rules live in chains of our own (see [`rules`]): the block of unredirected metadata
//! traffic, the DNAT, and the guard of the agent's listener, each jumped to from the
//! built-in chains once per pod-interface pattern (`--host-interface`, kiam/kube2iam
//! syntax), so installing is idempotent and removal exact. They are installed with the
//! same iptables backend (nft or legacy) as the node's existing rules, before anything
//! else at start that could fail, re-asserted every `--rules-interval` (and whenever they
//! vanished), and left in place on exit: a stopped or misconfigured agent means refused
//! connections, never the node's credentials (`--remove-rules-on-exit` opts out).
//!
//! Fail closed in every configuration: IPv4 is redirected whenever the node has an IPv4
//! address, whatever the family of `--listen`; the IPv6 metadata address is refused when
//! it is not redirected (`--ipv6` off). After installing, existing conntrack entries
//! towards the metadata service are deleted. Veth interfaces that no `--host-interface`
//! pattern covers are pods whose traffic would not be intercepted: they are logged,
//! counted, and keep the agent not ready (`--ignore-interface` names the ones to leave
//! alone). The listen addresses are checked with rtnetlink to be the node's own.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    process::Output,
    time::Duration,
};

use futures::TryStreamExt;
use parking_lot::Mutex;
use podiam_common::readiness::Gate;
use prometheus::{IntCounterVec, IntGauge, Registry};
use rtnetlink::{
    RouteMessageBuilder,
    packet_route::{
        address::{AddressAttribute, AddressFlags, AddressScope},
        link::{InfoKind, LinkAttribute, LinkInfo},
        route::RouteAttribute,
    },
};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

pub mod rules;

use self::rules::{BLOCK, Chain, GUARD, InterfaceSpec, Rules};

/// Interception flags.
#[derive(Clone, Debug, clap::Args)]
pub struct InterceptArgs {
    /// Redirect pods' 169.254.169.254:80 to --listen with iptables (kube2iam: --iptables).
    /// Needs NET_ADMIN and the host network.
    #[arg(long, env = "PODIAM_IPTABLES")]
    pub iptables: bool,

    /// Pod interfaces whose traffic is redirected: `cali+`, `eni+`, `!eth0`, or a comma
    /// list (kiam and kube2iam syntax).
    #[arg(long, env = "PODIAM_HOST_INTERFACE", default_value = "cali+")]
    pub host_interface: String,

    /// Veth interfaces on the node that are not pods' (e.g. another runtime's), so that
    /// --host-interface need not cover them: same syntax, comma list. Any other veth
    /// that --host-interface does not cover keeps the agent not ready.
    #[arg(long, env = "PODIAM_IGNORE_INTERFACE", default_value = "")]
    pub ignore_interface: String,

    /// iptables backend: `auto` uses the one holding the node's existing rules.
    #[arg(long, env = "PODIAM_IPTABLES_BACKEND", value_enum, default_value_t = Backend::Auto)]
    pub iptables_backend: Backend,

    /// How often the rules are checked and restored if they changed or vanished.
    #[arg(long, env = "PODIAM_RULES_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub rules_interval: Duration,

    /// Also redirect [fd00:ec2::254]:80, the IPv6 metadata endpoint of Nitro instances,
    /// with ip6tables, to --listen-v6. Without it that endpoint is refused to pods.
    #[arg(long, env = "PODIAM_IPV6")]
    pub ipv6: bool,

    /// The IPv6 address of the metadata endpoint, target of the IPv6 redirect (default:
    /// the global IPv6 address of the node's default IPv6 route's interface, with the port of --listen).
    #[arg(long, env = "PODIAM_LISTEN_V6", requires = "ipv6")]
    pub listen_v6: Option<SocketAddr>,

    /// The IPv4 address of the metadata endpoint when --listen is IPv6: 169.254.169.254 is
    /// redirected on every node with an IPv4 address (default: the address of the node's
    /// default IPv4 route's interface, or its first global IPv4 address, with the port of
    /// --listen).
    #[arg(long, env = "PODIAM_LISTEN_V4")]
    pub listen_v4: Option<SocketAddr>,

    /// Remove the rules when the agent stops. Off by default: without them pods reach the
    /// node's own metadata service (and credentials) while the agent is down.
    #[arg(long, env = "PODIAM_REMOVE_RULES_ON_EXIT")]
    pub remove_rules_on_exit: bool,
}

/// iptables backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// Detect.
    Auto,
    /// iptables-nft.
    Nft,
    /// iptables-legacy.
    Legacy,
}

/// Why interception could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum InterceptError {
    /// Bad `--host-interface` or `--ignore-interface`.
    #[error(transparent)]
    Spec(#[from] rules::SpecError),
    /// The listen address cannot be a DNAT target.
    #[error(
        "{0} {1} is not an address of this node (with --iptables it must be, e.g. $HOST_IP:8181)"
    )]
    NotLocal(&'static str, SocketAddr),
    /// `--ipv6` needs the redirect.
    #[error("--ipv6 needs --iptables")]
    Ipv6WithoutIptables,
    /// `--ipv6` without an IPv6 address to redirect to.
    #[error(
        "--ipv6: no usable global IPv6 address on an interface with the default IPv6 route; give one with --listen-v6"
    )]
    NoIpv6,
    /// `--listen` is IPv6, the node has IPv4, and no IPv4 address to redirect to.
    #[error(
        "--listen is IPv6 and the node has IPv4: 169.254.169.254 must be redirected too; give an IPv4 address of the node with --listen-v4"
    )]
    NoIpv4,
    /// Netlink failed.
    #[error("reading the node's interfaces over netlink: {0}")]
    Netlink(String),
    /// An iptables command failed (e.g. no NET_ADMIN).
    #[error("`{command}` failed: {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Its error output.
        stderr: String,
    },
}

/// Installs and keeps the redirect, for each address family.
#[derive(Debug)]
pub struct Interceptor {
    families: Vec<Family>,
    listen_v4: Option<SocketAddr>,
    listen_v6: Option<SocketAddr>,
    interfaces: Vec<InterfaceSpec>,
    ignored: Vec<InterfaceSpec>,
    interval: Duration,
    remove_on_exit: bool,
    metrics: InterceptMetrics,
    /// Reject counters last read, by (family, chain), to count their growth.
    counted: Mutex<HashMap<(bool, &'static str), u64>>,
    /// Uncovered interfaces already reported.
    reported: Mutex<HashSet<String>>,
}

/// Interception metrics.
#[derive(Clone, Debug)]
pub struct InterceptMetrics {
    /// Connections refused, by reason (shared with the metadata listener).
    pub refused: IntCounterVec,
    /// Veth interfaces no --host-interface pattern covers.
    pub uncovered: IntGauge,
}

/// What happened to our jumps in one built-in chain.
enum Jumps {
    /// They were in place.
    Kept,
    /// They were there, but not first (or duplicated): moved.
    Reordered,
    /// Some were missing: added.
    Added,
}

/// The rules of one address family and the iptables binaries that manage them.
#[derive(Debug)]
struct Family {
    rules: Rules,
    iptables: String,
    restore: String,
}

// === impl InterceptMetrics ===

impl InterceptMetrics {
    /// Registers the interception gauge; `refused` is the listener's refusal counter.
    pub fn register(registry: &Registry, refused: IntCounterVec) -> prometheus::Result<Self> {
        let uncovered = IntGauge::new(
            "podiam_agent_uncovered_interfaces",
            "Veth interfaces that no --host-interface pattern covers (pods whose metadata traffic is not intercepted); the agent is not ready while any exist",
        )?;
        registry.register(Box::new(uncovered.clone()))?;
        Ok(Self { refused, uncovered })
    }
}

// === impl Interceptor ===

impl Interceptor {
    /// Validates the flags against the node: interface syntax, the backend, that iptables
    /// can be run (NET_ADMIN), and the listen addresses. The block of pods' metadata
    /// traffic goes in as soon as the pod interfaces are known, before the listen
    /// addresses are checked: whatever is wrong after that, pods get refused connections.
    /// `None` without `--iptables`.
    pub async fn prepare(
        args: &InterceptArgs,
        listen: SocketAddr,
        pod_identity: Option<u16>,
        metrics: InterceptMetrics,
    ) -> Result<Option<Self>, InterceptError> {
        if !args.iptables {
            if args.ipv6 {
                return Err(InterceptError::Ipv6WithoutIptables);
            }
            return Ok(None);
        }
        let interfaces = InterfaceSpec::parse_list("--host-interface", &args.host_interface)?;
        let ignored = InterfaceSpec::parse_entries("--ignore-interface", &args.ignore_interface)?;
        // The block first, for both families, needing nothing but the pod interfaces.
        let mut tools = Vec::new();
        for v4 in [true, false] {
            let program = if v4 { "iptables" } else { "ip6tables" };
            let backend = match args.iptables_backend {
                Backend::Nft => "nft",
                Backend::Legacy => "legacy",
                Backend::Auto => detect(program).await,
            };
            let family = Family {
                rules: Rules {
                    v4,
                    target: None,
                    interfaces: interfaces.clone(),
                    pod_identity,
                },
                iptables: format!("{program}-{backend}"),
                restore: format!("{program}-{backend}-restore"),
            };
            // Fails clearly without NET_ADMIN (or without the binaries).
            let works = match family.install().await {
                Ok(_) => Ok(()),
                Err(error) if v4 => return Err(error),
                Err(error) => Err(error),
            };
            tools.push((family, works));
        }
        let node = read_node().await?;
        if !node.addresses.contains(&listen.ip()) {
            return Err(InterceptError::NotLocal("--listen", listen));
        }
        for name in interfaces.iter().filter_map(InterfaceSpec::exact) {
            if !node.links.iter().any(|l| l.name == name) {
                tracing::warn!(
                    interface = name,
                    "--host-interface names an interface this node does not have (yet)"
                );
            }
        }
        // IPv4: redirected whenever the node has IPv4, whatever the family of --listen.
        let (v4_target, listen_v4) = if listen.is_ipv4() {
            (Some(listen), None)
        } else {
            match args.listen_v4 {
                Some(addr) if addr.is_ipv4() && node.addresses.contains(&addr.ip()) => {
                    (Some(addr), Some(addr))
                }
                Some(addr) => return Err(InterceptError::NotLocal("--listen-v4", addr)),
                None => match node.v4 {
                    Some(ip) => {
                        let addr = SocketAddr::new(ip, listen.port());
                        (Some(addr), Some(addr))
                    }
                    None if node.has_v4() => return Err(InterceptError::NoIpv4),
                    None => (None, None),
                },
            }
        };
        // IPv6: redirected with --ipv6 (or an IPv6 --listen), refused otherwise.
        let (v6_target, listen_v6) = if listen.is_ipv6() {
            (Some(listen), None)
        } else if args.ipv6 {
            let v6 = match args.listen_v6 {
                Some(addr) if addr.is_ipv6() && node.addresses.contains(&addr.ip()) => addr,
                Some(addr) => return Err(InterceptError::NotLocal("--listen-v6", addr)),
                None => {
                    SocketAddr::new(node.global_v6.ok_or(InterceptError::NoIpv6)?, listen.port())
                }
            };
            (Some(v6), Some(v6))
        } else {
            (None, None)
        };
        let mut families = Vec::new();
        for ((mut family, works), target) in tools.into_iter().zip([v4_target, v6_target]) {
            // A kernel without IPv6 has no IPv6 metadata endpoint to leak through.
            if let Err(error) = works {
                if target.is_some() || node.has_v6() {
                    return Err(error);
                }
                tracing::warn!(%error, "ip6tables does not work and the node has no IPv6 address: no IPv6 rules");
                continue;
            }
            family.rules.target = target;
            let redirect = target.map_or_else(|| "none (refused)".to_string(), |t| t.to_string());
            tracing::info!(backend = %family.iptables, interfaces = %args.host_interface, metadata = family.rules.metadata(), redirect, "interception configured");
            families.push(family);
        }
        Ok(Some(Self {
            families,
            listen_v4,
            listen_v6,
            interfaces,
            ignored,
            interval: args.rules_interval.max(Duration::from_millis(100)),
            remove_on_exit: args.remove_rules_on_exit,
            metrics,
            counted: Mutex::new(HashMap::new()),
            reported: Mutex::new(HashSet::new()),
        }))
    }

    /// The IPv4 address the metadata endpoint must also listen on (an IPv6 `--listen` on
    /// a node with IPv4).
    pub fn listen_v4(&self) -> Option<SocketAddr> {
        self.listen_v4
    }

    /// Where the container-credentials endpoint must listen: every redirect target's
    /// address, on `port`.
    pub fn pod_identity_listens(&self, port: u16) -> Vec<SocketAddr> {
        self.families
            .iter()
            .filter_map(|f| f.rules.target)
            .map(|t| SocketAddr::new(t.ip(), port))
            .collect()
    }

    /// The IPv6 address the metadata endpoint must also listen on (`--ipv6` with an IPv4
    /// `--listen`).
    pub fn listen_v6(&self) -> Option<SocketAddr> {
        self.listen_v6
    }

    /// Installs whatever is missing or wrong; returns whether anything changed.
    pub async fn install(&self) -> Result<bool, InterceptError> {
        let mut changed = false;
        for family in &self.families {
            changed |= family.install().await?;
        }
        Ok(changed)
    }

    /// Keeps the rules until `shutdown`: `rules` is open while they are verified,
    /// `interfaces` while every veth on the node is covered by --host-interface.
    pub async fn run(self, rules: Gate, interfaces: Gate, shutdown: CancellationToken) {
        loop {
            match self.install().await {
                Ok(true) => {
                    tracing::info!("interception rules installed");
                    rules.open();
                }
                Ok(false) => rules.open(),
                Err(error) => {
                    rules.close();
                    tracing::error!(%error, "interception rules could not be installed; retrying");
                }
            }
            match self.uncovered().await {
                Ok(0) => interfaces.open(),
                Ok(_) => interfaces.close(),
                Err(error) => {
                    interfaces.close();
                    tracing::error!(%error, "could not list the node's interfaces");
                }
            }
            self.count_refusals().await;
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(self.interval) => {}
            }
        }
        if self.remove_on_exit {
            for family in &self.families {
                family.remove().await;
            }
            tracing::info!("interception rules removed (--remove-rules-on-exit)");
        } else {
            tracing::info!(
                "leaving the interception rules in place: pods get refused connections, not the node's credentials"
            );
        }
    }

    /// Counts the veth interfaces that no pattern covers (by their own name or their
    /// bridge's, which is what iptables sees for routed traffic), reporting each new one
    /// once. A veth on an Open vSwitch datapath (Antrea, OVN) reaches the host through the
    /// switch's gateway port, which iptables sees instead: not judged here.
    async fn uncovered(&self) -> Result<usize, InterceptError> {
        let links = read_links().await?;
        let by_index: HashMap<u32, &Link> = links.iter().map(|l| (l.index, l)).collect();
        let covered = |name: &str| self.interfaces.iter().any(|spec| spec.matches(name));
        let ignored = |name: &str| self.ignored.iter().any(|spec| spec.matches(name));
        let mut now = HashSet::new();
        for link in links.iter().filter(|l| l.veth) {
            let controller = link.controller.and_then(|i| by_index.get(&i));
            // Routed traffic from a veth on a bridge enters the host as the bridge's.
            let covered = match controller {
                Some(c) if c.bridge => covered(&c.name),
                Some(c) if c.ovs => true,
                Some(c) => covered(&link.name) || covered(&c.name),
                None => covered(&link.name),
            };
            if covered || ignored(&link.name) {
                continue;
            }
            now.insert(link.name.clone());
        }
        let mut reported = self.reported.lock();
        for name in now.difference(&reported) {
            tracing::error!(
                interface = %name,
                host_interface = ?self.interfaces.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "a veth interface that --host-interface does not cover: a pod behind it reaches the node's metadata service past podiam (only the instance's metadata options stop it); fix --host-interface, or list it in --ignore-interface. Not ready until then"
            );
        }
        *reported = now;
        let count = reported.len();
        self.metrics
            .uncovered
            .set(i64::try_from(count).unwrap_or(i64::MAX));
        Ok(count)
    }

    /// Adds the growth of our REJECT rules' packet counters to the refusal metric.
    async fn count_refusals(&self) {
        for family in &self.families {
            for (chain, reason) in [
                (GUARD, "not_redirected"),
                (BLOCK, "metadata_not_redirected"),
            ] {
                let Some(now) = family.rejected(chain).await else {
                    continue;
                };
                let mut counted = self.counted.lock();
                let last = counted.insert((family.rules.v4, chain), now).unwrap_or(0);
                // A replaced chain starts from zero again.
                let grown = if now >= last { now - last } else { now };
                if grown > 0 {
                    self.metrics
                        .refused
                        .with_label_values(&[reason])
                        .inc_by(grown);
                }
            }
        }
    }
}

// === impl Family ===

impl Family {
    /// Installs each chain of this family (the block first), then our jumps at the top of
    /// each built-in chain; whether anything changed. Connection tracking is flushed when
    /// the redirect itself changed (not for a mere reordering of jumps).
    async fn install(&self) -> Result<bool, InterceptError> {
        self.install_chains(&self.rules.chains()).await
    }

    async fn install_chains(&self, chains: &[Chain]) -> Result<bool, InterceptError> {
        let mut changed = false;
        let mut redirect = false;
        for chain in chains {
            if self.install_chain(chain).await? {
                changed = true;
                redirect |= chain.table == "nat";
            }
        }
        // Every (table, built-in chain) our chains are jumped to from, in order.
        let mut builtins: Vec<(&'static str, &'static str)> = Vec::new();
        for chain in chains {
            for builtin in chain.builtins() {
                if !builtins.contains(&(chain.table, builtin)) {
                    builtins.push((chain.table, builtin));
                }
            }
        }
        // The host-network jump (with --pod-identity) is looked at even when it is not
        // wanted, so that turning the path off takes it out.
        if chains.iter().any(|c| c.table == "nat") && !builtins.contains(&("nat", "OUTPUT")) {
            builtins.push(("nat", "OUTPUT"));
        }
        for (table, builtin) in builtins {
            match self.install_jumps(chains, table, builtin).await? {
                Jumps::Kept => {}
                Jumps::Reordered => changed = true,
                Jumps::Added => {
                    changed = true;
                    redirect |= table == "nat";
                }
            }
        }
        if redirect {
            self.flush_conntrack().await;
        }
        Ok(changed)
    }

    /// Replaces the chain whole when it differs from what it should be.
    async fn install_chain(&self, chain: &Chain) -> Result<bool, InterceptError> {
        let listing = self.iptables(&["-t", chain.table, "-S", chain.name]).await;
        let current: Vec<String> = match &listing {
            Ok(out) => String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::to_string)
                .collect(),
            Err(_) => Vec::new(),
        };
        if current == chain.listing() {
            return Ok(false);
        }
        if !current.is_empty() {
            tracing::info!(
                chain = chain.name,
                ?current,
                "restoring a chain that changed"
            );
        }
        self.restore(&chain.restore()).await?;
        Ok(true)
    }

    /// Makes our jumps the first rules of `builtin`, in order: a CNI's or kube-proxy's
    /// ACCEPT ahead of them would let pods' traffic past the block and the guard.
    async fn install_jumps(
        &self,
        chains: &[Chain],
        table: &'static str,
        builtin: &'static str,
    ) -> Result<Jumps, InterceptError> {
        let wanted: Vec<&str> = chains
            .iter()
            .filter(|c| c.table == table)
            .flat_map(|c| c.jumps_in(builtin))
            .collect();
        let comments: Vec<&str> = chains
            .iter()
            .filter(|c| c.table == table)
            .map(|c| c.comment)
            .collect();
        let out = self.iptables(&["-t", table, "-S", builtin]).await?;
        let prefix = format!("-A {builtin} ");
        let rules: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix(prefix.as_str()).map(str::to_string))
            .collect();
        let ours: Vec<&String> = rules
            .iter()
            .filter(|r| comments.iter().any(|c| r.contains(c)))
            .collect();
        let first_are_ours = rules.len() >= wanted.len()
            && rules.iter().zip(&wanted).all(|(r, w)| r == w)
            && ours.len() == wanted.len();
        if first_are_ours {
            return Ok(Jumps::Kept);
        }
        let missing = wanted
            .iter()
            .any(|w| !ours.iter().any(|o| o.as_str() == *w));
        // One atomic commit: the old jumps out (each `-D` removes the first rule with that
        // text, so duplicates go one by one), ours in at the top. No moment without them,
        // and no rule of anyone else touched.
        let mut text = format!("*{table}\n");
        for old in &ours {
            text.push_str(&format!("-D {builtin} {old}\n"));
        }
        for (i, jump) in wanted.iter().enumerate() {
            text.push_str(&format!("-I {builtin} {} {jump}\n", i + 1));
        }
        text.push_str("COMMIT\n");
        self.restore(&text).await?;
        if missing {
            Ok(Jumps::Added)
        } else {
            tracing::info!(
                table,
                chain = builtin,
                "our jumps were not first (or were doubled): moved back to the top"
            );
            Ok(Jumps::Reordered)
        }
    }

    /// Removes our jumps and chains (the redirect last, the block last of all).
    async fn remove(&self) {
        for chain in self.rules.chains().iter().rev() {
            for (builtin, jump) in &chain.jumps {
                let mut args = vec!["-t", chain.table, "-D", builtin];
                let parts = split_args(jump);
                args.extend(parts.iter().map(String::as_str));
                let _ = self.iptables(&args).await;
            }
            let _ = self.iptables(&["-t", chain.table, "-F", chain.name]).await;
            let _ = self.iptables(&["-t", chain.table, "-X", chain.name]).await;
        }
    }

    /// Packets our REJECT rules in `chain` (filter table) have refused, if it exists.
    async fn rejected(&self, chain: &str) -> Option<u64> {
        let out = self
            .iptables(&["-t", "filter", "-L", chain, "-v", "-x", "-n"])
            .await
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        Some(
            text.lines()
                .filter(|l| l.split_whitespace().nth(2) == Some("REJECT"))
                .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
                .sum(),
        )
    }

    async fn iptables(&self, args: &[&str]) -> Result<Output, InterceptError> {
        let mut full = vec!["-w", "5"];
        full.extend_from_slice(args);
        run(
            Command::new(&self.iptables).args(&full),
            &self.iptables,
            &full,
        )
        .await
    }

    async fn restore(&self, input: &str) -> Result<(), InterceptError> {
        use tokio::io::AsyncWriteExt;
        let args = ["-w", "5", "--noflush"];
        let shown = format!("{} {}", self.restore, args.join(" "));
        let failed = |stderr: String| InterceptError::Command {
            command: shown.clone(),
            stderr,
        };
        let mut child = Command::new(&self.restore)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| failed(e.to_string()))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(input.as_bytes())
                .await
                .map_err(|e| failed(e.to_string()))?;
        }
        let out = child
            .wait_with_output()
            .await
            .map_err(|e| failed(e.to_string()))?;
        if !out.status.success() {
            return Err(failed(
                String::from_utf8_lossy(&out.stderr).trim().to_string(),
            ));
        }
        Ok(())
    }

    /// Deletes conntrack entries towards the metadata service (none is not an error).
    async fn flush_conntrack(&self) {
        let family = if self.rules.v4 { "ipv4" } else { "ipv6" };
        let out = Command::new("conntrack")
            .args([
                "-D",
                "-f",
                family,
                "-p",
                "tcp",
                "--orig-dst",
                self.rules.metadata(),
                "--orig-port-dst",
                "80",
            ])
            .output()
            .await;
        match out {
            Ok(out) => tracing::debug!(
                result = %String::from_utf8_lossy(&out.stderr).trim(),
                "conntrack entries towards the metadata service deleted"
            ),
            Err(error) => {
                tracing::warn!(%error, "conntrack is not available: connections opened before the redirect may bypass it until they close")
            }
        }
    }
}

async fn run(cmd: &mut Command, program: &str, args: &[&str]) -> Result<Output, InterceptError> {
    let shown = format!("{program} {}", args.join(" "));
    let out = cmd.output().await.map_err(|e| InterceptError::Command {
        command: shown.clone(),
        stderr: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(InterceptError::Command {
            command: shown,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out)
}

/// Splits a rule as `iptables -S` prints it into arguments (quotes group words).
fn split_args(rule: &str) -> Vec<String> {
    let mut args = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    for c in rule.chars() {
        match c {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !current.is_empty() {
                    args.push(std::mem::take(&mut current));
                }
            }
            c => current.push(c),
        }
    }
    if !current.is_empty() {
        args.push(current);
    }
    args
}

/// The backend holding more of the node's rules (kube-proxy's and the CNI's); nft on a tie.
async fn detect(family: &str) -> &'static str {
    let count = |backend: &'static str| {
        let save = format!("{family}-{backend}-save");
        async move {
            Command::new(save)
                .output()
                .await
                .map(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .filter(|l| l.starts_with("-A"))
                        .count()
                })
                .unwrap_or(0)
        }
    };
    let (nft, legacy) = tokio::join!(count("nft"), count("legacy"));
    if legacy > nft { "legacy" } else { "nft" }
}

/// What rtnetlink tells of the node.
struct Node {
    addresses: Vec<IpAddr>,
    /// The IPv6 redirect's target: the first usable global address (not tentative,
    /// deprecated, temporary or failed duplicate detection) of an interface holding the
    /// default IPv6 route.
    global_v6: Option<IpAddr>,
    /// The IPv4 redirect's target when --listen is IPv6: the first global IPv4 address of
    /// an interface holding the default IPv4 route, else the first global IPv4 address.
    v4: Option<IpAddr>,
    links: Vec<Link>,
}

/// One network interface.
struct Link {
    index: u32,
    name: String,
    veth: bool,
    bridge: bool,
    /// An Open vSwitch datapath.
    ovs: bool,
    /// Its bridge (or other controller), by index.
    controller: Option<u32>,
}

// === impl Node ===

impl Node {
    /// Whether the node has an IPv4 address of its own (not loopback or link-local).
    fn has_v4(&self) -> bool {
        self.addresses.iter().any(|ip| match ip {
            IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local(),
            IpAddr::V6(_) => false,
        })
    }

    /// Whether the node has any IPv6 address but loopback.
    fn has_v6(&self) -> bool {
        self.addresses
            .iter()
            .any(|ip| ip.is_ipv6() && !ip.is_loopback())
    }
}

/// The interfaces holding a default route of one family.
async fn uplinks<T>(handle: &rtnetlink::Handle) -> Result<Vec<u32>, InterceptError>
where
    RouteMessageBuilder<T>: Default,
{
    let netlink = |e: rtnetlink::Error| InterceptError::Netlink(e.to_string());
    let mut uplinks = Vec::new();
    let mut routes = handle
        .route()
        .get(RouteMessageBuilder::<T>::default().build())
        .execute();
    while let Some(msg) = routes.try_next().await.map_err(netlink)? {
        if msg.header.destination_prefix_length == 0 {
            uplinks.extend(msg.attributes.iter().filter_map(|a| match a {
                RouteAttribute::Oif(index) => Some(*index),
                _ => None,
            }));
        }
    }
    Ok(uplinks)
}

/// The node's addresses, interfaces and default routes, over rtnetlink.
async fn read_node() -> Result<Node, InterceptError> {
    let netlink = |e: rtnetlink::Error| InterceptError::Netlink(e.to_string());
    let (connection, handle, _) =
        rtnetlink::new_connection().map_err(|e| InterceptError::Netlink(e.to_string()))?;
    let task = tokio::spawn(connection);
    let uplinks_v6 = uplinks::<Ipv6Addr>(&handle).await?;
    let uplinks_v4 = uplinks::<Ipv4Addr>(&handle).await?;
    let mut node = Node {
        addresses: Vec::new(),
        global_v6: None,
        v4: None,
        links: Vec::new(),
    };
    let mut first_v4 = None;
    let mut addresses = handle.address().get().execute();
    while let Some(msg) = addresses.try_next().await.map_err(netlink)? {
        let unusable = msg.attributes.iter().any(|a| {
            matches!(a, AddressAttribute::Flags(flags) if flags.intersects(
                AddressFlags::Tentative
                    | AddressFlags::Deprecated
                    | AddressFlags::Secondary
                    | AddressFlags::Dadfailed
            ))
        });
        for a in &msg.attributes {
            if let AddressAttribute::Address(ip) | AddressAttribute::Local(ip) = a {
                node.addresses.push(*ip);
                let global = msg.header.scope == AddressScope::Universe && !ip.is_loopback();
                match ip {
                    // Not the metadata address itself (on the node's lo, where EC2 answers).
                    IpAddr::V6(_)
                        if global
                            && !unusable
                            && ip.to_string() != rules::METADATA_V6
                            && uplinks_v6.contains(&msg.header.index)
                            && node.global_v6.is_none() =>
                    {
                        node.global_v6 = Some(*ip);
                    }
                    IpAddr::V4(v4) if global && !v4.is_link_local() => {
                        first_v4.get_or_insert(*ip);
                        if uplinks_v4.contains(&msg.header.index) && node.v4.is_none() {
                            node.v4 = Some(*ip);
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    node.v4 = node.v4.or(first_v4);
    // A node's address list may repeat an address (Address and Local attributes).
    node.addresses.dedup();
    task.abort();
    node.links = read_links().await?;
    Ok(node)
}

/// The node's interfaces: names, whether each is a veth, and its bridge.
async fn read_links() -> Result<Vec<Link>, InterceptError> {
    let netlink = |e: rtnetlink::Error| InterceptError::Netlink(e.to_string());
    let (connection, handle, _) =
        rtnetlink::new_connection().map_err(|e| InterceptError::Netlink(e.to_string()))?;
    let task = tokio::spawn(connection);
    let mut links = Vec::new();
    let mut stream = handle.link().get().execute();
    let result = async {
        while let Some(msg) = stream.try_next().await.map_err(netlink)? {
            let mut link = Link {
                index: msg.header.index,
                name: String::new(),
                veth: false,
                bridge: false,
                ovs: false,
                controller: None,
            };
            for a in &msg.attributes {
                match a {
                    LinkAttribute::IfName(name) => link.name = name.clone(),
                    LinkAttribute::Controller(index) => link.controller = Some(*index),
                    LinkAttribute::LinkInfo(infos) => {
                        for info in infos {
                            match info {
                                LinkInfo::Kind(InfoKind::Veth) => link.veth = true,
                                LinkInfo::Kind(InfoKind::Bridge) => link.bridge = true,
                                LinkInfo::Kind(InfoKind::Other(kind)) if kind == "openvswitch" => {
                                    link.ovs = true;
                                }
                                _ => {}
                            }
                        }
                    }
                    _ => {}
                }
            }
            links.push(link);
        }
        Ok(())
    }
    .await;
    task.abort();
    result.map(|()| links)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_rules_as_iptables_prints_them() {
        assert_eq!(
            split_args("-i cali+ -m comment --comment \"podiam: a b\" -j PODIAM"),
            [
                "-i",
                "cali+",
                "-m",
                "comment",
                "--comment",
                "podiam: a b",
                "-j",
                "PODIAM"
            ]
        );
        assert_eq!(split_args("! -i eth0 -j X"), ["!", "-i", "eth0", "-j", "X"]);
    }
}
