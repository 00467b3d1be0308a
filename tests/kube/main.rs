//! The Kubernetes tier: the driver against a real kube-apiserver (and etcd)
//! and the real sidecars, on loopback. `hack/kube` builds the pinned tools
//! (hack/kube-tools) and runs this with `CRYPTDISK_KUBE_TOOLS` naming them;
//! plain `cargo test` skips it (`test = false` in Cargo.toml), since the tools
//! take minutes to build the first time.
//!
//! Prints one line per case and `kube: N passed, N failed`. Arguments that do
//! not start with `-` filter the cases by substring.

mod authz_cases;
mod chart_cases;
mod cluster;
mod snapshot_cases;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::ExitCode;
use std::time::Instant;

pub type CaseResult = Result<(), String>;
pub type CaseFuture<'a> = Pin<Box<dyn Future<Output = CaseResult> + 'a>>;

/// One test: a name and a function of the tools directory.
pub struct Case {
    pub name: &'static str,
    pub run: for<'a> fn(&'a Path) -> CaseFuture<'a>,
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

fn main() -> ExitCode {
    let Some(tools) = std::env::var_os("CRYPTDISK_KUBE_TOOLS").map(PathBuf::from) else {
        eprintln!("kube: CRYPTDISK_KUBE_TOOLS is not set; run hack/kube, which builds the tools");
        println!("kube: 0 passed, 1 failed");
        return ExitCode::FAILURE;
    };
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let cases: Vec<Case> = snapshot_cases::cases()
        .into_iter()
        .chain(authz_cases::cases())
        .chain(chart_cases::cases())
        .filter(|c| filters.is_empty() || filters.iter().any(|f| c.name.contains(f.as_str())))
        .collect();
    // One thread: the processes the cases start die with the thread that
    // started them (PR_SET_PDEATHSIG), so it must be the one that lives longest.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let (mut passed, mut failed) = (0, 0);
    for case in &cases {
        let start = Instant::now();
        let result = rt.block_on((case.run)(&tools));
        let secs = start.elapsed().as_secs_f64();
        match result {
            Ok(()) => {
                passed += 1;
                println!("kube: {} ... ok ({secs:.1} s)", case.name);
            }
            Err(e) => {
                failed += 1;
                println!("kube: {} ... FAILED ({secs:.1} s)\n{e}", case.name);
            }
        }
    }
    println!("kube: {passed} passed, {failed} failed");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
