//! The pod and namespace indexes: plain synchronous structs, fed by one watcher each,
//! read by every request. Lookups by IP are a hash lookup; nothing here scans.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

pub use podiam_common::net::canonical;

/// A pod's namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodKey {
    /// The namespace.
    pub namespace: Arc<str>,
    /// The pod's name.
    pub name: Arc<str>,
}

/// What the server keeps of a pod: only what identity and policy need. Strings shared by
/// many pods (namespace, node, service account, annotation values) are interned by the
/// index, so 100k pods cost little more than their names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    /// Namespace and name.
    pub key: PodKey,
    /// `metadata.uid`, for Events.
    pub uid: Option<PodUid>,
    /// `spec.nodeName`, once scheduled.
    pub node_name: Option<Arc<str>>,
    /// `spec.serviceAccountName`.
    pub service_account: Option<Arc<str>>,
    /// The addresses of `status.podIPs` (or `status.podIP`): one per family at most.
    pub ips: PodIps,
    /// `spec.hostNetwork`: such pods share the node's address and are never identified by it.
    pub host_network: bool,
    /// A mirror of a static pod (`kubernetes.io/config.mirror`, or owned by a Node): any
    /// kubelet can create one in any namespace with any annotations.
    pub mirror: bool,
    /// `status.phase`.
    pub phase: PodPhase,
    /// The annotations podiam reads; every other annotation is dropped.
    pub annotations: PodAnnotations,
    /// Labelled by the webhook for the container-credentials path
    /// (`podiam.io/pod-identity`): its session there is prefetched.
    pub pod_identity: bool,
}

/// The pod annotations podiam reads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodAnnotations {
    /// `iam.amazonaws.com/role`.
    pub role: Option<Arc<str>>,
    /// `iam.amazonaws.com/external-id`.
    pub external_id: Option<Arc<str>>,
    /// `iam.amazonaws.com/session-name`.
    pub session_name: Option<Arc<str>>,
    /// `iam.amazonaws.com/session-duration`.
    pub session_duration: Option<Arc<str>>,
}

/// A pod's UID (a UUID), kept as 16 bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PodUid(u128);

/// A pod's addresses: Kubernetes allows one IPv4 and one IPv6 at most.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodIps {
    v4: Option<Ipv4Addr>,
    v6: Option<Ipv6Addr>,
}

/// `status.phase`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodPhase {
    /// Not yet running (or no phase reported yet).
    Pending,
    /// Running.
    Running,
    /// Finished successfully: its IP may already belong to another pod.
    Succeeded,
    /// Finished with an error: its IP may already belong to another pod.
    Failed,
    /// The node stopped reporting.
    Unknown,
}

/// The answer to "which pod has this IP?".
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IpLookup {
    /// Exactly one live pod claims the IP.
    Found(Arc<PodInfo>),
    /// Several live pods claim it: nobody gets credentials from it until that resolves.
    Ambiguous(Vec<PodKey>),
    /// No live pod claims it.
    NotFound,
}

/// Pods by key, and the live ones by IP.
#[derive(Debug, Default)]
pub struct PodIndex {
    pods: HashMap<PodKey, Arc<PodInfo>>,
    by_ip: HashMap<IpAddr, Claims>,
    /// Pods by `spec.nodeName`, for the node feeds.
    by_node: HashMap<Arc<str>, HashSet<PodKey>>,
    /// Nodes whose pods changed since the last [`PodIndex::take_changed_nodes`].
    changed_nodes: HashSet<Arc<str>>,
    /// IPs with more than one claimant.
    collisions: usize,
    strings: Interner,
}

/// Shares one allocation per distinct string; entries nobody else holds are dropped in
/// amortised sweeps.
#[derive(Debug, Default)]
struct Interner {
    set: HashSet<Arc<str>>,
    /// Size after the last sweep: the next one runs when the set has doubled.
    swept: usize,
}

/// Most IPs have one claimant; only collisions allocate.
#[derive(Debug)]
enum Claims {
    One(PodKey),
    Many(Vec<PodKey>),
}

// === impl PodInfo ===

impl PodInfo {
    /// Whether requests from the pod's IPs are this pod's: live pods with their own
    /// network namespace.
    pub fn claims_ips(&self) -> bool {
        !self.host_network && !matches!(self.phase, PodPhase::Succeeded | PodPhase::Failed)
    }
}

impl std::fmt::Display for PodKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

// === impl PodPhase ===

impl PodPhase {
    /// Parses `status.phase`; a missing phase is `Pending`.
    pub fn parse(phase: Option<&str>) -> Self {
        match phase {
            None | Some("Pending") => PodPhase::Pending,
            Some("Running") => PodPhase::Running,
            Some("Succeeded") => PodPhase::Succeeded,
            Some("Failed") => PodPhase::Failed,
            Some(_) => PodPhase::Unknown,
        }
    }

    /// The phase as Kubernetes writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            PodPhase::Pending => "Pending",
            PodPhase::Running => "Running",
            PodPhase::Succeeded => "Succeeded",
            PodPhase::Failed => "Failed",
            PodPhase::Unknown => "Unknown",
        }
    }
}

// === impl PodUid ===

impl PodUid {
    /// Parses a UUID (`8-4-4-4-12` hex digits); anything else is `None`.
    pub fn parse(uid: &str) -> Option<Self> {
        let groups: Vec<&str> = uid.split('-').collect();
        let shape = [8, 4, 4, 4, 12];
        if groups.len() != shape.len() || groups.iter().zip(shape).any(|(g, n)| g.len() != n) {
            return None;
        }
        let hex: String = groups.concat();
        if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        u128::from_str_radix(&hex, 16).ok().map(Self)
    }
}

impl fmt::Display for PodUid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let h = format!("{:032x}", self.0);
        write!(
            f,
            "{}-{}-{}-{}-{}",
            &h[..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..]
        )
    }
}

impl fmt::Debug for PodUid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PodUid({self})")
    }
}

// === impl PodIps ===

impl PodIps {
    /// Adds `ip` unless its family already has a different address; returns whether it
    /// was kept.
    pub fn add(&mut self, ip: IpAddr) -> bool {
        match canonical(ip) {
            IpAddr::V4(v4) => *self.v4.get_or_insert(v4) == v4,
            IpAddr::V6(v6) => *self.v6.get_or_insert(v6) == v6,
        }
    }

    /// The addresses, IPv4 first.
    pub fn iter(&self) -> impl Iterator<Item = IpAddr> + '_ {
        let v4 = self.v4.map(IpAddr::V4);
        let v6 = self.v6.map(IpAddr::V6);
        v4.into_iter().chain(v6)
    }

    /// Whether the pod has no address yet.
    pub fn is_empty(&self) -> bool {
        self.v4.is_none() && self.v6.is_none()
    }
}

impl FromIterator<IpAddr> for PodIps {
    fn from_iter<I: IntoIterator<Item = IpAddr>>(iter: I) -> Self {
        let mut ips = Self::default();
        for ip in iter {
            ips.add(ip);
        }
        ips
    }
}

// === impl Interner ===

impl Interner {
    fn intern(&mut self, s: &Arc<str>) -> Arc<str> {
        if let Some(shared) = self.set.get(s) {
            return shared.clone();
        }
        self.set.insert(s.clone());
        if self.set.len() > 2 * self.swept + 1024 {
            self.set.retain(|s| Arc::strong_count(s) > 1);
            self.swept = self.set.len();
        }
        s.clone()
    }

    fn intern_opt(&mut self, s: &mut Option<Arc<str>>) {
        if let Some(s) = s {
            *s = self.intern(s);
        }
    }
}

// === impl PodIndex ===

impl PodIndex {
    /// Adds or replaces a pod; returns it as stored.
    pub fn apply(&mut self, mut pod: PodInfo) -> Arc<PodInfo> {
        let strings = &mut self.strings;
        pod.key.namespace = strings.intern(&pod.key.namespace);
        strings.intern_opt(&mut pod.node_name);
        strings.intern_opt(&mut pod.service_account);
        let ann = &mut pod.annotations;
        for value in [
            &mut ann.role,
            &mut ann.external_id,
            &mut ann.session_name,
            &mut ann.session_duration,
        ] {
            strings.intern_opt(value);
        }
        let pod = Arc::new(pod);
        if let Some(old) = self.pods.insert(pod.key.clone(), pod.clone()) {
            if old.claims_ips() {
                for ip in old.ips.iter() {
                    self.unclaim(ip, &old.key);
                }
            }
            self.unplace(&old);
        }
        self.place(&pod);
        if pod.claims_ips() {
            for ip in pod.ips.iter() {
                self.claim(ip, &pod.key);
            }
        }
        pod
    }

    /// Removes a pod; returns whether it was known.
    pub fn delete(&mut self, key: &PodKey) -> bool {
        let Some(old) = self.pods.remove(key) else {
            return false;
        };
        self.unplace(&old);
        if old.claims_ips() {
            for ip in old.ips.iter() {
                self.unclaim(ip, &old.key);
            }
        }
        true
    }

    /// After a re-list: removes every pod not in `keep` (deleted while the watch was down).
    pub fn retain(&mut self, keep: &HashSet<PodKey>) -> usize {
        let gone: Vec<PodKey> = self
            .pods
            .keys()
            .filter(|k| !keep.contains(*k))
            .cloned()
            .collect();
        for key in &gone {
            self.delete(key);
        }
        gone.len()
    }

    /// The pod `key`.
    pub fn get(&self, key: &PodKey) -> Option<Arc<PodInfo>> {
        self.pods.get(key).cloned()
    }

    /// Whether the pod `key` is in the index.
    pub fn contains(&self, key: &PodKey) -> bool {
        self.pods.contains_key(key)
    }

    /// Every pod (a snapshot; the lock is not held while the caller uses it).
    pub fn all(&self) -> Vec<Arc<PodInfo>> {
        self.pods.values().cloned().collect()
    }

    /// Which live pod has this IP.
    pub fn lookup_ip(&self, ip: IpAddr) -> IpLookup {
        match self.by_ip.get(&canonical(ip)) {
            None => IpLookup::NotFound,
            Some(Claims::One(key)) => match self.pods.get(key) {
                Some(pod) => IpLookup::Found(pod.clone()),
                // `by_ip` only holds keys of `pods`; treat a miss as unknown, never guess.
                None => IpLookup::NotFound,
            },
            Some(Claims::Many(keys)) => IpLookup::Ambiguous(keys.clone()),
        }
    }

    /// The pods scheduled to `node` (live or not).
    pub fn on_node(&self, node: &str) -> Vec<Arc<PodInfo>> {
        self.by_node
            .get(node)
            .map(|keys| {
                keys.iter()
                    .filter_map(|k| self.pods.get(k).cloned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The nodes whose pods changed since the last call.
    pub fn take_changed_nodes(&mut self) -> HashSet<Arc<str>> {
        std::mem::take(&mut self.changed_nodes)
    }

    fn place(&mut self, pod: &PodInfo) {
        if let Some(node) = &pod.node_name {
            self.by_node
                .entry(node.clone())
                .or_default()
                .insert(pod.key.clone());
            self.changed_nodes.insert(node.clone());
        }
    }

    fn unplace(&mut self, pod: &PodInfo) {
        if let Some(node) = &pod.node_name {
            if let Some(keys) = self.by_node.get_mut(node) {
                keys.remove(&pod.key);
                if keys.is_empty() {
                    self.by_node.remove(node);
                }
            }
            self.changed_nodes.insert(node.clone());
        }
    }

    /// Number of pods (live or not).
    pub fn len(&self) -> usize {
        self.pods.len()
    }

    /// Whether there are no pods.
    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }

    /// Number of IPs claimed by live pods.
    pub fn ip_count(&self) -> usize {
        self.by_ip.len()
    }

    /// Number of IPs claimed by more than one live pod.
    pub fn collisions(&self) -> usize {
        self.collisions
    }

    fn claim(&mut self, ip: IpAddr, key: &PodKey) {
        let ip = canonical(ip);
        match self.by_ip.get_mut(&ip) {
            None => {
                self.by_ip.insert(ip, Claims::One(key.clone()));
            }
            Some(Claims::One(existing)) if existing == key => {}
            Some(claims) => {
                let keys = match claims {
                    Claims::One(existing) => {
                        self.collisions += 1;
                        vec![existing.clone(), key.clone()]
                    }
                    Claims::Many(keys) if keys.contains(key) => return,
                    Claims::Many(keys) => {
                        let mut keys = std::mem::take(keys);
                        keys.push(key.clone());
                        keys
                    }
                };
                tracing::warn!(
                    %ip,
                    pods = %keys.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
                    "IP claimed by more than one live pod: requests from it are refused until only one remains"
                );
                *claims = Claims::Many(keys);
            }
        }
    }

    fn unclaim(&mut self, ip: IpAddr, key: &PodKey) {
        let ip = canonical(ip);
        let Some(claims) = self.by_ip.get_mut(&ip) else {
            return;
        };
        match claims {
            Claims::One(existing) => {
                if existing == key {
                    self.by_ip.remove(&ip);
                }
            }
            Claims::Many(keys) => {
                keys.retain(|k| k != key);
                if keys.len() == 1 {
                    self.collisions -= 1;
                    let last = keys.remove(0);
                    *claims = Claims::One(last);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
