//! The HTTP/1 server every pod-facing listener of the agent runs (the metadata endpoint,
//! the container-credentials endpoint): connections from outside `--pod-sources` closed
//! unanswered, header size and read-time limits, one task per connection, and in-flight
//! requests given a grace period at shutdown.

use std::{
    convert::Infallible,
    future::Future,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
};
use podiam_common::listen::{ConnectionLimits, Limiter};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Headers larger than this are refused (a pod's requests need a few hundred bytes, a
/// projected token 1–2 KB).
const MAX_HEADERS_BYTES: usize = 16 * 1024;
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
const GRACE: Duration = Duration::from_secs(5);

/// The default caps of each pod-facing listener: a node runs a few hundred pods at most,
/// whose SDKs hold a connection or two each; a connection costs the agent about 7 KB.
pub const DEFAULT_LIMITS: ConnectionLimits = ConnectionLimits {
    total: 2048,
    per_source: 64,
};

/// Whether `ip` may be a pod's: in one of `sources` (`--pod-sources`; empty: any, as the
/// kernel's rules then admit only redirected pod traffic).
pub fn is_pod_source(sources: &[ipnet::IpNet], ip: std::net::IpAddr) -> bool {
    let ip = podiam_common::net::canonical(ip);
    sources.is_empty() || sources.iter().any(|net| net.contains(&ip))
}

/// What one source address may make a pod-facing listener do.
#[derive(Clone, Debug)]
pub struct SourceLimits {
    /// Connections held at once, in total and per source address: a pod that opens
    /// thousands of idle connections is refused beyond its share at accept, and the others
    /// keep theirs.
    pub connections: Limiter,
    /// Requests per second per source address (`None`: no limit). A source over its rate
    /// is not answered faster than it: its next request waits (its connection is not read
    /// meanwhile), so a pod in a tight loop costs the agent only its share.
    pub pace: Option<Arc<Pace>>,
}

/// Requests per second per source address, in bursts of twice that.
#[derive(Debug)]
pub struct Pace {
    limiter: governor::DefaultKeyedRateLimiter<IpAddr>,
    /// The node's own addresses, shared by every host-network pod: not paced as one.
    exempt: Vec<IpAddr>,
    paced: prometheus::IntCounter,
    /// Requests looked at (when to sweep the limiter's addresses).
    checks: AtomicU32,
}

/// Serves `handle` on `listener` until `shutdown`. `admit` says whether a peer may be
/// answered at all (it counts and logs the ones it refuses); `limits` bounds what one
/// source may hold and ask ([`SourceLimits`]); `what` names the listener in logs. A
/// connection with no request in progress for [`HEADER_TIMEOUT`] is closed (hyper's
/// header-read timeout runs while a keep-alive connection waits for its next request too).
pub async fn serve<A, H, F>(
    listener: TcpListener,
    shutdown: CancellationToken,
    what: &'static str,
    limits: SourceLimits,
    admit: A,
    handle: H,
) where
    A: Fn(SocketAddr) -> bool,
    H: Fn(SocketAddr, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    loop {
        let Some((tcp, peer)) = podiam_common::listen::accept(&listener, &shutdown, what).await
        else {
            break;
        };
        if !admit(peer) {
            continue;
        }
        let Ok(slot) = limits.connections.admit(peer.ip()) else {
            tracing::debug!(%peer, listener = what, "connection closed at accept: over its cap");
            continue;
        };
        // Small request/response exchanges: Nagle plus delayed ACKs would add 40 ms.
        let _ = tcp.set_nodelay(true);
        let handle = handle.clone();
        let pace = limits.pace.clone();
        let service = service_fn(move |req| {
            let (handle, pace) = (handle.clone(), pace.clone());
            async move {
                if let Some(pace) = pace {
                    pace.wait(peer.ip()).await;
                }
                Ok::<_, Infallible>(handle(peer, req).await)
            }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .max_buf_size(MAX_HEADERS_BYTES)
            .serve_connection(TokioIo::new(tcp), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(error) = conn.await {
                tracing::debug!(%peer, %error, listener = what, "connection ended with an error");
            }
        });
    }
    if tokio::time::timeout(GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            listener = what,
            "requests still in flight after the grace period"
        );
    }
}

// === impl Pace ===

impl Pace {
    /// `rate` requests a second per source address, counted in `registry` when paced.
    pub fn new(
        rate: std::num::NonZeroU32,
        exempt: Vec<IpAddr>,
        registry: &prometheus::Registry,
    ) -> prometheus::Result<Self> {
        let paced = prometheus::IntCounter::new(
            "podiam_agent_requests_paced_total",
            "Pod requests held back because their source address was over \
             --pod-request-rate (answered later, at the rate)",
        )?;
        registry.register(Box::new(paced.clone()))?;
        let burst = rate.saturating_mul(std::num::NonZeroU32::MIN.saturating_add(1));
        Ok(Self {
            limiter: governor::RateLimiter::keyed(
                governor::Quota::per_second(rate).allow_burst(burst),
            ),
            exempt: exempt
                .into_iter()
                .map(podiam_common::net::canonical)
                .collect(),
            paced,
            checks: AtomicU32::new(0),
        })
    }

    /// Returns once `source` may be answered.
    async fn wait(&self, source: IpAddr) {
        let source = podiam_common::net::canonical(source);
        if self.exempt.contains(&source) {
            return;
        }
        // Forget addresses that have not asked lately, now and then (looked at every
        // 1,024 requests, not on each: this is the warm path).
        if self
            .checks
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(1024)
            && self.limiter.len() > 4096
        {
            self.limiter.retain_recent();
        }
        if self.limiter.check_key(&source).is_err() {
            self.paced.inc();
            self.limiter.until_key_ready(&source).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_source_over_its_rate_waits_and_the_others_do_not() {
        let registry = prometheus::Registry::new();
        let node: IpAddr = "198.18.0.100".parse().unwrap();
        let pace = Pace::new(
            std::num::NonZeroU32::new(50).unwrap(),
            vec![node],
            &registry,
        )
        .unwrap();
        let a: IpAddr = "198.18.0.1".parse().unwrap();
        let b: IpAddr = "198.18.0.2".parse().unwrap();
        let started = tokio::time::Instant::now();
        // A burst of twice the rate at once, then the rate: 10 more take 200 ms.
        for _ in 0..110 {
            pace.wait(a).await;
        }
        let a_took = started.elapsed();
        assert!(a_took >= Duration::from_millis(150), "{a_took:?}");
        let started = tokio::time::Instant::now();
        pace.wait(b).await;
        assert!(started.elapsed() < Duration::from_millis(20));
        // The node's own address (host-network pods) is not paced as one source.
        let started = tokio::time::Instant::now();
        for _ in 0..500 {
            pace.wait(node).await;
        }
        assert!(started.elapsed() < Duration::from_millis(100));
        assert!(pace.paced.get() >= 10);
    }
}
