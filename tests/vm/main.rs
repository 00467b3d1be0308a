//! The real-kernel test tier.
//!
//! On the host (`cargo test`), this program boots ONE qemu VM through
//! `hack/vm/run` with blank virtio disks and runs itself inside it. Inside
//! (`CRYPTDISK_IN_VM=1`), it runs every case in turn against real dm-crypt and
//! prints `vm: N passed, N failed`. Arguments that do not start with `-` filter the
//! cases by substring, as cargo's own harness does.

mod crypt_cases;
mod fresh_cases;
mod header_cases;
mod keyscope_cases;
mod lifecycle_cases;
mod mount_cases;
mod node_cases;
mod ops_cases;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::{Command, ExitCode};
use std::time::Instant;

/// Blank disks attached to the VM, and their size.
const DISKS: usize = 8;
const DISK_SIZE: &str = "128M";

pub type CaseResult = Result<(), String>;
pub type CaseFuture<'a> = Pin<Box<dyn Future<Output = CaseResult> + 'a>>;

/// One test: a name and a function of the shared context.
pub struct Case {
    pub name: &'static str,
    pub run: for<'a> fn(&'a mut Ctx) -> CaseFuture<'a>,
}

/// What cases share: the pool of blank disks, handed out one at a time so that no
/// two cases touch the same disk.
pub struct Ctx {
    disks: Vec<PathBuf>,
}

impl Ctx {
    /// A blank disk nobody else uses.
    pub fn disk(&mut self) -> Result<PathBuf, String> {
        self.disks
            .pop()
            .ok_or_else(|| "out of blank VM disks: raise DISKS in tests/vm/main.rs".to_string())
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

fn all_cases() -> Vec<Case> {
    let mut v = crypt_cases::cases();
    v.extend(lifecycle_cases::cases());
    v.extend(mount_cases::cases());
    v.extend(node_cases::cases());
    v.extend(header_cases::cases());
    v.extend(ops_cases::cases());
    v.extend(fresh_cases::cases());
    v.extend(keyscope_cases::cases());
    v
}

fn main() -> ExitCode {
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    if std::env::var_os("CRYPTDISK_IN_VM").is_none() {
        return relaunch_in_vm(&filters);
    }
    run_in_vm(&filters)
}

fn relaunch_in_vm(filters: &[String]) -> ExitCode {
    let run = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("hack/vm/run");
    let exe = std::env::current_exe().expect("path of this test binary");
    let mut cmd = Command::new(&run);
    for _ in 0..DISKS {
        cmd.args(["--disk", DISK_SIZE]);
    }
    cmd.args(["--env", "CRYPTDISK_VM_TEST_LOG", "--"])
        .arg(exe)
        .args(filters);
    eprintln!(
        "vm: booting one VM for the real-kernel tier ({})",
        run.display()
    );
    let started = Instant::now();
    match cmd.status() {
        Ok(status) => {
            eprintln!("vm: VM run took {:.1} s", started.elapsed().as_secs_f64());
            match status.code() {
                Some(0) => ExitCode::SUCCESS,
                Some(code) => {
                    eprintln!("vm: the VM run exited with status {code}");
                    ExitCode::FAILURE
                }
                None => {
                    eprintln!("vm: the VM run was killed by a signal");
                    ExitCode::FAILURE
                }
            }
        }
        Err(e) => {
            eprintln!("vm: cannot start {}: {e}", run.display());
            ExitCode::FAILURE
        }
    }
}

fn run_in_vm(filters: &[String]) -> ExitCode {
    if let Ok(filter) = std::env::var("CRYPTDISK_VM_TEST_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    }
    let disks: Vec<PathBuf> = std::env::var("CRYPTDISK_VM_DISKS")
        .unwrap_or_default()
        .split_whitespace()
        .rev()
        .map(PathBuf::from)
        .collect();
    let mut ctx = Ctx { disks };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let cases: Vec<Case> = all_cases()
        .into_iter()
        .filter(|c| filters.is_empty() || filters.iter().any(|f| c.name.contains(f.as_str())))
        .collect();
    let started = Instant::now();
    let (mut passed, mut failed) = (0, 0);
    for case in &cases {
        let t = Instant::now();
        let result = runtime.block_on((case.run)(&mut ctx));
        let secs = t.elapsed().as_secs_f64();
        match result {
            Ok(()) => {
                passed += 1;
                println!("vm test {} ... ok ({secs:.2} s)", case.name);
            }
            Err(e) => {
                failed += 1;
                println!("vm test {} ... FAILED ({secs:.2} s)\n    {e}", case.name);
            }
        }
    }
    println!(
        "vm: {} cases in {:.1} s",
        cases.len(),
        started.elapsed().as_secs_f64()
    );
    println!("vm: {passed} passed, {failed} failed");
    if failed == 0 && passed > 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
