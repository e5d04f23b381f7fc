//! The agent's client of the podiam servers.
//!
//! `--server-address HOST:PORT` (a headless Service; or several, comma-separated) is
//! resolved to every replica's address, and again every `--server-resolve-interval`. Each address gets one HTTP/2
//! connection over mutual TLS (the agent's certificate, reloaded on rotation). Requests go
//! round-robin over addresses that answered their last health check; a connection failure
//! or a `not_ready` answer moves the request to the next address. Every request carries
//! the agent's projected ServiceAccount token (`--token-file`, re-read as the kubelet
//! rotates it). The agent never exits because servers are unreachable: its readiness gate
//! closes and it keeps trying.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use parking_lot::Mutex;
use podiam_common::{
    feed,
    protocol::{ErrorBody, ErrorCode, HEALTH_PATH},
    readiness::Gate,
    secret::Secret,
    tls::Reloading,
};
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use rustls::{ClientConfig, pki_types::ServerName};
use serde::{Serialize, de::DeserializeOwned};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How the agent reaches the servers.
#[derive(Clone, Debug)]
pub struct ServerSettings {
    /// `HOST:PORT[,HOST:PORT...]`; each HOST is resolved to every address it has.
    pub address: String,
    /// The name the servers' certificate is checked against (default: HOST).
    pub server_name: Option<String>,
    /// The projected ServiceAccount token.
    pub token_file: PathBuf,
    /// How often to resolve HOST again.
    pub resolve_interval: Duration,
    /// How often to check each server's health.
    pub health_interval: Duration,
    /// Deadline of one request to one server.
    pub timeout: Duration,
}

/// Why the servers gave no answer.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ServerError {
    /// A server answered with a typed refusal.
    #[error("{}: {}", .0.code.as_str(), .0.message)]
    Refused(ErrorBody),
    /// No server could answer.
    #[error("no podiam server answered: {0}")]
    Unavailable(String),
}

/// Cheap to clone.
#[derive(Clone, Debug)]
pub struct Servers {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    settings: ServerSettings,
    /// The `(host, port)` entries of `--server-address`.
    targets: Vec<(String, u16)>,
    server_name: ServerName<'static>,
    tls: Reloading<ClientConfig>,
    backends: Mutex<Vec<Backend>>,
    next: AtomicUsize,
    token: Mutex<Option<(Instant, Secret)>>,
    ready: Gate,
    metrics: ServersMetrics,
}

#[derive(Clone, Debug)]
struct Backend {
    addr: SocketAddr,
    healthy: bool,
    conn: Option<http2::SendRequest<Full<Bytes>>>,
}

/// Metrics of the agent's link to the servers.
#[derive(Clone, Debug)]
pub struct ServersMetrics {
    requests: IntCounterVec,
    healthy: IntGauge,
    known: IntGauge,
}

/// The token is re-read this often (the kubelet rotates projected tokens well before
/// they expire).
const TOKEN_REFRESH: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

// === impl Servers ===

impl Servers {
    /// Starts resolving and health-checking; `ready` opens while a server is healthy.
    pub fn start(
        settings: ServerSettings,
        tls: Reloading<ClientConfig>,
        ready: Gate,
        metrics: ServersMetrics,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Self> {
        let targets = settings
            .address
            .split(',')
            .map(|a| split_host_port(a.trim()))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let name = settings
            .server_name
            .clone()
            .unwrap_or_else(|| targets[0].0.clone());
        let server_name = ServerName::try_from(name.clone())
            .map_err(|e| anyhow::anyhow!("invalid server name {name:?}: {e}"))?;
        let servers = Self {
            inner: Arc::new(Inner {
                settings,
                targets,
                server_name,
                tls,
                backends: Mutex::new(Vec::new()),
                next: AtomicUsize::new(0),
                token: Mutex::new(None),
                ready,
                metrics,
            }),
        };
        tokio::spawn(servers.clone().maintain(shutdown));
        Ok(servers)
    }

    /// `POST path` with `body` to a healthy server, failing over to the others.
    pub async fn call<Q: Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        body: &Q,
    ) -> Result<R, ServerError> {
        let body = Bytes::from(
            serde_json::to_vec(body).map_err(|e| ServerError::Unavailable(e.to_string()))?,
        );
        let candidates = self.candidates();
        if candidates.is_empty() {
            self.count("no_server");
            return Err(ServerError::Unavailable(format!(
                "{} resolves to no address",
                self.inner.settings.address
            )));
        }
        let mut last = String::new();
        for addr in candidates {
            match self.send(addr, Method::POST, path, body.clone()).await {
                Ok((status, bytes)) if status.is_success() => {
                    self.count("ok");
                    return serde_json::from_slice(&bytes).map_err(|e| {
                        ServerError::Unavailable(format!("{addr}: unreadable answer: {e}"))
                    });
                }
                Ok((status, bytes)) => {
                    let Ok(error) = serde_json::from_slice::<ErrorBody>(&bytes) else {
                        last = format!("{addr}: HTTP {status}");
                        self.count("error");
                        continue;
                    };
                    if error.code == ErrorCode::NotReady {
                        last = format!("{addr}: {}", error.message);
                        self.count("not_ready");
                        continue;
                    }
                    self.count("refused");
                    return Err(ServerError::Refused(error));
                }
                Err(error) => {
                    self.count("error");
                    tracing::debug!(%addr, %error, "server request failed; trying the next");
                    self.mark(addr, false, None);
                    last = format!("{addr}: {error}");
                }
            }
        }
        Err(ServerError::Unavailable(last))
    }

    fn count(&self, result: &str) {
        self.inner
            .metrics
            .requests
            .with_label_values(&[result])
            .inc();
    }

    /// Healthy addresses first, starting at the next in turn; the others after.
    fn candidates(&self) -> Vec<SocketAddr> {
        let backends = self.inner.backends.lock();
        let n = backends.len();
        if n == 0 {
            return Vec::new();
        }
        let start = self.inner.next.fetch_add(1, Ordering::Relaxed) % n;
        let rotated = backends.iter().cycle().skip(start).take(n);
        let (mut healthy, sick): (Vec<_>, Vec<_>) = rotated.partition(|b| b.healthy);
        healthy.extend(sick);
        healthy.into_iter().map(|b| b.addr).collect()
    }

    async fn send(
        &self,
        addr: SocketAddr,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        let mut sender = self.connection(addr).await?;
        let mut req = Request::builder()
            .method(method)
            .uri(format!("https://podiam-server{path}"))
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(token) = self.token() {
            req = req.header(header::AUTHORIZATION, format!("Bearer {}", token.expose()));
        }
        let req = req.body(Full::new(body))?;
        let exchange = async {
            sender.ready().await?;
            let rsp = sender.send_request(req).await?;
            let status = rsp.status();
            let bytes = rsp.into_body().collect().await?.to_bytes();
            anyhow::Ok((status, bytes))
        };
        tokio::time::timeout(self.inner.settings.timeout, exchange)
            .await
            .map_err(|_| anyhow::anyhow!("no answer within {:?}", self.inner.settings.timeout))?
    }

    /// The open connection to `addr`, or a new one.
    async fn connection(
        &self,
        addr: SocketAddr,
    ) -> anyhow::Result<http2::SendRequest<Full<Bytes>>> {
        let existing = self
            .inner
            .backends
            .lock()
            .iter()
            .find(|b| b.addr == addr)
            .and_then(|b| b.conn.clone())
            .filter(|c| !c.is_closed());
        if let Some(conn) = existing {
            return Ok(conn);
        }
        let sender = self.dial(addr).await?;
        self.mark(addr, true, Some(sender.clone()));
        Ok(sender)
    }

    /// A new HTTP/2 connection to `addr` over mutual TLS, for request bodies of type `B`.
    async fn dial<B>(&self, addr: SocketAddr) -> anyhow::Result<http2::SendRequest<B>>
    where
        B: hyper::body::Body + Send + Unpin + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let connect = async {
            let tcp = TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            let tls = tokio_rustls::TlsConnector::from(self.inner.tls.current())
                .connect(self.inner.server_name.clone(), tcp)
                .await?;
            let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .keep_alive_interval(Duration::from_secs(30))
                .handshake(TokioIo::new(tls))
                .await?;
            tokio::spawn(async move {
                if let Err(error) = conn.await {
                    tracing::debug!(%addr, %error, "server connection closed");
                }
            });
            anyhow::Ok(sender)
        };
        tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| anyhow::anyhow!("connecting took longer than {CONNECT_TIMEOUT:?}"))?
    }

    /// A connection of its own to `addr` for the node feed (a long-lived gRPC stream), with
    /// keepalive pings so that a dead server is noticed.
    pub async fn feed_channel(&self, addr: SocketAddr) -> anyhow::Result<feed::Channel> {
        Ok(feed::Channel::new(self.dial(addr).await?))
    }

    /// The agent's ServiceAccount token, for requests made outside [`Servers::call`].
    pub fn bearer(&self) -> Option<Secret> {
        self.token()
    }

    /// Server addresses to try, healthy ones first, starting at the next in turn.
    pub fn addresses(&self) -> Vec<SocketAddr> {
        self.candidates()
    }

    fn mark(&self, addr: SocketAddr, healthy: bool, conn: Option<http2::SendRequest<Full<Bytes>>>) {
        let mut backends = self.inner.backends.lock();
        if let Some(b) = backends.iter_mut().find(|b| b.addr == addr) {
            b.healthy = healthy;
            if conn.is_some() || !healthy {
                b.conn = conn;
            }
        }
        let healthy = backends.iter().filter(|b| b.healthy).count();
        drop(backends);
        self.inner
            .metrics
            .healthy
            .set(i64::try_from(healthy).unwrap_or(i64::MAX));
        if healthy > 0 {
            self.inner.ready.open();
        } else {
            self.inner.ready.close();
        }
    }

    /// The ServiceAccount token, re-read every [`TOKEN_REFRESH`].
    fn token(&self) -> Option<Secret> {
        let mut cached = self.inner.token.lock();
        if let Some((at, token)) = cached.as_ref()
            && at.elapsed() < TOKEN_REFRESH
        {
            return Some(token.clone());
        }
        match std::fs::read_to_string(&self.inner.settings.token_file) {
            Ok(text) => {
                let token = Secret::new(text.trim().to_string());
                *cached = Some((Instant::now(), token.clone()));
                Some(token)
            }
            Err(error) => {
                tracing::warn!(path = %self.inner.settings.token_file.display(), %error, "cannot read the ServiceAccount token");
                cached.as_ref().map(|(_, t)| t.clone())
            }
        }
    }

    /// Resolves and health-checks until `shutdown`.
    async fn maintain(self, shutdown: CancellationToken) {
        let mut last_resolve: Option<Instant> = None;
        loop {
            if last_resolve.is_none_or(|t| t.elapsed() >= self.inner.settings.resolve_interval) {
                self.resolve().await;
                last_resolve = Some(Instant::now());
            }
            let addrs: Vec<SocketAddr> =
                self.inner.backends.lock().iter().map(|b| b.addr).collect();
            let checks = addrs.into_iter().map(|addr| {
                let servers = self.clone();
                async move {
                    let healthy = matches!(
                        servers.send(addr, Method::GET, HEALTH_PATH, Bytes::new()).await,
                        Ok((status, _)) if status.is_success()
                    );
                    if !healthy {
                        servers.mark(addr, false, None);
                    } else {
                        servers.mark(addr, true, None);
                    }
                }
            });
            futures::future::join_all(checks).await;
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.inner.settings.health_interval) => {}
            }
        }
    }

    async fn resolve(&self) {
        let mut resolved = Vec::new();
        let mut failed = false;
        for (host, port) in &self.inner.targets {
            match tokio::net::lookup_host((host.as_str(), *port)).await {
                Ok(addrs) => resolved.extend(addrs),
                Err(error) => {
                    failed = true;
                    tracing::warn!(%host, %error, "resolving the server address failed");
                }
            }
        }
        // A failed lookup keeps the known addresses rather than forgetting every server.
        let result = if failed && resolved.is_empty() {
            Err("no address")
        } else {
            Ok(resolved)
        };
        match result {
            Ok(addrs) => {
                let mut addrs: Vec<SocketAddr> = addrs;
                addrs.sort();
                addrs.dedup();
                let mut backends = self.inner.backends.lock();
                let old = std::mem::take(&mut *backends);
                *backends = addrs
                    .iter()
                    .map(|addr| {
                        old.iter()
                            .find(|b| b.addr == *addr)
                            .cloned()
                            .unwrap_or(Backend {
                                addr: *addr,
                                healthy: false,
                                conn: None,
                            })
                    })
                    .collect();
                self.inner
                    .metrics
                    .known
                    .set(i64::try_from(backends.len()).unwrap_or(i64::MAX));
                if backends
                    .iter()
                    .map(|b| b.addr)
                    .ne(old.iter().map(|b| b.addr))
                {
                    tracing::info!(servers = ?addrs, "server addresses");
                }
            }
            Err(_) => tracing::warn!("no server address resolved; keeping the known ones"),
        }
    }
}

fn split_host_port(address: &str) -> anyhow::Result<(String, u16)> {
    let (host, port) = address
        .rsplit_once(':')
        .ok_or_else(|| anyhow::anyhow!("--server-address {address:?} must be HOST:PORT"))?;
    let port = port
        .parse()
        .map_err(|_| anyhow::anyhow!("--server-address {address:?}: invalid port"))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    if host.is_empty() {
        anyhow::bail!("--server-address {address:?}: empty host");
    }
    Ok((host, port))
}

// === impl ServersMetrics ===

impl ServersMetrics {
    /// Registers the metrics in `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let requests = IntCounterVec::new(
            Opts::new(
                "podiam_agent_server_requests_total",
                "Requests to podiam servers by result (ok, refused, not_ready, error, no_server)",
            ),
            &["result"],
        )?;
        let healthy = IntGauge::new(
            "podiam_agent_servers_healthy",
            "Servers that pass their health check",
        )?;
        let known = IntGauge::new("podiam_agent_servers_known", "Server addresses resolved")?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(healthy.clone()))?;
        registry.register(Box::new(known.clone()))?;
        Ok(Self {
            requests,
            healthy,
            known,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_addresses() {
        assert_eq!(
            split_host_port("podiam-server.podiam.svc:8443").unwrap(),
            ("podiam-server.podiam.svc".into(), 8443)
        );
        assert_eq!(split_host_port("[::1]:8443").unwrap(), ("::1".into(), 8443));
        assert!(split_host_port("no-port").is_err());
        assert!(split_host_port(":8443").is_err());
        assert!(split_host_port("host:http").is_err());
    }
}
