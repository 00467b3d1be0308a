//! Routes libcryptsetup's own log into `tracing`. Secrets never reach it: we pass
//! keys to libcryptsetup only as passphrase arguments, which it does not log.

use std::ffi::{CStr, c_char, c_int, c_void};
use std::sync::Once;

static ROUTE: Once = Once::new();

/// Installs the log callback once per process; contexts made afterwards use it.
pub fn route_to_tracing() {
    ROUTE.call_once(|| libcryptsetup_rs::set_log_callback::<()>(Some(forward), None));
}

unsafe extern "C" fn forward(level: c_int, msg: *const c_char, _user: *mut c_void) {
    if msg.is_null() {
        return;
    }
    // SAFETY: libcryptsetup passes a NUL-terminated string valid for this call.
    let msg = unsafe { CStr::from_ptr(msg) }.to_string_lossy();
    let msg = msg.trim_end();
    use libcryptsetup_rs::consts::vals::CryptLogLevel as L;
    match level {
        l if l == L::Error as c_int => tracing::warn!(target: "libcryptsetup", "{msg}"),
        l if l == L::Normal as c_int => tracing::info!(target: "libcryptsetup", "{msg}"),
        l if l == L::Verbose as c_int => tracing::debug!(target: "libcryptsetup", "{msg}"),
        _ => tracing::trace!(target: "libcryptsetup", "{msg}"),
    }
}
