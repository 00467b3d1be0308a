//! StorageClass parameters of the GCP backend, resource names, locations and
//! the choice of zones for a new disk. Pure functions: no Compute calls.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use super::super::{Error, Result, Topology, TopologyRequirement};

/// The topology key of zones, shared with the Azure backend.
pub const TOPOLOGY_ZONE: &str = "topology.cryptdisk.csi.io/zone";

pub const PARAM_TYPE: &str = "type";
pub const PARAM_REPLICATION: &str = "replication-type";
pub const PARAM_IOPS: &str = "provisioned-iops-on-create";
pub const PARAM_THROUGHPUT: &str = "provisioned-throughput-on-create";

const GIB: u64 = 1 << 30;
/// The largest persistent disk: 64 TiB.
pub const MAX_DISK_GIB: u64 = 65_536;

/// The disk types this backend creates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskType {
    Standard,
    Balanced,
    Ssd,
    Extreme,
    HyperdiskBalanced,
}

impl DiskType {
    pub const ALL: [DiskType; 5] = [
        DiskType::Standard,
        DiskType::Balanced,
        DiskType::Ssd,
        DiskType::Extreme,
        DiskType::HyperdiskBalanced,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DiskType::Standard => "pd-standard",
            DiskType::Balanced => "pd-balanced",
            DiskType::Ssd => "pd-ssd",
            DiskType::Extreme => "pd-extreme",
            DiskType::HyperdiskBalanced => "hyperdisk-balanced",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        DiskType::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// Smallest disk of this type Compute creates, in GiB (regional pd-standard
    /// needs 200).
    pub fn min_gib(self, regional: bool) -> u64 {
        match (self, regional) {
            (DiskType::Standard, true) => 200,
            (DiskType::Extreme, _) => 500,
            (DiskType::HyperdiskBalanced, _) => 4,
            _ => 10,
        }
    }

    /// Whether the type can be replicated across two zones (regional-pd).
    fn regional_ok(self) -> bool {
        matches!(
            self,
            DiskType::Standard | DiskType::Balanced | DiskType::Ssd
        )
    }
}

/// What a StorageClass's backend parameters ask for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskParams {
    pub disk_type: DiskType,
    pub regional: bool,
    pub iops: Option<i64>,
    pub throughput: Option<i64>,
}

impl DiskParams {
    /// Parses and checks the parameters; any unknown key or bad value is
    /// INVALID_ARGUMENT naming it.
    pub fn parse(params: &BTreeMap<String, String>) -> Result<Self> {
        let mut out = DiskParams {
            disk_type: DiskType::Balanced,
            regional: false,
            iops: None,
            throughput: None,
        };
        for (key, value) in params {
            match key.as_str() {
                PARAM_TYPE => {
                    out.disk_type = DiskType::parse(value.trim()).ok_or_else(|| {
                        Error::InvalidArgument(format!(
                            "parameter {PARAM_TYPE} {value:?}: expected one of {}",
                            DiskType::ALL.map(DiskType::as_str).join(", ")
                        ))
                    })?;
                }
                PARAM_REPLICATION => {
                    out.regional = match value.trim().to_ascii_lowercase().as_str() {
                        "none" | "" => false,
                        "regional-pd" => true,
                        _ => {
                            return Err(Error::InvalidArgument(format!(
                                "parameter {PARAM_REPLICATION} {value:?}: expected none or \
                                 regional-pd"
                            )));
                        }
                    }
                }
                PARAM_IOPS => out.iops = Some(positive(key, value)?),
                PARAM_THROUGHPUT => out.throughput = Some(positive(key, value)?),
                other => {
                    return Err(Error::InvalidArgument(format!(
                        "unknown parameter {other:?} for the gcp backend; known: {PARAM_TYPE}, \
                         {PARAM_REPLICATION}, {PARAM_IOPS}, {PARAM_THROUGHPUT}"
                    )));
                }
            }
        }
        if out.regional && !out.disk_type.regional_ok() {
            return Err(Error::InvalidArgument(format!(
                "{PARAM_REPLICATION} regional-pd is not available for {}; use pd-standard, \
                 pd-balanced or pd-ssd",
                out.disk_type.as_str()
            )));
        }
        let provisioned = matches!(
            out.disk_type,
            DiskType::Extreme | DiskType::HyperdiskBalanced
        );
        if out.iops.is_some() && !provisioned {
            return Err(Error::InvalidArgument(format!(
                "{PARAM_IOPS} applies to pd-extreme and hyperdisk-balanced only, not {}",
                out.disk_type.as_str()
            )));
        }
        if out.throughput.is_some() && out.disk_type != DiskType::HyperdiskBalanced {
            return Err(Error::InvalidArgument(format!(
                "{PARAM_THROUGHPUT} applies to hyperdisk-balanced only, not {}",
                out.disk_type.as_str()
            )));
        }
        Ok(out)
    }

    /// Whole GiB for `bytes`, at least the type's minimum.
    pub fn size_gib(&self, bytes: u64) -> u64 {
        bytes
            .div_ceil(GIB)
            .max(self.disk_type.min_gib(self.regional))
    }
}

fn positive(key: &str, value: &str) -> Result<i64> {
    match value.trim().parse::<i64>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(Error::InvalidArgument(format!(
            "parameter {key} {value:?}: a positive whole number expected"
        ))),
    }
}

/// A GCP resource name: `[a-z]([-a-z0-9]{0,61}[a-z0-9])?`.
pub fn is_resource_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && !s.ends_with('-')
}

/// The disk or snapshot name for a CO name: the name itself when it already is
/// a valid GCP name (Kubernetes' `pvc-<uuid>`), otherwise a readable, lower-cased
/// stem with a hash of the whole name, so that distinct names stay distinct and
/// the same name always maps to the same resource (CreateVolume's idempotency).
pub fn resource_name(co_name: &str) -> String {
    if is_resource_name(co_name) {
        return co_name.to_string();
    }
    let hash = hex::encode(Sha256::digest(co_name.as_bytes()));
    let mut stem = String::new();
    for c in co_name.chars() {
        let c = c.to_ascii_lowercase();
        let c = if c.is_ascii_lowercase() || c.is_ascii_digit() {
            c
        } else {
            '-'
        };
        if !(c == '-' && (stem.is_empty() || stem.ends_with('-'))) {
            stem.push(c);
        }
        if stem.len() >= 40 {
            break;
        }
    }
    let stem = stem.trim_end_matches('-');
    if stem.is_empty() {
        format!("cd-{}", &hash[..16])
    } else {
        format!("cd-{stem}-{}", &hash[..16])
    }
}

/// A label value: `[a-z0-9_-]{0,63}`, anything else becoming `_`.
pub fn label_value(s: &str) -> String {
    s.chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(63)
        .collect()
}

/// A zone name such as `us-central1-a` (region, dash, a lower-case suffix).
pub fn is_zone(s: &str) -> bool {
    match s.rsplit_once('-') {
        Some((region, suffix)) => {
            is_region(region)
                && !suffix.is_empty()
                && suffix
                    .bytes()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
                && suffix.as_bytes()[0].is_ascii_lowercase()
        }
        None => false,
    }
}

/// A region name such as `us-central1` or `europe-west4`: lower-case words, the
/// last ending in digits.
pub fn is_region(s: &str) -> bool {
    s.len() <= 63
        && s.contains('-')
        && s.ends_with(|c: char| c.is_ascii_digit())
        && s.as_bytes()[0].is_ascii_lowercase()
        && s.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        && !s.contains("--")
}

/// The region of a zone.
pub fn region_of(zone: &str) -> &str {
    zone.rsplit_once('-').map(|(r, _)| r).unwrap_or(zone)
}

/// A project id (`[a-z][-a-z0-9]{4,28}[a-z0-9]`, optionally `domain:`-prefixed).
pub fn is_project_id(s: &str) -> bool {
    let id = s.rsplit_once(':').map(|(_, id)| id).unwrap_or(s);
    (6..=30).contains(&id.len())
        && id.as_bytes()[0].is_ascii_lowercase()
        && id
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        && !id.ends_with('-')
}

/// The zone of a topology segment map, if it names one of ours.
fn zone_of(t: &Topology) -> Option<&str> {
    t.get(TOPOLOGY_ZONE).map(String::as_str)
}

/// Zones a new disk goes to: one, or two of one region for a regional disk.
///
/// Preferred zones come first in their order, then the requisite ones; with a
/// requisite list, only zones it admits; with none, the default zone is a
/// candidate too (last). A regional disk takes the first candidate that has a
/// second candidate in its region. Requisite segments that do not name a zone
/// of ours cannot be met by a disk and are skipped. Nothing fits:
/// `RESOURCE_EXHAUSTED`, as CSI asks for an unsatisfiable requisite topology.
pub fn pick_zones(
    req: Option<&TopologyRequirement>,
    default_zone: &str,
    regional: bool,
) -> Result<Vec<String>> {
    let empty = TopologyRequirement::default();
    let req = req.unwrap_or(&empty);
    let admitted = |zone: &str| {
        req.admits(&Topology::from([(
            TOPOLOGY_ZONE.to_string(),
            zone.to_string(),
        )]))
    };
    let mut candidates: Vec<String> = Vec::new();
    let from_pref = req.preferred.iter().filter_map(zone_of);
    let from_req = req.requisite.iter().filter_map(zone_of);
    let fallback = req.requisite.is_empty().then_some(default_zone);
    for zone in from_pref.chain(from_req).chain(fallback) {
        if is_zone(zone) && admitted(zone) && !candidates.iter().any(|c| c == zone) {
            candidates.push(zone.to_string());
        }
    }
    let bad: Vec<&str> = req
        .preferred
        .iter()
        .chain(&req.requisite)
        .filter_map(zone_of)
        .filter(|z| !is_zone(z))
        .collect();
    if !bad.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "topology {TOPOLOGY_ZONE} values {bad:?} are not zone names"
        )));
    }
    if !regional {
        return candidates
            .into_iter()
            .next()
            .map(|z| vec![z])
            .ok_or_else(|| {
                Error::ResourceExhausted(format!(
                    "no zone satisfies the requisite topology {:?}: this driver offers \
                 {TOPOLOGY_ZONE}=<zone> only",
                    req.requisite
                ))
            });
    }
    for (i, first) in candidates.iter().enumerate() {
        if let Some(second) = candidates[i + 1..]
            .iter()
            .find(|z| region_of(z) == region_of(first))
        {
            return Ok(vec![first.clone(), second.clone()]);
        }
    }
    Err(Error::ResourceExhausted(format!(
        "a regional-pd disk needs two zones of one region, and the topology offers {candidates:?}; \
         allow a second zone of the region (requisite or preferred {TOPOLOGY_ZONE})"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parameters() {
        let p = DiskParams::parse(&params(&[])).unwrap();
        assert_eq!(p.disk_type, DiskType::Balanced);
        assert!(!p.regional);
        for t in DiskType::ALL {
            let p = DiskParams::parse(&params(&[("type", t.as_str())])).unwrap();
            assert_eq!(p.disk_type, t);
        }
        let p = DiskParams::parse(&params(&[
            ("type", "pd-ssd"),
            ("replication-type", "regional-pd"),
        ]))
        .unwrap();
        assert!(p.regional);
        let p = DiskParams::parse(&params(&[
            ("type", "hyperdisk-balanced"),
            ("provisioned-iops-on-create", "3000"),
            ("provisioned-throughput-on-create", "140"),
        ]))
        .unwrap();
        assert_eq!((p.iops, p.throughput), (Some(3000), Some(140)));
        for bad in [
            params(&[("type", "pd-fast")]),
            params(&[("skuName", "x")]),
            params(&[("replication-type", "zonal")]),
            params(&[("type", "pd-extreme"), ("replication-type", "regional-pd")]),
            params(&[("provisioned-iops-on-create", "10")]),
            params(&[("type", "pd-extreme"), ("provisioned-iops-on-create", "-1")]),
            params(&[
                ("type", "pd-extreme"),
                ("provisioned-throughput-on-create", "5"),
            ]),
        ] {
            let e = DiskParams::parse(&bad).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument(_)), "{bad:?}: {e:?}");
        }
        let e = DiskParams::parse(&params(&[("skuName", "x")])).unwrap_err();
        assert!(e.message().contains("skuName"), "{e:?}");
    }

    #[test]
    fn sizes_round_up_to_gib_and_type_minimums() {
        let p = |t: &str, r: &str| {
            DiskParams::parse(&params(&[("type", t), ("replication-type", r)])).unwrap()
        };
        assert_eq!(p("pd-balanced", "none").size_gib(1), 10);
        assert_eq!(p("pd-balanced", "none").size_gib(11 * GIB + 1), 12);
        assert_eq!(p("pd-standard", "regional-pd").size_gib(GIB), 200);
        assert_eq!(p("pd-extreme", "none").size_gib(GIB), 500);
        assert_eq!(p("hyperdisk-balanced", "none").size_gib(GIB), 4);
    }

    #[test]
    fn names() {
        assert_eq!(resource_name("pvc-0f3c"), "pvc-0f3c");
        let odd = resource_name("My_Volume.1");
        assert!(is_resource_name(&odd), "{odd}");
        assert!(odd.starts_with("cd-my-volume-1-"), "{odd}");
        assert_eq!(odd, resource_name("My_Volume.1"));
        assert_ne!(odd, resource_name("my-volume-1"));
        assert_ne!(resource_name("A"), resource_name("a_"));
        let long = resource_name(&"x".repeat(128));
        assert!(is_resource_name(&long) && long.len() <= 63, "{long}");
        assert!(is_resource_name(&resource_name("___")));
        assert!(is_resource_name(&resource_name("9abc")));
        assert!(!is_resource_name("a-"));
        assert!(!is_resource_name("-a"));
        assert!(!is_resource_name(&"a".repeat(64)));
        assert_eq!(label_value("cryptdisk.csi.io"), "cryptdisk_csi_io");
    }

    #[test]
    fn locations() {
        assert!(is_zone("us-central1-a"));
        assert!(is_zone("europe-west4-b"));
        assert!(!is_zone("us-central1"));
        assert!(!is_zone("global"));
        assert!(!is_zone("us-central1-"));
        assert!(is_region("us-central1"));
        assert!(!is_region("us-central1-a"));
        assert_eq!(region_of("us-central1-a"), "us-central1");
        assert!(is_project_id("my-project-1"));
        assert!(is_project_id("example.com:my-project"));
        assert!(!is_project_id("ab"));
        assert!(!is_project_id("My-Project"));
    }

    fn zone(z: &str) -> Topology {
        Topology::from([(TOPOLOGY_ZONE.to_string(), z.to_string())])
    }

    #[test]
    fn zone_choice() {
        let req = |requisite: &[&str], preferred: &[&str]| TopologyRequirement {
            requisite: requisite.iter().map(|z| zone(z)).collect(),
            preferred: preferred.iter().map(|z| zone(z)).collect(),
        };
        let d = "us-central1-a";
        assert_eq!(pick_zones(None, d, false).unwrap(), vec![d]);
        assert_eq!(
            pick_zones(
                Some(&req(&["us-east1-b", "us-east1-c"], &["us-east1-c"])),
                d,
                false
            )
            .unwrap(),
            vec!["us-east1-c"]
        );
        assert_eq!(
            pick_zones(Some(&req(&["us-east1-b"], &["us-west1-a"])), d, false).unwrap(),
            vec!["us-east1-b"],
            "a preferred zone outside the requisite ones is not taken"
        );
        assert_eq!(
            pick_zones(Some(&req(&[], &["us-west1-a"])), d, false).unwrap(),
            vec!["us-west1-a"]
        );
        let other_key = TopologyRequirement {
            requisite: vec![Topology::from([(
                "kubernetes.io/hostname".into(),
                "n".into(),
            )])],
            preferred: vec![],
        };
        assert!(matches!(
            pick_zones(Some(&other_key), d, false).unwrap_err(),
            Error::ResourceExhausted(_)
        ));
        assert!(matches!(
            pick_zones(Some(&req(&["nowhere"], &[])), d, false).unwrap_err(),
            Error::InvalidArgument(_)
        ));
        // Regional: two zones of one region, preferences first.
        assert_eq!(
            pick_zones(
                Some(&req(
                    &["us-east1-b", "us-west1-a", "us-east1-c"],
                    &["us-west1-a", "us-east1-c"]
                )),
                d,
                true
            )
            .unwrap(),
            vec!["us-east1-c", "us-east1-b"]
        );
        assert!(matches!(
            pick_zones(Some(&req(&["us-east1-b", "us-west1-a"], &[])), d, true).unwrap_err(),
            Error::ResourceExhausted(_)
        ));
        assert!(matches!(
            pick_zones(None, d, true).unwrap_err(),
            Error::ResourceExhausted(_)
        ));
    }
}
