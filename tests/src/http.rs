//! A minimal HTTP/1.1 client for tests and benchmarks (admin endpoints, readiness).

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// `GET http://{addr}{path}`; returns the status code and the body as text.
pub async fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let stream = TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header(http::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())
        .map_err(std::io::Error::other)?;
    let rsp = sender
        .send_request(req)
        .await
        .map_err(std::io::Error::other)?;
    let status = rsp.status().as_u16();
    let body = rsp
        .into_body()
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Polls `GET /readyz` (the process's readiness signal) every 5 ms until it answers 200;
/// returns how long that took, or an error once `timeout` has passed.
pub async fn wait_ready(
    addr: SocketAddr,
    timeout: std::time::Duration,
) -> std::io::Result<std::time::Duration> {
    let started = std::time::Instant::now();
    loop {
        if let Ok((200, _)) = get(addr, "/readyz").await {
            return Ok(started.elapsed());
        }
        if started.elapsed() > timeout {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("{addr} not ready after {timeout:?}"),
            ));
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}
