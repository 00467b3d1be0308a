//! What the cloud backends and the KMS share about reaching cloud services,
//! kept apart from both so that neither depends on the other and a build
//! without a cloud backend (Cargo features `azure`, `gcp`) still has it.

pub mod error_body;
pub mod gcp_metadata;
pub mod retry;

/// Azure's Instance Metadata Service, as every Azure VM reaches it.
pub const AZURE_IMDS_URL: &str = "http://169.254.169.254";

/// A reqwest client builder on the one TLS stack the project links: rustls
/// with ring (reqwest is built with `rustls-no-provider`, so that no second
/// crypto library, aws-lc, comes in). rustls needs a process-wide provider
/// before the first client is built; installing it again is harmless. Server
/// certificates are checked against the system's roots.
pub fn http_client_builder() -> reqwest::ClientBuilder {
    install_crypto_provider();
    reqwest::Client::builder()
}

/// Installs ring as rustls's process-wide crypto provider, if none is yet.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
