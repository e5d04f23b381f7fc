//! Pod and Namespace objects as the API server's watch sends them, from any JSON.
//!
//! The server's lean parser skips most of an object; the property is that what it keeps
//! agrees with a full reading of the same document (`serde_json::Value`): the key, the
//! role annotation, host networking, the mirror-pod marks (an annotation, or a `Node`
//! owner: a mirror pod must never pass for an ordinary one), every kept IP listed in the
//! status, and a namespace's policy annotations. And the index built from it never names a
//! host-network or finished pod as the owner of an IP.
#![no_main]

use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;
use podiam_server::pods::{
    IpLookup, PodIndex, PodInfo, PodPhase, canonical,
    resources::{WatchedNamespace, WatchedPod},
};
use serde_json::Value;

fn string_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_str()
}

/// The whole document, when it is shaped as the API server sends objects. The lean
/// parser is more lenient than that in ways that do not matter for what it keeps: it skips
/// what it does not read without checking that skipped strings are UTF-8 or that skipped
/// numbers fit a float, and, as serde's derived parsers do, it takes a struct written as a
/// JSON array of its fields. What it keeps is compared only for documents that a full
/// reading takes and whose structs are JSON objects.
fn full(data: &[u8]) -> Option<Value> {
    let full: Value = serde_json::from_slice(data).ok()?;
    let objects = ["", "/metadata", "/metadata/annotations", "/spec", "/status"]
        .iter()
        .all(|at| {
            full.pointer(at)
                .is_none_or(|v| v.is_object() || v.is_null())
        })
        && full
            .pointer("/status/podIPs")
            .and_then(Value::as_array)
            .is_none_or(|ips| ips.iter().all(Value::is_object));
    objects.then_some(full)
}

fn pod(data: &[u8]) {
    let Ok(parsed) = serde_json::from_slice::<WatchedPod>(data) else {
        return;
    };
    let full = full(data);
    let Ok(info) = parsed.into_info() else {
        return;
    };
    index_never_names_a_pod_that_claims_no_ip(info.clone());
    let Some(full) = full else {
        return;
    };
    assert_eq!(
        Some(&*info.key.namespace),
        string_at(&full, &["metadata", "namespace"])
    );
    assert_eq!(
        Some(&*info.key.name),
        string_at(&full, &["metadata", "name"])
    );
    assert_eq!(
        info.annotations.role.as_deref(),
        string_at(
            &full,
            &["metadata", "annotations", "iam.amazonaws.com/role"]
        )
    );
    assert_eq!(
        info.host_network,
        full.pointer("/spec/hostNetwork") == Some(&Value::Bool(true))
    );
    let marked = full
        .pointer("/metadata/annotations")
        .and_then(Value::as_object)
        .is_some_and(|a| a.contains_key("kubernetes.io/config.mirror"));
    let node_owned = full
        .pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .is_some_and(|owners| {
            owners
                .iter()
                .any(|o| o.get("kind") == Some(&Value::from("Node")))
        });
    assert_eq!(
        info.mirror,
        marked || node_owned,
        "mirror pod marks misread"
    );

    let listed: Vec<IpAddr> = full
        .pointer("/status/podIPs")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|p| p.get("ip")?.as_str()?.parse().ok())
        .chain(string_at(&full, &["status", "podIP"]).and_then(|s| s.parse().ok()))
        .map(canonical)
        .collect();
    for ip in info.ips.iter() {
        assert!(listed.contains(&ip), "{ip} kept but not listed");
    }
}

fn index_never_names_a_pod_that_claims_no_ip(info: PodInfo) {
    let mut index = PodIndex::default();
    let claims =
        !info.host_network && !matches!(info.phase, PodPhase::Succeeded | PodPhase::Failed);
    let key = info.key.clone();
    let ips: Vec<IpAddr> = info.ips.iter().collect();
    index.apply(info);
    for ip in ips {
        match index.lookup_ip(ip) {
            IpLookup::Found(found) => {
                assert!(claims, "{ip} names a pod that claims no IP");
                assert_eq!(found.key, key);
            }
            IpLookup::NotFound => assert!(!claims, "{ip} lost"),
            IpLookup::Ambiguous(_) => panic!("one pod is ambiguous"),
        }
    }
}

fn namespace(data: &[u8]) {
    let Ok(parsed) = serde_json::from_slice::<WatchedNamespace>(data) else {
        return;
    };
    let Some(full) = full(data) else {
        return;
    };
    if let Ok(name) = parsed.name() {
        assert_eq!(Some(name), string_at(&full, &["metadata", "name"]));
    }
    let (permitted, allowed) = parsed.policy_annotations();
    assert_eq!(
        permitted,
        string_at(
            &full,
            &["metadata", "annotations", "iam.amazonaws.com/permitted"]
        )
    );
    assert_eq!(
        allowed,
        string_at(
            &full,
            &["metadata", "annotations", "iam.amazonaws.com/allowed-roles"]
        )
    );
}

fuzz_target!(|data: &[u8]| {
    match data.split_first() {
        Some((kind, rest)) if kind % 2 == 0 => pod(rest),
        Some((_, rest)) => namespace(rest),
        None => {}
    }
});
