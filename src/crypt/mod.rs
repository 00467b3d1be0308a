//! The only module that touches libcryptsetup: how volumes are formatted and opened.
//!
//! A small front door over private blocking code: [`format`], [`open`], [`close`],
//! [`status`] and [`read_header`]. Each call runs on tokio's blocking pool with a
//! fresh libcryptsetup context, checks what is already true before acting (so a
//! retry after a crash finishes the work), and takes key bytes only as a
//! [`DataKey`], which is wiped on drop and has no `Debug`.

mod blank;
pub mod header;
mod log;
mod luks;
pub mod wipe;

use std::fmt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use uuid::Uuid;

pub use blank::{BlankDevice, probe_blank};

use crate::kms::DataKey;
pub use crate::kms::Derivation;

/// Bytes the LUKS2 header (metadata and keyslot areas) occupies at the start of a
/// device; data starts after it.
pub const LUKS2_HEADER_BYTES: u64 = 16 * 1024 * 1024;
/// Size of each of the two copies of the LUKS2 metadata (binary header and JSON
/// area), libcryptsetup's default.
pub const LUKS2_METADATA_BYTES: u64 = 16 * 1024;
/// Bytes of the header area that hold keyslots. libcryptsetup fills its default
/// (all of the 16 MiB after the metadata) with random data at every format, which
/// under emulation cost ~0.2 s of a ~0.5 s format. A keyslot of ours takes
/// 4000 anti-forensic stripes of the key, 252 KiB (376 KiB with an integrity
/// key), so 2 MiB holds five of the largest while rotation needs two at once; the
/// rest of the header area, up to the data at [`LUKS2_HEADER_BYTES`], is zeros.
/// Headers written with the default area (earlier versions) remain valid.
pub const LUKS2_KEYSLOTS_BYTES: u64 = 2 * 1024 * 1024;
/// Encryption sector size: 4K I/O units, fewer crypto operations per byte.
pub const SECTOR_SIZE: u32 = 4096;
/// Cipher and mode of every volume.
pub const CIPHER: &str = "aes";
pub const CIPHER_MODE: &str = "xts-plain64";
/// XTS with two AES-256 keys.
pub const VOLUME_KEY_BYTES: usize = 64;
/// The integrity algorithm of integrity volumes, as dm-integrity names it.
pub const INTEGRITY_ALGORITHM: &str = "hmac(sha256)";
/// hmac(sha256) takes a 256-bit key, appended to the volume key.
pub const INTEGRITY_KEY_BYTES: usize = 32;
/// The passphrase is a random 256-bit key, so stretching adds nothing: pbkdf2 at
/// the minimum iterations libcryptsetup accepts, without its benchmark.
pub const PBKDF_ITERATIONS: u32 = 1000;
/// Type of the LUKS2 token that records where the key comes from.
pub const TOKEN_TYPE: &str = "cryptdisk";
/// LUKS2 label of every header this driver writes.
pub const LABEL: &str = "cryptdisk";

/// Name of a device-mapper mapping this driver owns: `cryptdisk-<hash>`, derived
/// from the volume id so that every node computes the same one, and short enough
/// for device-mapper's 127-character limit whatever the volume id.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct MapperName(String);

impl MapperName {
    pub const PREFIX: &'static str = "cryptdisk-";

    pub fn for_volume(volume_id: &str) -> Self {
        let digest = Sha256::digest(volume_id.as_bytes());
        MapperName(format!("{}{}", Self::PREFIX, &hex::encode(digest)[..32]))
    }

    /// A name an operator chose (recovery): 1 to 127 characters of letters,
    /// digits, `-`, `_` and `.`, not `.` or `..`, so it stays one entry of
    /// `/dev/mapper`.
    pub fn operator(name: &str) -> std::result::Result<Self, String> {
        let ok = !name.is_empty()
            && name.len() <= 127
            && name != "."
            && name != ".."
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if ok {
            Ok(MapperName(name.to_string()))
        } else {
            Err(format!(
                "mapping name {name:?}: expected 1 to 127 letters, digits, '-', '_' or '.'"
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The device node of the mapping when it is open.
    pub fn device_path(&self) -> PathBuf {
        Path::new("/dev/mapper").join(&self.0)
    }
}

impl fmt::Display for MapperName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for MapperName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MapperName({})", self.0)
    }
}

/// The id the KMS derives a volume's key from: the LUKS2 header UUID, lower case.
/// A clone or a restored snapshot carries the same header and so the same key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KeyId(String);

impl KeyId {
    pub fn new_random() -> Self {
        KeyId(Uuid::new_v4().hyphenated().to_string())
    }

    pub fn parse(s: &str) -> Result<Self> {
        let uuid = Uuid::try_parse(s).map_err(|_| Error::BadKeyId(s.to_string()))?;
        Ok(KeyId(uuid.hyphenated().to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn uuid(&self) -> Uuid {
        Uuid::try_parse(&self.0).expect("KeyId holds a parsed UUID")
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What the `cryptdisk` token in a LUKS2 header records.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Token {
    pub key_id: String,
    /// Version of the master secret the keyslot's key was derived from.
    pub key_version: u32,
    /// Which KMS (cluster) the key comes from.
    pub kms: String,
    /// What the volume holds, recorded at its first stage: `block`, or the
    /// filesystem made on it. `None` for a fresh volume, whose mapped content is
    /// noise from decrypting zeros: the one state in which a filesystem is made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// On an integrity volume, the bytes of the mapped device already written
    /// through dm-integrity by the initial wipe; present until the wipe is done.
    /// Until then unwritten sectors carry no valid tags and read as I/O errors.
    /// Formatting sets it to 0 whatever the caller passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wipe_offset: Option<u64>,
    /// A key rotation under way; see [`rotate`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<Rotation>,
    /// How the keyslot's key is derived (DESIGN.md §3). Absent in tokens
    /// written before v2 keys, and then v1 ([`Token::derivation`]); written
    /// only for v2, so a v1 token stays what older drivers read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub derivation: Option<Derivation>,
}

impl Token {
    /// The derivation of the key the token's keyslot opens with.
    pub fn derivation(&self) -> Derivation {
        self.derivation.unwrap_or(Derivation::V1)
    }
}

/// A key rotation in progress, recorded in the token before each step so that a
/// crash anywhere is finished by the next stage. The keyslots it names are the
/// only ones a header may hold beyond those the token lists.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Rotation {
    /// A keyslot for `to_version` is being added at `keyslot` (it may not exist
    /// yet); the token still names the old keyslots and version. The new key's
    /// derivation is `to_derivation`, v1 when absent (written before v2).
    Adding {
        keyslot: String,
        to_version: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to_derivation: Option<Derivation>,
    },
    /// The token names the new keyslot and version; `keyslots`, the old ones,
    /// are being destroyed.
    Retiring { keyslots: Vec<String> },
}

/// The token fields beside `type`, `keyslots`, `key_id`, `key_version` and
/// `kms` that a header may hold (see [`Token`]); the header whitelist refuses any
/// other.
pub const TOKEN_OPTIONAL_FIELDS: &[&str] = &["content", "wipe_offset", "rotation", "derivation"];

/// Values [`Token::content`] may hold.
pub const CONTENT_VALUES: [&str; 3] = ["block", "ext4", "xfs"];

/// Integrity protection of a volume's sectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Integrity {
    /// Plain dm-crypt.
    None,
    /// aes-xts-plain64 with hmac(sha256) tags through dm-integrity. Without the
    /// journal a torn write reads back as an I/O error rather than garbage.
    HmacSha256 { journal: bool },
}

/// How a volume is formatted.
#[derive(Clone, Debug)]
pub struct FormatOptions {
    pub key_id: KeyId,
    pub token: Token,
    pub integrity: Integrity,
    /// Bypass dm-crypt's read and write workqueues (stored in the header).
    pub bypass_workqueues: bool,
}

/// Per-open options that are not stored in the header.
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    pub allow_discards: bool,
    pub read_only: bool,
}

/// What [`open`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opened {
    Activated,
    AlreadyOpen,
}

/// What [`close`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Closed {
    Deactivated,
    WasAbsent,
}

/// An open mapping, as device-mapper reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MappingStatus {
    /// The block device under the mapping.
    pub device: PathBuf,
    /// Size of the mapped device in bytes.
    pub size_bytes: u64,
    pub cipher: String,
    pub read_only: bool,
    pub bypass_workqueues: bool,
    pub allow_discards: bool,
    /// Whether a dm-integrity device sits under the mapping.
    pub integrity: bool,
}

/// What the LUKS2 header of a device says, read without any key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderInfo {
    pub key_id: KeyId,
    /// `None` when the header has no `cryptdisk` token: a format that did not
    /// finish, or a header another tool wrote.
    pub token: Option<Token>,
}

/// Failures of crypt operations; each says what was expected and what was found.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{device}: {reason}")]
    NotBlank { device: PathBuf, reason: String },
    #[error("{device} holds no LUKS2 header")]
    NotLuks2 { device: PathBuf },
    #[error("the key does not open any keyslot of {device}")]
    WrongKey { device: PathBuf },
    #[error("mapping {name} is open on {found}, not on {expected}")]
    MappingConflict {
        name: MapperName,
        expected: PathBuf,
        found: PathBuf,
    },
    #[error("mapping {name} is in use and cannot be closed")]
    Busy { name: MapperName },
    #[error("{device}: LUKS2 header refused: {reason}")]
    BadHeader { device: PathBuf, reason: String },
    #[error("{0:?} is not a UUID")]
    BadKeyId(String),
    #[error("the cryptdisk token of {device} is malformed: {reason}")]
    BadToken { device: PathBuf, reason: String },
    #[error("key is {found} bytes; expected {expected}")]
    KeyLength { expected: usize, found: usize },
    #[error("{op} on {target}: {source}")]
    Io {
        op: &'static str,
        target: String,
        source: std::io::Error,
    },
    #[error("{op} on {target}: libcryptsetup: {message}")]
    Libcrypt {
        op: &'static str,
        target: String,
        message: String,
    },
    #[error("crypt worker stopped: {0}")]
    Worker(String),
}

impl Error {
    /// The errno libcryptsetup reported, when it reported one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// [`blocking`], timed into the `crypt_duration_seconds{op}` metric.
async fn timed<T: Send + 'static>(
    op: &'static str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let started = std::time::Instant::now();
    let out = blocking(f).await;
    crate::metrics::global().record_crypt(op, started);
    out
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    log::route_to_tracing();
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Worker(e.to_string()))?
}

/// Formats a blank device as LUKS2 with our parameters, a keyslot for `key`, our
/// persistent activation flags and, last, the `cryptdisk` token, so that a header
/// without the token marks a format that did not finish. The format writes the
/// device the probe read (through its descriptor, after checking that the path
/// still names it), not whatever the path names by then.
pub async fn format(device: BlankDevice, key: &DataKey, opts: &FormatOptions) -> Result<()> {
    let key = key.clone();
    let opts = opts.clone();
    timed("format", move || {
        let shown = device.path().to_path_buf();
        let file = device.reopen_for_format()?;
        luks::format(&blank::fd_path(&file), &shown, &key, &opts)
    })
    .await
}

/// What a device holds, as far as the node is concerned.
#[derive(Debug)]
pub enum DeviceState {
    /// Nothing: it may be formatted.
    Blank(BlankDevice),
    /// Our LUKS2 header, checked against the whitelist.
    Formatted(HeaderInfo),
}

/// Tells a blank device from one of ours and refuses anything else: a device
/// with other data or signatures, a header outside our whitelist. A header we
/// began to write but did not finish (our label, no token yet, and a data area
/// that is still zeros) counts as blank, so a retried stage formats it again.
///
/// `fresh`: the controller recorded that it created this disk empty and this
/// is its first attachment (see `volume::fresh`). Then what a crash left of an
/// interrupted first format, however torn (two copies that disagree, one
/// missing or unreadable, a partial write anywhere in the header area), is
/// redone when a copy of our header (its magic and our label) is still there
/// and the data area reads as zeros (edges and samples): the header area is
/// wiped and the device counts as blank. Without the record, or without any
/// copy of ours (another signature, data), such a device is refused.
pub async fn inspect(device: &Path, fresh: bool) -> Result<DeviceState> {
    let device = device.to_path_buf();
    blocking(move || match inspect_device(&device) {
        Err(refused @ (Error::BadHeader { .. } | Error::NotBlank { .. }))
            if fresh && our_copy_is_there(&device) =>
        {
            let Ok(blank) = blank::probe_unfinished(&device) else {
                return Err(refused);
            };
            tracing::warn!(device = %device.display(), reason = %refused,
                "an interrupted first format on a disk the controller created empty: \
                 wiping its header area and formatting it again");
            blank.wipe_header_area()?;
            Ok(DeviceState::Blank(blank))
        }
        other => other,
    })
    .await
}

/// Whether the device's header area holds a copy of our own header, torn or
/// not ([`header::has_our_copy`]).
fn our_copy_is_there(device: &Path) -> bool {
    std::fs::File::open(device).is_ok_and(|mut f| header::has_our_copy(&mut f))
}

fn inspect_device(device: &Path) -> Result<DeviceState> {
    let device = device.to_path_buf();
    {
        let header = match header::read(&device) {
            Err(Error::NotLuks2 { .. }) => {
                // Refused as not blank: it may still be our own format, cut off
                // after its keyslots area was filled and before any header.
                return probe_blank(&device)
                    .or_else(|refusal| match refusal {
                        Error::NotBlank { .. } => {
                            blank::probe_keyslots_filled(&device).map_err(|_| refusal)
                        }
                        other => Err(other),
                    })
                    .map(DeviceState::Blank);
            }
            other => other?,
        };
        let no_tokens = header.json["tokens"]
            .as_object()
            .is_some_and(|t| t.is_empty());
        if header.label == LABEL && no_tokens {
            return blank::probe_unfinished(&device).map(DeviceState::Blank);
        }
        header::validate_header(&header).map_err(|reason| Error::BadHeader {
            device: device.clone(),
            reason,
        })?;
        if header.torn() {
            // A crash between libcryptsetup's two copy writes: both copies passed
            // every rule, and libcryptsetup rewrites the older one from the copy
            // we validated when it loads the header with write access.
            tracing::warn!(device = %device.display(), copies = ?header.copies,
                seqid = header.seqid, "repairing a torn LUKS2 header from its newer valid copy");
            luks::repair(&device, &header)?;
            let again = header::read(&device)?;
            if again.torn() || again.json != header.json {
                return Err(Error::BadHeader {
                    device: device.clone(),
                    reason: format!("the torn header did not converge ({:?})", again.copies),
                });
            }
        }
        info(&device, &header).map(DeviceState::Formatted)
    }
}

/// What a validated header says: its key id (the UUID) and our token.
fn info(device: &Path, header: &header::Header) -> Result<HeaderInfo> {
    let key_id = KeyId::parse(&header.uuid)?;
    let token = match header.json["tokens"]
        .as_object()
        .and_then(|t| t.values().next())
    {
        None => None,
        Some(t) => Some(
            serde_json::from_value(t.clone()).map_err(|e| Error::BadToken {
                device: device.to_path_buf(),
                reason: e.to_string(),
            })?,
        ),
    };
    Ok(HeaderInfo { key_id, token })
}

/// Records what the volume holds in its token (see [`Token::content`]).
pub async fn set_content(device: &Path, content: &str) -> Result<()> {
    let (device, content) = (device.to_path_buf(), content.to_string());
    blocking(move || luks::set_content(&device, &content)).await
}

/// Wipes an open integrity volume from `from` to the end of `mapped`, recording
/// each checkpoint in `device`'s token and removing the mark once done.
/// Blocking: for a task that runs beyond one RPC.
pub fn wipe_blocking(
    device: &Path,
    mapped: &Path,
    from: u64,
    progress: &wipe::Progress,
    cancel: &std::sync::atomic::AtomicBool,
) -> Result<wipe::Wiped> {
    log::route_to_tracing();
    let started = std::time::Instant::now();
    let out = wipe::zero_fill(mapped, from, progress, cancel, |offset| {
        luks::set_wipe_offset(device, Some(offset))
    })?;
    if out == wipe::Wiped::Done {
        luks::set_wipe_offset(device, None)?;
    }
    crate::metrics::global().record_crypt("wipe", started);
    Ok(out)
}

/// Grows the open mapping `name` to fill its device, which has grown; `key` is
/// the volume's data key, fetched again for this. Returns the new size in bytes.
pub async fn resize(name: &MapperName, key: &DataKey) -> Result<u64> {
    let (name, key) = (name.clone(), key.clone());
    timed("resize", move || luks::resize(&name, &key)).await
}

/// Moves `device`'s keyslot to the key of master-secret version `to_version`
/// derived as `to_derivation` (a new version, or a v1 volume moving to v2):
/// adds a keyslot with `new_key` (unlocked with `old_key`, the key the token
/// names), checks that it opens, switches the token to it, then destroys the
/// old keyslot. The volume key, and so the data, do not change. Every step is
/// recorded in the token first, so this finishes whatever a crash
/// interrupted; a volume already there is left alone.
pub async fn rotate(
    device: &Path,
    old_key: &DataKey,
    new_key: &DataKey,
    to_version: u32,
    to_derivation: Derivation,
) -> Result<()> {
    let (device, old_key, new_key) = (device.to_path_buf(), old_key.clone(), new_key.clone());
    timed("rotate", move || {
        luks::rotate(&device, &old_key, &new_key, to_version, to_derivation)
    })
    .await
}

/// Records how far the initial wipe of an integrity volume got; `None` when done.
pub async fn set_wipe_offset(device: &Path, offset: Option<u64>) -> Result<()> {
    let device = device.to_path_buf();
    blocking(move || luks::set_wipe_offset(&device, offset)).await
}

/// What libcryptsetup itself loads from `device`: its metadata JSON and UUID.
/// Blocking. For holding our header reader against libcryptsetup's (tests and
/// the differential fuzz target); it may repair a torn header copy.
pub fn loaded_metadata(device: &Path) -> Result<(serde_json::Value, String)> {
    luks::loaded_metadata(device)
}

/// Reads the LUKS2 header of `device` without any key.
pub async fn read_header(device: &Path) -> Result<HeaderInfo> {
    let device = device.to_path_buf();
    blocking(move || luks::read_header(&device)).await
}

/// Checks that `key` opens a keyslot of `device`, without activating anything.
pub async fn verify_key(device: &Path, key: &DataKey) -> Result<()> {
    let device = device.to_path_buf();
    let key = key.clone();
    blocking(move || luks::verify_key(&device, &key)).await
}

/// The keyslot `key` opens on `device` (after header validation), checked
/// without activating anything.
pub async fn key_slot(device: &Path, key: &DataKey) -> Result<u32> {
    let device = device.to_path_buf();
    let key = key.clone();
    blocking(move || luks::key_slot(&device, &key)).await
}

/// Opens `device` as `/dev/mapper/<name>`, or finds it already open on it.
pub async fn open(
    device: &Path,
    name: &MapperName,
    key: &DataKey,
    opts: &OpenOptions,
) -> Result<Opened> {
    let (device, name, key, opts) = (
        device.to_path_buf(),
        name.clone(),
        key.clone(),
        opts.clone(),
    );
    timed("open", move || luks::open(&device, &name, &key, &opts)).await
}

/// Closes the mapping and any integrity device under it; an absent mapping is no
/// error.
pub async fn close(name: &MapperName) -> Result<Closed> {
    let name = name.clone();
    timed("close", move || luks::close(&name)).await
}

/// Reports the mapping, or `None` when it is not open.
pub async fn status(name: &MapperName) -> Result<Option<MappingStatus>> {
    let name = name.clone();
    blocking(move || luks::status(&name)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapper_name_is_stable_short_and_distinct() {
        let a = MapperName::for_volume("local:default:pvc-1");
        assert_eq!(a, MapperName::for_volume("local:default:pvc-1"));
        assert_ne!(a, MapperName::for_volume("local:default:pvc-2"));
        assert!(a.as_str().starts_with("cryptdisk-"));
        assert_eq!(a.as_str().len(), "cryptdisk-".len() + 32);
        let long = MapperName::for_volume(&"x".repeat(10_000));
        assert!(long.as_str().len() <= 127);
        assert_eq!(a.device_path(), Path::new("/dev/mapper").join(a.as_str()));
    }

    #[test]
    fn operator_mapping_names_stay_one_plain_entry() {
        assert_eq!(
            MapperName::operator("recovered").unwrap().as_str(),
            "recovered"
        );
        MapperName::operator("cryptdisk-a_b.1").unwrap();
        for bad in ["", ".", "..", "a/b", "../x", "a b", &"x".repeat(128)] {
            assert!(MapperName::operator(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn key_id_is_a_lower_case_uuid() {
        let id = KeyId::parse("3F0E1D2C-0000-4000-8000-00000000000A").unwrap();
        assert_eq!(id.as_str(), "3f0e1d2c-0000-4000-8000-00000000000a");
        assert!(KeyId::parse("not-a-uuid").is_err());
        assert!(KeyId::parse("").is_err());
        let random = KeyId::new_random();
        assert_eq!(KeyId::parse(random.as_str()).unwrap(), random);
    }

    // Real libcryptsetup on image files: format, header and keyslot logic need no
    // device-mapper. Opening a mapping is tested in the VM tier.

    fn image(size: u64) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(size).unwrap();
        f
    }

    fn key(id: &KeyId) -> DataKey {
        crate::kms::derive_data_key(&[3; 32], &[4; 32], id.as_str(), 32).unwrap()
    }

    fn options(key_id: &KeyId, integrity: Integrity) -> FormatOptions {
        FormatOptions {
            key_id: key_id.clone(),
            token: Token {
                key_id: key_id.to_string(),
                key_version: 3,
                kms: "unit-test".into(),
                content: None,
                wipe_offset: None,
                rotation: None,
                derivation: None,
            },
            integrity,
            bypass_workqueues: true,
        }
    }

    #[tokio::test]
    async fn rotation_moves_the_keyslot_to_the_new_key_and_is_idempotent() {
        let img = image(64 << 20);
        let key_id = KeyId::new_random();
        let v1 = key(&key_id);
        let v2 = crate::kms::derive_data_key(&[5; 32], &[4; 32], key_id.as_str(), 32).unwrap();
        let blank = probe_blank(img.path()).unwrap();
        format(blank, &v1, &options(&key_id, Integrity::None))
            .await
            .unwrap();
        // A crash right after the intent was recorded: rotate finishes from there.
        luks::update_token(img.path(), |t| {
            t["rotation"] = serde_json::json!({"phase": "adding", "keyslot": "1", "to_version": 4});
        })
        .unwrap();
        header::read_validated(img.path()).unwrap();
        for _ in 0..2 {
            rotate(img.path(), &v1, &v2, 4, Derivation::V1)
                .await
                .unwrap();
        }
        let token = read_header(img.path()).await.unwrap().token.unwrap();
        assert_eq!(token.key_version, 4);
        assert_eq!(token.rotation, None);
        verify_key(img.path(), &v2).await.unwrap();
        let old = verify_key(img.path(), &v1).await.unwrap_err();
        assert!(matches!(old, Error::WrongKey { .. }), "{old:?}");
        let json = header::read_validated(img.path()).unwrap();
        assert_eq!(json["keyslots"].as_object().unwrap().len(), 1);
        assert_eq!(json["keyslots"]["1"]["kdf"]["type"], "pbkdf2");
        // With the wrong old key nothing changes but the recorded intent.
        let v3 = crate::kms::derive_data_key(&[6; 32], &[4; 32], key_id.as_str(), 32).unwrap();
        let err = rotate(img.path(), &v1, &v3, 5, Derivation::V1)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::WrongKey { .. }), "{err:?}");
        verify_key(img.path(), &v2).await.unwrap();
        rotate(img.path(), &v2, &v3, 5, Derivation::V1)
            .await
            .unwrap();
        verify_key(img.path(), &v3).await.unwrap();
    }

    /// A v2 format records its derivation; a v1 volume moves to a v2 keyslot
    /// with the rotation steps (a crash after the intent finishes, a retry is a
    /// no-op), after which only the v2 key opens it; the header whitelist
    /// takes the new fields and refuses other values of them.
    #[tokio::test]
    async fn v2_is_recorded_and_a_v1_volume_migrates_to_it() {
        use crate::kms::derive_scoped_key;
        let img = image(64 << 20);
        let key_id = KeyId::new_random();
        let mut opts = options(&key_id, Integrity::None);
        opts.token.derivation = Some(Derivation::V2);
        let v2 = derive_scoped_key(&[3; 32], &[4; 32], "local:n:a", key_id.as_str(), 32).unwrap();
        format(probe_blank(img.path()).unwrap(), &v2, &opts)
            .await
            .unwrap();
        let token = read_header(img.path()).await.unwrap().token.unwrap();
        assert_eq!(token.derivation(), Derivation::V2);
        assert_eq!(
            header::read_validated(img.path()).unwrap()["tokens"]["0"]["derivation"],
            "v2"
        );

        let img = image(64 << 20);
        let v1 = key(&key_id);
        format(
            probe_blank(img.path()).unwrap(),
            &v1,
            &options(&key_id, Integrity::None),
        )
        .await
        .unwrap();
        let json = header::read_validated(img.path()).unwrap();
        assert!(json["tokens"]["0"].get("derivation").is_none(), "{json}");
        let token = read_header(img.path()).await.unwrap().token.unwrap();
        assert_eq!(token.derivation(), Derivation::V1);
        // Same version, other derivation: still a rotation to do.
        luks::update_token(img.path(), |t| {
            t["rotation"] = serde_json::json!({"phase": "adding", "keyslot": "1",
                "to_version": 3, "to_derivation": "v2"});
        })
        .unwrap();
        header::read_validated(img.path()).unwrap();
        for _ in 0..2 {
            rotate(img.path(), &v1, &v2, 3, Derivation::V2)
                .await
                .unwrap();
        }
        let token = read_header(img.path()).await.unwrap().token.unwrap();
        assert_eq!(
            (token.key_version, token.derivation, token.rotation),
            (3, Some(Derivation::V2), None)
        );
        verify_key(img.path(), &v2).await.unwrap();
        assert!(matches!(
            verify_key(img.path(), &v1).await.unwrap_err(),
            Error::WrongKey { .. }
        ));
        assert_eq!(
            header::read_validated(img.path()).unwrap()["keyslots"]
                .as_object()
                .unwrap()
                .len(),
            1
        );
        // Values we never write are refused.
        for bad in [json_str("v1"), json_str("v3"), serde_json::json!(2)] {
            let copy = tempfile::NamedTempFile::new().unwrap();
            std::fs::copy(img.path(), copy.path()).unwrap();
            forge_text(copy.path(), |t| {
                let out = t
                    .replace("\"derivation\":\"v2\"", &format!("\"derivation\":{bad}"))
                    .replace("\"derivation\": \"v2\"", &format!("\"derivation\": {bad}"));
                assert_ne!(out, t, "no derivation field in {t}");
                out
            });
            let err = header::read_validated(copy.path()).unwrap_err();
            assert!(err.to_string().contains("derivation"), "{bad}: {err}");
        }
    }

    fn json_str(s: &str) -> serde_json::Value {
        serde_json::Value::from(s)
    }

    /// Rewrites the JSON text of both 16 KiB copies of `path` with `edit` and
    /// recomputes their checksums (a forger with disk access).
    fn forge_text(path: &Path, edit: impl Fn(&str) -> String) {
        use sha2::{Digest, Sha256};
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        for offset in [0u64, 16 << 10] {
            let mut copy = vec![0u8; 16 << 10];
            f.read_exact_at(&mut copy, offset).unwrap();
            let area = &copy[4096..];
            let end = area.iter().position(|&b| b == 0).unwrap();
            let text = edit(std::str::from_utf8(&area[..end]).unwrap());
            copy[4096..].fill(0);
            copy[4096..4096 + text.len()].copy_from_slice(text.as_bytes());
            copy[448..512].fill(0);
            let sum = Sha256::digest(&copy);
            copy[448..480].copy_from_slice(&sum);
            f.write_all_at(&copy, offset).unwrap();
        }
    }

    #[tokio::test]
    async fn what_we_accept_is_what_libcryptsetup_loads_and_forgeries_it_reads_otherwise_are_refused()
     {
        let img = image(64 << 20);
        let key_id = KeyId::new_random();
        format(
            probe_blank(img.path()).unwrap(),
            &key(&key_id),
            &options(&key_id, Integrity::None),
        )
        .await
        .unwrap();
        // Our format: both readers see the same metadata.
        let ours = header::read(img.path()).unwrap();
        header::validate_header(&ours).unwrap();
        let (loaded, uuid) = loaded_metadata(img.path()).unwrap();
        assert_eq!(loaded, ours.json);
        assert_eq!(uuid, ours.uuid);
        let pristine = std::fs::read(img.path()).unwrap();
        // json-c cuts a key at its NUL and keeps the later of two equal keys:
        // libcryptsetup reads a null cipher where a lax parser reads ours.
        for entry in [
            r#""encryption\u0000":"cipher_null-ecb""#,
            r#""encryption":"cipher_null-ecb""#,
        ] {
            std::fs::write(img.path(), &pristine).unwrap();
            forge_text(img.path(), |t| {
                t.replacen(
                    "\"sector_size\":4096",
                    &format!("\"sector_size\":4096,{entry}"),
                    1,
                )
            });
            let err = header::read(img.path()).unwrap_err().to_string();
            assert!(
                err.contains("control character") || err.contains("duplicate key"),
                "{err}"
            );
            let (loaded, _) = loaded_metadata(img.path()).unwrap();
            assert_eq!(
                loaded["segments"]["0"]["encryption"], "cipher_null-ecb",
                "{entry}"
            );
            // The stage path refuses it before any libcryptsetup call.
            let e = inspect(img.path(), false).await.unwrap_err();
            assert!(matches!(e, Error::BadHeader { .. }), "{e:?}");
        }
    }

    #[tokio::test]
    async fn an_interrupted_first_format_is_redone_only_on_a_fresh_disk() {
        use std::os::unix::fs::FileExt;
        let img = image(64 << 20);
        let key_id = KeyId::new_random();
        let mut opts = options(&key_id, Integrity::None);
        opts.token.key_version = 1;
        format(probe_blank(img.path()).unwrap(), &key(&key_id), &opts)
            .await
            .unwrap();
        let formatted = std::fs::read(img.path()).unwrap();
        // What a power loss can leave of a first format: sectors of either copy
        // lost, so that the copies disagree, one is torn, or both are.
        let damages: [(&str, &[(u64, u64)]); 3] = [
            ("the secondary torn", &[(16 << 10, 5000)]),
            ("both copies torn", &[(5000, 1), (20 << 10, 1)]),
            (
                "the primary lost, the secondary torn",
                &[(0, 4096), (20 << 10, 1)],
            ),
        ];
        for (what, lost) in damages {
            std::fs::write(img.path(), &formatted).unwrap();
            // The token never made it: drop both copies' tokens by tearing the
            // copies (the data area was never written).
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(img.path())
                .unwrap();
            for &(at, len) in lost {
                f.write_all_at(&vec![0xa5; len as usize], at).unwrap();
            }
            drop(f);
            let before = std::fs::read(img.path()).unwrap();
            // Without the record: refused, the device untouched.
            let refused = inspect(img.path(), false).await;
            if !matches!(refused, Ok(DeviceState::Formatted(_))) {
                assert!(refused.is_err(), "{what}: read as blank without the record");
                assert_eq!(std::fs::read(img.path()).unwrap(), before, "{what}");
            }
            // With it: a torn state that still holds a valid copy with our
            // token is a format that completed and is opened as such; anything
            // else is wiped and formatted again.
            match inspect(img.path(), true).await.unwrap() {
                DeviceState::Formatted(info) => {
                    assert_eq!(info.key_id, key_id, "{what}");
                    assert_eq!(what, "the secondary torn");
                }
                DeviceState::Blank(blank) => {
                    assert_ne!(what, "the secondary torn");
                    let head = std::fs::read(img.path()).unwrap();
                    assert!(
                        head[..16 << 20].iter().all(|&b| b == 0),
                        "{what}: header area not wiped"
                    );
                    let fresh = KeyId::new_random();
                    format(blank, &key(&fresh), &options(&fresh, Integrity::None))
                        .await
                        .unwrap();
                    verify_key(img.path(), &key(&fresh)).await.unwrap();
                }
            }
        }
        // A disk whose data area was written (mkfs writes its superblock at the
        // start of the mapped device) is never redone, record or not.
        std::fs::write(img.path(), &formatted).unwrap();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(img.path())
            .unwrap();
        f.write_all_at(&[0xa5; 4096], 5000).unwrap();
        f.write_all_at(&[0xa5; 4096], 20 << 10).unwrap();
        f.write_all_at(&[0x5a; 4096], (16 << 20) + 1024).unwrap();
        drop(f);
        let before = std::fs::read(img.path()).unwrap();
        assert!(inspect(img.path(), true).await.is_err());
        assert_eq!(std::fs::read(img.path()).unwrap(), before);
        // Nor is a fresh disk whose header area holds anything but a copy of
        // ours: an MBR, or another tool's LUKS2 header, over a zero data area.
        let other = image(64 << 20);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(other.path())
            .unwrap();
        f.write_all_at(&[0x55, 0xaa], 510).unwrap();
        drop(f);
        let before = std::fs::read(other.path()).unwrap();
        assert!(inspect(other.path(), true).await.is_err());
        assert_eq!(std::fs::read(other.path()).unwrap(), before);
        let mut foreign = formatted.clone();
        foreign[24..33].copy_from_slice(b"elsewhere");
        foreign[(16 << 10) + 24..(16 << 10) + 33].copy_from_slice(b"elsewhere");
        foreign[5000] ^= 1;
        std::fs::write(other.path(), &foreign).unwrap();
        assert!(inspect(other.path(), true).await.is_err());
        assert_eq!(std::fs::read(other.path()).unwrap(), foreign);
    }

    #[tokio::test]
    async fn a_torn_header_converges_to_the_copy_libcryptsetup_loads() {
        use std::os::unix::fs::FileExt;
        let img = image(64 << 20);
        let key_id = KeyId::new_random();
        format(
            probe_blank(img.path()).unwrap(),
            &key(&key_id),
            &options(&key_id, Integrity::None),
        )
        .await
        .unwrap();
        let before = std::fs::read(img.path()).unwrap();
        // A token update whose secondary write a crash cut short: the new
        // primary, the old secondary.
        set_content(img.path(), "ext4").await.unwrap();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(img.path())
            .unwrap();
        f.write_all_at(&before[16 << 10..32 << 10], 16 << 10)
            .unwrap();
        let torn = header::read(img.path()).unwrap();
        assert_eq!(torn.copies, header::Copies::PrimaryNewer);
        match inspect(img.path(), false).await.unwrap() {
            DeviceState::Formatted(info) => {
                assert_eq!(info.token.unwrap().content.as_deref(), Some("ext4"))
            }
            DeviceState::Blank(_) => panic!("a formatted volume read as blank"),
        }
        let repaired = header::read(img.path()).unwrap();
        assert_eq!(repaired.copies, header::Copies::Agree);
        assert_eq!(repaired.json, torn.json);
        verify_key(img.path(), &key(&key_id)).await.unwrap();
    }

    #[tokio::test]
    async fn format_writes_our_header_and_token() {
        let img = image(64 << 20);
        let key_id = KeyId::new_random();
        let blank = probe_blank(img.path()).unwrap();
        format(blank, &key(&key_id), &options(&key_id, Integrity::None))
            .await
            .unwrap();

        let header = read_header(img.path()).await.unwrap();
        assert_eq!(header.key_id, key_id);
        let token = header.token.expect("cryptdisk token");
        assert_eq!(token.key_id, key_id.as_str());
        assert_eq!(token.key_version, 3);
        assert_eq!(token.kms, "unit-test");

        // The formatted device is no longer blank, so it cannot be formatted again.
        let err = probe_blank(img.path()).unwrap_err().to_string();
        assert!(err.contains("a LUKS2 header"), "{err}");

        // The header says what we wrote (read back with the stock tool's view).
        // What libcryptsetup really wrote passes our own whitelist.
        let json = header::read_validated(img.path()).unwrap();
        let segment = &json["segments"]["0"];
        assert_eq!(segment["encryption"], "aes-xts-plain64");
        assert_eq!(segment["sector_size"], 4096);
        assert_eq!(segment["offset"], LUKS2_HEADER_BYTES.to_string());
        assert_eq!(
            json["config"]["keyslots_size"],
            LUKS2_KEYSLOTS_BYTES.to_string()
        );
        // Past the keyslots area the header area is zeros up to the data.
        let raw = std::fs::read(img.path()).unwrap();
        let keyslots_end = (2 * LUKS2_METADATA_BYTES + LUKS2_KEYSLOTS_BYTES) as usize;
        assert!(
            raw[keyslots_end..LUKS2_HEADER_BYTES as usize]
                .iter()
                .all(|&b| b == 0)
        );
        let keyslots = json["keyslots"].as_object().unwrap();
        assert_eq!(keyslots.len(), 1);
        let slot = &keyslots["0"];
        assert_eq!(slot["key_size"], 64);
        assert_eq!(slot["kdf"]["type"], "pbkdf2");
        assert_eq!(slot["kdf"]["hash"], "sha256");
        assert_eq!(slot["kdf"]["iterations"], PBKDF_ITERATIONS);
        let flags = json["config"]["flags"].as_array().unwrap();
        assert!(flags.contains(&"no-read-workqueue".into()), "{flags:?}");
        assert!(flags.contains(&"no-write-workqueue".into()), "{flags:?}");
    }

    #[tokio::test]
    async fn the_right_key_opens_a_keyslot_and_another_does_not() {
        let img = image(32 << 20);
        let key_id = KeyId::new_random();
        let blank = probe_blank(img.path()).unwrap();
        format(blank, &key(&key_id), &options(&key_id, Integrity::None))
            .await
            .unwrap();
        verify_key(img.path(), &key(&key_id)).await.unwrap();
        let wrong = key(&KeyId::new_random());
        let err = verify_key(img.path(), &wrong).await.unwrap_err();
        assert!(matches!(err, Error::WrongKey { .. }), "{err}");
    }

    /// What a power loss in the first format leaves before libcryptsetup wrote
    /// any header (the power-loss tier's `format@300ms`): noise in the keyslots
    /// area only. It is blank to a retried stage; noise anywhere else is not.
    #[tokio::test]
    async fn a_format_cut_off_before_its_header_counts_as_blank() {
        use std::os::unix::fs::FileExt;
        let noise = |img: &tempfile::NamedTempFile, at: u64| {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(img.path())
                .unwrap();
            // Wider than the gap between the probe's samples.
            f.write_all_at(&[0x5a; 256 << 10], at).unwrap();
        };
        let keyslots = 2 * LUKS2_METADATA_BYTES;
        // Noise over part of the keyslots area is data, not libcryptsetup's fill.
        for at in [keyslots, keyslots + LUKS2_KEYSLOTS_BYTES - (256 << 10)] {
            let img = image(32 << 20);
            noise(&img, at);
            assert!(inspect(img.path(), false).await.is_err(), "noise at {at}");
        }
        let fill = |img: &tempfile::NamedTempFile| {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(img.path())
                .unwrap();
            f.write_all_at(&vec![0x5a; LUKS2_KEYSLOTS_BYTES as usize], keyslots)
                .unwrap();
        };
        let img = image(32 << 20);
        fill(&img);
        assert!(matches!(
            inspect(img.path(), false).await,
            Ok(DeviceState::Blank(_))
        ));
        for at in [0, 4096, keyslots + LUKS2_KEYSLOTS_BYTES, LUKS2_HEADER_BYTES] {
            let img = image(32 << 20);
            noise(&img, at);
            let err = inspect(img.path(), false).await.unwrap_err();
            assert!(
                matches!(err, Error::NotBlank { .. }),
                "noise at {at}: {err}"
            );
        }
        // The format then goes through and the header reads back.
        let img = image(32 << 20);
        fill(&img);
        let Ok(DeviceState::Blank(blank)) = inspect(img.path(), false).await else {
            panic!("not blank");
        };
        let key_id = KeyId::new_random();
        format(blank, &key(&key_id), &options(&key_id, Integrity::None))
            .await
            .unwrap();
        assert!(matches!(
            inspect(img.path(), false).await,
            Ok(DeviceState::Formatted(_))
        ));
    }

    #[tokio::test]
    async fn a_device_without_luks2_is_reported_as_such() {
        let img = image(32 << 20);
        let err = read_header(img.path()).await.unwrap_err();
        assert!(matches!(err, Error::NotLuks2 { .. }), "{err}");
        let err = verify_key(img.path(), &key(&KeyId::new_random()))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::NotLuks2 { .. }), "{err}");
    }
}
