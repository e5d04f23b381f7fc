//! Readiness: a set of named gates, one per subsystem (caches synced, rules installed,
//! certificates loaded). The process is ready when every gate is open. A gate may close
//! again (an agent that loses every server), so this is a set of flags, not a one-way latch.

use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::watch;

/// The process's readiness; cheap to clone.
#[derive(Clone, Debug)]
pub struct Readiness {
    inner: Arc<Inner>,
}

/// One subsystem's gate, closed until [`Gate::open`] is called.
#[derive(Debug)]
pub struct Gate {
    readiness: Readiness,
    index: usize,
}

#[derive(Debug)]
struct Inner {
    gates: Mutex<Vec<(&'static str, bool)>>,
    ready: watch::Sender<bool>,
}

// === impl Readiness ===

impl Default for Readiness {
    fn default() -> Self {
        Self::new()
    }
}

impl Readiness {
    /// No gates yet: ready until a gate is added.
    pub fn new() -> Self {
        let (ready, _) = watch::channel(true);
        Self {
            inner: Arc::new(Inner {
                gates: Mutex::new(Vec::new()),
                ready,
            }),
        }
    }

    /// Adds a closed gate named `name` (the name shows in `/readyz` while it is closed).
    pub fn gate(&self, name: &'static str) -> Gate {
        let mut gates = self.inner.gates.lock();
        gates.push((name, false));
        let index = gates.len() - 1;
        self.inner.ready.send_replace(false);
        Gate {
            readiness: self.clone(),
            index,
        }
    }

    /// Whether every gate is open.
    pub fn is_ready(&self) -> bool {
        *self.inner.ready.borrow()
    }

    /// The names of the closed gates.
    pub fn waiting_for(&self) -> Vec<&'static str> {
        let gates = self.inner.gates.lock();
        gates
            .iter()
            .filter(|(_, open)| !open)
            .map(|(name, _)| *name)
            .collect()
    }

    /// Resolves once every gate is open.
    pub async fn wait_ready(&self) {
        let mut rx = self.inner.ready.subscribe();
        // The sender lives in `self`, so `wait_for` cannot fail while we hold `self`.
        let _ = rx.wait_for(|ready| *ready).await;
    }

    /// Resolves once some gate is closed (at once if one is).
    pub async fn wait_not_ready(&self) {
        let mut rx = self.inner.ready.subscribe();
        // As in `wait_ready`: the sender outlives the receiver.
        let _ = rx.wait_for(|ready| !*ready).await;
    }

    fn set(&self, index: usize, open: bool) {
        let mut gates = self.inner.gates.lock();
        if let Some(gate) = gates.get_mut(index) {
            gate.1 = open;
        }
        let all = gates.iter().all(|(_, open)| *open);
        self.inner.ready.send_if_modified(|ready| {
            let changed = *ready != all;
            *ready = all;
            changed
        });
    }
}

// === impl Gate ===

impl Gate {
    /// Opens the gate.
    pub fn open(&self) {
        self.readiness.set(self.index, true);
    }

    /// Closes the gate again.
    pub fn close(&self) {
        self.readiness.set(self.index, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ready_only_when_every_gate_is_open() {
        let r = Readiness::new();
        assert!(r.is_ready());
        let pods = r.gate("pods");
        let ns = r.gate("namespaces");
        assert!(!r.is_ready());
        assert_eq!(r.waiting_for(), ["pods", "namespaces"]);
        pods.open();
        assert!(!r.is_ready());
        assert_eq!(r.waiting_for(), ["namespaces"]);
        let wait = tokio::spawn({
            let r = r.clone();
            async move { r.wait_ready().await }
        });
        ns.open();
        wait.await.unwrap();
        assert!(r.is_ready());
        let closed = tokio::spawn({
            let r = r.clone();
            async move { r.wait_not_ready().await }
        });
        tokio::task::yield_now().await;
        assert!(!closed.is_finished());
        pods.close();
        closed.await.unwrap();
        assert!(!r.is_ready());
        r.wait_not_ready().await;
    }
}
