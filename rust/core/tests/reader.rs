//! Reading records: start positions, lapping and exact loss counts, the primary consumer's
//! commit, snapshots and advance_tail, and readers on other threads under stress.
//!
//! Through the public API, on real files in /dev/shm (or the temp dir where there is none).

use std::time::Duration;

use rust_daq_core::{ClaimResult, Next, Policy, Reader, Ring, Start};

mod common;
use common::{check, drain, payload, Rng, TempRing};

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
    // SAFETY: the payload (a temporary living to the end of the statement) has 1024 bytes,
    // the claim's length.
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
