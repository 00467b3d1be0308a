//! Clients of other gRPC implementations over our unix sockets. gRPC C-core
//! (here Python's grpcio, with its default channel) sends the socket's path,
//! percent-encoded, as the HTTP/2 `:authority`, which h2 alone refuses with
//! RST_STREAM PROTOCOL_ERROR; Go clients send `localhost`. Both must be served on
//! the CSI socket (`dev`) and on a plaintext KMS's socket.
//!
//! Needs python3 with grpcio ≥ 1.57 (hack/deps installs it); the calls are made
//! with `channel.unary_unary` on hand-encoded protobuf, so no generated stubs.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::Process;

const KEY_ID: &str = "6f2a7c54-2d39-4c4e-9b0e-1a3d5f7b9c11";

fn start(args: &[String], socket: &Path, log: &Path) -> Process {
    let server = Process::spawn(args, std::fs::File::create(log).unwrap());
    common::wait_for_socket(socket, Some(log));
    server
}

/// Calls `method` on `socket` with grpcio's default channel and `request` (hex
/// of the protobuf bytes); returns the response's bytes, or the failure grpcio
/// reports.
fn python_call(socket: &Path, method: &str, request: &[u8]) -> Result<Vec<u8>, String> {
    const SCRIPT: &str = r#"
import sys, grpc
socket, method, request = sys.argv[1], sys.argv[2], bytes.fromhex(sys.argv[3])
with grpc.insecure_channel("unix:" + socket) as channel:
    call = channel.unary_unary(method)
    try:
        sys.stdout.write(call(request, timeout=10).hex())
    except grpc.RpcError as e:
        sys.stderr.write("%s: %s" % (e.code(), e.details()))
        sys.exit(1)
"#;
    let out = Command::new("python3")
        .args(["-c", SCRIPT])
        .arg(socket)
        .arg(method)
        .arg(hex::encode(request))
        .output()
        .expect("python3 (run hack/deps)");
    if out.status.success() {
        Ok(hex::decode(String::from_utf8(out.stdout).unwrap().trim()).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// grpcio must be there and new enough to send the path as its authority
/// (1.57 and later; earlier ones sent `localhost`, as Go does).
fn require_grpcio() {
    let out = Command::new("python3")
        .args([
            "-c",
            "import grpc; v = tuple(int(x) for x in grpc.__version__.split('.')[:2]); \
             assert v >= (1, 57), grpc.__version__; print(grpc.__version__)",
        ])
        .output()
        .expect("python3 (run hack/deps)");
    assert!(
        out.status.success(),
        "python3 with grpcio >= 1.57 is needed (hack/deps installs it): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A protobuf string field.
fn string_field(number: u8, value: &str) -> Vec<u8> {
    assert!(value.len() < 128);
    let mut out = vec![number << 3 | 2, value.len() as u8];
    out.extend_from_slice(value.as_bytes());
    out
}

#[test]
fn python_grpcio_reaches_the_csi_socket() {
    require_grpcio();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("csi.sock");
    let _dev = start(
        &[
            "dev".into(),
            format!("--endpoint=unix://{}", socket.display()),
            format!("--data-dir={}", dir.path().join("data").display()),
            "--node-id=n1".into(),
            "--driver-name=python.cryptdisk.io".into(),
        ],
        &socket,
        &dir.path().join("dev.log"),
    );
    // GetPluginInfoRequest is empty; the response's field 1 is the name.
    let info = python_call(&socket, "/csi.v1.Identity/GetPluginInfo", &[]).unwrap();
    assert!(
        info.starts_with(&string_field(1, "python.cryptdisk.io")),
        "{info:x?}"
    );
    // A second call on a fresh channel, and Probe: the same.
    let probe = python_call(&socket, "/csi.v1.Identity/Probe", &[]).unwrap();
    // ProbeResponse { ready: BoolValue { value: true } }
    assert_eq!(probe, [0x0a, 0x02, 0x08, 0x01]);
}

fn secret_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

#[test]
fn python_grpcio_reaches_a_kms_socket() {
    require_grpcio();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("kms.sock");
    let _kms = start(
        &[
            "kms".into(),
            format!("--listen=unix://{}", socket.display()),
            "--insecure".into(),
            // The Python client speaks Constellation's GetDataKey (v1).
            "--authorizer=none".into(),
            "--allow-v1-keys".into(),
            format!(
                "--master-secret-file={}",
                secret_file(dir.path(), "master.key", &[3; 32]).display()
            ),
            format!(
                "--salt-file={}",
                secret_file(dir.path(), "salt", &[4; 32]).display()
            ),
        ],
        &socket,
        &dir.path().join("kms.log"),
    );
    // GetDataKeyRequest { data_key_id: KEY_ID, length: 32 }
    let mut request = string_field(1, KEY_ID);
    request.extend([2 << 3, 32]);
    let response = python_call(&socket, "/kms.API/GetDataKey", &request).unwrap();
    let want = cryptdisk_csi::kms::derive_data_key(&[3; 32], &[4; 32], KEY_ID, 32).unwrap();
    let mut expected = vec![0x0a, 32];
    expected.extend_from_slice(want.expose());
    assert_eq!(response, expected);

    // A bad request still gets its proper gRPC error, not a protocol error.
    let err = python_call(&socket, "/kms.API/GetDataKey", &[2 << 3, 32]).unwrap_err();
    assert!(err.contains("INVALID_ARGUMENT"), "{err}");
}
