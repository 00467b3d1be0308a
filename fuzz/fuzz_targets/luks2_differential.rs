//! Our LUKS2 header reader and validator held against libcryptsetup's own
//! `crypt_load` (which runs on a plain file, no device-mapper needed).
//!
//! The input is a control byte and JSON text; it becomes a header image with
//! both copies checksummed as libcryptsetup writes them (the secondary with
//! the text after the first 0xff byte when the control byte says so, and
//! sequence ids from the control byte). Whenever we accept the header,
//! libcryptsetup must load it too, and what it loaded (its metadata JSON and
//! UUID) must be exactly what we validated: a header that the two parsers read
//! differently is never one we accept.
#![no_main]

use std::io::Cursor;
use std::path::PathBuf;
use std::sync::OnceLock;

use cryptdisk_csi::crypt::header::{build_image, parse, validate_header};
use libfuzzer_sys::fuzz_target;

/// The UUID the images carry (the seeds' token key id matches it).
const UUID: &str = "3f0e1d2c-0000-4000-8000-000000000001";

fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("cryptdisk-differential-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch directory");
        dir.join("header.img")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, text)) = data.split_first() else {
        return;
    };
    let (primary, secondary) = match (ctl & 1, text.iter().position(|&b| b == 0xff)) {
        (1, Some(at)) => (&text[..at], &text[at + 1..]),
        _ => (text, text),
    };
    let seqids = (u64::from(ctl >> 1 & 3), u64::from(ctl >> 3 & 3));
    let Some(image) = build_image(primary, secondary, seqids, UUID) else {
        return;
    };
    let Ok(Some(header)) = parse(&mut Cursor::new(&image)) else {
        return;
    };
    if validate_header(&header).is_err() {
        return;
    }
    let path = scratch();
    let file = std::fs::File::create(path).expect("scratch image");
    std::io::Write::write_all(&mut &file, &image).expect("write image");
    // libcryptsetup checks that the device holds the header and keyslots areas.
    file.set_len(17 << 20).expect("size image");
    drop(file);
    let (loaded, uuid) = cryptdisk_csi::crypt::loaded_metadata(path)
        .expect("libcryptsetup refuses a header we accept");
    assert_eq!(loaded, header.json, "libcryptsetup loaded other metadata");
    assert!(uuid.eq_ignore_ascii_case(&header.uuid));
});
