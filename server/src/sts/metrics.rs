//! Broker metrics. Labels are bounded: call results, AWS error codes (a fixed set), no
//! role ARNs or pod names.

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    core::{Collector, Desc},
    proto::MetricFamily,
};

use super::Broker;

/// Counters and histograms of the STS broker.
#[derive(Clone, Debug)]
pub struct BrokerMetrics {
    /// `AssumeRole` calls by result (ok, error).
    pub calls: IntCounterVec,
    /// Failed calls by AWS error code.
    pub errors: IntCounterVec,
    /// Call latency.
    pub latency: Histogram,
    /// Calls in flight.
    pub inflight: IntGauge,
    /// Requests served from the cache.
    pub hits: IntCounter,
    /// Requests that needed a call (or waited for one).
    pub misses: IntCounter,
    /// Refresh-ahead attempts.
    pub refreshes: IntCounter,
    /// Prefetches dropped and refreshes skipped because no pod maps to the session now.
    pub unwanted: IntCounter,
    /// Prefetch requests waiting (never dropped: a queue that stays long says that
    /// `--prefetch-rate` is too low for the pods' churn).
    pub prefetch_queued: IntGauge,
}

impl BrokerMetrics {
    /// Registers the broker's metrics in `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let m = Self {
            calls: IntCounterVec::new(
                Opts::new("podiam_sts_calls_total", "AssumeRole calls by result"),
                &["result"],
            )?,
            errors: IntCounterVec::new(
                Opts::new(
                    "podiam_sts_errors_total",
                    "Failed AssumeRole calls by AWS error code",
                ),
                &["code"],
            )?,
            latency: Histogram::with_opts(
                HistogramOpts::new(
                    "podiam_sts_call_duration_seconds",
                    "AssumeRole latency, SDK retries included",
                )
                .buckets(vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ]),
            )?,
            inflight: IntGauge::new("podiam_sts_calls_in_flight", "AssumeRole calls in flight")?,
            hits: IntCounter::new(
                "podiam_credential_cache_hits_total",
                "Credential requests served from the cache",
            )?,
            misses: IntCounter::new(
                "podiam_credential_cache_misses_total",
                "Credential requests that needed an AssumeRole call",
            )?,
            refreshes: IntCounter::new(
                "podiam_credential_refreshes_total",
                "Refresh-ahead attempts for sessions in use",
            )?,
            unwanted: IntCounter::new(
                "podiam_credential_unwanted_total",
                "Prefetches dropped and refreshes skipped because no pod the index holds now \
                 maps to the session (deleted, role changed, or no longer permitted)",
            )?,
            prefetch_queued: IntGauge::new(
                "podiam_prefetch_queue_depth",
                "Prefetch requests waiting (delayed by --prefetch-rate, never dropped)",
            )?,
        };
        registry.register(Box::new(m.calls.clone()))?;
        registry.register(Box::new(m.errors.clone()))?;
        registry.register(Box::new(m.latency.clone()))?;
        registry.register(Box::new(m.inflight.clone()))?;
        registry.register(Box::new(m.hits.clone()))?;
        registry.register(Box::new(m.misses.clone()))?;
        registry.register(Box::new(m.refreshes.clone()))?;
        registry.register(Box::new(m.unwanted.clone()))?;
        registry.register(Box::new(m.prefetch_queued.clone()))?;
        Ok(m)
    }
}

/// The number of cached sessions, read from the cache at scrape time.
#[derive(Debug)]
pub struct SessionsCollector {
    broker: Broker,
    gauge: IntGauge,
}

impl SessionsCollector {
    /// Registers the gauge in `registry`.
    pub fn register(registry: &Registry, broker: Broker) -> prometheus::Result<()> {
        let gauge = IntGauge::new(
            "podiam_credential_cache_sessions",
            "Sessions (credential sets) in the cache",
        )?;
        registry.register(Box::new(Self { broker, gauge }))
    }
}

impl Collector for SessionsCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.gauge.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.gauge
            .set(i64::try_from(self.broker.sessions()).unwrap_or(i64::MAX));
        self.gauge.collect()
    }
}
