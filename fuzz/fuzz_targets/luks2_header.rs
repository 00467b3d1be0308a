//! The binary LUKS2 header reader (both copies) and the whole validation, on
//! any bytes as a device would hold them.
//!
//! Beyond "no panic" (a size field cannot make it allocate more than a LUKS2
//! header may hold): an accepted header's token is bound to its UUID.
#![no_main]

use std::io::Cursor;

use cryptdisk_csi::crypt::header::{parse, validate_header};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(header)) = parse(&mut Cursor::new(data)) {
        assert!(header.hdr_size as usize <= data.len());
        if validate_header(&header).is_ok() {
            let token = header.json["tokens"]
                .as_object()
                .unwrap()
                .values()
                .next()
                .unwrap();
            assert!(
                token["key_id"]
                    .as_str()
                    .unwrap()
                    .eq_ignore_ascii_case(&header.uuid)
            );
        }
    }
});
