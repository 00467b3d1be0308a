//! ARM access tokens through `azure_identity`: workload identity, client secret,
//! or managed identity, as [`Credentials`] says.
//!
//! azure_identity's HTTP goes through [`ReqwestTransport`], our reqwest 0.12 +
//! rustls client, so the crate is built without its default reqwest/TLS stack.
//! Tokens are cached and refreshed by azure_identity; they are never logged.

use std::sync::Arc;

use azure_core::cloud::{CloudConfiguration, CustomConfiguration};
use azure_core::credentials::{Secret, TokenCredential};
use azure_core::error::ErrorKind;
use azure_core::http::headers::{HeaderName, HeaderValue, Headers};
use azure_core::http::{AsyncRawResponse, Body, ClientOptions, HttpClient, Request, Transport};
use azure_identity::{
    ClientAssertionCredentialOptions, ClientSecretCredential, ClientSecretCredentialOptions,
    ManagedIdentityCredential, ManagedIdentityCredentialOptions, UserAssignedId,
    WorkloadIdentityCredential, WorkloadIdentityCredentialOptions,
};
use zeroize::Zeroizing;

use super::config::{AzureConfig, Credentials};
use crate::backend::Error;

/// azure_core's HTTP client trait over a reqwest 0.12 client.
#[derive(Debug, Clone)]
pub struct ReqwestTransport(pub reqwest::Client);

#[async_trait::async_trait]
impl HttpClient for ReqwestTransport {
    async fn execute_request(&self, request: &Request) -> azure_core::Result<AsyncRawResponse> {
        let method = reqwest::Method::from_bytes(request.method().as_ref().as_bytes())
            .map_err(|e| azure_core::Error::with_error(ErrorKind::Other, e, "bad HTTP method"))?;
        let mut req = self.0.request(method, request.url().as_str());
        for (name, value) in request.headers().iter() {
            req = req.header(name.as_str(), value.as_str());
        }
        req = match request.body() {
            Body::Bytes(bytes) => req.body(bytes.to_vec()),
            #[allow(unreachable_patterns)]
            _ => {
                return Err(azure_core::Error::with_message(
                    ErrorKind::Other,
                    "streamed request bodies are not supported",
                ));
            }
        };
        let resp = req.send().await.map_err(|e| {
            let kind = if e.is_connect() {
                ErrorKind::Connection
            } else {
                ErrorKind::Io
            };
            azure_core::Error::with_error(kind, e.without_url(), "HTTP request failed")
        })?;
        let status = resp.status().as_u16();
        let mut headers = Headers::new();
        for (name, value) in resp.headers() {
            if let Ok(v) = value.to_str() {
                headers.insert(
                    HeaderName::from(name.as_str().to_owned()),
                    HeaderValue::from(v.to_owned()),
                );
            }
        }
        let body = resp
            .bytes()
            .await
            .map_err(|e| azure_core::Error::with_error(ErrorKind::Io, e, "reading a response"))?;
        Ok(AsyncRawResponse::from_bytes(status.into(), headers, body))
    }
}

/// Builds the token credential that `config.credentials` names, its HTTP going
/// through `transport`.
pub fn credential(
    config: &AzureConfig,
    transport: Arc<dyn HttpClient>,
) -> Result<Arc<dyn TokenCredential>, Error> {
    let client_options = || {
        let mut cloud = CustomConfiguration::default();
        cloud.authority_host = config.authority_host.clone();
        ClientOptions {
            transport: Some(Transport::new(transport.clone())),
            cloud: Some(Arc::new(CloudConfiguration::Custom(cloud))),
            ..Default::default()
        }
    };
    let failed = |how: &str, e: azure_core::Error| {
        Error::FailedPrecondition(format!("cannot set up Azure {how} credentials: {e}"))
    };
    Ok(match &config.credentials {
        Credentials::WorkloadIdentity {
            tenant_id,
            client_id,
            token_file,
        } => WorkloadIdentityCredential::new(Some(WorkloadIdentityCredentialOptions {
            credential_options: ClientAssertionCredentialOptions {
                client_options: client_options(),
            },
            client_id: Some(client_id.clone()),
            tenant_id: Some(tenant_id.clone()),
            token_file_path: Some(token_file.clone()),
        }))
        .map_err(|e| failed("workload identity", e))?,
        Credentials::ClientSecret {
            tenant_id,
            client_id,
            secret,
        } => ClientSecretCredential::new(
            tenant_id,
            client_id.clone(),
            Secret::new(secret.as_str().to_owned()),
            Some(ClientSecretCredentialOptions {
                client_options: client_options(),
            }),
        )
        .map_err(|e| failed("client secret", e))?,
        Credentials::ManagedIdentity { client_id } => {
            ManagedIdentityCredential::new(Some(ManagedIdentityCredentialOptions {
                user_assigned_id: client_id.clone().map(UserAssignedId::ClientId),
                client_options: client_options(),
            }))
            .map_err(|e| failed("managed identity", e))?
        }
    })
}

/// A bearer token for `scope`. A refusal is FAILED_PRECONDITION (the identity or
/// its role assignment needs fixing), an unreachable endpoint UNAVAILABLE.
pub async fn token(
    credential: &dyn TokenCredential,
    scope: &str,
) -> Result<Zeroizing<String>, Error> {
    match credential.get_token(&[scope], None).await {
        Ok(t) => Ok(Zeroizing::new(t.token.secret().to_owned())),
        Err(e) => {
            // azure_identity's messages carry the Entra ID error, never the secret.
            let msg = format!("cannot get an ARM token for {scope}: {e}");
            Err(match e.kind() {
                ErrorKind::Io | ErrorKind::Connection => Error::Unavailable(msg),
                _ => Error::FailedPrecondition(msg),
            })
        }
    }
}
