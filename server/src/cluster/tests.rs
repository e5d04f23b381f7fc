use std::time::Duration;

use super::*;
use crate::pods::testing::{ip, key, mk_pod};

#[tokio::test(start_paused = true)]
async fn lookup_waits_for_the_index_then_gives_up() {
    let cluster = ClusterIndex::new(None);
    // Nothing arrives: NotFound after the bounded wait (paused time makes this instant).
    let started = tokio::time::Instant::now();
    let miss = cluster
        .lookup_ip(ip("10.0.0.9"), Duration::from_secs(3))
        .await;
    assert_eq!(miss, IpLookup::NotFound);
    assert_eq!(started.elapsed(), Duration::from_secs(3));

    // The pod arrives while the lookup waits: the index wakes it.
    let waiting = tokio::spawn({
        let cluster = cluster.clone();
        async move {
            cluster
                .lookup_ip(ip("10.0.0.9"), Duration::from_secs(3))
                .await
        }
    });
    tokio::task::yield_now().await;
    cluster.update_pods(|idx| idx.apply(mk_pod("ns", "late", &["10.0.0.9"])));
    let started = tokio::time::Instant::now();
    match waiting.await.unwrap() {
        IpLookup::Found(pod) => assert_eq!(pod.key, key("ns", "late")),
        other => panic!("{other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(3));
}
