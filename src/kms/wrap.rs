//! Unwrapping the KMS master secret with a cloud KMS.
//!
//! The master secret may be stored *wrapped*: encrypted under a key that never
//! leaves a cloud KMS. At start the KMS server sends the ciphertext to that KMS
//! and keeps the plaintext in memory only:
//!
//! - Azure Key Vault `unwrapKey` (`POST {vault}/keys/{name}[/{version}]/unwrapkey?api-version=7.4`,
//!   `RSA-OAEP-256`), with a Key Vault access token from workload identity
//!   (a federated token exchanged at Microsoft Entra ID) or, failing that, from
//!   the managed identity of the VM (IMDS).
//! - GCP Cloud KMS `decrypt` (`POST https://cloudkms.googleapis.com/v1/{key}:decrypt`),
//!   with an access token from the metadata server (which is also what GKE
//!   Workload Identity serves).
//!
//! Neither key bytes nor tokens are logged or put in an error. The plaintext is
//! returned in `Zeroizing`; copies inside the HTTP stack's buffers are beyond
//! our reach.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use base64::Engine as _;
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use serde::Deserialize;
use zeroize::Zeroizing;

use crate::cloud::error_body::ErrorBody;
use crate::cloud::gcp_metadata as metadata;
pub use crate::cloud::retry::Retry;
use crate::cloud::retry::{Step, clean, retry_after};

/// Key Vault REST API version used for `unwrapKey`.
pub const AZURE_KEYVAULT_API_VERSION: &str = "7.4";
/// The `alg` sent to Key Vault: the wrapping key is an RSA key.
pub const AZURE_UNWRAP_ALG: &str = "RSA-OAEP-256";
/// Resource (IMDS) and, with `/.default`, scope (Entra ID) of a Key Vault token.
const AZURE_KEYVAULT_RESOURCE: &str = "https://vault.azure.net";
const IMDS_API_VERSION: &str = "2018-02-01";
const IMDS_TOKEN_PATH: &str = "/metadata/identity/oauth2/token";
const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
const GCP_TOKEN_PATH: &str = "/computeMetadata/v1/instance/service-accounts/default/token";

/// base64url: Key Vault's `value` fields. Sent without padding, read either way.
const B64URL: GeneralPurpose = GeneralPurpose::new(
    &alphabet::URL_SAFE,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);
/// Standard base64: Cloud KMS `bytes` fields. Sent padded, read either way.
const B64STD: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_encode_padding(true)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// The cloud key that wrapped the master secret.
///
/// Written `azure-keyvault:https://VAULT/keys/NAME[/VERSION]` (a Key Vault key
/// identifier) or `gcp-kms:projects/P/locations/L/keyRings/R/cryptoKeys/K`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WrapKey {
    AzureKeyVault {
        /// `https://HOST`, no path.
        vault_url: String,
        key_name: String,
        /// Empty: the key's current version.
        key_version: String,
    },
    GcpKms {
        /// `projects/P/locations/L/keyRings/R/cryptoKeys/K`.
        key_name: String,
    },
}

impl FromStr for WrapKey {
    type Err = WrapError;

    fn from_str(s: &str) -> Result<Self, WrapError> {
        let bad = |reason: &str| WrapError::InvalidKey {
            input: s.to_string(),
            reason: reason.to_string(),
        };
        if let Some(rest) = s.strip_prefix("azure-keyvault:") {
            let after = rest
                .strip_prefix("https://")
                .ok_or_else(|| bad("a Key Vault key identifier starts with https://"))?;
            let (host, path) = after
                .split_once('/')
                .ok_or_else(|| bad("no /keys/NAME after the vault host"))?;
            let host_ok = !host.is_empty()
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':'));
            if !host_ok {
                return Err(bad("the vault host is empty or not a host name"));
            }
            let path = path.strip_suffix('/').unwrap_or(path);
            let (name, version) = match path.split('/').collect::<Vec<_>>().as_slice() {
                ["keys", name] => (*name, ""),
                ["keys", name, version] if !version.is_empty() => (*name, *version),
                _ => return Err(bad("the path must be /keys/NAME or /keys/NAME/VERSION")),
            };
            let name_ok = (1..=127).contains(&name.len())
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
            if !name_ok {
                return Err(bad("a key name is 1 to 127 letters, digits and dashes"));
            }
            if !version.chars().all(|c| c.is_ascii_alphanumeric()) {
                return Err(bad("a key version is letters and digits"));
            }
            Ok(WrapKey::AzureKeyVault {
                vault_url: format!("https://{host}"),
                key_name: name.to_string(),
                key_version: version.to_string(),
            })
        } else if let Some(rest) = s.strip_prefix("gcp-kms:") {
            match rest.split('/').collect::<Vec<_>>().as_slice() {
                [
                    "projects",
                    p,
                    "locations",
                    l,
                    "keyRings",
                    r,
                    "cryptoKeys",
                    k,
                ] if [p, l, r, k].iter().all(|id| gcp_id_ok(id)) => Ok(WrapKey::GcpKms {
                    key_name: rest.to_string(),
                }),
                _ => Err(bad(
                    "a Cloud KMS key is projects/P/locations/L/keyRings/R/cryptoKeys/K",
                )),
            }
        } else {
            Err(bad("unknown kind of key"))
        }
    }
}

/// One id of a Cloud KMS resource name; `:` and `.` for domain-scoped projects.
fn gcp_id_ok(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 100
        && id.chars().any(|c| c != '.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
}

impl fmt::Display for WrapKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WrapKey::AzureKeyVault {
                vault_url,
                key_name,
                key_version,
            } => {
                write!(f, "azure-keyvault:{vault_url}/keys/{key_name}")?;
                if !key_version.is_empty() {
                    write!(f, "/{key_version}")?;
                }
                Ok(())
            }
            WrapKey::GcpKms { key_name } => write!(f, "gcp-kms:{key_name}"),
        }
    }
}

/// Where the requests go. The defaults are the real cloud endpoints; tests
/// point them at local fakes.
#[derive(Clone, Debug)]
pub struct Endpoints {
    /// Replaces the vault URL of an `azure-keyvault:` key (scheme and host).
    pub azure_vault: Option<String>,
    /// Microsoft Entra ID, for workload identity (`AZURE_AUTHORITY_HOST`).
    pub azure_authority_host: String,
    /// Azure Instance Metadata Service, for managed identity.
    pub azure_imds: String,
    pub gcp_kms: String,
    /// GCP metadata server (GCE, or GKE's Workload Identity server).
    pub gcp_metadata: String,
}

impl Default for Endpoints {
    fn default() -> Self {
        Endpoints {
            azure_vault: None,
            azure_authority_host: "https://login.microsoftonline.com/".into(),
            azure_imds: crate::cloud::AZURE_IMDS_URL.into(),
            gcp_kms: "https://cloudkms.googleapis.com".into(),
            gcp_metadata: metadata::DEFAULT_METADATA_URL.into(),
        }
    }
}

/// How to get a Key Vault token. With `federated_token_file` set, workload
/// identity (which then needs `client_id` and `tenant_id` too); otherwise the
/// managed identity from IMDS, the user-assigned one named by `client_id` if set.
#[derive(Clone, Debug, Default)]
pub struct AzureIdentity {
    pub client_id: Option<String>,
    pub tenant_id: Option<String>,
    pub federated_token_file: Option<PathBuf>,
}

#[derive(Clone, Debug)]
pub struct WrapConfig {
    pub endpoints: Endpoints,
    pub azure: AzureIdentity,
    pub retry: Retry,
    /// Time limit of each request.
    pub timeout: Duration,
}

impl Default for WrapConfig {
    fn default() -> Self {
        WrapConfig {
            endpoints: Endpoints::default(),
            azure: AzureIdentity::default(),
            retry: Retry::default(),
            timeout: Duration::from_secs(10),
        }
    }
}

impl WrapConfig {
    /// Defaults, with the Azure identity from the variables the workload
    /// identity webhook sets (`AZURE_FEDERATED_TOKEN_FILE`, `AZURE_CLIENT_ID`,
    /// `AZURE_TENANT_ID`, `AZURE_AUTHORITY_HOST`).
    pub fn from_env() -> Self {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// As `from_env`, reading variables through `var`; empty ones count as unset.
    pub fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Self {
        let var = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        let mut endpoints = Endpoints::default();
        if let Some(host) = var("AZURE_AUTHORITY_HOST") {
            endpoints.azure_authority_host = host;
        }
        // Google's client libraries read GCE_METADATA_HOST (host[:port]); the
        // others are ours, for private endpoints and for tests.
        endpoints.gcp_metadata = metadata::metadata_url(var);
        if let Some(url) = var("CRYPTDISK_GCP_KMS_ENDPOINT") {
            endpoints.gcp_kms = url;
        }
        if let Some(url) = var("CRYPTDISK_AZURE_IMDS_ENDPOINT") {
            endpoints.azure_imds = url;
        }
        if let Some(url) = var("CRYPTDISK_AZURE_VAULT_ENDPOINT") {
            endpoints.azure_vault = Some(url);
        }
        WrapConfig {
            endpoints,
            azure: AzureIdentity {
                client_id: var("AZURE_CLIENT_ID"),
                tenant_id: var("AZURE_TENANT_ID"),
                federated_token_file: var("AZURE_FEDERATED_TOKEN_FILE").map(PathBuf::from),
            },
            ..WrapConfig::default()
        }
    }
}

/// The step that failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    AzureImdsToken,
    AzureEntraToken,
    AzureUnwrap,
    GcpToken,
    GcpDecrypt,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::AzureImdsToken => "get a Key Vault token from Azure IMDS (managed identity)",
            Op::AzureEntraToken => {
                "get a Key Vault token from Microsoft Entra ID (workload identity)"
            }
            Op::AzureUnwrap => "unwrap the master secret with Azure Key Vault",
            Op::GcpToken => "get an access token from the GCP metadata server",
            Op::GcpDecrypt => "decrypt the master secret with GCP Cloud KMS",
        })
    }
}

/// Why the master secret could not be unwrapped. Carries no key bytes or tokens.
#[derive(Debug, thiserror::Error)]
pub enum WrapError {
    #[error(
        "invalid wrap key {input:?}: {reason} (expected azure-keyvault:https://VAULT/keys/NAME[/VERSION] \
         or gcp-kms:projects/P/locations/L/keyRings/R/cryptoKeys/K)"
    )]
    InvalidKey { input: String, reason: String },
    #[error("{0}")]
    Config(String),
    #[error("could not {op}: reading the federated token file {}: {source}", .path.display())]
    TokenFile {
        op: Op,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("could not {op}: request to {url} failed: {reason}")]
    Transport { op: Op, url: String, reason: String },
    /// An error answer; `code` and `message` are the cloud's own, where it gave them.
    #[error("could not {op}: {url} answered HTTP {status}{}", detail(.code, .message))]
    Http {
        op: Op,
        url: String,
        status: u16,
        code: Option<String>,
        message: Option<String>,
    },
    #[error("could not {op}: {url} answered with a malformed response: {what}")]
    Malformed {
        op: Op,
        url: String,
        what: &'static str,
    },
}

fn detail(code: &Option<String>, message: &Option<String>) -> String {
    match (code, message) {
        (Some(c), Some(m)) => format!(": {c}: {m}"),
        (Some(s), None) | (None, Some(s)) => format!(": {s}"),
        (None, None) => String::new(),
    }
}

/// Unwraps `ciphertext` with `key`, fetching the access token it needs first.
pub async fn unwrap(
    key: &WrapKey,
    ciphertext: &[u8],
    cfg: &WrapConfig,
) -> Result<Zeroizing<Vec<u8>>, WrapError> {
    if ciphertext.is_empty() {
        return Err(WrapError::Config(
            "the wrapped master secret is empty".into(),
        ));
    }
    match key {
        WrapKey::AzureKeyVault {
            vault_url,
            key_name,
            key_version,
        } => {
            let vault = cfg.endpoints.azure_vault.as_deref().unwrap_or(vault_url);
            let vault = vault.trim_end_matches('/');
            let url = if key_version.is_empty() {
                format!("{vault}/keys/{key_name}/unwrapkey")
            } else {
                format!("{vault}/keys/{key_name}/{key_version}/unwrapkey")
            };
            let token = azure_token(cfg).await?;
            let op = Op::AzureUnwrap;
            let req = client(cfg, false)?
                .post(&url)
                .query(&[("api-version", AZURE_KEYVAULT_API_VERSION)])
                .bearer_auth(token.as_str())
                .json(&serde_json::json!({
                    "alg": AZURE_UNWRAP_ALG,
                    "value": B64URL.encode(ciphertext),
                }));
            let body = send(op, &url, req, cfg, false).await?;
            #[derive(Deserialize)]
            struct KeyOperationResult {
                value: String,
            }
            let value = serde_json::from_slice::<KeyOperationResult>(&body)
                .map(|r| Zeroizing::new(r.value))
                .map_err(|_| malformed(op, &url, "not JSON with a string `value`"))?;
            decode(&B64URL, &value, op, &url, "`value` is not base64url")
        }
        WrapKey::GcpKms { key_name } => {
            let token = gcp_token(cfg).await?;
            let op = Op::GcpDecrypt;
            let url = format!("{}/v1/{key_name}:decrypt", base(&cfg.endpoints.gcp_kms));
            let req = client(cfg, false)?
                .post(&url)
                .bearer_auth(token.as_str())
                .json(&serde_json::json!({ "ciphertext": B64STD.encode(ciphertext) }));
            let body = send(op, &url, req, cfg, false).await?;
            #[derive(Deserialize)]
            struct DecryptResponse {
                plaintext: String,
            }
            let plaintext = serde_json::from_slice::<DecryptResponse>(&body)
                .map(|r| Zeroizing::new(r.plaintext))
                .map_err(|_| malformed(op, &url, "not JSON with a string `plaintext`"))?;
            decode(&B64STD, &plaintext, op, &url, "`plaintext` is not base64")
        }
    }
}

async fn azure_token(cfg: &WrapConfig) -> Result<Zeroizing<String>, WrapError> {
    let id = &cfg.azure;
    let Some(file) = &id.federated_token_file else {
        let op = Op::AzureImdsToken;
        let url = format!("{}{IMDS_TOKEN_PATH}", base(&cfg.endpoints.azure_imds));
        let mut query = vec![
            ("api-version", IMDS_API_VERSION),
            ("resource", AZURE_KEYVAULT_RESOURCE),
        ];
        if let Some(client_id) = &id.client_id {
            query.push(("client_id", client_id));
        }
        let req = client(cfg, true)?
            .get(&url)
            .query(&query)
            .header("Metadata", "true");
        let body = send(op, &url, req, cfg, true).await?;
        return access_token(op, &url, &body);
    };
    let op = Op::AzureEntraToken;
    let missing = |var: &str| {
        WrapError::Config(format!(
            "could not {op}: AZURE_FEDERATED_TOKEN_FILE is set but {var} is not"
        ))
    };
    let client_id = id
        .client_id
        .as_deref()
        .ok_or_else(|| missing("AZURE_CLIENT_ID"))?;
    let tenant = id
        .tenant_id
        .as_deref()
        .ok_or_else(|| missing("AZURE_TENANT_ID"))?;
    if !tenant
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.'))
    {
        return Err(WrapError::Config(format!(
            "could not {op}: AZURE_TENANT_ID {tenant:?} is not a tenant id or domain"
        )));
    }
    let assertion = Zeroizing::new(tokio::fs::read_to_string(file).await.map_err(|source| {
        WrapError::TokenFile {
            op,
            path: file.clone(),
            source,
        }
    })?);
    if assertion.trim().is_empty() {
        return Err(WrapError::Config(format!(
            "could not {op}: the federated token file {} is empty",
            file.display()
        )));
    }
    let authority = base(&cfg.endpoints.azure_authority_host);
    let url = format!("{authority}/{tenant}/oauth2/v2.0/token");
    let scope = format!("{AZURE_KEYVAULT_RESOURCE}/.default");
    let req = client(cfg, false)?.post(&url).form(&[
        ("client_id", client_id),
        ("scope", &scope),
        ("grant_type", "client_credentials"),
        ("client_assertion_type", JWT_BEARER),
        ("client_assertion", assertion.trim()),
    ]);
    let body = send(op, &url, req, cfg, false).await?;
    access_token(op, &url, &body)
}

async fn gcp_token(cfg: &WrapConfig) -> Result<Zeroizing<String>, WrapError> {
    let op = Op::GcpToken;
    let url = format!("{}{GCP_TOKEN_PATH}", base(&cfg.endpoints.gcp_metadata));
    let req = client(cfg, true)?
        .get(&url)
        .header(metadata::METADATA_FLAVOR.0, metadata::METADATA_FLAVOR.1);
    let body = send(op, &url, req, cfg, false).await?;
    access_token(op, &url, &body)
}

/// `access_token` of an OAuth token answer (Entra ID, IMDS, GCP metadata).
fn access_token(op: Op, url: &str, body: &[u8]) -> Result<Zeroizing<String>, WrapError> {
    #[derive(Deserialize)]
    struct TokenResponse {
        access_token: String,
    }
    let token = serde_json::from_slice::<TokenResponse>(body)
        .map(|r| Zeroizing::new(r.access_token))
        .map_err(|_| malformed(op, url, "not JSON with a string `access_token`"))?;
    if token.is_empty() {
        return Err(malformed(op, url, "an empty `access_token`"));
    }
    Ok(token)
}

fn decode(
    engine: &GeneralPurpose,
    text: &str,
    op: Op,
    url: &str,
    what: &'static str,
) -> Result<Zeroizing<Vec<u8>>, WrapError> {
    let bytes = Zeroizing::new(
        engine
            .decode(text.as_bytes())
            .map_err(|_| malformed(op, url, what))?,
    );
    if bytes.is_empty() {
        return Err(malformed(op, url, "an empty plaintext"));
    }
    Ok(bytes)
}

fn malformed(op: Op, url: &str, what: &'static str) -> WrapError {
    WrapError::Malformed {
        op,
        url: url.to_string(),
        what,
    }
}

fn base(url: &str) -> &str {
    url.trim_end_matches('/')
}

/// A client with the request time limit and no redirects. Metadata servers are
/// reached directly: a proxy from the environment must not see their tokens.
fn client(cfg: &WrapConfig, metadata: bool) -> Result<reqwest::Client, WrapError> {
    let mut builder = crate::cloud::http_client_builder()
        .timeout(cfg.timeout)
        .connect_timeout(cfg.timeout)
        .redirect(reqwest::redirect::Policy::none());
    if metadata {
        builder = builder.no_proxy();
    }
    builder
        .build()
        .map_err(|e| WrapError::Config(format!("could not build an HTTP client: {e}")))
}

/// Sends `req`, retrying as `cfg.retry` says, and returns a success's body.
async fn send(
    op: Op,
    url: &str,
    req: reqwest::RequestBuilder,
    cfg: &WrapConfig,
    imds: bool,
) -> Result<Zeroizing<Vec<u8>>, WrapError> {
    cfg.retry
        .run("a cloud KMS request", |_| {
            let this = req
                .try_clone()
                .expect("every request here has a buffered body, so it clones");
            async move {
                match this.send().await {
                    Ok(resp) => {
                        let status = resp.status();
                        let after = retry_after(resp.headers());
                        match resp.bytes().await {
                            Ok(body) if status.is_success() => {
                                Step::Done(Zeroizing::new(body.into()))
                            }
                            Ok(body) => {
                                let error = http_error(op, url, status.as_u16(), &body);
                                let transient = status.as_u16() == 429
                                    || status.is_server_error()
                                    || (imds && matches!(status.as_u16(), 404 | 410));
                                if transient {
                                    Step::Retry { error, after }
                                } else {
                                    Step::Fail(error)
                                }
                            }
                            Err(e) => Step::retry(transport(op, url, e)),
                        }
                    }
                    Err(e) if e.is_builder() => Step::Fail(transport(op, url, e)),
                    Err(e) => Step::retry(transport(op, url, e)),
                }
            }
        })
        .await
}

fn transport(op: Op, url: &str, e: reqwest::Error) -> WrapError {
    let reason = if e.is_timeout() {
        "timed out".to_string()
    } else {
        // The chain of causes, without the URL that reqwest repeats in each.
        let e = e.without_url();
        let mut reason = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(cause) = source {
            reason.push_str(": ");
            reason.push_str(&cause.to_string());
            source = cause.source();
        }
        reason
    };
    WrapError::Transport {
        op,
        url: url.to_string(),
        reason,
    }
}

/// An error answer, with the cloud's code and message where the body has them:
/// `{"error":{"code","message"}}` (Key Vault), `{"error":{"code","message","status"}}`
/// (Google; `status` is the readable code), `{"error","error_description"}`
/// (OAuth: Entra ID, IMDS), or else a line of plain text (metadata servers).
fn http_error(op: Op, url: &str, status: u16, body: &[u8]) -> WrapError {
    let ErrorBody { code, message } = ErrorBody::parse(body).unwrap_or_else(|| ErrorBody {
        code: None,
        message: Some(clean(&String::from_utf8_lossy(body), 400)),
    });
    WrapError::Http {
        op,
        url: url.to_string(),
        status,
        code: code.filter(|c| !c.is_empty()),
        message: message.filter(|m| !m.is_empty()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
    use serde_json::{Value, json};

    /// Bytes that take `+`/`/` in base64, `-`/`_` in base64url, and padding.
    const CIPHERTEXT: &[u8] = b"\xfb\xff\xbf\x00\x01wrapped-master-secret";

    fn reversed(bytes: &[u8]) -> Vec<u8> {
        bytes.iter().rev().copied().collect()
    }

    use crate::test_http::{Answer, Exchange as Seen, pairs, serve};

    impl Seen {
        fn json(&self) -> Value {
            serde_json::from_slice(&self.body).unwrap_or(Value::Null)
        }

        fn form(&self) -> HashMap<String, String> {
            pairs(&String::from_utf8_lossy(&self.body))
        }
    }

    struct Reply {
        status: u16,
        headers: Vec<(&'static str, String)>,
        body: String,
    }

    fn reply(status: u16, body: Value) -> Reply {
        Reply {
            status,
            headers: vec![("content-type", "application/json".into())],
            body: body.to_string(),
        }
    }

    /// An HTTP/1 server on 127.0.0.1 answering with `handler`; returns its base URL.
    async fn fake(handler: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> String {
        serve(|_| {
            move |seen: Seen| {
                let r = handler(&seen);
                Answer {
                    status: r.status,
                    headers: r.headers.into_iter().map(|(k, v)| (k.into(), v)).collect(),
                    body: r.body.into_bytes(),
                }
            }
        })
        .await
    }

    fn azure_error(status: u16, code: &str, message: &str) -> Reply {
        reply(status, json!({"error": {"code": code, "message": message}}))
    }

    fn oauth_error(status: u16, error: &str, description: &str) -> Reply {
        reply(
            status,
            json!({"error": error, "error_description": description}),
        )
    }

    fn google_error(status: u16, grpc_status: &str, message: &str) -> Reply {
        reply(
            status,
            json!({"error": {"code": status, "message": message, "status": grpc_status}}),
        )
    }

    /// Azure IMDS, documented request and answer shapes.
    fn imds(client_id: Option<&'static str>) -> impl Fn(&Seen) -> Reply {
        move |r| {
            let q = |k: &str| r.query.get(k).map(String::as_str);
            let problem = if r.method != "GET" || r.path != IMDS_TOKEN_PATH {
                Some(format!("no route {} {}", r.method, r.path))
            } else if r.header("metadata") != "true" {
                Some("Required metadata header not specified".into())
            } else if q("api-version") != Some("2018-02-01") {
                Some(format!("bad api-version {:?}", q("api-version")))
            } else if q("resource") != Some("https://vault.azure.net") {
                Some(format!("bad resource {:?}", q("resource")))
            } else if q("client_id") != client_id {
                Some(format!("bad client_id {:?}", q("client_id")))
            } else {
                None
            };
            match problem {
                Some(p) => oauth_error(400, "invalid_request", &p),
                None => reply(
                    200,
                    json!({
                        "access_token": "tok-imds",
                        "expires_in": "3599",
                        "expires_on": "1700000000",
                        "resource": "https://vault.azure.net",
                        "token_type": "Bearer",
                    }),
                ),
            }
        }
    }

    /// Key Vault `unwrapKey`: answers with the reversed ciphertext.
    fn key_vault(path: &'static str, token: &'static str) -> impl Fn(&Seen) -> Reply {
        move |r| {
            if r.method != "POST" || r.path != path {
                return azure_error(
                    404,
                    "NotFound",
                    &format!("no route {} {}", r.method, r.path),
                );
            }
            if r.header("authorization") != format!("Bearer {token}") {
                return azure_error(
                    401,
                    "Unauthorized",
                    "AKV10000: missing or wrong bearer token",
                );
            }
            if r.query.get("api-version").map(String::as_str) != Some("7.4") {
                return azure_error(400, "BadParameter", "missing or wrong api-version");
            }
            if !r.header("content-type").starts_with("application/json") {
                return azure_error(400, "BadParameter", "not JSON");
            }
            let body = r.json();
            if body["alg"] != "RSA-OAEP-256" {
                return azure_error(400, "BadParameter", "alg must be RSA-OAEP-256");
            }
            // Strict base64url without padding, as documented.
            let Some(Ok(wrapped)) = body["value"].as_str().map(|v| URL_SAFE_NO_PAD.decode(v))
            else {
                return azure_error(400, "BadParameter", "value is not base64url");
            };
            reply(
                200,
                json!({
                    "kid": "https://myvault.vault.azure.net/keys/master/v1",
                    "value": URL_SAFE_NO_PAD.encode(reversed(&wrapped)),
                }),
            )
        }
    }

    /// The GCP metadata server's token endpoint.
    fn gcp_metadata(r: &Seen) -> Reply {
        if r.method != "GET" || r.path != GCP_TOKEN_PATH {
            return Reply {
                status: 404,
                headers: vec![],
                body: "Not Found".into(),
            };
        }
        if r.header("metadata-flavor") != "Google" {
            return Reply {
                status: 403,
                headers: vec![("content-type", "text/html".into())],
                body: "Missing required header \"Metadata-Flavor\": \"Google\"".into(),
            };
        }
        reply(
            200,
            json!({"access_token": "tok-gcp", "expires_in": 3599, "token_type": "Bearer"}),
        )
    }

    const GCP_KEY: &str = "projects/p1/locations/global/keyRings/ring/cryptoKeys/master";

    /// Cloud KMS `decrypt`: answers with the reversed ciphertext.
    fn cloud_kms(r: &Seen) -> Reply {
        if r.method != "POST" || r.path != format!("/v1/{GCP_KEY}:decrypt") {
            return google_error(
                404,
                "NOT_FOUND",
                &format!("no route {} {}", r.method, r.path),
            );
        }
        if r.header("authorization") != "Bearer tok-gcp" {
            return google_error(
                401,
                "UNAUTHENTICATED",
                "Request had invalid authentication credentials.",
            );
        }
        // Strict standard base64 with padding, as proto3 JSON writes bytes.
        let Some(Ok(wrapped)) = r.json()["ciphertext"].as_str().map(|c| STANDARD.decode(c)) else {
            return google_error(400, "INVALID_ARGUMENT", "ciphertext is not base64");
        };
        reply(
            200,
            json!({
                "plaintext": STANDARD.encode(reversed(&wrapped)),
                "usedPrimary": true,
                "protectionLevel": "SOFTWARE",
            }),
        )
    }

    fn test_cfg() -> WrapConfig {
        WrapConfig {
            retry: Retry {
                max_attempts: 3,
                base_delay: Duration::from_millis(5),
                max_delay: Duration::from_secs(2),
            },
            timeout: Duration::from_secs(5),
            ..WrapConfig::default()
        }
    }

    fn azure_key(version: &str) -> WrapKey {
        WrapKey::AzureKeyVault {
            vault_url: "https://myvault.vault.azure.net".into(),
            key_name: "master".into(),
            key_version: version.into(),
        }
    }

    /// Counts the requests `handler` answers.
    fn counted(
        hits: &Arc<AtomicUsize>,
        handler: impl Fn(&Seen, usize) -> Reply + Send + Sync + 'static,
    ) -> impl Fn(&Seen) -> Reply + Send + Sync + 'static {
        let hits = hits.clone();
        move |r| handler(r, hits.fetch_add(1, Ordering::SeqCst) + 1)
    }

    #[tokio::test]
    async fn azure_via_imds_round_trip() {
        let mut cfg = test_cfg();
        cfg.azure.client_id = Some("mi-client".into());
        cfg.endpoints.azure_imds = fake(imds(Some("mi-client"))).await;
        cfg.endpoints.azure_vault =
            Some(fake(key_vault("/keys/master/v1/unwrapkey", "tok-imds")).await);
        let plain = unwrap(&azure_key("v1"), CIPHERTEXT, &cfg).await.unwrap();
        assert_eq!(*plain, reversed(CIPHERTEXT));
    }

    #[tokio::test]
    async fn azure_via_imds_without_version_or_client_id() {
        let mut cfg = test_cfg();
        cfg.endpoints.azure_imds = fake(imds(None)).await;
        cfg.endpoints.azure_vault =
            Some(fake(key_vault("/keys/master/unwrapkey", "tok-imds")).await);
        let plain = unwrap(&azure_key(""), CIPHERTEXT, &cfg).await.unwrap();
        assert_eq!(*plain, reversed(CIPHERTEXT));
    }

    #[tokio::test]
    async fn azure_via_workload_identity_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let token_file = dir.path().join("azure-identity-token");
        std::fs::write(&token_file, "header.payload.signature\n").unwrap();
        let entra = |r: &Seen| {
            let f = r.form();
            let field = |k: &str| f.get(k).map(String::as_str);
            let problem = if r.method != "POST" || r.path != "/tenant-1/oauth2/v2.0/token" {
                Some(format!("no route {} {}", r.method, r.path))
            } else if r.header("content-type") != "application/x-www-form-urlencoded" {
                Some(format!("bad content-type {}", r.header("content-type")))
            } else if field("client_id") != Some("wi-client") {
                Some("AADSTS700016: application not found".into())
            } else if field("scope") != Some("https://vault.azure.net/.default") {
                Some(format!("AADSTS70011: bad scope {:?}", field("scope")))
            } else if field("grant_type") != Some("client_credentials") {
                Some("AADSTS70003: unsupported grant_type".into())
            } else if field("client_assertion_type") != Some(JWT_BEARER) {
                Some("AADSTS700011: bad client_assertion_type".into())
            } else if field("client_assertion") != Some("header.payload.signature") {
                Some("AADSTS700213: No matching federated identity record found".into())
            } else {
                None
            };
            match problem {
                Some(p) => oauth_error(400, "invalid_request", &p),
                None => reply(
                    200,
                    json!({"token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599, "access_token": "tok-wi"}),
                ),
            }
        };
        let mut cfg = test_cfg();
        cfg.azure = AzureIdentity {
            client_id: Some("wi-client".into()),
            tenant_id: Some("tenant-1".into()),
            federated_token_file: Some(token_file),
        };
        // With a trailing slash, as AZURE_AUTHORITY_HOST usually has it.
        cfg.endpoints.azure_authority_host = format!("{}/", fake(entra).await);
        cfg.endpoints.azure_vault =
            Some(fake(key_vault("/keys/master/v1/unwrapkey", "tok-wi")).await);
        let plain = unwrap(&azure_key("v1"), CIPHERTEXT, &cfg).await.unwrap();
        assert_eq!(*plain, reversed(CIPHERTEXT));
    }

    #[tokio::test]
    async fn gcp_via_metadata_server_round_trip() {
        let mut cfg = test_cfg();
        cfg.endpoints.gcp_metadata = fake(gcp_metadata).await;
        cfg.endpoints.gcp_kms = fake(cloud_kms).await;
        let key: WrapKey = format!("gcp-kms:{GCP_KEY}").parse().unwrap();
        let plain = unwrap(&key, CIPHERTEXT, &cfg).await.unwrap();
        assert_eq!(*plain, reversed(CIPHERTEXT));
    }

    #[tokio::test]
    async fn azure_403_carries_key_vault_message() {
        let mut cfg = test_cfg();
        cfg.endpoints.azure_imds = fake(imds(None)).await;
        cfg.endpoints.azure_vault = Some(
            fake(|_: &Seen| {
                reply(
                    403,
                    json!({"error": {
                        "code": "Forbidden",
                        "message": "The user, group or application 'appid=x' does not have keys unwrapKey permission on key vault 'myvault'.",
                        "innererror": {"code": "AccessDenied"},
                    }}),
                )
            })
            .await,
        );
        let err = unwrap(&azure_key("v1"), CIPHERTEXT, &cfg)
            .await
            .unwrap_err();
        let text = err.to_string();
        match err {
            WrapError::Http {
                op: Op::AzureUnwrap,
                status: 403,
                code,
                message,
                ..
            } => {
                assert_eq!(code.as_deref(), Some("Forbidden"));
                assert!(message.unwrap().contains("unwrapKey permission"));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(
            text.contains("Azure Key Vault") && text.contains("HTTP 403"),
            "{text}"
        );
        assert!(
            text.contains("does not have keys unwrapKey permission"),
            "{text}"
        );
        assert!(!text.contains("tok-imds"), "{text}");
    }

    #[tokio::test]
    async fn gcp_403_carries_cloud_message() {
        let mut cfg = test_cfg();
        cfg.endpoints.gcp_metadata = fake(gcp_metadata).await;
        cfg.endpoints.gcp_kms = fake(|_: &Seen| {
            google_error(
                403,
                "PERMISSION_DENIED",
                "Permission 'cloudkms.cryptoKeyVersions.useToDecrypt' denied on resource (or it may not exist).",
            )
        })
        .await;
        let key: WrapKey = format!("gcp-kms:{GCP_KEY}").parse().unwrap();
        let err = unwrap(&key, CIPHERTEXT, &cfg).await.unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(&err, WrapError::Http { op: Op::GcpDecrypt, status: 403, code: Some(c), .. } if c == "PERMISSION_DENIED"),
            "{err:?}"
        );
        assert!(
            text.contains("GCP Cloud KMS") && text.contains("useToDecrypt"),
            "{text}"
        );
        assert!(!text.contains("tok-gcp"), "{text}");
    }

    #[tokio::test]
    async fn entra_token_error_is_reported_as_the_token_step() {
        let vault_hits = Arc::new(AtomicUsize::new(0));
        let dir = tempfile::tempdir().unwrap();
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, "fed-token-xyz").unwrap();
        let mut cfg = test_cfg();
        cfg.azure = AzureIdentity {
            client_id: Some("wi-client".into()),
            tenant_id: Some("tenant-1".into()),
            federated_token_file: Some(token_file),
        };
        cfg.endpoints.azure_authority_host = fake(|_: &Seen| {
            oauth_error(
                400,
                "invalid_client",
                "AADSTS700213: No matching federated identity record found for presented assertion subject.\r\nTrace ID: t\r\nCorrelation ID: c",
            )
        })
        .await;
        cfg.endpoints.azure_vault = Some(
            fake(counted(&vault_hits, |_, _| {
                azure_error(500, "x", "not to be reached")
            }))
            .await,
        );
        let err = unwrap(&azure_key("v1"), CIPHERTEXT, &cfg)
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(&err, WrapError::Http { op: Op::AzureEntraToken, status: 400, code: Some(c), .. } if c == "invalid_client"),
            "{err:?}"
        );
        assert!(
            text.contains("workload identity") && text.contains("AADSTS700213"),
            "{text}"
        );
        assert!(
            !text.contains('\n') && !text.contains("fed-token-xyz"),
            "{text}"
        );
        assert_eq!(vault_hits.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn retries_429_then_succeeds_after_retry_after() {
        let hits = Arc::new(AtomicUsize::new(0));
        let vault = key_vault("/keys/master/v1/unwrapkey", "tok-imds");
        let mut cfg = test_cfg();
        cfg.endpoints.azure_imds = fake(imds(None)).await;
        cfg.endpoints.azure_vault = Some(
            fake(counted(&hits, move |r, n| {
                if n == 1 {
                    let mut throttled = azure_error(
                        429,
                        "Throttled",
                        "Request was not processed because too many requests were received.",
                    );
                    throttled.headers.push(("retry-after", "1".into()));
                    throttled
                } else {
                    vault(r)
                }
            }))
            .await,
        );
        let start = std::time::Instant::now();
        let plain = unwrap(&azure_key("v1"), CIPHERTEXT, &cfg).await.unwrap();
        assert_eq!(*plain, reversed(CIPHERTEXT));
        assert_eq!(hits.load(Ordering::SeqCst), 2);
        // The 5 ms backoff would have been far shorter: Retry-After was honoured.
        assert!(
            start.elapsed() >= Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );
    }

    #[tokio::test]
    async fn gives_up_after_max_attempts() {
        let hits = Arc::new(AtomicUsize::new(0));
        let mut cfg = test_cfg();
        cfg.endpoints.gcp_metadata = fake(gcp_metadata).await;
        cfg.endpoints.gcp_kms = fake(counted(&hits, |_, _| {
            google_error(503, "UNAVAILABLE", "The service is currently unavailable.")
        }))
        .await;
        let key: WrapKey = format!("gcp-kms:{GCP_KEY}").parse().unwrap();
        let err = unwrap(&key, CIPHERTEXT, &cfg).await.unwrap_err();
        assert!(
            matches!(
                &err,
                WrapError::Http {
                    op: Op::GcpDecrypt,
                    status: 503,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(hits.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn gcp_metadata_error_without_json_is_reported() {
        let mut cfg = test_cfg();
        // What the metadata server says to a request without its header.
        cfg.endpoints.gcp_metadata = fake(|_: &Seen| Reply {
            status: 403,
            headers: vec![("content-type", "text/html".into())],
            body: "Missing required header \"Metadata-Flavor\": \"Google\"\n".into(),
        })
        .await;
        cfg.endpoints.gcp_kms = fake(cloud_kms).await;
        let key: WrapKey = format!("gcp-kms:{GCP_KEY}").parse().unwrap();
        let err = unwrap(&key, CIPHERTEXT, &cfg).await.unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(
                &err,
                WrapError::Http {
                    op: Op::GcpToken,
                    status: 403,
                    code: None,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(text.contains("Missing required header"), "{text}");
    }

    #[tokio::test]
    async fn malformed_responses_are_reported_without_their_content() {
        let mut cfg = test_cfg();
        cfg.endpoints.azure_imds = fake(imds(None)).await;
        cfg.endpoints.azure_vault = Some(
            fake(|_: &Seen| reply(200, json!({"kid": "k", "value": "***secret-ish***"}))).await,
        );
        let err = unwrap(&azure_key("v1"), CIPHERTEXT, &cfg)
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(
                &err,
                WrapError::Malformed {
                    op: Op::AzureUnwrap,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(
            text.contains("malformed") && !text.contains("secret-ish"),
            "{text}"
        );

        // A token answer that is not JSON at all.
        cfg.endpoints.azure_imds = fake(|_: &Seen| Reply {
            status: 200,
            headers: vec![("content-type", "text/html".into())],
            body: "<html>captive portal</html>".into(),
        })
        .await;
        let err = unwrap(&azure_key("v1"), CIPHERTEXT, &cfg)
            .await
            .unwrap_err();
        assert!(
            matches!(
                &err,
                WrapError::Malformed {
                    op: Op::AzureImdsToken,
                    ..
                }
            ),
            "{err:?}"
        );

        // A decrypt answer without `plaintext`.
        cfg.endpoints.gcp_metadata = fake(gcp_metadata).await;
        cfg.endpoints.gcp_kms = fake(|_: &Seen| reply(200, json!({"plain": "AAAA"}))).await;
        let key: WrapKey = format!("gcp-kms:{GCP_KEY}").parse().unwrap();
        let err = unwrap(&key, CIPHERTEXT, &cfg).await.unwrap_err();
        assert!(
            matches!(&err, WrapError::Malformed { op: Op::GcpDecrypt, what, .. } if what.contains("plaintext")),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn unreachable_endpoint_is_a_transport_error() {
        let mut cfg = test_cfg();
        // A port that was just free: nothing listens there.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        cfg.endpoints.azure_imds = format!("http://127.0.0.1:{port}");
        let err = unwrap(&azure_key("v1"), CIPHERTEXT, &cfg)
            .await
            .unwrap_err();
        assert!(
            matches!(
                &err,
                WrapError::Transport {
                    op: Op::AzureImdsToken,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn workload_identity_needs_tenant_and_client() {
        let mut cfg = test_cfg();
        cfg.azure.federated_token_file = Some("/nonexistent/token".into());
        cfg.azure.client_id = Some("wi-client".into());
        let err = unwrap(&azure_key("v1"), CIPHERTEXT, &cfg)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("AZURE_TENANT_ID is not"), "{err}");

        cfg.azure.tenant_id = Some("tenant-1".into());
        let err = unwrap(&azure_key("v1"), CIPHERTEXT, &cfg)
            .await
            .unwrap_err();
        assert!(matches!(err, WrapError::TokenFile { .. }), "{err:?}");
    }

    #[test]
    fn config_from_lookup() {
        let env: HashMap<&str, &str> = [
            ("AZURE_CLIENT_ID", "cid"),
            ("AZURE_TENANT_ID", "tid"),
            (
                "AZURE_FEDERATED_TOKEN_FILE",
                "/var/run/secrets/azure/tokens/azure-identity-token",
            ),
            ("AZURE_AUTHORITY_HOST", "https://login.microsoftonline.us/"),
        ]
        .into();
        let cfg = WrapConfig::from_lookup(|k| env.get(k).map(|v| v.to_string()));
        assert_eq!(cfg.azure.client_id.as_deref(), Some("cid"));
        assert_eq!(cfg.azure.tenant_id.as_deref(), Some("tid"));
        assert_eq!(
            cfg.azure.federated_token_file,
            Some(PathBuf::from(
                "/var/run/secrets/azure/tokens/azure-identity-token"
            ))
        );
        assert_eq!(
            cfg.endpoints.azure_authority_host,
            "https://login.microsoftonline.us/"
        );

        let cfg = WrapConfig::from_lookup(|k| (k == "AZURE_CLIENT_ID").then(String::new));
        assert_eq!(cfg.azure.client_id, None);
        assert_eq!(
            cfg.endpoints.azure_authority_host,
            "https://login.microsoftonline.com/"
        );
    }

    #[test]
    fn parses_good_keys() {
        let cases = [
            (
                "azure-keyvault:https://myvault.vault.azure.net/keys/master/0698c2156c1a4e1da5b6bab6f6422fd6",
                azure(
                    "https://myvault.vault.azure.net",
                    "master",
                    "0698c2156c1a4e1da5b6bab6f6422fd6",
                ),
            ),
            (
                "azure-keyvault:https://myvault.vault.azure.net/keys/master-key",
                azure("https://myvault.vault.azure.net", "master-key", ""),
            ),
            (
                "azure-keyvault:https://myvault.vault.azure.net/keys/master/",
                azure("https://myvault.vault.azure.net", "master", ""),
            ),
            (
                "azure-keyvault:https://myhsm.managedhsm.azure.net:443/keys/k/v2/",
                azure("https://myhsm.managedhsm.azure.net:443", "k", "v2"),
            ),
            (
                "gcp-kms:projects/my-proj/locations/europe-west1/keyRings/ring_1/cryptoKeys/master",
                WrapKey::GcpKms {
                    key_name:
                        "projects/my-proj/locations/europe-west1/keyRings/ring_1/cryptoKeys/master"
                            .into(),
                },
            ),
        ];
        for (text, want) in cases {
            let got: WrapKey = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(got, want, "{text}");
            // Display gives back a form that parses to the same key.
            assert_eq!(got.to_string().parse::<WrapKey>().unwrap(), want, "{text}");
        }
        assert_eq!(
            azure("https://v.vault.azure.net", "k", "1").to_string(),
            "azure-keyvault:https://v.vault.azure.net/keys/k/1"
        );
    }

    fn azure(vault_url: &str, key_name: &str, key_version: &str) -> WrapKey {
        WrapKey::AzureKeyVault {
            vault_url: vault_url.into(),
            key_name: key_name.into(),
            key_version: key_version.into(),
        }
    }

    #[test]
    fn rejects_bad_keys() {
        for text in [
            "",
            "myvault",
            "aws-kms:arn:aws:kms:us-east-1:1:key/x",
            "azure-keyvault:",
            "azure-keyvault:http://myvault.vault.azure.net/keys/k",
            "azure-keyvault:https://myvault.vault.azure.net",
            "azure-keyvault:https://myvault.vault.azure.net/",
            "azure-keyvault:https:///keys/k",
            "azure-keyvault:https://user@evil.example/keys/k",
            "azure-keyvault:https://myvault.vault.azure.net/secrets/k",
            "azure-keyvault:https://myvault.vault.azure.net/keys/",
            "azure-keyvault:https://myvault.vault.azure.net/keys/a b",
            "azure-keyvault:https://myvault.vault.azure.net/keys/k/v1/extra",
            "azure-keyvault:https://myvault.vault.azure.net/keys/k//",
            "azure-keyvault:https://myvault.vault.azure.net/keys/k/v1?x=y",
            "gcp-kms:",
            "gcp-kms:projects/p/locations/l/keyRings/r",
            "gcp-kms:projects/p/locations/l/keyRings/r/cryptoKeys/k/cryptoKeyVersions/1",
            "gcp-kms:projects//locations/l/keyRings/r/cryptoKeys/k",
            "gcp-kms:projects/../locations/l/keyRings/r/cryptoKeys/k",
            "gcp-kms:Projects/p/locations/l/keyRings/r/cryptoKeys/k",
            "gcp-kms:projects/p/locations/l/keyRings/r/cryptoKeys/k?alt=json",
            "gcp-kms:/projects/p/locations/l/keyRings/r/cryptoKeys/k",
        ] {
            let err = text.parse::<WrapKey>().expect_err(text);
            assert!(
                matches!(err, WrapError::InvalidKey { .. }),
                "{text}: {err:?}"
            );
            assert!(
                err.to_string().contains("expected azure-keyvault:"),
                "{err}"
            );
        }
    }

    #[tokio::test]
    async fn empty_ciphertext_is_refused_before_any_request() {
        let err = unwrap(&azure_key("v1"), b"", &test_cfg())
            .await
            .unwrap_err();
        assert!(matches!(err, WrapError::Config(_)), "{err:?}");
    }
}
