//! What the API server does with a mutating admission webhook, for the tests and the
//! sandbox: send the pod in a real `admission.k8s.io/v1` AdmissionReview over TLS, and
//! apply the JSON Patch the answer carries (a test double of the API server's side).

use std::{net::SocketAddr, path::Path};

use anyhow::{Context, bail};
use base64::Engine;
use serde_json::{Value, json};

use crate::api_client::{ApiClient, tls_config};

/// An AdmissionReview of the creation of `pod` in `namespace`.
pub fn review(uid: &str, namespace: &str, pod: &Value) -> Value {
    let mut review = json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod,
            "oldObject": null,
            "dryRun": false,
            "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"}
        }
    });
    // Left out, as the API server leaves it out, for a pod named by generateName.
    if let Some(name) = pod["metadata"]["name"].as_str() {
        review["request"]["name"] = json!(name);
    }
    review
}

/// The patch of an AdmissionResponse, as the API server reads it: Go decodes a `[]byte`
/// field from a base64 string or from an array of numbers (what kube's
/// `AdmissionResponse` writes).
pub fn patch_bytes(patch: &Value) -> anyhow::Result<Vec<u8>> {
    match patch {
        Value::String(text) => Ok(base64::engine::general_purpose::STANDARD.decode(text)?),
        Value::Array(bytes) => bytes
            .iter()
            .map(|b| {
                b.as_u64()
                    .and_then(|b| u8::try_from(b).ok())
                    .context("a patch byte out of range")
            })
            .collect(),
        other => bail!("no patch in {other}"),
    }
}

/// Sends `pod` to the webhook at `addr` (TLS, trusting `ca`) and returns it as admitted:
/// patched if the webhook patched it; an error if it was refused or the call failed
/// (which a `failurePolicy: Ignore` webhook turns into the pod unchanged).
pub async fn admit(
    addr: SocketAddr,
    ca: &Path,
    namespace: &str,
    pod: &Value,
) -> anyhow::Result<Value> {
    let config = tls_config(ca, None)?;
    let mut client = ApiClient::connect(addr, config).await?;
    let uid = format!(
        "review-{}",
        pod["metadata"]["name"].as_str().unwrap_or("pod")
    );
    let (status, answer) = client
        .post("/mutate", None, review(&uid, namespace, pod))
        .await?;
    if status != 200 {
        bail!("the webhook answered {status}: {answer}");
    }
    let response = &answer["response"];
    if response["uid"] != uid.as_str() {
        bail!("the webhook answered for another review: {answer}");
    }
    if response["allowed"] != true {
        bail!("the webhook refused the pod: {}", response["status"]);
    }
    let Some(patch) = response.get("patch") else {
        return Ok(pod.clone());
    };
    if response["patchType"] != "JSONPatch" {
        bail!("unknown patchType {}", response["patchType"]);
    }
    let patch: json_patch::Patch = serde_json::from_slice(&patch_bytes(patch)?)?;
    let mut patched = pod.clone();
    json_patch::patch(&mut patched, &patch).context("applying the webhook's patch")?;
    Ok(patched)
}
