//! The CSI services, one file each.

pub mod contract;
pub mod controller;
pub mod guard;
pub mod identity;
pub mod node;
pub mod params;
pub mod validate;
pub mod wipe;

#[cfg(test)]
mod controller_tests;
#[cfg(test)]
mod node_tests;
