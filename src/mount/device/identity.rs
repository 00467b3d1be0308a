//! Who this node is, as it reports itself in NodeGetInfo: its id, its
//! topology and how many volumes it takes, per cloud. On Azure and GCP the
//! answer comes from the VM's metadata service, each part replaced by what the
//! operator gave (`--node-id`, `--max-volumes`).
//!
//! It sits beside the device locators because both are the node's view of its
//! cloud, built once at start from `--cloud` and behind the same feature gates.

use std::collections::BTreeMap;
use std::error::Error;

use crate::volume::BackendKind;

/// What the operator gave on the command line; `None` asks the cloud.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Given {
    pub node_id: Option<String>,
    pub max_volumes: Option<u64>,
}

/// The node as NodeGetInfo reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeIdentity {
    pub node_id: String,
    /// Topology segments (the zone on Azure and GCP; none for the local cloud,
    /// whose node segment is added by whoever serves the local backend).
    pub topology: BTreeMap<String, String>,
    /// Most volumes this node takes (0: no limit).
    pub max_volumes: u64,
}

/// The node's identity in `cloud`, from its metadata service at the address the
/// environment names (or the default).
pub async fn discover(cloud: BackendKind, given: Given) -> Result<NodeIdentity, Box<dyn Error>> {
    match cloud {
        BackendKind::Local => local(given),
        BackendKind::Azure => azure_from_env(given).await,
        BackendKind::Gcp => gcp_from_env(given).await,
    }
}

/// The local cloud: the given id or the host name, and the given limit.
pub fn local(given: Given) -> Result<NodeIdentity, Box<dyn Error>> {
    Ok(NodeIdentity {
        node_id: node_id_or_host_name(given.node_id)?,
        topology: BTreeMap::new(),
        max_volumes: given.max_volumes.unwrap_or(0),
    })
}

/// The id the operator gave, or the host name.
pub fn node_id_or_host_name(given: Option<String>) -> Result<String, Box<dyn Error>> {
    match given {
        Some(id) if !id.is_empty() => Ok(id),
        Some(_) => Err("--node-id must not be empty".into()),
        None => Ok(nix::unistd::gethostname()?
            .into_string()
            .map_err(|_| "the host name is not UTF-8; pass --node-id")?),
    }
}

/// The error of a build that left out a cloud.
#[cfg_attr(all(feature = "azure", feature = "gcp"), allow(dead_code))]
pub fn not_built(flag: &str, cloud: BackendKind) -> Box<dyn Error> {
    format!(
        "{flag} {cloud}: this build has no {cloud} support (built without the Cargo \
         feature `{cloud}`; the release image has every backend: local, azure and gcp)"
    )
    .into()
}

#[cfg(not(feature = "azure"))]
async fn azure_from_env(_given: Given) -> Result<NodeIdentity, Box<dyn Error>> {
    Err(not_built("--cloud", BackendKind::Azure))
}

#[cfg(feature = "azure")]
async fn azure_from_env(given: Given) -> Result<NodeIdentity, Box<dyn Error>> {
    let imds = crate::backend::azure::config::imds_endpoint(|k| std::env::var(k).ok());
    azure(&imds, given).await
}

/// Node id (the VM name), zone and attach limit of an Azure VM, from IMDS at
/// `imds`.
#[cfg(feature = "azure")]
pub async fn azure(imds: &str, given: Given) -> Result<NodeIdentity, Box<dyn Error>> {
    let facts = crate::backend::azure::imds::node_facts(imds, given.node_id, given.max_volumes)
        .await
        .map_err(|e| format!("--cloud azure: {e}"))?;
    crate::csi::validate::node_id("node id", &facts.node_id)
        .map_err(|e| format!("--cloud azure: {}", e.message()))?;
    let topology = facts.topology();
    Ok(NodeIdentity {
        node_id: node_id_or_host_name(Some(facts.node_id))?,
        topology,
        max_volumes: facts.max_volumes,
    })
}

#[cfg(not(feature = "gcp"))]
async fn gcp_from_env(_given: Given) -> Result<NodeIdentity, Box<dyn Error>> {
    Err(not_built("--cloud", BackendKind::Gcp))
}

#[cfg(feature = "gcp")]
async fn gcp_from_env(given: Given) -> Result<NodeIdentity, Box<dyn Error>> {
    let metadata = crate::backend::gcp::metadata::Metadata::from_env()?;
    gcp(&metadata, given).await
}

/// Node id (`<zone>.<instance>`), zone and attach limit of a GCE VM, from the
/// metadata server.
#[cfg(feature = "gcp")]
pub async fn gcp(
    metadata: &crate::backend::gcp::metadata::Metadata,
    given: Given,
) -> Result<NodeIdentity, Box<dyn Error>> {
    use crate::backend::gcp::{NodeName, machine};
    let node = match given.node_id.as_deref() {
        Some(id) => NodeName::parse(id).ok_or_else(|| {
            format!(
                "--node-id {id:?}: with --cloud gcp a node id is <zone>.<instance>, \
                 which the controller needs to attach disks"
            )
        })?,
        None => NodeName {
            zone: metadata.zone().await?,
            instance: metadata.instance_name().await?,
        },
    };
    let node_id = node.to_string();
    crate::csi::validate::node_id("node id", &node_id).map_err(|e| e.message().to_string())?;
    let max_volumes = match given.max_volumes {
        Some(m) => m,
        None => {
            let machine_type = metadata.machine_type().await?;
            let max = machine::max_volumes_for(&machine_type);
            tracing::info!(%machine_type, max_volumes = max, "attach limit");
            max
        }
    };
    let topology = BTreeMap::from([(crate::csi::contract::TOPOLOGY_ZONE.to_string(), node.zone)]);
    Ok(NodeIdentity {
        node_id: node_id_or_host_name(Some(node_id))?,
        topology,
        max_volumes,
    })
}
