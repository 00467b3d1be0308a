//! GetVersionedDataKey latency over mutual TLS on loopback: the KMS service and
//! the node's client (the same code the binaries run) in one process, 10,000
//! sequential requests after a warm-up, p50/p90/p99/max printed.
//!
//!     cargo run --release --example kms_latency [-- REQUESTS]

use std::time::{Duration, Instant};

use cryptdisk_csi::kms::{Derivation, KeyRequest, KeySource};

/// A request for the v1 key of `id` from the current master-secret version.
fn v1(id: &str) -> KeyRequest<'_> {
    KeyRequest {
        volume_id: "local:bench:disk",
        data_key_id: id,
        derivation: Derivation::V1,
        len: 32,
        version: None,
    }
}
use cryptdisk_csi::kms::client::{GrpcKeySource, KmsAddress};
use cryptdisk_csi::kms::server::{KmsService, MasterSecret};
use cryptdisk_csi::kms::tls::TlsFiles;
use cryptdisk_csi::proto::kms::api_server::ApiServer;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use zeroize::Zeroizing;

fn write(dir: &std::path::Path, name: &str, body: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p
}

#[tokio::main]
async fn main() {
    let requests: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(10_000);
    let dir = tempfile::tempdir().unwrap();

    // A CA, the KMS's certificate for localhost, a node's client certificate.
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "bench CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca_pem = ca_params.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca_params, &ca_key);
    let leaf = |name: &str| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let ca = write(dir.path(), "ca.crt", &ca_pem);
    let (server_cert, server_key) = leaf("localhost");
    let (node_cert, node_key) = leaf("node-1");
    let server = TlsFiles {
        cert: write(dir.path(), "kms.crt", &server_cert),
        key: write(dir.path(), "kms.key", &server_key),
        ca: ca.clone(),
    };
    let node = TlsFiles {
        cert: write(dir.path(), "node.crt", &node_cert),
        key: write(dir.path(), "node.key", &node_key),
        ca,
    };

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let master = MasterSecret::new(Zeroizing::new(vec![7; 32]), Zeroizing::new(vec![9; 32]));
    let router = cryptdisk_csi::server::builder()
        .tls_config(
            server
                .server_config(std::time::Duration::from_secs(10))
                .unwrap(),
        )
        .unwrap()
        .add_service(ApiServer::new(KmsService::new(master)));
    tokio::spawn(
        router.serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let address: KmsAddress = format!("https://localhost:{port}").parse().unwrap();
    let source = GrpcKeySource::new(&address, Some(&node), false).unwrap();
    for _ in 0..200 {
        source.volume_key(&v1("warm-up")).await.unwrap();
    }
    let mut took = Vec::with_capacity(requests);
    let started = Instant::now();
    for i in 0..requests {
        let id = format!("6f2a7c54-2d39-4c4e-9b0e-{i:012}");
        let t = Instant::now();
        source.volume_key(&v1(&id)).await.unwrap();
        took.push(t.elapsed());
    }
    let total = started.elapsed();
    took.sort();
    let at = |q: f64| took[((took.len() as f64 * q) as usize).min(took.len() - 1)];
    let ms = |d: Duration| format!("{:.3} ms", d.as_secs_f64() * 1e3);
    println!(
        "kms_latency: {requests} GetVersionedDataKey calls over mutual TLS on loopback, one channel, sequential"
    );
    println!(
        "kms_latency: p50 {}  p90 {}  p99 {}  max {}  ({:.0} calls/s)",
        ms(at(0.50)),
        ms(at(0.90)),
        ms(at(0.99)),
        ms(*took.last().unwrap()),
        requests as f64 / total.as_secs_f64()
    );
}
