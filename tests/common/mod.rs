//! What the integration tests that run the real binary share: its path, a
//! child process killed when the test lets go of it, and the wait for a socket
//! to accept. Each test target includes this with `mod common;` and uses only
//! part of it, hence the `dead_code` allowance.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The driver binary cargo built for this test run.
pub const BIN: &str = env!("CARGO_BIN_EXE_cryptdisk-csi");

/// How long a freshly started process gets to open its socket.
const SOCKET_WAIT: Duration = Duration::from_secs(10);

/// A child process, killed and reaped on drop so that a failing test leaves
/// nothing running.
pub struct Process(pub Child);

impl Process {
    /// Starts the driver with `args`, stdout discarded and stderr to `stderr`.
    pub fn spawn(args: &[String], stderr: impl Into<Stdio>) -> Process {
        Process(
            Command::new(BIN)
                .args(args)
                .stdout(Stdio::null())
                .stderr(stderr)
                .spawn()
                .expect("start cryptdisk-csi"),
        )
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until the unix socket at `path` accepts a connection; panics after
/// ten seconds, with the process's log when there is one to show.
pub fn wait_for_socket(path: &Path, log: Option<&Path>) {
    let deadline = Instant::now() + SOCKET_WAIT;
    while std::os::unix::net::UnixStream::connect(path).is_err() {
        assert!(
            Instant::now() < deadline,
            "{} never accepted: {}",
            path.display(),
            log.map(|l| std::fs::read_to_string(l).unwrap_or_default())
                .unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
