//! The node table: the pods of this node as the server's feed describes them, so that a
//! warm request is answered with no network call.
//!
//! Data model: pod UID → [`Entry`] (IPs, decision, credentials with their metadata
//! documents built once per credential set), and IP → the entries that claim it. Each
//! entry also remembers, per IP, the host interface the IP lived behind when the pod was
//! first seen ([`Location`], from netlink). A request whose source IP now lives behind
//! another interface is not from that pod: a new pod on a reused IP arrives on a new
//! veth, before the feed has said that the old pod is gone. Such a request waits
//! (bounded) for the feed and is otherwise refused; it never falls back to the server,
//! whose index may lag the same way.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use podiam_common::{
    arn::RoleArn,
    clock::Clock,
    feed::{NodeUpdate, PodState},
    net::canonical,
    protocol::{self, ErrorBody},
};
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use serde::Serialize;
use tokio::{sync::watch, time::Instant};

use crate::interfaces::{Interfaces, Location};

/// The table; cheap to clone.
#[derive(Clone, Debug)]
pub struct NodeTable {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    state: RwLock<State>,
    /// Bumped on every applied update, so that waiting requests look again.
    changed: watch::Sender<u64>,
    /// `None`: interface binding is off (no netlink, e.g. pods on loopback in tests).
    interfaces: Option<Interfaces>,
    /// The wall clock (when a credential set arrived: the documents' `LastUpdated`).
    clock: Arc<dyn Clock>,
    metrics: TableMetrics,
}

#[derive(Debug, Default)]
struct State {
    pods: HashMap<String, Arc<Entry>>,
    by_ip: HashMap<IpAddr, Vec<Arc<Entry>>>,
    /// The table holds the node's pods as of the last sync (it may have gone stale since
    /// if the feed is down: see `connected`).
    synced: bool,
    /// A feed is connected and heard from within its heartbeat bound.
    connected: bool,
}

/// One pod as the table holds it.
#[derive(Debug)]
pub struct Entry {
    /// `metadata.uid`.
    pub uid: String,
    /// `namespace/name`, for logs.
    pub pod: String,
    /// The pod's addresses.
    pub ips: Vec<IpAddr>,
    /// The version the feed gave.
    pub version: u64,
    /// What the server decided.
    pub decision: Decided,
    /// Where each IP lived when the pod was first seen (or first asked).
    bindings: Mutex<HashMap<IpAddr, Location>>,
}

/// The server's decision for a pod.
#[derive(Debug)]
pub enum Decided {
    /// The pod has this role; credentials once fetched.
    Allowed {
        /// The role.
        role: RoleArn,
        /// The credentials and their documents.
        credentials: Option<Served>,
    },
    /// The pod gets nothing; the agent still asks the server per request (so that the
    /// server records the Event), and answers from this only when no server answers.
    Denied(ErrorBody),
}

/// A credential set with the metadata documents built from it.
#[derive(Clone)]
pub struct Served {
    /// `ASIA...`.
    pub access_key_id: String,
    /// When they expire.
    pub expiration: SystemTime,
    /// The `security-credentials/ROLE` document.
    pub document: Bytes,
    /// The `security-credentials-extended/ROLE` document (with `AccountId`).
    pub extended: Bytes,
}

/// What the table says of a request's source address.
#[derive(Clone, Debug)]
pub enum Lookup {
    /// One pod has the IP, and the IP still lives where that pod's did.
    Found(Arc<Entry>),
    /// The table cannot say (not synced, feed down, no pod yet, or no interface known):
    /// ask the server.
    Unknown,
    /// Several pods claim the IP.
    Ambiguous,
    /// The IP now lives behind another interface than the pod the table names: not that
    /// pod, and the feed did not catch up within the wait.
    Moved {
        /// The pod the table named.
        pod: String,
    },
}

/// Table and feed metrics.
#[derive(Clone, Debug)]
pub struct TableMetrics {
    pods: IntGauge,
    connected: IntGauge,
    updates: IntCounterVec,
    lookups: IntCounterVec,
    /// `lookups{result="found"}`, looked up once: it counts every warm request.
    found: prometheus::IntCounter,
}

/// The metadata service's credential document.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct CredentialDocument<'a> {
    code: &'static str,
    last_updated: String,
    #[serde(rename = "Type")]
    kind: &'static str,
    access_key_id: &'a str,
    secret_access_key: &'a str,
    token: &'a str,
    expiration: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    account_id: Option<&'a str>,
}

// === impl NodeTable ===

impl NodeTable {
    /// An empty table; `interfaces` binds pods to where their IPs live (`None`: off).
    pub fn new(
        interfaces: Option<Interfaces>,
        clock: Arc<dyn Clock>,
        metrics: TableMetrics,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                state: RwLock::new(State::default()),
                changed: watch::channel(0).0,
                interfaces,
                clock,
                metrics,
            }),
        }
    }

    /// What the table holds, for a resuming subscription: UID and version of each pod.
    pub fn held(&self) -> Vec<(String, u64)> {
        let state = self.inner.state.read();
        state
            .pods
            .values()
            .map(|e| (e.uid.clone(), e.version))
            .collect()
    }

    /// Applies an update from the feed.
    pub fn apply(&self, update: NodeUpdate) {
        let kind = if update.synced {
            "sync"
        } else if update.pods.is_empty() && update.removed.is_empty() {
            "heartbeat"
        } else {
            "change"
        };
        self.inner.metrics.updates.with_label_values(&[kind]).inc();
        if kind == "heartbeat" {
            return;
        }
        let mut state = self.inner.state.write();
        for uid in &update.removed {
            state.pods.remove(uid);
        }
        for pod in update.pods {
            let uid = pod.uid.clone();
            let previous = state.pods.get(&uid).cloned();
            match self.entry(pod, previous.as_deref()) {
                Some(entry) => state.pods.insert(uid, Arc::new(entry)),
                // What cannot be used is not kept in an older form either.
                None => state.pods.remove(&uid),
            };
        }
        if update.synced {
            state.synced = true;
        }
        state.reindex();
        self.inner.metrics.pods.set(state.pods.len() as i64);
        drop(state);
        self.inner.changed.send_modify(|n| *n += 1);
    }

    /// Marks the feed connected or not (a table whose feed is down still answers with the
    /// credentials it holds, but does not treat an unknown IP as "no such pod yet").
    pub fn set_connected(&self, connected: bool) {
        self.inner.state.write().connected = connected;
        self.inner.metrics.connected.set(i64::from(connected));
        self.inner.changed.send_modify(|n| *n += 1);
    }

    /// Whether a feed is connected.
    pub fn connected(&self) -> bool {
        self.inner.state.read().connected
    }

    /// Whether the pod with `uid` is on this node with `ip` among its addresses, as of the
    /// last sync (`None`: the table has never been synced, so it cannot say).
    pub fn pod_has_ip(&self, uid: &str, ip: IpAddr) -> Option<bool> {
        let ip = canonical(ip);
        let state = self.inner.state.read();
        state
            .synced
            .then(|| state.pods.get(uid).is_some_and(|e| e.ips.contains(&ip)))
    }

    /// Number of pods held.
    pub fn len(&self) -> usize {
        self.inner.state.read().pods.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Which pod has `ip`. An IP the connected, synced table does not know yet, or one
    /// that moved to another interface, is looked at again as the feed and the kernel's
    /// tables change, for up to `wait`.
    pub async fn lookup(&self, ip: IpAddr, wait: Duration) -> Lookup {
        let ip = canonical(ip);
        // The warm path: one look, nothing to wait for.
        match self.look(ip) {
            (Lookup::Unknown, true) | (Lookup::Moved { .. }, _) => {}
            (done, _) => {
                self.count(&done);
                return done;
            }
        }
        let deadline = Instant::now() + wait;
        // Subscribed before looking again, so that no change slips in between.
        let mut changed = self.inner.changed.subscribe();
        let mut moved = self.inner.interfaces.as_ref().map(Interfaces::changes);
        loop {
            let (found, wait_for_feed) = self.look(ip);
            let found = match found {
                Lookup::Unknown if wait_for_feed => found,
                Lookup::Moved { .. } => found,
                done => {
                    self.count(&done);
                    return done;
                }
            };
            let woken = tokio::time::timeout_at(deadline, async {
                match moved.as_mut() {
                    Some(moved) => tokio::select! {
                        r = changed.changed() => r.is_ok(),
                        r = moved.changed() => r.is_ok(),
                    },
                    None => changed.changed().await.is_ok(),
                }
            })
            .await;
            if !matches!(woken, Ok(true)) {
                self.count(&found);
                return found;
            }
        }
    }

    /// One look; the flag says whether waiting for the feed may help.
    fn look(&self, ip: IpAddr) -> (Lookup, bool) {
        let state = self.inner.state.read();
        let waitable = state.synced && state.connected;
        let entry = match state.by_ip.get(&ip).map(Vec::as_slice) {
            None | Some([]) => return (Lookup::Unknown, waitable),
            Some([entry]) => entry.clone(),
            Some(_) => return (Lookup::Ambiguous, false),
        };
        drop(state);
        let Some(interfaces) = &self.inner.interfaces else {
            return (Lookup::Found(entry), false);
        };
        let now = interfaces.locate(ip);
        let mut bindings = entry.bindings.lock();
        match (bindings.get(&ip), now) {
            (Some(bound), Some(now)) if *bound == now => {}
            (Some(_), _) => {
                let pod = entry.pod.clone();
                drop(bindings);
                return (Lookup::Moved { pod }, false);
            }
            (None, Some(now)) => {
                // Not found where it lived when first seen (a bridged pod that had not
                // spoken yet): bound at its first request.
                bindings.insert(ip, now);
            }
            // The kernel does not say where the IP lives: the table cannot vouch for it.
            (None, None) => return (Lookup::Unknown, false),
        }
        drop(bindings);
        (Lookup::Found(entry), false)
    }

    fn count(&self, lookup: &Lookup) {
        let m = &self.inner.metrics;
        match lookup {
            Lookup::Found(_) => m.found.inc(),
            Lookup::Unknown => m.lookups.with_label_values(&["unknown"]).inc(),
            Lookup::Ambiguous => m.lookups.with_label_values(&["ambiguous"]).inc(),
            Lookup::Moved { .. } => m.lookups.with_label_values(&["moved"]).inc(),
        }
    }

    /// An entry from the feed's state; `previous` is what the table held for the UID.
    fn entry(&self, pod: PodState, previous: Option<&Entry>) -> Option<Entry> {
        let ips: Vec<IpAddr> = pod
            .ips
            .iter()
            .filter_map(|ip| ip.parse().ok().map(canonical))
            .collect();
        if ips.is_empty() {
            tracing::warn!(pod.uid = %pod.uid, "feed sent a pod without a valid IP; ignored");
            return None;
        }
        let name = format!("{}/{}", pod.namespace, pod.name);
        let decision = if let Some(denial) = &pod.denial {
            Decided::Denied(ErrorBody {
                code: denial.error_code(),
                message: denial.message.clone(),
            })
        } else {
            match RoleArn::parse(&pod.role_arn) {
                Ok(role) => {
                    let credentials = pod.credentials.clone().and_then(|c| {
                        match protocol::Credentials::try_from(c) {
                            Ok(c) => Some(Served::build(&role, &c, self.inner.clock.now())),
                            Err(error) => {
                                // Asked for per request instead.
                                tracing::warn!(pod = %name, %error, "feed sent unusable credentials; ignored");
                                None
                            }
                        }
                    });
                    Decided::Allowed { role, credentials }
                }
                Err(error) => {
                    tracing::warn!(pod = %name, %error, "feed sent an invalid role; ignored");
                    return None;
                }
            }
        };
        // The same pod keeps its bindings; a new pod is bound to where its IPs live now.
        let mut bindings = previous
            .map(|p| p.bindings.lock().clone())
            .unwrap_or_default();
        bindings.retain(|ip, _| ips.contains(ip));
        if let Some(interfaces) = &self.inner.interfaces {
            for ip in &ips {
                if !bindings.contains_key(ip)
                    && let Some(location) = interfaces.locate(*ip)
                {
                    bindings.insert(*ip, location);
                }
            }
        }
        Some(Entry {
            uid: pod.uid,
            pod: name,
            ips,
            version: pod.version,
            decision,
            bindings: Mutex::new(bindings),
        })
    }
}

// === impl State ===

impl State {
    fn reindex(&mut self) {
        self.by_ip.clear();
        for entry in self.pods.values() {
            for ip in &entry.ips {
                self.by_ip.entry(*ip).or_default().push(entry.clone());
            }
        }
    }
}

// === impl Served ===

impl Served {
    /// The documents for `c` of `role`, built once; `now` is their `LastUpdated`.
    pub fn build(role: &RoleArn, c: &protocol::Credentials, now: SystemTime) -> Self {
        let document = |account_id| {
            let doc = CredentialDocument {
                code: "Success",
                last_updated: humantime::format_rfc3339_seconds(now).to_string(),
                kind: "AWS-HMAC",
                access_key_id: &c.access_key_id,
                secret_access_key: c.secret_access_key.expose(),
                token: c.session_token.expose(),
                expiration: humantime::format_rfc3339_seconds(c.expiration).to_string(),
                account_id,
            };
            Bytes::from(serde_json::to_vec_pretty(&doc).unwrap_or_default())
        };
        Self {
            access_key_id: c.access_key_id.clone(),
            expiration: c.expiration,
            document: document(None),
            extended: document(Some(role.account())),
        }
    }

    /// Whether they have at least `min` left at `now`.
    pub fn fresh(&self, now: SystemTime, min: Duration) -> bool {
        self.expiration
            .duration_since(now)
            .is_ok_and(|left| left >= min)
    }
}

impl std::fmt::Debug for Served {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Served")
            .field("access_key_id", &self.access_key_id)
            .field("expiration", &self.expiration)
            .field("documents", &"** redacted **")
            .finish()
    }
}

// === impl TableMetrics ===

impl TableMetrics {
    /// Registers the metrics in `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let pods = IntGauge::new(
            "podiam_agent_table_pods",
            "Pods of this node in the agent's table (from the node feed)",
        )?;
        let connected = IntGauge::new(
            "podiam_agent_feed_connected",
            "1 while a server's node feed is connected and heard from; 0 means degraded: \
             the agent serves only the credentials it holds",
        )?;
        let updates = IntCounterVec::new(
            Opts::new(
                "podiam_agent_feed_updates_total",
                "Node feed updates received, by kind (sync, change, heartbeat)",
            ),
            &["kind"],
        )?;
        let lookups = IntCounterVec::new(
            Opts::new(
                "podiam_agent_table_lookups_total",
                "Credential requests looked up in the node table, by result (found, unknown, \
                 ambiguous, moved: the IP lives behind another interface than its pod's)",
            ),
            &["result"],
        )?;
        registry.register(Box::new(pods.clone()))?;
        registry.register(Box::new(connected.clone()))?;
        registry.register(Box::new(updates.clone()))?;
        registry.register(Box::new(lookups.clone()))?;
        Ok(Self {
            pods,
            connected,
            updates,
            found: lookups.with_label_values(&["found"]),
            lookups,
        })
    }
}
