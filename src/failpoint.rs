//! Test-only crash injection: `CRYPTDISK_FAILPOINT=<name>` makes the process
//! abort when it reaches the failpoint of that name, leaving whatever state the
//! operation had made so far, as a crash would. `<name>=pause` instead stops the
//! thread there for good, so that a test can crash the whole machine at that
//! point (the power-loss tier, tests/powerloss). Compiled only into debug builds;
//! a release build has no failpoints and ignores the variable.

/// Aborts the process, or pauses the thread, if `CRYPTDISK_FAILPOINT` names this
/// point (debug builds).
#[inline]
pub fn hit(name: &str) {
    #[cfg(debug_assertions)]
    if let Ok(v) = std::env::var("CRYPTDISK_FAILPOINT") {
        if v == name {
            eprintln!("failpoint {name}: aborting");
            std::process::abort();
        }
        if v.strip_suffix("=pause") == Some(name) {
            // The line a test waits for before it crashes the machine; the
            // thread then holds whatever it held, as a machine stopped there would.
            eprintln!("failpoint {name}: paused");
            loop {
                std::thread::park();
            }
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = name;
}

/// Test-only pacing of the integrity wipe: `CRYPTDISK_TEST_WIPE_MIB_PER_S=<n>`
/// caps it at n MiB/s in debug builds, so that tests can stop, cancel and crash a
/// wipe at known points whatever the speed of the machine. `None` in release
/// builds and when unset.
pub fn wipe_rate_limit() -> Option<u64> {
    #[cfg(debug_assertions)]
    {
        std::env::var("CRYPTDISK_TEST_WIPE_MIB_PER_S")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|&n| n > 0)
            .map(|n| n << 20)
    }
    #[cfg(not(debug_assertions))]
    None
}
