//! TLS for STARTTLS: certificates from PEM files (re-read on SIGHUP) or, without files, a
//! self-signed certificate for the host name (the embedded default of `ringmail up`).

use std::path::Path;
use std::sync::{Arc, RwLock};

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::TlsAcceptor;

use crate::config::TlsFiles;

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: cannot read certificates: {message}")]
    Certs { path: String, message: String },
    #[error("{path}: cannot read the private key: {message}")]
    Key { path: String, message: String },
    #[error("certificate and key do not make a usable TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("cannot generate a self-signed certificate: {0}")]
    SelfSigned(String),
}

fn server_config(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<ServerConfig, TlsError> {
    let config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
    Ok(config)
}

fn load(files: &TlsFiles) -> Result<ServerConfig, TlsError> {
    let cert_path = files.cert.display().to_string();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Certs {
            path: cert_path.clone(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Certs {
            path: cert_path,
            message: "no CERTIFICATE block".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| TlsError::Key {
        path: files.key.display().to_string(),
        message: e.to_string(),
    })?;
    server_config(certs, key)
}

fn self_signed(hostname: &str) -> Result<ServerConfig, TlsError> {
    let ck = rcgen::generate_simple_self_signed(vec![hostname.to_string()])
        .map_err(|e| TlsError::SelfSigned(e.to_string()))?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.key_pair.serialize_der()));
    server_config(vec![ck.cert.der().clone()], key)
}

/// The current TLS configuration, swapped whole on reload; sessions take a snapshot when they
/// start TLS.
pub struct TlsStore {
    files: Option<TlsFiles>,
    current: RwLock<TlsAcceptor>,
}

impl std::fmt::Debug for TlsStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStore")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl TlsStore {
    pub fn new(files: Option<TlsFiles>, hostname: &str) -> Result<TlsStore, TlsError> {
        let config = match &files {
            Some(f) => load(f)?,
            None => self_signed(hostname)?,
        };
        Ok(TlsStore {
            files,
            current: RwLock::new(TlsAcceptor::from(Arc::new(config))),
        })
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Re-reads the certificate files. On error the previous configuration stays.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let Some(files) = &self.files else {
            return Ok(false);
        };
        let config = load(files)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) =
            TlsAcceptor::from(Arc::new(config));
        Ok(true)
    }

    /// The certificate files, if any.
    pub fn files(&self) -> Option<(&Path, &Path)> {
        self.files
            .as_ref()
            .map(|f| (f.cert.as_path(), f.key.as_path()))
    }
}
