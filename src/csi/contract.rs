//! The strings the controller and the node both read: publish-context keys,
//! topology keys and the fresh-disk record's key. Each is defined here once,
//! so the two sides cannot drift apart.

/// Publish-context key of the local backend: the image file to attach.
pub const LOCAL_IMAGE_PATH: &str = "localImagePath";

/// Topology key of the local backend: the machine (node) whose data directory
/// holds a disk.
pub const TOPOLOGY_NODE: &str = "topology.cryptdisk.csi.io/node";

/// Topology key of a disk's and a node's zone on Azure (`<location>-<zone>`,
/// as Azure's disk CSI driver writes it) and GCP (the zone name).
pub const TOPOLOGY_ZONE: &str = "topology.cryptdisk.csi.io/zone";

/// Publish-context key of an Azure data disk's LUN (as Azure's disk CSI
/// driver names it).
pub const AZURE_LUN: &str = "LUN";

/// Publish-context key of a GCP disk: the device name it is attached under.
pub const GCP_DEVICE_NAME: &str = "gcpDeviceName";

/// Publish-context key that carries the controller's fresh-disk record to the
/// node (see [`crate::volume::fresh`]).
pub const FRESH_RECORD: &str = "cryptdisk.csi.io/fresh";

/// PersistentVolume `spec.csi.volumeAttributes` key (set by the controller in
/// the volume context, read by the KMS's authorizer) that holds a volume's key
/// scope. Absent on volumes made before v2 keys: their scope is their own
/// volume id.
pub const KEY_SCOPE: &str = "cryptdisk.csi.io/key-scope";
