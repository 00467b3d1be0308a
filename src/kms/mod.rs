//! Data keys: the derivation every key source shares, and the key type itself.
//!
//! A data key is the LUKS2 passphrase of one volume. It is derived, never stored:
//! HKDF-SHA256 over the cluster's master secret with a salt and the info string
//! `"key-" + data_key_id`, so the KMS keeps no per-volume state.

pub mod authz;
pub mod client;
#[cfg(feature = "kubernetes")]
pub mod kube;
pub mod local_authz;
pub mod locked;
pub mod serve;
pub mod server;
pub mod tls;
pub mod wrap;

use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroizing;

/// Key length used when a caller does not ask for another one.
pub const DEFAULT_KEY_LEN: usize = 32;
/// Shortest and longest keys the derivation hands out.
pub const KEY_LEN_RANGE: std::ops::RangeInclusive<usize> = 16..=64;
/// A master secret shorter than this is refused.
pub const MIN_MASTER_SECRET_LEN: usize = 32;

/// Key bytes, on locked memory and wiped when dropped (see [`locked`]).
/// Deliberately without `Debug` or `Display`, so a key cannot reach a log by
/// accident.
#[derive(Clone)]
pub struct DataKey(locked::LockedBytes);

impl DataKey {
    /// Moves `bytes` onto locked memory; the buffer they came in is wiped.
    pub fn from_bytes(bytes: Zeroizing<Vec<u8>>) -> Self {
        DataKey(locked::LockedBytes::copy_of(&bytes))
    }

    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Compile-time proof that key types cannot be printed: if `DataKey` (or the
/// master secret) implemented `Debug` or `Display`, the two blanket impls below
/// would both apply and `PROOF` would not compile (the trick of
/// `static_assertions::assert_not_impl_any!`, written out).
#[allow(dead_code)]
mod no_debug {
    trait Printable<Marker> {
        fn check() {}
    }
    impl<T: ?Sized> Printable<()> for T {}
    struct ViaDebug;
    impl<T: ?Sized + std::fmt::Debug> Printable<ViaDebug> for T {}
    struct ViaDisplay;
    impl<T: ?Sized + std::fmt::Display> Printable<ViaDisplay> for T {}

    const _PROOF: fn() = || {
        <super::DataKey as Printable<_>>::check();
        <super::server::MasterSecret as Printable<_>>::check();
    };
}

/// Why a key could not be derived.
#[derive(Debug, thiserror::Error)]
pub enum DeriveError {
    #[error("key length {0} is outside the allowed range 16..=64 bytes")]
    BadLength(usize),
    #[error("data key id must not be empty")]
    EmptyId,
    #[error("key scope must be a non-empty volume id without '/'")]
    BadScope,
}

/// How a volume's key is derived (`Derivation` in kms.proto). Recorded in a
/// volume's LUKS2 token as `"derivation": "v2"`; a token without the field
/// predates v2 keys and so means [`Derivation::V1`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Derivation {
    /// Info `"key-" + data_key_id`: Constellation's derivation, bound to no
    /// volume. Kept for volumes formatted before v2, behind a migration flag.
    V1,
    /// Info `"cryptdisk-v2/" + scope + "/" + data_key_id`: bound to the volume
    /// whose scope it names (DESIGN.md §3).
    V2,
}

impl Derivation {
    pub fn as_str(self) -> &'static str {
        match self {
            Derivation::V1 => "v1",
            Derivation::V2 => "v2",
        }
    }
}

impl std::fmt::Display for Derivation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Derives the v2 key of `data_key_id` within `scope` (a CSI volume id).
///
/// The scope must not hold `/`: the info string would then be ambiguous
/// between ("a/b", "c") and ("a", "b/c"). Volume ids never hold one.
pub fn derive_scoped_key(
    master_secret: &[u8],
    salt: &[u8],
    scope: &str,
    data_key_id: &str,
    len: usize,
) -> Result<DataKey, DeriveError> {
    if scope.is_empty() || scope.contains('/') {
        return Err(DeriveError::BadScope);
    }
    derive_with_info(
        master_secret,
        salt,
        &[
            b"cryptdisk-v2/",
            scope.as_bytes(),
            b"/",
            data_key_id.as_bytes(),
        ],
        data_key_id,
        len,
    )
}

/// Derives the data key for `data_key_id` from the master secret and salt.
pub fn derive_data_key(
    master_secret: &[u8],
    salt: &[u8],
    data_key_id: &str,
    len: usize,
) -> Result<DataKey, DeriveError> {
    derive_with_info(
        master_secret,
        salt,
        &[b"key-", data_key_id.as_bytes()],
        data_key_id,
        len,
    )
}

fn derive_with_info(
    master_secret: &[u8],
    salt: &[u8],
    info_parts: &[&[u8]],
    data_key_id: &str,
    len: usize,
) -> Result<DataKey, DeriveError> {
    if !KEY_LEN_RANGE.contains(&len) {
        return Err(DeriveError::BadLength(len));
    }
    if data_key_id.is_empty() {
        return Err(DeriveError::EmptyId);
    }
    let hkdf = Hkdf::<Sha256>::new(Some(salt), master_secret);
    let info = info_parts.concat();
    let mut out = locked::LockedBytes::zeroed(len);
    hkdf.expand(&info, out.as_mut_slice())
        .expect("HKDF-SHA256 can produce 64 bytes, the largest length allowed");
    Ok(DataKey(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derivation_is_deterministic_and_separates_ids() {
        let master = [7u8; 32];
        let salt = [9u8; 32];
        let a = derive_data_key(&master, &salt, "id-a", 32).unwrap();
        let a2 = derive_data_key(&master, &salt, "id-a", 32).unwrap();
        let b = derive_data_key(&master, &salt, "id-b", 32).unwrap();
        assert_eq!(a.expose(), a2.expose());
        assert_ne!(a.expose(), b.expose());
        assert_eq!(a.len(), 32);
    }

    /// Vectors computed independently (Python's hmac/hashlib, HKDF per RFC 5869)
    /// pin the derivation: a change here would strand every existing volume.
    #[test]
    fn derivation_matches_pinned_vectors() {
        let master = b"0123456789abcdef0123456789abcdef";
        let salt = b"salt-salt-salt-salt-salt-salt-32";
        let id = "3f0e1d2c-0000-4000-8000-000000000001";
        let k32 = derive_data_key(master, salt, id, 32).unwrap();
        assert_eq!(
            hex::encode(k32.expose()),
            "672b0c81b785be8a4091eb255a48ac21117a75a3f155d000612c191978646e9b"
        );
        let k64 = derive_data_key(master, salt, id, 64).unwrap();
        assert_eq!(
            hex::encode(k64.expose()),
            "672b0c81b785be8a4091eb255a48ac21117a75a3f155d000612c191978646e9b\
             9c68f9e136237e01a3816371849194e7370eb0ab3b52b5d72442d56a185b14e2"
        );
        let master2: Vec<u8> = (0u8..32).collect();
        let k16 = derive_data_key(&master2, &[0u8; 32], "a", 16).unwrap();
        assert_eq!(
            hex::encode(k16.expose()),
            "d77305fedc70e07f0da8bebde473f2e2"
        );
    }

    /// v2 vectors, computed the same way (Python, RFC 5869) with info
    /// `"cryptdisk-v2/" + scope + "/" + id`.
    #[test]
    fn scoped_derivation_matches_pinned_vectors_and_binds_the_scope() {
        let master = b"0123456789abcdef0123456789abcdef";
        let salt = b"salt-salt-salt-salt-salt-salt-32";
        let id = "3f0e1d2c-0000-4000-8000-000000000001";
        let a = derive_scoped_key(master, salt, "local:node-a:vol-1", id, 32).unwrap();
        assert_eq!(
            hex::encode(a.expose()),
            "e65c814ad14e3681d2b9002e84bdd0d83f5e71fff9897b8d5144f456f2782d90"
        );
        let b = derive_scoped_key(master, salt, "azure:westeurope-1:pvc-9", id, 32).unwrap();
        assert_eq!(
            hex::encode(b.expose()),
            "5b93119b3122eabd50bbee8a57970ca2eea11c4d99f1b4d9b71af8d169f944df"
        );
        let v1 = derive_data_key(master, salt, id, 32).unwrap();
        assert_ne!(a.expose(), v1.expose());
        for bad in ["", "a/b"] {
            assert!(matches!(
                derive_scoped_key(master, salt, bad, id, 32),
                Err(DeriveError::BadScope)
            ));
        }
    }

    #[test]
    fn lengths_outside_range_are_refused() {
        assert!(matches!(
            derive_data_key(&[1; 32], &[2; 32], "x", 15),
            Err(DeriveError::BadLength(15))
        ));
        assert!(matches!(
            derive_data_key(&[1; 32], &[2; 32], "x", 65),
            Err(DeriveError::BadLength(65))
        ));
        assert!(derive_data_key(&[1; 32], &[2; 32], "x", 64).is_ok());
        assert!(matches!(
            derive_data_key(&[1; 32], &[2; 32], "", 32),
            Err(DeriveError::EmptyId)
        ));
    }
}

/// Why a key source could not hand out a key.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("KMS unavailable: {0}")]
    Unavailable(String),
    #[error("KMS refused the request: {0}")]
    Refused(String),
    /// The KMS does not give this node this volume's key (it is not attached
    /// here, or the node could not prove which node it is).
    #[error("KMS denied the key: {0}")]
    Denied(String),
    #[error(transparent)]
    Derive(#[from] DeriveError),
}

/// One volume key request: which volume asks (the authorization and, for v2,
/// the key scope hang on it), which key, how derived, from which master-secret
/// version (`None`: the current one).
#[derive(Clone, Copy, Debug)]
pub struct KeyRequest<'a> {
    /// The CSI volume id the key is for.
    pub volume_id: &'a str,
    /// The LUKS2 header UUID.
    pub data_key_id: &'a str,
    pub derivation: Derivation,
    pub len: usize,
    pub version: Option<u32>,
}

/// Where the node gets volume keys: the in-process derivation (`dev`) or the
/// cluster KMS over gRPC. Both decide per volume whether this node may have
/// the key, and derive v2 keys within the scope the volume's own record names.
#[tonic::async_trait]
pub trait KeySource: Send + Sync {
    /// The key `request` names, with the master-secret version it came from.
    async fn volume_key(&self, request: &KeyRequest<'_>) -> Result<(DataKey, u32), KeyError>;
    /// Which KMS this is, recorded in each volume's token.
    fn identity(&self) -> &str;
}

/// Derives keys in process from a master secret held in memory, for the
/// volumes its authorizer allows (on one machine: those the local backend has
/// published to it), so `dev` enforces the rule the cluster KMS does.
pub struct LocalKeySource {
    master: server::MasterSecret,
    identity: String,
    authorizer: std::sync::Arc<dyn authz::Authorizer>,
}

impl LocalKeySource {
    pub fn new(
        master: server::MasterSecret,
        identity: impl Into<String>,
        authorizer: std::sync::Arc<dyn authz::Authorizer>,
    ) -> Self {
        LocalKeySource {
            master,
            identity: identity.into(),
            authorizer,
        }
    }
}

#[tonic::async_trait]
impl KeySource for LocalKeySource {
    async fn volume_key(&self, request: &KeyRequest<'_>) -> Result<(DataKey, u32), KeyError> {
        // In process there is no token to present: the local authorizer judges
        // by the backend's own record of what is published here.
        let grant = self
            .authorizer
            .authorize(None, request.volume_id)
            .await
            .map_err(|d| match d {
                authz::Denial::Unavailable(_) => KeyError::Unavailable(d.to_string()),
                _ => KeyError::Denied(d.to_string()),
            })?;
        self.master
            .derive_volume_key(
                request.derivation,
                &grant.scope,
                request.data_key_id,
                request.len,
                request.version,
            )
            .map_err(|e| KeyError::Refused(e.to_string()))
    }

    fn identity(&self) -> &str {
        &self.identity
    }
}
