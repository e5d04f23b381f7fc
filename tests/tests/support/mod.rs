//! Shared helpers for the integration tests: the real server watchers, in process,
//! against the stand-in API server.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::{net::IpAddr, time::Duration};

use podiam_common::{arn::BaseRoleArn, readiness::Readiness};
use podiam_server::{
    cluster::{ClusterIndex, metrics::WatchMetrics, watch},
    pods::IpLookup,
    policy::{Decision, PolicyConfig},
};
use podiam_tests::kube_api::FakeKube;
use prometheus::Registry;
use tokio_util::sync::CancellationToken;

pub const ACCOUNT: &str = "123456789012";

/// How long a test waits for the index to reflect a change before failing.
pub const CONVERGE: Duration = Duration::from_secs(15);

pub struct Harness {
    pub kube: FakeKube,
    pub index: ClusterIndex,
    pub readiness: Readiness,
    pub metrics: WatchMetrics,
    pub policy: PolicyConfig,
    shutdown: CancellationToken,
}

pub fn base() -> BaseRoleArn {
    format!("arn:aws:iam::{ACCOUNT}:role/").parse().unwrap()
}

pub fn arn(name: &str) -> String {
    format!("arn:aws:iam::{ACCOUNT}:role/{name}")
}

pub fn client(kube: &FakeKube) -> kube::Client {
    let config = kube::Config::new(kube.url().parse().unwrap());
    kube::Client::try_from(config).unwrap()
}

impl Harness {
    /// Starts the pod and namespace watchers against `kube`.
    pub async fn start(kube: FakeKube) -> Self {
        let policy = PolicyConfig {
            base_role_arn: Some(base()),
            default_role: None,
            allow_mirror_pods: false,
        };
        let index = ClusterIndex::new(policy.base_role_arn.clone());
        let readiness = Readiness::new();
        let metrics = WatchMetrics::register(&Registry::new()).unwrap();
        let shutdown = CancellationToken::new();
        let client = client(&kube);
        let settings = |ready| watch::WatchSettings {
            ready,
            metrics: metrics.clone(),
            stale_after: Duration::from_secs(60),
            shutdown: shutdown.clone(),
        };
        tokio::spawn(watch::pods(
            client.clone(),
            index.clone(),
            None,
            settings(readiness.gate("pods")),
        ));
        tokio::spawn(watch::namespaces(
            client,
            index.clone(),
            settings(readiness.gate("namespaces")),
        ));
        Self {
            kube,
            index,
            readiness,
            metrics,
            policy,
            shutdown,
        }
    }

    pub async fn ready(&self) {
        tokio::time::timeout(CONVERGE, self.readiness.wait_ready())
            .await
            .expect("watchers did not become ready");
    }

    /// Waits (woken by index changes) until `f` holds; fails the test after a while.
    pub async fn until(&self, what: &str, f: impl Fn(&ClusterIndex) -> bool) {
        assert!(
            self.index.wait_until(CONVERGE, f).await,
            "timed out waiting for: {what}"
        );
    }

    /// `ns/name` of the live pod with `ip`, "ambiguous", or None.
    pub fn owner(&self, ip: &str) -> Option<String> {
        owner(&self.index, ip)
    }

    /// The decision for the pod that owns `ip`.
    pub fn decide(&self, ip: &str) -> Decision {
        let ip: IpAddr = ip.parse().unwrap();
        let IpLookup::Found(pod) = self.index.pods().lookup_ip(ip) else {
            panic!("no single pod for {ip}");
        };
        Decision::for_pod(
            &pod,
            self.index.namespace(&pod.key.namespace).as_deref(),
            &self.policy,
        )
    }

    pub fn restarts(&self, resource: &str) -> u64 {
        self.metrics.restarts.with_label_values(&[resource]).get()
    }
}

pub fn owner(index: &ClusterIndex, ip: &str) -> Option<String> {
    match index.pods().lookup_ip(ip.parse().unwrap()) {
        IpLookup::Found(pod) => Some(pod.key.to_string()),
        IpLookup::Ambiguous(_) => Some("ambiguous".into()),
        IpLookup::NotFound => None,
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
