//! NodeService request validation, in process on the host: every RPC called as
//! a Rust method with a field missing or wrong, and the gRPC code it answers.
//! Each request here fails in validation, before any crypt, loop or mount
//! work, so none of them needs a kernel with device-mapper; what does stays in
//! the VM tier (tests/vm).

use std::sync::Arc;
use std::time::Duration;

use tonic::{Code, Request};

use super::node::{NodeConfig, NodeService};
use crate::kms::{DataKey, KeyError, KeyRequest, KeySource};
use crate::proto::csi::node_server::Node;
use crate::proto::csi::volume_capability::access_mode::Mode;
use crate::proto::csi::volume_capability::{AccessMode, AccessType, MountVolume};
use crate::proto::csi::*;

/// A key source these tests must never reach: validation comes first.
struct NoKeys;

#[tonic::async_trait]
impl KeySource for NoKeys {
    async fn volume_key(&self, _: &KeyRequest<'_>) -> Result<(DataKey, u32), KeyError> {
        panic!("a request that fails validation asked for a key")
    }

    fn identity(&self) -> &str {
        "none"
    }
}

fn node() -> NodeService {
    NodeService::new(
        NodeConfig {
            node_id: "node-1".into(),
            local_data_dir: None,
            topology: [(
                "topology.cryptdisk.csi.io/node".to_string(),
                "node-1".to_string(),
            )]
            .into(),
            max_volumes: 0,
            max_parallel_work: 1,
            wipe_budget: Duration::from_secs(1),
        },
        Arc::new(NoKeys),
        Arc::new(crate::mount::device::NodeDevices::host(None)),
    )
}

fn mount_cap() -> VolumeCapability {
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

/// A made-up id, as csi-sanity sends: it parses as no volume of ours.
const FAKE_ID: &str = "fake-vol-id-1234";
const STAGING: &str = "/var/lib/kubelet/plugins/staging";
const TARGET: &str = "/var/lib/kubelet/pods/target";

fn stage_req() -> NodeStageVolumeRequest {
    NodeStageVolumeRequest {
        volume_id: FAKE_ID.into(),
        staging_target_path: STAGING.into(),
        volume_capability: Some(mount_cap()),
        ..Default::default()
    }
}

fn publish_req() -> NodePublishVolumeRequest {
    NodePublishVolumeRequest {
        volume_id: FAKE_ID.into(),
        staging_target_path: STAGING.into(),
        target_path: TARGET.into(),
        volume_capability: Some(mount_cap()),
        ..Default::default()
    }
}

fn code<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

#[tokio::test]
async fn stage_validation() {
    let n = node();
    let cases: Vec<(&str, NodeStageVolumeRequest, Code)> = vec![
        (
            "no volume id",
            NodeStageVolumeRequest {
                volume_id: String::new(),
                ..stage_req()
            },
            Code::InvalidArgument,
        ),
        (
            "no staging path",
            NodeStageVolumeRequest {
                staging_target_path: String::new(),
                ..stage_req()
            },
            Code::InvalidArgument,
        ),
        (
            "relative staging path",
            NodeStageVolumeRequest {
                staging_target_path: "relative/staging".into(),
                ..stage_req()
            },
            Code::InvalidArgument,
        ),
        (
            "staging path with ..",
            NodeStageVolumeRequest {
                staging_target_path: "/var/lib/../../etc".into(),
                ..stage_req()
            },
            Code::InvalidArgument,
        ),
        (
            "no capability",
            NodeStageVolumeRequest {
                volume_capability: None,
                ..stage_req()
            },
            Code::InvalidArgument,
        ),
        (
            "capability without access type",
            NodeStageVolumeRequest {
                volume_capability: Some(VolumeCapability {
                    access_type: None,
                    ..mount_cap()
                }),
                ..stage_req()
            },
            Code::InvalidArgument,
        ),
        (
            "capability without access mode",
            NodeStageVolumeRequest {
                volume_capability: Some(VolumeCapability {
                    access_mode: None,
                    ..mount_cap()
                }),
                ..stage_req()
            },
            Code::InvalidArgument,
        ),
        // With every field present, the made-up id is what is wrong.
        ("unknown id", stage_req(), Code::NotFound),
    ];
    for (what, req, want) in cases {
        assert_eq!(
            code(n.node_stage_volume(Request::new(req)).await),
            want,
            "{what}"
        );
    }
}

#[tokio::test]
async fn unstage_validation() {
    let n = node();
    let req = |id: &str, staging: &str| NodeUnstageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.into(),
    };
    let cases = [
        ("no volume id", req("", STAGING), Code::InvalidArgument),
        ("no staging path", req(FAKE_ID, ""), Code::InvalidArgument),
        (
            "relative staging path",
            req(FAKE_ID, "rel"),
            Code::InvalidArgument,
        ),
        (
            "staging path with ..",
            req(FAKE_ID, "/a/../b"),
            Code::InvalidArgument,
        ),
        (
            "staging path with NUL",
            req(FAKE_ID, "/a/\0b"),
            Code::InvalidArgument,
        ),
        ("unknown id", req(FAKE_ID, STAGING), Code::NotFound),
    ];
    for (what, req, want) in cases {
        assert_eq!(
            code(n.node_unstage_volume(Request::new(req)).await),
            want,
            "{what}"
        );
    }
}

#[tokio::test]
async fn publish_validation() {
    let n = node();
    let cases: Vec<(&str, NodePublishVolumeRequest, Code)> = vec![
        (
            "no volume id",
            NodePublishVolumeRequest {
                volume_id: String::new(),
                ..publish_req()
            },
            Code::InvalidArgument,
        ),
        (
            "no staging path",
            NodePublishVolumeRequest {
                staging_target_path: String::new(),
                ..publish_req()
            },
            Code::InvalidArgument,
        ),
        (
            "no target",
            NodePublishVolumeRequest {
                target_path: String::new(),
                ..publish_req()
            },
            Code::InvalidArgument,
        ),
        (
            "relative target",
            NodePublishVolumeRequest {
                target_path: "target".into(),
                ..publish_req()
            },
            Code::InvalidArgument,
        ),
        (
            "target with ..",
            NodePublishVolumeRequest {
                target_path: "/var/../../etc/passwd".into(),
                ..publish_req()
            },
            Code::InvalidArgument,
        ),
        (
            "no capability",
            NodePublishVolumeRequest {
                volume_capability: None,
                ..publish_req()
            },
            Code::InvalidArgument,
        ),
        ("unknown id", publish_req(), Code::NotFound),
    ];
    for (what, req, want) in cases {
        assert_eq!(
            code(n.node_publish_volume(Request::new(req)).await),
            want,
            "{what}"
        );
    }
}

#[tokio::test]
async fn unpublish_validation() {
    let n = node();
    let req = |id: &str, target: &str| NodeUnpublishVolumeRequest {
        volume_id: id.into(),
        target_path: target.into(),
    };
    let cases = [
        ("no volume id", req("", TARGET), Code::InvalidArgument),
        ("no target", req(FAKE_ID, ""), Code::InvalidArgument),
        (
            "relative target",
            req(FAKE_ID, "target"),
            Code::InvalidArgument,
        ),
        (
            "target with ..",
            req(FAKE_ID, "/a/../b"),
            Code::InvalidArgument,
        ),
        ("unknown id", req(FAKE_ID, TARGET), Code::NotFound),
    ];
    for (what, req, want) in cases {
        assert_eq!(
            code(n.node_unpublish_volume(Request::new(req)).await),
            want,
            "{what}"
        );
    }
}

#[tokio::test]
async fn expand_validation() {
    let n = node();
    let base = NodeExpandVolumeRequest {
        volume_id: FAKE_ID.into(),
        volume_path: TARGET.into(),
        ..Default::default()
    };
    let cases: Vec<(&str, NodeExpandVolumeRequest, Code)> = vec![
        (
            "no volume id",
            NodeExpandVolumeRequest {
                volume_id: String::new(),
                ..base.clone()
            },
            Code::InvalidArgument,
        ),
        (
            "no volume path",
            NodeExpandVolumeRequest {
                volume_path: String::new(),
                ..base.clone()
            },
            Code::InvalidArgument,
        ),
        // Nothing of ours is at a path that is not absolute and plain.
        (
            "relative volume path",
            NodeExpandVolumeRequest {
                volume_path: "rel".into(),
                ..base.clone()
            },
            Code::NotFound,
        ),
        (
            "relative staging path",
            NodeExpandVolumeRequest {
                staging_target_path: "rel".into(),
                ..base.clone()
            },
            Code::InvalidArgument,
        ),
        (
            "capability without access mode",
            NodeExpandVolumeRequest {
                volume_capability: Some(VolumeCapability {
                    access_mode: None,
                    ..mount_cap()
                }),
                ..base.clone()
            },
            Code::InvalidArgument,
        ),
        ("unknown id", base.clone(), Code::NotFound),
    ];
    for (what, req, want) in cases {
        assert_eq!(
            code(n.node_expand_volume(Request::new(req)).await),
            want,
            "{what}"
        );
    }
}

#[tokio::test]
async fn stats_and_health_validation() {
    let n = node();
    let stats = |id: &str, path: &str| NodeGetVolumeStatsRequest {
        volume_id: id.into(),
        volume_path: path.into(),
        ..Default::default()
    };
    let cases = [
        ("no volume id", stats("", TARGET), Code::InvalidArgument),
        ("no volume path", stats(FAKE_ID, ""), Code::InvalidArgument),
        (
            "relative volume path",
            stats(FAKE_ID, "rel"),
            Code::NotFound,
        ),
        ("unknown id", stats(FAKE_ID, TARGET), Code::NotFound),
    ];
    for (what, req, want) in cases {
        assert_eq!(
            code(n.node_get_volume_stats(Request::new(req)).await),
            want,
            "stats: {what}"
        );
    }
    let health = |id: &str, publish: &str, staging: &str| NodeGetVolumeHealthRequest {
        volume_id: id.into(),
        volume_publish_path: publish.into(),
        staging_target_path: staging.into(),
    };
    let cases = [
        (
            "no volume id",
            health("", TARGET, ""),
            Code::InvalidArgument,
        ),
        // As the VM case node_volume_health_sees_unmounts_and_closed_mappings
        // sent it: every field empty.
        ("empty request", health("", "", ""), Code::InvalidArgument),
        (
            "relative publish path",
            health(FAKE_ID, "rel", ""),
            Code::NotFound,
        ),
        (
            "relative staging path",
            health(FAKE_ID, "", "rel"),
            Code::NotFound,
        ),
        (
            "unknown id",
            health(FAKE_ID, TARGET, STAGING),
            Code::NotFound,
        ),
    ];
    for (what, req, want) in cases {
        assert_eq!(
            code(n.node_get_volume_health(Request::new(req)).await),
            want,
            "health: {what}"
        );
    }
}

#[tokio::test]
async fn info_and_capabilities() {
    let n = node();
    let info = n
        .node_get_info(Request::new(NodeGetInfoRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, "node-1");
    assert_eq!(
        info.accessible_topology.unwrap().segments["topology.cryptdisk.csi.io/node"],
        "node-1"
    );
    let caps = n
        .node_get_capabilities(Request::new(NodeGetCapabilitiesRequest {}))
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    assert_eq!(caps.len(), 5);
}
