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
