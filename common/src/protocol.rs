//! The agent ↔ server protocol: HTTP/2 over mutual TLS, JSON bodies, versioned paths.
//!
//! Every request carries the agent's projected ServiceAccount token as
//! `Authorization: Bearer <token>`; the server learns the agent's node from it and answers
//! only for pods on that node. Errors are typed ([`ErrorCode`]) so that the agent maps them
//! to metadata-service answers without matching strings.

use std::{net::IpAddr, time::SystemTime};

use serde::{Deserialize, Serialize};

use crate::{arn::RoleArn, secret::Secret};

/// `POST`: the role of the pod with an IP ([`RoleRequest`] → [`RoleResponse`]).
pub const ROLE_PATH: &str = "/v1/role";
/// `POST`: credentials for the pod with an IP ([`CredentialsRequest`] →
/// [`CredentialsResponse`]).
pub const CREDENTIALS_PATH: &str = "/v1/credentials";
/// `GET`: 200 when the server can answer (its caches are synced).
pub const HEALTH_PATH: &str = "/v1/health";
/// `POST`: credentials for the pod whose projected ServiceAccount token the agent
/// forwards (the container-credentials path: [`PodIdentityRequest`] →
/// [`CredentialsResponse`]).
pub const POD_IDENTITY_PATH: &str = "/v1/pod-identity";

/// Which role does the pod with this IP have?
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleRequest {
    /// The pod's IP, as the agent saw it (the request's source address).
    pub ip: IpAddr,
}

/// The pod's role.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleResponse {
    /// The resolved, permitted role.
    pub role_arn: RoleArn,
}

/// Credentials for the pod with this IP.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredentialsRequest {
    /// The pod's IP.
    pub ip: IpAddr,
    /// The role the pod asked for (the name in the metadata URL, or an ARN); `None` for
    /// "whatever my role is". A role that is not the pod's own is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
}

/// Credentials for the pod this token was issued to (its projected ServiceAccount token,
/// as the pod sent it to the container-credentials endpoint). The token, reviewed by the
/// API server, is the identity; the caller's address binds it to its pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodIdentityRequest {
    /// The pod's token.
    pub token: Secret,
    /// The address the request came from, as the agent saw it: the server requires it to
    /// be one of the token's pod's addresses (a host-network pod's are the node's), so a
    /// token read by another pod is worth nothing there. Absent from agents older than
    /// this check, whose requests are answered as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<IpAddr>,
}

/// A pod's credentials.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredentialsResponse {
    /// The role they are for.
    pub role_arn: RoleArn,
    /// The credentials.
    pub credentials: Credentials,
    /// The pod they were issued to (container-credentials path), so that the agent may
    /// hand them to it again through a server outage while the pod is still on its node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
}

/// Temporary AWS credentials. The secret parts never format.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    /// `ASIA...`: safe to log.
    pub access_key_id: String,
    /// The secret key.
    pub secret_access_key: Secret,
    /// The session token.
    pub session_token: Secret,
    /// When they expire.
    #[serde(with = "rfc3339")]
    pub expiration: SystemTime,
}

/// An error answer: `{"code": "...", "message": "..."}` with a matching HTTP status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong, for code.
    pub code: ErrorCode,
    /// What went wrong, for people.
    pub message: String,
}

/// Typed errors of the protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is malformed.
    InvalidRequest,
    /// The pod's ServiceAccount token (container-credentials path) is missing, malformed,
    /// expired, for another audience, or not bound to a pod.
    InvalidToken,
    /// The agent's ServiceAccount token is missing, invalid, or not the agent's.
    Unauthenticated,
    /// No live pod has the IP (after the server's bounded wait).
    PodNotFound,
    /// Several live pods claim the IP.
    AmbiguousIp,
    /// The pod is not on the asking agent's node.
    NodeMismatch,
    /// The requested role is not the pod's.
    RoleMismatch,
    /// Policy denies the pod a role; the message says why.
    Forbidden,
    /// STS failed to issue credentials; worth retrying.
    StsError,
    /// The server is not ready (caches not synced yet).
    NotReady,
    /// The asking node has its share of work in flight (e.g. TokenReviews); retry shortly.
    Throttled,
    /// Anything else.
    Internal,
}

impl ErrorCode {
    /// The HTTP status that goes with the code.
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::InvalidRequest | ErrorCode::InvalidToken => 400,
            ErrorCode::Unauthenticated => 401,
            ErrorCode::Forbidden | ErrorCode::NodeMismatch => 403,
            ErrorCode::PodNotFound | ErrorCode::RoleMismatch => 404,
            ErrorCode::AmbiguousIp => 409,
            ErrorCode::Throttled => 429,
            ErrorCode::StsError => 502,
            ErrorCode::NotReady => 503,
            ErrorCode::Internal => 500,
        }
    }

    /// The code with this snake_case name.
    pub fn parse(name: &str) -> Option<Self> {
        [
            ErrorCode::InvalidRequest,
            ErrorCode::InvalidToken,
            ErrorCode::Unauthenticated,
            ErrorCode::PodNotFound,
            ErrorCode::AmbiguousIp,
            ErrorCode::NodeMismatch,
            ErrorCode::RoleMismatch,
            ErrorCode::Forbidden,
            ErrorCode::StsError,
            ErrorCode::NotReady,
            ErrorCode::Throttled,
            ErrorCode::Internal,
        ]
        .into_iter()
        .find(|c| c.as_str() == name)
    }

    /// The snake_case name, for metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::InvalidToken => "invalid_token",
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::PodNotFound => "pod_not_found",
            ErrorCode::AmbiguousIp => "ambiguous_ip",
            ErrorCode::NodeMismatch => "node_mismatch",
            ErrorCode::RoleMismatch => "role_mismatch",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::StsError => "sts_error",
            ErrorCode::NotReady => "not_ready",
            ErrorCode::Throttled => "throttled",
            ErrorCode::Internal => "internal",
        }
    }
}

/// RFC 3339 timestamps in UTC with second precision (`2026-11-23T02:57:14Z`), as the
/// metadata service writes them.
pub mod rfc3339 {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    /// Serialises `t`.
    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_rfc3339_seconds(*t))
    }

    /// Parses an RFC 3339 timestamp.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        humantime::parse_rfc3339_weak(&text).map_err(D::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    #[test]
    fn credentials_round_trip_and_redact() {
        let c = Credentials {
            access_key_id: "ASIAEXAMPLE".into(),
            secret_access_key: Secret::new("secret-key"),
            session_token: Secret::new("session-token"),
            expiration: UNIX_EPOCH + Duration::from_secs(1_795_402_634),
        };
        let json = serde_json::to_string(&c).unwrap();
        assert!(
            json.contains(r#""expiration":"2026-11-23T02:57:14Z""#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<Credentials>(&json).unwrap(), c);
        let debug = format!("{c:?}");
        assert!(
            !debug.contains("secret-key") && !debug.contains("session-token"),
            "{debug}"
        );
    }

    #[test]
    fn error_codes_are_snake_case_with_statuses() {
        let body = ErrorBody {
            code: ErrorCode::AmbiguousIp,
            message: "two pods".into(),
        };
        assert_eq!(
            serde_json::to_string(&body).unwrap(),
            r#"{"code":"ambiguous_ip","message":"two pods"}"#
        );
        assert_eq!(ErrorCode::AmbiguousIp.status(), 409);
        assert_eq!(ErrorCode::StsError.as_str(), "sts_error");
    }
}
