//! GCP backend: persistent disks and snapshots through the Compute Engine API
//! (google-cloud-compute-v1, credentials from google-cloud-auth).
//!
//! - [`config`]: project, default zone, endpoint, credentials.
//! - [`compute`]: the clients, retries, operation waits, Compute errors → [`Error`].
//! - [`params`]: StorageClass parameters, resource names, zone choice.
//! - [`disks`]: disks (zonal and regional), resize, snapshots, restore, clone, list.
//! - [`attach`]: `instances.attachDisk` / `detachDisk`, node ids.
//! - [`node`]: the node side: the device of a disk, the VM from the metadata
//!   server, the attach limit of its machine type.
//! - [`machine`]: machine types: attach limits, Hyperdisk-only series.
//! - [`metadata`]: the metadata server client (its address shared through `cloud::gcp_metadata`).
//!
//! Ids: a volume is `gcp:<zone>:<disk>` or, for a regional disk,
//! `gcp:<region>:<disk>` (a region ends in a digit, a zone does not); a snapshot
//! is `gcp:global:<snapshot>`. A node is `<zone>.<instance>` (see [`attach`]).
//!
//! Ownership: every disk and snapshot this backend creates carries the labels
//! [`LABEL_DRIVER`] and [`LABEL_NAME`] (and [`LABEL_USABLE`]), and its description holds the CO's name,
//! the source and the driver's options as JSON. A resource without our label is
//! treated as absent: the backend never deletes, attaches or lists anything it
//! did not create.

pub mod attach;
pub mod compute;
pub mod config;
pub mod disks;
pub mod machine;
pub mod metadata;
pub mod params;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use google_cloud_auth::credentials::Credentials;

use super::{Disk, DiskBackend, DiskSpec, Error, Result, Snapshot, Topology};
use crate::volume::{BackendKind, SnapshotId, VolumeId};

pub use attach::{NodeName, PUBLISH_DEVICE_NAME};
pub use config::{COMPUTE_ENDPOINT_ENV, GcpConfig, Retry};
pub use params::TOPOLOGY_ZONE;

/// Label naming the driver that created a disk or snapshot (its name as a label
/// value: `cryptdisk.csi.io` is `cryptdisk_csi_io`).
pub const LABEL_DRIVER: &str = "cryptdisk-csi-driver";
/// Label holding the CO's name (Kubernetes: the PV or VolumeSnapshotContent
/// name), as a label value.
pub const LABEL_NAME: &str = "cryptdisk-csi-name";
/// Label holding the usable size in bytes the CO holds a volume as (of a
/// snapshot: its source's when taken), which the disk's whole GiB cannot tell.
/// A label because a disk's description cannot change after creation and this
/// does, on expansion.
pub const LABEL_USABLE: &str = "cryptdisk-csi-usable-bytes";
/// The location of snapshot ids: snapshots are global resources.
pub const SNAPSHOT_LOCATION: &str = "global";

/// The GCP backend. It holds Google credentials inside its clients, so it has no
/// `Debug`.
pub struct GcpBackend {
    config: GcpConfig,
    compute: compute::Compute,
    driver_label: String,
}

impl GcpBackend {
    /// Builds the Compute clients with `credentials` (for production
    /// [`config::application_default_credentials`]).
    pub async fn connect(config: GcpConfig, credentials: Credentials) -> Result<Self> {
        config.check()?;
        let compute = compute::Compute::connect(&config, credentials).await?;
        let driver_label = params::label_value(&config.driver_name);
        Ok(GcpBackend {
            config,
            compute,
            driver_label,
        })
    }

    pub fn config(&self) -> &GcpConfig {
        &self.config
    }

    fn project(&self) -> &str {
        &self.config.project
    }

    /// INVALID_ARGUMENT unless `id` is a gcp volume id (a routing error).
    fn own_volume(&self, id: &VolumeId) -> Result<()> {
        if id.backend() != BackendKind::Gcp {
            return Err(Error::InvalidArgument(format!(
                "volume {id} is not a gcp volume"
            )));
        }
        Ok(())
    }

    fn own_snapshot(&self, id: &SnapshotId) -> Result<()> {
        if id.backend() != BackendKind::Gcp || id.location() != SNAPSHOT_LOCATION {
            return Err(Error::InvalidArgument(format!(
                "snapshot {id} is not a gcp snapshot (gcp:{SNAPSHOT_LOCATION}:<name>)"
            )));
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl DiskBackend for GcpBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Gcp
    }

    fn validate_parameters(&self, params: &BTreeMap<String, String>) -> Result<()> {
        params::DiskParams::parse(params).map(|_| ())
    }

    async fn create_disk(&self, spec: &DiskSpec) -> Result<Disk> {
        self.create(spec).await
    }

    async fn delete_disk(&self, id: &VolumeId) -> Result<()> {
        self.own_volume(id)?;
        self.delete(id).await
    }

    async fn get_disk(&self, id: &VolumeId) -> Result<Option<Disk>> {
        self.own_volume(id)?;
        Ok(self.find_disk(id).await?.map(|d| d.disk))
    }

    async fn list_disks(
        &self,
        starting_token: Option<&str>,
        max_entries: u32,
    ) -> Result<(Vec<Disk>, Option<String>)> {
        self.list(starting_token, max_entries).await
    }

    async fn attach(
        &self,
        id: &VolumeId,
        node_id: &str,
        read_only: bool,
    ) -> Result<BTreeMap<String, String>> {
        self.own_volume(id)?;
        self.attach_disk(id, node_id, read_only).await
    }

    async fn takes_over_attachment(&self, id: &VolumeId) -> Result<bool> {
        self.own_volume(id)?;
        Ok(self.find_disk(id).await?.is_some_and(|d| d.force_attach()))
    }

    async fn detach(&self, id: &VolumeId, node_id: &str) -> Result<()> {
        self.own_volume(id)?;
        self.detach_disk(id, node_id).await
    }

    async fn detach_ending_fresh(&self, id: &VolumeId, node_id: &str) -> Result<()> {
        self.own_volume(id)?;
        self.clear_fresh_label(id).await?;
        crate::failpoint::hit("unpublish:fresh-cleared");
        self.detach_disk(id, node_id).await
    }

    async fn expand(&self, id: &VolumeId, new_capacity_bytes: u64) -> Result<u64> {
        self.own_volume(id)?;
        self.resize(id, new_capacity_bytes).await
    }

    async fn record_usable(&self, id: &VolumeId, usable_bytes: u64) -> Result<()> {
        self.own_volume(id)?;
        self.set_usable(id, usable_bytes).await
    }

    async fn create_snapshot(&self, source: &VolumeId, name: &str) -> Result<Snapshot> {
        self.own_volume(source)?;
        self.snapshot(source, name).await
    }

    async fn delete_snapshot(&self, id: &SnapshotId) -> Result<()> {
        self.own_snapshot(id)?;
        self.remove_snapshot(id).await
    }

    async fn get_snapshot(&self, id: &SnapshotId) -> Result<Option<Snapshot>> {
        self.own_snapshot(id)?;
        self.find_snapshot(id.snapshot()).await
    }

    async fn list_snapshots(
        &self,
        source: Option<&VolumeId>,
        snapshot_id: Option<&SnapshotId>,
        starting_token: Option<&str>,
        max_entries: u32,
    ) -> Result<(Vec<Snapshot>, Option<String>)> {
        self.snapshots_page(source, snapshot_id, starting_token, max_entries)
            .await
    }

    /// Compute has no "free space"; a zone we can create in offers the largest
    /// disk (quota permitting), any other topology nothing.
    async fn capacity(
        &self,
        params: &BTreeMap<String, String>,
        topology: Option<&Topology>,
    ) -> Result<u64> {
        params::DiskParams::parse(params)?;
        let ok = match topology {
            None => true,
            Some(t) => t.get(TOPOLOGY_ZONE).is_some_and(|z| params::is_zone(z)),
        };
        Ok(if ok {
            self.max_volume_bytes().unwrap_or(0)
        } else {
            0
        })
    }

    fn accessible_topology(&self) -> Vec<Topology> {
        vec![Topology::from([(
            TOPOLOGY_ZONE.to_string(),
            self.config.default_zone.clone(),
        )])]
    }

    fn max_volume_bytes(&self) -> Option<u64> {
        Some(params::MAX_DISK_GIB << 30)
    }
}
