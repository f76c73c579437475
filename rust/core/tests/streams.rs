//! Streams: the schema table, per-stream sequence numbers and the losses they attribute.
//!
//! Through the public API, on real files in /dev/shm (or the temp dir where there is none).

use std::time::Duration;

use rust_daq_core::{ClaimResult, Policy, Reader, Ring, Start};

mod common;
use common::{payload, TempRing};

#[test]
fn schema_table_registers_reuses_and_survives_reopen() {
    let t = TempRing::new("schemas");
    {
        let (ring, mut p) = Ring::create(&t.0, 8192, Policy::Overwrite, false).unwrap();
        let a = p.register_schema("voltmeter", b"schema-v1").unwrap();
        assert_eq!((a.stream_id, a.schema_id), (1, 1));
        let cam = p.register_schema("camera", &[7u8; 300]).unwrap();
        assert_eq!((cam.stream_id, cam.schema_id), (2, 2));
        assert_eq!(
            p.register_schema("voltmeter", b"schema-v1").unwrap(),
            a,
            "identical: reused"
        );
        let b = p.register_schema("voltmeter", b"schema-v2").unwrap();
        assert_eq!(
            (b.stream_id, b.schema_id),
            (1, 3),
            "new schema, same stream"
        );
        let all = ring.schemas().unwrap();
        assert_eq!(
            all.iter()
                .map(|e| (e.name.as_str(), e.schema_id))
                .collect::<Vec<_>>(),
            vec![("voltmeter", 1), ("camera", 2), ("voltmeter", 3)]
        );
        assert_eq!(all[1].schema, vec![7u8; 300]);
        assert!(p.register_schema("", b"x").is_err());
    }
    // A reader in another "process" (a fresh mapping) sees the same table.
    let (ro, _) = Ring::open(&t.0, false).unwrap();
    assert_eq!(ro.schemas().unwrap().len(), 3);
    let (_r, mut p) = Ring::create(&t.0, 8192, Policy::Overwrite, false).unwrap();
    assert_eq!(
        p.register_schema("camera", &[7u8; 300]).unwrap().schema_id,
        2,
        "restart reuses ids"
    );
}

#[test]
fn a_full_schema_region_is_a_clear_error() {
    let t = TempRing::new("schemafull");
    let (ring, mut p) = Ring::create(&t.0, 8192, Policy::Overwrite, false).unwrap();
    let big = vec![1u8; 100 * 1024];
    p.register_schema("a", &big).unwrap();
    p.register_schema("b", &big).unwrap();
    let e = p.register_schema("c", &big).unwrap_err();
    assert!(e.to_string().contains("schema region is full"), "{e}");
    assert_eq!(ring.schemas().unwrap().len(), 2, "nothing half-registered");
}

#[test]
fn per_stream_sequence_numbers_attribute_losses_to_streams() {
    let t = TempRing::new("streamseq");
    let (ring, mut p) = Ring::create(&t.0, 8192, Policy::Overwrite, false).unwrap();
    let mut slow = Reader::new(ring.clone(), Start::Oldest).unwrap();
    // Stream 1 writes three records for each one of stream 2.
    let mut written = [0u64; 3];
    for i in 0..400u64 {
        let stream = if i % 4 == 3 { 2 } else { 1 };
        p.write(&payload(i, 100), stream, None, Duration::ZERO)
            .unwrap();
        written[stream as usize] += 1;
    }
    let mut next = [0u64; 3];
    let mut lost = [0u64; 3];
    let mut got = [0u64; 3];
    while let Some((rec, _)) = slow.next_copy().unwrap() {
        let s = rec.stream as usize;
        lost[s] += rec.stream_seq - next[s];
        next[s] = rec.stream_seq + 1;
        got[s] += 1;
    }
    assert_eq!(got[1] + lost[1], written[1]);
    assert_eq!(got[2] + lost[2], written[2]);
    assert_eq!(
        lost[1] + lost[2],
        slow.lost(),
        "per-stream losses add up to the total"
    );
    assert!(lost[1] > 0 && lost[2] > 0);
    // A producer that died after committing a record but before publishing its counters
    // resumes each stream's numbering after what readers may have seen.
    let c = match p.try_claim(8, 2, None).unwrap() {
        ClaimResult::Claimed(c) => c,
        ClaimResult::WouldBlock { .. } => unreachable!(),
    };
    assert_eq!(c.stream_seq, written[2]);
    p.abort(c).unwrap();
    drop(p);
    let (_r, mut p2) = Ring::create(&t.0, 8192, Policy::Overwrite, false).unwrap();
    p2.write(b"again", 2, None, Duration::ZERO).unwrap();
    let mut latest = Reader::new(ring.clone(), Start::Oldest).unwrap();
    let last = std::iter::from_fn(|| latest.next_copy().unwrap())
        .last()
        .unwrap()
        .0;
    assert_eq!(
        (last.stream, last.stream_seq),
        (2, written[2]),
        "aborted numbers are reused"
    );
    // Streams beyond the tracked range get no per-stream number.
    p2.write(b"untracked", 5000, None, Duration::ZERO).unwrap();
    let last = std::iter::from_fn(|| latest.next_copy().unwrap())
        .last()
        .unwrap()
        .0;
    assert_eq!(last.stream_seq, rust_daq_core::format::NO_SEQ);
}

#[test]
fn advancing_a_stream_seq_counts_the_gap_as_lost_and_never_goes_back() {
    let t = TempRing::new("advance");
    let (ring, mut p) = Ring::create(&t.0, 1 << 16, Policy::Overwrite, false).unwrap();
    let mut r = Reader::new(ring.clone(), Start::Oldest).unwrap();
    p.write(b"a", 3, None, Duration::ZERO).unwrap();
    assert_eq!(p.advance_stream_seq(3, 10).unwrap(), 10);
    assert_eq!(p.advance_stream_seq(3, 4).unwrap(), 10, "never back");
    p.write(b"b", 3, None, Duration::ZERO).unwrap();
    p.write(b"c", 4, None, Duration::ZERO).unwrap();
    let got: Vec<_> = std::iter::from_fn(|| r.next_copy().unwrap())
        .map(|(rec, _)| (rec.stream, rec.seq, rec.stream_seq))
        .collect();
    assert_eq!(got, vec![(3, 0, 0), (3, 1, 10), (4, 2, 0)]);
    assert_eq!(r.lost(), 0, "the global sequence has no gap");
    // Not while a claim is pending (its stream_seq is already in its header).
    let c = match p.try_claim(8, 3, None).unwrap() {
        ClaimResult::Claimed(c) => c,
        ClaimResult::WouldBlock { .. } => unreachable!(),
    };
    assert!(p.advance_stream_seq(3, 20).is_err());
    p.abort(c).unwrap();
    assert_eq!(
        p.advance_stream_seq(5000, 7).unwrap(),
        rust_daq_core::format::NO_SEQ,
        "untracked"
    );
}
