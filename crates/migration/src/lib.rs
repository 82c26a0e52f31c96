//! fastmig migration (work in progress).
