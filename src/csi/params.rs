//! StorageClass parameters and the volume context that carries them to the node.
//!
//! The controller parses `CreateVolume` parameters once: the driver's own keys
//! (prefix `cryptdisk.csi.io/`) become [`VolumeOptions`], the keys the Kubernetes
//! sidecars add (`csi.storage.k8s.io/`) are accepted, and everything else goes to
//! the backend, which refuses what it does not know. The options travel to the
//! node in the volume context, since the node formats the disk at its first stage.

use std::collections::{BTreeMap, HashMap};

use tonic::Status;

use crate::crypt::Integrity;

pub const PREFIX: &str = "cryptdisk.csi.io/";
pub const INTEGRITY: &str = "cryptdisk.csi.io/integrity";
pub const INTEGRITY_JOURNAL: &str = "cryptdisk.csi.io/integrityJournal";
pub const ALLOW_DISCARDS: &str = "cryptdisk.csi.io/allowDiscards";
pub const KERNEL_WORKQUEUES: &str = "cryptdisk.csi.io/kernelWorkqueues";
/// Prefix of the keys the external-provisioner adds (PVC and PV names, fstype).
pub const K8S_PREFIX: &str = "csi.storage.k8s.io/";

/// How a volume is encrypted and opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VolumeOptions {
    pub integrity: Integrity,
    pub allow_discards: bool,
    /// Bypass dm-crypt's workqueues (the default): lower latency on real NVMe.
    pub bypass_workqueues: bool,
}

impl Default for VolumeOptions {
    fn default() -> Self {
        VolumeOptions {
            integrity: Integrity::None,
            allow_discards: false,
            bypass_workqueues: true,
        }
    }
}

fn boolean(key: &str, value: &str) -> Result<bool, Status> {
    match value {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(Status::invalid_argument(format!(
            "parameter {key}: {value:?} is not \"true\" or \"false\""
        ))),
    }
}

impl VolumeOptions {
    /// Splits CreateVolume parameters into our options and the backend's keys.
    pub fn from_parameters(
        params: &HashMap<String, String>,
    ) -> Result<(VolumeOptions, BTreeMap<String, String>), Status> {
        let mut ours = BTreeMap::new();
        let mut backend = BTreeMap::new();
        for (k, v) in params {
            if k.starts_with(PREFIX) {
                ours.insert(k.as_str(), v.as_str());
            } else if !k.starts_with(K8S_PREFIX) {
                backend.insert(k.clone(), v.clone());
            }
        }
        let options = Self::from_map(&ours, true)?;
        Ok((options, backend))
    }

    /// Reads the options back from a volume context on the node.
    pub fn from_volume_context(ctx: &HashMap<String, String>) -> Result<VolumeOptions, Status> {
        let ours: BTreeMap<&str, &str> = ctx
            .iter()
            .filter(|(k, _)| k.starts_with(PREFIX))
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        Self::from_map(&ours, false)
    }

    fn from_map(map: &BTreeMap<&str, &str>, strict: bool) -> Result<VolumeOptions, Status> {
        let mut o = VolumeOptions::default();
        let mut integrity = false;
        let mut journal = false;
        for (&k, &v) in map {
            match k {
                INTEGRITY => integrity = boolean(k, v)?,
                INTEGRITY_JOURNAL => journal = boolean(k, v)?,
                ALLOW_DISCARDS => o.allow_discards = boolean(k, v)?,
                KERNEL_WORKQUEUES => o.bypass_workqueues = !boolean(k, v)?,
                _ if strict => {
                    return Err(Status::invalid_argument(format!(
                        "unknown parameter {k:?}; this driver knows {INTEGRITY}, \
                         {INTEGRITY_JOURNAL}, {ALLOW_DISCARDS} and {KERNEL_WORKQUEUES}"
                    )));
                }
                _ => {}
            }
        }
        if journal && !integrity {
            return Err(Status::invalid_argument(format!(
                "{INTEGRITY_JOURNAL} needs {INTEGRITY}: \"true\""
            )));
        }
        if integrity && o.allow_discards {
            return Err(Status::invalid_argument(format!(
                "{ALLOW_DISCARDS} cannot be combined with {INTEGRITY}: discarded sectors \
                 would lose their integrity tags"
            )));
        }
        if integrity {
            o.integrity = Integrity::HmacSha256 { journal };
        }
        Ok(o)
    }

    /// The volume context that carries these options to the node.
    pub fn to_volume_context(self) -> HashMap<String, String> {
        let mut ctx = HashMap::new();
        let (integrity, journal) = match self.integrity {
            Integrity::None => (false, false),
            Integrity::HmacSha256 { journal } => (true, journal),
        };
        ctx.insert(INTEGRITY.to_string(), integrity.to_string());
        ctx.insert(INTEGRITY_JOURNAL.to_string(), journal.to_string());
        ctx.insert(ALLOW_DISCARDS.to_string(), self.allow_discards.to_string());
        ctx.insert(
            KERNEL_WORKQUEUES.to_string(),
            (!self.bypass_workqueues).to_string(),
        );
        ctx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn options_round_trip_through_the_volume_context() {
        let (o, backend) = VolumeOptions::from_parameters(&params(&[
            (INTEGRITY, "true"),
            (KERNEL_WORKQUEUES, "true"),
            ("csi.storage.k8s.io/pvc/name", "data"),
            ("skuName", "Premium_LRS"),
        ]))
        .unwrap();
        assert_eq!(o.integrity, Integrity::HmacSha256 { journal: false });
        assert!(!o.bypass_workqueues);
        assert_eq!(backend.len(), 1);
        assert_eq!(backend["skuName"], "Premium_LRS");
        let back = VolumeOptions::from_volume_context(&o.to_volume_context()).unwrap();
        assert_eq!(back, o);
        assert_eq!(
            VolumeOptions::from_parameters(&HashMap::new()).unwrap().0,
            VolumeOptions::default()
        );
    }

    #[test]
    fn bad_parameters_are_invalid_arguments() {
        for bad in [
            params(&[("cryptdisk.csi.io/cipher", "null")]),
            params(&[(INTEGRITY, "yes")]),
            params(&[(INTEGRITY_JOURNAL, "true")]),
            params(&[(INTEGRITY, "true"), (ALLOW_DISCARDS, "true")]),
        ] {
            let err = VolumeOptions::from_parameters(&bad).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad:?}");
        }
    }
}
