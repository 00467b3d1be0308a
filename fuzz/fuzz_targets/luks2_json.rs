//! The LUKS2 JSON metadata validator, on any JSON.
//!
//! Beyond "no panic": whatever it accepts has the layout the driver writes (our
//! cipher and sector size, one segment after the header area, one digest
//! covering every keyslot, one token of ours).
#![no_main]

use cryptdisk_csi::crypt::header::validate;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(json) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    if validate(&json).is_ok() {
        let seg = &json["segments"]["0"];
        assert_eq!(json["segments"].as_object().unwrap().len(), 1);
        assert_eq!(seg["encryption"], "aes-xts-plain64");
        assert_eq!(seg["offset"], "16777216");
        assert_eq!(seg["sector_size"], 4096);
        assert_eq!(json["digests"].as_object().unwrap().len(), 1);
        assert_eq!(json["tokens"].as_object().unwrap().len(), 1);
        for slot in json["keyslots"].as_object().unwrap().values() {
            assert_eq!(slot["kdf"]["type"], "pbkdf2");
            assert_eq!(slot["area"]["encryption"], "aes-xts-plain64");
        }
    }
});
