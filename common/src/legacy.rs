//! kiam's and kube2iam's flags that podiam does not accept under their own name: what
//! to use instead, or why there is nothing to use. Without this, clap would suggest the
//! nearest podiam flag by spelling (`--session` → `--session-tags`), which misleads
//! someone migrating.

/// (flag, what to do instead) for flags of kiam or kube2iam that no podiam binary has.
const LEGACY: &[(&str, &str)] = &[
    // Renamed.
    ("bind", "use --listen (the agent API's address)"),
    ("port", "use --listen HOST:PORT (default $HOST_IP:8181)"),
    (
        "host",
        "use --listen HOST:PORT, or the HOST_IP variable (its default)",
    ),
    (
        "host-ip",
        "use --listen HOST:PORT, or the HOST_IP variable (its default)",
    ),
    ("app-port", "use --listen HOST:PORT (default $HOST_IP:8181)"),
    (
        "metrics-port",
        "use --admin-addr (metrics, /healthz and /readyz; default 0.0.0.0:9620)",
    ),
    (
        "prometheus-listen-addr",
        "use --admin-addr (default 0.0.0.0:9620)",
    ),
    ("fetchers", "use --prefetch-concurrency (podiam-server)"),
    (
        "server-address-refresh",
        "use --server-resolve-interval (podiam-agent)",
    ),
    ("json-log", "use --log-format json"),
    ("level", "use --log-level"),
    ("verbose", "use --log-level debug"),
    (
        "api-server",
        "use --kubeconfig (and --kube-context) (podiam-server)",
    ),
    (
        "api-token",
        "use --kubeconfig (and --kube-context) (podiam-server)",
    ),
    (
        "auto-discover-base-arn",
        "use --base-role-arn-autodetect (podiam-server)",
    ),
    (
        "iam-role-session-ttl",
        "use --session-duration (podiam-server; 30m to 12h)",
    ),
    (
        "iptables-remove",
        "podiam leaves its rules in place by default (fail closed); --remove-rules-on-exit opts out",
    ),
    (
        "no-iptables-remove",
        "podiam leaves its rules in place by default (fail closed); nothing to pass",
    ),
    (
        "backoff-max-interval",
        "use --ip-lookup-wait (podiam-server; how long a request waits for a new pod)",
    ),
    (
        "backoff-max-elapsed-time",
        "use --ip-lookup-wait (podiam-server; how long a request waits for a new pod)",
    ),
    // No equivalent.
    (
        "session",
        "podiam names each pod's session NAMESPACE.POD; --session-scope role gives one session per role (podiam-ROLE)",
    ),
    (
        "disable-strict-namespace-regexp",
        "podiam always matches iam.amazonaws.com/permitted anchored on the full role ARN (kiam v4's strict mode)",
    ),
    ("role-alias", "there is no equivalent"),
    (
        "allow-ip-query",
        "podiam identifies a caller only by its connection's source address",
    ),
    ("pprof-listen-addr", "there is no equivalent"),
    (
        "statsd",
        "podiam exports Prometheus metrics on --admin-addr",
    ),
    (
        "statsd-prefix",
        "podiam exports Prometheus metrics on --admin-addr",
    ),
    (
        "statsd-interval",
        "podiam exports Prometheus metrics on --admin-addr",
    ),
    (
        "insecure",
        "give a kubeconfig (--kubeconfig) that says how to trust the API server",
    ),
    (
        "auto-discover-default-role",
        "it would give pods without a role the node's own role, which podiam never does; use --default-role with a role of its own",
    ),
    (
        "debug",
        "use `podiam-server explain --namespace NS --pod NAME` (or --ip IP)",
    ),
    (
        "namespace-restriction-format",
        "iam.amazonaws.com/allowed-roles is always a glob list; regular expressions go into iam.amazonaws.com/permitted",
    ),
    (
        "namespace-restrictions",
        "namespace restrictions are always on",
    ),
    (
        "iam-enable-pod-identity-tags",
        "the nearest is --session-tags (podiam-server)",
    ),
    (
        "eks-cluster-arn",
        "the nearest is --session-tags (podiam-server)",
    ),
    (
        "eks-cluster-name",
        "the nearest is --session-tags (podiam-server)",
    ),
    (
        "sync",
        "not needed: podiam's index follows the API server's watch",
    ),
    (
        "cache-resync-period",
        "not needed: podiam's index follows the API server's watch",
    ),
    (
        "cache-sync-attempts",
        "not needed: podiam's index follows the API server's watch",
    ),
    (
        "resolve-duplicate-cache-ips",
        "not needed: an IP that two live pods claim is refused until one is gone",
    ),
    (
        "node",
        "not needed: the server learns each agent's node from its ServiceAccount token",
    ),
    (
        "use-regional-sts-endpoint",
        "not needed: podiam-server uses the regional endpoint of --region",
    ),
    ("healthcheck-interval", "not needed"),
    ("gateway-timeout-creation", "not needed"),
    ("prometheus-sync-interval", "not needed"),
    (
        "grpc-keepalive-time-duration",
        "not needed: agents reach servers over HTTP/2 with keepalives",
    ),
    (
        "grpc-keepalive-timeout-duration",
        "not needed: agents reach servers over HTTP/2 with keepalives",
    ),
    (
        "grpc-keepalive-permit-without-stream",
        "not needed: agents reach servers over HTTP/2 with keepalives",
    ),
    ("grpc-max-connection-idle-duration", "not needed"),
    ("grpc-max-connection-age-duration", "not needed"),
    ("grpc-max-connection-age-grace-duration", "not needed"),
];

/// The first argument that is a kiam or kube2iam flag `command` does not have, with what
/// to do instead: `"kiam and kube2iam's --session: podiam names ..."`.
pub fn unsupported(
    command: &clap::Command,
    args: impl IntoIterator<Item = String>,
) -> Option<String> {
    let has = |cmd: &clap::Command, name: &str| {
        cmd.get_arguments().any(|a| {
            a.get_long() == Some(name) || a.get_all_aliases().is_some_and(|all| all.contains(&name))
        })
    };
    let known =
        |name: &str| has(command, name) || command.get_subcommands().any(|sub| has(sub, name));
    args.into_iter()
        .skip(1)
        // Nothing after `--` is a flag.
        .take_while(|a| a != "--")
        .filter_map(|a| {
            let name = a.strip_prefix("--")?;
            let name = name.split_once('=').map_or(name, |(n, _)| n).to_string();
            Some(name)
        })
        .find_map(|name| {
            if known(&name) {
                return None;
            }
            LEGACY
                .iter()
                .find(|(flag, _)| *flag == name)
                .map(|(flag, what)| {
                    format!("--{flag} is a kiam or kube2iam flag that podiam does not have: {what}")
                })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command() -> clap::Command {
        clap::Command::new("x")
            .arg(clap::Arg::new("session-tags").long("session-tags"))
            .arg(clap::Arg::new("listen").long("listen").alias("bind"))
    }

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn names_the_podiam_way() {
        let said = unsupported(&command(), args(&["x", "--session=abc"])).unwrap();
        assert!(said.contains("--session-scope role"), "{said}");
        assert!(
            unsupported(&command(), args(&["x", "--json-log"]))
                .unwrap()
                .contains("--log-format json")
        );
        // Flags the binary has (or aliases) are clap's business.
        assert_eq!(
            unsupported(&command(), args(&["x", "--session-tags"])),
            None
        );
        assert_eq!(unsupported(&command(), args(&["x", "--bind", "1"])), None);
        assert_eq!(
            unsupported(&command(), args(&["x", "--", "--session"])),
            None
        );
        assert_eq!(unsupported(&command(), args(&["x", "--unheard-of"])), None);
    }
}
