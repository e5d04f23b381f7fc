//! The sandbox's supervisor: builds the namespaces, runs every process, writes the
//! [`State`] after each change, answers [`Request`]s on its Unix socket, and removes all
//! of it on `down`, SIGTERM or SIGINT. It runs inside the control namespace (`up` puts it
//! there), so the stand-in API server, moto and the server live there too.

use std::{
    collections::HashMap,
    io::Read,
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, bail};
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::UnixListener,
};

use super::{
    ACCOUNT, AGENT_ADMIN_PORT, AGENT_PORT, CTL_IP, NodeState, PodState, Reply, Request,
    SERVER_PORT, State, WEBHOOK_PORT, dir, veth_name,
};
use crate::{
    admission,
    certs::Pki,
    fake_imds::{FakeImds, NodeIdentity},
    http,
    kube_api::FakeKube,
    manifests::{LoadedPod, Loader},
    moto::{Moto, venv},
    netns::{self, ip},
    process::Process,
    stack::agent_identity,
    sts_proxy::{Mode, StsProxy},
};

/// The label that keeps a pod from the webhook (as the webhook configuration's
/// objectSelector does).
const SKIP_LABEL: &str = "podiam.io/skip-pod-identity-webhook";

/// The ServiceAccounts (namespace, name) that `docs` give a role: annotated ones, and
/// those an association names.
fn accounts_given_roles(docs: &[Value]) -> Vec<(String, String)> {
    let mut accounts: Vec<(String, String)> = docs
        .iter()
        .filter_map(|d| {
            let namespace = d["metadata"]["namespace"].as_str().unwrap_or("default");
            let account = match d["kind"].as_str()? {
                "ServiceAccount" => {
                    d["metadata"]["annotations"][podiam_common::pod_identity::ROLE_ARN_ANNOTATION]
                        .as_str()?;
                    d["metadata"]["name"].as_str()?
                }
                "PodIdentityAssociation" => d["spec"]["serviceAccount"].as_str()?,
                _ => return None,
            };
            Some((namespace.to_string(), account.to_string()))
        })
        .collect();
    accounts.sort();
    accounts.dedup();
    accounts
}

/// The webhook's address in the control namespace.
fn webhook_addr() -> anyhow::Result<SocketAddr> {
    Ok(format!("{CTL_IP}:{WEBHOOK_PORT}").parse()?)
}

/// The binaries the sandbox runs.
#[derive(Clone, Debug)]
pub struct Bins {
    /// `podiam-server`.
    pub server: PathBuf,
    /// `podiam-agent`.
    pub agent: PathBuf,
}

/// Everything the sandbox runs.
#[derive(Debug)]
pub struct Supervisor {
    state: State,
    dir: PathBuf,
    bins: Bins,
    kube: FakeKube,
    loader: Loader,
    pki: Pki,
    server: Option<Process>,
    agents: HashMap<String, Process>,
    node_imds: Vec<FakeImds>,
    moto: Option<Moto>,
    /// Between podiam-server and moto, for STS faults (pods' SDKs use moto directly).
    sts_proxy: Option<StsProxy>,
    /// Pod churn in the API server, while on.
    churn: Option<Churn>,
    prometheus: Option<super::prometheus::Prometheus>,
}

/// Pod churn in the stand-in API server.
#[derive(Debug)]
struct Churn {
    interval: tokio::time::Interval,
    /// The next pod's number.
    next: u64,
    live: std::collections::VecDeque<String>,
    keep: usize,
    nodes: Vec<String>,
}

impl Churn {
    /// One pod created, and the oldest deleted beyond `keep`.
    fn step(&mut self, kube: &FakeKube) {
        let n = self.next;
        self.next += 1;
        let name = format!("c-{n}");
        // 100.100.0.0/16: never wired, never routed; the agents just hear of it.
        let ip = format!("100.100.{}.{}", (n / 250) % 250, n % 250 + 1);
        let node = self
            .nodes
            .get(usize::try_from(n).unwrap_or(0) % self.nodes.len().max(1))
            .cloned()
            .unwrap_or_default();
        kube.apply(
            crate::objects::pod("churn", &name)
                .role(&format!("churn-{}", n % 10))
                .node(&node)
                .ip(&ip)
                .build(),
        );
        self.live.push_back(name);
        while self.live.len() > self.keep {
            if let Some(old) = self.live.pop_front() {
                kube.delete_pod("churn", &old);
            }
        }
    }
}

/// Resolves at the churn's next tick; never while there is no churn.
async fn churn_tick(churn: &mut Option<Churn>) {
    match churn {
        Some(c) => {
            c.interval.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// Prints a progress line for `up`.
fn step(what: &str) {
    use std::io::Write;
    // `up` may have gone (Ctrl-C): building goes on, and `down` removes it.
    let _ = writeln!(std::io::stdout(), "step {what}");
}

impl Supervisor {
    /// Builds the sandbox of `manifests` into the state `up` wrote (the control namespace
    /// exists and this process is in it). On error, what was built is left in the state
    /// for [`Supervisor::teardown`].
    pub async fn start(
        name: &str,
        manifests: &Path,
        bins: Bins,
    ) -> anyhow::Result<(Self, anyhow::Result<()>)> {
        let mut state = State::load(name)?;
        state.supervisor = std::process::id();
        state.save()?;
        let dir = dir(name);
        for sub in ["pki", "nodes", "logs", "home"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let pki = Pki::generate(&dir.join("pki"), "sandbox")?;
        let kube = FakeKube::start()
            .await
            .context("starting the stand-in API server")?;
        let role_key = super::flag_value(&state.server_args, "--iam-role-key");
        let mut supervisor = Self {
            state,
            dir,
            bins,
            kube,
            loader: Loader::with_role_key(role_key),
            pki,
            server: None,
            agents: HashMap::new(),
            node_imds: Vec::new(),
            moto: None,
            sts_proxy: None,
            churn: None,
            prometheus: None,
        };
        let built = supervisor.build(manifests).await;
        Ok((supervisor, built))
    }

    async fn build(&mut self, manifests: &Path) -> anyhow::Result<()> {
        let parsed = self.loader.parse(manifests)?;
        if parsed.loaded.pods.is_empty() {
            bail!("{} has no pods", manifests.display());
        }
        let ctl = self.state.ctl.clone();
        ip(&["-n", &ctl, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &ctl,
            "addr",
            "add",
            &format!("{CTL_IP}/32"),
            "dev",
            "lo",
        ])?;

        step("moto (the STS) in the control namespace");
        let moto = Moto::start_on(CTL_IP).await.context("starting moto")?;
        self.state.sts = moto.url();
        self.sts_proxy = Some(
            StsProxy::start(moto.url())
                .await
                .context("starting the STS proxy")?,
        );
        self.moto = Some(moto);
        self.state.save()?;

        step("the stand-in Kubernetes API server, loaded with the manifests");
        let (pods, others): (Vec<Value>, Vec<Value>) =
            parsed.docs.into_iter().partition(|d| d["kind"] == "Pod");
        for doc in others {
            self.kube.apply(doc);
        }
        step("podiam-server (and its admission webhook)");
        self.start_server().await?;

        let nodes = self.loader.nodes();
        let identities = node_identities(&self.state.sts, &nodes)?;
        for (index, (node, identity)) in nodes.iter().zip(identities).enumerate() {
            step(&format!(
                "node {node}: namespace, metadata service, podiam-agent"
            ));
            self.add_node(index, node, identity).await?;
        }
        // As on a real cluster: the webhook sees each pod as it is created, the CNI wires
        // it, the API server shows it, and the kubelet projects its tokens.
        let mut admitted = Vec::new();
        for doc in pods {
            admitted.push(self.admit(doc).await.0);
        }
        for pod in &parsed.loaded.pods {
            self.wire(pod)?;
        }
        for doc in admitted {
            self.kube.apply(doc.clone());
            self.project_tokens(&doc)?;
        }
        self.state.save()?;
        step("Prometheus, scraping the server and the agents, with the shipped alert rules");
        self.start_prometheus().await?;
        Ok(())
    }

    async fn start_prometheus(&mut self) -> anyhow::Result<()> {
        let server = self
            .state
            .server_admin
            .as_deref()
            .and_then(|a| a.parse().ok())
            .context("the server's admin address is not known")?;
        let agents: Vec<(String, std::net::SocketAddr)> = self
            .state
            .nodes
            .iter()
            .filter_map(|n| {
                let addr = format!("{}:{AGENT_ADMIN_PORT}", n.ip).parse().ok()?;
                Some((n.name.clone(), addr))
            })
            .collect();
        let prometheus = super::prometheus::Prometheus::start(
            &self.dir.join("prometheus"),
            CTL_IP,
            server,
            &agents,
        )
        .await
        .context("starting Prometheus (see prometheus/prometheus.log)")?;
        self.state.prometheus = Some(prometheus.addr.to_string());
        self.prometheus = Some(prometheus);
        self.state.save()?;
        Ok(())
    }

    async fn start_server(&mut self) -> anyhow::Result<()> {
        let kubeconfig = self.dir.join("kubeconfig");
        self.kube.write_kubeconfig(&kubeconfig)?;
        let mut cmd = Command::new(&self.bins.server);
        cmd.env_clear()
            .env("AWS_ACCESS_KEY_ID", "sandbox")
            .env("AWS_SECRET_ACCESS_KEY", "sandbox")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .args(["--listen", &format!("{CTL_IP}:{SERVER_PORT}")])
            // The same admin port across restarts, so that Prometheus keeps its target.
            .args([
                "--admin-addr",
                self.state.server_admin.as_deref().unwrap_or("127.0.0.1:0"),
                "--log-format",
                "json",
            ])
            .args(["--base-role-arn", &format!("arn:aws:iam::{ACCOUNT}:role/")])
            // Shorter than the default 60 s, so that `api stop` shows its effect soon.
            .args(["--watch-stale-after", "5s"])
            // The container-credentials path, with the webhook the sandbox calls as an
            // API server would.
            .args(["--pod-identity", "--cluster-name", &self.state.name])
            .args(["--webhook-listen", &format!("{CTL_IP}:{WEBHOOK_PORT}")])
            .args(&self.state.server_args)
            .args(["--region", "us-east-1", "--sts-endpoint"])
            .arg(
                self.sts_proxy
                    .as_ref()
                    .map_or_else(|| self.state.sts.clone(), StsProxy::url),
            )
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .arg("--ca")
            .arg(&self.pki.ca)
            .arg("--cert")
            .arg(&self.pki.server.cert)
            .arg("--key")
            .arg(&self.pki.server.key);
        cmd.stdout(std::process::Stdio::null());
        let log = self.dir.join("logs/server.log");
        let server =
            tokio::task::spawn_blocking(move || Process::spawn_logged(cmd, &["agent API"], &log))
                .await?
                .context("starting podiam-server (see logs/server.log)")?;
        self.state.server_pid = Some(server.pid());
        self.state.server_admin = Some(server.admin.to_string());
        self.state.save()?;
        http::wait_ready(server.admin, Duration::from_secs(30))
            .await
            .context("podiam-server did not become ready (see logs/server.log)")?;
        self.server = Some(server);
        Ok(())
    }

    async fn add_node(
        &mut self,
        index: usize,
        node: &str,
        identity: NodeIdentity,
    ) -> anyhow::Result<()> {
        if index > 250 {
            bail!("the sandbox supports up to 251 nodes");
        }
        let netns = node_netns(&self.state.name, node);
        let (ctl_side, node_ip) = (
            format!("100.100.{index}.1"),
            crate::manifests::node_ip(index),
        );
        let veth = format!("vnode{index}");
        // Recorded only once created: `down` never deletes a namespace it did not make.
        ip(&["netns", "add", &netns])?;
        self.state.netns.push(netns.clone());
        self.state.nodes.push(NodeState {
            name: node.into(),
            netns: netns.clone(),
            ip: node_ip.clone(),
            role: format!("arn:aws:iam::{ACCOUNT}:role/{}", identity.role),
            agent_pid: None,
        });
        self.state.save()?;
        let ctl = self.state.ctl.clone();
        plug(&ctl, &veth, &netns, &format!("{node_ip}/24"))?;
        ip(&[
            "-n",
            &ctl,
            "addr",
            "add",
            &format!("{ctl_side}/24"),
            "dev",
            &veth,
        ])?;
        // The node's routes: its link to the control namespace, the STS and server behind
        // it, and (added per pod) its pods. No default route: the container-credentials
        // address gets one of its own, as a real node's default route covers it (the
        // agent's DNAT takes host-network pods' connections from there).
        for dest in [format!("{CTL_IP}/32"), "169.254.170.23/32".to_string()] {
            ip(&["-n", &netns, "route", "add", &dest, "via", &ctl_side])?;
        }
        netns::run(
            "ip",
            &[
                "netns",
                "exec",
                &netns,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ],
        )?;
        // EC2's metadata service, on the node, with the node's own role.
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            "169.254.169.254/32",
            "dev",
            "lo",
        ])?;
        let listener = netns::bind(&netns, SocketAddr::from(([169, 254, 169, 254], 80)))?;
        self.node_imds.push(FakeImds::serve(
            tokio::net::TcpListener::from_std(listener)?,
            identity,
        )?);
        // The agent's ServiceAccount token, bound to this node.
        let token = random_token()?;
        self.kube.add_token(&token, agent_identity(node));
        let node_dir = self.dir.join("nodes").join(node);
        std::fs::create_dir_all(&node_dir)?;
        std::fs::write(node_dir.join("token"), &token)?;
        std::fs::set_permissions(
            node_dir.join("token"),
            std::fs::Permissions::from_mode(0o600),
        )?;
        self.start_agent(node).await
    }

    async fn start_agent(&mut self, node: &str) -> anyhow::Result<()> {
        let Some(state) = self.state.node(node).cloned() else {
            bail!("no node {node} in the sandbox");
        };
        if self.agents.contains_key(node) {
            bail!("the agent of {node} is already running");
        }
        let node_dir = self.dir.join("nodes").join(node);
        let mut cmd = Command::new("ip");
        cmd.env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .args(["netns", "exec", &state.netns])
            .arg(&self.bins.agent)
            .args(["--listen", &format!("{}:{AGENT_PORT}", state.ip)])
            .args(["--admin-addr", &format!("{}:{AGENT_ADMIN_PORT}", state.ip)])
            .args([
                "--iptables",
                "--host-interface",
                "cali+",
                "--require-imdsv2",
                "--pod-identity",
            ])
            // The node's own link to the control namespace is a veth too, and no pod's.
            .args(["--ignore-interface", "eth0"])
            .args(["--server-address", &format!("{CTL_IP}:{SERVER_PORT}")])
            .args([
                "--server-name",
                "localhost",
                "--server-health-interval",
                "1s",
            ])
            .args(["--log-format", "json"])
            .arg("--token-file")
            .arg(node_dir.join("token"))
            .arg("--token-key-file")
            .arg(node_dir.join("imds-token.key"))
            .arg("--ca")
            .arg(&self.pki.ca)
            .arg("--cert")
            .arg(&self.pki.client.cert)
            .arg("--key")
            .arg(&self.pki.client.key);
        cmd.stdout(std::process::Stdio::null());
        let log = self.dir.join(format!("logs/agent-{node}.log"));
        let agent = tokio::task::spawn_blocking(move || {
            Process::spawn_logged(cmd, &["metadata endpoint"], &log)
        })
        .await?
        .with_context(|| format!("starting the agent of {node} (see logs/agent-{node}.log)"))?;
        if let Some(n) = self.state.nodes.iter_mut().find(|n| n.name == node) {
            n.agent_pid = Some(agent.pid());
        }
        self.state.save()?;
        let admin = agent.admin;
        self.agents.insert(node.to_string(), agent);
        http::wait_ready(admin, Duration::from_secs(30))
            .await
            .with_context(|| {
                format!("the agent of {node} did not become ready (see logs/agent-{node}.log)")
            })?;
        Ok(())
    }

    async fn stop_agent(&mut self, node: &str) -> anyhow::Result<()> {
        let Some(agent) = self.agents.remove(node) else {
            bail!("the agent of {node} is not running");
        };
        tokio::task::spawn_blocking(move || agent.terminate(Duration::from_secs(10))).await??;
        if let Some(n) = self.state.nodes.iter_mut().find(|n| n.name == node) {
            n.agent_pid = None;
        }
        self.state.save()
    }

    /// Gives a pod its namespace, wired to its node (hostNetwork pods share the node's;
    /// finished pods get none).
    fn wire(&mut self, pod: &LoadedPod) -> anyhow::Result<()> {
        let Some(node) = self.state.node(&pod.node).cloned() else {
            bail!(
                "{}/{} is on node {:?}, which the sandbox does not have",
                pod.namespace,
                pod.name,
                pod.node
            );
        };
        let mut record = PodState {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            node: pod.node.clone(),
            ip: pod.ip.clone(),
            role: pod.role.clone(),
            netns: None,
            env: Vec::new(),
            mounts: Vec::new(),
            pod_identity: None,
        };
        if pod.host_network {
            record.netns = Some(node.netns.clone());
        } else if pod.running {
            if let Some(other) = self
                .state
                .pods
                .iter()
                .find(|p| p.ip == pod.ip && p.netns.as_ref().is_some_and(|n| *n != node.netns))
            {
                bail!(
                    "{}/{}: IP {} is in use by {}/{}",
                    pod.namespace,
                    pod.name,
                    pod.ip,
                    other.namespace,
                    other.name
                );
            }
            let netns = pod_netns(&self.state.name, &pod.namespace, &pod.name);
            let veth = veth_name(&pod.namespace, &pod.name);
            ip(&["netns", "add", &netns])?;
            record.netns = Some(netns.clone());
            self.state.netns.push(netns.clone());
            self.state.pods.push(record);
            self.state.save()?;
            plug(&node.netns, &veth, &netns, &format!("{}/32", pod.ip))?;
            // The pod reaches its node, and through it only the metadata address and the STS.
            ip(&[
                "-n",
                &netns,
                "route",
                "add",
                &format!("{}/32", node.ip),
                "dev",
                "eth0",
                "scope",
                "link",
            ])?;
            for dest in [
                "169.254.169.254/32",
                "169.254.170.23/32",
                &format!("{CTL_IP}/32"),
            ] {
                ip(&[
                    "-n", &netns, "route", "add", dest, "via", &node.ip, "dev", "eth0",
                ])?;
            }
            ip(&[
                "-n",
                &node.netns,
                "route",
                "add",
                &format!("{}/32", pod.ip),
                "dev",
                &veth,
            ])?;
            ip(&[
                "-n",
                &self.state.ctl,
                "route",
                "add",
                &format!("{}/32", pod.ip),
                "via",
                &node.ip,
            ])?;
            return Ok(());
        }
        self.state.pods.push(record);
        Ok(())
    }

    /// A pod applied again with the node, IP and kind of network it has: its network stays
    /// (a real pod's does while its object changes), only its record follows. Whether it
    /// was such a pod.
    fn rewire(&mut self, pod: &LoadedPod) -> anyhow::Result<bool> {
        let netns = if pod.host_network {
            self.state.node(&pod.node).map(|n| n.netns.clone())
        } else if pod.running {
            Some(pod_netns(&self.state.name, &pod.namespace, &pod.name))
        } else {
            None
        };
        let Some(record) = self.state.pods.iter_mut().find(|p| {
            p.namespace == pod.namespace
                && p.name == pod.name
                && p.node == pod.node
                && p.ip == pod.ip
                && p.netns == netns
        }) else {
            return Ok(false);
        };
        record.role.clone_from(&pod.role);
        self.state.save()?;
        Ok(true)
    }

    /// A running pod's IP must not be another running pod's (the same pod, replaced, may
    /// keep its own).
    fn check_ip(&self, pod: &LoadedPod) -> anyhow::Result<()> {
        if !pod.running || pod.host_network {
            return Ok(());
        }
        if let Some(other) = self.state.pods.iter().find(|p| {
            p.ip == pod.ip
                && (p.namespace != pod.namespace || p.name != pod.name)
                && p.netns
                    .as_ref()
                    .is_some_and(|n| self.state.nodes.iter().all(|node| node.netns != *n))
        }) {
            bail!(
                "{}/{}: IP {} is in use by {}/{}",
                pod.namespace,
                pod.name,
                pod.ip,
                other.namespace,
                other.name
            );
        }
        Ok(())
    }

    /// Removes a pod's namespace and its routes.
    fn unwire(&mut self, namespace: &str, name: &str) -> anyhow::Result<()> {
        let Some(i) = self
            .state
            .pods
            .iter()
            .position(|p| p.namespace == namespace && p.name == name)
        else {
            return Ok(());
        };
        let pod = self.state.pods.remove(i);
        let own = pod_netns(&self.state.name, namespace, name);
        if pod.netns.as_deref() == Some(own.as_str()) {
            // As a CNI's DEL does, the host end goes first, and at once. Destroying the
            // namespace alone frees its veth later, in the kernel's own time: the old
            // interface could still hold the IP when the next pod is announced with it.
            if let Some(node) = self.state.node(&pod.node) {
                let _ = ip(&[
                    "-n",
                    &node.netns,
                    "link",
                    "del",
                    &veth_name(namespace, name),
                ]);
            }
            netns::destroy(&own)?;
            self.state.netns.retain(|n| *n != own);
            let _ = ip(&[
                "-n",
                &self.state.ctl,
                "route",
                "del",
                &format!("{}/32", pod.ip),
            ]);
        }
        self.state.save()
    }

    /// What the API server does at a pod's creation: an AdmissionReview to podiam's
    /// webhook, whose patch is applied (`failurePolicy: Ignore`: if the call fails, the
    /// pod is created unchanged). Namespaces the webhook configuration leaves out are
    /// not sent. A note for the operator when the pod was changed or the call failed.
    async fn admit(&self, pod: Value) -> (Value, Option<String>) {
        let namespace = pod["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string();
        let name = pod["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let skipped = ["kube-system", "podiam"].contains(&namespace.as_str())
            || !pod["metadata"]["labels"][SKIP_LABEL].is_null();
        if skipped {
            return (pod, None);
        }
        let admitted = match webhook_addr() {
            Ok(addr) => admission::admit(addr, &self.pki.ca, &namespace, &pod).await,
            Err(error) => Err(error),
        };
        match admitted {
            Ok(admitted) if admitted != pod => {
                let account = pod["spec"]["serviceAccountName"]
                    .as_str()
                    .unwrap_or("default");
                let note = format!(
                    "pod {namespace}/{name}: the webhook gave it the container-credentials path (ServiceAccount {account})"
                );
                (admitted, Some(note))
            }
            Ok(_) => (pod, None),
            Err(error) => {
                let note = format!(
                    "pod {namespace}/{name}: admission webhook failed ({error:#}); created unchanged (failurePolicy: Ignore)"
                );
                (pod, Some(note))
            }
        }
    }

    /// Waits until the webhook mutates a pod of each of `accounts` (namespace, name): the
    /// server has seen the roles just applied. A note for each it still did not after
    /// 10 s (its pods are then created as the webhook answers).
    async fn wait_for_webhook(&self, accounts: &[(String, String)]) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut notes = Vec::new();
        for (namespace, account) in accounts {
            let probe = serde_json::json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "podiam-sandbox-probe", "namespace": namespace},
                "spec": {"serviceAccountName": account, "containers": [{"name": "probe"}]}
            });
            loop {
                if self.admit(probe.clone()).await.0 != probe {
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    notes.push(format!(
                        "ServiceAccount {namespace}/{account}: the webhook does not know its role yet"
                    ));
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        notes
    }

    /// What the kubelet does for a pod's projected ServiceAccount token volumes: a token
    /// bound to the pod (as stored, with its UID) in a file of its own, and mounted where
    /// the pod's first container mounts the volume; that container's environment, for the
    /// pod's commands.
    fn project_tokens(&mut self, pod: &Value) -> anyhow::Result<()> {
        let namespace = pod["metadata"]["namespace"].as_str().unwrap_or("default");
        let Some(name) = pod["metadata"]["name"].as_str() else {
            return Ok(());
        };
        let container = &pod["spec"]["containers"][0];
        let env: Vec<(String, String)> = container["env"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| Some((e["name"].as_str()?.into(), e["value"].as_str()?.into())))
            .collect();
        let mut mounts = Vec::new();
        for volume in pod["spec"]["volumes"].as_array().into_iter().flatten() {
            let Some(volume_name) = volume["name"].as_str() else {
                continue;
            };
            let dir = self
                .dir
                .join("pods")
                .join(namespace)
                .join(name)
                .join(volume_name);
            let mut projected = false;
            for source in volume["projected"]["sources"]
                .as_array()
                .into_iter()
                .flatten()
            {
                let token = &source["serviceAccountToken"];
                let Some(path) = token["path"].as_str() else {
                    continue;
                };
                let audience = token["audience"]
                    .as_str()
                    .unwrap_or("https://kubernetes.default.svc");
                let lifetime =
                    Duration::from_secs(token["expirationSeconds"].as_u64().unwrap_or(3600));
                let jwt = self
                    .kube
                    .issue_pod_token(namespace, name, audience, lifetime)
                    .with_context(|| format!("a token for {namespace}/{name}"))?;
                std::fs::create_dir_all(&dir)?;
                let file = dir.join(path);
                std::fs::write(&file, jwt)?;
                std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))?;
                projected = true;
            }
            let mount = container["volumeMounts"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|m| m["name"] == volume_name)
                .and_then(|m| m["mountPath"].as_str());
            if let (true, Some(mount)) = (projected, mount) {
                mounts.push((dir.display().to_string(), mount.to_string()));
            }
        }
        let pod_identity = env
            .iter()
            .any(|(k, _)| k == podiam_common::pod_identity::ENV_FULL_URI)
            .then(|| {
                pod["spec"]["serviceAccountName"]
                    .as_str()
                    .unwrap_or("default")
                    .to_string()
            });
        if let Some(record) = self
            .state
            .pods
            .iter_mut()
            .find(|p| p.namespace == namespace && p.name == name)
        {
            record.env = env;
            record.mounts = mounts;
            record.pod_identity = pod_identity;
        }
        Ok(())
    }

    async fn handle(&mut self, request: Request) -> anyhow::Result<String> {
        match request {
            Request::AgentStop { node } => {
                self.stop_agent(&node).await?;
                Ok(format!(
                    "the agent of {node} stopped (its rules stay in place)"
                ))
            }
            Request::AgentStart { node } => {
                self.start_agent(&node).await?;
                Ok(format!("the agent of {node} is ready"))
            }
            Request::Apply { file } => {
                let parsed = self.loader.parse(&file)?;
                for pod in &parsed.loaded.pods {
                    if self.state.node(&pod.node).is_none() {
                        bail!(
                            "{}/{} is on node {:?}, which the sandbox does not have (nodes: {})",
                            pod.namespace,
                            pod.name,
                            pod.node,
                            self.loader_nodes()
                        );
                    }
                }
                // Everything is checked before anything is applied.
                for (i, pod) in parsed.loaded.pods.iter().enumerate() {
                    self.check_ip(pod)?;
                    if let Some(twin) = parsed.loaded.pods[..i]
                        .iter()
                        .find(|p| p.ip == pod.ip && p.running && pod.running)
                    {
                        bail!(
                            "{}/{} and {}/{} both claim IP {}",
                            twin.namespace,
                            twin.name,
                            pod.namespace,
                            pod.name,
                            pod.ip
                        );
                    }
                }
                let mut lines = Vec::new();
                // As on a real node, a pod's network exists before the API server shows its
                // IP (the CNI's ADD, then the kubelet's status update): an agent never hears
                // of an IP before its interface is there.
                for pod in &parsed.loaded.pods {
                    if !self.rewire(pod)? {
                        self.unwire(&pod.namespace, &pod.name)?;
                        self.wire(pod)?;
                    }
                    lines.push(format!(
                        "pod {}/{} on {} at {}",
                        pod.namespace, pod.name, pod.node, pod.ip
                    ));
                }
                // Everything else first, as `kubectl apply` creates objects in file order
                // and people put a pod's ServiceAccount before it; then the pods, once the
                // webhook knows the roles this file gives.
                let (pods, others): (Vec<Value>, Vec<Value>) =
                    parsed.docs.into_iter().partition(|d| d["kind"] == "Pod");
                let given = accounts_given_roles(&others);
                for doc in others {
                    self.kube.apply(doc);
                }
                lines.extend(self.wait_for_webhook(&given).await);
                for doc in pods {
                    let (doc, note) = self.admit(doc).await;
                    lines.extend(note);
                    self.kube.apply(doc.clone());
                    self.project_tokens(&doc)?;
                }
                for ns in &parsed.loaded.namespaces {
                    lines.push(format!("namespace {ns}"));
                }
                self.state.save()?;
                Ok(lines.join("\n"))
            }
            Request::Delete { pod, keep_network } => {
                let Some((namespace, name)) = pod.split_once('/') else {
                    bail!("{pod:?}: give NAMESPACE/NAME");
                };
                if !self.kube.delete_pod(namespace, name) {
                    bail!("no pod {pod} in the sandbox");
                }
                if keep_network {
                    return Ok(format!(
                        "pod {pod} deleted from the API server; its network stays"
                    ));
                }
                self.unwire(namespace, name)?;
                Ok(format!("pod {pod} deleted"))
            }
            Request::Server { up: false } => {
                let Some(server) = self.server.take() else {
                    bail!("podiam-server is not running");
                };
                tokio::task::spawn_blocking(move || server.terminate(Duration::from_secs(15)))
                    .await??;
                self.state.server_pid = None;
                self.state.save()?;
                Ok("podiam-server stopped: agents serve the credentials they hold (15 min left at least) and nothing else".into())
            }
            Request::Server { up: true } => {
                if self.server.is_some() {
                    bail!("podiam-server is already running");
                }
                self.start_server().await?;
                Ok("podiam-server is ready".into())
            }
            Request::Api { up: false } => {
                self.kube
                    .refuse_reads(Some(::http::StatusCode::SERVICE_UNAVAILABLE));
                self.kube.drop_watches();
                Ok("the API server refuses every read and its watches are cut (podiam-server stops answering after --watch-stale-after, 5s here)".into())
            }
            Request::Api { up: true } => {
                self.kube.refuse_reads(None);
                Ok("the API server answers again".into())
            }
            Request::Sts { mode } => {
                let Some(proxy) = &self.sts_proxy else {
                    bail!("the STS proxy is not running");
                };
                let (set, said) = match mode.as_str() {
                    "forward" => (Mode::Forward, "podiam-server's STS calls reach moto again"),
                    "throttle" => (
                        Mode::Fail(400, "Throttling"),
                        "every STS call of podiam-server is throttled (400 Throttling)",
                    ),
                    "error" => (
                        Mode::Fail(500, "InternalFailure"),
                        "every STS call of podiam-server fails (500 InternalFailure)",
                    ),
                    "down" => (
                        Mode::Down,
                        "podiam-server's STS closes every connection unanswered",
                    ),
                    other => bail!("STS mode {other:?}: forward, throttle, error or down"),
                };
                proxy.set_mode(set);
                Ok(said.into())
            }
            Request::Watches { expire } => {
                if expire {
                    self.kube.compact();
                }
                self.kube.drop_watches();
                Ok(if expire {
                    "every watch was cut and the history compacted: resuming gets 410 Gone".into()
                } else {
                    "every watch was cut: watchers resume from their resourceVersion".into()
                })
            }
            Request::Certs => {
                self.pki.rotate()?;
                Ok("new server and agent certificates are in place (same CA); each process reloads them within its --tls-reload-interval (10s)".into())
            }
            Request::Churn { per_second, live } => {
                if per_second == 0 {
                    let made = self.churn.take().map_or(0, |c| c.next);
                    return Ok(format!("churn stopped after {made} pods"));
                }
                self.kube.apply(crate::objects::namespace(
                    "churn",
                    &[(
                        "iam.amazonaws.com/permitted",
                        &format!("arn:aws:iam::{}:role/churn-.*", super::ACCOUNT),
                    )],
                ));
                let mut interval =
                    tokio::time::interval(Duration::from_secs(1) / per_second.min(1000));
                interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let nodes = self.state.nodes.iter().map(|n| n.name.clone()).collect();
                let next = self.churn.take().map_or(0, |c| c.next);
                self.churn = Some(Churn {
                    interval,
                    next,
                    live: std::collections::VecDeque::new(),
                    keep: live as usize,
                    nodes,
                });
                Ok(format!(
                    "churn: {per_second} pods/s created in namespace churn (API only, no network), the oldest deleted beyond {live}"
                ))
            }
            Request::Down => Ok("down".into()),
        }
    }

    fn loader_nodes(&self) -> String {
        self.state
            .nodes
            .iter()
            .map(|n| n.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Binds the control socket (before `up` is told the sandbox is ready).
    pub fn listen(&self) -> anyhow::Result<UnixListener> {
        let socket = self.dir.join("control.sock");
        let _ = std::fs::remove_file(&socket);
        Ok(UnixListener::bind(&socket)?)
    }

    /// Answers requests on `listener` until `down`, SIGTERM or SIGINT.
    pub async fn serve(&mut self, listener: UnixListener) -> anyhow::Result<()> {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        loop {
            let stream = tokio::select! {
                _ = term.recv() => return Ok(()),
                _ = tokio::signal::ctrl_c() => return Ok(()),
                () = churn_tick(&mut self.churn) => {
                    if let Some(churn) = &mut self.churn {
                        churn.step(&self.kube);
                    }
                    continue;
                }
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(_) => continue,
                },
            };
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            if BufReader::new(read).read_line(&mut line).await.is_err() {
                continue;
            }
            let (reply, down) = match serde_json::from_str::<Request>(&line) {
                Ok(request) => {
                    let down = matches!(request, Request::Down);
                    eprintln!("request: {}", line.trim());
                    let result = self.handle(request).await;
                    (
                        match result {
                            Ok(message) => Reply { ok: true, message },
                            Err(error) => Reply {
                                ok: false,
                                message: format!("{error:#}"),
                            },
                        },
                        down,
                    )
                }
                Err(error) => (
                    Reply {
                        ok: false,
                        message: format!("bad request: {error}"),
                    },
                    false,
                ),
            };
            let reply = if down {
                // Answer once everything is gone.
                Reply {
                    ok: true,
                    message: self.teardown().await,
                }
            } else {
                reply
            };
            let mut text = serde_json::to_string(&reply)?;
            text.push('\n');
            let _ = write.write_all(text.as_bytes()).await;
            if down {
                return Ok(());
            }
        }
    }

    /// Stops every process and deletes every namespace the state lists; says what it
    /// removed.
    pub async fn teardown(&mut self) -> String {
        let processes = self.agents.len()
            + usize::from(self.server.is_some())
            + usize::from(self.moto.is_some());
        let agents: Vec<_> = self.agents.drain().map(|(_, a)| a).collect();
        let server = self.server.take();
        let _ = tokio::task::spawn_blocking(move || {
            for agent in agents {
                let _ = agent.terminate(Duration::from_secs(10));
            }
            if let Some(server) = server {
                let _ = server.terminate(Duration::from_secs(10));
            }
        })
        .await;
        self.moto.take();
        self.prometheus.take();
        self.node_imds.clear();
        let mut removed = Vec::new();
        for ns in self.state.netns.iter().rev() {
            match netns::destroy(ns) {
                Ok(true) => removed.push(ns.clone()),
                Ok(false) => {}
                Err(error) => eprintln!("removing netns {ns}: {error:#}"),
            }
        }
        self.state.netns.clear();
        self.state.nodes.clear();
        self.state.pods.clear();
        let _ = self.state.save();
        let _ = std::fs::remove_file(self.dir.join("control.sock"));
        format!(
            "stopped {processes} processes and the in-process stand-ins; removed netns {} (with their veths and rules)",
            removed.join(", ")
        )
    }
}

/// Joins namespace `ns` to `host_ns` with a veth pair: `host_if` in `host_ns`, `eth0`
/// with `address` in `ns`; both ends and `ns`'s loopback up.
fn plug(host_ns: &str, host_if: &str, ns: &str, address: &str) -> anyhow::Result<()> {
    ip(&[
        "-n", host_ns, "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ns,
    ])?;
    ip(&["-n", ns, "addr", "add", address, "dev", "eth0"])?;
    for dev in ["eth0", "lo"] {
        ip(&["-n", ns, "link", "set", dev, "up"])?;
    }
    ip(&["-n", host_ns, "link", "set", host_if, "up"])
}

/// The network namespace of a node. `_` cannot occur in Kubernetes or sandbox names, so
/// one sandbox's names never collide with another's.
pub fn node_netns(sandbox: &str, node: &str) -> String {
    format!("{sandbox}_node_{node}")
}

/// The network namespace of a pod.
pub fn pod_netns(sandbox: &str, namespace: &str, pod: &str) -> String {
    format!("{sandbox}_pod_{namespace}_{pod}")
}

/// Credentials of each node's instance role (`sandbox-node-<node>`), from moto, so that
/// a leak shows in `aws sts get-caller-identity` as the node's role.
fn node_identities(sts: &str, nodes: &[String]) -> anyhow::Result<Vec<NodeIdentity>> {
    const SCRIPT: &str = r#"
import boto3, json, sys
sts = boto3.client("sts", endpoint_url=sys.argv[1], region_name="us-east-1",
                   aws_access_key_id="sandbox", aws_secret_access_key="sandbox")
out = []
for node in sys.argv[2:]:
    c = sts.assume_role(RoleArn="arn:aws:iam::123456789012:role/sandbox-node-" + node,
                        RoleSessionName="i-" + node)["Credentials"]
    out.append({"role": "sandbox-node-" + node, "id": c["AccessKeyId"],
                "secret": c["SecretAccessKey"], "token": c["SessionToken"],
                "expiration": c["Expiration"].strftime("%Y-%m-%dT%H:%M:%SZ")})
print(json.dumps(out))
"#;
    let python = venv().join("bin/python3");
    let mut cmd = Command::new(&python);
    cmd.env_clear()
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .arg("-c")
        .arg(SCRIPT)
        .arg(sts)
        .args(nodes);
    let out = cmd
        .output()
        .with_context(|| format!("running {} (scripts/setup installs it)", python.display()))?;
    if !out.status.success() {
        bail!(
            "getting the nodes' credentials from moto: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)?;
    Ok(list
        .into_iter()
        .map(|v| {
            let field = |k: &str| v[k].as_str().unwrap_or_default().to_string();
            NodeIdentity {
                role: field("role"),
                access_key_id: field("id"),
                secret_access_key: field("secret"),
                token: field("token"),
                expiration: field("expiration"),
            }
        })
        .collect())
}

/// 32 random hex digits from the kernel.
fn random_token() -> anyhow::Result<String> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}
