//! Reading the LUKS2 on-disk header without libcryptsetup: the binary header and
//! its JSON metadata, so that what a device claims can be checked before any
//! keyslot is tried.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use super::{Error, Result};

/// Size of the binary part of a LUKS2 header; the JSON area follows it.
pub const BINARY_HEADER_BYTES: usize = 4096;
/// Largest header (binary + JSON) that LUKS2 allows.
pub const MAX_HEADER_BYTES: u64 = 4 << 20;
const MAGIC: &[u8; 6] = b"LUKS\xba\xbe";

/// Reads the primary LUKS2 header of `device` and returns its JSON metadata.
pub fn read_json(device: &Path) -> Result<serde_json::Value> {
    let not_luks2 = || Error::NotLuks2 {
        device: device.to_path_buf(),
    };
    let io = |source| Error::Io {
        op: "read LUKS2 header",
        target: device.display().to_string(),
        source,
    };
    let mut file = File::open(device).map_err(io)?;
    let mut binary = [0u8; BINARY_HEADER_BYTES];
    file.read_exact(&mut binary).map_err(|_| not_luks2())?;
    if &binary[0..6] != MAGIC || binary[6..8] != [0, 2] {
        return Err(not_luks2());
    }
    let hdr_size = u64::from_be_bytes(binary[8..16].try_into().expect("8 bytes"));
    if !(BINARY_HEADER_BYTES as u64 + 1..=MAX_HEADER_BYTES).contains(&hdr_size) {
        return Err(Error::BadHeader {
            device: device.to_path_buf(),
            reason: format!("header size {hdr_size} is outside what LUKS2 allows"),
        });
    }
    let mut area = vec![0u8; hdr_size as usize - BINARY_HEADER_BYTES];
    file.read_exact(&mut area).map_err(io)?;
    let end = area.iter().position(|&b| b == 0).unwrap_or(area.len());
    serde_json::from_slice(&area[..end]).map_err(|e| Error::BadHeader {
        device: device.to_path_buf(),
        reason: format!("JSON metadata does not parse: {e}"),
    })
}
