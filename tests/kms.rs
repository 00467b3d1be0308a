//! The real `cryptdisk-csi kms` over TCP loopback with mutual TLS: a node with a
//! certificate from the cluster CA gets the derived key; a certificate from
//! another CA, an expired one, no certificate at all, and plaintext are refused.
//! Every request leaves one audit line with the client's identity and the key
//! id, never the key. The node's client retries an unreachable KMS, then says
//! UNAVAILABLE.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cryptdisk_csi::kms::client::{GrpcKeySource, KmsAddress};
use cryptdisk_csi::kms::tls::TlsFiles;
use cryptdisk_csi::kms::{Derivation, KeyError, KeyRequest, KeySource, derive_data_key};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};

const BIN: &str = env!("CARGO_BIN_EXE_cryptdisk-csi");
const KEY_ID: &str = "6f2a7c54-2d39-4c4e-9b0e-1a3d5f7b9c11";

/// A request for the v1 key of [`KEY_ID`] (the derivation these cases check),
/// from master-secret `version`.
fn v1(version: Option<u32>) -> KeyRequest<'static> {
    KeyRequest {
        volume_id: "local:node-1:disk-1",
        data_key_id: KEY_ID,
        derivation: Derivation::V1,
        len: 32,
        version,
    }
}

struct Pki {
    dir: tempfile::TempDir,
}

struct Ca {
    params: CertificateParams,
    key: KeyPair,
    pem: String,
}

fn ca(name: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate().unwrap();
    let pem = params.self_signed(&key).unwrap().pem();
    Ca { params, key, pem }
}

/// A leaf certificate for `dns`, signed by `ca`; `expired` puts its validity in
/// the past. Returns (cert PEM, key PEM).
fn leaf(ca: &Ca, dns: &str, client: bool, expired: bool) -> (String, String) {
    let mut params = CertificateParams::new(vec![dns.to_string()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, dns);
    params.extended_key_usages = vec![if client {
        ExtendedKeyUsagePurpose::ClientAuth
    } else {
        ExtendedKeyUsagePurpose::ServerAuth
    }];
    if expired {
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }
    let key = KeyPair::generate().unwrap();
    let issuer = Issuer::new(ca.params.clone(), &ca.key);
    let cert = params.signed_by(&key, &issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

impl Pki {
    fn write(&self, name: &str, body: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, body).unwrap();
        p
    }

    fn client(&self, ca: &Path, name: &str, pair: (String, String)) -> TlsFiles {
        TlsFiles {
            cert: self.write(&format!("{name}.crt"), &pair.0),
            key: self.write(&format!("{name}.key"), &pair.1),
            ca: ca.to_path_buf(),
        }
    }
}

struct Kms {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Kms {
    /// A KMS that serves the legacy v1 methods these cases test (the node's
    /// client asks with GetVersionedDataKey): no per-volume authorizer, and
    /// `--allow-v1-keys`.
    fn start(args: &[String], log: PathBuf) -> Kms {
        Kms::start_with_fd_limit(args, log, None)
    }

    /// As [`Kms::start`], with the process's soft limit on open files set to
    /// `fds` (as many container runtimes start it at 1024).
    fn start_with_fd_limit(args: &[String], log: PathBuf, fds: Option<u64>) -> Kms {
        let mut args = args.to_vec();
        args.extend(["--authorizer=none".into(), "--allow-v1-keys".into()]);
        Kms::spawn(&args, log, fds)
    }

    /// The KMS with exactly `args` (its defaults: no v1 keys).
    fn spawn(args: &[String], log: PathBuf, fds: Option<u64>) -> Kms {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // A unix socket given in `args` replaces the TCP port.
        let unix = args
            .iter()
            .find_map(|a| a.strip_prefix("--listen=unix://"))
            .map(PathBuf::from);
        let mut cmd = Command::new(BIN);
        cmd.args(["--log-level", "info"]).arg("kms");
        if unix.is_none() {
            cmd.arg(format!("--listen=tcp://127.0.0.1:{port}"));
        }
        if let Some(fds) = fds {
            use std::os::unix::process::CommandExt;
            // SAFETY: only async-signal-safe calls between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let mut limit = libc::rlimit {
                        rlim_cur: 0,
                        rlim_max: 0,
                    };
                    if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    limit.rlim_cur = fds.min(limit.rlim_max);
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd
            .args(args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let up = || match &unix {
            Some(path) => std::os::unix::net::UnixStream::connect(path).is_ok(),
            None => std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
        };
        while !up() {
            assert!(Instant::now() < deadline, "the KMS never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
        Kms { child, port, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Kms {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn secret_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_serves_the_cluster_ca_and_refuses_the_rest() {
    let pki = Pki {
        dir: tempfile::tempdir().unwrap(),
    };
    let cluster = ca("cryptdisk cluster CA");
    let other = ca("some other CA");
    let ca_file = pki.write("ca.crt", &cluster.pem);
    let (server_cert, server_key) = leaf(&cluster, "localhost", false, false);
    let master = [7u8; 32];
    let salt = [9u8; 32];
    let args = vec![
        format!(
            "--tls-cert-file={}",
            pki.write("kms.crt", &server_cert).display()
        ),
        format!(
            "--tls-key-file={}",
            pki.write("kms.key", &server_key).display()
        ),
        format!("--client-ca-file={}", ca_file.display()),
        format!(
            "--master-secret-file={}",
            secret_file(pki.dir.path(), "master", &master).display()
        ),
        format!(
            "--salt-file={}",
            secret_file(pki.dir.path(), "salt", &salt).display()
        ),
    ];
    let kms = Kms::start(&args, pki.dir.path().join("kms.log"));
    let address: KmsAddress = format!("https://localhost:{}", kms.port).parse().unwrap();

    // A node certificate from the cluster CA: served, the same key as derived.
    let good = pki.client(
        &ca_file,
        "node",
        leaf(&cluster, "node-1.cluster", true, false),
    );
    let source = GrpcKeySource::new(&address, Some(&good), false).unwrap();
    let (key, version) = source.volume_key(&v1(None)).await.unwrap();
    let want = derive_data_key(&master, &salt, KEY_ID, 32).unwrap();
    assert_eq!(key.expose(), want.expose());
    assert_eq!(version, 1);

    // Refused: another CA's certificate, an expired one.
    for (name, pair) in [
        ("other-ca", leaf(&other, "node-2.cluster", true, false)),
        ("expired", leaf(&cluster, "node-3.cluster", true, true)),
    ] {
        let files = pki.client(&ca_file, name, pair);
        let source = GrpcKeySource::new(&address, Some(&files), false).unwrap();
        let err = source.volume_key(&v1(None)).await.err().expect("refused");
        eprintln!("{name}: {err}");
        assert!(err.to_string().contains("transport error"), "{name}: {err}");
    }

    // Refused: TLS without a client certificate, and plaintext.
    let ca_cert = tonic::transport::Certificate::from_pem(cluster.pem.clone());
    let bare = tonic::transport::Endpoint::from_shared(format!("https://localhost:{}", kms.port))
        .unwrap()
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(ca_cert)
                .domain_name("localhost"),
        )
        .unwrap()
        .connect_lazy();
    let plain = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", kms.port))
        .unwrap()
        .connect_lazy();
    for (name, channel) in [("no client certificate", bare), ("plaintext", plain)] {
        let mut client = cryptdisk_csi::proto::kms::api_client::ApiClient::new(channel);
        let r = client
            .get_data_key(cryptdisk_csi::proto::kms::GetDataKeyRequest {
                data_key_id: KEY_ID.into(),
                length: 32,
            })
            .await;
        assert!(r.is_err(), "{name} was served");
    }

    // One audit line for the one request served, naming the node and the key.
    let log = kms.log();
    let served: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("volume key served"))
        .collect();
    assert_eq!(served.len(), 1, "{log}");
    assert!(served[0].contains("client=node-1.cluster"), "{}", served[0]);
    assert!(served[0].contains(KEY_ID), "{}", served[0]);
    assert!(
        !log.contains(&hex::encode(want.expose())),
        "key bytes in the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_kms_is_retried_then_unavailable() {
    // Nothing listens on this port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let address: KmsAddress = format!("tcp://127.0.0.1:{port}").parse().unwrap();
    assert!(
        GrpcKeySource::new(&address, None, false).is_err(),
        "plaintext allowed without --kms-insecure"
    );
    let source = GrpcKeySource::new(&address, None, true).unwrap();
    let started = Instant::now();
    let err = source.volume_key(&v1(None)).await.err().expect("refused");
    let took = started.elapsed();
    match err {
        KeyError::Unavailable(msg) => assert!(msg.contains("after 3 attempt(s)"), "{msg}"),
        other => panic!("{other:?}"),
    }
    // Two pauses of at least 200 ms and 400 ms between the three attempts.
    // (The plaintext KMS below shows the retries end where the KMS answers.)
    assert!(took >= Duration::from_millis(600), "{took:?}");
}

#[test]
fn the_kms_refuses_to_start_without_tls_or_insecure() {
    let out = Command::new(BIN)
        .args([
            "kms",
            "--master-secret-file=/nonexistent",
            "--salt-file=/nonexistent",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("mutual TLS"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_the_current_one_for_new_keys_and_version_one_for_get_data_key() {
    let dir = tempfile::tempdir().unwrap();
    let master = secret_file(dir.path(), "master.key", &[1; 32]);
    let salt = secret_file(dir.path(), "salt", &[2; 32]);
    let out = Command::new(BIN)
        .args([
            "add-key-version",
            &format!("--master-secret-file={}", master.display()),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v2 = std::fs::read(dir.path().join("master.key-v2")).unwrap();
    assert_eq!(v2.len(), 32);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("master.key-v2"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let socket = dir.path().join("kms.sock");
    let kms = Kms::start(
        &[
            format!("--listen=unix://{}", socket.display()),
            "--insecure".into(),
            format!("--master-secret-file={}", master.display()),
            format!("--salt-file={}", salt.display()),
        ],
        dir.path().join("kms.log"),
    );
    let _ = kms.port;
    let address: KmsAddress = format!("unix://{}", socket.display()).parse().unwrap();
    let source = GrpcKeySource::new(&address, None, false).unwrap();
    let (current, version) = source.volume_key(&v1(None)).await.unwrap();
    assert_eq!(version, 2);
    assert_eq!(
        current.expose(),
        derive_data_key(&v2, &[2; 32], KEY_ID, 32).unwrap().expose()
    );
    let (first, version) = source.volume_key(&v1(Some(1))).await.unwrap();
    assert_eq!(version, 1);
    let v1_key = derive_data_key(&[1; 32], &[2; 32], KEY_ID, 32).unwrap();
    assert_eq!(first.expose(), v1_key.expose());
    let missing = source
        .volume_key(&v1(Some(9)))
        .await
        .err()
        .expect("refused");
    assert!(missing.to_string().contains("version 9"), "{missing}");
    // Constellation's GetDataKey keeps serving version 1.
    let channel = cryptdisk_csi::client::connect(
        &cryptdisk_csi::config::Endpoint::Unix(socket.clone()),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let plain = cryptdisk_csi::proto::kms::api_client::ApiClient::new(channel)
        .get_data_key(cryptdisk_csi::proto::kms::GetDataKeyRequest {
            data_key_id: KEY_ID.into(),
            length: 32,
        })
        .await
        .unwrap()
        .into_inner()
        .data_key;
    assert_eq!(plain, v1_key.expose());
}

/// A GCP fake: the metadata server's token endpoint and Cloud KMS's decrypt for
/// one key, checking headers, path and body; the "decryption" reverses the
/// bytes. Any other key gets Cloud KMS's 403 error shape.
async fn gcp_fake() -> std::net::SocketAddr {
    use base64::Engine;
    use cryptdisk_csi::test_http::{self, Answer, Exchange};
    let base = test_http::serve(|_| {
        |x: Exchange| {
            let reply = |status: u16, body: String| Answer {
                status,
                headers: vec![("content-type".into(), "application/json".into())],
                body: body.into_bytes(),
            };
            if x.path == "/computeMetadata/v1/instance/service-accounts/default/token" {
                if x.header("metadata-flavor") != "Google" {
                    return reply(403, "missing Metadata-Flavor".into());
                }
                return reply(200, r#"{"access_token":"fake-token","expires_in":3599,"token_type":"Bearer"}"#.into());
            }
            if x.path != "/v1/projects/p/locations/global/keyRings/r/cryptoKeys/k:decrypt" {
                return reply(403, r#"{"error":{"code":403,"message":"Permission 'cloudkms.cryptoKeyVersions.useToDecrypt' denied","status":"PERMISSION_DENIED"}}"#.into());
            }
            if x.header("authorization") != "Bearer fake-token" {
                return reply(401, r#"{"error":{"code":401,"message":"no token","status":"UNAUTHENTICATED"}}"#.into());
            }
            let json: serde_json::Value = serde_json::from_slice(&x.body).unwrap();
            let b64 = base64::engine::general_purpose::STANDARD;
            let mut bytes = b64.decode(json["ciphertext"].as_str().unwrap()).unwrap();
            bytes.reverse();
            reply(200, format!(r#"{{"plaintext":"{}"}}"#, b64.encode(bytes)))
        }
    })
    .await;
    base.trim_start_matches("http://").parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_secret_wrapped_by_gcp_kms_is_unwrapped_at_start() {
    let fake = gcp_fake().await;
    let dir = tempfile::tempdir().unwrap();
    let plain: Vec<u8> = (1..=32).collect();
    let mut wrapped = plain.clone();
    wrapped.reverse();
    let master = secret_file(dir.path(), "master.key", &wrapped);
    let salt = secret_file(dir.path(), "salt", &[2; 32]);
    let start = |key: &str, log: &str| {
        let socket = dir.path().join(format!("{log}.sock"));
        let child = Command::new(BIN)
            .arg("kms")
            .arg(format!("--listen=unix://{}", socket.display()))
            .arg("--insecure")
            .arg(format!("--master-secret-file={}", master.display()))
            .arg(format!("--salt-file={}", salt.display()))
            .arg(format!("--master-secret-wrapped-by={key}"))
            .args(["--authorizer=none", "--allow-v1-keys"])
            .env("GCE_METADATA_HOST", fake.to_string())
            .env("CRYPTDISK_GCP_KMS_ENDPOINT", format!("http://{fake}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join(log)).unwrap())
            .spawn()
            .unwrap();
        (child, socket)
    };

    let (mut child, socket) = start(
        "gcp-kms:projects/p/locations/global/keyRings/r/cryptoKeys/k",
        "good",
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(Instant::now() < deadline, "the KMS never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    let address: KmsAddress = format!("unix://{}", socket.display()).parse().unwrap();
    let (key, _) = GrpcKeySource::new(&address, None, false)
        .unwrap()
        .volume_key(&v1(None))
        .await
        .unwrap();
    let want = derive_data_key(&plain, &[2; 32], KEY_ID, 32).unwrap();
    assert_eq!(key.expose(), want.expose());
    let _ = child.kill();
    let _ = child.wait();

    // A key the service account may not use: the KMS does not start, and says why.
    let (child, _) = start(
        "gcp-kms:projects/p/locations/global/keyRings/r/cryptoKeys/other",
        "denied",
    );
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let log = std::fs::read_to_string(dir.path().join("denied")).unwrap();
    assert!(log.contains("PERMISSION_DENIED"), "{log}");
}

/// `--insecure` hands keys to whoever reaches the port: the KMS refuses to start
/// with it on any address but a unix socket or loopback, and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insecure_is_refused_off_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let master = secret_file(dir.path(), "master.key", &[1; 32]);
    let salt = secret_file(dir.path(), "salt", &[2; 32]);
    let port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    for listen in [
        format!("tcp://0.0.0.0:{}", port()),
        format!("tcp://[::]:{}", port()),
    ] {
        let mut child = Command::new(BIN)
            .args(["kms", "--insecure"])
            .arg(format!("--listen={listen}"))
            .arg(format!("--master-secret-file={}", master.display()))
            .arg(format!("--salt-file={}", salt.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the KMS started on {listen} with --insecure");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(!status.success(), "{listen}");
        let mut err = String::new();
        use std::io::Read;
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        assert!(err.contains("--insecure"), "{listen}: {err}");
        assert!(err.contains("loopback"), "{listen}: {err}");
    }

    // On loopback it starts and serves.
    let kms = Kms::start(
        &[
            "--insecure".into(),
            format!("--master-secret-file={}", master.display()),
            format!("--salt-file={}", salt.display()),
        ],
        dir.path().join("kms.log"),
    );
    let address: KmsAddress = format!("tcp://127.0.0.1:{}", kms.port).parse().unwrap();
    let (key, _) = GrpcKeySource::new(&address, None, true)
        .unwrap()
        .volume_key(&v1(None))
        .await
        .unwrap();
    let want = derive_data_key(&[1; 32], &[2; 32], KEY_ID, 32).unwrap();
    assert_eq!(key.expose(), want.expose());
}

/// The KMS's TLS files for a test: (KMS arguments, the cluster CA, its file).
fn tls_kms_args(pki: &Pki, master: &[u8], salt: &[u8]) -> (Vec<String>, Ca, PathBuf) {
    let cluster = ca("cryptdisk cluster CA");
    let ca_file = pki.write("ca.crt", &cluster.pem);
    let (server_cert, server_key) = leaf(&cluster, "localhost", false, false);
    let args = vec![
        format!(
            "--tls-cert-file={}",
            pki.write("kms.crt", &server_cert).display()
        ),
        format!(
            "--tls-key-file={}",
            pki.write("kms.key", &server_key).display()
        ),
        format!("--client-ca-file={}", ca_file.display()),
        format!(
            "--master-secret-file={}",
            secret_file(pki.dir.path(), "master", master).display()
        ),
        format!(
            "--salt-file={}",
            secret_file(pki.dir.path(), "salt", salt).display()
        ),
    ];
    (args, cluster, ca_file)
}

/// Raises this test process's soft limit on open files to its hard limit and
/// returns it.
fn raise_own_fd_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain libc calls on a local struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
    limit.rlim_cur
}

/// A thousand idle connections that never start TLS, and a request of 1 MiB,
/// while a node asks for its key: the node gets it in time; the oversized
/// request is refused before it is read; the idle connections are dropped when
/// their handshake time runs out. The KMS starts with a soft limit of 256 open
/// files (as containers often do) and must raise it rather than fail to accept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_and_oversized_requests_do_not_starve_a_node() {
    const IDLE: usize = 1000;
    let own = raise_own_fd_limit();
    assert!(
        own > IDLE as u64 + 200,
        "this test needs {} open files; the hard limit is {own}",
        IDLE + 200
    );
    let pki = Pki {
        dir: tempfile::tempdir().unwrap(),
    };
    let (master, salt) = ([5u8; 32], [6u8; 32]);
    let (mut args, cluster, ca_file) = tls_kms_args(&pki, &master, &salt);
    args.push("--tls-handshake-timeout-seconds=2".into());
    let kms = Kms::start_with_fd_limit(&args, pki.dir.path().join("kms.log"), Some(256));

    let mut idle = Vec::with_capacity(IDLE);
    for _ in 0..IDLE {
        match std::net::TcpStream::connect_timeout(
            &([127, 0, 0, 1], kms.port).into(),
            Duration::from_secs(2),
        ) {
            Ok(stream) => idle.push(stream),
            Err(e) => panic!("connection {} refused: {e}", idle.len()),
        }
    }

    let node = pki.client(
        &ca_file,
        "node",
        leaf(&cluster, "node-1.cluster", true, false),
    );
    let address: KmsAddress = format!("https://localhost:{}", kms.port).parse().unwrap();
    let source = GrpcKeySource::new(&address, Some(&node), false).unwrap();
    let started = Instant::now();
    let (key, _) = tokio::time::timeout(Duration::from_secs(5), source.volume_key(&v1(None)))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "no key within 5 s beside {IDLE} idle connections:\n{}",
                kms.log()
            )
        })
        .unwrap();
    assert_eq!(
        key.expose(),
        derive_data_key(&master, &salt, KEY_ID, 32)
            .unwrap()
            .expose()
    );
    eprintln!(
        "key served in {:?} beside {IDLE} idle connections",
        started.elapsed()
    );

    // A megabyte of key id (under gRPC's default 4 MiB limit): refused from the
    // message's length prefix, with a code that says so, not decoded and then
    // found too long.
    let channel =
        tonic::transport::Endpoint::from_shared(format!("https://localhost:{}", kms.port))
            .unwrap()
            .tls_config(node.client_config("localhost").unwrap())
            .unwrap()
            .connect()
            .await
            .unwrap();
    let mut client = cryptdisk_csi::proto::kms::api_client::ApiClient::new(channel);
    let status = client
        .get_data_key(cryptdisk_csi::proto::kms::GetDataKeyRequest {
            data_key_id: "x".repeat(1 << 20),
            length: 32,
        })
        .await
        .err()
        .expect("a 1 MiB request was served");
    assert!(
        matches!(
            status.code(),
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
        ),
        "{status:?}"
    );
    assert!(status.message().contains("too large"), "{status:?}");
    // The same connection still serves a proper request.
    let ok = client
        .get_data_key(cryptdisk_csi::proto::kms::GetDataKeyRequest {
            data_key_id: KEY_ID.into(),
            length: 32,
        })
        .await
        .unwrap();
    assert_eq!(ok.into_inner().data_key.len(), 32);

    // The idle connections never sent a ClientHello: closed once their two
    // seconds are up.
    let deadline = Instant::now() + Duration::from_secs(10);
    for stream in idle.iter_mut().step_by(50) {
        use std::io::Read;
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(10));
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut [0u8; 64]) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("an idle connection is still open: {other:?}"),
        }
    }
}

/// GetVolumeKey over the real binary: the v2 key under the volume's scope; a
/// KMS without `--allow-v1-keys` refuses every v1 key (GetDataKey,
/// GetVersionedDataKey, DERIVATION_V1) with PERMISSION_DENIED; each request
/// leaves one audit line with the volume and key id, never the key or token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_volume_key_serves_v2_and_v1_keys_only_when_allowed() {
    use cryptdisk_csi::proto::kms::{
        Derivation, GetDataKeyRequest, GetVersionedDataKeyRequest, GetVolumeKeyRequest,
        api_client::ApiClient,
    };
    let dir = tempfile::tempdir().unwrap();
    let master = secret_file(dir.path(), "master.key", &[1; 32]);
    let salt = secret_file(dir.path(), "salt", &[2; 32]);
    let socket = dir.path().join("kms.sock");
    let kms = Kms::spawn(
        &[
            format!("--listen=unix://{}", socket.display()),
            "--insecure".into(),
            "--authorizer=none".into(),
            format!("--master-secret-file={}", master.display()),
            format!("--salt-file={}", salt.display()),
        ],
        dir.path().join("kms.log"),
        None,
    );
    let channel = cryptdisk_csi::client::connect(
        &cryptdisk_csi::config::Endpoint::Unix(socket.clone()),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let mut api = ApiClient::new(channel);
    let token = "secret-token-never-logged";
    let volume_key = |derivation: Derivation| {
        let mut r = tonic::Request::new(GetVolumeKeyRequest {
            data_key_id: KEY_ID.into(),
            length: 32,
            key_version: 0,
            volume_id: "local:node-a:vol-1".into(),
            derivation: derivation.into(),
        });
        r.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        r
    };
    let got = api
        .get_volume_key(volume_key(Derivation::Unspecified))
        .await
        .unwrap()
        .into_inner();
    let want =
        cryptdisk_csi::kms::derive_scoped_key(&[1; 32], &[2; 32], "local:node-a:vol-1", KEY_ID, 32)
            .unwrap();
    assert_eq!(got.data_key, want.expose());
    assert_eq!(got.key_version, 1);
    assert_eq!(got.derivation, i32::from(Derivation::V2));
    let v2 = api
        .get_volume_key(volume_key(Derivation::V2))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v2.data_key, want.expose());

    let v1 = api
        .get_volume_key(volume_key(Derivation::V1))
        .await
        .unwrap_err();
    assert_eq!(v1.code(), tonic::Code::PermissionDenied, "{v1:?}");
    assert!(v1.message().contains("--allow-v1-keys"), "{v1:?}");
    let legacy = api
        .get_data_key(GetDataKeyRequest {
            data_key_id: KEY_ID.into(),
            length: 32,
        })
        .await
        .map(drop)
        .expect_err("refused");
    assert_eq!(legacy.code(), tonic::Code::PermissionDenied, "{legacy:?}");
    let versioned = api
        .get_versioned_data_key(GetVersionedDataKeyRequest {
            data_key_id: KEY_ID.into(),
            length: 32,
            key_version: 0,
        })
        .await
        .map(drop)
        .expect_err("refused");
    assert_eq!(versioned.code(), tonic::Code::PermissionDenied);
    // Bad requests are refused before any authorization.
    let mut bad = volume_key(Derivation::V2);
    bad.get_mut().volume_id.clear();
    assert_eq!(
        api.get_volume_key(bad).await.unwrap_err().code(),
        tonic::Code::InvalidArgument
    );
    let mut bad = volume_key(Derivation::V2);
    bad.get_mut().derivation = 7;
    assert_eq!(
        api.get_volume_key(bad).await.unwrap_err().code(),
        tonic::Code::InvalidArgument
    );

    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = kms.log();
    assert!(log.contains("UNSAFE: --authorizer none"), "{log}");
    let served: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("volume key served"))
        .collect();
    assert_eq!(served.len(), 2, "{log}");
    for line in &served {
        assert!(
            line.contains("local:node-a:vol-1") && line.contains(KEY_ID),
            "{line}"
        );
        assert!(line.contains("v2"), "{line}");
    }
    assert!(
        log.lines().any(|l| l.contains("volume key refused")
            && l.contains("v1")
            && l.contains("PermissionDenied")),
        "{log}"
    );
    assert!(log.lines().any(|l| l.contains("data key refused")), "{log}");
    assert!(!log.contains(token), "{log}");
    assert!(!log.contains(&hex::encode(want.expose())), "{log}");
}

/// `--authorizer none` only where nothing but this machine can connect, and
/// `--authorizer kubernetes` (the default) needs a Kubernetes configuration.
#[test]
fn unsafe_or_unconfigured_authorizers_refuse_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let master = secret_file(dir.path(), "master.key", &[1; 32]);
    let salt = secret_file(dir.path(), "salt", &[2; 32]);
    let pki = Pki {
        dir: tempfile::tempdir().unwrap(),
    };
    let ca = ca("cluster CA");
    let ca_file = pki.write("ca.crt", &ca.pem);
    let (cert, key) = leaf(&ca, "localhost", false, false);
    let run = |extra: &[&str]| {
        Command::new(BIN)
            .arg("kms")
            .arg(format!("--master-secret-file={}", master.display()))
            .arg(format!("--salt-file={}", salt.display()))
            .arg(format!(
                "--tls-cert-file={}",
                pki.write("kms.crt", &cert).display()
            ))
            .arg(format!(
                "--tls-key-file={}",
                pki.write("kms.key", &key).display()
            ))
            .arg(format!("--client-ca-file={}", ca_file.display()))
            .args(extra)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .output()
            .unwrap()
    };
    let out = run(&["--listen=tcp://0.0.0.0:0", "--authorizer=none"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--authorizer none") && err.contains("loopback"),
        "{err}"
    );
    let out = run(&["--listen=tcp://127.0.0.1:0"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--kubeconfig"), "{err}");
}
