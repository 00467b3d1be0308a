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
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

use super::{
    Disk, DiskBackend, DiskSource, DiskSpec, Error, Result, Snapshot, Topology,
    TopologyRequirement, check_token, paginate,
};
use crate::volume::id::{Excerpt, check_location};
use crate::volume::{BackendKind, FreshRecord, SnapshotId, VolumeId};

mod image;
mod index;
#[cfg(test)]
mod tests;

use image::{build_image, file_size, remove_image};
use index::{Attachment, DiskEntry, Index, SnapshotEntry, write_index_file};

pub use crate::csi::contract::{
    LOCAL_IMAGE_PATH as PUBLISH_IMAGE_PATH, TOPOLOGY_NODE as TOPOLOGY_NODE_KEY,
};
/// Disk sizes are rounded up to a multiple of this.
pub const GRANULARITY: u64 = 1024 * 1024;

const LOCK_FILE: &str = "lock";
const DISKS_DIR: &str = "disks";
const SNAPSHOTS_DIR: &str = "snapshots";
const IMAGE_EXT: &str = ".img";
const DISK_PREFIX: &str = "disk-";
const SNAPSHOT_PREFIX: &str = "snap-";

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

        let index_path = data_dir.join(index::INDEX_FILE);
        let (mut index, existed) = index::load(&data_dir, location)?;

        let inner = Inner {
            topology: Topology::from([(TOPOLOGY_NODE_KEY.to_string(), location.to_string())]),
            location: location.to_string(),
            capacity_limit,
            index: Mutex::new(Index {
                version: index::INDEX_VERSION,
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
