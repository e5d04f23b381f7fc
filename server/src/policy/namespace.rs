//! A namespace's role policy.
//!
//! A namespace keeps only its annotations' text. Compiled forms live in a bounded
//! [`PolicyCache`] shared by all namespaces and keyed by that text: namespaces with the
//! same policy share one compiled form, and 5,000 namespaces with distinct policies do
//! not keep 5,000 compiled regexes (and their match caches, ~5 KB each) in memory. An
//! evicted policy is compiled again on its next use (tens of microseconds).
//!
//! - kiam: `iam.amazonaws.com/permitted` is a regular expression matched against the whole
//!   role ARN (anchored: `web` does not permit `web-admin`).
//! - kube2iam: `iam.amazonaws.com/allowed-roles` is a JSON list of role names, `path/name`s
//!   or ARNs, where `*` matches any run of characters (kube2iam's glob).
//!
//! A namespace may carry both during a migration; a role is permitted when either permits
//! it. A namespace with neither permits nothing. A malformed annotation permits nothing and
//! says why.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    sync::Arc,
};

use podiam_common::{
    annotations,
    arn::{BaseRoleArn, RoleArn},
};
// regex-lite rather than regex: a compiled namespace policy costs ~2.5 KB instead of
// ~11 KB (55 MB at 5,000 namespaces with distinct policies), matching a 60-byte ARN is
// still linear-time and sub-microsecond, and its ASCII-only `\w`/`\d` are what kiam's Go
// RE2 regexes meant. Unicode classes (`\p{..}`) are refused with the parser's reason.
// Anchoring goes through `pattern::anchored`, which refuses a pattern that is not a whole
// expression on its own: wrapped as text, `x)|(.*` would permit every role in every account.
use podiam_common::pattern::anchored;
use regex_lite::Regex;

/// Longest `allowed-roles` list accepted.
const MAX_ALLOWED_ROLES: usize = 1000;

/// Compiled policies kept at most.
const COMPILED_POLICIES: u64 = 1024;

/// The two policy annotations' text: (`permitted`, `allowed-roles`).
pub type PolicySource = (Option<Arc<str>>, Option<Arc<str>>);

/// A namespace's role policy: its annotations, checked through the shared cache.
#[derive(Clone, Debug)]
pub struct NamespacePolicy {
    source: PolicySource,
    cache: PolicyCache,
}

/// Compiled policies by annotation text, bounded; cheap to clone.
#[derive(Clone)]
pub struct PolicyCache {
    inner: Arc<CacheInner>,
}

struct CacheInner {
    base: Option<BaseRoleArn>,
    compiled: moka::sync::Cache<PolicySource, Arc<Compiled>>,
}

/// A policy's compiled form.
#[derive(Debug)]
struct Compiled {
    permitted: Option<Rule>,
    allowed_roles: Option<Rule>,
}

/// Why a namespace's policy did not permit a role.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Violation {
    /// The namespace has neither annotation.
    NoPolicy,
    /// An annotation could not be compiled.
    Invalid {
        /// The annotation's name.
        annotation: &'static str,
        /// Why it is invalid.
        reason: String,
    },
    /// The policy is valid and the role is not in it.
    NotPermitted {
        /// The policy as written, for the message.
        policy: String,
        /// A hint for a common mistake, if one applies.
        hint: Option<String>,
    },
}

#[derive(Clone, Debug)]
enum Rule {
    Compiled {
        source: String,
        patterns: Vec<Regex>,
    },
    Invalid {
        reason: String,
    },
}

// === impl PolicyCache ===

impl PolicyCache {
    /// An empty cache; bare role names in `allowed-roles` resolve against `base`.
    pub fn new(base: Option<BaseRoleArn>) -> Self {
        Self {
            inner: Arc::new(CacheInner {
                base,
                compiled: moka::sync::Cache::new(COMPILED_POLICIES),
            }),
        }
    }

    /// The policy of a namespace with these annotation values (either may be absent).
    pub fn policy(&self, permitted: Option<&str>, allowed_roles: Option<&str>) -> NamespacePolicy {
        NamespacePolicy {
            source: (permitted.map(Into::into), allowed_roles.map(Into::into)),
            cache: self.clone(),
        }
    }

    /// Number of compiled policies held.
    pub fn len(&self) -> u64 {
        self.inner.compiled.run_pending_tasks();
        self.inner.compiled.entry_count()
    }

    /// Whether no policy is compiled.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn compiled(&self, source: &PolicySource) -> Arc<Compiled> {
        self.inner.compiled.get_with_by_ref(source, || {
            let (permitted, allowed) = source;
            Arc::new(Compiled {
                permitted: permitted.as_deref().map(compile_permitted),
                allowed_roles: allowed
                    .as_deref()
                    .map(|v| compile_allowed_roles(v, self.inner.base.as_ref())),
            })
        })
    }
}

impl fmt::Debug for PolicyCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PolicyCache")
            .field("base", &self.inner.base)
            .field("compiled", &self.inner.compiled.entry_count())
            .finish()
    }
}

// === impl NamespacePolicy ===

impl NamespacePolicy {
    /// Whether the namespace has any policy annotation at all.
    pub fn is_empty(&self) -> bool {
        self.source.0.is_none() && self.source.1.is_none()
    }

    /// The annotations' text.
    pub fn source(&self) -> &PolicySource {
        &self.source
    }

    /// The reason the policy is malformed, if it is (compiles it if needed).
    pub fn invalid(&self) -> Option<Violation> {
        match self.check_compiled(None) {
            Err(v @ Violation::Invalid { .. }) => Some(v),
            _ => None,
        }
    }

    /// Checks `role` against the policy.
    pub fn check(&self, role: &RoleArn) -> Result<(), Violation> {
        self.check_compiled(Some(role))
    }

    /// Checks `role`, or with `None` only the policy's own validity.
    fn check_compiled(&self, role: Option<&RoleArn>) -> Result<(), Violation> {
        if self.is_empty() {
            return Err(Violation::NoPolicy);
        }
        let compiled = self.cache.compiled(&self.source);
        let Some(role) = role else {
            return compiled.validity();
        };
        compiled.check(role)
    }
}

// === impl Compiled ===

impl Compiled {
    fn validity(&self) -> Result<(), Violation> {
        for (annotation, rule) in [
            (annotations::keys().permitted, &self.permitted),
            (annotations::keys().allowed_roles, &self.allowed_roles),
        ] {
            if let Some(Rule::Invalid { reason }) = rule {
                return Err(Violation::Invalid {
                    annotation,
                    reason: reason.clone(),
                });
            }
        }
        Ok(())
    }

    fn check(&self, role: &RoleArn) -> Result<(), Violation> {
        let rules = [
            (annotations::keys().permitted, &self.permitted),
            (annotations::keys().allowed_roles, &self.allowed_roles),
        ];
        if rules.iter().all(|(_, r)| r.is_none()) {
            return Err(Violation::NoPolicy);
        }
        // Fail closed: a malformed annotation denies even when the other would permit.
        for (annotation, rule) in &rules {
            if let Some(Rule::Invalid { reason }) = rule {
                return Err(Violation::Invalid {
                    annotation,
                    reason: reason.clone(),
                });
            }
        }
        let mut written = Vec::new();
        let mut hint = None;
        for (annotation, rule) in rules {
            let Some(Rule::Compiled { source, patterns }) = rule else {
                continue;
            };
            if patterns.iter().any(|p| p.is_match(role.as_str())) {
                return Ok(());
            }
            written.push(format!("{annotation}={source}"));
            if annotation == annotations::keys().permitted && hint.is_none() {
                hint = name_only_hint(&patterns[0], role);
            }
        }
        Err(Violation::NotPermitted {
            policy: written.join(" "),
            hint,
        })
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::NoPolicy => write!(
                f,
                "the namespace has no {} or {} annotation, so it permits no role",
                annotations::keys().permitted,
                annotations::keys().allowed_roles
            ),
            Violation::Invalid { annotation, reason } => {
                write!(
                    f,
                    "the namespace's {annotation} annotation is invalid: {reason}"
                )
            }
            Violation::NotPermitted { policy, hint } => {
                write!(f, "the namespace's policy does not permit it ({policy})")?;
                if let Some(hint) = hint {
                    write!(f, "; {hint}")?;
                }
                Ok(())
            }
        }
    }
}

// === helpers ===

fn compile_permitted(value: &str) -> Rule {
    let source = value.trim().to_string();
    match anchored(&source) {
        Ok(regex) => Rule::Compiled {
            source,
            patterns: vec![regex],
        },
        Err(error) => Rule::Invalid {
            reason: error.to_string(),
        },
    }
}

fn compile_allowed_roles(value: &str, base: Option<&BaseRoleArn>) -> Rule {
    let entries: Vec<String> = match serde_json::from_str(value) {
        Ok(entries) => entries,
        Err(error) => {
            return Rule::Invalid {
                reason: format!("expected a JSON list of role names or ARNs: {error}"),
            };
        }
    };
    if entries.len() > MAX_ALLOWED_ROLES {
        return Rule::Invalid {
            reason: format!("more than {MAX_ALLOWED_ROLES} entries"),
        };
    }
    let mut patterns = Vec::with_capacity(entries.len());
    for entry in &entries {
        let entry = entry.trim();
        let full = if entry.starts_with("arn:") {
            entry.to_string()
        } else if let Some(base) = base {
            format!("{base}{}", entry.trim_start_matches('/'))
        } else {
            return Rule::Invalid {
                reason: format!(
                    "entry {entry:?} is not an ARN and no base role ARN is configured (--base-role-arn)"
                ),
            };
        };
        // kube2iam's glob: `*` matches any run of characters, nothing else is special.
        let pattern = full
            .split('*')
            .map(regex_lite::escape)
            .collect::<Vec<_>>()
            .join(".*");
        match anchored(&pattern) {
            Ok(regex) => patterns.push(regex),
            Err(error) => {
                return Rule::Invalid {
                    reason: format!("entry {entry:?}: {error}"),
                };
            }
        }
    }
    Rule::Compiled {
        source: value.trim().to_string(),
        patterns,
    }
}

/// kiam before v4 matched `permitted` against the role as annotated; a regex written for
/// that matches the name but not the ARN. Say so rather than leave the user guessing.
fn name_only_hint(regex: &Regex, role: &RoleArn) -> Option<String> {
    let relative = format!("{}{}", role.path().trim_start_matches('/'), role.name());
    (regex.is_match(role.name()) || regex.is_match(&relative)).then(|| {
        format!(
            "the regex matches the role name but is matched against the full ARN {role}: \
             write it as e.g. arn:{}:iam::{}:role/<regex>",
            role.partition(),
            role.account()
        )
    })
}

/// A namespace as the server keeps it.
#[derive(Debug)]
pub struct NamespaceInfo {
    /// The namespace's name.
    pub name: Arc<str>,
    /// Its role policy.
    pub policy: NamespacePolicy,
}

/// Namespaces by name, with their policies.
#[derive(Debug)]
pub struct NamespaceIndex {
    policies: PolicyCache,
    namespaces: HashMap<Arc<str>, Arc<NamespaceInfo>>,
}

// === impl NamespaceIndex ===

impl NamespaceIndex {
    /// An empty index; bare names in `allowed-roles` resolve against `base`.
    pub fn new(base: Option<BaseRoleArn>) -> Self {
        Self {
            policies: PolicyCache::new(base),
            namespaces: HashMap::new(),
        }
    }

    /// Adds or replaces a namespace from its policy annotations' values. A malformed
    /// policy is reported here, once, as well as in every denial it causes.
    pub fn apply(&mut self, name: &str, permitted: Option<&str>, allowed_roles: Option<&str>) {
        let policy = self.policies.policy(permitted, allowed_roles);
        let changed = self
            .namespaces
            .get(name)
            .is_none_or(|old| old.policy.source() != policy.source());
        if changed && let Some(violation) = policy.invalid() {
            tracing::warn!(namespace = name, %violation, "namespace policy is malformed: it permits nothing");
        }
        let name: Arc<str> = name.into();
        self.namespaces
            .insert(name.clone(), Arc::new(NamespaceInfo { name, policy }));
    }

    /// Removes a namespace; returns whether it was known.
    pub fn delete(&mut self, name: &str) -> bool {
        self.namespaces.remove(name).is_some()
    }

    /// After a re-list: removes every namespace not in `keep`.
    pub fn retain(&mut self, keep: &HashSet<Arc<str>>) -> usize {
        let before = self.namespaces.len();
        self.namespaces.retain(|name, _| keep.contains(name));
        before - self.namespaces.len()
    }

    /// The namespace with this name.
    pub fn get(&self, name: &str) -> Option<Arc<NamespaceInfo>> {
        self.namespaces.get(name).cloned()
    }

    /// Number of namespaces.
    pub fn len(&self) -> usize {
        self.namespaces.len()
    }

    /// Whether there are no namespaces.
    pub fn is_empty(&self) -> bool {
        self.namespaces.is_empty()
    }

    /// Number of compiled policies currently held (bounded).
    pub fn policies(&self) -> usize {
        usize::try_from(self.policies.len()).unwrap_or(usize::MAX)
    }
}
