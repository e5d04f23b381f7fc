//! Token authentication: agents (and node binding), and pods on the container-credentials
//! path.
//!
//! [`TokenReviewer`] asks the API server about a projected ServiceAccount token (a
//! TokenReview for one audience) and says whose it is: the ServiceAccount, and the pod and
//! node it is bound to ([`Reviewed`]). Results are cached briefly by token hash, and never
//! past the token's own `exp`. One review is in flight per token however many requests
//! carry it (on its own task, so a caller that gives up does not cancel it for the others).
//! A review whose status does not list the audience asked for is refused: an
//! authenticator that ignores audiences would otherwise pass any ServiceAccount token.
//! While the API server cannot be reached, a token accepted before keeps being accepted
//! until it expires (at most [`STALE_LIMIT`] after its last review), so that an API server
//! outage does not stop callers that were already known from being served.
//!
//! [`AgentTokens`] is agent authentication on top of it: the token must belong to the
//! agent's ServiceAccount, and the agent's node is the token's
//! `authentication.kubernetes.io/node-name` extra. Every projected token of every pod
//! carries that extra, which is why the ServiceAccount must match too: without that check,
//! any pod's token would pass for an agent.

use std::{
    collections::HashMap,
    fmt,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures::{
    FutureExt,
    future::{BoxFuture, Shared},
};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::{Api, Client, api::PostParams};
use parking_lot::Mutex;

use podiam_common::clock::{Clock, SystemClock};

use crate::credentials::Caller;

/// How long a token accepted by a TokenReview is still accepted while TokenReviews fail
/// (bounded by the token's own expiry).
pub const STALE_LIMIT: Duration = Duration::from_secs(3600);

/// How long a TokenReview may take before it counts as failed (agents give up on a server
/// after 5 s by default).
pub const REVIEW_TIMEOUT: Duration = Duration::from_secs(2);

/// TokenReviews in flight at most per reviewer: a flood of distinct tokens (each a
/// review) waits here instead of piling onto the API server; a review that cannot start
/// within [`REVIEW_TIMEOUT`] counts as failed.
pub const MAX_REVIEWS_IN_FLIGHT: usize = 64;

/// The token extra that names the node of the pod the token was issued to.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
/// The token extra that names the pod the token is bound to.
pub const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
/// The token extra that carries the UID of the pod the token is bound to.
pub const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";

/// Decides who is asking from the request's bearer token.
pub trait Authenticate: Send + Sync + fmt::Debug + 'static {
    /// The caller, or why not.
    fn authenticate(&self, token: Option<&str>) -> BoxFuture<'static, Result<Caller, AuthError>>;
}

/// Why a caller was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token.
    #[error("no ServiceAccount token")]
    Missing,
    /// The API server did not authenticate the token.
    #[error("token not accepted: {0}")]
    Rejected(String),
    /// The token is valid but not the agent's.
    #[error("token belongs to {0:?}, not to the agent's ServiceAccount")]
    NotAgent(String),
    /// The token carries no node name (bound to no pod, or an old API server).
    #[error(
        "token carries no {NODE_NAME_EXTRA} (use --node-binding=off on clusters that cannot provide it)"
    )]
    NoNode,
    /// The TokenReview call failed.
    #[error("TokenReview failed: {0}")]
    Unavailable(String),
    /// The asking party already has its share of reviews in flight.
    #[error("too many TokenReviews in flight for this node; try again shortly")]
    Busy,
}

/// Whose a token is, as the API server's TokenReview said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reviewed {
    /// `system:serviceaccount:NAMESPACE:NAME` for ServiceAccount tokens.
    pub username: Arc<str>,
    /// The node of the pod the token is bound to.
    pub node: Option<Arc<str>>,
    /// The pod the token is bound to.
    pub pod_name: Option<Arc<str>>,
    /// That pod's UID.
    pub pod_uid: Option<Arc<str>>,
}

/// Node binding off: every mTLS-authenticated agent may ask for any pod.
#[derive(Clone, Copy, Debug, Default)]
pub struct Unbound;

/// Agents' tokens: reviewed for the agents' audience, and accepted only from the agent's
/// ServiceAccount, whose node is the caller's.
#[derive(Clone)]
pub struct AgentTokens {
    reviewer: TokenReviewer,
    /// `system:serviceaccount:NAMESPACE:NAME`.
    agent_user: String,
}

/// TokenReviews for one audience, with a short cache.
#[derive(Clone)]
pub struct TokenReviewer {
    api: Api<TokenReview>,
    audience: String,
    /// Keyed by SHA-256 of the token, so the cache holds no tokens; with the time past
    /// which the token is not trusted (its `exp`), if it has one.
    accepted: moka::sync::Cache<[u8; 32], (Reviewed, Option<SystemTime>)>,
    /// The one review in flight per token.
    inflight: Arc<Mutex<HashMap<[u8; 32], Review>>>,
    rejected: moka::sync::Cache<[u8; 32], AuthError>,
    /// Accepted tokens with their expiry, for when the API server cannot be reached.
    known: moka::sync::Cache<[u8; 32], (Reviewed, SystemTime)>,
    /// When the fallback was last logged (Unix seconds).
    warned: Arc<AtomicU64>,
    /// The wall clock (tests move it).
    now: Arc<dyn Fn() -> SystemTime + Send + Sync>,
    /// Bounds the reviews in flight ([`MAX_REVIEWS_IN_FLIGHT`]).
    permits: Arc<tokio::sync::Semaphore>,
    /// Reviews in flight per asking party (a node), and the most one may have.
    parties: Arc<Mutex<HashMap<Arc<str>, usize>>>,
    per_party: usize,
}

/// A party's place among the reviews in flight; released when dropped.
struct PartySlot {
    parties: Arc<Mutex<HashMap<Arc<str>, usize>>>,
    party: Arc<str>,
}

type Review = Shared<BoxFuture<'static, Result<Reviewed, AuthError>>>;

// === impl Unbound ===

impl Authenticate for Unbound {
    fn authenticate(&self, _token: Option<&str>) -> BoxFuture<'static, Result<Caller, AuthError>> {
        futures::future::ready(Ok(Caller { node: None })).boxed()
    }
}

// === impl AgentTokens ===

impl AgentTokens {
    /// Accepts the tokens `reviewer` accepts that belong to `agent_namespace/agent_name`.
    pub fn new(reviewer: TokenReviewer, agent_namespace: &str, agent_name: &str) -> Self {
        Self {
            reviewer,
            agent_user: format!("system:serviceaccount:{agent_namespace}:{agent_name}"),
        }
    }

    /// The reviewer underneath (for tests).
    pub fn reviewer(&self) -> &TokenReviewer {
        &self.reviewer
    }
}

impl Authenticate for AgentTokens {
    fn authenticate(&self, token: Option<&str>) -> BoxFuture<'static, Result<Caller, AuthError>> {
        let review = self.reviewer.review(token);
        let agent_user = self.agent_user.clone();
        async move {
            let reviewed = review.await?;
            if *reviewed.username != *agent_user {
                return Err(AuthError::NotAgent(reviewed.username.to_string()));
            }
            let node = reviewed.node.ok_or(AuthError::NoNode)?;
            Ok(Caller { node: Some(node) })
        }
        .boxed()
    }
}

impl fmt::Debug for AgentTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentTokens")
            .field("reviewer", &self.reviewer)
            .field("agent_user", &self.agent_user)
            .finish()
    }
}

// === impl PartySlot ===

impl Drop for PartySlot {
    fn drop(&mut self) {
        let mut parties = self.parties.lock();
        if let Some(n) = parties.get_mut(&self.party) {
            *n -= 1;
            if *n == 0 {
                parties.remove(&self.party);
            }
        }
    }
}

// === impl TokenReviewer ===

impl TokenReviewer {
    /// Reviews tokens for `audience`, remembering verdicts for `ttl`.
    pub fn new(client: Client, audience: String, ttl: Duration) -> Self {
        Self {
            api: Api::all(client),
            audience,
            accepted: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(ttl)
                .build(),
            // Refusals are remembered for less time: a fixed token works again soon.
            rejected: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(ttl.min(Duration::from_secs(5)))
                .build(),
            known: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(STALE_LIMIT)
                .build(),
            warned: Arc::new(AtomicU64::new(0)),
            inflight: Arc::new(Mutex::new(HashMap::new())),
            now: Arc::new(|| SystemClock.now()),
            permits: Arc::new(tokio::sync::Semaphore::new(MAX_REVIEWS_IN_FLIGHT)),
            parties: Arc::new(Mutex::new(HashMap::new())),
            per_party: MAX_REVIEWS_IN_FLIGHT,
        }
    }

    /// The same reviewer letting one party (see [`TokenReviewer::review_for`]) have at most
    /// `n` reviews in flight, so that one node's forged tokens wait for their own share.
    pub fn per_party(mut self, n: usize) -> Self {
        self.per_party = n.clamp(1, MAX_REVIEWS_IN_FLIGHT);
        self
    }

    /// The same reviewer reading the time from `now` (for tests of expiry).
    pub fn with_clock(mut self, now: Arc<dyn Fn() -> SystemTime + Send + Sync>) -> Self {
        self.now = now;
        self
    }

    /// The audience tokens are reviewed for.
    pub fn audience(&self) -> &str {
        &self.audience
    }

    /// TokenReviews under way.
    pub fn reviews_in_flight(&self) -> usize {
        self.inflight.lock().len()
    }

    /// Whose `token` is: from memory, or from a TokenReview.
    pub fn review(&self, token: Option<&str>) -> BoxFuture<'static, Result<Reviewed, AuthError>> {
        self.review_for(token, None)
    }

    /// Like [`TokenReviewer::review`], on behalf of `party` (the asking agent's node): a
    /// review that must start while the party has its share in flight is refused with
    /// [`AuthError::Busy`] (tokens remembered, or already under review, are answered).
    pub fn review_for(
        &self,
        token: Option<&str>,
        party: Option<&Arc<str>>,
    ) -> BoxFuture<'static, Result<Reviewed, AuthError>> {
        let Some(token) = token.map(str::trim).filter(|t| !t.is_empty()) else {
            return futures::future::ready(Err(AuthError::Missing)).boxed();
        };
        let mut key = [0u8; 32];
        key.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref());
        match self.accepted.get(&key) {
            Some((reviewed, until)) if until.is_none_or(|t| (self.now)() < t) => {
                return futures::future::ready(Ok(reviewed)).boxed();
            }
            // Past the token's `exp`: never from memory again.
            Some(_) => self.accepted.invalidate(&key),
            None => {}
        }
        if let Some(error) = self.rejected.get(&key) {
            return futures::future::ready(Err(error)).boxed();
        }
        match self.single_flight(token, key, party) {
            Some(review) => review.boxed(),
            None => futures::future::ready(Err(AuthError::Busy)).boxed(),
        }
    }

    /// The review of `token` in flight, started if there is none (`None`: `party` has its
    /// share in flight already).
    fn single_flight(
        &self,
        token: &str,
        key: [u8; 32],
        party: Option<&Arc<str>>,
    ) -> Option<Review> {
        let mut inflight = self.inflight.lock();
        if let Some(review) = inflight.get(&key) {
            return Some(review.clone());
        }
        let slot = match party {
            Some(party) => Some(self.party_slot(party)?),
            None => None,
        };
        let this = self.clone();
        let token = token.to_string();
        let task = tokio::spawn(async move {
            let _slot = slot;
            let verdict = this.clone().ask(token, key).await;
            // Removed here, once the caches hold the verdict, and whether or not anyone
            // still waits: a finished review must never answer a later request.
            this.inflight.lock().remove(&key);
            verdict
        });
        let (inflight_map, k) = (self.inflight.clone(), key);
        let review = async move {
            task.await.unwrap_or_else(|e| {
                // The task died before clearing its key: clear it, or the token stays stuck.
                inflight_map.lock().remove(&k);
                Err(AuthError::Unavailable(format!("review task: {e}")))
            })
        }
        .boxed()
        .shared();
        inflight.insert(key, review.clone());
        Some(review)
    }

    /// A place for one more review of `party`'s, if it has fewer than its share.
    fn party_slot(&self, party: &Arc<str>) -> Option<PartySlot> {
        let mut parties = self.parties.lock();
        let n = parties.entry(party.clone()).or_default();
        if *n >= self.per_party {
            return None;
        }
        *n += 1;
        Some(PartySlot {
            parties: self.parties.clone(),
            party: party.clone(),
        })
    }

    async fn ask(self, token: String, key: [u8; 32]) -> Result<Reviewed, AuthError> {
        let expires = token_expiry(&token);
        if expires.is_some_and(|exp| exp <= (self.now)()) {
            return self.refuse(key, AuthError::Rejected("the token has expired".into()));
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..TokenReview::default()
        };
        let params = PostParams::default();
        let permits = self.permits.clone();
        let api = self.api.clone();
        let call = async move {
            let _permit = permits.acquire_owned().await;
            api.create(&params, &review).await
        };
        let result = match tokio::time::timeout(REVIEW_TIMEOUT, call).await {
            Ok(Ok(result)) => result,
            Ok(Err(error)) => return self.fallback(key, error.to_string()),
            Err(_) => {
                return self.fallback(key, format!("no answer within {REVIEW_TIMEOUT:?}"));
            }
        };
        match self.judge(&result) {
            Ok(reviewed) => {
                self.accepted.insert(key, (reviewed.clone(), expires));
                let limit = (self.now)() + STALE_LIMIT;
                let until = expires.map_or(limit, |e| e.min(limit));
                self.known.insert(key, (reviewed.clone(), until));
                Ok(reviewed)
            }
            Err(error) => self.refuse(key, error),
        }
    }

    /// Refused now: never again accepted from memory during an outage.
    fn refuse(&self, key: [u8; 32], error: AuthError) -> Result<Reviewed, AuthError> {
        self.accepted.invalidate(&key);
        self.known.invalidate(&key);
        self.rejected.insert(key, error.clone());
        Err(error)
    }

    /// The TokenReview failed: a token accepted before, and not expired, still passes.
    fn fallback(&self, key: [u8; 32], error: String) -> Result<Reviewed, AuthError> {
        let now = (self.now)();
        match self.known.get(&key) {
            Some((reviewed, until)) if until > now => {
                let secs = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
                let last = self.warned.load(Ordering::Relaxed);
                if secs >= last + 30
                    && self
                        .warned
                        .compare_exchange(last, secs, Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok()
                {
                    tracing::warn!(%error, audience = %self.audience, "TokenReview failed: accepting tokens reviewed before, until they expire");
                }
                // Not asked again (and waited for) until the review cache expires, unless
                // the token expires first.
                self.accepted.insert(key, (reviewed.clone(), Some(until)));
                Ok(reviewed)
            }
            _ => Err(AuthError::Unavailable(error)),
        }
    }

    fn judge(&self, review: &TokenReview) -> Result<Reviewed, AuthError> {
        let status = review
            .status
            .as_ref()
            .ok_or_else(|| AuthError::Rejected("no status".into()))?;
        if status.authenticated != Some(true) {
            return Err(AuthError::Rejected(
                status
                    .error
                    .clone()
                    .unwrap_or_else(|| "not authenticated".into()),
            ));
        }
        // An authenticator that does not say which audiences it checked has not checked
        // ours: absent counts as not for us.
        if !status
            .audiences
            .as_ref()
            .is_some_and(|audiences| audiences.contains(&self.audience))
        {
            return Err(AuthError::Rejected(format!(
                "the review does not confirm audience {:?}",
                self.audience
            )));
        }
        let user = status.user.as_ref();
        let extra = |name: &str| -> Option<Arc<str>> {
            user.and_then(|u| u.extra.as_ref())
                .and_then(|extra| extra.get(name))
                .and_then(|values| values.first())
                .filter(|v| !v.is_empty())
                .map(|v| v.as_str().into())
        };
        Ok(Reviewed {
            username: user
                .and_then(|u| u.username.as_deref())
                .unwrap_or_default()
                .into(),
            node: extra(NODE_NAME_EXTRA),
            pod_name: extra(POD_NAME_EXTRA),
            pod_uid: extra(POD_UID_EXTRA),
        })
    }
}

impl fmt::Debug for TokenReviewer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenReviewer")
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

/// The `exp` claim of a JWT (the token was verified by the TokenReview; this only bounds
/// how long it is remembered), or `None` if it has none.
fn token_expiry(token: &str) -> Option<SystemTime> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    UNIX_EPOCH.checked_add(Duration::from_secs(claims["exp"].as_u64()?))
}

/// Shared handle.
pub fn shared<A: Authenticate>(a: A) -> Arc<dyn Authenticate> {
    Arc::new(a)
}

#[cfg(test)]
mod tests {
    use base64::Engine;

    use super::*;

    #[test]
    fn token_expiry_is_read_from_the_jwt() {
        let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(br#"{"aud":["podiam"],"exp":1900000000,"sub":"x"}"#);
        let token = format!("eyJhbGciOiJSUzI1NiJ9.{claims}.c2ln");
        assert_eq!(
            token_expiry(&token),
            Some(UNIX_EPOCH + Duration::from_secs(1_900_000_000))
        );
        assert_eq!(token_expiry("not-a-jwt"), None);
        let huge = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(format!(r#"{{"exp":{}}}"#, u64::MAX));
        assert_eq!(
            token_expiry(&format!("h.{huge}.s")),
            None,
            "no overflow panic"
        );
        assert_eq!(token_expiry("a.!!!.c"), None);
    }
}
