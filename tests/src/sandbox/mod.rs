//! The sandbox: a podiam cluster on one machine, made of network namespaces. It is a
//! **test double** of a cluster (the stand-in API server, moto as STS, a stand-in for
//! each node's real metadata service), running the real `podiam-server` and one real
//! `podiam-agent` per node with real interception.
//!
//! ```text
//!   <name>_ctl          stand-in API server, moto (STS), podiam-server   100.127.255.1
//!     | vnode<i> (100.100.<i>.1)
//!     | eth0     (100.100.<i>.2, the node's IP)
//!   <name>_node_<node>  podiam-agent --iptables, the node's "real" metadata service
//!     | cali<hash>      (on 169.254.169.254:80, handing out the node's own role)
//!     | eth0     (the pod's IP)
//!   <name>_pod_<ns>_<pod>   routes: the node, 169.254.169.254 and the STS, via the node
//! ```
//!
//! No namespace has a default route and the host's own network is never touched: every
//! address lives inside a namespace the sandbox created. `podiam-sandbox up` starts a
//! supervisor ([`supervisor`]) in the control namespace, which owns every process and
//! writes [`State`]; the other commands read that state or talk to the supervisor over
//! its Unix socket ([`Request`]).

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context;
use serde::{Deserialize, Serialize};

pub mod prometheus;
pub mod supervisor;

/// The control namespace's service address (moto and the server listen on it).
pub const CTL_IP: &str = "100.127.255.1";
/// The server's port.
pub const SERVER_PORT: u16 = 8443;
/// The agents' metadata port.
pub const AGENT_PORT: u16 = 8181;
/// The agents' admin port.
pub const AGENT_ADMIN_PORT: u16 = 9620;
/// The server's admission webhook, in the control namespace.
pub const WEBHOOK_PORT: u16 = 9443;
/// The account of the sandbox's roles.
pub const ACCOUNT: &str = "123456789012";

/// Where a sandbox keeps its state: `/run/podiam-sandbox/<name>`.
pub fn dir(name: &str) -> PathBuf {
    PathBuf::from("/run/podiam-sandbox").join(name)
}

/// The value of `flag` among `args` (`--flag VALUE` or `--flag=VALUE`).
pub fn flag_value(args: &[String], flag: &str) -> Option<String> {
    let eq = format!("{flag}=");
    args.iter().enumerate().find_map(|(i, a)| {
        if a == flag {
            args.get(i + 1).cloned()
        } else {
            a.strip_prefix(&eq).map(str::to_string)
        }
    })
}

/// What runs where, written by the supervisor after every change.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct State {
    /// The sandbox's name (prefix of its namespaces).
    pub name: String,
    /// The supervisor's PID.
    pub supervisor: u32,
    /// Every network namespace created, in creation order (what `down` removes).
    pub netns: Vec<String>,
    /// The control namespace.
    pub ctl: String,
    /// More arguments for podiam-server (and explain), from `up --server-arg`.
    #[serde(default)]
    pub server_args: Vec<String>,
    /// The STS endpoint pods use (moto).
    pub sts: String,
    /// The server's PID, once started.
    pub server_pid: Option<u32>,
    /// The server's admin address (inside the control namespace).
    pub server_admin: Option<String>,
    /// Prometheus's address (inside the control namespace), scraping server and agents.
    #[serde(default)]
    pub prometheus: Option<String>,
    /// The nodes.
    pub nodes: Vec<NodeState>,
    /// The pods.
    pub pods: Vec<PodState>,
}

/// One node.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeState {
    /// `spec.nodeName`.
    pub name: String,
    /// Its namespace.
    pub netns: String,
    /// Its IP (the agent listens on it).
    pub ip: String,
    /// The role its real metadata service hands out (what must never reach a pod).
    pub role: String,
    /// The agent's PID while it runs.
    pub agent_pid: Option<u32>,
}

/// One pod.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PodState {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Node.
    pub node: String,
    /// IP.
    pub ip: String,
    /// Its role annotation.
    pub role: Option<String>,
    /// The network namespace commands run in (the node's for hostNetwork pods; none for
    /// finished pods).
    pub netns: Option<String>,
    /// The environment of its first container, as admitted (what the webhook injected).
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Its projected ServiceAccount tokens: (directory on the host, directory in the
    /// container), bind-mounted for its commands as a kubelet mounts them.
    #[serde(default)]
    pub mounts: Vec<(String, String)>,
    /// Its ServiceAccount, when the webhook gave it the container-credentials path.
    #[serde(default)]
    pub pod_identity: Option<String>,
}

/// A request to the supervisor.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "kebab-case")]
pub enum Request {
    /// Stop a node's agent (SIGTERM; its rules stay).
    AgentStop {
        /// The node.
        node: String,
    },
    /// Start a node's agent and wait until it is ready.
    AgentStart {
        /// The node.
        node: String,
    },
    /// Apply a manifest file (new pods are wired to their nodes).
    Apply {
        /// The file (absolute).
        file: PathBuf,
    },
    /// Delete a pod from the cluster and its namespace.
    Delete {
        /// `NAMESPACE/NAME`.
        pod: String,
        /// Only the API object (a force deletion: the node's kubelet has not stopped the
        /// pod yet, so its network and processes stay).
        #[serde(default)]
        keep_network: bool,
    },
    /// Stop podiam-server (SIGTERM; `up: false`) or start it again on the same ports.
    Server {
        /// Whether it runs.
        up: bool,
    },
    /// Make the stand-in API server refuse every read and cut its watches (`up: false`,
    /// as when it is unreachable), or answer again.
    Api {
        /// Whether it answers.
        up: bool,
    },
    /// What podiam-server's STS (a fault-injecting proxy in front of moto) does: forward,
    /// throttle, error or down.
    Sts {
        /// `forward`, `throttle` (400 Throttling), `error` (500 InternalFailure) or
        /// `down` (connections closed unanswered).
        mode: String,
    },
    /// Cut every watch of the stand-in API server; with `expire`, its history is
    /// compacted first, so that resuming gets 410 Gone and the watchers list again.
    Watches {
        /// Whether resuming gets 410 Gone.
        expire: bool,
    },
    /// Issue new server and agent certificates (same CA) over the files they run with;
    /// each reloads them within its --tls-reload-interval.
    Certs,
    /// Pod churn in the API server only (no network: the pods' addresses are never
    /// wired): `per_second` pods of namespace `churn` created each second, the oldest
    /// deleted once `live` exist; `per_second: 0` stops it.
    Churn {
        /// Pods created (and, once `live` exist, deleted) per second.
        per_second: u32,
        /// Churn pods kept at once.
        live: u32,
    },
    /// Tear everything down and exit.
    Down,
}

/// The supervisor's answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Reply {
    /// Whether it worked.
    pub ok: bool,
    /// What happened, or why not.
    pub message: String,
}

impl State {
    /// Reads the state of sandbox `name`.
    pub fn load(name: &str) -> anyhow::Result<Self> {
        let path = dir(name).join("state.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("no sandbox {name:?} is up ({} missing)", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("reading {}", path.display()))
    }

    /// Writes it (atomically).
    pub fn save(&self) -> anyhow::Result<()> {
        let dir = dir(&self.name);
        let tmp = dir.join("state.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, dir.join("state.json"))?;
        Ok(())
    }

    /// The pod `NAMESPACE/NAME`.
    pub fn pod(&self, id: &str) -> anyhow::Result<&PodState> {
        self.pods
            .iter()
            .find(|p| format!("{}/{}", p.namespace, p.name) == id)
            .with_context(|| {
                let known: Vec<_> = self
                    .pods
                    .iter()
                    .map(|p| format!("{}/{}", p.namespace, p.name))
                    .collect();
                format!("no pod {id} in the sandbox (pods: {})", known.join(", "))
            })
    }

    /// The node named `name`.
    pub fn node(&self, name: &str) -> Option<&NodeState> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// Whether the supervisor is alive: this sandbox's `podiam-sandbox supervise`, not a
    /// process that reused its PID.
    pub fn supervisor_alive(&self) -> bool {
        alive(self.supervisor)
            && std::fs::read(format!("/proc/{}/cmdline", self.supervisor)).is_ok_and(|cmd| {
                let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
                args.contains(&b"supervise".as_slice()) && args.contains(&self.name.as_bytes())
            })
    }
}

/// Whether a process with this PID exists.
pub fn alive(pid: u32) -> bool {
    i32::try_from(pid)
        .is_ok_and(|pid| nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok())
}

/// Sends `request` to sandbox `name`'s supervisor and waits for its answer.
pub fn request(name: &str, request: &Request, timeout: Duration) -> anyhow::Result<Reply> {
    let socket = dir(name).join("control.sock");
    let mut stream = UnixStream::connect(&socket)
        .with_context(|| format!("connecting to the supervisor at {}", socket.display()))?;
    stream.set_read_timeout(Some(timeout))?;
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .context("waiting for the supervisor's answer")?;
    serde_json::from_str(&answer).with_context(|| format!("the supervisor answered {answer:?}"))
}

/// The environment a pod's commands get: nothing of the host's, no AWS configuration or
/// credentials files, the sandbox's STS and region, and the project's venv (boto3, aws).
pub fn pod_env(state: &State, venv: &Path) -> Vec<(String, String)> {
    let home = dir(&state.name).join("home");
    [
        (
            "PATH",
            format!(
                "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                venv.join("bin").display()
            ),
        ),
        ("HOME", home.display().to_string()),
        ("AWS_CONFIG_FILE", "/dev/null".into()),
        ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null".into()),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_DEFAULT_REGION", "us-east-1".into()),
        ("AWS_ENDPOINT_URL_STS", state.sts.clone()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// The node-side interface name of a pod's veth: `cali` and 11 hex digits of a hash of
/// `namespace/name`, as Calico names them (so the default `--host-interface cali+` fits).
pub fn veth_name(namespace: &str, name: &str) -> String {
    // FNV-1a, 64 bit: stable across runs and builds.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in namespace.bytes().chain([b'/']).chain(name.bytes()) {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x100_0000_01b3);
    }
    format!("cali{:011x}", hash & 0xfff_ffff_ffff)
}
