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

/// The annotation keys in force: the standard ones above, or the ones kube2iam users
/// renamed with its flags (`--iam-role-key`, `--iam-external-id`,
/// `--iam-role-session-name-key`, `--namespace-key`). Set once at start-up, read
/// everywhere a key is read or named (parsing, policy, messages, `explain`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keys {
    /// Pod: the role.
    pub role: &'static str,
    /// Pod: the external ID.
    pub external_id: &'static str,
    /// Pod: the session name.
    pub session_name: &'static str,
    /// Pod: the session duration.
    pub session_duration: &'static str,
    /// Namespace (kiam): the permitted regex.
    pub permitted: &'static str,
    /// Namespace (kube2iam): the allowed-roles globs.
    pub allowed_roles: &'static str,
}

/// kiam's and kube2iam's own keys.
pub const STANDARD: Keys = Keys {
    role: ROLE,
    external_id: EXTERNAL_ID,
    session_name: SESSION_NAME,
    session_duration: SESSION_DURATION,
    permitted: PERMITTED,
    allowed_roles: ALLOWED_ROLES,
};

static KEYS: std::sync::OnceLock<Keys> = std::sync::OnceLock::new();

/// The keys in force ([`STANDARD`] unless [`set_keys`] said otherwise).
pub fn keys() -> &'static Keys {
    KEYS.get().unwrap_or(&STANDARD)
}

/// Sets the keys for the life of the process; `Err` with them if they were set already.
pub fn set_keys(keys: Keys) -> Result<(), Keys> {
    KEYS.set(keys)
}

/// An annotation key that Kubernetes would not accept.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "{flag} {key:?} is not an annotation key of its own (PREFIX/NAME, e.g. example.com/role, and no key named twice)"
)]
pub struct KeyError {
    flag: &'static str,
    key: String,
}

impl Keys {
    /// The standard keys with the pod keys and kube2iam's namespace key replaced. Each is
    /// checked to be an annotation key, and kept for the life of the process.
    pub fn renamed(
        role: &str,
        external_id: &str,
        session_name: &str,
        allowed_roles: &str,
    ) -> Result<Self, KeyError> {
        let key = |flag: &'static str, key: &str| -> Result<&'static str, KeyError> {
            let key = key.trim();
            if !is_annotation_key(key) {
                return Err(KeyError {
                    flag,
                    key: key.to_string(),
                });
            }
            if let Some(standard) = [ROLE, EXTERNAL_ID, SESSION_NAME, ALLOWED_ROLES]
                .into_iter()
                .find(|s| *s == key)
            {
                return Ok(standard);
            }
            // Four short strings, once per process: they live as long as it does.
            Ok(Box::leak(key.to_string().into_boxed_str()))
        };
        let keys = Self {
            role: key("--iam-role-key", role)?,
            external_id: key("--iam-external-id", external_id)?,
            session_name: key("--iam-role-session-name-key", session_name)?,
            allowed_roles: key("--namespace-key", allowed_roles)?,
            ..STANDARD
        };
        // One key, one meaning: a key named twice would be read as two things.
        let all = [
            keys.role,
            keys.external_id,
            keys.session_name,
            keys.session_duration,
            keys.permitted,
            keys.allowed_roles,
            MIRROR,
        ];
        for (i, k) in all.iter().enumerate() {
            if all[..i].contains(k) {
                return Err(KeyError {
                    flag: "annotation keys",
                    key: (*k).to_string(),
                });
            }
        }
        Ok(keys)
    }

    /// Whether `key` is one of these keys (or the kubelet's mirror mark), so the parser
    /// keeps it.
    pub fn reads(&self, key: &str) -> bool {
        key == MIRROR
            || [
                self.role,
                self.external_id,
                self.session_name,
                self.session_duration,
                self.permitted,
                self.allowed_roles,
            ]
            .contains(&key)
    }
}

/// `[PREFIX/]NAME` as Kubernetes accepts it: a DNS-subdomain prefix of at most 253
/// characters, and a name of 1 to 63 of `[A-Za-z0-9._-]` starting and ending alphanumeric.
fn is_annotation_key(key: &str) -> bool {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    let alnum_ends = |s: &str| {
        s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
            && s.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric())
    };
    let name_ok = (1..=63).contains(&name.len())
        && alnum_ends(name)
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    let prefix_ok = prefix.is_none_or(|p| {
        (1..=253).contains(&p.len())
            && p.split('.').all(|label| {
                (1..=63).contains(&label.len())
                    && alnum_ends(label)
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            })
    });
    name_ok && prefix_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renamed_keys_are_checked() {
        let keys = Keys::renamed(
            "example.com/role",
            EXTERNAL_ID,
            SESSION_NAME,
            "example.com/allowed",
        )
        .unwrap();
        assert_eq!(
            (keys.role, keys.allowed_roles),
            ("example.com/role", "example.com/allowed")
        );
        assert_eq!(keys.permitted, PERMITTED);
        assert!(keys.reads("example.com/role") && keys.reads(MIRROR) && !keys.reads(ROLE));
        for bad in [
            "",
            "a/b/c",
            "Example.com/role",
            "example.com/",
            "/role",
            "-x",
            "x y",
        ] {
            assert!(
                Keys::renamed(bad, EXTERNAL_ID, SESSION_NAME, ALLOWED_ROLES).is_err(),
                "{bad:?}"
            );
        }
        assert!(Keys::renamed("role", EXTERNAL_ID, SESSION_NAME, ALLOWED_ROLES).is_ok());
        // One key for two things, or a key that is already another's, is refused.
        assert!(
            Keys::renamed(
                "example.com/k",
                "example.com/k",
                SESSION_NAME,
                ALLOWED_ROLES
            )
            .is_err()
        );
        assert!(Keys::renamed(ROLE, EXTERNAL_ID, SESSION_NAME, PERMITTED).is_err());
    }
}
