//! The `cryptdisk-csi` binary: parses the command line ([`cli`]) and wires
//! the parts each subcommand runs.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use cryptdisk_csi::backend::LocalBackend;
#[cfg(feature = "azure")]
use cryptdisk_csi::backend::azure::{self, AzureBackend};
#[cfg(feature = "gcp")]
use cryptdisk_csi::backend::gcp::{self, GcpBackend, GcpConfig};
use cryptdisk_csi::cli::{
    Cli, Command, ControllerArgs, CsiArgs, GcpArgs, LocalArgs, NodeAction, NodeCommand,
};
use cryptdisk_csi::config::DriverName;
use cryptdisk_csi::csi::contract::TOPOLOGY_NODE;
use cryptdisk_csi::csi::controller::ControllerService;
use cryptdisk_csi::csi::identity::IdentityService;
use cryptdisk_csi::csi::node::{NodeConfig, NodeService};
use cryptdisk_csi::kms::local_authz::LocalAuthorizer;
use cryptdisk_csi::kms::server::MasterSecret;
use cryptdisk_csi::kms::{KeySource, LocalKeySource};
use cryptdisk_csi::mount::device::NodeDevices;
use cryptdisk_csi::mount::device::identity::{self, Given, NodeIdentity};
use cryptdisk_csi::proto::csi::controller_server::ControllerServer;
use cryptdisk_csi::proto::csi::identity_server::IdentityServer;
use cryptdisk_csi::proto::csi::node_server::NodeServer;
use cryptdisk_csi::volume::BackendKind;
use cryptdisk_csi::{logging, ops, privileges, server};

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
        // The operator tools' errors carry their exit code and go to a person.
        Err(e) => match e.downcast_ref::<ops::OpsError>() {
            Some(ops_error) => {
                eprintln!("cryptdisk-csi: {}", ops::printable(&ops_error.to_string()));
                ExitCode::from(ops_error.exit_code())
            }
            None => {
                tracing::error!("{e}");
                ExitCode::FAILURE
            }
        },
    }
}

async fn run(command: Command) -> Result<(), Box<dyn std::error::Error>> {
    match command {
        Command::Controller(args) => {
            let limit = args.max_volumes_per_node;
            let controller = controller_service(&args).await?.with_attach_limit(limit);
            serve_csi(args.csi, Some(controller), None).await
        }
        Command::Node(NodeCommand {
            action: Some(NodeAction::Status(args)),
            ..
        }) => ops::status::run(args),
        Command::Node(NodeCommand { serve: args, .. }) => {
            privileges::not_dumpable()?;
            privileges::check_node()?;
            let kms = args.kms.as_ref().ok_or("--kms is required to serve")?;
            let keys = Arc::new(args.kms_client.key_source(kms)?);
            let given = Given {
                node_id: args.node.node_id.clone(),
                max_volumes: args.node.max_volumes,
            };
            let node_identity = identity::discover(args.cloud, given).await?;
            let node = node_service(&args.node, node_identity, args.local_data_dir, keys);
            serve_csi(args.csi, None, Some(node)).await
        }
        Command::Dev(args) => {
            privileges::not_dumpable()?;
            privileges::check_node()?;
            let node_identity = identity::local(Given {
                node_id: args.node.node_id.clone(),
                max_volumes: args.node.max_volumes,
            })?;
            let master = match (&args.master_secret_file, &args.salt_file) {
                (Some(secret), Some(salt)) => MasterSecret::from_files(secret, salt)?,
                _ => MasterSecret::load_or_generate(&args.local.data_dir.join("kms"))?,
            };
            // The embedded KMS serves exactly the volumes the local backend has
            // published to this node, as the cluster KMS does.
            let authorizer = Arc::new(LocalAuthorizer::new(args.local.data_dir.clone()));
            let keys = Arc::new(LocalKeySource::new(master, "embedded", authorizer));
            let controller = local_controller(&args.local, node_identity.node_id.clone())?
                .with_attach_limit(node_identity.max_volumes);
            let data_dir = Some(args.local.data_dir.clone());
            let node = node_service(&args.node, node_identity, data_dir, keys);
            serve_csi(args.csi, Some(controller), Some(node)).await
        }
        Command::Kms(args) => {
            privileges::not_dumpable()?;
            cryptdisk_csi::kms::serve::serve(args).await
        }
        Command::AddKeyVersion(args) => {
            let (version, path) = MasterSecret::add_version_file(&args.master_secret_file)?;
            println!("added master-secret version {version}: {}", path.display());
            Ok(())
        }
        Command::Inspect(args) => {
            let report = ops::inspect::inspect(&args.device).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.human());
            }
            Ok(report.outcome()?)
        }
        Command::Recover(args) => ops::recover::run(args).await,
        Command::Verify(args) => {
            let keys = args.tls.key_source(&args.kms)?;
            for line in ops::verify_with(&keys, &args.device, &args.volume_id).await? {
                println!("{line}");
            }
            Ok(())
        }
    }
}

/// The controller of the backend `--backend` names.
async fn controller_service(
    args: &ControllerArgs,
) -> Result<ControllerService, Box<dyn std::error::Error>> {
    match args.backend {
        BackendKind::Local => {
            let node = identity::node_id_or_host_name(args.local_node.clone())?;
            local_controller(&args.local, node)
        }
        BackendKind::Azure => azure_controller(&args.azure_config_file, &args.csi.driver_name),
        BackendKind::Gcp => gcp_controller(&args.gcp, args.csi.driver_name.as_str()).await,
    }
}

fn local_controller(
    local: &LocalArgs,
    node: String,
) -> Result<ControllerService, Box<dyn std::error::Error>> {
    let backend = LocalBackend::open(&local.data_dir, &node, local.capacity_bytes)?;
    Ok(ControllerService::new(Arc::new(backend), Some(vec![node])))
}

#[cfg(not(feature = "gcp"))]
async fn gcp_controller(
    _args: &GcpArgs,
    _driver_name: &str,
) -> Result<ControllerService, Box<dyn std::error::Error>> {
    Err(identity::not_built("--backend", BackendKind::Gcp))
}

/// The gcp backend, its project and default zone from the flags or the
/// metadata server.
#[cfg(feature = "gcp")]
async fn gcp_controller(
    args: &GcpArgs,
    driver_name: &str,
) -> Result<ControllerService, Box<dyn std::error::Error>> {
    let metadata = gcp::metadata::Metadata::from_env()?;
    let mut config =
        GcpConfig::resolve(args.gcp_project.clone(), args.gcp_zone.clone(), &metadata).await?;
    config.driver_name = driver_name.to_string();
    tracing::info!(
        project = %config.project,
        zone = %config.default_zone,
        endpoint = config.endpoint.as_deref().unwrap_or("default"),
        "gcp backend"
    );
    let credentials = gcp::config::application_default_credentials()?;
    let backend = GcpBackend::connect(config, credentials).await?;
    Ok(ControllerService::new(Arc::new(backend), None))
}

#[cfg(not(feature = "azure"))]
fn azure_controller(
    _config_file: &std::path::Path,
    _driver: &DriverName,
) -> Result<ControllerService, Box<dyn std::error::Error>> {
    Err(identity::not_built("--backend", BackendKind::Azure))
}

/// The controller of the Azure backend, configured from azure.json and the environment.
#[cfg(feature = "azure")]
fn azure_controller(
    config_file: &std::path::Path,
    driver: &DriverName,
) -> Result<ControllerService, Box<dyn std::error::Error>> {
    let config = azure::config::AzureConfig::load(config_file, driver.as_str())
        .map_err(|e| format!("--backend azure: {e}"))?;
    let backend = AzureBackend::new(&config).map_err(|e| format!("--backend azure: {e}"))?;
    Ok(ControllerService::new(Arc::new(backend), None))
}

/// The node service; a node that serves the local backend also reports the
/// machine its images live on.
fn node_service(
    args: &cryptdisk_csi::cli::NodeIdArgs,
    node: NodeIdentity,
    local_data_dir: Option<std::path::PathBuf>,
    keys: Arc<dyn KeySource>,
) -> NodeService {
    let mut topology = node.topology;
    if local_data_dir.is_some() {
        topology.insert(TOPOLOGY_NODE.to_string(), node.node_id.clone());
    }
    tracing::info!(node_id = %node.node_id, "node plugin");
    let devices = Arc::new(NodeDevices::host(local_data_dir.clone()));
    NodeService::new(
        NodeConfig {
            node_id: node.node_id,
            local_data_dir,
            topology,
            max_volumes: node.max_volumes,
            max_parallel_work: args.max_parallel_work,
            wipe_budget: std::time::Duration::from_secs(args.wipe_budget_seconds),
        },
        keys,
        devices,
    )
}

async fn serve_csi(
    args: CsiArgs,
    controller: Option<ControllerService>,
    node: Option<NodeService>,
) -> Result<(), Box<dyn std::error::Error>> {
    let identity = IdentityService::new(args.driver_name.clone());
    tracing::info!(
        driver = %args.driver_name,
        version = env!("CARGO_PKG_VERSION"),
        controller = controller.is_some(),
        node = node.is_some(),
        "starting"
    );
    if let Some(addr) = args.metrics_address {
        cryptdisk_csi::metrics::serve(addr).await?;
    }
    let router = server::builder()
        .add_service(IdentityServer::new(identity))
        .add_optional_service(controller.map(ControllerServer::new))
        .add_optional_service(node.map(NodeServer::new));
    server::serve(
        router,
        &args.endpoint,
        server::Limits::default(),
        server::shutdown_signal(),
    )
    .await?;
    Ok(())
}
