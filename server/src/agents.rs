//! Agent authentication and node binding.
//!
//! Every agent request carries the agent's projected ServiceAccount token. The server
//! checks it with a TokenReview (for its own audience), requires it to belong to the
//! agent's ServiceAccount, and takes the agent's node from the token's
//! `authentication.kubernetes.io/node-name` extra. Every projected token of every pod
//! carries that extra, which is why the ServiceAccount must match too: without that check,
//! any pod's token would pass for an agent. Results are cached briefly by token hash.
//! While the API server cannot be reached, a token accepted before keeps being accepted
//! until it expires (at most [`STALE_LIMIT`] after its last review), so that an API server
//! outage does not stop agents that were already known from being served.

use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures::{FutureExt, future::BoxFuture};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::{Api, Client, api::PostParams};

use crate::issue::Caller;

/// How long a token accepted by a TokenReview is still accepted while TokenReviews fail
/// (bounded by the token's own expiry).
pub const STALE_LIMIT: Duration = Duration::from_secs(3600);

/// How long a TokenReview may take before it counts as failed (agents give up on a server
/// after 5 s by default).
pub const REVIEW_TIMEOUT: Duration = Duration::from_secs(2);

/// The token extra that names the node of the pod the token was issued to.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

/// Decides who is asking from the request's bearer token.
pub trait Authenticate: Send + Sync + fmt::Debug + 'static {
    /// The caller, or why not.
    fn authenticate(&self, token: Option<&str>) -> BoxFuture<'static, Result<Caller, AuthError>>;
}

/// Why a caller was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No bearer token.
    #[error("no ServiceAccount token (Authorization: Bearer ...)")]
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
}

/// Node binding off: every mTLS-authenticated agent may ask for any pod.
#[derive(Clone, Copy, Debug, Default)]
pub struct Unbound;

/// TokenReview-based authentication with a short cache.
#[derive(Clone)]
pub struct TokenReviewer {
    api: Api<TokenReview>,
    audience: String,
    /// `system:serviceaccount:NAMESPACE:NAME`.
    agent_user: String,
    /// Keyed by SHA-256 of the token, so the cache holds no tokens.
    accepted: moka::sync::Cache<[u8; 32], Caller>,
    rejected: moka::sync::Cache<[u8; 32], AuthError>,
    /// Accepted tokens with their expiry, for when the API server cannot be reached.
    known: moka::sync::Cache<[u8; 32], (Caller, SystemTime)>,
    /// When the fallback was last logged (Unix seconds).
    warned: Arc<AtomicU64>,
    /// How long a review is cached.
    ttl: Duration,
}

// === impl Unbound ===

impl Authenticate for Unbound {
    fn authenticate(&self, _token: Option<&str>) -> BoxFuture<'static, Result<Caller, AuthError>> {
        futures::future::ready(Ok(Caller { node: None })).boxed()
    }
}

// === impl TokenReviewer ===

impl TokenReviewer {
    /// Reviews tokens for `audience`, accepting only `agent_namespace/agent_name`'s.
    pub fn new(
        client: Client,
        audience: String,
        agent_namespace: &str,
        agent_name: &str,
        ttl: Duration,
    ) -> Self {
        Self {
            api: Api::all(client),
            audience,
            agent_user: format!("system:serviceaccount:{agent_namespace}:{agent_name}"),
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
            ttl,
        }
    }

    async fn review(self, token: String, key: [u8; 32]) -> Result<Caller, AuthError> {
        let expires = token_expiry(&token);
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..TokenReview::default()
        };
        let params = PostParams::default();
        let call = self.api.create(&params, &review);
        let result = match tokio::time::timeout(REVIEW_TIMEOUT, call).await {
            Ok(Ok(result)) => result,
            Ok(Err(error)) => return self.fallback(key, error.to_string()),
            Err(_) => {
                return self.fallback(key, format!("no answer within {REVIEW_TIMEOUT:?}"));
            }
        };
        let verdict = self.judge(&result);
        match &verdict {
            Ok(caller) => {
                self.accepted.insert(key, caller.clone());
                let limit = SystemTime::now() + STALE_LIMIT;
                let until = expires.map_or(limit, |e| e.min(limit));
                self.known.insert(key, (caller.clone(), until));
            }
            // An unreachable API server is not the token's fault: not cached.
            Err(AuthError::Unavailable(_)) => {}
            Err(error) => {
                // Refused now: never again accepted from memory during an outage.
                self.known.invalidate(&key);
                self.rejected.insert(key, error.clone());
            }
        }
        verdict
    }

    /// The TokenReview failed: a token accepted before, and not expired, still passes.
    fn fallback(&self, key: [u8; 32], error: String) -> Result<Caller, AuthError> {
        let now = SystemTime::now();
        match self.known.get(&key) {
            Some((caller, until)) if until > now => {
                let secs = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
                let last = self.warned.load(Ordering::Relaxed);
                if secs >= last + 30
                    && self
                        .warned
                        .compare_exchange(last, secs, Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok()
                {
                    tracing::warn!(%error, "TokenReview failed: accepting agents' tokens reviewed before, until they expire");
                }
                // Not asked again (and waited for) until the review cache expires, unless
                // the token expires first.
                if until.duration_since(now).unwrap_or_default() >= self.ttl {
                    self.accepted.insert(key, caller.clone());
                }
                Ok(caller)
            }
            _ => Err(AuthError::Unavailable(error)),
        }
    }

    fn judge(&self, review: &TokenReview) -> Result<Caller, AuthError> {
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
        if let Some(audiences) = &status.audiences
            && !audiences.contains(&self.audience)
        {
            return Err(AuthError::Rejected(format!(
                "token is not for audience {:?}",
                self.audience
            )));
        }
        let user = status.user.as_ref();
        let username = user.and_then(|u| u.username.as_deref()).unwrap_or_default();
        if username != self.agent_user {
            return Err(AuthError::NotAgent(username.to_string()));
        }
        let node = user
            .and_then(|u| u.extra.as_ref())
            .and_then(|extra| extra.get(NODE_NAME_EXTRA))
            .and_then(|values| values.first())
            .filter(|n| !n.is_empty())
            .ok_or(AuthError::NoNode)?;
        Ok(Caller {
            node: Some(node.as_str().into()),
        })
    }
}

impl Authenticate for TokenReviewer {
    fn authenticate(&self, token: Option<&str>) -> BoxFuture<'static, Result<Caller, AuthError>> {
        let Some(token) = token.map(str::trim).filter(|t| !t.is_empty()) else {
            return futures::future::ready(Err(AuthError::Missing)).boxed();
        };
        let mut key = [0u8; 32];
        key.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref());
        if let Some(caller) = self.accepted.get(&key) {
            return futures::future::ready(Ok(caller)).boxed();
        }
        if let Some(error) = self.rejected.get(&key) {
            return futures::future::ready(Err(error)).boxed();
        }
        self.clone().review(token.to_string(), key).boxed()
    }
}

impl fmt::Debug for TokenReviewer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenReviewer")
            .field("audience", &self.audience)
            .field("agent_user", &self.agent_user)
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
