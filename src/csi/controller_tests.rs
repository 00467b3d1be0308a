//! ControllerService with the local backend on a temporary directory, in
//! process on the host, as csi-driver-host-path tests its controller server:
//! each RPC called as a Rust method on a `tonic::Request`, table-driven where
//! the cases differ only in their input and the code they expect.

use std::sync::Arc;

use tonic::{Code, Request, Status};

use super::controller::ControllerService;
use crate::backend::LocalBackend;
use crate::proto::csi::controller_server::Controller;
use crate::proto::csi::volume_capability::access_mode::Mode;
use crate::proto::csi::volume_capability::{AccessMode, AccessType, MountVolume};
use crate::proto::csi::volume_content_source::{self, SnapshotSource};
use crate::proto::csi::*;

const MIB: i64 = 1024 * 1024;
const NODE: &str = "node-1";
const TOPOLOGY_KEY: &str = "topology.cryptdisk.csi.io/node";

/// A controller over a fresh local backend, with its directory kept alive.
fn controller(limit: Option<u64>) -> (ControllerService, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let backend = LocalBackend::open(dir.path(), NODE, limit).unwrap();
    let ctl = ControllerService::new(Arc::new(backend), Some(vec![NODE.into()]));
    (ctl, dir)
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

fn create_req(name: &str, bytes: i64) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![cap()],
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

fn code<T>(r: Result<T, Status>) -> Code {
    r.map_or_else(|s| s.code(), |_| Code::Ok)
}

fn publish_req(id: &str, node: &str) -> ControllerPublishVolumeRequest {
    ControllerPublishVolumeRequest {
        volume_id: id.into(),
        node_id: node.into(),
        volume_capability: Some(cap()),
        ..Default::default()
    }
}

#[tokio::test]
async fn create_is_idempotent_and_a_mismatch_is_already_exists() {
    let (ctl, _dir) = controller(None);
    let first = create(&ctl, create_req("pvc-a", 64 * MIB)).await.unwrap();
    assert!(first.capacity_bytes >= 64 * MIB);
    let again = create(&ctl, create_req("pvc-a", 64 * MIB)).await.unwrap();
    assert_eq!(again.volume_id, first.volume_id);
    assert_eq!(again.capacity_bytes, first.capacity_bytes);
    let cases = [
        ("another size", create_req("pvc-a", 128 * MIB)),
        (
            "another source",
            CreateVolumeRequest {
                volume_content_source: Some(VolumeContentSource {
                    r#type: Some(volume_content_source::Type::Volume(
                        volume_content_source::VolumeSource {
                            volume_id: first.volume_id.clone(),
                        },
                    )),
                }),
                ..create_req("pvc-a", 64 * MIB)
            },
        ),
    ];
    for (what, req) in cases {
        assert_eq!(code(create(&ctl, req).await), Code::AlreadyExists, "{what}");
    }
}

#[tokio::test]
async fn create_rejects_bad_input() {
    let (ctl, _dir) = controller(Some(1024 * MIB as u64));
    let range = |required, limit| {
        Some(CapacityRange {
            required_bytes: required,
            limit_bytes: limit,
        })
    };
    let cases: Vec<(&str, CreateVolumeRequest, Code)> = vec![
        ("no name", create_req("", 64 * MIB), Code::InvalidArgument),
        (
            "no capabilities",
            CreateVolumeRequest {
                volume_capabilities: vec![],
                ..create_req("pvc-b", 64 * MIB)
            },
            Code::InvalidArgument,
        ),
        (
            "capability without access mode",
            CreateVolumeRequest {
                volume_capabilities: vec![VolumeCapability {
                    access_mode: None,
                    ..cap()
                }],
                ..create_req("pvc-b", 64 * MIB)
            },
            Code::InvalidArgument,
        ),
        (
            "negative size",
            CreateVolumeRequest {
                capacity_range: range(-1, 0),
                ..create_req("pvc-b", 0)
            },
            Code::InvalidArgument,
        ),
        (
            "limit below required",
            CreateVolumeRequest {
                capacity_range: range(10 * MIB, 5 * MIB),
                ..create_req("pvc-b", 0)
            },
            Code::OutOfRange,
        ),
        (
            "unknown parameter",
            CreateVolumeRequest {
                parameters: [("no-such-parameter".to_string(), "1".to_string())].into(),
                ..create_req("pvc-b", 64 * MIB)
            },
            Code::InvalidArgument,
        ),
        (
            "bad integrity value",
            CreateVolumeRequest {
                parameters: [(
                    "cryptdisk.csi.io/integrity".to_string(),
                    "maybe".to_string(),
                )]
                .into(),
                ..create_req("pvc-b", 64 * MIB)
            },
            Code::InvalidArgument,
        ),
        (
            "unknown source snapshot",
            CreateVolumeRequest {
                volume_content_source: Some(VolumeContentSource {
                    r#type: Some(volume_content_source::Type::Snapshot(SnapshotSource {
                        snapshot_id: "not-a-snapshot".into(),
                    })),
                }),
                ..create_req("pvc-b", 64 * MIB)
            },
            Code::NotFound,
        ),
        (
            "larger than the backend",
            create_req("pvc-b", 4096 * MIB),
            Code::OutOfRange,
        ),
    ];
    for (what, req, want) in cases {
        assert_eq!(code(create(&ctl, req).await), want, "{what}");
    }
}

#[tokio::test]
async fn delete_is_idempotent() {
    let (ctl, _dir) = controller(None);
    let v = create(&ctl, create_req("pvc-del", 16 * MIB)).await.unwrap();
    let delete = |id: &str| {
        ctl.delete_volume(Request::new(DeleteVolumeRequest {
            volume_id: id.into(),
            ..Default::default()
        }))
    };
    let cases = [
        ("existing", v.volume_id.as_str(), Code::Ok),
        ("deleted again", v.volume_id.as_str(), Code::Ok),
        ("made-up id", "fake-vol-id-1234", Code::Ok),
        ("no id", "", Code::InvalidArgument),
    ];
    for (what, id, want) in cases {
        assert_eq!(code(delete(id).await), want, "{what}");
    }
}

#[tokio::test]
async fn capacity_and_topology() {
    let (ctl, _dir) = controller(Some(256 * MIB as u64));
    let capacity = || {
        ctl.get_capacity(Request::new(GetCapacityRequest {
            volume_capabilities: vec![cap()],
            ..Default::default()
        }))
    };
    let before = capacity().await.unwrap().into_inner();
    assert!(before.available_capacity > 0 && before.available_capacity <= 256 * MIB);
    assert!(before.maximum_volume_size.unwrap() <= 256 * MIB);
    let v = create(&ctl, create_req("pvc-cap", 64 * MIB)).await.unwrap();
    let after = capacity().await.unwrap().into_inner();
    assert!(after.available_capacity <= before.available_capacity - 64 * MIB);
    let topology = &v.accessible_topology;
    assert_eq!(topology.len(), 1, "{topology:?}");
    assert_eq!(topology[0].segments[TOPOLOGY_KEY], NODE);
    assert_eq!(
        code(
            ctl.get_capacity(Request::new(GetCapacityRequest {
                volume_capabilities: vec![VolumeCapability {
                    access_mode: None,
                    ..cap()
                }],
                ..Default::default()
            }))
            .await
        ),
        Code::InvalidArgument
    );
}

#[tokio::test]
async fn publish_and_unpublish_to_the_one_node() {
    let (ctl, _dir) = controller(None);
    let v = create(&ctl, create_req("pvc-pub", 16 * MIB)).await.unwrap();
    let id = v.volume_id.as_str();
    let publish = |req| ctl.controller_publish_volume(Request::new(req));
    let first = publish(publish_req(id, NODE)).await.unwrap().into_inner();
    assert!(
        first.publish_context.contains_key("localImagePath"),
        "{first:?}"
    );
    let cases = [
        ("again", publish_req(id, NODE), Code::Ok),
        ("another node", publish_req(id, "node-2"), Code::NotFound),
        (
            "unknown volume",
            publish_req("fake-vol-id-1234", NODE),
            Code::NotFound,
        ),
        ("no volume id", publish_req("", NODE), Code::InvalidArgument),
        ("no node id", publish_req(id, ""), Code::InvalidArgument),
        (
            "no capability",
            ControllerPublishVolumeRequest {
                volume_capability: None,
                ..publish_req(id, NODE)
            },
            Code::InvalidArgument,
        ),
    ];
    for (what, req, want) in cases {
        assert_eq!(code(publish(req).await), want, "{what}");
    }
    let unpublish = |id: &str, node: &str| {
        ctl.controller_unpublish_volume(Request::new(ControllerUnpublishVolumeRequest {
            volume_id: id.into(),
            node_id: node.into(),
            ..Default::default()
        }))
    };
    let cases = [
        ("published", id, NODE, Code::Ok),
        ("again", id, NODE, Code::Ok),
        ("every node", id, "", Code::Ok),
        ("unknown volume", "fake-vol-id-1234", NODE, Code::Ok),
        ("no volume id", "", NODE, Code::InvalidArgument),
    ];
    for (what, vol, node, want) in cases {
        assert_eq!(code(unpublish(vol, node).await), want, "{what}");
    }
}

#[tokio::test]
async fn expand_grows_and_rejects_bad_input() {
    let (ctl, _dir) = controller(Some(1024 * MIB as u64));
    let v = create(&ctl, create_req("pvc-grow", 32 * MIB))
        .await
        .unwrap();
    let expand = |id: &str, bytes: i64| {
        ctl.controller_expand_volume(Request::new(ControllerExpandVolumeRequest {
            volume_id: id.into(),
            capacity_range: Some(CapacityRange {
                required_bytes: bytes,
                limit_bytes: 0,
            }),
            volume_capability: Some(cap()),
            ..Default::default()
        }))
    };
    let grown = expand(&v.volume_id, 96 * MIB).await.unwrap().into_inner();
    assert!(grown.capacity_bytes >= 96 * MIB);
    assert!(grown.node_expansion_required);
    let cases = [
        (
            "to the same size again",
            v.volume_id.as_str(),
            96 * MIB,
            Code::Ok,
        ),
        ("no volume id", "", 96 * MIB, Code::InvalidArgument),
        (
            "unknown volume",
            "fake-vol-id-1234",
            96 * MIB,
            Code::NotFound,
        ),
        (
            "beyond the backend",
            v.volume_id.as_str(),
            4096 * MIB,
            Code::OutOfRange,
        ),
    ];
    for (what, id, bytes, want) in cases {
        assert_eq!(code(expand(id, bytes).await), want, "{what}");
    }
}

#[tokio::test]
async fn snapshots_are_idempotent_and_listed() {
    let (ctl, _dir) = controller(None);
    let v = create(&ctl, create_req("pvc-snap", 16 * MIB))
        .await
        .unwrap();
    let snap = |source: &str, name: &str| {
        ctl.create_snapshot(Request::new(CreateSnapshotRequest {
            source_volume_id: source.into(),
            name: name.into(),
            ..Default::default()
        }))
    };
    let first = snap(&v.volume_id, "snap-1")
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(first.source_volume_id, v.volume_id);
    assert!(first.ready_to_use);
    let again = snap(&v.volume_id, "snap-1")
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(again.snapshot_id, first.snapshot_id);
    let other = create(&ctl, create_req("pvc-snap-2", 16 * MIB))
        .await
        .unwrap();
    let cases = [
        (
            "same name, other source",
            other.volume_id.as_str(),
            "snap-1",
            Code::AlreadyExists,
        ),
        ("no name", v.volume_id.as_str(), "", Code::InvalidArgument),
        ("no source", "", "snap-2", Code::InvalidArgument),
        (
            "unknown source",
            "fake-vol-id-1234",
            "snap-2",
            Code::NotFound,
        ),
    ];
    for (what, source, name, want) in cases {
        assert_eq!(code(snap(source, name).await), want, "{what}");
    }
    let listed = ctl
        .list_snapshots(Request::new(ListSnapshotsRequest {
            source_volume_id: v.volume_id.clone(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<_> = listed
        .entries
        .iter()
        .map(|e| e.snapshot.as_ref().unwrap().snapshot_id.clone())
        .collect();
    assert_eq!(ids, vec![first.snapshot_id.clone()]);
    let get = |id: &str| {
        ctl.get_snapshot(Request::new(GetSnapshotRequest {
            snapshot_id: id.into(),
            ..Default::default()
        }))
    };
    let got = get(&first.snapshot_id)
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(got.snapshot_id, first.snapshot_id);
    // Moved from the VM case node_attach_limit_get_snapshot_and_layout_checks.
    let cases = [
        ("GetSnapshot of an unknown id", "nonsense", Code::NotFound),
        ("GetSnapshot without an id", "", Code::InvalidArgument),
    ];
    for (what, id, want) in cases {
        assert_eq!(code(get(id).await), want, "{what}");
    }
    // A restore keeps its source's layout: an integrity restore of a plain
    // snapshot is refused (also from that VM case).
    let mut restore = create_req("pvc-restore", 128 * MIB);
    restore
        .parameters
        .insert("cryptdisk.csi.io/integrity".into(), "true".into());
    restore.volume_content_source = Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Snapshot(SnapshotSource {
            snapshot_id: first.snapshot_id.clone(),
        })),
    });
    assert_eq!(
        code(create(&ctl, restore).await),
        Code::InvalidArgument,
        "integrity restore of a plain snapshot"
    );
    let delete = |id: &str| {
        ctl.delete_snapshot(Request::new(DeleteSnapshotRequest {
            snapshot_id: id.into(),
            ..Default::default()
        }))
    };
    let cases = [
        ("existing", first.snapshot_id.as_str(), Code::Ok),
        ("again", first.snapshot_id.as_str(), Code::Ok),
        ("made-up id", "fake-snapshot-id", Code::Ok),
        ("no id", "", Code::InvalidArgument),
    ];
    for (what, id, want) in cases {
        assert_eq!(code(delete(id).await), want, "{what}");
    }
}

#[tokio::test]
async fn list_volumes_pages() {
    let (ctl, _dir) = controller(None);
    let mut made = Vec::new();
    for i in 0..5 {
        let v = create(&ctl, create_req(&format!("pvc-list-{i}"), 16 * MIB))
            .await
            .unwrap();
        made.push(v.volume_id);
    }
    made.sort();
    let list = |max_entries: i32, starting_token: String| {
        ctl.list_volumes(Request::new(ListVolumesRequest {
            max_entries,
            starting_token,
        }))
    };
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = list(2, token).await.unwrap().into_inner();
        assert!(page.entries.len() <= 2);
        seen.extend(
            page.entries
                .into_iter()
                .map(|e| e.volume.unwrap().volume_id),
        );
        pages += 1;
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    assert_eq!(pages, 3);
    seen.sort();
    assert_eq!(seen, made);
    let all = list(0, String::new()).await.unwrap().into_inner();
    assert_eq!(all.entries.len(), 5);
    assert!(all.next_token.is_empty());
    let cases = [
        (
            "negative max_entries",
            -1,
            String::new(),
            Code::InvalidArgument,
        ),
        (
            "a token not handed out",
            2,
            "no-such-token".to_string(),
            Code::Aborted,
        ),
    ];
    for (what, max, token, want) in cases {
        assert_eq!(code(list(max, token).await), want, "{what}");
    }
}
