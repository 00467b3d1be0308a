//! The Azure backend against the fake ARM, through the CSI controller.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tonic::{Code, Request};

use super::auth::{self, ReqwestTransport};
use super::config::{AzureConfig, ENV_ARM_ENDPOINT, ENV_AUTHORITY_HOST, VmType};
use super::fake::*;
use super::{AzureBackend, PUBLISH_LUN, TOPOLOGY_ZONE};
use crate::backend::DiskBackend;
use crate::cloud::retry::Retry;
use crate::csi::controller::ControllerService;
use crate::proto::csi::controller_server::Controller;
use crate::proto::csi::volume_capability::access_mode::Mode;
use crate::proto::csi::volume_capability::{AccessMode, AccessType, MountVolume};
use crate::proto::csi::volume_content_source::{SnapshotSource, Type as SourceType, VolumeSource};
use crate::proto::csi::*;

const GIB: i64 = 1 << 30;
const DRIVER: &str = "cryptdisk.csi.io";

struct Env {
    fake: FakeArm,
    ctl: Arc<ControllerService>,
}

fn config(fake: &FakeArm, secret: &str) -> AzureConfig {
    let file = json!({
        "cloud": "AzurePublicCloud",
        "tenantId": TENANT,
        "subscriptionId": SUB,
        "resourceGroup": RG,
        "location": LOCATION,
        "vmType": "standard",
        "aadClientId": CLIENT_ID,
        "aadClientSecret": secret,
    })
    .to_string();
    let base = fake.base.clone();
    let mut c = AzureConfig::from_parts(
        Some(&file),
        "azure.json",
        |k| match k {
            ENV_ARM_ENDPOINT => Some(base.clone()),
            ENV_AUTHORITY_HOST => Some(FAKE_AUTHORITY.to_string()),
            _ => None,
        },
        DRIVER,
    )
    .unwrap();
    c.retry = Retry {
        max_attempts: 4,
        base_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(20),
    };
    c.poll_interval = Duration::from_millis(2);
    c.operation_timeout = Duration::from_secs(20);
    c.request_timeout = Duration::from_secs(10);
    c
}

fn backend(fake: &FakeArm, c: &AzureConfig) -> Arc<AzureBackend> {
    let http = AzureBackend::http_client(c).unwrap();
    let transport = Arc::new(RedirectTransport {
        inner: ReqwestTransport(http.clone()),
        to: fake.base.clone(),
    });
    let credential = auth::credential(c, transport).unwrap();
    Arc::new(AzureBackend::with_credential(c, http, credential))
}

async fn setup() -> Env {
    setup_with(|_| {}).await
}

/// [`setup`] with the configuration changed by `tune`.
async fn setup_with(tune: impl FnOnce(&mut AzureConfig)) -> Env {
    let fake = FakeArm::start().await;
    fake.add_vm("node-a", "Standard_D4s_v5");
    fake.add_vm("node-b", "Standard_B1s");
    let mut c = config(&fake, CLIENT_SECRET);
    tune(&mut c);
    let b = backend(&fake, &c);
    Env {
        fake,
        ctl: Arc::new(ControllerService::new(b, None)),
    }
}

fn cap() -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: "ext4".into(),
            ..Default::default()
        })),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    }
}

fn create_req(name: &str, bytes: i64, params: &[(&str, &str)]) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![cap()],
        parameters: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    }
}

impl Env {
    async fn create(&self, req: CreateVolumeRequest) -> Result<Volume, tonic::Status> {
        self.ctl
            .create_volume(Request::new(req))
            .await
            .map(|r| r.into_inner().volume.unwrap())
    }

    async fn publish(
        &self,
        volume: &str,
        node: &str,
    ) -> Result<HashMap<String, String>, tonic::Status> {
        self.ctl
            .controller_publish_volume(Request::new(ControllerPublishVolumeRequest {
                volume_id: volume.into(),
                node_id: node.into(),
                volume_capability: Some(cap()),
                ..Default::default()
            }))
            .await
            .map(|r| r.into_inner().publish_context)
    }

    async fn unpublish(&self, volume: &str, node: &str) -> Result<(), tonic::Status> {
        self.ctl
            .controller_unpublish_volume(Request::new(ControllerUnpublishVolumeRequest {
                volume_id: volume.into(),
                node_id: node.into(),
                ..Default::default()
            }))
            .await
            .map(|_| ())
    }

    async fn delete(&self, volume: &str) -> Result<(), tonic::Status> {
        self.ctl
            .delete_volume(Request::new(DeleteVolumeRequest {
                volume_id: volume.into(),
                ..Default::default()
            }))
            .await
            .map(|_| ())
    }

    async fn snapshot(&self, source: &str, name: &str) -> Result<Snapshot, tonic::Status> {
        self.ctl
            .create_snapshot(Request::new(CreateSnapshotRequest {
                source_volume_id: source.into(),
                name: name.into(),
                ..Default::default()
            }))
            .await
            .map(|r| r.into_inner().snapshot.unwrap())
    }

    /// Every volume id, following next tokens page by page.
    async fn list_all(&self, page: i32) -> Vec<(String, Vec<String>)> {
        let mut out = Vec::new();
        let mut token = String::new();
        loop {
            let r = self
                .ctl
                .list_volumes(Request::new(ListVolumesRequest {
                    max_entries: page,
                    starting_token: token.clone(),
                }))
                .await
                .unwrap()
                .into_inner();
            assert!(page == 0 || r.entries.len() <= page as usize);
            for e in r.entries {
                out.push((
                    e.volume.unwrap().volume_id,
                    e.status.unwrap().published_node_ids,
                ));
            }
            if r.next_token.is_empty() {
                return out;
            }
            token = r.next_token;
        }
    }

    fn disk(&self, name: &str) -> Value {
        let key = format!(
            "/subscriptions/{SUB}/resourcegroups/{RG}/providers/microsoft.compute/disks/{name}"
        );
        self.fake
            .with(|s| s.disks.get(&key.to_ascii_lowercase()).cloned())
            .unwrap_or(Value::Null)
    }

    fn vm_disks(&self, vm: &str) -> Vec<Value> {
        let key = format!(
            "/subscriptions/{SUB}/resourcegroups/{RG}/providers/microsoft.compute/virtualmachines/{vm}"
        )
        .to_ascii_lowercase();
        self.fake.with(|s| {
            s.vms[&key]["properties"]["storageProfile"]["dataDisks"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
    }

    fn assert_clean(&self) {
        assert_eq!(self.fake.problems(), Vec::<String>::new());
    }
}

fn lun(ctx: &HashMap<String, String>) -> u32 {
    ctx[PUBLISH_LUN].parse().unwrap()
}

#[tokio::test]
async fn each_sku_rounds_the_size_it_creates() {
    let env = setup().await;
    // 1 GiB usable + the 16 MiB LUKS2 header: 2 GiB, except Ultra's 4 GiB minimum.
    let cases = [
        ("Standard_LRS", GIB, 2),
        ("StandardSSD_LRS", GIB, 2),
        ("Premium_LRS", 10 * GIB, 11),
        ("PremiumV2_LRS", GIB, 2),
        ("UltraSSD_LRS", GIB, 4),
        ("UltraSSD_LRS", 6 * GIB, 7),
        ("Premium_ZRS", GIB, 2),
        ("StandardSSD_ZRS", GIB, 2),
    ];
    for (i, (sku, bytes, gib)) in cases.into_iter().enumerate() {
        let name = format!("pvc-sku-{i}");
        let mut req = create_req(&name, bytes, &[("skuName", sku)]);
        if sku.contains("V2") || sku.contains("Ultra") {
            // They exist only in a zone.
            in_zones(&mut req, &["eastus-1"]);
        }
        let v = env.create(req).await.unwrap();
        assert_eq!(v.volume_id, format!("azure:{RG}:{name}"));
        assert_eq!(
            v.capacity_bytes, bytes,
            "{sku}: the usable size is reported"
        );
        let disk = env.disk(&name);
        assert_eq!(disk["sku"]["name"], sku);
        assert_eq!(disk["properties"]["diskSizeGB"], gib, "{sku} {bytes}");
        assert_eq!(disk["properties"]["provisioningState"], "Succeeded");
    }
    // No capacity: the default 1 GiB volume on the default SKU.
    let v = env.create(create_req("pvc-default", 0, &[])).await.unwrap();
    assert_eq!(v.capacity_bytes, GIB);
    assert_eq!(env.disk("pvc-default")["sku"]["name"], "StandardSSD_LRS");
    env.assert_clean();
}

#[tokio::test]
async fn full_controller_lifecycle() {
    let env = setup().await;
    let v = env
        .create(create_req("pvc-a", 10 * GIB, &[("skuName", "Premium_LRS")]))
        .await
        .unwrap();
    let id = v.volume_id.clone();
    assert_eq!(id, format!("azure:{RG}:pvc-a"));
    assert_eq!(v.volume_context["cryptdisk.csi.io/integrity"], "false");
    assert_eq!(
        v.accessible_topology,
        vec![zone_topo("")],
        "a disk in no zone, for nodes in no zone"
    );
    let disk = env.disk("pvc-a");
    assert_eq!(disk["properties"]["diskSizeGB"], 11);
    assert_eq!(disk["tags"]["kubernetes.io-created-for-pv-name"], "pvc-a");
    assert_eq!(disk["tags"]["k8s-azure-created-by"], DRIVER);
    assert!(
        disk["tags"]["cryptdisk-options"]
            .as_str()
            .unwrap()
            .contains("integrity=false")
    );
    assert_eq!(disk["properties"]["creationData"]["createOption"], "Empty");
    assert!(disk.get("zones").is_none());

    // A retry finds the disk it created: no second PUT.
    let before = env.fake.request_count();
    let again = env
        .create(create_req("pvc-a", 10 * GIB, &[("skuName", "Premium_LRS")]))
        .await
        .unwrap();
    assert_eq!(again.volume_id, id);
    assert_eq!(again.capacity_bytes, 10 * GIB);
    assert!(
        !env.fake
            .calls_since(before)
            .iter()
            .any(|c| c.starts_with("PUT"))
    );
    // The same name with other arguments.
    for (bytes, params) in [
        (20 * GIB, vec![("skuName", "Premium_LRS")]),
        (10 * GIB, vec![("skuName", "StandardSSD_LRS")]),
    ] {
        let e = env
            .create(create_req("pvc-a", bytes, &params))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::AlreadyExists, "{}", e.message());
        assert!(e.message().contains("differs"), "{}", e.message());
    }

    // Publish: a LUN in the publish context, the disk on the VM with ReadOnly caching.
    let ctx = env.publish(&id, "node-a").await.unwrap();
    assert_eq!(lun(&ctx), 0);
    let entries = env.vm_disks("node-a");
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0]["caching"], "ReadOnly");
    assert_eq!(entries[0]["createOption"], "Attach");
    assert!(
        entries[0]["managedDisk"]["id"]
            .as_str()
            .unwrap()
            .eq_ignore_ascii_case(&format!(
                "/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Compute/disks/pvc-a"
            ))
    );
    // Again: the same LUN, and the VM is not updated.
    let before = env.fake.request_count();
    assert_eq!(env.publish(&id, "node-a").await.unwrap(), ctx);
    assert!(
        !env.fake
            .calls_since(before)
            .iter()
            .any(|c| c.starts_with("PATCH"))
    );
    // Elsewhere while attached here.
    let e = env.publish(&id, "node-b").await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    // An Ultra disk takes the next LUN, with no host caching.
    let mut ultra = create_req("pvc-ultra", GIB, &[("skuName", "UltraSSD_LRS")]);
    in_zones(&mut ultra, &["eastus-1"]);
    let ultra = env.create(ultra).await.unwrap();
    assert_eq!(
        lun(&env.publish(&ultra.volume_id, "node-a").await.unwrap()),
        1
    );
    assert_eq!(env.vm_disks("node-a")[1]["caching"], "None");

    // Listed with the node it is published on.
    let listed = env.list_all(0).await;
    assert!(
        listed.contains(&(id.clone(), vec!["node-a".to_string()])),
        "{listed:?}"
    );

    // Expansion, online.
    let r = env
        .ctl
        .controller_expand_volume(Request::new(ControllerExpandVolumeRequest {
            volume_id: id.clone(),
            capacity_range: Some(CapacityRange {
                required_bytes: 20 * GIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(r.node_expansion_required);
    assert!(r.capacity_bytes >= 20 * GIB, "{}", r.capacity_bytes);
    assert_eq!(env.disk("pvc-a")["properties"]["diskSizeGB"], 21);

    // Snapshot: incremental, ready once its operation is done; idempotent by name.
    let snap = env.snapshot(&id, "snap-1").await.unwrap();
    assert_eq!(snap.snapshot_id, format!("azure:{RG}:snap-1"));
    assert_eq!(snap.source_volume_id, id);
    assert!(snap.ready_to_use);
    // The usable size the expansion reported (21 GiB less the LUKS2 header),
    // not the 21 GiB disk: what the CO restores it into.
    assert_eq!(snap.size_bytes, r.capacity_bytes);
    assert_eq!(snap.size_bytes, 21 * GIB - (16 << 20));
    assert_eq!(snap.creation_time.unwrap().seconds, 1_795_982_462);
    assert_eq!(env.snapshot(&id, "snap-1").await.unwrap(), snap);
    let e = env.snapshot(&ultra.volume_id, "snap-1").await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);

    // Restore from the snapshot, and clone the volume.
    let mut restore = create_req("pvc-restore", 20 * GIB, &[("skuName", "Premium_LRS")]);
    restore.volume_content_source = Some(VolumeContentSource {
        r#type: Some(SourceType::Snapshot(SnapshotSource {
            snapshot_id: snap.snapshot_id.clone(),
        })),
    });
    let restored = env.create(restore.clone()).await.unwrap();
    let d = env.disk("pvc-restore");
    assert_eq!(d["properties"]["creationData"]["createOption"], "Copy");
    assert!(
        d["properties"]["creationData"]["sourceResourceId"]
            .as_str()
            .unwrap()
            .ends_with("/snapshots/snap-1")
    );
    assert_eq!(
        restored.content_source.unwrap().r#type,
        Some(SourceType::Snapshot(SnapshotSource {
            snapshot_id: snap.snapshot_id.clone()
        }))
    );
    assert_eq!(
        env.create(restore).await.unwrap().volume_id,
        restored.volume_id
    );
    let mut clone = create_req("pvc-clone", 20 * GIB, &[("skuName", "Premium_LRS")]);
    clone.volume_content_source = Some(VolumeContentSource {
        r#type: Some(SourceType::Volume(VolumeSource {
            volume_id: id.clone(),
        })),
    });
    env.create(clone).await.unwrap();
    assert!(
        env.disk("pvc-clone")["properties"]["creationData"]["sourceResourceId"]
            .as_str()
            .unwrap()
            .ends_with("/disks/pvc-a")
    );
    // A clone smaller than its source.
    let mut small = create_req("pvc-small", GIB, &[("skuName", "Premium_LRS")]);
    small.volume_content_source = Some(VolumeContentSource {
        r#type: Some(SourceType::Volume(VolumeSource {
            volume_id: id.clone(),
        })),
    });
    assert_eq!(
        env.create(small).await.unwrap_err().code(),
        Code::OutOfRange
    );

    // Paginated listing (the fake pages ARM's list by two as well).
    let all: BTreeSet<String> = env.list_all(0).await.into_iter().map(|(v, _)| v).collect();
    let paged: Vec<String> = env.list_all(1).await.into_iter().map(|(v, _)| v).collect();
    assert_eq!(paged.len(), 4);
    assert_eq!(paged.iter().cloned().collect::<BTreeSet<_>>(), all);
    let e = env
        .ctl
        .list_volumes(Request::new(ListVolumesRequest {
            max_entries: 1,
            starting_token: "not-a-token".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Aborted);
    let snaps = env
        .ctl
        .list_snapshots(Request::new(ListSnapshotsRequest {
            source_volume_id: id.clone(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(snaps.entries.len(), 1);

    // In use: no delete.
    let e = env.delete(&id).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    // Unpublish, twice; the VM keeps its other disk.
    env.unpublish(&id, "node-a").await.unwrap();
    env.unpublish(&id, "node-a").await.unwrap();
    let left = env.vm_disks("node-a");
    assert_eq!(left.len(), 1);
    assert_eq!(left[0]["lun"], 1);
    assert!(env.disk("pvc-a").get("managedBy").is_none());
    // Delete (a 202 + Location operation), twice.
    env.delete(&id).await.unwrap();
    assert!(env.disk("pvc-a").is_null());
    env.delete(&id).await.unwrap();
    env.ctl
        .delete_snapshot(Request::new(DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
            ..Default::default()
        }))
        .await
        .unwrap();
    assert!(env.fake.with(|s| s.snapshots.is_empty()));
    // Unpublish of a deleted volume, and from a VM that does not exist.
    env.unpublish(&id, "node-a").await.unwrap();
    env.unpublish(&ultra.volume_id, "no-such-vm").await.unwrap();

    // One token for the whole run: azure_identity caches it.
    assert_eq!(env.fake.with(|s| s.token_requests), 1);
    env.assert_clean();
}

#[tokio::test]
async fn concurrent_publishes_to_one_vm_get_distinct_luns() {
    let env = setup().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            env.create(create_req(&format!("pvc-c{i}"), GIB, &[]))
                .await
                .unwrap()
                .volume_id,
        );
    }
    // Operations stay in progress a little longer, so that updates overlap.
    env.fake.with(|s| s.polls = 3);
    let mut tasks = tokio::task::JoinSet::new();
    for id in ids.clone() {
        let ctl = env.ctl.clone();
        tasks.spawn(async move {
            ctl.controller_publish_volume(Request::new(ControllerPublishVolumeRequest {
                volume_id: id,
                node_id: "node-a".into(),
                volume_capability: Some(cap()),
                ..Default::default()
            }))
            .await
            .map(|r| r.into_inner().publish_context)
        });
    }
    let mut luns = BTreeSet::new();
    while let Some(r) = tasks.join_next().await {
        luns.insert(lun(&r.unwrap().unwrap()));
    }
    assert_eq!(luns, (0..5).collect());
    assert_eq!(env.vm_disks("node-a").len(), 5);
    env.assert_clean();
}

#[tokio::test]
async fn zones_follow_the_accessibility_requirements() {
    let env = setup().await;
    let zone = |z: &str| Topology {
        segments: HashMap::from([(TOPOLOGY_ZONE.to_string(), z.to_string())]),
    };
    let mut req = create_req("pvc-z", GIB, &[("skuName", "PremiumV2_LRS")]);
    req.accessibility_requirements = Some(TopologyRequirement {
        requisite: vec![zone("eastus-1"), zone("eastus-2")],
        preferred: vec![zone("eastus-2")],
    });
    let v = env.create(req.clone()).await.unwrap();
    assert_eq!(env.disk("pvc-z")["zones"], json!(["2"]));
    assert_eq!(v.accessible_topology, vec![zone("eastus-2")]);
    assert_eq!(env.create(req).await.unwrap().volume_id, v.volume_id);

    let mut elsewhere = create_req("pvc-w", GIB, &[]);
    elsewhere.accessibility_requirements = Some(TopologyRequirement {
        requisite: vec![zone("westus-1")],
        preferred: vec![],
    });
    let e = env.create(elsewhere).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());

    // Capacity: none in another region's zone, no pool limit in ours.
    let capacity = |z: &str| GetCapacityRequest {
        accessible_topology: Some(zone(z)),
        ..Default::default()
    };
    let other = env
        .ctl
        .get_capacity(Request::new(capacity("westus-1")))
        .await
        .unwrap();
    assert_eq!(other.into_inner().available_capacity, 0);
    let here = env
        .ctl
        .get_capacity(Request::new(capacity("eastus-3")))
        .await
        .unwrap()
        .into_inner();
    assert!(here.available_capacity > 1 << 50);
    assert_eq!(here.maximum_volume_size, Some(65_536 * GIB - (16 << 20)));
    env.assert_clean();
}

#[tokio::test]
async fn server_errors_are_retried() {
    let env = setup().await;
    env.fake.with(|s| s.unavailable = 2);
    let before = env.fake.request_count();
    env.create(create_req("pvc-t", GIB, &[])).await.unwrap();
    let calls: Vec<String> = env
        .fake
        .calls_since(before)
        .into_iter()
        .filter(|c| !c.contains("/oauth2/"))
        .collect();
    // GET answered 503, 503, then 404; PUT; polls; final GET.
    assert!(calls.len() >= 6, "{calls:?}");
    assert!(
        calls[..3]
            .iter()
            .all(|c| c.starts_with("GET") && c.ends_with("/disks/pvc-t"))
    );
    env.assert_clean();
}

/// A 429 closes the subscription's read gate or write gate for the whole
/// Retry-After, however much longer than the retry cap it is: requests of
/// that kind answer UNAVAILABLE unsent meanwhile, the other kind goes on.
#[tokio::test]
async fn a_throttled_subscription_is_left_alone_for_the_whole_retry_after() {
    let fake = FakeArm::start().await;
    // The retry cap (20 ms in tests) is far below ARM's Retry-After.
    let c = config(&fake, CLIENT_SECRET);
    assert!(c.retry.max_delay < Duration::from_secs(1));
    let b = backend(&fake, &c);
    let id: crate::volume::VolumeId = "azure:rg-1:x".parse().unwrap();
    // Warm the token cache.
    assert!(b.get_disk(&id).await.unwrap().is_none());
    fake.with(|s| {
        s.throttle = 1;
        s.retry_after_secs = 2;
    });
    let start = Instant::now();
    let e = b.get_disk(&id).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
    assert!(e.message().contains("TooManyRequests"), "{}", e.message());
    // Held back, unsent, until the Retry-After has passed.
    let sent = fake.request_count();
    let e = b.get_disk(&id).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert!(e.message().contains("Retry-After"), "{}", e.message());
    assert_eq!(fake.request_count(), sent);
    // Writes have their own gate: a delete goes out (and answers 204).
    b.arm
        .delete(
            &super::disks::disk_path(SUB, RG, "nothing"),
            super::DISKS_API_VERSION,
        )
        .await
        .unwrap();
    assert_eq!(fake.request_count(), sent + 1);
    while b.get_disk(&id).await.is_err() {
        assert!(start.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        start.elapsed() >= Duration::from_millis(1900),
        "{:?}",
        start.elapsed()
    );
    // A throttled write closes only the write gate.
    fake.with(|s| s.throttle_writes = 1);
    let e = b
        .arm
        .delete(
            &super::disks::disk_path(SUB, RG, "nothing"),
            super::DISKS_API_VERSION,
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert!(b.get_disk(&id).await.unwrap().is_none());
    assert!(fake.problems().is_empty());
}

#[tokio::test]
async fn arm_errors_reach_the_co_with_their_code_and_message() {
    let env = setup().await;
    let quota = "Operation could not be completed as it results in exceeding approved Total Regional Disk quota";
    env.fake
        .inject("PUT", "/disks/pvc-q", 409, "OperationNotAllowed", quota);
    let e = env.create(create_req("pvc-q", GIB, &[])).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(
        e.message().contains("OperationNotAllowed") && e.message().contains(quota),
        "{}",
        e.message()
    );

    env.fake.inject("GET", "/disks/pvc-p", 403, "AuthorizationFailed", "The client 'x' does not have authorization to perform action 'Microsoft.Compute/disks/read'.");
    let e = env.create(create_req("pvc-p", GIB, &[])).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().contains("permission denied")
            && e.message().contains("Microsoft.Compute/disks/read"),
        "{}",
        e.message()
    );

    env.fake.with(|s| {
        s.fail_next_operation = Some((
            "ZonalAllocationFailed".into(),
            "Allocation failed in zone 1.".into(),
        ))
    });
    let e = env.create(create_req("pvc-f", GIB, &[])).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
    assert!(
        e.message().contains("Allocation failed in zone 1."),
        "{}",
        e.message()
    );

    let v = env.create(create_req("pvc-e", GIB, &[])).await.unwrap();
    let e = env.publish(&v.volume_id, "no-such-vm").await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{}", e.message());
    env.fake.inject("PATCH", "/virtualmachines/node-a", 409, "AttachDiskWhileBeingDetached", "Cannot attach data disk 'pvc-e' to VM 'node-a' because the disk is currently being detached.");
    let e = env.publish(&v.volume_id, "node-a").await.unwrap_err();
    assert_eq!(e.code(), Code::Aborted);
    assert!(e.message().contains("being detached"), "{}", e.message());
    assert_eq!(lun(&env.publish(&v.volume_id, "node-a").await.unwrap()), 0);
    // Another operation in progress on the VM: retried, then done.
    let v2 = env.create(create_req("pvc-e2", GIB, &[])).await.unwrap();
    env.fake.inject(
        "PATCH",
        "/virtualmachines/node-a",
        409,
        "Conflict",
        "Operation 'Update VM' is not allowed since another operation is in progress.",
    );
    let before = env.fake.request_count();
    assert_eq!(lun(&env.publish(&v2.volume_id, "node-a").await.unwrap()), 1);
    let patches = env
        .fake
        .calls_since(before)
        .iter()
        .filter(|c| c.starts_with("PATCH"))
        .count();
    assert_eq!(patches, 2);

    // node-b (Standard_B1s) takes two data disks; ARM refuses a third.
    for i in 0..3 {
        let v = env
            .create(create_req(&format!("pvc-b{i}"), GIB, &[]))
            .await
            .unwrap();
        let r = env.publish(&v.volume_id, "node-b").await;
        if i < 2 {
            r.unwrap();
        } else {
            let e = r.unwrap_err();
            assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
            assert!(
                e.message().contains("maximum number of data disks"),
                "{}",
                e.message()
            );
        }
    }

    for (params, what) in [
        (vec![("skuName", "Premium_GRS")], "skuName"),
        (vec![("diskEncryptionSetID", "x")], "diskEncryptionSetID"),
    ] {
        let e = env
            .create(create_req("pvc-bad", GIB, &params))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains(what), "{}", e.message());
    }
    let e = env
        .create(create_req(
            "pvc-huge",
            40_000 * GIB,
            &[("skuName", "Premium_LRS")],
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{}", e.message());
    env.assert_clean();
}

#[tokio::test]
async fn disks_of_others_are_left_alone() {
    let env = setup().await;
    let key = format!(
        "/subscriptions/{SUB}/resourcegroups/{RG}/providers/microsoft.compute/disks/pvc-foreign"
    );
    env.fake.with(|s| {
        s.disks.insert(
            key.clone(),
            json!({"id": key, "name": "pvc-foreign", "sku": {"name": "Premium_LRS"}, "tags": {},
                   "properties": {"diskSizeGB": 2, "provisioningState": "Succeeded"}}),
        )
    });
    let e = env
        .create(create_req("pvc-foreign", GIB, &[]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    let e = env
        .delete(&format!("azure:{RG}:pvc-foreign"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(env.list_all(0).await.is_empty());
    env.assert_clean();
}

#[tokio::test]
async fn a_refused_token_is_failed_precondition_without_the_secret() {
    let fake = FakeArm::start().await;
    let b = backend(&fake, &config(&fake, "wrong-secret-value"));
    let ctl = ControllerService::new(b, None);
    let e = ctl
        .create_volume(Request::new(create_req("pvc-x", GIB, &[])))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    assert!(e.message().contains("AADSTS7000215"), "{}", e.message());
    assert!(!e.message().contains("wrong-secret-value"));
    // No ARM request went out without a token.
    assert!(fake.calls_since(0).iter().all(|c| c.contains("/oauth2/")));
}

#[tokio::test]
async fn an_operation_that_does_not_finish_is_unavailable_and_a_retry_completes_it() {
    let fake = FakeArm::start().await;
    let mut c = config(&fake, CLIENT_SECRET);
    c.operation_timeout = Duration::from_millis(200);
    let ctl = ControllerService::new(backend(&fake, &c), None);
    fake.with(|s| s.polls = 1_000_000);
    let e = ctl
        .create_volume(Request::new(create_req("pvc-slow", GIB, &[])))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
    assert!(e.message().contains("did not finish"), "{}", e.message());
    // Still creating: the retry is told to wait.
    let e = ctl
        .create_volume(Request::new(create_req("pvc-slow", GIB, &[])))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Aborted, "{}", e.message());
    // Once ARM is done, the retry returns the disk.
    let key = format!(
        "/subscriptions/{SUB}/resourcegroups/{RG}/providers/microsoft.compute/disks/pvc-slow"
    );
    fake.with(|s| {
        s.disks.get_mut(&key).unwrap()["properties"]["provisioningState"] = json!("Succeeded")
    });
    let v = ctl
        .create_volume(Request::new(create_req("pvc-slow", GIB, &[])))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(v.volume_id, format!("azure:{RG}:pvc-slow"));
    assert!(fake.problems().is_empty(), "{:?}", fake.problems());
}

#[tokio::test]
async fn a_failed_creation_is_tried_again() {
    let env = setup().await;
    env.fake.with(|s| {
        s.fail_next_operation = Some((
            "InternalDiskManagementError".into(),
            "An internal error occurred.".into(),
        ))
    });
    let e = env
        .create(create_req("pvc-retry", GIB, &[]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Internal, "{}", e.message());
    assert_eq!(
        env.disk("pvc-retry")["properties"]["provisioningState"],
        "Failed"
    );
    let v = env.create(create_req("pvc-retry", GIB, &[])).await.unwrap();
    assert_eq!(v.volume_id, format!("azure:{RG}:pvc-retry"));
    assert_eq!(
        env.disk("pvc-retry")["properties"]["provisioningState"],
        "Succeeded"
    );
    env.assert_clean();
}

#[tokio::test]
async fn workload_identity_exchanges_the_federated_token() {
    let fake = FakeArm::start().await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("azure-identity-token");
    std::fs::write(&token_file, FEDERATED_TOKEN).unwrap();
    let file =
        json!({"subscriptionId": SUB, "resourceGroup": RG, "location": LOCATION}).to_string();
    let (base, path) = (fake.base.clone(), token_file.display().to_string());
    let mut c = AzureConfig::from_parts(
        Some(&file),
        "azure.json",
        |k| match k {
            ENV_ARM_ENDPOINT => Some(base.clone()),
            ENV_AUTHORITY_HOST => Some(FAKE_AUTHORITY.to_string()),
            "AZURE_TENANT_ID" => Some(TENANT.to_string()),
            "AZURE_CLIENT_ID" => Some(CLIENT_ID.to_string()),
            "AZURE_FEDERATED_TOKEN_FILE" => Some(path.clone()),
            _ => None,
        },
        DRIVER,
    )
    .unwrap();
    assert_eq!(
        c.credentials.describe(),
        "workload identity (federated token)"
    );
    c.retry.base_delay = Duration::from_millis(1);
    let b = backend(&fake, &c);
    assert!(
        b.get_disk(&"azure:rg-1:x".parse().unwrap())
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(fake.with(|s| s.token_requests), 1);
    assert!(fake.problems().is_empty(), "{:?}", fake.problems());
}

/// The fresh-disk record (see `crate::volume::fresh`): a tag set in the PUT that
/// creates an empty disk, absent on restores and clones (and ignored there if
/// set by hand), handed to a read-write publication only, and cleared by the
/// first ControllerUnpublish before the detach, with the other tags kept.
#[tokio::test]
async fn the_fresh_record_is_a_tag_of_empty_disks_until_the_first_unpublish() {
    use crate::volume::{FreshRecord, fresh};
    let env = setup().await;
    let params = [("skuName", "Premium_LRS")];
    let v = env
        .create(create_req("pvc-f", 10 * GIB, &params))
        .await
        .unwrap();
    let id = v.volume_id.clone();
    let tag = env.disk("pvc-f")["tags"][fresh::DISK_KEY]
        .as_str()
        .expect("the record is a tag of the new disk")
        .to_string();
    tag.parse::<FreshRecord>().unwrap();
    let puts = env
        .fake
        .calls_since(0)
        .into_iter()
        .filter(|c| c.starts_with("PUT") && c.contains("/disks/pvc-f"))
        .count();
    assert_eq!(puts, 1, "the tag is set in the creating PUT, not after");

    // Copies carry no record.
    let snap = env.snapshot(&id, "snap-f").await.unwrap();
    let mut restore = create_req("pvc-f-restore", 10 * GIB, &params);
    restore.volume_content_source = Some(VolumeContentSource {
        r#type: Some(SourceType::Snapshot(SnapshotSource {
            snapshot_id: snap.snapshot_id.clone(),
        })),
    });
    let restored = env.create(restore).await.unwrap();
    let mut clone = create_req("pvc-f-clone", 10 * GIB, &params);
    clone.volume_content_source = Some(VolumeContentSource {
        r#type: Some(SourceType::Volume(VolumeSource {
            volume_id: id.clone(),
        })),
    });
    let cloned = env.create(clone).await.unwrap();
    for name in ["pvc-f-restore", "pvc-f-clone"] {
        assert!(
            env.disk(name)["tags"].get(fresh::DISK_KEY).is_none(),
            "{name}"
        );
    }
    // A record tag put on a copy by hand is not believed.
    let key = format!(
        "/subscriptions/{SUB}/resourcegroups/{RG}/providers/microsoft.compute/disks/pvc-f-clone"
    )
    .to_ascii_lowercase();
    env.fake
        .with(|s| s.disks.get_mut(&key).unwrap()["tags"][fresh::DISK_KEY] = json!(tag.clone()));
    for copy in [&restored.volume_id, &cloned.volume_id] {
        let ctx = env.publish(copy, "node-b").await.unwrap();
        assert!(!ctx.contains_key(fresh::PUBLISH_KEY), "{copy}: {ctx:?}");
        env.unpublish(copy, "node-b").await.unwrap();
    }

    // A read-write publication carries the record, retries too.
    for _ in 0..2 {
        let ctx = env.publish(&id, "node-a").await.unwrap();
        assert_eq!(ctx.get(fresh::PUBLISH_KEY), Some(&tag));
    }
    // ControllerUnpublish clears it (the driver's other tags stay), then detaches.
    let before = env.fake.request_count();
    env.unpublish(&id, "node-a").await.unwrap();
    let calls = env.fake.calls_since(before);
    let patch_disk = calls
        .iter()
        .position(|c| c.starts_with("PATCH") && c.contains("/disks/pvc-f"));
    let patch_vm = calls
        .iter()
        .position(|c| c.starts_with("PATCH") && c.contains("/virtualmachines/"));
    assert!(patch_disk.unwrap() < patch_vm.unwrap(), "{calls:?}");
    let disk = env.disk("pvc-f");
    assert!(disk["tags"].get(fresh::DISK_KEY).is_none(), "{disk}");
    assert_eq!(disk["tags"]["k8s-azure-created-by"], DRIVER);
    assert_eq!(disk["tags"]["kubernetes.io-created-for-pv-name"], "pvc-f");
    // Every later publication goes without it; unpublishing again is a no-op.
    let ctx = env.publish(&id, "node-a").await.unwrap();
    assert!(!ctx.contains_key(fresh::PUBLISH_KEY), "{ctx:?}");
    env.unpublish(&id, "node-a").await.unwrap();
    env.unpublish(&id, "node-a").await.unwrap();
}

/// A snapshot reports the usable size the CO holds its source as (not the whole
/// GiB disk under it), and restores into exactly that: plain, integrity, and
/// expanded before the snapshot.
#[tokio::test]
async fn snapshots_restore_into_their_usable_size() {
    let env = setup().await;
    crate::csi::controller::restore_size::check(&env.ctl, GIB as u64, 3 * GIB as u64).await;
    // The key scope a copy inherits rides on it as a tag; an empty disk has
    // none (its scope is its own id).
    let name = super::disks::resource_name;
    let scope_of = |disk: &str| env.disk(&name(disk))["tags"][super::disks::TAG_SCOPE].clone();
    assert_eq!(scope_of("plain-src"), Value::Null);
    let source_id = json!(format!("azure:{RG}:{}", name("plain-src")));
    for copy in ["plain-restore", "plain-clone", "plain-restore-of-restore"] {
        assert_eq!(scope_of(copy), source_id, "{copy}");
    }
    // The usable size rides on the disk and the snapshot as a tag.
    let disk = env.disk(&super::disks::resource_name("grown-src"));
    assert_eq!(
        disk["tags"][super::disks::TAG_USABLE],
        json!((4 * GIB - (16 << 20)).to_string()),
        "{disk}"
    );
    env.assert_clean();
}

/// The node's check of a LUN against IMDS, with the fake's IMDS showing node-a
/// the disks the controller attached to it.
mod lun_identity {
    use super::*;
    use crate::mount::device::azure::{ImdsCheck, check_disk_at_lun};
    use crate::volume::VolumeId;

    fn imds(fake: &FakeArm) -> ImdsCheck {
        ImdsCheck {
            endpoint: fake.base.clone(),
            attempts: 2,
            delay: Duration::from_millis(1),
        }
    }

    fn imds_calls(env: &Env) -> usize {
        env.fake.with(|s| {
            s.requests
                .iter()
                .filter(|r| r.path == "/metadata/instance")
                .count()
        })
    }

    /// On an NVMe-only size in a Uniform scale set: the device found by LUN
    /// (namespace LUN + 2) is used only when IMDS, asked as the scale-set
    /// instance, lists the volume's disk at that LUN.
    #[tokio::test]
    async fn nvme_devices_of_a_scale_set_instance_are_checked_against_imds() {
        use crate::mount::device::HostRoots;
        use crate::mount::device::azure::{
            AZURE_NVME_REMOTE_MODEL, fake_nvme_namespace, verified_device,
        };
        let env = setup_with(|c| c.vm_type = VmType::Vmss).await;
        env.fake
            .add_scale_set_vm("pool-vmss", "0", "Standard_D4s_v6");
        let mut vols = Vec::new();
        for name in ["pvc-nv-a", "pvc-nv-b"] {
            let v = env.create(create_req(name, GIB, &[])).await.unwrap();
            let ctx = env.publish(&v.volume_id, "pool-vmss_0").await.unwrap();
            vols.push((v.volume_id.parse::<VolumeId>().unwrap(), lun(&ctx)));
        }
        env.fake.with(|s| s.imds_vm = Some("pool-vmss_0".into()));
        let t = tempfile::tempdir().unwrap();
        fake_nvme_namespace(t.path(), "nvme0", AZURE_NVME_REMOTE_MODEL, "nvme0n1", 1);
        for (_, l) in &vols {
            let ns = format!("nvme0n{}", l + 2);
            fake_nvme_namespace(t.path(), "nvme0", AZURE_NVME_REMOTE_MODEL, &ns, l + 2);
        }
        let roots = HostRoots::under(t.path());
        let wait = |id: VolumeId, l: u32| {
            let roots = roots.clone();
            let check = imds(&env.fake);
            async move {
                verified_device(
                    &roots,
                    &check,
                    &id,
                    l,
                    Duration::from_millis(200),
                    Duration::from_millis(10),
                )
                .await
            }
        };
        let (a, la) = vols[0].clone();
        let (b, lb) = vols[1].clone();
        assert_eq!(
            wait(a.clone(), la).await.unwrap(),
            t.path().join(format!("dev/nvme0n{}", la + 2))
        );
        assert_eq!(
            wait(b.clone(), lb).await.unwrap(),
            t.path().join(format!("dev/nvme0n{}", lb + 2))
        );
        // Volume a's publish context naming b's LUN: the device is there, but
        // it is not a's disk.
        let e = wait(a.clone(), lb).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
        assert!(e.message().contains("pool-vmss_0"), "{}", e.message());
        assert_eq!(imds_calls(&env), 3);
        env.assert_clean();
    }

    /// Two volumes published to node-a, IMDS answering as node-a.
    async fn two_published() -> (Env, VolumeId, u32, VolumeId, u32) {
        let env = setup().await;
        let mut out = Vec::new();
        for name in ["pvc-lun-a", "pvc-lun-b"] {
            let v = env.create(create_req(name, GIB, &[])).await.unwrap();
            let ctx = env.publish(&v.volume_id, "node-a").await.unwrap();
            out.push((v.volume_id.parse::<VolumeId>().unwrap(), lun(&ctx)));
        }
        env.fake.with(|s| s.imds_vm = Some("node-a".into()));
        let (b, lb) = out.pop().unwrap();
        let (a, la) = out.pop().unwrap();
        assert_ne!(la, lb);
        (env, a, la, b, lb)
    }

    #[tokio::test]
    async fn the_volumes_own_disk_at_its_lun_passes_after_asking_imds() {
        let (env, a, la, b, lb) = two_published().await;
        check_disk_at_lun(&imds(&env.fake), &a, la).await.unwrap();
        check_disk_at_lun(&imds(&env.fake), &b, lb).await.unwrap();
        // It was IMDS that said so, not a check that was skipped.
        assert_eq!(imds_calls(&env), 2);
        env.assert_clean();
    }

    #[tokio::test]
    async fn another_volumes_disk_at_the_lun_is_failed_precondition() {
        let (env, a, _, b, lb) = two_published().await;
        let e = check_disk_at_lun(&imds(&env.fake), &a, lb)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
        let m = e.message();
        assert!(m.contains(&format!("LUN {lb}")), "{m}");
        assert!(m.contains(&format!("/disks/{}", b.disk())), "{m}");
        assert!(
            m.contains(&format!("disk {} in resource group {RG}", a.disk())),
            "{m}"
        );
        env.assert_clean();
    }

    #[tokio::test]
    async fn an_empty_lun_is_failed_precondition() {
        let (env, a, _, _, _) = two_published().await;
        let e = check_disk_at_lun(&imds(&env.fake), &a, 7)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
        let m = e.message();
        assert!(m.contains("LUN 7") && m.contains("no data disk"), "{m}");
        assert!(m.contains(a.disk()), "{m}");
        env.assert_clean();
    }

    #[tokio::test]
    async fn a_disk_of_the_same_name_in_another_resource_group_is_failed_precondition() {
        let (env, a, la, _, _) = two_published().await;
        // The volume id names a disk of that name in rg-2; the one at the LUN
        // is in rg-1.
        let other: VolumeId = format!("azure:rg-2:{}", a.disk()).parse().unwrap();
        let e = check_disk_at_lun(&imds(&env.fake), &other, la)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
        let m = e.message();
        assert!(m.contains(&format!("resourceGroups/{RG}/")), "{m}");
        assert!(m.contains("resource group rg-2"), "{m}");
        env.assert_clean();
    }

    #[tokio::test]
    async fn an_unreachable_or_unready_imds_is_unavailable() {
        let (env, a, la, _, _) = two_published().await;
        // Nothing listens on a port just released.
        let closed = {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            format!("http://{}", l.local_addr().unwrap())
        };
        let check = ImdsCheck {
            endpoint: closed,
            ..imds(&env.fake)
        };
        let e = check_disk_at_lun(&check, &a, la).await.unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{e}");
        assert!(e.message().contains(&format!("LUN {la}")), "{e}");
        // IMDS answering 404 (as it does while it starts) on every try.
        env.fake.with(|s| s.imds_vm = None);
        let e = check_disk_at_lun(&imds(&env.fake), &a, la)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{e}");
        assert_eq!(imds_calls(&env), 2);
    }
}

/// AKS node pools are Uniform scale sets (`vmType: vmss`): their instances,
/// named `<scale set>_<instance id>` by IMDS, are updated through the scale-set
/// VM API, and a disk attached there names the instance in `managedBy`.
#[tokio::test]
async fn uniform_scale_set_instances_are_attached_through_the_scale_set_vm_api() {
    let env = setup_with(|c| c.vm_type = VmType::Vmss).await;
    env.fake
        .add_scale_set_vm("aks-pool1-12345678-vmss", "3", "Standard_D4s_v5");
    let node = "aks-pool1-12345678-vmss_3";
    let v = env.create(create_req("pvc-ss", GIB, &[])).await.unwrap();
    let before = env.fake.request_count();
    let ctx = env.publish(&v.volume_id, node).await.unwrap();
    assert_eq!(lun(&ctx), 0);
    let calls = env.fake.calls_since(before);
    assert!(
        calls.iter().any(|c| c
            == "PUT /subscriptions/sub-1/resourcegroups/rg-1/providers/microsoft.compute/virtualmachinescalesets/aks-pool1-12345678-vmss/virtualmachines/3"),
        "{calls:?}"
    );
    assert!(
        env.disk("pvc-ss")["managedBy"]
            .as_str()
            .unwrap()
            .ends_with("/virtualMachineScaleSets/aks-pool1-12345678-vmss/virtualMachines/3")
    );
    // The instance is read back from managedBy: published there, refused
    // elsewhere, and a second publish is idempotent.
    assert_eq!(
        env.list_all(0).await,
        vec![(v.volume_id.clone(), vec![node.to_string()])]
    );
    let e = env.publish(&v.volume_id, "node-a").await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    assert!(e.message().contains(node), "{}", e.message());
    assert_eq!(env.publish(&v.volume_id, node).await.unwrap(), ctx);
    env.unpublish(&v.volume_id, node).await.unwrap();
    assert!(env.disk("pvc-ss").get("managedBy").is_none());
    // Standalone VMs keep working in a vmss cluster.
    env.publish(&v.volume_id, "node-a").await.unwrap();
    env.unpublish(&v.volume_id, "node-a").await.unwrap();
    env.assert_clean();
}

/// Flexible scale sets' instances are ordinary VMs (`vmType: vmssflex`).
#[tokio::test]
async fn flexible_scale_set_instances_are_ordinary_vms() {
    let env = setup_with(|c| c.vm_type = VmType::VmssFlex).await;
    let v = env.create(create_req("pvc-fx", GIB, &[])).await.unwrap();
    env.publish(&v.volume_id, "node-a").await.unwrap();
    assert_eq!(env.vm_disks("node-a").len(), 1);
    // A Uniform instance name is not served without vmType: vmss, and says so.
    let e = env.publish(&v.volume_id, "ss_1").await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    env.unpublish(&v.volume_id, "node-a").await.unwrap();
    let e = env.publish(&v.volume_id, "ss_1").await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{}", e.message());
    assert!(e.message().contains("vmType: vmss"), "{}", e.message());
    env.assert_clean();
}

fn disk_key(name: &str) -> String {
    format!("/subscriptions/{SUB}/resourcegroups/{RG}/providers/microsoft.compute/disks/{name}")
}

fn vm_key(name: &str) -> String {
    format!(
        "/subscriptions/{SUB}/resourcegroups/{RG}/providers/microsoft.compute/virtualmachines/{name}"
    )
}

/// A detach the VM does not complete is seen (the VM still lists the disk)
/// and done again with `ForceDetach`.
#[tokio::test]
async fn a_detach_that_does_not_take_is_forced() {
    let env = setup().await;
    let v = env.create(create_req("pvc-stuck", GIB, &[])).await.unwrap();
    env.publish(&v.volume_id, "node-a").await.unwrap();
    env.fake
        .with(|s| s.stuck_detach.insert(disk_key("pvc-stuck")));
    let before = env.fake.request_count();
    env.unpublish(&v.volume_id, "node-a").await.unwrap();
    assert_eq!(env.vm_disks("node-a"), Vec::<Value>::new());
    assert!(env.disk("pvc-stuck").get("managedBy").is_none());
    let forced = env.fake.with(|s| {
        s.requests[before..]
            .iter()
            .filter(|r| {
                r.method == "PATCH" && String::from_utf8_lossy(&r.body).contains("\"ForceDetach\"")
            })
            .count()
    });
    assert_eq!(forced, 1);
    env.assert_clean();
}

/// A disk listed on the VM that no longer exists makes ARM answer 404: that
/// is not the detach's success while the VM exists; the vanished disk is
/// dropped from the list and the detach done.
#[tokio::test]
async fn a_vanished_disk_on_the_vm_is_dropped_and_a_404_is_success_only_when_the_vm_is_gone() {
    let env = setup().await;
    let v = env.create(create_req("pvc-keep", GIB, &[])).await.unwrap();
    let w = env.create(create_req("pvc-gone", GIB, &[])).await.unwrap();
    env.publish(&v.volume_id, "node-a").await.unwrap();
    env.publish(&w.volume_id, "node-a").await.unwrap();
    env.fake.with(|s| s.disks.remove(&disk_key("pvc-gone")));
    env.unpublish(&v.volume_id, "node-a").await.unwrap();
    assert_eq!(env.vm_disks("node-a"), Vec::<Value>::new());
    assert!(env.disk("pvc-keep").get("managedBy").is_none());
    // Attach drops it as well.
    env.fake.with(|s| s.disks.remove(&disk_key("pvc-gone")));
    env.publish(&v.volume_id, "node-a").await.unwrap();
    // The VM gone: detached.
    env.fake.with(|s| s.vms.remove(&vm_key("node-a")));
    env.unpublish(&v.volume_id, "node-a").await.unwrap();
    env.assert_clean();
}

/// Another writer changed the VM's disk list between our read and write: the
/// write carries the etag read (`If-Match`), ARM answers 412, and the list is
/// read again, so the other writer's disk stays attached.
#[tokio::test]
async fn a_concurrent_writer_of_the_disk_list_is_not_overwritten() {
    let env = setup().await;
    let theirs = env
        .create(create_req("pvc-theirs", GIB, &[]))
        .await
        .unwrap();
    let ours = env.create(create_req("pvc-ours", GIB, &[])).await.unwrap();
    env.fake.with(|s| {
        s.foreign_attach = Some((vm_key("node-a"), disk_key("pvc-theirs"), 0));
    });
    let ctx = env.publish(&ours.volume_id, "node-a").await.unwrap();
    assert_eq!(lun(&ctx), 1);
    assert_eq!(env.vm_disks("node-a").len(), 2);
    assert!(
        env.disk("pvc-theirs")["managedBy"]
            .as_str()
            .unwrap()
            .ends_with("/node-a")
    );
    let matched = env.fake.with(|s| {
        s.requests
            .iter()
            .filter(|r| r.method == "PATCH" && !r.header("if-match").is_empty())
            .count()
    });
    assert_eq!(matched, 2, "both writes carry If-Match");
    // Our detach leaves their disk in place.
    env.fake.with(|s| {
        s.foreign_attach = None;
    });
    env.unpublish(&ours.volume_id, "node-a").await.unwrap();
    assert_eq!(env.vm_disks("node-a").len(), 1);
    let _ = theirs;
    env.assert_clean();
}

fn zone_topo(z: &str) -> Topology {
    Topology {
        segments: HashMap::from([(TOPOLOGY_ZONE.to_string(), z.to_string())]),
    }
}

fn in_zones(req: &mut CreateVolumeRequest, zones: &[&str]) {
    req.accessibility_requirements = Some(TopologyRequirement {
        requisite: zones.iter().map(|z| zone_topo(z)).collect(),
        preferred: zones.iter().map(|z| zone_topo(z)).collect(),
    });
}

/// ARM copies a zonal disk only within its zone: a clone is pinned to its
/// source's zone, and a topology that excludes that zone is
/// RESOURCE_EXHAUSTED; a snapshot restores into any zone.
#[tokio::test]
async fn clones_stay_in_their_sources_zone() {
    let env = setup().await;
    let mut src = create_req("pvc-src", GIB, &[]);
    in_zones(&mut src, &["eastus-2"]);
    let src = env.create(src).await.unwrap();
    let clone_of = |name: &str| {
        let mut r = create_req(name, GIB, &[]);
        r.volume_content_source = Some(VolumeContentSource {
            r#type: Some(SourceType::Volume(VolumeSource {
                volume_id: src.volume_id.clone(),
            })),
        });
        r
    };
    // No topology asked: the source's zone.
    let c = env.create(clone_of("pvc-clone")).await.unwrap();
    assert_eq!(env.disk("pvc-clone")["zones"], json!(["2"]));
    assert_eq!(c.accessible_topology, vec![zone_topo("eastus-2")]);
    // A topology admitting it, not first: still the source's zone.
    let mut r = clone_of("pvc-clone2");
    in_zones(&mut r, &["eastus-1", "eastus-2"]);
    env.create(r).await.unwrap();
    assert_eq!(env.disk("pvc-clone2")["zones"], json!(["2"]));
    // A topology that excludes it.
    let mut r = clone_of("pvc-clone3");
    in_zones(&mut r, &["eastus-1"]);
    let e = env.create(r).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
    assert!(e.message().contains("eastus-2"), "{}", e.message());
    // A snapshot of it restores into another zone.
    let snap = env.snapshot(&src.volume_id, "snap-z").await.unwrap();
    let mut r = create_req("pvc-restored", GIB, &[]);
    r.volume_content_source = Some(VolumeContentSource {
        r#type: Some(SourceType::Snapshot(SnapshotSource {
            snapshot_id: snap.snapshot_id,
        })),
    });
    in_zones(&mut r, &["eastus-1"]);
    env.create(r).await.unwrap();
    assert_eq!(env.disk("pvc-restored")["zones"], json!(["1"]));
    env.assert_clean();
}

/// Topology as Azure's disk CSI driver has it: nodes in no zone publish
/// `zone=""`, and disks in no zone are accessible from there only; zone-
/// redundant SKUs are regional and accessible from everywhere; Premium SSD v2
/// and Ultra need a zone; new disks are closed to the network.
#[tokio::test]
async fn regional_disks_zone_redundant_skus_and_zone_only_skus() {
    let env = setup().await;
    // No topology asked: a disk in no zone, for nodes in no zone.
    let v = env.create(create_req("pvc-reg", GIB, &[])).await.unwrap();
    assert!(env.disk("pvc-reg").get("zones").is_none());
    assert_eq!(v.accessible_topology, vec![zone_topo("")]);
    let props = &env.disk("pvc-reg")["properties"];
    assert_eq!(props["networkAccessPolicy"], "DenyAll");
    assert_eq!(props["publicNetworkAccess"], "Disabled");
    // Asked for by nodes in no zone.
    let mut r = create_req("pvc-reg2", GIB, &[]);
    in_zones(&mut r, &[""]);
    let v = env.create(r).await.unwrap();
    assert!(env.disk("pvc-reg2").get("zones").is_none());
    assert_eq!(v.accessible_topology, vec![zone_topo("")]);
    // Zone-redundant: no zone whatever the topology, accessible everywhere.
    let mut r = create_req("pvc-zrs", GIB, &[("skuName", "Premium_ZRS")]);
    in_zones(&mut r, &["eastus-1"]);
    let v = env.create(r).await.unwrap();
    assert!(env.disk("pvc-zrs").get("zones").is_none());
    assert_eq!(v.accessible_topology, vec![]);
    // Premium SSD v2 without a zone: refused; a zone is picked past "".
    let e = env
        .create(create_req("pvc-v2", GIB, &[("skuName", "PremiumV2_LRS")]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    let mut r = create_req("pvc-v2", GIB, &[("skuName", "PremiumV2_LRS")]);
    in_zones(&mut r, &["", "eastus-3"]);
    env.create(r).await.unwrap();
    assert_eq!(env.disk("pvc-v2")["zones"], json!(["3"]));
    let mut r = create_req("pvc-u", GIB, &[("skuName", "UltraSSD_LRS")]);
    in_zones(&mut r, &[""]);
    let e = env.create(r).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
    // Capacity for nodes in no zone.
    let here = env
        .ctl
        .get_capacity(Request::new(GetCapacityRequest {
            accessible_topology: Some(zone_topo("")),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(here.available_capacity > 0);
    env.assert_clean();
}
