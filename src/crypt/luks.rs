//! The blocking libcryptsetup calls behind [`super`]'s front door. Every function
//! makes its own context and drops it before returning.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use libcryptsetup_rs::consts::flags::{CryptActivate, CryptDeactivate, CryptPbkdf, CryptVolumeKey};
use libcryptsetup_rs::consts::vals::{
    CryptKdf, CryptStatusInfo, EncryptionFormat, KeyslotsSize, MetadataSize,
};
use libcryptsetup_rs::{
    CryptDevice, CryptInit, CryptParamsLuks2, CryptParamsLuks2Ref, CryptPbkdfType, Either,
    LibcryptErr, TokenInput,
};

use super::{
    CIPHER, CIPHER_MODE, Closed, Error, FormatOptions, HeaderInfo, INTEGRITY_ALGORITHM,
    INTEGRITY_KEY_BYTES, Integrity, KeyId, LUKS2_HEADER_BYTES, LUKS2_KEYSLOTS_BYTES,
    LUKS2_METADATA_BYTES, MapperName, MappingStatus, OpenOptions, Opened, PBKDF_ITERATIONS, Result,
    SECTOR_SIZE, TOKEN_TYPE, Token, VOLUME_KEY_BYTES,
};
use crate::kms::DataKey;

/// LUKS2 holds at most this many tokens.
const MAX_TOKENS: u32 = 32;

/// Maps a libcryptsetup error to ours, keeping the errno when there is one.
fn lib(op: &'static str, target: impl std::fmt::Display) -> impl FnOnce(LibcryptErr) -> Error {
    let target = target.to_string();
    move |err| match err {
        LibcryptErr::IOError(source) => Error::Io { op, target, source },
        other => Error::Libcrypt {
            op,
            target,
            message: other.to_string(),
        },
    }
}

fn errno_of(err: &LibcryptErr) -> Option<i32> {
    match err {
        LibcryptErr::IOError(e) => e.raw_os_error(),
        _ => None,
    }
}

fn pbkdf() -> CryptPbkdfType {
    CryptPbkdfType {
        type_: CryptKdf::Pbkdf2,
        hash: Some("sha256".to_string()),
        time_ms: 0,
        iterations: PBKDF_ITERATIONS,
        max_memory_kb: 0,
        parallel_threads: 0,
        flags: CryptPbkdf::NO_BENCHMARK,
    }
}

/// A context on `device` with its LUKS2 header loaded.
fn load_luks2(device: &Path) -> Result<CryptDevice> {
    let target = device.display();
    let mut cd = CryptInit::init(device).map_err(lib("open device", &target))?;
    cd.context_handle()
        .load::<CryptParamsLuks2Ref<'_>>(Some(EncryptionFormat::Luks2), None)
        .map_err(|err| match errno_of(&err) {
            Some(libc::EINVAL) | Some(libc::ENOENT) => Error::NotLuks2 {
                device: device.to_path_buf(),
            },
            _ => lib("load LUKS2 header", &target)(err),
        })?;
    Ok(cd)
}

/// A header area copied into an anonymous memory file, which libcryptsetup
/// opens by its `/proc/self/fd` path as a detached header.
struct DetachedHeader {
    /// Held open for as long as libcryptsetup may read it by its path.
    _file: std::fs::File,
    path: PathBuf,
}

impl DetachedHeader {
    fn new(bytes: &[u8]) -> std::io::Result<Self> {
        use std::io::Write;
        use std::os::fd::AsRawFd;
        let fd = nix::sys::memfd::memfd_create(
            c"cryptdisk-header",
            nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
        )
        .map_err(std::io::Error::from)?;
        let mut file = std::fs::File::from(fd);
        file.write_all(bytes)?;
        let path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        Ok(DetachedHeader { _file: file, path })
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

/// Lets libcryptsetup rewrite the older copy of a torn header: its load with
/// write access does that, from the copy it takes, which must be the one we
/// validated.
pub fn repair(device: &Path, header: &super::header::Header) -> Result<()> {
    let mut cd = load_luks2(device)?;
    loaded_is_validated(&mut cd, device, header)
}

/// The metadata and UUID libcryptsetup loads from `device` (a file will do),
/// read only: for holding our reader against libcryptsetup's in tests and the
/// differential fuzz target.
pub fn loaded_metadata(device: &Path) -> Result<(serde_json::Value, String)> {
    let mut cd = load_luks2(device)?;
    let json = cd
        .status_handle()
        .dump_json()
        .map_err(lib("read the loaded LUKS2 metadata", device.display()))?;
    let uuid = cd
        .status_handle()
        .get_uuid()
        .map_err(lib("read UUID", device.display()))?;
    Ok((json, uuid.hyphenated().to_string()))
}

/// The device's header, read and validated.
fn validated(device: &Path) -> Result<super::header::Header> {
    let header = super::header::read(device)?;
    super::header::validate_header(&header).map_err(|reason| Error::BadHeader {
        device: device.to_path_buf(),
        reason,
    })?;
    Ok(header)
}

/// Checks that the metadata libcryptsetup loaded into `cd` is the metadata
/// this driver validated (the same JSON, the same UUID), right before a key
/// is used on that context: a header that changed between our read and
/// libcryptsetup's, or that the two parsers read differently, is refused.
fn loaded_is_validated(
    cd: &mut CryptDevice,
    device: &Path,
    header: &super::header::Header,
) -> Result<()> {
    let bad = |reason: String| Error::BadHeader {
        device: device.to_path_buf(),
        reason,
    };
    let loaded = cd
        .status_handle()
        .dump_json()
        .map_err(lib("read the loaded LUKS2 metadata", device.display()))?;
    if loaded != header.json {
        return Err(bad(
            "libcryptsetup loaded other metadata than the header that was validated".to_string(),
        ));
    }
    let uuid = cd
        .status_handle()
        .get_uuid()
        .map_err(lib("read UUID", device.display()))?;
    if !uuid
        .hyphenated()
        .to_string()
        .eq_ignore_ascii_case(&header.uuid)
    {
        return Err(bad(format!(
            "libcryptsetup loaded UUID {uuid}, the validated header has {}",
            header.uuid
        )));
    }
    Ok(())
}

/// Formats `device` (a `/proc/self/fd` path of the probed device, see
/// [`super::BlankDevice::reopen_for_format`]); errors name `shown`, the device's
/// own path.
pub fn format(device: &Path, shown: &Path, key: &DataKey, opts: &FormatOptions) -> Result<()> {
    let target = shown.display();
    if key.is_empty() {
        return Err(Error::KeyLength {
            expected: crate::kms::DEFAULT_KEY_LEN,
            found: 0,
        });
    }
    let mut cd = CryptInit::init(device).map_err(lib("open device", &target))?;
    let (integrity, volume_key_bytes) = match opts.integrity {
        Integrity::None => (None, VOLUME_KEY_BYTES),
        Integrity::HmacSha256 { .. } => (
            Some(INTEGRITY_ALGORITHM.to_string()),
            VOLUME_KEY_BYTES + INTEGRITY_KEY_BYTES,
        ),
    };
    let params = CryptParamsLuks2 {
        pbkdf: Some(pbkdf()),
        integrity,
        integrity_params: None,
        data_alignment: 0,
        data_device: None,
        sector_size: SECTOR_SIZE,
        // Marks the header as ours from its first write, so that a format cut
        // short before the token can be told from another tool's header.
        label: Some(super::LABEL.to_string()),
        subsystem: None,
    };
    let mut params_ref: CryptParamsLuks2Ref<'_> =
        (&params).try_into().map_err(lib("format", &target))?;
    // A small keyslots area (random-filled by the format) inside the usual 16 MiB
    // header area, so that the data offset stays where capacity planning and
    // stock tools expect it.
    cd.settings_handle()
        .set_metadata_size(
            MetadataSize::try_from(LUKS2_METADATA_BYTES).map_err(lib("format", &target))?,
            KeyslotsSize::try_from(LUKS2_KEYSLOTS_BYTES).map_err(lib("format", &target))?,
        )
        .map_err(lib("set metadata size", &target))?;
    cd.set_data_offset(LUKS2_HEADER_BYTES / 512)
        .map_err(lib("set data offset", &target))?;
    // A random volume key from the kernel RNG: libcryptsetup generates it when
    // given only its length.
    cd.context_handle()
        .format(
            EncryptionFormat::Luks2,
            (CIPHER, CIPHER_MODE),
            Some(opts.key_id.uuid()),
            Either::Right(volume_key_bytes),
            Some(&mut params_ref),
        )
        .map_err(lib("format", &target))?;
    // Each libcryptsetup write of the header is a point where a crash leaves
    // another partial format (the power-loss tier stops the machine at each).
    crate::failpoint::hit("format:header-written");
    let keyslot = cd
        .keyslot_handle()
        .add_by_key(None, None, key.expose(), CryptVolumeKey::empty())
        .map_err(lib("add keyslot", &target))?;
    crate::failpoint::hit("format:keyslot-added");

    let mut flags = CryptActivate::empty();
    if opts.bypass_workqueues {
        flags |= CryptActivate::NO_READ_WORKQUEUE | CryptActivate::NO_WRITE_WORKQUEUE;
    }
    if opts.integrity == (Integrity::HmacSha256 { journal: false }) {
        flags |= CryptActivate::NO_JOURNAL;
    }
    if !flags.is_empty() {
        cd.luks2_flag_handle::<CryptActivate>()
            .persistent_flags_set(flags)
            .map_err(lib("set persistent flags", &target))?;
    }

    crate::failpoint::hit("format:before-token");
    // The token goes last: a header without it is a format that did not finish.
    let mut token = serde_json::json!({
        "type": TOKEN_TYPE,
        "keyslots": [keyslot.to_string()],
        "key_id": opts.token.key_id,
        "key_version": opts.token.key_version,
        "kms": opts.token.kms,
    });
    if opts.integrity != Integrity::None {
        // Nothing has been written through dm-integrity yet.
        token["wipe_offset"] = serde_json::Value::from(0u64);
    }
    // v1 is the field's absence (what drivers before v2 wrote and read).
    if let Some(derivation) = opts
        .token
        .derivation
        .filter(|d| *d != super::Derivation::V1)
    {
        token["derivation"] = serde_json::Value::from(derivation.as_str());
    }
    cd.token_handle()
        .json_set(TokenInput::AddToken(&token))
        .map_err(lib("write token", &target))?;
    Ok(())
}

pub fn read_header(device: &Path) -> Result<HeaderInfo> {
    let mut cd = load_luks2(device)?;
    let target = device.display();
    let uuid = cd
        .status_handle()
        .get_uuid()
        .map_err(lib("read UUID", &target))?;
    let key_id = KeyId::parse(&uuid.hyphenated().to_string())?;
    let mut token = None;
    for slot in 0..MAX_TOKENS {
        // An empty token slot is an error from libcryptsetup; skip it.
        let Ok(json) = cd.token_handle().json_get(slot) else {
            continue;
        };
        if json.get("type").and_then(|t| t.as_str()) != Some(TOKEN_TYPE) {
            continue;
        }
        let parsed: Token = serde_json::from_value(json).map_err(|e| Error::BadToken {
            device: device.to_path_buf(),
            reason: e.to_string(),
        })?;
        if token.replace(parsed).is_some() {
            return Err(Error::BadToken {
                device: device.to_path_buf(),
                reason: "more than one cryptdisk token".to_string(),
            });
        }
    }
    Ok(HeaderInfo { key_id, token })
}

pub fn set_content(device: &Path, content: &str) -> Result<()> {
    update_token(device, |token| {
        token["content"] = serde_json::Value::from(content);
    })
}

pub fn set_wipe_offset(device: &Path, offset: Option<u64>) -> Result<()> {
    update_token(device, |token| match (offset, token.as_object_mut()) {
        (Some(offset), _) => token["wipe_offset"] = serde_json::Value::from(offset),
        (None, Some(fields)) => {
            fields.remove("wipe_offset");
        }
        (None, None) => {}
    })
}

/// Rewrites our token in place; libcryptsetup writes both header copies.
pub(super) fn update_token(
    device: &Path,
    change: impl FnOnce(&mut serde_json::Value),
) -> Result<()> {
    let mut cd = load_luks2(device)?;
    let target = device.display();
    for slot in 0..MAX_TOKENS {
        let Ok(mut json) = cd.token_handle().json_get(slot) else {
            continue;
        };
        if json.get("type").and_then(|t| t.as_str()) != Some(TOKEN_TYPE) {
            continue;
        }
        change(&mut json);
        cd.token_handle()
            .json_set(TokenInput::ReplaceToken(slot, &json))
            .map_err(lib("update token", &target))?;
        return Ok(());
    }
    Err(Error::BadToken {
        device: device.to_path_buf(),
        reason: "no cryptdisk token to update".to_string(),
    })
}

pub fn verify_key(device: &Path, key: &DataKey) -> Result<()> {
    key_slot(device, key).map(|_| ())
}

/// The keyslot `key` opens, checked without activating anything.
pub fn key_slot(device: &Path, key: &DataKey) -> Result<u32> {
    let header = validated(device)?;
    let mut cd = load_luks2(device)?;
    loaded_is_validated(&mut cd, device, &header)?;
    cd.activate_handle()
        .activate_by_passphrase(None, None, key.expose(), CryptActivate::empty())
        .map_err(|err| wrong_key_or(device, "check key", err))
}

fn wrong_key_or(device: &Path, op: &'static str, err: LibcryptErr) -> Error {
    if errno_of(&err) == Some(libc::EPERM) {
        Error::WrongKey {
            device: device.to_path_buf(),
        }
    } else {
        lib(op, device.display())(err)
    }
}

pub fn open(device: &Path, name: &MapperName, key: &DataKey, opts: &OpenOptions) -> Result<Opened> {
    if let Some(existing) = status(name)? {
        return if same_device(&existing.device, device)? {
            Ok(Opened::AlreadyOpen)
        } else {
            Err(Error::MappingConflict {
                name: name.clone(),
                expected: device.to_path_buf(),
                found: existing.device,
            })
        };
    }
    // Nothing the header says is trusted before it passes our whitelist, and
    // what is activated is the very bytes that passed: a copy of the header
    // area in memory, used as a detached header, whatever the device holds by
    // now. Activation never writes to the device's header either.
    let snap = super::header::snapshot(device)?;
    let copy = DetachedHeader::new(snap.image()).map_err(|source| Error::Io {
        op: "copy the LUKS2 header into memory",
        target: device.display().to_string(),
        source,
    })?;
    let target = device.display();
    let mut cd = CryptInit::init_with_data_device(Either::Right((copy.path(), device)))
        .map_err(lib("open device", &target))?;
    cd.context_handle()
        .load::<CryptParamsLuks2Ref<'_>>(Some(EncryptionFormat::Luks2), None)
        .map_err(lib("load LUKS2 header", &target))?;
    loaded_is_validated(&mut cd, device, &snap.header)?;
    // Persistent flags from the header (workqueue bypass, no journal) are added
    // by libcryptsetup itself.
    let mut flags = CryptActivate::empty();
    if opts.allow_discards {
        flags |= CryptActivate::ALLOW_DISCARDS;
    }
    if opts.read_only {
        flags |= CryptActivate::READONLY;
    }
    let activated =
        cd.activate_handle()
            .activate_by_passphrase(Some(name.as_str()), None, key.expose(), flags);
    // libcryptsetup 2.6 hands the volume key to dm-crypt through this thread's
    // keyring and leaves it there after a successful activation (it drops it
    // only on failure); dm-crypt holds its own copy from the table load, and
    // this worker thread lives on, so the key is dropped here.
    drop_thread_keyring();
    match activated {
        Ok(_) => Ok(Opened::Activated),
        // Another opener won a race: same outcome if it is our device.
        Err(err) if errno_of(&err) == Some(libc::EEXIST) => {
            drop(cd);
            open(device, name, key, opts)
        }
        Err(err) => Err(wrong_key_or(device, "activate", err)),
    }
}

pub fn close(name: &MapperName) -> Result<Closed> {
    if !is_active(name)? {
        return Ok(Closed::WasAbsent);
    }
    let mut cd = CryptInit::init_by_name_and_header(name.as_str(), None)
        .map_err(lib("find mapping", name))?;
    match cd
        .activate_handle()
        .deactivate(name.as_str(), CryptDeactivate::empty())
    {
        Ok(()) => Ok(Closed::Deactivated),
        Err(err) if errno_of(&err) == Some(libc::EBUSY) => Err(Error::Busy { name: name.clone() }),
        Err(err) if errno_of(&err) == Some(libc::ENODEV) => Ok(Closed::WasAbsent),
        Err(err) => Err(lib("deactivate", name)(err)),
    }
}

fn is_active(name: &MapperName) -> Result<bool> {
    let state = libcryptsetup_rs::status(None, name.as_str()).map_err(lib("status", name))?;
    Ok(matches!(
        state,
        CryptStatusInfo::Active | CryptStatusInfo::Busy
    ))
}

/// A context on the active mapping `name`, and the device under it.
fn by_name(name: &MapperName) -> Result<(CryptDevice, PathBuf)> {
    let mut cd = CryptInit::init_by_name_and_header(name.as_str(), None)
        .map_err(lib("find mapping", name))?;
    let device = cd
        .status_handle()
        .get_device_path()
        .map_err(lib("read device", name))?
        .to_path_buf();
    Ok((cd, device))
}

pub fn status(name: &MapperName) -> Result<Option<MappingStatus>> {
    if !is_active(name)? {
        return Ok(None);
    }
    let (mut cd, device) = by_name(name)?;
    let cipher = format!(
        "{}-{}",
        cd.status_handle()
            .get_cipher()
            .map_err(lib("read cipher", name))?,
        cd.status_handle()
            .get_cipher_mode()
            .map_err(lib("read cipher mode", name))?
    );
    let active = cd
        .runtime_handle(name.as_str())
        .get_active_device()
        .map_err(lib("read mapping", name))?;
    let flags = active.flags;
    let integrity_device = PathBuf::from(format!("/dev/mapper/{}_dif", name.as_str()));
    Ok(Some(MappingStatus {
        device,
        size_bytes: active.size * 512,
        cipher,
        read_only: flags.contains(CryptActivate::READONLY),
        bypass_workqueues: flags
            .contains(CryptActivate::NO_READ_WORKQUEUE | CryptActivate::NO_WRITE_WORKQUEUE),
        allow_discards: flags.contains(CryptActivate::ALLOW_DISCARDS),
        integrity: integrity_device.exists(),
    }))
}

/// Grows the open mapping `name` to fill its (grown) device. The table reload
/// needs the volume key: `key` unlocks it from the keyslot into this thread's
/// keyring for the reload, so nothing depends on a key left in the kernel
/// keyring since the open. Returns the mapping's new size in bytes.
pub fn resize(name: &MapperName, key: &DataKey) -> Result<u64> {
    let (mut cd, device) = by_name(name)?;
    let header = validated(&device)?;
    cd.context_handle()
        .load::<CryptParamsLuks2Ref<'_>>(Some(EncryptionFormat::Luks2), None)
        .map_err(lib("load LUKS2 header", device.display()))?;
    loaded_is_validated(&mut cd, &device, &header)?;
    cd.activate_handle()
        .activate_by_passphrase(None, None, key.expose(), CryptActivate::KEYRING_KEY)
        .map_err(|err| wrong_key_or(&device, "unlock volume key", err))?;
    let resized = cd
        .context_handle()
        .resize(name.as_str(), 0)
        .map_err(lib("resize mapping", name));
    // The unlock put the volume key into this worker thread's keyring for the
    // table reload; the mapping holds it now, so drop it from the keyring.
    drop_thread_keyring();
    resized?;
    let active = cd
        .runtime_handle(name.as_str())
        .get_active_device()
        .map_err(lib("read mapping", name))?;
    Ok(active.size * 512)
}

/// Empties the calling thread's keyring, where libcryptsetup loads a volume
/// key for a table reload (`KEYCTL_CLEAR` on `KEY_SPEC_THREAD_KEYRING`). A
/// thread without a keyring has nothing to drop.
pub(super) fn drop_thread_keyring() {
    const KEYCTL_CLEAR: libc::c_long = 7;
    const KEY_SPEC_THREAD_KEYRING: libc::c_long = -1;
    // SAFETY: keyctl(KEYCTL_CLEAR, keyring) takes two integers.
    let r = unsafe { libc::syscall(libc::SYS_keyctl, KEYCTL_CLEAR, KEY_SPEC_THREAD_KEYRING) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ENOKEY) {
            tracing::debug!(error = %e, "clearing the thread keyring");
        }
    }
}

/// See [`super::rotate`]. Each pass of the loop reads the header afresh and
/// takes the next step from the state the token records.
pub fn rotate(
    device: &Path,
    old_key: &DataKey,
    new_key: &DataKey,
    to_version: u32,
    to_derivation: super::Derivation,
) -> Result<()> {
    use super::{Derivation, Rotation};
    use crate::failpoint::hit;
    let target = device.display().to_string();
    let bad = |reason: String| Error::BadToken {
        device: device.to_path_buf(),
        reason,
    };
    for _ in 0..8 {
        let header = validated(device)?;
        let json = &header.json;
        let slots: std::collections::BTreeSet<u32> = json["keyslots"]
            .as_object()
            .map(|o| o.keys().filter_map(|k| k.parse().ok()).collect())
            .unwrap_or_default();
        let token = read_header(device)?
            .token
            .ok_or_else(|| bad("no cryptdisk token".into()))?;
        let token_slots: Vec<String> = json["tokens"]
            .as_object()
            .and_then(|t| t.values().next())
            .and_then(|t| t["keyslots"].as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        match token.rotation {
            None if token.key_version == to_version && token.derivation() == to_derivation => {
                return Ok(());
            }
            None => {
                let free = (0..32u32)
                    .find(|n| !slots.contains(n))
                    .ok_or_else(|| bad("no free keyslot".into()))?;
                update_token(device, |t| {
                    t["rotation"] = serde_json::json!({
                        "phase": "adding", "keyslot": free.to_string(), "to_version": to_version,
                    });
                    // Written for v2 only: a v1 rotation's record stays the one
                    // older drivers know how to finish.
                    if to_derivation != Derivation::V1 {
                        t["rotation"]["to_derivation"] =
                            serde_json::Value::from(to_derivation.as_str());
                    }
                })?;
                hit("rotate:intent");
            }
            Some(Rotation::Adding {
                keyslot,
                to_version: aimed,
                to_derivation: aimed_derivation,
            }) => {
                let slot: u32 = keyslot
                    .parse()
                    .map_err(|_| bad(format!("rotation keyslot {keyslot:?}")))?;
                let mut cd = load_luks2(device)?;
                loaded_is_validated(&mut cd, device, &header)?;
                let opens = |cd: &mut CryptDevice| {
                    cd.activate_handle()
                        .activate_by_passphrase(
                            None,
                            Some(slot),
                            new_key.expose(),
                            CryptActivate::empty(),
                        )
                        .is_ok()
                };
                let other_target = aimed != to_version
                    || aimed_derivation.unwrap_or(Derivation::V1) != to_derivation;
                if other_target || (slots.contains(&slot) && !opens(&mut cd)) {
                    // Another target, or a keyslot half made: start this one again.
                    if slots.contains(&slot) {
                        cd.keyslot_handle()
                            .destroy(slot)
                            .map_err(lib("destroy keyslot", &target))?;
                    }
                    update_token(device, |t| {
                        if let Some(o) = t.as_object_mut() {
                            o.remove("rotation");
                        }
                    })?;
                    continue;
                }
                if !slots.contains(&slot) {
                    cd.settings_handle()
                        .set_pbkdf_type(&pbkdf())
                        .map_err(lib("set PBKDF", &target))?;
                    cd.keyslot_handle()
                        .add_by_passphrase(Some(slot), old_key.expose(), new_key.expose())
                        .map_err(|err| wrong_key_or(device, "add keyslot", err))?;
                    hit("rotate:added");
                    let mut check = load_luks2(device)?;
                    if !opens(&mut check) {
                        return Err(bad(format!(
                            "the new keyslot {slot} does not open with its key"
                        )));
                    }
                }
                let retiring: Vec<String> = token_slots
                    .iter()
                    .filter(|s| **s != keyslot)
                    .cloned()
                    .collect();
                update_token(device, |t| {
                    t["key_version"] = serde_json::Value::from(to_version);
                    match (to_derivation, t.as_object_mut()) {
                        (Derivation::V1, Some(fields)) => {
                            fields.remove("derivation");
                        }
                        (Derivation::V1, None) => {}
                        (v2, _) => t["derivation"] = serde_json::Value::from(v2.as_str()),
                    }
                    t["keyslots"] = serde_json::json!([keyslot]);
                    t["rotation"] = serde_json::json!({"phase": "retiring", "keyslots": retiring});
                })?;
                hit("rotate:switched");
            }
            Some(Rotation::Retiring { keyslots }) => {
                let mut cd = load_luks2(device)?;
                loaded_is_validated(&mut cd, device, &header)?;
                for old in &keyslots {
                    if let Ok(n) = old.parse::<u32>()
                        && slots.contains(&n)
                    {
                        cd.keyslot_handle()
                            .destroy(n)
                            .map_err(lib("destroy keyslot", &target))?;
                    }
                }
                hit("rotate:destroyed");
                update_token(device, |t| {
                    if let Some(o) = t.as_object_mut() {
                        o.remove("rotation");
                    }
                })?;
            }
        }
    }
    Err(bad("the rotation did not settle".into()))
}

/// Whether two paths name the same block device (by device number), so that
/// `/dev/vda` and a symlink to it compare equal.
fn same_device(a: &Path, b: &Path) -> Result<bool> {
    let rdev = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.rdev())
            .map_err(|source| Error::Io {
                op: "stat",
                target: p.display().to_string(),
                source,
            })
    };
    Ok(rdev(a)? == rdev(b)?)
}
