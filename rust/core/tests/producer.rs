//! Writing records: framing and sequence numbers, sizes up to the whole data region, end
//! padding, claims that are filled piecewise, committed or aborted, and the block policy.
//!
//! Through the public API, on real files in /dev/shm (or the temp dir where there is none).

use std::sync::atomic::Ordering;
use std::time::Duration;

use rust_daq_core::format::{self, off};
use rust_daq_core::{ClaimResult, Error, Next, Policy, Reader, Ring, Start};

mod common;
use common::{check, drain, payload, TempRing};

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
    // SAFETY: the payload (a temporary living to the end of the statement) has 100 bytes,
    // the claim's length.
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
        // SAFETY: the pieces add up to msg.len(), the claim's length: `n` bytes from `at`
        // are inside both `msg` and the payload.
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

/// `rows` rows of `len` bytes, back to back, row i being `payload(first + i, len)`.
fn rows_of(first: u64, rows: u64, len: usize) -> Vec<u8> {
    (first..first + rows)
        .flat_map(|i| payload(i, len))
        .collect()
}

#[test]
fn write_rows_writes_what_fits_in_order_under_one_timestamp_and_publishes_once() {
    let t = TempRing::new("rows");
    let (ring, mut p) = Ring::create(&t.0, 64 * 1024, Policy::Block, false).unwrap();
    let mut rd = Reader::new(ring.clone(), Start::Tail).unwrap();
    let rows = rows_of(0, 1000, 64);
    // SAFETY: `rows` holds 1,000 rows of 64 bytes.
    let n = unsafe { p.write_rows(rows.as_ptr(), 1000, 64, 5) }.unwrap();
    // 128 bytes a record in 64 KiB: all the room, then it stops instead of waiting.
    assert_eq!(n, 512);
    let st = ring.status();
    assert_eq!(
        (st.next_seq, st.commit_pos),
        (512, 512 * 128),
        "published at the end"
    );
    let mut stamps = vec![];
    while let Some((rec, buf)) = rd.next_copy().unwrap() {
        assert_eq!(
            (check(&buf), rec.stream, rec.stream_seq),
            (rec.seq, 5, rec.seq)
        );
        stamps.push(rec.timestamp_ns);
    }
    assert_eq!(stamps.len(), 512);
    assert!(stamps.iter().all(|&s| s == stamps[0]) && stamps[0] == st.heartbeat_ns);
    rd.commit().unwrap();
    // The rest, once there is room: sequence and per-stream numbers go on.
    // SAFETY: rows 512.. of the same buffer.
    let m = unsafe { p.write_rows(rows.as_ptr().add(512 * 64), 488, 64, 5) }.unwrap();
    assert_eq!(m, 488);
    let got: Vec<(u64, u64)> = std::iter::from_fn(|| rd.next_copy().unwrap())
        .map(|(rec, buf)| (check(&buf), rec.stream_seq))
        .collect();
    assert_eq!(got, (512..1000).map(|i| (i, i)).collect::<Vec<_>>());
    assert_eq!((rd.lost(), ring.status().records_lost), (0, 0));
}

#[test]
fn write_rows_on_an_overwrite_ring_counts_what_it_overwrites() {
    let t = TempRing::new("rows-ow");
    let (ring, mut p) = Ring::create(&t.0, 64 * 1024, Policy::Overwrite, false).unwrap();
    let mut rd = Reader::new(ring.clone(), Start::Tail).unwrap();
    let rows = rows_of(0, 2000, 64);
    // SAFETY: `rows` holds 2,000 rows of 64 bytes.
    assert_eq!(
        unsafe { p.write_rows(rows.as_ptr(), 2000, 64, 0) }.unwrap(),
        2000
    );
    let got = drain(&mut rd);
    assert_eq!(got.len(), 512);
    assert_eq!(check(&got[0].1), 2000 - 512);
    assert_eq!((rd.lost(), ring.status().records_lost), (1488, 1488));
}

#[test]
fn write_rows_refuses_what_write_refuses_and_leaves_large_rows_to_write() {
    let t = TempRing::new("rows-bad");
    let (ring, mut p) = Ring::create(&t.0, 1 << 20, Policy::Block, false).unwrap();
    let e = p.register_schema("s", b"schema").unwrap();
    let rows = rows_of(0, 4, 64);
    // SAFETY (each call): `rows` holds 4 rows of 64 bytes; `big` 2 rows of 64 KiB.
    let err = unsafe { p.write_rows(rows.as_ptr(), 4, 64, e.stream_id) }.unwrap_err();
    assert!(err.to_string().contains("\"s\""), "{err}");
    let c = match p.try_claim(8, 0, None).unwrap() {
        ClaimResult::Claimed(c) => c,
        ClaimResult::WouldBlock { .. } => unreachable!(),
    };
    let err = unsafe { p.write_rows(rows.as_ptr(), 4, 64, 0) }.unwrap_err();
    assert!(err.to_string().contains("pending"), "{err}");
    p.abort(c).unwrap();
    let big = rows_of(0, 2, 64 * 1024);
    assert_eq!(
        unsafe { p.write_rows(big.as_ptr(), 2, 64 * 1024, 0) }.unwrap(),
        0
    );
    assert_eq!(unsafe { p.write_rows(rows.as_ptr(), 0, 64, 0) }.unwrap(), 0);
    assert_eq!(ring.status().next_seq, 0, "nothing written");
}

#[test]
fn during_a_run_commit_pos_never_falls_behind_oldest_pos() {
    // An overwrite ring reclaims as a run goes: a run of 1,024 rows of 64 bytes is twice
    // this ring. Another thread samples the header the whole time.
    let t = TempRing::new("rows-inv");
    let (ring, mut p) = Ring::create(&t.0, 64 * 1024, Policy::Overwrite, false).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let halt = stop.clone();
    let producer = std::thread::spawn(move || {
        let rows = rows_of(0, 1024, 64);
        while !halt.load(Ordering::Relaxed) {
            // SAFETY: `rows` holds 1,024 rows of 64 bytes.
            assert_eq!(
                unsafe { p.write_rows(rows.as_ptr(), 1024, 64, 0) }.unwrap(),
                1024
            );
        }
    });
    let (mut behind, mut looks) = (0u64, 0u64);
    let t0 = std::time::Instant::now();
    while t0.elapsed() < Duration::from_millis(300) || looks < 1000 {
        let oldest = ring.oldest_pos(); // first: both only grow
        let (commit, _) = ring.snapshot();
        behind += (commit < oldest) as u64;
        looks += 1;
    }
    stop.store(true, Ordering::Relaxed);
    producer.join().unwrap();
    assert_eq!(
        behind, 0,
        "commit_pos behind oldest_pos in {behind} of {looks} looks"
    );
}

/// The child of the test below: writes a run whose row 768 is in an unreadable page.
fn die_in_the_middle_of_a_run(path: &std::ffi::OsStr) -> ! {
    let (good, page) = (768 * 64, 4096);
    // SAFETY: an anonymous private mapping of this process's own.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            good + page,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    } as *mut u8;
    assert!(base as isize != -1);
    let rows = rows_of(0, 768, 64);
    // SAFETY: `good` bytes from `rows` into the mapping's first `good` bytes; then its last
    // page is made unreadable.
    unsafe {
        std::ptr::copy_nonoverlapping(rows.as_ptr(), base, good);
        assert_eq!(
            libc::mprotect(base.add(good).cast(), page, libc::PROT_NONE),
            0
        );
    }
    let (_ring, p) = Ring::open(std::path::Path::new(path), true).unwrap();
    // SAFETY: deliberately not: rows 768.. fault, and the process dies mid-run.
    let _ = unsafe { p.unwrap().write_rows(base, 1024, 64, 7) };
    std::process::exit(3);
}

#[test]
fn a_producer_killed_in_the_middle_of_a_run_leaves_a_consistent_ring() {
    const CHILD: &str = "RDAQ_TEST_DIE_MID_RUN";
    if let Some(path) = std::env::var_os(CHILD) {
        die_in_the_middle_of_a_run(&path);
    }
    let t = TempRing::new("rows-crash");
    drop(Ring::create(&t.0, 64 * 1024, Policy::Overwrite, false).unwrap());
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_producer_killed_in_the_middle_of_a_run_leaves_a_consistent_ring",
            "--test-threads=1",
        ])
        .env(CHILD, &t.0)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(
        status.code().is_none(),
        "the child died of a signal: {status:?}"
    );
    let (ring, _) = Ring::open(&t.0, false).unwrap();
    let st = ring.status();
    // 768 records of 128 bytes went through 64 KiB: the ring reclaimed as the run went.
    assert!(st.oldest_pos > 0 && st.oldest_pos <= st.commit_pos && st.commit_pos <= st.write_pos);
    assert!(ring.read_snapshot().is_ok() && ring.advance_tail(0).is_ok());
    // The next producer counts what the dead one committed and did not publish.
    let (ring2, p2) = Ring::open(&t.0, true).unwrap();
    let mut p2 = p2.unwrap();
    assert_eq!(p2.next_seq(), 768);
    let s2 = ring2.status();
    assert_eq!((s2.commit_pos, s2.next_seq), (s2.write_pos, 768));
    p2.write(&payload(768, 64), 7, None, Duration::ZERO)
        .unwrap();
    let mut rd = Reader::new(ring2.clone(), Start::Oldest).unwrap();
    let got: Vec<(u64, u64)> = std::iter::from_fn(|| rd.next_copy().unwrap())
        .map(|(rec, buf)| {
            assert_eq!(check(&buf), rec.seq);
            (rec.seq, rec.stream_seq)
        })
        .collect();
    assert_eq!(
        got.len(),
        511,
        "a ring's worth, less the torn record (padding now)"
    );
    assert_eq!(got.last(), Some(&(768, 768)), "stream 7's numbers go on");
    assert!(got.iter().all(|&(s, ss)| s == ss));
}

#[test]
fn write_rows_leaves_rows_whose_records_are_64_kib_to_write() {
    // 65,500 bytes: a record of 65,600, which a hot wait is for (write_rows must not meet
    // it, and use up the lap's one wait, and stop).
    let t = TempRing::new("rows-hot");
    let (ring, mut p) = Ring::create(&t.0, 1 << 20, Policy::Block, false).unwrap();
    let rows = rows_of(0, 2, 65_500);
    // SAFETY: `rows` holds 2 rows of 65,500 bytes.
    assert_eq!(
        unsafe { p.write_rows(rows.as_ptr(), 2, 65_500, 0) }.unwrap(),
        0
    );
    assert_eq!(ring.status().next_seq, 0);
    // SAFETY: the same buffer, rows of 65,408 bytes (a record of 65,472).
    assert_eq!(
        unsafe { p.write_rows(rows.as_ptr(), 2, 65_408, 0) }.unwrap(),
        2
    );
}
