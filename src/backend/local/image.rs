//! Image files of the local backend: built under a temporary name and renamed
//! into place, filled by reflink or a sparse-aware copy for clones, snapshots and
//! restores, and removed durably.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use nix::errno::Errno;
use nix::unistd::{Whence, lseek};

use super::fsync_dir;
use crate::backend::{Error, Result};

pub(super) const PARTIAL_MARK: &str = ".partial-";
/// Copy buffer size of the sparse copy.
const COPY_CHUNK: usize = 1024 * 1024;

/// Clones `src` into the empty `dst` with a reflink.
pub(super) fn reflink(src: &File, dst: &File) -> io::Result<()> {
    // SAFETY: FICLONE takes the source descriptor as its integer argument; both
    // descriptors are open for the duration of the call.
    let rc = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether an lseek error means "this filesystem cannot tell data from holes".
fn no_hole_support(e: Errno) -> bool {
    matches!(e, Errno::EINVAL | Errno::EOPNOTSUPP | Errno::ENOSYS)
}

/// Copies the first `len` bytes of `src` into `dst`, which must already be `len`
/// bytes of holes: only data extents are read, and all-zero blocks within them are
/// not written, so the copy is at most as allocated as the source.
pub(super) fn sparse_copy(src: &File, dst: &File, len: u64) -> io::Result<()> {
    let mut buf = vec![0u8; COPY_CHUNK];
    let mut pos = 0u64;
    while pos < len {
        let start = match lseek(src, pos as i64, Whence::SeekData) {
            Ok(off) => off as u64,
            Err(Errno::ENXIO) => break, // no data after pos
            Err(e) if no_hole_support(e) => pos,
            Err(e) => return Err(e.into()),
        };
        if start >= len {
            break;
        }
        let end = match lseek(src, start as i64, Whence::SeekHole) {
            Ok(off) => (off as u64).min(len),
            Err(e) if no_hole_support(e) => len,
            Err(e) => return Err(e.into()),
        };
        let mut off = start;
        while off < end {
            let n = ((end - off) as usize).min(COPY_CHUNK);
            let chunk = &mut buf[..n];
            src.read_exact_at(chunk, off)?;
            if chunk.iter().any(|&b| b != 0) {
                dst.write_all_at(chunk, off)?;
            }
            off += n as u64;
        }
        pos = end.max(start + 1);
    }
    Ok(())
}

/// Fills the new, empty `dst` with a copy of `src` (`len` bytes), by reflink if
/// possible, else sparse-aware.
pub(super) fn copy_image(src: &File, dst: &File, len: u64) -> io::Result<()> {
    match reflink(src, dst) {
        Ok(()) => return Ok(()),
        Err(e) => tracing::debug!(error = %e, "reflink unavailable; copying sparsely"),
    }
    dst.set_len(0)?;
    dst.set_len(len)?;
    sparse_copy(src, dst, len)
}

/// Builds an image at `final_path`: a temporary file in the same directory, the
/// source copied in (if any), sized to `size`, fsync'd, renamed into place, the
/// directory fsync'd. Replaces whatever was at `final_path`.
pub(super) fn build_image(
    final_path: &Path,
    source: Option<(File, u64)>,
    size: u64,
) -> io::Result<()> {
    let dir = final_path.parent().expect("image paths have a parent");
    let file_name = final_path
        .file_name()
        .expect("image paths have a file name")
        .to_string_lossy();
    let tmp = dir.join(format!(
        ".{file_name}{PARTIAL_MARK}{}",
        uuid::Uuid::new_v4().simple()
    ));
    let result = (|| {
        let dst = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        if let Some((src, len)) = &source {
            copy_image(src, &dst, *len)?;
        }
        dst.set_len(size)?;
        dst.sync_all()?;
        drop(dst);
        fs::rename(&tmp, final_path)?;
        fsync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Removes a file; one that is already gone is fine.
pub(super) fn remove_image(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    }
    fsync_dir(path.parent().expect("image paths have a parent"))
}

/// The size of a file, or `None` if it is gone.
pub(super) fn file_size(path: &Path) -> Result<Option<u64>> {
    match fs::metadata(path) {
        Ok(m) => Ok(Some(m.len())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(format!("stat {}", path.display()), e)),
    }
}
