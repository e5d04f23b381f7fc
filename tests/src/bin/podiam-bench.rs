//! podiam's benchmarks (not tests: they report numbers and assert nothing but sanity).
//!
//! `podiam-bench index`: server memory and time to ready at scale. The stand-in API server
//! (in this process) is loaded with N realistic pods (~2.5 KB of JSON each, with labels,
//! owner references, managed fields, containers and conditions) in M namespaces, each
//! namespace with its own `permitted` regex. The real `podiam-server` binary (release
//! build) is started against it; we time spawn → `/readyz` 200 and read its RSS.
//!
//! `podiam-bench api`: warm credential requests through the server's agent API.
//!
//! `podiam-bench agent`: warm credential requests from a pod through agent and server,
//! each level measured against a *floor* in the same run: a bare hyper server (its own
//! process, `podiam-bench floor`) answering the same bytes to the same client.
//!
//! `podiam-bench churn`: server RSS while pods are created and deleted (a simulated hour
//! at a given rate, replayed faster).
//!
//! `podiam-bench sts`: AssumeRole calls of the broker for N pods over R roles across
//! simulated hours (paused clock, in-memory STS), against the ideal.
//!
//! `podiam-bench prefetch`: the share of new pods whose first request is served from the
//! cache, with pods created at a given rate and STS answering after a fixed delay.
//!
//! `podiam-bench hostile`: a node's other pods while one pod holds thousands of idle
//! connections or sends forged tokens in a tight loop; the server under one node's hostile
//! feed subscriptions.
//!
//! `podiam-bench revocation`: from the API write that takes a pod's role away to the
//! agent's first refusal.

// Benchmarks and the sandbox measure and wait in real time.
#![allow(clippy::disallowed_methods)]

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use podiam_tests::{
    api_client::{self, ApiClient, tls_config},
    certs::Pki,
    http, imds_client,
    kube_api::{FakeKube, Kind},
    objects::{namespace, pod},
    process::Process,
    stack::{self, ServerStack, agent_command, agent_identity},
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
    /// Warm credential requests from a pod through agent and server (IMDSv2; STS = moto),
    /// against the floor: a bare hyper server answering the same bytes.
    Agent {
        /// Concurrent clients (keep-alive connections from the pod's address).
        #[arg(long, default_value = "1,16,64,256", value_delimiter = ',')]
        concurrency: Vec<usize>,
        /// How long each level runs (floor and agent each).
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Rounds (floor then agent each time); medians and spreads are reported.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// The server binary (the agent is taken from the same directory).
        #[arg(long)]
        server: Option<PathBuf>,
    },
    /// Server RSS under pod churn: pods created and deleted at --rate per simulated
    /// second for --simulated, replayed --speed times faster.
    Churn {
        /// Pods present throughout.
        #[arg(long, default_value_t = 10_000)]
        pods: usize,
        /// Namespaces.
        #[arg(long, default_value_t = 500)]
        namespaces: usize,
        /// Pods created (and as many deleted) per simulated second.
        #[arg(long, default_value_t = 50)]
        rate: usize,
        /// Simulated time.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        simulated: Duration,
        /// How much faster than real time it is replayed.
        #[arg(long, default_value_t = 20)]
        speed: usize,
        /// The server binary.
        #[arg(long)]
        server: Option<PathBuf>,
    },
    /// The fault matrix (root): a `podiam-sandbox` with two nodes, IMDSv2 load from its
    /// permitted pods, each fault injected and removed in turn; per fault the answers
    /// (every one checked against the pod's role in STS), the time back to full service,
    /// and any process that exited.
    Chaos {
        /// Faults, comma-separated (default: all).
        #[arg(long, value_delimiter = ',')]
        faults: Vec<String>,
        /// How long a server or agent stays down.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        hold: Duration,
        /// How long the API server stays unreachable.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        api_hold: Duration,
        /// Pods under load added on each node (besides the example's two).
        #[arg(long, default_value_t = 2)]
        per_node: usize,
        /// The sandbox manifest.
        #[arg(long, default_value = "examples/sandbox.yaml")]
        manifest: PathBuf,
    },
    /// The soak (root): a sandbox under steady IMDSv2 load while pods are created and
    /// deleted in the API server at --churn per second; every --sample, the server's and
    /// agents' RSS, open files, threads and tokio tasks, and the rounds answered.
    Soak {
        /// How long.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Pods created (and deleted) per second.
        #[arg(long, default_value_t = 20)]
        churn: u32,
        /// Churn pods alive at once.
        #[arg(long, default_value_t = 200)]
        live: u32,
        /// Sampling interval.
        #[arg(long, default_value = "1m", value_parser = humantime::parse_duration)]
        sample: Duration,
        /// The sandbox manifest.
        #[arg(long, default_value = "examples/sandbox.yaml")]
        manifest: PathBuf,
    },
    /// AssumeRole calls for N pods over R roles across simulated hours (broker with a
    /// paused clock and an in-memory STS), against the ideal.
    Sts {
        /// Pods.
        #[arg(long, default_value_t = 1000)]
        pods: usize,
        /// Roles (pod i has role i mod R).
        #[arg(long, default_value_t = 20)]
        roles: usize,
        /// Simulated hours (the first is the cold start; steady state is counted after).
        #[arg(long, default_value_t = 6)]
        hours: u64,
    },
    /// Share of new pods whose first request finds their session ready (prefetch), with
    /// pods created at each rate and STS answering after --sts-delay.
    Prefetch {
        /// Pods created per second, comma-separated.
        #[arg(long, default_value = "10,100", value_delimiter = ',')]
        rates: Vec<u32>,
        /// Pods per rate.
        #[arg(long, default_value_t = 500)]
        pods: usize,
        /// Added STS latency (moto behind the delaying proxy).
        #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
        sts_delay: Duration,
        /// Time from a pod's creation (with its IP) to its first request: container start.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        first_request_after: Duration,
        /// The server's --prefetch-concurrency values to compare, comma-separated.
        #[arg(long, default_value = "8,32", value_delimiter = ',')]
        prefetch_concurrency: Vec<usize>,
        /// The server binary.
        #[arg(long)]
        server: Option<PathBuf>,
    },
    /// The node feed at scale: one server streaming to NODES stand-in agents (tonic
    /// clients, one mTLS connection and token each) with PODS pods each; server memory and
    /// CPU, time for every agent to sync, to resync on a second replica when the first
    /// goes, a real agent's RSS with --agent-pods pods on its node, and the time to a
    /// full session cache (one session per pod) at --prefetch-rate.
    Feed {
        /// Nodes (stand-in agents).
        #[arg(long, default_value_t = 1000)]
        nodes: usize,
        /// Pods per node.
        #[arg(long, default_value_t = 100)]
        pods: usize,
        /// Pods on the real agent's node.
        #[arg(long, default_value_t = 250)]
        agent_pods: usize,
        /// Pods whose sessions (one per pod) are prefetched from a cold start.
        #[arg(long, default_value_t = 10_000)]
        cache_pods: usize,
        /// The server binary.
        #[arg(long)]
        server: Option<PathBuf>,
    },
    /// The hostile neighbour: a node's other pods' warm requests (p50, p99) and the agent's
    /// memory, quiet and while one pod holds --connections idle connections or sends forged
    /// tokens in a tight loop; and the server's memory under one node's hostile feed
    /// subscriptions.
    Hostile {
        /// Idle connections the hostile pod holds.
        #[arg(long, default_value_t = 20_000)]
        connections: usize,
        /// Keep-alive clients of the neighbour pod.
        #[arg(long, default_value_t = 8)]
        clients: usize,
        /// How long each case is measured.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// The server binary (the agent is taken from the same directory).
        #[arg(long)]
        server: Option<PathBuf>,
    },
    /// Revocation: from the API write that takes a pod's role away (its namespace's policy
    /// narrowed, its annotation changed, the pod deleted) to the agent's first refusal of
    /// the old role, over --changes writes.
    Revocation {
        /// Writes, spread over the three kinds.
        #[arg(long, default_value_t = 120)]
        changes: usize,
        /// The server binary (the agent is taken from the same directory).
        #[arg(long)]
        server: Option<PathBuf>,
    },
    /// (internal) Holds `count` idle connections from `from` to `to` until killed, for
    /// `hostile` (each process has its own open-file limit).
    #[command(hide = true)]
    Hold {
        /// Where to.
        to: std::net::SocketAddr,
        /// From which address.
        from: std::net::IpAddr,
        /// How many.
        count: usize,
    },
    /// (internal) The floor for `agent`: a bare hyper server answering `body` to GETs and
    /// `token` to PUTs.
    #[command(hide = true)]
    Floor {
        /// The bytes to answer a GET.
        body: PathBuf,
        /// The bytes to answer a PUT (a token).
        token: PathBuf,
    },
    /// Warm credential requests through the server's agent API (mTLS HTTP/2, node
    /// binding on, STS = moto): latency percentiles, throughput, server RSS and CPU.
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

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Bench::Chaos {
        faults,
        hold,
        api_hold,
        per_node,
        manifest,
    } = &args.bench
    {
        // Threads of its own in the pods' namespaces; no runtime here.
        return chaos(faults, *hold, *api_hold, *per_node, manifest);
    }
    if let Bench::Soak {
        duration,
        churn,
        live,
        sample,
        manifest,
    } = &args.bench
    {
        return soak(*duration, *churn, *live, *sample, manifest);
    }
    if let Bench::Sts { pods, roles, hours } = args.bench {
        // Simulated hours: tokio's clock is paused and jumps to the next timer.
        return tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()?
            .block_on(sts(pods, roles, hours));
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args.bench))
}

async fn run(bench: Bench) -> anyhow::Result<()> {
    match bench {
        Bench::Sts { .. } => bail!("the sts bench runs on its own paused runtime"),
        Bench::Floor { body, token } => floor(&body, &token).await?,
        Bench::Hold { to, from, count } => hold(to, from, count).await?,
        Bench::Hostile {
            connections,
            clients,
            duration,
            server,
        } => hostile(&server_path(server)?, connections, clients, duration).await?,
        Bench::Revocation { changes, server } => revocation(&server_path(server)?, changes).await?,
        Bench::Churn {
            pods,
            namespaces,
            rate,
            simulated,
            speed,
            server,
        } => {
            churn(
                &server_path(server)?,
                pods,
                namespaces,
                rate,
                simulated,
                speed,
            )
            .await?
        }
        Bench::Prefetch {
            rates,
            pods,
            sts_delay,
            first_request_after,
            prefetch_concurrency,
            server,
        } => {
            prefetch(
                &server_path(server)?,
                &rates,
                pods,
                sts_delay,
                first_request_after,
                &prefetch_concurrency,
            )
            .await?
        }
        Bench::Feed {
            nodes,
            pods,
            agent_pods,
            cache_pods,
            server,
        } => {
            let server = server_path(server)?;
            feed(&server, nodes, pods).await?;
            agent_table(&server, agent_pods).await?;
            full_cache(&server, cache_pods).await?;
        }
        Bench::Api {
            concurrency,
            duration,
            server,
        } => api(&server_path(server)?, &concurrency, duration).await?,
        Bench::Agent {
            concurrency,
            duration,
            runs,
            server,
        } => agent(&server_path(server)?, &concurrency, duration, runs).await?,
        Bench::Chaos { .. } | Bench::Soak { .. } => {
            unreachable!("run before the runtime starts")
        }
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

/// Warm credential requests through agent and server, as a pod's SDK makes them, each
/// level against the floor (a bare hyper server answering the same bytes) in the same run.
async fn agent(
    server: &Path,
    levels: &[usize],
    duration: Duration,
    runs: usize,
) -> anyhow::Result<()> {
    let stack = ServerStack::start(server, bench_cluster().await?, &[]).await?;
    let agent_bin = server.with_file_name("podiam-agent");
    let Warm {
        agent,
        imds,
        token,
        warm,
    } = warm_agent(&stack, &agent_bin, &["--pod-request-rate", "0"]).await?;
    let path = WEB_PATH;
    // The floor answers the very bytes the agent answered, from its own process.
    let body_file = stack.dir.path().join("floor-body");
    std::fs::write(&body_file, &warm.body)?;
    let token_file = stack.dir.path().join("floor-token");
    std::fs::write(&token_file, &token)?;
    let mut floor_cmd = Command::new(std::env::current_exe()?);
    floor_cmd.arg("floor").arg(&body_file).arg(&token_file);
    let floor =
        tokio::task::spawn_blocking(move || Process::spawn_announcing(floor_cmd, &["floor"]))
            .await??;
    let floor_addr = floor
        .addr("floor")
        .context("the floor announced no address")?;

    // Idle: nothing but health checks, for 10 s.
    let (a0, t0) = (agent.cpu_time().unwrap_or_default(), Instant::now());
    tokio::time::sleep(Duration::from_secs(10)).await;
    let idle_cpu = agent.cpu_time().unwrap_or_default().saturating_sub(a0);
    println!(
        "agent {}; idle: agent RSS {:.1} MiB, CPU {:.4} cores (over {:.0?}); server RSS {:.1} MiB; {} B per answer",
        agent_bin.display(),
        agent.rss_kib().unwrap_or(0) as f64 / 1024.0,
        idle_cpu.as_secs_f64() / t0.elapsed().as_secs_f64(),
        t0.elapsed(),
        stack.server.rss_kib().unwrap_or(0) as f64 / 1024.0,
        warm.body.len(),
    );
    let server_calls = stack.metric(SERVER_CREDENTIALS).await;
    let table_before = stack::metric(agent.admin, TABLE_ANSWERS).await;
    println!("\n{runs} rounds of {duration:?} per level, floor then agent; medians (min-max)\n");
    println!(
        "| mode | clients | floor req/s | agent req/s | agent / floor | floor p99 | agent p50 | agent p99 | agent p99.9 | agent RSS | agent CPU | server CPU |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for fresh_token in [false, true] {
        for &clients in levels {
            let mut rounds = Vec::new();
            for _ in 0..runs {
                let base = load(floor_addr, path, &token, fresh_token, clients, duration).await?;
                let (a0, s0) = (
                    agent.cpu_time().unwrap_or_default(),
                    stack.server.cpu_time().unwrap_or_default(),
                );
                let started = Instant::now();
                let real = load(imds, path, &token, fresh_token, clients, duration).await?;
                let wall = started.elapsed().as_secs_f64();
                let cores = |now: Option<Duration>, before: Duration| {
                    now.unwrap_or_default().saturating_sub(before).as_secs_f64() / wall
                };
                rounds.push(Round {
                    floor: base,
                    agent: real,
                    agent_cpu: cores(agent.cpu_time(), a0),
                    server_cpu: cores(stack.server.cpu_time(), s0),
                });
            }
            let med = |f: &dyn Fn(&Round) -> f64| spread(rounds.iter().map(f).collect());
            let ms = |(m, lo, hi): (f64, f64, f64)| {
                format!("{:.2} ms ({:.2}-{:.2})", m * 1e3, lo * 1e3, hi * 1e3)
            };
            let n = |(m, lo, hi): (f64, f64, f64)| format!("{m:.0} ({lo:.0}-{hi:.0})");
            let (ratio, rlo, rhi) = med(&|r| r.agent.rps / r.floor.rps);
            println!(
                "| {} | {clients} | {} | {} | {:.0} % ({:.0}-{:.0}) | {} | {} | {} | {} | {:.1} MiB | {:.2} | {:.2} |",
                if fresh_token {
                    "IMDSv2, PUT + GET each time"
                } else {
                    "IMDSv2, token reused"
                },
                n(med(&|r| r.floor.rps)),
                n(med(&|r| r.agent.rps)),
                ratio * 100.0,
                rlo * 100.0,
                rhi * 100.0,
                ms(med(&|r| r.floor.p99)),
                ms(med(&|r| r.agent.p50)),
                ms(med(&|r| r.agent.p99)),
                ms(med(&|r| r.agent.p999)),
                agent.rss_kib().unwrap_or(0) as f64 / 1024.0,
                med(&|r| r.agent_cpu).0,
                med(&|r| r.server_cpu).0,
            );
        }
    }
    println!(
        "\nanswered from the node table: {:.0}; credential requests the server answered meanwhile: {:.0}",
        stack::metric(agent.admin, TABLE_ANSWERS).await - table_before,
        stack.metric(SERVER_CREDENTIALS).await - server_calls,
    );
    drop(floor);
    Ok(())
}

const TABLE_ANSWERS: &str = r#"podiam_agent_credentials_answered_total{source="table"}"#;
/// The bench pod's credentials.
const WEB_PATH: &str = "/latest/meta-data/iam/security-credentials/web";

/// An agent on loopback for `stack`, answering the bench pod (127.0.0.1) from its node
/// table, with the pod's IMDSv2 token and the warm answer.
struct Warm {
    agent: Process,
    imds: std::net::SocketAddr,
    token: String,
    warm: imds_client::Answer,
}

async fn warm_agent(stack: &ServerStack, agent_bin: &Path, extra: &[&str]) -> anyhow::Result<Warm> {
    let token_file = stack.dir.path().join("sa-token");
    std::fs::write(&token_file, "agent")?;
    let servers = stack.api.to_string();
    let key_file = stack.dir.path().join("imds.key");
    let mut cmd = agent_command(
        agent_bin,
        &stack.pki,
        &servers,
        "127.0.0.1:9",
        &key_file,
        &token_file,
    );
    cmd.args(["--log-level", "warn,podiam_agent=info"]);
    // Loopback callers stand for pods; their addresses live behind no veth to bind to.
    cmd.args(["--pod-sources", "127.0.0.0/8", "--interface-binding", "off"]);
    cmd.args(extra);
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
    // Warm: until the agent answers from its node table (the feed has the credentials).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let warm = imds_client::request(
            from,
            imds,
            ::http::Method::GET,
            WEB_PATH,
            &[("x-aws-ec2-metadata-token", &token)],
        )
        .await?;
        if warm.status != 200 {
            bail!("warm-up request failed: {} {}", warm.status, warm.body);
        }
        if stack::metric(agent.admin, TABLE_ANSWERS).await > 0.0 {
            return Ok(Warm {
                agent,
                imds,
                token,
                warm,
            });
        }
        if Instant::now() > deadline {
            bail!("the agent never answered from its node table (is the feed up?)");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Holds `count` idle connections from `from` to `to`; says `held N` on stdout, then
/// waits to be killed.
async fn hold(
    to: std::net::SocketAddr,
    from: std::net::IpAddr,
    count: usize,
) -> anyhow::Result<()> {
    let mut held = Vec::with_capacity(count);
    for start in (0..count).step_by(500) {
        let batch = (start..count.min(start + 500)).map(|_| imds_client::connect(from, to));
        held.extend(
            futures::future::join_all(batch)
                .await
                .into_iter()
                .filter_map(Result::ok),
        );
    }
    println!("held {}", held.len());
    std::future::pending::<()>().await;
    Ok(())
}

/// A child process holding connections (see [`hold`]); killed when dropped.
struct Holder(std::process::Child);

impl Holder {
    fn start(to: std::net::SocketAddr, from: &str, count: usize) -> anyhow::Result<(Self, usize)> {
        use std::io::BufRead;
        let mut child = Command::new(std::env::current_exe()?)
            .args(["hold", &to.to_string(), from, &count.to_string()])
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut line = String::new();
        std::io::BufReader::new(stdout).read_line(&mut line)?;
        let held = line
            .trim()
            .strip_prefix("held ")
            .and_then(|n| n.parse().ok())
            .context("the holder said nothing")?;
        Ok((Self(child), held))
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// See [`Bench::Hostile`].
async fn hostile(
    server: &Path,
    connections: usize,
    clients: usize,
    duration: Duration,
) -> anyhow::Result<()> {
    const HOSTILE: &str = "127.0.0.66";
    let stack = ServerStack::start(server, bench_cluster().await?, &[]).await?;
    let Warm {
        agent, imds, token, ..
    } = warm_agent(&stack, &server.with_file_name("podiam-agent"), &[]).await?;
    let mib = |kib: Option<u64>| kib.unwrap_or(0) as f64 / 1024.0;
    // A busy neighbour, well within --pod-request-rate: each client asks every 20 ms.
    let every = Some(Duration::from_millis(20));
    println!(
        "one node: the neighbour pod (127.0.0.1, {clients} keep-alive clients asking every 20 ms, IMDSv2 credentials) while one pod ({HOSTILE}) misbehaves; {duration:?} per case\n"
    );
    println!(
        "| case | neighbour p50 | neighbour p99 | p99 / quiet | neighbour req/s | agent RSS | agent CPU |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let mut quiet_p99 = 0.0;
    let row = |case: &str, l: &Load, rss: f64, cpu: f64, quiet: &mut f64| {
        if *quiet == 0.0 {
            *quiet = l.p99;
        }
        println!(
            "| {case} | {:.2} ms | {:.2} ms | {:.2} | {:.0} | {rss:.1} MiB | {cpu:.2} |",
            l.p50 * 1e3,
            l.p99 * 1e3,
            l.p99 / *quiet,
            l.rps
        );
    };
    let cores = |before: Duration, started: Instant| {
        agent
            .cpu_time()
            .unwrap_or_default()
            .saturating_sub(before)
            .as_secs_f64()
            / started.elapsed().as_secs_f64()
    };
    let (c0, t0) = (agent.cpu_time().unwrap_or_default(), Instant::now());
    let quiet = load_every(imds, WEB_PATH, &token, false, clients, duration, every).await?;
    row(
        "quiet",
        &quiet,
        mib(agent.rss_kib()),
        cores(c0, t0),
        &mut quiet_p99,
    );

    // Idle connections: two holders (each process has its own open-file limit).
    let half = connections / 2;
    let (a, held_a) = Holder::start(imds, HOSTILE, half)?;
    let (b, held_b) = Holder::start(imds, HOSTILE, connections - half)?;
    let (c0, t0) = (agent.cpu_time().unwrap_or_default(), Instant::now());
    let under = load_every(imds, WEB_PATH, &token, false, clients, duration, every).await?;
    let case = format!("{} idle connections held", held_a + held_b);
    row(
        &case,
        &under,
        mib(agent.rss_kib()),
        cores(c0, t0),
        &mut quiet_p99,
    );
    let refused = stack::metric(
        agent.admin,
        r#"podiam_listener_refused_total{listener="metadata",reason="per_source"}"#,
    )
    .await;
    drop((a, b));

    // Forged IMDSv2 tokens in a tight loop: 64 keep-alive connections.
    let stop = Instant::now() + duration;
    let forgers: Vec<_> = (0..64)
        .map(|_| {
            tokio::spawn(async move {
                let mut sent = 0u64;
                let Ok(stream) = imds_client::connect(HOSTILE.parse()?, imds).await else {
                    return anyhow::Ok(sent);
                };
                let (mut sender, conn) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                        .await?;
                tokio::spawn(conn);
                while Instant::now() < stop {
                    use http_body_util::{BodyExt, Empty};
                    let req = ::http::Request::get(WEB_PATH)
                        .header("x-aws-ec2-metadata-token", "forged")
                        .body(Empty::<bytes::Bytes>::new())?;
                    if sender.ready().await.is_err() {
                        break;
                    }
                    let Ok(rsp) = sender.send_request(req).await else {
                        break;
                    };
                    rsp.into_body().collect().await?;
                    sent += 1;
                }
                anyhow::Ok(sent)
            })
        })
        .collect();
    let (c0, t0) = (agent.cpu_time().unwrap_or_default(), Instant::now());
    let forged = load_every(imds, WEB_PATH, &token, false, clients, duration, every).await?;
    let cpu = cores(c0, t0);
    let mut sent = 0;
    for f in forgers {
        sent += f.await??;
    }
    let case = format!(
        "forged tokens, 64 connections ({:.0} req/s answered 401)",
        sent as f64 / duration.as_secs_f64()
    );
    row(&case, &forged, mib(agent.rss_kib()), cpu, &mut quiet_p99);
    println!(
        "\nconnections of the hostile pod closed at accept: {refused:.0}; agent peak RSS {:.1} MiB",
        mib(agent.peak_rss_kib())
    );

    // The server: one node's hostile feed subscriptions.
    let config = api_client::tls_config(&stack.pki.ca, Some(&stack.pki.client))?;
    let quiet_rss = mib(stack.server.rss_kib());
    let held = |n: usize| -> Vec<podiam_common::feed::Held> {
        (0..n)
            .map(|i| podiam_common::feed::Held {
                uid: format!("{i:0>8}"),
                version: u64::MAX,
            })
            .collect()
    };
    let oversized: Vec<_> = (0..8)
        .map(|_| {
            api_client::watch_feed(stack.api, config.clone(), Some("agent"), "", held(250_000))
        })
        .collect();
    let refused_big = futures::future::join_all(oversized)
        .await
        .into_iter()
        .filter(|r| matches!(r, Ok(Err(_))))
        .count();
    let mut open = Vec::new();
    for _ in 0..20 {
        if let Ok(Ok(stream)) =
            api_client::watch_feed(stack.api, config.clone(), Some("agent"), "", held(4096)).await
        {
            open.push(stream);
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    println!(
        "\nserver: quiet RSS {quiet_rss:.1} MiB; after 8 subscriptions of 3.75 MB ({refused_big} refused by the decoder) and 20 of a full held list from one node ({:.0} still open): {:.1} MiB",
        stack.metric("podiam_feed_streams").await,
        mib(stack.server.rss_kib()),
    );
    drop(open);
    Ok(())
}

/// The bench pod's credentials request: its status (0: no answer).
async fn web_status(imds: std::net::SocketAddr, token: String) -> u16 {
    let from = std::net::IpAddr::from([127, 0, 0, 1]);
    imds_client::request(
        from,
        imds,
        ::http::Method::GET,
        WEB_PATH,
        &[("x-aws-ec2-metadata-token", &token)],
    )
    .await
    .map(|a| a.status)
    .unwrap_or(0)
}

/// See [`Bench::Revocation`].
async fn revocation(server: &Path, changes: usize) -> anyhow::Result<()> {
    let stack = ServerStack::start(server, bench_cluster().await?, &[]).await?;
    // The agent lives as long as `_agent`.
    let Warm {
        agent: _agent,
        imds,
        token,
        ..
    } = warm_agent(&stack, &server.with_file_name("podiam-agent"), &[]).await?;
    let get = move |token: String| web_status(imds, token);
    // From `t0`, a request every 2 ms (each on its own connection, as an SDK's first
    // call): the time of the first one refused, measured from `t0`.
    let first_refusal = |t0: Instant| {
        let token = token.clone();
        async move {
            let refused = Arc::new(parking_lot::Mutex::new(None::<Duration>));
            let mut tasks = Vec::new();
            while refused.lock().is_none() && t0.elapsed() < Duration::from_secs(10) {
                let (sent, token, refused) = (t0.elapsed(), token.clone(), refused.clone());
                tasks.push(tokio::spawn(async move {
                    if get(token).await != 200 {
                        let mut r = refused.lock();
                        if r.is_none_or(|t| sent < t) {
                            *r = Some(sent);
                        }
                    }
                }));
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            futures::future::join_all(tasks).await;
            *refused.lock()
        }
    };
    let until_ok = || {
        let token = token.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            while get(token.clone()).await != 200 {
                if Instant::now() > deadline {
                    bail!("the pod never got its role back");
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            anyhow::Ok(())
        }
    };
    let permitted = |regex: &str| namespace("bench", &[("iam.amazonaws.com/permitted", regex)]);
    let web = |role: &str| {
        pod("bench", "web")
            .ip("127.0.0.1")
            .role(role)
            .node("node-a")
            .build()
    };
    let kinds = [
        "namespace policy narrowed",
        "pod annotation changed",
        "pod deleted",
    ];
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); kinds.len()];
    let mut missed = [0usize; 3];
    for i in 0..changes {
        let kind = i % kinds.len();
        let t0 = Instant::now();
        match kind {
            0 => {
                stack
                    .kube
                    .apply(permitted("arn:aws:iam::123456789012:role/nothing"));
            }
            1 => {
                stack.kube.apply(web("other"));
            }
            _ => {
                stack.kube.delete_pod("bench", "web");
            }
        }
        match first_refusal(t0).await {
            Some(t) => times[kind].push(t),
            None => missed[kind] += 1,
        }
        match kind {
            0 => {
                stack.kube.apply(permitted(".*"));
            }
            _ => {
                stack.kube.apply(web("web"));
            }
        }
        until_ok().await?;
    }
    println!(
        "{changes} writes that take the bench pod's role away, each undone before the next; from the API write to the first request the agent refuses (a request every 2 ms)\n"
    );
    println!("| change | writes | median | p99 | max | never refused in 10 s |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (kind, name) in kinds.iter().enumerate() {
        let mut t = times[kind].clone();
        if t.is_empty() {
            println!("| {name} | 0 | | | | {} |", missed[kind]);
            continue;
        }
        t.sort();
        let pct = |p: f64| t[((t.len() as f64 * p) as usize).min(t.len() - 1)];
        println!(
            "| {name} | {} | {:.1} ms | {:.1} ms | {:.1} ms | {} |",
            t.len(),
            pct(0.5).as_secs_f64() * 1e3,
            pct(0.99).as_secs_f64() * 1e3,
            t[t.len() - 1].as_secs_f64() * 1e3,
            missed[kind]
        );
    }
    Ok(())
}
const SERVER_CREDENTIALS: &str = r#"podiam_api_requests_total{endpoint="credentials",result="ok"}"#;

/// The node feed at scale: `nodes` stand-in agents, `per_node` pods each.
async fn feed(server: &Path, nodes: usize, per_node: usize) -> anyhow::Result<()> {
    let namespaces = 100;
    let kube = FakeKube::start().await?;
    for n in 0..namespaces {
        kube.apply(namespace(
            &format!("ns-{n}"),
            &[(
                "iam.amazonaws.com/permitted",
                &format!("arn:aws:iam::{ACCOUNT}:role/ns-{n}-.*"),
            )],
        ));
    }
    let mut bytes = 0;
    for i in 0..nodes * per_node {
        let pod = realistic_pod_on(i, i % namespaces, &format!("node-{}", i % nodes));
        bytes += pod.to_string().len();
        kube.apply(pod);
    }
    for n in 0..nodes {
        kube.add_token(&format!("agent-{n}"), agent_identity(&format!("node-{n}")));
    }
    kube.compact();
    let pods = nodes * per_node;
    // One session per role (namespace): the stream is measured, not moto.
    let args = ["--session-scope", "role", "--prefetch-rate", "0"];
    let stack = ServerStack::start(server, kube, &args).await?;
    let ready_rss = stack.server.rss_kib().unwrap_or(0);
    println!(
        "server {}; {pods} pods ({} B of JSON each) on {nodes} nodes, {namespaces} roles; RSS at ready {:.1} MiB\n",
        server.display(),
        bytes / pods.max(1),
        ready_rss as f64 / 1024.0
    );
    let config = tls_config(&stack.pki.ca, Some(&stack.pki.client))?;
    let cpu0 = stack.server.cpu_time().unwrap_or_default();
    let (synced, complete, streams) =
        subscribe_all(stack.api, &config, nodes, per_node, vec![Vec::new(); nodes]).await?;
    let cpu = stack
        .server
        .cpu_time()
        .unwrap_or_default()
        .saturating_sub(cpu0);
    let rss = stack.server.rss_kib().unwrap_or(0);
    let sent = stack.metric("podiam_feed_pods_sent_total").await;
    // Steady state: heartbeats only.
    let (c0, t0) = (stack.server.cpu_time().unwrap_or_default(), Instant::now());
    tokio::time::sleep(Duration::from_secs(10)).await;
    let idle = stack
        .server
        .cpu_time()
        .unwrap_or_default()
        .saturating_sub(c0)
        .as_secs_f64()
        / t0.elapsed().as_secs_f64();
    println!("| what | value |\n|---|---:|");
    println!(
        "| agents subscribed (one TLS connection and token review each) | {} |",
        stack.metric("podiam_feed_streams").await
    );
    println!("| time until every agent has synced | {:.2?} |", synced);
    println!(
        "| time until every pod's credentials reached its agent | {:.2?} |",
        complete
    );
    println!("| server CPU for that | {:.2?} |", cpu);
    println!("| pod states sent | {sent:.0} |");
    println!(
        "| server RSS with {nodes} streams | {:.1} MiB |",
        rss as f64 / 1024.0
    );
    println!("| server CPU in steady state (heartbeats) | {idle:.3} cores |");
    println!(
        "| server RSS 10 s later | {:.1} MiB |",
        stack.server.rss_kib().unwrap_or(0) as f64 / 1024.0
    );
    let held: Vec<_> = streams.into_iter().map(|(_, held)| held).collect();

    // A second replica, then the first goes: every agent resumes there with what it holds.
    let (replica, replica_api) = stack.replica_with(server, &args).await?;
    let mut stack = stack;
    stack.server.stop(Duration::from_secs(10))?;
    let sent0 = stack::metric(replica.admin, "podiam_feed_pods_sent_total").await;
    let (synced, complete, _streams) =
        subscribe_all(replica_api, &config, nodes, per_node, held).await?;
    println!(
        "| resync on a second replica after the first stopped: every agent synced | {synced:.2?} |"
    );
    println!("| resync: every pod's credentials (the replica's own sessions) | {complete:.2?} |");
    println!(
        "| resync: pod states sent (all: each replica has its own sessions, so every credential differs) | {:.0} |",
        stack::metric(replica.admin, "podiam_feed_pods_sent_total").await - sent0
    );
    println!(
        "| second replica RSS with {nodes} streams | {:.1} MiB |",
        replica.rss_kib().unwrap_or(0) as f64 / 1024.0
    );
    Ok(())
}

type Subscribed = (
    tonic::Streaming<podiam_common::feed::NodeUpdate>,
    Vec<podiam_common::feed::Held>,
);

/// Subscribes every node's agent at once; returns when each has synced and holds
/// credentials for all its pods: (time to all synced, time to all complete, the streams).
async fn subscribe_all(
    api: std::net::SocketAddr,
    config: &rustls::ClientConfig,
    nodes: usize,
    per_node: usize,
    held: Vec<Vec<podiam_common::feed::Held>>,
) -> anyhow::Result<(Duration, Duration, Vec<Subscribed>)> {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (n, held) in held.into_iter().enumerate().take(nodes) {
        let config = config.clone();
        tasks.push(tokio::spawn(async move {
            let token = format!("agent-{n}");
            let mut stream =
                podiam_tests::api_client::watch_feed(api, config, Some(&token), "", held.clone())
                    .await?
                    .map_err(|s| anyhow::anyhow!("node-{n}: {s}"))?;
            let mut pods: std::collections::HashMap<String, podiam_common::feed::PodState> = held
                .into_iter()
                .map(|h| {
                    (
                        h.uid.clone(),
                        podiam_common::feed::PodState {
                            uid: h.uid,
                            version: h.version,
                            ..Default::default()
                        },
                    )
                })
                .collect();
            let mut synced_at = None;
            loop {
                let update = tokio::time::timeout(Duration::from_secs(600), stream.message())
                    .await
                    .context("no update for 10 min")??
                    .context("stream ended")?;
                for uid in update.removed {
                    pods.remove(&uid);
                }
                for p in update.pods {
                    pods.insert(p.uid.clone(), p);
                }
                if update.synced {
                    synced_at = Some(started.elapsed());
                }
                let complete = pods.len() == per_node
                    && pods.values().all(|p| {
                        p.credentials.is_some()
                            || p.version != 0 && p.role_arn.is_empty() && p.denial.is_none()
                    });
                if let (Some(synced), true) = (synced_at, complete) {
                    let held = pods
                        .values()
                        .map(|p| podiam_common::feed::Held {
                            uid: p.uid.clone(),
                            version: p.version,
                        })
                        .collect();
                    return anyhow::Ok((synced, started.elapsed(), (stream, held)));
                }
            }
        }));
    }
    let (mut synced, mut complete, mut streams) = (Duration::ZERO, Duration::ZERO, Vec::new());
    for t in tasks {
        let (s, c, stream) = t.await??;
        synced = synced.max(s);
        complete = complete.max(c);
        streams.push(stream);
    }
    Ok((synced, complete, streams))
}

/// A real agent's RSS with `pods` pods (and their credentials) in its node table.
async fn agent_table(server: &Path, pods: usize) -> anyhow::Result<()> {
    let kube = FakeKube::start().await?;
    kube.apply(namespace("bench", &[("iam.amazonaws.com/permitted", ".*")]));
    for i in 0..pods {
        let mut pod = realistic_pod_on(i, 0, "node-a");
        pod["metadata"]["namespace"] = json!("bench");
        kube.apply(pod);
    }
    kube.add_token("agent", agent_identity("node-a"));
    let stack = ServerStack::start(server, kube, &["--prefetch-rate", "0"]).await?;
    let agent_bin = server.with_file_name("podiam-agent");
    let token_file = stack.dir.path().join("sa-token");
    std::fs::write(&token_file, "agent")?;
    let key_file = stack.dir.path().join("imds.key");
    let mut cmd = agent_command(
        &agent_bin,
        &stack.pki,
        &stack.api.to_string(),
        "127.0.0.1:9",
        &key_file,
        &token_file,
    );
    // Info for podiam_agent: the "listening" lines announce its addresses.
    cmd.args([
        "--log-level",
        "warn,podiam_agent=info",
        "--pod-sources",
        "127.0.0.0/8",
        "--interface-binding",
        "off",
    ]);
    let agent =
        tokio::task::spawn_blocking(move || Process::spawn_announcing(cmd, &["metadata endpoint"]))
            .await??;
    http::wait_ready(agent.admin, Duration::from_secs(30)).await?;
    let idle_rss = agent.rss_kib().unwrap_or(0);
    let started = Instant::now();
    loop {
        let (_, text) = http::get(agent.admin, "/metrics").await?;
        let table = metric(&text, "podiam_agent_table_pods").unwrap_or(0.0);
        let sessions = stack.metric("podiam_credential_cache_sessions").await;
        if table >= pods as f64 && sessions >= pods as f64 {
            // One more heartbeat so the last credentials have reached the agent.
            tokio::time::sleep(Duration::from_secs(6)).await;
            break;
        }
        if started.elapsed() > Duration::from_secs(300) {
            bail!("the agent's table never filled ({table} pods, {sessions} sessions)");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "| a real agent's RSS with {pods} pods and their credentials in its table (idle before: {:.1} MiB) | {:.1} MiB |",
        idle_rss as f64 / 1024.0,
        agent.rss_kib().unwrap_or(0) as f64 / 1024.0
    );
    Ok(())
}

/// Time from ready to a full session cache (one session per pod) at the default
/// --prefetch-rate, and unlimited.
async fn full_cache(server: &Path, pods: usize) -> anyhow::Result<()> {
    for rate in ["100", "0"] {
        let kube = FakeKube::start().await?;
        kube.apply(namespace("bench", &[("iam.amazonaws.com/permitted", ".*")]));
        for i in 0..pods {
            let mut pod = realistic_pod_on(i, 0, &format!("node-{}", i % 100));
            pod["metadata"]["namespace"] = json!("bench");
            kube.apply(pod);
        }
        kube.compact();
        let started = Instant::now();
        let stack = ServerStack::start(server, kube, &["--prefetch-rate", rate]).await?;
        let ready = started.elapsed();
        loop {
            let sessions = stack.metric("podiam_credential_cache_sessions").await;
            if sessions >= pods as f64 {
                break;
            }
            if started.elapsed() > Duration::from_secs(1800) {
                bail!("only {sessions} of {pods} sessions after 30 min");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let calls = stack.proxy.calls("AssumeRole");
        println!(
            "| full session cache for {pods} pods (one session each), --prefetch-rate {rate}: ready in {ready:.1?}, full {:.1?} after start | {calls} AssumeRole calls |",
            started.elapsed()
        );
    }
    Ok(())
}

/// A sandbox of its own (root only) with `per_node` more pods on each node, and load from
/// its permitted pods once every pod has been served (and how long that took).
fn under_load(
    kind: &str,
    manifest: &Path,
    per_node: usize,
    server_args: &[&str],
) -> anyhow::Result<(
    podiam_tests::chaos::Up,
    podiam_tests::chaos::Chaos,
    Duration,
)> {
    use podiam_tests::chaos::{Chaos, Up};
    if !nix::unistd::geteuid().is_root() {
        bail!("the {kind} runs a sandbox: it needs root");
    }
    let bin = std::env::current_exe()?.with_file_name("podiam-sandbox");
    let name = format!("{kind}{}", std::process::id() % 100_000);
    let up = Up::start_with(&bin, &name, manifest, per_node, server_args)?;
    let roles: Vec<&str> = up.roles.iter().map(String::as_str).collect();
    let load = Chaos::start(&bin, &name, &roles, &up.container)?;
    let Some(ready) = load.wait_served(Instant::now(), Duration::from_secs(60)) else {
        bail!("the pods did not all get their credentials within 60 s of the start");
    };
    Ok((up, load, ready))
}

/// The fault matrix against a sandbox of its own.
fn chaos(
    faults: &[String],
    hold: Duration,
    api_hold: Duration,
    per_node: usize,
    manifest: &Path,
) -> anyhow::Result<()> {
    use podiam_tests::chaos::{self, Fault};
    let faults = if faults.is_empty() {
        Fault::ALL.to_vec()
    } else {
        faults
            .iter()
            .map(|f| Fault::parse(f))
            .collect::<anyhow::Result<_>>()?
    };
    let (up, mut load, ready) = under_load("chaos", manifest, per_node, &[])?;
    let (name, started) = (up.name.clone(), Instant::now());
    load.self_check()?;
    let vitals0 = chaos::vitals(&name)?;
    println!(
        "sandbox {name}: {} pods under load on 2 nodes (a round = PUT token, GET role list, GET credentials, every {:?}); all served after {:.1} s\n",
        load.targets.len(),
        chaos::PACE,
        ready.as_secs_f64()
    );
    let mut rows = Vec::new();
    for fault in faults {
        let hold = if fault == Fault::ApiDown {
            api_hold
        } else {
            hold
        };
        let row = load.run(fault, hold, Duration::from_secs(180))?;
        eprintln!("{}", chaos::table(std::slice::from_ref(&row)));
        if let Some(example) = &row.example {
            eprintln!("{}: first wrong answer: {example}", fault.name());
        }
        rows.push(row);
    }
    let (ok, refused, failed) = load.totals();
    load.stop();
    let vitals1 = chaos::vitals(&name)?;
    println!("{}", chaos::table(&rows));
    println!(
        "all rounds: {ok} ok, {refused} refused, {failed} failed, {} wrong; in {:.0} s",
        rows.iter().map(|r| r.wrong).sum::<usize>(),
        started.elapsed().as_secs_f64()
    );
    for (what, after) in &vitals1 {
        let before = vitals0.iter().find(|(w, _)| w == what).map(|(_, v)| *v);
        println!(
            "{what}: RSS {:.1} MiB, {} tasks after the matrix (before: {})",
            after.rss_mib,
            after.tasks,
            before.map_or("-".into(), |v| format!(
                "RSS {:.1} MiB, {} tasks",
                v.rss_mib, v.tasks
            ))
        );
    }
    drop(up);
    Ok(())
}

/// The soak against a sandbox of its own.
fn soak(
    duration: Duration,
    churn: u32,
    live: u32,
    sample: Duration,
    manifest: &Path,
) -> anyhow::Result<()> {
    use podiam_tests::chaos;
    // One session per role: the cache holds what pods use, and the soak looks for leaks,
    // not for a per-pod cache filling to its session lifetime.
    let (up, mut load, _) = under_load("soak", manifest, 2, &["--session-scope=role"])?;
    let name = up.name.clone();
    load.sandbox(&["churn", &churn.to_string(), "--live", &live.to_string()])?;
    let processes: Vec<String> = chaos::vitals(&name)?.into_iter().map(|(n, _)| n).collect();
    println!(
        "sandbox {name}: {} pods under load (a round every {:?} each), {churn} pods/s created and deleted in the API server ({live} alive), for {duration:?}; sampled every {sample:?}\n",
        load.targets.len(),
        chaos::PACE,
    );
    let mut header = String::from("| min |");
    for p in &processes {
        header += &format!(" {p} RSS MiB | fds | threads | tasks |");
    }
    header += " rounds ok | refused | failed |";
    println!("{header}");
    println!("|{}", "---:|".repeat(1 + processes.len() * 4 + 3));
    let churn_started = Instant::now();
    let mut from = churn_started;
    let mut at = Duration::ZERO;
    while at <= duration {
        let mut line = format!("| {:.0} |", at.as_secs_f64() / 60.0);
        for (_, v) in chaos::vitals(&name)? {
            line += &format!(
                " {:.1} | {:.0} | {:.0} | {:.0} |",
                v.rss_mib, v.fds, v.threads, v.tasks
            );
        }
        let now = Instant::now();
        let (ok, refused, failed) = load.counts(from, now);
        from = now;
        line += &format!(" {ok} | {refused} | {failed} |");
        println!("{line}");
        at += sample;
        if at > duration {
            break;
        }
        std::thread::sleep((churn_started + at).saturating_duration_since(Instant::now()));
    }
    let made = load.sandbox(&["churn", "0"])?;
    load.stop();
    let (wrong, example) = load.wrong()?;
    let (ok, refused, failed) = load.totals();
    println!(
        "\n{}; rounds: {ok} ok, {refused} refused, {failed} failed, {wrong} wrong{}",
        made.trim(),
        example.map_or(String::new(), |e| format!(" (first: {e})"))
    );
    let gone = chaos::gone(&name)?;
    println!(
        "processes exited: {}",
        if gone.is_empty() {
            "none".into()
        } else {
            gone.join(", ")
        }
    );
    drop(up);
    Ok(())
}

/// One level's numbers.
struct Load {
    rps: f64,
    p50: f64,
    p99: f64,
    p999: f64,
}

struct Round {
    floor: Load,
    agent: Load,
    agent_cpu: f64,
    server_cpu: f64,
}

/// `clients` keep-alive clients against `addr` for `duration`, each as fast as it is
/// answered.
async fn load(
    addr: std::net::SocketAddr,
    path: &'static str,
    token: &str,
    fresh_token: bool,
    clients: usize,
    duration: Duration,
) -> anyhow::Result<Load> {
    load_every(addr, path, token, fresh_token, clients, duration, None).await
}

/// [`load`], each client asking once per `every` at most (`None`: at once again).
async fn load_every(
    addr: std::net::SocketAddr,
    path: &'static str,
    token: &str,
    fresh_token: bool,
    clients: usize,
    duration: Duration,
    every: Option<Duration>,
) -> anyhow::Result<Load> {
    let started = Instant::now();
    let deadline = started + duration;
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let token = token.to_string();
            tokio::spawn(async move {
                pod_client(addr, path, token, fresh_token, deadline, every).await
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let wall = started.elapsed();
    let (p50, p99, p999) = percentiles(&mut all);
    Ok(Load {
        rps: all.len() as f64 / wall.as_secs_f64(),
        p50: p50.as_secs_f64(),
        p99: p99.as_secs_f64(),
        p999: p999.as_secs_f64(),
    })
}

/// Median, min and max.
fn spread(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

/// The floor: a bare hyper HTTP/1.1 server answering the same bytes to every request, with
/// the same runtime as the agent (multi-threaded tokio). Announces its address like the
/// podiam binaries (`floor listening`, and an `admin server` line for [`Process`]).
async fn floor(body: &Path, token: &Path) -> anyhow::Result<()> {
    use hyper::service::service_fn;
    let body = bytes::Bytes::from(std::fs::read(body)?);
    let token = bytes::Bytes::from(std::fs::read(token)?);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    eprintln!(
        "{}",
        json!({"message": "admin server listening", "addr": addr.to_string()})
    );
    eprintln!(
        "{}",
        json!({"message": "floor listening", "addr": addr.to_string()})
    );
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        let (body, token) = (body.clone(), token.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req: ::http::Request<hyper::body::Incoming>| {
                let answer = if req.method() == ::http::Method::PUT {
                    token.clone()
                } else {
                    body.clone()
                };
                async move {
                    let mut rsp = ::http::Response::new(http_body_util::Full::new(answer));
                    rsp.headers_mut().insert(
                        ::http::header::CONTENT_TYPE,
                        ::http::HeaderValue::from_static("text/plain"),
                    );
                    Ok::<_, std::convert::Infallible>(rsp)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                .await;
        });
    }
}

/// One keep-alive HTTP/1.1 connection from the pod's address, requesting until `deadline`.
async fn pod_client(
    imds: std::net::SocketAddr,
    path: &'static str,
    token: String,
    fresh_token: bool,
    deadline: Instant,
    every: Option<Duration>,
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
        if let Some(every) = every {
            tokio::time::sleep_until((t + every).into()).await;
        }
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
        let cmd = index_server(server, &kubeconfig, &pki);
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

/// The server command of `index` and `churn`: the index alone (no STS: prefetch off,
/// endpoint refusing), API on loopback.
fn index_server(server: &Path, kubeconfig: &Path, pki: &Pki) -> Command {
    let mut cmd = Command::new(server);
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
        .arg(kubeconfig);
    cmd
}

/// Server RSS while pods come and go: `rate` creations and deletions per simulated second
/// for `simulated`, replayed `speed` times faster, with `pods` present throughout.
async fn churn(
    server: &Path,
    pods: usize,
    namespaces: usize,
    rate: usize,
    simulated: Duration,
    speed: usize,
) -> anyhow::Result<()> {
    let kube = FakeKube::start().await?;
    for n in 0..namespaces {
        kube.apply(namespace(
            &format!("ns-{n}"),
            &[(
                "iam.amazonaws.com/permitted",
                &format!("arn:aws:iam::{ACCOUNT}:role/ns-{n}-.*"),
            )],
        ));
    }
    let mut live = std::collections::VecDeque::new();
    for i in 0..pods {
        let ns = i % namespaces.max(1);
        kube.apply(realistic_pod(i, ns));
        live.push_back((format!("ns-{ns}"), format!("app-{i}-7d9f8c6b5-x2k4p")));
    }
    kube.compact();
    let dir = tempfile::tempdir()?;
    let kubeconfig = dir.path().join("kubeconfig");
    kube.write_kubeconfig(&kubeconfig)?;
    let pki = Pki::generate(dir.path(), "bench")?;
    let cmd = index_server(server, &kubeconfig, &pki);
    let process = tokio::task::spawn_blocking(move || Process::spawn(cmd)).await??;
    http::wait_ready(process.admin, Duration::from_secs(600)).await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss = |p: &Process| p.rss_kib().unwrap_or(0) as f64 / 1024.0;
    let start_rss = rss(&process);
    let total = rate * simulated.as_secs() as usize;
    println!(
        "server {}; {pods} pods in {namespaces} namespaces; {rate} pods/s created and deleted for {simulated:?} simulated ({total} of each), replayed {speed}x",
        server.display()
    );
    println!(
        "\n| simulated time | pods created and deleted | server RSS | peak RSS | pods indexed |"
    );
    println!("|---:|---:|---:|---:|---:|");
    println!(
        "| 0 min | 0 | {start_rss:.1} MiB | {:.1} MiB | {pods} |",
        process.peak_rss_kib().unwrap_or(0) as f64 / 1024.0
    );
    // Every 10 ms of real time: rate * speed / 100 pods replaced.
    let tick = Duration::from_millis(10);
    let per_tick = (rate * speed).div_ceil(100).max(1);
    let sample_every = (rate * 300).max(1); // every 5 simulated minutes
    let started = Instant::now();
    let mut next = pods;
    let mut done = 0;
    let mut interval = tokio::time::interval(tick);
    while done < total {
        interval.tick().await;
        for _ in 0..per_tick.min(total - done) {
            if let Some((ns, name)) = live.pop_front() {
                kube.delete_pod(&ns, &name);
            }
            let ns = next % namespaces.max(1);
            kube.apply(realistic_pod(next, ns));
            live.push_back((format!("ns-{ns}"), format!("app-{next}-7d9f8c6b5-x2k4p")));
            next += 1;
            done += 1;
            if done % sample_every == 0 {
                let (_, metrics) = http::get(process.admin, "/metrics").await?;
                println!(
                    "| {} min | {done} | {:.1} MiB | {:.1} MiB | {} |",
                    done / rate / 60,
                    rss(&process),
                    process.peak_rss_kib().unwrap_or(0) as f64 / 1024.0,
                    metric(&metrics, "podiam_pod_index_pods").unwrap_or(0.0)
                );
            }
        }
        // An API server's watch cache keeps a bounded history too.
        kube.trim_history(50_000);
    }
    let replay = started.elapsed();
    // Let the server catch up, then settle.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, metrics) = http::get(process.admin, "/metrics").await?;
        if metric(&metrics, "podiam_pod_index_pods") == Some(pods as f64)
            || Instant::now() > deadline
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let end_rss = rss(&process);
    println!(
        "\nreplayed in {replay:.1?}; RSS {start_rss:.1} MiB before, {end_rss:.1} MiB after ({:+.1} %)",
        (end_rss / start_rss - 1.0) * 100.0
    );
    Ok(())
}

/// AssumeRole calls of the broker for `pods` pods over `roles` roles across `hours`
/// simulated hours, each pod asking the way SDKs do (again 15 minutes before its
/// credentials expire), in both session scopes; and 1,000 concurrent cold requests.
async fn sts(pods: usize, roles: usize, hours: u64) -> anyhow::Result<()> {
    use podiam_server::sts::{Broker, BrokerConfig, SessionKey, metrics::BrokerMetrics};
    use podiam_tests::fake_sts::{FakeSts, TokioClock};
    use std::sync::Arc;

    const MIN: Duration = Duration::from_secs(60);
    let config = BrokerConfig::default();
    let duration = 60 * MIN;
    let period = duration - config.refresh_before;
    let start = |delay| {
        let clock = Arc::new(TokioClock::new());
        let fake = Arc::new(FakeSts::new(clock.clone(), delay));
        let shutdown = tokio_util::sync::CancellationToken::new();
        let broker = Broker::new(
            fake.clone(),
            clock.clone(),
            config.clone(),
            BrokerMetrics::register(&prometheus::Registry::new())?,
            shutdown.clone(),
        );
        anyhow::Ok((clock, fake, broker, shutdown.drop_guard()))
    };
    let key = |role: usize, session: String| {
        anyhow::Ok(SessionKey {
            role_arn: format!("arn:aws:iam::{ACCOUNT}:role/role-{role}").parse()?,
            external_id: None,
            session_name: session.into(),
            duration,
            tags: Arc::new([]),
            transitive_tags: false,
            chained_from: None,
        })
    };

    // Single flight: 1,000 concurrent requests for a cold session.
    let (_, fake, broker, _guard) = start(Duration::from_millis(200))?;
    let cold = key(0, "team.web".into())?;
    let waiting: Vec<_> = (0..1000)
        .map(|_| {
            let (b, k) = (broker.clone(), cold.clone());
            tokio::spawn(async move { b.credentials(&k).await })
        })
        .collect();
    for w in waiting {
        w.await??;
    }
    println!(
        "1,000 concurrent cold requests for one session: {} AssumeRole call(s)\n",
        fake.calls()
    );

    println!(
        "{pods} pods over {roles} roles, {hours} simulated hours, sessions of {} min refreshed {} min before expiry (one call per {} min per session in use)\n",
        duration.as_secs() / 60,
        config.refresh_before.as_secs() / 60,
        period.as_secs() / 60
    );
    // Steady state: whole refresh periods after the first hour (pods start within a
    // minute and their SDKs drift by up to a minute: 2 minutes of slack at the end).
    let periods = (hours.saturating_sub(1) * 60).saturating_sub(2) / (period.as_secs() / 60);
    let window = Duration::from_secs(3600) + period * periods as u32 + 2 * MIN;
    println!(
        "| session scope | sessions | calls in hour 1 (cold) | calls in the next {periods} refresh periods ({} min) | ideal (one per session per period) | calls / ideal |",
        periods * period.as_secs() / 60
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for scope in ["role", "pod"] {
        let (clock, fake, broker, _guard) = start(Duration::from_millis(50))?;
        let horizon = tokio::time::Instant::now() + Duration::from_secs(hours * 3600);
        let sessions = if scope == "role" { roles } else { pods };
        let keys = (0..pods)
            .map(|i| {
                if scope == "role" {
                    key(i % roles, format!("podiam-role-{}", i % roles))
                } else {
                    key(i % roles, format!("team.pod-{i}"))
                }
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let tasks: Vec<_> = keys
            .into_iter()
            .enumerate()
            .map(|(i, k)| {
                let (broker, clock) = (broker.clone(), clock.clone());
                // Pods start within the first minute, and SDKs' clocks drift by seconds.
                let offset = Duration::from_millis((i as u64 * 60_000) / pods.max(1) as u64);
                let skew = Duration::from_secs(i as u64 % 60);
                tokio::spawn(async move {
                    tokio::time::sleep(offset).await;
                    loop {
                        let c = broker.credentials(&k).await?;
                        let left = c
                            .expiration
                            .duration_since(podiam_server::sts::Clock::now(&*clock))
                            .unwrap_or_default();
                        let next = tokio::time::Instant::now()
                            + left.saturating_sub(15 * MIN).saturating_sub(skew);
                        if next >= horizon {
                            return anyhow::Ok(());
                        }
                        tokio::time::sleep_until(next).await;
                    }
                })
            })
            .collect();
        let t0 = tokio::time::Instant::now();
        tokio::time::sleep_until(t0 + Duration::from_secs(3600)).await;
        let first = fake.calls();
        tokio::time::sleep_until(t0 + window).await;
        let steady = fake.calls() - first;
        for t in tasks {
            t.await??;
        }
        let ideal = sessions as u64 * periods;
        println!(
            "| {scope} | {sessions} | {first} | {steady} | {ideal} | {:.3} |",
            steady as f64 / ideal.max(1) as f64
        );
    }
    Ok(())
}

/// Share of new pods whose first request finds their session ready.
async fn prefetch(
    server: &Path,
    rates: &[u32],
    pods: usize,
    sts_delay: Duration,
    first_request_after: Duration,
    concurrency: &[usize],
) -> anyhow::Result<()> {
    println!(
        "server {}; STS = moto + {sts_delay:?}; each pod's first request {first_request_after:?} after it appears with its IP; served from cache = answered in under {:?}\n",
        server.display(),
        sts_delay / 2
    );
    println!(
        "| pods/s | --prefetch-concurrency | pods | first requests served from cache | p50 | p99 | max | AssumeRole calls | prefetch queue at the end |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for &rate in rates {
        for &parallel in concurrency {
            let parallel_arg = parallel.to_string();
            let stack = ServerStack::start(
                server,
                bench_cluster().await?,
                &["--prefetch-concurrency", &parallel_arg],
            )
            .await?;
            stack
                .proxy
                .set_mode(podiam_tests::sts_proxy::Mode::Delay(sts_delay));
            let config = tls_config(&stack.pki.ca, Some(&stack.pki.client))?;
            let client = ApiClient::connect(stack.api, config).await?;
            let calls0 = stack.proxy.calls("AssumeRole");
            let started = Instant::now();
            let mut tasks = Vec::new();
            for i in 0..pods {
                let at = started + Duration::from_secs_f64(i as f64 / f64::from(rate));
                tokio::time::sleep_until(at.into()).await;
                let ip = format!("100.65.{}.{}", i / 250, i % 250 + 1);
                stack.kube.apply(
                    pod("bench", &format!("new-{i}"))
                        .ip(&ip)
                        .role("web")
                        .node("node-a")
                        .build(),
                );
                let mut client = client.clone();
                tasks.push(tokio::spawn(async move {
                    tokio::time::sleep(first_request_after).await;
                    let t = Instant::now();
                    let (status, v) = client
                        .post(
                            "/v1/credentials",
                            Some("agent"),
                            json!({"ip": ip, "role": "web"}),
                        )
                        .await?;
                    if status != 200 {
                        bail!("pod {i}: {status} {v}");
                    }
                    anyhow::Ok(t.elapsed())
                }));
            }
            let mut latencies = Vec::new();
            for t in tasks {
                latencies.push(t.await??);
            }
            let warm = latencies.iter().filter(|l| **l < sts_delay / 2).count();
            let (p50, p99, _) = percentiles(&mut latencies);
            println!(
                "| {rate} | {parallel} | {pods} | {:.1} % | {p50:.2?} | {p99:.2?} | {:.2?} | {} | {} |",
                warm as f64 * 100.0 / pods as f64,
                latencies.last().copied().unwrap_or_default(),
                stack.proxy.calls("AssumeRole") - calls0,
                stack.metric("podiam_prefetch_queue_depth").await,
            );
        }
    }
    Ok(())
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// A pod as a Deployment creates it, with the fields a real API server returns.
fn realistic_pod(i: usize, ns: usize) -> Value {
    realistic_pod_on(i, ns, &format!("node-{}", i % 500))
}

/// A pod as an API server holds it (~5.7 KB of JSON: an app container and a sidecar,
/// managed fields, conditions, statuses), on `node`.
fn realistic_pod_on(i: usize, ns: usize, node: &str) -> Value {
    let ip = format!("100.{}.{}.{}", 64 + (i >> 16), (i >> 8) & 255, i & 255);
    let name = format!("app-{i}-7d9f8c6b5-x2k4p");
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
            }, {
                "name": "proxy", "image": "registry.example/mesh/proxyv2:1.24.1", "imagePullPolicy": "IfNotPresent",
                "args": ["proxy", "sidecar", "--domain", "$(POD_NAMESPACE).svc.cluster.local", "--proxyLogLevel=warning", "--proxyComponentLogLevel=misc:error", "--log_output_level=default:info"],
                "ports": [{"containerPort": 15090, "name": "http-envoy-prom", "protocol": "TCP"}],
                "env": [
                    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}},
                    {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}},
                    {"name": "INSTANCE_IP", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "status.podIP"}}},
                    {"name": "SERVICE_ACCOUNT", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "spec.serviceAccountName"}}},
                    {"name": "HOST_IP", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "status.hostIP"}}},
                    {"name": "PROXY_CONFIG", "value": "{\"holdApplicationUntilProxyStarts\":true}"},
                    {"name": "ISTIO_META_APP_CONTAINERS", "value": "app"},
                    {"name": "ISTIO_META_CLUSTER_ID", "value": "Kubernetes"},
                    {"name": "ISTIO_META_WORKLOAD_NAME", "value": format!("app-{i}")}
                ],
                "resources": {"requests": {"cpu": "10m", "memory": "40Mi"}, "limits": {"cpu": "2", "memory": "1Gi"}},
                "readinessProbe": {"httpGet": {"path": "/healthz/ready", "port": 15021, "scheme": "HTTP"}, "periodSeconds": 15, "failureThreshold": 4},
                "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}, "readOnlyRootFilesystem": true, "runAsNonRoot": true, "runAsUser": 1337},
                "volumeMounts": [
                    {"name": "workload-socket", "mountPath": "/var/run/secrets/workload-spiffe-uds"},
                    {"name": "istio-envoy", "mountPath": "/etc/istio/proxy"},
                    {"name": "kube-api-access", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true}
                ],
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
            }, {
                "name": "proxy", "ready": true, "started": true, "restartCount": 0,
                "image": "registry.example/mesh/proxyv2:1.24.1",
                "imageID": "registry.example/mesh/proxyv2@sha256:9a8b7c6d5e4f30211a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7081",
                "containerID": "containerd://0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9",
                "state": {"running": {"startedAt": "2026-11-01T00:00:03Z"}}, "lastState": {}
            }]
        }
    })
}
