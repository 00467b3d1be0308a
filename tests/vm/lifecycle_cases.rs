//! The whole volume lifecycle over gRPC against the real binary (`cryptdisk-csi
//! dev` on a unix socket), with real dm-crypt, loop devices and mounts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cryptdisk_csi::client;
use cryptdisk_csi::config::Endpoint;
use cryptdisk_csi::proto::csi::controller_client::ControllerClient;
use cryptdisk_csi::proto::csi::node_client::NodeClient;
use cryptdisk_csi::proto::csi::volume_capability::access_mode::Mode;
use cryptdisk_csi::proto::csi::volume_capability::{
    AccessMode, AccessType, BlockVolume, MountVolume,
};
use cryptdisk_csi::proto::csi::*;
use tonic::Code;
use tonic::transport::Channel;

use crate::{Case, CaseResult, Ctx, check, ensure};

pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "lifecycle_sigterm_lets_an_inflight_stage_finish",
            run: |c| Box::pin(sigterm_lets_stage_finish(c)),
        },
        Case {
            name: "lifecycle_extra_keyslot_is_refused",
            run: |c| Box::pin(extra_keyslot(c)),
        },
        Case {
            name: "lifecycle_restage_after_a_crash_at_every_step",
            run: |c| Box::pin(crash_stage(c)),
        },
        Case {
            name: "lifecycle_unstage_after_a_crash_at_every_step",
            run: |c| Box::pin(crash_unstage(c)),
        },
        Case {
            name: "lifecycle_clone_and_listings",
            run: |c| Box::pin(clone_and_listings(c)),
        },
        Case {
            name: "lifecycle_mount_ext4_snapshot_restore",
            run: |c| Box::pin(mount_lifecycle(c)),
        },
        Case {
            name: "lifecycle_block_volume",
            run: |c| Box::pin(block_lifecycle(c)),
        },
        Case {
            name: "lifecycle_xfs_read_only_publish",
            run: |c| Box::pin(xfs_read_only(c)),
        },
        Case {
            name: "lifecycle_error_codes",
            run: |c| Box::pin(error_codes(c)),
        },
        Case {
            name: "lifecycle_non_blank_images_are_refused_untouched",
            run: |c| Box::pin(non_blank(c)),
        },
        Case {
            name: "lifecycle_foreign_headers_are_refused",
            run: |c| Box::pin(foreign_headers(c)),
        },
        Case {
            name: "lifecycle_concurrent_stage_is_aborted",
            run: |c| Box::pin(concurrent_stage(c)),
        },
    ]
}

const BIN: &str = env!("CARGO_BIN_EXE_cryptdisk-csi");
pub const MIB: i64 = 1 << 20;
pub const NODE: &str = "vm-node";

/// A running `cryptdisk-csi dev` with its own data directory under /tmp.
pub struct Driver {
    child: Option<Child>,
    pub dir: PathBuf,
    pub controller: ControllerClient<Channel>,
    pub node: NodeClient<Channel>,
}

impl Driver {
    pub async fn start(tag: &str) -> Result<Driver, String> {
        Self::start_in(fresh_dir(tag)?, None).await
    }

    /// Starts (or restarts) the driver on an existing directory, optionally set to
    /// crash at a failpoint.
    pub async fn start_in(dir: PathBuf, failpoint: Option<&str>) -> Result<Driver, String> {
        Self::start_with(dir, failpoint, &[], &[]).await
    }

    /// As [`Driver::start_in`], with more flags and environment variables for
    /// `cryptdisk-csi dev`.
    pub async fn start_with(
        dir: PathBuf,
        failpoint: Option<&str>,
        flags: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Driver, String> {
        let socket = dir.join("csi.sock");
        let log = check!(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join("driver.log"))
        );
        let mut cmd = Command::new(BIN);
        cmd.envs(env.iter().copied());
        if let Some(point) = failpoint {
            cmd.env("CRYPTDISK_FAILPOINT", point);
        }
        let child = check!(
            cmd.arg("dev")
                .arg(format!("--endpoint=unix://{}", socket.display()))
                .arg(format!("--data-dir={}", dir.join("data").display()))
                .arg(format!("--node-id={NODE}"))
                .args(
                    (!flags.iter().any(|f| f.starts_with("--log-level")))
                        .then_some("--log-level=debug"),
                )
                .args(flags)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            if Instant::now() > deadline {
                return Err(format!("driver never listened on {}", socket.display()));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let channel =
            check!(client::connect(&Endpoint::Unix(socket.clone()), Duration::from_secs(5)).await);
        Ok(Driver {
            child: Some(child),
            dir,
            controller: ControllerClient::new(channel.clone()),
            node: NodeClient::new(channel),
        })
    }

    /// SIGKILL: a crash, with nothing cleaned up.
    pub fn kill(mut self) -> PathBuf {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.dir.clone()
    }

    /// Waits up to `limit` for the process to exit by itself (a failpoint).
    pub async fn wait_exit(&mut self, limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        while let Some(c) = self.child.as_mut() {
            if check!(c.try_wait()).is_some() {
                self.child = None;
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "the driver did not exit in {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("driver.log")).unwrap_or_default()
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = c.wait();
        }
    }
}

/// An empty working directory for one case's driver.
pub fn fresh_dir(tag: &str) -> Result<PathBuf, String> {
    let dir = PathBuf::from(format!("/tmp/cryptdisk-vm-{tag}"));
    let _ = std::fs::remove_dir_all(&dir);
    check!(std::fs::create_dir_all(&dir));
    Ok(dir)
}

pub fn mount_cap(fs: &str, mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs.into(),
            mount_flags: vec![],
            volume_mount_group: String::new(),
        })),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

pub fn block_cap() -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Block(BlockVolume {})),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    }
}

pub fn create_req(name: &str, bytes: i64, cap: VolumeCapability) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![cap],
        ..Default::default()
    }
}

/// ControllerPublishVolume of `volume_id` to the test node.
pub fn attach_req(volume_id: &str, cap: &VolumeCapability) -> ControllerPublishVolumeRequest {
    ControllerPublishVolumeRequest {
        volume_id: volume_id.into(),
        node_id: NODE.into(),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    }
}

/// CreateVolume, then ControllerPublishVolume to the test node: the volume and
/// its publish context.
pub async fn create_attached(
    controller: &mut ControllerClient<Channel>,
    req: CreateVolumeRequest,
) -> Result<(Volume, HashMap<String, String>), String> {
    let cap = req.volume_capabilities[0].clone();
    let volume = check!(controller.create_volume(req).await)
        .into_inner()
        .volume
        .ok_or("no volume")?;
    let context = check!(
        controller
            .controller_publish_volume(attach_req(&volume.volume_id, &cap))
            .await
    )
    .into_inner()
    .publish_context;
    Ok((volume, context))
}

/// Everything a staged and published volume needs to be found again.
pub struct Staged {
    pub volume: Volume,
    pub publish_context: HashMap<String, String>,
    pub staging: PathBuf,
    pub target: PathBuf,
    pub cap: VolumeCapability,
}

/// Create → ControllerPublish → NodeStage → NodePublish, each called twice to
/// prove idempotence.
pub async fn provision(d: &mut Driver, req: CreateVolumeRequest) -> Result<Staged, String> {
    let cap = req.volume_capabilities[0].clone();
    let volume = check!(d.controller.create_volume(req.clone()).await)
        .into_inner()
        .volume
        .ok_or("no volume")?;
    let again = check!(d.controller.create_volume(req.clone()).await)
        .into_inner()
        .volume
        .ok_or("no volume")?;
    ensure!(
        again.volume_id == volume.volume_id,
        "second create made {} not {}",
        again.volume_id,
        volume.volume_id
    );
    let attach = ControllerPublishVolumeRequest {
        volume_id: volume.volume_id.clone(),
        node_id: NODE.into(),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    };
    let publish_context = check!(d.controller.controller_publish_volume(attach.clone()).await)
        .into_inner()
        .publish_context;
    check!(d.controller.controller_publish_volume(attach).await);
    let base = d.dir.join("kubelet").join(&req.name);
    let staging = base.join("staging");
    let target = base.join("target");
    check!(std::fs::create_dir_all(&staging));
    stage(d, &volume, &publish_context, &staging, &cap).await?;
    stage(d, &volume, &publish_context, &staging, &cap).await?;
    let staged = Staged {
        volume,
        publish_context,
        staging,
        target,
        cap,
    };
    publish(d, &staged, false).await?;
    publish(d, &staged, false).await?;
    Ok(staged)
}

pub async fn stage(
    d: &mut Driver,
    volume: &Volume,
    publish_context: &HashMap<String, String>,
    staging: &Path,
    cap: &VolumeCapability,
) -> Result<(), String> {
    check!(
        d.node
            .node_stage_volume(NodeStageVolumeRequest {
                volume_id: volume.volume_id.clone(),
                publish_context: publish_context.clone(),
                staging_target_path: staging.display().to_string(),
                volume_capability: Some(cap.clone()),
                volume_context: volume.volume_context.clone(),
                ..Default::default()
            })
            .await
    );
    Ok(())
}

pub async fn publish(d: &mut Driver, s: &Staged, readonly: bool) -> Result<(), String> {
    check!(
        d.node
            .node_publish_volume(NodePublishVolumeRequest {
                volume_id: s.volume.volume_id.clone(),
                publish_context: s.publish_context.clone(),
                staging_target_path: s.staging.display().to_string(),
                target_path: s.target.display().to_string(),
                volume_capability: Some(s.cap.clone()),
                readonly,
                volume_context: s.volume.volume_context.clone(),
                ..Default::default()
            })
            .await
    );
    Ok(())
}

/// NodeUnpublish → NodeUnstage → ControllerUnpublish, each twice.
pub async fn release(d: &mut Driver, s: &Staged) -> Result<(), String> {
    for _ in 0..2 {
        check!(
            d.node
                .node_unpublish_volume(NodeUnpublishVolumeRequest {
                    volume_id: s.volume.volume_id.clone(),
                    target_path: s.target.display().to_string(),
                })
                .await
        );
    }
    ensure!(
        !s.target.exists(),
        "target {} left after unpublish",
        s.target.display()
    );
    for _ in 0..2 {
        check!(
            d.node
                .node_unstage_volume(NodeUnstageVolumeRequest {
                    volume_id: s.volume.volume_id.clone(),
                    staging_target_path: s.staging.display().to_string(),
                })
                .await
        );
    }
    for _ in 0..2 {
        check!(
            d.controller
                .controller_unpublish_volume(ControllerUnpublishVolumeRequest {
                    volume_id: s.volume.volume_id.clone(),
                    node_id: NODE.into(),
                    ..Default::default()
                })
                .await
        );
    }
    Ok(())
}

pub async fn delete(d: &mut Driver, volume_id: &str) -> Result<(), String> {
    for _ in 0..2 {
        check!(
            d.controller
                .delete_volume(DeleteVolumeRequest {
                    volume_id: volume_id.into(),
                    ..Default::default()
                })
                .await
        );
    }
    Ok(())
}

/// The image file behind a local volume id (`local:<node>:<disk>`).
pub fn image_of(d: &Driver, volume_id: &str) -> PathBuf {
    let disk = volume_id.rsplit(':').next().unwrap_or_default();
    d.dir.join("data/disks").join(format!("{disk}.img"))
}

pub fn open_mappings() -> Vec<String> {
    std::fs::read_dir("/dev/mapper")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("cryptdisk-"))
                .collect()
        })
        .unwrap_or_default()
}

pub fn code_of<T>(r: Result<T, tonic::Status>) -> Option<Code> {
    r.err().map(|s| s.code())
}

/// Fails the case unless the call fails with `code`.
#[macro_export]
macro_rules! expect_code {
    ($call:expr, $code:expr, $what:expr) => {{
        let got = $crate::lifecycle_cases::code_of($call.await);
        ensure!(
            got == Some($code),
            "{}: expected {:?}, got {:?}",
            $what,
            $code,
            got
        );
    }};
}

async fn mount_lifecycle(_ctx: &mut Ctx) -> CaseResult {
    let mut d = Driver::start("mount").await?;
    let s = provision(
        &mut d,
        create_req(
            "pvc-ext4",
            64 * MIB,
            mount_cap("ext4", Mode::SingleNodeWriter),
        ),
    )
    .await?;
    ensure!(
        s.volume.capacity_bytes == 64 * MIB,
        "capacity {}",
        s.volume.capacity_bytes
    );
    let secret = b"cryptdisk lifecycle: this must never be on the disk in clear".repeat(64);
    check!(std::fs::write(s.target.join("secret.txt"), &secret));
    release(&mut d, &s).await?;
    let mapping = cryptdisk_csi::crypt::MapperName::for_volume(&s.volume.volume_id);
    ensure!(
        !open_mappings().contains(&mapping.as_str().to_string()),
        "mapping left after unstage"
    );
    let image = image_of(&d, &s.volume.volume_id);
    ensure!(
        !check!(crate::crypt_cases::device_contains(&image, &secret[..60])),
        "plaintext in {}",
        image.display()
    );

    // Stage again: the data reads back through a fresh mapping.
    let s2 = provision(
        &mut d,
        create_req(
            "pvc-ext4",
            64 * MIB,
            mount_cap("ext4", Mode::SingleNodeWriter),
        ),
    )
    .await?;
    ensure!(
        s2.volume.volume_id == s.volume.volume_id,
        "same name, same volume"
    );
    ensure!(
        check!(std::fs::read(s2.target.join("secret.txt"))) == secret,
        "data did not survive restage"
    );
    release(&mut d, &s2).await?;

    // Snapshot, restore to a new volume, read the file there.
    let snap = check!(
        d.controller
            .create_snapshot(CreateSnapshotRequest {
                source_volume_id: s.volume.volume_id.clone(),
                name: "snap-1".into(),
                ..Default::default()
            })
            .await
    )
    .into_inner()
    .snapshot
    .ok_or("no snapshot")?;
    ensure!(snap.ready_to_use, "snapshot not ready");
    let mut restore = create_req(
        "pvc-restored",
        64 * MIB,
        mount_cap("ext4", Mode::SingleNodeWriter),
    );
    restore.volume_content_source = Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Snapshot(
            volume_content_source::SnapshotSource {
                snapshot_id: snap.snapshot_id.clone(),
            },
        )),
    });
    let r = provision(&mut d, restore).await?;
    ensure!(
        r.volume.volume_id != s.volume.volume_id,
        "restore reused the source id"
    );
    ensure!(
        check!(std::fs::read(r.target.join("secret.txt"))) == secret,
        "restored volume lacks the file"
    );
    release(&mut d, &r).await?;

    // List and get see them; then delete everything.
    let listed = check!(
        d.controller
            .list_volumes(ListVolumesRequest::default())
            .await
    )
    .into_inner();
    ensure!(
        listed.entries.len() == 2,
        "listed {} volumes",
        listed.entries.len()
    );
    check!(
        d.controller
            .delete_snapshot(DeleteSnapshotRequest {
                snapshot_id: snap.snapshot_id,
                ..Default::default()
            })
            .await
    );
    delete(&mut d, &r.volume.volume_id).await?;
    delete(&mut d, &s.volume.volume_id).await?;
    ensure!(!image.exists(), "image left after delete");
    let listed = check!(
        d.controller
            .list_volumes(ListVolumesRequest::default())
            .await
    )
    .into_inner();
    ensure!(
        listed.entries.is_empty(),
        "volumes left: {}",
        listed.entries.len()
    );
    Ok(())
}

async fn block_lifecycle(_ctx: &mut Ctx) -> CaseResult {
    let mut d = Driver::start("block").await?;
    let s = provision(&mut d, create_req("pvc-block", 32 * MIB, block_cap())).await?;
    let data = b"block volume marker ".repeat(205);
    {
        use std::io::{Read, Seek, SeekFrom, Write};
        let mut f = check!(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&s.target)
        );
        check!(f.write_all(&data[..4096]));
        check!(f.sync_all());
        let size = check!(f.seek(SeekFrom::End(0)));
        ensure!(size >= 32 * MIB as u64, "block device is {size} bytes");
        check!(f.seek(SeekFrom::Start(0)));
        let mut back = vec![0u8; 4096];
        check!(f.read_exact(&mut back));
        ensure!(back == data[..4096], "block data did not read back");
    }
    release(&mut d, &s).await?;
    let image = image_of(&d, &s.volume.volume_id);
    ensure!(
        !check!(crate::crypt_cases::device_contains(&image, &data[..40])),
        "plaintext on the image"
    );
    delete(&mut d, &s.volume.volume_id).await?;
    Ok(())
}

async fn xfs_read_only(_ctx: &mut Ctx) -> CaseResult {
    let mut d = Driver::start("xfs").await?;
    let s = provision(
        &mut d,
        create_req(
            "pvc-xfs",
            320 * MIB,
            mount_cap("xfs", Mode::SingleNodeWriter),
        ),
    )
    .await?;
    let found =
        check!(cryptdisk_csi::mount::find_mount(&s.staging)).ok_or("staging not mounted")?;
    ensure!(found.fstype == "xfs", "staging fstype {}", found.fstype);
    check!(std::fs::write(s.target.join("f"), b"x"));
    // A second, read-only publish of the same staged volume.
    let ro = Staged {
        target: s.target.with_file_name("target-ro"),
        ..clone_staged(&s)
    };
    publish(&mut d, &ro, true).await?;
    let err = std::fs::write(ro.target.join("g"), b"y")
        .err()
        .map(|e| e.raw_os_error());
    ensure!(
        err == Some(Some(libc::EROFS)),
        "write through a read-only publish: {err:?}"
    );
    check!(
        d.node
            .node_unpublish_volume(NodeUnpublishVolumeRequest {
                volume_id: ro.volume.volume_id.clone(),
                target_path: ro.target.display().to_string(),
            })
            .await
    );
    release(&mut d, &s).await?;
    delete(&mut d, &s.volume.volume_id).await?;
    Ok(())
}

fn clone_staged(s: &Staged) -> Staged {
    Staged {
        volume: s.volume.clone(),
        publish_context: s.publish_context.clone(),
        staging: s.staging.clone(),
        target: s.target.clone(),
        cap: s.cap.clone(),
    }
}

async fn error_codes(_ctx: &mut Ctx) -> CaseResult {
    let mut d = Driver::start("errors").await?;
    let cap = mount_cap("ext4", Mode::SingleNodeWriter);
    let c = &mut d.controller;
    // CreateVolume
    expect_code!(
        c.create_volume(create_req("", MIB, cap.clone())),
        Code::InvalidArgument,
        "empty name"
    );
    let mut no_caps = create_req("x", MIB, cap.clone());
    no_caps.volume_capabilities.clear();
    expect_code!(
        c.create_volume(no_caps),
        Code::InvalidArgument,
        "no capabilities"
    );
    let multi = mount_cap("ext4", Mode::MultiNodeMultiWriter);
    expect_code!(
        c.create_volume(create_req("x", MIB, multi)),
        Code::InvalidArgument,
        "multi-node"
    );
    expect_code!(
        c.create_volume(create_req(
            "x",
            MIB,
            mount_cap("btrfs", Mode::SingleNodeWriter)
        )),
        Code::InvalidArgument,
        "btrfs"
    );
    let mut unknown = create_req("x", MIB, cap.clone());
    unknown
        .parameters
        .insert("cryptdisk.csi.io/cipher".into(), "null".into());
    expect_code!(
        c.create_volume(unknown),
        Code::InvalidArgument,
        "unknown parameter"
    );
    let mut bad_range = create_req("x", 10 * MIB, cap.clone());
    bad_range.capacity_range = Some(CapacityRange {
        required_bytes: 10 * MIB,
        limit_bytes: MIB,
    });
    expect_code!(
        c.create_volume(bad_range),
        Code::OutOfRange,
        "limit < required"
    );
    let mut from_missing = create_req("x", MIB, cap.clone());
    from_missing.volume_content_source = Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Snapshot(
            volume_content_source::SnapshotSource {
                snapshot_id: "local:vm-node:snap-none".into(),
            },
        )),
    });
    expect_code!(
        c.create_volume(from_missing),
        Code::NotFound,
        "missing snapshot source"
    );
    let v = check!(
        c.create_volume(create_req("v1", 16 * MIB, cap.clone()))
            .await
    )
    .into_inner()
    .volume
    .ok_or("no volume")?;
    expect_code!(
        c.create_volume(create_req("v1", 32 * MIB, cap.clone())),
        Code::AlreadyExists,
        "same name, other size"
    );
    // DeleteVolume
    expect_code!(
        c.delete_volume(DeleteVolumeRequest::default()),
        Code::InvalidArgument,
        "delete without id"
    );
    check!(
        c.delete_volume(DeleteVolumeRequest {
            volume_id: "local:vm-node:nope".into(),
            ..Default::default()
        })
        .await
    );
    // ControllerPublish
    let publish =
        |vol: &str, node: &str, cap: Option<VolumeCapability>| ControllerPublishVolumeRequest {
            volume_id: vol.into(),
            node_id: node.into(),
            volume_capability: cap,
            ..Default::default()
        };
    expect_code!(
        c.controller_publish_volume(publish("", NODE, Some(cap.clone()))),
        Code::InvalidArgument,
        "publish without volume"
    );
    expect_code!(
        c.controller_publish_volume(publish(&v.volume_id, "", Some(cap.clone()))),
        Code::InvalidArgument,
        "publish without node"
    );
    expect_code!(
        c.controller_publish_volume(publish(&v.volume_id, NODE, None)),
        Code::InvalidArgument,
        "publish without capability"
    );
    expect_code!(
        c.controller_publish_volume(publish("local:vm-node:nope", NODE, Some(cap.clone()))),
        Code::NotFound,
        "publish unknown volume"
    );
    expect_code!(
        c.controller_publish_volume(publish(&v.volume_id, "other-node", Some(cap.clone()))),
        Code::NotFound,
        "publish to unknown node"
    );
    expect_code!(
        c.controller_unpublish_volume(ControllerUnpublishVolumeRequest::default()),
        Code::InvalidArgument,
        "unpublish without volume"
    );
    // ValidateVolumeCapabilities
    let vvc = |vol: &str, caps: Vec<VolumeCapability>| ValidateVolumeCapabilitiesRequest {
        volume_id: vol.into(),
        volume_capabilities: caps,
        ..Default::default()
    };
    expect_code!(
        c.validate_volume_capabilities(vvc("", vec![cap.clone()])),
        Code::InvalidArgument,
        "vvc without id"
    );
    expect_code!(
        c.validate_volume_capabilities(vvc(&v.volume_id, vec![])),
        Code::InvalidArgument,
        "vvc without caps"
    );
    expect_code!(
        c.validate_volume_capabilities(vvc("local:vm-node:nope", vec![cap.clone()])),
        Code::NotFound,
        "vvc unknown"
    );
    let ok = check!(
        c.validate_volume_capabilities(vvc(&v.volume_id, vec![cap.clone()]))
            .await
    )
    .into_inner();
    ensure!(
        ok.confirmed.is_some(),
        "supported capability not confirmed: {}",
        ok.message
    );
    let no = check!(
        c.validate_volume_capabilities(vvc(
            &v.volume_id,
            vec![mount_cap("ext4", Mode::MultiNodeMultiWriter)]
        ))
        .await
    )
    .into_inner();
    ensure!(
        no.confirmed.is_none() && !no.message.is_empty(),
        "multi-node confirmed"
    );
    // Listing with a bad token
    let bad = ListVolumesRequest {
        starting_token: "garbage".into(),
        ..Default::default()
    };
    expect_code!(c.list_volumes(bad), Code::Aborted, "bad list token");
    // Snapshots
    expect_code!(
        c.create_snapshot(CreateSnapshotRequest {
            name: "s".into(),
            ..Default::default()
        }),
        Code::InvalidArgument,
        "snapshot without source"
    );
    expect_code!(
        c.create_snapshot(CreateSnapshotRequest {
            source_volume_id: v.volume_id.clone(),
            ..Default::default()
        }),
        Code::InvalidArgument,
        "snapshot without name"
    );
    expect_code!(
        c.create_snapshot(CreateSnapshotRequest {
            source_volume_id: "local:vm-node:nope".into(),
            name: "s".into(),
            ..Default::default()
        }),
        Code::NotFound,
        "snapshot of unknown volume"
    );
    expect_code!(
        c.delete_snapshot(DeleteSnapshotRequest::default()),
        Code::InvalidArgument,
        "delete snapshot without id"
    );
    expect_code!(
        c.controller_get_volume(ControllerGetVolumeRequest {
            volume_id: "local:vm-node:nope".into()
        }),
        Code::NotFound,
        "get unknown volume"
    );

    // Node
    let n = &mut d.node;
    let staging = d.dir.join("staging");
    let stage = |vol: &str, path: &Path, cap: Option<VolumeCapability>| NodeStageVolumeRequest {
        volume_id: vol.into(),
        staging_target_path: path.display().to_string(),
        volume_capability: cap,
        ..Default::default()
    };
    expect_code!(
        n.node_stage_volume(stage("", &staging, Some(cap.clone()))),
        Code::InvalidArgument,
        "stage without id"
    );
    expect_code!(
        n.node_stage_volume(stage(&v.volume_id, Path::new(""), Some(cap.clone()))),
        Code::InvalidArgument,
        "stage without path"
    );
    expect_code!(
        n.node_stage_volume(stage(&v.volume_id, &staging, None)),
        Code::InvalidArgument,
        "stage without capability"
    );
    expect_code!(
        n.node_stage_volume(stage(
            &v.volume_id,
            Path::new("relative/x"),
            Some(cap.clone())
        )),
        Code::InvalidArgument,
        "relative staging path"
    );
    expect_code!(
        n.node_stage_volume(stage("local:vm-node:nope", &staging, Some(cap.clone()))),
        Code::NotFound,
        "stage unknown volume"
    );
    expect_code!(
        n.node_unstage_volume(NodeUnstageVolumeRequest {
            volume_id: String::new(),
            staging_target_path: "/x".into()
        }),
        Code::InvalidArgument,
        "unstage without id"
    );
    expect_code!(
        n.node_unstage_volume(NodeUnstageVolumeRequest {
            volume_id: v.volume_id.clone(),
            staging_target_path: String::new()
        }),
        Code::InvalidArgument,
        "unstage without path"
    );
    let publish_req = |target: &str| NodePublishVolumeRequest {
        volume_id: v.volume_id.clone(),
        staging_target_path: staging.display().to_string(),
        target_path: target.into(),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    };
    expect_code!(
        n.node_publish_volume(publish_req("")),
        Code::InvalidArgument,
        "publish without target"
    );
    expect_code!(
        n.node_publish_volume(publish_req("/tmp/not-staged-target")),
        Code::FailedPrecondition,
        "publish of an unstaged volume"
    );
    expect_code!(
        n.node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: v.volume_id.clone(),
            target_path: String::new()
        }),
        Code::InvalidArgument,
        "unpublish without target"
    );
    let info = check!(n.node_get_info(NodeGetInfoRequest {}).await).into_inner();
    ensure!(info.node_id == NODE, "node id {}", info.node_id);
    delete(&mut d, &v.volume_id).await?;
    Ok(())
}

pub fn sha256(path: &Path) -> Result<String, String> {
    use sha2::{Digest, Sha256};
    Ok(hex::encode(Sha256::digest(check!(std::fs::read(path)))))
}

/// Makes a volume, fills its image with `prepare`, and checks that staging is
/// refused with FAILED_PRECONDITION and leaves the image byte for byte as it was.
pub async fn refused_untouched(
    d: &mut Driver,
    name: &str,
    prepare: &dyn Fn(&Path) -> Result<(), String>,
) -> CaseResult {
    refused_untouched_sized(d, name, 32 * MIB, prepare).await
}

/// [`refused_untouched`] on a volume of `bytes` (some tools need room).
async fn refused_untouched_sized(
    d: &mut Driver,
    name: &str,
    bytes: i64,
    prepare: &dyn Fn(&Path) -> Result<(), String>,
) -> CaseResult {
    let cap = mount_cap("ext4", Mode::SingleNodeWriter);
    let v = check!(
        d.controller
            .create_volume(create_req(name, bytes, cap.clone()))
            .await
    )
    .into_inner()
    .volume
    .ok_or("no volume")?;
    let image = image_of(d, &v.volume_id);
    prepare(&image)?;
    let before = sha256(&image)?;
    let staging = d.dir.join(format!("staging-{name}"));
    let r = d
        .node
        .node_stage_volume(NodeStageVolumeRequest {
            volume_id: v.volume_id.clone(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(cap),
            volume_context: v.volume_context.clone(),
            ..Default::default()
        })
        .await;
    let status = r
        .err()
        .ok_or(format!("{name}: stage succeeded on a non-blank device"))?;
    ensure!(
        status.code() == Code::FailedPrecondition,
        "{name}: {:?} {}",
        status.code(),
        status.message()
    );
    ensure!(sha256(&image)? == before, "{name}: the image changed");
    let mapping = cryptdisk_csi::crypt::MapperName::for_volume(&v.volume_id);
    ensure!(
        !open_mappings().contains(&mapping.as_str().to_string()),
        "{name}: a mapping was opened"
    );
    // Nothing stays attached: unstage cleans up the loop device.
    check!(
        d.node
            .node_unstage_volume(NodeUnstageVolumeRequest {
                volume_id: v.volume_id.clone(),
                staging_target_path: staging.display().to_string()
            })
            .await
    );
    delete(d, &v.volume_id).await
}

fn run(cmd: &str, args: &[&str]) -> Result<(), String> {
    let out = check!(Command::new(cmd).args(args).output());
    ensure!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

pub fn write_at(path: &Path, offset: u64, data: &[u8]) -> Result<(), String> {
    use std::os::unix::fs::FileExt;
    let f = check!(std::fs::OpenOptions::new().write(true).open(path));
    check!(f.write_all_at(data, offset));
    Ok(())
}

async fn non_blank(_ctx: &mut Ctx) -> CaseResult {
    let mut d = Driver::start("nonblank").await?;
    refused_untouched(&mut d, "has-ext4", &|p| {
        run("mkfs.ext4", &["-q", "-F", &p.display().to_string()])
    })
    .await?;
    refused_untouched(&mut d, "has-mbr", &|p| write_at(p, 510, &[0x55, 0xaa])).await?;
    refused_untouched(&mut d, "has-data-at-end", &|p| {
        let len = check!(std::fs::metadata(p)).len();
        write_at(p, len - 100, b"tail data")
    })
    .await?;
    refused_untouched(&mut d, "has-luks1", &|p| {
        run("sh", &["-c", &format!("printf 0123456789abcdef0123456789abcdef > /tmp/k1 && cryptsetup luksFormat -q --type luks1 --pbkdf-force-iterations 1000 --key-file /tmp/k1 {}", p.display())])
    }).await?;
    let path = |p: &Path| p.display().to_string();
    refused_untouched_sized(&mut d, "has-xfs", 320 * MIB, &|p| {
        run("mkfs.xfs", &["-q", "-f", &path(p)])
    })
    .await?;
    refused_untouched_sized(&mut d, "has-btrfs", 160 * MIB, &|p| {
        run("mkfs.btrfs", &["-q", "-f", &path(p)])
    })
    .await?;
    refused_untouched(&mut d, "has-swap", &|p| run("mkswap", &[&path(p)])).await?;
    refused_untouched(&mut d, "has-gpt", &|p| {
        run(
            "sh",
            &["-c", &format!("echo 'label: gpt' | sfdisk -q {}", path(p))],
        )
    })
    .await?;
    refused_untouched(&mut d, "has-random-data", &|p| {
        let mut noise = vec![0u8; 4 << 20];
        check!(getrandom_fill(&mut noise));
        write_at(p, 0, &noise)
    })
    .await?;
    Ok(())
}

pub fn getrandom_fill(buf: &mut [u8]) -> std::io::Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(buf)
}

async fn foreign_headers(_ctx: &mut Ctx) -> CaseResult {
    let mut d = Driver::start("foreign").await?;
    let fmt = |extra: &'static str| {
        move |p: &Path| {
            run(
                "sh",
                &[
                    "-c",
                    &format!(
                        "printf 0123456789abcdef0123456789abcdef > /tmp/k2 && cryptsetup luksFormat -q --type luks2 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 --sector-size 4096 {extra} --key-file /tmp/k2 {}",
                        p.display()
                    ),
                ],
            )
        }
    };
    refused_untouched(
        &mut d,
        "null-cipher",
        &fmt("--cipher cipher_null-ecb --key-size 0"),
    )
    .await?;
    refused_untouched(&mut d, "other-tool-luks2", &fmt("")).await?;
    refused_untouched(&mut d, "argon2id", &|p| {
        run("sh", &["-c", &format!(
            "printf 0123456789abcdef0123456789abcdef > /tmp/k3 && cryptsetup luksFormat -q --type luks2 --pbkdf argon2id --pbkdf-force-iterations 4 --pbkdf-memory 32 --key-file /tmp/k3 {}",
            p.display()
        )])
    }).await?;
    Ok(())
}

/// Our own volume with one keyslot more (added with stock cryptsetup and the
/// right key): the extra keyslot is not bound to our token, so stage refuses it.
async fn extra_keyslot(_ctx: &mut Ctx) -> CaseResult {
    let mut d = Driver::start("extra-keyslot").await?;
    let req = create_req(
        "pvc-extra",
        32 * MIB,
        mount_cap("ext4", Mode::SingleNodeWriter),
    );
    let s = provision(&mut d, req).await?;
    release(&mut d, &s).await?;
    let image = image_of(&d, &s.volume.volume_id);
    let kms = d.dir.join("data/kms");
    let master = check!(std::fs::read(kms.join("master.key")));
    let salt = check!(std::fs::read(kms.join("salt")));
    let header = check!(cryptdisk_csi::crypt::read_header(&image).await);
    let key = check!(cryptdisk_csi::kms::derive_scoped_key(
        &master,
        &salt,
        &s.volume.volume_id,
        header.key_id.as_str(),
        32
    ));
    let keyfile = d.dir.join("volume.key");
    check!(std::fs::write(&keyfile, key.expose()));
    check!(std::fs::write(
        d.dir.join("other.key"),
        b"another passphrase of 32 bytes!!"
    ));
    run(
        "cryptsetup",
        &[
            "luksAddKey",
            "-q",
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            "--key-file",
            &keyfile.display().to_string(),
            &image.display().to_string(),
            &d.dir.join("other.key").display().to_string(),
        ],
    )?;
    let before = sha256(&image)?;
    let r = d
        .node
        .node_stage_volume(NodeStageVolumeRequest {
            volume_id: s.volume.volume_id.clone(),
            publish_context: s.publish_context.clone(),
            staging_target_path: s.staging.display().to_string(),
            volume_capability: Some(s.cap.clone()),
            volume_context: s.volume.volume_context.clone(),
            ..Default::default()
        })
        .await;
    let status = r
        .err()
        .ok_or("stage accepted a header with an extra keyslot")?;
    ensure!(
        status.code() == Code::FailedPrecondition,
        "{:?} {}",
        status.code(),
        status.message()
    );
    ensure!(
        status.message().contains("keyslots"),
        "message: {}",
        status.message()
    );
    ensure!(sha256(&image)? == before, "the image changed");
    check!(
        d.node
            .node_unstage_volume(NodeUnstageVolumeRequest {
                volume_id: s.volume.volume_id.clone(),
                staging_target_path: s.staging.display().to_string(),
            })
            .await
    );
    Ok(())
}

/// SIGTERM while a stage is in flight: the stage still completes, then the
/// process exits cleanly and removes its socket.
async fn sigterm_lets_stage_finish(_ctx: &mut Ctx) -> CaseResult {
    let mut d = Driver::start("sigterm").await?;
    let req = create_req(
        "pvc-term",
        32 * MIB,
        mount_cap("ext4", Mode::SingleNodeWriter),
    );
    let cap = req.volume_capabilities[0].clone();
    let volume = check!(d.controller.create_volume(req).await)
        .into_inner()
        .volume
        .ok_or("no volume")?;
    // Published first, as a CO does: the embedded KMS serves only the keys
    // of volumes published to this node.
    let publish_context = check!(
        d.controller
            .controller_publish_volume(attach_req(&volume.volume_id, &cap))
            .await
    )
    .into_inner()
    .publish_context;
    let staging = d.dir.join("staging-term");
    let stage_req = NodeStageVolumeRequest {
        volume_id: volume.volume_id.clone(),
        publish_context,
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(cap),
        volume_context: volume.volume_context.clone(),
        ..Default::default()
    };
    let mut node = d.node.clone();
    let inflight = tokio::spawn(async move { node.node_stage_volume(stage_req).await });
    // Format + mkfs take seconds under emulation; signal well inside that.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let child = d.child.take().ok_or("no child")?;
    check!(nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    ));
    let result = check!(inflight.await);
    ensure!(
        result.is_ok(),
        "the in-flight stage failed: {:?}",
        result.err()
    );
    let out = check!(child.wait_with_output());
    ensure!(out.status.success(), "exit status {:?}", out.status);
    ensure!(!d.dir.join("csi.sock").exists(), "socket left behind");
    let log = d.log();
    let (term, mkfs) = (log.find("shutting down"), log.find("making filesystem"));
    ensure!(
        term.is_some() && mkfs.is_some() && term < mkfs,
        "SIGTERM did not arrive during the stage (shutdown at {term:?}, mkfs at {mkfs:?})"
    );
    ensure!(
        check!(cryptdisk_csi::mount::find_mount(&staging)).is_some(),
        "the stage did not finish"
    );
    // Clean up with a fresh driver.
    let dir = d.dir.clone();
    drop(d);
    let mut d = Driver::start_in(dir, None).await?;
    check!(
        d.node
            .node_unstage_volume(NodeUnstageVolumeRequest {
                volume_id: volume.volume_id.clone(),
                staging_target_path: staging.display().to_string(),
            })
            .await
    );
    check!(
        d.controller
            .controller_unpublish_volume(ControllerUnpublishVolumeRequest {
                volume_id: volume.volume_id.clone(),
                node_id: NODE.into(),
                ..Default::default()
            })
            .await
    );
    delete(&mut d, &volume.volume_id).await
}

async fn concurrent_stage(_ctx: &mut Ctx) -> CaseResult {
    let d = Driver::start("concurrent").await?;
    let cap = mount_cap("ext4", Mode::SingleNodeWriter);
    let mut c = d.controller.clone();
    let v = check!(
        c.create_volume(create_req("pvc-race", 32 * MIB, cap.clone()))
            .await
    )
    .into_inner()
    .volume
    .ok_or("no volume")?;
    // Published first, as a CO does: only then is its key served here.
    let publish_context = check!(
        c.controller_publish_volume(attach_req(&v.volume_id, &cap))
            .await
    )
    .into_inner()
    .publish_context;
    let staging = d.dir.join("staging-race");
    let req = NodeStageVolumeRequest {
        volume_id: v.volume_id.clone(),
        publish_context,
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(cap),
        volume_context: v.volume_context.clone(),
        ..Default::default()
    };
    let (mut n1, mut n2) = (d.node.clone(), d.node.clone());
    let (a, b) = tokio::join!(
        n1.node_stage_volume(req.clone()),
        n2.node_stage_volume(req.clone())
    );
    let codes = [code_of(a), code_of(b)];
    ensure!(codes.contains(&None), "neither stage succeeded: {codes:?}");
    ensure!(
        codes.contains(&Some(Code::Aborted)),
        "no ABORTED for the concurrent stage: {codes:?}"
    );
    // The retry the CO would make succeeds and finds the work done.
    check!(d.node.clone().node_stage_volume(req).await);
    check!(
        d.node
            .clone()
            .node_unstage_volume(NodeUnstageVolumeRequest {
                volume_id: v.volume_id.clone(),
                staging_target_path: staging.display().to_string()
            })
            .await
    );
    Ok(())
}

/// Reads back what `write_marker` wrote, through a fresh publish.
fn check_marker(s: &Staged, marker: &[u8]) -> CaseResult {
    let back = check!(std::fs::read(s.target.join("marker")));
    ensure!(back == marker, "marker did not read back");
    Ok(())
}

async fn crash_stage(_ctx: &mut Ctx) -> CaseResult {
    let points = [
        "stage:attached",
        "format:before-token",
        "stage:formatted",
        "stage:opened",
        "stage:mkfs-done",
        "stage:mounted",
    ];
    for point in points {
        let dir = fresh_dir(&format!("crash-{}", point.replace(':', "-")))?;
        let mut d = Driver::start_in(dir.clone(), Some(point)).await?;
        let req = create_req(
            "pvc-crash",
            32 * MIB,
            mount_cap("ext4", Mode::SingleNodeWriter),
        );
        let cap = req.volume_capabilities[0].clone();
        let (volume, ctx) = create_attached(&mut d.controller, req.clone()).await?;
        let staging = dir.join("staging");
        let crashed = stage(&mut d, &volume, &ctx, &staging, &cap).await;
        ensure!(crashed.is_err(), "{point}: stage did not crash");
        let log = d.log();
        ensure!(
            log.contains(&format!("failpoint {point}: aborting")),
            "{point}: not reached"
        );
        d.kill();
        // Restart without the failpoint: the retried stage finishes the work.
        let mut d = Driver::start_in(dir.clone(), None).await?;
        stage(&mut d, &volume, &ctx, &staging, &cap)
            .await
            .map_err(|e| format!("{point}: {e}"))?;
        let s = Staged {
            volume,
            publish_context: ctx,
            staging,
            target: dir.join("target"),
            cap,
        };
        publish(&mut d, &s, false).await?;
        let marker = format!("written after a crash at {point}").into_bytes();
        check!(std::fs::write(s.target.join("marker"), &marker));
        release(&mut d, &s).await?;
        let s = provision(&mut d, req)
            .await
            .map_err(|e| format!("{point}: restage: {e}"))?;
        check_marker(&s, &marker).map_err(|e| format!("{point}: {e}"))?;
        release(&mut d, &s).await?;
        delete(&mut d, &s.volume.volume_id).await?;
    }
    Ok(())
}

async fn crash_unstage(_ctx: &mut Ctx) -> CaseResult {
    for point in ["unstage:unmounted", "unstage:closed"] {
        let dir = fresh_dir(&format!("crash-{}", point.replace(':', "-")))?;
        let mut d = Driver::start_in(dir.clone(), None).await?;
        let req = create_req(
            "pvc-crash",
            32 * MIB,
            mount_cap("ext4", Mode::SingleNodeWriter),
        );
        let s = provision(&mut d, req.clone()).await?;
        let marker = format!("written before a crash at {point}").into_bytes();
        check!(std::fs::write(s.target.join("marker"), &marker));
        check!(
            d.node
                .node_unpublish_volume(NodeUnpublishVolumeRequest {
                    volume_id: s.volume.volume_id.clone(),
                    target_path: s.target.display().to_string(),
                })
                .await
        );
        d.kill();
        let mut d = Driver::start_in(dir.clone(), Some(point)).await?;
        let unstage = NodeUnstageVolumeRequest {
            volume_id: s.volume.volume_id.clone(),
            staging_target_path: s.staging.display().to_string(),
        };
        ensure!(
            d.node.node_unstage_volume(unstage.clone()).await.is_err(),
            "{point}: unstage did not crash"
        );
        let log = d.log();
        ensure!(
            log.contains(&format!("failpoint {point}: aborting")),
            "{point}: not reached"
        );
        d.kill();
        let mut d = Driver::start_in(dir.clone(), None).await?;
        check!(d.node.node_unstage_volume(unstage).await);
        let mapping = cryptdisk_csi::crypt::MapperName::for_volume(&s.volume.volume_id);
        ensure!(
            !open_mappings().contains(&mapping.as_str().to_string()),
            "{point}: mapping left"
        );
        let image = image_of(&d, &s.volume.volume_id);
        ensure!(
            cryptdisk_csi::mount::loopdev::find_by_backing_file(&image)
                .ok()
                .flatten()
                .is_none(),
            "{point}: loop device left"
        );
        let s = provision(&mut d, req).await?;
        check_marker(&s, &marker).map_err(|e| format!("{point}: {e}"))?;
        release(&mut d, &s).await?;
        delete(&mut d, &s.volume.volume_id).await?;
    }
    Ok(())
}

async fn clone_and_listings(_ctx: &mut Ctx) -> CaseResult {
    let mut d = Driver::start("clone").await?;
    let s = provision(
        &mut d,
        create_req(
            "pvc-src",
            32 * MIB,
            mount_cap("ext4", Mode::SingleNodeWriter),
        ),
    )
    .await?;
    check!(std::fs::write(s.target.join("marker"), b"cloned"));
    release(&mut d, &s).await?;
    let mut clone = create_req(
        "pvc-clone",
        32 * MIB,
        mount_cap("ext4", Mode::SingleNodeWriter),
    );
    clone.volume_content_source = Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Volume(
            volume_content_source::VolumeSource {
                volume_id: s.volume.volume_id.clone(),
            },
        )),
    });
    let c = provision(&mut d, clone).await?;
    check_marker(&c, b"cloned")?;
    let got = check!(
        d.controller
            .controller_get_volume(ControllerGetVolumeRequest {
                volume_id: c.volume.volume_id.clone()
            })
            .await
    )
    .into_inner();
    let published = got
        .status
        .map(|st| st.published_node_ids)
        .unwrap_or_default();
    ensure!(
        published == vec![NODE.to_string()],
        "published on {published:?}"
    );
    release(&mut d, &c).await?;

    // Listings page through with tokens.
    let page = check!(
        d.controller
            .list_volumes(ListVolumesRequest {
                max_entries: 1,
                ..Default::default()
            })
            .await
    )
    .into_inner();
    ensure!(
        page.entries.len() == 1 && !page.next_token.is_empty(),
        "first page {:?}",
        page.next_token
    );
    let rest = check!(
        d.controller
            .list_volumes(ListVolumesRequest {
                max_entries: 1,
                starting_token: page.next_token
            })
            .await
    )
    .into_inner();
    ensure!(
        rest.entries.len() == 1,
        "second page has {}",
        rest.entries.len()
    );
    let snap = check!(
        d.controller
            .create_snapshot(CreateSnapshotRequest {
                source_volume_id: s.volume.volume_id.clone(),
                name: "snap".into(),
                ..Default::default()
            })
            .await
    )
    .into_inner()
    .snapshot
    .ok_or("no snapshot")?;
    let again = check!(
        d.controller
            .create_snapshot(CreateSnapshotRequest {
                source_volume_id: s.volume.volume_id.clone(),
                name: "snap".into(),
                ..Default::default()
            })
            .await
    )
    .into_inner()
    .snapshot
    .ok_or("no snapshot")?;
    ensure!(
        again.snapshot_id == snap.snapshot_id,
        "snapshot not idempotent"
    );
    let listed = check!(
        d.controller
            .list_snapshots(ListSnapshotsRequest {
                source_volume_id: s.volume.volume_id.clone(),
                ..Default::default()
            })
            .await
    )
    .into_inner();
    ensure!(
        listed.entries.len() == 1,
        "snapshots of the source: {}",
        listed.entries.len()
    );
    let by_id = check!(
        d.controller
            .list_snapshots(ListSnapshotsRequest {
                snapshot_id: snap.snapshot_id.clone(),
                ..Default::default()
            })
            .await
    )
    .into_inner();
    ensure!(
        by_id.entries.len() == 1,
        "snapshot by id: {}",
        by_id.entries.len()
    );
    let cap = check!(
        d.controller
            .get_capacity(GetCapacityRequest::default())
            .await
    )
    .into_inner();
    ensure!(
        cap.available_capacity > 0,
        "capacity {}",
        cap.available_capacity
    );
    let ccaps = check!(
        d.controller
            .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
            .await
    )
    .into_inner();
    ensure!(
        ccaps.capabilities.len() >= 8,
        "controller capabilities {}",
        ccaps.capabilities.len()
    );
    let ncaps = check!(
        d.node
            .node_get_capabilities(NodeGetCapabilitiesRequest {})
            .await
    )
    .into_inner();
    ensure!(!ncaps.capabilities.is_empty(), "node capabilities");
    check!(
        d.controller
            .delete_snapshot(DeleteSnapshotRequest {
                snapshot_id: snap.snapshot_id,
                ..Default::default()
            })
            .await
    );
    delete(&mut d, &c.volume.volume_id).await?;
    delete(&mut d, &s.volume.volume_id).await?;
    Ok(())
}
