//! fastmig live migration: the pre-copy engine, the wire protocol and the transports.
//!
//! **Owns:** the [`MigratableVm`] seam, the source engine ([`migrate`]), the destination
//! ([`receive`]), the versioned protocol ([`protocol`], see `PROTOCOL.md`), the transports
//! ([`TransportKind`]), mutual TLS around the network ones ([`tls`]), the listening socket's
//! safety (never replacing what is not ours) and the summary types. What each end trusts and
//! checks is in `SECURITY.md`. **Does not own:** KVM (the VMM crate implements
//! [`MigratableVm`]), the CLI, or any cost model.
//!
//! ```text
//!  source VM ──MigratableVm──► migrate() ──Transport──► receive() ──MigratableVm──► dest VM
//!                              pre-copy rounds, pause,   digest check, restore,
//!                              state, Complete           Ready/Commit, resume
//! ```
//!
//! Everything is tested without KVM through `test_utils::SoftVm` (feature `test-utils`):
//!
//! ```
//! # #[cfg(feature = "test-utils")] {
//! use fastmig_migration::test_utils::SoftVm;
//! use fastmig_migration::{migrate, receive, IncomingVm, Listener, MigrateOptions, ReceiveOptions};
//!
//! let src = SoftVm::new(4 << 20).expect("source VM");
//! src.fill(0.5);
//! let dst = SoftVm::new_incoming(4 << 20).expect("destination VM");
//! let listener = Listener::bind(&"127.0.0.1:0".parse().expect("endpoint")).expect("bind");
//! let at = listener.endpoint().expect("bound endpoint");
//! let summary = std::thread::scope(|s| {
//!     let incoming = s.spawn(|| {
//!         receive(&listener, &ReceiveOptions::default(), IncomingVm::Only(&dst))
//!     });
//!     let summary = migrate(&src, &at, &MigrateOptions::default()).expect("migration");
//!     incoming.join().expect("receiver").expect("receive");
//!     summary
//! });
//! assert!(summary.digest_match && dst.is_running() && !src.is_running());
//! # }
//! ```

mod accept;
mod conn;
mod convergence;
mod deadline;
mod digest;
mod engine;
mod error;
mod fdpass;
mod guestmem;
mod handshake;
mod options;
pub mod protocol;
mod rawio;
mod receive;
mod sockpath;
mod summary;
#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;
pub mod tls;
pub mod transport;
mod util;
mod vm;

pub use conn::{BadEndpoint, Conn, Endpoint, Listener};
pub use digest::{hash_page_bytes, PageHashes};
pub use engine::migrate;
pub use error::MigrationError;
pub use guestmem::{BadRegion, MemoryView};
pub use options::{BadPolicy, MigrateOptions, OnNoConverge, ProgressFn, DEFAULT_DOWNTIME_LIMIT};
pub use receive::{receive, IncomingVm, MakeVm, ReceiveOptions};
pub use summary::{MigrationStatus, MigrationSummary, Phase, Progress, ReceiveSummary, RoundStats};
pub use transport::handover::HandoverRegion;
pub use transport::{BadTransport, TransportKind, DATA_STREAMS};
pub use util::{thread_cpu_time, CancelToken, TokenBucket};
pub use vm::{DirtyBitmap, MemoryRegion, MigratableVm, RegionLayout, VmError, VmLayout, PAGE_SIZE};
