//! Loading ordinary Kubernetes manifests (multi-document YAML) into the stand-in API
//! server, as the demo and the sandbox do.

use std::{collections::BTreeMap, path::Path};

use serde_json::{Value, json};

use crate::kube_api::FakeKube;

/// What was loaded: pods as `(namespace, name, node, ip)`.
#[derive(Clone, Debug, Default)]
pub struct Loaded {
    /// Namespaces by name.
    pub namespaces: Vec<String>,
    /// Pods in file order.
    pub pods: Vec<LoadedPod>,
}

/// One loaded pod.
#[derive(Clone, Debug)]
pub struct LoadedPod {
    /// `metadata.namespace` (default `default`).
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `spec.nodeName`.
    pub node: String,
    /// `status.podIP`, as given or assigned.
    pub ip: String,
    /// The `iam.amazonaws.com/role` annotation.
    pub role: Option<String>,
    /// `spec.hostNetwork`.
    pub host_network: bool,
    /// `status.phase` is Running (the default).
    pub running: bool,
    /// `spec.serviceAccountName` (default `default`).
    pub service_account: String,
}

/// Why a manifest file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The YAML is malformed.
    #[error("parsing {path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// The parser's message.
        message: String,
    },
    /// A document is not a Namespace, Pod, ServiceAccount or PodIdentityAssociation, or
    /// lacks required fields.
    #[error("{path}, document {index}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// 1-based document number.
        index: usize,
        /// What is wrong.
        message: String,
    },
}

/// A Kubernetes DNS subdomain name (RFC 1123): what names of pods, namespaces and nodes
/// may be.
fn dns_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Reads manifests and assigns what they leave out, remembering its assignments across
/// files (the sandbox applies more files to a running cluster).
#[derive(Debug, Default)]
pub struct Loader {
    /// Node name → (index in order of first appearance, pods assigned an IP so far).
    nodes: BTreeMap<String, (usize, u8)>,
    /// The pod annotation that names the role, when the server reads another than
    /// `iam.amazonaws.com/role` (`--iam-role-key`).
    role_key: Option<String>,
}

/// A file's documents, ready to apply, and what they hold.
#[derive(Debug)]
pub struct Parsed {
    /// The documents, completed.
    pub docs: Vec<Value>,
    /// What they hold.
    pub loaded: Loaded,
}

/// Loads the documents of `path` into `kube` (see [`Loader::parse`]).
pub fn load(kube: &FakeKube, path: &Path) -> Result<Loaded, ManifestError> {
    let parsed = Loader::default().parse(path)?;
    for doc in parsed.docs {
        kube.apply(doc);
    }
    Ok(parsed.loaded)
}

impl Loader {
    /// A loader that reads pods' roles from `key` (kube2iam's renamed key).
    pub fn with_role_key(key: Option<String>) -> Self {
        Self {
            role_key: key,
            ..Self::default()
        }
    }

    /// The nodes seen so far, in order of first appearance.
    pub fn nodes(&self) -> Vec<String> {
        let mut nodes: Vec<_> = self.nodes.iter().collect();
        nodes.sort_by_key(|(_, (index, _))| *index);
        nodes.into_iter().map(|(name, _)| name.clone()).collect()
    }

    /// Reads the Namespace, Pod, ServiceAccount and PodIdentityAssociation documents of
    /// `path`. Pods without `status.podIP` get
    /// `100.64.<node>.<n>` (one /24 per node, in order of first appearance); pods without
    /// a phase are Running; pods without a node go to `node-a`. Nothing is applied.
    pub fn parse(&mut self, path: &Path) -> Result<Parsed, ManifestError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
            path: shown.clone(),
            source,
        })?;
        let docs: Vec<Value> =
            serde_saphyr::from_multiple(&text).map_err(|e| ManifestError::Parse {
                path: shown.clone(),
                message: e.to_string(),
            })?;
        let mut loaded = Loaded::default();
        let mut out = Vec::new();
        for (i, mut doc) in docs.into_iter().enumerate() {
            if doc.is_null() {
                continue;
            }
            let invalid = |message: String| ManifestError::Invalid {
                path: shown.clone(),
                index: i + 1,
                message,
            };
            if !doc.is_object() {
                return Err(invalid("a document must be a mapping".into()));
            }
            for field in ["metadata", "spec", "status"] {
                if !(doc[field].is_null() || doc[field].is_object()) {
                    return Err(invalid(format!("{field} must be a mapping")));
                }
            }
            if !(doc["metadata"]["annotations"].is_null()
                || doc["metadata"]["annotations"].is_object())
            {
                return Err(invalid("metadata.annotations must be a mapping".into()));
            }
            if doc["metadata"]["name"].as_str().is_none_or(str::is_empty) {
                return Err(invalid("metadata.name is required".into()));
            }
            for (field, value) in [
                ("metadata.name", &doc["metadata"]["name"]),
                ("metadata.namespace", &doc["metadata"]["namespace"]),
                ("spec.nodeName", &doc["spec"]["nodeName"]),
            ] {
                if let Some(name) = value.as_str()
                    && !dns_subdomain(name)
                {
                    return Err(invalid(format!(
                        "{field} {name:?} is not a valid name (lower-case letters, digits, '-' and '.', at most 253)"
                    )));
                } else if !value.is_null() && !value.is_string() {
                    return Err(invalid(format!("{field} must be a string")));
                }
            }
            match doc["kind"].as_str() {
                Some("Namespace") => {
                    loaded
                        .namespaces
                        .push(doc["metadata"]["name"].as_str().unwrap_or_default().into());
                }
                Some("Pod") => {
                    if doc["metadata"]["namespace"].as_str().is_none() {
                        doc["metadata"]["namespace"] = json!("default");
                    }
                    if doc["spec"]["nodeName"].as_str().is_none() {
                        doc["spec"]["nodeName"] = json!("node-a");
                    }
                    let node = doc["spec"]["nodeName"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string();
                    let next = self.nodes.len();
                    let (index, count) = self.nodes.entry(node.clone()).or_insert((next, 0));
                    let host_network = doc["spec"]["hostNetwork"].as_bool() == Some(true);
                    if host_network && doc["status"]["podIP"].as_str().is_none() {
                        // As a kubelet reports it: a host-network pod's addresses are its
                        // node's.
                        let ip = node_ip(*index);
                        doc["status"]["podIP"] = json!(ip);
                        doc["status"]["podIPs"] = json!([{ "ip": ip }]);
                    }
                    if doc["status"]["podIP"].as_str().is_none() {
                        *count = count
                            .checked_add(1)
                            .filter(|c| *c < 255)
                            .ok_or_else(|| invalid(format!("more than 254 pods on {node}")))?;
                        let ip = format!("100.64.{}.{}", *index + 1, *count + 1);
                        doc["status"]["podIP"] = json!(ip);
                        doc["status"]["podIPs"] = json!([{ "ip": ip }]);
                    }
                    if doc["status"]["phase"].as_str().is_none() {
                        doc["status"]["phase"] = json!("Running");
                    }
                    loaded.pods.push(LoadedPod {
                        namespace: doc["metadata"]["namespace"]
                            .as_str()
                            .unwrap_or_default()
                            .into(),
                        name: doc["metadata"]["name"].as_str().unwrap_or_default().into(),
                        node,
                        ip: doc["status"]["podIP"].as_str().unwrap_or_default().into(),
                        role: doc["metadata"]["annotations"]
                            [self.role_key.as_deref().unwrap_or("iam.amazonaws.com/role")]
                        .as_str()
                        .map(str::to_string),
                        host_network,
                        running: doc["status"]["phase"].as_str() == Some("Running"),
                        service_account: doc["spec"]["serviceAccountName"]
                            .as_str()
                            .unwrap_or("default")
                            .into(),
                    });
                }
                Some("ServiceAccount") => {
                    if doc["metadata"]["namespace"].as_str().is_none() {
                        doc["metadata"]["namespace"] = json!("default");
                    }
                }
                Some("PodIdentityAssociation") => {
                    if doc["metadata"]["namespace"].as_str().is_none() {
                        doc["metadata"]["namespace"] = json!("default");
                    }
                    if doc["apiVersion"].as_str() != Some("podiam.io/v1alpha1") {
                        return Err(invalid(
                            "a PodIdentityAssociation is apiVersion podiam.io/v1alpha1".into(),
                        ));
                    }
                    for field in ["serviceAccount", "roleArn"] {
                        if doc["spec"][field].as_str().is_none_or(str::is_empty) {
                            return Err(invalid(format!("spec.{field} is required")));
                        }
                    }
                }
                other => {
                    return Err(invalid(format!(
                        "kind {other:?} is not supported (Namespace, Pod, ServiceAccount and PodIdentityAssociation are)"
                    )));
                }
            }
            out.push(doc);
        }
        Ok(Parsed { docs: out, loaded })
    }
}

/// The sandbox's address of the node at `index` (in [`Loader::nodes`] order), on its link
/// to the control namespace: what a kubelet reports as a host-network pod's IP there.
pub fn node_ip(index: usize) -> String {
    format!("100.100.{index}.2")
}
