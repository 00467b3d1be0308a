//! cryptdisk-csi: a Kubernetes CSI driver that encrypts every volume it serves with
//! dm-crypt (LUKS2), with per-volume keys that a cluster KMS derives.
//!
//! - [`crypt`] owns every libcryptsetup call.
//! - [`kms`] derives data keys and serves them.
//! - [`csi`] holds the CSI services, one file each.
//! - [`server`] serves gRPC on unix sockets; [`config`] parses what comes from flags.

pub mod backend;
pub mod cli;
pub mod client;
pub mod cloud;
pub mod config;
pub mod crypt;
pub mod csi;
pub mod error;
pub mod failpoint;
pub mod kms;
pub mod logging;
pub mod metrics;
pub mod mount;
pub mod ops;
pub mod privileges;
pub mod proto;
pub mod server;
#[cfg(any(test, feature = "test-support"))]
#[doc(hidden)]
pub mod test_http;
pub mod volume;
