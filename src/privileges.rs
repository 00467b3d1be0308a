//! The Linux capabilities the node plugin needs, checked once at start.
//!
//! Without them every stage would fail later with a bare EPERM from deep inside
//! mount(2), a loop ioctl or libdevmapper; checking at start turns that into one
//! clear message naming what is missing and how to grant it.
//!
//! | capability | why |
//! |---|---|
//! | `CAP_SYS_ADMIN` | mount and unmount, loop device ioctls, device-mapper ioctls (dm-crypt, dm-integrity), `BLKGETSIZE64` on any device |
//! | `CAP_MKNOD` | libdevmapper creates `/dev/mapper/<name>` itself where no udev does (containers) |
//! | `CAP_IPC_LOCK` | key material stays out of swap: libcryptsetup `mlock`s the buffers that hold a volume key (its `crypt_memory_lock` is a no-op since 2.x, so nothing calls it), and the driver `mlock`s its own key buffers (`kms::locked`); without it both go on unlocked, with a warning |
//!
//! The node also needs the host's `/dev` (device nodes of new disks and
//! mappings), `/sys` (SCSI and loop rescans), the kubelet directory with
//! bidirectional mount propagation, and the kernel keyring syscalls
//! (libcryptsetup hands the volume key to dm-crypt through a logon key). A
//! privileged container grants all of this.

/// One capability: its number in the kernel's bit sets and its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capability {
    pub bit: u32,
    pub name: &'static str,
}

pub const CAP_IPC_LOCK: Capability = Capability {
    bit: 14,
    name: "CAP_IPC_LOCK",
};
pub const CAP_SYS_ADMIN: Capability = Capability {
    bit: 21,
    name: "CAP_SYS_ADMIN",
};
pub const CAP_MKNOD: Capability = Capability {
    bit: 27,
    name: "CAP_MKNOD",
};

/// What the node plugin cannot work without.
pub const NODE_REQUIRED: [Capability; 2] = [CAP_SYS_ADMIN, CAP_MKNOD];
/// What it works without, less safely.
pub const NODE_WANTED: [Capability; 1] = [CAP_IPC_LOCK];

/// Makes this process not dumpable: no core file, and only root may ptrace it
/// or read its memory and environment through `/proc/<pid>`. For the processes
/// that hold keys (the node plugin, the KMS, `dev`).
pub fn not_dumpable() -> std::io::Result<()> {
    // SAFETY: PR_SET_DUMPABLE takes one integer argument.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The effective capability set from the text of `/proc/self/status`.
pub fn effective_from_status(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}

/// The capabilities of `wanted` that the set `effective` lacks.
pub fn missing(effective: u64, wanted: &[Capability]) -> Vec<Capability> {
    wanted
        .iter()
        .copied()
        .filter(|c| effective & (1u64 << c.bit) == 0)
        .collect()
}

/// Checks this process for [`NODE_REQUIRED`] (an error naming each missing
/// one) and [`NODE_WANTED`] (a warning).
pub fn check_node() -> Result<(), String> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| format!("reading /proc/self/status to check capabilities: {e}"))?;
    let effective =
        effective_from_status(&status).ok_or("/proc/self/status has no readable CapEff line")?;
    let lacking = missing(effective, &NODE_WANTED);
    if !lacking.is_empty() {
        tracing::warn!(
            missing = %names(&lacking),
            "libcryptsetup cannot lock its memory; key material may be swapped out"
        );
    }
    let lacking = missing(effective, &NODE_REQUIRED);
    if lacking.is_empty() {
        return Ok(());
    }
    Err(format!(
        "the node plugin lacks {}: it mounts, attaches loop devices and opens \
         device-mapper mappings, which need them. Run it as root in a privileged \
         container (securityContext.privileged: true), or grant the capabilities",
        names(&lacking)
    ))
}

fn names(caps: &[Capability]) -> String {
    caps.iter().map(|c| c.name).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_effective_set_is_read_from_proc_status() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\n\
                      CapEff:\t0000000000204000\nCapBnd:\t000001ffffffffff\n";
        let eff = effective_from_status(status).unwrap();
        assert_eq!(eff, (1 << 21) | (1 << 14));
        assert_eq!(missing(eff, &NODE_REQUIRED), vec![CAP_MKNOD]);
        assert!(missing(eff, &NODE_WANTED).is_empty());
        assert_eq!(missing(0, &NODE_REQUIRED), NODE_REQUIRED.to_vec());
        assert!(missing(u64::MAX, &NODE_REQUIRED).is_empty());
        assert_eq!(effective_from_status("Name:\tx\n"), None);
        assert_eq!(effective_from_status("CapEff:\tzz\n"), None);
    }
}
