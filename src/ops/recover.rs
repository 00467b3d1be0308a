//! `recover`: a volume's key derived offline from the master secret files, the
//! same derivation the KMS runs, checked against the header's keyslots without
//! activating anything, then written to a new key file for stock cryptsetup.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::{OpsError, validated_token, versions_named};
use crate::crypt;
use crate::kms::server::{MasterSecret, VersionError};
use crate::kms::{DEFAULT_KEY_LEN, DataKey, Derivation};

/// The key that opens the volume, and what was tried. No `Debug`: it holds a key.
pub struct Found {
    pub key: DataKey,
    pub version: u32,
    pub keyslot: u32,
    /// One line per version the token names: which keyslot its key opens.
    pub lines: Vec<String>,
}

impl Found {
    /// The key as hex, for `--show-key` only.
    pub fn key_hex(&self) -> zeroize::Zeroizing<String> {
        zeroize::Zeroizing::new(hex::encode(self.key.expose()))
    }
}

/// Derives the key of each version the token of `device` names and finds the
/// one that opens a keyslot. A v2 key is bound to the volume's key scope
/// (`scope`: the PV's `cryptdisk.csi.io/key-scope` attribute, else its volume
/// handle), which the header does not hold.
pub async fn find_key(
    device: &Path,
    master: &MasterSecret,
    scope: Option<&str>,
) -> Result<Found, OpsError> {
    let (key_id, token) = validated_token(device).await?;
    let mut lines = Vec::new();
    let mut found: Option<(DataKey, u32, u32)> = None;
    for (version, derivation, why) in versions_named(&token) {
        let number = version;
        let scope = match (derivation, scope) {
            (Derivation::V1, _) => "",
            (Derivation::V2, Some(scope)) => scope,
            (Derivation::V2, None) => {
                lines.push(format!(
                    "version {version}, v2 ({why}): a v2 key is bound to the volume's key \
                     scope; pass --scope (the PV's volumeAttributes \
                     {}, else its volume handle)",
                    crate::kms::authz::SCOPE_ATTRIBUTE
                ));
                continue;
            }
        };
        let derived = master.derive_volume_key(
            derivation,
            scope,
            key_id.as_str(),
            DEFAULT_KEY_LEN,
            Some(version),
        );
        let version = format!("version {version}, {derivation}");
        let key = match derived {
            Ok((key, _)) => key,
            Err(VersionError::Unknown(_)) => {
                lines.push(format!(
                    "{version} ({why}): not among the master secret files \
                     (version N >= 2 is <master-secret-file>-vN)"
                ));
                continue;
            }
            Err(e) => return Err(OpsError::Failed(e.to_string())),
        };
        match crypt::key_slot(device, &key).await {
            Ok(slot) => {
                lines.push(format!("{version} ({why}): opens keyslot {slot}"));
                if found.is_none() {
                    found = Some((key, number, slot));
                }
            }
            Err(crypt::Error::WrongKey { .. }) => {
                lines.push(format!("{version} ({why}): opens no keyslot"))
            }
            Err(e) => return Err(e.into()),
        }
    }
    match found {
        Some((key, version, keyslot)) => Ok(Found {
            key,
            version,
            keyslot,
            lines,
        }),
        None => Err(OpsError::NoKeyOpens(format!(
            "{}: no key derived from these master secret files opens a keyslot of key id \
             {key_id} ({}); are they this volume's cluster's secret and salt?",
            device.display(),
            lines.join("; ")
        ))),
    }
}

/// Writes `key` to a new file at `path` with mode 0600; never replaces a file.
pub fn write_key_file(path: &Path, key: &DataKey) -> Result<(), OpsError> {
    let fail = |e: std::io::Error| {
        OpsError::Failed(if e.kind() == std::io::ErrorKind::AlreadyExists {
            format!(
                "{}: already exists; the key file is never overwritten: name a new path",
                path.display()
            )
        } else {
            format!("{}: {e}", path.display())
        })
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(fail)?;
    file.write_all(key.expose()).map_err(fail)?;
    file.sync_all().map_err(fail)?;
    Ok(())
}

/// Quotes `s` for a POSIX shell when it needs it.
pub fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// The stock cryptsetup command line that opens `device` as `name` with the
/// key in `key_file`.
pub fn open_command(key_file: &Path, device: &Path, name: &str, read_only: bool) -> String {
    let mut cmd = String::from("cryptsetup open --type luks2");
    if read_only {
        cmd.push_str(" --readonly");
    }
    cmd.push_str(" --key-file ");
    cmd.push_str(&shell_quote(&key_file.to_string_lossy()));
    cmd.push(' ');
    cmd.push_str(&shell_quote(&device.to_string_lossy()));
    cmd.push(' ');
    cmd.push_str(&shell_quote(name));
    cmd
}

/// Opens `device` as `/dev/mapper/<name>` with the recovered key.
pub async fn open(
    device: &Path,
    name: &str,
    key: &DataKey,
    read_only: bool,
) -> Result<(), OpsError> {
    let name = crypt::MapperName::operator(name).map_err(OpsError::Failed)?;
    let opts = crypt::OpenOptions {
        allow_discards: false,
        read_only,
    };
    crypt::open(device, &name, key, &opts).await?;
    Ok(())
}

/// `recover`: finds the key that opens the device and hands it over as the
/// flags ask (a key file, an open mapping, or hex on standard output).
pub async fn run(args: crate::cli::RecoverArgs) -> Result<(), Box<dyn std::error::Error>> {
    // Checked before any key is derived, so a typo costs nothing.
    crate::crypt::MapperName::operator(&args.name).map_err(|e| format!("--name: {e}"))?;
    if let Some(name) = &args.open {
        crate::crypt::MapperName::operator(name).map_err(|e| format!("--open: {e}"))?;
    }
    let master = crate::kms::serve::load_master(
        &args.master_secret_file,
        &args.salt_file,
        args.master_secret_wrapped_by.as_ref(),
    )
    .await?;
    let found = find_key(&args.device, &master, args.scope.as_deref()).await?;
    for line in &found.lines {
        println!("{line}");
    }
    println!(
        "recovered the key of master-secret version {} (keyslot {})",
        found.version, found.keyslot
    );
    if let Some(path) = &args.key_file {
        write_key_file(path, &found.key)?;
        println!(
            "wrote the key to {} (mode 0600); open the volume with:",
            path.display()
        );
        println!(
            "{}",
            open_command(path, &args.device, &args.name, args.readonly)
        );
    }
    if let Some(name) = &args.open {
        open(&args.device, name, &found.key, args.readonly).await?;
        println!("opened /dev/mapper/{name}");
    }
    if args.show_key {
        println!("key (hex): {}", found.key_hex().as_str());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_quoted_for_a_shell() {
        assert_eq!(
            open_command(Path::new("/k/v.key"), Path::new("/dev/sdb"), "rec", false),
            "cryptsetup open --type luks2 --key-file /k/v.key /dev/sdb rec"
        );
        assert_eq!(
            open_command(
                Path::new("/k/my key"),
                Path::new("/d/it's.img"),
                "rec",
                true
            ),
            r"cryptsetup open --type luks2 --readonly --key-file '/k/my key' '/d/it'\''s.img' rec"
        );
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("$(reboot)"), "'$(reboot)'");
    }

    #[test]
    fn the_key_file_is_new_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let key = crate::kms::derive_data_key(&[1; 32], &[2; 32], "id", 32).unwrap();
        write_key_file(&path, &key).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), key.expose());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let err = write_key_file(&path, &key).err().unwrap();
        assert!(err.to_string().contains("never overwritten"), "{err}");
        let err = write_key_file(&dir.path().join("no/such/dir/k"), &key)
            .err()
            .unwrap();
        assert_eq!(err.exit_code(), 1);
    }
}
