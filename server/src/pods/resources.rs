//! The Kubernetes objects as the server reads them: only the fields it uses are
//! deserialised (containers, volumes and the rest are skipped by the parser), then the
//! object is stripped further into a [`PodInfo`] before it is stored.

use std::net::IpAddr;

use k8s_openapi::{
    ClusterResourceScope, Metadata, NamespaceResourceScope, Resource,
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use podiam_common::annotations;
use serde::Deserialize;

use super::{PodAnnotations, PodInfo, PodKey, PodPhase};

/// A Pod, reduced to what the server reads.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct WatchedPod {
    /// Standard metadata.
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
    /// Standard metadata.
    pub metadata: ObjectMeta,
}

/// The object could not be indexed.
#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    /// A pod without a namespace or a name.
    #[error("object has no namespace or no name")]
    NoKey,
}

// === impl WatchedPod ===

impl Resource for WatchedPod {
    const API_VERSION: &'static str = "v1";
    const GROUP: &'static str = "";
    const KIND: &'static str = "Pod";
    const VERSION: &'static str = "v1";
    const URL_PATH_SEGMENT: &'static str = "pods";
    type Scope = NamespaceResourceScope;
}

impl Metadata for WatchedPod {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

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
        let mut ips: Vec<IpAddr> = Vec::new();
        let listed = status.pod_ips.unwrap_or_default();
        let raw = listed
            .iter()
            .filter_map(|p| p.ip.as_deref())
            .chain(status.pod_ip.as_deref());
        for text in raw {
            match text.parse::<IpAddr>() {
                Ok(ip) => {
                    let ip = super::canonical(ip);
                    if !ips.contains(&ip) {
                        ips.push(ip);
                    }
                }
                Err(_) if text.is_empty() => {}
                Err(error) => {
                    tracing::warn!(pod = %key, ip = text, %error, "ignoring unparseable pod IP");
                }
            }
        }
        let mut ann = self.metadata.annotations.unwrap_or_default();
        let mut take = |name: &str| ann.remove(name).map(String::into_boxed_str);
        let annotations = PodAnnotations {
            role: take(annotations::ROLE),
            external_id: take(annotations::EXTERNAL_ID),
            session_name: take(annotations::SESSION_NAME),
            session_duration: take(annotations::SESSION_DURATION),
        };
        Ok(PodInfo {
            key,
            uid: self.metadata.uid.unwrap_or_default().into_boxed_str(),
            node_name: spec.node_name.filter(|n| !n.is_empty()).map(Into::into),
            service_account: spec.service_account_name.map(Into::into),
            ips: ips.into_boxed_slice(),
            host_network: spec.host_network.unwrap_or(false),
            phase: PodPhase::parse(status.phase.as_deref()),
            annotations,
        })
    }
}

// === impl WatchedNamespace ===

impl Resource for WatchedNamespace {
    const API_VERSION: &'static str = "v1";
    const GROUP: &'static str = "";
    const KIND: &'static str = "Namespace";
    const VERSION: &'static str = "v1";
    const URL_PATH_SEGMENT: &'static str = "namespaces";
    type Scope = ClusterResourceScope;
}

impl Metadata for WatchedNamespace {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

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
        (get(annotations::PERMITTED), get(annotations::ALLOWED_ROLES))
    }
}
