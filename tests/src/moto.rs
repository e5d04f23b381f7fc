//! moto (`moto_server`, from the project's `.venv`) as the STS of the tests: started on a
//! free loopback port, ready when `/moto-api/` answers, stopped when dropped.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// A running moto server.
#[derive(Debug)]
pub struct Moto {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
}

/// The venv `scripts/setup` creates.
pub fn venv() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv");
    dir.canonicalize().unwrap_or(dir)
}

fn moto_server() -> PathBuf {
    venv().join("bin/moto_server")
}

impl Moto {
    /// Starts moto on a free loopback port. Fails loudly when it is not installed: run
    /// `scripts/setup`.
    pub async fn start() -> std::io::Result<Self> {
        Self::start_on("127.0.0.1").await
    }

    /// Starts moto on a free port of `host`.
    pub async fn start_on(host: &str) -> std::io::Result<Self> {
        let bin = moto_server();
        if !bin.exists() {
            return Err(std::io::Error::other(format!(
                "{} is missing: run scripts/setup (it installs moto into .venv)",
                bin.display()
            )));
        }
        let mut child = Command::new(&bin)
            .args(["-H", host, "-p", "0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| std::io::Error::other("no stderr"))?;
        let addr = tokio::task::spawn_blocking(move || {
            let mut lines = BufReader::new(stderr).lines();
            let addr = loop {
                let Some(Ok(line)) = lines.next() else {
                    return Err(std::io::Error::other("moto_server exited before listening"));
                };
                if let Some(rest) = line.split(" * Running on http://").nth(1)
                    && let Ok(addr) = rest.trim().parse::<SocketAddr>()
                {
                    break addr;
                }
            };
            // moto logs a line per request and blocks when the pipe fills: keep draining.
            std::thread::spawn(move || lines.for_each(drop));
            Ok(addr)
        })
        .await
        .map_err(std::io::Error::other)??;
        let moto = Self { child, addr };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok((200, _)) = crate::http::get(addr, "/moto-api/").await {
                return Ok(moto);
            }
            if Instant::now() > deadline {
                return Err(std::io::Error::other(
                    "moto did not answer /moto-api/ within 20 s",
                ));
            }
            // moto has no readiness signal but its HTTP answer.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whose `credentials` (access key, secret, session token) are, as STS at `url` says
/// (`sts:GetCallerIdentity` signed with them, by the AWS SDK for Rust).
pub async fn caller_arn(url: &str, credentials: (&str, &str, &str)) -> anyhow::Result<String> {
    let (key, secret, token) = credentials;
    let config = aws_sdk_sts::Config::builder()
        .behavior_version(aws_config::BehaviorVersion::latest())
        .region(aws_sdk_sts::config::Region::new("us-east-1"))
        .endpoint_url(url)
        .http_client(aws_smithy_http_client::Builder::new().build_http())
        .credentials_provider(aws_sdk_sts::config::Credentials::new(
            key,
            secret,
            Some(token.to_string()),
            None,
            "test",
        ))
        .build();
    let out = aws_sdk_sts::Client::from_conf(config)
        .get_caller_identity()
        .send()
        .await?;
    Ok(out.arn().unwrap_or_default().to_string())
}
