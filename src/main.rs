//! The `cryptdisk-csi` binary: one subcommand per process of the system.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use cryptdisk_csi::config::{DriverName, Endpoint};
use cryptdisk_csi::csi::identity::{IdentityService, Services};
use cryptdisk_csi::kms::server::{KmsService, MasterSecret};
use cryptdisk_csi::logging::{self, LogFormat};
use cryptdisk_csi::proto::csi::identity_server::IdentityServer;
use cryptdisk_csi::proto::kms::api_server::ApiServer;
use cryptdisk_csi::server;
use tonic::transport::Server;

/// A Kubernetes CSI driver that encrypts every volume it serves with dm-crypt
/// (LUKS2), using per-volume keys derived by a cluster KMS.
///
/// Every flag can also be set through the environment variable named in its help.
#[derive(Parser)]
#[command(name = "cryptdisk-csi", version, propagate_version = true)]
struct Cli {
    /// Log output format.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "CRYPTDISK_LOG_FORMAT"
    )]
    log_format: LogFormat,

    /// Log level (error, warn, info, debug, trace) or tracing directives such as
    /// "info,cryptdisk_csi::crypt=debug".
    #[arg(
        long,
        global = true,
        default_value = "info",
        env = "CRYPTDISK_LOG_LEVEL"
    )]
    log_level: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve CSI Identity and Controller (runs as a Deployment beside the
    /// provisioner, attacher, resizer and snapshotter sidecars).
    Controller(CsiArgs),
    /// Serve CSI Identity and Node (runs as a privileged DaemonSet on every node).
    Node(NodeArgs),
    /// Serve the cluster KMS, which derives each volume's key from a master secret.
    Kms(KmsArgs),
    /// Everything in one process on one machine: for trying the driver and for tests.
    Dev(NodeArgs),
}

#[derive(Args)]
struct CsiArgs {
    /// Where to serve CSI: unix:///path/to/csi.sock (kubelet and the sidecars), or
    /// tcp://IP:PORT for tests.
    #[arg(
        long,
        default_value = "unix:///csi/csi.sock",
        env = "CRYPTDISK_ENDPOINT"
    )]
    endpoint: Endpoint,

    /// The CSI driver name that StorageClasses name as their provisioner.
    #[arg(
        long,
        default_value = "cryptdisk.csi.io",
        env = "CRYPTDISK_DRIVER_NAME"
    )]
    driver_name: DriverName,
}

#[derive(Args)]
struct NodeArgs {
    #[command(flatten)]
    csi: CsiArgs,

    /// This node's id as the controller knows it (for Kubernetes, the node name).
    /// Defaults to the host name.
    #[arg(long, env = "CRYPTDISK_NODE_ID")]
    node_id: Option<String>,
}

#[derive(Args)]
struct KmsArgs {
    /// Where to serve the KMS API: tcp://IP:PORT or unix:///path.
    #[arg(
        long,
        default_value = "tcp://0.0.0.0:9000",
        env = "CRYPTDISK_KMS_LISTEN"
    )]
    listen: Endpoint,

    /// File holding the master secret (at least 32 random bytes), readable by its
    /// owner only.
    #[arg(long, env = "CRYPTDISK_MASTER_SECRET_FILE")]
    master_secret_file: PathBuf,

    /// File holding the HKDF salt (at least 32 random bytes), readable by its owner only.
    #[arg(long, env = "CRYPTDISK_SALT_FILE")]
    salt_file: PathBuf,

    /// Serve without TLS. Anyone who reaches the port can then ask for keys: only for
    /// tests and for a KMS reachable from the node plugins alone.
    #[arg(long, env = "CRYPTDISK_KMS_INSECURE")]
    insecure: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = logging::init(cli.log_format, &cli.log_level) {
        eprintln!("cryptdisk-csi: {e}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cryptdisk-csi: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> Result<(), Box<dyn std::error::Error>> {
    match command {
        Command::Controller(args) => {
            serve_csi(
                args,
                Services {
                    controller: true,
                    node: false,
                },
            )
            .await
        }
        Command::Node(args) | Command::Dev(args) => {
            let node_id = resolve_node_id(args.node_id)?;
            tracing::info!(%node_id, "node plugin");
            serve_csi(
                args.csi,
                Services {
                    controller: false,
                    node: true,
                },
            )
            .await
        }
        Command::Kms(args) => serve_kms(args).await,
    }
}

fn resolve_node_id(given: Option<String>) -> Result<String, Box<dyn std::error::Error>> {
    match given {
        Some(id) if !id.is_empty() => Ok(id),
        Some(_) => Err("--node-id must not be empty".into()),
        None => Ok(nix::unistd::gethostname()?
            .into_string()
            .map_err(|_| "the host name is not UTF-8; pass --node-id")?),
    }
}

async fn serve_csi(args: CsiArgs, services: Services) -> Result<(), Box<dyn std::error::Error>> {
    let identity = IdentityService::new(args.driver_name.clone(), services);
    tracing::info!(driver = %args.driver_name, version = env!("CARGO_PKG_VERSION"), "starting");
    let router = Server::builder().add_service(IdentityServer::new(identity));
    server::serve(router, &args.endpoint, server::shutdown_signal()).await?;
    Ok(())
}

async fn serve_kms(args: KmsArgs) -> Result<(), Box<dyn std::error::Error>> {
    if !args.insecure {
        return Err(
            "the KMS serves only with --insecure until TLS with client certificates \
                    lands; pass --insecure on a network only node plugins reach"
                .into(),
        );
    }
    let master = MasterSecret::from_files(&args.master_secret_file, &args.salt_file)?;
    tracing::warn!("serving the KMS without TLS (--insecure)");
    let router = Server::builder().add_service(ApiServer::new(KmsService::new(master)));
    server::serve(router, &args.listen, server::shutdown_signal()).await?;
    Ok(())
}
