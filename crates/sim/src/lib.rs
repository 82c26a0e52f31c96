//! fastmig sim (work in progress).
