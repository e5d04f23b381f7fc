//! ServiceAccount roles, for the container-credentials path.
//!
//! A pod on that path gets the role of the ServiceAccount its token was issued for. The
//! role comes from a [`PodIdentityAssociation`](resources::WatchedAssociation) object in
//! the ServiceAccount's namespace (for GitOps and Cluster API users), or else from the
//! ServiceAccount's IRSA annotation `eks.amazonaws.com/role-arn`, which many charts set
//! already. [`AccountIndex`] keeps both, stripped to what a decision reads, with the
//! associations also by ServiceAccount so that a request never scans. It is plain data: the
//! watchers in [`crate::cluster::watch`] fill it, and policy decides on what it answers.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    sync::Arc,
};

pub mod resources;

/// A ServiceAccount: namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AccountKey {
    /// Its namespace.
    pub namespace: Arc<str>,
    /// Its name.
    pub name: Arc<str>,
}

/// An association object: (namespace, ServiceAccount) → role.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Association {
    /// The object's namespace and name.
    pub key: AccountKey,
    /// The ServiceAccount it gives a role to (in the object's namespace).
    pub service_account: Arc<str>,
    /// The role, as written (a full ARN, or a name resolved against the base ARN).
    pub role_arn: Arc<str>,
    /// A role that `role_arn`'s session assumes in turn (role chaining, as EKS's
    /// `targetRoleArn`): the pod gets this one's credentials.
    pub target_role_arn: Option<Arc<str>>,
    /// Whether the session is tagged as EKS tags it (`spec.disableSessionTags` off).
    pub session_tags: bool,
}

/// Where a ServiceAccount's role comes from, as the index says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccountRole {
    /// Neither an association nor the annotation names a role.
    None,
    /// One association names it.
    Association(Arc<Association>),
    /// The ServiceAccount's `eks.amazonaws.com/role-arn` annotation.
    Annotation(Arc<str>),
    /// Several associations name the same ServiceAccount: none of them is trusted.
    Conflict(Vec<Arc<str>>),
}

/// ServiceAccounts' annotated roles and the association objects.
#[derive(Debug, Default)]
pub struct AccountIndex {
    /// The annotation's value, for ServiceAccounts that have it.
    annotated: HashMap<AccountKey, Arc<str>>,
    /// Associations by object key.
    associations: HashMap<AccountKey, Arc<Association>>,
    /// Object keys of the associations naming each ServiceAccount.
    by_account: HashMap<AccountKey, Vec<AccountKey>>,
}

// === impl AccountKey ===

impl AccountKey {
    /// The key of `namespace/name`.
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for AccountKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

// === impl Association ===

impl Association {
    /// The ServiceAccount it names.
    pub fn account(&self) -> AccountKey {
        AccountKey {
            namespace: self.key.namespace.clone(),
            name: self.service_account.clone(),
        }
    }
}

// === impl AccountIndex ===

impl AccountIndex {
    /// Adds, replaces or (with `None`) forgets a ServiceAccount's role annotation.
    pub fn apply_account(&mut self, key: AccountKey, role: Option<Arc<str>>) {
        match role {
            Some(role) => {
                self.annotated.insert(key, role);
            }
            None => {
                self.annotated.remove(&key);
            }
        }
    }

    /// Forgets a ServiceAccount.
    pub fn delete_account(&mut self, key: &AccountKey) -> bool {
        self.annotated.remove(key).is_some()
    }

    /// After a re-list of ServiceAccounts: forgets those not in `keep`.
    pub fn retain_accounts(&mut self, keep: &HashSet<AccountKey>) -> usize {
        let before = self.annotated.len();
        self.annotated.retain(|key, _| keep.contains(key));
        before - self.annotated.len()
    }

    /// Adds or replaces an association.
    pub fn apply_association(&mut self, association: Association) {
        let key = association.key.clone();
        self.delete_association(&key);
        let account = association.account();
        self.by_account
            .entry(account)
            .or_default()
            .push(key.clone());
        self.associations.insert(key, Arc::new(association));
    }

    /// Forgets an association.
    pub fn delete_association(&mut self, key: &AccountKey) -> bool {
        let Some(old) = self.associations.remove(key) else {
            return false;
        };
        let account = old.account();
        if let Some(keys) = self.by_account.get_mut(&account) {
            keys.retain(|k| k != key);
            if keys.is_empty() {
                self.by_account.remove(&account);
            }
        }
        true
    }

    /// After a re-list of associations: forgets those not in `keep`.
    pub fn retain_associations(&mut self, keep: &HashSet<AccountKey>) -> usize {
        let gone: Vec<AccountKey> = self
            .associations
            .keys()
            .filter(|k| !keep.contains(*k))
            .cloned()
            .collect();
        for key in &gone {
            self.delete_association(key);
        }
        gone.len()
    }

    /// The role of ServiceAccount `account`: an association's if there is exactly one,
    /// the annotation's if there is none.
    pub fn role_of(&self, account: &AccountKey) -> AccountRole {
        match self.by_account.get(account).map(Vec::as_slice) {
            Some([one]) => match self.associations.get(one) {
                Some(association) => AccountRole::Association(association.clone()),
                None => AccountRole::None,
            },
            Some(many) if !many.is_empty() => {
                let mut names: Vec<Arc<str>> = many.iter().map(|k| k.name.clone()).collect();
                names.sort();
                AccountRole::Conflict(names)
            }
            _ => match self.annotated.get(account) {
                Some(role) => AccountRole::Annotation(role.clone()),
                None => AccountRole::None,
            },
        }
    }

    /// ServiceAccounts with the annotation.
    pub fn annotated_len(&self) -> usize {
        self.annotated.len()
    }

    /// Association objects.
    pub fn associations_len(&self) -> usize {
        self.associations.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn association(ns: &str, name: &str, sa: &str, role: &str) -> Association {
        Association {
            key: AccountKey::new(ns, name),
            service_account: sa.into(),
            role_arn: role.into(),
            target_role_arn: None,
            session_tags: true,
        }
    }

    #[test]
    fn an_association_wins_over_the_annotation_and_two_conflict() {
        let mut index = AccountIndex::default();
        let sa = AccountKey::new("team", "app");
        assert_eq!(index.role_of(&sa), AccountRole::None);
        index.apply_account(sa.clone(), Some("arn:aws:iam::1:role/irsa".into()));
        assert_eq!(
            index.role_of(&sa),
            AccountRole::Annotation("arn:aws:iam::1:role/irsa".into())
        );
        index.apply_association(association("team", "a", "app", "arn:aws:iam::1:role/a"));
        assert!(
            matches!(index.role_of(&sa), AccountRole::Association(a) if &*a.role_arn == "arn:aws:iam::1:role/a")
        );
        // Another namespace's association for a ServiceAccount of the same name changes
        // nothing here.
        index.apply_association(association("other", "x", "app", "arn:aws:iam::1:role/x"));
        assert!(matches!(index.role_of(&sa), AccountRole::Association(_)));
        index.apply_association(association("team", "b", "app", "arn:aws:iam::1:role/b"));
        assert_eq!(
            index.role_of(&sa),
            AccountRole::Conflict(vec!["a".into(), "b".into()])
        );
        // Moving association b to another ServiceAccount ends the conflict.
        index.apply_association(association("team", "b", "web", "arn:aws:iam::1:role/b"));
        assert!(
            matches!(index.role_of(&sa), AccountRole::Association(a) if &*a.role_arn == "arn:aws:iam::1:role/a")
        );
        let keep: HashSet<AccountKey> = [AccountKey::new("team", "b")].into();
        assert_eq!(index.retain_associations(&keep), 2);
        assert_eq!(
            index.role_of(&sa),
            AccountRole::Annotation("arn:aws:iam::1:role/irsa".into())
        );
        index.apply_account(sa.clone(), None);
        assert_eq!(index.role_of(&sa), AccountRole::None);
    }
}
