//! CSI Node: from an attached disk to a path a pod uses.
//!
//! Stage finds the block device, formats it only when blank, checks its header
//! against our whitelist, opens it with the key the KMS derives from the header's
//! UUID, and mounts the filesystem (block volumes stop at the open mapping).
//! Every step looks at what is already true (is it open? mounted where?) so a
//! retry after a crash at any point finishes the work.
//!
//! A device is formatted only when two witnesses agree it holds nothing: the
//! probe ([`crypt::inspect`]) and the controller's fresh-disk record
//! ([`DiskOrigin`], see [`crate::volume::fresh`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;
use tonic::{Request, Response, Status};

use super::guard::Guards;
use super::params::VolumeOptions;
use super::validate::{self, Access};
use super::wipe::Wipes;
use crate::crypt::{
    self, DeviceState, FormatOptions, HeaderInfo, KeyId, MapperName, OpenOptions, Opened, Token,
};
use crate::failpoint;
use crate::kms::{DEFAULT_KEY_LEN, DataKey, Derivation, KeyRequest, KeySource};
use crate::mount::device::DeviceLocator;
use crate::mount::{self, FsProbe, FsType, Unmounted};
use crate::proto::csi::node_server::Node;
use crate::proto::csi::node_service_capability::{self, rpc::Type as Rpc};
use crate::proto::csi::volume_capability::access_mode::Mode;
use crate::proto::csi::*;
use crate::volume::{BackendKind, FreshRecord, VolumeId, fresh};

pub struct NodeConfig {
    pub node_id: String,
    /// Data directory of the local backend, when this node serves it.
    pub local_data_dir: Option<PathBuf>,
    /// Segments NodeGetInfo reports.
    pub topology: BTreeMap<String, String>,
    /// Most volumes this node takes (0: no limit).
    pub max_volumes: u64,
    /// Crypt and mkfs operations allowed to run at once.
    pub max_parallel_work: usize,
    /// How long a stage waits for an integrity volume's initial wipe before it
    /// answers ABORTED and leaves the wipe running for a retry to pick up.
    pub wipe_budget: Duration,
}

/// Whether the stage's filesystem was made by this stage or found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Made {
    /// mkfs ran in this call: nothing to check.
    Now,
    /// There already (an earlier stage, or one that crashed after mkfs).
    Before,
}

/// What the node knows of a disk's origin when it decides whether it may
/// format it: the controller's fresh-disk record ([`crate::volume::fresh`]),
/// confirmed by the backend. For the local backend it is read from the
/// backend's index on this machine; for Azure and GCP it comes in the publish
/// context under [`fresh::PUBLISH_KEY`], put there by ControllerPublishVolume
/// from the disk's tag or label.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskOrigin {
    /// Created empty by the controller and still in its first attachment: a
    /// device that also probes blank may be formatted.
    Fresh(FreshRecord),
    /// No record: a restored snapshot, a clone, an imported disk, or a disk
    /// whose first attachment has ended. Never formatted, whatever it reads.
    NoRecord,
}

pub struct NodeService {
    config: NodeConfig,
    keys: Arc<dyn KeySource>,
    /// Where each volume's block device is.
    devices: Arc<dyn DeviceLocator>,
    guards: Guards,
    work: Arc<Semaphore>,
    wipes: Wipes,
    /// Records this process has completed a format under. A device that reads
    /// blank under one of them lost the header we wrote (the record still
    /// stands until the first attachment ends), so it is refused, not
    /// formatted over.
    formatted_under: Mutex<HashSet<FreshRecord>>,
}

/// A path from a request: required, absolute, without `..` or NUL.
fn request_path(field: &str, value: &str) -> Result<PathBuf, Status> {
    validate::required(field, value)?;
    plain_absolute(value).ok_or_else(|| {
        Status::invalid_argument(format!(
            "{field} {value:?} must be an absolute path without '..'"
        ))
    })
}

/// `value` as a path when it is absolute and has no `..`.
fn plain_absolute(value: &str) -> Option<PathBuf> {
    let path = PathBuf::from(value);
    (path.is_absolute() && !path.components().any(|c| matches!(c, Component::ParentDir)))
        .then_some(path)
}

/// Parses a volume id that [`validate::required`] has already accepted: one that is
/// not ours names no volume we know (NOT_FOUND). Callers check every required
/// field first, so a request missing one gets INVALID_ARGUMENT whatever its id.
/// The path of a volume the node is asked about (stats, expansion): required,
/// and NOT_FOUND unless absolute and plain, since nothing of ours is anywhere else.
fn existing_volume_path(field: &str, value: &str) -> Result<PathBuf, Status> {
    validate::required(field, value)?;
    plain_absolute(value).ok_or_else(|| {
        Status::not_found(format!(
            "{field} {value:?} is not an absolute path, so no volume of ours is there"
        ))
    })
}

fn volume_id(value: &str) -> Result<VolumeId, Status> {
    validate::required("volume_id", value)?;
    value
        .parse()
        .map_err(|e| Status::not_found(format!("volume_id: no such volume: {e}")))
}

impl NodeService {
    pub fn new(
        config: NodeConfig,
        keys: Arc<dyn KeySource>,
        devices: Arc<dyn DeviceLocator>,
    ) -> Self {
        let work = Arc::new(Semaphore::new(config.max_parallel_work.max(1)));
        let wipes = Wipes::new(config.wipe_budget);
        NodeService {
            config,
            keys,
            devices,
            guards: Guards::default(),
            work,
            wipes,
            formatted_under: Mutex::new(HashSet::new()),
        }
    }

    /// The fresh-disk record of a volume, as the backend confirms it.
    fn disk_origin(
        &self,
        id: &VolumeId,
        publish_context: &HashMap<String, String>,
    ) -> Result<DiskOrigin, Status> {
        let record = match id.backend() {
            // The controller's index is on this machine: read it, so that no
            // request field can make the node format.
            BackendKind::Local => {
                let dir = self.config.local_data_dir.as_ref().ok_or_else(|| {
                    Status::failed_precondition(format!(
                        "volume {id} is on the local backend, which this node does not serve"
                    ))
                })?;
                crate::backend::LocalBackend::fresh_record(dir, id.disk())?
            }
            BackendKind::Azure | BackendKind::Gcp => publish_context
                .get(fresh::PUBLISH_KEY)
                .map(|v| {
                    v.parse::<FreshRecord>().map_err(|e| {
                        Status::invalid_argument(format!(
                            "publish_context {}: {e}",
                            fresh::PUBLISH_KEY
                        ))
                    })
                })
                .transpose()?,
        };
        Ok(record.map_or(DiskOrigin::NoRecord, DiskOrigin::Fresh))
    }

    /// Finds (for the local backend: attaches) the volume's block device.
    async fn block_device(
        &self,
        id: &VolumeId,
        publish_context: &HashMap<String, String>,
    ) -> Result<PathBuf, Status> {
        self.devices.locate(id, publish_context).await
    }

    /// Formats a blank device or accepts one of ours; returns its header and,
    /// after a format, the key it was made with (saving a second KMS call).
    /// A blank device is formatted only under a fresh-disk record ([`DiskOrigin`]);
    /// without one it is refused and left as it is.
    async fn prepare_device(
        &self,
        id: &VolumeId,
        device: &Path,
        options: &VolumeOptions,
        origin: &DiskOrigin,
    ) -> Result<(HeaderInfo, Option<DataKey>), Status> {
        match crypt::inspect(device, matches!(origin, DiskOrigin::Fresh(_))).await? {
            DeviceState::Formatted(header) => Ok((header, None)),
            DeviceState::Blank(blank) => {
                let record = match origin {
                    DiskOrigin::Fresh(r) => r.clone(),
                    DiskOrigin::NoRecord => return Err(no_record(device)),
                };
                if self.formatted_under().contains(&record) {
                    return Err(Status::failed_precondition(format!(
                        "{} reads as blank, but this node already formatted it under fresh-disk \
                         record {record}: its header has been lost or overwritten since. It is not \
                         formatted again; {}",
                        device.display(),
                        OPERATOR_STEPS
                    )));
                }
                let key_id = KeyId::new_random();
                // A key that cannot be had means nothing is written. New
                // volumes get v2 keys: bound to the volume's scope.
                let volume_id = id.to_string();
                let (key, key_version) = self
                    .keys
                    .volume_key(&KeyRequest {
                        volume_id: &volume_id,
                        data_key_id: key_id.as_str(),
                        derivation: Derivation::V2,
                        len: DEFAULT_KEY_LEN,
                        version: None,
                    })
                    .await?;
                let format = FormatOptions {
                    key_id: key_id.clone(),
                    token: Token {
                        key_id: key_id.to_string(),
                        key_version,
                        kms: self.keys.identity().to_string(),
                        content: None,
                        wipe_offset: None,
                        rotation: None,
                        derivation: Some(Derivation::V2),
                    },
                    integrity: options.integrity,
                    bypass_workqueues: options.bypass_workqueues,
                };
                tracing::info!(
                    device = %device.display(),
                    %key_id,
                    fresh_record = %record,
                    "formatting a blank device the controller created empty"
                );
                crypt::format(blank, &key, &format).await?;
                self.formatted_under().insert(record);
                let header = crypt::read_header(device).await?;
                Ok((header, Some(key)))
            }
        }
    }

    /// The key that opens a volume. A read-only stage changes nothing on the
    /// disk: it opens with the key the token names (v1 included). A read-write
    /// stage moves the keyslot to the KMS's current master-secret version and
    /// to v2 (a volume formatted before v2 keys migrates here) with the
    /// crash-safe rotation steps ([`crypt::rotate`]), finishing any rotation a
    /// crash cut short, and opens with the current v2 key.
    async fn key_for(
        &self,
        id: &VolumeId,
        device: &Path,
        header: &HeaderInfo,
        read_only: bool,
    ) -> Result<DataKey, Status> {
        let token = header.token.as_ref().ok_or_else(|| {
            Status::failed_precondition("the volume's header has no cryptdisk token")
        })?;
        let volume_id = id.to_string();
        let ask = |derivation, version| KeyRequest {
            volume_id: &volume_id,
            data_key_id: header.key_id.as_str(),
            derivation,
            len: DEFAULT_KEY_LEN,
            version,
        };
        let held = (token.key_version, token.derivation());
        if read_only {
            let (key, _) = self.keys.volume_key(&ask(held.1, Some(held.0))).await?;
            return Ok(key);
        }
        let (current, current_version) = self.keys.volume_key(&ask(Derivation::V2, None)).await?;
        let target = (current_version, Derivation::V2);
        if held == target && token.rotation.is_none() {
            return Ok(current);
        }
        let old = if held == target {
            current.clone()
        } else {
            self.keys.volume_key(&ask(held.1, Some(held.0))).await?.0
        };
        if token.key_version > current_version {
            tracing::warn!(
                volume_version = token.key_version,
                kms_version = current_version,
                "the volume uses a newer master-secret version than the KMS's current one; not rotating"
            );
            return Ok(old);
        }
        tracing::info!(
            volume = %id,
            from_version = token.key_version,
            from_derivation = %held.1,
            to_version = current_version,
            to_derivation = %Derivation::V2,
            "rotating the volume's keyslot to the current master-secret version, v2 derivation"
        );
        // Nothing is written to a disk whose keyslots the old key does not
        // open: a copy of another volume's disk stays as it is.
        crypt::verify_key(device, &old).await?;
        crypt::rotate(device, &old, &current, current_version, Derivation::V2).await?;
        Ok(current)
    }

    async fn stage(&self, req: NodeStageVolumeRequest) -> Result<(), Status> {
        validate::required("volume_id", &req.volume_id)?;
        let staging = request_path("staging_target_path", &req.staging_target_path)?;
        let (access, mode) = validate::one_capability(req.volume_capability.as_ref())?;
        let options = VolumeOptions::from_volume_context(&req.volume_context)?;
        let id = volume_id(&req.volume_id)?;
        let _held = self.guards.take(&id.to_string())?;
        let _permit = self
            .work
            .acquire()
            .await
            .map_err(|_| Status::unavailable("shutting down"))?;

        let name = MapperName::for_volume(&id.to_string());
        let was_open = crypt::status(&name).await?.is_some();
        let mut opened = false;
        let result = self
            .stage_volume(&id, &req, &staging, access, mode, &options, &mut opened)
            .await;
        if let Err(status) = &result {
            tracing::warn!(volume_id = %id, code = ?status.code(), reason = status.message(),
                "NodeStageVolume refused");
            self.undo_stage(&id, &name, opened, was_open).await;
        }
        result
    }

    /// Closes what a refused stage opened, so that nothing half set up stays
    /// behind: the mapping it opened and, when no mapping of the volume is left
    /// open, the loop device of a local volume. A retry starts from the device.
    async fn undo_stage(&self, id: &VolumeId, name: &MapperName, opened: bool, was_open: bool) {
        if opened {
            self.wipes.cancel(&id.to_string()).await;
            if let Err(e) = crypt::close(name).await {
                tracing::warn!(volume_id = %id, error = %e, "cannot close the mapping a refused stage opened");
            }
        }
        if !was_open
            && id.backend() == BackendKind::Local
            && self.config.local_data_dir.is_some()
            && matches!(crypt::status(name).await, Ok(None))
            && let Err(e) = self.devices.release(id).await
        {
            tracing::warn!(volume_id = %id, error = %e, "cannot detach the loop device of a refused stage");
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn stage_volume(
        &self,
        id: &VolumeId,
        req: &NodeStageVolumeRequest,
        staging: &Path,
        access: Access,
        mode: Mode,
        options: &VolumeOptions,
        opened: &mut bool,
    ) -> Result<(), Status> {
        let origin = self.disk_origin(id, &req.publish_context)?;
        let device = self.block_device(id, &req.publish_context).await?;
        failpoint::hit("stage:attached");
        // The header is checked on every stage, open mapping or not.
        let (header, fresh_key) = self.prepare_device(id, &device, options, &origin).await?;
        failpoint::hit("stage:formatted");
        let content = header.token.as_ref().and_then(|t| t.content.clone());
        let name = MapperName::for_volume(&id.to_string());
        if crypt::status(&name).await?.is_none() {
            let key = match fresh_key {
                Some(k) => k,
                None => {
                    self.key_for(id, &device, &header, validate::mode_read_only(mode))
                        .await?
                }
            };
            // A read-only access mode opens the mapping read-only, so that not even
            // a raw block user can write through it.
            let open = OpenOptions {
                allow_discards: options.allow_discards,
                read_only: validate::mode_read_only(mode),
            };
            if crypt::open(&device, &name, &key, &open).await? == Opened::Activated {
                *opened = true;
            }
        }
        failpoint::hit("stage:opened");
        let mapped = name.device_path();
        if let Some(from) = header.token.as_ref().and_then(|t| t.wipe_offset) {
            if validate::mode_read_only(mode) {
                return Err(Status::failed_precondition(format!(
                    "volume {id} is a new integrity volume whose initial wipe has not \
                     finished; it cannot be staged read-only until a read-write stage wipes it"
                )));
            }
            self.wipes
                .ensure(&id.to_string(), device.clone(), mapped.clone(), from)
                .await?;
        }
        match access {
            Access::Block => match content.as_deref() {
                None => Ok(crypt::set_content(&device, "block").await?),
                Some("block") => Ok(()),
                Some(fs) => Err(Status::failed_precondition(format!(
                    "volume {id} holds an {fs} filesystem; stage it as a mount volume"
                ))),
            },
            Access::Mount { fs, flags } => {
                let read_only = validate::mode_read_only(mode);
                let made = self
                    .make_filesystem(&device, &mapped, fs, content.as_deref(), read_only)
                    .await?;
                // A filesystem this stage just made needs no check (kubelet's
                // FormatAndMount checks only one that was there already).
                let check = !read_only && made == Made::Before;
                self.mount_staging(&mapped, staging, fs, &flags, read_only, check)
                    .await?;
                if content.is_some() && !read_only {
                    grow_if_behind(&mapped, staging, fs).await?;
                }
                Ok(())
            }
        }
    }

    /// Makes the filesystem of a fresh volume and records it in the token; checks
    /// that a used volume holds the filesystem its token names. Says whether
    /// this call ran mkfs.
    async fn make_filesystem(
        &self,
        device: &Path,
        mapped: &Path,
        fs: FsType,
        content: Option<&str>,
        read_only: bool,
    ) -> Result<Made, Status> {
        match content {
            Some(c) if c == fs.as_str() => return Ok(Made::Before),
            Some("block") => {
                return Err(Status::failed_precondition(
                    "the volume was used as a raw block device; it is never formatted",
                ));
            }
            Some(other) => {
                return Err(Status::failed_precondition(format!(
                    "the volume holds {other}, not the {fs} asked for"
                )));
            }
            None => {}
        }
        // A fresh volume: its mapped content is noise, unless a stage that made
        // the filesystem crashed before it could record it.
        let mut made = Made::Before;
        if mount::probe_fs(mapped).await? != FsProbe::Fs(fs) {
            if read_only {
                return Err(Status::failed_precondition(
                    "a new volume has no filesystem yet and cannot be staged read-only",
                ));
            }
            tracing::info!(device = %mapped.display(), %fs, "making filesystem");
            mount::mkfs(mapped, fs).await?;
            failpoint::hit("stage:mkfs-done");
            made = Made::Now;
        }
        crypt::set_content(device, fs.as_str()).await?;
        Ok(made)
    }

    async fn mount_staging(
        &self,
        mapped: &Path,
        staging: &Path,
        fs: FsType,
        flags: &[String],
        read_only: bool,
        check: bool,
    ) -> Result<(), Status> {
        let want = mount::device_number(mapped)?;
        if let Some(found) = mount::mounted_device(staging)? {
            if found == want {
                return Ok(());
            }
            return Err(Status::already_exists(format!(
                "{} already holds another device ({}:{}); this volume is {}",
                staging.display(),
                found.0,
                found.1,
                mapped.display()
            )));
        }
        match mount::probe_fs(mapped).await? {
            FsProbe::Fs(found) if found == fs => {}
            other => {
                return Err(Status::failed_precondition(format!(
                    "the volume's token names {fs} but the device reads as {other:?}; \
                     inspect it before staging"
                )));
            }
        }
        if check {
            mount::fsck(mapped, fs).await?;
        }
        tokio::fs::create_dir_all(staging)
            .await
            .map_err(|e| Status::internal(format!("create {}: {e}", staging.display())))?;
        mount::mount_fs(mapped, staging, fs, flags, read_only).await?;
        failpoint::hit("stage:mounted");
        Ok(())
    }

    async fn unstage(&self, req: NodeUnstageVolumeRequest) -> Result<(), Status> {
        validate::required("volume_id", &req.volume_id)?;
        let staging = request_path("staging_target_path", &req.staging_target_path)?;
        let id = volume_id(&req.volume_id)?;
        let _held = self.guards.take(&id.to_string())?;
        // A wipe still writing through the mapping would keep it from closing.
        self.wipes.cancel(&id.to_string()).await;
        if let Unmounted::Unmounted = mount::unmount(&staging).await? {
            tracing::info!(staging = %staging.display(), "unmounted");
        }
        failpoint::hit("unstage:unmounted");
        let name = MapperName::for_volume(&id.to_string());
        crypt::close(&name).await?;
        failpoint::hit("unstage:closed");
        self.devices.release(&id).await?;
        Ok(())
    }

    async fn publish(&self, req: NodePublishVolumeRequest) -> Result<(), Status> {
        validate::required("volume_id", &req.volume_id)?;
        let staging = request_path("staging_target_path", &req.staging_target_path)?;
        let target = request_path("target_path", &req.target_path)?;
        let (access, mode) = validate::one_capability(req.volume_capability.as_ref())?;
        let id = volume_id(&req.volume_id)?;
        let read_only = req.readonly || validate::mode_read_only(mode);
        let _held = self.guards.take(&id.to_string())?;
        let name = MapperName::for_volume(&id.to_string());
        let (source, want) = match access {
            Access::Block => {
                if crypt::status(&name).await?.is_none() {
                    return Err(Status::failed_precondition(format!(
                        "volume {id} is not staged on this node"
                    )));
                }
                let mapped = name.device_path();
                let want = mount::device_number(&mapped)?;
                (mapped, want)
            }
            Access::Mount { .. } => {
                let want = mount::mounted_device(&staging)?.ok_or_else(|| {
                    Status::failed_precondition(format!(
                        "volume {id} is not staged at {}",
                        staging.display()
                    ))
                })?;
                (staging.clone(), want)
            }
        };
        if let Some(found) = mount::mounted_device(&target)? {
            let entry = mount::find_mount(&target)?;
            let found_ro = entry.as_ref().is_some_and(mount::is_read_only);
            if found == want && found_ro == read_only {
                return Ok(());
            }
            return Err(Status::already_exists(format!(
                "{} is already mounted with other options or another device",
                target.display()
            )));
        }
        if mode == Mode::SingleNodeSingleWriter {
            let elsewhere = published_elsewhere(want, &staging, &target)?;
            if let Some(other) = elsewhere.first() {
                return Err(Status::failed_precondition(format!(
                    "volume {id} has access mode SINGLE_NODE_SINGLE_WRITER and is already \
                     published at {}",
                    other.display()
                )));
            }
        }
        let made = match access {
            Access::Block => {
                if let Some(parent) = target.parent() {
                    tokio::fs::create_dir_all(parent).await?;
                }
                tokio::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&target)
                    .await
                    .map(|_| ())
            }
            Access::Mount { .. } => tokio::fs::create_dir_all(&target).await,
        };
        made.map_err(|e| Status::internal(format!("create {}: {e}", target.display())))?;
        mount::bind_mount(&source, &target, read_only).await?;
        Ok(())
    }

    async fn unpublish(&self, req: NodeUnpublishVolumeRequest) -> Result<(), Status> {
        validate::required("volume_id", &req.volume_id)?;
        let target = request_path("target_path", &req.target_path)?;
        let id = volume_id(&req.volume_id)?;
        let _held = self.guards.take(&id.to_string())?;
        mount::unmount(&target).await?;
        match tokio::fs::symlink_metadata(&target).await {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Status::internal(format!(
                "inspect {}: {e}",
                target.display()
            ))),
            Ok(meta) => {
                let removed = if meta.is_dir() {
                    tokio::fs::remove_dir(&target).await
                } else {
                    tokio::fs::remove_file(&target).await
                };
                removed.map_err(|e| Status::internal(format!("remove {}: {e}", target.display())))
            }
        }
    }
}

impl NodeService {
    /// Grows an open mapping (and its filesystem) after its disk grew: the disk's
    /// new size made visible, the mapping reloaded with the key fetched again, the
    /// filesystem grown online. Each step is a no-op when already done.
    async fn expand(&self, req: NodeExpandVolumeRequest) -> Result<u64, Status> {
        validate::required("volume_id", &req.volume_id)?;
        let volume_path = existing_volume_path("volume_path", &req.volume_path)?;
        let staging = match req.staging_target_path.as_str() {
            "" => None,
            p => Some(request_path("staging_target_path", p)?),
        };
        let access = match &req.volume_capability {
            None => None,
            Some(cap) => Some(
                validate::capability(cap)
                    .map_err(Status::invalid_argument)?
                    .0,
            ),
        };
        let id = volume_id(&req.volume_id)?;
        let _held = self.guards.take(&id.to_string())?;
        if tokio::fs::symlink_metadata(&volume_path).await.is_err() {
            return Err(Status::not_found(format!(
                "volume_path {} does not exist",
                volume_path.display()
            )));
        }
        let name = MapperName::for_volume(&id.to_string());
        let status = crypt::status(&name).await?.ok_or_else(|| {
            Status::failed_precondition(format!("volume {id} is not staged on this node"))
        })?;
        if status.integrity {
            return Err(Status::failed_precondition(format!(
                "volume {id} is an integrity volume; libcryptsetup cannot resize a \
                 dm-integrity mapping"
            )));
        }
        if status.read_only {
            return Err(Status::failed_precondition(format!(
                "volume {id} is staged read-only and cannot be grown"
            )));
        }
        if mount::loopdev::is_loop_device(&status.device) {
            mount::loopdev::refresh_size(&status.device).await?;
        }
        failpoint::hit("expand:device-grown");
        let header = crypt::read_header(&status.device).await?;
        let version = header.token.as_ref().map(|t| t.key_version);
        let derivation = header
            .token
            .as_ref()
            .map_or(Derivation::V1, |t| t.derivation());
        let volume_id = id.to_string();
        let (key, _) = self
            .keys
            .volume_key(&KeyRequest {
                volume_id: &volume_id,
                data_key_id: header.key_id.as_str(),
                derivation,
                len: DEFAULT_KEY_LEN,
                version,
            })
            .await?;
        let size = crypt::resize(&name, &key).await?;
        failpoint::hit("expand:mapping-grown");
        let required = req
            .capacity_range
            .as_ref()
            .map_or(0, |r| r.required_bytes.max(0) as u64);
        if size < required {
            return Err(Status::out_of_range(format!(
                "volume {id} is {size} bytes after the resize, short of the {required} \
                 asked for: has the disk grown (ControllerExpandVolume)?"
            )));
        }
        let content = header.token.and_then(|t| t.content);
        let block = matches!(access, Some(Access::Block)) || content.as_deref() == Some("block");
        if !block {
            let fs: FsType = content
                .as_deref()
                .unwrap_or_default()
                .parse()
                .map_err(|_| {
                    Status::failed_precondition(format!(
                        "volume {id} records no filesystem ({content:?}); stage it first"
                    ))
                })?;
            let mapped = name.device_path();
            let mount_point = match staging {
                Some(s) if mount::is_mount_point(&s)? => s,
                _ => volume_path,
            };
            mount::resize_fs(&mapped, &mount_point, fs).await?;
        }
        tracing::info!(volume = %id, bytes = size, "volume grown on the node");
        Ok(size)
    }

    /// Usage of a published volume: bytes and inodes of its filesystem, or the
    /// size of a block volume.
    async fn stats(&self, req: NodeGetVolumeStatsRequest) -> Result<Vec<VolumeUsage>, Status> {
        validate::required("volume_id", &req.volume_id)?;
        let path = existing_volume_path("volume_path", &req.volume_path)?;
        let id = volume_id(&req.volume_id)?;
        let mapped = MapperName::for_volume(&id.to_string()).device_path();
        let not_here = || {
            Status::not_found(format!(
                "volume {id} is not published or staged at {}",
                path.display()
            ))
        };
        let want = mount::device_number(&mapped).map_err(|_| not_here())?;
        if mount::mounted_device(&path)? != Some(want) {
            return Err(not_here());
        }
        let usage = |unit: volume_usage::Unit, total: u64, available: u64, used: u64| VolumeUsage {
            total: total as i64,
            available: available as i64,
            used: used as i64,
            unit: unit as i32,
        };
        let meta = tokio::fs::metadata(&path).await?;
        if std::os::unix::fs::FileTypeExt::is_block_device(&meta.file_type()) {
            let size = mount::loopdev::size_bytes(&path)?;
            return Ok(vec![usage(volume_usage::Unit::Bytes, size, 0, 0)]);
        }
        let st = nix::sys::statvfs::statvfs(&path)
            .map_err(|e| Status::internal(format!("statvfs {}: {e}", path.display())))?;
        let frsize = st.fragment_size() as u64;
        let (blocks, bfree, bavail) = (
            st.blocks() as u64,
            st.blocks_free() as u64,
            st.blocks_available() as u64,
        );
        let (files, ffree) = (st.files() as u64, st.files_free() as u64);
        Ok(vec![
            usage(
                volume_usage::Unit::Bytes,
                blocks * frsize,
                bavail * frsize,
                (blocks - bfree) * frsize,
            ),
            usage(
                volume_usage::Unit::Inodes,
                files,
                st.files_available() as u64,
                files - ffree,
            ),
        ])
    }
}

impl NodeService {
    /// What is wrong with a volume on this node; empty when nothing is. The
    /// mapping must be open on a device that still exists, and the paths given
    /// must hold the mapped device.
    async fn health(&self, req: NodeGetVolumeHealthRequest) -> Result<VolumeHealth, Status> {
        validate::required("volume_id", &req.volume_id)?;
        let optional = |field: &str, v: &str| match v {
            "" => Ok(None),
            v => existing_volume_path(field, v).map(Some),
        };
        let publish = optional("volume_publish_path", &req.volume_publish_path)?;
        let staging = optional("staging_target_path", &req.staging_target_path)?;
        let id = volume_id(&req.volume_id)?;
        let mut issues = Vec::new();
        let mut issue = |status: VolumeHealthErrorType, reason: &str, message: String| {
            issues.push(volume_health::VolumeHealthEntry {
                status: status as i32,
                reason: reason.to_string(),
                message,
            })
        };
        let name = MapperName::for_volume(&id.to_string());
        match crypt::status(&name).await? {
            None => issue(
                VolumeHealthErrorType::Inaccessible,
                "MappingClosed",
                format!("the dm-crypt mapping {name} is not open: the volume is not staged here"),
            ),
            Some(st) => {
                if !st.device.exists() {
                    issue(
                        VolumeHealthErrorType::Inaccessible,
                        "DeviceGone",
                        format!(
                            "the device under the mapping, {}, is gone",
                            st.device.display()
                        ),
                    );
                }
                let want = mount::device_number(&name.device_path())?;
                for (what, path) in [("publish path", &publish), ("staging path", &staging)] {
                    let Some(path) = path else { continue };
                    match mount::mounted_device(path)? {
                        Some(found) if found == want => {}
                        // Block volumes are not mounted at their staging path.
                        None if what == "staging path" => {}
                        Some(_) => issue(
                            VolumeHealthErrorType::Inaccessible,
                            "WrongDevice",
                            format!("the {what} {} holds another device", path.display()),
                        ),
                        None => issue(
                            VolumeHealthErrorType::Inaccessible,
                            "NotMounted",
                            format!("nothing is mounted at the {what} {}", path.display()),
                        ),
                    }
                }
            }
        }
        Ok(VolumeHealth {
            volume_id: id.to_string(),
            health_statuses: issues,
        })
    }
}

/// What an operator does with a disk the node refuses to format.
const OPERATOR_STEPS: &str = "run `cryptdisk-csi inspect <device>` on the node to see what it \
     holds; to use it as a new empty volume, wipe it deliberately (`blkdiscard` or \
     `wipefs --all`) and mark it fresh again as README's \"When a stage refuses a disk\" \
     describes";

/// The refusal of a blank-looking device without a fresh-disk record.
fn no_record(device: &Path) -> Status {
    Status::failed_precondition(format!(
        "{} reads as blank where probed, but the controller has no record that it created \
         this disk empty and that no format has completed on it (it is a restored snapshot, \
         a clone, an imported disk, or a disk whose first attachment has ended); data between \
         the probed places would be destroyed, so it is not formatted and is left untouched. \
         To proceed: {OPERATOR_STEPS}",
        device.display()
    ))
}

impl NodeService {
    fn formatted_under(&self) -> std::sync::MutexGuard<'_, HashSet<FreshRecord>> {
        self.formatted_under
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}

/// A volume grown while it was not staged: its mapping opened at the new size,
/// and its filesystem is grown to match, as NodeExpandVolume would.
async fn grow_if_behind(mapped: &Path, mount_point: &Path, fs: FsType) -> Result<(), Status> {
    let device_bytes = mount::loopdev::size_bytes(mapped)?;
    let Some(fs_bytes) = mount::fs_size_bytes(mapped).await? else {
        return Ok(());
    };
    // Less than a MiB is rounding, not growth.
    if fs_bytes + (1 << 20) <= device_bytes {
        tracing::info!(
            fs_bytes,
            device_bytes,
            "growing the filesystem: the volume grew while unstaged"
        );
        mount::resize_fs(mapped, mount_point, fs).await?;
    }
    Ok(())
}

/// Where else the device `want` is mounted, leaving out the staging path and the
/// target itself: the publications of a volume other than this one.
fn published_elsewhere(
    want: (u32, u32),
    staging: &Path,
    target: &Path,
) -> Result<Vec<PathBuf>, Status> {
    let canonical = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let (staging, target) = (canonical(staging), canonical(target));
    Ok(mount::mount_points_of(want)?
        .into_iter()
        .filter(|p| *p != staging && *p != target)
        .collect())
}

#[tonic::async_trait]
impl Node for NodeService {
    #[tracing::instrument(skip_all, fields(volume = %request.get_ref().volume_id))]
    async fn node_stage_volume(
        &self,
        request: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        self.stage(request.into_inner()).await?;
        Ok(Response::new(NodeStageVolumeResponse {}))
    }

    #[tracing::instrument(skip_all, fields(volume = %request.get_ref().volume_id))]
    async fn node_unstage_volume(
        &self,
        request: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        self.unstage(request.into_inner()).await?;
        Ok(Response::new(NodeUnstageVolumeResponse {}))
    }

    #[tracing::instrument(skip_all, fields(volume = %request.get_ref().volume_id))]
    async fn node_publish_volume(
        &self,
        request: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        self.publish(request.into_inner()).await?;
        Ok(Response::new(NodePublishVolumeResponse {}))
    }

    #[tracing::instrument(skip_all, fields(volume = %request.get_ref().volume_id))]
    async fn node_unpublish_volume(
        &self,
        request: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        self.unpublish(request.into_inner()).await?;
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }

    #[tracing::instrument(skip_all, fields(volume = %request.get_ref().volume_id))]
    async fn node_expand_volume(
        &self,
        request: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        let size = self.expand(request.into_inner()).await?;
        Ok(Response::new(NodeExpandVolumeResponse {
            capacity_bytes: size as i64,
        }))
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let usage = self.stats(request.into_inner()).await?;
        Ok(Response::new(NodeGetVolumeStatsResponse { usage }))
    }

    async fn node_get_volume_health(
        &self,
        request: Request<NodeGetVolumeHealthRequest>,
    ) -> Result<Response<NodeGetVolumeHealthResponse>, Status> {
        let health = self.health(request.into_inner()).await?;
        Ok(Response::new(NodeGetVolumeHealthResponse {
            volume_health: Some(health),
        }))
    }

    async fn node_get_capabilities(
        &self,
        _request: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        let rpc = |t: Rpc| NodeServiceCapability {
            r#type: Some(node_service_capability::Type::Rpc(
                node_service_capability::Rpc { r#type: t as i32 },
            )),
        };
        Ok(Response::new(NodeGetCapabilitiesResponse {
            capabilities: vec![
                rpc(Rpc::StageUnstageVolume),
                rpc(Rpc::SingleNodeMultiWriter),
                rpc(Rpc::GetVolumeStats),
                rpc(Rpc::ExpandVolume),
                rpc(Rpc::GetVolumeHealth),
            ],
        }))
    }

    async fn node_get_info(
        &self,
        _request: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        let topology = (!self.config.topology.is_empty()).then(|| Topology {
            segments: self.config.topology.clone().into_iter().collect(),
        });
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.config.node_id.clone(),
            // CSI carries the limit as int64; no real limit comes near its end.
            max_volumes_per_node: i64::try_from(self.config.max_volumes).unwrap_or(i64::MAX),
            accessible_topology: topology,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_paths_must_be_absolute_and_plain() {
        assert!(request_path("p", "/var/lib/kubelet/x").is_ok());
        for bad in ["", "relative", "/a/../b", "/a/\0b"] {
            assert_eq!(
                request_path("p", bad).unwrap_err().code(),
                tonic::Code::InvalidArgument,
                "{bad:?}"
            );
        }
    }
}
