//! Attaching disks to VMs: `instances.attachDisk` / `instances.detachDisk`, and
//! the node ids that name the VMs.
//!
//! A node id is `<zone>.<instance>`. ControllerPublishVolume hands the
//! controller nothing but the node id, and `instances.attachDisk` needs the
//! instance's zone as well as its name; an instance name is unique only within
//! its zone, so the name alone would need an aggregated search of the project
//! on every publish and could still be ambiguous. Neither zones nor instance
//! names contain a dot, so the pair splits back exactly, and it passes CSI's
//! node-id rules (printable ASCII, no slash, at most 128 bytes). This is what
//! the PD CSI driver does with `projects/P/zones/Z/instances/N`, minus the
//! slashes this driver's node ids may not contain.
//!
//! The device name given to `attachDisk` is the disk's name, so the guest's
//! udev makes `/dev/disk/by-id/google-<disk>`; the device name actually in use
//! (which differs only for a disk someone attached by hand) is what the publish
//! context carries, under [`PUBLISH_DEVICE_NAME`]; the node uses a device only
//! when that name is the volume id's disk, so a disk attached by hand under
//! another name is refused there (FAILED_PRECONDITION) rather than trusted.
//!
//! Before it asks, an attach of a Persistent Disk (`pd-*`) to a machine series
//! that takes Hyperdisk only ([`super::machine::hyperdisk_only`]) is refused
//! with INVALID_ARGUMENT. A regional disk made with `availability-class:
//! regional-hard-failover` is attached with `forceAttach`, which takes it
//! from a VM of the other zone that still holds it (a zone failing over).

use std::collections::BTreeMap;
use std::fmt;

use google_cloud_compute_v1::model::{self, attached_disk};

use super::super::{Error, Result};
use super::GcpBackend;
use super::compute::{Kind, gone_is_done};
use super::disks::relative;
use super::metadata::last_segment;
use super::{machine, params};
use crate::volume::VolumeId;

pub use crate::csi::contract::GCP_DEVICE_NAME as PUBLISH_DEVICE_NAME;

/// A VM as a node id names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeName {
    pub zone: String,
    pub instance: String,
}

impl NodeName {
    /// `<zone>.<instance>`, or `None`.
    pub fn parse(node_id: &str) -> Option<Self> {
        let (zone, instance) = node_id.split_once('.')?;
        (params::is_zone(zone) && params::is_resource_name(instance)).then(|| NodeName {
            zone: zone.to_string(),
            instance: instance.to_string(),
        })
    }

    /// The node of an instance link (`…/projects/P/zones/Z/instances/N`).
    pub fn from_instance_url(url: &str) -> Option<Self> {
        let parts: Vec<&str> = relative(url).split('/').collect();
        match parts.as_slice() {
            ["projects", _, "zones", zone, "instances", instance] => {
                NodeName::parse(&format!("{zone}.{instance}"))
            }
            _ => None,
        }
    }
}

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.zone, self.instance)
    }
}

fn publish_context(device: &str) -> BTreeMap<String, String> {
    BTreeMap::from([(PUBLISH_DEVICE_NAME.to_string(), device.to_string())])
}

/// The disk `path` as attached to `instance`, if it is.
fn attached<'a>(instance: &'a model::Instance, path: &str) -> Option<&'a model::AttachedDisk> {
    instance
        .disks
        .iter()
        .find(|d| d.source.as_deref().map(relative) == Some(path))
}

impl GcpBackend {
    async fn instance(&self, node: &NodeName) -> Result<Option<model::Instance>> {
        let what = format!("getting instance {} in {}", node.instance, node.zone);
        let p = self.project();
        match self
            .compute
            .call(&what, || {
                self.compute
                    .instances
                    .get()
                    .set_project(p)
                    .set_zone(&node.zone)
                    .set_instance(&node.instance)
                    .send()
            })
            .await
        {
            Ok(i) => Ok(Some(i)),
            Err(e) if e.kind == Kind::NotFound => Ok(None),
            Err(e) => Err(e.into_error(&what)),
        }
    }

    pub(super) async fn attach_disk(
        &self,
        id: &VolumeId,
        node_id: &str,
        read_only: bool,
    ) -> Result<BTreeMap<String, String>> {
        let node = NodeName::parse(node_id).ok_or_else(|| {
            Error::NotFound(format!(
                "node {node_id:?} is not a node of the gcp backend, whose node ids are \
                 <zone>.<instance>"
            ))
        })?;
        let found = self
            .find_disk(id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("volume {id} does not exist")))?;
        let zones = found.zones();
        if !zones.contains(&node.zone) {
            return Err(Error::FailedPrecondition(format!(
                "volume {id} is in zones {zones:?}; node {node} is in {}, where it cannot be \
                 attached",
                node.zone
            )));
        }
        let path = found.path(self.project());
        let mode = if read_only {
            attached_disk::Mode::ReadOnly
        } else {
            attached_disk::Mode::ReadWrite
        };
        let instance = self
            .instance(&node)
            .await?
            .ok_or_else(|| Error::NotFound(format!("node {node}: no such instance")))?;
        if let Some(done) = attached(&instance, &path) {
            return self.already_attached(id, &node, done, &mode);
        }
        let machine_type = instance
            .machine_type
            .as_deref()
            .map(last_segment)
            .unwrap_or("")
            .to_string();
        let disk_type = found.disk_type();
        if let Some(t) = disk_type
            && !t.is_hyperdisk()
            && machine::hyperdisk_only(&machine_type)
        {
            return Err(unsupported_type(id, t.as_str(), &node, &machine_type));
        }
        let force = found.force_attach();
        let device = id.disk().to_string();
        let body = model::AttachedDisk::new()
            .set_source(path.clone())
            .set_device_name(device.clone())
            .set_mode(mode.clone())
            .set_type(attached_disk::Type::Persistent)
            .set_auto_delete(false);
        let what = format!("attaching {id} to {node}");
        tracing::info!(volume = %id, %node, read_only, "attaching disk");
        let p = self.project();
        let done = self
            .compute
            .mutate(&what, |rid| {
                self.compute
                    .instances
                    .attach_disk()
                    .set_project(p)
                    .set_zone(&node.zone)
                    .set_instance(&node.instance)
                    .set_request_id(rid)
                    .set_body(body.clone())
                    .set_or_clear_force_attach(force.then_some(true))
                    .send()
            })
            .await;
        match done {
            Ok(()) => Ok(publish_context(&device)),
            // Compute's words for a disk type the machine cannot take speak of
            // creating an instance (the PD CSI driver rewrites them too).
            Err(e) if e.kind == Kind::Invalid && e.message.contains(INCOMPATIBLE) => {
                let t = disk_type.map(|t| t.as_str()).unwrap_or("this disk type");
                Err(unsupported_type(id, t, &node, &machine_type))
            }
            Err(e) if matches!(e.kind, Kind::AlreadyExists | Kind::InUse) => {
                // A concurrent or lost earlier attach may have done it.
                match self.instance(&node).await? {
                    Some(i) => match attached(&i, &path) {
                        Some(d) => self.already_attached(id, &node, d, &mode),
                        None => Err(e.into_error(&what)),
                    },
                    None => Err(e.into_error(&what)),
                }
            }
            Err(e) if e.kind == Kind::NotFound => Err(e.into_error(&what)),
            Err(e) => Err(e.into_error(&what)),
        }
    }

    fn already_attached(
        &self,
        id: &VolumeId,
        node: &NodeName,
        disk: &model::AttachedDisk,
        mode: &attached_disk::Mode,
    ) -> Result<BTreeMap<String, String>> {
        let now = disk.mode.clone().unwrap_or(attached_disk::Mode::ReadWrite);
        if &now != mode {
            return Err(Error::AlreadyExists(format!(
                "volume {id} is attached to {node} {}; unpublish it before publishing it {}",
                describe(&now),
                describe(mode)
            )));
        }
        let device = disk.device_name.clone().ok_or_else(|| {
            Error::Internal(format!(
                "volume {id} is attached to {node} without a device name"
            ))
        })?;
        Ok(publish_context(&device))
    }

    pub(super) async fn detach_disk(&self, id: &VolumeId, node_id: &str) -> Result<()> {
        // Nothing can be attached to a node that cannot exist, or of a disk that does not.
        let Some(node) = NodeName::parse(node_id) else {
            return Ok(());
        };
        let Some(found) = self.find_disk(id).await? else {
            return Ok(());
        };
        let Some(instance) = self.instance(&node).await? else {
            return Ok(());
        };
        let path = found.path(self.project());
        let Some(device) = attached(&instance, &path).and_then(|d| d.device_name.clone()) else {
            return Ok(());
        };
        let what = format!("detaching {id} from {node}");
        tracing::info!(volume = %id, %node, "detaching disk");
        let p = self.project();
        let done = self
            .compute
            .mutate(&what, |rid| {
                self.compute
                    .instances
                    .detach_disk()
                    .set_project(p)
                    .set_zone(&node.zone)
                    .set_instance(&node.instance)
                    .set_device_name(&device)
                    .set_request_id(rid)
                    .send()
            })
            .await;
        gone_is_done(done, &what)
    }
}

/// What Compute says when an attach meets a disk type the machine type does
/// not take (`[pd-balanced] features are not compatible for creating
/// instance`, in an `UNSUPPORTED_OPERATION`).
const INCOMPATIBLE: &str = "features are not compatible";

/// INVALID_ARGUMENT for a disk type `machine_type` cannot take: no retry
/// helps, the StorageClass or the node pool must change.
fn unsupported_type(id: &VolumeId, disk_type: &str, node: &NodeName, machine_type: &str) -> Error {
    Error::InvalidArgument(format!(
        "volume {id} is a {disk_type} disk, and node {node} is a {machine_type}, a machine \
         series that takes Hyperdisk only; give its pods a StorageClass with type \
         hyperdisk-balanced (or another hyperdisk-* type), or schedule them on a series that \
         takes Persistent Disk (n2, e2, c3, ...)"
    ))
}

fn describe(mode: &attached_disk::Mode) -> &'static str {
    match mode {
        attached_disk::Mode::ReadOnly => "read-only",
        _ => "read-write",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names() {
        let n = NodeName::parse("us-central1-a.gke-pool-1-abcd").unwrap();
        assert_eq!(n.zone, "us-central1-a");
        assert_eq!(n.instance, "gke-pool-1-abcd");
        assert_eq!(n.to_string(), "us-central1-a.gke-pool-1-abcd");
        for bad in [
            "gke-pool-1",
            "us-central1.x",
            "us-central1-a.",
            "us-central1-a.Bad",
            "a.b.c",
        ] {
            assert_eq!(NodeName::parse(bad), None, "{bad}");
        }
        assert_eq!(
            NodeName::from_instance_url(
                "https://www.googleapis.com/compute/v1/projects/p/zones/us-east1-b/instances/vm-1"
            ),
            Some(NodeName {
                zone: "us-east1-b".into(),
                instance: "vm-1".into()
            })
        );
        assert_eq!(
            NodeName::from_instance_url("projects/p/zones/us-east1-b/disks/d"),
            None
        );
    }
}
