use std::collections::HashSet;

use super::*;
use crate::pods::testing::{ip, key, mk_pod};

fn found(idx: &PodIndex, addr: &str) -> Option<PodKey> {
    match idx.lookup_ip(ip(addr)) {
        IpLookup::Found(p) => Some(p.key.clone()),
        IpLookup::NotFound => None,
        IpLookup::Ambiguous(keys) => panic!("ambiguous: {keys:?}"),
    }
}

#[test]
fn indexes_every_ip_v4_and_v6() {
    let mut idx = PodIndex::default();
    idx.apply(mk_pod("ns", "a", &["10.0.0.1", "fd00::1"]));
    assert_eq!(found(&idx, "10.0.0.1"), Some(key("ns", "a")));
    assert_eq!(found(&idx, "fd00::1"), Some(key("ns", "a")));
    // A v4 peer seen through a dual-stack socket.
    assert_eq!(found(&idx, "::ffff:10.0.0.1"), Some(key("ns", "a")));
    assert_eq!(found(&idx, "10.0.0.2"), None);
    assert_eq!(idx.ip_count(), 2);
}

#[test]
fn ip_assigned_late_and_changed() {
    let mut idx = PodIndex::default();
    idx.apply(mk_pod("ns", "a", &[]));
    assert_eq!(idx.len(), 1);
    assert_eq!(idx.ip_count(), 0);
    idx.apply(mk_pod("ns", "a", &["10.0.0.1"]));
    assert_eq!(found(&idx, "10.0.0.1"), Some(key("ns", "a")));
    idx.apply(mk_pod("ns", "a", &["10.0.0.2"]));
    assert_eq!(found(&idx, "10.0.0.1"), None);
    assert_eq!(found(&idx, "10.0.0.2"), Some(key("ns", "a")));
}

#[test]
fn host_network_and_finished_pods_claim_no_ip() {
    let mut idx = PodIndex::default();
    let mut host = mk_pod("kube-system", "node-exporter", &["192.0.2.10"]);
    host.host_network = true;
    idx.apply(host);
    assert_eq!(found(&idx, "192.0.2.10"), None);
    assert_eq!(idx.len(), 1);

    idx.apply(mk_pod("ns", "job", &["10.0.0.3"]));
    for phase in [PodPhase::Succeeded, PodPhase::Failed] {
        let mut done = mk_pod("ns", "job", &["10.0.0.3"]);
        done.phase = phase;
        idx.apply(done);
        assert_eq!(found(&idx, "10.0.0.3"), None, "{phase:?}");
    }
}

#[test]
fn ip_reused_after_the_old_pod_finished() {
    let mut idx = PodIndex::default();
    idx.apply(mk_pod("ns", "old", &["10.0.0.4"]));
    let mut old = mk_pod("ns", "old", &["10.0.0.4"]);
    old.phase = PodPhase::Succeeded;
    idx.apply(old);
    idx.apply(mk_pod("ns", "new", &["10.0.0.4"]));
    assert_eq!(found(&idx, "10.0.0.4"), Some(key("ns", "new")));
    assert_eq!(idx.collisions(), 0);
    // The old pod's deletion does not take the IP from the new one.
    idx.delete(&key("ns", "old"));
    assert_eq!(found(&idx, "10.0.0.4"), Some(key("ns", "new")));
}

#[test]
fn colliding_pods_are_reported_not_picked() {
    let mut idx = PodIndex::default();
    idx.apply(mk_pod("ns", "a", &["10.0.0.5"]));
    idx.apply(mk_pod("ns", "b", &["10.0.0.5"]));
    assert_eq!(idx.collisions(), 1);
    match idx.lookup_ip(ip("10.0.0.5")) {
        IpLookup::Ambiguous(mut keys) => {
            keys.sort();
            assert_eq!(keys, [key("ns", "a"), key("ns", "b")]);
        }
        other => panic!("{other:?}"),
    }
    // Re-applying a claimant does not duplicate it.
    idx.apply(mk_pod("ns", "b", &["10.0.0.5"]));
    idx.apply(mk_pod("ns", "c", &["10.0.0.5"]));
    assert_eq!(idx.collisions(), 1);
    idx.delete(&key("ns", "a"));
    assert!(matches!(idx.lookup_ip(ip("10.0.0.5")), IpLookup::Ambiguous(k) if k.len() == 2));
    idx.delete(&key("ns", "c"));
    assert_eq!(found(&idx, "10.0.0.5"), Some(key("ns", "b")));
    assert_eq!(idx.collisions(), 0);
}

#[test]
fn retain_removes_only_what_was_not_relisted() {
    let mut idx = PodIndex::default();
    idx.apply(mk_pod("ns", "a", &["10.0.0.1"]));
    idx.apply(mk_pod("ns", "b", &["10.0.0.2"]));
    let keep: HashSet<_> = [key("ns", "a")].into();
    assert_eq!(idx.retain(&keep), 1);
    assert_eq!(found(&idx, "10.0.0.1"), Some(key("ns", "a")));
    assert_eq!(found(&idx, "10.0.0.2"), None);
    assert!(!idx.delete(&key("ns", "b")));
}
