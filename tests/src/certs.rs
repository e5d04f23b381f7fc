//! Certificates for the mutual-TLS tests (rcgen): a CA, a server certificate for
//! `localhost`/127.0.0.1, a client certificate, and the same again from an unrelated CA.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

/// PEM files on disk.
#[derive(Clone, Debug)]
pub struct Pair {
    /// The certificate.
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
}

/// A CA with a server and a client certificate.
#[derive(Debug)]
pub struct Pki {
    /// The CA certificate.
    pub ca: PathBuf,
    /// The server's pair (SAN localhost, 127.0.0.1).
    pub server: Pair,
    /// A client's pair.
    pub client: Pair,
}

impl Pki {
    /// Generates everything into `dir`, file names prefixed with `prefix`.
    pub fn generate(dir: &Path, prefix: &str) -> Result<Self, rcgen::Error> {
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, format!("{prefix} test CA"));
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);
        let write = |name: &str, pem: String| {
            let path = dir.join(format!("{prefix}-{name}"));
            std::fs::write(&path, pem).map_err(|e| rcgen::Error::PemError(e.to_string()))?;
            Ok::<_, rcgen::Error>(path)
        };
        let ca = write("ca.pem", ca_cert.pem())?;
        let leaf = |name: &str, sans: Vec<String>| {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(sans)?;
            params.distinguished_name.push(DnType::CommonName, name);
            let cert = params.signed_by(&key, &issuer)?;
            Ok::<_, rcgen::Error>(Pair {
                cert: write(&format!("{name}.pem"), cert.pem())?,
                key: write(&format!("{name}-key.pem"), key.serialize_pem())?,
            })
        };
        let server = leaf("server", vec!["localhost".into(), "127.0.0.1".into()])?;
        let client = leaf("agent", vec!["podiam-agent".into()])?;
        Ok(Self { ca, server, client })
    }
}
