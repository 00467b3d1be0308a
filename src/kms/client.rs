//! The node's key source: the cluster KMS over gRPC.

use std::time::Duration;

use tonic::transport::Channel;

use super::{DataKey, KeyError, KeySource};
use crate::config::Endpoint;
use crate::proto::kms::GetVersionedDataKeyRequest;
use crate::proto::kms::api_client::ApiClient;

/// Deadline of one GetDataKey attempt.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts per key request when the KMS is unreachable or slow.
pub const ATTEMPTS: u32 = 3;
/// First pause between attempts; it doubles, with up to as much again of jitter.
const BACKOFF: Duration = Duration::from_millis(200);

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
        })
    }

    async fn attempt(
        &self,
        data_key_id: &str,
        len: usize,
        version: Option<u32>,
    ) -> Result<(DataKey, u32), tonic::Status> {
        let mut request = tonic::Request::new(GetVersionedDataKeyRequest {
            data_key_id: data_key_id.to_string(),
            length: len as u32,
            key_version: version.unwrap_or(0),
        });
        request.set_timeout(CALL_TIMEOUT);
        let started = std::time::Instant::now();
        let response = self.client.clone().get_versioned_data_key(request).await;
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

/// `BACKOFF * 2^attempt`, plus up to as much again at random, so that nodes
/// retrying after a KMS restart do not all come back at once.
fn backoff(attempt: u32) -> Duration {
    use rand_core::RngCore;
    let base = BACKOFF * 2u32.pow(attempt);
    let jitter = rand_core::OsRng.next_u64() % (base.as_millis() as u64 + 1);
    base + Duration::from_millis(jitter)
}

#[tonic::async_trait]
impl KeySource for GrpcKeySource {
    async fn versioned_key(
        &self,
        data_key_id: &str,
        len: usize,
        version: Option<u32>,
    ) -> Result<(DataKey, u32), KeyError> {
        let mut attempt = 0;
        let (key, got_version) = loop {
            match self.attempt(data_key_id, len, version).await {
                Ok(got) => break got,
                Err(s) if transient(s.code()) && attempt + 1 < ATTEMPTS => {
                    let pause = backoff(attempt);
                    tracing::warn!(kms = %self.identity, code = ?s.code(), attempt = attempt + 1, ?pause, "KMS request failed; retrying");
                    tokio::time::sleep(pause).await;
                    attempt += 1;
                }
                Err(s) => {
                    let mut msg = format!(
                        "{} ({:?}) after {} attempt(s): {}",
                        self.identity,
                        s.code(),
                        attempt + 1,
                        s.message()
                    );
                    // A refused TLS handshake says why only in the source chain.
                    let mut source = std::error::Error::source(&s);
                    while let Some(e) = source {
                        msg.push_str(": ");
                        msg.push_str(&e.to_string());
                        source = e.source();
                    }
                    return Err(if transient(s.code()) {
                        KeyError::Unavailable(msg)
                    } else {
                        KeyError::Refused(msg)
                    });
                }
            }
        };
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
