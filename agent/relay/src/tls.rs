//! Server TLS: certificate and key from PEM files, swappable at run time
//! (`Relay::reload_tls`, wired to SIGHUP by the agent) so certificate
//! renewals need no restart. Sessions already running keep the config they
//! started with; new handshakes see the new one.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading PEM {what} from {path}: {source}")]
    Pem {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("no certificate in {path}")]
    NoCertificate { path: PathBuf },
    #[error("building TLS config from {cert} and {key}: {source}")]
    Config {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[cfg(feature = "lab-cert")]
    #[error("generating lab certificate: {source}")]
    Generate {
        #[source]
        source: rcgen::Error,
    },
    #[cfg(feature = "lab-cert")]
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub fn load_server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(Iterator::collect)
        .map_err(|source| TlsError::Pem {
            what: "certificates",
            path: cert.into(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path: cert.into() });
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::Pem {
        what: "private key",
        path: key.into(),
        source,
    })?;
    let config_err = |source| TlsError::Config {
        cert: cert.into(),
        key: key.into(),
        source,
    };
    let cfg =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(config_err)?
            .with_no_client_auth()
            .with_single_cert(certs, key_der)
            .map_err(config_err)?;
    Ok(Arc::new(cfg))
}

#[derive(Debug)]
pub struct TlsStore {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<ServerConfig>>,
}

impl TlsStore {
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        Ok(Self {
            cert: cert.into(),
            key: key.into(),
            current: RwLock::new(load_server_config(cert, key)?),
        })
    }

    /// Re-reads the PEM files. On error the old config stays in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let cfg = load_server_config(&self.cert, &self.key)?;
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = cfg;
        Ok(())
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(
            self.current
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
        )
    }
}

/// A self-signed certificate for tests and lab setups only: clients must be
/// told to trust it explicitly (or skip verification).
#[cfg(feature = "lab-cert")]
#[derive(Debug, Clone)]
pub struct LabCert {
    pub cert_pem: String,
    pub key_pem: String,
}

#[cfg(feature = "lab-cert")]
pub fn generate_lab_cert(names: &[&str]) -> Result<LabCert, TlsError> {
    let ck = rcgen::generate_simple_self_signed(
        names.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>(),
    )
    .map_err(|source| TlsError::Generate { source })?;
    Ok(LabCert {
        cert_pem: ck.cert.pem(),
        key_pem: ck.key_pair.serialize_pem(),
    })
}

/// Writes a lab certificate as `relay.crt` and `relay.key` under `dir` and
/// returns their paths.
#[cfg(feature = "lab-cert")]
pub fn write_lab_cert(dir: &Path, names: &[&str]) -> Result<(PathBuf, PathBuf), TlsError> {
    let c = generate_lab_cert(names)?;
    let cert = dir.join("relay.crt");
    let key = dir.join("relay.key");
    std::fs::write(&cert, c.cert_pem).map_err(|source| TlsError::Write {
        path: cert.clone(),
        source,
    })?;
    crate::safeio::write_atomic(&key, c.key_pem.as_bytes(), 0o600).map_err(|source| {
        TlsError::Write {
            path: key.clone(),
            source,
        }
    })?;
    Ok((cert, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_cert_loads_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = write_lab_cert(dir.path(), &["localhost"]).unwrap();
        let store = TlsStore::load(&c, &k).unwrap();
        std::fs::write(&c, "garbage").unwrap();
        assert!(store.reload().is_err(), "bad PEM must be reported");
        write_lab_cert(dir.path(), &["localhost"]).unwrap();
        store.reload().unwrap();
    }
}
