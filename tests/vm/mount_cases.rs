//! The `mount` module against a real kernel: filesystems made, checked, mounted,
//! bound and grown on virtio disks and loop devices.
//!
//! The VM's virtio disks are shared by every case file and the crypt cases take
//! most of them, so only the ext4 case asks for one, and falls back to a loop
//! device when none is left; the others use loop devices over sparse files in
//! /tmp (xfs also needs 300 MiB, more than a VM disk holds). The mount module
//! treats both kinds of block device alike.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use cryptdisk_csi::mount::{
    self, Error, FsProbe, FsType, Fsck, Unmounted, find_mount, is_read_only, loopdev,
};

use crate::{Case, CaseResult, Ctx, check, ensure};

pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "mount_ext4_lifecycle_on_a_virtio_disk",
            run: |c| Box::pin(ext4_lifecycle(c)),
        },
        Case {
            name: "mount_xfs_lifecycle_and_growth_on_a_loop_device",
            run: |c| Box::pin(xfs_lifecycle(c)),
        },
        Case {
            name: "mount_block_device_bind_onto_a_file",
            run: |c| Box::pin(block_bind(c)),
        },
        Case {
            name: "mount_loop_file_mkfs_mount_and_grow_ext4",
            run: |c| Box::pin(loop_ext4_grow(c)),
        },
        Case {
            name: "mount_probe_of_random_bytes_is_unknown",
            run: |c| Box::pin(random_bytes(c)),
        },
        Case {
            name: "mount_invalid_option_mounts_nothing",
            run: |c| Box::pin(invalid_option(c)),
        },
    ]
}

const MIB: u64 = 1024 * 1024;

/// A fresh directory under /tmp for one case (the VM's /tmp is thrown away).
fn scratch(case: &str) -> Result<PathBuf, String> {
    let dir = check!(
        tempfile::Builder::new()
            .prefix(&format!("cdvm-{case}-"))
            .tempdir()
    );
    Ok(dir.keep())
}

fn make_dir(path: &Path) -> Result<(), String> {
    check!(std::fs::create_dir_all(path));
    Ok(())
}

/// A sparse image file of `size` bytes.
fn image(path: &Path, size: u64) -> Result<(), String> {
    check!(check!(File::create(path)).set_len(size));
    Ok(())
}

/// A blank block device: a virtio disk while one is left, else a loop device over
/// a sparse 128 MiB file in `dir`, whose path is returned for detaching.
async fn blank_device(ctx: &mut Ctx, dir: &Path) -> Result<(PathBuf, Option<PathBuf>), String> {
    if let Ok(disk) = ctx.disk() {
        return Ok((disk, None));
    }
    let img = dir.join("disk.img");
    image(&img, 128 * MIB)?;
    let device = check!(loopdev::attach(&img).await);
    println!(
        "    (no virtio disk left: using {} over {})",
        device.display(),
        img.display()
    );
    Ok((device, Some(img)))
}

/// Unmounts whatever is left at `targets` and detaches the loop devices of
/// `images`, whatever the case's outcome, so that no case leaves state behind.
async fn clean_up(targets: &[&Path], images: &[&Path]) {
    for target in targets {
        // Stacked mounts are removed one per call.
        for _ in 0..4 {
            match mount::unmount(target).await {
                Ok(Unmounted::Unmounted) => continue,
                Ok(Unmounted::WasNotMounted) => break,
                Err(e) => {
                    eprintln!("cleanup: unmount {}: {e}", target.display());
                    break;
                }
            }
        }
    }
    for image in images {
        if let Err(e) = loopdev::detach(image).await {
            eprintln!("cleanup: detach {}: {e}", image.display());
        }
    }
}

fn errno_of(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => nix::errno::Errno::from_raw(n).to_string(),
        None => e.to_string(),
    }
}

/// Blank device → filesystem → mount with `noatime` → file written → read-only
/// bind refuses writes → both unmounted, twice. Leaves nothing mounted.
async fn fs_lifecycle(device: &Path, fstype: FsType, dir: &Path) -> CaseResult {
    let (fs_dir, ro_dir) = (dir.join("fs"), dir.join("ro"));
    make_dir(&fs_dir)?;
    make_dir(&ro_dir)?;

    let probe = check!(mount::probe_fs(device).await);
    ensure!(
        probe == FsProbe::Blank,
        "a fresh device probes as {probe:?}"
    );
    check!(mount::mkfs(device, fstype).await);
    let probe = check!(mount::probe_fs(device).await);
    ensure!(
        probe == FsProbe::Fs(fstype),
        "after mkfs {fstype}: {probe:?}"
    );
    let checked = check!(mount::fsck(device, fstype).await);
    let expected = match fstype {
        FsType::Ext4 => Fsck::Clean,
        FsType::Xfs => Fsck::Skipped,
    };
    ensure!(checked == expected, "fsck of a new {fstype}: {checked:?}");

    check!(mount::mount_fs(device, &fs_dir, fstype, &["noatime".into()], false).await);
    let entry = check!(find_mount(&fs_dir));
    let entry = entry.ok_or_else(|| format!("{} is not in mountinfo", fs_dir.display()))?;
    ensure!(entry.fstype == fstype.as_str(), "fstype {:?}", entry.fstype);
    ensure!(
        entry.options.iter().any(|o| o == "noatime"),
        "options {:?}",
        entry.options
    );
    ensure!(!is_read_only(&entry), "read-only: {entry:?}");
    let want = check!(mount::device_number(device));
    let found = check!(mount::mounted_device(&fs_dir));
    ensure!(
        found == Some(want),
        "mounted device {found:?}, want {want:?}"
    );

    // A retry must not stack a second mount.
    match mount::mount_fs(device, &fs_dir, fstype, &[], false).await {
        Err(Error::AlreadyMounted { .. }) => {}
        other => return Err(format!("second mount at the same target: {other:?}")),
    }

    let data = format!("hello from {fstype}\n");
    check!(std::fs::write(fs_dir.join("hello"), &data));

    check!(mount::bind_mount(&fs_dir, &ro_dir, true).await);
    let bind = check!(find_mount(&ro_dir));
    let bind = bind.ok_or_else(|| format!("{} is not in mountinfo", ro_dir.display()))?;
    ensure!(is_read_only(&bind), "the bind is not read-only: {bind:?}");
    ensure!(
        bind.options.iter().any(|o| o == "noatime"),
        "the read-only remount dropped noatime: {:?}",
        bind.options
    );
    ensure!(
        check!(std::fs::read_to_string(ro_dir.join("hello"))) == data,
        "the bind shows other contents"
    );
    match std::fs::write(ro_dir.join("new"), b"x") {
        Err(e) if e.raw_os_error() == Some(libc::EROFS) => {}
        Err(e) => return Err(format!("write through the ro bind: {} ({e})", errno_of(&e))),
        Ok(()) => return Err("a write through the read-only bind succeeded".into()),
    }
    check!(std::fs::write(fs_dir.join("still-writable"), b"y"));

    // An open file keeps the filesystem busy: refused, not detached lazily.
    let holder = check!(File::open(fs_dir.join("hello")));
    match mount::unmount(&fs_dir).await {
        Err(Error::Busy { target }) => ensure!(target == fs_dir, "Busy names {target:?}"),
        other => return Err(format!("unmount while a file is open: {other:?}")),
    }
    drop(holder);

    for target in [&ro_dir, &fs_dir] {
        let first = check!(mount::unmount(target).await);
        ensure!(
            first == Unmounted::Unmounted,
            "{}: {first:?}",
            target.display()
        );
    }
    for target in [&ro_dir, &fs_dir] {
        let again = check!(mount::unmount(target).await);
        ensure!(
            again == Unmounted::WasNotMounted,
            "{} again: {again:?}",
            target.display()
        );
        ensure!(
            check!(find_mount(target)).is_none(),
            "{} still mounted",
            target.display()
        );
    }
    let missing = check!(mount::unmount(&dir.join("no-such-dir")).await);
    ensure!(
        missing == Unmounted::WasNotMounted,
        "missing target: {missing:?}"
    );
    Ok(())
}

async fn ext4_lifecycle(ctx: &mut Ctx) -> CaseResult {
    let dir = scratch("ext4")?;
    let (disk, img) = blank_device(ctx, &dir).await?;
    let result = fs_lifecycle(&disk, FsType::Ext4, &dir).await;
    let images: Vec<&Path> = img.as_deref().into_iter().collect();
    clean_up(&[&dir.join("ro"), &dir.join("fs")], &images).await;
    result
}

async fn xfs_lifecycle(_ctx: &mut Ctx) -> CaseResult {
    let dir = scratch("xfs")?;
    let img = dir.join("xfs.img");
    let result = async {
        image(&img, mount::XFS_MIN_BYTES + 20 * MIB)?;
        let device = check!(loopdev::attach(&img).await);
        fs_lifecycle(&device, FsType::Xfs, &dir).await?;
        grow(&img, &device, &dir.join("fs"), FsType::Xfs, 400 * MIB).await
    }
    .await;
    clean_up(&[&dir.join("ro"), &dir.join("fs")], &[&img]).await;
    result
}

/// Mounts the filesystem on the loop `device`, grows its image `file` to
/// `new_size` and the filesystem after it, and unmounts.
async fn grow(file: &Path, device: &Path, mnt: &Path, fstype: FsType, new_size: u64) -> CaseResult {
    check!(mount::mount_fs(device, mnt, fstype, &[], false).await);
    let old_size = check!(loopdev::size_bytes(device));
    let before = check!(nix::sys::statvfs::statvfs(mnt));
    let before = before.blocks() * before.fragment_size();

    check!(check!(OpenOptions::new().write(true).open(file)).set_len(new_size));
    check!(loopdev::refresh_size(device).await);
    let size = check!(loopdev::size_bytes(device));
    ensure!(
        size == new_size,
        "loop device is {size} bytes after refresh"
    );
    check!(mount::resize_fs(device, mnt, fstype).await);

    let after = check!(nix::sys::statvfs::statvfs(mnt));
    let after = after.blocks() * after.fragment_size();
    // The filesystem keeps some of the new space for its own metadata: ask for
    // half of what the device gained.
    ensure!(
        after >= before + (new_size - old_size) / 2,
        "{fstype} grew from {before} to only {after} bytes when its device grew from \
         {old_size} to {new_size}"
    );
    ensure!(
        check!(mount::unmount(mnt).await) == Unmounted::Unmounted,
        "unmount after growing"
    );
    Ok(())
}

async fn loop_ext4_grow(_ctx: &mut Ctx) -> CaseResult {
    let dir = scratch("loop")?;
    let (img, mnt) = (dir.join("ext4.img"), dir.join("mnt"));
    let result = async {
        make_dir(&mnt)?;
        image(&img, 64 * MIB)?;
        let device = check!(loopdev::attach(&img).await);
        let again = check!(loopdev::attach(&img).await);
        ensure!(
            again == device,
            "second attach gave {again:?}, first {device:?}"
        );
        let found = check!(loopdev::find_by_backing_file(&img));
        ensure!(found.as_ref() == Some(&device), "found {found:?}");
        ensure!(
            check!(loopdev::size_bytes(&device)) == 64 * MIB,
            "loop size"
        );

        ensure!(
            check!(mount::probe_fs(&device).await) == FsProbe::Blank,
            "new image not blank"
        );
        check!(mount::mkfs(&device, FsType::Ext4).await);
        check!(mount::mount_fs(&device, &mnt, FsType::Ext4, &["nodiscard".into()], false).await);
        check!(std::fs::write(mnt.join("data"), b"on a loop device"));
        ensure!(
            check!(mount::unmount(&mnt).await) == Unmounted::Unmounted,
            "unmount"
        );

        grow(&img, &device, &mnt, FsType::Ext4, 96 * MIB).await?;

        check!(mount::mount_fs(&device, &mnt, FsType::Ext4, &[], true).await);
        ensure!(
            check!(std::fs::read(mnt.join("data"))) == b"on a loop device",
            "data did not survive growth"
        );
        check!(mount::unmount(&mnt).await);

        check!(loopdev::detach(&img).await);
        ensure!(
            check!(loopdev::find_by_backing_file(&img)).is_none(),
            "still attached after detach"
        );
        check!(loopdev::detach(&img).await);
        Ok(())
    }
    .await;
    clean_up(&[&mnt], &[&img]).await;
    result
}

async fn block_bind(_ctx: &mut Ctx) -> CaseResult {
    let dir = scratch("block")?;
    let (img, target) = (dir.join("block.img"), dir.join("volumeDevice"));
    let result = async {
        image(&img, 16 * MIB)?;
        let device = check!(loopdev::attach(&img).await);
        // NodePublish for a block volume: an empty file, the device node bound on it.
        check!(File::create(&target));
        check!(mount::bind_mount(&device, &target, false).await);

        let want = check!(mount::device_number(&device));
        let through = check!(mount::device_number(&target));
        ensure!(
            through == want,
            "target is device {through:?}, want {want:?}"
        );
        let found = check!(mount::mounted_device(&target));
        ensure!(
            found == Some(want),
            "mounted_device {found:?}, want {want:?}"
        );
        let entry = check!(find_mount(&target)).ok_or("the bind is not in mountinfo")?;
        let name = device.file_name().unwrap_or_default();
        ensure!(
            entry.root == Path::new("/").join(name),
            "root {:?}",
            entry.root
        );
        ensure!(entry.fstype == "devtmpfs", "fstype {:?}", entry.fstype);

        let marker = b"written through the bound node";
        {
            let f = check!(OpenOptions::new().write(true).open(&target));
            check!(f.write_all_at(marker, 4096));
            check!(f.sync_all());
        }
        let mut back = vec![0u8; marker.len()];
        check!(check!(File::open(&device)).read_exact_at(&mut back, 4096));
        ensure!(
            back == marker,
            "the device does not hold what the bind wrote"
        );

        match mount::bind_mount(&device, &target, false).await {
            Err(Error::AlreadyMounted { .. }) => {}
            other => return Err(format!("second bind on the same file: {other:?}")),
        }
        ensure!(
            check!(mount::unmount(&target).await) == Unmounted::Unmounted,
            "unmount"
        );
        let meta = check!(std::fs::metadata(&target));
        ensure!(
            meta.is_file() && meta.len() == 0,
            "the target is no longer the empty file"
        );

        // Read-only: the mount is marked ro, but the kernel checks read-only
        // mounts for files and directories only, so the device node still opens
        // for writing (documented at bind_mount).
        check!(mount::bind_mount(&device, &target, true).await);
        let entry = check!(find_mount(&target)).ok_or("the ro bind is not in mountinfo")?;
        ensure!(is_read_only(&entry), "not read-only: {entry:?}");
        let writable = OpenOptions::new().write(true).open(&target).is_ok();
        ensure!(
            writable,
            "a read-only bind of a device node refused a writer: update the bind_mount docs"
        );
        ensure!(
            check!(mount::unmount(&target).await) == Unmounted::Unmounted,
            "unmount ro"
        );
        Ok(())
    }
    .await;
    clean_up(&[&target], &[&img]).await;
    result
}

async fn random_bytes(_ctx: &mut Ctx) -> CaseResult {
    let dir = scratch("random")?;
    let img = dir.join("random.img");
    image(&img, 16 * MIB)?;
    let disk = check!(loopdev::attach(&img).await);
    let result = probe_random(&disk).await;
    clean_up(&[], &[&img]).await;
    result
}

async fn probe_random(disk: &Path) -> CaseResult {
    ensure!(
        check!(mount::probe_fs(disk).await) == FsProbe::Blank,
        "a fresh disk is not blank"
    );
    let disk_file = check!(OpenOptions::new().write(true).open(disk));

    // One non-zero byte deep in the probed area.
    check!(disk_file.write_all_at(&[0x01], 40_000));
    check!(disk_file.sync_all());
    let probe = check!(mount::probe_fs(disk).await);
    ensure!(
        probe
            == FsProbe::Unknown {
                first_nonzero: 40_000
            },
        "one byte at 40000: {probe:?}"
    );

    let mut random = vec![0u8; mount::PROBE_BYTES];
    check!(check!(File::open("/dev/urandom")).read_exact(&mut random));
    random[0] |= 1; // so the first non-zero byte is at 0
    let mut w = check!(OpenOptions::new().write(true).open(disk));
    check!(w.write_all(&random));
    check!(w.sync_all());
    let probe = check!(mount::probe_fs(disk).await);
    ensure!(
        probe == FsProbe::Unknown { first_nonzero: 0 },
        "random bytes: {probe:?}"
    );
    match probe.into_fs(disk) {
        Err(Error::UnknownData { .. }) => Ok(()),
        other => Err(format!("into_fs of unknown data: {other:?}")),
    }
}

async fn invalid_option(_ctx: &mut Ctx) -> CaseResult {
    let dir = scratch("options")?;
    let (img, mnt) = (dir.join("opts.img"), dir.join("mnt"));
    let result = async {
        make_dir(&mnt)?;
        image(&img, 32 * MIB)?;
        let device = check!(loopdev::attach(&img).await);
        check!(mount::mkfs(&device, FsType::Ext4).await);

        for bad in ["noatime,ro", "", "a\0b"] {
            match mount::mount_fs(&device, &mnt, FsType::Ext4, &[bad.to_string()], false).await {
                Err(Error::InvalidOption { option }) => {
                    ensure!(option == bad, "error names {option:?}, not {bad:?}")
                }
                other => return Err(format!("option {bad:?}: {other:?}")),
            }
            ensure!(check!(find_mount(&mnt)).is_none(), "{bad:?} left a mount");
        }

        // Well-formed, but unknown to ext4: the kernel refuses it (EINVAL), and
        // that is the request's mistake: an invalid option naming it.
        match mount::mount_fs(
            &device,
            &mnt,
            FsType::Ext4,
            &["no_such_option".into()],
            false,
        )
        .await
        {
            Err(Error::InvalidOption { option }) => {
                ensure!(
                    option.contains("no_such_option") && option.contains("ext4 driver refused"),
                    "option: {option}"
                );
            }
            other => return Err(format!("unknown ext4 option: {other:?}")),
        }
        ensure!(
            check!(find_mount(&mnt)).is_none(),
            "a refused option left a mount"
        );

        // The wrong filesystem type.
        let wrong = mount::mount_fs(&device, &mnt, FsType::Xfs, &[], false).await;
        ensure!(wrong.is_err(), "ext4 mounted as xfs");
        ensure!(
            check!(find_mount(&mnt)).is_none(),
            "a wrong type left a mount"
        );
        Ok(())
    }
    .await;
    clean_up(&[&mnt], &[&img]).await;
    result
}
