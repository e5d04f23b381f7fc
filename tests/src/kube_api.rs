//! **Test double**: a stand-in Kubernetes API server.
//!
//! It speaks enough of the real API for kube-runtime's watcher and `Api::get`: paged
//! lists with `limit`/`continue` and a `resourceVersion`, watches from a resourceVersion
//! (replaying retained history), bookmarks, `410 Gone` (as an in-stream ERROR event, as
//! the real API server sends it) for a resourceVersion older than the last compaction,
//! and single-object GETs with `404 NotFound` Status bodies. It also answers TokenReviews
//! for tokens a test registers ([`FakeKube::add_token`]) and records Events
//! ([`FakeKube::events`]).
//!
//! Tests drive it directly: [`FakeKube::apply`] / [`FakeKube::delete`] change objects and
//! notify watchers; [`FakeKube::drop_watches`] ends every open watch;
//! [`FakeKube::compact`] forgets history so that resuming needs a re-list;
//! [`FakeKube::hold_lists`] and [`FakeKube::hold_watches`] make requests wait, so a test
//! can change the cluster while the client is disconnected, or look at the client while
//! its re-list is in flight. Counters with async waits ([`FakeKube::wait_lists`],
//! [`FakeKube::wait_watches`]) are the readiness signals tests synchronise on.

use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    net::SocketAddr,
    path::Path,
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use futures::StreamExt;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::{body::Frame, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::{
    net::TcpListener,
    sync::{broadcast, mpsc, watch},
};
use tokio_util::sync::CancellationToken;

type Body = BoxBody<Bytes, Infallible>;

/// The kinds of object the stand-in serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `v1/Pod`, namespaced.
    Pod,
    /// `v1/Namespace`, cluster-scoped.
    Namespace,
    /// `v1/ServiceAccount`, namespaced.
    ServiceAccount,
    /// `podiam.io/v1alpha1/PodIdentityAssociation`, namespaced.
    Association,
}

/// A running stand-in API server; stops when dropped.
#[derive(Debug)]
pub struct FakeKube {
    shared: Arc<Shared>,
    addr: SocketAddr,
    stop: CancellationToken,
}

/// While held, list (or watch) requests wait.
#[derive(Debug)]
pub struct Hold {
    gate: watch::Sender<bool>,
}

/// What a registered ServiceAccount token authenticates as.
#[derive(Clone, Debug, Default)]
pub struct TokenIdentity {
    /// `system:serviceaccount:NS:NAME`.
    pub username: String,
    /// The node the token's pod runs on (the `authentication.kubernetes.io/node-name` extra).
    pub node: Option<String>,
    /// The audiences it was issued for.
    pub audiences: Vec<String>,
    /// The pod the token is bound to: (name, uid), in the ServiceAccount's namespace. As a
    /// real API server does, a review fails once that pod is gone or has another UID.
    pub pod: Option<(String, String)>,
    /// The token's `exp` (Unix seconds): as a real API server does, a review fails after it.
    pub expires: Option<u64>,
}

#[derive(Debug)]
struct Shared {
    tokens: Mutex<HashMap<String, TokenIdentity>>,
    reviews_down: std::sync::atomic::AtomicBool,
    review_attempts: std::sync::atomic::AtomicU64,
    reviews: watch::Sender<u64>,
    events: watch::Sender<Vec<Value>>,
    state: Mutex<State>,
    changes: broadcast::Sender<Message>,
    drop_watches: Mutex<CancellationToken>,
    list_gate: watch::Sender<bool>,
    watch_gate: watch::Sender<bool>,
    review_gate: watch::Sender<bool>,
    reviews_without_audiences: std::sync::atomic::AtomicBool,
    /// Kinds served as if their API did not exist (a CRD not installed): 404.
    missing: Mutex<Vec<Kind>>,
    /// While set, every read (list, watch, get) is answered with this status.
    refuse_reads: Mutex<Option<StatusCode>>,
    /// While set, list requests (not watches) are answered with this status; with
    /// `true`, only lists of more than one item (`limit` other than 1).
    refuse_lists: Mutex<Option<(StatusCode, bool)>>,
    lists: watch::Sender<HashMap<Kind, u64>>,
    watches: watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct State {
    rv: u64,
    /// Watches from a resourceVersion below this get 410 Gone.
    compacted: u64,
    /// Objects as serialised JSON: lists and events are built by concatenation, so the
    /// stand-in stays cheap at 100k pods.
    objects: HashMap<Kind, BTreeMap<(String, String), Bytes>>,
    history: HashMap<Kind, Vec<Arc<Record>>>,
    uid: u64,
}

#[derive(Debug)]
struct Record {
    rv: u64,
    kind: Kind,
    event: &'static str,
    namespace: String,
    object: Bytes,
}

#[derive(Clone, Debug)]
enum Message {
    Change(Arc<Record>),
    Bookmark(u64),
}

struct WatchRequest {
    kind: Kind,
    namespace: Option<String>,
    from: Option<u64>,
    timeout: Duration,
    bookmarks: bool,
}

const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(290);
const WAIT: Duration = Duration::from_secs(20);

// === impl FakeKube ===

impl FakeKube {
    /// Starts on a free loopback port.
    pub async fn start() -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (changes, _) = broadcast::channel(16 * 1024);
        let shared = Arc::new(Shared {
            tokens: Mutex::new(HashMap::new()),
            reviews_down: std::sync::atomic::AtomicBool::new(false),
            review_attempts: std::sync::atomic::AtomicU64::new(0),
            reviews: watch::channel(0).0,
            events: watch::channel(Vec::new()).0,
            state: Mutex::new(State {
                rv: 1,
                ..State::default()
            }),
            changes,
            drop_watches: Mutex::new(CancellationToken::new()),
            list_gate: watch::channel(true).0,
            watch_gate: watch::channel(true).0,
            review_gate: watch::channel(true).0,
            reviews_without_audiences: std::sync::atomic::AtomicBool::new(false),
            missing: Mutex::new(Vec::new()),
            refuse_reads: Mutex::new(None),
            refuse_lists: Mutex::new(None),
            lists: watch::channel(HashMap::new()).0,
            watches: watch::channel(0).0,
        });
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, shared.clone(), stop.clone()));
        Ok(Self { shared, addr, stop })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig that points at this server.
    pub fn write_kubeconfig(&self, path: &Path) -> std::io::Result<()> {
        let config = format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: fake\n\
             clusters:\n- name: fake\n  cluster:\n    server: {}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n\
             users:\n- name: fake\n  user: {{}}\n",
            self.url()
        );
        std::fs::write(path, config)
    }

    /// Creates or replaces an object (its `kind` says which); returns its resourceVersion.
    ///
    /// # Panics
    /// If the manifest has no known kind or no name: a bug in the test.
    pub fn apply(&self, mut object: Value) -> u64 {
        let kind = match object["kind"].as_str() {
            Some("Pod") => Kind::Pod,
            Some("Namespace") => Kind::Namespace,
            Some("ServiceAccount") => Kind::ServiceAccount,
            Some("PodIdentityAssociation") => Kind::Association,
            other => panic!("FakeKube::apply: unsupported kind {other:?}"),
        };
        let key = object_key(kind, &object);
        let mut state = self.shared.state.lock();
        state.rv += 1;
        let rv = state.rv;
        let existing = state.objects.get(&kind).and_then(|m| m.get(&key)).cloned();
        let old_uid = existing
            .as_ref()
            .and_then(|o| serde_json::from_slice::<Value>(o).ok())
            .and_then(|o| o["metadata"]["uid"].as_str().map(str::to_string));
        let uid = match old_uid {
            Some(uid) => uid,
            None => {
                state.uid += 1;
                format!("00000000-0000-0000-0000-{:012}", state.uid)
            }
        };
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        object["metadata"]["uid"] = json!(uid);
        let object = to_bytes(&object);
        state
            .objects
            .entry(kind)
            .or_default()
            .insert(key.clone(), object.clone());
        let event = if existing.is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.record(&mut state, kind, event, key.0, object);
        rv
    }

    /// Deletes an object; returns whether it existed.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> bool {
        let key = match kind {
            Kind::Namespace => (String::new(), name.to_string()),
            _ => (namespace.to_string(), name.to_string()),
        };
        let mut state = self.shared.state.lock();
        let Some(old) = state.objects.get_mut(&kind).and_then(|m| m.remove(&key)) else {
            return false;
        };
        state.rv += 1;
        let mut object: Value = serde_json::from_slice(&old).unwrap_or_default();
        object["metadata"]["resourceVersion"] = json!(state.rv.to_string());
        let object = to_bytes(&object);
        self.record(&mut state, kind, "DELETED", key.0, object);
        true
    }

    /// Deletes a pod.
    pub fn delete_pod(&self, namespace: &str, name: &str) -> bool {
        self.delete(Kind::Pod, namespace, name)
    }

    /// Forgets all history: a watch resuming from any earlier resourceVersion gets 410.
    pub fn compact(&self) {
        let mut state = self.shared.state.lock();
        state.compacted = state.rv;
        state.history.clear();
    }

    /// Keeps only the newest `keep` history records of each kind, as an API server's
    /// watch cache does: a watch resuming from before them gets 410 (for long benchmarks,
    /// whose history would otherwise grow without bound).
    pub fn trim_history(&self, keep: usize) {
        let mut state = self.shared.state.lock();
        let mut oldest_kept = state.compacted;
        for records in state.history.values_mut() {
            if records.len() > keep {
                let cut = records.len() - keep;
                oldest_kept = oldest_kept.max(records[cut - 1].rv);
                records.drain(..cut);
            }
        }
        state.compacted = oldest_kept;
    }

    /// Sends a bookmark at the current resourceVersion to every watch that asked for them.
    pub fn bookmark(&self) {
        let rv = self.shared.state.lock().rv;
        let _ = self.shared.changes.send(Message::Bookmark(rv));
    }

    /// Ends every open watch (clients see the stream end and re-watch).
    pub fn drop_watches(&self) {
        let mut token = self.shared.drop_watches.lock();
        token.cancel();
        *token = CancellationToken::new();
    }

    /// Makes list requests wait until the returned guard is dropped.
    pub fn hold_lists(&self) -> Hold {
        self.shared.list_gate.send_replace(false);
        Hold {
            gate: self.shared.list_gate.clone(),
        }
    }

    /// Makes new watch requests wait until the returned guard is dropped (open watches
    /// are not affected; see [`FakeKube::drop_watches`]).
    pub fn hold_watches(&self) -> Hold {
        self.shared.watch_gate.send_replace(false);
        Hold {
            gate: self.shared.watch_gate.clone(),
        }
    }

    /// Makes TokenReviews wait until the returned guard is dropped (they still count as
    /// attempts when they arrive).
    pub fn hold_token_reviews(&self) -> Hold {
        self.shared.review_gate.send_replace(false);
        Hold {
            gate: self.shared.review_gate.clone(),
        }
    }

    /// While `on`, TokenReviews answer without `status.audiences`, as an authenticator
    /// that ignores audiences does.
    pub fn set_reviews_without_audiences(&self, on: bool) {
        self.shared
            .reviews_without_audiences
            .store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// While `Some`, every list, watch and get is answered with that status (an API server
    /// that cannot be reached answers 503; an RBAC change, 403). Open watches are not
    /// affected; see [`FakeKube::drop_watches`].
    pub fn refuse_reads(&self, status: Option<StatusCode>) {
        *self.shared.refuse_reads.lock() = status;
    }

    /// While `Some`, list requests (and only they) are answered with that status: a
    /// re-list after 410 Gone that keeps failing.
    pub fn refuse_lists(&self, status: Option<StatusCode>) {
        *self.shared.refuse_lists.lock() = status.map(|s| (s, false));
    }

    /// While `Some`, full lists are answered with that status, and a one-item list (a
    /// probe) still works: an API server that sheds expensive requests under load.
    pub fn refuse_full_lists(&self, status: Option<StatusCode>) {
        *self.shared.refuse_lists.lock() = status.map(|s| (s, true));
    }

    /// List requests for `kind` received so far (including held ones).
    pub fn lists(&self, kind: Kind) -> u64 {
        self.shared.lists.borrow().get(&kind).copied().unwrap_or(0)
    }

    /// Watch requests received so far (including held ones).
    pub fn watches(&self) -> u64 {
        *self.shared.watches.borrow()
    }

    /// Waits until at least `n` list requests for `kind` have arrived; `false` after 20 s.
    pub async fn wait_lists(&self, kind: Kind, n: u64) -> bool {
        let mut rx = self.shared.lists.subscribe();
        let reached = rx.wait_for(|m| m.get(&kind).copied().unwrap_or(0) >= n);
        tokio::time::timeout(WAIT, reached)
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Waits until at least `n` watch requests have arrived; `false` after 20 s.
    pub async fn wait_watches(&self, n: u64) -> bool {
        wait_count(&self.shared.watches, n).await
    }

    /// Makes `token` authenticate as `identity` in TokenReviews.
    pub fn add_token(&self, token: &str, identity: TokenIdentity) {
        self.shared
            .tokens
            .lock()
            .insert(token.to_string(), identity);
    }

    /// The stored object `namespace/name` of `kind` (namespace `""` for a Namespace).
    pub fn object(&self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        let state = self.shared.state.lock();
        let bytes = state
            .objects
            .get(&kind)?
            .get(&(namespace.to_string(), name.to_string()))?;
        serde_json::from_slice(bytes).ok()
    }

    /// What the kubelet does for a projected token volume: a token for `audience`, bound
    /// to the pod `namespace/name` as it is now (its ServiceAccount, UID and node), valid
    /// for `lifetime`, registered for TokenReviews. JWT-shaped (its payload carries `aud`,
    /// `exp`, `sub` and the pod) but unsigned: the stand-in vouches for it by its text.
    /// `None` if there is no such pod.
    pub fn issue_pod_token(
        &self,
        namespace: &str,
        name: &str,
        audience: &str,
        lifetime: Duration,
    ) -> Option<String> {
        use base64::Engine;
        let pod: Value = {
            let state = self.shared.state.lock();
            let bytes = state
                .objects
                .get(&Kind::Pod)?
                .get(&(namespace.to_string(), name.to_string()))?
                .clone();
            serde_json::from_slice(&bytes).ok()?
        };
        let uid = pod["metadata"]["uid"].as_str()?.to_string();
        let account = pod["spec"]["serviceAccountName"]
            .as_str()
            .unwrap_or("default")
            .to_string();
        let node = pod["spec"]["nodeName"].as_str().map(str::to_string);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let exp = (now + lifetime).as_secs();
        let username = format!("system:serviceaccount:{namespace}:{account}");
        let serial = self
            .shared
            .review_attempts
            .load(std::sync::atomic::Ordering::SeqCst);
        let claims = json!({
            "aud": [audience], "exp": exp, "iat": now.as_secs(), "sub": username,
            "kubernetes.io": {"namespace": namespace, "pod": {"name": name, "uid": uid},
                              "serviceaccount": {"name": account}},
            "jti": format!("{uid}-{audience}-{}-{serial}", now.as_nanos()),
        });
        let encode = |v: &Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string().as_bytes())
        };
        let token = format!(
            "{}.{}.{}",
            encode(&json!({"alg": "RS256", "kid": "stand-in"})),
            encode(&claims),
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b"unsigned")
        );
        self.add_token(
            &token,
            TokenIdentity {
                username,
                node,
                audiences: vec![audience.to_string()],
                pod: Some((name.to_string(), uid)),
                expires: Some(exp),
            },
        );
        Some(token)
    }

    /// Serves `kind` as if its API did not exist (a CRD not installed): every read 404.
    pub fn remove_api(&self, kind: Kind) {
        self.shared.missing.lock().push(kind);
    }

    /// TokenReviews asked for so far, answered or not.
    pub fn token_review_attempts(&self) -> u64 {
        self.shared
            .review_attempts
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Makes `token` authenticate as nobody (a revoked token).
    pub fn remove_token(&self, token: &str) {
        self.shared.tokens.lock().remove(token);
    }

    /// While `down`, TokenReviews fail with 503, as when the API server is unreachable.
    pub fn set_token_reviews_down(&self, down: bool) {
        self.shared
            .reviews_down
            .store(down, std::sync::atomic::Ordering::SeqCst);
    }

    /// TokenReviews answered so far.
    pub fn token_reviews(&self) -> u64 {
        *self.shared.reviews.borrow()
    }

    /// Events created or updated so far (events.k8s.io/v1 objects as sent).
    pub fn events(&self) -> Vec<Value> {
        self.shared.events.borrow().clone()
    }

    /// Waits until an Event matches `f`; returns it, or `None` after 20 s.
    pub async fn wait_event(&self, f: impl Fn(&Value) -> bool) -> Option<Value> {
        let mut rx = self.shared.events.subscribe();
        let found = rx.wait_for(|events| events.iter().any(&f));
        tokio::time::timeout(WAIT, found).await.ok()?.ok()?;
        self.events().into_iter().find(|e| f(e))
    }

    /// Number of objects of `kind`.
    pub fn count(&self, kind: Kind) -> usize {
        self.shared
            .state
            .lock()
            .objects
            .get(&kind)
            .map_or(0, BTreeMap::len)
    }

    fn record(
        &self,
        state: &mut State,
        kind: Kind,
        event: &'static str,
        namespace: String,
        object: Bytes,
    ) {
        let record = Arc::new(Record {
            rv: state.rv,
            kind,
            event,
            namespace,
            object,
        });
        state.history.entry(kind).or_default().push(record.clone());
        // Sent under the state lock, so watchers see changes in resourceVersion order and
        // a new watcher's backlog and live stream neither overlap nor leave a gap.
        let _ = self.shared.changes.send(Message::Change(record));
    }
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        self.stop.cancel();
        self.drop_watches();
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.gate.send_replace(true);
    }
}

async fn wait_count(counter: &watch::Sender<u64>, n: u64) -> bool {
    let mut rx = counter.subscribe();
    tokio::time::timeout(WAIT, rx.wait_for(|c| *c >= n))
        .await
        .is_ok_and(|r| r.is_ok())
}

fn object_key(kind: Kind, object: &Value) -> (String, String) {
    let meta = &object["metadata"];
    let name = meta["name"]
        .as_str()
        .unwrap_or_else(|| panic!("FakeKube: object without metadata.name: {object}"));
    let namespace = match kind {
        Kind::Namespace => "",
        _ => meta["namespace"].as_str().unwrap_or("default"),
    };
    (namespace.to_string(), name.to_string())
}

// === HTTP ===

async fn serve(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(route(shared, req).await) }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn route(shared: Arc<Shared>, req: Request<hyper::body::Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (req.method().clone(), segments.as_slice()) {
        (Method::POST, ["apis", "authentication.k8s.io", "v1", "tokenreviews"]) => {
            shared
                .review_attempts
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if shared
                .reviews_down
                .load(std::sync::atomic::Ordering::SeqCst)
            {
                return status(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "ServiceUnavailable",
                    "down",
                );
            }
            let mut gate = shared.review_gate.subscribe();
            let _ = gate.wait_for(|open| *open).await;
            return token_review(&shared, req).await;
        }
        (
            Method::POST | Method::PATCH,
            ["apis", "events.k8s.io", "v1", "namespaces", _, "events", ..],
        ) => {
            return record_event(&shared, req).await;
        }
        (Method::GET, _) => {
            let refused = *shared.refuse_reads.lock();
            if let Some(code) = refused {
                return status(code, "Refused", "refused by the test");
            }
        }
        _ => {
            return status(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "not served here",
            );
        }
    }
    let query = parse_query(req.uri().query().unwrap_or(""));
    let segments: Vec<&str> = req.uri().path().trim_matches('/').split('/').collect();
    let (kind, namespace, name) = match segments.as_slice() {
        ["api", "v1", "pods"] => (Kind::Pod, None, None),
        ["api", "v1", "namespaces", ns, "pods"] => (Kind::Pod, Some(*ns), None),
        ["api", "v1", "namespaces", ns, "pods", name] => (Kind::Pod, Some(*ns), Some(*name)),
        ["api", "v1", "namespaces"] => (Kind::Namespace, None, None),
        ["api", "v1", "namespaces", name] => (Kind::Namespace, None, Some(*name)),
        ["api", "v1", "serviceaccounts"] => (Kind::ServiceAccount, None, None),
        ["api", "v1", "namespaces", ns, "serviceaccounts"] => {
            (Kind::ServiceAccount, Some(*ns), None)
        }
        ["api", "v1", "namespaces", ns, "serviceaccounts", name] => {
            (Kind::ServiceAccount, Some(*ns), Some(*name))
        }
        ["apis", "podiam.io", "v1alpha1", "podidentityassociations"] => {
            (Kind::Association, None, None)
        }
        [
            "apis",
            "podiam.io",
            "v1alpha1",
            "namespaces",
            ns,
            "podidentityassociations",
        ] => (Kind::Association, Some(*ns), None),
        [
            "apis",
            "podiam.io",
            "v1alpha1",
            "namespaces",
            ns,
            "podidentityassociations",
            name,
        ] => (Kind::Association, Some(*ns), Some(*name)),
        _ => {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                "the server could not find the requested resource",
            );
        }
    };
    if shared.missing.lock().contains(&kind) {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        );
    }
    if let Some(name) = name {
        return get(&shared, kind, namespace.unwrap_or(""), name);
    }
    let namespace = namespace.map(str::to_string);
    if query.get("watch").is_some_and(|w| w == "true" || w == "1") {
        let from = query
            .get("resourceVersion")
            .and_then(|rv| rv.parse::<u64>().ok())
            .filter(|rv| *rv != 0);
        let timeout = query
            .get("timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .map_or(DEFAULT_WATCH_TIMEOUT, Duration::from_secs);
        let bookmarks = query
            .get("allowWatchBookmarks")
            .is_some_and(|b| b == "true");
        shared.watches.send_modify(|n| *n += 1);
        let mut gate = shared.watch_gate.subscribe();
        let _ = gate.wait_for(|open| *open).await;
        return watch_stream(
            &shared,
            WatchRequest {
                kind,
                namespace,
                from,
                timeout,
                bookmarks,
            },
        );
    }
    let refused = *shared.refuse_lists.lock();
    if let Some((code, only_full)) = refused
        && !(only_full && query.get("limit").is_some_and(|l| l == "1"))
    {
        return status(code, "Refused", "list refused by the test");
    }
    list(&shared, kind, namespace, &query).await
}

async fn body_json(req: Request<hyper::body::Incoming>) -> Value {
    let bytes = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    serde_json::from_slice(&bytes).unwrap_or_default()
}

async fn token_review(shared: &Shared, req: Request<hyper::body::Incoming>) -> Response<Body> {
    let mut review = body_json(req).await;
    let token = review["spec"]["token"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let wanted: Vec<String> = review["spec"]["audiences"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let identity = shared.tokens.lock().get(&token).cloned();
    let refusal = identity.as_ref().and_then(|id| bound_refusal(shared, id));
    review["status"] = match identity {
        Some(_) if refusal.is_some() => json!({"authenticated": false, "error": refusal}),
        Some(id) if wanted.is_empty() || wanted.iter().any(|w| id.audiences.contains(w)) => {
            let audiences: Vec<&String> =
                wanted.iter().filter(|w| id.audiences.contains(w)).collect();
            let mut user = json!({"username": id.username, "uid": "sa-uid", "groups": ["system:serviceaccounts"]});
            let mut extra = serde_json::Map::new();
            if let Some(node) = id.node {
                extra.insert(
                    "authentication.kubernetes.io/node-name".into(),
                    json!([node]),
                );
            }
            if let Some((name, uid)) = id.pod {
                extra.insert(
                    "authentication.kubernetes.io/pod-name".into(),
                    json!([name]),
                );
                extra.insert("authentication.kubernetes.io/pod-uid".into(), json!([uid]));
            }
            if !extra.is_empty() {
                user["extra"] = Value::Object(extra);
            }
            if shared
                .reviews_without_audiences
                .load(std::sync::atomic::Ordering::SeqCst)
            {
                json!({"authenticated": true, "user": user})
            } else {
                json!({"authenticated": true, "user": user, "audiences": audiences})
            }
        }
        Some(_) => json!({"authenticated": false, "error": "token audiences are invalid"}),
        None => json!({"authenticated": false, "error": "invalid bearer token"}),
    };
    shared.reviews.send_modify(|n| *n += 1);
    json_response(StatusCode::CREATED, &review)
}

/// Why a real API server would not authenticate a token any more: past its `exp`, or
/// bound to a pod that is gone (or was replaced by one with another UID).
fn bound_refusal(shared: &Shared, id: &TokenIdentity) -> Option<String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    if id.expires.is_some_and(|exp| exp <= now) {
        return Some("token has expired".into());
    }
    let (name, uid) = id.pod.as_ref()?;
    let namespace = id
        .username
        .strip_prefix("system:serviceaccount:")
        .and_then(|rest| rest.split_once(':'))
        .map(|(ns, _)| ns.to_string())
        .unwrap_or_default();
    let state = shared.state.lock();
    let pod = state
        .objects
        .get(&Kind::Pod)
        .and_then(|pods| pods.get(&(namespace, name.clone())))
        .and_then(|o| serde_json::from_slice::<Value>(o).ok());
    match pod {
        None => Some(format!("pod {name:?} does not exist")),
        Some(pod) if pod["metadata"]["uid"].as_str() != Some(uid.as_str()) => Some(format!(
            "the UID in the bound object reference ({uid}) does not match the pod's"
        )),
        Some(_) => None,
    }
}

async fn record_event(shared: &Shared, req: Request<hyper::body::Incoming>) -> Response<Body> {
    let created = req.method() == Method::POST;
    let event = body_json(req).await;
    shared
        .events
        .send_modify(|events| events.push(event.clone()));
    let code = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    json_response(code, &event)
}

fn get(shared: &Shared, kind: Kind, namespace: &str, name: &str) -> Response<Body> {
    let state = shared.state.lock();
    let key = (namespace.to_string(), name.to_string());
    match state.objects.get(&kind).and_then(|m| m.get(&key)) {
        Some(object) => bytes_response(StatusCode::OK, object.clone()),
        None => status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("{kind:?} {name:?} not found"),
        ),
    }
}

async fn list(
    shared: &Shared,
    kind: Kind,
    namespace: Option<String>,
    query: &HashMap<String, String>,
) -> Response<Body> {
    shared
        .lists
        .send_modify(|m| *m.entry(kind).or_default() += 1);
    let mut gate = shared.list_gate.subscribe();
    let _ = gate.wait_for(|open| *open).await;

    let limit = query
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    // continue token: "<rv>-<hex of the last key>"
    let resume = query.get("continue").and_then(|c| {
        let (rv, key) = c.split_once('-')?;
        Some((
            rv.parse::<u64>().ok()?,
            String::from_utf8(hex_decode(key)?).ok()?,
        ))
    });
    let state = shared.state.lock();
    let rv = resume.as_ref().map_or(state.rv, |(rv, _)| *rv);
    let empty = BTreeMap::new();
    let objects = state.objects.get(&kind).unwrap_or(&empty);
    let after = resume.map(|(_, key)| key);
    let mut items = Vec::new();
    let mut last = None;
    let mut more = false;
    for ((ns, name), object) in objects {
        let flat = format!("{ns}/{name}");
        if after.as_ref().is_some_and(|a| flat.as_str() <= a.as_str()) {
            continue;
        }
        if namespace.as_ref().is_some_and(|want| want != ns) {
            continue;
        }
        if items.len() == limit {
            more = true;
            break;
        }
        items.push(object.clone());
        last = Some(flat);
    }
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if more && let Some(last) = last {
        metadata["continue"] = json!(format!("{rv}-{}", hex_encode(last.as_bytes())));
    }
    let (list_kind, api_version) = match kind {
        Kind::Pod => ("PodList", "v1"),
        Kind::Namespace => ("NamespaceList", "v1"),
        Kind::ServiceAccount => ("ServiceAccountList", "v1"),
        Kind::Association => ("PodIdentityAssociationList", "podiam.io/v1alpha1"),
    };
    let mut body = Vec::with_capacity(items.iter().map(|o| o.len() + 1).sum::<usize>() + 256);
    body.extend_from_slice(
        format!(
            r#"{{"kind":"{list_kind}","apiVersion":"{api_version}","metadata":{metadata},"items":["#
        )
        .as_bytes(),
    );
    for (i, object) in items.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(object);
    }
    body.extend_from_slice(b"]}");
    bytes_response(StatusCode::OK, body.into())
}

fn watch_stream(shared: &Arc<Shared>, req: WatchRequest) -> Response<Body> {
    let WatchRequest {
        kind,
        namespace,
        from,
        timeout,
        bookmarks,
    } = req;
    let in_namespace = move |ns: &str| namespace.as_ref().is_none_or(|want| want == ns);
    let in_scope = {
        let in_namespace = in_namespace.clone();
        move |r: &Record| r.kind == kind && in_namespace(&r.namespace)
    };
    let (backlog, mut changes, cancel) = {
        let state = shared.state.lock();
        let cancel = shared.drop_watches.lock().clone();
        let backlog: Vec<Bytes> = match from {
            Some(rv) if rv < state.compacted => {
                let gone = json!({
                    "type": "ERROR",
                    "object": {
                        "kind": "Status", "apiVersion": "v1", "metadata": {},
                        "status": "Failure", "reason": "Expired", "code": 410,
                        "message": format!("too old resource version: {rv} ({})", state.compacted)
                    }
                });
                return bytes_response(StatusCode::OK, line(&gone));
            }
            Some(rv) => state
                .history
                .get(&kind)
                .into_iter()
                .flatten()
                .filter(|r| r.rv > rv && in_scope(r))
                .map(|r| event_line(r.event, &r.object))
                .collect(),
            // No resourceVersion: the current state as ADDED events, then changes.
            None => state
                .objects
                .get(&kind)
                .into_iter()
                .flat_map(BTreeMap::iter)
                .filter(|((ns, _), _)| in_namespace(ns))
                .map(|(_, o)| event_line("ADDED", o))
                .collect(),
        };
        (backlog, shared.changes.subscribe(), cancel)
    };

    let (tx, rx) = mpsc::channel::<Bytes>(256);
    let bookmark_kind = match kind {
        Kind::Pod => "Pod",
        Kind::Namespace => "Namespace",
        Kind::ServiceAccount => "ServiceAccount",
        Kind::Association => "PodIdentityAssociation",
    };
    tokio::spawn(async move {
        for event in backlog {
            if tx.send(event).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        loop {
            let event = tokio::select! {
                _ = cancel.cancelled() => return,
                _ = &mut deadline => return,
                msg = changes.recv() => match msg {
                    Ok(Message::Change(r)) if in_scope(&r) => event_line(r.event, &r.object),
                    Ok(Message::Bookmark(rv)) if bookmarks => line(&json!({
                        "type": "BOOKMARK",
                        "object": {"kind": bookmark_kind, "apiVersion": "v1",
                                   "metadata": {"resourceVersion": rv.to_string()}}
                    })),
                    Ok(_) => continue,
                    // Lagging or shut down: end the watch; the client resumes from its
                    // last resourceVersion, as with a real API server.
                    Err(_) => return,
                },
            };
            if tx.send(event).await.is_err() {
                return;
            }
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx).map(|b| Ok(Frame::data(b)));
    let mut rsp = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    rsp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    rsp
}

fn event_line(event: &str, object: &[u8]) -> Bytes {
    let mut bytes = Vec::with_capacity(object.len() + 32);
    bytes.extend_from_slice(format!(r#"{{"type":"{event}","object":"#).as_bytes());
    bytes.extend_from_slice(object);
    bytes.extend_from_slice(b"}\n");
    bytes.into()
}

fn to_bytes(value: &Value) -> Bytes {
    serde_json::to_vec(value).unwrap_or_default().into()
}

fn line(value: &Value) -> Bytes {
    let mut bytes = serde_json::to_vec(value).unwrap_or_default();
    bytes.push(b'\n');
    bytes.into()
}

fn json_response(code: StatusCode, value: &Value) -> Response<Body> {
    bytes_response(code, serde_json::to_vec(value).unwrap_or_default().into())
}

fn bytes_response(code: StatusCode, body: Bytes) -> Response<Body> {
    let mut rsp = Response::new(Full::new(body).boxed());
    *rsp.status_mut() = code;
    rsp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    rsp
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "reason": reason, "message": message, "code": code.as_u16()
    });
    json_response(code, &body)
}

fn parse_query(query: &str) -> HashMap<String, String> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect()
}
