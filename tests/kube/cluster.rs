//! A throwaway Kubernetes control plane on loopback: etcd and kube-apiserver
//! from the tools `hack/kube-tools` builds, in a temporary directory, with a
//! serving certificate from a CA made here, a service-account signing key,
//! static tokens, and RBAC authorization. Dropping the [`Cluster`] stops every
//! process it started (and those the cases started through it) and removes
//! the directory; the processes also die with the test (PR_SET_PDEATHSIG), so
//! nothing outlives a crash.
//!
//! Reused by every kube case; the node-scoped key tests add their identities
//! (tokens, TokenReview, VolumeAttachments) through the same API client.

use std::fs;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use reqwest::{Method, StatusCode};
use serde_json::Value;

/// The static token of the cluster administrator (group `system:masters`).
const ADMIN_USER: &str = "cryptdisk-admin";

pub struct Cluster {
    pub dir: tempfile::TempDir,
    /// `https://127.0.0.1:<port>`.
    pub server: String,
    /// The serving certificate's CA, PEM.
    pub ca_pem: String,
    /// An API client authenticated as the administrator.
    pub admin: Api,
    /// Static tokens by user name, as written to the token file.
    tokens: Vec<(String, String)>,
    children: Vec<(String, Child)>,
    /// kube-apiserver's command line, to start it again after
    /// [`Cluster::stop_apiserver`] on the same port and etcd.
    apiserver_args: Vec<String>,
    tools: PathBuf,
}

/// A client of the API server with one bearer token.
#[derive(Clone)]
pub struct Api {
    http: reqwest::Client,
    server: String,
    token: String,
}

fn free_port() -> Result<u16, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("binding a port: {e}"))?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

fn random_token() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

impl Cluster {
    /// Starts etcd and kube-apiserver from `tools/bin` and waits until the API
    /// server is ready. `users` get static tokens (no groups), for the cases to
    /// bind with RBAC.
    pub async fn start(tools: &Path, users: &[&str]) -> Result<Cluster, String> {
        let dir = tempfile::Builder::new()
            .prefix("cryptdisk-kube-")
            .tempdir()
            .map_err(|e| format!("temp dir: {e}"))?;
        let d = dir.path().to_path_buf();
        let w = |name: &str, body: &str| -> Result<PathBuf, String> {
            let p = d.join(name);
            fs::write(&p, body).map_err(|e| format!("writing {}: {e}", p.display()))?;
            Ok(p)
        };

        // Serving certificate for 127.0.0.1, from a CA the clients trust.
        let mut ca_params =
            CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "cryptdisk kube tier CA");
        let ca_key = KeyPair::generate().map_err(|e| e.to_string())?;
        let ca_pem = ca_params
            .self_signed(&ca_key)
            .map_err(|e| e.to_string())?
            .pem();
        let mut serving =
            CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
                .map_err(|e| e.to_string())?;
        serving
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let serving_key = KeyPair::generate().map_err(|e| e.to_string())?;
        let serving_cert = serving
            .signed_by(&serving_key, &Issuer::new(ca_params, &ca_key))
            .map_err(|e| e.to_string())?;
        w("ca.crt", &ca_pem)?;
        let cert_file = w("apiserver.crt", &serving_cert.pem())?;
        let key_file = w("apiserver.key", &serving_key.serialize_pem())?;

        // Service-account tokens are signed with this key (ES256).
        let sa_key = KeyPair::generate().map_err(|e| e.to_string())?;
        let sa_key_file = w("sa.key", &sa_key.serialize_pem())?;
        let sa_pub_file = w("sa.pub", &sa_key.public_key_pem())?;

        let admin_token = random_token();
        let mut tokens = vec![(ADMIN_USER.to_string(), admin_token.clone())];
        let mut lines = format!("{admin_token},{ADMIN_USER},{ADMIN_USER},\"system:masters\"\n");
        for u in users {
            let t = random_token();
            lines.push_str(&format!("{t},{u},{u}\n"));
            tokens.push((u.to_string(), t));
        }
        let token_file = w("tokens.csv", &lines)?;

        let mut cluster = Cluster {
            server: String::new(),
            ca_pem: ca_pem.clone(),
            admin: Api::new("", &ca_pem, &admin_token)?,
            tokens,
            children: Vec::new(),
            apiserver_args: Vec::new(),
            tools: tools.to_path_buf(),
            dir,
        };

        let etcd_port = free_port()?;
        let peer_port = free_port()?;
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        cluster.spawn(
            "etcd",
            Command::new(tools.join("bin/etcd"))
                .arg("--name=kube-tier")
                .arg(format!("--data-dir={}", d.join("etcd").display()))
                .arg(format!("--listen-client-urls={etcd_url}"))
                .arg(format!("--advertise-client-urls={etcd_url}"))
                .arg(format!("--listen-peer-urls={peer_url}"))
                .arg(format!("--initial-advertise-peer-urls={peer_url}"))
                .arg(format!("--initial-cluster=kube-tier={peer_url}"))
                // A test cluster: durability buys nothing, fsyncs cost seconds.
                .arg("--unsafe-no-fsync"),
        )?;

        let port = free_port()?;
        cluster.server = format!("https://127.0.0.1:{port}");
        cluster.apiserver_args = [
            format!("--etcd-servers={etcd_url}"),
            "--bind-address=127.0.0.1".to_string(),
            "--advertise-address=127.0.0.1".to_string(),
            format!("--secure-port={port}"),
            format!("--cert-dir={}", d.join("certs").display()),
            format!("--tls-cert-file={}", cert_file.display()),
            format!("--tls-private-key-file={}", key_file.display()),
            format!("--token-auth-file={}", token_file.display()),
            format!(
                "--service-account-signing-key-file={}",
                sa_key_file.display()
            ),
            format!("--service-account-key-file={}", sa_pub_file.display()),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".to_string(),
            "--authorization-mode=RBAC".to_string(),
            // As every real cluster that runs CSI node plugins (kubeadm sets
            // it): the chart's node DaemonSet is privileged.
            "--allow-privileged=true".to_string(),
            "--service-cluster-ip-range=10.96.0.0/24".to_string(),
            "--enable-priority-and-fairness=false".to_string(),
            "--profiling=false".to_string(),
        ]
        .to_vec();
        cluster.start_apiserver()?;
        cluster.admin = Api::new(&cluster.server, &ca_pem, &admin_token)?;
        cluster.wait_ready(Duration::from_secs(120)).await?;
        Ok(cluster)
    }

    /// Starts kube-apiserver (again) with the command line of the first start.
    pub fn start_apiserver(&mut self) -> Result<(), String> {
        let mut cmd = Command::new(self.tools.join("bin/kube-apiserver"));
        cmd.args(&self.apiserver_args);
        self.spawn("kube-apiserver", &mut cmd)
    }

    /// Stops kube-apiserver (SIGTERM, then SIGKILL), leaving etcd and the rest
    /// running: to show what clients do while the control plane is down.
    pub fn stop_apiserver(&mut self) {
        if let Some(i) = self
            .children
            .iter()
            .position(|(n, _)| n == "kube-apiserver")
        {
            let (_, child) = self.children.remove(i);
            stop_child(child);
        }
    }

    /// Starts kube-apiserver after [`Cluster::stop_apiserver`] and waits until
    /// it is ready.
    pub async fn restart_apiserver(&mut self) -> Result<(), String> {
        self.start_apiserver()?;
        self.wait_ready(Duration::from_secs(120)).await
    }

    /// Starts a process whose output goes to `<dir>/<name>.log` and which dies
    /// with this one.
    pub fn spawn(&mut self, name: &str, cmd: &mut Command) -> Result<(), String> {
        let log_path = self.log_path(name);
        // Appending: a process started again keeps its earlier output.
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("{name} log: {e}"))?;
        let err = log.try_clone().map_err(|e| e.to_string())?;
        // SAFETY: prctl is async-signal-safe, and nothing else runs in the child
        // before exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("starting {name}: {e}"))?;
        self.children.push((name.to_string(), child));
        Ok(())
    }

    pub fn log_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    /// The last lines of a process's log, for a failure message.
    pub fn log_tail(&self, name: &str, lines: usize) -> String {
        let text = fs::read_to_string(self.log_path(name)).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Fails when a process this cluster started has exited.
    pub fn check_alive(&mut self) -> Result<(), String> {
        for (name, child) in &mut self.children {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "{name} exited ({status}):\n{}",
                    fs::read_to_string(self.dir.path().join(format!("{name}.log")))
                        .unwrap_or_default()
                        .lines()
                        .rev()
                        .take(30)
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev()
                        .collect::<Vec<_>>()
                        .join("\n")
                ));
            }
        }
        Ok(())
    }

    async fn wait_ready(&mut self, limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        loop {
            self.check_alive()?;
            if let Ok((StatusCode::OK, _)) = self.admin.raw(Method::GET, "/readyz", None).await {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "kube-apiserver not ready after {limit:?}:\n{}",
                    self.log_tail("kube-apiserver", 30)
                ));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The static token of `user` (one of those given to [`Cluster::start`]).
    pub fn token(&self, user: &str) -> &str {
        self.tokens
            .iter()
            .find(|(u, _)| u == user)
            .map(|(_, t)| t.as_str())
            .unwrap_or_else(|| panic!("no token for {user}"))
    }

    /// A kubeconfig that authenticates as `user`, for a sidecar's --kubeconfig.
    pub fn kubeconfig(&self, user: &str) -> Result<PathBuf, String> {
        self.kubeconfig_with_token(user, self.token(user))
    }

    /// A kubeconfig that authenticates with `token` (a service account's, say),
    /// written as `kubeconfig-<name>.json`.
    pub fn kubeconfig_with_token(&self, name: &str, token: &str) -> Result<PathBuf, String> {
        use base64::Engine as _;
        let ca = base64::engine::general_purpose::STANDARD.encode(&self.ca_pem);
        let config = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "kube-tier", "cluster": {
                "server": self.server, "certificate-authority-data": ca}}],
            "users": [{"name": name, "user": {"token": token}}],
            "contexts": [{"name": "kube-tier", "context": {"cluster": "kube-tier", "user": name}}],
            "current-context": "kube-tier",
        });
        let path = self.dir.path().join(format!("kubeconfig-{name}.json"));
        fs::write(&path, config.to_string()).map_err(|e| e.to_string())?;
        Ok(path)
    }
}

fn stop_child(mut child: Child) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Clients first, the API server, then etcd: the reverse of the start.
        while let Some((_, child)) = self.children.pop() {
            stop_child(child);
        }
    }
}

impl Api {
    pub fn new(server: &str, ca_pem: &str, token: &str) -> Result<Api, String> {
        let ca = reqwest::Certificate::from_pem(ca_pem.as_bytes()).map_err(|e| e.to_string())?;
        let http = cryptdisk_csi::cloud::http_client_builder()
            .tls_certs_only([ca])
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Api {
            http,
            server: server.to_string(),
            token: token.to_string(),
        })
    }

    /// One request; the status and the body (JSON, or the text as a string).
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<(StatusCode, Value), String> {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.server))
            .bearer_auth(&self.token);
        if let Some((content_type, bytes)) = body {
            req = req.header("content-type", content_type).body(bytes);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| format!("{method} {path}: {e}"))?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| e.to_string())?;
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((status, value))
    }

    /// A request that must succeed (2xx); its JSON answer.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, String> {
        let bytes = body.map(|b| ("application/json", b.to_string().into_bytes()));
        let (status, value) = self.raw(method.clone(), path, bytes).await?;
        if !status.is_success() {
            return Err(format!("{method} {path}: {status}: {value}"));
        }
        Ok(value)
    }

    pub async fn get(&self, path: &str) -> Result<Value, String> {
        self.call(Method::GET, path, None).await
    }

    pub async fn create(&self, collection: &str, object: &Value) -> Result<Value, String> {
        self.call(Method::POST, collection, Some(object)).await
    }

    /// A JSON merge patch of `path` (an object or a subresource such as
    /// `.../status`); the object after it.
    pub async fn merge_patch(&self, path: &str, patch: &Value) -> Result<Value, String> {
        let body = (
            "application/merge-patch+json",
            patch.to_string().into_bytes(),
        );
        let (status, value) = self.raw(Method::PATCH, path, Some(body)).await?;
        if !status.is_success() {
            return Err(format!("PATCH {path}: {status}: {value}"));
        }
        Ok(value)
    }

    pub async fn delete(&self, path: &str) -> Result<Value, String> {
        self.call(Method::DELETE, path, None).await
    }

    /// Creates an object from a YAML manifest as published (the API server
    /// reads YAML itself).
    pub async fn create_yaml(&self, collection: &str, yaml: &str) -> Result<Value, String> {
        let (status, value) = self
            .raw(
                Method::POST,
                collection,
                Some(("application/yaml", yaml.as_bytes().to_vec())),
            )
            .await?;
        if !status.is_success() {
            return Err(format!("POST {collection}: {status}: {value}"));
        }
        Ok(value)
    }

    /// Polls `path` until `done` accepts the object, or fails after `limit`.
    pub async fn wait_for(
        &self,
        path: &str,
        limit: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Result<Value, String> {
        let deadline = Instant::now() + limit;
        loop {
            let last = self.get(path).await;
            if let Ok(v) = &last
                && done(v)
            {
                return Ok(v.clone());
            }
            if Instant::now() > deadline {
                return Err(format!("{path}: not there after {limit:?}: {last:?}"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
