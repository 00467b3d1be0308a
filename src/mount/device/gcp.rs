//! The node side of GCP: which block device a published disk is.
//!
//! A disk attached with device name `N` appears as `/dev/disk/by-id/google-N`,
//! a link that the guest environment's udev rules make. The device the link
//! leads to is used only when it reports `N` itself (below); where the link
//! is absent, or leads elsewhere (a minimal image, or no udev in the container's view of `/dev`), the
//! device is found by the identifiers the disk itself reports:
//!
//! - SCSI (`/sys/block/sd*`): the unit serial number, VPD page 0x80, which GCE
//!   sets to the device name; else an ASCII designator of the device
//!   identification page 0x83 that is the device name, or whose last word
//!   (after a space or `_`, as in `Google  PersistentDisk NAME` or
//!   `0Google_PersistentDisk_NAME`) is. A device name cannot contain either,
//!   so that word is the whole name: `disk-0` never matches the boot disk's
//!   `persistent-disk-0`, nor `google-disk-0`.
//!
//! Every match is exact, and only on the name this driver's controller gives
//! the attachment: the volume id's disk name ([`block_device`] refuses a publish
//! context that names another).
//! - NVMe (`/sys/block/nvme*n*`): the Identify Namespace data, whose
//!   vendor-specific area (from byte 384) holds GCE's JSON with `device_name`.
//!   It is read with the NVMe admin passthrough ioctl; tests inject it.
//!
//! The roots (`/dev`, `/sys`) and the NVMe reader are injectable so the search
//! is tested against fake trees.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{DeviceLocator, HostRoots};
use crate::backend::gcp::params;
use crate::csi::contract::GCP_DEVICE_NAME as PUBLISH_DEVICE_NAME;
use crate::volume::VolumeId;

/// How long a stage waits for an attached disk's device to appear.
pub const DEVICE_WAIT: Duration = Duration::from_secs(30);

/// Reads the 4096-byte Identify Namespace data of an NVMe namespace device.
pub type NvmeIdentify = Arc<dyn Fn(&Path) -> io::Result<Vec<u8>> + Send + Sync>;

/// GCP persistent disks: found by the device name the controller attaches
/// them under, in the trees of `roots`, with NVMe identify data read by
/// `nvme_identify`.
#[derive(Clone)]
pub struct GcpLocator {
    pub roots: HostRoots,
    pub nvme_identify: NvmeIdentify,
}

impl GcpLocator {
    /// The host's trees and the real NVMe ioctl.
    pub fn host() -> Self {
        GcpLocator {
            roots: HostRoots::host(),
            nvme_identify: Arc::new(nvme_identify_namespace),
        }
    }
}

#[tonic::async_trait]
impl DeviceLocator for GcpLocator {
    async fn locate(
        &self,
        id: &VolumeId,
        publish_context: &std::collections::HashMap<String, String>,
    ) -> Result<PathBuf, tonic::Status> {
        block_device(self, id, publish_context, DEVICE_WAIT).await
    }
}

/// Offset of the vendor-specific area in Identify Namespace data.
const NVME_VENDOR_OFFSET: usize = 384;

/// The block device of the disk attached under `device_name`, if present now.
pub fn find_device(roots: &GcpLocator, device_name: &str) -> io::Result<Option<PathBuf>> {
    if !params::is_resource_name(device_name) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("device name {device_name:?} is not a GCP device name"),
        ));
    }
    let link = roots
        .roots
        .dev
        .join("disk/by-id")
        .join(format!("google-{device_name}"));
    if link.exists() {
        // The link is udev's word, made when the device appeared; a stale link
        // (the disk detached and another attached, its letter reused before
        // udev caught up) or a rule that names the wrong device would hand us
        // another disk. As the PD CSI driver does before it trusts a by-id
        // path, the device the link resolves to must report the name itself.
        let target = std::fs::canonicalize(&link)?;
        match target.file_name().and_then(|n| n.to_str()) {
            Some(name) if reports_device_name(roots, name, device_name) => {
                return Ok(Some(target));
            }
            name => tracing::warn!(
                link = %link.display(),
                target = name.unwrap_or("?"),
                device_name,
                "the by-id link leads to a device that does not report this device name; \
                 looking for the disk by its identifiers"
            ),
        }
    }
    let block = roots.roots.sys.join("block");
    let entries = match std::fs::read_dir(&block) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    for name in names {
        if reports_device_name(roots, &name, device_name) {
            let dev = roots.roots.dev.join(&name);
            if dev.exists() {
                return Ok(Some(dev));
            }
        }
    }
    Ok(None)
}

/// Whether the block device `name` (`sdc`, `nvme0n2`) reports `device_name`
/// as its own: a SCSI disk in its VPD pages 0x80 / 0x83 (what `scsi_id`
/// reads), an NVMe namespace in its Identify Namespace data (what GCE's
/// `google_nvme_id` reads; the controller serial in sysfs is the same for
/// every disk of the VM and names none). A device that reports nothing
/// does not match.
fn reports_device_name(roots: &GcpLocator, name: &str, device_name: &str) -> bool {
    if name.starts_with("sd") {
        scsi_device_name_matches(&roots.roots.sys.join("block").join(name), device_name)
    } else if name.starts_with("nvme") {
        let dev = roots.roots.dev.join(name);
        match (roots.nvme_identify)(&dev) {
            Ok(data) => nvme_device_name(&data).as_deref() == Some(device_name),
            Err(e) => {
                tracing::debug!(device = %dev.display(), error = %e, "NVMe identify failed");
                false
            }
        }
    } else {
        false
    }
}

/// Waits up to `timeout` for the device of `device_name` to appear.
pub async fn wait_for_device(
    roots: &GcpLocator,
    device_name: &str,
    timeout: Duration,
) -> io::Result<Option<PathBuf>> {
    let started = Instant::now();
    loop {
        let roots_now = roots.clone();
        let name = device_name.to_string();
        let found = tokio::task::spawn_blocking(move || find_device(&roots_now, &name))
            .await
            .map_err(io::Error::other)??;
        if found.is_some() || started.elapsed() >= timeout {
            return Ok(found);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The block device of a published gcp volume, from its publish context
/// ([`PUBLISH_DEVICE_NAME`]); waits up to `timeout` for it to appear.
pub async fn block_device(
    roots: &GcpLocator,
    id: &VolumeId,
    publish_context: &std::collections::HashMap<String, String>,
    timeout: Duration,
) -> Result<PathBuf, tonic::Status> {
    let device = publish_context.get(PUBLISH_DEVICE_NAME).ok_or_else(|| {
        tonic::Status::invalid_argument(format!(
            "publish_context has no {PUBLISH_DEVICE_NAME} for volume {id}; was it published by \
             this driver's controller?"
        ))
    })?;
    if !params::is_resource_name(device) {
        return Err(tonic::Status::invalid_argument(format!(
            "publish_context {PUBLISH_DEVICE_NAME} {:?} is not a GCP device name",
            device.chars().take(64).collect::<String>()
        )));
    }
    // The controller attaches a volume's disk under the disk's own name. Any
    // other name is another disk's device (or this one attached by hand), and
    // formatting or opening it would act on a disk that is not the volume.
    if device != id.disk() {
        return Err(tonic::Status::failed_precondition(format!(
            "volume {id}: publish_context {PUBLISH_DEVICE_NAME} is {device:?}, but the volume's \
             disk is {:?}, the only device name this driver attaches it under; refusing to use \
             another device (detach a disk attached by hand and let the driver attach it)",
            id.disk()
        )));
    }
    match wait_for_device(roots, device, timeout).await {
        Ok(Some(path)) => Ok(path),
        Ok(None) => Err(tonic::Status::unavailable(format!(
            "volume {id}: no device for GCP device name {device} after {} s (neither \
             /dev/disk/by-id/google-{device} nor a SCSI/NVMe disk reporting it); is it attached \
             to this VM?",
            timeout.as_secs()
        ))),
        Err(e) => Err(tonic::Status::internal(format!(
            "volume {id}: looking for device {device}: {e}"
        ))),
    }
}

fn scsi_device_name_matches(dir: &Path, device_name: &str) -> bool {
    let vpd = |page: &str| std::fs::read(dir.join("device").join(page)).ok();
    if let Some(pg80) = vpd("vpd_pg80")
        && vpd_serial(&pg80).as_deref() == Some(device_name)
    {
        return true;
    }
    if let Some(pg83) = vpd("vpd_pg83") {
        return vpd_designators(&pg83)
            .iter()
            .any(|d| designator_names(d, device_name));
    }
    false
}

/// Whether a page 0x83 designator names exactly `device_name`: it is the name,
/// or its last word after a space or `_` is (GCP names contain neither, so
/// the word is never a part of a longer name).
fn designator_names(designator: &str, device_name: &str) -> bool {
    if designator == device_name {
        return true;
    }
    match designator.rsplit_once([' ', '_']) {
        Some((head, last)) => last == device_name && !head.trim_matches([' ', '_']).is_empty(),
        None => false,
    }
}

/// The unit serial number of a VPD page 0x80 (4-byte header, then the
/// serial, space-padded).
pub fn vpd_serial(page: &[u8]) -> Option<String> {
    if page.len() < 4 || page[1] != 0x80 {
        return None;
    }
    let len = u16::from_be_bytes([page[2], page[3]]) as usize;
    let body = page.get(4..4 + len.min(page.len() - 4))?;
    let text = std::str::from_utf8(body)
        .ok()?
        .trim_matches(|c: char| c == ' ' || c == '\0');
    (!text.is_empty()).then(|| text.to_string())
}

/// The ASCII (code set 2) and UTF-8 (code set 3) designators of a VPD page
/// 0x83: 4-byte page header, then descriptors of a 4-byte header (code set
/// in the low nibble of byte 0, length in byte 3) and the identifier.
pub fn vpd_designators(page: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    if page.len() < 4 || page[1] != 0x83 {
        return out;
    }
    let end = (4 + u16::from_be_bytes([page[2], page[3]]) as usize).min(page.len());
    let mut at = 4;
    while at + 4 <= end {
        let code_set = page[at] & 0x0f;
        let len = page[at + 3] as usize;
        let Some(id) = page.get(at + 4..(at + 4 + len).min(end)) else {
            break;
        };
        if (code_set == 2 || code_set == 3)
            && let Ok(text) = std::str::from_utf8(id)
        {
            let text = text.trim_matches(|c: char| c == ' ' || c == '\0');
            if !text.is_empty() {
                out.push(text.to_string());
            }
        }
        at += 4 + len;
    }
    out
}

/// `device_name` from the vendor-specific area of Identify Namespace data.
pub fn nvme_device_name(identify: &[u8]) -> Option<String> {
    let vendor = identify.get(NVME_VENDOR_OFFSET..)?;
    let end = vendor.iter().position(|&b| b == 0).unwrap_or(vendor.len());
    let value: serde_json::Value = serde_json::from_slice(&vendor[..end]).ok()?;
    value
        .get("device_name")
        .and_then(|v| v.as_str())
        .map(str::to_string)
}

/// Identify Namespace (opcode 0x06, CNS 0) through `NVME_IOCTL_ADMIN_CMD`.
fn nvme_identify_namespace(dev: &Path) -> io::Result<Vec<u8>> {
    use std::os::fd::AsRawFd;

    /// `struct nvme_passthru_cmd` of `<linux/nvme_ioctl.h>`.
    #[repr(C)]
    #[derive(Default)]
    struct PassthruCmd {
        opcode: u8,
        flags: u8,
        rsvd1: u16,
        nsid: u32,
        cdw2: u32,
        cdw3: u32,
        metadata: u64,
        addr: u64,
        metadata_len: u32,
        data_len: u32,
        cdw10: u32,
        cdw11: u32,
        cdw12: u32,
        cdw13: u32,
        cdw14: u32,
        cdw15: u32,
        timeout_ms: u32,
        result: u32,
    }
    // _IOWR('N', 0x41, struct nvme_admin_cmd), the struct being 72 bytes.
    const NVME_IOCTL_ADMIN_CMD: libc::c_ulong = (3 << 30)
        | ((std::mem::size_of::<PassthruCmd>() as libc::c_ulong) << 16)
        | (0x4e << 8)
        | 0x41;
    const NVME_IOCTL_ID: libc::c_ulong = (0x4e << 8) | 0x40; // _IO('N', 0x40)

    let file = std::fs::File::open(dev)?;
    let fd = file.as_raw_fd();
    // SAFETY: NVME_IOCTL_ID takes no argument and returns the namespace id.
    let nsid = unsafe { libc::ioctl(fd, NVME_IOCTL_ID as _) };
    if nsid < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut data = vec![0u8; 4096];
    let mut cmd = PassthruCmd {
        opcode: 0x06,
        nsid: nsid as u32,
        addr: data.as_mut_ptr() as u64,
        data_len: data.len() as u32,
        cdw10: 0,
        ..PassthruCmd::default()
    };
    // SAFETY: `cmd` is a valid nvme_passthru_cmd whose buffer (`data`, 4096
    // bytes) outlives the call; the kernel writes at most data_len bytes.
    let rc = unsafe { libc::ioctl(fd, NVME_IOCTL_ADMIN_CMD as _, &mut cmd as *mut PassthruCmd) };
    if rc != 0 {
        return Err(if rc < 0 {
            io::Error::last_os_error()
        } else {
            io::Error::other(format!("NVMe identify failed with status {rc:#x}"))
        });
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn roots(
        dir: &Path,
        nvme: impl Fn(&Path) -> io::Result<Vec<u8>> + Send + Sync + 'static,
    ) -> GcpLocator {
        std::fs::create_dir_all(dir.join("dev/disk/by-id")).unwrap();
        std::fs::create_dir_all(dir.join("sys/block")).unwrap();
        GcpLocator {
            roots: HostRoots::under(dir),
            nvme_identify: Arc::new(nvme),
        }
    }

    fn no_nvme(_: &Path) -> io::Result<Vec<u8>> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }

    fn pg80(serial: &str) -> Vec<u8> {
        let mut v = vec![0, 0x80, 0, serial.len() as u8];
        v.extend_from_slice(serial.as_bytes());
        v
    }

    fn pg83(designators: &[(u8, &str)]) -> Vec<u8> {
        let mut body = Vec::new();
        for (code_set, text) in designators {
            body.extend_from_slice(&[*code_set, 0x00, 0, text.len() as u8]);
            body.extend_from_slice(text.as_bytes());
        }
        let mut v = vec![0, 0x83];
        v.extend_from_slice(&(body.len() as u16).to_be_bytes());
        v.extend(body);
        v
    }

    fn scsi(dir: &Path, dev: &str, pg80: Option<Vec<u8>>, pg83: Option<Vec<u8>>) {
        let d = dir.join("sys/block").join(dev).join("device");
        std::fs::create_dir_all(&d).unwrap();
        if let Some(p) = pg80 {
            std::fs::write(d.join("vpd_pg80"), p).unwrap();
        }
        if let Some(p) = pg83 {
            std::fs::write(d.join("vpd_pg83"), p).unwrap();
        }
        std::fs::write(dir.join("dev").join(dev), b"").unwrap();
    }

    #[test]
    fn by_id_link_wins() {
        let t = tempfile::tempdir().unwrap();
        let r = roots(t.path(), no_nvme);
        scsi(
            t.path(),
            "sdc",
            None,
            Some(pg83(&[(2, "0Google  PersistentDisk pvc-1")])),
        );
        symlink("../../sdc", t.path().join("dev/disk/by-id/google-pvc-1")).unwrap();
        let got = find_device(&r, "pvc-1").unwrap().unwrap();
        assert_eq!(
            got,
            std::fs::canonicalize(t.path().join("dev/sdc")).unwrap()
        );
        assert_eq!(find_device(&r, "pvc-2").unwrap(), None);
    }

    /// A by-id link is udev's claim; the device's own identifiers decide. A
    /// link to a disk that reports another name (stale after a detach and a
    /// reused letter) or nothing is not used, and the disk that does report
    /// the name is found instead; the same for NVMe namespaces.
    #[test]
    fn a_by_id_link_is_used_only_when_its_device_reports_the_name() {
        let t = tempfile::tempdir().unwrap();
        let r = roots(t.path(), |dev: &Path| {
            let device = match dev.file_name().unwrap().to_str().unwrap() {
                "nvme0n2" => "pvc-other",
                "nvme0n3" => "pvc-n",
                _ => return Err(io::Error::from(io::ErrorKind::NotFound)),
            };
            let mut data = vec![0u8; 4096];
            let json = format!(r#"{{"device_name":"{device}"}}"#);
            data[NVME_VENDOR_OFFSET..NVME_VENDOR_OFFSET + json.len()]
                .copy_from_slice(json.as_bytes());
            Ok(data)
        });
        // google-pvc-1 leads to sdc, which is pvc-2's disk; sdd is pvc-1's.
        scsi(t.path(), "sdc", Some(pg80("pvc-2")), None);
        scsi(
            t.path(),
            "sdd",
            None,
            Some(pg83(&[(2, "0Google  PersistentDisk pvc-1")])),
        );
        symlink("../../sdc", t.path().join("dev/disk/by-id/google-pvc-1")).unwrap();
        assert_eq!(
            find_device(&r, "pvc-1").unwrap(),
            Some(r.roots.dev.join("sdd"))
        );
        // A link to a device without identifiers, and no other: nothing.
        std::fs::write(t.path().join("dev/sdz"), b"").unwrap();
        symlink("../../sdz", t.path().join("dev/disk/by-id/google-pvc-3")).unwrap();
        assert_eq!(find_device(&r, "pvc-3").unwrap(), None);
        // NVMe: the namespace the link leads to reports another device name.
        for n in ["nvme0n2", "nvme0n3"] {
            std::fs::create_dir_all(t.path().join("sys/block").join(n)).unwrap();
            std::fs::write(t.path().join("dev").join(n), b"").unwrap();
        }
        symlink(
            "../../nvme0n2",
            t.path().join("dev/disk/by-id/google-pvc-n"),
        )
        .unwrap();
        assert_eq!(
            find_device(&r, "pvc-n").unwrap(),
            Some(r.roots.dev.join("nvme0n3"))
        );
        // And a link to the right namespace is used as it is.
        symlink(
            "../../nvme0n2",
            t.path().join("dev/disk/by-id/google-pvc-other"),
        )
        .unwrap();
        assert_eq!(
            find_device(&r, "pvc-other").unwrap(),
            Some(std::fs::canonicalize(r.roots.dev.join("nvme0n2")).unwrap())
        );
    }

    #[test]
    fn scsi_serial_fallback() {
        let t = tempfile::tempdir().unwrap();
        let r = roots(t.path(), no_nvme);
        scsi(t.path(), "sda", Some(pg80("persistent-disk-0")), None);
        scsi(t.path(), "sdb", Some(pg80("pvc-1")), None);
        scsi(t.path(), "sdc", Some(pg80("pvc-10")), None);
        assert_eq!(
            find_device(&r, "pvc-1").unwrap(),
            Some(r.roots.dev.join("sdb"))
        );
        assert_eq!(
            find_device(&r, "pvc-10").unwrap(),
            Some(r.roots.dev.join("sdc"))
        );
        assert_eq!(find_device(&r, "pvc-3").unwrap(), None);
    }

    #[test]
    fn scsi_designator_fallback() {
        let t = tempfile::tempdir().unwrap();
        let r = roots(t.path(), no_nvme);
        scsi(
            t.path(),
            "sdd",
            None,
            Some(pg83(&[(1, "binary?"), (2, "Google  PersistentDisk pvc-7")])),
        );
        scsi(
            t.path(),
            "sde",
            None,
            Some(pg83(&[(2, "Google  PersistentDisk xpvc-7")])),
        );
        assert_eq!(
            find_device(&r, "pvc-7").unwrap(),
            Some(r.roots.dev.join("sdd"))
        );
        // A name that is only the tail of another's does not match.
        assert_eq!(find_device(&r, "vc-7").unwrap(), None);
    }

    /// Names that end like the wanted one, differ by a prefix, or are its
    /// prefix: none may stand for it, whichever identifier carries them.
    #[test]
    fn near_miss_names_never_match() {
        let t = tempfile::tempdir().unwrap();
        let r = roots(t.path(), no_nvme);
        // The boot disk, as GCE reports it in page 0x83 only.
        scsi(
            t.path(),
            "sda",
            None,
            Some(pg83(&[(2, "Google  PersistentDisk persistent-disk-0")])),
        );
        scsi(
            t.path(),
            "sdb",
            None,
            Some(pg83(&[(2, "Google  PersistentDisk google-disk-0")])),
        );
        scsi(
            t.path(),
            "sdc",
            None,
            Some(pg83(&[(2, "0Google_PersistentDisk_my-disk-0")])),
        );
        scsi(t.path(), "sdd", Some(pg80("persistent-disk-1")), None);
        scsi(t.path(), "sde", Some(pg80("disk-2-old")), None);
        scsi(t.path(), "sdf", None, Some(pg83(&[(2, "-disk-3")])));
        for wanted in ["disk-0", "disk-1", "disk-2", "disk-3"] {
            assert_eq!(find_device(&r, wanted).unwrap(), None, "{wanted}");
        }
        // The whole names still match, in each of GCE's forms.
        assert_eq!(
            find_device(&r, "persistent-disk-0").unwrap(),
            Some(r.roots.dev.join("sda"))
        );
        assert_eq!(
            find_device(&r, "google-disk-0").unwrap(),
            Some(r.roots.dev.join("sdb"))
        );
        assert_eq!(
            find_device(&r, "my-disk-0").unwrap(),
            Some(r.roots.dev.join("sdc"))
        );
        assert!(designator_names("disk-0", "disk-0"));
        assert!(!designator_names(" disk-0", "disk-0"));
        assert!(!designator_names("Google disk-0x", "disk-0"));
    }

    #[tokio::test]
    async fn only_the_volumes_own_disk_is_used() {
        let t = tempfile::tempdir().unwrap();
        let r = roots(t.path(), no_nvme);
        // The boot disk reports persistent-disk-0; another volume's disk is
        // attached and visible as pvc-2.
        scsi(
            t.path(),
            "sda",
            None,
            Some(pg83(&[(2, "Google  PersistentDisk persistent-disk-0")])),
        );
        scsi(t.path(), "sdb", Some(pg80("pvc-2")), None);
        let ctx = |v: &str| {
            std::collections::HashMap::from([(PUBLISH_DEVICE_NAME.to_string(), v.to_string())])
        };
        let short = Duration::from_millis(50);
        // A publish context naming another disk than the volume id's.
        let id: VolumeId = "gcp:us-central1-a:pvc-1".parse().unwrap();
        let err = block_device(&r, &id, &ctx("pvc-2"), short)
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
        assert!(err.message().contains("pvc-2"), "{err}");
        // The volume disk-0, not attached: never the boot disk.
        let id: VolumeId = "gcp:us-central1-a:disk-0".parse().unwrap();
        let err = block_device(&r, &id, &ctx("disk-0"), short)
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
        // A link by id for a longer name is not the volume's either.
        std::fs::write(t.path().join("dev/sdg"), b"").unwrap();
        symlink(
            "../../sdg",
            t.path().join("dev/disk/by-id/google-google-disk-0"),
        )
        .unwrap();
        let err = block_device(&r, &id, &ctx("disk-0"), short)
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    }

    #[test]
    fn nvme_fallback() {
        let t = tempfile::tempdir().unwrap();
        let r = roots(t.path(), |dev: &Path| {
            let name = dev.file_name().unwrap().to_str().unwrap();
            let device = match name {
                "nvme0n1" => "boot",
                "nvme0n2" => "pvc-9",
                _ => return Err(io::Error::from(io::ErrorKind::NotFound)),
            };
            let mut data = vec![0u8; 4096];
            let json = format!(r#"{{"device_name":"{device}","disk_type":"PERSISTENT"}}"#);
            data[NVME_VENDOR_OFFSET..NVME_VENDOR_OFFSET + json.len()]
                .copy_from_slice(json.as_bytes());
            Ok(data)
        });
        for n in ["nvme0n1", "nvme0n2"] {
            std::fs::create_dir_all(t.path().join("sys/block").join(n)).unwrap();
            std::fs::write(t.path().join("dev").join(n), b"").unwrap();
        }
        assert_eq!(
            find_device(&r, "pvc-9").unwrap(),
            Some(r.roots.dev.join("nvme0n2"))
        );
        assert_eq!(find_device(&r, "pvc-8").unwrap(), None);
    }

    #[test]
    fn bad_names_and_pages() {
        let t = tempfile::tempdir().unwrap();
        let r = roots(t.path(), no_nvme);
        assert!(find_device(&r, "../etc").is_err());
        assert_eq!(vpd_serial(&[0, 0x83, 0, 1, b'x']), None);
        assert_eq!(vpd_serial(&[0, 0x80, 0, 40, b'a', b'b']), Some("ab".into()));
        assert!(vpd_designators(&[0, 0x83, 0, 200, 2, 0, 0, 100]).is_empty());
        assert_eq!(nvme_device_name(&[0u8; 100]), None);
    }

    #[tokio::test]
    async fn waits_for_the_device() {
        let t = tempfile::tempdir().unwrap();
        let r = roots(t.path(), no_nvme);
        let dir = t.path().to_path_buf();
        let late = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            scsi(&dir, "sdf", Some(pg80("late")), None);
            symlink("../../sdf", dir.join("dev/disk/by-id/google-late")).unwrap();
        });
        let got = wait_for_device(&r, "late", Duration::from_secs(5))
            .await
            .unwrap();
        late.await.unwrap();
        assert!(got.unwrap().ends_with("sdf"));
        let none = wait_for_device(&r, "never", Duration::from_millis(300))
            .await
            .unwrap();
        assert_eq!(none, None);
    }

    #[tokio::test]
    async fn device_from_publish_context() {
        let t = tempfile::tempdir().unwrap();
        let r = roots(t.path(), no_nvme);
        scsi(t.path(), "sdb", Some(pg80("pvc-1")), None);
        let id: VolumeId = "gcp:us-central1-a:pvc-1".parse().unwrap();
        let ctx = |v: &str| {
            std::collections::HashMap::from([(PUBLISH_DEVICE_NAME.to_string(), v.to_string())])
        };
        let short = Duration::from_millis(50);
        assert_eq!(
            block_device(&r, &id, &ctx("pvc-1"), short).await.unwrap(),
            r.roots.dev.join("sdb")
        );
        let code = |c: &std::collections::HashMap<String, String>| {
            let r = r.clone();
            let id = id.clone();
            let c = c.clone();
            async move { block_device(&r, &id, &c, short).await.unwrap_err().code() }
        };
        assert_eq!(
            code(&Default::default()).await,
            tonic::Code::InvalidArgument
        );
        assert_eq!(code(&ctx("../../sda")).await, tonic::Code::InvalidArgument);
        // Another disk's device name: refused before any device is looked for.
        assert_eq!(code(&ctx("pvc-2")).await, tonic::Code::FailedPrecondition);
        // The volume's own name, with no such device attached.
        let absent: VolumeId = "gcp:us-central1-a:pvc-3".parse().unwrap();
        assert_eq!(
            block_device(&r, &absent, &ctx("pvc-3"), short)
                .await
                .unwrap_err()
                .code(),
            tonic::Code::Unavailable
        );
    }
}
