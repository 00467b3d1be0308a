//! The node's view of its cloud: who this node is ([`identity`]) and where a
//! volume's block device is.

pub mod identity;
