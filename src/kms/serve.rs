//! Starting the KMS process from its flags: the master secret (unwrapped by a
//! cloud key when it is wrapped), the authorizer `--authorizer` names, TLS,
//! and the gRPC server with its bounds.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::authz::{Authorizer, AuthorizerKind, NoneAuthorizer};
use super::server::{KmsService, MasterSecret};
use super::tls::TlsFiles;
use crate::cli::KmsArgs;
use crate::proto::kms::api_server::ApiServer;
use crate::server;

/// The master secret files, unwrapped first when `wrapped_by` names a cloud key.
pub async fn load_master(
    secret: &Path,
    salt: &Path,
    wrapped_by: Option<&crate::kms::wrap::WrapKey>,
) -> Result<MasterSecret, Box<dyn std::error::Error>> {
    match wrapped_by {
        None => Ok(MasterSecret::from_files(secret, salt)?),
        Some(key) => {
            let config = crate::kms::wrap::WrapConfig::from_env();
            let master = MasterSecret::from_wrapped_files(secret, salt, |wrapped| {
                let config = config.clone();
                async move { crate::kms::wrap::unwrap(key, &wrapped, &config).await }
            })
            .await?;
            tracing::info!(%key, versions = master.current_version(), "unwrapped the master secret");
            Ok(master)
        }
    }
}

/// The authorizer `--authorizer` names, built and started.
async fn kms_authorizer(args: &KmsArgs) -> Result<Arc<dyn Authorizer>, Box<dyn std::error::Error>> {
    match args.authorizer {
        AuthorizerKind::None => {
            // Without a per-volume check, anyone who reaches the KMS gets any
            // key: only the machine itself may reach it.
            if !args.listen.is_local() {
                return Err(format!(
                    "--authorizer none hands any volume's key to any caller; it is allowed only \
                     on a unix socket or a loopback address (tests), not on {}",
                    args.listen
                )
                .into());
            }
            tracing::warn!(
                "UNSAFE: --authorizer none: GetVolumeKey serves every volume's key to every \
                 caller, scoped to the volume id it names; for tests only"
            );
            Ok(Arc::new(NoneAuthorizer))
        }
        AuthorizerKind::Local => {
            let state = args.local_state.as_deref().ok_or(
                "--authorizer local needs --local-state (the local backend's state directory)",
            )?;
            local_authorizer(state)
        }
        AuthorizerKind::Kubernetes => kube_authorizer(args).await,
    }
}

/// `--authorizer local`: the volumes the local backend in `state` has
/// published to this machine. The seam `dev`'s authorizer plugs into.
fn local_authorizer(state: &Path) -> Result<Arc<dyn Authorizer>, Box<dyn std::error::Error>> {
    Ok(Arc::new(crate::kms::local_authz::LocalAuthorizer::new(
        state,
    )))
}

#[cfg(feature = "kubernetes")]
async fn kube_authorizer(
    args: &KmsArgs,
) -> Result<Arc<dyn Authorizer>, Box<dyn std::error::Error>> {
    use crate::kms::kube;
    let settings = kube::Settings {
        audience: args.token_audience.clone(),
        node_account: args.node_service_account.parse()?,
        driver: args.driver_name.to_string(),
        max_staleness: Duration::from_secs(args.authorization_max_staleness.max(1)),
    };
    let client = kube::client(args.kubeconfig.as_deref()).await?;
    tracing::info!(
        audience = %settings.audience,
        node_account = %settings.node_account.username(),
        driver = %settings.driver,
        max_staleness_s = settings.max_staleness.as_secs(),
        "authorizing key requests against the Kubernetes API"
    );
    Ok(Arc::new(kube::KubeAuthorizer::start(client, settings)))
}

#[cfg(not(feature = "kubernetes"))]
async fn kube_authorizer(_: &KmsArgs) -> Result<Arc<dyn Authorizer>, Box<dyn std::error::Error>> {
    Err("--authorizer kubernetes: this binary was built without the `kubernetes` feature".into())
}

/// How long one KMS request may take, queueing included.
const KMS_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Requests in flight on one KMS connection; HTTP/2 streams beyond it are refused.
const KMS_STREAMS_PER_CONNECTION: usize = 64;

pub async fn serve(args: KmsArgs) -> Result<(), Box<dyn std::error::Error>> {
    let tls = match (
        args.tls_cert_file.clone(),
        args.tls_key_file.clone(),
        args.client_ca_file.clone(),
    ) {
        (Some(cert), Some(key), Some(ca)) => Some(TlsFiles { cert, key, ca }),
        // Plaintext hands a key to whoever reaches the port: only this machine may.
        _ if args.insecure && !args.listen.is_local() => {
            return Err(format!(
                "--insecure serves keys without TLS to anyone who reaches {}; it is allowed only \
                 on a unix socket (unix:///path) or a loopback address (127.0.0.0/8, [::1]); \
                 serve on another address with --tls-cert-file, --tls-key-file and --client-ca-file",
                args.listen
            )
            .into());
        }
        _ if args.insecure => None,
        _ => {
            return Err(
                "the KMS serves keys only over mutual TLS: pass --tls-cert-file, \
                        --tls-key-file and --client-ca-file (or --insecure for tests)"
                    .into(),
            );
        }
    };
    let master = load_master(
        &args.master_secret_file,
        &args.salt_file,
        args.master_secret_wrapped_by.as_ref(),
    )
    .await?;
    if let Some(addr) = args.metrics_address {
        crate::metrics::serve(addr).await?;
    }
    // Bounds on what one client, or many, can make the KMS hold: see README's
    // security section.
    let mut builder = server::builder()
        .timeout(KMS_REQUEST_TIMEOUT)
        .concurrency_limit_per_connection(KMS_STREAMS_PER_CONNECTION)
        .max_concurrent_streams(KMS_STREAMS_PER_CONNECTION as u32);
    let handshake = Duration::from_secs(args.tls_handshake_timeout_seconds.max(1));
    match &tls {
        Some(files) => builder = builder.tls_config(files.server_config(handshake)?)?,
        None => tracing::warn!("serving the KMS without TLS (--insecure)"),
    }
    let authorizer = kms_authorizer(&args).await?;
    if args.allow_v1_keys {
        tracing::warn!(
            "serving v1 keys (--allow-v1-keys): GetDataKey and GetVersionedDataKey hand any \
             client that passes TLS the key of any id, bound to no volume; keep this on only \
             while volumes formatted before v2 keys remain"
        );
    }
    let service =
        ApiServer::new(KmsService::new(master, authorizer).allow_v1_keys(args.allow_v1_keys))
            .max_decoding_message_size(crate::kms::server::MAX_REQUEST_SIZE);
    let router = builder.add_service(service);
    let limits = server::Limits {
        max_connections: args.max_connections,
    };
    server::serve(router, &args.listen, limits, server::shutdown_signal()).await?;
    Ok(())
}
