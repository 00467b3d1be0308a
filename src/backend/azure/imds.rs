//! The node plugin's view of its VM, from the Azure Instance Metadata Service:
//! the VM name (the node id the controller attaches to), its zone (accessible
//! topology), its size (how many data disks it takes) and its data disks (which
//! managed disk is at which LUN, see [`crate::mount::device::azure::check_disk_at_lun`]).

use std::time::Duration;

use serde::Deserialize;

use crate::cloud::retry::{Retry, Step, clean, retry_after};

/// api-version of `GET /metadata/instance`.
pub const IMDS_INSTANCE_API_VERSION: &str = "2021-02-01";
/// Data disks assumed for a VM size not in [`max_data_disks`]'s table: the
/// value Azure's own disk CSI driver falls back to.
pub const DEFAULT_MAX_DATA_DISKS: u32 = 16;

/// The `compute` part of IMDS instance metadata that the node needs.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct Instance {
    pub name: String,
    pub vm_size: String,
    /// `"1"`, `"2"`, `"3"`, or empty for a regional VM.
    pub zone: String,
    pub location: String,
    pub resource_group_name: String,
    pub subscription_id: String,
    pub storage_profile: StorageProfile,
}

/// `compute.storageProfile` (only the data disks are read).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct StorageProfile {
    pub data_disks: Vec<DataDisk>,
}

/// One entry of `compute.storageProfile.dataDisks`: IMDS writes the LUN as a
/// string (`"0"`), and `managedDisk.id` is the disk's ARM resource id.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct DataDisk {
    pub lun: String,
    pub name: String,
    pub managed_disk: Option<ManagedDisk>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct ManagedDisk {
    pub id: String,
}

/// Why the instance metadata could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ImdsError {
    /// Not reachable, or still answering a transient status after the retries:
    /// worth trying again later.
    #[error("Azure instance metadata unavailable: {0}")]
    Unavailable(String),
    /// It answered, but not with what IMDS documents.
    #[error("{0}")]
    Invalid(String),
}

impl From<ImdsError> for crate::backend::Error {
    fn from(e: ImdsError) -> Self {
        match e {
            ImdsError::Unavailable(_) => crate::backend::Error::Unavailable(e.to_string()),
            ImdsError::Invalid(_) => crate::backend::Error::Internal(e.to_string()),
        }
    }
}

impl Instance {
    /// The zone as a topology value, `<location>-<zone>`; `None` for a VM in no zone.
    pub fn topology_zone(&self) -> Option<String> {
        let zone = self.zone.trim();
        (!zone.is_empty()).then(|| format!("{}-{zone}", self.location.to_ascii_lowercase()))
    }
}

/// Reads the instance metadata from `endpoint` (IMDS, or a fake), retrying what
/// IMDS documents as transient (429, 5xx, and 404/410 while it starts).
pub async fn instance(
    endpoint: &str,
    attempts: u32,
    delay: Duration,
) -> Result<Instance, ImdsError> {
    let url = format!("{}/metadata/instance", endpoint.trim_end_matches('/'));
    // IMDS is reached directly: a proxy from the environment must not see it.
    let client = crate::cloud::http_client_builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| ImdsError::Invalid(format!("cannot build an HTTP client: {e}")))?;
    // `delay` between tries, doubling up to 5 s, the longest `Retry-After` of
    // IMDS's that is waited for.
    let policy = Retry {
        max_attempts: attempts,
        base_delay: delay,
        max_delay: delay.max(IMDS_MAX_WAIT),
    };
    policy
        .run("reading Azure instance metadata", |_| {
            let req = client
                .get(&url)
                .query(&[("api-version", IMDS_INSTANCE_API_VERSION)])
                .header("Metadata", "true");
            let url = url.as_str();
            async move {
                let r = match req.send().await {
                    Ok(r) => r,
                    Err(e) => {
                        return Step::retry(ImdsError::Unavailable(format!(
                            "{url}: {}",
                            e.without_url()
                        )));
                    }
                };
                if !r.status().is_success() {
                    let status = r.status().as_u16();
                    let after = retry_after(r.headers());
                    let body = r.text().await.unwrap_or_default();
                    let last = format!("{url} answered HTTP {status}: {}", clean(&body, 200));
                    return if matches!(status, 404 | 410 | 429 | 500..=599) {
                        Step::Retry {
                            error: ImdsError::Unavailable(last),
                            after,
                        }
                    } else {
                        Step::Fail(ImdsError::Invalid(last))
                    };
                }
                #[derive(Deserialize)]
                struct Metadata {
                    compute: Instance,
                }
                let body = match r.bytes().await {
                    Ok(b) => b,
                    // Cut off mid-answer: as transient as a refused connection.
                    Err(e) => {
                        return Step::retry(ImdsError::Unavailable(format!(
                            "reading {url}: {}",
                            e.without_url()
                        )));
                    }
                };
                let m: Metadata = match serde_json::from_slice(&body) {
                    Ok(m) => m,
                    Err(e) => {
                        return Step::Fail(ImdsError::Invalid(format!(
                            "{url} answered with unexpected JSON: {e}"
                        )));
                    }
                };
                if m.compute.name.is_empty() {
                    return Step::Fail(ImdsError::Invalid(format!(
                        "{url} answered without compute.name"
                    )));
                }
                Step::Done(m.compute)
            }
        })
        .await
}

/// The longest wait between IMDS tries, also for its `Retry-After`.
const IMDS_MAX_WAIT: Duration = Duration::from_secs(5);

/// Sizes whose data-disk limit no family rule below gives, as Azure's size
/// pages (and the reference driver's table) list them: the small M sizes and
/// the GPU sizes AKS node pools commonly use.
const DATA_DISK_LIMITS: &[(&str, u32)] = &[
    ("m8ms", 8),
    ("m8-2ms", 8),
    ("m8-4ms", 8),
    ("m16ms", 16),
    ("m16-4ms", 16),
    ("m16-8ms", 16),
    ("m32ts", 32),
    ("m32ls", 32),
    ("m32ms", 32),
    ("m32-8ms", 32),
    ("m32-16ms", 32),
    ("m32ms_v2", 32),
    ("m32dms_v2", 32),
    ("nc4as_t4_v3", 8),
    ("nc8as_t4_v3", 16),
    ("nc16as_t4_v3", 32),
    ("nc64as_t4_v3", 32),
    ("nc6s_v3", 12),
    ("nc12s_v3", 24),
    ("nc24s_v3", 32),
    ("nc24rs_v3", 32),
    ("nc24ads_a100_v4", 8),
    ("nc48ads_a100_v4", 16),
    ("nc96ads_a100_v4", 32),
    ("nc40ads_h100_v5", 8),
    ("nc80adis_h100_v5", 16),
    ("nd96asr_v4", 16),
    ("nd96amsr_a100_v4", 16),
    ("nd96isr_h100_v5", 16),
    ("nv6ads_a10_v5", 4),
    ("nv12ads_a10_v5", 8),
    ("nv18ads_a10_v5", 16),
    ("nv36ads_a10_v5", 32),
    ("nv72ads_a10_v5", 32),
];

/// The most data disks a VM size takes, for the common sizes; `None` for a
/// size neither the table nor the rules know (use [`DEFAULT_MAX_DATA_DISKS`]).
///
/// [`DATA_DISK_LIMITS`] first; then the family rules of Azure's size pages:
/// the B series and the v1/v2 D and DS series have their own steps; the D, E,
/// F and L families from v2/v3 to v5, the AMD v6 sizes (`a` among the feature
/// letters) and the confidential DC/EC v5 take two data disks per vCPU, at
/// most 32; the Intel and Arm v6 D and E sizes take 8 at 2 vCPUs, then three
/// per vCPU up to 48, and 64 from 32 vCPUs; the other M sizes 64.
pub fn max_data_disks(vm_size: &str) -> Option<u32> {
    let size = vm_size.trim().to_ascii_lowercase();
    let name = size.strip_prefix("standard_")?;
    if let Some((_, n)) = DATA_DISK_LIMITS.iter().find(|(s, _)| *s == name) {
        return Some(*n);
    }
    let (base, version) = match name.rsplit_once("_v") {
        Some((b, v)) if v.chars().all(|c| c.is_ascii_digit()) && !v.is_empty() => {
            (b, v.parse::<u32>().ok()?)
        }
        _ => (name, 1),
    };
    // The family letters, the vCPU count, then (after a constrained count
    // `-N`) feature letters (a, d, s, m, l, p, ...).
    let family: String = base
        .chars()
        .take_while(|c| c.is_ascii_alphabetic())
        .collect();
    let rest = &base[family.len()..];
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    let n: u32 = digits.parse().ok()?;
    let features: String = rest[digits.len()..]
        .chars()
        .filter(|c| c.is_ascii_alphabetic())
        .collect();
    // A suffix after another '_' (a GPU model) is not a family this knows.
    if base.contains('_') {
        return None;
    }
    let two_per_vcpu = (2 * n).clamp(2, 32);
    match (family.as_str(), version) {
        ("b", _) => Some(match n {
            1 => 2,
            2 => 4,
            4 => 8,
            8 | 12 => 16,
            _ => 32,
        }),
        ("d" | "ds", 1 | 2) => match n {
            1 | 11 => Some(4),
            2 | 12 => Some(8),
            3 | 13 => Some(16),
            4 | 14 => Some(32),
            5 | 15 => Some(64),
            _ => None,
        },
        ("d" | "e" | "f", 6) if features.contains('a') => Some(two_per_vcpu),
        ("d" | "e", 6) => Some(match n {
            0..=2 => 8,
            3..=31 => (3 * n).min(48),
            _ => 64,
        }),
        ("d" | "e" | "l", 3..=5) | ("f" | "l", 2) | ("dc" | "ec", 5) => Some(two_per_vcpu),
        ("m", _) => Some(64),
        _ => None,
    }
}

/// What the node plugin reports on Azure: its node id, zone and volume limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeFacts {
    pub node_id: String,
    /// `<location>-<zone>`, for [`super::TOPOLOGY_ZONE`]; `None` outside zones.
    pub zone: Option<String>,
    pub max_volumes: u64,
}

impl NodeFacts {
    /// The node's topology segments: its zone, or for a VM in no zone the key
    /// with an empty value (as Azure's disk CSI driver publishes it), which
    /// is what disks in no zone are accessible from.
    pub fn topology(&self) -> std::collections::BTreeMap<String, String> {
        std::collections::BTreeMap::from([(
            super::TOPOLOGY_ZONE.to_string(),
            self.zone.clone().unwrap_or_default(),
        )])
    }
}

/// The node's facts from IMDS at `endpoint`, each replaced by what the operator
/// gave (`node_id`, `max_volumes`).
pub async fn node_facts(
    endpoint: &str,
    node_id: Option<String>,
    max_volumes: Option<u64>,
) -> Result<NodeFacts, String> {
    let vm = instance(endpoint, 5, Duration::from_secs(1))
        .await
        .map_err(|e| e.to_string())?;
    let max_volumes = match max_volumes {
        Some(m) => m,
        None => match max_data_disks(&vm.vm_size) {
            Some(n) => u64::from(n),
            None => {
                tracing::warn!(
                    vm_size = %vm.vm_size,
                    assumed = DEFAULT_MAX_DATA_DISKS,
                    "unknown VM size: assuming its data-disk limit; set --max-volumes to override"
                );
                u64::from(DEFAULT_MAX_DATA_DISKS)
            }
        },
    };
    Ok(NodeFacts {
        node_id: node_id.unwrap_or_else(|| vm.name.clone()),
        zone: vm.topology_zone(),
        max_volumes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_disk_limits_of_common_sizes() {
        let cases = [
            ("Standard_B1s", Some(2)),
            ("Standard_B2ms", Some(4)),
            ("Standard_D2s_v3", Some(4)),
            ("Standard_D4s_v5", Some(8)),
            ("Standard_D8ads_v5", Some(16)),
            ("Standard_D16as_v4", Some(32)),
            ("Standard_D96s_v5", Some(32)),
            ("Standard_E2s_v3", Some(4)),
            ("Standard_E64ds_v5", Some(32)),
            ("Standard_F2s_v2", Some(4)),
            ("Standard_F72s_v2", Some(32)),
            ("Standard_DS2_v2", Some(8)),
            ("Standard_DS5_v2", Some(64)),
            ("Standard_D1_v2", Some(4)),
            ("Standard_L8s_v3", Some(16)),
            ("Standard_M128ms", Some(64)),
            ("standard_d4s_v5", Some(8)),
            // From the reference driver's table: sizes the old rules got wrong.
            ("Standard_M8ms", Some(8)),
            ("Standard_M16ms", Some(16)),
            ("Standard_M32ls", Some(32)),
            ("Standard_M64s_v2", Some(64)),
            ("Standard_D2s_v6", Some(8)),
            ("Standard_D4ds_v6", Some(12)),
            ("Standard_D8pds_v6", Some(24)),
            ("Standard_D16s_v6", Some(48)),
            ("Standard_D32lds_v6", Some(64)),
            ("Standard_D96s_v6", Some(64)),
            ("Standard_D2as_v6", Some(4)),
            ("Standard_D16ads_v6", Some(32)),
            ("Standard_E4s_v6", Some(12)),
            ("Standard_E20s_v6", Some(48)),
            ("Standard_E48ds_v6", Some(64)),
            ("Standard_E8-2s_v6", Some(24)),
            ("Standard_E4-2s_v5", Some(8)),
            ("Standard_F4as_v6", Some(8)),
            ("Standard_F64als_v6", Some(32)),
            ("Standard_L8s_v2", Some(16)),
            ("Standard_DC4ads_v5", Some(8)),
            ("Standard_NC24ads_A100_v4", Some(8)),
            ("Standard_NC4as_T4_v3", Some(8)),
            ("Standard_ND40rs_v2", None),
            ("Basic_A0", None),
            ("", None),
        ];
        for (size, want) in cases {
            assert_eq!(max_data_disks(size), want, "{size}");
        }
    }

    #[test]
    fn zones_as_topology() {
        let mut i = Instance {
            name: "vm".into(),
            location: "EastUS".into(),
            zone: "2".into(),
            ..Default::default()
        };
        assert_eq!(i.topology_zone().as_deref(), Some("eastus-2"));
        i.zone = String::new();
        assert_eq!(i.topology_zone(), None);
    }

    #[tokio::test]
    async fn node_facts_from_a_fake_imds() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let h = h.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let n = h.fetch_add(1, Ordering::SeqCst);
                            async move {
                                let ok = req.uri().path() == "/metadata/instance"
                                    && req.uri().query() == Some("api-version=2021-02-01")
                                    && req.headers().get("metadata").is_some_and(|v| v == "true");
                                let (status, body) = if !ok {
                                    (400, "bad request".to_string())
                                } else if n == 0 {
                                    // IMDS answers 410 while it starts.
                                    (410, "Gone".to_string())
                                } else {
                                    (
                                        200,
                                        serde_json::json!({"compute": {
                                    "name": "aks-pool-vm3", "vmSize": "Standard_D8s_v5",
                                    "zone": "3", "location": "westeurope",
                                    "resourceGroupName": "mc", "subscriptionId": "s"}})
                                        .to_string(),
                                    )
                                };
                                Ok::<_, std::convert::Infallible>(
                                    http::Response::builder()
                                        .status(status)
                                        .body(http_body_util::Full::new(hyper::body::Bytes::from(
                                            body,
                                        )))
                                        .unwrap(),
                                )
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        let facts = node_facts(&base, None, None).await.unwrap();
        assert_eq!(
            facts,
            NodeFacts {
                node_id: "aks-pool-vm3".into(),
                zone: Some("westeurope-3".into()),
                max_volumes: 16,
            }
        );
        assert_eq!(hits.load(Ordering::SeqCst), 2);
        assert_eq!(
            facts.topology(),
            std::collections::BTreeMap::from([(
                super::super::TOPOLOGY_ZONE.to_string(),
                "westeurope-3".to_string()
            )])
        );
        let regional = NodeFacts {
            zone: None,
            ..facts.clone()
        };
        assert_eq!(
            regional.topology(),
            std::collections::BTreeMap::from([(
                super::super::TOPOLOGY_ZONE.to_string(),
                String::new()
            )])
        );
        let given = node_facts(&base, Some("n1".into()), Some(3)).await.unwrap();
        assert_eq!((given.node_id.as_str(), given.max_volumes), ("n1", 3));
    }
}
