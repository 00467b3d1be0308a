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

#[cfg(test)]
mod tests {
    use super::*;

    fn given(node_id: Option<&str>, max_volumes: Option<u64>) -> Given {
        Given {
            node_id: node_id.map(str::to_string),
            max_volumes,
        }
    }

    #[test]
    fn local_takes_what_was_given_or_the_host_name() {
        let got = local(given(Some("node-1"), Some(7))).unwrap();
        assert_eq!(
            got,
            NodeIdentity {
                node_id: "node-1".into(),
                topology: BTreeMap::new(),
                max_volumes: 7,
            }
        );
        let host = nix::unistd::gethostname().unwrap().into_string().unwrap();
        let got = local(Given::default()).unwrap();
        assert_eq!((got.node_id, got.max_volumes), (host, 0));
        let e = local(given(Some(""), None)).unwrap_err();
        assert_eq!(e.to_string(), "--node-id must not be empty");
    }

    #[test]
    fn the_hint_of_a_missing_cloud_names_every_backend() {
        let e = not_built("--cloud", BackendKind::Gcp).to_string();
        assert!(
            e.starts_with("--cloud gcp: this build has no gcp support"),
            "{e}"
        );
        assert!(e.contains("local, azure and gcp"), "{e}");
    }

    #[cfg(feature = "azure")]
    #[tokio::test]
    async fn azure_from_imds_with_overrides() {
        use crate::backend::azure::fake::FakeArm;
        let fake = FakeArm::start().await;
        fake.add_vm("aks-pool-vm1", "Standard_D4s_v5");
        fake.with(|s| s.imds_vm = Some("aks-pool-vm1".into()));
        let got = azure(&fake.base, Given::default()).await.unwrap();
        assert_eq!(
            got,
            NodeIdentity {
                node_id: "aks-pool-vm1".into(),
                // A VM in no zone reports the zone key with an empty value.
                topology: BTreeMap::from([(
                    crate::csi::contract::TOPOLOGY_ZONE.to_string(),
                    String::new()
                )]),
                max_volumes: 8,
            }
        );
        let got = azure(&fake.base, given(Some("n1"), Some(3))).await.unwrap();
        assert_eq!((got.node_id.as_str(), got.max_volumes), ("n1", 3));
        let e = azure(&fake.base, given(Some("a b"), None))
            .await
            .unwrap_err();
        assert!(e.to_string().starts_with("--cloud azure: node id"), "{e}");
        assert!(fake.problems().is_empty(), "{:?}", fake.problems());
    }

    /// A metadata server that knows one VM, as the GCE metadata server answers
    /// `/computeMetadata/v1/instance/...` (header `Metadata-Flavor: Google`).
    #[cfg(feature = "gcp")]
    async fn metadata_server() -> crate::backend::gcp::metadata::Metadata {
        use crate::test_http::{Answer, serve};
        let base = serve(|_| {
            |seen: crate::test_http::Exchange| {
                let text = match seen.path.as_str() {
                    _ if seen.header("metadata-flavor") != "Google" => None,
                    "/computeMetadata/v1/instance/zone" => {
                        Some("projects/123/zones/europe-west1-b")
                    }
                    "/computeMetadata/v1/instance/name" => Some("gke-pool-1"),
                    "/computeMetadata/v1/instance/machine-type" => {
                        Some("projects/123/machineTypes/e2-medium")
                    }
                    _ => None,
                };
                Answer {
                    status: if text.is_some() { 200 } else { 404 },
                    headers: vec![("metadata-flavor".into(), "Google".into())],
                    body: text.unwrap_or("not found").as_bytes().to_vec(),
                }
            }
        })
        .await;
        crate::backend::gcp::metadata::Metadata::new(&base).unwrap()
    }

    #[cfg(feature = "gcp")]
    #[tokio::test]
    async fn gcp_from_the_metadata_server_with_overrides() {
        let metadata = metadata_server().await;
        let zone = |z: &str| {
            BTreeMap::from([(
                crate::csi::contract::TOPOLOGY_ZONE.to_string(),
                z.to_string(),
            )])
        };
        let got = gcp(&metadata, Given::default()).await.unwrap();
        assert_eq!(
            got,
            NodeIdentity {
                node_id: "europe-west1-b.gke-pool-1".into(),
                topology: zone("europe-west1-b"),
                // A shared-core machine type.
                max_volumes: 15,
            }
        );
        let got = gcp(&metadata, given(Some("us-east1-c.vm-2"), Some(9)))
            .await
            .unwrap();
        assert_eq!(
            got,
            NodeIdentity {
                node_id: "us-east1-c.vm-2".into(),
                topology: zone("us-east1-c"),
                max_volumes: 9,
            }
        );
        let e = gcp(&metadata, given(Some("vm-2"), None)).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "--node-id \"vm-2\": with --cloud gcp a node id is <zone>.<instance>, which the \
             controller needs to attach disks"
        );
    }
}
