//! The driver of `hack/bench`, run as root inside the real-kernel VM: measures
//! what users compare, each against its baseline side by side in one run, and
//! writes `report.md` (a markdown table led by the ratios) and `report.svg` (the
//! ratios as bars beside their goals) into `--out`.
//!
//! Baselines run through the same tools as our path: stock `cryptsetup` for the
//! three PBKDF settings, the same fio jobs on the same disk, the driver's own
//! `mount` and `crypt::wipe` functions for the plain-device and raw-write sides.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use cryptdisk_csi::client;
use cryptdisk_csi::config::Endpoint;
use cryptdisk_csi::crypt::wipe;
use cryptdisk_csi::mount::{self, FsType};
use cryptdisk_csi::proto::csi::controller_client::ControllerClient;
use cryptdisk_csi::proto::csi::node_client::NodeClient;
use cryptdisk_csi::proto::csi::volume_capability::access_mode::Mode;
use cryptdisk_csi::proto::csi::volume_capability::{AccessMode, AccessType, MountVolume};
use cryptdisk_csi::proto::csi::*;
use tonic::transport::Channel;

#[derive(Parser)]
struct Args {
    /// The running `cryptdisk-csi dev`'s endpoint.
    #[arg(long)]
    endpoint: Endpoint,
    /// Its process id (for RSS).
    #[arg(long)]
    driver_pid: u32,
    /// Its --node-id.
    #[arg(long)]
    node_id: String,
    /// Scratch directory on the same filesystem as the driver's --data-dir.
    #[arg(long)]
    scratch: PathBuf,
    /// A blank disk for cryptsetup and fio (overwritten).
    #[arg(long)]
    io_disk: PathBuf,
    /// A small blank disk for the integrity wipe (overwritten).
    #[arg(long)]
    wipe_disk: PathBuf,
    /// Where report.md, report.svg and the raw figures go.
    #[arg(long)]
    out: PathBuf,
    /// Concurrent stages (item 3).
    #[arg(long, default_value_t = 50)]
    concurrent: usize,
    /// Seconds per fio job.
    #[arg(long, default_value_t = 5)]
    fio_seconds: u32,
    /// Run only these items (e.g. `2,3`); all when empty.
    #[arg(long, value_delimiter = ',')]
    only: Vec<u32>,
}

impl Args {
    fn wants(&self, item: u32) -> bool {
        self.only.is_empty() || self.only.contains(&item)
    }
}

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// One line of the report: a figure of ours against its baseline.
struct Row {
    item: &'static str,
    what: String,
    ours: String,
    baseline: String,
    /// ours / baseline, in the direction the goal states.
    ratio: Option<f64>,
    /// Text of the goal, and whether the ratio meets it.
    goal: Option<(String, bool)>,
}

struct Report {
    rows: Vec<Row>,
    notes: Vec<String>,
}

impl Report {
    fn row(&mut self, item: &'static str, what: impl Into<String>) -> RowBuilder<'_> {
        RowBuilder {
            report: self,
            row: Row {
                item,
                what: what.into(),
                ours: String::new(),
                baseline: String::new(),
                ratio: None,
                goal: None,
            },
        }
    }

    fn note(&mut self, s: impl Into<String>) {
        let s = s.into();
        println!("bench: note: {s}");
        self.notes.push(s);
    }
}

struct RowBuilder<'a> {
    report: &'a mut Report,
    row: Row,
}

impl RowBuilder<'_> {
    fn ours(mut self, s: impl Into<String>) -> Self {
        self.row.ours = s.into();
        self
    }
    fn baseline(mut self, s: impl Into<String>) -> Self {
        self.row.baseline = s.into();
        self
    }
    fn ratio(mut self, r: f64) -> Self {
        self.row.ratio = Some(r);
        self
    }
    /// At least `min` (e.g. a speed-up).
    fn goal_min(mut self, min: f64) -> Self {
        let r = self.row.ratio.unwrap_or(f64::NAN);
        self.row.goal = Some((format!("≥ {min}"), r >= min));
        self
    }
    /// At most `max` (e.g. a slowdown).
    fn goal_max(mut self, max: f64) -> Self {
        let r = self.row.ratio.unwrap_or(f64::NAN);
        self.row.goal = Some((format!("≤ {max}"), r <= max));
        self
    }
    fn goal_text(mut self, text: impl Into<String>, met: bool) -> Self {
        self.row.goal = Some((text.into(), met));
        self
    }
    fn done(self) {
        let r = &self.row;
        println!(
            "bench: [{}] {}: ours {} / baseline {} = {}",
            r.item,
            r.what,
            r.ours,
            r.baseline,
            r.ratio.map(|x| format!("{x:.3}")).unwrap_or("-".into())
        );
        self.report.rows.push(self.row);
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Runs a tool, failing with its output when it fails.
fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{program} {}: {}\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn timed_run(program: &str, args: &[&str]) -> Result<Duration> {
    let t = Instant::now();
    run(program, args)?;
    Ok(t.elapsed())
}

/// A field of /proc/<pid>/status in KiB (VmRSS, VmHWM).
fn proc_kib(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| format!("no {field} in /proc/{pid}/status").into())
}

fn capability(fs: &str) -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs.into(),
            mount_flags: vec![],
            volume_mount_group: String::new(),
        })),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    }
}

#[derive(Clone)]
struct Csi {
    controller: ControllerClient<Channel>,
    node: NodeClient<Channel>,
    node_id: String,
    kubelet: PathBuf,
}

/// A volume created and published to the node, ready to stage.
struct Published {
    volume: Volume,
    context: HashMap<String, String>,
    staging: PathBuf,
}

impl Csi {
    async fn create(&mut self, name: &str, bytes: i64, fs: &str) -> Result<Volume> {
        Ok(self
            .controller
            .create_volume(CreateVolumeRequest {
                name: name.into(),
                capacity_range: Some(CapacityRange {
                    required_bytes: bytes,
                    limit_bytes: 0,
                }),
                volume_capabilities: vec![capability(fs)],
                ..Default::default()
            })
            .await?
            .into_inner()
            .volume
            .ok_or("CreateVolume returned no volume")?)
    }

    async fn delete(&mut self, volume_id: &str) -> Result<()> {
        self.controller
            .delete_volume(DeleteVolumeRequest {
                volume_id: volume_id.into(),
                ..Default::default()
            })
            .await?;
        Ok(())
    }

    async fn create_published(&mut self, name: &str, bytes: i64, fs: &str) -> Result<Published> {
        let volume = self.create(name, bytes, fs).await?;
        let context = self
            .controller
            .controller_publish_volume(ControllerPublishVolumeRequest {
                volume_id: volume.volume_id.clone(),
                node_id: self.node_id.clone(),
                volume_capability: Some(capability(fs)),
                ..Default::default()
            })
            .await?
            .into_inner()
            .publish_context;
        let staging = self.kubelet.join(name).join("staging");
        std::fs::create_dir_all(&staging)?;
        Ok(Published {
            volume,
            context,
            staging,
        })
    }

    async fn stage(&mut self, p: &Published, fs: &str) -> Result<Duration> {
        let t = Instant::now();
        self.node
            .node_stage_volume(NodeStageVolumeRequest {
                volume_id: p.volume.volume_id.clone(),
                publish_context: p.context.clone(),
                staging_target_path: p.staging.display().to_string(),
                volume_capability: Some(capability(fs)),
                volume_context: p.volume.volume_context.clone(),
                ..Default::default()
            })
            .await?;
        Ok(t.elapsed())
    }

    async fn teardown(&mut self, p: &Published) -> Result<()> {
        self.node
            .node_unstage_volume(NodeUnstageVolumeRequest {
                volume_id: p.volume.volume_id.clone(),
                staging_target_path: p.staging.display().to_string(),
            })
            .await?;
        self.controller
            .controller_unpublish_volume(ControllerUnpublishVolumeRequest {
                volume_id: p.volume.volume_id.clone(),
                node_id: self.node_id.clone(),
                ..Default::default()
            })
            .await?;
        self.delete(&p.volume.volume_id).await
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.out)?;
    std::fs::create_dir_all(&args.scratch)?;
    let channel = client::connect(&args.endpoint, Duration::from_secs(20)).await?;
    let mut csi = Csi {
        controller: ControllerClient::new(channel.clone()),
        node: NodeClient::new(channel),
        node_id: args.node_id.clone(),
        kubelet: args.scratch.join("kubelet"),
    };
    let mut report = Report {
        rows: Vec::new(),
        notes: Vec::new(),
    };
    let started = Instant::now();

    // Idle RSS first, before any work has grown the process.
    let idle_kib = proc_kib(args.driver_pid, "VmRSS")?;

    let key = args.scratch.join("bench.key");
    std::fs::write(&key, random_bytes(32)?)?;
    if args.wants(1) {
        step("1: format + open", started);
        format_open(&args, &key, &mut report)?;
        format_open_in_process(&args, &mut report).await?;
    }
    if args.wants(2) {
        step("2: NodeStage encrypted vs plain", started);
        stage_latency(&args, &mut csi, &mut report).await?;
    }
    if args.wants(3) {
        step("3: concurrent stages", started);
        concurrent_stages(&args, &csi, &mut report).await?;
    }
    if args.wants(4) {
        step("4: fio", started);
        fio(&args, &key, &mut report)?;
    }
    if args.wants(5) {
        step("5: idle RSS, CreateVolume + DeleteVolume", started);
        controller_throughput(&csi, idle_kib, &mut report).await?;
    }
    if args.wants(6) {
        step("6: integrity wipe", started);
        integrity_wipe(&args, &key, &mut report)?;
    }
    step("done", started);

    let (md, svg) = (markdown(&report), svg(&report));
    std::fs::write(args.out.join("report.md"), &md)?;
    std::fs::write(args.out.join("report.svg"), svg)?;
    println!("{md}");
    Ok(())
}

fn step(name: &str, started: Instant) {
    println!("bench: {:>6.1} s  {name}", secs(started.elapsed()));
}

fn random_bytes(n: usize) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut buf = vec![0u8; n];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf)
}

/// `cryptsetup luksFormat` of `dev` with the cipher, key size and sector size
/// every side shares, then `extra` (the PBKDF and layout options that differ).
fn luks_format_args<'a>(dev: &'a str, key: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "luksFormat",
        "-q",
        "--type",
        "luks2",
        "--key-file",
        key,
        "--cipher",
        "aes-xts-plain64",
        "--key-size",
        "512",
        "--sector-size",
        "4096",
    ];
    a.extend_from_slice(extra);
    a.push(dev);
    a
}

/// Our PBKDF on the command line (the driver's layout options aside).
const OURS_PBKDF: [&str; 4] = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"];

/// Item 1 through stock cryptsetup on the same device, for anyone to reproduce:
/// our parameters, Constellation's and cryptsetup's defaults. Each side pays two
/// tool starts, which the driver (in process) does not.
fn format_open(args: &Args, key: &Path, report: &mut Report) -> Result<()> {
    let dev = args.io_disk.to_str().ok_or("disk path")?;
    let key = key.to_str().ok_or("key path")?;
    let mut ours = OURS_PBKDF.to_vec();
    ours.extend([
        "--hash",
        "sha256",
        "--luks2-keyslots-size",
        "2M",
        "--offset",
        "32768",
    ]);
    let constellation_forced: Vec<&str> = [
        "--pbkdf",
        "argon2id",
        "--pbkdf-force-iterations",
        "3",
        "--pbkdf-memory",
        "65536",
        "--pbkdf-parallel",
        "4",
    ]
    .to_vec();
    let constellation_timed: Vec<&str> = [
        "--pbkdf",
        "argon2id",
        "--iter-time",
        "2000",
        "--pbkdf-memory",
        "65536",
        "--pbkdf-parallel",
        "4",
    ]
    .to_vec();
    // What a time of one format + open is, by median of `reps`.
    let measure = |extra: &[&str], reps: usize| -> Result<(f64, f64)> {
        let (mut f, mut o) = (Vec::new(), Vec::new());
        for _ in 0..reps {
            let a = luks_format_args(dev, key, extra);
            f.push(secs(timed_run("cryptsetup", &a)?));
            o.push(secs(timed_run(
                "cryptsetup",
                &["open", "--key-file", key, dev, "bench-fo"],
            )?));
            run("cryptsetup", &["close", "bench-fo"])?;
        }
        Ok((median(f), median(o)))
    };
    let (of, oo) = measure(&ours, 5)?;
    let constellation = match measure(&constellation_forced, 2) {
        Ok(t) => {
            report.note(
                "Constellation's parameters: cryptsetup accepted argon2id with 3 forced iterations, 64 MiB, 4 threads.",
            );
            t
        }
        Err(e) => {
            let first = e.to_string();
            let why = first
                .lines()
                .skip(1)
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .trim()
                .to_string();
            report.note(format!(
                "Constellation's parameters: cryptsetup 2.6 refuses argon2id with 3 forced iterations ({why}); \
                 measured with what Constellation's 2000 ms target gives: argon2id, --iter-time 2000, 64 MiB, 4 threads."
            ));
            measure(&constellation_timed, 2)?
        }
    };
    let (df, dopen) = measure(&[], 2)?;
    let ours_total = of + oo;
    for (name, (f, o)) in [
        ("Constellation (argon2id, 64 MiB, 4 threads)", constellation),
        ("cryptsetup defaults (argon2id, benchmarked)", (df, dopen)),
    ] {
        report
            .row(
                "1",
                format!("format + open with the cryptsetup CLI vs {name}"),
            )
            .ours(format!("{:.2} s ({:.2} + {:.2})", ours_total, of, oo))
            .baseline(format!("{:.2} s ({:.2} + {:.2})", f + o, f, o))
            .ratio((f + o) / ours_total)
            .done();
    }
    Ok(())
}

/// Item 1 as a volume costs: the driver's own `crypt::format` + `crypt::open`
/// against the same libcryptsetup calls with Constellation's parameters (its
/// disk mapper also calls libcryptsetup in process) and with libcryptsetup's
/// defaults. No tool start-up on any side.
async fn format_open_in_process(args: &Args, report: &mut Report) -> Result<()> {
    use cryptdisk_csi::crypt::{self, FormatOptions, Integrity, KeyId, MapperName, Token};
    use libcryptsetup_rs::consts::{flags::CryptPbkdf, vals::CryptKdf};
    const REPS: usize = 5;
    let name = MapperName::operator("bench-driver")?;
    let (mut f, mut o) = (Vec::new(), Vec::new());
    for _ in 0..REPS {
        // Blank the ends again so that the blank check passes.
        zero_ends(&args.io_disk)?;
        let key_id = KeyId::new_random();
        let key = cryptdisk_csi::kms::DataKey::from_bytes(random_bytes(32)?.into());
        let opts = FormatOptions {
            key_id: key_id.clone(),
            token: Token {
                key_id: key_id.to_string(),
                key_version: 1,
                kms: "bench".into(),
                content: None,
                wipe_offset: None,
                rotation: None,
                derivation: None,
            },
            integrity: Integrity::None,
            bypass_workqueues: true,
        };
        let t = Instant::now();
        let blank = crypt::probe_blank(&args.io_disk)?;
        crypt::format(blank, &key, &opts).await?;
        f.push(secs(t.elapsed()));
        let t = Instant::now();
        crypt::open(&args.io_disk, &name, &key, &crypt::OpenOptions::default()).await?;
        o.push(secs(t.elapsed()));
        crypt::close(&name).await?;
    }
    let ours = (median(f), median(o));

    // Constellation's disk mapper: argon2id, 2000 ms target, 3 iterations,
    // 64 MiB, 4 threads. Without NO_BENCHMARK libcryptsetup benchmarks to the
    // target and the iteration count is only a starting point.
    let constellation = libcryptsetup_rs::CryptPbkdfType {
        type_: CryptKdf::Argon2Id,
        hash: None,
        time_ms: 2000,
        iterations: 3,
        max_memory_kb: 65536,
        parallel_threads: 4,
        flags: CryptPbkdf::empty(),
    };
    let theirs = library_format_open(&args.io_disk, Some(&constellation), 2)?;
    let defaults = library_format_open(&args.io_disk, None, 2)?;
    let total = ours.0 + ours.1;
    for (what, (f, o)) in [
        (
            "Constellation (argon2id, 2 s target, 64 MiB, 4 threads)",
            theirs,
        ),
        ("libcryptsetup defaults (argon2id, 2 s target)", defaults),
    ] {
        report
            .row("1", format!("format + open in process vs {what}"))
            .ours(format!("{total:.2} s ({:.2} + {:.2})", ours.0, ours.1))
            .baseline(format!("{:.2} s ({f:.2} + {o:.2})", f + o))
            .ratio((f + o) / total)
            .goal_min(40.0)
            .done();
    }
    Ok(())
}

/// Median format and open times of `reps` LUKS2 volumes made by libcryptsetup
/// with `pbkdf` (its defaults when `None`): aes-xts-plain64, 512-bit key, 4K
/// sectors, one keyslot for a random 256-bit passphrase.
fn library_format_open(
    device: &Path,
    pbkdf: Option<&libcryptsetup_rs::CryptPbkdfType>,
    reps: usize,
) -> Result<(f64, f64)> {
    use libcryptsetup_rs::consts::flags::{CryptActivate, CryptDeactivate, CryptVolumeKey};
    use libcryptsetup_rs::consts::vals::EncryptionFormat;
    use libcryptsetup_rs::{CryptInit, CryptParamsLuks2, CryptParamsLuks2Ref, Either};
    let (mut f, mut o) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        zero_ends(device)?;
        let passphrase = random_bytes(32)?;
        let t = Instant::now();
        let mut cd = CryptInit::init(device)?;
        if let Some(pbkdf) = pbkdf {
            cd.settings_handle().set_pbkdf_type(pbkdf)?;
        }
        let params = CryptParamsLuks2 {
            pbkdf: None,
            integrity: None,
            integrity_params: None,
            data_alignment: 0,
            data_device: None,
            sector_size: 4096,
            label: None,
            subsystem: None,
        };
        let mut params_ref: CryptParamsLuks2Ref<'_> = (&params).try_into()?;
        cd.context_handle().format(
            EncryptionFormat::Luks2,
            ("aes", "xts-plain64"),
            None,
            Either::Right(64),
            Some(&mut params_ref),
        )?;
        // Again after the format, which may reset it: the keyslot uses it.
        if let Some(pbkdf) = pbkdf {
            cd.settings_handle().set_pbkdf_type(pbkdf)?;
        }
        cd.keyslot_handle()
            .add_by_key(None, None, &passphrase, CryptVolumeKey::empty())?;
        drop(cd);
        f.push(secs(t.elapsed()));
        let t = Instant::now();
        let mut cd = CryptInit::init(device)?;
        cd.context_handle()
            .load::<CryptParamsLuks2Ref<'_>>(Some(EncryptionFormat::Luks2), None)?;
        cd.activate_handle().activate_by_passphrase(
            Some("bench-library"),
            None,
            &passphrase,
            CryptActivate::empty(),
        )?;
        o.push(secs(t.elapsed()));
        cd.activate_handle()
            .deactivate("bench-library", CryptDeactivate::empty())?;
    }
    Ok((median(f), median(o)))
}

/// Zeros the first and last MiB of a device.
fn zero_ends(device: &Path) -> Result<()> {
    use std::io::{Seek, SeekFrom};
    use std::os::unix::fs::FileExt;
    let mut f = std::fs::OpenOptions::new().write(true).open(device)?;
    let size = f.seek(SeekFrom::End(0))?;
    let zeros = vec![0u8; 1 << 20];
    f.write_all_at(&zeros, 0)?;
    f.write_all_at(&zeros, size - zeros.len() as u64)?;
    f.sync_all()?;
    Ok(())
}

/// Item 2: NodeStage of a 10 GiB volume, against the driver's own loop attach,
/// mkfs and mount of a plain 10 GiB image on the same filesystem.
async fn stage_latency(args: &Args, csi: &mut Csi, report: &mut Report) -> Result<()> {
    const SIZE: i64 = 10 << 30;
    const REPS: usize = 5;
    for fs in ["ext4", "xfs"] {
        let fstype = if fs == "ext4" {
            FsType::Ext4
        } else {
            FsType::Xfs
        };
        let (mut enc, mut plain) = (Vec::new(), Vec::new());
        // Rep 0 is a warm-up, not counted: the first stage loads the loop,
        // dm-crypt and filesystem modules and fills caches for both sides.
        for i in 0..=REPS {
            // Alternate, so that drift in the machine's load hits both sides.
            let p = csi
                .create_published(&format!("lat-{fs}-{i}"), SIZE, fs)
                .await?;
            let e = secs(csi.stage(&p, fs).await?);
            csi.teardown(&p).await?;

            let image = args.scratch.join(format!("plain-{fs}-{i}.img"));
            let target = args.scratch.join(format!("plain-{fs}-{i}"));
            std::fs::create_dir_all(&target)?;
            std::fs::File::create(&image)?.set_len(SIZE as u64)?;
            let t = Instant::now();
            let device = mount::loopdev::attach(&image).await?;
            // What the stage does for a fresh volume, less the crypto: probe,
            // mkfs, mount.
            if mount::probe_fs(&device).await? != mount::FsProbe::Blank {
                return Err(format!("{} is not blank", device.display()).into());
            }
            mount::mkfs(&device, fstype).await?;
            mount::mount_fs(&device, &target, fstype, &[], false).await?;
            let p = secs(t.elapsed());
            if i > 0 {
                enc.push(e);
                plain.push(p);
            }
            mount::unmount(&target).await?;
            mount::loopdev::detach(&image).await?;
            std::fs::remove_file(&image)?;
        }
        let (e, p) = (median(enc), median(plain));
        report
            .row("2", format!("NodeStage 10 GiB {fs}: encrypted / plain"))
            .ours(format!("{:.2} s", e))
            .baseline(format!("{:.2} s", p))
            .ratio(e / p)
            .goal_max(1.15)
            .done();
    }
    Ok(())
}

/// Item 3: `n` stages at once, the node's peak RSS while they run.
async fn concurrent_stages(args: &Args, csi: &Csi, report: &mut Report) -> Result<()> {
    let n = args.concurrent;
    let mut published = Vec::new();
    for i in 0..n {
        published.push(
            csi.clone()
                .create_published(&format!("par-{i}"), 64 << 20, "ext4")
                .await?,
        );
    }
    // Reset the peak so that it is this step's.
    std::fs::write(format!("/proc/{}/clear_refs", args.driver_pid), "5")?;
    let t = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for p in published {
        let mut c = csi.clone();
        tasks.spawn(async move {
            let r = c.stage(&p, "ext4").await;
            (p, r)
        });
    }
    let mut failures = Vec::new();
    let mut staged = Vec::new();
    while let Some(j) = tasks.join_next().await {
        let (p, r) = j?;
        if let Err(e) = r {
            failures.push(e.to_string());
        }
        staged.push(p);
    }
    let total = t.elapsed();
    let hwm = proc_kib(args.driver_pid, "VmHWM")?;
    for p in &staged {
        csi.clone().teardown(p).await?;
    }
    if let Some(first) = failures.first() {
        report.note(format!("concurrent stages: first failure: {first}"));
    }
    report
        .row("3", format!("{n} concurrent NodeStage (64 MiB, ext4)"))
        .ours(format!(
            "{:.1} s total, {} failures",
            secs(total),
            failures.len()
        ))
        .baseline("-")
        .goal_text("0 failures", failures.is_empty())
        .done();
    report
        .row("3", "peak RSS of the node (dev) process during them")
        .ours(format!("{:.1} MiB", hwm as f64 / 1024.0))
        .baseline("64 MiB (goal)")
        .ratio(hwm as f64 / 1024.0 / 64.0)
        .goal_max(1.0)
        .done();
    Ok(())
}

struct FioResult {
    iops: f64,
    mib_s: f64,
}

/// One fio job on `device`, from `offset` on (`16M` keeps a raw job off the LUKS2
/// header that the encrypted sides open).
fn fio_job(
    device: &str,
    offset: &str,
    rw: &str,
    bs: &str,
    depth: u32,
    seconds: u32,
) -> Result<FioResult> {
    let out = run(
        "fio",
        &[
            "--name=bench",
            &format!("--filename={device}"),
            &format!("--rw={rw}"),
            &format!("--bs={bs}"),
            &format!("--iodepth={depth}"),
            "--ioengine=libaio",
            "--direct=1",
            &format!("--offset={offset}"),
            "--size=512M",
            "--time_based",
            &format!("--runtime={seconds}"),
            "--ramp_time=1",
            "--randrepeat=0",
            "--output-format=json",
        ],
    )?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let job = &v["jobs"][0];
    let side = if rw.contains("read") {
        &job["read"]
    } else {
        &job["write"]
    };
    Ok(FioResult {
        iops: side["iops"].as_f64().unwrap_or(0.0),
        mib_s: side["bw_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
    })
}

/// Item 4: fio on the raw disk, on dm-crypt with our flags (workqueue bypass) and
/// on dm-crypt with the kernel's defaults, same disk, same jobs.
fn fio(args: &Args, key: &Path, report: &mut Report) -> Result<()> {
    let dev = args.io_disk.to_str().ok_or("disk path")?;
    let key = key.to_str().ok_or("key path")?;
    run("cryptsetup", &luks_format_args(dev, key, &OURS_PBKDF))?;
    let jobs = [
        ("4K random read", "randread", "4k", 16),
        ("4K random write", "randwrite", "4k", 16),
        ("1M sequential read", "read", "1m", 4),
        ("1M sequential write", "write", "1m", 4),
    ];
    let open = |bypass: bool| -> Result<String> {
        let mut a = vec!["open", "--key-file", key];
        if bypass {
            a.extend(["--perf-no_read_workqueue", "--perf-no_write_workqueue"]);
        }
        a.extend([dev, "bench-fio"]);
        run("cryptsetup", &a)?;
        Ok("/dev/mapper/bench-fio".into())
    };
    let mut results: Vec<[FioResult; 3]> = Vec::new();
    for (name, rw, bs, depth) in jobs {
        // The raw disk's job writes over the header: the LUKS side opens the
        // mapping first, runs, and the raw side runs last for each job, then the
        // header is written again.
        let bypass_dev = open(true)?;
        let bypass = fio_job(&bypass_dev, "0", rw, bs, depth, args.fio_seconds)?;
        run("cryptsetup", &["close", "bench-fio"])?;
        let default_dev = open(false)?;
        let default = fio_job(&default_dev, "0", rw, bs, depth, args.fio_seconds)?;
        run("cryptsetup", &["close", "bench-fio"])?;
        // The raw job starts past the header so that the LUKS2 header survives.
        let raw = fio_job(dev, "16M", rw, bs, depth, args.fio_seconds)?;
        println!(
            "bench: fio {name}: raw {:.0} IOPS {:.1} MiB/s, bypass {:.0} IOPS {:.1} MiB/s, default {:.0} IOPS {:.1} MiB/s",
            raw.iops, raw.mib_s, bypass.iops, bypass.mib_s, default.iops, default.mib_s
        );
        results.push([raw, bypass, default]);
    }
    for ((name, ..), [raw, bypass, default]) in jobs.iter().zip(&results) {
        let (unit, r, b, d) = if name.starts_with("4K") {
            ("IOPS", raw.iops, bypass.iops, default.iops)
        } else {
            ("MiB/s", raw.mib_s, bypass.mib_s, default.mib_s)
        };
        report
            .row("4", format!("fio {name}: encrypted (our flags) / raw"))
            .ours(format!("{b:.0} {unit}"))
            .baseline(format!("{r:.0} {unit}"))
            .ratio(b / r)
            .done();
        report
            .row(
                "4",
                format!("fio {name}: workqueue bypass / dm-crypt defaults"),
            )
            .ours(format!("{b:.0} {unit}"))
            .baseline(format!("{d:.0} {unit}"))
            .ratio(b / d)
            .done();
    }
    Ok(())
}

/// Item 5 (our side): idle RSS, and CreateVolume + DeleteVolume pairs per second
/// from a few concurrent clients.
async fn controller_throughput(csi: &Csi, idle_kib: u64, report: &mut Report) -> Result<()> {
    const CLIENTS: usize = 4;
    const PER_CLIENT: usize = 50;
    let t = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..CLIENTS {
        let mut csi = csi.clone();
        tasks.spawn(async move {
            for i in 0..PER_CLIENT {
                let v = csi.create(&format!("tp-{c}-{i}"), 1 << 30, "ext4").await?;
                csi.delete(&v.volume_id).await?;
            }
            Result::<()>::Ok(())
        });
    }
    while let Some(j) = tasks.join_next().await {
        j??;
    }
    let per_s = (CLIENTS * PER_CLIENT) as f64 / secs(t.elapsed());
    report
        .row("5", "idle RSS of cryptdisk-csi dev")
        .ours(format!("{:.1} MiB", idle_kib as f64 / 1024.0))
        .baseline("hostpathplugin: not measured")
        .done();
    report
        .row(
            "5",
            format!("CreateVolume + DeleteVolume pairs/s ({CLIENTS} clients)"),
        )
        .ours(format!("{per_s:.0} /s"))
        .baseline("hostpathplugin: not measured")
        .done();
    Ok(())
}

/// Item 6: the driver's integrity wipe through dm-integrity, against the same
/// writer on the raw disk.
fn integrity_wipe(args: &Args, key: &Path, report: &mut Report) -> Result<()> {
    let dev = args.wipe_disk.to_str().ok_or("disk path")?;
    let key_s = key.to_str().ok_or("key path")?;
    let fill = |path: &Path| -> Result<(u64, Duration)> {
        let progress = wipe::Progress::default();
        let t = Instant::now();
        wipe::zero_fill(
            path,
            0,
            &progress,
            &std::sync::atomic::AtomicBool::new(false),
            |_| Ok(()),
        )?;
        Ok((
            progress.total.load(std::sync::atomic::Ordering::Relaxed),
            t.elapsed(),
        ))
    };
    let (raw_bytes, raw_t) = fill(&args.wipe_disk)?;
    let mut integrity = vec!["--integrity", "hmac-sha256", "--integrity-no-wipe"];
    integrity.extend(OURS_PBKDF);
    run("cryptsetup", &luks_format_args(dev, key_s, &integrity))?;
    run(
        "cryptsetup",
        &["open", "--key-file", key_s, dev, "bench-wipe"],
    )?;
    let wiped = fill(Path::new("/dev/mapper/bench-wipe"));
    run("cryptsetup", &["close", "bench-wipe"])?;
    let (int_bytes, int_t) = wiped?;
    let raw_mib = raw_bytes as f64 / 1048576.0 / secs(raw_t);
    let int_mib = int_bytes as f64 / 1048576.0 / secs(int_t);
    report
        .row("6", "integrity wipe / raw write of the same disk")
        .ours(format!("{int_mib:.1} MiB/s ({} MiB)", int_bytes >> 20))
        .baseline(format!("{raw_mib:.1} MiB/s ({} MiB)", raw_bytes >> 20))
        .ratio(int_mib / raw_mib)
        .done();
    Ok(())
}

fn markdown(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Ratios of figures measured side by side in one run, in a qemu TCG VM (software \
         emulation, AES included, 2 vCPUs), {} build. Absolute times are not hardware \
         figures.\n",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    let _ = writeln!(
        s,
        "| # | measure | ours | baseline | ratio | goal | met |\n|---|---|---|---|---|---|---|"
    );
    for row in &r.rows {
        let (goal, met) = match &row.goal {
            Some((g, m)) => (g.clone(), if *m { "yes" } else { "**no**" }),
            None => ("-".into(), "-"),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} |",
            row.item,
            row.what,
            row.ours,
            row.baseline,
            row.ratio.map(|x| format!("{x:.3}")).unwrap_or("-".into()),
            goal,
            met
        );
    }
    if !r.notes.is_empty() {
        s.push('\n');
        for n in &r.notes {
            let _ = writeln!(s, "- {n}");
        }
    }
    s
}

/// A horizontal bar per ratio on a log scale, with its goal as a tick.
fn svg(r: &Report) -> String {
    let rows: Vec<&Row> = r.rows.iter().filter(|x| x.ratio.is_some()).collect();
    let (label_w, bar_w, row_h, top) = (430.0, 420.0, 22.0, 40.0);
    let height = top + row_h * rows.len() as f64 + 40.0;
    let width = label_w + bar_w + 80.0;
    // log10 scale from 0.01 to 1000.
    let x = |v: f64| label_w + (v.max(0.01).log10() + 2.0) / 5.0 * bar_w;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        s,
        r#"<text x="10" y="20" font-size="14">cryptdisk-csi benchmark ratios (log scale; the line at 1; goals as red ticks; TCG emulation)</text>"#
    );
    for d in [0.01, 0.1, 1.0, 10.0, 100.0, 1000.0] {
        let _ = writeln!(
            s,
            r##"<line x1="{0}" y1="{top}" x2="{0}" y2="{1}" stroke="{2}"/><text x="{0}" y="{3}" text-anchor="middle">{d}</text>"##,
            x(d),
            height - 30.0,
            if d == 1.0 { "#000" } else { "#ddd" },
            height - 15.0
        );
    }
    for (i, row) in rows.iter().enumerate() {
        let y = top + row_h * i as f64;
        let v = row.ratio.unwrap_or(1.0);
        let (x0, x1) = (x(1.0).min(x(v)), x(1.0).max(x(v)));
        let color = match &row.goal {
            Some((_, true)) => "#3a7",
            Some((_, false)) => "#d54",
            None => "#68a",
        };
        let label = format!("{} {}", row.item, row.what)
            .replace('&', "&amp;")
            .replace('<', "&lt;");
        let _ = writeln!(
            s,
            r#"<text x="10" y="{}">{label}</text><rect x="{x0}" y="{}" width="{}" height="{}" fill="{color}"/><text x="{}" y="{}">{v:.3}</text>"#,
            y + 15.0,
            y + 4.0,
            (x1 - x0).max(1.0),
            row_h - 8.0,
            x1 + 4.0,
            y + 15.0
        );
        if let Some((goal, _)) = &row.goal
            && let Some(g) = goal.trim_start_matches(['≥', '≤', ' ']).parse::<f64>().ok()
        {
            let _ = writeln!(
                s,
                r##"<line x1="{0}" y1="{1}" x2="{0}" y2="{2}" stroke="#c00" stroke-width="2"/>"##,
                x(g),
                y + 1.0,
                y + row_h - 1.0
            );
        }
    }
    s.push_str("</svg>\n");
    s
}
