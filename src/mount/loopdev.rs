//! Loop devices over image files: the local backend's disks.
//!
//! The kernel's loop ioctls are used directly rather than `losetup`: the steps
//! that matter here (find a free device, bind it, retry when another process wins
//! the race for it, cancel a pending auto-detach) are each one ioctl, errors come
//! back as an errno instead of text to parse, and the node image needs no
//! util-linux. The file is the key: [`attach`] returns the device already backed
//! by the file when there is one, and [`detach`] finds it the same way, so both
//! can be retried freely.
//!
//! Devices are attached without auto-clear (the device stays after this process
//! closes it, until [`detach`]), without direct I/O (the image file's page cache
//! serves reads, which suits sparse files on any filesystem), read-write, with
//! 512-byte logical blocks and no partition scan.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{Error, Result, blocking};

// From <linux/loop.h>; the libc crate does not carry them.
const LOOP_SET_FD: u32 = 0x4C00;
const LOOP_CLR_FD: u32 = 0x4C01;
const LOOP_SET_STATUS64: u32 = 0x4C04;
const LOOP_GET_STATUS64: u32 = 0x4C05;
const LOOP_SET_CAPACITY: u32 = 0x4C07;
const LOOP_CONFIGURE: u32 = 0x4C0A;
const LOOP_CTL_GET_FREE: u32 = 0x4C82;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_NAME_SIZE: usize = 64;
const LO_KEY_SIZE: usize = 32;

/// `BLKGETSIZE64` is `_IOR(0x12, 114, size_t)`: direction "read" in bits 30-31,
/// the argument size (8) in bits 16-29, type and number below. That is the
/// encoding of x86, arm, riscv, s390 and loongarch; powerpc, mips and sparc encode
/// ioctls differently, and this driver is not built for them.
#[cfg(any(
    target_arch = "x86",
    target_arch = "x86_64",
    target_arch = "arm",
    target_arch = "aarch64",
    target_arch = "riscv64",
    target_arch = "s390x",
    target_arch = "loongarch64"
))]
const BLKGETSIZE64: u32 = (2 << 30) | (8 << 16) | (0x12 << 8) | 114;

const LOOP_CONTROL: &str = "/dev/loop-control";
const SYS_BLOCK: &str = "/sys/block";

/// How many free devices [`attach`] tries before giving up: each failure means
/// another process bound the device between our `LOOP_CTL_GET_FREE` and our bind.
const ATTACH_ATTEMPTS: u32 = 8;

/// `struct loop_info64`.
#[repr(C)]
#[derive(Clone, Copy)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; LO_KEY_SIZE],
    lo_init: [u64; 2],
}

/// `struct loop_config`, the argument of `LOOP_CONFIGURE` (Linux 5.8).
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

// The kernel reads these by size: a layout mistake must not compile.
const _: () = assert!(std::mem::size_of::<LoopInfo64>() == 232);
const _: () = assert!(std::mem::size_of::<LoopConfig>() == 304);

impl LoopInfo64 {
    fn zeroed() -> Self {
        LoopInfo64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: 0,
            lo_file_name: [0; LO_NAME_SIZE],
            lo_crypt_name: [0; LO_NAME_SIZE],
            lo_encrypt_key: [0; LO_KEY_SIZE],
            lo_init: [0; 2],
        }
    }

    /// Status for a new device: no flags (so no auto-clear, no direct I/O, no
    /// partition scan, read-write), and the file name, which old tools show; the
    /// kernel's own record of the file is sysfs `backing_file`, never truncated.
    fn for_file(file: &Path) -> Self {
        let mut info = LoopInfo64::zeroed();
        let name = file.as_os_str().as_bytes();
        let n = name.len().min(LO_NAME_SIZE - 1);
        info.lo_file_name[..n].copy_from_slice(&name[..n]);
        info
    }
}

/// Serialises attach and detach within this process, so two calls for one file
/// cannot each bind a device. Other processes are not covered: the node plugin is
/// the only one attaching its volumes' files.
static LOCK: Mutex<()> = Mutex::new(());

fn lock() -> std::sync::MutexGuard<'static, ()> {
    // The guarded state is the kernel's, not ours: a panic while holding the lock
    // leaves nothing inconsistent here.
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Makes an ioctl whose argument is an integer or a pointer, returning its
/// non-negative result.
///
/// # Safety
/// `arg` must be what `request` expects: an integer, or a pointer to a live value
/// of the type the kernel reads or writes for it.
unsafe fn ioctl(fd: &File, request: u32, arg: libc::c_ulong) -> std::io::Result<libc::c_int> {
    // SAFETY: the caller vouches for `arg`; `fd` is an open file for the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, arg) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// The loop device backed by `file`, if any: each bound device's sysfs
/// `backing_file`, resolved, compared with `file` resolved. A file that does not
/// exist backs nothing (a device over a deleted file shows `(deleted)` and can no
/// longer be found by path).
pub fn find_by_backing_file(file: &Path) -> Result<Option<PathBuf>> {
    let wanted = match std::fs::canonicalize(file) {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("resolve", file.display())(e)),
    };
    let entries = std::fs::read_dir(SYS_BLOCK).map_err(Error::io("list", SYS_BLOCK))?;
    for entry in entries {
        let entry = entry.map_err(Error::io("list", SYS_BLOCK))?;
        let name = entry.file_name();
        if !name.as_bytes().starts_with(b"loop") {
            continue;
        }
        // Absent when the device is unbound; read while another process detaches
        // it, it may vanish between listing and reading: both mean "not this one".
        let Ok(backing) = std::fs::read(entry.path().join("loop/backing_file")) else {
            continue;
        };
        let backing = Path::new(std::ffi::OsStr::from_bytes(trim_newline(&backing)));
        if std::fs::canonicalize(backing).is_ok_and(|b| b == wanted) {
            return Ok(Some(Path::new("/dev").join(name)));
        }
    }
    Ok(None)
}

fn trim_newline(b: &[u8]) -> &[u8] {
    b.strip_suffix(b"\n").unwrap_or(b)
}

/// Attaches `file` as a loop device and returns the device path, or returns the
/// device that already has `file` attached.
pub async fn attach(file: &Path) -> Result<PathBuf> {
    let file = file.to_path_buf();
    blocking(move || attach_blocking(&file)).await
}

fn attach_blocking(file: &Path) -> Result<PathBuf> {
    let _guard = lock();
    if let Some(device) = find_by_backing_file(file)? {
        keep_attached(&device)?;
        return Ok(device);
    }
    let file = std::fs::canonicalize(file).map_err(Error::io("resolve", file.display()))?;
    let backing = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&file)
        .map_err(Error::io("open backing file", file.display()))?;
    let control = open_control()?;
    for attempt in 1..=ATTACH_ATTEMPTS {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number.
        let n = unsafe { ioctl(&control, LOOP_CTL_GET_FREE, 0) }
            .map_err(Error::io("find a free loop device via", LOOP_CONTROL))?;
        let device = PathBuf::from(format!("/dev/loop{n}"));
        // Opened read-write: bound through a read-only descriptor, a loop device
        // becomes read-only.
        let dev = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&device)
            .map_err(Error::io("open", device.display()))?;
        match bind(&dev, &backing, &file) {
            Ok(()) => {
                tracing::info!(file = %file.display(), device = %device.display(), "attached loop device");
                return Ok(device);
            }
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                tracing::debug!(device = %device.display(), attempt, "loop device taken by another process, retrying");
            }
            Err(e) => return Err(Error::io("bind backing file to", device.display())(e)),
        }
    }
    Err(Error::LoopBusy {
        file,
        attempts: ATTACH_ATTEMPTS,
    })
}

/// Binds `backing` to the loop device `dev`: `LOOP_CONFIGURE`, which does it in
/// one step, or on kernels before 5.8 (which answer EINVAL or ENOTTY)
/// `LOOP_SET_FD` then `LOOP_SET_STATUS64`.
fn bind(dev: &File, backing: &File, file: &Path) -> std::io::Result<()> {
    let mut config = LoopConfig {
        fd: backing.as_raw_fd() as u32,
        block_size: 0,
        info: LoopInfo64::for_file(file),
        reserved: [0; 8],
    };
    // SAFETY: LOOP_CONFIGURE reads a `struct loop_config`, which `config` is
    // (layout asserted above); it lives across the call.
    match unsafe { ioctl(dev, LOOP_CONFIGURE, &raw mut config as libc::c_ulong) } {
        Ok(_) => return Ok(()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOTTY)) => {}
        Err(e) => return Err(e),
    }
    // SAFETY: LOOP_SET_FD takes a file descriptor, open for the call.
    unsafe { ioctl(dev, LOOP_SET_FD, backing.as_raw_fd() as libc::c_ulong) }?;
    let mut info = LoopInfo64::for_file(file);
    // SAFETY: LOOP_SET_STATUS64 reads a `struct loop_info64`, which `info` is.
    if let Err(e) = unsafe { ioctl(dev, LOOP_SET_STATUS64, &raw mut info as libc::c_ulong) } {
        // Do not leave a half-configured device bound to the file.
        // SAFETY: LOOP_CLR_FD takes no argument.
        let _ = unsafe { ioctl(dev, LOOP_CLR_FD, 0) };
        return Err(e);
    }
    Ok(())
}

/// Cancels a pending auto-detach on a device found already attached. A
/// [`detach`] while the device was still open only set auto-clear, and the kernel
/// would then drop the device under its new user at the old user's last close.
fn keep_attached(device: &Path) -> Result<()> {
    let name = device.file_name().unwrap_or_default();
    let autoclear = Path::new(SYS_BLOCK).join(name).join("loop/autoclear");
    match std::fs::read(&autoclear) {
        Ok(v) if trim_newline(&v) == b"1" => {}
        _ => return Ok(()),
    }
    let dev = File::open(device).map_err(Error::io("open", device.display()))?;
    let mut info = LoopInfo64::zeroed();
    // SAFETY: LOOP_GET_STATUS64 writes a `struct loop_info64` into `info`.
    unsafe { ioctl(&dev, LOOP_GET_STATUS64, &raw mut info as libc::c_ulong) }
        .map_err(Error::io("read loop status of", device.display()))?;
    info.lo_flags &= !LO_FLAGS_AUTOCLEAR;
    // SAFETY: LOOP_SET_STATUS64 reads a `struct loop_info64`, which `info` is.
    unsafe { ioctl(&dev, LOOP_SET_STATUS64, &raw mut info as libc::c_ulong) }
        .map_err(Error::io("clear auto-detach of", device.display()))?;
    tracing::info!(device = %device.display(), "cancelled a pending detach of a reused loop device");
    Ok(())
}

/// Opens /dev/loop-control. Without it the loop module is not loaded (udev-less
/// systems make the node only when the module loads), so try `modprobe loop`
/// once before giving up with advice.
fn open_control() -> Result<File> {
    let open = || OpenOptions::new().read(true).write(true).open(LOOP_CONTROL);
    match open() {
        Ok(f) => Ok(f),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let loaded = std::process::Command::new("modprobe")
                .arg("loop")
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            tracing::info!(loaded, "{LOOP_CONTROL} was missing; tried `modprobe loop`");
            open().map_err(|source| Error::LoopUnavailable { source })
        }
        Err(source) => Err(Error::LoopUnavailable { source }),
    }
}

/// Detaches the loop device backed by `file`; no device is no error. When the
/// device is still open (mounted, or under a dm-crypt mapping), the kernel defers
/// the detach to its last close.
pub async fn detach(file: &Path) -> Result<()> {
    let file = file.to_path_buf();
    blocking(move || detach_blocking(&file)).await
}

fn detach_blocking(file: &Path) -> Result<()> {
    let _guard = lock();
    let Some(device) = find_by_backing_file(file)? else {
        return Ok(());
    };
    let dev = match File::open(&device) {
        Ok(dev) => dev,
        // Removed since we looked: detached.
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
        Err(e) => return Err(Error::io("open", device.display())(e)),
    };
    // SAFETY: LOOP_CLR_FD takes no argument.
    match unsafe { ioctl(&dev, LOOP_CLR_FD, 0) } {
        Ok(_) => {}
        // ENXIO: unbound since we looked.
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => return Ok(()),
        Err(e) => return Err(Error::io("detach", device.display())(e)),
    }
    // Newer kernels unbind at the last close, which may be this descriptor's.
    drop(dev);
    let name = device.file_name().unwrap_or_default();
    if Path::new(SYS_BLOCK).join(name).join("loop").exists() {
        tracing::info!(device = %device.display(), file = %file.display(), "loop device still in use: it detaches at its last close");
    } else {
        tracing::info!(device = %device.display(), file = %file.display(), "detached loop device");
    }
    Ok(())
}

/// Whether `device` is a loop device (major 7), following symlinks.
pub fn is_loop_device(device: &Path) -> bool {
    const LOOP_MAJOR: u32 = 7;
    super::device_number(device).is_ok_and(|(major, _)| major == LOOP_MAJOR)
}

/// The size in bytes of a block device (`BLKGETSIZE64`, any block device), or of
/// a regular file, so that an image can be measured like the disk it backs.
pub fn size_bytes(device: &Path) -> Result<u64> {
    let f = File::open(device).map_err(Error::io("open", device.display()))?;
    let meta = f.metadata().map_err(Error::io("stat", device.display()))?;
    if meta.is_file() {
        return Ok(meta.len());
    }
    if !meta.file_type().is_block_device() {
        return Err(Error::NotABlockDevice {
            path: device.to_path_buf(),
            found: if meta.is_dir() {
                "a directory"
            } else {
                "another kind of file"
            },
        });
    }
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes a u64 into `size`.
    unsafe { ioctl(&f, BLKGETSIZE64, &raw mut size as libc::c_ulong) }
        .map_err(Error::io("read size of", device.display()))?;
    Ok(size)
}

/// Makes the loop device `device` take its backing file's current size, after the
/// file grew (`LOOP_SET_CAPACITY`).
pub async fn refresh_size(device: &Path) -> Result<()> {
    let device = device.to_path_buf();
    blocking(move || {
        let dev = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&device)
            .map_err(Error::io("open", device.display()))?;
        // SAFETY: LOOP_SET_CAPACITY takes no argument.
        unsafe { ioctl(&dev, LOOP_SET_CAPACITY, 0) }.map_err(|e| {
            if e.raw_os_error() == Some(libc::ENOTTY) {
                Error::NotABlockDevice {
                    path: device.clone(),
                    found: "a block device that is not a loop device",
                }
            } else {
                Error::io("refresh size of", device.display())(e)
            }
        })?;
        Ok(())
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sparse image attached as a loop device, detached on drop whatever the
    /// test's outcome.
    struct Attached {
        dir: tempfile::TempDir,
        device: PathBuf,
    }

    impl Attached {
        async fn new(size: u64) -> Attached {
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("disk.img");
            File::create(&file).unwrap().set_len(size).unwrap();
            // A failed attach bound nothing, so there is nothing to clean up.
            let device = attach(&file).await.unwrap();
            Attached { dir, device }
        }

        fn file(&self) -> PathBuf {
            self.dir.path().join("disk.img")
        }

        fn sys(&self, attr: &str) -> String {
            let name = self.device.file_name().unwrap();
            let raw = std::fs::read_to_string(Path::new(SYS_BLOCK).join(name).join(attr))
                .unwrap_or_default();
            raw.trim_end().to_string()
        }
    }

    impl Drop for Attached {
        fn drop(&mut self) {
            if let Err(e) = detach_blocking(&self.file()) {
                eprintln!("cleanup: detaching {}: {e}", self.file().display());
            }
        }
    }

    #[tokio::test]
    async fn attach_is_idempotent_and_detach_removes_it() {
        let loopdev = Attached::new(8 << 20).await;
        let file = std::fs::canonicalize(loopdev.file()).unwrap();
        assert!(
            loopdev.device.to_str().unwrap().starts_with("/dev/loop"),
            "{}",
            loopdev.device.display()
        );
        assert_eq!(loopdev.sys("loop/backing_file"), file.to_str().unwrap());
        assert_eq!(loopdev.sys("loop/autoclear"), "0");
        assert_eq!(loopdev.sys("loop/dio"), "0");
        assert_eq!(loopdev.sys("ro"), "0");
        assert_eq!(size_bytes(&loopdev.device).unwrap(), 8 << 20);
        assert_eq!(
            find_by_backing_file(&file).unwrap().as_ref(),
            Some(&loopdev.device)
        );

        // Attaching again, even through another spelling of the path, finds it.
        let again = attach(&loopdev.dir.path().join(".").join("disk.img"))
            .await
            .unwrap();
        assert_eq!(again, loopdev.device);

        detach(&file).await.unwrap();
        assert_eq!(find_by_backing_file(&file).unwrap(), None);
        assert!(
            !Path::new(SYS_BLOCK)
                .join(loopdev.device.file_name().unwrap())
                .join("loop")
                .exists(),
            "still bound after detach"
        );
        detach(&file).await.unwrap();
    }

    #[tokio::test]
    async fn a_grown_file_shows_after_refresh() {
        let loopdev = Attached::new(4 << 20).await;
        File::options()
            .write(true)
            .open(loopdev.file())
            .unwrap()
            .set_len(6 << 20)
            .unwrap();
        assert_eq!(size_bytes(&loopdev.device).unwrap(), 4 << 20);
        refresh_size(&loopdev.device).await.unwrap();
        assert_eq!(size_bytes(&loopdev.device).unwrap(), 6 << 20);
    }

    #[tokio::test]
    async fn two_files_get_two_devices() {
        let (a, b) = tokio::join!(Attached::new(1 << 20), Attached::new(1 << 20));
        assert_ne!(a.device, b.device);
        assert_eq!(
            find_by_backing_file(&a.file()).unwrap(),
            Some(a.device.clone())
        );
        assert_eq!(
            find_by_backing_file(&b.file()).unwrap(),
            Some(b.device.clone())
        );
    }

    #[tokio::test]
    async fn a_detach_while_open_is_deferred_and_a_reattach_cancels_it() {
        let loopdev = Attached::new(1 << 20).await;
        let holder = File::open(&loopdev.device).unwrap();
        detach(&loopdev.file()).await.unwrap();
        assert_eq!(loopdev.sys("loop/autoclear"), "1", "detach deferred");
        let again = attach(&loopdev.file()).await.unwrap();
        assert_eq!(again, loopdev.device);
        assert_eq!(loopdev.sys("loop/autoclear"), "0", "reattach keeps it");
        drop(holder);
        assert_eq!(
            find_by_backing_file(&loopdev.file()).unwrap(),
            Some(loopdev.device.clone()),
            "still attached after the holder closed"
        );
    }

    #[tokio::test]
    async fn missing_files_back_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.img");
        assert_eq!(find_by_backing_file(&missing).unwrap(), None);
        detach(&missing).await.unwrap();
        let err = attach(&missing).await.unwrap_err();
        assert_eq!(err.errno(), Some(libc::ENOENT), "{err}");
    }

    #[test]
    fn size_of_files_and_non_devices() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        File::create(&file).unwrap().set_len(12345).unwrap();
        assert_eq!(size_bytes(&file).unwrap(), 12345);
        let err = size_bytes(dir.path()).unwrap_err();
        assert!(matches!(err, Error::NotABlockDevice { .. }), "{err}");
    }
}
