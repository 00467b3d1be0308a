//! The Helm chart against the real API server: its rendered manifests for
//! every cloud are created (a strict server-side dry run first), each of its
//! ServiceAccounts is checked with SubjectAccessReviews to be granted what it
//! uses and nothing more, the node plugin's projected token is reviewed with
//! the KMS's own token, and the real csi-attacher and csi-snapshotter run
//! against our controller with the controller's ServiceAccount token, so that
//! the chart's RBAC is what lets them work.
//!
//! The chart is rendered with the pinned helm that `hack/kube` names in
//! `CRYPTDISK_HELM` (hack/helm, as hack/deploy-check uses).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cryptdisk_csi::proto::csi::*;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::cluster::{Api, Cluster};
use crate::snapshot_cases::{create_req, install_crds, start_controller};
use crate::{Case, CaseResult, check, ensure};

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/helm/cryptdisk-csi");
const RELEASE: &str = "cryptdisk-csi";
const NAMESPACE: &str = "kube-system";
/// The Secret named by kms.existingSecret: the chart renders no master secret.
const MASTER_SECRET: &str = "cryptdisk-master";
const DRIVER: &str = "cryptdisk.csi.io";
/// The node `start_controller`'s local backend serves.
const NODE: &str = "kube-node";
const KUBE_VERSION: &str = "1.35.4";
const GIB: i64 = 1 << 30;
const SNAPSHOT_API: &str = "/apis/snapshot.storage.k8s.io/v1";

pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "kube_chart_local_applies_and_grants_exactly_what_is_used",
            run: |t| Box::pin(chart_applies(t, "local")),
        },
        Case {
            name: "kube_chart_azure_applies_and_grants_exactly_what_is_used",
            run: |t| Box::pin(chart_applies(t, "azure")),
        },
        Case {
            name: "kube_chart_gcp_applies_and_grants_exactly_what_is_used",
            run: |t| Box::pin(chart_applies(t, "gcp")),
        },
        Case {
            name: "kube_chart_attacher_and_snapshotter_reach_the_controller",
            run: |t| Box::pin(sidecars_reach_the_controller(t)),
        },
    ]
}

/// `helm template` of the chart for `cloud`, as `hack/kube` pins helm.
fn render(cloud: &str) -> Result<String, String> {
    let helm = std::env::var_os("CRYPTDISK_HELM")
        .map(PathBuf::from)
        .ok_or("CRYPTDISK_HELM is not set: run hack/kube, which installs helm (hack/helm)")?;
    let out = check!(
        Command::new(&helm)
            .args(["template", RELEASE, CHART, "--namespace", NAMESPACE])
            .args(["--kube-version", KUBE_VERSION])
            .arg("--set")
            .arg(format!("cloud={cloud},kms.existingSecret={MASTER_SECRET}"))
            .output()
    );
    ensure!(
        out.status.success(),
        "helm template (cloud={cloud}): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(check!(String::from_utf8(out.stdout)))
}

/// One rendered object: its YAML as helm wrote it and the top-level fields
/// that say where it goes.
struct Manifest {
    yaml: String,
    api_version: String,
    kind: String,
    name: String,
}

/// Splits helm's output into its objects. Helm writes each top-level key at
/// the start of a line and `metadata.name` two spaces in, which is all we read
/// (the API server parses the YAML itself).
fn manifests(rendered: &str) -> Result<Vec<Manifest>, String> {
    let mut out = Vec::new();
    for doc in rendered.split("\n---") {
        let doc = doc.strip_prefix("---").unwrap_or(doc);
        let field = |prefix: &str| {
            doc.lines()
                .find_map(|l| l.strip_prefix(prefix))
                .map(|v| v.trim().trim_matches('"').to_string())
        };
        let Some(kind) = field("kind: ") else {
            continue;
        };
        out.push(Manifest {
            yaml: doc.trim_start_matches('\n').to_string(),
            api_version: field("apiVersion: ").ok_or(format!("{kind} has no apiVersion"))?,
            name: field("  name: ").ok_or(format!("{kind} has no name"))?,
            kind,
        });
    }
    ensure!(out.len() > 10, "only {} objects rendered", out.len());
    Ok(out)
}

/// Where objects of a kind live, from the API server's discovery.
struct Discovery {
    /// (apiVersion, kind) → (resource, namespaced).
    kinds: HashMap<(String, String), (String, bool)>,
}

impl Discovery {
    async fn resource(&mut self, api: &Api, m: &Manifest) -> Result<(String, bool), String> {
        let key = (m.api_version.clone(), m.kind.clone());
        if !self.kinds.contains_key(&key) {
            let path = if m.api_version == "v1" {
                "/api/v1".to_string()
            } else {
                format!("/apis/{}", m.api_version)
            };
            let list = check!(api.get(&path).await);
            for r in list["resources"].as_array().into_iter().flatten() {
                let name = r["name"].as_str().unwrap_or_default();
                if !name.contains('/') {
                    self.kinds.insert(
                        (
                            m.api_version.clone(),
                            r["kind"].as_str().unwrap_or_default().to_string(),
                        ),
                        (name.to_string(), r["namespaced"] == json!(true)),
                    );
                }
            }
        }
        self.kinds
            .get(&key)
            .cloned()
            .ok_or_else(|| format!("the API server serves no {} {}", m.api_version, m.kind))
    }

    /// The collection an object is created in.
    async fn collection(&mut self, api: &Api, m: &Manifest) -> Result<String, String> {
        let (resource, namespaced) = self.resource(api, m).await?;
        let base = if m.api_version == "v1" {
            "/api/v1".to_string()
        } else {
            format!("/apis/{}", m.api_version)
        };
        Ok(if namespaced {
            format!("{base}/namespaces/{NAMESPACE}/{resource}")
        } else {
            format!("{base}/{resource}")
        })
    }
}

/// Creates every object, strictly (an unknown or duplicate field is an
/// error, not a warning); with `dry_run` the API server validates, defaults
/// and admits each one but stores nothing.
async fn create_all(
    api: &Api,
    discovery: &mut Discovery,
    objects: &[Manifest],
    dry_run: bool,
) -> Result<(), String> {
    let mut failures = Vec::new();
    for m in objects {
        let collection = discovery.collection(api, m).await?;
        let query = if dry_run {
            "?fieldValidation=Strict&dryRun=All"
        } else {
            "?fieldValidation=Strict"
        };
        let (status, body) = api
            .raw(
                Method::POST,
                &format!("{collection}{query}"),
                Some(("application/yaml", m.yaml.clone().into_bytes())),
            )
            .await?;
        if status != StatusCode::CREATED {
            failures.push(format!(
                "{} {} ({}): {status}: {}",
                m.kind,
                m.name,
                if dry_run { "dry run" } else { "create" },
                body["message"].as_str().unwrap_or(&body.to_string())
            ));
        }
    }
    ensure!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

/// Whether `account` (a ServiceAccount in the release namespace) may `verb`
/// the `resource` (`resource` or `resource/subresource`) of `group`, in
/// `namespace` (None: cluster-wide), as the API server's authorizer answers.
async fn allowed(
    api: &Api,
    account: &str,
    verb: &str,
    group: &str,
    resource: &str,
    namespace: Option<&str>,
) -> Result<bool, String> {
    let (resource, subresource) = resource.split_once('/').unwrap_or((resource, ""));
    let review = json!({
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {
            "user": format!("system:serviceaccount:{NAMESPACE}:{account}"),
            "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{NAMESPACE}"),
                "system:authenticated"],
            "resourceAttributes": {
                "namespace": namespace.unwrap_or(""),
                "verb": verb, "group": group, "resource": resource, "subresource": subresource,
            },
        },
    });
    let answer = check!(
        api.create(
            "/apis/authorization.k8s.io/v1/subjectaccessreviews",
            &review
        )
        .await
    );
    Ok(answer["status"]["allowed"] == json!(true))
}

/// One row of the table: an account, what it asks, and the answer it must get.
struct Access {
    account: &'static str,
    verb: &'static str,
    group: &'static str,
    resource: &'static str,
    namespace: Option<&'static str>,
    allowed: bool,
}

/// What each ServiceAccount of the chart uses (allowed), and what it must not
/// have (denied). The controller's one account serves every sidecar, so its
/// rows are grouped by the sidecar that uses them.
fn access_table() -> Vec<Access> {
    const CONTROLLER: &str = "cryptdisk-csi-controller";
    const NODE_SA: &str = "cryptdisk-csi-node";
    const KMS: &str = "cryptdisk-csi-kms";
    const CORE: &str = "";
    const STORAGE: &str = "storage.k8s.io";
    const SNAP: &str = "snapshot.storage.k8s.io";
    let ns = Some(NAMESPACE);
    let other = Some("default");
    #[rustfmt::skip]
    let rows = vec![
        // csi-provisioner
        (CONTROLLER, "create", CORE, "persistentvolumes", None, true),
        (CONTROLLER, "delete", CORE, "persistentvolumes", None, true),
        (CONTROLLER, "update", CORE, "persistentvolumeclaims", other, true),
        (CONTROLLER, "watch", STORAGE, "storageclasses", None, true),
        (CONTROLLER, "create", CORE, "events", other, true),
        (CONTROLLER, "get", SNAP, "volumesnapshots", other, true),
        (CONTROLLER, "get", SNAP, "volumesnapshotcontents", None, true),
        (CONTROLLER, "list", STORAGE, "csinodes", None, true),
        (CONTROLLER, "list", CORE, "nodes", None, true),
        // csi-attacher
        (CONTROLLER, "patch", CORE, "persistentvolumes", None, true),
        (CONTROLLER, "watch", STORAGE, "volumeattachments", None, true),
        (CONTROLLER, "patch", STORAGE, "volumeattachments", None, true),
        (CONTROLLER, "patch", STORAGE, "volumeattachments/status", None, true),
        // csi-resizer
        (CONTROLLER, "patch", CORE, "persistentvolumeclaims/status", other, true),
        (CONTROLLER, "list", CORE, "pods", other, true),
        (CONTROLLER, "watch", STORAGE, "volumeattributesclasses", None, true),
        // csi-snapshotter
        (CONTROLLER, "watch", SNAP, "volumesnapshotclasses", None, true),
        (CONTROLLER, "update", SNAP, "volumesnapshotcontents", None, true),
        (CONTROLLER, "update", SNAP, "volumesnapshotcontents/status", None, true),
        // leader election, in the release namespace only
        (CONTROLLER, "create", "coordination.k8s.io", "leases", ns, true),
        (CONTROLLER, "update", "coordination.k8s.io", "leases", ns, true),
        (CONTROLLER, "create", "coordination.k8s.io", "leases", other, false),
        // nothing more
        (CONTROLLER, "get", CORE, "secrets", ns, false),
        (CONTROLLER, "list", CORE, "secrets", None, false),
        (CONTROLLER, "create", CORE, "pods", other, false),
        (CONTROLLER, "delete", CORE, "pods", other, false),
        (CONTROLLER, "patch", CORE, "nodes", None, false),
        (CONTROLLER, "update", CORE, "persistentvolumes", None, false),
        (CONTROLLER, "delete", CORE, "persistentvolumeclaims", other, false),
        (CONTROLLER, "create", STORAGE, "volumeattachments", None, false),
        (CONTROLLER, "delete", STORAGE, "volumeattachments", None, false),
        (CONTROLLER, "create", SNAP, "volumesnapshots", other, false),
        (CONTROLLER, "create", "authentication.k8s.io", "tokenreviews", None, false),
        (CONTROLLER, "create", CORE, "serviceaccounts/token", ns, false),
        (CONTROLLER, "bind", "rbac.authorization.k8s.io", "clusterroles", None, false),
        // The node plugin: its token is only for the KMS; it is granted nothing.
        (NODE_SA, "get", CORE, "persistentvolumes", None, false),
        (NODE_SA, "list", STORAGE, "volumeattachments", None, false),
        (NODE_SA, "create", "authentication.k8s.io", "tokenreviews", None, false),
        (NODE_SA, "get", CORE, "secrets", ns, false),
        (NODE_SA, "get", CORE, "nodes", None, false),
        (NODE_SA, "list", CORE, "pods", None, false),
        (NODE_SA, "create", CORE, "serviceaccounts/token", ns, false),
        (NODE_SA, "create", "coordination.k8s.io", "leases", ns, false),
        // The KMS: reviews tokens, watches attachments and PVs.
        (KMS, "create", "authentication.k8s.io", "tokenreviews", None, true),
        (KMS, "get", STORAGE, "volumeattachments", None, true),
        (KMS, "list", STORAGE, "volumeattachments", None, true),
        (KMS, "watch", STORAGE, "volumeattachments", None, true),
        (KMS, "get", CORE, "persistentvolumes", None, true),
        (KMS, "list", CORE, "persistentvolumes", None, true),
        (KMS, "watch", CORE, "persistentvolumes", None, true),
        // and nothing more: above all no write to what it decides from.
        (KMS, "create", STORAGE, "volumeattachments", None, false),
        (KMS, "patch", STORAGE, "volumeattachments", None, false),
        (KMS, "delete", STORAGE, "volumeattachments", None, false),
        (KMS, "patch", STORAGE, "volumeattachments/status", None, false),
        (KMS, "create", CORE, "persistentvolumes", None, false),
        (KMS, "patch", CORE, "persistentvolumes", None, false),
        (KMS, "get", CORE, "secrets", ns, false),
        (KMS, "list", CORE, "secrets", None, false),
        (KMS, "get", CORE, "persistentvolumeclaims", other, false),
        (KMS, "list", CORE, "pods", None, false),
        (KMS, "get", CORE, "nodes", None, false),
        (KMS, "create", CORE, "serviceaccounts/token", ns, false),
        (KMS, "create", "authorization.k8s.io", "subjectaccessreviews", None, false),
        (KMS, "get", "coordination.k8s.io", "leases", ns, false),
    ];
    rows.into_iter()
        .map(
            |(account, verb, group, resource, namespace, allowed)| Access {
                account,
                verb,
                group,
                resource,
                namespace,
                allowed,
            },
        )
        .collect()
}

/// Asserts the whole table; a failure lists every row that answered wrong.
async fn check_access(api: &Api) -> Result<(), String> {
    let mut wrong = Vec::new();
    for row in access_table() {
        let got = allowed(
            api,
            row.account,
            row.verb,
            row.group,
            row.resource,
            row.namespace,
        )
        .await?;
        if got != row.allowed {
            wrong.push(format!(
                "{} {} {}/{} in {}: {} (expected {})",
                row.account,
                row.verb,
                if row.group.is_empty() {
                    "core"
                } else {
                    row.group
                },
                row.resource,
                row.namespace.unwrap_or("the cluster"),
                if got { "allowed" } else { "denied" },
                if row.allowed { "allowed" } else { "denied" },
            ));
        }
    }
    ensure!(
        wrong.is_empty(),
        "SubjectAccessReviews answered against the table:\n{}",
        wrong.join("\n")
    );
    Ok(())
}

/// Renders the chart for `cloud`, creates it (a strict dry run first), and
/// checks the access table.
async fn install_chart(cluster: &Cluster, tools: &Path, cloud: &str) -> Result<(), String> {
    let objects = manifests(&render(cloud)?)?;
    // The chart's VolumeSnapshotClass needs the snapshot CRDs.
    install_crds(cluster, tools).await?;
    let secret = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": MASTER_SECRET},
        "data": {"master.key": "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
                 "salt": "c2FsdC1zYWx0LXNhbHQtc2FsdC1zYWx0LXNhbHQtMzI="},
    });
    check!(
        cluster
            .admin
            .create(&format!("/api/v1/namespaces/{NAMESPACE}/secrets"), &secret)
            .await
    );

    let mut discovery = Discovery {
        kinds: HashMap::new(),
    };
    create_all(&cluster.admin, &mut discovery, &objects, true).await?;
    // A dry run stores nothing.
    let kms = objects
        .iter()
        .find(|m| m.kind == "Deployment" && m.name.ends_with("-kms"))
        .ok_or("no KMS Deployment rendered")?;
    let kms_path = format!(
        "{}/{}",
        discovery.collection(&cluster.admin, kms).await?,
        kms.name
    );
    let (status, _) = cluster.admin.raw(Method::GET, &kms_path, None).await?;
    ensure!(
        status == StatusCode::NOT_FOUND,
        "after the dry run {kms_path} answers {status}"
    );

    create_all(&cluster.admin, &mut discovery, &objects, false).await?;
    for m in &objects {
        let path = format!(
            "{}/{}",
            discovery.collection(&cluster.admin, m).await?,
            m.name
        );
        check!(cluster.admin.get(&path).await);
    }
    Ok(())
}

async fn chart_applies(tools: &Path, cloud: &str) -> CaseResult {
    let cluster = Cluster::start(tools, &[]).await?;
    install_chart(&cluster, tools, cloud).await?;
    check_access(&cluster.admin).await?;
    // What the chart set up for node-scoped keys, as the API server stored it.
    let kms = check!(
        cluster
            .admin
            .get(&format!(
                "/apis/apps/v1/namespaces/{NAMESPACE}/deployments/cryptdisk-csi-kms"
            ))
            .await
    );
    let args = kms["spec"]["template"]["spec"]["containers"][0]["args"].clone();
    let node_account = format!("--node-service-account={NAMESPACE}/cryptdisk-csi-node");
    for want in [
        "--authorizer=kubernetes",
        "--token-audience=cryptdisk-kms",
        node_account.as_str(),
        "--driver-name=cryptdisk.csi.io",
    ] {
        ensure!(
            args.as_array().is_some_and(|a| a.iter().any(|x| x == want)),
            "the KMS runs without {want}: {args}"
        );
    }
    ensure!(
        !args.to_string().contains("--allow-v1-keys"),
        "the KMS serves v1 keys by default: {args}"
    );
    let ds = check!(
        cluster
            .admin
            .get(&format!(
                "/apis/apps/v1/namespaces/{NAMESPACE}/daemonsets/cryptdisk-csi-node"
            ))
            .await
    );
    let token = ds["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .and_then(|vs| {
            vs.iter()
                .find_map(|v| v["projected"]["sources"][0].get("serviceAccountToken"))
        })
        .cloned()
        .ok_or("the node DaemonSet projects no ServiceAccount token")?;
    ensure!(
        token["audience"] == "cryptdisk-kms" && token["expirationSeconds"] == 600,
        "the node plugin's token: {token}"
    );
    node_token_reviewed_by_the_kms(&cluster, &ds, &token).await
}

/// The node plugin's projected token, made as kubelet makes it for a pod of
/// the chart's DaemonSet on NODE, is accepted by a TokenReview that the KMS
/// makes with its own ServiceAccount's token (real authorization, not a
/// SubjectAccessReview), and names the node plugin's account and its node;
/// the KMS can list what its authorizer watches and no Secret; the node
/// plugin's token is good for nothing but the KMS.
async fn node_token_reviewed_by_the_kms(
    cluster: &Cluster,
    daemonset: &Value,
    projected: &Value,
) -> Result<(), String> {
    let node = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}});
    check!(cluster.admin.create("/api/v1/nodes", &node).await);
    let mut spec = daemonset["spec"]["template"]["spec"].clone();
    spec["nodeName"] = json!(NODE);
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "cryptdisk-csi-node-test",
                     "labels": daemonset["spec"]["template"]["metadata"]["labels"]},
        "spec": spec,
    });
    let pod = check!(
        cluster
            .admin
            .create(&format!("/api/v1/namespaces/{NAMESPACE}/pods"), &pod)
            .await
    );
    let account = pod["spec"]["serviceAccountName"]
        .as_str()
        .ok_or("the node pod has no ServiceAccount")?
        .to_string();
    let audience = projected["audience"].clone();
    let request = json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": {"audiences": [audience], "expirationSeconds": projected["expirationSeconds"],
                 "boundObjectRef": {"kind": "Pod", "apiVersion": "v1",
                                    "name": pod["metadata"]["name"], "uid": pod["metadata"]["uid"]}},
    });
    let answer = check!(
        cluster
            .admin
            .create(
                &format!("/api/v1/namespaces/{NAMESPACE}/serviceaccounts/{account}/token"),
                &request
            )
            .await
    );
    let node_token = answer["status"]["token"]
        .as_str()
        .ok_or_else(|| format!("no token in {answer}"))?
        .to_string();

    let kms_token = service_account_token(&cluster.admin, "cryptdisk-csi-kms").await?;
    let kms = Api::new(&cluster.server, &cluster.ca_pem, &kms_token)?;
    let review = |audience: &Value| {
        json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
               "spec": {"token": node_token, "audiences": [audience]}})
    };
    let reviewed = check!(
        kms.create(
            "/apis/authentication.k8s.io/v1/tokenreviews",
            &review(&audience)
        )
        .await
    );
    let status = &reviewed["status"];
    ensure!(
        status["authenticated"] == json!(true),
        "the KMS's review of the node token: {status}"
    );
    ensure!(
        status["user"]["username"] == json!(format!("system:serviceaccount:{NAMESPACE}:{account}")),
        "the node token is {}",
        status["user"]["username"]
    );
    ensure!(
        status["user"]["extra"]["authentication.kubernetes.io/node-name"] == json!([NODE]),
        "the node token names node {}",
        status["user"]["extra"]
    );
    // Made for the KMS, so no good for the API server.
    let reviewed = check!(
        kms.create(
            "/apis/authentication.k8s.io/v1/tokenreviews",
            &review(&json!("https://kubernetes.default.svc.cluster.local"))
        )
        .await
    );
    ensure!(
        reviewed["status"]["authenticated"] != json!(true),
        "the node token passed a review for the API server's audience"
    );
    let node_api = Api::new(&cluster.server, &cluster.ca_pem, &node_token)?;
    let (code, _) = node_api
        .raw(Method::GET, "/api/v1/persistentvolumes", None)
        .await?;
    ensure!(
        code == StatusCode::UNAUTHORIZED,
        "the node plugin's KMS token got {code} from the API server"
    );
    // What the KMS's authorizer reads, with its own token; no Secret.
    for path in [
        "/apis/storage.k8s.io/v1/volumeattachments",
        "/api/v1/persistentvolumes",
        "/apis/storage.k8s.io/v1/volumeattachments?watch=true&timeoutSeconds=1",
    ] {
        check!(kms.get(path).await);
    }
    for path in [
        "/api/v1/secrets".to_string(),
        format!("/api/v1/namespaces/{NAMESPACE}/secrets/{MASTER_SECRET}"),
    ] {
        let (code, _) = kms.raw(Method::GET, &path, None).await?;
        ensure!(
            code == StatusCode::FORBIDDEN,
            "the KMS's token got {code} for {path}"
        );
    }
    Ok(())
}

/// A ServiceAccount's token from the TokenRequest API (the API server's
/// audience), as kubelet would project it into the account's pod.
async fn service_account_token(api: &Api, account: &str) -> Result<String, String> {
    let request = json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {"expirationSeconds": 3600},
    });
    let answer = check!(
        api.create(
            &format!("/api/v1/namespaces/{NAMESPACE}/serviceaccounts/{account}/token"),
            &request
        )
        .await
    );
    answer["status"]["token"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| format!("no token in {answer}"))
}

/// A kubeconfig that authenticates with `token`, for a sidecar's --kubeconfig.
fn kubeconfig(cluster: &Cluster, name: &str, token: &str) -> Result<PathBuf, String> {
    use base64::Engine as _;
    let ca = base64::engine::general_purpose::STANDARD.encode(&cluster.ca_pem);
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kube-tier", "cluster": {
            "server": cluster.server, "certificate-authority-data": ca}}],
        "users": [{"name": name, "user": {"token": token}}],
        "contexts": [{"name": "kube-tier", "context": {"cluster": "kube-tier", "user": name}}],
        "current-context": "kube-tier",
    });
    let path = cluster.dir.path().join(format!("kubeconfig-{name}.json"));
    check!(std::fs::write(&path, config.to_string()));
    Ok(path)
}

/// Polls `path` until `done` accepts it, failing early when a process died;
/// the failure shows the named processes' logs.
async fn wait_until(
    cluster: &mut Cluster,
    path: &str,
    limit: Duration,
    logs: &[&str],
    done: impl Fn(&Value) -> bool,
) -> Result<Value, String> {
    let deadline = Instant::now() + limit;
    loop {
        cluster.check_alive()?;
        let last = cluster.admin.get(path).await;
        if let Ok(v) = &last
            && done(v)
        {
            return Ok(v.clone());
        }
        if Instant::now() > deadline {
            let tails: Vec<String> = logs
                .iter()
                .map(|l| format!("{l}:\n{}", cluster.log_tail(l, 30)))
                .collect();
            return Err(format!(
                "{path}: not done after {limit:?}: {last:?}\n{}",
                tails.join("\n")
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A merge patch as the administrator (status subresources included).
async fn merge_patch(api: &Api, path: &str, patch: &Value) -> Result<(), String> {
    let (status, body) = api
        .raw(
            Method::PATCH,
            path,
            Some((
                "application/merge-patch+json",
                patch.to_string().into_bytes(),
            )),
        )
        .await?;
    ensure!(status.is_success(), "PATCH {path}: {status}: {body}");
    Ok(())
}

async fn sidecars_reach_the_controller(tools: &Path) -> CaseResult {
    let mut cluster = Cluster::start(tools, &[]).await?;
    install_chart(&cluster, tools, "local").await?;
    let mut ctl = start_controller(&mut cluster).await?;
    let volume = check!(ctl.create_volume(create_req("attached", GIB, &[])).await)
        .into_inner()
        .volume
        .ok_or("no volume")?;

    // The node as kubelet and node-driver-registrar would have registered it.
    let node = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}});
    check!(cluster.admin.create("/api/v1/nodes", &node).await);
    let csinode = json!({
        "apiVersion": "storage.k8s.io/v1", "kind": "CSINode",
        "metadata": {"name": NODE},
        "spec": {"drivers": [{"name": DRIVER, "nodeID": NODE}]},
    });
    check!(
        cluster
            .admin
            .create("/apis/storage.k8s.io/v1/csinodes", &csinode)
            .await
    );

    // A static PV bound to a claim (binding is kube-controller-manager's work,
    // which this cluster does not run: the claim's status is set here).
    let claim = json!({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": "data", "namespace": "default"},
        "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "",
                 "volumeName": "pv-attached",
                 "resources": {"requests": {"storage": volume.capacity_bytes.to_string()}}},
    });
    let claim = check!(
        cluster
            .admin
            .create("/api/v1/namespaces/default/persistentvolumeclaims", &claim)
            .await
    );
    let pv = json!({
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": "pv-attached"},
        "spec": {
            "capacity": {"storage": volume.capacity_bytes.to_string()},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": "",
            "volumeMode": "Filesystem",
            "claimRef": {"kind": "PersistentVolumeClaim", "namespace": "default", "name": "data",
                         "uid": claim["metadata"]["uid"]},
            "csi": {"driver": DRIVER, "volumeHandle": volume.volume_id,
                    "volumeAttributes": volume.volume_context, "fsType": "ext4"},
        },
    });
    check!(cluster.admin.create("/api/v1/persistentvolumes", &pv).await);
    merge_patch(
        &cluster.admin,
        "/api/v1/persistentvolumes/pv-attached/status",
        &json!({"status": {"phase": "Bound"}}),
    )
    .await?;
    merge_patch(
        &cluster.admin,
        "/api/v1/namespaces/default/persistentvolumeclaims/data/status",
        &json!({"status": {"phase": "Bound", "accessModes": ["ReadWriteOnce"],
                "capacity": {"storage": volume.capacity_bytes.to_string()}}}),
    )
    .await?;

    // The sidecars as the chart runs them: as the controller's ServiceAccount,
    // electing a leader in the release namespace.
    let token = service_account_token(&cluster.admin, "cryptdisk-csi-controller").await?;
    let controller_config = kubeconfig(&cluster, "cryptdisk-csi-controller", &token)?;
    let socket = cluster.dir.path().join("controller.sock");
    let sidecar = |bin: &str| {
        let mut cmd = Command::new(tools.join("bin").join(bin));
        cmd.arg(format!("--csi-address={}", socket.display()))
            .arg(format!("--kubeconfig={}", controller_config.display()))
            .arg("--leader-election")
            .arg(format!("--leader-election-namespace={NAMESPACE}"))
            .arg("--timeout=60s")
            .arg("--v=4");
        cmd
    };
    cluster.spawn("csi-attacher", &mut sidecar("csi-attacher"))?;

    // A VolumeAttachment, as the attach/detach controller makes it for a pod
    // on NODE: csi-attacher calls ControllerPublishVolume and reports it.
    let attachment = json!({
        "apiVersion": "storage.k8s.io/v1", "kind": "VolumeAttachment",
        "metadata": {"name": "va-attached"},
        "spec": {"attacher": DRIVER, "nodeName": NODE,
                 "source": {"persistentVolumeName": "pv-attached"}},
    });
    check!(
        cluster
            .admin
            .create("/apis/storage.k8s.io/v1/volumeattachments", &attachment)
            .await
    );
    let va = wait_until(
        &mut cluster,
        "/apis/storage.k8s.io/v1/volumeattachments/va-attached",
        Duration::from_secs(90),
        &["csi-attacher", "controller"],
        |va| va["status"]["attached"] == json!(true),
    )
    .await?;
    // What ControllerPublishVolume answered (local backend: the image file).
    ensure!(
        va["status"]["attachmentMetadata"]
            .as_object()
            .is_some_and(|m| !m.is_empty()),
        "attached without the publish context: {}",
        va["status"]
    );
    // And the controller did publish it there (its own record, not the sidecar's).
    let got = check!(
        ctl.controller_get_volume(ControllerGetVolumeRequest {
            volume_id: volume.volume_id.clone(),
        })
        .await
    )
    .into_inner();
    let published = got.status.map(|s| s.published_node_ids).unwrap_or_default();
    ensure!(
        published == [NODE],
        "the controller has the volume published on {published:?}"
    );

    // A VolumeSnapshot of the claim, through the chart's VolumeSnapshotClass:
    // snapshot-controller (cluster infrastructure, as the administrator) makes
    // its content, csi-snapshotter calls CreateSnapshot.
    let admin_config = kubeconfig(
        &cluster,
        "snapshot-controller",
        cluster_admin_token(&cluster),
    )?;
    cluster.spawn(
        "snapshot-controller",
        Command::new(tools.join("bin/snapshot-controller"))
            .arg(format!("--kubeconfig={}", admin_config.display()))
            .arg("--leader-election=false")
            .arg("--v=4"),
    )?;
    cluster.spawn("csi-snapshotter", &mut sidecar("csi-snapshotter"))?;
    let snapshot = json!({
        "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
        "metadata": {"name": "snap", "namespace": "default"},
        "spec": {"volumeSnapshotClassName": "encrypted-snapshots",
                 "source": {"persistentVolumeClaimName": "data"}},
    });
    check!(
        cluster
            .admin
            .create(
                &format!("{SNAPSHOT_API}/namespaces/default/volumesnapshots"),
                &snapshot
            )
            .await
    );
    let snap = wait_until(
        &mut cluster,
        &format!("{SNAPSHOT_API}/namespaces/default/volumesnapshots/snap"),
        Duration::from_secs(120),
        &["snapshot-controller", "csi-snapshotter", "controller"],
        |s| s["status"]["readyToUse"] == json!(true),
    )
    .await?;
    let content_name = snap["status"]["boundVolumeSnapshotContentName"]
        .as_str()
        .ok_or_else(|| format!("no content in {}", snap["status"]))?;
    let content = check!(
        cluster
            .admin
            .get(&format!(
                "{SNAPSHOT_API}/volumesnapshotcontents/{content_name}"
            ))
            .await
    );
    ensure!(
        content["status"]["snapshotHandle"]
            .as_str()
            .is_some_and(|h| !h.is_empty()),
        "no snapshot handle: {}",
        content["status"]
    );
    ensure!(
        content["status"]["restoreSize"] == json!(volume.capacity_bytes),
        "restoreSize {} is not the volume's {}",
        content["status"]["restoreSize"],
        volume.capacity_bytes
    );
    let listed = check!(
        ctl.list_snapshots(ListSnapshotsRequest {
            source_volume_id: volume.volume_id.clone(),
            ..Default::default()
        })
        .await
    )
    .into_inner();
    ensure!(
        listed.entries.len() == 1,
        "the controller holds {} snapshots of the volume",
        listed.entries.len()
    );
    Ok(())
}

/// The administrator's static token (the snapshot controller is the
/// cluster's, not the chart's: it runs with the administrator's rights).
fn cluster_admin_token(cluster: &Cluster) -> &str {
    cluster.token("cryptdisk-admin")
}
