//! The allow-listed proxy to the real metadata service.
//!
//! Paths outside the credential surface go to `--metadata-addr` only when their normal
//! form (see [`crate::imds::path`]) matches `--allow-route-regexp`, anchored, with or
//! without a trailing slash, and when every segment is made of `[A-Za-z0-9._-]` only. User
//! data, the node's own `iam/` tree, `identity-credentials/`, the signed instance identity
//! documents (`pkcs7`, `signature`, `rsa2048`: they authenticate the node to systems such as
//! Vault) and the instance's tags are never proxied, whatever the regex says, compared
//! without regard to case. The unsigned identity document is allowed by default: it
//! describes the instance and authenticates nothing. Upstream requests
//! use the agent's own IMDSv2 token (pods never see a real one), carry no
//! `X-Forwarded-For`, and have timeouts.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use parking_lot::Mutex;
use podiam_common::pattern::{PatternError, anchored};
use regex_lite::Regex;
use tokio::time::Instant;

use crate::imds::path::Normal;

/// The default `--allow-route-regexp`: what SDKs read on their own, nothing else.
pub const DEFAULT_ALLOW: &str = "/latest/(meta-data/(placement/region|placement/availability-zone|instance-id|instance-type|ami-id|local-hostname)|dynamic/instance-identity/document)";

/// Token lifetime the agent asks the real service for.
const UPSTREAM_TTL: Duration = Duration::from_secs(21_600);

/// Cheap to clone.
#[derive(Clone, Debug)]
pub struct MetadataProxy {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    base: String,
    allow: Regex,
    client: Client<HttpConnector, Full<Bytes>>,
    timeout: Duration,
    token: Mutex<Option<(Instant, HeaderValue)>>,
}

/// An upstream answer, passed on as it is.
#[derive(Clone, Debug)]
pub struct Upstream {
    /// Its status.
    pub status: StatusCode,
    /// Its content type, if any.
    pub content_type: Option<HeaderValue>,
    /// Its body.
    pub body: Bytes,
}

/// Why a path is not proxied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// User data can hold the node's secrets.
    #[error("user-data is never proxied")]
    UserData,
    /// The node's role and credentials.
    #[error("the node's IAM data is never proxied")]
    NodeIam,
    /// The node's identity credentials.
    #[error("identity credentials are never proxied")]
    IdentityCredentials,
    /// The signed instance identity documents authenticate the node.
    #[error("signed identity documents are never proxied")]
    SignedIdentity,
    /// The instance's tags may name other systems' secrets or structure.
    #[error("instance tags are never proxied")]
    InstanceTags,
    /// A segment with characters no proxied path needs.
    #[error("only letters, digits, '.', '_' and '-' are proxied")]
    Characters,
    /// Not in the allow-list.
    #[error("not in --allow-route-regexp")]
    NotAllowed,
}

/// Path prefixes never proxied (lower case; paths are compared lower-cased), with why.
const NEVER: &[(&[&str], Refusal)] = &[
    (&["user-data"], Refusal::UserData),
    (&["meta-data", "iam"], Refusal::NodeIam),
    (
        &["meta-data", "identity-credentials"],
        Refusal::IdentityCredentials,
    ),
    (
        &["dynamic", "instance-identity", "pkcs7"],
        Refusal::SignedIdentity,
    ),
    (
        &["dynamic", "instance-identity", "signature"],
        Refusal::SignedIdentity,
    ),
    (
        &["dynamic", "instance-identity", "rsa2048"],
        Refusal::SignedIdentity,
    ),
    (&["meta-data", "tags", "instance"], Refusal::InstanceTags),
];

/// The upstream failed.
#[derive(Debug, thiserror::Error)]
#[error("metadata service: {0}")]
pub struct UpstreamFailure(String);

// === impl MetadataProxy ===

impl MetadataProxy {
    /// Proxies to `addr` (`HOST` or `HOST:PORT`, port 80 by default) for paths matching
    /// `allow` (anchored; it must be a whole expression on its own).
    pub fn new(addr: &str, allow: &str, timeout: Duration) -> Result<Self, PatternError> {
        let allow = anchored(allow)?;
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        connector.set_nodelay(true);
        Ok(Self {
            inner: Arc::new(Inner {
                base: format!("http://{addr}"),
                allow,
                client: Client::builder(TokioExecutor::new()).build(connector),
                timeout,
                token: Mutex::new(None),
            }),
        })
    }

    /// Whether `path` may be proxied.
    pub fn check(&self, path: &Normal) -> Result<(), Refusal> {
        let lower: Vec<String> = path
            .segments
            .iter()
            .map(|s| s.to_ascii_lowercase())
            .collect();
        for (prefix, refusal) in NEVER {
            if lower.len() >= prefix.len() && lower.iter().zip(*prefix).all(|(a, b)| a == b) {
                return Err(*refusal);
            }
        }
        let plain = |b: u8| b.is_ascii_alphanumeric() || b"._-".contains(&b);
        if !path.segments.iter().all(|s| s.bytes().all(plain)) {
            return Err(Refusal::Characters);
        }
        let mut normal = path.clone();
        normal.trailing_slash = false;
        let candidate = normal.to_path();
        let candidate = candidate.trim_end_matches('/');
        if self.inner.allow.is_match(candidate) {
            Ok(())
        } else {
            Err(Refusal::NotAllowed)
        }
    }

    /// Fetches `path` (already checked) from the real service.
    pub async fn fetch(&self, path: &Normal) -> Result<Upstream, UpstreamFailure> {
        let uri = format!("{}{}", self.inner.base, path.to_path());
        for attempt in 0..2 {
            let token = self.token(attempt > 0).await?;
            let req = Request::get(&uri)
                .header("x-aws-ec2-metadata-token", token)
                .body(Full::new(Bytes::new()))
                .map_err(|e| UpstreamFailure(e.to_string()))?;
            let rsp = self.send(req).await?;
            // The agent's token expired early (the real service restarted): once more.
            if rsp.status == StatusCode::UNAUTHORIZED && attempt == 0 {
                continue;
            }
            return Ok(rsp);
        }
        Err(UpstreamFailure("token refused twice".into()))
    }

    async fn send(&self, req: Request<Full<Bytes>>) -> Result<Upstream, UpstreamFailure> {
        let exchange = async {
            let rsp = self
                .inner
                .client
                .request(req)
                .await
                .map_err(|e| UpstreamFailure(e.to_string()))?;
            let status = rsp.status();
            let content_type = rsp.headers().get(header::CONTENT_TYPE).cloned();
            let body = rsp
                .into_body()
                .collect()
                .await
                .map_err(|e| UpstreamFailure(e.to_string()))?
                .to_bytes();
            Ok(Upstream {
                status,
                content_type,
                body,
            })
        };
        tokio::time::timeout(self.inner.timeout, exchange)
            .await
            .map_err(|_| UpstreamFailure(format!("no answer within {:?}", self.inner.timeout)))?
    }

    /// The agent's own IMDSv2 token, renewed a minute before it expires.
    async fn token(&self, renew: bool) -> Result<HeaderValue, UpstreamFailure> {
        if !renew
            && let Some((at, token)) = self.inner.token.lock().clone()
            && at.elapsed() + Duration::from_secs(60) < UPSTREAM_TTL
        {
            return Ok(token);
        }
        let req = Request::builder()
            .method(Method::PUT)
            .uri(format!("{}/latest/api/token", self.inner.base))
            .header(
                "x-aws-ec2-metadata-token-ttl-seconds",
                UPSTREAM_TTL.as_secs().to_string(),
            )
            .body(Full::new(Bytes::new()))
            .map_err(|e| UpstreamFailure(e.to_string()))?;
        let rsp = self.send(req).await?;
        if !rsp.status.is_success() {
            return Err(UpstreamFailure(format!(
                "token request answered {}",
                rsp.status
            )));
        }
        let token = HeaderValue::from_maybe_shared(rsp.body)
            .map_err(|_| UpstreamFailure("token is not a header value".into()))?;
        *self.inner.token.lock() = Some((Instant::now(), token.clone()));
        Ok(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(p: &MetadataProxy, path: &str) -> Result<(), Refusal> {
        p.check(&Normal::parse(path).unwrap())
    }

    #[test]
    fn allow_list_and_deny_list() {
        let p = MetadataProxy::new("127.0.0.1:1", DEFAULT_ALLOW, Duration::from_secs(1)).unwrap();
        for ok in [
            "/latest/meta-data/placement/region",
            "/latest/meta-data/placement/availability-zone/",
            "/latest/meta-data/instance-id",
            "/latest/dynamic/instance-identity/document",
        ] {
            assert_eq!(check(&p, ok), Ok(()), "{ok}");
        }
        for (no, why) in [
            ("/latest/user-data", Refusal::UserData),
            ("/latest/user-data/", Refusal::UserData),
            ("/latest/meta-data/iam/info", Refusal::NodeIam),
            (
                "/latest/meta-data/iam/security-credentials/node-role",
                Refusal::NodeIam,
            ),
            (
                "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
                Refusal::IdentityCredentials,
            ),
            ("/latest/meta-data/instance-id/extra", Refusal::NotAllowed),
            ("/latest/meta-data/", Refusal::NotAllowed),
            (
                "/latest/dynamic/instance-identity/signature",
                Refusal::SignedIdentity,
            ),
        ] {
            assert_eq!(check(&p, no), Err(why), "{no}");
        }
        // A regex that would allow everything still never reaches user data or iam.
        let open = MetadataProxy::new("127.0.0.1:1", ".*", Duration::from_secs(1)).unwrap();
        assert_eq!(check(&open, "/latest/user-data"), Err(Refusal::UserData));
        assert_eq!(
            check(&open, "/latest/meta-data/iam/info"),
            Err(Refusal::NodeIam)
        );
        assert_eq!(check(&open, "/latest/meta-data/hostname"), Ok(()));
    }

    #[test]
    fn never_proxied_whatever_the_case_or_the_regex() {
        let open = MetadataProxy::new("127.0.0.1:1", ".*", Duration::from_secs(1)).unwrap();
        for (no, why) in [
            ("/latest/USER-DATA", Refusal::UserData),
            ("/latest/User-Data/", Refusal::UserData),
            ("/latest/meta-data/IAM/info", Refusal::NodeIam),
            (
                "/latest/Meta-Data/iam/security-credentials/x",
                Refusal::NodeIam,
            ),
            (
                "/latest/meta-data/Identity-Credentials/ec2/info",
                Refusal::IdentityCredentials,
            ),
            (
                "/latest/dynamic/instance-identity/pkcs7",
                Refusal::SignedIdentity,
            ),
            (
                "/latest/dynamic/instance-identity/PKCS7",
                Refusal::SignedIdentity,
            ),
            (
                "/latest/dynamic/instance-identity/signature",
                Refusal::SignedIdentity,
            ),
            (
                "/latest/dynamic/instance-identity/rsa2048",
                Refusal::SignedIdentity,
            ),
            (
                "/latest/dynamic/Instance-Identity/RSA2048/",
                Refusal::SignedIdentity,
            ),
            ("/latest/meta-data/tags/instance", Refusal::InstanceTags),
            (
                "/latest/meta-data/tags/instance/Name",
                Refusal::InstanceTags,
            ),
            ("/latest/meta-data/TAGS/Instance/", Refusal::InstanceTags),
            // RFC 3986 characters the normaliser lets through, but no metadata path needs.
            ("/latest/meta-data/instance-id;x", Refusal::Characters),
            ("/latest/meta-data/a=b", Refusal::Characters),
            ("/latest/meta-data/a@b", Refusal::Characters),
            ("/latest/meta-data/(x)", Refusal::Characters),
            ("/latest/meta-data/a~b", Refusal::Characters),
            ("/latest/meta-data/a+b", Refusal::Characters),
            ("/latest/meta-data/a:b", Refusal::Characters),
        ] {
            assert_eq!(check(&open, no), Err(why), "{no}");
        }
        // The unsigned identity document stays allowed by default.
        let default =
            MetadataProxy::new("127.0.0.1:1", DEFAULT_ALLOW, Duration::from_secs(1)).unwrap();
        assert_eq!(
            check(&default, "/latest/dynamic/instance-identity/document"),
            Ok(())
        );
    }

    #[test]
    fn allow_route_regexp_cannot_escape_its_anchors() {
        // Wrapped as text this allowed every path; it is refused at start-up now.
        for escape in [
            "/latest/meta-data/instance-id)|(.*",
            "/latest/meta-data/instance-id)|.*|(x",
        ] {
            assert!(
                MetadataProxy::new("127.0.0.1:1", escape, Duration::from_secs(1)).is_err(),
                "{escape}"
            );
        }
    }
}
