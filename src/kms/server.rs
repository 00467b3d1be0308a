//! The cluster KMS's gRPC service: derives data keys from the master secret.

use std::path::Path;
use std::sync::Arc;

use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use super::locked::LockedBytes;

use super::authz::{Authorizer, Denial, Grant};
use super::{Derivation, KEY_LEN_RANGE, MIN_MASTER_SECRET_LEN, derive_data_key, derive_scoped_key};
use crate::proto::kms::api_server::Api;
use crate::proto::kms::{
    Derivation as WireDerivation, GetDataKeyRequest, GetDataKeyResponse,
    GetVersionedDataKeyRequest, GetVersionedDataKeyResponse, GetVolumeKeyRequest,
    GetVolumeKeyResponse,
};

/// Longest data key id accepted; ours are 36-character UUIDs.
pub const MAX_KEY_ID_LEN: usize = 256;

/// Longest CSI volume id accepted (the CSI spec's own bound is 128 bytes).
pub const MAX_VOLUME_ID_LEN: usize = 256;

/// Largest request message the KMS decodes. Today's requests are under 300
/// bytes; this leaves room for a node's bound service-account token (about a
/// kilobyte) and refuses the 4 MiB that gRPC would otherwise read and decode
/// before [`MAX_KEY_ID_LEN`] is even checked.
pub const MAX_REQUEST_SIZE: usize = 8 * 1024;

/// Requests served at once across all connections; the others wait, within the
/// server's request timeout.
pub const MAX_IN_FLIGHT: usize = 256;

/// The master secret's versions and the salt every key is derived from. Version 1
/// is the file named on the command line (`master.key`); version N > 1 is the
/// file beside it named `<that name>-v<N>`. The highest version is the current
/// one: new volumes use it, and staging rotates older volumes to it. No `Debug`.
pub struct MasterSecret {
    versions: std::collections::BTreeMap<u32, LockedBytes>,
    salt: LockedBytes,
}

/// A key asked for from a version this KMS does not hold.
#[derive(Debug, thiserror::Error)]
pub enum VersionError {
    #[error("master-secret version {0} is not held by this KMS")]
    Unknown(u32),
    #[error(transparent)]
    Derive(#[from] super::DeriveError),
}

/// Why a master secret could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "{path}: mode {mode:o} lets others read the secret; make it readable by its owner only (chmod 600 or 400)"
    )]
    Permissions { path: String, mode: u32 },
    #[error("{path}: {found} bytes; a {what} needs at least {min} random bytes")]
    TooShort {
        path: String,
        what: &'static str,
        found: usize,
        min: usize,
    },
}

impl MasterSecret {
    /// The secret and salt, moved onto locked memory (their buffers are wiped).
    pub fn new(secret: Zeroizing<Vec<u8>>, salt: Zeroizing<Vec<u8>>) -> Self {
        MasterSecret {
            versions: [(1, LockedBytes::copy_of(&secret))].into(),
            salt: LockedBytes::copy_of(&salt),
        }
    }

    /// Reads the secret (version 1), its later versions beside it, and the salt,
    /// from files that only their owner may read.
    pub fn from_files(secret: &Path, salt: &Path) -> Result<Self, SecretError> {
        let mut master = MasterSecret::new(
            read_secret_file(secret, "master secret")?,
            read_secret_file(salt, "salt")?,
        );
        for (version, path) in later_versions(secret)? {
            master.versions.insert(
                version,
                LockedBytes::copy_of(&read_secret_file(&path, "master secret")?),
            );
        }
        Ok(master)
    }

    /// As [`MasterSecret::from_files`], with every version's file holding
    /// ciphertext that `unwrap` turns into the secret (a cloud KMS's decrypt).
    pub async fn from_wrapped_files<F, Fut, E>(
        secret: &Path,
        salt: &Path,
        unwrap: F,
    ) -> Result<Self, String>
    where
        F: Fn(Zeroizing<Vec<u8>>) -> Fut,
        Fut: std::future::Future<Output = Result<Zeroizing<Vec<u8>>, E>>,
        E: std::fmt::Display,
    {
        let mut files = vec![(1, secret.to_path_buf())];
        files.extend(later_versions(secret).map_err(|e| e.to_string())?);
        let salt = read_secret_file(salt, "salt").map_err(|e| e.to_string())?;
        let mut versions = std::collections::BTreeMap::new();
        for (version, path) in files {
            let wrapped =
                read_secret_file(&path, "wrapped master secret").map_err(|e| e.to_string())?;
            let plain = unwrap(wrapped)
                .await
                .map_err(|e| format!("{}: {e}", path.display()))?;
            if plain.len() < MIN_MASTER_SECRET_LEN {
                return Err(format!(
                    "{}: unwraps to {} bytes; a master secret needs at least {MIN_MASTER_SECRET_LEN}",
                    path.display(),
                    plain.len()
                ));
            }
            versions.insert(version, LockedBytes::copy_of(&plain));
        }
        Ok(MasterSecret {
            versions,
            salt: LockedBytes::copy_of(&salt),
        })
    }

    /// Adds the version after the current one to the files (as
    /// `<secret>-v<N>`, 32 random bytes, mode 0600) and returns N and its path.
    pub fn add_version_file(secret: &Path) -> Result<(u32, std::path::PathBuf), SecretError> {
        use rand_core::{OsRng, RngCore};
        let current = later_versions(secret)?
            .last()
            .map_or(1, |(version, _)| *version);
        let next = current + 1;
        let path = version_path(secret, next);
        let mut bytes = Zeroizing::new(vec![0u8; MIN_MASTER_SECRET_LEN]);
        OsRng.fill_bytes(&mut bytes);
        let dir = secret.parent().unwrap_or(Path::new("."));
        write_private(dir, &path, &bytes)?;
        Ok((next, path))
    }

    /// The version new keys come from.
    pub fn current_version(&self) -> u32 {
        *self
            .versions
            .keys()
            .next_back()
            .expect("version 1 is always held")
    }

    /// The key of `id` from `version` (the current one when `None`), with the
    /// version used.
    pub fn derive_version(
        &self,
        id: &str,
        len: usize,
        version: Option<u32>,
    ) -> Result<(super::DataKey, u32), VersionError> {
        let version = version.unwrap_or_else(|| self.current_version());
        let secret = self
            .versions
            .get(&version)
            .ok_or(VersionError::Unknown(version))?;
        Ok((derive_data_key(secret, &self.salt, id, len)?, version))
    }

    /// The key of `id` under `derivation` (within `scope` for v2) from
    /// `version` (the current one when `None`), with the version used.
    pub fn derive_volume_key(
        &self,
        derivation: Derivation,
        scope: &str,
        id: &str,
        len: usize,
        version: Option<u32>,
    ) -> Result<(super::DataKey, u32), VersionError> {
        let version = version.unwrap_or_else(|| self.current_version());
        let secret = self
            .versions
            .get(&version)
            .ok_or(VersionError::Unknown(version))?;
        let key = match derivation {
            Derivation::V1 => derive_data_key(secret, &self.salt, id, len)?,
            Derivation::V2 => derive_scoped_key(secret, &self.salt, scope, id, len)?,
        };
        Ok((key, version))
    }

    /// A fresh random secret and salt, for `dev`.
    pub fn generate() -> Self {
        use rand_core::{OsRng, RngCore};
        let mut secret = Zeroizing::new(vec![0u8; MIN_MASTER_SECRET_LEN]);
        let mut salt = Zeroizing::new(vec![0u8; 32]);
        OsRng.fill_bytes(&mut secret);
        OsRng.fill_bytes(&mut salt);
        MasterSecret::new(secret, salt)
    }

    /// The secret and salt kept in `dir` (`master.key`, `salt`), generated on
    /// first use: what `dev` runs on, so its volumes open again after a restart.
    pub fn load_or_generate(dir: &Path) -> Result<Self, SecretError> {
        let (secret, salt) = (dir.join("master.key"), dir.join("salt"));
        if !secret.exists() || !salt.exists() {
            let fresh = Self::generate();
            write_private(dir, &secret, &fresh.versions[&1])?;
            write_private(dir, &salt, &fresh.salt)?;
            tracing::info!(dir = %dir.display(), "generated a master secret for the embedded KMS");
        }
        Self::from_files(&secret, &salt)
    }

    /// The key of `id` from version 1: what GetDataKey serves.
    pub fn derive(&self, id: &str, len: usize) -> Result<super::DataKey, super::DeriveError> {
        derive_data_key(&self.versions[&1], &self.salt, id, len)
    }
}

fn version_path(secret: &Path, version: u32) -> std::path::PathBuf {
    let mut name = secret.file_name().unwrap_or_default().to_os_string();
    name.push(format!("-v{version}"));
    secret.with_file_name(name)
}

/// The `<secret>-v<N>` files beside `secret`, N ≥ 2, in version order.
fn later_versions(secret: &Path) -> Result<Vec<(u32, std::path::PathBuf)>, SecretError> {
    let dir = match secret.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let base = secret
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    let prefix = format!("{base}-v");
    let entries = std::fs::read_dir(dir).map_err(|source| SecretError::Read {
        path: dir.display().to_string(),
        source,
    })?;
    let mut found: Vec<(u32, std::path::PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let version = name.strip_prefix(&prefix)?.parse::<u32>().ok()?;
            (version >= 2).then(|| (version, e.path()))
        })
        .collect();
    found.sort();
    Ok(found)
}

/// Writes a secret file atomically with mode 0600: a new temporary file (never
/// one that exists, never through a symlink), its mode set on the descriptor,
/// fsync, rename, fsync of the directory.
fn write_private(dir: &Path, path: &Path, bytes: &[u8]) -> Result<(), SecretError> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    let err = |source| SecretError::Read {
        path: path.display().to_string(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(err)?;
    let tmp = path.with_extension("tmp");
    // A temporary file left by a crash is ours to replace; anything else there
    // (a symlink planted by someone else) is refused by create_new below.
    if std::fs::symlink_metadata(&tmp).is_ok_and(|m| m.file_type().is_file()) {
        std::fs::remove_file(&tmp).map_err(err)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(err)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(err)?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(err)
}

fn read_secret_file(path: &Path, what: &'static str) -> Result<Zeroizing<Vec<u8>>, SecretError> {
    use std::os::unix::fs::MetadataExt;
    let shown = path.display().to_string();
    let read_err = |source| SecretError::Read {
        path: shown.clone(),
        source,
    };
    // Kubernetes mounts Secrets through symlinks; the mode that matters is the target's.
    let mode = std::fs::metadata(path).map_err(read_err)?.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(SecretError::Permissions { path: shown, mode });
    }
    let bytes = Zeroizing::new(std::fs::read(path).map_err(read_err)?);
    if bytes.len() < MIN_MASTER_SECRET_LEN {
        return Err(SecretError::TooShort {
            path: shown,
            what,
            found: bytes.len(),
            min: MIN_MASTER_SECRET_LEN,
        });
    }
    Ok(bytes)
}

pub struct KmsService {
    master: MasterSecret,
    authorizer: Arc<dyn Authorizer>,
    /// Serve keys bound to no volume (v1: GetDataKey, GetVersionedDataKey,
    /// GetVolumeKey with DERIVATION_V1), for volumes not yet migrated.
    allow_v1_keys: bool,
    in_flight: tokio::sync::Semaphore,
}

impl KmsService {
    /// A KMS that serves v2 keys to whom `authorizer` allows, and no v1 keys
    /// (see [`KmsService::allow_v1_keys`]).
    pub fn new(master: MasterSecret, authorizer: Arc<dyn Authorizer>) -> Self {
        KmsService {
            master,
            authorizer,
            allow_v1_keys: false,
            in_flight: tokio::sync::Semaphore::new(MAX_IN_FLIGHT),
        }
    }

    /// Also serves v1 keys (Constellation's derivation, bound to no volume):
    /// GetDataKey and GetVersionedDataKey to any client that passed TLS, and
    /// GetVolumeKey with DERIVATION_V1 to the authorized node. For migration.
    pub fn allow_v1_keys(mut self, allow: bool) -> Self {
        self.allow_v1_keys = allow;
        self
    }

    async fn slot(&self) -> Result<tokio::sync::SemaphorePermit<'_>, Status> {
        self.in_flight
            .acquire()
            .await
            .map_err(|_| Status::unavailable("the KMS is shutting down"))
    }

    /// The legacy methods carry no volume id, so nothing can be authorized:
    /// they exist for Constellation compatibility and migration only.
    fn legacy_allowed(&self, method: &str) -> Result<(), Status> {
        if self.allow_v1_keys {
            return Ok(());
        }
        Err(Status::permission_denied(format!(
            "{method} serves v1 keys, which are bound to no volume and authorized for no node; \
             this KMS serves them only with --allow-v1-keys (migration). Node plugins ask with GetVolumeKey"
        )))
    }
}

/// The bearer token of a request's `authorization` header; `Ok(None)` when
/// the header is absent. The token itself is never logged.
fn bearer_token<T>(request: &Request<T>) -> Result<Option<String>, Denial> {
    let Some(value) = request.metadata().get("authorization") else {
        return Ok(None);
    };
    let malformed = || Denial::BadToken("the authorization header is not `Bearer <token>`".into());
    let value = value.to_str().map_err(|_| malformed())?;
    let (scheme, token) = value.split_once(' ').ok_or_else(malformed)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(malformed());
    }
    Ok(Some(token.to_string()))
}

/// The derivation a GetVolumeKey request asks for (UNSPECIFIED means v2).
fn wire_derivation(value: i32) -> Result<Derivation, Status> {
    match WireDerivation::try_from(value) {
        Ok(WireDerivation::Unspecified | WireDerivation::V2) => Ok(Derivation::V2),
        Ok(WireDerivation::V1) => Ok(Derivation::V1),
        Err(_) => Err(Status::invalid_argument(format!(
            "derivation {value} is not one of DERIVATION_UNSPECIFIED, DERIVATION_V1, DERIVATION_V2"
        ))),
    }
}

fn to_wire(derivation: Derivation) -> WireDerivation {
    match derivation {
        Derivation::V1 => WireDerivation::V1,
        Derivation::V2 => WireDerivation::V2,
    }
}

#[tonic::async_trait]
impl Api for KmsService {
    async fn get_data_key(
        &self,
        request: Request<GetDataKeyRequest>,
    ) -> Result<Response<GetDataKeyResponse>, Status> {
        let _slot = self.slot().await?;
        let client = client_of(&request);
        let req = request.into_inner();
        let result = self.legacy_allowed("GetDataKey").and_then(|()| {
            let len = Self::check(&req.data_key_id, req.length)?;
            self.master
                .derive(&req.data_key_id, len)
                .map_err(|e| Status::invalid_argument(e.to_string()))
        });
        audit(&client, &req.data_key_id, req.length, 1, &result);
        result.map(|key| {
            Response::new(GetDataKeyResponse {
                data_key: key.expose().to_vec(),
            })
        })
    }

    async fn get_versioned_data_key(
        &self,
        request: Request<GetVersionedDataKeyRequest>,
    ) -> Result<Response<GetVersionedDataKeyResponse>, Status> {
        let _slot = self.slot().await?;
        let client = client_of(&request);
        let req = request.into_inner();
        let wanted = (req.key_version != 0).then_some(req.key_version);
        let result = self.legacy_allowed("GetVersionedDataKey").and_then(|()| {
            let len = Self::check(&req.data_key_id, req.length)?;
            self.master
                .derive_version(&req.data_key_id, len, wanted)
                .map_err(|e| match e {
                    VersionError::Unknown(_) => Status::not_found(e.to_string()),
                    VersionError::Derive(_) => Status::invalid_argument(e.to_string()),
                })
        });
        let version = result.as_ref().map_or(req.key_version, |(_, v)| *v);
        audit(&client, &req.data_key_id, req.length, version, &result);
        result.map(|(key, key_version)| {
            Response::new(GetVersionedDataKeyResponse {
                data_key: key.expose().to_vec(),
                key_version,
            })
        })
    }

    async fn get_volume_key(
        &self,
        request: Request<GetVolumeKeyRequest>,
    ) -> Result<Response<GetVolumeKeyResponse>, Status> {
        let _slot = self.slot().await?;
        let client = client_of(&request);
        let token = bearer_token(&request);
        let req = request.into_inner();
        let mut audit = VolumeAudit {
            client: &client,
            node: None,
            req: &req,
            derivation: None,
            version: req.key_version,
        };
        let result = self.volume_key(token, &req, &mut audit).await;
        audit.log(&result);
        result.map(|(key, key_version, derivation)| {
            Response::new(GetVolumeKeyResponse {
                data_key: key.expose().to_vec(),
                key_version,
                derivation: to_wire(derivation).into(),
            })
        })
    }
}

impl KmsService {
    /// GetVolumeKey's decision and derivation: the request checked first, then
    /// the derivation allowed, then the caller authorized for the volume, and
    /// only then the key derived, under the scope the authorizer read from the
    /// volume's own record.
    async fn volume_key(
        &self,
        token: Result<Option<String>, Denial>,
        req: &GetVolumeKeyRequest,
        audit: &mut VolumeAudit<'_>,
    ) -> Result<(super::DataKey, u32, Derivation), Status> {
        let len = Self::check(&req.data_key_id, req.length)?;
        if req.volume_id.is_empty() || req.volume_id.len() > MAX_VOLUME_ID_LEN {
            return Err(Status::invalid_argument(format!(
                "volume_id must be 1..={MAX_VOLUME_ID_LEN} bytes; got {}",
                req.volume_id.len()
            )));
        }
        let derivation = wire_derivation(req.derivation)?;
        audit.derivation = Some(derivation);
        if derivation == Derivation::V1 && !self.allow_v1_keys {
            return Err(Status::permission_denied(
                "DERIVATION_V1 keys are bound to no volume; this KMS serves them only with \
                 --allow-v1-keys (migration): stage the volume read-write on a node that moves it to v2",
            ));
        }
        let Grant { node, scope } = self
            .authorizer
            .authorize(token?.as_deref(), &req.volume_id)
            .await?;
        audit.node = Some(node);
        let wanted = (req.key_version != 0).then_some(req.key_version);
        let (key, version) = self
            .master
            .derive_volume_key(derivation, &scope, &req.data_key_id, len, wanted)
            .map_err(|e| match e {
                VersionError::Unknown(_) => Status::not_found(e.to_string()),
                // The scope comes from the volume's record, not the request: a
                // scope the derivation refuses is the cluster's data, not the
                // caller's fault.
                VersionError::Derive(super::DeriveError::BadScope) => Status::failed_precondition(
                    format!("volume {}: its key scope {scope:?} is not a valid scope (non-empty, no '/')", req.volume_id.escape_debug()),
                ),
                VersionError::Derive(_) => Status::invalid_argument(e.to_string()),
            })?;
        audit.version = version;
        Ok((key, version, derivation))
    }
}

/// What the audit line of one GetVolumeKey says: filled in as the request is
/// decided, so a refusal names as much as was known.
struct VolumeAudit<'a> {
    client: &'a str,
    node: Option<String>,
    req: &'a GetVolumeKeyRequest,
    derivation: Option<Derivation>,
    version: u32,
}

impl VolumeAudit<'_> {
    fn log<T>(&self, result: &Result<T, Status>) {
        let bounded = |s: &str| -> String { s.chars().take(MAX_KEY_ID_LEN).collect() };
        let key_id = bounded(&self.req.data_key_id);
        let volume = bounded(&self.req.volume_id);
        let node = self.node.as_deref().unwrap_or("-");
        let derivation = match self.derivation {
            Some(Derivation::V1) => "v1",
            Some(Derivation::V2) => "v2",
            None => "-",
        };
        let (client, version) = (self.client, self.version);
        match result {
            Ok(_) => tracing::info!(
                target: "cryptdisk::audit", %client, node = %node.escape_debug(),
                volume = %volume.escape_debug(), key_id = %key_id.escape_debug(),
                derivation, version, "volume key served"
            ),
            Err(s) => tracing::warn!(
                target: "cryptdisk::audit", %client, node = %node.escape_debug(),
                volume = %volume.escape_debug(), key_id = %key_id.escape_debug(),
                derivation, version, code = ?s.code(), reason = %s.message(),
                "volume key refused"
            ),
        }
    }
}

/// Who is asking, for the audit log: the client certificate's name over TLS,
/// else the peer address.
fn client_of<T>(request: &Request<T>) -> String {
    match request.peer_certs() {
        Some(certs) if !certs.is_empty() => super::tls::client_identity(certs[0].as_ref()),
        _ => request
            .remote_addr()
            .map_or_else(|| "local socket".to_string(), |a| a.to_string()),
    }
}

/// One audit line per request: who asked for which key, never the key.
fn audit<T>(client: &str, key_id: &str, length: u32, version: u32, result: &Result<T, Status>) {
    let key_id: String = key_id.chars().take(MAX_KEY_ID_LEN).collect();
    match result {
        Ok(_) => {
            tracing::info!(target: "cryptdisk::audit", %client, key_id = %key_id.escape_debug(), length, version, "data key served")
        }
        Err(s) => {
            tracing::warn!(target: "cryptdisk::audit", %client, key_id = %key_id.escape_debug(), length, version, code = ?s.code(), reason = %s.message(), "data key refused")
        }
    }
}

impl KmsService {
    fn check(data_key_id: &str, length: u32) -> Result<usize, Status> {
        if data_key_id.is_empty() || data_key_id.len() > MAX_KEY_ID_LEN {
            return Err(Status::invalid_argument(format!(
                "data_key_id must be 1..={MAX_KEY_ID_LEN} bytes; got {}",
                data_key_id.len()
            )));
        }
        let len = length as usize;
        if !KEY_LEN_RANGE.contains(&len) {
            return Err(Status::invalid_argument(format!(
                "length must be {}..={} bytes; got {len}",
                KEY_LEN_RANGE.start(),
                KEY_LEN_RANGE.end()
            )));
        }
        Ok(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn write(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn secret_files_must_be_private_and_long_enough() {
        let dir = tempfile::tempdir().unwrap();
        let good = write(dir.path(), "secret", &[1; 32], 0o600);
        let salt = write(dir.path(), "salt", &[2; 32], 0o400);
        assert!(MasterSecret::from_files(&good, &salt).is_ok());
        let open = write(dir.path(), "open", &[1; 32], 0o640);
        assert!(matches!(
            MasterSecret::from_files(&open, &salt),
            Err(SecretError::Permissions { mode: 0o640, .. })
        ));
        let short = write(dir.path(), "short", &[1; 31], 0o600);
        assert!(matches!(
            MasterSecret::from_files(&short, &salt),
            Err(SecretError::TooShort { found: 31, .. })
        ));
    }

    #[tokio::test]
    async fn get_data_key_validates_and_derives() {
        let svc = KmsService::new(
            MasterSecret::new(Zeroizing::new(vec![1; 32]), Zeroizing::new(vec![2; 32])),
            Arc::new(super::super::authz::NoneAuthorizer),
        )
        .allow_v1_keys(true);
        let call = |id: &str, length: u32| {
            svc.get_data_key(Request::new(GetDataKeyRequest {
                data_key_id: id.to_string(),
                length,
            }))
        };
        let key = call("abc", 32).await.unwrap().into_inner().data_key;
        assert_eq!(
            key,
            derive_data_key(&[1; 32], &[2; 32], "abc", 32)
                .unwrap()
                .expose()
        );
        for (id, len) in [("", 32), ("abc", 15), ("abc", 65), ("abc", 0)] {
            let err = call(id, len).await.err().unwrap();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{id:?} {len}");
        }
        let long = "x".repeat(MAX_KEY_ID_LEN + 1);
        assert_eq!(
            call(&long, 32).await.err().unwrap().code(),
            tonic::Code::InvalidArgument
        );
    }

    /// Grants node-a the volumes it lists, under the scope given; records the
    /// token it was shown.
    struct Fake {
        grants: Vec<(&'static str, &'static str)>,
        seen: std::sync::Mutex<Vec<Option<String>>>,
    }

    #[tonic::async_trait]
    impl Authorizer for Fake {
        async fn authorize(&self, token: Option<&str>, volume: &str) -> Result<Grant, Denial> {
            self.seen.lock().unwrap().push(token.map(str::to_string));
            let token = token.ok_or(Denial::NoToken)?;
            if token != "node-a-token" {
                return Err(Denial::WrongAccount("someone".into()));
            }
            match self.grants.iter().find(|(v, _)| *v == volume) {
                Some((_, scope)) => Ok(Grant {
                    node: "node-a".into(),
                    scope: scope.to_string(),
                }),
                None if volume == "stale" => Err(Denial::Unavailable("stale".into())),
                None => Err(Denial::NotAttached {
                    node: "node-a".into(),
                    volume: volume.into(),
                }),
            }
        }
    }

    fn service(allow_v1: bool) -> (KmsService, Arc<Fake>) {
        let fake = Arc::new(Fake {
            grants: vec![
                ("vol-1", "vol-1"),
                ("vol-restored", "vol-1"),
                ("bad", "a/b"),
            ],
            seen: Default::default(),
        });
        let mut master =
            MasterSecret::new(Zeroizing::new(vec![1; 32]), Zeroizing::new(vec![2; 32]));
        master.versions.insert(2, LockedBytes::copy_of(&[3u8; 32]));
        let svc = KmsService::new(master, fake.clone()).allow_v1_keys(allow_v1);
        (svc, fake)
    }

    fn volume_request(
        volume: &str,
        derivation: WireDerivation,
        version: u32,
        auth: Option<&str>,
    ) -> Request<GetVolumeKeyRequest> {
        let mut r = Request::new(GetVolumeKeyRequest {
            data_key_id: "abc".into(),
            length: 32,
            key_version: version,
            volume_id: volume.into(),
            derivation: derivation.into(),
        });
        if let Some(a) = auth {
            r.metadata_mut().insert("authorization", a.parse().unwrap());
        }
        r
    }

    #[tokio::test]
    async fn get_volume_key_derives_under_the_granted_scope() {
        let (svc, fake) = service(false);
        let ok = |v: &str, d, version| {
            svc.get_volume_key(volume_request(v, d, version, Some("Bearer node-a-token")))
        };
        let got = ok("vol-1", WireDerivation::Unspecified, 0)
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.key_version, 2);
        assert_eq!(got.derivation, i32::from(WireDerivation::V2));
        assert_eq!(
            got.data_key,
            derive_scoped_key(&[3; 32], &[2; 32], "vol-1", "abc", 32)
                .unwrap()
                .expose()
        );
        let old = ok("vol-1", WireDerivation::V2, 1)
            .await
            .unwrap()
            .into_inner();
        assert_eq!(old.key_version, 1);
        assert_eq!(
            old.data_key,
            derive_scoped_key(&[1; 32], &[2; 32], "vol-1", "abc", 32)
                .unwrap()
                .expose()
        );
        // A restore gets its source's key: the scope is the authorizer's.
        let restored = ok("vol-restored", WireDerivation::V2, 1)
            .await
            .unwrap()
            .into_inner();
        assert_eq!(restored.data_key, old.data_key);
        assert_eq!(
            ok("vol-1", WireDerivation::V2, 9)
                .await
                .map(drop)
                .expect_err("refused")
                .code(),
            tonic::Code::NotFound
        );
        assert_eq!(
            ok("bad", WireDerivation::V2, 0)
                .await
                .map(drop)
                .expect_err("refused")
                .code(),
            tonic::Code::FailedPrecondition
        );
        assert_eq!(
            fake.seen.lock().unwrap()[0].as_deref(),
            Some("node-a-token"),
            "the bearer token reaches the authorizer without its scheme"
        );
    }

    #[tokio::test]
    async fn get_volume_key_maps_refusals_to_their_codes() {
        let (svc, fake) = service(false);
        let call = |v: &str, d, auth| svc.get_volume_key(volume_request(v, d, 0, auth));
        use tonic::Code;
        for (volume, derivation, auth, code) in [
            ("vol-1", WireDerivation::V2, None, Code::Unauthenticated),
            (
                "vol-1",
                WireDerivation::V2,
                Some("node-a-token"),
                Code::Unauthenticated,
            ),
            (
                "vol-1",
                WireDerivation::V2,
                Some("Basic node-a-token"),
                Code::Unauthenticated,
            ),
            (
                "vol-1",
                WireDerivation::V2,
                Some("Bearer "),
                Code::Unauthenticated,
            ),
            (
                "vol-1",
                WireDerivation::V2,
                Some("Bearer other"),
                Code::PermissionDenied,
            ),
            (
                "vol-2",
                WireDerivation::V2,
                Some("Bearer node-a-token"),
                Code::PermissionDenied,
            ),
            (
                "stale",
                WireDerivation::V2,
                Some("Bearer node-a-token"),
                Code::Unavailable,
            ),
            (
                "vol-1",
                WireDerivation::V1,
                Some("Bearer node-a-token"),
                Code::PermissionDenied,
            ),
            (
                "",
                WireDerivation::V2,
                Some("Bearer node-a-token"),
                Code::InvalidArgument,
            ),
        ] {
            let err = call(volume, derivation, auth)
                .await
                .map(drop)
                .expect_err("refused");
            assert_eq!(
                err.code(),
                code,
                "{volume} {derivation:?} {auth:?}: {err:?}"
            );
        }
        // A v1 request refused by policy and a bad request never reach the
        // authorizer (nor the API server behind it).
        assert_eq!(fake.seen.lock().unwrap().len(), 4);
        let legacy = svc
            .get_data_key(Request::new(GetDataKeyRequest {
                data_key_id: "abc".into(),
                length: 32,
            }))
            .await
            .map(drop)
            .expect_err("refused");
        assert_eq!(legacy.code(), Code::PermissionDenied);
    }

    #[tokio::test]
    async fn v1_keys_need_the_flag_and_still_an_authorized_node() {
        let (svc, _) = service(true);
        let got = svc
            .get_volume_key(volume_request(
                "vol-1",
                WireDerivation::V1,
                1,
                Some("Bearer node-a-token"),
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.derivation, i32::from(WireDerivation::V1));
        assert_eq!(
            got.data_key,
            derive_data_key(&[1; 32], &[2; 32], "abc", 32)
                .unwrap()
                .expose()
        );
        let err = svc
            .get_volume_key(volume_request(
                "vol-2",
                WireDerivation::V1,
                1,
                Some("Bearer node-a-token"),
            ))
            .await
            .map(drop)
            .expect_err("refused");
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
    }
}
