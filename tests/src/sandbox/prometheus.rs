//! A real Prometheus (Debian's `prometheus` package) in the sandbox's control namespace,
//! scraping podiam-server's and every agent's admin port, with the alert rules that
//! `deploy/` ships (the PrometheusRule of the prometheus-operator component).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use serde_json::{Value, json};

/// Where Prometheus listens, inside the control namespace.
pub const PORT: u16 = 9090;

/// The rules file `deploy/` ships, as the repository holds it.
pub fn shipped_rules() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/components/prometheus-operator/monitoring.yaml")
}

/// A running Prometheus; stopped when dropped.
#[derive(Debug)]
pub struct Prometheus {
    child: Child,
    /// `http://HOST:PORT`.
    pub addr: SocketAddr,
}

impl Prometheus {
    /// Starts Prometheus on `host` with its data in `dir`, scraping `server` (job
    /// `podiam-server`) and `agents` (job `podiam-agent`, with a `node` label, as the
    /// shipped ServiceMonitor's relabelling gives), every 2 s.
    pub async fn start(
        dir: &Path,
        host: &str,
        server: SocketAddr,
        agents: &[(String, SocketAddr)],
    ) -> anyhow::Result<Self> {
        let bin = which("prometheus")
            .context("prometheus is missing: run scripts/setup (Debian's prometheus package)")?;
        std::fs::create_dir_all(dir.join("data"))?;
        let rules = dir.join("podiam.rules.json");
        std::fs::write(&rules, rules_json(&shipped_rules())?)?;
        let agent_targets: Vec<Value> = agents
            .iter()
            .map(|(node, addr)| json!({"targets": [addr.to_string()], "labels": {"node": node}}))
            .collect();
        // JSON is YAML: Prometheus reads it as its configuration.
        let config = json!({
            "global": {"scrape_interval": "2s", "evaluation_interval": "2s"},
            "rule_files": [rules],
            "scrape_configs": [
                {"job_name": "podiam-server", "static_configs": [{"targets": [server.to_string()]}]},
                {"job_name": "podiam-agent", "static_configs": agent_targets},
            ],
        });
        let config_file = dir.join("prometheus.yml");
        std::fs::write(&config_file, serde_json::to_vec_pretty(&config)?)?;
        let check = Command::new(which("promtool").unwrap_or_else(|| "promtool".into()))
            .arg("check")
            .arg("config")
            .arg(&config_file)
            .output();
        if let Ok(out) = check
            && !out.status.success()
        {
            bail!(
                "promtool check config: {}",
                String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr)
            );
        }
        let addr: SocketAddr = format!("{host}:{PORT}").parse()?;
        let log = std::fs::File::create(dir.join("prometheus.log"))?;
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting prometheus")?;
        let mut prometheus = Self { child, addr };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _)) = crate::http::get(addr, "/-/ready").await {
                return Ok(prometheus);
            }
            if let Ok(Some(status)) = prometheus.child.try_wait() {
                bail!("prometheus exited ({status}); see prometheus.log");
            }
            if Instant::now() > deadline {
                bail!("prometheus did not become ready within 30 s; see prometheus.log");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `spec` of the PrometheusRule in `manifest` (multi-document YAML), as JSON: a
/// Prometheus rules file.
pub fn rules_json(manifest: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(manifest)
        .with_context(|| format!("reading {}", manifest.display()))?;
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text)
        .with_context(|| format!("parsing {}", manifest.display()))?;
    let spec = docs
        .into_iter()
        .find(|d| d["kind"] == "PrometheusRule")
        .map(|d| d["spec"].clone())
        .with_context(|| format!("{} holds no PrometheusRule", manifest.display()))?;
    Ok(serde_json::to_string_pretty(&spec)?)
}

/// `(up, total)` of Prometheus's scrape targets, from its API at `addr` (in `ns`).
pub fn targets_up(ns: &str, addr: SocketAddr) -> anyhow::Result<(usize, usize)> {
    let (code, body) = crate::netns::get(ns, addr, "/api/v1/targets")?;
    if code != 200 {
        bail!("/api/v1/targets answered {code}");
    }
    let v: Value = serde_json::from_str(&body)?;
    let targets = v["data"]["activeTargets"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let up = targets.iter().filter(|t| t["health"] == "up").count();
    Ok((up, targets.len()))
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_string_lossy()
        .split(':')
        .map(|dir| Path::new(dir).join(name))
        .chain(["/usr/bin", "/usr/sbin", "/bin"].map(|d| Path::new(d).join(name)))
        .find(|p| p.is_file())
}
