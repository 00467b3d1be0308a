//! The CSI services, one file each.

pub mod identity;
