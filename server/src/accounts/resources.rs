//! ServiceAccounts and association objects as the server reads them: names, the IRSA role
//! annotation, and the association's spec. Everything else is skipped by the parser.

use std::collections::BTreeMap;

use k8s_openapi::{NamespaceResourceScope, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use podiam_common::pod_identity;
use serde::{Deserialize, Deserializer};

use super::{AccountKey, Association};
use crate::pods::resources::lean_resource;

/// A ServiceAccount, reduced to its key and role annotation.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct WatchedServiceAccount {
    /// Name, namespace, resourceVersion and the role annotation only.
    #[serde(deserialize_with = "account_meta")]
    pub metadata: ObjectMeta,
}

/// A `PodIdentityAssociation` (group `podiam.io`): gives the pods of one ServiceAccount in
/// the object's namespace a role, as an EKS Pod Identity association does.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct WatchedAssociation {
    /// Name, namespace, resourceVersion.
    #[serde(deserialize_with = "account_meta")]
    pub metadata: ObjectMeta,
    /// What it says.
    #[serde(default)]
    pub spec: Option<AssociationSpec>,
}

/// The association's spec, as in EKS's `CreatePodIdentityAssociation`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AssociationSpec {
    /// The ServiceAccount (in the object's namespace).
    #[serde(default)]
    pub service_account: Option<String>,
    /// The role: a full ARN, or a name resolved against the base role ARN.
    #[serde(default)]
    pub role_arn: Option<String>,
    /// A role the first one's session assumes in turn (role chaining).
    #[serde(default)]
    pub target_role_arn: Option<String>,
    /// Leaves out the session tags.
    #[serde(default)]
    pub disable_session_tags: Option<bool>,
}

/// The object could not be indexed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum AccountObjectError {
    /// No namespace or no name.
    #[error("object has no namespace or no name")]
    NoKey,
    /// An association without `spec.serviceAccount` or `spec.roleArn`.
    #[error("association {0} needs spec.serviceAccount and spec.roleArn")]
    Incomplete(AccountKey),
}

lean_resource!(
    WatchedServiceAccount,
    "ServiceAccount",
    "serviceaccounts",
    NamespaceResourceScope
);
lean_resource!(
    WatchedAssociation,
    "podiam.io/v1alpha1",
    pod_identity::GROUP,
    pod_identity::VERSION,
    pod_identity::KIND,
    pod_identity::PLURAL,
    NamespaceResourceScope
);

fn key(meta: &ObjectMeta) -> Result<AccountKey, AccountObjectError> {
    match (meta.namespace.as_deref(), meta.name.as_deref()) {
        (Some(ns), Some(name)) if !ns.is_empty() && !name.is_empty() => {
            Ok(AccountKey::new(ns, name))
        }
        _ => Err(AccountObjectError::NoKey),
    }
}

// === impl WatchedServiceAccount ===

impl WatchedServiceAccount {
    /// Its key.
    pub fn key(&self) -> Result<AccountKey, AccountObjectError> {
        key(&self.metadata)
    }

    /// Its role annotation, if set and not blank.
    pub fn role(&self) -> Option<&str> {
        self.metadata
            .annotations
            .as_ref()?
            .get(pod_identity::ROLE_ARN_ANNOTATION)
            .map(|r| r.trim())
            .filter(|r| !r.is_empty())
    }
}

// === impl WatchedAssociation ===

impl WatchedAssociation {
    /// Its key.
    pub fn key(&self) -> Result<AccountKey, AccountObjectError> {
        key(&self.metadata)
    }

    /// The association, if complete.
    pub fn into_association(self) -> Result<Association, AccountObjectError> {
        let key = self.key()?;
        let spec = self.spec.unwrap_or_default();
        let nonblank =
            |s: Option<String>| s.map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
        match (nonblank(spec.service_account), nonblank(spec.role_arn)) {
            (Some(service_account), Some(role_arn)) => Ok(Association {
                key,
                service_account: service_account.into(),
                role_arn: role_arn.into(),
                target_role_arn: nonblank(spec.target_role_arn).map(Into::into),
                session_tags: !spec.disable_session_tags.unwrap_or(false),
            }),
            _ => Err(AccountObjectError::Incomplete(key)),
        }
    }
}

/// The metadata fields read, with only the role annotation kept.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LeanMeta {
    name: Option<String>,
    namespace: Option<String>,
    resource_version: Option<String>,
    #[serde(default)]
    annotations: Option<BTreeMap<String, serde_json::Value>>,
}

fn account_meta<'de, D: Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    let m = LeanMeta::deserialize(d)?;
    let annotations = m.annotations.map(|all| {
        all.into_iter()
            .filter(|(k, _)| k == pod_identity::ROLE_ARN_ANNOTATION)
            .filter_map(|(k, v)| Some((k, v.as_str()?.to_string())))
            .collect()
    });
    Ok(ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        resource_version: m.resource_version,
        annotations,
        ..ObjectMeta::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_role_annotation_and_the_spec_only() {
        let sa: WatchedServiceAccount = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "app", "namespace": "team", "resourceVersion": "3",
                "annotations": {"eks.amazonaws.com/role-arn": " arn:aws:iam::1:role/app ", "x": {"y": 1}},
                "labels": {"a": "b"}},
            "secrets": [{"name": "s"}]
        }))
        .unwrap();
        assert_eq!(sa.key().unwrap(), AccountKey::new("team", "app"));
        assert_eq!(sa.role(), Some("arn:aws:iam::1:role/app"));
        assert_eq!(sa.metadata.annotations.as_ref().map(BTreeMap::len), Some(1));

        let a: WatchedAssociation = serde_json::from_value(serde_json::json!({
            "apiVersion": "podiam.io/v1alpha1", "kind": "PodIdentityAssociation",
            "metadata": {"name": "app-s3", "namespace": "team"},
            "spec": {"serviceAccount": "app", "roleArn": "arn:aws:iam::1:role/s3", "disableSessionTags": true}
        }))
        .unwrap();
        let a = a.into_association().unwrap();
        assert_eq!(&*a.service_account, "app");
        assert!(!a.session_tags);

        let incomplete: WatchedAssociation = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "x", "namespace": "team"}, "spec": {"serviceAccount": "app"}
        }))
        .unwrap();
        assert_eq!(
            incomplete.into_association(),
            Err(AccountObjectError::Incomplete(AccountKey::new("team", "x")))
        );
    }
}
