//! Keys bound to their volume (v2, DESIGN.md §3) on a real kernel, through the
//! `dev` driver (its embedded KMS authorizes as the cluster KMS does, from the
//! local backend's record of what is published here): a new volume is v2 and
//! opens; a volume formatted with a v1 key, as drivers before v2 did, moves to
//! a v2 keyslot at its first read-write stage (a read-only stage leaves it
//! alone) with its data intact; and a disk overwritten with another volume's
//! bytes is refused, nothing opened, formatted or written.

use std::path::Path;

use cryptdisk_csi::crypt::{self, FormatOptions, Integrity, KeyId, MapperName, OpenOptions, Token};
use cryptdisk_csi::kms::authz::SCOPE_ATTRIBUTE;
use cryptdisk_csi::kms::{Derivation, derive_data_key, derive_scoped_key};
use cryptdisk_csi::proto::csi::volume_capability::access_mode::Mode;
use cryptdisk_csi::proto::csi::*;
use tonic::Code;

use crate::lifecycle_cases::{
    Driver, MIB, NODE, attach_req, block_cap, create_req, delete, image_of, mount_cap,
    open_mappings, provision, release, sha256,
};
use crate::{Case, CaseResult, Ctx, check, ensure};

pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "keyscope_new_volume_is_v2_and_opens",
            run: |c| Box::pin(new_volume_is_v2(c)),
        },
        Case {
            name: "keyscope_v1_volume_migrates_to_v2_on_a_read_write_stage",
            run: |c| Box::pin(v1_migrates(c)),
        },
        Case {
            name: "keyscope_copied_disk_is_refused_untouched",
            run: |c| Box::pin(copied_disk_refused(c)),
        },
    ]
}

/// The `dev` driver's master secret and salt.
fn secrets(d: &Driver) -> Result<(Vec<u8>, Vec<u8>), String> {
    let kms = d.dir.join("data/kms");
    Ok((
        check!(std::fs::read(kms.join("master.key"))),
        check!(std::fs::read(kms.join("salt"))),
    ))
}

/// A 4 KiB block that cannot occur by chance.
fn marker(tag: &str) -> Vec<u8> {
    format!("cryptdisk-keyscope-marker:{tag}:")
        .bytes()
        .cycle()
        .take(4096)
        .collect()
}

fn read_block(path: &Path) -> Result<Vec<u8>, String> {
    use std::os::unix::fs::FileExt;
    let f = check!(std::fs::File::open(path));
    let mut buf = vec![0u8; 4096];
    check!(f.read_exact_at(&mut buf, 0));
    Ok(buf)
}

fn write_block(path: &Path, data: &[u8]) -> CaseResult {
    use std::os::unix::fs::FileExt;
    let f = check!(std::fs::OpenOptions::new().write(true).open(path));
    check!(f.write_all_at(data, 0));
    check!(f.sync_all());
    Ok(())
}

/// A new volume: scope in its volume context (its own id), a v2 token, the
/// scoped key opens it and the v1 key of its key id does not; its data reads
/// back after a second stage.
async fn new_volume_is_v2(_ctx: &mut Ctx) -> CaseResult {
    let mut d = Driver::start("keyscope-new").await?;
    let req = create_req(
        "pvc-v2",
        32 * MIB,
        mount_cap("ext4", Mode::SingleNodeWriter),
    );
    let s = provision(&mut d, req.clone()).await?;
    let id = s.volume.volume_id.clone();
    ensure!(
        s.volume.volume_context.get(SCOPE_ATTRIBUTE) == Some(&id),
        "volume context {:?} does not carry the volume's own id as its scope",
        s.volume.volume_context
    );
    check!(std::fs::write(s.target.join("f"), b"v2 data"));
    release(&mut d, &s).await?;
    let image = image_of(&d, &id);
    let header = check!(crypt::read_header(&image).await);
    let token = header.token.ok_or("no token")?;
    ensure!(
        token.derivation == Some(Derivation::V2),
        "new volume's token: {token:?}"
    );
    let (master, salt) = secrets(&d)?;
    let v2 = check!(derive_scoped_key(
        &master,
        &salt,
        &id,
        header.key_id.as_str(),
        32
    ));
    check!(crypt::verify_key(&image, &v2).await);
    let v1 = check!(derive_data_key(&master, &salt, header.key_id.as_str(), 32));
    ensure!(
        crypt::verify_key(&image, &v1).await.is_err(),
        "the v1 key of the key id opens a v2 volume"
    );
    let s = provision(&mut d, req).await?;
    ensure!(
        check!(std::fs::read(s.target.join("f"))) == b"v2 data",
        "data lost across stages"
    );
    release(&mut d, &s).await?;
    delete(&mut d, &id).await
}

/// Stages volume `id` as a block volume with access `mode` (publishing it
/// read-only for a read-only mode); returns the stage's result, and leaves it
/// staged on success.
async fn stage_block(
    d: &mut Driver,
    volume: &Volume,
    mode: Mode,
    staging: &Path,
) -> Result<Result<(), tonic::Status>, String> {
    let mut cap = block_cap();
    if let Some(am) = cap.access_mode.as_mut() {
        am.mode = mode as i32;
    }
    let mut attach = attach_req(&volume.volume_id, &cap);
    attach.readonly = mode == Mode::SingleNodeReaderOnly;
    let context = check!(d.controller.controller_publish_volume(attach).await)
        .into_inner()
        .publish_context;
    Ok(d.node
        .node_stage_volume(NodeStageVolumeRequest {
            volume_id: volume.volume_id.clone(),
            publish_context: context,
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(cap),
            volume_context: volume.volume_context.clone(),
            ..Default::default()
        })
        .await
        .map(|_| ()))
}

async fn unstage_unpublish(d: &mut Driver, volume_id: &str, staging: &Path) -> CaseResult {
    check!(
        d.node
            .node_unstage_volume(NodeUnstageVolumeRequest {
                volume_id: volume_id.into(),
                staging_target_path: staging.display().to_string(),
            })
            .await
    );
    check!(
        d.controller
            .controller_unpublish_volume(ControllerUnpublishVolumeRequest {
                volume_id: volume_id.into(),
                node_id: NODE.into(),
                ..Default::default()
            })
            .await
    );
    Ok(())
}

/// A volume the test formats with the v1 key of a fresh key id (token without
/// a derivation: what drivers before v2 wrote), with a marker written through
/// its mapping. A read-only stage opens it with the v1 key and changes nothing;
/// a read-write stage moves it to one v2 keyslot, the marker intact, after
/// which the v1 key no longer opens it.
async fn v1_migrates(_ctx: &mut Ctx) -> CaseResult {
    let mut d = Driver::start("keyscope-v1").await?;
    let volume = check!(
        d.controller
            .create_volume(create_req("pvc-v1", 32 * MIB, block_cap()))
            .await
    )
    .into_inner()
    .volume
    .ok_or("no volume")?;
    let id = volume.volume_id.clone();
    let image = image_of(&d, &id);
    let (master, salt) = secrets(&d)?;
    let key_id = KeyId::new_random();
    let v1 = check!(derive_data_key(&master, &salt, key_id.as_str(), 32));
    let options = FormatOptions {
        key_id: key_id.clone(),
        token: Token {
            key_id: key_id.to_string(),
            key_version: 1,
            kms: "embedded".into(),
            content: None,
            wipe_offset: None,
            rotation: None,
            derivation: None,
        },
        integrity: Integrity::None,
        bypass_workqueues: true,
    };
    check!(crypt::format(check!(crypt::probe_blank(&image)), &v1, &options).await);
    check!(crypt::set_content(&image, "block").await);
    // The data goes in through a mapping of the test's own, on a loop device.
    let name = check!(MapperName::operator("keyscope-v1-writer"));
    let loop_dev = check!(cryptdisk_csi::mount::loopdev::attach(&image).await);
    check!(crypt::open(&loop_dev, &name, &v1, &OpenOptions::default()).await);
    // Used as a block volume before (content recorded): a read-only stage
    // has nothing to write.
    let data = marker("v1");
    let written = write_block(&name.device_path(), &data);
    check!(crypt::close(&name).await);
    check!(cryptdisk_csi::mount::loopdev::detach(&image).await);
    written?;

    let staging = d.dir.join("staging-v1");
    check!(std::fs::create_dir_all(&staging));
    let mapped = MapperName::for_volume(&id).device_path();

    // Read-only: opens with the v1 key, the token and keyslots unchanged.
    let before = check!(cryptdisk_csi::crypt::header::read_validated(&image));
    check!(stage_block(&mut d, &volume, Mode::SingleNodeReaderOnly, &staging).await?);
    ensure!(
        read_block(&mapped)? == data,
        "read-only: marker not read back"
    );
    unstage_unpublish(&mut d, &id, &staging).await?;
    let after = check!(cryptdisk_csi::crypt::header::read_validated(&image));
    ensure!(
        before["tokens"] == after["tokens"] && before["keyslots"] == after["keyslots"],
        "a read-only stage changed the header: {} -> {}",
        before["tokens"],
        after["tokens"]
    );

    // Read-write: migrates to v2.
    check!(stage_block(&mut d, &volume, Mode::SingleNodeWriter, &staging).await?);
    ensure!(read_block(&mapped)? == data, "read-write: marker lost");
    unstage_unpublish(&mut d, &id, &staging).await?;
    let token = check!(crypt::read_header(&image).await)
        .token
        .ok_or("no token")?;
    ensure!(
        token.derivation == Some(Derivation::V2) && token.rotation.is_none(),
        "token after the read-write stage: {token:?}"
    );
    let json = check!(cryptdisk_csi::crypt::header::read_validated(&image));
    let slots = json["keyslots"].as_object().map_or(0, |o| o.len());
    ensure!(slots == 1, "{slots} keyslots after the migration");
    let v2 = check!(derive_scoped_key(&master, &salt, &id, key_id.as_str(), 32));
    check!(crypt::verify_key(&image, &v2).await);
    ensure!(
        crypt::verify_key(&image, &v1).await.is_err(),
        "the v1 key still opens the migrated volume"
    );
    // And it stages again, as v2, with its data.
    check!(stage_block(&mut d, &volume, Mode::SingleNodeWriter, &staging).await?);
    ensure!(read_block(&mapped)? == data, "after migration: marker lost");
    unstage_unpublish(&mut d, &id, &staging).await?;
    ensure!(
        d.log().contains("rotating the volume's keyslot"),
        "the driver did not log the migration"
    );
    delete(&mut d, &id).await
}

/// Volume A is made and written; volume B's disk is overwritten with A's bytes
/// (what `dd` of a snapshot or of A's disk would do) and B is staged. The node
/// gets B's key, which cannot open A's header: the stage is refused, no
/// mapping is opened, nothing is formatted or written (B's disk hashes the
/// same), and A's data is still A's.
async fn copied_disk_refused(_ctx: &mut Ctx) -> CaseResult {
    let mut d = Driver::start("keyscope-copy").await?;
    let cap = mount_cap("ext4", Mode::SingleNodeWriter);
    let a = provision(&mut d, create_req("pvc-a", 32 * MIB, cap.clone())).await?;
    check!(std::fs::write(
        a.target.join("secret"),
        b"only A may read this"
    ));
    release(&mut d, &a).await?;
    let b = check!(
        d.controller
            .create_volume(create_req("pvc-b", 32 * MIB, cap.clone()))
            .await
    )
    .into_inner()
    .volume
    .ok_or("no volume")?;
    let (a_image, b_image) = (
        image_of(&d, &a.volume.volume_id),
        image_of(&d, &b.volume_id),
    );
    let out = check!(
        std::process::Command::new("dd")
            .arg(format!("if={}", a_image.display()))
            .arg(format!("of={}", b_image.display()))
            .args(["bs=1M", "conv=notrunc,fsync", "status=none"])
            .output()
    );
    ensure!(
        out.status.success(),
        "dd: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let before = sha256(&b_image)?;
    let staging = d.dir.join("staging-b");
    check!(std::fs::create_dir_all(&staging));
    let context = check!(
        d.controller
            .controller_publish_volume(attach_req(&b.volume_id, &cap))
            .await
    )
    .into_inner()
    .publish_context;
    let r = d
        .node
        .node_stage_volume(NodeStageVolumeRequest {
            volume_id: b.volume_id.clone(),
            publish_context: context,
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(cap.clone()),
            volume_context: b.volume_context.clone(),
            ..Default::default()
        })
        .await;
    let status = r.err().ok_or("B staged with A's header")?;
    ensure!(
        status.code() == Code::FailedPrecondition,
        "{:?} {}",
        status.code(),
        status.message()
    );
    ensure!(sha256(&b_image)? == before, "B's disk changed");
    let b_mapping = MapperName::for_volume(&b.volume_id);
    ensure!(
        !open_mappings().contains(&b_mapping.as_str().to_string()),
        "a mapping of B was opened"
    );
    unstage_unpublish(&mut d, &b.volume_id, &staging).await?;
    ensure!(sha256(&b_image)? == before, "B's disk changed at unstage");
    // A itself still opens with its data.
    let a = provision(&mut d, create_req("pvc-a", 32 * MIB, cap)).await?;
    ensure!(
        check!(std::fs::read(a.target.join("secret"))) == b"only A may read this",
        "A's data is gone"
    );
    release(&mut d, &a).await?;
    delete(&mut d, &b.volume_id).await?;
    delete(&mut d, &a.volume.volume_id).await
}
