//! Hot reuse under policy "block" (`Producer::set_hot_wrap`): a ring whose consumer keeps up
//! goes back to its start early, so that records cycle through memory still in cache, and a
//! consumer that lags or stops keeps the whole ring as slack. For large records, the
//! producer waits briefly for a consumer a record or two behind, its payload copied ahead
//! (`ClaimResult::WouldBlock::hot_wait`, `Producer::prefill_hot`).
//!
//! Through the public API, on real files in /dev/shm (or the temp dir where there is none).

use std::time::Duration;

use rust_daq_core::{ClaimResult, Next, Policy, Reader, Ring, Start};

mod common;
use common::{check, payload, TempRing};

/// Writes `n` records of `len` bytes, each read (and committed) by `rd` before the next one
/// when `drain_each`; returns the ring offset (position % capacity) of every record read.
fn offsets_written(
    ring: &std::sync::Arc<Ring>,
    p: &mut rust_daq_core::Producer,
    rd: &mut Reader,
    n: u64,
    len: usize,
    drain_each: bool,
) -> Vec<u64> {
    let cap = ring.capacity();
    let mut offsets = vec![];
    let take = |rd: &mut Reader, offsets: &mut Vec<u64>| {
        while let Some((rec, buf)) = rd.next_copy().unwrap() {
            assert_eq!(check(&buf), rec.seq);
            assert_eq!(rec.seq, offsets.len() as u64, "in order, none lost");
            offsets.push(rec.pos % cap);
            rd.commit().unwrap();
        }
    };
    for i in 0..n {
        p.write(&payload(i, len), 0, None, Duration::ZERO).unwrap();
        if drain_each {
            take(rd, &mut offsets);
        }
    }
    take(rd, &mut offsets);
    assert_eq!(offsets.len() as u64, n);
    offsets
}

/// A 256 KiB block ring going back to its start past 16 KiB, and a reader at its tail.
fn hot_ring(t: &TempRing) -> (std::sync::Arc<Ring>, rust_daq_core::Producer, Reader) {
    let (ring, mut p) = Ring::create(&t.0, 256 * 1024, Policy::Block, false).unwrap();
    p.set_hot_wrap(16 * 1024);
    let rd = Reader::new(ring.clone(), Start::Tail).unwrap();
    (ring, p, rd)
}

#[test]
fn a_block_ring_its_consumer_keeps_up_with_reuses_its_first_bytes() {
    let t = TempRing::new("hot");
    let (ring, mut p) = Ring::create(&t.0, 256 * 1024, Policy::Block, false).unwrap();
    assert_eq!(p.hot_wrap(), rust_daq_core::HOT_WRAP_DEFAULT);
    p.set_hot_wrap(16 * 1024);
    let mut rd = Reader::new(ring.clone(), Start::Tail).unwrap();
    let offsets = offsets_written(&ring, &mut p, &mut rd, 2_000, 1024, true);
    // 1,088 bytes a record: back to 0 once past 16 KiB, never deeper into the 256 KiB.
    assert!(
        offsets.iter().all(|&o| o < 16 * 1024 + 1088),
        "{:?}",
        offsets.iter().max()
    );
    assert_eq!(offsets.iter().filter(|&&o| o == 0).count(), 2_000 / 16);
    assert_eq!((rd.lost(), ring.status().records_lost), (0, 0));
}

#[test]
fn a_block_ring_whose_consumer_lags_still_has_all_of_its_room() {
    let t = TempRing::new("hot-lag");
    let (ring, mut p, mut rd) = hot_ring(&t);
    // 200 records of 1,088 bytes unread (217 KiB): nothing is wrapped early, none blocks.
    let offsets = offsets_written(&ring, &mut p, &mut rd, 200, 1024, false);
    assert_eq!(offsets, (0..200u64).map(|i| i * 1088).collect::<Vec<_>>());
    // All consumed now: the next record goes back to 0 from where the producer is, not at
    // the end of the ring.
    p.write(&payload(200, 1024), 0, None, Duration::ZERO)
        .unwrap();
    let (rec, buf) = rd.next_copy().unwrap().unwrap();
    assert_eq!(
        (rec.seq, check(&buf), rec.pos % ring.capacity()),
        (200, 200, 0)
    );
    assert_eq!(rec.pos, ring.capacity());
}

#[test]
fn hot_reuse_off_and_overwrite_rings_go_through_the_whole_ring() {
    for (policy, hot) in [(Policy::Block, 0), (Policy::Overwrite, 16 * 1024)] {
        let t = TempRing::new("hot-off");
        let (ring, mut p) = Ring::create(&t.0, 256 * 1024, policy, false).unwrap();
        p.set_hot_wrap(hot);
        let mut rd = Reader::new(ring.clone(), Start::Tail).unwrap();
        let offsets = offsets_written(&ring, &mut p, &mut rd, 600, 1024, true);
        let lap = (256 * 1024 / 1088) as usize; // records a lap holds
        assert_eq!(
            offsets[..lap],
            (0..lap as u64).map(|i| i * 1088).collect::<Vec<_>>()[..]
        );
        assert_eq!(offsets[lap], 0, "{policy:?}");
    }
}

#[test]
fn a_consumer_that_stops_after_one_record_still_leaves_the_whole_ring() {
    let t = TempRing::new("hot-stop");
    let (ring, mut p, mut rd) = hot_ring(&t);
    p.write(&payload(0, 1024), 0, None, Duration::ZERO).unwrap();
    let (rec, _) = rd.next_copy().unwrap().unwrap();
    assert_eq!(rec.seq, 0);
    rd.commit().unwrap(); // ...and reads no more
    let mut written = 1u64;
    while p
        .write(&payload(written, 1024), 0, None, Duration::ZERO)
        .is_ok()
    {
        written += 1;
    }
    // 1,088 bytes a record in 256 KiB: the whole ring, not the first 16 KiB of it.
    assert_eq!(written, 241, "records written before the ring was full");
    let offsets: Vec<u64> = std::iter::from_fn(|| rd.next_copy().unwrap())
        .map(|(r, buf)| {
            assert_eq!(check(&buf), r.seq);
            r.pos % ring.capacity()
        })
        .collect();
    assert_eq!(offsets.len(), 240);
    assert_eq!(offsets[0], 1088);
}

/// A 1 MiB block ring of 64 KiB records going back to its start past two of them, the
/// producer two records in (at the hot point), a reader at the tail that took the first.
const BIG: usize = 64 * 1024;
const BIG_SIZE: u64 = BIG as u64 + 64;

fn at_the_hot_point(t: &TempRing) -> (std::sync::Arc<Ring>, rust_daq_core::Producer, Reader) {
    let (ring, mut p) = Ring::create(&t.0, 1 << 20, Policy::Block, false).unwrap();
    p.set_hot_wrap(128 * 1024);
    let mut rd = Reader::new(ring.clone(), Start::Tail).unwrap();
    for i in 0..2u64 {
        p.write(&payload(i, BIG), 0, None, Duration::ZERO).unwrap();
    }
    let (rec, buf) = rd.next_copy().unwrap().unwrap();
    assert_eq!((rec.seq, check(&buf)), (0, 0));
    rd.commit().unwrap();
    (ring, p, rd)
}

/// A claim of a BIG record that must be a hot wait (the ring not full, not claimed).
fn expect_hot_wait(p: &mut rust_daq_core::Producer) {
    match p.try_claim(BIG as u64, 0, None).unwrap() {
        ClaimResult::WouldBlock {
            hot_wait: Some(_), ..
        } => {}
        ClaimResult::WouldBlock { .. } => panic!("full, not a hot wait"),
        ClaimResult::Claimed(c) => panic!("claimed at {}, not a hot wait", c.pos),
    }
}

/// `prefill_hot` of a BIG payload no record ever carries (0xEE bytes fail every checksum).
fn copy_junk_ahead(p: &mut rust_daq_core::Producer) -> bool {
    let junk = vec![0xEEu8; BIG];
    // SAFETY: `junk` is BIG bytes long.
    unsafe { p.prefill_hot(junk.as_ptr(), BIG) }.unwrap()
}

fn claimed(r: ClaimResult) -> rust_daq_core::Claim {
    match r {
        ClaimResult::Claimed(c) => c,
        ClaimResult::WouldBlock {
            needed_tail,
            hot_wait,
        } => {
            panic!("no claim: needed_tail {needed_tail}, hot_wait {hot_wait:?}")
        }
    }
}

#[test]
fn large_records_a_consumer_finishes_in_time_go_back_to_the_start_copied_ahead() {
    let t = TempRing::new("hot-wait");
    let (ring, mut p, mut rd) = at_the_hot_point(&t);
    // The consumer still owes record 1: not full, but the producer is asked to wait, as
    // long as 64 KiB take at 8 GB/s, for the consumer to take it.
    match p.try_claim(BIG as u64, 0, None).unwrap() {
        ClaimResult::WouldBlock {
            needed_tail,
            hot_wait: Some(d),
        } => {
            assert_eq!(needed_tail, 2 * BIG_SIZE);
            assert_eq!(d, Duration::from_nanos(BIG_SIZE / 8));
        }
        _ => panic!("expected a hot wait"),
    }
    // A reader that does not commit, in the middle of record 0 (zero-copy).
    let mut early = Reader::new(ring.clone(), Start::Oldest).unwrap();
    let Next::Record(r0) = early.peek().unwrap() else {
        panic!("record 0 is still in the ring")
    };
    assert_eq!(r0.seq, 0);
    let two = payload(2, BIG);
    // SAFETY: `two` is BIG bytes long.
    assert!(unsafe { p.prefill_hot(two.as_ptr(), BIG) }.unwrap());
    // Record 0, copied ahead over, was consumed and is now reclaimed: the early reader's
    // view of it no longer confirms, and it goes on at record 1, counting 0 as lost.
    assert!(!early.confirm(&r0));
    let (rec, buf) = early.next_copy().unwrap().unwrap();
    assert_eq!((rec.seq, check(&buf), early.lost()), (1, 1, 1));
    // Meanwhile the consumer takes record 1 (whole: the copy ahead is not where it is).
    let (rec, buf) = rd.next_copy().unwrap().unwrap();
    assert_eq!((rec.seq, check(&buf)), (1, 1));
    rd.commit().unwrap();
    let c = claimed(p.try_claim_prefilled(BIG as u64, 0, 0, None).unwrap());
    assert!(c.prefilled);
    assert_eq!((c.pos, c.seq), (ring.capacity(), 2));
    assert_eq!(p.commit(c).unwrap(), 2);
    let (rec, buf) = rd.next_copy().unwrap().unwrap();
    assert_eq!((rec.seq, check(&buf), rec.pos % ring.capacity()), (2, 2, 0));
    assert_eq!(ring.status().records_lost, 0);
}

#[test]
fn a_copy_ahead_the_consumer_is_too_slow_for_is_never_read_and_costs_no_room() {
    let t = TempRing::new("hot-slow");
    let (ring, mut p, mut rd) = at_the_hot_point(&t);
    expect_hot_wait(&mut p);
    assert!(copy_junk_ahead(&mut p));
    // The consumer did not take record 1 in time: the record goes where it would have
    // without hot reuse, filled as usual, and the lap goes on without another wait.
    let c = claimed(p.try_claim_prefilled(BIG as u64, 0, 0, None).unwrap());
    assert!(!c.prefilled);
    assert_eq!(c.pos, 2 * BIG_SIZE);
    let two = payload(2, BIG);
    // SAFETY: `two` is BIG bytes long.
    unsafe { p.fill(&c, two.as_ptr(), BIG) };
    p.commit(c).unwrap();
    let mut written = 3u64;
    while p
        .write(&payload(written, BIG), 0, None, Duration::ZERO)
        .is_ok()
    {
        written += 1;
    }
    // 1 MiB holds 15 records of 64 KiB + 64: all of them, though only the first was read.
    assert_eq!(written - 1, 15, "records unread when the ring was full");
    let got: Vec<u64> = std::iter::from_fn(|| rd.next_copy().unwrap())
        .map(|(r, buf)| {
            assert_eq!(check(&buf), r.seq, "payload of the copy ahead never read");
            r.seq
        })
        .collect();
    assert_eq!(got, (1..written).collect::<Vec<_>>());
    assert_eq!(ring.status().records_lost, 0);
}

#[test]
fn a_plain_claim_after_a_copy_ahead_fills_its_record_itself() {
    // A write that gave up after its copy ahead (an error, a timeout) must not leave that
    // copy to the next record of the same size.
    let t = TempRing::new("hot-abandon");
    let (ring, mut p, mut rd) = at_the_hot_point(&t);
    expect_hot_wait(&mut p);
    assert!(copy_junk_ahead(&mut p));
    rd.next_copy().unwrap().unwrap();
    rd.commit().unwrap();
    let c = claimed(p.try_claim(BIG as u64, 0, None).unwrap());
    assert_eq!((c.pos % ring.capacity(), c.prefilled), (0, false));
    p.abort(c).unwrap();
}

#[test]
fn a_producer_killed_after_its_copy_ahead_leaves_a_ring_the_next_one_continues() {
    let t = TempRing::new("hot-crash");
    let (ring, mut p, mut rd) = at_the_hot_point(&t);
    expect_hot_wait(&mut p);
    assert!(copy_junk_ahead(&mut p));
    std::mem::forget(p); // SIGKILL: no Drop; the lock word names a pid that is gone
    ring.region()
        .h64(rust_daq_core::format::off::PRODUCER_LOCK)
        .store(
            0x7fff_fff0 | (1 << 32),
            std::sync::atomic::Ordering::Release,
        );
    let (_ring2, mut p2) = Ring::create(&t.0, 1 << 20, Policy::Block, false).unwrap();
    assert_eq!((p2.took_over_from(), p2.next_seq()), (Some(0x7fff_fff0), 2));
    let mut got = vec![];
    for i in 2..40u64 {
        p2.write(&payload(i, BIG), 0, None, Duration::from_secs(5))
            .unwrap();
        while let Some((rec, buf)) = rd.next_copy().unwrap() {
            assert_eq!(check(&buf), rec.seq);
            got.push(rec.seq);
            rd.commit().unwrap();
        }
    }
    assert_eq!(got, (1..40).collect::<Vec<_>>());
    assert_eq!(rd.lost(), 0);
    assert_eq!(rd.peek().unwrap(), Next::Empty);
}

#[test]
fn a_copy_ahead_never_tears_a_record_its_consumer_still_owes() {
    let t = TempRing::new("hot-owed");
    let (ring, mut p) = Ring::create(&t.0, 1 << 20, Policy::Block, false).unwrap();
    p.set_hot_wrap(128 * 1024);
    let mut rd = Reader::new(ring.clone(), Start::Tail).unwrap();
    for i in 0..2u64 {
        p.write(&payload(i, BIG), 0, None, Duration::ZERO).unwrap();
    }
    // The consumer owes both records: offset 0 is record 0's, not free.
    expect_hot_wait(&mut p);
    assert!(!copy_junk_ahead(&mut p));
    let got: Vec<u64> = std::iter::from_fn(|| rd.next_copy().unwrap())
        .map(|(r, buf)| {
            assert_eq!(check(&buf), r.seq, "record {} intact", r.seq);
            r.seq
        })
        .collect();
    assert_eq!(got, [0, 1]);
}

#[test]
fn a_copy_ahead_of_another_length_is_not_taken_for_the_record() {
    let t = TempRing::new("hot-len");
    let (ring, mut p, mut rd) = at_the_hot_point(&t);
    expect_hot_wait(&mut p);
    assert!(copy_junk_ahead(&mut p));
    rd.next_copy().unwrap().unwrap();
    rd.commit().unwrap();
    let c = claimed(p.try_claim_prefilled(BIG as u64 - 8, 0, 0, None).unwrap());
    assert_eq!((c.pos % ring.capacity(), c.prefilled), (0, false));
}

#[test]
fn a_wait_that_fails_keeps_the_history_of_the_last_lap_for_readers_from_the_oldest() {
    // A lap through the whole ring (the consumer lagged), then the consumer catches up to a
    // record behind in the next lap: a copy ahead would reclaim the rest of the last lap,
    // which a plain claim keeps for a reader of the history.
    let t = TempRing::new("hot-history");
    let (ring, mut p) = Ring::create(&t.0, 1 << 20, Policy::Block, false).unwrap();
    p.set_hot_wrap(128 * 1024);
    let mut rd = Reader::new(ring.clone(), Start::Tail).unwrap();
    for i in 0..15u64 {
        p.write(&payload(i, BIG), 0, None, Duration::ZERO).unwrap(); // lap 0, unread
    }
    while rd.next_copy().unwrap().is_some() {}
    rd.commit().unwrap();
    let mut history = Reader::new(ring.clone(), Start::Oldest).unwrap();
    for i in 15..17u64 {
        p.write(&payload(i, BIG), 0, None, Duration::ZERO).unwrap(); // lap 1: 15 and 16
    }
    assert_eq!(rd.next_copy().unwrap().unwrap().0.seq, 15);
    rd.commit().unwrap(); // ...it owes 16
    expect_hot_wait(&mut p);
    assert!(!copy_junk_ahead(&mut p));
    // Not drained in time: record 17 goes on after 16; the history of lap 0 from record 2
    // on (0 and 1 gave their room to 15 and 16) is still there.
    p.write(&payload(17, BIG), 0, None, Duration::ZERO).unwrap();
    let seen: Vec<u64> = std::iter::from_fn(|| history.next_copy().unwrap())
        .map(|(r, buf)| {
            assert_eq!(check(&buf), r.seq);
            r.seq
        })
        .collect();
    assert_eq!(seen, (3..18).collect::<Vec<_>>());
    assert_eq!(history.lost(), 3);
}

#[test]
fn writes_against_a_consumer_thread_a_record_behind_arrive_whole_and_in_order() {
    // Producer::write's own hot wait and copy ahead (the bindings have theirs), racing a
    // consumer that copies each 64 KiB record and commits it.
    let t = TempRing::new("hot-thread");
    let (ring, mut p) = Ring::create(&t.0, 2 << 20, Policy::Block, false).unwrap();
    p.set_hot_wrap(128 * 1024);
    let n = 2_000u64;
    let consumer_ring = ring.clone();
    let consumer = std::thread::spawn(move || {
        let mut rd = Reader::new(consumer_ring, Start::Tail).unwrap();
        let (mut seen, mut at_start) = (vec![], 0);
        while (seen.len() as u64) < n {
            match rd.next_copy().unwrap() {
                Some((rec, buf)) => {
                    assert_eq!(check(&buf), rec.seq, "record {} torn", rec.seq);
                    at_start += (rec.pos % (2 << 20) == 0) as u64;
                    seen.push(rec.seq);
                    rd.commit().unwrap();
                }
                None => rd.wait(Duration::from_millis(50)),
            }
        }
        (seen, at_start, rd.lost())
    });
    for i in 0..n {
        p.write(&payload(i, BIG), 0, None, Duration::from_secs(30))
            .unwrap();
        p.notify();
    }
    let (seen, at_start, lost) = consumer.join().unwrap();
    assert_eq!(seen, (0..n).collect::<Vec<_>>());
    assert_eq!((lost, ring.status().records_lost), (0, 0));
    // Laps through the 2 MiB ring alone would put 2,000 / 31 records at offset 0.
    assert!(
        at_start > n / 31,
        "{at_start} records at offset 0: no lap ended early"
    );
}
