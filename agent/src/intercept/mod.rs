//! Interception: the DNAT that sends pods' traffic for 169.254.169.254:80 to the agent.
//!
//! Rules live in our own nat chain, jumped to from PREROUTING for each pod-interface
//! pattern (`--host-interface`, kiam/kube2iam syntax), so installing is idempotent and
//! removal exact. They are installed with the same iptables backend (nft or legacy) as the
//! node's existing rules, re-asserted every `--rules-interval` (and whenever they
//! vanished), and left in place on exit: a stopped agent means refused connections, never
//! the node's credentials (`--remove-rules-on-exit` opts out). After installing, existing
//! conntrack entries towards the metadata service are deleted, so connections opened
//! before the redirect stop bypassing it. The listen address is checked with rtnetlink to
//! be one of the node's own.

use std::{net::SocketAddr, process::Output, time::Duration};

use futures::TryStreamExt;
use podiam_common::readiness::Gate;
use rtnetlink::packet_route::{address::AddressAttribute, link::LinkAttribute};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

pub mod rules;

use self::rules::{CHAIN, COMMENT, InterfaceSpec, Rules};

/// Interception flags.
#[derive(Clone, Debug, clap::Args)]
pub struct InterceptArgs {
    /// Redirect pods' 169.254.169.254:80 to --listen with iptables (kube2iam: --iptables).
    /// Needs NET_ADMIN and the host network.
    #[arg(long, env = "PODIAM_IPTABLES")]
    pub iptables: bool,

    /// Pod interfaces whose traffic is redirected: `cali+`, `eni+`, `!eth0`, or a comma
    /// list (kiam and kube2iam syntax).
    #[arg(long, env = "PODIAM_HOST_INTERFACE", default_value = "cali+")]
    pub host_interface: String,

    /// iptables backend: `auto` uses the one holding the node's existing rules.
    #[arg(long, env = "PODIAM_IPTABLES_BACKEND", value_enum, default_value_t = Backend::Auto)]
    pub iptables_backend: Backend,

    /// How often the rules are checked and restored if they changed or vanished.
    #[arg(long, env = "PODIAM_RULES_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub rules_interval: Duration,

    /// Remove the rules when the agent stops. Off by default: without them pods reach the
    /// node's own metadata service (and credentials) while the agent is down.
    #[arg(long, env = "PODIAM_REMOVE_RULES_ON_EXIT")]
    pub remove_rules_on_exit: bool,
}

/// iptables backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// Detect.
    Auto,
    /// iptables-nft.
    Nft,
    /// iptables-legacy.
    Legacy,
}

/// Why interception could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum InterceptError {
    /// Bad `--host-interface`.
    #[error(transparent)]
    Spec(#[from] rules::SpecError),
    /// The listen address cannot be a DNAT target.
    #[error(
        "--listen {0} is not an address of this node (with --iptables it must be, e.g. $HOST_IP:8181)"
    )]
    NotLocal(SocketAddr),
    /// Netlink failed.
    #[error("reading the node's interfaces over netlink: {0}")]
    Netlink(String),
    /// An iptables command failed (e.g. no NET_ADMIN).
    #[error("`{command}` failed: {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Its error output.
        stderr: String,
    },
}

/// Installs and keeps the redirect.
#[derive(Debug)]
pub struct Interceptor {
    rules: Rules,
    iptables: String,
    restore: String,
    interval: Duration,
    remove_on_exit: bool,
}

// === impl Interceptor ===

impl Interceptor {
    /// Validates the flags against the node: interface syntax, the listen address, the
    /// backend, and that iptables can be run (NET_ADMIN). `None` without `--iptables`.
    pub async fn prepare(
        args: &InterceptArgs,
        listen: SocketAddr,
    ) -> Result<Option<Self>, InterceptError> {
        if !args.iptables {
            return Ok(None);
        }
        let interfaces = InterfaceSpec::parse_list(&args.host_interface)?;
        check_node(listen, &interfaces).await?;
        let family = if listen.is_ipv4() {
            "iptables"
        } else {
            "ip6tables"
        };
        let backend = match args.iptables_backend {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
            Backend::Auto => detect(family).await,
        };
        let interceptor = Self {
            rules: Rules {
                target: listen,
                interfaces,
            },
            iptables: format!("{family}-{backend}"),
            restore: format!("{family}-{backend}-restore"),
            interval: args.rules_interval.max(Duration::from_millis(100)),
            remove_on_exit: args.remove_rules_on_exit,
        };
        // Fails clearly without NET_ADMIN (or without the binaries).
        interceptor
            .iptables(&["-t", "nat", "-S", "PREROUTING"])
            .await?;
        tracing::info!(backend = %interceptor.iptables, interfaces = %args.host_interface, target = %listen, "interception configured");
        Ok(Some(interceptor))
    }

    /// Installs whatever is missing or wrong; returns whether anything changed.
    pub async fn install(&self) -> Result<bool, InterceptError> {
        let mut changed = false;
        let listing = self.iptables(&["-t", "nat", "-S", CHAIN]).await;
        let current: Vec<String> = match &listing {
            Ok(out) => String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::to_string)
                .collect(),
            Err(_) => Vec::new(),
        };
        if current != self.rules.chain_listing() {
            self.restore(&self.rules.chain_restore()).await?;
            changed = true;
        }
        let prerouting = self.iptables(&["-t", "nat", "-S", "PREROUTING"]).await?;
        let ours: Vec<String> = String::from_utf8_lossy(&prerouting.stdout)
            .lines()
            .filter(|l| l.contains(COMMENT))
            .filter_map(|l| l.strip_prefix("-A PREROUTING ").map(str::to_string))
            .collect();
        let wanted = self.rules.jumps();
        for (i, jump) in wanted.iter().enumerate() {
            if !ours.contains(jump) {
                let position = (i + 1).to_string();
                let mut args = vec!["-t", "nat", "-I", "PREROUTING", position.as_str()];
                let parts = split_args(jump);
                args.extend(parts.iter().map(String::as_str));
                self.iptables(&args).await?;
                changed = true;
            }
        }
        for stale in ours.iter().filter(|j| !wanted.contains(j)) {
            let mut args = vec!["-t", "nat", "-D", "PREROUTING"];
            let parts = split_args(stale);
            args.extend(parts.iter().map(String::as_str));
            self.iptables(&args).await?;
            changed = true;
        }
        if changed {
            self.flush_conntrack().await;
        }
        Ok(changed)
    }

    /// Keeps the rules until `shutdown`; `ready` is open while they are verified.
    pub async fn run(self, ready: Gate, shutdown: CancellationToken) {
        loop {
            match self.install().await {
                Ok(true) => {
                    tracing::info!("interception rules installed");
                    ready.open();
                }
                Ok(false) => ready.open(),
                Err(error) => {
                    ready.close();
                    tracing::error!(%error, "interception rules could not be installed; retrying");
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(self.interval) => {}
            }
        }
        if self.remove_on_exit {
            self.remove().await;
        } else {
            tracing::info!(
                "leaving the interception rules in place: pods get refused connections, not the node's credentials"
            );
        }
    }

    /// Removes our jumps and chain.
    pub async fn remove(&self) {
        for jump in self.rules.jumps() {
            let mut args = vec!["-t", "nat", "-D", "PREROUTING"];
            let parts = split_args(&jump);
            args.extend(parts.iter().map(String::as_str));
            let _ = self.iptables(&args).await;
        }
        let _ = self.iptables(&["-t", "nat", "-F", CHAIN]).await;
        let _ = self.iptables(&["-t", "nat", "-X", CHAIN]).await;
        tracing::info!("interception rules removed (--remove-rules-on-exit)");
    }

    async fn iptables(&self, args: &[&str]) -> Result<Output, InterceptError> {
        let mut full = vec!["-w", "5"];
        full.extend_from_slice(args);
        run(
            Command::new(&self.iptables).args(&full),
            &self.iptables,
            &full,
        )
        .await
    }

    async fn restore(&self, input: &str) -> Result<(), InterceptError> {
        use tokio::io::AsyncWriteExt;
        let args = ["-w", "5", "--noflush"];
        let shown = format!("{} {}", self.restore, args.join(" "));
        let failed = |stderr: String| InterceptError::Command {
            command: shown.clone(),
            stderr,
        };
        let mut child = Command::new(&self.restore)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| failed(e.to_string()))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(input.as_bytes())
                .await
                .map_err(|e| failed(e.to_string()))?;
        }
        let out = child
            .wait_with_output()
            .await
            .map_err(|e| failed(e.to_string()))?;
        if !out.status.success() {
            return Err(failed(
                String::from_utf8_lossy(&out.stderr).trim().to_string(),
            ));
        }
        Ok(())
    }

    /// Deletes conntrack entries towards the metadata service (none is not an error).
    async fn flush_conntrack(&self) {
        let family = if self.rules.target.is_ipv4() {
            "ipv4"
        } else {
            "ipv6"
        };
        let out = Command::new("conntrack")
            .args([
                "-D",
                "-f",
                family,
                "-p",
                "tcp",
                "--orig-dst",
                self.rules.metadata(),
                "--orig-port-dst",
                "80",
            ])
            .output()
            .await;
        match out {
            Ok(out) => tracing::debug!(
                result = %String::from_utf8_lossy(&out.stderr).trim(),
                "conntrack entries towards the metadata service deleted"
            ),
            Err(error) => {
                tracing::warn!(%error, "conntrack is not available: connections opened before the redirect may bypass it until they close")
            }
        }
    }
}

async fn run(cmd: &mut Command, program: &str, args: &[&str]) -> Result<Output, InterceptError> {
    let shown = format!("{program} {}", args.join(" "));
    let out = cmd.output().await.map_err(|e| InterceptError::Command {
        command: shown.clone(),
        stderr: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(InterceptError::Command {
            command: shown,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out)
}

/// Splits a rule as `iptables -S` prints it into arguments (quotes group words).
fn split_args(rule: &str) -> Vec<String> {
    let mut args = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    for c in rule.chars() {
        match c {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !current.is_empty() {
                    args.push(std::mem::take(&mut current));
                }
            }
            c => current.push(c),
        }
    }
    if !current.is_empty() {
        args.push(current);
    }
    args
}

/// The backend holding more of the node's rules (kube-proxy's and the CNI's); nft on a tie.
async fn detect(family: &str) -> &'static str {
    let count = |backend: &'static str| {
        let save = format!("{family}-{backend}-save");
        async move {
            Command::new(save)
                .output()
                .await
                .map(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .filter(|l| l.starts_with("-A"))
                        .count()
                })
                .unwrap_or(0)
        }
    };
    let (nft, legacy) = tokio::join!(count("nft"), count("legacy"));
    if legacy > nft { "legacy" } else { "nft" }
}

/// The listen address must be the node's own, and named interfaces should exist.
async fn check_node(
    listen: SocketAddr,
    interfaces: &[InterfaceSpec],
) -> Result<(), InterceptError> {
    let netlink = |e: rtnetlink::Error| InterceptError::Netlink(e.to_string());
    let (connection, handle, _) =
        rtnetlink::new_connection().map_err(|e| InterceptError::Netlink(e.to_string()))?;
    let task = tokio::spawn(connection);
    let mut local = false;
    let mut addresses = handle.address().get().execute();
    while let Some(msg) = addresses.try_next().await.map_err(netlink)? {
        local |= msg.attributes.iter().any(|a| {
            matches!(a, AddressAttribute::Address(ip) | AddressAttribute::Local(ip) if *ip == listen.ip())
        });
    }
    let mut names = Vec::new();
    let mut links = handle.link().get().execute();
    while let Some(msg) = links.try_next().await.map_err(netlink)? {
        for a in &msg.attributes {
            if let LinkAttribute::IfName(name) = a {
                names.push(name.clone());
            }
        }
    }
    task.abort();
    if !local {
        return Err(InterceptError::NotLocal(listen));
    }
    for name in interfaces.iter().filter_map(InterfaceSpec::exact) {
        if !names.iter().any(|n| n == name) {
            tracing::warn!(
                interface = name,
                "--host-interface names an interface this node does not have (yet)"
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_rules_as_iptables_prints_them() {
        assert_eq!(
            split_args("-i cali+ -m comment --comment \"podiam: a b\" -j PODIAM"),
            [
                "-i",
                "cali+",
                "-m",
                "comment",
                "--comment",
                "podiam: a b",
                "-j",
                "PODIAM"
            ]
        );
        assert_eq!(split_args("! -i eth0 -j X"), ["!", "-i", "eth0", "-j", "X"]);
    }
}
