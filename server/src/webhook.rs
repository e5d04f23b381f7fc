//! The mutating admission webhook of the container-credentials path.
//!
//! For a pod whose ServiceAccount has a role ([`crate::accounts`]: an association or the
//! IRSA annotation), it adds what EKS's Pod Identity webhook adds, so that the SDKs find
//! the endpoint: a projected ServiceAccount token volume for the path's audience, mounted
//! read-only in every container and init container (but those named in
//! `eks.amazonaws.com/skip-containers`), and `AWS_CONTAINER_CREDENTIALS_FULL_URI` and
//! `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE` in each container that sets neither. Anything
//! already there is left alone, so applying it twice changes nothing. The patch is the
//! difference between the pod and its mutated copy (`json_patch::diff`).
//!
//! It is served by the server because the server already watches ServiceAccounts and
//! associations: no extra API calls per admission, and one Deployment fewer to run. It
//! answers 503 while those watches are not synced, and the webhook configuration's
//! `failurePolicy: Ignore` then admits the pod unchanged: a podiam outage never stops pods
//! from starting (and `kube-system` and podiam's own namespace are not sent to it at all).

use std::{collections::BTreeMap, convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::{body::Body, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use k8s_openapi::api::core::v1::{
    Container, EnvVar, Pod, ProjectedVolumeSource, ServiceAccountTokenProjection, Volume,
    VolumeMount, VolumeProjection,
};
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use podiam_common::{
    listen::{self, Activity, ConnectionLimits, IdleLimits, Limiter, ListenerMetrics},
    pod_identity,
    readiness::Readiness,
    tls::Reloading,
};
use prometheus::{IntCounterVec, Opts, Registry};
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    accounts::{AccountKey, AccountRole},
    cluster::ClusterIndex,
};

/// The path the webhook configuration points at.
pub const PATH: &str = "/mutate";
/// Largest AdmissionReview read (a pod is at most 1.5 MiB in etcd).
const MAX_BODY: usize = 2 * 1024 * 1024;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The API server gives a call 3 s (`timeoutSeconds`); a slower body is no API server's.
const BODY_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections at once, in total and per source address (`--max-webhook-connections`,
/// `--max-webhook-connections-per-source`). Unless `--webhook-client-ca` is set, the
/// webhook answers anyone who can reach its port, so it must not let them hold the
/// server's memory (connections × streams × body) nor the API server's slots.
pub const DEFAULT_LIMITS: ConnectionLimits = ConnectionLimits {
    total: 256,
    per_source: 32,
};
/// The first request must follow the handshake within this; a connection with no review
/// in progress for the idle limit is closed (the API server opens another when it needs
/// one).
const IDLE: IdleLimits = IdleLimits {
    first_request: Duration::from_secs(5),
    idle: Duration::from_secs(60),
};
/// The listener's name in metrics.
const LISTENER: &str = "webhook";
/// Streams per HTTP/2 connection.
const MAX_STREAMS: u32 = 8;
/// Reviews read and answered at once; others wait up to [`BODY_TIMEOUT`], then get 503.
const MAX_REVIEWS: usize = 32;
const GRACE: Duration = Duration::from_secs(10);

/// What the webhook injects.
#[derive(Clone, Debug)]
pub struct WebhookSettings {
    /// The projected token's audience (the server's `--pod-identity-audience`).
    pub audience: String,
    /// The endpoint's URI for the SDKs.
    pub full_uri: String,
    /// The projected token's lifetime.
    pub token_expiration: i64,
}

/// The webhook; cheap to clone.
#[derive(Clone, Debug)]
pub struct Webhook {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    index: ClusterIndex,
    /// The server's readiness and the container-credentials path's: both must be open.
    readiness: [Readiness; 2],
    settings: WebhookSettings,
    requests: IntCounterVec,
    /// Bounds the reviews in progress ([`MAX_REVIEWS`]).
    reviews: Arc<tokio::sync::Semaphore>,
}

// === impl Webhook ===

impl Webhook {
    /// The webhook over `index`, answering once every `readiness` is ready.
    pub fn new(
        index: ClusterIndex,
        readiness: [Readiness; 2],
        settings: WebhookSettings,
        registry: &Registry,
    ) -> prometheus::Result<Self> {
        let requests = IntCounterVec::new(
            Opts::new(
                "podiam_webhook_requests_total",
                "Admission reviews by result (mutated, unchanged, not_ready, invalid, busy, too_many_connections)",
            ),
            &["result"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        Ok(Self {
            inner: Arc::new(Inner {
                index,
                readiness,
                settings,
                requests,
                reviews: Arc::new(tokio::sync::Semaphore::new(MAX_REVIEWS)),
            }),
        })
    }

    /// Serves HTTPS (HTTP/1.1 and HTTP/2) on `listener` until `shutdown`. Connections are
    /// bounded by `limits` in total and per source address (closed at accept beyond
    /// them), must send a request soon after their handshake, and are closed when idle:
    /// no party that reaches the port can hold the slots the API server needs.
    pub async fn serve(
        self,
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
                podiam_common::listen::accept(&listener, &shutdown, "webhook").await
            else {
                break;
            };
            let Ok(slot) = limiter.admit(peer.ip()) else {
                self.count("too_many_connections");
                tracing::debug!(%peer, "webhook connection closed at accept: over its cap");
                continue;
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
            let this = self.clone();
            let (shutdown, listeners) = (shutdown.clone(), listeners.clone());
            tracker.spawn(async move {
                let _slot = slot;
                let stream =
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(error)) => {
                            tracing::info!(%peer, %error, "webhook TLS handshake refused");
                            return;
                        }
                        Err(_) => return,
                    };
                let activity = Activity::new();
                let service = service_fn({
                    let activity = activity.clone();
                    move |req| {
                        let this = this.clone();
                        let active = activity.start();
                        let activity = activity.clone();
                        async move {
                            let rsp = this.handle(req).await;
                            Ok::<_, Infallible>(rsp.map(|body| activity.track(body, active)))
                        }
                    }
                });
                let mut builder = auto::Builder::new(TokioExecutor::new());
                builder
                    .http1()
                    .timer(TokioTimer::new())
                    .header_read_timeout(BODY_TIMEOUT);
                builder
                    .http2()
                    .timer(TokioTimer::new())
                    .keep_alive_interval(Some(Duration::from_secs(20)))
                    .keep_alive_timeout(Duration::from_secs(10))
                    .max_concurrent_streams(MAX_STREAMS);
                let conn = builder.serve_connection(TokioIo::new(stream), service);
                let driven = listen::drive(conn, &activity, IDLE, &shutdown, &listeners, LISTENER);
                if let Err(error) = driven.await {
                    tracing::debug!(%peer, %error, "webhook connection ended with an error");
                }
            });
        }
        tracker.close();
        if tokio::time::timeout(GRACE, tracker.wait()).await.is_err() {
            tracing::warn!("webhook: requests still in flight after the grace period");
        }
    }

    /// Answers one request (any body type, so tests can call it without sockets).
    pub async fn handle<B>(&self, req: Request<B>) -> Response<Full<Bytes>>
    where
        B: Body,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        if req.method() != Method::POST || req.uri().path() != PATH {
            return plain(StatusCode::NOT_FOUND, "not found");
        }
        let json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        if !json {
            return plain(StatusCode::UNSUPPORTED_MEDIA_TYPE, "application/json only");
        }
        if !self.inner.readiness.iter().all(Readiness::is_ready) {
            // The webhook's failurePolicy decides (Ignore: the pod starts unchanged).
            self.count("not_ready");
            return plain(StatusCode::SERVICE_UNAVAILABLE, "not ready");
        }
        let Ok(Ok(_permit)) =
            tokio::time::timeout(BODY_TIMEOUT, self.inner.reviews.clone().acquire_owned()).await
        else {
            self.count("busy");
            return plain(StatusCode::SERVICE_UNAVAILABLE, "busy");
        };
        let read = Limited::new(req.into_body(), MAX_BODY).collect();
        let body = match tokio::time::timeout(BODY_TIMEOUT, read).await {
            Ok(Ok(body)) => body.to_bytes(),
            Ok(Err(error)) => {
                self.count("invalid");
                return review(AdmissionResponse::invalid(format!(
                    "reading the body: {error}"
                )));
            }
            Err(_) => {
                self.count("invalid");
                return review(AdmissionResponse::invalid("the body took too long"));
            }
        };
        let request: AdmissionRequest<Pod> =
            match serde_json::from_slice::<AdmissionReview<Pod>>(&body)
                .map_err(|e| e.to_string())
                .and_then(|r| {
                    r.try_into()
                        .map_err(|_| "no request in the review".to_string())
                }) {
                Ok(request) => request,
                Err(error) => {
                    self.count("invalid");
                    tracing::info!(%error, "invalid AdmissionReview");
                    return review(AdmissionResponse::invalid(error));
                }
            };
        review(self.admit(&request))
    }

    /// The answer to one review: allowed, with a patch when the pod needs the path's
    /// settings.
    pub fn admit(&self, request: &AdmissionRequest<Pod>) -> AdmissionResponse {
        let response = AdmissionResponse::from(request);
        let Some(pod) = &request.object else {
            self.count("unchanged");
            return response;
        };
        let namespace = request
            .namespace
            .as_deref()
            .or(pod.metadata.namespace.as_deref())
            .unwrap_or("default");
        let account = AccountKey::new(
            namespace,
            pod.spec
                .as_ref()
                .and_then(|s| s.service_account_name.as_deref())
                .filter(|s| !s.is_empty())
                .unwrap_or("default"),
        );
        if self.inner.index.accounts().role_of(&account) == AccountRole::None {
            self.count("unchanged");
            return response;
        }
        let Some(mutated) = mutate(pod, &self.inner.settings) else {
            self.count("unchanged");
            return response;
        };
        let patch = match (serde_json::to_value(pod), serde_json::to_value(&mutated)) {
            (Ok(before), Ok(after)) => json_patch::diff(&before, &after),
            (Err(error), _) | (_, Err(error)) => {
                tracing::warn!(%error, "pod could not be serialised: admitted unchanged");
                self.count("invalid");
                return response;
            }
        };
        match response.clone().with_patch(patch) {
            Ok(patched) => {
                self.count("mutated");
                tracing::debug!(service_account = %account, pod = pod.metadata.name.as_deref().or(pod.metadata.generate_name.as_deref()).unwrap_or_default(), "pod mutated for the container-credentials path");
                patched
            }
            Err(error) => {
                tracing::warn!(%error, "patch could not be serialised: admitted unchanged");
                self.count("invalid");
                response
            }
        }
    }

    fn count(&self, result: &str) {
        self.inner.requests.with_label_values(&[result]).inc();
    }
}

/// The pod with the path's volume, mounts and environment added, or `None` if it has
/// them all already.
pub fn mutate(pod: &Pod, settings: &WebhookSettings) -> Option<Pod> {
    let mut pod = pod.clone();
    let before = pod.clone();
    let skipped: Vec<String> = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(pod_identity::SKIP_CONTAINERS_ANNOTATION))
        .map(|list| {
            list.split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        })
        .unwrap_or_default();
    let spec = pod.spec.as_mut()?;
    let volumes = spec.volumes.get_or_insert_with(Vec::new);
    if !volumes.iter().any(|v| v.name == pod_identity::TOKEN_VOLUME) {
        volumes.push(Volume {
            name: pod_identity::TOKEN_VOLUME.into(),
            projected: Some(ProjectedVolumeSource {
                default_mode: Some(0o644),
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(settings.audience.clone()),
                        expiration_seconds: Some(settings.token_expiration),
                        path: pod_identity::TOKEN_FILE.into(),
                    }),
                    ..VolumeProjection::default()
                }]),
            }),
            ..Volume::default()
        });
    }
    let containers = spec
        .containers
        .iter_mut()
        .chain(spec.init_containers.iter_mut().flatten());
    for container in containers {
        if !skipped.contains(&container.name) {
            add_to_container(container, settings);
        }
    }
    let labels = pod.metadata.labels.get_or_insert_with(BTreeMap::new);
    labels
        .entry(pod_identity::MUTATED_LABEL.into())
        .or_insert_with(|| "enabled".into());
    (pod != before).then_some(pod)
}

fn add_to_container(container: &mut Container, settings: &WebhookSettings) {
    let mounts = container.volume_mounts.get_or_insert_with(Vec::new);
    if !mounts.iter().any(|m| m.name == pod_identity::TOKEN_VOLUME) {
        mounts.push(VolumeMount {
            name: pod_identity::TOKEN_VOLUME.into(),
            mount_path: pod_identity::TOKEN_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    }
    let env = container.env.get_or_insert_with(Vec::new);
    // A container that sets either chose its own endpoint or token: leave both alone.
    let set = |name: &str| env.iter().any(|e| e.name == name);
    if !set(pod_identity::ENV_FULL_URI) && !set(pod_identity::ENV_TOKEN_FILE) {
        env.push(EnvVar {
            name: pod_identity::ENV_FULL_URI.into(),
            value: Some(settings.full_uri.clone()),
            ..EnvVar::default()
        });
        env.push(EnvVar {
            name: pod_identity::ENV_TOKEN_FILE.into(),
            value: Some(pod_identity::token_path()),
            ..EnvVar::default()
        });
    }
}

fn review(response: AdmissionResponse) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(&response.into_review()).unwrap_or_default();
    let mut rsp = Response::new(Full::new(Bytes::from(body)));
    rsp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    rsp
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut rsp = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *rsp.status_mut() = status;
    rsp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> WebhookSettings {
        WebhookSettings {
            audience: pod_identity::DEFAULT_AUDIENCE.into(),
            full_uri: pod_identity::FULL_URI_V4.into(),
            token_expiration: pod_identity::TOKEN_EXPIRATION_SECS,
        }
    }

    fn pod(value: serde_json::Value) -> Pod {
        serde_json::from_value(value).unwrap()
    }

    fn env<'a>(c: &'a Container, name: &str) -> Option<&'a str> {
        c.env
            .iter()
            .flatten()
            .find(|e| e.name == name)?
            .value
            .as_deref()
    }

    #[test]
    fn adds_volume_mounts_and_env_as_eks_does_and_only_once() {
        let original = pod(serde_json::json!({
            "metadata": {"name": "app", "namespace": "team",
                         "annotations": {"eks.amazonaws.com/skip-containers": "sidecar"}},
            "spec": {
                "serviceAccountName": "app",
                "initContainers": [{"name": "init"}],
                "containers": [
                    {"name": "main", "env": [{"name": "X", "value": "1"}]},
                    {"name": "own", "env": [{"name": "AWS_CONTAINER_CREDENTIALS_FULL_URI", "value": "http://127.0.0.1/x"}]},
                    {"name": "sidecar"}
                ]
            }
        }));
        let mutated = mutate(&original, &settings()).unwrap();
        let spec = mutated.spec.as_ref().unwrap();
        let volume = &spec.volumes.as_ref().unwrap()[0];
        let projection = volume.projected.as_ref().unwrap().sources.as_ref().unwrap()[0]
            .service_account_token
            .as_ref()
            .unwrap();
        assert_eq!(
            projection.audience.as_deref(),
            Some("pods.eks.amazonaws.com")
        );
        assert_eq!(projection.path, "eks-pod-identity-token");
        let main = &spec.containers[0];
        assert_eq!(env(main, "X"), Some("1"));
        assert_eq!(
            env(main, "AWS_CONTAINER_CREDENTIALS_FULL_URI"),
            Some("http://169.254.170.23/v1/credentials")
        );
        assert_eq!(
            env(main, "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"),
            Some("/var/run/secrets/pods.eks.amazonaws.com/serviceaccount/eks-pod-identity-token")
        );
        let own = &spec.containers[1];
        assert_eq!(
            env(own, "AWS_CONTAINER_CREDENTIALS_FULL_URI"),
            Some("http://127.0.0.1/x")
        );
        assert_eq!(env(own, "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"), None);
        assert_eq!(
            own.volume_mounts.as_ref().map(Vec::len),
            Some(1),
            "the mount is still added"
        );
        let sidecar = &spec.containers[2];
        assert!(
            sidecar.env.is_none() && sidecar.volume_mounts.is_none(),
            "skipped"
        );
        let init = &spec.init_containers.as_ref().unwrap()[0];
        assert!(env(init, "AWS_CONTAINER_CREDENTIALS_FULL_URI").is_some());
        assert_eq!(
            mutated
                .metadata
                .labels
                .as_ref()
                .unwrap()
                .get("podiam.io/pod-identity")
                .map(String::as_str),
            Some("enabled")
        );
        assert!(
            mutate(&mutated, &settings()).is_none(),
            "a mutated pod needs nothing more"
        );

        // As a patch, applied to the pod, it gives the mutated pod.
        let before = serde_json::to_value(&original).unwrap();
        let patch = json_patch::diff(&before, &serde_json::to_value(&mutated).unwrap());
        let mut patched = before.clone();
        json_patch::patch(&mut patched, &patch).unwrap();
        assert_eq!(patched, serde_json::to_value(&mutated).unwrap());
    }
}
