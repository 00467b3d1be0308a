//! The controller's fresh-disk record: the second witness before a format.
//!
//! A node formats a device only when two witnesses agree that it holds nothing:
//! its own probe (signatures, both edges, samples spread over the disk) and this
//! record, which says "the controller created this disk empty, and it has not
//! been through an attachment since". Sampling alone cannot prove a disk blank
//! (data only in its interior reads as zeros at every probed place), and reading
//! a whole 1 TiB disk is too slow, so a disk without the record is never
//! formatted, whatever it reads.
//!
//! Where the record lives, with the disk itself:
//! - Azure: the tag [`DISK_KEY`] on the managed disk, set in the same PUT that
//!   creates it (`createOption: Empty` only);
//! - GCP: the label [`DISK_KEY`] on the persistent disk, set in the insert;
//! - local: the `fresh` field of the disk's entry in the backend's `index.json`,
//!   written in the same atomic index write that records the disk.
//!
//! A disk restored from a snapshot, cloned, imported or made by anything else
//! has no record, so it is never formatted, even when it reads as zeros.
//!
//! How it travels: at ControllerPublishVolume (read-write) the controller reads
//! the record from the disk (tag, label or index entry: the backend confirms
//! it) and hands it to the node in the publish context under [`PUBLISH_KEY`].
//! The local node does not take it from there: it reads the index itself, so
//! nothing the CO alone controls can make it format.
//!
//! When it ends, and why this is crash-safe: the record is valid for the disk's
//! first attachment only. The controller clears it at ControllerUnpublishVolume,
//! *before* it detaches, in the same index write as the detach for the local
//! backend. So:
//! - kubelet's NodeStage retries within that attachment all see the record; a
//!   retry after the format completed finds our header and does not format
//!   again, and one after a format cut short finds our unfinished header (our
//!   label, no token, zeros behind it) and redoes it;
//! - a crash between the format and the clearing leaves the record until the
//!   next ControllerUnpublish, which the CO retries until it succeeds; a crash
//!   between the clearing and the detach leaves a disk without the record,
//!   which is safe (the disk is formatted already, or is refused);
//! - after the first attachment ends, a disk that once held our header and now
//!   reads blank (its header lost) is refused rather than formatted over;
//! - the cost: a disk whose first attachment ended without any successful stage
//!   (the pod deleted while the KMS was down) is refused at its next stage; the
//!   operator checks it with `cryptdisk-csi inspect` and marks it fresh again
//!   (README, "When a stage refuses a disk").
//!
//! Within the first attachment, a node also remembers the records it has
//! formatted under (for the life of the process), so a header lost while the
//! volume is still attached is not formatted over by the same node plugin.
//!
//! The record holds a random nonce rather than a flag, so that each creation's
//! record is distinct (a stale publish context from an earlier disk of the same
//! name never matches a newer one on the local backend) and so that a later
//! format step can be bound to the exact record it ran under.

use std::fmt;
use std::str::FromStr;

pub use crate::csi::contract::FRESH_RECORD as PUBLISH_KEY;
/// The Azure tag and GCP label that hold the record on the disk. GCP label keys
/// take lower-case letters, digits, `-` and `_` only, which this is.
pub const DISK_KEY: &str = "cryptdisk-fresh";
/// Hex characters of a nonce: 128 random bits.
const NONCE_HEX: usize = 32;

/// The record that a disk was created empty by the controller and has not been
/// through an attachment since: a random nonce, 32 lower-case hex characters
/// (valid as an Azure tag value and a GCP label value).
#[derive(Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct FreshRecord(String);

impl FreshRecord {
    /// A new record for a disk about to be created empty.
    pub fn new_random() -> Self {
        use rand_core::RngCore;
        let mut bytes = [0u8; NONCE_HEX / 2];
        rand_core::OsRng.fill_bytes(&mut bytes);
        FreshRecord(hex::encode(bytes))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A record value that is not one this driver writes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("fresh-disk record {0:?} is not {NONCE_HEX} lower-case hex characters")]
pub struct BadRecord(String);

impl FromStr for FreshRecord {
    type Err = BadRecord;

    fn from_str(s: &str) -> Result<Self, BadRecord> {
        let ok = s.len() == NONCE_HEX && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if ok {
            Ok(FreshRecord(s.to_string()))
        } else {
            Err(BadRecord(crate::volume::id::Excerpt::of(s).to_string()))
        }
    }
}

impl TryFrom<String> for FreshRecord {
    type Error = BadRecord;
    fn try_from(s: String) -> Result<Self, BadRecord> {
        s.parse()
    }
}

impl From<FreshRecord> for String {
    fn from(r: FreshRecord) -> String {
        r.0
    }
}

impl fmt::Display for FreshRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for FreshRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FreshRecord({})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_random_hex_and_parse_back() {
        let a = FreshRecord::new_random();
        let b = FreshRecord::new_random();
        assert_ne!(a, b);
        assert_eq!(a.as_str().len(), 32);
        assert_eq!(a.as_str().parse::<FreshRecord>().unwrap(), a);
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(serde_json::from_str::<FreshRecord>(&json).unwrap(), a);
    }

    #[test]
    fn other_values_are_refused() {
        for bad in [
            "",
            "true",
            "yes",
            &"A".repeat(32),
            &"0".repeat(31),
            &"0".repeat(33),
            "0123456789abcdef0123456789abcdeg",
        ] {
            assert!(bad.parse::<FreshRecord>().is_err(), "{bad:?}");
        }
        assert!(serde_json::from_str::<FreshRecord>("\"formatted\"").is_err());
    }
}
