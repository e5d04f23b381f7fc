//! The watchers that feed the indexes.
//!
//! kube-runtime's watcher lists, then watches from the list's resourceVersion, resumes a
//! dropped watch from the last resourceVersion it saw, and re-lists when that is too old
//! (410 Gone). A re-list arrives as `Init`, `InitApply`... , `InitDone`: objects are
//! applied as they arrive, and only at `InitDone` are the ones that were not re-listed
//! removed. So a re-list never opens a window in which known pods vanish.
//!
//! An index that stopped changing because its watch fails is not answered from: once the
//! watch has failed for longer than `stale_after` with no successful list or event in
//! between (API server unreachable, 403 after an RBAC change), the readiness gate closes
//! (the API answers `not_ready` and agents turn to another replica) and the watch starts
//! over with a fresh list; the gate opens again when that list is complete. Otherwise a pod
//! deleted during the outage would keep its IP in the index, and a new pod on that IP
//! would be answered with the old pod's role.
//!
//! Only a completed list or a watch event proves the index current: the watcher's `Init`
//! comes before its list request, and a re-list whose pages come and then fail proves
//! nothing. A watch that re-established quietly after one error sends nothing either, so
//! at the bound the API server is probed with a one-item list first: if that answers, the
//! watch starts over with a fresh list while the index keeps serving (as after a 410), and
//! only if it fails too does the server stop answering.

use std::{collections::HashSet, fmt::Debug, hash::Hash, time::Duration};

use futures::StreamExt;
use kube::{
    Api, Client,
    api::ListParams,
    runtime::{WatchStreamExt, watcher},
};
use podiam_common::readiness::Gate;
use serde::de::DeserializeOwned;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{ClusterIndex, metrics::WatchMetrics};
use crate::{
    accounts::{
        AccountKey,
        resources::{WatchedAssociation, WatchedServiceAccount},
    },
    pods::{
        PodInfo, PodKey,
        resources::{WatchedNamespace, WatchedPod},
    },
};

/// The watch stream ended, which kube-runtime's watcher never does on its own.
#[derive(Debug, thiserror::Error)]
#[error("the {0} watch stream ended")]
pub struct WatchEnded(&'static str);

/// How one kind of object goes into the index.
trait Indexer<K>: Send {
    type Key: Hash + Eq + Send;
    const RESOURCE: &'static str;
    fn apply(&self, obj: K) -> Option<Self::Key>;
    fn delete(&self, obj: K);
    fn retain(&self, keep: &HashSet<Self::Key>) -> usize;
    fn len(&self) -> usize;
}

/// Called with every pod as stored after an add or change (e.g. to prefetch its session).
pub type PodHook = std::sync::Arc<dyn Fn(&PodInfo) + Send + Sync>;

struct Pods(ClusterIndex, Option<PodHook>);
struct Namespaces(ClusterIndex);
struct ServiceAccounts(ClusterIndex);
struct Associations(ClusterIndex);

/// How a watcher runs.
#[derive(Debug)]
pub struct WatchSettings {
    /// Readiness: open while the index can be answered from.
    pub ready: Gate,
    /// Its metrics.
    pub metrics: WatchMetrics,
    /// How long the watch may fail before the index is no longer trusted.
    pub stale_after: Duration,
    /// Stops the watch.
    pub shutdown: CancellationToken,
}

/// Watches pods in all namespaces into `index`; opens the gate after each full list;
/// calls `on_pod` with each added or changed pod. Returns only when shut down, or with an
/// error if the stream ends.
pub async fn pods(
    client: Client,
    index: ClusterIndex,
    on_pod: Option<PodHook>,
    settings: WatchSettings,
) -> Result<(), WatchEnded> {
    let api = Api::<WatchedPod>::all(client);
    run(api, Pods(index, on_pod), settings).await
}

/// Watches namespaces into `index`; opens the gate after each full list.
pub async fn namespaces(
    client: Client,
    index: ClusterIndex,
    settings: WatchSettings,
) -> Result<(), WatchEnded> {
    let api = Api::<WatchedNamespace>::all(client);
    run(api, Namespaces(index), settings).await
}

/// Watches ServiceAccounts (for their role annotation) into `index`.
pub async fn service_accounts(
    client: Client,
    index: ClusterIndex,
    settings: WatchSettings,
) -> Result<(), WatchEnded> {
    let api = Api::<WatchedServiceAccount>::all(client);
    run(api, ServiceAccounts(index), settings).await
}

/// Watches `PodIdentityAssociation` objects into `index`.
pub async fn associations(
    client: Client,
    index: ClusterIndex,
    settings: WatchSettings,
) -> Result<(), WatchEnded> {
    let api = Api::<WatchedAssociation>::all(client);
    run(api, Associations(index), settings).await
}

async fn run<K, I>(api: Api<K>, indexer: I, settings: WatchSettings) -> Result<(), WatchEnded>
where
    K: kube::Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    I: Indexer<K>,
{
    let WatchSettings {
        ready,
        metrics,
        stale_after,
        shutdown,
    } = settings;
    // `any_semantic`: the initial list may come from the API server's watch cache, which
    // is far cheaper for it at 100k pods; the watch then brings us up to date.
    let config = watcher::Config::default().any_semantic();
    let start = || {
        watcher(api.clone(), config.clone())
            .default_backoff()
            .boxed()
    };
    let mut stream = start();
    let resource = I::RESOURCE;
    let count = |event: &str| metrics.events.with_label_values(&[resource, event]).inc();
    let stale_gauge = metrics.stale.with_label_values(&[resource]);
    let mut relisting: Option<HashSet<I::Key>> = None;
    let mut lists = 0u64;
    // When the watch started failing, with no success since; whether the index is stale.
    let mut failing_since: Option<Instant> = None;
    let mut stale = false;
    // Whether the probe already bought the failing watch one more bound.
    let mut probed = false;
    loop {
        let stale_at = failing_since
            .filter(|_| !stale)
            .map(|since| since + stale_after);
        let event = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ok(()),
            _ = sleep_until(stale_at) => {
                // A fresh watcher starts with a full list.
                stream = start();
                relisting = None;
                let answers = !probed
                    && tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        answers = probe(&api) => answers,
                    };
                if answers {
                    // Reachable and allowed: the watch most likely came back without a word.
                    // The fresh list gets one more bound to complete while the index keeps
                    // serving; a probe proves nothing about the index, so there is no second.
                    probed = true;
                    failing_since = Some(Instant::now());
                    tracing::info!(resource, "the watch failed earlier, and the API server answers now: re-listing");
                    continue;
                }
                stale = true;
                stale_gauge.set(1);
                ready.close();
                tracing::error!(
                    resource,
                    failing_for = ?stale_after,
                    "the watch has been failing for too long: not answering from a stale index until a re-list succeeds"
                );
                continue;
            }
            event = stream.next() => event,
        };
        match &event {
            Some(Err(_)) => {
                failing_since.get_or_insert_with(Instant::now);
            }
            // Proofs that the index is current; `Init` and list pages are not.
            Some(Ok(
                watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitDone,
            )) if !stale => {
                failing_since = None;
                probed = false;
            }
            _ => {}
        }
        match event {
            None => return Err(WatchEnded(resource)),
            Some(Err(error)) => {
                metrics.errors.with_label_values(&[resource]).inc();
                tracing::warn!(resource, %error, "watch failed; retrying with backoff");
            }
            Some(Ok(watcher::Event::Init)) => {
                if lists > 0 {
                    metrics.restarts.with_label_values(&[resource]).inc();
                    tracing::info!(
                        resource,
                        "re-listing; known objects stay until it completes"
                    );
                }
                relisting = Some(HashSet::new());
            }
            Some(Ok(watcher::Event::InitApply(obj))) => {
                count("init_apply");
                if let Some(key) = indexer.apply(obj)
                    && let Some(seen) = relisting.as_mut()
                {
                    seen.insert(key);
                }
            }
            Some(Ok(watcher::Event::InitDone)) => {
                let removed = relisting.take().map_or(0, |seen| indexer.retain(&seen));
                lists += 1;
                tracing::info!(resource, objects = indexer.len(), removed, "list complete");
                if stale {
                    stale = false;
                    failing_since = None;
                    probed = false;
                    stale_gauge.set(0);
                    tracing::info!(
                        resource,
                        "re-listed after the watch failures: answering again"
                    );
                }
                ready.open();
            }
            Some(Ok(watcher::Event::Apply(obj))) => {
                count("apply");
                indexer.apply(obj);
            }
            Some(Ok(watcher::Event::Delete(obj))) => {
                count("delete");
                indexer.delete(obj);
            }
        }
    }
}

/// Whether the API server answers a one-item list of the resource (within 5 s).
async fn probe<K>(api: &Api<K>) -> bool
where
    K: kube::Resource + Clone + DeserializeOwned + Debug,
{
    let params = ListParams::default().limit(1);
    let list = api.list(&params);
    matches!(
        tokio::time::timeout(Duration::from_secs(5), list).await,
        Ok(Ok(_))
    )
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

// === impl Pods ===

impl Indexer<WatchedPod> for Pods {
    type Key = PodKey;
    const RESOURCE: &'static str = "pods";

    fn apply(&self, pod: WatchedPod) -> Option<PodKey> {
        match pod.into_info() {
            Ok(info) => {
                let key = info.key.clone();
                let stored = self.0.update_pods(|idx| idx.apply(info));
                if let Some(hook) = &self.1 {
                    hook(&stored);
                }
                Some(key)
            }
            Err(error) => {
                tracing::warn!(%error, "ignoring pod");
                None
            }
        }
    }

    fn delete(&self, pod: WatchedPod) {
        if let Ok(key) = pod.key() {
            self.0.update_pods(|idx| idx.delete(&key));
        }
    }

    fn retain(&self, keep: &HashSet<PodKey>) -> usize {
        self.0.update_pods(|idx| idx.retain(keep))
    }

    fn len(&self) -> usize {
        self.0.pods().len()
    }
}

// === impl Namespaces ===

impl Indexer<WatchedNamespace> for Namespaces {
    type Key = std::sync::Arc<str>;
    const RESOURCE: &'static str = "namespaces";

    fn apply(&self, ns: WatchedNamespace) -> Option<Self::Key> {
        let Ok(name) = ns.name() else {
            tracing::warn!("ignoring namespace without a name");
            return None;
        };
        let (permitted, allowed) = ns.policy_annotations();
        self.0
            .update_namespaces(|idx| idx.apply(name, permitted, allowed));
        Some(name.into())
    }

    fn delete(&self, ns: WatchedNamespace) {
        if let Ok(name) = ns.name() {
            self.0.update_namespaces(|idx| idx.delete(name));
        }
    }

    fn retain(&self, keep: &HashSet<Self::Key>) -> usize {
        self.0.update_namespaces(|idx| idx.retain(keep))
    }

    fn len(&self) -> usize {
        self.0.namespaces().len()
    }
}

// === impl ServiceAccounts ===

impl Indexer<WatchedServiceAccount> for ServiceAccounts {
    type Key = AccountKey;
    const RESOURCE: &'static str = "serviceaccounts";

    fn apply(&self, sa: WatchedServiceAccount) -> Option<AccountKey> {
        let Ok(key) = sa.key() else {
            tracing::warn!("ignoring a ServiceAccount without a namespace or name");
            return None;
        };
        let role = sa.role().map(Into::into);
        self.0
            .update_accounts(|idx| idx.apply_account(key.clone(), role));
        Some(key)
    }

    fn delete(&self, sa: WatchedServiceAccount) {
        if let Ok(key) = sa.key() {
            self.0.update_accounts(|idx| idx.delete_account(&key));
        }
    }

    fn retain(&self, keep: &HashSet<AccountKey>) -> usize {
        self.0.update_accounts(|idx| idx.retain_accounts(keep))
    }

    fn len(&self) -> usize {
        self.0.accounts().annotated_len()
    }
}

// === impl Associations ===

impl Indexer<WatchedAssociation> for Associations {
    type Key = AccountKey;
    const RESOURCE: &'static str = "podidentityassociations";

    fn apply(&self, association: WatchedAssociation) -> Option<AccountKey> {
        let key = association.key().ok();
        match association.into_association() {
            Ok(association) => {
                self.0
                    .update_accounts(|idx| idx.apply_association(association));
            }
            Err(error) => {
                // An incomplete object gives no role; one it replaces gives none either.
                tracing::warn!(%error, "ignoring PodIdentityAssociation");
                if let Some(key) = &key {
                    self.0.update_accounts(|idx| idx.delete_association(key));
                }
            }
        }
        key
    }

    fn delete(&self, association: WatchedAssociation) {
        if let Ok(key) = association.key() {
            self.0.update_accounts(|idx| idx.delete_association(&key));
        }
    }

    fn retain(&self, keep: &HashSet<AccountKey>) -> usize {
        self.0.update_accounts(|idx| idx.retain_associations(keep))
    }

    fn len(&self) -> usize {
        self.0.accounts().associations_len()
    }
}
