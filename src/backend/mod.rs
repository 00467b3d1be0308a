//! Disk backends: where the controller's volumes and snapshots live.
//!
//! The controller speaks CSI; a backend speaks disks. [`DiskBackend`] is the one
//! interface every backend implements (the local backend in [`local`]; Azure and
//! GCP later), and [`Error`] is the one error type they return, mapped to a gRPC
//! status in one place (`impl From<Error> for tonic::Status`).
//!
//! A backend stores bytes only: the node LUKS2-formats a disk when it is blank, and
//! a clone or a restored snapshot carries the source's header, so it opens with the
//! same key. Capacity arithmetic for the LUKS2 header is the controller's job; a
//! backend rounds a requested size up to its own granularity only.
//!
//! Ids: a backend owns the ids of its own kind and location. An id of another kind
//! or location handed to any method other than a list filter is the caller's
//! routing error and fails with [`Error::InvalidArgument`]; as a list filter it
//! simply matches nothing.

#[cfg(feature = "azure")]
pub mod azure;
#[cfg(feature = "gcp")]
pub mod gcp;
pub mod local;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::volume::{BackendKind, FreshRecord, IdError, SnapshotId, VolumeId};

pub use local::LocalBackend;

/// One topology segment map, e.g. `{"topology.cryptdisk.csi.io/node": "node-1"}`.
pub type Topology = BTreeMap<String, String>;

/// Where a new disk may (requisite) and should (preferred) be accessible from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TopologyRequirement {
    pub requisite: Vec<Topology>,
    pub preferred: Vec<Topology>,
}

impl TopologyRequirement {
    /// Whether a disk accessible from `offered` satisfies the requirement: with no
    /// requisite topologies, anything does; otherwise one requisite segment map must
    /// hold only segments that `offered` has with the same values.
    pub fn admits(&self, offered: &Topology) -> bool {
        self.requisite.is_empty()
            || self
                .requisite
                .iter()
                .any(|req| req.iter().all(|(k, v)| offered.get(k) == Some(v)))
    }
}

/// What a new disk's content comes from.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskSource {
    /// Restore: a copy of a snapshot.
    Snapshot(SnapshotId),
    /// Clone: a copy of another disk.
    Disk(VolumeId),
}

/// What [`DiskBackend::create_disk`] is asked to create.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskSpec {
    /// The CO's name for the volume: the idempotency key.
    pub name: String,
    /// Requested size in bytes, already including the LUKS2 header; the backend
    /// rounds it up to its granularity. 0 with a source means "the source's size".
    pub capacity_bytes: u64,
    pub source: Option<DiskSource>,
    /// Backend parameters only: the caller strips the driver's own keys
    /// (`cryptdisk.csi.io/*`, `csi.storage.k8s.io/*`); the backend refuses any key
    /// it does not know ([`DiskBackend::validate_parameters`]).
    pub parameters: BTreeMap<String, String>,
    pub accessibility: Option<TopologyRequirement>,
    /// The driver's own options of the volume (its volume context: integrity and
    /// activation flags), kept with the disk so that later calls (expansion,
    /// ControllerGetVolume, snapshots) know them. Opaque to the backend.
    pub options: BTreeMap<String, String>,
    /// The usable size the CO is given for this volume (its `capacity_bytes`),
    /// which the backend records with the disk ([`Disk::usable_bytes`]).
    pub usable_bytes: u64,
    /// The key scope a restore or clone inherits from its source, which the
    /// backend records with the disk ([`Disk::key_scope`]); `None` for an empty
    /// disk, whose scope is its own volume id.
    pub key_scope: Option<String>,
}

/// A disk as the backend reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Disk {
    pub id: VolumeId,
    /// The CO's name it was created under.
    pub name: String,
    /// Actual size in bytes (after rounding and any expansion).
    pub capacity_bytes: u64,
    pub source: Option<DiskSource>,
    /// Where the disk is accessible from.
    pub topology: Vec<Topology>,
    /// Node ids the disk is attached to, sorted.
    pub attached_to: Vec<String>,
    /// The options it was created with ([`DiskSpec::options`]).
    pub options: BTreeMap<String, String>,
    /// The controller's record that it created this disk empty and that it has
    /// not been through an attachment since ([`crate::volume::fresh`]); `None`
    /// for a copy, an import, or once the first attachment has ended.
    pub fresh: Option<FreshRecord>,
    /// The usable size the CO was last given for it: [`DiskSpec::usable_bytes`],
    /// then what [`DiskBackend::record_usable`] recorded after an expansion.
    /// `None` for a disk from before the driver kept it.
    pub usable_bytes: Option<u64>,
    /// The key scope recorded with the disk: its source's, for a restore or a
    /// clone. `None` for a disk made empty, or made before scopes existed: its
    /// scope is then its own volume id ([`Disk::scope`]).
    pub key_scope: Option<String>,
}

/// A snapshot as the backend reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub id: SnapshotId,
    /// The CO's name it was created under.
    pub name: String,
    pub source: VolumeId,
    pub size_bytes: u64,
    pub created_unix_nanos: i64,
    /// Whether the snapshot can be restored from.
    pub ready: bool,
    /// The source disk's options when the snapshot was taken: a restore holds the
    /// same LUKS2 header, hence the same layout.
    pub options: BTreeMap<String, String>,
    /// The source disk's [`Disk::usable_bytes`] when the snapshot was taken:
    /// what the CO may restore it into. `None` for a snapshot from before the
    /// driver kept it.
    pub usable_bytes: Option<u64>,
    /// The source disk's key scope when the snapshot was taken, which a
    /// restore inherits. `None` for a snapshot from before scopes existed: the
    /// source volume's id ([`Snapshot::scope`]).
    pub key_scope: Option<String>,
}

/// Why a backend operation failed. Each variant is the gRPC code of the same
/// name, with a message for the CO; [`tonic::Status`] is made from it in one
/// place.
impl Disk {
    /// The volume's key scope (DESIGN.md §3): the recorded one, else its own id.
    pub fn scope(&self) -> String {
        self.key_scope
            .clone()
            .unwrap_or_else(|| self.id.to_string())
    }
}

impl Snapshot {
    /// The key scope a restore of this snapshot inherits: the recorded one,
    /// else its source volume's id.
    pub fn scope(&self) -> String {
        self.key_scope
            .clone()
            .unwrap_or_else(|| self.source.to_string())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    OutOfRange(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    Aborted(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl Error {
    /// The gRPC code this error maps to.
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            Error::NotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::OutOfRange(_) => Code::OutOfRange,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::Aborted(_) => Code::Aborted,
            Error::Unavailable(_) => Code::Unavailable,
            Error::Internal(_) => Code::Internal,
        }
    }

    pub fn message(&self) -> &str {
        match self {
            Error::NotFound(m)
            | Error::AlreadyExists(m)
            | Error::InvalidArgument(m)
            | Error::OutOfRange(m)
            | Error::FailedPrecondition(m)
            | Error::ResourceExhausted(m)
            | Error::Aborted(m)
            | Error::Unavailable(m)
            | Error::Internal(m) => m,
        }
    }

    /// An I/O failure while doing `what`: a full filesystem or quota is
    /// `ResourceExhausted`, anything else `Internal`.
    pub fn io(what: impl std::fmt::Display, err: std::io::Error) -> Self {
        let msg = format!("{what}: {err}");
        match err.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => Error::ResourceExhausted(msg),
            _ => Error::Internal(msg),
        }
    }
}

impl From<IdError> for Error {
    fn from(e: IdError) -> Self {
        Error::InvalidArgument(e.to_string())
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        tonic::Status::new(e.code(), e.message())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A disk backend's volume and snapshot lifecycle. Every method is idempotent
/// where the CSI call it serves is, so that the CO's retries are safe.
#[async_trait::async_trait]
pub trait DiskBackend: Send + Sync {
    fn kind(&self) -> BackendKind;

    /// Checks backend parameters: an unknown key or a bad value is
    /// `InvalidArgument`, naming it.
    fn validate_parameters(&self, params: &BTreeMap<String, String>) -> Result<()>;

    /// Creates a disk, or returns the one already created under `spec.name` when
    /// the request is compatible with it (same rounded capacity, same source, same
    /// parameters).
    ///
    /// - a disk of that name that differs: `AlreadyExists`;
    /// - the source disk or snapshot does not exist: `NotFound`;
    /// - the source is larger than the requested capacity, or the capacity is above
    ///   [`max_volume_bytes`](Self::max_volume_bytes): `OutOfRange` (as the CSI
    ///   spec's "unsupported capacity_range");
    /// - the requisite topology cannot be met, or there is no room:
    ///   `ResourceExhausted`;
    /// - a create or delete of the same disk is in progress: `Aborted`.
    async fn create_disk(&self, spec: &DiskSpec) -> Result<Disk>;

    /// Deletes a disk. A disk that does not exist is `Ok`. A disk still attached
    /// to a node is `FailedPrecondition` (CSI's "volume in use").
    async fn delete_disk(&self, id: &VolumeId) -> Result<()>;

    async fn get_disk(&self, id: &VolumeId) -> Result<Option<Disk>>;

    /// One page of disks in a stable order, at most `max_entries` (0: all), and
    /// the token of the next page if there is one. A token this backend did not
    /// hand out is `Aborted`, as CSI requires of ListVolumes.
    async fn list_disks(
        &self,
        starting_token: Option<&str>,
        max_entries: u32,
    ) -> Result<(Vec<Disk>, Option<String>)>;

    /// Makes a disk available to a node and returns the publish context the node
    /// plugin needs. Idempotent; an unknown disk is `NotFound`.
    async fn attach(
        &self,
        id: &VolumeId,
        node_id: &str,
        read_only: bool,
    ) -> Result<BTreeMap<String, String>>;

    /// Whether [`attach`](Self::attach) of this disk takes it over from a node
    /// that still holds it (GCP: a regional disk made with
    /// `availability-class: regional-hard-failover`, attached with
    /// `forceAttach` when its zone fails), so that ControllerPublishVolume
    /// need not refuse a disk still attached elsewhere. Asked only then.
    async fn takes_over_attachment(&self, _id: &VolumeId) -> Result<bool> {
        Ok(false)
    }

    /// Undoes [`attach`](Self::attach). Idempotent: a disk that does not exist or
    /// is not attached to the node is `Ok`.
    async fn detach(&self, id: &VolumeId, node_id: &str) -> Result<()>;

    /// ControllerUnpublishVolume: clears the disk's fresh-disk record (see
    /// [`crate::volume::fresh`]) if it has one, whether or not the disk is
    /// attached to `node_id`, then detaches it from `node_id` as
    /// [`detach`](Self::detach) does. The record is cleared first (for the
    /// local backend in the same index write), so a crash between the two leaves
    /// a disk without the record, never a detached disk that still has it.
    /// Idempotent; a missing disk is `Ok`.
    async fn detach_ending_fresh(&self, id: &VolumeId, node_id: &str) -> Result<()>;

    /// Grows a disk to at least `new_capacity_bytes` and returns its actual size;
    /// a size at or below the current one returns the current size when equal
    /// after rounding, and is `InvalidArgument` when smaller (no shrinking).
    async fn expand(&self, id: &VolumeId, new_capacity_bytes: u64) -> Result<u64>;

    /// Records `usable_bytes` as the disk's [`Disk::usable_bytes`] (the
    /// controller calls it after an expansion, with the size it reports to the
    /// CO). Idempotent; an unknown disk is `NotFound`.
    async fn record_usable(&self, id: &VolumeId, usable_bytes: u64) -> Result<()>;

    /// Snapshots a disk under `name`, recording the disk's usable size with it
    /// ([`Snapshot::usable_bytes`]): idempotent by name; the same name for
    /// another source is `AlreadyExists`; a missing source is `NotFound`.
    async fn create_snapshot(&self, source: &VolumeId, name: &str) -> Result<Snapshot>;

    /// Deletes a snapshot; a missing one is `Ok`.
    async fn delete_snapshot(&self, id: &SnapshotId) -> Result<()>;

    async fn get_snapshot(&self, id: &SnapshotId) -> Result<Option<Snapshot>>;

    /// One page of snapshots in a stable order, optionally only those of `source`
    /// or only `snapshot_id`; tokens as in [`list_disks`](Self::list_disks).
    async fn list_snapshots(
        &self,
        source: Option<&VolumeId>,
        snapshot_id: Option<&SnapshotId>,
        starting_token: Option<&str>,
        max_entries: u32,
    ) -> Result<(Vec<Snapshot>, Option<String>)>;

    /// Bytes available for new disks with these parameters, accessible from
    /// `topology` (0 when this backend cannot serve that topology).
    async fn capacity(
        &self,
        params: &BTreeMap<String, String>,
        topology: Option<&Topology>,
    ) -> Result<u64>;

    /// Where this backend's disks are accessible from.
    fn accessible_topology(&self) -> Vec<Topology>;

    /// Largest disk this backend creates, if it has a limit.
    fn max_volume_bytes(&self) -> Option<u64>;
}

/// One page of `items` (sorted by key) from the key `start` on, at most
/// `max_entries` (0: all), and the key that starts the next page. A token is
/// that key, so an entry deleted between pages makes the next one skip nothing.
pub(crate) fn paginate<T>(
    items: impl IntoIterator<Item = (String, T)>,
    start: Option<&str>,
    max_entries: u32,
) -> (Vec<T>, Option<String>) {
    let mut out = Vec::new();
    for (key, item) in items {
        if start.is_some_and(|s| key.as_str() < s) {
            continue;
        }
        if max_entries != 0 && out.len() == max_entries as usize {
            return (out, Some(key));
        }
        out.push(item);
    }
    (out, None)
}

/// A list's starting token: one `parse_ok` accepts (a key this plugin handed
/// out), else ABORTED as CSI asks.
pub(crate) fn check_token(
    token: Option<&str>,
    parse_ok: impl Fn(&str) -> bool,
) -> Result<Option<&str>> {
    match token {
        None | Some("") => Ok(None),
        Some(t) if parse_ok(t) => Ok(Some(t)),
        Some(t) => Err(Error::Aborted(format!(
            "starting token {} was not handed out by this plugin",
            crate::volume::id::Excerpt::of(t)
        ))),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn pages_by_key() {
        let items = || ["a", "b", "c", "d", "e"].map(|k| (k.to_string(), k));
        assert_eq!(
            super::paginate(items(), None, 2),
            (vec!["a", "b"], Some("c".into()))
        );
        assert_eq!(
            super::paginate(items(), Some("c"), 2),
            (vec!["c", "d"], Some("e".into()))
        );
        assert_eq!(super::paginate(items(), Some("e"), 2), (vec!["e"], None));
        // An entry deleted between pages does not make the next page skip any.
        let fewer = ["a", "b", "d", "e"].map(|k| (k.to_string(), k));
        assert_eq!(super::paginate(fewer, Some("c"), 2).0, vec!["d", "e"]);
        assert_eq!(super::paginate(items(), None, 0).0.len(), 5);
    }

    use super::*;

    #[test]
    fn every_error_maps_to_the_code_of_its_name() {
        use tonic::Code;
        let cases = [
            (Error::NotFound("m".into()), Code::NotFound),
            (Error::AlreadyExists("m".into()), Code::AlreadyExists),
            (Error::InvalidArgument("m".into()), Code::InvalidArgument),
            (Error::OutOfRange("m".into()), Code::OutOfRange),
            (
                Error::FailedPrecondition("m".into()),
                Code::FailedPrecondition,
            ),
            (
                Error::ResourceExhausted("m".into()),
                Code::ResourceExhausted,
            ),
            (Error::Aborted("m".into()), Code::Aborted),
            (Error::Unavailable("m".into()), Code::Unavailable),
            (Error::Internal("m".into()), Code::Internal),
        ];
        for (err, code) in cases {
            assert_eq!(err.code(), code);
            assert_eq!(err.message(), "m");
            let status = tonic::Status::from(err);
            assert_eq!(status.code(), code);
            assert_eq!(status.message(), "m");
        }
    }

    #[test]
    fn io_errors_map_full_disks_to_resource_exhausted() {
        let full = Error::io("writing x", std::io::Error::from_raw_os_error(libc::ENOSPC));
        assert!(matches!(full, Error::ResourceExhausted(_)));
        assert!(full.message().starts_with("writing x: "));
        let other = Error::io("writing x", std::io::Error::from_raw_os_error(libc::EIO));
        assert!(matches!(other, Error::Internal(_)));
    }

    #[test]
    fn id_errors_are_invalid_arguments() {
        let e: Error = "local:x:../y"
            .parse::<VolumeId>()
            .map(|_| ())
            .unwrap_err()
            .into();
        assert!(matches!(e, Error::InvalidArgument(_)));
    }

    #[test]
    fn topology_requirements() {
        let t = |v: &str| Topology::from([("k".to_string(), v.to_string())]);
        let here = t("a");
        assert!(TopologyRequirement::default().admits(&here));
        let req = TopologyRequirement {
            requisite: vec![t("b"), t("a")],
            preferred: vec![t("b")],
        };
        assert!(req.admits(&here));
        let req = TopologyRequirement {
            requisite: vec![t("b")],
            preferred: vec![],
        };
        assert!(!req.admits(&here));
        let mut other_key = t("a");
        other_key.insert("zone".into(), "z".into());
        let req = TopologyRequirement {
            requisite: vec![other_key],
            preferred: vec![],
        };
        assert!(!req.admits(&here));
        // Preferred alone does not constrain.
        let req = TopologyRequirement {
            requisite: vec![],
            preferred: vec![t("b")],
        };
        assert!(req.admits(&here));
    }

    #[test]
    fn the_trait_is_object_safe() {
        fn _takes(_: &dyn DiskBackend) {}
        fn _boxed(b: LocalBackend) -> Box<dyn DiskBackend> {
            Box::new(b)
        }
    }
}
