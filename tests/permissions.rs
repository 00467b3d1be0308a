//! Who may talk to the driver and read its files, checked on the real binary:
//! sockets admit their owner and group only, every state file and directory is
//! private to the driver's user, and the node plugin refuses to start without
//! the capabilities it needs (src/privileges.rs lists them).

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{BIN, Process};
use cryptdisk_csi::client;
use cryptdisk_csi::config::Endpoint;
use cryptdisk_csi::proto::csi::controller_client::ControllerClient;
use cryptdisk_csi::proto::csi::volume_capability::{AccessMode, AccessType, MountVolume};
use cryptdisk_csi::proto::csi::{
    CapacityRange, CreateSnapshotRequest, CreateVolumeRequest, VolumeCapability,
};

const NOBODY: libc::uid_t = 65534;

fn start(args: &[String]) -> Process {
    Process::spawn(args, Stdio::null())
}

fn wait_for_socket(path: &Path) {
    common::wait_for_socket(path, None);
}

/// Connects to `path` from a thread that has become user and group `nobody`
/// with no supplementary groups. Linux keeps credentials per thread; the raw
/// syscalls (unlike libc's wrappers) change only this thread's.
fn connect_as_nobody(path: &Path) -> std::io::Result<()> {
    let path = path.to_path_buf();
    std::thread::spawn(move || {
        // SAFETY: plain syscalls on this thread's own credentials.
        unsafe {
            assert_eq!(
                libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()),
                0
            );
            assert_eq!(
                libc::syscall(libc::SYS_setresgid, NOBODY, NOBODY, NOBODY),
                0
            );
            assert_eq!(
                libc::syscall(libc::SYS_setresuid, NOBODY, NOBODY, NOBODY),
                0
            );
        }
        std::os::unix::net::UnixStream::connect(&path).map(drop)
    })
    .join()
    .expect("connecting thread")
}

/// A directory anyone may traverse, so that only the socket's own mode decides.
fn open_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

fn assert_owner_and_group_only(socket: &Path) {
    let meta = std::fs::metadata(socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o660,
        "{}",
        socket.display()
    );
    assert!(std::os::unix::net::UnixStream::connect(socket).is_ok());
    let err = connect_as_nobody(socket).expect_err("nobody connected");
    assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied, "{err}");
    // The check can fail: the same socket opened to everyone admits nobody.
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    connect_as_nobody(socket).expect("nobody, once the socket is world-writable");
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o660)).unwrap();
}

#[test]
fn csi_and_kms_sockets_admit_only_their_owner_and_group() {
    let dir = open_dir();
    let csi = dir.path().join("csi.sock");
    let _controller = start(&[
        "controller".into(),
        format!("--endpoint=unix://{}", csi.display()),
        format!("--data-dir={}", dir.path().join("data").display()),
        "--local-node=n1".into(),
    ]);
    wait_for_socket(&csi);
    assert_owner_and_group_only(&csi);

    let secret = dir.path().join("master.key");
    let salt = dir.path().join("salt");
    for (path, byte) in [(&secret, 1u8), (&salt, 2u8)] {
        std::fs::write(path, [byte; 32]).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let kms = dir.path().join("kms.sock");
    let _kms = start(&[
        "kms".into(),
        format!("--listen=unix://{}", kms.display()),
        "--insecure".into(),
        "--authorizer=none".into(),
        format!("--master-secret-file={}", secret.display()),
        format!("--salt-file={}", salt.display()),
    ]);
    wait_for_socket(&kms);
    assert_owner_and_group_only(&kms);
}

#[test]
fn the_kms_refuses_a_master_secret_others_can_read() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("master.key");
    let salt = dir.path().join("salt");
    std::fs::write(&secret, [1u8; 32]).unwrap();
    std::fs::write(&salt, [2u8; 32]).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::set_permissions(&salt, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = Command::new(BIN)
        .args(["kms", "--insecure"])
        .arg(format!(
            "--listen=unix://{}",
            dir.path().join("k.sock").display()
        ))
        .arg(format!("--master-secret-file={}", secret.display()))
        .arg(format!("--salt-file={}", salt.display()))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("master.key") && stderr.contains("644"),
        "{stderr}"
    );
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if std::fs::symlink_metadata(&path).unwrap().is_dir() {
            walk(&path, out);
        }
        out.push(path);
    }
}

#[tokio::test]
async fn every_state_file_and_directory_is_private() {
    let dir = open_dir();
    let data = dir.path().join("data");
    let socket = dir.path().join("csi.sock");
    let _dev = start(&[
        "dev".into(),
        format!("--endpoint=unix://{}", socket.display()),
        format!("--data-dir={}", data.display()),
        "--node-id=n1".into(),
    ]);
    wait_for_socket(&socket);
    let channel = client::connect(&Endpoint::Unix(socket.clone()), Duration::from_secs(5))
        .await
        .unwrap();
    let mut controller = ControllerClient::new(channel);
    let volume = controller
        .create_volume(CreateVolumeRequest {
            name: "pvc-private".into(),
            capacity_range: Some(CapacityRange {
                required_bytes: 32 << 20,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![VolumeCapability {
                access_mode: Some(AccessMode { mode: 1 }),
                access_type: Some(AccessType::Mount(MountVolume::default())),
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    controller
        .create_snapshot(CreateSnapshotRequest {
            source_volume_id: volume.volume_id,
            name: "snap-private".into(),
            ..Default::default()
        })
        .await
        .unwrap();

    let mut paths = vec![data.clone()];
    walk(&data, &mut paths);
    let names: Vec<String> = paths
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    // The walk saw what it must judge: the image, the snapshot, the index and
    // the embedded KMS's secrets.
    for wanted in [".img", "master.key", "salt"] {
        assert!(
            names.iter().any(|n| n.ends_with(wanted)),
            "no {wanted} in {names:?}"
        );
    }
    assert!(paths.len() >= 6, "{paths:?}");
    for path in &paths {
        let mode = std::fs::symlink_metadata(path)
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode & 0o077, 0, "{} has mode {mode:o}", path.display());
    }
}

#[test]
fn the_node_plugin_refuses_to_start_without_its_capabilities() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("node.sock");
    // setpriv (util-linux) drops the capabilities from the bounding set, so
    // root's execve of the driver does not get them back.
    let node_without = |caps: &str| {
        let mut cmd = Command::new("setpriv");
        cmd.arg(format!("--bounding-set={caps}"))
            .args(["--inh-caps=-all", "--"])
            .arg(BIN)
            .arg("node")
            .arg(format!("--endpoint=unix://{}", socket.display()))
            .arg(format!(
                "--kms=unix://{}",
                dir.path().join("kms.sock").display()
            ))
            .arg("--node-id=n1");
        cmd
    };
    let out = node_without("-sys_admin,-mknod")
        .output()
        .expect("run setpriv");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("CAP_SYS_ADMIN, CAP_MKNOD") && stderr.contains("privileged"),
        "{stderr}"
    );
    assert!(!socket.exists(), "it served before checking");

    // Without CAP_IPC_LOCK alone it starts, with a warning.
    let mut child = node_without("-ipc_lock")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_socket(&socket);
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("CAP_IPC_LOCK") && stderr.contains("swapped out"),
        "{stderr}"
    );
}

/// The processes that hold keys are not dumpable: run as `nobody`, the KMS's
/// `/proc/<pid>` files belong to root (the kernel's sign of a non-dumpable
/// process), so neither `nobody` nor a core dump can read its memory.
#[test]
fn the_kms_holding_keys_is_not_dumpable() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let (secret, salt, socket) = (
        dir.path().join("master.key"),
        dir.path().join("salt"),
        dir.path().join("kms.sock"),
    );
    for (path, byte) in [(&secret, 1u8), (&salt, 2u8)] {
        std::fs::write(path, [byte; 32]).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::chown(path, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    std::os::unix::fs::chown(dir.path(), Some(NOBODY), Some(NOBODY)).unwrap();
    let child = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(BIN)
        .arg("kms")
        .arg(format!("--listen=unix://{}", socket.display()))
        .arg("--insecure")
        .arg("--authorizer=none")
        .arg(format!("--master-secret-file={}", secret.display()))
        .arg(format!("--salt-file={}", salt.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run setpriv");
    let pid = child.id();
    let _kms = Process(child);
    wait_for_socket(&socket);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("Uid:") && l.contains("65534")),
        "{status}"
    );
    let owner = std::fs::metadata(format!("/proc/{pid}/environ"))
        .unwrap()
        .uid();
    assert_eq!(
        owner, 0,
        "the KMS is dumpable: /proc/{pid} belongs to its user"
    );
}
