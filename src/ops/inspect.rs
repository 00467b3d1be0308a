//! `inspect`: what a LUKS2 header says, read without any key and without
//! libcryptsetup first, so that a hostile header is described, not trusted.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use super::{OpsError, printable};
use crate::crypt::{self, header};

/// What `inspect` found.
#[derive(Debug, Serialize)]
pub struct Report {
    pub device: String,
    /// Whether the device starts with a LUKS2 header.
    pub luks2: bool,
    /// Whether the header passes our validation (and libcryptsetup loads it).
    pub valid: bool,
    /// Why the header is refused, when it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header: Option<Summary>,
}

/// The parts of the header an operator looks at.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub uuid: String,
    pub label: String,
    pub header_size: u64,
    pub segments: Vec<Segment>,
    pub keyslots: Vec<Keyslot>,
    pub tokens: Vec<TokenSummary>,
    /// Our token, as written (key id, key version, KMS identity, rotation...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cryptdisk_token: Option<Value>,
    pub flags: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Segment {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub offset: String,
    pub size: String,
    pub encryption: String,
    pub sector_size: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub integrity: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Keyslot {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub key_size: String,
    pub kdf: String,
    pub kdf_hash: String,
    /// pbkdf2 iterations, or argon2 time cost.
    pub iterations: String,
    pub area_encryption: String,
}

#[derive(Debug, Serialize)]
pub struct TokenSummary {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub keyslots: Vec<String>,
}

/// A JSON value as text, whatever its type; "-" when absent.
fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn summarize(h: &header::Header) -> Summary {
    let j = &h.json;
    let entries = |key: &str| -> Vec<(String, Value)> {
        j[key]
            .as_object()
            .map(|o| o.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    };
    let segments = entries("segments")
        .into_iter()
        .map(|(id, s)| Segment {
            id,
            kind: text(&s["type"]),
            offset: text(&s["offset"]),
            size: text(&s["size"]),
            encryption: text(&s["encryption"]),
            sector_size: text(&s["sector_size"]),
            integrity: s.get("integrity").map(|i| text(&i["type"])),
        })
        .collect();
    let keyslots = entries("keyslots")
        .into_iter()
        .map(|(id, k)| Keyslot {
            id,
            kind: text(&k["type"]),
            key_size: text(&k["key_size"]),
            kdf: text(&k["kdf"]["type"]),
            kdf_hash: text(&k["kdf"]["hash"]),
            iterations: match &k["kdf"]["iterations"] {
                Value::Null => text(&k["kdf"]["time"]),
                it => text(it),
            },
            area_encryption: text(&k["area"]["encryption"]),
        })
        .collect();
    let mut cryptdisk_token = None;
    let tokens = entries("tokens")
        .into_iter()
        .map(|(id, t)| {
            if t["type"] == crypt::TOKEN_TYPE && cryptdisk_token.is_none() {
                let mut shown = t.clone();
                if let Some(o) = shown.as_object_mut() {
                    o.remove("type");
                    o.remove("keyslots");
                }
                cryptdisk_token = Some(shown);
            }
            TokenSummary {
                id,
                kind: text(&t["type"]),
                keyslots: t["keyslots"]
                    .as_array()
                    .map(|a| a.iter().map(text).collect())
                    .unwrap_or_default(),
            }
        })
        .collect();
    let flags = j["config"]["flags"]
        .as_array()
        .map(|a| a.iter().map(text).collect())
        .unwrap_or_default();
    Summary {
        uuid: h.uuid.clone(),
        label: h.label.clone(),
        header_size: h.hdr_size,
        segments,
        keyslots,
        tokens,
        cryptdisk_token,
        flags,
    }
}

/// Reads and judges the header of `device`. `Err` only when the device cannot be
/// read at all; a missing or refused header is a [`Report`] (see
/// [`Report::outcome`]).
pub async fn inspect(device: &Path) -> Result<Report, OpsError> {
    let path = device.to_path_buf();
    let read = tokio::task::spawn_blocking(move || header::read(&path))
        .await
        .map_err(|e| OpsError::Failed(e.to_string()))?;
    let mut report = Report {
        device: device.display().to_string(),
        luks2: true,
        valid: false,
        refused: None,
        header: None,
    };
    let h = match read {
        Ok(h) => h,
        Err(crypt::Error::NotLuks2 { .. }) => {
            report.luks2 = false;
            return Ok(report);
        }
        Err(crypt::Error::BadHeader { reason, .. }) => {
            report.refused = Some(reason);
            return Ok(report);
        }
        Err(e) => return Err(OpsError::Failed(e.to_string())),
    };
    report.header = Some(summarize(&h));
    if let Err(reason) = header::validate_header(&h) {
        report.refused = Some(reason);
        return Ok(report);
    }
    // Only a header that passed our checks is handed to libcryptsetup, which
    // also verifies the checksums our reader does not.
    match crypt::read_header(device).await {
        Ok(info) if info.token.is_some() => report.valid = true,
        Ok(_) => report.refused = Some("libcryptsetup finds no cryptdisk token".into()),
        Err(e) => report.refused = Some(format!("libcryptsetup refuses it: {e}")),
    }
    Ok(report)
}

impl Report {
    /// `Ok` for a valid header of ours; otherwise the error whose exit code
    /// tells why not.
    pub fn outcome(&self) -> Result<(), OpsError> {
        if !self.luks2 {
            return Err(OpsError::NotLuks2(format!(
                "{}: no LUKS2 header",
                self.device
            )));
        }
        match &self.refused {
            Some(reason) => Err(OpsError::Refused(format!(
                "{}: header refused: {reason}",
                self.device
            ))),
            None => Ok(()),
        }
    }

    /// The report for a terminal; every string from the header is escaped.
    pub fn human(&self) -> String {
        let p = |s: &str| printable(s);
        let mut out = String::new();
        let _ = writeln!(out, "device:     {}", p(&self.device));
        if !self.luks2 {
            let _ = writeln!(out, "format:     no LUKS2 header");
            return out;
        }
        let _ = writeln!(out, "format:     LUKS2");
        if let Some(h) = &self.header {
            let _ = writeln!(out, "uuid:       {}", p(&h.uuid));
            let _ = writeln!(out, "label:      {}", p(&h.label));
            let _ = writeln!(out, "header:     {} bytes per copy", h.header_size);
            for s in &h.segments {
                let _ = writeln!(
                    out,
                    "segment {}:  {} {}, sector size {}, offset {}, size {}{}",
                    p(&s.id),
                    p(&s.kind),
                    p(&s.encryption),
                    p(&s.sector_size),
                    p(&s.offset),
                    p(&s.size),
                    s.integrity
                        .as_ref()
                        .map(|i| format!(", integrity {}", p(i)))
                        .unwrap_or_default()
                );
            }
            for k in &h.keyslots {
                let _ = writeln!(
                    out,
                    "keyslot {}:  {}, key {} bytes, PBKDF {} ({}, {} iterations), area {}",
                    p(&k.id),
                    p(&k.kind),
                    p(&k.key_size),
                    p(&k.kdf),
                    p(&k.kdf_hash),
                    p(&k.iterations),
                    p(&k.area_encryption)
                );
            }
            for t in &h.tokens {
                let _ = writeln!(
                    out,
                    "token {}:    {}, keyslots [{}]",
                    p(&t.id),
                    p(&t.kind),
                    p(&t.keyslots.join(", "))
                );
            }
            if let Some(t) = &h.cryptdisk_token {
                let _ = writeln!(out, "key id:     {}", p(&text(&t["key_id"])));
                let _ = writeln!(out, "key version: {}", p(&text(&t["key_version"])));
                let _ = writeln!(out, "kms:        {}", p(&text(&t["kms"])));
                // v1 keys predate scopes: no field, and not bound to a volume.
                let derivation = match t.get("derivation") {
                    Some(d) => p(&text(d)),
                    None => "v1 (not bound to a volume; a read-write stage moves it to v2)".into(),
                };
                let _ = writeln!(out, "derivation: {derivation}");
                if let Some(c) = t.get("content") {
                    let _ = writeln!(out, "content:    {}", p(&text(c)));
                }
                if let Some(r) = t.get("rotation") {
                    let _ = writeln!(out, "rotation:   {}", p(&r.to_string()));
                }
                if let Some(w) = t.get("wipe_offset") {
                    let _ = writeln!(out, "wipe:       at byte {} (unfinished)", p(&text(w)));
                }
            }
            let _ = writeln!(out, "flags:      {}", p(&h.flags.join(", ")));
        }
        match &self.refused {
            None => {
                let _ = writeln!(out, "validation: passed (a volume of this driver)");
            }
            Some(reason) => {
                let _ = writeln!(out, "validation: REFUSED: {}", p(reason));
            }
        }
        out
    }
}
