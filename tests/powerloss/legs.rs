//! The guest side of the power-loss tier: the crash points ("legs"), how boot 1
//! drives each to its point and crashes the kernel, and what boot 2 requires.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use cryptdisk_csi::crypt;
use cryptdisk_csi::crypt::header::{self, Copies};
use cryptdisk_csi::proto::csi::volume_capability::access_mode::Mode;
use cryptdisk_csi::proto::csi::*;
use serde_json::json;

use crate::lifecycle_cases::{
    Driver, MIB, Staged, attach_req, create_attached, create_req, image_of, mount_cap, provision,
    publish, release, stage,
};
use crate::node_cases::{dev_key, grow, integrity_req, stage_until_wiped, stats, total_bytes};
use crate::{CaseResult, check, ensure};

/// The boots: each runs its legs in one VM pair. A scenario holds at most one
/// timed first-format leg (`format@<ms>ms`), which must run alone when the
/// kernel goes down; the others stop at a failpoint first.
pub const SCENARIOS: &[&[&str]] = &[
    &[
        "format@0ms",
        "format:header-written",
        "rotate:intent",
        "create:image-built",
    ],
    &[
        "format@150ms",
        "format:keyslot-added",
        "rotate:added",
        "create:committed",
    ],
    &[
        "format@300ms",
        "format:before-token",
        "rotate:switched",
        "expand:device-grown",
    ],
    &[
        "format@500ms",
        "stage:mkfs-done",
        "rotate:destroyed",
        "expand:mapping-grown",
    ],
    &["format@800ms", "wipe:checkpoint"],
];

/// The driver's own debug lines without the gRPC transport's.
const LOG_LEVEL: &str = "--log-level=info,cryptdisk_csi=debug";
/// The driver's log line just before the first format's libcryptsetup calls.
const FORMAT_BEGINS: &str = "formatting a blank device";
/// Where the persistent disk is mounted in the guest.
const MNT: &str = "/mnt/powerloss";
/// Written without a sync just before the crash; boot 2 must not find it whole.
const CONTROL_BYTES: usize = 1 << 20;
/// Records written (each synced) before the operation a leg crashes.
const RECORDS: u64 = 64;
const EXPAND_FROM: i64 = 48 * MIB;
const EXPAND_TO: i64 = 96 * MIB;

/// A leg's name as a file name.
pub fn slug(leg: &str) -> String {
    leg.replace([':', '@'], "-")
}

/// What a leg does, from its name.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    /// The first stage's format, crashed this long after [`FORMAT_BEGINS`].
    Timed(Duration),
    /// The first stage stopped at a failpoint (format steps, before the content mark).
    FirstStage,
    /// The first stage of an integrity volume, stopped at a wipe checkpoint.
    Wipe,
    /// A key rotation step, at the stage after a master-secret version was added.
    Rotate,
    /// A NodeExpandVolume step.
    Expand,
    /// A CreateVolume step of the local backend (image and index writes).
    Create,
}

struct Leg {
    name: String,
    kind: Kind,
    dir: PathBuf,
    share: PathBuf,
}

impl Leg {
    fn new(name: &str, share: &Path) -> Result<Leg, String> {
        let kind = if let Some(ms) = name
            .strip_prefix("format@")
            .and_then(|r| r.strip_suffix("ms"))
        {
            Kind::Timed(Duration::from_millis(check!(ms.parse::<u64>())))
        } else if name.starts_with("format:") || name == "stage:mkfs-done" {
            Kind::FirstStage
        } else if name == "wipe:checkpoint" {
            Kind::Wipe
        } else if name.starts_with("rotate:") {
            Kind::Rotate
        } else if name.starts_with("expand:") {
            Kind::Expand
        } else if name.starts_with("create:") {
            Kind::Create
        } else {
            return Err(format!("unknown leg {name}"));
        };
        Ok(Leg {
            name: name.to_string(),
            kind,
            dir: Path::new(MNT).join(slug(name)),
            share: share.to_path_buf(),
        })
    }

    /// The failpoint setting of the driver that goes down with the kernel.
    fn pause(&self) -> Option<String> {
        (!matches!(self.kind, Kind::Timed(_))).then(|| format!("{}=pause", self.name))
    }

    fn req(&self) -> CreateVolumeRequest {
        let name = format!("pvc-{}", slug(&self.name));
        match self.kind {
            Kind::Wipe => integrity_req(&name),
            Kind::Expand => create_req(
                &name,
                EXPAND_FROM,
                mount_cap("ext4", Mode::SingleNodeWriter),
            ),
            _ => create_req(&name, 32 * MIB, mount_cap("ext4", Mode::SingleNodeWriter)),
        }
    }

    /// The driver's log lives on the host's share (whose writes are synchronous),
    /// so boot 1's survives the crash: `driver.log` is a link to this boot's file.
    fn link_log(&self, boot: &str) -> CaseResult {
        check!(std::fs::create_dir_all(&self.dir));
        let link = self.dir.join("driver.log");
        let _ = std::fs::remove_file(&link);
        let target = self.share.join(format!("{}.{boot}.log", slug(&self.name)));
        check!(std::os::unix::fs::symlink(target, link));
        Ok(())
    }

    fn wipe_flags(&self) -> (Vec<&'static str>, Vec<(&'static str, &'static str)>) {
        if self.kind == Kind::Wipe {
            // Paced so that the first checkpoint (64 MiB) comes after the stage's
            // budget has answered, as in the VM tier's wipe case.
            (
                vec![LOG_LEVEL, "--wipe-budget-seconds=1"],
                vec![("CRYPTDISK_TEST_WIPE_MIB_PER_S", "32")],
            )
        } else {
            (vec![LOG_LEVEL], vec![])
        }
    }

    /// The volume boot 1 made, kept on the share for boot 2.
    fn save(&self, volume: &Volume, publish_context: &HashMap<String, String>) -> CaseResult {
        let record = json!({
            "volume_id": volume.volume_id,
            "capacity_bytes": volume.capacity_bytes,
            "volume_context": volume.volume_context,
            "publish_context": publish_context,
        });
        check!(std::fs::write(
            self.share.join(format!("{}.volume.json", slug(&self.name))),
            record.to_string()
        ));
        Ok(())
    }

    fn load(&self) -> Result<(Volume, HashMap<String, String>), String> {
        let text = check!(std::fs::read_to_string(
            self.share.join(format!("{}.volume.json", slug(&self.name)))
        ));
        let v: serde_json::Value = check!(serde_json::from_str(&text));
        let map = |v: &serde_json::Value| -> HashMap<String, String> {
            v.as_object()
                .map(|o| {
                    o.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                        .collect()
                })
                .unwrap_or_default()
        };
        let volume = Volume {
            volume_id: v["volume_id"].as_str().unwrap_or_default().to_string(),
            capacity_bytes: v["capacity_bytes"].as_i64().unwrap_or_default(),
            volume_context: map(&v["volume_context"]),
            ..Default::default()
        };
        Ok((volume, map(&v["publish_context"])))
    }

    /// Staging and target paths as `provision` lays them out.
    fn staged(
        &self,
        d: &Driver,
        volume: Volume,
        publish_context: HashMap<String, String>,
    ) -> Result<Staged, String> {
        let req = self.req();
        let base = d.dir.join("kubelet").join(&req.name);
        let staging = base.join("staging");
        check!(std::fs::create_dir_all(&staging));
        Ok(Staged {
            volume,
            publish_context,
            staging,
            target: base.join("target"),
            cap: req.volume_capabilities[0].clone(),
        })
    }
}

/// `boot1|boot2 INDEX SHARE LEG...`, run inside the VM.
pub fn guest(args: &[String]) -> ExitCode {
    if let Ok(filter) = std::env::var("CRYPTDISK_VM_TEST_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    }
    let [which, _index, share, names @ ..] = args else {
        eprintln!("powerloss: usage: boot1|boot2 INDEX SHARE LEG...");
        return ExitCode::from(2);
    };
    let legs: Result<Vec<Leg>, String> = names
        .iter()
        .map(|n| Leg::new(n, Path::new(share)))
        .collect();
    let legs = match legs {
        Ok(l) => l,
        Err(e) => {
            eprintln!("powerloss: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match which.as_str() {
        "boot1" => runtime.block_on(boot1(legs)),
        "boot2" => runtime.block_on(boot2(legs)),
        other => {
            eprintln!("powerloss: unknown boot {other}");
            ExitCode::from(2)
        }
    }
}

fn disk() -> Result<String, String> {
    std::env::var("CRYPTDISK_VM_DISKS")
        .unwrap_or_default()
        .split_whitespace()
        .next()
        .map(str::to_string)
        .ok_or_else(|| "no persistent disk attached".to_string())
}

fn run(cmd: &str, args: &[&str]) -> CaseResult {
    let out = check!(Command::new(cmd).args(args).output());
    ensure!(
        out.status.success(),
        "{cmd} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn failed(leg: &str, why: &str) {
    println!(
        "powerloss leg {leg} ... FAILED\n    {}",
        why.replace('\n', " ")
    );
}

/// A leg driven up to its crash point, with what boot 1 still holds of it.
struct Armed {
    leg: Leg,
    driver: Driver,
    staged: Option<Staged>,
    volume: Option<(Volume, HashMap<String, String>)>,
}

async fn boot1(legs: Vec<Leg>) -> ExitCode {
    if let Err(e) = prepare_disk() {
        for leg in &legs {
            failed(&leg.name, &format!("boot 1: {e}"));
        }
        return ExitCode::FAILURE;
    }
    // A: everything the crash must not touch: drivers, volumes, their data.
    let mut ready = Vec::new();
    for leg in legs {
        match before(leg).await {
            Ok(a) => ready.push(a),
            Err((leg, e)) => failed(&leg, &format!("boot 1: {e}")),
        }
    }
    // That much is on the disk; from here on only what the driver flushes is.
    nix::unistd::sync();
    // B: each paused leg up to its failpoint; the threads stay there.
    let mut held = Vec::new();
    let mut timed = None;
    for a in ready {
        if matches!(a.leg.kind, Kind::Timed(_)) {
            timed = Some(a);
            continue;
        }
        let name = a.leg.name.clone();
        match arm(a).await {
            Ok(a) => {
                println!("powerloss leg {name} armed");
                held.push(a);
            }
            Err(e) => failed(&name, &format!("boot 1: {e}")),
        }
    }
    // C: the timed format, alone, and the crash.
    let mut why = format!("{} legs paused", held.len());
    if let Some(a) = timed {
        let name = a.leg.name.clone();
        match fire(&a).await {
            Ok(after) => {
                println!("powerloss leg {name} armed");
                why += &format!(
                    "; {name} crashed {} ms after its format began",
                    after.as_millis()
                );
            }
            Err(e) => failed(&name, &format!("boot 1: {e}")),
        }
        held.push(a);
    }
    crash(&why, held)
}

fn prepare_disk() -> CaseResult {
    let disk = disk()?;
    run("mkfs.ext4", &["-q", "-F", &disk])?;
    check!(std::fs::create_dir_all(MNT));
    // A long journal commit interval and no periodic writeback: nothing reaches
    // the disk between the legs' pauses and the crash unless it is flushed.
    run("mount", &["-o", "commit=600", &disk, MNT])?;
    check!(std::fs::write(
        "/proc/sys/vm/dirty_writeback_centisecs",
        "0"
    ));
    Ok(())
}

/// Stage A of a leg: its driver, and the volume and data the operation works on.
async fn before(leg: Leg) -> Result<Armed, (String, String)> {
    let name = leg.name.clone();
    before_inner(leg).await.map_err(|e| (name, e))
}

async fn before_inner(leg: Leg) -> Result<Armed, String> {
    leg.link_log("boot1")?;
    let (flags, env) = leg.wipe_flags();
    match leg.kind {
        Kind::Timed(_) | Kind::FirstStage | Kind::Wipe => {
            let mut d =
                Driver::start_with(leg.dir.clone(), leg.pause().as_deref(), &flags, &env).await?;
            let (volume, ctx) = create_attached(&mut d.controller, leg.req()).await?;
            leg.save(&volume, &ctx)?;
            Ok(Armed {
                leg,
                driver: d,
                staged: None,
                volume: Some((volume, ctx)),
            })
        }
        Kind::Create => {
            let d =
                Driver::start_with(leg.dir.clone(), leg.pause().as_deref(), &flags, &env).await?;
            Ok(Armed {
                leg,
                driver: d,
                staged: None,
                volume: None,
            })
        }
        Kind::Expand => {
            let mut d =
                Driver::start_with(leg.dir.clone(), leg.pause().as_deref(), &flags, &env).await?;
            let s = provision(&mut d, leg.req()).await?;
            leg.save(&s.volume, &s.publish_context)?;
            Ok(Armed {
                leg,
                driver: d,
                staged: Some(s),
                volume: None,
            })
        }
        Kind::Rotate => {
            let mut d = Driver::start_with(leg.dir.clone(), None, &[LOG_LEVEL], &[]).await?;
            let s = provision(&mut d, leg.req()).await?;
            write_records(&s.target.join("records"))?;
            release(&mut d, &s).await?;
            leg.save(&s.volume, &s.publish_context)?;
            drop(d);
            add_key_version(&leg.dir)?;
            let d =
                Driver::start_with(leg.dir.clone(), leg.pause().as_deref(), &flags, &env).await?;
            Ok(Armed {
                leg,
                driver: d,
                staged: Some(s),
                volume: None,
            })
        }
    }
}

/// Stage B: starts the operation and waits until its thread pauses at the point.
async fn arm(a: Armed) -> Result<Armed, String> {
    let mut node = a.driver.node.clone();
    let mut controller = a.driver.controller.clone();
    match a.leg.kind {
        Kind::FirstStage | Kind::Wipe => {
            let (volume, ctx) = a.volume.clone().ok_or("no volume")?;
            let s = a.leg.staged(&a.driver, volume, ctx)?;
            tokio::spawn(async move {
                let _ = node.node_stage_volume(stage_req(&s)).await;
            });
        }
        Kind::Create => {
            let req = a.leg.req();
            tokio::spawn(async move {
                let _ = controller.create_volume(req).await;
            });
        }
        Kind::Rotate => {
            let s = a.staged.as_ref().ok_or("no volume")?;
            check!(
                controller
                    .controller_publish_volume(attach_req(&s.volume.volume_id, &s.cap))
                    .await
            );
            let req = stage_req(s);
            tokio::spawn(async move {
                let _ = node.node_stage_volume(req).await;
            });
        }
        Kind::Expand => {
            let s = a.staged.as_ref().ok_or("no volume")?;
            // Synced one by one: each must be there after the crash.
            write_records(&s.target.join("records"))?;
            let range = CapacityRange {
                required_bytes: EXPAND_TO,
                limit_bytes: 0,
            };
            check!(
                controller
                    .controller_expand_volume(ControllerExpandVolumeRequest {
                        volume_id: s.volume.volume_id.clone(),
                        capacity_range: Some(range),
                        volume_capability: Some(s.cap.clone()),
                        ..Default::default()
                    })
                    .await
            );
            let req = NodeExpandVolumeRequest {
                volume_id: s.volume.volume_id.clone(),
                volume_path: s.target.display().to_string(),
                capacity_range: Some(range),
                staging_target_path: s.staging.display().to_string(),
                volume_capability: Some(s.cap.clone()),
                ..Default::default()
            };
            tokio::spawn(async move {
                let _ = node.node_expand_volume(req).await;
            });
        }
        Kind::Timed(_) => return Err("a timed leg is not paused".into()),
    }
    wait_log(
        &a.driver,
        &format!("failpoint {}: paused", a.leg.name),
        Duration::from_secs(180),
    )
    .await?;
    Ok(a)
}

/// Stage C: starts the first stage and returns once the format has run for the
/// leg's delay; the caller crashes the kernel then.
async fn fire(a: &Armed) -> Result<Duration, String> {
    let Kind::Timed(delay) = a.leg.kind else {
        return Err("not a timed leg".into());
    };
    let (volume, ctx) = a.volume.clone().ok_or("no volume")?;
    let s = a.leg.staged(&a.driver, volume, ctx)?;
    let mut node = a.driver.node.clone();
    tokio::spawn(async move {
        let _ = node.node_stage_volume(stage_req(&s)).await;
    });
    wait_log(&a.driver, FORMAT_BEGINS, Duration::from_secs(120)).await?;
    let began = Instant::now();
    tokio::time::sleep(delay).await;
    Ok(began.elapsed())
}

fn stage_req(s: &Staged) -> NodeStageVolumeRequest {
    NodeStageVolumeRequest {
        volume_id: s.volume.volume_id.clone(),
        publish_context: s.publish_context.clone(),
        staging_target_path: s.staging.display().to_string(),
        volume_capability: Some(s.cap.clone()),
        volume_context: s.volume.volume_context.clone(),
        ..Default::default()
    }
}

async fn wait_log(d: &Driver, needle: &str, limit: Duration) -> CaseResult {
    let deadline = Instant::now() + limit;
    loop {
        let log = d.log();
        if log.contains(needle) {
            return Ok(());
        }
        if log.contains("failpoint ") && log.contains(": aborting") {
            return Err(format!("the driver aborted before {needle:?}"));
        }
        ensure!(
            Instant::now() < deadline,
            "no {needle:?} in the driver log after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Writes the unsynced control file, leaves the crash mark for hack/vm/run,
/// and resets the machine with no sync. `held` keeps the drivers alive (their
/// Drop would stop them) until the kernel is gone.
fn crash(why: &str, held: Vec<Armed>) -> ExitCode {
    let control = vec![0xa5u8; CONTROL_BYTES];
    if let Err(e) = std::fs::write(Path::new(MNT).join("control"), &control) {
        eprintln!("powerloss: cannot write the control file: {e}");
    }
    if let Ok(mark) = std::env::var("CRYPTDISK_VM_CRASH_MARK") {
        let _ = std::fs::write(mark, why);
    }
    eprintln!("powerloss: crashing the kernel: {why}");
    let _ = std::io::stderr().flush();
    let r = std::fs::write("/proc/sysrq-trigger", "b");
    std::thread::sleep(Duration::from_secs(10));
    drop(held);
    eprintln!("powerloss: the kernel did not go down ({r:?})");
    ExitCode::FAILURE
}

fn write_records(file: &Path) -> CaseResult {
    let mut f = check!(std::fs::File::create(file));
    for n in 0..RECORDS {
        let mut record = vec![(n % 251) as u8; 4096];
        record[..8].copy_from_slice(&n.to_le_bytes());
        check!(f.write_all(&record));
        check!(f.sync_data());
    }
    check!(f.sync_all());
    Ok(())
}

fn add_key_version(dir: &Path) -> CaseResult {
    let out = check!(
        Command::new(env!("CARGO_BIN_EXE_cryptdisk-csi"))
            .arg("add-key-version")
            .arg(format!(
                "--master-secret-file={}",
                dir.join("data/kms/master.key").display()
            ))
            .output()
    );
    ensure!(
        out.status.success(),
        "add-key-version: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

async fn boot2(legs: Vec<Leg>) -> ExitCode {
    let mounted = disk().and_then(|d| {
        check!(std::fs::create_dir_all(MNT));
        run("mount", &[&d, MNT])
    });
    // The crash must have lost what was not flushed, or no leg proves anything.
    let control = mounted.and_then(|()| {
        let left = std::fs::read(Path::new(MNT).join("control")).unwrap_or_default();
        ensure!(
            !(left.len() == CONTROL_BYTES && left.iter().all(|&b| b == 0xa5)),
            "the control file written without a sync survived the crash whole: \
             this run cannot tell a flushed write from an unflushed one"
        );
        Ok(())
    });
    let mut all = true;
    for leg in legs {
        let t = Instant::now();
        let result = match &control {
            Err(e) => Err(e.clone()),
            Ok(()) => after(&leg).await,
        };
        let secs = t.elapsed().as_secs_f64();
        match result {
            Ok(()) => println!("powerloss leg {} ... ok ({secs:.1} s)", leg.name),
            Err(e) => {
                all = false;
                failed(&leg.name, &format!("boot 2: {e}"));
            }
        }
    }
    if all {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// What the crash left of a leg's volume, before any driver touches it: the
/// header copies, their sequence id, the token's marks (for the report).
fn found(leg: &Leg) -> String {
    let image = match leg.load() {
        Ok((volume, _)) => {
            let disk = volume
                .volume_id
                .rsplit(':')
                .next()
                .unwrap_or_default()
                .to_string();
            leg.dir.join("data/disks").join(format!("{disk}.img"))
        }
        Err(_) => {
            let files: Vec<String> = std::fs::read_dir(leg.dir.join("data/disks"))
                .map(|rd| {
                    rd.filter_map(|e| e.ok())
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            let index = std::fs::read_to_string(leg.dir.join("data/index.json"))
                .map(|t| format!("{} bytes", t.len()))
                .unwrap_or_else(|e| e.to_string());
            return format!("data/disks {files:?}, index.json {index}");
        }
    };
    match header::read(&image) {
        Err(e) => format!("no header read ({e}); {}", raw_copies(&image)),
        Ok(h) => {
            let tokens = h.json["tokens"].as_object().map(|t| {
                t.values()
                    .map(|v| {
                        let mut v = v.clone();
                        if let Some(o) = v.as_object_mut() {
                            o.remove("kms");
                            o.remove("key_id");
                        }
                        v.to_string()
                    })
                    .collect::<Vec<_>>()
            });
            let slots = h.json["keyslots"].as_object().map_or(0, |o| o.len());
            format!(
                "copies {:?}, chosen seqid {}, {slots} keyslots, tokens {tokens:?}",
                h.copies, h.seqid
            )
        }
    }
}

/// Both header copies as they lie on the disk, for a header the reader refuses:
/// magic, sequence id, and the JSON's keyslots and tokens.
fn raw_copies(image: &Path) -> String {
    use std::os::unix::fs::FileExt;
    let Ok(f) = std::fs::File::open(image) else {
        return "image unreadable".into();
    };
    let mut out = Vec::new();
    for (name, at) in [("primary", 0u64), ("secondary", 16 << 10)] {
        let mut b = vec![0u8; 16 << 10];
        if f.read_exact_at(&mut b, at).is_err() {
            out.push(format!("{name}: unreadable"));
            continue;
        }
        let seqid = u64::from_be_bytes(b[16..24].try_into().expect("8 bytes"));
        let text = &b[4096..];
        let end = text.iter().position(|&c| c == 0).unwrap_or(text.len());
        let summary = match serde_json::from_slice::<serde_json::Value>(&text[..end]) {
            Ok(j) => {
                let keys = |k: &str| j[k].as_object().map_or(0, |o| o.len());
                format!("{} keyslots, {} tokens", keys("keyslots"), keys("tokens"))
            }
            Err(e) => format!("JSON unreadable ({e})"),
        };
        out.push(format!(
            "{name}: magic {:?} seqid {seqid}, {summary}",
            String::from_utf8_lossy(&b[..6])
        ));
    }
    out.join("; ")
}

/// Boot 2 of a leg: drive the operation again and check where it landed.
async fn after(leg: &Leg) -> CaseResult {
    println!("powerloss leg {} found: {}", leg.name, found(leg));
    leg.link_log("boot2")?;
    let mut d = Driver::start_with(leg.dir.clone(), None, &[LOG_LEVEL], &[]).await?;
    let (s, version, records) = match leg.kind {
        Kind::Timed(_) | Kind::FirstStage | Kind::Wipe | Kind::Create => {
            let (volume, ctx) = create_attached(&mut d.controller, leg.req()).await?;
            if leg.kind != Kind::Create {
                let (was, _) = leg.load()?;
                ensure!(
                    volume.volume_id == was.volume_id,
                    "CreateVolume now gives {}, boot 1 made {}",
                    volume.volume_id,
                    was.volume_id
                );
            }
            let s = leg.staged(&d, volume, ctx)?;
            if leg.kind == Kind::Wipe {
                stage_until_wiped(&mut d, &s.volume, &s.publish_context, &s.staging, &s.cap)
                    .await?;
            } else {
                stage(&mut d, &s.volume, &s.publish_context, &s.staging, &s.cap).await?;
            }
            publish(&mut d, &s, false).await?;
            // The volume takes data now.
            write_records(&s.target.join("records"))?;
            (s, 1, true)
        }
        Kind::Rotate => {
            // The stage finishes the rotation the crash cut short.
            let s = provision(&mut d, leg.req()).await?;
            (s, 2, true)
        }
        Kind::Expand => {
            let (volume, ctx) = leg.load()?;
            let s = leg.staged(&d, volume, ctx)?;
            check!(
                d.controller
                    .controller_publish_volume(attach_req(&s.volume.volume_id, &s.cap))
                    .await
            );
            stage(&mut d, &s.volume, &s.publish_context, &s.staging, &s.cap).await?;
            publish(&mut d, &s, false).await?;
            grow(&mut d, &s, EXPAND_TO).await?;
            let total = total_bytes(&stats(&mut d, &s).await?);
            ensure!(
                total > EXPAND_FROM + 40 * MIB,
                "the file system holds {total} bytes after the growth to {EXPAND_TO}"
            );
            (s, 1, true)
        }
    };
    if records {
        crate::node_cases::verify_records(&s.target.join("records"), RECORDS)?;
    }
    release(&mut d, &s).await?;
    settled(&mut d, &s, leg, version).await
}

/// No half-done state: the header copies agree, the token carries no rotation
/// or wipe mark and names the expected key version and content, one keyslot
/// (the old one went if a rotation ran), the backend's images are exactly its
/// volumes, and the file system checks clean.
async fn settled(d: &mut Driver, s: &Staged, leg: &Leg, version: u32) -> CaseResult {
    let image = image_of(d, &s.volume.volume_id);
    let h = check!(header::read(&image));
    ensure!(
        h.copies == Copies::Agree,
        "the header copies stand {:?} at seqid {}",
        h.copies,
        h.seqid
    );
    let info = check!(crypt::read_header(&image).await);
    let token = info.token.ok_or("no cryptdisk token")?;
    ensure!(
        token.rotation.is_none() && token.wipe_offset.is_none(),
        "marks left in the token: rotation {:?}, wipe_offset {:?}",
        token.rotation,
        token.wipe_offset
    );
    ensure!(
        token.key_version == version && token.content.as_deref() == Some("ext4"),
        "token: key_version {} (expected {version}), content {:?}",
        token.key_version,
        token.content
    );
    let slots = h.json["keyslots"].as_object().map_or(0, |o| o.len());
    ensure!(slots == 1, "{slots} keyslots");
    // Volumes of this driver are v2: bound to their own id as scope.
    let (scope, v2) = (&s.volume.volume_id, cryptdisk_csi::kms::Derivation::V2);
    ensure!(
        token.derivation() == v2,
        "token derivation {:?}",
        token.derivation
    );
    let key = dev_key(&leg.dir, scope, info.key_id.as_str(), version, v2)?;
    check!(crypt::verify_key(&image, &key).await);
    if version > 1 {
        let old = dev_key(&leg.dir, scope, info.key_id.as_str(), version - 1, v2)?;
        ensure!(
            crypt::verify_key(&image, &old).await.is_err(),
            "the retired key still opens the volume"
        );
    }

    let listed = check!(
        d.controller
            .list_volumes(ListVolumesRequest::default())
            .await
    )
    .into_inner()
    .entries
    .len();
    let files: Vec<String> = check!(std::fs::read_dir(leg.dir.join("data/disks")))
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    ensure!(
        listed == 1 && files.len() == 1 && files[0].ends_with(".img"),
        "{listed} volumes listed, files in data/disks: {files:?}"
    );
    fsck(&image, &key)
}

/// `e2fsck -fn` of the volume's file system, opened read-only with stock
/// cryptsetup.
fn fsck(image: &Path, key: &cryptdisk_csi::kms::DataKey) -> CaseResult {
    use std::os::unix::fs::OpenOptionsExt;
    let key_file = Path::new("/run/powerloss.key");
    {
        let mut f = check!(
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(key_file)
        );
        check!(f.write_all(key.expose()));
    }
    let image = image.display().to_string();
    let key_arg = key_file.display().to_string();
    let opened = run(
        "cryptsetup",
        &[
            "open",
            "--readonly",
            "--key-file",
            &key_arg,
            &image,
            "powerloss-fsck",
        ],
    );
    let _ = std::fs::remove_file(key_file);
    opened?;
    let checked = run("e2fsck", &["-fn", "/dev/mapper/powerloss-fsck"]);
    let closed = run("cryptsetup", &["close", "powerloss-fsck"]);
    checked.and(closed)
}
