//! Volume and snapshot identity: the ids the controller hands to the CO and gets
//! back on every later call.
//!
//! Every id is parsed and validated here, once, at the edge; the rest of the code
//! holds a [`VolumeId`] or [`SnapshotId`] and may use its parts as file or
//! resource names without checking them again.

pub mod fresh;
pub mod id;

pub use fresh::FreshRecord;
pub use id::{BackendKind, IdError, IdKind, SnapshotId, VolumeId};
