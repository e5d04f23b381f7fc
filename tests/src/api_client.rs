//! An HTTP/2 mutual-TLS client for the server's agent API, as a test caller.

use std::{net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use podiam_common::feed;
use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
};
use serde_json::Value;
use tokio::net::TcpStream;

use crate::certs::Pair;

/// One HTTP/2 connection to the API.
#[derive(Clone, Debug)]
pub struct ApiClient {
    sender: http2::SendRequest<Full<Bytes>>,
}

/// A TLS client configuration trusting `ca`, presenting `client` (if any).
pub fn tls_config(ca: &std::path::Path, client: Option<&Pair>) -> anyhow::Result<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca)? {
        roots.add(cert?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let mut config = match client {
        Some(pair) => {
            let certs =
                CertificateDer::pem_file_iter(&pair.cert)?.collect::<Result<Vec<_>, _>>()?;
            let key = PrivateKeyDer::from_pem_file(&pair.key)?;
            builder.with_client_auth_cert(certs, key)?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// A TLS connection from `from` (a loopback address standing for some party) to `addr`
/// as `localhost`, handshake done and nothing sent: an idle client.
pub async fn idle_tls(
    from: std::net::IpAddr,
    addr: SocketAddr,
    config: ClientConfig,
) -> anyhow::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let socket = match from {
        std::net::IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(from, 0))?;
    let tcp = socket.connect(addr).await?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    Ok(connector
        .connect(ServerName::try_from("localhost")?, tcp)
        .await?)
}

/// An HTTP/2 connection over TLS to `addr` as `localhost`, for request bodies `B`.
pub async fn h2_connection<B>(
    addr: SocketAddr,
    config: ClientConfig,
) -> anyhow::Result<http2::SendRequest<B>>
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tls = connector
        .connect(ServerName::try_from("localhost")?, tcp)
        .await?;
    let (sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// Subscribes to the node feed at `addr` as an agent with `token`, naming `node` and
/// holding `held`: the stream, or the server's refusal.
pub async fn watch_feed(
    addr: SocketAddr,
    config: ClientConfig,
    token: Option<&str>,
    node: &str,
    held: Vec<feed::Held>,
) -> anyhow::Result<Result<tonic::Streaming<feed::NodeUpdate>, tonic::Status>> {
    let channel = feed::Channel::new(h2_connection(addr, config).await?);
    let mut request = tonic::Request::new(feed::WatchNode {
        node: node.to_string(),
        held,
    });
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse()?);
    }
    Ok(channel
        .client()
        .watch(request)
        .await
        .map(tonic::Response::into_inner))
}

impl ApiClient {
    /// Connects to `addr` as `localhost`; fails if the TLS handshake is refused.
    pub async fn connect(addr: SocketAddr, config: ClientConfig) -> anyhow::Result<Self> {
        let sender = h2_connection(addr, config).await?;
        let mut client = Self { sender };
        // With TLS 1.3 the server checks the client certificate after the client's side of
        // the handshake is done: a request is what shows whether it was accepted.
        client.get("/v1/health").await?;
        Ok(client)
    }

    /// `GET path`.
    pub async fn get(&mut self, path: &str) -> anyhow::Result<(u16, Value)> {
        self.send(Method::GET, path, None, Value::Null).await
    }

    /// `POST path` with a JSON body and, if given, `Authorization: Bearer <token>`.
    pub async fn post(
        &mut self,
        path: &str,
        token: Option<&str>,
        body: Value,
    ) -> anyhow::Result<(u16, Value)> {
        self.send(Method::POST, path, token, body).await
    }

    async fn send(
        &mut self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Value,
    ) -> anyhow::Result<(u16, Value)> {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("https://localhost{path}"))
            .header(http::header::CONTENT_TYPE, "application/json");
        if let Some(token) = token {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let body = if body.is_null() {
            Bytes::new()
        } else {
            Bytes::from(serde_json::to_vec(&body)?)
        };
        self.sender.ready().await?;
        let rsp = self.sender.send_request(req.body(Full::new(body))?).await?;
        let status = rsp.status().as_u16();
        let bytes = rsp.into_body().collect().await?.to_bytes();
        let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok((status, value))
    }
}
