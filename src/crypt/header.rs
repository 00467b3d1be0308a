//! Reading and vetting the LUKS2 on-disk header without libcryptsetup.
//!
//! Whoever controls a disk controls its header. Before any keyslot is tried, the
//! node reads both header copies and accepts only the layout this driver writes
//! ([`validate`]): our cipher, key size, sector size, PBKDF, one crypt segment after
//! the 16 MiB header area, keyslots bound to our token, and nothing else. So a
//! forged header cannot make the node use a null cipher, a keyslot that opens
//! with any key, or a segment that overlaps the metadata.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::{
    CIPHER, CIPHER_MODE, Error, INTEGRITY_ALGORITHM, INTEGRITY_KEY_BYTES, LUKS2_HEADER_BYTES,
    PBKDF_ITERATIONS, Result, SECTOR_SIZE, TOKEN_TYPE, VOLUME_KEY_BYTES,
};

/// Size of the binary part of a LUKS2 header; the JSON area follows it.
pub const BINARY_HEADER_BYTES: usize = 4096;
/// Header sizes (binary + JSON) that LUKS2 defines.
const HEADER_SIZES: [u64; 7] = [
    16 << 10,
    32 << 10,
    64 << 10,
    128 << 10,
    256 << 10,
    512 << 10,
    1 << 22,
];
/// Where libcryptsetup looks for the secondary copy, in this order, when the
/// primary copy is unusable (`LUKS2_HDR2_OFFSETS` in its source).
const SECONDARY_OFFSETS: [u64; 9] = [
    0x4000, 0x8000, 0x10000, 0x20000, 0x40000, 0x80000, 0x100000, 0x200000, 0x400000,
];
/// The bounds libcryptsetup puts on a copy's `hdr_size` before it trusts it.
const MIN_HDR_SIZE: u64 = 0x4000;
const MAX_HDR_SIZE: u64 = 0x400000;
const MAGIC_PRIMARY: &[u8; 6] = b"LUKS\xba\xbe";
const MAGIC_SECONDARY: &[u8; 6] = b"SKUL\xba\xbe";
/// The one checksum algorithm we write (and so accept) in the binary header.
const CHECKSUM_ALG: &str = "sha256";
/// Field offsets of the binary header.
const CHECKSUM_ALG_FIELD: std::ops::Range<usize> = 72..104;
const UUID_FIELD: std::ops::Range<usize> = 168..208;
const HDR_OFFSET_FIELD: std::ops::Range<usize> = 256..264;
const CSUM_FIELD: std::ops::Range<usize> = 448..512;
/// Anti-forensic stripes of every keyslot we write (libcryptsetup's fixed
/// LUKS value); bounded, since a forged count would make unlocking slow.
const AF_STRIPES: u64 = 4000;
/// The digest's PBKDF2 iterations: libcryptsetup's minimum, which it writes when
/// benchmarking is off (as ours is). A cap, so a forged count cannot tie up a
/// crypt worker.
const DIGEST_ITERATIONS_MAX: u64 = 1000;
/// Bytes of every salt and of the digest we write (base64 in the JSON).
const SALT_BYTES: usize = 32;

/// Activation flags we may find stored in the header.
const ALLOWED_FLAGS: [&str; 4] = [
    "no-read-workqueue",
    "no-write-workqueue",
    "allow-discards",
    "no-journal",
];

/// One copy (primary or secondary) of a LUKS2 header whose checksum holds.
#[derive(Clone)]
struct Copy {
    offset: u64,
    hdr_size: u64,
    seqid: u64,
    label: String,
    uuid: String,
    json: Value,
}

/// How the two copies of a header stand. libcryptsetup loads the valid copy
/// with the higher sequence id and rewrites the other from it, so a crash
/// between its two copy writes leaves one of the torn states, which converge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Copies {
    /// Both copies valid, with the same sequence id and the same content.
    Agree,
    /// Both valid; the primary is newer (a crash after writing it).
    PrimaryNewer,
    /// Both valid; the secondary is newer (the primary was rewritten from an
    /// older copy, which libcryptsetup itself never does, but a repair may).
    SecondaryNewer,
    /// Only the primary is valid (the secondary torn or missing).
    PrimaryOnly,
    /// Only a secondary copy is valid, at this offset (the primary torn).
    SecondaryOnly(u64),
}

/// A LUKS2 header as libcryptsetup would load it: the copy it would choose,
/// after every copy whose checksum holds passed the strict reading.
#[derive(Clone, Debug, PartialEq)]
pub struct Header {
    /// Size of one copy (binary header and JSON area) in bytes.
    pub hdr_size: u64,
    pub seqid: u64,
    pub label: String,
    /// The UUID of the binary header, as written (LUKS2 stores it as text).
    pub uuid: String,
    pub json: Value,
    /// The state of the two copies; anything but [`Copies::Agree`] is repaired
    /// by libcryptsetup at its next load with write access.
    pub copies: Copies,
}

impl Header {
    /// Whether the two copies differ (a torn update), so that libcryptsetup's
    /// next load with write access rewrites one of them.
    pub fn torn(&self) -> bool {
        self.copies != Copies::Agree
    }
}

/// Reads a NUL-terminated text field of the binary header.
fn text(field: &[u8]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

/// What reading one copy found.
enum CopyRead {
    /// Not a copy libcryptsetup would use: no magic, another version, an offset
    /// or size it refuses, a checksum that does not hold, or too few bytes. It
    /// passes over such a copy to the other one, and so do we.
    Unusable(String),
    /// A copy whose checksum holds, read strictly.
    Valid(Copy),
}

/// Reads the copy at `offset` the way libcryptsetup's `hdr_read_disk` decides
/// whether it is usable; a usable copy must then pass the strict reading, or
/// the whole header is refused (`Err`), since libcryptsetup would quietly fall
/// back to the other copy, which is a choice we will not mirror.
fn read_copy<R: Read + Seek>(
    r: &mut R,
    offset: u64,
    secondary: bool,
) -> std::result::Result<CopyRead, String> {
    let magic = if secondary {
        MAGIC_SECONDARY
    } else {
        MAGIC_PRIMARY
    };
    let mut binary = [0u8; BINARY_HEADER_BYTES];
    if r.seek(SeekFrom::Start(offset))
        .and_then(|_| r.read_exact(&mut binary))
        .is_err()
    {
        return Ok(CopyRead::Unusable(format!(
            "cannot read the header at byte {offset}"
        )));
    }
    if &binary[0..6] != magic {
        return Ok(CopyRead::Unusable(format!(
            "no header magic at byte {offset}"
        )));
    }
    let version = u16::from_be_bytes([binary[6], binary[7]]);
    if version != 2 {
        return Ok(CopyRead::Unusable(format!(
            "LUKS version {version} at byte {offset}; only LUKS2 is used"
        )));
    }
    let be64 = |range: std::ops::Range<usize>| {
        u64::from_be_bytes(binary[range].try_into().expect("8 bytes"))
    };
    let hdr_size = be64(8..16);
    let seqid = be64(16..24);
    let hdr_offset = be64(HDR_OFFSET_FIELD);
    if hdr_offset != offset {
        return Ok(CopyRead::Unusable(format!(
            "the copy at byte {offset} says it lies at byte {hdr_offset}"
        )));
    }
    if !(MIN_HDR_SIZE..=MAX_HDR_SIZE).contains(&hdr_size) || (secondary && offset != hdr_size) {
        return Ok(CopyRead::Unusable(format!(
            "header size {hdr_size} of the copy at byte {offset} is not one LUKS2 defines"
        )));
    }
    let mut area = vec![0u8; hdr_size as usize - BINARY_HEADER_BYTES];
    if r.read_exact(&mut area).is_err() {
        return Ok(CopyRead::Unusable(format!(
            "cannot read the JSON area of the copy at byte {offset}"
        )));
    }
    // libcryptsetup hashes with whatever algorithm the copy names; we cannot
    // tell whether another algorithm's checksum holds, so such a copy is not
    // skipped but refused: only sha256 is ever written here.
    let alg = text(&binary[CHECKSUM_ALG_FIELD]);
    if alg != CHECKSUM_ALG {
        return Err(format!(
            "the copy at byte {offset} has checksum algorithm {alg:?}; only {CHECKSUM_ALG} is used"
        ));
    }
    let mut zeroed = binary;
    zeroed[CSUM_FIELD].fill(0);
    let mut hash = Sha256::new();
    hash.update(zeroed);
    hash.update(&area);
    if hash.finalize().as_slice() != &binary[CSUM_FIELD.start..CSUM_FIELD.start + 32] {
        return Ok(CopyRead::Unusable(format!(
            "the checksum of the copy at byte {offset} does not hold"
        )));
    }
    if !HEADER_SIZES.contains(&hdr_size) {
        return Err(format!("header size {hdr_size} is not one LUKS2 defines"));
    }
    let json = json_area(&area).map_err(|e| format!("the copy at byte {offset}: {e}"))?;
    Ok(CopyRead::Valid(Copy {
        offset,
        hdr_size,
        seqid,
        label: text(&binary[24..72]),
        uuid: text(&binary[UUID_FIELD]),
        json,
    }))
}

/// The JSON area as libcryptsetup reads it: text from its first byte, which is
/// `{`, to a NUL, and nothing but NULs after. The text must be plain JSON that
/// json-c reads as we do: no duplicate key (json-c keeps the last), no NUL or
/// control character in a key or a string (json-c cuts keys at a NUL, so
/// `"encryption\u0000"` would overwrite `"encryption"` there).
fn json_area(area: &[u8]) -> std::result::Result<Value, String> {
    let end = area
        .iter()
        .position(|&b| b == 0)
        .ok_or("the JSON area has no terminating NUL")?;
    if area.first() != Some(&b'{') || area[end - 1] != b'}' {
        return Err("the JSON area does not hold exactly one object".to_string());
    }
    if let Some(at) = area[end..].iter().position(|&b| b != 0) {
        return Err(format!(
            "non-zero byte after the JSON text, at byte {} of the JSON area",
            end + at
        ));
    }
    strict_json(&area[..end])
}

/// Parses JSON text refusing duplicate keys and NUL or control characters in
/// keys and strings (see [`json_area`]).
pub fn strict_json(text: &[u8]) -> std::result::Result<Value, String> {
    let mut de = serde_json::Deserializer::from_slice(text);
    let value = de
        .deserialize_any(StrictVisitor)
        .map_err(|e| format!("JSON metadata does not parse: {e}"))?;
    de.end()
        .map_err(|e| format!("JSON metadata does not parse: {e}"))?;
    Ok(value)
}

fn clean(s: &str) -> bool {
    !s.chars().any(char::is_control)
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JSON without duplicate keys or control characters")
    }
    fn visit_bool<E>(self, v: bool) -> std::result::Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> std::result::Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> std::result::Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> std::result::Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_unit<E>(self) -> std::result::Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Value, E> {
        if !clean(v) {
            return Err(E::custom(format!(
                "string {v:?} holds a NUL or control character"
            )));
        }
        Ok(Value::from(v))
    }
    fn visit_string<E: de::Error>(self, v: String) -> std::result::Result<Value, E> {
        self.visit_str(&v)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(StrictSeed)? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if !clean(&key) {
                return Err(de::Error::custom(format!(
                    "key {key:?} holds a NUL or control character"
                )));
            }
            let value = map.next_value_seed(StrictSeed)?;
            if out.insert(key.clone(), value).is_some() {
                return Err(de::Error::custom(format!("duplicate key {key:?}")));
            }
        }
        Ok(Value::Object(out))
    }
}

struct StrictSeed;

impl<'de> de::DeserializeSeed<'de> for StrictSeed {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Value, D::Error> {
        d.deserialize_any(StrictVisitor)
    }
}

/// Reads the header copies from `r` (a device, an image, or bytes in memory)
/// and returns the copy libcryptsetup would load, mirroring its choice: the
/// primary at byte 0; the secondary at the primary's size, or, when the primary
/// is unusable, the first usable one at the offsets libcryptsetup scans; of two
/// usable copies, the higher sequence id. Every usable copy must pass the strict
/// reading; two usable copies must name the same UUID, and with the same
/// sequence id must be the same. A header magic at another of the scanned
/// offsets is refused (a decoy for another parser). `Ok(None)`: there is no
/// LUKS2 header at all.
pub fn parse<R: Read + Seek>(r: &mut R) -> std::result::Result<Option<Header>, String> {
    let primary = read_copy(r, 0, false)?;
    let secondary = match &primary {
        CopyRead::Valid(p) => read_copy(r, p.hdr_size, true)?,
        CopyRead::Unusable(_) => {
            let mut found = CopyRead::Unusable("no usable secondary header".to_string());
            for offset in SECONDARY_OFFSETS {
                if let CopyRead::Valid(c) = read_copy(r, offset, true)? {
                    found = CopyRead::Valid(c);
                    break;
                }
            }
            found
        }
    };
    let (chosen, other, copies) = match (primary, secondary) {
        (CopyRead::Unusable(why), CopyRead::Unusable(_)) => {
            return if has_magic(r, 0, MAGIC_PRIMARY)
                || SECONDARY_OFFSETS
                    .iter()
                    .any(|&o| has_magic(r, o, MAGIC_SECONDARY))
            {
                Err(format!("no usable LUKS2 header copy ({why})"))
            } else {
                Ok(None)
            };
        }
        (CopyRead::Valid(p), CopyRead::Unusable(_)) => (p, None, Copies::PrimaryOnly),
        (CopyRead::Unusable(_), CopyRead::Valid(s)) => {
            let at = s.offset;
            (s, None, Copies::SecondaryOnly(at))
        }
        (CopyRead::Valid(p), CopyRead::Valid(s)) => {
            if p.uuid != s.uuid {
                return Err(format!(
                    "the primary and secondary headers name different UUIDs ({} vs {})",
                    p.uuid, s.uuid
                ));
            }
            match p.seqid.cmp(&s.seqid) {
                std::cmp::Ordering::Equal => {
                    if p.hdr_size != s.hdr_size || p.label != s.label || p.json != s.json {
                        return Err(format!(
                            "the primary and secondary headers disagree at the same seqid {}",
                            p.seqid
                        ));
                    }
                    (p, Some(s), Copies::Agree)
                }
                std::cmp::Ordering::Greater => (p, Some(s), Copies::PrimaryNewer),
                std::cmp::Ordering::Less => (s, Some(p), Copies::SecondaryNewer),
            }
        }
    };
    // Only the copies in use (or, for a torn secondary, expected) may carry a
    // secondary magic: another one is a decoy for a parser that scans.
    let expected_secondary = match copies {
        Copies::SecondaryOnly(at) => at,
        _ => chosen.hdr_size,
    };
    if let Some(decoy) = SECONDARY_OFFSETS
        .iter()
        .find(|&&o| o != expected_secondary && has_magic(r, o, MAGIC_SECONDARY))
    {
        return Err(format!(
            "a secondary header magic at byte {decoy}, which is not where this header's copy lies"
        ));
    }
    if let Some(other) = other.as_ref().filter(|_| copies != Copies::Agree) {
        // The copy libcryptsetup would set aside passes every rule too, so that
        // nothing hinges on which of the two it takes. One older state has no
        // token yet: our own format just before its token write, which a crash
        // in that write leaves beside the newer copy. It must then be the newer
        // copy less its token, and pass every rule with that token.
        let pre_token = other.label == super::LABEL
            && other.json["tokens"]
                .as_object()
                .is_some_and(|t| t.is_empty())
            && {
                let mut without = chosen.json.clone();
                without["tokens"] = Value::Object(Map::new());
                without == other.json
            };
        let as_checked = if pre_token {
            Copy {
                json: chosen.json.clone(),
                ..other.clone()
            }
        } else {
            other.clone()
        };
        validate_copy(&as_checked).map_err(|e| format!("the older header copy: {e}"))?;
    }
    Ok(Some(Header {
        hdr_size: chosen.hdr_size,
        seqid: chosen.seqid,
        label: chosen.label,
        uuid: chosen.uuid,
        json: chosen.json,
        copies,
    }))
}

/// The rules of [`validate_header`] on a copy that is not the chosen one.
fn validate_copy(c: &Copy) -> std::result::Result<(), String> {
    validate_header(&Header {
        hdr_size: c.hdr_size,
        seqid: c.seqid,
        label: c.label.clone(),
        uuid: c.uuid.clone(),
        json: c.json.clone(),
        copies: Copies::Agree,
    })
}

fn has_magic<R: Read + Seek>(r: &mut R, offset: u64, magic: &[u8; 6]) -> bool {
    let mut found = [0u8; 6];
    r.seek(SeekFrom::Start(offset)).is_ok() && r.read_exact(&mut found).is_ok() && &found == magic
}

/// Reads the header of `device` (see [`parse`]).
pub fn read(device: &Path) -> Result<Header> {
    let mut file = File::open(device).map_err(|source| Error::Io {
        op: "read LUKS2 header",
        target: device.display().to_string(),
        source,
    })?;
    match parse(&mut file) {
        Ok(Some(header)) => Ok(header),
        Ok(None) => Err(Error::NotLuks2 {
            device: device.to_path_buf(),
        }),
        Err(reason) => Err(Error::BadHeader {
            device: device.to_path_buf(),
            reason,
        }),
    }
}

/// One header copy as libcryptsetup writes it: magic, version, size, seqid,
/// label, sha256 checksum over the binary header (checksum zeroed) and the
/// JSON area, UUID and offset. `None` when the text does not fit.
fn build_copy(
    secondary: bool,
    hdr_size: u64,
    seqid: u64,
    uuid: &str,
    text: &[u8],
) -> Option<Vec<u8>> {
    if text.len() >= hdr_size as usize - BINARY_HEADER_BYTES || uuid.len() >= UUID_FIELD.len() {
        return None;
    }
    let mut b = vec![0u8; hdr_size as usize];
    b[0..6].copy_from_slice(if secondary {
        MAGIC_SECONDARY
    } else {
        MAGIC_PRIMARY
    });
    b[6..8].copy_from_slice(&2u16.to_be_bytes());
    b[8..16].copy_from_slice(&hdr_size.to_be_bytes());
    b[16..24].copy_from_slice(&seqid.to_be_bytes());
    b[24..24 + super::LABEL.len()].copy_from_slice(super::LABEL.as_bytes());
    b[CHECKSUM_ALG_FIELD.start..CHECKSUM_ALG_FIELD.start + CHECKSUM_ALG.len()]
        .copy_from_slice(CHECKSUM_ALG.as_bytes());
    b[UUID_FIELD.start..UUID_FIELD.start + uuid.len()].copy_from_slice(uuid.as_bytes());
    let offset = if secondary { hdr_size } else { 0 };
    b[HDR_OFFSET_FIELD].copy_from_slice(&offset.to_be_bytes());
    b[BINARY_HEADER_BYTES..BINARY_HEADER_BYTES + text.len()].copy_from_slice(text);
    let sum = Sha256::digest(&b);
    b[CSUM_FIELD.start..CSUM_FIELD.start + 32].copy_from_slice(&sum);
    Some(b)
}

/// The two 16 KiB header copies of an image holding `primary` and `secondary`
/// as their JSON text, with sequence ids `seqids`, each checksummed as
/// libcryptsetup writes them; the keyslots area after them is left to the
/// caller. For the differential fuzz target and tests.
pub fn build_image(
    primary: &[u8],
    secondary: &[u8],
    seqids: (u64, u64),
    uuid: &str,
) -> Option<Vec<u8>> {
    let size = 16 << 10;
    let mut image = build_copy(false, size, seqids.0, uuid, primary)?;
    image.extend(build_copy(true, size, seqids.1, uuid, secondary)?);
    Some(image)
}

/// Whether a header copy that libcryptsetup began to write for this driver is
/// there, torn or not: a LUKS2 magic at byte 0 or at one of the secondary
/// offsets whose binary header carries our label. The evidence that what a
/// fresh disk holds in its header area is our own interrupted first format,
/// not anything else.
pub fn has_our_copy<R: Read + Seek>(r: &mut R) -> bool {
    let ours = |r: &mut R, offset: u64, magic: &[u8; 6]| {
        let mut b = [0u8; 72];
        r.seek(SeekFrom::Start(offset)).is_ok()
            && r.read_exact(&mut b).is_ok()
            && &b[0..6] == magic
            && text(&b[24..72]) == super::LABEL
    };
    ours(r, 0, MAGIC_PRIMARY)
        || SECONDARY_OFFSETS
            .iter()
            .any(|&o| ours(r, o, MAGIC_SECONDARY))
}

/// A reader over a device that keeps every byte it hands out, so that what
/// [`parse`] read can be put back, byte for byte, into the copy libcryptsetup
/// activates from.
struct Recording<'a> {
    file: &'a File,
    pos: u64,
    read: Vec<(u64, Vec<u8>)>,
}

impl Read for Recording<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let n = self.file.read_at(buf, self.pos)?;
        self.read.push((self.pos, buf[..n].to_vec()));
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for Recording<'_> {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        self.pos = match to {
            SeekFrom::Start(p) => p,
            SeekFrom::Current(d) => self.pos.checked_add_signed(d).ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "seek before the start")
            })?,
            SeekFrom::End(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::Unsupported,
                    "the header reader seeks from the start only",
                ));
            }
        };
        Ok(self.pos)
    }
}

/// A device's validated header together with the bytes it was read from: the
/// header copies exactly as [`parse`] read them, and the keyslots area after
/// them. Activating from these bytes (as a detached header) activates exactly
/// what was validated, whatever the device holds by then.
pub struct Snapshot {
    pub header: Header,
    image: Vec<u8>,
}

impl Snapshot {
    /// The header area up to the end of the keyslots area.
    pub fn image(&self) -> &[u8] {
        &self.image
    }
}

/// Reads and validates the header of `device` once (see [`Snapshot`]).
pub fn snapshot(device: &Path) -> Result<Snapshot> {
    use std::os::unix::fs::FileExt;
    let io = |op: &'static str| {
        let target = device.display().to_string();
        move |source| Error::Io { op, target, source }
    };
    let bad = |reason: String| Error::BadHeader {
        device: device.to_path_buf(),
        reason,
    };
    let file = File::open(device).map_err(io("read LUKS2 header"))?;
    let mut rec = Recording {
        file: &file,
        pos: 0,
        read: Vec::new(),
    };
    let header = match parse(&mut rec) {
        Ok(Some(h)) => h,
        Ok(None) => {
            return Err(Error::NotLuks2 {
                device: device.to_path_buf(),
            });
        }
        Err(reason) => return Err(bad(reason)),
    };
    validate_header(&header).map_err(bad)?;
    let keyslots_size: u64 = header.json["config"]["keyslots_size"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("validated");
    let end = 2 * header.hdr_size + keyslots_size;
    let mut image = vec![0u8; end as usize];
    file.read_exact_at(&mut image, 0)
        .map_err(io("read LUKS2 keyslots area"))?;
    for (at, bytes) in rec.read {
        if at < end {
            let n = bytes.len().min((end - at) as usize);
            image[at as usize..at as usize + n].copy_from_slice(&bytes[..n]);
        }
    }
    Ok(Snapshot { header, image })
}

/// Reads the header and checks it against [`validate_header`].
pub fn read_validated(device: &Path) -> Result<Value> {
    let header = read(device)?;
    validate_header(&header).map_err(|reason| Error::BadHeader {
        device: device.to_path_buf(),
        reason,
    })?;
    Ok(header.json)
}

/// [`validate`] on the metadata, the sizes its config records against the
/// binary header (the JSON area as large as the copy says, both copies and the
/// keyslots area inside the header area), and the token bound to this header:
/// the key id it records must be the header's own UUID (the id the key is asked
/// for), so a token copied from another volume's header is refused.
pub fn validate_header(header: &Header) -> std::result::Result<(), String> {
    validate(&header.json)?;
    let size_at = |key: &str| {
        header.json["config"][key]
            .as_str()
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| format!("config.{key} is missing or not a byte count"))
    };
    let json_size = size_at("json_size")?;
    let json_area = header.hdr_size - BINARY_HEADER_BYTES as u64;
    if json_size != json_area {
        return Err(format!(
            "config.json_size {json_size} does not match the {json_area}-byte JSON area"
        ));
    }
    let keyslots_size = size_at("keyslots_size")?;
    // libcryptsetup refuses a keyslots size that is not whole 4 KiB blocks
    // (found by the luks2_differential fuzz target: we had accepted one).
    if keyslots_size % 4096 != 0 {
        return Err(format!(
            "config.keyslots_size {keyslots_size} is not a multiple of 4096"
        ));
    }
    if keyslots_size.saturating_add(2 * header.hdr_size) > LUKS2_HEADER_BYTES {
        return Err(format!(
            "config.keyslots_size {keyslots_size} reaches past the {LUKS2_HEADER_BYTES}-byte \
             header area"
        ));
    }
    // Every keyslot area inside the keyslots area the config declares.
    for (id, slot) in header.json["keyslots"].as_object().into_iter().flatten() {
        let at = |k: &str| {
            slot["area"][k]
                .as_str()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(u64::MAX)
        };
        let (offset, size) = (at("offset"), at("size"));
        if offset % 4096 != 0
            || offset < 2 * header.hdr_size
            || offset.saturating_add(size) > 2 * header.hdr_size + keyslots_size
        {
            return Err(format!("keyslot {id} area lies outside the keyslots area"));
        }
    }
    let token = header.json["tokens"]
        .as_object()
        .and_then(|t| t.values().next())
        .ok_or("no token")?;
    let key_id = token["key_id"].as_str().unwrap_or_default();
    if !key_id.eq_ignore_ascii_case(&header.uuid) {
        return Err(format!(
            "token.key_id {key_id:?} is not the header's UUID {:?}",
            header.uuid
        ));
    }
    Ok(())
}

/// Refuses any key of `map` outside `required` and `optional`, and any
/// `required` key that is missing.
fn keys_exactly(
    map: &Map<String, Value>,
    what: &str,
    required: &[&str],
    optional: &[&str],
) -> std::result::Result<(), String> {
    if let Some(k) = map
        .keys()
        .find(|k| !required.contains(&k.as_str()) && !optional.contains(&k.as_str()))
    {
        return Err(format!("{what} has a field {k:?} we never write"));
    }
    if let Some(k) = required.iter().find(|k| !map.contains_key(**k)) {
        return Err(format!("{what} lacks its field {k:?}"));
    }
    Ok(())
}

/// A base64 string of `bytes` bytes.
fn base64_of(v: &Value, bytes: usize, what: &str) -> std::result::Result<(), String> {
    use base64::Engine as _;
    let decoded = v
        .as_str()
        .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok());
    match decoded {
        Some(d) if d.len() == bytes => Ok(()),
        _ => Err(format!("{what} is not {bytes} bytes of base64")),
    }
}

fn obj<'a>(
    v: &'a Value,
    what: &str,
) -> std::result::Result<&'a serde_json::Map<String, Value>, String> {
    v.as_object()
        .ok_or_else(|| format!("{what} is not an object"))
}

fn str_at<'a>(v: &'a Value, key: &str, what: &str) -> std::result::Result<&'a str, String> {
    v.get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("{what}.{key} is missing or not a string"))
}

fn expect(
    found: &Value,
    expected: impl Into<Value>,
    what: &str,
) -> std::result::Result<(), String> {
    let expected = expected.into();
    if *found == expected {
        Ok(())
    } else {
        Err(format!("{what} is {found}; expected {expected}"))
    }
}

/// Accepts only the header layout this driver writes; the error says what
/// differs. Every object must hold exactly the fields we write, and every cost
/// a forged header could raise (PBKDF iterations, anti-forensic stripes, key
/// sizes) must be the value we write, so a disk cannot tie up a crypt worker.
pub fn validate(json: &Value) -> std::result::Result<(), String> {
    let root = obj(json, "metadata")?;
    for key in root.keys() {
        if !["keyslots", "tokens", "segments", "digests", "config"].contains(&key.as_str()) {
            return Err(format!("unexpected top-level section {key:?}"));
        }
    }
    // Every id is a keyslot, token, segment or digest number as libcryptsetup
    // writes it (plain decimal, below its limit of 32); libcryptsetup refuses
    // any other, so accepting one would make the two readers differ.
    for section in ["keyslots", "tokens", "segments", "digests"] {
        for id in obj(&json[section], section)?.keys() {
            if !is_id(id) {
                return Err(format!("{section} id {id:?} is not a number below 32"));
            }
        }
    }

    // One crypt segment, right after the header area, to the end of the device.
    let segments = obj(&json["segments"], "segments")?;
    if segments.len() != 1 || !segments.contains_key("0") {
        return Err(format!(
            "{} segments; expected exactly one, segment 0",
            segments.len()
        ));
    }
    let seg = &json["segments"]["0"];
    keys_exactly(
        obj(seg, "segment 0")?,
        "segment 0",
        &[
            "type",
            "offset",
            "size",
            "iv_tweak",
            "encryption",
            "sector_size",
        ],
        &["integrity", "flags"],
    )?;
    expect(&seg["type"], "crypt", "segment type")?;
    expect(
        &seg["offset"],
        LUKS2_HEADER_BYTES.to_string(),
        "segment offset",
    )?;
    expect(&seg["size"], "dynamic", "segment size")?;
    expect(&seg["iv_tweak"], "0", "segment iv_tweak")?;
    expect(
        &seg["encryption"],
        format!("{CIPHER}-{CIPHER_MODE}"),
        "segment encryption",
    )?;
    expect(&seg["sector_size"], SECTOR_SIZE, "segment sector_size")?;
    if seg
        .get("flags")
        .is_some_and(|f| f.as_array().is_none_or(|a| !a.is_empty()))
    {
        return Err(format!("segment flags {} are not ours", seg["flags"]));
    }
    let integrity = match seg.get("integrity") {
        None => false,
        Some(i) => {
            keys_exactly(
                obj(i, "segment integrity")?,
                "segment integrity",
                &["type", "journal_encryption", "journal_integrity"],
                &[],
            )?;
            expect(&i["type"], INTEGRITY_ALGORITHM, "segment integrity type")?;
            expect(
                &i["journal_encryption"],
                "none",
                "integrity journal_encryption",
            )?;
            expect(
                &i["journal_integrity"],
                "none",
                "integrity journal_integrity",
            )?;
            true
        }
    };
    let key_bytes = if integrity {
        VOLUME_KEY_BYTES + INTEGRITY_KEY_BYTES
    } else {
        VOLUME_KEY_BYTES
    };

    // Keyslots: pbkdf2-sha256 with our iterations over an aes-xts area, holding a
    // key of our size split into our number of stripes.
    let keyslots = obj(&json["keyslots"], "keyslots")?;
    if keyslots.is_empty() {
        return Err("no keyslots".to_string());
    }
    for (id, slot) in keyslots {
        let what = format!("keyslot {id}");
        keys_exactly(
            obj(slot, &what)?,
            &what,
            &["type", "key_size", "af", "area", "kdf"],
            &[],
        )?;
        keys_exactly(
            obj(&slot["kdf"], &format!("{what} kdf"))?,
            &format!("{what} kdf"),
            &["type", "hash", "iterations", "salt"],
            &[],
        )?;
        keys_exactly(
            obj(&slot["af"], &format!("{what} af"))?,
            &format!("{what} af"),
            &["type", "stripes", "hash"],
            &[],
        )?;
        keys_exactly(
            obj(&slot["area"], &format!("{what} area"))?,
            &format!("{what} area"),
            &["type", "offset", "size", "encryption", "key_size"],
            &[],
        )?;
        expect(&slot["type"], "luks2", &format!("{what} type"))?;
        expect(&slot["key_size"], key_bytes, &format!("{what} key_size"))?;
        expect(&slot["kdf"]["type"], "pbkdf2", &format!("{what} kdf"))?;
        expect(&slot["kdf"]["hash"], "sha256", &format!("{what} kdf hash"))?;
        expect(
            &slot["kdf"]["iterations"],
            PBKDF_ITERATIONS,
            &format!("{what} kdf iterations"),
        )?;
        base64_of(
            &slot["kdf"]["salt"],
            SALT_BYTES,
            &format!("{what} kdf salt"),
        )?;
        expect(&slot["area"]["type"], "raw", &format!("{what} area type"))?;
        expect(
            &slot["area"]["encryption"],
            format!("{CIPHER}-{CIPHER_MODE}"),
            &format!("{what} area encryption"),
        )?;
        expect(
            &slot["area"]["key_size"],
            VOLUME_KEY_BYTES,
            &format!("{what} area key_size"),
        )?;
        expect(
            &slot["af"]["type"],
            "luks1",
            &format!("{what} anti-forensic splitter"),
        )?;
        expect(&slot["af"]["hash"], "sha256", &format!("{what} af hash"))?;
        expect(
            &slot["af"]["stripes"],
            AF_STRIPES,
            &format!("{what} af stripes"),
        )?;
        // The area holds exactly the split key, in whole 4 KiB blocks.
        let split = (key_bytes as u64 * AF_STRIPES).div_ceil(4096) * 4096;
        expect(
            &slot["area"]["size"],
            split.to_string(),
            &format!("{what} area size"),
        )?;
        let area_end = slot["area"]["offset"]
            .as_str()
            .and_then(|o| o.parse::<u64>().ok())
            .map(|o| o.saturating_add(split));
        if area_end.is_none_or(|end| end > LUKS2_HEADER_BYTES) {
            return Err(format!("{what} area lies outside the header area"));
        }
    }

    // One digest, binding every keyslot to segment 0: a keyslot without a digest
    // would open with any key.
    let digests = obj(&json["digests"], "digests")?;
    if digests.len() != 1 {
        return Err(format!("{} digests; expected exactly one", digests.len()));
    }
    let digest = digests.values().next().expect("one digest");
    keys_exactly(
        obj(digest, "digest")?,
        "digest",
        &[
            "type",
            "keyslots",
            "segments",
            "hash",
            "iterations",
            "salt",
            "digest",
        ],
        &[],
    )?;
    expect(&digest["type"], "pbkdf2", "digest type")?;
    expect(&digest["hash"], "sha256", "digest hash")?;
    if !digest["iterations"]
        .as_u64()
        .is_some_and(|n| (1..=DIGEST_ITERATIONS_MAX).contains(&n))
    {
        return Err(format!(
            "digest iterations {} are not between 1 and {DIGEST_ITERATIONS_MAX}",
            digest["iterations"]
        ));
    }
    base64_of(&digest["salt"], SALT_BYTES, "digest salt")?;
    base64_of(&digest["digest"], SALT_BYTES, "digest value")?;
    expect(
        &digest["segments"],
        serde_json::json!(["0"]),
        "digest segments",
    )?;
    let slot_ids: BTreeSet<&str> = keyslots.keys().map(String::as_str).collect();
    let digest_slots = string_set(&digest["keyslots"], "digest keyslots")?;
    if digest_slots != slot_ids {
        return Err(format!(
            "the digest covers keyslots {digest_slots:?}, the header has {slot_ids:?}"
        ));
    }

    // Exactly one token, ours, naming every keyslot.
    let tokens = obj(&json["tokens"], "tokens")?;
    if tokens.len() != 1 {
        return Err(format!(
            "{} tokens; expected exactly one, of type {TOKEN_TYPE}",
            tokens.len()
        ));
    }
    let token = tokens.values().next().expect("one token");
    expect(&token["type"], TOKEN_TYPE, "token type")?;
    keys_exactly(
        obj(token, "token")?,
        "token",
        &["type", "keyslots", "key_id", "key_version", "kms"],
        super::TOKEN_OPTIONAL_FIELDS,
    )?;
    str_at(token, "key_id", "token")?;
    str_at(token, "kms", "token")?;
    if let Some(content) = token.get("content")
        && !content
            .as_str()
            .is_some_and(|c| super::CONTENT_VALUES.contains(&c))
    {
        return Err(format!(
            "token.content {content} is not one of {:?}",
            super::CONTENT_VALUES
        ));
    }
    if let Some(offset) = token.get("wipe_offset")
        && !offset.is_u64()
    {
        return Err(format!("token.wipe_offset {offset} is not a byte count"));
    }
    // Only v2 is ever written: v1 is the field's absence.
    if let Some(derivation) = token.get("derivation")
        && derivation.as_str() != Some("v2")
    {
        return Err(format!("token.derivation {derivation} is not \"v2\""));
    }
    if token["key_version"]
        .as_u64()
        .is_none_or(|v| v > u64::from(u32::MAX))
    {
        return Err("token.key_version is missing or not a number".to_string());
    }
    let token_slots = string_set(&token["keyslots"], "token keyslots")?;
    // Mid-rotation, the keyslots the rotation names may exist beside the token's.
    let rotating: BTreeSet<&str> = match token.get("rotation") {
        None => BTreeSet::new(),
        Some(r) => match r["phase"].as_str() {
            Some("adding")
                if r["to_version"]
                    .as_u64()
                    .is_some_and(|v| v <= u64::from(u32::MAX))
                    && r.get("to_derivation")
                        .is_none_or(|d| d.as_str() == Some("v2"))
                    && keys_exactly(
                        obj(r, "token.rotation")?,
                        "token.rotation",
                        &["phase", "keyslot", "to_version"],
                        &["to_derivation"],
                    )
                    .is_ok() =>
            {
                [r["keyslot"]
                    .as_str()
                    .ok_or("token.rotation.keyslot is not a string")?]
                .into()
            }
            Some("retiring")
                if keys_exactly(
                    obj(r, "token.rotation")?,
                    "token.rotation",
                    &["phase", "keyslots"],
                    &[],
                )
                .is_ok() =>
            {
                string_set(&r["keyslots"], "token.rotation keyslots")?
            }
            _ => return Err(format!("token.rotation {r} is not one we write")),
        },
    };
    let allowed: BTreeSet<&str> = token_slots.union(&rotating).copied().collect();
    if token_slots.is_empty() || !token_slots.is_subset(&slot_ids) || !slot_ids.is_subset(&allowed)
    {
        return Err(format!(
            "the token names keyslots {token_slots:?} (rotating {rotating:?}), the header has \
             {slot_ids:?}"
        ));
    }

    // Config: no requirements (no reencryption in progress), only our flags.
    let config = obj(&json["config"], "config")?;
    if let Some(req) = config.get("requirements") {
        return Err(format!(
            "config.requirements {req}; we never set requirements"
        ));
    }
    keys_exactly(
        config,
        "config",
        &["json_size", "keyslots_size"],
        &["flags"],
    )?;
    if let Some(flags) = config.get("flags") {
        for f in flags.as_array().ok_or("config.flags is not a list")? {
            let f = f.as_str().unwrap_or_default();
            if !ALLOWED_FLAGS.contains(&f) {
                return Err(format!("activation flag {f:?} is not one we set"));
            }
        }
    }
    Ok(())
}

/// A LUKS2 object id: decimal, no sign or leading zero, below 32.
fn is_id(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| b.is_ascii_digit())
        && (s == "0" || !s.starts_with('0'))
        && s.parse::<u32>().is_ok_and(|n| n < 32)
}

fn string_set<'a>(v: &'a Value, what: &str) -> std::result::Result<BTreeSet<&'a str>, String> {
    v.as_array()
        .ok_or_else(|| format!("{what} is not a list"))?
        .iter()
        .map(|s| {
            s.as_str()
                .filter(|s| is_id(s))
                .ok_or_else(|| format!("{what} holds {s}, not an id"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SALT: &str = "qsn6Z1yl0m7MTgtjU6oZJYiDTt50RtFMEYTH97CP2FM=";

    /// The header our format writes (as libcryptsetup 2.6 lays it out).
    pub(crate) fn ours() -> Value {
        json!({
            "keyslots": {"0": {
                "type": "luks2", "key_size": 64,
                "af": {"type": "luks1", "stripes": 4000, "hash": "sha256"},
                "area": {"type": "raw", "offset": "32768", "size": "258048",
                         "encryption": "aes-xts-plain64", "key_size": 64},
                "kdf": {"type": "pbkdf2", "hash": "sha256", "iterations": 1000,
                        "salt": SALT}}},
            "tokens": {"0": {"type": "cryptdisk", "keyslots": ["0"],
                             "key_id": "3f0e1d2c-0000-4000-8000-000000000001",
                             "key_version": 1, "kms": "test"}},
            "segments": {"0": {"type": "crypt", "offset": "16777216", "size": "dynamic",
                               "iv_tweak": "0", "encryption": "aes-xts-plain64",
                               "sector_size": 4096}},
            "digests": {"0": {"type": "pbkdf2", "keyslots": ["0"], "segments": ["0"],
                              "hash": "sha256", "iterations": 1000, "salt": SALT,
                              "digest": SALT}},
            "config": {"json_size": "12288", "keyslots_size": "16744448",
                       "flags": ["no-read-workqueue", "no-write-workqueue"]}
        })
    }

    fn refused(mutate: impl FnOnce(&mut Value), word: &str) {
        let mut h = ours();
        mutate(&mut h);
        let err = validate(&h).expect_err("must be refused");
        assert!(err.contains(word), "{word:?} not in {err:?}");
    }

    #[test]
    fn our_layout_is_accepted() {
        validate(&ours()).unwrap();
        let mut integrity = ours();
        integrity["segments"]["0"]["integrity"] = json!({"type": "hmac(sha256)",
            "journal_encryption": "none", "journal_integrity": "none"});
        integrity["keyslots"]["0"]["key_size"] = json!(96);
        integrity["keyslots"]["0"]["area"]["size"] = json!("385024");
        validate(&integrity).unwrap();
    }

    #[test]
    fn foreign_layouts_are_refused() {
        refused(
            |h| h["segments"]["0"]["encryption"] = json!("cipher_null-ecb"),
            "segment encryption",
        );
        refused(
            |h| h["keyslots"]["0"]["area"]["encryption"] = json!("cipher_null-ecb"),
            "area encryption",
        );
        refused(
            |h| h["segments"]["0"]["sector_size"] = json!(512),
            "sector_size",
        );
        refused(
            |h| h["segments"]["0"]["offset"] = json!("4096"),
            "segment offset",
        );
        refused(
            |h| h["segments"]["1"] = h["segments"]["0"].clone(),
            "segments",
        );
        refused(
            |h| h["keyslots"]["0"]["kdf"]["type"] = json!("argon2id"),
            "kdf",
        );
        refused(|h| h["keyslots"]["0"]["key_size"] = json!(32), "key_size");
        refused(
            |h| h["keyslots"]["0"]["area"]["offset"] = json!("16777216"),
            "outside the header",
        );
        refused(
            |h| {
                h["segments"]["0"]["integrity"] = json!({"type": "crc32c",
            "journal_encryption": "none", "journal_integrity": "none"})
            },
            "integrity type",
        );
        refused(
            |h| h["config"]["flags"] = json!(["same-cpu-crypt"]),
            "activation flag",
        );
        refused(
            |h| h["config"]["requirements"] = json!({"mandatory": ["online-reencrypt"]}),
            "requirements",
        );
        refused(|h| h["extra"] = json!({}), "top-level");
    }

    #[test]
    fn keyslots_without_digest_or_token_are_refused() {
        // An extra keyslot that no digest covers would open with any passphrase.
        refused(
            |h| h["keyslots"]["1"] = h["keyslots"]["0"].clone(),
            "digest covers",
        );
        refused(
            |h| {
                h["keyslots"]["1"] = h["keyslots"]["0"].clone();
                h["digests"]["0"]["keyslots"] = json!(["0", "1"]);
            },
            "token names",
        );
        refused(|h| h["digests"]["1"] = h["digests"]["0"].clone(), "digests");
        refused(
            |h| h["tokens"]["1"] = json!({"type": "systemd-tpm2", "keyslots": []}),
            "tokens",
        );
        refused(|h| h["tokens"]["0"]["type"] = json!("other"), "token type");
        refused(
            |h| {
                h["tokens"].as_object_mut().unwrap().clear();
            },
            "tokens",
        );
        refused(
            |h| h["tokens"]["0"]["key_version"] = json!("1"),
            "key_version",
        );
        refused(
            |h| h["tokens"]["0"]["content"] = json!("btrfs"),
            "token.content",
        );
        refused(
            |h| h["tokens"]["0"]["wipe_offset"] = json!(-1),
            "token.wipe_offset",
        );
        refused(
            |h| {
                h["keyslots"].as_object_mut().unwrap().clear();
            },
            "no keyslots",
        );
    }

    #[test]
    fn two_keyslots_both_named_are_accepted() {
        // Mid-rotation: the old and the new keyslot, both ours.
        let mut h = ours();
        h["keyslots"]["1"] = h["keyslots"]["0"].clone();
        h["digests"]["0"]["keyslots"] = json!(["0", "1"]);
        h["tokens"]["0"]["keyslots"] = json!(["0", "1"]);
        validate(&h).unwrap();
    }

    #[test]
    fn a_rotation_may_hold_the_keyslot_it_names_and_no_other() {
        let two = || {
            let mut h = ours();
            h["keyslots"]["1"] = h["keyslots"]["0"].clone();
            h["digests"]["0"]["keyslots"] = json!(["0", "1"]);
            h
        };
        // Adding keyslot 1 (before and after it exists), then retiring keyslot 0.
        let mut h = ours();
        h["tokens"]["0"]["rotation"] = json!({"phase": "adding", "keyslot": "1", "to_version": 2});
        validate(&h).unwrap();
        let mut h = two();
        h["tokens"]["0"]["rotation"] = json!({"phase": "adding", "keyslot": "1", "to_version": 2});
        validate(&h).unwrap();
        let mut h = two();
        h["tokens"]["0"]["keyslots"] = json!(["1"]);
        h["tokens"]["0"]["rotation"] = json!({"phase": "retiring", "keyslots": ["0"]});
        validate(&h).unwrap();
        // A rotation naming another keyslot does not excuse keyslot 1.
        let mut h = two();
        h["tokens"]["0"]["rotation"] = json!({"phase": "adding", "keyslot": "2", "to_version": 2});
        assert!(validate(&h).unwrap_err().contains("token names keyslots"));
        // Nor does a phase we never write.
        let mut h = two();
        h["tokens"]["0"]["rotation"] = json!({"phase": "whatever", "keyslot": "1"});
        assert!(validate(&h).unwrap_err().contains("token.rotation"));
    }

    const UUID: &str = "3f0e1d2c-0000-4000-8000-000000000001";

    /// One header copy as bytes: the binary header and its JSON area, with its
    /// offset and sha256 checksum as libcryptsetup writes them.
    fn copy_bytes(magic: &[u8; 6], hdr_size: u64, seqid: u64, uuid: &str, json: &[u8]) -> Vec<u8> {
        let offset = if magic == MAGIC_PRIMARY { 0 } else { hdr_size };
        copy_at(magic, offset, hdr_size, seqid, uuid, json)
    }

    fn copy_at(
        magic: &[u8; 6],
        offset: u64,
        hdr_size: u64,
        seqid: u64,
        uuid: &str,
        json: &[u8],
    ) -> Vec<u8> {
        let mut b = vec![0u8; hdr_size as usize];
        b[0..6].copy_from_slice(magic);
        b[6..8].copy_from_slice(&2u16.to_be_bytes());
        b[8..16].copy_from_slice(&hdr_size.to_be_bytes());
        b[16..24].copy_from_slice(&seqid.to_be_bytes());
        b[24..32].copy_from_slice(b"cryptdsk");
        b[72..78].copy_from_slice(b"sha256");
        b[168..168 + uuid.len()].copy_from_slice(uuid.as_bytes());
        b[HDR_OFFSET_FIELD].copy_from_slice(&offset.to_be_bytes());
        b[BINARY_HEADER_BYTES..BINARY_HEADER_BYTES + json.len()].copy_from_slice(json);
        resum(&mut b);
        b
    }

    /// Recomputes a copy's checksum, as a forger with disk access would.
    fn resum(copy: &mut [u8]) {
        copy[CSUM_FIELD].fill(0);
        let sum = Sha256::digest(&*copy);
        copy[CSUM_FIELD.start..CSUM_FIELD.start + 32].copy_from_slice(&sum);
    }

    fn image(primary: &Value, secondary: &Value) -> Vec<u8> {
        let size = 16 << 10;
        let mut img = copy_bytes(MAGIC_PRIMARY, size, 7, UUID, primary.to_string().as_bytes());
        img.extend(copy_bytes(
            MAGIC_SECONDARY,
            size,
            7,
            UUID,
            secondary.to_string().as_bytes(),
        ));
        img
    }

    fn parsed(img: &[u8]) -> std::result::Result<Option<Header>, String> {
        parse(&mut std::io::Cursor::new(img))
    }

    #[test]
    fn both_copies_are_read_from_bytes_and_bound_to_the_uuid() {
        let header = parsed(&image(&ours(), &ours())).unwrap().unwrap();
        assert_eq!(header.uuid, UUID);
        assert_eq!(header.label, "cryptdsk");
        assert_eq!(header.json, ours());
        validate_header(&header).unwrap();
        // A token copied from another volume's header names another key id.
        let mut copied = ours();
        copied["tokens"]["0"]["key_id"] = json!("0b0b0b0b-0000-4000-8000-000000000002");
        // Sizes the binary header contradicts.
        let mut big = ours();
        big["config"]["json_size"] = json!("4190208");
        let header = parsed(&image(&big, &big)).unwrap().unwrap();
        assert!(validate_header(&header).unwrap_err().contains("json_size"));
        let mut odd = ours();
        odd["config"]["keyslots_size"] = json!("4446876");
        let header = parsed(&image(&odd, &odd)).unwrap().unwrap();
        assert!(
            validate_header(&header)
                .unwrap_err()
                .contains("multiple of 4096")
        );
        let mut big = ours();
        big["config"]["keyslots_size"] = json!("16777216");
        let header = parsed(&image(&big, &big)).unwrap().unwrap();
        assert!(
            validate_header(&header)
                .unwrap_err()
                .contains("keyslots_size")
        );
        let header = parsed(&image(&copied, &copied)).unwrap().unwrap();
        validate(&header.json).unwrap();
        let err = validate_header(&header).unwrap_err();
        assert!(err.contains("is not the header's UUID"), "{err}");
    }

    #[test]
    fn copies_that_disagree_at_one_seqid_or_uuid_are_refused() {
        let mut evil = ours();
        evil["segments"]["0"]["encryption"] = json!("cipher_null-ecb");
        for (p, s) in [(&ours(), &evil), (&evil, &ours())] {
            let err = parsed(&image(p, s)).unwrap_err();
            assert!(
                err.contains("disagree") || err.contains("segment encryption"),
                "{err}"
            );
        }
        let mut other = ours();
        other["tokens"]["0"]["content"] = json!("ext4");
        let err = parsed(&image(&ours(), &other)).unwrap_err();
        assert!(err.contains("disagree at the same seqid 7"), "{err}");
        let mut img = image(&ours(), &ours());
        img[(16 << 10) + 168] = b'a';
        resum(&mut img[16 << 10..32 << 10]);
        assert!(parsed(&img).unwrap_err().contains("different UUIDs"));
    }

    /// A copy with its seqid set and its checksum made to hold again.
    fn with_seqid(img: &mut [u8], at: usize, seqid: u64) {
        img[at + 16..at + 24].copy_from_slice(&seqid.to_be_bytes());
        resum(&mut img[at..at + (16 << 10)]);
    }

    #[test]
    fn a_torn_update_loads_the_copy_libcryptsetup_loads() {
        // A crash between the two copy writes: the primary is newer.
        let mut newer = ours();
        newer["tokens"]["0"]["content"] = json!("ext4");
        let mut img = image(&newer, &ours());
        with_seqid(&mut img, 0, 8);
        let h = parsed(&img).unwrap().unwrap();
        assert_eq!(
            (h.seqid, h.copies, h.json.clone()),
            (8, Copies::PrimaryNewer, newer.clone())
        );
        assert!(h.torn());
        // The secondary newer: libcryptsetup takes it, and so do we.
        let mut img = image(&ours(), &newer);
        with_seqid(&mut img, 16 << 10, 9);
        let h = parsed(&img).unwrap().unwrap();
        assert_eq!(
            (h.seqid, h.copies, h.json),
            (9, Copies::SecondaryNewer, newer.clone())
        );
        // The older copy must pass every rule too.
        let mut evil = ours();
        evil["segments"]["0"]["encryption"] = json!("cipher_null-ecb");
        let mut img = image(&ours(), &evil);
        with_seqid(&mut img, 0, 8);
        let err = parsed(&img).unwrap_err();
        assert!(
            err.contains("older header copy") && err.contains("segment encryption"),
            "{err}"
        );
        // A torn copy (its checksum does not hold): the other one is used.
        let mut img = image(&ours(), &ours());
        img[(16 << 10) + 5000] ^= 1;
        assert_eq!(parsed(&img).unwrap().unwrap().copies, Copies::PrimaryOnly);
        let mut img = image(&ours(), &ours());
        img[5000] ^= 1;
        assert_eq!(
            parsed(&img).unwrap().unwrap().copies,
            Copies::SecondaryOnly(16 << 10)
        );
        // Both torn: refused.
        img[(16 << 10) + 5000] ^= 1;
        assert!(
            parsed(&img)
                .unwrap_err()
                .contains("no usable LUKS2 header copy")
        );
    }

    #[test]
    fn a_torn_token_write_ending_a_format_loads_the_newer_copy() {
        // Seen by the power-loss tier: the primary with the token (seqid 5),
        // the secondary still our format's state before it (seqid 4).
        let mut before = ours();
        before["tokens"] = json!({});
        let labelled = |img: &mut Vec<u8>| {
            for at in [0, 16 << 10] {
                img[at + 24..at + 24 + super::super::LABEL.len()]
                    .copy_from_slice(super::super::LABEL.as_bytes());
            }
        };
        let mut img = image(&ours(), &before);
        labelled(&mut img);
        with_seqid(&mut img, 0, 5);
        with_seqid(&mut img, 16 << 10, 4);
        let h = parsed(&img).unwrap().unwrap();
        assert_eq!((h.copies, h.seqid), (Copies::PrimaryNewer, 5));
        validate_header(&h).unwrap();
        // An older copy without a token that differs in anything else is not
        // excused.
        let mut other = before.clone();
        other["segments"]["0"]["encryption"] = json!("cipher_null-ecb");
        let mut img = image(&ours(), &other);
        labelled(&mut img);
        with_seqid(&mut img, 0, 5);
        with_seqid(&mut img, 16 << 10, 4);
        assert!(parsed(&img).unwrap_err().contains("older header copy"));
    }

    #[test]
    fn the_copy_choice_mirrors_libcryptsetups_scan() {
        // The attack: a primary whose checksum fails, claiming 32 KiB, a decoy
        // secondary at 32 KiB that a reader trusting the primary's size would
        // take, and a null-cipher copy at 16 KiB (inside the primary's JSON tail)
        // that libcryptsetup's scan finds first.
        let mut evil = ours();
        evil["segments"]["0"]["encryption"] = json!("cipher_null-ecb");
        let mut primary = copy_at(
            MAGIC_PRIMARY,
            0,
            32 << 10,
            7,
            UUID,
            ours().to_string().as_bytes(),
        );
        primary[6000] ^= 1; // the checksum no longer holds
        let hidden = copy_at(
            MAGIC_SECONDARY,
            16 << 10,
            16 << 10,
            7,
            UUID,
            evil.to_string().as_bytes(),
        );
        primary[16 << 10..32 << 10].copy_from_slice(&hidden);
        let mut img = primary;
        img.extend(copy_at(
            MAGIC_SECONDARY,
            32 << 10,
            32 << 10,
            7,
            UUID,
            ours().to_string().as_bytes(),
        ));
        let err = parsed(&img).unwrap_err();
        assert!(
            err.contains("segment encryption") || err.contains("secondary header magic"),
            "{err}"
        );
        // The same with a harmless copy at 16 KiB: the decoy at 32 KiB is refused.
        let mut img2 = img.clone();
        let fine = copy_at(
            MAGIC_SECONDARY,
            16 << 10,
            16 << 10,
            7,
            UUID,
            ours().to_string().as_bytes(),
        );
        img2[16 << 10..32 << 10].copy_from_slice(&fine);
        let err = parsed(&img2).unwrap_err();
        assert!(
            err.contains("secondary header magic at byte 32768"),
            "{err}"
        );
        // A stray secondary magic beside a valid pair is refused too.
        let mut img3 = image(&ours(), &ours());
        img3.resize(128 << 10, 0);
        img3[64 << 10..(64 << 10) + 6].copy_from_slice(MAGIC_SECONDARY);
        assert!(
            parsed(&img3)
                .unwrap_err()
                .contains("secondary header magic at byte 65536")
        );
    }

    #[test]
    fn json_that_json_c_reads_otherwise_is_refused() {
        let text = ours().to_string();
        // A key with a NUL, which json-c cuts to "encryption" and lets overwrite.
        let nul = text.replacen(
            r#""sector_size":4096"#,
            r#""sector_size":4096,"encryption\u0000":"cipher_null-ecb""#,
            1,
        );
        assert!(
            strict_json(nul.as_bytes())
                .unwrap_err()
                .contains("control character")
        );
        // A duplicate key: json-c keeps the last.
        let dup = text.replacen(
            r#""sector_size":4096"#,
            r#""sector_size":4096,"encryption":"cipher_null-ecb""#,
            1,
        );
        assert!(
            strict_json(dup.as_bytes())
                .unwrap_err()
                .contains("duplicate key")
        );
        // The same through an escape that decodes to the same key.
        let esc = text.replacen(
            r#""sector_size":4096"#,
            r#""sector_size":4096,"\u0065ncryption":"cipher_null-ecb""#,
            1,
        );
        assert!(
            strict_json(esc.as_bytes())
                .unwrap_err()
                .contains("duplicate key")
        );
        // A control character in a value.
        let ctl = text.replacen("cryptdisk", "crypt\\u0001disk", 1);
        assert!(
            strict_json(ctl.as_bytes())
                .unwrap_err()
                .contains("control character")
        );
        // Each of them in a header with valid checksums is refused as a whole.
        for forged in [&nul, &dup, &esc] {
            let img = {
                let mut i = copy_bytes(MAGIC_PRIMARY, 16 << 10, 7, UUID, forged.as_bytes());
                i.extend(copy_bytes(
                    MAGIC_SECONDARY,
                    16 << 10,
                    7,
                    UUID,
                    forged.as_bytes(),
                ));
                i
            };
            assert!(parsed(&img).is_err());
        }
        // Bytes after the JSON text, and text that does not start the area.
        let mut img = image(&ours(), &ours());
        let end = BINARY_HEADER_BYTES + text.len();
        img[end + 10] = b' ';
        resum(&mut img[..16 << 10]);
        assert!(
            parsed(&img)
                .unwrap_err()
                .contains("non-zero byte after the JSON")
        );
        let mut spaced = b" ".to_vec();
        spaced.extend(text.as_bytes());
        let mut img = copy_bytes(MAGIC_PRIMARY, 16 << 10, 7, UUID, &spaced);
        img.extend(copy_bytes(MAGIC_SECONDARY, 16 << 10, 7, UUID, &spaced));
        assert!(parsed(&img).unwrap_err().contains("exactly one object"));
    }

    #[test]
    fn ids_are_numbers_as_libcryptsetup_writes_them() {
        // Found by the luks2_differential fuzz target: libcryptsetup refuses a
        // digest id that is not a number, so we must too.
        refused(
            |h| {
                let d = h["digests"]["0"].take();
                h["digests"].as_object_mut().unwrap().clear();
                h["digests"][" "] = d;
            },
            "digests id",
        );
        refused(
            |h| {
                let k = h["keyslots"]["0"].take();
                h["keyslots"].as_object_mut().unwrap().clear();
                h["keyslots"]["00"] = k;
            },
            "keyslots id",
        );
        refused(
            |h| h["tokens"]["0"]["keyslots"] = json!(["32"]),
            "not an id",
        );
        assert!(is_id("0") && is_id("31") && !is_id("32") && !is_id("-1") && !is_id("01"));
    }

    #[test]
    fn fields_we_never_write_and_unbounded_costs_are_refused() {
        refused(|h| h["segments"]["0"]["extra"] = json!(1), "never write");
        refused(|h| h["keyslots"]["0"]["priority"] = json!(2), "never write");
        refused(
            |h| h["keyslots"]["0"]["kdf"]["memory"] = json!(1),
            "never write",
        );
        refused(
            |h| h["keyslots"]["0"]["area"]["shift_size"] = json!("0"),
            "never write",
        );
        refused(|h| h["digests"]["0"]["extra"] = json!(1), "never write");
        refused(|h| h["tokens"]["0"]["extra"] = json!(1), "never write");
        refused(|h| h["config"]["extra"] = json!(1), "never write");
        refused(
            |h| h["config"]["requirements"] = json!({"mandatory": []}),
            "requirements",
        );
        refused(
            |h| h["keyslots"]["0"]["kdf"]["iterations"] = json!(4294967295u64),
            "kdf iterations",
        );
        refused(
            |h| h["keyslots"]["0"]["af"]["stripes"] = json!(4000000),
            "af stripes",
        );
        refused(
            |h| h["digests"]["0"]["iterations"] = json!(1u64 << 32),
            "digest iterations",
        );
        refused(
            |h| h["keyslots"]["0"]["area"]["key_size"] = json!(8),
            "area key_size",
        );
        refused(
            |h| h["keyslots"]["0"]["area"]["size"] = json!("4096"),
            "area size",
        );
        refused(
            |h| h["keyslots"]["0"]["kdf"]["salt"] = json!("AA=="),
            "kdf salt",
        );
        refused(|h| h["digests"]["0"]["digest"] = json!("x"), "digest value");
        refused(
            |h| h["tokens"]["0"]["rotation"] = json!({"phase": "retiring", "keyslots": [], "x": 1}),
            "token.rotation",
        );
    }

    #[test]
    fn malformed_binary_headers_are_refused_without_panic() {
        assert_eq!(parsed(&[0u8; 40 << 10]).unwrap(), None);
        assert_eq!(parsed(b"").unwrap(), None);
        let good = image(&ours(), &ours());
        // Truncated in the primary: refused, never a panic.
        for cut in [6, 100, 4096, 5000, (16 << 10) - 1] {
            assert!(parsed(&good[..cut]).is_err(), "cut at {cut}");
        }
        // Truncated in the secondary: libcryptsetup reads the primary alone.
        for cut in [16 << 10, (16 << 10) + 10, good.len() - 1] {
            assert_eq!(
                parsed(&good[..cut]).unwrap().unwrap().copies,
                Copies::PrimaryOnly
            );
        }
        // A header size LUKS2 does not define, such as a 1 GiB JSON area, on
        // both copies.
        let mut img = good.clone();
        img[8..16].copy_from_slice(&(1u64 << 30).to_be_bytes());
        img[(16 << 10) + 8..(16 << 10) + 16].copy_from_slice(&(1u64 << 30).to_be_bytes());
        assert!(parsed(&img).unwrap_err().contains("header size"));
        // A size within libcryptsetup's bounds that LUKS2 does not define.
        let mut img = copy_at(
            MAGIC_PRIMARY,
            0,
            20 << 10,
            7,
            UUID,
            ours().to_string().as_bytes(),
        );
        img.extend(copy_at(
            MAGIC_SECONDARY,
            20 << 10,
            20 << 10,
            7,
            UUID,
            ours().to_string().as_bytes(),
        ));
        assert!(parsed(&img).unwrap_err().contains("header size"));
        // LUKS1 and other versions on both copies.
        let mut img = good.clone();
        img[6..8].copy_from_slice(&1u16.to_be_bytes());
        img[(16 << 10) + 6..(16 << 10) + 8].copy_from_slice(&1u16.to_be_bytes());
        assert!(parsed(&img).unwrap_err().contains("LUKS version 1"));
        // Another checksum algorithm is refused, not skipped.
        let mut img = good.clone();
        img[72..78].copy_from_slice(b"sha512");
        assert!(parsed(&img).unwrap_err().contains("checksum algorithm"));
        // A copy that says it lies elsewhere is unusable, as libcryptsetup has it.
        let mut img = good.clone();
        img[(16 << 10) + 256..(16 << 10) + 264].copy_from_slice(&0u64.to_be_bytes());
        resum(&mut img[16 << 10..32 << 10]);
        assert_eq!(parsed(&img).unwrap().unwrap().copies, Copies::PrimaryOnly);
        // A JSON area with no terminator.
        let mut img = good.clone();
        img[BINARY_HEADER_BYTES..16 << 10].fill(b'{');
        resum(&mut img[..16 << 10]);
        assert!(parsed(&img).unwrap_err().contains("terminating NUL"));
    }

    #[test]
    fn nothing_that_is_not_json_object_panics() {
        for v in [
            json!(null),
            json!([]),
            json!("x"),
            json!({"segments": 3}),
            json!({"keyslots": {"0": 1}}),
        ] {
            assert!(validate(&v).is_err());
        }
    }
}
