//! StorageClass parameters of the GCP backend, resource names, locations and
//! the choice of zones for a new disk. Pure functions: no Compute calls.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use super::super::{Error, Result, Topology, TopologyRequirement};

pub use crate::csi::contract::TOPOLOGY_ZONE;

pub const PARAM_TYPE: &str = "type";
pub const PARAM_REPLICATION: &str = "replication-type";
pub const PARAM_IOPS: &str = "provisioned-iops-on-create";
pub const PARAM_THROUGHPUT: &str = "provisioned-throughput-on-create";
/// `regional-hard-failover` makes attaches of a regional disk forced (the PD
/// CSI driver's parameter and value).
pub const PARAM_AVAILABILITY_CLASS: &str = "availability-class";
pub const AVAILABILITY_HARD_FAILOVER: &str = "regional-hard-failover";

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
    HyperdiskThroughput,
    HyperdiskExtreme,
}

impl DiskType {
    pub const ALL: [DiskType; 7] = [
        DiskType::Standard,
        DiskType::Balanced,
        DiskType::Ssd,
        DiskType::Extreme,
        DiskType::HyperdiskBalanced,
        DiskType::HyperdiskThroughput,
        DiskType::HyperdiskExtreme,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DiskType::Standard => "pd-standard",
            DiskType::Balanced => "pd-balanced",
            DiskType::Ssd => "pd-ssd",
            DiskType::Extreme => "pd-extreme",
            DiskType::HyperdiskBalanced => "hyperdisk-balanced",
            DiskType::HyperdiskThroughput => "hyperdisk-throughput",
            DiskType::HyperdiskExtreme => "hyperdisk-extreme",
        }
    }

    /// The type a name stands for, in any case: StorageClasses written for the
    /// PD CSI driver may say `PD-SSD` or `Hyperdisk-Balanced` (it lower-cases
    /// the value), and Compute's own names are lower-case.
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        DiskType::ALL
            .into_iter()
            .find(|t| t.as_str().eq_ignore_ascii_case(s))
    }

    /// A Hyperdisk (provisioned performance, attached through its own limits),
    /// as opposed to a Persistent Disk (`pd-*`).
    pub fn is_hyperdisk(self) -> bool {
        matches!(
            self,
            DiskType::HyperdiskBalanced
                | DiskType::HyperdiskThroughput
                | DiskType::HyperdiskExtreme
        )
    }

    /// Smallest disk of this type Compute creates, in GiB (regional pd-standard
    /// needs 200; Hyperdisk Throughput starts at 2 TiB, Hyperdisk Extreme at 64 GiB).
    pub fn min_gib(self, regional: bool) -> u64 {
        match (self, regional) {
            (DiskType::Standard, true) => 200,
            (DiskType::Extreme, _) => 500,
            (DiskType::HyperdiskBalanced, _) => 4,
            (DiskType::HyperdiskThroughput, _) => 2048,
            (DiskType::HyperdiskExtreme, _) => 64,
            _ => 10,
        }
    }

    /// Largest disk of this type, in GiB (Hyperdisk Throughput ends at 32 TiB).
    pub fn max_gib(self) -> u64 {
        match self {
            DiskType::HyperdiskThroughput => 32_768,
            _ => MAX_DISK_GIB,
        }
    }

    /// Whether the type can be replicated across two zones (regional-pd).
    fn regional_ok(self) -> bool {
        matches!(
            self,
            DiskType::Standard | DiskType::Balanced | DiskType::Ssd
        )
    }

    /// Whether IOPS can be provisioned for the type.
    fn takes_iops(self) -> bool {
        matches!(
            self,
            DiskType::Extreme | DiskType::HyperdiskBalanced | DiskType::HyperdiskExtreme
        )
    }

    /// Whether throughput can be provisioned for the type.
    fn takes_throughput(self) -> bool {
        matches!(
            self,
            DiskType::HyperdiskBalanced | DiskType::HyperdiskThroughput
        )
    }

    /// The least IOPS and throughput (MiB/s) a disk of this type and `gib`
    /// GiB must be provisioned with; `None` where the type has no such floor.
    ///
    /// These are the rules the PD CSI driver applies before it grows a
    /// Hyperdisk (`GetMinIopsThroughput` in its `pkg/common/utils.go`), from
    /// Compute Engine's Hyperdisk limits: Hyperdisk Balanced needs at least
    /// 500 IOPS per GiB up to 3,000 (so a 4 GiB disk, made with 2,000, is
    /// below the floor of any size from 6 GiB on) and at least 140 MiB/s;
    /// Hyperdisk Extreme needs 2 IOPS per GiB; Hyperdisk Throughput needs
    /// 10 MiB/s per TiB, and at least 20.
    pub fn performance_floor(self, gib: u64) -> PerformanceFloor {
        let gib = gib as i64;
        match self {
            DiskType::HyperdiskBalanced => PerformanceFloor {
                iops: Some((gib * 500).min(3000)),
                throughput: Some(140),
            },
            DiskType::HyperdiskExtreme => PerformanceFloor {
                iops: Some((gib * 2).max(128)),
                throughput: None,
            },
            DiskType::HyperdiskThroughput => PerformanceFloor {
                iops: None,
                throughput: Some(((gib * 10 + 1023) / 1024).max(20)),
            },
            _ => PerformanceFloor::default(),
        }
    }
}

/// The provisioned performance a Hyperdisk of some size needs at least.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PerformanceFloor {
    pub iops: Option<i64>,
    /// MiB/s.
    pub throughput: Option<i64>,
}

impl PerformanceFloor {
    /// What must be raised for a disk provisioned with `iops` and `throughput`
    /// now: the floor's values it falls below (a value Compute did not report
    /// counts as 0).
    pub fn raise(&self, iops: Option<i64>, throughput: Option<i64>) -> PerformanceFloor {
        PerformanceFloor {
            iops: self.iops.filter(|min| iops.unwrap_or(0) < *min),
            throughput: self.throughput.filter(|min| throughput.unwrap_or(0) < *min),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.iops.is_none() && self.throughput.is_none()
    }
}

/// What a StorageClass's backend parameters ask for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskParams {
    pub disk_type: DiskType,
    pub regional: bool,
    pub iops: Option<i64>,
    /// MiB/s.
    pub throughput: Option<i64>,
    /// Attach with `forceAttach` (a regional disk failing over to its other
    /// zone while the VM that held it is unreachable).
    pub force_attach: bool,
}

impl DiskParams {
    /// Parses and checks the parameters; any unknown key or bad value is
    /// INVALID_ARGUMENT naming it. Keys are matched in any case, as the PD CSI
    /// driver matches them (it lower-cases each key), so that StorageClasses
    /// written for it work unchanged.
    pub fn parse(params: &BTreeMap<String, String>) -> Result<Self> {
        let mut out = DiskParams {
            disk_type: DiskType::Balanced,
            regional: false,
            iops: None,
            throughput: None,
            force_attach: false,
        };
        for (key, value) in params {
            match key.to_ascii_lowercase().as_str() {
                PARAM_TYPE => {
                    out.disk_type = DiskType::parse(value).ok_or_else(|| {
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
                PARAM_IOPS => out.iops = Some(iops_quantity(key, value)?),
                PARAM_THROUGHPUT => out.throughput = Some(throughput_quantity(key, value)?),
                PARAM_AVAILABILITY_CLASS => {
                    out.force_attach = match value.trim().to_ascii_lowercase().as_str() {
                        "none" | "" => false,
                        AVAILABILITY_HARD_FAILOVER => true,
                        _ => {
                            return Err(Error::InvalidArgument(format!(
                                "parameter {PARAM_AVAILABILITY_CLASS} {value:?}: expected none \
                                 or {AVAILABILITY_HARD_FAILOVER}"
                            )));
                        }
                    }
                }
                _ => {
                    return Err(Error::InvalidArgument(format!(
                        "unknown parameter {key:?} for the gcp backend; known: {PARAM_TYPE}, \
                         {PARAM_REPLICATION}, {PARAM_IOPS}, {PARAM_THROUGHPUT}, \
                         {PARAM_AVAILABILITY_CLASS}"
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
        if out.force_attach && !out.regional {
            return Err(Error::InvalidArgument(format!(
                "{PARAM_AVAILABILITY_CLASS} {AVAILABILITY_HARD_FAILOVER} is for regional disks \
                 only (add {PARAM_REPLICATION}: regional-pd): a zonal disk has no other zone \
                 to fail over to"
            )));
        }
        if out.iops.is_some() && !out.disk_type.takes_iops() {
            return Err(Error::InvalidArgument(format!(
                "{PARAM_IOPS} applies to pd-extreme, hyperdisk-balanced and hyperdisk-extreme \
                 only, not {}",
                out.disk_type.as_str()
            )));
        }
        if out.throughput.is_some() && !out.disk_type.takes_throughput() {
            return Err(Error::InvalidArgument(format!(
                "{PARAM_THROUGHPUT} applies to hyperdisk-balanced and hyperdisk-throughput \
                 only, not {}",
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

/// A Kubernetes quantity (`3000`, `3k`, `250Mi`, `1.5Gi`, `2e3`) as a number
/// of units rounded up, or `None` when it is not one. Negative values are
/// refused by the callers.
fn quantity_units(value: &str) -> Option<u128> {
    let v = value.trim();
    let suffixes: [(&str, u128, u128); 12] = [
        ("Ki", 1 << 10, 1),
        ("Mi", 1 << 20, 1),
        ("Gi", 1 << 30, 1),
        ("Ti", 1 << 40, 1),
        ("Pi", 1 << 50, 1),
        ("Ei", 1 << 60, 1),
        ("k", 1_000, 1),
        ("M", 1_000_000, 1),
        ("G", 1_000_000_000, 1),
        ("T", 1_000_000_000_000, 1),
        ("P", 1_000_000_000_000_000, 1),
        ("m", 1, 1000),
    ];
    let (number, mul, div) = suffixes
        .iter()
        .find_map(|(s, mul, div)| v.strip_suffix(s).map(|n| (n, *mul, *div)))
        .unwrap_or((v, 1, 1));
    // An exponent (`2e3`) only without a suffix.
    let (number, exp) = match number.split_once(['e', 'E']) {
        Some((n, e)) if mul == 1 && div == 1 => (n, e.parse::<u32>().ok()?),
        Some(_) => return None,
        None => (number, 0),
    };
    let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && frac.is_empty()
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
        || frac.len() > 9
        || exp > 18
    {
        return None;
    }
    let scale = 10u128.pow(frac.len() as u32);
    let digits: u128 = format!("{whole}{frac}").parse().ok()?;
    let numerator = digits
        .checked_mul(mul)?
        .checked_mul(10u128.checked_pow(exp)?)?;
    Some(numerator.div_ceil(scale * div))
}

/// Provisioned IOPS: a positive whole number, or a quantity (`3k`) as the PD
/// CSI driver reads it.
fn iops_quantity(key: &str, value: &str) -> Result<i64> {
    match quantity_units(value).and_then(|n| i64::try_from(n).ok()) {
        Some(n) if n > 0 => Ok(n),
        _ => Err(Error::InvalidArgument(format!(
            "parameter {key} {value:?}: a positive number of IOPS expected (3000, or a \
             quantity such as 3k)"
        ))),
    }
}

/// Provisioned throughput in MiB/s. A quantity with a unit is bytes per second,
/// rounded up to whole MiB/s (`250Mi` is 250, `1Gi` 1024), as the PD CSI
/// driver reads StorageClasses written for it; a bare number is already MiB/s
/// (this driver's own form: a bare byte count would round up to 1 MiB/s,
/// which no disk type accepts).
fn throughput_quantity(key: &str, value: &str) -> Result<i64> {
    let bare = value.trim().ends_with(|c: char| c.is_ascii_digit());
    let mib = if bare {
        quantity_units(value)
    } else {
        quantity_units(value).map(|bytes| bytes.div_ceil(1 << 20))
    };
    match mib.and_then(|n| i64::try_from(n).ok()) {
        Some(n) if n > 0 => Ok(n),
        _ => Err(Error::InvalidArgument(format!(
            "parameter {key} {value:?}: a positive throughput expected, in MiB/s (140) or as \
             a quantity of bytes per second (250Mi)"
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
    fn quantities_and_case() {
        let p = |pairs: &[(&str, &str)]| DiskParams::parse(&params(pairs));
        let hd = |k: &str, v: &str| p(&[("type", "hyperdisk-balanced"), (k, v)]);
        let t = |v: &str| hd(PARAM_THROUGHPUT, v).map(|p| p.throughput);
        assert_eq!(t("140").unwrap(), Some(140));
        assert_eq!(t("250Mi").unwrap(), Some(250));
        assert_eq!(t("1Gi").unwrap(), Some(1024));
        assert_eq!(t("1.5Gi").unwrap(), Some(1536));
        assert_eq!(
            t("150M").unwrap(),
            Some(144),
            "150e6 B/s rounds up to 144 MiB/s"
        );
        assert_eq!(t("1Ki").unwrap(), Some(1), "rounds up");
        assert_eq!(
            t("1.5").unwrap(),
            Some(2),
            "a bare number is MiB/s, rounded up"
        );
        for bad in ["0", "-5", "Mi", "x", "12Mb", "250 Mi", "1e400"] {
            assert!(t(bad).is_err(), "{bad}");
        }
        let i = |v: &str| hd(PARAM_IOPS, v).map(|p| p.iops);
        assert_eq!(i("3000").unwrap(), Some(3000));
        assert_eq!(i("3k").unwrap(), Some(3000));
        assert_eq!(i("4.5k").unwrap(), Some(4500));
        assert_eq!(i("2e3").unwrap(), Some(2000));
        assert!(i("0").is_err());
        assert!(i("-3k").is_err());
        // Keys and types in any case.
        let q = p(&[("Type", "PD-SSD"), ("REPLICATION-TYPE", "Regional-PD")]).unwrap();
        assert_eq!((q.disk_type, q.regional), (DiskType::Ssd, true));
        assert_eq!(
            p(&[("type", " Hyperdisk-Throughput ")]).unwrap().disk_type,
            DiskType::HyperdiskThroughput
        );
        assert_eq!(
            p(&[("type", "hyperdisk-extreme"), (PARAM_IOPS, "10k")])
                .unwrap()
                .iops,
            Some(10_000)
        );
        assert!(p(&[("type", "hyperdisk-extreme"), (PARAM_THROUGHPUT, "100")]).is_err());
        assert!(p(&[("type", "hyperdisk-throughput"), (PARAM_IOPS, "100")]).is_err());
        // The failover class is for regional disks.
        let f = p(&[
            ("replication-type", "regional-pd"),
            ("Availability-Class", "Regional-Hard-Failover"),
        ])
        .unwrap();
        assert!(f.force_attach);
        assert!(p(&[("availability-class", "regional-hard-failover")]).is_err());
        assert!(p(&[("availability-class", "sometimes")]).is_err());
    }

    #[test]
    fn hyperdisk_floors() {
        let hdb = DiskType::HyperdiskBalanced;
        assert_eq!(hdb.performance_floor(4).iops, Some(2000));
        assert_eq!(hdb.performance_floor(6).iops, Some(3000));
        assert_eq!(hdb.performance_floor(1000).iops, Some(3000));
        assert_eq!(hdb.performance_floor(4).throughput, Some(140));
        let raise = hdb.performance_floor(20).raise(Some(2000), Some(140));
        assert_eq!((raise.iops, raise.throughput), (Some(3000), None));
        assert!(
            hdb.performance_floor(20)
                .raise(Some(5000), Some(300))
                .is_empty()
        );
        assert_eq!(
            DiskType::HyperdiskExtreme.performance_floor(1000).iops,
            Some(2000)
        );
        assert_eq!(
            DiskType::HyperdiskThroughput
                .performance_floor(4096)
                .throughput,
            Some(40)
        );
        assert_eq!(
            DiskType::HyperdiskThroughput
                .performance_floor(2048)
                .throughput,
            Some(20)
        );
        assert!(DiskType::Ssd.performance_floor(100).is_empty());
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
