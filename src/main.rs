//! The `cryptdisk-csi` binary: one subcommand per process of the system.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use cryptdisk_csi::backend::LocalBackend;
#[cfg(feature = "azure")]
use cryptdisk_csi::backend::azure::{self, AzureBackend};
#[cfg(feature = "gcp")]
use cryptdisk_csi::backend::gcp::{self, GcpBackend, GcpConfig};
use cryptdisk_csi::config::{DriverName, Endpoint};
use cryptdisk_csi::crypt::MapperName;
use cryptdisk_csi::csi::contract::TOPOLOGY_NODE;
use cryptdisk_csi::csi::controller::ControllerService;
use cryptdisk_csi::csi::identity::IdentityService;
use cryptdisk_csi::csi::node::{NodeConfig, NodeService};
use cryptdisk_csi::kms::authz::{Authorizer, NoneAuthorizer};
use cryptdisk_csi::kms::client::{GrpcKeySource, KmsAddress};
use cryptdisk_csi::kms::local_authz::LocalAuthorizer;
use cryptdisk_csi::kms::server::{KmsService, MasterSecret};
use cryptdisk_csi::kms::tls::TlsFiles;
use cryptdisk_csi::kms::{KeySource, LocalKeySource};
use cryptdisk_csi::logging::{self, LogFormat};
use cryptdisk_csi::ops;
use cryptdisk_csi::proto::csi::controller_server::ControllerServer;
use cryptdisk_csi::proto::csi::identity_server::IdentityServer;
use cryptdisk_csi::proto::csi::node_server::NodeServer;
use cryptdisk_csi::proto::kms::api_server::ApiServer;
use cryptdisk_csi::server;

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
    Controller(ControllerArgs),
    /// Serve CSI Identity and Node (runs as a privileged DaemonSet on every node);
    /// `node status` instead lists what this node's driver holds.
    Node(NodeCommand),
    /// Serve the cluster KMS, which derives each volume's key from a master secret.
    Kms(KmsArgs),
    /// Everything in one process on one machine: Identity, Controller and Node on
    /// one socket, the local backend and an embedded KMS. For trying the driver
    /// and for tests.
    Dev(DevArgs),
    /// Add a master-secret version beside --master-secret-file (32 random bytes,
    /// mode 0600, named <file>-v<N>). Restart the KMS to serve it: new volumes use
    /// it, and each older volume's keyslot moves to it at its next stage.
    AddKeyVersion(AddKeyVersionArgs),
    /// Read a device's or image's LUKS2 header without any key: format, cipher,
    /// sector size, keyslots, the cryptdisk token, and whether it passes the
    /// driver's validation. Exit 0: a valid volume of this driver; 3: no LUKS2
    /// header; 4: a header the driver refuses (the reason is printed); 1: the
    /// device cannot be read.
    Inspect(InspectArgs),
    /// Derive a volume's key offline from the master secret files (as the KMS
    /// does, for each version its token names), check which keyslot it opens
    /// without activating anything, and write it to a new key file for stock
    /// cryptsetup (--key-file) or open the mapping (--open). Key bytes are printed
    /// only with --show-key. Exit 0: a key opens; 3/4 as inspect; 5: no derived
    /// key opens a keyslot; 1: anything else (a key file that exists included).
    Recover(RecoverArgs),
    /// Ask the KMS for a volume's key (each version its token names) and check
    /// that it opens a keyslot, without activating anything. Exit 0: it opens;
    /// 3/4 as inspect; 5: the KMS's key opens no keyslot; 1: the KMS cannot be
    /// reached or refuses.
    Verify(VerifyArgs),
}

/// `node`: serve CSI (no subcommand: the DaemonSet's invocation), or a tool.
#[derive(Args)]
#[command(subcommand_negates_reqs = true)]
struct NodeCommand {
    #[command(subcommand)]
    action: Option<NodeAction>,

    #[command(flatten)]
    serve: NodeArgs,
}

#[derive(Subcommand)]
enum NodeAction {
    /// The mappings (/dev/mapper/cryptdisk-*), mounts and loop devices this
    /// node's driver owns, and what is stale: a mapping whose device is gone, a
    /// loop device over a deleted image, a staging path without a mapping. Exit
    /// 0: nothing stale; 6: stale items (listed); 1: cannot read the system.
    Status(NodeStatusArgs),
}

#[derive(Args)]
struct NodeStatusArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,

    /// The kubelet's staging directory of this driver, holding
    /// <volume>/globalmount per staged volume.
    #[arg(
        long,
        default_value = "/var/lib/kubelet/plugins/kubernetes.io/csi/cryptdisk.csi.io",
        env = "CRYPTDISK_STAGING_ROOT"
    )]
    staging_root: PathBuf,

    /// The local backend's data directory, whose disk images this node attaches
    /// as loop devices.
    #[arg(long, env = "CRYPTDISK_LOCAL_DATA_DIR")]
    local_data_dir: Option<PathBuf>,

    /// Where sysfs is mounted (tests point it at a fake tree).
    #[arg(long, default_value = "/sys", hide = true)]
    sys_root: PathBuf,

    /// Where /dev is (tests point it at a fake tree).
    #[arg(long, default_value = "/dev", hide = true)]
    dev_root: PathBuf,

    /// The mount table to read (tests point it at a file).
    #[arg(long, default_value = "/proc/self/mountinfo", hide = true)]
    mountinfo: PathBuf,
}

#[derive(Args)]
struct InspectArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,

    /// The block device or image file.
    device: PathBuf,
}

#[derive(Args)]
struct RecoverArgs {
    /// The master secret file (version 1); versions N >= 2 are read from
    /// <file>-vN beside it. Mode 0600 or 0400.
    #[arg(long, env = "CRYPTDISK_MASTER_SECRET_FILE")]
    master_secret_file: PathBuf,

    /// The HKDF salt file the KMS was started with.
    #[arg(long, env = "CRYPTDISK_SALT_FILE")]
    salt_file: PathBuf,

    /// The master secret files hold ciphertext that this cloud key unwraps (as
    /// the KMS's --master-secret-wrapped-by).
    #[arg(long, env = "CRYPTDISK_MASTER_SECRET_WRAPPED_BY")]
    master_secret_wrapped_by: Option<cryptdisk_csi::kms::wrap::WrapKey>,

    /// Write the key to this new file (mode 0600; an existing file is never
    /// overwritten) and print the cryptsetup command line that opens the volume
    /// with it.
    #[arg(long)]
    key_file: Option<PathBuf>,

    /// The mapping name in the printed cryptsetup command line.
    #[arg(long, default_value = "cryptdisk-recovered")]
    name: String,

    /// Open the volume as /dev/mapper/NAME (needs device-mapper and root).
    #[arg(long, value_name = "NAME")]
    open: Option<String>,

    /// Open read-only (with --open), or print --readonly in the command line.
    #[arg(long)]
    readonly: bool,

    /// Print the key as hex on standard output. Anyone who sees it can read the
    /// volume.
    #[arg(long)]
    show_key: bool,

    /// The volume's key scope, needed for a volume with v2 keys (its token says
    /// "derivation": "v2"): the PersistentVolume's volumeAttributes
    /// cryptdisk.csi.io/key-scope, or its volume handle when that is absent.
    #[arg(long)]
    scope: Option<String>,

    /// The block device or image file.
    device: PathBuf,
}

#[derive(Args)]
struct VerifyArgs {
    /// The KMS: https://HOST:PORT (mutual TLS, with the three --kms-*-file
    /// flags), tcp://HOST:PORT (plaintext, with --kms-insecure) or unix:///path.
    #[arg(long, env = "CRYPTDISK_KMS")]
    kms: KmsAddress,

    #[command(flatten)]
    tls: KmsClientArgs,

    /// The CSI volume id (the PersistentVolume's volume handle) the device
    /// holds: the KMS serves a volume's key only for that volume, and only to
    /// the node it is attached to.
    #[arg(long)]
    volume_id: String,

    /// The block device or image file.
    device: PathBuf,
}

/// How a client authenticates to the KMS.
#[derive(Args)]
struct KmsClientArgs {
    /// CA certificate (PEM) the KMS's certificate must chain to.
    #[arg(long, env = "CRYPTDISK_KMS_CA_FILE", requires_all = ["kms_cert_file", "kms_key_file"])]
    kms_ca_file: Option<PathBuf>,

    /// This node's client certificate (PEM) for the KMS.
    #[arg(long, env = "CRYPTDISK_KMS_CERT_FILE", requires_all = ["kms_ca_file", "kms_key_file"])]
    kms_cert_file: Option<PathBuf>,

    /// The private key (PEM) of --kms-cert-file.
    #[arg(long, env = "CRYPTDISK_KMS_KEY_FILE", requires_all = ["kms_ca_file", "kms_cert_file"])]
    kms_key_file: Option<PathBuf>,

    /// Talk to a tcp:// KMS in plaintext: only for tests.
    #[arg(long, env = "CRYPTDISK_KMS_INSECURE")]
    kms_insecure: bool,

    /// The node's projected ServiceAccount token (audience: the KMS), sent as
    /// `authorization: Bearer` with every key request and read again each time,
    /// as the kubelet rotates it. Without it no token is sent.
    #[arg(long, env = "CRYPTDISK_KMS_TOKEN_FILE")]
    kms_token_file: Option<PathBuf>,
}

impl KmsClientArgs {
    fn key_source(&self, kms: &KmsAddress) -> Result<GrpcKeySource, Box<dyn std::error::Error>> {
        let tls = match (&self.kms_ca_file, &self.kms_cert_file, &self.kms_key_file) {
            (Some(ca), Some(cert), Some(key)) => Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
            }),
            _ => None,
        };
        Ok(GrpcKeySource::new(kms, tls.as_ref(), self.kms_insecure)?
            .with_token_file(self.kms_token_file.clone()))
    }
}

#[derive(Args)]
struct AddKeyVersionArgs {
    /// The master secret file (version 1) the KMS is started with.
    #[arg(long, env = "CRYPTDISK_MASTER_SECRET_FILE")]
    master_secret_file: PathBuf,
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

    /// Serve Prometheus /metrics and /healthz over HTTP on this address
    /// (IP:PORT); off when not given.
    #[arg(long, env = "CRYPTDISK_METRICS_ADDRESS")]
    metrics_address: Option<std::net::SocketAddr>,
}

#[derive(Args)]
struct LocalArgs {
    /// Directory of the local backend: disk images, snapshots and their index.
    #[arg(long, default_value = "/var/lib/cryptdisk", env = "CRYPTDISK_DATA_DIR")]
    data_dir: PathBuf,

    /// Most bytes the local backend's disks and snapshots may take together
    /// (default: the free space of the data directory's filesystem).
    #[arg(long, env = "CRYPTDISK_CAPACITY_BYTES")]
    capacity_bytes: Option<u64>,
}

#[derive(Args)]
struct ControllerArgs {
    #[command(flatten)]
    csi: CsiArgs,

    /// The disk backend: local (sparse image files on this machine), azure
    /// (Azure managed disks through Azure Resource Manager) or gcp (Compute
    /// Engine persistent disks; credentials from Application Default
    /// Credentials: the metadata server, or GOOGLE_APPLICATION_CREDENTIALS naming a
    /// service-account key or an external-account file; the Compute endpoint can
    /// be replaced with CRYPTDISK_GCP_COMPUTE_ENDPOINT).
    #[arg(long, default_value = "local", env = "CRYPTDISK_BACKEND")]
    backend: String,

    /// The Azure cloud config file (azure.json, as Azure's disk CSI driver and
    /// cloud-provider-azure read it: tenantId, subscriptionId, resourceGroup,
    /// location, vmType, aadClientId/aadClientSecret, useManagedIdentityExtension,
    /// userAssignedIdentityID, aadFederatedTokenFile). The standard AZURE_*
    /// variables (AZURE_TENANT_ID, AZURE_CLIENT_ID, AZURE_CLIENT_SECRET,
    /// AZURE_FEDERATED_TOKEN_FILE, AZURE_SUBSCRIPTION_ID, AZURE_RESOURCE_GROUP,
    /// AZURE_LOCATION, AZURE_AUTHORITY_HOST) override its fields, and
    /// CRYPTDISK_AZURE_ARM_ENDPOINT the ARM endpoint. A missing file is fine when
    /// the variables say it all. Only with --backend azure.
    #[arg(
        long,
        default_value = AZURE_CONFIG_FILE,
        env = "CRYPTDISK_AZURE_CONFIG_FILE"
    )]
    azure_config_file: PathBuf,

    #[command(flatten)]
    local: LocalArgs,

    #[command(flatten)]
    gcp: GcpArgs,

    /// The node the local backend's disks live on (default: the host name).
    #[arg(long, env = "CRYPTDISK_LOCAL_NODE")]
    local_node: Option<String>,

    /// Most volumes attached to one node at a time; ControllerPublishVolume past
    /// it is RESOURCE_EXHAUSTED (0: no limit). Match the node plugins'
    /// --max-volumes.
    #[arg(long, default_value_t = 0, env = "CRYPTDISK_MAX_VOLUMES_PER_NODE")]
    max_volumes_per_node: u64,
}

#[derive(Args)]
struct GcpArgs {
    /// gcp backend: the project of the disks and VMs (default: the metadata
    /// server's project).
    #[arg(long, env = "CRYPTDISK_GCP_PROJECT")]
    gcp_project: Option<String>,

    /// gcp backend: the zone of a new disk whose request names no zone (default:
    /// the metadata server's zone, that of the VM the controller runs on).
    #[arg(long, env = "CRYPTDISK_GCP_ZONE")]
    gcp_zone: Option<String>,
}

/// The cloud a node plugin runs in, which says how it finds attached disks and
/// what it reports about itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Cloud {
    /// Local-backend volumes only; node id from --node-id or the host name.
    Local,
    /// Azure VMs: node id (the VM name), the zone topology and --max-volumes
    /// (from the VM size) from the Instance Metadata Service; data disks found
    /// by the LUN the controller publishes.
    Azure,
    /// GCE VMs: node id <zone>.<instance> and the zone topology from the
    /// metadata server, --max-volumes from the machine type.
    Gcp,
}

#[derive(Args)]
struct NodeIdArgs {
    /// This node's id as the controller knows it. Defaults to the host name; with
    /// --cloud gcp to <zone>.<instance> from the metadata server (the form the gcp
    /// controller needs to attach disks).
    #[arg(long, env = "CRYPTDISK_NODE_ID")]
    node_id: Option<String>,

    /// Most volumes this node accepts (0: no limit). Default: 0; with --cloud
    /// azure, the VM size's data-disk limit (16 for a size not in the driver's
    /// table); with --cloud gcp, the limit of the VM's machine type less the boot
    /// disk (127, or 15 on shared-core types).
    #[arg(long, env = "CRYPTDISK_MAX_VOLUMES")]
    max_volumes: Option<i64>,

    /// Format and open operations that may run at once; more wait their turn.
    #[arg(long, default_value_t = 4, env = "CRYPTDISK_MAX_PARALLEL_WORK")]
    max_parallel_work: usize,

    /// Seconds a NodeStage waits for a new integrity volume's initial wipe before
    /// answering ABORTED with its progress; the wipe goes on and a retry completes
    /// the stage. Keep it below the CO's NodeStage timeout.
    #[arg(long, default_value_t = 60, env = "CRYPTDISK_WIPE_BUDGET_SECONDS")]
    wipe_budget_seconds: u64,
}

#[derive(Args)]
struct NodeArgs {
    #[command(flatten)]
    csi: CsiArgs,

    #[command(flatten)]
    node: NodeIdArgs,

    /// The cloud this node runs in: local, azure or gcp. For azure the Instance
    /// Metadata Service's address can be replaced with
    /// CRYPTDISK_AZURE_IMDS_ENDPOINT, for gcp the metadata server's with
    /// GCE_METADATA_HOST.
    #[arg(long, value_enum, default_value = "local", env = "CRYPTDISK_CLOUD")]
    cloud: Cloud,

    /// The cluster KMS: https://HOST:PORT (mutual TLS, with the three --kms-*-file
    /// flags), tcp://HOST:PORT (plaintext, with --kms-insecure) or unix:///path.
    /// Required to serve.
    #[arg(long, env = "CRYPTDISK_KMS", required = true)]
    kms: Option<KmsAddress>,

    #[command(flatten)]
    kms_client: KmsClientArgs,

    /// Serve local-backend volumes whose images live in this directory (only on
    /// the machine that holds them).
    #[arg(long, env = "CRYPTDISK_LOCAL_DATA_DIR")]
    local_data_dir: Option<PathBuf>,
}

#[derive(Args)]
struct DevArgs {
    #[command(flatten)]
    csi: CsiArgs,

    #[command(flatten)]
    node: NodeIdArgs,

    #[command(flatten)]
    local: LocalArgs,

    /// Master secret of the embedded KMS (at least 32 random bytes, mode 0600).
    /// Default: <data-dir>/kms/master.key, generated on first start and kept.
    #[arg(long, env = "CRYPTDISK_MASTER_SECRET_FILE", requires = "salt_file")]
    master_secret_file: Option<PathBuf>,

    /// HKDF salt of the embedded KMS (at least 32 random bytes, mode 0600).
    /// Default: <data-dir>/kms/salt, generated on first start and kept.
    #[arg(long, env = "CRYPTDISK_SALT_FILE", requires = "master_secret_file")]
    salt_file: Option<PathBuf>,
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

    /// The KMS's TLS certificate (PEM), with its chain.
    #[arg(long, env = "CRYPTDISK_TLS_CERT_FILE", requires_all = ["tls_key_file", "client_ca_file"])]
    tls_cert_file: Option<PathBuf>,

    /// The private key (PEM) of --tls-cert-file.
    #[arg(long, env = "CRYPTDISK_TLS_KEY_FILE", requires_all = ["tls_cert_file", "client_ca_file"])]
    tls_key_file: Option<PathBuf>,

    /// CA certificate (PEM) that node plugins' client certificates must chain to;
    /// clients without one are refused during the TLS handshake.
    #[arg(long, env = "CRYPTDISK_CLIENT_CA_FILE", requires_all = ["tls_cert_file", "tls_key_file"])]
    client_ca_file: Option<PathBuf>,

    /// The master secret files hold ciphertext, unwrapped at start by this cloud
    /// key: azure-keyvault:https://VAULT.vault.azure.net/keys/NAME[/VERSION]
    /// (unwrapKey, RSA-OAEP-256; workload identity or managed identity) or
    /// gcp-kms:projects/P/locations/L/keyRings/R/cryptoKeys/K (decrypt; the
    /// metadata server's credentials).
    #[arg(long, env = "CRYPTDISK_MASTER_SECRET_WRAPPED_BY")]
    master_secret_wrapped_by: Option<cryptdisk_csi::kms::wrap::WrapKey>,

    /// Serve without TLS. Anyone who reaches the port can then ask for keys, so it
    /// is refused unless --listen is a unix socket or a loopback address
    /// (127.0.0.0/8, [::1]): for tests and for a KMS on a unix socket.
    #[arg(long, env = "CRYPTDISK_KMS_INSECURE", conflicts_with = "tls_cert_file")]
    insecure: bool,

    /// Serve Prometheus /metrics and /healthz over HTTP on this address
    /// (IP:PORT); off when not given.
    #[arg(long, env = "CRYPTDISK_METRICS_ADDRESS")]
    metrics_address: Option<std::net::SocketAddr>,

    /// Seconds a client has to complete the TLS handshake before it is
    /// disconnected (an idle connection otherwise holds a slot for ever).
    #[arg(
        long,
        default_value_t = 10,
        env = "CRYPTDISK_KMS_TLS_HANDSHAKE_TIMEOUT_SECONDS"
    )]
    tls_handshake_timeout_seconds: u64,

    /// Connections open at once; more wait until one closes. Lowered to what the
    /// process's file descriptor limit allows.
    #[arg(long, default_value_t = server::accept::DEFAULT_MAX_CONNECTIONS, env = "CRYPTDISK_KMS_MAX_CONNECTIONS")]
    max_connections: usize,

    /// Who may have a volume's key (GetVolumeKey): `kubernetes` (the node a
    /// VolumeAttachment of the volume's PV names, proven by a TokenReview of
    /// its bound service-account token), `local` (the volumes the local
    /// backend in --local-state has published to this machine) or `none` (no
    /// check at all: with --insecure on loopback or a unix socket, for tests).
    #[arg(
        long,
        value_enum,
        default_value = "kubernetes",
        env = "CRYPTDISK_KMS_AUTHORIZER"
    )]
    authorizer: AuthorizerKind,

    /// Kubeconfig for `--authorizer kubernetes`; default: the pod's in-cluster
    /// service account.
    #[arg(long, env = "CRYPTDISK_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,

    /// The audience node tokens must be issued for (the projected token's
    /// `audience`).
    #[arg(
        long,
        default_value = "cryptdisk-kms",
        env = "CRYPTDISK_KMS_TOKEN_AUDIENCE"
    )]
    token_audience: String,

    /// NAMESPACE/NAME of the node plugin's service account: tokens of any other
    /// account are refused.
    #[arg(
        long,
        default_value = "kube-system/cryptdisk-node",
        env = "CRYPTDISK_KMS_NODE_SERVICE_ACCOUNT"
    )]
    node_service_account: String,

    /// The CSI driver whose VolumeAttachments and PersistentVolumes grant keys.
    #[arg(
        long,
        default_value = "cryptdisk.csi.io",
        env = "CRYPTDISK_DRIVER_NAME"
    )]
    driver_name: DriverName,

    /// Seconds the authorization cache may go without hearing from the API
    /// server before every GetVolumeKey is answered UNAVAILABLE (fail closed).
    #[arg(
        long,
        default_value_t = 30,
        env = "CRYPTDISK_KMS_AUTHORIZATION_MAX_STALENESS"
    )]
    authorization_max_staleness: u64,

    /// Serve v1 keys (Constellation's derivation, bound to no volume):
    /// GetDataKey and GetVersionedDataKey, and GetVolumeKey with
    /// DERIVATION_V1. Off by default; for volumes formatted before v2 keys,
    /// until their next read-write stage moves them to v2.
    #[arg(long, env = "CRYPTDISK_KMS_ALLOW_V1_KEYS")]
    allow_v1_keys: bool,

    /// For `--authorizer local`: the local backend's state directory.
    #[arg(long, env = "CRYPTDISK_KMS_LOCAL_STATE")]
    local_state: Option<PathBuf>,
}

/// `--authorizer`: who decides which node may have which volume's key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum AuthorizerKind {
    Kubernetes,
    Local,
    None,
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

/// Where cloud-provider-azure's config file sits on AKS nodes (the same as
/// `backend::azure::config::DEFAULT_CONFIG_FILE`, which builds without the
/// `azure` feature do not have).
const AZURE_CONFIG_FILE: &str = "/etc/kubernetes/azure.json";

/// The error of a build that left out a cloud backend.
#[cfg_attr(all(feature = "azure", feature = "gcp"), allow(dead_code))]
fn not_built(flag: &str, feature: &str) -> Box<dyn std::error::Error> {
    format!(
        "{flag} {feature}: this build has no {feature} support (built without the Cargo \
         feature `{feature}`; the release image has every backend)"
    )
    .into()
}

async fn run(command: Command) -> Result<(), Box<dyn std::error::Error>> {
    match command {
        Command::Controller(args) => {
            let controller = match args.backend.as_str() {
                "azure" => azure_controller(&args.azure_config_file, &args.csi.driver_name)?,
                "gcp" => gcp_controller(&args.gcp, args.csi.driver_name.as_str()).await?,
                other => controller_service(other, &args.local, args.local_node)?,
            }
            .with_attach_limit(args.max_volumes_per_node);
            serve_csi(args.csi, Some(controller), None).await
        }
        Command::Node(NodeCommand {
            action: Some(NodeAction::Status(args)),
            ..
        }) => node_status(args),
        Command::Node(NodeCommand { serve: args, .. }) => {
            cryptdisk_csi::privileges::not_dumpable()?;
            cryptdisk_csi::privileges::check_node()?;
            let kms = args.kms.as_ref().ok_or("--kms is required to serve")?;
            let keys = Arc::new(args.kms_client.key_source(kms)?);
            let (node_args, topology) = node_identity(args.cloud, args.node).await?;
            let node = node_service(node_args, args.local_data_dir, topology, keys)?;
            serve_csi(args.csi, None, Some(node)).await
        }
        Command::Dev(args) => {
            cryptdisk_csi::privileges::not_dumpable()?;
            cryptdisk_csi::privileges::check_node()?;
            let node_id = resolve_node_id(args.node.node_id.clone())?;
            let master = match (&args.master_secret_file, &args.salt_file) {
                (Some(secret), Some(salt)) => MasterSecret::from_files(secret, salt)?,
                _ => MasterSecret::load_or_generate(&args.local.data_dir.join("kms"))?,
            };
            // The embedded KMS serves exactly the volumes the local backend has
            // published to this node, as the cluster KMS does.
            let authorizer = Arc::new(LocalAuthorizer::new(args.local.data_dir.clone()));
            let keys = Arc::new(LocalKeySource::new(master, "embedded", authorizer));
            let controller = controller_service("local", &args.local, Some(node_id.clone()))?
                .with_attach_limit(u64::try_from(args.node.max_volumes.unwrap_or(0)).unwrap_or(0));
            let node_args = NodeIdArgs {
                node_id: Some(node_id),
                ..args.node
            };
            let node = node_service(
                node_args,
                Some(args.local.data_dir.clone()),
                BTreeMap::new(),
                keys,
            )?;
            serve_csi(args.csi, Some(controller), Some(node)).await
        }
        Command::Kms(args) => {
            cryptdisk_csi::privileges::not_dumpable()?;
            serve_kms(args).await
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
        Command::Recover(args) => recover(args).await,
        Command::Verify(args) => {
            let keys = args.tls.key_source(&args.kms)?;
            for line in ops::verify_with(&keys, &args.device, &args.volume_id).await? {
                println!("{line}");
            }
            Ok(())
        }
    }
}

fn node_status(args: NodeStatusArgs) -> Result<(), Box<dyn std::error::Error>> {
    let status = ops::status::status(&ops::status::Roots {
        sys: args.sys_root,
        dev: args.dev_root,
        mountinfo: args.mountinfo,
        staging: Some(args.staging_root),
        local_data_dir: args.local_data_dir,
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", status.human());
    }
    Ok(status.outcome()?)
}

async fn recover(args: RecoverArgs) -> Result<(), Box<dyn std::error::Error>> {
    // Checked before any key is derived, so a typo costs nothing.
    MapperName::operator(&args.name).map_err(|e| format!("--name: {e}"))?;
    if let Some(name) = &args.open {
        MapperName::operator(name).map_err(|e| format!("--open: {e}"))?;
    }
    let master = load_master(
        &args.master_secret_file,
        &args.salt_file,
        args.master_secret_wrapped_by.as_ref(),
    )
    .await?;
    let found = ops::recover::find_key(&args.device, &master, args.scope.as_deref()).await?;
    for line in &found.lines {
        println!("{line}");
    }
    println!(
        "recovered the key of master-secret version {} (keyslot {})",
        found.version, found.keyslot
    );
    if let Some(path) = &args.key_file {
        ops::recover::write_key_file(path, &found.key)?;
        println!(
            "wrote the key to {} (mode 0600); open the volume with:",
            path.display()
        );
        println!(
            "{}",
            ops::recover::open_command(path, &args.device, &args.name, args.readonly)
        );
    }
    if let Some(name) = &args.open {
        ops::recover::open(&args.device, name, &found.key, args.readonly).await?;
        println!("opened /dev/mapper/{name}");
    }
    if args.show_key {
        println!("key (hex): {}", found.key_hex().as_str());
    }
    Ok(())
}

/// The master secret files, unwrapped first when `wrapped_by` names a cloud key.
async fn load_master(
    secret: &std::path::Path,
    salt: &std::path::Path,
    wrapped_by: Option<&cryptdisk_csi::kms::wrap::WrapKey>,
) -> Result<MasterSecret, Box<dyn std::error::Error>> {
    match wrapped_by {
        None => Ok(MasterSecret::from_files(secret, salt)?),
        Some(key) => {
            let config = cryptdisk_csi::kms::wrap::WrapConfig::from_env();
            let master = MasterSecret::from_wrapped_files(secret, salt, |wrapped| {
                let config = config.clone();
                async move { cryptdisk_csi::kms::wrap::unwrap(key, &wrapped, &config).await }
            })
            .await?;
            tracing::info!(%key, versions = master.current_version(), "unwrapped the master secret");
            Ok(master)
        }
    }
}

fn controller_service(
    backend: &str,
    local: &LocalArgs,
    local_node: Option<String>,
) -> Result<ControllerService, Box<dyn std::error::Error>> {
    match backend {
        "local" => {
            let node = resolve_node_id(local_node)?;
            let backend = LocalBackend::open(&local.data_dir, &node, local.capacity_bytes)?;
            Ok(ControllerService::new(Arc::new(backend), Some(vec![node])))
        }
        other => Err(format!("--backend {other:?}: expected local, azure or gcp").into()),
    }
}

#[cfg(not(feature = "gcp"))]
async fn gcp_controller(
    _args: &GcpArgs,
    _driver_name: &str,
) -> Result<ControllerService, Box<dyn std::error::Error>> {
    Err(not_built("--backend", "gcp"))
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

/// The node's id, topology and attach limit for its cloud.
async fn node_identity(
    cloud: Cloud,
    args: NodeIdArgs,
) -> Result<(NodeIdArgs, BTreeMap<String, String>), Box<dyn std::error::Error>> {
    match cloud {
        Cloud::Local => Ok((args, BTreeMap::new())),
        Cloud::Azure => azure_node_identity(args).await,
        Cloud::Gcp => gcp_node_identity(args).await,
    }
}

type NodeFacts = (NodeIdArgs, BTreeMap<String, String>);

#[cfg(not(feature = "azure"))]
async fn azure_node_identity(_args: NodeIdArgs) -> Result<NodeFacts, Box<dyn std::error::Error>> {
    Err(not_built("--cloud", "azure"))
}

/// Node id, zone and attach limit of an Azure VM, from IMDS.
#[cfg(feature = "azure")]
async fn azure_node_identity(args: NodeIdArgs) -> Result<NodeFacts, Box<dyn std::error::Error>> {
    let imds = azure::config::imds_endpoint(|k| std::env::var(k).ok());
    let facts = azure::imds::node_facts(&imds, args.node_id.clone(), args.max_volumes)
        .await
        .map_err(|e| format!("--cloud azure: {e}"))?;
    cryptdisk_csi::csi::validate::node_id("node id", &facts.node_id)
        .map_err(|e| format!("--cloud azure: {}", e.message()))?;
    let topology = facts.topology();
    Ok((
        NodeIdArgs {
            node_id: Some(facts.node_id),
            max_volumes: Some(facts.max_volumes),
            ..args
        },
        topology,
    ))
}

#[cfg(not(feature = "gcp"))]
async fn gcp_node_identity(_args: NodeIdArgs) -> Result<NodeFacts, Box<dyn std::error::Error>> {
    Err(not_built("--cloud", "gcp"))
}

/// Node id (`<zone>.<instance>`), zone and attach limit of a GCE VM, from the
/// metadata server.
#[cfg(feature = "gcp")]
async fn gcp_node_identity(args: NodeIdArgs) -> Result<NodeFacts, Box<dyn std::error::Error>> {
    let metadata = gcp::metadata::Metadata::from_env()?;
    let node = match args.node_id.as_deref() {
        Some(id) => gcp::NodeName::parse(id).ok_or_else(|| {
            format!(
                "--node-id {id:?}: with --cloud gcp a node id is <zone>.<instance>, \
                 which the controller needs to attach disks"
            )
        })?,
        None => gcp::NodeName {
            zone: metadata.zone().await?,
            instance: metadata.instance_name().await?,
        },
    };
    let node_id = node.to_string();
    cryptdisk_csi::csi::validate::node_id("node id", &node_id)
        .map_err(|e| e.message().to_string())?;
    let max_volumes = match args.max_volumes {
        Some(m) => m,
        None => {
            let machine_type = metadata.machine_type().await?;
            let max = gcp::node::max_volumes_for(&machine_type);
            tracing::info!(%machine_type, max_volumes = max, "attach limit");
            max
        }
    };
    let topology = BTreeMap::from([(gcp::TOPOLOGY_ZONE.to_string(), node.zone.clone())]);
    Ok((
        NodeIdArgs {
            node_id: Some(node_id),
            max_volumes: Some(max_volumes),
            ..args
        },
        topology,
    ))
}

#[cfg(not(feature = "azure"))]
fn azure_controller(
    _config_file: &std::path::Path,
    _driver: &DriverName,
) -> Result<ControllerService, Box<dyn std::error::Error>> {
    Err(not_built("--backend", "azure"))
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

fn node_service(
    args: NodeIdArgs,
    local_data_dir: Option<PathBuf>,
    mut topology: BTreeMap<String, String>,
    keys: Arc<dyn KeySource>,
) -> Result<NodeService, Box<dyn std::error::Error>> {
    let node_id = resolve_node_id(args.node_id)?;
    if local_data_dir.is_some() {
        topology.insert(TOPOLOGY_NODE.to_string(), node_id.clone());
    }
    tracing::info!(%node_id, "node plugin");
    Ok(NodeService::new(
        NodeConfig {
            node_id,
            local_data_dir,
            topology,
            max_volumes: args.max_volumes.unwrap_or(0),
            max_parallel_work: args.max_parallel_work,
            wipe_budget: std::time::Duration::from_secs(args.wipe_budget_seconds),
        },
        keys,
    ))
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
fn local_authorizer(
    state: &std::path::Path,
) -> Result<Arc<dyn Authorizer>, Box<dyn std::error::Error>> {
    Ok(Arc::new(
        cryptdisk_csi::kms::local_authz::LocalAuthorizer::new(state),
    ))
}

#[cfg(feature = "kubernetes")]
async fn kube_authorizer(
    args: &KmsArgs,
) -> Result<Arc<dyn Authorizer>, Box<dyn std::error::Error>> {
    use cryptdisk_csi::kms::kube;
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

async fn serve_kms(args: KmsArgs) -> Result<(), Box<dyn std::error::Error>> {
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
        cryptdisk_csi::metrics::serve(addr).await?;
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
            .max_decoding_message_size(cryptdisk_csi::kms::server::MAX_REQUEST_SIZE);
    let router = builder.add_service(service);
    let limits = server::Limits {
        max_connections: args.max_connections,
    };
    server::serve(router, &args.listen, limits, server::shutdown_signal()).await?;
    Ok(())
}
