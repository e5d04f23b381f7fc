//! The STS broker: the only place podiam assumes roles.
//!
//! Data model: a [`SessionKey`] (role ARN, external ID, session name, duration, tags) maps
//! to at most one cached [`Credentials`]. For each key:
//! - at most one `AssumeRole` call is in flight, on a detached task that no caller's
//!   cancellation can abort; every caller waiting for that key shares its result;
//! - credentials with less than [`BrokerConfig::min_remaining`] left are never handed out;
//! - a per-entry timer refreshes credentials [`BrokerConfig::refresh_before`] their expiry,
//!   if they were used since they were fetched (an unused session is left to expire);
//! - a failed call is remembered for [`BrokerConfig::negative_ttl`], so a broken role does
//!   not turn every request into an STS call, while still-valid credentials keep being
//!   served; a failed refresh is retried with jittered exponential backoff;
//! - prefetch requests are never dropped, only delayed: a queue of distinct keys, pods
//!   that just appeared (and node feeds' requests) before the start-up sweep, drained
//!   with bounded concurrency at a bounded AssumeRole rate (STS quotas are per account);
//!   a prefetch that fails for a reason that may pass (throttling, STS unreachable or at
//!   fault) is queued again after a jittered backoff, up to [`PREFETCH_ATTEMPTS`] times.
//!
//! Nothing is fetched ahead of a request from a stale view: a [`Demand`] (the issuer, in
//! production) says whether the view is current and whether a session is still wanted (a
//! pod the index holds now maps to it, and its namespace permits it). The prefetcher waits
//! while the view is stale and drops keys nobody wants; a refresh timer lets an unwanted
//! session expire.
//!
//! Expiry decisions read an injected [`Clock`]. The STS itself is behind [`AssumeRole`]
//! ([`aws::AwsSts`] in production). Nothing here knows about Kubernetes.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    fmt,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use futures::{
    FutureExt,
    future::{BoxFuture, Shared},
};
use parking_lot::Mutex;
use podiam_common::{arn::RoleArn, protocol::Credentials};
use rand::Rng;
use tokio::sync::{Notify, Semaphore, broadcast};
use tokio_util::sync::CancellationToken;

pub mod aws;
pub mod metrics;

use self::metrics::BrokerMetrics;

/// What a session is assumed with. Two requests share credentials only when every field
/// is equal.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SessionKey {
    /// The role.
    pub role_arn: RoleArn,
    /// `ExternalId`, if the pod's annotation sets one.
    pub external_id: Option<Arc<str>>,
    /// `RoleSessionName` (identifies the pod in CloudTrail).
    pub session_name: Arc<str>,
    /// `DurationSeconds`.
    pub duration: Duration,
    /// Session tags, when enabled.
    pub tags: Arc<[(&'static str, String)]>,
    /// Whether every tag is transitive (kept through role chaining, as EKS Pod Identity
    /// sets them).
    pub transitive_tags: bool,
    /// A role assumed first, whose session then assumes `role_arn` (an association's
    /// target role): the tags go on this first call and, transitive, carry over.
    pub chained_from: Option<RoleArn>,
}

pub use podiam_common::clock::{Clock, SystemClock};

/// One `sts:AssumeRole` call.
pub trait AssumeRole: Send + Sync + fmt::Debug + 'static {
    /// Assumes `key.role_arn` as described by `key`.
    fn assume_role(&self, key: &SessionKey) -> BoxFuture<'static, Result<Credentials, StsError>>;
}

/// Whether fetching ahead of a request (prefetch, refresh) is still called for.
pub trait Demand: Send + Sync + fmt::Debug + 'static {
    /// Whether the view the sessions were decided from is current.
    fn current(&self) -> bool;
    /// Resolves once the view is current.
    fn until_current(&self) -> BoxFuture<'static, ()>;
    /// Whether some pod the view holds now maps to `key` (and may have it).
    fn wants(&self, key: &SessionKey) -> bool;
}

/// Why STS gave no credentials.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StsError {
    /// STS answered with an error (after the SDK's own retries).
    #[error("STS refused: {code}: {message}")]
    Service {
        /// The AWS error code (`AccessDenied`, `Throttling`, ...).
        code: String,
        /// STS's message.
        message: String,
    },
    /// STS could not be reached or did not answer in time.
    #[error("STS unreachable: {0}")]
    Unreachable(String),
    /// STS answered without usable credentials.
    #[error("STS answered without usable credentials: {0}")]
    Malformed(String),
    /// The broker's own task failed.
    #[error("internal error while assuming the role: {0}")]
    Internal(String),
}

/// Broker settings.
#[derive(Clone, Debug)]
pub struct BrokerConfig {
    /// Refresh this long before expiry.
    pub refresh_before: Duration,
    /// Never hand out credentials with less than this left.
    pub min_remaining: Duration,
    /// How long a failure is remembered for a key.
    pub negative_ttl: Duration,
    /// Prefetch calls started per second at most (`None`: no limit).
    pub prefetch_rate: Option<std::num::NonZeroU32>,
    /// Prefetch calls in flight at most; 0 turns prefetching off.
    pub prefetch_concurrency: usize,
    /// Most sessions kept.
    pub max_sessions: u64,
}

/// Cheap to clone.
#[derive(Clone, Debug)]
pub struct Broker {
    inner: Arc<Inner>,
}

struct Inner {
    sts: Arc<dyn AssumeRole>,
    clock: Arc<dyn Clock>,
    config: BrokerConfig,
    cache: moka::sync::Cache<SessionKey, Arc<Entry>>,
    failures: moka::sync::Cache<SessionKey, Failure>,
    inflight: Mutex<HashMap<SessionKey, Fetch>>,
    prefetch: Mutex<PrefetchQueue>,
    /// Woken when the prefetch queue gains a key.
    prefetch_added: Notify,
    /// Every key fetched successfully (first fetch or refresh), for the node feeds.
    fetched: broadcast::Sender<SessionKey>,
    metrics: BrokerMetrics,
    shutdown: CancellationToken,
    /// Asked before fetching ahead of a request; none: always.
    demand: OnceLock<Arc<dyn Demand>>,
}

type Fetch = Shared<BoxFuture<'static, Result<Credentials, StsError>>>;

#[derive(Debug)]
struct Entry {
    credentials: Credentials,
    /// When they were fetched (by the injected clock).
    fetched: SystemTime,
    /// Set when handed out to a caller (never by prefetch); each refresh starts unused.
    used: AtomicBool,
}

/// Keys waiting to be prefetched, each once: the urgent ones first.
#[derive(Debug, Default)]
struct PrefetchQueue {
    /// Pods that just appeared or changed, and node feeds' requests: likely to ask soon.
    urgent: VecDeque<Queued>,
    /// The start-up sweep of every known pod.
    sweep: VecDeque<Queued>,
    queued: HashSet<SessionKey>,
}

/// One key waiting to be prefetched.
#[derive(Debug)]
struct Queued {
    key: SessionKey,
    urgent: bool,
    /// Earlier prefetches of the key that failed for a reason that may pass.
    failures: u32,
}

#[derive(Clone, Debug)]
struct Failure {
    until: SystemTime,
    error: StsError,
}

/// How many fetched keys a node feed may fall behind before it looks at all of its keys.
const FETCHED_BACKLOG: usize = 4096;
/// Longest wait between refresh retries.
const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(120);
/// First wait between refresh retries.
const FIRST_RETRY_BACKOFF: Duration = Duration::from_secs(2);
/// Prefetches of one key, at most, while they fail for reasons that may pass: with the
/// backoff (and the negative TTL before each), about five minutes of trying. After that the
/// pod's first request fetches, and a node feed asks again at each heartbeat.
pub const PREFETCH_ATTEMPTS: u32 = 8;

/// The AWS SDKs' throttling and transient error codes (their standard retry classifier's
/// lists, which STS uses), plus STS's own faults.
const TRANSIENT_CODES: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottledException",
    "TooManyRequestsException",
    "RequestLimitExceeded",
    "RequestThrottled",
    "LimitExceededException",
    "PriorRequestNotComplete",
    "RequestTimeout",
    "RequestTimeoutException",
    "ServiceUnavailable",
    "InternalFailure",
    "InternalError",
    "IDPCommunicationError",
];

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            refresh_before: Duration::from_secs(20 * 60),
            min_remaining: Duration::from_secs(15 * 60),
            negative_ttl: Duration::from_secs(5),
            prefetch_rate: std::num::NonZeroU32::new(100),
            prefetch_concurrency: 32,
            max_sessions: 200_000,
        }
    }
}

// === impl StsError ===

impl StsError {
    /// A bounded label for metrics: the AWS error code, or the kind of failure.
    pub fn code(&self) -> &str {
        match self {
            StsError::Service { code, .. } => code,
            StsError::Unreachable(_) => "Unreachable",
            StsError::Malformed(_) => "Malformed",
            StsError::Internal(_) => "Internal",
        }
    }

    /// Whether the same call may succeed later: throttling, STS's own faults, no answer.
    /// A refusal (`AccessDenied`, say) or a malformed answer stays what it is.
    pub fn transient(&self) -> bool {
        match self {
            StsError::Unreachable(_) | StsError::Internal(_) => true,
            StsError::Malformed(_) => false,
            StsError::Service { code, .. } => TRANSIENT_CODES.contains(&code.as_str()),
        }
    }
}

// === impl Broker ===

impl Broker {
    /// A broker over `sts`; background work (prefetch, refresh timers) stops at `shutdown`.
    pub fn new(
        sts: Arc<dyn AssumeRole>,
        clock: Arc<dyn Clock>,
        config: BrokerConfig,
        metrics: BrokerMetrics,
        shutdown: CancellationToken,
    ) -> Self {
        let cache = moka::sync::Cache::builder()
            .max_capacity(config.max_sessions)
            .expire_after(ExpireWithCredentials(clock.clone()))
            .build();
        let failures = moka::sync::Cache::builder()
            .max_capacity(config.max_sessions)
            .time_to_live(config.negative_ttl.max(Duration::from_millis(1)))
            .build();
        let broker = Self {
            inner: Arc::new(Inner {
                sts,
                clock,
                cache,
                failures,
                inflight: Mutex::new(HashMap::new()),
                prefetch: Mutex::new(PrefetchQueue::default()),
                prefetch_added: Notify::new(),
                fetched: broadcast::channel(FETCHED_BACKLOG).0,
                metrics,
                shutdown,
                config,
                demand: OnceLock::new(),
            }),
        };
        tokio::spawn(broker.clone().prefetcher());
        broker
    }

    /// Sets what decides whether a prefetch or a refresh is still called for (once; a
    /// second call is ignored).
    pub fn set_demand(&self, demand: Arc<dyn Demand>) {
        if self.inner.demand.set(demand).is_err() {
            tracing::warn!("the broker's demand was already set");
        }
    }

    /// Whether fetching `key` ahead of a request is called for now.
    fn wanted(&self, key: &SessionKey) -> bool {
        self.inner
            .demand
            .get()
            .is_none_or(|d| d.current() && d.wants(key))
    }

    /// Credentials for `key`: cached if they have enough life left, else fetched (sharing
    /// any call already in flight for the key).
    pub async fn credentials(&self, key: &SessionKey) -> Result<Credentials, StsError> {
        let inner = &self.inner;
        if let Some(credentials) = self.cached(key) {
            inner.metrics.hits.inc();
            return Ok(credentials);
        }
        inner.metrics.misses.inc();
        if let Some(failure) = inner.failures.get(key)
            && inner.clock.now() < failure.until
        {
            return Err(failure.error);
        }
        let credentials = self.fetch(key.clone()).await?;
        if let Some(entry) = inner.cache.get(key) {
            entry.used.store(true, Ordering::Relaxed);
        }
        Ok(credentials)
    }

    /// Asks for `key` to be fetched ahead of its first request, before the sweep's keys.
    /// Never blocks and never drops: a key already waiting is not queued twice.
    pub fn prefetch(&self, key: SessionKey) {
        self.enqueue(key, true);
    }

    /// Like [`Broker::prefetch`], after every urgent key (for the start-up sweep).
    pub fn prefetch_later(&self, key: SessionKey) {
        self.enqueue(key, false);
    }

    fn enqueue(&self, key: SessionKey, urgent: bool) {
        if self.wants_prefetch(&key) {
            self.push(Queued {
                key,
                urgent,
                failures: 0,
            });
        }
    }

    /// Queues `q` unless its key is already waiting.
    fn push(&self, q: Queued) {
        let mut queue = self.inner.prefetch.lock();
        if !queue.queued.insert(q.key.clone()) {
            return;
        }
        if q.urgent {
            queue.urgent.push_back(q);
        } else {
            queue.sweep.push_back(q);
        }
        drop(queue);
        self.inner.metrics.prefetch_queued.inc();
        self.inner.prefetch_added.notify_one();
    }

    fn next_prefetch(&self) -> Option<Queued> {
        let mut queue = self.inner.prefetch.lock();
        let q = queue
            .urgent
            .pop_front()
            .or_else(|| queue.sweep.pop_front())?;
        queue.queued.remove(&q.key);
        drop(queue);
        self.inner.metrics.prefetch_queued.dec();
        Some(q)
    }

    /// After a prefetch of `q` failed with `error`: if it may pass, `q` is queued again
    /// after the failure is forgotten and a jittered backoff, until [`PREFETCH_ATTEMPTS`].
    fn prefetch_failed(&self, mut q: Queued, error: &StsError) {
        q.failures += 1;
        if !error.transient() {
            return;
        }
        if q.failures >= PREFETCH_ATTEMPTS {
            tracing::warn!(role.arn = %q.key.role_arn, session = %q.key.session_name, attempts = q.failures, "prefetch gave up; the session is fetched at its first request");
            return;
        }
        let backoff = FIRST_RETRY_BACKOFF
            .saturating_mul(1 << (q.failures - 1).min(16))
            .min(MAX_RETRY_BACKOFF);
        let wait =
            self.inner.config.negative_ttl + backoff.mul_f64(rand::rng().random_range(0.5..1.5));
        let broker = self.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = broker.inner.shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            // Fetched meanwhile (a pod asked): nothing left to do.
            if broker.inner.config.prefetch_concurrency > 0 && broker.peek(&q.key).is_none() {
                broker.push(q);
            }
        });
    }

    /// Whether prefetching is on.
    pub fn prefetching(&self) -> bool {
        self.inner.config.prefetch_concurrency > 0
    }

    /// Number of cached sessions.
    pub fn sessions(&self) -> u64 {
        self.inner.cache.run_pending_tasks();
        self.inner.cache.entry_count()
    }

    /// Every key fetched from now on (first fetch or refresh). A receiver that falls
    /// more than a few thousand keys behind is told it lagged and must look at all of
    /// its keys again.
    pub fn subscribe(&self) -> broadcast::Receiver<SessionKey> {
        self.inner.fetched.subscribe()
    }

    /// Cached credentials for `key` with enough life left, marked as used (so they are
    /// refreshed), without fetching and without counting a cache hit: for the node feeds,
    /// which hand them to agents.
    pub fn held(&self, key: &SessionKey) -> Option<Credentials> {
        self.cached(key)
    }

    /// Cached credentials for `key` with enough life left, marked as used.
    fn cached(&self, key: &SessionKey) -> Option<Credentials> {
        let entry = self.peek(key)?;
        entry.used.store(true, Ordering::Relaxed);
        Some(entry.credentials.clone())
    }

    /// The cache entry for `key` if it has enough life left; not marked as used.
    fn peek(&self, key: &SessionKey) -> Option<Arc<Entry>> {
        let entry = self.inner.cache.get(key)?;
        (self.remaining(&entry.credentials) >= self.inner.config.min_remaining).then_some(entry)
    }

    /// Prefetch is on, the key is not warm, and it did not just fail (a pod whose role STS
    /// refuses would otherwise cost an AssumeRole per status update).
    fn wants_prefetch(&self, key: &SessionKey) -> bool {
        let failing = self
            .inner
            .failures
            .get(key)
            .is_some_and(|f| self.inner.clock.now() < f.until);
        self.inner.config.prefetch_concurrency > 0 && self.peek(key).is_none() && !failing
    }

    fn remaining(&self, credentials: &Credentials) -> Duration {
        credentials
            .expiration
            .duration_since(self.inner.clock.now())
            .unwrap_or_default()
    }

    /// The one in-flight call for `key`, started if there is none.
    fn fetch(&self, key: SessionKey) -> Fetch {
        let mut inflight = self.inner.inflight.lock();
        if let Some(fetch) = inflight.get(&key) {
            return fetch.clone();
        }
        let task = tokio::spawn(self.clone().assume(key.clone()));
        let (broker, k) = (self.clone(), key.clone());
        let fetch = async move {
            match task.await {
                Ok(result) => result,
                // The task died before clearing its key: clear it, or the key stays stuck.
                Err(e) => {
                    broker.inner.inflight.lock().remove(&k);
                    Err(StsError::Internal(e.to_string()))
                }
            }
        }
        .boxed()
        .shared();
        inflight.insert(key, fetch.clone());
        fetch
    }

    /// The call itself, on its own task.
    async fn assume(self, key: SessionKey) -> Result<Credentials, StsError> {
        let inner = &self.inner;
        inner.metrics.inflight.inc();
        let started = tokio::time::Instant::now();
        let result = inner.sts.assume_role(&key).await;
        inner
            .metrics
            .latency
            .observe(started.elapsed().as_secs_f64());
        inner.metrics.inflight.dec();
        let result = result.and_then(|credentials| {
            if self.remaining(&credentials) < inner.config.min_remaining {
                return Err(StsError::Malformed(format!(
                    "credentials expire at {}, too soon to hand out",
                    humantime::format_rfc3339_seconds(credentials.expiration)
                )));
            }
            Ok(credentials)
        });
        match &result {
            Ok(credentials) => {
                inner.metrics.calls.with_label_values(&["ok"]).inc();
                let entry = Arc::new(Entry {
                    credentials: credentials.clone(),
                    fetched: inner.clock.now(),
                    used: AtomicBool::new(false),
                });
                inner.cache.insert(key.clone(), entry.clone());
                inner.failures.invalidate(&key);
                tokio::spawn(self.clone().refresh_later(key.clone(), entry));
                // Nobody listening is fine: no agent is subscribed.
                let _ = inner.fetched.send(key.clone());
            }
            Err(error) => {
                inner.metrics.calls.with_label_values(&["error"]).inc();
                inner
                    .metrics
                    .errors
                    .with_label_values(&[error.code()])
                    .inc();
                tracing::warn!(role.arn = %key.role_arn, session = %key.session_name, %error, "AssumeRole failed");
                let until = inner.clock.now() + inner.config.negative_ttl;
                inner.failures.insert(
                    key.clone(),
                    Failure {
                        until,
                        error: error.clone(),
                    },
                );
            }
        }
        // Removed only after the cache holds the result, so no caller falls in between.
        inner.inflight.lock().remove(&key);
        result
    }

    /// The per-entry timer: refresh `refresh_before` the expiry if the entry was used;
    /// retry failures with jittered backoff while the old credentials are still good.
    async fn refresh_later(self, key: SessionKey, entry: Arc<Entry>) {
        let inner = &self.inner;
        // A session shorter than twice the refresh margin (a 30 min annotation with a 40 min
        // --session-refresh) is refreshed half-way instead of at once.
        let lifetime = entry
            .credentials
            .expiration
            .duration_since(entry.fetched)
            .unwrap_or_default();
        let margin = inner.config.refresh_before.min(lifetime / 2);
        let at = entry
            .credentials
            .expiration
            .checked_sub(margin)
            .unwrap_or(entry.credentials.expiration);
        let wait = at.duration_since(inner.clock.now()).unwrap_or_default();
        tokio::select! {
            _ = inner.shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        let mut backoff = FIRST_RETRY_BACKOFF;
        loop {
            // Superseded (fetched again since) or evicted: another timer owns the key.
            match inner.cache.get(&key) {
                Some(current) if Arc::ptr_eq(&current, &entry) => {}
                _ => return,
            }
            if !entry.used.load(Ordering::Relaxed) {
                tracing::debug!(role.arn = %key.role_arn, session = %key.session_name, "unused since the last fetch: left to expire");
                return;
            }
            if let Some(demand) = inner.demand.get() {
                // A stale view decides nothing: wait for a current one (while the old
                // credentials last), then ask whether a pod still maps to the session.
                if !demand.current() {
                    let left = self.remaining(&entry.credentials);
                    tokio::select! {
                        _ = inner.shutdown.cancelled() => return,
                        _ = demand.until_current() => {}
                        _ = tokio::time::sleep(left) => return,
                    }
                }
                if !demand.wants(&key) {
                    inner.metrics.unwanted.inc();
                    tracing::debug!(role.arn = %key.role_arn, session = %key.session_name, "no pod maps to the session any more: left to expire");
                    return;
                }
            }
            inner.metrics.refreshes.inc();
            if self.fetch(key.clone()).await.is_ok() {
                // The new entry has its own timer.
                return;
            }
            if self.remaining(&entry.credentials) == Duration::ZERO {
                return;
            }
            let jittered = backoff.mul_f64(rand::rng().random_range(0.5..1.5));
            tokio::select! {
                _ = inner.shutdown.cancelled() => return,
                _ = tokio::time::sleep(jittered) => {}
            }
            backoff = (backoff * 2).min(MAX_RETRY_BACKOFF);
        }
    }

    /// Runs prefetch requests with bounded concurrency, at the bounded rate.
    async fn prefetcher(self) {
        let inner = &self.inner;
        let limit = Arc::new(Semaphore::new(inner.config.prefetch_concurrency.max(1)));
        let rate = inner
            .config
            .prefetch_rate
            .map(|r| governor::RateLimiter::direct(governor::Quota::per_second(r)));
        loop {
            // Armed before the queue is looked at, so that no key added in between is missed.
            let added = inner.prefetch_added.notified();
            let Some(q) = self.next_prefetch() else {
                tokio::select! {
                    _ = inner.shutdown.cancelled() => return,
                    _ = added => continue,
                }
            };
            let Ok(permit) = limit.clone().acquire_owned().await else {
                return;
            };
            // Nothing is fetched ahead from a stale view: wait until it is current, then
            // drop keys that no pod maps to any more (a policy narrowed meanwhile).
            if let Some(demand) = inner.demand.get()
                && !demand.current()
            {
                tokio::select! {
                    _ = inner.shutdown.cancelled() => return,
                    _ = demand.until_current() => {}
                }
            }
            if !self.wanted(&q.key) {
                inner.metrics.unwanted.inc();
                continue;
            }
            // `peek`, not `cached`: a session is not "used" until a pod asks for it.
            if self.peek(&q.key).is_some() {
                continue;
            }
            if let Some(rate) = &rate {
                tokio::select! {
                    _ = inner.shutdown.cancelled() => return,
                    _ = rate.until_ready() => {}
                }
            }
            let broker = self.clone();
            tokio::spawn(async move {
                let result = broker.fetch(q.key.clone()).await;
                drop(permit);
                if let Err(error) = result {
                    broker.prefetch_failed(q, &error);
                }
            });
        }
    }
}

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Broker")
            .field("sts", &self.sts)
            .field("config", &self.config)
            .field("sessions", &self.cache.entry_count())
            .finish_non_exhaustive()
    }
}

/// Cache entries are evicted when their credentials expire (memory hygiene only: whether
/// credentials may be handed out is decided with the injected clock).
struct ExpireWithCredentials(Arc<dyn Clock>);

impl moka::Expiry<SessionKey, Arc<Entry>> for ExpireWithCredentials {
    fn expire_after_create(
        &self,
        _key: &SessionKey,
        value: &Arc<Entry>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(
            value
                .credentials
                .expiration
                .duration_since(self.0.now())
                .unwrap_or_default(),
        )
    }
}
