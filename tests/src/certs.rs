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
    /// The CA and where the files go, for [`Pki::rotate`] (none for files made elsewhere).
    rotation: Option<Rotation>,
}

#[derive(Debug)]
struct Rotation {
    issuer: Issuer<'static, KeyPair>,
    dir: PathBuf,
    prefix: String,
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
        let ca = write(&dir.join(format!("{prefix}-ca.pem")), &ca_cert.pem())?;
        let (server, client) = leaves(&issuer, dir, prefix)?;
        Ok(Self {
            ca,
            server,
            client,
            rotation: Some(Rotation {
                issuer,
                dir: dir.to_path_buf(),
                prefix: prefix.to_string(),
            }),
        })
    }

    /// Files made elsewhere (e.g. by `deploy/gen-certs.sh`); they cannot be rotated here.
    pub fn from_files(ca: PathBuf, server: Pair, client: Pair) -> Self {
        Self {
            ca,
            server,
            client,
            rotation: None,
        }
    }

    /// Issues new server and client certificates and keys from the same CA, replacing the
    /// files in place (each by a rename, as a Secret's update swaps them whole).
    pub fn rotate(&self) -> Result<(), rcgen::Error> {
        let Some(r) = &self.rotation else {
            return Err(rcgen::Error::PemError(
                "these files were made elsewhere; no CA key to rotate them with".into(),
            ));
        };
        leaves(&r.issuer, &r.dir, &r.prefix).map(|_| ())
    }
}

/// The server's and the client's pairs, written into `dir`.
fn leaves(
    issuer: &Issuer<'static, KeyPair>,
    dir: &Path,
    prefix: &str,
) -> Result<(Pair, Pair), rcgen::Error> {
    let leaf = |name: &str, sans: Vec<String>| {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(sans)?;
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.signed_by(&key, issuer)?;
        Ok::<_, rcgen::Error>(Pair {
            cert: write(&dir.join(format!("{prefix}-{name}.pem")), &cert.pem())?,
            key: write(
                &dir.join(format!("{prefix}-{name}-key.pem")),
                &key.serialize_pem(),
            )?,
        })
    };
    let server = leaf("server", vec!["localhost".into(), "127.0.0.1".into()])?;
    let client = leaf("agent", vec!["podiam-agent".into()])?;
    Ok((server, client))
}

/// Writes `pem` to `path` through a temporary file and a rename.
fn write(path: &Path, pem: &str) -> Result<PathBuf, rcgen::Error> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, pem)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| rcgen::Error::PemError(e.to_string()))?;
    Ok(path.to_path_buf())
}
