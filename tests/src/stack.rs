//! A podiam server with everything it talks to, for end-to-end tests and benchmarks: the
//! stand-in API server (given, loaded by the caller), moto behind the counting proxy, a
//! test PKI, and the real `podiam-server` binary.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use crate::{
    certs::Pki,
    http,
    kube_api::{FakeKube, TokenIdentity},
    moto::Moto,
    process::Process,
    sts_proxy::StsProxy,
};

/// The account of every test role.
pub const ACCOUNT: &str = "123456789012";
/// The agents' ServiceAccount, as the server expects it by default.
pub const AGENT_USER: &str = "system:serviceaccount:podiam:podiam-agent";

/// A running server and its dependencies; everything stops when dropped.
#[derive(Debug)]
pub struct ServerStack {
    /// The stand-in API server.
    pub kube: FakeKube,
    /// The STS proxy in front of moto.
    pub proxy: StsProxy,
    /// moto.
    pub moto: Moto,
    /// The PKI the server trusts.
    pub pki: Pki,
    /// An unrelated PKI.
    pub other: Pki,
    /// The server process.
    pub server: Process,
    /// The agent API's address.
    pub api: SocketAddr,
    /// Scratch directory (certificates, kubeconfig).
    pub dir: tempfile::TempDir,
}

/// `arn:aws:iam::ACCOUNT:role/NAME`.
pub fn arn(name: &str) -> String {
    format!("arn:aws:iam::{ACCOUNT}:role/{name}")
}

/// An agent's token identity on `node`.
pub fn agent_identity(node: &str) -> TokenIdentity {
    TokenIdentity {
        username: AGENT_USER.into(),
        node: Some(node.into()),
        audiences: vec!["podiam".into()],
        ..TokenIdentity::default()
    }
}

/// The `podiam-server` binary next to `bin` (the calling test's own binary): both are
/// built by `cargo build --workspace --bins`, which `scripts/test` runs first.
pub fn sibling(bin: &str, name: &str) -> PathBuf {
    let path = Path::new(bin).with_file_name(name);
    assert!(
        path.exists(),
        "{} is missing: build it first (`cargo build --workspace --bins`; scripts/test does)",
        path.display()
    );
    path
}

impl ServerStack {
    /// Starts moto, the proxy and the server binary `bin` against `kube`, with `extra`
    /// flags, and waits until the server is ready.
    pub async fn start(bin: &Path, kube: FakeKube, extra: &[&str]) -> anyhow::Result<Self> {
        let moto = Moto::start().await?;
        let proxy = StsProxy::start(moto.url()).await?;
        let dir = tempfile::tempdir()?;
        let pki = Pki::generate(dir.path(), "good")?;
        let other = Pki::generate(dir.path(), "other")?;
        let kubeconfig = dir.path().join("kubeconfig");
        kube.write_kubeconfig(&kubeconfig)?;
        let cmd = server_command(bin, &proxy.url(), &pki, &kubeconfig, extra);
        let (server, api) = spawn_server(cmd).await?;
        Ok(Self {
            kube,
            proxy,
            moto,
            pki,
            other,
            server,
            api,
            dir,
        })
    }

    /// Another server replica on the same cluster, STS and PKI; returns it and its API.
    pub async fn replica(&self, bin: &Path) -> anyhow::Result<(Process, SocketAddr)> {
        self.replica_with(bin, &[]).await
    }

    /// [`ServerStack::replica`] with `extra` flags.
    pub async fn replica_with(
        &self,
        bin: &Path,
        extra: &[&str],
    ) -> anyhow::Result<(Process, SocketAddr)> {
        let kubeconfig = self.dir.path().join("kubeconfig");
        spawn_server(server_command(
            bin,
            &self.proxy.url(),
            &self.pki,
            &kubeconfig,
            extra,
        ))
        .await
    }

    /// The server's value of a metric line (name with labels), or 0.
    pub async fn metric(&self, name: &str) -> f64 {
        metric(self.server.admin, name).await
    }
}

async fn spawn_server(cmd: Command) -> anyhow::Result<(Process, SocketAddr)> {
    let server =
        tokio::task::spawn_blocking(move || Process::spawn_announcing(cmd, &["agent API"]))
            .await??;
    http::wait_ready(server.admin, Duration::from_secs(30)).await?;
    let api = server
        .addr("agent API")
        .ok_or_else(|| anyhow::anyhow!("the server announced no API address"))?;
    Ok((server, api))
}

/// The server with loopback ports, the test PKI, the STS at `sts` and the stand-in API.
pub fn server_command(
    bin: &Path,
    sts: &str,
    pki: &Pki,
    kubeconfig: &Path,
    extra: &[&str],
) -> Command {
    let mut cmd = Command::new(bin);
    cmd.env_clear()
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .args([
            "--admin-addr",
            "127.0.0.1:0",
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ])
        .args(["--base-role-arn", &format!("arn:aws:iam::{ACCOUNT}:role/")])
        .args(["--region", "us-east-1", "--sts-endpoint", sts])
        .args(["--ip-lookup-wait", "300ms"])
        .args(extra)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--ca")
        .arg(&pki.ca)
        .arg("--cert")
        .arg(&pki.server.cert)
        .arg("--key")
        .arg(&pki.server.key);
    cmd
}

/// An agent on loopback (127.0.0.100: 127.0.0.1 stays free to be a pod) for the servers at `servers` (`HOST:PORT`, comma-separated),
/// trusting `pki`, with the real metadata service at `metadata` and its token key and
/// ServiceAccount token in the given files.
pub fn agent_command(
    bin: &Path,
    pki: &Pki,
    servers: &str,
    metadata: &str,
    key_file: &Path,
    token_file: &Path,
) -> Command {
    agent_command_for(
        bin,
        pki,
        servers,
        "localhost",
        metadata,
        key_file,
        token_file,
    )
}

/// [`agent_command`] verifying the servers' certificate by `server_name`. Without
/// `--iptables` the agent also needs `--pod-sources` (which callers are pods): the caller
/// adds it.
pub fn agent_command_for(
    bin: &Path,
    pki: &Pki,
    servers: &str,
    server_name: &str,
    metadata: &str,
    key_file: &Path,
    token_file: &Path,
) -> Command {
    let mut cmd = Command::new(bin);
    cmd.env_clear()
        .args([
            "--admin-addr",
            "127.0.0.1:0",
            "--listen",
            "127.0.0.100:0",
            "--log-format",
            "json",
        ])
        .args(["--server-address", servers, "--server-name", server_name])
        .args([
            "--metadata-addr",
            metadata,
            "--server-health-interval",
            "200ms",
        ])
        .arg("--token-file")
        .arg(token_file)
        .arg("--token-key-file")
        .arg(key_file)
        .arg("--ca")
        .arg(&pki.ca)
        .arg("--cert")
        .arg(&pki.client.cert)
        .arg("--key")
        .arg(&pki.client.key);
    cmd
}

/// A process's value of a metric line (name with labels), or 0.
pub async fn metric(admin: SocketAddr, name: &str) -> f64 {
    let Ok((_, text)) = http::get(admin, "/metrics").await else {
        return 0.0;
    };
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}
