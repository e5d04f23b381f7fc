//! The server's pod and namespace watchers (real kube-runtime, real kube client) against
//! the stand-in API server: the index follows the cluster through churn, IP reuse,
//! collisions, dropped watches and 410 re-lists.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use podiam_server::{pods::IpLookup, policy::Decision};
use podiam_tests::{
    kube_api::{FakeKube, Kind},
    objects::{namespace, pod},
};
use support::{Harness, arn, owner};

const PERMITTED: &str = "iam.amazonaws.com/permitted";
const ALLOWED: &str = "iam.amazonaws.com/allowed-roles";

async fn cluster() -> Harness {
    let kube = FakeKube::start().await.unwrap();
    kube.apply(namespace("team-a", &[(PERMITTED, &arn("web.*"))]));
    kube.apply(namespace("team-b", &[(ALLOWED, r#"["batch"]"#)]));
    kube.apply(pod("team-a", "web-0").ip("10.0.0.1").role("web").build());
    let h = Harness::start(kube).await;
    h.ready().await;
    h
}

#[tokio::test]
async fn initial_list_then_add_modify_delete() {
    let h = cluster().await;
    assert_eq!(h.owner("10.0.0.1").as_deref(), Some("team-a/web-0"));
    assert_eq!(h.index.namespaces().len(), 2);

    // Added with no IP, then the IP is assigned (as the kubelet does).
    h.kube
        .apply(pod("team-a", "web-1").role("web").phase("Pending").build());
    h.until("web-1 indexed", |i| i.pods().len() == 2).await;
    assert_eq!(h.owner("10.0.0.2"), None);
    h.kube
        .apply(pod("team-a", "web-1").role("web").ip("10.0.0.2").build());
    h.until("web-1 IP", |i| owner(i, "10.0.0.2").is_some())
        .await;
    assert_eq!(h.owner("10.0.0.2").as_deref(), Some("team-a/web-1"));

    // Annotation changed: the decision follows.
    assert_eq!(
        h.decide("10.0.0.2").allowed().unwrap().role_arn.as_str(),
        arn("web")
    );
    h.kube
        .apply(pod("team-a", "web-1").role("admin").ip("10.0.0.2").build());
    h.until("annotation change", |i| {
        matches!(i.pods().lookup_ip("10.0.0.2".parse().unwrap()),
            IpLookup::Found(p) if p.annotations.role.as_deref() == Some("admin"))
    })
    .await;
    match h.decide("10.0.0.2") {
        Decision::Denied(d) => assert_eq!(d.code(), "role_not_permitted"),
        other => panic!("{other:?}"),
    }

    // Deleted.
    assert!(h.kube.delete_pod("team-a", "web-1"));
    h.until("web-1 deleted", |i| i.pods().len() == 1).await;
    assert_eq!(h.owner("10.0.0.2"), None);
}

#[tokio::test]
async fn ip_reused_by_a_new_pod_after_the_old_one_finished() {
    let h = cluster().await;
    h.kube
        .apply(pod("team-b", "job-1").role("batch").ip("10.0.1.1").build());
    h.until("job-1", |i| owner(i, "10.0.1.1").is_some()).await;
    h.kube.apply(
        pod("team-b", "job-1")
            .role("batch")
            .ip("10.0.1.1")
            .phase("Succeeded")
            .build(),
    );
    h.until("job-1 finished", |i| owner(i, "10.0.1.1").is_none())
        .await;
    // The finished pod is still in the API (not yet garbage-collected) when the IP is reused.
    h.kube
        .apply(pod("team-a", "web-9").role("web").ip("10.0.1.1").build());
    h.until("new owner", |i| owner(i, "10.0.1.1").is_some())
        .await;
    assert_eq!(h.owner("10.0.1.1").as_deref(), Some("team-a/web-9"));
    assert_eq!(
        h.decide("10.0.1.1").allowed().unwrap().role_arn.as_str(),
        arn("web")
    );
    // The old pod's deletion leaves the new owner alone.
    h.kube.delete_pod("team-b", "job-1");
    h.until("job-1 gone", |i| i.pods().len() == 2).await;
    assert_eq!(h.owner("10.0.1.1").as_deref(), Some("team-a/web-9"));
}

#[tokio::test]
async fn two_live_pods_claiming_one_ip_are_ambiguous() {
    let h = cluster().await;
    h.kube.apply(
        pod("team-b", "intruder")
            .role("batch")
            .ip("10.0.0.1")
            .build(),
    );
    h.until("collision", |i| i.pods().collisions() == 1).await;
    match h.index.pods().lookup_ip("10.0.0.1".parse().unwrap()) {
        IpLookup::Ambiguous(keys) => assert_eq!(keys.len(), 2),
        other => panic!("expected ambiguity, got {other:?}"),
    }
    h.kube.delete_pod("team-b", "intruder");
    h.until("resolved", |i| i.pods().collisions() == 0).await;
    assert_eq!(h.owner("10.0.0.1").as_deref(), Some("team-a/web-0"));
}

#[tokio::test]
async fn host_network_pods_are_never_found_by_ip() {
    let h = cluster().await;
    h.kube.apply(
        pod("team-a", "node-agent")
            .role("web")
            .ip("192.0.2.7")
            .host_network()
            .build(),
    );
    h.until("indexed", |i| i.pods().len() == 2).await;
    assert_eq!(h.owner("192.0.2.7"), None);
}

#[tokio::test]
async fn namespace_policy_changed_at_runtime() {
    let h = cluster().await;
    assert!(h.decide("10.0.0.1").allowed().is_some());
    h.kube
        .apply(namespace("team-a", &[(PERMITTED, &arn("db"))]));
    h.until("policy change", |i| {
        i.namespace("team-a")
            .is_some_and(|ns| ns.policy.check(&arn("web").parse().unwrap()).is_err())
    })
    .await;
    assert!(
        matches!(h.decide("10.0.0.1"), Decision::Denied(d) if d.code() == "role_not_permitted")
    );
    // kube2iam's annotation added beside kiam's permits it again.
    h.kube.apply(namespace(
        "team-a",
        &[(PERMITTED, &arn("db")), (ALLOWED, r#"["web"]"#)],
    ));
    h.until("allowed-roles", |i| {
        i.namespace("team-a")
            .is_some_and(|ns| ns.policy.check(&arn("web").parse().unwrap()).is_ok())
    })
    .await;
    assert!(h.decide("10.0.0.1").allowed().is_some());
    // Namespace deleted: nothing is permitted.
    h.kube.delete(Kind::Namespace, "", "team-a");
    h.until("namespace gone", |i| i.namespace("team-a").is_none())
        .await;
    assert!(
        matches!(h.decide("10.0.0.1"), Decision::Denied(d) if d.code() == "namespace_not_found")
    );
}

#[tokio::test]
async fn dropped_watch_resumes_without_relisting_or_losing_changes() {
    let h = cluster().await;
    let lists = h.kube.lists(Kind::Pod);
    let watches = h.kube.watches();
    h.kube.drop_watches();
    // Changes while the watches are down are replayed from history on resume.
    h.kube
        .apply(pod("team-a", "web-2").role("web").ip("10.0.0.3").build());
    h.kube.delete_pod("team-a", "web-0");
    assert!(
        h.kube.wait_watches(watches + 2).await,
        "watches not re-opened"
    );
    h.until("changes replayed", |i| {
        owner(i, "10.0.0.3").is_some() && owner(i, "10.0.0.1").is_none()
    })
    .await;
    assert_eq!(
        h.kube.lists(Kind::Pod),
        lists,
        "a resumable watch must not re-list"
    );
    assert_eq!(h.restarts("pods"), 0);
}

#[tokio::test]
async fn relist_after_410_loses_no_pods_and_opens_no_window() {
    let h = cluster().await;
    for i in 0..50 {
        h.kube.apply(
            pod("team-a", &format!("p-{i}"))
                .role("web")
                .ip(&format!("10.1.0.{i}"))
                .build(),
        );
    }
    h.until("50 more pods", |i| i.pods().len() == 51).await;
    // Bookmarks advance the client's resourceVersion without objects changing.
    h.kube.bookmark();

    // The watches drop and stay down while the cluster changes and history is compacted
    // past the client's resourceVersion: resuming gets 410 and must re-list.
    let lists = h.kube.lists(Kind::Pod);
    let watches = h.kube.watches();
    let hold_watches = h.kube.hold_watches();
    h.kube.drop_watches();
    assert!(
        h.kube.wait_watches(watches + 2).await,
        "watches not retried"
    );
    h.kube.delete_pod("team-a", "p-0");
    h.kube
        .apply(pod("team-a", "new").role("web").ip("10.1.1.1").build());
    h.kube
        .apply(pod("team-a", "p-1").role("web").ip("10.1.2.1").build());
    h.kube.compact();
    let hold_lists = h.kube.hold_lists();
    drop(hold_watches);
    assert!(
        h.kube.wait_lists(Kind::Pod, lists + 1).await,
        "no re-list after 410"
    );

    // The re-list is in flight (held): every known pod is still served.
    for i in 0..50 {
        assert!(
            h.owner(&format!("10.1.0.{i}")).is_some(),
            "pod p-{i} vanished during the re-list"
        );
    }
    drop(hold_lists);

    h.until("re-list applied", |i| {
        owner(i, "10.1.1.1").is_some()
            && owner(i, "10.1.0.0").is_none()
            && owner(i, "10.1.2.1").is_some()
    })
    .await;
    assert_eq!(h.index.pods().len(), h.kube.count(Kind::Pod));
    assert_eq!(h.owner("10.1.0.1"), None, "p-1's old IP");
    for i in 2..50 {
        assert_eq!(
            h.owner(&format!("10.1.0.{i}")),
            Some(format!("team-a/p-{i}"))
        );
    }
    assert!(h.restarts("pods") >= 1);
}

#[tokio::test]
async fn not_ready_until_both_initial_lists_are_in() {
    let kube = FakeKube::start().await.unwrap();
    kube.apply(namespace("team-a", &[(PERMITTED, ".*")]));
    let hold = kube.hold_lists();
    let h = Harness::start(kube).await;
    assert!(h.kube.wait_lists(Kind::Pod, 1).await);
    assert!(h.kube.wait_lists(Kind::Namespace, 1).await);
    assert!(!h.readiness.is_ready());
    let mut waiting = h.readiness.waiting_for();
    waiting.sort();
    assert_eq!(waiting, ["namespaces", "pods"]);
    drop(hold);
    h.ready().await;
    assert_eq!(h.index.namespaces().len(), 1);
}

#[tokio::test]
async fn a_lookup_waits_for_a_pod_that_appears() {
    let h = cluster().await;
    let lookup = tokio::spawn({
        let index = h.index.clone();
        async move {
            index
                .lookup_ip("10.0.5.5".parse().unwrap(), Duration::from_secs(10))
                .await
        }
    });
    h.kube
        .apply(pod("team-a", "late").role("web").ip("10.0.5.5").build());
    match tokio::time::timeout(Duration::from_secs(10), lookup)
        .await
        .unwrap()
        .unwrap()
    {
        IpLookup::Found(p) => assert_eq!(p.key.to_string(), "team-a/late"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn initial_list_spans_many_pages() {
    // kube-runtime lists 500 objects per page; 1,234 pods take three pages.
    let kube = FakeKube::start().await.unwrap();
    kube.apply(namespace("bulk", &[(PERMITTED, ".*")]));
    for i in 0..1234 {
        kube.apply(
            pod("bulk", &format!("p-{i}"))
                .role("web")
                .ip(&format!("10.2.{}.{}", i / 250, i % 250))
                .build(),
        );
    }
    let h = Harness::start(kube).await;
    h.ready().await;
    assert_eq!(h.index.pods().len(), 1234);
    assert!(h.kube.lists(Kind::Pod) >= 3, "expected a paged list");
    assert_eq!(h.owner("10.2.4.233").as_deref(), Some("bulk/p-1233"));
}
