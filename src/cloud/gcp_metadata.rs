//! The GCE metadata server's address, its override and the header it demands:
//! one definition for the gcp backend, the node plugin and the KMS's `gcp-kms:`
//! unwrapping (which needs no Google SDK, so it works in builds without the
//! `gcp` feature).

/// The metadata server as every GCE guest reaches it.
pub const DEFAULT_METADATA_URL: &str = "http://metadata.google.internal";
/// The variable Google's client libraries read to reach another metadata server
/// (`host[:port]`, plain HTTP): GKE's metadata proxy, or a test fake.
pub const METADATA_HOST_ENV: &str = "GCE_METADATA_HOST";
/// The header the server demands on every request (and the proof, to it, that
/// the request is not a forwarded browser request).
pub const METADATA_FLAVOR: (&str, &str) = ("Metadata-Flavor", "Google");
/// Prefix of the v1 metadata paths.
pub const METADATA_V1: &str = "/computeMetadata/v1";

/// The metadata server's base URL given a variable lookup: `GCE_METADATA_HOST`
/// when set and not blank, the default otherwise.
pub fn metadata_url(var: impl Fn(&str) -> Option<String>) -> String {
    match var(METADATA_HOST_ENV).filter(|v| !v.trim().is_empty()) {
        Some(host) => format!("http://{}", host.trim()),
        None => DEFAULT_METADATA_URL.to_string(),
    }
}
