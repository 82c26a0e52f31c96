//! Property tests: the frame decoder never panics on random or mutated input, and rejects
//! every single-byte corruption of a valid frame.

use fastmig_migration::protocol::{decode, encode, read_message, Complete, Message, Run};
use proptest::prelude::*;

fn valid_frames() -> Vec<Vec<u8>> {
    vec![
        encode(&Message::Page {
            gpa: 8192,
            data: Some(vec![0xAB; 4096]),
        }),
        encode(&Message::Page {
            gpa: 4096,
            data: None,
        }),
        encode(&Message::Batch(vec![Run {
            gpa: 0,
            pages: 17,
            zero: vec![0x0F, 0, 1],
        }])),
        encode(&Message::Written(vec![(0, 3), (1 << 20, 2)])),
        encode(&Message::Complete(Complete {
            digest: 1,
            pages: 2,
            rounds: 3,
        })),
        encode(&Message::State(vec![7; 300])),
        encode(&Message::Failed { reason: "x".into() }),
        encode(&Message::Ready),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..6000)) {
        let _ = decode(&bytes);
        let _ = read_message(&mut &bytes[..]);
    }

    #[test]
    fn random_bytes_behind_a_valid_header_never_panic(
        kind in 0u8..20, flags in any::<u8>(), payload in proptest::collection::vec(any::<u8>(), 0..600)
    ) {
        // Build a frame with a correct checksum around random payload, so the payload
        // parsers themselves are exercised, not only the checksum.
        let mut f = Vec::new();
        f.extend_from_slice(b"FMIG");
        f.extend_from_slice(&1u16.to_le_bytes());
        f.push(kind);
        f.push(flags);
        f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        let mut h = crc32fast::Hasher::new();
        h.update(&f[..12]);
        h.update(&payload);
        f.extend_from_slice(&h.finalize().to_le_bytes());
        f.extend_from_slice(&payload);
        let _ = decode(&f);
    }

    #[test]
    fn single_byte_mutation_is_always_rejected(which in 0usize..8, pos in any::<prop::sample::Index>(), xor in 1u8..=255) {
        let frames = valid_frames();
        let mut f = frames[which].clone();
        let i = pos.index(f.len());
        f[i] ^= xor;
        prop_assert!(decode(&f).is_err(), "mutation at {} of frame {} accepted", i, which);
    }

    #[test]
    fn truncation_is_rejected(which in 0usize..8, cut in any::<prop::sample::Index>()) {
        let frames = valid_frames();
        let f = &frames[which];
        let n = cut.index(f.len());
        prop_assert!(decode(&f[..n]).is_err());
    }
}
