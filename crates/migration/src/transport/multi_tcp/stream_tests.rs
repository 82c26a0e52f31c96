//! Which data stream carries a page: the rule the ordering argument (module docs) and the
//! streams' share of the work rest on.

use super::*;

#[test]
fn a_chunk_of_pages_stays_on_one_stream_and_consecutive_chunks_use_every_stream() {
    for n in 1..=5 {
        for chunk in 0..3 * n {
            let first = chunk * CHUNK_PAGES;
            let s = stream_of(first, n);
            assert!(s < n, "{n} streams: page {first} on stream {s}");
            // Whole chunks travel on one stream: long runs stay in one descriptor.
            for p in first..first + CHUNK_PAGES {
                assert_eq!(
                    stream_of(p, n),
                    s,
                    "{n} streams: page {p} left its chunk's stream"
                );
            }
        }
        // Any n consecutive chunks spread over all n streams.
        for start in 0..n {
            let mut used: Vec<usize> = (start..start + n)
                .map(|c| stream_of(c * CHUNK_PAGES, n))
                .collect();
            used.sort_unstable();
            used.dedup();
            assert_eq!(used.len(), n, "{n} streams, chunks {start}..: {used:?}");
        }
    }
}

/// A destination dropped without `finish` or `abort` (a caller that gave up on it) stops its
/// receiver threads: each closes its socket, so the source sees its data stream end. A
/// receiver left blocked on its socket would keep the stream open, and the thread alive.
#[test]
fn dropping_a_destination_stops_its_receivers() {
    use std::io::Read;
    use std::time::Duration;

    use crate::conn::{Endpoint, Listener};
    use crate::digest::PageHashes;
    use crate::protocol::write_message;
    use crate::test_utils::SoftVm;
    use crate::vm::MigratableVm;

    let vm = SoftVm::new_incoming(4 << 20).expect("vm");
    let mem = MemoryView::new(&vm.memory()).expect("memory view");
    let ctx = RecvCtx {
        hashes: Arc::new(PageHashes::new(mem.pages())),
        mem,
    };
    let l = Listener::bind(&"127.0.0.1:0".parse().expect("endpoint")).expect("bind");
    let Ok(Endpoint::Tcp(addr)) = l.endpoint() else {
        panic!("tcp listener")
    };
    let mut streams: Vec<std::net::TcpStream> = (0..2u32)
        .map(|stream| {
            let mut c = std::net::TcpStream::connect(addr).expect("connect");
            write_message(&mut c, &Message::DataHello { session: 5, stream }).expect("hello");
            c
        })
        .collect();
    let t = Duration::from_secs(5);
    let dest = MultiTcpDest::accept(&l, 2, 5, t, t, &ctx).expect("accept");
    assert_eq!(dest.workers.len(), 2, "one receiver per stream");
    drop(dest);
    for (i, s) in streams.iter_mut().enumerate() {
        s.set_read_timeout(Some(t)).expect("read timeout");
        let mut buf = [0u8; 16];
        let n = s.read(&mut buf);
        assert!(
            matches!(n, Ok(0)),
            "stream {i} still open after the destination was dropped: {n:?}"
        );
    }
}
