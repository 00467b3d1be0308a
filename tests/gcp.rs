//! The real binary with the gcp backend and `--cloud gcp`: project, zone, node
//! id, topology and attach limit from a fake metadata server (reached through
//! GCE_METADATA_HOST), Application Default Credentials from that server's token
//! endpoint, and Compute calls to a fake (CRYPTDISK_GCP_COMPUTE_ENDPOINT)
//! carrying that token.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cryptdisk_csi::client;
use cryptdisk_csi::config::Endpoint;
use cryptdisk_csi::proto::csi::controller_client::ControllerClient;
use cryptdisk_csi::proto::csi::node_client::NodeClient;
use cryptdisk_csi::proto::csi::{ListVolumesRequest, NodeGetInfoRequest};
use cryptdisk_csi::test_http::{self, Answer, Exchange};

const BIN: &str = env!("CARGO_BIN_EXE_cryptdisk-csi");

/// Requests the fake saw: method, path, and the Authorization header.
type Log = Arc<Mutex<Vec<(String, String, String)>>>;

/// One fake for both the metadata server and Compute (they differ by path).
async fn fake() -> (String, Log) {
    let log: Log = Arc::default();
    let seen = log.clone();
    let base = test_http::serve(move |_| {
        move |x: Exchange| {
            let path = x.path.clone();
            seen.lock().unwrap().push((
                x.method.clone(),
                path.clone(),
                x.header("authorization").to_string(),
            ));
            let metadata = path.starts_with("/computeMetadata/v1/");
            let (status, body) = if metadata && x.header("metadata-flavor") != "Google" {
                (403, "Missing Metadata-Flavor header".to_string())
            } else {
                match path.as_str() {
                    "/computeMetadata/v1/project/project-id" => (200, "meta-project".into()),
                    "/computeMetadata/v1/instance/zone" => {
                        (200, "projects/1234/zones/us-central1-f".into())
                    }
                    "/computeMetadata/v1/instance/name" => (200, "vm-7".into()),
                    "/computeMetadata/v1/instance/machine-type" => {
                        (200, "projects/1234/machineTypes/e2-medium".into())
                    }
                    "/computeMetadata/v1/universe/universe-domain" => {
                        (200, "googleapis.com".into())
                    }
                    "/computeMetadata/v1/instance/service-accounts/default/token" => (
                        200,
                        r#"{"access_token":"tok-from-metadata","expires_in":3599,"token_type":"Bearer"}"#
                            .into(),
                    ),
                    p if p.starts_with("/compute/v1/projects/") && p.ends_with("/aggregated/disks") => {
                        if authorised(x.header("authorization")) {
                            (200, r#"{"kind":"compute#diskAggregatedList","items":{}}"#.into())
                        } else {
                            (401, r#"{"error":{"code":401,"message":"Request is missing required authentication credential.","errors":[{"reason":"required"}]}}"#.into())
                        }
                    }
                    _ => (404, r#"{"error":{"code":404,"message":"not found"}}"#.into()),
                }
            };
            Answer {
                status,
                headers: vec![],
                body: body.into_bytes(),
            }
        }
    })
    .await;
    (base.trim_start_matches("http://").to_string(), log)
}

/// The metadata server's token, or a self-signed JWT of the fixture key.
fn authorised(header: &str) -> bool {
    use base64::Engine as _;
    let Some(token) = header.strip_prefix("Bearer ") else {
        return false;
    };
    if token == "tok-from-metadata" {
        return true;
    }
    let parts: Vec<&str> = token.split('.').collect();
    let decode = |p: &str| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(p)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
    };
    match (
        parts.as_slice(),
        parts.first().and_then(|h| decode(h)),
        parts.get(1).and_then(|c| decode(c)),
    ) {
        ([_, _, sig], Some(head), Some(claims)) => {
            head["alg"] == "RS256"
                && head["kid"] == "fixture-key-id"
                && claims["iss"] == "csi@test-project.iam.gserviceaccount.com"
                && sig.len() > 300
        }
        _ => false,
    }
}

struct Plugin {
    child: Child,
    socket: PathBuf,
}

impl Plugin {
    fn start(args: &[&str], socket: &Path, home: &Path, host: &str) -> Plugin {
        Self::start_with(args, socket, home, host, &[])
    }

    fn start_with(
        args: &[&str],
        socket: &Path,
        home: &Path,
        host: &str,
        env: &[(&str, &str)],
    ) -> Plugin {
        let mut child = Command::new(BIN)
            .args(args)
            .arg(format!("--endpoint=unix://{}", socket.display()))
            .env_clear()
            .env("HOME", home)
            .env("GCE_METADATA_HOST", host)
            .env("CRYPTDISK_GCP_COMPUTE_ENDPOINT", format!("http://{host}"))
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start cryptdisk-csi");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(socket).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                let mut err = String::new();
                std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
                panic!("cryptdisk-csi exited with {status}: {err}");
            }
            assert!(Instant::now() < deadline, "socket never accepted");
            std::thread::sleep(Duration::from_millis(20));
        }
        Plugin {
            child,
            socket: socket.to_path_buf(),
        }
    }

    async fn channel(&self) -> tonic::transport::Channel {
        client::connect(&Endpoint::Unix(self.socket.clone()), Duration::from_secs(5))
            .await
            .unwrap()
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_identity_from_the_metadata_server() {
    let (host, log) = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let node = Plugin::start(
        &[
            "node",
            "--cloud=gcp",
            "--kms=tcp://127.0.0.1:9",
            "--kms-insecure",
        ],
        &dir.path().join("node.sock"),
        dir.path(),
        &host,
    );
    let info = NodeClient::new(node.channel().await)
        .node_get_info(NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, "us-central1-f.vm-7");
    assert_eq!(info.max_volumes_per_node, 15, "e2-medium is shared-core");
    let segments = info.accessible_topology.unwrap().segments;
    assert_eq!(segments.len(), 1);
    assert_eq!(segments["topology.cryptdisk.csi.io/zone"], "us-central1-f");
    assert!(
        log.lock()
            .unwrap()
            .iter()
            .any(|(_, p, _)| p == "/computeMetadata/v1/instance/machine-type")
    );

    // Flags win over the metadata server; a node id the controller could not use is refused.
    let given = Plugin::start(
        &[
            "node",
            "--cloud=gcp",
            "--node-id=europe-west4-b.other",
            "--max-volumes=3",
            "--kms=tcp://127.0.0.1:9",
            "--kms-insecure",
        ],
        &dir.path().join("given.sock"),
        dir.path(),
        &host,
    );
    let info = NodeClient::new(given.channel().await)
        .node_get_info(NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, "europe-west4-b.other");
    assert_eq!(info.max_volumes_per_node, 3);
    assert_eq!(
        info.accessible_topology.unwrap().segments["topology.cryptdisk.csi.io/zone"],
        "europe-west4-b"
    );
    let bad = Command::new(BIN)
        .args([
            "node",
            "--cloud=gcp",
            "--node-id=vm-7",
            "--kms=tcp://127.0.0.1:9",
            "--kms-insecure",
        ])
        .arg(format!(
            "--endpoint=unix://{}",
            dir.path().join("bad.sock").display()
        ))
        .env_clear()
        .env("GCE_METADATA_HOST", &host)
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("<zone>.<instance>"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_with_application_default_credentials() {
    let (host, log) = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let ctl = Plugin::start(
        &["controller", "--backend=gcp"],
        &dir.path().join("ctl.sock"),
        dir.path(),
        &host,
    );
    let listed = ControllerClient::new(ctl.channel().await)
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.entries.is_empty());
    let log = log.lock().unwrap();
    let compute: Vec<_> = log
        .iter()
        .filter(|(_, p, _)| p.starts_with("/compute/v1/"))
        .collect();
    assert!(!compute.is_empty());
    assert!(
        compute.iter().all(|(_, p, auth)| p
            == "/compute/v1/projects/meta-project/aggregated/disks"
            && auth == "Bearer tok-from-metadata"),
        "{compute:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_with_a_service_account_key() {
    let (host, log) = fake().await;
    let dir = tempfile::tempdir().unwrap();
    let pem = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/gcp-fixtures/throwaway-test-rsa-key.pem"
    ))
    .unwrap();
    let key = serde_json::json!({
        "type": "service_account",
        "project_id": "test-project",
        "private_key_id": "fixture-key-id",
        "private_key": pem,
        "client_email": "csi@test-project.iam.gserviceaccount.com",
        "client_id": "1",
        "token_uri": format!("http://{host}/token"),
    });
    let key_file = dir.path().join("key.json");
    std::fs::write(&key_file, key.to_string()).unwrap();
    let ctl = Plugin::start_with(
        &[
            "controller",
            "--backend=gcp",
            "--gcp-project=flag-project",
            "--gcp-zone=europe-west4-a",
        ],
        &dir.path().join("ctl.sock"),
        dir.path(),
        &host,
        &[("GOOGLE_APPLICATION_CREDENTIALS", key_file.to_str().unwrap())],
    );
    ControllerClient::new(ctl.channel().await)
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap();
    let log = log.lock().unwrap();
    // Flags, not the metadata server, chose the project; the key signed the token.
    assert!(
        log.iter()
            .all(|(_, p, _)| !p.starts_with("/computeMetadata/")),
        "{log:?}"
    );
    let compute: Vec<_> = log
        .iter()
        .filter(|(_, p, _)| p.starts_with("/compute/v1/"))
        .collect();
    assert!(!compute.is_empty());
    for (_, path, auth) in compute {
        assert_eq!(path, "/compute/v1/projects/flag-project/aggregated/disks");
        assert!(
            authorised(auth) && auth != "Bearer tok-from-metadata",
            "{auth}"
        );
    }
}
