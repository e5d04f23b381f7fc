//! The Kubernetes objects as the server reads them. Only the fields it uses are
//! deserialised: containers, volumes, managed fields, every label but the admission
//! webhook's (`podiam.io/pod-identity`) and every annotation outside `iam.amazonaws.com/`
//! (but the kubelet's mirror-pod mark) are skipped by the parser and never allocated. Of the owner references only their kinds are read (a `Node` owner also
//! marks a mirror pod). The object is then
//! stripped further into a [`PodInfo`] before it is stored.

use std::{collections::BTreeMap, fmt, net::IpAddr};

use k8s_openapi::{
    ClusterResourceScope, NamespaceResourceScope,
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};
use podiam_common::{annotations, pod_identity};
use serde::{Deserialize, Deserializer, de};

use super::{PodAnnotations, PodInfo, PodIps, PodKey, PodPhase, PodUid};

/// The annotation prefix podiam reads; all others are dropped while parsing.
const ANNOTATION_PREFIX: &str = "iam.amazonaws.com/";

/// A Pod, reduced to what the server reads.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct WatchedPod {
    /// Name, namespace, uid, resourceVersion and podiam's annotations only.
    #[serde(deserialize_with = "lean_meta")]
    pub metadata: ObjectMeta,
    /// The part of `spec` the server reads.
    #[serde(default)]
    pub spec: Option<WatchedPodSpec>,
    /// The part of `status` the server reads.
    #[serde(default)]
    pub status: Option<WatchedPodStatus>,
}

/// The fields of `PodSpec` the server reads.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WatchedPodSpec {
    /// The node the pod is scheduled on.
    pub node_name: Option<String>,
    /// Whether the pod uses the node's network namespace.
    pub host_network: Option<bool>,
    /// The pod's service account.
    pub service_account_name: Option<String>,
}

/// The fields of `PodStatus` the server reads.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WatchedPodStatus {
    /// Pending, Running, Succeeded, Failed, Unknown.
    pub phase: Option<String>,
    /// The primary IP (older API servers set only this).
    #[serde(rename = "podIP")]
    pub pod_ip: Option<String>,
    /// Every IP (dual stack).
    #[serde(rename = "podIPs")]
    pub pod_ips: Option<Vec<PodIp>>,
}

/// One entry of `status.podIPs`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct PodIp {
    /// The address.
    pub ip: Option<String>,
}

/// A Namespace, reduced to its metadata.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct WatchedNamespace {
    /// Name, uid, resourceVersion and podiam's annotations only.
    #[serde(deserialize_with = "lean_meta")]
    pub metadata: ObjectMeta,
}

/// The metadata fields the server reads.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LeanMeta {
    name: Option<String>,
    namespace: Option<String>,
    uid: Option<String>,
    resource_version: Option<String>,
    #[serde(default, deserialize_with = "podiam_annotations")]
    annotations: Option<BTreeMap<String, String>>,
    #[serde(default, deserialize_with = "podiam_labels")]
    labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    owner_references: Option<Vec<LeanOwner>>,
}

/// Of an owner reference, only its kind.
#[derive(Deserialize)]
struct LeanOwner {
    #[serde(default)]
    kind: Option<String>,
}

/// The object could not be indexed.
#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    /// A pod without a namespace or a name.
    #[error("object has no namespace or no name")]
    NoKey,
}

/// `k8s_openapi`'s traits for a lean object type, which give it kube's `Resource`: core
/// group (`v1`) with four arguments, or `api_version, group, version` before the kind.
macro_rules! lean_resource {
    ($ty:ty, $kind:expr, $plural:expr, $scope:ty) => {
        $crate::pods::resources::lean_resource!($ty, "v1", "", "v1", $kind, $plural, $scope);
    };
    ($ty:ty, $api_version:expr, $group:expr, $version:expr, $kind:expr, $plural:expr, $scope:ty) => {
        impl k8s_openapi::Resource for $ty {
            const API_VERSION: &'static str = $api_version;
            const GROUP: &'static str = $group;
            const KIND: &'static str = $kind;
            const VERSION: &'static str = $version;
            const URL_PATH_SEGMENT: &'static str = $plural;
            type Scope = $scope;
        }

        impl k8s_openapi::Metadata for $ty {
            type Ty = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

            fn metadata(&self) -> &Self::Ty {
                &self.metadata
            }

            fn metadata_mut(&mut self) -> &mut Self::Ty {
                &mut self.metadata
            }
        }
    };
}
pub(crate) use lean_resource;

lean_resource!(WatchedPod, "Pod", "pods", NamespaceResourceScope);
lean_resource!(
    WatchedNamespace,
    "Namespace",
    "namespaces",
    ClusterResourceScope
);

// === impl WatchedPod ===

impl WatchedPod {
    /// The pod's key, if it has a namespace and a name.
    pub fn key(&self) -> Result<PodKey, ObjectError> {
        match (&self.metadata.namespace, &self.metadata.name) {
            (Some(ns), Some(name)) if !ns.is_empty() && !name.is_empty() => Ok(PodKey {
                namespace: ns.as_str().into(),
                name: name.as_str().into(),
            }),
            _ => Err(ObjectError::NoKey),
        }
    }

    /// Strips the pod to what the index keeps. Unparseable IPs are dropped with a warning
    /// (the pod is then simply not found by them).
    pub fn into_info(self) -> Result<PodInfo, ObjectError> {
        let key = self.key()?;
        let spec = self.spec.unwrap_or_default();
        let status = self.status.unwrap_or_default();
        let mut ips = PodIps::default();
        let listed = status.pod_ips.unwrap_or_default();
        let raw = listed
            .iter()
            .filter_map(|p| p.ip.as_deref())
            .chain(status.pod_ip.as_deref());
        for text in raw {
            match text.parse::<IpAddr>() {
                Ok(ip) => {
                    if !ips.add(ip) {
                        tracing::warn!(pod = %key, %ip, "ignoring a second IP of the same family");
                    }
                }
                Err(_) if text.is_empty() => {}
                Err(error) => {
                    tracing::warn!(pod = %key, ip = text, %error, "ignoring unparseable pod IP");
                }
            }
        }
        // The kubelet's mark of a static pod's mirror (its value is a hash), or a Node owner.
        let mirror = self
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(annotations::MIRROR))
            || self
                .metadata
                .owner_references
                .iter()
                .flatten()
                .any(|o| o.kind == "Node");
        let mut ann = self.metadata.annotations.unwrap_or_default();
        let mut take = |name: &str| ann.remove(name).map(Into::into);
        let keys = annotations::keys();
        let annotations = PodAnnotations {
            role: take(keys.role),
            external_id: take(keys.external_id),
            session_name: take(keys.session_name),
            session_duration: take(keys.session_duration),
        };
        let pod_identity = self
            .metadata
            .labels
            .as_ref()
            .is_some_and(|l| l.contains_key(pod_identity::MUTATED_LABEL));
        Ok(PodInfo {
            pod_identity,
            key,
            uid: self.metadata.uid.as_deref().and_then(PodUid::parse),
            node_name: spec.node_name.filter(|n| !n.is_empty()).map(Into::into),
            service_account: spec.service_account_name.map(Into::into),
            ips,
            host_network: spec.host_network.unwrap_or(false),
            mirror,
            phase: PodPhase::parse(status.phase.as_deref()),
            annotations,
        })
    }
}

// === impl WatchedNamespace ===

impl WatchedNamespace {
    /// The namespace's name.
    pub fn name(&self) -> Result<&str, ObjectError> {
        self.metadata
            .name
            .as_deref()
            .filter(|n| !n.is_empty())
            .ok_or(ObjectError::NoKey)
    }

    /// The values of the two policy annotations.
    pub fn policy_annotations(&self) -> (Option<&str>, Option<&str>) {
        let Some(map) = &self.metadata.annotations else {
            return (None, None);
        };
        let get = |k: &str| map.get(k).map(String::as_str);
        let keys = annotations::keys();
        (get(keys.permitted), get(keys.allowed_roles))
    }
}

// === lean deserialisation ===

fn lean_meta<'de, D: Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    let m = LeanMeta::deserialize(d)?;
    Ok(ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        uid: m.uid,
        resource_version: m.resource_version,
        annotations: m.annotations,
        labels: m.labels.filter(|l| !l.is_empty()),
        owner_references: m.owner_references.map(|owners| {
            owners
                .into_iter()
                .map(|o| OwnerReference {
                    kind: o.kind.unwrap_or_default(),
                    ..OwnerReference::default()
                })
                .collect()
        }),
        ..ObjectMeta::default()
    })
}

/// Keeps only `iam.amazonaws.com/` annotations; the values of others are skipped unread.
fn podiam_annotations<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<BTreeMap<String, String>>, D::Error> {
    d.deserialize_option(Visitor(|key: &str| {
        key.starts_with(ANNOTATION_PREFIX) || annotations::keys().reads(key)
    }))
}

/// Keeps only the webhook's label; the values of others are skipped unread.
fn podiam_labels<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<BTreeMap<String, String>>, D::Error> {
    d.deserialize_option(Visitor(|key: &str| key == pod_identity::MUTATED_LABEL))
}

/// A map of strings of which only the keys `keep` accepts are kept.
struct Visitor<F>(F);

impl<'de, F: Fn(&str) -> bool> de::Visitor<'de> for Visitor<F> {
    type Value = Option<BTreeMap<String, String>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a map of strings")
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }

    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut kept = BTreeMap::new();
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if (self.0)(&key) {
                kept.insert(key.into_owned(), map.next_value::<String>()?);
            } else {
                map.next_value::<de::IgnoredAny>()?;
            }
        }
        Ok(Some(kept))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_only_what_the_server_reads() {
        let pod: WatchedPod = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "web", "namespace": "ns", "resourceVersion": "7",
                "uid": "6d1c3b4a-2f0e-4c8d-9b7a-1e2f3a4b5c6d",
                "labels": {"app": "web"},
                "annotations": {"iam.amazonaws.com/role": "r", "other": "x", "big": {"not": "a string"}},
                "managedFields": [{"manager": "kubelet"}]
            },
            "spec": {"nodeName": "n1", "containers": [{"name": "c"}], "hostNetwork": false},
            "status": {"phase": "Running", "podIP": "10.0.0.1",
                       "podIPs": [{"ip": "10.0.0.1"}, {"ip": "fd00::1"}, {"ip": "10.9.9.9"}, {"ip": "junk"}]}
        }))
        .unwrap();
        assert!(pod.metadata.labels.is_none() && pod.metadata.managed_fields.is_none());
        let labelled: WatchedPod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "ns",
                         "labels": {"app": "x", "podiam.io/pod-identity": "enabled"}}
        }))
        .unwrap();
        assert!(
            labelled.into_info().unwrap().pod_identity,
            "the webhook's label is read"
        );
        assert_eq!(pod.metadata.resource_version.as_deref(), Some("7"));
        let info = pod.into_info().unwrap();
        assert_eq!(info.key.to_string(), "ns/web");
        assert_eq!(info.annotations.role.as_deref(), Some("r"));
        assert_eq!(
            info.uid.map(|u| u.to_string()).as_deref(),
            Some("6d1c3b4a-2f0e-4c8d-9b7a-1e2f3a4b5c6d")
        );
        // One address per family; the second IPv4 and the junk are dropped.
        let ips: Vec<String> = info.ips.iter().map(|ip| ip.to_string()).collect();
        assert_eq!(ips, ["10.0.0.1", "fd00::1"]);
    }

    #[test]
    fn mirror_pods_are_recognised() {
        let parse = |metadata: serde_json::Value| {
            serde_json::from_value::<WatchedPod>(serde_json::json!({ "metadata": metadata }))
                .unwrap()
                .into_info()
                .unwrap()
        };
        let by_annotation = parse(serde_json::json!({
            "name": "etcd-node-a", "namespace": "payments",
            "annotations": {"kubernetes.io/config.mirror": "3f9a", "iam.amazonaws.com/role": "r"}
        }));
        assert!(by_annotation.mirror);
        assert_eq!(by_annotation.annotations.role.as_deref(), Some("r"));
        let by_owner = parse(serde_json::json!({
            "name": "etcd-node-a", "namespace": "payments",
            "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": "node-a", "uid": "u", "controller": true}]
        }));
        assert!(by_owner.mirror);
        let ordinary = parse(serde_json::json!({
            "name": "web", "namespace": "payments",
            "annotations": {"kubernetes.io/config.source": "api"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-1", "uid": "u"}, {}]
        }));
        assert!(!ordinary.mirror);
    }

    #[test]
    fn missing_or_null_parts_are_not_errors() {
        let pod: WatchedPod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "ns", "annotations": null, "uid": "not-a-uuid"},
            "spec": null
        }))
        .unwrap();
        let info = pod.into_info().unwrap();
        assert!(info.ips.is_empty() && info.uid.is_none());
        assert_eq!(info.phase, PodPhase::Pending);
        let nameless: WatchedPod =
            serde_json::from_value(serde_json::json!({"metadata": {}})).unwrap();
        assert!(nameless.into_info().is_err());
    }
}
