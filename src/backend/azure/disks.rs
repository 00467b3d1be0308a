//! Managed disks and snapshots: SKUs and their size rules, names derived from
//! the CO's, tags, StorageClass parameters, and the ARM resources read back as
//! the backend's [`Disk`] and [`Snapshot`].

use std::collections::BTreeMap;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::backend::{Disk, DiskSource, Error, Snapshot, Topology};
use crate::volume::{BackendKind, SnapshotId, VolumeId, fresh};

pub const GIB: u64 = 1 << 30;
pub use crate::csi::contract::TOPOLOGY_ZONE;

/// Tag: the CO's name of the volume or snapshot (the idempotency key).
pub const TAG_NAME: &str = "kubernetes.io-created-for-pv-name";
/// Tag: the driver that created the resource.
pub const TAG_CREATED_BY: &str = "k8s-azure-created-by";
/// Tag: the driver's volume options, `key=value,...` with its prefix dropped.
pub const TAG_OPTIONS: &str = "cryptdisk-options";
/// Tag of a snapshot: the volume id it was taken of.
pub const TAG_SOURCE: &str = "cryptdisk-source-volume";
/// Tag: the usable size in bytes the CO holds the volume as (of a snapshot: its
/// source's when taken), which the disk's whole GiB cannot tell.
pub const TAG_USABLE: &str = "cryptdisk-usable-bytes";
/// Tag: the key scope a restored or cloned disk inherited (of a snapshot: its
/// source's scope when taken); absent on a disk made empty, whose scope is its
/// own volume id.
pub const TAG_SCOPE: &str = "cryptdisk-key-scope";

/// The driver's options prefix, dropped in [`TAG_OPTIONS`] to stay short.
const OPTION_PREFIX: &str = "cryptdisk.csi.io/";

/// StorageClass parameters this backend understands.
pub const PARAM_SKU: &str = "skuName";
pub const PARAM_RESOURCE_GROUP: &str = "resourceGroup";
pub const PARAM_IOPS: &str = "diskIOPSReadWrite";
pub const PARAM_MBPS: &str = "diskMBpsReadWrite";
const PARAMS: [&str; 4] = [PARAM_SKU, PARAM_RESOURCE_GROUP, PARAM_IOPS, PARAM_MBPS];

/// Managed disk SKUs served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sku {
    StandardLrs,
    StandardSsdLrs,
    PremiumLrs,
    PremiumV2Lrs,
    UltraSsdLrs,
    /// Zone-redundant: regional, attachable from every zone of the region.
    PremiumZrs,
    StandardSsdZrs,
}

impl Sku {
    pub const ALL: [Sku; 7] = [
        Sku::StandardLrs,
        Sku::StandardSsdLrs,
        Sku::PremiumLrs,
        Sku::PremiumV2Lrs,
        Sku::UltraSsdLrs,
        Sku::PremiumZrs,
        Sku::StandardSsdZrs,
    ];
    pub const DEFAULT: Sku = Sku::StandardSsdLrs;

    pub fn as_str(self) -> &'static str {
        match self {
            Sku::StandardLrs => "Standard_LRS",
            Sku::StandardSsdLrs => "StandardSSD_LRS",
            Sku::PremiumLrs => "Premium_LRS",
            Sku::PremiumV2Lrs => "PremiumV2_LRS",
            Sku::UltraSsdLrs => "UltraSSD_LRS",
            Sku::PremiumZrs => "Premium_ZRS",
            Sku::StandardSsdZrs => "StandardSSD_ZRS",
        }
    }

    /// Zone-redundant storage: the disk is in no zone (ARM takes no `zones`
    /// for it) and every node of the region can attach it.
    pub fn is_zone_redundant(self) -> bool {
        matches!(self, Sku::PremiumZrs | Sku::StandardSsdZrs)
    }

    /// Premium SSD v2 and Ultra disks exist only in a zone.
    pub fn needs_zone(self) -> bool {
        self.is_performance_tier()
    }

    /// A SKU name, case-insensitive as ARM takes it.
    pub fn parse(s: &str) -> Option<Sku> {
        Sku::ALL
            .into_iter()
            .find(|k| k.as_str().eq_ignore_ascii_case(s))
    }

    /// Premium SSD v2 and Ultra disks: no host caching, IOPS and throughput
    /// set apart from size.
    pub fn is_performance_tier(self) -> bool {
        matches!(self, Sku::PremiumV2Lrs | Sku::UltraSsdLrs)
    }

    /// Smallest and largest size in GiB.
    pub fn size_limits_gib(self) -> (u64, u64) {
        match self {
            Sku::StandardLrs
            | Sku::StandardSsdLrs
            | Sku::PremiumLrs
            | Sku::PremiumZrs
            | Sku::StandardSsdZrs => (1, 32_767),
            Sku::PremiumV2Lrs => (1, 65_536),
            Sku::UltraSsdLrs => (4, 65_536),
        }
    }

    /// `bytes` rounded up to a size this SKU takes (whole GiB, at least its
    /// minimum), in GiB; OUT_OF_RANGE above its maximum.
    pub fn round_gib(self, bytes: u64) -> Result<u64, Error> {
        let (min, max) = self.size_limits_gib();
        let gib = bytes.div_ceil(GIB).max(min);
        if gib > max {
            return Err(Error::OutOfRange(format!(
                "{} bytes need a {gib} GiB disk; {} disks are at most {max} GiB",
                bytes,
                self.as_str()
            )));
        }
        Ok(gib)
    }

    /// The host caching a data disk of this SKU and size is attached with:
    /// ReadOnly where Azure allows it (as Azure's disk CSI driver does), None
    /// for Premium SSD v2, Ultra, and disks of 4 TiB and more.
    pub fn caching(self, size_gib: u64) -> &'static str {
        if self.is_performance_tier() || size_gib >= 4096 {
            "None"
        } else {
            "ReadOnly"
        }
    }

    /// Whether a disk of this SKU attached to a running VM can grow from
    /// `from_gib` to `to_gib`: all can, except that the older SKUs cannot cross
    /// 4 TiB while attached.
    pub fn grows_online(self, from_gib: u64, to_gib: u64) -> bool {
        self.is_performance_tier() || from_gib > 4096 || to_gib <= 4096
    }
}

/// Backend parameters of a StorageClass, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskParams {
    pub sku: Sku,
    pub resource_group: Option<String>,
    pub iops: Option<u64>,
    pub mbps: Option<u64>,
}

impl DiskParams {
    pub fn parse(params: &BTreeMap<String, String>) -> Result<Self, Error> {
        if let Some(unknown) = params.keys().find(|k| !PARAMS.contains(&k.as_str())) {
            return Err(Error::InvalidArgument(format!(
                "unknown Azure disk parameter {unknown:?}; known: {}",
                PARAMS.join(", ")
            )));
        }
        let sku = match params.get(PARAM_SKU) {
            None => Sku::DEFAULT,
            Some(s) => Sku::parse(s).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "{PARAM_SKU} {s:?} is not one of {}",
                    Sku::ALL.map(Sku::as_str).join(", ")
                ))
            })?,
        };
        let resource_group = match params.get(PARAM_RESOURCE_GROUP) {
            None => None,
            Some(rg) => {
                check_disk_location(rg).map_err(|why| {
                    Error::InvalidArgument(format!("{PARAM_RESOURCE_GROUP} {rg:?}: {why}"))
                })?;
                Some(rg.clone())
            }
        };
        let number = |key: &str| -> Result<Option<u64>, Error> {
            match params.get(key) {
                None => Ok(None),
                Some(v) => match v.parse::<u64>() {
                    Ok(n) if n > 0 && sku.is_performance_tier() => Ok(Some(n)),
                    Ok(n) if n > 0 => Err(Error::InvalidArgument(format!(
                        "{key} applies to PremiumV2_LRS and UltraSSD_LRS only, not {}",
                        sku.as_str()
                    ))),
                    _ => Err(Error::InvalidArgument(format!(
                        "{key} {v:?} is not a positive whole number"
                    ))),
                },
            }
        };
        Ok(DiskParams {
            sku,
            iops: number(PARAM_IOPS)?,
            mbps: number(PARAM_MBPS)?,
            resource_group,
        })
    }
}

/// A resource group as it can appear in an id: ARM allows `(` and `)` too, but
/// the volume id cannot carry them.
fn check_disk_location(rg: &str) -> Result<(), String> {
    if rg.is_empty() || rg.len() > 90 {
        return Err("a resource group has 1 to 90 characters".into());
    }
    if !rg
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        || rg.ends_with('.')
    {
        return Err("only letters, digits, '-', '_' and '.' (not last) are served".into());
    }
    Ok(())
}

/// The Azure resource name for a CO name: the name itself when Azure accepts it
/// (1-80 of letters, digits, `_.-`, starting with a letter or digit, ending with
/// a letter, digit or `_`), otherwise a readable prefix and a hash of the whole
/// name, so that each CO name has exactly one resource name.
pub fn resource_name(co_name: &str) -> String {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-');
    let valid = (1..=80).contains(&co_name.len())
        && co_name.chars().all(allowed)
        && co_name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && co_name.ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_');
    if valid {
        return co_name.to_string();
    }
    let digest = hex::encode(Sha256::digest(co_name.as_bytes()));
    let mut prefix: String = co_name
        .chars()
        .map(|c| if allowed(c) { c } else { '-' })
        .take(60)
        .collect();
    if !prefix.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        prefix.insert(0, 'v');
    }
    format!("{prefix}-{}", &digest[..16])
}

pub fn disk_path(subscription: &str, rg: &str, name: &str) -> String {
    format!(
        "/subscriptions/{subscription}/resourceGroups/{rg}/providers/Microsoft.Compute/disks/{name}"
    )
}

pub fn snapshot_path(subscription: &str, rg: &str, name: &str) -> String {
    format!(
        "/subscriptions/{subscription}/resourceGroups/{rg}/providers/Microsoft.Compute/snapshots/{name}"
    )
}

pub fn disks_path(subscription: &str, rg: &str) -> String {
    format!("/subscriptions/{subscription}/resourceGroups/{rg}/providers/Microsoft.Compute/disks")
}

pub fn snapshots_path(subscription: &str, rg: &str) -> String {
    format!(
        "/subscriptions/{subscription}/resourceGroups/{rg}/providers/Microsoft.Compute/snapshots"
    )
}

/// `(resource group, name)` of an ARM id `/subscriptions/S/resourceGroups/RG/providers/Microsoft.Compute/<kind>/NAME`
/// of the given kind, case-insensitive in its fixed parts as ARM is.
pub fn parse_arm_id<'a>(id: &'a str, kind: &str) -> Option<(&'a str, &'a str)> {
    let parts: Vec<&str> = id.trim_start_matches('/').split('/').collect();
    match parts.as_slice() {
        [subs, _, rgs, rg, providers, ns, k, name]
            if subs.eq_ignore_ascii_case("subscriptions")
                && rgs.eq_ignore_ascii_case("resourceGroups")
                && providers.eq_ignore_ascii_case("providers")
                && ns.eq_ignore_ascii_case("Microsoft.Compute")
                && k.eq_ignore_ascii_case(kind) =>
        {
            Some((rg, name))
        }
        _ => None,
    }
}

/// Options as one tag value: `integrity=false,allowDiscards=false,...`.
pub fn options_tag(options: &BTreeMap<String, String>) -> Result<String, Error> {
    let mut parts = Vec::new();
    for (k, v) in options {
        let short = k.strip_prefix(OPTION_PREFIX).unwrap_or(k);
        if [short, v.as_str()]
            .iter()
            .any(|s| s.contains([',', '=']) || s.is_empty())
        {
            return Err(Error::InvalidArgument(format!(
                "volume option {k:?}={v:?} cannot be kept in an Azure tag"
            )));
        }
        parts.push(format!("{short}={v}"));
    }
    let tag = parts.join(",");
    if tag.len() > 256 {
        return Err(Error::InvalidArgument(
            "the volume options are longer than an Azure tag (256 characters)".into(),
        ));
    }
    Ok(tag)
}

pub fn options_from_tag(tag: &str) -> BTreeMap<String, String> {
    tag.split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| {
            let key = if k.contains('/') {
                k.to_string()
            } else {
                format!("{OPTION_PREFIX}{k}")
            };
            (key, v.to_string())
        })
        .collect()
}

/// A tag of an ARM resource; tag names are case-insensitive.
pub fn tag<'a>(resource: &'a Value, name: &str) -> Option<&'a str> {
    resource
        .get("tags")?
        .as_object()?
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .and_then(|(_, v)| v.as_str())
}

pub fn str_at<'a>(v: &'a Value, pointer: &str) -> Option<&'a str> {
    v.pointer(pointer).and_then(Value::as_str)
}

/// The disk's SKU.
pub fn sku_of(disk: &Value) -> Option<Sku> {
    str_at(disk, "/sku/name").and_then(Sku::parse)
}

pub fn size_gib_of(resource: &Value) -> u64 {
    resource
        .pointer("/properties/diskSizeGB")
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

/// The single zone of a zonal resource.
pub fn zone_of(resource: &Value) -> Option<&str> {
    resource
        .get("zones")?
        .as_array()?
        .first()
        .and_then(Value::as_str)
}

/// The node id of a VM's ARM id: a VM's name, or for an instance of a Uniform
/// scale set (`.../virtualMachineScaleSets/{ss}/virtualMachines/{instance id}`)
/// `<ss>_<instance id>`, the name IMDS gives that instance.
pub fn node_of_vm_id(id: &str) -> Option<String> {
    if let Some((_, name)) = parse_arm_id(id, "virtualMachines") {
        return Some(name.to_string());
    }
    let parts: Vec<&str> = id.trim_start_matches('/').split('/').collect();
    match parts.as_slice() {
        [subs, _, rgs, _, providers, ns, sets, ss, vms, instance]
            if subs.eq_ignore_ascii_case("subscriptions")
                && rgs.eq_ignore_ascii_case("resourceGroups")
                && providers.eq_ignore_ascii_case("providers")
                && ns.eq_ignore_ascii_case("Microsoft.Compute")
                && sets.eq_ignore_ascii_case("virtualMachineScaleSets")
                && vms.eq_ignore_ascii_case("virtualMachines")
                && !instance.is_empty()
                && instance.chars().all(|c| c.is_ascii_digit()) =>
        {
            Some(format!("{ss}_{instance}"))
        }
        _ => None,
    }
}

/// Node ids a disk is attached to (see [`node_of_vm_id`]).
pub fn attached_vms(disk: &Value) -> Vec<String> {
    let mut vms: Vec<String> = Vec::new();
    let mut add = |id: &str| {
        if let Some(node) = node_of_vm_id(id) {
            vms.push(node);
        }
    };
    if let Some(id) = disk.get("managedBy").and_then(Value::as_str) {
        add(id);
    }
    if let Some(Value::Array(ids)) = disk.get("managedByExtended") {
        ids.iter().filter_map(Value::as_str).for_each(&mut add);
    }
    vms.sort();
    vms.dedup();
    vms
}

/// Where the disk's content came from, as a volume or snapshot id of ours.
fn source_of(disk: &Value) -> Option<DiskSource> {
    let source = str_at(disk, "/properties/creationData/sourceResourceId")?;
    if let Some((rg, name)) = parse_arm_id(source, "snapshots") {
        return SnapshotId::new(BackendKind::Azure, rg, name)
            .ok()
            .map(DiskSource::Snapshot);
    }
    let (rg, name) = parse_arm_id(source, "disks")?;
    VolumeId::new(BackendKind::Azure, rg, name)
        .ok()
        .map(DiskSource::Disk)
}

/// An ARM disk created by this driver as a backend [`Disk`]; `None` for any
/// other disk.
pub fn to_disk(disk: &Value, driver: &str, location: &str) -> Option<Disk> {
    if tag(disk, TAG_CREATED_BY) != Some(driver) {
        return None;
    }
    let id_text = disk.get("id").and_then(Value::as_str)?;
    let (rg, name) = parse_arm_id(id_text, "disks")?;
    let id = VolumeId::new(BackendKind::Azure, rg, name).ok()?;
    let topology = disk_topology(location, disk);
    // Only a disk created empty can carry the record: a copy's tag (copied by
    // hand, or set by anything else) is ignored.
    let created_empty = source_of(disk).is_none()
        && str_at(disk, "/properties/creationData/createOption")
            .is_none_or(|o| o.eq_ignore_ascii_case("Empty"));
    let fresh = tag(disk, fresh::DISK_KEY)
        .filter(|_| created_empty)
        .and_then(|v| v.parse().ok());
    Some(Disk {
        id,
        fresh,
        name: tag(disk, TAG_NAME).unwrap_or(name).to_string(),
        capacity_bytes: size_gib_of(disk) * GIB,
        source: source_of(disk),
        topology,
        attached_to: attached_vms(disk),
        options: tag(disk, TAG_OPTIONS)
            .map(options_from_tag)
            .unwrap_or_default(),
        usable_bytes: usable_of(disk),
        key_scope: tag(disk, TAG_SCOPE).map(str::to_string),
    })
}

pub fn zone_topology(location: &str, zone: &str) -> Topology {
    Topology::from([(TOPOLOGY_ZONE.to_string(), format!("{location}-{zone}"))])
}

/// The topology of a node in no zone, and of the disks only it can attach:
/// the zone key with an empty value, as Azure's disk CSI driver publishes it.
pub fn regional_topology() -> Topology {
    Topology::from([(TOPOLOGY_ZONE.to_string(), String::new())])
}

/// Where a disk can be attached from: a zonal disk from its zone; a
/// zone-redundant one from everywhere (no topology); any other disk in no zone
/// only from VMs in no zone (ARM attaches a disk without zones to a VM without
/// zones only).
pub fn disk_topology(location: &str, disk: &Value) -> Vec<Topology> {
    match zone_of(disk) {
        Some(z) => vec![zone_topology(location, z)],
        None if sku_of(disk).is_some_and(Sku::is_zone_redundant) => Vec::new(),
        None => vec![regional_topology()],
    }
}

/// A resource's [`TAG_USABLE`]; absent (or not a number) on disks from before it
/// was kept.
fn usable_of(resource: &Value) -> Option<u64> {
    tag(resource, TAG_USABLE)?.parse().ok()
}

/// An ARM snapshot created by this driver as a backend [`Snapshot`].
pub fn to_snapshot(snap: &Value, driver: &str) -> Option<Snapshot> {
    if tag(snap, TAG_CREATED_BY) != Some(driver) {
        return None;
    }
    let (rg, name) = parse_arm_id(snap.get("id")?.as_str()?, "snapshots")?;
    let id = SnapshotId::new(BackendKind::Azure, rg, name).ok()?;
    let source: VolumeId = tag(snap, TAG_SOURCE)?.parse().ok()?;
    let state = str_at(snap, "/properties/provisioningState").unwrap_or("");
    // Incremental snapshots of Premium SSD v2 and Ultra disks copy in the
    // background; a restore must wait for 100%.
    let complete = snap
        .pointer("/properties/completionPercent")
        .and_then(Value::as_f64)
        .is_none_or(|p| p >= 100.0);
    let created = str_at(snap, "/properties/timeCreated")
        .and_then(|t| azure_core::time::parse_rfc3339(t).ok())
        .map(|t| t.unix_timestamp_nanos() as i64)
        .unwrap_or(0);
    Some(Snapshot {
        id,
        name: tag(snap, TAG_NAME).unwrap_or(name).to_string(),
        source,
        size_bytes: size_gib_of(snap) * GIB,
        created_unix_nanos: created,
        ready: state.eq_ignore_ascii_case("Succeeded") && complete,
        options: tag(snap, TAG_OPTIONS)
            .map(options_from_tag)
            .unwrap_or_default(),
        usable_bytes: usable_of(snap),
        key_scope: tag(snap, TAG_SCOPE).map(str::to_string),
    })
}

/// The request body of a disk PUT.
#[allow(clippy::too_many_arguments)]
pub fn disk_body(
    location: &str,
    zone: Option<&str>,
    params: &DiskParams,
    size_gib: u64,
    source_arm_id: Option<&str>,
    tags: &BTreeMap<&str, String>,
) -> Value {
    let creation = match source_arm_id {
        None => json!({"createOption": "Empty"}),
        Some(id) => json!({"createOption": "Copy", "sourceResourceId": id}),
    };
    // No public endpoint and no export through SAS: the disk holds ciphertext,
    // but nothing needs it reachable outside the VMs it is attached to.
    let mut properties = json!({
        "creationData": creation,
        "diskSizeGB": size_gib,
        "networkAccessPolicy": "DenyAll",
        "publicNetworkAccess": "Disabled",
    });
    if let Some(iops) = params.iops {
        properties["diskIOPSReadWrite"] = json!(iops);
    }
    if let Some(mbps) = params.mbps {
        properties["diskMBpsReadWrite"] = json!(mbps);
    }
    let mut body = json!({
        "location": location,
        "sku": {"name": params.sku.as_str()},
        "tags": tags,
        "properties": properties,
    });
    if let Some(z) = zone {
        body["zones"] = json!([z]);
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_round_to_what_each_sku_takes() {
        let mib = 1 << 20;
        assert_eq!(Sku::StandardLrs.round_gib(1).unwrap(), 1);
        assert_eq!(Sku::StandardSsdLrs.round_gib(GIB + 17 * mib).unwrap(), 2);
        assert_eq!(Sku::PremiumLrs.round_gib(10 * GIB).unwrap(), 10);
        assert_eq!(Sku::PremiumV2Lrs.round_gib(GIB + 1).unwrap(), 2);
        assert_eq!(Sku::UltraSsdLrs.round_gib(GIB).unwrap(), 4);
        assert_eq!(Sku::PremiumLrs.round_gib(32_767 * GIB).unwrap(), 32_767);
        let e = Sku::PremiumLrs.round_gib(32_767 * GIB + 1).unwrap_err();
        assert_eq!(e.code(), tonic::Code::OutOfRange);
        assert_eq!(Sku::UltraSsdLrs.round_gib(65_536 * GIB).unwrap(), 65_536);
    }

    #[test]
    fn caching_and_online_growth() {
        assert_eq!(Sku::PremiumLrs.caching(100), "ReadOnly");
        assert_eq!(Sku::PremiumLrs.caching(4096), "None");
        assert_eq!(Sku::PremiumV2Lrs.caching(1), "None");
        assert_eq!(Sku::UltraSsdLrs.caching(1), "None");
        assert!(Sku::PremiumLrs.grows_online(100, 4096));
        assert!(!Sku::PremiumLrs.grows_online(4096, 4097));
        assert!(Sku::PremiumLrs.grows_online(5000, 6000));
        assert!(Sku::UltraSsdLrs.grows_online(100, 10_000));
    }

    #[test]
    fn parameters() {
        let p = |pairs: &[(&str, &str)]| {
            DiskParams::parse(
                &pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            )
        };
        assert_eq!(p(&[]).unwrap().sku, Sku::StandardSsdLrs);
        assert_eq!(
            p(&[("skuName", "premium_lrs")]).unwrap().sku,
            Sku::PremiumLrs
        );
        let v2 = p(&[("skuName", "PremiumV2_LRS"), ("diskIOPSReadWrite", "5000")]).unwrap();
        assert_eq!(v2.iops, Some(5000));
        assert_eq!(
            p(&[("skuName", "premium_zrs")]).unwrap().sku,
            Sku::PremiumZrs
        );
        assert_eq!(
            p(&[("skuName", "StandardSSD_ZRS")]).unwrap().sku,
            Sku::StandardSsdZrs
        );
        for bad in [
            vec![("skuName", "Premium_GRS")],
            vec![("zone", "1")],
            vec![("diskIOPSReadWrite", "5000")],
            vec![("skuName", "UltraSSD_LRS"), ("diskMBpsReadWrite", "-1")],
            vec![("resourceGroup", "rg(1)")],
        ] {
            let e = p(&bad).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad:?}");
            assert!(
                e.message().contains(bad.last().unwrap().0),
                "{}",
                e.message()
            );
        }
    }

    #[test]
    fn resource_names_are_deterministic_and_valid() {
        assert_eq!(resource_name("pvc-1234-abcd"), "pvc-1234-abcd");
        for odd in ["a:b", "-lead", "trail.", &"x".repeat(128), "sp ace"] {
            let n = resource_name(odd);
            assert_eq!(n, resource_name(odd));
            assert!(n.len() <= 80, "{n}");
            assert!(n.starts_with(|c: char| c.is_ascii_alphanumeric()), "{n}");
            assert!(
                n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
            );
            VolumeId::new(BackendKind::Azure, "rg", &n).unwrap();
        }
        assert_ne!(resource_name("a:b"), resource_name("a;b"));
    }

    #[test]
    fn arm_ids_and_tags() {
        let id = "/subscriptions/s/resourceGroups/RG1/providers/Microsoft.Compute/disks/d1";
        assert_eq!(parse_arm_id(id, "disks"), Some(("RG1", "d1")));
        assert_eq!(
            parse_arm_id(&id.to_lowercase(), "disks"),
            Some(("rg1", "d1"))
        );
        assert_eq!(parse_arm_id(id, "snapshots"), None);
        let opts = BTreeMap::from([
            (
                "cryptdisk.csi.io/integrity".to_string(),
                "false".to_string(),
            ),
            (
                "cryptdisk.csi.io/allowDiscards".to_string(),
                "true".to_string(),
            ),
        ]);
        let tag = options_tag(&opts).unwrap();
        assert_eq!(tag, "allowDiscards=true,integrity=false");
        assert_eq!(options_from_tag(&tag), opts);
    }
}
