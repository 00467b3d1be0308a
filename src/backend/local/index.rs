//! The local backend's `index.json`: what it records of disks and snapshots,
//! its atomic writes, its readers in other processes, and the recovery that
//! brings it in line with the image files when the backend opens.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::image::{PARTIAL_MARK, file_size};
use super::{
    DISK_PREFIX, DISKS_DIR, IMAGE_EXT, Inner, LocalBackend, SNAPSHOT_PREFIX, SNAPSHOTS_DIR,
    blocking, fsync_dir, is_stem,
};
use crate::backend::{DiskSource, Error, Result};
use crate::volume::id::Excerpt;
use crate::volume::{BackendKind, FreshRecord, VolumeId};

pub(super) const INDEX_FILE: &str = "index.json";
pub(super) const INDEX_TMP: &str = "index.json.tmp";
pub(super) const INDEX_VERSION: u32 = 1;

/// What the index records of one disk.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub(super) struct DiskEntry {
    /// The CO's name.
    pub(super) name: String,
    /// The requested size, rounded (0 = "the source's size"): what a retried
    /// create is compared against, whatever expansions happened since.
    pub(super) requested_bytes: u64,
    /// Size now.
    pub(super) capacity_bytes: u64,
    #[serde(default)]
    pub(super) source: Option<DiskSource>,
    #[serde(default)]
    pub(super) parameters: BTreeMap<String, String>,
    /// Node id → attachment.
    #[serde(default)]
    pub(super) attachments: BTreeMap<String, Attachment>,
    #[serde(default)]
    pub(super) options: BTreeMap<String, String>,
    /// The fresh-disk record: set at creation of an empty disk, cleared when its
    /// first attachment ends. Absent in indexes written before the record
    /// existed, so those disks are never formatted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) fresh: Option<FreshRecord>,
    /// The usable size the CO holds it as ([`Disk::usable_bytes`]); absent in
    /// indexes written before it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) usable_bytes: Option<u64>,
    /// The key scope inherited from the source of a restore or clone
    /// ([`Disk::key_scope`]); absent for a disk made empty, whose scope is its
    /// own volume id, and in indexes written before scopes existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) key_scope: Option<String>,
}

impl DiskEntry {
    /// The record, believed only of a disk made from nothing: one set by hand
    /// on a copy is ignored, as the cloud backends ignore theirs.
    pub(super) fn live_fresh(&self) -> Option<FreshRecord> {
        self.fresh.clone().filter(|_| self.source.is_none())
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub(super) struct Attachment {
    pub(super) read_only: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub(super) struct SnapshotEntry {
    pub(super) name: String,
    pub(super) source: VolumeId,
    pub(super) size_bytes: u64,
    pub(super) created_unix_nanos: i64,
    #[serde(default)]
    pub(super) options: BTreeMap<String, String>,
    /// The source's usable size when it was taken ([`Snapshot::usable_bytes`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) usable_bytes: Option<u64>,
    /// The source's key scope when it was taken ([`Snapshot::key_scope`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) key_scope: Option<String>,
}

/// `index.json`: keyed by file stem, so iteration order is the stable list order.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub(super) struct Index {
    pub(super) version: u32,
    pub(super) location: String,
    #[serde(default)]
    pub(super) disks: BTreeMap<String, DiskEntry>,
    #[serde(default)]
    pub(super) snapshots: BTreeMap<String, SnapshotEntry>,
}

pub(super) fn write_index_file(data_dir: &Path, bytes: &[u8]) -> io::Result<()> {
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

/// Reads the index under `data_dir` for `location`, or a new empty one if there
/// is none (then `.1` is false). A leftover temporary index is removed; an index
/// that does not parse, has another version or location, or names files this
/// driver did not make is refused.
pub(super) fn load(data_dir: &Path, location: &str) -> Result<(Index, bool)> {
    // A temporary index is what an interrupted write left: index.json is
    // still the last complete one.
    let tmp = data_dir.join(INDEX_TMP);
    if tmp.exists() {
        tracing::warn!(path = %tmp.display(), "removing an interrupted index write");
        fs::remove_file(&tmp).map_err(|e| Error::io(format!("removing {}", tmp.display()), e))?;
    }

    let index_path = data_dir.join(INDEX_FILE);
    let (index, existed) = match fs::read(&index_path) {
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
    Ok((index, existed))
}

impl LocalBackend {
    /// `index.json` under `data_dir` as it is now, for readers in other
    /// processes (the node plugin, the local authorizer); `None` when there is
    /// none yet. The index is replaced by atomic renames, so a read sees one
    /// whole version.
    pub(super) fn read_index(data_dir: &Path) -> Result<Option<Index>> {
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
}

impl Inner {
    /// Brings a freshly read index in line with the files; returns whether it
    /// changed. Removes leftovers of interrupted image builds; logs orphans.
    pub(super) fn reconcile(&self, index: &mut Index) -> Result<bool> {
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
    pub(super) async fn commit(&self, current: &mut Index, new: Index) -> Result<()> {
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
}
