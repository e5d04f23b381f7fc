//! The node feed: a gRPC server stream (tonic, protobuf) from a server to an agent with the
//! pods on the agent's node, their decisions and, once fetched, their credentials.
//!
//! Why gRPC: server streaming over HTTP/2 with flow control and keepalive is what tonic
//! maintains; the stream shares the server's mutual-TLS listener with the JSON API.
//!
//! The agent opens [`WatchNode`] with what it already holds ([`Held`]: pod UID and
//! version), so a reconnect, to the same replica or another, resends only what differs.
//! The server answers with [`NodeUpdate`]s: the first ones bring the agent's table up to
//! date and the last of those has `synced` set; later ones carry changes as they happen;
//! an empty update is a heartbeat, sent every `heartbeat_ms` so a dead stream is noticed.

use std::{
    fmt,
    future::Future,
    hash::{Hash, Hasher},
    pin::Pin,
    task::{Context, Poll},
    time::{Duration, UNIX_EPOCH},
};

use crate::{protocol, protocol::ErrorCode, secret::Secret};

/// The generated service: `node_feed_client::NodeFeedClient` and
/// `node_feed_server::{NodeFeed, NodeFeedServer}`.
#[allow(missing_docs, missing_debug_implementations, clippy::all)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/podiam.v1.NodeFeed.rs"));
}
pub use generated::{node_feed_client, node_feed_server};

/// The gRPC path prefix of the service (the server routes on it).
pub const SERVICE_PREFIX: &str = "/podiam.v1.NodeFeed/";

/// Most pods an agent names in [`WatchNode::held`]: more than any node runs (the kubelet's
/// `--max-pods` is 110 by default, a few hundred on the largest instances). An agent that
/// holds more names the first this many (the server then resends the others); a server
/// refuses a longer list.
pub const MAX_HELD: usize = 4096;

/// Largest [`WatchNode`] a server decodes: [`MAX_HELD`] entries of a UID (36 bytes) and a
/// version, with their framing, and room for the node's name.
pub const MAX_SUBSCRIPTION_BYTES: usize = MAX_HELD * 64 + 1024;

/// An agent's subscription.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WatchNode {
    /// The agent's node. With node binding the server learns the node from the agent's
    /// token and refuses a different name here; without, this names the node.
    #[prost(string, tag = "1")]
    pub node: String,
    /// What the agent holds from an earlier stream.
    #[prost(message, repeated, tag = "2")]
    pub held: Vec<Held>,
}

/// A pod the agent holds, at a version.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Held {
    /// `metadata.uid`.
    #[prost(string, tag = "1")]
    pub uid: String,
    /// [`PodState::version`] as received.
    #[prost(uint64, tag = "2")]
    pub version: u64,
}

/// Changes to the agent's table.
#[derive(Clone, PartialEq, prost::Message)]
pub struct NodeUpdate {
    /// Pods added or changed: each replaces what the agent held for its UID.
    #[prost(message, repeated, tag = "1")]
    pub pods: Vec<PodState>,
    /// UIDs of pods gone from the node (deleted, finished, moved, or no longer claiming
    /// their IP).
    #[prost(string, repeated, tag = "2")]
    pub removed: Vec<String>,
    /// Set on the update that completes the initial sync: from then on the agent's table
    /// is the node's, and a pod it does not hold is one the server does not know yet.
    #[prost(bool, tag = "3")]
    pub synced: bool,
    /// The server sends at least one update this often (ms); an empty one is a heartbeat.
    #[prost(uint32, tag = "4")]
    pub heartbeat_ms: u32,
}

/// A live pod on the node, with what the server decided for it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PodState {
    /// `metadata.uid`.
    #[prost(string, tag = "1")]
    pub uid: String,
    /// Namespace, for logs.
    #[prost(string, tag = "2")]
    pub namespace: String,
    /// Name, for logs.
    #[prost(string, tag = "3")]
    pub name: String,
    /// The pod's addresses.
    #[prost(string, repeated, tag = "4")]
    pub ips: Vec<String>,
    /// A digest of everything else in this message: equal versions, equal states.
    #[prost(uint64, tag = "5")]
    pub version: u64,
    /// The permitted role's ARN; empty when the pod has no role from podiam.
    #[prost(string, tag = "6")]
    pub role_arn: String,
    /// Why the pod gets no credentials (with `role_arn` empty).
    #[prost(message, optional, tag = "7")]
    pub denial: Option<Denial>,
    /// The pod's credentials, once fetched.
    #[prost(message, optional, tag = "8")]
    pub credentials: Option<FeedCredentials>,
}

/// A refusal, typed as in the per-request protocol.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Denial {
    /// An [`ErrorCode`] name (`forbidden`, `sts_error`, ...).
    #[prost(string, tag = "1")]
    pub code: String,
    /// Why, for the agent's log (never for the pod).
    #[prost(string, tag = "2")]
    pub message: String,
}

/// Credentials on the wire. The secret parts never format.
#[derive(Clone, PartialEq, prost::Message)]
#[prost(skip_debug)]
pub struct FeedCredentials {
    /// `ASIA...`.
    #[prost(string, tag = "1")]
    pub access_key_id: String,
    /// The secret key.
    #[prost(string, tag = "2")]
    pub secret_access_key: String,
    /// The session token.
    #[prost(string, tag = "3")]
    pub session_token: String,
    /// Expiry, seconds since the epoch.
    #[prost(int64, tag = "4")]
    pub expiration_unix: i64,
}

/// One HTTP/2 connection to a server (already set up, e.g. over mutual TLS), as the
/// tower service tonic's generated client runs on.
#[derive(Clone, Debug)]
pub struct Channel(hyper::client::conn::http2::SendRequest<tonic::body::Body>);

// === impl Channel ===

impl Channel {
    /// The connection's request half.
    pub fn new(sender: hyper::client::conn::http2::SendRequest<tonic::body::Body>) -> Self {
        Self(sender)
    }

    /// A client of the node feed over this connection.
    pub fn client(self) -> node_feed_client::NodeFeedClient<Self> {
        node_feed_client::NodeFeedClient::with_origin(
            self,
            http::Uri::from_static("https://podiam-server"),
        )
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for Channel {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, hyper::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), hyper::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.0.send_request(req))
    }
}

// === impl FeedCredentials ===

impl fmt::Debug for FeedCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FeedCredentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"** redacted **")
            .field("session_token", &"** redacted **")
            .field("expiration_unix", &self.expiration_unix)
            .finish()
    }
}

impl From<&protocol::Credentials> for FeedCredentials {
    fn from(c: &protocol::Credentials) -> Self {
        let secs = c
            .expiration
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        Self {
            access_key_id: c.access_key_id.clone(),
            secret_access_key: c.secret_access_key.expose().to_string(),
            session_token: c.session_token.expose().to_string(),
            expiration_unix: i64::try_from(secs).unwrap_or(i64::MAX),
        }
    }
}

/// Latest expiry a credential set may carry: 9999-12-31T23:59:59Z, the last second RFC
/// 3339 (and so the metadata documents) can write.
pub const LAST_EXPIRATION_UNIX: i64 = 253_402_300_799;

/// Credentials from the feed whose expiry is before 1970 or after 9999.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("credentials expiring at {0} s since the epoch are out of range")]
pub struct ExpirationOutOfRange(pub i64);

impl TryFrom<FeedCredentials> for protocol::Credentials {
    type Error = ExpirationOutOfRange;

    fn try_from(c: FeedCredentials) -> Result<Self, Self::Error> {
        let secs = u64::try_from(c.expiration_unix)
            .ok()
            .filter(|_| c.expiration_unix <= LAST_EXPIRATION_UNIX)
            .ok_or(ExpirationOutOfRange(c.expiration_unix))?;
        Ok(Self {
            access_key_id: c.access_key_id,
            secret_access_key: Secret::new(c.secret_access_key),
            session_token: Secret::new(c.session_token),
            expiration: UNIX_EPOCH + Duration::from_secs(secs),
        })
    }
}

// === impl PodState ===

impl PodState {
    /// The digest of the state's content (everything but `version`): the same for the
    /// same state on every replica of one build.
    pub fn digest(&self) -> u64 {
        let mut h = std::hash::DefaultHasher::new();
        self.uid.hash(&mut h);
        self.namespace.hash(&mut h);
        self.name.hash(&mut h);
        self.ips.hash(&mut h);
        self.role_arn.hash(&mut h);
        if let Some(d) = &self.denial {
            d.code.hash(&mut h);
            d.message.hash(&mut h);
        }
        if let Some(c) = &self.credentials {
            c.access_key_id.hash(&mut h);
            c.expiration_unix.hash(&mut h);
        }
        h.finish()
    }

    /// Sets `version` to the digest.
    pub fn sealed(mut self) -> Self {
        self.version = self.digest();
        self
    }
}

// === impl Denial ===

impl Denial {
    /// A denial with `code`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code: code.as_str().to_string(),
            message: message.into(),
        }
    }

    /// The typed code; an unknown name (a newer server) is `Internal`.
    pub fn error_code(&self) -> ErrorCode {
        ErrorCode::parse(&self.code).unwrap_or(ErrorCode::Internal)
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    #[test]
    fn credentials_never_format_and_survive_the_wire() {
        let creds = protocol::Credentials {
            access_key_id: "ASIAEXAMPLE".into(),
            secret_access_key: Secret::new("secret-key"),
            session_token: Secret::new("session-token"),
            expiration: UNIX_EPOCH + Duration::from_secs(1_795_402_634),
        };
        let state = PodState {
            uid: "u1".into(),
            namespace: "ns".into(),
            name: "p".into(),
            ips: vec!["198.18.0.5".into()],
            role_arn: "arn:aws:iam::123456789012:role/r".into(),
            credentials: Some(FeedCredentials::from(&creds)),
            ..Default::default()
        }
        .sealed();
        let update = NodeUpdate {
            pods: vec![state.clone()],
            ..Default::default()
        };
        let debug = format!("{update:?}");
        assert!(
            !debug.contains("secret-key") && !debug.contains("session-token"),
            "{debug}"
        );
        let decoded = NodeUpdate::decode(update.encode_to_vec().as_slice()).unwrap();
        assert_eq!(decoded, update);
        let back = protocol::Credentials::try_from(decoded.pods[0].credentials.clone().unwrap());
        assert_eq!(back, Ok(creds));
    }

    #[test]
    fn expiry_out_of_range_is_an_error_not_a_panic() {
        // Found by the feed_messages fuzz target: an expiry after 9999 made the agent's
        // metadata document panic while formatting it.
        let at = |expiration_unix| {
            protocol::Credentials::try_from(FeedCredentials {
                expiration_unix,
                ..Default::default()
            })
            .map(|c| c.expiration)
        };
        for bad in [-1, LAST_EXPIRATION_UNIX + 1, i64::MAX, i64::MIN] {
            assert_eq!(at(bad), Err(ExpirationOutOfRange(bad)));
        }
        let last = at(LAST_EXPIRATION_UNIX).unwrap();
        assert_eq!(
            humantime::format_rfc3339_seconds(last).to_string(),
            "9999-12-31T23:59:59Z"
        );
    }

    #[test]
    fn versions_follow_content() {
        let a = PodState {
            uid: "u1".into(),
            role_arn: "arn:aws:iam::123456789012:role/r".into(),
            ..Default::default()
        };
        let b = PodState {
            denial: Some(Denial::new(ErrorCode::Forbidden, "no")),
            role_arn: String::new(),
            ..a.clone()
        };
        assert_eq!(a.clone().sealed().version, a.clone().sealed().version);
        assert_ne!(a.sealed().version, b.sealed().version);
        assert_eq!(
            Denial::new(ErrorCode::StsError, "x").error_code(),
            ErrorCode::StsError
        );
        assert_eq!(
            Denial {
                code: "from_the_future".into(),
                message: String::new()
            }
            .error_code(),
            ErrorCode::Internal
        );
    }
}
