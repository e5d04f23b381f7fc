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
/// The node's role name.
pub const NODE_ROLE: &str = "node-instance-role";
const TOKEN: &str = "real-imds-token-of-the-agent";

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
    /// Starts on a free loopback port.
    pub async fn start() -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
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
                let log = log.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let log = log.clone();
                        async move { Ok::<_, Infallible>(answer(&log, &req)) }
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

fn answer<B>(log: &Mutex<Vec<Seen>>, req: &Request<B>) -> Response<Full<Bytes>> {
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
    let body = match path.trim_end_matches('/') {
        "/latest/meta-data/instance-id" => "i-0123456789abcdef0".to_string(),
        "/latest/meta-data/placement/region" => "us-east-1".to_string(),
        "/latest/meta-data/placement/availability-zone" => "us-east-1a".to_string(),
        "/latest/meta-data/hostname" => "ip-100-64-0-1.ec2.internal".to_string(),
        "/latest/user-data" => USER_DATA.to_string(),
        "/latest/meta-data/iam/info" => format!(
            "{{\"InstanceProfileArn\":\"arn:aws:iam::123456789012:instance-profile/{NODE_ROLE}\"}}"
        ),
        "/latest/meta-data/iam/security-credentials" => NODE_ROLE.to_string(),
        p if p.starts_with("/latest/meta-data/iam/security-credentials/") => format!(
            "{{\"Code\":\"Success\",\"AccessKeyId\":\"ASIANODE\",\"SecretAccessKey\":\"{NODE_SECRET}\",\"Token\":\"node\",\"Expiration\":\"2099-01-01T00:00:00Z\"}}"
        ),
        _ => return reply(StatusCode::NOT_FOUND, String::new()),
    };
    reply(StatusCode::OK, body)
}

fn reply(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut rsp = Response::new(Full::new(Bytes::from(body)));
    *rsp.status_mut() = status;
    rsp
}
