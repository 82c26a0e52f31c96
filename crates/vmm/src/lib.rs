//! fastmig vmm (work in progress).
