//! Node side: the block device of an attached data disk, found by its LUN.
//!
//! Azure's udev rules link `/dev/disk/azure/scsi1/lun<N>` to a SCSI data disk
//! and (azure-vm-utils, on NVMe-only sizes such as the v6 families)
//! `/dev/disk/azure/data/by-lun/<N>` to an NVMe one; where they are missing,
//! the SCSI devices in sysfs are scanned for a Microsoft "Virtual Disk" at LUN
//! N that is not the OS or resource disk, then the namespaces of Azure's
//! remote-disk NVMe controller for namespace N + 2. Several candidates are an
//! error, never a guess. The roots are injectable so that
//! tests run against a fake tree.
//!
//! The SCSI device itself does not say which managed disk it is: a data disk
//! reports vendor `Msft`, model `Virtual Disk`, and VPD pages whose serial and
//! designators are Hyper-V's per-attachment values, not the disk's name or
//! resource id. So, unlike GCP's device name, the disk behind a LUN cannot be
//! confirmed from sysfs; what binds the LUN to the volume is the controller,
//! which reads it from the VM's own attachment of that disk, and the exact LUN
//! match here (`lun1` is never `lun10`). The one place the guest can see the
//! mapping is the Instance Metadata Service (`storageProfile.dataDisks`: LUN,
//! name, managed disk id), so before the node uses the device of a LUN,
//! [`check_disk_at_lun`] asks IMDS which disk is at that LUN and refuses any
//! other: a forged or stale publish context, or a LUN reused after a detach and
//! attach race, then stops there instead of formatting another volume's disk.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::{DeviceLocator, HostRoots};
use crate::backend::Error;
use crate::backend::azure::imds::{self, DataDisk, Instance};
use crate::csi::contract::AZURE_LUN as PUBLISH_LUN;
use crate::volume::VolumeId;

/// Azure data disks: found by the LUN the controller publishes, then confirmed
/// through IMDS to be the volume's disk.
#[derive(Clone, Debug)]
pub struct AzureLocator {
    pub roots: HostRoots,
    pub imds: ImdsCheck,
}

impl AzureLocator {
    /// The host's trees and the IMDS the environment names.
    pub fn from_env() -> Self {
        AzureLocator {
            roots: HostRoots::host(),
            imds: ImdsCheck::from_env(),
        }
    }
}

#[tonic::async_trait]
impl DeviceLocator for AzureLocator {
    async fn locate(
        &self,
        id: &VolumeId,
        publish_context: &HashMap<String, String>,
    ) -> Result<PathBuf, tonic::Status> {
        let lun = lun_from_context(publish_context)?;
        // The LUN comes from the request: only IMDS can say whose disk is
        // there, which `verified_device` asks before handing it out.
        Ok(verified_device(
            &self.roots,
            &self.imds,
            id,
            lun,
            Duration::from_secs(60),
            Duration::from_millis(250),
        )
        .await?)
    }
}

/// The LUN of a publish context: INVALID_ARGUMENT when missing or not a LUN.
pub fn lun_from_context(context: &HashMap<String, String>) -> Result<u32, Error> {
    let value = context.get(PUBLISH_LUN).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "publish_context has no {PUBLISH_LUN}: was the volume published by this driver's Azure controller?"
        ))
    })?;
    value
        .parse::<u32>()
        .ok()
        .filter(|l| *l < 64)
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "publish_context {PUBLISH_LUN} {:?} is not a LUN (0 to 63)",
                value.chars().take(16).collect::<String>()
            ))
        })
}

/// The model string of the NVMe controller through which NVMe-only VM sizes
/// (the v6 families) present remote disks (azure-vm-utils' udev rules match it);
/// its local temporary disks come from another ("Microsoft NVMe Direct Disk").
pub const AZURE_NVME_REMOTE_MODEL: &str = "MSFT NVMe Accelerator v1.0";

/// On that controller namespace 1 is the OS disk and data disk LUN N is
/// namespace N + 2.
const NVME_NSID_OF_LUN0: u32 = 2;

/// The device of LUN `lun`, if it is there now: Azure's udev links for SCSI
/// (`scsi1/lun<N>`) and NVMe (`data/by-lun/<N>`) data disks, else a scan of
/// the SCSI devices, else of the Azure NVMe controller's namespaces.
pub fn find_by_lun(roots: &HostRoots, lun: u32) -> Result<Option<PathBuf>, Error> {
    for link in [
        roots.dev.join(format!("disk/azure/scsi1/lun{lun}")),
        roots.dev.join(format!("disk/azure/data/by-lun/{lun}")),
    ] {
        if link.symlink_metadata().is_ok() {
            // A dangling link means the device node is not there yet.
            return Ok(std::fs::canonicalize(&link).ok());
        }
    }
    if let Some(dev) = find_scsi(roots, lun)? {
        return Ok(Some(dev));
    }
    find_nvme(roots, lun)
}

/// The data disk at NVMe namespace `lun + 2` of an Azure remote-disk NVMe
/// controller (`/sys/class/nvme/nvme<C>` with that model); several candidates
/// are an error.
fn find_nvme(roots: &HostRoots, lun: u32) -> Result<Option<PathBuf>, Error> {
    let Ok(controllers) = std::fs::read_dir(roots.sys.join("class/nvme")) else {
        return Ok(None);
    };
    let nsid = (lun + NVME_NSID_OF_LUN0).to_string();
    let mut found = BTreeSet::new();
    for ctrl in controllers.flatten() {
        let dir = ctrl.path();
        let model = std::fs::read_to_string(dir.join("model")).unwrap_or_default();
        if model.trim() != AZURE_NVME_REMOTE_MODEL {
            continue;
        }
        let Ok(namespaces) = std::fs::read_dir(&dir) else {
            continue;
        };
        for ns in namespaces.flatten() {
            let name = ns.file_name().to_string_lossy().into_owned();
            // Namespaces are the `nvme<C>n<N>` (or `nvme<S>c<C>n<N>`) entries.
            if !name.starts_with("nvme") || !name.contains('n') {
                continue;
            }
            let id = std::fs::read_to_string(ns.path().join("nsid")).unwrap_or_default();
            if id.trim() == nsid {
                found.insert(name);
            }
        }
    }
    match found.len() {
        0 => Ok(None),
        1 => {
            let path = roots.dev.join(found.into_iter().next().expect("one"));
            Ok(path.exists().then_some(path))
        }
        _ => Err(Error::FailedPrecondition(format!(
            "LUN {lun} (NVMe namespace {nsid}) matches several namespaces ({}); not guessing \
             which is the volume (install azure-vm-utils for /dev/disk/azure/data/by-lun)",
            found.into_iter().collect::<Vec<_>>().join(", ")
        ))),
    }
}

/// The SCSI data disk at LUN `lun` (see [`find_by_lun`]).
fn find_scsi(roots: &HostRoots, lun: u32) -> Result<Option<PathBuf>, Error> {
    let excluded = os_and_resource_disks(roots);
    let dir = roots.sys.join("class/scsi_device");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(None);
    };
    let mut found = BTreeSet::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let address: Vec<&str> = name.split(':').collect();
        if address.len() != 4 || address[3].parse::<u32>().ok() != Some(lun) {
            continue;
        }
        let device = entry.path().join("device");
        let read = |f: &str| {
            std::fs::read_to_string(device.join(f))
                .map(|s| s.trim().to_ascii_uppercase())
                .unwrap_or_default()
        };
        if read("vendor") != "MSFT" || read("model") != "VIRTUAL DISK" {
            continue;
        }
        let Ok(blocks) = std::fs::read_dir(device.join("block")) else {
            continue;
        };
        for block in blocks.flatten() {
            let block = block.file_name().to_string_lossy().into_owned();
            if !excluded.contains(&block) {
                found.insert((name.clone(), block));
            }
        }
    }
    match found.len() {
        0 => Ok(None),
        1 => {
            let (_, block) = found.into_iter().next().expect("one");
            let path = roots.dev.join(&block);
            Ok(path.exists().then_some(path))
        }
        _ => Err(Error::FailedPrecondition(format!(
            "LUN {lun} matches several SCSI disks ({}); not guessing which is the volume \
             (install Azure's udev rules for /dev/disk/azure/scsi1)",
            found
                .iter()
                .map(|(addr, b)| format!("{addr} {b}"))
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// Kernel names of the OS and resource disks, as Azure's udev rules link them.
fn os_and_resource_disks(roots: &HostRoots) -> BTreeSet<String> {
    ["root", "resource", "os"]
        .iter()
        .filter_map(|l| std::fs::canonicalize(roots.dev.join("disk/azure").join(l)).ok())
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect()
}

/// Asks every SCSI host and NVMe controller to scan for new devices (what udev
/// does on a hot-add; a no-op where hot-add already worked).
pub fn rescan(roots: &HostRoots) {
    if let Ok(hosts) = std::fs::read_dir(roots.sys.join("class/scsi_host")) {
        for host in hosts.flatten() {
            let scan = host.path().join("scan");
            if let Err(e) = std::fs::write(&scan, "- - -") {
                tracing::debug!(path = %scan.display(), error = %e, "SCSI rescan");
            }
        }
    }
    if let Ok(ctrls) = std::fs::read_dir(roots.sys.join("class/nvme")) {
        for ctrl in ctrls.flatten() {
            let scan = ctrl.path().join("rescan_controller");
            if scan.exists()
                && let Err(e) = std::fs::write(&scan, "1")
            {
                tracing::debug!(path = %scan.display(), error = %e, "NVMe rescan");
            }
        }
    }
}

/// Waits up to `timeout` for LUN `lun` to appear, rescanning once when it is
/// not there at first.
pub async fn wait_for_lun(
    roots: &HostRoots,
    lun: u32,
    timeout: Duration,
    poll: Duration,
) -> Result<PathBuf, Error> {
    let deadline = Instant::now() + timeout;
    let mut rescanned = false;
    loop {
        if let Some(dev) = find_by_lun(roots, lun)? {
            return Ok(dev);
        }
        if !rescanned {
            rescan(roots);
            rescanned = true;
            continue;
        }
        if Instant::now() >= deadline {
            return Err(Error::Unavailable(format!(
                "no device for LUN {lun} appeared within {}s (no {} or {}, no SCSI disk at \
                 that LUN in {} and no NVMe namespace {} of an Azure NVMe controller in {}); \
                 is the disk attached to this VM?",
                timeout.as_secs(),
                roots
                    .dev
                    .join(format!("disk/azure/scsi1/lun{lun}"))
                    .display(),
                roots
                    .dev
                    .join(format!("disk/azure/data/by-lun/{lun}"))
                    .display(),
                roots.sys.join("class/scsi_device").display(),
                lun + NVME_NSID_OF_LUN0,
                roots.sys.join("class/nvme").display()
            )));
        }
        tokio::time::sleep(poll).await;
    }
}

/// The device of the volume's disk at LUN `lun`, whichever way the VM shows
/// it (SCSI or NVMe, standalone VM or scale-set instance): waited for as
/// [`wait_for_lun`] does, then confirmed through IMDS as
/// [`check_disk_at_lun`] does, so that a device found by LUN is used only when
/// the disk the controller attached there is the volume's.
pub async fn verified_device(
    roots: &HostRoots,
    check: &ImdsCheck,
    id: &VolumeId,
    lun: u32,
    timeout: Duration,
    poll: Duration,
) -> Result<PathBuf, Error> {
    let dev = wait_for_lun(roots, lun, timeout, poll).await?;
    // Asked once the device is there, so that the attachment IMDS shows is the
    // one the device came from.
    check_disk_at_lun(check, id, lun).await?;
    Ok(dev)
}

/// Where and how patiently the node asks IMDS which disk is at a LUN.
#[derive(Clone, Debug)]
pub struct ImdsCheck {
    /// IMDS base URL (the fake's in tests).
    pub endpoint: String,
    pub attempts: u32,
    pub delay: Duration,
}

impl ImdsCheck {
    /// The endpoint `node --cloud azure` reads its identity from
    /// ([`crate::backend::azure::config::imds_endpoint`]), a few tries a second apart: the
    /// kubelet retries NodeStage anyway.
    pub fn from_env() -> Self {
        ImdsCheck {
            endpoint: crate::backend::azure::config::imds_endpoint(|k| std::env::var(k).ok()),
            attempts: 3,
            delay: Duration::from_secs(1),
        }
    }
}

/// Requires that IMDS lists the volume's disk, and no other, at LUN `lun` of
/// this VM: FAILED_PRECONDITION otherwise, UNAVAILABLE when IMDS cannot be read
/// (never a pass without an answer).
pub async fn check_disk_at_lun(check: &ImdsCheck, id: &VolumeId, lun: u32) -> Result<(), Error> {
    let vm = imds::instance(&check.endpoint, check.attempts, check.delay)
        .await
        .map_err(|e| match e {
            imds::ImdsError::Unavailable(m) => Error::Unavailable(format!(
                "cannot confirm that LUN {lun} holds volume {id}'s disk: \
                 Azure instance metadata unavailable: {m}"
            )),
            other => Error::from(other),
        })?;
    disk_at_lun(&vm, id, lun)
}

/// The check of [`check_disk_at_lun`] on metadata already read.
pub fn disk_at_lun(vm: &Instance, id: &VolumeId, lun: u32) -> Result<(), Error> {
    let at_lun: Vec<&DataDisk> = vm
        .storage_profile
        .data_disks
        .iter()
        .filter(|d| d.lun.trim().parse::<u32>().ok() == Some(lun))
        .collect();
    let expected = format!("disk {} in resource group {}", id.disk(), id.location());
    match at_lun.as_slice() {
        [] => Err(Error::FailedPrecondition(format!(
            "LUN {lun} of VM {} holds no data disk in the instance metadata, expected {expected}: \
             the publish context is stale or not this VM's",
            vm.name
        ))),
        [disk] if is_volume_disk(disk, id) => Ok(()),
        found => Err(Error::FailedPrecondition(format!(
            "LUN {lun} of VM {} holds {}, not the volume's {expected}: the publish context is \
             stale or forged; not touching that disk",
            vm.name,
            found
                .iter()
                .map(|d| describe(d))
                .collect::<Vec<_>>()
                .join(" and ")
        ))),
    }
}

/// Whether an IMDS data disk is `id`'s disk: its ARM id names that disk in the
/// volume's resource group (ARM ids compare without case), or, for an entry
/// without a managed disk id, its name is the disk's name.
fn is_volume_disk(disk: &DataDisk, id: &VolumeId) -> bool {
    match disk
        .managed_disk
        .as_ref()
        .filter(|m| !m.id.trim().is_empty())
    {
        Some(m) => {
            let suffix = format!(
                "/resourcegroups/{}/providers/microsoft.compute/disks/{}",
                id.location(),
                id.disk()
            )
            .to_ascii_lowercase();
            m.id.trim().to_ascii_lowercase().ends_with(&suffix)
        }
        None => disk.name == id.disk(),
    }
}

/// An IMDS data disk for a message: its managed disk id, else its name.
fn describe(disk: &DataDisk) -> String {
    let text = match disk
        .managed_disk
        .as_ref()
        .filter(|m| !m.id.trim().is_empty())
    {
        Some(m) => format!("managed disk {}", m.id.trim()),
        None => format!("disk named {:?}", disk.name),
    };
    // IMDS is trusted, but a message stays one short line.
    text.chars().take(300).filter(|c| !c.is_control()).collect()
}

/// Used by tests: a fake sysfs SCSI disk `H:C:T:L` with block device `block`.
#[cfg(test)]
pub(crate) fn fake_scsi_disk(
    root: &std::path::Path,
    address: &str,
    vendor: &str,
    model: &str,
    block: &str,
) {
    let device = root
        .join("sys/class/scsi_device")
        .join(address)
        .join("device");
    std::fs::create_dir_all(device.join("block").join(block)).unwrap();
    std::fs::write(device.join("vendor"), format!("{vendor}    \n")).unwrap();
    std::fs::write(device.join("model"), format!("{model}    \n")).unwrap();
    std::fs::create_dir_all(root.join("dev")).unwrap();
    std::fs::write(root.join("dev").join(block), b"").unwrap();
}

/// Used by tests: a fake NVMe namespace `ns` (id `nsid`) of controller `ctrl`
/// with model `model`, and its device node.
#[cfg(test)]
pub(crate) fn fake_nvme_namespace(
    root: &std::path::Path,
    ctrl: &str,
    model: &str,
    ns: &str,
    nsid: u32,
) {
    let dir = root.join("sys/class/nvme").join(ctrl);
    std::fs::create_dir_all(dir.join(ns)).unwrap();
    std::fs::write(dir.join("model"), format!("{model}                    \n")).unwrap();
    std::fs::write(dir.join(ns).join("nsid"), format!("{nsid}\n")).unwrap();
    std::fs::create_dir_all(root.join("dev")).unwrap();
    std::fs::write(root.join("dev").join(ns), b"").unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn nvme_data_disks_by_their_udev_link_or_namespace_id() {
        let t = tempfile::tempdir().unwrap();
        // OS disk (namespace 1) and data disks at LUN 0 and 3 (namespaces 2 and 5)
        // of the remote-disk controller; a local disk on another controller
        // whose namespace 2 is not a data disk.
        fake_nvme_namespace(t.path(), "nvme0", AZURE_NVME_REMOTE_MODEL, "nvme0n1", 1);
        fake_nvme_namespace(t.path(), "nvme0", AZURE_NVME_REMOTE_MODEL, "nvme0n2", 2);
        fake_nvme_namespace(t.path(), "nvme0", AZURE_NVME_REMOTE_MODEL, "nvme0n5", 5);
        fake_nvme_namespace(
            t.path(),
            "nvme1",
            "Microsoft NVMe Direct Disk v2",
            "nvme1n2",
            2,
        );
        let r = roots(t.path());
        assert_eq!(
            find_by_lun(&r, 0).unwrap(),
            Some(t.path().join("dev/nvme0n2"))
        );
        assert_eq!(
            find_by_lun(&r, 3).unwrap(),
            Some(t.path().join("dev/nvme0n5"))
        );
        assert_eq!(find_by_lun(&r, 1).unwrap(), None);
        // azure-vm-utils' link wins over the scan.
        std::fs::write(t.path().join("dev/nvme0n9"), b"").unwrap();
        link(t.path(), "data/by-lun/1", "../../../../nvme0n9");
        assert_eq!(
            find_by_lun(&r, 1).unwrap(),
            Some(t.path().join("dev/nvme0n9").canonicalize().unwrap())
        );
        // Two remote controllers with that namespace: no guess.
        fake_nvme_namespace(t.path(), "nvme2", AZURE_NVME_REMOTE_MODEL, "nvme2n5", 5);
        let e = find_by_lun(&r, 3).unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert!(e.message().contains("nvme2n5"), "{}", e.message());
    }

    fn roots(dir: &Path) -> HostRoots {
        HostRoots::under(dir)
    }

    fn link(dir: &Path, name: &str, target: &str) {
        let l = dir.join("dev/disk/azure").join(name);
        std::fs::create_dir_all(l.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(target, l).unwrap();
    }

    #[test]
    fn the_udev_link_wins() {
        let t = tempfile::tempdir().unwrap();
        fake_scsi_disk(t.path(), "3:0:0:1", "Msft", "Virtual Disk", "sdd");
        std::fs::write(t.path().join("dev/sdc"), b"").unwrap();
        link(t.path(), "scsi1/lun1", "../../../sdc");
        let dev = find_by_lun(&roots(t.path()), 1).unwrap().unwrap();
        assert_eq!(dev, t.path().join("dev/sdc").canonicalize().unwrap());
        // Another LUN has no link and no SCSI disk.
        assert_eq!(find_by_lun(&roots(t.path()), 2).unwrap(), None);
    }

    #[test]
    fn a_dangling_link_is_not_there_yet() {
        let t = tempfile::tempdir().unwrap();
        link(t.path(), "scsi1/lun0", "../../../sdz");
        assert_eq!(find_by_lun(&roots(t.path()), 0).unwrap(), None);
    }

    #[test]
    fn sysfs_scan_finds_the_data_disk_and_skips_os_resource_and_others() {
        let t = tempfile::tempdir().unwrap();
        // OS disk and resource disk at LUN 0, linked as udev does.
        fake_scsi_disk(t.path(), "0:0:0:0", "Msft", "Virtual Disk", "sda");
        fake_scsi_disk(t.path(), "1:0:1:0", "Msft", "Virtual Disk", "sdb");
        link(t.path(), "root", "../../sda");
        link(t.path(), "resource", "../../sdb");
        // A CD-ROM-like device at LUN 0 from another vendor.
        fake_scsi_disk(t.path(), "2:0:0:0", "Msft", "Virtual DVD-ROM", "sr0");
        // The data disks.
        fake_scsi_disk(t.path(), "3:0:0:0", "Msft", "Virtual Disk", "sdc");
        fake_scsi_disk(t.path(), "3:0:0:5", "MSFT", "VIRTUAL DISK", "sdd");
        let r = roots(t.path());
        assert_eq!(find_by_lun(&r, 0).unwrap(), Some(t.path().join("dev/sdc")));
        assert_eq!(find_by_lun(&r, 5).unwrap(), Some(t.path().join("dev/sdd")));
        assert_eq!(find_by_lun(&r, 1).unwrap(), None);
    }

    #[test]
    fn two_candidates_are_refused() {
        let t = tempfile::tempdir().unwrap();
        fake_scsi_disk(t.path(), "0:0:0:0", "Msft", "Virtual Disk", "sda");
        fake_scsi_disk(t.path(), "3:0:0:0", "Msft", "Virtual Disk", "sdc");
        let e = find_by_lun(&roots(t.path()), 0).unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert!(
            e.message().contains("sda") && e.message().contains("sdc"),
            "{}",
            e.message()
        );
    }

    #[tokio::test]
    async fn waits_for_the_device_and_rescans() {
        let t = tempfile::tempdir().unwrap();
        let host = t.path().join("sys/class/scsi_host/host3");
        std::fs::create_dir_all(&host).unwrap();
        std::fs::write(host.join("scan"), b"").unwrap();
        let r = roots(t.path());
        let dir = t.path().to_path_buf();
        let appear = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            fake_scsi_disk(&dir, "3:0:0:2", "Msft", "Virtual Disk", "sde");
        });
        let dev = wait_for_lun(&r, 2, Duration::from_secs(5), Duration::from_millis(10))
            .await
            .unwrap();
        appear.await.unwrap();
        assert_eq!(dev, t.path().join("dev/sde"));
        assert_eq!(std::fs::read_to_string(host.join("scan")).unwrap(), "- - -");
        let e = wait_for_lun(&r, 9, Duration::from_millis(30), Duration::from_millis(10))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable);
        assert!(e.message().contains("LUN 9"));
    }

    /// IMDS data disks as `(lun, name, managedDisk.id)`.
    fn vm(disks: &[(&str, &str, Option<&str>)]) -> Instance {
        let mut vm = Instance {
            name: "vm-1".into(),
            ..Default::default()
        };
        vm.storage_profile.data_disks = disks
            .iter()
            .map(|(lun, name, id)| DataDisk {
                lun: lun.to_string(),
                name: name.to_string(),
                managed_disk: id.map(|id| imds::ManagedDisk { id: id.into() }),
            })
            .collect();
        vm
    }

    #[test]
    fn the_disk_at_a_lun_by_arm_id_without_case_or_by_name() {
        let id: VolumeId = "azure:rg-1:pvc-x".parse().unwrap();
        let arm = "/subscriptions/S/resourceGroups/RG-1/providers/Microsoft.Compute/disks/PVC-X";
        // ARM ids compare without case; `lun1` is not `lun10`.
        let v = vm(&[
            ("10", "other", Some("/x/disks/other")),
            ("1", "pvc-x", Some(arm)),
        ]);
        disk_at_lun(&v, &id, 1).unwrap();
        let e = disk_at_lun(&v, &id, 10).unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert!(e.message().contains("/x/disks/other"), "{}", e.message());
        // A name alone is not enough when the managed disk id says otherwise.
        let v = vm(&[(
            "1",
            "pvc-x",
            Some("/x/resourceGroups/rg-2/providers/Microsoft.Compute/disks/pvc-x"),
        )]);
        assert_eq!(
            disk_at_lun(&v, &id, 1).unwrap_err().code(),
            tonic::Code::FailedPrecondition
        );
        // Without a managed disk id, the name decides (exactly).
        disk_at_lun(&vm(&[("1", "pvc-x", None)]), &id, 1).unwrap();
        disk_at_lun(&vm(&[(" 1 ", "pvc-x", Some(""))]), &id, 1).unwrap();
        for name in ["pvc-y", "PVC-X", "pvc-x2"] {
            let e = disk_at_lun(&vm(&[("1", name, None)]), &id, 1).unwrap_err();
            assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{name}");
            assert!(e.message().contains(name), "{}", e.message());
        }
        // Two entries at one LUN are never taken for the volume.
        let v = vm(&[("1", "pvc-x", None), ("1", "pvc-y", None)]);
        assert_eq!(
            disk_at_lun(&v, &id, 1).unwrap_err().code(),
            tonic::Code::FailedPrecondition
        );
    }

    #[test]
    fn luns_from_the_publish_context() {
        let ctx = |v: &str| HashMap::from([(PUBLISH_LUN.to_string(), v.to_string())]);
        assert_eq!(lun_from_context(&ctx("7")).unwrap(), 7);
        for bad in ["", "-1", "64", "x", "1e3"] {
            assert_eq!(
                lun_from_context(&ctx(bad)).unwrap_err().code(),
                tonic::Code::InvalidArgument
            );
        }
        assert_eq!(
            lun_from_context(&HashMap::new()).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }
}
