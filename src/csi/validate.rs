//! Request checks shared by the Controller and Node services: required fields and
//! volume capabilities. Each failure is an INVALID_ARGUMENT naming the field.

use tonic::Status;

use crate::mount::FsType;
use crate::proto::csi::VolumeCapability;
use crate::proto::csi::volume_capability::access_mode::Mode;
use crate::proto::csi::volume_capability::{AccessType, MountVolume};

/// Longest id or name we accept from a CO; the spec asks plugins to take 128.
pub const MAX_ID_LEN: usize = 128;

/// Fails with INVALID_ARGUMENT unless `value` is a non-empty, sane string.
pub fn required<'a>(field: &str, value: &'a str) -> Result<&'a str, Status> {
    if value.is_empty() {
        return Err(Status::invalid_argument(format!("{field} is required")));
    }
    if value.contains('\0') {
        return Err(Status::invalid_argument(format!(
            "{field} contains a NUL byte"
        )));
    }
    Ok(value)
}

/// A required id or name, at most [`MAX_ID_LEN`] bytes.
pub fn required_id<'a>(field: &str, value: &'a str) -> Result<&'a str, Status> {
    required(field, value)?;
    if value.len() > MAX_ID_LEN {
        return Err(Status::invalid_argument(format!(
            "{field} is {} bytes; at most {MAX_ID_LEN} are accepted",
            value.len()
        )));
    }
    Ok(value)
}

/// A node id: a required id of printable ASCII without slashes, as node names
/// (DNS subdomains) and cloud instance names are; anything else names no node.
pub fn node_id<'a>(field: &str, value: &'a str) -> Result<&'a str, Status> {
    plain_name(field, value)
}

/// A volume or snapshot name from the CO (Kubernetes: `pvc-<uuid>`,
/// `snapshot-<uuid>`): printable ASCII without slashes, at most 128 bytes, since
/// backends turn it into disk names and tags.
pub fn name<'a>(field: &str, value: &'a str) -> Result<&'a str, Status> {
    plain_name(field, value)
}

fn plain_name<'a>(field: &str, value: &'a str) -> Result<&'a str, Status> {
    required_id(field, value)?;
    if !value
        .bytes()
        .all(|b| b.is_ascii_graphic() && b != b'/' && b != b'\\')
    {
        return Err(Status::invalid_argument(format!(
            "{field} {:?}: printable ASCII without slashes expected",
            value.chars().take(64).collect::<String>()
        )));
    }
    Ok(value)
}

/// What a capability asks the node to provide.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Access {
    Mount { fs: FsType, flags: Vec<String> },
    Block,
}

/// Access modes a LUKS volume supports: one node at a time, since two kernels
/// writing through two dm-crypt mappings of one disk would corrupt it.
pub fn mode_supported(mode: Mode) -> bool {
    matches!(
        mode,
        Mode::SingleNodeWriter
            | Mode::SingleNodeReaderOnly
            | Mode::SingleNodeSingleWriter
            | Mode::SingleNodeMultiWriter
    )
}

/// Whether the mode only ever reads.
pub fn mode_read_only(mode: Mode) -> bool {
    matches!(mode, Mode::SingleNodeReaderOnly | Mode::MultiNodeReaderOnly)
}

/// Checks one capability and says what it asks for; `Err` carries why it cannot
/// be honoured.
pub fn capability(cap: &VolumeCapability) -> Result<(Access, Mode), String> {
    let mode = cap
        .access_mode
        .as_ref()
        .ok_or("volume_capability.access_mode is required")?;
    let mode = Mode::try_from(mode.mode)
        .map_err(|_| format!("access mode {} is not one the spec defines", mode.mode))?;
    if mode == Mode::Unknown {
        return Err("access mode UNKNOWN is not a mode".to_string());
    }
    if !mode_supported(mode) {
        return Err(format!(
            "access mode {} is not supported: an encrypted volume is used by one node at a time",
            mode.as_str_name()
        ));
    }
    let access = match cap.access_type.as_ref() {
        None => {
            return Err("volume_capability.access_type (mount or block) is required".to_string());
        }
        Some(AccessType::Block(_)) => Access::Block,
        Some(AccessType::Mount(MountVolume {
            fs_type,
            mount_flags,
            volume_mount_group,
        })) => {
            if !volume_mount_group.is_empty() {
                return Err(
                    "volume_mount_group is not supported (no VOLUME_MOUNT_GROUP capability)"
                        .to_string(),
                );
            }
            let fs = if fs_type.is_empty() {
                FsType::Ext4
            } else {
                fs_type.parse::<FsType>().map_err(|e| e.to_string())?
            };
            for flag in mount_flags {
                if flag.is_empty() || flag.contains(['\0', ',']) {
                    return Err(format!("mount flag {flag:?} is empty or holds ',' or NUL"));
                }
            }
            Access::Mount {
                fs,
                flags: mount_flags.clone(),
            }
        }
    };
    Ok((access, mode))
}

/// Checks a list of capabilities (at least one) as CreateVolume receives them.
pub fn capabilities(caps: &[VolumeCapability]) -> Result<(), Status> {
    if caps.is_empty() {
        return Err(Status::invalid_argument("volume_capabilities is required"));
    }
    for cap in caps {
        capability(cap).map_err(Status::invalid_argument)?;
    }
    Ok(())
}

/// The single capability of a publish or stage request.
pub fn one_capability(cap: Option<&VolumeCapability>) -> Result<(Access, Mode), Status> {
    let cap = cap.ok_or_else(|| Status::invalid_argument("volume_capability is required"))?;
    capability(cap).map_err(Status::invalid_argument)
}
