//! Tier-1 tests of the ring core, through its public API, on real files in /dev/shm
//! (or the temp dir where there is none).

use std::sync::atomic::Ordering;
use std::time::Duration;

use rust_daq_core::format::{self, off};
use rust_daq_core::{ClaimResult, Error, Next, Policy, Reader, Ring, Start};

mod common;
use common::TempRing;

/// xorshift64*: deterministic sizes without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A payload that carries its own index and a checksum of everything else.
fn payload(index: u64, len: usize) -> Vec<u8> {
    let len = len.max(16);
    let mut v = vec![0u8; len];
    v[..8].copy_from_slice(&index.to_le_bytes());
    for (i, b) in v[16..].iter_mut().enumerate() {
        *b = (index as usize * 31 + i * 7) as u8;
    }
    let sum = fnv(&v[16..]);
    v[8..16].copy_from_slice(&sum.to_le_bytes());
    v
}

fn fnv(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| {
        (h ^ x as u64).wrapping_mul(0x100_0000_01b3)
    })
}

fn check(p: &[u8]) -> u64 {
    let idx = u64::from_le_bytes(p[..8].try_into().unwrap());
    let sum = u64::from_le_bytes(p[8..16].try_into().unwrap());
    assert_eq!(sum, fnv(&p[16..]), "payload of record {idx} is corrupt");
    idx
}

fn drain(rd: &mut Reader) -> Vec<(u64, Vec<u8>)> {
    let mut out = vec![];
    while let Some((rec, buf)) = rd.next_copy().unwrap() {
        out.push((rec.seq, buf));
    }
    out
}

#[test]
fn records_round_trip_in_order_with_sequence_numbers() {
    let t = TempRing::new("roundtrip");
    let (ring, mut p) = Ring::create(&t.0, 64 * 1024, Policy::Overwrite, false).unwrap();
    let mut rd = Reader::new(ring.clone(), Start::Oldest).unwrap();
    for i in 0..100u64 {
        let seq = p
            .write(
                &payload(i, 16 + i as usize * 3),
                7,
                Some(i as i64 * 10),
                Duration::ZERO,
            )
            .unwrap();
        assert_eq!(seq, i);
    }
    let got = drain(&mut rd);
    assert_eq!(got.len(), 100);
    for (i, (seq, buf)) in got.iter().enumerate() {
        assert_eq!(*seq, i as u64);
        assert_eq!(buf.len(), 16 + i * 3);
        assert_eq!(check(buf), i as u64);
    }
    assert_eq!(rd.lost(), 0);
    let st = ring.status();
    assert_eq!(st.next_seq, 100);
    assert_eq!(st.commit_pos, st.write_pos);
    assert_eq!(st.producer_pid, Some(std::process::id()));
}

#[test]
fn zero_length_records_and_exact_fit() {
    let t = TempRing::new("sizes");
    let (ring, mut p) = Ring::create(&t.0, 4096, Policy::Overwrite, false).unwrap();
    let mut rd = Reader::new(ring.clone(), Start::Oldest).unwrap();
    p.write(&[], 0, None, Duration::ZERO).unwrap();
    // The largest record fills the whole data region.
    let max = vec![0xABu8; ring.max_payload() as usize];
    p.write(&max, 0, None, Duration::ZERO).unwrap();
    let got = drain(&mut rd);
    // The zero-length record was overwritten by the full-size one before we read.
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1, max);
    assert_eq!(rd.lost(), 1);
    let too_big = vec![0u8; ring.max_payload() as usize + 1];
    match p.write(&too_big, 0, None, Duration::ZERO) {
        Err(Error::TooLarge {
            payload,
            max_payload,
        }) => {
            assert_eq!(payload, 4033);
            assert_eq!(max_payload, 4032);
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
}

#[test]
fn a_record_never_straddles_the_end_padding_fills_the_gap() {
    let t = TempRing::new("padding");
    let (ring, mut p) = Ring::create(&t.0, 4096, Policy::Overwrite, false).unwrap();
    let mut rd = Reader::new(ring.clone(), Start::Oldest).unwrap();
    // 3 records of 1024+64 bytes = 3264; the 4th (1088) does not fit in the 832 left.
    for i in 0..4u64 {
        p.write(&payload(i, 1024), 0, None, Duration::ZERO).unwrap();
    }
    let st = ring.status();
    assert_eq!(
        st.write_pos,
        4096 + 1088,
        "4th record starts after 832 bytes of padding"
    );
    // The padding record at 3264 is committed and typed as padding.
    let at = 3 * 1088;
    assert_eq!(
        ring.region().r32(at, off::R_TYPE).load(Ordering::Relaxed),
        format::TYPE_PADDING
    );
    assert_eq!(
        ring.region().r64(at, off::R_COMMIT).load(Ordering::Relaxed),
        format::COMMITTED | 832
    );
    // Readers see the three surviving... the first was reclaimed for the 4th.
    let got = drain(&mut rd);
    assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(rd.lost(), 1);
    for (seq, buf) in &got {
        assert_eq!(check(buf), *seq);
    }
}

#[test]
fn lapped_reader_jumps_to_oldest_and_counts_exactly() {
    let t = TempRing::new("lapping");
    let (ring, mut p) = Ring::create(&t.0, 8192, Policy::Overwrite, false).unwrap();
    let mut rng = Rng(42);
    let mut slow = Reader::new(ring.clone(), Start::Oldest).unwrap();
    let mut fast = Reader::new(ring.clone(), Start::Oldest).unwrap();
    let mut fast_seen = 0u64;
    let mut slow_seen = vec![];
    let n = 5000u64;
    for i in 0..n {
        p.write(
            &payload(i, 16 + rng.below(900) as usize),
            0,
            None,
            Duration::ZERO,
        )
        .unwrap();
        fast_seen += drain(&mut fast).len() as u64;
        if i % 97 == 0 {
            slow_seen.extend(drain(&mut slow).into_iter().map(|(s, b)| {
                assert_eq!(check(&b), s);
                s
            }));
        }
    }
    slow_seen.extend(drain(&mut slow).into_iter().map(|(s, _)| s));
    assert_eq!(fast_seen, n);
    assert_eq!(fast.lost(), 0);
    assert!(
        slow_seen.windows(2).all(|w| w[0] < w[1]),
        "delivered in order"
    );
    assert!(slow.lost() > 0);
    assert_eq!(
        slow_seen.len() as u64 + slow.lost(),
        n,
        "delivered + lost == written"
    );
    assert_eq!(*slow_seen.last().unwrap(), n - 1);
    // The producer's own count: everything nobody committed as consumed was lost.
    let st = ring.status();
    let survivors = {
        let mut r = Reader::new(ring.clone(), Start::Oldest).unwrap();
        drain(&mut r).len() as u64
    };
    assert_eq!(st.records_lost + survivors, n);
}

#[test]
fn commit_while_the_record_after_the_end_padding_is_still_filling() {
    // The reader skips the padding at the end of a lap as soon as the producer writes it,
    // before the record claimed after it is committed: its position is then past the
    // published commit_pos. commit() must store what is consumed, not fail.
    let t = TempRing::new("pad-commit");
    let (ring, mut p) = Ring::create(&t.0, 4096, Policy::Block, false).unwrap();
    let mut rd = Reader::new(ring.clone(), Start::Oldest).unwrap();
    for i in 0..3u64 {
        p.write(&payload(i, 1024), 0, None, Duration::ZERO).unwrap();
    }
    assert_eq!(drain(&mut rd).len(), 3);
    rd.commit().unwrap();
    assert_eq!(ring.status().read_tail, 3 * 1088);
    // 832 bytes are left before the end: a 1024-byte record goes after padding, at 4096.
    let c = match p.try_claim(1024, 0, None).unwrap() {
        ClaimResult::Claimed(c) => c,
        ClaimResult::WouldBlock { .. } => panic!("the consumer committed everything"),
    };
    assert_eq!(rd.peek().unwrap(), Next::Busy { seq: 3 });
    assert_eq!(rd.position(), 4096, "the reader moved over the padding");
    assert_eq!(ring.status().commit_pos, 3 * 1088);
    rd.commit().unwrap();
    let st = ring.status();
    assert_eq!((st.read_tail, st.read_tail_seq), (3 * 1088, 3));
    unsafe { p.fill(&c, payload(3, 1024).as_ptr(), 1024) };
    p.commit(c).unwrap();
    let got = drain(&mut rd);
    assert_eq!(got.len(), 1);
    assert_eq!(check(&got[0].1), 3);
    rd.commit().unwrap();
    let st = ring.status();
    assert_eq!((st.read_tail, st.read_tail_seq), (4096 + 1088, 4));
}

#[test]
fn uncommitted_records_are_invisible_and_abort_reuses_the_sequence() {
    let t = TempRing::new("commit");
    let (ring, mut p) = Ring::create(&t.0, 8192, Policy::Overwrite, false).unwrap();
    let mut rd = Reader::new(ring.clone(), Start::Oldest).unwrap();
    let c = match p.try_claim(100, 3, Some(5)).unwrap() {
        ClaimResult::Claimed(c) => c,
        ClaimResult::WouldBlock { .. } => unreachable!(),
    };
    assert_eq!(rd.peek().unwrap(), Next::Busy { seq: 0 });
    assert!(rd.next_copy().unwrap().is_none());
    // A second claim while one is pending is refused.
    assert!(matches!(
        p.try_claim(8, 0, None),
        Err(Error::Invalid { .. })
    ));
    unsafe { p.fill(&c, payload(0, 100).as_ptr(), 100) };
    p.abort(c).unwrap();
    assert!(
        rd.next_copy().unwrap().is_none(),
        "aborted record is padding"
    );
    let seq = p
        .write(&payload(0, 100), 3, Some(5), Duration::ZERO)
        .unwrap();
    assert_eq!(seq, 0, "the aborted sequence number is reused");
    let (rec, buf) = rd.next_copy().unwrap().unwrap();
    assert_eq!((rec.seq, rec.stream, rec.timestamp_ns), (0, 3, 5));
    assert_eq!(check(&buf), 0);
    assert_eq!(rd.lost(), 0);
}

#[test]
fn producer_killed_mid_record_leaves_nothing_readable_and_restart_continues() {
    let t = TempRing::new("crash");
    let (ring, mut p) = Ring::create(&t.0, 8192, Policy::Overwrite, false).unwrap();
    for i in 0..3u64 {
        p.write(&payload(i, 40), 0, None, Duration::ZERO).unwrap();
    }
    let c = match p.try_claim(64, 0, None).unwrap() {
        ClaimResult::Claimed(c) => c,
        ClaimResult::WouldBlock { .. } => unreachable!(),
    };
    unsafe { p.fill(&c, [0xEEu8; 32].as_ptr(), 32) };
    // Simulate SIGKILL: the process vanishes without running Drop; its pid is gone.
    std::mem::forget(p);
    // The lock word of docs/ring-format.md: pid | (start time mod 2^32) << 32.
    ring.region()
        .h64(off::PRODUCER_LOCK)
        .store(0x7fff_fff0 | (1 << 32), Ordering::Release);
    let mut rd = Reader::new(ring.clone(), Start::Oldest).unwrap();
    assert_eq!(drain(&mut rd).len(), 3);
    assert_eq!(rd.peek().unwrap(), Next::Busy { seq: 3 });
    let (ring2, mut p2) = Ring::create(&t.0, 8192, Policy::Overwrite, false).unwrap();
    assert_eq!(p2.took_over_from(), Some(0x7fff_fff0));
    assert_eq!(
        p2.next_seq(),
        3,
        "sequence continues; the torn record's number is reused"
    );
    assert_eq!(
        rd.peek().unwrap(),
        Next::Empty,
        "the torn record became padding"
    );
    assert_eq!(
        p2.write(&payload(3, 40), 0, None, Duration::ZERO).unwrap(),
        3
    );
    let got = drain(&mut rd);
    assert_eq!(got.len(), 1);
    assert_eq!(check(&got[0].1), 3);
    assert_eq!(rd.lost(), 0);
    drop(ring2);
}

#[test]
fn one_producer_per_ring() {
    let t = TempRing::new("lock");
    let (_ring, p) = Ring::create(&t.0, 8192, Policy::Overwrite, false).unwrap();
    match Ring::open(&t.0, true) {
        Err(Error::ProducerActive {
            pid,
            this_process: true,
        }) => assert_eq!(pid, std::process::id()),
        other => panic!("expected ProducerActive, got {:?}", other.map(|_| ())),
    }
    drop(p);
    let (_r2, p2) = Ring::open(&t.0, true).unwrap();
    assert!(p2.is_some());
}

#[test]
fn reopen_keeps_data_other_capacity_needs_replace() {
    let t = TempRing::new("reopen");
    {
        let (_r, mut p) = Ring::create(&t.0, 8192, Policy::Overwrite, false).unwrap();
        for i in 0..5u64 {
            p.write(&payload(i, 30), 0, None, Duration::ZERO).unwrap();
        }
    }
    let (ring, mut p) = Ring::create(&t.0, 8192, Policy::Overwrite, false).unwrap();
    assert_eq!(
        p.write(&payload(5, 30), 0, None, Duration::ZERO).unwrap(),
        5
    );
    let mut rd = Reader::new(ring.clone(), Start::Oldest).unwrap();
    assert_eq!(
        drain(&mut rd).iter().map(|g| g.0).collect::<Vec<_>>(),
        vec![0, 1, 2, 3, 4, 5]
    );
    drop(p);
    let err = Ring::create(&t.0, 16384, Policy::Overwrite, false)
        .map(|_| ())
        .unwrap_err();
    assert!(err.to_string().contains("capacity 8192"), "{err}");
    let err = Ring::create(&t.0, 8192, Policy::Block, false)
        .map(|_| ())
        .unwrap_err();
    assert!(err.to_string().contains("policy \"overwrite\""), "{err}");
    let (ring3, _p3) = Ring::create(&t.0, 16384, Policy::Overwrite, true).unwrap();
    assert_eq!(ring3.capacity(), 16384);
    assert_eq!(ring3.status().next_seq, 0);
    assert_ne!(ring3.session_id(), ring.session_id());
}

#[test]
fn bad_capacities_are_refused() {
    let t = TempRing::new("cap");
    for (cap, needle) in [
        (0u64, "greater than 0"),
        (100, "too small"),
        (1 << 50, "beyond what can be mapped"),
    ] {
        let e = Ring::create(&t.0, cap, Policy::Overwrite, false)
            .map(|_| ())
            .unwrap_err();
        assert!(e.to_string().contains(needle), "{cap}: {e}");
    }
    assert!(!t.0.exists());
    // Unaligned capacities are rounded up to the record alignment.
    let (ring, _p) = Ring::create(&t.0, 5000, Policy::Overwrite, false).unwrap();
    assert_eq!(ring.capacity(), 5056);
}

#[test]
fn start_positions_latest_and_tail() {
    let t = TempRing::new("start");
    let (ring, mut p) = Ring::create(&t.0, 8192, Policy::Overwrite, false).unwrap();
    for i in 0..10u64 {
        p.write(&payload(i, 20), 0, None, Duration::ZERO).unwrap();
    }
    let mut primary = Reader::new(ring.clone(), Start::Oldest).unwrap();
    for _ in 0..4 {
        primary.next_copy().unwrap().unwrap();
    }
    primary.commit().unwrap();
    assert_eq!(ring.status().read_tail_seq, 4);
    let mut latest = Reader::new(ring.clone(), Start::Latest).unwrap();
    let mut tail = Reader::new(ring.clone(), Start::Tail).unwrap();
    p.write(&payload(10, 20), 0, None, Duration::ZERO).unwrap();
    assert_eq!(
        drain(&mut latest).iter().map(|g| g.0).collect::<Vec<_>>(),
        vec![10]
    );
    assert_eq!(
        drain(&mut tail).iter().map(|g| g.0).collect::<Vec<_>>(),
        (4..11).collect::<Vec<_>>()
    );
    assert_eq!((latest.lost(), tail.lost()), (0, 0));
    // A tail that was lapped: the reader counts what the consumer never saw.
    for i in 11..400u64 {
        p.write(&payload(i, 20), 0, None, Duration::ZERO).unwrap();
    }
    let mut late = Reader::new(ring.clone(), Start::Tail).unwrap();
    let got = drain(&mut late);
    assert_eq!(got.last().unwrap().0, 399);
    assert_eq!(got.len() as u64 + late.lost(), 400 - 4);
}

#[test]
fn snapshot_and_advance_tail_follow_the_original_api() {
    let t = TempRing::new("snapshot");
    let (ring, mut p) = Ring::create(&t.0, 8192, Policy::Overwrite, false).unwrap();
    for i in 0..3u64 {
        p.write(&payload(i, 100), 0, None, Duration::ZERO).unwrap();
    }
    let (start, snap) = ring.read_snapshot().unwrap();
    assert_eq!(start, 0);
    assert_eq!(snap.len(), 3 * 192);
    // The snapshot is framed records: the second record's header says position 192.
    assert_eq!(
        u64::from_le_bytes(snap[192 + 24..192 + 32].try_into().unwrap()),
        192
    );
    assert_eq!(check(&snap[64..64 + 100]), 0);
    let e = ring.advance_tail(100).unwrap_err();
    assert!(e.to_string().contains("inside a record"), "{e}");
    let e = ring.advance_tail(10_000).unwrap_err();
    assert!(e.to_string().contains("past the committed data"), "{e}");
    assert_eq!(ring.advance_tail(192).unwrap(), 192);
    assert_eq!(ring.status().read_tail_seq, 1);
    assert_eq!(ring.read_snapshot().unwrap().1.len(), 2 * 192);
    ring.advance_tail(2 * 192).unwrap();
    assert!(ring.read_snapshot().unwrap().1.is_empty());
    assert_eq!(ring.status().read_tail_seq, 3);
}

#[test]
fn block_policy_waits_for_the_consumer_and_loses_nothing() {
    let t = TempRing::new("block");
    let (ring, mut p) = Ring::create(&t.0, 4096, Policy::Block, false).unwrap();
    // 1024-byte payloads: 3 fit (3 * 1088 = 3264 of 4096).
    for i in 0..3u64 {
        p.write(&payload(i, 1024), 0, None, Duration::ZERO).unwrap();
    }
    let e = p
        .write(&payload(3, 1024), 0, None, Duration::from_millis(20))
        .unwrap_err();
    assert!(matches!(e, Error::Full { .. }), "{e}");
    assert_eq!(
        ring.status().next_seq,
        3,
        "a timed-out write leaves nothing behind"
    );
    let consumer_ring = ring.clone();
    let consumer = std::thread::spawn(move || {
        let mut rd = Reader::new(consumer_ring, Start::Tail).unwrap();
        let mut seen = vec![];
        while seen.len() < 200 {
            match rd.next_copy().unwrap() {
                Some((rec, buf)) => {
                    assert_eq!(check(&buf), rec.seq);
                    seen.push(rec.seq);
                    rd.commit().unwrap();
                }
                None => rd.wait(Duration::from_millis(50)),
            }
        }
        (seen, rd.lost())
    });
    for i in 3..200u64 {
        p.write(&payload(i, 1024), 0, None, Duration::from_secs(10))
            .unwrap();
    }
    let (seen, lost) = consumer.join().unwrap();
    assert_eq!(seen, (0..200).collect::<Vec<_>>());
    assert_eq!(lost, 0);
    assert_eq!(ring.status().records_lost, 0);
}

#[test]
fn threaded_stress_many_laps_every_record_intact_or_counted() {
    let t = TempRing::new("stress");
    let (ring, mut p) = Ring::create(&t.0, 64 * 1024, Policy::Overwrite, false).unwrap();
    let n = 200_000u64;
    let readers: Vec<_> = (0..2)
        .map(|k| {
            // Created before the producer starts: every record is this reader's to count.
            let mut rd = Reader::new(ring.clone(), Start::Oldest).unwrap();
            std::thread::spawn(move || {
                let mut last = None;
                let mut delivered = 0u64;
                loop {
                    match rd.next_copy().unwrap() {
                        Some((rec, buf)) => {
                            assert_eq!(check(&buf), rec.seq, "reader {k}");
                            assert!(last.is_none_or(|l| rec.seq > l), "reader {k} out of order");
                            last = Some(rec.seq);
                            delivered += 1;
                            if rec.seq == n - 1 {
                                return (delivered, rd.lost());
                            }
                        }
                        None => rd.wait(Duration::from_millis(10)),
                    }
                }
            })
        })
        .collect();
    let mut rng = Rng(7);
    for i in 0..n {
        let len = if rng.below(100) == 0 {
            16 + rng.below(16 * 1024)
        } else {
            16 + rng.below(200)
        };
        p.write(&payload(i, len as usize), 0, None, Duration::ZERO)
            .unwrap();
    }
    for r in readers {
        let (delivered, lost) = r.join().unwrap();
        assert_eq!(delivered + lost, n, "delivered {delivered} + lost {lost}");
    }
}

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
fn payloads_can_be_filled_piecewise_at_any_offset() {
    let t = TempRing::new("fillat");
    let (ring, mut p) = Ring::create(&t.0, 8192, Policy::Overwrite, false).unwrap();
    let mut rd = Reader::new(ring.clone(), Start::Oldest).unwrap();
    let msg: Vec<u8> = (0..=250u8).collect();
    let c = match p.try_claim(msg.len() as u64, 4, None).unwrap() {
        ClaimResult::Claimed(c) => c,
        ClaimResult::WouldBlock { .. } => unreachable!(),
    };
    let mut at = 0usize;
    for n in [4usize, 4, 184, 59] {
        unsafe { p.fill_at(&c, at as u64, msg[at..].as_ptr(), n) };
        at += n;
    }
    p.set_claim_tags(&c, 9, 0);
    p.commit(c).unwrap();
    let (rec, buf) = rd.next_copy().unwrap().unwrap();
    assert_eq!(buf, msg);
    assert_eq!((rec.stream, rec.schema_id), (4, 9));
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
