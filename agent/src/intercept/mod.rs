//! Interception: the DNAT that sends pods' traffic for 169.254.169.254:80 to the agent.
//!
//! Rules live in our own nat chain, jumped to from PREROUTING for each pod-interface
//! pattern (`--host-interface`, kiam/kube2iam syntax), so installing is idempotent and
//! removal exact. They are installed with the same iptables backend (nft or legacy) as the
//! node's existing rules, re-asserted every `--rules-interval` (and whenever they
//! vanished), and left in place on exit: a stopped agent means refused connections, never
//! the node's credentials (`--remove-rules-on-exit` opts out). After installing, existing
//! conntrack entries towards the metadata service are deleted, so connections opened
//! before the redirect stop bypassing it. The listen address is checked with rtnetlink to
//! be one of the node's own.

use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr},
    process::Output,
    time::Duration,
};

use futures::TryStreamExt;
use podiam_common::readiness::Gate;
use rtnetlink::{
    RouteMessageBuilder,
    packet_route::{
        address::{AddressAttribute, AddressFlags, AddressScope},
        link::LinkAttribute,
        route::RouteAttribute,
    },
};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

pub mod rules;

use self::rules::{CHAIN, COMMENT, InterfaceSpec, Rules};

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

    /// iptables backend: `auto` uses the one holding the node's existing rules.
    #[arg(long, env = "PODIAM_IPTABLES_BACKEND", value_enum, default_value_t = Backend::Auto)]
    pub iptables_backend: Backend,

    /// How often the rules are checked and restored if they changed or vanished.
    #[arg(long, env = "PODIAM_RULES_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub rules_interval: Duration,

    /// Also redirect [fd00:ec2::254]:80, the IPv6 metadata endpoint of Nitro instances,
    /// with ip6tables, to --listen-v6.
    #[arg(long, env = "PODIAM_IPV6")]
    pub ipv6: bool,

    /// The IPv6 address of the metadata endpoint, target of the IPv6 redirect (default:
    /// the global IPv6 address of the node's default IPv6 route's interface, with the port of --listen).
    #[arg(long, env = "PODIAM_LISTEN_V6", requires = "ipv6")]
    pub listen_v6: Option<SocketAddr>,

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
    /// Bad `--host-interface`.
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
    listen_v6: Option<SocketAddr>,
    interval: Duration,
    remove_on_exit: bool,
}

/// The rules of one address family and the iptables binaries that manage them.
#[derive(Debug)]
struct Family {
    rules: Rules,
    iptables: String,
    restore: String,
}

// === impl Interceptor ===

impl Interceptor {
    /// Validates the flags against the node: interface syntax, the listen addresses, the
    /// backend, and that iptables can be run (NET_ADMIN). `None` without `--iptables`.
    pub async fn prepare(
        args: &InterceptArgs,
        listen: SocketAddr,
    ) -> Result<Option<Self>, InterceptError> {
        if !args.iptables {
            if args.ipv6 {
                return Err(InterceptError::Ipv6WithoutIptables);
            }
            return Ok(None);
        }
        let interfaces = InterfaceSpec::parse_list(&args.host_interface)?;
        let node = read_node().await?;
        if !node.addresses.contains(&listen.ip()) {
            return Err(InterceptError::NotLocal("--listen", listen));
        }
        for name in interfaces.iter().filter_map(InterfaceSpec::exact) {
            if !node.links.iter().any(|n| n == name) {
                tracing::warn!(
                    interface = name,
                    "--host-interface names an interface this node does not have (yet)"
                );
            }
        }
        let mut targets = vec![listen];
        let mut listen_v6 = None;
        if args.ipv6 && listen.is_ipv4() {
            let v6 = match args.listen_v6 {
                Some(addr) if addr.is_ipv6() && node.addresses.contains(&addr.ip()) => addr,
                Some(addr) => return Err(InterceptError::NotLocal("--listen-v6", addr)),
                None => {
                    SocketAddr::new(node.global_v6.ok_or(InterceptError::NoIpv6)?, listen.port())
                }
            };
            targets.push(v6);
            listen_v6 = Some(v6);
        }
        let mut families = Vec::new();
        for target in targets {
            let family = if target.is_ipv4() {
                "iptables"
            } else {
                "ip6tables"
            };
            let backend = match args.iptables_backend {
                Backend::Nft => "nft",
                Backend::Legacy => "legacy",
                Backend::Auto => detect(family).await,
            };
            let family = Family {
                rules: Rules {
                    target,
                    interfaces: interfaces.clone(),
                },
                iptables: format!("{family}-{backend}"),
                restore: format!("{family}-{backend}-restore"),
            };
            // Fails clearly without NET_ADMIN (or without the binaries).
            family.iptables(&["-t", "nat", "-S", "PREROUTING"]).await?;
            tracing::info!(backend = %family.iptables, interfaces = %args.host_interface, %target, "interception configured");
            families.push(family);
        }
        Ok(Some(Self {
            families,
            listen_v6,
            interval: args.rules_interval.max(Duration::from_millis(100)),
            remove_on_exit: args.remove_rules_on_exit,
        }))
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

    /// Keeps the rules until `shutdown`; `ready` is open while they are verified.
    pub async fn run(self, ready: Gate, shutdown: CancellationToken) {
        loop {
            match self.install().await {
                Ok(true) => {
                    tracing::info!("interception rules installed");
                    ready.open();
                }
                Ok(false) => ready.open(),
                Err(error) => {
                    ready.close();
                    tracing::error!(%error, "interception rules could not be installed; retrying");
                }
            }
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
}

// === impl Family ===

impl Family {
    async fn install(&self) -> Result<bool, InterceptError> {
        let mut changed = false;
        let listing = self.iptables(&["-t", "nat", "-S", CHAIN]).await;
        let current: Vec<String> = match &listing {
            Ok(out) => String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::to_string)
                .collect(),
            Err(_) => Vec::new(),
        };
        if current != self.rules.chain_listing() {
            self.restore(&self.rules.chain_restore()).await?;
            changed = true;
        }
        let prerouting = self.iptables(&["-t", "nat", "-S", "PREROUTING"]).await?;
        let ours: Vec<String> = String::from_utf8_lossy(&prerouting.stdout)
            .lines()
            .filter(|l| l.contains(COMMENT))
            .filter_map(|l| l.strip_prefix("-A PREROUTING ").map(str::to_string))
            .collect();
        let wanted = self.rules.jumps();
        for (i, jump) in wanted.iter().enumerate() {
            if !ours.contains(jump) {
                let position = (i + 1).to_string();
                let mut args = vec!["-t", "nat", "-I", "PREROUTING", position.as_str()];
                let parts = split_args(jump);
                args.extend(parts.iter().map(String::as_str));
                self.iptables(&args).await?;
                changed = true;
            }
        }
        for stale in ours.iter().filter(|j| !wanted.contains(j)) {
            let mut args = vec!["-t", "nat", "-D", "PREROUTING"];
            let parts = split_args(stale);
            args.extend(parts.iter().map(String::as_str));
            self.iptables(&args).await?;
            changed = true;
        }
        if changed {
            self.flush_conntrack().await;
        }
        Ok(changed)
    }

    /// Removes our jumps and chain.
    async fn remove(&self) {
        for jump in self.rules.jumps() {
            let mut args = vec!["-t", "nat", "-D", "PREROUTING"];
            let parts = split_args(&jump);
            args.extend(parts.iter().map(String::as_str));
            let _ = self.iptables(&args).await;
        }
        let _ = self.iptables(&["-t", "nat", "-F", CHAIN]).await;
        let _ = self.iptables(&["-t", "nat", "-X", CHAIN]).await;
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
        let family = if self.rules.target.is_ipv4() {
            "ipv4"
        } else {
            "ipv6"
        };
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
    links: Vec<String>,
}

/// The node's addresses, interface names and default IPv6 route, over rtnetlink.
async fn read_node() -> Result<Node, InterceptError> {
    let netlink = |e: rtnetlink::Error| InterceptError::Netlink(e.to_string());
    let (connection, handle, _) =
        rtnetlink::new_connection().map_err(|e| InterceptError::Netlink(e.to_string()))?;
    let task = tokio::spawn(connection);
    let mut node = Node {
        addresses: Vec::new(),
        global_v6: None,
        links: Vec::new(),
    };
    // Interfaces with a default IPv6 route.
    let mut uplinks = Vec::new();
    let mut routes = handle
        .route()
        .get(RouteMessageBuilder::<Ipv6Addr>::new().build())
        .execute();
    while let Some(msg) = routes.try_next().await.map_err(netlink)? {
        if msg.header.destination_prefix_length == 0 {
            uplinks.extend(msg.attributes.iter().filter_map(|a| match a {
                RouteAttribute::Oif(index) => Some(*index),
                _ => None,
            }));
        }
    }
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
                // Not the metadata address itself (on the node's lo, where EC2 answers).
                if ip.is_ipv6()
                    && msg.header.scope == AddressScope::Universe
                    && !unusable
                    && !ip.is_loopback()
                    && ip.to_string() != rules::METADATA_V6
                    && uplinks.contains(&msg.header.index)
                    && node.global_v6.is_none()
                {
                    node.global_v6 = Some(*ip);
                }
            }
        }
    }
    let mut links = handle.link().get().execute();
    while let Some(msg) = links.try_next().await.map_err(netlink)? {
        for a in &msg.attributes {
            if let LinkAttribute::IfName(name) = a {
                node.links.push(name.clone());
            }
        }
    }
    task.abort();
    Ok(node)
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
