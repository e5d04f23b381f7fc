//! Metrics of the watches and the indexes. Index sizes are read at scrape time from the
//! index itself, so they cannot drift from it.

use prometheus::{
    IntCounterVec, IntGaugeVec, Opts, Registry,
    core::{Collector, Desc},
    proto::MetricFamily,
};

use super::ClusterIndex;

/// Counters of the watch streams, by resource (`pods`, `namespaces`).
#[derive(Clone, Debug)]
pub struct WatchMetrics {
    /// Events applied, by resource and type (apply, delete, init_apply).
    pub events: IntCounterVec,
    /// Watch errors (the watcher retries with backoff), by resource.
    pub errors: IntCounterVec,
    /// Re-lists after the first list (dropped watch with a stale resourceVersion, 410).
    pub restarts: IntCounterVec,
    /// 1 while a watch has been failing for longer than `--watch-stale-after` and the
    /// index is not trusted (the server is not ready until a re-list succeeds).
    pub stale: IntGaugeVec,
}

/// Scrape-time gauges over a [`ClusterIndex`].
#[derive(Debug)]
pub struct IndexCollector {
    index: ClusterIndex,
    descs: Vec<Desc>,
}

const GAUGES: [(&str, &str); 5] = [
    ("podiam_pod_index_pods", "Pods in the index"),
    ("podiam_pod_index_ips", "IPs claimed by live pods"),
    (
        "podiam_pod_index_ip_collisions",
        "IPs claimed by more than one live pod (requests from them are refused)",
    ),
    (
        "podiam_namespace_index_namespaces",
        "Namespaces in the index",
    ),
    (
        "podiam_namespace_index_policies",
        "Compiled namespace policies held (bounded; distinct policies beyond it are compiled on use)",
    ),
];

// === impl WatchMetrics ===

impl WatchMetrics {
    /// Registers the counters in `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let events = IntCounterVec::new(
            Opts::new(
                "podiam_watch_events_total",
                "Watch events applied to the index",
            ),
            &["resource", "event"],
        )?;
        let errors = IntCounterVec::new(
            Opts::new(
                "podiam_watch_errors_total",
                "Watch errors; the watch is retried with backoff",
            ),
            &["resource"],
        )?;
        let restarts = IntCounterVec::new(
            Opts::new(
                "podiam_watch_restarts_total",
                "Re-lists after the initial list (e.g. 410 Gone after a dropped watch)",
            ),
            &["resource"],
        )?;
        registry.register(Box::new(events.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        let stale = IntGaugeVec::new(
            Opts::new(
                "podiam_watch_stale",
                "1 while the watch has failed for longer than --watch-stale-after: the server answers not_ready until a re-list succeeds",
            ),
            &["resource"],
        )?;
        registry.register(Box::new(restarts.clone()))?;
        registry.register(Box::new(stale.clone()))?;
        Ok(Self {
            events,
            errors,
            restarts,
            stale,
        })
    }
}

// === impl IndexCollector ===

impl IndexCollector {
    /// Registers the index gauges in `registry`.
    pub fn register(registry: &Registry, index: ClusterIndex) -> prometheus::Result<()> {
        let descs = GAUGES
            .iter()
            .map(|(name, help)| {
                Desc::new(
                    name.to_string(),
                    help.to_string(),
                    vec![],
                    Default::default(),
                )
            })
            .collect::<prometheus::Result<Vec<_>>>()?;
        registry.register(Box::new(Self { index, descs }))
    }
}

impl Collector for IndexCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let values = {
            let pods = self.index.pods();
            let namespaces = self.index.namespaces();
            [
                pods.len(),
                pods.ip_count(),
                pods.collisions(),
                namespaces.len(),
                namespaces.policies(),
            ]
        };
        GAUGES
            .iter()
            .zip(values)
            .filter_map(|((name, help), value)| {
                let gauge = prometheus::IntGauge::new(*name, *help).ok()?;
                gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
                gauge.collect().pop()
            })
            .collect()
    }
}
