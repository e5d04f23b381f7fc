//! The admin server: `/healthz` (the process is alive), `/readyz` (every readiness gate is
//! open) and `/metrics` (Prometheus text format). It listens on its own port so that none
//! of it is reachable through the metadata address.

use std::{convert::Infallible, net::SocketAddr, time::Duration};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
};
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    listen::{ConnectionLimits, Limiter, ListenerMetrics},
    readiness::Readiness,
};

/// Connections to the admin server at once: a scraper and the kubelet's probes need a few.
pub const LIMITS: ConnectionLimits = ConnectionLimits {
    total: 64,
    per_source: 8,
};

/// How long in-flight admin requests may take after shutdown starts.
const GRACE: Duration = Duration::from_secs(5);

/// `podiam_runtime_tasks`: the tokio runtime's live tasks, read at each scrape (a task
/// per connection and per stream, so a leak of either shows as a rising count).
struct RuntimeTasks {
    handle: tokio::runtime::Handle,
    desc: prometheus::core::Desc,
}

impl RuntimeTasks {
    fn for_current() -> Option<Self> {
        let handle = tokio::runtime::Handle::try_current().ok()?;
        let desc = prometheus::core::Desc::new(
            "podiam_runtime_tasks".into(),
            "Tasks alive in the process's tokio runtime".into(),
            Vec::new(),
            std::collections::HashMap::new(),
        )
        .ok()?;
        Some(Self { handle, desc })
    }
}

impl prometheus::core::Collector for RuntimeTasks {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let tasks = self.handle.metrics().num_alive_tasks();
        let gauge = prometheus::IntGauge::with_opts(prometheus::Opts::new(
            self.desc.fq_name.clone(),
            self.desc.help.clone(),
        ));
        match gauge {
            Ok(gauge) => {
                gauge.set(i64::try_from(tasks).unwrap_or(i64::MAX));
                prometheus::core::Collector::collect(&gauge)
            }
            Err(_) => Vec::new(),
        }
    }
}

/// Admin server flags.
#[derive(Clone, Debug, clap::Args)]
pub struct AdminArgs {
    /// Address of the admin server (/healthz, /readyz, /metrics). Default: port 9620 on
    /// every address for the server (a pod); for the agent, on the address of its
    /// metadata endpoint (the node's, $HOST_IP), not on every address of the host network.
    #[arg(long, env = "PODIAM_ADMIN_ADDR")]
    pub admin_addr: Option<SocketAddr>,
}

/// The admin server's port when `--admin-addr` names none.
pub const DEFAULT_PORT: u16 = 9620;

/// What the admin server serves.
#[derive(Clone, Debug)]
pub struct Admin {
    registry: Registry,
    readiness: Readiness,
}

// === impl Admin ===

impl Admin {
    /// Serves `registry` (to which the process collector and, inside a tokio runtime, the
    /// runtime's task count are added) and `readiness`.
    pub fn new(registry: Registry, readiness: Readiness) -> Self {
        let process = prometheus::process_collector::ProcessCollector::for_self();
        if let Err(error) = registry.register(Box::new(process)) {
            // Only possible when the caller registered one already: harmless.
            tracing::debug!(%error, "process collector not registered");
        }
        if let Some(tasks) = RuntimeTasks::for_current()
            && let Err(error) = registry.register(Box::new(tasks))
        {
            tracing::debug!(%error, "runtime task collector not registered");
        }
        Self {
            registry,
            readiness,
        }
    }

    /// Serves HTTP/1.1 (what Prometheus and the kubelet's probes speak) until `shutdown`
    /// is cancelled, then lets open requests finish for a grace period. Connections are
    /// bounded by [`LIMITS`] (counted in `metrics` as listener `admin`), and one with no
    /// request for 10 s is closed: on the agent the port is on the node's address, which
    /// pods can reach.
    pub async fn serve(
        self,
        listener: TcpListener,
        metrics: &ListenerMetrics,
        shutdown: CancellationToken,
    ) {
        let graceful = GracefulShutdown::new();
        let limiter = Limiter::new("admin", LIMITS, metrics);
        loop {
            let Some((stream, peer)) = crate::listen::accept(&listener, &shutdown, "admin").await
            else {
                break;
            };
            let Ok(slot) = limiter.admit(peer.ip()) else {
                continue;
            };
            let admin = self.clone();
            let service = service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(admin.handle(&req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .max_buf_size(16 * 1024)
                .serve_connection(TokioIo::new(stream), service);
            let conn = graceful.watch(conn);
            tokio::spawn(async move {
                let _slot = slot;
                if let Err(error) = conn.await {
                    tracing::debug!(%error, "admin connection ended with an error");
                }
            });
        }
        if tokio::time::timeout(GRACE, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("admin server: connections still open after the grace period");
        }
    }

    fn handle(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed\n".into(),
            );
        }
        match req.uri().path() {
            "/healthz" | "/livez" => text(StatusCode::OK, "ok\n".into()),
            "/readyz" => {
                if self.readiness.is_ready() {
                    text(StatusCode::OK, "ready\n".into())
                } else {
                    let waiting = self.readiness.waiting_for().join(", ");
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("not ready: waiting for {waiting}\n"),
                    )
                }
            }
            "/metrics" => self.metrics(),
            _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
        }
    }

    fn metrics(&self) -> Response<Full<Bytes>> {
        let encoder = TextEncoder::new();
        let mut body = Vec::with_capacity(16 * 1024);
        if let Err(error) = encoder.encode(&self.registry.gather(), &mut body) {
            tracing::warn!(%error, "metrics encoding failed");
            return text(StatusCode::INTERNAL_SERVER_ERROR, format!("{error}\n"));
        }
        response(StatusCode::OK, encoder.format_type(), body.into())
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    response(status, "text/plain; charset=utf-8", body.into())
}

fn response(status: StatusCode, content_type: &str, body: Bytes) -> Response<Full<Bytes>> {
    let mut rsp = Response::new(Full::new(body));
    *rsp.status_mut() = status;
    if let Ok(value) = header::HeaderValue::from_str(content_type) {
        rsp.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    rsp
}
