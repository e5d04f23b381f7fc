//! Accepting connections until shutdown, shared by every listener (admin, agent API,
//! metadata endpoint, webhook), and the bounds every listener that an untrusted party
//! reaches puts on what it holds for them:
//!
//! - [`Limiter`]: connections open at once, in total and per source address. A connection
//!   beyond either cap is closed at accept, before it costs a task, a buffer or a TLS
//!   handshake, and counted (`podiam_listener_refused_total`). A source address can hold
//!   at most its own share; the others keep theirs.
//! - [`Activity`] and [`drive`]: a connection with no request in progress is closed after
//!   an idle limit (a shorter one before its first request), and every connection is
//!   closed gracefully at shutdown. HTTP/1's header-read timeout does the same for a
//!   plain HTTP/1 listener; HTTP/2 has no such bound of its own in hyper.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    pin::{Pin, pin},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use hyper::body::{Body, Frame, SizeHint};
use hyper_util::server::graceful::GracefulConnection;
use parking_lot::Mutex;
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::Notify,
    time::Instant,
};
use tokio_util::sync::CancellationToken;

/// The next connection, or `None` once `shutdown` is cancelled. Accept errors (typically
/// EMFILE) are logged and retried after a short pause instead of spinning.
pub async fn accept(
    listener: &TcpListener,
    shutdown: &CancellationToken,
    what: &'static str,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            accepted = listener.accept() => match accepted {
                Ok(conn) => return Some(conn),
                Err(error) => {
                    tracing::warn!(%error, listener = what, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

/// How many connections a listener holds at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// In total.
    pub total: usize,
    /// From one source address.
    pub per_source: usize,
}

/// Counts connections of one listener against its [`ConnectionLimits`]; cheap to clone.
#[derive(Clone, Debug)]
pub struct Limiter {
    inner: Arc<LimiterInner>,
}

#[derive(Debug)]
struct LimiterInner {
    listener: &'static str,
    limits: ConnectionLimits,
    /// Open connections in total, and per source (a source is present only while it
    /// holds a connection, so the map is bounded by `limits.total`).
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
    metrics: ListenerMetrics,
}

/// One admitted connection's place; released when dropped.
#[derive(Debug)]
pub struct Slot {
    limiter: Limiter,
    source: IpAddr,
}

/// Why a connection was closed at accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// The listener holds its total.
    Total,
    /// The source holds its share.
    PerSource,
}

/// Connection metrics of every limited listener of a process.
#[derive(Clone, Debug)]
pub struct ListenerMetrics {
    open: IntGaugeVec,
    refused: IntCounterVec,
    idle: IntCounterVec,
}

// === impl Limiter ===

impl Limiter {
    /// A limiter for the listener named `listener` (a metric label).
    pub fn new(
        listener: &'static str,
        limits: ConnectionLimits,
        metrics: &ListenerMetrics,
    ) -> Self {
        // Registered at zero, so that the gauge exists before the first connection.
        metrics.open.with_label_values(&[listener]).set(0);
        Self {
            inner: Arc::new(LimiterInner {
                listener,
                limits,
                open: Mutex::new((0, HashMap::new())),
                metrics: metrics.clone(),
            }),
        }
    }

    /// A place for a connection from `peer`, or why there is none (counted).
    pub fn admit(&self, peer: IpAddr) -> Result<Slot, Refused> {
        let source = crate::net::canonical(peer);
        let inner = &self.inner;
        let mut open = inner.open.lock();
        let refused = if open.0 >= inner.limits.total {
            Some(Refused::Total)
        } else if open.1.get(&source).copied().unwrap_or(0) >= inner.limits.per_source {
            Some(Refused::PerSource)
        } else {
            None
        };
        if let Some(refused) = refused {
            drop(open);
            inner
                .metrics
                .refused
                .with_label_values(&[inner.listener, refused.as_str()])
                .inc();
            return Err(refused);
        }
        open.0 += 1;
        *open.1.entry(source).or_default() += 1;
        let total = open.0;
        drop(open);
        self.set_gauge(total);
        Ok(Slot {
            limiter: self.clone(),
            source,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.inner.open.lock().0
    }

    fn release(&self, source: IpAddr) {
        let mut open = self.inner.open.lock();
        open.0 = open.0.saturating_sub(1);
        if let Some(n) = open.1.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                open.1.remove(&source);
            }
        }
        let total = open.0;
        drop(open);
        self.set_gauge(total);
    }

    fn set_gauge(&self, total: usize) {
        self.inner
            .metrics
            .open
            .with_label_values(&[self.inner.listener])
            .set(i64::try_from(total).unwrap_or(i64::MAX));
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.limiter.release(self.source);
    }
}

// === impl Refused ===

impl Refused {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::Total => "total",
            Refused::PerSource => "per_source",
        }
    }
}

// === impl ListenerMetrics ===

impl ListenerMetrics {
    /// Registers the metrics in `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let open = IntGaugeVec::new(
            Opts::new(
                "podiam_listener_connections",
                "Connections open now, by listener",
            ),
            &["listener"],
        )?;
        let refused = IntCounterVec::new(
            Opts::new(
                "podiam_listener_refused_total",
                "Connections closed at accept, by listener and the cap they met (total, per_source)",
            ),
            &["listener", "reason"],
        )?;
        let idle = IntCounterVec::new(
            Opts::new(
                "podiam_listener_idle_closed_total",
                "Connections closed for holding no request, by listener and when (first: none \
                 within the first-request deadline; idle: none for the idle limit)",
            ),
            &["listener", "when"],
        )?;
        registry.register(Box::new(open.clone()))?;
        registry.register(Box::new(refused.clone()))?;
        registry.register(Box::new(idle.clone()))?;
        Ok(Self {
            open,
            refused,
            idle,
        })
    }
}

/// How long a connection may hold no request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdleLimits {
    /// From the end of the TLS handshake (or accept) to the first request.
    pub first_request: Duration,
    /// Between the end of one request (its response body included) and the next.
    pub idle: Duration,
}

/// The requests in progress on one connection; cheap to clone.
#[derive(Clone, Debug)]
pub struct Activity {
    inner: Arc<ActivityInner>,
}

#[derive(Debug)]
struct ActivityInner {
    open: AtomicUsize,
    /// When the connection last had no request open, and whether it ever had one.
    quiet_since: Mutex<(Instant, bool)>,
    changed: Notify,
}

/// A request in progress; ends when dropped.
#[derive(Debug)]
pub struct Active {
    activity: Activity,
}

/// A response body that keeps its request [`Active`] until it is dropped (a streamed
/// response, such as a node feed, is a request in progress for as long as it streams).
#[derive(Debug)]
pub struct Tracked<B> {
    body: B,
    _active: Active,
}

// === impl Activity ===

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

impl Activity {
    /// A connection that has just started, with no request yet.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(ActivityInner {
                open: AtomicUsize::new(0),
                quiet_since: Mutex::new((Instant::now(), false)),
                changed: Notify::new(),
            }),
        }
    }

    /// Marks a request in progress until the returned guard is dropped.
    pub fn start(&self) -> Active {
        self.inner.open.fetch_add(1, Ordering::AcqRel);
        self.inner.quiet_since.lock().1 = true;
        self.inner.changed.notify_waiters();
        Active {
            activity: self.clone(),
        }
    }

    /// `body` kept as a request in progress until it is dropped.
    pub fn track<B>(&self, body: B, active: Active) -> Tracked<B> {
        debug_assert!(Arc::ptr_eq(&active.activity.inner, &self.inner));
        Tracked {
            body,
            _active: active,
        }
    }

    /// Resolves when the connection has had no request in progress for its limit; says
    /// which limit (`true`: the first-request deadline).
    pub async fn quiet(&self, limits: IdleLimits) -> bool {
        loop {
            let changed = self.inner.changed.notified();
            let mut changed = pin!(changed);
            changed.as_mut().enable();
            if self.inner.open.load(Ordering::Acquire) > 0 {
                changed.await;
                continue;
            }
            let (since, seen) = *self.inner.quiet_since.lock();
            let limit = if seen {
                limits.idle
            } else {
                limits.first_request
            };
            tokio::select! {
                biased;
                _ = changed => continue,
                _ = tokio::time::sleep_until(since + limit) => {
                    if self.inner.open.load(Ordering::Acquire) == 0 {
                        return !seen;
                    }
                }
            }
        }
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        let inner = &self.activity.inner;
        if inner.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            inner.quiet_since.lock().0 = Instant::now();
            inner.changed.notify_waiters();
        }
    }
}

// === impl Tracked ===

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// How long a connection asked to finish gracefully may take before it is dropped: an
/// HTTP/2 peer that never sent its preface (or never reads) does not finish by itself.
const CLOSE_GRACE: Duration = Duration::from_secs(10);

/// Runs `conn` to its end. It is asked to finish gracefully (in-flight requests complete,
/// no new ones) when `shutdown` is cancelled or when `activity` has been quiet for its
/// limit (the second is counted for `listener`), and dropped if that takes longer than
/// [`CLOSE_GRACE`].
pub async fn drive<C>(
    conn: C,
    activity: &Activity,
    limits: IdleLimits,
    shutdown: &CancellationToken,
    metrics: &ListenerMetrics,
    listener: &'static str,
) -> Result<(), C::Error>
where
    C: GracefulConnection,
{
    let mut conn = pin!(conn);
    tokio::select! {
        done = conn.as_mut() => return done,
        _ = shutdown.cancelled() => {}
        first = activity.quiet(limits) => {
            let when = if first { "first" } else { "idle" };
            metrics.idle.with_label_values(&[listener, when]).inc();
        }
    }
    conn.as_mut().graceful_shutdown();
    match tokio::time::timeout(CLOSE_GRACE, conn).await {
        Ok(done) => done,
        // Dropped with the future: its socket is closed.
        Err(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> ListenerMetrics {
        ListenerMetrics::register(&Registry::new()).unwrap()
    }

    #[test]
    fn a_source_holds_its_share_and_the_others_keep_theirs() {
        let m = metrics();
        let limiter = Limiter::new(
            "test",
            ConnectionLimits {
                total: 5,
                per_source: 2,
            },
            &m,
        );
        let a: IpAddr = "198.18.0.1".parse().unwrap();
        let b: IpAddr = "198.18.0.2".parse().unwrap();
        let a1 = limiter.admit(a).unwrap();
        let _a2 = limiter.admit(a).unwrap();
        assert_eq!(limiter.admit(a).unwrap_err(), Refused::PerSource);
        // The same address as IPv4-mapped IPv6 is the same source.
        let mapped: IpAddr = "::ffff:198.18.0.1".parse().unwrap();
        assert_eq!(limiter.admit(mapped).unwrap_err(), Refused::PerSource);
        let _b1 = limiter.admit(b).unwrap();
        let _b2 = limiter.admit(b).unwrap();
        let c: IpAddr = "198.18.0.3".parse().unwrap();
        let _c1 = limiter.admit(c).unwrap();
        assert_eq!(limiter.admit(c).unwrap_err(), Refused::Total);
        drop(a1);
        assert_eq!(limiter.open(), 4);
        let _a3 = limiter.admit(a).unwrap();
        assert_eq!(
            m.refused.with_label_values(&["test", "per_source"]).get(),
            2
        );
        assert_eq!(m.refused.with_label_values(&["test", "total"]).get(), 1);
        assert_eq!(m.open.with_label_values(&["test"]).get(), 5);
    }

    #[test]
    fn sources_are_forgotten_when_their_connections_end() {
        let limiter = Limiter::new(
            "test",
            ConnectionLimits {
                total: 1000,
                per_source: 1,
            },
            &metrics(),
        );
        for n in 0..500u32 {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0xc612_0000 + n));
            drop(limiter.admit(ip).unwrap());
        }
        assert_eq!(limiter.open(), 0);
        assert!(limiter.inner.open.lock().1.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn quiet_after_the_first_request_deadline_then_the_idle_limit() {
        let limits = IdleLimits {
            first_request: Duration::from_secs(5),
            idle: Duration::from_secs(60),
        };
        let activity = Activity::new();
        let started = Instant::now();
        assert!(activity.quiet(limits).await);
        assert_eq!(started.elapsed(), Duration::from_secs(5));

        let activity = Activity::new();
        let request = activity.start();
        let body = activity.track((), request);
        let waiting = tokio::spawn({
            let activity = activity.clone();
            async move { activity.quiet(limits).await }
        });
        // A response still streaming is a request in progress, however long it lasts.
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert!(!waiting.is_finished());
        let ended = Instant::now();
        drop(body);
        assert!(!waiting.await.unwrap());
        assert_eq!(ended.elapsed(), Duration::from_secs(60));
    }
}
