//! The cluster KMS's gRPC service: derives data keys from the master secret.

use std::path::Path;

use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use super::locked::LockedBytes;

use super::{KEY_LEN_RANGE, MIN_MASTER_SECRET_LEN, derive_data_key};
use crate::proto::kms::api_server::Api;
use crate::proto::kms::{
    GetDataKeyRequest, GetDataKeyResponse, GetVersionedDataKeyRequest, GetVersionedDataKeyResponse,
    GetVolumeKeyRequest, GetVolumeKeyResponse,
};

/// Longest data key id accepted; ours are 36-character UUIDs.
pub const MAX_KEY_ID_LEN: usize = 256;

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

    /// The key of `id` derived as `derivation` (v2: within `scope`) from
    /// `version` (the current one when `None`), with the version used: what a
    /// volume key request is answered with once it is authorized.
    pub fn derive_volume_key(
        &self,
        derivation: super::Derivation,
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
            super::Derivation::V1 => derive_data_key(secret, &self.salt, id, len)?,
            super::Derivation::V2 => super::derive_scoped_key(secret, &self.salt, scope, id, len)?,
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
    in_flight: tokio::sync::Semaphore,
}

impl KmsService {
    pub fn new(master: MasterSecret) -> Self {
        KmsService {
            master,
            in_flight: tokio::sync::Semaphore::new(MAX_IN_FLIGHT),
        }
    }

    async fn slot(&self) -> Result<tokio::sync::SemaphorePermit<'_>, Status> {
        self.in_flight
            .acquire()
            .await
            .map_err(|_| Status::unavailable("the KMS is shutting down"))
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
        let result = Self::check(&req.data_key_id, req.length).and_then(|len| {
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
        let result = Self::check(&req.data_key_id, req.length).and_then(|len| {
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
        _request: Request<GetVolumeKeyRequest>,
    ) -> Result<Response<GetVolumeKeyResponse>, Status> {
        // Replaced by the authorizing implementation (issue 20); until then
        // no key is served through this method.
        Err(Status::unimplemented("GetVolumeKey is not served yet"))
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
        let svc = KmsService::new(MasterSecret::new(
            Zeroizing::new(vec![1; 32]),
            Zeroizing::new(vec![2; 32]),
        ));
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
}
