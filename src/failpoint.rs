//! Test-only crash injection: `CRYPTDISK_FAILPOINT=<name>` makes the process
//! abort when it reaches the failpoint of that name, leaving whatever state the
//! operation had made so far, as a crash would. Compiled only into debug builds;
//! a release build has no failpoints and ignores the variable.

/// Aborts the process if `CRYPTDISK_FAILPOINT` names this point (debug builds).
#[inline]
pub fn hit(name: &str) {
    #[cfg(debug_assertions)]
    if std::env::var("CRYPTDISK_FAILPOINT").is_ok_and(|v| v == name) {
        eprintln!("failpoint {name}: aborting");
        std::process::abort();
    }
    #[cfg(not(debug_assertions))]
    let _ = name;
}
