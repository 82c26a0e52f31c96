//! One testbed at a time on this machine: its names (bridge `fmtb0`, namespaces `fmtb-hI`)
//! are fixed, so the test binaries that bring one up hold an exclusive lock on a file in /tmp
//! for as long as it exists, also across worktrees and `cargo test` runs.

use std::fs::File;

/// Holds the lock until dropped (or the process ends).
pub struct TestbedLock {
    _file: File,
}

/// Waits for the lock.
pub fn lock() -> TestbedLock {
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/tmp/fastmig-testbed.lock")
        .expect("opening /tmp/fastmig-testbed.lock");
    rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive)
        .expect("locking /tmp/fastmig-testbed.lock");
    TestbedLock { _file: f }
}
