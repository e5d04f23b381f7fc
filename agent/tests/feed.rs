//! The node feed end to end on loopback: real `podiam-agent` and `podiam-server`
//! binaries (two replicas), moto as STS, the stand-in API server. Callers are told apart by
//! their source address (127.0.0.x). Interface binding is off here (loopback addresses
//! live behind no veth); `agent/tests/interfaces.rs` and the sandbox test it for real.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use ::http::Method;
use podiam_tests::{
    fake_imds::FakeImds,
    http,
    imds_client::{self, Answer},
    kube_api::FakeKube,
    objects::{TeamA, namespace, pod, team_a},
    process::Process,
    stack::{ServerStack, agent_command, agent_identity, metric, sibling},
};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_podiam-agent");
const AGENT_TOKEN: &str = "token-agent-node-a";
const WEB: &str = "127.0.0.2";
const DENIED: &str = "127.0.0.3";
const OTHER_NODE: &str = "127.0.0.4";
const LATE: &str = "127.0.0.5";
const CREDS: &str = "/latest/meta-data/iam/security-credentials/";

struct Cluster {
    stack: ServerStack,
    replica: Option<Process>,
    _metadata: FakeImds,
    agent: Process,
    imds: SocketAddr,
}

async fn cluster() -> Cluster {
    cluster_with(&[]).await
}

/// [`cluster`] with `extra` flags for both server replicas.
async fn cluster_with(extra: &[&str]) -> Cluster {
    let kube = FakeKube::start().await.unwrap();
    for object in team_a(TeamA {
        web: WEB,
        denied: DENIED,
        other_node: OTHER_NODE,
    }) {
        kube.apply(object);
    }
    kube.add_token(AGENT_TOKEN, agent_identity("node-a"));
    let server = sibling(BIN, "podiam-server");
    let flags: Vec<&str> = ["--feed-heartbeat", "200ms"]
        .into_iter()
        .chain(extra.iter().copied())
        .collect();
    let stack = ServerStack::start(&server, kube, &flags)
        .await
        .expect("server stack (run scripts/setup)");
    let (replica, replica_api) = stack.replica_with(&server, extra).await.unwrap();
    let metadata = FakeImds::start().await.unwrap();
    let key_file = stack.dir.path().join("imds.key");
    let token_file = stack.dir.path().join("sa-token");
    std::fs::write(&token_file, AGENT_TOKEN).unwrap();
    let servers = format!("{},{replica_api}", stack.api);
    let mut cmd = agent_command(
        Path::new(BIN),
        &stack.pki,
        &servers,
        &metadata.addr.to_string(),
        &key_file,
        &token_file,
    );
    cmd.args(["--pod-sources", "127.0.0.0/8", "--interface-binding", "off"]);
    let agent =
        tokio::task::spawn_blocking(move || Process::spawn_announcing(cmd, &["metadata endpoint"]))
            .await
            .unwrap()
            .unwrap();
    http::wait_ready(agent.admin, Duration::from_secs(20))
        .await
        .unwrap();
    let imds = agent.addr("metadata endpoint").unwrap();
    Cluster {
        stack,
        replica: Some(replica),
        _metadata: metadata,
        agent,
        imds,
    }
}

impl Cluster {
    async fn get(&self, from: &str, path: &str) -> Answer {
        let ip: IpAddr = from.parse().unwrap();
        imds_client::request(ip, self.imds, Method::GET, path, &[])
            .await
            .unwrap()
    }

    async fn agent_metric(&self, name: &str) -> f64 {
        metric(self.agent.admin, name).await
    }

    /// Asks for web's credentials until the table answers (its credentials arrive on the
    /// feed after the first sync); every answer on the way must be web's.
    async fn warm(&self) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let before = self.agent_metric(TABLE_ANSWERS).await;
            let a = self.get(WEB, &format!("{CREDS}web")).await;
            assert_eq!(a.status, 200, "{a:?}");
            if self.agent_metric(TABLE_ANSWERS).await > before {
                return serde_json::from_str(&a.body).unwrap();
            }
            assert!(Instant::now() < deadline, "never answered from the table");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the agent's feed is connected (`true`) or not.
    async fn feed_connected(&self, connected: bool) {
        let want = if connected { 1.0 } else { 0.0 };
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.agent_metric("podiam_agent_feed_connected").await != want {
            assert!(
                Instant::now() < deadline,
                "feed connected never became {connected}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

const TABLE_ANSWERS: &str = r#"podiam_agent_credentials_answered_total{source="table"}"#;
const SERVER_CREDENTIALS: &str = r#"podiam_api_requests_total{endpoint="credentials",result="ok"}"#;

#[tokio::test]
async fn warm_requests_are_answered_on_the_node_with_no_server_call() {
    let c = cluster().await;
    c.feed_connected(true).await;
    let doc = c.warm().await;
    assert!(doc["AccessKeyId"].as_str().unwrap().starts_with("ASIA"));
    // Only this node's pods, and only live ones with an IP.
    assert_eq!(c.agent_metric("podiam_agent_table_pods").await, 2.0);

    let server_before = c.stack.metric(SERVER_CREDENTIALS).await;
    let replica = c.replica.as_ref().unwrap().admin;
    let replica_before = metric(replica, SERVER_CREDENTIALS).await;
    let table_before = c.agent_metric(TABLE_ANSWERS).await;
    for _ in 0..50 {
        let a = c.get(WEB, &format!("{CREDS}web")).await;
        assert_eq!(a.status, 200);
        let again: Value = serde_json::from_str(&a.body).unwrap();
        assert_eq!(again["AccessKeyId"], doc["AccessKeyId"]);
        assert_eq!(c.get(WEB, CREDS).await.body, "web");
    }
    assert_eq!(c.agent_metric(TABLE_ANSWERS).await - table_before, 50.0);
    assert_eq!(c.stack.metric(SERVER_CREDENTIALS).await, server_before);
    assert_eq!(metric(replica, SERVER_CREDENTIALS).await, replica_before);

    // Another role than its own: not found, on the node.
    assert_eq!(c.get(WEB, &format!("{CREDS}admin")).await.status, 404);
    // A denied pod and another node's pod are still decided by a server (Events, metrics).
    assert_eq!(c.get(DENIED, CREDS).await.status, 403);
    assert_eq!(c.get(OTHER_NODE, CREDS).await.status, 403);
}

#[tokio::test]
async fn a_new_pod_is_announced_by_the_feed_and_a_deleted_one_is_forgotten() {
    let c = cluster().await;
    c.feed_connected(true).await;
    c.warm().await;
    c.stack.kube.apply(
        pod("team-a", "late")
            .ip(LATE)
            .role("web-late")
            .node("node-a")
            .build(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let a = c.get(LATE, CREDS).await;
        if a.status == 200 {
            assert_eq!(a.body, "web-late");
            break;
        }
        assert!(Instant::now() < deadline, "{a:?}");
    }
    c.stack.kube.delete_pod("team-a", "web-0");
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.agent_metric("podiam_agent_table_pods").await != 2.0 {
        assert!(Instant::now() < deadline, "web-0 never left the table");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(c.get(WEB, CREDS).await.status, 404);
}

#[tokio::test]
async fn through_a_server_outage_known_pods_keep_their_credentials_and_nothing_else() {
    let mut c = cluster().await;
    c.feed_connected(true).await;
    c.warm().await;

    // One replica goes: the agent fails over to the other and resyncs.
    let replica = c.replica.take().unwrap();
    replica.terminate(Duration::from_secs(10)).unwrap();
    let a = c.get(WEB, &format!("{CREDS}web")).await;
    assert_eq!(a.status, 200);
    c.feed_connected(true).await;

    // Every replica goes.
    c.stack.server.stop(Duration::from_secs(10)).unwrap();
    c.feed_connected(false).await;
    // The credentials held (from either replica: each has its own sessions), and the
    // same ones every time.
    let mut held = None;
    for _ in 0..20 {
        let a = c.get(WEB, &format!("{CREDS}web")).await;
        assert_eq!(a.status, 200, "{a:?}");
        let doc: Value = serde_json::from_str(&a.body).unwrap();
        let key = doc["AccessKeyId"].as_str().unwrap().to_string();
        assert!(key.starts_with("ASIA"), "{doc}");
        assert_eq!(held.get_or_insert(key.clone()), &key);
    }
    // A pod the agent never heard of gets a 503, which SDKs retry.
    c.stack.kube.apply(
        pod("team-a", "late")
            .ip(LATE)
            .role("web-late")
            .node("node-a")
            .build(),
    );
    assert_eq!(c.get(LATE, CREDS).await.status, 503);
    let ready = http::get(c.agent.admin, "/readyz").await.unwrap();
    assert_ne!(ready.0, 200, "{ready:?}");
    assert!(ready.1.contains("servers"), "{ready:?}");
}

#[tokio::test]
async fn a_stale_view_ends_the_feed_and_a_revocation_made_meanwhile_reaches_the_node() {
    let c = cluster_with(&["--watch-stale-after", "1s"]).await;
    c.feed_connected(true).await;
    c.warm().await;

    // The API server goes away: past --watch-stale-after both replicas' views are stale,
    // and they end the agent's feed rather than go on from a frozen index.
    c.stack
        .kube
        .refuse_reads(Some(::http::StatusCode::SERVICE_UNAVAILABLE));
    c.stack.kube.drop_watches();
    c.feed_connected(false).await;
    // Meanwhile the pod keeps what the agent holds (15-minute rule)...
    assert_eq!(c.get(WEB, &format!("{CREDS}web")).await.status, 200);
    // ...and the cluster takes its role away while no server can see it.
    c.stack.kube.apply(namespace(
        "team-a",
        &[(
            "iam.amazonaws.com/permitted",
            "arn:aws:iam::123456789012:role/nothing",
        )],
    ));

    // Back: the fresh view reaches the node, and the held copy is dropped at once, not
    // served for its 15 minutes.
    c.stack.kube.refuse_reads(None);
    c.feed_connected(true).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let a = c.get(WEB, &format!("{CREDS}web")).await;
        if a.status == 403 {
            break;
        }
        assert_eq!(a.status, 200, "{a:?}");
        assert!(
            Instant::now() < deadline,
            "the revoked role still served 10 s after the feed came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..20 {
        assert_eq!(c.get(WEB, &format!("{CREDS}web")).await.status, 403);
    }
}
