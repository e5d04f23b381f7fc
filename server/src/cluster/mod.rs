//! The cluster as the server sees it: pods and namespaces (and, for the
//! container-credentials path, ServiceAccounts' roles), kept current by watches.
//!
//! Two kube-runtime watchers ([`watch`]: pods in all namespaces, namespaces) feed two
//! plain indexes ([`PodIndex`], [`NamespaceIndex`]) behind locks in one [`ClusterIndex`].
//! Objects are stripped to [`crate::pods::PodInfo`] /
//! [`crate::policy::namespace::NamespaceInfo`] before they are stored. Every change bumps
//! a watch channel, so a lookup that misses can wait for the index to change instead of
//! polling. This module sits above [`crate::pods`] and [`crate::policy`]: both are plain
//! data and rules, and neither imports it.

use std::{collections::HashMap, net::IpAddr, sync::Arc, time::Duration};

use parking_lot::{Mutex, RwLock, RwLockReadGuard};
use podiam_common::arn::BaseRoleArn;
use tokio::{sync::watch as signal, time::Instant};

use crate::{
    accounts::AccountIndex,
    pods::{IpLookup, PodIndex},
    policy::namespace::{NamespaceIndex, NamespaceInfo},
};

pub mod metrics;
pub mod watch;

/// The pod and namespace indexes, shared by the watchers (writers) and requests
/// (readers). Cheap to clone.
#[derive(Clone, Debug)]
pub struct ClusterIndex {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    pods: RwLock<PodIndex>,
    namespaces: RwLock<NamespaceIndex>,
    /// ServiceAccount roles (container-credentials path; empty unless it is on).
    accounts: RwLock<AccountIndex>,
    changed: signal::Sender<()>,
    /// One signal per node with a feed subscribed: bumped when that node's pods change,
    /// and for every node when a namespace changes.
    nodes: Mutex<HashMap<Arc<str>, signal::Sender<()>>>,
}

// === impl ClusterIndex ===

impl ClusterIndex {
    /// Empty indexes; `base` resolves bare names in kube2iam `allowed-roles` lists.
    pub fn new(base: Option<BaseRoleArn>) -> Self {
        let (changed, _) = signal::channel(());
        Self {
            inner: Arc::new(Inner {
                pods: RwLock::new(PodIndex::default()),
                namespaces: RwLock::new(NamespaceIndex::new(base)),
                accounts: RwLock::new(AccountIndex::default()),
                changed,
                nodes: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Changes the pod index, then wakes every waiting lookup.
    pub fn update_pods<R>(&self, f: impl FnOnce(&mut PodIndex) -> R) -> R {
        let (r, nodes) = {
            let mut pods = self.inner.pods.write();
            let r = f(&mut pods);
            (r, pods.take_changed_nodes())
        };
        self.inner.changed.send_replace(());
        if !nodes.is_empty() {
            let mut signals = self.inner.nodes.lock();
            for node in nodes {
                if let Some(signal) = signals.get(&node)
                    && signal.send(()).is_err()
                {
                    // Nobody subscribed any more.
                    signals.remove(&node);
                }
            }
        }
        r
    }

    /// A signal that fires whenever the pods on `node` (or any namespace) change.
    pub fn watch_node(&self, node: &Arc<str>) -> signal::Receiver<()> {
        let mut signals = self.inner.nodes.lock();
        match signals.get(node) {
            Some(signal) => signal.subscribe(),
            None => {
                let (signal, rx) = signal::channel(());
                signals.insert(node.clone(), signal);
                rx
            }
        }
    }

    /// Changes the namespace index, then wakes every waiting lookup.
    pub fn update_namespaces<R>(&self, f: impl FnOnce(&mut NamespaceIndex) -> R) -> R {
        let r = f(&mut self.inner.namespaces.write());
        self.inner.changed.send_replace(());
        // A policy may change the decision of any pod on any node.
        self.inner
            .nodes
            .lock()
            .retain(|_, signal| signal.send(()).is_ok());
        r
    }

    /// Changes the ServiceAccount index, then wakes every waiting lookup.
    pub fn update_accounts<R>(&self, f: impl FnOnce(&mut AccountIndex) -> R) -> R {
        let r = f(&mut self.inner.accounts.write());
        self.inner.changed.send_replace(());
        r
    }

    /// Reads the ServiceAccount index. Hold the guard briefly: writers wait for it.
    pub fn accounts(&self) -> RwLockReadGuard<'_, AccountIndex> {
        self.inner.accounts.read()
    }

    /// Reads the pod index. Hold the guard briefly: writers wait for it.
    pub fn pods(&self) -> RwLockReadGuard<'_, PodIndex> {
        self.inner.pods.read()
    }

    /// Reads the namespace index. Hold the guard briefly: writers wait for it.
    pub fn namespaces(&self) -> RwLockReadGuard<'_, NamespaceIndex> {
        self.inner.namespaces.read()
    }

    /// The namespace with this name.
    pub fn namespace(&self, name: &str) -> Option<Arc<NamespaceInfo>> {
        self.inner.namespaces.read().get(name)
    }

    /// Which live pod has `ip`. When none does, waits up to `wait` for the index to
    /// change (woken by the watchers, not by polling) and looks again.
    pub async fn lookup_ip(&self, ip: IpAddr, wait: Duration) -> IpLookup {
        let deadline = Instant::now() + wait;
        // Subscribing before the first look means no change can slip in between.
        let mut changed = self.inner.changed.subscribe();
        loop {
            let found = self.inner.pods.read().lookup_ip(ip);
            if !matches!(found, IpLookup::NotFound) {
                return found;
            }
            match tokio::time::timeout_at(deadline, changed.changed()).await {
                Ok(Ok(())) => continue,
                // Timed out, or the sender is gone (impossible while `self` lives).
                _ => return IpLookup::NotFound,
            }
        }
    }

    /// Waits until `ready(self)` holds, re-checking after every index change; `false` if
    /// `timeout` passes first.
    pub async fn wait_until(&self, timeout: Duration, ready: impl Fn(&Self) -> bool) -> bool {
        let mut changed = self.inner.changed.subscribe();
        let deadline = Instant::now() + timeout;
        loop {
            if ready(self) {
                return true;
            }
            match tokio::time::timeout_at(deadline, changed.changed()).await {
                Ok(Ok(())) => continue,
                _ => return ready(self),
            }
        }
    }
}

#[cfg(test)]
mod tests;
