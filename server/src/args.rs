//! Command-line flags of the server, validated here and handed to [`crate::run`], which
//! builds the runtime. Every flag has a `PODIAM_*` environment variable; names follow
//! kiam and kube2iam where their users would look.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use kube::config::{KubeConfigOptions, Kubeconfig};
use podiam_common::{
    admin::AdminArgs,
    annotations,
    arn::{BaseRoleArn, RoleArn},
    listen::ConnectionLimits,
    logging::LogArgs,
    pod_identity,
    tls::TlsArgs,
};

use crate::{
    auth::{self, AgentTokens, TokenReviewer, Unbound},
    credentials::{CHAINED_MAX, LookupSettings, SessionScope, SessionSettings},
    explain::ExplainArgs,
    feed::FeedSettings,
    policy::{MAX_SESSION, MIN_SESSION, PolicyConfig},
    run,
    sts::{BrokerConfig, aws::StsSettings},
    webhook::{self, WebhookSettings},
};

/// podiam server: maps pod IPs to pods and pods to IAM roles, checks each role against its
/// namespace's policy, and assumes it through STS for the agents (mutual TLS). Run
/// without a subcommand to serve.
#[derive(Debug, Parser)]
#[command(name = "podiam-server", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    #[command(flatten)]
    serve: ServeArgs,

    #[command(flatten)]
    admin: AdminArgs,

    #[command(flatten)]
    kube: KubeArgs,

    #[command(flatten)]
    policy: PolicyArgs,

    #[command(flatten)]
    log: LogArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the decision for one pod and why: what to run when a pod gets no credentials.
    /// Exit status: 0 allowed, 1 denied, 2 could not decide.
    Explain(ExplainArgs),
}

/// How to reach the Kubernetes API server.
#[derive(Clone, Debug, clap::Args)]
pub struct KubeArgs {
    /// Path to a kubeconfig file. Without it: the kubeconfig from $KUBECONFIG (else
    /// ~/.kube/config) if it loads, else the in-cluster service account; with
    /// --kube-context, that kubeconfig only.
    #[arg(long, env = "PODIAM_KUBECONFIG", global = true)]
    pub kubeconfig: Option<PathBuf>,

    /// The kubeconfig context to use (default: the current context). Without --kubeconfig,
    /// the kubeconfig comes from $KUBECONFIG or ~/.kube/config, with no in-cluster fallback.
    #[arg(long, env = "PODIAM_KUBE_CONTEXT", global = true)]
    pub kube_context: Option<String>,
}

/// Role resolution.
#[derive(Clone, Debug, clap::Args)]
pub struct PolicyArgs {
    /// Base ARN for roles given as a name or path/name, e.g.
    /// arn:aws:iam::123456789012:role/ (kiam: --role-base-arn). Empty means unset.
    #[arg(
        long,
        env = "PODIAM_BASE_ROLE_ARN",
        alias = "role-base-arn",
        global = true,
        value_name = "ARN"
    )]
    pub base_role_arn: Option<String>,

    /// Role for pods without an iam.amazonaws.com/role annotation (name or ARN). It is
    /// checked against the namespace policy like any other role. Empty means none.
    #[arg(long, env = "PODIAM_DEFAULT_ROLE", global = true, value_name = "ROLE")]
    pub default_role: Option<String>,

    /// Let mirror pods (static pods' API copies: kubernetes.io/config.mirror, or a Node
    /// owner) have roles. Off by default: any node's kubelet may create a mirror pod in
    /// any namespace with any annotations, so with this on, root on one node can claim
    /// any role some namespace permits.
    #[arg(long, env = "PODIAM_ALLOW_MIRROR_PODS", global = true)]
    pub allow_mirror_pods: bool,

    /// The pod annotation that names the role, for kube2iam users who renamed it
    /// (kube2iam: --iam-role-key). It replaces the standard key.
    #[arg(long, env = "PODIAM_IAM_ROLE_KEY", global = true, default_value = annotations::ROLE, value_name = "KEY")]
    pub iam_role_key: String,

    /// The pod annotation that holds the external ID (kube2iam: --iam-external-id, which
    /// names a key, not an ID).
    #[arg(long, env = "PODIAM_IAM_EXTERNAL_ID", global = true, default_value = annotations::EXTERNAL_ID, value_name = "KEY")]
    pub iam_external_id: String,

    /// The pod annotation that holds the session name (kube2iam:
    /// --iam-role-session-name-key).
    #[arg(long, env = "PODIAM_IAM_ROLE_SESSION_NAME_KEY", global = true, default_value = annotations::SESSION_NAME, value_name = "KEY")]
    pub iam_role_session_name_key: String,

    /// The namespace annotation with the allowed-roles glob list (kube2iam:
    /// --namespace-key). kiam's iam.amazonaws.com/permitted is read as well.
    #[arg(long, env = "PODIAM_NAMESPACE_KEY", global = true, default_value = annotations::ALLOWED_ROLES, value_name = "KEY")]
    pub namespace_key: String,
}

/// What only the serving server needs.
#[derive(Clone, Debug, clap::Args)]
struct ServeArgs {
    /// Address of the agent API (HTTP/2, mutual TLS).
    #[arg(long, env = "PODIAM_LISTEN", default_value = "0.0.0.0:8443")]
    listen: SocketAddr,

    #[command(flatten)]
    tls: TlsArgs,

    #[command(flatten)]
    sts: StsArgs,

    #[command(flatten)]
    binding: BindingArgs,

    #[command(flatten)]
    pod_identity: PodIdentityArgs,

    #[command(flatten)]
    limits: LimitsArgs,

    /// Derive --base-role-arn from the server's own AWS account (sts:GetCallerIdentity)
    /// when it is not given (kiam: --role-base-arn-autodetect).
    #[arg(
        long,
        env = "PODIAM_BASE_ROLE_ARN_AUTODETECT",
        alias = "role-base-arn-autodetect"
    )]
    base_role_arn_autodetect: bool,

    /// How long the pod or namespace watch may keep failing (API server unreachable, 403
    /// after an RBAC change) before the server stops answering from its stale index: it
    /// reports not ready and refuses requests with not_ready (agents turn to another
    /// replica) until a fresh list succeeds.
    #[arg(long, env = "PODIAM_WATCH_STALE_AFTER", default_value = "60s", value_parser = humantime::parse_duration)]
    watch_stale_after: Duration,

    /// How long a request from an IP that no pod has (yet) waits for the pod to appear.
    #[arg(long, env = "PODIAM_IP_LOOKUP_WAIT", default_value = "3s", value_parser = humantime::parse_duration)]
    ip_lookup_wait: Duration,

    /// How many requests from one node's agent may wait for an unknown IP at once (see
    /// --ip-lookup-wait); more are answered "not found" at once, which SDKs retry.
    #[arg(long, env = "PODIAM_MAX_WAITING_LOOKUPS", default_value_t = 64)]
    max_waiting_lookups: usize,

    /// How often the node feed sends an agent an update when nothing changed; an agent
    /// that hears nothing for three intervals turns to another replica.
    #[arg(long, env = "PODIAM_FEED_HEARTBEAT", default_value = "5s", value_parser = humantime::parse_duration)]
    feed_heartbeat: Duration,

    /// At most one Kubernetes Event per pod and reason per this interval.
    #[arg(long, env = "PODIAM_EVENT_INTERVAL", default_value = "5m", value_parser = humantime::parse_duration)]
    event_interval: Duration,

    /// Label podiam_credentials_issued_total by role ARN (one series per role: mind the
    /// cardinality).
    #[arg(long, env = "PODIAM_METRICS_ROLE_LABELS")]
    metrics_role_labels: bool,
}

/// STS and sessions.
#[derive(Clone, Debug, clap::Args)]
struct StsArgs {
    /// AWS region of the STS endpoint (regional, partition-aware: cn-north-1 uses
    /// amazonaws.com.cn). Default: from the environment or the instance metadata.
    #[arg(long, env = "PODIAM_REGION")]
    region: Option<String>,

    /// STS endpoint URL, overriding the regional one (a VPC endpoint, or a test STS).
    #[arg(long, env = "PODIAM_STS_ENDPOINT", value_name = "URL")]
    sts_endpoint: Option<String>,

    /// Assume this role first and assume pod roles from its session (role chaining:
    /// sessions then last at most 1 h). Empty means none.
    #[arg(long, env = "PODIAM_ASSUME_ROLE_ARN", value_name = "ARN")]
    assume_role_arn: Option<String>,

    /// Session duration when a pod's iam.amazonaws.com/session-duration sets none
    /// (kiam: --session-duration).
    #[arg(long, env = "PODIAM_SESSION_DURATION", default_value = "1h", value_parser = humantime::parse_duration)]
    session_duration: Duration,

    /// Refresh sessions in use this long before they expire (kiam: --session-refresh).
    /// Credentials with less than 15 min left are never handed out.
    #[arg(long, env = "PODIAM_SESSION_REFRESH", default_value = "20m", value_parser = humantime::parse_duration)]
    session_refresh: Duration,

    /// Tag sessions with kubernetes-namespace, kubernetes-pod-name and
    /// kubernetes-service-account (role trust policies must allow sts:TagSession).
    #[arg(long, env = "PODIAM_SESSION_TAGS")]
    session_tags: bool,

    /// Who shares an STS session: `pod` (one per pod, named NAMESPACE.POD, so CloudTrail
    /// names the pod) or `role` (one per role, named podiam-ROLE, as kiam does: STS calls
    /// grow with roles, not pods). `role` cannot be combined with --session-tags.
    #[arg(long, env = "PODIAM_SESSION_SCOPE", value_enum, default_value_t = SessionScope::Pod)]
    session_scope: SessionScope,

    /// Timeout of one AssumeRole attempt (up to 3 attempts with backoff).
    #[arg(long, env = "PODIAM_STS_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    sts_timeout: Duration,

    /// How long a failed AssumeRole is remembered for the same session before retrying.
    #[arg(long, env = "PODIAM_STS_NEGATIVE_CACHE", default_value = "5s", value_parser = humantime::parse_duration)]
    sts_negative_cache: Duration,

    /// kiam's prefetch queue capacity: accepted so that kiam manifests keep working, and
    /// ignored with a warning. podiam's queue never drops a prefetch (kiam's did when
    /// full); --prefetch-rate paces it instead.
    #[arg(long, env = "PODIAM_PREFETCH_BUFFER_SIZE")]
    prefetch_buffer_size: Option<usize>,

    /// AssumeRole calls per second at most for prefetching (pods that appear, the node
    /// feeds, the start-up sweep); 0 means no limit. STS quotas are per account and
    /// region: leave room for everything else that assumes roles there.
    #[arg(long, env = "PODIAM_PREFETCH_RATE", default_value_t = 100)]
    prefetch_rate: u32,

    /// Prefetch AssumeRole calls in flight at most; 0 turns prefetching off (every pod's
    /// first request then waits for STS).
    #[arg(long, env = "PODIAM_PREFETCH_CONCURRENCY", default_value_t = 32)]
    prefetch_concurrency: usize,
}

/// Node binding: which agent may ask for which pod.
#[derive(Clone, Debug, clap::Args)]
struct BindingArgs {
    /// Answer an agent only for pods on its own node, learnt from its ServiceAccount token
    /// (TokenReview). `off` is for clusters whose tokens carry no node name.
    #[arg(long, env = "PODIAM_NODE_BINDING", value_enum, default_value_t = Binding::On)]
    node_binding: Binding,

    /// The agents' ServiceAccount, NAMESPACE/NAME: tokens of any other account are refused.
    #[arg(
        long,
        env = "PODIAM_AGENT_SERVICE_ACCOUNT",
        default_value = "podiam/podiam-agent"
    )]
    agent_service_account: String,

    /// The audience of the agents' projected ServiceAccount tokens.
    #[arg(long, env = "PODIAM_TOKEN_AUDIENCE", default_value = "podiam")]
    token_audience: String,

    /// How long an accepted token is trusted before it is reviewed again.
    #[arg(long, env = "PODIAM_TOKEN_REVIEW_CACHE", default_value = "30s", value_parser = humantime::parse_duration)]
    token_review_cache: Duration,
}

/// The container-credentials path (EKS Pod Identity's, on any cluster).
#[derive(Clone, Debug, clap::Args)]
struct PodIdentityArgs {
    /// Serve the container-credentials path: watch ServiceAccounts and
    /// PodIdentityAssociation objects (the CRD from deploy/ must be installed, or the
    /// server never becomes ready), and give pods their ServiceAccount's role for their
    /// projected token.
    #[arg(long, env = "PODIAM_POD_IDENTITY")]
    pod_identity: bool,

    /// The audience of pods' projected tokens on that path (EKS Pod Identity's, so pod
    /// specs written for it work unchanged).
    #[arg(long, env = "PODIAM_POD_IDENTITY_AUDIENCE", default_value = pod_identity::DEFAULT_AUDIENCE)]
    pod_identity_audience: String,

    /// The cluster's name, for the eks-cluster-name session tag. Empty: no such tag.
    #[arg(long, env = "PODIAM_CLUSTER_NAME")]
    cluster_name: Option<String>,

    /// The value of the eks-cluster-arn session tag (any stable identifier of the cluster
    /// that IAM policies may test). Empty: no such tag.
    #[arg(long, env = "PODIAM_CLUSTER_ARN")]
    cluster_arn: Option<String>,

    /// Address of the mutating admission webhook (HTTPS with the --cert and --key of the
    /// agent API, no client certificate), served with --pod-identity.
    #[arg(long, env = "PODIAM_WEBHOOK_LISTEN", default_value = "0.0.0.0:9443")]
    webhook_listen: SocketAddr,

    /// Require a client certificate that chains to this CA (PEM) on the webhook: set it
    /// when the API server presents one to webhooks (its --admission-control-config-file
    /// names a kubeconfig with a client certificate for the webhook's host), so that only
    /// the API server can call the webhook. Default: none (any client that reaches the
    /// port, which the NetworkPolicy narrows).
    #[arg(long, env = "PODIAM_WEBHOOK_CLIENT_CA", value_name = "PATH")]
    webhook_client_ca: Option<PathBuf>,

    /// The endpoint URI the webhook gives pods (http://[fd00:ec2::23]/v1/credentials on
    /// IPv6-only clusters).
    #[arg(long, env = "PODIAM_POD_IDENTITY_URI", default_value = pod_identity::FULL_URI_V4)]
    pod_identity_uri: String,
}

/// What one party (a node, an address that reaches a port) may make the server hold.
#[derive(Clone, Debug, clap::Args)]
struct LimitsArgs {
    /// Connections to the agent API at once (each agent holds one or two per replica);
    /// more are closed at accept.
    #[arg(long, env = "PODIAM_MAX_AGENT_CONNECTIONS", default_value_t = 16_384)]
    max_agent_connections: usize,

    /// Connections to the agent API at once from one address (a node's agent needs two).
    #[arg(
        long,
        env = "PODIAM_MAX_AGENT_CONNECTIONS_PER_SOURCE",
        default_value_t = 16
    )]
    max_agent_connections_per_source: usize,

    /// Node feed subscriptions of one node at once; a newer one ends the oldest (an agent
    /// keeps one, and two while it moves between replicas).
    #[arg(long, env = "PODIAM_MAX_FEEDS_PER_NODE", default_value_t = 2)]
    max_feeds_per_node: usize,

    /// Container-credentials TokenReviews in flight at once for one node's agent (64 at
    /// most in all): one node's flood of forged tokens waits for its own share.
    #[arg(long, env = "PODIAM_MAX_TOKEN_REVIEWS_PER_NODE", default_value_t = 8)]
    max_token_reviews_per_node: usize,

    /// Connections to the admission webhook at once; more are closed at accept.
    #[arg(long, env = "PODIAM_MAX_WEBHOOK_CONNECTIONS", default_value_t = webhook::DEFAULT_LIMITS.total)]
    max_webhook_connections: usize,

    /// Connections to the admission webhook at once from one address.
    #[arg(long, env = "PODIAM_MAX_WEBHOOK_CONNECTIONS_PER_SOURCE", default_value_t = webhook::DEFAULT_LIMITS.per_source)]
    max_webhook_connections_per_source: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Binding {
    On,
    Off,
}

// === impl Cli ===

impl Cli {
    /// Runs the server or the subcommand; the exit code says how it went.
    pub async fn run(self) -> ExitCode {
        let Cli {
            command,
            serve,
            admin,
            kube,
            policy,
            log,
        } = self;
        if let Err(error) = log.init() {
            eprintln!("podiam-server: {error}");
            return ExitCode::from(2);
        }
        // Read everywhere a key is read or named, so set before anything else runs.
        match policy.keys() {
            Ok(keys) => {
                if keys != annotations::STANDARD {
                    tracing::info!(
                        role = keys.role,
                        external_id = keys.external_id,
                        session_name = keys.session_name,
                        allowed_roles = keys.allowed_roles,
                        "renamed annotation keys"
                    );
                }
                // The first and only time in this process.
                let _ = annotations::set_keys(keys);
            }
            Err(error) => {
                tracing::error!("{error:#}");
                return ExitCode::from(2);
            }
        }
        match command {
            Some(Command::Explain(args)) => {
                let policy = match policy.config(None) {
                    Ok(policy) => policy,
                    Err(error) => {
                        tracing::error!("{error:#}");
                        return ExitCode::from(2);
                    }
                };
                let code = args.run(&kube, &policy, &mut std::io::stdout()).await;
                ExitCode::from(code)
            }
            None => match serve.run(admin, kube, policy).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    tracing::error!("{error:#}");
                    ExitCode::from(2)
                }
            },
        }
    }
}

// === impl ServeArgs ===

impl ServeArgs {
    /// Validates the flags and hands them to [`run::serve`].
    async fn run(self, admin: AdminArgs, kube: KubeArgs, policy: PolicyArgs) -> anyhow::Result<()> {
        let ServeArgs {
            listen,
            tls,
            sts,
            binding,
            pod_identity,
            limits,
            base_role_arn_autodetect,
            watch_stale_after,
            ip_lookup_wait,
            max_waiting_lookups,
            feed_heartbeat,
            event_interval,
            metrics_role_labels,
        } = self;
        let AdminArgs { admin_addr } = admin;
        let admin_addr = admin_addr.unwrap_or(SocketAddr::from((
            [0, 0, 0, 0],
            podiam_common::admin::DEFAULT_PORT,
        )));
        if watch_stale_after < Duration::from_secs(1) {
            bail!(
                "--watch-stale-after must be at least 1s (a single watch error would make the index stale)"
            );
        }
        if feed_heartbeat < Duration::from_millis(100) || feed_heartbeat > Duration::from_secs(60) {
            bail!("--feed-heartbeat must be between 100ms and 60s");
        }
        if max_waiting_lookups == 0 {
            bail!("--max-waiting-lookups must be at least 1");
        }
        // Flags first, so that a bad value fails before anything connects.
        let (sts_settings, broker, mut sessions) = sts.settings()?;
        let PodIdentityArgs {
            pod_identity,
            pod_identity_audience,
            cluster_name,
            cluster_arn,
            webhook_listen,
            webhook_client_ca,
            pod_identity_uri,
        } = pod_identity;
        let LimitsArgs {
            max_agent_connections,
            max_agent_connections_per_source,
            max_feeds_per_node,
            max_token_reviews_per_node,
            max_webhook_connections,
            max_webhook_connections_per_source,
        } = limits;
        for (flag, value) in [
            ("--max-agent-connections", max_agent_connections),
            (
                "--max-agent-connections-per-source",
                max_agent_connections_per_source,
            ),
            ("--max-feeds-per-node", max_feeds_per_node),
            ("--max-token-reviews-per-node", max_token_reviews_per_node),
            ("--max-webhook-connections", max_webhook_connections),
            (
                "--max-webhook-connections-per-source",
                max_webhook_connections_per_source,
            ),
        ] {
            if value == 0 {
                bail!("{flag} must be at least 1");
            }
        }
        if ![pod_identity::FULL_URI_V4, pod_identity::FULL_URI_V6]
            .contains(&pod_identity_uri.as_str())
        {
            bail!(
                "--pod-identity-uri must be {} or {} (the addresses the SDKs accept and the agents serve)",
                pod_identity::FULL_URI_V4,
                pod_identity::FULL_URI_V6
            );
        }
        sessions.cluster_name = non_empty(&cluster_name).map(str::to_string);
        sessions.cluster_arn = non_empty(&cluster_arn).map(str::to_string);
        for (flag, value) in [
            ("--cluster-name", &sessions.cluster_name),
            ("--cluster-arn", &sessions.cluster_arn),
        ] {
            if value.as_ref().is_some_and(|v| v.chars().count() > 256) {
                bail!("{flag} must be at most 256 characters (an STS tag value)");
            }
        }
        if pod_identity && pod_identity_audience.trim().is_empty() {
            bail!("--pod-identity-audience must not be empty");
        }
        if pod_identity && pod_identity_audience == binding.token_audience {
            bail!(
                "--pod-identity-audience must differ from --token-audience: a pod's token for the agents' audience must never pass for one of the container-credentials path, nor the other way round"
            );
        }
        let token_review_cache = binding.token_review_cache;
        let webhook = pod_identity.then(|| {
            (
                webhook_listen,
                WebhookSettings {
                    audience: pod_identity_audience.clone(),
                    full_uri: pod_identity_uri,
                    token_expiration: pod_identity::TOKEN_EXPIRATION_SECS,
                },
                ConnectionLimits {
                    total: max_webhook_connections,
                    per_source: max_webhook_connections_per_source,
                },
                webhook_client_ca,
            )
        });
        let autodetect = base_role_arn_autodetect && non_empty(&policy.base_role_arn).is_none();
        if !autodetect {
            policy.config(None)?;
        }
        run::serve(run::Serve {
            listen,
            admin_addr,
            tls,
            sts: sts_settings,
            broker,
            sessions,
            authenticator: Box::new(move |client| binding.authenticator(client)),
            pod_tokens: pod_identity.then(|| {
                Box::new(move |client| {
                    TokenReviewer::new(client, pod_identity_audience, token_review_cache)
                        .per_party(max_token_reviews_per_node)
                }) as Box<dyn FnOnce(kube::Client) -> TokenReviewer + Send>
            }),
            api_limits: ConnectionLimits {
                total: max_agent_connections,
                per_source: max_agent_connections_per_source,
            },
            webhook,
            kube,
            policy: Box::new(move |detected| policy.config(detected)),
            autodetect,
            watch_stale_after,
            lookup: LookupSettings {
                wait: ip_lookup_wait,
                max_waiting: max_waiting_lookups,
            },
            feed: FeedSettings {
                heartbeat: feed_heartbeat,
                max_per_node: max_feeds_per_node,
            },
            event_interval,
            metrics_role_labels,
        })
        .await
    }
}

// === impl StsArgs ===

impl StsArgs {
    fn settings(&self) -> anyhow::Result<(StsSettings, BrokerConfig, SessionSettings)> {
        let StsArgs {
            region,
            sts_endpoint,
            assume_role_arn,
            session_duration,
            session_refresh,
            session_tags,
            session_scope,
            sts_timeout,
            sts_negative_cache,
            prefetch_buffer_size,
            prefetch_rate,
            prefetch_concurrency,
        } = self;
        let min_refresh = Duration::from_secs(15 * 60);
        if let Some(size) = prefetch_buffer_size {
            tracing::warn!(
                size,
                "--prefetch-buffer-size (kiam) is ignored: podiam's prefetch queue never drops; --prefetch-rate paces it"
            );
        }
        if !(MIN_SESSION..=MAX_SESSION).contains(session_duration) {
            bail!(
                "--session-duration must be between 30m and 12h (STS limits, and the 15 min SDKs need)"
            );
        }
        if *session_refresh <= min_refresh || *session_refresh >= *session_duration {
            bail!(
                "--session-refresh must be more than 15m (credentials with less are never handed out) and less than --session-duration"
            );
        }
        let assume_role_arn = non_empty(assume_role_arn).map(str::to_string);
        if let Some(arn) = &assume_role_arn {
            RoleArn::parse(arn).with_context(|| format!("invalid --assume-role-arn {arn:?}"))?;
            if *session_duration > CHAINED_MAX {
                tracing::warn!(
                    "--assume-role-arn: chained sessions last at most 1h; longer --session-duration and annotations are capped"
                );
            }
        }
        let sts = StsSettings {
            region: non_empty(region).map(str::to_string),
            endpoint: non_empty(sts_endpoint).map(str::to_string),
            chained: assume_role_arn.is_some(),
            assume_role_arn,
            attempt_timeout: *sts_timeout,
        };
        let broker = BrokerConfig {
            refresh_before: *session_refresh,
            negative_ttl: *sts_negative_cache,
            prefetch_rate: std::num::NonZeroU32::new(*prefetch_rate),
            prefetch_concurrency: *prefetch_concurrency,
            ..BrokerConfig::default()
        };
        if *session_tags && *session_scope == SessionScope::Role {
            bail!(
                "--session-tags tags a session with its pod: it needs --session-scope pod (one session per pod)"
            );
        }
        let sessions = SessionSettings {
            default_duration: *session_duration,
            chained: sts.chained,
            tags: *session_tags,
            scope: *session_scope,
            cluster_name: None,
            cluster_arn: None,
        };
        Ok((sts, broker, sessions))
    }
}

// === impl BindingArgs ===

impl BindingArgs {
    fn authenticator(&self, client: kube::Client) -> anyhow::Result<Arc<dyn auth::Authenticate>> {
        let BindingArgs {
            node_binding,
            agent_service_account,
            token_audience,
            token_review_cache,
        } = self;
        if *node_binding == Binding::Off {
            tracing::warn!(
                "--node-binding=off: any agent with a valid client certificate may obtain credentials for pods on any node"
            );
            return Ok(auth::shared(Unbound));
        }
        let Some((namespace, name)) = agent_service_account
            .split_once('/')
            .filter(|(ns, n)| !ns.is_empty() && !n.is_empty())
        else {
            bail!("--agent-service-account must be NAMESPACE/NAME, got {agent_service_account:?}");
        };
        let reviewer = TokenReviewer::new(client, token_audience.clone(), *token_review_cache);
        Ok(auth::shared(AgentTokens::new(reviewer, namespace, name)))
    }
}

// === impl KubeArgs ===

impl KubeArgs {
    /// A client for the configured cluster.
    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        kube::Client::try_from(self.config().await?).context("building the Kubernetes client")
    }

    /// The client configuration the flags (or the environment) name.
    pub async fn config(&self) -> anyhow::Result<kube::Config> {
        let options = KubeConfigOptions {
            context: self.kube_context.clone(),
            ..Default::default()
        };
        let config = match &self.kubeconfig {
            Some(path) => {
                let file = Kubeconfig::read_from(path)
                    .with_context(|| format!("reading kubeconfig {}", path.display()))?;
                kube::Config::from_custom_kubeconfig(file, &options)
                    .await
                    .with_context(|| format!("loading kubeconfig {}", path.display()))?
            }
            None if self.kube_context.is_some() => kube::Config::from_kubeconfig(&options)
                .await
                .context("loading the kubeconfig")?,
            None => kube::Config::infer()
                .await
                .context("finding a Kubernetes configuration (kubeconfig, then in-cluster)")?,
        };
        Ok(config)
    }
}

// === impl PolicyArgs ===

impl PolicyArgs {
    /// The annotation keys the flags name (kube2iam's renamed keys, or the standard ones).
    pub fn keys(&self) -> anyhow::Result<annotations::Keys> {
        Ok(annotations::Keys::renamed(
            &self.iam_role_key,
            &self.iam_external_id,
            &self.iam_role_session_name_key,
            &self.namespace_key,
        )?)
    }

    /// Validates the flags; `detected` is the base ARN found by autodetection, used when
    /// --base-role-arn is not given.
    pub fn config(&self, detected: Option<String>) -> anyhow::Result<PolicyConfig> {
        let PolicyArgs {
            base_role_arn,
            default_role,
            allow_mirror_pods,
            iam_role_key: _,
            iam_external_id: _,
            iam_role_session_name_key: _,
            namespace_key: _,
        } = self;
        let base_role_arn = match non_empty(base_role_arn).map(str::to_string).or(detected) {
            Some(v) => Some(
                v.parse::<BaseRoleArn>()
                    .with_context(|| format!("invalid --base-role-arn {v:?}"))?,
            ),
            None => None,
        };
        let default_role = match non_empty(default_role) {
            Some(v) => Some(
                RoleArn::resolve(v, base_role_arn.as_ref())
                    .with_context(|| format!("invalid --default-role {v:?}"))?,
            ),
            None => None,
        };
        Ok(PolicyConfig {
            base_role_arn,
            default_role,
            allow_mirror_pods: *allow_mirror_pods,
        })
    }
}

fn non_empty(value: &Option<String>) -> Option<&str> {
    value.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_flag_has_an_env_var() {
        fn check(cmd: &clap::Command) {
            for arg in cmd.get_arguments() {
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
            for sub in cmd.get_subcommands() {
                check(sub);
            }
        }
        check(&Cli::command());
    }

    #[test]
    fn shared_flags_work_after_the_subcommand() {
        let cli = Cli::try_parse_from([
            "podiam-server",
            "explain",
            "--namespace",
            "ns",
            "--pod",
            "p",
            "--base-role-arn",
            "arn:aws:iam::123456789012:role/",
        ])
        .unwrap();
        assert!(matches!(cli.command, Some(Command::Explain(_))));
        assert_eq!(
            cli.policy.base_role_arn.as_deref(),
            Some("arn:aws:iam::123456789012:role/")
        );
        // kiam's spelling.
        let cli = Cli::try_parse_from(["podiam-server", "--role-base-arn", "x"]).unwrap();
        assert_eq!(cli.policy.base_role_arn.as_deref(), Some("x"));
    }

    #[test]
    fn policy_flags_are_validated() {
        let args = |base: &str, default: &str| PolicyArgs {
            base_role_arn: Some(base.into()),
            default_role: Some(default.into()),
            allow_mirror_pods: false,
            iam_role_key: annotations::ROLE.into(),
            iam_external_id: annotations::EXTERNAL_ID.into(),
            iam_role_session_name_key: annotations::SESSION_NAME.into(),
            namespace_key: annotations::ALLOWED_ROLES.into(),
        };
        let cfg = args("arn:aws:iam::123456789012:role/", "web")
            .config(None)
            .unwrap();
        assert_eq!(
            cfg.default_role.unwrap().as_str(),
            "arn:aws:iam::123456789012:role/web"
        );
        // Empty values (e.g. an empty env var in a manifest) mean unset.
        let cfg = args("", " ").config(None).unwrap();
        assert!(cfg.base_role_arn.is_none() && cfg.default_role.is_none());
        let err = args("arn:aws:iam::1:role/", "").config(None).unwrap_err();
        assert!(format!("{err:#}").contains("--base-role-arn"), "{err:#}");
        let err = args("", "web").config(None).unwrap_err();
        // Autodetection fills a missing base.
        let cfg = args("", "web")
            .config(Some("arn:aws:iam::123456789012:role/".into()))
            .unwrap();
        assert!(cfg.default_role.is_some());
        assert!(format!("{err:#}").contains("no base role ARN"), "{err:#}");
    }
}
