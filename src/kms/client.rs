//! The node's key source: the cluster KMS over gRPC.

use std::time::Duration;

use tonic::transport::Channel;

use super::{DataKey, KeyError, KeySource};
use crate::config::Endpoint;
use crate::proto::kms::GetDataKeyRequest;
use crate::proto::kms::api_client::ApiClient;

/// Deadline of one GetDataKey call.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

pub struct GrpcKeySource {
    client: ApiClient<Channel>,
    identity: String,
}

impl GrpcKeySource {
    /// A client on one reused channel, connected on first use, so that a node
    /// starts while the KMS is still coming up.
    pub fn new(endpoint: &Endpoint) -> Result<Self, tonic::transport::Error> {
        let channel = crate::client::connect_lazy(endpoint, CALL_TIMEOUT)?;
        Ok(GrpcKeySource {
            client: ApiClient::new(channel),
            identity: endpoint.to_string(),
        })
    }
}

#[tonic::async_trait]
impl KeySource for GrpcKeySource {
    async fn data_key(&self, data_key_id: &str, len: usize) -> Result<DataKey, KeyError> {
        let mut request = tonic::Request::new(GetDataKeyRequest {
            data_key_id: data_key_id.to_string(),
            length: len as u32,
        });
        request.set_timeout(CALL_TIMEOUT);
        let started = std::time::Instant::now();
        let response = self.client.clone().get_data_key(request).await;
        crate::metrics::global().record_kms(response.is_ok(), started);
        let response = response.map_err(|s| {
            let msg = format!("{} ({}): {}", self.identity, s.code(), s.message());
            match s.code() {
                tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Cancelled => KeyError::Unavailable(msg),
                _ => KeyError::Refused(msg),
            }
        })?;
        let key = zeroize::Zeroizing::new(response.into_inner().data_key);
        if key.len() != len {
            return Err(KeyError::Refused(format!(
                "{} returned a {}-byte key; asked for {len}",
                self.identity,
                key.len()
            )));
        }
        Ok(DataKey::from_bytes(key))
    }

    fn identity(&self) -> &str {
        &self.identity
    }

    fn current_version(&self) -> u32 {
        1
    }
}
