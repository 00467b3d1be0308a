//! The operator tools through the real binary, on image files (host tier: no
//! device-mapper needed): inspect on valid, foreign, forged and absent headers;
//! recover after a key rotation, against stock cryptsetup; verify against a real
//! KMS with the right and a wrong master secret.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use cryptdisk_csi::crypt::{self, FormatOptions, Integrity, KeyId, Token};
use cryptdisk_csi::kms::{Derivation, derive_data_key};

const BIN: &str = env!("CARGO_BIN_EXE_cryptdisk-csi");
/// The CSI volume id the test volumes are verified as.
const VOLUME: &str = "local:node-1:disk-1";

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn write_secret(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// A volume formatted by the driver's own code, with the master secret files
/// (version 1 `master.key`, salt) it was formatted from.
struct Volume {
    dir: tempfile::TempDir,
    image: PathBuf,
    key_id: KeyId,
}

impl Volume {
    async fn new() -> Volume {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(40 << 20)
            .unwrap();
        write_secret(&dir.path().join("master.key"), &[11; 32]);
        write_secret(&dir.path().join("salt"), &[12; 32]);
        let key_id = KeyId::new_random();
        let key = derive_data_key(&[11; 32], &[12; 32], key_id.as_str(), 32).unwrap();
        let opts = FormatOptions {
            key_id: key_id.clone(),
            token: Token {
                key_id: key_id.to_string(),
                key_version: 1,
                kms: "ops-test".into(),
                content: None,
                wipe_offset: None,
                rotation: None,
                derivation: None,
            },
            integrity: Integrity::None,
            bypass_workqueues: true,
        };
        crypt::format(crypt::probe_blank(&image).unwrap(), &key, &opts)
            .await
            .unwrap();
        Volume { dir, image, key_id }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn arg(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }
}

/// Rewrites the JSON of both header copies and their checksums, as an attacker
/// with the disk would, so that libcryptsetup still loads it.
fn forge(image: &Path, change: impl Fn(&mut serde_json::Value)) {
    use sha2::{Digest, Sha256};
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .unwrap();
    let mut first = [0u8; 16];
    f.read_exact_at(&mut first, 0).unwrap();
    let size = u64::from_be_bytes(first[8..16].try_into().unwrap()) as usize;
    for offset in [0, size] {
        let mut copy = vec![0u8; size];
        f.read_exact_at(&mut copy, offset as u64).unwrap();
        let area = &copy[4096..];
        let end = area.iter().position(|&b| b == 0).unwrap();
        let mut json: serde_json::Value = serde_json::from_slice(&area[..end]).unwrap();
        change(&mut json);
        let text = serde_json::to_vec(&json).unwrap();
        copy[4096..].fill(0);
        copy[4096..4096 + text.len()].copy_from_slice(&text);
        copy[448..448 + 64].fill(0);
        let sum = Sha256::digest(&copy);
        copy[448..448 + 32].copy_from_slice(&sum);
        f.write_all_at(&copy, offset as u64).unwrap();
    }
}

#[tokio::test]
async fn inspect_judges_valid_foreign_forged_and_absent_headers() {
    let v = Volume::new().await;
    let img = v.image.display().to_string();

    let out = run(&["inspect", &img]);
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("validation: passed"), "{stdout}");
    assert!(stdout.contains("aes-xts-plain64"), "{stdout}");
    assert!(stdout.contains("sector size 4096"), "{stdout}");
    assert!(
        stdout.contains("PBKDF pbkdf2 (sha256, 1000 iterations)"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("key id:     {}", v.key_id)),
        "{stdout}"
    );
    assert!(stdout.contains("kms:        ops-test"), "{stdout}");

    let out = run(&["inspect", "--json", &img]);
    assert_eq!(out.status.code(), Some(0));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["valid"], true);
    assert_eq!(json["header"]["uuid"], v.key_id.as_str());
    assert_eq!(json["header"]["cryptdisk_token"]["key_version"], 1);
    assert_eq!(json["header"]["cryptdisk_token"]["kms"], "ops-test");
    assert_eq!(json["header"]["keyslots"][0]["kdf"], "pbkdf2");
    assert_eq!(json["header"]["segments"][0]["sector_size"], "4096");

    // Forged: a null cipher, checksums recomputed (libcryptsetup would load it),
    // and a label with a terminal escape.
    let forged = v.path("forged.img");
    std::fs::copy(&v.image, &forged).unwrap();
    forge(&forged, |j| {
        j["segments"]["0"]["encryption"] = "cipher_null-ecb".into()
    });
    let out = run(&["inspect", forged.to_str().unwrap()]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(4), "{stdout}{stderr}");
    assert!(
        stdout.contains("validation: REFUSED: segment encryption"),
        "{stdout}"
    );
    assert!(stderr.contains("header refused"), "{stderr}");
    let out = run(&["inspect", "--json", forged.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(4));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["valid"], false);
    assert!(json["refused"].as_str().unwrap().contains("cipher_null"));

    // Copies that disagree at one sequence id are refused too.
    let torn = v.path("torn.img");
    std::fs::copy(&v.image, &torn).unwrap();
    let before = std::fs::read(&torn).unwrap();
    forge(&torn, |j| j["tokens"]["0"]["kms"] = "elsewhere".into());
    let mut bytes = std::fs::read(&torn).unwrap();
    bytes[16 << 10..32 << 10].copy_from_slice(&before[16 << 10..32 << 10]);
    std::fs::write(&torn, &bytes).unwrap();
    let out = run(&["inspect", torn.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(4), "{:?}", text(&out));
    assert!(text(&out).0.contains("disagree"), "{:?}", text(&out));
    // A primary whose checksum no longer holds is passed over for the
    // secondary, as libcryptsetup does.
    let mut bytes = before.clone();
    bytes[4096] = b'[';
    std::fs::write(&torn, &bytes).unwrap();
    let out = run(&["inspect", torn.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));

    // Foreign: a stock cryptsetup header (another tool's volume).
    let foreign = v.path("foreign.img");
    std::fs::File::create(&foreign)
        .unwrap()
        .set_len(40 << 20)
        .unwrap();
    let made = Command::new("cryptsetup")
        .args(["luksFormat", "-q", "--type", "luks2", "--pbkdf", "pbkdf2"])
        .args(["--pbkdf-force-iterations", "1000", "--key-file", "-"])
        // A label with a terminal escape: shown escaped, never raw.
        .args(["--label", "evil\x1b[31mred"])
        .arg(&foreign)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(b"passphrase")?;
            c.wait()
        })
        .unwrap();
    assert!(made.success());
    let out = run(&["inspect", foreign.to_str().unwrap()]);
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(4), "{stdout}");
    assert!(stdout.contains("format:     LUKS2"), "{stdout}");
    assert!(stdout.contains("validation: REFUSED"), "{stdout}");
    assert!(stdout.contains(r"evil\u{1b}[31mred"), "{stdout}");
    assert!(!out.stdout.contains(&0x1b) && !out.stderr.contains(&0x1b));

    // No header at all, and no file at all.
    let blank = v.path("blank.img");
    std::fs::File::create(&blank)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let out = run(&["inspect", blank.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3));
    assert!(text(&out).0.contains("no LUKS2 header"));
    let out = run(&["inspect", "/nonexistent/disk"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).1.contains("/nonexistent/disk"),
        "{:?}",
        text(&out)
    );
}

#[tokio::test]
async fn recover_after_rotation_writes_a_key_file_stock_cryptsetup_accepts() {
    let v = Volume::new().await;
    // Rotate the volume to version 2, as a stage after add-key-version would.
    write_secret(&v.path("master.key-v2"), &[13; 32]);
    let v1 = derive_data_key(&[11; 32], &[12; 32], v.key_id.as_str(), 32).unwrap();
    let v2 = derive_data_key(&[13; 32], &[12; 32], v.key_id.as_str(), 32).unwrap();
    crypt::rotate(&v.image, &v1, &v2, 2, Derivation::V1)
        .await
        .unwrap();

    let keys = tempfile::tempdir().unwrap();
    let key_file = keys.path().join("volume.key");
    let args = |extra: &[&str]| {
        let mut a = vec![
            "recover".to_string(),
            format!("--master-secret-file={}", v.arg("master.key")),
            format!("--salt-file={}", v.arg("salt")),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        a.push(v.image.display().to_string());
        a
    };
    let argv = args(&["--key-file", key_file.to_str().unwrap()]);
    let out = Command::new(BIN).args(&argv).output().unwrap();
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains("version 2, v1 (the token's key_version): opens keyslot"),
        "{stdout}"
    );
    let hex_key = hex::encode(v2.expose());
    assert!(!stdout.contains(&hex_key) && !stderr.contains(&hex_key));
    let meta = std::fs::metadata(&key_file).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(std::fs::read(&key_file).unwrap(), v2.expose());
    let expected = format!(
        "cryptsetup open --type luks2 --key-file {} {} cryptdisk-recovered",
        key_file.display(),
        v.image.display()
    );
    assert!(stdout.lines().any(|l| l == expected), "{stdout}");

    // Stock cryptsetup takes the key file as it is (a passphrase check: the
    // host has no device-mapper to open it).
    let ok = Command::new("cryptsetup")
        .args(["open", "--test-passphrase", "--type", "luks2", "--key-file"])
        .arg(&key_file)
        .arg(&v.image)
        .status()
        .unwrap();
    assert!(ok.success());

    // The key file is never overwritten.
    std::fs::write(&key_file, b"keep").unwrap();
    let out = Command::new(BIN).args(&argv).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).1.contains("already exists"), "{:?}", text(&out));
    assert_eq!(std::fs::read(&key_file).unwrap(), b"keep");

    // --show-key prints the key; nothing else does.
    let out = Command::new(BIN)
        .args(args(&["--show-key"]))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out).0.contains(&format!("key (hex): {hex_key}")));

    // Without the version-2 file the token's version is not held: no key opens.
    std::fs::remove_file(v.path("master.key-v2")).unwrap();
    let out = Command::new(BIN).args(args(&[])).output().unwrap();
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(5), "{stdout}{stderr}");
    assert!(stderr.contains("version 2"), "{stderr}");
    assert!(
        stderr.contains("not among the master secret files"),
        "{stderr}"
    );
}

#[tokio::test]
async fn recover_mid_rotation_finds_the_key_that_opens() {
    let v = Volume::new().await;
    write_secret(&v.path("master.key-v2"), &[13; 32]);
    // A rotation cut short after its intent: the token still names version 1.
    forge(&v.image, |j| {
        j["tokens"]["0"]["rotation"] =
            serde_json::json!({"phase": "adding", "keyslot": "1", "to_version": 2});
    });
    let out = run(&[
        "recover",
        &format!("--master-secret-file={}", v.arg("master.key")),
        &format!("--salt-file={}", v.arg("salt")),
        v.image.to_str().unwrap(),
    ]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains("version 1, v1 (the token's key_version): opens keyslot 0"),
        "{stdout}"
    );
    assert!(
        stdout.contains("version 2, v1 (the rotation's target): opens no keyslot"),
        "{stdout}"
    );
}

struct Kms(std::process::Child);

impl Drop for Kms {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn kms(dir: &Path, tag: &str, secret: &Path, salt: &Path) -> (Kms, String) {
    let socket = dir.join(format!("kms-{tag}.sock"));
    let child = Command::new(BIN)
        .args(["kms", "--insecure"])
        // The ops tools ask with GetVersionedDataKey (v1 keys, no volume).
        .args(["--authorizer=none", "--allow-v1-keys"])
        .arg(format!("--listen=unix://{}", socket.display()))
        .arg(format!("--master-secret-file={}", secret.display()))
        .arg(format!("--salt-file={}", salt.display()))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..200 {
        if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    (Kms(child), format!("unix://{}", socket.display()))
}

#[tokio::test]
async fn verify_asks_the_kms_and_tells_a_wrong_master_secret() {
    let v = Volume::new().await;
    let (_right, right) = kms(
        v.dir.path(),
        "right",
        &v.path("master.key"),
        &v.path("salt"),
    );
    write_secret(&v.path("other.key"), &[99; 32]);
    let (_wrong, wrong) = kms(v.dir.path(), "wrong", &v.path("other.key"), &v.path("salt"));
    let img = v.image.to_str().unwrap();

    let out = run(&["verify", "--kms", &right, "--volume-id", VOLUME, img]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains("version 1, v1 (the token's key_version): the KMS's key opens keyslot 0"),
        "{stdout}"
    );

    let out = run(&["verify", "--kms", &wrong, "--volume-id", VOLUME, img]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(5), "{stdout}{stderr}");
    assert!(stderr.contains("opens no keyslot"), "{stderr}");

    // After a rotation to version 2, a KMS that holds only version 1 refuses
    // the key (exit 5, saying so); one started with version 2 opens it.
    write_secret(&v.path("master.key-v2"), &[13; 32]);
    let v1 = derive_data_key(&[11; 32], &[12; 32], v.key_id.as_str(), 32).unwrap();
    let v2 = derive_data_key(&[13; 32], &[12; 32], v.key_id.as_str(), 32).unwrap();
    crypt::rotate(&v.image, &v1, &v2, 2, Derivation::V1)
        .await
        .unwrap();
    let out = run(&["verify", "--kms", &right, "--volume-id", VOLUME, img]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(5), "{stdout}{stderr}");
    assert!(
        stderr.contains("version 2, v1 (the token's key_version): the KMS refused"),
        "{stderr}"
    );
    let (_rotated, rotated) = kms(
        v.dir.path(),
        "rotated",
        &v.path("master.key"),
        &v.path("salt"),
    );
    let out = run(&["verify", "--kms", &rotated, "--volume-id", VOLUME, img]);
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    assert!(
        text(&out)
            .0
            .contains("version 2, v1 (the token's key_version): the KMS's key opens keyslot 1")
    );

    // A KMS that is not there: a clear operational failure.
    let out = run(&[
        "verify",
        "--kms",
        "unix:///nonexistent/kms.sock",
        "--volume-id",
        VOLUME,
        img,
    ]);
    assert_eq!(out.status.code(), Some(1), "{:?}", text(&out));

    // A plaintext tcp:// KMS needs the same explicit flag as the node's.
    let out = run(&[
        "verify",
        "--kms",
        "tcp://127.0.0.1:9",
        "--volume-id",
        VOLUME,
        img,
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).1.contains("--kms-insecure"), "{:?}", text(&out));
}

#[test]
fn node_without_a_subcommand_still_serves_and_status_needs_no_kms() {
    // The DaemonSet's invocation parses as before (fails only on the bad endpoint).
    let out = run(&[
        "node",
        "--kms=tcp://127.0.0.1:9",
        "--kms-insecure",
        "--endpoint=bogus",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).1.contains("\"bogus\""));
    let out = run(&["node", "--endpoint=unix:///tmp/x.sock"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).1.contains("--kms"), "{:?}", text(&out));
    let out = run(&["node", "status", "--help"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out).0.contains("stale"));
}

/// A volume migrated to a v2 keyslot (as a read-write stage does): recover
/// derives its key only with the volume's scope, says so without it, and a
/// wrong scope opens nothing.
#[tokio::test]
async fn recover_of_a_v2_volume_needs_its_scope() {
    let v = Volume::new().await;
    let scope = "local:node-1:disk-1";
    let v1 = derive_data_key(&[11; 32], &[12; 32], v.key_id.as_str(), 32).unwrap();
    let v2 =
        cryptdisk_csi::kms::derive_scoped_key(&[11; 32], &[12; 32], scope, v.key_id.as_str(), 32)
            .unwrap();
    crypt::rotate(&v.image, &v1, &v2, 1, Derivation::V2)
        .await
        .unwrap();
    let token = crypt::read_header(&v.image).await.unwrap().token.unwrap();
    assert_eq!(token.derivation, Some(Derivation::V2));
    let recover = |extra: &[&str]| {
        let mut a = vec![
            "recover".to_string(),
            format!("--master-secret-file={}", v.arg("master.key")),
            format!("--salt-file={}", v.arg("salt")),
            "--show-key".to_string(),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        a.push(v.image.display().to_string());
        Command::new(BIN).args(&a).output().unwrap()
    };
    let out = recover(&[]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(5), "{stdout}{stderr}");
    assert!(stderr.contains("pass --scope"), "{stderr}");
    let out = recover(&["--scope", "local:node-1:other"]);
    assert_eq!(out.status.code(), Some(5), "{:?}", text(&out));
    let out = recover(&["--scope", scope]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains("version 1, v2 (the token's key_version): opens keyslot"),
        "{stdout}"
    );
    assert!(stdout.contains(&hex::encode(v2.expose())), "{stdout}");
}
