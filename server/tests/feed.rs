//! The node feed end to end: the real server binary, mutual TLS, node binding through
//! TokenReview (stand-in API server), moto as STS, and a tonic client standing for an
//! agent. (The addresses below are data in pod objects: nothing is sent to them.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use podiam_common::feed::{Held, NodeUpdate, PodState};
use podiam_tests::{
    api_client::{tls_config, watch_feed},
    kube_api::FakeKube,
    objects::{TeamA, pod, team_a},
    stack::{ServerStack, agent_identity, arn},
};

const BIN: &str = env!("CARGO_BIN_EXE_podiam-server");
const AGENT_A: &str = "token-agent-node-a";

async fn start() -> ServerStack {
    start_with(&[]).await
}

/// [`start`] with `extra` server flags.
async fn start_with(extra: &[&str]) -> ServerStack {
    let kube = FakeKube::start().await.unwrap();
    for object in team_a(TeamA {
        web: "10.0.0.1",
        denied: "10.0.0.2",
        other_node: "10.0.0.3",
    }) {
        kube.apply(object);
    }
    kube.add_token(AGENT_A, agent_identity("node-a"));
    let flags: Vec<&str> = ["--feed-heartbeat", "300ms"]
        .into_iter()
        .chain(extra.iter().copied())
        .collect();
    ServerStack::start(std::path::Path::new(BIN), kube, &flags)
        .await
        .expect("server stack (moto: run scripts/setup)")
}

type Stream = tonic::Streaming<NodeUpdate>;

async fn subscribe(
    env: &ServerStack,
    token: Option<&str>,
    node: &str,
    held: Vec<Held>,
) -> Result<Stream, tonic::Status> {
    let config = tls_config(&env.pki.ca, Some(&env.pki.client)).unwrap();
    watch_feed(env.api, config, token, node, held)
        .await
        .unwrap()
}

async fn next(stream: &mut Stream) -> NodeUpdate {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("an update within 10 s")
        .unwrap()
        .expect("the stream goes on")
}

/// Reads updates until `done` holds for the pods seen so far (by name), up to 10 s.
async fn until(
    stream: &mut Stream,
    pods: &mut std::collections::HashMap<String, PodState>,
    done: impl Fn(&std::collections::HashMap<String, PodState>) -> bool,
) {
    while !done(pods) {
        let u = next(stream).await;
        for p in u.pods {
            pods.insert(p.name.clone(), p);
        }
        for uid in u.removed {
            pods.retain(|_, p| p.uid != uid);
        }
    }
}

#[tokio::test]
async fn an_agent_gets_its_nodes_pods_then_changes_and_a_resume_sends_only_what_changed() {
    let env = start().await;
    let mut stream = subscribe(&env, Some(AGENT_A), "", vec![]).await.unwrap();
    let first = next(&mut stream).await;
    assert!(first.synced, "{first:?}");
    assert_eq!(first.heartbeat_ms, 300);
    let mut names: Vec<&str> = first.pods.iter().map(|p| p.name.as_str()).collect();
    names.sort();
    // Only this node's pods.
    assert_eq!(names, ["admin", "web-0"]);
    let admin = first.pods.iter().find(|p| p.name == "admin").unwrap();
    assert!(admin.role_arn.is_empty() && admin.credentials.is_none());
    assert_eq!(admin.denial.as_ref().unwrap().code, "forbidden");
    assert!(
        admin
            .denial
            .as_ref()
            .unwrap()
            .message
            .contains("not permitted")
    );

    // The allowed pod's credentials follow once fetched.
    let mut pods = first
        .pods
        .into_iter()
        .map(|p| (p.name.clone(), p))
        .collect();
    until(&mut stream, &mut pods, |p| p["web-0"].credentials.is_some()).await;
    let web = pods["web-0"].clone();
    assert_eq!(web.role_arn, arn("web"));
    assert!(
        web.credentials
            .as_ref()
            .unwrap()
            .access_key_id
            .starts_with("ASIA")
    );
    assert_eq!(web.version, web.clone().sealed().version);

    // A new pod on the node, one on another node, and a deletion.
    env.kube.apply(
        pod("team-a", "web-1")
            .ip("10.0.0.5")
            .role("web")
            .node("node-a")
            .build(),
    );
    env.kube.apply(
        pod("team-a", "web-c")
            .ip("10.0.0.6")
            .role("web")
            .node("node-b")
            .build(),
    );
    until(&mut stream, &mut pods, |p| {
        p.get("web-1").is_some_and(|w| w.credentials.is_some())
    })
    .await;
    env.kube.delete_pod("team-a", "admin");
    until(&mut stream, &mut pods, |p| !p.contains_key("admin")).await;
    assert!(!pods.contains_key("web-c"));

    // Quiet: heartbeats, empty.
    let beat = next(&mut stream).await;
    assert!(
        beat.pods.is_empty() && beat.removed.is_empty() && !beat.synced,
        "{beat:?}"
    );

    // A resume with what the agent holds: nothing to send but the sync mark; a pod the
    // agent holds that is gone is removed.
    let mut held: Vec<Held> = pods
        .values()
        .map(|p| Held {
            uid: p.uid.clone(),
            version: p.version,
        })
        .collect();
    held.push(Held {
        uid: "00000000-0000-0000-0000-00000000dead".into(),
        version: 1,
    });
    drop(stream);
    let mut stream = subscribe(&env, Some(AGENT_A), "node-a", held)
        .await
        .unwrap();
    let resumed = next(&mut stream).await;
    assert!(resumed.synced);
    assert!(resumed.pods.is_empty(), "{resumed:?}");
    assert_eq!(resumed.removed, ["00000000-0000-0000-0000-00000000dead"]);
}

#[tokio::test]
async fn a_subscription_is_for_the_agents_own_node_only() {
    let env = start().await;
    let refused = subscribe(&env, Some(AGENT_A), "node-b", vec![])
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    let refused = subscribe(&env, None, "node-a", vec![]).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    let refused = subscribe(&env, Some("not-a-token"), "", vec![])
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    assert_eq!(
        env.metric(r#"podiam_feed_subscriptions_total{result="refused"}"#)
            .await,
        3.0
    );
}

/// The next message: an update, or the status the stream ended with.
async fn next_result(stream: &mut Stream) -> Result<Option<NodeUpdate>, tonic::Status> {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("a message or an end within 10 s")
}

/// Reads until the stream ends (within 20 s); the status it ended with.
async fn ended(stream: &mut Stream) -> tonic::Status {
    let end = async {
        loop {
            match next_result(stream).await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the stream ended without a status"),
                Err(status) => return status,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), end)
        .await
        .expect("the stream still going after 20 s")
}

#[tokio::test]
async fn a_stale_view_ends_every_feed_and_refuses_new_ones_until_it_is_current_again() {
    let env = start_with(&["--watch-stale-after", "1s"]).await;
    let mut stream = subscribe(&env, Some(AGENT_A), "", vec![]).await.unwrap();
    assert!(next(&mut stream).await.synced);

    // The API server goes away: the watches fail, and past --watch-stale-after the view
    // is stale. The open stream must end, not go on sending from the frozen index.
    env.kube
        .refuse_reads(Some(http::StatusCode::SERVICE_UNAVAILABLE));
    env.kube.drop_watches();
    let status = ended(&mut stream).await;
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("not ready"), "{status:?}");
    assert_eq!(
        env.metric(r#"podiam_feed_ended_total{reason="not_ready"}"#)
            .await,
        1.0
    );
    let refused = subscribe(&env, Some(AGENT_A), "", vec![])
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");

    // Back: a fresh list opens the gate, and agents subscribe again.
    env.kube.refuse_reads(None);
    let mut resubscribed = None;
    for _ in 0..100 {
        match subscribe(&env, Some(AGENT_A), "", vec![]).await {
            Ok(stream) => {
                resubscribed = Some(stream);
                break;
            }
            Err(status) => assert_eq!(status.code(), tonic::Code::Unavailable),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut stream = resubscribed.expect("subscribed again once the view is current");
    assert!(next(&mut stream).await.synced);
}

#[tokio::test]
async fn one_node_cannot_make_a_server_hold_more_than_its_share() {
    let env = start().await;
    let held = |n: usize, uid_len: usize| -> Vec<Held> {
        (0..n)
            .map(|i| Held {
                uid: format!("{i:0>uid_len$}"),
                version: u64::MAX,
            })
            .collect()
    };
    // A held list longer than any node's pods.
    let refused = subscribe(&env, Some(AGENT_A), "", held(4097, 36))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");

    // Eight subscriptions of 3.75 MB each (250,000 invented UIDs, the review's attack):
    // refused by the decoder, and the server's memory stays where it was.
    let quiet = env.server.rss_kib().unwrap();
    let attacks: Vec<_> = (0..8)
        .map(|_| subscribe(&env, Some(AGENT_A), "", held(250_000, 8)))
        .collect();
    for refused in futures::future::join_all(attacks).await {
        let refused = refused.unwrap_err();
        assert!(
            matches!(
                refused.code(),
                tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
            ),
            "{refused:?}"
        );
    }
    let after = env.server.rss_kib().unwrap();
    assert!(
        after < quiet + 50 * 1024,
        "RSS {quiet} KiB → {after} KiB under one node's oversized subscriptions"
    );

    // At most two subscriptions of one node at once: a third ends the oldest, which is
    // told why; the newer two go on.
    let mut first = subscribe(&env, Some(AGENT_A), "", vec![]).await.unwrap();
    assert!(next(&mut first).await.synced);
    let mut second = subscribe(&env, Some(AGENT_A), "", vec![]).await.unwrap();
    assert!(next(&mut second).await.synced);
    let mut third = subscribe(&env, Some(AGENT_A), "", vec![]).await.unwrap();
    assert!(next(&mut third).await.synced);
    let status = ended(&mut first).await;
    assert_eq!(status.code(), tonic::Code::Aborted, "{status:?}");
    for stream in [&mut second, &mut third] {
        // Heartbeats go on.
        assert!(next_result(stream).await.unwrap().is_some());
    }
    assert_eq!(
        env.metric(r#"podiam_feed_ended_total{reason="replaced"}"#)
            .await,
        1.0
    );
    assert_eq!(env.metric("podiam_feed_streams").await, 2.0);
}

#[tokio::test]
async fn without_node_binding_a_named_node_cannot_have_its_feed_taken_over() {
    // With --node-binding=off a subscription only names its node, so anyone with the
    // agents' certificate could name any node: beyond the node's share, a newer one is
    // refused rather than ending the real agent's feed.
    let env = start_with(&["--node-binding", "off"]).await;
    let mut first = subscribe(&env, None, "node-a", vec![]).await.unwrap();
    assert!(next(&mut first).await.synced);
    let mut second = subscribe(&env, None, "node-a", vec![]).await.unwrap();
    assert!(next(&mut second).await.synced);
    let refused = subscribe(&env, None, "node-a", vec![]).await.unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    // The first two go on.
    for stream in [&mut first, &mut second] {
        assert!(next_result(stream).await.unwrap().is_some());
    }
    assert_eq!(env.metric("podiam_feed_streams").await, 2.0);
}
