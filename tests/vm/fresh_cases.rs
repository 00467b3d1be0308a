//! The two witnesses before a format (`cryptdisk_csi::volume::fresh`): the
//! controller's fresh-disk record and the node's probe. A disk the controller
//! did not create empty, or one past its first attachment, is never formatted
//! whatever it reads; a fresh one with data anywhere the probe reads is
//! refused too; the record's crash windows converge.

use std::collections::HashMap;
use std::path::Path;

use cryptdisk_csi::backend::LocalBackend;
use cryptdisk_csi::proto::csi::volume_capability::access_mode::Mode;
use cryptdisk_csi::proto::csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
use cryptdisk_csi::proto::csi::*;
use cryptdisk_csi::volume::{FreshRecord, fresh};
use tonic::Code;

use crate::lifecycle_cases::{
    Driver, MIB, NODE, create_attached, create_req, delete, fresh_dir, getrandom_fill, image_of,
    mount_cap, open_mappings, provision, publish, refused_untouched, release, sha256, stage,
    write_at,
};
use crate::{Case, CaseResult, Ctx, check, ensure};

pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "fresh_interior_data_is_refused_untouched",
            run: |c| Box::pin(interior_data(c)),
        },
        Case {
            name: "fresh_copies_and_disks_past_their_first_attachment_are_never_formatted",
            run: |c| Box::pin(no_record_never_formatted(c)),
        },
        Case {
            name: "fresh_record_crash_windows_converge",
            run: |c| Box::pin(crash_windows(c)),
        },
    ]
}

/// The record of a local disk as the index holds it.
fn record_of(d: &Driver, volume_id: &str) -> Result<Option<FreshRecord>, String> {
    let disk = volume_id.rsplit(':').next().unwrap_or_default();
    Ok(check!(LocalBackend::fresh_record(
        &d.dir.join("data"),
        disk
    )))
}

/// Stages `volume` and checks that the stage is refused with
/// FAILED_PRECONDITION naming `why`, that its image is byte for byte as it
/// was, and that no mapping was opened; then unstages (which detaches the loop
/// device).
async fn refused(
    d: &mut Driver,
    volume: &Volume,
    ctx: &HashMap<String, String>,
    why: &str,
) -> CaseResult {
    let image = image_of(d, &volume.volume_id);
    let before = sha256(&image)?;
    let staging = d
        .dir
        .join(format!("staging-refused-{}", before.get(..8).unwrap_or("")));
    let cap = mount_cap("ext4", Mode::SingleNodeWriter);
    let r = d
        .node
        .node_stage_volume(NodeStageVolumeRequest {
            volume_id: volume.volume_id.clone(),
            publish_context: ctx.clone(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(cap),
            volume_context: volume.volume_context.clone(),
            ..Default::default()
        })
        .await;
    let id = &volume.volume_id;
    let status = r.err().ok_or(format!("{id}: the stage succeeded"))?;
    ensure!(
        status.code() == Code::FailedPrecondition && status.message().contains(why),
        "{id}: expected FAILED_PRECONDITION naming {why:?}, got {:?} {}",
        status.code(),
        status.message()
    );
    ensure!(sha256(&image)? == before, "{id}: the image changed");
    let mapping = cryptdisk_csi::crypt::MapperName::for_volume(id);
    ensure!(
        !open_mappings().contains(&mapping.as_str().to_string()),
        "{id}: a mapping was opened"
    );
    check!(
        d.node
            .node_unstage_volume(NodeUnstageVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: staging.display().to_string(),
            })
            .await
    );
    Ok(())
}

/// The held-out run: 128 KiB of data in the middle of a fresh volume's image,
/// the first and last MiB zero. The volume has its record (the controller made
/// it empty), so the probe's samples are what refuse it.
async fn interior_data(_ctx: &mut Ctx) -> CaseResult {
    let mut d = Driver::start("fresh-interior").await?;
    let data = |len: usize| -> Result<Vec<u8>, String> {
        let mut v = vec![0u8; len];
        check!(getrandom_fill(&mut v));
        Ok(v)
    };
    let chunk = data(128 << 10)?;
    refused_untouched(&mut d, "interior-middle", &|p| {
        let len = check!(std::fs::metadata(p)).len();
        write_at(p, len / 2 - (64 << 10), &chunk)
    })
    .await?;
    refused_untouched(&mut d, "interior-at-half", &|p| {
        let len = check!(std::fs::metadata(p)).len();
        write_at(p, len / 2, &chunk)
    })
    .await?;
    // Away from the middle, and a few bytes only where the old edge probe and
    // 64 even samples would both have missed it.
    refused_untouched(&mut d, "interior-third", &|p| {
        let len = check!(std::fs::metadata(p)).len();
        write_at(p, len / 3, &chunk)
    })
    .await?;
    refused_untouched(&mut d, "interior-small", &|p| {
        let len = check!(std::fs::metadata(p)).len();
        write_at(p, (1 << 20) + (len - (2 << 20)) / 130, &[0x5a; 64 << 10])
    })
    .await?;
    // The same volume blank: formatted at its first stage.
    let s = provision(
        &mut d,
        create_req(
            "fresh-ok",
            32 * MIB,
            mount_cap("ext4", Mode::SingleNodeWriter),
        ),
    )
    .await?;
    let header =
        check!(cryptdisk_csi::crypt::read_header(&image_of(&d, &s.volume.volume_id)).await);
    ensure!(header.token.is_some(), "no token after the first stage");
    release(&mut d, &s).await?;
    delete(&mut d, &s.volume.volume_id).await
}

async fn snapshot_of(d: &mut Driver, source: &str, name: &str) -> Result<String, String> {
    Ok(check!(
        d.controller
            .create_snapshot(CreateSnapshotRequest {
                source_volume_id: source.into(),
                name: name.into(),
                ..Default::default()
            })
            .await
    )
    .into_inner()
    .snapshot
    .ok_or("no snapshot")?
    .snapshot_id)
}

/// Zeroes an image whole, keeping its size: it then reads blank everywhere.
fn zero_image(path: &Path) -> CaseResult {
    let f = check!(std::fs::OpenOptions::new().write(true).open(path));
    let len = check!(f.metadata()).len();
    check!(f.set_len(0));
    check!(f.set_len(len));
    check!(f.sync_all());
    Ok(())
}

async fn no_record_never_formatted(_ctx: &mut Ctx) -> CaseResult {
    let mut d = Driver::start("fresh-norecord").await?;
    let cap = mount_cap("ext4", Mode::SingleNodeWriter);
    // A fresh volume: its record is in the index and in the publish context.
    let req = create_req("src", 32 * MIB, cap.clone());
    let (src, ctx) = create_attached(&mut d.controller, req.clone()).await?;
    let record = record_of(&d, &src.volume_id)?.ok_or("a new empty volume has no record")?;
    ensure!(
        ctx.get(fresh::PUBLISH_KEY) == Some(&record.to_string()),
        "publish context {ctx:?} does not carry the record {record}"
    );
    check!(
        d.controller
            .controller_unpublish_volume(ControllerUnpublishVolumeRequest {
                volume_id: src.volume_id.clone(),
                node_id: NODE.into(),
                ..Default::default()
            })
            .await
    );
    // Its first attachment ended without a stage: refused from now on, until an
    // operator marks it fresh again.
    ensure!(
        record_of(&d, &src.volume_id)?.is_none(),
        "unpublish left the record"
    );
    let (_, ctx) = create_attached(&mut d.controller, req.clone()).await?;
    ensure!(
        !ctx.contains_key(fresh::PUBLISH_KEY),
        "record after unpublish: {ctx:?}"
    );
    refused(&mut d, &src, &ctx, "no record").await?;
    check!(
        d.controller
            .controller_unpublish_volume(ControllerUnpublishVolumeRequest {
                volume_id: src.volume_id.clone(),
                node_id: NODE.into(),
                ..Default::default()
            })
            .await
    );
    delete(&mut d, &src.volume_id).await?;

    // A used volume, then a restore of its snapshot and a clone of it, zeroed:
    // no record, never formatted, even with a forged publish context.
    let s = provision(&mut d, create_req("used", 32 * MIB, cap.clone())).await?;
    let forged = HashMap::from([(
        fresh::PUBLISH_KEY.to_string(),
        FreshRecord::new_random().to_string(),
    )]);
    release(&mut d, &s).await?;
    let snap = snapshot_of(&mut d, &s.volume.volume_id, "used-snap").await?;
    let mut restore = create_req("restored", 32 * MIB, cap.clone());
    restore.volume_content_source = Some(VolumeContentSource {
        r#type: Some(Type::Snapshot(SnapshotSource {
            snapshot_id: snap.clone(),
        })),
    });
    let mut clone = create_req("cloned", 32 * MIB, cap.clone());
    clone.volume_content_source = Some(VolumeContentSource {
        r#type: Some(Type::Volume(VolumeSource {
            volume_id: s.volume.volume_id.clone(),
        })),
    });
    for req in [restore, clone] {
        let name = req.name.clone();
        let (v, ctx) = create_attached(&mut d.controller, req).await?;
        ensure!(
            record_of(&d, &v.volume_id)?.is_none(),
            "{name}: a copy has a record"
        );
        ensure!(!ctx.contains_key(fresh::PUBLISH_KEY), "{name}: {ctx:?}");
        zero_image(&image_of(&d, &v.volume_id))?;
        refused(&mut d, &v, &ctx, "no record").await?;
        refused(&mut d, &v, &forged, "no record").await?;
        check!(
            d.controller
                .controller_unpublish_volume(ControllerUnpublishVolumeRequest {
                    volume_id: v.volume_id.clone(),
                    node_id: NODE.into(),
                    ..Default::default()
                })
                .await
        );
        delete(&mut d, &v.volume_id).await?;
    }

    // The used volume's header lost after its first attachment ended: it reads
    // blank everywhere, and is refused rather than formatted over.
    ensure!(
        record_of(&d, &s.volume.volume_id)?.is_none(),
        "record after release"
    );
    zero_image(&image_of(&d, &s.volume.volume_id))?;
    let (_, ctx) = create_attached(&mut d.controller, req_named("used", &cap)).await?;
    refused(&mut d, &s.volume, &ctx, "no record").await?;

    // Within the first attachment (record still there), a node plugin that
    // formatted the disk does not format it again once its header is lost.
    let req = create_req("lost-early", 32 * MIB, cap.clone());
    let s2 = provision(&mut d, req).await?;
    check!(
        d.node
            .node_unpublish_volume(NodeUnpublishVolumeRequest {
                volume_id: s2.volume.volume_id.clone(),
                target_path: s2.target.display().to_string(),
            })
            .await
    );
    check!(
        d.node
            .node_unstage_volume(NodeUnstageVolumeRequest {
                volume_id: s2.volume.volume_id.clone(),
                staging_target_path: s2.staging.display().to_string(),
            })
            .await
    );
    ensure!(
        record_of(&d, &s2.volume.volume_id)?.is_some(),
        "record gone too early"
    );
    zero_image(&image_of(&d, &s2.volume.volume_id))?;
    refused(&mut d, &s2.volume, &s2.publish_context, "already formatted").await?;
    Ok(())
}

fn req_named(name: &str, cap: &VolumeCapability) -> CreateVolumeRequest {
    create_req(name, 32 * MIB, cap.clone())
}

async fn crash_windows(_ctx: &mut Ctx) -> CaseResult {
    let cap = mount_cap("ext4", Mode::SingleNodeWriter);
    // Created but not yet recorded: the image is built, the index entry (with
    // the record, written in the same index write) is not. The retried create
    // builds it again with its record, and the first stage formats it.
    let dir = fresh_dir("fresh-crash-create")?;
    let mut d = Driver::start_in(dir.clone(), Some("create:image-built")).await?;
    let req = create_req("pvc-c", 32 * MIB, cap.clone());
    ensure!(
        d.controller.create_volume(req.clone()).await.is_err(),
        "create did not crash"
    );
    ensure!(
        d.log().contains("failpoint create:image-built: aborting"),
        "not reached"
    );
    d.kill();
    let mut d = Driver::start_in(dir.clone(), None).await?;
    let s = provision(&mut d, req.clone()).await?;
    ensure!(
        s.publish_context.contains_key(fresh::PUBLISH_KEY),
        "no record after the retried create: {:?}",
        s.publish_context
    );
    release(&mut d, &s).await?;
    delete(&mut d, &s.volume.volume_id).await?;
    drop(d);

    // Formatted but not yet cleared: a crash right after the format. The record
    // stays until ControllerUnpublish; the retried stage finds our header and
    // does not format again (same key id), and after the release the record is
    // gone, so a lost header is refused.
    let dir = fresh_dir("fresh-crash-formatted")?;
    let mut d = Driver::start_in(dir.clone(), Some("stage:formatted")).await?;
    let (v, ctx) = create_attached(
        &mut d.controller,
        create_req("pvc-f", 32 * MIB, cap.clone()),
    )
    .await?;
    let staging = dir.join("staging");
    ensure!(
        stage(&mut d, &v, &ctx, &staging, &cap).await.is_err(),
        "stage did not crash"
    );
    ensure!(
        d.log().contains("failpoint stage:formatted: aborting"),
        "not reached"
    );
    d.kill();
    let image = image_of_dir(&dir, &v.volume_id);
    let first = check!(cryptdisk_csi::crypt::read_header(&image).await);
    let mut d = Driver::start_in(dir.clone(), None).await?;
    ensure!(
        record_of(&d, &v.volume_id)?.is_some(),
        "record gone before unpublish"
    );
    stage(&mut d, &v, &ctx, &staging, &cap).await?;
    let again = check!(cryptdisk_csi::crypt::read_header(&image).await);
    ensure!(
        first.key_id == again.key_id,
        "formatted again after the crash"
    );
    let s = crate::lifecycle_cases::Staged {
        volume: v.clone(),
        publish_context: ctx.clone(),
        staging,
        target: dir.join("target"),
        cap: cap.clone(),
    };
    publish(&mut d, &s, false).await?;
    release(&mut d, &s).await?;
    ensure!(
        record_of(&d, &v.volume_id)?.is_none(),
        "record left after unpublish"
    );
    zero_image(&image)?;
    let (_, ctx) = create_attached(
        &mut d.controller,
        create_req("pvc-f", 32 * MIB, cap.clone()),
    )
    .await?;
    refused(&mut d, &v, &ctx, "no record").await?;
    Ok(())
}

fn image_of_dir(dir: &Path, volume_id: &str) -> std::path::PathBuf {
    let disk = volume_id.rsplit(':').next().unwrap_or_default();
    dir.join("data/disks").join(format!("{disk}.img"))
}
