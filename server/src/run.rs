//! The server's runtime, built in small steps from validated flags ([`crate::args`]):
//! the clock and STS, the Kubernetes clients, the index and the issuer, the agent API with
//! the node feed, then the tasks (listeners, watches, the start-up prefetch), any of which
//! ending before shutdown takes the process down.

use std::{future::Future, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, bail};
use podiam_common::{
    admin::Admin,
    listen::{ConnectionLimits, ListenerMetrics},
    readiness::Readiness,
    shutdown,
    tls::{TlsArgs, TlsMetrics},
};
use prometheus::Registry;
use tokio::{net::TcpListener, task::JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{
    api::{AgentApi, ApiMetrics, PodTokens},
    args::KubeArgs,
    auth::{Authenticate, TokenReviewer},
    cluster::{
        ClusterIndex,
        metrics::{IndexCollector, WatchMetrics},
        watch,
    },
    credentials::{Issuer, IssuerMetrics, LookupSettings, SessionSettings},
    events::KubeEvents,
    feed::{Feed, FeedMetrics, FeedSettings},
    policy::PolicyConfig,
    sts::{
        Broker, BrokerConfig, Clock, SystemClock,
        aws::{AwsSts, StsSettings},
        metrics::{BrokerMetrics, SessionsCollector},
    },
    webhook::{Webhook, WebhookSettings},
};

/// What [`serve`] needs, validated.
pub(crate) struct Serve {
    pub listen: SocketAddr,
    pub admin_addr: SocketAddr,
    pub tls: TlsArgs,
    pub sts: StsSettings,
    pub broker: BrokerConfig,
    pub sessions: SessionSettings,
    /// Agent authentication over a Kubernetes client (node binding or not).
    pub authenticator:
        Box<dyn FnOnce(kube::Client) -> anyhow::Result<Arc<dyn Authenticate>> + Send>,
    /// The container-credentials path, if on: the reviewer of pods' tokens.
    pub pod_tokens: Option<Box<dyn FnOnce(kube::Client) -> TokenReviewer + Send>>,
    /// The admission webhook's address, settings, connection limits and client CA (with
    /// the container-credentials path).
    pub webhook: Option<(
        SocketAddr,
        WebhookSettings,
        ConnectionLimits,
        Option<PathBuf>,
    )>,
    /// Connections to the agent API.
    pub api_limits: ConnectionLimits,
    pub kube: KubeArgs,
    /// The policy, given the base role ARN detected at start-up (if asked to).
    pub policy: Box<dyn FnOnce(Option<String>) -> anyhow::Result<PolicyConfig> + Send>,
    pub autodetect: bool,
    pub watch_stale_after: Duration,
    pub lookup: LookupSettings,
    pub feed: FeedSettings,
    pub event_interval: Duration,
    pub metrics_role_labels: bool,
}

/// Named tasks; the first to end before shutdown ends the server.
struct Tasks {
    set: JoinSet<(&'static str, anyhow::Result<()>)>,
    shutdown: CancellationToken,
}

/// Serves until shutdown.
pub(crate) async fn serve(s: Serve) -> anyhow::Result<()> {
    let Serve {
        listen,
        admin_addr,
        tls,
        sts,
        broker,
        sessions,
        authenticator,
        pod_tokens,
        webhook,
        api_limits,
        kube,
        policy,
        autodetect,
        watch_stale_after,
        lookup,
        feed,
        event_interval,
        metrics_role_labels,
    } = s;
    let shutdown = shutdown::on_signals().context("installing signal handlers")?;
    let registry = Registry::new();
    let readiness = Readiness::new();
    let tls_metrics = TlsMetrics::register(&registry)?;
    let listeners = ListenerMetrics::register(&registry)?;
    let webhook_tls = match &webhook {
        Some((_, _, _, Some(client_ca))) => Some(
            tls.webhook_server_verifying(client_ca, tls_metrics.clone(), shutdown.clone())
                .context("loading the webhook's TLS files and --webhook-client-ca")?,
        ),
        Some((_, _, _, None)) => Some(
            tls.webhook_server(tls_metrics.clone(), shutdown.clone())
                .context("loading the webhook's TLS files")?,
        ),
        None => None,
    };
    let tls = tls
        .server(tls_metrics, shutdown.clone())
        .context("loading the API's TLS files")?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let aws = AwsSts::new(&sts, clock.clone()).await;
    let detected = if autodetect {
        Some(detect_base(&aws).await?)
    } else {
        None
    };
    let policy = policy(detected)?;
    let (client, watch_client) = kube_clients(&kube).await?;

    let index = ClusterIndex::new(policy.base_role_arn.clone());
    IndexCollector::register(&registry, index.clone())?;
    let broker = Broker::new(
        Arc::new(aws),
        clock,
        broker,
        BrokerMetrics::register(&registry)?,
        shutdown.clone(),
    );
    SessionsCollector::register(&registry, broker.clone())?;
    let broker_handle = broker.clone();
    let notifier = KubeEvents::start(
        client.clone(),
        std::env::var("POD_NAME").ok(),
        event_interval,
        &registry,
        shutdown.clone(),
    )?;
    let issuer = Issuer::new(
        index.clone(),
        policy,
        broker,
        sessions,
        lookup,
        IssuerMetrics::register(&registry)?,
        Arc::new(notifier),
    );
    // The container-credentials path's own readiness (its watches): a missing CRD or a
    // revoked right stops that path, not the metadata path.
    let pod_identity_ready = Readiness::new();
    // Nothing is prefetched or refreshed from a stale index.
    broker_handle.set_demand(Arc::new(issuer.demand(
        readiness.clone(),
        pod_tokens.is_some().then(|| pod_identity_ready.clone()),
    )));
    let pod_tokens = pod_tokens.map(|reviewer| PodTokens {
        reviewer: reviewer(client.clone()),
        ready: pod_identity_ready.clone(),
    });
    let auth = authenticator(client)?;
    let feed = Feed::new(
        issuer.clone(),
        index.clone(),
        auth.clone(),
        readiness.clone(),
        feed,
        FeedMetrics::register(&registry)?,
        shutdown.clone(),
    );
    let api = AgentApi::new(
        issuer.clone(),
        auth,
        pod_tokens.clone(),
        readiness.clone(),
        ApiMetrics::register(&registry)?,
        metrics_role_labels,
    );
    let watch_metrics = WatchMetrics::register(&registry)?;
    let pods_ready = readiness.gate("pods");
    let namespaces_ready = readiness.gate("namespaces");
    let accounts_ready = pod_tokens.as_ref().map(|_| {
        (
            pod_identity_ready.gate("serviceaccounts"),
            pod_identity_ready.gate("podidentityassociations"),
        )
    });

    let webhook = match webhook {
        Some((addr, settings, limits, _)) => Some((
            addr,
            limits,
            Webhook::new(
                index.clone(),
                [readiness.clone(), pod_identity_ready.clone()],
                settings,
                &registry,
            )?,
        )),
        None => None,
    };
    let mut tasks = Tasks::new(shutdown.clone());
    let admin_listener = bind(admin_addr, "admin server").await?;
    let api_listener = bind(listen, "agent API").await?;
    let admin = Admin::new(registry, readiness.clone());
    tasks.spawn("admin server", "admin", {
        let (shutdown, admin_listeners) = (shutdown.clone(), listeners.clone());
        async move {
            admin
                .serve(admin_listener, &admin_listeners, shutdown)
                .await;
            Ok(())
        }
    });
    if let (Some((addr, limits, webhook)), Some(tls)) = (webhook, webhook_tls) {
        let listener = bind(addr, "admission webhook").await?;
        let (shutdown, listeners) = (shutdown.clone(), listeners.clone());
        tasks.spawn("admission webhook", "webhook", async move {
            webhook
                .serve(listener, tls, limits, listeners, shutdown)
                .await;
            Ok(())
        });
    }
    tasks.spawn("agent API", "api", {
        let shutdown = shutdown.clone();
        async move {
            api.serve(feed, api_listener, tls, api_limits, listeners, shutdown)
                .await;
            Ok(())
        }
    });
    let settings = |ready| watch::WatchSettings {
        ready,
        metrics: watch_metrics.clone(),
        stale_after: watch_stale_after,
        shutdown: shutdown.clone(),
    };
    let on_pod: watch::PodHook = {
        let issuer = issuer.clone();
        Arc::new(move |pod| issuer.on_pod(pod))
    };
    let pods = watch::pods(
        watch_client.clone(),
        index.clone(),
        Some(on_pod),
        settings(pods_ready),
    );
    tasks.spawn("pod watch", "watch_pods", async move { Ok(pods.await?) });
    if let Some((accounts, associations)) = accounts_ready {
        let watch =
            watch::service_accounts(watch_client.clone(), index.clone(), settings(accounts));
        tasks.spawn(
            "ServiceAccount watch",
            "watch_serviceaccounts",
            async move { Ok(watch.await?) },
        );
        let watch =
            watch::associations(watch_client.clone(), index.clone(), settings(associations));
        tasks.spawn(
            "PodIdentityAssociation watch",
            "watch_associations",
            async move { Ok(watch.await?) },
        );
    }
    let namespaces = watch::namespaces(watch_client, index, settings(namespaces_ready));
    tasks.spawn("namespace watch", "watch_namespaces", async move {
        Ok(namespaces.await?)
    });
    // Once both lists are in, warm every pod's session (pods listed before their
    // namespace could not be decided when they arrived); the container-credentials path's
    // lists too, unless they take long (a missing CRD: that path is down, not this one).
    tasks.spawn("start-up prefetch", "prefetch", async move {
        let ready = async {
            readiness.wait_ready().await;
            let _ = tokio::time::timeout(Duration::from_secs(30), pod_identity_ready.wait_ready())
                .await;
        };
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = ready => issuer.prefetch_all(),
        }
        // Finishing is this task's normal end.
        shutdown.cancelled().await;
        Ok(())
    });
    tasks.join().await
}

/// A client for requests, and one for the watches without kube's own retries: the
/// watchers back off on their own, and the client's retries of 503/429 (for minutes)
/// would hide a failing API server from the stale-index bound.
async fn kube_clients(kube: &KubeArgs) -> anyhow::Result<(kube::Client, kube::Client)> {
    let config = kube.config().await?;
    let client =
        kube::Client::try_from(config.clone()).context("building the Kubernetes client")?;
    let mut watch_config = config;
    watch_config.default_retry = false;
    let watch_client =
        kube::Client::try_from(watch_config).context("building the Kubernetes client")?;
    Ok((client, watch_client))
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the {what} to {addr}"))?;
    tracing::info!(addr = %listener.local_addr()?, "{what} listening");
    Ok(listener)
}

// === impl Tasks ===

impl Tasks {
    fn new(shutdown: CancellationToken) -> Self {
        Self {
            set: JoinSet::new(),
            shutdown,
        }
    }

    fn spawn(
        &mut self,
        name: &'static str,
        span: &'static str,
        task: impl Future<Output = anyhow::Result<()>> + Send + 'static,
    ) {
        self.set.spawn(
            async move { (name, task.await) }.instrument(tracing::info_span!("task", task = span)),
        );
    }

    /// Waits for every task; one that ends before shutdown takes the process down, loudly.
    async fn join(mut self) -> anyhow::Result<()> {
        while let Some(joined) = self.set.join_next().await {
            match joined {
                Ok((_, Ok(()))) if self.shutdown.is_cancelled() => {}
                Ok((name, Ok(()))) => bail!("{name} stopped unexpectedly"),
                Ok((name, Err(error))) => return Err(error.context(name)),
                Err(error) => bail!("a server task failed: {error}"),
            }
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// `arn:PARTITION:iam::ACCOUNT:role/` from the server's own identity.
async fn detect_base(aws: &AwsSts) -> anyhow::Result<String> {
    let arn = aws
        .caller_arn()
        .await
        .context("--base-role-arn-autodetect: sts:GetCallerIdentity failed")?;
    let fields: Vec<&str> = arn.split(':').collect();
    let (Some(partition), Some(account)) = (fields.get(1), fields.get(4)) else {
        bail!("--base-role-arn-autodetect: unexpected caller ARN {arn:?}");
    };
    let base = format!("arn:{partition}:iam::{account}:role/");
    tracing::info!(base_role_arn = %base, caller = %arn, "base role ARN detected");
    Ok(base)
}
