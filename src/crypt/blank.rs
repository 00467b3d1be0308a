//! The blank-device check that stands before every format.
//!
//! Formatting destroys whatever a device holds, so [`super::format`] takes a
//! [`BlankDevice`], which only [`probe_blank`] (or [`probe_unfinished`]) makes.
//! The probe opens the device once, exclusively (`O_EXCL`: no mount and no other
//! exclusive opener can take it while we hold it), and reads through that one
//! descriptor: the first and the last MiB, and [`SAMPLES`] blocks of
//! [`SAMPLE_BYTES`] spread evenly over the rest, all of which must be zeros. A
//! device that holds anything there (a filesystem, a partition table, a LUKS
//! header, a swap signature, random data) is refused, and the refusal names the
//! signature it recognised or the first non-zero byte.
//!
//! Sampling cannot prove a disk blank (data only between the samples reads as
//! zeros), so this is one witness of two: the node formats only when the
//! controller's fresh-disk record ([`crate::volume::fresh`]) says so as well.
//!
//! The [`BlankDevice`] keeps the exclusive descriptor open until the format, and
//! remembers which device it read, so that the format writes the device that was
//! probed (see [`BlankDevice::reopen_for_format`]).

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::{Error, Result};

/// How much of each end of a device must be zero. Every common signature (MBR,
/// GPT and its backup, LUKS, ext*, xfs, btrfs, swap, md and LVM labels) lives in
/// the first MiB, the backup GPT and md 0.9/1.0 superblocks in the last.
pub const PROBE_BYTES: u64 = 1024 * 1024;
/// Blocks read between the two ends, whatever the device's size: one at every
/// 1/256 of the interior (its middle, quarters, eighths... included), so the
/// probe costs the same 3 MiB of reads on a 1 GiB and a 64 TiB disk, and on a
/// disk of up to 33 MiB no 128 KiB of data fits between two samples.
pub const SAMPLES: u64 = 255;
/// Size of each sample.
pub const SAMPLE_BYTES: u64 = 4096;

/// Which device a descriptor reads: the device number for a block device, the
/// filesystem and inode for an image file (tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Identity {
    dev: u64,
    ino: u64,
    rdev: u64,
}

impl Identity {
    fn of(meta: &std::fs::Metadata) -> Self {
        Identity {
            dev: meta.dev(),
            ino: meta.ino(),
            rdev: meta.rdev(),
        }
    }

    /// Whether two views name the same device. Device nodes for one block
    /// device may differ (`/dev/sdb`, a by-id link's target, a node in another
    /// mount namespace); their device number may not.
    fn same_device(&self, other: &Identity) -> bool {
        if self.rdev != 0 || other.rdev != 0 {
            self.rdev == other.rdev
        } else {
            (self.dev, self.ino) == (other.dev, other.ino)
        }
    }
}

/// A device that [`probe_blank`] found blank, held open exclusively until it
/// is formatted or dropped.
#[derive(Debug)]
pub struct BlankDevice {
    path: PathBuf,
    file: File,
    identity: Identity,
}

impl BlankDevice {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Zeroes exactly the LUKS2 header area (the first 16 MiB, both copies and
    /// the keyslots area) of the held device and flushes it: what is left of a
    /// first format that a crash interrupted, before it is redone.
    pub fn wipe_header_area(&self) -> Result<()> {
        use std::io::{Seek, SeekFrom, Write};
        let io = |op: &'static str| {
            let target = self.path.display().to_string();
            move |source| Error::Io { op, target, source }
        };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(fd_path(&self.file))
            .map_err(io("open to wipe the header area"))?;
        let size = f.seek(SeekFrom::End(0)).map_err(io("size"))?;
        f.seek(SeekFrom::Start(0)).map_err(io("seek"))?;
        let zeros = vec![0u8; 1 << 20];
        let mut left = super::LUKS2_HEADER_BYTES.min(size);
        while left > 0 {
            let n = left.min(zeros.len() as u64) as usize;
            f.write_all(&zeros[..n])
                .map_err(io("wipe the header area"))?;
            left -= n as u64;
        }
        f.sync_all().map_err(io("flush the wiped header area"))
    }

    /// Gives up the exclusive descriptor and returns a plain one on the same
    /// device, after checking that the path still names the device that was
    /// probed (a device node or link swapped meanwhile is refused). The format
    /// goes through `/proc/self/fd/<fd>` of the returned file, so it writes the
    /// probed device whatever the path names by then. libcryptsetup checks the
    /// device with an exclusive open of its own before it writes, which our
    /// exclusive descriptor would make fail; so ours is closed just before.
    pub fn reopen_for_format(self) -> Result<File> {
        let io = |op: &'static str, target: &Path| {
            let target = target.display().to_string();
            move |source| Error::Io { op, target, source }
        };
        let now = std::fs::metadata(&self.path).map_err(io("stat before format", &self.path))?;
        if !self.identity.same_device(&Identity::of(&now)) {
            return Err(Error::NotBlank {
                device: self.path.clone(),
                reason: format!(
                    "now names device {}:{}, not the {}:{} that was probed; refusing to format it",
                    nix::sys::stat::major(now.rdev()),
                    nix::sys::stat::minor(now.rdev()),
                    nix::sys::stat::major(self.identity.rdev),
                    nix::sys::stat::minor(self.identity.rdev),
                ),
            });
        }
        let via = fd_path(&self.file);
        let plain = File::open(&via).map_err(io("reopen for format", &self.path))?;
        let meta = plain.metadata().map_err(io("stat", &self.path))?;
        if !self.identity.same_device(&Identity::of(&meta)) {
            return Err(Error::NotBlank {
                device: self.path.clone(),
                reason: "reopened as another device; refusing to format it".to_string(),
            });
        }
        drop(self.file);
        Ok(plain)
    }
}

/// The `/proc` path through which a later open reaches the same file as `file`.
pub fn fd_path(file: &File) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

/// Opens `device` once, exclusively for a block device (a mounted device or one
/// another program holds exclusively is refused), and returns it with its size.
fn open_exclusive(device: &Path) -> Result<(File, u64, Identity)> {
    let io = |op: &'static str| {
        let target = device.display().to_string();
        move |source| Error::Io { op, target, source }
    };
    // O_EXCL without O_CREAT asks a block device for exclusive use; on a
    // regular file (tests) Linux ignores it.
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL | libc::O_CLOEXEC)
        .open(device)
        .map_err(|source| match source.raw_os_error() {
            Some(libc::EBUSY) => Error::NotBlank {
                device: device.to_path_buf(),
                reason: "is in use (mounted, or held open exclusively by another program); \
                         refusing to format it"
                    .to_string(),
            },
            _ => io("open for probing")(source),
        })?;
    let identity = Identity::of(&file.metadata().map_err(io("stat"))?);
    let size = file.seek(SeekFrom::End(0)).map_err(io("size"))?;
    Ok((file, size, identity))
}

/// Reads `len` bytes at `offset` and returns why they are not all zeros, if
/// they are not.
fn nonzero_at(file: &File, device: &Path, offset: u64, len: u64) -> Result<Option<String>> {
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, offset)
        .map_err(|source| Error::Io {
            op: "read",
            target: device.display().to_string(),
            source,
        })?;
    Ok(describe_nonzero(&buf, offset))
}

/// Where the samples between `start` and `end` are read: [`SAMPLES`] blocks
/// spread evenly, aligned down to [`SAMPLE_BYTES`], none outside the range.
fn sample_offsets(start: u64, end: u64) -> impl Iterator<Item = u64> {
    let span = end.saturating_sub(start);
    (1..=SAMPLES).filter_map(move |i| {
        let at = start + (span as u128 * i as u128 / (SAMPLES + 1) as u128) as u64;
        let at = at / SAMPLE_BYTES * SAMPLE_BYTES;
        (at >= start && at + SAMPLE_BYTES <= end).then_some(at)
    })
}

/// Checks that `start..size` of an open device reads as zeros at both ends and
/// at every sample; the first finding is the error's reason.
fn check_zeros(file: &File, device: &Path, start: u64, size: u64) -> Result<()> {
    let head_len = (size - start).min(PROBE_BYTES);
    let tail_start = size.saturating_sub(PROBE_BYTES).max(start + head_len);
    let ranges = std::iter::once((start, head_len))
        .chain(std::iter::once((tail_start, size - tail_start)))
        .chain(sample_offsets(start + head_len, tail_start).map(|at| (at, SAMPLE_BYTES)));
    for (offset, len) in ranges {
        if len == 0 {
            continue;
        }
        if let Some(reason) = nonzero_at(file, device, offset, len)? {
            return Err(Error::NotBlank {
                device: device.to_path_buf(),
                reason,
            });
        }
    }
    Ok(())
}

/// Opens `device` exclusively and returns a [`BlankDevice`] when its signature
/// probe, both ends and the spread samples all read as zeros, or
/// [`Error::NotBlank`] naming what was found.
pub fn probe_blank(device: &Path) -> Result<BlankDevice> {
    let (file, size, identity) = open_exclusive(device)?;
    check_zeros(&file, device, 0, size)?;
    Ok(BlankDevice {
        path: device.to_path_buf(),
        file,
        identity,
    })
}

/// A device with our own header from a format that did not finish: blank when
/// its data area (after the LUKS2 header) reads as zeros at both ends and at the
/// spread samples, since nothing was ever written through a mapping.
pub fn probe_unfinished(device: &Path) -> Result<BlankDevice> {
    let (file, size, identity) = open_exclusive(device)?;
    let data_start = super::LUKS2_HEADER_BYTES.min(size);
    check_zeros(&file, device, data_start, size).map_err(|e| match e {
        Error::NotBlank { device, reason } => Error::NotBlank {
            device,
            reason: format!("holds an unfinished cryptdisk header, and its data area {reason}"),
        },
        other => other,
    })?;
    Ok(BlankDevice {
        path: device.to_path_buf(),
        file,
        identity,
    })
}

/// A device where our format was cut off before libcryptsetup wrote the header:
/// libcryptsetup fills the keyslots area with random bytes first, so a power
/// loss then leaves no header at all and noise at byte 32768 that
/// [`probe_blank`] refuses for ever. Blank when the two header copies' place
/// reads as zeros and so does everything after our keyslots area (both ends
/// and the spread samples), whatever the keyslots area holds. The node formats
/// such a device only under the controller's fresh-disk record, as any blank one.
pub fn probe_keyslots_filled(device: &Path) -> Result<BlankDevice> {
    let (file, size, identity) = open_exclusive(device)?;
    let keyslots_start = (2 * super::LUKS2_METADATA_BYTES).min(size);
    let keyslots_end = (keyslots_start + super::LUKS2_KEYSLOTS_BYTES).min(size);
    check_zeros(&file, device, 0, keyslots_start)?;
    check_zeros(&file, device, keyslots_end, size)?;
    // libcryptsetup fills the whole keyslots area with random bytes: every
    // 4 KiB block sampled across it must hold some, or the bytes there are not
    // its fill but data (a small disk's middle lies in this range).
    let mut at = keyslots_start;
    while at + 4096 <= keyslots_end {
        if nonzero_at(&file, device, at, 4096)?.is_none() {
            return Err(Error::NotBlank {
                device: device.to_path_buf(),
                reason: format!(
                    "holds data in its first {keyslots_end} bytes that is not a filled \
                     keyslots area (zeros at byte {at}); refusing to format a device that \
                     is not blank"
                ),
            });
        }
        at += 64 << 10;
    }
    Ok(BlankDevice {
        path: device.to_path_buf(),
        file,
        identity,
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
        // The interior is sampled: data at a sample is found whatever the size.
        for size in [64u64 << 20, 3 << 30] {
            let at = sample_offsets(PROBE_BYTES, size - PROBE_BYTES)
                .nth(31)
                .unwrap();
            let f = image(size, &[(at + 100, b"\x01")]);
            let err = probe_blank(f.path()).unwrap_err().to_string();
            assert!(err.contains(&format!("byte {}", at + 100)), "{size}: {err}");
        }
        // Between samples nothing is read: why the probe is only one witness and
        // a format also needs the controller's fresh-disk record.
        let f = image(size, &[(size / 2 + SAMPLE_BYTES + 7, b"\x01")]);
        assert!(probe_blank(f.path()).is_ok());
    }

    #[test]
    fn samples_are_a_fixed_number_spread_over_the_interior() {
        for size in [4u64 << 20, 64 << 20, 1 << 40, 64 << 40] {
            let (start, end) = (PROBE_BYTES, size - PROBE_BYTES);
            let at: Vec<u64> = sample_offsets(start, end).collect();
            assert_eq!(at.len() as u64, SAMPLES, "{size}");
            assert!(at.windows(2).all(|w| w[0] + SAMPLE_BYTES <= w[1]), "{size}");
            assert!(at.iter().all(|&a| a >= start && a + SAMPLE_BYTES <= end));
            assert!(at.iter().all(|&a| a % SAMPLE_BYTES == 0));
            // Evenly: the first and last land within one spacing of the ends.
            let spacing = (end - start) / (SAMPLES + 1);
            assert!(at[0] - start <= spacing && end - at[at.len() - 1] <= spacing + SAMPLE_BYTES);
        }
        // A device too small for samples has only its two ends read.
        assert_eq!(sample_offsets(PROBE_BYTES, PROBE_BYTES).count(), 0);
    }

    #[test]
    fn an_unfinished_header_is_blank_only_when_its_data_area_is() {
        let size = 64u64 << 20;
        let data = super::super::LUKS2_HEADER_BYTES;
        // The header area itself is not checked here (it is ours, read elsewhere).
        let f = image(size, &[(0, b"LUKS\xba\xbe\x00\x02")]);
        assert!(probe_unfinished(f.path()).is_ok());
        let interior = sample_offsets(data + PROBE_BYTES, size - PROBE_BYTES)
            .nth(10)
            .unwrap();
        for at in [data, size - 1, interior] {
            let f = image(size, &[(at, b"\x01")]);
            let err = probe_unfinished(f.path()).unwrap_err().to_string();
            assert!(err.contains("unfinished"), "{err}");
            assert!(err.contains(&format!("byte {at}")), "{at}: {err}");
        }
    }

    #[test]
    fn the_format_goes_to_the_probed_file_and_not_to_a_replacement() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        let blank = probe_blank(&path).unwrap();
        let reopened = blank.reopen_for_format().unwrap();
        assert_eq!(
            reopened.metadata().unwrap().ino(),
            std::fs::metadata(&path).unwrap().ino()
        );
        // The path swapped for another file between probe and format: refused.
        let blank = probe_blank(&path).unwrap();
        let other = dir.path().join("other.img");
        std::fs::File::create(&other)
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        std::fs::rename(&other, &path).unwrap();
        let err = blank.reopen_for_format().unwrap_err().to_string();
        assert!(err.contains("not the"), "{err}");
    }
}
