//! The EC2-metadata-compatible endpoint pods talk to (every rule here broke some SDK when
//! violated; agent/tests/imds.rs runs real SDK clients against it).
//!
//! - `PUT /latest/api/token`: a stateless token bound to the caller's IP ([`token`]),
//!   with the TTL echoed; `X-Forwarded-For` → 403; bad TTL → 400.
//! - With a token, every request must carry a valid one (401 otherwise); without one,
//!   only if IMDSv1 is allowed (`--require-imdsv2` forbids it).
//! - `.../iam/security-credentials/` → the pod's role name; `.../<role>` → its
//!   credentials; `-extended` adds `AccountId`. Another role than the pod's own → 404.
//! - Everything else goes through the allow-listed [`crate::proxy`], or 404.
//!
//! The caller is the connection's source address. Refusals from the server map to IMDS
//! answers in [`refused`], and only there. A pod is told what to do in general terms and
//! nothing of others: no policy text, no other pod, no node. The server's reasons go to
//! the pod's Warning Events, the server's log and `podiam-server explain`.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use podiam_common::net::canonical;
use podiam_common::protocol::{
    CREDENTIALS_PATH, CredentialsRequest, CredentialsResponse, ErrorBody, ErrorCode, ROLE_PATH,
    RoleRequest, RoleResponse,
};
use podiam_common::{arn::RoleArn, clock::Clock};
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    proxy::MetadataProxy,
    servers::{ServerError, Servers},
    table::{Decided, Lookup, NodeTable, Served},
};

pub mod path;
pub mod token;

use self::{path::Normal, token::TokenKey};

const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
const CREDENTIALS: &str = "security-credentials";
const CREDENTIALS_EXTENDED: &str = "security-credentials-extended";

/// The endpoint; cheap to clone.
#[derive(Clone, Debug)]
pub struct Imds {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// The node's own address (the listener's): requests from it are never a pod's.
    node_ips: Vec<IpAddr>,
    /// `--pod-sources`: connections from elsewhere are closed unanswered (empty: all,
    /// because the kernel's rules admit only redirected pod traffic).
    pod_sources: Vec<ipnet::IpNet>,
    key: TokenKey,
    require_v2: bool,
    servers: Servers,
    /// The node table from the feed (`None`: every request asks a server).
    table: Option<NodeTable>,
    /// The wall clock (tokens, credential lifetimes).
    clock: Arc<dyn Clock>,
    /// How long a request from an IP the table does not know yet waits for the feed.
    table_wait: Duration,
    proxy: MetadataProxy,
    metrics: ImdsMetrics,
}

/// How the endpoint answers.
#[derive(Debug)]
pub struct ImdsConfig {
    /// The node's own addresses (callers from them are no pod and are answered at once).
    pub node_ips: Vec<IpAddr>,
    /// `--pod-sources` (empty: all).
    pub pod_sources: Vec<ipnet::IpNet>,
    /// The key IMDSv2 tokens are minted with.
    pub key: TokenKey,
    /// Refuse IMDSv1.
    pub require_v2: bool,
    /// The node table (`None`: every credential request asks a server).
    pub table: Option<NodeTable>,
    /// How long a request from an IP the table does not know yet waits for the feed.
    pub table_wait: Duration,
    /// The wall clock.
    pub clock: Arc<dyn Clock>,
    /// Metrics.
    pub metrics: ImdsMetrics,
}

/// Requests by route and status, latency by route.
#[derive(Clone, Debug)]
pub struct ImdsMetrics {
    requests: IntCounterVec,
    refused: IntCounterVec,
    /// `podiam_agent_credentials_answered_total` by source.
    from_table: prometheus::IntCounter,
    from_server: prometheus::IntCounter,
    /// Per route (by [`Route::index`]): the 200 counter and the latency histogram, looked
    /// up once rather than per request.
    ok: Vec<prometheus::IntCounter>,
    latency_of: Vec<prometheus::Histogram>,
}

/// What a request asks for, once its path is normal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    Token,
    RoleList { extended: bool },
    Credentials { extended: bool },
    Proxy,
    Refused,
}

// === impl Imds ===

impl Imds {
    /// The endpoint, minting tokens with `key`; `node_ips` are the node's own addresses
    /// (callers from them are no pod and are answered at once).
    pub fn new(config: ImdsConfig, servers: Servers, proxy: MetadataProxy) -> Self {
        let ImdsConfig {
            node_ips,
            pod_sources,
            key,
            require_v2,
            table,
            table_wait,
            clock,
            metrics,
        } = config;
        Self {
            inner: Arc::new(Inner {
                node_ips: node_ips.into_iter().map(canonical).collect(),
                pod_sources,
                key,
                require_v2,
                servers,
                table,
                table_wait,
                clock,
                proxy,
                metrics,
            }),
        }
    }

    /// Serves HTTP/1 on `listener` until `shutdown` (see [`crate::pods::serve`]).
    pub async fn serve(
        self,
        listener: TcpListener,
        limits: crate::pods::SourceLimits,
        shutdown: CancellationToken,
    ) {
        let admit = |peer: SocketAddr| {
            let ok = self.is_pod_source(peer.ip());
            if !ok {
                // Not a pod (another host hitting $HOST_IP:8181, the node itself): no answer.
                self.inner
                    .metrics
                    .refused
                    .with_label_values(&["not_a_pod_source"])
                    .inc();
                tracing::debug!(%peer, "connection from outside --pod-sources closed");
            }
            ok
        };
        let imds = self.clone();
        let handle = move |peer, req| {
            let imds = imds.clone();
            async move { imds.handle(peer, req).await }
        };
        crate::pods::serve(
            listener,
            shutdown,
            "metadata endpoint",
            limits,
            admit,
            handle,
        )
        .await;
    }

    /// Whether `ip` may be a pod's (see `--pod-sources`).
    fn is_pod_source(&self, ip: IpAddr) -> bool {
        crate::pods::is_pod_source(&self.inner.pod_sources, ip)
    }

    /// Answers one request from `peer` (bodies are never read).
    pub async fn handle<B>(&self, peer: SocketAddr, req: Request<B>) -> Response<Full<Bytes>> {
        let started = tokio::time::Instant::now();
        let ip = canonical(peer.ip());
        let head = req.method() == Method::HEAD;
        let (route, mut rsp) = self
            .answer(ip, req.method(), req.uri().path(), req.headers())
            .await;
        rsp.headers_mut()
            .insert(header::SERVER, HeaderValue::from_static("EC2ws"));
        if head {
            *rsp.body_mut() = Full::new(Bytes::new());
        }
        self.inner
            .metrics
            .count(route, rsp.status(), started.elapsed());
        tracing::debug!(%ip, route = route.as_str(), status = rsp.status().as_u16(), "imds");
        rsp
    }

    async fn answer(
        &self,
        ip: IpAddr,
        method: &Method,
        raw_path: &str,
        headers: &HeaderMap,
    ) -> (Route, Response<Full<Bytes>>) {
        if !matches!(*method, Method::GET | Method::HEAD | Method::PUT) {
            return (
                Route::Refused,
                text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
            );
        }
        let path = match Normal::parse(raw_path) {
            Ok(path) => path,
            Err(error) => {
                return (
                    Route::Refused,
                    text(StatusCode::NOT_FOUND, &format!("not found: {error}")),
                );
            }
        };
        let route = Route::of(&path);
        if route == Route::Token {
            if *method != Method::PUT {
                return (
                    route,
                    text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
                );
            }
            return (route, self.token(ip, headers));
        }
        if *method == Method::PUT {
            return (
                route,
                text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
            );
        }
        match headers.get(TOKEN_HEADER).map(|v| v.to_str()) {
            Some(Ok(token)) => {
                if let Err(error) = self.inner.key.verify(token, ip, self.inner.clock.now()) {
                    return (
                        route,
                        text(StatusCode::UNAUTHORIZED, &format!("unauthorized: {error}")),
                    );
                }
            }
            Some(Err(_)) => {
                return (
                    route,
                    text(StatusCode::UNAUTHORIZED, "unauthorized: invalid token"),
                );
            }
            None if self.inner.require_v2 => {
                return (
                    route,
                    text(
                        StatusCode::UNAUTHORIZED,
                        "unauthorized: IMDSv2 token required",
                    ),
                );
            }
            None => {}
        }
        let credentials_route = matches!(route, Route::RoleList { .. } | Route::Credentials { .. });
        if credentials_route && self.inner.node_ips.contains(&ip) {
            // hostNetwork pods and node processes: no pod has this address, so answer at
            // once instead of making the server wait for one.
            return (
                route,
                text(
                    StatusCode::NOT_FOUND,
                    "not found: the node's own address is not a pod's",
                ),
            );
        }
        let rsp = match route {
            Route::RoleList { extended } if !path.trailing_slash => {
                let kind = if extended {
                    CREDENTIALS_EXTENDED
                } else {
                    CREDENTIALS
                };
                redirect(&format!("/latest/meta-data/iam/{kind}/"))
            }
            Route::RoleList { .. } => self.role_list(ip).await,
            Route::Credentials { extended } => {
                let role = path.segments.last().map(String::as_str).unwrap_or_default();
                self.credentials(ip, role, extended).await
            }
            Route::Proxy => self.proxy(&path).await,
            Route::Token | Route::Refused => text(StatusCode::NOT_FOUND, "not found"),
        };
        (route, rsp)
    }

    fn token(&self, ip: IpAddr, headers: &HeaderMap) -> Response<Full<Bytes>> {
        // The real service refuses token requests that went through a proxy.
        if headers.contains_key("x-forwarded-for") {
            return text(StatusCode::FORBIDDEN, "forbidden");
        }
        let ttl = token::requested_ttl(headers.get(TTL_HEADER).map(HeaderValue::as_bytes));
        let Some(ttl) = ttl else {
            return text(
                StatusCode::BAD_REQUEST,
                "bad request: X-aws-ec2-metadata-token-ttl-seconds must be 1 to 21600",
            );
        };
        let token = self.inner.key.mint(ip, ttl, self.inner.clock.now());
        let mut rsp = text(StatusCode::OK, &token);
        rsp.headers_mut()
            .insert(TTL_HEADER, HeaderValue::from(ttl.as_secs()));
        rsp
    }

    async fn role_list(&self, ip: IpAddr) -> Response<Full<Bytes>> {
        match self.table_answer(ip).await {
            Warm::Allowed { role, .. } => return text(StatusCode::OK, role.name()),
            Warm::Refuse(rsp) => return rsp,
            Warm::Ask(_) => {}
        }
        let request = RoleRequest { ip };
        match self
            .inner
            .servers
            .call::<_, RoleResponse>(ROLE_PATH, &request)
            .await
        {
            Ok(rsp) => text(StatusCode::OK, rsp.role_arn.name()),
            Err(error) => refused(ip, &error),
        }
    }

    async fn credentials(&self, ip: IpAddr, role: &str, extended: bool) -> Response<Full<Bytes>> {
        let held = match self.table_answer(ip).await {
            Warm::Allowed { role: arn, served } => {
                if !arn.answers_to(role) {
                    return text(StatusCode::NOT_FOUND, "not found");
                }
                if let Some(served) = served {
                    self.inner.metrics.from_table.inc();
                    let doc = if extended {
                        &served.extended
                    } else {
                        &served.document
                    };
                    return document(doc.clone());
                }
                None
            }
            Warm::Refuse(rsp) => return rsp,
            Warm::Ask(held) => held,
        };
        let request = CredentialsRequest {
            ip,
            role: Some(role.to_string()),
        };
        let rsp = match self
            .inner
            .servers
            .call::<_, CredentialsResponse>(CREDENTIALS_PATH, &request)
            .await
        {
            Ok(rsp) => rsp,
            Err(ServerError::Unavailable(reason)) => {
                let error = match held {
                    // No server: a pod the table denied is told so, as a server would.
                    Some(body) => ServerError::Refused(body),
                    None => ServerError::Unavailable(reason),
                };
                return refused(ip, &error);
            }
            Err(error) => return refused(ip, &error),
        };
        self.inner.metrics.from_server.inc();
        let served = Served::build(&rsp.role_arn, &rsp.credentials, self.inner.clock.now());
        document(if extended {
            served.extended
        } else {
            served.document
        })
    }

    /// What the node table says of `ip`: warm credentials, a refusal, or ask a server.
    async fn table_answer(&self, ip: IpAddr) -> Warm {
        let Some(table) = &self.inner.table else {
            return Warm::Ask(None);
        };
        match table.lookup(ip, self.inner.table_wait).await {
            Lookup::Found(entry) => match &entry.decision {
                Decided::Allowed { role, credentials } => Warm::Allowed {
                    role: role.clone(),
                    served: credentials
                        .as_ref()
                        .filter(|s| s.fresh(self.inner.clock.now(), MIN_REMAINING))
                        .cloned(),
                },
                Decided::Denied(body) => Warm::Ask(Some(body.clone())),
            },
            Lookup::Moved { pod } => {
                // A new pod on a reused IP, before the feed says the old one is gone: never
                // the old pod's credentials, and not the server's either (its index may
                // lag the same way).
                tracing::info!(%ip, %pod, "request from an IP that now lives behind another interface than its pod's; refused");
                Warm::Refuse(text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "credentials temporarily unavailable",
                ))
            }
            Lookup::Unknown | Lookup::Ambiguous => Warm::Ask(None),
        }
    }

    async fn proxy(&self, path: &Normal) -> Response<Full<Bytes>> {
        if let Err(refusal) = self.inner.proxy.check(path) {
            return text(StatusCode::NOT_FOUND, &format!("not found: {refusal}"));
        }
        match self.inner.proxy.fetch(path).await {
            Ok(upstream) => {
                let mut rsp = Response::new(Full::new(upstream.body));
                *rsp.status_mut() = upstream.status;
                let content_type = upstream
                    .content_type
                    .unwrap_or(HeaderValue::from_static("text/plain"));
                rsp.headers_mut().insert(header::CONTENT_TYPE, content_type);
                rsp
            }
            Err(error) => {
                tracing::warn!(%error, path = %path.to_path(), "metadata proxy failed");
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "metadata service unavailable",
                )
            }
        }
    }
}

/// Credentials with less left than this are never handed to a pod (SDKs refresh 5 to 15
/// minutes before expiry; less would make them refresh at once).
pub const MIN_REMAINING: Duration = Duration::from_secs(15 * 60);

/// The table's answer for a request.
enum Warm {
    /// The pod's role, and its credentials when the table holds fresh ones.
    Allowed {
        role: RoleArn,
        served: Option<Served>,
    },
    /// Refused on the node.
    Refuse(Response<Full<Bytes>>),
    /// Ask a server; with the table's denial to answer if none does.
    Ask(Option<ErrorBody>),
}

/// What a pod is told when policy denies it credentials.
const FORBIDDEN_BODY: &str = "forbidden: this pod may not have AWS credentials from podiam; \
     its Warning Events (kubectl describe pod) say why, and `podiam-server explain` shows the decision";
/// What a pod is told when its address does not identify it alone.
const CONFLICT_BODY: &str = "conflict: this pod's IP address does not identify one pod yet; \
     retry shortly, and ask the cluster operator if it persists";

/// The one place server refusals become metadata-service answers.
fn refused(ip: IpAddr, error: &ServerError) -> Response<Full<Bytes>> {
    let ServerError::Refused(body) = error else {
        tracing::warn!(%ip, %error, "no podiam server answered");
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "credentials temporarily unavailable",
        );
    };
    match body.code {
        ErrorCode::PodNotFound | ErrorCode::RoleMismatch => {
            text(StatusCode::NOT_FOUND, "not found")
        }
        // The message names policy text, pods and nodes: for the log, never for the pod.
        ErrorCode::Forbidden | ErrorCode::NodeMismatch => {
            tracing::debug!(%ip, code = body.code.as_str(), message = %body.message, "refused");
            text(StatusCode::FORBIDDEN, FORBIDDEN_BODY)
        }
        ErrorCode::AmbiguousIp => {
            tracing::debug!(%ip, code = body.code.as_str(), message = %body.message, "refused");
            text(StatusCode::CONFLICT, CONFLICT_BODY)
        }
        // SDKs retry 5xx: STS trouble is worth retrying.
        ErrorCode::StsError => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "credentials temporarily unavailable",
        ),
        ErrorCode::Unauthenticated
        | ErrorCode::InvalidRequest
        | ErrorCode::InvalidToken
        | ErrorCode::NotReady
        | ErrorCode::Throttled
        | ErrorCode::Internal => {
            tracing::warn!(%ip, code = body.code.as_str(), message = %body.message, "podiam server refused the agent");
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                "credentials temporarily unavailable",
            )
        }
    }
}

fn document(body: Bytes) -> Response<Full<Bytes>> {
    let mut rsp = Response::new(Full::new(body));
    rsp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    rsp
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut rsp = Response::new(Full::new(Bytes::from(body.to_string())));
    *rsp.status_mut() = status;
    rsp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    rsp
}

fn redirect(location: &str) -> Response<Full<Bytes>> {
    let mut rsp = text(StatusCode::MOVED_PERMANENTLY, "moved permanently");
    if let Ok(value) = HeaderValue::from_str(location) {
        rsp.headers_mut().insert(header::LOCATION, value);
    }
    rsp
}

// === impl Route ===

impl Route {
    fn of(path: &Normal) -> Self {
        let s: Vec<&str> = path.segments.iter().map(String::as_str).collect();
        match s.as_slice() {
            ["api", "token"] => Route::Token,
            ["meta-data", "iam", CREDENTIALS] => Route::RoleList { extended: false },
            ["meta-data", "iam", CREDENTIALS_EXTENDED] => Route::RoleList { extended: true },
            ["meta-data", "iam", CREDENTIALS, _] => Route::Credentials { extended: false },
            ["meta-data", "iam", CREDENTIALS_EXTENDED, _] => Route::Credentials { extended: true },
            _ => Route::Proxy,
        }
    }

    /// Every route, in [`Route::index`] order.
    const ALL: [Route; 7] = [
        Route::Token,
        Route::RoleList { extended: false },
        Route::RoleList { extended: true },
        Route::Credentials { extended: false },
        Route::Credentials { extended: true },
        Route::Proxy,
        Route::Refused,
    ];

    fn index(self) -> usize {
        match self {
            Route::Token => 0,
            Route::RoleList { extended: false } => 1,
            Route::RoleList { extended: true } => 2,
            Route::Credentials { extended: false } => 3,
            Route::Credentials { extended: true } => 4,
            Route::Proxy => 5,
            Route::Refused => 6,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Route::Token => "token",
            Route::RoleList { extended: false } => "role",
            Route::RoleList { extended: true } => "role_extended",
            Route::Credentials { extended: false } => "credentials",
            Route::Credentials { extended: true } => "credentials_extended",
            Route::Proxy => "proxy",
            Route::Refused => "refused",
        }
    }
}

// === impl ImdsMetrics ===

impl ImdsMetrics {
    /// Registers the metrics in `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let requests = IntCounterVec::new(
            Opts::new(
                "podiam_imds_requests_total",
                "Metadata requests by route and HTTP status",
            ),
            &["route", "status"],
        )?;
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "podiam_imds_request_duration_seconds",
                "Metadata request latency by route",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 3.0,
            ]),
            &["route"],
        )?;
        let refused = IntCounterVec::new(
            Opts::new(
                "podiam_agent_refused_connections_total",
                "Connections to the metadata endpoint refused because they did not come from a pod, by reason: not_a_pod_source (outside --pod-sources), not_redirected (reached the listener without the redirect), metadata_not_redirected (a pod's metadata traffic that escaped the redirect; packets)",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        let answered = IntCounterVec::new(
            Opts::new(
                "podiam_agent_credentials_answered_total",
                "Credential documents handed to pods, by source (table: from the node feed, \
                 no network call; server: a per-request call)",
            ),
            &["source"],
        )?;
        registry.register(Box::new(refused.clone()))?;
        registry.register(Box::new(answered.clone()))?;
        let ok = Route::ALL
            .iter()
            .map(|r| requests.with_label_values(&[r.as_str(), "200"]))
            .collect();
        let latency_of = Route::ALL
            .iter()
            .map(|r| latency.with_label_values(&[r.as_str()]))
            .collect();
        Ok(Self {
            requests,
            refused,
            from_table: answered.with_label_values(&["table"]),
            from_server: answered.with_label_values(&["server"]),
            ok,
            latency_of,
        })
    }

    fn count(&self, route: Route, status: StatusCode, took: Duration) {
        let i = route.index();
        match self.ok.get(i) {
            Some(ok) if status == StatusCode::OK => ok.inc(),
            _ => self
                .requests
                .with_label_values(&[route.as_str(), status.as_str()])
                .inc(),
        }
        if let Some(h) = self.latency_of.get(i) {
            h.observe(took.as_secs_f64());
        }
    }

    /// The refusal counter, shared with the interception's kernel counters.
    pub fn refused(&self) -> IntCounterVec {
        self.refused.clone()
    }
}
