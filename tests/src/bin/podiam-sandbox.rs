//! `podiam-sandbox`: a podiam cluster on one machine, as root, in network namespaces,
//! with the real server and agents (real interception) and **test doubles** for the rest
//! (the stand-in API server, moto as STS, each node's real metadata service). See
//! `podiam_tests::sandbox` for the layout.
//!
//! ```text
//! podiam-sandbox up examples/sandbox.yaml     # build it; print each pod's identity
//! podiam-sandbox exec payments/api -- aws sts get-caller-identity
//! podiam-sandbox status
//! podiam-sandbox agent stop|start node-a
//! podiam-sandbox server stop|start
//! podiam-sandbox apply more.yaml | delete payments/api
//! podiam-sandbox down
//! ```

// Benchmarks and the sandbox measure and wait in real time.
#![allow(clippy::disallowed_methods)]

use std::{
    io::{BufRead, BufReader},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use podiam_tests::{
    moto::venv,
    netns,
    sandbox::{
        self, AGENT_ADMIN_PORT, Request, State, alive, dir,
        supervisor::{Bins, Supervisor},
    },
};

/// A podiam cluster on this machine (root; network namespaces; test doubles for the API
/// server, STS and the nodes' metadata services).
#[derive(Debug, Parser)]
#[command(name = "podiam-sandbox")]
struct Cli {
    /// The sandbox's name: prefix of its network namespaces, and its state in
    /// /run/podiam-sandbox/NAME.
    #[arg(long, global = true, env = "PODIAM_SANDBOX", default_value = "podiam")]
    name: String,

    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Build the sandbox from Namespace and Pod manifests, then show what
    /// `aws sts get-caller-identity` returns in each pod.
    Up {
        /// Multi-document YAML of Namespaces and Pods.
        file: PathBuf,
        /// One more podiam-server argument (repeat it), e.g.
        /// `--server-arg=--iam-role-key=example.com/role`; explain gets them too.
        #[arg(long = "server-arg", allow_hyphen_values = true)]
        server_args: Vec<String>,
    },
    /// Remove everything the sandbox created: processes, namespaces (with their veths and
    /// rules), its state directory.
    Down,
    /// What runs where.
    Status,
    /// Run a command as a pod: in its network namespace, with `env -i` and no AWS
    /// configuration but the sandbox's STS endpoint and region.
    Exec {
        /// NAMESPACE/NAME.
        pod: String,
        /// The command.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Stop or start a node's agent (stopping leaves its rules: pods get refused
    /// connections).
    Agent {
        /// What to do.
        action: Action,
        /// The node.
        node: String,
    },
    /// Stop or start podiam-server (the only replica): while it is stopped, agents keep
    /// serving the credentials they hold and new pods get 503.
    Server {
        /// What to do.
        action: Action,
    },
    /// Stop or start the stand-in API server's answers: stopped, it refuses every list
    /// and watch (as when unreachable), and podiam-server stops answering from its stale
    /// index after --watch-stale-after.
    Api {
        /// What to do.
        action: Action,
    },
    /// What podiam-server's STS does (pods' own SDK calls reach moto unchanged):
    /// `forward`, `throttle` (400 Throttling), `error` (500 InternalFailure) or `down`
    /// (connections closed unanswered).
    Sts {
        /// The mode.
        #[arg(value_parser = ["forward", "throttle", "error", "down"])]
        mode: String,
    },
    /// Cut the stand-in API server's watches: `cut` (watchers resume where they were) or
    /// `expire` (history compacted first: resuming gets 410 Gone, watchers list again).
    Watches {
        /// What to do.
        #[arg(value_parser = ["cut", "expire"])]
        action: String,
    },
    /// Pod churn in the API server only (pods of namespace `churn`, never wired): create
    /// PER_SECOND pods a second and delete the oldest beyond --live; 0 stops.
    Churn {
        /// Pods per second (0 stops).
        per_second: u32,
        /// Churn pods alive at once.
        #[arg(long, default_value_t = 200)]
        live: u32,
    },
    /// Issue new server and agent certificates from the sandbox CA over the files in use
    /// (podiam reloads them within --tls-reload-interval).
    Certs,
    /// Add or replace Namespaces and Pods in the running sandbox.
    Apply {
        /// Multi-document YAML.
        file: PathBuf,
    },
    /// Show podiam-server's decision for a pod (`podiam-server explain` against the
    /// sandbox's API server, with the sandbox server's flags); arguments after `--` go to
    /// explain (e.g. `-- -o json`).
    Explain {
        /// NAMESPACE/NAME.
        pod: String,
        /// More explain arguments.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Delete a pod (and its network namespace).
    Delete {
        /// NAMESPACE/NAME.
        pod: String,
        /// Delete only the API object, as a force deletion does while the node still runs
        /// the pod: its network and processes stay.
        #[arg(long)]
        keep_network: bool,
    },
    /// (internal) The supervisor `up` starts in the control namespace.
    #[command(hide = true)]
    Supervise {
        /// The manifests.
        file: PathBuf,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Action {
    Stop,
    Start,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = check_name(&cli.name).and_then(|()| match cli.command {
        Cmd::Up { file, server_args } => up(&cli.name, &file, server_args),
        Cmd::Down => down(&cli.name),
        Cmd::Status => status(&cli.name),
        Cmd::Exec { pod, command } => exec(&cli.name, &pod, &command),
        Cmd::Agent { action, node } => control(
            &cli.name,
            &match action {
                Action::Stop => Request::AgentStop { node },
                Action::Start => Request::AgentStart { node },
            },
        ),
        Cmd::Server { action } => control(
            &cli.name,
            &Request::Server {
                up: matches!(action, Action::Start),
            },
        ),
        Cmd::Api { action } => control(
            &cli.name,
            &Request::Api {
                up: matches!(action, Action::Start),
            },
        ),
        Cmd::Sts { mode } => control(&cli.name, &Request::Sts { mode }),
        Cmd::Watches { action } => control(
            &cli.name,
            &Request::Watches {
                expire: action == "expire",
            },
        ),
        Cmd::Certs => control(&cli.name, &Request::Certs),
        Cmd::Churn { per_second, live } => control(&cli.name, &Request::Churn { per_second, live }),
        Cmd::Apply { file } => control(
            &cli.name,
            &Request::Apply {
                file: std::path::absolute(&file)?,
            },
        ),
        Cmd::Delete { pod, keep_network } => {
            control(&cli.name, &Request::Delete { pod, keep_network })
        }
        Cmd::Explain { pod, args } => explain(&cli.name, &pod, &args),
        Cmd::Supervise { file } => supervise(&cli.name, &file),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // `status | head`: the reader went away; nothing to say.
        Err(error) if is_broken_pipe(&error) => ExitCode::SUCCESS,
        Err(error) if error.downcast_ref::<ExplainExit>().is_some() => {
            ExitCode::from(error.downcast_ref::<ExplainExit>().map_or(2, |e| e.0))
        }
        Err(error) => {
            eprintln!("podiam-sandbox: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// `explain`'s own exit status (0 allowed, 1 denied, 2 undecided), passed on.
#[derive(Debug, thiserror::Error)]
#[error("explain exited with {0}")]
struct ExplainExit(u8);

fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Writes a line to stdout; a closed pipe is an error the caller passes up, not a panic.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)
    }};
}

/// How to run this command again for the same sandbox, for the hints it prints.
fn me(name: &str) -> String {
    let cmd = std::env::var("PODIAM_SANDBOX_CMD").unwrap_or_else(|_| "podiam-sandbox".into());
    if name == "podiam" {
        cmd
    } else {
        format!("{cmd} --name {name}")
    }
}

fn check_name(name: &str) -> anyhow::Result<()> {
    if name.is_empty()
        || name.len() > 20
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        bail!("--name {name:?}: use 1 to 20 of a-z, 0-9 and -");
    }
    Ok(())
}

fn require_root() -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the sandbox needs root (network namespaces, iptables): run it with sudo");
    }
    for tool in ["ip", "iptables-nft", "conntrack"] {
        if netns::run("sh", &["-c", &format!("command -v {tool}")]).is_err() {
            bail!("{tool} is missing: run scripts/setup as root");
        }
    }
    Ok(())
}

fn bins() -> anyhow::Result<Bins> {
    let me = std::env::current_exe()?;
    let bins = Bins {
        server: me.with_file_name("podiam-server"),
        agent: me.with_file_name("podiam-agent"),
    };
    for bin in [&bins.server, &bins.agent] {
        if !bin.exists() {
            bail!(
                "{} is missing: build it (`cargo build --workspace --bins`)",
                bin.display()
            );
        }
    }
    Ok(bins)
}

fn up(name: &str, file: &Path, server_args: Vec<String>) -> anyhow::Result<()> {
    require_root()?;
    let started = Instant::now();
    bins()?;
    let file = std::path::absolute(file)?;
    if !file.exists() {
        bail!("{} does not exist", file.display());
    }
    if let Ok(state) = State::load(name) {
        if state.supervisor_alive() {
            bail!(
                "sandbox {name:?} is already up (podiam-sandbox --name {name} down, or pick another --name)"
            );
        }
        eprintln!("removing what a previous sandbox {name:?} left behind");
        cleanup(&state)?;
    }
    let dir = dir(name);
    std::fs::create_dir_all(dir.join("logs"))?;
    let ctl = format!("{name}_ctl");
    let mut state = State {
        name: name.into(),
        ctl: ctl.clone(),
        server_args,
        ..State::default()
    };
    state.save()?;
    // Recorded only once created: `down` never deletes a namespace it did not make.
    if let Err(error) = netns::ip(&["netns", "add", &ctl]) {
        cleanup(&state)?;
        return Err(error);
    }
    state.netns.push(ctl);
    state.save()?;
    match start_supervisor(name, &file, &dir, started) {
        Ok(()) => Ok(()),
        Err(error) => {
            if let Ok(state) = State::load(name) {
                cleanup(&state)?;
            }
            Err(error)
        }
    }
}

/// Starts the supervisor, waits for it, and shows every pod's identity.
fn start_supervisor(name: &str, file: &Path, dir: &Path, started: Instant) -> anyhow::Result<()> {
    let log = std::fs::File::create(dir.join("logs/supervisor.log"))?;
    let mut child = Command::new(std::env::current_exe()?)
        .args(["--name", name, "supervise"])
        .arg(file)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        // Its own process group: Ctrl-C in this terminal does not reach it.
        .process_group(0)
        .spawn()
        .context("starting the supervisor")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut ready = false;
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        if let Some(what) = line.strip_prefix("step ") {
            println!("  {what}");
        } else if line == "ready" {
            ready = true;
            break;
        }
    }
    if !ready {
        let _ = child.wait();
        let log = std::fs::read_to_string(dir.join("logs/supervisor.log")).unwrap_or_default();
        eprintln!("{log}");
        bail!("the sandbox did not come up (the supervisor's log is above)");
    }
    let took = started.elapsed();
    let state = State::load(name)?;
    println!(
        "sandbox {name:?} is up in {:.1} s: {} nodes, {} pods; logs in {}",
        took.as_secs_f64(),
        state.nodes.len(),
        state.pods.len(),
        dir.join("logs").display()
    );
    if let Some(addr) = &state.prometheus {
        println!(
            "Prometheus: http://{addr} inside netns {} (the shipped alert rules loaded), e.g.\n  ip netns exec {} curl -s 'http://{addr}/api/v1/query?query=up'",
            state.ctl, state.ctl
        );
    }
    let checking = Instant::now();
    println!("\nWhat `aws sts get-caller-identity` returns inside each pod:");
    let answers: Vec<_> = state
        .pods
        .iter()
        .filter(|p| p.netns.is_some())
        .map(|pod| {
            let id = format!("{}/{}", pod.namespace, pod.name);
            let state = state.clone();
            let handle = std::thread::spawn(move || caller_identity(&state, &id));
            (pod.clone(), handle)
        })
        .collect();
    for (pod, handle) in answers {
        let answer = handle
            .join()
            .unwrap_or_else(|_| "(the check failed)".into());
        println!(
            "  {:<24} {:<8} {:<15} role {:<24} -> {answer}",
            format!("{}/{}", pod.namespace, pod.name),
            pod.node,
            pod.ip,
            match &pod.pod_identity {
                Some(account) => format!("of sa/{account}"),
                None => pod.role.clone().unwrap_or_else(|| "(none)".into()),
            },
        );
    }
    println!(
        "(checked in {:.1} s)\n\nTry: {me} exec {pod} -- aws sts get-caller-identity\n     {me} explain {pod}\n     {me} status | agent stop NODE | server stop | api stop | down",
        checking.elapsed().as_secs_f64(),
        me = me(name),
        pod = state
            .pods
            .first()
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .unwrap_or_default()
    );
    Ok(())
}

/// The ARN a pod's `aws sts get-caller-identity` prints, or the reason it has none.
fn caller_identity(state: &State, pod: &str) -> String {
    let out = pod_command(
        state,
        pod,
        &[
            "aws",
            "sts",
            "get-caller-identity",
            "--query",
            "Arn",
            "--output",
            "text",
        ],
    )
    .and_then(|mut cmd| cmd.output().map_err(Into::into));
    match out {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).trim().to_string(),
        Ok(out) => {
            let err = String::from_utf8_lossy(&out.stderr);
            let last = err.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("");
            format!("no credentials ({})", last.trim())
        }
        Err(error) => format!("(could not run: {error:#})"),
    }
}

/// `ip netns exec <pod's netns> [unshare -m ... mount --bind TOKEN DIR] env -i ... COMMAND`:
/// the pod's network, its projected tokens where its container has them (bind mounts in a
/// mount namespace of the command's own, as a kubelet mounts them), and its environment
/// as admitted (what the webhook injected).
fn pod_command(state: &State, pod: &str, command: &[&str]) -> anyhow::Result<Command> {
    let record = state.pod(pod)?;
    let Some(ns) = &record.netns else {
        bail!("{pod} is not running (no network namespace)");
    };
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]);
    if !record.mounts.is_empty() {
        cmd.args([
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-ec",
        ]);
        cmd.arg(
            "while [ \"$1\" != -- ]; do mkdir -p \"$2\"; mount --bind \"$1\" \"$2\"; shift 2; done; shift; exec \"$@\"",
        );
        cmd.arg("sh");
        for (host, container) in &record.mounts {
            cmd.args([host, container]);
        }
        cmd.arg("--");
    }
    cmd.args(["env", "-i"]);
    for (k, v) in sandbox::pod_env(state, &venv())
        .into_iter()
        .chain(record.env.clone())
    {
        cmd.arg(format!("{k}={v}"));
    }
    cmd.args(command);
    Ok(cmd)
}

fn exec(name: &str, pod: &str, command: &[String]) -> anyhow::Result<()> {
    require_root()?;
    let state = State::load(name)?;
    let args: Vec<&str> = command.iter().map(String::as_str).collect();
    let error = pod_command(&state, pod, &args)?.exec();
    Err(error).context("running ip netns exec")
}

fn control(name: &str, request: &Request) -> anyhow::Result<()> {
    require_root()?;
    let reply = sandbox::request(name, request, Duration::from_secs(60))?;
    if !reply.ok {
        bail!("{}", reply.message);
    }
    println!("{}", reply.message);
    Ok(())
}

fn down(name: &str) -> anyhow::Result<()> {
    require_root()?;
    let state = State::load(name)?;
    if state.supervisor_alive() {
        match sandbox::request(name, &Request::Down, Duration::from_secs(60)) {
            Ok(reply) => println!("{}", reply.message),
            Err(error) => eprintln!("the supervisor did not answer ({error:#}); cleaning up"),
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while state.supervisor_alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    cleanup(&state)?;
    println!("sandbox {name:?} is down");
    Ok(())
}

/// Kills the supervisor if it is still there, deletes every namespace the state lists
/// (with every process inside), and removes the state directory.
fn cleanup(state: &State) -> anyhow::Result<()> {
    if state.supervisor_alive() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(state.supervisor)?),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    // The latest state, if the supervisor got further than the copy we hold.
    let latest = State::load(&state.name).unwrap_or_else(|_| state.clone());
    let mut names = latest.netns.clone();
    for ns in &state.netns {
        if !names.contains(ns) {
            names.push(ns.clone());
        }
    }
    for ns in names.iter().rev() {
        if netns::destroy(ns)? {
            eprintln!("  removed netns {ns}");
        }
    }
    let dir = dir(&state.name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    Ok(())
}

fn status(name: &str) -> anyhow::Result<()> {
    require_root()?;
    let state = State::load(name)?;
    let up = |pid: Option<u32>| match pid {
        Some(pid) if alive(pid) => format!("pid {pid}"),
        Some(pid) => format!("pid {pid} (gone)"),
        None => "stopped".into(),
    };
    let ready = |ns: &str, addr: Option<std::net::SocketAddr>| match addr {
        Some(addr) => match netns::get(ns, addr, "/readyz") {
            Ok((200, _)) => "ready".to_string(),
            Ok((code, body)) => format!("not ready ({code}: {})", body.trim()),
            Err(error) => format!("not answering ({error:#})"),
        },
        None => "-".into(),
    };
    say!(
        "sandbox {name:?}: supervisor {}",
        up(Some(state.supervisor))
    )?;
    say!("  control netns {}: STS (moto) {}", state.ctl, state.sts)?;
    let server_admin = state.server_admin.as_deref().and_then(|a| a.parse().ok());
    say!(
        "  podiam-server {}, {}",
        up(state.server_pid),
        ready(&state.ctl, server_admin)
    )?;
    match state.prometheus.as_deref().and_then(|a| a.parse().ok()) {
        Some(addr) => {
            let targets = match sandbox::prometheus::targets_up(&state.ctl, addr) {
                Ok((up, total)) if up == total => format!("all {total} targets up"),
                Ok((up, total)) => format!("{up} of {total} targets up (NOT all)"),
                Err(error) => format!("not answering ({error:#})"),
            };
            say!(
                "  prometheus http://{addr} (in netns {}): {targets}",
                state.ctl
            )?;
        }
        None => say!("  prometheus not running")?,
    }
    for node in &state.nodes {
        let admin = node
            .agent_pid
            .and_then(|_| format!("{}:{AGENT_ADMIN_PORT}", node.ip).parse().ok());
        say!(
            "  node {} (netns {}, {}): podiam-agent {}, {}; node role {}",
            node.name,
            node.netns,
            node.ip,
            up(node.agent_pid),
            ready(&state.ctl, admin),
            node.role
        )?;
    }
    for pod in &state.pods {
        say!(
            "  pod {}/{} on {} at {}, role {}, netns {}",
            pod.namespace,
            pod.name,
            pod.node,
            pod.ip,
            pod.role.as_deref().unwrap_or("(none)"),
            pod.netns.as_deref().unwrap_or("(not running)")
        )?;
    }
    Ok(())
}

fn explain(name: &str, pod: &str, args: &[String]) -> anyhow::Result<()> {
    require_root()?;
    let state = State::load(name)?;
    let Some((namespace, pod_name)) = pod.split_once('/') else {
        bail!("{pod:?}: give NAMESPACE/NAME");
    };
    let kubeconfig = dir(name).join("kubeconfig");
    // A pod on the container-credentials path is explained by its ServiceAccount.
    let target = match state.pod(pod).ok().and_then(|p| p.pod_identity.clone()) {
        Some(account) => ["--service-account".to_string(), account],
        None => ["--pod".to_string(), pod_name.to_string()],
    };
    // The stand-in API server listens inside the control namespace.
    let status = std::process::Command::new("ip")
        .args(["netns", "exec", &state.ctl])
        .arg(bins()?.server)
        .arg("explain")
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args([
            "--base-role-arn",
            &format!("arn:aws:iam::{}:role/", sandbox::ACCOUNT),
        ])
        .args(["--namespace", namespace])
        .args(&target)
        .args(["--log-level", "warn"])
        .args(&state.server_args)
        .args(args)
        .status()
        .context("running podiam-server explain")?;
    match status.code() {
        Some(0) => Ok(()),
        Some(code) => Err(ExplainExit(u8::try_from(code).unwrap_or(2)).into()),
        None => bail!("podiam-server explain was killed"),
    }
}

fn supervise(name: &str, file: &Path) -> anyhow::Result<()> {
    // Into the control namespace before any thread exists: every thread and child
    // process (API server, moto, server) is born there.
    let state = State::load(name)?;
    netns::enter(&state.ctl)?;
    let bins = bins()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let (mut supervisor, built) = Supervisor::start(name, file, bins).await?;
        let listener = match built.and_then(|()| supervisor.listen()) {
            Ok(listener) => listener,
            Err(error) => {
                supervisor.teardown().await;
                return Err(error);
            }
        };
        {
            use std::io::Write;
            let _ = writeln!(std::io::stdout(), "ready");
        }
        supervisor.serve(listener).await?;
        supervisor.teardown().await;
        Ok(())
    })
}
