//! Key bytes kept in locked memory and wiped when dropped.
//!
//! `mlock` keeps the pages of a key out of swap, where it would outlive the
//! process. Locks do not nest (one `munlock` unlocks a page for every buffer
//! on it), so each buffer has pages of its own: a few KiB per live key, and
//! keys live for one request or one stage. Without `CAP_IPC_LOCK` (or over
//! `RLIMIT_MEMLOCK`) the lock fails and the bytes are still wiped on drop.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::ptr::NonNull;

use zeroize::Zeroize;

/// A fixed-size byte buffer on pages of its own, locked in memory while it
/// lives and zeroed before it is freed. Deliberately without `Debug`.
pub struct LockedBytes {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
    locked: bool,
}

// The buffer is plain owned memory, like a `Box<[u8]>`.
unsafe impl Send for LockedBytes {}
unsafe impl Sync for LockedBytes {}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size)
        .ok()
        .filter(|&s| s > 0)
        .unwrap_or(4096)
}

impl LockedBytes {
    /// `len` zero bytes.
    pub fn zeroed(len: usize) -> Self {
        let page = page_size();
        let size = len.max(1).div_ceil(page) * page;
        let layout = Layout::from_size_align(size, page).expect("a page-aligned layout");
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout)
        };
        // SAFETY: ptr points at `size` bytes we own.
        let locked = unsafe { libc::mlock(ptr.as_ptr().cast(), size) } == 0;
        LockedBytes {
            ptr,
            len,
            layout,
            locked,
        }
    }

    /// A locked copy of `bytes`.
    pub fn copy_of(bytes: &[u8]) -> Self {
        let mut out = Self::zeroed(bytes.len());
        out.as_mut_slice().copy_from_slice(bytes);
        out
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr points at `layout.size() >= len` initialised bytes we own.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice, and &mut self makes the access unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Whether the pages are locked in memory (`mlock` succeeded).
    pub fn is_locked(&self) -> bool {
        self.locked
    }
}

impl Clone for LockedBytes {
    fn clone(&self) -> Self {
        Self::copy_of(self.as_slice())
    }
}

impl std::ops::Deref for LockedBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl Drop for LockedBytes {
    fn drop(&mut self) {
        // SAFETY: the whole allocation is ours; zeroize writes volatilely.
        let all = unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) };
        all.zeroize();
        if self.locked {
            // SAFETY: the same range that was locked.
            unsafe { libc::munlock(self.ptr.as_ptr().cast(), self.layout.size()) };
        }
        // SAFETY: allocated with this layout in `zeroed`.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn locked_kib() -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmLck:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    #[test]
    fn bytes_live_on_locked_pages_of_their_own() {
        let a = LockedBytes::copy_of(&[7; 32]);
        let b = a.clone();
        assert_eq!(&*b, &[7; 32]);
        assert_eq!(a.as_ptr() as usize % page_size(), 0);
        assert_ne!(a.as_ptr(), b.as_ptr());
        if unsafe { libc::geteuid() } == 0 {
            // Root may lock memory: the pages are counted as locked.
            assert!(a.is_locked() && b.is_locked());
            assert!(locked_kib() >= 2 * page_size() as u64 / 1024);
        }
        assert_eq!(LockedBytes::zeroed(0).len(), 0);
        assert_eq!(&*LockedBytes::zeroed(3), &[0, 0, 0]);
    }
}
