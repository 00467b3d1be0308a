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
    // Our keyslots area is small on purpose (see LUKS2_KEYSLOTS_BYTES), and every
    // format would say so at info level.
    if msg.starts_with("WARNING: keyslots area") && msg.ends_with("is very limited.") {
        tracing::debug!(target: "libcryptsetup", "{msg}");
        return;
    }
    match level {
        l if l == L::Error as c_int => tracing::warn!(target: "libcryptsetup", "{msg}"),
        l if l == L::Normal as c_int => tracing::info!(target: "libcryptsetup", "{msg}"),
        l if l == L::Verbose as c_int => tracing::debug!(target: "libcryptsetup", "{msg}"),
        _ => tracing::trace!(target: "libcryptsetup", "{msg}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// What `forward` logs at info level and above for these messages.
    fn logged_at_info(messages: &[(c_int, &str)]) -> String {
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            for (level, msg) in messages {
                let msg = CString::new(*msg).unwrap();
                // SAFETY: a valid NUL-terminated string, as libcryptsetup passes.
                unsafe { forward(*level, msg.as_ptr(), std::ptr::null_mut()) };
            }
        });
        String::from_utf8(buf.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn the_small_keyslots_area_warning_is_not_logged_at_info_but_others_are() {
        use libcryptsetup_rs::consts::vals::CryptLogLevel as L;
        let out = logged_at_info(&[
            (
                L::Normal as c_int,
                "WARNING: keyslots area (2097152 bytes) is very small, available LUKS2 \
                 keyslot count is very limited.\n",
            ),
            (L::Error as c_int, "Device /dev/loop9 is too small.\n"),
            (L::Normal as c_int, "WARNING: something else.\n"),
        ]);
        assert!(!out.contains("keyslots area"), "{out}");
        assert!(
            out.contains("WARN") && out.contains("is too small."),
            "{out}"
        );
        assert!(
            out.contains("INFO") && out.contains("something else."),
            "{out}"
        );
    }
}
