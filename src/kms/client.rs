//! The node's key source: the cluster KMS over gRPC.

use std::time::Duration;

use tonic::transport::Channel;

use super::{DataKey, Derivation, KeyError, KeyRequest, KeySource};
use crate::cloud::retry::{Retry, Step};
use crate::config::Endpoint;
use crate::proto::kms::api_client::ApiClient;
use crate::proto::kms::{
    Derivation as WireDerivation, GetVersionedDataKeyRequest, GetVolumeKeyRequest,
};

/// Deadline of one GetVolumeKey attempt.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts per key request when the KMS is unreachable or slow.
pub const ATTEMPTS: u32 = 3;
/// Attempts and pauses of a key request. Each pause is at least the backoff
/// (200 ms, then 400 ms: waited in the call itself, so that a restarting KMS
/// gets its breath) plus the policy's jitter of up to as much again, so that
/// nodes retrying after a KMS restart do not all come back at once.
const KMS_RETRY: Retry = Retry {
    max_attempts: ATTEMPTS,
    base_delay: Duration::from_millis(200),
    max_delay: Duration::from_millis(400),
};

/// Where the node reaches the KMS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KmsAddress {
    /// `unix:///path`: a KMS on the same machine (tests, `dev`).
    Unix(std::path::PathBuf),
    /// `tcp://host:port`: plaintext, only with `--kms-insecure`.
    Plain(String),
    /// `https://host:port`: mutual TLS.
    Tls(String),
}

impl std::str::FromStr for KmsAddress {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let host_port = |rest: &str| {
            let ok = rest
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
                && !rest.contains('/');
            if ok {
                Ok(rest.to_string())
            } else {
                Err(format!(
                    "KMS address {s:?}: expected HOST:PORT after the scheme"
                ))
            }
        };
        if let Some(rest) = s.strip_prefix("https://") {
            return Ok(KmsAddress::Tls(host_port(rest)?));
        }
        if let Some(rest) = s.strip_prefix("tcp://") {
            return Ok(KmsAddress::Plain(host_port(rest)?));
        }
        match s.parse::<Endpoint>() {
            Ok(Endpoint::Unix(p)) => Ok(KmsAddress::Unix(p)),
            _ => Err(format!(
                "KMS address {s:?}: expected https://HOST:PORT (mutual TLS), tcp://HOST:PORT \
                 (plaintext, with --kms-insecure) or unix:///path"
            )),
        }
    }
}

impl std::fmt::Display for KmsAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KmsAddress::Unix(p) => write!(f, "unix://{}", p.display()),
            KmsAddress::Plain(a) => write!(f, "tcp://{a}"),
            KmsAddress::Tls(a) => write!(f, "https://{a}"),
        }
    }
}

/// Why a KMS client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Tls(#[from] super::tls::TlsError),
    #[error("KMS channel: {0}")]
    Transport(#[from] tonic::transport::Error),
}

pub struct GrpcKeySource {
    client: ApiClient<Channel>,
    identity: String,
    /// The node's projected ServiceAccount token, read again for every request:
    /// the kubelet replaces it well before it expires. `None`: no header.
    token_file: Option<std::path::PathBuf>,
}

/// The wire value of a derivation.
fn wire(derivation: Derivation) -> WireDerivation {
    match derivation {
        Derivation::V1 => WireDerivation::V1,
        Derivation::V2 => WireDerivation::V2,
    }
}

impl GrpcKeySource {
    /// A client on one reused channel, connected on first use, so that a node
    /// starts while the KMS is still coming up. `tls` is required for an
    /// `https://` address and refused for the others; a `tcp://` address needs
    /// `insecure`.
    pub fn new(
        address: &KmsAddress,
        tls: Option<&super::tls::TlsFiles>,
        insecure: bool,
    ) -> Result<Self, ClientError> {
        let channel = match (address, tls) {
            (KmsAddress::Unix(path), None) => {
                crate::client::connect_lazy(&Endpoint::Unix(path.clone()), CALL_TIMEOUT)?
            }
            (KmsAddress::Plain(addr), None) if insecure => {
                tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
                    .connect_timeout(CALL_TIMEOUT)
                    .connect_lazy()
            }
            (KmsAddress::Plain(_), None) => {
                return Err(ClientError::Config(format!(
                    "{address} is plaintext: anyone on the path could read the keys; use \
                     https:// with --kms-ca-file, --kms-cert-file and --kms-key-file, or \
                     pass --kms-insecure"
                )));
            }
            (KmsAddress::Tls(addr), Some(files)) => {
                let host = addr.rsplit_once(':').map_or(addr.as_str(), |(h, _)| h);
                let host = host.trim_start_matches('[').trim_end_matches(']');
                tonic::transport::Endpoint::from_shared(format!("https://{addr}"))?
                    .tls_config(files.client_config(host)?)?
                    .connect_timeout(CALL_TIMEOUT)
                    .connect_lazy()
            }
            (KmsAddress::Tls(_), None) => {
                return Err(ClientError::Config(format!(
                    "{address} needs --kms-ca-file, --kms-cert-file and --kms-key-file"
                )));
            }
            (_, Some(_)) => {
                return Err(ClientError::Config(format!(
                    "TLS files are given but {address} is not an https:// address"
                )));
            }
        };
        Ok(GrpcKeySource {
            client: ApiClient::new(channel),
            identity: address.to_string(),
            token_file: None,
        })
    }

    /// Sends the token in `file` (`--kms-token-file`) as `authorization:
    /// Bearer <token>` with every request, read afresh each time.
    pub fn with_token_file(mut self, file: Option<std::path::PathBuf>) -> Self {
        self.token_file = file;
        self
    }

    /// The `authorization` header value, from the token file as it is now. The
    /// token is never logged nor put in an error.
    async fn authorization(&self) -> Result<Option<tonic::metadata::AsciiMetadataValue>, KeyError> {
        let Some(path) = &self.token_file else {
            return Ok(None);
        };
        let raw = zeroize::Zeroizing::new(tokio::fs::read(path).await.map_err(|e| {
            KeyError::Unavailable(format!(
                "cannot read the node's KMS token file {}: {e} (is the projected \
                 ServiceAccount token mounted there?)",
                path.display()
            ))
        })?);
        let token = std::str::from_utf8(&raw).map(str::trim).unwrap_or_default();
        let valid = !token.is_empty()
            && token
                .bytes()
                .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\');
        if !valid {
            return Err(KeyError::Unavailable(format!(
                "the node's KMS token file {} does not hold a token (empty, or not a \
                 printable ASCII word)",
                path.display()
            )));
        }
        let value = zeroize::Zeroizing::new(format!("Bearer {token}"));
        value.parse().map(Some).map_err(|_| {
            KeyError::Unavailable(format!(
                "the node's KMS token file {} holds a token that cannot travel in a header",
                path.display()
            ))
        })
    }

    async fn attempt(
        &self,
        request: &KeyRequest<'_>,
        authorization: Option<&tonic::metadata::AsciiMetadataValue>,
    ) -> Result<(DataKey, u32), tonic::Status> {
        let mut call = tonic::Request::new(GetVolumeKeyRequest {
            data_key_id: request.data_key_id.to_string(),
            length: request.len as u32,
            key_version: request.version.unwrap_or(0),
            volume_id: request.volume_id.to_string(),
            derivation: wire(request.derivation) as i32,
        });
        call.set_timeout(CALL_TIMEOUT);
        if let Some(value) = authorization {
            call.metadata_mut().insert("authorization", value.clone());
        }
        let started = std::time::Instant::now();
        let response = match self.client.clone().get_volume_key(call).await {
            // A KMS older than this node plugin (a rolling upgrade) does not know
            // GetVolumeKey. Its GetVersionedDataKey serves v1 keys to any node
            // anyway, so a v1 volume may still be opened through it; a v2 key
            // it cannot derive, and is refused below.
            Err(s)
                if s.code() == tonic::Code::Unimplemented
                    && request.derivation == Derivation::V1 =>
            {
                return self.attempt_before_v2(request, started).await;
            }
            r => r,
        };
        crate::metrics::global().record_kms(response.is_ok(), started);
        // tonic reports its own client-side timeout as CANCELLED.
        let response = response
            .map_err(|s| {
                if s.code() == tonic::Code::Cancelled && s.message().contains("Timeout expired") {
                    tonic::Status::deadline_exceeded(format!(
                        "no answer within the {CALL_TIMEOUT:?} deadline"
                    ))
                } else {
                    s
                }
            })?
            .into_inner();
        let key = zeroize::Zeroizing::new(response.data_key);
        // A key of another derivation than the one asked for would open
        // nothing, or worse, be recorded under the wrong name.
        if response.derivation != wire(request.derivation) as i32 {
            return Err(tonic::Status::failed_precondition(format!(
                "answered with derivation {} to a request for {}",
                response.derivation, request.derivation
            )));
        }
        Ok((DataKey::from_bytes(key), response.key_version))
    }
}

impl GrpcKeySource {
    /// A v1 key through GetVersionedDataKey, from a KMS without GetVolumeKey.
    async fn attempt_before_v2(
        &self,
        request: &KeyRequest<'_>,
        started: std::time::Instant,
    ) -> Result<(DataKey, u32), tonic::Status> {
        tracing::debug!(kms = %self.identity, "the KMS predates GetVolumeKey; asking GetVersionedDataKey for a v1 key");
        let mut call = tonic::Request::new(GetVersionedDataKeyRequest {
            data_key_id: request.data_key_id.to_string(),
            length: request.len as u32,
            key_version: request.version.unwrap_or(0),
        });
        call.set_timeout(CALL_TIMEOUT);
        let response = self.client.clone().get_versioned_data_key(call).await;
        crate::metrics::global().record_kms(response.is_ok(), started);
        let response = response?.into_inner();
        let key = zeroize::Zeroizing::new(response.data_key);
        Ok((DataKey::from_bytes(key), response.key_version))
    }
}

/// Whether a failed attempt may succeed when repeated.
fn transient(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
    )
}

#[tonic::async_trait]
impl KeySource for GrpcKeySource {
    async fn volume_key(&self, request: &KeyRequest<'_>) -> Result<(DataKey, u32), KeyError> {
        let (len, version) = (request.len, request.version);
        let (key, got_version) = KMS_RETRY
            .run("a KMS request", |attempt| async move {
                if attempt > 1 {
                    tokio::time::sleep(KMS_RETRY.backoff(attempt - 1)).await;
                }
                // Read again on every attempt: a retry may follow the kubelet's refresh.
                let authorization = match self.authorization().await {
                    Ok(a) => a,
                    Err(e) => return Step::Fail(e),
                };
                let s = match self.attempt(request, authorization.as_ref()).await {
                    Ok(got) => return Step::Done(got),
                    Err(s) => s,
                };
                let mut msg = format!(
                    "{} ({:?}) after {attempt} attempt(s): {}",
                    self.identity,
                    s.code(),
                    s.message()
                );
                // A refused TLS handshake says why only in the source chain.
                let mut source = std::error::Error::source(&s);
                while let Some(e) = source {
                    msg.push_str(": ");
                    msg.push_str(&e.to_string());
                    source = e.source();
                }
                if transient(s.code()) {
                    Step::retry(KeyError::Unavailable(msg))
                } else if matches!(
                    s.code(),
                    tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
                ) {
                    Step::Fail(KeyError::Denied(msg))
                } else {
                    Step::Fail(KeyError::Refused(msg))
                }
            })
            .await?;
        if key.len() != len {
            return Err(KeyError::Refused(format!(
                "{} returned a {}-byte key; asked for {len}",
                self.identity,
                key.len()
            )));
        }
        if version.is_some_and(|v| v != got_version) || got_version == 0 {
            return Err(KeyError::Refused(format!(
                "{} answered with version {got_version}; asked for {version:?}",
                self.identity
            )));
        }
        Ok((key, got_version))
    }

    fn identity(&self) -> &str {
        &self.identity
    }
}
