//! `node status`: the device-mapper mappings, mounts and loop devices this
//! node's driver owns, and what is stale, read from sysfs, `/dev` and
//! mountinfo (never from libcryptsetup, so it answers while a device hangs).

use std::fmt::Write as _;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{OpsError, printable};
use crate::crypt::MapperName;
use crate::mount::mountinfo;

/// Where to look; the real system by default, a fake tree in tests.
#[derive(Clone, Debug)]
pub struct Roots {
    pub sys: PathBuf,
    pub dev: PathBuf,
    pub mountinfo: PathBuf,
    /// The kubelet's staging directory of this driver: `<root>/<volume>/globalmount`.
    pub staging: Option<PathBuf>,
    /// The local backend's data directory, whose `disks/*.img` the node attaches.
    pub local_data_dir: Option<PathBuf>,
}

#[derive(Debug, Default, Serialize)]
pub struct Status {
    pub mappings: Vec<Mapping>,
    pub mounts: Vec<Mount>,
    pub loop_devices: Vec<LoopDevice>,
    pub staging_paths: Vec<StagingPath>,
    /// One line per stale item; empty when all is well.
    pub stale: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Mapping {
    pub name: String,
    /// `major:minor` of the mapped device.
    pub dev: String,
    /// The block devices under it (below its dm-integrity device, if any).
    pub devices: Vec<String>,
    pub integrity: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stale: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Mount {
    pub mount_point: String,
    pub mapping: String,
    pub fstype: String,
    pub read_only: bool,
}

#[derive(Debug, Serialize)]
pub struct LoopDevice {
    pub device: String,
    pub backing_file: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mapping: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stale: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct StagingPath {
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mapping: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stale: Option<String>,
}

fn read_trim(p: &Path) -> Option<String> {
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim_end_matches('\n').to_string())
}

fn list(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn parse_dev(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// A device-mapper device as sysfs shows it.
struct Dm {
    kernel: String,
    name: String,
    dev: String,
    slaves: Vec<String>,
}

/// Reads everything and judges it.
pub fn status(roots: &Roots) -> Result<Status, OpsError> {
    let block = roots.sys.join("block");
    let dms: Vec<Dm> = list(&block)
        .into_iter()
        .filter(|n| n.starts_with("dm-"))
        .filter_map(|kernel| {
            let dir = block.join(&kernel);
            Some(Dm {
                name: read_trim(&dir.join("dm/name"))?,
                dev: read_trim(&dir.join("dev")).unwrap_or_default(),
                slaves: list(&dir.join("slaves")),
                kernel,
            })
        })
        .collect();
    let mut st = Status::default();
    let loop_backing = |name: &str| read_trim(&block.join(name).join("loop/backing_file"));

    for dm in dms
        .iter()
        .filter(|d| d.name.starts_with(MapperName::PREFIX) && !d.name.ends_with("_dif"))
    {
        let mut integrity = false;
        // Each device under the mapping with its `slaves` link, which dangles
        // once the device is gone.
        let mut devices: Vec<(String, PathBuf)> = Vec::new();
        for slave in &dm.slaves {
            match dms.iter().find(|d| &d.kernel == slave) {
                Some(dif) if dif.name == format!("{}_dif", dm.name) => {
                    integrity = true;
                    let links = block.join(&dif.kernel).join("slaves");
                    devices.extend(dif.slaves.iter().map(|s| (s.clone(), links.join(s))));
                }
                _ => devices.push((
                    slave.clone(),
                    block.join(&dm.kernel).join("slaves").join(slave),
                )),
            }
        }
        let mut stale = None;
        if devices.is_empty() {
            stale = Some("no device under the mapping".to_string());
        }
        for (d, link) in &devices {
            if !link.join("dev").exists() {
                stale = Some(format!("its device {d} is gone"));
            } else if d.starts_with("loop") {
                match loop_backing(d) {
                    Some(b) if b.ends_with(" (deleted)") => {
                        stale = Some(format!(
                            "its loop device {d}'s backing file {} was deleted",
                            b.trim_end_matches(" (deleted)")
                        ))
                    }
                    None => stale = Some(format!("its loop device {d} has no backing file")),
                    Some(_) => {}
                }
            }
        }
        let devices: Vec<String> = devices.iter().map(|(d, _)| format!("/dev/{d}")).collect();
        if let Some(why) = &stale {
            st.stale
                .push(format!("mapping {}: {why}", printable(&dm.name)));
        }
        st.mappings.push(Mapping {
            name: dm.name.clone(),
            dev: dm.dev.clone(),
            devices,
            integrity,
            stale,
        });
    }

    // Device nodes left in /dev/mapper without a device-mapper device behind them.
    for name in list(&roots.dev.join("mapper")) {
        if name.starts_with(MapperName::PREFIX) && !dms.iter().any(|d| d.name == name) {
            st.stale.push(format!(
                "{}: a device node without a device-mapper device",
                roots.dev.join("mapper").join(&name).display()
            ));
        }
    }

    let text = std::fs::read(&roots.mountinfo)
        .map_err(|e| OpsError::Failed(format!("{}: {e}", roots.mountinfo.display())))?;
    let entries = mountinfo::parse(&text).map_err(|e| OpsError::Failed(e.to_string()))?;
    let mapping_of = |major: u32, minor: u32| {
        st.mappings
            .iter()
            .find(|m| parse_dev(&m.dev) == Some((major, minor)))
            .map(|m| m.name.clone())
    };
    let mut mounts = Vec::new();
    for e in &entries {
        let mut owner = mapping_of(e.major, e.minor);
        // A published block volume: the mapper node bind-mounted from devtmpfs.
        if owner.is_none() && e.fstype == "devtmpfs" && e.root != Path::new("/") {
            owner = std::fs::metadata(&e.mount_point)
                .ok()
                .filter(|m| m.file_type().is_block_device())
                .and_then(|m| {
                    mapping_of(
                        nix::sys::stat::major(m.rdev()) as u32,
                        nix::sys::stat::minor(m.rdev()) as u32,
                    )
                });
        }
        if let Some(mapping) = owner {
            mounts.push(Mount {
                mount_point: e.mount_point.display().to_string(),
                mapping,
                fstype: e.fstype.clone(),
                read_only: mountinfo::is_read_only(e),
            });
        } else if e.source.starts_with("/dev/mapper/cryptdisk-") {
            st.stale.push(format!(
                "mount {}: from {}, which is no longer a mapping",
                printable(&e.mount_point.display().to_string()),
                printable(&e.source)
            ));
        }
    }
    st.mounts = mounts;

    let disks = roots.local_data_dir.as_ref().map(|d| d.join("disks"));
    for name in list(&block).into_iter().filter(|n| n.starts_with("loop")) {
        let Some(backing) = loop_backing(&name) else {
            continue;
        };
        let mapping = st
            .mappings
            .iter()
            .find(|m| m.devices.contains(&format!("/dev/{name}")))
            .map(|m| m.name.clone());
        let ours = disks
            .as_ref()
            .is_some_and(|d| Path::new(backing.trim_end_matches(" (deleted)")).starts_with(d));
        if mapping.is_none() && !ours {
            continue;
        }
        let stale = if backing.ends_with(" (deleted)") {
            Some("its backing file was deleted".to_string())
        } else if mapping.is_none() {
            Some("attached, but no mapping is open on it".to_string())
        } else {
            None
        };
        if let Some(why) = &stale {
            st.stale.push(format!(
                "loop device /dev/{name} over {}: {why}",
                printable(&backing)
            ));
        }
        st.loop_devices.push(LoopDevice {
            device: format!("/dev/{name}"),
            backing_file: backing,
            mapping,
            stale,
        });
    }

    if let Some(root) = &roots.staging {
        for volume in list(root) {
            let path = root.join(&volume).join("globalmount");
            if !path.is_dir() {
                continue;
            }
            let resolved = std::fs::canonicalize(&path).unwrap_or(path.clone());
            let mounted = entries.iter().rfind(|e| e.mount_point == resolved);
            let (mapping, stale) = match mounted {
                None => (None, Some("no mapping is mounted here".to_string())),
                Some(e) => match mapping_of(e.major, e.minor) {
                    Some(m) => (Some(m), None),
                    None => (
                        None,
                        Some(format!(
                            "mounted from {}, not from a cryptdisk mapping",
                            printable(&e.source)
                        )),
                    ),
                },
            };
            if let Some(why) = &stale {
                st.stale.push(format!(
                    "staging path {}: {why}",
                    printable(&path.display().to_string())
                ));
            }
            st.staging_paths.push(StagingPath {
                path: path.display().to_string(),
                mapping,
                stale,
            });
        }
    }
    Ok(st)
}

impl Status {
    pub fn outcome(&self) -> Result<(), OpsError> {
        if self.stale.is_empty() {
            Ok(())
        } else {
            Err(OpsError::Stale(format!(
                "{} stale item(s): {}",
                self.stale.len(),
                self.stale.join("; ")
            )))
        }
    }

    pub fn human(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "mappings:");
        for m in &self.mappings {
            let _ = writeln!(
                out,
                "  /dev/mapper/{} ({}) on {}{}{}",
                printable(&m.name),
                m.dev,
                m.devices.join(", "),
                if m.integrity { ", with integrity" } else { "" },
                m.stale
                    .as_ref()
                    .map(|s| format!("  STALE: {s}"))
                    .unwrap_or_default()
            );
        }
        let _ = writeln!(out, "mounts:");
        for m in &self.mounts {
            let _ = writeln!(
                out,
                "  {} ({}{}) from {}",
                printable(&m.mount_point),
                m.fstype,
                if m.read_only { ", ro" } else { "" },
                m.mapping
            );
        }
        let _ = writeln!(out, "loop devices:");
        for l in &self.loop_devices {
            let _ = writeln!(
                out,
                "  {} over {}{}{}",
                l.device,
                printable(&l.backing_file),
                l.mapping
                    .as_ref()
                    .map(|m| format!(" (under {m})"))
                    .unwrap_or_default(),
                l.stale
                    .as_ref()
                    .map(|s| format!("  STALE: {s}"))
                    .unwrap_or_default()
            );
        }
        if !self.staging_paths.is_empty() {
            let _ = writeln!(out, "staging paths:");
            for s in &self.staging_paths {
                let _ = writeln!(
                    out,
                    "  {}{}{}",
                    printable(&s.path),
                    s.mapping
                        .as_ref()
                        .map(|m| format!(" ({m})"))
                        .unwrap_or_default(),
                    s.stale
                        .as_ref()
                        .map(|x| format!("  STALE: {x}"))
                        .unwrap_or_default()
                );
            }
        }
        let _ = writeln!(out, "stale: {}", self.stale.len());
        for s in &self.stale {
            let _ = writeln!(out, "  {s}");
        }
        out
    }
}

/// `node status`: prints what this node's driver holds and exits 6 when
/// something is stale.
pub fn run(args: crate::cli::NodeStatusArgs) -> Result<(), Box<dyn std::error::Error>> {
    let status = status(&Roots {
        sys: args.sys_root,
        dev: args.dev_root,
        mountinfo: args.mountinfo,
        staging: Some(args.staging_root),
        local_data_dir: args.local_data_dir,
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", status.human());
    }
    Ok(status.outcome()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn put(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    /// A fake sysfs, /dev and mountinfo: a healthy mapping on a loop device, one
    /// over a deleted image, one whose disk is gone, a loop device with no
    /// mapping, a leftover /dev/mapper node and a staging path with no mount.
    #[test]
    fn stale_items_are_found_and_healthy_ones_are_not() {
        let t = tempfile::tempdir().unwrap();
        let (sys, dev, data) = (
            t.path().join("sys"),
            t.path().join("dev"),
            t.path().join("data"),
        );
        let block = sys.join("block");
        let dm = |n: u32, name: &str, slave: &str| {
            let d = block.join(format!("dm-{n}"));
            put(&d.join("dm/name"), &format!("{name}\n"));
            put(&d.join("dev"), &format!("253:{n}\n"));
            std::fs::create_dir_all(d.join("slaves")).unwrap();
            symlink(format!("../../{slave}"), d.join("slaves").join(slave)).unwrap();
        };
        let lo = |n: u32, backing: &str| {
            let d = block.join(format!("loop{n}"));
            put(&d.join("dev"), &format!("7:{n}\n"));
            put(&d.join("loop/backing_file"), &format!("{backing}\n"));
        };
        let img = |n: &str| data.join("disks").join(n).display().to_string();
        lo(0, &img("a.img"));
        lo(1, &format!("{} (deleted)", img("b.img")));
        lo(2, &img("c.img"));
        lo(3, "/elsewhere/not-ours.img");
        dm(0, "cryptdisk-aaa", "loop0");
        dm(1, "cryptdisk-bbb", "loop1");
        dm(2, "cryptdisk-ccc", "sdz"); // no sys/block/sdz: the disk is gone
        dm(3, "other-mapping", "loop3");
        put(&dev.join("mapper/cryptdisk-ddd"), "");
        let staging = t.path().join("staging");
        std::fs::create_dir_all(staging.join("a/globalmount")).unwrap();
        std::fs::create_dir_all(staging.join("b/globalmount")).unwrap();
        let a = std::fs::canonicalize(staging.join("a/globalmount")).unwrap();
        let mountinfo = t.path().join("mountinfo");
        put(
            &mountinfo,
            &format!(
                "1 0 8:1 / / rw - ext4 /dev/sda1 rw\n\
                 2 1 253:0 / {} rw,relatime - ext4 /dev/mapper/cryptdisk-aaa rw\n",
                a.display()
            ),
        );
        let st = status(&Roots {
            sys,
            dev,
            mountinfo,
            staging: Some(staging.clone()),
            local_data_dir: Some(data),
        })
        .unwrap();
        let names: Vec<&str> = st.mappings.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["cryptdisk-aaa", "cryptdisk-bbb", "cryptdisk-ccc"]);
        assert_eq!(st.mappings[0].stale, None);
        assert_eq!(st.mappings[0].devices, ["/dev/loop0"]);
        assert!(st.mappings[1].stale.as_ref().unwrap().contains("deleted"));
        assert!(
            st.mappings[2]
                .stale
                .as_ref()
                .unwrap()
                .contains("sdz is gone")
        );
        assert_eq!(st.mounts.len(), 1);
        assert_eq!(st.mounts[0].mapping, "cryptdisk-aaa");
        let loops: Vec<&str> = st.loop_devices.iter().map(|l| l.device.as_str()).collect();
        assert_eq!(loops, ["/dev/loop0", "/dev/loop1", "/dev/loop2"]);
        assert!(
            st.loop_devices[2]
                .stale
                .as_ref()
                .unwrap()
                .contains("no mapping")
        );
        assert_eq!(
            st.staging_paths[0].mapping.as_deref(),
            Some("cryptdisk-aaa")
        );
        assert!(st.staging_paths[1].stale.is_some());
        let all = st.stale.join("\n");
        assert_eq!(st.stale.len(), 6, "{all}");
        assert!(
            all.contains("cryptdisk-ddd: a device node without"),
            "{all}"
        );
        assert!(all.contains("staging path"), "{all}");
        assert_eq!(st.outcome().unwrap_err().exit_code(), 6);
    }
}
