//! The command line: one subcommand per process of the system, and the flags
//! (each also read from the environment variable its help names) that the
//! chart, hack/ and the tests pass. Parsing only; `main.rs` wires the parts.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{DriverName, Endpoint};
use crate::kms::authz::AuthorizerKind;
use crate::kms::client::{GrpcKeySource, KmsAddress};
use crate::kms::tls::TlsFiles;
use crate::logging::LogFormat;
use crate::server;
use crate::volume::BackendKind;

/// Where cloud-provider-azure's config file sits on AKS nodes (the same as
/// `backend::azure::config::DEFAULT_CONFIG_FILE`, which builds without the
/// `azure` feature do not have).
pub const AZURE_CONFIG_FILE: &str = "/etc/kubernetes/azure.json";

/// A Kubernetes CSI driver that encrypts every volume it serves with dm-crypt
/// (LUKS2), using per-volume keys derived by a cluster KMS.
///
/// Every flag can also be set through the environment variable named in its help.
#[derive(Parser)]
#[command(name = "cryptdisk-csi", version, propagate_version = true)]
pub struct Cli {
    /// Log output format.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "CRYPTDISK_LOG_FORMAT"
    )]
    pub log_format: LogFormat,

    /// Log level (error, warn, info, debug, trace) or tracing directives such as
    /// "info,crate::crypt=debug".
    #[arg(
        long,
        global = true,
        default_value = "info",
        env = "CRYPTDISK_LOG_LEVEL"
    )]
    pub log_level: String,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
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
pub struct NodeCommand {
    #[command(subcommand)]
    pub action: Option<NodeAction>,

    #[command(flatten)]
    pub serve: NodeArgs,
}

#[derive(Subcommand)]
pub enum NodeAction {
    /// The mappings (/dev/mapper/cryptdisk-*), mounts and loop devices this
    /// node's driver owns, and what is stale: a mapping whose device is gone, a
    /// loop device over a deleted image, a staging path without a mapping. Exit
    /// 0: nothing stale; 6: stale items (listed); 1: cannot read the system.
    Status(NodeStatusArgs),
}

#[derive(Args)]
pub struct NodeStatusArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,

    /// The kubelet's staging directory of this driver, holding
    /// <volume>/globalmount per staged volume.
    #[arg(
        long,
        default_value = "/var/lib/kubelet/plugins/kubernetes.io/csi/cryptdisk.csi.io",
        env = "CRYPTDISK_STAGING_ROOT"
    )]
    pub staging_root: PathBuf,

    /// The local backend's data directory, whose disk images this node attaches
    /// as loop devices.
    #[arg(long, env = "CRYPTDISK_LOCAL_DATA_DIR")]
    pub local_data_dir: Option<PathBuf>,

    /// Where sysfs is mounted (tests point it at a fake tree).
    #[arg(long, default_value = "/sys", hide = true)]
    pub sys_root: PathBuf,

    /// Where /dev is (tests point it at a fake tree).
    #[arg(long, default_value = "/dev", hide = true)]
    pub dev_root: PathBuf,

    /// The mount table to read (tests point it at a file).
    #[arg(long, default_value = "/proc/self/mountinfo", hide = true)]
    pub mountinfo: PathBuf,
}

#[derive(Args)]
pub struct InspectArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,

    /// The block device or image file.
    pub device: PathBuf,
}

#[derive(Args)]
pub struct RecoverArgs {
    /// The master secret file (version 1); versions N >= 2 are read from
    /// <file>-vN beside it. Mode 0600 or 0400.
    #[arg(long, env = "CRYPTDISK_MASTER_SECRET_FILE")]
    pub master_secret_file: PathBuf,

    /// The HKDF salt file the KMS was started with.
    #[arg(long, env = "CRYPTDISK_SALT_FILE")]
    pub salt_file: PathBuf,

    /// The master secret files hold ciphertext that this cloud key unwraps (as
    /// the KMS's --master-secret-wrapped-by).
    #[arg(long, env = "CRYPTDISK_MASTER_SECRET_WRAPPED_BY")]
    pub master_secret_wrapped_by: Option<crate::kms::wrap::WrapKey>,

    /// Write the key to this new file (mode 0600; an existing file is never
    /// overwritten) and print the cryptsetup command line that opens the volume
    /// with it.
    #[arg(long)]
    pub key_file: Option<PathBuf>,

    /// The mapping name in the printed cryptsetup command line.
    #[arg(long, default_value = "cryptdisk-recovered")]
    pub name: String,

    /// Open the volume as /dev/mapper/NAME (needs device-mapper and root).
    #[arg(long, value_name = "NAME")]
    pub open: Option<String>,

    /// Open read-only (with --open), or print --readonly in the command line.
    #[arg(long)]
    pub readonly: bool,

    /// Print the key as hex on standard output. Anyone who sees it can read the
    /// volume.
    #[arg(long)]
    pub show_key: bool,

    /// The volume's key scope, needed for a volume with v2 keys (its token says
    /// "derivation": "v2"): the PersistentVolume's volumeAttributes
    /// cryptdisk.csi.io/key-scope, or its volume handle when that is absent.
    #[arg(long)]
    pub scope: Option<String>,

    /// The block device or image file.
    pub device: PathBuf,
}

#[derive(Args)]
pub struct VerifyArgs {
    /// The KMS: https://HOST:PORT (mutual TLS, with the three --kms-*-file
    /// flags), tcp://HOST:PORT (plaintext, with --kms-insecure) or unix:///path.
    #[arg(long, env = "CRYPTDISK_KMS")]
    pub kms: KmsAddress,

    #[command(flatten)]
    pub tls: KmsClientArgs,

    /// The CSI volume id (the PersistentVolume's volume handle) the device
    /// holds: the KMS serves a volume's key only for that volume, and only to
    /// the node it is attached to.
    #[arg(long)]
    pub volume_id: String,

    /// The block device or image file.
    pub device: PathBuf,
}

/// How a client authenticates to the KMS.
#[derive(Args)]
pub struct KmsClientArgs {
    /// CA certificate (PEM) the KMS's certificate must chain to.
    #[arg(long, env = "CRYPTDISK_KMS_CA_FILE", requires_all = ["kms_cert_file", "kms_key_file"])]
    pub kms_ca_file: Option<PathBuf>,

    /// This node's client certificate (PEM) for the KMS.
    #[arg(long, env = "CRYPTDISK_KMS_CERT_FILE", requires_all = ["kms_ca_file", "kms_key_file"])]
    pub kms_cert_file: Option<PathBuf>,

    /// The private key (PEM) of --kms-cert-file.
    #[arg(long, env = "CRYPTDISK_KMS_KEY_FILE", requires_all = ["kms_ca_file", "kms_cert_file"])]
    pub kms_key_file: Option<PathBuf>,

    /// Talk to a tcp:// KMS in plaintext: only for tests.
    #[arg(long, env = "CRYPTDISK_KMS_INSECURE")]
    pub kms_insecure: bool,

    /// The node's projected ServiceAccount token (audience: the KMS), sent as
    /// `authorization: Bearer` with every key request and read again each time,
    /// as the kubelet rotates it. Without it no token is sent.
    #[arg(long, env = "CRYPTDISK_KMS_TOKEN_FILE")]
    pub kms_token_file: Option<PathBuf>,
}

impl KmsClientArgs {
    pub fn key_source(
        &self,
        kms: &KmsAddress,
    ) -> Result<GrpcKeySource, Box<dyn std::error::Error>> {
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
pub struct AddKeyVersionArgs {
    /// The master secret file (version 1) the KMS is started with.
    #[arg(long, env = "CRYPTDISK_MASTER_SECRET_FILE")]
    pub master_secret_file: PathBuf,
}

#[derive(Args)]
pub struct CsiArgs {
    /// Where to serve CSI: unix:///path/to/csi.sock (kubelet and the sidecars), or
    /// tcp://IP:PORT for tests.
    #[arg(
        long,
        default_value = "unix:///csi/csi.sock",
        env = "CRYPTDISK_ENDPOINT"
    )]
    pub endpoint: Endpoint,

    /// The CSI driver name that StorageClasses name as their provisioner.
    #[arg(
        long,
        default_value = "cryptdisk.csi.io",
        env = "CRYPTDISK_DRIVER_NAME"
    )]
    pub driver_name: DriverName,

    /// Serve Prometheus /metrics and /healthz over HTTP on this address
    /// (IP:PORT); off when not given.
    #[arg(long, env = "CRYPTDISK_METRICS_ADDRESS")]
    pub metrics_address: Option<std::net::SocketAddr>,
}

#[derive(Args)]
pub struct LocalArgs {
    /// Directory of the local backend: disk images, snapshots and their index.
    #[arg(long, default_value = "/var/lib/cryptdisk", env = "CRYPTDISK_DATA_DIR")]
    pub data_dir: PathBuf,

    /// Most bytes the local backend's disks and snapshots may take together
    /// (default: the free space of the data directory's filesystem).
    #[arg(long, env = "CRYPTDISK_CAPACITY_BYTES")]
    pub capacity_bytes: Option<u64>,
}

#[derive(Args)]
pub struct ControllerArgs {
    #[command(flatten)]
    pub csi: CsiArgs,

    /// The disk backend: local (sparse image files on this machine), azure
    /// (Azure managed disks through Azure Resource Manager) or gcp (Compute
    /// Engine persistent disks; credentials from Application Default
    /// Credentials: the metadata server, or GOOGLE_APPLICATION_CREDENTIALS naming a
    /// service-account key or an external-account file; the Compute endpoint can
    /// be replaced with CRYPTDISK_GCP_COMPUTE_ENDPOINT).
    #[arg(long, value_enum, default_value = "local", env = "CRYPTDISK_BACKEND")]
    pub backend: BackendKind,

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
    pub azure_config_file: PathBuf,

    #[command(flatten)]
    pub local: LocalArgs,

    #[command(flatten)]
    pub gcp: GcpArgs,

    /// The node the local backend's disks live on (default: the host name).
    #[arg(long, env = "CRYPTDISK_LOCAL_NODE")]
    pub local_node: Option<String>,

    /// Most volumes attached to one node at a time; ControllerPublishVolume past
    /// it is RESOURCE_EXHAUSTED (0: no limit). Match the node plugins'
    /// --max-volumes.
    #[arg(long, default_value_t = 0, env = "CRYPTDISK_MAX_VOLUMES_PER_NODE")]
    pub max_volumes_per_node: u64,
}

#[derive(Args)]
pub struct GcpArgs {
    /// gcp backend: the project of the disks and VMs (default: the metadata
    /// server's project).
    #[arg(long, env = "CRYPTDISK_GCP_PROJECT")]
    pub gcp_project: Option<String>,

    /// gcp backend: the zone of a new disk whose request names no zone (default:
    /// the metadata server's zone, that of the VM the controller runs on).
    #[arg(long, env = "CRYPTDISK_GCP_ZONE")]
    pub gcp_zone: Option<String>,
}

#[derive(Args)]
pub struct NodeIdArgs {
    /// This node's id as the controller knows it. Defaults to the host name; with
    /// --cloud gcp to <zone>.<instance> from the metadata server (the form the gcp
    /// controller needs to attach disks).
    #[arg(long, env = "CRYPTDISK_NODE_ID")]
    pub node_id: Option<String>,

    /// Most volumes this node accepts (0: no limit). Default: 0; with --cloud
    /// azure, the VM size's data-disk limit (16 for a size not in the driver's
    /// table); with --cloud gcp, the limit of the VM's machine type less the boot
    /// disk (127, or 15 on shared-core types).
    #[arg(long, env = "CRYPTDISK_MAX_VOLUMES")]
    pub max_volumes: Option<u64>,

    /// Format and open operations that may run at once; more wait their turn.
    #[arg(long, default_value_t = 4, env = "CRYPTDISK_MAX_PARALLEL_WORK")]
    pub max_parallel_work: usize,

    /// Seconds a NodeStage waits for a new integrity volume's initial wipe before
    /// answering ABORTED with its progress; the wipe goes on and a retry completes
    /// the stage. Keep it below the CO's NodeStage timeout.
    #[arg(long, default_value_t = 60, env = "CRYPTDISK_WIPE_BUDGET_SECONDS")]
    pub wipe_budget_seconds: u64,
}

#[derive(Args)]
pub struct NodeArgs {
    #[command(flatten)]
    pub csi: CsiArgs,

    #[command(flatten)]
    pub node: NodeIdArgs,

    /// The cloud this node runs in, which says how it finds attached disks and
    /// what it reports about itself: local (local-backend volumes only; node id
    /// from --node-id or the host name), azure (node id, zone and --max-volumes
    /// from the Instance Metadata Service, whose address can be replaced with
    /// CRYPTDISK_AZURE_IMDS_ENDPOINT) or gcp (node id <zone>.<instance>, zone and
    /// --max-volumes from the metadata server, whose address can be replaced
    /// with GCE_METADATA_HOST).
    #[arg(long, value_enum, default_value = "local", env = "CRYPTDISK_CLOUD")]
    pub cloud: BackendKind,

    /// The cluster KMS: https://HOST:PORT (mutual TLS, with the three --kms-*-file
    /// flags), tcp://HOST:PORT (plaintext, with --kms-insecure) or unix:///path.
    /// Required to serve.
    #[arg(long, env = "CRYPTDISK_KMS", required = true)]
    pub kms: Option<KmsAddress>,

    #[command(flatten)]
    pub kms_client: KmsClientArgs,

    /// Serve local-backend volumes whose images live in this directory (only on
    /// the machine that holds them).
    #[arg(long, env = "CRYPTDISK_LOCAL_DATA_DIR")]
    pub local_data_dir: Option<PathBuf>,
}

#[derive(Args)]
pub struct DevArgs {
    #[command(flatten)]
    pub csi: CsiArgs,

    #[command(flatten)]
    pub node: NodeIdArgs,

    #[command(flatten)]
    pub local: LocalArgs,

    /// Master secret of the embedded KMS (at least 32 random bytes, mode 0600).
    /// Default: <data-dir>/kms/master.key, generated on first start and kept.
    #[arg(long, env = "CRYPTDISK_MASTER_SECRET_FILE", requires = "salt_file")]
    pub master_secret_file: Option<PathBuf>,

    /// HKDF salt of the embedded KMS (at least 32 random bytes, mode 0600).
    /// Default: <data-dir>/kms/salt, generated on first start and kept.
    #[arg(long, env = "CRYPTDISK_SALT_FILE", requires = "master_secret_file")]
    pub salt_file: Option<PathBuf>,
}

#[derive(Args)]
pub struct KmsArgs {
    /// Where to serve the KMS API: tcp://IP:PORT or unix:///path.
    #[arg(
        long,
        default_value = "tcp://0.0.0.0:9000",
        env = "CRYPTDISK_KMS_LISTEN"
    )]
    pub listen: Endpoint,

    /// File holding the master secret (at least 32 random bytes), readable by its
    /// owner only.
    #[arg(long, env = "CRYPTDISK_MASTER_SECRET_FILE")]
    pub master_secret_file: PathBuf,

    /// File holding the HKDF salt (at least 32 random bytes), readable by its owner only.
    #[arg(long, env = "CRYPTDISK_SALT_FILE")]
    pub salt_file: PathBuf,

    /// The KMS's TLS certificate (PEM), with its chain.
    #[arg(long, env = "CRYPTDISK_TLS_CERT_FILE", requires_all = ["tls_key_file", "client_ca_file"])]
    pub tls_cert_file: Option<PathBuf>,

    /// The private key (PEM) of --tls-cert-file.
    #[arg(long, env = "CRYPTDISK_TLS_KEY_FILE", requires_all = ["tls_cert_file", "client_ca_file"])]
    pub tls_key_file: Option<PathBuf>,

    /// CA certificate (PEM) that node plugins' client certificates must chain to;
    /// clients without one are refused during the TLS handshake.
    #[arg(long, env = "CRYPTDISK_CLIENT_CA_FILE", requires_all = ["tls_cert_file", "tls_key_file"])]
    pub client_ca_file: Option<PathBuf>,

    /// The master secret files hold ciphertext, unwrapped at start by this cloud
    /// key: azure-keyvault:https://VAULT.vault.azure.net/keys/NAME[/VERSION]
    /// (unwrapKey, RSA-OAEP-256; workload identity or managed identity) or
    /// gcp-kms:projects/P/locations/L/keyRings/R/cryptoKeys/K (decrypt; the
    /// metadata server's credentials).
    #[arg(long, env = "CRYPTDISK_MASTER_SECRET_WRAPPED_BY")]
    pub master_secret_wrapped_by: Option<crate::kms::wrap::WrapKey>,

    /// Serve without TLS. Anyone who reaches the port can then ask for keys, so it
    /// is refused unless --listen is a unix socket or a loopback address
    /// (127.0.0.0/8, [::1]): for tests and for a KMS on a unix socket.
    #[arg(long, env = "CRYPTDISK_KMS_INSECURE", conflicts_with = "tls_cert_file")]
    pub insecure: bool,

    /// Serve Prometheus /metrics and /healthz over HTTP on this address
    /// (IP:PORT); off when not given.
    #[arg(long, env = "CRYPTDISK_METRICS_ADDRESS")]
    pub metrics_address: Option<std::net::SocketAddr>,

    /// Seconds a client has to complete the TLS handshake before it is
    /// disconnected (an idle connection otherwise holds a slot for ever).
    #[arg(
        long,
        default_value_t = 10,
        env = "CRYPTDISK_KMS_TLS_HANDSHAKE_TIMEOUT_SECONDS"
    )]
    pub tls_handshake_timeout_seconds: u64,

    /// Connections open at once; more wait until one closes. Lowered to what the
    /// process's file descriptor limit allows.
    #[arg(long, default_value_t = server::accept::DEFAULT_MAX_CONNECTIONS, env = "CRYPTDISK_KMS_MAX_CONNECTIONS")]
    pub max_connections: usize,

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
    pub authorizer: AuthorizerKind,

    /// Kubeconfig for `--authorizer kubernetes`; default: the pod's in-cluster
    /// service account.
    #[arg(long, env = "CRYPTDISK_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// The audience node tokens must be issued for (the projected token's
    /// `audience`).
    #[arg(
        long,
        default_value = "cryptdisk-kms",
        env = "CRYPTDISK_KMS_TOKEN_AUDIENCE"
    )]
    pub token_audience: String,

    /// NAMESPACE/NAME of the node plugin's service account: tokens of any other
    /// account are refused.
    #[arg(
        long,
        default_value = "kube-system/cryptdisk-node",
        env = "CRYPTDISK_KMS_NODE_SERVICE_ACCOUNT"
    )]
    pub node_service_account: String,

    /// The CSI driver whose VolumeAttachments and PersistentVolumes grant keys.
    #[arg(
        long,
        default_value = "cryptdisk.csi.io",
        env = "CRYPTDISK_DRIVER_NAME"
    )]
    pub driver_name: DriverName,

    /// Seconds the authorization cache may go without hearing from the API
    /// server before every GetVolumeKey is answered UNAVAILABLE (fail closed).
    #[arg(
        long,
        default_value_t = 30,
        env = "CRYPTDISK_KMS_AUTHORIZATION_MAX_STALENESS"
    )]
    pub authorization_max_staleness: u64,

    /// Serve v1 keys (Constellation's derivation, bound to no volume):
    /// GetDataKey and GetVersionedDataKey, and GetVolumeKey with
    /// DERIVATION_V1. Off by default; for volumes formatted before v2 keys,
    /// until their next read-write stage moves them to v2.
    #[arg(long, env = "CRYPTDISK_KMS_ALLOW_V1_KEYS")]
    pub allow_v1_keys: bool,

    /// For `--authorizer local`: the local backend's state directory.
    #[arg(long, env = "CRYPTDISK_KMS_LOCAL_STATE")]
    pub local_state: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use clap::error::ErrorKind;

    use super::*;

    /// clap reads the environment while parsing: tests that set a variable
    /// hold this so that no other parse sees it.
    static ENV: Mutex<()> = Mutex::new(());

    fn parse(args: &[&str]) -> Result<Command, clap::Error> {
        Cli::try_parse_from(std::iter::once("cryptdisk-csi").chain(args.iter().copied()))
            .map(|cli| cli.command)
    }

    fn parse_ok(args: &[&str]) -> Command {
        let _held = ENV.lock().unwrap_or_else(|e| e.into_inner());
        parse(args).unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    fn parse_err(args: &[&str]) -> ErrorKind {
        let _held = ENV.lock().unwrap_or_else(|e| e.into_inner());
        match parse(args) {
            Ok(_) => panic!("{args:?} parsed"),
            Err(e) => e.kind(),
        }
    }

    /// Parses with `vars` set in the environment, then removes them.
    fn parse_with_env(vars: &[(&str, &str)], args: &[&str]) -> Command {
        let _held = ENV.lock().unwrap_or_else(|e| e.into_inner());
        for (k, v) in vars {
            // SAFETY: every parse in these tests holds ENV, and nothing else
            // in the test binary reads these variables.
            unsafe { std::env::set_var(k, v) };
        }
        let got = parse(args);
        for (k, _) in vars {
            // SAFETY: as above.
            unsafe { std::env::remove_var(k) };
        }
        got.unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    #[test]
    fn controller_defaults() {
        let Command::Controller(c) = parse_ok(&["controller"]) else {
            panic!("not controller")
        };
        assert_eq!(c.backend, BackendKind::Local);
        assert_eq!(c.csi.endpoint.to_string(), "unix:///csi/csi.sock");
        assert_eq!(c.csi.driver_name.to_string(), "cryptdisk.csi.io");
        assert_eq!(c.csi.metrics_address, None);
        assert_eq!(c.azure_config_file, PathBuf::from(AZURE_CONFIG_FILE));
        assert_eq!(c.local.data_dir, PathBuf::from("/var/lib/cryptdisk"));
        assert_eq!(c.local.capacity_bytes, None);
        assert_eq!(c.max_volumes_per_node, 0);
        assert_eq!((c.gcp.gcp_project, c.gcp.gcp_zone), (None, None));
    }

    #[test]
    fn backend_and_cloud_are_one_choice() {
        for (name, kind) in [
            ("local", BackendKind::Local),
            ("azure", BackendKind::Azure),
            ("gcp", BackendKind::Gcp),
        ] {
            let Command::Controller(c) = parse_ok(&["controller", "--backend", name]) else {
                panic!("not controller")
            };
            assert_eq!(c.backend, kind);
            let Command::Node(n) = parse_ok(&["node", "--kms=unix:///k.sock", "--cloud", name])
            else {
                panic!("not node")
            };
            assert_eq!(n.serve.cloud, kind);
        }
        assert_eq!(
            parse_err(&["controller", "--backend", "aws"]),
            ErrorKind::InvalidValue
        );
        assert_eq!(
            parse_err(&["node", "--kms=unix:///k.sock", "--cloud", "aws"]),
            ErrorKind::InvalidValue
        );
    }

    #[test]
    fn environment_variables_set_flags() {
        let Command::Controller(c) = parse_with_env(
            &[
                ("CRYPTDISK_BACKEND", "gcp"),
                ("CRYPTDISK_GCP_ZONE", "europe-west1-b"),
                ("CRYPTDISK_MAX_VOLUMES_PER_NODE", "12"),
                ("CRYPTDISK_ENDPOINT", "tcp://127.0.0.1:10000"),
            ],
            &["controller"],
        ) else {
            panic!("not controller")
        };
        assert_eq!(c.backend, BackendKind::Gcp);
        assert_eq!(c.gcp.gcp_zone.as_deref(), Some("europe-west1-b"));
        assert_eq!(c.max_volumes_per_node, 12);
        assert_eq!(c.csi.endpoint.to_string(), "tcp://127.0.0.1:10000");

        let Command::Node(n) = parse_with_env(
            &[
                ("CRYPTDISK_KMS", "unix:///run/kms.sock"),
                ("CRYPTDISK_CLOUD", "azure"),
                ("CRYPTDISK_MAX_VOLUMES", "5"),
                ("CRYPTDISK_NODE_ID", "vm-1"),
            ],
            &["node"],
        ) else {
            panic!("not node")
        };
        assert_eq!(n.serve.cloud, BackendKind::Azure);
        assert_eq!(n.serve.node.max_volumes, Some(5));
        assert_eq!(n.serve.node.node_id.as_deref(), Some("vm-1"));
        assert_eq!(
            n.serve.kms.map(|k| k.to_string()).as_deref(),
            Some("unix:///run/kms.sock")
        );
    }

    #[test]
    fn node_needs_a_kms_to_serve_but_not_for_status() {
        assert_eq!(parse_err(&["node"]), ErrorKind::MissingRequiredArgument);
        let Command::Node(n) = parse_ok(&["node", "--kms=unix:///k.sock"]) else {
            panic!("not node")
        };
        assert!(n.action.is_none());
        assert_eq!(n.serve.cloud, BackendKind::Local);
        assert_eq!(n.serve.node.node_id, None);
        assert_eq!(n.serve.node.max_volumes, None);
        assert_eq!(n.serve.node.max_parallel_work, 4);
        assert_eq!(n.serve.node.wipe_budget_seconds, 60);
        assert_eq!(n.serve.local_data_dir, None);

        let Command::Node(n) = parse_ok(&["node", "status", "--json"]) else {
            panic!("not node")
        };
        let Some(NodeAction::Status(s)) = n.action else {
            panic!("not status")
        };
        assert!(s.json);
        assert_eq!(
            s.staging_root,
            PathBuf::from("/var/lib/kubelet/plugins/kubernetes.io/csi/cryptdisk.csi.io")
        );
        assert_eq!(
            (s.sys_root, s.dev_root, s.mountinfo),
            (
                PathBuf::from("/sys"),
                PathBuf::from("/dev"),
                PathBuf::from("/proc/self/mountinfo")
            )
        );
        // A volume limit is a count: never negative.
        assert_eq!(
            parse_err(&["node", "--kms=unix:///k.sock", "--max-volumes=-1"]),
            ErrorKind::ValueValidation
        );
    }

    #[test]
    fn kms_client_tls_flags_come_together() {
        assert_eq!(
            parse_err(&[
                "node",
                "--kms=https://kms:9000",
                "--kms-ca-file=/ca.pem",
                "--kms-cert-file=/c.pem",
            ]),
            ErrorKind::MissingRequiredArgument
        );
        let Command::Node(n) = parse_ok(&[
            "node",
            "--kms=https://kms:9000",
            "--kms-ca-file=/ca.pem",
            "--kms-cert-file=/c.pem",
            "--kms-key-file=/k.pem",
        ]) else {
            panic!("not node")
        };
        assert_eq!(
            n.serve.kms_client.kms_key_file,
            Some(PathBuf::from("/k.pem"))
        );
        assert!(!n.serve.kms_client.kms_insecure);
    }

    #[test]
    fn kms_flags_and_their_authorizer() {
        let base = ["kms", "--master-secret-file=/m", "--salt-file=/s"];
        let Command::Kms(k) = parse_ok(&base) else {
            panic!("not kms")
        };
        assert_eq!(k.listen.to_string(), "tcp://0.0.0.0:9000");
        assert_eq!(k.authorizer, AuthorizerKind::Kubernetes);
        assert_eq!(k.token_audience, "cryptdisk-kms");
        assert_eq!(k.node_service_account, "kube-system/cryptdisk-node");
        assert_eq!(k.driver_name.to_string(), "cryptdisk.csi.io");
        assert_eq!(k.authorization_max_staleness, 30);
        assert_eq!(k.tls_handshake_timeout_seconds, 10);
        assert_eq!(k.max_connections, server::accept::DEFAULT_MAX_CONNECTIONS);
        assert!(!k.insecure && !k.allow_v1_keys);
        assert_eq!((k.kubeconfig, k.local_state), (None, None));

        let Command::Kms(k) = parse_ok(
            &[
                &base[..],
                &["--authorizer=local", "--local-state=/var/lib/cryptdisk"],
            ]
            .concat(),
        ) else {
            panic!("not kms")
        };
        assert_eq!(k.authorizer, AuthorizerKind::Local);
        assert_eq!(k.local_state, Some(PathBuf::from("/var/lib/cryptdisk")));
        let Command::Kms(k) = parse_ok(&[&base[..], &["--authorizer", "none"]].concat()) else {
            panic!("not kms")
        };
        assert_eq!(k.authorizer, AuthorizerKind::None);
        assert_eq!(
            parse_err(&[&base[..], &["--authorizer=anyone"]].concat()),
            ErrorKind::InvalidValue
        );

        // --insecure and a TLS certificate contradict each other.
        assert_eq!(
            parse_err(
                &[
                    &base[..],
                    &[
                        "--insecure",
                        "--tls-cert-file=/c",
                        "--tls-key-file=/k",
                        "--client-ca-file=/ca"
                    ]
                ]
                .concat()
            ),
            ErrorKind::ArgumentConflict
        );
        assert_eq!(
            parse_err(&[&base[..], &["--tls-cert-file=/c"]].concat()),
            ErrorKind::MissingRequiredArgument
        );
        assert_eq!(parse_err(&["kms"]), ErrorKind::MissingRequiredArgument);
    }

    #[test]
    fn dev_needs_the_secret_and_salt_together() {
        assert_eq!(
            parse_err(&["dev", "--master-secret-file=/m"]),
            ErrorKind::MissingRequiredArgument
        );
        let Command::Dev(d) = parse_ok(&["dev"]) else {
            panic!("not dev")
        };
        assert_eq!((d.master_secret_file, d.salt_file), (None, None));
        assert_eq!(d.local.data_dir, PathBuf::from("/var/lib/cryptdisk"));
    }

    #[test]
    fn recover_and_verify_flags() {
        let Command::Recover(r) = parse_ok(&[
            "recover",
            "--master-secret-file=/m",
            "--salt-file=/s",
            "/dev/sdb",
        ]) else {
            panic!("not recover")
        };
        assert_eq!(r.name, "cryptdisk-recovered");
        assert_eq!(r.device, PathBuf::from("/dev/sdb"));
        assert!(!r.show_key && !r.readonly && r.open.is_none());
        assert_eq!(
            parse_err(&["verify", "--kms=unix:///k.sock", "/dev/sdb"]),
            ErrorKind::MissingRequiredArgument
        );
    }
}
