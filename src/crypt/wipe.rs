//! The initial wipe of an integrity volume. Until a sector has been written
//! through dm-integrity it has no valid tag and reads back as an I/O error, so
//! every sector of a new integrity volume is written once, with zeros, through the
//! open mapping before anything else reads it (mkfs probes, a pod's raw reads).
//!
//! The wipe is resumable: every stretch it flushes is recorded in the volume's
//! token ([`super::Token::wipe_offset`]), so a crash or a cancel costs at most one
//! stretch, and the next stage goes on from there on whichever node it runs.

use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::{Error, Result};

/// Bytes per write.
const CHUNK: usize = 4 << 20;
/// Most bytes written between two checkpoints: what a crash may have to redo.
const CHECKPOINT_BYTES: u64 = 64 << 20;
/// Longest time between two checkpoints (and progress log lines).
const CHECKPOINT_EVERY: Duration = Duration::from_secs(5);

/// How far a wipe is; read by other tasks while it runs.
#[derive(Debug, Default)]
pub struct Progress {
    pub done: AtomicU64,
    pub total: AtomicU64,
}

impl Progress {
    /// Whole percent done, 0 when the size is not known yet.
    pub fn percent(&self) -> u64 {
        let total = self.total.load(Ordering::Relaxed);
        let done = self.done.load(Ordering::Relaxed).min(total);
        (done * 100).checked_div(total).unwrap_or(0)
    }
}

/// How a wipe ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wiped {
    /// Every byte up to the end of the device is written and flushed.
    Done,
    /// Stopped at a checkpoint because `cancel` was set.
    Cancelled { at: u64 },
}

/// Writes zeros to `mapped` from `from` to its end. After each flushed stretch
/// short of the end, `checkpoint(offset)` is called with the offset up to which
/// everything is on disk; the caller records it, and records completion when this
/// returns [`Wiped::Done`]. The wipe stops at the next checkpoint once `cancel` is
/// set. Blocking: run it on a blocking thread.
pub fn zero_fill(
    mapped: &Path,
    from: u64,
    progress: &Progress,
    cancel: &AtomicBool,
    mut checkpoint: impl FnMut(u64) -> Result<()>,
) -> Result<Wiped> {
    let io = |op: &'static str| {
        move |source: std::io::Error| Error::Io {
            op,
            target: mapped.display().to_string(),
            source,
        }
    };
    let mut file = OpenOptions::new()
        .write(true)
        .open(mapped)
        .map_err(io("open for wipe"))?;
    let total = file.seek(SeekFrom::End(0)).map_err(io("size"))?;
    progress.total.store(total, Ordering::Relaxed);
    let mut offset = from.min(total);
    progress.done.store(offset, Ordering::Relaxed);
    let zeros = vec![0u8; CHUNK];
    let (mut since_bytes, mut since) = (0u64, Instant::now());
    let (start_offset, started) = (offset, Instant::now());
    let pace = crate::failpoint::wipe_rate_limit();
    let mapping = mapped
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let metrics = crate::metrics::global();
    // The gauges go when the wipe stops, however it stops.
    struct Clear<'a>(&'a str);
    impl Drop for Clear<'_> {
        fn drop(&mut self) {
            crate::metrics::global().wipe_progress(self.0, None);
        }
    }
    let _clear = Clear(&mapping);
    while offset < total {
        let len = (total - offset).min(CHUNK as u64) as usize;
        file.write_all_at(&zeros[..len], offset)
            .map_err(io("write zeros"))?;
        offset += len as u64;
        metrics.wipe_progress(&mapping, Some((offset, total)));
        if let Some(bytes_per_s) = pace {
            let due = Duration::from_secs_f64((offset - start_offset) as f64 / bytes_per_s as f64);
            std::thread::sleep(due.saturating_sub(started.elapsed()));
        }
        since_bytes += len as u64;
        progress.done.store(offset, Ordering::Relaxed);
        let due = since_bytes >= CHECKPOINT_BYTES || since.elapsed() >= CHECKPOINT_EVERY;
        if due && offset < total {
            file.sync_data().map_err(io("flush"))?;
            checkpoint(offset)?;
            crate::failpoint::hit("wipe:checkpoint");
            let secs = started.elapsed().as_secs_f64().max(1e-3);
            tracing::info!(
                device = %mapped.display(),
                percent = progress.percent(),
                mib_per_s = format!("{:.1}", (offset - start_offset) as f64 / secs / 1048576.0),
                "integrity wipe"
            );
            (since_bytes, since) = (0, Instant::now());
            if cancel.load(Ordering::Relaxed) {
                return Ok(Wiped::Cancelled { at: offset });
            }
        }
    }
    file.sync_data().map_err(io("flush"))?;
    let secs = started.elapsed().as_secs_f64().max(1e-3);
    tracing::info!(
        device = %mapped.display(),
        bytes = total - start_offset,
        mib_per_s = format!("{:.1}", (total - start_offset) as f64 / secs / 1048576.0),
        "integrity wipe done"
    );
    Ok(Wiped::Done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn fills_from_the_offset_to_the_end_and_checkpoints_in_order() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let size = (CHUNK as u64) * 2 + 12345;
        std::fs::write(f.path(), vec![0xAAu8; size as usize]).unwrap();
        let progress = Progress::default();
        let mut marks = Vec::new();
        let from = 8192;
        let out = zero_fill(f.path(), from, &progress, &AtomicBool::new(false), |o| {
            marks.push(o);
            Ok(())
        })
        .unwrap();
        assert_eq!(out, Wiped::Done);
        assert!(marks.windows(2).all(|w| w[0] < w[1]), "{marks:?}");
        assert!(marks.iter().all(|&m| m > from && m < size), "{marks:?}");
        assert_eq!(progress.percent(), 100);
        let mut data = Vec::new();
        std::fs::File::open(f.path())
            .unwrap()
            .read_to_end(&mut data)
            .unwrap();
        assert!(data[..from as usize].iter().all(|&b| b == 0xAA));
        assert!(data[from as usize..].iter().all(|&b| b == 0));
    }

    #[test]
    fn a_missing_device_is_an_error_naming_it() {
        let err = zero_fill(
            Path::new("/nonexistent/cryptdisk-x"),
            0,
            &Progress::default(),
            &AtomicBool::new(false),
            |_| Ok(()),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/cryptdisk-x"),
            "{err}"
        );
    }

    #[test]
    fn percent_of_an_unknown_size_is_zero() {
        let p = Progress::default();
        assert_eq!(p.percent(), 0);
        p.total.store(200, Ordering::Relaxed);
        p.done.store(50, Ordering::Relaxed);
        assert_eq!(p.percent(), 25);
    }
}
