//! The GCE metadata server: where a VM (or a GKE pod with Workload Identity)
//! learns its project, zone, instance name and machine type, and where the KMS
//! wrapper gets its access token (its address: [`crate::cloud::gcp_metadata`]).
//!
//! One place owns the server's address, its override and the request header, so
//! the backend, the node plugin and the KMS agree on them.

use std::time::Duration;

use super::super::{Error, Result};

pub use crate::cloud::gcp_metadata::{
    DEFAULT_METADATA_URL, METADATA_FLAVOR, METADATA_HOST_ENV, METADATA_V1, metadata_url,
};

/// What this VM is, as the metadata server says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    pub project: String,
    pub zone: String,
    pub name: String,
    pub machine_type: String,
}

/// A client of the metadata server: plain HTTP, no proxy (a proxy must not see
/// what the server answers), short timeouts and a few retries.
#[derive(Clone)]
pub struct Metadata {
    base: String,
    client: reqwest::Client,
    attempts: u32,
    delay: Duration,
}

impl Metadata {
    /// The server named by `GCE_METADATA_HOST`, or the default.
    pub fn from_env() -> Result<Self> {
        Self::new(&metadata_url(|k| std::env::var(k).ok()))
    }

    pub fn new(base: &str) -> Result<Self> {
        let client = crate::cloud::http_client_builder()
            .no_proxy()
            .timeout(Duration::from_secs(5))
            .connect_timeout(Duration::from_secs(3))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| Error::Internal(format!("building an HTTP client: {e}")))?;
        Ok(Metadata {
            base: base.trim_end_matches('/').to_string(),
            client,
            attempts: 3,
            delay: Duration::from_millis(300),
        })
    }

    /// The text at `path` under `/computeMetadata/v1`, e.g. `/instance/zone`.
    pub async fn get(&self, path: &str) -> Result<String> {
        let url = format!("{}{METADATA_V1}{path}", self.base);
        let mut attempt = 1;
        loop {
            let outcome = self
                .client
                .get(&url)
                .header(METADATA_FLAVOR.0, METADATA_FLAVOR.1)
                .send()
                .await;
            let err = match outcome {
                Ok(resp) if resp.status().is_success() => {
                    let text = resp.text().await.map_err(|e| {
                        Error::Unavailable(format!("reading {url} from the metadata server: {e}"))
                    })?;
                    return Ok(text.trim().to_string());
                }
                Ok(resp) if resp.status().is_server_error() => Error::Unavailable(format!(
                    "the metadata server answered {url} with HTTP {}",
                    resp.status().as_u16()
                )),
                Ok(resp) => {
                    return Err(Error::FailedPrecondition(format!(
                        "the metadata server answered {url} with HTTP {}; is this a GCE VM \
                         (or is {METADATA_HOST_ENV} right)?",
                        resp.status().as_u16()
                    )));
                }
                Err(e) => Error::Unavailable(format!(
                    "the metadata server at {} cannot be reached ({e}); outside GCE pass the \
                     values as flags",
                    self.base
                )),
            };
            if attempt >= self.attempts {
                return Err(err);
            }
            tokio::time::sleep(self.delay * attempt).await;
            attempt += 1;
        }
    }

    pub async fn project_id(&self) -> Result<String> {
        self.get("/project/project-id").await
    }

    /// The zone name (the server says `projects/<number>/zones/<zone>`).
    pub async fn zone(&self) -> Result<String> {
        Ok(last_segment(&self.get("/instance/zone").await?).to_string())
    }

    pub async fn instance_name(&self) -> Result<String> {
        self.get("/instance/name").await
    }

    /// The machine type name (the server says `projects/<number>/machineTypes/<type>`).
    pub async fn machine_type(&self) -> Result<String> {
        Ok(last_segment(&self.get("/instance/machine-type").await?).to_string())
    }

    pub async fn instance(&self) -> Result<Instance> {
        Ok(Instance {
            project: self.project_id().await?,
            zone: self.zone().await?,
            name: self.instance_name().await?,
            machine_type: self.machine_type().await?,
        })
    }
}

/// What follows the last `/` (all of `s` without one).
pub fn last_segment(s: &str) -> &str {
    s.rsplit('/').next().unwrap_or(s)
}
