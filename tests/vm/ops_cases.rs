//! The operator tools against real dm-crypt: `node status` with a deliberately
//! stale mapping, `recover --open`, and the README's disaster-recovery steps run
//! verbatim.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use cryptdisk_csi::proto::csi::volume_capability::access_mode::Mode;
use cryptdisk_csi::proto::csi::*;
use serde_json::Value;

use crate::lifecycle_cases::{
    Driver, MIB, create_req, image_of, mount_cap, open_mappings, provision, release, stage,
};
use crate::node_cases::spawn_kms_with;
use crate::{Case, CaseResult, Ctx, check, ensure};

const BIN: &str = env!("CARGO_BIN_EXE_cryptdisk-csi");

pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "ops_node_status_reports_owned_and_stale_items",
            run: |c| Box::pin(node_status(c)),
        },
        Case {
            name: "ops_readme_disaster_recovery_steps_run_verbatim",
            run: |c| Box::pin(readme_recovery(c)),
        },
    ]
}

fn run(args: &[&str]) -> Result<Output, String> {
    Ok(check!(Command::new(BIN).args(args).output()))
}

fn out_text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn status_json(staging_root: &Path, data: &Path) -> Result<(Option<i32>, Value, String), String> {
    let out = run(&[
        "node",
        "status",
        "--json",
        &format!("--staging-root={}", staging_root.display()),
        &format!("--local-data-dir={}", data.display()),
    ])?;
    let json: Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("node status --json: {e}: {}", out_text(&out)))?;
    Ok((out.status.code(), json, out_text(&out)))
}

/// Stages a volume (healthy: listed, not stale), then makes two stale items: a
/// mapping opened by `recover --open` on a copy of the image whose file is then
/// deleted (its loop device's backing file is gone), and a staging directory with
/// nothing mounted. `node status` must list the healthy volume's mapping, mount
/// and loop device and report exactly the stale ones, with exit status 6.
async fn node_status(_ctx: &mut Ctx) -> CaseResult {
    let mut d = Driver::start("ops-status").await?;
    let data = d.dir.join("data");
    let root = d.dir.join("staging-root");
    let cap = mount_cap("ext4", Mode::SingleNodeWriter);
    let (volume, context) = crate::lifecycle_cases::create_attached(
        &mut d.controller,
        create_req("pvc-status", 32 * MIB, cap.clone()),
    )
    .await?;
    let staging = root.join("pvc-status").join("globalmount");
    check!(std::fs::create_dir_all(&staging));
    stage(&mut d, &volume, &context, &staging, &cap).await?;
    let healthy = cryptdisk_csi::crypt::MapperName::for_volume(&volume.volume_id);

    let (code, json, text) = status_json(&root, &data)?;
    ensure!(code == Some(0), "healthy node: {text}");
    ensure!(
        json["mappings"][0]["name"] == healthy.as_str()
            && json["mappings"][0]["devices"][0]
                .as_str()
                .is_some_and(|d| d.starts_with("/dev/loop")),
        "healthy mapping not listed: {text}"
    );
    let staging_real = check!(std::fs::canonicalize(&staging));
    ensure!(
        json["mounts"].as_array().is_some_and(|m| m
            .iter()
            .any(|m| m["mount_point"] == staging_real.display().to_string()
                && m["mapping"] == healthy.as_str())),
        "staging mount not listed: {text}"
    );
    ensure!(
        json["loop_devices"][0]["mapping"] == healthy.as_str(),
        "loop device not listed: {text}"
    );
    ensure!(
        json["staging_paths"][0]["mapping"] == healthy.as_str(),
        "staging path not tied to its mapping: {text}"
    );

    // Stale item 1: recover --open on a copy, then delete the copy's file.
    let copy = d.dir.join("copy.img");
    check!(std::fs::copy(image_of(&d, &volume.volume_id), &copy));
    let stale_name = "cryptdisk-ops-stale";
    let out = run(&[
        "recover",
        &format!(
            "--master-secret-file={}",
            data.join("kms/master.key").display()
        ),
        &format!("--salt-file={}", data.join("kms/salt").display()),
        // A volume made empty is scoped to its own id.
        &format!("--scope={}", volume.volume_id),
        "--open",
        stale_name,
        copy.to_str().unwrap_or_default(),
    ])?;
    ensure!(out.status.success(), "recover --open: {}", out_text(&out));
    ensure!(
        open_mappings().contains(&stale_name.to_string()),
        "recover --open opened nothing"
    );
    check!(std::fs::remove_file(&copy));
    // Stale item 2: a staging path without a mapping.
    check!(std::fs::create_dir_all(
        root.join("pvc-gone").join("globalmount")
    ));

    let (code, json, text) = status_json(&root, &data)?;
    let result = (|| {
        ensure!(code == Some(6), "expected exit 6: {text}");
        let stale: Vec<String> = json["stale"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        ensure!(stale.len() == 3, "expected 3 stale items: {stale:?}");
        ensure!(
            stale
                .iter()
                .any(|s| s.starts_with(&format!("mapping {stale_name}")) && s.contains("deleted")),
            "the stale mapping is not reported: {stale:?}"
        );
        ensure!(
            stale.iter().any(|s| s.contains("copy.img (deleted)")
                && s.starts_with("loop device")
                && s.contains("was deleted")),
            "the loop device over the deleted image is not reported: {stale:?}"
        );
        ensure!(
            stale
                .iter()
                .any(|s| s.contains("pvc-gone") && s.contains("no mapping")),
            "the staging path without a mapping is not reported: {stale:?}"
        );
        ensure!(
            !stale.iter().any(|s| s.contains(healthy.as_str())),
            "the healthy volume is reported stale: {stale:?}"
        );
        // The text output says the same.
        let out = run(&[
            "node",
            "status",
            &format!("--staging-root={}", root.display()),
        ])?;
        let human = String::from_utf8_lossy(&out.stdout).into_owned();
        ensure!(
            out.status.code() == Some(6) && human.contains("STALE") && human.contains("stale: "),
            "text output: {}",
            out_text(&out)
        );
        Ok(())
    })();
    let closed = Command::new("cryptsetup")
        .args(["close", stale_name])
        .status();
    result?;
    ensure!(
        check!(closed).success(),
        "cryptsetup close {stale_name} failed"
    );
    check!(
        d.node
            .node_unstage_volume(NodeUnstageVolumeRequest {
                volume_id: volume.volume_id.clone(),
                staging_target_path: staging.display().to_string(),
            })
            .await
    );
    // Kubelet removes the staging directories after NodeUnstageVolume.
    check!(std::fs::remove_dir_all(root.join("pvc-gone")));
    check!(std::fs::remove_dir_all(root.join("pvc-status")));
    let (code, _, text) = status_json(&root, &data)?;
    ensure!(code == Some(0), "after cleanup: {text}");
    Ok(())
}

/// The `sh` blocks of the README's "Disaster recovery" section, in order.
fn readme_recovery_blocks() -> Result<Vec<String>, String> {
    let readme = include_str!("../../README.md");
    let start = readme
        .find("\n## Disaster recovery\n")
        .ok_or("README has no '## Disaster recovery' section")?;
    let rest = &readme[start + 1..];
    let end = rest[3..].find("\n## ").map_or(rest.len(), |e| e + 3);
    let section = &rest[..end];
    let mut blocks = Vec::new();
    let mut lines = section.lines();
    while let Some(line) = lines.next() {
        if line.trim_end() == "```sh" {
            let mut block = String::new();
            for l in lines.by_ref() {
                if l.trim_end() == "```" {
                    break;
                }
                block.push_str(l);
                block.push('\n');
            }
            blocks.push(block);
        }
    }
    Ok(blocks)
}

/// A volume made and written by the driver is "restored" as an image file
/// elsewhere, with copies of the secret files, and a KMS started from them plays
/// the new cluster's. The README's recovery blocks then run verbatim: inspect,
/// verify against that KMS, recover to a key file, stock cryptsetup open, mount,
/// list, close. The file written through the driver must show in the listing,
/// the cryptsetup line the README runs must be the one recover printed, and
/// nothing may be left open.
async fn readme_recovery(_ctx: &mut Ctx) -> CaseResult {
    let blocks = readme_recovery_blocks()?;
    let script = blocks.concat();
    for word in [
        "inspect",
        "verify",
        "recover",
        "cryptsetup open",
        "cryptsetup close",
    ] {
        ensure!(
            script.contains(word),
            "the README's steps lack {word:?}:\n{script}"
        );
    }
    let mut d = Driver::start("ops-readme").await?;
    let staged = provision(
        &mut d,
        create_req(
            "pvc-restore",
            32 * MIB,
            mount_cap("ext4", Mode::SingleNodeWriter),
        ),
    )
    .await?;
    check!(std::fs::write(
        staged.target.join("restored-marker.txt"),
        b"hello"
    ));
    release(&mut d, &staged).await?;
    let work = d.dir.join("restore");
    let (secrets, keys, mnt) = (work.join("secrets"), work.join("keys"), work.join("mnt"));
    for dir in [&secrets, &keys, &mnt] {
        check!(std::fs::create_dir_all(dir));
    }
    let disk = work.join("restored.img");
    check!(std::fs::copy(image_of(&d, &staged.volume.volume_id), &disk));
    for name in ["master.key", "salt"] {
        let to = secrets.join(name);
        check!(std::fs::copy(d.dir.join("data/kms").join(name), &to));
        check!(std::fs::set_permissions(
            &to,
            std::fs::Permissions::from_mode(0o600)
        ));
    }
    drop(d);

    // The new cluster's KMS: the same secret files.
    let kms_sock = work.join("kms.sock");
    // Another cluster's KMS knows nothing of this volume's attachments: it
    // serves by the volume id verify names (a test-only authorizer).
    let _kms = spawn_kms_with(
        &work,
        &kms_sock,
        &secrets.join("master.key"),
        &secrets.join("salt"),
        &["--authorizer=none".to_string()],
    )
    .await?;

    let bin_dir: PathBuf = Path::new(BIN).parent().ok_or("binary dir")?.to_path_buf();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = check!(
        Command::new("bash")
            .args(["-euo", "pipefail", "-c", &script])
            .env("PATH", path)
            .env("DISK", &disk)
            .env("SECRETS", &secrets)
            .env("KEYS", &keys)
            .env("MNT", &mnt)
            .env("VOLUME", &staged.volume.volume_id)
            .env(
                "SCOPE",
                staged
                    .volume
                    .volume_context
                    .get(cryptdisk_csi::kms::authz::SCOPE_ATTRIBUTE)
                    .ok_or("no key scope in the volume context")?,
            )
            .env("CRYPTDISK_KMS", format!("unix://{}", kms_sock.display()))
            .stdin(Stdio::null())
            .output()
    );
    let text = out_text(&out);
    if !out.status.success() {
        // Leave nothing open for the next case.
        let _ = Command::new("umount").arg(&mnt).status();
        let _ = Command::new("cryptsetup")
            .args(["close", "recovered"])
            .status();
    }
    ensure!(
        out.status.success(),
        "the README's steps failed:\n{script}\n{text}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        stdout.contains("restored-marker.txt"),
        "the recovered filesystem does not list the file the driver wrote:\n{text}"
    );
    ensure!(
        stdout.contains("validation: passed") && stdout.contains("the KMS's key opens keyslot"),
        "inspect or verify did not report success:\n{text}"
    );
    // The README's cryptsetup line, with its variables expanded, is the one
    // recover printed.
    let readme_open = script
        .lines()
        .find(|l| l.starts_with("cryptsetup open"))
        .ok_or("no cryptsetup open line")?
        .replace("\"$KEYS\"", &keys.display().to_string())
        .replace(
            "\"$KEYS/volume.key\"",
            &keys.join("volume.key").display().to_string(),
        )
        .replace("\"$DISK\"", &disk.display().to_string());
    ensure!(
        stdout.lines().any(|l| l == readme_open),
        "recover did not print the README's command line {readme_open:?}:\n{text}"
    );
    ensure!(
        !keys.join("volume.key").exists(),
        "the key file was left behind"
    );
    ensure!(
        !Path::new("/dev/mapper/recovered").exists(),
        "the mapping was left open"
    );
    Ok(())
}
