//! CreateVolume parameters: one `key=value` per line of the input.
//!
//! Options that parse travel to the node in the volume context and read back as
//! the same options; nothing of the driver's or the sidecars' namespace leaks to
//! the backend's keys; a refusal names a parameter and is bounded.
#![no_main]

use std::collections::HashMap;

use cryptdisk_csi::csi::params::{K8S_PREFIX, PREFIX, VolumeOptions};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let params: HashMap<String, String> = text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    match VolumeOptions::from_parameters(&params) {
        Ok((options, backend)) => {
            assert!(
                backend
                    .keys()
                    .all(|k| !k.starts_with(PREFIX) && !k.starts_with(K8S_PREFIX))
            );
            assert_eq!(
                backend.len(),
                params
                    .keys()
                    .filter(|k| !k.starts_with(PREFIX) && !k.starts_with(K8S_PREFIX))
                    .count()
            );
            let ctx = options.to_volume_context();
            assert_eq!(VolumeOptions::from_volume_context(&ctx).unwrap(), options);
            let (again, rest) = VolumeOptions::from_parameters(&ctx).unwrap();
            assert_eq!(again, options);
            assert!(rest.is_empty());
        }
        Err(status) => {
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert!(!status.message().is_empty());
        }
    }
});
