//! What per-volume authorization costs: GetVolumeKey p50 and p99 with the
//! Kubernetes authorizer (TokenReview answers cached, decisions from the
//! watch-fed caches) against the same KMS with no authorizer (`none`), in one
//! run, printing the ratio.
//!
//! Starts a real kube-apiserver and etcd on loopback (the kube tier's harness,
//! tests/kube/cluster.rs, with the tools hack/kube-tools builds), creates the
//! node plugin's service account, a Node, a Pod on it, a bound token, a PV and
//! an attached VolumeAttachment, and serves both KMSes in this process on
//! loopback (plaintext gRPC, the same for both, so the difference is the
//! authorization alone). The two are measured in alternating rounds so drift
//! of the shared machine falls on both.
//!
//!     hack/kms-latency [REQUESTS]
//!     CRYPTDISK_KUBE_TOOLS=$(hack/kube-tools) cargo run --release --example kms_latency [-- REQUESTS]

#[path = "../tests/kube/cluster.rs"]
#[allow(dead_code)]
mod cluster;

use std::sync::Arc;
use std::time::{Duration, Instant};

use cryptdisk_csi::config::Endpoint;
use cryptdisk_csi::kms::authz::{Authorizer, NoneAuthorizer};
use cryptdisk_csi::kms::kube::{self, KubeAuthorizer, Settings};
use cryptdisk_csi::kms::server::{KmsService, MasterSecret};
use cryptdisk_csi::proto::kms::api_client::ApiClient;
use cryptdisk_csi::proto::kms::api_server::ApiServer;
use cryptdisk_csi::proto::kms::{Derivation, GetVolumeKeyRequest};
use serde_json::json;
use tonic::transport::Channel;
use zeroize::Zeroizing;

const NS: &str = "kube-system";
const DRIVER: &str = "cryptdisk.csi.io";
const VOLUME: &str = "vol-bench";

async fn serve(authorizer: Arc<dyn Authorizer>) -> ApiClient<Channel> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let master = MasterSecret::new(Zeroizing::new(vec![7; 32]), Zeroizing::new(vec![9; 32]));
    let router = cryptdisk_csi::server::builder()
        .add_service(ApiServer::new(KmsService::new(master, authorizer)));
    tokio::spawn(
        router.serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let endpoint: Endpoint = format!("tcp://127.0.0.1:{port}").parse().unwrap();
    let channel = cryptdisk_csi::client::connect_lazy(&endpoint, Duration::from_secs(10)).unwrap();
    ApiClient::new(channel)
}

async fn call(client: &ApiClient<Channel>, token: &str, i: usize) -> Result<(), tonic::Status> {
    let mut request = tonic::Request::new(GetVolumeKeyRequest {
        data_key_id: format!("6f2a7c54-2d39-4c4e-9b0e-{i:012}"),
        length: 32,
        key_version: 0,
        volume_id: VOLUME.into(),
        derivation: Derivation::V2.into(),
    });
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    client.clone().get_volume_key(request).await.map(|_| ())
}

/// The cluster objects that let node-a have VOLUME; node-a's bound token.
async fn populate(c: &cluster::Cluster) -> Result<String, String> {
    let api = &c.admin;
    api.create(
        &format!("/api/v1/namespaces/{NS}/serviceaccounts"),
        &json!({"metadata": {"name": "cryptdisk-node"}}),
    )
    .await?;
    api.create("/api/v1/nodes", &json!({"metadata": {"name": "node-a"}}))
        .await?;
    let pod = api
        .create(
            &format!("/api/v1/namespaces/{NS}/pods"),
            &json!({"metadata": {"name": "plugin"}, "spec": {
                "serviceAccountName": "cryptdisk-node", "nodeName": "node-a",
                "automountServiceAccountToken": false,
                "containers": [{"name": "plugin", "image": "cryptdisk-csi"}]}}),
        )
        .await?;
    api.create(
        "/api/v1/persistentvolumes",
        &json!({"metadata": {"name": "pv-bench"}, "spec": {
            "capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
            "csi": {"driver": DRIVER, "volumeHandle": VOLUME}}}),
    )
    .await?;
    api.create(
        "/apis/storage.k8s.io/v1/volumeattachments",
        &json!({"metadata": {"name": "va-bench"}, "spec": {
            "attacher": DRIVER, "nodeName": "node-a",
            "source": {"persistentVolumeName": "pv-bench"}}}),
    )
    .await?;
    api.merge_patch(
        "/apis/storage.k8s.io/v1/volumeattachments/va-bench/status",
        &json!({"status": {"attached": true}}),
    )
    .await?;
    let answer = api
        .create(
            &format!("/api/v1/namespaces/{NS}/serviceaccounts/cryptdisk-node/token"),
            &json!({"spec": {"audiences": ["cryptdisk-kms"], "expirationSeconds": 3600,
                "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": "plugin",
                                   "uid": pod["metadata"]["uid"]}}}),
        )
        .await?;
    answer["status"]["token"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| format!("no token in {answer}"))
}

fn at(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() {
    let requests: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(5_000);
    let tools = std::env::var_os("CRYPTDISK_KUBE_TOOLS")
        .map(std::path::PathBuf::from)
        .expect("CRYPTDISK_KUBE_TOOLS: run hack/kms-latency, which builds the Kubernetes tools");
    // The KMS talks to the API server as the administrator here: RBAC is the
    // kube tier's subject (tests/kube/authz_cases.rs), not this benchmark's.
    let c = cluster::Cluster::start(&tools, &[]).await.unwrap();
    let token = populate(&c).await.unwrap();
    let kubeconfig = c.kubeconfig("cryptdisk-admin").unwrap();

    let client = kube::client(Some(&kubeconfig)).await.unwrap();
    let settings = Settings {
        audience: "cryptdisk-kms".into(),
        node_account: format!("{NS}/cryptdisk-node").parse().unwrap(),
        driver: DRIVER.into(),
        max_staleness: Duration::from_secs(30),
    };
    let on = serve(Arc::new(KubeAuthorizer::start(client, settings))).await;
    let off = serve(Arc::new(NoneAuthorizer)).await;

    // Until the caches have synced the authorizer answers UNAVAILABLE.
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(e) = call(&on, &token, 0).await {
        assert!(Instant::now() < deadline, "never authorized: {e:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for i in 0..200 {
        call(&on, &token, i).await.unwrap();
        call(&off, &token, i).await.unwrap();
    }

    let (mut t_on, mut t_off) = (Vec::new(), Vec::new());
    let round = 250;
    let mut i = 0;
    while i < requests {
        for _ in 0..round.min(requests - i) {
            let t = Instant::now();
            call(&on, &token, i).await.unwrap();
            t_on.push(t.elapsed());
            let t = Instant::now();
            call(&off, &token, i).await.unwrap();
            t_off.push(t.elapsed());
            i += 1;
        }
    }
    t_on.sort();
    t_off.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "kms_latency: {requests} GetVolumeKey calls each, sequential, one plaintext channel on loopback, \
         against kube-apiserver on loopback"
    );
    for (name, t) in [
        ("authorization on (kubernetes)", &t_on),
        ("authorization off (none)", &t_off),
    ] {
        println!(
            "kms_latency: {name:32} p50 {:.3} ms  p99 {:.3} ms  max {:.3} ms",
            ms(at(t, 0.50)),
            ms(at(t, 0.99)),
            ms(*t.last().unwrap())
        );
    }
    println!(
        "kms_latency: ratio on/off: p50 {:.2}x  p99 {:.2}x",
        ms(at(&t_on, 0.50)) / ms(at(&t_off, 0.50)),
        ms(at(&t_on, 0.99)) / ms(at(&t_off, 0.99))
    );
}
