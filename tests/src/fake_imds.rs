//! **Test double**: the node's real EC2 metadata service. It hands out the *node's*
//! credentials and user data (so a leak is visible), requires IMDSv2 tokens, and records
//! every request it receives (path and headers) so tests can prove what never reached it.

use std::{collections::HashMap, convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The node's secret access key, as the stand-in serves it.
pub const NODE_SECRET: &str = "NODE-SECRET-ACCESS-KEY-must-never-reach-a-pod";
/// The node's user data.
pub const USER_DATA: &str = "#!/bin/sh\nexport DB_PASSWORD=NODE-USER-DATA-SECRET\n";
/// The node's signed identity documents and tags: they authenticate the node (to Vault,
/// for one) and must never reach a pod.
pub const NODE_SIGNED: &str = "NODE-SIGNED-IDENTITY-must-never-reach-a-pod";
/// Served under `meta-data/tags/instance/`.
pub const NODE_TAG: &str = "NODE-TAG-must-never-reach-a-pod";
/// The node role's name.
pub const NODE_ROLE: &str = "node-instance-role";
const TOKEN: &str = "real-imds-token-of-the-agent";

/// The node's instance role and credentials, as the stand-in serves them.
#[derive(Clone)]
pub struct NodeIdentity {
    /// The role name (`iam/security-credentials/`).
    pub role: String,
    /// `AccessKeyId`.
    pub access_key_id: String,
    /// `SecretAccessKey`.
    pub secret_access_key: String,
    /// `Token`.
    pub token: String,
    /// `Expiration`, RFC 3339.
    pub expiration: String,
}

impl Default for NodeIdentity {
    fn default() -> Self {
        Self {
            role: NODE_ROLE.into(),
            access_key_id: "ASIANODE".into(),
            secret_access_key: NODE_SECRET.into(),
            token: "node".into(),
            expiration: "2099-01-01T00:00:00Z".into(),
        }
    }
}

impl std::fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeIdentity")
            .field("role", &self.role)
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

/// One request the stand-in received.
#[derive(Clone, Debug)]
pub struct Seen {
    /// Method.
    pub method: String,
    /// Path.
    pub path: String,
    /// Header names and values (lower case names).
    pub headers: HashMap<String, String>,
}

/// A running stand-in; stops when dropped.
#[derive(Debug)]
pub struct FakeImds {
    /// Where it listens.
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: CancellationToken,
}

impl FakeImds {
    /// Starts on a free loopback port, with the default node identity.
    pub async fn start() -> std::io::Result<Self> {
        Self::serve(
            TcpListener::bind("127.0.0.1:0").await?,
            NodeIdentity::default(),
        )
    }

    /// Serves `node`'s metadata on `listener`.
    pub fn serve(listener: TcpListener, node: NodeIdentity) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let node = Arc::new(node);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let (log, done) = (seen.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    _ = done.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(_) => continue,
                    },
                };
                let (log, node) = (log.clone(), node.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let (log, node) = (log.clone(), node.clone());
                        async move { Ok::<_, Infallible>(answer(&log, &node, &req)) }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Self { addr, seen, stop })
    }

    /// Every request received so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().clone()
    }
}

impl Drop for FakeImds {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn answer<B>(
    log: &Mutex<Vec<Seen>>,
    node: &NodeIdentity,
    req: &Request<B>,
) -> Response<Full<Bytes>> {
    let headers = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                v.to_str().unwrap_or_default().to_string(),
            )
        })
        .collect::<HashMap<_, _>>();
    let path = req.uri().path().to_string();
    log.lock().push(Seen {
        method: req.method().to_string(),
        path: path.clone(),
        headers: headers.clone(),
    });
    if req.method() == Method::PUT && path == "/latest/api/token" {
        return reply(StatusCode::OK, TOKEN.to_string());
    }
    if headers.get("x-aws-ec2-metadata-token").map(String::as_str) != Some(TOKEN) {
        return reply(StatusCode::UNAUTHORIZED, String::new());
    }
    // Compared without regard to case, as a worst case for the agent's checks.
    let body = match path.trim_end_matches('/').to_ascii_lowercase().as_str() {
        "/latest/dynamic/instance-identity/pkcs7"
        | "/latest/dynamic/instance-identity/signature"
        | "/latest/dynamic/instance-identity/rsa2048" => NODE_SIGNED.to_string(),
        "/latest/dynamic/instance-identity/document" => {
            r#"{"region":"us-east-1","instanceId":"i-0123456789abcdef0"}"#.to_string()
        }
        p if p.starts_with("/latest/meta-data/tags/instance") => NODE_TAG.to_string(),
        "/latest/meta-data/instance-id" => "i-0123456789abcdef0".to_string(),
        "/latest/meta-data/placement/region" => "us-east-1".to_string(),
        "/latest/meta-data/placement/availability-zone" => "us-east-1a".to_string(),
        "/latest/meta-data/hostname" => "ip-100-64-0-1.ec2.internal".to_string(),
        "/latest/user-data" => USER_DATA.to_string(),
        "/latest/meta-data/iam/info" => format!(
            "{{\"InstanceProfileArn\":\"arn:aws:iam::123456789012:instance-profile/{}\"}}",
            node.role
        ),
        "/latest/meta-data/iam/security-credentials" => node.role.clone(),
        p if p.starts_with("/latest/meta-data/iam/security-credentials/") => serde_json::json!({
            "Code": "Success",
            "Type": "AWS-HMAC",
            "AccessKeyId": node.access_key_id,
            "SecretAccessKey": node.secret_access_key,
            "Token": node.token,
            "Expiration": node.expiration,
            "LastUpdated": "2026-01-01T00:00:00Z",
        })
        .to_string(),
        _ => return reply(StatusCode::NOT_FOUND, String::new()),
    };
    reply(StatusCode::OK, body)
}

fn reply(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut rsp = Response::new(Full::new(Bytes::from(body)));
    *rsp.status_mut() = status;
    rsp
}
