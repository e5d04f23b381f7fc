//! Command-line flags and the wiring of the agent. Every flag has a `PODIAM_*`
//! environment variable; names follow kiam and kube2iam where their users would look.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use anyhow::{Context, bail};
use clap::Parser;
use podiam_common::{
    admin::{self, Admin, AdminArgs},
    clock::SystemClock,
    listen::{ConnectionLimits, Limiter, ListenerMetrics},
    logging::LogArgs,
    readiness::Readiness,
    shutdown,
    tls::{TlsArgs, TlsMetrics},
};
use prometheus::Registry;
use tokio::{net::TcpListener, task::JoinSet};
use tracing::Instrument;

use crate::{
    feed::{self, FeedSettings},
    imds::{Imds, ImdsConfig, ImdsMetrics, token::TokenKey},
    intercept::{InterceptArgs, InterceptMetrics, Interceptor},
    interfaces::Interfaces,
    pod_identity::{PodIdentity, PodIdentityMetrics},
    pods,
    proxy::{DEFAULT_ALLOW, MetadataProxy},
    servers::{ServerSettings, Servers, ServersMetrics},
    table::{NodeTable, TableMetrics},
};

/// podiam agent: serves the EC2 metadata API to the pods of its node, handing each pod
/// the credentials of its own role (from the podiam servers) and nothing else.
#[derive(Debug, Parser)]
#[command(name = "podiam-agent", version, about, long_about = None)]
pub struct Cli {
    #[command(flatten)]
    imds: ImdsArgs,

    #[command(flatten)]
    servers: ServerArgs,

    #[command(flatten)]
    pod_identity: PodIdentityArgs,

    #[command(flatten)]
    intercept: InterceptArgs,

    #[command(flatten)]
    tls: TlsArgs,

    #[command(flatten)]
    admin: AdminArgs,

    #[command(flatten)]
    log: LogArgs,
}

/// The metadata endpoint.
#[derive(Clone, Debug, clap::Args)]
struct ImdsArgs {
    /// Address of the metadata endpoint (the target of the 169.254.169.254 redirect).
    /// Default: $HOST_IP:8181.
    #[arg(long, env = "PODIAM_LISTEN")]
    listen: Option<SocketAddr>,

    /// Which source addresses are pods', as CIDRs (comma list, e.g. the cluster's pod
    /// CIDR): connections from any other address are closed unanswered and counted.
    /// Required without --iptables (an operator who redirects by other means); with
    /// --iptables the kernel already admits only redirected pod traffic.
    #[arg(
        long,
        env = "PODIAM_POD_SOURCES",
        value_delimiter = ',',
        value_name = "CIDR"
    )]
    pod_sources: Vec<ipnet::IpNet>,

    /// Refuse IMDSv1 (requests without a session token).
    #[arg(long, env = "PODIAM_REQUIRE_IMDSV2")]
    require_imdsv2: bool,

    /// The node's key for IMDSv2 tokens (created, mode 0600, if missing). Keep it on the
    /// node (hostPath) so tokens stay valid across agent restarts.
    #[arg(
        long,
        env = "PODIAM_TOKEN_KEY_FILE",
        default_value = "/var/lib/podiam/imds-token.key"
    )]
    token_key_file: PathBuf,

    /// The real metadata service, HOST or HOST:PORT (kube2iam: --metadata-addr).
    #[arg(long, env = "PODIAM_METADATA_ADDR", default_value = "169.254.169.254")]
    metadata_addr: String,

    /// Paths (normalised, e.g. /latest/meta-data/instance-id) proxied to the real metadata
    /// service: a regex matched anchored, with or without a trailing slash (kiam v4:
    /// --allow-route-regexp; kiam v3's --whitelist-route-regexp is accepted too). User data
    /// and the node's iam/ are never proxied.
    #[arg(long, env = "PODIAM_ALLOW_ROUTE_REGEXP", default_value = DEFAULT_ALLOW, alias = "whitelist-route-regexp")]
    allow_route_regexp: String,

    /// Deadline of a request to the real metadata service.
    #[arg(long, env = "PODIAM_METADATA_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    metadata_timeout: Duration,

    /// Connections each pod-facing endpoint (metadata, container credentials) holds at
    /// once; more are closed at accept.
    #[arg(long, env = "PODIAM_MAX_POD_CONNECTIONS", default_value_t = pods::DEFAULT_LIMITS.total)]
    max_pod_connections: usize,

    /// Connections each pod-facing endpoint holds at once from one source address (one
    /// pod; host-network pods share the node's): a pod that opens more is refused beyond
    /// its share, and every other pod keeps its own.
    #[arg(long, env = "PODIAM_MAX_POD_CONNECTIONS_PER_SOURCE", default_value_t = pods::DEFAULT_LIMITS.per_source)]
    max_pod_connections_per_source: usize,

    /// Requests per second one source address may make of the pod-facing endpoints
    /// together, in bursts of twice that (EC2's own metadata service throttles too). A pod
    /// over it is answered at the rate, not refused: its next request waits, and its
    /// connection is not read meanwhile. 0: no limit.
    #[arg(long, env = "PODIAM_POD_REQUEST_RATE", default_value_t = 500)]
    pod_request_rate: u32,
}

/// The container-credentials endpoint (EKS Pod Identity's, on any cluster).
#[derive(Clone, Debug, clap::Args)]
struct PodIdentityArgs {
    /// Serve the container-credentials endpoint: pods' 169.254.170.23:80 (and, with
    /// --ipv6, [fd00:ec2::23]:80) is redirected to --pod-identity-port on the addresses
    /// the metadata endpoint listens on, and answered with the role of the pod's
    /// ServiceAccount for its projected token (the servers need --pod-identity too).
    #[arg(long, env = "PODIAM_POD_IDENTITY")]
    pod_identity: bool,

    /// The port of the container-credentials endpoint on the node's addresses.
    #[arg(long, env = "PODIAM_POD_IDENTITY_PORT", default_value_t = 8182)]
    pod_identity_port: u16,

    /// Container-credentials requests per second from one source address, in bursts of up
    /// to five times as many (SDKs ask once per process and then near expiry); more get
    /// 429. Each request may cost the API server a TokenReview. 0: no limit.
    #[arg(long, env = "PODIAM_POD_IDENTITY_RATE", default_value_t = 20)]
    pod_identity_rate: u32,
}

/// How to reach the podiam servers.
#[derive(Clone, Debug, clap::Args)]
struct ServerArgs {
    /// The servers, HOST:PORT (a headless Service, resolved to every replica), or several
    /// comma-separated.
    #[arg(long, env = "PODIAM_SERVER_ADDRESS")]
    server_address: Option<String>,

    /// Name the servers' certificate must carry (default: HOST of --server-address).
    #[arg(long, env = "PODIAM_SERVER_NAME")]
    server_name: Option<String>,

    /// The agent's projected ServiceAccount token (audience as the server's
    /// --token-audience), sent with every request for node binding.
    #[arg(
        long,
        env = "PODIAM_TOKEN_FILE",
        default_value = "/var/run/secrets/podiam/token"
    )]
    token_file: PathBuf,

    /// How often the server address is resolved again.
    #[arg(long, env = "PODIAM_SERVER_RESOLVE_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    server_resolve_interval: Duration,

    /// How often each server's health is checked.
    #[arg(long, env = "PODIAM_SERVER_HEALTH_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    server_health_interval: Duration,

    /// Deadline of one request to one server (then the next server is tried).
    #[arg(long, env = "PODIAM_SERVER_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    server_timeout: Duration,

    /// Subscribe to a server's feed of this node's pods and answer warm requests from it
    /// with no network call (and through a server outage, while the credentials held have
    /// 15 minutes left). `off`: every request asks a server.
    #[arg(long, env = "PODIAM_NODE_FEED", value_enum, default_value_t = Switch::On)]
    node_feed: Switch,

    /// This node's name (the downward API's spec.nodeName). The servers learn it from the
    /// agent's token when they bind agents to nodes; without node binding the feed needs it.
    #[arg(long, env = "PODIAM_NODE_NAME", default_value = "")]
    node_name: String,

    /// Bind each pod of the feed to the host interface its IP lives behind (netlink: the
    /// /32 route's veth, or the neighbour entry's MAC), and refuse a request whose IP has
    /// moved to another interface (a new pod on a reused IP) until the feed catches up.
    /// `off` only where the kernel cannot say (pods on loopback in tests).
    #[arg(long, env = "PODIAM_INTERFACE_BINDING", value_enum, default_value_t = Switch::On)]
    interface_binding: Switch,

    /// How long a request from an IP the node table does not know (yet), or one that moved
    /// to another interface, waits for the feed before it asks a server or is refused.
    #[arg(long, env = "PODIAM_TABLE_WAIT", default_value = "1s", value_parser = humantime::parse_duration)]
    table_wait: Duration,
}

/// On or off.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Switch {
    /// On.
    On,
    /// Off.
    Off,
}

// === impl Cli ===

impl Cli {
    /// Runs the agent; the exit code says how it went.
    pub async fn run(self) -> ExitCode {
        if let Err(error) = self.log.init() {
            eprintln!("podiam-agent: {error}");
            return ExitCode::from(2);
        }
        match self.serve().await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                tracing::error!("{error:#}");
                ExitCode::from(2)
            }
        }
    }

    async fn serve(self) -> anyhow::Result<()> {
        let Cli {
            imds,
            servers,
            pod_identity,
            intercept,
            tls,
            admin,
            log: _,
        } = self;
        let ImdsArgs {
            listen,
            pod_sources,
            require_imdsv2,
            token_key_file,
            metadata_addr,
            allow_route_regexp,
            metadata_timeout,
            max_pod_connections,
            max_pod_connections_per_source,
            pod_request_rate,
        } = imds;
        if max_pod_connections == 0 || max_pod_connections_per_source == 0 {
            bail!("--max-pod-connections and --max-pod-connections-per-source must be at least 1");
        }
        let pod_limits = ConnectionLimits {
            total: max_pod_connections,
            per_source: max_pod_connections_per_source,
        };
        let ServerArgs {
            server_address,
            server_name,
            token_file,
            server_resolve_interval,
            server_health_interval,
            server_timeout,
            node_feed,
            node_name,
            interface_binding,
            table_wait,
        } = servers;
        let AdminArgs { admin_addr } = admin;
        let PodIdentityArgs {
            pod_identity,
            pod_identity_port,
            pod_identity_rate,
        } = pod_identity;
        let pod_identity_port = pod_identity.then_some(pod_identity_port);

        // Flags first: a bad value fails before anything listens.
        let listen = match listen {
            Some(addr) => addr,
            None => match std::env::var("HOST_IP") {
                Ok(ip) => format!("{ip}:8181")
                    .parse()
                    .with_context(|| format!("HOST_IP={ip:?} is not an IP address"))?,
                Err(_) => bail!("--listen is required (or HOST_IP, from the downward API)"),
            },
        };
        // The node's address, as the metadata endpoint's: the metrics are for the
        // operator's scraper, not for every address of the host network.
        let admin_addr =
            admin_addr.unwrap_or_else(|| SocketAddr::new(listen.ip(), admin::DEFAULT_PORT));
        let registry = Registry::new();
        let readiness = Readiness::new();
        let imds_metrics = ImdsMetrics::register(&registry)?;
        let listeners = ListenerMetrics::register(&registry)?;

        // The rules go in before anything else that can fail at start (TLS files, the
        // token key, server addresses): a misconfigured agent leaves pods with refused
        // connections, never with the node's credentials.
        let interceptor = Interceptor::prepare(
            &intercept,
            listen,
            pod_identity_port,
            InterceptMetrics::register(&registry, imds_metrics.refused())?,
        )
        .await
        .context("setting up interception")?;
        if pod_identity_port.is_some_and(|port| port == listen.port() || port == 0) {
            bail!("--pod-identity-port must be a port of its own (not 0, not that of --listen)");
        }
        if let Some(interceptor) = &interceptor {
            interceptor
                .install()
                .await
                .context("installing the interception rules")?;
            tracing::info!("interception rules installed");
        } else if pod_sources.is_empty() {
            bail!(
                "without --iptables, --pod-sources must say which source addresses are pods' (e.g. the cluster's pod CIDR)"
            );
        }
        let Some(server_address) = server_address.filter(|a| !a.trim().is_empty()) else {
            bail!("--server-address is required (HOST:PORT of the podiam servers)");
        };
        let proxy = MetadataProxy::new(&metadata_addr, &allow_route_regexp, metadata_timeout)
            .context("invalid --allow-route-regexp")?;
        let key = TokenKey::load_or_create(&token_key_file)?;
        let shutdown = shutdown::on_signals().context("installing signal handlers")?;
        let tls = tls
            .client(TlsMetrics::register(&registry)?, shutdown.clone())
            .context("loading the agent's TLS files")?;
        let servers = Servers::start(
            ServerSettings {
                address: server_address,
                server_name,
                token_file,
                resolve_interval: server_resolve_interval,
                health_interval: server_health_interval,
                timeout: server_timeout,
            },
            tls,
            readiness.gate("servers"),
            ServersMetrics::register(&registry)?,
            shutdown.clone(),
        )?;
        let mut binding = None;
        let table = if node_feed == Switch::On {
            let interfaces = if interface_binding == Switch::On {
                let interfaces = Interfaces::start(shutdown.clone())
                    .await
                    .context("reading the node's routes and neighbours (netlink; --interface-binding=off turns binding off)")?;
                binding = Some(interfaces.clone());
                Some(interfaces)
            } else {
                tracing::warn!(
                    "--interface-binding=off: a new pod on a reused IP is caught only when the feed says the old one is gone"
                );
                None
            };
            let table = NodeTable::new(
                interfaces,
                Arc::new(SystemClock),
                TableMetrics::register(&registry)?,
            );
            let settings = FeedSettings {
                node: node_name,
                connect_timeout: server_timeout,
                first_update_timeout: Duration::from_secs(15),
            };
            tokio::spawn(
                feed::follow(servers.clone(), table.clone(), settings, shutdown.clone())
                    .instrument(tracing::info_span!("feed")),
            );
            Some(table)
        } else {
            None
        };
        let extra_listens: Vec<SocketAddr> = interceptor
            .as_ref()
            .map(|i| i.listen_v4().into_iter().chain(i.listen_v6()).collect())
            .unwrap_or_default();
        let pod_identity_listens: Vec<SocketAddr> = match (pod_identity_port, &interceptor) {
            (None, _) => Vec::new(),
            (Some(port), Some(interceptor)) => interceptor.pod_identity_listens(port),
            (Some(port), None) => vec![SocketAddr::new(listen.ip(), port)],
        };
        // The node's own addresses: where host-network pods' requests come from.
        let node_ips: Vec<std::net::IpAddr> = std::iter::once(listen.ip())
            .chain(extra_listens.iter().map(SocketAddr::ip))
            .collect();
        // Host-network pods share the node's addresses: they are not paced as one source
        // (the container path's rate limit tells them apart by pod).
        let pace = match std::num::NonZeroU32::new(pod_request_rate) {
            Some(rate) => Some(Arc::new(pods::Pace::new(
                rate,
                node_ips.clone(),
                &registry,
            )?)),
            None => None,
        };
        let metadata_limits = pods::SourceLimits {
            connections: Limiter::new("metadata", pod_limits, &listeners),
            pace: pace.clone(),
        };
        let container_limits = pods::SourceLimits {
            connections: Limiter::new("container_credentials", pod_limits, &listeners),
            pace,
        };
        let pod_identity = PodIdentity::new(
            servers.clone(),
            table.clone(),
            pod_sources.clone(),
            std::num::NonZeroU32::new(pod_identity_rate),
            node_ips.clone(),
            Arc::new(SystemClock),
            PodIdentityMetrics::register(&registry)?,
        );
        let imds = Imds::new(
            ImdsConfig {
                node_ips,
                pod_sources,
                key,
                require_v2: require_imdsv2,
                table,
                table_wait,
                clock: Arc::new(SystemClock),
                metrics: imds_metrics,
            },
            servers,
            proxy,
        );

        let admin_listener = TcpListener::bind(admin_addr)
            .await
            .with_context(|| format!("binding the admin server to {admin_addr}"))?;
        let imds_listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding the metadata endpoint to {listen}"))?;
        tracing::info!(addr = %admin_listener.local_addr()?, "admin server listening");
        tracing::info!(addr = %imds_listener.local_addr()?, "metadata endpoint listening");
        let mut extra_listeners = Vec::new();
        for addr in extra_listens {
            let family = if addr.is_ipv4() { "IPv4" } else { "IPv6" };
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the {family} metadata endpoint to {addr}"))?;
            tracing::info!(addr = %listener.local_addr()?, "{family} metadata endpoint listening");
            extra_listeners.push(listener);
        }
        let mut pod_identity_listeners = Vec::new();
        for addr in pod_identity_listens {
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the container-credentials endpoint to {addr}"))?;
            tracing::info!(addr = %listener.local_addr()?, "container-credentials endpoint listening");
            pod_identity_listeners.push(listener);
        }

        let mut tasks = JoinSet::new();
        if let Some(interceptor) = interceptor {
            // Ready only once the rules are verified, and while every pod interface is
            // covered by them.
            let rules = readiness.gate("interception");
            let interfaces = readiness.gate("pod-interfaces");
            let shutdown = shutdown.clone();
            tasks.spawn(
                async move { interceptor.run(rules, interfaces, shutdown).await }
                    .instrument(tracing::info_span!("intercept")),
            );
        }
        if let Some(interfaces) = binding {
            // A binding that no longer follows the kernel could vouch for a moved IP:
            // better no agent (pods are refused, and the DaemonSet restarts it).
            let shutdown = shutdown.clone();
            tasks.spawn(
                async move {
                    tokio::select! {
                        _ = shutdown.cancelled() => {}
                        _ = interfaces.stopped() => {
                            tracing::error!("the node's routes and neighbours are no longer followed (netlink); stopping");
                        }
                    }
                }
                .instrument(tracing::info_span!("interfaces")),
            );
        }
        let admin = Admin::new(registry, readiness);
        tasks.spawn({
            let shutdown = shutdown.clone();
            let listeners = listeners.clone();
            async move { admin.serve(admin_listener, &listeners, shutdown).await }
                .instrument(tracing::info_span!("admin"))
        });
        // One limiter per endpoint, shared by its IPv4 and IPv6 listeners.
        for listener in extra_listeners {
            let (imds, limits, shutdown) =
                (imds.clone(), metadata_limits.clone(), shutdown.clone());
            tasks.spawn(
                async move { imds.serve(listener, limits, shutdown).await }
                    .instrument(tracing::info_span!("imds")),
            );
        }
        for listener in pod_identity_listeners {
            let (endpoint, limits, shutdown) = (
                pod_identity.clone(),
                container_limits.clone(),
                shutdown.clone(),
            );
            tasks.spawn(
                async move { endpoint.serve(listener, limits, shutdown).await }
                    .instrument(tracing::info_span!("pod_identity")),
            );
        }
        tasks.spawn({
            let shutdown = shutdown.clone();
            async move { imds.serve(imds_listener, metadata_limits, shutdown).await }
                .instrument(tracing::info_span!("imds"))
        });
        // A server that stops before shutdown takes the process down, loudly.
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok(()) if shutdown.is_cancelled() => {}
                Ok(()) => bail!(
                    "an agent task (a listener, or the interface binding) stopped unexpectedly"
                ),
                Err(error) => bail!("an agent task failed: {error}"),
            }
        }
        tracing::info!("stopped");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_is_consistent_and_every_flag_has_an_env_var() {
        Cli::command().debug_assert();
        for arg in Cli::command().get_arguments() {
            if arg
                .get_long()
                .is_some_and(|l| l != "help" && l != "version")
            {
                let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
                assert!(
                    env.as_deref().is_some_and(|e| e.starts_with("PODIAM_")),
                    "--{} has no PODIAM_ env var",
                    arg.get_long().unwrap_or_default()
                );
            }
        }
    }
}
