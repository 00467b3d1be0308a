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

use serde_json::Value;

use super::{
    CIPHER, CIPHER_MODE, Error, INTEGRITY_ALGORITHM, INTEGRITY_KEY_BYTES, LUKS2_HEADER_BYTES,
    Result, SECTOR_SIZE, TOKEN_TYPE, VOLUME_KEY_BYTES,
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
const MAGIC_PRIMARY: &[u8; 6] = b"LUKS\xba\xbe";
const MAGIC_SECONDARY: &[u8; 6] = b"SKUL\xba\xbe";

/// Activation flags we may find stored in the header.
const ALLOWED_FLAGS: [&str; 4] = [
    "no-read-workqueue",
    "no-write-workqueue",
    "allow-discards",
    "no-journal",
];

/// One copy (primary or secondary) of a LUKS2 header.
struct Copy {
    hdr_size: u64,
    seqid: u64,
    label: String,
    uuid: String,
    json: Value,
}

/// A LUKS2 header whose two copies agree, read without libcryptsetup.
#[derive(Clone, Debug, PartialEq)]
pub struct Header {
    /// Size of one copy (binary header and JSON area) in bytes.
    pub hdr_size: u64,
    pub label: String,
    /// The UUID of the binary header, as written (LUKS2 stores it as text).
    pub uuid: String,
    pub json: Value,
}

/// Reads a NUL-terminated text field of the binary header.
fn text(field: &[u8]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

/// Why a header copy could not be read: not LUKS2 at all (only for the primary
/// copy), or a refusal with its reason.
enum CopyError {
    NotLuks2,
    Refused(String),
}

fn read_copy<R: Read + Seek>(
    r: &mut R,
    offset: u64,
    magic: &[u8; 6],
) -> std::result::Result<Copy, CopyError> {
    let refuse = CopyError::Refused;
    let mut binary = [0u8; BINARY_HEADER_BYTES];
    r.seek(SeekFrom::Start(offset))
        .and_then(|_| r.read_exact(&mut binary))
        .map_err(|e| refuse(format!("cannot read the header at byte {offset}: {e}")))?;
    if &binary[0..6] != magic {
        if offset == 0 {
            return Err(CopyError::NotLuks2);
        }
        return Err(refuse(format!("no secondary header at byte {offset}")));
    }
    let version = u16::from_be_bytes([binary[6], binary[7]]);
    if version != 2 {
        return Err(refuse(format!(
            "LUKS version {version}; only LUKS2 is used"
        )));
    }
    let hdr_size = u64::from_be_bytes(binary[8..16].try_into().expect("8 bytes"));
    let seqid = u64::from_be_bytes(binary[16..24].try_into().expect("8 bytes"));
    if !HEADER_SIZES.contains(&hdr_size) {
        return Err(refuse(format!(
            "header size {hdr_size} is not one LUKS2 defines"
        )));
    }
    let label = text(&binary[24..72]);
    let uuid = text(&binary[168..208]);
    let mut area = vec![0u8; hdr_size as usize - BINARY_HEADER_BYTES];
    r.read_exact(&mut area)
        .map_err(|e| refuse(format!("cannot read the JSON area: {e}")))?;
    let end = area.iter().position(|&b| b == 0).unwrap_or(area.len());
    let json = serde_json::from_slice(&area[..end])
        .map_err(|e| refuse(format!("JSON metadata does not parse: {e}")))?;
    Ok(Copy {
        hdr_size,
        seqid,
        label,
        uuid,
        json,
    })
}

/// Reads both header copies from `r` (a device, an image, or bytes in memory)
/// and requires them to agree. `Ok(None)`: there is no LUKS2 header at all.
pub fn parse<R: Read + Seek>(r: &mut R) -> std::result::Result<Option<Header>, String> {
    let primary = match read_copy(r, 0, MAGIC_PRIMARY) {
        Ok(c) => c,
        Err(CopyError::NotLuks2) => return Ok(None),
        Err(CopyError::Refused(reason)) => return Err(reason),
    };
    let secondary = read_copy(r, primary.hdr_size, MAGIC_SECONDARY).map_err(|e| match e {
        CopyError::NotLuks2 => format!("no secondary header at byte {}", primary.hdr_size),
        CopyError::Refused(reason) => reason,
    })?;
    if primary.hdr_size != secondary.hdr_size
        || primary.seqid != secondary.seqid
        || primary.label != secondary.label
        || primary.uuid != secondary.uuid
        || primary.json != secondary.json
    {
        return Err(format!(
            "the primary and secondary headers disagree (seqid {} vs {}); \
             repair or inspect it with cryptsetup before staging",
            primary.seqid, secondary.seqid
        ));
    }
    Ok(Some(Header {
        hdr_size: primary.hdr_size,
        label: primary.label,
        uuid: primary.uuid,
        json: primary.json,
    }))
}

/// Reads both header copies of `device` and requires them to agree.
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

/// Reads both header copies and checks them against [`validate_header`].
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
    if keyslots_size.saturating_add(2 * header.hdr_size) > LUKS2_HEADER_BYTES {
        return Err(format!(
            "config.keyslots_size {keyslots_size} reaches past the {LUKS2_HEADER_BYTES}-byte \
             header area"
        ));
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

/// Accepts only the header layout this driver writes; the error says what differs.
pub fn validate(json: &Value) -> std::result::Result<(), String> {
    let root = obj(json, "metadata")?;
    for key in root.keys() {
        if !["keyslots", "tokens", "segments", "digests", "config"].contains(&key.as_str()) {
            return Err(format!("unexpected top-level section {key:?}"));
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

    // Keyslots: pbkdf2-sha256 over an aes-xts area, holding a key of our size.
    let keyslots = obj(&json["keyslots"], "keyslots")?;
    if keyslots.is_empty() {
        return Err("no keyslots".to_string());
    }
    for (id, slot) in keyslots {
        let what = format!("keyslot {id}");
        expect(&slot["type"], "luks2", &format!("{what} type"))?;
        expect(&slot["key_size"], key_bytes, &format!("{what} key_size"))?;
        expect(&slot["kdf"]["type"], "pbkdf2", &format!("{what} kdf"))?;
        expect(&slot["kdf"]["hash"], "sha256", &format!("{what} kdf hash"))?;
        expect(&slot["area"]["type"], "raw", &format!("{what} area type"))?;
        expect(
            &slot["area"]["encryption"],
            format!("{CIPHER}-{CIPHER_MODE}"),
            &format!("{what} area encryption"),
        )?;
        expect(
            &slot["af"]["type"],
            "luks1",
            &format!("{what} anti-forensic splitter"),
        )?;
        expect(&slot["af"]["hash"], "sha256", &format!("{what} af hash"))?;
        let area_end = slot["area"]["offset"]
            .as_str()
            .and_then(|o| o.parse::<u64>().ok())
            .zip(
                slot["area"]["size"]
                    .as_str()
                    .and_then(|s| s.parse::<u64>().ok()),
            )
            .map(|(o, s)| o.saturating_add(s));
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
    expect(&digest["type"], "pbkdf2", "digest type")?;
    expect(&digest["hash"], "sha256", "digest hash")?;
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
    if !token["key_version"].is_u64() {
        return Err("token.key_version is missing or not a number".to_string());
    }
    let token_slots = string_set(&token["keyslots"], "token keyslots")?;
    // Mid-rotation, the keyslots the rotation names may exist beside the token's.
    let rotating: BTreeSet<&str> = match token.get("rotation") {
        None => BTreeSet::new(),
        Some(r) => match r["phase"].as_str() {
            Some("adding") if r["to_version"].is_u64() => [r["keyslot"]
                .as_str()
                .ok_or("token.rotation.keyslot is not a string")?]
            .into(),
            Some("retiring") => string_set(&r["keyslots"], "token.rotation keyslots")?,
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
    if let Some(req) = config.get("requirements")
        && obj(req, "config.requirements")?
            .get("mandatory")
            .and_then(Value::as_array)
            .is_some_and(|m| !m.is_empty())
    {
        return Err(format!("mandatory requirements {req}; expected none"));
    }
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

fn string_set<'a>(v: &'a Value, what: &str) -> std::result::Result<BTreeSet<&'a str>, String> {
    v.as_array()
        .ok_or_else(|| format!("{what} is not a list"))?
        .iter()
        .map(|s| {
            s.as_str()
                .ok_or_else(|| format!("{what} holds a non-string"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The header our format writes (as libcryptsetup 2.6 lays it out).
    pub(crate) fn ours() -> Value {
        json!({
            "keyslots": {"0": {
                "type": "luks2", "key_size": 64,
                "af": {"type": "luks1", "stripes": 4000, "hash": "sha256"},
                "area": {"type": "raw", "offset": "32768", "size": "258048",
                         "encryption": "aes-xts-plain64", "key_size": 64},
                "kdf": {"type": "pbkdf2", "hash": "sha256", "iterations": 1000,
                        "salt": "AAAA"}}},
            "tokens": {"0": {"type": "cryptdisk", "keyslots": ["0"],
                             "key_id": "3f0e1d2c-0000-4000-8000-000000000001",
                             "key_version": 1, "kms": "test"}},
            "segments": {"0": {"type": "crypt", "offset": "16777216", "size": "dynamic",
                               "iv_tweak": "0", "encryption": "aes-xts-plain64",
                               "sector_size": 4096}},
            "digests": {"0": {"type": "pbkdf2", "keyslots": ["0"], "segments": ["0"],
                              "hash": "sha256", "iterations": 1000, "salt": "AA",
                              "digest": "AA"}},
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

    /// One header copy as bytes: the binary header and its JSON area (no
    /// checksum: this reader leaves checksums to libcryptsetup).
    fn copy_bytes(magic: &[u8; 6], hdr_size: u64, seqid: u64, uuid: &str, json: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; hdr_size as usize];
        b[0..6].copy_from_slice(magic);
        b[6..8].copy_from_slice(&2u16.to_be_bytes());
        b[8..16].copy_from_slice(&hdr_size.to_be_bytes());
        b[16..24].copy_from_slice(&seqid.to_be_bytes());
        b[24..32].copy_from_slice(b"cryptdsk");
        b[168..168 + uuid.len()].copy_from_slice(uuid.as_bytes());
        b[BINARY_HEADER_BYTES..BINARY_HEADER_BYTES + json.len()].copy_from_slice(json);
        b
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
    fn copies_that_disagree_are_refused() {
        let mut evil = ours();
        evil["segments"]["0"]["encryption"] = json!("cipher_null-ecb");
        for (p, s) in [(&ours(), &evil), (&evil, &ours())] {
            let err = parsed(&image(p, s)).unwrap_err();
            assert!(err.contains("disagree"), "{err}");
        }
        let mut img = image(&ours(), &ours());
        img[(16 << 10) + 16..(16 << 10) + 24].copy_from_slice(&8u64.to_be_bytes());
        assert!(parsed(&img).unwrap_err().contains("seqid 7 vs 8"));
        let mut img = image(&ours(), &ours());
        img[(16 << 10) + 168] = b'a';
        assert!(parsed(&img).unwrap_err().contains("disagree"));
    }

    #[test]
    fn malformed_binary_headers_are_refused_without_panic() {
        assert_eq!(parsed(&[0u8; 40 << 10]).unwrap(), None);
        assert!(parsed(b"").unwrap_err().contains("cannot read the header"));
        let good = image(&ours(), &ours());
        // Truncated anywhere: refused, never a panic.
        for cut in [
            6,
            100,
            4096,
            5000,
            16 << 10,
            (16 << 10) + 10,
            good.len() - 1,
        ] {
            assert!(parsed(&good[..cut]).is_err(), "cut at {cut}");
        }
        // A header size LUKS2 does not define, such as a 1 GiB JSON area.
        let mut img = good.clone();
        img[8..16].copy_from_slice(&(1u64 << 30).to_be_bytes());
        assert!(parsed(&img).unwrap_err().contains("header size"));
        // LUKS1 and other versions.
        let mut img = good.clone();
        img[6..8].copy_from_slice(&1u16.to_be_bytes());
        assert!(parsed(&img).unwrap_err().contains("LUKS version 1"));
        // No secondary copy.
        let mut img = good.clone();
        img[16 << 10] = 0;
        assert!(parsed(&img).unwrap_err().contains("no secondary header"));
        // A JSON area that fills its whole space with no terminator is parsed as
        // is; garbage in it is refused.
        let mut img = good.clone();
        img[BINARY_HEADER_BYTES..16 << 10].fill(b'{');
        assert!(parsed(&img).unwrap_err().contains("does not parse"));
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
