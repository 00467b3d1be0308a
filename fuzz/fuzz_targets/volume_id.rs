//! Volume and snapshot ids as a CO hands them back: any text.
//!
//! Beyond "no panic": an id that parses prints back to the same text and parses
//! again to the same value, and its parts are file-name safe; a refusal's
//! message is bounded and holds no raw control character.
#![no_main]

use cryptdisk_csi::volume::id::{MAX_ID_LEN, MAX_PART_LEN};
use cryptdisk_csi::volume::{SnapshotId, VolumeId};
use libfuzzer_sys::fuzz_target;

fn safe_part(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= MAX_PART_LEN
        && p != "."
        && p != ".."
        && p.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

fn refusal_is_tame(message: String) {
    assert!(message.len() <= 1024, "{} bytes of error", message.len());
    assert!(
        !message.chars().any(char::is_control),
        "raw control: {message:?}"
    );
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match text.parse::<VolumeId>() {
        Ok(id) => {
            let printed = id.to_string();
            assert_eq!(printed, text);
            assert!(printed.len() <= MAX_ID_LEN);
            assert_eq!(printed.parse::<VolumeId>().unwrap(), id);
            assert!(safe_part(id.location()) && safe_part(id.disk()));
        }
        Err(e) => refusal_is_tame(e.to_string()),
    }
    match text.parse::<SnapshotId>() {
        Ok(id) => {
            let printed = id.to_string();
            assert_eq!(printed, text);
            assert_eq!(printed.parse::<SnapshotId>().unwrap(), id);
            assert!(safe_part(id.location()) && safe_part(id.snapshot()));
        }
        Err(e) => refusal_is_tame(e.to_string()),
    }
});
