//! rustls server configuration: from PEM files, or a self-signed certificate
//! generated at start for the demo.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read certificate {path}: {reason}")]
    Cert { path: PathBuf, reason: String },
    #[error("cannot read private key {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("invalid certificate/key pair: {0}")]
    Config(#[from] rustls::Error),
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The crypto provider for every TLS config in sluice (server, and clients in
/// tests). *ring* is the project's choice: it builds with no C toolchain
/// beyond cc and no cmake; rustls 0.23.48 deprecates it only because it lacks
/// post-quantum key exchange.
#[allow(deprecated)]
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// ALPN: HTTP/2 first, HTTP/1.1 for clients that only speak that.
fn server_config(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

pub fn load(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Cert {
            path: cert.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Cert {
            path: cert.to_owned(),
            reason: "no PEM certificate found".into(),
        });
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
        path: key.to_owned(),
        reason: e.to_string(),
    })?;
    server_config(certs, key_der)
}

/// A self-signed certificate for `localhost` / `127.0.0.1` / `::1`, written
/// to `dir` as `cert.pem` and `key.pem` so clients can be told to trust it.
pub struct SelfSigned {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
}

pub fn generate_self_signed(dir: &Path) -> Result<SelfSigned, TlsError> {
    let names = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
    let ck = rcgen::generate_simple_self_signed(names)?;
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Write {
        path: dir.to_owned(),
        source,
    })?;
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    for (path, pem) in [
        (&cert_path, ck.cert.pem()),
        (&key_path, ck.signing_key.serialize_pem()),
    ] {
        std::fs::write(path, pem).map_err(|source| TlsError::Write {
            path: path.clone(),
            source,
        })?;
    }
    Ok(SelfSigned {
        cert_path,
        key_path,
    })
}
