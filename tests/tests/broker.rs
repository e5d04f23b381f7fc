//! The STS broker with paused time: refresh ahead, the 15-minute floor, single flight,
//! negative caching, prefetch overflow. The STS here is a test double
//! (`podiam_tests::fake_sts`); the broker against real STS semantics (moto) is covered by
//! the server's API tests.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, SystemTime},
};

use podiam_server::sts::{Broker, BrokerConfig, SessionKey, metrics::BrokerMetrics};
use podiam_tests::fake_sts::{FakeSts, TokioClock};
use prometheus::Registry;
use tokio_util::sync::CancellationToken;

const MIN: Duration = Duration::from_secs(60);

struct Setup {
    broker: Broker,
    sts: Arc<FakeSts>,
    metrics: BrokerMetrics,
    _shutdown: tokio_util::sync::DropGuard,
}

fn setup(delay: Duration, config: BrokerConfig) -> Setup {
    let clock = Arc::new(TokioClock::new());
    let sts = Arc::new(FakeSts::new(clock.clone(), delay));
    let metrics = BrokerMetrics::register(&Registry::new()).unwrap();
    let shutdown = CancellationToken::new();
    let broker = Broker::new(
        sts.clone(),
        clock,
        config,
        metrics.clone(),
        shutdown.clone(),
    );
    Setup {
        broker,
        sts,
        metrics,
        _shutdown: shutdown.drop_guard(),
    }
}

fn key(name: &str) -> SessionKey {
    SessionKey {
        role_arn: format!("arn:aws:iam::123456789012:role/{name}")
            .parse()
            .unwrap(),
        external_id: None,
        session_name: format!("ns.{name}").into(),
        duration: 60 * MIN,
        tags: Arc::new([]),
        transitive_tags: false,
        chained_from: None,
    }
}

fn calls(s: &Setup) -> u64 {
    s.sts.calls.load(Ordering::SeqCst)
}

/// Lets spawned tasks (refresh timers, prefetch) run at the current paused instant.
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn refreshes_ahead_only_sessions_in_use() {
    let s = setup(Duration::ZERO, BrokerConfig::default());
    let first = s.broker.credentials(&key("used")).await.unwrap();
    s.broker.prefetch(key("idle"));
    settle().await;
    assert_eq!(calls(&s), 2);
    // Prefetching an already warm session (every pod event does) must not mark it used.
    s.broker.prefetch(key("idle"));
    settle().await;

    // 20 minutes before expiry the used session is refreshed, the idle one is not.
    tokio::time::sleep(41 * MIN).await;
    settle().await;
    assert_eq!(calls(&s), 3, "exactly one refresh");
    let refreshed = s.broker.credentials(&key("used")).await.unwrap();
    assert_ne!(refreshed.access_key_id, first.access_key_id);
    assert_eq!(s.metrics.refreshes.get(), 1);

    // The refreshed session is used again, so it is refreshed again 40 minutes later.
    tokio::time::sleep(40 * MIN).await;
    settle().await;
    assert_eq!(calls(&s), 4);
}

#[tokio::test(start_paused = true)]
async fn never_serves_under_15_minutes_and_serves_valid_ones_while_refresh_fails() {
    let s = setup(Duration::ZERO, BrokerConfig::default());
    let first = s.broker.credentials(&key("web")).await.unwrap();
    s.sts.failing.store(true, Ordering::SeqCst);

    // 44 minutes in: the refresh (at 40) failed and is being retried; 16 minutes are left,
    // so the old credentials are still handed out.
    tokio::time::sleep(44 * MIN).await;
    settle().await;
    assert!(calls(&s) >= 2, "a refresh was attempted");
    let still = s.broker.credentials(&key("web")).await.unwrap();
    assert_eq!(still.access_key_id, first.access_key_id);

    // 46 minutes in: 14 minutes left. They are never handed out; the fresh call fails.
    tokio::time::sleep(2 * MIN).await;
    let err = s.broker.credentials(&key("web")).await.unwrap_err();
    assert_eq!(err.code(), "Throttling");

    // STS recovers: the next request gets new credentials with a full hour.
    s.sts.failing.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(10)).await; // past the negative cache
    let fresh = s.broker.credentials(&key("web")).await.unwrap();
    let left = fresh
        .expiration
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    assert!(left >= 15 * MIN, "{left:?}");
    assert_ne!(fresh.access_key_id, first.access_key_id);
}

#[tokio::test(start_paused = true)]
async fn one_call_per_key_even_when_callers_give_up() {
    let s = setup(Duration::from_secs(1), BrokerConfig::default());
    let impatient = tokio::spawn({
        let b = s.broker.clone();
        async move { b.credentials(&key("web")).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    impatient.abort();
    let waiting: Vec<_> = (0..50)
        .map(|_| {
            let b = s.broker.clone();
            tokio::spawn(async move { b.credentials(&key("web")).await })
        })
        .collect();
    let mut keys = std::collections::HashSet::new();
    for w in waiting {
        keys.insert(w.await.unwrap().unwrap().access_key_id);
    }
    assert_eq!(keys.len(), 1);
    assert_eq!(
        calls(&s),
        1,
        "the aborted caller's call was shared, not restarted"
    );
}

#[tokio::test(start_paused = true)]
async fn failures_are_remembered_briefly() {
    let s = setup(Duration::ZERO, BrokerConfig::default());
    s.sts.failing.store(true, Ordering::SeqCst);
    assert!(s.broker.credentials(&key("web")).await.is_err());
    assert!(s.broker.credentials(&key("web")).await.is_err());
    assert_eq!(calls(&s), 1, "the second request hit the negative cache");
    tokio::time::sleep(Duration::from_secs(6)).await;
    s.sts.failing.store(false, Ordering::SeqCst);
    assert!(s.broker.credentials(&key("web")).await.is_ok());
    assert_eq!(calls(&s), 2);
    assert_eq!(s.metrics.errors.with_label_values(&["Throttling"]).get(), 1);
}

#[tokio::test(start_paused = true)]
async fn prefetch_never_drops_and_serves_new_pods_before_the_sweep() {
    let config = BrokerConfig {
        prefetch_concurrency: 1,
        prefetch_rate: None,
        ..BrokerConfig::default()
    };
    let s = setup(Duration::from_secs(1), config);
    let mut fetched = s.broker.subscribe();
    // The sweep queues many; a pod that appears meanwhile goes first among the waiting.
    for i in 0..50 {
        s.broker.prefetch_later(key(&format!("sweep{i}")));
    }
    s.broker.prefetch(key("new"));
    // Queued twice, fetched once.
    s.broker.prefetch(key("new"));
    let mut order = Vec::new();
    while order.len() < 51 {
        let k = tokio::time::timeout(Duration::from_secs(3600), fetched.recv())
            .await
            .unwrap()
            .unwrap();
        order.push(k.session_name.to_string());
    }
    // At most one sweep key was taken before "new" was queued behind the running one.
    let new_at = order.iter().position(|k| k.contains("new")).unwrap();
    assert!(new_at <= 1, "{order:?}");
    // Every key, once: nothing dropped, nothing twice.
    assert_eq!(calls(&s), 51);
    assert_eq!(s.metrics.prefetch_queued.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_prefetch_that_fails_for_a_passing_reason_is_tried_again() {
    let s = setup(Duration::ZERO, BrokerConfig::default());
    let mut fetched = s.broker.subscribe();
    // Throttled at start-up: the sweep's key is not lost.
    s.sts.failing.store(true, Ordering::SeqCst);
    s.broker.prefetch_later(key("web"));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(calls(&s), 1);
    assert!(s.broker.held(&key("web")).is_none());
    // Throttled again at the first retry, then STS recovers.
    tokio::time::sleep(Duration::from_secs(9)).await;
    assert_eq!(calls(&s), 2, "tried again after the backoff");
    s.sts.failing.store(false, Ordering::SeqCst);
    let k = tokio::time::timeout(Duration::from_secs(60), fetched.recv())
        .await
        .expect("fetched again within a minute")
        .unwrap();
    assert_eq!(k, key("web"));
    assert!(s.broker.held(&key("web")).is_some());
    assert_eq!(calls(&s), 3);
    assert_eq!(s.metrics.prefetch_queued.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_prefetch_refused_or_failing_for_good_is_not_tried_forever() {
    let s = setup(Duration::ZERO, BrokerConfig::default());
    // A refusal is not retried by prefetch: the pod's own request will ask.
    s.sts.refusing.store(true, Ordering::SeqCst);
    s.broker.prefetch(key("denied"));
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert_eq!(calls(&s), 1);
    // Throttling without end: a bounded number of attempts, then it gives up.
    s.sts.refusing.store(false, Ordering::SeqCst);
    s.sts.failing.store(true, Ordering::SeqCst);
    s.broker.prefetch(key("throttled"));
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert_eq!(
        calls(&s),
        1 + u64::from(podiam_server::sts::PREFETCH_ATTEMPTS)
    );
    assert_eq!(s.metrics.prefetch_queued.get(), 0);
}
