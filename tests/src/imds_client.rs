//! A metadata-service client that chooses its source address (127.x.y.z on loopback), so
//! that one test can be several pods; and a raw mode for malformed or pipelined requests.

use std::net::{IpAddr, SocketAddr};

use bytes::Bytes;
use http::{HeaderMap, Method, Request};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
};

/// An answer.
#[derive(Clone, Debug)]
pub struct Answer {
    /// Status code.
    pub status: u16,
    /// Headers.
    pub headers: HeaderMap,
    /// Body as text.
    pub body: String,
}

/// A TCP connection from `from` (a loopback address standing for a pod, or any party) to
/// `to`.
pub async fn connect(from: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = match from {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(from, 0))?;
    socket.connect(to).await
}

/// The `Host` an SDK sends to `to`: the address, with the port unless it is 80.
fn host(to: SocketAddr) -> String {
    let ip = match to.ip() {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    };
    if to.port() == 80 {
        ip
    } else {
        format!("{ip}:{}", to.port())
    }
}

/// One request from `from` to the endpoint at `to`.
pub async fn request(
    from: IpAddr,
    to: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<Answer> {
    let stream = connect(from, to).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", host(to));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Empty::<Bytes>::new())
        .map_err(std::io::Error::other)?;
    let rsp = sender
        .send_request(req)
        .await
        .map_err(std::io::Error::other)?;
    let status = rsp.status().as_u16();
    let headers = rsp.headers().clone();
    let body = rsp
        .into_body()
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    Ok(Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// Writes `bytes` as they are from `from` and reads until the server closes or `limit`
/// bytes arrived; returns what came back.
pub async fn raw(
    from: IpAddr,
    to: SocketAddr,
    bytes: &[u8],
    limit: usize,
) -> std::io::Result<String> {
    let mut stream = connect(from, to).await?;
    stream.write_all(bytes).await?;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let read =
            tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut buf)).await;
        match read {
            Ok(Ok(0)) | Err(_) => break,
            Ok(Ok(n)) => {
                out.extend_from_slice(&buf[..n]);
                if out.len() >= limit {
                    break;
                }
            }
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Ok(Err(e)) => return Err(e),
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}
