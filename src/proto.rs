//! Code generated from `proto/` by build.rs.

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod csi {
    tonic::include_proto!("csi.v1");
}

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod kms {
    tonic::include_proto!("kms");
}
