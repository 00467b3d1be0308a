//! The `crypt` module against real dm-crypt and dm-integrity on virtio disks.

use std::fs::{File, OpenOptions as FileOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use cryptdisk_csi::crypt::{
    self, Closed, Error, FormatOptions, Integrity, KeyId, MapperName, OpenOptions, Opened, Token,
};
use cryptdisk_csi::kms::{DataKey, derive_data_key};

use crate::{Case, CaseResult, Ctx, check, ensure};

pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "crypt_round_trip_keeps_plaintext_off_the_disk",
            run: |c| Box::pin(round_trip(c)),
        },
        Case {
            name: "crypt_wrong_key_is_refused",
            run: |c| Box::pin(wrong_key(c)),
        },
        Case {
            name: "crypt_open_twice_is_idempotent",
            run: |c| Box::pin(open_twice(c)),
        },
        Case {
            name: "crypt_close_absent_mapping_is_no_error",
            run: |c| Box::pin(close_absent(c)),
        },
        Case {
            name: "crypt_name_open_on_another_device_conflicts",
            run: |c| Box::pin(conflict(c)),
        },
        Case {
            name: "crypt_integrity_round_trip",
            run: |c| Box::pin(integrity_round_trip(c)),
        },
        Case {
            name: "crypt_non_blank_device_is_never_formatted",
            run: |c| Box::pin(non_blank(c)),
        },
    ]
}

const MASTER: [u8; 32] = [0x5a; 32];
const SALT: [u8; 32] = [0xa5; 32];

fn key_for(id: &KeyId) -> DataKey {
    derive_data_key(&MASTER, &SALT, id.as_str(), 32).expect("valid length")
}

/// Formats a blank disk as the node would, returning the key id and its key.
async fn format(disk: &Path, integrity: Integrity) -> Result<(KeyId, DataKey), String> {
    let key_id = KeyId::new_random();
    let key = key_for(&key_id);
    let blank = check!(crypt::probe_blank(disk));
    let opts = FormatOptions {
        key_id: key_id.clone(),
        token: Token {
            key_id: key_id.to_string(),
            key_version: 1,
            kms: "vm-test".into(),
            content: None,
            wipe_offset: None,
            rotation: None,
            derivation: None,
        },
        integrity,
        bypass_workqueues: true,
    };
    check!(crypt::format(blank, &key, &opts).await);
    Ok((key_id, key))
}

/// A 4 KiB block that cannot occur by chance.
fn marker(tag: &str) -> Vec<u8> {
    let line = format!("cryptdisk-vm-marker:{tag}:");
    line.bytes().cycle().take(4096).collect()
}

fn write_block(device: &Path, offset: u64, data: &[u8]) -> std::io::Result<()> {
    let mut f = FileOptions::new().write(true).open(device)?;
    f.seek(SeekFrom::Start(offset))?;
    f.write_all(data)?;
    f.sync_all()
}

fn read_block(device: &Path, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut f = File::open(device)?;
    f.seek(SeekFrom::Start(offset))?;
    let mut buf = vec![0u8; len];
    f.read_exact(&mut buf)?;
    Ok(buf)
}

/// Whether `needle` occurs anywhere on the device.
pub fn device_contains(device: &Path, needle: &[u8]) -> std::io::Result<bool> {
    let mut f = File::open(device)?;
    let mut buf = vec![0u8; 4 << 20];
    let mut carry: Vec<u8> = Vec::new();
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(false);
        }
        carry.extend_from_slice(&buf[..n]);
        if memchr::memmem::find(&carry, needle).is_some() {
            return Ok(true);
        }
        let keep = carry.len().min(needle.len() - 1);
        carry.drain(..carry.len() - keep);
    }
}

fn sha256_of(device: &Path) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    let mut f = File::open(device)?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

async fn round_trip(ctx: &mut Ctx) -> CaseResult {
    let disk = ctx.disk()?;
    let (key_id, key) = format(&disk, Integrity::None).await?;
    let header = check!(crypt::read_header(&disk).await);
    ensure!(
        header.key_id == key_id,
        "header UUID {} != key id {}",
        header.key_id,
        key_id
    );
    ensure!(
        header.token.as_ref().map(|t| t.key_version) == Some(1),
        "token: {:?}",
        header.token
    );

    let name = MapperName::for_volume("vm:round-trip");
    let opened = check!(crypt::open(&disk, &name, &key, &OpenOptions::default()).await);
    ensure!(opened == Opened::Activated, "first open: {opened:?}");
    let mapped = name.device_path();
    let data = marker("round-trip");
    check!(write_block(&mapped, 8192, &data));
    ensure!(
        check!(crypt::close(&name).await) == Closed::Deactivated,
        "close"
    );
    ensure!(
        !mapped.exists(),
        "{} still exists after close",
        mapped.display()
    );

    ensure!(
        !check!(device_contains(&disk, &data[..64])),
        "the raw disk holds the plaintext marker"
    );

    ensure!(
        check!(crypt::open(&disk, &name, &key, &OpenOptions::default()).await) == Opened::Activated,
        "reopen"
    );
    let back = check!(read_block(&mapped, 8192, data.len()));
    ensure!(
        back == data,
        "the marker did not read back through the reopened mapping"
    );
    check!(crypt::close(&name).await);
    Ok(())
}

async fn wrong_key(ctx: &mut Ctx) -> CaseResult {
    let disk = ctx.disk()?;
    let (_, _) = format(&disk, Integrity::None).await?;
    let other = key_for(&KeyId::new_random());
    let name = MapperName::for_volume("vm:wrong-key");
    match crypt::open(&disk, &name, &other, &OpenOptions::default()).await {
        Err(Error::WrongKey { device }) => {
            ensure!(device == disk, "error names {}", device.display());
            let msg = Error::WrongKey { device }.to_string();
            ensure!(msg.contains("does not open any keyslot"), "message: {msg}");
        }
        other => return Err(format!("expected WrongKey, got {other:?}")),
    }
    ensure!(
        check!(crypt::status(&name).await).is_none(),
        "a mapping exists after a failed open"
    );
    match crypt::verify_key(&disk, &other).await {
        Err(Error::WrongKey { .. }) => Ok(()),
        other => Err(format!("verify_key with the wrong key: {other:?}")),
    }
}

async fn open_twice(ctx: &mut Ctx) -> CaseResult {
    let disk = ctx.disk()?;
    let (_, key) = format(&disk, Integrity::None).await?;
    check!(crypt::verify_key(&disk, &key).await);
    let name = MapperName::for_volume("vm:open-twice");
    let opts = OpenOptions::default();
    ensure!(
        check!(crypt::open(&disk, &name, &key, &opts).await) == Opened::Activated,
        "first"
    );
    ensure!(
        check!(crypt::open(&disk, &name, &key, &opts).await) == Opened::AlreadyOpen,
        "second"
    );
    let st = check!(crypt::status(&name).await).ok_or("status: not open")?;
    ensure!(st.cipher == "aes-xts-plain64", "cipher {}", st.cipher);
    ensure!(
        st.bypass_workqueues,
        "workqueue bypass from the header is not active: {st:?}"
    );
    ensure!(
        !st.integrity && !st.allow_discards && !st.read_only,
        "{st:?}"
    );
    let disk_size = check!(File::open(&disk).and_then(|mut f| f.seek(SeekFrom::End(0))));
    let expected = disk_size - crypt::LUKS2_HEADER_BYTES;
    ensure!(
        st.size_bytes == expected,
        "size {} != {expected}",
        st.size_bytes
    );
    ensure!(
        std::fs::canonicalize(&st.device).ok() == std::fs::canonicalize(&disk).ok(),
        "status device {} is not {}",
        st.device.display(),
        disk.display()
    );
    ensure!(
        check!(crypt::close(&name).await) == Closed::Deactivated,
        "close"
    );
    ensure!(
        check!(crypt::close(&name).await) == Closed::WasAbsent,
        "second close"
    );
    Ok(())
}

async fn close_absent(_ctx: &mut Ctx) -> CaseResult {
    let name = MapperName::for_volume("vm:never-opened");
    ensure!(
        check!(crypt::close(&name).await) == Closed::WasAbsent,
        "close"
    );
    ensure!(check!(crypt::status(&name).await).is_none(), "status");
    Ok(())
}

async fn conflict(ctx: &mut Ctx) -> CaseResult {
    let (a, b) = (ctx.disk()?, ctx.disk()?);
    let (_, key_a) = format(&a, Integrity::None).await?;
    let (_, key_b) = format(&b, Integrity::None).await?;
    let name = MapperName::for_volume("vm:conflict");
    check!(crypt::open(&a, &name, &key_a, &OpenOptions::default()).await);
    let result = crypt::open(&b, &name, &key_b, &OpenOptions::default()).await;
    check!(crypt::close(&name).await);
    match result {
        Err(Error::MappingConflict { .. }) => Ok(()),
        other => Err(format!("expected MappingConflict, got {other:?}")),
    }
}

async fn integrity_round_trip(ctx: &mut Ctx) -> CaseResult {
    let disk = ctx.disk()?;
    let (_, key) = format(&disk, Integrity::HmacSha256 { journal: false }).await?;
    let json = check!(crypt::header::read_validated(&disk));
    let integrity = &json["segments"]["0"]["integrity"]["type"];
    ensure!(integrity == "hmac(sha256)", "segment integrity {integrity}");
    ensure!(
        json["keyslots"]["0"]["key_size"] == 96,
        "key size: {}",
        json["keyslots"]["0"]
    );
    let flags = json["config"]["flags"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    ensure!(
        flags.contains(&"no-journal".into()),
        "persistent flags {flags:?}"
    );
    let name = MapperName::for_volume("vm:integrity");
    check!(crypt::open(&disk, &name, &key, &OpenOptions::default()).await);
    let st = check!(crypt::status(&name).await).ok_or("status: not open")?;
    ensure!(
        st.integrity,
        "no dm-integrity device under the mapping: {st:?}"
    );
    // Whole 4 KiB sectors only: a partial write would read the unwiped tag first.
    let data = marker("integrity");
    let mapped = name.device_path();
    check!(write_block(&mapped, 0, &data));
    // Reading a sector whose tag was never written fails: dm-integrity is checking.
    let unwritten = read_block(&mapped, 1 << 20, 4096);
    ensure!(
        unwritten.is_err(),
        "an unwritten sector read back without an integrity error"
    );
    check!(crypt::close(&name).await);
    let dif = format!("/dev/mapper/{}_dif", name.as_str());
    ensure!(!Path::new(&dif).exists(), "{dif} is left after close");
    check!(crypt::open(&disk, &name, &key, &OpenOptions::default()).await);
    let back = check!(read_block(&mapped, 0, data.len()));
    check!(crypt::close(&name).await);
    ensure!(
        back == data,
        "the marker did not read back through dm-integrity"
    );
    ensure!(
        !check!(device_contains(&disk, &data[..64])),
        "plaintext on the raw disk"
    );

    // Rotation holds two keyslots at once, each the largest we write (a volume
    // key with its integrity key): both fit in the keyslots area, twice over.
    let keyslots_size = &json["config"]["keyslots_size"];
    ensure!(
        keyslots_size.as_str() == Some(crypt::LUKS2_KEYSLOTS_BYTES.to_string().as_str()),
        "keyslots_size {keyslots_size}"
    );
    let mut old = key;
    for version in 2..=3u32 {
        let new = check!(derive_data_key(&[version as u8; 32], &SALT, "rotation", 32));
        check!(
            crypt::rotate(
                &disk,
                &old,
                &new,
                version,
                cryptdisk_csi::kms::Derivation::V1
            )
            .await
        );
        old = new;
    }
    check!(crypt::open(&disk, &name, &old, &OpenOptions::default()).await);
    let back = check!(read_block(&mapped, 0, data.len()));
    check!(crypt::close(&name).await);
    ensure!(back == data, "the marker did not survive two rotations");
    Ok(())
}

async fn non_blank(ctx: &mut Ctx) -> CaseResult {
    let disk = ctx.disk()?;
    check!(write_block(&disk, 300 * 1024, b"someone's data"));
    let before = check!(sha256_of(&disk));
    match crypt::probe_blank(&disk) {
        Err(Error::NotBlank { reason, .. }) => {
            ensure!(reason.contains("byte 307200"), "reason: {reason}")
        }
        other => return Err(format!("expected NotBlank, got {other:?}")),
    }
    ensure!(
        check!(sha256_of(&disk)) == before,
        "the probe changed the device"
    );
    Ok(())
}
