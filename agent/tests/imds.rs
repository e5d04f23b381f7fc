//! The agent end to end on loopback: real `podiam-agent` and `podiam-server` binaries,
//! moto as STS, the stand-in API server, and a stand-in for the node's real metadata
//! service holding the node's secrets. Callers are told apart by their source address
//! (127.0.0.x), each one a pod; real AWS SDKs are among them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use ::http::Method;
use podiam_tests::{
    fake_imds::{FakeImds, NODE_ROLE, NODE_SECRET, NODE_SIGNED, NODE_TAG, USER_DATA},
    http,
    imds_client::{self, Answer},
    kube_api::FakeKube,
    objects::{TeamA, pod, team_a},
    process::Process,
    stack::{ServerStack, agent_command, agent_identity, metric, sibling},
};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_podiam-agent");
const AGENT_TOKEN: &str = "token-agent-node-a";

const WEB: &str = "127.0.0.2";
const FORBIDDEN: &str = "127.0.0.3";
const OTHER_NODE: &str = "127.0.0.4";
const SDK: &str = "127.0.0.1";
const NOBODY: &str = "127.0.0.9";

struct Node {
    stack: ServerStack,
    upstream: FakeImds,
    agent: Process,
    imds: SocketAddr,
    key_file: PathBuf,
    token_file: PathBuf,
}

async fn node(extra: &[&str]) -> Node {
    let kube = FakeKube::start().await.unwrap();
    for object in team_a(TeamA {
        web: WEB,
        denied: FORBIDDEN,
        other_node: OTHER_NODE,
    }) {
        kube.apply(object);
    }
    kube.apply(
        pod("team-a", "sdk")
            .ip(SDK)
            .role("web-sdk")
            .node("node-a")
            .build(),
    );
    kube.add_token(AGENT_TOKEN, agent_identity("node-a"));
    let server = sibling(BIN, "podiam-server");
    let stack = ServerStack::start(&server, kube, &[])
        .await
        .expect("server stack (run scripts/setup)");
    let upstream = FakeImds::start().await.unwrap();
    let key_file = stack.dir.path().join("imds.key");
    let token_file = stack.dir.path().join("sa-token");
    std::fs::write(&token_file, AGENT_TOKEN).unwrap();
    let (agent, imds) = start_agent(&stack, &upstream, &key_file, &token_file, extra).await;
    Node {
        stack,
        upstream,
        agent,
        imds,
        key_file,
        token_file,
    }
}

async fn start_agent(
    stack: &ServerStack,
    upstream: &FakeImds,
    key_file: &Path,
    token_file: &Path,
    extra: &[&str],
) -> (Process, SocketAddr) {
    let servers = stack.api.to_string();
    start_agent_for(&servers, stack, upstream, key_file, token_file, extra).await
}

async fn start_agent_for(
    servers: &str,
    stack: &ServerStack,
    upstream: &FakeImds,
    key_file: &Path,
    token_file: &Path,
    extra: &[&str],
) -> (Process, SocketAddr) {
    let metadata = upstream.addr.to_string();
    let mut cmd = agent_command(
        Path::new(BIN),
        &stack.pki,
        servers,
        &metadata,
        key_file,
        token_file,
    );
    // Loopback callers stand for pods, unless the test says otherwise.
    if !extra.contains(&"--pod-sources") {
        cmd.args(["--pod-sources", "127.0.0.0/8"]);
    }
    cmd.args(extra);
    let agent =
        tokio::task::spawn_blocking(move || Process::spawn_announcing(cmd, &["metadata endpoint"]))
            .await
            .unwrap()
            .unwrap();
    http::wait_ready(agent.admin, Duration::from_secs(20))
        .await
        .unwrap();
    let imds = agent.addr("metadata endpoint").unwrap();
    (agent, imds)
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

impl Node {
    async fn get(&self, from: &str, path: &str, token: Option<&str>) -> Answer {
        let headers: Vec<(&str, &str)> = token
            .map(|t| ("x-aws-ec2-metadata-token", t))
            .into_iter()
            .collect();
        imds_client::request(ip(from), self.imds, Method::GET, path, &headers)
            .await
            .unwrap()
    }

    async fn token(&self, from: &str) -> String {
        let a = imds_client::request(
            ip(from),
            self.imds,
            Method::PUT,
            "/latest/api/token",
            &[("x-aws-ec2-metadata-token-ttl-seconds", "21600")],
        )
        .await
        .unwrap();
        assert_eq!(a.status, 200, "{a:?}");
        a.body
    }
}

const CREDS: &str = "/latest/meta-data/iam/security-credentials/";

#[tokio::test]
async fn imdsv2_gives_a_pod_its_own_credentials_in_the_sdk_format() {
    let n = node(&[]).await;
    let put = imds_client::request(
        ip(WEB),
        n.imds,
        Method::PUT,
        "/latest/api/token",
        &[("x-aws-ec2-metadata-token-ttl-seconds", "21600")],
    )
    .await
    .unwrap();
    assert_eq!(put.status, 200);
    assert_eq!(put.headers["x-aws-ec2-metadata-token-ttl-seconds"], "21600");
    assert_eq!(put.headers["server"], "EC2ws");
    let token = put.body;

    let list = n.get(WEB, CREDS, Some(&token)).await;
    assert_eq!((list.status, list.body.as_str()), (200, "web"));
    assert_eq!(list.headers["content-type"], "text/plain");
    let moved = n.get(WEB, CREDS.trim_end_matches('/'), Some(&token)).await;
    assert_eq!(moved.status, 301);
    assert_eq!(moved.headers["location"], CREDS);

    for path in [format!("{CREDS}web"), format!("{CREDS}web/")] {
        let c = n.get(WEB, &path, Some(&token)).await;
        assert_eq!(c.status, 200, "{path}: {c:?}");
        let doc: Value = serde_json::from_str(&c.body).unwrap();
        let mut keys: Vec<&str> = doc
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "AccessKeyId",
                "Code",
                "Expiration",
                "LastUpdated",
                "SecretAccessKey",
                "Token",
                "Type"
            ]
        );
        assert_eq!(doc["Code"], "Success");
        assert_eq!(doc["Type"], "AWS-HMAC");
        assert!(doc["Expiration"].as_str().unwrap().ends_with('Z'));
        assert_ne!(doc["SecretAccessKey"], NODE_SECRET);
    }
    let ext = n
        .get(
            WEB,
            "/latest/meta-data/iam/security-credentials-extended/web",
            Some(&token),
        )
        .await;
    assert_eq!(ext.status, 200);
    let doc: Value = serde_json::from_str(&ext.body).unwrap();
    assert_eq!(doc["AccountId"], "123456789012");

    // Not its role, not its token, a bad token.
    assert_eq!(
        n.get(WEB, &format!("{CREDS}admin"), Some(&token))
            .await
            .status,
        404
    );
    assert_eq!(
        n.get(WEB, &format!("{CREDS}{NODE_ROLE}"), Some(&token))
            .await
            .status,
        404
    );
    assert_eq!(n.get(FORBIDDEN, CREDS, Some(&token)).await.status, 401);
    assert_eq!(
        n.get(WEB, CREDS, Some("v1.99999999999.AAAA")).await.status,
        401
    );
    // IMDSv1 is allowed here.
    assert_eq!(n.get(WEB, CREDS, None).await.status, 200);
}

#[tokio::test]
async fn token_requests_follow_the_real_service() {
    let n = node(&[]).await;
    let put = |headers: Vec<(&'static str, &'static str)>| {
        let to = n.imds;
        async move {
            imds_client::request(ip(WEB), to, Method::PUT, "/latest/api/token", &headers)
                .await
                .unwrap()
                .status
        }
    };
    assert_eq!(put(vec![]).await, 400);
    assert_eq!(
        put(vec![("x-aws-ec2-metadata-token-ttl-seconds", "0")]).await,
        400
    );
    assert_eq!(
        put(vec![("x-aws-ec2-metadata-token-ttl-seconds", "21601")]).await,
        400
    );
    assert_eq!(
        put(vec![("x-aws-ec2-metadata-token-ttl-seconds", "ten")]).await,
        400
    );
    assert_eq!(
        put(vec![
            ("x-aws-ec2-metadata-token-ttl-seconds", "60"),
            ("x-forwarded-for", "10.1.1.1")
        ])
        .await,
        403
    );
    assert_eq!(
        put(vec![("x-aws-ec2-metadata-token-ttl-seconds", "1")]).await,
        200
    );
    assert_eq!(n.get(WEB, "/latest/api/token", None).await.status, 405);
    let post = imds_client::request(ip(WEB), n.imds, Method::POST, CREDS, &[])
        .await
        .unwrap();
    assert_eq!(post.status, 405);
    let delete = imds_client::request(ip(WEB), n.imds, Method::DELETE, "/latest/api/token", &[])
        .await
        .unwrap();
    assert_eq!(delete.status, 405);
}

#[tokio::test]
async fn tokens_survive_an_agent_restart_and_v1_can_be_refused() {
    let n = node(&["--require-imdsv2"]).await;
    let token = n.token(WEB).await;
    assert_eq!(n.get(WEB, CREDS, None).await.status, 401, "v1 refused");
    assert_eq!(n.get(WEB, CREDS, Some(&token)).await.status, 200);
    let Node {
        stack,
        upstream,
        agent,
        key_file,
        token_file,
        ..
    } = n;
    tokio::task::spawn_blocking(move || agent.terminate(Duration::from_secs(10)))
        .await
        .unwrap()
        .unwrap();
    let (_agent, imds) = start_agent(
        &stack,
        &upstream,
        &key_file,
        &token_file,
        &["--require-imdsv2"],
    )
    .await;
    let again = imds_client::request(
        ip(WEB),
        imds,
        Method::GET,
        CREDS,
        &[("x-aws-ec2-metadata-token", &token)],
    )
    .await
    .unwrap();
    assert_eq!(
        (again.status, again.body.as_str()),
        (200, "web"),
        "token from before the restart"
    );
}

#[tokio::test]
async fn refusals_map_to_metadata_answers() {
    let n = node(&[]).await;
    let forbidden = n.get(FORBIDDEN, &format!("{CREDS}admin"), None).await;
    assert_eq!(forbidden.status, 403);
    assert!(
        forbidden.body.contains("Warning Events"),
        "says what to do: {}",
        forbidden.body
    );
    // Nothing of the policy, other pods or nodes: that goes to Events and the server log.
    for secret in [
        "permitted",
        "web.*",
        "arn:aws:iam",
        "team-a",
        "admin",
        "node-a",
        "web-0",
    ] {
        assert!(
            !forbidden.body.contains(secret),
            "{secret:?} in {}",
            forbidden.body
        );
    }
    let started = Instant::now();
    assert_eq!(n.get(NOBODY, CREDS, None).await.status, 404);
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "the server waited for the pod"
    );
    // The node's own address (hostNetwork pods) is nobody's: answered at once.
    let started = Instant::now();
    assert_eq!(
        n.get(&n.imds.ip().to_string(), CREDS, None).await.status,
        404
    );
    assert!(
        started.elapsed() < Duration::from_millis(300),
        "no wait for a pod"
    );
    // Traffic from a pod the server places on another node: no node is named.
    let other = n.get(OTHER_NODE, CREDS, None).await;
    assert_eq!(other.status, 403);
    assert!(
        !other.body.contains("node-a")
            && !other.body.contains("node-b")
            && !other.body.contains("web-b"),
        "{}",
        other.body
    );
}

#[tokio::test]
async fn only_allow_listed_paths_reach_the_real_service() {
    let n = node(&[]).await;
    let id = n.get(WEB, "/latest/meta-data/instance-id", None).await;
    assert_eq!((id.status, id.body.as_str()), (200, "i-0123456789abcdef0"));
    let az = n
        .get(WEB, "/latest/meta-data/placement/availability-zone/", None)
        .await;
    assert_eq!((az.status, az.body.as_str()), (200, "us-east-1a"));
    // The unsigned identity document describes the instance and authenticates nothing.
    let doc = n
        .get(WEB, "/latest/dynamic/instance-identity/document", None)
        .await;
    assert_eq!(doc.status, 200, "{}", doc.body);
    for refused in [
        "/latest/user-data",
        "/latest/meta-data/iam/info",
        "/latest/meta-data/hostname",
        "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
    ] {
        assert_eq!(n.get(WEB, refused, None).await.status, 404, "{refused}");
    }
    let seen = n.upstream.seen();
    assert!(
        seen.iter()
            .all(|s| !s.path.contains("user-data") && !s.path.contains("/iam/")),
        "{seen:?}"
    );
    for s in seen.iter().filter(|s| s.method == "GET") {
        assert!(s.headers.contains_key("x-aws-ec2-metadata-token"), "{s:?}");
        assert!(!s.headers.contains_key("x-forwarded-for"), "{s:?}");
    }
}

#[tokio::test]
async fn hostile_requests_get_nothing_they_should_not() {
    let n = node(&[]).await;
    let token = n.token(WEB).await;
    let long = format!("/latest/meta-data/{}", "a/".repeat(1000));
    let paths = [
        "/latest/meta-data/../user-data",
        "/latest/meta-data/%2e%2e/user-data",
        "/latest/meta-data/%2E%2E/%2E%2E/latest/user-data",
        "/latest/meta-data%2f..%2fuser-data",
        "//latest//user-data",
        "/latest/./user-data/",
        "/latest/meta-data/iam/security-credentials/../info",
        "/latest/meta-data/iam/security-credentials/%2e%2e/info",
        "/latest/meta-data/iam/security-credentials/node-instance-role",
        "/latest/meta-data/iam/security-credentials-extended/node-instance-role",
        "/latest/meta-data/placement/region/../../iam/info",
        "/latest/meta-data/%252e%252e/user-data",
        "/latest/meta-data/%00/instance-id",
        "/latest/user-data%3F",
        "/latest/meta-data/iam%3Finfo",
        "/latest/user-data%23",
        "/2009-04-04/user-data",
        "/latest/../../../etc/passwd",
        "/latest/USER-DATA",
        "/latest/Meta-Data/IAM/info",
        "/latest/dynamic/instance-identity/pkcs7",
        "/latest/dynamic/instance-identity/signature",
        "/latest/dynamic/instance-identity/rsa2048",
        "/latest/meta-data/tags/instance/Name",
        "/latest/meta-data/instance-id;x=1",
        long.as_str(),
    ];
    for path in paths {
        for t in [None, Some(token.as_str())] {
            let a = n.get(WEB, path, t).await;
            assert!(a.status >= 400, "{path}: {} {}", a.status, a.body);
            assert!(
                !a.body.contains(NODE_SECRET)
                    && !a.body.contains("NODE-USER-DATA")
                    && !a.body.contains(NODE_SIGNED)
                    && !a.body.contains(NODE_TAG),
                "{path}: {}",
                a.body
            );
        }
    }
    // Oversized headers are refused before routing.
    let big = "x".repeat(20 * 1024);
    let raw = format!("GET {CREDS} HTTP/1.1\r\nHost: 169.254.169.254\r\nX-Big: {big}\r\n\r\n");
    let answer = imds_client::raw(ip(WEB), n.imds, raw.as_bytes(), 1 << 16)
        .await
        .unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 431") || answer.is_empty(),
        "{answer}"
    );
    // HTTP/1.0 works, and pipelined requests are answered in order, each on its own merit.
    let answer = imds_client::raw(
        ip(WEB),
        n.imds,
        b"GET /latest/meta-data/iam/security-credentials/ HTTP/1.0\r\n\r\n",
        1 << 16,
    )
    .await
    .unwrap();
    assert!(
        answer.starts_with("HTTP/1.0 200") && answer.ends_with("web"),
        "{answer}"
    );
    let pipelined = format!(
        "GET {CREDS} HTTP/1.1\r\nHost: a\r\n\r\nGET /latest/user-data HTTP/1.1\r\nHost: a\r\n\r\nGET {CREDS}web HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    );
    let answer = imds_client::raw(ip(WEB), n.imds, pipelined.as_bytes(), 1 << 16)
        .await
        .unwrap();
    let statuses: Vec<&str> = answer.matches("HTTP/1.1 ").map(|_| "").collect();
    assert_eq!(statuses.len(), 3, "{answer}");
    let order: Vec<usize> = ["HTTP/1.1 200", "HTTP/1.1 404", "AccessKeyId"]
        .iter()
        .map(|m| answer.find(m).unwrap_or(usize::MAX))
        .collect();
    assert!(order[0] < order[1] && order[1] < order[2], "{answer}");
    assert!(!answer.contains(USER_DATA));
    // Spoofing the caller through headers changes nothing: the source address is the caller.
    let spoof = imds_client::request(
        ip(FORBIDDEN),
        n.imds,
        Method::GET,
        &format!("{CREDS}web"),
        &[("x-forwarded-for", WEB), ("x-real-ip", WEB)],
    )
    .await
    .unwrap();
    assert_ne!(spoof.status, 200);
}

#[tokio::test]
async fn server_outage_closes_readiness_but_the_agent_stays_up() {
    let n = node(&[]).await;
    assert_eq!(n.get(WEB, CREDS, None).await.status, 200);
    let Node {
        stack,
        agent,
        imds,
        upstream: _upstream,
        ..
    } = n;
    drop(stack); // the server (and everything behind it) goes away
    let deadline = Instant::now() + Duration::from_secs(20);
    while http::get(agent.admin, "/readyz").await.unwrap().0 != 503 {
        assert!(Instant::now() < deadline, "readiness never closed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let a = imds_client::request(ip(WEB), imds, Method::GET, CREDS, &[])
        .await
        .unwrap();
    assert_eq!(a.status, 503, "SDKs retry on 503");
    assert_eq!(
        metric(agent.admin, "podiam_agent_servers_healthy").await,
        0.0
    );
    assert_eq!(
        http::get(agent.admin, "/healthz").await.unwrap().0,
        200,
        "still alive"
    );
}

/// Runs a program from the project's venv as a pod: `env -i`, no AWS config, the metadata
/// endpoint pointed at the agent, STS at moto.
fn sdk_command(n: &Node, program: &str, v1_disabled: bool) -> Command {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin");
    let mut cmd = Command::new(venv.join(program));
    cmd.env_clear()
        .env("PATH", &venv)
        .env("HOME", n.stack.dir.path())
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env(
            "AWS_EC2_METADATA_SERVICE_ENDPOINT",
            format!("http://{}", n.imds),
        )
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .env("AWS_ENDPOINT_URL_STS", n.stack.moto.url());
    if v1_disabled {
        cmd.env("AWS_EC2_METADATA_V1_DISABLED", "true");
    }
    cmd
}

fn caller_arn(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"));
    v["Arn"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn real_sdks_get_the_pods_role() {
    let n = node(&[]).await;
    let want = "arn:aws:sts::123456789012:assumed-role/web-sdk/team-a.sdk";
    let script = "import boto3, json; print(json.dumps(boto3.client('sts').get_caller_identity()))";
    for v1_disabled in [true, false] {
        let mut boto3 = sdk_command(&n, "python", v1_disabled);
        boto3.args(["-c", script]);
        let out = tokio::task::spawn_blocking(move || boto3.output())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(caller_arn(out), want, "boto3, v1 disabled: {v1_disabled}");
    }
    let mut cli = sdk_command(&n, "aws", true);
    cli.args(["sts", "get-caller-identity", "--output", "json"]);
    let out = tokio::task::spawn_blocking(move || cli.output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(caller_arn(out), want, "aws cli");

    // The Rust SDK's IMDS provider, in this process (its source address is 127.0.0.1).
    use aws_config::{imds, provider_config::ProviderConfig};
    use aws_credential_types::provider::ProvideCredentials;
    let http = aws_smithy_http_client::Builder::new().build_http();
    let config = ProviderConfig::without_region().with_http_client(http);
    let client = imds::Client::builder()
        .configure(&config)
        .endpoint(format!("http://{}", n.imds))
        .unwrap()
        .build();
    let provider = imds::credentials::ImdsCredentialsProvider::builder()
        .configure(&config)
        .imds_client(client)
        .build();
    let creds = provider.provide_credentials().await.unwrap();
    let token = n.token(SDK).await;
    let direct = n.get(SDK, &format!("{CREDS}web-sdk"), Some(&token)).await;
    let doc: Value = serde_json::from_str(&direct.body).unwrap();
    assert_eq!(
        creds.access_key_id(),
        doc["AccessKeyId"].as_str().unwrap(),
        "rust aws-config"
    );
    let logs = n.agent.logs().join("\n");
    assert!(
        !logs.contains(doc["SecretAccessKey"].as_str().unwrap()),
        "a secret reached the agent's log"
    );
}

#[tokio::test]
async fn requests_fail_over_to_another_server() {
    let n = node(&[]).await;
    let (replica, replica_api) = n
        .stack
        .replica(&sibling(BIN, "podiam-server"))
        .await
        .unwrap();
    let servers = format!("{},{}", n.stack.api, replica_api);
    let (agent, imds) = start_agent_for(
        &servers,
        &n.stack,
        &n.upstream,
        &n.key_file,
        &n.token_file,
        &[],
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(agent.admin, "podiam_agent_servers_healthy").await < 2.0 {
        assert!(
            Instant::now() < deadline,
            "both servers never became healthy"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Requests are spread over both.
    for _ in 0..6 {
        let a = imds_client::request(ip(WEB), imds, Method::GET, CREDS, &[])
            .await
            .unwrap();
        assert_eq!(a.status, 200);
    }
    let served = |p: &Process| {
        metric(
            p.admin,
            "podiam_api_requests_total{endpoint=\"role\",result=\"ok\"}",
        )
    };
    assert!(served(&replica).await >= 1.0 && served(&n.stack.server).await >= 1.0);
    // One replica goes away: every request still succeeds, the first ones by failing over.
    tokio::task::spawn_blocking(move || replica.terminate(Duration::from_secs(10)))
        .await
        .unwrap()
        .unwrap();
    for _ in 0..6 {
        let a = imds_client::request(ip(WEB), imds, Method::GET, CREDS, &[])
            .await
            .unwrap();
        assert_eq!((a.status, a.body.as_str()), (200, "web"));
    }
    assert_eq!(http::get(agent.admin, "/readyz").await.unwrap().0, 200);
}

#[tokio::test]
async fn only_pod_sources_are_answered() {
    // 127.0.0.0/30 holds WEB and FORBIDDEN, not NOBODY.
    let n = node(&["--pod-sources", "127.0.0.0/30"]).await;
    assert_eq!(n.get(WEB, CREDS, None).await.status, 200);
    let outsider = imds_client::request(ip(NOBODY), n.imds, Method::GET, CREDS, &[]).await;
    assert!(
        outsider.is_err(),
        "a connection from outside --pod-sources is closed unanswered: {outsider:?}"
    );
    assert_eq!(
        metric(
            n.agent.admin,
            "podiam_agent_refused_connections_total{reason=\"not_a_pod_source\"}"
        )
        .await,
        1.0
    );
}

/// Raises this process's open-file limit to at least `n` (as root), so that a test can
/// hold `n` connections; the limit it has.
fn raise_nofile(n: u64) -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 0;
    };
    if soft >= n {
        return soft;
    }
    let hard = hard.max(n);
    if setrlimit(Resource::RLIMIT_NOFILE, n, hard).is_ok() {
        return n;
    }
    soft
}

#[tokio::test]
async fn a_pods_twenty_thousand_idle_connections_cost_its_neighbours_nothing() {
    const HOSTILE: &str = "127.0.0.66";
    // 20,000 where the open-file limit allows (this process holds its end of each, and
    // a machine whose hard limit is 20,000 leaves room for a little less).
    let limit = raise_nofile(20_000 + 2048);
    let connections = usize::try_from(limit.saturating_sub(2048).min(20_000)).unwrap_or(0);
    if connections < 10_000 {
        eprintln!(
            "*** SKIPPING: the open-file limit ({limit}) leaves room for fewer than 10,000 connections ***"
        );
        return;
    }
    eprintln!("holding {connections} idle connections from one pod");
    let n = node(&[]).await;
    let token = n.token(WEB).await;
    let web = format!("{CREDS}web");
    assert_eq!(n.get(WEB, &web, Some(&token)).await.status, 200);
    let quiet = n.agent.rss_kib().unwrap();

    // One pod opens (about) 20,000 connections to the metadata endpoint, sends nothing.
    let mut idle = Vec::with_capacity(connections);
    let mut failed = 0usize;
    for start in (0..connections).step_by(500) {
        let batch = (start..connections.min(start + 500))
            .map(|_| imds_client::connect(ip(HOSTILE), n.imds));
        for c in futures::future::join_all(batch).await {
            match c {
                Ok(c) => idle.push(c),
                Err(_) => failed += 1,
            }
        }
    }
    // Every other pod keeps being answered at once, while those are held.
    for _ in 0..20 {
        let started = Instant::now();
        let c = n.get(WEB, &web, Some(&token)).await;
        assert_eq!(c.status, 200, "{c:?}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "a neighbour waited {:?}",
            started.elapsed()
        );
    }
    let busy = n.agent.rss_kib().unwrap();
    assert!(
        busy < 64 * 1024,
        "agent RSS {quiet} KiB → {busy} KiB under {} idle connections ({failed} failed)",
        idle.len()
    );
    let refused = metric(
        n.agent.admin,
        r#"podiam_listener_refused_total{listener="metadata",reason="per_source"}"#,
    )
    .await;
    // Beyond its 64, the pod's connections were closed at accept (its admitted ones are
    // closed after 5 s of silence, so a few more got in over the run).
    assert!(
        refused >= (connections - failed) as f64 / 2.0,
        "refused {refused} of {connections}"
    );
    assert!(
        metric(
            n.agent.admin,
            r#"podiam_listener_connections{listener="metadata"}"#
        )
        .await
            <= 64.0 + 1.0
    );
    drop(idle);
}
