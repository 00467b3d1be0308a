//! The authorizer of one machine without Kubernetes (`dev`, and `kms
//! --authorizer local --local-state DIR`): a volume's key goes only to the node
//! the local backend has published it to, within the scope its index records.
//!
//! There is no node identity to check on one machine: the local backend
//! serves exactly one node (its index's location), the one it attaches to, so
//! "published to this node" is "attached in the index". The bearer token, if
//! any, is ignored.

use std::path::PathBuf;

use super::authz::{Authorizer, Denial, Grant};
use crate::backend::LocalBackend;
use crate::volume::VolumeId;

/// Allows exactly the volumes the local backend under `data_dir` has published
/// to its node, read from its index at each request (so an unpublish takes
/// effect at once).
pub struct LocalAuthorizer {
    data_dir: PathBuf,
}

impl LocalAuthorizer {
    /// The authorizer of the local backend whose data directory (the
    /// controller's `--data-dir`, the KMS's `--local-state`) is `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        LocalAuthorizer {
            data_dir: data_dir.into(),
        }
    }
}

#[tonic::async_trait]
impl Authorizer for LocalAuthorizer {
    async fn authorize(&self, _token: Option<&str>, volume_id: &str) -> Result<Grant, Denial> {
        let not_here = || Denial::NotAttached {
            node: "this machine".into(),
            volume: volume_id
                .chars()
                .take(crate::volume::id::MAX_ID_LEN)
                .collect(),
        };
        let Ok(id) = volume_id.parse::<VolumeId>() else {
            return Err(not_here());
        };
        let dir = self.data_dir.clone();
        let found =
            tokio::task::spawn_blocking(move || LocalBackend::published_key_scope(&dir, &id))
                .await
                .map_err(|e| Denial::Unavailable(format!("reading the local index: {e}")))?
                .map_err(|e| Denial::Unavailable(format!("reading the local index: {e}")))?;
        match found {
            Some((node, scope)) => Ok(Grant { node, scope }),
            None => Err(not_here()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{DiskBackend, DiskSource, DiskSpec};

    const NODE: &str = "node-a";

    fn spec(name: &str, source: Option<DiskSource>, scope: Option<String>) -> DiskSpec {
        DiskSpec {
            name: name.into(),
            capacity_bytes: 32 << 20,
            source,
            parameters: Default::default(),
            accessibility: None,
            options: Default::default(),
            usable_bytes: 16 << 20,
            key_scope: scope,
        }
    }

    /// Allows a volume only while it is published to the backend's node, with
    /// its own id as scope, or the scope it inherited from a snapshot.
    #[tokio::test]
    async fn allows_exactly_the_published_volumes_with_their_scope() {
        let dir = tempfile::tempdir().unwrap();
        let backend = LocalBackend::open(dir.path(), NODE, Some(1 << 30)).unwrap();
        let authz = LocalAuthorizer::new(dir.path());
        let a = backend.create_disk(&spec("a", None, None)).await.unwrap();
        let a_id = a.id.to_string();
        let denied = authz.authorize(None, &a_id).await.unwrap_err();
        assert!(matches!(denied, Denial::NotAttached { .. }), "{denied:?}");
        backend.attach(&a.id, NODE, false).await.unwrap();
        assert_eq!(
            authz.authorize(Some("ignored"), &a_id).await.unwrap(),
            Grant {
                node: NODE.into(),
                scope: a_id.clone()
            }
        );
        // A restore of a snapshot of A carries A's scope.
        let snap = backend.create_snapshot(&a.id, "snap").await.unwrap();
        assert_eq!(snap.scope(), a_id);
        let b = backend
            .create_disk(&spec(
                "b",
                Some(DiskSource::Snapshot(snap.id.clone())),
                Some(snap.scope()),
            ))
            .await
            .unwrap();
        backend.attach(&b.id, NODE, false).await.unwrap();
        assert_eq!(
            authz
                .authorize(None, &b.id.to_string())
                .await
                .unwrap()
                .scope,
            a_id
        );
        // Unpublished: refused at the next request.
        backend.detach(&a.id, NODE).await.unwrap();
        assert!(authz.authorize(None, &a_id).await.is_err());
        // Ids of another location, another backend, or nonsense: refused.
        for other in ["local:node-b:x", "gcp:z:x", "garbage", ""] {
            assert!(authz.authorize(None, other).await.is_err(), "{other}");
        }
    }

    /// `dev`'s key source derives through the authorizer: the v2 key within
    /// the scope the index records (a restore: its source's), the v1 key as
    /// before, and nothing for a volume not published here.
    #[tokio::test]
    async fn the_local_key_source_serves_only_published_volumes_in_their_scope() {
        use crate::kms::{Derivation, KeyError, KeyRequest, KeySource, LocalKeySource};
        let dir = tempfile::tempdir().unwrap();
        let backend = LocalBackend::open(dir.path(), NODE, Some(1 << 30)).unwrap();
        let master = crate::kms::server::MasterSecret::new(
            zeroize::Zeroizing::new(vec![1; 32]),
            zeroize::Zeroizing::new(vec![2; 32]),
        );
        let keys = LocalKeySource::new(
            master,
            "embedded",
            std::sync::Arc::new(LocalAuthorizer::new(dir.path())),
        );
        let a = backend.create_disk(&spec("a", None, None)).await.unwrap();
        let snap = backend.create_snapshot(&a.id, "s").await.unwrap();
        let r = backend
            .create_disk(&spec(
                "r",
                Some(DiskSource::Snapshot(snap.id.clone())),
                Some(snap.scope()),
            ))
            .await
            .unwrap();
        let r_id = r.id.to_string();
        let ask = |derivation| KeyRequest {
            volume_id: &r_id,
            data_key_id: "key-id",
            derivation,
            len: 32,
            version: None,
        };
        let denied = keys.volume_key(&ask(Derivation::V2)).await.err().unwrap();
        assert!(matches!(denied, KeyError::Denied(_)), "{denied:?}");
        backend.attach(&r.id, NODE, false).await.unwrap();
        let (v2, version) = keys.volume_key(&ask(Derivation::V2)).await.unwrap();
        assert_eq!(version, 1);
        let want =
            crate::kms::derive_scoped_key(&[1; 32], &[2; 32], &a.id.to_string(), "key-id", 32)
                .unwrap();
        assert_eq!(v2.expose(), want.expose());
        let (v1, _) = keys.volume_key(&ask(Derivation::V1)).await.unwrap();
        let want = crate::kms::derive_data_key(&[1; 32], &[2; 32], "key-id", 32).unwrap();
        assert_eq!(v1.expose(), want.expose());
    }
}
