//! Command-line flags and the wiring of the server. Every flag has a `PODIAM_*`
//! environment variable; names follow kiam and kube2iam where their users would look.

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use kube::config::{KubeConfigOptions, Kubeconfig};
use podiam_common::{
    admin::{Admin, AdminArgs},
    arn::{BaseRoleArn, RoleArn},
    logging::LogArgs,
    readiness::Readiness,
    shutdown,
};
use prometheus::Registry;
use tokio::{net::TcpListener, task::JoinSet};
use tracing::Instrument;

use crate::{
    explain::ExplainArgs,
    pods::{
        ClusterIndex,
        metrics::{IndexCollector, WatchMetrics},
        watch,
    },
    policy::PolicyConfig,
};

/// podiam server: maps pod IPs to pods, pods to IAM roles, and checks each role against
/// its namespace's policy. Run without a subcommand to serve.
#[derive(Debug, Parser)]
#[command(name = "podiam-server", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    #[command(flatten)]
    admin: AdminArgs,

    #[command(flatten)]
    kube: KubeArgs,

    #[command(flatten)]
    policy: PolicyArgs,

    #[command(flatten)]
    log: LogArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the decision for one pod and why: what to run when a pod gets no credentials.
    /// Exit status: 0 allowed, 1 denied, 2 could not decide.
    Explain(ExplainArgs),
}

/// How to reach the Kubernetes API server.
#[derive(Clone, Debug, clap::Args)]
pub struct KubeArgs {
    /// Path to a kubeconfig file. Without it: the in-cluster service account, else
    /// $KUBECONFIG or ~/.kube/config.
    #[arg(long, env = "PODIAM_KUBECONFIG", global = true)]
    pub kubeconfig: Option<PathBuf>,

    /// The kubeconfig context to use (default: the current context).
    #[arg(long, env = "PODIAM_KUBE_CONTEXT", global = true)]
    pub kube_context: Option<String>,
}

/// Role resolution.
#[derive(Clone, Debug, clap::Args)]
pub struct PolicyArgs {
    /// Base ARN for roles given as a name or path/name, e.g.
    /// arn:aws:iam::123456789012:role/ (kiam: --role-base-arn). Empty means unset.
    #[arg(
        long,
        env = "PODIAM_BASE_ROLE_ARN",
        alias = "role-base-arn",
        global = true,
        value_name = "ARN"
    )]
    pub base_role_arn: Option<String>,

    /// Role for pods without an iam.amazonaws.com/role annotation (name or ARN). It is
    /// checked against the namespace policy like any other role. Empty means none.
    #[arg(long, env = "PODIAM_DEFAULT_ROLE", global = true, value_name = "ROLE")]
    pub default_role: Option<String>,
}

// === impl Cli ===

impl Cli {
    /// Runs the server or the subcommand; the exit code says how it went.
    pub async fn run(self) -> ExitCode {
        let Cli {
            command,
            admin,
            kube,
            policy,
            log,
        } = self;
        if let Err(error) = log.init() {
            eprintln!("podiam-server: {error}");
            return ExitCode::from(2);
        }
        let policy = match policy.config() {
            Ok(policy) => policy,
            Err(error) => {
                tracing::error!("{error:#}");
                return ExitCode::from(2);
            }
        };
        match command {
            Some(Command::Explain(args)) => {
                let code = args.run(&kube, &policy, &mut std::io::stdout()).await;
                ExitCode::from(code)
            }
            None => match serve(admin, kube, policy).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    tracing::error!("{error:#}");
                    ExitCode::FAILURE
                }
            },
        }
    }
}

async fn serve(admin: AdminArgs, kube: KubeArgs, policy: PolicyConfig) -> anyhow::Result<()> {
    let AdminArgs { admin_addr } = admin;
    let shutdown = shutdown::on_signals().context("installing signal handlers")?;
    let client = kube.client().await?;

    let registry = Registry::new();
    let readiness = Readiness::new();
    let index = ClusterIndex::new(policy.base_role_arn.clone());
    IndexCollector::register(&registry, index.clone())?;
    let watch_metrics = WatchMetrics::register(&registry)?;
    let pods_ready = readiness.gate("pods");
    let namespaces_ready = readiness.gate("namespaces");

    let listener = TcpListener::bind(admin_addr)
        .await
        .with_context(|| format!("binding the admin server to {admin_addr}"))?;
    tracing::info!(addr = %listener.local_addr()?, "admin server listening");

    let mut tasks = JoinSet::new();
    let admin = Admin::new(registry, readiness);
    tasks.spawn({
        let shutdown = shutdown.clone();
        async move {
            admin.serve(listener, shutdown).await;
            Ok("admin server")
        }
        .instrument(tracing::info_span!("admin"))
    });
    tasks.spawn({
        let task = watch::pods(
            client.clone(),
            index.clone(),
            pods_ready,
            watch_metrics.clone(),
            shutdown.clone(),
        );
        async move { task.await.map(|()| "pod watch").map_err(Into::into) }
            .instrument(tracing::info_span!("watch", resource = "pods"))
    });
    tasks.spawn({
        let task = watch::namespaces(
            client,
            index,
            namespaces_ready,
            watch_metrics,
            shutdown.clone(),
        );
        async move { task.await.map(|()| "namespace watch").map_err(Into::into) }
            .instrument(tracing::info_span!("watch", resource = "namespaces"))
    });

    // A task that ends before shutdown takes the process down, loudly.
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Ok(_)) if shutdown.is_cancelled() => {}
            Ok(Ok(name)) => bail!("{name} stopped unexpectedly"),
            Ok(Err(error)) => return Err(error),
            Err(error) => bail!("a server task failed: {error}"),
        }
    }
    tracing::info!("stopped");
    Ok(())
}

// === impl KubeArgs ===

impl KubeArgs {
    /// A client for the configured cluster.
    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        let options = KubeConfigOptions {
            context: self.kube_context.clone(),
            ..Default::default()
        };
        let config = match &self.kubeconfig {
            Some(path) => {
                let file = Kubeconfig::read_from(path)
                    .with_context(|| format!("reading kubeconfig {}", path.display()))?;
                kube::Config::from_custom_kubeconfig(file, &options)
                    .await
                    .with_context(|| format!("loading kubeconfig {}", path.display()))?
            }
            None if self.kube_context.is_some() => kube::Config::from_kubeconfig(&options)
                .await
                .context("loading the kubeconfig")?,
            None => kube::Config::infer()
                .await
                .context("finding a Kubernetes configuration (in-cluster or kubeconfig)")?,
        };
        kube::Client::try_from(config).context("building the Kubernetes client")
    }
}

// === impl PolicyArgs ===

impl PolicyArgs {
    /// Validates the flags.
    pub fn config(&self) -> anyhow::Result<PolicyConfig> {
        let PolicyArgs {
            base_role_arn,
            default_role,
        } = self;
        let base_role_arn = match non_empty(base_role_arn) {
            Some(v) => Some(
                v.parse::<BaseRoleArn>()
                    .with_context(|| format!("invalid --base-role-arn {v:?}"))?,
            ),
            None => None,
        };
        let default_role = match non_empty(default_role) {
            Some(v) => Some(
                RoleArn::resolve(v, base_role_arn.as_ref())
                    .with_context(|| format!("invalid --default-role {v:?}"))?,
            ),
            None => None,
        };
        Ok(PolicyConfig {
            base_role_arn,
            default_role,
        })
    }
}

fn non_empty(value: &Option<String>) -> Option<&str> {
    value.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_flag_has_an_env_var() {
        fn check(cmd: &clap::Command) {
            for arg in cmd.get_arguments() {
                if arg
                    .get_long()
                    .is_some_and(|l| l != "help" && l != "version")
                {
                    let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
                    assert!(
                        env.as_deref().is_some_and(|e| e.starts_with("PODIAM_")),
                        "--{} has no PODIAM_ env var",
                        arg.get_long().unwrap_or_default()
                    );
                }
            }
            for sub in cmd.get_subcommands() {
                check(sub);
            }
        }
        check(&Cli::command());
    }

    #[test]
    fn shared_flags_work_after_the_subcommand() {
        let cli = Cli::try_parse_from([
            "podiam-server",
            "explain",
            "--namespace",
            "ns",
            "--pod",
            "p",
            "--base-role-arn",
            "arn:aws:iam::123456789012:role/",
        ])
        .unwrap();
        assert!(matches!(cli.command, Some(Command::Explain(_))));
        assert_eq!(
            cli.policy.base_role_arn.as_deref(),
            Some("arn:aws:iam::123456789012:role/")
        );
        // kiam's spelling.
        let cli = Cli::try_parse_from(["podiam-server", "--role-base-arn", "x"]).unwrap();
        assert_eq!(cli.policy.base_role_arn.as_deref(), Some("x"));
    }

    #[test]
    fn policy_flags_are_validated() {
        let args = |base: &str, default: &str| PolicyArgs {
            base_role_arn: Some(base.into()),
            default_role: Some(default.into()),
        };
        let cfg = args("arn:aws:iam::123456789012:role/", "web")
            .config()
            .unwrap();
        assert_eq!(
            cfg.default_role.unwrap().as_str(),
            "arn:aws:iam::123456789012:role/web"
        );
        // Empty values (e.g. an empty env var in a manifest) mean unset.
        let cfg = args("", " ").config().unwrap();
        assert!(cfg.base_role_arn.is_none() && cfg.default_role.is_none());
        let err = args("arn:aws:iam::1:role/", "").config().unwrap_err();
        assert!(format!("{err:#}").contains("--base-role-arn"), "{err:#}");
        let err = args("", "web").config().unwrap_err();
        assert!(format!("{err:#}").contains("no base role ARN"), "{err:#}");
    }
}
