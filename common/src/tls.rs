//! Mutual TLS between agents and servers, from PEM files that are reloaded when they
//! change.
//!
//! Kubernetes rotates mounted Secrets by swapping a symlink (and cert-manager rotates the
//! Secret itself), so the files are re-read every `--tls-reload-interval`; when their
//! content changed and still forms a valid configuration, new connections use it. A bad
//! rotation keeps the last good configuration, and says so in the log and in
//! `podiam_tls_reloads_total{result="error"}`. Only the ring crypto provider is used.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use parking_lot::RwLock;
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use tokio_util::sync::CancellationToken;

/// The PEM files of one side of the mutual TLS.
#[derive(Clone, Debug, clap::Args)]
pub struct TlsArgs {
    /// CA certificate(s) (PEM) that the peer's certificate must chain to. Required.
    #[arg(long = "ca", env = "PODIAM_TLS_CA", value_name = "PATH")]
    pub ca: Option<PathBuf>,

    /// This side's certificate chain (PEM). Required.
    #[arg(long = "cert", env = "PODIAM_TLS_CERT", value_name = "PATH")]
    pub cert: Option<PathBuf>,

    /// This side's private key (PEM: PKCS#8, PKCS#1 or SEC1). Required.
    #[arg(long = "key", env = "PODIAM_TLS_KEY", value_name = "PATH")]
    pub key: Option<PathBuf>,

    /// How often to re-read the files for a rotated certificate.
    #[arg(long, env = "PODIAM_TLS_RELOAD_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub tls_reload_interval: Duration,
}

/// Why the TLS files could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A flag naming a file was not given.
    #[error("{0} is required (mutual TLS between agents and servers)")]
    Missing(&'static str),
    /// A file could not be read.
    // The cause is the error's source, printed once by whoever prints the chain.
    #[error("reading {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file holds no usable PEM object of the expected kind.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is missing or wrong.
        what: String,
    },
    /// rustls refused the combination (e.g. key does not match certificate).
    #[error("TLS configuration")]
    Rustls(#[from] rustls::Error),
    /// The client-certificate verifier could not be built (e.g. empty CA bundle).
    #[error("client verifier: {0}")]
    Verifier(String),
}

/// Which side a configuration is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// Accepts connections; requires a client certificate signed by the CA.
    Server,
    /// Connects; presents its certificate and verifies the server's against the CA.
    Client,
}

/// The current configuration of one side, swapped when the files change.
#[derive(Debug)]
pub struct Reloading<T> {
    current: Arc<RwLock<Arc<T>>>,
}

impl<T> Clone for Reloading<T> {
    fn clone(&self) -> Self {
        Self {
            current: self.current.clone(),
        }
    }
}

/// TLS metrics: certificate expiry and reloads.
#[derive(Clone, Debug)]
pub struct TlsMetrics {
    expiry: IntGauge,
    reloads: IntCounterVec,
}

/// What one read of the files produced.
struct Loaded {
    fingerprint: Vec<u8>,
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: RootCertStore,
}

// === impl TlsArgs ===

impl TlsArgs {
    /// Builds the server-side configuration (HTTP/2 only) and keeps reloading it until
    /// `shutdown`.
    pub fn server(
        &self,
        metrics: TlsMetrics,
        shutdown: CancellationToken,
    ) -> Result<Reloading<ServerConfig>, TlsError> {
        self.reloading(Side::Server, metrics, shutdown, server_config)
    }

    /// Builds a server-side configuration that asks for no client certificate (HTTP/2 and
    /// HTTP/1.1), from the same files, and keeps reloading it until `shutdown`: for the
    /// admission webhook, which the API server calls with the CA as its `caBundle`.
    pub fn webhook_server(
        &self,
        metrics: TlsMetrics,
        shutdown: CancellationToken,
    ) -> Result<Reloading<ServerConfig>, TlsError> {
        self.reloading(Side::Server, metrics, shutdown, webhook_config)
    }

    /// Like [`TlsArgs::webhook_server`], but every client must present a certificate that
    /// chains to `client_ca` (the API server's `--kubeconfig` of its admission
    /// configuration names the client certificate it presents to webhooks).
    pub fn webhook_server_verifying(
        &self,
        client_ca: &Path,
        metrics: TlsMetrics,
        shutdown: CancellationToken,
    ) -> Result<Reloading<ServerConfig>, TlsError> {
        let files = TlsArgs {
            ca: Some(client_ca.to_path_buf()),
            ..self.clone()
        };
        files.reloading(Side::Server, metrics, shutdown, webhook_mtls_config)
    }

    /// Builds the client-side configuration (HTTP/2 only) and keeps reloading it until
    /// `shutdown`.
    pub fn client(
        &self,
        metrics: TlsMetrics,
        shutdown: CancellationToken,
    ) -> Result<Reloading<ClientConfig>, TlsError> {
        self.reloading(Side::Client, metrics, shutdown, client_config)
    }

    fn reloading<T: Send + Sync + 'static>(
        &self,
        side: Side,
        metrics: TlsMetrics,
        shutdown: CancellationToken,
        build: fn(&Loaded) -> Result<T, TlsError>,
    ) -> Result<Reloading<T>, TlsError> {
        let loaded = load(self)?;
        let config = build(&loaded)?;
        metrics.observe(&loaded);
        let reloading = Reloading {
            current: Arc::new(RwLock::new(Arc::new(config))),
        };
        let files = self.clone();
        let target = reloading.clone();
        let mut fingerprint = loaded.fingerprint;
        tokio::spawn(async move {
            // A zero interval would panic in `interval` and silently end reloading.
            let every = files.tls_reload_interval.max(Duration::from_secs(1));
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let result = load(&files).and_then(|l| {
                    if l.fingerprint == fingerprint {
                        return Ok(None);
                    }
                    let config = build(&l)?;
                    Ok(Some((l, config)))
                });
                match result {
                    Ok(None) => {}
                    Ok(Some((l, config))) => {
                        *target.current.write() = Arc::new(config);
                        fingerprint = l.fingerprint.clone();
                        metrics.observe(&l);
                        metrics.reloads.with_label_values(&["ok"]).inc();
                        tracing::info!(?side, "TLS files changed: reloaded");
                    }
                    Err(error) => {
                        metrics.reloads.with_label_values(&["error"]).inc();
                        let error = crate::chain(&error);
                        tracing::warn!(?side, %error, "TLS files changed but cannot be used; keeping the previous configuration");
                    }
                }
            }
        });
        Ok(reloading)
    }
}

impl TlsArgs {
    fn paths(&self) -> Result<(&Path, &Path, &Path), TlsError> {
        Ok((
            self.ca.as_deref().ok_or(TlsError::Missing("--ca"))?,
            self.cert.as_deref().ok_or(TlsError::Missing("--cert"))?,
            self.key.as_deref().ok_or(TlsError::Missing("--key"))?,
        ))
    }
}

// === impl Reloading ===

impl<T> Reloading<T> {
    /// The configuration new connections should use.
    pub fn current(&self) -> Arc<T> {
        self.current.read().clone()
    }
}

// === impl TlsMetrics ===

impl TlsMetrics {
    /// Registers the TLS metrics in `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let expiry = IntGauge::new(
            "podiam_tls_certificate_expiry_timestamp_seconds",
            "When this process's own TLS certificate expires (Unix time)",
        )?;
        let reloads = IntCounterVec::new(
            Opts::new(
                "podiam_tls_reloads_total",
                "Reloads of changed TLS files, by result (ok, error)",
            ),
            &["result"],
        )?;
        registry.register(Box::new(expiry.clone()))?;
        registry.register(Box::new(reloads.clone()))?;
        Ok(Self { expiry, reloads })
    }

    fn observe(&self, loaded: &Loaded) {
        if let Some(not_after) = loaded.certs.first().and_then(|c| not_after(c)) {
            let secs = not_after
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            self.expiry.set(i64::try_from(secs).unwrap_or(i64::MAX));
        }
    }
}

/// The end of a certificate's validity.
pub fn not_after(cert: &CertificateDer<'_>) -> Option<SystemTime> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let secs = parsed.validity().not_after.timestamp();
    let secs = u64::try_from(secs).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

/// The crypto provider of every TLS configuration in podiam.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

// === building ===

fn load(files: &TlsArgs) -> Result<Loaded, TlsError> {
    let (ca_path, cert_path, key_path) = files.paths()?;
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.into(),
            source,
        })
    };
    let (ca, cert, key_pem) = (read(ca_path)?, read(cert_path)?, read(key_path)?);
    let pem_error = |path: &Path, what: String| TlsError::Pem {
        path: path.into(),
        what,
    };
    let certs = CertificateDer::pem_slice_iter(&cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(cert_path, e.to_string()))?;
    if certs.is_empty() {
        return Err(pem_error(cert_path, "no CERTIFICATE found".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| pem_error(key_path, format!("no private key: {e}")))?;
    let mut roots = RootCertStore::empty();
    let mut added = 0;
    for ca_cert in CertificateDer::pem_slice_iter(&ca) {
        let ca_cert = ca_cert.map_err(|e| pem_error(ca_path, e.to_string()))?;
        roots
            .add(ca_cert)
            .map_err(|e| pem_error(ca_path, e.to_string()))?;
        added += 1;
    }
    if added == 0 {
        return Err(pem_error(ca_path, "no CA CERTIFICATE found".into()));
    }
    let mut fingerprint = Vec::new();
    for part in [&ca, &cert, &key_pem] {
        fingerprint.extend_from_slice(ring::digest::digest(&ring::digest::SHA256, part).as_ref());
    }
    Ok(Loaded {
        fingerprint,
        certs,
        key,
        roots,
    })
}

fn server_config(l: &Loaded) -> Result<ServerConfig, TlsError> {
    let provider = provider();
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(l.roots.clone()), provider.clone())
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(l.certs.clone(), l.key.clone_key())?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

fn webhook_config(l: &Loaded) -> Result<ServerConfig, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(l.certs.clone(), l.key.clone_key())?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

fn webhook_mtls_config(l: &Loaded) -> Result<ServerConfig, TlsError> {
    let mut config = server_config(l)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

fn client_config(l: &Loaded) -> Result<ClientConfig, TlsError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(l.roots.clone())
        .with_client_auth_cert(l.certs.clone(), l.key.clone_key())?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use rcgen::{CertificateParams, KeyPair};

    use super::*;

    /// Writes a self-signed certificate (used as its own CA) into `dir/name/`.
    fn version(dir: &Path, name: &str) {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let v = dir.join(name);
        std::fs::create_dir(&v).unwrap();
        std::fs::write(v.join("ca.pem"), cert.pem()).unwrap();
        std::fs::write(v.join("tls.crt"), cert.pem()).unwrap();
        std::fs::write(v.join("tls.key"), key.serialize_pem()).unwrap();
    }

    /// The kubelet's atomic update: a new `..data` symlink renamed over the old one.
    fn swap(dir: &Path, to: &str) {
        let tmp = dir.join("..data_tmp");
        symlink(to, &tmp).unwrap();
        std::fs::rename(&tmp, dir.join("..data")).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn reloads_a_swapped_symlink_and_keeps_the_last_good_config() {
        rustls::crypto::ring::default_provider()
            .install_default()
            .ok();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        version(d, "v1");
        symlink("v1", d.join("..data")).unwrap();
        for f in ["ca.pem", "tls.crt", "tls.key"] {
            symlink(format!("..data/{f}"), d.join(f)).unwrap();
        }
        let args = TlsArgs {
            ca: Some(d.join("ca.pem")),
            cert: Some(d.join("tls.crt")),
            key: Some(d.join("tls.key")),
            tls_reload_interval: Duration::from_secs(10),
        };
        let registry = Registry::new();
        let metrics = TlsMetrics::register(&registry).unwrap();
        let shutdown = CancellationToken::new();
        let reloading = args.server(metrics.clone(), shutdown.clone()).unwrap();
        let first = reloading.current();

        // Nothing changed: no reload.
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert!(Arc::ptr_eq(&first, &reloading.current()));

        // Rotated: the next tick picks it up.
        version(d, "v2");
        swap(d, "v2");
        tokio::time::sleep(Duration::from_secs(10)).await;
        let second = reloading.current();
        assert!(!Arc::ptr_eq(&first, &second), "not reloaded");
        assert_eq!(metrics.reloads.with_label_values(&["ok"]).get(), 1);

        // A broken rotation (key does not match the certificate) is refused.
        version(d, "v3");
        std::fs::copy(d.join("v2/tls.key"), d.join("v3/tls.key")).unwrap();
        swap(d, "v3");
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(
            Arc::ptr_eq(&second, &reloading.current()),
            "kept the last good config"
        );
        assert!(metrics.reloads.with_label_values(&["error"]).get() >= 1);
        assert!(metrics.expiry.get() > 0);
        shutdown.cancel();
    }

    #[test]
    fn missing_or_empty_files_are_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let args = TlsArgs {
            ca: Some(empty.clone()),
            cert: Some(empty.clone()),
            key: None,
            tls_reload_interval: Duration::from_secs(10),
        };
        assert!(matches!(load(&args), Err(TlsError::Missing("--key"))));
        let args = TlsArgs {
            key: Some(empty.clone()),
            ..args
        };
        let err = load(&args).err().unwrap().to_string();
        assert!(err.contains("empty.pem"), "{err}");
    }
}
