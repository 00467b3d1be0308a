//! The local backend: disks are sparse image files in a data directory, which the
//! node plugin attaches as loop devices.
//!
//! ```text
//! <data_dir>/lock                      flock: one process per data directory
//! <data_dir>/index.json                names, sizes, sources, snapshots, attachments
//! <data_dir>/disks/<disk>.img          disk-<first 32 hex of sha256(CO name)>
//! <data_dir>/snapshots/<snap>.img      snap-<first 32 hex of sha256(CO name)>
//! ```
//!
//! Names are derived from the CO's name, deterministically, so a retried create
//! lands on the same file, and only safe characters ever reach a path.
//!
//! Durability and crash safety:
//! - An image is built under a temporary name (`.<stem>.partial-<random>`), filled,
//!   fsync'd, then renamed into place and the directory fsync'd; the index is
//!   written after that. So a complete image may exist without an index entry (a
//!   crash between the two), never an index entry for a half-written image.
//! - Such an orphan image is **replaced** by the next create of the same name: its
//!   content came from a create that never returned, so no one can hold it, and
//!   its source cannot be told from the file. Orphans are never deleted otherwise
//!   (they might be the only copy of data whose index entry was lost); they are
//!   logged when the backend opens.
//! - The index is written atomically: a temporary file in the data directory,
//!   written, fsync'd, renamed over `index.json`, directory fsync'd. A leftover
//!   temporary file is ignored and removed. An `index.json` that does not parse is
//!   refused (`FailedPrecondition`) rather than silently replaced by an empty one.
//! - Deletes remove the image first, then the index entry. Where the index and the
//!   files disagree, the files win: an entry whose image is gone is dropped, and a
//!   disk's size is its file's size.
//! - Inside the process, a tokio mutex guards the index. Long copies run outside
//!   it, with the name marked busy (a second create or delete of it meanwhile is
//!   `Aborted`, CSI's "operation pending") and its bytes reserved against the
//!   capacity. Every mutating call runs as its own task, so a caller that goes
//!   away (a cancelled RPC) cannot leave it half done.
//!
//! Copies (clone, snapshot, restore) use a FICLONE reflink where the filesystem
//! offers one, else a sparse-aware copy that walks the data extents
//! (SEEK_DATA/SEEK_HOLE) and also skips all-zero blocks, so holes stay holes. A
//! copy of an attached disk is crash-consistent at best: the node may be writing.
//!
//! Fresh-disk record ([`crate::volume::fresh`]): a disk created without a source
//! gets a random [`FreshRecord`] in its index entry, written in the same index
//! write that records the disk, so no disk exists in the index without its
//! record and none made by a copy has one. Detaching it clears the record in the
//! same index write. The node plugin, which shares the machine, reads the
//! record from `index.json` itself ([`LocalBackend::fresh_record`]).
//!
//! Attachments follow "many readers or one writer": a writable attach to a second
//! node, or any attach next to another node's writable one, is
//! `FailedPrecondition`. A LUKS2 volume with an ordinary filesystem on it cannot
//! be shared between writers.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use nix::unistd::{Whence, lseek};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

use super::{
    Disk, DiskBackend, DiskSource, DiskSpec, Error, Result, Snapshot, Topology,
    TopologyRequirement, check_token, paginate,
};
use crate::volume::id::{Excerpt, check_location};
use crate::volume::{BackendKind, FreshRecord, SnapshotId, VolumeId};

pub use crate::csi::contract::{
    LOCAL_IMAGE_PATH as PUBLISH_IMAGE_PATH, TOPOLOGY_NODE as TOPOLOGY_NODE_KEY,
};
/// Disk sizes are rounded up to a multiple of this.
pub const GRANULARITY: u64 = 1024 * 1024;

const INDEX_FILE: &str = "index.json";
const INDEX_TMP: &str = "index.json.tmp";
const LOCK_FILE: &str = "lock";
const DISKS_DIR: &str = "disks";
const SNAPSHOTS_DIR: &str = "snapshots";
const IMAGE_EXT: &str = ".img";
const PARTIAL_MARK: &str = ".partial-";
const DISK_PREFIX: &str = "disk-";
const SNAPSHOT_PREFIX: &str = "snap-";
const INDEX_VERSION: u32 = 1;
/// Copy buffer size of the sparse copy.
const COPY_CHUNK: usize = 1024 * 1024;

/// What the index records of one disk.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
struct DiskEntry {
    /// The CO's name.
    name: String,
    /// The requested size, rounded (0 = "the source's size"): what a retried
    /// create is compared against, whatever expansions happened since.
    requested_bytes: u64,
    /// Size now.
    capacity_bytes: u64,
    #[serde(default)]
    source: Option<DiskSource>,
    #[serde(default)]
    parameters: BTreeMap<String, String>,
    /// Node id → attachment.
    #[serde(default)]
    attachments: BTreeMap<String, Attachment>,
    #[serde(default)]
    options: BTreeMap<String, String>,
    /// The fresh-disk record: set at creation of an empty disk, cleared when its
    /// first attachment ends. Absent in indexes written before the record
    /// existed, so those disks are never formatted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fresh: Option<FreshRecord>,
    /// The usable size the CO holds it as ([`Disk::usable_bytes`]); absent in
    /// indexes written before it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    usable_bytes: Option<u64>,
    /// The key scope inherited from the source of a restore or clone
    /// ([`Disk::key_scope`]); absent for a disk made empty, whose scope is its
    /// own volume id, and in indexes written before scopes existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key_scope: Option<String>,
}

impl DiskEntry {
    /// The record, believed only of a disk made from nothing: one set by hand
    /// on a copy is ignored, as the cloud backends ignore theirs.
    fn live_fresh(&self) -> Option<FreshRecord> {
        self.fresh.clone().filter(|_| self.source.is_none())
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Attachment {
    read_only: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
struct SnapshotEntry {
    name: String,
    source: VolumeId,
    size_bytes: u64,
    created_unix_nanos: i64,
    #[serde(default)]
    options: BTreeMap<String, String>,
    /// The source's usable size when it was taken ([`Snapshot::usable_bytes`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    usable_bytes: Option<u64>,
    /// The source's key scope when it was taken ([`Snapshot::key_scope`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key_scope: Option<String>,
}

/// `index.json`: keyed by file stem, so iteration order is the stable list order.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Index {
    version: u32,
    location: String,
    #[serde(default)]
    disks: BTreeMap<String, DiskEntry>,
    #[serde(default)]
    snapshots: BTreeMap<String, SnapshotEntry>,
}

/// The local backend. Cheap to share: clones of the inner state are reference
/// counted.
pub struct LocalBackend {
    inner: Arc<Inner>,
}

struct Inner {
    data_dir: PathBuf,
    location: String,
    topology: Topology,
    capacity_limit: Option<u64>,
    index: Mutex<Index>,
    /// Stems being created or deleted outside the index lock → bytes reserved.
    busy: StdMutex<BTreeMap<String, u64>>,
    /// Held for the backend's lifetime: a second process on the same directory
    /// would race this one's index.
    _lock: Flock<File>,
}

/// Marks a stem busy until dropped.
struct BusyGuard<'a> {
    busy: &'a StdMutex<BTreeMap<String, u64>>,
    stem: String,
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        self.busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.stem);
    }
}

fn hashed_stem(prefix: &str, name: &str) -> String {
    let digest = Sha256::digest(name.as_bytes());
    format!("{prefix}{}", &hex::encode(digest)[..32])
}

fn is_stem(prefix: &str, s: &str) -> bool {
    s.strip_prefix(prefix)
        .is_some_and(|h| h.len() == 32 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
}

fn round_up(bytes: u64) -> Result<u64> {
    bytes
        .checked_next_multiple_of(GRANULARITY)
        .ok_or_else(|| Error::OutOfRange(format!("capacity {bytes} bytes is too large")))
}

fn now_unix_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Runs blocking file work on tokio's blocking pool.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(format!("blocking file operation failed: {e}")))?
}

fn write_index_file(data_dir: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = data_dir.join(INDEX_TMP);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, data_dir.join(INDEX_FILE))?;
    fsync_dir(data_dir)
}

/// Clones `src` into the empty `dst` with a reflink.
fn reflink(src: &File, dst: &File) -> io::Result<()> {
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
fn sparse_copy(src: &File, dst: &File, len: u64) -> io::Result<()> {
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
fn copy_image(src: &File, dst: &File, len: u64) -> io::Result<()> {
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
fn build_image(final_path: &Path, source: Option<(File, u64)>, size: u64) -> io::Result<()> {
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
fn remove_image(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    }
    fsync_dir(path.parent().expect("image paths have a parent"))
}

/// The size of a file, or `None` if it is gone.
fn file_size(path: &Path) -> Result<Option<u64>> {
    match fs::metadata(path) {
        Ok(m) => Ok(Some(m.len())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(format!("stat {}", path.display()), e)),
    }
}

impl LocalBackend {
    /// Opens (creating if needed) the data directory `data_dir` for `location`.
    /// `capacity_limit` bounds the bytes of all disks and snapshots together and
    /// is also the largest disk.
    ///
    /// Fails with `Unavailable` if another backend holds the directory, and with
    /// `FailedPrecondition` if the index does not parse or belongs to another
    /// location.
    pub fn open(data_dir: &Path, location: &str, capacity_limit: Option<u64>) -> Result<Self> {
        check_location(location)?;
        let mkdir = |p: &Path| {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(p)
                .map_err(|e| Error::io(format!("creating {}", p.display()), e))
        };
        mkdir(data_dir)?;
        // Absolute, but with symlinks kept: the node derives the same path from
        // the same configured directory.
        let data_dir = std::path::absolute(data_dir)
            .map_err(|e| Error::io(format!("resolving {}", data_dir.display()), e))?;
        mkdir(&data_dir.join(DISKS_DIR))?;
        mkdir(&data_dir.join(SNAPSHOTS_DIR))?;

        let lock_path = data_dir.join(LOCK_FILE);
        let lock_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|e| Error::io(format!("opening {}", lock_path.display()), e))?;
        let lock = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
            if e == Errno::EWOULDBLOCK {
                Error::Unavailable(format!(
                    "data directory {} is in use by another local backend",
                    data_dir.display()
                ))
            } else {
                Error::io(format!("locking {}", lock_path.display()), e.into())
            }
        })?;

        // A temporary index is what an interrupted write left: index.json is
        // still the last complete one.
        let tmp = data_dir.join(INDEX_TMP);
        if tmp.exists() {
            tracing::warn!(path = %tmp.display(), "removing an interrupted index write");
            fs::remove_file(&tmp)
                .map_err(|e| Error::io(format!("removing {}", tmp.display()), e))?;
        }

        let index_path = data_dir.join(INDEX_FILE);
        let (mut index, existed) = match fs::read(&index_path) {
            Ok(bytes) => {
                let index: Index = serde_json::from_slice(&bytes).map_err(|e| {
                    Error::FailedPrecondition(format!(
                        "index {} is unreadable ({e}); refusing to start without it",
                        index_path.display()
                    ))
                })?;
                (index, true)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => (
                Index {
                    version: INDEX_VERSION,
                    location: location.to_string(),
                    disks: BTreeMap::new(),
                    snapshots: BTreeMap::new(),
                },
                false,
            ),
            Err(e) => return Err(Error::io(format!("reading {}", index_path.display()), e)),
        };
        if index.version != INDEX_VERSION {
            return Err(Error::FailedPrecondition(format!(
                "index {} has version {}, this driver reads version {INDEX_VERSION}",
                index_path.display(),
                index.version
            )));
        }
        if index.location != location {
            return Err(Error::FailedPrecondition(format!(
                "data directory {} belongs to location {:?}, not {location:?}",
                data_dir.display(),
                index.location
            )));
        }

        // Keys become file names: only names this backend makes are accepted.
        if let Some(bad) = index
            .disks
            .keys()
            .filter(|k| !is_stem(DISK_PREFIX, k))
            .chain(
                index
                    .snapshots
                    .keys()
                    .filter(|k| !is_stem(SNAPSHOT_PREFIX, k)),
            )
            .next()
        {
            return Err(Error::FailedPrecondition(format!(
                "index {} names an image {} that this driver did not make",
                index_path.display(),
                Excerpt::of(bad)
            )));
        }

        let inner = Inner {
            topology: Topology::from([(TOPOLOGY_NODE_KEY.to_string(), location.to_string())]),
            location: location.to_string(),
            capacity_limit,
            index: Mutex::new(Index {
                version: INDEX_VERSION,
                location: location.to_string(),
                disks: BTreeMap::new(),
                snapshots: BTreeMap::new(),
            }),
            busy: StdMutex::new(BTreeMap::new()),
            _lock: lock,
            data_dir,
        };
        let changed = inner.reconcile(&mut index)?;
        if changed || !existed {
            let bytes = serde_json::to_vec_pretty(&index)
                .map_err(|e| Error::Internal(format!("encoding the index: {e}")))?;
            write_index_file(&inner.data_dir, &bytes)
                .map_err(|e| Error::io(format!("writing {}", index_path.display()), e))?;
        }
        *inner.index.try_lock().expect("no one else holds it yet") = index;
        Ok(LocalBackend {
            inner: Arc::new(inner),
        })
    }

    /// Where the image of the disk named `disk` (a [`VolumeId::disk`]) lives
    /// under `data_dir`: the one definition of the layout, for the node plugin too.
    pub fn disk_image_path(data_dir: &Path, disk: &str) -> PathBuf {
        data_dir.join(DISKS_DIR).join(format!("{disk}{IMAGE_EXT}"))
    }

    /// `index.json` under `data_dir` as it is now, for readers in other
    /// processes (the node plugin, the local authorizer); `None` when there is
    /// none yet. The index is replaced by atomic renames, so a read sees one
    /// whole version.
    fn read_index(data_dir: &Path) -> Result<Option<Index>> {
        let path = data_dir.join(INDEX_FILE);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
        };
        let index: Index = serde_json::from_slice(&bytes).map_err(|e| {
            Error::FailedPrecondition(format!("index {} is unreadable: {e}", path.display()))
        })?;
        Ok(Some(index))
    }

    /// The fresh-disk record of the disk named `disk` as `index.json` under
    /// `data_dir` holds it now: how the node plugin, on the same machine as the
    /// controller, confirms the record without trusting a request. The index is
    /// replaced by atomic renames, so a read sees one whole version. `None` when
    /// the disk has no record or no entry.
    pub fn fresh_record(data_dir: &Path, disk: &str) -> Result<Option<FreshRecord>> {
        let Some(index) = Self::read_index(data_dir)? else {
            return Ok(None);
        };
        Ok(index.disks.get(disk).and_then(DiskEntry::live_fresh))
    }

    /// Whether the local backend under `data_dir` has published volume `id`
    /// to its own node (the node its index is for, the only one it serves) and,
    /// if so, that node and the volume's key scope: what the local authorizer
    /// of `dev` and of `kms --authorizer local` decides by. Read from
    /// `index.json` as it is now (atomic renames: one whole version).
    pub fn published_key_scope(data_dir: &Path, id: &VolumeId) -> Result<Option<(String, String)>> {
        let Some(index) = Self::read_index(data_dir)? else {
            return Ok(None);
        };
        if id.backend() != BackendKind::Local || id.location() != index.location {
            return Ok(None);
        }
        Ok(index
            .disks
            .get(id.disk())
            .filter(|e| e.attachments.contains_key(&index.location))
            .map(|e| {
                let scope = e.key_scope.clone().unwrap_or_else(|| id.to_string());
                (index.location.clone(), scope)
            }))
    }

    /// The data directory (absolute).
    pub fn data_dir(&self) -> &Path {
        &self.inner.data_dir
    }

    /// The location this backend serves.
    pub fn location(&self) -> &str {
        &self.inner.location
    }

    /// Runs a mutating operation as its own task, so that it finishes even if the
    /// caller stops waiting.
    async fn run<T, F>(&self, op: impl FnOnce(Arc<Inner>) -> F) -> Result<T>
    where
        T: Send + 'static,
        F: Future<Output = Result<T>> + Send + 'static,
    {
        tokio::spawn(op(self.inner.clone()))
            .await
            .map_err(|e| Error::Internal(format!("backend operation failed: {e}")))?
    }
}

impl Inner {
    fn disk_path(&self, stem: &str) -> PathBuf {
        LocalBackend::disk_image_path(&self.data_dir, stem)
    }

    fn snapshot_path(&self, stem: &str) -> PathBuf {
        self.data_dir
            .join(SNAPSHOTS_DIR)
            .join(format!("{stem}{IMAGE_EXT}"))
    }

    fn volume_id(&self, stem: &str) -> VolumeId {
        VolumeId::new(BackendKind::Local, &self.location, stem).expect("stems are valid names")
    }

    fn snapshot_id(&self, stem: &str) -> SnapshotId {
        SnapshotId::new(BackendKind::Local, &self.location, stem).expect("stems are valid names")
    }

    fn owns_volume(&self, id: &VolumeId) -> bool {
        id.backend() == BackendKind::Local && id.location() == self.location
    }

    fn owns_snapshot(&self, id: &SnapshotId) -> bool {
        id.backend() == BackendKind::Local && id.location() == self.location
    }

    fn check_volume(&self, id: &VolumeId) -> Result<()> {
        if self.owns_volume(id) {
            Ok(())
        } else {
            Err(Error::InvalidArgument(format!(
                "volume {id} does not belong to this backend, which serves local:{}",
                self.location
            )))
        }
    }

    fn check_snapshot(&self, id: &SnapshotId) -> Result<()> {
        if self.owns_snapshot(id) {
            Ok(())
        } else {
            Err(Error::InvalidArgument(format!(
                "snapshot {id} does not belong to this backend, which serves local:{}",
                self.location
            )))
        }
    }

    fn validate_parameters(params: &BTreeMap<String, String>) -> Result<()> {
        if params.is_empty() {
            return Ok(());
        }
        let mut names: Vec<String> = params
            .keys()
            .take(4)
            .map(|k| Excerpt::of(k).to_string())
            .collect();
        if params.len() > names.len() {
            names.push(format!("and {} more", params.len() - names.len()));
        }
        Err(Error::InvalidArgument(format!(
            "the local backend takes no parameters, found {}",
            names.join(", ")
        )))
    }

    /// Brings a freshly read index in line with the files; returns whether it
    /// changed. Removes leftovers of interrupted image builds; logs orphans.
    fn reconcile(&self, index: &mut Index) -> Result<bool> {
        let mut changed = false;
        for (dir, prefix) in [(DISKS_DIR, DISK_PREFIX), (SNAPSHOTS_DIR, SNAPSHOT_PREFIX)] {
            let dir = self.data_dir.join(dir);
            let entries = fs::read_dir(&dir)
                .map_err(|e| Error::io(format!("listing {}", dir.display()), e))?;
            for entry in entries {
                let entry =
                    entry.map_err(|e| Error::io(format!("listing {}", dir.display()), e))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') && name.contains(PARTIAL_MARK) {
                    tracing::info!(path = %entry.path().display(), "removing an interrupted image build");
                    fs::remove_file(entry.path()).map_err(|e| {
                        Error::io(format!("removing {}", entry.path().display()), e)
                    })?;
                    continue;
                }
                let Some(stem) = name.strip_suffix(IMAGE_EXT) else {
                    continue;
                };
                let known = if prefix == DISK_PREFIX {
                    index.disks.contains_key(stem)
                } else {
                    index.snapshots.contains_key(stem)
                };
                if !known {
                    tracing::warn!(
                        path = %entry.path().display(),
                        "image has no index entry; kept, and replaced if it is created again"
                    );
                }
            }
        }
        let mut gone = Vec::new();
        for (stem, entry) in index.disks.iter_mut() {
            match file_size(&self.disk_path(stem))? {
                None => gone.push(stem.clone()),
                Some(size) if size != entry.capacity_bytes => {
                    entry.capacity_bytes = size;
                    changed = true;
                }
                Some(_) => {}
            }
        }
        for stem in gone {
            tracing::warn!(disk = %stem, "disk image is gone; dropping its index entry");
            index.disks.remove(&stem);
            changed = true;
        }
        let mut gone = Vec::new();
        for (stem, entry) in index.snapshots.iter_mut() {
            match file_size(&self.snapshot_path(stem))? {
                None => gone.push(stem.clone()),
                Some(size) if size != entry.size_bytes => {
                    entry.size_bytes = size;
                    changed = true;
                }
                Some(_) => {}
            }
        }
        for stem in gone {
            tracing::warn!(snapshot = %stem, "snapshot image is gone; dropping its index entry");
            index.snapshots.remove(&stem);
            changed = true;
        }
        Ok(changed)
    }

    /// Writes `new` as the index, then makes it the in-memory one.
    async fn commit(&self, current: &mut Index, new: Index) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(&new)
            .map_err(|e| Error::Internal(format!("encoding the index: {e}")))?;
        let dir = self.data_dir.clone();
        blocking(move || {
            write_index_file(&dir, &bytes).map_err(|e| Error::io("writing the index", e))
        })
        .await?;
        *current = new;
        Ok(())
    }

    /// Bytes free for new images: the filesystem's free space, bounded by the
    /// limit less what existing and in-progress images take.
    fn available(&self, index: &Index) -> Result<u64> {
        let st = nix::sys::statvfs::statvfs(&self.data_dir)
            .map_err(|e| Error::io(format!("statvfs {}", self.data_dir.display()), e.into()))?;
        let fs_free = (st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64);
        let Some(limit) = self.capacity_limit else {
            return Ok(fs_free);
        };
        let reserved: u64 = self
            .busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .sum();
        let allocated = index
            .disks
            .values()
            .map(|d| d.capacity_bytes)
            .chain(index.snapshots.values().map(|s| s.size_bytes))
            .fold(reserved, u64::saturating_add);
        Ok(fs_free.min(limit.saturating_sub(allocated)))
    }

    /// Marks `stem` busy with `bytes` reserved, unless it already is.
    fn mark_busy(&self, stem: &str, bytes: u64, what: &str) -> Result<BusyGuard<'_>> {
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        if busy.contains_key(stem) {
            return Err(Error::Aborted(format!(
                "an operation on {what} is already in progress"
            )));
        }
        busy.insert(stem.to_string(), bytes);
        Ok(BusyGuard {
            busy: &self.busy,
            stem: stem.to_string(),
        })
    }

    fn is_busy(&self, stem: &str) -> bool {
        self.busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(stem)
    }

    /// The disk as it is now, or `None` if its image is gone.
    fn disk(&self, stem: &str, e: &DiskEntry) -> Result<Option<Disk>> {
        let Some(size) = file_size(&self.disk_path(stem))? else {
            return Ok(None);
        };
        Ok(Some(Disk {
            id: self.volume_id(stem),
            name: e.name.clone(),
            capacity_bytes: size,
            source: e.source.clone(),
            topology: vec![self.topology.clone()],
            attached_to: e.attachments.keys().cloned().collect(),
            options: e.options.clone(),
            fresh: e.live_fresh(),
            usable_bytes: e.usable_bytes,
            key_scope: e.key_scope.clone(),
        }))
    }

    fn snapshot(&self, stem: &str, e: &SnapshotEntry) -> Result<Option<Snapshot>> {
        let Some(size) = file_size(&self.snapshot_path(stem))? else {
            return Ok(None);
        };
        Ok(Some(Snapshot {
            id: self.snapshot_id(stem),
            name: e.name.clone(),
            source: e.source.clone(),
            size_bytes: size,
            created_unix_nanos: e.created_unix_nanos,
            ready: true,
            options: e.options.clone(),
            usable_bytes: e.usable_bytes,
            key_scope: e.key_scope.clone(),
        }))
    }

    /// Opens the image a new disk is copied from, under the index lock; the open
    /// file stays readable even if the source is deleted during the copy.
    fn open_source(&self, index: &Index, source: &DiskSource) -> Result<(File, u64)> {
        let (path, what) = match source {
            DiskSource::Disk(id) => {
                self.check_volume(id)?;
                if !index.disks.contains_key(id.disk()) {
                    return Err(Error::NotFound(format!(
                        "source volume {id} does not exist"
                    )));
                }
                (self.disk_path(id.disk()), format!("source volume {id}"))
            }
            DiskSource::Snapshot(id) => {
                self.check_snapshot(id)?;
                if !index.snapshots.contains_key(id.snapshot()) {
                    return Err(Error::NotFound(format!(
                        "source snapshot {id} does not exist"
                    )));
                }
                (
                    self.snapshot_path(id.snapshot()),
                    format!("source snapshot {id}"),
                )
            }
        };
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::NotFound(format!("{what} does not exist")));
            }
            Err(e) => return Err(Error::io(format!("opening {what}"), e)),
        };
        let len = file
            .metadata()
            .map_err(|e| Error::io(format!("stat {what}"), e))?
            .len();
        Ok((file, len))
    }

    async fn create_disk(&self, spec: &DiskSpec) -> Result<Disk> {
        if spec.name.is_empty() {
            return Err(Error::InvalidArgument(
                "volume name must not be empty".into(),
            ));
        }
        Self::validate_parameters(&spec.parameters)?;
        if let Some(req) = &spec.accessibility
            && !req.admits(&self.topology)
        {
            return Err(Error::ResourceExhausted(format!(
                "no requisite topology can be met: this backend serves only {TOPOLOGY_NODE_KEY}={}",
                self.location
            )));
        }
        let requested = round_up(spec.capacity_bytes)?;
        let stem = hashed_stem(DISK_PREFIX, &spec.name);
        let path = self.disk_path(&stem);
        let name = Excerpt::of(&spec.name);

        let index = self.index.lock().await;
        if let Some(e) = index.disks.get(&stem)
            && let Some(disk) = self.disk(&stem, e)?
        {
            if e.name != spec.name {
                return Err(Error::AlreadyExists(format!(
                    "volume name {name} collides with the existing volume {}",
                    Excerpt::of(&e.name)
                )));
            }
            let mut diffs = Vec::new();
            if e.requested_bytes != requested {
                diffs.push(format!(
                    "capacity {} bytes (requested now: {requested})",
                    e.requested_bytes
                ));
            }
            if e.source != spec.source {
                diffs.push(format!(
                    "source {} (requested now: {})",
                    describe_source(e.source.as_ref()),
                    describe_source(spec.source.as_ref())
                ));
            }
            if e.parameters != spec.parameters || e.options != spec.options {
                diffs.push("other parameters".to_string());
            }
            if diffs.is_empty() {
                return Ok(disk);
            }
            return Err(Error::AlreadyExists(format!(
                "volume {name} already exists as {} with {}",
                disk.id,
                diffs.join(", ")
            )));
        }

        let source = spec
            .source
            .as_ref()
            .map(|s| self.open_source(&index, s))
            .transpose()?;
        let size = match (requested, &source) {
            (0, Some((_, len))) => round_up(*len)?,
            (0, None) => {
                return Err(Error::InvalidArgument(
                    "capacity must be given for a volume without a source".into(),
                ));
            }
            (n, _) => n,
        };
        if let Some(max) = self.capacity_limit
            && size > max
        {
            return Err(Error::OutOfRange(format!(
                "capacity {size} bytes is above this backend's largest volume, {max} bytes"
            )));
        }
        if let Some((_, len)) = &source
            && *len > size
        {
            return Err(Error::OutOfRange(format!(
                "capacity {size} bytes is smaller than the source's {len} bytes"
            )));
        }
        let available = self.available(&index)?;
        if size > available {
            return Err(Error::ResourceExhausted(format!(
                "capacity {size} bytes is more than the {available} bytes available"
            )));
        }
        let _busy = self.mark_busy(&stem, size, &format!("volume {name}"))?;
        drop(index);

        let build_path = path.clone();
        blocking(move || {
            build_image(&build_path, source, size)
                .map_err(|e| Error::io(format!("creating {}", build_path.display()), e))
        })
        .await?;
        crate::failpoint::hit("create:image-built");

        let mut index = self.index.lock().await;
        let mut new = index.clone();
        new.disks.insert(
            stem.clone(),
            DiskEntry {
                name: spec.name.clone(),
                requested_bytes: requested,
                capacity_bytes: size,
                source: spec.source.clone(),
                parameters: spec.parameters.clone(),
                attachments: BTreeMap::new(),
                options: spec.options.clone(),
                // Only a disk built from nothing is known to be empty.
                fresh: spec.source.is_none().then(FreshRecord::new_random),
                usable_bytes: Some(spec.usable_bytes),
                key_scope: spec.key_scope.clone(),
            },
        );
        if let Err(e) = self.commit(&mut index, new).await {
            // Without an index entry the image is an orphan; it is not worth
            // keeping, and a retry builds it again.
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        crate::failpoint::hit("create:committed");
        let entry = &index.disks[&stem];
        self.disk(&stem, entry)?
            .ok_or_else(|| Error::Internal(format!("image {} vanished", path.display())))
    }

    async fn delete_disk(&self, id: &VolumeId) -> Result<()> {
        self.check_volume(id)?;
        let stem = id.disk();
        let mut index = self.index.lock().await;
        if self.is_busy(stem) {
            return Err(Error::Aborted(format!(
                "an operation on volume {id} is already in progress"
            )));
        }
        let Some(entry) = index.disks.get(stem) else {
            return Ok(());
        };
        if !entry.attachments.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "volume {id} is still attached to {}; detach it first",
                entry
                    .attachments
                    .keys()
                    .map(|n| Excerpt::of(n).to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let path = self.disk_path(stem);
        let shown = id.to_string();
        blocking(move || {
            remove_image(&path).map_err(|e| Error::io(format!("deleting {shown}"), e))
        })
        .await?;
        let mut new = index.clone();
        new.disks.remove(stem);
        self.commit(&mut index, new).await
    }

    async fn attach(
        &self,
        id: &VolumeId,
        node_id: &str,
        read_only: bool,
    ) -> Result<BTreeMap<String, String>> {
        self.check_volume(id)?;
        if node_id.is_empty() {
            return Err(Error::InvalidArgument("node id must not be empty".into()));
        }
        let node = Excerpt::of(node_id);
        let stem = id.disk();
        let mut index = self.index.lock().await;
        let Some(entry) = index.disks.get(stem) else {
            return Err(Error::NotFound(format!("volume {id} does not exist")));
        };
        let path = self.disk_path(stem);
        if file_size(&path)?.is_none() {
            return Err(Error::NotFound(format!("volume {id} does not exist")));
        }
        let context = BTreeMap::from([(
            PUBLISH_IMAGE_PATH.to_string(),
            path.to_string_lossy().into_owned(),
        )]);
        if let Some(a) = entry.attachments.get(node_id) {
            if a.read_only == read_only {
                return Ok(context);
            }
            return Err(Error::AlreadyExists(format!(
                "volume {id} is already attached to node {node} {}",
                if a.read_only {
                    "read-only"
                } else {
                    "read-write"
                }
            )));
        }
        let conflict = entry
            .attachments
            .iter()
            .find(|(_, a)| !read_only || !a.read_only);
        if let Some((other, a)) = conflict {
            return Err(Error::FailedPrecondition(format!(
                "volume {id} is attached {} to node {}; it can be attached to many nodes read-only or to one read-write",
                if a.read_only {
                    "read-only"
                } else {
                    "read-write"
                },
                Excerpt::of(other)
            )));
        }
        let mut new = index.clone();
        new.disks
            .get_mut(stem)
            .expect("checked above")
            .attachments
            .insert(node_id.to_string(), Attachment { read_only });
        self.commit(&mut index, new).await?;
        Ok(context)
    }

    /// Detaches `id` from `node_id`; with `end_fresh`, also clears the disk's
    /// fresh-disk record (attached there or not), in the same index write.
    async fn detach(&self, id: &VolumeId, node_id: &str, end_fresh: bool) -> Result<()> {
        self.check_volume(id)?;
        let mut index = self.index.lock().await;
        let Some(entry) = index.disks.get(id.disk()) else {
            return Ok(());
        };
        let attached = entry.attachments.contains_key(node_id);
        // Only the end of an attachment ends the first one: an unpublish for a
        // node the disk is not attached to (a CO's idempotent retry, a stray
        // call) leaves the record alone.
        let clear = end_fresh && attached && entry.fresh.is_some();
        if !attached && !clear {
            return Ok(());
        }
        let mut new = index.clone();
        let entry = new.disks.get_mut(id.disk()).expect("checked above");
        entry.attachments.remove(node_id);
        if clear {
            entry.fresh = None;
        }
        self.commit(&mut index, new).await?;
        if clear {
            tracing::info!(volume = %id, "first attachment ended: fresh-disk record cleared");
        }
        Ok(())
    }

    async fn expand(&self, id: &VolumeId, new_capacity_bytes: u64) -> Result<u64> {
        self.check_volume(id)?;
        let target = round_up(new_capacity_bytes)?;
        if let Some(max) = self.capacity_limit
            && target > max
        {
            return Err(Error::OutOfRange(format!(
                "capacity {target} bytes is above this backend's largest volume, {max} bytes"
            )));
        }
        let stem = id.disk();
        let mut index = self.index.lock().await;
        if !index.disks.contains_key(stem) {
            return Err(Error::NotFound(format!("volume {id} does not exist")));
        }
        let path = self.disk_path(stem);
        let Some(current) = file_size(&path)? else {
            return Err(Error::NotFound(format!("volume {id} does not exist")));
        };
        if target == current {
            return Ok(current);
        }
        if target < current {
            return Err(Error::InvalidArgument(format!(
                "volume {id} is {current} bytes; it cannot shrink to {target}"
            )));
        }
        let available = self.available(&index)?;
        if target - current > available {
            return Err(Error::ResourceExhausted(format!(
                "growing volume {id} by {} bytes needs more than the {available} bytes available",
                target - current
            )));
        }
        blocking(move || {
            let f = OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|f| f.set_len(target).and_then(|()| f.sync_all()));
            f.map_err(|e| Error::io(format!("growing {}", path.display()), e))
        })
        .await?;
        let mut new = index.clone();
        new.disks
            .get_mut(stem)
            .expect("checked above")
            .capacity_bytes = target;
        self.commit(&mut index, new).await?;
        Ok(target)
    }

    async fn record_usable(&self, id: &VolumeId, usable_bytes: u64) -> Result<()> {
        self.check_volume(id)?;
        let mut index = self.index.lock().await;
        let Some(entry) = index.disks.get(id.disk()) else {
            return Err(Error::NotFound(format!("volume {id} does not exist")));
        };
        if entry.usable_bytes == Some(usable_bytes) {
            return Ok(());
        }
        let mut new = index.clone();
        new.disks
            .get_mut(id.disk())
            .expect("checked above")
            .usable_bytes = Some(usable_bytes);
        self.commit(&mut index, new).await
    }

    async fn create_snapshot(&self, source: &VolumeId, name: &str) -> Result<Snapshot> {
        self.check_volume(source)?;
        if name.is_empty() {
            return Err(Error::InvalidArgument(
                "snapshot name must not be empty".into(),
            ));
        }
        let stem = hashed_stem(SNAPSHOT_PREFIX, name);
        let path = self.snapshot_path(&stem);
        let shown = Excerpt::of(name);

        let index = self.index.lock().await;
        if let Some(e) = index.snapshots.get(&stem)
            && let Some(snap) = self.snapshot(&stem, e)?
        {
            if e.name == name && e.source == *source {
                return Ok(snap);
            }
            return Err(Error::AlreadyExists(format!(
                "snapshot {shown} already exists as {} of volume {}",
                snap.id, e.source
            )));
        }
        let (file, len) = self.open_source(&index, &DiskSource::Disk(source.clone()))?;
        // Taken with the image's length, under the same lock: the usable size
        // that goes with the bytes copied (an expansion during the copy records
        // a larger one for the disk, not for this snapshot).
        // The scope goes with the bytes: a restore of this snapshot derives its
        // key within the source's scope, whatever the source is called later.
        let (options, usable_bytes, key_scope) = index
            .disks
            .get(source.disk())
            .map(|d| {
                let scope = d.key_scope.clone().unwrap_or_else(|| source.to_string());
                (d.options.clone(), d.usable_bytes, Some(scope))
            })
            .unwrap_or_default();
        let available = self.available(&index)?;
        if len > available {
            return Err(Error::ResourceExhausted(format!(
                "snapshot of {len} bytes needs more than the {available} bytes available"
            )));
        }
        let _busy = self.mark_busy(&stem, len, &format!("snapshot {shown}"))?;
        drop(index);

        let build_path = path.clone();
        blocking(move || {
            build_image(&build_path, Some((file, len)), len)
                .map_err(|e| Error::io(format!("creating {}", build_path.display()), e))
        })
        .await?;

        let mut index = self.index.lock().await;
        let mut new = index.clone();
        new.snapshots.insert(
            stem.clone(),
            SnapshotEntry {
                name: name.to_string(),
                source: source.clone(),
                size_bytes: len,
                created_unix_nanos: now_unix_nanos(),
                options,
                usable_bytes,
                key_scope,
            },
        );
        if let Err(e) = self.commit(&mut index, new).await {
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        self.snapshot(&stem, &index.snapshots[&stem])?
            .ok_or_else(|| Error::Internal(format!("image {} vanished", path.display())))
    }

    async fn delete_snapshot(&self, id: &SnapshotId) -> Result<()> {
        self.check_snapshot(id)?;
        let stem = id.snapshot();
        let mut index = self.index.lock().await;
        if self.is_busy(stem) {
            return Err(Error::Aborted(format!(
                "an operation on snapshot {id} is already in progress"
            )));
        }
        if !index.snapshots.contains_key(stem) {
            return Ok(());
        }
        let path = self.snapshot_path(stem);
        let shown = id.to_string();
        blocking(move || {
            remove_image(&path).map_err(|e| Error::io(format!("deleting {shown}"), e))
        })
        .await?;
        let mut new = index.clone();
        new.snapshots.remove(stem);
        self.commit(&mut index, new).await
    }
}

/// A disk's source, for messages.
fn describe_source(source: Option<&DiskSource>) -> String {
    match source {
        None => "none".to_string(),
        Some(DiskSource::Disk(id)) => format!("volume {id}"),
        Some(DiskSource::Snapshot(id)) => format!("snapshot {id}"),
    }
}

#[async_trait::async_trait]
impl DiskBackend for LocalBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Local
    }

    fn validate_parameters(&self, params: &BTreeMap<String, String>) -> Result<()> {
        Inner::validate_parameters(params)
    }

    async fn create_disk(&self, spec: &DiskSpec) -> Result<Disk> {
        let spec = spec.clone();
        self.run(|inner| async move { inner.create_disk(&spec).await })
            .await
    }

    async fn delete_disk(&self, id: &VolumeId) -> Result<()> {
        let id = id.clone();
        self.run(|inner| async move { inner.delete_disk(&id).await })
            .await
    }

    async fn get_disk(&self, id: &VolumeId) -> Result<Option<Disk>> {
        let inner = &self.inner;
        inner.check_volume(id)?;
        let index = inner.index.lock().await;
        match index.disks.get(id.disk()) {
            Some(e) => inner.disk(id.disk(), e),
            None => Ok(None),
        }
    }

    async fn list_disks(
        &self,
        starting_token: Option<&str>,
        max_entries: u32,
    ) -> Result<(Vec<Disk>, Option<String>)> {
        let inner = &self.inner;
        // A token is the stem of the first entry of the next page.
        let start = check_token(starting_token, |t| is_stem(DISK_PREFIX, t))?
            .unwrap_or_default()
            .to_string();
        let index = inner.index.lock().await;
        let mut live = Vec::new();
        for (stem, e) in index.disks.range(start..) {
            if let Some(d) = inner.disk(stem, e)? {
                live.push((stem.clone(), d));
            }
        }
        Ok(paginate(live, None, max_entries))
    }

    async fn attach(
        &self,
        id: &VolumeId,
        node_id: &str,
        read_only: bool,
    ) -> Result<BTreeMap<String, String>> {
        let id = id.clone();
        let node_id = node_id.to_string();
        self.run(|inner| async move { inner.attach(&id, &node_id, read_only).await })
            .await
    }

    async fn detach(&self, id: &VolumeId, node_id: &str) -> Result<()> {
        let id = id.clone();
        let node_id = node_id.to_string();
        self.run(|inner| async move { inner.detach(&id, &node_id, false).await })
            .await
    }

    async fn detach_ending_fresh(&self, id: &VolumeId, node_id: &str) -> Result<()> {
        let id = id.clone();
        let node_id = node_id.to_string();
        self.run(|inner| async move { inner.detach(&id, &node_id, true).await })
            .await
    }

    async fn expand(&self, id: &VolumeId, new_capacity_bytes: u64) -> Result<u64> {
        let id = id.clone();
        self.run(|inner| async move { inner.expand(&id, new_capacity_bytes).await })
            .await
    }

    async fn record_usable(&self, id: &VolumeId, usable_bytes: u64) -> Result<()> {
        let id = id.clone();
        self.run(|inner| async move { inner.record_usable(&id, usable_bytes).await })
            .await
    }

    async fn create_snapshot(&self, source: &VolumeId, name: &str) -> Result<Snapshot> {
        let source = source.clone();
        let name = name.to_string();
        self.run(|inner| async move { inner.create_snapshot(&source, &name).await })
            .await
    }

    async fn delete_snapshot(&self, id: &SnapshotId) -> Result<()> {
        let id = id.clone();
        self.run(|inner| async move { inner.delete_snapshot(&id).await })
            .await
    }

    async fn get_snapshot(&self, id: &SnapshotId) -> Result<Option<Snapshot>> {
        let inner = &self.inner;
        inner.check_snapshot(id)?;
        let index = inner.index.lock().await;
        match index.snapshots.get(id.snapshot()) {
            Some(e) => inner.snapshot(id.snapshot(), e),
            None => Ok(None),
        }
    }

    async fn list_snapshots(
        &self,
        source: Option<&VolumeId>,
        snapshot_id: Option<&SnapshotId>,
        starting_token: Option<&str>,
        max_entries: u32,
    ) -> Result<(Vec<Snapshot>, Option<String>)> {
        let inner = &self.inner;
        let start = check_token(starting_token, |t| is_stem(SNAPSHOT_PREFIX, t))?
            .unwrap_or_default()
            .to_string();
        // Filters naming another backend or location match nothing here.
        if source.is_some_and(|s| !inner.owns_volume(s))
            || snapshot_id.is_some_and(|s| !inner.owns_snapshot(s))
        {
            return Ok((Vec::new(), None));
        }
        let index = inner.index.lock().await;
        let mut live = Vec::new();
        for (stem, e) in index.snapshots.range(start..) {
            if snapshot_id.is_some_and(|s| s.snapshot() != stem)
                || source.is_some_and(|s| *s != e.source)
            {
                continue;
            }
            if let Some(s) = inner.snapshot(stem, e)? {
                live.push((stem.clone(), s));
            }
        }
        Ok(paginate(live, None, max_entries))
    }

    async fn capacity(
        &self,
        params: &BTreeMap<String, String>,
        topology: Option<&Topology>,
    ) -> Result<u64> {
        let inner = &self.inner;
        Inner::validate_parameters(params)?;
        if let Some(t) = topology {
            let req = TopologyRequirement {
                requisite: vec![t.clone()],
                preferred: Vec::new(),
            };
            if !req.admits(&inner.topology) {
                return Ok(0);
            }
        }
        let index = inner.index.lock().await;
        inner.available(&index)
    }

    fn accessible_topology(&self) -> Vec<Topology> {
        vec![self.inner.topology.clone()]
    }

    fn max_volume_bytes(&self) -> Option<u64> {
        self.inner.capacity_limit
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    const MIB: u64 = 1024 * 1024;
    const NODE: &str = "node-1";

    fn spec(name: &str, capacity_bytes: u64) -> DiskSpec {
        DiskSpec {
            name: name.to_string(),
            capacity_bytes,
            source: None,
            parameters: BTreeMap::new(),
            accessibility: None,
            options: BTreeMap::new(),
            usable_bytes: capacity_bytes.saturating_sub(16 * MIB),
            key_scope: None,
        }
    }

    fn from(name: &str, capacity_bytes: u64, source: DiskSource) -> DiskSpec {
        DiskSpec {
            source: Some(source),
            ..spec(name, capacity_bytes)
        }
    }

    fn open(dir: &Path) -> LocalBackend {
        LocalBackend::open(dir, NODE, None).unwrap()
    }

    fn disk_image(b: &LocalBackend, id: &VolumeId) -> PathBuf {
        b.inner.disk_path(id.disk())
    }

    fn write_at(path: &Path, offset: u64, bytes: &[u8]) {
        let f = OpenOptions::new().write(true).open(path).unwrap();
        f.write_all_at(bytes, offset).unwrap();
        f.sync_all().unwrap();
    }

    fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        File::open(path)
            .unwrap()
            .read_exact_at(&mut buf, offset)
            .unwrap();
        buf
    }

    fn blocks(path: &Path) -> u64 {
        fs::metadata(path).unwrap().blocks()
    }

    fn on_disk_index(dir: &Path) -> Index {
        serde_json::from_slice(&fs::read(dir.join(INDEX_FILE)).unwrap()).unwrap()
    }

    fn vid(s: &str) -> VolumeId {
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn create_makes_a_sparse_image_rounded_to_a_mib() {
        let dir = tempfile::tempdir().unwrap();
        let b = open(dir.path());
        let d = b.create_disk(&spec("pvc-a", 5 * MIB + 1)).await.unwrap();
        assert_eq!(d.capacity_bytes, 6 * MIB);
        assert_eq!(d.name, "pvc-a");
        assert_eq!(d.id.backend(), BackendKind::Local);
        assert_eq!(d.id.location(), NODE);
        assert!(is_stem(DISK_PREFIX, d.id.disk()), "{}", d.id);
        assert_eq!(d.id.disk(), hashed_stem(DISK_PREFIX, "pvc-a"));
        assert!(d.attached_to.is_empty());
        assert_eq!(
            d.topology,
            vec![Topology::from([(
                TOPOLOGY_NODE_KEY.to_string(),
                NODE.to_string()
            )])]
        );
        let path = disk_image(&b, &d.id);
        assert_eq!(
            path,
            dir.path()
                .join("disks")
                .join(format!("{}.img", d.id.disk()))
        );
        assert_eq!(fs::metadata(&path).unwrap().len(), 6 * MIB);
        assert_eq!(blocks(&path), 0, "a new image is all holes");
        assert_eq!(b.get_disk(&d.id).await.unwrap(), Some(d));
    }

    #[tokio::test]
    async fn create_is_idempotent_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let b = open(dir.path());
        let d = b.create_disk(&spec("pvc-a", 3 * MIB)).await.unwrap();
        // Same request, and a request that rounds to the same size.
        assert_eq!(b.create_disk(&spec("pvc-a", 3 * MIB)).await.unwrap(), d);
        assert_eq!(b.create_disk(&spec("pvc-a", 2 * MIB + 7)).await.unwrap(), d);
        // Another size.
        let e = b.create_disk(&spec("pvc-a", 4 * MIB)).await.unwrap_err();
        assert!(matches!(e, Error::AlreadyExists(_)), "{e:?}");
        // Another source.
        let e = b
            .create_disk(&from("pvc-a", 3 * MIB, DiskSource::Disk(d.id.clone())))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::AlreadyExists(_)), "{e:?}");
        // Still one disk; an expansion does not break a retry of the create.
        assert_eq!(b.list_disks(None, 0).await.unwrap().0.len(), 1);
        b.expand(&d.id, 10 * MIB).await.unwrap();
        let again = b.create_disk(&spec("pvc-a", 3 * MIB)).await.unwrap();
        assert_eq!(again.id, d.id);
        assert_eq!(again.capacity_bytes, 10 * MIB);
    }

    #[tokio::test]
    async fn create_refuses_bad_requests() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::open(dir.path(), NODE, Some(64 * MIB)).unwrap();
        let e = b.create_disk(&spec("", MIB)).await.unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
        let e = b.create_disk(&spec("x", 0)).await.unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
        let e = b.create_disk(&spec("x", u64::MAX)).await.unwrap_err();
        assert!(matches!(e, Error::OutOfRange(_)), "{e:?}");
        let e = b.create_disk(&spec("x", 65 * MIB)).await.unwrap_err();
        assert!(matches!(e, Error::OutOfRange(_)), "{e:?}");
        let mut s = spec("x", MIB);
        s.parameters.insert("fsType".into(), "ext4".into());
        let e = b.create_disk(&s).await.unwrap_err();
        assert!(
            matches!(&e, Error::InvalidArgument(m) if m.contains("\"fsType\"")),
            "{e:?}"
        );
        let mut s = spec("x", MIB);
        s.accessibility = Some(TopologyRequirement {
            requisite: vec![Topology::from([(
                TOPOLOGY_NODE_KEY.to_string(),
                "node-2".to_string(),
            )])],
            preferred: vec![],
        });
        let e = b.create_disk(&s).await.unwrap_err();
        assert!(matches!(e, Error::ResourceExhausted(_)), "{e:?}");
        s.accessibility
            .as_mut()
            .unwrap()
            .requisite
            .push(Topology::from([(
                TOPOLOGY_NODE_KEY.to_string(),
                NODE.to_string(),
            )]));
        b.create_disk(&s).await.unwrap();
        assert_eq!(b.list_disks(None, 0).await.unwrap().0.len(), 1);
    }

    #[tokio::test]
    async fn clone_copies_the_source_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let b = open(dir.path());
        let src = b.create_disk(&spec("src", 8 * MIB)).await.unwrap();
        write_at(&disk_image(&b, &src.id), 0, b"LUKS\xba\xbe header");
        write_at(&disk_image(&b, &src.id), 5 * MIB + 3, b"marker");

        let clone = b
            .create_disk(&from("clone", 16 * MIB, DiskSource::Disk(src.id.clone())))
            .await
            .unwrap();
        assert_eq!(clone.capacity_bytes, 16 * MIB);
        assert_eq!(clone.source, Some(DiskSource::Disk(src.id.clone())));
        let path = disk_image(&b, &clone.id);
        assert_eq!(read_at(&path, 0, 13), b"LUKS\xba\xbe header");
        assert_eq!(read_at(&path, 5 * MIB + 3, 6), b"marker");
        assert_eq!(read_at(&path, 12 * MIB, 4), [0; 4]);

        // Capacity 0: the source's size.
        let same = b
            .create_disk(&from("clone0", 0, DiskSource::Disk(src.id.clone())))
            .await
            .unwrap();
        assert_eq!(same.capacity_bytes, 8 * MIB);

        // Smaller than the source.
        let e = b
            .create_disk(&from("small", 4 * MIB, DiskSource::Disk(src.id.clone())))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::OutOfRange(_)), "{e:?}");
        // Missing source.
        let missing = VolumeId::new(BackendKind::Local, NODE, "disk-nope").unwrap();
        let e = b
            .create_disk(&from("orphan", 8 * MIB, DiskSource::Disk(missing)))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::NotFound(_)), "{e:?}");
        // A source of another location.
        let foreign = vid(&format!("local:node-2:{}", src.id.disk()));
        let e = b
            .create_disk(&from("foreign", 8 * MIB, DiskSource::Disk(foreign)))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
    }

    #[tokio::test]
    async fn snapshot_and_restore_copy_the_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let b = open(dir.path());
        let src = b.create_disk(&spec("src", 8 * MIB)).await.unwrap();
        let src_path = disk_image(&b, &src.id);
        write_at(&src_path, 7 * MIB, b"before");

        let before = now_unix_nanos();
        let snap = b.create_snapshot(&src.id, "snap-a").await.unwrap();
        assert!(snap.ready);
        assert_eq!(snap.source, src.id);
        assert_eq!(snap.size_bytes, 8 * MIB);
        assert!(snap.created_unix_nanos >= before);
        assert!(is_stem(SNAPSHOT_PREFIX, snap.id.snapshot()));

        // The snapshot is a point-in-time copy: later writes do not reach it.
        write_at(&src_path, 7 * MIB, b"after!");
        let restored = b
            .create_disk(&from(
                "restored",
                8 * MIB,
                DiskSource::Snapshot(snap.id.clone()),
            ))
            .await
            .unwrap();
        assert_eq!(
            read_at(&disk_image(&b, &restored.id), 7 * MIB, 6),
            b"before"
        );
        assert_eq!(restored.source, Some(DiskSource::Snapshot(snap.id.clone())));

        // The snapshot outlives its source.
        b.delete_disk(&src.id).await.unwrap();
        let again = b
            .create_disk(&from("restored2", 0, DiskSource::Snapshot(snap.id.clone())))
            .await
            .unwrap();
        assert_eq!(read_at(&disk_image(&b, &again.id), 7 * MIB, 6), b"before");
        assert_eq!(again.capacity_bytes, 8 * MIB);

        // Restore from a snapshot that does not exist.
        let missing = SnapshotId::new(BackendKind::Local, NODE, "snap-nope").unwrap();
        let e = b
            .create_disk(&from("r3", 8 * MIB, DiskSource::Snapshot(missing)))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::NotFound(_)), "{e:?}");
    }

    #[tokio::test]
    async fn copies_keep_holes() {
        let dir = tempfile::tempdir().unwrap();
        let b = open(dir.path());
        let src = b.create_disk(&spec("src", 64 * MIB)).await.unwrap();
        let src_path = disk_image(&b, &src.id);
        write_at(&src_path, 0, &[0xa5; 4096]);
        write_at(&src_path, 40 * MIB, &[0x5a; 4096]);
        let src_blocks = blocks(&src_path);
        assert!(src_blocks > 0);

        let clone = b
            .create_disk(&from("clone", 64 * MIB, DiskSource::Disk(src.id.clone())))
            .await
            .unwrap();
        let clone_path = disk_image(&b, &clone.id);
        assert!(
            blocks(&clone_path) <= src_blocks,
            "clone has {} blocks, source {src_blocks}",
            blocks(&clone_path)
        );
        assert!(blocks(&clone_path) * 512 < MIB);
        assert_eq!(read_at(&clone_path, 40 * MIB, 4096), vec![0x5a; 4096]);

        let snap = b.create_snapshot(&src.id, "s").await.unwrap();
        let snap_path = b.inner.snapshot_path(snap.id.snapshot());
        assert!(blocks(&snap_path) <= src_blocks);
        assert_eq!(read_at(&snap_path, 0, 4096), vec![0xa5; 4096]);
    }

    #[test]
    fn sparse_copy_skips_holes_and_zero_blocks() {
        // Exercised directly: on a filesystem with reflinks the backend would not
        // get here.
        let dir = tempfile::tempdir().unwrap();
        let src_path = dir.path().join("src");
        let src = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&src_path)
            .unwrap();
        src.set_len(32 * MIB).unwrap();
        src.write_all_at(b"head", 0).unwrap();
        // Allocated but all zeros: need not be allocated in the copy.
        src.write_all_at(&vec![0u8; 2 * MIB as usize], 8 * MIB)
            .unwrap();
        src.write_all_at(b"tail", 32 * MIB - 4).unwrap();
        src.sync_all().unwrap();

        let dst_path = dir.path().join("dst");
        let dst = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&dst_path)
            .unwrap();
        dst.set_len(32 * MIB).unwrap();
        sparse_copy(&src, &dst, 32 * MIB).unwrap();
        dst.sync_all().unwrap();

        assert_eq!(read_at(&dst_path, 0, 4), b"head");
        assert_eq!(read_at(&dst_path, 32 * MIB - 4, 4), b"tail");
        assert_eq!(read_at(&dst_path, 9 * MIB, 16), [0; 16]);
        assert!(blocks(&src_path) >= 2 * MIB / 512);
        assert!(
            blocks(&dst_path) * 512 < 256 * 1024,
            "copy has {} blocks",
            blocks(&dst_path)
        );
        // Byte for byte the same.
        assert_eq!(fs::read(&src_path).unwrap(), fs::read(&dst_path).unwrap());
    }

    #[tokio::test]
    async fn delete_is_idempotent_and_refuses_attached_disks() {
        let dir = tempfile::tempdir().unwrap();
        let b = open(dir.path());
        let missing = VolumeId::new(BackendKind::Local, NODE, "disk-missing").unwrap();
        b.delete_disk(&missing).await.unwrap();

        let d = b.create_disk(&spec("a", MIB)).await.unwrap();
        let path = disk_image(&b, &d.id);
        b.attach(&d.id, "node-1", false).await.unwrap();
        let e = b.delete_disk(&d.id).await.unwrap_err();
        assert!(matches!(e, Error::FailedPrecondition(_)), "{e:?}");
        assert!(path.exists());

        b.detach(&d.id, "node-1").await.unwrap();
        b.delete_disk(&d.id).await.unwrap();
        assert!(!path.exists());
        assert_eq!(b.get_disk(&d.id).await.unwrap(), None);
        b.delete_disk(&d.id).await.unwrap();
        assert!(on_disk_index(dir.path()).disks.is_empty());
        // Created again under the same name: a fresh, blank disk.
        let again = b.create_disk(&spec("a", MIB)).await.unwrap();
        assert_eq!(again.id, d.id);
    }

    #[tokio::test]
    async fn list_pages_through_every_disk_in_a_stable_order() {
        let dir = tempfile::tempdir().unwrap();
        let b = open(dir.path());
        let mut ids = Vec::new();
        for i in 0..7 {
            ids.push(
                b.create_disk(&spec(&format!("pvc-{i}"), MIB))
                    .await
                    .unwrap()
                    .id,
            );
        }
        ids.sort();

        let (all, next) = b.list_disks(None, 0).await.unwrap();
        assert_eq!(next, None);
        assert_eq!(all.iter().map(|d| d.id.clone()).collect::<Vec<_>>(), ids);
        assert_eq!(b.list_disks(None, 7).await.unwrap().1, None);
        assert_eq!(b.list_disks(None, 100).await.unwrap().0.len(), 7);

        let mut seen = Vec::new();
        let mut token: Option<String> = None;
        let mut pages = 0;
        loop {
            let (page, next) = b.list_disks(token.as_deref(), 3).await.unwrap();
            assert!(page.len() <= 3);
            seen.extend(page.into_iter().map(|d| d.id));
            pages += 1;
            match next {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        assert_eq!(pages, 3);
        assert_eq!(seen, ids);

        // A token stays valid when its disk is deleted between pages.
        let (first, next) = b.list_disks(None, 2).await.unwrap();
        let next = next.unwrap();
        b.delete_disk(&ids[2]).await.unwrap();
        let (rest, _) = b.list_disks(Some(&next), 0).await.unwrap();
        assert_eq!(first.len() + rest.len(), 6);
        assert_eq!(rest[0].id, ids[3]);

        for bad in [
            "bogus",
            "disk-",
            "disk-XYZ",
            "snap-0123456789abcdef0123456789abcdef",
        ] {
            let e = b.list_disks(Some(bad), 0).await.unwrap_err();
            assert!(matches!(e, Error::Aborted(_)), "{bad}: {e:?}");
        }
        // An empty token is no token.
        assert_eq!(b.list_disks(Some(""), 0).await.unwrap().0.len(), 6);
    }

    #[tokio::test]
    async fn attach_and_detach_are_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let b = open(dir.path());
        let d = b.create_disk(&spec("a", MIB)).await.unwrap();
        let ctx = b.attach(&d.id, "node-1", false).await.unwrap();
        let path = PathBuf::from(&ctx[PUBLISH_IMAGE_PATH]);
        assert!(path.is_absolute());
        assert_eq!(path, disk_image(&b, &d.id));
        assert_eq!(ctx.len(), 1);
        assert_eq!(b.attach(&d.id, "node-1", false).await.unwrap(), ctx);
        assert_eq!(
            b.get_disk(&d.id).await.unwrap().unwrap().attached_to,
            vec!["node-1".to_string()]
        );
        // Same node, other mode.
        let e = b.attach(&d.id, "node-1", true).await.unwrap_err();
        assert!(matches!(e, Error::AlreadyExists(_)), "{e:?}");
        // A second node while a writer holds it.
        let e = b.attach(&d.id, "node-2", true).await.unwrap_err();
        assert!(matches!(e, Error::FailedPrecondition(_)), "{e:?}");

        b.detach(&d.id, "node-1").await.unwrap();
        b.detach(&d.id, "node-1").await.unwrap();
        b.detach(&d.id, "never-attached").await.unwrap();
        assert!(
            b.get_disk(&d.id)
                .await
                .unwrap()
                .unwrap()
                .attached_to
                .is_empty()
        );

        // Many readers, but no writer beside them.
        b.attach(&d.id, "node-1", true).await.unwrap();
        b.attach(&d.id, "node-2", true).await.unwrap();
        let e = b.attach(&d.id, "node-3", false).await.unwrap_err();
        assert!(matches!(e, Error::FailedPrecondition(_)), "{e:?}");
        assert_eq!(
            b.get_disk(&d.id).await.unwrap().unwrap().attached_to,
            vec!["node-1".to_string(), "node-2".to_string()]
        );
        assert_eq!(
            on_disk_index(dir.path()).disks[d.id.disk()]
                .attachments
                .len(),
            2
        );

        let missing = VolumeId::new(BackendKind::Local, NODE, "disk-missing").unwrap();
        let e = b.attach(&missing, "node-1", false).await.unwrap_err();
        assert!(matches!(e, Error::NotFound(_)), "{e:?}");
        b.detach(&missing, "node-1").await.unwrap();
        let e = b.attach(&d.id, "", false).await.unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
    }

    #[tokio::test]
    async fn the_fresh_record_is_set_at_create_absent_on_copies_and_cleared_by_unpublish() {
        let dir = tempfile::tempdir().unwrap();
        let b = open(dir.path());
        let d = b.create_disk(&spec("pvc-f", 8 * MIB)).await.unwrap();
        let record = d.fresh.clone().expect("an empty disk has a record");
        // In the same index write that recorded the disk, and readable by the node.
        assert_eq!(
            on_disk_index(dir.path()).disks[d.id.disk()].fresh,
            Some(record.clone())
        );
        assert_eq!(
            LocalBackend::fresh_record(dir.path(), d.id.disk()).unwrap(),
            Some(record.clone())
        );
        // A retried create returns the same record.
        let again = b.create_disk(&spec("pvc-f", 8 * MIB)).await.unwrap();
        assert_eq!(again.fresh, Some(record.clone()));
        // Copies have none; one put there by hand is not believed.
        let clone = b
            .create_disk(&from("pvc-c", 8 * MIB, DiskSource::Disk(d.id.clone())))
            .await
            .unwrap();
        let snap = b.create_snapshot(&d.id, "snap-f").await.unwrap();
        let restore = b
            .create_disk(&from("pvc-r", 8 * MIB, DiskSource::Snapshot(snap.id)))
            .await
            .unwrap();
        for copy in [&clone, &restore] {
            assert_eq!(copy.fresh, None);
            assert_eq!(
                LocalBackend::fresh_record(dir.path(), copy.id.disk()).unwrap(),
                None
            );
        }
        {
            let mut index = b.inner.index.lock().await;
            index.disks.get_mut(clone.id.disk()).unwrap().fresh = Some(record.clone());
        }
        assert_eq!(b.get_disk(&clone.id).await.unwrap().unwrap().fresh, None);
        // A plain detach keeps it; ending the attachment clears it with the detach.
        b.attach(&d.id, NODE, false).await.unwrap();
        b.detach(&d.id, NODE).await.unwrap();
        assert_eq!(
            b.get_disk(&d.id).await.unwrap().unwrap().fresh,
            Some(record)
        );
        b.attach(&d.id, NODE, false).await.unwrap();
        b.detach_ending_fresh(&d.id, NODE).await.unwrap();
        let now = b.get_disk(&d.id).await.unwrap().unwrap();
        assert_eq!((now.fresh, now.attached_to.len()), (None, 0));
        assert_eq!(on_disk_index(dir.path()).disks[d.id.disk()].fresh, None);
        assert_eq!(
            LocalBackend::fresh_record(dir.path(), d.id.disk()).unwrap(),
            None
        );
        // Idempotent, and for a disk that is gone.
        b.detach_ending_fresh(&d.id, NODE).await.unwrap();
        b.delete_disk(&d.id).await.unwrap();
        b.detach_ending_fresh(&d.id, NODE).await.unwrap();
        assert_eq!(
            LocalBackend::fresh_record(dir.path(), d.id.disk()).unwrap(),
            None
        );
    }

    #[tokio::test]
    async fn expand_grows_only() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::open(dir.path(), NODE, Some(100 * MIB)).unwrap();
        let d = b.create_disk(&spec("a", 4 * MIB)).await.unwrap();
        write_at(&disk_image(&b, &d.id), MIB, b"keep");
        assert_eq!(b.expand(&d.id, 9 * MIB + 1).await.unwrap(), 10 * MIB);
        assert_eq!(fs::metadata(disk_image(&b, &d.id)).unwrap().len(), 10 * MIB);
        assert_eq!(read_at(&disk_image(&b, &d.id), MIB, 4), b"keep");
        // Again, and a request that rounds to the same size.
        assert_eq!(b.expand(&d.id, 10 * MIB).await.unwrap(), 10 * MIB);
        assert_eq!(b.expand(&d.id, 9 * MIB + 5).await.unwrap(), 10 * MIB);
        let e = b.expand(&d.id, 4 * MIB).await.unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
        let e = b.expand(&d.id, 101 * MIB).await.unwrap_err();
        assert!(matches!(e, Error::OutOfRange(_)), "{e:?}");
        let other = b.create_disk(&spec("b", 80 * MIB)).await.unwrap();
        let e = b.expand(&d.id, 30 * MIB).await.unwrap_err();
        assert!(matches!(e, Error::ResourceExhausted(_)), "{e:?}");
        assert_eq!(
            b.get_disk(&d.id).await.unwrap().unwrap().capacity_bytes,
            10 * MIB
        );
        assert_eq!(
            on_disk_index(dir.path()).disks[d.id.disk()].capacity_bytes,
            10 * MIB
        );
        b.delete_disk(&other.id).await.unwrap();
        let missing = VolumeId::new(BackendKind::Local, NODE, "disk-missing").unwrap();
        let e = b.expand(&missing, 30 * MIB).await.unwrap_err();
        assert!(matches!(e, Error::NotFound(_)), "{e:?}");
    }

    #[tokio::test]
    async fn capacity_is_bounded_by_the_limit_and_the_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        let none = BTreeMap::new();
        let st = nix::sys::statvfs::statvfs(dir.path()).unwrap();
        let fs_free = st.blocks_available() as u64 * st.fragment_size() as u64;
        {
            let unlimited = open(dir.path());
            let c = unlimited.capacity(&none, None).await.unwrap();
            // Free space moves under our feet; roughly the filesystem's.
            assert!(c > fs_free / 2 && c < fs_free * 2, "{c} vs {fs_free}");
            assert_eq!(unlimited.max_volume_bytes(), None);
        }

        let b = LocalBackend::open(dir.path(), NODE, Some(50 * MIB)).unwrap();
        assert_eq!(b.max_volume_bytes(), Some(50 * MIB));
        assert_eq!(b.capacity(&none, None).await.unwrap(), 50 * MIB);
        let d = b.create_disk(&spec("a", 20 * MIB)).await.unwrap();
        assert_eq!(b.capacity(&none, None).await.unwrap(), 30 * MIB);
        b.create_snapshot(&d.id, "s").await.unwrap();
        assert_eq!(b.capacity(&none, None).await.unwrap(), 10 * MIB);
        let e = b.create_disk(&spec("b", 11 * MIB)).await.unwrap_err();
        assert!(matches!(e, Error::ResourceExhausted(_)), "{e:?}");
        let e = b.create_snapshot(&d.id, "s2").await.unwrap_err();
        assert!(matches!(e, Error::ResourceExhausted(_)), "{e:?}");
        b.create_disk(&spec("b", 10 * MIB)).await.unwrap();
        assert_eq!(b.capacity(&none, None).await.unwrap(), 0);

        let here = Topology::from([(TOPOLOGY_NODE_KEY.to_string(), NODE.to_string())]);
        let there = Topology::from([(TOPOLOGY_NODE_KEY.to_string(), "node-2".to_string())]);
        b.delete_disk(&d.id).await.unwrap();
        assert_eq!(b.capacity(&none, Some(&here)).await.unwrap(), 20 * MIB);
        assert_eq!(b.capacity(&none, Some(&there)).await.unwrap(), 0);
        assert_eq!(b.accessible_topology(), vec![here]);
        let params = BTreeMap::from([("type".to_string(), "ssd".to_string())]);
        let e = b.capacity(&params, None).await.unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
    }

    #[test]
    fn parameters_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let b = open(dir.path());
        assert_eq!(b.kind(), BackendKind::Local);
        b.validate_parameters(&BTreeMap::new()).unwrap();
        let params = BTreeMap::from([
            ("skuName".to_string(), "x".to_string()),
            ("evil\nkey".to_string(), "y".to_string()),
        ]);
        let Error::InvalidArgument(m) = b.validate_parameters(&params).unwrap_err() else {
            panic!("wrong error")
        };
        assert!(m.contains("\"skuName\""), "{m}");
        assert!(m.contains("evil\\u{a}key"), "{m}");
        assert!(!m.contains('\n'));
    }

    #[tokio::test]
    async fn foreign_ids_are_refused_and_filter_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let b = open(dir.path());
        let d = b.create_disk(&spec("a", MIB)).await.unwrap();
        let snap = b.create_snapshot(&d.id, "s").await.unwrap();
        for foreign in [
            format!("azure:{NODE}:{}", d.id.disk()),
            format!("local:node-2:{}", d.id.disk()),
        ] {
            let id = vid(&foreign);
            let inv = |e: Error| assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
            inv(b.get_disk(&id).await.unwrap_err());
            inv(b.delete_disk(&id).await.unwrap_err());
            inv(b.attach(&id, "n", false).await.unwrap_err());
            inv(b.detach(&id, "n").await.unwrap_err());
            inv(b.expand(&id, MIB).await.unwrap_err());
            inv(b.create_snapshot(&id, "t").await.unwrap_err());
            let (snaps, _) = b.list_snapshots(Some(&id), None, None, 0).await.unwrap();
            assert!(snaps.is_empty());
            let sid: SnapshotId = foreign
                .replace(d.id.disk(), snap.id.snapshot())
                .parse()
                .unwrap();
            inv(b.get_snapshot(&sid).await.unwrap_err());
            inv(b.delete_snapshot(&sid).await.unwrap_err());
            let (snaps, _) = b.list_snapshots(None, Some(&sid), None, 0).await.unwrap();
            assert!(snaps.is_empty());
        }
        assert!(b.get_disk(&d.id).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn snapshots_are_idempotent_listed_and_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let b = open(dir.path());
        let a = b.create_disk(&spec("a", MIB)).await.unwrap();
        let c = b.create_disk(&spec("c", 2 * MIB)).await.unwrap();
        let s1 = b.create_snapshot(&a.id, "s1").await.unwrap();
        assert_eq!(b.create_snapshot(&a.id, "s1").await.unwrap(), s1);
        let e = b.create_snapshot(&c.id, "s1").await.unwrap_err();
        assert!(matches!(e, Error::AlreadyExists(_)), "{e:?}");
        let missing = VolumeId::new(BackendKind::Local, NODE, "disk-missing").unwrap();
        let e = b.create_snapshot(&missing, "s9").await.unwrap_err();
        assert!(matches!(e, Error::NotFound(_)), "{e:?}");
        let e = b.create_snapshot(&a.id, "").await.unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");

        let s2 = b.create_snapshot(&a.id, "s2").await.unwrap();
        let s3 = b.create_snapshot(&c.id, "s3").await.unwrap();
        assert_eq!(s3.size_bytes, 2 * MIB);
        assert_eq!(b.get_snapshot(&s2.id).await.unwrap(), Some(s2.clone()));

        let (all, next) = b.list_snapshots(None, None, None, 0).await.unwrap();
        assert_eq!(next, None);
        let mut want = vec![s1.id.clone(), s2.id.clone(), s3.id.clone()];
        want.sort();
        assert_eq!(all.iter().map(|s| s.id.clone()).collect::<Vec<_>>(), want);

        let (of_a, _) = b.list_snapshots(Some(&a.id), None, None, 0).await.unwrap();
        let mut of_a: Vec<_> = of_a.into_iter().map(|s| s.id).collect();
        of_a.sort();
        let mut want_a = vec![s1.id.clone(), s2.id.clone()];
        want_a.sort();
        assert_eq!(of_a, want_a);
        let (only, _) = b.list_snapshots(None, Some(&s3.id), None, 0).await.unwrap();
        assert_eq!(only, vec![s3.clone()]);
        let (none, _) = b
            .list_snapshots(Some(&a.id), Some(&s3.id), None, 0)
            .await
            .unwrap();
        assert!(none.is_empty());

        let (p1, t1) = b.list_snapshots(None, None, None, 2).await.unwrap();
        let (p2, t2) = b
            .list_snapshots(None, None, t1.as_deref(), 2)
            .await
            .unwrap();
        assert_eq!((p1.len(), p2.len(), t2), (2, 1, None));
        let e = b
            .list_snapshots(None, None, Some("disk-0123456789abcdef0123456789abcdef"), 0)
            .await
            .unwrap_err();
        assert!(matches!(e, Error::Aborted(_)), "{e:?}");

        b.delete_snapshot(&s1.id).await.unwrap();
        b.delete_snapshot(&s1.id).await.unwrap();
        assert_eq!(b.get_snapshot(&s1.id).await.unwrap(), None);
        assert!(!b.inner.snapshot_path(s1.id.snapshot()).exists());
        assert_eq!(on_disk_index(dir.path()).snapshots.len(), 2);
    }

    #[tokio::test]
    async fn the_index_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (d, s) = {
            let b = open(dir.path());
            let d = b.create_disk(&spec("a", 2 * MIB)).await.unwrap();
            b.attach(&d.id, "node-1", false).await.unwrap();
            let s = b.create_snapshot(&d.id, "s").await.unwrap();
            // While this one holds the directory, no other may open it.
            let e = LocalBackend::open(dir.path(), NODE, None).err().unwrap();
            assert!(matches!(e, Error::Unavailable(_)), "{e:?}");
            (b.get_disk(&d.id).await.unwrap().unwrap(), s)
        };
        let b = open(dir.path());
        assert_eq!(b.get_disk(&d.id).await.unwrap(), Some(d.clone()));
        assert_eq!(b.get_snapshot(&s.id).await.unwrap(), Some(s));
        assert_eq!(b.list_disks(None, 0).await.unwrap().0, vec![d.clone()]);
        assert_eq!(b.create_disk(&spec("a", 2 * MIB)).await.unwrap(), d);
        drop(b);

        let e = LocalBackend::open(dir.path(), "node-2", None)
            .err()
            .unwrap();
        assert!(matches!(e, Error::FailedPrecondition(_)), "{e:?}");
        let e = LocalBackend::open(dir.path(), "../x", None).err().unwrap();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
    }

    #[tokio::test]
    async fn an_interrupted_index_write_does_not_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let d = {
            let b = open(dir.path());
            b.create_disk(&spec("a", MIB)).await.unwrap()
        };
        let good = fs::read(dir.path().join(INDEX_FILE)).unwrap();
        // A write that died before its rename leaves a torn temporary file.
        fs::write(
            dir.path().join(INDEX_TMP),
            b"{\"version\": 1, \"disks\": {\"di",
        )
        .unwrap();
        // And an image build that died leaves a partial image.
        let partial = dir.path().join("disks").join(".disk-x.img.partial-123");
        fs::write(&partial, b"half").unwrap();

        let b = open(dir.path());
        assert!(!dir.path().join(INDEX_TMP).exists());
        assert!(!partial.exists());
        assert_eq!(fs::read(dir.path().join(INDEX_FILE)).unwrap(), good);
        assert_eq!(b.get_disk(&d.id).await.unwrap().unwrap().id, d.id);
        b.create_disk(&spec("b", MIB)).await.unwrap();
        drop(b);
        let b = open(dir.path());
        assert_eq!(b.list_disks(None, 0).await.unwrap().0.len(), 2);
        drop(b);

        // An index naming files outside the layout is refused.
        let mut tampered: Index = serde_json::from_slice(&good).unwrap();
        let entry = tampered.disks.values().next().unwrap().clone();
        tampered.disks.insert("../../etc/passwd".into(), entry);
        fs::write(
            dir.path().join(INDEX_FILE),
            serde_json::to_vec(&tampered).unwrap(),
        )
        .unwrap();
        let e = LocalBackend::open(dir.path(), NODE, None).err().unwrap();
        assert!(matches!(e, Error::FailedPrecondition(_)), "{e:?}");

        // A torn index.json itself is refused, not replaced by an empty one.
        fs::write(dir.path().join(INDEX_FILE), &good[..good.len() / 2]).unwrap();
        let e = LocalBackend::open(dir.path(), NODE, None).err().unwrap();
        assert!(matches!(e, Error::FailedPrecondition(_)), "{e:?}");
    }

    #[tokio::test]
    async fn the_files_win_over_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let b = open(dir.path());
        let d = b.create_disk(&spec("a", 2 * MIB)).await.unwrap();
        let keep = b.create_disk(&spec("keep", MIB)).await.unwrap();
        let s = b.create_snapshot(&keep.id, "s").await.unwrap();
        fs::remove_file(disk_image(&b, &d.id)).unwrap();
        fs::remove_file(b.inner.snapshot_path(s.id.snapshot())).unwrap();
        assert_eq!(b.get_disk(&d.id).await.unwrap(), None);
        assert_eq!(b.get_snapshot(&s.id).await.unwrap(), None);
        assert_eq!(b.list_disks(None, 0).await.unwrap().0, vec![keep.clone()]);
        assert!(
            b.list_snapshots(None, None, None, 0)
                .await
                .unwrap()
                .0
                .is_empty()
        );
        let e = b.attach(&d.id, "n", false).await.unwrap_err();
        assert!(matches!(e, Error::NotFound(_)), "{e:?}");
        // A size changed behind the index's back.
        fs::OpenOptions::new()
            .write(true)
            .open(disk_image(&b, &keep.id))
            .unwrap()
            .set_len(3 * MIB)
            .unwrap();
        assert_eq!(
            b.get_disk(&keep.id).await.unwrap().unwrap().capacity_bytes,
            3 * MIB
        );
        drop(b);

        let b = open(dir.path());
        let index = on_disk_index(dir.path());
        assert!(!index.disks.contains_key(d.id.disk()));
        assert!(index.snapshots.is_empty());
        assert_eq!(index.disks[keep.id.disk()].capacity_bytes, 3 * MIB);
        // Created again: a new image.
        let again = b.create_disk(&spec("a", 2 * MIB)).await.unwrap();
        assert_eq!(again.id, d.id);
        assert!(disk_image(&b, &d.id).exists());
    }

    #[tokio::test]
    async fn an_orphan_image_is_replaced_by_a_retried_create() {
        let dir = tempfile::tempdir().unwrap();
        let b = open(dir.path());
        // A crash after the image was renamed into place, before the index
        // write: the image exists, the index does not know it.
        let stem = hashed_stem(DISK_PREFIX, "pvc-crashed");
        let orphan = b.inner.disk_path(&stem);
        fs::write(&orphan, vec![0x77u8; 3 * MIB as usize]).unwrap();
        assert_eq!(b.get_disk(&b.inner.volume_id(&stem)).await.unwrap(), None);
        assert!(b.list_disks(None, 0).await.unwrap().0.is_empty());
        // A delete of it leaves it alone (it is not in the index).
        b.delete_disk(&b.inner.volume_id(&stem)).await.unwrap();
        assert!(orphan.exists());

        let d = b.create_disk(&spec("pvc-crashed", 2 * MIB)).await.unwrap();
        assert_eq!(d.id.disk(), stem);
        assert_eq!(d.capacity_bytes, 2 * MIB);
        assert_eq!(read_at(&orphan, 0, 4), [0; 4], "the orphan was replaced");
        assert_eq!(blocks(&orphan), 0);
    }

    #[tokio::test]
    async fn operations_on_a_busy_name_are_aborted() {
        let dir = tempfile::tempdir().unwrap();
        let b = open(dir.path());
        let stem = hashed_stem(DISK_PREFIX, "pvc-busy");
        let guard = b.inner.mark_busy(&stem, MIB, "test").unwrap();
        let e = b.create_disk(&spec("pvc-busy", MIB)).await.unwrap_err();
        assert!(matches!(e, Error::Aborted(_)), "{e:?}");
        let e = b.delete_disk(&b.inner.volume_id(&stem)).await.unwrap_err();
        assert!(matches!(e, Error::Aborted(_)), "{e:?}");
        drop(guard);
        b.create_disk(&spec("pvc-busy", MIB)).await.unwrap();
        assert!(b.inner.busy.lock().unwrap().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_creates_all_land_in_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let b = Arc::new(open(dir.path()));
        let src = b.create_disk(&spec("src", 4 * MIB)).await.unwrap();
        write_at(&disk_image(&b, &src.id), 0, b"shared");
        let mut tasks = Vec::new();
        for i in 0..20 {
            let b = b.clone();
            let src = src.id.clone();
            tasks.push(tokio::spawn(async move {
                let s = if i % 2 == 0 {
                    spec(&format!("pvc-{i}"), (i + 1) * MIB)
                } else {
                    from(&format!("pvc-{i}"), 4 * MIB, DiskSource::Disk(src))
                };
                b.create_disk(&s).await
            }));
        }
        let mut ids = Vec::new();
        for t in tasks {
            ids.push(t.await.unwrap().unwrap().id);
        }
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 20);
        let index = on_disk_index(dir.path());
        assert_eq!(index.disks.len(), 21);
        for id in &ids {
            assert!(index.disks.contains_key(id.disk()));
        }
        assert!(b.inner.busy.lock().unwrap().is_empty());
        drop(b);
        let b = open(dir.path());
        assert_eq!(b.list_disks(None, 0).await.unwrap().0.len(), 21);
    }

    #[tokio::test]
    async fn a_cancelled_create_still_completes() {
        let dir = tempfile::tempdir().unwrap();
        let b = open(dir.path());
        // Drop the future after its first poll.
        let s = spec("pvc-cancelled", MIB);
        let fut = b.create_disk(&s);
        let _ = tokio::time::timeout(std::time::Duration::from_nanos(1), fut).await;
        // The retry either finds it done or finds it in progress; never half done.
        let mut tries = 0;
        let d = loop {
            match b.create_disk(&spec("pvc-cancelled", MIB)).await {
                Ok(d) => break d,
                Err(Error::Aborted(_)) if tries < 100 => {
                    tries += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                Err(e) => panic!("{e:?}"),
            }
        };
        assert_eq!(d.capacity_bytes, MIB);
        assert_eq!(on_disk_index(dir.path()).disks.len(), 1);
    }
}
