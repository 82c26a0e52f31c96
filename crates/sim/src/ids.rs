//! Distinct id types so a host index can never be used as a VM index.

use serde::{Deserialize, Serialize};

/// Index of a physical host in the data centre (0-based, in creation order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct HostId(pub u32);

/// Index of a VM (0-based, in trace order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct VmId(pub u32);

impl HostId {
    /// The id as a vector index.
    pub fn idx(self) -> usize {
        self.0 as usize
    }
}

impl VmId {
    /// The id as a vector index.
    pub fn idx(self) -> usize {
        self.0 as usize
    }
}

impl std::fmt::Display for HostId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "host#{}", self.0)
    }
}

impl std::fmt::Display for VmId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "vm#{}", self.0)
    }
}
