//! The container-credentials path through the server: the real binary with
//! `--pod-identity`, pods' tokens reviewed by the stand-in API server (a test double that,
//! like a real one, refuses a token whose pod is gone), roles from ServiceAccounts and
//! PodIdentityAssociations under the namespace policy, session tags as EKS sets them, and
//! the admission webhook over TLS.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::time::Duration;

use podiam_tests::{
    admission::{admit, patch_bytes},
    api_client::{ApiClient, tls_config},
    kube_api::{FakeKube, Kind},
    objects::{association, namespace, pod, service_account},
    stack::{ServerStack, agent_identity, arn},
};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_podiam-server");
const AGENT_A: &str = "token-agent-node-a";
const AUDIENCE: &str = "pods.eks.amazonaws.com";
const HOUR: Duration = Duration::from_secs(3600);

/// Namespace `team` permits `app*` roles. ServiceAccounts: `app` (IRSA annotation, role
/// `app`), `admin` (association to `admin`, not permitted), `plain` (no role). Pods on
/// node-a: `app-0` (app), `admin-0` (admin), `plain-0` (plain); on node-b: `app-b` (app).
async fn start() -> ServerStack {
    let kube = FakeKube::start().await.unwrap();
    kube.apply(namespace(
        "team",
        &[("iam.amazonaws.com/permitted", &arn("app.*"))],
    ));
    kube.apply(service_account("team", "app", Some(&arn("app"))));
    kube.apply(service_account("team", "admin", None));
    kube.apply(service_account("team", "plain", None));
    kube.apply(association("team", "admin-role", "admin", &arn("admin")));
    for (name, sa, node) in [
        ("app-0", "app", "node-a"),
        ("admin-0", "admin", "node-a"),
        ("plain-0", "plain", "node-a"),
        ("app-b", "app", "node-b"),
    ] {
        // As the webhook leaves them (the label marks the path's pods for prefetching).
        kube.apply(
            pod("team", name)
                .service_account(sa)
                .node(node)
                .ip("10.9.0.1")
                .label("podiam.io/pod-identity", "enabled")
                .build(),
        );
    }
    kube.add_token(AGENT_A, agent_identity("node-a"));
    let extra = [
        "--pod-identity",
        "--cluster-name",
        "sandbox",
        "--webhook-listen",
        "127.0.0.1:0",
    ];
    ServerStack::start(std::path::Path::new(BIN), kube, &extra)
        .await
        .expect("server stack (moto: run scripts/setup)")
}

/// The webhook's address, as the server announced it (after the agent API, which is what
/// the stack waits for).
fn webhook_addr(env: &ServerStack) -> std::net::SocketAddr {
    env.server
        .logs()
        .iter()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .find(|v| v["message"] == "admission webhook listening")
        .and_then(|v| v["addr"].as_str()?.parse::<std::net::SocketAddr>().ok())
        .expect("the webhook announced its address")
}

async fn client(env: &ServerStack) -> ApiClient {
    let config = tls_config(&env.pki.ca, Some(&env.pki.client)).unwrap();
    ApiClient::connect(env.api, config).await.unwrap()
}

fn token(env: &ServerStack, pod: &str) -> String {
    env.kube
        .issue_pod_token("team", pod, AUDIENCE, HOUR)
        .unwrap()
}

async fn ask(c: &mut ApiClient, token: &str) -> (u16, Value) {
    c.post("/v1/pod-identity", Some(AGENT_A), json!({"token": token}))
        .await
        .unwrap()
}

#[tokio::test]
async fn a_pod_gets_its_service_accounts_role_for_its_token_with_eks_session_tags() {
    let env = start().await;
    // Prefetched at start-up, before any request (the pod on node-b too).
    for session in ["AssumeRole/team.app-0", "AssumeRole/team.app-b"] {
        assert!(
            env.proxy
                .wait_calls(session, 1, Duration::from_secs(10))
                .await,
            "{session} not prefetched"
        );
    }
    let mut c = client(&env).await;
    let (code, v) = ask(&mut c, &token(&env, "app-0")).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["role_arn"], arn("app"));
    assert_eq!(
        env.proxy.calls("AssumeRole/team.app-0"),
        1,
        "answered from the prefetch"
    );
    assert!(
        v["credentials"]["access_key_id"]
            .as_str()
            .unwrap()
            .starts_with("ASIA")
    );

    let body = env.proxy.last_request("AssumeRole/team.app-0").unwrap();
    for tag in [
        "Value=sandbox",
        "Key=eks-cluster-name",
        "Key=kubernetes-namespace",
        "Value=team",
        "Key=kubernetes-service-account",
        "Value=app",
        "Key=kubernetes-pod-name",
        "Value=app-0",
        "Key=kubernetes-pod-uid",
        "TransitiveTagKeys.member.1=eks-cluster-name",
    ] {
        assert!(body.contains(tag), "{tag} missing from {body}");
    }

    // An association wins over the annotation, and two conflict.
    env.kube
        .apply(association("team", "app-role", "app", &arn("app-assoc")));
    let wanted = arn("app-assoc");
    let mut last = Value::Null;
    for _ in 0..100 {
        let (code, v) = ask(&mut c, &token(&env, "app-0")).await;
        if code == 200 && v["role_arn"] == wanted.as_str() {
            last = v;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(last["role_arn"], wanted);
    env.kube
        .apply(association("team", "app-role-2", "app", &arn("app-other")));
    let mut refused = (0, Value::Null);
    for _ in 0..100 {
        refused = ask(&mut c, &token(&env, "app-0")).await;
        if refused.0 != 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(refused.0, 403, "{}", refused.1);
    assert!(
        refused.1["message"]
            .as_str()
            .unwrap()
            .contains("several PodIdentityAssociations"),
        "{}",
        refused.1
    );
}

#[tokio::test]
async fn tokens_that_are_not_a_live_pods_on_this_node_with_a_permitted_role_are_refused() {
    let env = start().await;
    let mut c = client(&env).await;
    let code = |v: &Value| v["code"].as_str().unwrap_or_default().to_string();

    // The namespace policy forbids the association's role.
    let (status, v) = ask(&mut c, &token(&env, "admin-0")).await;
    assert_eq!((status, code(&v)), (403, "forbidden".into()), "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("not permitted"),
        "{v}"
    );
    // No role for the ServiceAccount.
    let (status, v) = ask(&mut c, &token(&env, "plain-0")).await;
    assert_eq!((status, code(&v)), (403, "forbidden".into()), "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("has no role"),
        "{v}"
    );
    // A pod on another node than the asking agent's.
    let (status, v) = ask(&mut c, &token(&env, "app-b")).await;
    assert_eq!((status, code(&v)), (403, "node_mismatch".into()), "{v}");
    // A token for another audience (the agents').
    let other = env
        .kube
        .issue_pod_token("team", "app-0", "podiam", HOUR)
        .unwrap();
    let (status, v) = ask(&mut c, &other).await;
    assert_eq!((status, code(&v)), (400, "invalid_token".into()), "{v}");
    // An unknown token, and an expired one.
    let (status, v) = ask(&mut c, "aaa.bbb.ccc").await;
    assert_eq!((status, code(&v)), (400, "invalid_token".into()), "{v}");
    let expired = env
        .kube
        .issue_pod_token("team", "app-0", AUDIENCE, Duration::ZERO)
        .unwrap();
    let (status, v) = ask(&mut c, &expired).await;
    assert_eq!((status, code(&v)), (400, "invalid_token".into()), "{v}");
    // An agent's own token is no pod's.
    let (status, v) = ask(&mut c, AGENT_A).await;
    assert_eq!(status, 400, "{v}");

    // A deleted pod's token: refused even while its review is still remembered (the
    // index no longer has the pod), and by the API server after that.
    let app = token(&env, "app-0");
    assert_eq!(ask(&mut c, &app).await.0, 200);
    env.kube.delete_pod("team", "app-0");
    let mut gone = (0, Value::Null);
    for _ in 0..100 {
        gone = ask(&mut c, &app).await;
        if gone.0 != 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        (gone.0, code(&gone.1)),
        (404, "pod_not_found".into()),
        "{}",
        gone.1
    );
    // A new pod of the same name has another UID: the old token is still not its.
    env.kube.apply(
        pod("team", "app-0")
            .service_account("app")
            .node("node-a")
            .build(),
    );
    let (status, _) = ask(&mut c, &app).await;
    assert_ne!(status, 200);
    assert_eq!(ask(&mut c, &token(&env, "app-0")).await.0, 200);
}

#[tokio::test]
async fn the_webhook_mutates_only_pods_whose_service_account_has_a_role() {
    let env = start().await;
    let addr = webhook_addr(&env);
    let config = tls_config(&env.pki.ca, None).unwrap();
    let mut c = ApiClient::connect(addr, config).await.unwrap();
    let review = |sa: &str| {
        json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": format!("uid-{sa}"),
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": "team", "operation": "CREATE",
                "userInfo": {"username": "tester"},
                "object": {"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"generateName": "x-", "namespace": "team"},
                    "spec": {"serviceAccountName": sa, "containers": [{"name": "c", "image": "i"}]}}
            }
        })
    };
    let (status, v) = c.post("/mutate", None, review("app")).await.unwrap();
    assert_eq!(status, 200, "{v}");
    let response = &v["response"];
    assert_eq!(response["uid"], "uid-app");
    assert_eq!(response["allowed"], true);
    assert_eq!(response["patchType"], "JSONPatch");
    let patch = String::from_utf8(patch_bytes(&response["patch"]).unwrap()).unwrap();
    assert!(
        patch.contains("AWS_CONTAINER_CREDENTIALS_FULL_URI"),
        "{patch}"
    );
    assert!(patch.contains("eks-pod-identity-token"), "{patch}");

    // Applied as the API server applies it: the pod gets the volume and the environment.
    let pod = review("app")["request"]["object"].clone();
    let admitted = admit(addr, &env.pki.ca, "team", &pod).await.unwrap();
    let env_vars = admitted["spec"]["containers"][0]["env"].to_string();
    assert!(
        env_vars.contains("http://169.254.170.23/v1/credentials"),
        "{admitted}"
    );
    assert_eq!(
        admitted["spec"]["volumes"][0]["name"],
        "eks-pod-identity-token"
    );

    let (status, v) = c.post("/mutate", None, review("plain")).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(v["response"]["allowed"], true);
    assert!(v["response"].get("patch").is_none(), "{v}");
}

#[tokio::test]
async fn a_target_role_is_assumed_from_the_first_roles_session_and_both_must_be_permitted() {
    let env = start().await;
    let mut api = client(&env).await;
    let mut chained = association("team", "app-chain", "app", &arn("app-first"));
    chained["spec"]["targetRoleArn"] = json!(arn("app-target"));
    env.kube.apply(chained.clone());
    let mut answer = (0, Value::Null);
    for _ in 0..100 {
        answer = ask(&mut api, &token(&env, "app-0")).await;
        if answer.1["role_arn"] == arn("app-target").as_str() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(answer.0, 200, "{}", answer.1);
    assert_eq!(answer.1["role_arn"], arn("app-target"));
    // Two calls for the pod's session: the first role with the tags, then the target role
    // from that session (the tags are transitive: STS carries them over).
    let last = env.proxy.last_request("AssumeRole/team.app-0").unwrap();
    assert!(
        last.contains(&format!("RoleArn={}", arn("app-target"))),
        "{last}"
    );
    assert!(!last.contains("Tags.member"), "{last}");
    assert!(env.proxy.calls("AssumeRole/team.app-0") >= 2);
    // moto, asked with the credentials handed out, names the target role.
    let c = &answer.1["credentials"];
    let field = |name: &str| c[name].as_str().unwrap().to_string();
    let whose = podiam_tests::moto::caller_arn(
        &env.moto.url(),
        (
            &field("access_key_id"),
            &field("secret_access_key"),
            &field("session_token"),
        ),
    )
    .await
    .unwrap();
    assert!(
        whose.contains(":assumed-role/app-target/team.app-0"),
        "{whose}"
    );

    // A target role the namespace does not permit: refused, whatever the first role.
    chained["spec"]["targetRoleArn"] = json!(arn("admin"));
    env.kube.apply(chained);
    let mut refused = (0, Value::Null);
    for _ in 0..100 {
        refused = ask(&mut api, &token(&env, "app-0")).await;
        if refused.0 != 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(refused.0, 403, "{}", refused.1);
    assert!(
        refused.1["message"].as_str().unwrap().contains("admin"),
        "{}",
        refused.1
    );
}

#[tokio::test]
async fn without_the_crd_only_the_container_credentials_path_is_down() {
    let kube = FakeKube::start().await.unwrap();
    kube.remove_api(Kind::Association);
    kube.apply(namespace(
        "team",
        &[("iam.amazonaws.com/permitted", &arn("app.*"))],
    ));
    kube.apply(service_account("team", "app", Some(&arn("app"))));
    kube.apply(
        pod("team", "app-0")
            .service_account("app")
            .role("app-imds")
            .node("node-a")
            .ip("10.9.0.1")
            .build(),
    );
    kube.add_token(AGENT_A, agent_identity("node-a"));
    // Ready (the stack waits for it): the metadata path does not depend on the CRD.
    let env = ServerStack::start(std::path::Path::new(BIN), kube, &["--pod-identity"])
        .await
        .expect("the server is ready without the CRD");
    let mut c = client(&env).await;
    let (status, v) = c
        .post("/v1/credentials", Some(AGENT_A), json!({"ip": "10.9.0.1"}))
        .await
        .unwrap();
    assert_eq!(
        (status, v["role_arn"].as_str()),
        (200, Some(arn("app-imds").as_str())),
        "{v}"
    );
    let (status, v) = ask(&mut c, &token(&env, "app-0")).await;
    assert_eq!(
        (status, v["code"].as_str()),
        (503, Some("not_ready")),
        "{v}"
    );
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("podidentityassociations"),
        "{v}"
    );
}

/// Namespace `bound` permits `app*`; ServiceAccount `app` has role `app`. On node-a:
/// `one` (10.9.1.1), `two` (10.9.1.2) and the host-network `host` (the node's address,
/// 10.8.0.10); on node-b: `far` (10.9.2.1).
async fn start_bound() -> ServerStack {
    let kube = FakeKube::start().await.unwrap();
    kube.apply(namespace(
        "bound",
        &[("iam.amazonaws.com/permitted", &arn("app.*"))],
    ));
    kube.apply(service_account("bound", "app", Some(&arn("app"))));
    for (name, ip, node, host) in [
        ("one", "10.9.1.1", "node-a", false),
        ("two", "10.9.1.2", "node-a", false),
        ("host", "10.8.0.10", "node-a", true),
        ("far", "10.9.2.1", "node-b", false),
    ] {
        let mut p = pod("bound", name).service_account("app").node(node).ip(ip);
        if host {
            p = p.host_network();
        }
        kube.apply(p.build());
    }
    kube.add_token(AGENT_A, agent_identity("node-a"));
    let extra = [
        "--pod-identity",
        "--webhook-listen",
        "127.0.0.1:0",
        "--max-token-reviews-per-node",
        "2",
    ];
    ServerStack::start(std::path::Path::new(BIN), kube, &extra)
        .await
        .expect("server stack (moto: run scripts/setup)")
}

async fn ask_from(c: &mut ApiClient, token: &str, ip: &str) -> (u16, Value) {
    c.post(
        "/v1/pod-identity",
        Some(AGENT_A),
        json!({"token": token, "ip": ip}),
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn a_token_is_worth_credentials_only_from_its_own_pods_address() {
    let env = start_bound().await;
    let mut c = client(&env).await;
    let one = env
        .kube
        .issue_pod_token("bound", "one", AUDIENCE, HOUR)
        .unwrap();
    let (code, v) = ask_from(&mut c, &one, "10.9.1.1").await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["role_arn"], arn("app"));

    // `two` has read `one`'s token (a shared volume, a log line): worth nothing from its
    // own address, nor from the node's (a host-network process).
    for thief in ["10.9.1.2", "10.8.0.10"] {
        let (code, v) = ask_from(&mut c, &one, thief).await;
        assert_eq!(code, 400, "from {thief}: {v}");
        assert_eq!(v["code"], "invalid_token", "{v}");
    }
    assert!(
        env.kube
            .wait_event(|e| e["regarding"]["name"] == "one" && e["reason"] == "TokenUsedElsewhere")
            .await
            .is_some(),
        "{:?}",
        env.kube.events()
    );
    // A host-network pod's addresses are its node's.
    let host = env
        .kube
        .issue_pod_token("bound", "host", AUDIENCE, HOUR)
        .unwrap();
    let (code, v) = ask_from(&mut c, &host, "10.8.0.10").await;
    assert_eq!(code, 200, "{v}");
    let (code, _) = ask_from(&mut c, &host, "10.9.1.2").await;
    assert_eq!(code, 400);
    // IPv4-mapped IPv6 is the same address.
    let (code, v) = ask_from(&mut c, &one, "::ffff:10.9.1.1").await;
    assert_eq!(code, 200, "{v}");

    // A pod whose first request comes before its IP reached the server: "not yet" (which
    // the agent answers 503, retried), never "not yours".
    env.kube.apply(
        pod("bound", "fresh")
            .service_account("app")
            .node("node-a")
            .build(),
    );
    let fresh = env
        .kube
        .issue_pod_token("bound", "fresh", AUDIENCE, HOUR)
        .unwrap();
    let (code, v) = ask_from(&mut c, &fresh, "10.9.1.5").await;
    assert_eq!((code, v["code"].as_str()), (503, Some("not_ready")), "{v}");
    env.kube.apply(
        pod("bound", "fresh")
            .service_account("app")
            .node("node-a")
            .ip("10.9.1.5")
            .build(),
    );
    let (code, v) = ask_from(&mut c, &fresh, "10.9.1.5").await;
    assert_eq!(code, 200, "{v}");
}

#[tokio::test]
async fn one_nodes_new_tokens_wait_for_its_own_share_of_token_reviews() {
    let env = start_bound().await;
    let mut c = client(&env).await;
    let token = |n: u32| {
        env.kube
            .issue_pod_token(
                "bound",
                "one",
                AUDIENCE,
                HOUR + Duration::from_secs(n.into()),
            )
            .unwrap()
    };
    // The agent's own token is reviewed (and remembered) first.
    let (code, v) = ask_from(&mut c, &token(0), "10.9.1.1").await;
    assert_eq!(code, 200, "{v}");
    // The API server sits on every TokenReview: node-a's two reviews in flight are its
    // share (--max-token-reviews-per-node 2), and a third new token is turned away at
    // once rather than queued behind them (or ahead of other nodes' reviews).
    let hold = env.kube.hold_token_reviews();
    let before = env.kube.token_review_attempts();
    let mut waiting = Vec::new();
    for n in 1..=2 {
        let config = tls_config(&env.pki.ca, Some(&env.pki.client)).unwrap();
        let (token, api) = (token(n), env.api);
        waiting.push(tokio::spawn(async move {
            let mut c = ApiClient::connect(api, config).await.unwrap();
            ask_from(&mut c, &token, "10.9.1.1").await
        }));
    }
    // Both have reached the API server (and wait there).
    for _ in 0..100 {
        if env.kube.token_review_attempts() >= before + 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(env.kube.token_review_attempts(), before + 2);
    let started = std::time::Instant::now();
    let (code, throttled) = ask_from(&mut c, &token(9), "10.9.1.1").await;
    assert_eq!(code, 429, "{throttled}");
    assert_eq!(throttled["code"], "throttled", "{throttled}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "turned away at once"
    );
    assert_eq!(env.kube.token_review_attempts(), before + 2, "never sent");
    drop(hold);
    for w in waiting {
        w.await.unwrap();
    }
    // The share is free again.
    let (code, v) = ask_from(&mut c, &token(10), "10.9.1.1").await;
    assert_eq!(code, 200, "{v}");
}

#[tokio::test]
async fn idle_connections_from_one_address_cannot_switch_the_webhook_off() {
    use tokio::io::AsyncReadExt;
    const HOSTILE: &str = "127.0.0.77";
    let env = start().await;
    let addr = webhook_addr(&env);
    // One address that reaches the port holds 300 idle TLS connections (the review's
    // attack needed 128 to fill every slot).
    let config = tls_config(&env.pki.ca, None).unwrap();
    let mut idle = Vec::new();
    for _ in 0..300 {
        let from = HOSTILE.parse().unwrap();
        if let Ok(tls) = podiam_tests::api_client::idle_tls(from, addr, config.clone()).await {
            idle.push(tls);
        }
    }
    // The API server, from its own address, still gets its answer.
    let pod = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "x", "namespace": "team"},
        "spec": {"serviceAccountName": "app", "containers": [{"name": "c", "image": "i"}]}});
    let admitted = admit(addr, &env.pki.ca, "team", &pod).await.unwrap();
    assert!(
        admitted["spec"]["containers"][0]["env"]
            .to_string()
            .contains("AWS_CONTAINER_CREDENTIALS_FULL_URI"),
        "{admitted}"
    );
    let refused = env
        .metric(r#"podiam_listener_refused_total{listener="webhook",reason="per_source"}"#)
        .await;
    assert!(refused >= (300 - 32) as f64, "refused {refused}");
    // A connection that sends no request is closed soon after its handshake.
    let mut held = idle
        .pop()
        .expect("some connections get through the handshake");
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(15), held.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "an idle connection still open: {closed:?}"
    );
    assert!(
        env.metric(r#"podiam_listener_idle_closed_total{listener="webhook",when="first"}"#)
            .await
            >= 1.0
    );
}

#[tokio::test]
async fn with_a_client_ca_only_the_api_servers_certificate_reaches_the_webhook() {
    let kube = FakeKube::start().await.unwrap();
    kube.apply(namespace("team", &[]));
    kube.apply(service_account("team", "app", Some(&arn("app"))));
    let dir = tempfile::tempdir().unwrap();
    // The API server's client certificate comes from a CA of its own.
    let api_server_pki = podiam_tests::certs::Pki::generate(dir.path(), "apiserver").unwrap();
    let client_ca = api_server_pki.ca.to_string_lossy().into_owned();
    let extra = [
        "--pod-identity",
        "--webhook-listen",
        "127.0.0.1:0",
        "--webhook-client-ca",
        &client_ca,
    ];
    let env = ServerStack::start(std::path::Path::new(BIN), kube, &extra)
        .await
        .expect("server stack (moto: run scripts/setup)");
    let addr = webhook_addr(&env);
    let pod = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "x", "namespace": "team"},
        "spec": {"serviceAccountName": "app", "containers": [{"name": "c", "image": "i"}]}});
    // No client certificate (any pod that reaches the port), or one of another CA (an
    // agent's): no answer.
    assert!(admit(addr, &env.pki.ca, "team", &pod).await.is_err());
    for stranger in [&env.pki.client, &env.other.client] {
        let config = tls_config(&env.pki.ca, Some(stranger)).unwrap();
        assert!(ApiClient::connect(addr, config).await.is_err());
    }
    // The API server's certificate: answered.
    let config = tls_config(&env.pki.ca, Some(&api_server_pki.client)).unwrap();
    let mut c = ApiClient::connect(addr, config).await.unwrap();
    let review = podiam_tests::admission::review("uid-1", "team", &pod);
    let (status, v) = c.post("/mutate", None, review).await.unwrap();
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["response"]["patchType"], "JSONPatch", "{v}");
}
