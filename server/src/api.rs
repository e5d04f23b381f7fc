//! The agent-facing API: HTTP/2 over mutual TLS (rustls), versioned JSON endpoints (see
//! [`podiam_common::protocol`]).
//!
//! A connection must present a client certificate signed by `--ca` or the handshake
//! fails. Each request then carries the agent's ServiceAccount token, which
//! [`crate::auth`] turns into the agent's node. Refusals map to a typed
//! [`ErrorBody`] here, in [`error_response`], and nowhere else.

use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::{
    body::{Body, Incoming},
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use podiam_common::{
    arn::RoleArn,
    feed::{self, node_feed_server::NodeFeedServer},
    listen::{self, Activity, ConnectionLimits, IdleLimits, Limiter, ListenerMetrics},
    protocol::{
        CREDENTIALS_PATH, CredentialsRequest, CredentialsResponse, ErrorBody, ErrorCode,
        HEALTH_PATH, POD_IDENTITY_PATH, PodIdentityRequest, ROLE_PATH, RoleRequest, RoleResponse,
    },
    readiness::Readiness,
    tls::Reloading,
};
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use rustls::ServerConfig;
use serde::{Serialize, de::DeserializeOwned};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower::Service;

use crate::{
    auth::{AuthError, Authenticate, TokenReviewer},
    credentials::{Caller, IssueError, Issuer},
    feed::Feed,
};

/// Requests larger than this are refused.
const MAX_BODY: usize = 16 * 1024;
/// A TLS handshake that takes longer is dropped (an agent's takes milliseconds; a
/// connection that never completes one holds a slot of its source's share meanwhile).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection's first request must come this soon after its handshake, and a connection
/// with no request in progress (agents check health every few seconds, and a node feed is
/// a request in progress) is closed after the idle limit.
const IDLE: IdleLimits = IdleLimits {
    first_request: Duration::from_secs(5),
    idle: Duration::from_secs(120),
};
/// Streams at once on one connection (an agent's requests in flight, and its feed).
const MAX_STREAMS: u32 = 256;
/// A request body must arrive within this (the JSON bodies are a few hundred bytes).
const BODY_TIMEOUT: Duration = Duration::from_secs(5);
/// A node feed subscription must be read and authenticated within this (its body, then a
/// TokenReview of the agent's token).
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(10);
/// The listener's name in metrics.
const LISTENER: &str = "agent_api";
/// In-flight requests get this long after shutdown starts.
const GRACE: Duration = Duration::from_secs(10);

/// The API's state; cheap to clone.
#[derive(Clone, Debug)]
pub struct AgentApi {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    issuer: Issuer,
    auth: Arc<dyn Authenticate>,
    /// The container-credentials path (`None`: off).
    pod_tokens: Option<PodTokens>,
    readiness: Readiness,
    metrics: ApiMetrics,
    role_labels: bool,
}

/// The container-credentials path's part of the API.
#[derive(Clone, Debug)]
pub struct PodTokens {
    /// Reviews pods' tokens.
    pub reviewer: TokenReviewer,
    /// Open while the path's watches (ServiceAccounts, associations) are current.
    pub ready: Readiness,
}

/// API metrics: requests by endpoint and result, latency by endpoint.
#[derive(Clone, Debug)]
pub struct ApiMetrics {
    requests: IntCounterVec,
    latency: HistogramVec,
    issued: IntCounterVec,
    handshakes: IntCounterVec,
}

#[derive(Clone, Copy, Debug)]
enum Endpoint {
    Role,
    Credentials,
    PodIdentity,
    Health,
}

type Reply = Result<Response<Full<Bytes>>, (ErrorCode, String)>;

// === impl AgentApi ===

impl AgentApi {
    /// The API over `issuer`; `role_labels` adds role ARNs as a metric label.
    pub fn new(
        issuer: Issuer,
        auth: Arc<dyn Authenticate>,
        pod_tokens: Option<PodTokens>,
        readiness: Readiness,
        metrics: ApiMetrics,
        role_labels: bool,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                issuer,
                auth,
                pod_tokens,
                readiness,
                metrics,
                role_labels,
            }),
        }
    }

    /// Serves mutual-TLS HTTP/2 on `listener` until `shutdown`, then lets in-flight
    /// requests finish for a grace period. The node `feed` (gRPC) shares the listener.
    /// Connections are bounded by `limits` (closed at accept beyond them, before any TLS
    /// work), must finish their handshake within [`HANDSHAKE_TIMEOUT`] and send a first
    /// request soon after, and are closed when idle.
    pub async fn serve(
        self,
        feed: Feed,
        listener: TcpListener,
        tls: Reloading<ServerConfig>,
        limits: ConnectionLimits,
        listeners: ListenerMetrics,
        shutdown: CancellationToken,
    ) {
        let limiter = Limiter::new(LISTENER, limits, &listeners);
        let tracker = TaskTracker::new();
        loop {
            let Some((tcp, peer)) =
                podiam_common::listen::accept(&listener, &shutdown, "agent API").await
            else {
                break;
            };
            let Ok(slot) = limiter.admit(peer.ip()) else {
                tracing::debug!(%peer, "agent API connection closed at accept: over its cap");
                continue;
            };
            // Small request/response exchanges: Nagle plus delayed ACKs would add 40 ms.
            if let Err(error) = tcp.set_nodelay(true) {
                tracing::debug!(%error, "TCP_NODELAY not set");
            }
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
            let api = self.clone();
            let grpc = NodeFeedServer::new(feed.clone())
                .max_decoding_message_size(feed::MAX_SUBSCRIPTION_BYTES);
            let (shutdown, listeners) = (shutdown.clone(), listeners.clone());
            tracker.spawn(async move {
                let _slot = slot;
                let handshakes = &api.inner.metrics.handshakes;
                let stream =
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            handshakes.with_label_values(&["ok"]).inc();
                            stream
                        }
                        Ok(Err(error)) => {
                            handshakes.with_label_values(&["refused"]).inc();
                            tracing::info!(%peer, %error, "TLS handshake refused");
                            return;
                        }
                        Err(_) => {
                            handshakes.with_label_values(&["timeout"]).inc();
                            return;
                        }
                    };
                let activity = Activity::new();
                let service = service_fn({
                    let activity = activity.clone();
                    move |req: Request<Incoming>| {
                        let api = api.clone();
                        let mut grpc = grpc.clone();
                        let active = activity.start();
                        let activity = activity.clone();
                        async move {
                            let rsp = if req.uri().path().starts_with(feed::SERVICE_PREFIX) {
                                // The subscription's body and its authentication have a
                                // deadline; the stream that follows has none.
                                match tokio::time::timeout(SUBSCRIBE_TIMEOUT, grpc.call(req)).await
                                {
                                    Ok(rsp) => rsp?.map(Either::Right),
                                    Err(_) => tonic::Status::deadline_exceeded(
                                        "the subscription did not arrive in time",
                                    )
                                    .into_http()
                                    .map(Either::Right),
                                }
                            } else {
                                api.handle(req).await.map(Either::Left)
                            };
                            // A feed's response streams for as long as it lasts: the
                            // connection is not idle meanwhile.
                            Ok::<_, Infallible>(rsp.map(|body| activity.track(body, active)))
                        }
                    }
                });
                let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .keep_alive_interval(Some(Duration::from_secs(30)))
                    .keep_alive_timeout(Duration::from_secs(20))
                    .max_concurrent_streams(MAX_STREAMS)
                    // Bounds what one connection buffers for a slow reader (the node
                    // feed's streams are long-lived; a thousand agents each hold one).
                    .max_send_buf_size(64 * 1024)
                    .serve_connection(TokioIo::new(stream), service);
                let driven = listen::drive(conn, &activity, IDLE, &shutdown, &listeners, LISTENER);
                if let Err(error) = driven.await {
                    tracing::debug!(%peer, %error, "API connection ended with an error");
                }
            });
        }
        tracker.close();
        if tokio::time::timeout(GRACE, tracker.wait()).await.is_err() {
            tracing::warn!("API: requests still in flight after the grace period");
        }
    }

    /// Handles one request (any body type, so tests can call it without sockets).
    pub async fn handle<B>(&self, req: Request<B>) -> Response<Full<Bytes>>
    where
        B: Body,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let started = tokio::time::Instant::now();
        let endpoint = match (req.method(), req.uri().path()) {
            (&Method::POST, ROLE_PATH) => Endpoint::Role,
            (&Method::POST, CREDENTIALS_PATH) => Endpoint::Credentials,
            (&Method::POST, POD_IDENTITY_PATH) => Endpoint::PodIdentity,
            (&Method::GET, HEALTH_PATH) => Endpoint::Health,
            (method, path) => {
                let message = format!("no endpoint {method} {path}");
                return error_response(ErrorCode::InvalidRequest, message);
            }
        };
        let reply = match endpoint {
            Endpoint::Health => self.health(),
            Endpoint::Role => self.role(req).await,
            Endpoint::Credentials => self.credentials(req).await,
            Endpoint::PodIdentity => self.pod_identity(req).await,
        };
        let (label, rsp) = match reply {
            Ok(rsp) => ("ok", rsp),
            Err((code, message)) => (code.as_str(), error_response(code, message)),
        };
        let metrics = &self.inner.metrics;
        metrics
            .requests
            .with_label_values(&[endpoint.as_str(), label])
            .inc();
        metrics
            .latency
            .with_label_values(&[endpoint.as_str()])
            .observe(started.elapsed().as_secs_f64());
        rsp
    }

    fn health(&self) -> Reply {
        if !self.inner.readiness.is_ready() {
            return Err(not_ready(&self.inner.readiness));
        }
        Ok(json(StatusCode::OK, &serde_json::json!({"status": "ok"})))
    }

    async fn role<B>(&self, req: Request<B>) -> Reply
    where
        B: Body,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (caller, request): (Caller, RoleRequest) = self.admit(req).await?;
        let (pod, grant) = self
            .inner
            .issuer
            .role(request.ip, &caller)
            .await
            .map_err(refusal)?;
        tracing::debug!(ip = %request.ip, pod = %pod.key, role.arn = %grant.role_arn, "role");
        Ok(json(
            StatusCode::OK,
            &RoleResponse {
                role_arn: grant.role_arn,
            },
        ))
    }

    async fn credentials<B>(&self, req: Request<B>) -> Reply
    where
        B: Body,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (caller, request): (Caller, CredentialsRequest) = self.admit(req).await?;
        let issued = self
            .inner
            .issuer
            .credentials(request.ip, request.role.as_deref(), &caller)
            .await
            .map_err(refusal)?;
        self.count_issued(&issued.role_arn);
        tracing::debug!(ip = %request.ip, pod = %issued.pod.key, role.arn = %issued.role_arn, "credentials");
        Ok(json(
            StatusCode::OK,
            &CredentialsResponse {
                role_arn: issued.role_arn,
                credentials: issued.credentials,
                pod_uid: None,
            },
        ))
    }

    async fn pod_identity<B>(&self, req: Request<B>) -> Reply
    where
        B: Body,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let Some(path) = self.inner.pod_tokens.clone() else {
            return Err((
                ErrorCode::InvalidRequest,
                "the container-credentials path is off on this server (--pod-identity)".into(),
            ));
        };
        if !path.ready.is_ready() {
            return Err(not_ready(&path.ready));
        }
        let (caller, request): (Caller, PodIdentityRequest) = self.admit(req).await?;
        let token = path
            .reviewer
            .review_for(Some(request.token.expose()), caller.node.as_ref())
            .await
            .map_err(|error| match error {
                AuthError::Unavailable(_) => (ErrorCode::NotReady, error.to_string()),
                AuthError::Busy => (ErrorCode::Throttled, error.to_string()),
                // Counted by result; per request at debug level (a pod may send many).
                _ => {
                    tracing::debug!(%error, "pod token refused");
                    (ErrorCode::InvalidToken, error.to_string())
                }
            })?;
        let issued = self
            .inner
            .issuer
            .pod_identity(&token, &caller, request.ip)
            .await
            .map_err(refusal)?;
        self.count_issued(&issued.role_arn);
        tracing::debug!(pod = %issued.pod.key, role.arn = %issued.role_arn, "pod identity credentials");
        Ok(json(
            StatusCode::OK,
            &CredentialsResponse {
                role_arn: issued.role_arn,
                credentials: issued.credentials,
                pod_uid: issued.pod.uid.map(|u| u.to_string()),
            },
        ))
    }

    fn count_issued(&self, role: &RoleArn) {
        let role = if self.inner.role_labels {
            role.as_str()
        } else {
            ""
        };
        self.inner.metrics.issued.with_label_values(&[role]).inc();
    }

    /// Readiness, the agent's token, and the JSON body.
    async fn admit<B, T>(&self, req: Request<B>) -> Result<(Caller, T), (ErrorCode, String)>
    where
        B: Body,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        T: DeserializeOwned,
    {
        if !self.inner.readiness.is_ready() {
            return Err(not_ready(&self.inner.readiness));
        }
        let token = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_string);
        let caller = self
            .inner
            .auth
            .authenticate(token.as_deref())
            .await
            .map_err(|error| match error {
                AuthError::Unavailable(_) | AuthError::Busy => {
                    (ErrorCode::NotReady, error.to_string())
                }
                _ => {
                    tracing::info!(%error, "agent refused");
                    (ErrorCode::Unauthenticated, error.to_string())
                }
            })?;
        let read = Limited::new(req.into_body(), MAX_BODY).collect();
        let body = tokio::time::timeout(BODY_TIMEOUT, read)
            .await
            .map_err(|_| {
                (
                    ErrorCode::InvalidRequest,
                    "the body took too long".to_string(),
                )
            })?
            .map_err(|e| (ErrorCode::InvalidRequest, format!("reading the body: {e}")))?
            .to_bytes();
        let request = serde_json::from_slice(&body)
            .map_err(|e| (ErrorCode::InvalidRequest, format!("invalid JSON body: {e}")))?;
        Ok((caller, request))
    }
}

fn refusal(error: IssueError) -> (ErrorCode, String) {
    let code = error.code();
    match code {
        ErrorCode::PodNotFound | ErrorCode::RoleMismatch => tracing::debug!(%error, "refused"),
        _ => tracing::info!(code = code.as_str(), %error, "refused"),
    }
    (code, error.to_string())
}

fn not_ready(readiness: &Readiness) -> (ErrorCode, String) {
    let waiting = readiness.waiting_for().join(", ");
    (
        ErrorCode::NotReady,
        format!("server not ready: waiting for {waiting}"),
    )
}

/// The one place a refusal becomes an HTTP response.
fn error_response(code: ErrorCode, message: String) -> Response<Full<Bytes>> {
    let status = StatusCode::from_u16(code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json(status, &ErrorBody { code, message })
}

fn json<T: Serialize>(status: StatusCode, body: &T) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut rsp = Response::new(Full::new(Bytes::from(bytes)));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    rsp
}

// === impl Endpoint ===

impl Endpoint {
    fn as_str(self) -> &'static str {
        match self {
            Endpoint::Role => "role",
            Endpoint::Credentials => "credentials",
            Endpoint::PodIdentity => "pod_identity",
            Endpoint::Health => "health",
        }
    }
}

// === impl ApiMetrics ===

impl ApiMetrics {
    /// Registers the API metrics in `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let requests = IntCounterVec::new(
            Opts::new(
                "podiam_api_requests_total",
                "Agent API requests by endpoint and result (ok or an error code)",
            ),
            &["endpoint", "result"],
        )?;
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "podiam_api_request_duration_seconds",
                "Agent API request latency by endpoint",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 3.0, 5.0,
            ]),
            &["endpoint"],
        )?;
        let issued = IntCounterVec::new(
            Opts::new(
                "podiam_credentials_issued_total",
                "Credential sets handed to agents (role label empty unless --metrics-role-labels)",
            ),
            &["role"],
        )?;
        let handshakes = IntCounterVec::new(
            Opts::new(
                "podiam_api_tls_handshakes_total",
                "TLS handshakes by result (ok, refused, timeout)",
            ),
            &["result"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        registry.register(Box::new(issued.clone()))?;
        registry.register(Box::new(handshakes.clone()))?;
        Ok(Self {
            requests,
            latency,
            issued,
            handshakes,
        })
    }
}
