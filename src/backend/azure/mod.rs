//! Azure backend: managed disks through the Azure Resource Manager REST API.
//!
//! Azure has no maintained Rust management SDK, so this module speaks ARM's
//! REST API directly ([`arm`]: reqwest + rustls, tokens from `azure_identity`
//! in [`auth`], configured by [`config`] from azure.json and the environment).
//!
//! - **Volume ids** are `azure:<resource group>:<disk name>`, snapshot ids
//!   `azure:<resource group>:<snapshot name>`. The resource group is the one part
//!   of a disk's ARM id that can differ between disks (a StorageClass may name
//!   one with `resourceGroup`); the subscription is the controller's, so
//!   `/subscriptions/<config>/resourceGroups/<location>/providers/Microsoft.Compute/disks/<name>`
//!   is recovered from the id and the configuration alone, and the id stays
//!   short and free of `/`. Resource groups holding `(` or `)`, which ARM allows,
//!   cannot be served.
//! - **Names** derive from the CO's name ([`disks::resource_name`]), so a retried
//!   CreateVolume finds the disk it created; tags record the CO name, the driver
//!   name and the volume options ([`disks::TAG_NAME`] and friends).
//! - **Topology**: a zonal disk is accessible from `topology.cryptdisk.csi.io/zone`
//!   = `<location>-<zone>`, the value the node plugin reads from IMDS; a disk in
//!   no zone from `zone=""`, what nodes in no zone publish (ARM attaches it to
//!   VMs in no zone only); a zone-redundant disk (`Premium_ZRS`,
//!   `StandardSSD_ZRS`) reports no topology (accessible from every node).
//! - **Attach** ([`vm`]) updates the VM (standalone, an instance of a Flexible
//!   scale set, which is an ordinary VM, or with `vmType: vmss` an instance of a
//!   Uniform scale set, node id `<scale set>_<instance id>`) with a data disk at
//!   the lowest free LUN; attaches to one VM are serialized here, since ARM
//!   refuses concurrent updates of one VM. The LUN goes to the node in the publish
//!   context under [`PUBLISH_LUN`]; the node finds the device by it ([`device`]).
//!
//! ARM operations and api-versions used (the fake in `fake.rs` checks them):
//!
//! | operation | method and path | api-version |
//! |---|---|---|
//! | Disks: get, create or update, update, delete, list by resource group | `GET`/`PUT`/`PATCH`/`DELETE` `.../providers/Microsoft.Compute/disks[/{name}]` | [`DISKS_API_VERSION`] |
//! | Snapshots: get, create (incremental), delete, list by resource group | `GET`/`PUT`/`DELETE` `.../providers/Microsoft.Compute/snapshots[/{name}]` | [`DISKS_API_VERSION`] |
//! | Virtual machines: get, update (data disks) | `GET`/`PATCH` `.../providers/Microsoft.Compute/virtualMachines/{name}` | [`VM_API_VERSION`] |
//! | Scale set VMs (Uniform): get, update (data disks) | `GET`/`PUT` `.../providers/Microsoft.Compute/virtualMachineScaleSets/{ss}/virtualMachines/{instance id}` | [`VM_API_VERSION`] |
//! | long-running operations | `GET` of `Azure-AsyncOperation` or `Location` | as handed out |
//! | IMDS instance metadata (node) | `GET /metadata/instance` | [`imds::IMDS_INSTANCE_API_VERSION`] |

pub mod arm;
pub mod auth;
pub mod config;
pub mod disks;
pub mod imds;
mod vm;

#[cfg(test)]
pub(crate) mod fake;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use azure_core::credentials::TokenCredential;
use reqwest::Method;
use serde_json::json;

use self::arm::ArmClient;
use self::config::AzureConfig;
use self::disks::*;
use crate::backend::{
    Disk, DiskBackend, DiskSource, DiskSpec, Error, Result, Snapshot, Topology,
    TopologyRequirement, check_token, paginate,
};
use crate::volume::{BackendKind, FreshRecord, SnapshotId, VolumeId, fresh};

/// api-version of Microsoft.Compute disks and snapshots (the DiskRP).
pub const DISKS_API_VERSION: &str = "2024-03-02";
/// api-version of Microsoft.Compute virtualMachines.
pub const VM_API_VERSION: &str = "2024-07-01";
pub use crate::csi::contract::AZURE_LUN as PUBLISH_LUN;
pub use disks::TOPOLOGY_ZONE;

pub struct AzureBackend {
    arm: ArmClient,
    subscription: String,
    resource_group: String,
    location: String,
    driver: String,
    /// How node ids name VMs (standalone, Uniform or Flexible scale sets).
    vm_type: config::VmType,
    /// One lock per VM: its data-disk list is read, changed and written whole.
    vm_locks: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl AzureBackend {
    /// The backend for `config`, with the credential it names.
    pub fn new(config: &AzureConfig) -> Result<Self> {
        let http = Self::http_client(config)?;
        // Managed identity tokens come from IMDS, which is reached directly: a
        // proxy from the environment must not see them.
        let token_http = match config.credentials {
            config::Credentials::ManagedIdentity { .. } => crate::cloud::http_client_builder()
                .timeout(config.request_timeout)
                .redirect(reqwest::redirect::Policy::none())
                .no_proxy()
                .build()
                .map_err(|e| Error::Internal(format!("cannot build an HTTP client: {e}")))?,
            _ => http.clone(),
        };
        let credential = auth::credential(config, Arc::new(auth::ReqwestTransport(token_http)))?;
        tracing::info!(
            subscription = %config.subscription_id,
            resource_group = %config.resource_group,
            location = %config.location,
            credentials = config.credentials.describe(),
            "Azure backend"
        );
        Ok(Self::with_credential(config, http, credential))
    }

    /// As [`new`](Self::new) with a given token credential.
    pub fn with_credential(
        config: &AzureConfig,
        http: reqwest::Client,
        credential: Arc<dyn TokenCredential>,
    ) -> Self {
        AzureBackend {
            arm: ArmClient::new(
                http,
                &config.arm_endpoint,
                credential,
                config.arm_scope(),
                config.retry.clone(),
                config.poll_interval,
                config.operation_timeout,
            ),
            subscription: config.subscription_id.clone(),
            resource_group: config.resource_group.clone(),
            location: config.location.clone(),
            driver: config.driver_name.clone(),
            vm_type: config.vm_type,
            vm_locks: Default::default(),
        }
    }

    /// The HTTP client of ARM and of token requests: time-limited, no redirects
    /// (a bearer token must not follow one).
    pub fn http_client(config: &AzureConfig) -> Result<reqwest::Client> {
        crate::cloud::http_client_builder()
            .timeout(config.request_timeout)
            .connect_timeout(config.request_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| Error::Internal(format!("cannot build an HTTP client: {e}")))
    }

    fn ours<'a, I: IdParts>(&self, id: &'a I) -> Result<&'a I> {
        if id.kind() != BackendKind::Azure {
            return Err(Error::InvalidArgument(format!(
                "{} belongs to the {} backend, not azure",
                id.text(),
                id.kind()
            )));
        }
        Ok(id)
    }

    fn disk_path(&self, id: &VolumeId) -> String {
        disk_path(&self.subscription, id.location(), id.disk())
    }

    fn snapshot_path(&self, id: &SnapshotId) -> String {
        snapshot_path(&self.subscription, id.location(), id.snapshot())
    }

    async fn get_disk_json(&self, id: &VolumeId) -> Result<Option<serde_json::Value>> {
        self.arm.get(&self.disk_path(id), DISKS_API_VERSION).await
    }

    /// The zone a new disk of `sku` goes to: the first preferred topology the
    /// requisite admits, else the first requisite one; `None` (no zone) for a
    /// topology whose zone is empty (nodes in no zone), when nothing asks for
    /// a zone, and always for zone-redundant SKUs. Premium SSD v2 and Ultra
    /// exist only in a zone: a topology without one is passed over, and
    /// nothing to pick from is an error.
    fn pick_zone(&self, req: Option<&TopologyRequirement>, sku: Sku) -> Result<Option<String>> {
        if sku.is_zone_redundant() {
            return Ok(None);
        }
        let Some(req) = req.filter(|r| !r.requisite.is_empty() || !r.preferred.is_empty()) else {
            if sku.needs_zone() {
                return Err(Error::InvalidArgument(format!(
                    "{} disks exist only in an availability zone, and no topology names one: \
                     use volumeBindingMode WaitForFirstConsumer or allowedTopologies with {}",
                    sku.as_str(),
                    TOPOLOGY_ZONE
                )));
            }
            return Ok(None);
        };
        let prefix = format!("{}-", self.location);
        // Some(zone) for a topology a disk can be created for: Some(None) for
        // no zone, None for another region's zone (or no zone for a SKU that
        // needs one).
        let zone = |t: &Topology| -> Option<Option<String>> {
            match t.get(TOPOLOGY_ZONE).map(String::as_str) {
                // A segment map without our key does not constrain the zone.
                None if sku.needs_zone() => None,
                None => Some(None),
                Some("") if sku.needs_zone() => None,
                Some("") => Some(None),
                Some(v) => v.strip_prefix(&prefix).map(|z| Some(z.to_string())),
            }
        };
        for t in &req.preferred {
            if req.admits(t)
                && let Some(z) = zone(t)
            {
                return Ok(z);
            }
        }
        for t in &req.requisite {
            if let Some(z) = zone(t) {
                return Ok(z);
            }
        }
        if req.requisite.is_empty() && !sku.needs_zone() {
            return Ok(None);
        }
        Err(Error::ResourceExhausted(format!(
            "none of the requisite topologies {:?} is a zone of {}, where this controller \
             creates disks{}",
            req.requisite,
            self.location,
            if sku.needs_zone() {
                format!(" ({} disks exist only in a zone)", sku.as_str())
            } else {
                String::new()
            }
        )))
    }

    /// Where a clone or restore copies from: its ARM id, its size in bytes,
    /// and for a clone of a zonal disk that disk's zone, which the copy must be
    /// in (ARM copies a zonal disk only within its zone). A snapshot can be
    /// restored into any zone of its region.
    async fn resolve_source(&self, source: &DiskSource) -> Result<(String, u64, Option<String>)> {
        match source {
            DiskSource::Snapshot(id) => {
                self.ours(id)?;
                let snap = self
                    .arm
                    .get(&self.snapshot_path(id), DISKS_API_VERSION)
                    .await?
                    .ok_or_else(|| {
                        Error::NotFound(format!("source snapshot {id} does not exist"))
                    })?;
                let parsed = to_snapshot(&snap, &self.driver).ok_or_else(|| {
                    Error::NotFound(format!("source snapshot {id} was not made by this driver"))
                })?;
                if !parsed.ready {
                    return Err(Error::Unavailable(format!(
                        "source snapshot {id} is not ready to restore from yet"
                    )));
                }
                Ok((self.snapshot_path(id), parsed.size_bytes, None))
            }
            DiskSource::Disk(id) => {
                self.ours(id)?;
                let disk = self
                    .get_disk_json(id)
                    .await?
                    .ok_or_else(|| Error::NotFound(format!("source volume {id} does not exist")))?;
                Ok((
                    self.disk_path(id),
                    size_gib_of(&disk) * GIB,
                    zone_of(&disk).map(str::to_string),
                ))
            }
        }
    }

    /// A new disk's tags: [`Self::tags`], and for an empty disk the fresh-disk
    /// record, set in the same PUT that creates it.
    fn disk_tags(&self, spec: &DiskSpec) -> Result<BTreeMap<&'static str, String>> {
        let mut tags = self.tags(&spec.name, &spec.options, Some(spec.usable_bytes))?;
        if spec.source.is_none() {
            tags.insert(fresh::DISK_KEY, FreshRecord::new_random().to_string());
        }
        if let Some(scope) = &spec.key_scope {
            tags.insert(TAG_SCOPE, scope.clone());
        }
        Ok(tags)
    }

    /// Removes the fresh-disk record tag. ARM's PATCH replaces the whole tag
    /// map, so the others are written back as read.
    async fn clear_fresh_tag(&self, id: &VolumeId, disk: &serde_json::Value) -> Result<()> {
        let Some(tags) = disk.get("tags").and_then(|t| t.as_object()) else {
            return Ok(());
        };
        let kept: serde_json::Map<String, serde_json::Value> = tags
            .iter()
            .filter(|(k, _)| !k.eq_ignore_ascii_case(fresh::DISK_KEY))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let body = json!({ "tags": kept });
        self.arm
            .write(Method::PATCH, &self.disk_path(id), DISKS_API_VERSION, &body)
            .await?;
        tracing::info!(volume = %id, "fresh-disk record cleared");
        Ok(())
    }

    fn tags(
        &self,
        name: &str,
        options: &BTreeMap<String, String>,
        usable_bytes: Option<u64>,
    ) -> Result<BTreeMap<&'static str, String>> {
        let mut tags = BTreeMap::from([
            (TAG_NAME, name.to_string()),
            (TAG_CREATED_BY, self.driver.clone()),
            (TAG_OPTIONS, options_tag(options)?),
        ]);
        if let Some(bytes) = usable_bytes {
            tags.insert(TAG_USABLE, bytes.to_string());
        }
        Ok(tags)
    }
}

/// What [`AzureBackend::ours`] needs of a volume or snapshot id.
trait IdParts {
    fn kind(&self) -> BackendKind;
    fn text(&self) -> String;
}

impl IdParts for VolumeId {
    fn kind(&self) -> BackendKind {
        self.backend()
    }
    fn text(&self) -> String {
        format!("volume {self}")
    }
}

impl IdParts for SnapshotId {
    fn kind(&self) -> BackendKind {
        self.backend()
    }
    fn text(&self) -> String {
        format!("snapshot {self}")
    }
}

#[async_trait::async_trait]
impl DiskBackend for AzureBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Azure
    }

    fn validate_parameters(&self, params: &BTreeMap<String, String>) -> Result<()> {
        DiskParams::parse(params).map(|_| ())
    }

    async fn create_disk(&self, spec: &DiskSpec) -> Result<Disk> {
        let params = DiskParams::parse(&spec.parameters)?;
        let rg = params
            .resource_group
            .clone()
            .unwrap_or_else(|| self.resource_group.clone());
        let name = resource_name(&spec.name);
        let id = VolumeId::new(BackendKind::Azure, &rg, &name)?;
        let source = match &spec.source {
            Some(s) => Some(self.resolve_source(s).await?),
            None => None,
        };
        let zone = match source.as_ref().and_then(|(_, _, z)| z.as_deref()) {
            // A clone stays in its source's zone: the requested topology must
            // admit it (as the GCP backend requires of a zonal source).
            Some(z) => {
                let here = zone_topology(&self.location, z);
                if let Some(req) = &spec.accessibility
                    && !req.admits(&here)
                {
                    return Err(Error::ResourceExhausted(format!(
                        "the source volume is in zone {}, which none of the requisite topologies \
                         {:?} admits; Azure copies a zonal disk only within its zone",
                        here[TOPOLOGY_ZONE], req.requisite
                    )));
                }
                Some(z.to_string())
            }
            None => self.pick_zone(spec.accessibility.as_ref(), params.sku)?,
        };
        let source_bytes = source.as_ref().map_or(0, |(_, b, _)| *b);
        // The source's size is whole GiB already: compare what the request rounds to.
        if spec.capacity_bytes != 0
            && params.sku.round_gib(spec.capacity_bytes)? * GIB < source_bytes
        {
            return Err(Error::OutOfRange(format!(
                "the source holds {source_bytes} bytes, more than the {} requested",
                spec.capacity_bytes
            )));
        }
        let gib = params
            .sku
            .round_gib(spec.capacity_bytes.max(source_bytes))?;

        if let Some(existing) = self.get_disk_json(&id).await? {
            let Some(disk) = to_disk(&existing, &self.driver, &self.location) else {
                return Err(Error::AlreadyExists(format!(
                    "disk {name} in resource group {rg} exists but was not created by {}",
                    self.driver
                )));
            };
            let mut differences = Vec::new();
            if disk.name != spec.name {
                differences.push(format!("it was created for {:?}", disk.name));
            }
            if sku_of(&existing) != Some(params.sku) {
                differences.push(format!(
                    "its SKU is {}",
                    str_at(&existing, "/sku/name").unwrap_or("unknown")
                ));
            }
            if size_gib_of(&existing) != gib {
                differences.push(format!("it has {} GiB, not {gib}", size_gib_of(&existing)));
            }
            if disk.source != spec.source {
                differences.push(format!("its source is {:?}", disk.source));
            }
            let topology_ok = match &spec.accessibility {
                Some(req) => {
                    disk.topology.is_empty() || disk.topology.iter().any(|t| req.admits(t))
                }
                None => true,
            };
            if !topology_ok {
                differences.push(format!("it is in {:?}", disk.topology));
            }
            if !differences.is_empty() {
                return Err(Error::AlreadyExists(format!(
                    "volume {:?} exists as disk {id} but differs: {}",
                    spec.name,
                    differences.join("; ")
                )));
            }
            let state = str_at(&existing, "/properties/provisioningState").unwrap_or("Succeeded");
            if state.eq_ignore_ascii_case("Succeeded") {
                return Ok(disk);
            }
            // A creation that failed is tried again: the PUT below is ARM's
            // create-or-update, with the same body.
            if !state.eq_ignore_ascii_case("Failed") {
                return Err(Error::Aborted(format!(
                    "disk {id} is {state}; retry when it is done"
                )));
            }
            tracing::warn!(volume = %id, "the disk's creation failed before; trying again");
        }

        let body = disk_body(
            &self.location,
            zone.as_deref(),
            &params,
            gib,
            source.as_ref().map(|(arm_id, _, _)| arm_id.as_str()),
            &self.disk_tags(spec)?,
        );
        let created = self
            .arm
            .write(Method::PUT, &self.disk_path(&id), DISKS_API_VERSION, &body)
            .await?;
        tracing::info!(volume = %id, gib, sku = params.sku.as_str(), zone = ?zone, "disk created");
        to_disk(&created, &self.driver, &self.location).ok_or_else(|| {
            Error::Internal(format!(
                "ARM answered the creation of {id} with an unexpected disk"
            ))
        })
    }

    async fn delete_disk(&self, id: &VolumeId) -> Result<()> {
        self.ours(id)?;
        let Some(existing) = self.get_disk_json(id).await? else {
            return Ok(());
        };
        let Some(disk) = to_disk(&existing, &self.driver, &self.location) else {
            return Err(Error::FailedPrecondition(format!(
                "disk {id} was not created by {}; not deleting it",
                self.driver
            )));
        };
        if !disk.attached_to.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "volume {id} is attached to {:?}; unpublish it first",
                disk.attached_to
            )));
        }
        self.arm
            .delete(&self.disk_path(id), DISKS_API_VERSION)
            .await?;
        tracing::info!(volume = %id, "disk deleted");
        Ok(())
    }

    async fn get_disk(&self, id: &VolumeId) -> Result<Option<Disk>> {
        self.ours(id)?;
        Ok(self
            .get_disk_json(id)
            .await?
            .and_then(|d| to_disk(&d, &self.driver, &self.location)))
    }

    async fn list_disks(
        &self,
        starting_token: Option<&str>,
        max_entries: u32,
    ) -> Result<(Vec<Disk>, Option<String>)> {
        let start = check_token(starting_token, |t| {
            t.parse::<VolumeId>()
                .is_ok_and(|id| id.backend() == BackendKind::Azure)
        })?;
        let all = self
            .arm
            .list(
                &disks_path(&self.subscription, &self.resource_group),
                DISKS_API_VERSION,
            )
            .await?;
        let mut disks: Vec<(String, Disk)> = all
            .iter()
            .filter_map(|d| to_disk(d, &self.driver, &self.location))
            .map(|d| (d.id.to_string(), d))
            .collect();
        disks.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(paginate(disks, start, max_entries))
    }

    async fn attach(
        &self,
        id: &VolumeId,
        node_id: &str,
        _read_only: bool,
    ) -> Result<BTreeMap<String, String>> {
        self.ours(id)?;
        // Azure attaches data disks read-write only; the node mounts read-only.
        let lun = self.attach_disk(id, node_id).await?;
        Ok(BTreeMap::from([(PUBLISH_LUN.to_string(), lun.to_string())]))
    }

    async fn detach(&self, id: &VolumeId, node_id: &str) -> Result<()> {
        self.ours(id)?;
        self.detach_disk(id, node_id).await
    }

    async fn detach_ending_fresh(&self, id: &VolumeId, node_id: &str) -> Result<()> {
        self.ours(id)?;
        if let Some(disk) = self.get_disk_json(id).await?
            && tag(&disk, fresh::DISK_KEY).is_some()
        {
            self.clear_fresh_tag(id, &disk).await?;
        }
        crate::failpoint::hit("unpublish:fresh-cleared");
        self.detach_disk(id, node_id).await
    }

    async fn expand(&self, id: &VolumeId, new_capacity_bytes: u64) -> Result<u64> {
        self.ours(id)?;
        let existing = self
            .get_disk_json(id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("volume {id} does not exist")))?;
        let sku = sku_of(&existing).unwrap_or(Sku::DEFAULT);
        let current = size_gib_of(&existing);
        let wanted = sku.round_gib(new_capacity_bytes)?;
        if wanted < current {
            return Err(Error::InvalidArgument(format!(
                "volume {id} has {current} GiB; disks do not shrink to {wanted} GiB"
            )));
        }
        if wanted == current {
            return Ok(current * GIB);
        }
        if !attached_vms(&existing).is_empty() && !sku.grows_online(current, wanted) {
            return Err(Error::FailedPrecondition(format!(
                "{} disk {id} cannot grow from {current} GiB past 4 TiB while attached; \
                 stop the pod using it (the disk is then detached) and retry",
                sku.as_str()
            )));
        }
        let body = json!({"properties": {"diskSizeGB": wanted}});
        let updated = self
            .arm
            .write(Method::PATCH, &self.disk_path(id), DISKS_API_VERSION, &body)
            .await?;
        let now = size_gib_of(&updated);
        tracing::info!(volume = %id, from = current, to = now, "disk grown");
        Ok(now.max(wanted) * GIB)
    }

    async fn record_usable(&self, id: &VolumeId, usable_bytes: u64) -> Result<()> {
        self.ours(id)?;
        let existing = self
            .get_disk_json(id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("volume {id} does not exist")))?;
        if to_disk(&existing, &self.driver, &self.location)
            .is_some_and(|d| d.usable_bytes == Some(usable_bytes))
        {
            return Ok(());
        }
        // A PATCH's tags replace the resource's whole set: send them all.
        let mut tags = existing
            .get("tags")
            .and_then(serde_json::Value::as_object)
            .cloned()
            .unwrap_or_default();
        tags.retain(|k, _| !k.eq_ignore_ascii_case(TAG_USABLE));
        tags.insert(TAG_USABLE.to_string(), json!(usable_bytes.to_string()));
        self.arm
            .write(
                Method::PATCH,
                &self.disk_path(id),
                DISKS_API_VERSION,
                &json!({ "tags": tags }),
            )
            .await?;
        tracing::info!(volume = %id, usable_bytes, "usable size recorded");
        Ok(())
    }

    async fn create_snapshot(&self, source: &VolumeId, name: &str) -> Result<Snapshot> {
        self.ours(source)?;
        let id = SnapshotId::new(BackendKind::Azure, source.location(), resource_name(name))?;
        let path = self.snapshot_path(&id);
        if let Some(existing) = self.arm.get(&path, DISKS_API_VERSION).await? {
            return match to_snapshot(&existing, &self.driver) {
                Some(s) if s.name == name && &s.source == source => Ok(s),
                Some(s) => Err(Error::AlreadyExists(format!(
                    "snapshot {name:?} exists for volume {} ({:?}), not {source}",
                    s.source, s.name
                ))),
                None => Err(Error::AlreadyExists(format!(
                    "snapshot {id} exists but was not created by {}",
                    self.driver
                ))),
            };
        }
        let disk = self
            .get_disk_json(source)
            .await?
            .and_then(|d| to_disk(&d, &self.driver, &self.location))
            .ok_or_else(|| Error::NotFound(format!("source volume {source} does not exist")))?;
        let mut tags = self.tags(name, &disk.options, disk.usable_bytes)?;
        tags.insert(TAG_SOURCE, source.to_string());
        tags.insert(TAG_SCOPE, disk.scope());
        let body = json!({
            "location": self.location,
            "tags": tags,
            "properties": {
                "creationData": {"createOption": "Copy", "sourceResourceId": self.disk_path(source)},
                "incremental": true,
            },
        });
        let created = self
            .arm
            .write(Method::PUT, &path, DISKS_API_VERSION, &body)
            .await?;
        tracing::info!(snapshot = %id, %source, "snapshot created");
        to_snapshot(&created, &self.driver).ok_or_else(|| {
            Error::Internal(format!(
                "ARM answered the creation of {id} with an unexpected snapshot"
            ))
        })
    }

    async fn delete_snapshot(&self, id: &SnapshotId) -> Result<()> {
        self.ours(id)?;
        let path = self.snapshot_path(id);
        let Some(existing) = self.arm.get(&path, DISKS_API_VERSION).await? else {
            return Ok(());
        };
        if to_snapshot(&existing, &self.driver).is_none() {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {id} was not created by {}; not deleting it",
                self.driver
            )));
        }
        self.arm.delete(&path, DISKS_API_VERSION).await
    }

    async fn get_snapshot(&self, id: &SnapshotId) -> Result<Option<Snapshot>> {
        self.ours(id)?;
        Ok(self
            .arm
            .get(&self.snapshot_path(id), DISKS_API_VERSION)
            .await?
            .and_then(|s| to_snapshot(&s, &self.driver)))
    }

    async fn list_snapshots(
        &self,
        source: Option<&VolumeId>,
        snapshot_id: Option<&SnapshotId>,
        starting_token: Option<&str>,
        max_entries: u32,
    ) -> Result<(Vec<Snapshot>, Option<String>)> {
        let start = check_token(starting_token, |t| {
            t.parse::<SnapshotId>()
                .is_ok_and(|id| id.backend() == BackendKind::Azure)
        })?;
        let mut snaps: Vec<Snapshot> = match snapshot_id {
            Some(id) if id.backend() != BackendKind::Azure => Vec::new(),
            Some(id) => self.get_snapshot(id).await?.into_iter().collect(),
            None => {
                let rg = source.map_or(self.resource_group.as_str(), |s| s.location());
                self.arm
                    .list(&snapshots_path(&self.subscription, rg), DISKS_API_VERSION)
                    .await?
                    .iter()
                    .filter_map(|s| to_snapshot(s, &self.driver))
                    .collect()
            }
        };
        if let Some(source) = source {
            snaps.retain(|s| &s.source == source);
        }
        let mut keyed: Vec<(String, Snapshot)> =
            snaps.into_iter().map(|s| (s.id.to_string(), s)).collect();
        keyed.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(paginate(keyed, start, max_entries))
    }

    async fn capacity(
        &self,
        params: &BTreeMap<String, String>,
        topology: Option<&Topology>,
    ) -> Result<u64> {
        DiskParams::parse(params)?;
        let prefix = format!("{}-", self.location);
        // Nodes in no zone publish the key with an empty value.
        if let Some(zone) = topology.and_then(|t| t.get(TOPOLOGY_ZONE))
            && !zone.is_empty()
            && !zone.starts_with(&prefix)
        {
            return Ok(0);
        }
        // Managed disks have no pool to run out of; quota errors come at creation.
        Ok(i64::MAX as u64)
    }

    fn accessible_topology(&self) -> Vec<Topology> {
        // Regional disks are reachable from every zone of the region.
        Vec::new()
    }

    fn max_volume_bytes(&self) -> Option<u64> {
        Some(
            Sku::ALL
                .iter()
                .map(|s| s.size_limits_gib().1)
                .max()
                .unwrap_or(0)
                * GIB,
        )
    }
}
