//! Machine types: how many disks a VM takes, and whether it takes Persistent
//! Disk at all. Pure functions of the machine type's name
//! (`<series>-<shape>-<vCPUs>[-suffix]`, e.g. `c4-standard-8`,
//! `c4a-highmem-16-lssd`, `c3-standard-192-metal`, `a4x-highgpu-4g`).

/// The volumes a VM of `machine_type` takes besides its boot disk.
///
/// Compute Engine allows 128 disks on a VM and 16 on shared-core machine types
/// (e2-micro, e2-small, e2-medium, f1-micro, g1-small); newer series set lower
/// Hyperdisk limits by vCPU count (by GPU count for A4X). One of the disks is
/// the boot disk. The numbers are the PD CSI driver's (`getVolumeLimits` in its
/// `pkg/gce-pd-csi-driver/node.go`, the per-series tables in
/// `pkg/constants/constants.go`), which are Compute Engine's documented limits
/// less the boot disk. A type of a tabulated series whose vCPU count cannot be
/// read gets the general limit, as there.
pub fn max_volumes_for(machine_type: &str) -> u64 {
    // Every row of the tables is positive.
    u64::try_from(signed_limit(machine_type)).unwrap_or(0)
}

fn signed_limit(machine_type: &str) -> i64 {
    const SHARED_CORE: [&str; 5] = ["e2-micro", "e2-small", "e2-medium", "f1-micro", "g1-small"];
    const GENERAL: i64 = 127;
    if SHARED_CORE.contains(&machine_type) {
        return 15;
    }
    let parts: Vec<&str> = machine_type.split('-').collect();
    let series = parts[0];
    let count = |s: &str| s.parse::<i64>().ok();
    // (the largest vCPU count of a row, the limit of the row), ascending.
    let table: Option<&[(i64, i64)]> = match series {
        "c4" => Some(&[(2, 7), (4, 15), (24, 31), (48, 63), (96, 127)]),
        "c4a" => Some(&[(2, 7), (8, 15), (48, 31), (72, 63)]),
        "c4d" => Some(&[(2, 3), (4, 7), (8, 15), (96, 31), (192, 63), (384, 127)]),
        "n4" => Some(&[(8, 15), (80, 31)]),
        "n4a" => Some(&[(8, 15), (64, 31)]),
        "n4d" => Some(&[(8, 15), (96, 31)]),
        _ => None,
    };
    if let Some(table) = table {
        return match parts.get(2).and_then(|s| count(s)) {
            Some(vcpus) => by_count(table, vcpus),
            None => {
                tracing::warn!(machine_type, "no vCPU count in the machine type's name");
                GENERAL
            }
        };
    }
    match series {
        // A4X counts GPUs (`-1g`, `-2g`, `-4g`); its bare-metal type has its own.
        "a4x" => match parts.get(2) {
            Some(&"metal") => 31,
            Some(gpus) => match gpus.strip_suffix('g').and_then(count) {
                Some(n) => by_count(&[(1, 63), (2, 127)], n),
                None => GENERAL,
            },
            None => GENERAL,
        },
        "x4" => 39,
        "a4" => 127,
        "c3" if machine_type.ends_with("-metal") => 15,
        _ => GENERAL,
    }
}

/// The limit of the first row whose count reaches `n`; past the table, its
/// last row's.
fn by_count(table: &[(i64, i64)], n: i64) -> i64 {
    table
        .iter()
        .find(|(max, _)| n <= *max)
        .or(table.last())
        .map(|(_, limit)| *limit)
        .unwrap_or(15)
}

/// Whether `machine_type` takes Hyperdisk only: Persistent Disk (`pd-*`) cannot
/// be attached to it. These are the series whose Compute Engine pages list
/// Hyperdisk alone among their block storage: the fourth generation (C4, C4A,
/// C4D, N4, N4A, N4D, H4D, M4, X4), A4 and A4X, and C3 bare metal. Compute
/// refuses such an attach only when the operation ends, with
/// `UNSUPPORTED_OPERATION` and a message about creating an instance (the PD
/// CSI driver rewrites it); knowing the series lets the controller say so
/// before it asks.
pub fn hyperdisk_only(machine_type: &str) -> bool {
    const SERIES: [&str; 11] = [
        "c4", "c4a", "c4d", "n4", "n4a", "n4d", "h4d", "m4", "x4", "a4", "a4x",
    ];
    let series = machine_type.split('-').next().unwrap_or("");
    SERIES.contains(&series) || (series == "c3" && machine_type.ends_with("-metal"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attach_limits() {
        for (machine, limit) in [
            ("e2-medium", 15),
            ("n2-standard-8", 127),
            ("something-new-1", 127),
            ("c4-standard-2", 7),
            ("c4-standard-4", 15),
            ("c4-highmem-8", 31),
            ("c4-standard-48-lssd", 63),
            ("c4-standard-96", 127),
            ("c4-standard-288-metal", 127),
            ("c4a-standard-1", 7),
            ("c4a-highcpu-8", 15),
            ("c4a-standard-72", 63),
            ("c4d-standard-2", 3),
            ("c4d-highmem-8", 15),
            ("c4d-standard-384", 127),
            ("n4-standard-2", 15),
            ("n4-highmem-16", 31),
            ("n4-custom-12-24576", 31),
            ("n4d-standard-96", 31),
            ("n4a-standard-64", 31),
            ("x4-960-24t", 39),
            ("a4-highgpu-8g", 127),
            ("a4x-highgpu-1g", 63),
            ("a4x-highgpu-4g", 127),
            ("a4x-highgpu-metal", 31),
            ("c3-standard-192-metal", 15),
            ("c3-standard-8", 127),
            ("c4-standard", 127),
        ] {
            assert_eq!(max_volumes_for(machine), limit, "{machine}");
        }
    }

    #[test]
    fn hyperdisk_only_series() {
        for m in [
            "c4-standard-8",
            "c4a-standard-4",
            "n4-standard-2",
            "x4-960-24t",
            "a4x-highgpu-4g",
            "c3-highcpu-192-metal",
        ] {
            assert!(hyperdisk_only(m), "{m}");
        }
        for m in [
            "n2-standard-8",
            "e2-medium",
            "c3-standard-8",
            "n1-standard-1",
        ] {
            assert!(!hyperdisk_only(m), "{m}");
        }
    }
}
