//! Node-scoped keys against the real API server: the real `cryptdisk-csi kms`
//! with `--authorizer kubernetes`, a kubeconfig of its own service account
//! with only the RBAC it needs, real bound tokens from TokenRequest, and real
//! PersistentVolumes and VolumeAttachments.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cryptdisk_csi::config::Endpoint;
use cryptdisk_csi::kms::derive_scoped_key;
use cryptdisk_csi::proto::kms::api_client::ApiClient;
use cryptdisk_csi::proto::kms::{Derivation, GetVolumeKeyRequest};
use serde_json::{Value, json};
use tonic::Code;
use tonic::transport::Channel;

use crate::cluster::Cluster;
use crate::{Case, CaseResult, check, ensure};

const BIN: &str = env!("CARGO_BIN_EXE_cryptdisk-csi");
const DRIVER: &str = "cryptdisk.csi.io";
const NS: &str = "kube-system";
const NODE_SA: &str = "cryptdisk-node";
const AUDIENCE: &str = "cryptdisk-kms";
const KEY_ID: &str = "0b4f2a9e-5c1d-4e7f-8a3b-6d2c9e1f0a57";
const MASTER: [u8; 32] = [5; 32];
const SALT: [u8; 32] = [6; 32];
/// The KMS's staleness bound in these cases: short, so failing closed shows
/// in seconds.
const STALENESS_S: u64 = 3;

pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "kube_kms_serves_keys_only_to_the_attached_node",
            run: |t| Box::pin(attached_node_only(t)),
        },
        Case {
            name: "kube_kms_fails_closed_while_the_api_server_is_down",
            run: |t| Box::pin(fails_closed(t)),
        },
    ]
}

/// A cluster with the KMS's RBAC, the node plugin's service account and
/// another one, two Nodes, and the KMS running against it.
struct World {
    cluster: Cluster,
    kms: ApiClient<Channel>,
}

/// Exactly what the KMS uses (the chart grants the same).
fn kms_rbac() -> [(&'static str, Value); 2] {
    [
        (
            "/apis/rbac.authorization.k8s.io/v1/clusterroles",
            json!({
                "metadata": {"name": "cryptdisk-kms"},
                "rules": [
                    {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
                    {"apiGroups": ["storage.k8s.io"], "resources": ["volumeattachments"], "verbs": ["get", "list", "watch"]},
                    {"apiGroups": [""], "resources": ["persistentvolumes"], "verbs": ["get", "list", "watch"]},
                ],
            }),
        ),
        (
            "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
            json!({
                "metadata": {"name": "cryptdisk-kms"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cryptdisk-kms"},
                "subjects": [{"kind": "ServiceAccount", "name": "cryptdisk-kms", "namespace": NS}],
            }),
        ),
    ]
}

impl World {
    async fn start(tools: &Path) -> Result<World, String> {
        let mut cluster = Cluster::start(tools, &[]).await?;
        let api = cluster.admin.clone();
        for sa in ["cryptdisk-kms", NODE_SA, "other"] {
            check!(
                api.create(
                    &format!("/api/v1/namespaces/{NS}/serviceaccounts"),
                    &json!({"metadata": {"name": sa}})
                )
                .await
            );
        }
        for (path, object) in kms_rbac() {
            check!(api.create(path, &object).await);
        }
        for node in ["node-a", "node-b"] {
            check!(
                api.create("/api/v1/nodes", &json!({"metadata": {"name": node}}))
                    .await
            );
        }
        // The KMS's own credentials: a token of its service account (for the
        // API server's audience), as a projected token would be in the pod.
        let kms_token = check!(token_request(&cluster, "cryptdisk-kms", None, &[], 3600).await);
        let kubeconfig = check!(cluster.kubeconfig_with_token("cryptdisk-kms", &kms_token));
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let (master, salt) = (
            private_file(cluster.dir.path(), "master.key", &MASTER)?,
            private_file(cluster.dir.path(), "salt", &SALT)?,
        );
        check!(
            cluster.spawn(
                "kms",
                Command::new(BIN)
                    .env("RUST_LOG", "info")
                    .arg("kms")
                    .arg(format!("--listen=tcp://127.0.0.1:{port}"))
                    .arg("--insecure")
                    .arg(format!("--master-secret-file={}", master.display()))
                    .arg(format!("--salt-file={}", salt.display()))
                    .arg("--authorizer=kubernetes")
                    .arg(format!("--kubeconfig={}", kubeconfig.display()))
                    .arg(format!("--token-audience={AUDIENCE}"))
                    .arg(format!("--node-service-account={NS}/{NODE_SA}"))
                    .arg(format!("--driver-name={DRIVER}"))
                    .arg(format!("--authorization-max-staleness={STALENESS_S}"))
            )
        );
        let endpoint: Endpoint = check!(format!("tcp://127.0.0.1:{port}").parse());
        let deadline = Instant::now() + Duration::from_secs(30);
        let channel = loop {
            cluster.check_alive()?;
            match cryptdisk_csi::client::connect(&endpoint, Duration::from_secs(2)).await {
                Ok(c) => break c,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(e) => return Err(format!("the KMS never listened: {e}")),
            }
        };
        Ok(World {
            cluster,
            kms: ApiClient::new(channel),
        })
    }

    /// A Pod of `sa` on `node`, and a token of `sa` bound to it for the KMS.
    async fn node_token(&self, pod: &str, sa: &str, node: &str) -> Result<String, String> {
        let created = check!(
            self.cluster
                .admin
                .create(
                    &format!("/api/v1/namespaces/{NS}/pods"),
                    &json!({
                        "metadata": {"name": pod},
                        "spec": {
                            "serviceAccountName": sa,
                            "nodeName": node,
                            "automountServiceAccountToken": false,
                            "containers": [{"name": "plugin", "image": "cryptdisk-csi"}],
                        },
                    })
                )
                .await
        );
        let uid = created["metadata"]["uid"].as_str().unwrap_or_default();
        let bound = json!({"kind": "Pod", "apiVersion": "v1", "name": pod, "uid": uid});
        token_request(&self.cluster, sa, Some(bound), &[AUDIENCE], 600).await
    }

    async fn volume(&self, pv: &str, handle: &str, scope: Option<&str>) -> CaseResult {
        let mut csi = json!({"driver": DRIVER, "volumeHandle": handle});
        if let Some(scope) = scope {
            csi["volumeAttributes"] = json!({"cryptdisk.csi.io/key-scope": scope});
        }
        check!(
            self.cluster
                .admin
                .create(
                    "/api/v1/persistentvolumes",
                    &json!({
                        "metadata": {"name": pv},
                        "spec": {
                            "capacity": {"storage": "1Gi"},
                            "accessModes": ["ReadWriteOnce"],
                            "persistentVolumeReclaimPolicy": "Retain",
                            "csi": csi,
                        },
                    })
                )
                .await
        );
        Ok(())
    }

    /// A VolumeAttachment of `pv` to `node`, reported attached through the
    /// status subresource (as external-attacher does).
    async fn attach(&self, va: &str, pv: &str, node: &str) -> CaseResult {
        check!(
            self.cluster
                .admin
                .create(
                    "/apis/storage.k8s.io/v1/volumeattachments",
                    &json!({
                        "metadata": {"name": va},
                        "spec": {"attacher": DRIVER, "nodeName": node,
                                 "source": {"persistentVolumeName": pv}},
                    })
                )
                .await
        );
        self.set_attached(va, true).await
    }

    async fn set_attached(&self, va: &str, attached: bool) -> CaseResult {
        check!(
            self.cluster
                .admin
                .merge_patch(
                    &format!("/apis/storage.k8s.io/v1/volumeattachments/{va}/status"),
                    &json!({"status": {"attached": attached}})
                )
                .await
        );
        Ok(())
    }

    /// GetVolumeKey of `volume` with `token` (none: no header); the key or the
    /// refusal's code and message.
    async fn key(&self, token: Option<&str>, volume: &str) -> Result<Vec<u8>, (Code, String)> {
        let mut request = tonic::Request::new(GetVolumeKeyRequest {
            data_key_id: KEY_ID.into(),
            length: 32,
            key_version: 0,
            volume_id: volume.into(),
            derivation: Derivation::V2.into(),
        });
        if let Some(t) = token {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        self.kms
            .clone()
            .get_volume_key(request)
            .await
            .map(|r| r.into_inner().data_key)
            .map_err(|s| (s.code(), s.message().to_string()))
    }

    /// Asks until the answer is no longer UNAVAILABLE (the caches have synced).
    async fn key_when_synced(
        &self,
        token: Option<&str>,
        volume: &str,
    ) -> Result<Result<Vec<u8>, (Code, String)>, String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let answer = self.key(token, volume).await;
            match &answer {
                Err((Code::Unavailable, m)) if Instant::now() < deadline => {
                    let _ = m;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                _ => return Ok(answer),
            }
        }
    }
}

async fn token_request(
    cluster: &Cluster,
    sa: &str,
    bound: Option<Value>,
    audiences: &[&str],
    seconds: u64,
) -> Result<String, String> {
    let mut spec = json!({"audiences": audiences, "expirationSeconds": seconds});
    if let Some(b) = bound {
        spec["boundObjectRef"] = b;
    }
    let answer = cluster
        .admin
        .create(
            &format!("/api/v1/namespaces/{NS}/serviceaccounts/{sa}/token"),
            &json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}),
        )
        .await?;
    answer["status"]["token"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| format!("TokenRequest for {sa}: no token in {answer}"))
}

fn private_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, bytes).map_err(|e| e.to_string())?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| e.to_string())?;
    Ok(path)
}

fn scoped(scope: &str) -> Vec<u8> {
    derive_scoped_key(&MASTER, &SALT, scope, KEY_ID, 32)
        .expect("a valid scope")
        .expose()
        .to_vec()
}

fn refused(answer: Result<Vec<u8>, (Code, String)>, code: Code, what: &str) -> CaseResult {
    match answer {
        Err((c, _)) if c == code => Ok(()),
        Err((c, m)) => Err(format!("{what}: expected {code:?}, got {c:?}: {m}")),
        Ok(_) => Err(format!("{what}: expected {code:?}, got the key")),
    }
}

async fn attached_node_only(tools: &Path) -> CaseResult {
    let w = World::start(tools).await?;
    w.volume("pv-src", "vol-src", Some("vol-src")).await?;
    // A restore of vol-src: its own handle, its source's scope.
    w.volume("pv-restored", "vol-restored", Some("vol-src"))
        .await?;
    // A volume from before v2 keys: no scope attribute.
    w.volume("pv-plain", "vol-plain", None).await?;
    w.attach("va-src", "pv-src", "node-a").await?;
    w.attach("va-restored", "pv-restored", "node-b").await?;
    w.attach("va-plain", "pv-plain", "node-a").await?;

    let a = w.node_token("plugin-a", NODE_SA, "node-a").await?;
    let b = w.node_token("plugin-b", NODE_SA, "node-b").await?;
    let other = w.node_token("other-a", "other", "node-a").await?;
    let gone = w.node_token("plugin-gone", NODE_SA, "node-a").await?;
    let api_audience = token_request(&w.cluster, NODE_SA, None, &[], 600).await?;

    // The attached node gets the key, under the PV's scope.
    let got = check!(w.key_when_synced(Some(&a), "vol-src").await);
    ensure!(
        got.as_ref().ok() == Some(&scoped("vol-src")),
        "node-a, vol-src: {got:?}"
    );
    let plain = w.key(Some(&a), "vol-plain").await;
    ensure!(
        plain.as_ref().ok() == Some(&scoped("vol-plain")),
        "no scope attribute: the volume id is the scope: {plain:?}"
    );
    // The restored volume on its own node: the source's key.
    let restored = w.key(Some(&b), "vol-restored").await;
    ensure!(
        restored.as_ref().ok() == Some(&scoped("vol-src")),
        "node-b, vol-restored: {restored:?}"
    );

    // Everyone else is refused.
    refused(
        w.key(Some(&b), "vol-src").await,
        Code::PermissionDenied,
        "another node's valid token",
    )?;
    refused(
        w.key(Some(&a), "vol-restored").await,
        Code::PermissionDenied,
        "node-a asking for node-b's volume",
    )?;
    refused(
        w.key(Some(&other), "vol-src").await,
        Code::PermissionDenied,
        "another service account's token",
    )?;
    refused(
        w.key(None, "vol-src").await,
        Code::Unauthenticated,
        "no token",
    )?;
    refused(
        w.key(Some(&api_audience), "vol-src").await,
        Code::Unauthenticated,
        "a token for the API server's audience",
    )?;
    refused(
        w.key(Some("not-a-token"), "vol-src").await,
        Code::Unauthenticated,
        "garbage",
    )?;
    refused(
        w.key(Some(&a), "vol-unknown").await,
        Code::PermissionDenied,
        "a volume with no PV",
    )?;
    // A token no longer valid: its bound Pod is gone (TokenRequest's shortest
    // expiry is 10 minutes, so the API server's own invalidation stands in for
    // expiry; the KMS never saw this token, so no cached review applies).
    check!(
        w.cluster
            .admin
            .delete(&format!(
                "/api/v1/namespaces/{NS}/pods/plugin-gone?gracePeriodSeconds=0"
            ))
            .await
    );
    check!(
        wait_gone(
            &w.cluster,
            &format!("/api/v1/namespaces/{NS}/pods/plugin-gone")
        )
        .await
    );
    refused(
        w.key(Some(&gone), "vol-src").await,
        Code::Unauthenticated,
        "a token whose Pod was deleted",
    )?;
    // And an expired one: node-a's own token, its expiry moved an hour into
    // the past and signed again with the cluster's service-account key, so
    // expiry is the only thing wrong with it.
    let now = check!(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)).as_secs();
    // (Signed again unchanged it is served: the signing is right.)
    let copy = check!(resigned(&w.cluster, &a, |_| {}));
    ensure!(copy != a, "the copy is a new signature");
    let served = w.key(Some(&copy), "vol-src").await;
    ensure!(served.is_ok(), "node-a's token signed again: {served:?}");
    let expired = check!(resigned(&w.cluster, &a, |claims| {
        claims["exp"] = json!(now - 3600);
        claims["iat"] = json!(now - 4200);
        claims["nbf"] = json!(now - 4200);
    }));
    refused(
        w.key(Some(&expired), "vol-src").await,
        Code::Unauthenticated,
        "an expired token",
    )?;

    // A detach revokes within the watch latency.
    let mut latencies = Vec::new();
    for (label, detach) in [("attached=false", false), ("deleted", true)] {
        let start = if detach {
            check!(w.set_attached("va-src", true).await);
            check!(wait_key(&w, &a, "vol-src").await);
            let t = Instant::now();
            check!(
                w.cluster
                    .admin
                    .delete("/apis/storage.k8s.io/v1/volumeattachments/va-src")
                    .await
            );
            t
        } else {
            let t = Instant::now();
            w.set_attached("va-src", false).await?;
            t
        };
        let latency = loop {
            match w.key(Some(&a), "vol-src").await {
                Err((Code::PermissionDenied, _)) => break start.elapsed(),
                Ok(_) if start.elapsed() < Duration::from_secs(10) => {}
                other => return Err(format!("after the detach ({label}): {other:?}")),
            }
        };
        println!(
            "kube: detach ({label}) denied {:.1} ms after the API server accepted it",
            latency.as_secs_f64() * 1e3
        );
        latencies.push(latency);
    }

    // The audit log names node, volume, key id and reason; never a token or key.
    let log = std::fs::read_to_string(w.cluster.log_path("kms")).unwrap_or_default();
    ensure!(
        log.lines().any(|l| l.contains("volume key served")
            && l.contains("node-a")
            && l.contains("vol-src")
            && l.contains(KEY_ID)),
        "no audit line for the served key:\n{log}"
    );
    ensure!(
        log.lines().any(|l| l.contains("volume key refused")
            && l.contains("node-b")
            && l.contains("not attached")),
        "no audit line for node-b's refusal:\n{log}"
    );
    for secret in [&a, &b, &other] {
        ensure!(!log.contains(secret.as_str()), "a token in the KMS log");
    }
    ensure!(
        !log.contains(&hex::encode(scoped("vol-src"))),
        "a key in the KMS log"
    );
    Ok(())
}

async fn wait_gone(cluster: &Cluster, path: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok((reqwest::StatusCode::NOT_FOUND, _)) =
            cluster.admin.raw(reqwest::Method::GET, path, None).await
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!("{path} still there"))
}

/// Asks until the key is served (after a change the watch has yet to bring).
async fn wait_key(w: &World, token: &str, volume: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match w.key(Some(token), volume).await {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => return Err(format!("{volume}: {e:?}")),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

async fn fails_closed(tools: &Path) -> CaseResult {
    let mut w = World::start(tools).await?;
    w.volume("pv-1", "vol-1", None).await?;
    w.attach("va-1", "pv-1", "node-a").await?;
    let a = w.node_token("plugin-a", NODE_SA, "node-a").await?;
    let got = check!(w.key_when_synced(Some(&a), "vol-1").await);
    ensure!(got.is_ok(), "before: {got:?}");

    // A quiet cluster is not a stale one: nothing changes for twice the
    // bound, and keys are still served.
    tokio::time::sleep(Duration::from_secs(2 * STALENESS_S)).await;
    let quiet = w.key(Some(&a), "vol-1").await;
    ensure!(
        quiet.is_ok(),
        "after {} quiet seconds: {quiet:?}",
        2 * STALENESS_S
    );

    // The API server goes away: the token's review is cached, the caches
    // keep their content, and still every request is refused once the
    // caches are older than the bound.
    w.cluster.stop_apiserver();
    let stopped = Instant::now();
    let closed = loop {
        match w.key(Some(&a), "vol-1").await {
            Err((Code::Unavailable, m)) => break (stopped.elapsed(), m),
            Ok(_) if stopped.elapsed() < Duration::from_secs(STALENESS_S + 5) => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            other => return Err(format!("with the API server down: {other:?}")),
        }
    };
    println!(
        "kube: API server down: UNAVAILABLE after {:.1} s (bound {STALENESS_S} s): {}",
        closed.0.as_secs_f64(),
        closed.1
    );
    ensure!(
        closed.0 <= Duration::from_secs(STALENESS_S + 2),
        "failed closed only after {:?}",
        closed.0
    );
    // A token the KMS has not reviewed yet cannot be reviewed either.
    refused(
        w.key(Some("unreviewed"), "vol-1").await,
        Code::Unavailable,
        "a new token while the API server is down",
    )?;

    // Back: the watch resumes and keys are served again.
    let down_for = stopped.elapsed();
    check!(w.cluster.restart_apiserver().await);
    let back = Instant::now();
    check!(wait_key(&w, &a, "vol-1").await);
    println!(
        "kube: API server back after {:.1} s down: keys served again {:.1} s after it was ready",
        down_for.as_secs_f64(),
        back.elapsed().as_secs_f64()
    );
    // Changes after the restart reach the caches too.
    w.set_attached("va-1", false).await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match w.key(Some(&a), "vol-1").await {
            Err((Code::PermissionDenied, _)) => break,
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(20)).await,
            other => return Err(format!("after the restart, detached: {other:?}")),
        }
    }
    Ok(())
}

/// `token` with its claims changed by `change`, signed again (ES256) with the
/// API server's service-account signing key.
fn resigned(
    cluster: &Cluster,
    token: &str,
    change: impl FnOnce(&mut Value),
) -> Result<String, String> {
    use base64::Engine as _;
    use rcgen::SigningKey as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut parts = token.split('.');
    let (header, payload) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let mut claims: Value =
        serde_json::from_slice(&b64.decode(payload).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    change(&mut claims);
    let signed = format!("{header}.{}", b64.encode(claims.to_string()));
    let pem =
        std::fs::read_to_string(cluster.dir.path().join("sa.key")).map_err(|e| e.to_string())?;
    let key = rcgen::KeyPair::from_pem(&pem).map_err(|e| e.to_string())?;
    let der = key.sign(signed.as_bytes()).map_err(|e| e.to_string())?;
    let raw = ecdsa_der_to_jws(&der).ok_or("an ECDSA signature that is not DER")?;
    Ok(format!("{signed}.{}", b64.encode(raw)))
}

/// An ECDSA P-256 signature as DER (SEQUENCE of INTEGER r, s) to the JWS form
/// (r and s as 32 big-endian bytes each).
fn ecdsa_der_to_jws(der: &[u8]) -> Option<Vec<u8>> {
    let body = der.strip_prefix(&[0x30])?;
    let (&len, mut rest) = body.split_first()?;
    if usize::from(len) != rest.len() {
        return None;
    }
    let mut out = Vec::with_capacity(64);
    for _ in 0..2 {
        let (&tag, r) = rest.split_first()?;
        let (&n, r) = r.split_first()?;
        if tag != 0x02 || r.len() < usize::from(n) {
            return None;
        }
        let (int, r) = r.split_at(usize::from(n));
        let int = &int[int.iter().take_while(|b| **b == 0).count()..];
        if int.len() > 32 {
            return None;
        }
        out.extend(std::iter::repeat_n(0, 32 - int.len()));
        out.extend_from_slice(int);
        rest = r;
    }
    Some(out)
}
