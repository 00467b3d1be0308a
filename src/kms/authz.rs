//! Who may have a volume's key: the authorization seam of the KMS.
//!
//! TLS proves "a node of this cluster"; an [`Authorizer`] decides whether the
//! caller is the node a given volume is attached to, and names the volume's key
//! scope (DESIGN.md §3). Implementations: one backed by the Kubernetes API
//! (TokenReview for the caller, a watch-fed cache of VolumeAttachments and
//! PersistentVolumes for the decision), one for a single machine without
//! Kubernetes (`dev`: the volumes the local backend has published to this node).

pub use crate::csi::contract::KEY_SCOPE as SCOPE_ATTRIBUTE;

/// `--authorizer`: who decides which node may have which volume's key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthorizerKind {
    Kubernetes,
    Local,
    None,
}

/// What an authorizer grants: the node the caller proved to be, and the key
/// scope of the volume, read from the volume's own record (never from the
/// caller).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub node: String,
    pub scope: String,
}

/// Why a key request was refused. Every variant maps to PERMISSION_DENIED or
/// UNAUTHENTICATED (no or bad proof of identity), or UNAVAILABLE when the
/// authorizer cannot decide (its view is stale): it fails closed.
#[derive(Debug, thiserror::Error)]
pub enum Denial {
    #[error("no node token in the request")]
    NoToken,
    #[error("node token refused: {0}")]
    BadToken(String),
    #[error("service account {0} may not ask for keys")]
    WrongAccount(String),
    #[error("volume {volume} is not attached to node {node}")]
    NotAttached { node: String, volume: String },
    #[error("cannot decide: {0}")]
    Unavailable(String),
}

impl From<Denial> for tonic::Status {
    fn from(d: Denial) -> Self {
        match d {
            Denial::NoToken | Denial::BadToken(_) => tonic::Status::unauthenticated(d.to_string()),
            Denial::WrongAccount(_) | Denial::NotAttached { .. } => {
                tonic::Status::permission_denied(d.to_string())
            }
            Denial::Unavailable(_) => tonic::Status::unavailable(d.to_string()),
        }
    }
}

/// Decides per request whether a key may be served.
#[tonic::async_trait]
pub trait Authorizer: Send + Sync {
    /// May the holder of `token` (the bearer token of the request, if any)
    /// have the key of CSI volume `volume_id`? On yes, the node and the
    /// volume's scope.
    async fn authorize(&self, token: Option<&str>, volume_id: &str) -> Result<Grant, Denial>;
}

/// `--authorizer none`: no per-volume check at all. Every caller that reaches
/// the KMS gets the key of any volume it names, under the scope of that
/// volume's own id (so a restored volume, whose scope is its source's, gets a
/// wrong key: it will not open). For tests and a KMS on loopback or a unix
/// socket only; the KMS warns at start.
pub struct NoneAuthorizer;

/// The node an unchecked grant names in the audit log.
pub const UNCHECKED_NODE: &str = "unchecked";

#[tonic::async_trait]
impl Authorizer for NoneAuthorizer {
    async fn authorize(&self, _token: Option<&str>, volume_id: &str) -> Result<Grant, Denial> {
        Ok(Grant {
            node: UNCHECKED_NODE.to_string(),
            scope: volume_id.to_string(),
        })
    }
}
