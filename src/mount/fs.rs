//! Filesystems on a device: what is there ([`probe_fs`], our own superblock
//! reads), and e2fsprogs/xfsprogs for making, checking and growing them.
//!
//! The tools are found on `PATH` and started directly, never through a shell, so
//! no path or option is ever parsed as shell syntax. They run with `LC_ALL=C` so
//! their output (kept in errors) reads the same on every node.

use std::ffi::OsStr;
use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use super::{Error, FsType, Result, blocking, loopdev};

/// How much of a device [`probe_fs`] reads. Both supported superblocks lie in the
/// first 2 KiB; reading further catches other data there (partition tables, LUKS
/// and LVM headers, btrfs at 64 KiB's edge, random bytes) that mkfs would
/// destroy.
pub const PROBE_BYTES: usize = 64 * 1024;

/// The smallest device mkfs.xfs (xfsprogs 5.19 and later) formats: 300 MiB.
pub const XFS_MIN_BYTES: u64 = 300 * 1024 * 1024;

/// What [`probe_fs`] found at the start of a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsProbe {
    /// The first [`PROBE_BYTES`] are all zeros: safe to make a filesystem.
    Blank,
    Fs(FsType),
    /// Something else: not safe to format, not ours to mount. `first_nonzero` is
    /// the offset of the first non-zero byte, for messages.
    Unknown {
        first_nonzero: u64,
    },
}

impl FsProbe {
    /// The filesystem found, `None` for a blank device, and [`Error::UnknownData`]
    /// for anything else: the form a caller about to format or mount wants.
    pub fn into_fs(self, device: &Path) -> Result<Option<FsType>> {
        match self {
            FsProbe::Blank => Ok(None),
            FsProbe::Fs(t) => Ok(Some(t)),
            FsProbe::Unknown { first_nonzero } => Err(Error::UnknownData {
                device: device.to_path_buf(),
                first_nonzero,
            }),
        }
    }
}

/// What [`fsck`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fsck {
    Clean,
    /// Errors were found and corrected (logged as a warning with the output).
    Corrected,
    /// Not checked: xfs checks itself at mount.
    Skipped,
}

/// Reads the start of `device` (a block device or an image file) and says whether
/// it is blank, holds ext2/3/4 or xfs, or holds something else.
pub async fn probe_fs(device: &Path) -> Result<FsProbe> {
    let device = device.to_path_buf();
    blocking(move || {
        let mut file =
            File::open(&device).map_err(Error::io("open for probing", device.display()))?;
        let mut head = Vec::with_capacity(PROBE_BYTES);
        // `take` + `read_to_end`: a device smaller than PROBE_BYTES is read whole.
        (&mut file)
            .take(PROBE_BYTES as u64)
            .read_to_end(&mut head)
            .map_err(Error::io("read", device.display()))?;
        Ok(classify(&head))
    })
    .await
}

/// How many bytes of `device` the ext4 or xfs filesystem on it spans, read from
/// its superblock; `None` when it holds neither. Tells a filesystem that has not
/// caught up with its grown device.
pub async fn fs_size_bytes(device: &Path) -> Result<Option<u64>> {
    let device = device.to_path_buf();
    blocking(move || {
        let file = File::open(&device).map_err(Error::io("open for probing", device.display()))?;
        let mut head = Vec::with_capacity(PROBE_BYTES);
        file.take(PROBE_BYTES as u64)
            .read_to_end(&mut head)
            .map_err(Error::io("read", device.display()))?;
        Ok(fs_size(&head))
    })
    .await
}

fn fs_size(head: &[u8]) -> Option<u64> {
    match classify(head) {
        FsProbe::Fs(FsType::Ext4) => {
            const SB: usize = 1024;
            const INCOMPAT_64BIT: u32 = 0x80;
            let lo = u64::from(le_u32(head, SB + 0x04)?);
            let incompat = le_u32(head, SB + 0x60)?;
            let hi = if incompat & INCOMPAT_64BIT != 0 {
                u64::from(le_u32(head, SB + 0x150)?)
            } else {
                0
            };
            let block = 1024u64 << le_u32(head, SB + 0x18)?;
            Some(((hi << 32) | lo) * block)
        }
        FsProbe::Fs(FsType::Xfs) => {
            let block = u64::from(u32::from_be_bytes(head.get(4..8)?.try_into().ok()?));
            let dblocks = u64::from_be_bytes(head.get(8..16)?.try_into().ok()?);
            Some(dblocks * block)
        }
        _ => None,
    }
}

fn classify(head: &[u8]) -> FsProbe {
    match (is_ext(head), is_xfs(head)) {
        (true, false) => FsProbe::Fs(FsType::Ext4),
        (false, true) => FsProbe::Fs(FsType::Xfs),
        // Neither, or both (leftovers of an earlier format that mkfs did not
        // wipe): nothing we can mount with confidence.
        _ => match head.iter().position(|&b| b != 0) {
            None => FsProbe::Blank,
            Some(at) => FsProbe::Unknown {
                first_nonzero: at as u64,
            },
        },
    }
}

/// ext2/3/4: the superblock starts at byte 1024, with magic 0xEF53 (little-endian)
/// at offset 56 in it. A 2-byte magic matches one random block in 65536, so the
/// block size field must also be sane: `1024 << s_log_block_size` is at most
/// 64 KiB. ext2 and ext3 are mounted by the ext4 driver, so all three are Ext4.
fn is_ext(head: &[u8]) -> bool {
    const SUPERBLOCK: usize = 1024;
    let magic = head.get(SUPERBLOCK + 56..SUPERBLOCK + 58) == Some(&[0x53, 0xef][..]);
    let log_block_size = le_u32(head, SUPERBLOCK + 24);
    magic && log_block_size.is_some_and(|l| l <= 6)
}

/// xfs: the superblock is at byte 0, with magic "XFSB" and then the block size
/// (big-endian), a power of two from 512 to 64 KiB.
fn is_xfs(head: &[u8]) -> bool {
    let magic = head.get(0..4) == Some(&b"XFSB"[..]);
    let block_size = head
        .get(4..8)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(u32::from_be_bytes);
    magic && block_size.is_some_and(|b| b.is_power_of_two() && (512..=65536).contains(&b))
}

fn le_u32(buf: &[u8], at: usize) -> Option<u32> {
    buf.get(at..at + 4)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(u32::from_le_bytes)
}

/// Makes a `fstype` filesystem on `device`, overwriting whatever is there: gate it
/// on [`probe_fs`] answering [`FsProbe::Blank`].
///
/// - ext4: no reserved blocks (`-m0`: a volume is one application's, not a system
///   disk with root's reserve); inode tables and journal initialised lazily and no
///   discard pass, so making a filesystem takes seconds whatever the size.
/// - xfs: no discard pass (`-K`), for the same reason.
pub async fn mkfs(device: &Path, fstype: FsType) -> Result<()> {
    let device = device.to_path_buf();
    blocking(move || {
        let dev = device.as_os_str();
        let result = match fstype {
            FsType::Ext4 => run_tool(
                "mkfs.ext4",
                "e2fsprogs",
                &[
                    "-F".as_ref(),
                    "-q".as_ref(),
                    "-m0".as_ref(),
                    "-E".as_ref(),
                    "lazy_itable_init=1,lazy_journal_init=1,nodiscard".as_ref(),
                    dev,
                ],
            )?,
            FsType::Xfs => run_tool(
                "mkfs.xfs",
                "xfsprogs",
                &["-f".as_ref(), "-q".as_ref(), "-K".as_ref(), dev],
            )?,
        };
        if result.success() {
            return Ok(());
        }
        // mkfs.xfs refuses small devices with a terse message; say what to do.
        if fstype == FsType::Xfs
            && let Ok(size) = loopdev::size_bytes(&device)
            && size < XFS_MIN_BYTES
        {
            return Err(Error::TooSmall {
                device,
                fstype,
                found: size,
                minimum: XFS_MIN_BYTES,
                output: result.output,
            });
        }
        Err(result.failure("expected a writable device that nothing holds open exclusively"))
    })
    .await
}

/// Checks the filesystem on `device` before it is mounted, as kubelet does.
///
/// ext4: `e2fsck -p` repairs what is safe to repair without a human. Its exit
/// status is a bit mask: 1 (errors corrected) and 2 (corrected, and a mounted
/// root should be rebooted, which does not apply to an unmounted volume) are
/// success with a warning; 4 and up (errors left, or e2fsck itself failed) are an
/// error carrying its output.
///
/// xfs: skipped. xfs has no boot-time check: it replays its log at mount and
/// verifies metadata as it reads it, `fsck.xfs` is a no-op by design, and
/// `xfs_repair` is an offline repair tool for a human, not a pre-mount check.
pub async fn fsck(device: &Path, fstype: FsType) -> Result<Fsck> {
    if fstype == FsType::Xfs {
        return Ok(Fsck::Skipped);
    }
    let device = device.to_path_buf();
    blocking(move || {
        let result = run_tool("e2fsck", "e2fsprogs", &["-p".as_ref(), device.as_os_str()])?;
        match result.code {
            Some(0) => Ok(Fsck::Clean),
            Some(code @ (1 | 2)) => {
                tracing::warn!(
                    device = %device.display(),
                    code,
                    output = %result.output,
                    "e2fsck corrected filesystem errors"
                );
                Ok(Fsck::Corrected)
            }
            Some(code) => Err(Error::FsckFailed {
                device,
                code,
                output: result.output,
            }),
            None => Err(result.failure("expected e2fsck to run to its end")),
        }
    })
    .await
}

/// Grows the filesystem to fill its device, after the device grew. Both tools
/// grow a mounted filesystem online, which is how it is called (NodeExpandVolume
/// gets the mount point).
///
/// - ext4: `resize2fs <device>`; (offline, resize2fs first demands a fresh
///   `e2fsck -f`).
/// - xfs: `xfs_growfs -d <mount_point>`: xfs grows only while mounted, and is
///   named by its mount point.
pub async fn resize_fs(device: &Path, mount_point: &Path, fstype: FsType) -> Result<()> {
    let (device, mount_point) = (device.to_path_buf(), mount_point.to_path_buf());
    blocking(move || {
        let result = match fstype {
            FsType::Ext4 => run_tool("resize2fs", "e2fsprogs", &[device.as_os_str()])?,
            FsType::Xfs => run_tool(
                "xfs_growfs",
                "xfsprogs",
                &["-d".as_ref(), mount_point.as_os_str()],
            )?,
        };
        if result.success() {
            Ok(())
        } else {
            Err(result.failure(
                "expected a mounted filesystem on a device that has grown; see the kernel log \
                 (dmesg)",
            ))
        }
    })
    .await
}

/// A finished tool run.
struct ToolRun {
    command: String,
    /// `None` when a signal killed it.
    code: Option<i32>,
    /// stdout then stderr, trimmed and bounded.
    output: String,
}

impl ToolRun {
    fn success(&self) -> bool {
        self.code == Some(0)
    }

    fn failure(self, hint: &'static str) -> Error {
        Error::ToolFailed {
            command: self.command,
            status: match self.code {
                Some(code) => format!("exited with status {code}"),
                None => "was killed by a signal".into(),
            },
            hint,
            output: self.output,
        }
    }
}

/// Output kept in an error: enough for any tool's diagnosis, short enough for a
/// Kubernetes event.
const MAX_OUTPUT: usize = 4096;

/// Runs `program` (found on PATH) with `args`, without a shell, and waits for it.
fn run_tool(program: &'static str, package: &'static str, args: &[&OsStr]) -> Result<ToolRun> {
    let command = std::iter::once(OsStr::new(program))
        .chain(args.iter().copied())
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ");
    let started = Instant::now();
    let out = Command::new(program)
        .args(args)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .output()
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => Error::ToolNotFound {
                program,
                package,
                source,
            },
            _ => Error::io("run", program)(source),
        })?;
    let output = [&out.stdout, &out.stderr]
        .map(|b| String::from_utf8_lossy(b).trim().to_string())
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("\n");
    let output = bounded(output);
    tracing::debug!(
        %command,
        code = ?out.status.code(),
        secs = started.elapsed().as_secs_f64(),
        "ran tool"
    );
    Ok(ToolRun {
        command,
        code: out.status.code(),
        output,
    })
}

fn bounded(mut s: String) -> String {
    if s.len() > MAX_OUTPUT {
        let mut cut = MAX_OUTPUT;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str(" [...]");
    }
    if s.is_empty() {
        s.push_str("(none)");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn filesystem_size_comes_from_the_superblock() {
        for (fs, size) in [(FsType::Ext4, 24u64 << 20), (FsType::Xfs, XFS_MIN_BYTES)] {
            let img = image(size);
            mkfs(img.path(), fs).await.unwrap();
            assert_eq!(fs_size_bytes(img.path()).await.unwrap(), Some(size), "{fs}");
            // The device grows; the filesystem has not yet.
            img.as_file().set_len(size * 2).unwrap();
            assert_eq!(fs_size_bytes(img.path()).await.unwrap(), Some(size), "{fs}");
        }
        assert_eq!(fs_size_bytes(image(1 << 20).path()).await.unwrap(), None);
    }

    fn image(size: u64) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(size).unwrap();
        f
    }

    fn write_at(f: &tempfile::NamedTempFile, offset: u64, data: &[u8]) {
        use std::os::unix::fs::FileExt;
        f.as_file().write_all_at(data, offset).unwrap();
    }

    fn unknown(first_nonzero: u64) -> FsProbe {
        FsProbe::Unknown { first_nonzero }
    }

    #[test]
    fn classifies_superblocks_and_other_data() {
        let mut head = vec![0u8; PROBE_BYTES];
        assert_eq!(classify(&head), FsProbe::Blank);
        assert_eq!(classify(&[]), FsProbe::Blank, "an empty device");

        head[1080..1082].copy_from_slice(&[0x53, 0xef]);
        assert_eq!(classify(&head), FsProbe::Fs(FsType::Ext4));
        head[1048] = 7; // 128 KiB blocks: no real ext4
        assert_eq!(classify(&head), unknown(1048));

        let mut head = vec![0u8; PROBE_BYTES];
        head[0..4].copy_from_slice(b"XFSB");
        head[4..8].copy_from_slice(&4096u32.to_be_bytes());
        assert_eq!(classify(&head), FsProbe::Fs(FsType::Xfs));
        head[4..8].copy_from_slice(&4097u32.to_be_bytes());
        assert_eq!(classify(&head), unknown(0));

        // Both signatures: neither is trusted.
        head[4..8].copy_from_slice(&4096u32.to_be_bytes());
        head[1080..1082].copy_from_slice(&[0x53, 0xef]);
        assert_eq!(classify(&head), unknown(0));

        // Data deep in the probed area, and none past it.
        let mut head = vec![0u8; PROBE_BYTES];
        head[PROBE_BYTES - 1] = 1;
        assert_eq!(classify(&head), unknown(PROBE_BYTES as u64 - 1));
    }

    #[tokio::test]
    async fn probes_image_files() {
        let img = image(1 << 20);
        assert_eq!(probe_fs(img.path()).await.unwrap(), FsProbe::Blank);
        write_at(&img, 70_000, b"beyond the probe");
        assert_eq!(probe_fs(img.path()).await.unwrap(), FsProbe::Blank);
        write_at(&img, 0, b"LUKS\xba\xbe\x00\x02");
        assert_eq!(probe_fs(img.path()).await.unwrap(), unknown(0));
        let err = unknown(0).into_fs(img.path()).unwrap_err();
        assert!(err.to_string().contains("refusing to format"), "{err}");

        // Smaller than the probe.
        let small = image(1000);
        assert_eq!(probe_fs(small.path()).await.unwrap(), FsProbe::Blank);

        let err = probe_fs(Path::new("/nonexistent/device"))
            .await
            .unwrap_err();
        assert_eq!(err.errno(), Some(libc::ENOENT));
    }

    #[tokio::test]
    async fn ext4_is_made_found_and_checked() {
        let img = image(32 << 20);
        mkfs(img.path(), FsType::Ext4).await.unwrap();
        let probe = probe_fs(img.path()).await.unwrap();
        assert_eq!(probe, FsProbe::Fs(FsType::Ext4));
        assert_eq!(probe.into_fs(img.path()).unwrap(), Some(FsType::Ext4));
        assert_eq!(fsck(img.path(), FsType::Ext4).await.unwrap(), Fsck::Clean);
    }

    #[tokio::test]
    async fn e2fsck_corrects_a_fixable_error() {
        let img = image(32 << 20);
        mkfs(img.path(), FsType::Ext4).await.unwrap();
        // Mark the filesystem "not cleanly unmounted" (debugfs keeps the
        // superblock checksum right): e2fsck -p checks it in full, marks it clean
        // and reports that it changed it.
        let out = Command::new("debugfs")
            .args(["-w", "-R", "ssv state 0"])
            .arg(img.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        assert_eq!(
            fsck(img.path(), FsType::Ext4).await.unwrap(),
            Fsck::Corrected
        );
        assert_eq!(fsck(img.path(), FsType::Ext4).await.unwrap(), Fsck::Clean);
    }

    #[tokio::test]
    async fn e2fsck_on_no_filesystem_is_an_error_with_its_output() {
        let img = image(8 << 20);
        let err = fsck(img.path(), FsType::Ext4).await.unwrap_err();
        match &err {
            Error::FsckFailed { code, output, .. } => {
                assert!(*code >= 4, "{err}");
                assert!(output.contains("superblock"), "{output}");
            }
            other => panic!("expected FsckFailed, got {other}"),
        }
        assert!(err.to_string().contains("repair the filesystem by hand"));
    }

    #[tokio::test]
    async fn xfs_is_made_found_and_not_checked() {
        let img = image(XFS_MIN_BYTES);
        mkfs(img.path(), FsType::Xfs).await.unwrap();
        assert_eq!(
            probe_fs(img.path()).await.unwrap(),
            FsProbe::Fs(FsType::Xfs)
        );
        assert_eq!(fsck(img.path(), FsType::Xfs).await.unwrap(), Fsck::Skipped);
    }

    #[tokio::test]
    async fn xfs_on_a_small_device_says_how_small() {
        let img = image(128 << 20);
        let err = mkfs(img.path(), FsType::Xfs).await.unwrap_err();
        match &err {
            Error::TooSmall {
                found,
                minimum,
                fstype,
                output,
                ..
            } => {
                assert_eq!(*found, 128 << 20);
                assert_eq!(*minimum, XFS_MIN_BYTES);
                assert_eq!(*fstype, FsType::Xfs);
                assert!(output.contains("300MB"), "{output}");
            }
            other => panic!("expected TooSmall, got {other}"),
        }
        assert!(err.to_string().contains("request a larger volume"), "{err}");
        // mkfs.xfs wrote nothing.
        assert_eq!(probe_fs(img.path()).await.unwrap(), FsProbe::Blank);
    }

    #[tokio::test]
    async fn a_failing_tool_reports_command_status_and_output() {
        let err = resize_fs(
            Path::new("/nonexistent/device"),
            Path::new("/nonexistent"),
            FsType::Ext4,
        )
        .await
        .unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, Error::ToolFailed { .. }), "{msg}");
        assert!(msg.contains("`resize2fs /nonexistent/device`"), "{msg}");
        assert!(msg.contains("exited with status"), "{msg}");
        assert!(msg.contains("/nonexistent/device"), "{msg}");
    }

    #[test]
    fn a_missing_tool_names_its_package() {
        let err = match run_tool("cryptdisk-no-such-tool", "no-such-package", &[]) {
            Err(e) => e,
            Ok(_) => panic!("a missing tool ran"),
        };
        assert!(matches!(err, Error::ToolNotFound { .. }), "{err}");
        assert!(err.to_string().contains("no-such-package"), "{err}");
    }

    #[test]
    fn long_output_is_cut_at_a_char_boundary() {
        let s = bounded("é".repeat(MAX_OUTPUT));
        assert!(s.len() <= MAX_OUTPUT + " [...]".len());
        assert!(s.ends_with(" [...]"));
        assert_eq!(bounded(String::new()), "(none)");
    }
}
