//! What is mounted where, as the kernel reports it in `/proc/self/mountinfo`
//! (proc(5)).
//!
//! mountinfo rather than `/proc/mounts` because it carries the device number, the
//! root of a bind mount within its filesystem, and the per-mount options apart
//! from the superblock's: a read-only bind of a writable filesystem shows `ro` only
//! in the former, a filesystem the kernel remounted read-only after an error only
//! in the latter.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use super::{Error, Result};

/// The mount table of this process's mount namespace.
pub const MOUNTINFO: &str = "/proc/self/mountinfo";

/// One line of mountinfo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_id: u32,
    pub parent_id: u32,
    /// The device of the mounted filesystem: for a block filesystem the device it
    /// was mounted from; for a bind of a device node, the filesystem holding the
    /// node (devtmpfs), not the device itself.
    pub major: u32,
    pub minor: u32,
    /// The directory (or file) of the filesystem mounted here: `/` for a plain
    /// mount, the source's path within its filesystem for a bind mount.
    pub root: PathBuf,
    /// Where it is mounted, as seen from this process's root.
    pub mount_point: PathBuf,
    /// Per-mount options (`rw`/`ro`, `noatime`, `nosuid`, ...).
    pub options: Vec<String>,
    /// Propagation and other tagged fields: `shared:N`, `master:N`, `unbindable`.
    pub optional_fields: Vec<String>,
    pub fstype: String,
    /// What was mounted: a device path, or a name such as `tmpfs` or `none`.
    pub source: String,
    /// Options of the filesystem (superblock), shared by all its mounts.
    pub super_options: Vec<String>,
}

/// Reads this process's mount table.
pub fn mounts() -> Result<Vec<MountEntry>> {
    parse(&read_consistent(Path::new(MOUNTINFO))?)
}

/// The mount at `target`, or `None` when nothing is mounted there. When mounts are
/// stacked on one mount point, the last one is on top (the one a path lookup
/// reaches), and that is the one returned.
///
/// `target` is resolved through symlinks first, because mountinfo shows resolved
/// paths; a target that cannot be resolved (missing, or a dead mount) is compared
/// as given, made absolute.
pub fn find_mount(target: &Path) -> Result<Option<MountEntry>> {
    let wanted = resolve(target)?;
    Ok(mounts()?.into_iter().rfind(|m| m.mount_point == wanted))
}

/// Whether writes through this mount fail: the mount itself is read-only, or its
/// filesystem is (as after `errors=remount-ro` fired).
pub fn is_read_only(entry: &MountEntry) -> bool {
    let ro = |opts: &[String]| opts.iter().any(|o| o == "ro");
    ro(&entry.options) || ro(&entry.super_options)
}

fn resolve(target: &Path) -> Result<PathBuf> {
    match std::fs::canonicalize(target) {
        Ok(p) => Ok(p),
        Err(_) => std::path::absolute(target).map_err(Error::io("resolve", target.display())),
    }
}

/// Reads `path` until two reads in a row agree. The kernel produces mountinfo a
/// page at a time, so a file read while mounts change can mix two states (a mount
/// missing or listed twice); a few rereads settle it.
fn read_consistent(path: &Path) -> Result<Vec<u8>> {
    const ATTEMPTS: usize = 3;
    let read = || std::fs::read(path).map_err(Error::io("read", path.display()));
    let mut previous = read()?;
    for _ in 1..ATTEMPTS {
        let current = read()?;
        if current == previous {
            return Ok(current);
        }
        previous = current;
    }
    // Still changing: the last read is as good as any.
    Ok(previous)
}

/// Parses mountinfo text, one entry per non-empty line:
///
/// ```text
/// 36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue
/// (1)(2) (3)   (4)     (5)        (6)       (7)    (8) (9)    (10)        (11)
/// ```
///
/// Paths and names have space, tab, newline and backslash escaped as `\ooo`.
pub fn parse(text: &[u8]) -> Result<Vec<MountEntry>> {
    text.split(|&b| b == b'\n')
        .enumerate()
        .filter(|(_, line)| !line.is_empty())
        .map(|(i, line)| parse_line(i + 1, line))
        .collect()
}

fn parse_line(line_no: usize, line: &[u8]) -> Result<MountEntry> {
    let bad = |expected: &'static str| Error::BadMountInfo {
        line: line_no,
        expected,
        found: String::from_utf8_lossy(line).into_owned(),
    };
    // Fields are separated by single spaces; a literal space inside one is
    // escaped, so an empty field (two spaces) is a real, empty value.
    let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
    let number = |i: usize, what: &'static str| -> Result<u32> {
        std::str::from_utf8(fields.get(i).ok_or_else(|| bad(what))?)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad(what))
    };
    let mount_id = number(0, "a mount id as field 1")?;
    let parent_id = number(1, "a parent mount id as field 2")?;
    let (major, minor) = fields
        .get(2)
        .and_then(|f| std::str::from_utf8(f).ok())
        .and_then(|f| f.split_once(':'))
        .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
        .ok_or_else(|| bad("major:minor as field 3"))?;
    let root = fields.get(3).ok_or_else(|| bad("a root as field 4"))?;
    let mount_point = fields
        .get(4)
        .ok_or_else(|| bad("a mount point as field 5"))?;
    let options = fields
        .get(5)
        .ok_or_else(|| bad("mount options as field 6"))?;
    let separator = fields
        .iter()
        .skip(6)
        .position(|f| *f == b"-")
        .map(|p| p + 6)
        .ok_or_else(|| bad("a '-' after the optional fields"))?;
    let fstype = fields
        .get(separator + 1)
        .ok_or_else(|| bad("a filesystem type after '-'"))?;
    let source = fields
        .get(separator + 2)
        .ok_or_else(|| bad("a mount source after the filesystem type"))?;
    // Always present from the kernel; tolerated missing in hand-written text.
    let super_options = fields.get(separator + 3).copied().unwrap_or(b"");

    Ok(MountEntry {
        mount_id,
        parent_id,
        major,
        minor,
        root: path(root),
        mount_point: path(mount_point),
        options: list(options),
        optional_fields: fields[6..separator].iter().map(|f| string(f)).collect(),
        fstype: string(fstype),
        source: string(source),
        super_options: list(super_options),
    })
}

/// A path field, decoded byte for byte: paths need not be UTF-8.
fn path(field: &[u8]) -> PathBuf {
    PathBuf::from(OsString::from_vec(unescape(field)))
}

fn string(field: &[u8]) -> String {
    String::from_utf8_lossy(&unescape(field)).into_owned()
}

/// A comma-separated option list. The kernel escapes a comma inside an option's
/// value (`\054`), so splitting comes before decoding.
fn list(field: &[u8]) -> Vec<String> {
    field
        .split(|&b| b == b',')
        .filter(|o| !o.is_empty())
        .map(string)
        .collect()
}

/// Decodes the kernel's `\ooo` octal escapes; a backslash not followed by three
/// octal digits that fit a byte is kept as it is.
fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        if field[i] == b'\\'
            && let Some(byte) = field.get(i + 1..i + 4).and_then(octal_byte)
        {
            out.push(byte);
            i += 4;
        } else {
            out.push(field[i]);
            i += 1;
        }
    }
    out
}

fn octal_byte(digits: &[u8]) -> Option<u8> {
    digits
        .iter()
        .try_fold(0u16, |acc, &d| {
            (b'0'..=b'7')
                .contains(&d)
                .then(|| acc * 8 + u16::from(d - b'0'))
        })?
        .try_into()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro
23 22 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
24 22 0:5 / /dev rw,nosuid,relatime shared:2 - devtmpfs udev rw,size=4006000k,nr_inodes=1001500,mode=755
40 22 254:16 / /var/lib/kubelet/plugins/staging/pv\\040one rw,noatime shared:30 - ext4 /dev/mapper/cryptdisk-abc rw,nodiscard
41 22 254:16 / /var/lib/kubelet/pods/p1/volumes/pv\\040one/mount ro,noatime shared:30 - ext4 /dev/mapper/cryptdisk-abc rw,nodiscard
42 22 0:5 /vdb /var/lib/kubelet/pods/p2/volumeDevices/dev1 rw,nosuid,relatime shared:2 - devtmpfs udev rw,size=4006000k
43 22 0:30 / /tmp/stack rw shared:40 - tmpfs tmpfs rw
44 43 254:32 / /tmp/stack rw,relatime - xfs /dev/vdc rw,attr2,inode64
45 22 254:48 / /mnt/tab\\011and\\012newline\\134back rw master:7 propagate_from:2 unbindable - ext4 /dev/vdd ro,errors=remount-ro
";

    #[test]
    fn parses_every_field() {
        let m = parse(SAMPLE.as_bytes()).unwrap();
        assert_eq!(m.len(), 9);
        assert_eq!(
            m[0],
            MountEntry {
                mount_id: 22,
                parent_id: 1,
                major: 8,
                minor: 1,
                root: "/".into(),
                mount_point: "/".into(),
                options: vec!["rw".into(), "relatime".into()],
                optional_fields: vec!["shared:1".into()],
                fstype: "ext4".into(),
                source: "/dev/sda1".into(),
                super_options: vec!["rw".into(), "errors=remount-ro".into()],
            }
        );
        assert_eq!(
            m[2].super_options,
            ["rw", "size=4006000k", "nr_inodes=1001500", "mode=755"]
        );
        assert_eq!((m[3].major, m[3].minor), (254, 16));
    }

    #[test]
    fn decodes_octal_escapes_in_paths() {
        let m = parse(SAMPLE.as_bytes()).unwrap();
        assert_eq!(
            m[3].mount_point,
            Path::new("/var/lib/kubelet/plugins/staging/pv one")
        );
        assert_eq!(m[8].mount_point, Path::new("/mnt/tab\tand\nnewline\\back"));
        // Non-UTF-8 bytes survive in paths.
        let raw = b"1 0 0:1 / /mnt/\\377x rw - tmpfs none rw\n";
        let m = parse(raw).unwrap();
        assert_eq!(
            m[0].mount_point.as_os_str().as_encoded_bytes(),
            b"/mnt/\xffx"
        );
    }

    #[test]
    fn keeps_malformed_escapes_literally() {
        assert_eq!(unescape(b"a\\040b"), b"a b");
        assert_eq!(unescape(b"a\\04"), b"a\\04");
        assert_eq!(unescape(b"a\\09x"), b"a\\09x");
        assert_eq!(unescape(b"a\\400"), b"a\\400", "does not fit a byte");
        assert_eq!(unescape(b"\\\\134"), b"\\\\");
        assert_eq!(unescape(b"end\\"), b"end\\");
    }

    #[test]
    fn reads_any_number_of_optional_fields() {
        let m = parse(SAMPLE.as_bytes()).unwrap();
        assert_eq!(
            m[8].optional_fields,
            ["master:7", "propagate_from:2", "unbindable"]
        );
        assert!(m[5].optional_fields == ["shared:2"]);
        let none = parse(b"44 43 254:32 / /x rw - xfs /dev/vdc rw\n").unwrap();
        assert!(none[0].optional_fields.is_empty());
        assert_eq!(none[0].fstype, "xfs");
    }

    #[test]
    fn a_bind_mount_of_a_file_shows_its_root_within_the_filesystem() {
        let m = parse(SAMPLE.as_bytes()).unwrap();
        let bind = &m[5];
        assert_eq!(bind.root, Path::new("/vdb"));
        assert_eq!(
            bind.mount_point,
            Path::new("/var/lib/kubelet/pods/p2/volumeDevices/dev1")
        );
        assert_eq!(bind.fstype, "devtmpfs");
        assert_eq!((bind.major, bind.minor), (0, 5));
    }

    #[test]
    fn read_only_comes_from_the_mount_or_the_superblock() {
        let m = parse(SAMPLE.as_bytes()).unwrap();
        assert!(!is_read_only(&m[3]), "rw bind of rw filesystem");
        assert!(is_read_only(&m[4]), "ro bind of a rw filesystem");
        assert!(is_read_only(&m[8]), "rw mount of a filesystem gone ro");
    }

    #[test]
    fn the_last_of_stacked_mounts_is_on_top() {
        let m = parse(SAMPLE.as_bytes()).unwrap();
        let top = m
            .into_iter()
            .rfind(|e| e.mount_point == Path::new("/tmp/stack"))
            .unwrap();
        assert_eq!(top.fstype, "xfs");
        assert_eq!(top.mount_id, 44);
    }

    #[test]
    fn an_empty_source_is_a_field_not_a_gap() {
        let m = parse(b"50 22 0:40 / /e rw shared:3 - tmpfs  rw,size=1k\n").unwrap();
        assert_eq!(m[0].source, "");
        assert_eq!(m[0].super_options, ["rw", "size=1k"]);
    }

    #[test]
    fn an_escaped_comma_stays_inside_its_option() {
        let m = parse(b"51 22 0:41 / /o rw - overlay overlay rw,lowerdir=/a\\054b,upperdir=/u\n")
            .unwrap();
        assert_eq!(m[0].super_options, ["rw", "lowerdir=/a,b", "upperdir=/u"]);
    }

    #[test]
    fn malformed_lines_are_refused_with_the_line_number() {
        for (text, expected) in [
            ("x 1 8:1 / / rw - ext4 /dev/sda1 rw", "mount id"),
            ("22 1 8-1 / / rw - ext4 /dev/sda1 rw", "major:minor"),
            ("22 1 8:1 / / rw shared:1 ext4 /dev/sda1 rw", "'-'"),
            ("22 1 8:1 / / rw -", "filesystem type"),
            ("22 1 8:1", "root"),
        ] {
            let text = format!("23 22 0:21 / /proc rw - proc proc rw\n{text}\n");
            let err = parse(text.as_bytes()).unwrap_err();
            assert!(
                matches!(err, Error::BadMountInfo { line: 2, .. }),
                "{text}: {err}"
            );
            let msg = err.to_string();
            assert!(msg.contains(expected), "{msg}");
            assert!(msg.contains("line 2"), "{msg}");
        }
    }

    #[test]
    fn this_process_has_a_root_mount() {
        let all = mounts().unwrap();
        assert!(all.iter().any(|m| m.mount_point == Path::new("/")));
        let root = find_mount(Path::new("/")).unwrap().expect("/ is mounted");
        assert_eq!(root.mount_point, Path::new("/"));
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(find_mount(dir.path()).unwrap(), None);
        assert_eq!(find_mount(&dir.path().join("missing")).unwrap(), None);
    }
}
