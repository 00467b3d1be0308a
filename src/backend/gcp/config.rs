//! What the GCP backend is configured with, and the credentials it calls
//! Compute Engine with.
//!
//! Credentials are Application Default Credentials as google-cloud-auth finds
//! them: `GOOGLE_APPLICATION_CREDENTIALS` (a service-account key or an
//! external-account / workload-identity-federation file), gcloud's user
//! credentials, or the metadata server (GCE, and GKE Workload Identity). They
//! are handed to the Compute clients and never logged; nothing here derives
//! `Debug` on them.

use std::time::Duration;

use google_cloud_auth::credentials::{self, Credentials};

use super::super::{Error, Result};
use super::metadata::Metadata;

/// Replaces `https://compute.googleapis.com` (for a private endpoint, or a test
/// fake; plain `http://` works).
pub const COMPUTE_ENDPOINT_ENV: &str = "CRYPTDISK_GCP_COMPUTE_ENDPOINT";

/// Retries of throttled (429, 403 `rateLimitExceeded`/quota) and failed (5xx,
/// connection) Compute calls; [`GcpConfig`]'s default is 6 tries, 0.5 s doubling
/// to 30 s, with jitter.
pub use crate::cloud::retry::Retry;

#[derive(Clone, Debug)]
pub struct GcpConfig {
    /// The project every disk, snapshot and instance lives in.
    pub project: String,
    /// Zone of a new disk when the request's topology does not choose one.
    pub default_zone: String,
    /// Compute endpoint override ([`COMPUTE_ENDPOINT_ENV`]); `None`: Google's.
    pub endpoint: Option<String>,
    /// The CSI driver name, written (as a label value) on every disk and
    /// snapshot so that listing finds ours only.
    pub driver_name: String,
    pub retry: Retry,
    /// Pause between two operation waits that returned unfinished.
    pub poll_interval: Duration,
    /// How long one call waits for its operation before answering UNAVAILABLE
    /// (a retry picks the operation's result up from the resource).
    pub operation_timeout: Duration,
    /// Time limit of one HTTP attempt; above the two minutes an
    /// `operations.wait` may hold a request open.
    pub attempt_timeout: Duration,
}

impl GcpConfig {
    /// A configuration with defaults for everything but the location.
    pub fn new(project: impl Into<String>, default_zone: impl Into<String>) -> Self {
        GcpConfig {
            project: project.into(),
            default_zone: default_zone.into(),
            endpoint: None,
            driver_name: "cryptdisk.csi.io".into(),
            retry: Retry {
                max_attempts: 6,
                base_delay: Duration::from_millis(500),
                max_delay: Duration::from_secs(30),
            },
            poll_interval: Duration::from_secs(1),
            operation_timeout: Duration::from_secs(300),
            attempt_timeout: Duration::from_secs(150),
        }
    }

    /// Project and zone as given, each missing one from the metadata server (as
    /// the PD CSI driver does), and the endpoint from [`COMPUTE_ENDPOINT_ENV`].
    pub async fn resolve(
        project: Option<String>,
        zone: Option<String>,
        metadata: &Metadata,
    ) -> Result<Self> {
        let given = |v: Option<String>| v.filter(|s| !s.trim().is_empty());
        let project = match given(project) {
            Some(p) => p,
            None => metadata.project_id().await.map_err(|e| {
                Error::FailedPrecondition(format!(
                    "--gcp-project is not set and the metadata server cannot say it: {}",
                    e.message()
                ))
            })?,
        };
        let zone = match given(zone) {
            Some(z) => z,
            None => metadata.zone().await.map_err(|e| {
                Error::FailedPrecondition(format!(
                    "--gcp-zone is not set and the metadata server cannot say it: {}",
                    e.message()
                ))
            })?,
        };
        let mut config = GcpConfig::new(project, zone);
        config.endpoint = std::env::var(COMPUTE_ENDPOINT_ENV)
            .ok()
            .filter(|v| !v.trim().is_empty());
        config.check()?;
        Ok(config)
    }

    /// Project and zone must look like GCP names, so that a typo fails at start.
    pub fn check(&self) -> Result<()> {
        if !super::params::is_project_id(&self.project) {
            return Err(Error::InvalidArgument(format!(
                "GCP project {:?} is not a project id (6-30 of [a-z0-9-], or domain:id)",
                self.project
            )));
        }
        if !super::params::is_zone(&self.default_zone) {
            return Err(Error::InvalidArgument(format!(
                "GCP zone {:?} is not a zone name such as us-central1-a",
                self.default_zone
            )));
        }
        Ok(())
    }
}

/// Application Default Credentials (see the module docs).
pub fn application_default_credentials() -> Result<Credentials> {
    install_crypto_provider();
    credentials::Builder::default().build().map_err(|e| {
        Error::FailedPrecondition(format!(
            "no Google credentials: {e}; on GCE/GKE the metadata server provides them, \
             elsewhere set GOOGLE_APPLICATION_CREDENTIALS to a service-account key or an \
             external-account file"
        ))
    })
}

/// No credentials at all: for tests against a local fake.
pub fn anonymous_credentials() -> Credentials {
    credentials::anonymous::Builder::new().build()
}

/// rustls needs one process-wide crypto provider; the project links ring only
/// (tonic's TLS uses it too), so it is installed before any Google client is
/// built. Installing twice is harmless.
pub use crate::cloud::install_crypto_provider;
