//! The server's agent API end to end: the real binary, mutual TLS, node binding through
//! TokenReview (stand-in API server), and STS = moto behind a counting, fault-injecting
//! proxy.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::time::{Duration, Instant, SystemTime};

use podiam_tests::{
    api_client::{ApiClient, tls_config},
    kube_api::{FakeKube, TokenIdentity},
    objects::{TeamA, namespace, pod, team_a},
    stack::{ServerStack, agent_identity, arn},
    sts_proxy::Mode,
};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_podiam-server");
const AGENT_A: &str = "token-agent-node-a";
const AGENT_B: &str = "token-agent-node-b";
const POD_TOKEN: &str = "token-of-an-ordinary-pod";

async fn start() -> ServerStack {
    let kube = FakeKube::start().await.unwrap();
    for object in team_a(TeamA {
        web: "10.0.0.1",
        denied: "10.0.0.2",
        other_node: "10.0.0.3",
    }) {
        kube.apply(object);
    }
    kube.apply(
        pod("team-a", "gone")
            .ip("10.0.0.4")
            .role("web")
            .node("node-a")
            .build(),
    );
    kube.add_token(AGENT_A, agent_identity("node-a"));
    kube.add_token(AGENT_B, agent_identity("node-b"));
    kube.add_token(
        POD_TOKEN,
        TokenIdentity {
            username: "system:serviceaccount:team-a:default".into(),
            node: Some("node-a".into()),
            audiences: vec!["podiam".into()],
            ..TokenIdentity::default()
        },
    );
    ServerStack::start(std::path::Path::new(BIN), kube, &[])
        .await
        .expect("server stack (moto: run scripts/setup)")
}

/// `n` TCP connections from `from` to `to` that send nothing (those refused are left out).
async fn idle_connections(
    from: &str,
    to: std::net::SocketAddr,
    n: usize,
) -> Vec<tokio::net::TcpStream> {
    let from = from.parse().unwrap();
    let mut idle = Vec::new();
    for _ in 0..n {
        if let Ok(tcp) = podiam_tests::imds_client::connect(from, to).await {
            idle.push(tcp);
        }
    }
    idle
}

async fn client(env: &ServerStack) -> ApiClient {
    let config = tls_config(&env.pki.ca, Some(&env.pki.client)).unwrap();
    ApiClient::connect(env.api, config).await.unwrap()
}

async fn credentials(c: &mut ApiClient, token: &str, ip: &str, role: Option<&str>) -> (u16, Value) {
    let mut body = json!({"ip": ip});
    if let Some(role) = role {
        body["role"] = json!(role);
    }
    c.post("/v1/credentials", Some(token), body).await.unwrap()
}

fn expiry(v: &Value) -> SystemTime {
    humantime::parse_rfc3339(v["credentials"]["expiration"].as_str().unwrap()).unwrap()
}

#[tokio::test]
async fn a_pod_gets_its_own_credentials_with_life_left_and_one_audit_line() {
    let env = start().await;
    let mut c = client(&env).await;
    let (code, v) = credentials(&mut c, AGENT_A, "10.0.0.1", Some("web")).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["role_arn"], arn("web"));
    let left = expiry(&v).duration_since(SystemTime::now()).unwrap();
    assert!(left >= Duration::from_secs(15 * 60), "{left:?}");
    let key = v["credentials"]["access_key_id"]
        .as_str()
        .unwrap()
        .to_string();
    let secret = v["credentials"]["secret_access_key"]
        .as_str()
        .unwrap()
        .to_string();
    let token = v["credentials"]["session_token"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!secret.is_empty() && !token.is_empty());

    // The role endpoint, and the same credentials again (cache), by ARN this time.
    let (code, v) = c
        .post("/v1/role", Some(AGENT_A), json!({"ip": "10.0.0.1"}))
        .await
        .unwrap();
    assert_eq!(
        (code, v["role_arn"].as_str()),
        (200, Some(arn("web").as_str()))
    );
    let (code, v) = credentials(&mut c, AGENT_A, "10.0.0.1", Some(&arn("web"))).await;
    assert_eq!(code, 200);
    assert_eq!(v["credentials"]["access_key_id"], key);
    // Prefetch at start-up and three requests: one AssumeRole for this pod's session.
    assert_eq!(env.proxy.calls("AssumeRole/team-a.web-0"), 1);

    let logs = env.server.logs().join("\n");
    let audits: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("credentials issued") && l.contains(&key))
        .collect();
    assert_eq!(audits.len(), 1, "{logs}");
    assert!(
        audits[0].contains("web-0") && audits[0].contains(&arn("web")),
        "{}",
        audits[0]
    );
    assert!(
        !logs.contains(&secret) && !logs.contains(&token),
        "a secret reached the log"
    );
}

#[tokio::test]
async fn refusals_are_typed_and_raise_events() {
    let env = start().await;
    let mut c = client(&env).await;
    let code_of = |v: &Value| v["code"].as_str().unwrap_or_default().to_string();

    let (status, v) = credentials(&mut c, AGENT_A, "10.0.0.2", None).await;
    assert_eq!((status, code_of(&v)), (403, "forbidden".into()), "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("not permitted"),
        "{v}"
    );
    assert_eq!(
        env.metric("podiam_denials_total{reason=\"role_not_permitted\"}")
            .await,
        1.0
    );
    let event = env
        .kube
        .wait_event(|e| e["regarding"]["name"] == "admin" && e["reason"] == "CredentialsDenied")
        .await;
    assert!(
        event.is_some(),
        "no Event for the denied pod: {:?}",
        env.kube.events()
    );

    // A pod on node B, asked for by node A's agent.
    let (status, v) = credentials(&mut c, AGENT_A, "10.0.0.3", None).await;
    assert_eq!((status, code_of(&v)), (403, "node_mismatch".into()), "{v}");
    assert!(
        env.kube
            .wait_event(|e| e["regarding"]["name"] == "web-b"
                && e["reason"] == "CredentialsRequestedFromOtherNode")
            .await
            .is_some()
    );
    // ...which node B's agent gets.
    let (status, _) = credentials(&mut c, AGENT_B, "10.0.0.3", None).await;
    assert_eq!(status, 200);

    // An IP no pod has: after the bounded wait, an Event on the asking agent's node.
    let started = Instant::now();
    let (status, v) = credentials(&mut c, AGENT_A, "10.9.9.9", None).await;
    assert_eq!((status, code_of(&v)), (404, "pod_not_found".into()));
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "the lookup waited"
    );
    assert!(
        env.kube
            .wait_event(|e| e["regarding"]["kind"] == "Node" && e["regarding"]["name"] == "node-a")
            .await
            .is_some()
    );

    // Another role than the pod's own: refused like an unknown role.
    let (status, v) = credentials(&mut c, AGENT_A, "10.0.0.1", Some("admin")).await;
    assert_eq!((status, code_of(&v)), (404, "role_mismatch".into()));

    // A deleted pod: once the server has seen the deletion, its IP is unknown.
    let pods = env.metric("podiam_pod_index_pods").await;
    assert!(env.kube.delete_pod("team-a", "gone"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while env.metric("podiam_pod_index_pods").await >= pods {
        assert!(Instant::now() < deadline, "deletion not seen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, v) = credentials(&mut c, AGENT_A, "10.0.0.4", None).await;
    assert_eq!((status, code_of(&v)), (404, "pod_not_found".into()));

    // Callers that are not an agent of this cluster.
    let (status, v) = c
        .post("/v1/credentials", None, json!({"ip": "10.0.0.1"}))
        .await
        .unwrap();
    assert_eq!((status, code_of(&v)), (401, "unauthenticated".into()));
    let (status, v) = credentials(&mut c, POD_TOKEN, "10.0.0.1", None).await;
    assert_eq!((status, code_of(&v)), (401, "unauthenticated".into()));
    assert!(
        v["message"].as_str().unwrap().contains("not to the agent"),
        "{v}"
    );
    let (status, v) = credentials(&mut c, "forged", "10.0.0.1", None).await;
    assert_eq!((status, code_of(&v)), (401, "unauthenticated".into()));

    // Malformed requests.
    let (status, v) = c
        .post("/v1/credentials", Some(AGENT_A), json!({"ip": "nope"}))
        .await
        .unwrap();
    assert_eq!((status, code_of(&v)), (400, "invalid_request".into()));
    assert!(
        env.metric("podiam_events_total{result=\"published\"}")
            .await
            >= 3.0
    );
}

#[tokio::test]
async fn tls_requires_a_client_certificate_from_the_ca() {
    let env = start().await;
    let no_cert = tls_config(&env.pki.ca, None).unwrap();
    assert!(
        ApiClient::connect(env.api, no_cert).await.is_err(),
        "no client certificate"
    );
    let foreign = tls_config(&env.pki.ca, Some(&env.other.client)).unwrap();
    assert!(
        ApiClient::connect(env.api, foreign).await.is_err(),
        "client certificate from another CA"
    );
    let good = tls_config(&env.pki.ca, Some(&env.pki.client)).unwrap();
    assert!(ApiClient::connect(env.api, good).await.is_ok());
    assert!(
        env.metric("podiam_api_tls_handshakes_total{result=\"refused\"}")
            .await
            >= 1.0
    );
}

#[tokio::test]
async fn unauthenticated_connections_from_one_address_hold_only_its_share() {
    // An address that reaches the port opens 200 TCP connections and never starts TLS:
    // beyond its share (16) they are closed at accept, and the ones held are closed when
    // their handshake does not come; an agent from another address is served meanwhile.
    let env = start().await;
    let idle = idle_connections("127.0.0.88", env.api, 200).await;
    let mut c = client(&env).await;
    let (code, v) = credentials(&mut c, AGENT_A, "10.0.0.1", Some("web")).await;
    assert_eq!(code, 200, "{v}");
    let refused = env
        .metric(r#"podiam_listener_refused_total{listener="agent_api",reason="per_source"}"#)
        .await;
    assert!(refused >= (200 - 16) as f64, "refused {refused}");
    // The held ones are dropped when their handshake window (5 s) ends.
    let deadline = Instant::now() + Duration::from_secs(15);
    while env
        .metric(r#"podiam_api_tls_handshakes_total{result="timeout"}"#)
        .await
        < 16.0
    {
        assert!(Instant::now() < deadline, "idle handshakes never timed out");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(idle);
}

#[tokio::test]
async fn the_admin_server_holds_only_a_share_of_connections_per_address() {
    // 50 idle connections from one address: beyond its 8 they are closed at accept, and
    // the probes and scrapes from elsewhere are answered.
    let env = start().await;
    let idle = idle_connections("127.0.0.89", env.server.admin, 50).await;
    let ready = podiam_tests::http::get(env.server.admin, "/readyz")
        .await
        .unwrap();
    assert_eq!(ready.0, 200, "{ready:?}");
    let refused = env
        .metric(r#"podiam_listener_refused_total{listener="admin",reason="per_source"}"#)
        .await;
    assert!(refused >= 42.0, "refused {refused}");
    drop(idle);
}

#[tokio::test]
async fn a_thousand_concurrent_cold_requests_make_one_assume_role_call() {
    let env = start().await;
    let mut c = client(&env).await;
    // STS answers slowly, so every request below arrives while the call is in flight.
    env.proxy.set_mode(Mode::Delay(Duration::from_millis(500)));
    env.kube.apply(
        pod("team-a", "cold")
            .ip("10.0.0.50")
            .role("web-cold")
            .node("node-a")
            .build(),
    );
    let tasks: Vec<_> = (0..1000)
        .map(|_| {
            let mut c = c.clone();
            tokio::spawn(async move { credentials(&mut c, AGENT_A, "10.0.0.50", None).await })
        })
        .collect();
    let mut keys = std::collections::HashSet::new();
    for t in tasks {
        let (status, v) = t.await.unwrap();
        assert_eq!(status, 200, "{v}");
        keys.insert(
            v["credentials"]["access_key_id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    assert_eq!(keys.len(), 1);
    assert_eq!(env.proxy.calls("AssumeRole/team-a.cold"), 1);
    let (status, _) = credentials(&mut c, AGENT_A, "10.0.0.50", None).await;
    assert_eq!(status, 200);
    assert_eq!(env.proxy.calls("AssumeRole/team-a.cold"), 1);
}

#[tokio::test]
async fn sts_trouble_keeps_cached_credentials_and_fails_cold_requests_fast() {
    let env = start().await;
    let mut c = client(&env).await;
    let (status, warm) = credentials(&mut c, AGENT_A, "10.0.0.1", None).await;
    assert_eq!(status, 200);

    env.proxy.set_mode(Mode::Down);
    let (status, v) = credentials(&mut c, AGENT_A, "10.0.0.1", None).await;
    assert_eq!(status, 200, "cached credentials are still served");
    assert_eq!(
        v["credentials"]["access_key_id"],
        warm["credentials"]["access_key_id"]
    );

    env.kube.apply(
        pod("team-a", "web-new")
            .ip("10.0.0.60")
            .role("web-new")
            .node("node-a")
            .build(),
    );
    let started = Instant::now();
    let (status, v) = credentials(&mut c, AGENT_A, "10.0.0.60", None).await;
    assert_eq!(
        (status, v["code"].as_str()),
        (502, Some("sts_error")),
        "{v}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        env.kube
            .wait_event(|e| e["regarding"]["name"] == "web-new" && e["reason"] == "AssumeRoleFailed")
            .await
            .is_some()
    );
    assert!(
        env.metric("podiam_sts_errors_total{code=\"Unreachable\"}")
            .await
            >= 1.0
    );

    // Throttling is retried by the SDK (3 attempts); AccessDenied is not.
    env.proxy.set_mode(Mode::Fail(400, "Throttling"));
    env.kube.apply(
        pod("team-a", "web-t")
            .ip("10.0.0.61")
            .role("web-t")
            .node("node-a")
            .build(),
    );
    let (status, v) = credentials(&mut c, AGENT_A, "10.0.0.61", None).await;
    assert_eq!(status, 502, "{v}");
    assert!(v["message"].as_str().unwrap().contains("Throttling"), "{v}");
    assert_eq!(env.proxy.calls("AssumeRole/team-a.web-t"), 3);
    env.proxy.set_mode(Mode::Fail(403, "AccessDenied"));
    env.kube.apply(
        pod("team-a", "web-d")
            .ip("10.0.0.62")
            .role("web-d")
            .node("node-a")
            .build(),
    );
    let (status, v) = credentials(&mut c, AGENT_A, "10.0.0.62", None).await;
    assert_eq!(status, 502);
    assert!(
        v["message"].as_str().unwrap().contains("AccessDenied"),
        "{v}"
    );
    assert_eq!(env.proxy.calls("AssumeRole/team-a.web-d"), 1);
}

/// Namespace team-a permitting `web*`, pods `(name, ip)` with role `web` on node-a, and
/// agent tokens of node-a.
async fn web_pods(pods: &[(&str, &str)], agents: &[&str]) -> FakeKube {
    let kube = FakeKube::start().await.unwrap();
    kube.apply(namespace(
        "team-a",
        &[("iam.amazonaws.com/permitted", &arn("web.*"))],
    ));
    for (name, ip) in pods {
        kube.apply(
            pod("team-a", name)
                .ip(ip)
                .role("web")
                .node("node-a")
                .build(),
        );
    }
    for token in agents {
        kube.add_token(token, agent_identity("node-a"));
    }
    kube
}

#[tokio::test]
async fn role_scoped_sessions_are_shared_by_the_pods_of_a_role() {
    let kube = web_pods(&[("web-0", "10.0.0.1"), ("web-1", "10.0.0.2")], &[AGENT_A]).await;
    let env = ServerStack::start(
        std::path::Path::new(BIN),
        kube,
        &["--session-scope", "role"],
    )
    .await
    .unwrap();
    let mut c = client(&env).await;
    let (s0, a) = credentials(&mut c, AGENT_A, "10.0.0.1", Some("web")).await;
    let (s1, b) = credentials(&mut c, AGENT_A, "10.0.0.2", Some("web")).await;
    assert_eq!((s0, s1), (200, 200), "{a} {b}");
    let key = &a["credentials"]["access_key_id"];
    assert!(key.is_string(), "{a}");
    assert_eq!(
        key, &b["credentials"]["access_key_id"],
        "one session for the role"
    );
    assert_eq!(env.proxy.calls("AssumeRole/podiam-web"), 1);
    assert_eq!(env.proxy.calls("AssumeRole/team-a.web-0"), 0);
}

#[tokio::test]
async fn known_agents_are_served_while_the_api_server_cannot_review_tokens() {
    const REVOKED: &str = "token-agent-revoked";
    let kube = web_pods(&[("web-0", "10.0.0.1")], &[AGENT_A, AGENT_B, REVOKED]).await;
    let env = ServerStack::start(
        std::path::Path::new(BIN),
        kube,
        &["--token-review-cache", "200ms"],
    )
    .await
    .unwrap();
    let mut c = client(&env).await;
    for token in [AGENT_A, REVOKED] {
        let (code, v) = credentials(&mut c, token, "10.0.0.1", Some("web")).await;
        assert_eq!(code, 200, "{v}");
    }
    // One token is revoked, and a review says so.
    env.kube.remove_token(REVOKED);
    // Past the review cache (its TTL is the only signal there is).
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (code, v) = credentials(&mut c, REVOKED, "10.0.0.1", Some("web")).await;
    assert_eq!(code, 401, "{v}");

    env.kube.set_token_reviews_down(true);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let attempts = env.kube.token_review_attempts();
    let (code, v) = credentials(&mut c, AGENT_A, "10.0.0.1", Some("web")).await;
    assert_eq!(code, 200, "a known agent is still served: {v}");
    assert!(
        env.kube.token_review_attempts() > attempts,
        "the review was attempted and failed"
    );
    // A token never accepted, or refused since, is not let in.
    let (code, v) = credentials(&mut c, AGENT_B, "10.0.0.1", Some("web")).await;
    assert_eq!(code, 503, "{v}");
    let (code, v) = credentials(&mut c, REVOKED, "10.0.0.1", Some("web")).await;
    assert_eq!(code, 503, "{v}");

    env.kube.set_token_reviews_down(false);
    let (code, v) = credentials(&mut c, AGENT_B, "10.0.0.1", Some("web")).await;
    assert_eq!(code, 200, "{v}");
}

/// Polls the admin `/readyz` (the server's readiness signal) until it answers `want`.
async fn wait_readyz(env: &ServerStack, want: u16, within: Duration) {
    let started = Instant::now();
    loop {
        if let Ok((code, _)) = podiam_tests::http::get(env.server.admin, "/readyz").await
            && code == want
        {
            return;
        }
        assert!(
            started.elapsed() < within,
            "/readyz did not answer {want} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A server over `kube` that calls its index stale after 1 s of failing watches.
async fn with_stale_after_1s(kube: FakeKube) -> ServerStack {
    ServerStack::start(
        std::path::Path::new(BIN),
        kube,
        &["--watch-stale-after", "1s"],
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn no_answers_from_a_frozen_index() {
    let kube = web_pods(&[("web-0", "10.0.0.1")], &[AGENT_A]).await;
    kube.apply(namespace(
        "team-b",
        &[("iam.amazonaws.com/permitted", &arn("other"))],
    ));
    let env = with_stale_after_1s(kube).await;
    let mut c = client(&env).await;
    let (code, v) = credentials(&mut c, AGENT_A, "10.0.0.1", None).await;
    assert_eq!(
        (code, v["role_arn"].as_str()),
        (200, Some(arn("web").as_str()))
    );

    // The API server stops answering reads (unreachable, or an RBAC change), and while the
    // server cannot see it, web-0 is deleted and another pod takes its IP.
    env.kube
        .refuse_reads(Some(::http::StatusCode::SERVICE_UNAVAILABLE));
    env.kube.drop_watches();
    env.kube.delete_pod("team-a", "web-0");
    env.kube.apply(
        pod("team-b", "reused")
            .ip("10.0.0.1")
            .role("other")
            .node("node-a")
            .build(),
    );

    // Past the bound the server is not ready, and says so to agents.
    wait_readyz(&env, 503, Duration::from_secs(10)).await;
    let (code, v) = credentials(&mut c, AGENT_A, "10.0.0.1", None).await;
    assert_eq!((code, v["code"].as_str()), (503, Some("not_ready")), "{v}");
    assert_eq!(
        env.metric("podiam_watch_stale{resource=\"pods\"}").await,
        1.0
    );

    // Reads work again: a fresh list, and the new pod's own role.
    env.kube.refuse_reads(None);
    wait_readyz(&env, 200, Duration::from_secs(40)).await;
    let (code, v) = credentials(&mut c, AGENT_A, "10.0.0.1", None).await;
    assert_eq!(
        (code, v["role_arn"].as_str()),
        (200, Some(arn("other").as_str())),
        "{v}"
    );
    assert_eq!(
        env.metric("podiam_watch_stale{resource=\"pods\"}").await,
        0.0
    );
}

#[tokio::test]
async fn no_answers_while_a_relist_keeps_failing() {
    let kube = web_pods(&[("web-0", "10.0.0.1")], &[AGENT_A]).await;
    let env = with_stale_after_1s(kube).await;
    let mut c = client(&env).await;
    assert_eq!(credentials(&mut c, AGENT_A, "10.0.0.1", None).await.0, 200);
    // The watches resume from a resourceVersion the API server has compacted away (as
    // after its restart): 410 Gone, so the watcher re-lists, and every list fails. Each
    // attempt starts with the watcher's Init, which proves nothing.
    let hold = env.kube.hold_watches();
    env.kube.drop_watches();
    env.kube.delete_pod("team-a", "web-0");
    env.kube.compact();
    env.kube
        .refuse_lists(Some(::http::StatusCode::SERVICE_UNAVAILABLE));
    drop(hold);
    wait_readyz(&env, 503, Duration::from_secs(10)).await;
    let (code, v) = credentials(&mut c, AGENT_A, "10.0.0.1", None).await;
    assert_eq!((code, v["code"].as_str()), (503, Some("not_ready")), "{v}");
    env.kube.refuse_lists(None);
    wait_readyz(&env, 200, Duration::from_secs(40)).await;
    let (code, v) = credentials(&mut c, AGENT_A, "10.0.0.1", None).await;
    assert_eq!(
        (code, v["code"].as_str()),
        (404, Some("pod_not_found")),
        "{v}"
    );
}

#[tokio::test]
async fn a_probe_that_answers_buys_one_bound_not_more() {
    let kube = web_pods(&[("web-0", "10.0.0.1")], &[AGENT_A]).await;
    let env = with_stale_after_1s(kube).await;
    // The API server answers small requests and sheds every full list (429 under load):
    // the probe passes, the re-list never completes, and nothing proves the index current.
    let hold = env.kube.hold_watches();
    env.kube.drop_watches();
    // A change the server cannot see, then compaction: its watch resumes into 410 Gone.
    env.kube.delete_pod("team-a", "web-0");
    env.kube.compact();
    env.kube
        .refuse_full_lists(Some(::http::StatusCode::TOO_MANY_REQUESTS));
    drop(hold);
    wait_readyz(&env, 503, Duration::from_secs(15)).await;
    env.kube.refuse_full_lists(None);
    wait_readyz(&env, 200, Duration::from_secs(40)).await;
}

#[tokio::test]
async fn one_watch_error_on_a_quiet_cluster_is_not_a_stale_index() {
    let kube = web_pods(&[("web-0", "10.0.0.1")], &[AGENT_A]).await;
    let env = with_stale_after_1s(kube).await;
    // One failed re-watch, then the watch comes back and nothing changes.
    env.kube
        .refuse_reads(Some(::http::StatusCode::SERVICE_UNAVAILABLE));
    env.kube.drop_watches();
    let lists = env.kube.lists(podiam_tests::kube_api::Kind::Pod);
    let started = Instant::now();
    while env
        .metric("podiam_watch_errors_total{resource=\"pods\"}")
        .await
        < 1.0
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no watch error seen"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    env.kube.refuse_reads(None);
    // At the bound the server probes the API server, finds it answering, and re-lists
    // without ever closing readiness.
    assert!(
        env.kube
            .wait_lists(podiam_tests::kube_api::Kind::Pod, lists + 2)
            .await
    );
    assert_eq!(
        podiam_tests::http::get(env.server.admin, "/readyz")
            .await
            .unwrap()
            .0,
        200
    );
    assert_eq!(
        env.metric("podiam_watch_stale{resource=\"pods\"}").await,
        0.0
    );
    let mut c = client(&env).await;
    assert_eq!(credentials(&mut c, AGENT_A, "10.0.0.1", None).await.0, 200);
}

#[tokio::test]
async fn requests_for_unknown_ips_wait_only_a_bounded_number_at_once() {
    let kube = web_pods(&[("web-0", "10.0.0.1")], &[AGENT_A]).await;
    let env = ServerStack::start(
        std::path::Path::new(BIN),
        kube,
        &["--max-waiting-lookups", "2"],
    )
    .await
    .unwrap();
    let mut calls = Vec::new();
    for i in 0..6 {
        let mut c = client(&env).await;
        calls.push(tokio::spawn(async move {
            let started = Instant::now();
            let ip = format!("10.9.9.{i}");
            let (code, v) = credentials(&mut c, AGENT_A, &ip, None).await;
            (
                code,
                v["code"].as_str().map(str::to_string),
                started.elapsed(),
            )
        }));
    }
    // The harness's --ip-lookup-wait is 300 ms.
    let mut waited = 0;
    for call in calls {
        let (code, reason, took) = call.await.unwrap();
        assert_eq!((code, reason.as_deref()), (404, Some("pod_not_found")));
        if took >= Duration::from_millis(250) {
            waited += 1;
        }
    }
    assert_eq!(
        waited, 2,
        "two waited for their pod, the rest were answered at once"
    );
    assert_eq!(env.metric("podiam_lookup_waits_shed_total").await, 4.0);
    // The places are given back: a known pod is served, an unknown IP waits again.
    let mut c = client(&env).await;
    let (code, v) = credentials(&mut c, AGENT_A, "10.0.0.1", None).await;
    assert_eq!(code, 200, "{v}");
    let started = Instant::now();
    let (code, _) = credentials(&mut c, AGENT_A, "10.9.9.9", None).await;
    assert_eq!(code, 404);
    assert!(started.elapsed() >= Duration::from_millis(250));
}

#[tokio::test]
async fn a_host_network_pod_with_a_role_is_told_it_gets_the_nodes_role() {
    let kube = web_pods(&[], &[AGENT_A]).await;
    kube.apply(
        pod("team-a", "host")
            .ip("192.0.2.10")
            .role("web")
            .node("node-a")
            .host_network()
            .build(),
    );
    let env = ServerStack::start(std::path::Path::new(BIN), kube, &[])
        .await
        .unwrap();
    let event = env
        .kube
        .wait_event(|e| e["regarding"]["name"] == "host" && e["reason"] == "HostNetworkPodRole")
        .await
        .expect("a Warning Event on the hostNetwork pod");
    assert!(
        event["note"]
            .as_str()
            .unwrap_or_default()
            .contains("node's role"),
        "{event}"
    );
}

#[tokio::test]
async fn kube2iam_renamed_annotation_keys() {
    let kube = FakeKube::start().await.unwrap();
    kube.apply(namespace(
        "team-k",
        &[("example.com/allowed", r#"["web-*"]"#)],
    ));
    kube.apply(
        pod("team-k", "custom")
            .ip("10.0.0.21")
            .annotation("example.com/role", "web-k")
            .node("node-a")
            .build(),
    );
    // The standard key is not read once it is renamed, as in kube2iam.
    kube.apply(
        pod("team-k", "standard")
            .ip("10.0.0.22")
            .role("web-k")
            .node("node-a")
            .build(),
    );
    kube.add_token(AGENT_A, agent_identity("node-a"));
    let keys = [
        "--iam-role-key",
        "example.com/role",
        "--namespace-key",
        "example.com/allowed",
    ];
    let env = ServerStack::start(std::path::Path::new(BIN), kube, &keys)
        .await
        .unwrap();
    let mut c = client(&env).await;
    let (code, v) = credentials(&mut c, AGENT_A, "10.0.0.21", None).await;
    assert_eq!(
        (code, v["role_arn"].as_str()),
        (200, Some(arn("web-k").as_str())),
        "{v}"
    );
    let (code, v) = credentials(&mut c, AGENT_A, "10.0.0.22", None).await;
    assert_eq!(code, 403, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap_or_default()
            .contains("example.com/role"),
        "{v}"
    );

    // explain reads the same keys.
    let kubeconfig = env.dir.path().join("explain-kubeconfig");
    env.kube.write_kubeconfig(&kubeconfig).unwrap();
    let mut cmd = std::process::Command::new(BIN);
    cmd.env_clear()
        .arg("explain")
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["--base-role-arn", "arn:aws:iam::123456789012:role/"])
        .args(keys)
        .args(["-n", "team-k", "--pod", "custom", "-o", "json"]);
    // Off the runtime's thread: the stand-in API server answers on it.
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert_eq!(
        (out.status.code(), v["role_arn"].as_str()),
        (Some(0), Some(arn("web-k").as_str())),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A malformed key is refused at start.
    let out = std::process::Command::new(BIN)
        .env_clear()
        .args([
            "explain",
            "--iam-role-key",
            "Not A Key",
            "-n",
            "x",
            "--pod",
            "y",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--iam-role-key")
            || String::from_utf8_lossy(&out.stdout).contains("--iam-role-key")
    );
}
