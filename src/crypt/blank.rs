//! The blank-device check that stands before every format.
//!
//! Formatting destroys whatever a device holds, so [`super::format`] takes a
//! [`BlankDevice`], which only [`probe_blank`] makes: the first and the last MiB
//! of the device read as zeros. A device that holds anything there (a filesystem,
//! a partition table, a LUKS header, a swap signature, random data) is refused, and
//! the refusal names the signature it recognised.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::{Error, Result};

/// How much of each end of a device must be zero. Every common signature (MBR,
/// GPT and its backup, LUKS, ext*, xfs, btrfs, swap, md and LVM labels) lives in
/// the first MiB, the backup GPT and md 0.9/1.0 superblocks in the last.
pub const PROBE_BYTES: u64 = 1024 * 1024;

/// A device that [`probe_blank`] found blank.
#[derive(Debug)]
pub struct BlankDevice {
    path: PathBuf,
}

impl BlankDevice {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Reads both ends of `device` and returns a [`BlankDevice`] when they are all
/// zeros, or [`Error::NotBlank`] naming what was found.
pub fn probe_blank(device: &Path) -> Result<BlankDevice> {
    let io = |op: &'static str| {
        let target = device.display().to_string();
        move |source| Error::Io { op, target, source }
    };
    let mut file = File::open(device).map_err(io("open for probing"))?;
    let size = file.seek(SeekFrom::End(0)).map_err(io("size"))?;
    let head_len = size.min(PROBE_BYTES);
    let mut head = vec![0u8; head_len as usize];
    file.seek(SeekFrom::Start(0)).map_err(io("seek"))?;
    file.read_exact(&mut head).map_err(io("read head"))?;
    if let Some(reason) = describe_nonzero(&head, 0) {
        return Err(Error::NotBlank {
            device: device.to_path_buf(),
            reason,
        });
    }
    let tail_start = size.saturating_sub(PROBE_BYTES).max(head_len);
    let mut tail = vec![0u8; (size - tail_start) as usize];
    file.seek(SeekFrom::Start(tail_start)).map_err(io("seek"))?;
    file.read_exact(&mut tail).map_err(io("read tail"))?;
    if let Some(reason) = describe_nonzero(&tail, tail_start) {
        return Err(Error::NotBlank {
            device: device.to_path_buf(),
            reason,
        });
    }
    Ok(BlankDevice {
        path: device.to_path_buf(),
    })
}

/// A device with our own header from a format that did not finish: blank when
/// the first and last MiB of its data area (after the LUKS2 header) are zeros,
/// since nothing was ever written through a mapping.
pub fn probe_unfinished(device: &Path) -> Result<BlankDevice> {
    let io = |op: &'static str| {
        let target = device.display().to_string();
        move |source| Error::Io { op, target, source }
    };
    let mut file = File::open(device).map_err(io("open for probing"))?;
    let size = file.seek(SeekFrom::End(0)).map_err(io("size"))?;
    let data_start = super::LUKS2_HEADER_BYTES.min(size);
    for start in [data_start, size.saturating_sub(PROBE_BYTES).max(data_start)] {
        let len = (size - start).min(PROBE_BYTES);
        let mut buf = vec![0u8; len as usize];
        file.seek(SeekFrom::Start(start)).map_err(io("seek"))?;
        file.read_exact(&mut buf).map_err(io("read data area"))?;
        if let Some(first) = buf.iter().position(|&b| b != 0) {
            return Err(Error::NotBlank {
                device: device.to_path_buf(),
                reason: format!(
                    "holds an unfinished cryptdisk header and data at byte {}; \
                     refusing to format it again",
                    start + first as u64
                ),
            });
        }
    }
    Ok(BlankDevice {
        path: device.to_path_buf(),
    })
}

/// `None` when `buf` (read at `offset`) is all zeros; otherwise what it holds.
fn describe_nonzero(buf: &[u8], offset: u64) -> Option<String> {
    let first = buf.iter().position(|&b| b != 0)?;
    let refusal = "refusing to format a device that is not blank";
    if offset == 0
        && let Some(sig) = signature(buf)
    {
        return Some(format!("holds {sig}; {refusal}"));
    }
    Some(format!(
        "holds non-zero data at byte {}; {refusal}",
        offset + first as u64
    ))
}

/// Recognises the common signatures at the start of a device.
pub fn signature(head: &[u8]) -> Option<&'static str> {
    let at = |off: usize, magic: &[u8]| head.get(off..off + magic.len()) == Some(magic);
    if at(0, b"LUKS\xba\xbe") {
        return Some(match head.get(6..8) {
            Some([0, 1]) => "a LUKS1 header",
            Some([0, 2]) => "a LUKS2 header",
            _ => "a LUKS header",
        });
    }
    if at(0, b"SKUL\xba\xbe") {
        return Some("a LUKS2 secondary header");
    }
    if at(0, b"XFSB") {
        return Some("an xfs filesystem");
    }
    if at(1080, &[0x53, 0xef]) {
        return Some("an ext2/3/4 filesystem");
    }
    if at(0x10040, b"_BHRfS_M") {
        return Some("a btrfs filesystem");
    }
    if at(4086, b"SWAPSPACE2") || at(4086, b"SWAP-SPACE") {
        return Some("a swap signature");
    }
    if at(512, b"EFI PART") || at(4096, b"EFI PART") {
        return Some("a GPT partition table");
    }
    if at(510, &[0x55, 0xaa]) {
        return Some("an MBR partition table or boot sector");
    }
    if at(0x218, b"LVM2 001") || at(0x418, b"LVM2 001") {
        return Some("an LVM physical volume");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn image(size: u64, writes: &[(u64, &[u8])]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(size).unwrap();
        for (off, data) in writes {
            f.seek(SeekFrom::Start(*off)).unwrap();
            f.write_all(data).unwrap();
        }
        f.flush().unwrap();
        f
    }

    #[test]
    fn zeros_are_blank() {
        let f = image(8 << 20, &[]);
        let blank = probe_blank(f.path()).unwrap();
        assert_eq!(blank.path(), f.path());
        // A device smaller than the probe window is read whole.
        let small = image(4096, &[]);
        assert!(probe_blank(small.path()).is_ok());
    }

    #[test]
    fn signatures_are_named() {
        let cases: &[(u64, &[u8], &str)] = &[
            (0, b"LUKS\xba\xbe\x00\x01", "LUKS1"),
            (0, b"LUKS\xba\xbe\x00\x02", "LUKS2"),
            (0, b"XFSB", "xfs"),
            (1080, &[0x53, 0xef], "ext2/3/4"),
            (0x10040, b"_BHRfS_M", "btrfs"),
            (4086, b"SWAPSPACE2", "swap"),
            (512, b"EFI PART", "GPT"),
            (510, &[0x55, 0xaa], "MBR"),
        ];
        for (off, magic, word) in cases {
            let f = image(8 << 20, &[(*off, magic)]);
            let err = probe_blank(f.path()).unwrap_err().to_string();
            assert!(err.contains(word), "{word}: {err}");
            assert!(err.contains("not blank"), "{err}");
        }
    }

    #[test]
    fn data_anywhere_in_either_end_is_refused() {
        let size = 64u64 << 20;
        for off in [0, 4095, PROBE_BYTES - 1, size - PROBE_BYTES, size - 1] {
            let f = image(size, &[(off, b"\x01")]);
            let err = probe_blank(f.path()).unwrap_err().to_string();
            assert!(err.contains(&format!("byte {off}")), "{off}: {err}");
        }
        // The middle is not read: a fresh disk is zero there only by convention.
        let f = image(size, &[(size / 2, b"\x01")]);
        assert!(probe_blank(f.path()).is_ok());
    }
}
