//! The power-loss tier: what survives when the node's kernel goes down.
//!
//! The crash cases of the VM tier kill the driver process, so every write the
//! kernel accepted still lands. Here the whole guest kernel stops (`echo b >
//! /proc/sysrq-trigger`, no sync) in the middle of an operation, and what the
//! kernel had not yet written out is lost, as on a node that panics or loses
//! power. Each scenario is two boots on one persistent disk image
//! (`hack/vm/run --persist-disk`):
//!
//! - boot 1 makes an ext4 file system on the disk, runs one `cryptdisk-csi dev`
//!   per crash point ("leg") with its data directory there, drives each leg to
//!   its point, and crashes the kernel;
//! - boot 2 starts each leg's driver again on the same directory, drives the
//!   operation again, and checks that the volume stages, the data synced before
//!   the crash reads back, the file system is clean (`e2fsck -fn`), and no
//!   half-done state is left (header copies agree, no rotation or wipe marks,
//!   one keyslot, the backend's images match its listing).
//!
//! Several legs share a boot: each stops at its failpoint (`<name>=pause`, the
//! thread stays there) and the kernel is crashed once they all have, with the
//! kernel's periodic writeback turned off, so nothing that was not flushed on
//! purpose reaches the disk in the meantime. One leg per scenario instead crashes
//! the first format at a fixed delay after the driver logs "formatting a blank
//! device". A control file written without a sync just before the crash must be
//! gone in boot 2, or the tier could not tell anything.
//!
//! On the host (`cargo test`) this program runs the boots through
//! `hack/vm/run`; in the guest (`CRYPTDISK_IN_VM=1`) it plays one boot. Arguments
//! that do not start with `-` select legs by substring. It ends with
//! `powerloss: N passed, N failed`.

#[allow(dead_code)]
#[path = "../vm/crypt_cases.rs"]
mod crypt_cases;
mod legs;
#[allow(dead_code)]
#[path = "../vm/lifecycle_cases.rs"]
mod lifecycle_cases;
#[allow(dead_code)]
#[path = "../vm/node_cases.rs"]
mod node_cases;

use std::collections::BTreeMap;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

// What the VM tier's helpers (included above) expect at the crate root.
pub type CaseResult = Result<(), String>;
pub type CaseFuture<'a> = Pin<Box<dyn Future<Output = CaseResult> + 'a>>;

#[allow(dead_code)]
pub struct Case {
    pub name: &'static str,
    pub run: for<'a> fn(&'a mut Ctx) -> CaseFuture<'a>,
}

/// The VM tier's pool of blank disks; this tier hands out none.
pub struct Ctx;

impl Ctx {
    #[allow(dead_code)]
    pub fn disk(&mut self) -> Result<PathBuf, String> {
        Err("the power-loss tier has no blank disks".to_string())
    }
}

/// Fails the case with a message when `cond` is false.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!("{}:{}: {}", file!(), line!(), format!($($msg)+)));
        }
    };
}

/// Turns any error into a case failure with its location.
#[macro_export]
macro_rules! check {
    ($e:expr) => {
        $e.map_err(|err| format!("{}:{}: {}: {}", file!(), line!(), stringify!($e), err))?
    };
}

/// Size of the persistent disk: the legs' data directories and their images.
const DISK_SIZE: &str = "1G";
/// Per boot; a boot takes 10–60 s under TCG.
const BOOT_TIMEOUT_SECS: &str = "300";
/// hack/vm/run's status when the guest crashed itself on purpose.
const DELIBERATE_CRASH: i32 = 120;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if std::env::var_os("CRYPTDISK_IN_VM").is_some() {
        return legs::guest(&args);
    }
    let filters: Vec<String> = args.into_iter().filter(|a| !a.starts_with('-')).collect();
    host(&filters)
}

/// The outcome of one leg as the host saw it.
struct Outcome {
    armed: bool,
    result: Option<Result<(), String>>,
}

fn host(filters: &[String]) -> ExitCode {
    let started = Instant::now();
    let mut outcomes: BTreeMap<String, Outcome> = BTreeMap::new();
    let mut order = Vec::new();
    for (i, scenario) in legs::SCENARIOS.iter().enumerate() {
        let chosen: Vec<&str> = scenario
            .iter()
            .copied()
            .filter(|leg| filters.is_empty() || filters.iter().any(|f| leg.contains(f.as_str())))
            .collect();
        if chosen.is_empty() {
            continue;
        }
        for leg in &chosen {
            order.push(leg.to_string());
        }
        let t = Instant::now();
        let found = run_scenario(i, &chosen);
        eprintln!(
            "powerloss: scenario {i} ({}) took {:.1} s",
            chosen.join(" "),
            t.elapsed().as_secs_f64()
        );
        outcomes.extend(found);
    }
    let (mut passed, mut failed) = (0, 0);
    for leg in &order {
        let outcome = outcomes.get(leg);
        let verdict = match outcome {
            Some(Outcome {
                armed: true,
                result: Some(Ok(())),
            }) => Ok(()),
            Some(Outcome {
                armed: false,
                result,
            }) => Err(match result {
                Some(Err(e)) => e.clone(),
                _ => "boot 1 never reached the crash point".to_string(),
            }),
            Some(Outcome {
                result: Some(Err(e)),
                ..
            }) => Err(e.clone()),
            _ => Err("boot 2 gave no result".to_string()),
        };
        match verdict {
            Ok(()) => {
                passed += 1;
                println!("powerloss leg {leg} ... ok");
            }
            Err(e) => {
                failed += 1;
                println!("powerloss leg {leg} ... FAILED\n    {e}");
            }
        }
    }
    println!(
        "powerloss: {} crash points in {:.1} s",
        order.len(),
        started.elapsed().as_secs_f64()
    );
    println!("powerloss: {passed} passed, {failed} failed");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Both boots of one scenario on a fresh disk image in a temporary directory.
fn run_scenario(index: usize, chosen: &[&str]) -> BTreeMap<String, Outcome> {
    let mut outcomes: BTreeMap<String, Outcome> = chosen
        .iter()
        .map(|l| {
            (
                l.to_string(),
                Outcome {
                    armed: false,
                    result: None,
                },
            )
        })
        .collect();
    let fail_all = |outcomes: &mut BTreeMap<String, Outcome>, why: String| {
        for o in outcomes.values_mut() {
            if o.result.is_none() {
                o.result = Some(Err(why.clone()));
            }
        }
    };
    let tmp = match tempfile::Builder::new().prefix("powerloss-").tempdir() {
        Ok(t) => t,
        Err(e) => {
            fail_all(&mut outcomes, format!("no temporary directory: {e}"));
            return outcomes;
        }
    };
    let share = tmp.path().join("share");
    if let Err(e) = std::fs::create_dir(&share) {
        fail_all(
            &mut outcomes,
            format!("cannot create {}: {e}", share.display()),
        );
        return outcomes;
    }
    let disk = tmp.path().join("disk.img");

    let (code, lines) = boot(&disk, &share, "boot1", index, chosen);
    for line in &lines {
        if let Some(leg) = line
            .strip_prefix("powerloss leg ")
            .and_then(|l| l.strip_suffix(" armed"))
            && let Some(o) = outcomes.get_mut(leg)
        {
            o.armed = true;
        }
    }
    record_failures(&lines, &mut outcomes);
    if code != Some(DELIBERATE_CRASH) {
        fail_all(
            &mut outcomes,
            format!(
                "boot 1 ended with status {code:?}, not the deliberate crash ({DELIBERATE_CRASH})"
            ),
        );
        show_logs(&share, chosen, &outcomes);
        return outcomes;
    }

    let (code, lines) = boot(&disk, &share, "boot2", index, chosen);
    for line in &lines {
        if let Some((leg, _secs)) = line
            .strip_prefix("powerloss leg ")
            .and_then(|l| l.split_once(" ... ok"))
            && let Some(o) = outcomes.get_mut(leg)
            && o.result.is_none()
        {
            o.result = Some(Ok(()));
        }
    }
    record_failures(&lines, &mut outcomes);
    if !matches!(code, Some(0) | Some(1)) {
        fail_all(&mut outcomes, format!("boot 2 ended with status {code:?}"));
    }
    show_logs(&share, chosen, &outcomes);
    outcomes
}

/// "powerloss leg NAME ... FAILED" followed by its indented reason.
fn record_failures(lines: &[String], outcomes: &mut BTreeMap<String, Outcome>) {
    for (i, line) in lines.iter().enumerate() {
        let Some(leg) = line
            .strip_prefix("powerloss leg ")
            .and_then(|l| l.split(" ... FAILED").next())
            .filter(|_| line.contains(" ... FAILED"))
        else {
            continue;
        };
        let why = lines
            .get(i + 1)
            .map(|l| l.trim().to_string())
            .unwrap_or_default();
        if let Some(o) = outcomes.get_mut(leg)
            && o.result.is_none()
        {
            o.result = Some(Err(why));
        }
    }
}

/// The end of each failed leg's driver logs, for the reader of a CI log.
fn show_logs(share: &Path, chosen: &[&str], outcomes: &BTreeMap<String, Outcome>) {
    for leg in chosen {
        if matches!(
            outcomes.get(*leg),
            Some(Outcome {
                armed: true,
                result: Some(Ok(()))
            }) | None
        ) {
            continue;
        }
        for boot in ["boot1", "boot2"] {
            let path = share.join(format!("{}.{boot}.log", legs::slug(leg)));
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            let tail: Vec<&str> = text.lines().rev().take(25).collect();
            eprintln!("powerloss: {leg}: last lines of the driver log in {boot}:");
            for l in tail.iter().rev() {
                eprintln!("    {l}");
            }
        }
    }
}

/// One boot through hack/vm/run; its status and stdout lines (which are also
/// passed on to our stdout as they come).
fn boot(
    disk: &Path,
    share: &Path,
    which: &str,
    index: usize,
    chosen: &[&str],
) -> (Option<i32>, Vec<String>) {
    let run = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("hack/vm/run");
    let exe = std::env::current_exe().expect("path of this test binary");
    let mut cmd = Command::new(&run);
    cmd.arg("--persist-disk")
        .arg(format!("{}:{DISK_SIZE}", disk.display()))
        .arg("--share")
        .arg(share)
        .args(["--timeout", BOOT_TIMEOUT_SECS])
        .args(["--env", "CRYPTDISK_VM_TEST_LOG", "--"])
        .arg(exe)
        .arg(which)
        .arg(index.to_string())
        .arg(share)
        .args(chosen)
        .stdout(Stdio::piped());
    eprintln!("powerloss: scenario {index} {which}: {}", chosen.join(" "));
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("powerloss: cannot start {}: {e}", run.display());
            return (None, Vec::new());
        }
    };
    let mut lines = Vec::new();
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            println!("  {which}: {line}");
            lines.push(line);
        }
    }
    let code = child.wait().ok().and_then(|s| s.code());
    (code, lines)
}
