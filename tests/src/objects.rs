//! Builders for the Kubernetes objects that tests load into [`crate::kube_api::FakeKube`].
//! They produce ordinary manifests (JSON), as `kubectl get -o json` would show them.

use serde_json::{Value, json};

/// A Pod manifest under construction.
#[derive(Clone, Debug)]
pub struct PodBuilder {
    value: Value,
}

/// A Pod named `name` in `namespace`, Running, scheduled on `node-a`, with no IP yet.
pub fn pod(namespace: &str, name: &str) -> PodBuilder {
    PodBuilder {
        value: json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"namespace": namespace, "name": name, "annotations": {}},
            "spec": {
                "nodeName": "node-a",
                "serviceAccountName": "default",
                "containers": [{"name": "app", "image": "example/app:1"}]
            },
            "status": {"phase": "Running"}
        }),
    }
}

/// The addresses of [`team_a`]'s pods.
#[derive(Clone, Copy, Debug)]
pub struct TeamA<'a> {
    /// `team-a/web-0`, on node-a, annotated with role `web` (permitted).
    pub web: &'a str,
    /// `team-a/admin`, on node-a, annotated with role `admin` (not permitted).
    pub denied: &'a str,
    /// `team-a/web-b`, on node-b, annotated with role `web`.
    pub other_node: &'a str,
}

/// What most end-to-end tests start from: namespace `team-a`, whose `permitted` policy
/// allows the roles `web*`, and its three pods at `ips`.
pub fn team_a(ips: TeamA<'_>) -> Vec<Value> {
    vec![
        namespace(
            "team-a",
            &[("iam.amazonaws.com/permitted", &crate::stack::arn("web.*"))],
        ),
        pod("team-a", "web-0")
            .ip(ips.web)
            .role("web")
            .node("node-a")
            .build(),
        pod("team-a", "admin")
            .ip(ips.denied)
            .role("admin")
            .node("node-a")
            .build(),
        pod("team-a", "web-b")
            .ip(ips.other_node)
            .role("web")
            .node("node-b")
            .build(),
    ]
}

/// A Namespace manifest with the given annotations.
pub fn namespace(name: &str, annotations: &[(&str, &str)]) -> Value {
    let annotations: serde_json::Map<String, Value> = annotations
        .iter()
        .map(|(k, v)| ((*k).to_string(), Value::String((*v).to_string())))
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "annotations": annotations}
    })
}

/// A ServiceAccount manifest, with IRSA's `eks.amazonaws.com/role-arn` if `role` is set.
pub fn service_account(namespace: &str, name: &str, role: Option<&str>) -> Value {
    let mut sa = json!({
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"namespace": namespace, "name": name}
    });
    if let Some(role) = role {
        sa["metadata"]["annotations"] = json!({"eks.amazonaws.com/role-arn": role});
    }
    sa
}

/// A `PodIdentityAssociation` giving ServiceAccount `namespace/service_account` `role`.
pub fn association(namespace: &str, name: &str, service_account: &str, role: &str) -> Value {
    json!({
        "apiVersion": "podiam.io/v1alpha1",
        "kind": "PodIdentityAssociation",
        "metadata": {"namespace": namespace, "name": name},
        "spec": {"serviceAccount": service_account, "roleArn": role}
    })
}

impl PodBuilder {
    /// Sets `status.podIP` and `status.podIPs` to `ips` (the first is the primary).
    pub fn ips(mut self, ips: &[&str]) -> Self {
        let status = &mut self.value["status"];
        status["podIP"] = json!(ips.first());
        status["podIPs"] = Value::Array(ips.iter().map(|ip| json!({"ip": ip})).collect());
        self
    }

    /// Sets one IP.
    pub fn ip(self, ip: &str) -> Self {
        self.ips(&[ip])
    }

    /// Sets an annotation.
    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.value["metadata"]["annotations"][key] = json!(value);
        self
    }

    /// Sets a label.
    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.value["metadata"]["labels"][key] = json!(value);
        self
    }

    /// Sets the `iam.amazonaws.com/role` annotation.
    pub fn role(self, role: &str) -> Self {
        self.annotation("iam.amazonaws.com/role", role)
    }

    /// Sets `spec.nodeName`.
    pub fn node(mut self, node: &str) -> Self {
        self.value["spec"]["nodeName"] = json!(node);
        self
    }

    /// Sets `status.phase`.
    pub fn phase(mut self, phase: &str) -> Self {
        self.value["status"]["phase"] = json!(phase);
        self
    }

    /// Sets `spec.serviceAccountName`.
    pub fn service_account(mut self, name: &str) -> Self {
        self.value["spec"]["serviceAccountName"] = json!(name);
        self
    }

    /// Sets `spec.hostNetwork`.
    pub fn host_network(mut self) -> Self {
        self.value["spec"]["hostNetwork"] = json!(true);
        self
    }

    /// The manifest.
    pub fn build(self) -> Value {
        self.value
    }
}
