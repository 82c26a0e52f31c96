//! Round trips, version rule, corruption and truncation of the frames in `protocol.rs`.

use super::*;
use crate::vm::RegionLayout;

fn samples() -> Vec<Message> {
    let layout = VmLayout {
        regions: vec![RegionLayout {
            gpa: 0,
            size: 1 << 20,
        }],
        vcpus: 2,
        features: 3,
    };
    vec![
        Message::Hello(Hello {
            version: MIN_PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            layout: layout.clone(),
            transport: TransportKind::MultiTcp { streams: 4 },
            session: 7,
        }),
        Message::Hello(Hello {
            version: 2,
            max_version: 2,
            layout,
            transport: TransportKind::Handover,
            session: 8,
        }),
        Message::HelloReply(HelloReply {
            version: 1,
            accepted: false,
            reason: Some("no".into()),
        }),
        Message::DataHello {
            session: 7,
            stream: 3,
        },
        Message::Page {
            gpa: 4096,
            data: Some(vec![5u8; PAGE_SIZE]),
        },
        Message::Page {
            gpa: 8192,
            data: None,
        },
        Message::Batch(vec![
            Run {
                gpa: 0,
                pages: 3,
                zero: vec![0b010],
            },
            Run {
                gpa: 1 << 20,
                pages: 9,
                zero: vec![0, 1],
            },
        ]),
        Message::Written(vec![(0, 4), (8192, 1)]),
        Message::RoundEnd {
            round: 4,
            data_bytes: 1 << 40,
        },
        Message::RoundAck { round: 4 },
        Message::EndOfData,
        Message::State(vec![1, 2, 3]),
        Message::Complete(Complete {
            digest: 99,
            pages: 256,
            rounds: 3,
        }),
        Message::Ready,
        Message::Commit,
        Message::Resumed(Resumed {
            dst_cpu_s: 0.5,
            dst_setup_ms: 2.0,
            digest_match: true,
        }),
        Message::Failed {
            reason: "digest".into(),
        },
        Message::MemoryFds(vec![FdRegion {
            gpa: 0,
            size: 4096,
            fd_offset: 0,
        }]),
    ]
}

#[test]
fn every_message_round_trips() {
    for m in samples() {
        let b = encode(&m);
        let (back, used) = decode(&b).expect("decodes");
        assert_eq!(back, m);
        assert_eq!(used, b.len());
        assert_eq!(read_message(&mut &b[..]).expect("reads"), m);
    }
}

#[test]
fn bad_magic_version_checksum_truncation() {
    let end = Message::RoundEnd {
        round: 1,
        data_bytes: 0,
    };
    let b = encode(&end);
    let mut m = b.clone();
    m[0] ^= 1;
    assert!(matches!(decode(&m), Err(ProtocolError::BadMagic(_))));
    let v1 = encode_with_version(&end, 1);
    assert!(matches!(
        decode(&v1),
        Err(ProtocolError::BadVersion { got: 1, want: 2 })
    ));
    let mut c = b.clone();
    let last = c.len() - 1;
    c[last] ^= 0x40;
    assert!(matches!(decode(&c), Err(ProtocolError::BadChecksum { .. })));
    assert!(matches!(
        decode(&b[..b.len() - 1]),
        Err(ProtocolError::Truncated)
    ));
    assert!(matches!(
        read_message(&mut &b[..5]),
        Err(ProtocolError::Truncated)
    ));
}

/// The `Hello` of a version-2 source, byte for byte as it wrote it.
const V2_HELLO: &str = r#"{"version":2,"layout":{"regions":[{"gpa":0,"size":1048576}],"vcpus":2,"features":3},"transport":"multi-tcp","data_streams":4,"session":7}"#;

/// How a version-2 destination read `Hello` (its struct, unknown fields ignored).
#[derive(Deserialize)]
struct V2Hello {
    version: u16,
    transport: String,
    data_streams: u32,
}

#[test]
fn a_version_2_hello_reads_as_a_single_version_offer() {
    let h: Hello = serde_json::from_str(V2_HELLO).expect("v2 hello");
    assert_eq!((h.version, h.max_version), (2, 2));
    assert_eq!(h.transport, TransportKind::MultiTcp { streams: 4 });
    // And a single-version Hello is written exactly as version 2 wrote it.
    assert_eq!(serde_json::to_string(&h).ok().as_deref(), Some(V2_HELLO));
}

#[test]
fn our_hello_reads_as_a_version_2_hello_on_an_old_destination() {
    let Message::Hello(ours) = &samples()[0] else {
        unreachable!()
    };
    let text = serde_json::to_string(ours).expect("json");
    let old: V2Hello = serde_json::from_str(&text).expect("a v2 destination reads it");
    assert_eq!(
        (old.version, old.transport.as_str(), old.data_streams),
        (2, "multi-tcp", 4)
    );
    assert!(text.contains(r#""max_version":3"#), "{text}");
}

#[test]
fn an_unknown_transport_name_is_malformed() {
    let text = V2_HELLO.replace("multi-tcp", "carrier-pigeon");
    // Re-frame the edited JSON as a Hello (kind 1) with a valid checksum.
    let mut frame = Vec::new();
    super::frame(&mut frame, 2, kind::HELLO, 0, text.as_bytes());
    assert!(matches!(
        decode(&frame),
        Err(ProtocolError::Malformed { kind: "hello", .. })
    ));
}

#[test]
fn frames_carry_the_frame_version_and_other_versions_are_refused() {
    let b = encode(&Message::Ready);
    assert_eq!(u16::from_le_bytes([b[4], b[5]]), FRAME_VERSION);
    for v in [FRAME_VERSION - 1, PROTOCOL_VERSION + 1] {
        assert!(matches!(
            decode(&encode_with_version(&Message::Ready, v)),
            Err(ProtocolError::BadVersion { got, want: FRAME_VERSION }) if got == v
        ));
    }
}

#[test]
fn frozen_frames_decode_across_versions() {
    let r = Message::HelloReply(HelloReply {
        version: 9,
        accepted: false,
        reason: None,
    });
    assert_eq!(decode(&encode_with_version(&r, 9)).expect("frozen").0, r);
}

#[test]
fn oversized_length_rejected_before_allocation() {
    let mut b = encode(&Message::Ready);
    b[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(decode(&b), Err(ProtocolError::TooLarge { .. })));
}

#[test]
fn batch_run_zero_bits() {
    let r = Run {
        gpa: 0,
        pages: 10,
        zero: vec![0b0000_0101, 0b10],
    };
    assert!(r.is_zero(0) && !r.is_zero(1) && r.is_zero(2) && r.is_zero(9));
    assert_eq!(r.data_pages(), 7);
}

#[test]
fn every_message_has_its_own_name() {
    // Names identify frames in errors and logs: one per kind, none empty.
    let names: Vec<&str> = samples().iter().map(Message::name).collect();
    let mut distinct = names.clone();
    distinct.sort_unstable();
    distinct.dedup();
    // The samples hold two `Hello`s and two `Page`s, and every other kind once.
    assert_eq!(distinct.len(), names.len() - 2, "{names:?}");
    assert!(names.iter().all(|n| !n.is_empty()), "{names:?}");
}

#[test]
fn the_reusing_encoders_write_the_same_frames_as_encode() {
    let data = [0x5Au8; PAGE_SIZE];
    let mut out = vec![1, 2, 3];
    encode_page(&mut out, 4096, Some(&data));
    assert_eq!(
        out,
        encode(&Message::Page {
            gpa: 4096,
            data: Some(data.to_vec())
        })
    );
    encode_page(&mut out, 8192, None);
    assert_eq!(
        out,
        encode(&Message::Page {
            gpa: 8192,
            data: None
        })
    );
    let runs = vec![Run {
        gpa: 1 << 20,
        pages: 9,
        zero: vec![0, 1],
    }];
    encode_batch(&mut out, &runs);
    assert_eq!(out, encode(&Message::Batch(runs)));
}

#[test]
fn write_message_writes_what_read_message_reads() {
    let mut wire = Vec::new();
    for m in samples() {
        write_message(&mut wire, &m).expect("write to a Vec");
    }
    let mut r = &wire[..];
    for m in samples() {
        assert_eq!(read_message(&mut r).expect("reads"), m);
    }
    assert!(r.is_empty());
}

/// A header announcing `len` payload bytes (checksum not filled in).
fn header_with_len(len: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h.copy_from_slice(&encode(&Message::Ready)[..HEADER_LEN]);
    h[8..12].copy_from_slice(&len.to_le_bytes());
    h
}

#[test]
fn the_payload_cap_is_inclusive() {
    let cap = u32::try_from(MAX_PAYLOAD).expect("cap fits u32");
    assert_eq!(
        decode_header(&header_with_len(cap))
            .expect("at the cap")
            .len,
        MAX_PAYLOAD
    );
    assert!(matches!(
        decode_header(&header_with_len(cap + 1)),
        Err(ProtocolError::TooLarge { len, .. }) if len == MAX_PAYLOAD + 1
    ));
}

/// A batch frame whose descriptor is `payload`, with a valid checksum.
fn batch_frame(payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    super::frame(&mut f, FRAME_VERSION, kind::BATCH, 0, payload);
    f
}

#[test]
fn a_run_may_hold_max_run_pages_and_no_more() {
    let full = Run {
        gpa: 0,
        pages: MAX_RUN_PAGES,
        zero: vec![0xFF; MAX_RUN_PAGES as usize / 8],
    };
    let m = Message::Batch(vec![full.clone()]);
    assert_eq!(decode(&encode(&m)).expect("full run").0, m);
    let over = Run {
        pages: MAX_RUN_PAGES + 1,
        ..full
    };
    assert!(matches!(
        decode(&batch_frame(&encode_runs(&[over]))),
        Err(ProtocolError::Malformed { kind: "batch", .. })
    ));
    let empty = Run {
        gpa: 0,
        pages: 0,
        zero: vec![],
    };
    assert!(matches!(
        decode(&batch_frame(&encode_runs(&[empty]))),
        Err(ProtocolError::Malformed { kind: "batch", .. })
    ));
}

#[test]
fn a_run_count_the_descriptor_cannot_hold_is_refused_before_allocating() {
    // 4 billion runs, or just two, announced in a 17-byte descriptor (room for one): refused
    // by the bound, before any run is parsed (not as a truncated second run).
    for n in [u32::MAX, 2] {
        let mut p = n.to_le_bytes().to_vec();
        p.extend_from_slice(
            &encode_runs(&[Run {
                gpa: 0,
                pages: 1,
                zero: vec![0],
            }])[4..],
        );
        assert_eq!(p.len(), 17);
        assert!(
            matches!(
                decode(&batch_frame(&p)),
                Err(ProtocolError::Malformed { kind: "batch", reason }) if reason.contains("cannot fit")
            ),
            "{n} runs"
        );
    }
    // One run of eight pages takes exactly 4 + 13 bytes: the bound lets it through.
    let one = Run {
        gpa: 4096,
        pages: 8,
        zero: vec![0b1000_0001],
    };
    let p = encode_runs(std::slice::from_ref(&one));
    assert_eq!(p.len(), 17);
    assert_eq!(
        decode(&batch_frame(&p)).expect("one run").0,
        Message::Batch(vec![one])
    );
}

#[test]
fn reported_figures_read_back_bit_for_bit() {
    // The source reports the destination's `Resumed` figures as its own: a float must come
    // back with the bits it was sent with (this one came back one unit in the last place
    // off before serde_json's `float_roundtrip`).
    for dst_cpu_s in [0.011_718_149_000_000_013, 0.1 + 0.2, 1e-300, 123_456.789] {
        let m = Message::Resumed(Resumed {
            dst_cpu_s,
            dst_setup_ms: dst_cpu_s * 7.0,
            digest_match: true,
        });
        let Message::Resumed(r) = decode(&encode(&m)).expect("decodes").0 else {
            panic!("not a Resumed")
        };
        assert_eq!(r.dst_cpu_s.to_bits(), dst_cpu_s.to_bits(), "{dst_cpu_s}");
        assert_eq!(r.dst_setup_ms.to_bits(), (dst_cpu_s * 7.0).to_bits());
    }
}
