//! The mount syscalls: mounting a filesystem, bind mounts, unmounting, and the
//! checks that make each safe to retry.
//!
//! Mounting refuses a target that already is a mount point: the kernel would
//! stack the new mount on the old one, and a retried RPC would then leave two
//! mounts of which one unmount removes only the top.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};
use nix::sys::statvfs::{FsFlags, statvfs};

use super::mountinfo::{MountEntry, find_mount};
use super::{Error, FsType, Result, blocking};

/// What [`unmount`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unmounted {
    Unmounted,
    /// The target does not exist or nothing is mounted on it.
    WasNotMounted,
}

/// How one user mount option acts on the mount flags.
enum Effect {
    Set(MsFlags),
    /// One of the mutually exclusive access-time policies: the last one given wins,
    /// as with mount(8).
    Atime(MsFlags),
    /// A kernel default (`rw`, `suid`, ...): nothing to set.
    Default,
}

/// The options mount(2) takes as flags rather than in the filesystem's data
/// string. Everything else (`nodiscard`, `data=ordered`, `inode64`, ...) goes to
/// the filesystem, which refuses what it does not know.
fn flag_option(option: &str) -> Option<Effect> {
    Some(match option {
        "ro" => Effect::Set(MsFlags::MS_RDONLY),
        "nodiratime" => Effect::Set(MsFlags::MS_NODIRATIME),
        "nosuid" => Effect::Set(MsFlags::MS_NOSUID),
        "nodev" => Effect::Set(MsFlags::MS_NODEV),
        "noexec" => Effect::Set(MsFlags::MS_NOEXEC),
        "sync" => Effect::Set(MsFlags::MS_SYNCHRONOUS),
        "dirsync" => Effect::Set(MsFlags::MS_DIRSYNC),
        "lazytime" => Effect::Set(MsFlags::MS_LAZYTIME),
        "noatime" => Effect::Atime(MsFlags::MS_NOATIME),
        "relatime" => Effect::Atime(MsFlags::MS_RELATIME),
        "strictatime" => Effect::Atime(MsFlags::MS_STRICTATIME),
        // `rw` never makes a read-only mount writable: `ro` or `read_only` win.
        "defaults" | "rw" | "async" | "suid" | "dev" | "exec" => Effect::Default,
        _ => return None,
    })
}

/// Checks user mount options the way [`mount_fs`] will, without mounting: for
/// refusing a bad StorageClass early.
pub fn check_options(options: &[String]) -> Result<()> {
    split_options(options, false).map(drop)
}

/// Splits user options into mount flags and the filesystem's data string.
/// Longest single mount option accepted.
const MAX_OPTION_LEN: usize = 256;

fn split_options(options: &[String], read_only: bool) -> Result<(MsFlags, Option<String>)> {
    let mut flags = MsFlags::empty();
    let mut data: Vec<&str> = Vec::new();
    for option in options {
        // One element is one option: a ',' would smuggle several into the data
        // string past this check, and a NUL would cut it short in the syscall.
        if option.is_empty() || option.contains([',', '\0']) {
            return Err(Error::InvalidOption {
                option: option.clone(),
            });
        }
        // Options are short printable words; the kernel takes one page of them.
        if option.len() > MAX_OPTION_LEN || !option.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Error::InvalidOption {
                option: format!(
                    "{:?} ({} bytes; at most {MAX_OPTION_LEN} printable ASCII characters)",
                    option.chars().take(64).collect::<String>(),
                    option.len()
                ),
            });
        }
        match flag_option(option) {
            Some(Effect::Set(f)) => flags |= f,
            Some(Effect::Atime(f)) => {
                flags -= MsFlags::MS_NOATIME | MsFlags::MS_RELATIME | MsFlags::MS_STRICTATIME;
                flags |= f;
            }
            Some(Effect::Default) => {}
            None => data.push(option),
        }
    }
    if read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    Ok((flags, (!data.is_empty()).then(|| data.join(","))))
}

/// Mounts the `fstype` filesystem on `device` at `target` (an existing directory).
///
/// `options` are user mount options, one per element (`noatime`, `nodiscard`,
/// `data=ordered`); those that are mount flags become flags, the rest the
/// filesystem's data string. `read_only` (or an `ro` option) mounts read-only.
/// A target that already is a mount point is refused with
/// [`Error::AlreadyMounted`]; check [`mounted_device`] first to treat a retry as
/// done.
pub async fn mount_fs(
    device: &Path,
    target: &Path,
    fstype: FsType,
    options: &[String],
    read_only: bool,
) -> Result<()> {
    let (flags, data) = split_options(options, read_only)?;
    let (device, target) = (device.to_path_buf(), target.to_path_buf());
    blocking(move || {
        refuse_mount_point(&target)?;
        tracing::debug!(
            device = %device.display(),
            target = %target.display(),
            %fstype,
            ?flags,
            ?data,
            "mount"
        );
        // The first mounts of a type whose module is not loaded yet race the
        // kernel's module autoload, and the losers get ENODEV: try again briefly.
        let mut attempt = 0;
        loop {
            let r = nix::mount::mount(
                Some(&device),
                &target,
                Some(fstype.as_str()),
                flags,
                data.as_deref(),
            );
            match r {
                Err(Errno::ENODEV) if attempt < 20 => {
                    attempt += 1;
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                // The filesystem refused an option it does not know: the
                // request's mistake, not ours.
                Err(Errno::EINVAL) if data.is_some() => {
                    return Err(Error::InvalidOption {
                        option: format!(
                            "{} (the {fstype} driver refused them)",
                            data.as_deref().unwrap_or_default()
                        ),
                    });
                }
                other => break other,
            }
        }
        .map_err(|errno| Error::Mount {
            what: format!(
                "{} ({fstype}, data {:?})",
                device.display(),
                data.as_deref().unwrap_or("")
            ),
            target: target.clone(),
            errno,
            hint: mount_hint(errno, &device, fstype),
        })
    })
    .await
}

fn mount_hint(errno: Errno, device: &Path, fstype: FsType) -> String {
    let device = device.display();
    match errno {
        Errno::EINVAL => format!(
            "expected {device} to hold {fstype} and every option to be one {fstype} knows; the \
             kernel log (dmesg) names what it refused"
        ),
        Errno::ENOENT => format!(
            "expected both {device} and the target to exist; create the target directory first"
        ),
        Errno::ENOTBLK => format!("expected {device} to be a block device"),
        Errno::EBUSY => format!(
            "expected {device} not to be held exclusively (by device-mapper, mkfs or another \
             mount); find the holder under /sys/class/block/*/holders"
        ),
        Errno::EROFS | Errno::EACCES => {
            format!("{device} is read-only; mount it read-only")
        }
        Errno::ENODEV => format!("the kernel has no {fstype} driver; load the {fstype} module"),
        _ => "see the kernel log (dmesg)".to_string(),
    }
}

/// Bind-mounts `source` (a directory, a file or a device node) on `target` (an
/// existing directory or file of the same kind). Read-only takes a second step,
/// as the kernel ignores `MS_RDONLY` on the bind itself: a remount of the bind
/// with `MS_BIND | MS_REMOUNT | MS_RDONLY`. If that remount fails the bind is
/// undone, so a read-only request never leaves a writable mount.
///
/// A read-only bind of a device node does not stop writes to the device: the
/// kernel checks read-only mounts for files and directories, not device nodes.
/// Block volumes published read-only need the device itself set read-only.
pub async fn bind_mount(source: &Path, target: &Path, read_only: bool) -> Result<()> {
    let (source, target) = (source.to_path_buf(), target.to_path_buf());
    blocking(move || {
        refuse_mount_point(&target)?;
        let bind_error = |errno| Error::Mount {
            what: format!("a bind of {}", source.display()),
            target: target.clone(),
            errno,
            hint: match errno {
                Errno::ENOENT => "expected both paths to exist; create the target first".into(),
                Errno::ENOTDIR => {
                    "expected source and target of the same kind: a directory on a directory, \
                     a file or device node on a file"
                        .into()
                }
                _ => "see the kernel log (dmesg)".into(),
            },
        };
        nix::mount::mount(
            Some(&source),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(bind_error)?;
        if read_only && let Err(e) = remount_read_only(&target) {
            if let Err(undo) = nix::mount::umount2(&target, MntFlags::UMOUNT_NOFOLLOW) {
                tracing::error!(
                    target = %target.display(),
                    error = %undo,
                    "could not undo a bind mount that failed to become read-only"
                );
            }
            return Err(e);
        }
        Ok(())
    })
    .await
}

/// Makes the bind mount at `target` read-only, keeping the flags it has. A bind
/// remount sets the mount's flags to exactly those given, so without this a
/// `nosuid` or `noexec` the bind inherited from its source would be dropped.
fn remount_read_only(target: &Path) -> Result<()> {
    let current = statvfs(target)
        .map_err(|e| Error::io("statvfs", target.display())(e.into()))?
        .flags();
    let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
    for (has, keep) in [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if current.contains(has) {
            flags |= keep;
        }
    }
    nix::mount::mount(None::<&str>, target, None::<&str>, flags, None::<&str>).map_err(|errno| {
        Error::Mount {
            what: "a read-only remount of the bind".into(),
            target: target.to_path_buf(),
            errno,
            hint: "the bind was undone; see the kernel log (dmesg)".into(),
        }
    })
}

/// Unmounts the topmost mount at `target`. A target that does not exist or is not
/// a mount point is [`Unmounted::WasNotMounted`]; a busy one is [`Error::Busy`]
/// (no lazy unmount: it would hide the user and report success).
pub async fn unmount(target: &Path) -> Result<Unmounted> {
    let target = target.to_path_buf();
    blocking(move || {
        // NOFOLLOW: the target's last component is in a directory a pod can
        // write to, and must not redirect the unmount through a symlink.
        match nix::mount::umount2(&target, MntFlags::UMOUNT_NOFOLLOW) {
            Ok(()) => {
                tracing::debug!(target = %target.display(), "unmounted");
                Ok(Unmounted::Unmounted)
            }
            Err(Errno::ENOENT | Errno::ENOTDIR) => Ok(Unmounted::WasNotMounted),
            // EINVAL is how umount2 says "not a mount point"; it says the same of
            // a mount it may not touch, so the mount table decides.
            Err(Errno::EINVAL) if find_mount(&target)?.is_none() => Ok(Unmounted::WasNotMounted),
            Err(Errno::EBUSY) => Err(Error::Busy { target }),
            Err(errno) => Err(Error::Mount {
                what: "an unmount".into(),
                target: target.clone(),
                errno,
                hint: "expected a mount this process may remove; see the kernel log (dmesg)".into(),
            }),
        }
    })
    .await
}

/// Whether anything is mounted at `target`.
pub fn is_mount_point(target: &Path) -> Result<bool> {
    Ok(find_mount(target)?.is_some())
}

/// The device (major, minor) mounted at `target`, or `None` when nothing is:
/// the device of the filesystem mounted there, or, when a device node is
/// bind-mounted there (a published block volume), the device the node stands for
/// (mountinfo would name devtmpfs). Compare with [`device_number`] of the device
/// to tell a finished mount from a conflicting one.
pub fn mounted_device(target: &Path) -> Result<Option<(u32, u32)>> {
    let Some(entry) = find_mount(target)? else {
        return Ok(None);
    };
    match std::fs::metadata(target) {
        Ok(meta) if meta.file_type().is_block_device() => device_number(target).map(Some),
        _ => Ok(Some((entry.major, entry.minor))),
    }
}

/// Every mount point where `device` (major, minor) is mounted or bind-mounted,
/// as a filesystem or, for a published block volume, as a device node. Only
/// devtmpfs binds are stat'ed, so a hung network mount elsewhere cannot block it.
pub fn mount_points_of(device: (u32, u32)) -> Result<Vec<std::path::PathBuf>> {
    let mut found = Vec::new();
    for entry in super::mountinfo::mounts()? {
        let same = if (entry.major, entry.minor) == device {
            true
        } else if entry.fstype == "devtmpfs" {
            std::fs::metadata(&entry.mount_point).is_ok_and(|m| {
                m.file_type().is_block_device()
                    && (
                        nix::sys::stat::major(m.rdev()) as u32,
                        nix::sys::stat::minor(m.rdev()) as u32,
                    ) == device
            })
        } else {
            false
        };
        if same {
            found.push(entry.mount_point);
        }
    }
    Ok(found)
}

/// The device number (major, minor) of a block device node, following symlinks.
/// Also works on a file a device node is bind-mounted on, which is how a
/// published block volume is recognised.
pub fn device_number(device: &Path) -> Result<(u32, u32)> {
    let meta = std::fs::metadata(device).map_err(Error::io("stat", device.display()))?;
    let kind = meta.file_type();
    if !kind.is_block_device() {
        return Err(Error::NotABlockDevice {
            path: device.to_path_buf(),
            found: describe(kind),
        });
    }
    let rdev = meta.rdev();
    // Device numbers are 12-bit major, 20-bit minor, so both fit a u32.
    let major = u32::try_from(nix::sys::stat::major(rdev)).unwrap_or(u32::MAX);
    let minor = u32::try_from(nix::sys::stat::minor(rdev)).unwrap_or(u32::MAX);
    Ok((major, minor))
}

fn describe(kind: std::fs::FileType) -> &'static str {
    if kind.is_dir() {
        "a directory"
    } else if kind.is_file() {
        "a regular file"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_symlink() {
        "a symlink"
    } else {
        "a socket or fifo"
    }
}

fn refuse_mount_point(target: &Path) -> Result<()> {
    match find_mount(target)? {
        None => Ok(()),
        Some(m) => Err(Error::AlreadyMounted {
            target: target.to_path_buf(),
            found: describe_mount(&m),
        }),
    }
}

fn describe_mount(m: &MountEntry) -> String {
    let root = if m.root == Path::new("/") {
        String::new()
    } else {
        format!(" path {}", m.root.display())
    };
    format!(
        "{} {} device {}:{}{root}",
        m.fstype, m.source, m.major, m.minor
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn flags_and_data_are_split() {
        let (flags, data) = split_options(
            &opts(&["noatime", "nodiscard", "data=ordered", "nosuid", "lazytime"]),
            false,
        )
        .unwrap();
        assert_eq!(
            flags,
            MsFlags::MS_NOATIME | MsFlags::MS_NOSUID | MsFlags::MS_LAZYTIME
        );
        assert_eq!(data.as_deref(), Some("nodiscard,data=ordered"));

        let (flags, data) = split_options(&[], false).unwrap();
        assert_eq!(flags, MsFlags::empty());
        assert_eq!(data, None);
    }

    #[test]
    fn every_listed_flag_is_recognised() {
        for (opt, flag) in [
            ("ro", MsFlags::MS_RDONLY),
            ("noatime", MsFlags::MS_NOATIME),
            ("nodiratime", MsFlags::MS_NODIRATIME),
            ("relatime", MsFlags::MS_RELATIME),
            ("strictatime", MsFlags::MS_STRICTATIME),
            ("nosuid", MsFlags::MS_NOSUID),
            ("nodev", MsFlags::MS_NODEV),
            ("noexec", MsFlags::MS_NOEXEC),
            ("sync", MsFlags::MS_SYNCHRONOUS),
            ("dirsync", MsFlags::MS_DIRSYNC),
            ("lazytime", MsFlags::MS_LAZYTIME),
        ] {
            assert_eq!(
                split_options(&opts(&[opt]), false).unwrap(),
                (flag, None),
                "{opt}"
            );
        }
        for default in ["defaults", "rw", "async", "suid", "dev", "exec"] {
            assert_eq!(
                split_options(&opts(&[default]), false).unwrap(),
                (MsFlags::empty(), None),
                "{default}"
            );
        }
    }

    #[test]
    fn the_last_atime_policy_wins() {
        let (flags, _) = split_options(&opts(&["noatime", "strictatime"]), false).unwrap();
        assert_eq!(flags, MsFlags::MS_STRICTATIME);
        let (flags, _) =
            split_options(&opts(&["relatime", "nodiratime", "noatime"]), false).unwrap();
        assert_eq!(flags, MsFlags::MS_NOATIME | MsFlags::MS_NODIRATIME);
    }

    #[test]
    fn read_only_wins_over_rw() {
        let (flags, _) = split_options(&opts(&["rw"]), true).unwrap();
        assert!(flags.contains(MsFlags::MS_RDONLY));
        let (flags, _) = split_options(&opts(&["ro", "rw"]), false).unwrap();
        assert!(flags.contains(MsFlags::MS_RDONLY));
    }

    #[test]
    fn options_that_could_smuggle_others_are_refused() {
        for bad in ["", "noatime,ro", "a\0b", ","] {
            let err = split_options(&opts(&["noatime", bad]), false).unwrap_err();
            assert!(
                matches!(&err, Error::InvalidOption { option } if option == bad),
                "{bad:?}: {err}"
            );
            assert!(err.to_string().contains("own list element"), "{err}");
            assert!(check_options(&opts(&[bad])).is_err());
        }
        check_options(&opts(&["noatime", "nodiscard"])).unwrap();
    }

    #[tokio::test]
    async fn invalid_options_are_refused_before_any_syscall() {
        let dir = tempfile::tempdir().unwrap();
        let err = mount_fs(
            Path::new("/nonexistent-device"),
            dir.path(),
            FsType::Ext4,
            &opts(&["noatime,ro"]),
            false,
        )
        .await
        .unwrap_err();
        assert!(matches!(err, Error::InvalidOption { .. }), "{err}");
    }

    #[tokio::test]
    async fn unmounting_what_is_not_mounted_is_no_error() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(unmount(dir.path()).await.unwrap(), Unmounted::WasNotMounted);
        assert_eq!(
            unmount(&dir.path().join("missing")).await.unwrap(),
            Unmounted::WasNotMounted
        );
        let file = dir.path().join("file");
        std::fs::write(&file, b"").unwrap();
        assert_eq!(unmount(&file).await.unwrap(), Unmounted::WasNotMounted);
        assert_eq!(
            unmount(&file.join("below-a-file")).await.unwrap(),
            Unmounted::WasNotMounted
        );
        assert!(!is_mount_point(dir.path()).unwrap());
        assert_eq!(mounted_device(dir.path()).unwrap(), None);
    }

    #[test]
    fn device_number_reads_block_nodes_only() {
        let dir = tempfile::tempdir().unwrap();
        let err = device_number(dir.path()).unwrap_err();
        assert!(
            matches!(
                err,
                Error::NotABlockDevice {
                    found: "a directory",
                    ..
                }
            ),
            "{err}"
        );
        let err = device_number(Path::new("/dev/null")).unwrap_err();
        assert!(err.to_string().contains("a character device"), "{err}");
        let err = device_number(&dir.path().join("missing")).unwrap_err();
        assert_eq!(err.errno(), Some(libc::ENOENT), "{err}");
        if let Some(loop0) = ["/dev/loop0", "/dev/loop1"]
            .iter()
            .map(Path::new)
            .find(|p| p.exists())
        {
            let (major, _) = device_number(loop0).unwrap();
            assert_eq!(major, 7, "loop devices are major 7");
        }
    }
}
