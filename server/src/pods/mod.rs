//! Pod identity: which pod has an IP and what it is annotated with.
//!
//! [`PodIndex`] is a plain synchronous index of [`PodInfo`], the part of a Pod object the
//! server reads ([`resources`] strips Pod and Namespace objects down to it). It knows
//! nothing of policy or of Kubernetes clients: [`crate::cluster`] watches and locks it.

mod index;
pub mod resources;

pub use self::index::{
    IpLookup, PodAnnotations, PodIndex, PodInfo, PodIps, PodKey, PodPhase, PodUid, canonical,
};

/// Pods for unit tests.
#[cfg(test)]
pub(crate) mod testing {
    use std::net::IpAddr;

    use super::{PodAnnotations, PodInfo, PodKey, PodPhase};

    pub(crate) fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    pub(crate) fn key(ns: &str, name: &str) -> PodKey {
        PodKey {
            namespace: ns.into(),
            name: name.into(),
        }
    }

    /// A running pod on node-a with these IPs and no annotations.
    pub(crate) fn mk_pod(ns: &str, name: &str, ips: &[&str]) -> PodInfo {
        PodInfo {
            key: key(ns, name),
            uid: None,
            node_name: Some("node-a".into()),
            service_account: None,
            ips: ips.iter().map(|s| ip(s)).collect(),
            host_network: false,
            mirror: false,
            phase: PodPhase::Running,
            annotations: PodAnnotations::default(),
            pod_identity: false,
        }
    }
}
