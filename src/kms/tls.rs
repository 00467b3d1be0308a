//! Mutual TLS between node plugins and the KMS: the KMS serves only clients whose
//! certificate chains to the configured CA (rustls checks the chain and the
//! validity period), and the node checks the KMS's certificate the same way.

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// Why a TLS setting could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {path} holds no PEM certificate")]
    NoCertificate { what: &'static str, path: PathBuf },
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn read_cert(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let pem = read(what, path)?;
    if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
        return Err(TlsError::NoCertificate {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(pem)
}

/// Files of one side's TLS identity and the CA it trusts for the other side.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl TlsFiles {
    /// The KMS side: its certificate, and client certificates required and
    /// checked against `ca`; a client that has not completed the handshake
    /// within `handshake_timeout` is disconnected.
    pub fn server_config(
        &self,
        handshake_timeout: std::time::Duration,
    ) -> Result<ServerTlsConfig, TlsError> {
        let identity = Identity::from_pem(
            read_cert("certificate", &self.cert)?,
            read("private key", &self.key)?,
        );
        Ok(ServerTlsConfig::new()
            .identity(identity)
            .client_ca_root(Certificate::from_pem(read_cert("client CA", &self.ca)?))
            .client_auth_optional(false)
            .timeout(handshake_timeout))
    }

    /// The node side: its client certificate, and the KMS's certificate checked
    /// against `ca` for the name `server_name`.
    pub fn client_config(&self, server_name: &str) -> Result<ClientTlsConfig, TlsError> {
        let identity = Identity::from_pem(
            read_cert("certificate", &self.cert)?,
            read("private key", &self.key)?,
        );
        Ok(ClientTlsConfig::new()
            .identity(identity)
            .ca_certificate(Certificate::from_pem(read_cert("KMS CA", &self.ca)?))
            .domain_name(server_name))
    }
}

/// Who a client certificate names, for the audit log: its first DNS name, else
/// its subject's common name, else its SHA-256 fingerprint.
pub fn client_identity(der: &[u8]) -> String {
    use x509_parser::prelude::*;
    if let Ok((_, cert)) = X509Certificate::from_der(der) {
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                if let GeneralName::DNSName(dns) = name {
                    return (*dns).to_string();
                }
            }
        }
        if let Some(cn) = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
        {
            return format!("CN={cn}");
        }
    }
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(der)))
}
