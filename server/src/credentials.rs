//! Issuing: from a request's pod IP to that pod's credentials, or a typed refusal.
//!
//! `IP → live pod (bounded wait) → the caller's node owns it → policy allows a role → the
//! requested role is that role → session key → broker`. Each refusal is one
//! [`IssueError`] whose [`IssueError::code`] is the protocol's error code; denials and STS
//! failures also raise a (rate-limited) Warning Event through the [`Notifier`]. Every
//! credential set handed to a pod is written once to the audit log.

use std::{collections::HashMap, fmt, net::IpAddr, sync::Arc, time::Duration};

use futures::{FutureExt, future::BoxFuture};
use parking_lot::Mutex;

use podiam_common::{
    arn::RoleArn,
    feed::{self, PodState},
    protocol::{Credentials, ErrorCode},
    readiness::Readiness,
};

use crate::{
    accounts::{AccountKey, AccountRole},
    auth::Reviewed,
    cluster::ClusterIndex,
    pods::{IpLookup, PodInfo, PodKey, PodPhase},
    policy::{Decision, Denial, Grant, PolicyConfig, RoleSource},
    sts::{Broker, Demand, SessionKey, StsError},
};

/// STS's longest role-chained session.
pub const CHAINED_MAX: Duration = Duration::from_secs(3600);

/// How sessions are parameterised.
#[derive(Clone, Debug)]
pub struct SessionSettings {
    /// Duration when the pod's annotation sets none.
    pub default_duration: Duration,
    /// Whether the server's own credentials are a chained session (1 h cap).
    pub chained: bool,
    /// Whether to tag sessions with the pod's namespace, name and service account.
    pub tags: bool,
    /// Who shares a session when the pod's annotation names none.
    pub scope: SessionScope,
    /// The `eks-cluster-name` session tag on the container-credentials path.
    pub cluster_name: Option<String>,
    /// The `eks-cluster-arn` session tag on the container-credentials path.
    pub cluster_arn: Option<String>,
}

/// Who shares an STS session (when no `iam.amazonaws.com/session-name` says otherwise).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SessionScope {
    /// One session per pod, named `NAMESPACE.POD`: CloudTrail names the pod.
    #[default]
    Pod,
    /// One session per role (and external ID and duration), named `podiam-ROLE`: STS
    /// calls grow with the number of roles, not pods (kiam's behaviour).
    Role,
}

/// How a request for an IP that no pod has (yet) waits for the pod to appear.
#[derive(Clone, Debug)]
pub struct LookupSettings {
    /// How long it waits.
    pub wait: Duration,
    /// How many such requests from one node (or from all, without node binding) may wait
    /// at once; the ones beyond are answered "no such pod" at once. Addresses no pod has
    /// would otherwise hold a request each for the whole wait, as many as a node sends.
    pub max_waiting: usize,
}

/// What issuing counts.
#[derive(Clone, Debug)]
pub struct IssuerMetrics {
    /// Requests denied by policy, by denial reason (`mirror_pod`, `role_not_permitted`,
    /// `namespace_policy_invalid`, ...).
    denied: prometheus::IntCounterVec,
    /// Requests answered at once because `max_waiting` were already waiting.
    shed: prometheus::IntCounter,
}

/// Who is asking: the agent's node, learnt from its ServiceAccount token (`None` when node
/// binding is off).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The agent's node.
    pub node: Option<Arc<str>>,
}

/// Publishes Warning Events. Implementations rate-limit and never block the caller.
pub trait Notifier: Send + Sync + fmt::Debug + 'static {
    /// A Warning Event on a pod.
    fn pod_warning(&self, pod: &PodInfo, reason: &'static str, note: String);
    /// A Warning Event on a node (no pod to attach it to, e.g. an unknown IP).
    fn node_warning(&self, node: &str, reason: &'static str, note: String);
}

/// Why a request gets no credentials.
#[derive(Clone, Debug, thiserror::Error)]
pub enum IssueError {
    /// The pod's ServiceAccount token (container-credentials path) is not usable.
    #[error("pod token refused: {0}")]
    InvalidToken(String),
    /// The pod a token is bound to is not in the index (deleted, recreated, or finished).
    #[error("the pod {pod} this token is bound to is not running (uid {uid})")]
    TokenPodGone {
        /// The pod the token names.
        pod: PodKey,
        /// The UID the token names.
        uid: String,
    },
    /// A pod's token came from an address that is not one of that pod's.
    #[error("the token of pod {pod} was sent from {ip}, which is not one of that pod's addresses")]
    TokenFromElsewhere {
        /// The pod the token is bound to.
        pod: PodKey,
        /// Where the request came from.
        ip: IpAddr,
    },
    /// The pod a token is bound to has no address in the index yet.
    #[error("the pod {0} has no IP address yet")]
    NoAddressYet(PodKey),
    /// No live pod has the IP.
    #[error("no live pod has IP {0}")]
    PodNotFound(IpAddr),
    /// Several live pods claim the IP.
    #[error("IP {ip} is claimed by several live pods ({})", list(.pods))]
    AmbiguousIp {
        /// The IP.
        ip: IpAddr,
        /// Its claimants.
        pods: Vec<PodKey>,
    },
    /// The pod is on another node than the asking agent.
    #[error("pod {pod} runs on node {pod_node:?}, not on the asking agent's node {caller_node:?}")]
    NodeMismatch {
        /// The pod.
        pod: PodKey,
        /// Its node.
        pod_node: Option<String>,
        /// The agent's node.
        caller_node: String,
    },
    /// The pod asked for a role that is not its own.
    #[error("pod {pod} asked for role {requested:?}, which is not its role")]
    RoleMismatch {
        /// The pod.
        pod: PodKey,
        /// What it asked for.
        requested: String,
    },
    /// Policy denies the pod a role.
    #[error("pod {pod}: {denial}")]
    Forbidden {
        /// The pod.
        pod: PodKey,
        /// Why.
        denial: Denial,
    },
    /// STS failed.
    #[error("pod {pod}: assuming {role}: {error}")]
    Sts {
        /// The pod.
        pod: PodKey,
        /// The role.
        role: RoleArn,
        /// STS's error.
        error: StsError,
    },
}

/// The server's answer for one pod.
#[derive(Clone, Debug)]
pub struct Issued {
    /// The pod.
    pub pod: Arc<PodInfo>,
    /// Its role.
    pub role_arn: RoleArn,
    /// Its credentials.
    pub credentials: Credentials,
}

/// Cheap to clone.
#[derive(Clone, Debug)]
pub struct Issuer {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    index: ClusterIndex,
    policy: PolicyConfig,
    broker: Broker,
    sessions: SessionSettings,
    lookup: LookupSettings,
    metrics: IssuerMetrics,
    /// Requests waiting for an unknown IP, by asking node.
    waiting: Mutex<HashMap<Option<Arc<str>>, usize>>,
    notifier: Arc<dyn Notifier>,
    /// (pod, access key id) pairs already written to the audit log; pods gone from the
    /// index are swept out every [`AUDIT_SWEEP`] new pairs.
    audited: moka::sync::Cache<(PodKey, String), ()>,
    /// New pairs since the last sweep.
    audited_since_sweep: std::sync::atomic::AtomicUsize,
    /// hostNetwork pods with a role, already told that they get the node's role.
    host_network_warned: moka::sync::Cache<PodKey, ()>,
    /// The pods each session was handed to or fetched for (a few per session), so that a
    /// session is refreshed only while one of them still maps to it. Pruned when asked
    /// and in [`Issuer::forget_gone_pods`]'s sweep.
    users: Mutex<HashMap<SessionKey, Vec<PodKey>>>,
}

/// What the broker asks before fetching ahead of a request: the server's readiness (its
/// view is current) and the issuer (a pod the index holds now maps to the session; a
/// container-credentials session only while that path's view is current too).
#[derive(Debug)]
pub struct IssuerDemand {
    issuer: std::sync::Weak<Inner>,
    readiness: Readiness,
    pod_identity: Option<Readiness>,
}

const AUDIT_MEMORY: Duration = Duration::from_secs(13 * 3600);
/// New audit pairs between two sweeps of the pairs (and hostNetwork warnings) of pods that
/// are gone. Without the sweep, a cluster creating 20 pods a second kept every deleted
/// pod's pair for 13 hours: about 35 MB more each hour.
const AUDIT_SWEEP: usize = 4096;
const MAX_SESSION_NAME: usize = 64;
/// Pods remembered per session (a role-scoped or annotation-named session may be shared by
/// many; any one still mapping to it keeps it refreshed, and the others are added again
/// when they ask).
const USERS_PER_SESSION: usize = 16;
/// Sessions whose users are remembered at most (a few per pod).
const USERS_MAX: usize = 400_000;

// === impl IssuerDemand ===

impl Demand for IssuerDemand {
    fn current(&self) -> bool {
        self.readiness.is_ready()
    }

    fn until_current(&self) -> BoxFuture<'static, ()> {
        let readiness = self.readiness.clone();
        async move { readiness.wait_ready().await }.boxed()
    }

    fn wants(&self, key: &SessionKey) -> bool {
        let container = self.pod_identity.as_ref().is_some_and(Readiness::is_ready);
        self.issuer
            .upgrade()
            .is_some_and(|inner| Issuer { inner }.wants(key, container))
    }
}

// === impl IssueError ===

impl IssueError {
    /// The protocol error code: the one place refusals become codes (and so statuses).
    pub fn code(&self) -> ErrorCode {
        match self {
            IssueError::InvalidToken(_) | IssueError::TokenFromElsewhere { .. } => {
                ErrorCode::InvalidToken
            }
            IssueError::NoAddressYet(_) => ErrorCode::NotReady,
            IssueError::PodNotFound(_) | IssueError::TokenPodGone { .. } => ErrorCode::PodNotFound,
            IssueError::AmbiguousIp { .. } => ErrorCode::AmbiguousIp,
            IssueError::NodeMismatch { .. } => ErrorCode::NodeMismatch,
            IssueError::RoleMismatch { .. } => ErrorCode::RoleMismatch,
            IssueError::Forbidden { .. } => ErrorCode::Forbidden,
            IssueError::Sts { .. } => ErrorCode::StsError,
        }
    }
}

/// Drops the entries of `cache` that `keep` refuses; how many.
fn sweep<K>(cache: &moka::sync::Cache<K, ()>, keep: impl Fn(&K) -> bool) -> usize
where
    K: std::hash::Hash + Eq + Send + Sync + 'static,
{
    let gone: Vec<Arc<K>> = cache
        .iter()
        .filter(|(k, ())| !keep(k))
        .map(|(k, ())| k)
        .collect();
    for key in &gone {
        cache.invalidate(&**key);
    }
    gone.len()
}

/// The ServiceAccount a pod runs as (`default` when its spec names none).
fn account_of(pod: &PodInfo) -> AccountKey {
    AccountKey {
        namespace: pod.key.namespace.clone(),
        name: pod
            .service_account
            .clone()
            .unwrap_or_else(|| "default".into()),
    }
}

fn list(pods: &[PodKey]) -> String {
    pods.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

// === impl Issuer ===

impl Issuer {
    /// Issues from `index` with `policy` through `broker`.
    pub fn new(
        index: ClusterIndex,
        policy: PolicyConfig,
        broker: Broker,
        sessions: SessionSettings,
        lookup: LookupSettings,
        metrics: IssuerMetrics,
        notifier: Arc<dyn Notifier>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                index,
                policy,
                broker,
                sessions,
                lookup,
                metrics,
                waiting: Mutex::new(HashMap::new()),
                notifier,
                audited: moka::sync::Cache::builder()
                    .max_capacity(500_000)
                    .time_to_live(AUDIT_MEMORY)
                    .build(),
                audited_since_sweep: std::sync::atomic::AtomicUsize::new(0),
                host_network_warned: moka::sync::Cache::builder()
                    .max_capacity(100_000)
                    .time_to_live(Duration::from_secs(24 * 3600))
                    .build(),
                users: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The broker's [`Demand`]: sessions are fetched ahead only while `readiness` (the
    /// server's: its watches are current) is open and a pod still maps to them; sessions
    /// of the container-credentials path only while `pod_identity` (that path's own
    /// watches) is open too.
    pub fn demand(&self, readiness: Readiness, pod_identity: Option<Readiness>) -> IssuerDemand {
        IssuerDemand {
            issuer: Arc::downgrade(&self.inner),
            readiness,
            pod_identity,
        }
    }

    /// Remembers that `pod` uses `key` (a new session is not remembered once
    /// [`USERS_MAX`] are: it is then refreshed only if a pod asks for it again).
    fn record_user(&self, key: &SessionKey, pod: &PodKey) {
        let mut users = self.inner.users.lock();
        if let Some(list) = users.get_mut(key) {
            if list.len() < USERS_PER_SESSION && !list.contains(pod) {
                list.push(pod.clone());
            }
        } else if users.len() < USERS_MAX {
            users.insert(key.clone(), vec![pod.clone()]);
        }
    }

    /// Whether a pod the index holds now maps to `key` (its container-credentials session
    /// only while that path's view is current: `container`); forgets the ones that no
    /// longer do.
    fn wants(&self, key: &SessionKey, container: bool) -> bool {
        let Some(users) = self.inner.users.lock().get(key).cloned() else {
            return false;
        };
        let pods: Vec<(PodKey, Option<Arc<PodInfo>>)> = {
            let index = self.inner.index.pods();
            users
                .into_iter()
                .map(|k| {
                    let pod = index.get(&k);
                    (k, pod)
                })
                .collect()
        };
        let maps = |pod: &PodInfo| {
            self.metadata_key(pod).as_ref() == Some(key)
                || (container && self.container_key(pod).as_ref() == Some(key))
        };
        let (still, gone): (Vec<_>, Vec<_>) = pods
            .into_iter()
            .partition(|(_, pod)| pod.as_deref().is_some_and(maps));
        // Merged, not overwritten: a pod recorded meanwhile stays.
        let mut map = self.inner.users.lock();
        if let Some(list) = map.get_mut(key) {
            list.retain(|p| !gone.iter().any(|(g, _)| g == p));
            if list.is_empty() {
                map.remove(key);
            }
        }
        !still.is_empty()
    }

    /// The role of the pod with `ip`, if it may have one.
    pub async fn role(
        &self,
        ip: IpAddr,
        caller: &Caller,
    ) -> Result<(Arc<PodInfo>, Grant), IssueError> {
        let pod = self.pod(ip, caller).await?;
        let grant = self.grant(&pod)?;
        Ok((pod, grant))
    }

    /// Credentials for the pod with `ip`; `requested` is the role it asked for, if any.
    pub async fn credentials(
        &self,
        ip: IpAddr,
        requested: Option<&str>,
        caller: &Caller,
    ) -> Result<Issued, IssueError> {
        let (pod, grant) = self.role(ip, caller).await?;
        if let Some(requested) = requested.map(str::trim).filter(|r| !r.is_empty())
            && !grant.role_arn.answers_to(requested)
        {
            // Probing for another role: refused like an unknown role, without saying more.
            return Err(IssueError::RoleMismatch {
                pod: pod.key.clone(),
                requested: requested.to_string(),
            });
        }
        self.issue(pod, grant).await
    }

    /// Credentials for `pod` under `grant`, audited; an STS failure is told to its Events.
    async fn issue(&self, pod: Arc<PodInfo>, grant: Grant) -> Result<Issued, IssueError> {
        let key = self.session_key(&pod, &grant);
        self.record_user(&key, &pod.key);
        match self.inner.broker.credentials(&key).await {
            Ok(credentials) => {
                self.audit(&pod, &grant.role_arn, &credentials);
                Ok(Issued {
                    pod,
                    role_arn: grant.role_arn,
                    credentials,
                })
            }
            Err(error) => {
                let err = IssueError::Sts {
                    pod: pod.key.clone(),
                    role: grant.role_arn,
                    error,
                };
                self.inner
                    .notifier
                    .pod_warning(&pod, "AssumeRoleFailed", err.to_string());
                Err(err)
            }
        }
    }

    /// Credentials on the container-credentials path: for the pod `token` (reviewed by the
    /// API server) is bound to, with its ServiceAccount's role. The pod must be live in
    /// the index with the token's UID, on the caller's node, and run as the token's
    /// ServiceAccount; and the request must come from one of its addresses (`from`, as
    /// the agent saw it; a host-network pod's addresses are its node's), so that a token
    /// another pod has read is worth nothing to it.
    pub async fn pod_identity(
        &self,
        token: &Reviewed,
        caller: &Caller,
        from: Option<IpAddr>,
    ) -> Result<Issued, IssueError> {
        let mut pod = self.token_pod(token, caller).await?;
        if let Some(ip) = from.map(podiam_common::net::canonical) {
            if pod.ips.is_empty() {
                // A container may ask before the kubelet's status write (its IPs) reaches
                // the index: wait for it as for a new pod, then say "not yet", which the
                // pod retries; never "not yours" for a pod with no address yet.
                let index = &self.inner.index;
                let with_ips = |index: &ClusterIndex| {
                    index
                        .pods()
                        .get(&pod.key)
                        .filter(|p| p.uid == pod.uid && !p.ips.is_empty())
                };
                index
                    .wait_until(self.inner.lookup.wait, |i| with_ips(i).is_some())
                    .await;
                pod = with_ips(index).ok_or_else(|| IssueError::NoAddressYet(pod.key.clone()))?;
            }
            if !pod.ips.iter().any(|own| own == ip) {
                let err = IssueError::TokenFromElsewhere {
                    pod: pod.key.clone(),
                    ip,
                };
                self.inner
                    .notifier
                    .pod_warning(&pod, "TokenUsedElsewhere", err.to_string());
                return Err(err);
            }
        }
        let account = account_of(pod.as_ref());
        let role = self.inner.index.accounts().role_of(&account);
        let namespace = self.inner.index.namespace(&pod.key.namespace);
        let decision = Decision::for_service_account(
            &pod,
            &account,
            &role,
            namespace.as_deref(),
            &self.inner.policy,
        );
        let grant = self.allowed(&pod, decision)?;
        self.issue(pod, grant).await
    }

    /// The live pod `token` is bound to, if it is the caller's to ask for.
    async fn token_pod(
        &self,
        token: &Reviewed,
        caller: &Caller,
    ) -> Result<Arc<PodInfo>, IssueError> {
        let invalid = |why: &str| IssueError::InvalidToken(why.to_string());
        let (namespace, account) = token
            .username
            .strip_prefix("system:serviceaccount:")
            .and_then(|rest| rest.split_once(':'))
            .filter(|(ns, sa)| !ns.is_empty() && !sa.is_empty())
            .ok_or_else(|| invalid("not a ServiceAccount token"))?;
        let (Some(name), Some(uid)) = (&token.pod_name, &token.pod_uid) else {
            return Err(invalid("the token is not bound to a pod"));
        };
        let key = PodKey {
            namespace: namespace.into(),
            name: name.clone(),
        };
        let matches = |index: &ClusterIndex| {
            index.pods().get(&key).filter(|pod| {
                pod.uid.is_some_and(|u| u.to_string() == **uid)
                    && !matches!(pod.phase, PodPhase::Succeeded | PodPhase::Failed)
            })
        };
        // A pod's first request may come before the watch brings the pod.
        let index = &self.inner.index;
        let pod = match matches(index) {
            Some(pod) => pod,
            None => {
                index
                    .wait_until(self.inner.lookup.wait, |index| matches(index).is_some())
                    .await;
                matches(index).ok_or_else(|| IssueError::TokenPodGone {
                    pod: key.clone(),
                    uid: uid.to_string(),
                })?
            }
        };
        if pod.service_account.as_deref().unwrap_or("default") != account {
            return Err(invalid("the token's ServiceAccount is not the pod's"));
        }
        self.check_node(&pod, caller)?;
        Ok(pod)
    }

    /// A pod appeared or changed: prefetch its session, and tell a hostNetwork pod that
    /// names a role that it will not get it (once a day at most).
    pub fn on_pod(&self, pod: &PodInfo) {
        self.prefetch(pod);
        if pod.host_network
            && pod
                .annotations
                .role
                .as_deref()
                .is_some_and(|r| !r.trim().is_empty())
            && !self.inner.host_network_warned.contains_key(&pod.key)
        {
            self.inner.host_network_warned.insert(pod.key.clone(), ());
            self.inner.notifier.pod_warning(
                pod,
                "HostNetworkPodRole",
                format!(
                    "the pod uses the host network: its metadata requests come from the node and reach the node's own metadata service, so it gets the node's role, not {} = {:?}; run it without hostNetwork to use its role",
                    podiam_common::annotations::keys().role,
                    pod.annotations.role.as_deref().unwrap_or_default()
                ),
            );
        }
    }

    /// Queues a prefetch of `pod`'s session if it may have a role (a pod appeared or
    /// changed). Pods that are finished, unscheduled or denied are skipped.
    pub fn prefetch(&self, pod: &PodInfo) {
        for key in [self.prefetch_key(pod), self.pod_identity_prefetch_key(pod)]
            .into_iter()
            .flatten()
        {
            self.record_user(&key, &pod.key);
            self.inner.broker.prefetch(key);
        }
    }

    /// Queues every known pod's session behind the pods that appear meanwhile (the
    /// start-up sweep).
    pub fn prefetch_all(&self) {
        let pods = self.inner.index.pods().all();
        let mut queued = 0usize;
        for pod in pods {
            for key in [
                self.prefetch_key(&pod),
                self.pod_identity_prefetch_key(&pod),
            ]
            .into_iter()
            .flatten()
            {
                self.record_user(&key, &pod.key);
                self.inner.broker.prefetch_later(key);
                queued += 1;
            }
        }
        tracing::info!(sessions = queued, "start-up prefetch queued");
    }

    fn prefetch_key(&self, pod: &PodInfo) -> Option<SessionKey> {
        // On the index update path: no decision work when there is nothing to prefetch.
        if !self.inner.broker.prefetching() {
            return None;
        }
        self.metadata_key(pod)
    }

    /// The metadata path's session of `pod`, if it may have one now.
    fn metadata_key(&self, pod: &PodInfo) -> Option<SessionKey> {
        if !pod.claims_ips() || pod.node_name.is_none() {
            return None;
        }
        let namespace = self.inner.index.namespace(&pod.key.namespace)?;
        match Decision::for_pod(pod, Some(&namespace), &self.inner.policy) {
            Decision::Allowed(grant) => Some(self.session_key(pod, &grant)),
            Decision::Denied(_) => None,
        }
    }

    /// The container-credentials session of `pod`, if its ServiceAccount has a role it
    /// may have (nothing when the path is off: no ServiceAccount is then indexed).
    fn pod_identity_prefetch_key(&self, pod: &PodInfo) -> Option<SessionKey> {
        // Only pods the webhook gave the path: an IRSA-annotated ServiceAccount's other pods
        // would each cost a session they never ask for.
        if !pod.pod_identity || !self.inner.broker.prefetching() {
            return None;
        }
        self.container_key(pod)
    }

    /// The container-credentials path's session of `pod`, if its ServiceAccount has a
    /// role it may have now.
    fn container_key(&self, pod: &PodInfo) -> Option<SessionKey> {
        if pod.node_name.is_none() || matches!(pod.phase, PodPhase::Succeeded | PodPhase::Failed) {
            return None;
        }
        let account = account_of(pod);
        let role = self.inner.index.accounts().role_of(&account);
        if role == AccountRole::None {
            return None;
        }
        let namespace = self.inner.index.namespace(&pod.key.namespace)?;
        let decision = Decision::for_service_account(
            pod,
            &account,
            &role,
            Some(&namespace),
            &self.inner.policy,
        );
        decision.allowed().map(|grant| self.session_key(pod, grant))
    }

    async fn pod(&self, ip: IpAddr, caller: &Caller) -> Result<Arc<PodInfo>, IssueError> {
        let index = &self.inner.index;
        let found = match index.lookup_ip(ip, Duration::ZERO).await {
            IpLookup::NotFound => match self.waiting_slot(caller) {
                Some(_slot) => index.lookup_ip(ip, self.inner.lookup.wait).await,
                None => {
                    self.inner.metrics.shed.inc();
                    IpLookup::NotFound
                }
            },
            found => found,
        };
        let pod = match found {
            IpLookup::Found(pod) => pod,
            IpLookup::NotFound => {
                if let Some(node) = &caller.node {
                    self.inner.notifier.node_warning(
                        node,
                        "PodNotFound",
                        format!("a request for credentials came from {ip}, which no live pod has"),
                    );
                }
                return Err(IssueError::PodNotFound(ip));
            }
            IpLookup::Ambiguous(pods) => return Err(IssueError::AmbiguousIp { ip, pods }),
        };
        self.check_node(&pod, caller)?;
        Ok(pod)
    }

    /// The pod must be on the asking agent's node (with node binding).
    fn check_node(&self, pod: &PodInfo, caller: &Caller) -> Result<(), IssueError> {
        if let Some(node) = &caller.node
            && pod.node_name.as_deref() != Some(node.as_ref())
        {
            let err = IssueError::NodeMismatch {
                pod: pod.key.clone(),
                pod_node: pod.node_name.as_deref().map(Into::into),
                caller_node: node.to_string(),
            };
            self.inner.notifier.pod_warning(
                pod,
                "CredentialsRequestedFromOtherNode",
                err.to_string(),
            );
            return Err(err);
        }
        Ok(())
    }

    /// A place among the requests waiting for an unknown IP from `caller`'s node, if one
    /// is free; released when dropped.
    fn waiting_slot(&self, caller: &Caller) -> Option<WaitingSlot> {
        let mut waiting = self.inner.waiting.lock();
        let count = waiting.entry(caller.node.clone()).or_default();
        if *count >= self.inner.lookup.max_waiting {
            return None;
        }
        *count += 1;
        Some(WaitingSlot {
            issuer: self.clone(),
            node: caller.node.clone(),
        })
    }

    fn grant(&self, pod: &Arc<PodInfo>) -> Result<Grant, IssueError> {
        let namespace = self.inner.index.namespace(&pod.key.namespace);
        let decision = Decision::for_pod(pod, namespace.as_deref(), &self.inner.policy);
        self.allowed(pod, decision)
    }

    /// The grant, or the denial counted and told to the pod's Events.
    fn allowed(&self, pod: &PodInfo, decision: Decision) -> Result<Grant, IssueError> {
        match decision {
            Decision::Allowed(grant) => Ok(grant),
            Decision::Denied(denial) => {
                self.inner
                    .metrics
                    .denied
                    .with_label_values(&[denial.code()])
                    .inc();
                let err = IssueError::Forbidden {
                    pod: pod.key.clone(),
                    denial,
                };
                if let IssueError::Forbidden { denial, .. } = &err {
                    self.inner
                        .notifier
                        .pod_warning(pod, "CredentialsDenied", denial.to_string());
                }
                Err(err)
            }
        }
    }

    /// What the node feed tells an agent of `pod`, credentials aside, and the session
    /// to hand it when it may have one. Records no Event and no metric: an agent asks per
    /// request for a denied pod, and that request records them.
    pub fn feed_state(&self, pod: &PodInfo) -> (PodState, Option<(RoleArn, SessionKey)>) {
        let mut state = PodState {
            uid: pod.uid.map(|u| u.to_string()).unwrap_or_default(),
            namespace: pod.key.namespace.to_string(),
            name: pod.key.name.to_string(),
            ips: pod.ips.iter().map(|ip| ip.to_string()).collect(),
            ..PodState::default()
        };
        let namespace = self.inner.index.namespace(&pod.key.namespace);
        match Decision::for_pod(pod, namespace.as_deref(), &self.inner.policy) {
            Decision::Allowed(grant) => {
                let key = self.session_key(pod, &grant);
                state.role_arn = grant.role_arn.to_string();
                (state, Some((grant.role_arn, key)))
            }
            Decision::Denied(denial) => {
                state.denial = Some(feed::Denial::new(
                    ErrorCode::Forbidden,
                    format!("pod {}: {denial}", pod.key),
                ));
                (state, None)
            }
        }
    }

    /// The broker's credentials for `key` if it holds them with enough life left
    /// (marked as used, so that they are refreshed); no STS call.
    pub fn held_credentials(&self, pod: &PodInfo, key: &SessionKey) -> Option<Credentials> {
        self.record_user(key, &pod.key);
        self.inner.broker.held(key)
    }

    /// Asks for `pod`'s `key` to be fetched soon (prefetch, at the bounded rate); the
    /// broker's [`Issuer::fetched`] says when.
    pub fn fetch_soon(&self, pod: &PodInfo, key: SessionKey) {
        self.record_user(&key, &pod.key);
        self.inner.broker.prefetch(key);
    }

    /// Every session key the broker fetches from now on.
    pub fn fetched(&self) -> tokio::sync::broadcast::Receiver<SessionKey> {
        self.inner.broker.subscribe()
    }

    /// Drops what is remembered of pods no longer in the index (their audit pairs and
    /// hostNetwork warnings): a deleted pod's entries would otherwise stay for hours.
    pub fn forget_gone_pods(&self) {
        // One read of the index for the whole sweep (a few milliseconds at 100k pods,
        // every 4,096 new pairs), not one lock per remembered entry.
        let pods = self.inner.index.pods();
        let pairs = sweep(&self.inner.audited, |(pod, _)| pods.contains(pod));
        let warnings = sweep(&self.inner.host_network_warned, |pod| pods.contains(pod));
        let mut users = self.inner.users.lock();
        users.retain(|_, list| {
            list.retain(|pod| pods.contains(pod));
            !list.is_empty()
        });
        let keys: Vec<SessionKey> = users.keys().cloned().collect();
        drop(users);
        drop(pods);
        // And the pairs whose pod maps to another session now (an annotation changed):
        // without this, a pod whose annotations keep changing would keep adding sessions.
        for key in &keys {
            self.wants(key, true);
        }
        let sessions = self.inner.users.lock().len();
        tracing::debug!(pairs, warnings, sessions, "forgot pods gone from the index");
    }

    /// How many (pod, access key) pairs the audit log remembers (for tests and metrics).
    pub fn audited_pairs(&self) -> u64 {
        self.inner.audited.run_pending_tasks();
        self.inner.audited.entry_count()
    }

    /// Writes the audit line for credentials handed out for `pod` (once per key).
    pub fn audit_feed(&self, pod: &PodInfo, role: &RoleArn, credentials: &Credentials) {
        self.audit(pod, role, credentials);
    }

    /// The session for `pod` under `grant`.
    pub fn session_key(&self, pod: &PodInfo, grant: &Grant) -> SessionKey {
        let settings = &self.inner.sessions;
        let mut duration = grant.session_duration.unwrap_or(settings.default_duration);
        if settings.chained || grant.chained_from.is_some() {
            duration = duration.min(CHAINED_MAX);
        }
        let session_name = match (&grant.session_name, settings.scope) {
            // Namespace-prefixed by the policy; may need shortening to STS's 64.
            (Some(name), _) => sts_name(name),
            // Tagged with the pod: its own session whatever the scope.
            (None, _) if grant.pod_identity_tags => session_name(&pod.key),
            (None, SessionScope::Pod) => session_name(&pod.key),
            (None, SessionScope::Role) => role_session_name(&grant.role_arn),
        };
        let service_account_role = matches!(
            grant.role_source,
            RoleSource::ServiceAccount | RoleSource::Association
        );
        let tags: Arc<[(&'static str, String)]> = if grant.pod_identity_tags {
            self.pod_identity_tags(pod).into()
        } else if settings.tags && !service_account_role {
            // (An association with disableSessionTags gets none at all.)
            let mut tags = vec![
                ("kubernetes-namespace", tag_value(&pod.key.namespace)),
                ("kubernetes-pod-name", tag_value(&pod.key.name)),
            ];
            if let Some(sa) = &pod.service_account {
                tags.push(("kubernetes-service-account", tag_value(sa)));
            }
            tags.into()
        } else {
            Arc::new([])
        };
        SessionKey {
            role_arn: grant.role_arn.clone(),
            external_id: grant.external_id.as_deref().map(Into::into),
            session_name,
            duration,
            tags,
            transitive_tags: grant.pod_identity_tags,
            chained_from: grant.chained_from.clone(),
        }
    }

    /// The session tags EKS Pod Identity sets, so that ABAC policies written for it work
    /// unchanged (the cluster's only when configured).
    fn pod_identity_tags(&self, pod: &PodInfo) -> Vec<(&'static str, String)> {
        let settings = &self.inner.sessions;
        let mut tags = Vec::with_capacity(6);
        if let Some(arn) = &settings.cluster_arn {
            tags.push(("eks-cluster-arn", tag_value(arn)));
        }
        if let Some(name) = &settings.cluster_name {
            tags.push(("eks-cluster-name", tag_value(name)));
        }
        tags.push(("kubernetes-namespace", tag_value(&pod.key.namespace)));
        tags.push((
            "kubernetes-service-account",
            tag_value(pod.service_account.as_deref().unwrap_or("default")),
        ));
        tags.push(("kubernetes-pod-name", tag_value(&pod.key.name)));
        if let Some(uid) = pod.uid {
            tags.push(("kubernetes-pod-uid", uid.to_string()));
        }
        tags
    }

    fn audit(&self, pod: &PodInfo, role: &RoleArn, credentials: &Credentials) {
        let key = (pod.key.clone(), credentials.access_key_id.clone());
        if self.inner.audited.contains_key(&key) {
            return;
        }
        self.inner.audited.insert(key, ());
        let since = self
            .inner
            .audited_since_sweep
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if since + 1 >= AUDIT_SWEEP {
            self.inner
                .audited_since_sweep
                .store(0, std::sync::atomic::Ordering::Relaxed);
            self.forget_gone_pods();
        }
        tracing::info!(
            audit = true,
            pod.namespace = %pod.key.namespace,
            pod.name = %pod.key.name,
            pod.node = pod.node_name.as_deref().unwrap_or(""),
            role.arn = %role,
            access_key_id = %credentials.access_key_id,
            expiration = %humantime::format_rfc3339_seconds(credentials.expiration),
            "credentials issued"
        );
    }
}

// === impl IssuerMetrics ===

impl IssuerMetrics {
    /// Registers the metrics in `registry`.
    pub fn register(registry: &prometheus::Registry) -> prometheus::Result<Self> {
        let denied = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "podiam_denials_total",
                "Credential requests denied by policy, by reason (the codes of podiam-server explain)",
            ),
            &["reason"],
        )?;
        let shed = prometheus::IntCounter::new(
            "podiam_lookup_waits_shed_total",
            "Requests for an IP no pod has, answered at once because --max-waiting-lookups requests from the same node were already waiting",
        )?;
        registry.register(Box::new(denied.clone()))?;
        registry.register(Box::new(shed.clone()))?;
        Ok(Self { denied, shed })
    }
}

/// One request's place among those waiting for an unknown IP.
struct WaitingSlot {
    issuer: Issuer,
    node: Option<Arc<str>>,
}

impl Drop for WaitingSlot {
    fn drop(&mut self) {
        let mut waiting = self.issuer.inner.waiting.lock();
        if let Some(count) = waiting.get_mut(&self.node) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                waiting.remove(&self.node);
            }
        }
    }
}

/// Whether what the pod asked for names `role`: the full ARN, or the role's name as it
/// appears in the metadata URL.
/// `podiam-ROLE` for a session shared by every pod of the role (see [`sts_name`]).
pub fn role_session_name(role: &RoleArn) -> Arc<str> {
    sts_name(&format!("podiam-{}", role.name()))
}

/// `namespace.pod`, reduced to STS's `[\w+=,.@-]{2,64}` (see [`sts_name`]).
pub fn session_name(pod: &PodKey) -> Arc<str> {
    sts_name(&format!("{}.{}", pod.namespace, pod.name))
}

/// `raw` reduced to STS's `[\w+=,.@-]{2,64}`; a longer one keeps a hash of the whole so
/// that two long names do not share a session.
fn sts_name(raw: &str) -> Arc<str> {
    let mut name: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_+=,.@-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    if name.len() > MAX_SESSION_NAME {
        let digest = ring::digest::digest(&ring::digest::SHA256, raw.as_bytes());
        let hash: String = digest.as_ref()[..4]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        name.truncate(MAX_SESSION_NAME - hash.len() - 1);
        name.push('-');
        name.push_str(&hash);
    }
    name.into()
}

/// Tag values: `[\p{L}\p{Z}\p{N}_.:/=+\-@]{0,256}`; Kubernetes names already fit.
fn tag_value(value: &str) -> String {
    value.chars().take(256).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ns: &str, name: &str) -> PodKey {
        PodKey {
            namespace: ns.into(),
            name: name.into(),
        }
    }

    #[test]
    fn session_names_follow_sts_rules() {
        assert_eq!(&*session_name(&key("team-a", "web-0")), "team-a.web-0");
        let long = session_name(&key("a-very-long-namespace-name", &"p".repeat(60)));
        assert_eq!(long.len(), 64);
        let other = session_name(&key(
            "a-very-long-namespace-name",
            &format!("{}q", "p".repeat(59)),
        ));
        assert_ne!(long, other, "long names keep a hash of the whole");
        assert!(
            long.chars()
                .all(|c| c.is_ascii_alphanumeric() || "_+=,.@-".contains(c))
        );
    }

    #[test]
    fn role_scoped_sessions_are_named_after_the_role() {
        let role = RoleArn::parse("arn:aws:iam::123456789012:role/team/web").unwrap();
        assert_eq!(&*role_session_name(&role), "podiam-web");
        let long = RoleArn::parse(&format!(
            "arn:aws:iam::123456789012:role/{}",
            "r".repeat(64)
        ))
        .unwrap();
        assert_eq!(role_session_name(&long).len(), 64);
    }

    #[test]
    fn sweeping_drops_what_belongs_to_gone_pods() {
        let cache = moka::sync::Cache::new(100);
        for name in ["live", "gone-0", "gone-1"] {
            cache.insert((key("ns", name), "ASIA1".to_string()), ());
        }
        let live = key("ns", "live");
        assert_eq!(sweep(&cache, |(pod, _)| *pod == live), 2);
        cache.run_pending_tasks();
        assert_eq!(cache.entry_count(), 1);
        assert!(cache.contains_key(&(live, "ASIA1".to_string())));
    }

    #[test]
    fn requested_role_by_name_or_arn() {
        let role = RoleArn::parse("arn:aws:iam::123456789012:role/team/web").unwrap();
        assert!(role.answers_to("web"));
        assert!(role.answers_to("arn:aws:iam::123456789012:role/team/web"));
        assert!(!role.answers_to("admin"));
        assert!(!role.answers_to("team/web"));
        assert!(!role.answers_to("arn:aws:iam::123456789012:role/web"));
    }
}
