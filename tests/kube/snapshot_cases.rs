//! Snapshots through the real csi-snapshotter: the VolumeSnapshotContent's
//! `status.restoreSize` must be the source PV's capacity (what CreateVolume or
//! ControllerExpandVolume reported), or external-provisioner refuses to restore
//! the snapshot into a claim of the source's size.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use cryptdisk_csi::client;
use cryptdisk_csi::config::Endpoint;
use cryptdisk_csi::proto::csi::controller_client::ControllerClient;
use cryptdisk_csi::proto::csi::volume_capability::access_mode::Mode;
use cryptdisk_csi::proto::csi::volume_capability::{AccessMode, AccessType, MountVolume};
use cryptdisk_csi::proto::csi::*;
use serde_json::{Value, json};
use tonic::transport::Channel;

use crate::cluster::Cluster;
use crate::{Case, CaseResult, check, ensure};

const BIN: &str = env!("CARGO_BIN_EXE_cryptdisk-csi");
const DRIVER: &str = "cryptdisk.csi.io";
const NODE: &str = "kube-node";
const SNAPSHOTTER: &str = "csi-snapshotter";
const GIB: i64 = 1 << 30;
const SNAPSHOT_API: &str = "/apis/snapshot.storage.k8s.io/v1";
const CRD_API: &str = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions";

pub fn cases() -> Vec<Case> {
    vec![Case {
        name: "kube_snapshot_restore_size_is_the_pv_capacity",
        run: |t| Box::pin(restore_size(t)),
    }]
}

/// Installs the VolumeSnapshot CRDs of the pinned external-snapshotter release
/// (hack/kube-tools copies them from its client module) and waits until they
/// are served.
pub(crate) async fn install_crds(cluster: &Cluster, tools: &Path) -> Result<(), String> {
    let mut names = Vec::new();
    for entry in check!(std::fs::read_dir(tools.join("crds"))) {
        let path = check!(entry).path();
        let yaml = check!(std::fs::read_to_string(&path));
        let created = check!(cluster.admin.create_yaml(CRD_API, &yaml).await);
        names.push(
            created["metadata"]["name"]
                .as_str()
                .unwrap_or("")
                .to_string(),
        );
    }
    ensure!(
        names
            .iter()
            .any(|n| n == "volumesnapshotcontents.snapshot.storage.k8s.io"),
        "no VolumeSnapshotContent CRD among {names:?}"
    );
    for name in &names {
        check!(
            cluster
                .admin
                .wait_for(
                    &format!("{CRD_API}/{name}"),
                    Duration::from_secs(30),
                    |crd| {
                        crd["status"]["conditions"].as_array().is_some_and(|cs| {
                            cs.iter()
                                .any(|c| c["type"] == "Established" && c["status"] == "True")
                        })
                    }
                )
                .await
        );
    }
    check!(
        cluster
            .admin
            .wait_for(
                &format!("{SNAPSHOT_API}/volumesnapshotcontents"),
                Duration::from_secs(30),
                |_| true
            )
            .await
    );
    Ok(())
}

/// The snapshotter's ClusterRole as the Helm chart grants it: its `rules:`
/// block is read from the chart, so a permission the chart lacks fails here.
fn chart_snapshotter_rules() -> Result<String, String> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/helm/cryptdisk-csi/templates/controller-rbac.yaml"
    );
    let text = check!(std::fs::read_to_string(path));
    let start = text
        .find("name: {{ $name }}-snapshotter")
        .ok_or("the chart has no snapshotter ClusterRole")?;
    let rest = &text[start..];
    let rules_at = rest
        .find("\nrules:")
        .ok_or("no rules in the snapshotter role")?;
    let rules: Vec<&str> = rest[rules_at + 1..]
        .lines()
        .take_while(|l| !l.starts_with("{{") && !l.starts_with("---"))
        .collect();
    ensure!(
        rules.iter().all(|l| !l.contains("{{")),
        "templating inside the snapshotter's rules: {rules:?}"
    );
    Ok(rules.join("\n"))
}

async fn grant_snapshotter(cluster: &Cluster) -> Result<(), String> {
    let role = format!(
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata:\n  name: \
         kube-tier-snapshotter\n{}\n",
        chart_snapshotter_rules()?
    );
    check!(
        cluster
            .admin
            .create_yaml("/apis/rbac.authorization.k8s.io/v1/clusterroles", &role)
            .await
    );
    let binding = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": "kube-tier-snapshotter"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
            "name": "kube-tier-snapshotter"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": SNAPSHOTTER}],
    });
    check!(
        cluster
            .admin
            .create(
                "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
                &binding
            )
            .await
    );
    Ok(())
}

/// Starts `cryptdisk-csi controller` with the local backend on a unix socket.
pub(crate) async fn start_controller(
    cluster: &mut Cluster,
) -> Result<ControllerClient<Channel>, String> {
    let dir = cluster.dir.path().to_path_buf();
    let socket = dir.join("controller.sock");
    cluster.spawn(
        "controller",
        Command::new(BIN)
            .arg("controller")
            .arg(format!("--endpoint=unix://{}", socket.display()))
            .arg(format!("--data-dir={}", dir.join("data").display()))
            .arg(format!("--local-node={NODE}"))
            .arg("--log-level=debug"),
    )?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        cluster.check_alive()?;
        ensure!(
            Instant::now() < deadline,
            "the controller never listened on {}",
            socket.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let channel = check!(client::connect(&Endpoint::Unix(socket), Duration::from_secs(5)).await);
    Ok(ControllerClient::new(channel))
}

pub(crate) fn create_req(name: &str, bytes: i64, params: &[(&str, &str)]) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![VolumeCapability {
            access_type: Some(AccessType::Mount(MountVolume {
                fs_type: "ext4".into(),
                ..Default::default()
            })),
            access_mode: Some(AccessMode {
                mode: Mode::SingleNodeWriter as i32,
            }),
        }],
        parameters: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    }
}

/// A resource quantity in bytes: a plain integer or one with a binary (Ki…Ei)
/// or decimal (k…E) suffix, as the API server writes them back.
fn quantity_bytes(q: &str) -> Option<i64> {
    let units: [(&str, i64); 12] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("Pi", 1 << 50),
        ("Ei", 1 << 60),
        ("k", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
        ("P", 1_000_000_000_000_000),
        ("E", 1_000_000_000_000_000_000),
    ];
    for (suffix, factor) in units {
        if let Some(n) = q.strip_suffix(suffix) {
            return n.parse::<i64>().ok()?.checked_mul(factor);
        }
    }
    q.parse().ok()
}

/// A PV for `volume` (as external-provisioner would make it) and a dynamic
/// VolumeSnapshotContent of it, as snapshot-controller would make it for a
/// VolumeSnapshot `snap-<tag>`.
async fn pv_and_content(cluster: &Cluster, tag: &str, volume: &Volume) -> Result<(), String> {
    let pv = json!({
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": format!("pv-{tag}")},
        "spec": {
            "capacity": {"storage": volume.capacity_bytes.to_string()},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain",
            "volumeMode": "Filesystem",
            "csi": {
                "driver": DRIVER,
                "volumeHandle": volume.volume_id,
                "volumeAttributes": volume.volume_context,
                "fsType": "ext4",
            },
        },
    });
    check!(cluster.admin.create("/api/v1/persistentvolumes", &pv).await);
    let content = json!({
        "apiVersion": "snapshot.storage.k8s.io/v1",
        "kind": "VolumeSnapshotContent",
        "metadata": {"name": format!("snapcontent-{tag}")},
        "spec": {
            "driver": DRIVER,
            "deletionPolicy": "Delete",
            "source": {"volumeHandle": volume.volume_id},
            "volumeSnapshotClassName": "cryptdisk",
            "volumeSnapshotRef": {
                "apiVersion": "snapshot.storage.k8s.io/v1",
                "kind": "VolumeSnapshot",
                "name": format!("snap-{tag}"),
                "namespace": "default",
                "uid": uuid::Uuid::new_v4().to_string(),
            },
        },
    });
    check!(
        cluster
            .admin
            .create(&format!("{SNAPSHOT_API}/volumesnapshotcontents"), &content)
            .await
    );
    Ok(())
}

/// Waits until the snapshotter has made the content ready; its status.
async fn ready_content(cluster: &mut Cluster, tag: &str) -> Result<Value, String> {
    let path = format!("{SNAPSHOT_API}/volumesnapshotcontents/snapcontent-{tag}");
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        cluster.check_alive()?;
        let content = check!(cluster.admin.get(&path).await);
        let status = &content["status"];
        if status["readyToUse"] == json!(true) {
            return Ok(status.clone());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{tag}: content not ready after 90 s: {status}\ncsi-snapshotter:\n{}\ncontroller:\n{}",
                cluster.log_tail(SNAPSHOTTER, 40),
                cluster.log_tail("controller", 20)
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn restore_size(tools: &Path) -> CaseResult {
    let mut cluster = Cluster::start(tools, &[SNAPSHOTTER]).await?;
    let mut ctl = start_controller(&mut cluster).await?;

    // The volumes: 1 GiB plain (the size of the report), 1 GiB with integrity,
    // and 1 GiB grown to 2 GiB + 4 KiB before its snapshot.
    let integrity = [("cryptdisk.csi.io/integrity", "true")];
    let mut volumes: Vec<(&str, Volume)> = Vec::new();
    for (tag, params) in [
        ("plain", &[][..]),
        ("integrity", &integrity[..]),
        ("grown", &[][..]),
    ] {
        let volume = check!(ctl.create_volume(create_req(tag, GIB, params)).await)
            .into_inner()
            .volume
            .ok_or("no volume")?;
        ensure!(
            volume.capacity_bytes == GIB,
            "{tag}: CreateVolume gave {}",
            volume.capacity_bytes
        );
        volumes.push((tag, volume));
    }
    let grown = &mut volumes[2].1;
    let expanded = check!(
        ctl.controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: grown.volume_id.clone(),
            capacity_range: Some(CapacityRange {
                required_bytes: 2 * GIB + 4096,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
    )
    .into_inner();
    // The resizer writes what ControllerExpandVolume answers into the PV.
    grown.capacity_bytes = expanded.capacity_bytes;

    install_crds(&cluster, tools).await?;
    grant_snapshotter(&cluster).await?;
    let class = json!({
        "apiVersion": "snapshot.storage.k8s.io/v1",
        "kind": "VolumeSnapshotClass",
        "metadata": {"name": "cryptdisk"},
        "driver": DRIVER,
        "deletionPolicy": "Delete",
    });
    check!(
        cluster
            .admin
            .create(&format!("{SNAPSHOT_API}/volumesnapshotclasses"), &class)
            .await
    );
    for (tag, volume) in &volumes {
        pv_and_content(&cluster, tag, volume).await?;
    }

    let kubeconfig = cluster.kubeconfig(SNAPSHOTTER)?;
    let socket = cluster.dir.path().join("controller.sock");
    cluster.spawn(
        SNAPSHOTTER,
        Command::new(tools.join("bin/csi-snapshotter"))
            .arg(format!("--csi-address={}", socket.display()))
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg("--leader-election=false")
            .arg("--timeout=60s")
            .arg("--v=4"),
    )?;

    let mut failures = Vec::new();
    for (tag, volume) in &volumes {
        let status = ready_content(&mut cluster, tag).await?;
        let pv = check!(
            cluster
                .admin
                .get(&format!("/api/v1/persistentvolumes/pv-{tag}"))
                .await
        );
        let pv_bytes = pv["spec"]["capacity"]["storage"]
            .as_str()
            .and_then(quantity_bytes)
            .ok_or_else(|| format!("{tag}: PV capacity {}", pv["spec"]["capacity"]))?;
        ensure!(
            pv_bytes == volume.capacity_bytes,
            "{tag}: the PV holds {pv_bytes}"
        );
        let restore_size = status["restoreSize"].as_i64();
        if restore_size != Some(pv_bytes) {
            failures.push(format!(
                "{tag}: restoreSize {:?} is not the source PV's capacity {pv_bytes}",
                status["restoreSize"]
            ));
            continue;
        }
        // external-provisioner restores into a claim of at least restoreSize:
        // the source's own size must do.
        let handle = status["snapshotHandle"]
            .as_str()
            .ok_or_else(|| format!("{tag}: no snapshotHandle in {status}"))?;
        let mut restore = create_req(&format!("{tag}-restored"), pv_bytes, &[]);
        if *tag == "integrity" {
            restore
                .parameters
                .insert(integrity[0].0.into(), integrity[0].1.into());
        }
        restore.volume_content_source = Some(VolumeContentSource {
            r#type: Some(volume_content_source::Type::Snapshot(
                volume_content_source::SnapshotSource {
                    snapshot_id: handle.to_string(),
                },
            )),
        });
        let restored = check!(ctl.create_volume(restore).await)
            .into_inner()
            .volume
            .ok_or("no volume")?;
        ensure!(
            restored.capacity_bytes >= pv_bytes,
            "{tag}: restored into {}",
            restored.capacity_bytes
        );
    }
    ensure!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}
