//! CSI Controller: volumes and snapshots on the configured disk backend.
//!
//! Each RPC validates its request first, then acts. Volume ids are parsed by
//! `volume::VolumeId` and nothing else; the encryption options chosen here
//! travel to the node in the volume context.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::contract::KEY_SCOPE as SCOPE_ATTRIBUTE;
use super::guard::Guards;
use super::params::VolumeOptions;
use super::validate;
use crate::backend::{
    Disk, DiskBackend, DiskSource, DiskSpec, Snapshot as BackendSnapshot, TopologyRequirement,
};
use crate::crypt::{Integrity, LUKS2_HEADER_BYTES};
use crate::proto::csi::controller_server::Controller;
use crate::proto::csi::controller_service_capability::{self, rpc::Type as Rpc};
use crate::proto::csi::volume_content_source::{self, SnapshotSource, VolumeSource};
use crate::proto::csi::*;
use crate::volume::{SnapshotId, VolumeId, fresh};

const MIB: u64 = 1 << 20;
/// Size of a volume whose request names no capacity.
pub const DEFAULT_VOLUME_BYTES: u64 = 1 << 30;

/// Bytes a disk needs so that `usable` bytes remain after the LUKS2 header and,
/// with integrity, dm-integrity's tags (32 bytes per 4 KiB sector), its
/// superblock and journal area, rounded up to whole MiB.
pub fn disk_bytes_for(usable: u64, integrity: Integrity) -> u64 {
    let overhead = match integrity {
        Integrity::None => 0,
        // Tags take 32/4096 of the data; their interleaved layout and the journal
        // area (allocated even when unused) are covered by a fixed reserve.
        Integrity::HmacSha256 { .. } => usable.div_ceil(4096) * 32 + 64 * MIB,
    };
    (usable + LUKS2_HEADER_BYTES + overhead).div_ceil(MIB) * MIB
}

/// What remains usable of a disk of `disk_bytes` after the LUKS2 header (plain
/// volumes; integrity volumes are never resized, and their overhead is estimated
/// the same way [`disk_bytes_for`] adds it).
pub fn usable_of_disk(disk_bytes: u64, integrity: Integrity) -> u64 {
    let after_header = disk_bytes.saturating_sub(LUKS2_HEADER_BYTES);
    let usable = match integrity {
        Integrity::None => after_header,
        Integrity::HmacSha256 { .. } => {
            // Inverse of `usable + usable/4096*32 + 64 MiB`, rounded down.
            after_header.saturating_sub(64 * MIB) / 4128 * 4096
        }
    };
    usable / 4096 * 4096
}

/// The usable size a capacity range asks for, in whole 4 KiB sectors.
pub fn usable_bytes(range: Option<&CapacityRange>) -> Result<u64, Status> {
    let (required, limit) = match range {
        None => (0, 0),
        Some(r) => (r.required_bytes, r.limit_bytes),
    };
    if required < 0 || limit < 0 {
        return Err(Status::invalid_argument(format!(
            "capacity_range is negative (required {required}, limit {limit})"
        )));
    }
    let (required, limit) = (required as u64, limit as u64);
    if limit != 0 && limit < required {
        return Err(Status::out_of_range(format!(
            "capacity_range limit {limit} is below required {required}"
        )));
    }
    let wanted = match (required, limit) {
        (0, 0) => DEFAULT_VOLUME_BYTES,
        (0, l) => DEFAULT_VOLUME_BYTES.min(l),
        (r, _) => r,
    };
    let usable = wanted.div_ceil(4096) * 4096;
    if limit != 0 && usable > limit {
        return Err(Status::out_of_range(format!(
            "{required} bytes rounded to whole 4 KiB sectors ({usable}) exceed the limit {limit}"
        )));
    }
    Ok(usable)
}

pub struct ControllerService {
    backend: Arc<dyn DiskBackend>,
    /// Nodes the local backend can attach to (the machine it runs on).
    local_nodes: Option<Vec<String>>,
    guards: Guards,
    /// Most disks attached to one node (0: no limit), and the lock that makes
    /// counting and attaching one step.
    attach_limit: u64,
    attach_lock: tokio::sync::Mutex<()>,
}

impl ControllerService {
    pub fn new(backend: Arc<dyn DiskBackend>, local_nodes: Option<Vec<String>>) -> Self {
        ControllerService {
            backend,
            local_nodes,
            guards: Guards::default(),
            attach_limit: 0,
            attach_lock: tokio::sync::Mutex::new(()),
        }
    }

    /// Refuses to attach more than `limit` disks to one node (0: no limit).
    pub fn with_attach_limit(mut self, limit: u64) -> Self {
        self.attach_limit = limit;
        self
    }

    /// RESOURCE_EXHAUSTED when `node` already has the most disks attached.
    async fn check_attach_limit(&self, node: &str) -> Result<(), Status> {
        let mut attached = 0u64;
        let mut token: Option<String> = None;
        loop {
            let (disks, next) = self.backend.list_disks(token.as_deref(), 0).await?;
            attached += disks
                .iter()
                .filter(|d| d.attached_to.iter().any(|n| n == node))
                .count() as u64;
            match next {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        if attached >= self.attach_limit {
            return Err(Status::resource_exhausted(format!(
                "node {node:?} has {attached} volumes attached, its limit; detach one first"
            )));
        }
        Ok(())
    }

    fn volume(&self, disk: &Disk, options: Option<VolumeOptions>) -> Volume {
        let content_source = disk.source.as_ref().map(|s| VolumeContentSource {
            r#type: Some(match s {
                DiskSource::Snapshot(id) => volume_content_source::Type::Snapshot(SnapshotSource {
                    snapshot_id: id.to_string(),
                }),
                DiskSource::Disk(id) => volume_content_source::Type::Volume(VolumeSource {
                    volume_id: id.to_string(),
                }),
            }),
        });
        let mut volume_context: HashMap<String, String> = match options {
            Some(o) => o.to_volume_context(),
            None => disk.options.clone().into_iter().collect(),
        };
        // The CO copies the volume context into the PV's volumeAttributes, where
        // the KMS reads the scope from (never from the node).
        volume_context.insert(SCOPE_ATTRIBUTE.to_string(), disk.scope());
        Volume {
            capacity_bytes: known_usable(disk.usable_bytes, disk.capacity_bytes, &disk.options)
                as i64,
            volume_id: disk.id.to_string(),
            volume_context,
            content_source,
            accessible_topology: disk
                .topology
                .iter()
                .map(|t| Topology {
                    segments: t.clone().into_iter().collect(),
                })
                .collect(),
        }
    }

    /// A volume id from a request: INVALID_ARGUMENT when empty, NOT_FOUND when it
    /// cannot name a volume of ours.
    fn parse_volume_id(&self, field: &str, id: &str) -> Result<VolumeId, Status> {
        validate::required(field, id)?;
        let parsed: VolumeId = id
            .parse()
            .map_err(|e| Status::not_found(format!("{field}: no such volume: {e}")))?;
        if parsed.backend() != self.backend.kind() {
            return Err(Status::not_found(format!(
                "{field} {id:?} belongs to the {} backend; this controller serves {}",
                parsed.backend(),
                self.backend.kind()
            )));
        }
        Ok(parsed)
    }

    /// A copy holds its source's LUKS2 header, so it has the source's layout: a
    /// clone or restore must ask for the same integrity setting, or its size and
    /// everything later computed from its options would be wrong.
    /// Checks that a copy keeps its source's layout; returns the source's key
    /// scope, which the copy inherits (it holds the same header, and so the
    /// same key id: only the same scope derives the same key).
    async fn check_source_layout(
        &self,
        source: &DiskSource,
        wanted: &VolumeOptions,
    ) -> Result<Option<String>, Status> {
        let (what, options, scope) = match source {
            DiskSource::Disk(id) => match self.backend.get_disk(id).await? {
                Some(d) => (format!("source volume {id}"), d.options.clone(), d.scope()),
                None => return Ok(None), // the backend reports the missing source
            },
            DiskSource::Snapshot(id) => match self.backend.get_snapshot(id).await? {
                Some(s) => (
                    format!("source snapshot {id}"),
                    s.options.clone(),
                    s.scope(),
                ),
                None => return Ok(None),
            },
        };
        let had = disk_options(&options)?;
        if had.integrity != wanted.integrity {
            return Err(Status::invalid_argument(format!(
                "{what} has integrity {}, the new volume asks for {}; a copy keeps its \
                 source's layout, so use a StorageClass with the same \
                 cryptdisk.csi.io/integrity",
                describe_integrity(had.integrity),
                describe_integrity(wanted.integrity)
            )));
        }
        Ok(Some(scope))
    }

    async fn existing_disk(&self, field: &str, id: &str) -> Result<Disk, Status> {
        let id = self.parse_volume_id(field, id)?;
        self.backend
            .get_disk(&id)
            .await?
            .ok_or_else(|| Status::not_found(format!("volume {id} does not exist")))
    }
}

fn describe_integrity(i: Integrity) -> &'static str {
    match i {
        Integrity::None => "off",
        Integrity::HmacSha256 { journal: false } => "hmac(sha256)",
        Integrity::HmacSha256 { journal: true } => "hmac(sha256) with a journal",
    }
}

/// The options a disk was created with; a disk from before options were kept
/// reads as the defaults.
fn disk_options(options: &BTreeMap<String, String>) -> Result<VolumeOptions, Status> {
    let ctx: HashMap<String, String> = options.clone().into_iter().collect();
    VolumeOptions::from_volume_context(&ctx)
        .map_err(|e| Status::internal(format!("stored volume options: {}", e.message())))
}

fn topology_requirement(req: Option<&TopologyRequirementProto>) -> Option<TopologyRequirement> {
    let to_map = |t: &Topology| {
        t.segments
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    req.map(|r| TopologyRequirement {
        requisite: r.requisite.iter().map(to_map).collect(),
        preferred: r.preferred.iter().map(to_map).collect(),
    })
}

type TopologyRequirementProto = crate::proto::csi::TopologyRequirement;

/// The usable size of a volume or snapshot as the CO knows it.
///
/// Why it is recorded rather than computed from the disk: the CO holds a volume
/// as the size CreateVolume or ControllerExpandVolume reported, and a
/// snapshot's `size_bytes` becomes its `restoreSize`, the least a restored claim
/// may ask for (external-provisioner refuses anything smaller). The raw disk
/// cannot give that size back: it holds the LUKS2 header and, with integrity,
/// dm-integrity's metadata (estimated, not exact), and a cloud rounds it up to
/// whole GiB, so a 1 GiB claim sits on a 2 GiB disk whose usable remainder,
/// about 2 GiB, would make every restore into a 1 GiB claim fail. Nor can the
/// disk's size tell whether an expansion happened: ControllerExpandVolume may
/// report a larger size on an unchanged disk when the rounding left room. So
/// the controller records the size it reports, at creation and after every
/// expansion, with the disk (local index, Azure tag, GCP label), and a snapshot
/// copies it. Restoring into that size then asks for `disk_bytes_for(usable)`,
/// which is the source disk's size again before the backend's rounding (the
/// disk was made from it, or the size was computed from the disk), so the
/// restore fits and leaves at least that much usable.
///
/// A disk or snapshot from before the size was recorded falls back to what its
/// raw size leaves usable.
fn known_usable(recorded: Option<u64>, raw_bytes: u64, options: &BTreeMap<String, String>) -> u64 {
    recorded.unwrap_or_else(|| {
        let integrity = disk_options(options)
            .map(|o| o.integrity)
            .unwrap_or(Integrity::None);
        usable_of_disk(raw_bytes, integrity)
    })
}

fn snapshot(s: &BackendSnapshot) -> crate::proto::csi::Snapshot {
    crate::proto::csi::Snapshot {
        size_bytes: known_usable(s.usable_bytes, s.size_bytes, &s.options) as i64,
        snapshot_id: s.id.to_string(),
        source_volume_id: s.source.to_string(),
        creation_time: Some(prost_types::Timestamp {
            seconds: s.created_unix_nanos.div_euclid(1_000_000_000),
            nanos: s.created_unix_nanos.rem_euclid(1_000_000_000) as i32,
        }),
        ready_to_use: s.ready,
        group_snapshot_id: String::new(),
        accessible_topology: Vec::new(),
    }
}

fn page_size(max_entries: i32) -> Result<u32, Status> {
    u32::try_from(max_entries)
        .map_err(|_| Status::invalid_argument(format!("max_entries {max_entries} is negative")))
}

fn token(t: &str) -> Option<&str> {
    (!t.is_empty()).then_some(t)
}

#[tonic::async_trait]
impl Controller for ControllerService {
    #[tracing::instrument(skip_all, fields(name = %request.get_ref().name))]
    async fn create_volume(
        &self,
        request: Request<CreateVolumeRequest>,
    ) -> Result<Response<CreateVolumeResponse>, Status> {
        let req = request.into_inner();
        validate::name("name", &req.name)?;
        validate::capabilities(&req.volume_capabilities)?;
        let (options, backend_params) = VolumeOptions::from_parameters(&req.parameters)?;
        self.backend.validate_parameters(&backend_params)?;
        let usable = usable_bytes(req.capacity_range.as_ref())?;
        let source = match req
            .volume_content_source
            .as_ref()
            .and_then(|s| s.r#type.as_ref())
        {
            None => None,
            Some(volume_content_source::Type::Snapshot(s)) => {
                let id: SnapshotId = validate::required("snapshot_id", &s.snapshot_id)?
                    .parse()
                    .map_err(|e| Status::not_found(format!("source snapshot: {e}")))?;
                Some(DiskSource::Snapshot(id))
            }
            Some(volume_content_source::Type::Volume(v)) => Some(DiskSource::Disk(
                self.parse_volume_id("source volume_id", &v.volume_id)?,
            )),
        };
        let key_scope = match &source {
            Some(source) => self.check_source_layout(source, &options).await?,
            None => None,
        };
        let _held = self.guards.take(&format!("create/{}", req.name))?;
        let spec = DiskSpec {
            name: req.name.clone(),
            capacity_bytes: disk_bytes_for(usable, options.integrity),
            source,
            parameters: backend_params,
            accessibility: topology_requirement(req.accessibility_requirements.as_ref()),
            options: options.to_volume_context().into_iter().collect(),
            usable_bytes: usable,
            key_scope,
        };
        let disk = self.backend.create_disk(&spec).await?;
        tracing::info!(volume = %disk.id, bytes = usable, "volume ready");
        let mut volume = self.volume(&disk, Some(options));
        // Report what the user asked for and can use, not the disk's raw size
        // (a retry after an expansion still answers the size asked for here).
        volume.capacity_bytes = usable as i64;
        Ok(Response::new(CreateVolumeResponse {
            volume: Some(volume),
        }))
    }

    #[tracing::instrument(skip_all, fields(volume = %request.get_ref().volume_id))]
    async fn delete_volume(
        &self,
        request: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteVolumeResponse>, Status> {
        let req = request.into_inner();
        validate::required("volume_id", &req.volume_id)?;
        // An id that cannot be ours names no volume: deleting it is done already.
        let Ok(id) = self.parse_volume_id("volume_id", &req.volume_id) else {
            return Ok(Response::new(DeleteVolumeResponse {}));
        };
        let _held = self.guards.take(&id.to_string())?;
        self.backend.delete_disk(&id).await?;
        Ok(Response::new(DeleteVolumeResponse {}))
    }

    #[tracing::instrument(skip_all, fields(volume = %request.get_ref().volume_id, node = %request.get_ref().node_id))]
    async fn controller_publish_volume(
        &self,
        request: Request<ControllerPublishVolumeRequest>,
    ) -> Result<Response<ControllerPublishVolumeResponse>, Status> {
        let req = request.into_inner();
        validate::required("volume_id", &req.volume_id)?;
        validate::node_id("node_id", &req.node_id)?;
        validate::one_capability(req.volume_capability.as_ref())?;
        let disk = self.existing_disk("volume_id", &req.volume_id).await?;
        if let Some(nodes) = &self.local_nodes
            && !nodes.contains(&req.node_id)
        {
            return Err(Status::not_found(format!(
                "node {:?} is unknown: the local backend serves only {nodes:?}",
                req.node_id
            )));
        }
        if disk.attached_to.iter().any(|n| n != &req.node_id)
            && !self.backend.takes_over_attachment(&disk.id).await?
        {
            return Err(Status::failed_precondition(format!(
                "volume {} is published on node {:?}; unpublish it there first",
                disk.id, disk.attached_to
            )));
        }
        let _held = self.guards.take(&disk.id.to_string())?;
        let new_attachment = !disk.attached_to.contains(&req.node_id);
        let _counting = if self.attach_limit > 0 && new_attachment {
            let lock = self.attach_lock.lock().await;
            self.check_attach_limit(&req.node_id).await?;
            Some(lock)
        } else {
            None
        };
        let mut context = self
            .backend
            .attach(&disk.id, &req.node_id, req.readonly)
            .await?;
        // The fresh-disk record, read from the disk itself (tag, label or index
        // entry), goes only to a writer: a read-only publication never formats.
        if let Some(record) = disk.fresh.as_ref().filter(|_| !req.readonly) {
            context.insert(fresh::PUBLISH_KEY.to_string(), record.to_string());
        }
        Ok(Response::new(ControllerPublishVolumeResponse {
            publish_context: context.into_iter().collect(),
        }))
    }

    #[tracing::instrument(skip_all, fields(volume = %request.get_ref().volume_id, node = %request.get_ref().node_id))]
    async fn controller_unpublish_volume(
        &self,
        request: Request<ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<ControllerUnpublishVolumeResponse>, Status> {
        let req = request.into_inner();
        validate::required("volume_id", &req.volume_id)?;
        if !req.node_id.is_empty() {
            validate::node_id("node_id", &req.node_id)?;
        }
        // A volume that does not exist is unpublished everywhere.
        let Ok(id) = self.parse_volume_id("volume_id", &req.volume_id) else {
            return Ok(Response::new(ControllerUnpublishVolumeResponse {}));
        };
        let _held = self.guards.take(&id.to_string())?;
        // Ending an attachment ends the disk's fresh-disk record, cleared before
        // the detach: after its first attachment a disk that reads blank may be
        // one whose header was lost, and is never formatted again.
        if req.node_id.is_empty() {
            if let Some(disk) = self.backend.get_disk(&id).await? {
                for node in &disk.attached_to {
                    self.backend.detach_ending_fresh(&id, node).await?;
                }
            }
        } else {
            self.backend.detach_ending_fresh(&id, &req.node_id).await?;
        }
        Ok(Response::new(ControllerUnpublishVolumeResponse {}))
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<ValidateVolumeCapabilitiesResponse>, Status> {
        let req = request.into_inner();
        validate::required("volume_id", &req.volume_id)?;
        if req.volume_capabilities.is_empty() {
            return Err(Status::invalid_argument("volume_capabilities is required"));
        }
        self.existing_disk("volume_id", &req.volume_id).await?;
        let (options, backend_params) = VolumeOptions::from_parameters(&req.parameters)?;
        self.backend.validate_parameters(&backend_params)?;
        if let Err(e) = VolumeOptions::from_volume_context(&req.volume_context) {
            return Ok(Response::new(ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: e.message().to_string(),
            }));
        }
        for cap in &req.volume_capabilities {
            if let Err(why) = validate::capability(cap) {
                return Ok(Response::new(ValidateVolumeCapabilitiesResponse {
                    confirmed: None,
                    message: why,
                }));
            }
        }
        let _ = options;
        Ok(Response::new(ValidateVolumeCapabilitiesResponse {
            confirmed: Some(validate_volume_capabilities_response::Confirmed {
                volume_context: req.volume_context,
                volume_capabilities: req.volume_capabilities,
                parameters: req.parameters,
                mutable_parameters: HashMap::new(),
            }),
            message: String::new(),
        }))
    }

    async fn list_volumes(
        &self,
        request: Request<ListVolumesRequest>,
    ) -> Result<Response<ListVolumesResponse>, Status> {
        let req = request.into_inner();
        let max = page_size(req.max_entries)?;
        let (disks, next) = self
            .backend
            .list_disks(token(&req.starting_token), max)
            .await?;
        let entries = disks
            .iter()
            .map(|d| list_volumes_response::Entry {
                volume: Some(self.volume(d, None)),
                status: Some(list_volumes_response::VolumeStatus {
                    published_node_ids: d.attached_to.clone(),
                }),
            })
            .collect();
        Ok(Response::new(ListVolumesResponse {
            entries,
            next_token: next.unwrap_or_default(),
        }))
    }

    async fn get_capacity(
        &self,
        request: Request<GetCapacityRequest>,
    ) -> Result<Response<GetCapacityResponse>, Status> {
        let req = request.into_inner();
        for cap in &req.volume_capabilities {
            validate::capability(cap).map_err(Status::invalid_argument)?;
        }
        let (_, backend_params) = VolumeOptions::from_parameters(&req.parameters)?;
        self.backend.validate_parameters(&backend_params)?;
        let topology: Option<BTreeMap<String, String>> =
            req.accessible_topology.as_ref().map(|t| {
                t.segments
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            });
        let available = self
            .backend
            .capacity(&backend_params, topology.as_ref())
            .await?;
        let available = available.saturating_sub(LUKS2_HEADER_BYTES);
        Ok(Response::new(GetCapacityResponse {
            available_capacity: available as i64,
            maximum_volume_size: self
                .backend
                .max_volume_bytes()
                .map(|m| m.saturating_sub(LUKS2_HEADER_BYTES) as i64),
            minimum_volume_size: Some(4096),
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _request: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        let rpc = |t: Rpc| ControllerServiceCapability {
            r#type: Some(controller_service_capability::Type::Rpc(
                controller_service_capability::Rpc { r#type: t as i32 },
            )),
        };
        Ok(Response::new(ControllerGetCapabilitiesResponse {
            capabilities: [
                Rpc::CreateDeleteVolume,
                Rpc::PublishUnpublishVolume,
                Rpc::ListVolumes,
                Rpc::GetCapacity,
                Rpc::CreateDeleteSnapshot,
                Rpc::ListSnapshots,
                Rpc::CloneVolume,
                Rpc::PublishReadonly,
                Rpc::ListVolumesPublishedNodes,
                Rpc::GetVolume,
                Rpc::SingleNodeMultiWriter,
                Rpc::ExpandVolume,
                Rpc::GetSnapshot,
            ]
            .into_iter()
            .map(rpc)
            .collect(),
        }))
    }

    #[tracing::instrument(skip_all, fields(name = %request.get_ref().name, source = %request.get_ref().source_volume_id))]
    async fn create_snapshot(
        &self,
        request: Request<CreateSnapshotRequest>,
    ) -> Result<Response<CreateSnapshotResponse>, Status> {
        let req = request.into_inner();
        validate::name("name", &req.name)?;
        validate::required("source_volume_id", &req.source_volume_id)?;
        if !req.parameters.is_empty() {
            return Err(Status::invalid_argument(format!(
                "snapshot parameters are not supported; got {:?}",
                req.parameters.keys().collect::<Vec<_>>()
            )));
        }
        let source = self.parse_volume_id("source_volume_id", &req.source_volume_id)?;
        let _held = self.guards.take(&format!("snapshot/{}", req.name))?;
        // The source's guard too: an expansion grows the disk, then records its
        // new usable size; a snapshot between the two would pair the grown
        // bytes with the old size, and a restore into that size would not fit.
        let _source_held = self.guards.take(&source.to_string())?;
        let snap = self.backend.create_snapshot(&source, &req.name).await?;
        Ok(Response::new(CreateSnapshotResponse {
            snapshot: Some(snapshot(&snap)),
        }))
    }

    async fn delete_snapshot(
        &self,
        request: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        let req = request.into_inner();
        validate::required("snapshot_id", &req.snapshot_id)?;
        let Ok(id) = req.snapshot_id.parse::<SnapshotId>() else {
            return Ok(Response::new(DeleteSnapshotResponse {}));
        };
        let _held = self.guards.take(&format!("snapshot-id/{id}"))?;
        self.backend.delete_snapshot(&id).await?;
        Ok(Response::new(DeleteSnapshotResponse {}))
    }

    async fn list_snapshots(
        &self,
        request: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        let req = request.into_inner();
        let max = page_size(req.max_entries)?;
        // Filters that cannot name anything of ours match nothing.
        let empty = || Ok(Response::new(ListSnapshotsResponse::default()));
        let source = match token(&req.source_volume_id) {
            None => None,
            Some(s) => match s.parse::<VolumeId>() {
                Ok(id) => Some(id),
                Err(_) => return empty(),
            },
        };
        let snapshot_id = match token(&req.snapshot_id) {
            None => None,
            Some(s) => match s.parse::<SnapshotId>() {
                Ok(id) => Some(id),
                Err(_) => return empty(),
            },
        };
        let (snaps, next) = self
            .backend
            .list_snapshots(
                source.as_ref(),
                snapshot_id.as_ref(),
                token(&req.starting_token),
                max,
            )
            .await?;
        Ok(Response::new(ListSnapshotsResponse {
            entries: snaps
                .iter()
                .map(|s| list_snapshots_response::Entry {
                    snapshot: Some(snapshot(s)),
                })
                .collect(),
            next_token: next.unwrap_or_default(),
        }))
    }

    async fn get_snapshot(
        &self,
        request: Request<GetSnapshotRequest>,
    ) -> Result<Response<GetSnapshotResponse>, Status> {
        let req = request.into_inner();
        validate::required("snapshot_id", &req.snapshot_id)?;
        let id: SnapshotId = req
            .snapshot_id
            .parse()
            .map_err(|e| Status::not_found(format!("snapshot_id: no such snapshot: {e}")))?;
        let snap = self
            .backend
            .get_snapshot(&id)
            .await?
            .ok_or_else(|| Status::not_found(format!("snapshot {id} does not exist")))?;
        Ok(Response::new(GetSnapshotResponse {
            snapshot: Some(snapshot(&snap)),
        }))
    }

    /// Grows the disk so that the requested size stays usable after the LUKS2
    /// header; the node then grows the mapping and the filesystem, online.
    #[tracing::instrument(skip_all, fields(volume = %request.get_ref().volume_id))]
    async fn controller_expand_volume(
        &self,
        request: Request<ControllerExpandVolumeRequest>,
    ) -> Result<Response<ControllerExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        validate::required("volume_id", &req.volume_id)?;
        let range = req
            .capacity_range
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("capacity_range is required"))?;
        if range.required_bytes <= 0 && range.limit_bytes <= 0 {
            return Err(Status::invalid_argument(
                "capacity_range must give required_bytes or limit_bytes",
            ));
        }
        if let Some(cap) = &req.volume_capability {
            validate::capability(cap).map_err(Status::invalid_argument)?;
        }
        let usable = usable_bytes(Some(range))?;
        let id = self.parse_volume_id("volume_id", &req.volume_id)?;
        let _held = self.guards.take(&id.to_string())?;
        let disk = self
            .backend
            .get_disk(&id)
            .await?
            .ok_or_else(|| Status::not_found(format!("volume {id} does not exist")))?;
        let options = disk_options(&disk.options)?;
        if options.integrity != Integrity::None {
            return Err(Status::failed_precondition(format!(
                "volume {id} is an integrity volume; libcryptsetup cannot resize a \
                 dm-integrity mapping, so integrity volumes keep their size: copy the \
                 data to a larger volume instead"
            )));
        }
        let wanted = disk_bytes_for(usable, options.integrity);
        // The disk only ever grows, so what it now is is what is usable.
        let disk_bytes = if wanted <= disk.capacity_bytes {
            disk.capacity_bytes
        } else {
            self.backend.expand(&id, wanted).await?
        };
        let usable_now = usable_of_disk(disk_bytes, options.integrity);
        // What the CO now holds the volume as, for its snapshots (`known_usable`).
        if disk.usable_bytes != Some(usable_now) {
            self.backend.record_usable(&id, usable_now).await?;
        }
        tracing::info!(volume = %id, bytes = usable_now, "volume expanded");
        Ok(Response::new(ControllerExpandVolumeResponse {
            capacity_bytes: usable_now as i64,
            // Block volumes need the mapping grown too, so the node is always asked.
            node_expansion_required: true,
        }))
    }

    async fn controller_get_volume(
        &self,
        request: Request<ControllerGetVolumeRequest>,
    ) -> Result<Response<ControllerGetVolumeResponse>, Status> {
        let req = request.into_inner();
        let disk = self.existing_disk("volume_id", &req.volume_id).await?;
        Ok(Response::new(ControllerGetVolumeResponse {
            volume: Some(self.volume(&disk, None)),
            status: Some(controller_get_volume_response::VolumeStatus {
                published_node_ids: disk.attached_to.clone(),
            }),
        }))
    }
}

/// The restore-size contract, checked against each backend (local, and Azure and
/// GCP against their fakes): a snapshot reports the usable size its source was
/// given to the CO, and a restore or clone into exactly that size succeeds.
#[cfg(test)]
pub(crate) mod restore_size {
    use super::*;
    use crate::proto::csi::volume_capability::access_mode::Mode;
    use crate::proto::csi::volume_capability::{AccessMode, AccessType, MountVolume};

    fn create_req(
        name: &str,
        bytes: u64,
        params: &[(&str, &str)],
        source: Option<volume_content_source::Type>,
    ) -> CreateVolumeRequest {
        CreateVolumeRequest {
            name: name.into(),
            capacity_range: Some(CapacityRange {
                required_bytes: bytes as i64,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![VolumeCapability {
                access_type: Some(AccessType::Mount(MountVolume {
                    fs_type: "ext4".into(),
                    ..Default::default()
                })),
                access_mode: Some(AccessMode {
                    mode: Mode::SingleNodeWriter as i32,
                }),
            }],
            parameters: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            volume_content_source: source.map(|t| VolumeContentSource { r#type: Some(t) }),
            ..Default::default()
        }
    }

    async fn create(ctl: &ControllerService, req: CreateVolumeRequest) -> Result<Volume, Status> {
        Ok(ctl
            .create_volume(Request::new(req))
            .await?
            .into_inner()
            .volume
            .expect("a volume"))
    }

    /// Snapshots `volume` (reported as `capacity` to the CO) and checks that
    /// CreateSnapshot, GetSnapshot and ListSnapshots all report `capacity`, and
    /// that a restore and a clone asking for exactly `capacity` succeed with at
    /// least that much. Returns the snapshot's id.
    pub async fn snapshot_restores_into_its_size(
        ctl: &ControllerService,
        tag: &str,
        volume: &Volume,
        params: &[(&str, &str)],
    ) -> String {
        let capacity = volume.capacity_bytes as u64;
        let snap = ctl
            .create_snapshot(Request::new(CreateSnapshotRequest {
                source_volume_id: volume.volume_id.clone(),
                name: format!("{tag}-snap"),
                ..Default::default()
            }))
            .await
            .unwrap_or_else(|e| panic!("{tag}: CreateSnapshot: {e}"))
            .into_inner()
            .snapshot
            .unwrap();
        assert_eq!(
            snap.size_bytes as u64, capacity,
            "{tag}: CreateSnapshot's size_bytes is not the volume's capacity"
        );
        let got = ctl
            .get_snapshot(Request::new(GetSnapshotRequest {
                snapshot_id: snap.snapshot_id.clone(),
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner()
            .snapshot
            .unwrap();
        assert_eq!(got.size_bytes as u64, capacity, "{tag}: GetSnapshot");
        let listed = ctl
            .list_snapshots(Request::new(ListSnapshotsRequest {
                snapshot_id: snap.snapshot_id.clone(),
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner()
            .entries;
        assert_eq!(listed.len(), 1, "{tag}: ListSnapshots by id");
        assert_eq!(
            listed[0].snapshot.as_ref().unwrap().size_bytes as u64,
            capacity,
            "{tag}: ListSnapshots"
        );
        let listed = ctl
            .list_snapshots(Request::new(ListSnapshotsRequest {
                source_volume_id: volume.volume_id.clone(),
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner()
            .entries;
        assert!(
            listed
                .iter()
                .filter_map(|e| e.snapshot.as_ref())
                .all(|s| s.size_bytes as u64 == capacity),
            "{tag}: ListSnapshots by source: {listed:?}"
        );

        let restore = create_req(
            &format!("{tag}-restore"),
            snap.size_bytes as u64,
            params,
            Some(volume_content_source::Type::Snapshot(SnapshotSource {
                snapshot_id: snap.snapshot_id.clone(),
            })),
        );
        let restored = create(ctl, restore)
            .await
            .unwrap_or_else(|e| panic!("{tag}: restore into {capacity} bytes: {e}"));
        assert!(
            restored.capacity_bytes as u64 >= capacity,
            "{tag}: restored {} < {capacity}",
            restored.capacity_bytes
        );
        let clone = create_req(
            &format!("{tag}-clone"),
            capacity,
            params,
            Some(volume_content_source::Type::Volume(VolumeSource {
                volume_id: volume.volume_id.clone(),
            })),
        );
        let cloned = create(ctl, clone)
            .await
            .unwrap_or_else(|e| panic!("{tag}: clone into {capacity} bytes: {e}"));
        assert!(cloned.capacity_bytes as u64 >= capacity, "{tag}: clone");
        // Both copies hold the source's header, so they inherit its key scope.
        let scope = |v: &Volume| v.volume_context.get(SCOPE_ATTRIBUTE).cloned();
        let source_scope = scope(volume);
        assert!(source_scope.is_some(), "{tag}: the source has no key scope");
        assert_eq!(scope(&restored), source_scope, "{tag}: restore's scope");
        assert_eq!(scope(&cloned), source_scope, "{tag}: clone's scope");
        // A snapshot of the restored volume restores into its size in turn.
        let again = ctl
            .create_snapshot(Request::new(CreateSnapshotRequest {
                source_volume_id: restored.volume_id.clone(),
                name: format!("{tag}-snap-of-restore"),
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner()
            .snapshot
            .unwrap();
        assert_eq!(
            again.size_bytes, restored.capacity_bytes,
            "{tag}: snapshot of the restore"
        );
        // ...and keeps the first source's scope, which the restore recorded
        // with its disk and the snapshot with itself.
        let twice = create(
            ctl,
            create_req(
                &format!("{tag}-restore-of-restore"),
                again.size_bytes as u64,
                params,
                Some(volume_content_source::Type::Snapshot(SnapshotSource {
                    snapshot_id: again.snapshot_id.clone(),
                })),
            ),
        )
        .await
        .unwrap_or_else(|e| panic!("{tag}: restore of the restore's snapshot: {e}"));
        assert_eq!(
            scope(&twice),
            source_scope,
            "{tag}: second-generation scope"
        );
        snap.snapshot_id
    }

    /// The three cases on one controller: a plain volume, an integrity volume,
    /// and a plain volume expanded before its snapshot. `bytes` is the size
    /// first asked for, `grown` what the expansion asks for.
    pub async fn check(ctl: &ControllerService, bytes: u64, grown: u64) {
        let integrity = [(super::super::params::INTEGRITY, "true")];
        for (tag, params) in [("plain", &[][..]), ("integrity", &integrity[..])] {
            let vol = create(ctl, create_req(&format!("{tag}-src"), bytes, params, None))
                .await
                .unwrap();
            assert_eq!(vol.capacity_bytes as u64, bytes, "{tag}: CreateVolume");
            // An empty volume's key scope is its own id.
            assert_eq!(
                vol.volume_context.get(SCOPE_ATTRIBUTE),
                Some(&vol.volume_id),
                "{tag}: CreateVolume's scope"
            );
            snapshot_restores_into_its_size(ctl, tag, &vol, params).await;
        }

        let vol = create(ctl, create_req("grown-src", bytes, &[], None))
            .await
            .unwrap();
        let expanded = ctl
            .controller_expand_volume(Request::new(ControllerExpandVolumeRequest {
                volume_id: vol.volume_id.clone(),
                capacity_range: Some(CapacityRange {
                    required_bytes: grown as i64,
                    limit_bytes: 0,
                }),
                ..Default::default()
            }))
            .await
            .unwrap()
            .into_inner();
        assert!(expanded.capacity_bytes as u64 >= grown);
        let vol = Volume {
            capacity_bytes: expanded.capacity_bytes,
            ..vol
        };
        snapshot_restores_into_its_size(ctl, "grown", &vol, &[]).await;
        // ControllerGetVolume reports what the CO holds, too.
        let got = ctl
            .controller_get_volume(Request::new(ControllerGetVolumeRequest {
                volume_id: vol.volume_id.clone(),
            }))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        assert_eq!(got.capacity_bytes, expanded.capacity_bytes, "GetVolume");
        assert_eq!(
            got.volume_context.get(SCOPE_ATTRIBUTE),
            Some(&vol.volume_id),
            "GetVolume's scope"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The local backend, in process: snapshots report the usable size and
    /// restore into it.
    #[tokio::test]
    async fn local_snapshots_restore_into_their_size() {
        let dir = tempfile::tempdir().unwrap();
        let backend = crate::backend::LocalBackend::open(dir.path(), "node-1", None).unwrap();
        let ctl = ControllerService::new(Arc::new(backend), Some(vec!["node-1".into()]));
        restore_size::check(&ctl, 64 * MIB, 100 * MIB + 4096).await;
        // The scope is recorded in the index: a restore's entry holds its
        // source's id, an empty disk's holds none.
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("index.json")).unwrap()).unwrap();
        let scopes: Vec<_> = index["disks"]
            .as_object()
            .unwrap()
            .values()
            .map(|d| (d["name"].as_str().unwrap(), d.get("key_scope").cloned()))
            .collect();
        let src = |name: &str| {
            scopes
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, s)| s.clone())
                .unwrap()
        };
        assert_eq!(src("plain-src"), None, "{scopes:?}");
        let restore_scope = src("plain-restore").expect("a restore records its scope");
        let src_id = ctl
            .backend
            .list_disks(None, 0)
            .await
            .unwrap()
            .0
            .into_iter()
            .find(|d| d.name == "plain-src")
            .unwrap()
            .id;
        assert_eq!(restore_scope, serde_json::json!(src_id.to_string()));
    }

    #[test]
    fn usable_size_honours_the_range() {
        let range = |r, l| {
            Some(CapacityRange {
                required_bytes: r,
                limit_bytes: l,
            })
        };
        assert_eq!(usable_bytes(None).unwrap(), DEFAULT_VOLUME_BYTES);
        assert_eq!(usable_bytes(range(1, 0).as_ref()).unwrap(), 4096);
        assert_eq!(usable_bytes(range(0, 8192).as_ref()).unwrap(), 8192);
        assert_eq!(usable_bytes(range(5000, 8192).as_ref()).unwrap(), 8192);
        let code = |r, l| usable_bytes(range(r, l).as_ref()).unwrap_err().code();
        assert_eq!(code(5000, 6000), tonic::Code::OutOfRange);
        assert_eq!(code(10, 5), tonic::Code::OutOfRange);
        assert_eq!(code(-1, 0), tonic::Code::InvalidArgument);
    }

    #[test]
    fn usable_of_disk_inverts_disk_bytes_for() {
        for usable in [4096, MIB, 5 * MIB + 4096, 1 << 30, 10 << 30] {
            for integrity in [Integrity::None, Integrity::HmacSha256 { journal: false }] {
                let disk = disk_bytes_for(usable, integrity);
                let back = usable_of_disk(disk, integrity);
                assert!(back >= usable, "{usable} {integrity:?}: {back}");
                assert!(back - usable < 2 * MIB, "{usable} {integrity:?}: {back}");
            }
        }
    }

    #[test]
    fn disks_leave_the_requested_usable_size() {
        for usable in [4096, MIB, 1 << 30, 10 << 30] {
            let plain = disk_bytes_for(usable, Integrity::None);
            assert!(plain - LUKS2_HEADER_BYTES >= usable);
            assert_eq!(plain % MIB, 0);
            let with = disk_bytes_for(usable, Integrity::HmacSha256 { journal: false });
            assert!(with > plain);
        }
    }
}
