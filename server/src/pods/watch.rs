//! The watchers that feed the indexes.
//!
//! kube-runtime's watcher lists, then watches from the list's resourceVersion, resumes a
//! dropped watch from the last resourceVersion it saw, and re-lists when that is too old
//! (410 Gone). A re-list arrives as `Init`, `InitApply`... , `InitDone`: objects are
//! applied as they arrive, and only at `InitDone` are the ones that were not re-listed
//! removed. So a re-list never opens a window in which known pods vanish.

use std::{collections::HashSet, fmt::Debug, hash::Hash};

use futures::StreamExt;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, watcher},
};
use podiam_common::readiness::Gate;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use super::{
    ClusterIndex, PodKey,
    metrics::WatchMetrics,
    resources::{WatchedNamespace, WatchedPod},
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
pub type PodHook = std::sync::Arc<dyn Fn(&super::PodInfo) + Send + Sync>;

struct Pods(ClusterIndex, Option<PodHook>);
struct Namespaces(ClusterIndex);

/// Watches pods in all namespaces into `index`; opens `ready` after the first full list;
/// calls `on_pod` with each added or changed pod. Returns only when `shutdown` is
/// cancelled, or with an error if the stream ends.
pub async fn pods(
    client: Client,
    index: ClusterIndex,
    ready: Gate,
    metrics: WatchMetrics,
    on_pod: Option<PodHook>,
    shutdown: CancellationToken,
) -> Result<(), WatchEnded> {
    let api = Api::<WatchedPod>::all(client);
    run(api, Pods(index, on_pod), ready, metrics, shutdown).await
}

/// Watches namespaces into `index`; opens `ready` after the first full list.
pub async fn namespaces(
    client: Client,
    index: ClusterIndex,
    ready: Gate,
    metrics: WatchMetrics,
    shutdown: CancellationToken,
) -> Result<(), WatchEnded> {
    let api = Api::<WatchedNamespace>::all(client);
    run(api, Namespaces(index), ready, metrics, shutdown).await
}

async fn run<K, I>(
    api: Api<K>,
    indexer: I,
    ready: Gate,
    metrics: WatchMetrics,
    shutdown: CancellationToken,
) -> Result<(), WatchEnded>
where
    K: kube::Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    I: Indexer<K>,
{
    // `any_semantic`: the initial list may come from the API server's watch cache, which
    // is far cheaper for it at 100k pods; the watch then brings us up to date.
    let config = watcher::Config::default().any_semantic();
    let stream = watcher(api, config).default_backoff();
    let mut stream = std::pin::pin!(stream);
    let resource = I::RESOURCE;
    let count = |event: &str| metrics.events.with_label_values(&[resource, event]).inc();
    let mut relisting: Option<HashSet<I::Key>> = None;
    let mut lists = 0u64;
    loop {
        let event = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ok(()),
            event = stream.next() => event,
        };
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
