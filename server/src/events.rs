//! Kubernetes Warning Events for denials and STS failures, so that `kubectl describe pod`
//! shows why a pod gets no credentials.
//!
//! Events are rate-limited per (object, reason) and published by one background task from
//! a bounded queue: a flood of denied requests costs the API server at most one Event per
//! pod and reason per interval, and never blocks a request.

use std::{fmt, time::Duration};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    Client,
    runtime::events::{Event, EventType, Recorder, Reporter},
};
use prometheus::{IntCounterVec, Opts, Registry};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{credentials::Notifier, pods::PodInfo};

/// Publishes Events through the API server.
pub struct KubeEvents {
    queue: mpsc::Sender<(ObjectReference, &'static str, String)>,
    recent: moka::sync::Cache<(String, String, String, &'static str), ()>,
    published: IntCounterVec,
}

const QUEUE: usize = 1024;
/// The Events API limits notes to 1 kB.
const MAX_NOTE: usize = 1000;

// === impl KubeEvents ===

impl KubeEvents {
    /// Publishes as `podiam-server` (instance `instance`, e.g. the pod name), at most one
    /// Event per object and reason per `interval`.
    pub fn start(
        client: Client,
        instance: Option<String>,
        interval: Duration,
        registry: &Registry,
        shutdown: CancellationToken,
    ) -> prometheus::Result<Self> {
        let published = IntCounterVec::new(
            Opts::new(
                "podiam_events_total",
                "Kubernetes Events by result (published, failed, limited, dropped)",
            ),
            &["result"],
        )?;
        registry.register(Box::new(published.clone()))?;
        let (queue, mut rx) = mpsc::channel::<(ObjectReference, &'static str, String)>(QUEUE);
        let recorder = Recorder::new(
            client,
            Reporter {
                controller: "podiam-server".into(),
                instance,
            },
        );
        let counter = published.clone();
        tokio::spawn(async move {
            loop {
                let (reference, reason, note) = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    next = rx.recv() => match next {
                        Some(next) => next,
                        None => return,
                    },
                };
                let event = Event {
                    type_: EventType::Warning,
                    reason: reason.into(),
                    note: Some(note),
                    action: "IssueCredentials".into(),
                    secondary: None,
                };
                match recorder.publish(&event, &reference).await {
                    Ok(()) => counter.with_label_values(&["published"]).inc(),
                    Err(error) => {
                        counter.with_label_values(&["failed"]).inc();
                        tracing::debug!(%error, "publishing an Event failed");
                    }
                }
            }
        });
        Ok(Self {
            queue,
            recent: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(interval)
                .build(),
            published,
        })
    }

    fn send(&self, reference: ObjectReference, reason: &'static str, mut note: String) {
        let key = (
            reference.kind.clone().unwrap_or_default(),
            reference.namespace.clone().unwrap_or_default(),
            reference.name.clone().unwrap_or_default(),
            reason,
        );
        if self.recent.contains_key(&key) {
            self.published.with_label_values(&["limited"]).inc();
            return;
        }
        self.recent.insert(key, ());
        if note.len() > MAX_NOTE {
            let mut cut = MAX_NOTE;
            while !note.is_char_boundary(cut) {
                cut -= 1;
            }
            note.truncate(cut);
        }
        if self.queue.try_send((reference, reason, note)).is_err() {
            self.published.with_label_values(&["dropped"]).inc();
        }
    }
}

impl Notifier for KubeEvents {
    fn pod_warning(&self, pod: &PodInfo, reason: &'static str, note: String) {
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            namespace: Some(pod.key.namespace.to_string()),
            name: Some(pod.key.name.to_string()),
            uid: pod.uid.map(|u| u.to_string()),
            ..ObjectReference::default()
        };
        self.send(reference, reason, note);
    }

    fn node_warning(&self, node: &str, reason: &'static str, note: String) {
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(node.to_string()),
            ..ObjectReference::default()
        };
        self.send(reference, reason, note);
    }
}

impl fmt::Debug for KubeEvents {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubeEvents").finish_non_exhaustive()
    }
}
