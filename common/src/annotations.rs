//! Annotation names. They are kiam's and kube2iam's, so that workloads migrating from either
//! keep working unchanged.

/// Pod: the IAM role the pod runs as (a name, `path/name`, or a full ARN).
pub const ROLE: &str = "iam.amazonaws.com/role";

/// Pod: the external ID to pass to `sts:AssumeRole`.
pub const EXTERNAL_ID: &str = "iam.amazonaws.com/external-id";

/// Pod: the STS session name (default: derived from the pod's namespace and name).
pub const SESSION_NAME: &str = "iam.amazonaws.com/session-name";

/// Pod: the requested session duration (`1h`, `90m`, `3600s` or plain seconds).
pub const SESSION_DURATION: &str = "iam.amazonaws.com/session-duration";

/// Pod, set by the kubelet: the pod is the mirror of a static pod from the node's
/// manifest directory. A kubelet may create mirror pods in any namespace with any
/// annotations, so such a pod is no identity unless the operator opts in.
pub const MIRROR: &str = "kubernetes.io/config.mirror";

/// Namespace (kiam): a regular expression, matched anchored against the full role ARN.
pub const PERMITTED: &str = "iam.amazonaws.com/permitted";

/// Namespace (kube2iam): a JSON list of role names, ARNs or globs (`*`) that pods may use.
pub const ALLOWED_ROLES: &str = "iam.amazonaws.com/allowed-roles";
