//! The HTTP/1 server every pod-facing listener of the agent runs (the metadata endpoint,
//! the container-credentials endpoint): connections from outside `--pod-sources` closed
//! unanswered, header size and read-time limits, one task per connection, and in-flight
//! requests given a grace period at shutdown.

use std::{convert::Infallible, future::Future, net::SocketAddr, time::Duration};

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

/// The default caps of each pod-facing listener: a node runs a few hundred pods at most,
/// whose SDKs hold a connection or two each; a connection costs the agent about 7 KB.
pub const DEFAULT_LIMITS: ConnectionLimits = ConnectionLimits {
    total: 2048,
    per_source: 64,
};
const GRACE: Duration = Duration::from_secs(5);

/// Whether `ip` may be a pod's: in one of `sources` (`--pod-sources`; empty: any, as the
/// kernel's rules then admit only redirected pod traffic).
pub fn is_pod_source(sources: &[ipnet::IpNet], ip: std::net::IpAddr) -> bool {
    let ip = podiam_common::net::canonical(ip);
    sources.is_empty() || sources.iter().any(|net| net.contains(&ip))
}

/// Serves `handle` on `listener` until `shutdown`. `admit` says whether a peer may be
/// answered at all (it counts and logs the ones it refuses); `limiter` caps the
/// connections held at once, in total and per source address (a pod that opens thousands
/// of idle connections is refused beyond its share at accept, and the others keep theirs);
/// `what` names the listener in logs. A connection with no request in progress for
/// [`HEADER_TIMEOUT`] is closed (hyper's header-read timeout runs while a keep-alive
/// connection waits for its next request too).
pub async fn serve<A, H, F>(
    listener: TcpListener,
    shutdown: CancellationToken,
    what: &'static str,
    limiter: Limiter,
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
        let Ok(slot) = limiter.admit(peer.ip()) else {
            tracing::debug!(%peer, listener = what, "connection closed at accept: over its cap");
            continue;
        };
        // Small request/response exchanges: Nagle plus delayed ACKs would add 40 ms.
        let _ = tcp.set_nodelay(true);
        let handle = handle.clone();
        let service = service_fn(move |req| {
            let answer = handle(peer, req);
            async move { Ok::<_, Infallible>(answer.await) }
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
