//! Filesystems, mounts and loop devices on the node: everything between an open
//! block device and the path kubelet hands to a pod.
//!
//! - [`mountinfo`] reads what is mounted where, from `/proc/self/mountinfo`.
//! - [`mount_fs`], [`bind_mount`] and [`unmount`] make the mount syscalls through
//!   `nix`; [`mounted_device`] and [`device_number`] let a retried RPC tell a
//!   finished step from a missing one.
//! - [`probe_fs`] reads superblocks itself; [`mkfs`], [`fsck`] and [`resize_fs`] run
//!   e2fsprogs and xfsprogs, found on `PATH` and started without a shell.
//! - [`loopdev`] attaches image files as loop devices, for the local backend.
//!
//! Nothing here knows about volumes, keys or CSI. The caller (the node service)
//! decides what goes where, holds the per-volume lock that keeps two RPCs for one
//! volume apart, and gates [`mkfs`] on [`probe_fs`] answering [`FsProbe::Blank`]:
//! mkfs is run forced, so this module never decides on its own to overwrite a
//! device. All blocking work (syscalls, file reads, child processes) runs on tokio's
//! blocking pool behind the `async fn`s; the plain `fn`s are cheap reads of `/proc`,
//! `/sys` or one ioctl, and may be called from blocking code as they are.

pub mod device;
mod fs;
pub mod loopdev;
pub mod mountinfo;
mod sys;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

pub use fs::{
    FsProbe, Fsck, PROBE_BYTES, XFS_MIN_BYTES, fs_size_bytes, fsck, mkfs, probe_fs, resize_fs,
};
pub use mountinfo::{MountEntry, find_mount, is_read_only, mounts};
pub use sys::{
    Unmounted, bind_mount, check_options, device_number, is_mount_point, mount_fs, mount_points_of,
    mounted_device, unmount,
};

/// A filesystem the node can make and mount.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FsType {
    Ext4,
    Xfs,
}

impl FsType {
    /// Every supported type, in the order error messages list them.
    pub const ALL: [FsType; 2] = [FsType::Ext4, FsType::Xfs];

    /// The name the kernel and the StorageClass `fsType` use.
    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
        }
    }
}

impl fmt::Display for FsType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for FsType {
    type Err = Error;

    /// Parses `ext4` or `xfs`, exactly. An empty string is refused too: CSI's
    /// "no fsType given" means ext4, and that default is the caller's to apply, so
    /// that it is visible in one place.
    fn from_str(s: &str) -> Result<Self> {
        FsType::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| Error::UnsupportedFsType {
                found: s.to_string(),
            })
    }
}

/// Failures of this module; each message says what was expected, what was found
/// and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "mount option {option:?} is invalid: expected one non-empty option without ',' or NUL \
         bytes; give each option as its own list element"
    )]
    InvalidOption { option: String },

    #[error(
        "filesystem type {found:?} is not supported: expected ext4 or xfs; set one of them as \
         the fsType (an empty fsType means ext4)"
    )]
    UnsupportedFsType { found: String },

    #[error(
        "mountinfo line {line} is malformed: expected {expected}, found {found:?}; this is not \
         the kernel's /proc/self/mountinfo format (proc(5))"
    )]
    BadMountInfo {
        line: usize,
        expected: &'static str,
        found: String,
    },

    #[error(
        "{target} is already a mount point ({found}): expected a directory or file with nothing \
         mounted on it; if that is the right device the step is done, otherwise unmount it first"
    )]
    AlreadyMounted { target: PathBuf, found: String },

    #[error(
        "{target} is busy: expected no open files and no mounts below it, found some; stop what \
         uses it (`fuser -vm {target}` lists it) and retry"
    )]
    Busy { target: PathBuf },

    #[error("mounting {what} on {target} failed: {errno}; {hint}")]
    Mount {
        what: String,
        target: PathBuf,
        errno: nix::errno::Errno,
        hint: String,
    },

    #[error("{op} {target} failed: {source}")]
    Io {
        op: &'static str,
        target: String,
        source: std::io::Error,
    },

    #[error(
        "{path} is not a block device: expected a block device node, found {found}; pass the \
         device node (/dev/...), not a file or a directory"
    )]
    NotABlockDevice { path: PathBuf, found: &'static str },

    #[error(
        "cannot run {program}: {source}; expected it on PATH (package {package}); install it on \
         the node"
    )]
    ToolNotFound {
        program: &'static str,
        package: &'static str,
        source: std::io::Error,
    },

    #[error("`{command}` {status}, expected exit status 0; {hint}. Its output: {output}")]
    ToolFailed {
        command: String,
        status: String,
        hint: &'static str,
        output: String,
    },

    #[error(
        "e2fsck found errors on {device} that it could not correct (exit status {code}, expected \
         0, 1 or 2): {output}; repair the filesystem by hand (`e2fsck -f {device}`) before the \
         volume is used again"
    )]
    FsckFailed {
        device: PathBuf,
        code: i32,
        output: String,
    },

    #[error(
        "{device} holds {found} bytes, but {fstype} needs at least {minimum} (mkfs.{fstype} \
         refuses smaller); request a larger volume or use ext4. mkfs said: {output}"
    )]
    TooSmall {
        device: PathBuf,
        fstype: FsType,
        found: u64,
        minimum: u64,
        output: String,
    },

    #[error(
        "{device} holds data that is neither ext4 nor xfs (its first non-zero byte is at offset \
         {first_nonzero}): expected a blank device or a supported filesystem; refusing to format \
         or mount it. Inspect it with `blkid` or `wipefs`, and wipe it by hand only if its data \
         is not needed"
    )]
    UnknownData { device: PathBuf, first_nonzero: u64 },

    #[error(
        "the loop driver is not available ({source} on /dev/loop-control): expected the loop \
         module loaded; run `modprobe loop` on the node (or list it in /etc/modules-load.d)"
    )]
    LoopUnavailable { source: std::io::Error },

    #[error(
        "no loop device could be attached to {file}: each of {attempts} free devices was taken \
         by another process first; expected one to stay free, retry when the node is quieter"
    )]
    LoopBusy { file: PathBuf, attempts: u32 },

    #[error("mount worker stopped: {0}")]
    Worker(String),
}

impl Error {
    /// The errno behind the failure, when there is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Mount { errno, .. } => Some(*errno as i32),
            Error::Io { source, .. } | Error::LoopUnavailable { source } => source.raw_os_error(),
            Error::Busy { .. } => Some(libc::EBUSY),
            _ => None,
        }
    }

    fn io(op: &'static str, target: impl fmt::Display) -> impl FnOnce(std::io::Error) -> Error {
        let target = target.to_string();
        move |source| Error::Io { op, target, source }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Runs `f` on tokio's blocking pool: mount syscalls, device reads and child
/// processes can each take seconds, and must not stall the RPC executor.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Worker(e.to_string()))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fs_type_parses_and_prints_its_kernel_name() {
        for t in FsType::ALL {
            assert_eq!(t.to_string().parse::<FsType>().unwrap(), t);
        }
        assert_eq!("ext4".parse::<FsType>().unwrap(), FsType::Ext4);
        assert_eq!("xfs".parse::<FsType>().unwrap(), FsType::Xfs);
        for bad in ["", "btrfs", "EXT4", " ext4", "ext3"] {
            let err = bad.parse::<FsType>().unwrap_err();
            assert!(
                matches!(&err, Error::UnsupportedFsType { found } if found == bad),
                "{err}"
            );
            let msg = err.to_string();
            assert!(msg.contains("ext4 or xfs"), "{msg}");
        }
    }
}
