//! **Test double**: a proxy in front of moto that counts STS calls by action and can
//! inject faults (real-format STS errors, delays, or refusing connections), because moto
//! has no fault injection of its own.

use std::{collections::HashMap, convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use parking_lot::Mutex;
use tokio::{net::TcpListener, sync::watch};
use tokio_util::sync::CancellationToken;

/// What the proxy does with the next requests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forward to moto.
    Forward,
    /// Answer every call with this HTTP status and STS error code.
    Fail(u16, &'static str),
    /// Forward after this delay.
    Delay(Duration),
    /// Close every connection without answering (STS unreachable).
    Down,
}

/// A running proxy; stops when dropped.
#[derive(Debug)]
pub struct StsProxy {
    /// Where it listens.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
}

#[derive(Debug)]
struct Shared {
    upstream: String,
    mode: Mutex<Mode>,
    calls: watch::Sender<HashMap<String, u64>>,
    /// The last request body of each `AssumeRole/<RoleSessionName>`.
    bodies: Mutex<HashMap<String, String>>,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl StsProxy {
    /// Proxies to `upstream` (moto's URL).
    pub async fn start(upstream: String) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            upstream,
            mode: Mutex::new(Mode::Forward),
            calls: watch::channel(HashMap::new()).0,
            bodies: Mutex::new(HashMap::new()),
            client: Client::builder(TokioExecutor::new()).build_http(),
        });
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, shared.clone(), stop.clone()));
        Ok(Self { addr, shared, stop })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Changes what the proxy does.
    pub fn set_mode(&self, mode: Mode) {
        *self.shared.mode.lock() = mode;
    }

    /// Calls of `action` (e.g. `AssumeRole`) received so far, whatever the mode; also
    /// `AssumeRole/<RoleSessionName>` for the calls of one session.
    pub fn calls(&self, action: &str) -> u64 {
        self.shared.calls.borrow().get(action).copied().unwrap_or(0)
    }

    /// The form body of the last call of `AssumeRole/<RoleSessionName>`, URL-decoded.
    pub fn last_request(&self, session: &str) -> Option<String> {
        self.shared.bodies.lock().get(session).cloned()
    }

    /// Waits until `action` has been called `n` times; `false` after `timeout`.
    pub async fn wait_calls(&self, action: &str, n: u64, timeout: Duration) -> bool {
        let mut rx = self.shared.calls.subscribe();
        let reached = rx.wait_for(|m| m.get(action).copied().unwrap_or(0) >= n);
        tokio::time::timeout(timeout, reached)
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

impl Drop for StsProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn serve(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        if *shared.mode.lock() == Mode::Down {
            drop(stream);
            continue;
        }
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(shared, req).await) }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle(shared: Arc<Shared>, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let action = form_value(&body, "Action").unwrap_or_default();
    let session = form_value(&body, "RoleSessionName").map(|s| format!("{action}/{s}"));
    if let Some(session) = &session {
        let decoded: Vec<String> = form_urlencoded::parse(&body)
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        shared
            .bodies
            .lock()
            .insert(session.clone(), decoded.join("&"));
    }
    shared.calls.send_modify(|m| {
        *m.entry(action).or_default() += 1;
        if let Some(session) = session {
            *m.entry(session).or_default() += 1;
        }
    });
    let mode = shared.mode.lock().clone();
    match mode {
        Mode::Fail(status, code) => return sts_error(status, code),
        Mode::Delay(delay) => tokio::time::sleep(delay).await,
        Mode::Forward | Mode::Down => {}
    }
    let uri = format!(
        "{}{}",
        shared.upstream,
        parts.uri.path_and_query().map_or("/", |p| p.as_str())
    );
    let mut upstream = Request::builder().method(parts.method).uri(uri);
    for (name, value) in &parts.headers {
        upstream = upstream.header(name, value);
    }
    let Ok(upstream) = upstream.body(Full::new(body)) else {
        return sts_error(500, "InternalFailure");
    };
    match shared.client.request(upstream).await {
        Ok(rsp) => {
            let (parts, body) = rsp.into_parts();
            let body = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            Response::from_parts(parts, Full::new(body))
        }
        Err(_) => sts_error(502, "InternalFailure"),
    }
}

/// An STS error in the real wire format (query protocol XML).
fn sts_error(status: u16, code: &str) -> Response<Full<Bytes>> {
    let body = format!(
        "<ErrorResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><Error><Type>Sender</Type>\
         <Code>{code}</Code><Message>injected by the test proxy</Message></Error>\
         <RequestId>00000000-0000-0000-0000-000000000000</RequestId></ErrorResponse>"
    );
    let mut rsp = Response::new(Full::new(Bytes::from(body)));
    *rsp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
    rsp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/xml"),
    );
    rsp
}

fn form_value(body: &[u8], key: &str) -> Option<String> {
    std::str::from_utf8(body).ok()?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == key).then(|| v.to_string())
    })
}
