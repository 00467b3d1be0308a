//! Malicious LUKS2 headers on real devices.
//!
//! A volume is formatted by the driver, then its header is rewritten the way an
//! attacker with access to the disk would: the JSON changed and both copies'
//! checksums recomputed, so that libcryptsetup would load it. Each forged
//! header must be refused with FAILED_PRECONDITION before any key is asked for
//! (the real KMS's audit log gains no line, so no keyslot can have been tried),
//! with the device byte for byte unchanged and no mapping opened. A control
//! forgery that rewrites the same JSON with fresh checksums must still stage, so
//! the refusals come from what the header says, not from how it was written.

use std::path::Path;

use cryptdisk_csi::proto::csi::volume_capability::access_mode::Mode;
use cryptdisk_csi::proto::csi::*;
use serde_json::{Value, json};
use tonic::Code;

use crate::lifecycle_cases::{MIB, create_attached, create_req, mount_cap, open_mappings};
use crate::node_cases::{Split, spawn_kms, unpublish_and_delete, write_secrets};
use crate::{Case, CaseResult, Ctx, check, ensure};

pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "header_forged_luks2_headers_are_refused_before_any_key_is_asked",
            run: |c| Box::pin(forged_headers(c)),
        },
        Case {
            name: "header_json_c_readings_copy_choice_and_costs_are_refused_on_a_real_device",
            run: |c| Box::pin(parser_differentials(c)),
        },
        Case {
            name: "header_a_stage_refused_after_activation_closes_what_it_opened",
            run: |c| Box::pin(refused_after_activation(c)),
        },
    ]
}

/// Offset of the checksum in a LUKS2 binary header, and its length for sha256.
const CSUM_OFFSET: usize = 448;
const CSUM_LEN: usize = 32;
const BINARY_HEADER: usize = 4096;

/// What a forgery does to one header copy: its JSON, and its binary fields.
type Forge = fn(&mut Value, &mut [u8]);

/// Rewrites both header copies of `image` (each through `primary` or
/// `secondary`), then recomputes each copy's sha256 checksum over the binary
/// header (checksum field zeroed) and its JSON area, as LUKS2 defines it.
fn forge(image: &Path, primary: Forge, secondary: Forge) -> Result<(), String> {
    use sha2::{Digest, Sha256};
    use std::os::unix::fs::FileExt;
    let f = check!(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(image)
    );
    let mut first = [0u8; 16];
    check!(f.read_exact_at(&mut first, 0));
    let hdr_size = u64::from_be_bytes(check!(first[8..16].try_into())) as usize;
    for (offset, change) in [(0, primary), (hdr_size, secondary)] {
        let mut copy = vec![0u8; hdr_size];
        check!(f.read_exact_at(&mut copy, offset as u64));
        let area = &copy[BINARY_HEADER..];
        let end = area.iter().position(|&b| b == 0).unwrap_or(area.len());
        let mut json: Value = check!(serde_json::from_slice(&area[..end]));
        change(&mut json, &mut copy[..BINARY_HEADER]);
        let text = check!(serde_json::to_vec(&json));
        ensure!(
            text.len() < hdr_size - BINARY_HEADER,
            "forged JSON of {} bytes does not fit",
            text.len()
        );
        copy[BINARY_HEADER..].fill(0);
        copy[BINARY_HEADER..BINARY_HEADER + text.len()].copy_from_slice(&text);
        copy[CSUM_OFFSET..CSUM_OFFSET + 64].fill(0);
        let sum = Sha256::digest(&copy);
        copy[CSUM_OFFSET..CSUM_OFFSET + CSUM_LEN].copy_from_slice(&sum);
        check!(f.write_all_at(&copy, offset as u64));
    }
    check!(f.sync_all());
    Ok(())
}

fn same(_: &mut Value, _: &mut [u8]) {}

/// The forgeries: a name, what each copy gets, and a word the refusal names.
fn forgeries() -> Vec<(&'static str, Forge, Forge, &'static str)> {
    vec![
        (
            "null cipher on the data segment",
            |j, _| j["segments"]["0"]["encryption"] = json!("cipher_null-ecb"),
            |j, _| j["segments"]["0"]["encryption"] = json!("cipher_null-ecb"),
            "segment encryption",
        ),
        (
            "a keyslot that no digest covers",
            |j, _| unbound_keyslot(j),
            |j, _| unbound_keyslot(j),
            "digest covers",
        ),
        (
            "an extra segment",
            |j, _| extra_segment(j),
            |j, _| extra_segment(j),
            "segments",
        ),
        (
            "the data segment inside the header area",
            |j, _| j["segments"]["0"]["offset"] = json!("8388608"),
            |j, _| j["segments"]["0"]["offset"] = json!("8388608"),
            "segment offset",
        ),
        (
            "config.json_size larger than the JSON area",
            |j, _| j["config"]["json_size"] = json!("4190208"),
            |j, _| j["config"]["json_size"] = json!("4190208"),
            "json_size",
        ),
        (
            "a header size LUKS2 does not define (1 GiB JSON area)",
            |_, b| b[8..16].copy_from_slice(&(1u64 << 30).to_be_bytes()),
            |_, b| b[8..16].copy_from_slice(&(1u64 << 30).to_be_bytes()),
            "header size",
        ),
        (
            "a forged token naming another volume's key id",
            |j, _| j["tokens"]["0"]["key_id"] = json!("0b0b0b0b-0000-4000-8000-000000000002"),
            |j, _| j["tokens"]["0"]["key_id"] = json!("0b0b0b0b-0000-4000-8000-000000000002"),
            "UUID",
        ),
        (
            "a second token",
            |j, _| j["tokens"]["1"] = j["tokens"]["0"].clone(),
            |j, _| j["tokens"]["1"] = j["tokens"]["0"].clone(),
            "tokens",
        ),
        (
            "a reencryption requirement",
            |j, _| j["config"]["requirements"] = json!({"mandatory": ["online-reencrypt-v2"]}),
            |j, _| j["config"]["requirements"] = json!({"mandatory": ["online-reencrypt-v2"]}),
            "requirements",
        ),
        (
            "2^32 - 1 PBKDF iterations on the keyslot",
            |j, _| j["keyslots"]["0"]["kdf"]["iterations"] = json!(4294967295u64),
            |j, _| j["keyslots"]["0"]["kdf"]["iterations"] = json!(4294967295u64),
            "kdf iterations",
        ),
        (
            "four million anti-forensic stripes",
            |j, _| j["keyslots"]["0"]["af"]["stripes"] = json!(4000000),
            |j, _| j["keyslots"]["0"]["af"]["stripes"] = json!(4000000),
            "af stripes",
        ),
        (
            "a primary header that disagrees with the secondary at the same seqid",
            |j, _| j["segments"]["0"]["encryption"] = json!("cipher_null-ecb"),
            same,
            "disagree",
        ),
        (
            "a secondary header that disagrees with the primary at the same seqid",
            same,
            |j, _| j["keyslots"]["0"]["kdf"]["iterations"] = json!(1),
            "disagree",
        ),
    ]
}

/// Keyslot 1: a copy of keyslot 0 in the next free area, bound to nothing.
fn unbound_keyslot(j: &mut Value) {
    let mut slot = j["keyslots"]["0"].clone();
    let offset: u64 = slot["area"]["offset"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or(32768);
    let size: u64 = slot["area"]["size"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or(258048);
    slot["area"]["offset"] = json!((offset + size).to_string());
    j["keyslots"]["1"] = slot;
}

fn extra_segment(j: &mut Value) {
    let mut second = j["segments"]["0"].clone();
    j["segments"]["0"]["size"] = json!("4194304");
    second["offset"] = json!("20971520");
    j["segments"]["1"] = second;
}

fn sha256(path: &Path) -> Result<String, String> {
    use sha2::{Digest, Sha256};
    Ok(hex::encode(Sha256::digest(check!(std::fs::read(path)))))
}

/// Lines the KMS has written to its audit log (one per key request).
fn audit_lines(log: &Path) -> Result<usize, String> {
    Ok(check!(std::fs::read_to_string(log))
        .lines()
        .filter(|l| l.contains("cryptdisk::audit"))
        .count())
}

/// Whether stock cryptsetup loads the header (for the report: the forgeries
/// that it loads are the ones only our validation stops). It runs on a copy:
/// libcryptsetup repairs a damaged header copy from the other when it loads one.
fn cryptsetup_loads(image: &Path) -> Result<bool, String> {
    let copy = image.with_extension("probe");
    check!(std::fs::copy(image, &copy));
    let loads = std::process::Command::new("cryptsetup")
        .arg("luksDump")
        .arg(&copy)
        .output()
        .is_ok_and(|o| o.status.success());
    check!(std::fs::remove_file(&copy));
    Ok(loads)
}

async fn forged_headers(_ctx: &mut Ctx) -> CaseResult {
    let dir = crate::lifecycle_cases::fresh_dir("header-forged")?;
    let mut split = Split::start(&dir).await?;
    let (secret, salt) = write_secrets(&dir, 5)?;
    let _kms = spawn_kms(&dir, &split.kms_sock, &secret, &salt).await?;
    let (controller, node) = (&mut split.controller, &mut split.node);
    let cap = mount_cap("ext4", Mode::SingleNodeWriter);
    let (volume, publish_context) =
        create_attached(controller, create_req("pvc-forged", 32 * MIB, cap.clone())).await?;
    let image = dir.join("data/disks").join(format!(
        "{}.img",
        volume.volume_id.rsplit(':').next().unwrap_or_default()
    ));
    let staging = dir.join("staging");
    let stage_req = NodeStageVolumeRequest {
        volume_id: volume.volume_id.clone(),
        publish_context,
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(cap),
        volume_context: volume.volume_context.clone(),
        ..Default::default()
    };
    let unstage_req = NodeUnstageVolumeRequest {
        volume_id: volume.volume_id.clone(),
        staging_target_path: staging.display().to_string(),
    };
    let audit = dir.join("kms.log");

    // The driver formats the volume: one key request.
    check!(node.node_stage_volume(stage_req.clone()).await);
    check!(node.node_unstage_volume(unstage_req.clone()).await);
    ensure!(
        audit_lines(&audit)? == 1,
        "format: {} audit lines",
        audit_lines(&audit)?
    );
    let original = check!(std::fs::read(&image));
    let mapping = cryptdisk_csi::crypt::MapperName::for_volume(&volume.volume_id);

    let mut report = Vec::new();
    for (name, primary, secondary, word) in forgeries() {
        check!(std::fs::write(&image, &original));
        forge(&image, primary, secondary)?;
        let loads = cryptsetup_loads(&image)?;
        let before = sha256(&image)?;
        let asked_before = audit_lines(&audit)?;
        let r = node.node_stage_volume(stage_req.clone()).await;
        let status = r
            .err()
            .ok_or(format!("{name}: the forged header was staged"))?;
        ensure!(
            status.code() == Code::FailedPrecondition && status.message().contains(word),
            "{name}: {:?} {:?} (expected FAILED_PRECONDITION naming {word:?})",
            status.code(),
            status.message()
        );
        ensure!(
            audit_lines(&audit)? == asked_before,
            "{name}: the KMS was asked for a key"
        );
        ensure!(sha256(&image)? == before, "{name}: the device changed");
        ensure!(
            !open_mappings().contains(&mapping.as_str().to_string()),
            "{name}: a mapping was opened"
        );
        check!(node.node_unstage_volume(unstage_req.clone()).await);
        report.push(format!(
            "{name}: refused ({}), cryptsetup luksDump {}",
            status.message().rsplit(": ").next().unwrap_or_default(),
            if loads { "loads it" } else { "refuses it too" }
        ));
    }
    for line in &report {
        println!("  forged header: {line}");
    }
    // Only our validation stops most of them: stock libcryptsetup loads them.
    let loaded = report.iter().filter(|l| l.ends_with("loads it")).count();
    ensure!(
        loaded >= 5,
        "only {loaded} forgeries load in cryptsetup: the forging is broken"
    );

    // Control: the same JSON rewritten with fresh checksums stages, with a key.
    check!(std::fs::write(&image, &original));
    forge(&image, same, same)?;
    let asked_before = audit_lines(&audit)?;
    check!(node.node_stage_volume(stage_req.clone()).await);
    ensure!(
        audit_lines(&audit)? == asked_before + 1,
        "control: the key was not asked for"
    );
    check!(node.node_unstage_volume(unstage_req).await);
    unpublish_and_delete(controller, volume.volume_id).await
}

/// Rewrites the JSON text of both header copies with `edit` (on the text, so
/// that it can hold what a JSON value cannot: duplicate keys, a NUL in a key)
/// and recomputes both checksums.
fn forge_text(image: &Path, edit: fn(&str) -> String) -> Result<(), String> {
    use std::os::unix::fs::FileExt;
    let f = check!(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(image)
    );
    let hdr_size = 16 << 10;
    for offset in [0u64, hdr_size as u64] {
        let mut copy = vec![0u8; hdr_size];
        check!(f.read_exact_at(&mut copy, offset));
        let area = &copy[BINARY_HEADER..];
        let end = area.iter().position(|&b| b == 0).unwrap_or(area.len());
        let text = edit(check!(std::str::from_utf8(&area[..end])));
        copy[BINARY_HEADER..].fill(0);
        copy[BINARY_HEADER..BINARY_HEADER + text.len()].copy_from_slice(text.as_bytes());
        resum(&mut copy);
        check!(f.write_all_at(&copy, offset));
    }
    check!(f.sync_all());
    Ok(())
}

fn resum(copy: &mut [u8]) {
    use sha2::{Digest, Sha256};
    copy[CSUM_OFFSET..CSUM_OFFSET + 64].fill(0);
    let sum = Sha256::digest(&*copy);
    copy[CSUM_OFFSET..CSUM_OFFSET + CSUM_LEN].copy_from_slice(&sum);
}

/// Adds `entry` to segment 0 right after its sector size.
fn add_to_segment(text: &str, entry: &str) -> String {
    text.replacen(
        "\"sector_size\":4096",
        &format!("\"sector_size\":4096,{entry}"),
        1,
    )
}

/// The copy-choice forgery: a primary whose checksum fails and that claims
/// 32 KiB, a null-cipher copy at 16 KiB (where libcryptsetup's scan looks
/// first) and a decoy copy of ours at 32 KiB (where a reader trusting the
/// primary's size looks).
fn forge_copy_choice(image: &Path) -> Result<(), String> {
    use std::os::unix::fs::FileExt;
    let f = check!(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(image)
    );
    let mut primary = vec![0u8; 16 << 10];
    check!(f.read_exact_at(&mut primary, 0));
    let area = &primary[BINARY_HEADER..];
    let end = area.iter().position(|&b| b == 0).unwrap_or(area.len());
    let ours = check!(std::str::from_utf8(&area[..end])).to_string();
    let evil = ours.replace(
        "\"encryption\":\"aes-xts-plain64\",\"sector_size\"",
        "\"encryption\":\"cipher_null-ecb\",\"sector_size\"",
    );
    ensure!(
        evil != ours,
        "the forgery found no segment cipher to replace"
    );
    let copy = |magic: &[u8; 6], offset: u64, size: usize, text: &str| {
        let mut c = vec![0u8; size];
        c[..BINARY_HEADER].copy_from_slice(&primary[..BINARY_HEADER]);
        c[0..6].copy_from_slice(magic);
        c[8..16].copy_from_slice(&(size as u64).to_be_bytes());
        c[256..264].copy_from_slice(&offset.to_be_bytes());
        c[BINARY_HEADER..BINARY_HEADER + text.len()].copy_from_slice(text.as_bytes());
        resum(&mut c);
        c
    };
    let mut first = copy(b"LUKS\xba\xbe", 0, 32 << 10, &ours);
    first[CSUM_OFFSET] ^= 0xff; // its checksum no longer holds
    let hidden = copy(b"SKUL\xba\xbe", 16 << 10, 16 << 10, &evil);
    first[16 << 10..].copy_from_slice(&hidden);
    let decoy = copy(b"SKUL\xba\xbe", 32 << 10, 32 << 10, &ours);
    check!(f.write_all_at(&first, 0));
    check!(f.write_all_at(&decoy, 32 << 10));
    check!(f.sync_all());
    Ok(())
}

/// What stock `cryptsetup luksDump` says segment 0's cipher is (on a copy).
fn cryptsetup_cipher(image: &Path) -> Result<String, String> {
    let copy = image.with_extension("probe");
    check!(std::fs::copy(image, &copy));
    let out = check!(
        std::process::Command::new("cryptsetup")
            .args(["luksDump", "--dump-json-metadata"])
            .arg(&copy)
            .output()
    );
    check!(std::fs::remove_file(&copy));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    Ok(json["segments"]["0"]["encryption"]
        .as_str()
        .unwrap_or("(not loaded)")
        .to_string())
}

/// Forgeries that only a parser differing from libcryptsetup's would pass: a
/// NUL in a key and a duplicate key (json-c keeps the later value), the copy
/// choice (libcryptsetup scans for a secondary when the primary's checksum
/// fails), each with valid checksums where libcryptsetup checks them. Each is
/// refused before a key is asked for, with the device byte for byte unchanged
/// (libcryptsetup's repair of a bad copy never runs) and no mapping.
async fn parser_differentials(_ctx: &mut Ctx) -> CaseResult {
    let dir = crate::lifecycle_cases::fresh_dir("header-differential")?;
    let mut split = Split::start(&dir).await?;
    let (secret, salt) = write_secrets(&dir, 6)?;
    let _kms = spawn_kms(&dir, &split.kms_sock, &secret, &salt).await?;
    let (controller, node) = (&mut split.controller, &mut split.node);
    let cap = mount_cap("ext4", Mode::SingleNodeWriter);
    let (volume, publish_context) = create_attached(
        controller,
        create_req("pvc-differential", 32 * MIB, cap.clone()),
    )
    .await?;
    let image = dir.join("data/disks").join(format!(
        "{}.img",
        volume.volume_id.rsplit(':').next().unwrap_or_default()
    ));
    let staging = dir.join("staging");
    let stage_req = NodeStageVolumeRequest {
        volume_id: volume.volume_id.clone(),
        publish_context,
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(cap),
        volume_context: volume.volume_context.clone(),
        ..Default::default()
    };
    let unstage_req = NodeUnstageVolumeRequest {
        volume_id: volume.volume_id.clone(),
        staging_target_path: staging.display().to_string(),
    };
    let audit = dir.join("kms.log");
    check!(node.node_stage_volume(stage_req.clone()).await);
    check!(node.node_unstage_volume(unstage_req.clone()).await);
    let original = check!(std::fs::read(&image));
    let mapping = cryptdisk_csi::crypt::MapperName::for_volume(&volume.volume_id);

    type Apply = fn(&Path) -> Result<(), String>;
    let cases: [(&str, Apply, &str); 4] = [
        (
            "a NUL-keyed null cipher in segment 0",
            |i| {
                forge_text(i, |t| {
                    add_to_segment(t, "\"encryption\\u0000\":\"cipher_null-ecb\"")
                })
            },
            "control character",
        ),
        (
            "a duplicate encryption key in segment 0",
            |i| {
                forge_text(i, |t| {
                    add_to_segment(t, "\"encryption\":\"cipher_null-ecb\"")
                })
            },
            "duplicate key",
        ),
        (
            "a duplicate requirements entry in config",
            |i| {
                forge_text(i, |t| {
                    t.replacen(
                        "\"config\":{",
                        "\"config\":{\"requirements\":{\"mandatory\":[\"online-reencrypt-v2\"]},\"requirements\\u0000\":{},",
                        1,
                    )
                })
            },
            "control character",
        ),
        (
            "a primary with a failing checksum, a null-cipher copy at 16 KiB and a decoy at 32 KiB",
            forge_copy_choice,
            "secondary header magic",
        ),
    ];
    let mut report = Vec::new();
    for (name, apply, word) in cases {
        check!(std::fs::write(&image, &original));
        apply(&image)?;
        let libcryptsetup_sees = cryptsetup_cipher(&image)?;
        let before = sha256(&image)?;
        let asked_before = audit_lines(&audit)?;
        let status = node
            .node_stage_volume(stage_req.clone())
            .await
            .err()
            .ok_or(format!("{name}: the forged header was staged"))?;
        ensure!(
            status.code() == Code::FailedPrecondition && status.message().contains(word),
            "{name}: {:?} {:?} (expected FAILED_PRECONDITION naming {word:?})",
            status.code(),
            status.message()
        );
        ensure!(
            audit_lines(&audit)? == asked_before,
            "{name}: the KMS was asked for a key"
        );
        ensure!(sha256(&image)? == before, "{name}: the device changed");
        ensure!(
            !open_mappings().contains(&mapping.as_str().to_string()),
            "{name}: a mapping was opened"
        );
        check!(node.node_unstage_volume(unstage_req.clone()).await);
        report.push(format!(
            "{name}: refused, libcryptsetup would activate {libcryptsetup_sees}"
        ));
    }
    for line in &report {
        println!("  forged header: {line}");
    }
    // The NUL-key and copy-choice forgeries are real: libcryptsetup itself
    // reads a null cipher from them.
    ensure!(
        report
            .iter()
            .filter(|l| l.ends_with("cipher_null-ecb"))
            .count()
            >= 2,
        "the forgeries do not make libcryptsetup read a null cipher: {report:?}"
    );

    // Control: the original header stages again.
    check!(std::fs::write(&image, &original));
    check!(node.node_stage_volume(stage_req).await);
    check!(node.node_unstage_volume(unstage_req).await);
    unpublish_and_delete(controller, volume.volume_id).await
}

/// A stage refused after it opened the mapping (a volume holding ext4 staged
/// as a block volume) closes the mapping and detaches the loop device before
/// it answers, and says why at warn level with the volume id.
async fn refused_after_activation(_ctx: &mut Ctx) -> CaseResult {
    let dir = crate::lifecycle_cases::fresh_dir("header-refused-open")?;
    let mut split = Split::start(&dir).await?;
    let (secret, salt) = write_secrets(&dir, 7)?;
    let _kms = spawn_kms(&dir, &split.kms_sock, &secret, &salt).await?;
    let (controller, node) = (&mut split.controller, &mut split.node);
    let cap = mount_cap("ext4", Mode::SingleNodeWriter);
    let (volume, publish_context) = create_attached(
        controller,
        create_req("pvc-refused-open", 32 * MIB, cap.clone()),
    )
    .await?;
    let image = dir.join("data/disks").join(format!(
        "{}.img",
        volume.volume_id.rsplit(':').next().unwrap_or_default()
    ));
    let staging = dir.join("staging");
    let mut stage_req = NodeStageVolumeRequest {
        volume_id: volume.volume_id.clone(),
        publish_context,
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(cap),
        volume_context: volume.volume_context.clone(),
        ..Default::default()
    };
    let unstage_req = NodeUnstageVolumeRequest {
        volume_id: volume.volume_id.clone(),
        staging_target_path: staging.display().to_string(),
    };
    check!(node.node_stage_volume(stage_req.clone()).await);
    check!(node.node_unstage_volume(unstage_req.clone()).await);

    stage_req.volume_capability = Some(crate::lifecycle_cases::block_cap());
    let status = node
        .node_stage_volume(stage_req.clone())
        .await
        .err()
        .ok_or("a volume holding ext4 was staged as a block volume")?;
    ensure!(
        status.code() == Code::FailedPrecondition && status.message().contains("ext4"),
        "{:?} {:?}",
        status.code(),
        status.message()
    );
    let mapping = cryptdisk_csi::crypt::MapperName::for_volume(&volume.volume_id);
    ensure!(
        !open_mappings().contains(&mapping.as_str().to_string()),
        "the refused stage left its mapping open"
    );
    ensure!(
        check!(cryptdisk_csi::mount::loopdev::find_by_backing_file(&image)).is_none(),
        "the refused stage left its loop device attached"
    );
    let log = check!(std::fs::read_to_string(dir.join("node.log")));
    ensure!(
        log.lines().any(|l| l.contains("WARN")
            && l.contains("NodeStageVolume refused")
            && l.contains(&volume.volume_id)),
        "no warn line with the volume id for the refusal in the node's log"
    );
    check!(node.node_unstage_volume(unstage_req).await);
    unpublish_and_delete(controller, volume.volume_id).await
}
