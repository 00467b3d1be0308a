//! Operator tools that work without the cluster: read a header ([`inspect`]),
//! derive a volume's key offline and open it with stock tools ([`recover`]), ask
//! a KMS whether its key opens a volume ([`verify_with`]), and list what a node
//! holds and what is stale ([`status`]).
//!
//! Each tool answers with a result an operator reads and an [`OpsError`] whose
//! [`OpsError::exit_code`] tells scripts what went wrong. Key bytes leave this
//! module only through [`recover::write_key_file`] (a new file, mode 0600) and
//! [`recover::Found::key_hex`] (for `--show-key`).

pub mod inspect;
pub mod recover;
pub mod status;

use std::path::Path;

use crate::crypt;
use crate::kms::{DEFAULT_KEY_LEN, Derivation, KeyError, KeyRequest, KeySource};

/// Why an operator tool failed; each kind has its own exit code.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// Anything operational: a file that cannot be read, a KMS that cannot be reached.
    #[error("{0}")]
    Failed(String),
    /// The device carries no LUKS2 header at all.
    #[error("{0}")]
    NotLuks2(String),
    /// A LUKS2 header our validation refuses (foreign, forged, unfinished).
    #[error("{0}")]
    Refused(String),
    /// No key tried opens a keyslot.
    #[error("{0}")]
    NoKeyOpens(String),
    /// `node status` found stale items.
    #[error("{0}")]
    Stale(String),
}

impl OpsError {
    /// 1 failed, 3 no LUKS2 header, 4 header refused, 5 no key opens, 6 stale
    /// items (2 is clap's usage error).
    pub fn exit_code(&self) -> u8 {
        match self {
            OpsError::Failed(_) => 1,
            OpsError::NotLuks2(_) => 3,
            OpsError::Refused(_) => 4,
            OpsError::NoKeyOpens(_) => 5,
            OpsError::Stale(_) => 6,
        }
    }
}

impl From<crypt::Error> for OpsError {
    fn from(e: crypt::Error) -> Self {
        match e {
            crypt::Error::NotLuks2 { .. } => OpsError::NotLuks2(e.to_string()),
            crypt::Error::BadHeader { .. } | crypt::Error::BadToken { .. } => {
                OpsError::Refused(e.to_string())
            }
            crypt::Error::WrongKey { .. } => OpsError::NoKeyOpens(e.to_string()),
            other => OpsError::Failed(other.to_string()),
        }
    }
}

/// The header of `device`, validated, and its `cryptdisk` token: what recover
/// and verify start from.
pub async fn validated_token(device: &Path) -> Result<(crypt::KeyId, crypt::Token), OpsError> {
    let path = device.to_path_buf();
    tokio::task::spawn_blocking(move || crypt::header::read_validated(&path))
        .await
        .map_err(|e| OpsError::Failed(e.to_string()))??;
    let header = crypt::read_header(device).await?;
    let token = header
        .token
        .ok_or_else(|| OpsError::Refused(format!("{}: no cryptdisk token", device.display())))?;
    Ok((header.key_id, token))
}

/// The keys a token names, as master-secret version and derivation: its own
/// and, while a keyslot is being added by a rotation, the rotation's target.
pub fn versions_named(token: &crypt::Token) -> Vec<(u32, Derivation, &'static str)> {
    let mut v = vec![(
        token.key_version,
        token.derivation(),
        "the token's key_version",
    )];
    if let Some(crypt::Rotation::Adding {
        to_version,
        to_derivation,
        ..
    }) = &token.rotation
    {
        let target = (*to_version, to_derivation.unwrap_or(Derivation::V1));
        if target != (token.key_version, token.derivation()) {
            v.push((target.0, target.1, "the rotation's target"));
        }
    }
    v
}

/// Asks `keys` (the cluster KMS) for the key of each version the token of
/// `device` names, as the key of CSI volume `volume_id` (v2 keys are bound to
/// the volume's scope, and the KMS serves only the volumes attached to the
/// asking node), and checks, without activating anything, that one opens a
/// keyslot. Returns a line per version tried.
pub async fn verify_with(
    keys: &dyn KeySource,
    device: &Path,
    volume_id: &str,
) -> Result<Vec<String>, OpsError> {
    let (key_id, token) = validated_token(device).await?;
    let mut lines = Vec::new();
    let mut opened = false;
    for (version, derivation, why) in versions_named(&token) {
        let request = KeyRequest {
            volume_id,
            data_key_id: key_id.as_str(),
            derivation,
            len: DEFAULT_KEY_LEN,
            version: Some(version),
        };
        let version = format!("version {version}, {derivation}");
        let key = match keys.volume_key(&request).await {
            Ok((key, _)) => key,
            // A refusal is an answer about this version (one the KMS does not
            // hold, a v1 key it no longer serves); another the token names may
            // still open.
            Err(KeyError::Refused(reason) | KeyError::Denied(reason)) => {
                lines.push(format!("{version} ({why}): the KMS refused: {reason}"));
                continue;
            }
            Err(e) => {
                return Err(OpsError::Failed(format!(
                    "asking {} for the key: {e}",
                    keys.identity()
                )));
            }
        };
        match crypt::key_slot(device, &key).await {
            Ok(slot) => {
                opened = true;
                lines.push(format!(
                    "{version} ({why}): the KMS's key opens keyslot {slot}"
                ));
            }
            Err(crypt::Error::WrongKey { .. }) => {
                lines.push(format!("{version} ({why}): the KMS's key opens no keyslot"))
            }
            Err(e) => return Err(e.into()),
        }
    }
    if opened {
        Ok(lines)
    } else {
        Err(OpsError::NoKeyOpens(format!(
            "{}: no key {} serves for key id {key_id} opens a keyslot ({}); is it the \
             cluster's KMS, with the same master secret and salt?",
            device.display(),
            keys.identity(),
            lines.join("; ")
        )))
    }
}

/// Escapes control characters (a hostile header's label could hold terminal
/// escapes) for human output.
pub fn printable(s: &str) -> String {
    if s.chars().any(char::is_control) {
        s.chars().flat_map(char::escape_default).collect()
    } else {
        s.to_string()
    }
}
