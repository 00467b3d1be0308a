//! The real binary serving CSI Identity over a unix socket: info, capabilities,
//! probe, socket handling and graceful shutdown.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::BIN;
use cryptdisk_csi::client;
use cryptdisk_csi::config::Endpoint;
use cryptdisk_csi::proto::csi::identity_client::IdentityClient;
use cryptdisk_csi::proto::csi::plugin_capability;
use cryptdisk_csi::proto::csi::{GetPluginCapabilitiesRequest, GetPluginInfoRequest, ProbeRequest};

struct Plugin {
    child: Child,
    socket: PathBuf,
}

impl Plugin {
    fn start(mode: &str, socket: &Path, extra: &[&str]) -> Plugin {
        let child = Command::new(BIN)
            .arg(mode)
            .arg(format!("--endpoint=unix://{}", socket.display()))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start cryptdisk-csi");
        let plugin = Plugin {
            child,
            socket: socket.to_path_buf(),
        };
        plugin.wait_for_socket();
        plugin
    }

    fn wait_for_socket(&self) {
        common::wait_for_socket(&self.socket, None);
    }

    fn endpoint(&self) -> Endpoint {
        Endpoint::Unix(self.socket.clone())
    }

    fn terminate(mut self) -> std::process::Output {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let child = std::mem::replace(&mut self.child, Command::new("true").spawn().unwrap());
        child.wait_with_output().unwrap()
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What every instance reports, whichever services it serves: the spec's "grand
/// sum" of the plugin's capabilities.
const WHOLE_PLUGIN: [i32; 2] = [
    plugin_capability::service::Type::ControllerService as i32,
    plugin_capability::service::Type::VolumeAccessibilityConstraints as i32,
];

async fn plugin_services(identity: &mut IdentityClient<tonic::transport::Channel>) -> Vec<i32> {
    identity
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(plugin_capability::Type::Service(s)) => Some(s.r#type),
            _ => None,
        })
        .collect()
}

// Multi-threaded so that the client's connection task keeps answering the
// server's shutdown handshake (GOAWAY, ping) while this thread waits for the exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_over_a_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("csi.sock");
    let data_dir = format!("--data-dir={}", dir.path().join("data").display());
    let plugin = Plugin::start(
        "controller",
        &socket,
        &["--driver-name=test.cryptdisk.io", &data_dir],
    );
    let channel = client::connect(&plugin.endpoint(), Duration::from_secs(5))
        .await
        .unwrap();
    let mut identity = IdentityClient::new(channel);

    let info = identity
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "test.cryptdisk.io");
    assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));

    assert_eq!(plugin_services(&mut identity).await, WHOLE_PLUGIN);

    let probe = identity.probe(ProbeRequest {}).await.unwrap().into_inner();
    assert_eq!(probe.ready, Some(true));

    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "socket mode");

    // SIGTERM with the client's connection still open: a prompt, clean exit.
    let started = Instant::now();
    let out = plugin.terminate();
    assert!(out.status.success(), "exit after SIGTERM: {:?}", out.status);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "shutdown took {:?} with an idle client connection",
        started.elapsed()
    );
    drop(identity);
    assert!(!socket.exists(), "socket file left behind after shutdown");
}

#[tokio::test]
async fn a_live_socket_is_not_taken_over_and_a_stale_one_is() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("csi.sock");
    let first = Plugin::start(
        "node",
        &socket,
        &["--node-id=n1", "--kms=tcp://127.0.0.1:9", "--kms-insecure"],
    );

    let second = Command::new(BIN)
        .args([
            "node",
            "--node-id=n1",
            "--kms=tcp://127.0.0.1:9",
            "--kms-insecure",
        ])
        .arg(format!("--endpoint=unix://{}", socket.display()))
        .output()
        .unwrap();
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("another server is listening"), "{stderr}");
    // The first server still answers, and a node plugin reports the plugin's
    // capabilities as the controller does (csi-sanity skipped its node
    // lifecycle tests against a separate node socket when it did not).
    let channel = client::connect(&first.endpoint(), Duration::from_secs(5))
        .await
        .unwrap();
    let mut identity = IdentityClient::new(channel);
    identity.probe(ProbeRequest {}).await.unwrap();
    assert_eq!(plugin_services(&mut identity).await, WHOLE_PLUGIN);

    // A killed server leaves a stale socket file; the next start replaces it.
    drop(first);
    assert!(socket.exists());
    let third = Plugin::start(
        "node",
        &socket,
        &["--node-id=n1", "--kms=tcp://127.0.0.1:9", "--kms-insecure"],
    );
    let channel = client::connect(&third.endpoint(), Duration::from_secs(5))
        .await
        .unwrap();
    IdentityClient::new(channel)
        .probe(ProbeRequest {})
        .await
        .unwrap();
}

#[test]
fn bad_flags_get_clear_errors() {
    let run = |args: &[&str]| {
        let out = Command::new(BIN).args(args).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&[
        "node",
        "--kms=tcp://127.0.0.1:9",
        "--kms-insecure",
        "--endpoint=/no/scheme.sock",
    ]);
    assert_eq!(code, Some(2));
    assert!(err.contains("expected unix:///path/to/socket"), "{err}");
    let (code, err) = run(&["controller", "--driver-name=-bad-"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("at most 63 characters"), "{err}");
    let (code, err) = run(&[
        "--log-level=loud",
        "node",
        "--kms=tcp://127.0.0.1:9",
        "--kms-insecure",
    ]);
    assert_ne!(code, Some(0));
    assert!(err.contains("log level"), "{err}");
}

#[test]
fn every_flag_reads_its_environment_variable() {
    let out = Command::new(BIN).args(["node", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for var in [
        "CRYPTDISK_ENDPOINT",
        "CRYPTDISK_DRIVER_NAME",
        "CRYPTDISK_NODE_ID",
        "CRYPTDISK_KMS",
        "CRYPTDISK_LOCAL_DATA_DIR",
        "CRYPTDISK_LOG_FORMAT",
        "CRYPTDISK_LOG_LEVEL",
    ] {
        assert!(
            help.contains(var),
            "node --help does not name {var}:\n{help}"
        );
    }
    // And the variable is honoured: a bad endpoint from the environment is refused.
    let out = Command::new(BIN)
        .args(["node", "--kms=tcp://127.0.0.1:9", "--kms-insecure"])
        .env("CRYPTDISK_ENDPOINT", "bogus")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"bogus\""));
}

/// One HTTP/1.0 GET against the metrics server: (status line, body).
fn http_get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").unwrap_or((&reply, ""));
    (
        head.lines().next().unwrap_or_default().to_string(),
        body.to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_every_rpc_by_method_and_code() {
    use cryptdisk_csi::proto::csi::ControllerGetVolumeRequest;
    use cryptdisk_csi::proto::csi::controller_client::ControllerClient;

    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("csi.sock");
    let addr = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    let plugin = Plugin::start(
        "controller",
        &socket,
        &[
            &format!("--data-dir={}", dir.path().join("data").display()),
            &format!("--metrics-address={addr}"),
        ],
    );
    let channel = client::connect(&plugin.endpoint(), Duration::from_secs(5))
        .await
        .unwrap();
    let mut identity = IdentityClient::new(channel.clone());
    for _ in 0..2 {
        identity
            .get_plugin_info(GetPluginInfoRequest {})
            .await
            .unwrap();
    }
    let missing = ControllerClient::new(channel)
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: "fake-volume".into(),
        })
        .await;
    assert_eq!(missing.unwrap_err().code(), tonic::Code::NotFound);

    let (status, body) = http_get(addr, "/metrics");
    assert!(status.contains("200"), "{status}");
    for want in [
        r#"cryptdisk_rpc_requests_total{method="GetPluginInfo",code="Ok"} 2"#,
        r#"cryptdisk_rpc_requests_total{method="ControllerGetVolume",code="NotFound"} 1"#,
        r#"cryptdisk_rpc_duration_seconds_count{method="GetPluginInfo"} 2"#,
        "cryptdisk_active_mappings ",
    ] {
        assert!(body.contains(want), "{want} missing from\n{body}");
    }
    let (status, body) = http_get(addr, "/healthz");
    assert!(
        status.contains("200") && body == "ok\n",
        "{status} {body:?}"
    );
    let (status, _) = http_get(addr, "/other");
    assert!(status.contains("404"), "{status}");
}
