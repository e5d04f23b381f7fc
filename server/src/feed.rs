//! The node feed ([`podiam_common::feed`]): each agent subscribes once and receives the
//! pods on its node, their decisions and their credentials, so that it answers warm
//! requests without calling a server.
//!
//! One task per subscription. It wakes when the node's pods change (the index signals
//! per node), when a namespace changes, when the broker fetches a session one of the
//! node's pods uses, or when a heartbeat is due, and it then sends only the pods whose
//! state differs from what the agent holds. Work is per change, never per request.
//! Credentials the broker does not hold yet are asked for through the broker's prefetch
//! queue (lossless, at `--prefetch-rate`), so that a thousand agents subscribing after a
//! restart do not stampede STS; the broker's announcement of the fetch wakes the feed. A
//! pod still without credentials is looked at again at each heartbeat (a failed fetch
//! is retried then, never in a loop).
//!
//! Nothing is sent from a stale view: when the server's readiness gate closes (a watch
//! failing past `--watch-stale-after`), every open stream ends with `Unavailable` ("server
//! not ready") and new subscriptions are refused until it opens, so agents turn to a
//! fresh replica and meanwhile serve only what they hold. What one node can make a
//! server hold is bounded: a subscription's held list ([`feed::MAX_HELD`], and the
//! decoder's message size), and its subscriptions at once (`--max-feeds-per-node`: a
//! newer one ends the oldest).

use std::{
    collections::{HashMap, HashSet, VecDeque},
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::Stream;
use parking_lot::Mutex;
use podiam_common::{
    feed::{self, FeedCredentials, NodeUpdate, PodState, WatchNode, node_feed_server::NodeFeed},
    readiness::Readiness,
};
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use tokio::{
    sync::{broadcast, mpsc},
    time::Instant,
};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::{
    auth::{AuthError, Authenticate},
    cluster::ClusterIndex,
    credentials::Issuer,
    pods::PodInfo,
    sts::SessionKey,
};

/// How the feed behaves.
#[derive(Clone, Debug)]
pub struct FeedSettings {
    /// An update (empty if nothing changed) is sent at least this often.
    pub heartbeat: Duration,
    /// Subscriptions of one node at once; a newer one ends the oldest.
    pub max_per_node: usize,
}

/// The feed service; cheap to clone.
#[derive(Clone, Debug)]
pub struct Feed {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    issuer: Issuer,
    index: ClusterIndex,
    auth: Arc<dyn Authenticate>,
    readiness: Readiness,
    settings: FeedSettings,
    metrics: FeedMetrics,
    shutdown: CancellationToken,
    /// Open subscriptions by node, oldest first: their ids and how to end them.
    nodes: Mutex<HashMap<Arc<str>, VecDeque<Open>>>,
    next_id: AtomicU64,
}

/// Feed metrics.
#[derive(Clone, Debug)]
pub struct FeedMetrics {
    streams: IntGauge,
    subscriptions: IntCounterVec,
    updates: IntCounterVec,
    pods_sent: prometheus::IntCounter,
    ended: IntCounterVec,
}

/// Pods per message at most.
const PODS_PER_MESSAGE: usize = 16;

/// An open subscription: its id, and how to end it.
type Open = (u64, CancellationToken);

/// The stream handed to tonic.
pub type UpdateStream = Pin<Box<dyn Stream<Item = Result<NodeUpdate, Status>> + Send>>;

/// One subscription's state: what the agent holds.
struct Subscription {
    feed: Feed,
    node: Arc<str>,
    /// Its place among the node's subscriptions.
    id: u64,
    /// Cancelled when a newer subscription of the node replaces this one.
    replaced: CancellationToken,
    /// Pod UID → version the agent holds.
    sent: HashMap<String, u64>,
    /// Sessions the node's allowed pods use (to react to the broker's fetches).
    keys: HashSet<SessionKey>,
    /// Allowed pods still without credentials (looked at again at each heartbeat).
    missing: usize,
}

/// Why a subscription ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// The server's view went stale (its readiness gate closed).
    NotReady,
    /// A newer subscription of the same node took its place.
    Replaced,
    /// The agent went away.
    AgentGone,
    /// The server is stopping.
    Shutdown,
}

// === impl End ===

impl End {
    fn as_str(self) -> &'static str {
        match self {
            End::NotReady => "not_ready",
            End::Replaced => "replaced",
            End::AgentGone => "agent_gone",
            End::Shutdown => "shutdown",
        }
    }
}

// === impl Feed ===

impl Feed {
    /// The feed over `issuer` and `index`; streams end at `shutdown`.
    pub fn new(
        issuer: Issuer,
        index: ClusterIndex,
        auth: Arc<dyn Authenticate>,
        readiness: Readiness,
        settings: FeedSettings,
        metrics: FeedMetrics,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                issuer,
                index,
                auth,
                readiness,
                settings,
                metrics,
                shutdown,
                nodes: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(0),
            }),
        }
    }

    /// Registers a subscription of `node`, ending the oldest beyond the node's share. When
    /// the node is only named, not proven by a token (`bound` false: node binding off),
    /// anyone with an agent's credentials could name any node, so a subscription beyond
    /// the share is refused instead (`None`).
    fn register(&self, node: &Arc<str>, bound: bool) -> Option<(u64, CancellationToken)> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let token = CancellationToken::new();
        let max = self.inner.settings.max_per_node.max(1);
        let mut nodes = self.inner.nodes.lock();
        let open = nodes.entry(node.clone()).or_default();
        if !bound && open.len() >= max {
            return None;
        }
        open.push_back((id, token.clone()));
        while open.len() > max {
            if let Some((_, oldest)) = open.pop_front() {
                oldest.cancel();
            }
        }
        Some((id, token))
    }

    /// Forgets subscription `id` of `node`.
    fn unregister(&self, node: &Arc<str>, id: u64) {
        let mut nodes = self.inner.nodes.lock();
        if let Some(open) = nodes.get_mut(node) {
            open.retain(|(i, _)| *i != id);
            if open.is_empty() {
                nodes.remove(node);
            }
        }
    }

    /// The node a subscription is for, and whether a token proved it: the token's node
    /// with node binding (a different name in the request is refused), else the name in
    /// the request.
    async fn node(&self, token: Option<&str>, asked: &str) -> Result<(Arc<str>, bool), Status> {
        let caller = self
            .inner
            .auth
            .authenticate(token)
            .await
            .map_err(|error| match error {
                AuthError::Unavailable(_) => Status::unavailable(error.to_string()),
                _ => {
                    tracing::info!(%error, "feed subscription refused");
                    Status::unauthenticated(error.to_string())
                }
            })?;
        match caller.node {
            Some(node) if asked.is_empty() || *asked == *node => Ok((node, true)),
            Some(node) => Err(Status::permission_denied(format!(
                "the agent's token is bound to node {node:?}, not {asked:?}"
            ))),
            None if asked.is_empty() => Err(Status::invalid_argument(
                "no node named (node binding is off, so the request must name it)",
            )),
            None => Ok((asked.into(), false)),
        }
    }
}

#[tonic::async_trait]
impl NodeFeed for Feed {
    type WatchStream = UpdateStream;

    async fn watch(&self, request: Request<WatchNode>) -> Result<Response<UpdateStream>, Status> {
        let m = &self.inner.metrics;
        if !self.inner.readiness.is_ready() {
            m.subscriptions.with_label_values(&["not_ready"]).inc();
            let waiting = self.inner.readiness.waiting_for().join(", ");
            return Err(Status::unavailable(format!(
                "server not ready: waiting for {waiting}"
            )));
        }
        let token = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_string);
        let watch = request.into_inner();
        if watch.held.len() > feed::MAX_HELD {
            m.subscriptions.with_label_values(&["refused"]).inc();
            return Err(Status::invalid_argument(format!(
                "the held list names {} pods; a node holds at most {}",
                watch.held.len(),
                feed::MAX_HELD
            )));
        }
        let (node, bound) = match self.node(token.as_deref(), &watch.node).await {
            Ok(node) => node,
            Err(status) => {
                m.subscriptions.with_label_values(&["refused"]).inc();
                return Err(status);
            }
        };
        let Some((id, replaced)) = self.register(&node, bound) else {
            m.subscriptions.with_label_values(&["refused"]).inc();
            return Err(Status::resource_exhausted(format!(
                "node {node} already has {} feed subscriptions",
                self.inner.settings.max_per_node
            )));
        };
        m.subscriptions.with_label_values(&["ok"]).inc();
        let held = watch.held.len();
        tracing::info!(node = %node, held, "agent subscribed to its node's feed");
        // Few messages queued per agent: an agent that reads slowly holds back its own
        // feed, not the server's memory.
        let (tx, rx) = mpsc::channel(2);
        let sub = Subscription {
            feed: self.clone(),
            node,
            id,
            replaced,
            sent: watch.held.into_iter().map(|h| (h.uid, h.version)).collect(),
            keys: HashSet::new(),
            missing: 0,
        };
        tokio::spawn(sub.run(tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

// === impl Subscription ===

impl Subscription {
    /// Sends the node's state, then its changes, until the agent goes away or shutdown.
    async fn run(mut self, tx: mpsc::Sender<Result<NodeUpdate, Status>>) {
        let inner = self.feed.inner.clone();
        inner.metrics.streams.inc();
        let mut node_changed = inner.index.watch_node(&self.node);
        let mut fetched = inner.issuer.fetched();
        let heartbeat = inner.settings.heartbeat;
        let heartbeat_ms = u32::try_from(heartbeat.as_millis()).unwrap_or(u32::MAX);
        let mut synced = false;
        let mut beat_at = Instant::now() + heartbeat;
        let ended = loop {
            // Checked before every look at the index: a stale view sends nothing.
            if !inner.readiness.is_ready() {
                break End::NotReady;
            }
            node_changed.borrow_and_update();
            let mut update = self.changes();
            update.heartbeat_ms = heartbeat_ms;
            let kind = if !synced {
                update.synced = true;
                synced = true;
                "sync"
            } else if update.pods.is_empty() && update.removed.is_empty() {
                ""
            } else {
                "change"
            };
            if !kind.is_empty() {
                inner.metrics.updates.with_label_values(&[kind]).inc();
                inner.metrics.pods_sent.inc_by(update.pods.len() as u64);
                if let Err(end) = self.send_chunked(&tx, update).await {
                    break end;
                }
                beat_at = Instant::now() + heartbeat;
            }
            let next = 'wait: loop {
                tokio::select! {
                    biased;
                    _ = inner.shutdown.cancelled() => break 'wait Err(End::Shutdown),
                    _ = self.replaced.cancelled() => break 'wait Err(End::Replaced),
                    _ = inner.readiness.wait_not_ready() => break 'wait Err(End::NotReady),
                    _ = tx.closed() => break 'wait Err(End::AgentGone),
                    r = node_changed.changed() => break 'wait r.map_err(|_| End::Shutdown),
                    key = fetched.recv() => match key {
                        Ok(key) if self.keys.contains(&key) => break 'wait Ok(()),
                        Ok(_) => continue,
                        Err(broadcast::error::RecvError::Lagged(_)) => break 'wait Ok(()),
                        Err(broadcast::error::RecvError::Closed) => break 'wait Err(End::Shutdown),
                    },
                    _ = tokio::time::sleep_until(beat_at) => {
                        let beat = NodeUpdate { heartbeat_ms, ..NodeUpdate::default() };
                        inner.metrics.updates.with_label_values(&["heartbeat"]).inc();
                        if let Err(end) = self.send(&tx, beat).await {
                            break 'wait Err(end);
                        }
                        beat_at = Instant::now() + heartbeat;
                        if self.missing > 0 {
                            break 'wait Ok(());
                        }
                    }
                }
            };
            if let Err(end) = next {
                break end;
            }
        };
        self.feed.unregister(&self.node, self.id);
        inner.metrics.streams.dec();
        inner
            .metrics
            .ended
            .with_label_values(&[ended.as_str()])
            .inc();
        // The agent is told why, so it turns to another replica at once rather than after
        // three silent heartbeats (nothing to tell one that has gone).
        let status = match ended {
            End::NotReady => Some(Status::unavailable(format!(
                "server not ready: waiting for {}",
                inner.readiness.waiting_for().join(", ")
            ))),
            End::Replaced => Some(Status::aborted(
                "a newer subscription of this node replaced this one",
            )),
            End::Shutdown => Some(Status::unavailable("server shutting down")),
            End::AgentGone => None,
        };
        if let Some(status) = status {
            // At most the channel's two queued messages wait before it; a reader that
            // takes longer than a heartbeat is gone anyway.
            let _ = tokio::time::timeout(heartbeat, tx.send(Err(status))).await;
        }
        match ended {
            End::NotReady | End::Replaced => {
                tracing::warn!(node = %self.node, reason = ended.as_str(), "node feed ended")
            }
            _ => tracing::info!(node = %self.node, reason = ended.as_str(), "node feed ended"),
        }
    }

    /// Sends `u` as messages of at most [`PODS_PER_MESSAGE`] pods (the sync mark on the
    /// last): small messages keep each connection's buffers small with many agents.
    async fn send_chunked(
        &self,
        tx: &mpsc::Sender<Result<NodeUpdate, Status>>,
        mut u: NodeUpdate,
    ) -> Result<(), End> {
        while u.pods.len() > PODS_PER_MESSAGE {
            let rest = u.pods.split_off(PODS_PER_MESSAGE);
            let part = NodeUpdate {
                pods: std::mem::replace(&mut u.pods, rest),
                heartbeat_ms: u.heartbeat_ms,
                ..NodeUpdate::default()
            };
            self.send(tx, part).await?;
        }
        self.send(tx, u).await
    }

    /// Sends `u` unless the stream must end first (an agent that reads slowly is not
    /// waited for past a shutdown, a replacement or a stale view).
    async fn send(
        &self,
        tx: &mpsc::Sender<Result<NodeUpdate, Status>>,
        u: NodeUpdate,
    ) -> Result<(), End> {
        let inner = &self.feed.inner;
        tokio::select! {
            biased;
            _ = inner.shutdown.cancelled() => Err(End::Shutdown),
            _ = self.replaced.cancelled() => Err(End::Replaced),
            _ = inner.readiness.wait_not_ready() => Err(End::NotReady),
            sent = tx.send(Ok(u)) => sent.map_err(|_| End::AgentGone),
        }
    }

    /// The pods whose state differs from what the agent holds, and the ones gone.
    fn changes(&mut self) -> NodeUpdate {
        let inner = self.feed.inner.clone();
        let pods = inner.index.pods().on_node(&self.node);
        let mut update = NodeUpdate::default();
        let mut present = HashSet::with_capacity(pods.len());
        self.keys.clear();
        self.missing = 0;
        for pod in pods {
            if !pod.claims_ips() || pod.uid.is_none() {
                continue;
            }
            let state = self.state(&pod);
            present.insert(state.uid.clone());
            if self.sent.get(&state.uid) != Some(&state.version) {
                self.sent.insert(state.uid.clone(), state.version);
                update.pods.push(state);
            }
        }
        self.sent.retain(|uid, _| {
            let keep = present.contains(uid);
            if !keep {
                update.removed.push(uid.clone());
            }
            keep
        });
        update
    }

    /// One pod's state, with its credentials if the broker holds them (else a fetch).
    fn state(&mut self, pod: &Arc<PodInfo>) -> PodState {
        let issuer = &self.feed.inner.issuer;
        let (mut state, session) = issuer.feed_state(pod);
        if let Some((role, key)) = session {
            if let Some(credentials) = issuer.held_credentials(pod, &key) {
                issuer.audit_feed(pod, &role, &credentials);
                state.credentials = Some(FeedCredentials::from(&credentials));
            } else {
                self.missing += 1;
                issuer.fetch_soon(pod, key.clone());
            }
            self.keys.insert(key);
        }
        state.sealed()
    }
}

// === impl FeedMetrics ===

impl FeedMetrics {
    /// Registers the feed metrics in `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let streams = IntGauge::new(
            "podiam_feed_streams",
            "Agents subscribed to their node's feed on this replica",
        )?;
        let subscriptions = IntCounterVec::new(
            Opts::new(
                "podiam_feed_subscriptions_total",
                "Node feed subscriptions by result (ok, refused, not_ready)",
            ),
            &["result"],
        )?;
        let updates = IntCounterVec::new(
            Opts::new(
                "podiam_feed_updates_total",
                "Node feed updates sent, by kind (sync, change, heartbeat)",
            ),
            &["kind"],
        )?;
        let pods_sent = prometheus::IntCounter::new(
            "podiam_feed_pods_sent_total",
            "Pod states sent to agents (new or changed)",
        )?;
        registry.register(Box::new(streams.clone()))?;
        registry.register(Box::new(subscriptions.clone()))?;
        registry.register(Box::new(updates.clone()))?;
        let ended = IntCounterVec::new(
            Opts::new(
                "podiam_feed_ended_total",
                "Node feed streams ended, by reason (not_ready: the server's view went stale; \
                 replaced: a newer subscription of the same node; agent_gone; shutdown)",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(pods_sent.clone()))?;
        registry.register(Box::new(ended.clone()))?;
        Ok(Self {
            streams,
            subscriptions,
            updates,
            pods_sent,
            ended,
        })
    }
}
