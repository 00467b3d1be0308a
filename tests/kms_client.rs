//! The node's KMS client against an in-test KMS that answers GetVolumeKey: each
//! request names the volume, the key id, the derivation and the version, and
//! carries the node's token as `authorization: Bearer`, read from the token file
//! afresh each time (the kubelet rotates it). A missing token file is a clear
//! UNAVAILABLE before anything is sent, and the token never shows in an error;
//! a refusal for the volume is a denial; a KMS older than GetVolumeKey still
//! serves v1 keys, never v2 ones.

use std::path::Path;
use std::sync::{Arc, Mutex};

use cryptdisk_csi::kms::client::{GrpcKeySource, KmsAddress};
use cryptdisk_csi::kms::{Derivation, KeyError, KeyRequest, KeySource};
use cryptdisk_csi::proto::kms::api_server::{Api, ApiServer};
use cryptdisk_csi::proto::kms::{
    Derivation as Wire, GetDataKeyRequest, GetDataKeyResponse, GetVersionedDataKeyRequest,
    GetVersionedDataKeyResponse, GetVolumeKeyRequest, GetVolumeKeyResponse,
};
use tonic::{Request, Response, Status};

const KEY_ID: &str = "6f2a7c54-2d39-4c4e-9b0e-1a3d5f7b9c11";
const VOLUME: &str = "local:node-a:disk-1";

/// What the fake KMS saw of one request.
#[derive(Clone, Debug, PartialEq)]
struct Seen {
    method: &'static str,
    authorization: Option<String>,
    volume_id: String,
    data_key_id: String,
    derivation: i32,
    key_version: u32,
}

/// How the fake KMS answers GetVolumeKey.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// A key of 32 bytes of the request's version, derivation echoed.
    Serve,
    /// As Serve, but claiming the other derivation.
    WrongDerivation,
    /// PERMISSION_DENIED: the volume is not attached to the caller.
    Deny,
    /// UNIMPLEMENTED: a KMS from before GetVolumeKey (GetVersionedDataKey works).
    Old,
}

struct FakeKms {
    mode: Mode,
    seen: Arc<Mutex<Vec<Seen>>>,
}

#[tonic::async_trait]
impl Api for FakeKms {
    async fn get_data_key(
        &self,
        _request: Request<GetDataKeyRequest>,
    ) -> Result<Response<GetDataKeyResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn get_versioned_data_key(
        &self,
        request: Request<GetVersionedDataKeyRequest>,
    ) -> Result<Response<GetVersionedDataKeyResponse>, Status> {
        let authorization = header(&request);
        let r = request.into_inner();
        self.seen.lock().unwrap().push(Seen {
            method: "GetVersionedDataKey",
            authorization,
            volume_id: String::new(),
            data_key_id: r.data_key_id,
            derivation: 0,
            key_version: r.key_version,
        });
        Ok(Response::new(GetVersionedDataKeyResponse {
            data_key: vec![1; 32],
            key_version: r.key_version.max(1),
        }))
    }

    async fn get_volume_key(
        &self,
        request: Request<GetVolumeKeyRequest>,
    ) -> Result<Response<GetVolumeKeyResponse>, Status> {
        let authorization = header(&request);
        let r = request.into_inner();
        self.seen.lock().unwrap().push(Seen {
            method: "GetVolumeKey",
            authorization,
            volume_id: r.volume_id.clone(),
            data_key_id: r.data_key_id.clone(),
            derivation: r.derivation,
            key_version: r.key_version,
        });
        let derivation = match self.mode {
            Mode::Serve => r.derivation,
            Mode::WrongDerivation if r.derivation == Wire::V2 as i32 => Wire::V1 as i32,
            Mode::WrongDerivation => Wire::V2 as i32,
            Mode::Deny => {
                return Err(Status::permission_denied(format!(
                    "volume {} is not attached to node node-b",
                    r.volume_id
                )));
            }
            Mode::Old => return Err(Status::unimplemented("unknown method")),
        };
        Ok(Response::new(GetVolumeKeyResponse {
            data_key: vec![2; 32],
            key_version: r.key_version.max(1),
            derivation,
        }))
    }
}

fn header<T>(request: &Request<T>) -> Option<String> {
    request
        .metadata()
        .get("authorization")
        .map(|v| v.to_str().unwrap().to_string())
}

/// Serves a [`FakeKms`] on a unix socket in `dir`; returns its address and
/// what it sees.
async fn serve(dir: &Path, mode: Mode) -> (KmsAddress, Arc<Mutex<Vec<Seen>>>) {
    let socket = dir.join(format!("kms-{}.sock", mode as u8));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let service = ApiServer::new(FakeKms {
        mode,
        seen: seen.clone(),
    });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
    );
    let address = format!("unix://{}", socket.display()).parse().unwrap();
    (address, seen)
}

fn request(derivation: Derivation, version: Option<u32>) -> KeyRequest<'static> {
    KeyRequest {
        volume_id: VOLUME,
        data_key_id: KEY_ID,
        derivation,
        len: 32,
        version,
    }
}

#[tokio::test]
async fn each_request_names_the_volume_and_carries_the_token_read_afresh() {
    let dir = tempfile::tempdir().unwrap();
    let (address, seen) = serve(dir.path(), Mode::Serve).await;
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "first.token.value\n").unwrap();
    let source = GrpcKeySource::new(&address, None, false)
        .unwrap()
        .with_token_file(Some(token_file.clone()));

    let (key, version) = source
        .volume_key(&request(Derivation::V2, None))
        .await
        .unwrap();
    assert_eq!((key.expose(), version), (&[2u8; 32][..], 1));
    // The kubelet replaces the token: the next request carries the new one.
    std::fs::write(&token_file, "second.token.value").unwrap();
    source
        .volume_key(&request(Derivation::V1, Some(3)))
        .await
        .unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![
            Seen {
                method: "GetVolumeKey",
                authorization: Some("Bearer first.token.value".into()),
                volume_id: VOLUME.into(),
                data_key_id: KEY_ID.into(),
                derivation: Wire::V2 as i32,
                key_version: 0,
            },
            Seen {
                method: "GetVolumeKey",
                authorization: Some("Bearer second.token.value".into()),
                volume_id: VOLUME.into(),
                data_key_id: KEY_ID.into(),
                derivation: Wire::V1 as i32,
                key_version: 3,
            },
        ]
    );

    // Without a token file configured, no header at all.
    let sub = dir.path().join("bare");
    std::fs::create_dir_all(&sub).unwrap();
    let (address, seen) = serve(&sub, Mode::Serve).await;
    GrpcKeySource::new(&address, None, false)
        .unwrap()
        .volume_key(&request(Derivation::V2, None))
        .await
        .unwrap();
    assert_eq!(seen.lock().unwrap()[0].authorization, None);
}

#[tokio::test]
async fn a_missing_or_empty_token_file_is_unavailable_and_sends_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (address, seen) = serve(dir.path(), Mode::Serve).await;
    let token_file = dir.path().join("token");
    let source = GrpcKeySource::new(&address, None, false)
        .unwrap()
        .with_token_file(Some(token_file.clone()));
    let err = source
        .volume_key(&request(Derivation::V2, None))
        .await
        .err()
        .expect("refused");
    match &err {
        KeyError::Unavailable(msg) => {
            assert!(msg.contains(&token_file.display().to_string()), "{msg}");
            assert!(msg.contains("token"), "{msg}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(tonic::Status::from(err).code(), tonic::Code::Unavailable);
    for bad in ["", "  \n", "two words", "bad\u{7}bell"] {
        std::fs::write(&token_file, bad).unwrap();
        let err = source
            .volume_key(&request(Derivation::V2, None))
            .await
            .err()
            .expect("refused");
        assert!(matches!(err, KeyError::Unavailable(_)), "{bad:?}: {err:?}");
        // The file's content never reaches the message.
        if bad.len() > 4 {
            assert!(!err.to_string().contains(bad.trim()), "{err}");
        }
    }
    assert!(seen.lock().unwrap().is_empty(), "a request went out");
}

#[tokio::test]
async fn a_refusal_is_a_denial_and_the_token_stays_out_of_it() {
    let dir = tempfile::tempdir().unwrap();
    let (address, _) = serve(dir.path(), Mode::Deny).await;
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "secret.node.token").unwrap();
    let source = GrpcKeySource::new(&address, None, false)
        .unwrap()
        .with_token_file(Some(token_file));
    let err = source
        .volume_key(&request(Derivation::V2, None))
        .await
        .err()
        .expect("denied");
    assert!(matches!(err, KeyError::Denied(_)), "{err:?}");
    assert!(err.to_string().contains("not attached"), "{err}");
    assert!(!err.to_string().contains("secret.node.token"), "{err}");
    assert_eq!(
        tonic::Status::from(err).code(),
        tonic::Code::PermissionDenied
    );
}

#[tokio::test]
async fn a_key_of_another_derivation_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (address, _) = serve(dir.path(), Mode::WrongDerivation).await;
    let source = GrpcKeySource::new(&address, None, false).unwrap();
    for d in [Derivation::V1, Derivation::V2] {
        let err = source
            .volume_key(&request(d, None))
            .await
            .err()
            .expect("refused");
        assert!(matches!(err, KeyError::Refused(_)), "{d}: {err:?}");
        assert!(err.to_string().contains("derivation"), "{err}");
    }
}

#[tokio::test]
async fn a_kms_without_get_volume_key_serves_v1_keys_only() {
    let dir = tempfile::tempdir().unwrap();
    let (address, seen) = serve(dir.path(), Mode::Old).await;
    let source = GrpcKeySource::new(&address, None, false).unwrap();
    let (key, version) = source
        .volume_key(&request(Derivation::V1, Some(2)))
        .await
        .unwrap();
    assert_eq!((key.expose(), version), (&[1u8; 32][..], 2));
    let err = source
        .volume_key(&request(Derivation::V2, None))
        .await
        .err()
        .expect("no v2 key from an old KMS");
    assert!(matches!(err, KeyError::Refused(_)), "{err:?}");
    let methods: Vec<&str> = seen.lock().unwrap().iter().map(|s| s.method).collect();
    assert_eq!(
        methods,
        ["GetVolumeKey", "GetVersionedDataKey", "GetVolumeKey"]
    );
}
