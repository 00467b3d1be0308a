//! Node behaviour that csi-sanity found wrong or that the conformance runs
//! depend on, each pinned by its own case: SINGLE_NODE_SINGLE_WRITER published
//! once and the resumable initial wipe of integrity volumes. Request fields
//! checked before the volume id are tested on the host (src/csi/node_tests.rs).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cryptdisk_csi::crypt;
use cryptdisk_csi::proto::csi::controller_client::ControllerClient;
use cryptdisk_csi::proto::csi::node_client::NodeClient;
use cryptdisk_csi::proto::csi::volume_capability::access_mode::Mode;
use cryptdisk_csi::proto::csi::*;
use cryptdisk_csi::proto::csi::{volume_capability, volume_content_source};
use tonic::Code;
use tonic::transport::Channel;

use crate::lifecycle_cases::{
    Driver, MIB, NODE, Staged, attach_req, block_cap, create_attached, create_req, delete,
    fresh_dir, mount_cap, open_mappings, provision, publish, release, stage,
};
use crate::{Case, CaseResult, Ctx, check, ensure, expect_code};

pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "node_single_writer_is_published_once",
            run: |c| Box::pin(single_writer(c)),
        },
        Case {
            name: "node_integrity_wipe_resumes_after_cancel_and_crash",
            run: |c| Box::pin(integrity_wipe(c)),
        },
        Case {
            name: "node_online_expansion_with_a_writer_ext4_xfs_block",
            run: |c| Box::pin(online_expansion(c)),
        },
        Case {
            name: "node_expansion_recovers_from_crashes_and_catches_up_at_stage",
            run: |c| Box::pin(expansion_crashes(c)),
        },
        Case {
            name: "node_key_rotation_survives_a_crash_at_every_step",
            run: |c| Box::pin(rotation_crashes(c)),
        },
        Case {
            name: "node_kms_down_or_slow_fails_the_stage_and_writes_nothing",
            run: |c| Box::pin(kms_down_and_slow(c)),
        },
        Case {
            name: "node_no_key_bytes_in_trace_logs",
            run: |c| Box::pin(no_key_in_logs(c)),
        },
        Case {
            name: "node_load_200_concurrent_rpcs_over_20_volumes",
            run: |c| Box::pin(load(c)),
        },
        Case {
            name: "node_bad_input_in_every_field_gets_a_clear_error",
            run: |c| Box::pin(bad_input(c)),
        },
        Case {
            name: "node_create_volume_converges_after_a_crash",
            run: |c| Box::pin(create_crashes(c)),
        },
        Case {
            name: "node_volume_health_sees_unmounts_and_closed_mappings",
            run: |c| Box::pin(volume_health(c)),
        },
        Case {
            name: "node_attach_limit_get_snapshot_and_layout_checks",
            run: |c| Box::pin(limits_and_snapshots(c)),
        },
        Case {
            name: "node_restage_checks_the_ext4_it_finds_and_repairs_its_error_state",
            run: |c| Box::pin(restage_checks(c)),
        },
        Case {
            name: "node_snapshot_restores_into_its_usable_size",
            run: |c| Box::pin(restore_size(c)),
        },
    ]
}

/// Create → ControllerPublish → NodeStage (until an integrity wipe is done) →
/// NodePublish.
async fn provision_wiped(d: &mut Driver, req: CreateVolumeRequest) -> Result<Staged, String> {
    let cap = req.volume_capabilities[0].clone();
    let volume = check!(d.controller.create_volume(req.clone()).await)
        .into_inner()
        .volume
        .ok_or("no volume")?;
    let publish_context = check!(
        d.controller
            .controller_publish_volume(attach_req(&volume.volume_id, &cap))
            .await
    )
    .into_inner()
    .publish_context;
    let base = d.dir.join("kubelet").join(&req.name);
    let staging = base.join("staging");
    check!(std::fs::create_dir_all(&staging));
    stage_until_wiped(d, &volume, &publish_context, &staging, &cap).await?;
    let s = Staged {
        volume,
        publish_context,
        staging,
        target: base.join("target"),
        cap,
    };
    publish(d, &s, false).await?;
    Ok(s)
}

/// The size of the block device published at `target`.
fn block_size(target: &Path) -> Result<u64, String> {
    use std::io::Seek;
    let mut f = check!(std::fs::File::open(target));
    Ok(check!(f.seek(std::io::SeekFrom::End(0))))
}

/// A snapshot's size is the usable size its source was given (the CO's
/// restoreSize), not the image with its LUKS2 header; a restore asking for
/// exactly that size succeeds, opens with the source's data, and its mapping
/// holds at least that many bytes. Plain, integrity, and a volume expanded
/// before its snapshot.
async fn restore_size(_ctx: &mut Ctx) -> CaseResult {
    let mut d = Driver::start("node-restore-size").await?;
    let marker = b"cryptdisk: restored at its usable size".repeat(100);
    for (tag, integrity, grow_to) in [
        ("plain", false, None),
        ("integrity", true, None),
        ("grown", false, Some(100 * MIB + 4096)),
    ] {
        let mut req = create_req(&format!("pvc-{tag}"), 40 * MIB, block_cap());
        if integrity {
            req.parameters
                .insert("cryptdisk.csi.io/integrity".into(), "true".into());
        }
        let s = provision_wiped(&mut d, req.clone()).await?;
        ensure!(
            s.volume.capacity_bytes == 40 * MIB,
            "{tag}: capacity {}",
            s.volume.capacity_bytes
        );
        let mut capacity = s.volume.capacity_bytes;
        if let Some(to) = grow_to {
            grow(&mut d, &s, to).await?;
            capacity = check!(
                d.controller
                    .controller_expand_volume(ControllerExpandVolumeRequest {
                        volume_id: s.volume.volume_id.clone(),
                        capacity_range: Some(CapacityRange {
                            required_bytes: to,
                            limit_bytes: 0,
                        }),
                        volume_capability: Some(s.cap.clone()),
                        ..Default::default()
                    })
                    .await
            )
            .into_inner()
            .capacity_bytes;
        }
        ensure!(
            block_size(&s.target)? >= capacity as u64,
            "{tag}: the source's mapping is smaller than {capacity}"
        );
        {
            let mut f = check!(std::fs::OpenOptions::new().write(true).open(&s.target));
            check!(f.write_all(&marker));
            check!(f.sync_all());
        }
        release(&mut d, &s).await?;

        let snap = check!(
            d.controller
                .create_snapshot(CreateSnapshotRequest {
                    source_volume_id: s.volume.volume_id.clone(),
                    name: format!("snap-{tag}"),
                    ..Default::default()
                })
                .await
        )
        .into_inner()
        .snapshot
        .ok_or("no snapshot")?;
        ensure!(
            snap.size_bytes == capacity,
            "{tag}: snapshot size {} is not the volume's capacity {capacity}",
            snap.size_bytes
        );
        let mut restore = create_req(&format!("pvc-{tag}-restored"), snap.size_bytes, block_cap());
        restore.parameters = req.parameters.clone();
        restore.volume_content_source = Some(VolumeContentSource {
            r#type: Some(volume_content_source::Type::Snapshot(
                volume_content_source::SnapshotSource {
                    snapshot_id: snap.snapshot_id.clone(),
                },
            )),
        });
        let r = provision_wiped(&mut d, restore).await?;
        ensure!(
            r.volume.capacity_bytes >= capacity,
            "{tag}: restored capacity {}",
            r.volume.capacity_bytes
        );
        let size = block_size(&r.target)?;
        ensure!(
            size >= capacity as u64,
            "{tag}: the restored mapping holds {size} bytes, less than {capacity}"
        );
        let mut back = vec![0u8; marker.len()];
        check!(check!(std::fs::File::open(&r.target)).read_exact(&mut back));
        ensure!(back == marker, "{tag}: the restored volume lacks the data");
        release(&mut d, &r).await?;
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
    }
    Ok(())
}

/// A SINGLE_NODE_SINGLE_WRITER volume is published at one target at a time;
/// the same target again is idempotent, another one is FAILED_PRECONDITION.
async fn single_writer(_ctx: &mut Ctx) -> CaseResult {
    let mut d = Driver::start("node-single-writer").await?;
    let req = create_req(
        "pvc-single",
        32 * MIB,
        mount_cap("ext4", Mode::SingleNodeSingleWriter),
    );
    let s = provision(&mut d, req).await?;
    let other = Staged {
        volume: s.volume.clone(),
        publish_context: s.publish_context.clone(),
        staging: s.staging.clone(),
        target: d.dir.join("other-target"),
        cap: s.cap.clone(),
    };
    let second = d
        .node
        .node_publish_volume(NodePublishVolumeRequest {
            volume_id: other.volume.volume_id.clone(),
            publish_context: other.publish_context.clone(),
            staging_target_path: other.staging.display().to_string(),
            target_path: other.target.display().to_string(),
            volume_capability: Some(other.cap.clone()),
            volume_context: other.volume.volume_context.clone(),
            ..Default::default()
        })
        .await;
    ensure!(
        second
            .as_ref()
            .is_err_and(|s| s.code() == Code::FailedPrecondition
                && s.message().contains("SINGLE_NODE_SINGLE_WRITER")),
        "second target: {second:?}"
    );
    ensure!(
        !cryptdisk_csi::mount::is_mount_point(&other.target).unwrap_or(true),
        "the refused target was mounted"
    );
    publish(&mut d, &s, false).await?;
    // Once unpublished from the first target, the other one may take it.
    check!(
        d.node
            .node_unpublish_volume(NodeUnpublishVolumeRequest {
                volume_id: s.volume.volume_id.clone(),
                target_path: s.target.display().to_string(),
            })
            .await
    );
    publish(&mut d, &other, false).await?;
    release(&mut d, &other).await?;
    delete(&mut d, &s.volume.volume_id).await
}

pub fn integrity_req(name: &str) -> CreateVolumeRequest {
    let mut req = create_req(name, 128 * MIB, mount_cap("ext4", Mode::SingleNodeWriter));
    req.parameters
        .insert("cryptdisk.csi.io/integrity".into(), "true".into());
    req
}

async fn wipe_offset(image: &Path) -> Result<Option<u64>, String> {
    let header = check!(crypt::read_header(image).await);
    Ok(header.token.ok_or("no token")?.wipe_offset)
}

pub async fn stage_status(
    d: &mut Driver,
    volume: &Volume,
    ctx: &std::collections::HashMap<String, String>,
    staging: &Path,
    cap: &VolumeCapability,
) -> Result<(), tonic::Status> {
    d.node
        .node_stage_volume(NodeStageVolumeRequest {
            volume_id: volume.volume_id.clone(),
            publish_context: ctx.clone(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(cap.clone()),
            volume_context: volume.volume_context.clone(),
            ..Default::default()
        })
        .await
        .map(|_| ())
}

fn is_wipe_in_progress(r: &Result<(), tonic::Status>) -> bool {
    r.as_ref().is_err_and(|s| {
        s.code() == Code::Aborted
            && s.message().contains("integrity wipe in progress")
            && s.message().contains("% of ")
    })
}

/// Stages until the wipe is done: each refusal must be ABORTED with progress.
pub async fn stage_until_wiped(
    d: &mut Driver,
    volume: &Volume,
    ctx: &std::collections::HashMap<String, String>,
    staging: &Path,
    cap: &VolumeCapability,
) -> Result<usize, String> {
    for tries in 1..=120 {
        let r = stage_status(d, volume, ctx, staging, cap).await;
        if r.is_ok() {
            return Ok(tries);
        }
        ensure!(is_wipe_in_progress(&r), "stage {tries}: {r:?}");
    }
    Err("the wipe never finished".into())
}

/// The initial wipe of an integrity volume (189 MiB mapped, paced at 32 MiB/s,
/// checkpoints every 64 MiB) outlasts the stage budget (1 s): the stage answers
/// ABORTED and the wipe goes on. Unstage cancels it at a checkpoint;
/// a crash at a checkpoint keeps the offset in the token; the next stage resumes
/// from there, finishes, and every sector of the mapping then reads back.
async fn integrity_wipe(_ctx: &mut Ctx) -> CaseResult {
    let dir = fresh_dir("node-wipe")?;
    let budget = ["--wipe-budget-seconds=1"];
    let pace = [("CRYPTDISK_TEST_WIPE_MIB_PER_S", "32")];
    let mut d = Driver::start_with(dir.clone(), None, &budget, &pace).await?;
    let req = integrity_req("pvc-wipe");
    let cap = req.volume_capabilities[0].clone();
    let (volume, ctx) = create_attached(&mut d.controller, req).await?;
    let image = crate::lifecycle_cases::image_of(&d, &volume.volume_id);
    let staging = dir.join("staging");

    // 1. The budget runs out: ABORTED, then unstage stops the wipe.
    let first = stage_status(&mut d, &volume, &ctx, &staging, &cap).await;
    ensure!(is_wipe_in_progress(&first), "first stage: {first:?}");
    check!(
        d.node
            .node_unstage_volume(NodeUnstageVolumeRequest {
                volume_id: volume.volume_id.clone(),
                staging_target_path: staging.display().to_string(),
            })
            .await
    );
    ensure!(
        open_mappings().is_empty(),
        "mappings left: {:?}",
        open_mappings()
    );
    ensure!(
        d.log().contains("integrity wipe stopped for unstage"),
        "no cancel in the log"
    );
    let after_cancel = wipe_offset(&image).await?;
    ensure!(
        after_cancel.is_some(),
        "the wipe mark is gone after a cancel"
    );
    d.kill();

    // 2. A crash at the first checkpoint: the token keeps how far it got.
    let mut d = Driver::start_with(dir.clone(), Some("wipe:checkpoint"), &budget, &pace).await?;
    let _ = stage_status(&mut d, &volume, &ctx, &staging, &cap).await;
    d.wait_exit(Duration::from_secs(120)).await?;
    ensure!(
        d.log().contains("failpoint wipe:checkpoint: aborting"),
        "failpoint not reached"
    );
    let at = wipe_offset(&image)
        .await?
        .ok_or("no wipe mark after the crash")?;
    ensure!(
        at > after_cancel.unwrap_or(0),
        "the crash recorded {at}, not past {after_cancel:?}"
    );
    d.kill();

    // 3. Restarted, the stage resumes from the checkpoint and completes; the
    //    metrics show the running wipe, then the open mapping.
    let metrics = free_port()?;
    let metrics_flag = format!("--metrics-address={metrics}");
    let mut d = Driver::start_with(
        dir.clone(),
        None,
        &[budget[0], metrics_flag.as_str()],
        &pace,
    )
    .await?;
    let running = stage_status(&mut d, &volume, &ctx, &staging, &cap).await;
    ensure!(is_wipe_in_progress(&running), "resumed stage: {running:?}");
    let mapping = crypt::MapperName::for_volume(&volume.volume_id).to_string();
    let scraped = scrape(metrics)?;
    ensure!(
        scraped.contains(&format!(
            "cryptdisk_wipe_bytes_done{{mapping=\"{mapping}\"}}"
        )),
        "no wipe progress in\n{scraped}"
    );
    let tries = 1 + stage_until_wiped(&mut d, &volume, &ctx, &staging, &cap).await?;
    ensure!(
        tries > 1,
        "a wipe of 128 MiB finished within the 1 s budget"
    );
    ensure!(
        d.log().contains(&format!("from={at}")),
        "the wipe did not resume from {at}"
    );
    ensure!(
        wipe_offset(&image).await?.is_none(),
        "wipe mark left after the wipe"
    );
    // Every sector now carries a valid tag: the whole mapping reads.
    let mapped = crypt::MapperName::for_volume(&volume.volume_id).device_path();
    let mut f = check!(std::fs::File::open(&mapped));
    let mut buf = vec![0u8; 4 << 20];
    let mut total = 0u64;
    loop {
        let n = check!(f.read(&mut buf));
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    drop(f);
    ensure!(total >= 128 * MIB as u64, "read only {total} bytes");

    let s = Staged {
        volume: volume.clone(),
        publish_context: ctx,
        staging,
        target: dir.join("target"),
        cap,
    };
    publish(&mut d, &s, false).await?;
    check!(std::fs::write(s.target.join("marker"), b"after the wipe"));
    release(&mut d, &s).await?;
    // A restage finds no wipe to do and the data intact.
    let before = d.log().len();
    let s = provision(&mut d, integrity_req("pvc-wipe")).await?;
    ensure!(
        check!(std::fs::read(s.target.join("marker"))) == b"after the wipe",
        "marker lost"
    );
    ensure!(
        !d.log()[before..].contains("integrity wipe starting"),
        "a second wipe started"
    );
    release(&mut d, &s).await?;
    delete(&mut d, &s.volume.volume_id).await
}

/// Appends numbered 4 KiB records to `file` until told to stop, syncing as it
/// goes; returns how many it wrote.
fn start_writer(
    file: PathBuf,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Result<u64, String>> {
    std::thread::spawn(move || {
        let mut f = check!(std::fs::File::create(&file));
        let mut n = 0u64;
        // At most 8 MiB, well inside the smallest volume.
        while !stop.load(Ordering::Relaxed) && n < 2048 {
            let mut record = vec![(n % 251) as u8; 4096];
            record[..8].copy_from_slice(&n.to_le_bytes());
            check!(f.write_all(&record));
            if n.is_multiple_of(16) {
                check!(f.sync_data());
            }
            n += 1;
            std::thread::sleep(Duration::from_millis(2));
        }
        check!(f.sync_all());
        Ok(n)
    })
}

pub fn verify_records(file: &Path, count: u64) -> CaseResult {
    let data = check!(std::fs::read(file));
    ensure!(
        data.len() as u64 == count * 4096,
        "{} bytes for {count} records",
        data.len()
    );
    for (i, record) in data.chunks(4096).enumerate() {
        let n = u64::from_le_bytes(record[..8].try_into().unwrap());
        ensure!(n == i as u64, "record {i} holds {n}");
        ensure!(
            record[8..].iter().all(|&b| b == (n % 251) as u8),
            "record {i} corrupted"
        );
    }
    Ok(())
}

pub async fn stats(d: &mut Driver, s: &Staged) -> Result<Vec<VolumeUsage>, String> {
    Ok(check!(
        d.node
            .node_get_volume_stats(NodeGetVolumeStatsRequest {
                volume_id: s.volume.volume_id.clone(),
                volume_path: s.target.display().to_string(),
                staging_target_path: s.staging.display().to_string(),
            })
            .await
    )
    .into_inner()
    .usage)
}

pub fn total_bytes(usage: &[VolumeUsage]) -> i64 {
    usage
        .iter()
        .find(|u| u.unit == volume_usage::Unit::Bytes as i32)
        .map_or(-1, |u| u.total)
}

/// ControllerExpandVolume then NodeExpandVolume, each twice (idempotent).
pub async fn grow(d: &mut Driver, s: &Staged, bytes: i64) -> Result<i64, String> {
    let range = CapacityRange {
        required_bytes: bytes,
        limit_bytes: 0,
    };
    for _ in 0..2 {
        let r = check!(
            d.controller
                .controller_expand_volume(ControllerExpandVolumeRequest {
                    volume_id: s.volume.volume_id.clone(),
                    capacity_range: Some(range),
                    volume_capability: Some(s.cap.clone()),
                    ..Default::default()
                })
                .await
        )
        .into_inner();
        ensure!(
            r.capacity_bytes >= bytes,
            "controller gave {}",
            r.capacity_bytes
        );
        ensure!(r.node_expansion_required, "no node expansion asked for");
    }
    let mut size = 0;
    for _ in 0..2 {
        size = check!(
            d.node
                .node_expand_volume(NodeExpandVolumeRequest {
                    volume_id: s.volume.volume_id.clone(),
                    volume_path: s.target.display().to_string(),
                    capacity_range: Some(range),
                    staging_target_path: s.staging.display().to_string(),
                    volume_capability: Some(s.cap.clone()),
                    ..Default::default()
                })
                .await
        )
        .into_inner()
        .capacity_bytes;
        ensure!(size >= bytes, "node gave {size}, asked {bytes}");
    }
    // The volume key that the activation and the resize put into a worker
    // thread's keyring is not left there: every thread keyring is empty.
    let keys = check!(std::fs::read_to_string("/proc/keys"));
    ensure!(
        keys.lines()
            .filter(|l| l.contains(" keyring ") && l.contains("_tid:"))
            .all(|l| l.trim_end().ends_with("_tid: empty")),
        "a thread keyring still holds a key after the expansion:\n{keys}"
    );
    Ok(size)
}

/// ext4 and xfs grown online while a writer appends and syncs, its records all
/// intact afterwards and the filesystem's size (NodeGetVolumeStats, statvfs)
/// grown; a block volume's mapping grown; the data kept across a restage.
async fn online_expansion(_ctx: &mut Ctx) -> CaseResult {
    let mut d = Driver::start("node-expand").await?;
    for (fs, from, to) in [("ext4", 64 * MIB, 160 * MIB), ("xfs", 300 * MIB, 420 * MIB)] {
        let req = create_req(
            &format!("pvc-grow-{fs}"),
            from,
            mount_cap(fs, Mode::SingleNodeWriter),
        );
        let s = provision(&mut d, req.clone()).await?;
        let before = total_bytes(&stats(&mut d, &s).await?);
        ensure!(before > 0 && before <= from, "{fs}: {before} bytes before");
        let usage = stats(&mut d, &s).await?;
        ensure!(
            usage
                .iter()
                .any(|u| u.unit == volume_usage::Unit::Inodes as i32 && u.total > 0),
            "{fs}: no inode figures in {usage:?}"
        );
        let stop = Arc::new(AtomicBool::new(false));
        let records = s.target.join("records");
        let writer = start_writer(records.clone(), stop.clone());
        tokio::time::sleep(Duration::from_millis(300)).await;
        let grown = grow(&mut d, &s, to).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.store(true, Ordering::Relaxed);
        let written = writer.join().map_err(|_| "writer panicked")??;
        grown?;
        ensure!(written > 0, "{fs}: the writer wrote nothing");
        verify_records(&records, written)?;
        let after = total_bytes(&stats(&mut d, &s).await?);
        ensure!(
            after > before + (to - from) / 2,
            "{fs}: {before} bytes before, {after} after growing to {to}"
        );
        release(&mut d, &s).await?;
        let s = provision(&mut d, req).await?;
        verify_records(&s.target.join("records"), written)?;
        release(&mut d, &s).await?;
        delete(&mut d, &s.volume.volume_id).await?;
    }

    let req = create_req("pvc-grow-block", 32 * MIB, block_cap());
    let s = provision(&mut d, req).await?;
    ensure!(
        total_bytes(&stats(&mut d, &s).await?) >= 32 * MIB,
        "block stats"
    );
    let size = grow(&mut d, &s, 80 * MIB).await?;
    let seen = total_bytes(&stats(&mut d, &s).await?);
    ensure!(
        seen == size && seen >= 80 * MIB,
        "block: NodeExpandVolume said {size}, stats say {seen}"
    );
    release(&mut d, &s).await?;
    delete(&mut d, &s.volume.volume_id).await
}

/// With --max-volumes=1 a second attach to the node is RESOURCE_EXHAUSTED until
/// the first is detached; GetSnapshot finds snapshots; integrity volumes refuse
/// expansion; a clone must keep its source's integrity setting.
async fn limits_and_snapshots(_ctx: &mut Ctx) -> CaseResult {
    let dir = fresh_dir("node-limits")?;
    let mut d = Driver::start_with(dir, None, &["--max-volumes=1"], &[]).await?;
    let cap = mount_cap("ext4", Mode::SingleNodeWriter);
    let mut ids = Vec::new();
    for name in ["pvc-a", "pvc-b"] {
        let v = check!(
            d.controller
                .create_volume(create_req(name, 16 * MIB, cap.clone()))
                .await
        )
        .into_inner()
        .volume
        .ok_or("no volume")?;
        ids.push(v.volume_id);
    }
    let attach = |id: &str| attach_req(id, &cap);
    check!(
        d.controller
            .controller_publish_volume(attach(&ids[0]))
            .await
    );
    check!(
        d.controller
            .controller_publish_volume(attach(&ids[0]))
            .await
    );
    expect_code!(
        d.controller.controller_publish_volume(attach(&ids[1])),
        Code::ResourceExhausted,
        "second attach past the limit"
    );
    check!(
        d.controller
            .controller_unpublish_volume(ControllerUnpublishVolumeRequest {
                volume_id: ids[0].clone(),
                node_id: NODE.into(),
                ..Default::default()
            })
            .await
    );
    check!(
        d.controller
            .controller_publish_volume(attach(&ids[1]))
            .await
    );

    // GetSnapshot.
    let snap = check!(
        d.controller
            .create_snapshot(CreateSnapshotRequest {
                source_volume_id: ids[0].clone(),
                name: "snap-a".into(),
                ..Default::default()
            })
            .await
    )
    .into_inner()
    .snapshot
    .ok_or("no snapshot")?;
    let got = check!(
        d.controller
            .get_snapshot(GetSnapshotRequest {
                snapshot_id: snap.snapshot_id.clone(),
                ..Default::default()
            })
            .await
    )
    .into_inner()
    .snapshot
    .ok_or("no snapshot")?;
    ensure!(
        got.snapshot_id == snap.snapshot_id && got.source_volume_id == ids[0] && got.ready_to_use,
        "GetSnapshot gave {got:?}"
    );

    // Integrity volumes keep their size.
    let integrity = check!(d.controller.create_volume(integrity_req("pvc-int")).await)
        .into_inner()
        .volume
        .ok_or("no volume")?;
    let refused = d
        .controller
        .controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: integrity.volume_id.clone(),
            capacity_range: Some(CapacityRange {
                required_bytes: 256 * MIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await;
    ensure!(
        refused.as_ref().is_err_and(
            |s| s.code() == Code::FailedPrecondition && s.message().contains("integrity")
        ),
        "integrity expansion: {refused:?}"
    );
    // ControllerGetVolume reports the options the volume was made with.
    let vol = check!(
        d.controller
            .controller_get_volume(ControllerGetVolumeRequest {
                volume_id: integrity.volume_id.clone(),
            })
            .await
    )
    .into_inner()
    .volume
    .ok_or("no volume")?;
    ensure!(
        vol.volume_context
            .get("cryptdisk.csi.io/integrity")
            .map(String::as_str)
            == Some("true"),
        "volume context {:?}",
        vol.volume_context
    );

    check!(
        d.controller
            .delete_snapshot(DeleteSnapshotRequest {
                snapshot_id: snap.snapshot_id,
                ..Default::default()
            })
            .await
    );
    check!(
        d.controller
            .controller_unpublish_volume(ControllerUnpublishVolumeRequest {
                volume_id: ids[1].clone(),
                node_id: NODE.into(),
                ..Default::default()
            })
            .await
    );
    for id in ids.iter().chain([&integrity.volume_id]) {
        delete(&mut d, id).await?;
    }
    Ok(())
}

async fn health_reasons(
    d: &mut Driver,
    s: &Staged,
    with_paths: bool,
) -> Result<Vec<(i32, String)>, String> {
    let (publish, staging) = if with_paths {
        (
            s.target.display().to_string(),
            s.staging.display().to_string(),
        )
    } else {
        (String::new(), String::new())
    };
    let health = check!(
        d.node
            .node_get_volume_health(NodeGetVolumeHealthRequest {
                volume_id: s.volume.volume_id.clone(),
                volume_publish_path: publish,
                staging_target_path: staging,
            })
            .await
    )
    .into_inner()
    .volume_health
    .ok_or("no health")?;
    ensure!(
        health.volume_id == s.volume.volume_id,
        "health of {}",
        health.volume_id
    );
    Ok(health
        .health_statuses
        .into_iter()
        .map(|e| (e.status, e.reason))
        .collect())
}

/// A healthy published volume reports no issue; an unmount or a closed mapping
/// behind the driver's back is INACCESSIBLE with its reason.
async fn volume_health(_ctx: &mut Ctx) -> CaseResult {
    let mut d = Driver::start("node-health").await?;
    let req = create_req(
        "pvc-health",
        32 * MIB,
        mount_cap("ext4", Mode::SingleNodeWriter),
    );
    let s = provision(&mut d, req).await?;
    let healthy = health_reasons(&mut d, &s, true).await?;
    ensure!(healthy.is_empty(), "healthy volume reports {healthy:?}");
    let inaccessible = VolumeHealthErrorType::Inaccessible as i32;

    check!(nix::mount::umount(&s.target));
    let r = health_reasons(&mut d, &s, true).await?;
    ensure!(
        r == vec![(inaccessible, "NotMounted".to_string())],
        "after unmounting the target: {r:?}"
    );
    check!(nix::mount::umount(&s.staging));
    let status = check!(
        std::process::Command::new("cryptsetup")
            .args([
                "close",
                &crypt::MapperName::for_volume(&s.volume.volume_id).to_string()
            ])
            .status()
    );
    ensure!(status.success(), "cryptsetup close: {status}");
    let r = health_reasons(&mut d, &s, false).await?;
    ensure!(
        r == vec![(inaccessible, "MappingClosed".to_string())],
        "after closing the mapping: {r:?}"
    );
    // The driver cleans up what is left.
    release(&mut d, &s).await?;
    delete(&mut d, &s.volume.volume_id).await
}

/// A stage that finds an ext4 filesystem already there (a restage, or one after a
/// crash) runs `e2fsck -p` before mounting it, as kubelet's FormatAndMount does;
/// the stage that has just made it skips the check. The kernel mounts a
/// filesystem marked as having errors and keeps the mark, so the mark is gone
/// only if the check ran.
async fn restage_checks(_ctx: &mut Ctx) -> CaseResult {
    let mut d = Driver::start("node-fsck").await?;
    let req = create_req(
        "pvc-fsck",
        32 * MIB,
        mount_cap("ext4", Mode::SingleNodeWriter),
    );
    let s = provision(&mut d, req).await?;
    let mapped = crypt::MapperName::for_volume(&s.volume.volume_id).device_path();
    check!(std::fs::write(
        s.target.join("kept"),
        b"kept across the check"
    ));
    check!(nix::mount::umount(&s.target));
    check!(nix::mount::umount(&s.staging));
    let tool = |cmd: &str, args: &[&str]| -> Result<String, String> {
        let out = check!(std::process::Command::new(cmd).args(args).output());
        ensure!(
            out.status.success(),
            "{cmd} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let state = |dump: &str| {
        dump.lines()
            .find(|l| l.starts_with("Filesystem state:"))
            .map(|l| l.trim_start_matches("Filesystem state:").trim().to_string())
            .unwrap_or_default()
    };
    let device = mapped.display().to_string();
    // Marks the filesystem as having errors, as the kernel does when it finds one.
    tool("tune2fs", &["-E", "force_fsck", &device])?;
    let before = state(&tool("dumpe2fs", &["-h", &device])?);
    ensure!(before == "clean with errors", "after tune2fs: {before:?}");

    stage(&mut d, &s.volume, &s.publish_context, &s.staging, &s.cap).await?;
    let after = state(&tool("dumpe2fs", &["-h", &device])?);
    ensure!(after == "clean", "after the restage: {after:?}");
    let kept = check!(std::fs::read(s.staging.join("kept")));
    ensure!(kept == b"kept across the check", "the file changed");
    release(&mut d, &s).await?;
    delete(&mut d, &s.volume.volume_id).await
}

/// The driver killed after each NodeExpandVolume step: the retried call finishes
/// the growth with the data intact. A volume grown while unstaged has its
/// filesystem grown at the next stage, without NodeExpandVolume.
async fn expansion_crashes(_ctx: &mut Ctx) -> CaseResult {
    for point in ["expand:device-grown", "expand:mapping-grown"] {
        let dir = fresh_dir(&format!("node-{}", point.replace(':', "-")))?;
        let mut d = Driver::start_with(dir.clone(), Some(point), &[], &[]).await?;
        let req = create_req(
            "pvc-crash-grow",
            48 * MIB,
            mount_cap("ext4", Mode::SingleNodeWriter),
        );
        let s = provision(&mut d, req).await?;
        check!(std::fs::write(s.target.join("marker"), point.as_bytes()));
        let before = total_bytes(&stats(&mut d, &s).await?);
        let crashed = grow(&mut d, &s, 96 * MIB).await;
        ensure!(crashed.is_err(), "{point}: the expansion did not crash");
        d.wait_exit(Duration::from_secs(30)).await?;
        ensure!(
            d.log().contains(&format!("failpoint {point}: aborting")),
            "{point}: not reached"
        );
        d.kill();
        let mut d = Driver::start_with(dir, None, &[], &[]).await?;
        grow(&mut d, &s, 96 * MIB)
            .await
            .map_err(|e| format!("{point}: retry: {e}"))?;
        let after = total_bytes(&stats(&mut d, &s).await?);
        ensure!(
            after > before + 40 * MIB,
            "{point}: {before} -> {after} bytes"
        );
        ensure!(
            check!(std::fs::read(s.target.join("marker"))) == point.as_bytes(),
            "{point}: marker lost"
        );
        release(&mut d, &s).await?;
        delete(&mut d, &s.volume.volume_id).await?;
    }

    // Grown while unstaged: only the controller is asked; the stage catches up.
    let mut d = Driver::start("node-offline-grow").await?;
    let req = create_req(
        "pvc-offline",
        48 * MIB,
        mount_cap("ext4", Mode::SingleNodeWriter),
    );
    let s = provision(&mut d, req.clone()).await?;
    let before = total_bytes(&stats(&mut d, &s).await?);
    release(&mut d, &s).await?;
    check!(
        d.controller
            .controller_expand_volume(ControllerExpandVolumeRequest {
                volume_id: s.volume.volume_id.clone(),
                capacity_range: Some(CapacityRange {
                    required_bytes: 112 * MIB,
                    limit_bytes: 0,
                }),
                ..Default::default()
            })
            .await
    );
    let s = provision(&mut d, req).await?;
    let after = total_bytes(&stats(&mut d, &s).await?);
    ensure!(
        after > before + 56 * MIB,
        "offline growth: {before} -> {after} bytes"
    );
    ensure!(
        d.log().contains("the volume grew while unstaged"),
        "no catch-up growth in the log"
    );
    release(&mut d, &s).await?;
    delete(&mut d, &s.volume.volume_id).await
}

fn free_port() -> Result<std::net::SocketAddr, String> {
    let probe = check!(std::net::TcpListener::bind("127.0.0.1:0"));
    Ok(check!(probe.local_addr()))
}

/// GET /metrics over plain HTTP/1.0.
fn scrape(addr: std::net::SocketAddr) -> Result<String, String> {
    let mut stream = check!(std::net::TcpStream::connect(addr));
    check!(write!(stream, "GET /metrics HTTP/1.0\r\n\r\n"));
    let mut reply = String::new();
    check!(stream.read_to_string(&mut reply));
    ensure!(
        reply.starts_with("HTTP/1.0 200"),
        "metrics answered {reply:.80}"
    );
    Ok(reply)
}

/// The key of `id` from master-secret `version` of a `dev` driver's files, as
/// `derivation` (v2: within `scope`, the volume id of a volume made empty).
pub fn dev_key(
    dir: &Path,
    scope: &str,
    id: &str,
    version: u32,
    derivation: cryptdisk_csi::kms::Derivation,
) -> Result<cryptdisk_csi::kms::DataKey, String> {
    let kms = dir.join("data/kms");
    let secret = match version {
        1 => kms.join("master.key"),
        n => kms.join(format!("master.key-v{n}")),
    };
    let master = check!(std::fs::read(&secret));
    let salt = check!(std::fs::read(kms.join("salt")));
    Ok(match derivation {
        cryptdisk_csi::kms::Derivation::V1 => {
            check!(cryptdisk_csi::kms::derive_data_key(&master, &salt, id, 32))
        }
        cryptdisk_csi::kms::Derivation::V2 => check!(cryptdisk_csi::kms::derive_scoped_key(
            &master, &salt, scope, id, 32
        )),
    })
}

/// A volume made under master-secret version 1; then version 2 is added with the
/// admin command and the driver killed at each step of the rotation its next
/// stage does. The header stays valid and opens with the key of the version its
/// token names throughout; the restarted driver's stage finishes the rotation,
/// the data intact, one keyslot left, and the version-1 key no longer opens it.
async fn rotation_crashes(_ctx: &mut Ctx) -> CaseResult {
    let bin = env!("CARGO_BIN_EXE_cryptdisk-csi");
    for point in [
        "rotate:intent",
        "rotate:added",
        "rotate:switched",
        "rotate:destroyed",
    ] {
        let dir = fresh_dir(&format!("node-{}", point.replace(':', "-")))?;
        let mut d = Driver::start_in(dir.clone(), None).await?;
        let req = create_req(
            "pvc-rotate",
            32 * MIB,
            mount_cap("ext4", Mode::SingleNodeWriter),
        );
        let s = provision(&mut d, req.clone()).await?;
        check!(std::fs::write(s.target.join("marker"), point.as_bytes()));
        release(&mut d, &s).await?;
        let image = crate::lifecycle_cases::image_of(&d, &s.volume.volume_id);
        drop(d);
        let key_id = check!(crypt::read_header(&image).await).key_id;

        let out = check!(
            std::process::Command::new(bin)
                .arg("add-key-version")
                .arg(format!(
                    "--master-secret-file={}",
                    dir.join("data/kms/master.key").display()
                ))
                .output()
        );
        let said = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success() && said.contains("version 2"),
            "add-key-version: {said} {}",
            String::from_utf8_lossy(&out.stderr)
        );

        let mut d = Driver::start_in(dir.clone(), Some(point)).await?;
        check!(
            d.controller
                .controller_publish_volume(attach_req(&s.volume.volume_id, &s.cap))
                .await
        );
        let staged = stage_status(&mut d, &s.volume, &s.publish_context, &s.staging, &s.cap).await;
        ensure!(staged.is_err(), "{point}: the stage did not crash");
        d.wait_exit(Duration::from_secs(30)).await?;
        ensure!(
            d.log().contains(&format!("failpoint {point}: aborting")),
            "{point}: not reached"
        );
        d.kill();
        // Between steps: a valid header that opens with its token's key.
        let header = check!(crypt::read_header(&image).await);
        let token = header.token.ok_or("no token")?;
        check!(cryptdisk_csi::crypt::header::read_validated(&image));
        let key = dev_key(
            &dir,
            &s.volume.volume_id,
            key_id.as_str(),
            token.key_version,
            token.derivation(),
        )?;
        check!(crypt::verify_key(&image, &key).await);

        let mut d = Driver::start_in(dir.clone(), None).await?;
        let s = provision(&mut d, req)
            .await
            .map_err(|e| format!("{point}: restage: {e}"))?;
        ensure!(
            check!(std::fs::read(s.target.join("marker"))) == point.as_bytes(),
            "{point}: marker lost"
        );
        release(&mut d, &s).await?;
        let token = check!(crypt::read_header(&image).await)
            .token
            .ok_or("no token")?;
        ensure!(
            token.key_version == 2 && token.rotation.is_none(),
            "{point}: token after the rotation: {token:?}"
        );
        let json = check!(cryptdisk_csi::crypt::header::read_validated(&image));
        let slots = json["keyslots"].as_object().map_or(0, |o| o.len());
        ensure!(slots == 1, "{point}: {slots} keyslots left");
        let v2 = cryptdisk_csi::kms::Derivation::V2;
        let scope = &s.volume.volume_id;
        check!(crypt::verify_key(&image, &dev_key(&dir, scope, key_id.as_str(), 2, v2)?).await);
        ensure!(
            crypt::verify_key(&image, &dev_key(&dir, scope, key_id.as_str(), 1, v2)?)
                .await
                .is_err(),
            "{point}: the version-1 key still opens the volume"
        );
        delete(&mut d, &s.volume.volume_id).await?;
    }
    Ok(())
}

/// A KMS that answers too late: every call outlives the node's deadline.
struct SlowKms;

#[tonic::async_trait]
impl cryptdisk_csi::proto::kms::api_server::Api for SlowKms {
    async fn get_versioned_data_key(
        &self,
        _request: tonic::Request<cryptdisk_csi::proto::kms::GetVersionedDataKeyRequest>,
    ) -> Result<
        tonic::Response<cryptdisk_csi::proto::kms::GetVersionedDataKeyResponse>,
        tonic::Status,
    > {
        tokio::time::sleep(Duration::from_secs(30)).await;
        Err(tonic::Status::internal("too late"))
    }

    async fn get_volume_key(
        &self,
        _request: tonic::Request<cryptdisk_csi::proto::kms::GetVolumeKeyRequest>,
    ) -> Result<tonic::Response<cryptdisk_csi::proto::kms::GetVolumeKeyResponse>, tonic::Status>
    {
        tokio::time::sleep(Duration::from_secs(30)).await;
        Err(tonic::Status::internal("too late"))
    }
}

/// A driver process a case started, with the file its stderr goes to.
pub struct Process(std::process::Child, PathBuf);

impl Drop for Process {
    fn drop(&mut self) {
        // A process that ended before the case stopped it died on its own
        // (a crash, a panic, a signal): its log is about to go with the case's
        // directory, so its last lines go to the tier's output.
        if let Ok(Some(status)) = self.0.try_wait() {
            let log = std::fs::read_to_string(&self.1).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!(
                "    {} ended on its own ({status}); its last log lines:",
                self.1.display()
            );
            for line in tail.iter().rev() {
                eprintln!("      {line}");
            }
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn spawn(dir: &Path, log: &str, args: &[String]) -> Result<Process, String> {
    let path = dir.join(log);
    let log = check!(std::fs::File::create(&path));
    Ok(Process(
        check!(
            std::process::Command::new(env!("CARGO_BIN_EXE_cryptdisk-csi"))
                .args(args)
                .stdout(std::process::Stdio::null())
                .stderr(log)
                .spawn()
        ),
        path,
    ))
}

pub async fn wait_socket(path: &Path) -> CaseResult {
    for _ in 0..200 {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!("{} never accepted", path.display()))
}

/// Writes a 32-byte master secret and salt (mode 0600) into `dir`, each filled
/// with `seed`-derived bytes, for a KMS process.
pub fn write_secrets(dir: &Path, seed: u8) -> Result<(PathBuf, PathBuf), String> {
    use std::os::unix::fs::PermissionsExt;
    let (secret, salt) = (dir.join("master.key"), dir.join("salt"));
    for (path, byte) in [(&secret, seed), (&salt, seed.wrapping_add(1))] {
        check!(std::fs::write(path, [byte; 32]));
        check!(std::fs::set_permissions(
            path,
            std::fs::Permissions::from_mode(0o600)
        ));
    }
    Ok((secret, salt))
}

/// A `cryptdisk-csi kms` process on the unix socket `socket` (plaintext, as a
/// unix socket allows), serving from the secret files, logging to `kms.log` in
/// `dir`; returns once it accepts. It authorizes as on one machine: the volumes
/// the local backend in `dir/data` (a [`Split`]'s) has published to its node.
pub async fn spawn_kms(
    dir: &Path,
    socket: &Path,
    secret: &Path,
    salt: &Path,
) -> Result<Process, String> {
    let local = [
        "--authorizer=local".to_string(),
        format!("--local-state={}", dir.join("data").display()),
    ];
    spawn_kms_with(dir, socket, secret, salt, &local).await
}

/// As [`spawn_kms`], with `authorizer` as the KMS's authorizer flags.
pub async fn spawn_kms_with(
    dir: &Path,
    socket: &Path,
    secret: &Path,
    salt: &Path,
    authorizer: &[String],
) -> Result<Process, String> {
    let mut args = vec![
        "kms".into(),
        format!("--listen=unix://{}", socket.display()),
        "--insecure".into(),
        format!("--master-secret-file={}", secret.display()),
        format!("--salt-file={}", salt.display()),
    ];
    args.extend(authorizer.iter().cloned());
    let kms = spawn(dir, "kms.log", &args)?;
    wait_socket(socket).await?;
    Ok(kms)
}

/// Separate controller and node processes of the real binary on unix sockets in
/// `dir` (local backend in `dir/data`), the node asking the KMS at
/// `dir/kms.sock`, which the caller starts (or not), with clients of both.
pub struct Split {
    pub kms_sock: PathBuf,
    pub controller: ControllerClient<Channel>,
    pub node: NodeClient<Channel>,
    _processes: [Process; 2],
}

impl Split {
    pub async fn start(dir: &Path) -> Result<Split, String> {
        let data = dir.join("data");
        let kms_sock = dir.join("kms.sock");
        let (ctl_sock, node_sock) = (dir.join("controller.sock"), dir.join("node.sock"));
        let controller = spawn(
            dir,
            "controller.log",
            &[
                "controller".into(),
                format!("--endpoint=unix://{}", ctl_sock.display()),
                format!("--data-dir={}", data.display()),
                format!("--local-node={NODE}"),
            ],
        )?;
        let node = spawn(
            dir,
            "node.log",
            &[
                "node".into(),
                format!("--endpoint=unix://{}", node_sock.display()),
                format!("--kms=unix://{}", kms_sock.display()),
                format!("--local-data-dir={}", data.display()),
                format!("--node-id={NODE}"),
            ],
        )?;
        wait_socket(&ctl_sock).await?;
        wait_socket(&node_sock).await?;
        let timeout = Duration::from_secs(5);
        let (ctl_ep, node_ep) = (
            cryptdisk_csi::config::Endpoint::Unix(ctl_sock),
            cryptdisk_csi::config::Endpoint::Unix(node_sock),
        );
        Ok(Split {
            controller: ControllerClient::new(check!(
                cryptdisk_csi::client::connect(&ctl_ep, timeout).await
            )),
            node: NodeClient::new(check!(
                cryptdisk_csi::client::connect(&node_ep, timeout).await
            )),
            kms_sock,
            _processes: [controller, node],
        })
    }
}

/// Unpublishes a volume from [`NODE`] and deletes it.
pub async fn unpublish_and_delete(
    controller: &mut ControllerClient<Channel>,
    volume_id: String,
) -> CaseResult {
    check!(
        controller
            .controller_unpublish_volume(ControllerUnpublishVolumeRequest {
                volume_id: volume_id.clone(),
                node_id: NODE.into(),
                ..Default::default()
            })
            .await
    );
    check!(
        controller
            .delete_volume(DeleteVolumeRequest {
                volume_id,
                ..Default::default()
            })
            .await
    );
    Ok(())
}

/// Separate controller, node and KMS processes. With no KMS, and then with a KMS
/// slower than the node's deadline, a stage of a blank volume fails UNAVAILABLE
/// after its retries and the disk stays blank; with the KMS up, it completes.
async fn kms_down_and_slow(_ctx: &mut Ctx) -> CaseResult {
    let dir = fresh_dir("node-kms-down")?;
    let mut split = Split::start(&dir).await?;
    let kms_sock = split.kms_sock.clone();
    let (controller, node) = (&mut split.controller, &mut split.node);
    let cap = mount_cap("ext4", Mode::SingleNodeWriter);
    let (volume, publish_context) =
        create_attached(controller, create_req("pvc-kms", 32 * MIB, cap.clone())).await?;
    let image = dir.join("data/disks").join(format!(
        "{}.img",
        volume.volume_id.rsplit(':').next().unwrap_or_default()
    ));
    let stage_req = NodeStageVolumeRequest {
        volume_id: volume.volume_id.clone(),
        publish_context,
        staging_target_path: dir.join("staging").display().to_string(),
        volume_capability: Some(cap),
        volume_context: volume.volume_context.clone(),
        ..Default::default()
    };

    // 1. No KMS at all.
    let down = node.node_stage_volume(stage_req.clone()).await;
    ensure!(
        down.as_ref().is_err_and(
            |s| s.code() == Code::Unavailable && s.message().contains("after 3 attempt(s)")
        ),
        "KMS down: {down:?}"
    );
    check!(crypt::probe_blank(&image));

    // 2. A KMS slower than the deadline.
    let listener = check!(tokio::net::UnixListener::bind(&kms_sock));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let slow = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(cryptdisk_csi::proto::kms::api_server::ApiServer::new(
                SlowKms,
            ))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::UnixListenerStream::new(listener),
                async {
                    let _ = stopped.await;
                },
            ),
    );
    let started = std::time::Instant::now();
    let late = node.node_stage_volume(stage_req.clone()).await;
    let took = started.elapsed();
    // The slow KMS goes away as a process would: its connections close.
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(40), slow).await;
    let _ = std::fs::remove_file(&kms_sock);
    ensure!(
        late.as_ref().is_err_and(
            |s| s.code() == Code::Unavailable && s.message().contains("DeadlineExceeded")
        ),
        "KMS slow: {late:?}"
    );
    ensure!(took >= Duration::from_secs(10), "gave up after {took:?}");
    check!(crypt::probe_blank(&image));

    // 3. The KMS is up: the same stage completes.
    let (secret, salt) = write_secrets(&dir, 7)?;
    let _kms = spawn_kms(&dir, &kms_sock, &secret, &salt).await?;
    check!(node.node_stage_volume(stage_req.clone()).await);
    ensure!(
        crypt::probe_blank(&image).is_err(),
        "the volume was not formatted"
    );
    check!(
        node.node_unstage_volume(NodeUnstageVolumeRequest {
            volume_id: volume.volume_id.clone(),
            staging_target_path: stage_req.staging_target_path.clone(),
        })
        .await
    );
    unpublish_and_delete(controller, volume.volume_id).await
}

/// Every form a key could take in a log: raw bytes, hex (both cases), base64 and
/// base64url at each of the three alignments inside a longer blob, and Rust's
/// `Debug` of a byte slice.
fn key_forms(key: &[u8]) -> Vec<Vec<u8>> {
    use base64::Engine;
    let mut forms = vec![
        key.to_vec(),
        hex::encode(key).into_bytes(),
        hex::encode_upper(key).into_bytes(),
        format!("{:?}", &key[..12])
            .trim_matches(['[', ']'])
            .as_bytes()
            .to_vec(),
    ];
    for engine in [
        base64::engine::general_purpose::STANDARD,
        base64::engine::general_purpose::URL_SAFE,
    ] {
        for offset in 0..3 {
            let mut padded = vec![0u8; offset];
            padded.extend_from_slice(key);
            let text = engine.encode(&padded);
            // Drop the characters that mix in the padding bytes and the tail.
            let skip = (offset * 4).div_ceil(3);
            forms.push(text.as_bytes()[skip..text.len() - 4].to_vec());
        }
    }
    forms
}

/// The whole lifecycle at trace level (format, stage, restage with the key from
/// the KMS, a rotation to a new master-secret version, unstage, delete): the
/// driver's output never holds either version's key in any form.
async fn no_key_in_logs(_ctx: &mut Ctx) -> CaseResult {
    let dir = fresh_dir("node-secrets")?;
    let trace = ["--log-level=trace"];
    let mut d = Driver::start_with(dir.clone(), None, &trace, &[]).await?;
    let req = create_req(
        "pvc-secret",
        32 * MIB,
        mount_cap("ext4", Mode::SingleNodeWriter),
    );
    let s = provision(&mut d, req.clone()).await?;
    check!(std::fs::write(s.target.join("f"), b"data"));
    release(&mut d, &s).await?;
    let image = crate::lifecycle_cases::image_of(&d, &s.volume.volume_id);
    let key_id = check!(crypt::read_header(&image).await).key_id;
    drop(d);
    let out = check!(
        std::process::Command::new(env!("CARGO_BIN_EXE_cryptdisk-csi"))
            .arg("add-key-version")
            .arg(format!(
                "--master-secret-file={}",
                dir.join("data/kms/master.key").display()
            ))
            .output()
    );
    ensure!(out.status.success(), "add-key-version failed");
    let mut d = Driver::start_with(dir.clone(), None, &trace, &[]).await?;
    let s = provision(&mut d, req).await?;
    release(&mut d, &s).await?;
    delete(&mut d, &s.volume.volume_id).await?;
    let log = check!(std::fs::read(dir.join("driver.log")));
    ensure!(
        log.len() > 100_000,
        "only {} bytes of trace output",
        log.len()
    );
    ensure!(
        String::from_utf8_lossy(&log).contains("rotating the volume's keyslot"),
        "no rotation happened"
    );
    for version in [1, 2] {
        let key = dev_key(
            &dir,
            &s.volume.volume_id,
            key_id.as_str(),
            version,
            cryptdisk_csi::kms::Derivation::V2,
        )?;
        for form in key_forms(key.expose()) {
            ensure!(
                memchr::memmem::find(&log, &form).is_none(),
                "version {version}'s key is in the log as {:?}",
                String::from_utf8_lossy(&form)
            );
        }
    }
    Ok(())
}

/// Loop devices whose backing file lies under `dir`.
fn loops_under(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_to_string(e.path().join("loop/backing_file")).ok())
        .map(|f| f.trim().to_string())
        .filter(|f| f.starts_with(&dir.display().to_string()))
        .collect()
}

/// 200 RPCs at once (stage, publish, unpublish, unstage, stats, health,
/// ControllerGetVolume, ListVolumes) over 20 volumes, 10 per volume: each call
/// succeeds or gets a code that says why (ABORTED for a call on a volume that is
/// busy, FAILED_PRECONDITION or NOT_FOUND for one that comes in the wrong
/// order); nothing panics (the driver answers afterwards), and a plain cleanup
/// leaves no mapping, mount or loop device behind.
async fn load(_ctx: &mut Ctx) -> CaseResult {
    let mut d = Driver::start("node-load").await?;
    let cap = mount_cap("ext4", Mode::SingleNodeWriter);
    let mut volumes = Vec::new();
    for i in 0..20 {
        let req = create_req(&format!("pvc-load-{i}"), 16 * MIB, cap.clone());
        volumes.push(create_attached(&mut d.controller, req).await?);
    }
    let base = d.dir.clone();
    let staging = |i: usize| base.join(format!("load/{i}/staging"));
    let target = |i: usize, k: usize| base.join(format!("load/{i}/target-{}", k % 2));
    let mut calls = Vec::new();
    for k in 0..200 {
        let i = k % 20;
        let (volume, ctx) = volumes[i].clone();
        let (mut node, mut controller) = (d.node.clone(), d.controller.clone());
        let (staging, target, cap) = (staging(i), target(i, k), cap.clone());
        calls.push(tokio::spawn(async move {
            let id = volume.volume_id.clone();
            let r: Result<(), tonic::Status> = match (k / 20) % 8 {
                0 | 4 => node
                    .node_stage_volume(NodeStageVolumeRequest {
                        volume_id: id,
                        publish_context: ctx,
                        staging_target_path: staging.display().to_string(),
                        volume_capability: Some(cap),
                        volume_context: volume.volume_context,
                        ..Default::default()
                    })
                    .await
                    .map(|_| ()),
                1 | 5 => node
                    .node_publish_volume(NodePublishVolumeRequest {
                        volume_id: id,
                        publish_context: ctx,
                        staging_target_path: staging.display().to_string(),
                        target_path: target.display().to_string(),
                        volume_capability: Some(cap),
                        volume_context: volume.volume_context,
                        ..Default::default()
                    })
                    .await
                    .map(|_| ()),
                2 => node
                    .node_get_volume_stats(NodeGetVolumeStatsRequest {
                        volume_id: id,
                        volume_path: target.display().to_string(),
                        staging_target_path: String::new(),
                    })
                    .await
                    .map(|_| ()),
                3 => node
                    .node_get_volume_health(NodeGetVolumeHealthRequest {
                        volume_id: id,
                        ..Default::default()
                    })
                    .await
                    .map(|_| ()),
                6 => node
                    .node_unpublish_volume(NodeUnpublishVolumeRequest {
                        volume_id: id,
                        target_path: target.display().to_string(),
                    })
                    .await
                    .map(|_| ()),
                _ => {
                    if k % 2 == 0 {
                        controller
                            .controller_get_volume(ControllerGetVolumeRequest { volume_id: id })
                            .await
                            .map(|_| ())
                    } else {
                        controller
                            .list_volumes(ListVolumesRequest::default())
                            .await
                            .map(|_| ())
                    }
                }
            };
            (k, r)
        }));
    }
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for call in calls {
        let (k, r) = check!(call.await);
        let code = r.as_ref().map_or_else(|s| s.code(), |_| Code::Ok);
        ensure!(
            matches!(
                code,
                Code::Ok | Code::Aborted | Code::FailedPrecondition | Code::NotFound
            ),
            "call {k}: {r:?}"
        );
        *counts.entry(format!("{code:?}")).or_default() += 1;
    }
    // The 40 reads (controller, health) never wait on a volume's guard.
    ensure!(
        counts.get("Ok").is_some_and(|&n| n >= 40),
        "outcomes {counts:?}"
    );
    eprintln!("    load outcomes: {counts:?}");
    // Whatever the storm left, a retried stage and publish converge for every
    // volume, and its filesystem is there.
    for (i, (volume, ctx)) in volumes.iter().enumerate() {
        let s = Staged {
            volume: volume.clone(),
            publish_context: ctx.clone(),
            staging: staging(i),
            target: target(i, 0),
            cap: cap.clone(),
        };
        check!(
            d.node
                .node_stage_volume(NodeStageVolumeRequest {
                    volume_id: volume.volume_id.clone(),
                    publish_context: ctx.clone(),
                    staging_target_path: s.staging.display().to_string(),
                    volume_capability: Some(cap.clone()),
                    volume_context: volume.volume_context.clone(),
                    ..Default::default()
                })
                .await
        );
        publish(&mut d, &s, false).await?;
        check!(std::fs::write(s.target.join("after-load"), b"ok"));
    }
    // The driver still answers, and a plain cleanup converges.
    check!(
        d.controller
            .list_volumes(ListVolumesRequest::default())
            .await
    );
    for (i, (volume, _)) in volumes.iter().enumerate() {
        for k in 0..2 {
            check!(
                d.node
                    .node_unpublish_volume(NodeUnpublishVolumeRequest {
                        volume_id: volume.volume_id.clone(),
                        target_path: target(i, k).display().to_string(),
                    })
                    .await
            );
        }
        check!(
            d.node
                .node_unstage_volume(NodeUnstageVolumeRequest {
                    volume_id: volume.volume_id.clone(),
                    staging_target_path: staging(i).display().to_string(),
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
        delete(&mut d, &volume.volume_id).await?;
    }
    ensure!(
        open_mappings().is_empty(),
        "mappings left: {:?}",
        open_mappings()
    );
    let loops = loops_under(&d.dir);
    ensure!(loops.is_empty(), "loop devices left: {loops:?}");
    let mounts = check!(std::fs::read_to_string("/proc/self/mountinfo"));
    let dir = d.dir.display().to_string();
    ensure!(!mounts.contains(&dir), "mounts left under {dir}");
    Ok(())
}

/// Values every string field is tried with.
fn bad_strings(base: &Path) -> Vec<String> {
    vec![
        String::new(),
        "x".repeat(70_000),
        "../../../../etc/passwd".into(),
        format!("{}/../escape", base.display()),
        "a\0b".into(),
        "relative/path".into(),
        "local:vm-node:../../disk".into(),
        "\u{202e}\u{feff}".into(),
    ]
}

/// Every string and number field of every RPC tried with empty, huge,
/// path-traversal, NUL and other wrong values against a live driver: each call
/// fails with a code that names the mistake (INVALID_ARGUMENT, or NOT_FOUND /
/// OUT_OF_RANGE where CSI asks for them), never INTERNAL, UNKNOWN or a dropped
/// connection; the driver answers afterwards, and nothing appears outside its
/// directories.
async fn bad_input(_ctx: &mut Ctx) -> CaseResult {
    let mut d = Driver::start("node-bad-input").await?;
    let base = d.dir.clone();
    let cap = mount_cap("ext4", Mode::SingleNodeWriter);
    let (volume, ctx) = create_attached(
        &mut d.controller,
        create_req("pvc-good", 16 * MIB, cap.clone()),
    )
    .await?;
    let id = volume.volume_id.clone();
    let staging = base.join("staging").display().to_string();
    let target = base.join("target").display().to_string();
    // Formatted once first: the loop's ControllerUnpublish with an empty node
    // id detaches it everywhere, which ends its first attachment, and a blank
    // disk past its first attachment is (rightly) never formatted.
    check!(
        d.node
            .node_stage_volume(NodeStageVolumeRequest {
                volume_id: id.clone(),
                publish_context: ctx.clone(),
                staging_target_path: staging.clone(),
                volume_capability: Some(cap.clone()),
                volume_context: volume.volume_context.clone(),
                ..Default::default()
            })
            .await
    );
    check!(
        d.node
            .node_unstage_volume(NodeUnstageVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: staging.clone(),
            })
            .await
    );
    let mut tried = 0usize;
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    let ok_codes = [
        Code::InvalidArgument,
        Code::NotFound,
        Code::OutOfRange,
        Code::AlreadyExists,
        // A size no disk can have: CSI says RESOURCE_EXHAUSTED.
        Code::ResourceExhausted,
    ];
    let mut check_code = |what: String, r: Result<(), tonic::Status>| -> CaseResult {
        tried += 1;
        match r {
            Ok(()) => Err(format!("{what}: accepted")),
            Err(s) if ok_codes.contains(&s.code()) => {
                *seen.entry(format!("{:?}", s.code())).or_default() += 1;
                Ok(())
            }
            Err(s) => Err(format!("{what}: {:?} {}", s.code(), s.message())),
        }
    };
    for bad in bad_strings(&base) {
        let short: String = bad.chars().take(30).collect();
        let mut c = d.controller.clone();
        let mut n = d.node.clone();
        let bad_cap = |fs: &str, flags: Vec<String>| VolumeCapability {
            access_type: Some(volume_capability::AccessType::Mount(
                volume_capability::MountVolume {
                    fs_type: fs.into(),
                    mount_flags: flags,
                    volume_mount_group: String::new(),
                },
            )),
            access_mode: cap.access_mode,
        };
        // Controller.
        let mut create = create_req(&bad, 16 * MIB, cap.clone());
        check_code(
            format!("CreateVolume name {short:?}"),
            c.create_volume(create.clone()).await.map(|_| ()),
        )?;
        create.name = "pvc-bad-param".into();
        create.parameters.insert(bad.clone(), "true".into());
        check_code(
            format!("CreateVolume parameter key {short:?}"),
            c.create_volume(create.clone()).await.map(|_| ()),
        )?;
        create.parameters.clear();
        create
            .parameters
            .insert("cryptdisk.csi.io/integrity".into(), bad.clone());
        check_code(
            format!("CreateVolume parameter value {short:?}"),
            c.create_volume(create.clone()).await.map(|_| ()),
        )?;
        create.parameters.clear();
        // An empty fs_type means the default (CSI); every other value here is bad.
        let fs_bad = if bad.is_empty() {
            "ext5".to_string()
        } else {
            bad.clone()
        };
        create.volume_capabilities = vec![bad_cap(&fs_bad, vec![])];
        check_code(
            format!("CreateVolume fs_type {short:?}"),
            c.create_volume(create.clone()).await.map(|_| ()),
        )?;
        create.volume_capabilities = vec![cap.clone()];
        create.volume_content_source = Some(VolumeContentSource {
            r#type: Some(volume_content_source::Type::Snapshot(
                volume_content_source::SnapshotSource {
                    snapshot_id: bad.clone(),
                },
            )),
        });
        check_code(
            format!("CreateVolume source snapshot {short:?}"),
            c.create_volume(create.clone()).await.map(|_| ()),
        )?;
        for (what, r) in [
            (
                "ControllerPublish volume_id",
                c.controller_publish_volume(attach_req(&bad, &cap))
                    .await
                    .map(|_| ()),
            ),
            (
                "ControllerPublish node_id",
                c.controller_publish_volume(ControllerPublishVolumeRequest {
                    node_id: bad.clone(),
                    ..attach_req(&id, &cap)
                })
                .await
                .map(|_| ()),
            ),
            (
                "ControllerUnpublish node_id",
                c.controller_unpublish_volume(ControllerUnpublishVolumeRequest {
                    volume_id: id.clone(),
                    node_id: bad.clone(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
            ),
            (
                "ValidateVolumeCapabilities",
                c.validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
                    volume_id: bad.clone(),
                    volume_capabilities: vec![cap.clone()],
                    ..Default::default()
                })
                .await
                .map(|_| ()),
            ),
            (
                "ListVolumes token",
                c.list_volumes(ListVolumesRequest {
                    starting_token: bad.clone(),
                    max_entries: 1,
                })
                .await
                .map(|_| ()),
            ),
            (
                "CreateSnapshot source",
                c.create_snapshot(CreateSnapshotRequest {
                    source_volume_id: bad.clone(),
                    name: "snap-bad".into(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
            ),
            (
                "CreateSnapshot name",
                c.create_snapshot(CreateSnapshotRequest {
                    source_volume_id: id.clone(),
                    name: bad.clone(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
            ),
            (
                "GetSnapshot",
                c.get_snapshot(GetSnapshotRequest {
                    snapshot_id: bad.clone(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
            ),
            (
                "ControllerExpandVolume",
                c.controller_expand_volume(ControllerExpandVolumeRequest {
                    volume_id: bad.clone(),
                    capacity_range: Some(CapacityRange {
                        required_bytes: 32 * MIB,
                        limit_bytes: 0,
                    }),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
            ),
            (
                "ControllerGetVolume",
                c.controller_get_volume(ControllerGetVolumeRequest {
                    volume_id: bad.clone(),
                })
                .await
                .map(|_| ()),
            ),
        ] {
            // CSI makes these optional: empty means all nodes, the first page.
            let optional = ["ControllerUnpublish node_id", "ListVolumes token"];
            if bad.is_empty() && optional.contains(&what) {
                check!(r);
                continue;
            }
            // CSI: a starting token the plugin did not hand out is ABORTED.
            if what == "ListVolumes token" {
                ensure!(
                    r.as_ref().is_err_and(|s| s.code() == Code::Aborted),
                    "{what} {short:?}: {r:?}"
                );
                continue;
            }
            check_code(format!("{what} {short:?}"), r)?;
        }
        // Node. The ControllerUnpublish probe above (an empty node id detaches
        // from every node) ended the attachment, and a volume not published
        // to this node gets no key: published again, so the node's probes
        // below reach the field they test and not the key check.
        check!(
            c.controller_publish_volume(attach_req(&id, &cap))
                .await
                .map(|_| ())
        );
        let stage = NodeStageVolumeRequest {
            volume_id: id.clone(),
            publish_context: ctx.clone(),
            staging_target_path: staging.clone(),
            volume_capability: Some(cap.clone()),
            volume_context: volume.volume_context.clone(),
            ..Default::default()
        };
        let mut bad_ctx = volume.volume_context.clone();
        bad_ctx.insert("cryptdisk.csi.io/allowDiscards".into(), bad.clone());
        let mut bad_publish_ctx = ctx.clone();
        bad_publish_ctx.insert("localImagePath".into(), bad.clone());
        let publish_req = NodePublishVolumeRequest {
            volume_id: id.clone(),
            publish_context: ctx.clone(),
            staging_target_path: staging.clone(),
            target_path: target.clone(),
            volume_capability: Some(cap.clone()),
            volume_context: volume.volume_context.clone(),
            ..Default::default()
        };
        for (what, r) in [
            (
                "NodeStage volume_id",
                n.node_stage_volume(NodeStageVolumeRequest {
                    volume_id: bad.clone(),
                    ..stage.clone()
                })
                .await
                .map(|_| ()),
            ),
            (
                "NodeStage staging path",
                n.node_stage_volume(NodeStageVolumeRequest {
                    staging_target_path: bad.clone(),
                    ..stage.clone()
                })
                .await
                .map(|_| ()),
            ),
            (
                "NodeStage fs_type",
                n.node_stage_volume(NodeStageVolumeRequest {
                    volume_capability: Some(bad_cap(&fs_bad, vec![])),
                    ..stage.clone()
                })
                .await
                .map(|_| ()),
            ),
            (
                "NodeStage mount flag",
                n.node_stage_volume(NodeStageVolumeRequest {
                    volume_capability: Some(bad_cap("ext4", vec![bad.clone()])),
                    ..stage.clone()
                })
                .await
                .map(|_| ()),
            ),
            (
                "NodeStage volume_context",
                n.node_stage_volume(NodeStageVolumeRequest {
                    volume_context: bad_ctx.clone(),
                    ..stage.clone()
                })
                .await
                .map(|_| ()),
            ),
            (
                "NodeStage publish_context",
                n.node_stage_volume(NodeStageVolumeRequest {
                    publish_context: bad_publish_ctx.clone(),
                    ..stage.clone()
                })
                .await
                .map(|_| ()),
            ),
            (
                "NodeUnstage staging path",
                n.node_unstage_volume(NodeUnstageVolumeRequest {
                    volume_id: id.clone(),
                    staging_target_path: bad.clone(),
                })
                .await
                .map(|_| ()),
            ),
            (
                "NodePublish target",
                n.node_publish_volume(NodePublishVolumeRequest {
                    target_path: bad.clone(),
                    ..publish_req.clone()
                })
                .await
                .map(|_| ()),
            ),
            (
                "NodePublish staging",
                n.node_publish_volume(NodePublishVolumeRequest {
                    staging_target_path: bad.clone(),
                    ..publish_req.clone()
                })
                .await
                .map(|_| ()),
            ),
            (
                "NodePublish volume_id",
                n.node_publish_volume(NodePublishVolumeRequest {
                    volume_id: bad.clone(),
                    ..publish_req.clone()
                })
                .await
                .map(|_| ()),
            ),
            (
                "NodeUnpublish target",
                n.node_unpublish_volume(NodeUnpublishVolumeRequest {
                    volume_id: id.clone(),
                    target_path: bad.clone(),
                })
                .await
                .map(|_| ()),
            ),
            (
                "NodeGetVolumeStats path",
                n.node_get_volume_stats(NodeGetVolumeStatsRequest {
                    volume_id: id.clone(),
                    volume_path: bad.clone(),
                    staging_target_path: String::new(),
                })
                .await
                .map(|_| ()),
            ),
            (
                "NodeExpandVolume path",
                n.node_expand_volume(NodeExpandVolumeRequest {
                    volume_id: id.clone(),
                    volume_path: bad.clone(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
            ),
            (
                "NodeGetVolumeHealth volume_id",
                n.node_get_volume_health(NodeGetVolumeHealthRequest {
                    volume_id: bad.clone(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
            ),
        ] {
            check_code(format!("{what} {short:?}"), r)?;
        }
    }
    // Numbers out of range.
    let mut c = d.controller.clone();
    for (required, limit) in [(-1, 0), (0, -1), (i64::MAX, 0), (64 * MIB, MIB)] {
        let mut create = create_req("pvc-range", 16 * MIB, cap.clone());
        create.capacity_range = Some(CapacityRange {
            required_bytes: required,
            limit_bytes: limit,
        });
        check_code(
            format!("CreateVolume range {required}/{limit}"),
            c.create_volume(create).await.map(|_| ()),
        )?;
        check_code(
            format!("ControllerExpandVolume range {required}/{limit}"),
            c.controller_expand_volume(ControllerExpandVolumeRequest {
                volume_id: id.clone(),
                capacity_range: Some(CapacityRange {
                    required_bytes: required,
                    limit_bytes: limit,
                }),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        )?;
    }
    check_code(
        "ListVolumes max_entries -1".into(),
        c.list_volumes(ListVolumesRequest {
            max_entries: -1,
            ..Default::default()
        })
        .await
        .map(|_| ()),
    )?;
    check_code(
        "ListSnapshots max_entries -1".into(),
        c.list_snapshots(ListSnapshotsRequest {
            max_entries: -1,
            ..Default::default()
        })
        .await
        .map(|_| ()),
    )?;
    eprintln!("    {tried} bad requests: {seen:?}");
    // Alive, and nothing escaped its directories.
    check!(
        d.controller
            .list_volumes(ListVolumesRequest::default())
            .await
    );
    let escaped = base.parent().unwrap_or(&base).join("escape");
    ensure!(!escaped.exists(), "{} was created", escaped.display());
    // A stage refused at its mount step leaves its mapping open for a retry;
    // unstage takes it down like any other.
    check!(
        d.node
            .node_unstage_volume(NodeUnstageVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: staging.clone(),
            })
            .await
    );
    ensure!(
        open_mappings().is_empty(),
        "mappings left: {:?}",
        open_mappings()
    );
    check!(
        d.controller
            .controller_unpublish_volume(ControllerUnpublishVolumeRequest {
                volume_id: id.clone(),
                node_id: NODE.into(),
                ..Default::default()
            })
            .await
    );
    delete(&mut d, &id).await
}

/// The driver killed inside CreateVolume, after the image is built and after the
/// index records it: the retried CreateVolume returns one volume, which stages
/// and keeps data, and no half-built image is left in the data directory.
async fn create_crashes(_ctx: &mut Ctx) -> CaseResult {
    for point in ["create:image-built", "create:committed"] {
        let dir = fresh_dir(&format!("node-{}", point.replace(':', "-")))?;
        let mut d = Driver::start_in(dir.clone(), Some(point)).await?;
        let req = create_req(
            "pvc-create-crash",
            32 * MIB,
            mount_cap("ext4", Mode::SingleNodeWriter),
        );
        let crashed = d.controller.create_volume(req.clone()).await;
        ensure!(crashed.is_err(), "{point}: CreateVolume did not crash");
        d.wait_exit(Duration::from_secs(30)).await?;
        ensure!(
            d.log().contains(&format!("failpoint {point}: aborting")),
            "{point}: not reached"
        );
        d.kill();
        let mut d = Driver::start_in(dir.clone(), None).await?;
        let s = provision(&mut d, req.clone())
            .await
            .map_err(|e| format!("{point}: {e}"))?;
        check!(std::fs::write(s.target.join("marker"), point.as_bytes()));
        let listed = check!(
            d.controller
                .list_volumes(ListVolumesRequest::default())
                .await
        )
        .into_inner()
        .entries;
        ensure!(
            listed.len() == 1,
            "{point}: {} volumes listed",
            listed.len()
        );
        release(&mut d, &s).await?;
        let s = provision(&mut d, req).await?;
        ensure!(
            check!(std::fs::read(s.target.join("marker"))) == point.as_bytes(),
            "{point}: marker lost"
        );
        release(&mut d, &s).await?;
        delete(&mut d, &s.volume.volume_id).await?;
        let left: Vec<String> = check!(std::fs::read_dir(dir.join("data/disks")))
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        ensure!(
            left.is_empty(),
            "{point}: files left in data/disks: {left:?}"
        );
    }
    Ok(())
}
