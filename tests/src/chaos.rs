//! The fault matrix: steady credential requests from pods of a `podiam-sandbox` on two
//! nodes, on both paths (IMDSv2, and the container-credentials endpoint with the pod's
//! projected token), while faults are injected and removed one at a time. Every answer is checked
//! against the pod's expected role: the role the agent lists, and the identity STS (moto)
//! gives the credentials' access key. A harness for `podiam-bench chaos` and the CI test;
//! none of it ships.
//!
//! Each pod has a thread inside its network namespace that asks as an SDK does (IMDSv2: PUT
//! a token, GET the role list, GET the credentials; container credentials: GET with the
//! token file's content), paced at [`PACE`]. Outcomes:
//! - `ok`: 200, the pod's own role, and (checked after the fault) the access key is the
//!   pod's role's in STS;
//! - `refused`: an HTTP answer that is not credentials (503 while the agent cannot vouch,
//!   404, ...): what SDKs retry or report;
//! - `failed`: no HTTP answer (connection refused, timeout);
//! - `wrong`: credentials that are not the pod's own, or the node's. Must be 0.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use http::Method;
use parking_lot::Mutex;

use crate::{
    imds_client,
    sandbox::{ACCOUNT, State},
};

/// Pause between one pod's request rounds.
pub const PACE: Duration = Duration::from_millis(100);
/// Longest a round may take before it counts as failed.
const ROUND_TIMEOUT: Duration = Duration::from_secs(3);
/// The metadata address pods ask.
const IMDS: &str = "169.254.169.254:80";
/// The container-credentials address pods ask.
const CONTAINER: &str = "169.254.170.23:80";

/// One fault: what is done, for how long, and what is undone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The server is stopped and started again at once.
    ServerRestart,
    /// No server for the hold time.
    ServerDown,
    /// The API server refuses every read and its watches are cut for the hold time.
    ApiDown,
    /// The API server away past the server's staleness bound; meanwhile a pod's namespace
    /// stops permitting its role. No credentials of that role may be issued from then on,
    /// and none served once the node's feed is back; then the policy is restored.
    ApiDownRevoked,
    /// No server for the hold time; meanwhile a pod is force-deleted (its API object
    /// goes, its network stays). Its held credentials may be served while no server can
    /// say, and never once its node's feed is back; then it is created again.
    DeletedWhileHeld,
    /// The agent of the first node is stopped and started again at once.
    AgentRestart,
    /// The agent of the first node is stopped for the hold time: its pods must be refused
    /// (the interception fails closed), never answered by the node's metadata service.
    AgentDown,
    /// Every STS call of the server is throttled for the hold time; a new pod appears
    /// meanwhile.
    StsThrottle,
    /// Every STS call fails (500 InternalFailure) for the hold time; a new pod appears.
    StsError,
    /// STS closes every connection unanswered for the hold time; a new pod appears.
    StsDown,
    /// Every watch of the API server is cut (resumed where it was); a new pod appears.
    WatchesCut,
    /// Every watch is cut and the history compacted (resuming gets 410 Gone, so the
    /// server lists again); a new pod appears.
    WatchesExpired,
    /// New server and agent certificates (same CA) over the files in use; held until the
    /// server and every agent have reloaded them.
    CertRotate,
}

impl Fault {
    /// Every fault, in the order of the matrix.
    pub const ALL: [Fault; 13] = [
        Fault::CertRotate,
        Fault::ServerRestart,
        Fault::ServerDown,
        Fault::DeletedWhileHeld,
        Fault::ApiDown,
        Fault::ApiDownRevoked,
        Fault::WatchesCut,
        Fault::WatchesExpired,
        Fault::StsThrottle,
        Fault::StsError,
        Fault::StsDown,
        Fault::AgentRestart,
        Fault::AgentDown,
    ];

    /// The name on the command line and in the table.
    pub fn name(self) -> &'static str {
        match self {
            Fault::ServerRestart => "server-restart",
            Fault::ServerDown => "server-down",
            Fault::ApiDown => "api-down",
            Fault::ApiDownRevoked => "api-down-revoked",
            Fault::DeletedWhileHeld => "deleted-while-held",
            Fault::AgentRestart => "agent-restart",
            Fault::AgentDown => "agent-down",
            Fault::StsThrottle => "sts-throttle",
            Fault::StsError => "sts-error",
            Fault::StsDown => "sts-down",
            Fault::WatchesCut => "watches-cut",
            Fault::WatchesExpired => "watches-expired",
            Fault::CertRotate => "cert-rotate",
        }
    }

    /// The `podiam-sandbox sts` mode of an STS fault.
    fn sts_mode(self) -> Option<&'static str> {
        match self {
            Fault::StsThrottle => Some("throttle"),
            Fault::StsError => Some("error"),
            Fault::StsDown => Some("down"),
            _ => None,
        }
    }

    /// Parses [`Fault::name`].
    pub fn parse(name: &str) -> anyhow::Result<Self> {
        Self::ALL
            .into_iter()
            .find(|f| f.name() == name)
            .with_context(|| {
                let names: Vec<_> = Self::ALL.iter().map(|f| f.name()).collect();
                format!("no fault {name:?} (faults: {})", names.join(", "))
            })
    }

    /// Whether the fault lasts the hold time (the others are a restart).
    fn held(self) -> bool {
        matches!(
            self,
            Fault::ServerDown
                | Fault::ApiDown
                | Fault::ApiDownRevoked
                | Fault::DeletedWhileHeld
                | Fault::AgentDown
                | Fault::StsThrottle
                | Fault::StsError
                | Fault::StsDown
        )
    }
}

/// What happened to one round.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    /// The pod's role listed and credentials answered (checked against STS later).
    Ok(Answered),
    /// An HTTP answer without credentials.
    Refused,
    /// No HTTP answer.
    Failed,
    /// Someone else's role, or the node's.
    Wrong(String),
}

/// Credentials a pod was answered (moto's test credentials; never printed).
#[derive(Clone, PartialEq, Eq)]
struct Answered {
    access_key: String,
    secret: String,
    token: String,
}

impl std::fmt::Debug for Answered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Answered")
            .field("access_key", &self.access_key)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Debug)]
struct Sample {
    pod: usize,
    at: Instant,
    outcome: Outcome,
}

/// A pod under load.
#[derive(Clone, Debug)]
pub struct Target {
    /// `NAMESPACE/NAME`.
    pub pod: String,
    /// Its node.
    pub node: String,
    netns: String,
    ip: IpAddr,
    /// The role name it must get.
    pub role: String,
    /// Container-credentials path: its projected token, on the host (`None`: IMDSv2).
    pub token_file: Option<PathBuf>,
}

/// One row of the matrix.
#[derive(Clone, Debug)]
pub struct Row {
    /// The fault.
    pub fault: Fault,
    /// How long it was in place.
    pub held: Duration,
    /// Rounds answered with the pod's own credentials while the fault was in place.
    pub ok: usize,
    /// Rounds refused while the fault was in place.
    pub refused: usize,
    /// Rounds without an answer while the fault was in place.
    pub failed: usize,
    /// Rounds with credentials that were not the pod's, from the fault's start to full
    /// service after it.
    pub wrong: usize,
    /// From the fault's end until every pod had its own credentials again.
    pub recovery: Option<Duration>,
    /// Processes that exited without being told to (server, agents).
    pub exited: Vec<String>,
    /// The first wrong answer, for the report.
    pub example: Option<String>,
}

/// A pod whose role its namespace stopped permitting while the server could not see it.
#[derive(Clone, Debug)]
struct Revoked {
    /// The target.
    pod: usize,
    /// When the server's view went stale (the revocation was written after).
    since: Instant,
    /// The access keys the pod had been answered before.
    known: std::collections::HashSet<String>,
    /// When its node's feed was back (from then on, nothing of the role may be served).
    fed: Option<Instant>,
    /// When the policy was restored.
    until: Option<Instant>,
}

/// The namespace whose policy [`Fault::ApiDownRevoked`] narrows (with its `/`), and the
/// policy it is given back (as in `examples/sandbox.yaml`).
const REVOKED_NAMESPACE: &str = "payments/";
const REVOKED_POLICY: &str = "arn:aws:iam::123456789012:role/payments-.*";

/// A running pod `namespace/name` with `role` on `node`, at `ip` if given (else the
/// sandbox picks one).
fn pod_yaml(namespace: &str, name: &str, role: &str, node: &str, ip: Option<IpAddr>) -> String {
    let mut yaml = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  \
         annotations:\n    iam.amazonaws.com/role: {role}\nspec:\n  nodeName: {node}\n"
    );
    if let Some(ip) = ip {
        yaml += &format!("status:\n  phase: Running\n  podIP: {ip}\n  podIPs:\n  - ip: {ip}\n");
    }
    yaml
}

/// How [`Chaos::restore_after_feed`] gives a role back.
#[derive(Clone, Copy, Debug)]
enum Restore {
    /// The namespace's policy as it was.
    Policy,
    /// The deleted pod, created again.
    Pod,
}

/// Answers already in flight when a node's feed comes back.
const FEED_GRACE: Duration = Duration::from_secs(1);

/// The running load and the sandbox it runs against.
#[derive(Debug)]
pub struct Chaos {
    bin: PathBuf,
    name: String,
    /// The pods under load.
    pub targets: Vec<Target>,
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Access key → the role STS says it belongs to.
    identities: HashMap<String, String>,
    /// Roles taken away from a pod meanwhile ([`Fault::ApiDownRevoked`]).
    revoked: Vec<Revoked>,
    /// When the load started.
    started: Instant,
}

impl Chaos {
    /// Starts load from every running pod of sandbox `name` (controlled with the
    /// `podiam-sandbox` binary `bin`) whose role annotation is in `roles` (IMDSv2), and
    /// from each pod of `container` (`NAMESPACE/NAME`, the role its ServiceAccount has) on
    /// the container-credentials path.
    pub fn start(
        bin: &Path,
        name: &str,
        roles: &[&str],
        container: &[(String, String)],
    ) -> anyhow::Result<Self> {
        let state = State::load(name)?;
        let targets: Vec<Target> = state
            .pods
            .iter()
            .filter_map(|p| {
                let id = format!("{}/{}", p.namespace, p.name);
                let netns = p.netns.clone()?;
                if state.nodes.iter().any(|n| n.netns == netns) {
                    return None;
                }
                let (role, token_file) = match container.iter().find(|(pod, _)| *pod == id) {
                    Some((_, role)) => (role.clone(), Some(token_file(p)?)),
                    None => {
                        let role = p.role.clone()?;
                        (p.pod_identity.is_none() && roles.contains(&role.as_str()))
                            .then_some((role, None))?
                    }
                };
                Some(Target {
                    pod: id,
                    node: p.node.clone(),
                    netns,
                    ip: p.ip.parse().ok()?,
                    role,
                    token_file,
                })
            })
            .collect();
        if targets.is_empty() {
            bail!("sandbox {name}: no running pod has one of the roles {roles:?}");
        }
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for (i, target) in targets.iter().enumerate() {
            let (target, samples, stop) = (target.clone(), samples.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                if let Err(error) = load(i, &target, &samples, &stop) {
                    eprintln!("load from {}: {error:#}", target.pod);
                }
            }));
        }
        Ok(Self {
            bin: bin.to_path_buf(),
            name: name.to_string(),
            targets,
            samples,
            stop,
            threads,
            identities: HashMap::new(),
            revoked: Vec::new(),
            started: Instant::now(),
        })
    }

    /// Runs `podiam-sandbox --name NAME args...`; its output, or why it failed.
    pub fn sandbox(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(&self.bin)
            .args(["--name", &self.name])
            .args(args)
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            bail!("podiam-sandbox {args:?}: {text}");
        }
        Ok(text)
    }

    /// Waits until every pod has had its own credentials after `since`; how long after.
    pub fn wait_served(&self, since: Instant, limit: Duration) -> Option<Duration> {
        let deadline = Instant::now() + limit;
        loop {
            let samples = self.samples.lock();
            let mut first_ok: Vec<Option<Instant>> = vec![None; self.targets.len()];
            for s in samples.iter().filter(|s| s.at >= since) {
                if matches!(s.outcome, Outcome::Ok(_)) {
                    first_ok[s.pod].get_or_insert(s.at);
                }
            }
            drop(samples);
            if first_ok.iter().all(Option::is_some) {
                return first_ok.into_iter().flatten().max().map(|t| t - since);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(PACE);
        }
    }

    /// Injects `fault`, holds it for `hold` (restarts are immediate), removes it, and
    /// waits (up to `recover`) for full service.
    pub fn run(&mut self, fault: Fault, hold: Duration, recover: Duration) -> anyhow::Result<Row> {
        let node = self.targets[0].node.clone();
        let before = State::load(&self.name)?;
        let started = Instant::now();
        match fault {
            Fault::ServerRestart | Fault::ServerDown => {
                self.sandbox(&["server", "stop"])?;
            }
            Fault::ApiDown => {
                self.sandbox(&["api", "stop"])?;
            }
            Fault::ApiDownRevoked => {
                self.sandbox(&["api", "stop"])?;
                self.revoke()?;
            }
            Fault::DeletedWhileHeld => {
                self.sandbox(&["server", "stop"])?;
                let victim = self.victim()?;
                let pod = self.targets[victim].pod.clone();
                self.mark(victim, Instant::now());
                self.sandbox(&["delete", "--keep-network", &pod])?;
            }
            Fault::AgentRestart | Fault::AgentDown => {
                self.sandbox(&["agent", "stop", &node])?;
            }
            Fault::StsThrottle | Fault::StsError | Fault::StsDown => {
                self.sandbox(&["sts", fault.sts_mode().unwrap_or("forward")])?;
                // A pod that needs a session while STS cannot give one.
                let name = format!("new-{}", fault.name());
                self.add_pod(&node, "payments", &name, &format!("payments-{name}"))?;
            }
            Fault::WatchesCut | Fault::WatchesExpired => {
                let expire = fault == Fault::WatchesExpired;
                self.sandbox(&["watches", if expire { "expire" } else { "cut" }])?;
                // Only a watch that came back delivers this pod.
                let name = format!("new-{}", fault.name());
                self.add_pod(&node, "payments", &name, &format!("payments-{name}"))?;
            }
            Fault::CertRotate => {
                let before = tls_reloads(&before)?;
                self.sandbox(&["certs"])?;
                let deadline = Instant::now() + Duration::from_secs(60);
                loop {
                    let now = tls_reloads(&State::load(&self.name)?)?;
                    if now.iter().zip(&before).all(|(n, b)| n > b) {
                        break;
                    }
                    if Instant::now() > deadline {
                        bail!(
                            "not every process reloaded its certificates within 60 s: {before:?} → {now:?}"
                        );
                    }
                    std::thread::sleep(Duration::from_millis(250));
                }
            }
        }
        if fault.held() {
            std::thread::sleep(hold.saturating_sub(started.elapsed()));
        }
        match fault {
            Fault::ServerRestart | Fault::ServerDown => {
                self.sandbox(&["server", "start"])?;
            }
            Fault::ApiDown => {
                self.sandbox(&["api", "start"])?;
            }
            Fault::ApiDownRevoked => {
                self.sandbox(&["api", "start"])?;
                self.restore_after_feed(Restore::Policy)?;
            }
            Fault::DeletedWhileHeld => {
                self.sandbox(&["server", "start"])?;
                self.restore_after_feed(Restore::Pod)?;
            }
            Fault::AgentRestart | Fault::AgentDown => {
                self.sandbox(&["agent", "start", &node])?;
            }
            Fault::StsThrottle | Fault::StsError | Fault::StsDown => {
                self.sandbox(&["sts", "forward"])?;
            }
            Fault::WatchesCut | Fault::WatchesExpired | Fault::CertRotate => {}
        }
        let ended = Instant::now();
        let recovery = self.wait_served(ended, recover);
        let after = State::load(&self.name)?;
        let exited = exited(&before, &after, fault, &node);
        let window: Vec<Sample> = self
            .samples
            .lock()
            .iter()
            .filter(|s| s.at >= started)
            .cloned()
            .collect();
        let (mut ok, mut refused, mut failed, mut wrong) = (0, 0, 0, 0);
        let mut example = None;
        for s in &window {
            let during = s.at < ended;
            if let Some(what) = self.verdict(s)? {
                wrong += 1;
                example.get_or_insert(what);
                continue;
            }
            if during {
                match s.outcome {
                    Outcome::Ok(_) => ok += 1,
                    Outcome::Refused => refused += 1,
                    _ => failed += 1,
                }
            }
        }
        Ok(Row {
            fault,
            held: ended - started,
            ok,
            refused,
            failed,
            wrong,
            recovery,
            exited,
            example,
        })
    }

    /// Waits until the server's view is stale (its readiness gate closed), then narrows
    /// the policy of the first metadata-path pod's namespace so that it no longer permits
    /// that pod's role (it still permits every other target's there).
    fn revoke(&mut self) -> anyhow::Result<()> {
        let state = State::load(&self.name)?;
        let admin: SocketAddr = state
            .server_admin
            .as_deref()
            .context("no server admin address")?
            .parse()?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while crate::netns::get(&state.ctl, admin, "/readyz")?.0 == 200 {
            if Instant::now() > deadline {
                bail!("the server stayed ready 60 s after the API server went away");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let since = Instant::now();
        let victim = self.victim()?;
        let others: Vec<&str> = self
            .targets
            .iter()
            .enumerate()
            .filter(|(i, t)| *i != victim && t.pod.starts_with(REVOKED_NAMESPACE))
            .map(|(_, t)| t.role.as_str())
            .collect();
        let permitted = format!("arn:aws:iam::{ACCOUNT}:role/({})", others.join("|"));
        self.apply_namespace(&permitted)?;
        self.mark(victim, since);
        Ok(())
    }

    /// The pod whose role a fault takes away: the first metadata-path pod of
    /// [`REVOKED_NAMESPACE`].
    fn victim(&self) -> anyhow::Result<usize> {
        self.targets
            .iter()
            .position(|t| t.token_file.is_none() && t.pod.starts_with(REVOKED_NAMESPACE))
            .with_context(|| format!("no metadata-path pod in {REVOKED_NAMESPACE} under load"))
    }

    /// From `since` on, `victim` may be answered only the credentials it had before (held
    /// by its agent), and nothing once its node's feed is back.
    fn mark(&mut self, victim: usize, since: Instant) {
        let known = self
            .samples
            .lock()
            .iter()
            .filter(|s| s.pod == victim)
            .filter_map(|s| match &s.outcome {
                Outcome::Ok(a) => Some(a.access_key.clone()),
                _ => None,
            })
            .collect();
        self.revoked.push(Revoked {
            pod: victim,
            since,
            known,
            fed: None,
            until: None,
        });
    }

    /// Once the revoked pod's node has its feed again (and the pod has been refused),
    /// gives the role back: its namespace's policy, or the pod itself.
    fn restore_after_feed(&mut self, restore: Restore) -> anyhow::Result<()> {
        let r = self.revoked.last().cloned().context("nothing revoked")?;
        let state = State::load(&self.name)?;
        let node = state
            .nodes
            .iter()
            .find(|n| n.name == self.targets[r.pod].node)
            .context("the revoked pod's node is gone")?;
        let admin: SocketAddr =
            format!("{}:{}", node.ip, crate::sandbox::AGENT_ADMIN_PORT).parse()?;
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let (_, text) = crate::netns::get(&node.netns, admin, "/metrics")?;
            if text.lines().any(|l| l == "podiam_agent_feed_connected 1") {
                break;
            }
            if Instant::now() > deadline {
                bail!("{}'s feed not back within 90 s", node.name);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let fed = Instant::now();
        if let Some(last) = self.revoked.last_mut() {
            last.fed = Some(fed);
        }
        // The pod gets nothing from now on (refused; a deleted pod's address waits for a
        // new pod on it past the round's timeout): a few rounds to see it.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let refused = self.samples.lock().iter().any(|s| {
                s.pod == r.pod
                    && s.at > fed
                    && matches!(s.outcome, Outcome::Refused | Outcome::Failed)
            });
            if refused {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "{} never refused after the feed came back",
                    self.targets[r.pod].pod
                );
            }
            std::thread::sleep(PACE);
        }
        std::thread::sleep(FEED_GRACE * 2);
        match restore {
            Restore::Policy => self.apply_namespace(REVOKED_POLICY)?,
            Restore::Pod => {
                // Created again at the same address and node, on the network it kept.
                let target = &self.targets[r.pod];
                let (namespace, name) = target.pod.split_once('/').context("a pod's name")?;
                let yaml = pod_yaml(namespace, name, &target.role, &target.node, Some(target.ip));
                self.apply(&yaml)?;
            }
        }
        if let Some(last) = self.revoked.last_mut() {
            last.until = Some(Instant::now());
        }
        Ok(())
    }

    /// Applies [`REVOKED_NAMESPACE`] with `permitted` as its policy.
    fn apply_namespace(&self, permitted: &str) -> anyhow::Result<()> {
        let name = REVOKED_NAMESPACE.trim_end_matches('/');
        self.apply(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n  annotations:\n    \
             iam.amazonaws.com/permitted: \"{permitted}\"\n"
        ))
    }

    /// `podiam-sandbox apply` of `yaml`.
    fn apply(&self, yaml: &str) -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("apply.yaml");
        std::fs::write(&file, yaml)?;
        self.sandbox(&["apply", &file.to_string_lossy()])?;
        Ok(())
    }

    /// Checks the checker: the last credentials each pod got belong, in STS, to that pod's
    /// role and to no other pod's, so that a swapped answer would count as wrong.
    pub fn self_check(&mut self) -> anyhow::Result<()> {
        let last: Vec<(usize, Answered)> = {
            let samples = self.samples.lock();
            let mut last = HashMap::new();
            for s in samples.iter() {
                if let Outcome::Ok(a) = &s.outcome {
                    last.insert(s.pod, a.clone());
                }
            }
            last.into_iter().collect()
        };
        if last.len() < 2 {
            bail!("self-check: fewer than two pods have been answered");
        }
        for (pod, answered) in last {
            let role = self.identity(&answered)?;
            let target = &self.targets[pod];
            if role != target.role {
                bail!(
                    "self-check: {}'s credentials are {role}'s in STS",
                    target.pod
                );
            }
        }
        // Distinct roles: one pod's key in another's answer is another role in STS.
        let roles: std::collections::HashSet<_> = self.targets.iter().map(|t| &t.role).collect();
        if roles.len() != self.targets.len() {
            bail!("self-check: two pods share a role; a swap between them would not show");
        }
        Ok(())
    }

    /// Applies a pod `namespace/name` with `role` on `node` and puts it under load.
    pub fn add_pod(
        &mut self,
        node: &str,
        namespace: &str,
        name: &str,
        role: &str,
    ) -> anyhow::Result<()> {
        self.apply(&pod_yaml(namespace, name, role, node, None))?;
        let state = State::load(&self.name)?;
        let pod = state
            .pods
            .iter()
            .find(|p| p.namespace == namespace && p.name == name)
            .with_context(|| format!("{namespace}/{name} is not in the sandbox after apply"))?;
        let target = Target {
            pod: format!("{namespace}/{name}"),
            node: node.to_string(),
            netns: pod.netns.clone().context("the new pod has no network")?,
            ip: pod.ip.parse()?,
            role: role.to_string(),
            token_file: None,
        };
        let i = self.targets.len();
        self.targets.push(target.clone());
        let (samples, stop) = (self.samples.clone(), self.stop.clone());
        self.threads.push(std::thread::spawn(move || {
            if let Err(error) = load(i, &target, &samples, &stop) {
                eprintln!("load from {}: {error:#}", target.pod);
            }
        }));
        Ok(())
    }

    /// The role STS gives the credentials (asked once per access key, with the
    /// credentials themselves, from the control namespace where moto listens).
    fn identity(&mut self, answered: &Answered) -> anyhow::Result<String> {
        if let Some(role) = self.identities.get(&answered.access_key) {
            return Ok(role.clone());
        }
        let state = State::load(&self.name)?;
        const SCRIPT: &str = "import boto3, sys\n\
            c = boto3.client('sts', endpoint_url=sys.argv[1], region_name='us-east-1',\n\
                aws_access_key_id=sys.argv[2], aws_secret_access_key=sys.argv[3],\n\
                aws_session_token=sys.argv[4])\n\
            print(c.get_caller_identity()['Arn'])\n";
        let python = crate::moto::venv().join("bin/python3");
        let out = Command::new("ip")
            .args(["netns", "exec", &state.ctl])
            .arg(&python)
            .args(["-c", SCRIPT, &state.sts])
            .args([&answered.access_key, &answered.secret, &answered.token])
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .output()?;
        let arn = String::from_utf8_lossy(&out.stdout).trim().to_string();
        // arn:aws:sts::ACCOUNT:assumed-role/ROLE/SESSION
        let prefix = format!("arn:aws:sts::{ACCOUNT}:assumed-role/");
        let role = arn
            .strip_prefix(&prefix)
            .and_then(|rest| rest.split('/').next())
            .map(str::to_string)
            .unwrap_or_else(|| {
                format!(
                    "(not an assumed role: {arn} {})",
                    String::from_utf8_lossy(&out.stderr).trim()
                )
            });
        self.identities
            .insert(answered.access_key.clone(), role.clone());
        Ok(role)
    }

    /// Rounds between `from` and `to`: (ok, refused, failed or wrong).
    pub fn counts(&self, from: Instant, to: Instant) -> (usize, usize, usize) {
        let samples = self.samples.lock();
        let window = || samples.iter().filter(|s| s.at >= from && s.at < to);
        (
            window()
                .filter(|s| matches!(s.outcome, Outcome::Ok(_)))
                .count(),
            window()
                .filter(|s| matches!(s.outcome, Outcome::Refused))
                .count(),
            window()
                .filter(|s| matches!(s.outcome, Outcome::Failed | Outcome::Wrong(_)))
                .count(),
        )
    }

    /// What is wrong with the answer of `s`, if anything: not the pod's role, or
    /// credentials that STS says are another role's.
    fn verdict(&mut self, s: &Sample) -> anyhow::Result<Option<String>> {
        if let Outcome::Ok(answered) = &s.outcome
            && let Some(r) = self.revoked.iter().find(|r| {
                r.pod == s.pod && s.at >= r.since && r.until.is_none_or(|until| s.at < until)
            })
        {
            let pod = &self.targets[s.pod].pod;
            if !r.known.contains(&answered.access_key) {
                return Ok(Some(format!(
                    "{pod}: credentials {} issued after its role was revoked and the server's view went stale",
                    answered.access_key
                )));
            }
            if r.fed.is_some_and(|fed| s.at > fed + FEED_GRACE) {
                return Ok(Some(format!(
                    "{pod}: its revoked role still served after its node's feed came back"
                )));
            }
        }
        Ok(match &s.outcome {
            Outcome::Wrong(what) => Some(what.clone()),
            Outcome::Ok(answered) => {
                let role = self.identity(answered)?;
                let pod = &self.targets[s.pod];
                (role != pod.role).then(|| {
                    format!(
                        "{}: access key {} belongs to {role}",
                        pod.pod, answered.access_key
                    )
                })
            }
            Outcome::Refused | Outcome::Failed => None,
        })
    }

    /// Every answer so far checked against STS: how many were not the pod's own, and the
    /// first of them.
    pub fn wrong(&mut self) -> anyhow::Result<(usize, Option<String>)> {
        let samples: Vec<Sample> = self.samples.lock().clone();
        let (mut wrong, mut example) = (0, None);
        for s in &samples {
            if let Some(what) = self.verdict(s)? {
                wrong += 1;
                example.get_or_insert(what);
            }
        }
        Ok((wrong, example))
    }

    /// Every round so far: (ok, refused, failed or wrong).
    pub fn totals(&self) -> (usize, usize, usize) {
        self.counts(self.started, Instant::now() + Duration::from_secs(1))
    }

    /// Stops the load.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Chaos {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A sandbox brought up for the matrix, with more pods under load; `down` when dropped.
#[derive(Debug)]
pub struct Up {
    bin: PathBuf,
    /// Its name.
    pub name: String,
    /// The roles of the pods to load: the example's two permitted pods and the added ones.
    pub roles: Vec<String>,
    /// The pods on the container-credentials path (`NAMESPACE/NAME`) and their roles: the
    /// example's two.
    pub container: Vec<(String, String)>,
}

impl Up {
    /// `podiam-sandbox --name NAME up MANIFEST` (the example's namespaces and pods), then
    /// `per_node` more permitted pods on each of its two nodes.
    pub fn start(bin: &Path, name: &str, manifest: &Path, per_node: usize) -> anyhow::Result<Self> {
        Self::start_with(bin, name, manifest, per_node, &[])
    }

    /// Like [`Up::start`], with more podiam-server arguments.
    pub fn start_with(
        bin: &Path,
        name: &str,
        manifest: &Path,
        per_node: usize,
        server_args: &[&str],
    ) -> anyhow::Result<Self> {
        let out = Command::new(bin)
            .args(["--name", name, "up"])
            .arg(manifest)
            .args(server_args.iter().map(|a| format!("--server-arg={a}")))
            .output()?;
        let up = Self {
            bin: bin.to_path_buf(),
            name: name.to_string(),
            roles: vec!["payments-api".into(), "analytics-etl-nightly".into()],
            container: vec![
                ("payments/ledger".into(), "payments-ledger".into()),
                ("analytics/report".into(), "analytics-reader".into()),
            ],
        };
        if !out.status.success() {
            bail!(
                "sandbox up: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let mut up = up;
        let mut yaml = String::new();
        for n in 0..per_node {
            for (node, namespace, role) in [
                ("node-a", "payments", format!("payments-load-{n}")),
                ("node-b", "analytics", format!("analytics-etl-load-{n}")),
            ] {
                yaml += &format!(
                    "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: load-{n}\n  namespace: {namespace}\n  \
                     annotations:\n    iam.amazonaws.com/role: {role}\nspec:\n  nodeName: {node}\n"
                );
                up.roles.push(role);
            }
        }
        if per_node > 0 {
            let dir = tempfile::tempdir()?;
            let file = dir.path().join("load.yaml");
            std::fs::write(&file, yaml)?;
            let out = Command::new(bin)
                .args(["--name", name, "apply"])
                .arg(&file)
                .output()?;
            if !out.status.success() {
                bail!("sandbox apply: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
        Ok(up)
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = Command::new(&self.bin)
            .args(["--name", &self.name, "down"])
            .output();
    }
}

/// What a process's metrics say of its health over time.
#[derive(Clone, Copy, Debug, Default)]
pub struct Vitals {
    /// `process_resident_memory_bytes`, in MiB.
    pub rss_mib: f64,
    /// `process_open_fds`.
    pub fds: f64,
    /// `process_threads`.
    pub threads: f64,
    /// `podiam_runtime_tasks`.
    pub tasks: f64,
}

/// The [`Vitals`] of the server, then of each agent: `(name, vitals)`.
pub fn vitals(name: &str) -> anyhow::Result<Vec<(String, Vitals)>> {
    let state = State::load(name)?;
    let read = |netns: &str, addr: &str| -> anyhow::Result<Vitals> {
        let (_, text) = crate::netns::get(netns, addr.parse()?, "/metrics")?;
        let value = |metric: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(metric)?.strip_prefix(' ')?.parse().ok())
                .unwrap_or(f64::NAN)
        };
        Ok(Vitals {
            rss_mib: value("process_resident_memory_bytes") / (1024.0 * 1024.0),
            fds: value("process_open_fds"),
            threads: value("process_threads"),
            tasks: value("podiam_runtime_tasks"),
        })
    };
    let mut out = vec![(
        "podiam-server".to_string(),
        read(
            &state.ctl,
            state
                .server_admin
                .as_deref()
                .context("no server admin address")?,
        )?,
    )];
    for n in &state.nodes {
        out.push((
            format!("agent {}", n.name),
            read(
                &n.netns,
                &format!("{}:{}", n.ip, crate::sandbox::AGENT_ADMIN_PORT),
            )?,
        ));
    }
    Ok(out)
}

/// `podiam_tls_reloads_total{result="ok"}` of the server, then of each agent.
fn tls_reloads(state: &State) -> anyhow::Result<Vec<f64>> {
    let metric = |netns: &str, addr: &str| -> anyhow::Result<f64> {
        let (_, text) = crate::netns::get(netns, addr.parse()?, "/metrics")?;
        Ok(text
            .lines()
            .find_map(|l| {
                l.strip_prefix("podiam_tls_reloads_total{result=\"ok\"} ")?
                    .parse()
                    .ok()
            })
            .unwrap_or(0.0))
    };
    let mut out = vec![metric(
        &state.ctl,
        state
            .server_admin
            .as_deref()
            .context("no server admin address")?,
    )?];
    for n in &state.nodes {
        out.push(metric(
            &n.netns,
            &format!("{}:{}", n.ip, crate::sandbox::AGENT_ADMIN_PORT),
        )?);
    }
    Ok(out)
}

/// Whether the process `pid` is alive.
fn alive(pid: Option<u32>) -> bool {
    pid.and_then(|p| i32::try_from(p).ok())
        .is_some_and(|p| nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), None).is_ok())
}

/// The server and agents of sandbox `name` that are not running.
pub fn gone(name: &str) -> anyhow::Result<Vec<String>> {
    let state = State::load(name)?;
    let mut gone = Vec::new();
    if !alive(state.server_pid) {
        gone.push("podiam-server".to_string());
    }
    for n in &state.nodes {
        if !alive(n.agent_pid) {
            gone.push(format!("podiam-agent on {}", n.name));
        }
    }
    Ok(gone)
}

/// The processes that are gone without the fault stopping them.
fn exited(before: &State, after: &State, fault: Fault, node: &str) -> Vec<String> {
    let mut gone = Vec::new();
    let server_restarted = matches!(
        fault,
        Fault::ServerRestart | Fault::ServerDown | Fault::DeletedWhileHeld
    );
    if !alive(after.server_pid) || (!server_restarted && before.server_pid != after.server_pid) {
        gone.push("podiam-server".to_string());
    }
    for n in &after.nodes {
        let restarted = n.name == node && matches!(fault, Fault::AgentRestart | Fault::AgentDown);
        let was = before
            .nodes
            .iter()
            .find(|b| b.name == n.name)
            .and_then(|b| b.agent_pid);
        if !alive(n.agent_pid) || (!restarted && was != n.agent_pid) {
            gone.push(format!("podiam-agent on {}", n.name));
        }
    }
    gone
}

/// One pod's load, inside its network namespace, until `stop`.
fn load(
    i: usize,
    target: &Target,
    samples: &Mutex<Vec<Sample>>,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    crate::netns::enter(&target.netns)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let imds: SocketAddr = IMDS.parse()?;
    let container: SocketAddr = CONTAINER.parse()?;
    rt.block_on(async {
        while !stop.load(Ordering::SeqCst) {
            let round = async {
                match &target.token_file {
                    Some(file) => container_round(target, container, file).await,
                    None => round(target, imds).await,
                }
            };
            let outcome = tokio::time::timeout(ROUND_TIMEOUT, round)
                .await
                .unwrap_or(Outcome::Failed);
            samples.lock().push(Sample {
                pod: i,
                at: Instant::now(),
                outcome,
            });
            tokio::time::sleep(PACE).await;
        }
    });
    Ok(())
}

/// One SDK-like round: token, role list, credentials.
async fn round(target: &Target, imds: SocketAddr) -> Outcome {
    let ask = |method, path: String, headers: Vec<(&'static str, String)>| async move {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        imds_client::request(target.ip, imds, method, &path, &headers).await
    };
    let token = match ask(
        Method::PUT,
        "/latest/api/token".into(),
        vec![("x-aws-ec2-metadata-token-ttl-seconds", "21600".into())],
    )
    .await
    {
        Ok(a) if a.status == 200 => a.body,
        Ok(_) => return Outcome::Refused,
        Err(_) => return Outcome::Failed,
    };
    let auth = vec![("x-aws-ec2-metadata-token", token)];
    let list = match ask(
        Method::GET,
        "/latest/meta-data/iam/security-credentials/".into(),
        auth.clone(),
    )
    .await
    {
        Ok(a) if a.status == 200 => a.body,
        Ok(_) => return Outcome::Refused,
        Err(_) => return Outcome::Failed,
    };
    let role = list.trim();
    if role != target.role {
        return Outcome::Wrong(format!("{}: role list {role:?}", target.pod));
    }
    let path = format!("/latest/meta-data/iam/security-credentials/{role}");
    let body = match ask(Method::GET, path, auth).await {
        Ok(a) if a.status == 200 => a.body,
        Ok(_) => return Outcome::Refused,
        Err(_) => return Outcome::Failed,
    };
    let Some((doc, answered)) = document(&body) else {
        return Outcome::Wrong(format!("{}: not a credentials document", target.pod));
    };
    if answered.access_key.is_empty() || answered.secret.contains("NODE") {
        return Outcome::Wrong(format!("{}: {}", target.pod, doc["Code"]));
    }
    Outcome::Ok(answered)
}

/// A credentials document (both paths name the fields alike) and the credentials in it.
fn document(body: &str) -> Option<(serde_json::Value, Answered)> {
    let doc = serde_json::from_str::<serde_json::Value>(body).ok()?;
    let field = |k: &str| doc[k].as_str().unwrap_or_default().to_string();
    let answered = Answered {
        access_key: field("AccessKeyId"),
        secret: field("SecretAccessKey"),
        token: field("Token"),
    };
    Some((doc, answered))
}

/// One container-credentials round, as an SDK's container provider does it: the token
/// file read again, sent as `Authorization`.
async fn container_round(target: &Target, endpoint: SocketAddr, token_file: &Path) -> Outcome {
    let Ok(token) = std::fs::read_to_string(token_file) else {
        return Outcome::Failed;
    };
    let answer = imds_client::request(
        target.ip,
        endpoint,
        Method::GET,
        podiam_common::pod_identity::PATH,
        &[("authorization", token.trim())],
    )
    .await;
    let body = match answer {
        Ok(a) if a.status == 200 => a.body,
        Ok(_) => return Outcome::Refused,
        Err(_) => return Outcome::Failed,
    };
    let Some((doc, answered)) = document(&body) else {
        return Outcome::Wrong(format!("{}: not a credentials document", target.pod));
    };
    if answered.access_key.is_empty() || doc["AccountId"] != ACCOUNT {
        return Outcome::Wrong(format!("{}: {body:.80}", target.pod));
    }
    Outcome::Ok(answered)
}

/// Where the sandbox keeps a container-credentials pod's projected token on the host.
fn token_file(pod: &crate::sandbox::PodState) -> Option<PathBuf> {
    use podiam_common::pod_identity::{TOKEN_DIR, TOKEN_FILE};
    pod.mounts
        .iter()
        .find(|(_, dir)| dir == TOKEN_DIR)
        .map(|(host, _)| Path::new(host).join(TOKEN_FILE))
}

/// The matrix as a markdown table.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| fault | held | ok during | refused during | failed during | wrong | back to full service after | processes exited |\n|---|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for r in rows {
        out += &format!(
            "| {} | {:.1} s | {} | {} | {} | {} | {} | {} |\n",
            r.fault.name(),
            r.held.as_secs_f64(),
            r.ok,
            r.refused,
            r.failed,
            r.wrong,
            r.recovery
                .map_or("not within the limit".into(), |d| format!(
                    "{:.1} s",
                    d.as_secs_f64()
                )),
            if r.exited.is_empty() {
                "none".into()
            } else {
                r.exited.join(", ")
            },
        );
    }
    out
}
