//! The wire decoder on arbitrary bytes: `decode` on the buffer, then `read_message` on it as
//! a stream until it fails. Neither may panic, allocate past the frame cap, or loop.
#![no_main]

use fastmig_migration::protocol::{decode, decode_header, read_message, HEADER_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = decode(data);
    if let Some(h) = data.first_chunk::<HEADER_LEN>() {
        let _ = decode_header(h);
    }
    let mut stream = data;
    // Every successful read consumes at least a header, so this ends.
    while read_message(&mut stream).is_ok() {}
});
