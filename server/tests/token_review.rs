//! TokenReview hygiene: one review in flight per token, no trust without the audience
//! confirmed, and never past the token's `exp`. The reviewer is the server's own, talking
//! to the stand-in API server (a test double) over HTTP.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::Engine;
use podiam_server::auth::{AgentTokens, AuthError, Authenticate, TokenReviewer};
use podiam_tests::{kube_api::FakeKube, stack::agent_identity};

/// A JWT-shaped token whose payload carries `exp` (the stand-in does not check signatures).
fn jwt(exp: u64) -> String {
    let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(format!(r#"{{"aud":["podiam"],"exp":{exp}}}"#));
    format!("eyJhbGciOiJSUzI1NiJ9.{claims}.c2ln")
}

fn token_reviewer(kube: &FakeKube, ttl: Duration) -> TokenReviewer {
    let client = kube::Client::try_from(kube::Config::new(kube.url().parse().unwrap())).unwrap();
    TokenReviewer::new(client, "podiam".into(), ttl)
}

fn reviewer(kube: &FakeKube, ttl: Duration) -> AgentTokens {
    AgentTokens::new(token_reviewer(kube, ttl), "podiam", "podiam-agent")
}

/// A clock the test moves, in seconds since the epoch.
fn clock(start: u64) -> (Arc<AtomicU64>, Arc<dyn Fn() -> SystemTime + Send + Sync>) {
    let secs = Arc::new(AtomicU64::new(start));
    let read = secs.clone();
    let now = Arc::new(move || UNIX_EPOCH + Duration::from_secs(read.load(Ordering::SeqCst)));
    (secs, now)
}

/// An agent token expiring `exp_in` seconds after the test clock's start, known to a
/// stand-in API server, and a reviewer on that clock caching reviews for `cache`.
struct Expiring {
    kube: FakeKube,
    token: String,
    start: u64,
    secs: Arc<AtomicU64>,
    auth: AgentTokens,
}

async fn expiring(exp_in: u64, cache: Duration) -> Expiring {
    let kube = FakeKube::start().await.unwrap();
    let start = 1_900_000_000;
    let (secs, now) = clock(start);
    let token = jwt(start + exp_in);
    kube.add_token(&token, agent_identity("node-a"));
    let auth = AgentTokens::new(
        token_reviewer(&kube, cache).with_clock(now),
        "podiam",
        "podiam-agent",
    );
    Expiring {
        kube,
        token,
        start,
        secs,
        auth,
    }
}

#[tokio::test]
async fn one_review_in_flight_per_token() {
    let kube = FakeKube::start().await.unwrap();
    let token = jwt(4_000_000_000);
    kube.add_token(&token, agent_identity("node-a"));
    let auth = reviewer(&kube, Duration::from_secs(30));
    let hold = kube.hold_token_reviews();
    let calls: Vec<_> = (0..50).map(|_| auth.authenticate(Some(&token))).collect();
    let waiting = tokio::spawn(futures::future::join_all(calls));
    // The first review has reached the API server and is held there.
    while kube.token_review_attempts() == 0 {
        tokio::task::yield_now().await;
    }
    drop(hold);
    let results = waiting.await.unwrap();
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(
        kube.token_review_attempts(),
        1,
        "50 concurrent requests with one token make one TokenReview"
    );
    // Cached afterwards.
    auth.authenticate(Some(&token)).await.unwrap();
    assert_eq!(kube.token_review_attempts(), 1);
}

#[tokio::test]
async fn a_review_that_does_not_confirm_the_audience_is_refused() {
    let kube = FakeKube::start().await.unwrap();
    let token = jwt(4_000_000_000);
    kube.add_token(&token, agent_identity("node-a"));
    kube.set_reviews_without_audiences(true);
    let auth = reviewer(&kube, Duration::from_secs(30));
    let error = auth.authenticate(Some(&token)).await.unwrap_err();
    assert!(
        matches!(&error, AuthError::Rejected(why) if why.contains("audience")),
        "{error}"
    );
}

#[tokio::test]
async fn an_accepted_token_is_never_trusted_past_its_exp() {
    // Expires in 10 s; the review cache would keep it for an hour.
    let Expiring {
        kube,
        token,
        start,
        secs,
        auth,
    } = expiring(10, Duration::from_secs(3600)).await;
    auth.authenticate(Some(&token)).await.unwrap();
    auth.authenticate(Some(&token)).await.unwrap();
    assert_eq!(kube.token_review_attempts(), 1, "cached before exp");

    secs.store(start + 11, Ordering::SeqCst);
    let error = auth.authenticate(Some(&token)).await.unwrap_err();
    assert!(
        matches!(&error, AuthError::Rejected(why) if why.contains("expired")),
        "{error}"
    );
    // Nor from the outage fallback: a failing API server does not bring it back.
    kube.set_token_reviews_down(true);
    assert!(auth.authenticate(Some(&token)).await.is_err());
}

#[tokio::test]
async fn during_an_outage_a_known_token_is_trusted_only_until_its_exp() {
    // A short review cache, so the next request reviews again.
    let Expiring {
        kube,
        token,
        start,
        secs,
        auth,
    } = expiring(600, Duration::from_millis(1)).await;
    auth.authenticate(Some(&token)).await.unwrap();
    kube.set_token_reviews_down(true);
    tokio::time::sleep(Duration::from_millis(5)).await;
    secs.store(start + 300, Ordering::SeqCst);
    auth.authenticate(Some(&token))
        .await
        .expect("known and not expired: served through the outage");
    secs.store(start + 601, Ordering::SeqCst);
    assert!(auth.authenticate(Some(&token)).await.is_err());
}

#[tokio::test]
async fn a_review_nobody_waits_for_any_more_never_answers_a_later_request() {
    let Expiring {
        kube,
        token,
        start,
        secs,
        auth,
    } = expiring(10, Duration::from_secs(3600)).await;
    // The only caller gives up while its review is under way (agent timeout, disconnect).
    let hold = kube.hold_token_reviews();
    let call = tokio::spawn(auth.authenticate(Some(&token)));
    while kube.token_review_attempts() == 0 {
        tokio::task::yield_now().await;
    }
    call.abort();
    drop(hold);
    // The review finishes on its own and leaves nothing in flight.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while kube.token_reviews() == 0 || auth.reviewer().reviews_in_flight() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the review never finished"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Past the token's exp, nothing remembered answers for it.
    secs.store(start + 11, Ordering::SeqCst);
    assert!(auth.authenticate(Some(&token)).await.is_err());
}
