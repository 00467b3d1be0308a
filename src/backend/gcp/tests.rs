//! The GCP backend through the CSI Controller service, against the in-process
//! Compute fake ([`super::fake`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tonic::{Code, Request};

use super::fake::{self, Fake, PROJECT, error};
use super::{GcpBackend, GcpConfig, Retry, config};
use crate::csi::controller::ControllerService;
use crate::proto::csi::controller_server::Controller;
use crate::proto::csi::volume_capability::access_mode::Mode;
use crate::proto::csi::volume_capability::{AccessMode, AccessType, MountVolume};
use crate::proto::csi::volume_content_source::{SnapshotSource, Type as SourceType, VolumeSource};
use crate::proto::csi::*;

const GIB: i64 = 1 << 30;
const ZONE_KEY: &str = "topology.cryptdisk.csi.io/zone";

async fn setup() -> (Fake, ControllerService) {
    let fake = Fake::start().await;
    let mut cfg = GcpConfig::new(PROJECT, "us-central1-a");
    cfg.endpoint = Some(fake.url.clone());
    cfg.retry = Retry {
        max_attempts: 4,
        base_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(5),
    };
    cfg.poll_interval = Duration::from_millis(1);
    let backend = GcpBackend::connect(cfg, config::anonymous_credentials())
        .await
        .unwrap();
    (fake, ControllerService::new(Arc::new(backend), None))
}

fn cap(mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: "ext4".into(),
            mount_flags: vec![],
            volume_mount_group: String::new(),
        })),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

fn zones(list: &[&str]) -> Vec<Topology> {
    list.iter()
        .map(|z| Topology {
            segments: HashMap::from([(ZONE_KEY.to_string(), z.to_string())]),
        })
        .collect()
}

fn create(name: &str, gib: i64, params: &[(&str, &str)]) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: gib * GIB,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![cap(Mode::SingleNodeWriter)],
        parameters: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    }
}

fn publish(volume: &str, node: &str, readonly: bool) -> ControllerPublishVolumeRequest {
    ControllerPublishVolumeRequest {
        volume_id: volume.into(),
        node_id: node.into(),
        volume_capability: Some(cap(if readonly {
            Mode::SingleNodeReaderOnly
        } else {
            Mode::SingleNodeWriter
        })),
        readonly,
        ..Default::default()
    }
}

fn unpublish(volume: &str, node: &str) -> ControllerUnpublishVolumeRequest {
    ControllerUnpublishVolumeRequest {
        volume_id: volume.into(),
        node_id: node.into(),
        ..Default::default()
    }
}

fn calls<'a>(seen: &'a [fake::Seen], method: &str, suffix: &str) -> Vec<&'a fake::Seen> {
    seen.iter()
        .filter(|s| s.method == method && s.path.ends_with(suffix))
        .collect()
}

fn api(path: &str) -> String {
    format!("/compute/v1/projects/{PROJECT}/{path}")
}

#[tokio::test]
async fn zonal_lifecycle() {
    let (fake, ctl) = setup().await;
    fake.add_instance("us-central1-b", "vm-1");
    fake.add_instance("us-central1-c", "vm-2");

    // CreateVolume honours requisite and preferred zones.
    let mut req = create("pvc-1", 5, &[("type", "pd-ssd")]);
    req.accessibility_requirements = Some(TopologyRequirement {
        requisite: zones(&["us-central1-a", "us-central1-b"]),
        preferred: zones(&["us-central1-b", "us-central1-a"]),
    });
    let vol = ctl
        .create_volume(Request::new(req.clone()))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(vol.volume_id, "gcp:us-central1-b:pvc-1");
    assert_eq!(vol.capacity_bytes, 5 * GIB);
    assert_eq!(vol.accessible_topology, zones(&["us-central1-b"]));

    let seen = fake.seen();
    let inserts = calls(&seen, "POST", &api("zones/us-central1-b/disks"));
    assert_eq!(inserts.len(), 1);
    let insert = inserts[0];
    assert!(uuid::Uuid::parse_str(&insert.query["requestId"]).is_ok());
    let body = &insert.body;
    assert_eq!(body["name"], "pvc-1");
    // 5 GiB usable + the LUKS2 header rounds up to 6 GiB, above pd-ssd's minimum of 10.
    assert_eq!(body["sizeGb"], "10");
    assert_eq!(
        body["type"],
        format!("projects/{PROJECT}/zones/us-central1-b/diskTypes/pd-ssd")
    );
    assert_eq!(body["labels"]["cryptdisk-csi-driver"], "cryptdisk_csi_io");
    assert_eq!(body["labels"]["cryptdisk-csi-name"], "pvc-1");
    let note: Value = serde_json::from_str(body["description"].as_str().unwrap()).unwrap();
    assert_eq!(note["cryptdisk"]["name"], "pvc-1");
    assert!(body.get("replicaZones").is_none());
    // The operation was waited on in its zone until DONE (PENDING → RUNNING → DONE).
    let waits: Vec<_> = seen
        .iter()
        .filter(|s| {
            s.path.starts_with(&api("zones/us-central1-b/operations/")) && s.path.ends_with("/wait")
        })
        .collect();
    assert_eq!(waits.len(), 2, "{waits:?}");

    // Idempotent retry: the same volume, no second insert.
    fake.clear_seen();
    let again = ctl
        .create_volume(Request::new(req.clone()))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(again.volume_id, vol.volume_id);
    assert!(calls(&fake.seen(), "POST", "/disks").is_empty());

    // The same name with another size or type: ALREADY_EXISTS.
    let mut bigger = req.clone();
    bigger.capacity_range.as_mut().unwrap().required_bytes = 40 * GIB;
    let e = ctl.create_volume(Request::new(bigger)).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    let mut other_type = req.clone();
    other_type
        .parameters
        .insert("type".into(), "pd-standard".into());
    let e = ctl
        .create_volume(Request::new(other_type))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");

    // Publish: attachDisk with the disk's device name, returned in the context.
    fake.clear_seen();
    let ctx = ctl
        .controller_publish_volume(Request::new(publish(
            &vol.volume_id,
            "us-central1-b.vm-1",
            false,
        )))
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    assert_eq!(ctx.get("gcpDeviceName").map(String::as_str), Some("pvc-1"));
    let seen = fake.seen();
    let attach = calls(
        &seen,
        "POST",
        &api("zones/us-central1-b/instances/vm-1/attachDisk"),
    );
    assert_eq!(attach.len(), 1);
    assert_eq!(
        attach[0].body,
        json!({"source": format!("projects/{PROJECT}/zones/us-central1-b/disks/pvc-1"),
            "deviceName": "pvc-1", "mode": "READ_WRITE", "type": "PERSISTENT", "autoDelete": false})
    );
    // Idempotent re-publish: no second attach.
    fake.clear_seen();
    let ctx2 = ctl
        .controller_publish_volume(Request::new(publish(
            &vol.volume_id,
            "us-central1-b.vm-1",
            false,
        )))
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    assert_eq!(ctx2, ctx);
    assert!(calls(&fake.seen(), "POST", "/attachDisk").is_empty());
    // Read-only on the same node while attached read-write: incompatible.
    let e = ctl
        .controller_publish_volume(Request::new(publish(
            &vol.volume_id,
            "us-central1-b.vm-1",
            true,
        )))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    // Another node while published: FAILED_PRECONDITION.
    let e = ctl
        .controller_publish_volume(Request::new(publish(
            &vol.volume_id,
            "us-central1-c.vm-2",
            false,
        )))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let got = ctl
        .controller_get_volume(Request::new(ControllerGetVolumeRequest {
            volume_id: vol.volume_id.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        got.status.unwrap().published_node_ids,
        vec!["us-central1-b.vm-1".to_string()]
    );
    // Deleting an attached disk: FAILED_PRECONDITION.
    let e = ctl
        .delete_volume(Request::new(DeleteVolumeRequest {
            volume_id: vol.volume_id.clone(),
            secrets: HashMap::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");

    // Unpublish, twice.
    fake.clear_seen();
    for _ in 0..2 {
        ctl.controller_unpublish_volume(Request::new(unpublish(
            &vol.volume_id,
            "us-central1-b.vm-1",
        )))
        .await
        .unwrap();
    }
    let seen = fake.seen();
    let detach = calls(
        &seen,
        "POST",
        &api("zones/us-central1-b/instances/vm-1/detachDisk"),
    );
    assert_eq!(detach.len(), 1);
    assert_eq!(detach[0].query["deviceName"], "pvc-1");
    let vm = fake
        .resource(&format!(
            "projects/{PROJECT}/zones/us-central1-b/instances/vm-1"
        ))
        .unwrap();
    assert_eq!(
        vm["disks"].as_array().unwrap().len(),
        1,
        "only the boot disk is left"
    );

    // Expand.
    fake.clear_seen();
    let grown = ctl
        .controller_expand_volume(Request::new(ControllerExpandVolumeRequest {
            volume_id: vol.volume_id.clone(),
            capacity_range: Some(CapacityRange {
                required_bytes: 30 * GIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(grown.capacity_bytes >= 30 * GIB);
    assert!(grown.node_expansion_required);
    let seen = fake.seen();
    let resize = calls(
        &seen,
        "POST",
        &api("zones/us-central1-b/disks/pvc-1/resize"),
    );
    assert_eq!(resize.len(), 1);
    assert_eq!(resize[0].body, json!({"sizeGb": "31"}));

    // Snapshot, idempotent; the same name for another volume is ALREADY_EXISTS.
    let snap_req = CreateSnapshotRequest {
        source_volume_id: vol.volume_id.clone(),
        name: "snap-1".into(),
        ..Default::default()
    };
    let snap = ctl
        .create_snapshot(Request::new(snap_req.clone()))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(snap.snapshot_id, "gcp:global:snap-1");
    assert_eq!(snap.source_volume_id, vol.volume_id);
    assert!(snap.ready_to_use);
    // The usable size the expansion reported (31 GiB less the LUKS2 header),
    // not the 31 GiB disk: what the CO restores it into.
    assert_eq!(snap.size_bytes, grown.capacity_bytes);
    assert_eq!(snap.size_bytes, 31 * GIB - (16 << 20));
    assert!(snap.creation_time.unwrap().seconds > 1_700_000_000);
    let seen = fake.seen();
    let snap_insert = calls(&seen, "POST", &api("global/snapshots"));
    assert_eq!(snap_insert.len(), 1);
    assert_eq!(
        snap_insert[0].body["sourceDisk"],
        format!("projects/{PROJECT}/zones/us-central1-b/disks/pvc-1")
    );
    assert!(
        seen.iter()
            .any(|s| s.path.starts_with(&api("global/operations/")))
    );
    let again = ctl
        .create_snapshot(Request::new(snap_req.clone()))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(again.snapshot_id, snap.snapshot_id);

    // Restore from the snapshot, in a zone the requirement allows.
    let mut restore = create("pvc-restored", 30, &[("type", "pd-ssd")]);
    restore.volume_content_source = Some(VolumeContentSource {
        r#type: Some(SourceType::Snapshot(SnapshotSource {
            snapshot_id: snap.snapshot_id.clone(),
        })),
    });
    restore.accessibility_requirements = Some(TopologyRequirement {
        requisite: zones(&["us-central1-c"]),
        preferred: vec![],
    });
    let restored = ctl
        .create_volume(Request::new(restore))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(restored.volume_id, "gcp:us-central1-c:pvc-restored");
    let disk = fake
        .resource(&format!(
            "projects/{PROJECT}/zones/us-central1-c/disks/pvc-restored"
        ))
        .unwrap();
    assert!(
        disk["sourceSnapshot"]
            .as_str()
            .unwrap()
            .ends_with("/global/snapshots/snap-1")
    );
    assert!(matches!(
        restored.content_source.unwrap().r#type,
        Some(SourceType::Snapshot(_))
    ));
    // Another volume's snapshot under the same name.
    let mut other = snap_req.clone();
    other.source_volume_id = restored.volume_id.clone();
    let e = ctl.create_snapshot(Request::new(other)).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");

    // Clone: stays in its source's zone.
    let mut clone = create("pvc-clone", 30, &[("type", "pd-ssd")]);
    clone.volume_content_source = Some(VolumeContentSource {
        r#type: Some(SourceType::Volume(VolumeSource {
            volume_id: vol.volume_id.clone(),
        })),
    });
    let cloned = ctl
        .create_volume(Request::new(clone))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(cloned.volume_id, "gcp:us-central1-b:pvc-clone");
    let disk = fake
        .resource(&format!(
            "projects/{PROJECT}/zones/us-central1-b/disks/pvc-clone"
        ))
        .unwrap();
    assert!(
        disk["sourceDisk"]
            .as_str()
            .unwrap()
            .ends_with("/zones/us-central1-b/disks/pvc-1")
    );
    // A clone smaller than its source is refused.
    let mut small = create("pvc-small-clone", 1, &[("type", "pd-ssd")]);
    small.volume_content_source = cloned_source(&vol.volume_id);
    let e = ctl.create_volume(Request::new(small)).await.unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");

    // A disk that is not ours is neither listed nor adopted.
    fake.put(
        &format!("projects/{PROJECT}/zones/us-central1-a/disks/pvc-foreign"),
        json!({"name": "pvc-foreign", "sizeGb": "10", "status": "READY",
            "zone": format!("https://www.googleapis.com/compute/v1/projects/{PROJECT}/zones/us-central1-a"),
            "type": format!("https://www.googleapis.com/compute/v1/projects/{PROJECT}/zones/us-central1-a/diskTypes/pd-balanced"),
            "users": [], "labels": {"team": "x"}}),
    );
    let e = ctl
        .create_volume(Request::new(create("pvc-foreign", 1, &[])))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    ctl.delete_volume(Request::new(DeleteVolumeRequest {
        volume_id: "gcp:us-central1-a:pvc-foreign".into(),
        secrets: HashMap::new(),
    }))
    .await
    .unwrap();
    assert!(
        fake.resource(&format!(
            "projects/{PROJECT}/zones/us-central1-a/disks/pvc-foreign"
        ))
        .is_some()
    );

    // ListVolumes, one entry a page (the fake pages Compute's answer by two).
    let mut ids = Vec::new();
    let mut token = String::new();
    loop {
        let page = ctl
            .list_volumes(Request::new(ListVolumesRequest {
                max_entries: 1,
                starting_token: token.clone(),
            }))
            .await
            .unwrap()
            .into_inner();
        assert!(page.entries.len() <= 1);
        ids.extend(
            page.entries
                .into_iter()
                .map(|e| e.volume.unwrap().volume_id),
        );
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    assert_eq!(
        ids,
        vec![
            "gcp:us-central1-b:pvc-1",
            "gcp:us-central1-b:pvc-clone",
            "gcp:us-central1-c:pvc-restored"
        ]
    );
    let e = ctl
        .list_volumes(Request::new(ListVolumesRequest {
            max_entries: 1,
            starting_token: "not-a-token".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Aborted);
    let seen = fake.seen();
    let lists = calls(&seen, "GET", &api("aggregated/disks"));
    assert!(
        lists
            .iter()
            .any(|s| s.query.get("pageToken").is_some_and(|t| !t.is_empty()))
    );
    assert!(
        lists
            .iter()
            .all(|s| s.query["filter"] == "labels.cryptdisk-csi-driver = \"cryptdisk_csi_io\"")
    );

    // ListSnapshots by source.
    let snaps = ctl
        .list_snapshots(Request::new(ListSnapshotsRequest {
            source_volume_id: vol.volume_id.clone(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(snaps.entries.len(), 1);
    let none = ctl
        .list_snapshots(Request::new(ListSnapshotsRequest {
            source_volume_id: restored.volume_id.clone(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(none.entries.is_empty());

    // Delete everything, each twice.
    for _ in 0..2 {
        ctl.delete_snapshot(Request::new(DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
            secrets: HashMap::new(),
        }))
        .await
        .unwrap();
        for id in &ids {
            ctl.delete_volume(Request::new(DeleteVolumeRequest {
                volume_id: id.clone(),
                secrets: HashMap::new(),
            }))
            .await
            .unwrap();
        }
    }
    let left = ctl
        .list_volumes(Request::new(ListVolumesRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(left.entries.is_empty());
    assert!(
        fake.resource(&format!("projects/{PROJECT}/global/snapshots/snap-1"))
            .is_none()
    );
}

fn cloned_source(volume_id: &str) -> Option<VolumeContentSource> {
    Some(VolumeContentSource {
        r#type: Some(SourceType::Volume(VolumeSource {
            volume_id: volume_id.into(),
        })),
    })
}

#[tokio::test]
async fn regional_lifecycle() {
    let (fake, ctl) = setup().await;
    fake.add_instance("us-east1-c", "vm-east");
    let mut req = create(
        "pvc-r",
        50,
        &[("type", "pd-balanced"), ("replication-type", "regional-pd")],
    );
    req.accessibility_requirements = Some(TopologyRequirement {
        requisite: zones(&["us-east1-b", "us-west1-a", "us-east1-c"]),
        preferred: zones(&["us-west1-a", "us-east1-c"]),
    });
    let vol = ctl
        .create_volume(Request::new(req.clone()))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(vol.volume_id, "gcp:us-east1:pvc-r");
    assert_eq!(
        vol.accessible_topology,
        zones(&["us-east1-c", "us-east1-b"])
    );
    let seen = fake.seen();
    let insert = calls(&seen, "POST", &api("regions/us-east1/disks"));
    assert_eq!(insert.len(), 1);
    assert_eq!(
        insert[0].body["replicaZones"],
        json!([
            format!("projects/{PROJECT}/zones/us-east1-c"),
            format!("projects/{PROJECT}/zones/us-east1-b")
        ])
    );
    assert_eq!(
        insert[0].body["type"],
        format!("projects/{PROJECT}/regions/us-east1/diskTypes/pd-balanced")
    );
    assert!(
        seen.iter()
            .any(|s| s.path.starts_with(&api("regions/us-east1/operations/")))
    );
    // Idempotent.
    let again = ctl
        .create_volume(Request::new(req))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.volume.unwrap().volume_id, vol.volume_id);

    // Attach in one of its zones, not elsewhere.
    let ctx = ctl
        .controller_publish_volume(Request::new(publish(
            &vol.volume_id,
            "us-east1-c.vm-east",
            false,
        )))
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    assert_eq!(ctx["gcpDeviceName"], "pvc-r");
    let seen = fake.seen();
    let attach = calls(&seen, "POST", "/instances/vm-east/attachDisk");
    assert_eq!(
        attach[0].body["source"],
        format!("projects/{PROJECT}/regions/us-east1/disks/pvc-r")
    );
    ctl.controller_unpublish_volume(Request::new(unpublish(
        &vol.volume_id,
        "us-east1-c.vm-east",
    )))
    .await
    .unwrap();
    fake.add_instance("us-west1-a", "vm-west");
    let e = ctl
        .controller_publish_volume(Request::new(publish(
            &vol.volume_id,
            "us-west1-a.vm-west",
            false,
        )))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");

    // Resize and snapshot go through the region.
    fake.clear_seen();
    ctl.controller_expand_volume(Request::new(ControllerExpandVolumeRequest {
        volume_id: vol.volume_id.clone(),
        capacity_range: Some(CapacityRange {
            required_bytes: 300 * GIB,
            limit_bytes: 0,
        }),
        ..Default::default()
    }))
    .await
    .unwrap();
    assert_eq!(
        calls(
            &fake.seen(),
            "POST",
            &api("regions/us-east1/disks/pvc-r/resize")
        )
        .len(),
        1
    );
    let snap = ctl
        .create_snapshot(Request::new(CreateSnapshotRequest {
            source_volume_id: vol.volume_id.clone(),
            name: "snap-r".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    let s = fake
        .resource(&format!("projects/{PROJECT}/global/snapshots/snap-r"))
        .unwrap();
    assert!(
        s["sourceDisk"]
            .as_str()
            .unwrap()
            .ends_with("/regions/us-east1/disks/pvc-r")
    );
    // A zonal clone of a regional disk is refused; a regional one stays in its zones.
    let mut clone = create("pvc-r-clone", 301, &[]);
    clone.volume_content_source = cloned_source(&vol.volume_id);
    let e = ctl
        .create_volume(Request::new(clone.clone()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    clone
        .parameters
        .insert("replication-type".into(), "regional-pd".into());
    let c = ctl
        .create_volume(Request::new(clone))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(c.volume_id, "gcp:us-east1:pvc-r-clone");

    // Delete.
    ctl.delete_snapshot(Request::new(DeleteSnapshotRequest {
        snapshot_id: snap.snapshot_id,
        secrets: HashMap::new(),
    }))
    .await
    .unwrap();
    for id in [&vol.volume_id, &c.volume_id] {
        ctl.delete_volume(Request::new(DeleteVolumeRequest {
            volume_id: id.clone(),
            secrets: HashMap::new(),
        }))
        .await
        .unwrap();
    }
    assert!(
        fake.resource(&format!("projects/{PROJECT}/regions/us-east1/disks/pvc-r"))
            .is_none()
    );

    // Not enough zones of one region for a regional disk.
    let mut lonely = create("pvc-lonely", 10, &[("replication-type", "regional-pd")]);
    lonely.accessibility_requirements = Some(TopologyRequirement {
        requisite: zones(&["us-east1-b", "us-west1-a"]),
        preferred: vec![],
    });
    let e = ctl.create_volume(Request::new(lonely)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
}

#[tokio::test]
async fn throttling_is_retried_with_one_request_id() {
    let (fake, ctl) = setup().await;
    fake.inject(
        "POST",
        "/zones/us-central1-a/disks",
        2,
        error(429, "rateLimitExceeded", "Too Many Requests"),
    );
    fake.inject(
        "POST",
        "/operations/",
        1,
        error(403, "rateLimitExceeded", "Rate Limit Exceeded"),
    );
    fake.inject(
        "GET",
        "/aggregated/disks",
        1,
        error(503, "backendError", "Backend Error"),
    );
    let vol = ctl
        .create_volume(Request::new(create("pvc-t", 1, &[])))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(vol.volume_id, "gcp:us-central1-a:pvc-t");
    let seen = fake.seen();
    let inserts = calls(&seen, "POST", &api("zones/us-central1-a/disks"));
    assert_eq!(inserts.len(), 3, "two throttled, one accepted");
    let ids: Vec<&String> = inserts.iter().map(|s| &s.query["requestId"]).collect();
    assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
    let listed = ctl
        .list_volumes(Request::new(ListVolumesRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.entries.len(), 1);

    // Throttled for good: RESOURCE_EXHAUSTED with Compute's message, after the retries.
    fake.clear_seen();
    fake.inject(
        "GET",
        "/disks/pvc-t",
        4,
        error(403, "rateLimitExceeded", "Rate Limit Exceeded"),
    );
    let e = ctl
        .controller_get_volume(Request::new(ControllerGetVolumeRequest {
            volume_id: vol.volume_id.clone(),
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("Rate Limit Exceeded"), "{e:?}");
    assert_eq!(calls(&fake.seen(), "GET", "/disks/pvc-t").len(), 4);

    // 5xx for good: UNAVAILABLE.
    fake.inject(
        "GET",
        "/disks/pvc-t",
        100,
        error(500, "backendError", "Internal Error"),
    );
    let e = ctl
        .controller_get_volume(Request::new(ControllerGetVolumeRequest {
            volume_id: vol.volume_id,
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("Internal Error"), "{e:?}");
}

#[tokio::test]
async fn errors_keep_their_message_and_code() {
    let (fake, ctl) = setup().await;
    fake.add_instance("us-central1-a", "vm-1");

    // An operation DONE with an error.
    fake.fail_next_operation(
        "QUOTA_EXCEEDED",
        "Quota 'SSD_TOTAL_GB' exceeded. Limit: 500.0 in region us-central1.",
        403,
    );
    let e = ctl
        .create_volume(Request::new(create("pvc-q", 1, &[("type", "pd-ssd")])))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("SSD_TOTAL_GB"), "{e:?}");
    assert!(
        fake.resource(&format!(
            "projects/{PROJECT}/zones/us-central1-a/disks/pvc-q"
        ))
        .is_none()
    );

    // Permission denied: FAILED_PRECONDITION naming the roles, message kept.
    fake.inject(
        "POST",
        "/disks",
        1,
        error(403, "forbidden", "Required 'compute.disks.create' permission for 'projects/test-project/zones/us-central1-a/disks/pvc-p'"),
    );
    let e = ctl
        .create_volume(Request::new(create("pvc-p", 1, &[])))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("compute.disks.create"), "{e:?}");

    // Bad parameters and topology.
    let e = ctl
        .create_volume(Request::new(create("pvc-x", 1, &[("type", "pd-fast")])))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = ctl
        .create_volume(Request::new(create(
            "pvc-x",
            1,
            &[("skuName", "Premium_LRS")],
        )))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("skuName"));
    let mut nowhere = create("pvc-x", 1, &[]);
    nowhere.accessibility_requirements = Some(TopologyRequirement {
        requisite: vec![Topology {
            segments: HashMap::from([("topology.cryptdisk.csi.io/node".into(), "n1".into())]),
        }],
        preferred: vec![],
    });
    let e = ctl.create_volume(Request::new(nowhere)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    let e = ctl
        .create_volume(Request::new(create("pvc-huge", 70_000, &[])))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");

    // Unknown things.
    let vol = ctl
        .create_volume(Request::new(create("pvc-e", 1, &[])))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let code = |r: Result<tonic::Response<ControllerPublishVolumeResponse>, tonic::Status>| {
        r.unwrap_err().code()
    };
    assert_eq!(
        code(
            ctl.controller_publish_volume(Request::new(publish(
                "gcp:us-central1-a:nope",
                "us-central1-a.vm-1",
                false
            )))
            .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            ctl.controller_publish_volume(Request::new(publish(
                &vol.volume_id,
                "us-central1-a.vm-gone",
                false
            )))
            .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            ctl.controller_publish_volume(Request::new(publish(&vol.volume_id, "vm-1", false)))
                .await
        ),
        Code::NotFound
    );
    // Unpublishing from a node that does not exist is done already.
    ctl.controller_unpublish_volume(Request::new(unpublish(
        &vol.volume_id,
        "us-central1-a.vm-gone",
    )))
    .await
    .unwrap();
    let e = ctl
        .create_snapshot(Request::new(CreateSnapshotRequest {
            source_volume_id: "gcp:us-central1-a:nope".into(),
            name: "snap-x".into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let mut from_nothing = create("pvc-y", 1, &[]);
    from_nothing.volume_content_source = Some(VolumeContentSource {
        r#type: Some(SourceType::Snapshot(SnapshotSource {
            snapshot_id: "gcp:global:nope".into(),
        })),
    });
    let e = ctl
        .create_volume(Request::new(from_nothing))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    // Compute refusing an attach (the disk is in use elsewhere) keeps its message.
    fake.inject(
        "POST",
        "/attachDisk",
        1,
        error(400, "resourceInUseByAnotherResource", "The disk resource 'projects/test-project/zones/us-central1-a/disks/pvc-e' is already being used by 'projects/test-project/zones/us-central1-a/instances/other'"),
    );
    let e = ctl
        .controller_publish_volume(Request::new(publish(
            &vol.volume_id,
            "us-central1-a.vm-1",
            false,
        )))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("already being used"), "{e:?}");
}

#[tokio::test]
async fn a_lost_answer_is_retried_with_the_same_request_id() {
    let (fake, ctl) = setup().await;
    // Compute accepts the insert, but its answer is lost: the retry, with the
    // same requestId, gets the same operation and one disk is made.
    fake.lose_answer(
        "POST",
        "/zones/us-central1-a/disks",
        error(503, "backendError", "Backend Error"),
    );
    let vol = ctl
        .create_volume(Request::new(create("pvc-lost", 1, &[])))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(vol.volume_id, "gcp:us-central1-a:pvc-lost");
    let seen = fake.seen();
    let inserts = calls(&seen, "POST", &api("zones/us-central1-a/disks"));
    assert_eq!(inserts.len(), 2);
    assert_eq!(inserts[0].query["requestId"], inserts[1].query["requestId"]);
    let ops: std::collections::BTreeSet<&str> = seen
        .iter()
        .filter(|s| s.path.ends_with("/wait"))
        .map(|s| s.path.as_str())
        .collect();
    assert_eq!(ops.len(), 1, "one operation: {ops:?}");
}

#[tokio::test]
async fn provisioned_performance_reaches_compute() {
    let (fake, ctl) = setup().await;
    // 3,000 IOPS need 6 GiB of Hyperdisk Balanced (500 per GiB at most).
    ctl.create_volume(Request::new(create(
        "pvc-hd",
        5,
        &[
            ("type", "hyperdisk-balanced"),
            ("provisioned-iops-on-create", "3000"),
            ("provisioned-throughput-on-create", "140"),
        ],
    )))
    .await
    .unwrap();
    ctl.create_volume(Request::new(create(
        "pvc-ex",
        1,
        &[
            ("type", "pd-extreme"),
            ("provisioned-iops-on-create", "10000"),
        ],
    )))
    .await
    .unwrap();
    let seen = fake.seen();
    let bodies: Vec<&Value> = calls(&seen, "POST", &api("zones/us-central1-a/disks"))
        .iter()
        .map(|s| &s.body)
        .collect();
    assert_eq!(bodies[0]["sizeGb"], "6");
    assert_eq!(bodies[0]["provisionedIops"], "3000");
    assert_eq!(bodies[0]["provisionedThroughput"], "140");
    assert_eq!(bodies[1]["sizeGb"], "500");
    assert_eq!(bodies[1]["provisionedIops"], "10000");
    assert!(bodies[1].get("provisionedThroughput").is_none());
    // GetCapacity: the largest disk in a zone, nothing elsewhere.
    let cap = |segments: HashMap<String, String>| GetCapacityRequest {
        accessible_topology: Some(Topology { segments }),
        ..Default::default()
    };
    let here = ctl
        .get_capacity(Request::new(cap(HashMap::from([(
            ZONE_KEY.into(),
            "us-central1-a".into(),
        )]))))
        .await
        .unwrap()
        .into_inner();
    assert!(here.available_capacity > 60_000 * GIB);
    let elsewhere = ctl
        .get_capacity(Request::new(cap(HashMap::from([(
            "other".into(),
            "x".into(),
        )]))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(elsewhere.available_capacity, 0);
}

#[tokio::test]
async fn a_silent_endpoint_times_out_as_unavailable() {
    // Accepts connections and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let mut cfg = GcpConfig::new(PROJECT, "us-central1-a");
    cfg.endpoint = Some(format!("http://{addr}"));
    cfg.retry = Retry {
        max_attempts: 2,
        base_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(5),
    };
    cfg.attempt_timeout = Duration::from_millis(200);
    let backend = GcpBackend::connect(cfg, config::anonymous_credentials())
        .await
        .unwrap();
    let ctl = ControllerService::new(Arc::new(backend), None);
    let started = std::time::Instant::now();
    let e = ctl
        .controller_get_volume(Request::new(ControllerGetVolumeRequest {
            volume_id: "gcp:us-central1-a:pvc-1".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// The fresh-disk record (see `crate::volume::fresh`): a label set in the
/// insert of an empty disk, absent on restores and clones, handed to read-write
/// publications only, and removed by the first ControllerUnpublish (setLabels
/// with the read fingerprint) before the detach.
#[tokio::test]
async fn the_fresh_record_is_a_label_of_empty_disks_until_the_first_unpublish() {
    use crate::volume::{FreshRecord, fresh};
    let (fake, ctl) = setup().await;
    fake.add_instance("us-central1-a", "vm-a");
    let new_volume = |req: CreateVolumeRequest| {
        let ctl = &ctl;
        async move {
            ctl.create_volume(Request::new(req))
                .await
                .unwrap()
                .into_inner()
                .volume
                .unwrap()
        }
    };
    let vol = new_volume(create("pvc-f", 10, &[("type", "pd-ssd")])).await;
    assert_eq!(vol.volume_id, "gcp:us-central1-a:pvc-f");
    let seen = fake.seen();
    let inserts = calls(&seen, "POST", &api("zones/us-central1-a/disks"));
    let label = inserts[0].body["labels"][fresh::DISK_KEY]
        .as_str()
        .expect("the record is a label of the insert")
        .to_string();
    label.parse::<FreshRecord>().unwrap();
    let disk_path = format!("projects/{PROJECT}/zones/us-central1-a/disks");

    // Copies carry no record.
    let snap = ctl
        .create_snapshot(Request::new(CreateSnapshotRequest {
            source_volume_id: vol.volume_id.clone(),
            name: "snap-f".into(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    let mut restore = create("pvc-f-restore", 10, &[("type", "pd-ssd")]);
    restore.volume_content_source = Some(VolumeContentSource {
        r#type: Some(SourceType::Snapshot(SnapshotSource {
            snapshot_id: snap.snapshot_id.clone(),
        })),
    });
    let mut clone = create("pvc-f-clone", 10, &[("type", "pd-ssd")]);
    clone.volume_content_source = Some(VolumeContentSource {
        r#type: Some(SourceType::Volume(VolumeSource {
            volume_id: vol.volume_id.clone(),
        })),
    });
    for (req, name) in [(restore, "pvc-f-restore"), (clone, "pvc-f-clone")] {
        let copy = new_volume(req).await;
        let disk = fake.resource(&format!("{disk_path}/{name}")).unwrap();
        assert!(
            disk["labels"].get(fresh::DISK_KEY).is_none(),
            "{name}: {disk}"
        );
        let ctx = ctl
            .controller_publish_volume(Request::new(publish(
                &copy.volume_id,
                "us-central1-a.vm-a",
                false,
            )))
            .await
            .unwrap()
            .into_inner()
            .publish_context;
        assert!(!ctx.contains_key(fresh::PUBLISH_KEY), "{name}: {ctx:?}");
        ctl.controller_unpublish_volume(Request::new(unpublish(
            &copy.volume_id,
            "us-central1-a.vm-a",
        )))
        .await
        .unwrap();
    }

    // A read-write publication carries the record, retries too.
    for _ in 0..2 {
        let ctx = ctl
            .controller_publish_volume(Request::new(publish(
                &vol.volume_id,
                "us-central1-a.vm-a",
                false,
            )))
            .await
            .unwrap()
            .into_inner()
            .publish_context;
        assert_eq!(ctx.get(fresh::PUBLISH_KEY), Some(&label), "{ctx:?}");
    }
    // ControllerUnpublish removes it (other labels stay), before the detach.
    fake.clear_seen();
    ctl.controller_unpublish_volume(Request::new(unpublish(
        &vol.volume_id,
        "us-central1-a.vm-a",
    )))
    .await
    .unwrap();
    let seen = fake.seen();
    let order: Vec<&str> = seen
        .iter()
        .filter(|s| s.method == "POST")
        .map(|s| s.path.rsplit('/').next().unwrap())
        .filter(|p| *p == "setLabels" || *p == "detachDisk")
        .collect();
    assert_eq!(order, ["setLabels", "detachDisk"]);
    let disk = fake.resource(&format!("{disk_path}/pvc-f")).unwrap();
    assert!(disk["labels"].get(fresh::DISK_KEY).is_none(), "{disk}");
    assert_eq!(disk["labels"]["cryptdisk-csi-name"], "pvc-f");
    assert_eq!(disk["labels"]["cryptdisk-csi-driver"], "cryptdisk_csi_io");
    // Later publications go without it; another unpublish sets no labels.
    let ctx = ctl
        .controller_publish_volume(Request::new(publish(
            &vol.volume_id,
            "us-central1-a.vm-a",
            false,
        )))
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    assert!(!ctx.contains_key(fresh::PUBLISH_KEY), "{ctx:?}");
    fake.clear_seen();
    ctl.controller_unpublish_volume(Request::new(unpublish(
        &vol.volume_id,
        "us-central1-a.vm-a",
    )))
    .await
    .unwrap();
    assert!(calls(&fake.seen(), "POST", "/setLabels").is_empty());
}

/// A snapshot reports the usable size the CO holds its source as (not the whole
/// GiB disk under it), and restores into exactly that: plain, integrity, and
/// expanded before the snapshot.
#[tokio::test]
async fn snapshots_restore_into_their_usable_size() {
    let (fake, ctl) = setup().await;
    crate::csi::controller::restore_size::check(&ctl, GIB as u64, 3 * GIB as u64).await;
    // The key scope a copy inherits rides in the disk's description note (a
    // volume id's ':' fits no label value); an empty disk's note has none.
    let note_scope = |disk: &str| {
        let d = fake
            .resource(&format!(
                "projects/{PROJECT}/zones/us-central1-a/disks/{}",
                super::params::resource_name(disk)
            ))
            .unwrap();
        let note: Value = serde_json::from_str(d["description"].as_str().unwrap()).unwrap();
        note["cryptdisk"]["key_scope"].clone()
    };
    assert_eq!(note_scope("plain-src"), Value::Null);
    let source_id = json!(format!(
        "gcp:us-central1-a:{}",
        super::params::resource_name("plain-src")
    ));
    for copy in ["plain-restore", "plain-clone", "plain-restore-of-restore"] {
        assert_eq!(note_scope(copy), source_id, "{copy}");
    }
    // The usable size rides on the disk as a label, set again after the
    // expansion with the fingerprint of the labels it replaces. A 1 GiB volume
    // sits on a 10 GiB pd-balanced disk (its least), so growing it to 3 GiB
    // grows no disk, yet reports 10 GiB less the header: only the label can
    // tell that size from the 1 GiB of before.
    let seen = fake.state.lock().unwrap().seen.clone();
    let set = calls(&seen, "POST", "/setLabels");
    assert_eq!(set.len(), 1, "{set:?}");
    assert!(set[0].body["labelFingerprint"].is_string(), "{:?}", set[0]);
    let disk = fake
        .resource(&format!(
            "projects/{PROJECT}/zones/us-central1-a/disks/{}",
            super::params::resource_name("grown-src")
        ))
        .unwrap();
    assert_eq!(
        disk["labels"][super::LABEL_USABLE],
        json!((10 * GIB - (16 << 20)).to_string()),
        "{disk}"
    );
    let resized = calls(&seen, "POST", "/resize");
    assert!(resized.is_empty(), "{resized:?}");
}

fn expand(volume: &str, gib: i64) -> ControllerExpandVolumeRequest {
    ControllerExpandVolumeRequest {
        volume_id: volume.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: gib * GIB,
            limit_bytes: 0,
        }),
        volume_capability: Some(cap(Mode::SingleNodeWriter)),
        ..Default::default()
    }
}

/// A Hyperdisk Balanced made at its least size (4 GiB, so 2,000 IOPS) cannot
/// grow to 20 GiB with `resize` alone: the new size needs 3,000 IOPS. The
/// backend sends `disks.update` with the size and the raised IOPS; a disk
/// already above its floors, and a Persistent Disk, still take `resize`.
#[tokio::test]
async fn a_small_hyperdisk_grows_with_its_performance_floor() {
    let (fake, ctl) = setup().await;
    let vol = ctl
        .create_volume(Request::new(create(
            "pvc-hd-small",
            1,
            &[("type", "hyperdisk-balanced")],
        )))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let path = format!("projects/{PROJECT}/zones/us-central1-a/disks/pvc-hd-small");
    let disk = fake.resource(&path).unwrap();
    assert_eq!(disk["sizeGb"], "4");
    assert_eq!(
        disk["provisionedIops"], "2000",
        "the fake's default: {disk}"
    );
    fake.clear_seen();
    ctl.controller_expand_volume(Request::new(expand(&vol.volume_id, 19)))
        .await
        .unwrap();
    let disk = fake.resource(&path).unwrap();
    assert_eq!(disk["sizeGb"], "20", "{disk}");
    assert_eq!(disk["provisionedIops"], "3000", "{disk}");
    assert_eq!(disk["provisionedThroughput"], "140", "{disk}");
    let seen = fake.seen();
    let updates = calls(
        &seen,
        "PATCH",
        &api("zones/us-central1-a/disks/pvc-hd-small"),
    );
    assert_eq!(updates.len(), 1, "{seen:?}");
    assert_eq!(updates[0].query["updateMask"], "sizeGb,provisionedIops");
    assert_eq!(updates[0].body["sizeGb"], "20");
    assert_eq!(updates[0].body["provisionedIops"], "3000");
    assert!(calls(&seen, "POST", "/resize").is_empty());

    // Above the floor already: a plain resize.
    fake.clear_seen();
    ctl.controller_expand_volume(Request::new(expand(&vol.volume_id, 30)))
        .await
        .unwrap();
    let seen = fake.seen();
    assert_eq!(calls(&seen, "POST", "/resize").len(), 1, "{seen:?}");
    assert!(calls(&seen, "PATCH", "/disks/pvc-hd-small").is_empty());

    // Hyperdisk Extreme: 2 IOPS per GiB.
    let ex = ctl
        .create_volume(Request::new(create(
            "pvc-hdx",
            1,
            &[("type", "Hyperdisk-Extreme")],
        )))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let path = format!("projects/{PROJECT}/zones/us-central1-a/disks/pvc-hdx");
    assert_eq!(fake.resource(&path).unwrap()["provisionedIops"], "128");
    ctl.controller_expand_volume(Request::new(expand(&ex.volume_id, 200)))
        .await
        .unwrap();
    let disk = fake.resource(&path).unwrap();
    assert_eq!(disk["sizeGb"], "201", "{disk}");
    assert_eq!(disk["provisionedIops"], "402", "{disk}");
}

/// An operation's error code decides its gRPC code whatever HTTP status the
/// operation carries, as the PD CSI driver maps them: a per-resource
/// operation rate is RESOURCE_EXHAUSTED (the CO backs off), Compute's internal
/// error UNAVAILABLE (a retry may pass), an unsupported operation
/// INVALID_ARGUMENT (no retry will).
#[tokio::test]
async fn operation_error_codes_map_as_the_reference_driver_maps_them() {
    let (fake, ctl) = setup().await;
    for (i, (code, http, want)) in [
        (
            "RESOURCE_OPERATION_RATE_EXCEEDED",
            400,
            Code::ResourceExhausted,
        ),
        ("INTERNAL_ERROR", 400, Code::Unavailable),
        ("UNSUPPORTED_OPERATION", 400, Code::InvalidArgument),
        ("REGION_QUOTA_EXCEEDED", 400, Code::ResourceExhausted),
    ]
    .into_iter()
    .enumerate()
    {
        let message = format!("{code} from the fake");
        fake.fail_next_operation(code, &message, http);
        let e = ctl
            .create_volume(Request::new(create(&format!("pvc-op-{i}"), 1, &[])))
            .await
            .unwrap_err();
        assert_eq!(e.code(), want, "{code}: {e:?}");
        assert!(e.message().contains(&message), "{code}: {e:?}");
    }
}

/// StorageClasses written for the PD CSI driver: keys and disk types in any
/// case, throughput as a quantity of bytes per second (`250Mi` is 250 MiB/s),
/// IOPS as a quantity (`3k`).
#[tokio::test]
async fn storage_classes_of_the_reference_driver_are_understood() {
    let (fake, ctl) = setup().await;
    ctl.create_volume(Request::new(create(
        "pvc-ref",
        10,
        &[
            ("Type", "Hyperdisk-Balanced"),
            ("provisioned-throughput-on-create", "250Mi"),
            ("Provisioned-IOPS-On-Create", "3k"),
        ],
    )))
    .await
    .unwrap();
    ctl.create_volume(Request::new(create(
        "pvc-ref-pd",
        10,
        &[("type", "PD-SSD"), ("replication-type", "None")],
    )))
    .await
    .unwrap();
    ctl.create_volume(Request::new(create(
        "pvc-ref-hdt",
        2048,
        &[
            ("type", "hyperdisk-throughput"),
            ("provisioned-throughput-on-create", "1Gi"),
        ],
    )))
    .await
    .unwrap_err();
    let seen = fake.seen();
    let bodies: Vec<&Value> = calls(&seen, "POST", &api("zones/us-central1-a/disks"))
        .iter()
        .map(|s| &s.body)
        .collect();
    assert_eq!(bodies[0]["provisionedThroughput"], "250", "{}", bodies[0]);
    assert_eq!(bodies[0]["provisionedIops"], "3000", "{}", bodies[0]);
    assert!(
        bodies[0]["type"]
            .as_str()
            .unwrap()
            .ends_with("/diskTypes/hyperdisk-balanced")
    );
    assert!(
        bodies[1]["type"]
            .as_str()
            .unwrap()
            .ends_with("/diskTypes/pd-ssd")
    );
    // 1Gi is 1024 MiB/s, above Hyperdisk Throughput's 600: Compute refuses it.
    assert_eq!(bodies[2]["provisionedThroughput"], "1024", "{}", bodies[2]);
    assert_eq!(bodies[2]["sizeGb"], "2049", "{}", bodies[2]);
}

/// A Persistent Disk cannot be attached to a Hyperdisk-only machine series
/// (C4, N4, ...): the publish says so before it asks Compute, naming the
/// machine type and what to use instead; a Hyperdisk attaches there.
#[tokio::test]
async fn pd_disks_are_refused_early_on_hyperdisk_only_machines() {
    let (fake, ctl) = setup().await;
    fake.add_instance_of("us-central1-a", "vm-c4", "c4-standard-8");
    let pd = ctl
        .create_volume(Request::new(create(
            "pvc-pd",
            5,
            &[("type", "pd-balanced")],
        )))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    fake.clear_seen();
    let e = ctl
        .controller_publish_volume(Request::new(publish(
            &pd.volume_id,
            "us-central1-a.vm-c4",
            false,
        )))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("c4-standard-8") && e.message().contains("hyperdisk-balanced"),
        "{e:?}"
    );
    let seen = fake.seen();
    assert!(calls(&seen, "POST", "/attachDisk").is_empty(), "{seen:?}");

    let hd = ctl
        .create_volume(Request::new(create(
            "pvc-hd-c4",
            5,
            &[("type", "hyperdisk-balanced")],
        )))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    ctl.controller_publish_volume(Request::new(publish(
        &hd.volume_id,
        "us-central1-a.vm-c4",
        false,
    )))
    .await
    .unwrap();
}

/// A regional disk is reachable from both its zones: its topology lists each
/// replica zone as a segment of its own (never the region, never an empty
/// zone: every GCE VM has one). With `availability-class:
/// regional-hard-failover`, an attach in the other zone while the first VM
/// still holds the disk is forced (`forceAttach=true`) and moves the disk;
/// without it, the attach is refused as in use.
#[tokio::test]
async fn regional_disks_fail_over_with_forced_attaches() {
    let (fake, ctl) = setup().await;
    fake.add_instance("us-central1-a", "vm-a");
    fake.add_instance("us-central1-b", "vm-b");
    let regional = |name: &str, failover: bool| {
        let mut params = vec![("type", "pd-balanced"), ("replication-type", "regional-pd")];
        if failover {
            params.push(("availability-class", "regional-hard-failover"));
        }
        let mut req = create(name, 10, &params);
        req.accessibility_requirements = Some(TopologyRequirement {
            requisite: zones(&["us-central1-a", "us-central1-b"]),
            preferred: zones(&["us-central1-a"]),
        });
        req
    };
    let vol = ctl
        .create_volume(Request::new(regional("pvc-ha", true)))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(vol.volume_id, "gcp:us-central1:pvc-ha");
    assert_eq!(
        vol.accessible_topology,
        zones(&["us-central1-a", "us-central1-b"])
    );
    let listed = ctl
        .list_volumes(Request::new(ListVolumesRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        listed.entries[0]
            .volume
            .as_ref()
            .unwrap()
            .accessible_topology,
        zones(&["us-central1-a", "us-central1-b"])
    );
    ctl.controller_publish_volume(Request::new(publish(
        &vol.volume_id,
        "us-central1-a.vm-a",
        false,
    )))
    .await
    .unwrap();
    // vm-a's zone is lost; the disk moves to vm-b without a detach.
    fake.clear_seen();
    ctl.controller_publish_volume(Request::new(publish(
        &vol.volume_id,
        "us-central1-b.vm-b",
        false,
    )))
    .await
    .unwrap();
    let seen = fake.seen();
    let attach = calls(&seen, "POST", "/attachDisk");
    assert_eq!(attach.len(), 1, "{seen:?}");
    assert_eq!(attach[0].query["forceAttach"], "true");
    let disk = fake
        .resource(&format!(
            "projects/{PROJECT}/regions/us-central1/disks/pvc-ha"
        ))
        .unwrap();
    assert_eq!(
        disk["users"],
        json!([format!(
            "https://www.googleapis.com/compute/v1/projects/{PROJECT}/zones/us-central1-b/instances/vm-b"
        )])
    );

    // Without the class: no forcing, and the disk stays where it is.
    let plain = ctl
        .create_volume(Request::new(regional("pvc-plain", false)))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    ctl.controller_publish_volume(Request::new(publish(
        &plain.volume_id,
        "us-central1-a.vm-a",
        false,
    )))
    .await
    .unwrap();
    fake.clear_seen();
    let e = ctl
        .controller_publish_volume(Request::new(publish(
            &plain.volume_id,
            "us-central1-b.vm-b",
            false,
        )))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let seen = fake.seen();
    assert!(
        calls(&seen, "POST", "/attachDisk")
            .iter()
            .all(|s| !s.query.contains_key("forceAttach")),
        "{seen:?}"
    );
    // A zonal disk cannot ask for it.
    let e = ctl
        .create_volume(Request::new(create(
            "pvc-zonal-ha",
            10,
            &[("availability-class", "regional-hard-failover")],
        )))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
}
