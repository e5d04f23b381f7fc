//! **Test double** as a process: the stand-in Kubernetes API server loaded with a
//! manifest file, for the demo and for manual runs. Prints one line per pod
//! (`pod NAMESPACE NAME NODE IP`), then `ready URL`, and serves until SIGTERM or SIGINT.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use podiam_tests::{kube_api::FakeKube, manifests};

/// Stand-in Kubernetes API server (a test double, not a Kubernetes implementation).
#[derive(Debug, Parser)]
struct Args {
    /// Namespace and Pod manifests to load (multi-document YAML).
    #[arg(long)]
    manifests: PathBuf,
    /// Where to write a kubeconfig that points at this server.
    #[arg(long)]
    kubeconfig: PathBuf,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let kube = FakeKube::start()
        .await
        .context("starting the stand-in API server")?;
    let loaded = manifests::load(&kube, &args.manifests)?;
    kube.write_kubeconfig(&args.kubeconfig)
        .with_context(|| format!("writing {}", args.kubeconfig.display()))?;
    for pod in &loaded.pods {
        println!("pod {} {} {} {}", pod.namespace, pod.name, pod.node, pod.ip);
    }
    println!("ready {}", kube.url());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
    Ok(())
}
