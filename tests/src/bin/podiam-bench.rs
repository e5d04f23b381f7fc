//! podiam's benchmarks (not tests: they report numbers and assert nothing but sanity).
//!
//! `podiam-bench index`: server memory and time to ready at scale. The stand-in API server
//! (in this process) is loaded with N realistic pods (~2.5 KB of JSON each, with labels,
//! owner references, managed fields, containers and conditions) in M namespaces, each
//! namespace with its own `permitted` regex. The real `podiam-server` binary (release
//! build) is started against it; we time spawn → `/readyz` 200 and read its RSS.
//!
//! `podiam-bench api`: warm credential requests through the server's agent API.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use podiam_tests::{
    api_client::{ApiClient, tls_config},
    certs::Pki,
    http, imds_client,
    kube_api::{FakeKube, Kind},
    objects::{namespace, pod},
    process::Process,
    stack::{ServerStack, agent_command, agent_identity},
};
use serde_json::{Value, json};

#[derive(Debug, Parser)]
#[command(about = "podiam benchmarks: report numbers, assert nothing")]
struct Args {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// Server RSS and time to ready with many pods.
    Index {
        /// Sizes as PODS:NAMESPACES, comma-separated.
        #[arg(long, default_value = "100000:5000", value_delimiter = ',')]
        sizes: Vec<String>,
        /// Runs per size (medians and spreads are reported).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// The server binary (default: podiam-server next to this binary).
        #[arg(long)]
        server: Option<PathBuf>,
        /// `distinct`: every namespace has its own `permitted` regex (the worst case);
        /// `shared`: all namespaces have the same one.
        #[arg(long, value_enum, default_value_t = Policies::Distinct)]
        policies: Policies,
    },
    /// Warm credential requests from a pod through agent and server (IMDSv2; STS = moto).
    /// Warm credential requests through the server's agent API (mTLS HTTP/2, node
    /// binding on, STS = moto): latency percentiles, throughput, server RSS and CPU.
    Agent {
        /// Concurrent clients (keep-alive connections from the pod's address).
        #[arg(long, default_value = "1,64", value_delimiter = ',')]
        concurrency: Vec<usize>,
        /// How long each level runs.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// The server binary (the agent is taken from the same directory).
        #[arg(long)]
        server: Option<PathBuf>,
    },
    Api {
        /// Concurrent clients, comma-separated.
        #[arg(long, default_value = "1,16,64", value_delimiter = ',')]
        concurrency: Vec<usize>,
        /// How long each level runs.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// The server binary (default: podiam-server next to this binary).
        #[arg(long)]
        server: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Policies {
    Distinct,
    Shared,
}

const ACCOUNT: &str = "123456789012";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Args::parse().bench {
        Bench::Api {
            concurrency,
            duration,
            server,
        } => api(&server_path(server)?, &concurrency, duration).await?,
        Bench::Agent {
            concurrency,
            duration,
            server,
        } => agent(&server_path(server)?, &concurrency, duration).await?,
        Bench::Index {
            sizes,
            runs,
            server,
            policies,
        } => {
            let server = server_path(server)?;
            println!("server binary: {}", server.display());
            println!(
                "| pods | namespaces | time to ready (median, min-max) | RSS at ready (median, min-max) | peak RSS | RSS 5 s later | CPU to ready |"
            );
            println!("|---:|---:|---|---|---:|---:|---:|");
            for size in sizes {
                let (pods, namespaces) = size
                    .split_once(':')
                    .and_then(|(p, n)| Some((p.parse().ok()?, n.parse().ok()?)))
                    .with_context(|| format!("size {size:?} is not PODS:NAMESPACES"))?;
                index(&server, pods, namespaces, runs, policies).await?;
            }
        }
    }
    Ok(())
}

fn server_path(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let server = match given {
        Some(s) => s,
        None => std::env::current_exe()?.with_file_name("podiam-server"),
    };
    if !server.exists() {
        bail!(
            "{} not found: build it first (scripts/bench does)",
            server.display()
        );
    }
    Ok(server)
}

async fn api(server: &Path, levels: &[usize], duration: Duration) -> anyhow::Result<()> {
    let stack = ServerStack::start(server, bench_cluster().await?, &[]).await?;
    let (process, addr, pki) = (&stack.server, stack.api, &stack.pki);
    let config = tls_config(&pki.ca, Some(&pki.client))?;
    let body = json!({"ip": "127.0.0.1", "role": "web"});
    let mut warm = ApiClient::connect(addr, config.clone()).await?;
    let (status, v) = warm
        .post("/v1/credentials", Some("agent"), body.clone())
        .await?;
    if status != 200 {
        bail!("warm-up request failed: {status} {v}");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = process.rss_kib().unwrap_or(0);
    println!(
        "server binary: {}; idle RSS after warm-up: {:.1} MiB",
        server.display(),
        idle as f64 / 1024.0
    );
    println!(
        "| clients | requests/s | p50 | p99 | p99.9 | max | server RSS | server CPU (cores) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for &clients in levels {
        // One HTTP/2 connection per 16 clients, as a handful of agents would hold.
        let mut connections = Vec::new();
        for _ in 0..clients.div_ceil(16) {
            connections.push(ApiClient::connect(addr, config.clone()).await?);
        }
        let cpu0 = process.cpu_time().unwrap_or_default();
        let started = Instant::now();
        let deadline = started + duration;
        let tasks: Vec<_> = (0..clients)
            .map(|i| {
                let mut c = connections[i / 16].clone();
                let body = body.clone();
                tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    while Instant::now() < deadline {
                        let t = Instant::now();
                        let (status, _) = c
                            .post("/v1/credentials", Some("agent"), body.clone())
                            .await?;
                        if status != 200 {
                            bail!("status {status}");
                        }
                        latencies.push(t.elapsed());
                    }
                    Ok(latencies)
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await??);
        }
        let wall = started.elapsed();
        let cpu = process.cpu_time().unwrap_or_default().saturating_sub(cpu0);
        let rss = process.rss_kib().unwrap_or(0);
        let (p50, p99, p999) = percentiles(&mut all);
        println!(
            "| {clients} | {:.0} | {p50:.2?} | {p99:.2?} | {p999:.2?} | {:.2?} | {:.1} MiB | {:.2} |",
            all.len() as f64 / wall.as_secs_f64(),
            all.last().copied().unwrap_or_default(),
            rss as f64 / 1024.0,
            cpu.as_secs_f64() / wall.as_secs_f64(),
        );
    }
    Ok(())
}

/// One namespace, one pod (`bench/web` at 127.0.0.1 on node-a), one agent token.
async fn bench_cluster() -> anyhow::Result<FakeKube> {
    let kube = FakeKube::start().await?;
    kube.apply(namespace("bench", &[("iam.amazonaws.com/permitted", ".*")]));
    kube.apply(
        pod("bench", "web")
            .ip("127.0.0.1")
            .role("web")
            .node("node-a")
            .build(),
    );
    kube.add_token("agent", agent_identity("node-a"));
    Ok(kube)
}

/// Warm credential requests through agent and server, as a pod's SDK makes them.
async fn agent(server: &Path, levels: &[usize], duration: Duration) -> anyhow::Result<()> {
    let stack = ServerStack::start(server, bench_cluster().await?, &[]).await?;
    let agent_bin = server.with_file_name("podiam-agent");
    let token_file = stack.dir.path().join("sa-token");
    std::fs::write(&token_file, "agent")?;
    let servers = stack.api.to_string();
    let key_file = stack.dir.path().join("imds.key");
    let mut cmd = agent_command(
        &agent_bin,
        &stack.pki,
        &servers,
        "127.0.0.1:9",
        &key_file,
        &token_file,
    );
    cmd.args(["--log-level", "warn,podiam_agent=info"]);
    let agent =
        tokio::task::spawn_blocking(move || Process::spawn_announcing(cmd, &["metadata endpoint"]))
            .await??;
    http::wait_ready(agent.admin, Duration::from_secs(30)).await?;
    let imds = agent
        .addr("metadata endpoint")
        .context("no endpoint address")?;
    let from: std::net::IpAddr = "127.0.0.1".parse()?;
    let token = imds_client::request(
        from,
        imds,
        ::http::Method::PUT,
        "/latest/api/token",
        &[("x-aws-ec2-metadata-token-ttl-seconds", "21600")],
    )
    .await?
    .body;
    let path = "/latest/meta-data/iam/security-credentials/web";
    let warm = imds_client::request(
        from,
        imds,
        ::http::Method::GET,
        path,
        &[("x-aws-ec2-metadata-token", &token)],
    )
    .await?;
    if warm.status != 200 {
        bail!("warm-up request failed: {} {}", warm.status, warm.body);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!(
        "agent {}; idle RSS: agent {:.1} MiB, server {:.1} MiB",
        agent_bin.display(),
        agent.rss_kib().unwrap_or(0) as f64 / 1024.0,
        stack.server.rss_kib().unwrap_or(0) as f64 / 1024.0
    );
    println!(
        "| mode | clients | requests/s | p50 | p99 | p99.9 | agent RSS | agent CPU | server CPU |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for fresh_token in [false, true] {
        for &clients in levels {
            let (a0, s0) = (
                agent.cpu_time().unwrap_or_default(),
                stack.server.cpu_time().unwrap_or_default(),
            );
            let started = Instant::now();
            let deadline = started + duration;
            let tasks: Vec<_> = (0..clients)
                .map(|_| {
                    let token = token.clone();
                    tokio::spawn(async move {
                        pod_client(imds, path, token, fresh_token, deadline).await
                    })
                })
                .collect();
            let mut all = Vec::new();
            for t in tasks {
                all.extend(t.await??);
            }
            let wall = started.elapsed();
            let cores = |now: Option<Duration>, before: Duration| {
                now.unwrap_or_default().saturating_sub(before).as_secs_f64() / wall.as_secs_f64()
            };
            let (p50, p99, p999) = percentiles(&mut all);
            println!(
                "| {} | {clients} | {:.0} | {p50:.2?} | {p99:.2?} | {p999:.2?} | {:.1} MiB | {:.2} | {:.2} |",
                if fresh_token {
                    "IMDSv2, PUT + GET each time"
                } else {
                    "IMDSv2, token reused"
                },
                all.len() as f64 / wall.as_secs_f64(),
                agent.rss_kib().unwrap_or(0) as f64 / 1024.0,
                cores(agent.cpu_time(), a0),
                cores(stack.server.cpu_time(), s0),
            );
        }
    }
    Ok(())
}

/// One keep-alive HTTP/1.1 connection from the pod's address, requesting until `deadline`.
async fn pod_client(
    imds: std::net::SocketAddr,
    path: &'static str,
    token: String,
    fresh_token: bool,
    deadline: Instant,
) -> anyhow::Result<Vec<Duration>> {
    use http_body_util::{BodyExt, Empty};
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind("127.0.0.1:0".parse()?)?;
    let stream = socket.connect(imds).await?;
    stream.set_nodelay(true)?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut latencies = Vec::new();
    while Instant::now() < deadline {
        let t = Instant::now();
        let token = if fresh_token {
            let req = ::http::Request::put("/latest/api/token")
                .header("x-aws-ec2-metadata-token-ttl-seconds", "21600")
                .body(Empty::<bytes::Bytes>::new())?;
            sender.ready().await?;
            let rsp = sender.send_request(req).await?;
            String::from_utf8(rsp.into_body().collect().await?.to_bytes().to_vec())?
        } else {
            token.clone()
        };
        let req = ::http::Request::get(path)
            .header("x-aws-ec2-metadata-token", token)
            .body(Empty::<bytes::Bytes>::new())?;
        sender.ready().await?;
        let rsp = sender.send_request(req).await?;
        let status = rsp.status();
        rsp.into_body().collect().await?;
        if status != 200 {
            bail!("status {status}");
        }
        latencies.push(t.elapsed());
    }
    Ok(latencies)
}

fn percentiles(all: &mut [Duration]) -> (Duration, Duration, Duration) {
    all.sort();
    let pct = |p: f64| {
        let i = ((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1));
        all.get(i).copied().unwrap_or_default()
    };
    (pct(0.5), pct(0.99), pct(0.999))
}

struct Sample {
    ready: Duration,
    rss_mib: f64,
    peak_mib: f64,
    settled_mib: f64,
    cpu: Duration,
}

async fn index(
    server: &Path,
    pods: usize,
    namespaces: usize,
    runs: usize,
    policies: Policies,
) -> anyhow::Result<()> {
    let kube = FakeKube::start().await?;
    let started = Instant::now();
    for n in 0..namespaces {
        let permitted = match policies {
            Policies::Distinct => format!("arn:aws:iam::{ACCOUNT}:role/ns-{n}-.*"),
            Policies::Shared => format!("arn:aws:iam::{ACCOUNT}:role/ns-.*"),
        };
        kube.apply(namespace(
            &format!("ns-{n}"),
            &[("iam.amazonaws.com/permitted", &permitted)],
        ));
    }
    let mut bytes = 0;
    for i in 0..pods {
        let pod = realistic_pod(i, i % namespaces.max(1));
        bytes += pod.to_string().len();
        kube.apply(pod);
    }
    kube.compact();
    eprintln!(
        "loaded {pods} pods ({:.0} MB of JSON, {} B each) in {namespaces} namespaces ({policies:?} policies) in {:.1?}",
        bytes as f64 / 1e6,
        bytes / pods.max(1),
        started.elapsed()
    );
    let dir = tempfile::tempdir()?;
    let kubeconfig = dir.path().join("kubeconfig");
    kube.write_kubeconfig(&kubeconfig)?;
    let pki = Pki::generate(dir.path(), "bench")?;

    let mut samples = Vec::new();
    for run in 0..runs {
        let mut cmd = Command::new(server);
        // The index alone: no STS (prefetch off, endpoint refusing), API on loopback.
        cmd.env_clear()
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .args(["--listen", "127.0.0.1:0", "--region", "us-east-1"])
            .args([
                "--sts-endpoint",
                "http://127.0.0.1:9",
                "--prefetch-concurrency",
                "0",
            ])
            .arg("--ca")
            .arg(&pki.ca)
            .arg("--cert")
            .arg(&pki.server.cert)
            .arg("--key")
            .arg(&pki.server.key)
            .args([
                "--admin-addr",
                "127.0.0.1:0",
                "--log-format",
                "json",
                "--log-level",
                "warn,podiam_server=info",
            ])
            .args(["--base-role-arn", &format!("arn:aws:iam::{ACCOUNT}:role/")])
            .arg("--kubeconfig")
            .arg(&kubeconfig);
        let t0 = Instant::now();
        let process = tokio::task::spawn_blocking(move || Process::spawn(cmd)).await??;
        http::wait_ready(process.admin, Duration::from_secs(600)).await?;
        let ready = t0.elapsed();
        let rss = process.rss_kib().unwrap_or(0);
        let peak = process.peak_rss_kib().unwrap_or(0);
        let cpu = process.cpu_time().unwrap_or_default();
        let (_, metrics) = http::get(process.admin, "/metrics").await?;
        let indexed = metric(&metrics, "podiam_pod_index_pods");
        if indexed != Some(pods as f64) {
            bail!("server indexed {indexed:?} pods, expected {pods}");
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
        let settled = process.rss_kib().unwrap_or(0);
        eprintln!(
            "run {}: ready in {ready:.2?}, RSS {} MiB (peak {} MiB, {} MiB 5 s later), CPU {cpu:.2?}",
            run + 1,
            rss / 1024,
            peak / 1024,
            settled / 1024
        );
        samples.push(Sample {
            ready,
            rss_mib: rss as f64 / 1024.0,
            peak_mib: peak as f64 / 1024.0,
            settled_mib: settled as f64 / 1024.0,
            cpu,
        });
        tokio::task::spawn_blocking(move || process.terminate(Duration::from_secs(10))).await??;
    }
    let stat = |f: &dyn Fn(&Sample) -> f64| {
        let mut v: Vec<f64> = samples.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[0], v[v.len() - 1])
    };
    let (ready, rmin, rmax) = stat(&|s| s.ready.as_secs_f64());
    let (rss, smin, smax) = stat(&|s| s.rss_mib);
    let (peak, _, _) = stat(&|s| s.peak_mib);
    let (settled, _, _) = stat(&|s| s.settled_mib);
    let (cpu, _, _) = stat(&|s| s.cpu.as_secs_f64());
    println!(
        "| {pods} | {namespaces} | {ready:.2} s ({rmin:.2}-{rmax:.2}) | {rss:.1} MiB ({smin:.1}-{smax:.1}) | {peak:.1} MiB | {settled:.1} MiB | {cpu:.2} s |"
    );
    assert_eq!(kube.count(Kind::Pod), pods);
    Ok(())
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// A pod as a Deployment creates it, with the fields a real API server returns.
fn realistic_pod(i: usize, ns: usize) -> Value {
    let ip = format!("100.{}.{}.{}", 64 + (i >> 16), (i >> 8) & 255, i & 255);
    let name = format!("app-{i}-7d9f8c6b5-x2k4p");
    let node = format!("node-{}", i % 500);
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name, "namespace": format!("ns-{ns}"),
            "generateName": format!("app-{i}-7d9f8c6b5-"),
            "labels": {"app": format!("app-{i}"), "pod-template-hash": "7d9f8c6b5", "team": format!("team-{ns}")},
            "annotations": {
                "iam.amazonaws.com/role": format!("ns-{ns}-app"),
                "kubectl.kubernetes.io/restartedAt": "2026-11-01T00:00:00Z",
                "prometheus.io/scrape": "true", "prometheus.io/port": "9090"
            },
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("app-{i}-7d9f8c6b5"),
                "uid": "6d1c3b4a-2f0e-4c8d-9b7a-1e2f3a4b5c6d", "controller": true, "blockOwnerDeletion": true}],
            "creationTimestamp": "2026-11-01T00:00:00Z",
            "managedFields": [{
                "manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1",
                "time": "2026-11-01T00:00:00Z", "fieldsType": "FieldsV1",
                "fieldsV1": {"f:metadata": {"f:generateName": {}, "f:labels": {".": {}, "f:app": {}, "f:pod-template-hash": {}},
                    "f:ownerReferences": {".": {}, "k:{\"uid\":\"6d1c3b4a\"}": {}}},
                    "f:spec": {"f:containers": {"k:{\"name\":\"app\"}": {".": {}, "f:image": {}, "f:name": {}, "f:ports": {}}}}}
            }, {
                "manager": "kubelet", "operation": "Update", "apiVersion": "v1", "subresource": "status",
                "time": "2026-11-01T00:00:05Z", "fieldsType": "FieldsV1",
                "fieldsV1": {"f:status": {"f:conditions": {}, "f:containerStatuses": {}, "f:hostIP": {}, "f:phase": {}, "f:podIP": {}, "f:podIPs": {}}}
            }]
        },
        "spec": {
            "nodeName": node, "serviceAccountName": "app", "restartPolicy": "Always", "dnsPolicy": "ClusterFirst",
            "schedulerName": "default-scheduler", "terminationGracePeriodSeconds": 30,
            "containers": [{
                "name": "app", "image": "registry.example/app:1.2.3", "imagePullPolicy": "IfNotPresent",
                "ports": [{"containerPort": 8080, "protocol": "TCP"}],
                "env": [{"name": "AWS_REGION", "value": "us-east-1"}, {"name": "LOG_LEVEL", "value": "info"}],
                "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
                "volumeMounts": [{"name": "kube-api-access", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true}],
                "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File"
            }],
            "tolerations": [
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}
            ],
            "volumes": [{"name": "kube-api-access", "projected": {"defaultMode": 420, "sources": [
                {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}}
            ]}}]
        },
        "status": {
            "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "100.127.0.1", "qosClass": "Burstable",
            "startTime": "2026-11-01T00:00:01Z",
            "conditions": [
                {"type": "Initialized", "status": "True", "lastTransitionTime": "2026-11-01T00:00:01Z"},
                {"type": "Ready", "status": "True", "lastTransitionTime": "2026-11-01T00:00:05Z"},
                {"type": "ContainersReady", "status": "True", "lastTransitionTime": "2026-11-01T00:00:05Z"},
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": "2026-11-01T00:00:00Z"}
            ],
            "containerStatuses": [{
                "name": "app", "ready": true, "started": true, "restartCount": 0,
                "image": "registry.example/app:1.2.3",
                "imageID": "registry.example/app@sha256:0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0",
                "containerID": "containerd://5c4b3a29180f7e6d5c4b3a29180f7e6d5c4b3a29180f7e6d5c4b3a29180f7e6d",
                "state": {"running": {"startedAt": "2026-11-01T00:00:04Z"}}, "lastState": {}
            }]
        }
    })
}
