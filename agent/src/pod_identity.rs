//! The container-credentials endpoint (EKS Pod Identity's contract, on any cluster).
//!
//! Pods reach it at `169.254.170.23:80` or `[fd00:ec2::23]:80` (redirected to this
//! listener by [`crate::intercept`], like the metadata address); their SDKs send
//! `GET /v1/credentials` with the pod's projected ServiceAccount token as `Authorization`.
//! The token is the identity, and it is bound to its pod: the agent forwards the caller's
//! address, and the server answers only when it is one of the token's pod's addresses (a
//! host-network pod's are the node's). A pod that has read another pod's token gets
//! nothing with it, which EKS's agent cannot say. The agent checks what it
//! can alone, in the order EKS's agent does (the `Host` must be one of the endpoint's
//! addresses, the token present, shaped like a JWT, and not expired), then forwards the
//! token to a podiam server, which has the API server review it and finds the pod it is
//! bound to, that pod's node (the asking agent's) and its ServiceAccount's role.
//!
//! Through a server outage, a pod keeps getting the credentials last handed to it for the
//! same token while they have 15 minutes left and the node feed still lists the pod (by
//! UID) on this node with the caller's address: the server's last answer vouches for the
//! token, the feed for the pod and its address. Without a synced feed there is no such fallback, and a server's refusal forgets
//! what was held.
//!
//! Each source address may ask `--pod-identity-rate` times a second (bursts of five times
//! that): every request the agent passes on costs the API server a TokenReview unless the
//! server remembers the token, and a pod sending ever new forged tokens must not be able to
//! flood it. Beyond that, `429 TooManyRequests`.
//!
//! Answers: `200` with the JSON document every SDK's container provider reads; errors are
//! JSON `{"code","message"}` (Go SDK v2 cannot parse a text body): `400 InvalidToken`,
//! `403 AccessDenied` (wrong host, or a role refused: the pod is told no more, the reasons
//! go to its Events, the server's log and `explain`), `404 NotFound` for other paths, and
//! `503 ServiceUnavailable` (SDKs retry) when no server or STS can answer.

use std::{
    net::IpAddr,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::Engine;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use podiam_common::{
    clock::Clock,
    net::canonical,
    pod_identity::{self, CredentialsDocument},
    protocol::{CredentialsResponse, ErrorCode, POD_IDENTITY_PATH, PodIdentityRequest},
    secret::Secret,
};
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    servers::{ServerError, Servers},
    table::NodeTable,
};

/// Held credentials are handed out through an outage only with this much life left (SDKs
/// refresh below it).
const HELD_MIN: Duration = Duration::from_secs(15 * 60);
/// Most token → credentials pairs held (one per pod and token, a few per pod a day).
const HELD_MAX: u64 = 20_000;

/// The endpoint; cheap to clone.
#[derive(Clone, Debug)]
pub struct PodIdentity {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    servers: Servers,
    /// `--pod-sources`: connections from elsewhere are closed unanswered (empty: all).
    pod_sources: Vec<ipnet::IpNet>,
    clock: Arc<dyn Clock>,
    metrics: PodIdentityMetrics,
    /// The node feed's table (`None`: no outage fallback).
    table: Option<NodeTable>,
    /// The last credentials handed out per token (by SHA-256 of the token).
    held: moka::sync::Cache<[u8; 32], Arc<Held>>,
    /// Requests per source address, or per pod from the node's addresses (`None`: no
    /// limit).
    limiter: Option<PerSource>,
}

/// A rate limit per source address: `rate` a second, in bursts of five times that. The
/// node's own addresses are shared by every host-network pod and node process: there the
/// limit is per pod the token names (unverified, so a forger only spreads its requests over
/// buckets of its own), under an aggregate of eight times the rate for the address.
#[derive(Debug)]
struct PerSource {
    by_source: governor::DefaultKeyedRateLimiter<IpAddr>,
    /// The node's addresses, all their pods together.
    by_node: governor::DefaultKeyedRateLimiter<IpAddr>,
    by_pod: governor::DefaultKeyedRateLimiter<(IpAddr, String)>,
    node_ips: Vec<IpAddr>,
}

/// Credentials handed to a pod, for a server outage.
#[derive(Debug)]
struct Held {
    /// The pod's UID, as the server said.
    uid: String,
    document: CredentialsDocument,
}

/// Requests by result, and latency.
#[derive(Clone, Debug)]
pub struct PodIdentityMetrics {
    requests: IntCounterVec,
    latency: HistogramVec,
}

/// Why a request is answered without credentials.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Not `/v1/credentials` (404).
    NotFound,
    /// Not `GET` (405).
    MethodNotAllowed,
    /// The `Host` (its first 64 characters) is not one of the endpoint's addresses (403).
    WrongHost(String),
    /// No token, or one that cannot be a live JWT, or one a server refused (400).
    InvalidToken(&'static str),
    /// A server refused the role (403).
    AccessDenied,
    /// No server or STS could answer (503).
    Unavailable,
    /// Over `--pod-identity-rate` for this source address (429).
    TooManyRequests,
}

#[derive(Serialize)]
struct ErrorDocument<'a> {
    code: &'a str,
    message: &'a str,
}

// === impl PodIdentity ===

impl PodIdentity {
    /// The endpoint, asking `servers`.
    pub fn new(
        servers: Servers,
        table: Option<NodeTable>,
        pod_sources: Vec<ipnet::IpNet>,
        rate: Option<std::num::NonZeroU32>,
        node_ips: Vec<IpAddr>,
        clock: Arc<dyn Clock>,
        metrics: PodIdentityMetrics,
    ) -> Self {
        let limiter = rate.map(|rate| PerSource::new(rate, node_ips));
        Self {
            inner: Arc::new(Inner {
                servers,
                pod_sources,
                clock,
                metrics,
                table,
                held: moka::sync::Cache::builder()
                    .max_capacity(HELD_MAX)
                    .time_to_live(Duration::from_secs(12 * 3600))
                    .build(),
                limiter,
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
        let admit = |peer: std::net::SocketAddr| {
            let ok = self.is_pod_source(peer.ip());
            if !ok {
                self.inner.metrics.count("not_a_pod_source", Duration::ZERO);
                tracing::debug!(%peer, "connection from outside --pod-sources closed");
            }
            ok
        };
        let this = self.clone();
        let handle = move |peer: std::net::SocketAddr, req| {
            let this = this.clone();
            async move { this.handle(peer.ip(), req).await }
        };
        crate::pods::serve(
            listener,
            shutdown,
            "container-credentials endpoint",
            limits,
            admit,
            handle,
        )
        .await;
    }

    /// Whether `source` may ask now (see `--pod-identity-rate`).
    fn allowed(&self, source: IpAddr, headers: &HeaderMap) -> bool {
        self.inner
            .limiter
            .as_ref()
            .is_none_or(|l| l.allow(source, headers))
    }

    fn is_pod_source(&self, ip: IpAddr) -> bool {
        crate::pods::is_pod_source(&self.inner.pod_sources, ip)
    }

    /// Answers one request from `source` (bodies are never read).
    pub async fn handle<B>(&self, source: IpAddr, req: Request<B>) -> Response<Full<Bytes>> {
        let started = tokio::time::Instant::now();
        let answer = match self.allowed(source, req.headers()) {
            true => {
                self.answer(source, req.method(), req.uri(), req.headers())
                    .await
            }
            false => Err(Refusal::TooManyRequests),
        };
        let (result, rsp) = match answer {
            Ok((document, from)) => (from, json(StatusCode::OK, &document)),
            Err(refusal) => (refusal.label(), refusal.response()),
        };
        self.inner.metrics.count(result, started.elapsed());
        tracing::debug!(
            result,
            status = rsp.status().as_u16(),
            "container credentials"
        );
        rsp
    }

    async fn answer(
        &self,
        source: IpAddr,
        method: &Method,
        uri: &http::Uri,
        headers: &HeaderMap,
    ) -> Result<(CredentialsDocument, &'static str), Refusal> {
        let token = vet(method, uri, headers, self.inner.clock.now())?;
        let source = canonical(source);
        let request = PodIdentityRequest {
            token: Secret::new(token),
            ip: Some(source),
        };
        // Keyed by the token and the address it came from: a refusal of a copy sent from
        // elsewhere (a pod that read another's token) forgets nothing of the owner's.
        let key = held_key(token, source);
        let rsp: CredentialsResponse =
            match self.inner.servers.call(POD_IDENTITY_PATH, &request).await {
                Ok(rsp) => rsp,
                Err(error) => {
                    let refusal = refused(&error);
                    // No server could answer now (unavailable, or its share of token
                    // reviews in flight): what was held may be handed out again. Any other
                    // answer is a server's no, and what was held is forgotten.
                    let retry = matches!(refusal, Refusal::Unavailable | Refusal::TooManyRequests);
                    if !retry {
                        self.inner.held.invalidate(&key);
                    } else if let Some(document) = self.held(&key, source) {
                        tracing::debug!(
                            "no server answered: credentials held for this token handed out again"
                        );
                        return Ok((document, "held"));
                    }
                    return Err(refusal);
                }
            };
        let document = CredentialsDocument {
            access_key_id: rsp.credentials.access_key_id,
            secret_access_key: rsp.credentials.secret_access_key,
            token: rsp.credentials.session_token,
            account_id: rsp.role_arn.account().to_string(),
            expiration: rsp.credentials.expiration,
        };
        if let Some(uid) = rsp.pod_uid {
            let held = Held {
                uid,
                document: document.clone(),
            };
            self.inner.held.insert(key, Arc::new(held));
        }
        Ok((document, "ok"))
    }

    /// Credentials held for the token hashed as `key`, if they have [`HELD_MIN`] left and
    /// the synced node table still lists their pod on this node with `source` among its
    /// addresses (the server's rule: a token is worth something only from its own pod).
    fn held(&self, key: &[u8; 32], source: IpAddr) -> Option<CredentialsDocument> {
        let held = self.inner.held.get(key)?;
        let table = self.inner.table.as_ref()?;
        if table.pod_has_ip(&held.uid, source) != Some(true) {
            return None;
        }
        let left = held
            .document
            .expiration
            .duration_since(self.inner.clock.now())
            .unwrap_or_default();
        (left >= HELD_MIN).then(|| held.document.clone())
    }
}

/// The `held` key of `token` sent from `source`: SHA-256 of both, so the cache holds no
/// token.
fn held_key(token: &str, source: IpAddr) -> [u8; 32] {
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    digest.update(token.as_bytes());
    digest.update(b"\0");
    digest.update(source.to_string().as_bytes());
    let mut key = [0u8; 32];
    key.copy_from_slice(digest.finish().as_ref());
    key
}

/// What the agent checks of a request alone, before a server is asked, in EKS's agent's
/// order: the path, the method, the `Host`, then the token's presence, shape and times.
/// The token (trimmed) when all pass. Public for the fuzz target.
pub fn vet<'r>(
    method: &Method,
    uri: &http::Uri,
    headers: &'r HeaderMap,
    now: SystemTime,
) -> Result<&'r str, Refusal> {
    if uri.path() != pod_identity::PATH {
        return Err(Refusal::NotFound);
    }
    if method != Method::GET {
        return Err(Refusal::MethodNotAllowed);
    }
    check_host(uri, headers)?;
    let token = headers
        .get(header::AUTHORIZATION)
        .map(|v| v.to_str().map(str::trim))
        .transpose()
        .map_err(|_| Refusal::InvalidToken("the token is not text"))?
        .filter(|t| !t.is_empty())
        .ok_or(Refusal::InvalidToken(
            "service account token cannot be empty",
        ))?;
    check_token(token, now)?;
    Ok(token)
}

/// The `Host` must name the endpoint (EKS's agent checks the same): a request that reached
/// the listener some other way is no SDK's.
fn check_host(uri: &http::Uri, headers: &HeaderMap) -> Result<(), Refusal> {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| uri.authority().map(http::uri::Authority::as_str))
        .unwrap_or_default();
    let bare = match host.rsplit_once(':') {
        // `[v6]:port`, `v4:port`; a bare IPv6 address has several colons and no brackets.
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(':') => h,
        _ => host,
    };
    let bare = bare.trim_start_matches('[').trim_end_matches(']');
    match bare.parse::<IpAddr>() {
        Ok(ip) if pod_identity::is_endpoint(ip) => Ok(()),
        _ => Err(Refusal::WrongHost(host.chars().take(64).collect())),
    }
}

/// What the agent can check of a token alone: three base64url segments, a JSON payload,
/// and not expired (nor not yet valid). The signature is the API server's to check.
fn check_token(token: &str, now: SystemTime) -> Result<(), Refusal> {
    let malformed = Refusal::InvalidToken("service account token cannot be parsed");
    let segments: Vec<&str> = token.split('.').collect();
    let valid = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'=')
    };
    if segments.len() != 3 || !segments.iter().all(|s| valid(s)) {
        return Err(malformed);
    }
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(segments[1].trim_end_matches('='))
        .map_err(|_| malformed.clone())?;
    let claims: serde_json::Value =
        serde_json::from_slice(&payload).map_err(|_| malformed.clone())?;
    let secs = now
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    match claims.get("exp").map(serde_json::Value::as_f64) {
        Some(Some(exp)) if exp <= secs => {
            return Err(Refusal::InvalidToken("service account token is expired"));
        }
        Some(Some(_)) => {}
        _ => return Err(Refusal::InvalidToken("service account token has no expiry")),
    }
    if let Some(Some(nbf)) = claims.get("nbf").map(serde_json::Value::as_f64)
        && nbf > secs
    {
        return Err(Refusal::InvalidToken(
            "service account token is not valid yet",
        ));
    }
    Ok(())
}

/// A server's refusal as the pod may see it; the details stay in the logs.
fn refused(error: &ServerError) -> Refusal {
    let ServerError::Refused(body) = error else {
        tracing::warn!(%error, "no podiam server answered a container-credentials request");
        return Refusal::Unavailable;
    };
    match body.code {
        ErrorCode::InvalidToken => {
            tracing::debug!(message = %body.message, "pod token refused");
            Refusal::InvalidToken("service account token is not valid")
        }
        ErrorCode::PodNotFound => {
            tracing::debug!(message = %body.message, "pod token refused");
            Refusal::InvalidToken("the pod this token was issued to is not running")
        }
        ErrorCode::Forbidden | ErrorCode::NodeMismatch | ErrorCode::RoleMismatch => {
            tracing::debug!(code = body.code.as_str(), message = %body.message, "refused");
            Refusal::AccessDenied
        }
        ErrorCode::StsError => Refusal::Unavailable,
        ErrorCode::Throttled => {
            tracing::debug!(message = %body.message, "throttled by the server");
            Refusal::TooManyRequests
        }
        ErrorCode::AmbiguousIp
        | ErrorCode::Unauthenticated
        | ErrorCode::InvalidRequest
        | ErrorCode::NotReady
        | ErrorCode::Internal => {
            tracing::warn!(code = body.code.as_str(), message = %body.message, "podiam server refused the agent");
            Refusal::Unavailable
        }
    }
}

fn json<T: Serialize>(status: StatusCode, body: &T) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut rsp = Response::new(Full::new(Bytes::from(bytes)));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    rsp
}

// === impl PerSource ===

impl PerSource {
    fn new(rate: std::num::NonZeroU32, node_ips: Vec<IpAddr>) -> Self {
        let quota = |rate: std::num::NonZeroU32| {
            let burst = rate.saturating_mul(std::num::NonZeroU32::MIN.saturating_add(4));
            governor::Quota::per_second(rate).allow_burst(burst)
        };
        let node_rate = rate.saturating_mul(std::num::NonZeroU32::MIN.saturating_add(7));
        Self {
            by_source: governor::RateLimiter::keyed(quota(rate)),
            by_node: governor::RateLimiter::keyed(quota(node_rate)),
            by_pod: governor::RateLimiter::keyed(quota(rate)),
            node_ips: node_ips.into_iter().map(canonical).collect(),
        }
    }

    fn allow(&self, source: IpAddr, headers: &HeaderMap) -> bool {
        let source = canonical(source);
        // Forget keys that have not asked lately, now and then.
        if self.by_source.len() > 4096 {
            self.by_source.retain_recent();
        }
        if !self.node_ips.contains(&source) {
            return self.by_source.check_key(&source).is_ok();
        }
        let Some(pod) = claimed_pod(headers) else {
            return self.by_source.check_key(&source).is_ok();
        };
        if self.by_pod.len() > 4096 {
            self.by_pod.retain_recent();
        }
        // The pod's own bucket first: its refusals cost the node's other pods nothing.
        self.by_pod.check_key(&(source, pod)).is_ok() && self.by_node.check_key(&source).is_ok()
    }
}

/// The pod UID a token's payload names (`kubernetes.io.pod.uid`), unverified: only to
/// give each host-network pod its own rate bucket.
fn claimed_pod(headers: &HeaderMap) -> Option<String> {
    let token = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let uid = claims
        .get("kubernetes.io")?
        .get("pod")?
        .get("uid")?
        .as_str()?;
    // A UID is 36 characters; a longer claim is no pod's.
    (uid.len() <= 64).then(|| uid.to_string())
}

// === impl Refusal ===

impl Refusal {
    fn label(&self) -> &'static str {
        match self {
            Refusal::NotFound => "not_found",
            Refusal::MethodNotAllowed => "method_not_allowed",
            Refusal::WrongHost(_) => "wrong_host",
            Refusal::InvalidToken(_) => "invalid_token",
            Refusal::AccessDenied => "access_denied",
            Refusal::Unavailable => "unavailable",
            Refusal::TooManyRequests => "too_many_requests",
        }
    }

    /// The one place a refusal becomes an HTTP answer.
    fn response(&self) -> Response<Full<Bytes>> {
        let wrong_host;
        let (status, code, message) = match self {
            Refusal::NotFound => (StatusCode::NOT_FOUND, "NotFound", "not found"),
            Refusal::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "method not allowed",
            ),
            Refusal::WrongHost(host) => {
                wrong_host = format!(
                    "called through {host:?}: use http://{}{} or http://[{}]{}",
                    pod_identity::ADDRESS_V4,
                    pod_identity::PATH,
                    pod_identity::ADDRESS_V6,
                    pod_identity::PATH
                );
                (StatusCode::FORBIDDEN, "AccessDenied", wrong_host.as_str())
            }
            Refusal::InvalidToken(why) => (StatusCode::BAD_REQUEST, "InvalidToken", *why),
            Refusal::AccessDenied => (
                StatusCode::FORBIDDEN,
                "AccessDenied",
                "no credentials for this pod's service account: see the pod's events",
            ),
            Refusal::Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                "credentials temporarily unavailable",
            ),
            Refusal::TooManyRequests => (
                StatusCode::TOO_MANY_REQUESTS,
                "TooManyRequests",
                "too many requests from this address: retry later",
            ),
        };
        json(status, &ErrorDocument { code, message })
    }
}

// === impl PodIdentityMetrics ===

impl PodIdentityMetrics {
    /// Registers the metrics in `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let requests = IntCounterVec::new(
            Opts::new(
                "podiam_pod_identity_requests_total",
                "Container-credentials requests by result (ok, held: handed out again through a server outage, invalid_token, access_denied, wrong_host, unavailable, too_many_requests, not_found, method_not_allowed, not_a_pod_source)",
            ),
            &["result"],
        )?;
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "podiam_pod_identity_request_duration_seconds",
                "Container-credentials request latency by result",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 3.0,
            ]),
            &["result"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        Ok(Self { requests, latency })
    }

    fn count(&self, result: &str, took: Duration) {
        self.requests.with_label_values(&[result]).inc();
        self.latency
            .with_label_values(&[result])
            .observe(took.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(claims: &str) -> String {
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(claims);
        format!("eyJhbGciOiJSUzI1NiJ9.{payload}.c2ln")
    }

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn host_network_pods_each_get_their_own_rate_bucket_under_the_nodes() {
        let node: IpAddr = "10.8.0.10".parse().unwrap();
        let pod: IpAddr = "10.9.1.1".parse().unwrap();
        let limiter = PerSource::new(std::num::NonZeroU32::new(1).unwrap(), vec![node]);
        let headers = |uid: &str| {
            let mut h = HeaderMap::new();
            let token = jwt(&format!(
                r#"{{"kubernetes.io":{{"pod":{{"uid":"{uid}"}}}}}}"#
            ));
            h.insert(header::AUTHORIZATION, token.parse().unwrap());
            h
        };
        // A pod address: one bucket (a burst of 5), whatever its tokens say.
        let from_pod = (0..10)
            .filter(|i| limiter.allow(pod, &headers(&format!("u{i}"))))
            .count();
        assert_eq!(from_pod, 5);
        // The node's address: a bucket per pod the token names...
        let a = (0..10)
            .filter(|_| limiter.allow(node, &headers("a")))
            .count();
        assert_eq!(a, 5);
        assert!(limiter.allow(node, &headers("b")), "b has its own bucket");
        // ...under the node's aggregate (eight times the rate, bursts of 40): a forger of
        // ever new UIDs gets no more than that.
        let forged = (0..100)
            .filter(|i| limiter.allow(node, &headers(&format!("f{i}"))))
            .count();
        assert_eq!(forged, 40 - 5 - 1);
        // No UID claimed: the address's own bucket.
        assert!(limiter.allow(node, &HeaderMap::new()));
    }

    #[test]
    fn tokens_are_checked_for_shape_and_time() {
        let now = at(2_000_000_000);
        assert_eq!(check_token(&jwt(r#"{"exp":2000000100}"#), now), Ok(()));
        for (token, why) in [
            (
                jwt(r#"{"exp":1999999999}"#),
                "service account token is expired",
            ),
            (
                jwt(r#"{"exp":2000000000}"#),
                "service account token is expired",
            ),
            (jwt(r#"{"sub":"x"}"#), "service account token has no expiry"),
            (
                jwt(r#"{"exp":2000000100,"nbf":2000000050}"#),
                "service account token is not valid yet",
            ),
            ("a.b".into(), "service account token cannot be parsed"),
            (
                format!("Bearer {}", jwt(r#"{"exp":2000000100}"#)),
                "service account token cannot be parsed",
            ),
            ("a.!!!.c".into(), "service account token cannot be parsed"),
            (jwt("not json"), "service account token cannot be parsed"),
        ] {
            assert_eq!(
                check_token(&token, now),
                Err(Refusal::InvalidToken(why)),
                "{token}"
            );
        }
    }

    #[test]
    fn the_host_must_be_the_endpoint() {
        let uri: http::Uri = "/v1/credentials".parse().unwrap();
        let host = |h: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::HOST, HeaderValue::from_str(h).unwrap());
            check_host(&uri, &headers)
        };
        for good in [
            "169.254.170.23",
            "169.254.170.23:80",
            "[fd00:ec2::23]",
            "[fd00:ec2::23]:80",
        ] {
            assert_eq!(host(good), Ok(()), "{good}");
        }
        for bad in [
            "169.254.169.254",
            "localhost",
            "10.0.0.1:8182",
            "[fd00:ec2::254]:80",
            "",
        ] {
            assert!(matches!(host(bad), Err(Refusal::WrongHost(_))), "{bad}");
        }
        assert!(matches!(
            check_host(&uri, &HeaderMap::new()),
            Err(Refusal::WrongHost(_))
        ));
    }

    #[test]
    fn each_source_address_has_its_own_bounded_rate() {
        let limit = PerSource::new(std::num::NonZeroU32::MIN, Vec::new());
        let none = HeaderMap::new();
        let a: IpAddr = "100.64.1.2".parse().unwrap();
        let b: IpAddr = "100.64.1.3".parse().unwrap();
        let allowed = (0..20).filter(|_| limit.allow(a, &none)).count();
        assert_eq!(allowed, 5, "a burst of five times the rate, then no more");
        assert!(limit.allow(b, &none), "another address is not held back");
        let mapped: IpAddr = "::ffff:100.64.1.2".parse().unwrap();
        assert!(
            !limit.allow(mapped, &none),
            "an IPv4-mapped address is the same address"
        );
    }

    #[test]
    fn refusals_tell_the_pod_little() {
        let body = |code, message: &str| {
            ServerError::Refused(podiam_common::protocol::ErrorBody {
                code,
                message: message.into(),
            })
        };
        let forbidden = refused(&body(
            ErrorCode::Forbidden,
            "role arn:aws:iam::1:role/admin is not permitted in namespace \"team\"",
        ));
        assert_eq!(forbidden, Refusal::AccessDenied);
        let rsp = forbidden.response();
        assert_eq!(rsp.status(), StatusCode::FORBIDDEN);
        assert_eq!(
            refused(&body(ErrorCode::StsError, "x")).response().status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            refused(&body(ErrorCode::PodNotFound, "x"))
                .response()
                .status(),
            StatusCode::BAD_REQUEST
        );
    }
}
