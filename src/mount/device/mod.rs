//! The node's view of its cloud: who this node is ([`identity`]) and which
//! block device holds a volume ([`DeviceLocator`], one implementation per
//! backend, each matching the volume's identity exactly, never by suffix).
//!
//! The CSI node service sees only the trait: [`NodeDevices`] is built once at
//! start and picks the locator by the backend a volume id names.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tonic::Status;

use crate::volume::{BackendKind, VolumeId};

#[cfg(feature = "azure")]
pub mod azure;
#[cfg(feature = "gcp")]
pub mod gcp;
pub mod identity;
pub mod local;

/// Where the host's `/dev`, `/sys` and mount table are; tests point them at
/// fake trees under a temporary directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostRoots {
    pub dev: PathBuf,
    pub sys: PathBuf,
    pub mountinfo: PathBuf,
}

impl HostRoots {
    /// The real host.
    pub fn host() -> Self {
        HostRoots {
            dev: PathBuf::from("/dev"),
            sys: PathBuf::from("/sys"),
            mountinfo: PathBuf::from("/proc/self/mountinfo"),
        }
    }

    /// A fake host under `dir`: `dir/dev`, `dir/sys` and `dir/mountinfo`.
    pub fn under(dir: &Path) -> Self {
        HostRoots {
            dev: dir.join("dev"),
            sys: dir.join("sys"),
            mountinfo: dir.join("mountinfo"),
        }
    }
}

/// Turns a volume id and the publish context the controller gave into the
/// volume's block device on this node.
#[tonic::async_trait]
pub trait DeviceLocator: Send + Sync {
    /// The volume's block device, attaching it first where the node does that
    /// itself (the local backend's loop devices).
    async fn locate(
        &self,
        id: &VolumeId,
        publish_context: &HashMap<String, String>,
    ) -> Result<PathBuf, Status>;

    /// Undoes what [`DeviceLocator::locate`] set up on this node, once nothing
    /// uses the device. Cloud disks are detached by the controller, so for
    /// them there is nothing to do.
    async fn release(&self, _id: &VolumeId) -> Result<(), Status> {
        Ok(())
    }
}

/// The locators of one node: the local backend's when this node serves it,
/// and each cloud's this build has.
pub struct NodeDevices {
    local: Option<local::LocalLocator>,
    #[cfg(feature = "azure")]
    azure: azure::AzureLocator,
    #[cfg(feature = "gcp")]
    gcp: gcp::GcpLocator,
}

impl NodeDevices {
    /// The host's locators; `local_data_dir` is the local backend's data
    /// directory when this node serves it.
    pub fn host(local_data_dir: Option<PathBuf>) -> Self {
        NodeDevices {
            local: local_data_dir.map(local::LocalLocator::new),
            #[cfg(feature = "azure")]
            azure: azure::AzureLocator::from_env(),
            #[cfg(feature = "gcp")]
            gcp: gcp::GcpLocator::host(),
        }
    }

    fn for_volume(&self, id: &VolumeId) -> Result<&dyn DeviceLocator, Status> {
        match id.backend() {
            BackendKind::Local => match &self.local {
                Some(local) => Ok(local),
                None => Err(Status::failed_precondition(format!(
                    "volume {id} is on the local backend, which this node does not serve"
                ))),
            },
            #[cfg(feature = "azure")]
            BackendKind::Azure => Ok(&self.azure),
            #[cfg(feature = "gcp")]
            BackendKind::Gcp => Ok(&self.gcp),
            // A volume of a cloud this build left out (Cargo features).
            #[allow(unreachable_patterns)]
            other => Err(Status::failed_precondition(format!(
                "volume {id}: this build has no {other} backend (built without the Cargo \
                 feature `{other}`)"
            ))),
        }
    }
}

#[tonic::async_trait]
impl DeviceLocator for NodeDevices {
    async fn locate(
        &self,
        id: &VolumeId,
        publish_context: &HashMap<String, String>,
    ) -> Result<PathBuf, Status> {
        self.for_volume(id)?.locate(id, publish_context).await
    }

    async fn release(&self, id: &VolumeId) -> Result<(), Status> {
        match (id.backend(), &self.local) {
            (BackendKind::Local, Some(local)) => local.release(id).await,
            // Nothing of a volume this node does not serve was set up here.
            _ => Ok(()),
        }
    }
}
