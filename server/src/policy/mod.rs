//! Policy: from a pod and its namespace to a [`Decision`].
//!
//! The role comes from the pod's `iam.amazonaws.com/role` annotation, or the configured
//! default role; bare names are resolved against the base role ARN. The namespace's policy
//! (see [`namespace`]) must permit the resolved ARN; the default role gets no exemption.
//! The optional session annotations are validated here too, so that a decision that says
//! "allowed" carries everything an `sts:AssumeRole` call needs.
//!
//! This module is plain data: it knows nothing of Kubernetes clients or STS.

use std::{fmt, time::Duration};

use podiam_common::{
    annotations,
    arn::{ArnError, BaseRoleArn, RoleArn},
};
use serde::Serialize;

use self::namespace::NamespaceInfo;
use crate::{
    accounts::{AccountKey, AccountRole},
    pods::PodInfo,
};

pub mod namespace;
mod session;

pub use self::namespace::{NamespacePolicy, Violation};

/// Shortest session podiam assumes. STS accepts 15 min, but SDKs want credentials with
/// more than 15 min left, so a shorter session could never be handed out.
pub const MIN_SESSION: Duration = Duration::from_secs(1800);
/// Longest session STS accepts for `AssumeRole`.
pub const MAX_SESSION: Duration = Duration::from_secs(43_200);

/// Policy settings from the command line, validated at startup.
#[derive(Clone, Debug, Default)]
pub struct PolicyConfig {
    /// What bare role names are resolved against.
    pub base_role_arn: Option<BaseRoleArn>,
    /// The role of pods that name none (still subject to the namespace policy).
    pub default_role: Option<RoleArn>,
    /// Whether mirror (static) pods may have roles (`--allow-mirror-pods`).
    pub allow_mirror_pods: bool,
}

/// The answer for one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The pod may have `grant.role`.
    Allowed(Grant),
    /// The pod gets no credentials.
    Denied(Denial),
}

/// A permitted role and the session parameters to assume it with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Grant {
    /// The resolved role.
    pub role_arn: RoleArn,
    /// Where the role came from.
    pub role_source: RoleSource,
    /// `iam.amazonaws.com/external-id`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external_id: Option<String>,
    /// `iam.amazonaws.com/session-name` prefixed with the pod's namespace
    /// (`NAMESPACE.NAME`); without it the broker derives one from the pod.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_name: Option<String>,
    /// `iam.amazonaws.com/session-duration`; without it the broker's default applies.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "session::serialize_secs"
    )]
    pub session_duration: Option<Duration>,
    /// Tag the session as EKS Pod Identity does (container-credentials path, unless the
    /// association turns tags off).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub pod_identity_tags: bool,
    /// The role assumed first, whose session assumes `role_arn` (an association's target
    /// role; both must be permitted by the namespace).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chained_from: Option<RoleArn>,
}

/// Where a role came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RoleSource {
    /// The pod's `iam.amazonaws.com/role` annotation.
    Annotation,
    /// `--default-role`.
    Default,
    /// The ServiceAccount's `eks.amazonaws.com/role-arn` annotation.
    ServiceAccount,
    /// A `PodIdentityAssociation` object.
    Association,
}

/// Why a pod gets no credentials: each says what to change.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Denial {
    /// A mirror (static) pod: any node's kubelet can create one in any namespace with any
    /// annotations, so it is no proof of identity.
    #[error(
        "the pod is a mirror of a static pod ({} or a Node owner), and mirror pods get no credentials unless the server runs with --allow-mirror-pods",
        annotations::MIRROR
    )]
    MirrorPod,
    /// The pod names no role and there is no default.
    #[error(
        "the pod has no {} annotation and no default role is configured",
        annotations::keys().role
    )]
    NoRole,
    /// The role annotation (or default) does not resolve to a valid ARN.
    #[error("the role {value:?} is invalid: {source}")]
    InvalidRole {
        /// What the pod asked for.
        value: String,
        /// Why it is invalid.
        source: ArnError,
    },
    /// The pod's ServiceAccount has no role (container-credentials path).
    #[error(
        "ServiceAccount {service_account} has no role: no PodIdentityAssociation names it and it has no {} annotation",
        podiam_common::pod_identity::ROLE_ARN_ANNOTATION
    )]
    NoServiceAccountRole {
        /// The ServiceAccount.
        service_account: AccountKey,
    },
    /// Several associations name the ServiceAccount: none is trusted.
    #[error(
        "ServiceAccount {service_account} is named by several PodIdentityAssociations ({}): delete all but one",
        .names.join(", ")
    )]
    ConflictingAssociations {
        /// The ServiceAccount.
        service_account: AccountKey,
        /// The associations' names.
        names: Vec<String>,
    },
    /// The pod's namespace is not (yet) known.
    #[error("namespace {namespace:?} is not known to the server")]
    NamespaceNotFound {
        /// The namespace.
        namespace: String,
    },
    /// The namespace's policy refuses the role.
    #[error("role {role} is not permitted in namespace {namespace:?}: {violation}")]
    NotPermitted {
        /// The resolved role.
        role: RoleArn,
        /// The namespace.
        namespace: String,
        /// What the policy said.
        violation: Violation,
    },
    /// A session annotation is malformed.
    #[error("annotation {annotation} = {value:?} is invalid: {reason}")]
    InvalidAnnotation {
        /// The annotation's name.
        annotation: &'static str,
        /// Its value.
        value: String,
        /// Why it is invalid.
        reason: String,
    },
}

// === impl Decision ===

impl Decision {
    /// Decides for `pod` in `namespace` (`None`: the namespace is not in the index).
    pub fn for_pod(
        pod: &PodInfo,
        namespace: Option<&NamespaceInfo>,
        config: &PolicyConfig,
    ) -> Self {
        match decide(pod, namespace, config) {
            Ok(grant) => Decision::Allowed(grant),
            Err(denial) => Decision::Denied(denial),
        }
    }

    /// Decides for `pod` on the container-credentials path: its role is `account`'s (the
    /// ServiceAccount its token was issued for), under the same namespace policy.
    pub fn for_service_account(
        pod: &PodInfo,
        account: &AccountKey,
        role: &AccountRole,
        namespace: Option<&NamespaceInfo>,
        config: &PolicyConfig,
    ) -> Self {
        match decide_service_account(pod, account, role, namespace, config) {
            Ok(grant) => Decision::Allowed(grant),
            Err(denial) => Decision::Denied(denial),
        }
    }

    /// The grant, if allowed.
    pub fn allowed(&self) -> Option<&Grant> {
        match self {
            Decision::Allowed(grant) => Some(grant),
            Decision::Denied(_) => None,
        }
    }
}

fn decide(
    pod: &PodInfo,
    namespace: Option<&NamespaceInfo>,
    config: &PolicyConfig,
) -> Result<Grant, Denial> {
    if pod.mirror && !config.allow_mirror_pods {
        return Err(Denial::MirrorPod);
    }
    let ann = &pod.annotations;
    let (role_arn, role_source) = match ann.role.as_deref().map(str::trim) {
        Some(value) if !value.is_empty() => {
            let arn = RoleArn::resolve(value, config.base_role_arn.as_ref()).map_err(|source| {
                Denial::InvalidRole {
                    value: value.to_string(),
                    source,
                }
            })?;
            (arn, RoleSource::Annotation)
        }
        _ => match &config.default_role {
            Some(arn) => (arn.clone(), RoleSource::Default),
            None => return Err(Denial::NoRole),
        },
    };

    permitted(pod, &role_arn, namespace)?;
    Ok(Grant {
        role_arn,
        role_source,
        external_id: session::external_id(ann.external_id.as_deref())?,
        session_name: session::session_name(&pod.key.namespace, ann.session_name.as_deref())?,
        session_duration: session::duration(ann.session_duration.as_deref())?,
        pod_identity_tags: false,
        chained_from: None,
    })
}

fn decide_service_account(
    pod: &PodInfo,
    account: &AccountKey,
    role: &AccountRole,
    namespace: Option<&NamespaceInfo>,
    config: &PolicyConfig,
) -> Result<Grant, Denial> {
    if pod.mirror && !config.allow_mirror_pods {
        return Err(Denial::MirrorPod);
    }
    let (value, role_source, tags, target) = match role {
        AccountRole::Association(a) => (
            &a.role_arn,
            RoleSource::Association,
            a.session_tags,
            a.target_role_arn.as_ref(),
        ),
        AccountRole::Annotation(value) => (value, RoleSource::ServiceAccount, true, None),
        AccountRole::None => {
            return Err(Denial::NoServiceAccountRole {
                service_account: account.clone(),
            });
        }
        AccountRole::Conflict(names) => {
            return Err(Denial::ConflictingAssociations {
                service_account: account.clone(),
                names: names.iter().map(ToString::to_string).collect(),
            });
        }
    };
    let resolve = |value: &str| {
        RoleArn::resolve(value, config.base_role_arn.as_ref()).map_err(|source| {
            Denial::InvalidRole {
                value: value.to_string(),
                source,
            }
        })
    };
    let first = resolve(value)?;
    permitted(pod, &first, namespace)?;
    // With a target role, the pod gets that one's credentials: the namespace must permit
    // it too, or an association could reach any role the first may assume.
    let (role_arn, chained_from) = match target {
        Some(target) => {
            let target = resolve(target)?;
            permitted(pod, &target, namespace)?;
            (target, Some(first))
        }
        None => (first, None),
    };
    Ok(Grant {
        role_arn,
        role_source,
        external_id: None,
        session_name: None,
        session_duration: None,
        pod_identity_tags: tags,
        chained_from,
    })
}

/// The namespace's policy must permit `role_arn`, whatever named it.
fn permitted(
    pod: &PodInfo,
    role_arn: &RoleArn,
    namespace: Option<&NamespaceInfo>,
) -> Result<(), Denial> {
    let Some(namespace) = namespace else {
        return Err(Denial::NamespaceNotFound {
            namespace: pod.key.namespace.to_string(),
        });
    };
    namespace
        .policy
        .check(role_arn)
        .map_err(|violation| Denial::NotPermitted {
            role: role_arn.clone(),
            namespace: namespace.name.to_string(),
            violation,
        })
}

// === impl Denial ===

impl Denial {
    /// A stable machine-readable reason, for metrics labels, Events and JSON.
    pub fn code(&self) -> &'static str {
        match self {
            Denial::MirrorPod => "mirror_pod",
            Denial::NoRole => "no_role",
            Denial::NoServiceAccountRole { .. } => "no_service_account_role",
            Denial::ConflictingAssociations { .. } => "conflicting_associations",
            Denial::InvalidRole { .. } => "invalid_role",
            Denial::NamespaceNotFound { .. } => "namespace_not_found",
            Denial::NotPermitted {
                violation: Violation::NoPolicy,
                ..
            } => "namespace_no_policy",
            Denial::NotPermitted {
                violation: Violation::Invalid { .. },
                ..
            } => "namespace_policy_invalid",
            Denial::NotPermitted { .. } => "role_not_permitted",
            Denial::InvalidAnnotation { .. } => "invalid_annotation",
        }
    }
}

impl fmt::Display for RoleSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RoleSource::Annotation => write!(f, "annotation {}", annotations::keys().role),
            RoleSource::Default => f.write_str("--default-role"),
            RoleSource::ServiceAccount => write!(
                f,
                "the ServiceAccount's {} annotation",
                podiam_common::pod_identity::ROLE_ARN_ANNOTATION
            ),
            RoleSource::Association => f.write_str("a PodIdentityAssociation"),
        }
    }
}

#[cfg(test)]
mod tests;
