//! Loading ordinary manifests into the stand-in API server (what the demo and sandbox do).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use podiam_tests::{
    kube_api::{FakeKube, Kind},
    manifests::{self, ManifestError},
};

#[tokio::test]
async fn the_example_sandbox_loads_with_an_ip_per_pod() {
    let kube = FakeKube::start().await.unwrap();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/sandbox.yaml");
    let loaded = manifests::load(&kube, &path).unwrap();
    assert_eq!(loaded.namespaces, ["payments", "analytics"]);
    assert_eq!(kube.count(Kind::Namespace), 2);
    assert_eq!(kube.count(Kind::Pod), 6);
    // The two container-credentials pods' ServiceAccounts, and the association of one.
    assert_eq!(kube.count(Kind::ServiceAccount), 2);
    assert_eq!(kube.count(Kind::Association), 1);
    let nodes: std::collections::BTreeSet<_> =
        loaded.pods.iter().map(|p| p.node.as_str()).collect();
    assert_eq!(nodes.len(), 2, "the sandbox spans two nodes");
    let mut ips: Vec<_> = loaded.pods.iter().map(|p| p.ip.clone()).collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 6, "every pod has its own IP");
    for pod in &loaded.pods {
        assert!(pod.ip.starts_with("100.64."), "{pod:?}");
    }
}

#[tokio::test]
async fn unsupported_or_malformed_documents_are_refused_with_the_reason() {
    let kube = FakeKube::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("kind: Deployment\nmetadata: {name: x}\n", "Deployment"),
        ("kind: Pod\nmetadata: {}\n", "metadata.name"),
        ("kind: Pod\nmetadata: [unclosed\n", "parsing"),
        (
            "kind: Pod\nmetadata: {name: x}\nstatus: Running\n",
            "status must be a mapping",
        ),
        (
            "kind: Pod\nmetadata: {name: x}\nspec: []\n",
            "spec must be a mapping",
        ),
        ("kind: Pod\nmetadata: {name: X_1}\n", "not a valid name"),
        (
            "kind: Pod\nmetadata: {name: x}\nspec: {nodeName: ../../etc}\n",
            "not a valid name",
        ),
        ("- a\n- b\n", "mapping"),
        (
            "apiVersion: podiam.io/v1alpha1\nkind: PodIdentityAssociation\nmetadata: {name: x}\nspec: {roleArn: r}\n",
            "spec.serviceAccount is required",
        ),
        (
            "apiVersion: v1\nkind: PodIdentityAssociation\nmetadata: {name: x}\nspec: {serviceAccount: a, roleArn: r}\n",
            "podiam.io/v1alpha1",
        ),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("{i}.yaml"));
        std::fs::write(&path, text).unwrap();
        let err = manifests::load(&kube, &path).unwrap_err();
        assert!(err.to_string().contains(want), "{err}");
    }
    let missing = manifests::load(&kube, &dir.path().join("nope.yaml")).unwrap_err();
    assert!(matches!(missing, ManifestError::Read { .. }));
}
